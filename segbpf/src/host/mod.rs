//! The host layer: what segbpf learns from the machine it runs on, and
//! how it talks to it: network interfaces and namespaces as the kernel
//! reports them, protocol names, a packet builder, wall-clock time, the
//! service manager and logging.
//!
//! Imports no other layer of segbpf.

pub mod clock;
pub mod logging;
pub mod netif;
pub mod netns;
pub mod packet;
pub mod proto;
pub mod service;
