//! Flow accounting with real traffic: a TCP transfer of a known size and a
//! UDP exchange through an enforcing host, then `segbpf flows --output
//! json` must show each flow once, from its originator, with packets and
//! bytes in each direction at least what the kernel's stacks moved, the TCP
//! flags of a handshake, and the name of the rule that opened it.
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::time::Duration;

use segbpf_tests::{Lab, net};

const POLICY: &str = r#"version = 1
[defaults]
ingress = "drop"
egress = "drop"
[roles.srv]
hosts = "any"
[[roles.srv.ingress]]
name = "bulk-in"
from = "any"
tcp = [8080]
[[roles.srv.egress]]
name = "dns-out"
to = "any"
udp = [5353]
"#;

const BYTES: u64 = 3_000_000;

/// A server host `srv` (`NET.10`) sending BYTES to whoever connects on TCP
/// 8080, a `client` (`NET.5`), and the policy file.
fn setup(tag: &str, net: &str) -> anyhow::Result<(Lab, std::path::PathBuf, net::Server)> {
    let mut lab = Lab::new(tag)?;
    lab.add_host("srv", &[&format!("{net}.10/24")])?;
    lab.add_host("client", &[&format!("{net}.5/24")])?;
    let policy = lab.write_policy("p.toml", POLICY)?;
    let source = net::Server::tcp_source(
        &lab.host("srv").ns.name,
        lab.host("srv").addrs[0],
        8080,
        BYTES,
    )?;
    Ok((lab, policy, source))
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn flows_count_both_directions_with_the_opening_rule() -> anyhow::Result<()> {
    let (lab, policy, _source) = setup("flows", "198.18.86")?;
    let (srv, client) = (lab.host("srv").addrs[0], lab.host("client").addrs[0]);
    let _echo = net::Server::udp(&lab.host("client").ns.name, client, 5353, true)?;
    lab.attach("srv", policy.to_str().unwrap_or_default(), &[])?;

    // The client fetches BYTES from the server (the replier sends them).
    let t = net::tcp_fetch(
        &lab.host("client").ns.name,
        client,
        srv,
        8080,
        Duration::from_secs(20),
    )?;
    assert!(t.connected && t.received == BYTES, "{t:?}");
    // The server asks the client over UDP (this host opens the flow).
    assert!(net::udp_exchange(
        &lab.host("srv").ns.name,
        srv,
        client,
        5353,
        Duration::from_secs(2)
    )?);

    let out = lab.segbpf_ok("srv", &["flows", "eth0", "--output", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let flows = v["flows"].as_array().cloned().unwrap_or_default();
    let tcp: Vec<&serde_json::Value> = flows
        .iter()
        .filter(|f| f["proto"] == "tcp" && f["dport"] == 8080)
        .collect();
    assert_eq!(tcp.len(), 1, "one TCP flow: {v}");
    let f = tcp[0];
    assert_eq!(f["src"], client.to_string(), "{f}");
    assert_eq!(f["dst"], srv.to_string(), "{f}");
    assert_eq!(f["opened_by"], "ingress", "{f}");
    assert_eq!(f["rule"]["name"], "bulk-in", "{f}");
    let num = |k: &str| f[k].as_u64().unwrap_or(0);
    // Frame lengths include the headers: at least the payload moved.
    assert!(num("bytes_reply") >= BYTES, "{f}");
    assert!(num("packets_reply") >= BYTES / 65_536, "{f}");
    assert!(num("packets_orig") >= 3, "handshake, ACKs: {f}");
    assert!(num("bytes_orig") >= 3 * 54, "{f}");
    assert!(num("bytes_orig") < BYTES, "the client sent ACKs only: {f}");
    let flags = f["tcp_flags"].as_array().cloned().unwrap_or_default();
    assert!(
        flags.contains(&"SYN".into()) && flags.contains(&"ACK".into()),
        "{f}"
    );
    assert!(f["first_seen"].as_str() <= f["last_seen"].as_str(), "{f}");

    let udp: Vec<&serde_json::Value> = flows
        .iter()
        .filter(|f| f["proto"] == "udp" && f["dport"] == 5353)
        .collect();
    assert_eq!(udp.len(), 1, "one UDP flow: {v}");
    let u = udp[0];
    assert_eq!(u["opened_by"], "egress", "{u}");
    assert_eq!(u["src"], srv.to_string(), "{u}");
    assert_eq!(u["rule"]["name"], "dns-out", "{u}");
    assert!(u["packets_orig"].as_u64() >= Some(1), "{u}");
    assert!(u["packets_reply"].as_u64() >= Some(1), "{u}");
    assert!(u.get("tcp_flags").is_none(), "no TCP flags on UDP: {u}");

    // Text output names the same flows.
    let text = lab.segbpf_ok("srv", &["flows", "eth0"])?;
    assert!(
        text.contains("rule bulk-in") && text.contains("rule dns-out"),
        "{text}"
    );
    // --flow-log off (applied by an adopting attach): new flows are tracked
    // but not counted.
    let out = lab.attach(
        "srv",
        policy.to_str().unwrap_or_default(),
        &["--flow-log", "off"],
    )?;
    assert!(out.starts_with("adopted"), "{out}");
    assert_eq!(
        lab.status_json("srv")?["attachments"][0]["state"]["flow_acct"],
        false
    );
    let t = net::tcp_fetch(
        &lab.host("client").ns.name,
        client,
        srv,
        8080,
        Duration::from_secs(20),
    )?;
    assert!(t.connected && t.received == BYTES, "{t:?}");
    let v: serde_json::Value =
        serde_json::from_str(&lab.segbpf_ok("srv", &["flows", "eth0", "--output", "json"])?)?;
    let tcp: Vec<&serde_json::Value> = v["flows"]
        .as_array()
        .map(|a| a.iter().filter(|f| f["proto"] == "tcp").collect())
        .unwrap_or_default();
    // The first flow may have expired by now (closed TCP: 10 s).
    let uncounted = tcp
        .iter()
        .filter(|f| f["bytes_reply"] == 0 && f["packets_orig"] == 0)
        .count();
    assert_eq!(uncounted, 1, "the new flow is not counted: {v}");
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn follow_streams_start_and_end_records_of_a_real_transfer() -> anyhow::Result<()> {
    let (lab, policy, _source) = setup("flowf", "198.18.87")?;
    let (srv, client) = (lab.host("srv").addrs[0], lab.host("client").addrs[0]);
    lab.attach("srv", policy.to_str().unwrap_or_default(), &[])?;
    let follower = lab.follow_flows("srv", &["--start", "--active-secs", "1"])?;
    let t = net::tcp_fetch(
        &lab.host("client").ns.name,
        client,
        srv,
        8080,
        Duration::from_secs(20),
    )?;
    assert!(t.connected && t.received == BYTES, "{t:?}");
    // The close (FIN from both sides) ends the flow once its last packets
    // are 3 s old, seen within a poll.
    std::thread::sleep(Duration::from_secs(6));
    let records = follower.json_lines()?;
    let stdout = format!("{records:?}");
    let ours: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["proto"] == "tcp" && r["dport"] == 8080)
        .collect();
    let states: Vec<&str> = ours.iter().filter_map(|r| r["state"].as_str()).collect();
    assert_eq!(states.first(), Some(&"start"), "{stdout}");
    assert_eq!(
        states.iter().filter(|s| **s == "end").count(),
        1,
        "one end record: {stdout}"
    );
    let end = ours.iter().find(|r| r["state"] == "end").expect("end");
    assert!(end["bytes_reply"].as_u64() >= Some(BYTES), "{end}");
    assert_eq!(end["rule"]["name"], "bulk-in", "{end}");
    assert_eq!(end["verdict"], "allow", "{end}");
    assert_eq!(end["audit"], false, "{end}");
    assert_eq!(end["schema"], 1, "{end}");
    assert_eq!(end["iface"], "eth0", "{end}");
    assert!(
        end["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{end}"
    );
    Ok(())
}

/// The drains read the kernel's hash maps in batches: every entry of a
/// connection table of 5,000 flows comes back (values intact) in a few
/// `BPF_MAP_LOOKUP_BATCH` calls, and a per-CPU denied table of 8,192
/// buckets (3,000 owned) in a few more, each CPU's values apart
/// (iterating cost 2 calls per entry, 1 per bucket).
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn drains_read_whole_tables_in_a_few_batched_calls() -> anyhow::Result<()> {
    use std::os::fd::AsFd as _;

    use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues};
    use segbpf_common::{
        CtEntry, CtKey, DENIED_BUCKETS, DeniedBucket, DeniedKey, MAP_CT, MAP_DENIED0,
    };

    let mut instance = segbpf_tests::harness::Instance::load(segbpf_common::RUN_DRY)?;
    let ebpf = instance.ebpf_mut();
    // An earlier build's table of `CtKey`s (this build's tables are
    // arrays, mapped; the kernel's LRU tables are what batches read).
    let mut lru = aya::maps::Map::LruHashMap(segbpf_tests::harness::lru_map(
        MAP_CT,
        size_of::<CtKey>() as u32,
        size_of::<CtEntry>() as u32,
        8_192,
    )?);
    let key = |i: u32| CtKey {
        family: 4,
        proto: 6,
        local_port: 8080,
        remote_port: (i % 60_000) as u16 + 1,
        ifindex: 7 + i / 60_000,
        ..CtKey::default()
    };
    {
        let mut ct: BpfHashMap<&mut MapData, CtKey, CtEntry> = BpfHashMap::try_from(&mut lru)?;
        for i in 0..5_000u32 {
            let e = CtEntry {
                first_seen_ns: u64::from(i) + 1,
                ..CtEntry::default()
            };
            ct.insert(key(i), e, 0)?;
        }
    }
    let aya::maps::Map::LruHashMap(lru) = &lru else {
        anyhow::bail!("{MAP_CT} is not an LRU hash");
    };
    let fd = lru.fd().as_fd();
    let (got, cost) = segbpf::attachment::batch::read_all::<CtKey, CtEntry>(fd, 1, false)?;
    assert_eq!(got.len(), 5_000);
    let mut seen: Vec<u64> = got.iter().map(|(_, v)| v[0].first_seen_ns).collect();
    seen.sort_unstable();
    assert_eq!(seen, (1..=5_000).collect::<Vec<u64>>());
    assert!(
        got.iter()
            .all(|(k, v)| *k == key(v[0].first_seen_ns as u32 - 1))
    );
    assert!(cost.calls <= 4, "{cost:?}");
    eprintln!("5,000 connection-table entries: {cost:?}");

    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    {
        let mut denied: PerCpuArray<&mut MapData, DeniedBucket> =
            PerCpuArray::try_from(ebpf.map_mut(MAP_DENIED0).unwrap())?;
        for i in 0..3_000u16 {
            let values: Vec<DeniedBucket> = (0..cpus)
                .map(|c| DeniedBucket {
                    key: DeniedKey {
                        family: 4,
                        proto: 6,
                        dport: i + 1,
                        ..DeniedKey::default()
                    },
                    packets: u64::from(i) * 100 + c as u64 + 1,
                    ..DeniedBucket::default()
                })
                .collect();
            denied.set(u32::from(i) * 2, PerCpuValues::try_from(values)?, 0)?;
        }
    }
    let fd = match ebpf.map(MAP_DENIED0).unwrap() {
        aya::maps::Map::PerCpuArray(d) => d.fd().as_fd(),
        other => anyhow::bail!("{MAP_DENIED0} is {other:?}"),
    };
    let (got, cost) = segbpf::attachment::batch::read_all::<u32, DeniedBucket>(fd, cpus, false)?;
    assert_eq!(got.len(), DENIED_BUCKETS as usize, "every bucket");
    let owned: Vec<_> = got.iter().filter(|(_, v)| v[0].packets > 0).collect();
    assert_eq!(owned.len(), 3_000);
    for (idx, v) in owned {
        let i = u64::from(*idx / 2);
        assert_eq!(u64::from(v[0].key.dport), i + 1);
        assert_eq!(
            v.iter().map(|s| s.packets).collect::<Vec<_>>(),
            (0..cpus as u64)
                .map(|c| i * 100 + c + 1)
                .collect::<Vec<_>>()
        );
    }
    assert!(cost.calls <= 3, "{cost:?}");
    eprintln!("{DENIED_BUCKETS} per-CPU denied buckets ({cpus} CPUs), read: {cost:?}");
    Ok(())
}
