//! segbpf: host microsegmentation firewall on eBPF.
//!
//! One roles.toml for the whole fleet ([`policy`]), compiled into kernel map
//! contents ([`compile`]) whose per-packet cost does not grow with the number
//! of rules, loaded and pinned ([`loader`], [`pins`], [`maps`]) and driven by
//! the `segbpf` command ([`cmd`]).

pub mod cmd;
pub mod compile;
pub mod export;
pub mod history;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod netif;
pub mod packet;
pub mod pins;
pub mod policy;
pub mod state;
pub mod telemetry;
pub mod trust;
