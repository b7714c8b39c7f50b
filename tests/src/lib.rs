//! Lab helpers for segbpf's privileged tests and `cargo xtask demo`:
//! network namespaces joined by a bridge, TCP listeners and connection
//! attempts inside namespaces, and running the `segbpf` binary against
//! private pin/state roots. Everything a lab creates is removed when the
//! lab is dropped, also when a test fails.

pub mod generate;
pub mod lab;
pub mod net;
pub mod netns;
pub mod tun;

pub use lab::{Host, Lab};
