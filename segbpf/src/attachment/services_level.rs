//! Absolute cgroup levels from the kernel. The services programs walk a
//! socket's cgroup ancestors by absolute level (0: the hierarchy's root),
//! but inside a cgroup namespace (a container, `systemd-nspawn`,
//! `unshare -C`) every path this process sees starts at the namespace's
//! root. The level probe (`segbpf_svc_level`, segbpf-ebpf/src/svc_level.rs)
//! is run once with BPF_PROG_TEST_RUN: the kernel gives its test packet a
//! socket of this process's cgroup, and the probe writes that cgroup's
//! ancestor id at every absolute level. The level where this process's
//! own cgroup id (its directory's inode) appears, minus the depth of its
//! path as the namespace shows it, is the namespace root's absolute level.
//! Nothing here comes from a name or a file left behind.

use std::{path::Path, sync::OnceLock};

use aya::{
    EbpfLoader,
    maps::Array,
    programs::{CgroupSkb, ProgramError, TestRun as _},
};
use segbpf_common::{MAP_SVC_LEVEL, PROG_SVC_LEVEL, SVC_LEVELS};

use crate::host::cgroups::{
    CgroupError, CgroupRoot, cgroup_id, cgroup2_mount, depth, in_initial_cgroup_ns, own_cgroup,
};

/// Where this process's cgroup namespace's root lies in the hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NsRoot {
    /// The namespace root's absolute level.
    pub level: u32,
    /// The ids of the cgroups at levels `0..=level` (the hierarchy's root
    /// first, the namespace's root last): the ancestors this process
    /// cannot see by path. Empty when it is not known (the initial
    /// namespace: every ancestor is visible there).
    pub ancestors: Vec<u64>,
    /// Whether `ancestors` holds every level up to the namespace's root
    /// (false for a process whose cgroup lies outside the namespace).
    pub complete: bool,
}

fn bad(reason: impl Into<String>) -> CgroupError {
    CgroupError::NsLevel {
        reason: reason.into(),
    }
}

/// Runs the level probe: the ancestor ids of this process's cgroup by
/// absolute level (0 below its own cgroup).
pub fn probe() -> Result<Vec<u64>, CgroupError> {
    let kernel = |what: &'static str| move |e: ProgramError| bad(format!("{what}: {e}"));
    let mut loader = EbpfLoader::new();
    // The interface and services maps are unused here: keep them tiny.
    for name in [
        segbpf_common::MAP_CT4_SETS,
        segbpf_common::MAP_CT4_WAYS,
        segbpf_common::MAP_CT6_SETS,
        segbpf_common::MAP_CT6_WAYS,
        segbpf_common::MAP_CT_SEEN,
        segbpf_common::MAP_CT_SEEN_F,
        segbpf_common::MAP_FRAG,
        segbpf_common::MAP_FRAG_NEW,
        segbpf_common::MAP_PEER_V4,
        segbpf_common::MAP_PEER_V6,
        segbpf_common::MAP_PORTS,
        segbpf_common::MAP_RULE_STATS,
        segbpf_common::MAP_DENIED0,
        segbpf_common::MAP_DENIED1,
    ] {
        loader.map_max_entries(name, 1);
    }
    let mut ebpf = loader
        .load(crate::attachment::loader::EBPF_OBJECT)
        .map_err(|e| bad(format!("loading the eBPF object: {e}")))?;
    let prog: &mut CgroupSkb = ebpf
        .program_mut(PROG_SVC_LEVEL)
        .ok_or_else(|| bad(format!("no {PROG_SVC_LEVEL} in the eBPF object")))?
        .try_into()
        .map_err(kernel(PROG_SVC_LEVEL))?;
    prog.load().map_err(kernel("loading the level probe"))?;
    // An IPv4 header is all the probe needs: it reads no byte of it.
    let mut frame = [0u8; 20];
    frame[0] = 0x45;
    let mut opts = aya::programs::TestRunOptions::new();
    opts.data_in = Some(&frame);
    prog.test_run(opts)
        .map_err(kernel("BPF_PROG_TEST_RUN of the level probe"))?;
    let map: Array<_, u64> = Array::try_from(
        ebpf.map(MAP_SVC_LEVEL)
            .ok_or_else(|| bad(format!("no {MAP_SVC_LEVEL} in the eBPF object")))?,
    )
    .map_err(|e| bad(format!("{MAP_SVC_LEVEL}: {e}")))?;
    (0..SVC_LEVELS)
        .map(|l| {
            map.get(&l, 0)
                .map_err(|e| bad(format!("{MAP_SVC_LEVEL}: {e}")))
        })
        .collect()
}

/// The namespace root's level from the probe's `ids`, this process's
/// cgroup `own` (its path in the namespace and its id) and the cgroup v2
/// mount (the hierarchy path it shows and its id).
pub fn derive(
    ids: &[u64],
    own_path: &str,
    own_id: u64,
    mount_root: &str,
    mount_id: u64,
) -> Result<NsRoot, CgroupError> {
    let at = ids
        .iter()
        .position(|&id| id == own_id)
        .ok_or_else(|| bad(format!("the kernel's ancestors of this process's cgroup do not include its own cgroup (id {own_id}): moved meanwhile, or deeper than {SVC_LEVELS} levels")))?;
    let at = u32::try_from(at).map_err(|_| bad("level out of range"))?;
    let level = at
        .checked_sub(depth(own_path))
        .ok_or_else(|| bad(format!("{own_path} is deeper than the kernel's level {at}")))?;
    // The mount shows the cgroup `mount_root` of the namespace: the kernel
    // must name the same cgroup at its level.
    let mount_level = (level + depth(mount_root)) as usize;
    if ids.get(mount_level) != Some(&mount_id) {
        return Err(bad(format!(
            "the cgroup v2 mount (id {mount_id}) is not the kernel's ancestor at level {mount_level}"
        )));
    }
    Ok(NsRoot {
        level,
        ancestors: ids[..=level as usize].to_vec(),
        complete: true,
    })
}

/// This process's cgroup namespace root (cached: a process's cgroup
/// namespace never changes). In the initial namespace, level 0 without
/// the probe.
pub fn ns_root() -> Result<NsRoot, CgroupError> {
    static CACHE: OnceLock<NsRoot> = OnceLock::new();
    if let Some(r) = CACHE.get() {
        return Ok(r.clone());
    }
    let r = if in_initial_cgroup_ns()? {
        NsRoot {
            level: 0,
            ancestors: Vec::new(),
            complete: true,
        }
    } else {
        find()?
    };
    Ok(CACHE.get_or_init(|| r).clone())
}

/// Asks the kernel (the probe) where this namespace's root lies.
pub fn find() -> Result<NsRoot, CgroupError> {
    let (mount, mount_root) = cgroup2_mount()?;
    let own_path = own_cgroup()?;
    // A process whose cgroup lies outside its cgroup namespace's root (one
    // that entered the namespace, `nsenter -C`) sees `/../..` paths.
    let up = own_path
        .split('/')
        .filter(|c| !c.is_empty())
        .take_while(|c| *c == "..")
        .count();
    if up > 0 {
        let ids = probe()?;
        return derive_outside(&ids, &own_path);
    }
    let rel = Path::new(&own_path)
        .strip_prefix(&mount_root)
        .map_err(|_| {
            bad(format!(
                "this process's cgroup {own_path} is not below the cgroup v2 mount's {mount_root}"
            ))
        })?
        .to_path_buf();
    let own_dir = mount.join(rel);
    let own_id = cgroup_id(&own_dir).map_err(|e| bad(format!("{}: {e}", own_dir.display())))?;
    let mount_id = cgroup_id(&mount).map_err(|e| bad(format!("{}: {e}", mount.display())))?;
    let ids = probe()?;
    derive(&ids, &own_path, own_id, &mount_root, mount_id)
}

/// The namespace root's level for a process whose cgroup lies outside
/// the namespace's root (`own_path` starts with `..`): its own cgroup is
/// the deepest level the kernel named, its path climbs `up` levels to the
/// common ancestor and goes down the rest. The ancestors of the namespace
/// root below that common ancestor are not known: [`NsRoot::complete`]
/// is false (enough for the levels, not for the nesting check).
pub fn derive_outside(ids: &[u64], own_path: &str) -> Result<NsRoot, CgroupError> {
    let parts: Vec<&str> = own_path.split('/').filter(|c| !c.is_empty()).collect();
    let up = parts.iter().take_while(|c| **c == "..").count() as u32;
    let down = parts.len() as u32 - up;
    if parts[up as usize..].contains(&"..") {
        return Err(bad(format!("unexpected cgroup path {own_path}")));
    }
    let own = ids
        .iter()
        .rposition(|&id| id != 0)
        .ok_or_else(|| bad("the kernel named no cgroup of this process"))?;
    let own = u32::try_from(own).map_err(|_| bad("level out of range"))?;
    let common = own.checked_sub(down).ok_or_else(|| {
        bad(format!(
            "{own_path} is deeper than the kernel's level {own}"
        ))
    })?;
    Ok(NsRoot {
        level: common + up,
        ancestors: ids[..=common as usize].to_vec(),
        complete: false,
    })
}

/// `dir` (or the cgroup v2 mount) with its absolute level.
pub fn open_root(dir: Option<&Path>) -> Result<CgroupRoot, CgroupError> {
    CgroupRoot::open_at(dir, ns_root()?.level)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_level_is_where_the_own_id_is_minus_its_depth() {
        // Hierarchy: 1 (root) / 10 (machine.slice) / 20 (payload, the
        // namespace's root) / 30 / 40 (this process).
        let ids = [1, 10, 20, 30, 40, 0, 0];
        let r = derive(&ids, "/a/b", 40, "/", 20).unwrap();
        assert_eq!(r.level, 2);
        assert_eq!(r.ancestors, vec![1, 10, 20]);
        // The mount is not the namespace root the kernel names there.
        assert!(derive(&ids, "/a/b", 40, "/", 10).is_err());
        // A mount of a sub-cgroup of the namespace.
        assert_eq!(derive(&ids, "/a/b", 40, "/a", 30).unwrap().level, 2);
        // Own id absent: moved meanwhile.
        assert!(derive(&ids, "/a/b", 41, "/", 20).is_err());
        // A path deeper than the kernel's level.
        assert!(derive(&ids, "/a/b/c/d/e", 40, "/", 20).is_err());
        // The initial namespace: the root cgroup is the namespace's.
        assert_eq!(derive(&ids, "/x/y/z/w", 40, "/", 1).unwrap().level, 0);
    }

    #[test]
    fn outside_the_namespace_the_level_is_climbed_to() {
        // Hierarchy: 1 / 10 (machine.slice) / 20 (payload, the namespace's
        // root); this process in 1 / 11 (user.slice) / 12 / 13: its path
        // is /../../user.slice/a/b.
        let ids = [1, 11, 12, 13, 0, 0];
        let r = derive_outside(&ids, "/../../user.slice/a/b").unwrap();
        assert_eq!(
            (r.level, r.ancestors.clone(), r.complete),
            (2, vec![1], false)
        );
        assert!(derive_outside(&ids, "/../../a/b/c/d/e").is_err());
        assert!(derive_outside(&[0, 0], "/../a").is_err());
    }
}
