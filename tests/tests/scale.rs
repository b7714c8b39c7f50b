//! Capacity in the real kernel: 1,000,000 prefixes per family and 1,024
//! rules per direction load, and packets still get the evaluator's verdict
//! through BPF_PROG_TEST_RUN (the per-packet work stays two lookups).
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::{fmt::Write as _, net::IpAddr, time::Instant};

use segbpf::{
    host::packet::PacketSpec,
    policy::{Direction, Policy, eval},
};
use segbpf_common::{IPPROTO_TCP, NO_RULE};
use segbpf_tests::harness::{self, Instance};

fn check(
    instance: &mut Instance,
    policy: &Policy,
    roles: &[String],
    dir: Direction,
    src: IpAddr,
    dst: IpAddr,
    dport: u16,
) -> anyhow::Result<()> {
    let frame = PacketSpec::tcp(src, dst, 40000, dport).build().bytes;
    let got = instance.ingress(&frame)?.ensure_recorded()?;
    let (reason, rule) = (got.reason, got.rule_id);
    let pkt = eval::Packet {
        src,
        dst,
        proto: IPPROTO_TCP,
        dport,
        icmp_type: 0,
        hop_limit: 64,
    };
    let want = eval::evaluate(policy, roles, Some("eth0"), dir, &pkt);
    assert_eq!(
        (reason, rule),
        (want.reason, want.rule.unwrap_or(NO_RULE)),
        "{src} -> {dst}:{dport}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn one_million_prefixes_per_family() -> anyhow::Result<()> {
    // Every other address, so no two merge into a shorter prefix.
    let mut text = String::from("version = 1\n[sets]\nbig = [");
    for i in 0..1_000_000u32 {
        let v4 = std::net::Ipv4Addr::from(0x0a00_0000 + 2 * i);
        let v6 = std::net::Ipv6Addr::from(
            0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + 2 * u128::from(i),
        );
        write!(text, "\"{v4}\",\"{v6}\",")?;
    }
    text.push_str(
        "]\n[roles.r]\nhosts = \"any\"\n[[roles.r.ingress]]\nfrom = \"big\"\ntcp = [443]\n",
    );
    let policy = Policy::from_str(&text, "big.toml")?;
    let roles = vec!["r".to_string()];
    let t0 = Instant::now();
    let c = harness::compile(&policy, &roles, "eth0")?;
    assert_eq!(c.peers_v4.len(), 1_000_000);
    assert_eq!(c.peers_v6.len(), 1_000_000);
    let t1 = Instant::now();
    let mut instance = Instance::with_compiled(&c, segbpf_common::RUN_DRY)?;
    eprintln!(
        "compile {:?}, load + 2,000,000 trie inserts {:?}",
        t1 - t0,
        t1.elapsed()
    );
    let host: IpAddr = "192.0.2.1".parse()?;
    let host6: IpAddr = "2001:db8::1".parse()?;
    for (src, dst) in [
        ("10.0.0.0", host),
        ("10.0.0.1", host),
        ("10.30.132.126", host), // 2 * 999,999 past 10.0.0.0: the last member
        ("10.30.132.127", host),
        ("fd00::", host6),
        ("fd00::1", host6),
        ("fd00::1e:847e", host6),
        ("fd00::1e:8480", host6),
    ] {
        check(
            &mut instance,
            &policy,
            &roles,
            Direction::Ingress,
            src.parse()?,
            dst,
            443,
        )?;
    }
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn rules_1024_per_direction() -> anyhow::Result<()> {
    let mut text = String::from("version = 1\n[roles.r]\nhosts = \"any\"\n");
    for i in 0..1024u32 {
        let peer = format!("198.18.{}.{}/31", i / 128, (i % 128) * 2);
        write!(
            text,
            "[[roles.r.ingress]]\nfrom = [\"{peer}\", \"198.19.0.0/16\"]\ntcp = [{}, \"{}-{}\"]\n",
            1000 + i,
            20000 + 10 * i,
            20004 + 10 * i
        )?;
        write!(
            text,
            "[[roles.r.egress]]\nto = \"{peer}\"\nudp = [{}]\n",
            3000 + i
        )?;
    }
    let policy = Policy::from_str(&text, "rules.toml")?;
    let roles = vec!["r".to_string()];
    let c = harness::compile(&policy, &roles, "eth0")?;
    assert_eq!(c.rules.len(), 2048);
    let mut instance = Instance::with_compiled(&c, segbpf_common::RUN_DRY)?;
    let host: IpAddr = "192.0.2.1".parse()?;
    // Deterministic spread over rules, peers and ports (edges included).
    let mut x: u32 = 12345;
    for _ in 0..400 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let i = (x >> 8) % 1024;
        let src: IpAddr = if x & 1 == 0 {
            format!("198.18.{}.{}", i / 128, (i % 128) * 2 + (x >> 4 & 1)).parse()?
        } else {
            format!("198.19.{}.{}", x >> 20 & 255, x >> 12 & 255).parse()?
        };
        let j = (x >> 3) % 1024;
        let port = match x >> 28 & 3 {
            0 => 1000 + j as u16,
            1 => 20000 + 10 * j as u16 + (x >> 24 & 7) as u16,
            2 => 1000 + i as u16,
            _ => 65000,
        };
        check(
            &mut instance,
            &policy,
            &roles,
            Direction::Ingress,
            src,
            host,
            port,
        )?;
    }
    Ok(())
}
