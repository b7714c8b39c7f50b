//! The `segbpf` command line: one file per subcommand. Results go to
//! stdout, logs to stderr; exit status 0 ok, 1 failure, 2 usage.

pub mod attach;
pub mod check;
pub mod confirm;
pub mod detach;
pub mod explain;
pub mod export;
pub mod monitor;
pub mod reload;
pub mod set;
pub mod status;
pub mod trace;

use clap::{Parser, Subcommand, ValueEnum};

/// Host microsegmentation firewall on eBPF.
#[derive(Debug, Parser)]
#[command(name = "segbpf", version, about, long_about = None)]
pub struct Cli {
    /// Run in the named network namespace (/run/netns/NAME, as made by `ip netns add`).
    #[arg(long, global = true, env = "SEGBPF_NETNS", value_name = "NAME")]
    pub netns: Option<String>,
    /// More logs on stderr (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a policy and compile it for each role, changing nothing.
    Check(check::Args),
    /// Enforce a policy on an interface (XDP ingress); stays in the foreground.
    Attach(attach::Args),
    /// Replace an attachment's policy atomically, without reloading the programs.
    Reload(reload::Args),
    /// Add, remove or list members of a named set on a live attachment.
    Set(set::Args),
    /// Keep a change applied with --confirm (cancel its automatic rollback).
    Confirm(confirm::Args),
    /// Restore the policy in force before the current one (from the history).
    Rollback(reload::RollbackArgs),
    /// Internal: the --confirm guard process.
    #[command(hide = true)]
    Guard(confirm::GuardArgs),
    /// Remove segbpf from an interface.
    Detach(detach::Args),
    /// Stream the drop events of an interface that is already enforcing.
    Monitor(monitor::Args),
    /// Show attachments, their policy and counters.
    Status(status::Args),
    /// Explain the verdict for a packet from the policy alone (reference evaluator).
    Explain(explain::Args),
    /// Export a host's view of the policy in another firewall's language (nftables).
    Export(export::Args),
    /// Run a packet through the program loaded on an interface, changing nothing.
    Trace(trace::Args),
}

/// Output format of results on stdout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable text.
    #[default]
    Text,
    /// JSON (one document).
    Json,
}

/// Map sizes an operator can set (the kernel allocates trie entries on
/// demand, so generous limits cost nothing until used).
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct MapSizes {
    /// Capacity of each peer trie (IPv4 and IPv6; both directions and both
    /// policy slots share it).
    #[arg(long, value_name = "ENTRIES", default_value_t = segbpf_common::DEFAULT_PEER_ENTRIES)]
    pub peer_entries: u32,
    /// Capacity of the port trie.
    #[arg(long, value_name = "ENTRIES", default_value_t = segbpf_common::DEFAULT_PORT_ENTRIES)]
    pub port_entries: u32,
}

impl MapSizes {
    /// The compiler's capacity for `policy` with these sizes.
    pub fn capacity(&self, policy: &crate::policy::Policy) -> crate::compile::Capacity {
        crate::compile::Capacity {
            peer_v4: self.peer_entries,
            peer_v6: self.peer_entries,
            ports: self.port_entries,
            ..crate::compile::Capacity::for_policy(policy)
        }
    }
}

/// A usage error found after argument parsing (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let netns = cli.netns.as_deref();
    match cli.command {
        Command::Check(a) => check::run(a),
        Command::Attach(a) => attach::run(a, netns).await,
        Command::Reload(a) => reload::run(a, netns),
        Command::Set(a) => set::run(a, netns),
        Command::Confirm(a) => confirm::run(a, netns),
        Command::Rollback(a) => reload::rollback(a, netns),
        Command::Guard(a) => confirm::guard(a, netns),
        Command::Detach(a) => detach::run(a, netns),
        Command::Monitor(a) => monitor::run(a, netns).await,
        Command::Status(a) => status::run(a, netns),
        Command::Explain(a) => explain::run(a),
        Command::Trace(a) => trace::run(a, netns),
        Command::Export(a) => export::run(a),
    }
}

/// Parses a protocol name or number (`tcp`, `udp`, `icmp`, `icmpv6`, `6`).
pub fn parse_proto(s: &str) -> Result<u8, String> {
    use segbpf_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(IPPROTO_TCP),
        "udp" => Ok(IPPROTO_UDP),
        "icmp" => Ok(IPPROTO_ICMP),
        "icmpv6" | "ipv6-icmp" => Ok(IPPROTO_ICMPV6),
        other => other
            .parse::<u8>()
            .map_err(|_| format!("unknown protocol {s:?} (tcp, udp, icmp, icmpv6 or a number)")),
    }
}

/// Name of a protocol number for output.
pub fn proto_name(p: u8) -> String {
    use segbpf_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
    match p {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_ICMP => "icmp".into(),
        IPPROTO_ICMPV6 => "icmpv6".into(),
        n => n.to_string(),
    }
}
