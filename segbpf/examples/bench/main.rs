//! segbpf benchmarks (run by `cargo xtask bench [--quick]`, as root).
//!
//! * Per-packet cost through BPF_PROG_TEST_RUN: the empty XDP program (the
//!   floor) and segbpf on each path (allowed by a rule, connection-table
//!   hit, default drop, drop with its event suppressed, IPv6 allowed), for
//!   policies of 10 / 100 / 1,000 / 10,000 rules and 1,000 / 100,000 /
//!   1,000,000 prefixes. Every round runs every case once (interleaved);
//!   medians and spreads over the rounds are reported, and ratios to the
//!   floor measured in the same round.
//! * Update cost: compiling and swapping in a 10,000-rule policy, and a
//!   policy that differs by one set element; kernel memory of the maps.
//! * Event pipeline: the cost of a dropped packet with events off and with
//!   events on (rate-limited, so suppressed).
//! * Traffic at Mpps (`traffic.rs`): a live-frames XDP generator (an
//!   `AF_PACKET` socket where the kernel refuses live frames) pushes
//!   UDP packets from 8,192 flows over one veth into a receiver namespace
//!   that runs nothing, segbpf (events on and off), the `segbpf export
//!   nft` ruleset, a best-case nftables verdict map, iptables with an
//!   ipset, or xdp-filter, at 10 / 1,000 / 10,000 rules, allowed and
//!   denied; packets/s the receiver handled on one core, rounds
//!   interleaved.
//!
//! * Lower bounds (`lookups.rs`, `SEGBPF_BENCH_ONLY=lookups` only): one
//!   lookup of each map kind the datapath uses, in isolation, and one
//!   cache miss into arrays of the shared tables' sizes.
//! * Services (`services.rs`): the cgroup_skb programs' per-packet cost
//!   against an empty cgroup_skb program; (`svc_traffic.rs`) loopback
//!   TCP_RR and stream throughput between two services' processes with
//!   no program, the empty program and segbpf, and
//!   (`SEGBPF_BENCH_ONLY=services-systemd`, not in the default run) the
//!   same pair as systemd units with and without `IPAddressAllow=`.
//!
//! Prints a table and writes bench/results.json.
#![allow(
    unused_crate_dependencies,
    reason = "an example sees every dependency of the package and uses a few"
)]

mod lookups;
mod services;
mod svc_traffic;
mod traffic;

use std::{fmt::Write as _, net::IpAddr, os::fd::AsRawFd as _, time::Instant};

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use segbpf::{
    attachment::loader,
    attachment::maps,
    host::packet::PacketSpec,
    policy::Policy,
    policy::compile::{self, Capacity, Compiled},
};
use segbpf_common::{PROG_XDP_EMPTY, RUN_LIVE};
use serde_json::json;

struct Opts {
    quick: bool,
    rounds: usize,
    repeat: u32,
}

fn opts() -> Opts {
    let quick = std::env::args().any(|a| a == "--quick");
    Opts {
        quick,
        rounds: if quick { 5 } else { 9 },
        repeat: 1_000_000,
    }
}

/// A policy with `rules` ingress rules and about `prefixes` peer prefixes:
/// rule i allows tcp/(1000+i) from its own /32s; rule 0 also holds the bulk
/// prefixes; udp/53 from any; ingress default drop; events at 1/s.
fn policy_text(rules: usize, prefixes: usize) -> String {
    let mut t = String::from(
        "version = 1\n[defaults]\ningress = \"drop\"\negress = \"allow\"\nlog_rate = 1\n[roles.r]\nhosts = \"any\"\n",
    );
    let per_rule = (prefixes / rules.max(1)).max(1);
    let mut next: u32 = 0x0a00_0000; // 10.0.0.0, every other address
    for i in 0..rules {
        let mut peers = Vec::with_capacity(per_rule);
        for _ in 0..per_rule {
            peers.push(format!("\"{}\"", std::net::Ipv4Addr::from(next)));
            next += 2;
        }
        if i == 0 {
            peers.push("\"198.18.0.0/24\"".into());
            peers.push("\"fd00:18::/64\"".into());
        }
        let _ = write!(
            t,
            "[[roles.r.ingress]]\nfrom = [{}]\ntcp = [{}]\n",
            peers.join(","),
            1000 + i
        );
    }
    t.push_str("[[roles.r.ingress]]\nfrom = \"any\"\nudp = [53]\n");
    t
}

const TILED: &str = " {tiled}";

/// `c`'s peer tries as the disjoint tiling of each (slot, direction): the
/// encoding before `policy::peerdefault` (same function, same classes).
fn retile(c: &mut Compiled) {
    use segbpf::policy::{addr::range_to_prefixes, peerdefault};
    use segbpf_common::{PEER_KEY_HEADER_BITS, PeerKeyV4, PeerKeyV6};
    let mut v4 = Vec::new();
    for dir in [0u8, 1] {
        let mine: Vec<_> = c.peers_v4.iter().filter(|e| e.1.dir == dir).collect();
        let Some(slot) = mine.first().map(|e| e.1.slot) else {
            continue;
        };
        for (s, e, class_id) in
            peerdefault::expand(&mine, 32, |k| u128::from(u32::from_be_bytes(k.addr_be)))
        {
            for (p, len) in range_to_prefixes(s, e, 32) {
                v4.push((
                    PEER_KEY_HEADER_BITS + len,
                    PeerKeyV4 {
                        slot,
                        dir,
                        addr_be: (p as u32).to_be_bytes(),
                    },
                    segbpf_common::PeerClass { class_id },
                ));
            }
        }
    }
    let mut v6 = Vec::new();
    for dir in [0u8, 1] {
        let mine: Vec<_> = c.peers_v6.iter().filter(|e| e.1.dir == dir).collect();
        let Some(slot) = mine.first().map(|e| e.1.slot) else {
            continue;
        };
        for (s, e, class_id) in peerdefault::expand(&mine, 128, |k| u128::from_be_bytes(k.addr_be))
        {
            for (p, len) in range_to_prefixes(s, e, 128) {
                v6.push((
                    PEER_KEY_HEADER_BITS + len,
                    PeerKeyV6 {
                        slot,
                        dir,
                        addr_be: p.to_be_bytes(),
                    },
                    segbpf_common::PeerClass { class_id },
                ));
            }
        }
    }
    eprintln!(
        "tiled: {} -> {} v4 peer entries, {} -> {} v6",
        c.peers_v4.len(),
        v4.len(),
        c.peers_v6.len(),
        v6.len()
    );
    c.peers_v4 = v4;
    c.peers_v6 = v6;
}

fn compile(rules: usize, prefixes: usize) -> anyhow::Result<(Policy, Compiled)> {
    let policy = Policy::from_str(&policy_text(rules, prefixes), "bench.toml")?;
    let roles = vec!["r".to_string()];
    let c = compile::compile(
        &policy,
        &roles,
        Some("eth0"),
        0,
        1,
        Capacity::for_policy(&policy),
    )?;
    Ok((policy, c))
}

/// Nanoseconds per packet of one BPF_PROG_TEST_RUN with `repeat` (the
/// kernel reports the mean time of one repetition).
fn ns_per_packet(prog: &Xdp, frame: &[u8], repeat: u32) -> anyhow::Result<f64> {
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..TestRunOptions::new()
    })?;
    Ok(r.duration.as_nanos() as f64)
}

/// Other builds of the eBPF object to measure next to this one, in the
/// same rounds (ablations: "before and after in the same run"):
/// `SEGBPF_BENCH_ALT=label=path[,label=path...]`. Their per-packet cases
/// are named `... {label}`; the policy maps must have this build's layout.
fn alt_objects() -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let Ok(spec) = std::env::var("SEGBPF_BENCH_ALT") else {
        return Ok(Vec::new());
    };
    spec.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            let (label, path) = s
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("SEGBPF_BENCH_ALT: {s}: expected label=path"))?;
            Ok((label.to_string(), std::fs::read(path)?))
        })
        .collect()
}

/// A live instance of `object` (this build's when None) for an Ethernet
/// device, default capacities (as `loader::load`).
fn load_object(object: Option<&[u8]>) -> anyhow::Result<aya::Ebpf> {
    let Some(bytes) = object else {
        return Ok(loader::load(Capacity::default(), RUN_LIVE)?);
    };
    let c = Capacity::default();
    let mut ebpf = aya::EbpfLoader::new()
        .map_max_entries(segbpf_common::MAP_PEER_V4, c.peer_v4)
        .map_max_entries(segbpf_common::MAP_PEER_V6, c.peer_v6)
        .map_max_entries(segbpf_common::MAP_PORTS, c.ports)
        // Objects before the tables of our own have LRU tables: sized as
        // those builds sized them (aya skips a name an object lacks).
        .map_max_entries(segbpf_common::MAP_CT, c.ct)
        .map_max_entries(
            segbpf_common::MAP_CT_NEW,
            segbpf_common::ct_new_entries(c.ct),
        )
        .map_max_entries(segbpf_common::MAP_CT4, c.ct)
        .map_max_entries(
            segbpf_common::MAP_CT4_NEW,
            segbpf_common::ct_new_entries(c.ct),
        )
        .map_max_entries(segbpf_common::MAP_FRAG, c.frag)
        .map_max_entries(segbpf_common::MAP_FRAG_NEW, c.frag)
        .map_max_entries(segbpf_common::MAP_RULE_STATS, c.rule_stats)
        .override_global(segbpf_common::GLOBAL_RUN_MODE, &RUN_LIVE, true)
        // As `loader::load`: fresh tables, lookups may be skipped (older
        // objects have no such global).
        .override_global(segbpf_common::GLOBAL_CT_SEEN, &1u8, false)
        .override_global(
            segbpf_common::GLOBAL_LINK,
            &segbpf_common::LINK_ETHERNET,
            true,
        )
        .load(bytes)?;
    if ebpf.program(segbpf_common::PROG_XDP_INGRESS_V6).is_some() {
        loader::load_programs(&mut ebpf)?;
    } else {
        // A build from before the IPv6 programs were split off.
        loader::xdp(&mut ebpf)?.load()?;
        loader::tc(&mut ebpf)?.load()?;
    }
    Ok(ebpf)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Case {
    name: String,
    frame: Vec<u8>,
    /// Index of the loaded instance it runs on.
    inst: usize,
    /// Runs this program instead (xdp-filter's), by descriptor.
    raw_fd: Option<i32>,
    samples: Vec<f64>,
    ratios: Vec<f64>,
}

fn memlock(ebpf: &aya::Ebpf) -> u64 {
    let mut total = 0;
    for (_, map) in ebpf.maps() {
        let fd = match map {
            aya::maps::Map::LpmTrie(d)
            | aya::maps::Map::Array(d)
            | aya::maps::Map::PerCpuArray(d)
            | aya::maps::Map::LruHashMap(d)
            | aya::maps::Map::HashMap(d)
            | aya::maps::Map::PerCpuHashMap(d)
            | aya::maps::Map::RingBuf(d) => d.fd().as_fd().as_raw_fd(),
            _ => continue,
        };
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
        total += info
            .lines()
            .find_map(|l| {
                l.strip_prefix("memlock:")
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .unwrap_or(0);
    }
    total
}

use std::os::fd::AsFd as _;

/// Opens the flows the connection-table cases hit: a half-open one
/// (tcp HOST:40000 -> 198.18.0.9:443, the host's SYN; egress default
/// allow) and an assured one (HOST:40001 -> 198.18.0.9:443, SYN out,
/// SYN-ACK in, ACK out).
fn open_flows(ebpf: &mut aya::Ebpf, host: IpAddr) -> anyhow::Result<()> {
    // A connection-table entry for the CT-hit path: the host opened
    // tcp 192.0.2.1:40000 -> 198.18.0.9:443 (egress default allow).
    let syn = PacketSpec::tcp(host, "198.18.0.9".parse()?, 40000, 443)
        .build()
        .bytes;
    loader::tc(ebpf)?.test_run(TestRunOptions {
        data_in: Some(&syn),
        ..TestRunOptions::new()
    })?;
    // An assured flow for the assured CT-hit and blind-RST paths: the
    // host opened 192.0.2.1:40001 -> 198.18.0.9:443 and the handshake
    // completed (SYN out, SYN-ACK in, ACK out).
    let peer: IpAddr = "198.18.0.9".parse()?;
    for (egress, spec) in [
        (true, PacketSpec::tcp(host, peer, 40001, 443)),
        (
            false,
            PacketSpec {
                tcp_flags: 0x12,
                tcp_ack: 2,
                ..PacketSpec::tcp(peer, host, 443, 40001)
            },
        ),
        (
            true,
            PacketSpec {
                tcp_flags: 0x10,
                tcp_seq: 2,
                tcp_ack: 2,
                ..PacketSpec::tcp(host, peer, 40001, 443)
            },
        ),
    ] {
        let frame = spec.build().bytes;
        let opts = TestRunOptions {
            data_in: Some(&frame),
            ..TestRunOptions::new()
        };
        if egress {
            loader::tc(ebpf)?.test_run(opts)?;
        } else {
            loader::xdp(ebpf)?.test_run(opts)?;
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--svc-peer") {
        // A server or client process of the services loopback rows.
        return svc_traffic::peer(&args[2..]);
    }
    let o = opts();
    if std::env::var("SEGBPF_BENCH_ONLY").as_deref() == Ok("services-systemd") {
        let v =
            svc_traffic::systemd_ipaddressallow(o.rounds.min(5), if o.quick { 1.0 } else { 2.0 })?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if matches!(
        std::env::var("SEGBPF_BENCH_ONLY").as_deref(),
        Ok("traffic" | "cold")
    ) {
        // Debugging the traffic lab alone: print its rows, write nothing.
        for row in traffic::throughput(o.quick)? {
            println!("{row}");
        }
        return Ok(());
    }
    if std::env::var("SEGBPF_BENCH_ONLY").as_deref() == Ok("services") {
        for row in services::per_packet(o.rounds, o.repeat)?
            .as_array()
            .into_iter()
            .flatten()
        {
            println!(
                "{:<62} {:>8.1} ns {:>6.2}x",
                row["case"].as_str().unwrap_or(""),
                row["median_ns"].as_f64().unwrap_or(0.0),
                row["ratio_to_floor"].as_f64().unwrap_or(0.0)
            );
        }
        let lo = svc_traffic::loopback(o.rounds.min(5), if o.quick { 1.0 } else { 2.0 })?;
        let mut t = String::new();
        svc_traffic::print_loopback(&lo, &mut t);
        print!("{t}");
        if let Ok(f) = std::env::var("SEGBPF_BENCH_JSON") {
            std::fs::write(f, serde_json::to_string_pretty(&lo)?)?;
        }
        return Ok(());
    }
    if std::env::var("SEGBPF_BENCH_ONLY").as_deref() == Ok("lookups") {
        for (name, ns) in lookups::lower_bounds(o.rounds, o.repeat)? {
            println!("{name:<62} {ns:>8.1} ns each");
        }
        return Ok(());
    }
    if std::env::var("SEGBPF_BENCH_ONLY").as_deref() == Ok("memory") {
        println!("{}", attachments_memory()?);
        return Ok(());
    }
    if std::env::var("SEGBPF_BENCH_ONLY").as_deref() == Ok("verifier") {
        println!(
            "{}",
            serde_json::to_string_pretty(&verifier_stats(3, None)?)?
        );
        for (label, bytes) in alt_objects()? {
            eprintln!("{label}:");
            verifier_stats(3, Some(&bytes))?;
        }
        return Ok(());
    }
    let host: IpAddr = "192.0.2.1".parse()?;
    let host6: IpAddr = "2001:db8::1".parse()?;
    let sizes: Vec<(usize, usize)> =
        if std::env::var("SEGBPF_BENCH_ONLY").as_deref() == Ok("packet") {
            vec![(10, 1_000), (10_000, 10_000)]
        } else if o.quick {
            vec![
                (10, 1_000),
                (1_000, 1_000),
                (10_000, 10_000),
                (10, 1_000_000),
            ]
        } else {
            vec![
                (10, 1_000),
                (100, 1_000),
                (1_000, 1_000),
                (10_000, 10_000),
                (10, 100_000),
                (10, 1_000_000),
            ]
        };

    // The floor: an XDP program that only passes.
    let mut floor_ebpf = loader::load(Capacity::default(), RUN_LIVE)?;
    {
        let p: &mut Xdp = floor_ebpf
            .program_mut(PROG_XDP_EMPTY)
            .ok_or_else(|| anyhow::anyhow!("no {PROG_XDP_EMPTY}"))?
            .try_into()?;
        p.load()?;
    }

    let mut instances: Vec<aya::Ebpf> = Vec::new();
    let mut cases: Vec<Case> = Vec::new();
    let mut sizes_out = Vec::new();
    let alts = alt_objects()?;
    let objects: Vec<(String, Option<&[u8]>)> = std::iter::once((String::new(), None))
        .chain(
            alts.iter()
                .map(|(l, b)| (format!(" {{{l}}}"), Some(b.as_slice()))),
        )
        .chain(
            // `SEGBPF_BENCH_TILED=1`: this build's object with the peer
            // tries written as the full disjoint tiling (the encoding before
            // `policy::peerdefault`), at the first policy size.
            (std::env::var("SEGBPF_BENCH_TILED").as_deref() == Ok("1"))
                .then(|| (TILED.to_string(), None)),
        )
        .collect();
    // `SEGBPF_BENCH_ALT_ALL=1`: the other builds at every policy size.
    let alt_all = std::env::var("SEGBPF_BENCH_ALT_ALL").as_deref() == Ok("1");
    for &(rules, prefixes) in &sizes {
        for (obj_label, obj) in &objects {
            let tiled = obj_label == TILED;
            if (obj.is_some() && !alt_all || tiled) && (rules, prefixes) != sizes[0] {
                // Other builds: at the first policy size only.
                continue;
            }
            let t0 = Instant::now();
            let (_, mut c) = compile(rules, prefixes)?;
            if tiled {
                retile(&mut c);
            }
            let compile_s = t0.elapsed().as_secs_f64();
            let mut ebpf = load_object(*obj)?;
            let t1 = Instant::now();
            maps::write_policy(&mut ebpf, &c)?;
            let load_s = t1.elapsed().as_secs_f64();
            open_flows(&mut ebpf, host)?;
            let peer: IpAddr = "198.18.0.9".parse()?;
            let inst = instances.len();
            let mem = memlock(&ebpf);
            instances.push(ebpf);
            let label = format!("{rules} rules / {prefixes} prefixes");
            let src_allowed = "198.18.0.7";
            let mk = |name: &str, frame: Vec<u8>| Case {
                name: format!("{name} [{label}]{obj_label}"),
                frame,
                inst,
                raw_fd: None,
                samples: Vec::new(),
                ratios: Vec::new(),
            };
            cases.push(mk(
                "allowed tcp",
                PacketSpec::tcp(src_allowed.parse()?, host, 40000, 1000)
                    .build()
                    .bytes,
            ));
            cases.push(mk(
                "ct hit, half-open",
                PacketSpec {
                    tcp_flags: 0x12,
                    ..PacketSpec::tcp("198.18.0.9".parse()?, host, 443, 40000)
                }
                .build()
                .bytes,
            ));
            cases.push(mk(
                "ct hit, assured",
                PacketSpec {
                    tcp_flags: 0x10,
                    tcp_seq: 2,
                    tcp_ack: 2,
                    ..PacketSpec::tcp(peer, host, 443, 40001)
                }
                .build()
                .bytes,
            ));
            cases.push(mk(
                "blind rst, out of window (dropped)",
                PacketSpec {
                    tcp_flags: 0x04,
                    tcp_seq: 3_000_000,
                    ..PacketSpec::tcp(peer, host, 443, 40001)
                }
                .build()
                .bytes,
            ));
            cases.push(mk(
                "default drop (event suppressed)",
                PacketSpec::tcp("203.0.113.9".parse()?, host, 40000, 22)
                    .build()
                    .bytes,
            ));
            cases.push(mk(
                "drop, known source, closed port (event suppressed)",
                PacketSpec::tcp(src_allowed.parse()?, host, 40000, 22)
                    .build()
                    .bytes,
            ));
            // A source of the same class with no tracked flow: its
            // last-seen bucket was never written (`SEG_CT_SEEN_X`), so it
            // skips the connection tables; 198.18.0.7 above has a flow.
            cases.push(mk(
                "drop, known source without flows, closed port (event suppressed)",
                PacketSpec::tcp("198.18.0.8".parse()?, host, 40000, 22)
                    .build()
                    .bytes,
            ));
            // Malformed: an allowed source's SYN cut inside its TCP header
            // (the IPv4 header still claims the whole segment): dropped by
            // the parser.
            let mut cut = PacketSpec::tcp(src_allowed.parse()?, host, 40000, 1000)
                .build()
                .bytes;
            cut.truncate(14 + 20 + 10);
            cases.push(mk("malformed, tcp header cut (dropped)", cut));
            cases.push(mk(
                "ipv6 allowed",
                PacketSpec::tcp("fd00:18::7".parse()?, host6, 40000, 1000)
                    .build()
                    .bytes,
            ));
            if obj.is_some() || tiled {
                continue;
            }
            sizes_out.push(json!({
            "rules": rules, "prefixes": prefixes,
            "entries": { "peer_v4": c.peers_v4.len(), "peer_v6": c.peers_v6.len(), "ports": c.ports.len() },
            "classes": c.classes,
            "compile_s": compile_s, "write_maps_s": load_s, "map_memlock_bytes": mem,
        }));
            eprintln!(
                "prepared {label}: compile {compile_s:.2}s, maps {load_s:.2}s, {} KiB locked",
                mem / 1024
            );
        }
    }

    // Event pipeline: the same drop with events off.
    let (_, mut quiet) = compile(10, 1_000)?;
    quiet.config.log_rate = 0;
    let mut quiet_ebpf = loader::load(Capacity::default(), RUN_LIVE)?;
    maps::write_policy(&mut quiet_ebpf, &quiet)?;
    let quiet_inst = instances.len();
    instances.push(quiet_ebpf);
    cases.push(Case {
        name: "default drop (events off) [10 rules / 1000 prefixes]".into(),
        frame: PacketSpec::tcp("203.0.113.9".parse()?, host, 40000, 22)
            .build()
            .bytes,
        inst: quiet_inst,
        raw_fd: None,
        samples: Vec::new(),
        ratios: Vec::new(),
    });

    // Flow accounting off (`attach --flow-log off`): what counting flows
    // and aggregating denials costs on the tracked and the drop path.
    let (_, mut unaccounted) = compile(10, 1_000)?;
    unaccounted.config.flow_acct = 0;
    unaccounted.config.log_rate = 0;
    let mut plain_ebpf = loader::load(Capacity::default(), RUN_LIVE)?;
    maps::write_policy(&mut plain_ebpf, &unaccounted)?;
    open_flows(&mut plain_ebpf, host)?;
    let plain_inst = instances.len();
    instances.push(plain_ebpf);
    for (name, frame) in [
        (
            "ct hit, assured (flow accounting off)",
            PacketSpec {
                tcp_flags: 0x10,
                tcp_seq: 2,
                tcp_ack: 2,
                ..PacketSpec::tcp("198.18.0.9".parse()?, host, 443, 40001)
            },
        ),
        (
            "default drop (events off, flow accounting off)",
            PacketSpec::tcp("203.0.113.9".parse()?, host, 40000, 22),
        ),
    ] {
        cases.push(Case {
            name: format!("{name} [10 rules / 1000 prefixes]"),
            frame: frame.build().bytes,
            inst: plain_inst,
            raw_fd: None,
            samples: Vec::new(),
            ratios: Vec::new(),
        });
    }

    // Connection tracking off as well (`established = false`): the drop
    // path without its two connection-table misses, i.e. what is left of
    // a default drop (parse, configuration, clock, the peer lookup,
    // counters) against xdp-filter's stateless drop.
    let (_, mut stateless) = compile(10, 1_000)?;
    stateless.config.flow_acct = 0;
    stateless.config.log_rate = 0;
    stateless.config.established = 0;
    let mut stateless_ebpf = loader::load(Capacity::default(), RUN_LIVE)?;
    maps::write_policy(&mut stateless_ebpf, &stateless)?;
    let stateless_inst = instances.len();
    instances.push(stateless_ebpf);
    for (name, dport) in [
        (
            "default drop (events off, flow accounting off, tracking off)",
            22,
        ),
        (
            "allowed tcp (events off, flow accounting off, tracking off)",
            1000,
        ),
    ] {
        let src = if dport == 22 {
            "203.0.113.9"
        } else {
            "198.18.0.7"
        };
        cases.push(Case {
            name: format!("{name} [10 rules / 1000 prefixes]"),
            frame: PacketSpec::tcp(src.parse()?, host, 40000, dport)
                .build()
                .bytes,
            inst: stateless_inst,
            raw_fd: None,
            samples: Vec::new(),
            ratios: Vec::new(),
        });
    }

    // xdp-filter (xdp-tools), stateless, on a device of its own
    // namespace: deny, with tcp/1000 (the allowed case's port) open.
    let mut xf_lab = segbpf_tests::Lab::new("bxf")?;
    xf_lab.add_host("h", &["198.18.5.1/24"])?;
    let xf_ns = xf_lab.host("h").ns.name.clone();
    let xf = traffic::XdpFilter::load(&xf_ns, "eth0", 1000)?;
    let xf_fd = xf.prog_fd()?;
    for (name, dport) in [
        ("xdp-filter: pass (open port)", 1000),
        ("xdp-filter: drop, known source, closed port", 22),
    ] {
        cases.push(Case {
            name: name.into(),
            frame: PacketSpec::tcp("198.18.0.7".parse()?, host, 40000, dport)
                .build()
                .bytes,
            inst: 0,
            raw_fd: Some(xf_fd.as_raw_fd()),
            samples: Vec::new(),
            ratios: Vec::new(),
        });
    }

    let floor_frame = PacketSpec::tcp("198.18.0.7".parse()?, host, 40000, 1000)
        .build()
        .bytes;
    let mut floor_samples = Vec::new();
    for round in 0..o.rounds {
        let floor_prog: &Xdp = floor_ebpf
            .program(PROG_XDP_EMPTY)
            .expect("floor")
            .try_into()?;
        let floor = ns_per_packet(floor_prog, &floor_frame, o.repeat)?;
        floor_samples.push(floor);
        for c in &mut cases {
            let ns = if let Some(fd) = c.raw_fd {
                traffic::test_run_ns(fd, &c.frame, o.repeat)?
            } else {
                let prog = loader::xdp(&mut instances[c.inst])?;
                ns_per_packet(prog, &c.frame, o.repeat)?
            };
            c.samples.push(ns);
            c.ratios.push(ns / floor);
        }
        eprintln!(
            "round {}/{} done (floor {floor:.1} ns)",
            round + 1,
            o.rounds
        );
    }

    drop(xf_fd);
    drop(xf);
    drop(xf_lab);

    // Debugging: SEGBPF_BENCH_ONLY=packet stops after the per-packet cases.
    let packet_only = std::env::var("SEGBPF_BENCH_ONLY").as_deref() == Ok("packet");
    if packet_only {
        let floor_med = median(&mut floor_samples.clone());
        println!("{:<62} {floor_med:>8.1}", "empty XDP program (floor)");
        for c in &mut cases {
            println!(
                "{:<62} {:>8.1} {:>6.2}",
                c.name,
                median(&mut c.samples.clone()),
                median(&mut c.ratios.clone())
            );
        }
        return Ok(());
    }
    // Update cost: swap in a 10,000-rule policy, and one that differs by a set element.
    let (_, big) = compile(10_000, 10_000)?;
    let mut upd = loader::load(Capacity::default(), RUN_LIVE)?;
    maps::write_policy(&mut upd, &big)?;
    let t = Instant::now();
    let (_, mut big2) = compile(10_000, 10_000)?;
    big2.config.active_slot = 1;
    for e in &mut big2.peers_v4 {
        e.1.slot = 1;
    }
    for e in &mut big2.peers_v6 {
        e.1.slot = 1;
    }
    for e in &mut big2.ports {
        e.1.slot = 1;
    }
    maps::write_policy(&mut upd, &big2)?;
    let swap_10k_s = t.elapsed().as_secs_f64();
    // One more set element on the 10,000-rule policy: what `segbpf set add`
    // does (recompile, write the other slot, flip), without process start.
    let plus_text = policy_text(10_000, 10_000).replacen(
        "\"198.18.0.0/24\"",
        "\"198.18.0.0/24\",\"198.51.100.1\"",
        1,
    );
    let t = Instant::now();
    let plus = Policy::from_str(&plus_text, "b.toml")?;
    let c = compile::compile(
        &plus,
        &["r".to_string()],
        Some("eth0"),
        0,
        3,
        Capacity::for_policy(&plus),
    )?;
    maps::write_policy(&mut upd, &c)?;
    let set_add_s = t.elapsed().as_secs_f64();

    let attachments = attachments_memory()?;
    let services_rows = services::per_packet(o.rounds, o.repeat)?;
    let services_loopback =
        svc_traffic::loopback(o.rounds.min(5), if o.quick { 1.0 } else { 2.0 })?;
    let verifier = verifier_stats(3, None)?;
    let throughput = traffic::throughput(o.quick)?;

    // Report.
    let floor_med = median(&mut floor_samples.clone());
    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<62} {:>10} {:>14} {:>10}",
        "case", "ns/pkt", "spread", "x floor"
    );
    let _ = writeln!(
        table,
        "{:<62} {:>10.1} {:>14} {:>10}",
        "empty XDP program (floor)",
        floor_med,
        format!("{:.1}-{:.1}", min(&floor_samples), max(&floor_samples)),
        "1.00"
    );
    let mut rows = Vec::new();
    for c in &mut cases {
        let med = median(&mut c.samples.clone());
        let ratio = median(&mut c.ratios.clone());
        let _ = writeln!(
            table,
            "{:<62} {:>10.1} {:>14} {:>10.2}",
            c.name,
            med,
            format!("{:.1}-{:.1}", min(&c.samples), max(&c.samples)),
            ratio
        );
        rows.push(json!({"case": c.name, "median_ns": med, "min_ns": min(&c.samples), "max_ns": max(&c.samples), "ratio_to_floor": ratio, "samples_ns": c.samples}));
    }
    let _ = writeln!(table, "\nservices (cgroup_skb, docs/services.md):");
    for row in services_rows.as_array().into_iter().flatten() {
        let _ = writeln!(
            table,
            "{:<62} {:>10.1} {:>14} {:>10.2}",
            row["case"].as_str().unwrap_or(""),
            row["median_ns"].as_f64().unwrap_or(0.0),
            "",
            row["ratio_to_floor"].as_f64().unwrap_or(0.0)
        );
    }
    svc_traffic::print_loopback(&services_loopback, &mut table);
    let _ = writeln!(
        table,
        "\nupdate: swap in a 10,000-rule policy (compile + write other slot + flip): {swap_10k_s:.3} s"
    );
    let _ = writeln!(
        table,
        "update: one more set element in the 10,000-rule policy (compile + write + flip): {set_add_s:.3} s"
    );
    let _ = writeln!(
        table,
        "\nthroughput (packets/s the receiver handled on one core, median of rounds; ratio to no firewall):"
    );
    for row in &throughput {
        if let Some(why) = row["unavailable"].as_str() {
            let _ = writeln!(table, "  {why}");
            continue;
        }
        if let Some(ns) = row["median_program_ns"].as_f64() {
            let _ = writeln!(
                table,
                "  {:<15} {:<26} program {ns:>6.1} ns per packet ({})",
                row["enforcer"].as_str().unwrap_or(""),
                row["traffic"].as_str().unwrap_or(""),
                row["generator"].as_str().unwrap_or("")
            );
            continue;
        }
        let _ = writeln!(
            table,
            "  {:<15} {:>6} rules {:<8} {:>10.0} pps {:>6.2}x ({})",
            row["enforcer"].as_str().unwrap_or(""),
            row["rules"],
            row["traffic"].as_str().unwrap_or(""),
            row["median_pps"].as_f64().unwrap_or(0.0),
            row["ratio_to_none"].as_f64().unwrap_or(0.0),
            row["generator"].as_str().unwrap_or("")
        );
    }
    print!("{table}");
    let results = json!({
        "machine": machine(),
        "command": if o.quick { "cargo xtask bench --quick" } else { "cargo xtask bench" },
        "rounds": o.rounds,
        "repeat": o.repeat,
        "floor": {"median_ns": floor_med, "samples_ns": floor_samples},
        "per_packet": rows,
        "services_per_packet": services_rows,
        "services_loopback": services_loopback,
        "sizes": sizes_out,
        "update": {"swap_10k_rules_s": swap_10k_s, "set_element_s": set_add_s},
        "throughput": throughput,
        "attachments_memory": attachments,
        "verifier": verifier,
    });
    std::fs::create_dir_all("bench")?;
    std::fs::write(
        "bench/results.json",
        serde_json::to_string_pretty(&results)?,
    )?;
    eprintln!("wrote bench/results.json");
    Ok(())
}

/// What the verifier does with each attached program of a live instance
/// (Ethernet link): the instructions it processed (`verified_insns` of
/// the kernel's program info, kernel 5.16+), the program's size after the
/// kernel's rewrites, and the wall time of its BPF_PROG_LOAD (nearly all
/// of it verification), median of `loads` loads. `object`: another build
/// of the eBPF object (see `alt_objects`), else this one.
fn verifier_stats(loads: usize, object: Option<&[u8]>) -> anyhow::Result<serde_json::Value> {
    use segbpf_common::{
        GLOBAL_IFINDEX, GLOBAL_LINK, GLOBAL_RUN_MODE, LINK_ETHERNET, PROG_TC_EGRESS,
        PROG_TC_EGRESS_ERR, PROG_TC_EGRESS_V6, PROG_XDP_INGRESS, PROG_XDP_INGRESS_ERR,
        PROG_XDP_INGRESS_V6,
    };
    let mut rows = Vec::new();
    for name in [
        PROG_XDP_INGRESS,
        PROG_XDP_INGRESS_V6,
        PROG_XDP_INGRESS_ERR,
        PROG_TC_EGRESS,
        PROG_TC_EGRESS_V6,
        PROG_TC_EGRESS_ERR,
    ] {
        let mut times = Vec::new();
        let mut insns = 0;
        let mut xlated = 0;
        for _ in 0..loads {
            let mut ebpf = aya::EbpfLoader::new()
                .override_global(GLOBAL_RUN_MODE, &RUN_LIVE, true)
                .override_global(GLOBAL_LINK, &LINK_ETHERNET, true)
                .override_global(GLOBAL_IFINDEX, &1u32, true)
                .load(object.unwrap_or(loader::EBPF_OBJECT))?;
            let Some(prog) = ebpf.program_mut(name) else {
                // An object from before the IPv6 programs were split off.
                break;
            };
            let t = Instant::now();
            let loaded = match prog {
                aya::programs::Program::Xdp(p) => p.load().and_then(|()| p.info()),
                aya::programs::Program::SchedClassifier(p) => p.load().and_then(|()| p.info()),
                _ => anyhow::bail!("{name}: unexpected program type"),
            };
            let info = match loaded {
                Ok(info) => info,
                Err(e) => {
                    // The verifier refused it: say where it stopped.
                    let text = format!("{e}");
                    let tail: Vec<&str> = text.lines().rev().take(4).collect();
                    eprintln!("verifier: {name}: refused: {}", tail.join(" | "));
                    rows.push(json!({"program": name, "refused": tail.join(" | ")}));
                    break;
                }
            };
            times.push(t.elapsed().as_secs_f64());
            insns = info.verified_instruction_count().unwrap_or(0);
            xlated = info.size_translated().unwrap_or(0) / 8;
        }
        if times.is_empty() {
            continue;
        }
        let load_s = median(&mut times.clone());
        eprintln!(
            "verifier: {name}: {insns} instructions processed, {xlated} instructions, load {:.0} ms (median of {loads})",
            load_s * 1e3
        );
        rows.push(json!({"program": name, "verified_insns": insns, "xlated_insns": xlated, "load_s": load_s, "load_samples_s": times}));
    }
    Ok(serde_json::Value::Array(rows))
}

/// Kernel memory (`memlock` of programs and maps, as `segbpf status`
/// reports it) of `examples/roles.toml` attached to 1 and to 20 interfaces
/// of one network namespace: the connection tables are the namespace's.
fn attachments_memory() -> anyhow::Result<serde_json::Value> {
    let policy = format!("{}/../examples/roles.toml", env!("CARGO_MANIFEST_DIR"));
    let mut lab = segbpf_tests::Lab::new("bmem")?;
    lab.add_host("web", &["10.10.1.10/16"])?;
    let ns = lab.host("web").ns.name.clone();
    let total = |lab: &segbpf_tests::Lab| -> anyhow::Result<(u64, u64)> {
        let v: serde_json::Value =
            serde_json::from_str(&lab.segbpf_ok("web", &["status", "--output", "json"])?)?;
        let atts = v["attachments"].as_array().cloned().unwrap_or_default();
        let own: u64 = atts
            .iter()
            .map(|a| a["memory"]["attachment_bytes"].as_u64().unwrap_or(0))
            .sum();
        let shared = atts
            .first()
            .and_then(|a| a["memory"]["shared_bytes"].as_u64())
            .unwrap_or(0);
        Ok((own + shared, shared))
    };
    let mut rows = Vec::new();
    lab.attach("web", &policy, &["--role", "web"])?;
    for n in [1usize, 20] {
        for i in rows.len().max(1)..n {
            let (v, w) = (format!("v{i}"), format!("w{i}"));
            segbpf_tests::netns::ip(&[
                "-n", &ns, "link", "add", &v, "type", "veth", "peer", "name", &w,
            ])?;
            segbpf_tests::netns::ip(&["-n", &ns, "link", "set", &v, "up"])?;
            segbpf_tests::netns::ip(&["-n", &ns, "link", "set", &w, "up"])?;
            lab.segbpf_ok(
                "web",
                &[
                    "attach",
                    &v,
                    "--policy",
                    &policy,
                    "--role",
                    "web",
                    "--no-wait",
                ],
            )?;
        }
        let (bytes, shared) = total(&lab)?;
        eprintln!(
            "examples/roles.toml on {n} interface(s) of one namespace: {} MiB in the kernel ({} MiB shared connection tables)",
            bytes / (1024 * 1024),
            shared / (1024 * 1024)
        );
        rows.push(
            json!({"interfaces": n, "kernel_bytes": bytes, "shared_conntrack_bytes": shared}),
        );
    }
    Ok(serde_json::Value::Array(rows))
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "kernel": kernel.trim(),
    })
}
