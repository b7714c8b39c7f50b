//! segbpf: host microsegmentation firewall on eBPF.
//!
//! One roles.toml for the whole fleet ([`policy`]), compiled into kernel map
//! contents ([`compile`]) whose per-packet cost does not grow with the number
//! of rules, loaded and pinned ([`loader`], [`pins`], [`maps`]).
//!
//! The engines live here, each with its own error type: [`attach`] (attach
//! and detach), [`swap`] (reload, rollback, set edits), [`guard`] (the
//! lockout guard), [`report`] (status), [`telemetry`] (events) and
//! [`metrics`]. An attachment is identified by the kernel's network
//! namespace ([`netns`]) and interface. The `segbpf` command ([`cmd`]) only
//! parses arguments, calls them and prints; no other module uses it.

#![deny(missing_docs)]

// The package's examples use this dev-dependency; the unit tests do not.
#[cfg(test)]
use segbpf_tests as _;

pub mod attach;
pub mod clock;
pub mod cmd;
pub mod compile;
pub mod denied;
pub mod export;
pub mod fleet;
pub mod flowlog;
pub mod flows;
pub mod gone;
pub mod guard;
pub mod history;
pub mod import;
pub mod liveness;
pub mod loader;
pub mod logging;
pub mod maps;
pub mod memory;
pub mod metrics;
pub mod netif;
pub mod netns;
pub mod observed;
pub mod packet;
pub mod pins;
pub mod policy;
pub mod proto;
pub mod report;
pub mod service;
pub mod services;
pub mod state;
pub mod suggest;
pub mod swap;
pub mod telemetry;
pub mod timeline;
pub mod trace;
pub mod trust;
