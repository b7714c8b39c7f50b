//! Loading the eBPF object: map sizes, run modes (live, dry run for trace,
//! record for tests), the interface's index, the connection tables shared
//! by the attachments of a namespace, instances that share a live
//! attachment's maps, and program lookup.

use aya::{
    Ebpf, EbpfLoader,
    maps::ProgramArray,
    programs::{Program, SchedClassifier, Xdp},
};
use segbpf_common::{
    CT4_MAX_IFINDEX, Ct4, Ct6, CtLayout, GLOBAL_CT_SEEN, GLOBAL_DENY_SEED, GLOBAL_IFINDEX,
    GLOBAL_LINK, GLOBAL_RUN_MODE, MAP_CT, MAP_CT_SEEN, MAP_CT_SEEN_F, MAP_FRAG, MAP_FRAG_NEW,
    MAP_PEER_V4, MAP_PEER_V6, MAP_PORTS, MAP_RULE_STATS, MAP_TAIL_TC, MAP_TAIL_XDP, PINNED_MAPS,
    PROG_TC_EGRESS, PROG_TC_EGRESS_ERR, PROG_TC_EGRESS_V6, PROG_XDP_INGRESS, PROG_XDP_INGRESS_ERR,
    PROG_XDP_INGRESS_V6, RUN_DRY, TAIL_INDEX_ERR, TAIL_INDEX_V6,
};

use crate::{attachment::pins::Attachment, policy::compile::Capacity};

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
    /// The object lacks a map.
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    /// A map could not be filled (the tail-call tables).
    #[error("filling a map failed: {0}")]
    Map(aya::maps::MapError),
    /// The namespace's shared connection tables were made with another
    /// layout (another segbpf version).
    #[error(
        "{} does not fit this segbpf (map type {found_type}, key {key} bytes, value {value} bytes; expected type {want_type}, key {want_key}, value {want_value}): it was made by another segbpf version; detach every attachment of this network namespace, then attach again",
        path.display()
    )]
    SharedLayout {
        /// The pinned map.
        path: std::path::PathBuf,
        /// Its kernel map type.
        found_type: u32,
        /// Its key size.
        key: u32,
        /// Its value size.
        value: u32,
        /// The map type this segbpf uses.
        want_type: u32,
        /// The key size this segbpf uses.
        want_key: u32,
        /// The value size this segbpf uses.
        want_value: u32,
    },
    /// The interface's index does not fit the IPv4 connection-table key
    /// (`segbpf_common::CtKey4`, 24 bits): its flows could not be kept
    /// apart from another interface's.
    #[error(
        "interface {iface} has index {ifindex}, above {max}: segbpf's IPv4 connection tracking holds 24 bits of the interface index, so it cannot attach there (nothing was changed); re-create the interface with a smaller index (`ip link add ... index N`)",
        max = CT4_MAX_IFINDEX
    )]
    IfindexTooLarge {
        /// The interface's name.
        iface: String,
        /// Its index.
        ifindex: u32,
    },
    /// The namespace's last-seen array could not be brought up to date
    /// with its connection tables (nothing was attached).
    #[error("seeding the last-seen array from the connection tables: {0}")]
    Seed(#[from] crate::attachment::maps::MapsError),
    /// The namespace's shared connection tables could not be read.
    #[error("reading {}: {source}", path.display())]
    Shared {
        /// The pinned map.
        path: std::path::PathBuf,
        /// Why.
        source: aya::maps::MapError,
    },
}

/// Loads a fresh instance for an Ethernet-framed device with its own maps
/// sized by `capacity`, in run mode `mode` (`segbpf_common::RUN_LIVE`,
/// `RUN_DRY` or `RUN_RECORD`).
pub fn load(capacity: Capacity, mode: u8) -> Result<Ebpf, LoadError> {
    load_for_link(capacity, mode, segbpf_common::LINK_ETHERNET)
}

/// Like [`load`], for a device whose link layer is `link`
/// (`segbpf_common::LINK_ETHERNET` or `LINK_RAW_IP`, see
/// [`crate::host::netif::link_layer`]). Its connection tables are its own
/// and empty, so its last-seen array covers them: it may skip lookups
/// (`segbpf_common::ctseen`).
pub fn load_for_link(capacity: Capacity, mode: u8, link: u8) -> Result<Ebpf, LoadError> {
    let seed = deny_seed();
    let mut loader = EbpfLoader::new();
    sized(&mut loader, capacity);
    let ct4 = TableGlobals::<Ct4>::new(Ct4::sets_for(capacity.ct), capacity.ct);
    let ct6 = TableGlobals::<Ct6>::new(Ct6::sets_for(capacity.ct), capacity.ct);
    ct4.apply(&mut loader);
    ct6.apply(&mut loader);
    let mut ebpf = loader
        .override_global(GLOBAL_RUN_MODE, &mode, true)
        .override_global(GLOBAL_CT_SEEN, &1u8, true)
        .override_global(GLOBAL_LINK, &link, true)
        .override_global(GLOBAL_DENY_SEED, &seed, true)
        .load(EBPF_OBJECT)?;
    ct4.record(&ebpf)?;
    ct6.record(&ebpf)?;
    load_programs(&mut ebpf)?;
    Ok(ebpf)
}

/// Refuses an interface whose index does not fit the IPv4
/// connection-table key (more than [`CT4_MAX_IFINDEX`]): the key would
/// not name the interface exactly. `attach` checks it before it changes
/// anything.
pub fn check_ifindex(iface: &str, ifindex: u32) -> Result<(), LoadError> {
    if ifindex > CT4_MAX_IFINDEX {
        return Err(LoadError::IfindexTooLarge {
            iface: iface.to_string(),
            ifindex,
        });
    }
    Ok(())
}

/// Loads the live instance of the attachment `att` of the interface
/// `ifindex`: its own maps sized by `capacity`, and its namespace's shared
/// connection tables, created (and pinned) with `capacity.ct` entries when
/// the namespace has none yet, else reused whatever their size (see
/// [`shared_ct_size`]). The namespace's last-seen array is seeded from the
/// tables ([`crate::attachment::ctseen::seed`]) before this returns, and
/// so before the caller attaches the programs: they may skip lookups. The
/// caller holds [`Attachment::lock_shared`].
pub fn load_attachment(
    att: &Attachment,
    capacity: Capacity,
    link: u8,
    ifindex: u32,
) -> Result<Ebpf, LoadError> {
    check_ifindex(&att.iface, ifindex)?;
    check_shared(att)?;
    let paths: Vec<(&str, std::path::PathBuf)> = segbpf_common::SHARED_MAPS
        .iter()
        .map(|m| (*m, att.map(m)))
        .collect();
    if !att.shared_dir().exists() {
        crate::attachment::dirs::private_dir(&att.shared_dir()).map_err(|e| LoadError::Shared {
            path: att.shared_dir(),
            source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "mkdir",
                io_error: e,
            }),
        })?;
    }
    let seed = deny_seed();
    let mut loader = EbpfLoader::new();
    sized(&mut loader, capacity);
    let ct4 = TableGlobals::<Ct4>::joined(att, capacity, &mut loader)?;
    let ct6 = TableGlobals::<Ct6>::joined(att, capacity, &mut loader)?;
    ct4.apply(&mut loader);
    ct6.apply(&mut loader);
    loader
        .override_global(GLOBAL_RUN_MODE, &segbpf_common::RUN_LIVE, true)
        .override_global(GLOBAL_LINK, &link, true)
        .override_global(GLOBAL_IFINDEX, &ifindex, true)
        .override_global(GLOBAL_DENY_SEED, &seed, true)
        .override_global(GLOBAL_CT_SEEN, &1u8, true);
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let t = std::time::Instant::now();
    let mut ebpf = loader.load(EBPF_OBJECT)?;
    let maps_ms = t.elapsed().as_secs_f64() * 1e3;
    ct4.record(&ebpf)?;
    ct6.record(&ebpf)?;
    // Flows of this interface that earlier builds left in LRU tables:
    // moved before the seeding covers them.
    let adopted = crate::attachment::cttables::adopt(&mut ebpf, ifindex, att)?;
    if adopted > 0 {
        tracing::debug!("{adopted} flows moved into the connection tables");
    }
    let seeded = crate::attachment::ctseen::seed(&mut ebpf)?;
    tracing::debug!(
        "last-seen arrays: {} remote and {} flow buckets written for {} connection-table entries",
        seeded.buckets,
        seeded.flow_buckets,
        seeded.entries
    );
    let each = load_programs(&mut ebpf)?;
    log_verified(
        &ebpf,
        maps_ms,
        t.elapsed().as_secs_f64() * 1e3 - maps_ms,
        each,
    );
    Ok(ebpf)
}

/// Logs (debug) what loading cost: object and maps, then the programs'
/// load with the kernel's verification (all four, in parallel: the wall
/// time, then each program's) and their verified instructions.
fn log_verified(ebpf: &Ebpf, maps_ms: f64, programs_ms: f64, each_ms: [f64; 6]) {
    let each: Vec<String> = PROGRAMS
        .iter()
        .zip(each_ms)
        .map(|(name, ms)| {
            let insns = ebpf
                .program(name)
                .and_then(|p| p.info().ok())
                .and_then(|i| i.verified_instruction_count())
                .map_or_else(|| "?".to_string(), |n| n.to_string());
            format!("{name} {ms:.1} ms, {insns} insns")
        })
        .collect();
    tracing::debug!(
        "load: object and maps {maps_ms:.1} ms; programs (load and verification, in parallel) {programs_ms:.1} ms: {}",
        each.join("; ")
    );
}

/// A random seed for the denied aggregates' bucket hash
/// (`segbpf_common::bucket`): which keys share a bucket, and so whose
/// packets go unattributed, cannot be chosen by a sender. Each live
/// instance has its own denied tables, so one seed per load.
fn deny_seed() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: `b` is a writable buffer of 8 bytes for the call's duration.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        // No entropy (never on Linux >= 3.17): the address of a stack
        // value and the clock; the aggregates stay correct either way,
        // only which keys share a bucket becomes guessable.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t ^ (std::ptr::from_ref(&b) as u64);
    }
    u64::from_ne_bytes(b)
}

fn sized(loader: &mut EbpfLoader<'_>, capacity: Capacity) {
    loader
        .map_max_entries(MAP_PEER_V4, capacity.peer_v4)
        .map_max_entries(MAP_PEER_V6, capacity.peer_v6)
        .map_max_entries(MAP_PORTS, capacity.ports)
        .map_max_entries(MAP_FRAG, capacity.frag)
        .map_max_entries(MAP_FRAG_NEW, capacity.frag)
        .map_max_entries(MAP_RULE_STATS, capacity.rule_stats);
    table_sized::<Ct4>(loader, Ct4::sets_for(capacity.ct));
    table_sized::<Ct6>(loader, Ct6::sets_for(capacity.ct));
}

/// Sizes the arrays of `L`'s table for `sets` sets.
fn table_sized<L: CtLayout>(loader: &mut EbpfLoader<'_>, sets: u32) {
    loader
        .map_max_entries(L::SETS_MAP, segbpf_common::ct_sets_entries(sets))
        .map_max_entries(L::WAYS_MAP, segbpf_common::ct_ways_entries::<L>(sets));
}

/// A connection table's globals of a load: the namespace's secret of the
/// set hash and the mask of the set index (`segbpf_common::cttable`).
struct TableGlobals<L: CtLayout> {
    secret: u64,
    mask: u32,
    /// The `--ct-size` the table is made for, recorded with a new secret.
    ct: u32,
    /// The secret is new: written into the table after the load.
    fresh: bool,
    layout: std::marker::PhantomData<L>,
}

impl<L: CtLayout> TableGlobals<L>
where
    L::Set: aya::Pod,
{
    /// A new table of `sets` sets for a `--ct-size` of `ct`, with a random
    /// secret.
    fn new(sets: u32, ct: u32) -> Self {
        Self {
            secret: deny_seed() | 1,
            mask: sets - 1,
            ct,
            fresh: true,
            layout: std::marker::PhantomData,
        }
    }

    /// The namespace's table pinned for `att`, if it has one; one whose
    /// secret was never written (a load that failed before it wrote it,
    /// so no program used it) gets a new one, recorded with `ct`.
    fn pinned(att: &Attachment, ct: u32) -> Result<Option<Self>, LoadError> {
        let Some((sets, [secret, made_for])) = crate::attachment::cttables::pinned_extra::<L>(att)?
        else {
            return Ok(None);
        };
        Ok(Some(Self {
            secret: if secret == 0 { deny_seed() | 1 } else { secret },
            mask: sets.saturating_sub(1),
            ct: u32::try_from(made_for)
                .ok()
                .filter(|c| *c != 0)
                .unwrap_or(ct),
            fresh: secret == 0,
            layout: std::marker::PhantomData,
        }))
    }

    /// The namespace's table pinned for `att`, or a new one sized like
    /// the namespace's tables (made by an earlier build), else by
    /// `--ct-size`; the loader sized for it.
    fn joined(
        att: &Attachment,
        capacity: Capacity,
        loader: &mut EbpfLoader<'_>,
    ) -> Result<Self, LoadError> {
        Self::remove_half(att)?;
        let ct = shared_ct_size(att).unwrap_or(capacity.ct);
        if let Some(g) = Self::pinned(att, ct)? {
            return Ok(g);
        }
        let sets = L::sets_for(ct);
        table_sized::<L>(loader, sets);
        Ok(Self::new(sets, ct))
    }

    /// Removes the one array of `L`'s table pinned for `att` when the other
    /// is not: a load that failed between making the two (the kernel
    /// refused the second's memory, say) while another attachment kept
    /// the namespace's tables. No program can use half a table (each
    /// needs both), and a table is made again in its place; left, it
    /// would be joined as it is and refused for its layout at every
    /// attach. The caller holds the namespace's lock.
    fn remove_half(att: &Attachment) -> Result<(), LoadError> {
        let (sets, ways) = (att.map(L::SETS_MAP), att.map(L::WAYS_MAP));
        let half = match (sets.exists(), ways.exists()) {
            (true, false) => sets,
            (false, true) => ways,
            _ => return Ok(()),
        };
        tracing::warn!(
            "{}: one array of a connection table, without the other (a load that failed between them): removed, the table is made again",
            half.display()
        );
        std::fs::remove_file(&half).map_err(|e| LoadError::Shared {
            path: half.clone(),
            source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "unlink",
                io_error: e,
            }),
        })
    }

    fn apply<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        loader
            .override_global(L::KEY_GLOBAL, &self.secret, true)
            .override_global(L::MASK_GLOBAL, &self.mask, true);
    }

    /// Writes a new secret (with the `--ct-size` the table is made for)
    /// into the loaded instance's table, before any of its programs runs.
    fn record(&self, ebpf: &Ebpf) -> Result<(), LoadError> {
        if self.fresh {
            crate::attachment::cttables::write_extra::<L>(ebpf, self.secret, self.ct)?;
        }
        Ok(())
    }
}

/// The `--ct-size` the namespace's connection tables were made with, if
/// it has them: as this build's tables record it (the element after the
/// last set), else the `max_entries` of an earlier build's table of
/// assured flows (`SEG_CT`).
pub fn shared_ct_size(att: &Attachment) -> Option<u32> {
    let recorded = |extra: Option<(u32, [u64; 2])>| {
        extra
            .and_then(|(_, [_, ct])| u32::try_from(ct).ok())
            .filter(|ct| *ct != 0)
    };
    recorded(
        crate::attachment::cttables::pinned_extra::<Ct4>(att)
            .ok()
            .flatten(),
    )
    .or_else(|| {
        recorded(
            crate::attachment::cttables::pinned_extra::<Ct6>(att)
                .ok()
                .flatten(),
        )
    })
    .or_else(|| {
        aya::maps::MapInfo::from_pin(att.map(MAP_CT))
            .ok()
            .map(|i| i.max_entries())
    })
}

/// Refuses shared maps whose type, key or value differ from this
/// build's: a program would read them with the wrong layout.
fn check_shared(att: &Attachment) -> Result<(), LoadError> {
    use aya::maps::MapInfo;
    const LRU_HASH: u32 = 9; // BPF_MAP_TYPE_LRU_HASH
    const ARRAY: u32 = 2; // BPF_MAP_TYPE_ARRAY
    let entry = size_of::<segbpf_common::CtEntry>() as u32;
    let table = (LRU_HASH, size_of::<segbpf_common::CtKey>() as u32, entry);
    // The earlier builds' tables of `CtKey`s too: read at attach.
    for name in segbpf_common::SHARED_MAPS
        .into_iter()
        .chain([MAP_CT, segbpf_common::MAP_CT_NEW])
    {
        let (want_type, want_key, want_value) = if name == MAP_CT_SEEN {
            (ARRAY, 4, size_of::<segbpf_common::CtRemote>() as u32)
        } else if name == MAP_CT_SEEN_F {
            (ARRAY, 4, 4)
        } else if name == Ct4::SETS_MAP {
            (ARRAY, 4, size_of::<segbpf_common::Ct4Set>() as u32)
        } else if name == Ct6::SETS_MAP {
            (ARRAY, 4, size_of::<segbpf_common::Ct6Set>() as u32)
        } else if name == Ct4::WAYS_MAP || name == Ct6::WAYS_MAP {
            (ARRAY, 4, entry)
        } else {
            table
        };
        let path = att.map(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|source| LoadError::Shared {
            path: path.clone(),
            source,
        })?;
        let found_type = info.map_type().map_or(u32::MAX, |t| t as u32);
        let array = name == MAP_CT_SEEN || name == MAP_CT_SEEN_F;
        let buckets_ok = !array || info.max_entries() == segbpf_common::CT_SEEN_BUCKETS;
        // The remote array and the tables must be mappable: seeding and
        // userspace's writes change them in place.
        let ct_table = [Ct4::SETS_MAP, Ct4::WAYS_MAP, Ct6::SETS_MAP, Ct6::WAYS_MAP].contains(&name);
        let flags_ok = (name != MAP_CT_SEEN
            || info.map_flags() & segbpf_common::CT_SEEN_MAP_FLAGS
                == segbpf_common::CT_SEEN_MAP_FLAGS)
            && (!ct_table
                || info.map_flags() & segbpf_common::CT_TABLE_FLAGS
                    == segbpf_common::CT_TABLE_FLAGS);
        if found_type != want_type
            || info.key_size() != want_key
            || info.value_size() != want_value
            || !buckets_ok
            || !flags_ok
        {
            return Err(LoadError::SharedLayout {
                path,
                found_type,
                key: info.key_size(),
                value: info.value_size(),
                want_type,
                want_key,
                want_value,
            });
        }
    }
    Ok(())
}

/// The pinned maps a dry-run instance shares with the attachment: every
/// one but the last-seen arrays. It looks every flow up instead (its
/// `SEGBPF_CT_SEEN` stays 0), since the live attachment it shares may be
/// of a build that makes entries without writing them.
pub fn dry_run_maps() -> impl Iterator<Item = &'static str> {
    PINNED_MAPS
        .into_iter()
        .filter(|m| *m != MAP_CT_SEEN && *m != MAP_CT_SEEN_F)
}

/// Loads a dry-run instance that shares every pinned map of `att` (policy,
/// config, counters, connection and fragment state) but changes none of
/// them, and records its decision in its private `SEG_TRACE`. It reads
/// packets as the live program does (the link layer recorded at attach).
pub fn load_dry_run(att: &Attachment) -> Result<Ebpf, LoadError> {
    let state = crate::attachment::state::State::read(&att.state).ok();
    let link = state.as_ref().map_or(
        segbpf_common::LINK_ETHERNET,
        crate::attachment::state::State::link,
    );
    // Looks flows up as the live instance does: under its interface.
    let ifindex = state.as_ref().map_or(0, |s| s.ifindex);
    check_shared(att)?;
    let paths: Vec<(&str, std::path::PathBuf)> = dry_run_maps().map(|m| (m, att.map(m))).collect();
    let ct4 = TableGlobals::<Ct4>::pinned(att, 0)?;
    let ct6 = TableGlobals::<Ct6>::pinned(att, 0)?;
    let mut loader = EbpfLoader::new();
    if let Some(ct4) = &ct4 {
        ct4.apply(&mut loader);
    }
    if let Some(ct6) = &ct6 {
        ct6.apply(&mut loader);
    }
    loader.override_global(GLOBAL_RUN_MODE, &RUN_DRY, true);
    loader.override_global(GLOBAL_LINK, &link, true);
    loader.override_global(GLOBAL_IFINDEX, &ifindex, true);
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let t = std::time::Instant::now();
    let mut ebpf = loader.load(EBPF_OBJECT)?;
    let maps_ms = t.elapsed().as_secs_f64() * 1e3;
    let each = load_programs(&mut ebpf)?;
    log_verified(
        &ebpf,
        maps_ms,
        t.elapsed().as_secs_f64() * 1e3 - maps_ms,
        each,
    );
    Ok(ebpf)
}

/// The programs of the object, in the order their load times are logged.
const PROGRAMS: [&str; 6] = [
    PROG_XDP_INGRESS,
    PROG_XDP_INGRESS_V6,
    PROG_XDP_INGRESS_ERR,
    PROG_TC_EGRESS,
    PROG_TC_EGRESS_V6,
    PROG_TC_EGRESS_ERR,
];

/// Loads the programs of an instance, each in its own thread (the kernel
/// verifies each program on the calling thread, and the four do not depend
/// on each other), then fills its tail-call tables. Nothing is attached
/// yet, so no packet runs an IPv4 program while its table is empty (an
/// empty table drops, see the kernel crate's `main.rs`). Returns the wall
/// time of each program's load and verification, in [`PROGRAMS`] order.
pub fn load_programs(ebpf: &mut Ebpf) -> Result<[f64; 6], LoadError> {
    let mut progs: Vec<(usize, &mut Program)> = ebpf
        .programs_mut()
        .filter_map(|(name, p)| PROGRAMS.iter().position(|n| *n == name).map(|i| (i, p)))
        .collect();
    if let Some(missing) = PROGRAMS
        .iter()
        .enumerate()
        .find(|(i, _)| !progs.iter().any(|(j, _)| j == i))
    {
        return Err(LoadError::MissingProgram(missing.1));
    }
    let loaded: Vec<(usize, Result<f64, LoadError>)> = std::thread::scope(|s| {
        let threads: Vec<_> = progs
            .iter_mut()
            .map(|(i, p)| {
                let i = *i;
                s.spawn(move || {
                    let t = std::time::Instant::now();
                    let r = match p {
                        Program::Xdp(p) => p.load(),
                        Program::SchedClassifier(p) => p.load(),
                        _ => return (i, Err(LoadError::MissingProgram(PROGRAMS[i]))),
                    };
                    (
                        i,
                        r.map(|()| t.elapsed().as_secs_f64() * 1e3)
                            .map_err(LoadError::from),
                    )
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut ms = [0.0; 6];
    for (i, r) in loaded {
        ms[i] = r?;
    }
    for (prog, table, index) in [
        (PROG_XDP_INGRESS_V6, MAP_TAIL_XDP, TAIL_INDEX_V6),
        (PROG_XDP_INGRESS_ERR, MAP_TAIL_XDP, TAIL_INDEX_ERR),
        (PROG_TC_EGRESS_V6, MAP_TAIL_TC, TAIL_INDEX_V6),
        (PROG_TC_EGRESS_ERR, MAP_TAIL_TC, TAIL_INDEX_ERR),
    ] {
        let fd = ebpf
            .program(prog)
            .ok_or(LoadError::MissingProgram(prog))?
            .fd()?
            .try_clone()
            .map_err(|e| LoadError::Program(aya::programs::ProgramError::IOError(e)))?;
        let map = ebpf.map_mut(table).ok_or(LoadError::MissingMap(table))?;
        let mut tail = ProgramArray::try_from(map).map_err(LoadError::Map)?;
        tail.set(index, &fd, 0).map_err(LoadError::Map)?;
    }
    Ok(ms)
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
