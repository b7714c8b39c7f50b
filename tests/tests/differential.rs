//! Differential testing: random policies and packets (seeded, see
//! `segbpf_tests::generate`) judged by (a) the reference evaluator and (b) the
//! kernel program through BPF_PROG_TEST_RUN must agree on the verdict,
//! the reason and the rule. Every mismatch prints a reproducer (seed,
//! policy text, roles, packet). CI runs a fixed seed with at least 10,000
//! cases; `cargo xtask fuzz-diff --cases N --seed S` runs more
//! (`SEGBPF_DIFF_CASES`, `SEGBPF_DIFF_SEED`).
//!
//! Also here: a truncation sweep — well-formed frames cut at every length
//! from the Ethernet header on must never pass (nothing the parser cannot
//! fully validate is allowed) — and its counterpart, a fragmentation sweep:
//! every way of fragmenting an allowed datagram passes whole, and no
//! fragment of a denied one passes.
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::net::IpAddr;

use segbpf::{
    compile::{self, Capacity},
    maps::PolicyMaps,
    packet::{Ext, PacketSpec},
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
    let cases = env_u64("SEGBPF_DIFF_CASES", 12_000);
    let seed = env_u64("SEGBPF_DIFF_SEED", 0x5e9b_f00d);
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
                    "seed {seed:#x}, policy #{policies}, roles {roles:?}, packet {src} -> {dst} proto {proto} dport {dport} icmp {icmp_type}: evaluator {} rule {:?}, kernel {} rule {}\n--- policy ---\n{}",
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
        "{done} cases over {policies} random policies ({passes} allowed): {} mismatches",
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

/// Counter values of the segbpf table's input chain, by rule comment.
fn nft_counters(ns: &str) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", ns, "nft", "-j", "list", "chain", "inet", "segbpf", "input",
        ])
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
        let (Some(comment), Some(exprs)) = (rule["comment"].as_str(), rule["expr"].as_array())
        else {
            continue;
        };
        let packets: u64 = exprs
            .iter()
            .filter_map(|e| e["counter"]["packets"].as_u64())
            .sum();
        *m.entry(comment.to_string()).or_insert(0) += packets;
    }
    Ok(m)
}

#[test]
#[ignore = "needs root, a kernel with BPF and nftables: run `cargo xtask test`"]
fn nftables_export_agrees_on_sampled_cases_with_real_packets() -> anyhow::Result<()> {
    use segbpf_tests::{Lab, net};
    let seed = env_u64("SEGBPF_DIFF_SEED", 0x5e9b_f00d) ^ 0x6e66;
    let want_cases = env_u64("SEGBPF_DIFF_NFT_CASES", 240);
    let per_policy = 30;
    let mut lab = Lab::new("dn")?;
    lab.quiet_switch()?;
    lab.add_host("rx", &["10.0.0.1/8", "fd00:99::1/64"])?;
    lab.add_host("tx", &["10.0.0.2/8"])?;
    lab.quiet_host("tx")?;
    let rx_ns = lab.host("rx").ns.name.clone();
    let tx_ns = lab.host("tx").ns.name.clone();
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
    let rx_mac = net::mac(&rx_ns, "eth0")?;
    let tx_mac = net::mac(&tx_ns, "eth0")?;
    let sender = net::RawSender::open(&tx_ns, "eth0")?;
    let mut rng = Rng::new(seed);
    let (mut done, mut mismatches, mut sport) = (0u64, Vec::new(), 20000u16);
    let mut seen_verdicts = std::collections::BTreeSet::new();
    while done < want_cases {
        let g = generate::policy(&mut rng);
        let policy = Policy::from_str(&g.text, "generated.toml")?;
        let n = 1 + rng.below(g.roles.len() as u64) as usize;
        let roles: Vec<String> = g.roles[..n].to_vec();
        let ruleset = segbpf::export::nft(&policy, &roles, Some("eth0"), "segbpf");
        let mut load = std::process::Command::new("ip")
            .args(["netns", "exec", &rx_ns, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()?;
        std::io::Write::write_all(load.stdin.as_mut().expect("stdin"), ruleset.as_bytes())?;
        drop(load.stdin.take());
        anyhow::ensure!(load.wait()?.success(), "nft -f failed on:\n{ruleset}");
        let mut here = 0;
        while here < per_policy {
            let (src, proto, dport, icmp_type) = generate::packet(&mut rng, &g);
            // ICMP of the other family is judged by number in segbpf and by
            // family in nftables' `icmp type`: not a comparable case.
            if (proto == 1 && src.is_ipv6()) || (proto == 58 && src.is_ipv4()) {
                continue;
            }
            let dst: IpAddr = if src.is_ipv4() {
                "10.0.0.1".parse()?
            } else {
                "fd00:99::1".parse()?
            };
            sport = sport.wrapping_add(1).max(20000);
            let mut spec = PacketSpec::new(src, dst, proto);
            spec.sport = sport; // a new flow every time (no conntrack state)
            spec.dport = dport;
            spec.tcp_flags = 0x02;
            spec.icmp_type = icmp_type;
            let mut frame = spec.build().bytes;
            frame[..6].copy_from_slice(&rx_mac);
            frame[6..12].copy_from_slice(&tx_mac);
            let pkt = eval::Packet {
                src,
                dst,
                proto,
                dport: if matches!(proto, 6 | 17) { dport } else { 0 },
                icmp_type,
                hop_limit: 64,
            };
            let want = eval::evaluate(&policy, &roles, Some("eth0"), Direction::Ingress, &pkt);
            let want_label = match want.reason {
                reason::PASS_RULE => policy.rules[want.rule.unwrap_or(0) as usize].label(),
                reason::PASS_ICMP => "icmp-default".to_string(),
                reason::PASS_DEFAULT => "default-accept".to_string(),
                _ => "default-drop".to_string(),
            };
            let before = nft_counters(&rx_ns)?;
            sender.send(&frame)?;
            std::thread::sleep(std::time::Duration::from_millis(15));
            let after = nft_counters(&rx_ns)?;
            let moved: Vec<&String> = after
                .iter()
                .filter(|(k, v)| before.get(*k).copied().unwrap_or(0) < **v)
                .map(|(k, _)| k)
                .collect();
            seen_verdicts.insert(want_label.clone());
            if moved != vec![&want_label] && mismatches.len() < 5 {
                mismatches.push(format!(
                    "seed {seed:#x}: roles {roles:?}, {src} -> {dst} proto {proto} dport {dport} icmp {icmp_type}: evaluator/segbpf `{want_label}`, nftables counters moved {moved:?}\n--- policy ---\n{}",
                    g.text
                ));
            }
            here += 1;
            done += 1;
        }
    }
    eprintln!(
        "{done} nftables cases with real packets, {} mismatches, verdicts seen {seen_verdicts:?}",
        mismatches.len()
    );
    assert!(
        seen_verdicts.len() >= 3,
        "the cases exercise rules and defaults: {seen_verdicts:?}"
    );
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n\n"));
    Ok(())
}
