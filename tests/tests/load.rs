//! Under load: the kernel memory an attachment holds (the connection
//! tables are the namespace's, not each interface's), measured from the
//! kernel's own accounting (`memlock` in fdinfo of every program and map);
//! and a flood with reloads in the middle that breaks no established flow
//! of a real socket and leaks no program, map or pin; and the verifier's
//! work per attachment (processed instructions, the kernel's count).
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::{maps::MapInfo, programs::ProgramInfo};
use segbpf::host::packet::PacketSpec;
use segbpf_common::IPPROTO_TCP;
use segbpf_tests::{Lab, lab::one_tcp_port_policy, net, netns, tun::fill_transport_checksum};

const MIB: u64 = 1024 * 1024;

fn example_policy() -> String {
    format!("{}/../examples/roles.toml", env!("CARGO_MANIFEST_DIR"))
}

/// What the kernel holds for everything pinned under `root`: the programs,
/// the maps they use (pinned or not) and the pinned maps, each counted
/// once, with its `memlock` from fdinfo.
#[derive(Debug, PartialEq, Eq)]
struct Held {
    bytes: u64,
    progs: BTreeSet<u32>,
    maps: BTreeSet<u32>,
    pins: BTreeSet<PathBuf>,
}

fn fd_memlock(fd: std::os::fd::BorrowedFd<'_>) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no memlock in fdinfo"))
}

/// The program at `index` of the pinned program array at `path`: a lookup
/// from userspace answers with its id.
fn prog_in_table(path: &Path, index: u32) -> anyhow::Result<ProgramInfo> {
    #[repr(C)]
    struct Lookup {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let map = aya::maps::MapData::from_pin(path)?;
    let key = index;
    let mut id = 0u32;
    let attr = Lookup {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(&key) as u64,
        value: std::ptr::from_mut(&mut id) as u64,
        flags: 0,
    };
    // SAFETY: bpf(2) BPF_MAP_LOOKUP_ELEM with an initialised attribute
    // block; the kernel reads `key` and writes `id`, alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            1,
            std::ptr::from_ref(&attr),
            size_of::<Lookup>(),
        )
    };
    anyhow::ensure!(
        rc == 0,
        "{}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .ok_or_else(|| anyhow::anyhow!("{}: program {id} is gone", path.display()))
}

fn held(root: &Path) -> anyhow::Result<Held> {
    let mut h = Held {
        bytes: 0,
        progs: BTreeSet::new(),
        maps: BTreeSet::new(),
        pins: BTreeSet::new(),
    };
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd {
            let path = e?.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("prog_") {
                let info = ProgramInfo::from_pin(&path)?;
                if h.progs.insert(info.id()) {
                    h.bytes += u64::from(info.memory_locked()?);
                }
                h.maps.extend(info.map_ids()?.unwrap_or_default());
            } else if name.starts_with("SEG_") {
                h.maps.insert(MapInfo::from_pin(&path)?.id());
                if segbpf_common::TAIL_MAPS.contains(&name.as_str()) {
                    // A tail-call table holds programs (the IPv6 half of
                    // the attached one, and its ICMP error program), which
                    // are not pinned.
                    for index in [segbpf_common::TAIL_INDEX_V6, segbpf_common::TAIL_INDEX_ERR] {
                        let info = prog_in_table(&path, index)?;
                        if h.progs.insert(info.id()) {
                            h.bytes += u64::from(info.memory_locked()?);
                        }
                        h.maps.extend(info.map_ids()?.unwrap_or_default());
                    }
                }
            }
            h.pins.insert(path);
        }
    }
    for id in &h.maps {
        let fd = MapInfo::from_id(*id)?.fd()?;
        h.bytes += fd_memlock(fd.as_fd())?;
    }
    Ok(h)
}

/// Kernel memory `status` reports for every attachment of `host`'s
/// namespace: each attachment's own bytes, the shared tables once.
fn status_memory(lab: &Lab, host: &str) -> anyhow::Result<(u64, Vec<u64>)> {
    let out = lab.segbpf_ok(host, &["status", "--output", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let atts = v["attachments"].as_array().cloned().unwrap_or_default();
    let mut total = 0;
    let mut shared_by = Vec::new();
    for a in &atts {
        total += a["memory"]["attachment_bytes"].as_u64().unwrap_or(0);
        shared_by.push(a["memory"]["shared_by"].as_u64().unwrap_or(0));
    }
    total += atts
        .first()
        .and_then(|a| a["memory"]["shared_bytes"].as_u64())
        .unwrap_or(0);
    Ok((total, shared_by))
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn memory_does_not_multiply_per_interface() -> anyhow::Result<()> {
    let mut lab = Lab::new("mem")?;
    lab.add_host("web", &["10.10.1.10/16"])?;
    let ns = lab.host("web").ns.name.clone();
    let policy = example_policy();
    let web = ["--role", "web"];
    lab.attach("web", &policy, &web)?;
    let one = held(&lab.bpffs)?;
    // 48 MiB since IPv6 flows have a table of our own too (`SEG_CT6_SETS`,
    // `SEG_CT6_WAYS`: 18 MiB per namespace at the default `--ct-size`, in
    // place of 15 MiB of IPv6 LRU tables; about 44 MiB here); 44 MiB with
    // the IPv4 table of our own alone (19 MiB, in place of 12.5 MiB of IPv4
    // LRU tables), 40 MiB with the IPv4 LRU tables, 32 MiB before them.
    assert!(
        one.bytes <= 48 * MIB,
        "the example policy on one interface holds {} MiB",
        one.bytes / MIB
    );
    let (reported, _) = status_memory(&lab, "web")?;
    assert_eq!(reported, one.bytes, "status reports what the kernel holds");
    // The size the tables were made for, as the namespace's tables
    // record it: the default `--ct-size` and its half-open quarter.
    let v: serde_json::Value =
        serde_json::from_str(&lab.segbpf_ok("web", &["status", "--output", "json"])?)?;
    let ct = &v["attachments"][0]["conntrack"];
    assert_eq!(
        (ct["size"].as_u64(), ct["half_open_size"].as_u64()),
        (Some(65_536), Some(16_384)),
        "{ct}"
    );

    // Nineteen more interfaces in the same namespace.
    let ifaces: Vec<String> = (1..20).map(|i| format!("v{i}")).collect();
    for (i, v) in ifaces.iter().enumerate() {
        let peer = format!("w{}", i + 1);
        netns::ip(&[
            "-n", &ns, "link", "add", v, "type", "veth", "peer", "name", &peer,
        ])?;
        netns::ip(&["-n", &ns, "link", "set", v, "up"])?;
        netns::ip(&["-n", &ns, "link", "set", &peer, "up"])?;
        lab.segbpf_ok(
            "web",
            &[
                "attach",
                v,
                "--policy",
                &policy,
                "--role",
                "web",
                "--no-wait",
            ],
        )?;
    }
    let all = held(&lab.bpffs)?;
    assert!(
        all.bytes <= 300 * MIB,
        "20 attachments of the example policy hold {} MiB",
        all.bytes / MIB
    );
    let (reported, shared_by) = status_memory(&lab, "web")?;
    assert_eq!(reported, all.bytes, "status reports what the kernel holds");
    assert_eq!(shared_by, vec![20; 20]);
    // Names for the message below, read while every map is in use (a
    // pinned program array has a user reference, so opening it is safe).
    let names: BTreeMap<u32, String> = all
        .maps
        .iter()
        .filter_map(|id| {
            let m = MapInfo::from_id(*id).ok()?;
            Some((*id, m.name_as_str().unwrap_or("?").to_string()))
        })
        .collect();

    // Detaching keeps the tables while one attachment uses them, then
    // removes every program, map and pin: nothing leaks.
    for v in &ifaces {
        lab.segbpf_ok("web", &["detach", v])?;
    }
    assert_eq!(held(&lab.bpffs)?, one, "back to one attachment");
    lab.segbpf_ok("web", &["detach", "eth0"])?;
    let left: Vec<_> = std::fs::read_dir(&lab.bpffs)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "pins left: {left:?}");
    // Programs and maps are freed once unpinned, by deferred kernel work
    // after an RCU grace period (a prog array first drops its programs,
    // then they drop their maps). Under a flood on the other core that
    // work can lag by seconds; a leak never goes away, so wait long.
    // The ids are listed, never opened: opening a retiring program array
    // by id would itself leak it (see `live_map_ids`).
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let live = live_map_ids()?;
        let maps: Vec<String> = all
            .maps
            .iter()
            .filter(|id| live.contains(id))
            .map(|id| format!("map {id} {:?}", names.get(id)))
            .collect();
        let progs: Vec<String> = all
            .progs
            .iter()
            .filter(|id| {
                aya::programs::loaded_programs()
                    .flatten()
                    .any(|p| p.id() == **id)
            })
            .map(|id| format!("prog {id}"))
            .collect();
        if maps.is_empty() && progs.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "programs/maps still in the kernel after 60 s: {maps:?} {progs:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// `status` while a tail-call table is being retired (its pin removed, as
/// a detach or a reload does, while the attached program still holds it)
/// opens it by no id, so the kernel frees it after the detach. The pin is
/// removed and `status` runs at once on one CPU, at real-time priority
/// ahead of that CPU's kworker: the kernel's deferred clear of the table
/// (queued when its last user reference went) is then still pending when
/// `status` would close a descriptor opened by id, which is what makes the
/// kernel keep the table forever (see `live_map_ids`).
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn status_never_reopens_a_retiring_tail_table() -> anyhow::Result<()> {
    let mut lab = Lab::new("tailref")?;
    lab.add_host("web", &["10.10.1.10/16"])?;
    let ns = lab.host("web").ns.name.clone();
    lab.attach("web", &example_policy(), &["--role", "web"])?;
    let mut dirs = vec![lab.bpffs.clone()];
    let mut pin = None;
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir)? {
            let path = e?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path
                .file_name()
                .is_some_and(|n| n == segbpf_common::MAP_TAIL_XDP)
            {
                pin = Some(path);
            }
        }
    }
    let pin = pin.ok_or_else(|| anyhow::anyhow!("no pinned {}", segbpf_common::MAP_TAIL_XDP))?;
    // Through the pin, which holds a user reference: safe.
    let id = MapInfo::from_pin(&pin)?.id();
    let out = std::process::Command::new("chrt")
        .args(["-f", "1", "taskset", "-c", "0", "sh", "-c"])
        .arg(r#"rm -- "$1" && exec "$2" --netns "$3" status --output json"#)
        .arg("sh")
        .arg(&pin)
        .arg(segbpf_tests::lab::segbpf_bin())
        .arg(&ns)
        .env("SEGBPF_BPFFS", &lab.bpffs)
        .env("SEGBPF_STATE_DIR", &lab.state)
        .output()?;
    assert!(
        out.status.success(),
        "status with the tail-call table unpinned: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lab.segbpf_ok("web", &["detach", "eth0"])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while live_map_ids()?.contains(&id) {
        assert!(
            Instant::now() < deadline,
            "the retired tail-call table (map {id}) is still in the kernel 30 s after the detach"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// The ids of every map in the kernel, listed with `BPF_MAP_GET_NEXT_ID`,
/// which opens none. Opening a map by id (`MapInfo::from_id`) gives it a
/// user reference again; a program array whose user references fall to
/// zero a second time before the kernel's deferred clear of the first
/// time has run keeps one map reference forever (`prog_array_map_clear`
/// in `kernel/bpf/arraymap.c` queues a work item that is already queued),
/// so probing a just-detached tail-call table by id can leak it.
fn live_map_ids() -> anyhow::Result<BTreeSet<u32>> {
    const BPF_MAP_GET_NEXT_ID: libc::c_long = 12;
    #[repr(C)]
    struct IdAttr {
        start_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut ids = BTreeSet::new();
    let mut attr = IdAttr {
        start_id: 0,
        next_id: 0,
        open_flags: 0,
    };
    loop {
        // SAFETY: bpf(2) BPF_MAP_GET_NEXT_ID with an initialised attribute
        // block of its size; the kernel writes `next_id` only.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_ID,
                std::ptr::from_mut(&mut attr),
                size_of::<IdAttr>(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            anyhow::ensure!(
                e.raw_os_error() == Some(libc::ENOENT),
                "BPF_MAP_GET_NEXT_ID: {e}"
            );
            return Ok(ids);
        }
        ids.insert(attr.next_id);
        attr.start_id = attr.next_id;
    }
}

/// A TCP server in `ns` on `addr:port` that echoes everything on every
/// connection until `stop`.
fn echo_server(ns: &str, addr: IpAddr, port: u16, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let path = format!("/run/netns/{ns}");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let listener =
            netns::enter(&path).and_then(|()| Ok(TcpListener::bind(SocketAddr::new(addr, port))?));
        let listener = match listener {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let _ = listener.set_nonblocking(true);
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let stop = Arc::clone(&stop);
                    std::thread::spawn(move || {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                        let mut buf = [0u8; 256];
                        while !stop.load(Ordering::Relaxed) {
                            match s.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if s.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => break,
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    rx.recv()?
}

/// Exchanges, on one connection kept open, a message and its echo every
/// 20 ms until `stop`; counts the exchanges that worked and those that did
/// not (an error, or no echo within 2 s).
fn held_flow(
    ns: &str,
    dst: SocketAddr,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> anyhow::Result<()> {
        netns::enter(&path)?;
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let msg = i.to_be_bytes();
            let mut back = [0u8; 8];
            let worked = s.write_all(&msg).is_ok() && s.read_exact(&mut back).is_ok();
            if worked && back == msg {
                ok.fetch_add(1, Ordering::Relaxed);
            } else {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    })
}

/// SYNs to `dst:port` from spoofed sources in 198.19.0.0/16 (each a new
/// half-open entry) as raw frames from `ns`'s eth0, until `stop`.
fn syn_flood(
    ns: &str,
    macs: ([u8; 6], [u8; 6]),
    dst: IpAddr,
    port: u16,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<u64>>> {
    let sender = net::RawSender::open(ns, "eth0")?;
    Ok(std::thread::spawn(move || -> anyhow::Result<u64> {
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..200 {
                let k = (sent % 65_536) as u32;
                let src = IpAddr::from([198, 19, (k >> 8) as u8, k as u8]);
                let built = PacketSpec::tcp(src, dst, 1024 + (sent % 60_000) as u16, port).build();
                let mut frame = built.bytes;
                frame[..6].copy_from_slice(&macs.1);
                frame[6..12].copy_from_slice(&macs.0);
                fill_transport_checksum(&mut frame[built.l3..], built.l4 - built.l3, IPPROTO_TCP)?;
                sender.send(&frame)?;
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(sent)
    }))
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn flood_with_reloads_in_the_middle_breaks_and_leaks_nothing() -> anyhow::Result<()> {
    let mut lab = Lab::new("fld")?;
    lab.add_host("srv", &["198.18.0.10/24"])?;
    lab.add_host("cli", &["198.18.0.20/24"])?;
    let (srv, cli) = (lab.host("srv").addrs[0], lab.host("cli").addrs[0]);
    let (srv_ns, cli_ns) = (
        lab.host("srv").ns.name.clone(),
        lab.host("cli").ns.name.clone(),
    );
    // 8443 is open to all but has no listener: the host's own TCP stack
    // stays out of the SYN flood (a SYN queue filled with spoofed sources
    // would refuse new connections by itself).
    let a_text = one_tcp_port_policy(8080).replace("tcp = [8080]", "tcp = [8080, 8443]");
    let a = lab.write_policy("a.toml", &a_text)?;
    let b = lab.write_policy("b.toml", &a_text.replace("8443]", "8443, 9443]"))?;
    lab.attach("srv", a.to_str().unwrap(), &["--role", "srv"])?;

    let stop = Arc::new(AtomicBool::new(false));
    echo_server(&srv_ns, srv, 8080, Arc::clone(&stop))?;
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let flow = held_flow(
        &cli_ns,
        SocketAddr::new(srv, 8080),
        Arc::clone(&stop),
        Arc::clone(&ok),
        Arc::clone(&failed),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while ok.load(Ordering::Relaxed) < 10 {
        anyhow::ensure!(
            Instant::now() < deadline && !flow.is_finished(),
            "the held flow did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = held(&lab.bpffs)?;

    // Flood: spoofed SYNs to an open port (half-open entries in the shared
    // tables, evicting each other) and datagrams to a closed one (drops, events, denied
    // aggregates), from the client's side of the wire.
    let flooding = Arc::new(AtomicBool::new(false));
    let macs = (net::mac(&cli_ns, "eth0")?, net::mac(&srv_ns, "eth0")?);
    let syn = syn_flood(&cli_ns, macs, srv, 8443, Arc::clone(&flooding))?;
    let udp = {
        let ns = cli_ns.clone();
        std::thread::spawn(move || net::udp_flood(&ns, cli, srv, 9999, Duration::from_secs(10)))
    };
    std::thread::sleep(Duration::from_secs(3));
    // Reloads in the middle of it, each applied.
    let gen0 = segbpf::attachment::maps::pinned_config(
        &segbpf::attachment::pins::Roots {
            bpffs: lab.bpffs.clone(),
            state: lab.state.clone(),
        }
        .attachment("eth0", &segbpf::host::netns::Netns::named(&srv_ns)?),
    )?
    .generation;
    for i in 0..10 {
        let p = if i % 2 == 0 { &b } else { &a };
        lab.segbpf_ok("srv", &["reload", "eth0", "--policy", p.to_str().unwrap()])?;
        std::thread::sleep(Duration::from_millis(300));
    }
    let sent_udp = udp
        .join()
        .map_err(|_| anyhow::anyhow!("udp flood panicked"))??;
    flooding.store(true, Ordering::Relaxed);
    let sent_syn = syn
        .join()
        .map_err(|_| anyhow::anyhow!("syn flood panicked"))??;
    std::thread::sleep(Duration::from_millis(500));
    // New connections still open (the server runs until `stop`).
    assert!(
        lab.tcp_reachable("cli", "srv", 8080)?,
        "a new connection after the flood"
    );
    stop.store(true, Ordering::Relaxed);
    flow.join()
        .map_err(|_| anyhow::anyhow!("held flow panicked"))??;

    // Nothing broke: every exchange of the held flow worked, the floods
    // were judged, and the last policy is in force.
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} of {} exchanges failed", ok + failed);
    assert!(ok > 200, "only {ok} exchanges");
    assert!(
        sent_udp > 10_000 && sent_syn > 10_000,
        "{sent_udp} / {sent_syn} sent"
    );
    let st = lab.status_json("srv")?;
    let att = &st["attachments"][0];
    assert_eq!(att["state"]["generation"].as_u64(), Some(gen0 + 10));
    assert!(
        att["counters"]["default-drop"].as_u64().unwrap_or(0) > 1000,
        "the flood was dropped: {}",
        att["counters"]
    );

    // Nothing leaked: the same programs, maps and pins, holding the same
    // kernel memory, as before the flood and the reloads.
    let after = held(&lab.bpffs)?;
    assert_eq!(after.pins, before.pins);
    assert_eq!(after.progs, before.progs);
    assert_eq!(after.maps, before.maps);
    assert!(
        after.bytes <= before.bytes + before.bytes / 100,
        "{} bytes before, {} after",
        before.bytes,
        after.bytes
    );
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn a_flow_of_one_interface_opens_nothing_on_another() -> anyhow::Result<()> {
    let mut lab = Lab::new("iso")?;
    lab.add_host("srv", &["198.18.0.10/24"])?;
    lab.add_host("cli", &["198.18.0.20/24"])?;
    let (srv, cli) = (lab.host("srv").addrs[0], lab.host("cli").addrs[0]);
    let ns = lab.host("srv").ns.name.clone();
    netns::ip(&[
        "-n", &ns, "link", "add", "v1", "type", "veth", "peer", "name", "w1",
    ])?;
    netns::ip(&["-n", &ns, "link", "set", "v1", "up"])?;
    netns::ip(&["-n", &ns, "link", "set", "w1", "up"])?;
    let policy = lab.write_policy("p.toml", &one_tcp_port_policy(8080))?;
    for iface in ["eth0", "v1"] {
        lab.segbpf_ok(
            "srv",
            &[
                "attach",
                iface,
                "--policy",
                policy.to_str().unwrap(),
                "--role",
                "srv",
                "--no-wait",
            ],
        )?;
    }
    // The host opens a UDP flow to the client through eth0 (egress allowed).
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> anyhow::Result<()> {
        netns::enter(&path)?;
        let s = std::net::UdpSocket::bind(SocketAddr::new(srv, 5353))?;
        s.send_to(b"query", SocketAddr::new(cli, 9999))?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("sender panicked"))??;

    // Its reply passes on eth0's entry; on v1, whose programs share the
    // namespace's tables, the same 4-tuple is no flow: the policy drops it.
    let reply = PacketSpec::udp(cli, srv, 9999, 5353).build().bytes;
    let target = segbpf::host::netns::Netns::named(&ns)?;
    let roots = segbpf::attachment::pins::Roots {
        bpffs: lab.bpffs.clone(),
        state: lab.state.clone(),
    };
    let mut verdicts = Vec::new();
    for iface in ["eth0", "v1"] {
        let att = roots.attachment(iface, &target);
        let mut dry = segbpf_tests::harness::Instance::dry_run(&att)?;
        let v = dry.ingress(&reply)?;
        verdicts.push((iface, segbpf_common::reason::name(v.reason)));
    }
    assert_eq!(
        verdicts,
        vec![("eth0", "established"), ("v1", "default-drop")]
    );
    let st: serde_json::Value =
        serde_json::from_str(&lab.segbpf_ok("srv", &["status", "--output", "json"])?)?;
    let ct = |i: usize| st["attachments"][i]["conntrack"].clone();
    // `status` lists attachments by name: eth0, then v1.
    assert!(ct(0)["half_open_entries"].as_u64() >= Some(1), "{}", ct(0));
    assert_eq!(ct(1)["half_open_entries"].as_u64(), Some(0), "{}", ct(1));
    assert_eq!(
        ct(0)["table_half_open_entries"],
        ct(1)["table_half_open_entries"]
    );
    assert_eq!(ct(0)["shared_by"].as_u64(), Some(2));
    Ok(())
}

/// The verifier's work for one attachment (issue 25: ten attachments
/// starting together must all enforce within 3 s, and verification is
/// nearly all of an attach's CPU): the processed instructions
/// (`verified_insns`, the kernel's count) of every packet program of a
/// live instance, summed. Before the ICMP errors' related-flow check moved
/// into programs of its own (`segbpf_*_err`) the four packet programs of
/// this instance took 611,306 (398,606 after, all six); the bound leaves room for small changes, not for that path
/// back on every path of the packet programs. A count, not a time: it does
/// not depend on the machine's load.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn an_attachment_verifies_in_a_bounded_number_of_instructions() -> anyhow::Result<()> {
    const BOUND: u32 = 450_000;
    let instance = segbpf_tests::harness::Instance::load(segbpf_common::RUN_LIVE)?;
    let mut total = 0;
    let mut each = Vec::new();
    for (name, prog) in instance.ebpf().programs() {
        if !(name.starts_with(segbpf_common::PROG_XDP_INGRESS)
            || name.starts_with(segbpf_common::PROG_TC_EGRESS))
        {
            continue;
        }
        let n = prog
            .info()?
            .verified_instruction_count()
            .ok_or_else(|| anyhow::anyhow!("{name}: no verified_insns (kernel < 5.16)"))?;
        total += n;
        each.push(format!("{name} {n}"));
    }
    each.sort();
    eprintln!("processed instructions: {total} ({})", each.join(", "));
    anyhow::ensure!(
        each.len() >= 4,
        "expected the packet programs, found {each:?}"
    );
    anyhow::ensure!(
        total <= BOUND,
        "the packet programs took {total} processed instructions, over {BOUND}: {each:?}"
    );
    Ok(())
}

/// A lab with host `web`, the attachment its `eth0` would have, and that
/// attachment's namespace directory of shared tables made (empty), for
/// tests that leave tables there as an earlier load would have.
fn lab_with_shared_dir(name: &str) -> anyhow::Result<(Lab, segbpf::attachment::pins::Attachment)> {
    let mut lab = Lab::new(name)?;
    lab.add_host("web", &["10.10.1.10/16"])?;
    let ns = lab.host("web").ns.name.clone();
    let att = segbpf::attachment::pins::Roots {
        bpffs: lab.bpffs.clone(),
        state: lab.state.clone(),
    }
    .attachment("eth0", &segbpf::host::netns::Netns::named(&ns)?);
    segbpf::attachment::dirs::private_dir(&att.shared_dir())?;
    Ok((lab, att))
}

/// Half of a connection table (one of its two arrays pinned, the other
/// not: a load that failed between making them while another attachment
/// kept the namespace's tables) is removed at the next attach and the
/// table made again, instead of being joined and refused for its layout
/// at every attach.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn half_a_connection_table_is_made_again_at_attach() -> anyhow::Result<()> {
    use segbpf_common::{Ct6, CtLayout as _};
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let (lab, att) = lab_with_shared_dir("half")?;
    // The IPv6 table's sets, of a size the object's default entries do
    // not match, and no entries array.
    let half = segbpf_tests::harness::map_by_hand(
        BPF_MAP_TYPE_ARRAY,
        Ct6::SETS_MAP,
        4,
        size_of::<segbpf_common::Ct6Set>() as u32,
        65,
        segbpf_common::CT_TABLE_FLAGS,
    )?;
    half.pin(att.map(Ct6::SETS_MAP))?;
    drop(half);
    lab.attach("web", &example_policy(), &["--role", "web"])?;
    let sets = MapInfo::from_pin(att.map(Ct6::SETS_MAP))?.max_entries();
    let ways = MapInfo::from_pin(att.map(Ct6::WAYS_MAP))?.max_entries();
    assert_eq!(
        (sets, ways),
        (
            segbpf_common::ct_sets_entries(segbpf_common::DEFAULT_CT6_SETS),
            segbpf_common::ct_ways_entries::<Ct6>(segbpf_common::DEFAULT_CT6_SETS)
        ),
        "made again at the default size"
    );
    let v: serde_json::Value =
        serde_json::from_str(&lab.segbpf_ok("web", &["status", "--output", "json"])?)?;
    assert_eq!(v["attachments"][0]["attached"], true, "{v}");
    Ok(())
}

/// A whole table pinned without its secret (a load that failed after
/// making both arrays, before writing it), of another size than this
/// build's default: the next attach writes the secret into the element
/// after its last set, as the kernel sized it, not where the object's
/// default size would put it.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn a_table_left_without_its_secret_gets_one_after_its_last_set() -> anyhow::Result<()> {
    use segbpf_common::{Ct6, CtLayout as _};
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let (lab, att) = lab_with_shared_dir("nosecret")?;
    for (name, value, entries) in [
        (
            Ct6::SETS_MAP,
            size_of::<segbpf_common::Ct6Set>() as u32,
            segbpf_common::ct_sets_entries(64),
        ),
        (
            Ct6::WAYS_MAP,
            size_of::<segbpf_common::CtEntry>() as u32,
            segbpf_common::ct_ways_entries::<Ct6>(64),
        ),
    ] {
        let map = segbpf_tests::harness::map_by_hand(
            BPF_MAP_TYPE_ARRAY,
            name,
            4,
            value,
            entries,
            segbpf_common::CT_TABLE_FLAGS,
        )?;
        map.pin(att.map(name))?;
    }
    lab.attach("web", &example_policy(), &["--role", "web"])?;
    let extra = segbpf::attachment::cttables::pinned_extra::<Ct6>(&att)?;
    let (sets, [secret, _]) = extra.ok_or_else(|| anyhow::anyhow!("no IPv6 table"))?;
    assert_eq!(sets, 64, "the table was joined as it is");
    assert_ne!(secret, 0, "its secret was written after its last set");
    let table = segbpf::attachment::cttables::map_pinned::<Ct6>(&att)?
        .ok_or_else(|| anyhow::anyhow!("no IPv6 table"))?;
    assert_eq!(table.secret(), secret);
    assert!(table.entries()?.is_empty(), "no set was written");
    Ok(())
}
