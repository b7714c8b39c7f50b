//! The host layer: what segbpf learns from the machine it runs on, and
//! how it talks to it: network interfaces and namespaces as the kernel
//! reports them, the cgroup v2 tree ([`cgroups`]), the raw `bpf(2)` call
//! ([`bpf_sys`]), protocol names, a packet builder, wall-clock time, the
//! service manager and logging.
//!
//! Imports no other layer of segbpf.

pub mod bpf_sys;
pub mod cgroups;
pub mod clock;
pub mod logging;
pub mod netif;
pub mod netns;
pub mod packet;
pub mod phases;
pub mod proto;
pub mod service;
pub mod watch;
