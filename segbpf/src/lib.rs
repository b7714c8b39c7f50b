//! segbpf: host microsegmentation firewall on eBPF.
//!
//! One folder per layer; each imports only the layers below it:
//!
//! ```text
//! cmd          parse arguments, call the engines, print
//!  |
//! fleet        the fleet's store (etcd): canaries, revisions, the agent
//!  |
//! observe      events, denied aggregates, flows, metrics, status, trace
//!  |
//! attachment   pins and state on disk, load, maps, attach, swap, guard
//!  |
//! policy       roles.toml: parse, lint, eval, compile, export, import
//!  |
//! host         interfaces, network namespaces, protocols, clock, logs
//! ```
//!
//! A policy ([`policy`]) is compiled into kernel map contents
//! ([`policy::compile`]) and put in force on an attachment
//! ([`attachment`]: an interface of a network namespace, identified by the
//! kernel). What the kernel then sees is read back by [`observe`]; the
//! fleet ([`fleet`]) drives many hosts from one store. The `segbpf` command
//! ([`cmd`]) only parses arguments, calls the engines and prints; no other
//! module uses it.

#![deny(missing_docs)]

// The package's examples use this dev-dependency; the unit tests do not.
#[cfg(test)]
use segbpf_tests as _;
// The binary's global allocator (src/main.rs); the library allocates
// through whatever allocator its user chose.
use mimalloc as _;

/// The version of segbpf's JSON dialect (docs/json.md): every JSON
/// document and JSON Lines record carries it as `"schema"`. It goes up when
/// a field is removed or changes its type or meaning; new fields do not
/// change it.
pub const JSON_SCHEMA: u32 = 1;

pub mod attachment;
pub mod cmd;
pub mod fleet;
pub mod host;
pub mod observe;
pub mod policy;
