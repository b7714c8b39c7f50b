//! Services: `[services.*]` enforced on the sockets of cgroups (systemd
//! units, containers) with one pair of cgroup_skb programs attached at the
//! cgroup v2 root (see docs/services.md).
//!
//! `compile` turns the policy's services into map contents, `cgroups`
//! finds the cgroup v2 mount, reads cgroup ids and classifies the cgroup
//! tree (service, none, guard), `engine` loads, attaches, pins, fills,
//! reloads and detaches, `follow` keeps the cgroup table in step with the tree
//! while the attachment runs, `report` says what is in force.

pub mod cgroups;
pub mod compile;
pub mod engine;
pub mod follow;
pub mod report;
