//! Real traffic inside namespaces: servers (TCP echo, UDP echo and sink),
//! TCP and UDP exchanges, floods, and raw frames.

use std::{
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;

use crate::netns;

/// Echoes what the peer sends first (if anything arrives within a
/// second), then closes.
fn echo_once(mut c: TcpStream) {
    use std::io::{Read as _, Write as _};
    let _ = c.set_nonblocking(false);
    let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 512];
    if let Ok(n) = c.read(&mut buf)
        && n > 0
    {
        let _ = c.write_all(&buf[..n]);
    }
}

/// A server thread inside a namespace: binds on start (a bind error is
/// returned to the caller), then serves until dropped. One mechanism for
/// the TCP echo, UDP echo and UDP sink servers the tests need.
pub struct Server {
    stop: Arc<AtomicBool>,
    handled: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Runs `bind` inside namespace `ns`, then calls `serve` until the
    /// server is dropped; `serve` returns whether it handled a request
    /// (counted) and must not block for long (a timeout or non-blocking
    /// socket), so the server stops promptly.
    fn spawn<S: 'static>(
        ns: &str,
        bind: impl FnOnce() -> anyhow::Result<S> + Send + 'static,
        mut serve: impl FnMut(&S) -> bool + Send + 'static,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let handled = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let path = format!("/run/netns/{ns}");
        let (s, h) = (stop.clone(), handled.clone());
        let thread = std::thread::spawn(move || {
            let sock = match netns::enter(&path).and_then(|()| bind()) {
                Ok(sock) => {
                    let _ = tx.send(Ok(()));
                    sock
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !s.load(Ordering::Relaxed) {
                if serve(&sock) {
                    h.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        rx.recv().context("server thread")??;
        Ok(Server {
            stop,
            handled,
            thread: Some(thread),
        })
    }

    /// A TCP listener on `addr:port` that echoes the first message of each
    /// connection; `handled` counts accepted connections.
    pub fn tcp_echo(ns: &str, addr: IpAddr, port: u16) -> anyhow::Result<Self> {
        Self::spawn(
            ns,
            move || {
                let l = TcpListener::bind(SocketAddr::new(addr, port))
                    .with_context(|| format!("bind {addr}:{port}"))?;
                l.set_nonblocking(true)?;
                Ok(l)
            },
            |l: &TcpListener| {
                if let Ok((c, _)) = l.accept() {
                    echo_once(c);
                    true
                } else {
                    std::thread::sleep(Duration::from_millis(5));
                    false
                }
            },
        )
    }

    /// A UDP server on `addr:port` that answers each datagram with itself
    /// (DNS-style request/response), or with nothing when `echo` is false
    /// (a sink: allowed traffic reaches an application and draws no ICMP
    /// errors).
    pub fn udp(ns: &str, addr: IpAddr, port: u16, echo: bool) -> anyhow::Result<Self> {
        Self::spawn(
            ns,
            move || {
                let u = std::net::UdpSocket::bind(SocketAddr::new(addr, port))
                    .with_context(|| format!("bind udp {addr}:{port}"))?;
                u.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok(u)
            },
            move |u: &std::net::UdpSocket| {
                let mut buf = [0u8; 2048];
                match u.recv_from(&mut buf) {
                    Ok((n, peer)) => {
                        if echo {
                            let _ = u.send_to(&buf[..n], peer);
                        }
                        true
                    }
                    Err(_) => false,
                }
            },
        )
    }

    /// Requests handled so far (TCP: connections accepted).
    pub fn handled(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP socket bound to `src` (any port), in the calling thread's namespace.
fn tcp_socket_bound_to(src: IpAddr) -> anyhow::Result<socket2::Socket> {
    let domain = if src.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.bind(&SocketAddr::new(src, 0).into())
        .with_context(|| format!("bind {src}"))?;
    Ok(sock)
}

/// Tries a TCP connection from `src` (bound) inside namespace `ns` to
/// `dst:port`; true when the handshake completes within `timeout`.
pub fn tcp_connect(
    ns: &str,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> anyhow::Result<bool> {
        netns::enter(&path)?;
        let sock = tcp_socket_bound_to(src)?;
        let ok = sock
            .connect_timeout(&SocketAddr::new(dst, port).into(), timeout)
            .is_ok();
        if ok {
            let s: TcpStream = sock.into();
            drop(s);
        }
        Ok(ok)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("connect thread panicked"))?
}

/// A full TCP exchange from `src` in namespace `ns` to `dst:port`: the
/// handshake, a message out and its echo back. True only if all of it
/// happened within `timeout` (so both directions were let through).
pub fn tcp_exchange(
    ns: &str,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    timeout: Duration,
) -> anyhow::Result<bool> {
    use std::io::{Read as _, Write as _};
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> anyhow::Result<bool> {
        netns::enter(&path)?;
        let sock = tcp_socket_bound_to(src)?;
        if sock
            .connect_timeout(&SocketAddr::new(dst, port).into(), timeout)
            .is_err()
        {
            return Ok(false);
        }
        let mut s: TcpStream = sock.into();
        s.set_read_timeout(Some(timeout))?;
        let msg = b"segbpf-ping";
        if s.write_all(msg).is_err() {
            return Ok(false);
        }
        let mut buf = [0u8; 64];
        let mut got = 0;
        while got < msg.len() {
            match s.read(&mut buf[got..]) {
                Ok(0) | Err(_) => return Ok(false),
                Ok(n) => got += n,
            }
        }
        Ok(&buf[..got] == msg)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("exchange thread panicked"))?
}

/// A UDP request from `src` in namespace `ns` to `dst:port`; true when
/// the echoed response arrives within `timeout`.
pub fn udp_exchange(
    ns: &str,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> anyhow::Result<bool> {
        netns::enter(&path)?;
        let sock = std::net::UdpSocket::bind(SocketAddr::new(src, 0))?;
        sock.set_read_timeout(Some(timeout))?;
        let msg = b"segbpf-query";
        sock.send_to(msg, SocketAddr::new(dst, port))?;
        let mut buf = [0u8; 64];
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => Ok(&buf[..n] == msg && from.ip() == dst),
            Err(_) => Ok(false),
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("udp thread panicked"))?
}

/// Sends UDP datagrams from `src` in namespace `ns` to `dst:port` as fast
/// as it can for `duration`; returns how many were sent.
pub fn udp_flood(
    ns: &str,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    duration: Duration,
) -> anyhow::Result<u64> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> anyhow::Result<u64> {
        netns::enter(&path)?;
        let sock = std::net::UdpSocket::bind(SocketAddr::new(src, 0))?;
        let payload = [0u8; 32];
        let end = std::time::Instant::now() + duration;
        let mut sent = 0u64;
        while std::time::Instant::now() < end {
            for _ in 0..64 {
                if sock.send_to(&payload, SocketAddr::new(dst, port)).is_ok() {
                    sent += 1;
                }
            }
        }
        Ok(sent)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("flood thread panicked"))?
}

/// Sends small UDP datagrams from `src` in namespace `ns` to `dst:port` as
/// fast as one thread can for `duration`; returns packets per second.
pub fn udp_rate(
    ns: &str,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    duration: Duration,
) -> anyhow::Result<f64> {
    let sent = udp_flood(ns, src, dst, port, duration)?;
    Ok(sent as f64 / duration.as_secs_f64())
}

/// An AF_PACKET socket on an interface of a namespace, to put hand-built
/// Ethernet frames on the wire (any source address, any protocol).
pub struct RawSender {
    fd: std::os::fd::OwnedFd,
    ifindex: i32,
}

impl RawSender {
    /// Opens the socket inside namespace `ns` on `iface`.
    pub fn open(ns: &str, iface: &str) -> anyhow::Result<Self> {
        use std::os::fd::FromRawFd as _;
        let path = format!("/run/netns/{ns}");
        let iface = iface.to_string();
        std::thread::spawn(move || -> anyhow::Result<RawSender> {
            netns::enter(&path)?;
            let ifindex = nix::net::if_::if_nametoindex(iface.as_str())? as i32;
            // SAFETY: plain socket(2); the fd is owned right away.
            let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            anyhow::ensure!(
                raw >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: `raw` is a fresh descriptor nobody else owns.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
            Ok(RawSender { fd, ifindex })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("raw socket thread panicked"))?
    }

    /// Sends one frame.
    pub fn send(&self, frame: &[u8]) -> anyhow::Result<()> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the buffer and address are valid for the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        anyhow::ensure!(
            n == frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }
}

/// A raw IP socket (`IPPROTO_RAW`, the packet's own IP header) inside a
/// namespace: hand-built IP packets sent by the namespace's own stack, so
/// they leave through its routing, netfilter output hooks and conntrack,
/// as a host's own packets do (unlike [`RawSender`], which puts frames on
/// the wire below all of that).
pub struct RawIpSender {
    fd: std::os::fd::OwnedFd,
    v6: bool,
}

impl RawIpSender {
    /// Opens the socket (IPv6 when `v6`) inside namespace `ns`; its
    /// packets carry the netfilter mark `mark` (`meta mark`), so rules can
    /// tell them from the namespace's own.
    pub fn open(ns: &str, v6: bool, mark: u32) -> anyhow::Result<Self> {
        use std::os::fd::FromRawFd as _;
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || -> anyhow::Result<RawIpSender> {
            netns::enter(&path)?;
            let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
            // SAFETY: plain socket(2); the fd is owned right away.
            let raw = unsafe { libc::socket(family, libc::SOCK_RAW, libc::IPPROTO_RAW) };
            anyhow::ensure!(
                raw >= 0,
                "raw IP socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: `raw` is a fresh descriptor nobody else owns.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
            nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::Mark, &mark)?;
            Ok(RawIpSender { fd, v6 })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("raw socket thread panicked"))?
    }

    /// Sends one IP packet (starting at its IP header) to `dst`. False
    /// when the namespace's own netfilter dropped it on its way out
    /// (`EPERM`).
    pub fn send(&self, dst: IpAddr, packet: &[u8]) -> anyhow::Result<bool> {
        use std::os::fd::AsRawFd as _;
        let n = match dst {
            IpAddr::V4(a) if !self.v6 => {
                // SAFETY: zeroed sockaddr_in is valid; fields set below.
                let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                sa.sin_family = libc::AF_INET as u16;
                sa.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
                // SAFETY: the buffer and address are valid for the call.
                unsafe {
                    libc::sendto(
                        self.fd.as_raw_fd(),
                        packet.as_ptr().cast(),
                        packet.len(),
                        0,
                        (&raw const sa).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as u32,
                    )
                }
            }
            IpAddr::V6(a) if self.v6 => {
                // SAFETY: zeroed sockaddr_in6 is valid; fields set below.
                let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
                sa.sin6_family = libc::AF_INET6 as u16;
                sa.sin6_addr.s6_addr = a.octets();
                // SAFETY: the buffer and address are valid for the call.
                unsafe {
                    libc::sendto(
                        self.fd.as_raw_fd(),
                        packet.as_ptr().cast(),
                        packet.len(),
                        0,
                        (&raw const sa).cast(),
                        std::mem::size_of::<libc::sockaddr_in6>() as u32,
                    )
                }
            }
            _ => anyhow::bail!("{dst}: not the family of this raw socket"),
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            anyhow::ensure!(e.raw_os_error() == Some(libc::EPERM), "sendto {dst}: {e}");
            return Ok(false);
        }
        anyhow::ensure!(n == packet.len() as isize, "sendto {dst}: short write");
        Ok(true)
    }
}

/// The MAC address of `iface` in namespace `ns`.
pub fn mac(ns: &str, iface: &str) -> anyhow::Result<[u8; 6]> {
    let out = crate::netns::ip(&["-n", ns, "-j", "link", "show", iface])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let s = v[0]["address"].as_str().context("no address")?;
    let mut m = [0u8; 6];
    for (i, part) in s.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(m)
}

/// A UDP socket bound to `addr` with a receive buffer large enough for
/// several 64 KiB datagrams, in the calling thread's namespace.
fn udp_socket_large(addr: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Capped by net.core.rmem_max; the default cap (2 x 208 KiB) holds a
    // reassembled 65,000-byte datagram with room to spare.
    let _ = sock.set_recv_buffer_size(1 << 20);
    let _ = sock.set_send_buffer_size(1 << 20);
    sock.bind(&addr.into())
        .with_context(|| format!("bind udp {addr}"))?;
    Ok(sock.into())
}

impl Server {
    /// Like [`Server::udp`], for datagrams of any size up to 65,535 bytes
    /// (a 64 KiB buffer, a large receive buffer): an echo answers each
    /// datagram with itself, whole, so datagrams above the MTU are
    /// fragmented by the kernel in both directions.
    pub fn udp_large(ns: &str, addr: IpAddr, port: u16, echo: bool) -> anyhow::Result<Self> {
        let mut buf = vec![0u8; 65536];
        Self::spawn(
            ns,
            move || {
                let u = udp_socket_large(SocketAddr::new(addr, port))?;
                u.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok(u)
            },
            move |u: &std::net::UdpSocket| match u.recv_from(&mut buf) {
                Ok((n, peer)) => {
                    if echo {
                        let _ = u.send_to(&buf[..n], peer);
                    }
                    true
                }
                Err(_) => false,
            },
        )
    }

    /// A TCP listener on `addr:port` that sends `bytes` bytes of
    /// [`bulk_pattern`] on each accepted connection, then closes it; each
    /// connection may take up to 30 s (a stalled one gives up after 3 s
    /// without progress). `handled` counts accepted connections.
    pub fn tcp_source(ns: &str, addr: IpAddr, port: u16, bytes: u64) -> anyhow::Result<Self> {
        Self::spawn(
            ns,
            move || {
                let l = TcpListener::bind(SocketAddr::new(addr, port))
                    .with_context(|| format!("bind {addr}:{port}"))?;
                l.set_nonblocking(true)?;
                Ok(l)
            },
            move |l: &TcpListener| {
                if let Ok((mut c, _)) = l.accept() {
                    let _ = c.set_nonblocking(false);
                    let deadline = std::time::Instant::now() + Duration::from_secs(30);
                    let _ = write_pattern(&mut c, bytes, deadline);
                    true
                } else {
                    std::thread::sleep(Duration::from_millis(5));
                    false
                }
            },
        )
    }

    /// A TCP listener on `addr:port` that reads each accepted connection to
    /// its end (up to 30 s; a stalled one gives up after 3 s without
    /// progress), checks it against [`bulk_pattern`], then answers with the
    /// number of bytes that arrived in order and intact (8 bytes, big
    /// endian) and closes. `handled` counts accepted connections.
    pub fn tcp_sink(ns: &str, addr: IpAddr, port: u16) -> anyhow::Result<Self> {
        Self::spawn(
            ns,
            move || {
                let l = TcpListener::bind(SocketAddr::new(addr, port))
                    .with_context(|| format!("bind {addr}:{port}"))?;
                l.set_nonblocking(true)?;
                Ok(l)
            },
            move |l: &TcpListener| {
                if let Ok((mut c, _)) = l.accept() {
                    use std::io::Write as _;
                    let _ = c.set_nonblocking(false);
                    let deadline = std::time::Instant::now() + Duration::from_secs(30);
                    let (n, _) = read_pattern(&mut c, deadline);
                    let _ = c.set_write_timeout(Some(Duration::from_secs(3)));
                    let _ = c.write_all(&n.to_be_bytes());
                    true
                } else {
                    std::thread::sleep(Duration::from_millis(5));
                    false
                }
            },
        )
    }
}

/// The byte at offset `i` of a bulk TCP transfer: `i % 251` (a period
/// prime to every segment and buffer size, so a lost, duplicated or
/// reordered chunk shows).
pub fn bulk_pattern(i: u64) -> u8 {
    (i % 251) as u8
}

/// 64 KiB of [`bulk_pattern`] plus one period, so any offset's next 64 KiB
/// is one slice of it.
fn pattern_block() -> Vec<u8> {
    (0..65536 + 251).map(bulk_pattern).collect()
}

/// Writes `bytes` bytes of [`bulk_pattern`] to `s` until `deadline`;
/// returns how many were written. Gives up after 3 s without progress.
fn write_pattern(s: &mut TcpStream, bytes: u64, deadline: std::time::Instant) -> u64 {
    use std::io::Write as _;
    let block = pattern_block();
    let _ = s.set_write_timeout(Some(Duration::from_secs(3)));
    let mut sent = 0u64;
    while sent < bytes && std::time::Instant::now() < deadline {
        let start = (sent % 251) as usize;
        let n = (bytes - sent).min(65536) as usize;
        match s.write(&block[start..start + n]) {
            Ok(0) | Err(_) => break,
            Ok(k) => sent += k as u64,
        }
    }
    sent
}

/// Reads `s` to its end (or `deadline`, or 3 s without progress) and
/// returns how many bytes arrived matching [`bulk_pattern`] from offset 0,
/// and whether the stream ended cleanly with nothing that did not match.
fn read_pattern(s: &mut TcpStream, deadline: std::time::Instant) -> (u64, bool) {
    use std::io::Read as _;
    let block = pattern_block();
    let mut buf = vec![0u8; 65536];
    let mut got = 0u64;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return (got, false);
        }
        let _ = s.set_read_timeout(Some(left.min(Duration::from_secs(3))));
        match s.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => {
                let start = (got % 251) as usize;
                if buf[..n] != block[start..start + n] {
                    let ok = buf[..n]
                        .iter()
                        .zip(&block[start..start + n])
                        .take_while(|(a, b)| a == b)
                        .count();
                    return (got + ok as u64, false);
                }
                got += n as u64;
            }
            Err(_) => return (got, false),
        }
    }
}

/// What a bulk TCP transfer achieved (see [`tcp_fetch`], [`tcp_push`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// The handshake completed.
    pub connected: bool,
    /// Bytes the receiving side counted, in order and matching
    /// [`bulk_pattern`].
    pub received: u64,
    /// Time from the connection attempt to the end of the transfer.
    pub elapsed: Duration,
}

/// Connects from `src` in namespace `ns` to `dst:port` within `timeout`,
/// with socket buffers of 4 MiB, and runs `body` on the connection with
/// the deadline (the connection attempt plus `timeout`); `body` returns
/// the byte count of the transfer.
fn transfer(
    ns: &str,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    timeout: Duration,
    body: impl FnOnce(&mut TcpStream, std::time::Instant) -> u64 + Send + 'static,
) -> anyhow::Result<Transfer> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> anyhow::Result<Transfer> {
        netns::enter(&path)?;
        let start = std::time::Instant::now();
        let sock = tcp_socket_bound_to(src)?;
        let _ = sock.set_recv_buffer_size(4 << 20);
        let _ = sock.set_send_buffer_size(4 << 20);
        if sock
            .connect_timeout(&SocketAddr::new(dst, port).into(), timeout)
            .is_err()
        {
            return Ok(Transfer {
                connected: false,
                received: 0,
                elapsed: start.elapsed(),
            });
        }
        let mut s: TcpStream = sock.into();
        let received = body(&mut s, start + timeout);
        Ok(Transfer {
            connected: true,
            received,
            elapsed: start.elapsed(),
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("transfer thread panicked"))?
}

/// Connects from `src` in namespace `ns` to a [`Server::tcp_source`] at
/// `dst:port` and reads until the server closes or `timeout` (counted from
/// the connection attempt) runs out; the peer sends, this side receives.
pub fn tcp_fetch(
    ns: &str,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    timeout: Duration,
) -> anyhow::Result<Transfer> {
    transfer(ns, src, dst, port, timeout, |s, deadline| {
        read_pattern(s, deadline).0
    })
}

/// Connects from `src` in namespace `ns` to a [`Server::tcp_sink`] at
/// `dst:port`, sends `bytes` bytes of [`bulk_pattern`], closes its sending
/// side and reads the count the sink reports, all within `timeout`
/// (counted from the connection attempt); this side sends. `received` is
/// the sink's count (0 when no count came back).
pub fn tcp_push(
    ns: &str,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    bytes: u64,
    timeout: Duration,
) -> anyhow::Result<Transfer> {
    use std::io::Read as _;
    transfer(ns, src, dst, port, timeout, move |s, deadline| {
        let sent = write_pattern(s, bytes, deadline);
        let mut count = [0u8; 8];
        if sent == bytes && s.shutdown(std::net::Shutdown::Write).is_ok() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let _ = s.set_read_timeout(Some(left.max(Duration::from_millis(1))));
            if s.read_exact(&mut count).is_ok() {
                return u64::from_be_bytes(count);
            }
        }
        0
    })
}

/// Sends `payload` as one UDP datagram from `src` in namespace `ns` to
/// `dst:port` (a [`Server::udp_large`] echo) and waits up to `timeout` for
/// a datagram back from `dst:port`. Returns it, or `None` when nothing
/// came back in time or the send itself was refused (a local firewall
/// dropping on output may make `sendto` fail: that is "not delivered"
/// too).
pub fn udp_echo_payload(
    ns: &str,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    payload: Vec<u8>,
    timeout: Duration,
) -> anyhow::Result<Option<Vec<u8>>> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> anyhow::Result<Option<Vec<u8>>> {
        netns::enter(&path)?;
        let sock = udp_socket_large(SocketAddr::new(src, 0))?;
        let to = SocketAddr::new(dst, port);
        sock.connect(to)?; // only datagrams from dst:port are received
        if sock.send(&payload).is_err() {
            return Ok(None);
        }
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            sock.set_read_timeout(Some(left))?;
            match sock.recv(&mut buf) {
                Ok(n) => return Ok(Some(buf[..n].to_vec())),
                // ICMP errors (port unreachable) surface as ECONNREFUSED on
                // a connected socket: keep waiting for a datagram.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(_) => return Ok(None),
            }
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("udp thread panicked"))?
}

/// Runs `ping` inside namespace `ns`: `count` echo requests of `size`
/// bytes of payload to `dst` (IPv4 or IPv6 by the address), 200 ms apart,
/// waiting up to `wait` for a reply when none came. Returns how many
/// replies arrived (a local firewall refusing the send counts as no
/// reply); an error when ping printed no statistics. The ping process
/// ends by itself (bounded by `count` and `wait`).
pub fn ping(ns: &str, dst: IpAddr, size: u32, count: u32, wait: Duration) -> anyhow::Result<u32> {
    let family = if dst.is_ipv4() { "-4" } else { "-6" };
    let wait_s = wait.as_secs().max(1).to_string();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "ping", family, "-n", "-q"])
        .args(["-c", &count.to_string(), "-i", "0.2", "-W", &wait_s])
        .args(["-s", &size.to_string(), &dst.to_string()])
        .output()
        .context("running ping (Debian package iputils-ping; `cargo xtask setup` installs it)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    // "2 packets transmitted, 2 received, 0% packet loss, time 201ms"
    let received = stdout
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|part| part.split_whitespace().next())
        .and_then(|n| n.parse().ok());
    // No statistics line: ping did not run at all (bad arguments, no
    // route): a broken lab, not a verdict.
    received.with_context(|| {
        format!(
            "ping in {ns} to {dst} ({}): {}{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}
