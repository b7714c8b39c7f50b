//! End to end with traffic made by the kernel's own stack: real UDP and
//! TCP sockets and `ping`, not frames from segbpf's packet builder. The
//! kernel decides what goes on the wire — IP fragmentation of datagrams
//! above the MTU, TCP segmentation offload, path MTU discovery, the ICMP
//! errors a router sends — so these tests catch what hand-built frames
//! miss: a datapath that judges every packet right one at a time can still
//! break fragments, GSO packets, or the ICMP errors PMTU discovery needs.
//!
//! The host under test is `srv`; its peer is `cli`. segbpf runs on srv
//! with `tests/fixtures/real_traffic.toml` (`--role srv`): both directions
//! default to drop, cli may open UDP 5353 and TCP 8080 on srv, srv may open
//! UDP 6363 and TCP 9090 on cli, replies ride on connection tracking
//! (`established = true`), and ICMP echo and errors about tracked flows
//! pass (`icmp = true`).
//!
//! * `udp_datagrams_of_every_size_both_families_both_directions`: UDP
//!   echo of 100, 3000, 20000 and 65000-byte datagrams, IPv4 and IPv6, cli
//!   to srv and srv to cli, open and closed ports. Above 1,472 (IPv4) or
//!   1,452 (IPv6) bytes the kernel fragments the request and the echo, so
//!   fragments are judged in both directions.
//! * `ping_4000_bytes_both_families`: `ping -s 4000` (fragmented echo
//!   request and reply) both ways, passed by `icmp = true` and blocked
//!   after a reload to `icmp = false`.
//! * `tcp_10mb_through_smaller_mtu_pmtu_both_families`: srv sends 10 MB
//!   to cli on a connection cli opened and on one srv opened, IPv4 and
//!   IPv6, across a router whose path towards cli carries at most 1280
//!   bytes: the transfers only complete if segbpf lets the router's
//!   "fragmentation needed" / "packet too big" through to srv's stack
//!   (path MTU discovery).
//! * `same_matrix_through_nft_export_gives_same_verdicts`: the UDP and
//!   ping matrix once with segbpf and once with the ruleset of `segbpf
//!   export nft` loaded with `nft -f`; the verdicts must be equal, and
//!   equal to the policy's.
//!
//! Every lab is made of network namespaces (removed on drop, also when a
//! test fails) with addresses in 198.18.0.0/15 and fd00::/8 only (besides
//! the IPv6 link-local addresses the kernel gives every interface).
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::{net::IpAddr, path::PathBuf, time::Duration};

use segbpf_tests::{Lab, net, netns};

/// The role segbpf enforces on srv.
const ROLE: &str = "srv";
/// UDP port cli may open on srv (echo server) and its closed neighbour.
const UDP_IN_OPEN: u16 = 5353;
const UDP_IN_CLOSED: u16 = 5354;
/// UDP port srv may open on cli (echo server) and its closed neighbour.
const UDP_OUT_OPEN: u16 = 6363;
const UDP_OUT_CLOSED: u16 = 6364;
/// TCP port cli may open on srv (bulk source) and srv on cli (bulk sink).
const TCP_IN: u16 = 8080;
const TCP_OUT: u16 = 9090;

/// Datagram sizes (UDP payload): one packet, then 3, 14 and 45 fragments.
const SIZES: [usize; 4] = [100, 3000, 20000, 65000];
/// How long a case that must pass waits for its echo.
const ECHO_WAIT: Duration = Duration::from_millis(1500);
/// How long a case that must be blocked waits before calling it lost
/// (the lab answers in well under a millisecond).
const SILENCE_WAIT: Duration = Duration::from_millis(750);
/// ICMP payload size of the ping cases: above the 1500-byte MTU.
const PING_SIZE: u32 = 4000;
/// Bytes of each bulk TCP transfer, and the time it may take.
const BULK: u64 = 10_000_000;
const BULK_WAIT: Duration = Duration::from_secs(20);
/// The path MTU towards cli in the routed lab (a locked route MTU on the
/// router).
const NARROW_MTU: u32 = 1280;

fn policy() -> String {
    format!("{}/fixtures/real_traffic.toml", env!("CARGO_MANIFEST_DIR"))
}

/// A private directory for derived policy files, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> anyhow::Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("segbpf-real-traffic-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }

    /// The test policy with `icmp = false` (and no ICMP rule: it has none).
    fn no_icmp_policy(&self) -> anyhow::Result<String> {
        let text = std::fs::read_to_string(policy())?;
        anyhow::ensure!(
            text.matches("\nicmp = true\n").count() == 1,
            "real_traffic.toml must have exactly one `icmp = true` line"
        );
        let path = self.0.join("real_traffic_no_icmp.toml");
        std::fs::write(&path, text.replace("\nicmp = true\n", "\nicmp = false\n"))?;
        Ok(path.to_string_lossy().into_owned())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// IPv4 or IPv6: which of a host's addresses a case uses.
#[derive(Clone, Copy, Debug)]
enum Family {
    V4,
    V6,
}

impl Family {
    const BOTH: [Family; 2] = [Family::V4, Family::V6];

    fn name(self) -> &'static str {
        match self {
            Family::V4 => "v4",
            Family::V6 => "v6",
        }
    }
}

/// The address of `host` in `family` (hosts are made with one address of
/// each, IPv4 first).
fn addr(lab: &Lab, host: &str, family: Family) -> IpAddr {
    let h = lab.host(host);
    *h.addrs
        .iter()
        .find(|a| a.is_ipv4() == matches!(family, Family::V4))
        .unwrap_or_else(|| panic!("{host} has no {} address", family.name()))
}

fn ns(lab: &Lab, host: &str) -> String {
    lab.host(host).ns.name.clone()
}

/// srv and cli on one subnet (MTU 1500): 198.18.0.1 / fd00:18::1 and
/// 198.18.0.2 / fd00:18::2.
fn flat_lab(tag: &str) -> anyhow::Result<Lab> {
    let mut lab = Lab::new(tag)?;
    lab.add_host("srv", &["198.18.0.1/24", "fd00:18::1/64"])?;
    lab.add_host("cli", &["198.18.0.2/24", "fd00:18::2/64"])?;
    Ok(lab)
}

/// What happened to one exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// The request arrived whole and the whole answer came back.
    Delivered,
    /// Nothing arrived and nothing came back.
    Lost,
    /// Anything else (part of it, a wrong echo, ...).
    Other(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Delivered => f.write_str("delivered"),
            Outcome::Lost => f.write_str("lost"),
            Outcome::Other(s) => f.write_str(s),
        }
    }
}

fn verdict(allowed: bool) -> Outcome {
    if allowed {
        Outcome::Delivered
    } else {
        Outcome::Lost
    }
}

/// One case of a matrix: what the policy says and what happened.
struct Case {
    name: String,
    want: Outcome,
    got: Outcome,
}

/// The cases whose outcome is not the policy's, one line each.
fn wrong(cases: &[Case]) -> Vec<String> {
    cases
        .iter()
        .filter(|c| c.got != c.want)
        .map(|c| format!("{}: {} but must be {}", c.name, c.got, c.want))
        .collect()
}

fn print_cases(title: &str, cases: &[Case]) {
    eprintln!("{title}:");
    for c in cases {
        let mark = if c.got == c.want { "ok  " } else { "FAIL" };
        eprintln!("  {mark} {}: {} (want {})", c.name, c.got, c.want);
    }
}

/// The UDP echo servers of the matrix, on both families: on srv the open
/// and the closed ingress port, on cli the open and the closed egress
/// port. A server on the closed ports too, so "nothing arrived" means the
/// firewall dropped it (and no port-unreachable error is drawn).
struct UdpServers(Vec<(IpAddr, u16, net::Server)>);

impl UdpServers {
    fn start(lab: &Lab) -> anyhow::Result<Self> {
        let mut v = Vec::new();
        for family in Family::BOTH {
            for (host, ports) in [
                ("srv", [UDP_IN_OPEN, UDP_IN_CLOSED]),
                ("cli", [UDP_OUT_OPEN, UDP_OUT_CLOSED]),
            ] {
                let a = addr(lab, host, family);
                for port in ports {
                    v.push((
                        a,
                        port,
                        net::Server::udp_large(&ns(lab, host), a, port, true)?,
                    ));
                }
            }
        }
        Ok(UdpServers(v))
    }

    fn get(&self, a: IpAddr, port: u16) -> &net::Server {
        self.0
            .iter()
            .find(|(x, p, _)| *x == a && *p == port)
            .map_or_else(|| panic!("no UDP server on {a}:{port}"), |(_, _, s)| s)
    }
}

/// A datagram of `size` bytes unique to case `n` (the echo must match it
/// byte for byte).
fn payload(n: usize, size: usize) -> Vec<u8> {
    (0..size)
        .map(|i| (i.wrapping_mul(31) ^ n.wrapping_mul(97)) as u8)
        .collect()
}

/// One UDP echo exchange from `from` to `to`'s server on `port`: the
/// request (`size` bytes) must reach the server whole and the echo come
/// back equal to it (Delivered), or neither happen (Lost).
fn udp_case(
    lab: &Lab,
    servers: &UdpServers,
    n: usize,
    (from, to, port): (&str, &str, u16),
    family: Family,
    size: usize,
    allowed: bool,
) -> anyhow::Result<Case> {
    let (src, dst) = (addr(lab, from, family), addr(lab, to, family));
    let server = servers.get(dst, port);
    let before = server.handled();
    let sent = payload(n, size);
    let wait = if allowed { ECHO_WAIT } else { SILENCE_WAIT };
    let echo = net::udp_echo_payload(&ns(lab, from), src, dst, port, sent.clone(), wait)?;
    // The server counts a datagram after echoing it: give it a moment.
    let settle = std::time::Instant::now() + Duration::from_millis(500);
    while echo.is_some() && server.handled() == before && std::time::Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(1));
    }
    let arrived = server.handled() - before;
    let got = match (arrived, &echo) {
        (0, None) => Outcome::Lost,
        (1, Some(e)) if *e == sent => Outcome::Delivered,
        (a, None) => Outcome::Other(format!("server got {a} datagram(s), no echo came back")),
        (a, Some(e)) => Outcome::Other(format!(
            "server got {a} datagram(s), echo of {} bytes {}",
            e.len(),
            if *e == sent { "intact" } else { "differs" }
        )),
    };
    Ok(Case {
        name: format!("udp {} {from} -> {to}:{port} {size} B", family.name()),
        want: verdict(allowed),
        got,
    })
}

/// The UDP matrix: every size in `sizes`, both families, cli to srv's open
/// and closed ingress ports, srv to cli's open and closed egress ports.
fn udp_matrix(lab: &Lab, servers: &UdpServers, sizes: &[usize]) -> anyhow::Result<Vec<Case>> {
    let mut cases = Vec::new();
    for family in Family::BOTH {
        for &size in sizes {
            for (way, allowed) in [
                (("cli", "srv", UDP_IN_OPEN), true),
                (("cli", "srv", UDP_IN_CLOSED), false),
                (("srv", "cli", UDP_OUT_OPEN), true),
                (("srv", "cli", UDP_OUT_CLOSED), false),
            ] {
                let n = cases.len();
                cases.push(udp_case(lab, servers, n, way, family, size, allowed)?);
            }
        }
    }
    Ok(cases)
}

/// `ping -c 2 -s 4000` cli -> srv and srv -> cli on both families; all
/// replies must come back when `allowed`, none otherwise.
fn ping_matrix(lab: &Lab, allowed: bool, label: &str) -> anyhow::Result<Vec<Case>> {
    let wait = Duration::from_secs(if allowed { 2 } else { 1 });
    let mut cases = Vec::new();
    for family in Family::BOTH {
        for (from, to) in [("cli", "srv"), ("srv", "cli")] {
            let replies = net::ping(&ns(lab, from), addr(lab, to, family), PING_SIZE, 2, wait)?;
            let got = match replies {
                2 => Outcome::Delivered,
                0 => Outcome::Lost,
                n => Outcome::Other(format!("{n} of 2 replies")),
            };
            cases.push(Case {
                name: format!(
                    "ping {} {from} -> {to} {PING_SIZE} B ({label})",
                    family.name()
                ),
                want: verdict(allowed),
                got,
            });
        }
    }
    Ok(cases)
}

/// Without any firewall, the largest datagram makes the round trip both
/// ways on both families, even to the closed ports: a blocked case later
/// is the firewall's doing, not the lab's.
fn udp_lab_works(lab: &Lab, servers: &UdpServers) -> anyhow::Result<()> {
    for family in Family::BOTH {
        for way in [
            ("cli", "srv", UDP_IN_CLOSED),
            ("srv", "cli", UDP_OUT_CLOSED),
        ] {
            let c = udp_case(lab, servers, 999, way, family, 65000, true)?;
            anyhow::ensure!(
                c.got == Outcome::Delivered,
                "lab broken before segbpf: {}: {}",
                c.name,
                c.got
            );
        }
    }
    Ok(())
}

/// The kernel's own IP fragmentation counters in `host`'s namespace:
/// datagrams reassembled and fragments created, IPv4 then IPv6
/// (`ReasmOKs`, `FragCreates` of /proc/net/snmp and snmp6).
fn frag_stats(lab: &Lab, host: &str) -> anyhow::Result<[u64; 4]> {
    let read = |file: &str| netns::sh("ip", &["netns", "exec", &ns(lab, host), "cat", file]);
    let snmp = read("/proc/net/snmp")?;
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip: "));
    let (names, values) = (ip.next().unwrap_or(""), ip.next().unwrap_or(""));
    let v4 = |name: &str| -> Option<u64> {
        let i = names.split_whitespace().position(|n| n == name)?;
        values.split_whitespace().nth(i)?.parse().ok()
    };
    let snmp6 = read("/proc/net/snmp6")?;
    let v6 = |name: &str| -> Option<u64> {
        snmp6.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(name)).then(|| w.next()?.parse().ok())?
        })
    };
    let get = |v: Option<u64>, name: &str| {
        v.ok_or_else(|| anyhow::anyhow!("{name} missing from /proc/net/snmp*"))
    };
    Ok([
        get(v4("ReasmOKs"), "ReasmOKs")?,
        get(v4("FragCreates"), "FragCreates")?,
        get(v6("Ip6ReasmOKs"), "Ip6ReasmOKs")?,
        get(v6("Ip6FragCreates"), "Ip6FragCreates")?,
    ])
}

/// Runs `f` and checks that srv's stack reassembled datagrams and created
/// fragments on both families meanwhile: the traffic really was
/// fragmented (by the kernel, at the 1500-byte MTU), both ways.
fn fragments_both_ways<T>(lab: &Lab, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let before = frag_stats(lab, "srv")?;
    let out = f()?;
    let after = frag_stats(lab, "srv")?;
    let what = [
        "IPv4 reassembled",
        "IPv4 fragments created",
        "IPv6 reassembled",
        "IPv6 fragments created",
    ];
    for (i, name) in what.iter().enumerate() {
        anyhow::ensure!(
            after[i] > before[i],
            "lab broken: srv's stack shows no {name} ({} -> {}), the traffic was not fragmented",
            before[i],
            after[i]
        );
    }
    Ok(out)
}

/// segbpf's per-reason counters on srv, for the log.
fn print_counters(lab: &Lab) -> anyhow::Result<()> {
    let status = lab.status_json("srv")?;
    eprintln!(
        "segbpf counters on srv: {}",
        status["attachments"][0]["counters"]
    );
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn udp_datagrams_of_every_size_both_families_both_directions() -> anyhow::Result<()> {
    let lab = flat_lab("rtu")?;
    let servers = UdpServers::start(&lab)?;
    fragments_both_ways(&lab, || udp_lab_works(&lab, &servers))?;

    lab.attach("srv", &policy(), &["--role", ROLE])?;
    let cases = udp_matrix(&lab, &servers, &SIZES)?;
    print_cases("UDP echo through segbpf on srv", &cases);
    print_counters(&lab)?;
    let bad = wrong(&cases);
    assert!(
        bad.is_empty(),
        "{} of {} UDP cases wrong:\n  {}",
        bad.len(),
        cases.len(),
        bad.join("\n  ")
    );
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn ping_4000_bytes_both_families() -> anyhow::Result<()> {
    let scratch = Scratch::new("ping")?;
    let no_icmp = scratch.no_icmp_policy()?;
    let lab = flat_lab("rtp")?;
    let baseline = fragments_both_ways(&lab, || ping_matrix(&lab, true, "no firewall"))?;
    anyhow::ensure!(
        wrong(&baseline).is_empty(),
        "lab broken before segbpf:\n  {}",
        wrong(&baseline).join("\n  ")
    );

    lab.attach("srv", &policy(), &["--role", ROLE])?;
    let mut cases = ping_matrix(&lab, true, "icmp = true")?;
    lab.segbpf_ok("srv", &["reload", "eth0", "--policy", &no_icmp])?;
    cases.extend(ping_matrix(&lab, false, "icmp = false")?);
    print_cases("ping through segbpf on srv", &cases);
    print_counters(&lab)?;
    let bad = wrong(&cases);
    assert!(
        bad.is_empty(),
        "{} of {} ping cases wrong:\n  {}",
        bad.len(),
        cases.len(),
        bad.join("\n  ")
    );
    Ok(())
}

/// The IPv6 half of an attachment stays the live one: IPv6 packets are
/// judged by programs the IPv4 programs reach through a tail-call table,
/// and `segbpf trace` loads a dry-run instance with IPv6 programs of its
/// own. Had the trace put its (dry-run: counting and tracking nothing)
/// IPv6 program into the live table, IPv6 echo requests after it would
/// pass uncounted. Also: the table outlives `segbpf attach`'s process
/// (the kernel empties a program array whose last pin and descriptor are
/// gone), or no IPv6 packet would pass at all.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn ipv6_stays_with_the_live_programs_after_a_trace() -> anyhow::Result<()> {
    let lab = flat_lab("rt6")?;
    lab.attach("srv", &policy(), &["--role", ROLE])?;
    // Every packet the live programs judged, whatever its reason (the
    // first request passes on the ICMP default, the others and the
    // replies on the echo's connection entry).
    let judged = |lab: &Lab| -> anyhow::Result<u64> {
        let status = lab.status_json("srv")?;
        Ok(status["attachments"][0]["counters"]
            .as_object()
            .map_or(0, |c| {
                c.values().filter_map(serde_json::Value::as_u64).sum()
            }))
    };
    let cli = addr(&lab, "cli", Family::V6).to_string();
    let srv = addr(&lab, "srv", Family::V6).to_string();
    for _ in 0..2 {
        lab.segbpf_ok(
            "srv",
            &[
                "trace",
                "eth0",
                "--src",
                &cli,
                "--dst",
                &srv,
                "--proto",
                "icmpv6",
                "--icmp-type",
                "128",
            ],
        )?;
    }
    let before = judged(&lab)?;
    let replies = net::ping(
        &ns(&lab, "cli"),
        addr(&lab, "srv", Family::V6),
        56,
        3,
        ECHO_WAIT,
    )?;
    let after = judged(&lab)?;
    assert_eq!(replies, 3, "IPv6 echo through segbpf after a trace");
    assert!(
        after >= before + 6,
        "the live programs counted {} packets for 3 IPv6 echo requests and their replies after a trace",
        after - before
    );
    Ok(())
}

/// srv (198.18.1.10, fd00:18:1::10) and cli (198.18.2.10, fd00:18:2::10)
/// on two subnets, routed by the switch namespace (gateways .1 / ::1). The
/// router's routes towards cli's subnets carry a locked MTU of 1280, as
/// if cli sat behind a narrower link: srv sends 1500-byte packets (cli's
/// own interface stays at 1500, so its MSS does not hide the narrow hop),
/// and the router answers them with ICMP "fragmentation needed" (IPv4, DF
/// is set by TCP) or ICMPv6 "packet too big" (IPv6 routers never
/// fragment). Redirects are off, so everything crosses the router.
fn routed_lab(tag: &str) -> anyhow::Result<Lab> {
    let mut lab = Lab::new(tag)?;
    let sw = format!("{}-sw", lab.id);
    lab.route(&["198.18.1.1/24", "198.18.2.1/24"])?;
    let mtu = NARROW_MTU.to_string();
    for args in [
        &["addr", "add", "fd00:18:1::1/64", "dev", "br0", "nodad"][..],
        &["addr", "add", "fd00:18:2::1/64", "dev", "br0", "nodad"],
        &[
            "route",
            "replace",
            "198.18.2.0/24",
            "dev",
            "br0",
            "src",
            "198.18.2.1",
            "mtu",
            "lock",
            &mtu,
        ],
        &[
            "-6",
            "route",
            "replace",
            "fd00:18:2::/64",
            "dev",
            "br0",
            "metric",
            "256",
            "mtu",
            "lock",
            &mtu,
        ],
    ] {
        netns::ip(&[&["-n", sw.as_str()][..], args].concat())?;
    }
    sysctl(&sw, &["net.ipv6.conf.all.forwarding=1"])?;
    for (name, v4, v6, gw4, gw6) in [
        (
            "srv",
            "198.18.1.10/24",
            "fd00:18:1::10/64",
            "198.18.1.1",
            "fd00:18:1::1",
        ),
        (
            "cli",
            "198.18.2.10/24",
            "fd00:18:2::10/64",
            "198.18.2.1",
            "fd00:18:2::1",
        ),
    ] {
        lab.add_host(name, &[v4, v6])?;
        sysctl(
            &ns(&lab, name),
            &[
                "net.ipv4.conf.all.accept_redirects=0",
                "net.ipv4.conf.eth0.accept_redirects=0",
                "net.ipv6.conf.all.accept_redirects=0",
                "net.ipv6.conf.eth0.accept_redirects=0",
            ],
        )?;
        lab.default_route(name, gw4)?;
        lab.default_route(name, gw6)?;
    }
    // The router solicits its neighbours from its link-local address, which
    // the kernel makes when the first port joins and only uses once
    // duplicate address detection has finished: wait for it, so the first
    // IPv6 exchange does not lose a second to neighbour discovery.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !netns::ip(&["-n", &sw, "-6", "addr", "show", "dev", "br0", "tentative"])?
        .trim()
        .is_empty()
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the router's IPv6 addresses stay tentative"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(lab)
}

/// `sysctl -w` each setting inside namespace `ns`.
fn sysctl(ns: &str, settings: &[&str]) -> anyhow::Result<()> {
    let mut args = vec!["netns", "exec", ns, "sysctl", "-q"];
    for s in settings {
        args.extend(["-w", s]);
    }
    netns::sh("ip", &args).map(|_| ())
}

/// The path MTU srv's stack has learned towards `dst` (`ip route get`
/// shows a cached exception route with `mtu N` once an ICMP error set it).
fn learned_pmtu(lab: &Lab, dst: IpAddr) -> anyhow::Result<Option<u32>> {
    let out = lab.host("srv").ns.ip(&["route", "get", &dst.to_string()])?;
    let words: Vec<&str> = out.split_whitespace().collect();
    Ok(words
        .windows(2)
        .find(|w| w[0] == "mtu")
        .and_then(|w| w[1].parse().ok()))
}

/// 10 MB from srv to cli over a connection cli opens, and 10 MB from srv
/// to cli over a connection srv opens, on both families; then srv must
/// have learned the narrow path MTU. Returns what went wrong.
fn bulk_transfers(lab: &Lab) -> anyhow::Result<Vec<String>> {
    let mut bad = Vec::new();
    let mut servers = Vec::new();
    for family in Family::BOTH {
        let (s, c) = (addr(lab, "srv", family), addr(lab, "cli", family));
        servers.push(net::Server::tcp_source(&ns(lab, "srv"), s, TCP_IN, BULK)?);
        servers.push(net::Server::tcp_sink(&ns(lab, "cli"), c, TCP_OUT)?);
    }
    for family in Family::BOTH {
        let (s, c) = (addr(lab, "srv", family), addr(lab, "cli", family));
        let f = family.name();
        let fetch = net::tcp_fetch(&ns(lab, "cli"), c, s, TCP_IN, BULK_WAIT)?;
        eprintln!("  tcp {f} cli -> srv:{TCP_IN}, srv sends: {fetch:?}");
        if !fetch.connected || fetch.received != BULK {
            bad.push(format!(
                "tcp {f} cli -> srv:{TCP_IN} (srv sends {BULK} B): connected {}, {} B arrived in {:?}",
                fetch.connected, fetch.received, fetch.elapsed
            ));
        }
        let push = net::tcp_push(&ns(lab, "srv"), s, c, TCP_OUT, BULK, BULK_WAIT)?;
        eprintln!("  tcp {f} srv -> cli:{TCP_OUT}, srv sends: {push:?}");
        if !push.connected || push.received != BULK {
            bad.push(format!(
                "tcp {f} srv -> cli:{TCP_OUT} (srv sends {BULK} B): connected {}, {} B arrived in {:?}",
                push.connected, push.received, push.elapsed
            ));
        }
        let pmtu = learned_pmtu(lab, c)?;
        eprintln!("  srv's path MTU towards {c}: {pmtu:?}");
        if pmtu != Some(NARROW_MTU) {
            bad.push(format!(
                "srv's path MTU towards {c} is {pmtu:?}, not {NARROW_MTU}: the router's ICMP error did not reach srv's stack"
            ));
        }
    }
    Ok(bad)
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn tcp_10mb_through_smaller_mtu_pmtu_both_families() -> anyhow::Result<()> {
    // Without segbpf, in a lab of its own (so srv has no cached path MTU
    // later): the transfers complete and srv learns the narrow MTU, i.e.
    // the lab really depends on PMTU discovery.
    {
        let baseline = routed_lab("rtb")?;
        eprintln!("routed lab without a firewall:");
        let bad = bulk_transfers(&baseline)?;
        anyhow::ensure!(
            bad.is_empty(),
            "lab broken before segbpf:\n  {}",
            bad.join("\n  ")
        );
    }

    let lab = routed_lab("rtm")?;
    lab.attach("srv", &policy(), &["--role", ROLE])?;
    eprintln!("routed lab, segbpf on srv:");
    let bad = bulk_transfers(&lab)?;
    print_counters(&lab)?;
    assert!(
        bad.is_empty(),
        "bulk TCP through a 1280-byte hop with segbpf on srv:\n  {}",
        bad.join("\n  ")
    );
    let status = lab.status_json("srv")?;
    let related = status["attachments"][0]["counters"]["icmp-related"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        related > 0,
        "the router's ICMP errors passed as icmp-related: {status}"
    );
    Ok(())
}

/// Loads `segbpf export nft` of `policy` (role srv, eth0) with `nft -f -`
/// in srv's namespace; the ruleset replaces the table of an earlier load.
fn load_nft_export(lab: &Lab, policy: &str) -> anyhow::Result<()> {
    let ruleset = lab.segbpf_ok(
        "srv",
        &[
            "export", "nft", "--policy", policy, "--role", ROLE, "--iface", "eth0",
        ],
    )?;
    let mut load = std::process::Command::new("ip")
        .args(["netns", "exec", &ns(lab, "srv"), "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(load.stdin.as_mut().expect("stdin"), ruleset.as_bytes())?;
    drop(load.stdin.take());
    let out = load.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "nft -f failed: {}\n{ruleset}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
#[ignore = "needs root, a kernel with BPF and nftables: run `cargo xtask test`"]
fn same_matrix_through_nft_export_gives_same_verdicts() -> anyhow::Result<()> {
    let scratch = Scratch::new("nft")?;
    let no_icmp = scratch.no_icmp_policy()?;
    let lab = flat_lab("rtn")?;
    let servers = UdpServers::start(&lab)?;
    let sizes = [100, 20000];

    // segbpf: the UDP and ping matrix, then the pings after icmp = false.
    lab.attach("srv", &policy(), &["--role", ROLE])?;
    let mut by_segbpf = udp_matrix(&lab, &servers, &sizes)?;
    by_segbpf.extend(ping_matrix(&lab, true, "icmp = true")?);
    lab.segbpf_ok("srv", &["reload", "eth0", "--policy", &no_icmp])?;
    by_segbpf.extend(ping_matrix(&lab, false, "icmp = false")?);
    print_counters(&lab)?;
    lab.segbpf_ok("srv", &["detach", "eth0"])?;

    // nftables: the same, from the exported rulesets.
    load_nft_export(&lab, &policy())?;
    let mut by_nft = udp_matrix(&lab, &servers, &sizes)?;
    by_nft.extend(ping_matrix(&lab, true, "icmp = true")?);
    load_nft_export(&lab, &no_icmp)?;
    by_nft.extend(ping_matrix(&lab, false, "icmp = false")?);

    print_cases("segbpf on srv", &by_segbpf);
    print_cases("segbpf export nft on srv", &by_nft);
    assert_eq!(by_segbpf.len(), by_nft.len());
    let mut bad = Vec::new();
    for (s, n) in by_segbpf.iter().zip(&by_nft) {
        assert_eq!(s.name, n.name, "the two runs list the same cases");
        if s.got != s.want || n.got != n.want {
            bad.push(format!(
                "{}: policy says {}, segbpf {}, nftables {}",
                s.name, s.want, s.got, n.got
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} cases differ from the policy:\n  {}",
        bad.len(),
        by_segbpf.len(),
        bad.join("\n  ")
    );
    let pairs = |cases: &[Case]| -> Vec<(String, Outcome)> {
        cases
            .iter()
            .map(|c| (c.name.clone(), c.got.clone()))
            .collect()
    };
    assert_eq!(pairs(&by_segbpf), pairs(&by_nft));
    Ok(())
}
