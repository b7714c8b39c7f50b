//! `segbpf trace --services`: one packet judged as a chosen service by the
//! services programs' dry-run twins (`segbpf_svc_dry_in/eg`), in an
//! instance of their own whose maps are unpinned copies of the live
//! attachment's policy maps. The run writes no flow entry, counter, event
//! or stamp, and it cannot reach the live attachment's maps at all: it
//! never opens them for writing and its programs hold other maps.

use aya::{
    EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData},
    programs::{CgroupSkb, TestRun as _, TestRunOptions},
};
use segbpf_common::{
    MAP_SVC_ACT, MAP_SVC_CFG, MAP_SVC_DRY, MAP_SVC_PEER, MAP_SVC_PORTS, MAP_SVC_TRC, MAP_SVC_V4,
    MAP_SVC_V6, PROG_SVC_DRY_EGRESS, PROG_SVC_DRY_INGRESS, PeerKeyV4, PeerKeyV6, PortKey,
    SVC_WHY_DEFAULT, SVC_WHY_ICMP, SVC_WHY_NEED_PEER, SVC_WHY_RULE, SVC_WHY_UNPARSED, SvcClass,
    SvcConfig, SvcDry, SvcPeerKey, SvcRule, SvcTrace,
};

use crate::attachment::services::{ServicesError, SvcPaths, SvcState};

/// What the dry run decided.
#[derive(Debug)]
pub struct SvcTraced {
    /// The state in force when the maps were copied (names, rules).
    pub state: SvcState,
    /// The policy allows the packet.
    pub allowed: bool,
    /// `rule`, `icmp`, `default`, `to-services` or `unparsed`.
    pub reason: &'static str,
    /// Audit mode: a drop would pass.
    pub audit: bool,
    /// The rule that allowed it.
    pub rule: Option<u32>,
}

/// Whom and how the packet is judged.
#[derive(Debug)]
pub struct SvcTraceAs<'a> {
    /// The service whose socket sends (egress) or receives (ingress) it.
    pub service: &'a str,
    /// Over loopback, ingress: the sending socket's service (None: a
    /// socket in no service).
    pub peer_service: Option<&'a str>,
    /// The packet goes over loopback (local traffic).
    pub loopback: bool,
    /// Ingress (`true`) or egress.
    pub ingress: bool,
}

fn kernel<E: std::error::Error + Send + Sync + 'static>(
    what: impl Into<String>,
) -> impl FnOnce(E) -> ServicesError {
    let what = what.into();
    move |e| ServicesError::Kernel {
        what,
        source: Box::new(e),
    }
}

fn pinned(paths: &SvcPaths, name: &str) -> Result<MapData, ServicesError> {
    MapData::from_pin(paths.dir.join(name)).map_err(kernel(format!("opening pinned map {name}")))
}

/// Runs `frame` (an Ethernet frame) through a dry-run instance of the
/// services attachment at `paths`, judged as `who` says.
pub fn trace(
    paths: &SvcPaths,
    who: &SvcTraceAs<'_>,
    frame: &[u8],
) -> Result<SvcTraced, ServicesError> {
    if !paths.is_attached() {
        return Err(paths.not_attached());
    }
    // No change interleaves with the copy: the slot in force, its maps
    // and the state that names them agree.
    let guard = crate::attachment::services::lock(paths)?;
    let state = paths.read_state().ok_or_else(|| {
        ServicesError::Refused(format!("no readable state in {}", paths.state.display()))
    })?;
    let id_of = |name: &str| {
        state
            .services
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.id)
            .ok_or_else(|| {
                ServicesError::Refused(format!(
                    "no service {name} in the policy in force (generation {})",
                    state.generation
                ))
            })
    };
    let svc = id_of(who.service)?;
    let peer = who.peer_service.map(id_of).transpose()?.unwrap_or(0);
    let mut loader = EbpfLoader::new();
    // Room for the copies; the rest of the object's maps are unused here.
    for (name, n) in [
        (segbpf_common::MAP_CT4_SETS, 1),
        (segbpf_common::MAP_CT4_WAYS, 1),
        (segbpf_common::MAP_CT6_SETS, 1),
        (segbpf_common::MAP_CT6_WAYS, 1),
        (segbpf_common::MAP_CT_SEEN, 1),
        (segbpf_common::MAP_CT_SEEN_F, 1),
        (segbpf_common::MAP_FRAG, 1),
        (segbpf_common::MAP_FRAG_NEW, 1),
        (segbpf_common::MAP_PEER_V4, 1),
        (segbpf_common::MAP_PEER_V6, 1),
        (segbpf_common::MAP_PORTS, 1),
        (segbpf_common::MAP_RULE_STATS, 1),
        (segbpf_common::MAP_DENIED0, 1),
        (segbpf_common::MAP_DENIED1, 1),
        (MAP_SVC_V4, live_capacity(paths, MAP_SVC_V4)?),
        (MAP_SVC_V6, live_capacity(paths, MAP_SVC_V6)?),
        (MAP_SVC_PORTS, live_capacity(paths, MAP_SVC_PORTS)?),
        (MAP_SVC_PEER, live_capacity(paths, MAP_SVC_PEER)?),
    ] {
        loader.map_max_entries(name, n);
    }
    let mut ebpf = loader
        .load(crate::attachment::loader::EBPF_OBJECT)
        .map_err(kernel("loading the eBPF object"))?;
    copy_policy(paths, &mut ebpf)?;
    drop(guard);
    {
        let mut dry: Array<_, SvcDry> =
            Array::try_from(ebpf.map_mut(MAP_SVC_DRY).ok_or_else(missing(MAP_SVC_DRY))?)
                .map_err(kernel(MAP_SVC_DRY))?;
        dry.set(
            0,
            SvcDry {
                svc,
                peer,
                loopback: u8::from(who.loopback),
                _pad: [0; 5],
            },
            0,
        )
        .map_err(kernel(MAP_SVC_DRY))?;
    }
    let name = if who.ingress {
        PROG_SVC_DRY_INGRESS
    } else {
        PROG_SVC_DRY_EGRESS
    };
    let prog: &mut CgroupSkb = ebpf
        .program_mut(name)
        .ok_or_else(missing(name))?
        .try_into()
        .map_err(kernel(name))?;
    prog.load()
        .map_err(kernel(format!("loading {name} (verifier)")))?;
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    prog.test_run(opts).map_err(kernel("BPF_PROG_TEST_RUN"))?;
    let trc: Array<_, SvcTrace> =
        Array::try_from(ebpf.map(MAP_SVC_TRC).ok_or_else(missing(MAP_SVC_TRC))?)
            .map_err(kernel(MAP_SVC_TRC))?;
    let t = trc.get(&0, 0).map_err(kernel(MAP_SVC_TRC))?;
    wrote_nothing(&ebpf)?;
    if t.valid == 0 {
        return Err(ServicesError::Refused(
            "the dry-run program recorded no decision".into(),
        ));
    }
    Ok(SvcTraced {
        state,
        allowed: t.allowed != 0,
        reason: match t.reason {
            SVC_WHY_RULE => "rule",
            SVC_WHY_ICMP => "icmp",
            SVC_WHY_DEFAULT => "default",
            SVC_WHY_NEED_PEER => "to-services",
            SVC_WHY_UNPARSED => "unparsed",
            _ => "?",
        },
        audit: t.audit != 0,
        rule: (t.rule != u32::MAX).then_some(t.rule),
    })
}

/// Checks that the run left the instance's own flow table and counters
/// empty, as a dry run must (what it would have written to the live maps).
fn wrote_nothing(ebpf: &aya::Ebpf) -> Result<(), ServicesError> {
    use segbpf_common::{Counter, MAP_SVC_CT, MAP_SVC_STATS, SvcFlow, SvcFlowKey};
    let ct: aya::maps::HashMap<_, SvcFlowKey, SvcFlow> =
        aya::maps::HashMap::try_from(ebpf.map(MAP_SVC_CT).ok_or_else(missing(MAP_SVC_CT))?)
            .map_err(kernel(MAP_SVC_CT))?;
    let flows = ct.keys().count();
    let stats: aya::maps::PerCpuArray<_, Counter> = aya::maps::PerCpuArray::try_from(
        ebpf.map(MAP_SVC_STATS).ok_or_else(missing(MAP_SVC_STATS))?,
    )
    .map_err(kernel(MAP_SVC_STATS))?;
    let mut counted = 0u64;
    for i in 0..stats.len() {
        let per_cpu = stats.get(&i, 0).map_err(kernel(MAP_SVC_STATS))?;
        counted += per_cpu.iter().map(|c| c.packets).sum::<u64>();
    }
    if flows != 0 || counted != 0 {
        return Err(ServicesError::Refused(format!(
            "the dry run wrote state ({flows} flow entries, {counted} packets counted): not trusted"
        )));
    }
    Ok(())
}

/// The capacity of the live map `name`.
fn live_capacity(paths: &SvcPaths, name: &str) -> Result<u32, ServicesError> {
    let info = pinned(paths, name)?
        .info()
        .map_err(kernel(format!("reading map {name}")))?;
    Ok(info.max_entries())
}

fn missing(name: &str) -> impl FnOnce() -> ServicesError + '_ {
    move || ServicesError::Kernel {
        what: format!("map or program {name}"),
        source: "missing from the eBPF object".into(),
    }
}

/// Copies the live policy maps (both slots and the slot in force) into
/// the instance's own maps; the live maps are only read.
fn copy_policy(paths: &SvcPaths, ebpf: &mut aya::Ebpf) -> Result<(), ServicesError> {
    fn own<'a>(ebpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut Map, ServicesError> {
        ebpf.map_mut(name).ok_or_else(missing(name))
    }
    {
        let live: Array<_, SvcConfig> = Array::try_from(Map::Array(pinned(paths, MAP_SVC_CFG)?))
            .map_err(kernel(MAP_SVC_CFG))?;
        let mut mine: Array<_, SvcConfig> =
            Array::try_from(own(ebpf, MAP_SVC_CFG)?).map_err(kernel(MAP_SVC_CFG))?;
        for i in 0..live.len() {
            let v = live.get(&i, 0).map_err(kernel(MAP_SVC_CFG))?;
            mine.set(i, v, 0).map_err(kernel(MAP_SVC_CFG))?;
        }
    }
    {
        let live: Array<_, u32> = Array::try_from(Map::Array(pinned(paths, MAP_SVC_ACT)?))
            .map_err(kernel(MAP_SVC_ACT))?;
        let mut mine: Array<_, u32> =
            Array::try_from(own(ebpf, MAP_SVC_ACT)?).map_err(kernel(MAP_SVC_ACT))?;
        let v = live.get(&0, 0).map_err(kernel(MAP_SVC_ACT))?;
        mine.set(0, v, 0).map_err(kernel(MAP_SVC_ACT))?;
    }
    copy_trie::<PeerKeyV4, SvcClass>(paths, ebpf, MAP_SVC_V4)?;
    copy_trie::<PeerKeyV6, SvcClass>(paths, ebpf, MAP_SVC_V6)?;
    copy_trie::<PortKey, SvcRule>(paths, ebpf, MAP_SVC_PORTS)?;
    {
        let live: HashMap<_, SvcPeerKey, SvcClass> =
            HashMap::try_from(Map::HashMap(pinned(paths, MAP_SVC_PEER)?))
                .map_err(kernel(MAP_SVC_PEER))?;
        let mut mine: HashMap<_, SvcPeerKey, SvcClass> =
            HashMap::try_from(own(ebpf, MAP_SVC_PEER)?).map_err(kernel(MAP_SVC_PEER))?;
        for kv in &live {
            let (k, v) = kv.map_err(kernel(MAP_SVC_PEER))?;
            mine.insert(k, v, 0).map_err(kernel(MAP_SVC_PEER))?;
        }
    }
    Ok(())
}

fn copy_trie<K: aya::Pod, V: aya::Pod>(
    paths: &SvcPaths,
    ebpf: &mut aya::Ebpf,
    name: &str,
) -> Result<(), ServicesError> {
    let live: LpmTrie<_, K, V> =
        LpmTrie::try_from(Map::LpmTrie(pinned(paths, name)?)).map_err(kernel(name))?;
    let mut mine: LpmTrie<_, K, V> =
        LpmTrie::try_from(ebpf.map_mut(name).ok_or_else(missing(name))?).map_err(kernel(name))?;
    for kv in &live {
        let (k, v) = kv.map_err(kernel(name))?;
        mine.insert(&k, v, 0).map_err(kernel(name))?;
    }
    Ok(())
}
