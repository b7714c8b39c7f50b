//! Traffic at Mpps: a generator namespace joined by one veth pair to a
//! receiver namespace. The generator is segbpf's `segbpf_xdp_gen` run with
//! BPF_PROG_TEST_RUN in live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES, as
//! xdp-tools' xdp-trafficgen does): every repetition rewrites the template
//! UDP frame with the next source address and port and transmits it
//! (`XDP_TX`) into the veth. The generator thread is pinned to one CPU and
//! the receiver's veth NAPI runs in the softirq of that same CPU, so the
//! rate measures generation plus the receiver's whole path on one core.
//!
//! The receiver runs nothing, segbpf (events on, rate-limited; and off),
//! the nftables ruleset of `segbpf export nft`, a best-case nftables
//! ruleset (one concatenated-key interval verdict map), or iptables with an
//! ipset (`hash:net,port`), or xdp-filter of xdp-tools (stateless: deny,
//! with the allowed port open; see `XdpFilter`). Rounds interleave the
//! enforcers. The packets
//! the receiver handled are counted from its veth's counters, so frames
//! the veth ring refused (the receiver was too slow) are not counted.
//!
//! A kernel may refuse live frames (EPERM from BPF_PROG_TEST_RUN; one
//! repetition is tried first). Then the rates come from an `AF_PACKET`
//! socket on the same CPU sending the same sequence of frames
//! (`socket_frames`; each row says which generator): a frame costs the
//! generator far more than a live frame (1.5–2 µs against under 0.1),
//! so the enforcers' differences are diluted, but every enforcer meets the
//! same generator on the same core. The cache-cold rows become sweeps
//! (`sweep`): the receiver's attached program run once per packet, on the
//! generator's sequence of flows, timed by the kernel's run-time
//! statistics of the program.
//!
//! Addresses: rule i allows udp/(2000+i) from 198.18.0.0 + 8i /29; the
//! receiver is 198.19.255.1/15; traffic comes from the **last** rule's /29
//! (8 addresses x 1,024 source ports = 8,192 flows), to the rule's port
//! (allowed) or to port 9 (denied: a known source to a closed port).

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use aya::{maps::Array, programs::Xdp};
use segbpf::attachment::loader;
use segbpf_common::{MAP_GEN, PROG_XDP_GEN};
use segbpf_tests::{Lab, netns::Netns};
use serde_json::json;

/// Receiver address (outside every rule's prefix).
const RX_ADDR: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
/// First rule prefix.
const BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
/// Source-address bits that vary (a /29).
const ADDR_BITS: u32 = 3;
/// Source-port bits that vary.
const PORT_BITS: u32 = 10;
/// First source of the cache-cold flood of unknown sources (a /16 in no
/// rule of the cache-cold policies).
const UNKNOWN_BASE: u32 = u32::from_be_bytes([198, 19, 0, 0]);
/// Closed port for denied traffic.
const DENIED_PORT: u16 = 9;

const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// `union bpf_attr` as BPF_PROG_TEST_RUN reads it.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `struct xdp_md` as the test run's context.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// One live-frames run of `prog_fd` with `repeat` repetitions of `frame`,
/// transmitted on `ifindex` (of the calling thread's namespace).
fn live_run(prog_fd: i32, frame: &[u8], ifindex: u32, repeat: u32) -> anyhow::Result<()> {
    let ctx = XdpMd {
        data_end: frame.len() as u32,
        ingress_ifindex: ifindex,
        ..XdpMd::default()
    };
    let attr = TestRunAttr {
        prog_fd: prog_fd as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ctx_size_in: size_of::<XdpMd>() as u32,
        ctx_in: std::ptr::from_ref(&ctx) as u64,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        ..TestRunAttr::default()
    };
    // The kernel only reads `frame` and `ctx`, which outlive the call.
    bpf_cmd(BPF_PROG_TEST_RUN, &attr)?;
    Ok(())
}

/// Rewrites the template frame `f` as packet `n` of the generator's
/// sequence (as `segbpf_xdp_gen` does): source address `base` plus the
/// low `bits.0` bits of `n`, source port 1024 plus its next `bits.1`
/// bits, and the IPv4 header checksum.
fn flow_frame(f: &mut [u8], n: u32, base: u32, bits: (u32, u32)) {
    let (abits, pbits) = bits;
    let src = base.wrapping_add(n & ((1u32 << abits) - 1));
    let sport = 1024u16.wrapping_add(((n >> abits) & ((1u32 << pbits) - 1)) as u16);
    f[26..30].copy_from_slice(&src.to_be_bytes());
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f[24..26].copy_from_slice(&[0, 0]);
    let mut sum: u32 = f[14..34]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    f[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// `SOL_PACKET` option: frames skip the device's queueing discipline.
const PACKET_QDISC_BYPASS: libc::c_int = 20;
/// Frames per `sendmmsg` call of `socket_frames`.
const SOCKET_BATCH: usize = 64;

/// The generator where live frames are refused: `frame` sent on `ifindex`
/// (of the calling thread's namespace) from an `AF_PACKET` socket, in
/// batches of `SOCKET_BATCH`, until `stop`. Each frame carries the next
/// source address and port of the same sequence as `segbpf_xdp_gen`'s
/// (`base` plus the low `bits.0` bits of the count, port 1024 plus the
/// next `bits.1` bits) and its IPv4 checksum. The socket is bound with
/// protocol 0: it receives nothing. The sending system call and the skb
/// it makes run on the generator's CPU, as the receiver's NAPI does (the
/// veth's softirq): per core, a rate of generation plus the receiver's
/// path, the generation dearer than live frames' (the same for every
/// enforcer).
fn socket_frames(
    frame: &[u8],
    ifindex: u32,
    base: u32,
    bits: (u32, u32),
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: socket(2) with constant arguments.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: a descriptor socket(2) just returned to us.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    // SAFETY: an all-zero sockaddr_ll is valid; the fields set below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: bind(2) with the address above and its size.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            std::ptr::from_ref(&sll).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let one: libc::c_int = 1;
    // SAFETY: setsockopt(2) with an int option and its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_PACKET,
            PACKET_QDISC_BYPASS,
            std::ptr::from_ref(&one).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut bufs = vec![frame.to_vec(); SOCKET_BATCH];
    // One iovec per frame and one message per iovec, made once: the
    // frames are rewritten in place (their buffers never move).
    let mut iov: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|f| libc::iovec {
            iov_base: f.as_mut_ptr().cast(),
            iov_len: f.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iov
        .iter_mut()
        .map(|v| {
            // SAFETY: an all-zero mmsghdr is valid (no name, no control
            // data); its one iovec is set below.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = std::ptr::from_mut(v);
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let mut n: u32 = 0;
    while !stop.load(Ordering::SeqCst) {
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_len = 0;
            // SAFETY: iovec `i` points at frame `i` of `bufs`, alive and
            // not otherwise borrowed while the batch is written.
            let f = unsafe {
                std::slice::from_raw_parts_mut(iov[i].iov_base.cast::<u8>(), iov[i].iov_len)
            };
            flow_frame(f, n, base, bits);
            n = n.wrapping_add(1);
        }
        // SAFETY: sendmmsg(2) on our socket with `msgs`, whose iovecs
        // point into `bufs`; all outlive the call.
        let rc =
            unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), SOCKET_BATCH as u32, 0) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            // Interrupted (the stop signal) or the device's ring full:
            // try the next batch.
            if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::ENOBUFS)) {
                return Err(e.into());
            }
        }
    }
    Ok(())
}

/// bpf(2) command `cmd` with the attribute block `attr` (a `union
/// bpf_attr` prefix, fully initialised, whose pointers outlive the call):
/// its non-negative result.
fn bpf_cmd<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<i64> {
    // SAFETY: bpf(2) reads `size_of::<T>()` bytes of `attr` (and what its
    // pointers point at, which the caller keeps alive); the block is
    // passed read-only, as these commands write only their result.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_ref(attr), size_of::<T>()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;

/// Mean nanoseconds of one of `repeat` BPF_PROG_TEST_RUN repetitions of
/// the program `prog_fd` on `frame` (programs aya did not load: xdp-filter's).
pub(crate) fn test_run_ns(prog_fd: i32, frame: &[u8], repeat: u32) -> anyhow::Result<f64> {
    let mut attr = TestRunAttr {
        prog_fd: prog_fd as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ..TestRunAttr::default()
    };
    // SAFETY: bpf(2) with a fully initialised attribute block of its size;
    // the kernel reads `frame` and writes `attr`, which outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            std::ptr::from_mut(&mut attr),
            size_of::<TestRunAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(f64::from(attr.duration))
}

/// `union bpf_attr` as BPF_PROG_GET_FD_BY_ID reads it.
#[repr(C)]
struct GetFd {
    id: u32,
    next_id: u32,
    open_flags: u32,
    _pad: [u32; 13],
}

/// xdp-filter (xdp-tools) on `dev` of the namespace `ns`, as its manual
/// shows it: `xdp-filter load -p deny -m native DEV` (unmatched packets
/// are dropped), then `xdp-filter port PORT` (destination port PORT, TCP
/// and UDP, passes). Stateless: it matches ports and addresses one at a
/// time, never a source with a port. libxdp loads it behind its
/// dispatcher (a bpffs is mounted for it in the command's own mount
/// namespace). Removed (the device's XDP program detached) on drop.
pub(crate) struct XdpFilter {
    ns: String,
    dev: String,
}

impl XdpFilter {
    pub(crate) fn load(ns: &str, dev: &str, port: u16) -> anyhow::Result<Self> {
        let script = format!(
            "mount -t bpf bpf /sys/fs/bpf && xdp-filter load -p deny -m native {dev} && xdp-filter port {port}"
        );
        segbpf_tests::netns::sh("ip", &["netns", "exec", ns, "sh", "-c", &script])?;
        Ok(XdpFilter {
            ns: ns.to_string(),
            dev: dev.to_string(),
        })
    }

    /// A descriptor of the program attached to the device (libxdp's
    /// dispatcher, which calls the filter).
    pub(crate) fn prog_fd(&self) -> anyhow::Result<std::os::fd::OwnedFd> {
        attached_prog_fd(&self.ns, &self.dev)
    }
}

/// A descriptor of the XDP program attached to `dev` of the namespace `ns`.
fn attached_prog_fd(ns: &str, dev: &str) -> anyhow::Result<std::os::fd::OwnedFd> {
    let id = attached_prog_id(ns, dev)?;
    let attr = GetFd {
        id,
        next_id: 0,
        open_flags: 0,
        _pad: [0; 13],
    };
    let fd = bpf_cmd(BPF_PROG_GET_FD_BY_ID, &attr)?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        let _ = segbpf_tests::netns::ip(&[
            "-n", &self.ns, "link", "set", "dev", &self.dev, "xdp", "off",
        ]);
    }
}

fn mac(ns: &str, dev: &str) -> anyhow::Result<[u8; 6]> {
    let out = segbpf_tests::netns::ip(&["-j", "-n", ns, "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let s = v[0]["address"].as_str().unwrap_or_default();
    let mut m = [0u8; 6];
    for (i, b) in s.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(b, 16)?;
    }
    Ok(m)
}

fn ifindex(ns: &str, dev: &str) -> anyhow::Result<u32> {
    let out = segbpf_tests::netns::ip(&["-j", "-n", ns, "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["ifindex"]
        .as_u64()
        .map(|i| i as u32)
        .ok_or_else(|| anyhow::anyhow!("no ifindex for {dev} in {ns}"))
}

/// Packets the device received (stats64 rx packets + dropped).
fn rx_handled(ns: &str, dev: &str) -> anyhow::Result<u64> {
    let out = segbpf_tests::netns::ip(&["-j", "-s", "-n", ns, "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let rx = &v[0]["stats64"]["rx"];
    Ok(rx["packets"].as_u64().unwrap_or(0) + rx["dropped"].as_u64().unwrap_or(0))
}

/// The template frame: Ethernet, IPv4 (source filled by the generator),
/// UDP to `dport`, padded to 60 bytes.
fn frame(dst_mac: [u8; 6], src_mac: [u8; 6], dport: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total: u16 = 46;
    f.extend_from_slice(&[0x45, 0, 0, 0]);
    f[16..18].copy_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    f.extend_from_slice(&BASE.to_be_bytes());
    f.extend_from_slice(&RX_ADDR.octets());
    f.extend_from_slice(&1024u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&26u16.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(60, 0);
    f
}

fn prefix(i: usize) -> String {
    format!("{}/29", Ipv4Addr::from(BASE + 8 * i as u32))
}

fn policy(rules: usize, log_rate: u32) -> String {
    let mut t = format!(
        "version = 1\n[defaults]\ningress = \"drop\"\negress = \"allow\"\nlog_rate = {log_rate}\n[roles.rx]\nhosts = \"any\"\n"
    );
    for i in 0..rules {
        let _ = write!(
            t,
            "[[roles.rx.ingress]]\nfrom = \"{}\"\nudp = [{}]\n",
            prefix(i),
            2000 + i
        );
    }
    t
}

/// Best-case nftables: one interval verdict map keyed by (source, protocol,
/// destination port), after the usual conntrack shortcut.
fn nft_best(rules: usize) -> String {
    let mut t = String::from(
        "table inet segbench\ndelete table inet segbench\ntable inet segbench {\n  map allow4 {\n    type ipv4_addr . inet_proto . inet_service : verdict\n    flags interval\n    elements = { ",
    );
    for i in 0..rules {
        if i > 0 {
            t.push_str(",\n      ");
        }
        let _ = write!(t, "{} . udp . {} : accept", prefix(i), 2000 + i);
    }
    t.push_str(
        " }\n  }\n  chain input {\n    type filter hook input priority filter; policy drop;\n    ct state established,related accept\n    iif lo accept\n    ip saddr . meta l4proto . th dport vmap @allow4\n  }\n}\n",
    );
    t
}

fn ipset_restore(rules: usize) -> String {
    let mut t = String::from("create segbench hash:net,port family inet maxelem 65536\n");
    for i in 0..rules {
        let _ = writeln!(t, "add segbench {},udp:{}", prefix(i), 2000 + i);
    }
    t
}

const IPTABLES_IPSET: &str = "*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n-A INPUT -i lo -j ACCEPT\n-A INPUT -m set --match-set segbench src,dst -j ACCEPT\nCOMMIT\n";
const IPTABLES_OPEN: &str =
    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";

fn ns_stdin(ns: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut c = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    c.stdin
        .as_mut()
        .expect("stdin")
        .write_all(input.as_bytes())?;
    drop(c.stdin.take());
    let out = c.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "{} in {ns} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The generator: the loaded program and its state map.
struct Generator {
    ebpf: aya::Ebpf,
    tx_ns: String,
    ifindex: u32,
    /// Frames from an `AF_PACKET` socket (`socket_frames`) instead of
    /// live frames: set where the kernel refuses live frames.
    socket: bool,
}

impl Generator {
    fn new(tx_ns: &str, dev: &str) -> anyhow::Result<Self> {
        let mut ebpf = loader::load(
            segbpf::policy::compile::Capacity::default(),
            segbpf_common::RUN_LIVE,
        )?;
        let p: &mut Xdp = ebpf
            .program_mut(PROG_XDP_GEN)
            .ok_or_else(|| anyhow::anyhow!("no {PROG_XDP_GEN}"))?
            .try_into()?;
        p.load()?;
        Ok(Generator {
            ebpf,
            tx_ns: tx_ns.to_string(),
            ifindex: ifindex(tx_ns, dev)?,
            socket: false,
        })
    }

    /// The generator program's descriptor (owned by `self.ebpf`).
    fn prog_fd(&self) -> anyhow::Result<i32> {
        let p: &Xdp = self
            .ebpf
            .program(PROG_XDP_GEN)
            .ok_or_else(|| anyhow::anyhow!("no {PROG_XDP_GEN}"))?
            .try_into()?;
        Ok(p.fd()?.as_fd().as_raw_fd())
    }

    /// Whether this kernel lets the generator transmit (a live-frames run
    /// of one repetition): Ok(None) if it does, Ok(Some(error)) if it
    /// refuses them (EPERM, as some machines do even for root); any other
    /// failure is an error of the bench.
    fn live_frames(&self, frame: &[u8]) -> anyhow::Result<Option<std::io::Error>> {
        let fd = self.prog_fd()?;
        let path = format!("/run/netns/{}", self.tx_ns);
        let ifindex = self.ifindex;
        let r = std::thread::scope(|s| {
            s.spawn(|| {
                segbpf_tests::netns::enter(&path)?;
                live_run(fd, frame, ifindex, 1)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
        });
        match r {
            Ok(()) => Ok(None),
            Err(e) => match e.downcast::<std::io::Error>() {
                Ok(io) if io.raw_os_error() == Some(libc::EPERM) => Ok(Some(io)),
                Ok(io) => Err(anyhow::anyhow!("live-frames probe: {io}")),
                Err(e) => Err(e.context("live-frames probe")),
            },
        }
    }

    /// Sends `frame` with sources from `base` from one pinned CPU and
    /// returns the packets per second the receiver (`rx_ns`'s eth0)
    /// handled over `secs`, after a short warm-up.
    #[allow(
        clippy::too_many_arguments,
        reason = "the frame, its flows and the receiver"
    )]
    fn rate(
        &mut self,
        frame: &[u8],
        base: u32,
        bits: (u32, u32),
        rx_ns: &str,
        secs: Duration,
    ) -> anyhow::Result<f64> {
        let mut st: Array<_, u32> = Array::try_from(
            self.ebpf
                .map_mut(MAP_GEN)
                .ok_or_else(|| anyhow::anyhow!("no {MAP_GEN}"))?,
        )?;
        st.set(0, 0, 0)?;
        st.set(1, base, 0)?;
        st.set(2, bits.0, 0)?;
        st.set(3, bits.1, 0)?;
        let fd = self.prog_fd()?;
        let path = format!("/run/netns/{}", self.tx_ns);
        let frame = frame.to_vec();
        let ifindex = self.ifindex;
        let socket = self.socket;
        let done = AtomicBool::new(false);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| -> anyhow::Result<f64> {
            let (tid_tx, tid_rx) = std::sync::mpsc::channel();
            let done = &done;
            let stop = &stop;
            let generator = s.spawn(move || -> anyhow::Result<()> {
                let r = (|| -> anyhow::Result<()> {
                    segbpf_tests::netns::enter(&path)?;
                    let mut cpus = nix::sched::CpuSet::new();
                    cpus.set(0)?;
                    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus)?;
                    // SAFETY: pthread_self has no preconditions.
                    let _ = tid_tx.send(unsafe { libc::pthread_self() });
                    if socket {
                        return socket_frames(&frame, ifindex, base, bits, stop);
                    }
                    // Long runs, ended by a signal (the kernel checks for one
                    // between batches and returns EINTR) once `stop` is set;
                    // a run that ends early for another reason is restarted.
                    while !stop.load(Ordering::SeqCst) {
                        match live_run(fd, &frame, ifindex, u32::MAX) {
                            Err(e)
                                if e.downcast_ref::<std::io::Error>()
                                    .and_then(std::io::Error::raw_os_error)
                                    == Some(libc::EINTR) => {}
                            Err(e) => return Err(e),
                            Ok(()) => {}
                        }
                    }
                    Ok(())
                })();
                done.store(true, Ordering::SeqCst);
                r
            });
            let tid = tid_rx
                .recv()
                .map_err(|_| anyhow::anyhow!("generator did not start"))?;
            let measured = (|| -> anyhow::Result<f64> {
                std::thread::sleep(Duration::from_millis(100));
                let c1 = rx_handled(rx_ns, "eth0")?;
                let t1 = Instant::now();
                std::thread::sleep(secs);
                let c2 = rx_handled(rx_ns, "eth0")?;
                let el = t1.elapsed().as_secs_f64();
                if std::env::var_os("SEGBPF_BENCH_DEBUG").is_some() {
                    eprintln!(
                        "  rx {c1} -> {c2} in {el:.3}s, generator done early: {}",
                        done.load(Ordering::SeqCst)
                    );
                }
                Ok((c2 - c1) as f64 / el)
            })();
            stop.store(true, Ordering::SeqCst);
            while !done.load(Ordering::SeqCst) {
                // SAFETY: the thread is alive until `done`; SIGUSR1 has a
                // no-op handler (see `throughput`).
                unsafe { libc::pthread_kill(tid, libc::SIGUSR1) };
                std::thread::sleep(Duration::from_millis(5));
            }
            generator
                .join()
                .map_err(|_| anyhow::anyhow!("generator thread panicked"))??;
            measured
        })
    }
}

/// Packets of one sweep (`sweep`): every flow of the cache-cold traffic
/// twice.
const SWEEP_PACKETS: u32 = 2 << 18;

/// Without live frames: `packets` BPF_PROG_TEST_RUN runs of one
/// repetition each of the program `prog_fd` (the enforcer attached to the
/// receiver), on the generator's sequence of flows (the same source
/// addresses and ports, in the same order), from one thread pinned to
/// CPU 0. Only the kernel's run-time statistics of the program mean
/// anything here (`xdp_run_time`): a run is a system call, not a packet
/// through a device and a stack, so no rate is returned.
fn sweep(
    prog_fd: i32,
    frame: &[u8],
    base: u32,
    bits: (u32, u32),
    packets: u32,
) -> anyhow::Result<()> {
    let mut f = frame.to_vec();
    std::thread::scope(|s| {
        s.spawn(move || -> anyhow::Result<()> {
            let mut cpus = nix::sched::CpuSet::new();
            cpus.set(0)?;
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus)?;
            for n in 0..packets {
                flow_frame(&mut f, n, base, bits);
                test_run_ns(prog_fd, &f, 1)?;
            }
            Ok(())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("sweep thread panicked"))?
    })
}

extern "C" fn on_sigusr1(_: libc::c_int) {}

/// Cache-cold: 262,144 flows (every address of 198.18.0.0/16, four
/// source ports each) against a 10-rule policy whose first rule holds
/// those sources as one /16 (plus 1,000 other prefixes), or as 65,536 /32s
/// among 1,000,000 prefixes, then the same flows to a closed port, then
/// as many from 198.19.0.0/16 (in no rule); no firewall, segbpf, and segbpf with the same
/// policy but `established = false` (no connection tracking), and (1k
/// round) xdp-filter allowing the port, rounds interleaved. With
/// `SEGBPF_BENCH_ALT_BIN=label=path[,label=path...]`, also segbpf as built at `path`
/// (enforcer `segbpf-{label}`, same policy): before and after in the same
/// rounds.
fn cold(
    lab: &Lab,
    rx_ns: &str,
    generator: &mut Generator,
    macs: ([u8; 6], [u8; 6]),
    secs: Duration,
    live: bool,
    results: &mut std::collections::BTreeMap<(String, usize, &'static str), Vec<f64>>,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let base = BASE;
    let bits = (16, 2);
    let _sink = lab
        .host("rx")
        .ns
        .run(move || std::net::UdpSocket::bind((RX_ADDR, 2000)))??;
    let mut pols = Vec::new();
    for (label, big) in [("1k", false), ("1m", true)] {
        let mut t = String::from(
            "version = 1\n[defaults]\ningress = \"drop\"\negress = \"allow\"\nlog_rate = 10\n[roles.rx]\nhosts = \"any\"\n[[roles.rx.ingress]]\nfrom = [",
        );
        let mut n = 0usize;
        if big {
            for k in 0..65_536u32 {
                let _ = write!(t, "\"{}\",", Ipv4Addr::from(BASE + k));
                n += 1;
            }
        } else {
            t.push_str("\"198.18.0.0/16\",");
            n += 1;
        }
        let total = if big { 1_000_000 } else { 1_000 };
        // Filler /32s, every other address of 10.0.0.0/8, so none merge.
        let mut next: u32 = 0x0a00_0000;
        while n < total {
            let _ = write!(t, "\"{}\",", Ipv4Addr::from(next));
            next += 2;
            n += 1;
        }
        t.pop();
        t.push_str("]\nudp = [2000]\n");
        for i in 1..10 {
            let _ = write!(
                t,
                "[[roles.rx.ingress]]\nfrom = \"10.{i}.0.0/16\"\nudp = [{}]\n",
                2000 + i
            );
        }
        let path = lab.write_policy(&format!("cold-{label}.toml"), &t)?;
        // The same policy without connection tracking: what the policy
        // lookups cost a new flow, apart from the tracking (two table
        // lookups and an insert that evicts).
        let notrack = t.replacen("[defaults]\n", "[defaults]\nestablished = false\n", 1);
        let notrack = lab.write_policy(&format!("cold-{label}-notrack.toml"), &notrack)?;
        pols.push((
            label,
            path.to_str().unwrap_or_default().to_string(),
            notrack.to_str().unwrap_or_default().to_string(),
        ));
    }
    let mut alt: Vec<(&'static str, std::path::PathBuf)> = Vec::new();
    let spec = std::env::var("SEGBPF_BENCH_ALT_BIN").unwrap_or_default();
    for one in spec.split(',').filter(|s| !s.is_empty()) {
        let (l, p) = one
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("SEGBPF_BENCH_ALT_BIN: {one}: expected label=path"))?;
        // Names of results are static: one leaked string per build.
        let name: &'static str = Box::leak(format!("segbpf-{l}").into_boxed_str());
        alt.push((name, std::path::PathBuf::from(p)));
    }
    // `SEGBPF_BENCH_COLD_NS=1`: also the kernel's own account of each XDP
    // program's run time (`kernel.bpf_stats_enabled`, held while this
    // runs; it adds two clock reads per run to every enforcer but none),
    // printed per measurement and as medians at the end: ns per packet of
    // the program alone, without the generator's and the stack's noise.
    // Without live frames (`sweep`) the program's own time is all there is.
    let stats = if !live || std::env::var("SEGBPF_BENCH_COLD_NS").as_deref() == Ok("1") {
        Some(aya::sys::enable_stats(aya::sys::Stats::RunTime)?)
    } else {
        None
    };
    let mut ns: std::collections::BTreeMap<(&'static str, &'static str), Vec<f64>> =
        std::collections::BTreeMap::new();
    let mut enforcers = vec!["none", "segbpf", "segbpf-notrack", "xdp-filter"];
    enforcers.extend(alt.iter().map(|a| a.0));
    // The build behind an enforcer: an alternative's, else this run's.
    let bin_of = |enforcer: &str| {
        alt.iter()
            .find(|a| a.0 == enforcer)
            .map_or_else(segbpf_tests::lab::segbpf_bin, |a| a.1.clone())
    };
    let rounds = std::env::var("SEGBPF_BENCH_COLD_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    for round in 0..rounds {
        for (label, pol, notrack) in &pols {
            for &enforcer in &enforcers {
                // xdp-filter (stateless, ports only: it cannot hold the
                // sources) on the 1k-prefix round only: what any XDP
                // program on this link costs a cache-cold new flow.
                if enforcer == "xdp-filter" && *label != "1k" {
                    continue;
                }
                // A sweep runs the receiver's program: none has none.
                if !live && enforcer == "none" {
                    continue;
                }
                let filter = if enforcer == "xdp-filter" {
                    Some(XdpFilter::load(rx_ns, "eth0", 2000)?)
                } else {
                    None
                };
                match enforcer {
                    "segbpf" => {
                        lab.attach("rx", pol, &["--role", "rx"])?;
                    }
                    "segbpf-notrack" => {
                        lab.attach("rx", notrack, &["--role", "rx"])?;
                    }
                    "none" | "xdp-filter" => {}
                    _ => {
                        let args = [
                            "attach",
                            "eth0",
                            "--policy",
                            pol,
                            "--no-wait",
                            "--role",
                            "rx",
                        ];
                        let out = lab.segbpf_from(&bin_of(enforcer), "rx", &args)?;
                        anyhow::ensure!(out.status.success(), "{enforcer}: attach failed");
                    }
                }
                // Allowed (new flows), denied (their sources to a closed
                // port) and unknown: a flood of 262,144 new sources in no
                // peer class (198.19.0.0/16), to the allowed port.
                for (traffic, port, base) in [
                    ("allowed", 2000, base),
                    ("denied", DENIED_PORT, base),
                    ("unknown", 2000, UNKNOWN_BASE),
                ] {
                    let name: &'static str = match (traffic, *label) {
                        ("allowed", "1k") => "allowed-cold-1k-prefixes",
                        ("allowed", _) => "allowed-cold-1m-prefixes",
                        ("denied", "1k") => "denied-cold-1k-prefixes",
                        ("denied", _) => "denied-cold-1m-prefixes",
                        (_, "1k") => "unknown-cold-1k-prefixes",
                        _ => "unknown-cold-1m-prefixes",
                    };
                    let f = frame(macs.0, macs.1, port);
                    // The enforcer's own program, when statistics are on.
                    let timed = if stats.is_some() && enforcer != "none" {
                        Some(attached_prog_id(rx_ns, "eth0")?)
                    } else {
                        None
                    };
                    let before = timed.map(prog_run_time).transpose()?;
                    // `SEGBPF_BENCH_PERF_CTL=FIFO` with
                    // `SEGBPF_BENCH_PERF_WHAT=enforcer/traffic`: that
                    // measurement alone is bracketed by `enable` and
                    // `disable` on FIFO, the control of a
                    // `perf record --control fifo:FIFO -D -1` (a profile of
                    // one case).
                    let perf = std::env::var("SEGBPF_BENCH_PERF_CTL").ok().filter(|_| {
                        std::env::var("SEGBPF_BENCH_PERF_WHAT").ok().as_deref()
                            == Some(&format!("{enforcer}/{name}"))
                    });
                    if let Some(c) = &perf {
                        use std::os::unix::fs::FileTypeExt as _;
                        anyhow::ensure!(
                            std::fs::metadata(c).is_ok_and(|m| m.file_type().is_fifo()),
                            "SEGBPF_BENCH_PERF_CTL={c}: not a FIFO (make it with mkfifo and start perf record --control fifo:{c} first)"
                        );
                        std::fs::write(c, "enable\n")?;
                    }
                    let pps = if live {
                        Some(generator.rate(&f, base, bits, rx_ns, secs)?)
                    } else {
                        let fd = attached_prog_fd(rx_ns, "eth0")?;
                        // `SEGBPF_BENCH_SWEEP_PACKETS`: another length
                        // (262,144: every flow once).
                        let n = match std::env::var("SEGBPF_BENCH_SWEEP_PACKETS") {
                            Ok(n) => match n.parse::<u32>() {
                                Ok(n) if n > 0 => n,
                                _ => anyhow::bail!(
                                    "SEGBPF_BENCH_SWEEP_PACKETS={n}: expected a count of packets above 0"
                                ),
                            },
                            Err(_) => SWEEP_PACKETS,
                        };
                        sweep(fd.as_raw_fd(), &f, base, bits, n)?;
                        None
                    };
                    if let Some(c) = &perf {
                        std::fs::write(c, "disable\n")?;
                    }
                    if let (Some(id), Some(before)) = (timed, before) {
                        let after = prog_run_time(id)?;
                        let (Some(t), Some(n)) =
                            (after.0.checked_sub(before.0), after.1.checked_sub(before.1))
                        else {
                            anyhow::bail!(
                                "{enforcer}: the run statistics of program {id} went down"
                            );
                        };
                        anyhow::ensure!(n > 0, "{enforcer} {name}: program {id} did not run");
                        let per = t as f64 / n as f64;
                        eprintln!("cold-ns {enforcer} {name}: {per:.1} ns per run");
                        ns.entry((enforcer, name)).or_default().push(per);
                    }
                    if let Some(pps) = pps {
                        results
                            .entry((enforcer.to_string(), 10, name))
                            .or_default()
                            .push(pps);
                    }
                }
                if enforcer.starts_with("segbpf") {
                    // Detached by the build that attached (an alt build
                    // may keep pins this one does not know).
                    let out = lab.segbpf_from(&bin_of(enforcer), "rx", &["detach", "eth0"])?;
                    anyhow::ensure!(out.status.success(), "{enforcer}: detach failed");
                }
                drop(filter);
            }
        }
        eprintln!("throughput, cache-cold: round {}/{rounds}", round + 1);
    }
    let mut rows = Vec::new();
    for ((enforcer, name), mut v) in ns {
        v.sort_by(f64::total_cmp);
        let all: Vec<String> = v.iter().map(|x| format!("{x:.1}")).collect();
        eprintln!(
            "cold-ns median {enforcer} {name}: {:.1} ns ({})",
            v[v.len() / 2],
            all.join(" ")
        );
        rows.push(json!({
            "enforcer": enforcer, "rules": 10, "traffic": name,
            "generator": if live { "live-frames" } else { "sweep" },
            "median_program_ns": v[v.len() / 2], "samples_program_ns": v,
        }));
    }
    Ok(rows)
}

/// The run time (ns) and run count the kernel has recorded for the
/// program of id `id` (the one attached to the receiver: a tail call or a
/// libxdp dispatcher's call runs inside it, so it counts all of an
/// enforcer's work, and nothing of any other process's programs).
fn prog_run_time(id: u32) -> anyhow::Result<(u64, u64)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .map(|p| (p.run_time().as_nanos() as u64, p.run_count()))
        .ok_or_else(|| anyhow::anyhow!("program {id} is gone"))
}

/// The id of the XDP program attached to `dev` of the namespace `ns`.
fn attached_prog_id(ns: &str, dev: &str) -> anyhow::Result<u32> {
    let out = segbpf_tests::netns::ip(&["-j", "-d", "-n", ns, "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["xdp"]["prog"]["id"]
        .as_u64()
        .map(|id| id as u32)
        .ok_or_else(|| anyhow::anyhow!("no XDP program on {dev} in {ns}"))
}

/// The Mpps comparison; rows of `enforcer`, `rules`, `traffic`,
/// `median_pps` (packets the receiver handled per second), `ratio_to_none`;
/// then the cache-cold rows of the programs' own time (`median_program_ns`,
/// with `generator`: live-frames or sweep), when measured; and, on a
/// kernel that refuses live frames, one row `unavailable` with the reason.
pub(crate) fn throughput(quick: bool) -> anyhow::Result<Vec<serde_json::Value>> {
    let rounds = if quick { 1 } else { 5 };
    let secs = Duration::from_millis(if quick { 300 } else { 1000 });
    let sizes: &[usize] = if quick {
        &[10, 1000]
    } else {
        &[10, 1000, 10_000]
    };
    let enforcers = [
        "none",
        "segbpf",
        "segbpf-noev",
        "nft-export",
        "nft-best",
        "iptables-ipset",
        "xdp-filter",
    ];

    let mut lab = Lab::new("bt")?;
    lab.add_host("rx", &[&format!("{RX_ADDR}/15")])?;
    let rx_ns = lab.host("rx").ns.name.clone();
    // The generator's namespace takes the switch end of rx's veth: one
    // veth pair, generator to receiver, no bridge.
    let tx = Netns::create(&format!("{}-gen", lab.id))?;
    segbpf_tests::netns::ip(&[
        "-n",
        &format!("{}-sw", lab.id),
        "link",
        "set",
        "p0",
        "netns",
        &tx.name,
    ])?;
    tx.ip(&["link", "set", "p0", "up"])?;
    for (k, v) in [
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.eth0.rp_filter", "0"),
        ("net.ipv4.icmp_ratelimit", "1000"),
    ] {
        segbpf_tests::netns::sh(
            "ip",
            &[
                "netns",
                "exec",
                &rx_ns,
                "sysctl",
                "-q",
                "-w",
                &format!("{k}={v}"),
            ],
        )?;
    }
    // veth delivers XDP-transmitted frames only to a peer running NAPI:
    // with an XDP program attached, or with GRO on (for every enforcer).
    segbpf_tests::netns::sh(
        "ip",
        &[
            "netns", "exec", &rx_ns, "ethtool", "-K", "eth0", "gro", "on",
        ],
    )?;
    // A socket on every allowed port would make the stack's delivery part
    // of the cost; one socket (never read) on the last rule's port.
    let rx_mac = mac(&rx_ns, "eth0")?;
    let tx_mac = mac(&tx.name, "p0")?;
    let mut generator = Generator::new(&tx.name, "p0")?;
    // The generator is stopped with SIGUSR1: a handler that does nothing,
    // without SA_RESTART, so the test run returns EINTR.
    // SAFETY: installing a handler that touches nothing.
    unsafe {
        nix::sys::signal::sigaction(
            nix::sys::signal::Signal::SIGUSR1,
            &nix::sys::signal::SigAction::new(
                nix::sys::signal::SigHandler::Handler(on_sigusr1),
                nix::sys::signal::SaFlags::empty(),
                nix::sys::signal::SigSet::empty(),
            ),
        )?;
    }

    let mut results: std::collections::BTreeMap<(String, usize, &str), Vec<f64>> =
        std::collections::BTreeMap::default();
    // Debugging: SEGBPF_BENCH_ONLY=cold runs the cache-cold part alone.
    let only_cold = std::env::var("SEGBPF_BENCH_ONLY").as_deref() == Ok("cold");
    // Some machines refuse live frames (EPERM): no packets per second
    // then; the cache-cold rows fall back to sweeps (the programs' own
    // time), and the table says why the rest is missing.
    let refused = generator.live_frames(&frame(rx_mac, tx_mac, DENIED_PORT))?;
    let mut rows = Vec::new();
    if let Some(e) = &refused {
        eprintln!(
            "throughput: this kernel refuses live frames (BPF_F_TEST_XDP_LIVE_FRAMES: {e}): \
             the packets-per-second rows come from an AF_PACKET socket on the same CPU; the cache-cold rows are the programs' own time over sweeps"
        );
        rows.push(json!({"unavailable": format!(
            "live frames refused ({e}): the packets-per-second rows come from an AF_PACKET socket generator"
        )}));
    }
    let live = refused.is_none();
    // Without live frames the packets-per-second rows come from the
    // socket generator (`socket_frames`); the cache-cold rows stay sweeps.
    generator.socket = !live;
    // `SEGBPF_BENCH_PORT_BITS=N` (0–10): the Mpps traffic's flows are 8
    // sources x 2^N source ports instead of 8 x 1,024 (a diagnostic: how
    // the tracked path's cost follows the flows' cache footprint).
    let port_bits = match std::env::var("SEGBPF_BENCH_PORT_BITS") {
        Ok(b) => match b.parse::<u32>() {
            Ok(b) if b <= PORT_BITS => b,
            _ => anyhow::bail!("SEGBPF_BENCH_PORT_BITS={b}: expected 0 to {PORT_BITS}"),
        },
        Err(_) => PORT_BITS,
    };
    let rate_stats = if std::env::var("SEGBPF_BENCH_RATE_NS").as_deref() == Ok("1") {
        Some(aya::sys::enable_stats(aya::sys::Stats::RunTime)?)
    } else {
        None
    };
    for &rules in if only_cold { &[] } else { sizes } {
        let pol = lab.write_policy(&format!("t{rules}.toml"), &policy(rules, 10))?;
        let quiet = lab.write_policy(&format!("q{rules}.toml"), &policy(rules, 0))?;
        // Without connection tracking (`established = false`): with
        // `rate_stats` only, what the tracking costs in this traffic.
        let notrack =
            policy(rules, 10).replacen("[defaults]\n", "[defaults]\nestablished = false\n", 1);
        let notrack = lab.write_policy(&format!("n{rules}.toml"), &notrack)?;
        let notrack = notrack.to_str().unwrap_or_default().to_string();
        let pol = pol.to_str().unwrap_or_default().to_string();
        let quiet = quiet.to_str().unwrap_or_default().to_string();
        let nft_export = lab.segbpf_ok(
            "rx",
            &[
                "export", "nft", "--policy", &pol, "--role", "rx", "--iface", "eth0",
            ],
        )?;
        let last = rules - 1;
        let base = BASE + 8 * last as u32;
        let port_ok = 2000 + last as u16;
        let rx_port = port_ok;
        let sink = lab
            .host("rx")
            .ns
            .run(move || std::net::UdpSocket::bind((RX_ADDR, rx_port)))??;
        let diagnostic = ["segbpf-notrack", "segbpf-noacct"];
        let extra: &[&str] = if rate_stats.is_some() {
            &diagnostic
        } else {
            &[]
        };
        for round in 0..rounds {
            for &enforcer in enforcers.iter().chain(extra) {
                match enforcer {
                    "segbpf" => {
                        lab.attach("rx", &pol, &["--role", "rx"])?;
                    }
                    "segbpf-notrack" => {
                        lab.attach("rx", &notrack, &["--role", "rx"])?;
                    }
                    "segbpf-noacct" => {
                        lab.attach("rx", &quiet, &["--role", "rx", "--flow-log", "off"])?;
                    }
                    "segbpf-noev" => {
                        lab.attach("rx", &quiet, &["--role", "rx"])?;
                    }
                    "nft-export" => ns_stdin(&rx_ns, &["nft", "-f", "-"], &nft_export)?,
                    "nft-best" => ns_stdin(&rx_ns, &["nft", "-f", "-"], &nft_best(rules))?,
                    "iptables-ipset" => {
                        ns_stdin(
                            &rx_ns,
                            &["ipset", "restore", "-exist"],
                            &ipset_restore(rules),
                        )?;
                        ns_stdin(&rx_ns, &["iptables-restore"], IPTABLES_IPSET)?;
                    }
                    _ => {}
                }
                let filter = if enforcer == "xdp-filter" {
                    Some(XdpFilter::load(&rx_ns, "eth0", port_ok)?)
                } else {
                    None
                };
                for (traffic, port) in [("allowed", port_ok), ("denied", DENIED_PORT)] {
                    let f = frame(rx_mac, tx_mac, port);
                    // With `rate_stats` (`SEGBPF_BENCH_RATE_NS=1`), the
                    // kernel's account of the receiver's XDP program over
                    // the same measurement: its own time per packet in
                    // this traffic, apart from the generator and the
                    // stack (it adds two clock reads per packet).
                    let has_xdp = enforcer.starts_with("segbpf") || enforcer == "xdp-filter";
                    let timed = if rate_stats.is_some() && has_xdp {
                        Some(attached_prog_id(&rx_ns, "eth0")?)
                    } else {
                        None
                    };
                    let before = timed.map(prog_run_time).transpose()?;
                    let pps = generator.rate(&f, base, (ADDR_BITS, port_bits), &rx_ns, secs)?;
                    if let (Some(id), Some(b)) = (timed, before) {
                        let a = prog_run_time(id)?;
                        let n = a.1.saturating_sub(b.1);
                        anyhow::ensure!(n > 0, "{enforcer}: program {id} did not run");
                        eprintln!(
                            "rate-ns {enforcer} {rules} rules {traffic}: program {:.1} ns per packet over {n} packets",
                            a.0.saturating_sub(b.0) as f64 / n as f64
                        );
                    }
                    results
                        .entry((enforcer.to_string(), rules, traffic))
                        .or_default()
                        .push(pps);
                }
                match enforcer {
                    "segbpf" | "segbpf-noev" | "segbpf-notrack" | "segbpf-noacct" => {
                        lab.segbpf_ok("rx", &["detach", "eth0"])?;
                    }
                    "nft-export" => ns_stdin(
                        &rx_ns,
                        &["nft", "-f", "-"],
                        "table inet segbpf\ndelete table inet segbpf\n",
                    )?,
                    "nft-best" => ns_stdin(
                        &rx_ns,
                        &["nft", "-f", "-"],
                        "table inet segbench\ndelete table inet segbench\n",
                    )?,
                    "iptables-ipset" => {
                        ns_stdin(&rx_ns, &["iptables-restore"], IPTABLES_OPEN)?;
                        ns_stdin(&rx_ns, &["ipset", "destroy", "segbench"], "")?;
                    }
                    _ => {}
                }
                drop(filter);
            }
            eprintln!("throughput {rules} rules: round {}/{rounds}", round + 1);
        }
        drop(sink);
    }
    // The diagnostic's accounting ends here: the cache-cold part turns
    // its own on where it needs it.
    drop(rate_stats);
    let cold_rows = if !quick || only_cold {
        cold(
            &lab,
            &rx_ns,
            &mut generator,
            (rx_mac, tx_mac),
            secs,
            live,
            &mut results,
        )?
    } else {
        Vec::new()
    };
    drop(generator);
    drop(tx);
    drop(lab);
    let med = |v: &Vec<f64>| crate::median(&mut v.clone());
    for ((enforcer, rules, traffic), v) in &results {
        let none = results
            .get(&("none".to_string(), *rules, *traffic))
            .map_or(1.0, med);
        rows.push(json!({
            "enforcer": enforcer, "rules": rules, "traffic": traffic,
            "generator": if live { "live-frames" } else { "af_packet" },
            "median_pps": med(v), "min_pps": crate::min(v), "max_pps": crate::max(v),
            "ratio_to_none": med(v) / none, "samples_pps": v,
        }));
    }
    rows.extend(cold_rows);
    Ok(rows)
}
