//! Flow logs with real traffic from the kernel's stack: `end` records whose
//! packet counts equal the interface counters, `denied` aggregates of a
//! 100,000-datagram flood that add up to what was sent, `active` records
//! of a long flow, `new_pair` once per pair, `attach --flow-log PATH`
//! reopening its file on SIGHUP, and the observed store kept within its
//! cap under a flood of spoofed sources within one hour.
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::{net::IpAddr, time::Duration};

use anyhow::Context as _;

use segbpf_tests::{
    Lab,
    lab::Running,
    net::{self, Server},
};

const POLICY: &str = r#"version = 1
[sets]
clients = ["198.18.0.0/15"]
[defaults]
ingress = "drop"
egress = "drop"
[roles.srv]
hosts = "any"
[[roles.srv.ingress]]
name = "echo-in"
from = "clients"
tcp = [8080, 8081]
"#;

/// A quiet lab (no background traffic, static neighbours) with `srv`
/// (`NET.10`, a TCP echo on 8080) and `client` (`NET.5`).
fn setup(tag: &str, net: &str) -> anyhow::Result<(Lab, std::path::PathBuf, Server)> {
    let mut lab = Lab::new(tag)?;
    lab.quiet_switch()?;
    lab.add_host("srv", &[&format!("{net}.10/24")])?;
    lab.add_host("client", &[&format!("{net}.5/24")])?;
    for (a, b) in [("srv", "client"), ("client", "srv")] {
        lab.quiet_host(a)?;
        let mac = net::mac(&lab.host(b).ns.name, "eth0")?;
        let mac = mac
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let addr = lab.host(b).addrs[0].to_string();
        lab.host(a).ns.ip(&[
            "neigh",
            "replace",
            &addr,
            "lladdr",
            &mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
    }
    let policy = lab.write_policy("p.toml", POLICY)?;
    let echo = Server::tcp_echo(&lab.host("srv").ns.name, lab.host("srv").addrs[0], 8080)?;
    Ok((lab, policy, echo))
}

/// `(rx_packets, tx_packets, tx_dropped)` of eth0 in namespace `ns`.
fn counters(ns: &str) -> anyhow::Result<(u64, u64, u64)> {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-s", "-j", "link", "show", "dev", "eth0"])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let s = &v[0]["stats64"];
    let n = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
    Ok((
        n(&s["rx"]["packets"]),
        n(&s["tx"]["packets"]),
        n(&s["tx"]["dropped"]),
    ))
}

fn records(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits up to `secs` for `f` to hold.
fn wait_for(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    f()
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn five_exchanges_give_five_end_records_counted_like_the_interface() -> anyhow::Result<()> {
    let (lab, policy, _echo) = setup("flend", "198.18.88")?;
    let (srv, client) = (lab.host("srv").addrs[0], lab.host("client").addrs[0]);
    std::fs::create_dir_all(&lab.state)?;
    let log = lab.state.join("flows.jsonl");
    let attach = Running::new(lab.spawn(
        "srv",
        &[
            "attach",
            "eth0",
            "--policy",
            policy.to_str().unwrap_or_default(),
            "--flow-log",
            log.to_str().unwrap_or_default(),
        ],
    )?);
    lab.wait_enforcing("srv")?;
    let before = counters(&lab.host("srv").ns.name)?;
    for _ in 0..5 {
        assert!(net::tcp_exchange(
            &lab.host("client").ns.name,
            client,
            srv,
            8080,
            Duration::from_secs(10)
        )?);
    }
    let ends = || -> Vec<serde_json::Value> {
        records(&std::fs::read_to_string(&log).unwrap_or_default())
            .into_iter()
            .filter(|r| r["state"] == "end" && r["dport"] == 8080)
            .collect()
    };
    assert!(
        wait_for(30, || ends().len() >= 5),
        "five end records: {:?}",
        std::fs::read_to_string(&log)
    );
    let after = counters(&lab.host("srv").ns.name)?;
    let five = ends();
    assert_eq!(five.len(), 5, "{five:?}");
    let sum = |k: &str| five.iter().map(|r| r[k].as_u64().unwrap_or(0)).sum::<u64>();
    // Everything srv received and sent on eth0 was these five exchanges.
    assert_eq!(sum("packets_orig"), after.0 - before.0, "{five:?}");
    assert_eq!(sum("packets_reply"), after.1 - before.1, "{five:?}");
    for r in &five {
        assert!(r["bytes_orig"].as_u64() > Some(0), "{r}");
        assert!(r["bytes_reply"].as_u64() > Some(0), "{r}");
        assert_eq!(r["rule"]["name"], "echo-in", "{r}");
        assert_eq!(r["role"], "srv", "{r}");
        assert_eq!(r["peer_set"], "clients", "{r}");
        assert_eq!(r["verdict"], "allow", "{r}");
        assert_eq!(r["src"], client.to_string(), "{r}");
    }
    let new_pairs = five.iter().filter(|r| r["new_pair"] == true).count();
    assert_eq!(new_pairs, 1, "the pair is new once: {five:?}");

    // logrotate: move the file away, SIGHUP, and the next records go to a
    // new file at the same path.
    let rotated = log.with_extension("jsonl.1");
    std::fs::rename(&log, &rotated)?;
    attach.signal(nix::sys::signal::Signal::SIGHUP)?;
    std::thread::sleep(Duration::from_millis(1500));
    assert!(net::tcp_exchange(
        &lab.host("client").ns.name,
        client,
        srv,
        8080,
        Duration::from_secs(10)
    )?);
    assert!(
        wait_for(30, || !ends().is_empty()),
        "the end record of the exchange after SIGHUP is in the reopened file"
    );
    assert_eq!(
        records(&std::fs::read_to_string(&rotated)?)
            .iter()
            .filter(|r| r["state"] == "end")
            .count(),
        5,
        "the rotated file keeps what it had"
    );
    attach.terminate()?;
    attach.wait()?;
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn a_denied_flood_is_aggregated_and_adds_up_to_what_was_sent() -> anyhow::Result<()> {
    let (lab, policy, _echo) = setup("flden", "198.18.89")?;
    let (srv, client) = (lab.host("srv").addrs[0], lab.host("client").addrs[0]);
    lab.attach("srv", policy.to_str().unwrap_or_default(), &[])?;
    let follower = lab.follow_flows("srv", &["--denied-secs", "1"])?;
    // A second `flows --follow`: one of the two drains (the primary), the
    // other shows what the primary stored, `lost` lines included.
    let watcher = lab.follow_flows("srv", &["--denied-secs", "1"])?;
    let ns = lab.host("client").ns.name.clone();
    let before = counters(&ns)?;
    // 100,000 datagrams to 10 closed ports, in two bursts a few drains apart.
    let mut sent = 0;
    for _ in 0..2 {
        sent += paced_udp(&ns, client, srv, 9000..9010, 50_000, true)?;
        std::thread::sleep(Duration::from_millis(2500));
    }
    assert_eq!(sent, 100_000);
    // Then 40,000 distinct aggregates at once, five times a table's
    // buckets (8,192): packets whose bucket another aggregate owns are
    // counted as lost (not attributed), never silently dropped.
    let spread = paced_udp(&ns, client, srv, 20_000..60_000, 40_000, true)?;
    std::thread::sleep(Duration::from_millis(2500));
    let after = counters(&ns)?;
    let wire = sent + spread - (after.2 - before.2);
    std::thread::sleep(Duration::from_secs(2));
    let all = follower.json_lines()?;
    let ours: Vec<&serde_json::Value> = all
        .iter()
        .filter(|r| r["state"] == "denied" && r["proto"] == "udp" && r["src"] == client.to_string())
        .collect();
    let lost: u64 = all
        .iter()
        .filter(|r| r["state"] == "lost")
        .map(|r| r["packets"].as_u64().unwrap_or(0))
        .sum();
    let counted: u64 = ours
        .iter()
        .map(|r| r["packets_orig"].as_u64().unwrap_or(0))
        .sum();
    // Every denied record says whether its counts are exact; a packet
    // turned away from a bucket makes that bucket's owner inexact.
    assert!(
        all.iter()
            .filter(|r| r["state"] == "denied")
            .all(|r| r["exact"].is_boolean()),
        "every denied record carries \"exact\""
    );
    let inexact = ours.iter().filter(|r| r["exact"] == false).count();
    assert!(
        lost == 0 || inexact > 0,
        "{lost} packets lost to shared buckets, yet every record claims exact counts"
    );
    assert!(
        lost > 0,
        "40,000 new aggregates overflow a table: counted {counted}, lost {lost}, wire {wire}, spread {spread}, aggregates {}",
        ours.len()
    );
    assert_eq!(
        counted + lost,
        wire,
        "aggregates {counted} + lost {lost} = sent on the wire {wire}"
    );
    // Each loss line says why: a shared bucket, or a flood kept on a
    // sample. 100,000 datagrams in bursts of 256 every half millisecond
    // are a flood (over 1,024 drops per CPU in 134 ms): the kernel gave
    // one in 16 to its aggregate and counted the rest.
    let lines: Vec<_> = all.iter().filter(|r| r["state"] == "lost").collect();
    for r in &lines {
        assert_eq!(
            r["shared"].as_u64().unwrap_or(u64::MAX) + r["unsampled"].as_u64().unwrap_or(0),
            r["packets"].as_u64().unwrap_or(0),
            "{r}"
        );
    }
    let unsampled: u64 = lines
        .iter()
        .map(|r| r["unsampled"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        unsampled > 0 && unsampled < wire,
        "a flood is aggregated on a sample: unsampled {unsampled} of {wire}"
    );
    let lost_of = |lines: &[serde_json::Value]| -> u64 {
        lines
            .iter()
            .filter(|r| r["state"] == "lost")
            .map(|r| r["packets"].as_u64().unwrap_or(0))
            .sum()
    };
    let watched = watcher.json_lines()?;
    assert_eq!(
        lost_of(&watched),
        lost_of(&all),
        "both `flows --follow` show the same `lost` lines (the follower from the store)"
    );
    for r in &ours {
        assert_eq!(r["verdict"], "drop", "{r}");
        assert_eq!(r["audit"], false, "{r}");
        assert_eq!(r["reason"], "default-drop", "{r}");
        assert_eq!(r["opens_flow"], true, "{r}");
        assert_eq!(r["peer_set"], "clients", "{r}");
        assert_eq!(r["opened_by"], "ingress", "{r}");
    }
    // One aggregate per port and drain: each port's pair is new once.
    for port in 9000..9010 {
        let of_port: Vec<_> = ours.iter().filter(|r| r["dport"] == port).collect();
        assert!(
            of_port.len() >= 2,
            "two bursts, two drains at least: {of_port:?}"
        );
        assert_eq!(of_port[0]["new_pair"], true, "{of_port:?}");
        assert!(
            of_port[1..].iter().all(|r| r["new_pair"] == false),
            "{of_port:?}"
        );
    }
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn a_spoofed_flood_keeps_the_observed_store_within_its_cap() -> anyhow::Result<()> {
    const CAP: u64 = 256 << 10;
    let (lab, policy, _echo) = setup("flcap", "198.18.94")?;
    let (srv, client) = (lab.host("srv").addrs[0], lab.host("client").addrs[0]);
    lab.attach("srv", policy.to_str().unwrap_or_default(), &[])?;
    // The primary, which writes the store, with a small cap.
    let follower = Running::new(
        std::process::Command::new(segbpf_tests::lab::segbpf_bin())
            .args(["--netns", &lab.host("srv").ns.name])
            .args(["flows", "eth0", "--follow", "--output", "json"])
            .args(["--denied-secs", "1"])
            .env("SEGBPF_BPFFS", &lab.bpffs)
            .env("SEGBPF_STATE_DIR", &lab.state)
            .env("SEGBPF_OBSERVED_MAX_BYTES", CAP.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?,
    );
    std::thread::sleep(Duration::from_millis(1500));
    // Made on the first write.
    let store = || find_dir(&lab.state, ".observed");
    // Spoofed datagrams from distinct sources (198.19.x.y) to a closed
    // port, each its own denied aggregate: 2,000 a second for 4 s.
    let ns = lab.host("client").ns.name.clone();
    let sender = net::RawSender::open(&ns, "eth0")?;
    let (srv_mac, client_mac) = (
        net::mac(&lab.host("srv").ns.name, "eth0")?,
        net::mac(&ns, "eth0")?,
    );
    let size = |dir: Option<std::path::PathBuf>| -> u64 {
        dir.and_then(|d| std::fs::read_dir(d).ok())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    };
    let mut largest = 0;
    let mut n: u32 = 0;
    for _ in 0..40 {
        for _ in 0..200 {
            n += 1;
            let src = IpAddr::V4(std::net::Ipv4Addr::from(0xc613_0000 | (n & 0xffff)));
            let mut frame = segbpf::host::packet::PacketSpec::udp(src, srv, 40_000, 9000)
                .build()
                .bytes;
            frame[..6].copy_from_slice(&srv_mac);
            frame[6..12].copy_from_slice(&client_mac);
            sender.send(&frame)?;
        }
        std::thread::sleep(Duration::from_millis(100));
        largest = largest.max(size(store()));
    }
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(100));
        largest = largest.max(size(store()));
    }
    let all = follower.json_lines()?;
    let denied: Vec<_> = all
        .iter()
        .filter(|r| r["state"] == "denied" && r["dport"] == 9000 && r["src"] != client.to_string())
        .collect();
    let produced: u64 = denied.iter().map(|r| r.to_string().len() as u64 + 1).sum();
    assert!(
        produced > 8 * CAP,
        "the flood gave {} records, {produced} bytes: not enough to test a cap of {CAP}",
        denied.len()
    );
    assert!(
        largest <= CAP,
        "the observed store reached {largest} bytes, over its cap of {CAP} ({produced} bytes of records)"
    );
    // What is kept is the newest: the last record printed is there.
    let store =
        store().with_context(|| format!("no observed store under {}", lab.state.display()))?;
    let kept = std::fs::read_dir(&store)?
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect::<String>();
    let last = denied.last().map(|r| r["src"].clone()).unwrap_or_default();
    assert!(
        kept.contains(&format!("\"src\":{last}")),
        "the newest record ({last}) was not kept"
    );
    assert!(
        size(Some(store)) > CAP / 2,
        "the store keeps close to its cap"
    );
    Ok(())
}

/// The first directory under `root` whose name ends with `suffix`.
fn find_dir(root: &std::path::Path, suffix: &str) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(root).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.to_string_lossy().ends_with(suffix) {
                return Some(p);
            }
            if let Some(found) = find_dir(&p, suffix) {
                return Some(found);
            }
        }
    }
    None
}

/// Sends `count` 32-byte datagrams from `src` in `ns` to `dst`, cycling
/// over `ports`, paced (so the veth never has to drop) or as fast as it
/// can; returns how many `sendto` accepted.
fn paced_udp(
    ns: &str,
    src: IpAddr,
    dst: IpAddr,
    ports: std::ops::Range<u16>,
    count: u64,
    paced: bool,
) -> anyhow::Result<u64> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> anyhow::Result<u64> {
        segbpf_tests::netns::enter(&path)?;
        let sock = std::net::UdpSocket::bind(std::net::SocketAddr::new(src, 0))?;
        let ports: Vec<u16> = ports.collect();
        let mut sent = 0;
        for i in 0..count {
            let port = ports[(i as usize) % ports.len()];
            if sock
                .send_to(&[0u8; 32], std::net::SocketAddr::new(dst, port))
                .is_ok()
            {
                sent += 1;
            }
            if paced && i % 256 == 255 {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        Ok(sent)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("sender thread panicked"))?
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn a_long_flow_gives_active_records() -> anyhow::Result<()> {
    let (lab, policy, _echo) = setup("flact", "198.18.90")?;
    let (srv, client) = (lab.host("srv").addrs[0], lab.host("client").addrs[0]);
    let _sink = Server::tcp_sink(&lab.host("srv").ns.name, srv, 8081)?;
    lab.attach("srv", policy.to_str().unwrap_or_default(), &[])?;
    let follower = lab.follow_flows("srv", &["--active-secs", "1"])?;
    let path = format!("/run/netns/{}", lab.host("client").ns.name);
    std::thread::spawn(move || -> anyhow::Result<()> {
        use std::io::{Read as _, Write as _};
        segbpf_tests::netns::enter(&path)?;
        let mut s = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::new(srv, 8081),
            Duration::from_secs(5),
        )
        .context("connect")?;
        for tick in 0..4u64 {
            let chunk: Vec<u8> = (tick * 4..tick * 4 + 4).map(net::bulk_pattern).collect();
            s.write_all(&chunk)?;
            std::thread::sleep(Duration::from_secs(1));
        }
        s.shutdown(std::net::Shutdown::Write)?;
        let mut count = [0u8; 8];
        s.read_exact(&mut count).context("read count")?;
        anyhow::ensure!(u64::from_be_bytes(count) == 16, "the sink got every tick");
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    std::thread::sleep(Duration::from_secs(5));
    let all = follower.json_lines()?;
    let states: Vec<&str> = all
        .iter()
        .filter(|r| r["dport"] == 8081 && r["src"] == client.to_string())
        .filter_map(|r| r["state"].as_str())
        .collect();
    assert!(
        states.iter().filter(|s| **s == "active").count() >= 2,
        "{states:?}"
    );
    assert_eq!(states.last(), Some(&"end"), "{states:?}");
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn audit_then_suggest_gives_a_policy_that_allows_exactly_what_was_seen() -> anyhow::Result<()> {
    let mut lab = Lab::new("flsug")?;
    lab.add_host("srv", &["198.18.91.10/24"])?;
    lab.add_host("client", &["198.18.91.5/24"])?;
    let (srv, client) = (lab.host("srv").addrs[0], lab.host("client").addrs[0]);
    let policy = lab.write_policy(
        "p.toml",
        r#"version = 1
[sets]
admins = ["198.18.91.200"]
[defaults]
ingress = "drop"
egress = "drop"
[roles.db]
hosts = "198.18.91.10"
[[roles.db.ingress]]
from = "admins"
tcp = [22]
"#,
    )?;
    let srv_ns = lab.host("srv").ns.name.clone();
    let _pg = Server::tcp_echo(&srv_ns, srv, 5432)?;
    let _my = Server::tcp_echo(&srv_ns, srv, 3306)?;
    let _dns = Server::udp(&srv_ns, srv, 5353, true)?;
    lab.attach("srv", policy.to_str().unwrap_or_default(), &["--audit"])?;
    let cns = lab.host("client").ns.name.clone();
    // Audit mode lets it all through, replies included.
    for port in [5432, 3306] {
        assert!(net::tcp_exchange(
            &cns,
            client,
            srv,
            port,
            Duration::from_secs(10)
        )?);
    }
    assert!(net::udp_exchange(
        &cns,
        client,
        srv,
        5353,
        Duration::from_secs(10)
    )?);
    // The audited flows are tracked and marked as such.
    let flows: serde_json::Value =
        serde_json::from_str(&lab.segbpf_ok("srv", &["flows", "eth0", "--output", "json"])?)?;
    let audited = flows["flows"]
        .as_array()
        .map_or(0, |a| a.iter().filter(|f| f["audit"] == true).count());
    assert!(audited >= 3, "{flows}");

    let out = lab.segbpf_ok("srv", &["suggest", "eth0"])?;
    let suggested = lab.write_policy("suggested.toml", &out)?;
    let s = suggested.to_str().unwrap_or_default();
    lab.segbpf_ok("srv", &["check", "--policy", s])?;
    let explain = |proto: &str, port: u16| -> anyhow::Result<String> {
        let v: serde_json::Value = serde_json::from_str(&lab.segbpf_ok(
            "srv",
            &[
                "explain",
                "--policy",
                s,
                "--role",
                "db",
                "--src",
                &client.to_string(),
                "--dst",
                &srv.to_string(),
                "--proto",
                proto,
                "--dport",
                &port.to_string(),
                "--output",
                "json",
            ],
        )?)?;
        Ok(v["verdict"].as_str().unwrap_or_default().to_string())
    };
    assert_eq!(explain("tcp", 5432)?, "allow", "{out}");
    assert_eq!(explain("tcp", 3306)?, "allow", "{out}");
    assert_eq!(explain("udp", 5353)?, "allow", "{out}");
    assert_eq!(explain("tcp", 5433)?, "drop", "an unseen port: {out}");
    assert_eq!(explain("tcp", 22)?, "drop", "{out}");
    assert!(
        !out.contains("[[roles.db.egress]]"),
        "the replies were tracked, not suggested: {out}"
    );
    Ok(())
}

/// Sends one 32-byte datagram from `src` in `ns` to `dst:port` from a
/// thread pinned to `cpu` (on a veth the receiver's program runs on the
/// sender's CPU).
fn udp_from_cpu(ns: &str, cpu: usize, src: IpAddr, dst: IpAddr, port: u16) -> anyhow::Result<()> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> anyhow::Result<()> {
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu)?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
        segbpf_tests::netns::enter(&path)?;
        let sock = std::net::UdpSocket::bind(std::net::SocketAddr::new(src, 0))?;
        sock.send_to(&[0u8; 32], std::net::SocketAddr::new(dst, port))?;
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("sender thread panicked"))?
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn a_denied_aggregate_hit_from_two_cpus_keeps_its_first_time() -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus < 2 {
        eprintln!("one CPU: nothing to test");
        return Ok(());
    }
    let (lab, policy, _echo) = setup("fl2cpu", "198.18.92")?;
    let (srv, client) = (lab.host("srv").addrs[0], lab.host("client").addrs[0]);
    lab.attach("srv", policy.to_str().unwrap_or_default(), &[])?;
    let follower = lab.follow_flows("srv", &["--denied-secs", "3"])?;
    let ns = lab.host("client").ns.name.clone();
    let start = segbpf::host::clock::rfc3339(std::time::SystemTime::now() - Duration::from_mins(1));
    // Each port's aggregate: made by CPU 0, then counted by CPU 1 into its
    // slot, which the kernel never gave a first time.
    for port in 9100..9104 {
        udp_from_cpu(&ns, 0, client, srv, port)?;
        udp_from_cpu(&ns, 1, client, srv, port)?;
    }
    std::thread::sleep(Duration::from_secs(5));
    let all = follower.json_lines()?;
    let ours: Vec<&serde_json::Value> = all
        .iter()
        .filter(|r| r["state"] == "denied" && r["src"] == client.to_string())
        .collect();
    assert!(
        ours.iter()
            .map(|r| r["packets_orig"].as_u64().unwrap_or(0))
            .sum::<u64>()
            == 8,
        "eight datagrams in aggregates: {ours:?}"
    );
    assert!(
        ours.iter().any(|r| r["packets_orig"] == 2),
        "some aggregate was hit from both CPUs in one drain: {ours:?}"
    );
    for r in &ours {
        let first = r["first_seen"].as_str().unwrap_or_default();
        assert!(
            first >= start.as_str() && first <= r["last_seen"].as_str().unwrap_or_default(),
            "first_seen is when the first datagram came, not boot time: {r}"
        );
    }
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn detach_keeps_the_observed_store_for_suggest() -> anyhow::Result<()> {
    let mut lab = Lab::new("fldet")?;
    lab.add_host("srv", &["198.18.93.10/24"])?;
    lab.add_host("client", &["198.18.93.5/24"])?;
    let (srv, client) = (lab.host("srv").addrs[0], lab.host("client").addrs[0]);
    let policy = lab.write_policy(
        "p.toml",
        r#"version = 1
[defaults]
ingress = "drop"
egress = "drop"
[roles.db]
hosts = "198.18.93.10"
[[roles.db.ingress]]
from = "198.18.93.200"
tcp = [22]
"#,
    )?;
    let srv_ns = lab.host("srv").ns.name.clone();
    let _pg = Server::tcp_echo(&srv_ns, srv, 5432)?;
    lab.attach("srv", policy.to_str().unwrap_or_default(), &["--audit"])?;
    assert!(net::tcp_exchange(
        &lab.host("client").ns.name,
        client,
        srv,
        5432,
        Duration::from_secs(10)
    )?);
    // Drained into the store (suggest drains on demand while attached).
    let before = lab.segbpf_ok("srv", &["suggest", "eth0"])?;
    assert!(before.contains("5432"), "{before}");
    lab.segbpf_ok("srv", &["detach", "eth0"])?;
    let after = lab.segbpf_ok("srv", &["suggest", "eth0"])?;
    assert!(
        after.contains("tcp = [5432]") && after.contains(&client.to_string()),
        "suggest after detach still sees what was observed:\n{after}"
    );
    Ok(())
}
