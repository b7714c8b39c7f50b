//! Lab helpers for segbpf's privileged tests and `cargo xtask demo`:
//! network namespaces joined by a bridge, TCP listeners and connection
//! attempts inside namespaces, running the `segbpf` binary against
//! private pin/state roots. Everything a lab creates is removed when the
//! lab is dropped, also when a test fails. With the `harness` feature (on
//! for this crate's tests), the `harness` module loads the real eBPF
//! program and runs frames through it with BPF_PROG_TEST_RUN.

#![allow(
    clippy::missing_panics_doc,
    clippy::many_single_char_names,
    reason = "test helpers: a broken test setup panics by design, and checksum code names its terms as RFC 1071 does"
)]

// The crate's own tests turn on its `harness` feature by depending on it.
#[cfg(test)]
use segbpf_tests as _;

pub mod generate;
#[cfg(feature = "harness")]
pub mod harness;
pub mod lab;
pub mod net;
pub mod netns;
pub mod nspawn;
pub mod tun;

pub use lab::{Host, Lab};
