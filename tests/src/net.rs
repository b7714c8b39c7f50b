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
            let sock = match netns::enter(&path).and_then(|_| bind()) {
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
            |l: &TcpListener| match l.accept() {
                Ok((c, _)) => {
                    echo_once(c);
                    true
                }
                Err(_) => {
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
                (&addr as *const libc::sockaddr_ll).cast(),
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
