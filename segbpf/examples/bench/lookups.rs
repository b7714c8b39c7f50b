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
//! and an array. Then one insert of a new (random) key into a full LRU
//! hash of 256, 16,384 and 262,144 entries (`insert_program`): what a
//! tracked new flow's entry costs, apart from everything else. Last, one
//! read of a random 64-byte line of an array of 4 KiB (cached), 1, 4, 8,
//! 16 and 256 MiB, each read waiting for the one before (`line_program`): what
//! one cache miss into a connection table costs on this machine.

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

/// Loads the XDP program `p` with `return XDP_PASS` appended.
fn load_xdp(mut p: Vec<u64>) -> anyhow::Result<OwnedFd> {
    p.push(insn(0xb7, 0, 0, 0, 2)); // r0 = XDP_PASS
    p.push(insn(0x95, 0, 0, 0, 0)); // exit
    let license = b"GPL\0";
    let mut a = [0u64; 18];
    a[0] = u64::from(BPF_PROG_TYPE_XDP) | ((p.len() as u64) << 32);
    a[1] = p.as_ptr() as u64;
    a[2] = license.as_ptr() as u64;
    Ok(fd(bpf(BPF_PROG_LOAD, &mut a)?))
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
    load_xdp(p)
}

/// Inserts per program run (`insert_program`).
const INSERTS: usize = 4;

/// The insert program: an 80-byte zero value and a 16-byte key on the
/// stack; `inserts` times, a new random key (`bpf_get_prandom_u32` in its
/// first 8 bytes) and, when `update`, `bpf_map_update_elem(map, key,
/// value, BPF_ANY)`; pass. Without `update` it is the baseline (the same
/// random numbers and stores).
fn insert_program(map: &OwnedFd, inserts: usize, update: bool) -> anyhow::Result<OwnedFd> {
    let mut p = Vec::new();
    // *(u64 *)(r10 - 8k) = 0 for the key (16) and value (80) bytes.
    for k in 1..=12 {
        p.push(insn(0x7a, 10, 0, -8 * k, 0));
    }
    for _ in 0..inserts {
        for off in [-16i16, -12] {
            p.push(insn(0x85, 0, 0, 0, 7)); // call bpf_get_prandom_u32
            p.push(insn(0x63, 10, 0, off, 0)); // *(u32 *)(r10 + off) = r0
        }
        if update {
            p.push(insn(0x18, 1, 1, 0, map.as_raw_fd())); // r1 = map
            p.push(0);
            p.push(insn(0xbf, 2, 10, 0, 0)); // r2 = r10
            p.push(insn(0x07, 2, 0, 0, -16)); // r2 -= 16: the key
            p.push(insn(0xbf, 3, 10, 0, 0)); // r3 = r10
            p.push(insn(0x07, 3, 0, 0, -96)); // r3 -= 96: the value
            p.push(insn(0xb7, 4, 0, 0, 0)); // r4 = BPF_ANY
            p.push(insn(0x85, 0, 0, 0, 2)); // call bpf_map_update_elem
        }
    }
    load_xdp(p)
}

/// Reads per program run (`line_program`).
const LINE_READS: usize = 32;

/// The line program: `reads` times, a random element of the array `map`
/// (`entries`, a power of two, of 64 bytes: one cache line each) is looked
/// up and its first word read; each index is the next random number
/// XORed with the word read before, so every read waits for the one
/// before it (one miss at a time, as a flow's dependent reads do). Without
/// `read` it is the baseline (the same random numbers, no lookup). The
/// words are zero: the index stays random.
fn line_program(map: &OwnedFd, entries: u32, reads: usize, read: bool) -> anyhow::Result<OwnedFd> {
    let mut p = vec![insn(0xb7, 6, 0, 0, 0)]; // r6 = 0: the word read last
    for _ in 0..reads {
        p.push(insn(0x85, 0, 0, 0, 7)); // call bpf_get_prandom_u32
        p.push(insn(0xaf, 0, 6, 0, 0)); // r0 ^= r6
        p.push(insn(0x57, 0, 0, 0, (entries - 1) as i32)); // r0 &= entries - 1
        p.push(insn(0x63, 10, 0, -4, 0)); // *(u32 *)(r10 - 4) = r0
        if read {
            p.push(insn(0x18, 1, 1, 0, map.as_raw_fd())); // r1 = map
            p.push(0);
            p.push(insn(0xbf, 2, 10, 0, 0)); // r2 = r10
            p.push(insn(0x07, 2, 0, 0, -4)); // r2 -= 4: the index
            p.push(insn(0x85, 0, 0, 0, 1)); // call bpf_map_lookup_elem
            p.push(insn(0x15, 0, 0, 1, 0)); // if r0 == 0 skip the read
            p.push(insn(0x79, 6, 0, 0, 0)); // r6 = *(u64 *)(r0 + 0)
        }
    }
    load_xdp(p)
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

/// An LPM trie of `key` bytes (prefix length included) and 4-byte values
/// holding `entries` (prefix length, key data after it, value).
fn lpm_trie(
    key: u32,
    entries: impl ExactSizeIterator<Item = (u32, Vec<u8>, u32)>,
) -> anyhow::Result<OwnedFd> {
    let m = map_create(
        BPF_MAP_TYPE_LPM_TRIE,
        key,
        4,
        entries.len() as u32 + 16,
        BPF_F_NO_PREALLOC,
    )?;
    for (len, data, value) in entries {
        map_update(&m, &lpm_key(len, &data), &value.to_ne_bytes())?;
    }
    Ok(m)
}

/// The peer trie of the bench policy: `n` /32s from 10.0.0.0 (every other
/// address) and 198.18.0.0/24.
fn peer_trie(n: u32) -> anyhow::Result<OwnedFd> {
    let hosts = (0..n).map(|i| {
        let a = (0x0a00_0000u32 + 2 * i).to_be_bytes();
        (48, peer_data(a).to_vec(), i % 10)
    });
    let net = (40, peer_data([198, 18, 0, 0]).to_vec(), 0);
    lpm_trie(10, hosts.chain([net]).collect::<Vec<_>>().into_iter())
}

/// A port trie of `classes` classes, each allowing tcp/(1000 + class).
fn port_trie(classes: u32) -> anyhow::Result<OwnedFd> {
    lpm_trie(
        12,
        (0..classes).map(|c| (64, port_data(c, 1000 + c as u16).to_vec(), c)),
    )
}

/// A connection-table key of `len` bytes: `i` in its first 4, `last` as
/// its last byte (the family's place in `CtKey`).
fn ct_key(len: usize, i: u32, last: u8) -> Vec<u8> {
    let mut k = vec![0u8; len];
    k[..4].copy_from_slice(&i.to_ne_bytes());
    k[len - 1] = last;
    k
}

/// An LRU hash of `key` bytes and 80-byte values holding 1,000 keys.
fn lru_hash(key: usize) -> anyhow::Result<OwnedFd> {
    let m = map_create(BPF_MAP_TYPE_LRU_HASH, key as u32, 80, 65_536, 0)?;
    for i in 0..1_000u32 {
        map_update(&m, &ct_key(key, i, 4), &[0u8; 80])?;
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
    lpm_trie(
        10,
        entries
            .iter()
            .map(|(len, k, v)| (*len, bytemuck::bytes_of(k).to_vec(), v.class_id)),
    )
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
    let ports = lpm_trie(
        12,
        c.ports
            .iter()
            .map(|(len, k, v)| (*len, bytemuck::bytes_of(k).to_vec(), v.rule_id)),
    )?;
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
    let p1k = policy_tries(10, 1_000)?;
    let p10k = policy_tries(10_000, 10_000)?;
    let peer_key = |a: [u8; 4]| lpm_key(48, &peer_data(a));
    let port_key = |class: u32, port: u16| lpm_key(64, &port_data(class, port));
    let (known, unknown, host) = ([198, 18, 0, 7], [203, 0, 113, 9], [10, 0, 0, 2]);
    // (name, map, key), in the order of the output.
    let mut cases: Vec<(String, &OwnedFd, Vec<u8>)> = Vec::new();
    for (trie, maps, keys) in [
        (
            "peer trie (LPM, 10-byte key)",
            [("1k prefixes", &peer1k), ("10k prefixes", &peer10k)],
            [("miss", peer_key(unknown)), ("hit /24", peer_key(known))],
        ),
        (
            "port trie (LPM, 12-byte key)",
            [("10 classes", &port10), ("10k classes", &port10k)],
            [("miss", port_key(0, 22)), ("hit", port_key(0, 1000))],
        ),
    ] {
        for (size, map) in maps {
            for (what, key) in &keys {
                cases.push((format!("{trie}, {size}, {what}"), map, key.clone()));
            }
        }
    }
    for (len, size, map) in [
        (48, "48-byte key (CtKey)", &ct48),
        (16, "16-byte key", &ct16),
    ] {
        cases.push((
            format!("LRU hash, {size}, miss"),
            map,
            ct_key(len, 5_000, 0),
        ));
        cases.push((format!("LRU hash, {size}, hit"), map, ct_key(len, 7, 4)));
    }
    cases.push((
        "array (inlined by the verifier)".into(),
        &array,
        17u32.to_ne_bytes().to_vec(),
    ));
    for (encoding, map, notes) in [
        ("tiled", &p1k.tiled, [" (known)", " (unknown)", " (a /32)"]),
        ("default entry", &p1k.peers, [""; 3]),
    ] {
        for (a, note) in [known, unknown, host].into_iter().zip(notes) {
            let name = format!(
                "bench policy 10/1k, {encoding}: peer, {}{note}",
                std::net::Ipv4Addr::from(a)
            );
            cases.push((name, map, peer_key(a)));
        }
    }
    for (what, class, port) in [
        ("known class, tcp/22 (miss)", p1k.known, 22),
        ("known class, tcp/1000 (hit)", p1k.known, 1000),
        ("unknown's class, tcp/22", p1k.unknown, 22),
    ] {
        let name = format!("bench policy 10/1k: port, {what}");
        cases.push((name, &p1k.ports, port_key(class, port)));
    }
    for (encoding, map) in [("tiled", &p10k.tiled), ("default entry", &p10k.peers)] {
        let name = format!("bench policy 10k/10k, {encoding}: peer, 198.18.0.7");
        cases.push((name, map, peer_key(known)));
    }
    cases.push((
        "bench policy 10k/10k: port, known class, tcp/22 (miss)".into(),
        &p10k.ports,
        port_key(p10k.known, 22),
    ));
    let mut progs = Vec::new();
    for (name, map, key) in &cases {
        progs.push((
            name.clone(),
            program(map, key, 0)?,
            program(map, key, LOOKUPS)?,
            Vec::new(),
            LOOKUPS,
        ));
    }
    // One insert of a new key into a full LRU hash (16-byte key, 80-byte
    // value: `CtKey4`, `CtEntry`), as a tracked new flow does: it evicts.
    // Small enough to stay cached, the default half-open table's size,
    // and cache-cold. The first rounds fill the tables.
    let mut tables = Vec::new();
    for entries in [256u32, 16_384, 262_144] {
        tables.push((
            entries,
            map_create(BPF_MAP_TYPE_LRU_HASH, 16, 80, entries, 0)?,
        ));
    }
    for (entries, map) in &tables {
        progs.push((
            format!("LRU hash insert (evicts), 16-byte key, {entries} entries"),
            insert_program(map, INSERTS, false)?,
            insert_program(map, INSERTS, true)?,
            Vec::new(),
            INSERTS,
        ));
    }
    // One read of a random line of an array, each read waiting for the
    // one before: 64 lines (4 KiB, always cached), the sizes of the
    // namespace's shared arrays at the default `--ct-size` (the last-seen
    // array by remote 1 MiB, the IPv4 sets 4 MiB, the IPv4 entries 15
    // MiB) and 256 MiB (beyond any cache): what one cache miss into them
    // costs here, the unit of a cache-cold new flow's cost (it reads
    // several such lines).
    let mut arrays = Vec::new();
    for (entries, size) in [
        (64u32, "4 KiB"),
        (1 << 14, "1 MiB"),
        (1 << 16, "4 MiB"),
        (1 << 17, "8 MiB"),
        (1 << 18, "16 MiB"),
        (1 << 22, "256 MiB"),
    ] {
        arrays.push((
            entries,
            size,
            map_create(BPF_MAP_TYPE_ARRAY, 4, 64, entries, 0)?,
        ));
    }
    for (entries, size, map) in &arrays {
        progs.push((
            format!("array read of a random line, dependent, {size}"),
            line_program(map, *entries, LINE_READS, false)?,
            line_program(map, *entries, LINE_READS, true)?,
            Vec::new(),
            LINE_READS,
        ));
    }
    for _ in 0..rounds {
        for (_, base, prog, samples, per) in &mut progs {
            let b = crate::traffic::test_run_ns(base.as_raw_fd(), &frame, repeat)?;
            let t = crate::traffic::test_run_ns(prog.as_raw_fd(), &frame, repeat)?;
            samples.push((t - b) / *per as f64);
        }
    }
    Ok(progs
        .into_iter()
        .map(|(name, _, _, mut s, _)| (name, crate::median(&mut s)))
        .collect())
}
