//! Loading the eBPF object: map sizes, run modes (live, dry run for trace,
//! record for tests), instances that share a live attachment's maps, and
//! program lookup.

use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, Xdp},
};
use segbpf_common::{
    GLOBAL_LINK, GLOBAL_RUN_MODE, MAP_CT, MAP_CT_NEW, MAP_FRAG, MAP_FRAG_NEW, MAP_PEER_V4,
    MAP_PEER_V6, MAP_PORTS, MAP_RULE_STATS, PINNED_MAPS, PROG_TC_EGRESS, PROG_XDP_INGRESS, RUN_DRY,
};

use crate::{compile::Capacity, pins::Attachment};

/// The eBPF object built by build.rs (aya-build).
#[cfg(feature = "ebpf")]
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/segbpf"));
/// Built without the `ebpf` feature: no object (loading fails cleanly).
#[cfg(not(feature = "ebpf"))]
pub static EBPF_OBJECT: &[u8] = &[];

/// Errors while loading.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The kernel or aya refused the object.
    #[error("loading the eBPF object failed: {0}")]
    Ebpf(#[from] aya::EbpfError),
    /// A program could not be loaded (verifier).
    #[error("loading a program failed: {0}")]
    Program(#[from] aya::programs::ProgramError),
    /// The object lacks a program.
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
}

/// Loads a fresh instance for an Ethernet-framed device with its own maps
/// sized by `capacity`, in run mode `mode` (`segbpf_common::RUN_LIVE`,
/// `RUN_DRY` or `RUN_RECORD`).
pub fn load(capacity: Capacity, mode: u8) -> Result<Ebpf, LoadError> {
    load_for_link(capacity, mode, segbpf_common::LINK_ETHERNET)
}

/// Like [`load`], for a device whose link layer is `link`
/// (`segbpf_common::LINK_ETHERNET` or `LINK_RAW_IP`, see
/// [`crate::netif::link_layer`]).
pub fn load_for_link(capacity: Capacity, mode: u8, link: u8) -> Result<Ebpf, LoadError> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(MAP_PEER_V4, capacity.peer_v4)
        .map_max_entries(MAP_PEER_V6, capacity.peer_v6)
        .map_max_entries(MAP_PORTS, capacity.ports)
        .map_max_entries(MAP_CT, capacity.ct)
        .map_max_entries(MAP_CT_NEW, segbpf_common::ct_new_entries(capacity.ct))
        .map_max_entries(MAP_FRAG, capacity.frag)
        .map_max_entries(MAP_FRAG_NEW, capacity.frag)
        .map_max_entries(MAP_RULE_STATS, capacity.rule_stats)
        .override_global(GLOBAL_RUN_MODE, &mode, true)
        .override_global(GLOBAL_LINK, &link, true)
        .load(EBPF_OBJECT)?;
    load_programs(&mut ebpf)?;
    Ok(ebpf)
}

/// Loads a dry-run instance that shares every pinned map of `att` (policy,
/// config, counters, connection and fragment state) but changes none of
/// them, and records its decision in its private `SEG_TRACE`. It reads
/// packets as the live program does (the link layer recorded at attach).
pub fn load_dry_run(att: &Attachment) -> Result<Ebpf, LoadError> {
    let link =
        crate::state::State::read(&att.state).map_or(segbpf_common::LINK_ETHERNET, |s| s.link());
    let paths: Vec<(&str, std::path::PathBuf)> =
        PINNED_MAPS.iter().map(|m| (*m, att.map(m))).collect();
    let mut loader = EbpfLoader::new();
    loader.override_global(GLOBAL_RUN_MODE, &RUN_DRY, true);
    loader.override_global(GLOBAL_LINK, &link, true);
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(EBPF_OBJECT)?;
    load_programs(&mut ebpf)?;
    Ok(ebpf)
}

fn load_programs(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    xdp(ebpf)?.load()?;
    tc(ebpf)?.load()?;
    Ok(())
}

/// The ingress XDP program of a loaded instance.
pub fn xdp(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    let prog = ebpf
        .program_mut(PROG_XDP_INGRESS)
        .ok_or(LoadError::MissingProgram(PROG_XDP_INGRESS))?;
    Ok(prog.try_into()?)
}

/// The egress TC program of a loaded instance.
pub fn tc(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, LoadError> {
    let prog = ebpf
        .program_mut(PROG_TC_EGRESS)
        .ok_or(LoadError::MissingProgram(PROG_TC_EGRESS))?;
    Ok(prog.try_into()?)
}
