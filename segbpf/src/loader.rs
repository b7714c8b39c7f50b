//! Loading the eBPF object: map sizes, dry-run instances that share a live
//! attachment's maps, and program lookup.

use aya::{Ebpf, EbpfLoader, programs::Xdp};
use segbpf_common::{
    GLOBAL_DRY_RUN, MAP_PEER_V4, MAP_PEER_V6, MAP_PORTS, PINNED_MAPS, PROG_XDP_INGRESS,
};

use crate::{compile::Capacity, pins::Attachment};

/// The eBPF object built by build.rs (aya-build).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/segbpf"));

/// Errors while loading.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The kernel or aya refused the object.
    #[error("loading the eBPF object failed: {0}")]
    Ebpf(#[from] aya::EbpfError),
    /// The XDP program could not be loaded (verifier).
    #[error("loading the XDP program failed: {0}")]
    Program(#[from] aya::programs::ProgramError),
    /// The object lacks the program.
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
}

/// Loads a fresh instance with its own maps sized by `capacity`. A
/// `dry_run` instance writes no counters and records each decision in
/// `SEG_TRACE` (used by tests that need the reason and rule of a packet).
pub fn load(capacity: Capacity, dry_run: bool) -> Result<Ebpf, LoadError> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(MAP_PEER_V4, capacity.peer_v4)
        .map_max_entries(MAP_PEER_V6, capacity.peer_v6)
        .map_max_entries(MAP_PORTS, capacity.ports)
        .override_global(GLOBAL_DRY_RUN, &(dry_run as u8), true)
        .load(EBPF_OBJECT)?;
    load_xdp(&mut ebpf)?;
    Ok(ebpf)
}

/// Loads a dry-run instance that shares every pinned map of `att` (policy,
/// config, counters) but writes no counters and records its decision in its
/// private `SEG_TRACE`. Running packets through it changes nothing live.
pub fn load_dry_run(att: &Attachment) -> Result<Ebpf, LoadError> {
    let paths: Vec<(&str, std::path::PathBuf)> =
        PINNED_MAPS.iter().map(|m| (*m, att.map(m))).collect();
    let mut loader = EbpfLoader::new();
    loader.override_global(GLOBAL_DRY_RUN, &1u8, true);
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(EBPF_OBJECT)?;
    load_xdp(&mut ebpf)?;
    Ok(ebpf)
}

fn load_xdp(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    xdp(ebpf)?.load()?;
    Ok(())
}

/// The ingress XDP program of a loaded instance.
pub fn xdp(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    let prog = ebpf
        .program_mut(PROG_XDP_INGRESS)
        .ok_or(LoadError::MissingProgram(PROG_XDP_INGRESS))?;
    Ok(prog.try_into()?)
}
