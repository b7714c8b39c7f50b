//! Rebuild the eBPF object when the `bpf-linker` binary changes.
use which::which;

fn main() {
    // Building this crate needs `bpf-linker`; tie the cache to its mtime (as aya-template does).
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
