//! Lower bounds (`SEGBPF_BENCH_ONLY=lookups`): what one map lookup of each
//! kind the datapath uses costs on this machine, in isolation. Each case
//! is a tiny XDP program assembled here from raw instructions and loaded
//! with BPF_PROG_LOAD: it writes one constant key on its stack and looks it
//! up `LOOKUPS` times in a row, then passes. The same program without the
//! lookups is the baseline; (program − baseline) / `LOOKUPS` is one
//! lookup, measured with BPF_PROG_TEST_RUN in interleaved rounds (medians).
//! The key is the same on every lookup, so this is the cache-warm cost,
//! as in the per-packet cases (which repeat one packet).
//!
//! Maps mirror the datapath's key layouts: the peer trie (`{prefixlen,
//! slot, dir, IPv4}`, /32s and one /24, 1,000 and 10,000 prefixes), the
//! port trie (`{prefixlen, slot, class, proto, port}`), the connection
//! table (LRU hash, 48-byte key, 80-byte value) against a 16-byte key,
//! and an array.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use segbpf::policy::compile::LpmEntry;
use segbpf_common::{DIR_INGRESS, IPPROTO_TCP, PEER_KEY_HEADER_BITS, PeerClass, PeerKeyV4};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_PROG_TYPE_XDP: u32 = 6;

/// Lookups per program run.
const LOOKUPS: usize = 8;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 18]) -> std::io::Result<i64> {
    // SAFETY: bpf(2) with a zero-initialised attribute block of its size
    // (144 bytes, more than every command here reads); pointers in it
    // refer to buffers the caller keeps alive across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

fn fd(rc: i64) -> OwnedFd {
    // SAFETY: `rc` is a new descriptor bpf(2) just returned to us.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

fn map_create(ty: u32, key: u32, value: u32, max: u32, flags: u32) -> anyhow::Result<OwnedFd> {
    let mut a = [0u64; 18];
    a[0] = u64::from(ty) | (u64::from(key) << 32);
    a[1] = u64::from(value) | (u64::from(max) << 32);
    a[2] = u64::from(flags);
    Ok(fd(bpf(BPF_MAP_CREATE, &mut a)?))
}

fn map_update(map: &OwnedFd, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
    let mut a = [0u64; 18];
    a[0] = map.as_raw_fd() as u64;
    a[1] = key.as_ptr() as u64;
    a[2] = value.as_ptr() as u64;
    bpf(BPF_MAP_UPDATE_ELEM, &mut a)?;
    Ok(())
}

/// One BPF instruction.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | (u64::from(dst & 0xf) << 8)
        | (u64::from(src & 0xf) << 12)
        | (u64::from(off as u16) << 16)
        | (u64::from(imm as u32) << 32)
}

/// The program: `key` on the stack, `lookups` lookups of it in `map`, pass.
fn program(map: &OwnedFd, key: &[u8], lookups: usize) -> anyhow::Result<OwnedFd> {
    let padded = key.len().div_ceil(8) * 8;
    let base = -(padded as i32);
    let mut p = Vec::new();
    for (i, w) in key.chunks(4).enumerate() {
        let mut b = [0u8; 4];
        b[..w.len()].copy_from_slice(w);
        // *(u32 *)(r10 + base + 4i) = imm
        p.push(insn(
            0x62,
            10,
            0,
            (base + 4 * i as i32) as i16,
            i32::from_le_bytes(b),
        ));
    }
    for _ in 0..lookups {
        // r1 = map (ld_imm64, BPF_PSEUDO_MAP_FD)
        p.push(insn(0x18, 1, 1, 0, map.as_raw_fd()));
        p.push(0);
        p.push(insn(0xbf, 2, 10, 0, 0)); // r2 = r10
        p.push(insn(0x07, 2, 0, 0, base)); // r2 += base
        p.push(insn(0x85, 0, 0, 0, 1)); // call bpf_map_lookup_elem
    }
    p.push(insn(0xb7, 0, 0, 0, 2)); // r0 = XDP_PASS
    p.push(insn(0x95, 0, 0, 0, 0)); // exit
    let license = b"GPL\0";
    let mut a = [0u64; 18];
    a[0] = u64::from(BPF_PROG_TYPE_XDP) | ((p.len() as u64) << 32);
    a[1] = p.as_ptr() as u64;
    a[2] = license.as_ptr() as u64;
    Ok(fd(bpf(BPF_PROG_LOAD, &mut a)?))
}

fn lpm_key(prefixlen: u32, data: &[u8]) -> Vec<u8> {
    let mut k = prefixlen.to_ne_bytes().to_vec();
    k.extend_from_slice(data);
    k
}

fn peer_data(addr: [u8; 4]) -> [u8; 6] {
    [0, DIR_INGRESS, addr[0], addr[1], addr[2], addr[3]]
}

fn port_data(class: u32, port: u16) -> [u8; 8] {
    let c = class.to_be_bytes();
    let p = port.to_be_bytes();
    [0, c[0], c[1], c[2], c[3], IPPROTO_TCP, p[0], p[1]]
}

/// The peer trie of the bench policy: `n` /32s from 10.0.0.0 (every other
/// address) and 198.18.0.0/24.
fn peer_trie(n: u32) -> anyhow::Result<OwnedFd> {
    let m = map_create(BPF_MAP_TYPE_LPM_TRIE, 10, 4, n + 16, BPF_F_NO_PREALLOC)?;
    for i in 0..n {
        let a = (0x0a00_0000u32 + 2 * i).to_be_bytes();
        map_update(&m, &lpm_key(48, &peer_data(a)), &(i % 10).to_ne_bytes())?;
    }
    map_update(
        &m,
        &lpm_key(40, &peer_data([198, 18, 0, 0])),
        &0u32.to_ne_bytes(),
    )?;
    Ok(m)
}

/// A port trie of `classes` classes, each allowing tcp/(1000 + class).
fn port_trie(classes: u32) -> anyhow::Result<OwnedFd> {
    let m = map_create(
        BPF_MAP_TYPE_LPM_TRIE,
        12,
        4,
        classes + 16,
        BPF_F_NO_PREALLOC,
    )?;
    for c in 0..classes {
        map_update(
            &m,
            &lpm_key(64, &port_data(c, 1000 + c as u16)),
            &c.to_ne_bytes(),
        )?;
    }
    Ok(m)
}

/// An LRU hash of `key` bytes and 80-byte values holding 1,000 keys.
fn lru_hash(key: usize) -> anyhow::Result<OwnedFd> {
    let m = map_create(BPF_MAP_TYPE_LRU_HASH, key as u32, 80, 65_536, 0)?;
    for i in 0..1_000u32 {
        let mut k = vec![0u8; key];
        k[..4].copy_from_slice(&i.to_ne_bytes());
        k[key - 1] = 4;
        map_update(&m, &k, &[0u8; 80])?;
    }
    Ok(m)
}

/// One compiled policy's tries, written as the bench writes them.
struct PolicyTries {
    /// The peer trie as the compiler writes it (`policy::peerdefault`).
    peers: OwnedFd,
    /// The same function as the full disjoint tiling (the encoding before).
    tiled: OwnedFd,
    ports: OwnedFd,
    /// Class of 198.18.0.7.
    known: u32,
    /// Class of 203.0.113.9.
    unknown: u32,
}

fn peer_map(entries: &[LpmEntry<PeerKeyV4, PeerClass>]) -> anyhow::Result<OwnedFd> {
    let m = map_create(
        BPF_MAP_TYPE_LPM_TRIE,
        10,
        4,
        entries.len() as u32 + 16,
        BPF_F_NO_PREALLOC,
    )?;
    for (len, k, v) in entries {
        map_update(
            &m,
            &lpm_key(*len, bytemuck::bytes_of(k)),
            &v.class_id.to_ne_bytes(),
        )?;
    }
    Ok(m)
}

/// The bench policy's own tries (`compile(rules, prefixes)`, slot 0).
fn policy_tries(rules: usize, prefixes: usize) -> anyhow::Result<PolicyTries> {
    let (_, c) = crate::compile(rules, prefixes)?;
    let mut t = c.clone();
    crate::retile(&mut t);
    let class_of = |a: [u8; 4]| {
        t.peers_v4
            .iter()
            .find(|(len, k, _)| {
                let bits = len - PEER_KEY_HEADER_BITS;
                let m = if bits == 0 {
                    0
                } else {
                    u32::MAX << (32 - bits)
                };
                k.dir == DIR_INGRESS
                    && u32::from_be_bytes(k.addr_be) & m == u32::from_be_bytes(a) & m
            })
            .map_or(u32::MAX, |e| e.2.class_id)
    };
    let ports = map_create(
        BPF_MAP_TYPE_LPM_TRIE,
        12,
        4,
        c.ports.len() as u32 + 16,
        BPF_F_NO_PREALLOC,
    )?;
    for (len, k, v) in &c.ports {
        map_update(
            &ports,
            &lpm_key(*len, bytemuck::bytes_of(k)),
            &v.rule_id.to_ne_bytes(),
        )?;
    }
    eprintln!(
        "policy {rules} rules / {prefixes} prefixes: {} v4 peer entries ({} tiled), {} port entries, {} classes",
        c.peers_v4.len(),
        t.peers_v4.len(),
        c.ports.len(),
        c.classes
    );
    Ok(PolicyTries {
        peers: peer_map(&c.peers_v4)?,
        tiled: peer_map(&t.peers_v4)?,
        ports,
        known: class_of([198, 18, 0, 7]),
        unknown: class_of([203, 0, 113, 9]),
    })
}

/// Runs the cases; returns (name, ns per lookup, median over rounds) rows.
pub(crate) fn lower_bounds(rounds: usize, repeat: u32) -> anyhow::Result<Vec<(String, f64)>> {
    let frame = vec![0u8; 64];
    let peer1k = peer_trie(1_000)?;
    let peer10k = peer_trie(10_000)?;
    let port10 = port_trie(10)?;
    let port10k = port_trie(10_000)?;
    let ct48 = lru_hash(48)?;
    let ct16 = lru_hash(16)?;
    let array = map_create(BPF_MAP_TYPE_ARRAY, 4, 8, 4_096, 0)?;
    let hit_peer = lpm_key(48, &peer_data([198, 18, 0, 7]));
    let miss_peer = lpm_key(48, &peer_data([203, 0, 113, 9]));
    let hit_port = lpm_key(64, &port_data(0, 1000));
    let miss_port = lpm_key(64, &port_data(0, 22));
    let mut miss48 = vec![0u8; 48];
    miss48[..4].copy_from_slice(&5_000u32.to_ne_bytes());
    let mut hit48 = vec![0u8; 48];
    hit48[..4].copy_from_slice(&7u32.to_ne_bytes());
    hit48[47] = 4;
    let mut miss16 = vec![0u8; 16];
    miss16[..4].copy_from_slice(&5_000u32.to_ne_bytes());
    let mut hit16 = vec![0u8; 16];
    hit16[..4].copy_from_slice(&7u32.to_ne_bytes());
    hit16[15] = 4;
    let idx = 17u32.to_ne_bytes().to_vec();
    let p1k = policy_tries(10, 1_000)?;
    let p10k = policy_tries(10_000, 10_000)?;
    let peer_key = |a: [u8; 4]| lpm_key(48, &peer_data(a));
    let cases: Vec<(&str, &OwnedFd, Vec<u8>)> = vec![
        (
            "peer trie (LPM, 10-byte key), 1k prefixes, miss",
            &peer1k,
            miss_peer.clone(),
        ),
        (
            "peer trie (LPM, 10-byte key), 1k prefixes, hit /24",
            &peer1k,
            hit_peer.clone(),
        ),
        (
            "peer trie (LPM, 10-byte key), 10k prefixes, miss",
            &peer10k,
            miss_peer,
        ),
        (
            "peer trie (LPM, 10-byte key), 10k prefixes, hit /24",
            &peer10k,
            hit_peer,
        ),
        (
            "port trie (LPM, 12-byte key), 10 classes, miss",
            &port10,
            miss_port.clone(),
        ),
        (
            "port trie (LPM, 12-byte key), 10 classes, hit",
            &port10,
            hit_port.clone(),
        ),
        (
            "port trie (LPM, 12-byte key), 10k classes, miss",
            &port10k,
            miss_port,
        ),
        (
            "port trie (LPM, 12-byte key), 10k classes, hit",
            &port10k,
            hit_port,
        ),
        ("LRU hash, 48-byte key (CtKey), miss", &ct48, miss48),
        ("LRU hash, 48-byte key (CtKey), hit", &ct48, hit48),
        ("LRU hash, 16-byte key, miss", &ct16, miss16),
        ("LRU hash, 16-byte key, hit", &ct16, hit16),
        ("array (inlined by the verifier)", &array, idx),
        (
            "bench policy 10/1k, tiled: peer, 198.18.0.7 (known)",
            &p1k.tiled,
            peer_key([198, 18, 0, 7]),
        ),
        (
            "bench policy 10/1k, tiled: peer, 203.0.113.9 (unknown)",
            &p1k.tiled,
            peer_key([203, 0, 113, 9]),
        ),
        (
            "bench policy 10/1k, tiled: peer, 10.0.0.2 (a /32)",
            &p1k.tiled,
            peer_key([10, 0, 0, 2]),
        ),
        (
            "bench policy 10/1k, default entry: peer, 198.18.0.7",
            &p1k.peers,
            peer_key([198, 18, 0, 7]),
        ),
        (
            "bench policy 10/1k, default entry: peer, 203.0.113.9",
            &p1k.peers,
            peer_key([203, 0, 113, 9]),
        ),
        (
            "bench policy 10/1k, default entry: peer, 10.0.0.2",
            &p1k.peers,
            peer_key([10, 0, 0, 2]),
        ),
        (
            "bench policy 10/1k: port, known class, tcp/22 (miss)",
            &p1k.ports,
            lpm_key(64, &port_data(p1k.known, 22)),
        ),
        (
            "bench policy 10/1k: port, known class, tcp/1000 (hit)",
            &p1k.ports,
            lpm_key(64, &port_data(p1k.known, 1000)),
        ),
        (
            "bench policy 10/1k: port, unknown's class, tcp/22",
            &p1k.ports,
            lpm_key(64, &port_data(p1k.unknown, 22)),
        ),
        (
            "bench policy 10k/10k, tiled: peer, 198.18.0.7",
            &p10k.tiled,
            peer_key([198, 18, 0, 7]),
        ),
        (
            "bench policy 10k/10k, default entry: peer, 198.18.0.7",
            &p10k.peers,
            peer_key([198, 18, 0, 7]),
        ),
        (
            "bench policy 10k/10k: port, known class, tcp/22 (miss)",
            &p10k.ports,
            lpm_key(64, &port_data(p10k.known, 22)),
        ),
    ];
    let mut progs = Vec::new();
    for (name, map, key) in &cases {
        progs.push((
            *name,
            program(map, key, 0)?,
            program(map, key, LOOKUPS)?,
            Vec::new(),
        ));
    }
    for _ in 0..rounds {
        for (_, base, prog, samples) in &mut progs {
            let b = crate::traffic::test_run_ns(base.as_raw_fd(), &frame, repeat)?;
            let t = crate::traffic::test_run_ns(prog.as_raw_fd(), &frame, repeat)?;
            samples.push((t - b) / LOOKUPS as f64);
        }
    }
    Ok(progs
        .into_iter()
        .map(|(name, _, _, mut s)| (name.to_string(), crate::median(&mut s)))
        .collect())
}
