//! Builds the eBPF object (`segbpf-ebpf`) with aya-build so that a plain
//! `cargo build` produces a complete binary. Set `AYA_BUILD_SKIP=1` to skip;
//! without the `ebpf` feature nothing is built or embedded.
#![allow(
    unused_crate_dependencies,
    reason = "segbpf-ebpf is a build dependency only so that cargo reruns this script when it changes"
)]
use std::path::Path;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    if std::env::var_os("CARGO_FEATURE_EBPF").is_none() {
        // Built without the `ebpf` feature: no object to embed.
        return Ok(());
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = Path::new(&manifest_dir)
        .parent()
        .context("segbpf has no parent directory")?
        .join("segbpf-ebpf");
    let root = root.to_str().context("non-UTF-8 path to segbpf-ebpf")?;
    // aya-build relays every line the eBPF sub-build prints as a cargo
    // warning; a quiet sub-build prints only real diagnostics (and errors).
    // SAFETY: the build script is single-threaded; nothing reads the
    // environment concurrently.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "segbpf-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
