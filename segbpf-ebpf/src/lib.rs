//! Library target so that `segbpf` can name this crate as a build dependency
//! (cargo then rebuilds the eBPF object when it changes). The programs live in
//! `main.rs` and the modules it declares.
#![no_std]
#![allow(
    unused_crate_dependencies,
    reason = "the dependencies are the programs' (main.rs); this target only names the crate"
)]
