//! Differential testing: random policies and packets (seeded, see
//! `segbpf_tests::generate`) judged by (a) the reference evaluator and (b) the
//! kernel program through BPF_PROG_TEST_RUN must agree on the verdict,
//! the reason and the rule. Every mismatch prints a reproducer (seed,
//! policy text, roles, packet). CI runs a fixed seed with at least 10,000
//! cases, and `cargo xtask test` adds a fresh random seed every run
//! (`SEGBPF_DIFF_FRESH_SEED`, printed); `cargo xtask fuzz-diff --cases N
//! --seed S` runs one seed with more cases (`SEGBPF_DIFF_CASES`,
//! `SEGBPF_DIFF_SEED`, `SEGBPF_DIFF_NFT_CASES`).
//!
//! Then the same with state and a second implementation: segbpf, the
//! evaluator plus the flows the harness tracks, and `segbpf export nft`
//! loaded in a namespace and fed real packets, on first packets, on
//! established traffic and on ICMP errors quoting tracked and untracked
//! flows; every packet must be accounted for by exactly one nftables
//! counter (see `nftables_export_agrees`).
//!
//! Also here: a truncation sweep — well-formed frames cut at every length
//! from the Ethernet header on must never pass (nothing the parser cannot
//! fully validate is allowed) — and its counterpart, a fragmentation sweep:
//! every way of fragmenting an allowed datagram passes whole, and no
//! fragment of a denied one passes. Both are exhaustive over their lengths
//! and cut points, not random, so they need no seed.
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::net::IpAddr;

use segbpf::{
    attachment::maps::PolicyMaps,
    host::packet::{Ext, PacketSpec},
    policy::compile::{self, Capacity},
    policy::{Direction, Policy, eval},
};
use segbpf_common::{NO_RULE, RUN_DRY, RUN_RECORD, reason};
use segbpf_tests::{
    generate::{self, Rng},
    harness::Instance,
};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn host_of(src: IpAddr) -> IpAddr {
    if src.is_ipv4() {
        "10.0.0.1".parse().unwrap()
    } else {
        "fd00:99::1".parse().unwrap()
    }
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn kernel_agrees_with_reference_evaluator_on_random_policies() -> anyhow::Result<()> {
    for seed in seeds() {
        kernel_agrees(seed, env_u64("SEGBPF_DIFF_CASES", 12_000))?;
    }
    Ok(())
}

/// The seeds to run: `SEGBPF_DIFF_SEED` alone when set (`cargo xtask
/// fuzz-diff --seed S`); otherwise the fixed seed CI has always run, plus
/// `SEGBPF_DIFF_FRESH_SEED` when set (`cargo xtask test` draws a new one
/// every run and prints it, so a failure is reproduced with `cargo xtask
/// fuzz-diff --seed S`).
fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("SEGBPF_DIFF_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return vec![seed];
    }
    let mut seeds = vec![0x5e9b_f00d];
    if let Some(fresh) = std::env::var("SEGBPF_DIFF_FRESH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        eprintln!(
            "differential: fixed seed {} and fresh seed {fresh} (reproduce with `cargo xtask fuzz-diff --seed {fresh}`)",
            seeds[0]
        );
        seeds.push(fresh);
    }
    seeds
}

fn kernel_agrees(seed: u64, cases: u64) -> anyhow::Result<()> {
    let per_policy = 60;
    let mut rng = Rng::new(seed);
    let mut instance = Instance::load(RUN_DRY)?;
    let mut pm = PolicyMaps::from_ebpf(instance.ebpf())?;
    let (mut done, mut policies, mut mismatches) = (0u64, 0u64, Vec::new());
    let mut passes = 0u64;
    while done < cases {
        let g = generate::policy(&mut rng);
        let policy = Policy::from_str(&g.text, "generated.toml")
            .map_err(|e| anyhow::anyhow!("generator wrote an invalid policy: {e}\n{}", g.text))?;
        let n = 1 + rng.below(g.roles.len() as u64) as usize;
        let roles: Vec<String> = g.roles[..n].to_vec();
        let slot = (policies % 2) as u8;
        let c = compile::compile(
            &policy,
            &roles,
            Some("eth0"),
            slot,
            policies + 1,
            Capacity::default(),
        )?;
        pm.clear_slot(slot)?;
        pm.write_slot(&c)?;
        pm.activate(slot)?;
        policies += 1;
        for _ in 0..per_policy {
            let (src, proto, dport, icmp_type) = generate::packet(&mut rng, &g);
            let dst = host_of(src);
            let mut spec = PacketSpec::new(src, dst, proto);
            spec.sport = 40000;
            spec.dport = dport;
            spec.tcp_flags = 0x02;
            spec.icmp_type = icmp_type;
            let pkt = eval::Packet {
                src,
                dst,
                proto,
                dport: if matches!(proto, 6 | 17) { dport } else { 0 },
                icmp_type,
                hop_limit: 64,
            };
            let want = eval::evaluate(&policy, &roles, Some("eth0"), Direction::Ingress, &pkt);
            let got = instance.ingress(spec.build().bytes)?.ensure_recorded()?;
            let got = (got.reason, got.rule_id);
            let want_pair = (want.reason, want.rule.unwrap_or(NO_RULE));
            if want.passes() {
                passes += 1;
            }
            if got != want_pair && mismatches.len() < 5 {
                mismatches.push(format!(
                    "seed {seed} (reproduce: cargo xtask fuzz-diff --seed {seed}), policy #{policies}, roles {roles:?}, packet {src} -> {dst} proto {proto} dport {dport} icmp {icmp_type}: evaluator {} rule {:?}, kernel {} rule {}\n--- policy ---\n{}",
                    reason::name(want.reason),
                    want.rule,
                    reason::name(got.0),
                    got.1,
                    g.text
                ));
            }
            done += 1;
        }
    }
    eprintln!(
        "seed {seed}: {done} cases over {policies} random policies ({passes} allowed): {} mismatches",
        mismatches.len()
    );
    assert!(
        passes > done / 20 && passes < done - done / 20,
        "the cases exercise both verdicts"
    );
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n\n"));
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn truncated_frames_never_pass() -> anyhow::Result<()> {
    // A policy that allows everything from anywhere, so only the parser
    // can stop a frame.
    let policy = Policy::from_str(
        "version = 1\n[defaults]\ningress = \"allow\"\n[roles.r]\nhosts = \"any\"\n[[roles.r.ingress]]\nfrom = \"any\"\nproto = \"any\"\n",
        "open.toml",
    )?;
    let mut instance = Instance::with_policy(&policy, &["r".to_string()], "eth0", RUN_DRY)?;
    let a4: IpAddr = "198.18.0.2".parse()?;
    let a6: IpAddr = "fd00:18::2".parse()?;
    let h4: IpAddr = "198.18.0.1".parse()?;
    let h6: IpAddr = "fd00:18::1".parse()?;
    let mut frames = vec![
        ("ipv4 tcp", PacketSpec::tcp(a4, h4, 1, 80)),
        ("ipv4 udp", PacketSpec::udp(a4, h4, 1, 53)),
        ("ipv4 icmp", PacketSpec::echo(a4, h4)),
        ("ipv6 tcp", PacketSpec::tcp(a6, h6, 1, 80)),
        ("ipv6 udp", PacketSpec::udp(a6, h6, 1, 53)),
        ("ipv6 icmpv6", PacketSpec::echo(a6, h6)),
    ];
    let mut opts = PacketSpec::tcp(a4, h4, 1, 80);
    opts.ipv4_options = vec![1, 1, 1, 1, 0x94, 4, 0, 0];
    frames.push(("ipv4 tcp with options", opts));
    let mut ext = PacketSpec::udp(a6, h6, 1, 53);
    ext.ipv6_ext = vec![
        Ext::options(0),
        Ext::options(60),
        Ext::fragment(0, false, 1),
    ];
    frames.push(("ipv6 ext chain udp", ext));
    let mut qinq = PacketSpec::tcp(a4, h4, 1, 80);
    qinq.vlans = vec![10, 20];
    frames.push(("qinq ipv4 tcp", qinq));
    let mut checked = 0;
    let mut passed = Vec::new();
    for (name, spec) in frames {
        let full = spec.build().bytes;
        let r = instance.ingress(&full)?.ensure_recorded()?.reason;
        assert!(
            reason::passes(r),
            "{name}: the whole frame passes ({})",
            reason::name(r)
        );
        for len in 14..full.len() {
            let r = instance.ingress(&full[..len])?.ensure_recorded()?.reason;
            checked += 1;
            if reason::passes(r) {
                passed.push(format!(
                    "{name} cut to {len} of {} bytes: {}",
                    full.len(),
                    reason::name(r)
                ));
            }
        }
    }
    eprintln!("{checked} truncated frames, {} passed", passed.len());
    assert!(checked > 400);
    assert!(
        passed.is_empty(),
        "truncated frames passed:\n{}",
        passed.join("\n")
    );
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn every_fragmentation_of_an_allowed_datagram_passes() -> anyhow::Result<()> {
    // Only udp/53, tcp/80 and ICMP echo are allowed: a passing follower
    // passes because its leader did, never by default.
    let policy = Policy::from_str(
        "version = 1\n[defaults]\ningress = \"drop\"\nestablished = false\n[roles.r]\nhosts = \"any\"\n\
         [[roles.r.ingress]]\nfrom = \"any\"\nudp = [53]\ntcp = [80]\n",
        "frag.toml",
    )?;
    // A record instance: it remembers leading fragments like a live one.
    let mut instance = Instance::with_policy(&policy, &["r".to_string()], "eth0", RUN_RECORD)?;
    let a4: IpAddr = "198.18.0.2".parse()?;
    let a6: IpAddr = "fd00:18::2".parse()?;
    let h4: IpAddr = "198.18.0.1".parse()?;
    let h6: IpAddr = "fd00:18::1".parse()?;
    let with = |mut s: PacketSpec, len: usize, ext: Vec<Ext>| {
        s.payload = (0..len).map(|i| i as u8).collect();
        s.ipv6_ext = ext;
        s
    };
    let dest = || Ext::options(60);
    let hop = || Ext::options(0);
    // (name, datagram, unfragmentable IPv6 headers, allowed)
    let datagrams = [
        (
            "ipv4 udp 3000",
            with(PacketSpec::udp(a4, h4, 1, 53), 3000, vec![]),
            0,
            true,
        ),
        (
            "ipv4 tcp 2000",
            with(PacketSpec::tcp(a4, h4, 1, 80), 2000, vec![]),
            0,
            true,
        ),
        (
            "ipv4 echo 4000",
            with(PacketSpec::echo(a4, h4), 4000, vec![]),
            0,
            true,
        ),
        (
            "ipv6 udp 3000",
            with(PacketSpec::udp(a6, h6, 1, 53), 3000, vec![]),
            0,
            true,
        ),
        (
            "ipv6 udp 3000, hop-by-hop before and destination options after the fragment header",
            with(PacketSpec::udp(a6, h6, 1, 53), 3000, vec![hop(), dest()]),
            1,
            true,
        ),
        (
            "ipv6 echo 4000",
            with(PacketSpec::echo(a6, h6), 4000, vec![]),
            0,
            true,
        ),
        (
            "ipv4 udp 3000 to a closed port",
            with(PacketSpec::udp(a4, h4, 1, 54), 3000, vec![]),
            0,
            false,
        ),
        (
            "ipv6 udp 3000 to a closed port",
            with(PacketSpec::udp(a6, h6, 1, 54), 3000, vec![dest()]),
            0,
            false,
        ),
    ];
    let mut id = 0x1000u32;
    let (mut runs, mut ways) = (0usize, 0usize);
    let mut wrong = Vec::new();
    for (name, spec, unfrag, allowed) in &datagrams {
        // The fragmentable part: IPv4 payload, or what follows the
        // unfragmentable IPv6 headers.
        let whole = spec.build();
        let unfrag_len: usize = spec.ipv6_ext[..*unfrag]
            .iter()
            .map(|e| 1 + e.body.len())
            .sum();
        let part = if spec.src.is_ipv4() {
            whole.bytes.len() - whole.l3 - 20
        } else {
            whole.bytes.len() - whole.l3 - 40 - unfrag_len
        };
        // The leading fragment must hold the transport header (and any
        // fragmentable extension headers before it); smaller ones are the
        // tiny-fragment attack and must be dropped (checked below).
        let header = whole.l4
            - whole.l3
            - if spec.src.is_ipv4() {
                20
            } else {
                40 + unfrag_len
            }
            + if spec.proto == segbpf_common::IPPROTO_TCP {
                20
            } else {
                8
            };
        for first in (8..part.min(1480)).step_by(8) {
            // Followers as a path's MTU cuts them (BPF_PROG_TEST_RUN hands
            // an XDP program at most a page, like a driver).
            for chunk in [1480usize, 1232, 512] {
                let mut cuts = vec![first];
                while cuts.last().is_some_and(|&c| c + chunk < part) {
                    cuts.push(cuts.last().copied().unwrap_or(0) + chunk);
                }
                id += 1;
                ways += 1;
                let frags = spec.fragments(*unfrag, &cuts, id);
                for (i, f) in frags.iter().enumerate() {
                    let r = instance.ingress(&f.bytes)?.ensure_recorded()?.reason;
                    runs += 1;
                    let want_pass = *allowed && first >= header;
                    let ok = if i == 0 {
                        reason::passes(r) == want_pass
                    } else if want_pass {
                        r == reason::PASS_FRAG
                    } else {
                        r == reason::DROP_FRAGMENT
                    };
                    if !ok {
                        wrong.push(format!(
                            "{name}: first fragment {first} bytes, then {chunk}: fragment {i} of {} got {}",
                            frags.len(),
                            reason::name(r)
                        ));
                    }
                }
            }
        }
    }
    eprintln!(
        "{ways} ways of fragmenting, {runs} fragments, {} wrong",
        wrong.len()
    );
    assert!(ways > 3000, "only {ways} fragmentations tried");
    wrong.truncate(40);
    assert!(
        wrong.is_empty(),
        "fragments misjudged:\n{}",
        wrong.join("\n")
    );
    Ok(())
}

/// The mark of the packets the harness sends as the enforcing host.
const HOST_MARK: u32 = 0x5e9b;

/// The harness's own table in the enforcing namespace: `seen` counters
/// before any other hook (prerouting, output) count every test packet
/// that reached nftables at all, and every IP packet of the namespace's
/// own (answers to the test packets: RSTs, port unreachables, echo
/// replies; router solicitations, MLD reports) is dropped before conntrack
/// and the exported ruleset see it: the harness sends every packet of the
/// host itself, marked. (IPv4 neighbours are found with ARP, outside
/// `inet`; the IPv6 next hop is a permanent neighbour entry.)
fn harness_table(tx_mac: [u8; 6]) -> String {
    let mac: Vec<String> = tx_mac.iter().map(|b| format!("{b:02x}")).collect();
    let mac = mac.join(":");
    format!(
        "table inet segbpf_harness\ndelete table inet segbpf_harness\n\
         table inet segbpf_harness {{\n\
         chain pre {{ type filter hook prerouting priority -400; policy accept; ether saddr {mac} counter comment \"seen\"; }}\n\
         chain quiet {{ type filter hook output priority -500; policy accept; oifname \"eth0\" meta mark != {HOST_MARK:#x} drop; }}\n\
         chain out {{ type filter hook output priority -400; policy accept; meta mark {HOST_MARK:#x} counter comment \"seen\"; }}\n\
         }}\n"
    )
}

/// Packet counts of every counted rule in the namespace, keyed
/// `table/chain/comment`. A counted rule without a comment is an error:
/// the harness could not say where a packet went.
fn nft_counters(ns: &str) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-j", "list", "ruleset"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "nft list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut m = std::collections::BTreeMap::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let rule = &item["rule"];
        let Some(exprs) = rule["expr"].as_array() else {
            continue;
        };
        let counters: Vec<u64> = exprs
            .iter()
            .filter_map(|e| e["counter"]["packets"].as_u64())
            .collect();
        if counters.is_empty() {
            continue;
        }
        let comment = rule["comment"].as_str().ok_or_else(|| {
            anyhow::anyhow!(
                "a counted rule without a comment (handle {})",
                rule["handle"]
            )
        })?;
        let key = format!(
            "{}/{}/{comment}",
            rule["table"].as_str().unwrap_or("?"),
            rule["chain"].as_str().unwrap_or("?")
        );
        *m.entry(key).or_insert(0) += counters.iter().sum::<u64>();
    }
    Ok(m)
}

/// One packet of a case: its frame, its direction, and what it means to
/// the harness's model of the tracked flows.
struct Step {
    /// Direction seen from the enforcing host.
    dir: Direction,
    spec: PacketSpec,
    /// The flow it belongs to (peer, protocol, host port or echo id, peer port).
    flow: Option<Flow>,
    /// For an ICMP error: the flow of the packet it quotes.
    quotes: Option<Flow>,
}

/// Whether a packet that passes opens a flow (as segbpf's `ct::opens_flow`
/// says): a TCP SYN without ACK, any UDP datagram, an echo request.
fn opens(spec: &PacketSpec) -> bool {
    let v6 = spec.src.is_ipv6();
    match spec.proto {
        6 => spec.tcp_flags & 0x12 == 0x02,
        17 => true,
        p => p == icmp_proto(v6) && spec.icmp_type == echo_types(v6).0,
    }
}

/// A flow as the harness tracks it: (protocol, peer, host port or echo
/// id, peer port or 0).
type Flow = (u8, IpAddr, u16, u16);

fn host_addr(peer: IpAddr) -> IpAddr {
    host_of(peer)
}

fn is_icmp_error(v6: bool, t: u8) -> bool {
    if v6 {
        matches!(t, 1..=4)
    } else {
        matches!(t, 3 | 11 | 12)
    }
}

fn echo_types(v6: bool) -> (u8, u8) {
    if v6 { (128, 129) } else { (8, 0) }
}

fn icmp_proto(v6: bool) -> u8 {
    if v6 { 58 } else { 1 }
}

/// A first packet from `peer` (as the kernel sweep makes them).
fn first_packet(peer: IpAddr, proto: u8, sport: u16, dport: u16, icmp_type: u8) -> Step {
    let mut spec = PacketSpec::new(peer, host_addr(peer), proto);
    spec.sport = sport;
    spec.dport = dport;
    spec.tcp_flags = 0x02;
    spec.tcp_seq = 1000;
    spec.icmp_type = icmp_type;
    if proto == 17 {
        spec.payload = b"segbpf".to_vec();
    }
    let v6 = peer.is_ipv6();
    let echo_req = proto == icmp_proto(v6) && icmp_type == echo_types(v6).0;
    let flow = match proto {
        6 | 17 => Some((proto, peer, dport, sport)),
        _ if echo_req => Some((proto, peer, sport, 0)),
        _ => None,
    };
    Step {
        dir: Direction::Ingress,
        spec,
        flow,
        quotes: None,
    }
}

/// The packet after `p` in the same flow, from the other side: a TCP
/// SYN-ACK or ACK, a UDP datagram, an echo reply or the next request.
fn next_in_flow(p: &Step, dir: Direction) -> Step {
    let mut spec = p.spec.clone();
    std::mem::swap(&mut spec.src, &mut spec.dst);
    if p.spec.proto == 6 || p.spec.proto == 17 {
        std::mem::swap(&mut spec.sport, &mut spec.dport);
    }
    match p.spec.proto {
        6 => {
            if p.spec.tcp_flags == 0x02 {
                spec.tcp_flags = 0x12;
                spec.tcp_seq = 5000;
            } else {
                spec.tcp_flags = 0x10;
                spec.tcp_seq = p.spec.tcp_ack;
            }
            spec.tcp_ack = p.spec.tcp_seq.wrapping_add(1);
        }
        1 | 58 => {
            let v6 = p.spec.src.is_ipv6();
            let (req, reply) = echo_types(v6);
            spec.icmp_type = if p.spec.icmp_type == req { reply } else { req };
        }
        _ => {}
    }
    Step {
        dir,
        spec,
        flow: p.flow,
        quotes: None,
    }
}

/// An ICMP error from `from` to the host quoting `quoted` (a packet the
/// host sent): its IP header and the first 8 bytes after it.
fn error_quoting(from: IpAddr, icmp_type: u8, quoted: &Step) -> Step {
    let built = quoted.spec.build();
    let ip = &built.bytes[built.l3..];
    let hlen = built.l4 - built.l3;
    let v6 = from.is_ipv6();
    let mut spec = PacketSpec::new(from, host_addr(from), icmp_proto(v6));
    spec.icmp_type = icmp_type;
    spec.sport = 0;
    spec.payload = ip[..(hlen + 8).min(ip.len())].to_vec();
    Step {
        dir: Direction::Ingress,
        spec,
        flow: None,
        quotes: quoted.flow,
    }
}

/// What a label of segbpf's reasons is called in the export's comments.
fn segbpf_label(policy: &Policy, reason_code: u8, rule: Option<u32>, dir: Direction) -> String {
    match reason_code {
        reason::PASS_RULE => rule
            .and_then(|r| policy.rules.get(r as usize))
            .map_or_else(|| "rule ?".to_string(), segbpf::policy::Rule::label),
        reason::PASS_ICMP => "icmp-default".to_string(),
        reason::PASS_CT => "established".to_string(),
        reason::PASS_RELATED => "icmp-related".to_string(),
        reason::PASS_DEFAULT => "default-accept".to_string(),
        reason::DROP_DEFAULT => "default-drop".to_string(),
        r => format!("{} ({dir:?})", reason::name(r)),
    }
}

/// The model's verdict: the reference evaluator for what it judges
/// (rules, the ICMP default, the defaults), plus the tracked flows the
/// harness keeps: a later packet of a tracked flow is `established`, an
/// ICMP error of the related types quoting one is `icmp-related` (after
/// the rules, as in segbpf).
fn model_label(
    policy: &Policy,
    roles: &[String],
    tracked: &std::collections::BTreeSet<Flow>,
    s: &Step,
) -> (String, bool) {
    let d = &policy.defaults;
    let v6 = s.spec.src.is_ipv6();
    if d.established && s.quotes.is_none() && s.flow.is_some_and(|f| tracked.contains(&f)) {
        return ("established".to_string(), true);
    }
    let proto = s.spec.proto;
    let pkt = eval::Packet {
        src: s.spec.src,
        dst: s.spec.dst,
        proto,
        dport: if matches!(proto, 6 | 17) {
            s.spec.dport
        } else {
            0
        },
        icmp_type: s.spec.icmp_type,
        hop_limit: s.spec.ttl,
    };
    let want = eval::evaluate(policy, roles, Some("eth0"), s.dir, &pkt);
    if want.reason != reason::PASS_RULE
        && d.icmp
        && d.established
        && proto == icmp_proto(v6)
        && is_icmp_error(v6, s.spec.icmp_type)
        && s.quotes.is_some_and(|f| tracked.contains(&f))
    {
        return ("icmp-related".to_string(), true);
    }
    (
        segbpf_label(policy, want.reason, want.rule, s.dir),
        want.passes(),
    )
}

#[test]
#[ignore = "needs root, a kernel with BPF and nftables: run `cargo xtask test`"]
fn nftables_export_agrees_on_sampled_cases_with_real_packets() -> anyhow::Result<()> {
    for seed in seeds() {
        nftables_export_agrees(seed)?;
    }
    Ok(())
}

/// Random policies; for each, cases of one to three packets sent for real
/// through `export nft` loaded in a namespace, through segbpf
/// (BPF_PROG_TEST_RUN on a record instance, which keeps connection state
/// like a live one), and judged by the model (the reference evaluator plus
/// the flows the harness tracks). The three must name the same rule or
/// default for every packet. Cases: a first packet (any protocol, any
/// ICMP type, echo replies nobody asked for included); a flow the peer
/// opens, the host's reply, the peer's next packet (established traffic);
/// a flow the host opens and the peer's reply; an ICMP error quoting a
/// tracked flow or one nobody opened.
fn nftables_export_agrees(seed: u64) -> anyhow::Result<()> {
    use segbpf_tests::{Lab, net};
    let want_cases = env_u64("SEGBPF_DIFF_NFT_CASES", 240);
    let per_policy = 10;
    let mut lab = Lab::new("dn")?;
    lab.quiet_switch()?;
    lab.add_host("rx", &["10.0.0.1/8", "fd00:99::1/64"])?;
    lab.add_host("tx", &["10.0.0.2/8"])?;
    lab.quiet_host("tx")?;
    let rx_ns = lab.host("rx").ns.name.clone();
    let tx_ns = lab.host("tx").ns.name.clone();
    let rx_mac = net::mac(&rx_ns, "eth0")?;
    let tx_mac = net::mac(&tx_ns, "eth0")?;
    // The host's own packets go to the peers' networks through tx; the
    // frames' checksums are not filled in, so conntrack must not judge
    // them (it would call them invalid, not segbpf).
    let mac = tx_mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let rx = &lab.host("rx").ns;
    rx.ip(&["route", "add", "198.16.0.0/14", "via", "10.0.0.2"])?;
    rx.ip(&[
        "-6",
        "neigh",
        "replace",
        "fd00:99::2",
        "lladdr",
        &mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    rx.ip(&["-6", "route", "add", "fd00::/8", "via", "fd00:99::2"])?;
    segbpf_tests::netns::sh(
        "ip",
        &[
            "netns",
            "exec",
            &rx_ns,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.conf.all.rp_filter=0",
            "-w",
            "net.ipv4.conf.eth0.rp_filter=0",
            "-w",
            "net.ipv4.conf.default.rp_filter=0",
        ],
    )?;
    let nft_load = |text: &str| -> anyhow::Result<()> {
        let mut load = std::process::Command::new("ip")
            .args(["netns", "exec", &rx_ns, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()?;
        std::io::Write::write_all(load.stdin.as_mut().expect("stdin"), text.as_bytes())?;
        drop(load.stdin.take());
        anyhow::ensure!(load.wait()?.success(), "nft -f failed on:\n{text}");
        Ok(())
    };
    nft_load(&harness_table(tx_mac))?;
    segbpf_tests::netns::sh(
        "ip",
        &[
            "netns",
            "exec",
            &rx_ns,
            "sysctl",
            "-q",
            "-w",
            "net.netfilter.nf_conntrack_checksum=0",
        ],
    )?;
    let sender = net::RawSender::open(&tx_ns, "eth0")?;
    let out4 = net::RawIpSender::open(&rx_ns, false, HOST_MARK)?;
    let out6 = net::RawIpSender::open(&rx_ns, true, HOST_MARK)?;
    let mut instance = Instance::load(RUN_RECORD)?;
    let mut pm = PolicyMaps::from_ebpf(instance.ebpf())?;
    let mut rng = Rng::new(seed ^ 0x6e66);
    let (mut done, mut packets, mut policies) = (0u64, 0u64, 0u64);
    let mut mismatches = Vec::new();
    let mut sport = 20000u16;
    let mut next_port = || {
        sport = sport.wrapping_add(1).max(20000);
        sport
    };
    let mut seen_verdicts = std::collections::BTreeSet::new();
    let mut counters: std::collections::BTreeMap<String, u64>;
    while done < want_cases {
        let mut generated = generate::policy(&mut rng);
        if policies % 2 == 0 {
            // Every other policy tracks flows and has the ICMP default,
            // so that every run checks established traffic and errors
            // about tracked flows, whatever the seed.
            generated.text = generated
                .text
                .replace("\nicmp = false\n", "\nicmp = true\n")
                .replace("\nestablished = false\n", "\nestablished = true\n");
        }
        let policy = Policy::from_str(&generated.text, "generated.toml")?;
        let nroles = 1 + rng.below(generated.roles.len() as u64) as usize;
        let roles: Vec<String> = generated.roles[..nroles].to_vec();
        nft_load(&segbpf::policy::export::nft(
            &policy,
            &roles,
            Some("eth0"),
            "segbpf",
        ))?;
        let slot = (policies % 2) as u8;
        let compiled = compile::compile(
            &policy,
            &roles,
            Some("eth0"),
            slot,
            policies + 1,
            Capacity::default(),
        )?;
        pm.clear_slot(slot)?;
        pm.write_slot(&compiled)?;
        pm.activate(slot)?;
        policies += 1;
        counters = nft_counters(&rx_ns)?;
        let mut tracked = std::collections::BTreeSet::new();
        let mut here = 0;
        while here < per_policy {
            let (src, proto, dport, icmp_type) = generate::packet(&mut rng, &generated);
            // ICMP of the other family is judged by number in segbpf and by
            // family in nftables' `icmp type`: not a comparable case.
            if (proto == 1 && src.is_ipv6()) || (proto == 58 && src.is_ipv4()) {
                continue;
            }
            let v6 = src.is_ipv6();
            let kind = rng.below(10);
            // A flow's opener: TCP SYN, UDP, or an echo request. For the
            // established and error cases, one the policy most often lets
            // in, so that flows are tracked.
            let opener = |rng: &mut Rng, sport: u16| {
                let mut best = None;
                for _ in 0..20 {
                    let (src, proto, dport, _) = generate::packet(rng, &generated);
                    if src.is_ipv6() != v6 || !matches!(proto, 6 | 17 | 1 | 58) {
                        continue;
                    }
                    let proto = if matches!(proto, 1 | 58) {
                        icmp_proto(v6)
                    } else {
                        proto
                    };
                    let first = first_packet(src, proto, sport, dport, echo_types(v6).0);
                    let untracked = std::collections::BTreeSet::new();
                    let passes = model_label(&policy, &roles, &untracked, &first).1;
                    best = Some(first);
                    if passes {
                        break;
                    }
                }
                best
            };
            let steps: Vec<Step> = match kind {
                // The peer opens, the host answers, the peer goes on.
                0 | 1 => {
                    let Some(p1) = opener(&mut rng, next_port()) else {
                        continue;
                    };
                    let reply = next_in_flow(&p1, Direction::Egress);
                    let p2 = next_in_flow(&reply, Direction::Ingress);
                    vec![p1, reply, p2]
                }
                // The host opens, the peer answers.
                2 | 3 => {
                    let Some(opened) = opener(&mut rng, next_port()) else {
                        continue;
                    };
                    // The same flow the other way round: the host opens it.
                    let mut h1 = next_in_flow(&opened, Direction::Egress);
                    h1.spec.tcp_flags = 0x02;
                    h1.spec.tcp_seq = 7000;
                    h1.spec.tcp_ack = 0;
                    h1.spec.icmp_type = echo_types(v6).0;
                    let peer = opened.spec.src;
                    h1.flow = match h1.spec.proto {
                        6 | 17 => Some((h1.spec.proto, peer, h1.spec.sport, h1.spec.dport)),
                        _ => Some((h1.spec.proto, peer, h1.spec.sport, 0)),
                    };
                    let answer = next_in_flow(&h1, Direction::Ingress);
                    vec![h1, answer]
                }
                // An ICMP error quoting a flow: one the peer opened (and
                // the host answered, the packet quoted), or one nobody
                // opened.
                4..=6 => {
                    let Some(p1) = opener(&mut rng, next_port()) else {
                        continue;
                    };
                    let reply = next_in_flow(&p1, Direction::Egress);
                    let from = if rng.chance(2, 3) {
                        p1.spec.src
                    } else {
                        generate::packet(&mut rng, &generated).0
                    };
                    if from.is_ipv6() != v6 {
                        continue;
                    }
                    let err_type = if rng.chance(3, 4) {
                        *rng.pick(if v6 {
                            &[1u8, 2, 3, 4][..]
                        } else {
                            &[3u8, 11, 12][..]
                        })
                    } else {
                        generate::icmp_type(&mut rng, v6)
                    };
                    let error = error_quoting(from, err_type, &reply);
                    if rng.chance(1, 3) {
                        vec![error]
                    } else {
                        vec![p1, reply, error]
                    }
                }
                _ => vec![first_packet(src, proto, next_port(), dport, icmp_type)],
            };
            let mut trail = Vec::new();
            for step in &steps {
                let (want, want_passes) = model_label(&policy, &roles, &tracked, step);
                // segbpf
                let frame = step.spec.build().bytes;
                let verdict = instance.run(step.dir, &frame)?.ensure_recorded()?;
                let got = segbpf_label(&policy, verdict.reason, verdict.rule(), step.dir);
                // nftables, with a real packet
                let chain = match step.dir {
                    Direction::Ingress => {
                        let mut wire = frame.clone();
                        wire[..6].copy_from_slice(&rx_mac);
                        wire[6..12].copy_from_slice(&tx_mac);
                        sender.send(&wire)?;
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        "segbpf/input/"
                    }
                    Direction::Egress => {
                        let ip = &frame[14..];
                        // False when the output chain dropped it (EPERM):
                        // the counters say which rule did.
                        let _ = if v6 { &out6 } else { &out4 }.send(step.spec.dst, ip)?;
                        std::thread::sleep(std::time::Duration::from_millis(2));
                        "segbpf/output/"
                    }
                };
                let after = nft_counters(&rx_ns)?;
                let moved: Vec<(String, u64)> = after
                    .iter()
                    .filter_map(|(k, v)| {
                        let delta = v - counters.get(k).copied().unwrap_or(0);
                        (delta > 0).then(|| (k.clone(), delta))
                    })
                    .collect();
                counters = after;
                let seen_key = match step.dir {
                    Direction::Ingress => "segbpf_harness/pre/seen",
                    Direction::Egress => "segbpf_harness/out/seen",
                };
                let seen = moved.iter().find(|(k, _)| k == seen_key).map_or(0, |m| m.1);
                let decided: Vec<&str> = moved
                    .iter()
                    .filter_map(|(k, _)| k.strip_prefix(chain))
                    .collect();
                // Every packet accounted for: it reached nftables, and
                // exactly one counted rule of the chain decided it.
                let nft = match (seen, decided.as_slice()) {
                    (0, _) => "HARNESS ERROR: the kernel dropped it before nftables".to_string(),
                    (1, [one]) => (*one).to_string(),
                    (1, []) => "HARNESS ERROR: no counter moved".to_string(),
                    _ => format!("HARNESS ERROR: counters moved {moved:?}"),
                };
                packets += 1;
                seen_verdicts.insert(want.clone());
                trail.push(format!(
                    "  {:?} {} -> {} proto {} ports {}->{} flags {:#x} icmp {}: model `{want}`, segbpf `{got}`, nftables `{nft}`",
                    step.dir,
                    step.spec.src,
                    step.spec.dst,
                    step.spec.proto,
                    step.spec.sport,
                    step.spec.dport,
                    step.spec.tcp_flags,
                    step.spec.icmp_type
                ));
                if (want != got || want != nft) && mismatches.len() < 5 {
                    mismatches.push(format!(
                        "seed {seed} (reproduce: cargo xtask fuzz-diff --seed {seed}), roles {roles:?}, case:\n{}\n--- policy ---\n{}",
                        trail.join("\n"),
                        generated.text
                    ));
                }
                if want_passes
                    && policy.defaults.established
                    && let Some(flow) = step.flow
                    && opens(&step.spec)
                {
                    tracked.insert(flow);
                }
            }
            here += 1;
            done += 1;
        }
    }
    eprintln!(
        "seed {seed}: {done} nftables cases, {packets} real packets, {} mismatches, verdicts seen {seen_verdicts:?}",
        mismatches.len()
    );
    for v in [
        "established",
        "icmp-related",
        "icmp-default",
        "default-drop",
    ] {
        assert!(
            seen_verdicts.contains(v),
            "the cases exercise `{v}`: {seen_verdicts:?}"
        );
    }
    assert!(
        seen_verdicts.iter().any(|v| v.contains(".ingress[")),
        "the cases exercise rules: {seen_verdicts:?}"
    );
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n\n"));
    Ok(())
}
