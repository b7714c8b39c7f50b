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
//! fully validate is allowed).

use std::net::IpAddr;

use aya::programs::{TestRun as _, TestRunOptions};
use segbpf::{
    compile::{self, Capacity},
    loader,
    maps::{self, PolicyMaps},
    packet::{Ext, PacketSpec},
    policy::{Direction, Policy, eval},
};
use segbpf_common::{NO_RULE, RUN_DRY, reason};
use segbpf_tests::generate::{self, Rng};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn run(ebpf: &mut aya::Ebpf, frame: &[u8]) -> anyhow::Result<(u8, u32)> {
    loader::xdp(ebpf)?.test_run(TestRunOptions {
        data_in: Some(frame),
        ..TestRunOptions::new()
    })?;
    let t = maps::take_trace(ebpf)?;
    anyhow::ensure!(t.valid == 1, "no decision recorded");
    Ok((t.reason, t.rule_id))
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
    let mut ebpf = loader::load(Capacity::default(), RUN_DRY)?;
    let mut pm = PolicyMaps::from_ebpf(&ebpf)?;
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
            let got = run(&mut ebpf, &spec.build().bytes)?;
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
    let c = compile::compile(
        &policy,
        &["r".to_string()],
        Some("eth0"),
        0,
        1,
        Capacity::default(),
    )?;
    let mut ebpf = loader::load(Capacity::default(), RUN_DRY)?;
    maps::write_policy(&mut ebpf, &c)?;
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
        let (r, _) = run(&mut ebpf, &full)?;
        assert!(
            reason::passes(r),
            "{name}: the whole frame passes ({})",
            reason::name(r)
        );
        for len in 14..full.len() {
            let (r, _) = run(&mut ebpf, &full[..len])?;
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
