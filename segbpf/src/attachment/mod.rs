//! The attachment layer: segbpf on one interface of one network namespace,
//! from the first attach to the detach. What lives on disk ([`pins`]:
//! pins, state file, history, sidecars), loading the object ([`loader`]),
//! the kernel maps ([`maps`]), and the lifecycle engines: [`attach`],
//! [`swap`] (reload, rollback, set edits) and the lockout [`guard`].
//! The services attachment (`[services.*]` on cgroups, one per cgroup
//! root) is [`services`], kept in step with the cgroup tree by
//! [`cgroup_follow`], with its lockout guard [`services_guard`]; set edits and rollback
//! are [`services_edit`], its dry runs (`trace --services`) [`services_trace`];
//! [`services_nest`] refuses an attachment nested in another;
//! [`services_level`] finds absolute cgroup levels from the kernel.
//!
//! May import `policy` and `host`; never `observe`, `fleet` or `cmd`.

pub mod attach;
pub mod batch;
pub mod cgroup_follow;
pub mod ctmap;
pub mod ctseen;
pub mod cttables;
pub mod delta;
pub mod dirs;
pub mod gone;
pub mod guard;
pub mod history;
pub mod liveness;
pub mod loader;
pub mod maps;
pub mod memory;
pub mod observed;
pub mod pins;
pub mod services;
pub mod services_edit;
pub mod services_guard;
pub mod services_level;
pub mod services_nest;
pub mod services_trace;
pub mod setindex;
pub mod state;
pub mod swap;
pub mod timeline;
pub mod trust;
