//! `#[repr(C)]` types and constants shared by the segbpf eBPF programs and
//! userspace: map keys and values, the configuration record, the list of
//! verdict reasons (one list for kernel and CLI) and map names/sizes.
//!
//! Every type is plain old data (`bytemuck::Pod`) with explicit padding and a
//! compile-time size check, so both sides agree on the byte layout. Fields in
//! network byte order carry a `_be` suffix. The `user` feature adds
//! `aya::Pod` so userspace can use the types with aya's typed maps.
#![no_std]
#![deny(missing_docs)]

pub mod config;
pub mod conntrack;
pub mod ctseen;
pub mod cttable;
pub mod denied;
pub mod events;
pub mod keys;
pub mod maps;
pub mod portmiss;
pub mod reasons;
pub mod services;
pub mod stats;
#[cfg(feature = "user")]
mod user;

pub use config::*;
pub use conntrack::*;
pub use ctseen::*;
pub use cttable::*;
pub use denied::*;
pub use events::*;
pub use keys::*;
pub use maps::*;
pub use portmiss::*;
pub use reasons::*;
pub use services::*;
pub use stats::*;
