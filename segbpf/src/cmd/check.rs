//! `segbpf check`: parse, validate and compile a policy without touching
//! the kernel (like `nft -c -f`).

use std::path::PathBuf;

use serde::Serialize;

use crate::{
    cmd::{Output, print_json, print_line},
    compile,
    policy::{Direction, Policy, lint::Warning},
};

/// Arguments of `segbpf check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy file (roles.toml).
    #[arg(long, short = 'p', value_name = "FILE")]
    pub policy: PathBuf,
    /// Compile only for these roles (repeatable); default: each role in turn.
    #[arg(long, value_name = "ROLE")]
    pub role: Vec<String>,
    /// Treat lint warnings as errors (exit 1).
    #[arg(long)]
    pub deny_warnings: bool,
    /// Map sizes to check the policy against (as given to attach).
    #[command(flatten)]
    pub sizes: crate::cmd::MapSizes,
    /// Output format (JSON carries the lint warnings; text prints them on stderr).
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// The result of `check`.
#[derive(Serialize)]
struct Checked {
    policy: String,
    version: u32,
    sets: usize,
    roles: usize,
    rules: usize,
    /// One entry per host compiled for (each role, or the `--role` set).
    compiled: Vec<Compiled>,
    warnings: Vec<WarningOut>,
}

#[derive(Serialize)]
struct Compiled {
    roles: Vec<String>,
    ingress_rules: usize,
    egress_rules: usize,
    classes: u32,
    ipv4_prefixes: usize,
    ipv6_prefixes: usize,
    port_prefixes: usize,
}

/// A warning as JSON shows it (`fleet push` prints them the same way).
#[derive(Serialize)]
pub struct WarningOut {
    file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    column: Option<u32>,
    /// The lint's name (`unused-set`, ...), or `ssh-session`.
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    message: String,
}

impl WarningOut {
    /// The warning `w` about `file`.
    pub fn lint(file: &str, w: &Warning) -> Self {
        WarningOut {
            file: file.to_string(),
            line: w.loc.map(|l| l.line),
            column: w.loc.map(|l| l.column),
            kind: w.lint,
            field: (!w.field.is_empty()).then(|| w.field.clone()),
            message: w.message.clone(),
        }
    }

    /// `FILE:LINE:COLUMN: warning: field: message [kind]`, the file named once.
    pub fn line(&self) -> String {
        let mut at = self.file.clone();
        if let (Some(l), Some(c)) = (self.line, self.column) {
            at = format!("{at}:{l}:{c}");
        }
        let field = self
            .field
            .as_ref()
            .map_or_else(String::new, |f| format!("{f}: "));
        format!("{at}: warning: {field}{} [{}]", self.message, self.kind)
    }
}

/// Runs `segbpf check`. Everything is worked out before anything is
/// printed: a failure prints nothing on stdout.
pub fn run(args: Args) -> anyhow::Result<()> {
    let policy = Policy::load(&args.policy)?;
    let hosts: Vec<Vec<String>> = if args.role.is_empty() {
        compile::one_host_per_role(&policy)
    } else {
        let roles = crate::policy::roles::resolve(&policy, &args.role, "-", &[])?;
        vec![roles]
    };
    let mut compiled = Vec::new();
    for (roles, c) in compile::compile_hosts(&policy, hosts, args.sizes.capacity(&policy))? {
        let count = |d: Direction| c.rules.iter().filter(|r| r.direction == d.as_str()).count();
        compiled.push(Compiled {
            ingress_rules: count(Direction::Ingress),
            egress_rules: count(Direction::Egress),
            classes: c.classes,
            ipv4_prefixes: c.peers_v4.len(),
            ipv6_prefixes: c.peers_v6.len(),
            port_prefixes: c.ports.len(),
            roles,
        });
    }
    let mut lints = crate::policy::lint::lint(&policy);
    lints.retain(|w| !(args.deny_warnings && w.lint == "asymmetric-defaults"));
    let mut warnings: Vec<WarningOut> = lints
        .iter()
        .map(|w| WarningOut::lint(&policy.source, w))
        .collect();
    if let Some(message) = ssh_session_warning(&policy, &args.role) {
        warnings.push(WarningOut {
            file: policy.source.clone(),
            line: None,
            column: None,
            kind: "ssh-session",
            field: None,
            message,
        });
    }
    // Text: the warnings go to stderr first (also when stdout is closed);
    // JSON carries them in the document, unless nothing is printed.
    if args.output == Output::Text || (args.deny_warnings && !warnings.is_empty()) {
        for w in &warnings {
            eprintln!("{}", w.line());
        }
    }
    if args.deny_warnings && !warnings.is_empty() {
        anyhow::bail!(
            "{}: {} warning(s) and --deny-warnings",
            policy.source,
            warnings.len()
        );
    }
    let out = Checked {
        policy: policy.source.clone(),
        version: policy.version,
        sets: policy.sets.len(),
        roles: policy.roles.len(),
        rules: policy.rules.len(),
        compiled,
        warnings,
    };
    match args.output {
        Output::Json => print_json(&out)?,
        Output::Text => {
            print_line(format_args!(
                "{}: ok: version {}, {} sets, {} roles, {} rules",
                out.policy, out.version, out.sets, out.roles, out.rules
            ))?;
            for c in &out.compiled {
                print_line(format_args!(
                    "  role {}: {} ingress + {} egress rules -> {} classes, {} IPv4 / {} IPv6 prefixes, {} port prefixes",
                    c.roles.join("+"),
                    c.ingress_rules,
                    c.egress_rules,
                    c.classes,
                    c.ipv4_prefixes,
                    c.ipv6_prefixes,
                    c.port_prefixes
                ))?;
            }
        }
    }
    Ok(())
}

/// The warning to give when the policy would cut the SSH session `check`
/// runs in ([`crate::policy::lint::ssh_session`]); the host's roles are
/// `--role`, or those whose `hosts` contain the server address.
pub fn ssh_session_warning(policy: &Policy, roles_arg: &[String]) -> Option<String> {
    crate::policy::lint::ssh_session(policy, roles_arg, None)
}
