//! Builds the eBPF object (`segbpf-ebpf`) with aya-build so that a plain
//! `cargo build` produces a complete binary. Set `AYA_BUILD_SKIP=1` to skip.
use std::path::Path;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = Path::new(&manifest_dir)
        .parent()
        .context("segbpf has no parent directory")?
        .join("segbpf-ebpf");
    let root = root.to_str().context("non-UTF-8 path to segbpf-ebpf")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "segbpf-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
