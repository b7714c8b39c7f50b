//! `segbpf export nft`: the nftables ruleset equivalent to a host's view of
//! the policy, for `nft -f` (fallback, cross-check, migration, and the peer
//! in benchmarks). See `crate::policy::export` for what it contains.

use std::{io::Write as _, path::PathBuf};

use crate::policy::{Policy, roles};

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
    },
}

/// Runs `segbpf export`.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.format {
        Format::Nft {
            policy,
            role,
            iface,
            table,
        } => {
            let policy = Policy::load(&policy)?;
            let roles = if role.is_empty() {
                Vec::new()
            } else {
                roles::resolve(&policy, &role, "-", &[])?
            };
            // Not println!: a closed stdout is an error main handles (see
            // `cmd::print_line`), not a panic.
            let text = crate::policy::export::nft(&policy, &roles, iface.as_deref(), &table);
            std::io::stdout().lock().write_all(text.as_bytes())?;
        }
    }
    Ok(())
}
