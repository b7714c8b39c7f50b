//! `segbpf check`: parse, validate and compile a policy without touching
//! the kernel (like `nft -c -f`).

use std::path::PathBuf;

use anyhow::Context as _;

use crate::{
    compile::{self, Capacity},
    policy::{Direction, Policy},
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
}

/// Runs `segbpf check`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let policy = Policy::load(&args.policy)?;
    let hosts: Vec<Vec<String>> = if args.role.is_empty() {
        policy.roles.iter().map(|r| vec![r.name.clone()]).collect()
    } else {
        let roles = crate::policy::roles::resolve(&policy, &args.role, "-", &[])?;
        vec![roles]
    };
    println!(
        "{}: ok: version {}, {} sets, {} roles, {} rules",
        policy.source,
        policy.version,
        policy.sets.len(),
        policy.roles.len(),
        policy.rules.len()
    );
    for roles in hosts {
        let c = compile::compile(&policy, &roles, None, 0, 1, Capacity::default()).with_context(
            || format!("{}: compiling for role {}", policy.source, roles.join("+")),
        )?;
        let count = |d: Direction| c.rules.iter().filter(|r| r.direction == d.as_str()).count();
        println!(
            "  role {}: {} ingress + {} egress rules -> {} classes, {} IPv4 / {} IPv6 prefixes, {} port prefixes",
            roles.join("+"),
            count(Direction::Ingress),
            count(Direction::Egress),
            c.classes,
            c.peers_v4.len(),
            c.peers_v6.len(),
            c.ports.len()
        );
    }
    Ok(())
}
