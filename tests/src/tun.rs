//! Devices and traffic for `tests/tests/devices.rs`: a tun device whose
//! other end the test holds (it writes raw IP packets that the kernel
//! receives on the device, and reads what the kernel sends out of it),
//! TCP/UDP checksums for hand-built packets (the packet builder leaves
//! them zero, and a real stack drops such segments), a parser for the TCP
//! segments the kernel answers with, a streaming TCP echo server, and a
//! long-lived TCP connection that keeps exchanging data in the background.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::netns;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags (the rest
/// of the union is unused here).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A tun device (IFF_TUN | IFF_NO_PI: packets start at the IP header)
/// created in a network namespace; the test process holds its queue.
/// Closing it (on drop) deletes the device.
pub struct Tun {
    fd: OwnedFd,
    /// Device name.
    pub name: String,
}

impl Tun {
    /// Creates tun device `name` inside namespace `ns` (down, no address).
    pub fn create(ns: &str, name: &str) -> anyhow::Result<Tun> {
        anyhow::ensure!(name.len() < libc::IFNAMSIZ, "name {name} too long");
        let path = format!("/run/netns/{ns}");
        let owned = name.to_string();
        std::thread::spawn(move || -> anyhow::Result<Tun> {
            // The device is created in the namespace the file was opened in.
            netns::enter(&path)?;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .context("opening /dev/net/tun")?;
            let fd = OwnedFd::from(f);
            let mut req = IfReq {
                name: [0; libc::IFNAMSIZ],
                flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
                _pad: [0; 22],
            };
            req.name[..owned.len()].copy_from_slice(owned.as_bytes());
            // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which
            // `req` is (same size and layout as the kernel's).
            let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) };
            anyhow::ensure!(
                rc == 0,
                "TUNSETIFF {owned}: {}",
                std::io::Error::last_os_error()
            );
            Ok(Tun { fd, name: owned })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("tun thread panicked"))?
    }

    /// Changes the device's link type (`ARPHRD_*`, TUNSETLINK); the
    /// device must be down.
    pub fn set_link_type(&self, arphrd: u16) -> anyhow::Result<()> {
        // SAFETY: TUNSETLINK takes its argument by value.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETLINK,
                libc::c_ulong::from(arphrd),
            )
        };
        anyhow::ensure!(
            rc == 0,
            "TUNSETLINK {arphrd}: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }

    /// Hands one IP packet to the kernel: it is received on the device.
    pub fn send(&self, packet: &[u8]) -> anyhow::Result<()> {
        // SAFETY: the buffer is valid for `packet.len()` bytes.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        anyhow::ensure!(
            n == packet.len() as isize,
            "write to {}: {}",
            self.name,
            std::io::Error::last_os_error()
        );
        Ok(())
    }

    /// The next packet the kernel sends out of the device, waiting at most
    /// `timeout`; `None` if none came.
    pub fn recv(&self, timeout: Duration) -> anyhow::Result<Option<Vec<u8>>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        anyhow::ensure!(rc >= 0, "poll: {}", std::io::Error::last_os_error());
        if rc == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; 65536];
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        anyhow::ensure!(
            n >= 0,
            "read from {}: {}",
            self.name,
            std::io::Error::last_os_error()
        );
        buf.truncate(n as usize);
        Ok(Some(buf))
    }
}

/// Sum of 16-bit big-endian words (odd tail padded with zero), not folded.
fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum()
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Fills in the TCP, UDP or ICMPv6 checksum (pseudo-header included) of an IP
/// packet (`ip` starts at the IPv4 or IPv6 header; `l4` is the offset of
/// the transport header in it; `proto` its protocol, which for IPv6 with
/// extension headers differs from the first next-header byte). The
/// transport header and payload run to the end of `ip`.
pub fn fill_transport_checksum(ip: &mut [u8], l4: usize, proto: u8) -> anyhow::Result<()> {
    let at = match proto {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        IPPROTO_ICMPV6 => 2,
        _ => anyhow::bail!("no checksum for protocol {proto}"),
    };
    anyhow::ensure!(ip.len() >= l4 + at + 2, "packet too short");
    let len = ip.len() - l4;
    let mut sum = match ip[0] >> 4 {
        4 => sum16(&ip[12..20]),
        6 => sum16(&ip[8..40]),
        v => anyhow::bail!("IP version {v}"),
    };
    sum += u32::from(proto) + (len as u32 & 0xffff) + (len as u32 >> 16);
    ip[l4 + at..l4 + at + 2].fill(0);
    sum += sum16(&ip[l4..]);
    let mut c = fold(sum);
    if proto == IPPROTO_UDP && c == 0 {
        c = 0xffff;
    }
    ip[l4 + at..l4 + at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// TCP flags.
pub mod flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// A TCP segment's addresses, ports, flags and sequence numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSegment {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Flags (see [`flags`]).
    pub flags: u8,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
}

impl TcpSegment {
    /// Parses an IP packet (IPv4, or IPv6 without extension headers) that
    /// carries TCP; `None` for anything else.
    pub fn parse(ip: &[u8]) -> Option<TcpSegment> {
        let (src, dst, l4) = match ip.first()? >> 4 {
            4 => {
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                if ip.len() < 20 || ip[9] != IPPROTO_TCP {
                    return None;
                }
                let s: [u8; 4] = ip[12..16].try_into().ok()?;
                let d: [u8; 4] = ip[16..20].try_into().ok()?;
                (Ipv4Addr::from(s).into(), Ipv4Addr::from(d).into(), ihl)
            }
            6 => {
                if ip.len() < 40 || ip[6] != IPPROTO_TCP {
                    return None;
                }
                let s: [u8; 16] = ip[8..24].try_into().ok()?;
                let d: [u8; 16] = ip[24..40].try_into().ok()?;
                (Ipv6Addr::from(s).into(), Ipv6Addr::from(d).into(), 40)
            }
            _ => return None,
        };
        let t = ip.get(l4..l4 + 20)?;
        let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        Some(TcpSegment {
            src,
            dst,
            sport: u16::from_be_bytes([t[0], t[1]]),
            dport: u16::from_be_bytes([t[2], t[3]]),
            seq: be32(&t[4..8]),
            ack: be32(&t[8..12]),
            flags: t[13],
        })
    }
}

/// A TCP server in a namespace that echoes everything each connection
/// sends until the peer closes it (one thread per connection); stops
/// accepting when dropped.
pub struct StreamEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StreamEcho {
    /// Listens on `addr:port` in namespace `ns`.
    pub fn start(ns: &str, addr: IpAddr, port: u16) -> anyhow::Result<Self> {
        let path = format!("/run/netns/{ns}");
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let bound = netns::enter(&path).and_then(|()| {
                let l = TcpListener::bind(SocketAddr::new(addr, port))
                    .with_context(|| format!("bind {addr}:{port}"))?;
                l.set_nonblocking(true)?;
                Ok(l)
            });
            let l = match bound {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => {
                        let s = s.clone();
                        std::thread::spawn(move || echo_until_closed(c, &s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        rx.recv().context("echo server thread")??;
        Ok(StreamEcho {
            stop,
            thread: Some(thread),
        })
    }
}

fn echo_until_closed(mut c: TcpStream, stop: &AtomicBool) {
    let _ = c.set_nonblocking(false);
    let _ = c.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match c.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for StreamEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a [`Conversation`] did.
#[derive(Clone, Debug, Default)]
pub struct ConversationReport {
    /// Exchanges (a message out, its whole echo back) that completed.
    pub ok: u64,
    /// Exchanges that failed (at most one: the conversation stops at the
    /// first failure, the connection is then unusable).
    pub failed: u64,
    /// The first failure: when (since the start) and what.
    pub failure: Option<(Duration, String)>,
    /// The slowest exchange that completed.
    pub slowest: Duration,
}

/// One TCP connection, opened from a namespace, on which a thread sends
/// `size` bytes every `every` and reads their echo (each within
/// `timeout`), until stopped or until an exchange fails.
pub struct Conversation {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    report: Arc<Mutex<ConversationReport>>,
    thread: Option<JoinHandle<()>>,
}

impl Conversation {
    /// Connects from `src` in namespace `ns` to `dst` (the handshake must
    /// complete within `timeout`) and starts the exchanges.
    pub fn start(
        ns: &str,
        src: IpAddr,
        dst: SocketAddr,
        size: usize,
        every: Duration,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let path = format!("/run/netns/{ns}");
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let report = Arc::new(Mutex::new(ConversationReport::default()));
        let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let (s, k, r) = (stop.clone(), ok.clone(), report.clone());
        let thread = std::thread::spawn(move || {
            let mut c = match netns::enter(&path).and_then(|()| connect(src, dst, timeout)) {
                Ok(c) => {
                    let _ = tx.send(Ok(()));
                    c
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let start = Instant::now();
            let mut n: u64 = 0;
            while !s.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let msg: Vec<u8> = (0..size).map(|i| (n as usize + i) as u8).collect();
                match exchange(&mut c, &msg) {
                    Ok(()) => {
                        k.fetch_add(1, Ordering::Relaxed);
                        let mut rep = r.lock().expect("report lock");
                        rep.ok += 1;
                        rep.slowest = rep.slowest.max(t0.elapsed());
                    }
                    Err(e) => {
                        let mut rep = r.lock().expect("report lock");
                        rep.failed += 1;
                        rep.failure = Some((
                            start.elapsed(),
                            format!("exchange {n} (after {:?}): {e}", t0.elapsed()),
                        ));
                        return;
                    }
                }
                n += 1;
                std::thread::sleep(every.saturating_sub(t0.elapsed()));
            }
        });
        rx.recv().context("conversation thread")??;
        Ok(Conversation {
            stop,
            ok,
            report,
            thread: Some(thread),
        })
    }

    /// Exchanges completed so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the exchanges (closing the connection) and reports.
    pub fn finish(mut self) -> ConversationReport {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.report.lock().expect("report lock").clone()
    }
}

/// A TCP connection from `src` to `dst` in the calling thread's namespace
/// (handshake within `timeout`; reads and writes time out after it too).
fn connect(src: IpAddr, dst: SocketAddr, timeout: Duration) -> anyhow::Result<TcpStream> {
    let domain = socket2::Domain::for_address(dst);
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.bind(&SocketAddr::new(src, 0).into())
        .with_context(|| format!("bind {src}"))?;
    sock.connect_timeout(&dst.into(), timeout)
        .with_context(|| format!("connect {dst}"))?;
    let c: TcpStream = sock.into();
    c.set_read_timeout(Some(timeout))?;
    c.set_write_timeout(Some(timeout))?;
    c.set_nodelay(true)?;
    Ok(c)
}

/// A TCP connection opened from `src` in namespace `ns` to `dst` (see
/// [`connect`]); usable from any thread afterwards.
pub fn connect_in(
    ns: &str,
    src: IpAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<TcpStream> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || netns::enter(&path).and_then(|()| connect(src, dst, timeout)))
        .join()
        .map_err(|_| anyhow::anyhow!("connect thread panicked"))?
}

/// Sends `msg` on `c` and reads its echo back (within the stream's timeouts).
pub fn exchange(c: &mut TcpStream, msg: &[u8]) -> anyhow::Result<()> {
    c.write_all(msg).context("send")?;
    let mut got = vec![0u8; msg.len()];
    if let Err(e) = c.read_exact(&mut got) {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            anyhow::bail!("no echo within {:?}", c.read_timeout()?.unwrap_or_default());
        }
        return Err(anyhow::Error::new(e).context("reading the echo"));
    }
    anyhow::ensure!(got == msg, "echo differs from what was sent");
    Ok(())
}

impl Drop for Conversation {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SYN 198.18.0.1:1000 -> 198.18.0.2:80 (seq 1, window 65535, no
    /// options): the filled-in checksum verifies and matches the value
    /// computed by hand.
    #[test]
    fn tcp_checksum_of_a_known_segment() {
        let mut p = vec![
            0x45, 0, 0, 40, 0x12, 0x34, 0, 0, 64, 6, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2,
        ];
        p.extend_from_slice(&[0x03, 0xe8, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02]);
        p.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
        fill_transport_checksum(&mut p, 20, IPPROTO_TCP).unwrap();
        assert_eq!(&p[36..38], &[0x1f, 0x82]);
        // Verifying: the sum over pseudo-header and segment folds to zero.
        let mut sum = sum16(&p[12..20]) + u32::from(IPPROTO_TCP) + 20 + sum16(&p[20..]);
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
        let seg = TcpSegment::parse(&p).unwrap();
        assert_eq!(
            (seg.sport, seg.dport, seg.flags, seg.seq),
            (1000, 80, 0x02, 1)
        );
    }
}
