//! `segbpf export nft`: the nftables ruleset equivalent to a host's view of
//! the policy, for `nft -f` (fallback, cross-check, migration, and the peer
//! in benchmarks). See `crate::policy::export` for what it contains. The rules the
//! host's view leaves out (roles not given, other interfaces) are named,
//! by their `name` when they have one: as comments at the top of the
//! ruleset, and in `left_out` under `-o json`.

use std::{fmt::Write as _, io::Write as _, path::PathBuf};

use serde::Serialize;

use crate::{
    cmd::{Output, print_json},
    policy::{
        Owner, Policy, Rule,
        compile::{RuleInfo, RuleJson},
        roles,
    },
};

/// Arguments of `segbpf export`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to export.
    #[command(subcommand)]
    pub format: Format,
}

/// Export formats.
#[derive(Debug, clap::Subcommand)]
pub enum Format {
    /// An nftables ruleset (inet table) for `nft -f`.
    #[command(
        after_help = "Without --role only the base rules are exported; the rules left out are named at the top of the ruleset (and in `left_out` under -o json).\n\nExamples:\n  segbpf export nft -p /etc/segbpf/roles.toml --role web > web.nft\n  segbpf export nft -p roles.toml --role db --iface eth0 -o json"
    )]
    Nft {
        /// Policy file (roles.toml).
        #[arg(long, short = 'p', value_name = "FILE")]
        policy: PathBuf,
        /// The host's role (repeatable); none: base rules only.
        #[arg(long, value_name = "ROLE")]
        role: Vec<String>,
        /// The interface the ruleset is for (resolves `interfaces = [...]`
        /// rules; without it they keep an iifname/oifname match).
        #[arg(long)]
        iface: Option<String>,
        /// nftables table name.
        #[arg(long, default_value = "segbpf")]
        table: String,
        /// Output format: the ruleset as text, or a JSON document holding
        /// it (docs/json.md).
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

impl Args {
    /// Whether the result is JSON.
    pub fn json_output(&self) -> bool {
        let Format::Nft { output, .. } = &self.format;
        *output == Output::Json
    }
}

/// A rule the host's view leaves out, and why.
#[derive(Debug, Serialize)]
struct LeftOut {
    rule: RuleJson,
    /// `role NAME not given` or `only on interfaces ...`.
    why: String,
}

/// What `export nft -o json` prints.
#[derive(Serialize)]
struct Exported<'a> {
    format: &'static str,
    policy: &'a str,
    table: &'a str,
    roles: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    iface: Option<&'a str>,
    left_out: &'a [LeftOut],
    ruleset: &'a str,
}

/// The rules of `policy` that a host with `roles` on `iface` does not get.
fn left_out(policy: &Policy, roles: &[String], iface: Option<&str>) -> Vec<LeftOut> {
    let why = |r: &Rule| match &r.owner {
        Owner::Role(role) if !roles.contains(role) => format!("role {role} not given"),
        _ => format!(
            "only on interfaces {}",
            r.interfaces.as_deref().unwrap_or_default().join(", ")
        ),
    };
    policy
        .rules
        .iter()
        .filter(|r| !r.applies(roles, iface))
        .map(|r| LeftOut {
            rule: RuleJson::new(r.id, Some(&RuleInfo::from_rule(r))),
            why: why(r),
        })
        .collect()
}

/// Runs `segbpf export`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let Format::Nft {
        policy,
        role,
        iface,
        table,
        output,
    } = args.format;
    let policy = Policy::load(&policy)?;
    let roles = if role.is_empty() {
        Vec::new()
    } else {
        roles::resolve(&policy, &role, "-", &[])?
    };
    let mut text = crate::policy::export::nft(&policy, &roles, iface.as_deref(), &table);
    let left = left_out(&policy, &roles, iface.as_deref());
    if output == Output::Json {
        return print_json(&Exported {
            format: "nft",
            policy: &crate::cmd::canonical_policy(std::path::Path::new(&policy.source)),
            table: &table,
            roles: &roles,
            iface: iface.as_deref(),
            left_out: &left,
            ruleset: &text,
        });
    }
    if !left.is_empty() {
        // After the ruleset's first (header) line.
        let mut notes = format!(
            "# Left out: {} rule(s) this host does not get{}:\n",
            left.len(),
            if roles.is_empty() {
                " (no --role given: base rules only)"
            } else {
                ""
            }
        );
        for l in &left {
            let label = l.rule.label.as_deref().unwrap_or("?");
            let line = l.rule.line.unwrap_or(0);
            let _ = match &l.rule.name {
                Some(name) => writeln!(notes, "#   {name} ({label}, line {line}): {}", l.why),
                None => writeln!(notes, "#   {label} (line {line}): {}", l.why),
            };
        }
        let at = text.find('\n').map_or(0, |i| i + 1);
        text.insert_str(at, &notes);
    }
    if roles.is_empty() && !left.is_empty() {
        tracing::warn!(
            "left out {} rule(s) of {} this host does not get: {} (see the ruleset's header)",
            left.len(),
            policy.source,
            left.iter()
                .map(|l| l.rule.display_name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // Not println!: a closed stdout is an error main handles (see
    // `cmd::print_line`), not a panic.
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(())
}
