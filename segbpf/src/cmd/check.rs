//! `segbpf check`: parse, validate and compile a policy without touching
//! the kernel (like `nft -c -f`).

use std::path::PathBuf;

use anyhow::Context as _;

use crate::{
    compile,
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
    /// Treat lint warnings as errors (exit 1).
    #[arg(long)]
    pub deny_warnings: bool,
    /// Map sizes to check the policy against (as given to attach).
    #[command(flatten)]
    pub sizes: crate::cmd::MapSizes,
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
        let c = compile::compile(&policy, &roles, None, 0, 1, args.sizes.capacity(&policy))
            .with_context(|| {
                format!("{}: compiling for role {}", policy.source, roles.join("+"))
            })?;
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
    let mut warnings = crate::policy::lint::lint(&policy);
    warnings.retain(|w| !(args.deny_warnings && w.lint == "asymmetric-defaults"));
    for w in &warnings {
        eprintln!("warning: {}:{w}", policy.source);
    }
    let ssh = ssh_session_warning(&policy, &args.role);
    if args.deny_warnings && (!warnings.is_empty() || ssh) {
        anyhow::bail!(
            "{}: {} warning(s) and --deny-warnings",
            policy.source,
            warnings.len() + usize::from(ssh)
        );
    }
    Ok(())
}

/// Warns (on stderr) when the policy would cut the SSH session `check`
/// runs in: `SSH_CONNECTION` is "client-ip client-port server-ip
/// server-port"; the host's roles are `--role`, or those whose `hosts`
/// contain the server address. Returns whether it warned.
pub fn ssh_session_warning(policy: &Policy, roles_arg: &[String]) -> bool {
    let Ok(conn) = std::env::var("SSH_CONNECTION") else {
        return false;
    };
    let parts: Vec<&str> = conn.split_whitespace().collect();
    let (Some(client), Some(server), Some(port)) = (
        parts
            .first()
            .and_then(|a| a.parse::<std::net::IpAddr>().ok()),
        parts
            .get(2)
            .and_then(|a| a.parse::<std::net::IpAddr>().ok()),
        parts.get(3).and_then(|p| p.parse::<u16>().ok()),
    ) else {
        return false;
    };
    let roles = if roles_arg.is_empty() {
        policy
            .roles
            .iter()
            .filter(|r| r.hosts.iter().any(|h| h.contains(server)))
            .map(|r| r.name.clone())
            .collect()
    } else {
        roles_arg.to_vec()
    };
    let pkt = crate::policy::eval::Packet {
        src: client,
        dst: server,
        proto: segbpf_common::IPPROTO_TCP,
        dport: port,
        icmp_type: 0,
        hop_limit: 64,
    };
    let v = crate::policy::eval::evaluate(policy, &roles, None, Direction::Ingress, &pkt);
    if v.passes() {
        return false;
    }
    eprintln!(
        "warning: {}: this policy would block your SSH session from {client} to {server}:{port} on this host (roles: {}); add a rule before attaching, or attach with --confirm SECS",
        policy.source,
        if roles.is_empty() {
            "none".to_string()
        } else {
            roles.join(", ")
        }
    );
    true
}
