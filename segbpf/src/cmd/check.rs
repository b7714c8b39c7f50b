//! `segbpf check`: parse, validate and compile a policy without touching
//! the kernel (like `nft -c -f`). Every error in the file is reported, each
//! naming file, line, column and field; under `-o json` they are a JSON
//! object on stdout (exit 1).

use std::path::PathBuf;

use serde::Serialize;

use crate::{
    cmd::{Output, print_json, print_line},
    policy::compile,
    policy::{Direction, Policy, PolicyError, lint::Warning},
};

/// Arguments of `segbpf check`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  segbpf check /etc/segbpf/roles.toml\n  segbpf check -p roles.toml --role web --deny-warnings\n  segbpf check roles.toml -o json"
)]
pub struct Args {
    /// Policy file (roles.toml); the same as --policy.
    #[arg(
        value_name = "FILE",
        required_unless_present = "policy",
        conflicts_with = "policy"
    )]
    pub file: Option<PathBuf>,
    /// Policy file (roles.toml).
    #[arg(long, short = 'p', value_name = "FILE")]
    pub policy: Option<PathBuf>,
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
    /// `[services.*]` and their rules (docs/services.md).
    services: usize,
    service_rules: usize,
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

/// An error as JSON shows it.
#[derive(Serialize)]
struct ErrorOut {
    file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    column: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<String>,
}

impl From<&PolicyError> for ErrorOut {
    fn from(e: &PolicyError) -> Self {
        ErrorOut {
            file: e.source.clone(),
            line: e.loc.map(|l| l.line),
            column: e.loc.map(|l| l.column),
            field: (!e.field.is_empty()).then(|| e.field.clone()),
            message: e.kind.to_string(),
            hint: e.hint.clone(),
        }
    }
}

/// What `check -o json` prints when the policy is bad.
#[derive(Serialize)]
struct Failed {
    policy: String,
    ok: bool,
    /// The error as every command's JSON error document has it.
    error: crate::cmd::ErrorBody,
    errors: Vec<ErrorOut>,
}

/// Runs `segbpf check`. Everything is worked out before anything is
/// printed: a failure prints nothing on stdout, except the JSON error
/// object under `-o json`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let path = args.file.clone().or_else(|| args.policy.clone());
    let path = path.ok_or_else(|| crate::cmd::UsageError("give the policy file".into()))?;
    let file = path.display().to_string();
    let json = args.output == Output::Json;
    // Under -o json the document lists every error; main then only
    // reports on stderr (JsonReported).
    let failed = |errors: Vec<ErrorOut>, e: anyhow::Error| -> anyhow::Error {
        if !json {
            return e;
        }
        let error = crate::cmd::ErrorBody::of(&e);
        let reported = crate::cmd::JsonReported {
            message: error.message.clone(),
            usage: error.kind == "usage",
        };
        match print_json(&Failed {
            policy: crate::cmd::canonical_policy(&path),
            ok: false,
            error,
            errors,
        }) {
            Ok(()) => reported.into(),
            Err(p) => p,
        }
    };
    let policy = match Policy::load_all(&path) {
        Ok(p) => p,
        Err(errors) => {
            // Every error on stderr, one a line; the last line (main's)
            // counts them.
            for e in &errors {
                eprintln!("{e}");
            }
            let e = anyhow::anyhow!("{file}: {} error(s)", errors.len());
            return Err(failed(errors.iter().map(ErrorOut::from).collect(), e));
        }
    };
    match checked(args, &policy) {
        Ok(()) => Ok(()),
        Err(e) => {
            let one = ErrorOut {
                file: file.clone(),
                line: None,
                column: None,
                field: None,
                message: crate::cmd::error_text(&e),
                hint: None,
            };
            Err(failed(vec![one], e))
        }
    }
}

/// Compiles and lints a policy that parsed, and prints the result.
fn checked(args: Args, policy: &Policy) -> anyhow::Result<()> {
    let hosts: Vec<Vec<String>> = if args.role.is_empty() {
        compile::one_host_per_role(policy)
    } else {
        let roles = crate::policy::roles::resolve(policy, &args.role, "-", &[])?;
        vec![roles]
    };
    let mut compiled = Vec::new();
    for (roles, c) in compile::compile_hosts(policy, hosts, args.sizes.capacity(policy))? {
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
    let mut lints = crate::policy::lint::lint(policy);
    lints.retain(|w| !(args.deny_warnings && w.lint == "asymmetric-defaults"));
    let mut warnings: Vec<WarningOut> = lints
        .iter()
        .map(|w| WarningOut::lint(&policy.source, w))
        .collect();
    if let Some(message) = ssh_session_warning(policy, &args.role) {
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
    // The services compile too (their ids and slots fit).
    crate::policy::services::compile_services(policy, 0, 1, false)?;
    // And every service's cgroup is within the programs' reach below the
    // default cgroup root (the cgroup v2 mount; level 0 when none is
    // mounted here): `attach`/`reload` check it again below their root.
    if !policy.services.is_empty() {
        let (level, root) = crate::attachment::services_level::open_root(None).map_or_else(
            |_| (0, "(the cgroup hierarchy's root)".to_string()),
            |r| (r.level, r.dir.display().to_string()),
        );
        crate::policy::services::check_depth(policy, level, &root)?;
    }
    let out = Checked {
        policy: match args.output {
            Output::Json => crate::cmd::canonical_policy(std::path::Path::new(&policy.source)),
            Output::Text => policy.source.clone(),
        },
        version: policy.version,
        sets: policy.sets.len(),
        roles: policy.roles.len(),
        rules: policy.rules.len(),
        services: policy.services.len(),
        service_rules: policy.service_rules.len(),
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
            if out.services > 0 {
                print_line(format_args!(
                    "  services: {} with {} rules (attach --services)",
                    out.services, out.service_rules
                ))?;
            }
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
