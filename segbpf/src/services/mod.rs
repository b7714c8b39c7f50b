//! Services: `[services.*]` enforced on the sockets of cgroups (systemd
//! units, containers) with one pair of cgroup_skb programs attached at the
//! cgroup v2 root (see docs/services.md).
//!
//! `compile` turns the policy's services into map contents, `cgroups`
//! finds the cgroup v2 mount, reads cgroup ids and classifies the cgroup
//! tree (service, none, guard) and `engine` loads, attaches, pins, fills
//! and follows the cgroup tree, and detaches.

pub mod cgroups;
pub mod compile;
pub mod engine;
