//! The `segbpf` command line: one file per subcommand. Results go to
//! stdout, logs to stderr; exit status 0 ok, 1 failure, 2 usage.
//!
//! The command layer: it may import every layer of the library, and no
//! library module imports it.

pub mod attach;
pub mod check;
pub mod completions;
pub mod confirm;
pub mod detach;
pub mod diff;
pub mod explain;
pub mod export;
pub mod fleet;
pub mod flows;
pub mod guard;
pub mod history;
pub mod import;
pub mod man;
pub mod monitor;
pub mod reload;
pub mod rollback;
pub mod services;
pub mod set;
pub mod status;
pub mod suggest;
pub mod trace;

use std::net::IpAddr;

use clap::{Parser, Subcommand, ValueEnum};

use crate::{host::proto::parse_proto, policy::Direction};

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
    /// Restore the policy in force before the current one, or generation
    /// --to N (from the history); a second rollback goes further back.
    Rollback(rollback::Args),
    /// List the generations of an interface's policy kept in the history.
    History(history::Args),
    /// Show what changed between two generations, or a file and the policy in force.
    Diff(diff::Args),
    /// Internal: the --confirm guard process.
    #[command(hide = true)]
    Guard(guard::Args),
    /// Remove segbpf from an interface (the observed store of denied
    /// traffic stays until it expires, for `segbpf suggest`).
    Detach(detach::Args),
    /// Stream the drop events of an interface that is already enforcing.
    Monitor(monitor::Args),
    /// List the tracked flows of an interface with their counters (like `conntrack -L`).
    Flows(flows::Args),
    /// Print a roles.toml that allows exactly what an interface's policy
    /// denied (audit mode: would have denied): audit, suggest, review, enforce.
    /// Also after `detach`, from the store and the policy then in force.
    Suggest(suggest::Args),
    /// Show attachments, their policy and counters.
    Status(status::Args),
    /// Fleet mode on etcd: push a policy to every agent, see who enforces what.
    Fleet(fleet::Args),
    /// Explain the verdict for a packet from the policy alone (reference evaluator).
    Explain(explain::Args),
    /// Export a host's view of the policy in another firewall's language (nftables).
    Export(export::Args),
    /// Run a packet through the program loaded on an interface, changing nothing.
    Trace(trace::Args),
    /// Turn per-host nftables or iptables rulesets into one roles.toml (stdout).
    Import(import::Args),
    /// Print the shell completion script for bash, zsh, fish, elvish or powershell.
    Completions(completions::Args),
    /// Internal: the names the completion scripts offer for a word.
    #[command(hide = true)]
    CompleteNames(completions::NamesArgs),
    /// Internal: write the manual pages into a directory (the package build).
    #[command(hide = true)]
    Man(man::Args),
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

/// Writes one line of a result to stdout. Unlike `println!`, a write
/// error (a closed pipe: `segbpf status | head -1`) is returned rather than
/// a panic; `main` ends quietly with status 0 on a broken pipe.
pub fn print_line(text: impl std::fmt::Display) -> std::io::Result<()> {
    use std::io::Write as _;
    writeln!(std::io::stdout().lock(), "{text}")
}

pub use crate::JSON_SCHEMA;

/// `value` as JSON with the dialect's version (`"schema"`) added to it when
/// it is an object (every document and record of docs/json.md is).
pub fn versioned(value: &impl serde::Serialize) -> serde_json::Result<serde_json::Value> {
    let mut v = serde_json::to_value(value)?;
    if let Some(o) = v.as_object_mut() {
        o.insert("schema".into(), JSON_SCHEMA.into());
    }
    Ok(v)
}

/// Prints `value` on stdout as one JSON document with the dialect's
/// version (see [`print_line`], [`versioned`]).
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    print_line(serde_json::to_string_pretty(&versioned(value)?)?)?;
    Ok(())
}

/// Rewrites the unix-time integers named `keys` anywhere in `v` as RFC
/// 3339 UTC strings: docs/json.md has one type for times, and files and
/// etcd keep integers.
pub fn times_as_rfc3339(v: &mut serde_json::Value, keys: &[&str]) {
    match v {
        serde_json::Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                match x.as_u64() {
                    Some(t) if keys.contains(&k.as_str()) => {
                        *x = crate::host::clock::rfc3339(
                            std::time::UNIX_EPOCH + std::time::Duration::from_secs(t),
                        )
                        .into();
                    }
                    _ => times_as_rfc3339(x, keys),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| times_as_rfc3339(x, keys)),
        _ => {}
    }
}

/// `value` as one JSON Lines record with the dialect's version.
pub fn json_line(value: &impl serde::Serialize) -> serde_json::Result<String> {
    serde_json::to_string(&versioned(value)?)
}

/// The JSON document of a failed command under `-o json` (docs/json.md):
/// `{"schema": 1, "error": {"kind": "usage"|"failure", "message": "..."}}`,
/// printed on stdout; the exit status stays 2 for usage, 1 otherwise.
pub fn error_json(message: &str, usage: bool) -> String {
    let doc = serde_json::json!({
        "schema": JSON_SCHEMA,
        "ok": false,
        "error": {
            "kind": if usage { "usage" } else { "failure" },
            "message": message,
        },
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// An error whose JSON document the command printed itself (`check -o
/// json` lists every error of the file in it); `main` only reports it on
/// stderr and sets the exit status.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct JsonReported {
    /// The error's text.
    pub message: String,
    /// A usage error (exit status 2).
    pub usage: bool,
}

/// A policy file as the `policy` field of a JSON document names it: its
/// canonical path (docs/json.md), or the path as given when it cannot be
/// resolved (a file that does not exist).
pub fn canonical_policy(path: &std::path::Path) -> String {
    std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// The `"error"` object of a failed command's JSON document.
#[derive(Debug, serde::Serialize)]
pub struct ErrorBody {
    /// `usage` (exit status 2) or `failure` (exit status 1).
    pub kind: &'static str,
    /// What went wrong, as stderr says it.
    pub message: String,
}

impl ErrorBody {
    /// The error object of `e`.
    pub fn of(e: &anyhow::Error) -> Self {
        ErrorBody {
            kind: if e.downcast_ref::<UsageError>().is_some() {
                "usage"
            } else {
                "failure"
            },
            message: error_text(e),
        }
    }
}

/// Whether a command line asks for JSON (`-o json`, `--output json`,
/// `--output=json`, `-ojson`; `monitor --log-format json`): for errors
/// found before or while parsing it, which then print as JSON too.
pub fn args_ask_json<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> bool {
    let args: Vec<String> = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    args.iter().enumerate().any(|(i, a)| {
        let next_json = args.get(i + 1).is_some_and(|n| n == "json");
        a == "-ojson"
            || a == "--output=json"
            || a == "--log-format=json"
            || ((a == "-o" || a == "--output" || a == "--log-format") && next_json)
    })
}

/// The attachment a JSON result is about, named as `status` names it.
#[derive(Debug, serde::Serialize)]
pub struct Target {
    /// Interface.
    pub iface: String,
    /// Its network namespace.
    #[serde(flatten)]
    pub netns: NetnsOut,
}

impl Target {
    /// The target of `att`.
    pub fn of(att: &crate::attachment::pins::Attachment) -> Self {
        Target {
            iface: att.iface.clone(),
            netns: NetnsOut::of(att),
        }
    }
}

/// An attachment's network namespace in JSON results.
#[derive(Debug, serde::Serialize)]
pub struct NetnsOut {
    /// The namespace's label (`ip netns` name, `host`), if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// The namespace's inode.
    pub netns_inode: u64,
}

impl NetnsOut {
    /// The namespace of `att`.
    pub fn of(att: &crate::attachment::pins::Attachment) -> Self {
        NetnsOut {
            netns: att.netns.label.clone(),
            netns_inode: att.netns.inode,
        }
    }
}

/// A packet to judge: the arguments `explain` and `trace` share.
#[derive(Clone, Debug, clap::Args)]
pub struct PacketArgs {
    /// Source address.
    #[arg(long)]
    pub src: IpAddr,
    /// Destination address.
    #[arg(long)]
    pub dst: IpAddr,
    /// Protocol: tcp, udp, icmp, icmpv6 or a number.
    #[arg(long, value_parser = parse_proto)]
    pub proto: u8,
    /// Destination port (required for tcp and udp).
    #[arg(long)]
    pub dport: Option<u16>,
    /// ICMP type (default: echo request).
    #[arg(long)]
    pub icmp_type: Option<u8>,
    /// Direction of the packet relative to the host (`explain`: inferred
    /// from the roles' hosts when left out; `trace`: ingress).
    #[arg(long, value_enum)]
    pub direction: Option<DirArg>,
}

/// Direction argument.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum DirArg {
    /// Entering the host.
    #[default]
    Ingress,
    /// Leaving the host.
    Egress,
}

impl From<DirArg> for Direction {
    fn from(d: DirArg) -> Self {
        match d {
            DirArg::Ingress => Direction::Ingress,
            DirArg::Egress => Direction::Egress,
        }
    }
}

/// Map sizes an operator can set (the kernel allocates trie entries on
/// demand, so generous limits cost nothing until used).
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct MapSizes {
    /// Capacity of each peer trie (IPv4 and IPv6; both directions and both
    /// policy slots share it, so a policy may fill at most half of it).
    #[arg(long, value_name = "ENTRIES", default_value_t = segbpf_common::DEFAULT_PEER_ENTRIES)]
    pub peer_entries: u32,
    /// Capacity of the port trie (both policy slots share it: a policy may
    /// fill at most half of it).
    #[arg(long, value_name = "ENTRIES", default_value_t = segbpf_common::DEFAULT_PORT_ENTRIES)]
    pub port_entries: u32,
}

impl MapSizes {
    /// The compiler's capacity for `policy` with these sizes.
    pub fn capacity(&self, policy: &crate::policy::Policy) -> crate::policy::compile::Capacity {
        crate::policy::compile::Capacity {
            peer_v4: self.peer_entries,
            peer_v6: self.peer_entries,
            ports: self.port_entries,
            ..crate::policy::compile::Capacity::for_policy(policy)
        }
    }
}

/// A usage error found after argument parsing (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl Command {
    /// Whether the command's results are JSON (`-o json`), so that its
    /// errors are printed as JSON on stdout too.
    pub fn json_output(&self) -> bool {
        let json = |o: Output| o == Output::Json;
        match self {
            Command::Check(a) => json(a.output),
            Command::Attach(_)
            | Command::Guard(_)
            | Command::Completions(_)
            | Command::CompleteNames(_)
            | Command::Man(_) => false,
            Command::Reload(a) => json(a.output),
            Command::Set(a) => a.json_output(),
            Command::Confirm(a) => json(a.output),
            Command::Rollback(a) => json(a.output),
            Command::History(a) => json(a.output),
            Command::Diff(a) => json(a.output),
            Command::Detach(a) => json(a.output),
            Command::Monitor(a) => a.json_output(),
            Command::Flows(a) => json(a.output),
            Command::Suggest(a) => json(a.output),
            Command::Status(a) => json(a.output),
            Command::Fleet(a) => a.json_output(),
            Command::Explain(a) => json(a.output),
            Command::Export(a) => a.json_output(),
            Command::Trace(a) => json(a.output),
            Command::Import(a) => a.json_output(),
        }
    }
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // Where this runs, as the kernel says (`--netns` was entered in main);
    // commands that only read files do not ask.
    let ns = crate::host::netns::Netns::current;
    match cli.command {
        Command::Check(a) => check::run(a),
        Command::Attach(a) if a.services => services::attach(a).await,
        Command::Attach(a) => attach::run(a, &ns()?).await,
        Command::Reload(a) => reload::run(a, &ns()?),
        Command::Set(a) => set::run(a, &ns()?),
        Command::Confirm(a) => confirm::run(a, &ns()?),
        Command::Rollback(a) => rollback::run(a, &ns()?),
        Command::History(a) => history::run(a, &ns()?),
        Command::Diff(a) => diff::run(a, &ns()?),
        Command::Guard(a) => guard::run(a, &ns()?),
        Command::Detach(a) => detach::run(a, &ns()?),
        Command::Monitor(a) => monitor::run(a, &ns()?).await,
        Command::Status(a) => status::run(a, &ns()?),
        Command::Fleet(a) => fleet::run(a).await,
        Command::Flows(a) => flows::run(a, &ns()?),
        Command::Suggest(a) => suggest::run(a, &ns()?),
        Command::Explain(a) => explain::run(a),
        Command::Trace(a) => trace::run(a, &ns()?),
        Command::Export(a) => export::run(a),
        Command::Import(a) => import::run(a),
        Command::Completions(a) => completions::run(a),
        Command::CompleteNames(a) => completions::names(a),
        Command::Man(a) => man::run(a),
    }
}

/// The text of an error and its causes, as `{:#}` gives it, but without a
/// cause the message before it already quotes (library errors put their
/// source in their own message, so the plain chain would say it twice).
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let t = cause.to_string();
        if out.contains(&t) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&t);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cause_the_message_quotes_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let state = crate::attachment::state::StateError::Read {
            path: "/run/segbpf/net/1/eth0.json".into(),
            source: io,
        };
        let e = anyhow::Error::new(state).context("status of eth0");
        assert_eq!(
            super::error_text(&e),
            "status of eth0: reading state file /run/segbpf/net/1/eth0.json: no such file"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::error_text(&plain), "outer: inner");
    }
}
