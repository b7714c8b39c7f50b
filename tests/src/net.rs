//! Real traffic inside namespaces: TCP listeners and connection attempts.

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

/// A TCP listener running in a namespace; stops when dropped.
pub struct Listener {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Listens on `addr:port` inside the namespace `ns` (a name under /run/netns).
    pub fn start(ns: &str, addr: IpAddr, port: u16) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let path = format!("/run/netns/{ns}");
        let (s, a) = (stop.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            let l = netns::enter(&path).and_then(|_| {
                let l = TcpListener::bind(SocketAddr::new(addr, port))
                    .with_context(|| format!("bind {addr}:{port}"))?;
                l.set_nonblocking(true)?;
                Ok(l)
            });
            let l = match l {
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
                        a.fetch_add(1, Ordering::Relaxed);
                        drop(c);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        rx.recv().context("listener thread")??;
        Ok(Listener {
            stop,
            accepted,
            thread: Some(thread),
        })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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
        let domain = if src.is_ipv4() {
            socket2::Domain::IPV4
        } else {
            socket2::Domain::IPV6
        };
        let sock =
            socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        sock.bind(&SocketAddr::new(src, 0).into())
            .with_context(|| format!("bind {src}"))?;
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
