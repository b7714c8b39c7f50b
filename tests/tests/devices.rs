//! Devices beyond a plain Ethernet segment, and the connection table
//! under pressure, with real traffic through the `segbpf` binary.
//!
//! * A tun device (IFF_TUN: no link-layer header, packets start at the IP
//!   header) in a namespace of its own, with the test process as its
//!   peer: it writes hand-built TCP SYNs into the device's queue (the
//!   kernel receives them on `tun0`, where the XDP program runs) and
//!   reads what the kernel sends back (through the TC program). Allowed
//!   SYNs draw a SYN-ACK, denied ones nothing, in both families; before
//!   segbpf is attached every one of them draws a SYN-ACK, so a silence
//!   is segbpf's doing, and the status counters show the denied SYNs
//!   dropped at ingress. Two denied SYNs come from 8.6.1.2, whose first
//!   two address bytes (0x08 0x06) sit where an Ethernet header has its
//!   EtherType: a parser that assumes Ethernet takes them for ARP and
//!   lets them in. The 8.6.0.0/16 addresses exist only inside the
//!   namespace, which has no link to anything but the test process.
//! * A device whose frames segbpf cannot parse (a tun device turned into
//!   an 802.11 radiotap device with TUNSETLINK, no kernel module needed):
//!   attach refuses it, naming it, and leaves nothing attached.
//! * A SYN flood from far more spoofed sources than the connection table
//!   holds (`--ct-size 1024`), spread over every CPU and answered by the
//!   server's SYN-ACKs, against a host that serves tcp/80 to anyone with
//!   egress default-drop: a connection established before the flood
//!   keeps exchanging data every 50 ms during and after it, one that was
//!   idle during the flood still works after it (the replies of both pass
//!   only as long as the table remembers them), and new connections work.
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use segbpf::host::packet::PacketSpec;
use segbpf_common::{IPPROTO_TCP, reason};
use segbpf_tests::{
    Lab, net,
    netns::Netns,
    tun::{
        self, Conversation, ConversationReport, StreamEcho, TcpSegment, Tun,
        fill_transport_checksum, flags,
    },
};

fn fixture(name: &str) -> String {
    format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique tag for this test's namespace, pin root and state root.
fn unique(tag: &str) -> String {
    format!(
        "{tag}{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// segbpf run in one namespace with private pin and state roots
/// (`SEGBPF_BPFFS`, `SEGBPF_STATE_DIR`). Dropping it detaches `iface`
/// and removes both roots, also when the test fails.
struct Segbpf {
    bin: PathBuf,
    ns: String,
    iface: String,
    bpffs: PathBuf,
    state: PathBuf,
}

impl Segbpf {
    fn new(id: &str, ns: &str, iface: &str) -> anyhow::Result<Self> {
        let bin = segbpf_tests::lab::segbpf_bin();
        if !bin.exists() {
            bail!(
                "segbpf binary not found at {} (build it first: cargo build -p segbpf, or set SEGBPF_BIN)",
                bin.display()
            );
        }
        Ok(Segbpf {
            bin,
            ns: ns.to_string(),
            iface: iface.to_string(),
            bpffs: PathBuf::from(format!("/sys/fs/bpf/segbpf-test-{id}")),
            state: std::env::temp_dir().join(format!("segbpf-test-{id}")),
        })
    }

    /// `segbpf --netns NS ARGS...`.
    fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(&self.bin)
            .arg("--netns")
            .arg(&self.ns)
            .args(args)
            .env("SEGBPF_BPFFS", &self.bpffs)
            .env("SEGBPF_STATE_DIR", &self.state)
            .output()
            .with_context(|| format!("running {}", self.bin.display()))
    }

    /// Like [`Segbpf::run`] but fails unless the exit status is 0; returns stdout.
    fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.run(args)?;
        if !out.status.success() {
            bail!(
                "segbpf {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `attach` on its interface with tests/fixtures/tun.toml as the role
    /// `tunhost`, `--no-wait`, run by `with` ([`Segbpf::run`] or
    /// [`Segbpf::ok`]).
    fn attach_tunhost<R>(
        &self,
        with: impl FnOnce(&Self, &[&str]) -> anyhow::Result<R>,
    ) -> anyhow::Result<R> {
        let policy = fixture("tun.toml");
        with(
            self,
            &[
                "attach",
                &self.iface,
                "--policy",
                &policy,
                "--role",
                "tunhost",
                "--no-wait",
            ],
        )
    }

    /// `status IFACE --output json`, the interface's report.
    fn status(&self) -> anyhow::Result<serde_json::Value> {
        let out = self.ok(&["status", &self.iface, "--output", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("status JSON")?;
        Ok(v["attachments"][0].clone())
    }
}

impl Drop for Segbpf {
    fn drop(&mut self) {
        let _ = self.run(&["detach", &self.iface]);
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// Packets of `direction` counted under reason `code` in a status report.
fn count(status: &serde_json::Value, direction: &str, code: u8) -> u64 {
    status["directions"][direction][reason::name(code)]["packets"]
        .as_u64()
        .unwrap_or(0)
}

/// The IP packet of `spec` with its sequence number set to `seq` (the
/// builder uses 1) and a valid TCP checksum.
fn tcp_packet(spec: PacketSpec, seq: Option<u32>) -> Vec<u8> {
    let built = spec.build();
    let mut packet = built.bytes[built.l3..].to_vec();
    let l4 = built.l4 - built.l3;
    if let Some(seq) = seq {
        packet[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
    }
    fill_transport_checksum(&mut packet, l4, IPPROTO_TCP).expect("TCP checksum");
    packet
}

/// One SYN the peer sends and whether it must draw a SYN-ACK.
struct Probe {
    what: &'static str,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    data: usize,
    answered: bool,
}

impl Probe {
    /// The SYN as an IP packet.
    fn packet(&self) -> Vec<u8> {
        let spec = PacketSpec {
            payload: vec![0x5a; self.data],
            ..PacketSpec::tcp(self.src, self.dst, self.sport, self.dport)
        };
        tcp_packet(spec, None)
    }

    /// Whether `seg` is the kernel's answer to this probe.
    fn answers(&self, seg: &TcpSegment) -> bool {
        (seg.src, seg.dst, seg.sport, seg.dport) == (self.dst, self.src, self.dport, self.sport)
    }
}

/// The cases of the tun test: what, source, destination, destination
/// port, payload bytes of the SYN, whether tests/fixtures/tun.toml allows it.
///
/// The SYNs from 8.6.1.2 carry 100 bytes of data (legal in a SYN; the
/// kernel answers with a SYN-ACK and drops the data): a parser that
/// assumes an Ethernet header reads the EtherType ARP at bytes 12-13 and
/// an ARP header from byte 14 on, whose address lengths (bytes 18 and 19
/// of the IPv4 header, 50 and 1 in 198.18.50.1) ask for 8 + 2 × 51 bytes:
/// a shorter SYN would be dropped as malformed ARP, this one passes as ARP.
const CASES: [(&str, &str, &str, u16, usize, bool); 6] = [
    (
        "tcp/22 from the tun subnet",
        "198.18.50.2",
        "198.18.50.1",
        22,
        0,
        true,
    ),
    (
        "IPv6 tcp/22 from the tun subnet",
        "fd00:50::2",
        "fd00:50::1",
        22,
        0,
        true,
    ),
    (
        "tcp/8080 from the tun subnet",
        "198.18.50.2",
        "198.18.50.1",
        8080,
        0,
        false,
    ),
    (
        "tcp/8080 from 8.6.1.2 (bytes 12-13 read as EtherType ARP)",
        "8.6.1.2",
        "198.18.50.1",
        8080,
        100,
        false,
    ),
    (
        "tcp/22 from 8.6.1.2 (not in the allowed set; EtherType ARP too)",
        "8.6.1.2",
        "198.18.50.1",
        22,
        100,
        false,
    ),
    (
        "IPv6 tcp/8080 from the tun subnet",
        "fd00:50::2",
        "fd00:50::1",
        8080,
        0,
        false,
    ),
];

/// The probes of [`CASES`] with source ports from `base` on; each must be
/// answered if the policy allows it, or every one if `all_answered`.
fn probes(base: u16, all_answered: bool) -> Vec<Probe> {
    CASES
        .iter()
        .zip(base..)
        .map(|(&(what, src, dst, dport, data, allowed), sport)| Probe {
            what,
            src: ip(src),
            dst: ip(dst),
            sport,
            dport,
            data,
            answered: allowed || all_answered,
        })
        .collect()
}

/// How long a SYN that gets no answer is waited for.
const SILENCE: Duration = Duration::from_secs(1);

/// Writes every probe's SYN into the tun device, then reads what the
/// kernel sends back for up to [`SILENCE`] (less when every probe got its
/// answer). Returns the mismatches, one line each (empty: all as
/// expected). Every handshake that was answered is reset again so the
/// kernel does not retransmit into later probes.
fn run_probes(tun: &Tun, probes: &[Probe]) -> anyhow::Result<Vec<String>> {
    for p in probes {
        tun.send(&p.packet())?;
    }
    let mut answers: Vec<Option<TcpSegment>> = vec![None; probes.len()];
    let deadline = Instant::now() + SILENCE;
    while answers.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let Some(packet) = tun.recv(left)? else {
            break;
        };
        let Some(seg) = TcpSegment::parse(&packet) else {
            continue; // the kernel's own traffic (IPv6 router solicitations, MLD)
        };
        if let Some(i) = probes.iter().position(|p| p.answers(&seg))
            && answers[i].is_none()
        {
            answers[i] = Some(seg);
        }
    }
    let mut wrong = Vec::new();
    for (p, a) in probes.iter().zip(&answers) {
        let synack =
            a.is_some_and(|s| s.flags & (flags::SYN | flags::ACK) == flags::SYN | flags::ACK);
        let got = match a {
            None => "nothing".to_string(),
            Some(_) if synack => "a SYN-ACK".to_string(),
            Some(s) => format!("a segment with flags {:#04x}", s.flags),
        };
        let want = if p.answered { "a SYN-ACK" } else { "nothing" };
        let as_expected = if p.answered { synack } else { a.is_none() };
        if !as_expected {
            wrong.push(format!(
                "{}: {}:{} -> {}:{}: want {want}, got {got}",
                p.what, p.src, p.sport, p.dst, p.dport
            ));
        }
        if let Some(s) = a
            && synack
        {
            let rst = PacketSpec {
                tcp_flags: flags::RST,
                ..PacketSpec::tcp(p.src, p.dst, p.sport, p.dport)
            };
            tun.send(&tcp_packet(rst, Some(s.ack)))?;
        }
    }
    Ok(wrong)
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn tun_device_is_enforced_with_a_userspace_peer() -> anyhow::Result<()> {
    let id = unique("devtun");
    let ns = Netns::create(&id)?;
    let tun = Tun::create(&ns.name, "tun0")?;
    ns.ip(&["addr", "add", "198.18.50.1/24", "dev", "tun0"])?;
    ns.ip(&["addr", "add", "fd00:50::1/64", "dev", "tun0", "nodad"])?;
    ns.ip(&["link", "set", "tun0", "up"])?;
    // Replies to the spoofed 8.6.1.2 go back into the tun device (the
    // namespace has no other interface: nothing leaves the machine).
    ns.ip(&["route", "add", "8.6.0.0/16", "dev", "tun0"])?;
    let mut listeners = Vec::new();
    for addr in ["198.18.50.1", "fd00:50::1"] {
        for port in [22, 8080] {
            listeners.push(net::Server::tcp_echo(&ns.name, ip(addr), port)?);
        }
    }

    // Without segbpf every probe is answered: a silence later is segbpf's doing.
    let wrong = run_probes(&tun, &probes(40000, true))?;
    assert!(wrong.is_empty(), "without segbpf:\n{}", wrong.join("\n"));

    let segbpf = Segbpf::new(&id, &ns.name, "tun0")?;
    let out = segbpf.attach_tunhost(Segbpf::ok)?;
    println!("attach: {}", out.trim());
    let before = segbpf.status()?;
    assert_eq!(before["attached"], true, "status after attach: {before}");

    let probes = probes(41000, false);
    let wrong = run_probes(&tun, &probes)?;
    let after = segbpf.status()?;
    let rise =
        |field: &str| after[field].as_u64().unwrap_or(0) - before[field].as_u64().unwrap_or(0);
    let rise_of = |dir: &str, code: u8| count(&after, dir, code) - count(&before, dir, code);
    let dropped = rise("dropped");
    let ingress_default_drop = rise_of("ingress", reason::DROP_DEFAULT);
    let arp = rise_of("ingress", reason::PASS_ARP) + rise_of("egress", reason::PASS_ARP);
    println!(
        "dropped +{dropped}, ingress default-drop +{ingress_default_drop}, arp +{arp}; counters: {}",
        after["counters"]
    );
    assert!(
        wrong.is_empty(),
        "with segbpf on tun0:\n{}",
        wrong.join("\n")
    );
    let denied = probes.iter().filter(|p| !p.answered).count() as u64;
    assert!(
        dropped >= denied,
        "status counts the {denied} dropped SYNs: dropped rose by {dropped}"
    );
    // The drops happen at ingress (XDP judged the SYNs), not only on the
    // SYN-ACKs that egress default-drop would stop too.
    assert!(
        ingress_default_drop >= denied,
        "the {denied} denied SYNs are dropped at ingress by the default: ingress default-drop rose by {ingress_default_drop}"
    );
    assert_eq!(
        arp, 0,
        "a tun device carries no ARP: no packet passes as ARP"
    );
    // `trace` runs its packet as the tun device sees it (no Ethernet header).
    for (src, dport, verdict) in [
        ("8.6.1.2", "8080", "drop"),
        ("198.18.50.2", "8080", "drop"),
        ("198.18.50.2", "22", "allow"),
    ] {
        let out = segbpf.ok(&[
            "trace",
            "tun0",
            "--src",
            src,
            "--dst",
            "198.18.50.1",
            "--proto",
            "tcp",
            "--dport",
            dport,
            "--output",
            "json",
        ])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("trace JSON")?;
        assert_eq!(v["verdict"], verdict, "trace {src} -> :{dport}: {out}");
    }
    drop(segbpf);
    drop(listeners);
    drop(tun);
    Ok(())
}

/// `ARPHRD_IEEE80211_RADIOTAP`: frames start with a radiotap header.
const ARPHRD_IEEE80211_RADIOTAP: u16 = 803;

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn attach_refuses_a_device_it_cannot_parse() -> anyhow::Result<()> {
    let id = unique("devbad");
    let ns = Netns::create(&id)?;
    let tun = Tun::create(&ns.name, "wlan0")?;
    tun.set_link_type(ARPHRD_IEEE80211_RADIOTAP)?;
    ns.ip(&["addr", "add", "198.18.51.1/24", "dev", "wlan0"])?;
    ns.ip(&["link", "set", "wlan0", "up"])?;
    let link = ns.ip(&["-j", "-d", "link", "show", "wlan0"])?;
    let link: serde_json::Value = serde_json::from_str(&link)?;
    assert_eq!(link[0]["link_type"], "ieee802.11/radiotap", "{link}");

    let segbpf = Segbpf::new(&id, &ns.name, "wlan0")?;
    let out = segbpf.attach_tunhost(Segbpf::run)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("attach: {} {}", out.status, stderr.trim());
    assert_eq!(
        out.status.code(),
        Some(1),
        "attach to a radiotap device fails: {stderr}"
    );
    assert!(
        stderr.contains("wlan0"),
        "the error names the device: {stderr}"
    );
    let link = ns.ip(&["-j", "-d", "link", "show", "wlan0"])?;
    let link: serde_json::Value = serde_json::from_str(&link)?;
    assert!(
        link[0].get("xdp").is_none(),
        "no XDP program is left on wlan0: {link}"
    );
    let status = segbpf.run(&["status", "wlan0", "--output", "json"])?;
    let attached = serde_json::from_slice::<serde_json::Value>(&status.stdout)
        .ok()
        .is_some_and(|v| v["attachments"][0]["attached"] == true);
    assert!(!attached, "status reports no attachment on wlan0");
    drop(segbpf);
    drop(tun);
    Ok(())
}

/// The IPv4 connection-table key holds 24 bits of the interface index
/// (`segbpf_common::CT4_MAX_IFINDEX`): attach refuses an interface whose
/// index is larger (its flows could not be kept apart from another
/// interface's), exit 1, naming the interface and its index, before it
/// changes anything (no pin root, no state, no program on the link); an
/// interface at the largest index that fits attaches.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn attach_refuses_an_interface_index_beyond_24_bits() -> anyhow::Result<()> {
    let id = unique("devidx");
    let ns = Netns::create(&id)?;
    let big = segbpf_common::CT4_MAX_IFINDEX + 1;
    let fits = segbpf_common::CT4_MAX_IFINDEX;
    for (name, peer, index) in [("big0", "big1", big), ("fit0", "fit1", fits)] {
        ns.ip(&[
            "link",
            "add",
            name,
            "index",
            &index.to_string(),
            "type",
            "veth",
            "peer",
            "name",
            peer,
        ])?;
        ns.ip(&["link", "set", name, "up"])?;
        ns.ip(&["link", "set", peer, "up"])?;
    }
    ns.ip(&["addr", "add", "198.18.50.1/24", "dev", "fit0"])?;

    let refused = Segbpf::new(&id, &ns.name, "big0")?;
    let out = refused.attach_tunhost(Segbpf::run)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("attach big0: {} {}", out.status, stderr.trim());
    assert_eq!(out.status.code(), Some(1), "refused: {stderr}");
    assert!(
        stderr.contains("big0") && stderr.contains(&big.to_string()),
        "the error names the interface and its index: {stderr}"
    );
    assert!(
        !refused.bpffs.exists() && !refused.state.exists(),
        "nothing was made: {} {}",
        refused.bpffs.display(),
        refused.state.display()
    );
    let link: serde_json::Value =
        serde_json::from_str(&ns.ip(&["-j", "-d", "link", "show", "big0"])?)?;
    assert!(link[0].get("xdp").is_none(), "no XDP program: {link}");
    drop(refused);

    let ok = Segbpf::new(&id, &ns.name, "fit0")?;
    ok.attach_tunhost(Segbpf::ok)?;
    assert_eq!(ok.status()?["attached"], true, "index {fits} attaches");
    drop(ok);
    Ok(())
}

/// Table size the flood test attaches with (the smallest `--ct-size`).
const CT_SIZE: u32 = 1024;
/// Distinct spoofed sources of the flood (198.19.0.0/16).
const FLOOD_SOURCES: u32 = 20_000;
/// How long the flood lasts.
const FLOOD: Duration = Duration::from_secs(3);
/// SYNs sent per millisecond, all sender threads together (up to 40,000
/// a second: dozens of times the table, without starving the machine or
/// overflowing the veth queue the established connections share).
const FLOOD_PER_MS: usize = 40;
/// Most sender threads (CPUs) the flood uses.
const FLOOD_MAX_THREADS: usize = 16;

/// A small xorshift generator (random source ports; no dependency).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Floods `dst`:80 from `ns`'s eth0 with SYNs from spoofed sources in
/// 198.19.0.0/16 (random source ports, valid checksums) as raw Ethernet
/// frames from `src_mac` to `dst_mac`, for [`FLOOD`]. One sender thread
/// is pinned to each CPU the test may use, so the receiving side handles
/// the flood on every CPU, as a NIC spreading random sources over its
/// queues would (the kernel's LRU maps keep per-CPU lists: a flood on one
/// CPU alone may spare entries another CPU made). Returns how many SYNs
/// were sent.
fn syn_flood(ns: &str, src_mac: [u8; 6], dst_mac: [u8; 6], dst: IpAddr) -> anyhow::Result<u64> {
    let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
    let cpus: Vec<usize> = (0..nix::sched::CpuSet::count())
        .filter(|&c| allowed.is_set(c).unwrap_or(false))
        .take(FLOOD_MAX_THREADS)
        .collect();
    let threads = cpus.len().max(1);
    let burst = FLOOD_PER_MS.div_ceil(threads);
    let end = Instant::now() + FLOOD;
    let senders = cpus
        .into_iter()
        .enumerate()
        .map(|(t, cpu)| {
            let sender = net::RawSender::open(ns, "eth0")?;
            Ok(std::thread::spawn(move || -> anyhow::Result<u64> {
                let mut set = nix::sched::CpuSet::new();
                set.set(cpu)?;
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
                let mut rng = XorShift(
                    0x5e9b_f10d_0000_0001 ^ ((t as u64) << 40) ^ u64::from(std::process::id()),
                );
                let mut sent = 0u64;
                while Instant::now() < end {
                    for _ in 0..burst {
                        let k =
                            ((sent * threads as u64 + t as u64) % u64::from(FLOOD_SOURCES)) as u32;
                        let src = IpAddr::from([198, 19, (k >> 8) as u8, k as u8]);
                        let sport = 1024 + (rng.next() % (65536 - 1024)) as u16;
                        let built = PacketSpec::tcp(src, dst, sport, 80).build();
                        let mut frame = built.bytes;
                        frame[..6].copy_from_slice(&dst_mac);
                        frame[6..12].copy_from_slice(&src_mac);
                        fill_transport_checksum(
                            &mut frame[built.l3..],
                            built.l4 - built.l3,
                            IPPROTO_TCP,
                        )?;
                        sender.send(&frame)?;
                        sent += 1;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(sent)
            }))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut sent = 0;
    for s in senders {
        sent += s
            .join()
            .map_err(|_| anyhow::anyhow!("flood thread panicked"))??;
    }
    Ok(sent)
}

fn conntrack(status: &serde_json::Value) -> String {
    let ct = &status["conntrack"];
    let mut s = format!("conntrack {} of {}", ct["entries"], ct["size"]);
    if ct.get("half_open_size").is_some() {
        s = format!(
            "{s}, half-open {} of {}",
            ct["half_open_entries"], ct["half_open_size"]
        );
    }
    s
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn syn_flood_larger_than_the_table_keeps_established_flows() -> anyhow::Result<()> {
    let mut lab = Lab::new("devfl")?;
    lab.add_host("srv", &["198.18.60.1/24"])?;
    lab.add_host("cli", &["198.18.60.2/24"])?;
    let (srv_ns, cli_ns) = (
        lab.host("srv").ns.name.clone(),
        lab.host("cli").ns.name.clone(),
    );
    let (srv, cli) = (ip("198.18.60.1"), ip("198.18.60.2"));
    // srv answers the spoofed SYNs like a server with a default gateway
    // (cli, which drops them: not its addresses), so every flood entry
    // is used twice (the SYN and the SYN-ACK), as live flows are.
    lab.default_route("srv", "198.18.60.2")?;
    let _echo = StreamEcho::start(&srv_ns, ip("0.0.0.0"), 80)?;
    assert!(
        net::tcp_exchange(&cli_ns, cli, srv, 80, Duration::from_secs(2))?,
        "the lab works without segbpf"
    );

    let ct_size = CT_SIZE.to_string();
    lab.attach(
        "srv",
        &fixture("flood.toml"),
        &["--role", "srv", "--ct-size", &ct_size],
    )?;
    let before = lab.status_json("srv")?["attachments"][0].clone();
    assert_eq!(
        before["conntrack"]["size"], CT_SIZE,
        "{}",
        before["conntrack"]
    );

    // An idle connection: one exchange before the flood, one after it.
    let mut idle = tun::connect_in(
        &cli_ns,
        cli,
        SocketAddr::new(srv, 80),
        Duration::from_secs(2),
    )?;
    tun::exchange(&mut idle, b"before the flood").context("idle connection before the flood")?;
    let talk = Conversation::start(
        &cli_ns,
        cli,
        SocketAddr::new(srv, 80),
        100,
        Duration::from_millis(50),
        Duration::from_secs(2),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let before_flood = talk.ok();

    let (src_mac, dst_mac) = (net::mac(&cli_ns, "eth0")?, net::mac(&srv_ns, "eth0")?);
    let started = Instant::now();
    let sent = syn_flood(&cli_ns, src_mac, dst_mac, srv)?;
    let flood_time = started.elapsed();
    let during = talk.ok() - before_flood;
    let mid = lab.status_json("srv")?["attachments"][0].clone();
    std::thread::sleep(Duration::from_secs(1));
    let report: ConversationReport = talk.finish();
    let idle_after = tun::exchange(&mut idle, b"after the flood").map_err(|e| format!("{e:#}"));
    let after = lab.status_json("srv")?["attachments"][0].clone();
    let opened =
        count(&after, "ingress", reason::PASS_RULE) - count(&before, "ingress", reason::PASS_RULE);
    println!(
        "flood: {sent} SYNs in {flood_time:.1?} ({opened} let in by the rule); \
         right after it: {}; one second later: {}",
        conntrack(&mid),
        conntrack(&after)
    );
    println!(
        "established connection: {} exchanges ({before_flood} before the flood, {during} during it), \
         {} failed, slowest {:?}{}",
        report.ok,
        report.failed,
        report.slowest,
        report
            .failure
            .as_ref()
            .map(|(t, e)| format!(", first failure at {t:.1?}: {e}"))
            .unwrap_or_default()
    );
    println!("idle connection, after the flood: {idle_after:?}");
    println!("counters: {}", after["counters"]);

    let table = u64::from(CT_SIZE);
    assert!(sent >= 8 * table, "the flood sent only {sent} SYNs");
    assert!(
        opened >= 4 * table,
        "only {opened} flood SYNs reached srv and passed the rule"
    );
    assert_eq!(
        report.failed, 0,
        "every exchange on the established connection succeeds: {:?}",
        report.failure
    );
    assert!(
        idle_after.is_ok(),
        "the connection that was idle during the flood still works: {idle_after:?}"
    );
    assert!(
        before_flood > 0,
        "the connection exchanged data before the flood"
    );
    assert!(
        during >= 10,
        "the connection kept exchanging during the flood ({during} exchanges)"
    );
    assert!(
        net::tcp_exchange(&cli_ns, cli, srv, 80, Duration::from_secs(2))?,
        "a new connection works after the flood"
    );
    Ok(())
}
