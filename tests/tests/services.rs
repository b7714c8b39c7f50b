//! `[services.*]` with the real cgroup_skb programs, real cgroups and real
//! sockets (docs/services.md).
//!
//! Every test makes its own cgroup parent below the cgroup v2 mount
//! (`segbpf-test-PID-N/`) and attaches there with `--cgroup-root`, so
//! nothing outside it is judged. Sockets are made by child processes of
//! this test binary (re-executed as `helper_process`) that join their
//! cgroup — and, for the container case, a network namespace — before
//! they exec, so every socket belongs to the cgroup from its creation, as
//! under systemd or a container runtime. Traffic stays inside a network
//! namespace the test makes (loopback, and an interface holding the
//! "host's own" addresses 198.18.x / fd00::).
//!
//! * `traffic_matrix`: `db` accepts 3306 only from `app` (TCP and UDP,
//!   loopback and the host's addresses, both families), not from another
//!   service or a process in none; `app`'s egress is an allow-list; a
//!   service without rules keeps the defaults; replies pass.
//! * `restart_opens_no_gap`: cgroups removed and made again while clients
//!   loop: a socket in a re-created cgroup is held until classified, never
//!   judged as "no service"; the delay until it is covered is measured.
//! * `container_to_host`: a process in its own network namespace and
//!   cgroup (`cgroup = "..."`) reaches a host service as its policy says.
//! * `to_services_checks_the_receiver`: `to_services` lets a service send
//!   only to the named one (another receiver at that port refuses it).
//! * `reload_replaces_or_keeps_the_policy`: `reload --services` and SIGHUP
//!   apply a new policy; a bad one is refused and the old one stays.
//! * `no_wait_leaves_a_follower_that_detach_ends`: `--no-wait` leaves a
//!   follower that classifies new cgroups and exits after the detach.
//! * `no_wait_follower_is_single_and_logs`: a second `--no-wait` starts no
//!   second follower; the follower logs to a file; the state names the
//!   policy file absolute; `status --services` names a subtree attachment.
//! * `sighup_reloads_the_policy_in_force`: SIGHUP (foreground attach or
//!   follower) reloads the policy file in force, never undoing a later
//!   `reload --services -p OTHER`.
//! * `loopback_flows_across_a_reload`: a live app -> db connection goes on
//!   through reloads that allow it (also with app renumbered) and is cut by
//!   one that does not.
//! * `reload_judges_every_flow_again`: flows a service's egress opened
//!   (loopback, another host) and flows it received over an interface go
//!   on through a reload that allows them and are cut by one that does
//!   not, both families.
//! * `to_services_replies_come_from_the_service`: a port squatter (in no
//!   service or another one) cannot answer a `to_services` flow.
//! * `client_closing_first_leaves_no_last_ack`: the kernel's TIME_WAIT
//!   ACKs pass on db's flows; no server socket is left in LAST-ACK.
//! * `renumbered_service_cannot_reuse_a_flow`: a service given app's old id
//!   by later reloads is not taken for app on app's old flow.
//! * `renumbering_reloads_racing_cgroup_churn`: renumbering reloads back
//!   to back while cgroups are made and removed by the hundred: a process
//!   in no service never reaches db.
//! * `no_receiver_reads_the_stamp`: a receiver asking for each datagram's
//!   priority (`SO_RCVPRIORITY`) gets 0 for a service's datagrams.
//! * `no_service_cannot_pass_for_a_service`: a process in no service
//!   cannot pass for `app` at db's ingress: not by reusing a 4-tuple app
//!   just closed, not by sharing app's live port (SO_REUSEADDR, raw
//!   socket); TCP and UDP, both families.
//! * `tapped_stamp_cannot_be_replayed`: a stamp read off app's packet by
//!   an `AF_PACKET` tap on `lo` and replayed in frames from the tap over
//!   IPv6 loopback is refused from another source port (and counted),
//!   and on its own tuple once reloads replaced the key.
//! * `services_commands_name_the_root_in_use`: `set`, `rollback`,
//!   `flows`, `monitor`, `reload --services` without the right
//!   `--cgroup-root` name the root in use and leave no file behind.
//! * `explain_warns_of_a_peer_service_off_the_host`: `explain
//!   --peer-service` with an address not local to the host warns.
//! * `set_usage_shows_the_services_form`: `set add|del --help` shows
//!   `--services ... <SET> <MEMBER>...`.
//! * `confirm_guards_a_first_attach`: `attach --services --confirm SECS`
//!   is removed after SECS unless `confirm --services` runs; `--confirm`
//!   over an existing attachment is refused and changes nothing.
//! * `set_edits_and_rollback`: `set add|del --services` lets a peer in
//!   and shuts it out (one generation each; errors change nothing),
//!   `rollback --services` walks back, `reload --services` goes back to
//!   the file unless `--keep-set-edits`, SIGHUP keeps the edits.
//! * `status_counts_the_generation_in_force`: the counters of a slot used
//!   again are those of the generation in force.
//! * `explain_agrees_with_the_kernel`: `explain --services` of both sides
//!   of a loopback connection gives what the kernel does, and names the
//!   rule.
//! * `monitor_shows_drops_with_their_service`, `flows_carry_their_service`:
//!   `monitor --services` and `flows --services` records carry `service`.
//! * `flows_name_the_rule_of_the_generation_that_judged`: after a reload
//!   that renumbers the rules, `flows --services` names a flow's rule from
//!   the policy that judged it, or says that policy is no longer kept.
//! * `nested_attaches_at_once_leave_one`: two attaches at nested roots
//!   with their own state and pin roots, at once: exactly one enforces.
//! * `audited_flows_are_cut_when_enforcement_starts`: a connection only
//!   audit mode let through is cut when enforcement starts.
//! * `bulk_stream_over_loopback_drops_nothing`: IPv6 extension headers
//!   (the kernel's Hop-by-Hop on large GSO packets over `::1`) are walked.
//! * `follower_stops_when_its_root_is_removed`: a root removed and made
//!   again ends the follower with an error, not silently.
//! * `nested_attachments_are_refused`: an attach below or above a live
//!   services attachment is refused, naming it (asked of the kernel: a
//!   live one without its state file counts, a stale state file does not).
//! * `services_below_the_programs_reach_are_refused`: a service deeper
//!   than level 16 is refused by `check`, `attach` and `reload`, with
//!   file, line and field; a refused reload leaves the policy in force.
//! * `status_says_whether_a_follower_runs`: `status --services` shows the
//!   follower (or that none runs and new cgroups are held), a foreground
//!   attach that leaves says what it leaves behind, audit mode reads
//!   "auditing".
//! * `follower_log_is_capped`: the background follower's log is rotated
//!   to `.1` past its cap.
//! * `explain_egress_to_services_as_the_live_program`: `explain` lets a
//!   `to_services` packet leave and says the receiver decides.
//! * `under_systemd`: this machine's systemd booted by systemd-nspawn
//!   (`--volatile=yes -D /`) with the package's segbpf-services.service
//!   and units written for the test: `unit = "..."` resolves, the
//!   package's unit is enforcing before the governed units start, and
//!   `systemctl restart` of a governed unit (a new cgroup) opens no gap.
//!   Skipped, saying so, when systemd-nspawn is missing.
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use segbpf_tests::{
    lab::segbpf_bin,
    netns::Netns,
    nspawn::{self, remove_cgroup_tree as remove_cgroups},
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The cgroup v2 mount, from /proc/self/mountinfo.
fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    for line in text.lines() {
        if let Some((left, right)) = line.split_once(" - ")
            && right.split_whitespace().next() == Some("cgroup2")
            && let Some(mp) = left.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(mp));
        }
    }
    bail!("no cgroup2 mount")
}

// ---------------------------------------------------------------------------
// The helper process: one socket operation, as a child in a cgroup.
// ---------------------------------------------------------------------------

const OP_ENV: &str = "SEGBPF_SVC_TEST_OP";

/// Runs the operation in `SEGBPF_SVC_TEST_OP` and exits: 0 success, 1
/// failure. Without it (a normal test run) it does nothing.
#[test]
#[ignore = "a child process of the services tests, not a test"]
fn helper_process() {
    let Ok(op) = std::env::var(OP_ENV) else {
        return;
    };
    let a: Vec<&str> = op.split(' ').collect();
    let addr = |i: usize| -> SocketAddr {
        SocketAddr::new(
            a[i].parse().expect("address"),
            a[i + 1].parse().expect("port"),
        )
    };
    let code = match a[0] {
        "connect" => i32::from(!tcp_echo_once(addr(1), Duration::from_millis(400))),
        "udp" => i32::from(!udp_echo_once(addr(1), Duration::from_millis(400))),
        "serve-tcp" => {
            let l = TcpListener::bind(addr(1)).expect("bind");
            println!("ready");
            let _ = std::io::stdout().flush();
            for c in l.incoming().flatten() {
                let mut c = c;
                let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
                let mut buf = [0u8; 64];
                if let Ok(n) = c.read(&mut buf) {
                    let _ = c.write_all(&buf[..n]);
                }
            }
            0
        }
        // Echoes every connection until it closes, a thread each.
        "serve-tcp-stream" => {
            let l = TcpListener::bind(addr(1)).expect("bind");
            println!("ready");
            let _ = std::io::stdout().flush();
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut c = c;
                    let mut buf = [0u8; 64];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
            0
        }
        // Reads every connection to its end, then answers with the
        // number of bytes it read (8 bytes, big-endian).
        "serve-tcp-sink" => {
            let l = TcpListener::bind(addr(1)).expect("bind");
            println!("ready");
            let _ = std::io::stdout().flush();
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut c = c;
                    let mut buf = vec![0u8; 1 << 16];
                    let mut total = 0u64;
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        total += n as u64;
                    }
                    let _ = c.write_all(&total.to_be_bytes());
                });
            }
            0
        }
        // "bulk-tcp ADDR PORT BYTES": sends BYTES in 1 MiB writes, closes
        // its side, and succeeds if the sink counted them all within 20 s
        // (a stream whose segments are dropped crawls on retransmits).
        "bulk-tcp" => {
            let total: u64 = a[3].parse().expect("bytes");
            let ok = (|| -> std::io::Result<bool> {
                let mut c = TcpStream::connect_timeout(&addr(1), Duration::from_secs(1))?;
                c.set_write_timeout(Some(Duration::from_secs(5)))?;
                c.set_read_timeout(Some(Duration::from_secs(5)))?;
                let chunk = vec![0x5au8; 1 << 20];
                let start = Instant::now();
                let mut sent = 0u64;
                while sent < total {
                    if start.elapsed() > Duration::from_secs(20) {
                        return Ok(false);
                    }
                    let n = chunk.len().min((total - sent) as usize);
                    c.write_all(&chunk[..n])?;
                    sent += n as u64;
                }
                c.shutdown(std::net::Shutdown::Write)?;
                let mut got = [0u8; 8];
                c.read_exact(&mut got)?;
                Ok(u64::from_be_bytes(got) == total)
            })()
            .unwrap_or(false);
            i32::from(!ok)
        }
        "serve-udp" => {
            let u = UdpSocket::bind(addr(1)).expect("bind");
            println!("ready");
            let _ = std::io::stdout().flush();
            let mut buf = [0u8; 64];
            while let Ok((n, peer)) = u.recv_from(&mut buf) {
                let _ = u.send_to(&buf[..n], peer);
            }
            0
        }
        // Say "ready", wait for a byte on stdin (the test moves this
        // process into its cgroup meanwhile), then probe without pause,
        // with a new socket each time, until stdin is closed (at most 20
        // s); then print "OK FAIL FIRST": the exchanges that worked and
        // failed, and the CLOCK_MONOTONIC time (ns) of the first that
        // worked (0: none).
        "loop-tcp" | "loop-udp" => {
            println!("ready");
            let _ = std::io::stdout().flush();
            let mut go = [0u8; 1];
            let _ = std::io::stdin().read(&mut go);
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let s2 = stop.clone();
            std::thread::spawn(move || {
                let mut rest = Vec::new();
                let _ = std::io::stdin().read_to_end(&mut rest);
                s2.store(true, Ordering::Relaxed);
            });
            let start = Instant::now();
            let (mut ok, mut fail, mut first) = (0u64, 0u64, 0u128);
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(20) {
                let worked = if a[0] == "loop-tcp" {
                    tcp_echo_once(addr(1), Duration::from_millis(20))
                } else {
                    udp_echo_once(addr(1), Duration::from_millis(5))
                };
                if worked {
                    ok += 1;
                    if first == 0 {
                        first = mono_ns();
                    }
                } else {
                    fail += 1;
                }
            }
            println!("{ok} {fail} {first}");
            0
        }
        // A process that may join cgroups (root, as a runtime) plays an
        // attacker in no service next to a service's socket: "ATTACK
        // APP_CG NONE_CG ADDR PORT". It prints "legit=L attack=A": whether
        // the service's own exchange with ADDR:PORT worked (L) and whether
        // the attacker's did (A).
        // "udp-from SPORT ADDR PORT": one exchange from a fixed source port.
        "udp-from" => {
            use socket2::{Domain, SockAddr, Socket, Type};
            let to = addr(2);
            let domain = if to.is_ipv4() {
                Domain::IPV4
            } else {
                Domain::IPV6
            };
            let u = Socket::new(domain, Type::DGRAM, None).expect("socket");
            let _ = u.set_reuse_address(true);
            let from = SocketAddr::new(to.ip(), a[1].parse().expect("port"));
            u.bind(&SockAddr::from(from)).expect("bind");
            let u: UdpSocket = u.into();
            let _ = u.set_read_timeout(Some(Duration::from_millis(400)));
            let mut buf = [0u8; 8];
            let ok = u.send_to(b"ping", to).is_ok() && matches!(u.recv_from(&mut buf), Ok((4, _)));
            i32::from(!ok)
        }
        // One TCP connection kept open: "ready" once it exchanged, then
        // for each byte on stdin one more exchange on it, answered "ok" or
        // "fail" on a line.
        "hold-tcp" => {
            let mut c =
                TcpStream::connect_timeout(&addr(1), Duration::from_millis(400)).expect("connect");
            let _ = c.set_read_timeout(Some(Duration::from_millis(400)));
            let exchange = |c: &mut TcpStream| {
                let mut buf = [0u8; 4];
                c.write_all(b"ping").is_ok() && c.read_exact(&mut buf).is_ok() && &buf == b"ping"
            };
            assert!(exchange(&mut c), "first exchange");
            println!("ready");
            let _ = std::io::stdout().flush();
            let mut go = [0u8; 1];
            while std::io::stdin().read(&mut go).is_ok_and(|n| n == 1) {
                println!("{}", if exchange(&mut c) { "ok" } else { "fail" });
                let _ = std::io::stdout().flush();
            }
            0
        }
        // "recv-prio ADDR PORT": a UDP socket asking for each datagram's
        // priority (SO_RCVPRIORITY); "ready", then for each datagram (at
        // most 3 s apart) a line "prio=N" (N: the SCM_PRIORITY it got, or
        // "none").
        "recv-prio" => {
            use std::os::fd::AsRawFd as _;
            const SO_RCVPRIORITY: libc::c_int = 82;
            let u = UdpSocket::bind(addr(1)).expect("bind");
            let fd = u.as_raw_fd();
            let one: libc::c_int = 1;
            // SAFETY: a valid socket and option value.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    SO_RCVPRIORITY,
                    (&raw const one).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "SO_RCVPRIORITY");
            let _ = u.set_read_timeout(Some(Duration::from_secs(3)));
            println!("ready");
            let _ = std::io::stdout().flush();
            loop {
                let mut buf = [0u8; 64];
                let mut ctl = [0u64; 16];
                let mut iov = libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                };
                // SAFETY: zero is a valid msghdr; its pointers are set below.
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = &raw mut iov;
                msg.msg_iovlen = 1;
                msg.msg_control = ctl.as_mut_ptr().cast();
                msg.msg_controllen = std::mem::size_of_val(&ctl);
                // SAFETY: a valid socket and a msghdr pointing at live buffers.
                if unsafe { libc::recvmsg(fd, &raw mut msg, 0) } < 0 {
                    break;
                }
                let mut prio = None;
                // SAFETY: walking the control buffer recvmsg filled, with
                // the kernel's CMSG macros.
                unsafe {
                    let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
                    while !c.is_null() {
                        if (*c).cmsg_level == libc::SOL_SOCKET
                            && (*c).cmsg_type == libc::SO_PRIORITY
                        {
                            prio = Some(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u32>()));
                        }
                        c = libc::CMSG_NXTHDR(&raw const msg, c);
                    }
                }
                println!(
                    "prio={}",
                    prio.map_or("none".to_string(), |p| p.to_string())
                );
                let _ = std::io::stdout().flush();
            }
            0
        }
        // An optional 6th word: the stamp key and app's identity bits
        // ("K0:K1:IDENT"); the attacker sets app's exact stamp for the
        // 4-tuple it uses on its socket (SO_PRIORITY, as root may).
        "reuse-tcp" | "reuse-udp" | "share-udp" | "raw-udp" => {
            let prio = a.get(5).and_then(|p| StampSpec::parse(p));
            let (legit, attack) = impersonate(a[0], a[1], a[2], addr(3), prio);
            println!("legit={} attack={}", u8::from(legit), u8::from(attack));
            0
        }
        // "packet-replay APP_CG NONE_CG PORT": the tap attack over IPv6
        // loopback (`packet_replay`).
        "packet-replay" => {
            packet_replay(a[1], a[2], a[3].parse().expect("port"));
            0
        }
        // Writes a byte to each connection every 50 ms until it fails
        // (a thread each): a flow where the server speaks first.
        "serve-tcp-tick" => {
            let l = TcpListener::bind(addr(1)).expect("bind");
            println!("ready");
            let _ = std::io::stdout().flush();
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut c = c;
                    while c.write_all(b"t").is_ok() {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                });
            }
            0
        }
        // One TCP connection to a `serve-tcp-tick` that only reads: "ready"
        // after the first byte, then for each byte on stdin "ok" if bytes
        // kept arriving over the next 400 ms, else "fail".
        "hold-ticks" => {
            let mut c =
                TcpStream::connect_timeout(&addr(1), Duration::from_millis(400)).expect("connect");
            let mut first = [0u8; 1];
            c.read_exact(&mut first).expect("first tick");
            let got = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let g2 = got.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    g2.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
            println!("ready");
            let _ = std::io::stdout().flush();
            let mut go = [0u8; 1];
            while std::io::stdin().read(&mut go).is_ok_and(|n| n == 1) {
                let before = got.load(Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(400));
                let more = got.load(Ordering::Relaxed) > before;
                println!("{}", if more { "ok" } else { "fail" });
                let _ = std::io::stdout().flush();
            }
            0
        }
        // "squat-udp APP_CG SQUAT_CG ADDR PORT": app (a socket made in
        // APP_CG) sends a datagram to ADDR:PORT, where nobody listens; a
        // socket made in SQUAT_CG then binds ADDR:PORT and sends to app's
        // port. Prints "got=1" if app received it, else "got=0".
        "squat-udp" => {
            let to = addr(3);
            join_cgroup(a[1]);
            let app = UdpSocket::bind(SocketAddr::new(to.ip(), 0)).expect("bind");
            let _ = app.set_read_timeout(Some(Duration::from_millis(400)));
            let _ = app.send_to(b"ping", to);
            join_cgroup(a[2]);
            let squat = UdpSocket::bind(to).expect("bind the port");
            let _ = squat.send_to(b"evil", app.local_addr().expect("app's address"));
            let mut buf = [0u8; 8];
            let got = matches!(app.recv_from(&mut buf), Ok((4, _))) && &buf[..4] == b"evil";
            println!("got={}", u8::from(got));
            0
        }
        // Answers one request per connection, then closes 300 ms later,
        // after its client has closed (a thread each).
        "serve-tcp-close-late" => {
            let l = TcpListener::bind(addr(1)).expect("bind");
            println!("ready");
            let _ = std::io::stdout().flush();
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut c = c;
                    let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
                    let mut buf = [0u8; 64];
                    if let Ok(n) = c.read(&mut buf) {
                        let _ = c.write_all(&buf[..n]);
                    }
                    std::thread::sleep(Duration::from_millis(300));
                });
            }
            0
        }
        // Answers one request per connection and closes at once (a
        // thread each).
        "serve-tcp-close-first" => {
            let l = TcpListener::bind(addr(1)).expect("bind");
            println!("ready");
            let _ = std::io::stdout().flush();
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut c = c;
                    let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
                    let mut buf = [0u8; 64];
                    if let Ok(n) = c.read(&mut buf) {
                        let _ = c.write_all(&buf[..n]);
                    }
                });
            }
            0
        }
        // "close-late ADDR PORT N": N connections at once, each one
        // exchange, then closed by this side 300 ms later (after the
        // server closed); prints "ok=K", the exchanges that worked.
        "close-late" => {
            let n: usize = a[3].parse().expect("count");
            let to = addr(1);
            let threads: Vec<_> = (0..n)
                .map(|_| {
                    std::thread::spawn(move || {
                        // 5 s: with N at once the listener's backlog
                        // (128) overflows and a dropped SYN is sent again
                        // after 1 s; on a loaded machine the server's
                        // accept loop drains it late.
                        let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                        else {
                            return false;
                        };
                        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut buf = [0u8; 4];
                        let ok = s.write_all(b"ping").is_ok()
                            && s.read_exact(&mut buf).is_ok()
                            && &buf == b"ping";
                        std::thread::sleep(Duration::from_millis(300));
                        ok
                    })
                })
                .collect();
            let ok = threads
                .into_iter()
                .filter_map(|t| t.join().ok())
                .filter(|ok| *ok)
                .count();
            println!("ok={ok}");
            0
        }
        // "close-first ADDR PORT N": N connections one after another,
        // each one exchange and then closed by this side first; prints
        // "ok=K", the exchanges that worked.
        "close-first" => {
            let n: usize = a[3].parse().expect("count");
            let ok = (0..n)
                .filter(|_| tcp_echo_once(addr(1), Duration::from_secs(2)))
                .count();
            println!("ok={ok}");
            0
        }
        other => panic!("unknown op {other}"),
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

/// Moves this process into the cgroup directory `cg`: sockets made from
/// now on belong to it.
fn join_cgroup(cg: &str) {
    std::fs::write(format!("{cg}/cgroup.procs"), "0").expect("joining a cgroup");
}

/// The attacks on a service's identity over loopback (`to`: db's address
/// and port, which only `app` may reach). Every socket of the service is
/// made in `app_cg`, every socket of the attacker in `none_cg` (a cgroup
/// in no service); the attacker's packets follow the service's within
/// microseconds, well inside any freshness window.
///
/// * `reuse-tcp`: app connects from an ephemeral port, exchanges, closes
///   with a reset (no TIME_WAIT); the attacker binds that port at once and
///   connects to `to`: the just-closed 4-tuple.
/// * `reuse-udp`: the same with UDP (app's socket closed, its port reused).
/// * `share-udp`: app's UDP socket stays open with SO_REUSEADDR; the
///   attacker binds the same address and port (SO_REUSEADDR) and sends.
/// * `raw-udp`: app's UDP socket stays open; the attacker writes a UDP
///   datagram with app's source port through a raw socket (CAP_NET_RAW);
///   db's echo, if db took it for app's, reaches app's socket.
///
/// `prio`: the attacker's socket also claims this priority (app's stamp).
fn impersonate(
    op: &str,
    app_cg: &str,
    none_cg: &str,
    to: SocketAddr,
    prio: Option<StampSpec>,
) -> (bool, bool) {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let t = Duration::from_millis(400);
    let domain = if to.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let local = SocketAddr::new(to.ip(), 0);
    let with_port = |p: u16| SocketAddr::new(to.ip(), p);
    let recv_is = |s: &Socket, want: &[u8]| -> bool {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
        let _ = s.set_read_timeout(Some(t));
        match s.recv(&mut buf) {
            // SAFETY: recv initialised the first n bytes.
            Ok(n) => buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .eq(want.iter().copied()),
            Err(_) => false,
        }
    };
    let tcp_exchange = |s: &Socket, msg: &[u8]| -> bool {
        if s.connect_timeout(&SockAddr::from(to), t).is_err() || s.send(msg).is_err() {
            return false;
        }
        recv_is(s, msg)
    };
    join_cgroup(app_cg);
    let kind = if op == "reuse-tcp" {
        Type::STREAM
    } else {
        Type::DGRAM
    };
    let app = Socket::new(domain, kind, None).expect("socket");
    app.set_reuse_address(op == "share-udp")
        .expect("SO_REUSEADDR");
    app.bind(&SockAddr::from(local)).expect("bind");
    let port = app
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map_or(0, |a| a.port());
    join_cgroup(none_cg);
    let attacker = if op == "raw-udp" {
        let r = Socket::new(domain, Type::RAW, Some(Protocol::UDP)).expect("raw socket");
        if to.is_ipv6() {
            // The kernel fills the UDP checksum at offset 6 (mandatory in IPv6).
            let off: libc::c_int = 6;
            // SAFETY: a valid socket and option value.
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&r),
                    libc::IPPROTO_IPV6,
                    libc::IPV6_CHECKSUM,
                    (&raw const off).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        r
    } else {
        let s = Socket::new(domain, kind, None).expect("socket");
        s.set_reuse_address(true).expect("SO_REUSEADDR");
        s
    };
    if let Some(p) = prio {
        let proto = if op == "reuse-tcp" { 6 } else { 17 };
        attacker
            .set_priority(p.stamp(proto, to.ip(), port, to.ip(), to.port()))
            .expect("SO_PRIORITY");
    }
    match op {
        "reuse-tcp" => {
            let legit = tcp_exchange(&app, b"ping");
            // A reset: the 4-tuple is free at once.
            let _ = app.set_linger(Some(Duration::ZERO));
            drop(app);
            let attack = attacker.bind(&SockAddr::from(with_port(port))).is_ok()
                && tcp_exchange(&attacker, b"evil");
            (legit, attack)
        }
        "reuse-udp" => {
            let legit = app.send_to(b"ping", &SockAddr::from(to)).is_ok() && recv_is(&app, b"ping");
            drop(app);
            let attack = attacker.bind(&SockAddr::from(with_port(port))).is_ok()
                && attacker.send_to(b"evil", &SockAddr::from(to)).is_ok()
                && recv_is(&attacker, b"evil");
            (legit, attack)
        }
        "share-udp" => {
            let legit = app.send_to(b"ping", &SockAddr::from(to)).is_ok() && recv_is(&app, b"ping");
            // Connected: db's echo prefers the attacker's socket.
            let attack = attacker.bind(&SockAddr::from(with_port(port))).is_ok()
                && attacker.connect(&SockAddr::from(to)).is_ok()
                && attacker.send(b"evil").is_ok()
                && recv_is(&attacker, b"evil");
            (legit, attack)
        }
        _ => {
            let legit = app.send_to(b"ping", &SockAddr::from(to)).is_ok() && recv_is(&app, b"ping");
            let mut dgram = Vec::with_capacity(12);
            dgram.extend_from_slice(&port.to_be_bytes());
            dgram.extend_from_slice(&to.port().to_be_bytes());
            dgram.extend_from_slice(&12u16.to_be_bytes());
            dgram.extend_from_slice(&[0, 0]);
            dgram.extend_from_slice(b"evil");
            let sent = attacker
                .send_to(&dgram, &SockAddr::from(SocketAddr::new(to.ip(), 0)))
                .is_ok();
            (legit, sent && recv_is(&app, b"evil"))
        }
    }
}

/// An `AF_PACKET` socket on `lo` (ifindex 1): every IPv6 frame, with its
/// priority (`SO_RCVPRIORITY`).
struct Tap(std::os::fd::OwnedFd);

impl Tap {
    fn open() -> Self {
        use std::os::fd::FromRawFd as _;
        let proto = (libc::ETH_P_IPV6 as u16).to_be();
        // SAFETY: a plain socket call.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is a socket this function just made and owns.
        let tap = Tap(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        // SAFETY: zero is a valid sockaddr_ll; the fields are set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = 1;
        // SAFETY: a valid socket and address of the given length.
        let rc = unsafe {
            libc::bind(
                fd,
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "bind to lo: {}", std::io::Error::last_os_error());
        let one: libc::c_int = 1;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: a valid socket and option values of the given lengths.
        unsafe {
            assert_eq!(
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    82, // SO_RCVPRIORITY
                    (&raw const one).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                ),
                0,
                "SO_RCVPRIORITY"
            );
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        tap
    }

    /// The next frame and its priority (0: none given); None: timeout.
    fn recv(&self) -> Option<(Vec<u8>, u32)> {
        use std::os::fd::AsRawFd as _;
        let mut buf = vec![0u8; 2048];
        let mut ctl = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: zero is a valid msghdr; its pointers are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctl.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&ctl);
        // SAFETY: a valid socket and a msghdr pointing at live buffers.
        let n = unsafe { libc::recvmsg(self.0.as_raw_fd(), &raw mut msg, 0) };
        if n < 0 {
            return None;
        }
        buf.truncate(n as usize);
        let mut prio = 0;
        // SAFETY: walking the control buffer recvmsg filled, with the
        // kernel's CMSG macros.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SO_PRIORITY {
                    prio = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u32>());
                }
                c = libc::CMSG_NXTHDR(&raw const msg, c);
            }
        }
        Some((buf, prio))
    }

    /// Writes `frame` onto `lo` with priority `prio` (SO_PRIORITY of the
    /// packet socket: the egress program never sees it).
    fn send(&self, frame: &[u8], prio: u32) -> bool {
        use std::os::fd::AsRawFd as _;
        let fd = self.0.as_raw_fd();
        // SAFETY: a valid socket and option value.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PRIORITY,
                (&raw const prio).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        // SAFETY: zero is a valid sockaddr_ll; the fields are set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_IPV6 as u16).to_be();
        sll.sll_ifindex = 1;
        sll.sll_halen = 6;
        // SAFETY: a valid socket, a live buffer and an address of the given length.
        let n = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        rc == 0 && n == frame.len() as isize
    }
}

/// `frame` (Ethernet, IPv6, UDP) with source port `sport` and payload
/// `payload`, lengths and the UDP checksum made anew.
fn udp6_frame(frame: &[u8], sport: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = frame[..14 + 40 + 8].to_vec();
    f.extend_from_slice(payload);
    let udp_len = (8 + payload.len()) as u16;
    f[14 + 4..14 + 6].copy_from_slice(&udp_len.to_be_bytes());
    f[54..56].copy_from_slice(&sport.to_be_bytes());
    f[58..60].copy_from_slice(&udp_len.to_be_bytes());
    f[60..62].copy_from_slice(&[0, 0]);
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&f[14 + 8..14 + 40]);
    add(&u32::from(udp_len).to_be_bytes());
    add(&[0, 0, 0, 17]);
    add(&f[54..]);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let mut c = !(sum as u16);
    if c == 0 {
        c = 0xffff;
    }
    f[60..62].copy_from_slice(&c.to_be_bytes());
    f
}

/// The tap attack over IPv6 loopback, by a process with CAP_NET_RAW in
/// no service (`none_cg`): app (a UDP socket in `app_cg`) sends a datagram
/// to db at [::1]:`port`; an `AF_PACKET` socket on `lo` captures that
/// frame with its priority (app's stamp). Then (1) the same frame from
/// the attacker's own UDP port, with the captured priority: db's echo
/// reaching the attacker means db took it for app's; (2) the captured
/// frame on its own 4-tuple (the echo reaches app's socket: the residue
/// any network has, a tuple one can see). Prints "legit=L stamp=S
/// other_port=A same_tuple=T", then "ready"; after a byte on stdin
/// (the test reloads meanwhile) sends the captured frame again on its
/// own tuple and prints "after=T".
fn packet_replay(app_cg: &str, none_cg: &str, port: u16) {
    let to: SocketAddr = SocketAddr::new("::1".parse().expect("::1"), port);
    let t = Duration::from_millis(400);
    join_cgroup(app_cg);
    let app = UdpSocket::bind("[::1]:0").expect("bind app");
    let _ = app.set_read_timeout(Some(t));
    let app_port = app.local_addr().expect("app port").port();
    join_cgroup(none_cg);
    let tap = Tap::open();
    let attacker = UdpSocket::bind("[::1]:0").expect("bind attacker");
    let _ = attacker.set_read_timeout(Some(t));
    let att_port = attacker.local_addr().expect("attacker port").port();
    let echo = |s: &UdpSocket, want: &[u8]| {
        let mut buf = [0u8; 64];
        matches!(s.recv(&mut buf), Ok(n) if &buf[..n] == want)
    };
    let legit = app.send_to(b"ping", to).is_ok() && echo(&app, b"ping");
    // app's frame to db, as the tap saw it.
    let start = Instant::now();
    let mut captured = None;
    while captured.is_none() && start.elapsed() < Duration::from_secs(2) {
        let Some((f, prio)) = tap.recv() else {
            continue;
        };
        if f.len() >= 62
            && f[12..14] == [0x86, 0xdd]
            && f[14 + 6] == 17
            && f[54..56] == app_port.to_be_bytes()
            && f[56..58] == port.to_be_bytes()
            && prio != 0
        {
            captured = Some((f, prio));
        }
    }
    let Some((frame, prio)) = captured else {
        println!("legit={} stamp=none", u8::from(legit));
        return;
    };
    // Drain what the tap holds (db's echo and the like).
    while tap.recv().is_some() {}
    let other_port =
        tap.send(&udp6_frame(&frame, att_port, b"evil"), prio) && echo(&attacker, b"evil");
    let same = tap.send(&udp6_frame(&frame, app_port, b"ping"), prio) && echo(&app, b"ping");
    println!(
        "legit={} stamp={prio:#x} other_port={} same_tuple={}",
        u8::from(legit),
        u8::from(other_port),
        u8::from(same)
    );
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut go = [0u8; 1];
    let _ = std::io::stdin().read(&mut go);
    let after = tap.send(&udp6_frame(&frame, app_port, b"ping"), prio) && echo(&app, b"ping");
    println!("after={}", u8::from(after));
    let _ = std::io::stdout().flush();
}

/// A slot's stamp key and a service's identity bits: the stamp of any
/// packet (`segbpf_common::svc_stamp_check`).
#[derive(Clone, Copy)]
struct StampSpec {
    key: [u64; 2],
    ident: u32,
}

impl StampSpec {
    fn parse(s: &str) -> Option<Self> {
        let mut w = s.split(':');
        let k0 = w.next()?.parse().ok()?;
        let k1 = w.next()?.parse().ok()?;
        let ident = w.next()?.parse().ok()?;
        Some(StampSpec {
            key: [k0, k1],
            ident,
        })
    }

    fn arg(&self) -> String {
        format!("{}:{}:{}", self.key[0], self.key[1], self.ident)
    }

    /// The stamp the egress program writes on this packet.
    fn stamp(&self, proto: u8, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> u32 {
        let bytes = |a: IpAddr| match a {
            IpAddr::V4(v) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&v.octets());
                b
            }
            IpAddr::V6(v) => v.octets(),
        };
        let family = if src.is_ipv4() { 4 } else { 6 };
        segbpf_common::svc_stamp_check(
            &self.key,
            family,
            proto,
            segbpf_common::svc_stamp_addr(&bytes(src)),
            segbpf_common::svc_stamp_addr(&bytes(dst)),
            sport,
            dport,
            self.ident,
        ) | self.ident
    }
}

/// CLOCK_MONOTONIC in ns (comparable between processes).
fn mono_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

fn tcp_echo_once(to: SocketAddr, timeout: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&to, timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    if s.write_all(b"ping").is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && &buf == b"ping"
}

fn udp_echo_once(to: SocketAddr, timeout: Duration) -> bool {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().unwrap_or(to)
    } else {
        "[::]:0".parse().unwrap_or(to)
    };
    let Ok(u) = UdpSocket::bind(bind) else {
        return false;
    };
    let _ = u.set_read_timeout(Some(timeout));
    if u.send_to(b"ping", to).is_err() {
        return false;
    }
    let mut buf = [0u8; 8];
    matches!(u.recv_from(&mut buf), Ok((4, _)))
}

/// A helper child, in `cgroup` (a directory) and the network namespace
/// `netns`, running `op`. Killed (by its PID) and reaped when dropped.
struct Helper {
    child: Option<Child>,
}

impl Helper {
    fn spawn(cgroup: &Path, netns: &str, op: &str) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let procs = std::ffi::CString::new(
            cgroup
                .join("cgroup.procs")
                .to_str()
                .context("cgroup path")?,
        )?;
        let ns = std::fs::File::open(format!("/run/netns/{netns}"))
            .with_context(|| format!("opening netns {netns}"))?;
        let mut cmd = Command::new(exe);
        cmd.args([
            "helper_process",
            "--exact",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(OP_ENV, op)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        let ns_fd = std::os::fd::AsRawFd::as_raw_fd(&ns);
        // SAFETY: only async-signal-safe calls (open, write, close, setns)
        // between fork and exec; the buffers were made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                libc::close(fd);
                if !ok {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("spawning a helper")?;
        drop(ns);
        Ok(Helper { child: Some(child) })
    }

    /// A server: waits until it says it is listening.
    fn server(cgroup: &Path, netns: &str, op: &str) -> anyhow::Result<Self> {
        let mut h = Self::spawn(cgroup, netns, op)?;
        let out = h
            .child
            .as_mut()
            .and_then(|c| c.stdout.as_mut())
            .context("helper stdout")?;
        // libtest prints its own words first ("test helper_process ... "
        // before the helper's "ready").
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            out.read_exact(&mut byte)
                .with_context(|| format!("`{op}` did not start"))?;
            if byte[0] == b'\n' {
                if line.ends_with(b"ready") {
                    break;
                }
                line.clear();
            } else {
                line.push(byte[0]);
            }
        }
        Ok(h)
    }

    /// Runs `op` to its end: its exit status and stdout.
    fn run(cgroup: &Path, netns: &str, op: &str) -> anyhow::Result<(bool, String)> {
        let mut h = Self::spawn(cgroup, netns, op)?;
        let child = h.child.take().context("child")?;
        let out = child.wait_with_output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// The lab: a cgroup parent, a network namespace, private pin/state roots.
// ---------------------------------------------------------------------------

struct SvcLab {
    root: PathBuf,
    ns: Netns,
    bpffs: PathBuf,
    state: PathBuf,
    attach: Option<Child>,
}

impl SvcLab {
    /// Cgroups `children` below a fresh parent, a netns with loopback and
    /// an interface holding 198.18.<net>.1/24 and fd00:<net>::1/64.
    fn new(tag: &str, children: &[&str], net: u8) -> anyhow::Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{tag}{}x{n}", std::process::id());
        let root = cgroup2_mount()?.join(format!("segbpf-test-{id}"));
        std::fs::create_dir(&root).with_context(|| format!("mkdir {}", root.display()))?;
        let lab = SvcLab {
            ns: Netns::create(&format!("svc-{id}"))?,
            bpffs: PathBuf::from(format!("/sys/fs/bpf/segbpf-svc-{id}")),
            state: std::env::temp_dir().join(format!("segbpf-svc-{id}")),
            root,
            attach: None,
        };
        for c in children {
            std::fs::create_dir_all(lab.root.join(c))?;
        }
        // (No dummy driver everywhere: a veth pair inside the namespace.)
        lab.ns
            .ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"])?;
        lab.ns.ip(&["link", "set", "d0", "up"])?;
        lab.ns.ip(&["link", "set", "d1", "up"])?;
        lab.ns
            .ip(&["addr", "add", &format!("198.18.{net}.1/24"), "dev", "d0"])?;
        lab.ns.ip(&[
            "addr",
            "add",
            &format!("fd00:{net}::1/64"),
            "dev",
            "d0",
            "nodad",
        ])?;
        std::fs::create_dir_all(&lab.state)?;
        Ok(lab)
    }

    fn cg(&self, child: &str) -> PathBuf {
        self.root.join(child)
    }

    fn segbpf(&self, args: &[&str]) -> Command {
        let mut c = Command::new(segbpf_bin());
        c.args(args)
            .env("SEGBPF_BPFFS", &self.bpffs)
            .env("SEGBPF_STATE_DIR", &self.state);
        c
    }

    /// `attach --services` in the foreground, until it enforces.
    fn attach(&mut self, policy: &str) -> anyhow::Result<()> {
        self.attach_with(policy, &[])
    }

    /// `attach --services EXTRA...` in the foreground, until it enforces;
    /// its stdout (the events) goes to `events.log` in the state dir.
    fn attach_with(&mut self, policy: &str, extra: &[&str]) -> anyhow::Result<()> {
        let path = self.state.join("roles.toml");
        std::fs::write(&path, policy)?;
        let root = self.root.to_str().context("root")?.to_string();
        let child = self
            .segbpf(&[
                "attach",
                "--services",
                "--policy",
                path.to_str().context("path")?,
                "--cgroup-root",
                &root,
            ])
            .args(extra)
            .stdout(std::fs::File::create(self.state.join("events.log"))?)
            .stderr(std::fs::File::create(self.state.join("attach.log"))?)
            .spawn()?;
        self.attach = Some(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            let out = self
                .segbpf(&["status", "--services", "--cgroup-root", &root])
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            // In force: enforcing, or in audit mode auditing.
            if text.contains("enforcing") || text.contains("auditing") {
                return Ok(());
            }
            if let Some(Ok(Some(st))) = self.attach.as_mut().map(Child::try_wait) {
                bail!("attach --services exited: {st}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("attach --services did not enforce in time")
    }

    fn connect(&self, from: &str, to: &str) -> anyhow::Result<bool> {
        Ok(Helper::run(&self.cg(from), &self.ns.name, &format!("connect {to}"))?.0)
    }

    fn udp(&self, from: &str, to: &str) -> anyhow::Result<bool> {
        Ok(Helper::run(&self.cg(from), &self.ns.name, &format!("udp {to}"))?.0)
    }
}

impl Drop for SvcLab {
    fn drop(&mut self) {
        if let Some(mut c) = self.attach.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
        let root = self.root.to_string_lossy().to_string();
        let _ = self
            .segbpf(&["detach", "--services", "--cgroup-root", &root])
            .output();
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir_all(&self.state);
        // Children first (helpers are gone: every Helper is dropped before
        // the lab that made its cgroup).
        remove_cgroups(&self.root);
    }
}

// ---------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------

/// The services app, db and other (tests/fixtures/services_app_db_other.toml,
/// which segbpf's own unit tests of `explain`'s evaluator start from too:
/// no comment in it, so the text here is byte for byte what it was) and
/// cache, with db's and app's rules.
const MATRIX: &str = concat!(
    include_str!("../fixtures/services_app_db_other.toml"),
    r#"[services.cache]
cgroup = "cache"

[[services.db.ingress]]
name = "db-from-app"
from_services = ["app"]
tcp = [3306]
udp = [3306]
[[services.app.egress]]
to = ["127.0.0.1", "::1", "198.18.91.1", "fd00:91::1"]
tcp = [3306]
udp = [3306]
"#
);

#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn traffic_matrix() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("mx", &["app", "db", "other", "cache", "none"], 91)?;
    let ns = lab.ns.name.clone();
    let addrs = ["127.0.0.1", "::1", "198.18.91.1", "fd00:91::1"];
    let mut servers = Vec::new();
    for a in addrs {
        for (cg, op) in [
            ("db", "serve-tcp"),
            ("db", "serve-udp"),
            ("cache", "serve-tcp"),
            ("none", "serve-tcp"),
        ] {
            let port = match cg {
                "cache" => 6379,
                "none" => 9000,
                _ => 3306,
            };
            servers.push(Helper::server(
                &lab.cg(cg),
                &ns,
                &format!("{op} {a} {port}"),
            )?);
        }
        servers.push(Helper::server(
            &lab.cg("db"),
            &ns,
            &format!("serve-tcp {a} 3307"),
        )?);
    }
    // Before enforcement everything connects (the lab itself works).
    assert!(
        lab.connect("other", "127.0.0.1 3306")?,
        "lab: other -> db before attach"
    );
    lab.attach(MATRIX)?;
    let mut wrong = Vec::new();
    let mut expect = |what: String, got: bool, want: bool| {
        if got != want {
            wrong.push(format!("{what}: got {got}, want {want}"));
        }
    };
    for a in addrs {
        // db accepts 3306 only from app (TCP and UDP); the echo is the reply.
        expect(
            format!("app -> db tcp {a}:3306"),
            lab.connect("app", &format!("{a} 3306"))?,
            true,
        );
        expect(
            format!("app -> db udp {a}:3306"),
            lab.udp("app", &format!("{a} 3306"))?,
            true,
        );
        expect(
            format!("other -> db tcp {a}:3306"),
            lab.connect("other", &format!("{a} 3306"))?,
            false,
        );
        expect(
            format!("other -> db udp {a}:3306"),
            lab.udp("other", &format!("{a} 3306"))?,
            false,
        );
        expect(
            format!("none -> db tcp {a}:3306"),
            lab.connect("none", &format!("{a} 3306"))?,
            false,
        );
        expect(
            format!("cache -> db tcp {a}:3306"),
            lab.connect("cache", &format!("{a} 3306"))?,
            false,
        );
        // app's egress is an allow-list: db's other port, cache, a process in none.
        expect(
            format!("app -> db tcp {a}:3307"),
            lab.connect("app", &format!("{a} 3307"))?,
            false,
        );
        expect(
            format!("app -> cache tcp {a}:6379"),
            lab.connect("app", &format!("{a} 6379"))?,
            false,
        );
        expect(
            format!("app -> none tcp {a}:9000"),
            lab.connect("app", &format!("{a} 9000"))?,
            false,
        );
        // cache has no rules: the defaults (ingress drop, egress allow; its
        // replies and the answers to what it opens pass).
        expect(
            format!("other -> cache tcp {a}:6379"),
            lab.connect("other", &format!("{a} 6379"))?,
            false,
        );
        expect(
            format!("cache -> none tcp {a}:9000"),
            lab.connect("cache", &format!("{a} 9000"))?,
            true,
        );
        // A process in no service reaches another one in none.
        expect(
            format!("none -> none tcp {a}:9000"),
            lab.connect("none", &format!("{a} 9000"))?,
            true,
        );
    }
    drop(servers);
    assert!(wrong.is_empty(), "wrong outcomes:\n{}", wrong.join("\n"));
    let root = lab.root.to_string_lossy().to_string();
    let out = lab
        .segbpf(&["status", "--services", "--cgroup-root", &root, "-o", "json"])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let db = &v["services"][0]["services"][1];
    assert_eq!(db["name"], "db");
    assert!(
        db["packets"]["ingress_dropped"].as_u64().unwrap_or(0) > 0,
        "{v}"
    );
    Ok(())
}

/// Parses a prober's output: (successes, time of the first success, probes).
fn probes(out: &str) -> (usize, Option<u128>, usize) {
    let n: Vec<u128> = out
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    match n[..] {
        [ok, fail, first] => (
            ok as usize,
            (first > 0).then_some(first),
            (ok + fail) as usize,
        ),
        _ => (0, None, 0),
    }
}

/// A prober (`loop-udp`) started in `stage`, moved into `cgroup` and
/// let go: returns it running.
fn prober_in(lab: &SvcLab, cgroup: &str, to: &str) -> anyhow::Result<Helper> {
    let mut h = Helper::server(&lab.cg("stage"), &lab.ns.name, &format!("loop-udp {to}"))?;
    let child = h.child.as_mut().context("child")?;
    std::fs::write(lab.cg(cgroup).join("cgroup.procs"), child.id().to_string())?;
    child.stdin.as_mut().context("stdin")?.write_all(b"g")?;
    Ok(h)
}

/// Waits until every thread of `pid` is stopped (a signal is delivered
/// asynchronously).
fn wait_stopped(pid: nix::unistd::Pid) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))?;
        let all = tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('T')))
                .unwrap_or(false)
        });
        if all {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    bail!("{pid} did not stop")
}

/// Stops a prober (closes its stdin) and parses its output.
fn finish(mut h: Helper) -> anyhow::Result<(usize, Option<u128>, usize)> {
    let mut c = h.child.take().context("child")?;
    drop(c.stdin.take());
    Ok(probes(&String::from_utf8_lossy(
        &c.wait_with_output()?.stdout,
    )))
}

#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn restart_opens_no_gap() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("rs", &["app", "db", "other", "none", "stage"], 92)?;
    let ns = lab.ns.name.clone();
    let _db = Helper::server(&lab.cg("db"), &ns, "serve-udp 127.0.0.1 3306")?;
    let _free = Helper::server(&lab.cg("none"), &ns, "serve-udp 127.0.0.1 9000")?;
    lab.attach(MATRIX)?;
    let follower =
        nix::unistd::Pid::from_raw(i32::try_from(lab.attach.as_ref().context("attach")?.id())?);
    let mut delays = Vec::new();
    for round in 0..6 {
        // Rounds 0-2: the follower is stopped while the cgroups are made
        // again, so their sockets wait 300 ms unclassified; rounds 3-5
        // measure how fast it covers a new cgroup.
        let stopped = round < 3;
        // app restarts: its new cgroup must never act as "no service"
        // (which could send anywhere): every probe to a port outside its
        // allow-list fails, before and after its entry is written. other
        // restarts too: db never accepts it.
        remove_cgroups(&lab.cg("app"));
        remove_cgroups(&lab.cg("other"));
        if stopped {
            nix::sys::signal::kill(follower, nix::sys::signal::Signal::SIGSTOP)?;
            wait_stopped(follower)?;
        }
        std::fs::create_dir(lab.cg("app"))?;
        std::fs::create_dir(lab.cg("other"))?;
        let made = mono_ns();
        let forbidden = prober_in(&lab, "app", "127.0.0.1 9000");
        let allowed = prober_in(&lab, "app", "127.0.0.1 3306");
        let other = prober_in(&lab, "other", "127.0.0.1 3306");
        let resumed = if stopped {
            std::thread::sleep(Duration::from_millis(300));
            // Taken just before the SIGCONT: this thread may be preempted
            // after it while the resumed follower covers app at once.
            let t = mono_ns();
            nix::sys::signal::kill(follower, nix::sys::signal::Signal::SIGCONT)?;
            t
        } else {
            mono_ns()
        };
        std::thread::sleep(Duration::from_millis(400));
        let (bad, _, tries) = finish(forbidden?)?;
        let (_, first, _) = finish(allowed?)?;
        let (bad_other, _, _) = finish(other?)?;
        assert_eq!(
            bad, 0,
            "round {round}: app's re-created cgroup sent outside its allow-list"
        );
        assert_eq!(bad_other, 0, "round {round}: re-created other reached db");
        assert!(tries > 10, "round {round}: the prober ran {tries} times");
        let first = first.with_context(|| {
            format!(
                "round {round}: app never reached db after its restart; attach's log:\n{}",
                std::fs::read_to_string(lab.state.join("attach.log")).unwrap_or_default()
            )
        })?;
        if stopped {
            assert!(
                first > resumed,
                "round {round}: app was covered while its classifier was stopped"
            );
        } else {
            delays.push(Duration::from_nanos(u64::try_from(
                first.saturating_sub(made),
            )?));
        }
    }
    delays.sort();
    eprintln!(
        "services: a re-created cgroup was covered {:?} after its mkdir (median of 3; min {:?}, max {:?}); until then its sockets were held",
        delays[1], delays[0], delays[2]
    );
    Ok(())
}

#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn container_to_host() -> anyhow::Result<()> {
    let policy = r#"version = 1
[services.db]
cgroup = "db"
[services.ctr]
cgroup = "machine/ctr1"
defaults = { egress = "drop" }
[[services.db.ingress]]
from = ["198.18.93.2", "fd00:93::2"]
tcp = [3306]
[[services.ctr.egress]]
to = ["198.18.93.1", "fd00:93::1"]
tcp = [3306]
"#;
    let mut lab = SvcLab::new("ct", &["db", "machine/ctr1", "machine/other"], 94)?;
    let host = lab.ns.name.clone();
    // The container: its own netns, joined to the host's by a veth.
    let ctr = Netns::create(&format!("{host}-c"))?;
    lab.ns.ip(&[
        "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", &ctr.name,
    ])?;
    lab.ns.ip(&["addr", "add", "198.18.93.1/24", "dev", "v0"])?;
    lab.ns
        .ip(&["addr", "add", "fd00:93::1/64", "dev", "v0", "nodad"])?;
    lab.ns.ip(&["link", "set", "v0", "up"])?;
    ctr.ip(&["addr", "add", "198.18.93.2/24", "dev", "v1"])?;
    ctr.ip(&["addr", "add", "fd00:93::2/64", "dev", "v1", "nodad"])?;
    ctr.ip(&["link", "set", "v1", "up"])?;
    let mut servers = Vec::new();
    for a in ["198.18.93.1", "fd00:93::1"] {
        servers.push(Helper::server(
            &lab.cg("db"),
            &host,
            &format!("serve-tcp {a} 3306"),
        )?);
        servers.push(Helper::server(
            &lab.cg("db"),
            &host,
            &format!("serve-tcp {a} 3307"),
        )?);
    }
    lab.attach(policy)?;
    let c = |cg: &str, to: &str| -> anyhow::Result<bool> {
        Ok(Helper::run(&lab.cg(cg), &ctr.name, &format!("connect {to}"))?.0)
    };
    for a in ["198.18.93.1", "fd00:93::1"] {
        assert!(
            c("machine/ctr1", &format!("{a} 3306"))?,
            "container -> host db {a}:3306"
        );
        // The container's egress is an allow-list; the host's db ingress
        // refuses other ports.
        assert!(
            !c("machine/ctr1", &format!("{a} 3307"))?,
            "container -> {a}:3307"
        );
        assert!(
            !c("machine/other", &format!("{a} 3307"))?,
            "other container -> {a}:3307"
        );
    }
    drop(servers);
    drop(ctr);
    Ok(())
}

#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn reload_replaces_or_keeps_the_policy() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("rl", &["app", "db", "other"], 95)?;
    let ns = lab.ns.name.clone();
    let _db = Helper::server(&lab.cg("db"), &ns, "serve-tcp 127.0.0.1 3306")?;
    lab.attach(MATRIX)?;
    let root = lab.root.to_string_lossy().to_string();
    let policy = lab.state.join("roles.toml");
    let generation = |lab: &SvcLab| -> anyhow::Result<u64> {
        let out = lab
            .segbpf(&["status", "--services", "--cgroup-root", &root, "-o", "json"])
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        v["services"][0]["generation"]
            .as_u64()
            .context("generation")
    };
    assert!(
        !lab.connect("other", "127.0.0.1 3306")?,
        "other -> db before the reload"
    );
    // `reload --services`: other may now reach db.
    std::fs::write(
        &policy,
        MATRIX.replace(
            r#"from_services = ["app"]"#,
            r#"from_services = ["app", "other"]"#,
        ),
    )?;
    lab.reload(None)?;
    assert_eq!(generation(&lab)?, 2);
    assert!(
        lab.connect("other", "127.0.0.1 3306")?,
        "other -> db after the reload"
    );
    assert!(
        lab.connect("app", "127.0.0.1 3306")?,
        "app -> db after the reload"
    );
    // A policy with an error: refused, exit 1, the previous one stays.
    std::fs::write(
        &policy,
        MATRIX.replace(r#"from_services = ["app"]"#, r#"from_services = ["ap"]"#),
    )?;
    let out = lab
        .segbpf(&["reload", "--services", "--cgroup-root", &root])
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown service `ap`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(generation(&lab)?, 2);
    assert!(
        lab.connect("other", "127.0.0.1 3306")?,
        "the policy in force stays"
    );
    // SIGHUP to the foreground attach: the file again (back to app only).
    std::fs::write(&policy, MATRIX)?;
    let pid =
        nix::unistd::Pid::from_raw(i32::try_from(lab.attach.as_ref().context("attach")?.id())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP)?;
    let start = Instant::now();
    while generation(&lab)? != 3 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(generation(&lab)?, 3);
    assert!(
        !lab.connect("other", "127.0.0.1 3306")?,
        "other -> db after SIGHUP"
    );
    assert!(
        lab.connect("app", "127.0.0.1 3306")?,
        "app -> db after SIGHUP"
    );
    Ok(())
}

/// A process in no service cannot pass for `app` at db's ingress over
/// loopback, whatever 4-tuple it uses: not the one app just closed (TCP,
/// UDP), not app's live port shared with SO_REUSEADDR, not app's port
/// written through a raw socket; both families. The sender's identity is
/// the stamp its own socket's egress put on the packet.
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn no_service_cannot_pass_for_a_service() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("im", &["app", "db", "other", "cache", "none"], 98)?;
    let ns = lab.ns.name.clone();
    let mut servers = Vec::new();
    for a in ["127.0.0.1", "::1"] {
        servers.push(Helper::server(
            &lab.cg("db"),
            &ns,
            &format!("serve-tcp {a} 3306"),
        )?);
        servers.push(Helper::server(
            &lab.cg("db"),
            &ns,
            &format!("serve-udp {a} 3306"),
        )?);
    }
    lab.attach(MATRIX)?;
    let (app, none) = (lab.cg("app"), lab.cg("none"));
    let (app, none) = (
        app.to_str().context("cgroup")?,
        none.to_str().context("cgroup")?,
    );
    let mut wrong = Vec::new();
    for a in ["127.0.0.1", "::1"] {
        for op in ["reuse-tcp", "reuse-udp", "share-udp", "raw-udp"] {
            let (ok, out) =
                Helper::run(&lab.cg("none"), &ns, &format!("{op} {app} {none} {a} 3306"))?;
            let legit = out.contains("legit=1");
            let attack = out.contains("attack=1");
            if !ok || !legit || attack {
                wrong.push(format!(
                    "{op} {a}: app's own exchange {}, the attacker's {}",
                    if legit { "worked" } else { "FAILED" },
                    if attack { "PASSED" } else { "was refused" }
                ));
            }
        }
    }
    // Knowing app's exact stamp (read from the loaded programs, as root
    // may) and claiming it with SO_PRIORITY (root: CAP_NET_ADMIN) gains
    // nothing: the egress program overwrites the priority of every packet
    // towards loopback.
    let stamp = app_stamp(&lab)?.arg();
    for a in ["127.0.0.1", "::1"] {
        for op in ["reuse-tcp", "share-udp", "raw-udp"] {
            let (ok, out) = Helper::run(
                &lab.cg("none"),
                &ns,
                &format!("{op} {app} {none} {a} 3306 {stamp}"),
            )?;
            if !ok || !out.contains("legit=1") || out.contains("attack=1") {
                wrong.push(format!("{op} {a} with app's stamp ({stamp}): {out}"));
            }
        }
    }
    // The stamp is written after netfilter's POSTROUTING: a rule there
    // that sets every packet's priority changes nothing for app -> db.
    nft(&ns, "add table inet segbpf_prio")?;
    nft(
        &ns,
        "add chain inet segbpf_prio post { type filter hook postrouting priority 0 ; }",
    )?;
    nft(&ns, "add rule inet segbpf_prio post meta priority set 1:2")?;
    for a in ["127.0.0.1", "::1"] {
        if !lab.connect("app", &format!("{a} 3306"))? || !lab.udp("app", &format!("{a} 3306"))? {
            wrong.push(format!(
                "app -> db {a} with nft setting the priority in POSTROUTING"
            ));
        }
    }
    drop(servers);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    Ok(())
}

/// `nft CMD` inside the network namespace `ns`.
fn nft(ns: &str, cmd: &str) -> anyhow::Result<()> {
    let mut args = vec!["netns", "exec", ns, "nft"];
    args.extend(cmd.split(' '));
    let out = Command::new("ip").args(&args).output()?;
    if !out.status.success() {
        bail!("nft {cmd}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// `bpftool ARGS -j` as JSON.
fn bpftool(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = Command::new("bpftool").args(args).arg("-j").output()?;
    if !out.status.success() {
        bail!("bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// What app's packets are stamped with now: the key of the slot in force
/// (its globals in the pinned `SEG_SVC_CFG`, bytes 16..32) and app's
/// identity bits (the slot and its id, from the state).
fn app_stamp(lab: &SvcLab) -> anyhow::Result<StampSpec> {
    let (slot, id) = slot_and_id(lab, "app")?;
    Ok(StampSpec {
        key: slot_key(lab, slot)?,
        ident: (slot << 7) | id,
    })
}

/// The secret key of slot `slot`'s stamps, from the pinned `SEG_SVC_CFG`.
fn slot_key(lab: &SvcLab, slot: u32) -> anyhow::Result<[u64; 2]> {
    let dir = std::fs::read_dir(&lab.bpffs)?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("services:"))
        .context("no services pin directory")?
        .path();
    let key = (slot * 128).to_le_bytes().map(|b| b.to_string());
    let mut args = vec!["map", "lookup", "pinned"];
    let pin = dir.join("SEG_SVC_CFG");
    args.push(pin.to_str().context("path")?);
    args.push("key");
    args.extend(key.iter().map(String::as_str));
    let v = bpftool(&args)?;
    let bytes: Vec<u8> = v["value"]
        .as_array()
        .context("value")?
        .iter()
        .filter_map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
        .collect();
    let Some(w) = bytes.get(16..32) else {
        bail!("SEG_SVC_CFG holds no stamp key: {v}");
    };
    let word = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&w[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let k = [word(0), word(8)];
    if k == [0, 0] {
        bail!("no stamp key in slot {slot}");
    }
    Ok(k)
}

/// The slot in force and the id of service `name` in it, from the state.
fn slot_and_id(lab: &SvcLab, name: &str) -> anyhow::Result<(u32, u32)> {
    let state_file = std::fs::read_dir(&lab.state)?
        .flatten()
        .find(|e| {
            let p = e.path();
            let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned());
            p.extension().is_some_and(|x| x == "json")
                && stem.is_some_and(|s| s.starts_with("services:") && !s.contains('.'))
        })
        .context("no services state")?
        .path();
    let st: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(state_file)?)?;
    let slot = st["slot"].as_u64().context("slot")? as u32;
    let id = st["services"]
        .as_array()
        .context("services")?
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["id"].as_u64())
        .with_context(|| format!("{name}'s id"))? as u32;
    Ok((slot, id))
}

/// A connection app opened to db over loopback lives on through a reload
/// that still allows it (its first packet under the new slot carries a
/// new stamp and is judged again by the rules), and is cut by a reload
/// that no longer does: the identity is the packet's stamp, never a
/// leftover entry.
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn loopback_flows_across_a_reload() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("fl", &["app", "db", "other"], 100)?;
    let ns = lab.ns.name.clone();
    let _db = Helper::server(&lab.cg("db"), &ns, "serve-tcp-stream 127.0.0.1 3306")?;
    lab.attach(MATRIX)?;
    let mut held = Helper::server(&lab.cg("app"), &ns, "hold-tcp 127.0.0.1 3306")?;
    assert!(hold_again(&mut held)?, "the connection before any reload");
    let reload = |lab: &SvcLab, policy: &str| lab.reload(Some(policy));
    // The same policy again (the other slot, the services renumbered the
    // same way): the connection goes on.
    reload(&lab, MATRIX)?;
    assert!(
        hold_again(&mut held)?,
        "the connection after a reload that allows it"
    );
    // The services in another order (app gets another id): still allowed.
    let renumbered = MATRIX
        .replace(
            "[services.app]\ncgroup = \"app\"\ndefaults = { egress = \"drop\" }\n",
            "",
        )
        .replace(
            "[services.cache]\ncgroup = \"cache\"\n",
            "[services.cache]\ncgroup = \"cache\"\n[services.app]\ncgroup = \"app\"\ndefaults = { egress = \"drop\" }\n",
        );
    assert!(
        !renumbered.starts_with("version = 1\n[services.app]")
            && renumbered.contains("[services.app]"),
        "{renumbered}"
    );
    let before = slot_and_id(&lab, "app")?.1;
    reload(&lab, &renumbered)?;
    assert_ne!(
        slot_and_id(&lab, "app")?.1,
        before,
        "app was not renumbered"
    );
    assert!(
        hold_again(&mut held)?,
        "the connection after app was renumbered"
    );
    // db no longer accepts app: the live connection is cut too.
    reload(
        &lab,
        &MATRIX.replace(r#"from_services = ["app"]"#, r#"from_services = ["other"]"#),
    )?;
    assert!(
        !hold_again(&mut held)?,
        "the connection after a reload that refuses it"
    );
    Ok(())
}

/// A flow db received from app stays app's: after reloads that give
/// another service app's old id in the same slot, that service reusing the
/// flow's 4-tuple is judged by db's rules (refused), not taken for app.
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn renumbered_service_cannot_reuse_a_flow() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("rn", &["app", "db", "other"], 101)?;
    let ns = lab.ns.name.clone();
    let _db = Helper::server(&lab.cg("db"), &ns, "serve-udp 127.0.0.1 3306")?;
    lab.attach(MATRIX)?;
    let from = |lab: &SvcLab, cg: &str, port: u16| -> anyhow::Result<bool> {
        Ok(Helper::run(&lab.cg(cg), &ns, &format!("udp-from {port} 127.0.0.1 3306"))?.0)
    };
    assert!(from(&lab, "app", 40123)?, "app -> db");
    assert!(!from(&lab, "other", 40124)?, "other -> db");
    let (slot, app_id) = slot_and_id(&lab, "app")?;
    let reload = |lab: &SvcLab, policy: &str| lab.reload(Some(policy));
    reload(&lab, MATRIX)?;
    // `other` first: it gets app's old id, in app's old slot.
    reload(
        &lab,
        &MATRIX
            .replace(
                "[services.app]\n",
                "[services.other]\ncgroup = \"other\"\n[services.app]\n",
            )
            .replace(
                "[services.other]\ncgroup = \"other\"\n[services.cache]",
                "[services.cache]",
            ),
    )?;
    assert_eq!(
        slot_and_id(&lab, "other")?,
        (slot, app_id),
        "other has app's old id and slot"
    );
    assert!(
        !from(&lab, "other", 40123)?,
        "other reusing app's flow to db"
    );
    assert!(from(&lab, "app", 40123)?, "app -> db after the reloads");
    Ok(())
}

/// Two policies with the same services numbered differently: `db`'s id
/// under one is `zz`'s (a service whose cgroup does not exist, ingress
/// allowed) under the other.
const RACE_A: &str = r#"version = 1
[defaults]
ingress = "allow"
egress = "allow"
[services.app]
cgroup = "app"
[services.db]
cgroup = "db"
defaults = { ingress = "drop" }
[services.other]
cgroup = "other"
[[services.db.ingress]]
from_services = ["app"]
udp = [3306]
"#;
const RACE_B: &str = r#"version = 1
[defaults]
ingress = "allow"
egress = "allow"
[services.other]
cgroup = "other"
[services.zz]
cgroup = "zz"
[services.app]
cgroup = "app"
[services.db]
cgroup = "db"
defaults = { ingress = "drop" }
[[services.db.ingress]]
from_services = ["app"]
udp = [3306]
"#;

/// Reloads that renumber the services, back to back, while cgroups are
/// made and removed below the root as fast as the follower can classify
/// them: a process in no service never reaches db (the follower's
/// classification never puts an id of the other policy into the slot a
/// reload fills and puts in force).
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn renumbering_reloads_racing_cgroup_churn() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("rc", &["app", "db", "other", "nobody", "stage"], 102)?;
    let ns = lab.ns.name.clone();
    let _db = Helper::server(&lab.cg("db"), &ns, "serve-udp 127.0.0.1 3306")?;
    lab.attach(RACE_A)?;
    let root = lab.root.to_string_lossy().to_string();
    let (a, b) = (lab.state.join("a.toml"), lab.state.join("b.toml"));
    std::fs::write(&a, RACE_A)?;
    std::fs::write(&b, RACE_B)?;
    assert!(lab.udp("app", "127.0.0.1 3306")?, "app -> db");
    assert!(!lab.udp("nobody", "127.0.0.1 3306")?, "nobody -> db");
    let prober = prober_in(&lab, "nobody", "127.0.0.1 3306")?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (stop, root) = (stop.clone(), lab.root.clone());
        std::thread::spawn(move || {
            let mut rounds = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let made: Vec<PathBuf> = (0..100)
                    .map(|i| root.join(format!("churn{i}")))
                    .filter(|p| std::fs::create_dir(p).is_ok())
                    .collect();
                std::thread::sleep(Duration::from_millis(100));
                for p in made {
                    let _ = std::fs::remove_dir(p);
                }
                rounds += 1;
            }
            rounds
        })
    };
    let start = Instant::now();
    let mut reloads = 0u32;
    while start.elapsed() < Duration::from_secs(12) {
        let file = if reloads.is_multiple_of(2) { &b } else { &a };
        let out = lab
            .segbpf(&[
                "reload",
                "--services",
                "--cgroup-root",
                &root,
                "-p",
                file.to_str().context("path")?,
            ])
            .output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        reloads += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = churn.join().map_err(|_| anyhow::anyhow!("churn thread"))?;
    let (ok, _, total) = finish(prober)?;
    eprintln!("{reloads} reloads, {rounds} churn rounds, {total} probes from no service");
    assert!(total > 100, "the prober hardly ran: {total}");
    assert_eq!(ok, 0, "no service reached db {ok} times out of {total}");
    assert!(
        lab.udp("app", "127.0.0.1 3306")?,
        "app -> db after the reloads"
    );
    assert!(!lab.udp("nobody", "127.0.0.1 3306")?, "nobody -> db after");
    Ok(())
}

/// Reads one line of a helper's stdout.
fn read_line(h: &mut Helper) -> anyhow::Result<String> {
    let out = h
        .child
        .as_mut()
        .and_then(|c| c.stdout.as_mut())
        .context("stdout")?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        out.read_exact(&mut byte)?;
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// No receiver learns a service's stamp: a process in no service asking
/// for each datagram's priority (SO_RCVPRIORITY, no privilege needed)
/// gets 0 for what a service sends it over loopback (both families,
/// before and after a reload), and so does a service receiving from
/// another service; the flows still work (the stamp was read before it
/// was wiped).
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn no_receiver_reads_the_stamp() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("pr", &["app", "db", "other", "nobody"], 103)?;
    let ns = lab.ns.name.clone();
    let _db = Helper::server(&lab.cg("db"), &ns, "serve-udp 127.0.0.1 3306")?;
    lab.attach(RACE_A)?;
    let mut seen = Vec::new();
    let mut keys = Vec::new();
    for round in 0..2 {
        keys.push(slot_key(&lab, slot_and_id(&lab, "app")?.0)?);
        for (cg, addr) in [
            ("nobody", "127.0.0.1"),
            ("nobody", "::1"),
            ("other", "127.0.0.1"),
        ] {
            let mut rx = Helper::server(&lab.cg(cg), &ns, &format!("recv-prio {addr} 9001"))?;
            // app's datagram (its echo never comes: a failure is expected).
            let _ = lab.udp("app", &format!("{addr} 9001"))?;
            let line = read_line(&mut rx)?;
            seen.push(format!("round {round} {cg} {addr}: {line}"));
        }
        assert!(
            lab.udp("app", "127.0.0.1 3306")?,
            "app -> db, round {round}"
        );
        assert!(
            !lab.udp("nobody", "127.0.0.1 3306")?,
            "nobody -> db, round {round}"
        );
        lab.reload(None)?;
    }
    assert!(
        seen.iter().all(|l| l.ends_with("prio=0")),
        "a receiver read a stamp: {seen:#?}"
    );
    // Each reload draws a new stamp key.
    keys.push(slot_key(&lab, slot_and_id(&lab, "app")?.0)?);
    assert!(
        keys[0] != keys[1] && keys[1] != keys[2] && keys[0] != keys[2],
        "the stamp key did not change with the reloads: {keys:x?}"
    );
    Ok(())
}

/// A stamp read off a loopback packet by a packet tap (`AF_PACKET` with
/// `SO_RCVPRIORITY`, CAP_NET_RAW) and replayed over IPv6 loopback in
/// frames from the tap (which never pass the egress program): from the
/// attacker's own source port it is refused (the stamp is bound to the
/// packet's 5-tuple), counted in `status --services` (`stamps_refused`);
/// on the tuple it was read from it still passes (what anyone who sees a
/// tuple can do on any network) until reloads have replaced the key of
/// the slot it names (two: the slot not in force keeps its key for
/// packets in flight across one flip).
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn tapped_stamp_cannot_be_replayed() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("tp", &["app", "db", "other", "cache", "none"], 105)?;
    let ns = lab.ns.name.clone();
    let _db = Helper::server(&lab.cg("db"), &ns, "serve-udp ::1 3306")?;
    lab.attach(MATRIX)?;
    let root = lab.root.to_string_lossy().to_string();
    let (app, none) = (lab.cg("app"), lab.cg("none"));
    let (app, none) = (
        app.to_str().context("cgroup")?,
        none.to_str().context("cgroup")?,
    );
    let mut h = Helper::spawn(
        &lab.cg("none"),
        &ns,
        &format!("packet-replay {app} {none} 3306"),
    )?;
    let mut line = read_line(&mut h)?;
    while !line.contains("legit=") {
        line = read_line(&mut h)?;
    }
    assert!(line.contains("legit=1"), "app -> db did not work: {line}");
    assert!(!line.contains("stamp=none"), "the tap saw no stamp: {line}");
    // The test's own control: the tap's frames do reach db (on the tuple
    // the stamp was made for they pass, as the stamp is right for them).
    assert!(
        line.contains("same_tuple=1"),
        "the captured frame, replayed as it was, did not pass (the test cannot tell): {line}"
    );
    assert!(
        line.contains("other_port=0"),
        "db took a replayed stamp from another source port for app's: {line}"
    );
    let status = lab
        .segbpf(&["status", "--services", "--cgroup-root", &root, "-o", "json"])
        .output()?;
    let st: serde_json::Value = serde_json::from_slice(&status.stdout)?;
    let refused = st["services"][0]["stamps_refused"]
        .as_u64()
        .or_else(|| st["stamps_refused"].as_u64())
        .with_context(|| format!("no stamps_refused in {st}"))?;
    assert!(refused >= 1, "the refused stamp was not counted: {st}");
    // Two reloads: the slot the stamp names gets a new key.
    for _ in 0..2 {
        lab.reload(None)?;
    }
    assert!(read_line(&mut h)?.contains("ready"));
    h.child
        .as_mut()
        .and_then(|c| c.stdin.as_mut())
        .context("stdin")?
        .write_all(b"x")?;
    let after = read_line(&mut h)?;
    assert!(
        after.contains("after=0"),
        "the captured frame passed on its tuple after the key changed: {after}"
    );
    // app itself still reaches db under the new key.
    assert!(lab.udp("app", "::1 3306")?, "app -> db after the reloads");
    Ok(())
}

/// Ends a follower left by `--no-wait` or a `--confirm` guard (by its
/// PID, if it is still one).
struct Kill(i32);

impl Drop for Kill {
    fn drop(&mut self) {
        let p = nix::unistd::Pid::from_raw(self.0);
        if std::fs::read_to_string(format!("/proc/{}/cmdline", self.0))
            .is_ok_and(|c| c.contains("--follow-only") || c.contains("guard\0--services"))
        {
            let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// The follower a `--no-wait` attach names in its log (`followed by
/// process PID`).
fn follower_named(log: &str) -> Option<i32> {
    log.split("followed by process ")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

impl SvcLab {
    /// `attach --services --no-wait --policy POLICY --cgroup-root ROOT
    /// EXTRA...` below the lab's root: it must succeed and name its
    /// follower. Its stderr, and the follower (ended by PID when the
    /// `Kill` is dropped, also when this fails).
    fn attach_follower(&self, policy: &Path, extra: &[&str]) -> anyhow::Result<(String, Kill)> {
        let out = self
            .segbpf(&["attach", "--services", "--no-wait", "--policy"])
            .arg(policy)
            .arg("--cgroup-root")
            .arg(&self.root)
            .args(extra)
            .output()?;
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        let kill = follower_named(&log).map(Kill);
        anyhow::ensure!(out.status.success(), "attach --no-wait: {log}");
        let kill = kill.with_context(|| format!("no follower in: {log}"))?;
        Ok((log, kill))
    }

    /// `reload --services --cgroup-root ROOT`, with `policy` (if any)
    /// written to the lab's roles.toml first; fails with its stderr
    /// unless it succeeds.
    fn reload(&self, policy: Option<&str>) -> anyhow::Result<()> {
        if let Some(policy) = policy {
            std::fs::write(self.state.join("roles.toml"), policy)?;
        }
        self.run_on_root(&["reload", "--services"])
    }

    /// `detach --services --cgroup-root ROOT` of the lab's root; fails
    /// with its stderr unless it succeeds.
    fn detach(&self) -> anyhow::Result<()> {
        self.run_on_root(&["detach", "--services"])
    }

    /// `segbpf ARGS --cgroup-root ROOT` of the lab's root; fails with its
    /// stderr unless it succeeds.
    fn run_on_root(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = self
            .segbpf(args)
            .arg("--cgroup-root")
            .arg(&self.root)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn no_wait_leaves_a_follower_that_detach_ends() -> anyhow::Result<()> {
    let lab = SvcLab::new("nw", &["app", "db", "other", "stage"], 96)?;
    let ns = lab.ns.name.clone();
    let _db = Helper::server(&lab.cg("db"), &ns, "serve-udp 127.0.0.1 3306")?;
    let policy = lab.state.join("roles.toml");
    std::fs::write(&policy, MATRIX)?;
    // The follower it left names itself; it is ended by PID if the test fails.
    let (_, kill) = lab.attach_follower(&policy, &[])?;
    let pid = kill.0;
    // It classifies a re-created cgroup: app reaches db again.
    remove_cgroups(&lab.cg("app"));
    std::fs::create_dir(lab.cg("app"))?;
    let prober = prober_in(&lab, "app", "127.0.0.1 3306")?;
    std::thread::sleep(Duration::from_millis(300));
    let (ok, _, _) = finish(prober)?;
    assert!(ok > 0, "the follower did not classify the re-created app");
    // detach --services: the follower sees it and exits.
    lab.detach()?;
    assert!(
        gone_within(pid, 5),
        "the follower {pid} outlived the detach"
    );
    Ok(())
}

/// The `--follow-only` processes following the lab's root.
fn followers_of(lab: &SvcLab) -> Vec<i32> {
    let root = lab.root.to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                        c.contains("--follow-only") && c.split('\0').any(|w| w == root)
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `attach --services --no-wait` given a relative policy path: the state
/// names it absolute (a reload from another directory finds it); run again
/// while its follower lives, no second follower starts; the follower logs
/// to `STATE/services:ID.follow.log` (a failed SIGHUP reload is there);
/// `status --services` without `--cgroup-root` names the subtree
/// attachment.
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn no_wait_follower_is_single_and_logs() -> anyhow::Result<()> {
    let lab = SvcLab::new("ns", &["app", "db", "other"], 104)?;
    std::fs::write(lab.state.join("roles.toml"), MATRIX)?;
    let root = lab.root.to_string_lossy().to_string();
    let attach = |lab: &SvcLab| -> anyhow::Result<String> {
        let out = lab
            .segbpf(&[
                "attach",
                "--services",
                "--no-wait",
                "--policy",
                "roles.toml",
                "--cgroup-root",
                &root,
            ])
            .current_dir(&lab.state)
            .output()?;
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{log}");
        Ok(log)
    };
    let first = attach(&lab)?;
    let pid = follower_named(&first).with_context(|| format!("no follower in: {first}"))?;
    let _kill = Kill(pid);
    // Wait until it has claimed the following.
    let start = Instant::now();
    while followers_of(&lab) != vec![pid] && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let second = attach(&lab)?;
    std::thread::sleep(Duration::from_millis(500));
    let now = followers_of(&lab);
    let _kill_others: Vec<Kill> = now
        .iter()
        .filter(|p| **p != pid)
        .map(|p| Kill(*p))
        .collect();
    assert_eq!(
        now,
        vec![pid],
        "followers after a second --no-wait: {second}"
    );
    // A reload from another directory, with the policy in force.
    let out = lab
        .segbpf(&["reload", "--services", "--cgroup-root", &root])
        .current_dir("/")
        .output()?;
    assert!(
        out.status.success(),
        "reload from /: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A policy that no longer loads, then SIGHUP: the failure is logged.
    std::fs::write(lab.state.join("roles.toml"), "version = 1\n[services.x\n")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )?;
    let log_file = std::fs::read_dir(&lab.state)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".follow.log"));
    let start = Instant::now();
    let mut log = String::new();
    while start.elapsed() < Duration::from_secs(5) {
        log = log_file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .unwrap_or_default();
        if log.contains("reload failed") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        log.contains("reload failed"),
        "no failed reload in the follower's log ({log_file:?}): {log}"
    );
    // status --services at the default root names the subtree attachment.
    let out = lab.segbpf(&["status", "--services"]).output()?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains(&root) && said.contains("--cgroup-root"),
        "status --services without --cgroup-root: {said}"
    );
    Ok(())
}

/// SIGHUP reloads the policy in force (the file the last attach or
/// reload recorded), not the file the process was started with: a
/// `reload --services -p OTHER` is not undone, neither by the foreground
/// attach nor by the `--no-wait` follower.
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn sighup_reloads_the_policy_in_force() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("hp", &["app", "db", "other"], 99)?;
    let ns = lab.ns.name.clone();
    let _db = Helper::server(&lab.cg("db"), &ns, "serve-tcp 127.0.0.1 3306")?;
    let root = lab.root.to_string_lossy().to_string();
    let first = lab.state.join("roles.toml");
    let other = lab.state.join("other.toml");
    std::fs::write(
        &other,
        MATRIX.replace(
            r#"from_services = ["app"]"#,
            r#"from_services = ["app", "other"]"#,
        ),
    )?;
    let other_s = other.to_str().context("path")?.to_string();
    let in_force = |lab: &SvcLab| -> anyhow::Result<(u64, String)> {
        let out = lab
            .segbpf(&["status", "--services", "--cgroup-root", &root, "-o", "json"])
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let s = &v["services"][0];
        Ok((
            s["generation"].as_u64().context("generation")?,
            s.to_string(),
        ))
    };
    // Reload OTHER, then SIGHUP `pid`: OTHER stays in force.
    let check = |lab: &SvcLab, pid: i32, who: &str| -> anyhow::Result<()> {
        let out = lab
            .segbpf(&[
                "reload",
                "--services",
                "--cgroup-root",
                &root,
                "-p",
                &other_s,
            ])
            .output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (g, _) = in_force(lab)?;
        assert!(
            lab.connect("other", "127.0.0.1 3306")?,
            "{who}: other -> db after the reload"
        );
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        )?;
        let start = Instant::now();
        while in_force(lab)?.0 == g && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let (g2, status) = in_force(lab)?;
        assert_eq!(g2, g + 1, "{who}: SIGHUP applied nothing: {status}");
        assert!(status.contains("other.toml"), "{who}: {status}");
        assert!(
            lab.connect("other", "127.0.0.1 3306")?,
            "{who}: SIGHUP undid the reload (other -> db refused)"
        );
        Ok(())
    };
    // The foreground attach.
    lab.attach(MATRIX)?;
    let fg = i32::try_from(lab.attach.as_ref().context("attach")?.id())?;
    check(&lab, fg, "foreground attach")?;
    // The `--no-wait` follower (adopting the attachment with the first file).
    let mut c = lab.attach.take().context("attach")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fg),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    c.wait()?;
    let (_, kill) = lab.attach_follower(&first, &[])?;
    let pid = kill.0;
    assert!(
        !lab.connect("other", "127.0.0.1 3306")?,
        "other -> db with the first file"
    );
    check(&lab, pid, "--no-wait follower")?;
    Ok(())
}

#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn to_services_checks_the_receiver() -> anyhow::Result<()> {
    let policy = r#"version = 1
[services.app]
cgroup = "app"
defaults = { egress = "drop" }
[services.db]
cgroup = "db"
defaults = { ingress = "allow" }
[services.other]
cgroup = "other"
defaults = { ingress = "allow" }
[[services.app.egress]]
to_services = ["db"]
udp = [5353]
tcp = [5353]
"#;
    let mut lab = SvcLab::new("ts", &["app", "db", "other", "none"], 97)?;
    let ns = lab.ns.name.clone();
    let _servers = [
        Helper::server(&lab.cg("db"), &ns, "serve-udp 127.0.0.1 5353")?,
        Helper::server(&lab.cg("db"), &ns, "serve-tcp ::1 5353")?,
        Helper::server(&lab.cg("other"), &ns, "serve-udp 127.0.0.2 5353")?,
        Helper::server(&lab.cg("other"), &ns, "serve-tcp 127.0.0.2 5353")?,
        Helper::server(&lab.cg("none"), &ns, "serve-udp 127.0.0.3 5353")?,
    ];
    lab.attach(policy)?;
    // The named receiver: allowed, both protocols and families.
    assert!(lab.udp("app", "127.0.0.1 5353")?, "app -> db udp");
    assert!(lab.connect("app", "::1 5353")?, "app -> db tcp over ::1");
    // The same port at another service or a process in none: the
    // receiver's ingress refuses what app may send only to db.
    assert!(!lab.udp("app", "127.0.0.2 5353")?, "app -> other udp");
    assert!(!lab.connect("app", "127.0.0.2 5353")?, "app -> other tcp");
    assert!(!lab.udp("app", "127.0.0.3 5353")?, "app -> none udp");
    // Others may still reach other (its ingress default is allow).
    assert!(lab.udp("db", "127.0.0.2 5353")?, "db -> other udp");
    Ok(())
}

/// `attach --services --confirm SECS` in the background (`--no-wait`):
/// returns the guard's and the follower's PIDs from its log.
fn attach_confirm(lab: &SvcLab, secs: &str) -> anyhow::Result<(i32, i32)> {
    let policy = lab.state.join("roles.toml");
    std::fs::write(&policy, MATRIX)?;
    let root = lab.root.to_string_lossy().to_string();
    let out = lab
        .segbpf(&[
            "attach",
            "--services",
            "--no-wait",
            "--confirm",
            secs,
            "--policy",
            policy.to_str().context("policy")?,
            "--cgroup-root",
            &root,
        ])
        .output()?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    anyhow::ensure!(out.status.success(), "attach --confirm: {log}");
    let pid_after = |what: &str| -> anyhow::Result<i32> {
        log.split(what)
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("no `{what}` in: {log}"))
    };
    Ok((
        pid_after("guard process ")?,
        pid_after("followed by process ")?,
    ))
}

/// Waits until process `pid` is gone (at most `secs`); whether it is.
fn gone_within(pid: i32, secs: u64) -> bool {
    let start = Instant::now();
    while std::fs::metadata(format!("/proc/{pid}")).is_ok()
        && start.elapsed() < Duration::from_secs(secs)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::metadata(format!("/proc/{pid}")).is_err()
}

#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn confirm_guards_a_first_attach() -> anyhow::Result<()> {
    let lab = SvcLab::new("cf", &["app", "db", "other"], 97)?;
    let ns = lab.ns.name.clone();
    let _db = Helper::server(&lab.cg("db"), &ns, "serve-tcp 127.0.0.1 3306")?;
    let root = lab.root.to_string_lossy().to_string();
    anyhow::ensure!(
        lab.connect("other", "127.0.0.1 3306")?,
        "db does not answer before the attach"
    );

    // Not confirmed: enforced at once, removed after 2 s (programs gone,
    // db open again; the guard and the follower exit).
    let (guard, follower) = attach_confirm(&lab, "2")?;
    let (_g, _f) = (Kill(guard), Kill(follower));
    anyhow::ensure!(
        !lab.connect("other", "127.0.0.1 3306")?,
        "not enforced while waiting for confirmation"
    );
    anyhow::ensure!(gone_within(guard, 8), "the guard {guard} did not finish");
    let out = lab
        .segbpf(&["status", "--services", "--cgroup-root", &root])
        .output()?;
    anyhow::ensure!(
        !out.status.success(),
        "the unconfirmed attach is still there: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    anyhow::ensure!(
        lab.connect("other", "127.0.0.1 3306")?,
        "db still refuses after the unconfirmed attach was removed"
    );
    anyhow::ensure!(
        gone_within(follower, 5),
        "the follower outlived the removal"
    );

    // Confirmed: stays past the deadline; the guard stands down.
    let (guard, follower) = attach_confirm(&lab, "2")?;
    let (_g, _f) = (Kill(guard), Kill(follower));
    let out = lab
        .segbpf(&["status", "--services", "--cgroup-root", &root])
        .output()?;
    let said = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        said.contains("PENDING: removed in"),
        "status does not say the attach waits for confirmation:\n{said}"
    );
    // The command it names works as shown (the lab's root is not the default).
    assert!(
        said.contains(&format!(
            "segbpf confirm --services --cgroup-root {}",
            lab.root.display()
        )),
        "the PENDING line lacks --cgroup-root:\n{said}"
    );
    let out = lab
        .segbpf(&["confirm", "--services", "--cgroup-root", &root])
        .output()?;
    anyhow::ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("confirmed"),
        "confirm --services: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(gone_within(guard, 3), "the guard did not stand down");
    let out = lab
        .segbpf(&["status", "--services", "--cgroup-root", &root])
        .output()?;
    anyhow::ensure!(
        !String::from_utf8_lossy(&out.stdout).contains("PENDING"),
        "status still says pending after the confirm"
    );
    std::thread::sleep(Duration::from_secs(2));
    anyhow::ensure!(
        !lab.connect("other", "127.0.0.1 3306")?,
        "the confirmed attach was removed"
    );
    // Nothing pending: confirm fails (exit 1). Already attached:
    // --confirm is refused (exit 2) and the policy stays.
    let out = lab
        .segbpf(&["confirm", "--services", "--cgroup-root", &root])
        .output()?;
    anyhow::ensure!(
        out.status.code() == Some(1),
        "confirm with nothing pending: {out:?}"
    );
    let policy = lab.state.join("roles.toml");
    let out = lab
        .segbpf(&[
            "attach",
            "--services",
            "--no-wait",
            "--confirm",
            "2",
            "--policy",
            policy.to_str().context("policy")?,
            "--cgroup-root",
            &root,
        ])
        .output()?;
    anyhow::ensure!(
        out.status.code() == Some(2),
        "--confirm over an attach: {out:?}"
    );
    anyhow::ensure!(
        !lab.connect("other", "127.0.0.1 3306")?,
        "the refused --confirm changed the policy in force"
    );
    lab.detach()?;
    anyhow::ensure!(gone_within(follower, 5), "the follower outlived the detach");
    Ok(())
}

// ---------------------------------------------------------------------------
// Under a real systemd: this machine booted by systemd-nspawn.
// ---------------------------------------------------------------------------

/// The policy of `under_systemd`: `unit = "..."` names units written for
/// the test. `db` accepts 3306 only from `app`; `app` may send only to
/// `db`'s 3306; `other` and `web` are in no service (the defaults allow).
const UNITS_POLICY: &str = r#"version = 1
[defaults]
ingress = "allow"
egress = "allow"
established = true
[services.db]
unit = "db.service"
defaults = { ingress = "drop" }
[[services.db.ingress]]
from_services = ["app"]
tcp = [3306]
[services.app]
unit = "app.service"
defaults = { egress = "drop" }
[[services.app.egress]]
to_services = ["db"]
tcp = [3306]
"#;

/// A listener on 127.0.0.1:PORT that accepts and closes (python3 of the
/// host's /usr, which the container shares).
fn server_unit(port: u16) -> String {
    format!(
        "[Unit]\nDescription=segbpf test listener {port}\n[Service]\n\
         ExecStart=/usr/bin/python3 -c \"import socket\\n\
         s=socket.socket()\\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\\n\
         s.bind(('127.0.0.1',{port}))\\ns.listen(64)\\n\
         while True: s.accept()[0].close()\"\n"
    )
}

/// A client that, from the moment its process starts, tries 3306 and
/// 8080 on 127.0.0.1 every 20 ms and appends `MONO_NS PORT ok|no` to
/// /run/NAME.log (`start MONO_NS` first: each restart is visible).
fn client_unit(name: &str) -> String {
    format!(
        "[Unit]\nDescription=segbpf test client {name}\n[Service]\n\
         ExecStart=/usr/bin/python3 -u -c \"import socket,time\\n\
         f=open('/run/{name}.log','a',buffering=1)\\n\
         f.write('start %%d\\\\n' %% time.monotonic_ns())\\n\
         while True:\\n\
         \\tfor p in (3306,8080):\\n\
         \\t\\tc=socket.socket(); c.settimeout(0.2); t=time.monotonic_ns()\\n\
         \\t\\ttry: c.connect(('127.0.0.1',p)); r='ok'\\n\
         \\t\\texcept Exception: r='no'\\n\
         \\t\\tc.close(); f.write('%%d %%d %%s\\\\n' %% (t,p,r))\\n\
         \\ttime.sleep(0.02)\"\n"
    )
}

/// A booted container (`segbpf_tests::nspawn`): powered off, its bpffs
/// unmounted, its cgroups and work directory removed on drop.
struct Booted {
    c: nspawn::Container,
    pid1: u32,
}

impl Booted {
    /// Runs `script` with `sh -c` in the container's namespaces. Not in a
    /// unit's cgroup: what it runs is outside the container's cgroup tree.
    fn sh(&self, script: &str) -> anyhow::Result<String> {
        self.c.sh(script)
    }

    /// `systemctl show -p PROP --value UNIT` as a number.
    fn prop(&self, unit: &str, prop: &str) -> anyhow::Result<u64> {
        let v = self.sh(&format!("systemctl show -p {prop} --value {unit}"))?;
        v.trim()
            .parse()
            .with_context(|| format!("{unit} {prop} = {v:?}"))
    }

    fn log(&self, name: &str) -> Vec<(u128, u16, bool)> {
        let text = std::fs::read_to_string(format!("/proc/{}/root/run/{name}.log", self.pid1))
            .unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut w = l.split(' ');
                let t = w.next()?.parse().ok()?;
                let p = w.next()?.parse().ok()?;
                Some((t, p, w.next()? == "ok"))
            })
            .collect()
    }

    fn journal(&self) -> String {
        self.sh("journalctl -b --no-pager -u segbpf-services -u app -u db | tail -40")
            .unwrap_or_default()
    }
}

/// Boots this machine's systemd with `--volatile=yes -D /` (as
/// `cargo xtask dist --check` does), the package's unit
/// segbpf-services.service wanted by sysinit.target, the test's units
/// wanted by multi-user.target, the policy at /etc/segbpf/roles.toml and
/// the binary at /usr/sbin/segbpf (all read-only binds).
fn boot(work: &Path) -> anyhow::Result<Booted> {
    let share = work.join("share");
    std::fs::create_dir_all(&share)?;
    let unit_src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dist/systemd/segbpf-services.service")
        .canonicalize()?;
    let files: Vec<(String, String)> = vec![
        ("roles.toml".into(), UNITS_POLICY.into()),
        ("db.service".into(), server_unit(3306)),
        ("web.service".into(), server_unit(8080)),
        ("app.service".into(), client_unit("app")),
        ("other.service".into(), client_unit("other")),
        (
            "sysinit.conf".into(),
            "[Unit]\nWants=segbpf-services.service\n".into(),
        ),
        (
            "multi-user.conf".into(),
            "[Unit]\nWants=db.service web.service app.service other.service\n".into(),
        ),
    ];
    for (name, text) in &files {
        std::fs::write(share.join(name), text)?;
    }
    // nspawn roots the container's cgroup namespace at a `payload` cgroup
    // below its caller's: started three levels down, that root lies at
    // level 4, far enough from the hierarchy's root that the levels seen
    // inside (0 for the namespace's root) would leave every unit's cgroup
    // out of the programs' walk.
    let cgroup = cgroup2_mount()?.join(work.file_name().context("work dir name")?);
    let mut boot = nspawn::Nspawn::new(&format!("segbpf-svc-{}", std::process::id()), work)
        .quiet()
        .bpffs()
        .in_cgroup(cgroup, "a/b")
        .remove_work()
        .bind_ro(&segbpf_bin(), "/usr/sbin/segbpf")
        .bind_ro(&unit_src, "/etc/systemd/system/segbpf-services.service")
        .bind_ro(&share.join("roles.toml"), "/etc/segbpf/roles.toml")
        .bind_ro(
            &share.join("sysinit.conf"),
            "/etc/systemd/system/sysinit.target.d/segbpf-test.conf",
        )
        .bind_ro(
            &share.join("multi-user.conf"),
            "/etc/systemd/system/multi-user.target.d/segbpf-test.conf",
        );
    for u in ["db", "web", "app", "other"] {
        boot = boot.bind_ro(
            &share.join(format!("{u}.service")),
            &format!("/etc/systemd/system/{u}.service"),
        );
    }
    let c = boot.boot()?;
    Ok(Booted { pid1: c.pid1(), c })
}

/// Waits until `name`'s log has a line after `since` for `port` with
/// result `ok`; returns its time.
fn wait_log(b: &Booted, name: &str, since: u128, port: u16, ok: bool) -> anyhow::Result<u128> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        if let Some(&(t, _, _)) = b
            .log(name)
            .iter()
            .find(|&&(t, p, r)| t > since && p == port && r == ok)
        {
            return Ok(t);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "{name}: no {port} {} after {since} in 15 s\n{}",
        if ok { "ok" } else { "no" },
        b.journal()
    )
}

#[test]
#[ignore = "needs root, systemd-nspawn and a kernel with BPF: run `cargo xtask test`"]
fn under_systemd() -> anyhow::Result<()> {
    if Command::new("systemd-nspawn")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIPPED under_systemd: systemd-nspawn is missing (package systemd-container; `cargo xtask setup` installs it)"
        );
        return Ok(());
    }
    let work = std::env::temp_dir().join(format!(
        "segbpf-nspawn-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&work)?;
    let b = boot(&work)?;

    // The container runs in a cgroup namespace of its own, rooted at a
    // `payload` cgroup below the caller's (systemd-nspawn always makes it
    // so): the levels segbpf sees inside are not the kernel's absolute
    // ones, which segbpf finds from the kernel (its level probe). The
    // scenario below fails if it enforced at the levels it sees.
    let host_cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", b.pid1))?;
    let own_ns = std::fs::read_link(format!("/proc/{}/ns/cgroup", b.pid1))?;
    let root_depth = host_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map_or(0, |p| p.split('/').filter(|c| !c.is_empty()).count());
    anyhow::ensure!(
        root_depth >= 4 && own_ns != std::fs::read_link("/proc/self/ns/cgroup")?,
        "the container should run in a cgroup namespace of its own below the hierarchy's root: {} {}",
        host_cgroup.trim(),
        own_ns.display()
    );
    eprintln!(
        "under_systemd: the container's cgroup namespace is rooted at {}",
        host_cgroup
            .lines()
            .find(|l| l.starts_with("0::"))
            .unwrap_or(host_cgroup.trim())
    );

    // The package's unit was active before any governed unit started.
    ensure_active(&b, "segbpf-services.service")?;
    let enforced = b.prop("segbpf-services.service", "ActiveEnterTimestampMonotonic")?;
    for u in ["db.service", "app.service", "other.service"] {
        ensure_active(&b, u)?;
        let started = b.prop(u, "ExecMainStartTimestampMonotonic")?;
        anyhow::ensure!(
            enforced > 0 && enforced <= started,
            "{u} started at {started} µs, before segbpf-services was enforcing ({enforced} µs)\n{}",
            b.journal()
        );
    }

    // `unit = "..."` resolved: app reaches db, other does not; app's
    // egress is an allow-list from its first connection on.
    wait_log(&b, "app", 0, 3306, true)?;
    wait_log(&b, "other", 0, 8080, true)?;
    let status = b.sh("segbpf status --services")?;
    anyhow::ensure!(
        status.contains("system.slice/db.service") && status.contains("system.slice/app.service"),
        "status --services does not show the units' cgroups:\n{status}"
    );

    // Restarts: each new app process (a new cgroup) and each new db are
    // governed from their first packet on.
    for round in 0..3 {
        let before = mono_ns();
        b.sh("systemctl restart app.service")?;
        wait_log(&b, "app", before, 3306, true)?;
        let before = mono_ns();
        b.sh("systemctl restart db.service")?;
        wait_log(&b, "app", before, 3306, true)
            .with_context(|| format!("round {round}: app after db's restart"))?;
    }
    // Let `other` probe once more after the last restart.
    wait_log(&b, "other", mono_ns(), 3306, false)?;

    let app = b.log("app");
    let other = b.log("other");
    let starts = std::fs::read_to_string(format!("/proc/{}/root/run/app.log", b.pid1))?
        .lines()
        .filter(|l| l.starts_with("start "))
        .count();
    anyhow::ensure!(starts == 4, "app started {starts} times, not 4");
    let leaks: Vec<_> = app.iter().filter(|&&(_, p, r)| p == 8080 && r).collect();
    anyhow::ensure!(
        leaks.is_empty(),
        "app reached 8080 (not in its allow-list) {} times, first at {:?}",
        leaks.len(),
        leaks.first()
    );
    let leaks: Vec<_> = other.iter().filter(|&&(_, p, r)| p == 3306 && r).collect();
    anyhow::ensure!(
        leaks.is_empty(),
        "other (no service) reached db's 3306 {} times, first at {:?}",
        leaks.len(),
        leaks.first()
    );
    let app_probes = app.iter().filter(|&&(_, p, _)| p == 8080).count();
    let other_probes = other.iter().filter(|&&(_, p, _)| p == 3306).count();
    eprintln!(
        "under_systemd: 3 restarts each of app and db; app's 8080 refused {app_probes}/{app_probes}, other's 3306 refused {other_probes}/{other_probes}"
    );
    Ok(())
}

fn ensure_active(b: &Booted, unit: &str) -> anyhow::Result<()> {
    let state = b
        .sh(&format!("systemctl is-active {unit} || true"))?
        .trim()
        .to_string();
    anyhow::ensure!(state == "active", "{unit} is {state}\n{}", b.journal());
    Ok(())
}

// ---------------------------------------------------------------------------
// Live changes: set edits, rollback, counters of the generation in force.
// ---------------------------------------------------------------------------

const SETS: &str = r#"version = 1
[sets]
peers = ["198.18.96.9"]
[services.db]
cgroup = "db"
defaults = { ingress = "drop" }
[services.other]
cgroup = "other"

[[services.db.ingress]]
name = "db-from-peers"
from = "peers"
tcp = [3306]
"#;

impl SvcLab {
    /// `segbpf ARGS --cgroup-root ROOT -o json`: exit code and document.
    fn json(&self, args: &[&str]) -> anyhow::Result<(Option<i32>, serde_json::Value)> {
        let root = self.root.to_string_lossy().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--cgroup-root", &root, "-o", "json"]);
        let out = self.segbpf(&all).output()?;
        let v = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "{args:?}: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok((out.status.code(), v))
    }

    fn generation(&self) -> anyhow::Result<u64> {
        let (_, v) = self.json(&["status", "--services"])?;
        v["services"][0]["generation"]
            .as_u64()
            .context("generation")
    }
}

#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn set_edits_and_rollback() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("se", &["db", "other"], 96)?;
    let ns = lab.ns.name.clone();
    let _db = Helper::server(&lab.cg("db"), &ns, "serve-tcp 198.18.96.1 3306")?;
    lab.attach(SETS)?;
    let to_db = "198.18.96.1 3306";
    // The source of a connection to the host's own address is that
    // address: 198.18.96.1 is not in `peers`.
    assert!(!lab.connect("other", to_db)?, "other -> db before the edit");
    // `set add --services`: the peer is let in, as one new generation.
    let (code, v) = lab.json(&["set", "add", "--services", "peers", "198.18.96.1"])?;
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["applied"], true, "{v}");
    assert_eq!(v["changed"], 1, "{v}");
    assert_eq!(v["generation"], 2, "{v}");
    assert_eq!(lab.generation()?, 2);
    assert!(lab.connect("other", to_db)?, "other -> db after set add");
    let (code, v) = lab.json(&["set", "list", "--services", "peers"])?;
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["sets"][0]["edited"], true, "{v}");
    assert_eq!(
        v["sets"][0]["members"],
        serde_json::json!(["198.18.96.9", "198.18.96.1"]),
        "{v}"
    );
    // `status` says what is in force: the edit.
    let (_, st) = lab.json(&["status", "--services"])?;
    assert_eq!(
        st["services"][0]["set_overrides"]["peers"],
        serde_json::json!(["198.18.96.9", "198.18.96.1"]),
        "{st}"
    );
    // The same member again: nothing applied, no new generation.
    let (code, v) = lab.json(&["set", "add", "--services", "peers", "198.18.96.1"])?;
    assert_eq!((code, &v["applied"]), (Some(0), &serde_json::json!(false)));
    assert_eq!(lab.generation()?, 2);
    // Errors change nothing: a member not in the set, a set not in the policy.
    let (code, v) = lab.json(&["set", "del", "--services", "peers", "198.18.96.7"])?;
    assert_eq!(code, Some(1), "{v}");
    let (code, v) = lab.json(&["set", "add", "--services", "nosuch", "198.18.96.7"])?;
    assert_eq!(code, Some(1), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no set named `nosuch`")),
        "{v}"
    );
    assert_eq!(lab.generation()?, 2);
    assert!(lab.connect("other", to_db)?, "the edit in force stays");
    // `set del --services`: shut out again.
    let (code, v) = lab.json(&["set", "del", "--services", "peers", "198.18.96.1"])?;
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(lab.generation()?, 3);
    assert!(!lab.connect("other", to_db)?, "other -> db after set del");
    // `rollback --services`: generation 2's policy (peer in) as generation 4.
    let (code, v) = lab.json(&["rollback", "--services"])?;
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["restored_generation"], 2, "{v}");
    assert_eq!(v["generation"], 4, "{v}");
    assert!(lab.connect("other", to_db)?, "other -> db after rollback");
    let (_, st) = lab.json(&["status", "--services"])?;
    assert_eq!(st["services"][0]["restored"], 2, "{st}");
    // A second rollback goes further back (generation 1: out), not undo.
    let (_, v) = lab.json(&["rollback", "--services"])?;
    assert_eq!(v["restored_generation"], 1, "{v}");
    assert!(
        !lab.connect("other", to_db)?,
        "other -> db after 2nd rollback"
    );
    // `--to` a generation, and one the history does not have.
    let (code, v) = lab.json(&["rollback", "--services", "--to", "2"])?;
    assert_eq!(code, Some(0), "{v}");
    assert!(lab.connect("other", to_db)?, "other -> db after --to 2");
    let (code, _) = lab.json(&["rollback", "--services", "--to", "99"])?;
    assert_eq!(code, Some(1));
    assert_eq!(lab.generation()?, 6);
    // `reload --services` goes back to the file (its sets win), unless
    // `--keep-set-edits`.
    let (code, v) = lab.json(&["reload", "--services", "--keep-set-edits"])?;
    assert_eq!(code, Some(0), "{v}");
    assert!(lab.connect("other", to_db)?, "edits kept");
    let (code, v) = lab.json(&["reload", "--services"])?;
    assert_eq!(code, Some(0), "{v}");
    assert!(!lab.connect("other", to_db)?, "the file's sets");
    // SIGHUP to the running attach applies the file again, keeping edits.
    let (code, v) = lab.json(&["set", "add", "--services", "peers", "198.18.96.1"])?;
    assert_eq!(code, Some(0), "{v}");
    let before = lab.generation()?;
    let pid =
        nix::unistd::Pid::from_raw(i32::try_from(lab.attach.as_ref().context("attach")?.id())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP)?;
    let start = Instant::now();
    while lab.generation()? == before && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(lab.generation()?, before + 1, "SIGHUP applied");
    assert!(lab.connect("other", to_db)?, "the edit survives SIGHUP");
    // Running `attach --services` again over the attachment is a reload:
    // the file's sets win, and it says so (never silently).
    let path = lab.state.join("roles.toml");
    let root = lab.root.to_str().context("root")?.to_string();
    let out = lab
        .segbpf(&[
            "attach",
            "--services",
            "--policy",
            path.to_str().context("path")?,
            "--cgroup-root",
            &root,
            "--no-wait",
        ])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("replace the live edits of set(s) peers"),
        "a re-run attach names the set edits it replaces: {stderr}"
    );
    assert!(!lab.connect("other", to_db)?, "the file's sets again");
    Ok(())
}

#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn status_counts_the_generation_in_force() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("sc", &["db", "other"], 97)?;
    let ns = lab.ns.name.clone();
    let _db = Helper::server(&lab.cg("db"), &ns, "serve-tcp 198.18.97.1 3306")?;
    lab.attach(SETS)?;
    let dropped = |lab: &SvcLab| -> anyhow::Result<u64> {
        let (_, v) = lab.json(&["status", "--services"])?;
        v["services"][0]["services"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == "db"))
            .and_then(|s| s["packets"]["ingress_dropped"].as_u64())
            .context("db's ingress_dropped")
    };
    assert!(!lab.connect("other", "198.18.97.1 3306")?);
    assert!(dropped(&lab)? > 0, "generation 1 counted its drops");
    // Two reloads: generation 3 uses generation 1's slot again.
    for g in [2, 3] {
        let (code, v) = lab.json(&["reload", "--services"])?;
        assert_eq!(code, Some(0), "{v}");
        assert_eq!(lab.generation()?, g);
    }
    assert_eq!(
        dropped(&lab)?,
        0,
        "generation 3 has dropped nothing yet (not generation 1's counts)"
    );
    assert!(!lab.connect("other", "198.18.97.1 3306")?);
    assert!(dropped(&lab)? > 0, "generation 3 counts its own drops");
    Ok(())
}

/// `COMMAND... --services --service SVC --direction DIR` of a TCP packet
/// from 127.0.0.1 to 127.0.0.1:PORT (`explain POLICY`, `trace`; more
/// arguments may follow).
fn svc_loopback_tcp<'a>(
    command: &[&'a str],
    svc: &'a str,
    dir: &'a str,
    port: &'a str,
) -> Vec<&'a str> {
    let mut args = command.to_vec();
    args.extend([
        "--services",
        "--service",
        svc,
        "--direction",
        dir,
        "--src",
        "127.0.0.1",
        "--dst",
        "127.0.0.1",
        "--proto",
        "tcp",
        "--dport",
        port,
    ]);
    args
}

#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn explain_agrees_with_the_kernel() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("ex", &["app", "db", "other"], 98)?;
    let ns = lab.ns.name.clone();
    let _s1 = Helper::server(&lab.cg("db"), &ns, "serve-tcp 127.0.0.1 3306")?;
    let _s2 = Helper::server(&lab.cg("db"), &ns, "serve-tcp 127.0.0.1 3307")?;
    lab.attach(MATRIX)?;
    let policy = lab.state.join("roles.toml");
    let policy = policy.to_str().context("path")?;
    let explain =
        |svc: &str, peer: &str, dir: &str, port: u16| -> anyhow::Result<serde_json::Value> {
            let port = port.to_string();
            let mut args = svc_loopback_tcp(&["explain", policy], svc, dir, &port);
            args.extend(["--peer-service", peer, "-o", "json"]);
            let out = lab.segbpf(&args).output()?;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(serde_json::from_slice(&out.stdout)?)
        };
    for (from, port) in [
        ("app", 3306),
        ("other", 3306),
        ("app", 3307),
        ("other", 3307),
    ] {
        let out = explain(from, "db", "egress", port)?;
        let inn = explain("db", from, "ingress", port)?;
        let allowed = out["verdict"] == "allow" && inn["verdict"] == "allow";
        let kernel = lab.connect(from, &format!("127.0.0.1 {port}"))?;
        assert_eq!(
            allowed, kernel,
            "{from} -> db:{port}: explain says {out} / {inn}, the kernel {kernel}"
        );
        assert_eq!(inn["service"], "db", "{inn}");
        assert_eq!(inn["peer_service"], from, "{inn}");
    }
    // The rule that lets app in is named.
    let inn = explain("db", "app", "ingress", 3306)?;
    assert_eq!(inn["rule"]["name"], "db-from-app", "{inn}");
    assert_eq!(inn["reason"], "rule", "{inn}");
    let inn = explain("db", "other", "ingress", 3306)?;
    assert!(inn["rule"].is_null(), "{inn}");
    Ok(())
}

#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn monitor_shows_drops_with_their_service() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("mo", &["app", "db", "other"], 99)?;
    let ns = lab.ns.name.clone();
    let _db = Helper::server(&lab.cg("db"), &ns, "serve-tcp 127.0.0.1 3306")?;
    lab.attach(MATRIX)?;
    let root = lab.root.to_string_lossy().to_string();
    let log = lab.state.join("monitor.log");
    let mut mon = lab
        .segbpf(&[
            "monitor",
            "--services",
            "--cgroup-root",
            &root,
            "-o",
            "json",
        ])
        .stdout(std::fs::File::create(&log)?)
        .stderr(Stdio::null())
        .spawn()?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(mon.id())?);
    // No panic before the directory is removed: failures are errors.
    let result = (|| -> anyhow::Result<()> {
        let start = Instant::now();
        let mut found = None;
        while found.is_none() && start.elapsed() < Duration::from_secs(10) {
            assert!(!lab.connect("other", "127.0.0.1 3306")?, "other -> db");
            std::thread::sleep(Duration::from_millis(200));
            found = std::fs::read_to_string(&log)?
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["service"] == "db" && v["dport"] == 3306);
        }
        let v = found.context("no drop event of db in monitor --services")?;
        assert_eq!(v["type"], "event", "{v}");
        assert_eq!(v["verdict"], "drop", "{v}");
        assert_eq!(v["direction"], "ingress", "{v}");
        assert_eq!(v["proto"], "tcp", "{v}");
        assert_eq!(v["schema"], 1, "{v}");
        // An allowed connection makes no event.
        assert!(lab.connect("app", "127.0.0.1 3306")?, "app -> db");
        Ok(())
    })();
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let st = mon.wait()?;
    result?;
    assert!(st.success(), "monitor ended with {st}");
    Ok(())
}

/// Polls `log` (JSON Lines) while `other` knocks on db's 3306 until a
/// record of db's port appears.
fn drop_record_of_db(lab: &SvcLab, log: &Path) -> anyhow::Result<serde_json::Value> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        assert!(!lab.connect("other", "127.0.0.1 3306")?, "other -> db");
        std::thread::sleep(Duration::from_millis(200));
        let found = std::fs::read_to_string(log)?
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["service"] == "db" && v["dport"] == 3306);
        if let Some(v) = found {
            return Ok(v);
        }
    }
    bail!("no drop event of db in {}", log.display())
}

#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn attach_log_json_is_the_monitor_dialect() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("lj", &["app", "db", "other"], 101)?;
    let ns = lab.ns.name.clone();
    let _db = Helper::server(&lab.cg("db"), &ns, "serve-tcp 127.0.0.1 3306")?;
    lab.attach_with(MATRIX, &["--log-format", "json"])?;
    // The foreground attach's own event lines.
    let attach = drop_record_of_db(&lab, &lab.state.join("events.log"))?;
    assert_eq!(attach["type"], "event", "{attach}");
    assert_eq!(attach["schema"], 1, "{attach}");
    assert_eq!(attach["verdict"], "drop", "{attach}");
    assert_eq!(attach["audit"], false, "{attach}");
    assert_eq!(attach["direction"], "ingress", "{attach}");
    assert_eq!(attach["proto"], "tcp", "{attach}");
    assert!(attach.get("action").is_none(), "{attach}");
    assert!(attach.get("event").is_none(), "{attach}");
    // monitor --services -o json: the same fields.
    let root = lab.root.to_string_lossy().to_string();
    let log = lab.state.join("monitor.log");
    let mut mon = lab
        .segbpf(&[
            "monitor",
            "--services",
            "--cgroup-root",
            &root,
            "-o",
            "json",
        ])
        .stdout(std::fs::File::create(&log)?)
        .stderr(Stdio::null())
        .spawn()?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(mon.id())?);
    let monitor = drop_record_of_db(&lab, &log);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    mon.wait()?;
    let monitor = monitor?;
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let mut k: Vec<String> = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        k.sort();
        k
    };
    assert_eq!(keys(&attach), keys(&monitor), "{attach} / {monitor}");
    for f in [
        "type",
        "verdict",
        "audit",
        "service",
        "direction",
        "proto",
        "dst",
        "dport",
    ] {
        assert_eq!(attach[f], monitor[f], "{f}: {attach} / {monitor}");
    }
    Ok(())
}

#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn trace_judges_as_a_service_and_changes_nothing() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("tr", &["app", "db", "other"], 102)?;
    let ns = lab.ns.name.clone();
    let _s1 = Helper::server(&lab.cg("db"), &ns, "serve-tcp 127.0.0.1 3306")?;
    let _s2 = Helper::server(&lab.cg("db"), &ns, "serve-tcp 127.0.0.1 3307")?;
    lab.attach(MATRIX)?;
    let trace = |svc: &str,
                 peer: Option<&str>,
                 dir: &str,
                 port: u16|
     -> anyhow::Result<serde_json::Value> {
        let port = port.to_string();
        let mut args = svc_loopback_tcp(&["trace"], svc, dir, &port);
        if let Some(p) = peer {
            args.extend(["--peer-service", p]);
        }
        let (code, v) = lab.json(&args)?;
        assert_eq!(code, Some(0), "{args:?}: {v}");
        Ok(v)
    };
    // Counters, flows and events before any trace: a trace changes none.
    let snapshot = || -> anyhow::Result<(serde_json::Value, serde_json::Value)> {
        let (_, st) = lab.json(&["status", "--services"])?;
        let (_, fl) = lab.json(&["flows", "--services"])?;
        let counts = serde_json::json!([
            st["services"]
                .as_array()
                .context("services")?
                .iter()
                .map(|s| s["packets"].clone())
                .collect::<Vec<_>>(),
            st["unserviced"]
        ]);
        Ok((counts, fl["flows"].clone()))
    };
    let events = || std::fs::read_to_string(lab.state.join("events.log"));
    let before = snapshot()?;
    let events_before = events()?;
    let mut traced = Vec::new();
    for (from, port) in [
        ("app", 3306),
        ("other", 3306),
        ("app", 3307),
        ("other", 3307),
    ] {
        let out = trace(from, None, "egress", port)?;
        let inn = trace("db", Some(from), "ingress", port)?;
        assert_eq!(inn["service"], "db", "{inn}");
        assert_eq!(inn["peer_service"], from, "{inn}");
        assert_eq!(inn["schema"], 1, "{inn}");
        traced.push((from, port, out, inn));
    }
    // The rule that lets app in is named; other meets db's default.
    let inn = &traced[0].3;
    assert_eq!(inn["verdict"], "allow", "{inn}");
    assert_eq!(inn["reason"], "rule", "{inn}");
    assert_eq!(inn["rule"]["name"], "db-from-app", "{inn}");
    let inn = &traced[1].3;
    assert_eq!(inn["verdict"], "drop", "{inn}");
    assert!(inn["rule"].is_null(), "{inn}");
    // A socket in no service sending to db is refused as well.
    assert_eq!(trace("db", None, "ingress", 3306)?["verdict"], "drop");
    // IPv6, and the host's own address (local, over loopback): app's
    // egress allow-list names ::1 and 198.18.91.1 only for 3306.
    for (dst, port, local, verdict) in [
        ("::1", "3306", false, "allow"),
        ("::1", "3307", false, "drop"),
        ("198.18.91.1", "3306", true, "allow"),
        ("198.18.91.9", "3306", true, "drop"),
    ] {
        let src = if dst.contains(':') {
            "::1"
        } else {
            "198.18.102.1"
        };
        let mut args = vec![
            "trace",
            "--services",
            "--service",
            "app",
            "--direction",
            "egress",
            "--src",
            src,
            "--dst",
            dst,
            "--proto",
            "tcp",
            "--dport",
            port,
        ];
        if local {
            args.push("--loopback");
        }
        let (code, v) = lab.json(&args)?;
        assert_eq!(
            (code, v["verdict"].as_str()),
            (Some(0), Some(verdict)),
            "{args:?}: {v}"
        );
        assert_eq!(
            v["loopback"],
            serde_json::json!(local || dst == "::1"),
            "{v}"
        );
    }
    // An unknown service is an error, nothing else.
    let (code, v) = lab.json(&[
        "trace",
        "--services",
        "--service",
        "nosuch",
        "--src",
        "127.0.0.1",
        "--dst",
        "127.0.0.1",
        "--proto",
        "tcp",
        "--dport",
        "3306",
    ])?;
    assert_eq!(code, Some(1), "{v}");
    // Nothing of the attachment changed: no counter, no flow, no event.
    assert_eq!(snapshot()?, before, "a dry run changed the attachment");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(events()?, events_before, "a dry run made an event");
    // And the kernel agrees with every trace, on real connections.
    for (from, port, out, inn) in &traced {
        let allowed = out["verdict"] == "allow" && inn["verdict"] == "allow";
        let kernel = lab.connect(from, &format!("127.0.0.1 {port}"))?;
        assert_eq!(
            allowed, kernel,
            "{from} -> db:{port}: trace says {out} / {inn}, the kernel {kernel}"
        );
    }
    Ok(())
}

#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn flows_carry_their_service() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("fl", &["app", "db", "other"], 100)?;
    let ns = lab.ns.name.clone();
    let _db = Helper::server(&lab.cg("db"), &ns, "serve-tcp 127.0.0.1 3306")?;
    lab.attach(MATRIX)?;
    assert!(lab.connect("app", "127.0.0.1 3306")?, "app -> db");
    assert!(!lab.connect("other", "127.0.0.1 3306")?, "other -> db");
    let (code, v) = lab.json(&["flows", "--services"])?;
    assert_eq!(code, Some(0), "{v}");
    let flows = v["flows"].as_array().context("flows")?;
    let db = flows
        .iter()
        .find(|f| f["service"] == "db" && f["dport"] == 3306)
        .with_context(|| format!("no flow of db: {v}"))?;
    assert_eq!(db["peer_service"], "app", "{db}");
    assert_eq!(db["opened_by"], "ingress", "{db}");
    assert_eq!(db["proto"], "tcp", "{db}");
    assert_eq!(db["rule"]["name"], "db-from-app", "{db}");
    let app = flows
        .iter()
        .find(|f| f["service"] == "app" && f["dport"] == 3306)
        .with_context(|| format!("no flow of app: {v}"))?;
    assert_eq!(app["opened_by"], "egress", "{app}");
    // The refused connection left no flow of db with other.
    assert!(
        !flows
            .iter()
            .any(|f| f["service"] == "db" && f["peer_service"] == "other"),
        "{v}"
    );
    Ok(())
}

/// A flow judged before a reload that renumbers the rules keeps the rule
/// that judged it in `flows --services`: named from the policy of its
/// generation (kept in the history), and once the history no longer keeps
/// that generation, `rule: null` with `judged_by_generation`, never the
/// rule the new policy gave the same number.
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn flows_name_the_rule_of_the_generation_that_judged() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("fr", &["app", "db", "other", "cache"], 100)?;
    let ns = lab.ns.name.clone();
    let _db = Helper::server(&lab.cg("db"), &ns, "serve-tcp-stream 127.0.0.1 3306")?;
    lab.attach(MATRIX)?;
    let root = lab.root.to_string_lossy().to_string();
    let mut held = Helper::server(&lab.cg("app"), &ns, "hold-tcp 127.0.0.1 3306")?;
    {
        let c = held.child.as_mut().context("child")?;
        c.stdin.as_mut().context("stdin")?.write_all(b"g")?;
    }
    let line = read_line(&mut held)?;
    assert!(line.ends_with("ok"), "the connection: {line}");
    // The round trip's delayed ACK goes by before the reloads: from then
    // on no packet of the connection until the end.
    std::thread::sleep(Duration::from_millis(500));
    let db_flow = |lab: &SvcLab| -> anyhow::Result<serde_json::Value> {
        let (code, v) = lab.json(&["flows", "--services"])?;
        assert_eq!(code, Some(0), "{v}");
        v["flows"]
            .as_array()
            .context("flows")?
            .iter()
            .find(|f| f["service"] == "db" && f["dport"] == 3306)
            .cloned()
            .with_context(|| format!("no flow of db: {v}"))
    };
    let first = db_flow(&lab)?;
    assert_eq!(first["rule"]["name"], "db-from-app", "{first}");
    let id = first["rule"]["id"].clone();
    // A rule ahead of db-from-app: the new policy gives db-from-app's id
    // to db-from-cache. No packet of the held connection after it.
    let renumbered = MATRIX.replace(
        "[[services.db.ingress]]\nname = \"db-from-app\"",
        "[[services.db.ingress]]\nname = \"db-from-cache\"\nfrom_services = [\"cache\"]\ntcp = [3306]\n[[services.db.ingress]]\nname = \"db-from-app\"",
    );
    assert_ne!(renumbered, MATRIX);
    let reload = |lab: &SvcLab, policy: &str| -> anyhow::Result<()> {
        std::fs::write(lab.state.join("roles.toml"), policy)?;
        let out = lab
            .segbpf(&["reload", "--services", "--cgroup-root", &root])
            .env("SEGBPF_HISTORY", "2")
            .output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    reload(&lab, &renumbered)?;
    let after = db_flow(&lab)?;
    assert_eq!(
        after["rule"]["name"], "db-from-app",
        "the flow judged by generation 1 names generation 2's rule {id}: {after}"
    );
    assert_eq!(after["judged_by_generation"], 1, "{after}");
    assert_eq!(after["peer_service"], "app", "{after}");
    // Two more reloads with a history of 2: generation 1 is not kept.
    reload(&lab, &renumbered)?;
    reload(&lab, &renumbered)?;
    let gone = db_flow(&lab)?;
    assert_eq!(gone["judged_by_generation"], 1, "{gone}");
    assert!(
        gone.get("rule").is_some_and(serde_json::Value::is_null),
        "generation 1 is no longer kept: {gone}"
    );
    let out = lab
        .segbpf(&["flows", "--services", "--cgroup-root", &root])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("service=db") && l.contains("rule of generation 1 (not kept)")),
        "{text} / {gone}"
    );
    // The connection itself still works under the new policy.
    {
        let c = held.child.as_mut().context("child")?;
        c.stdin.as_mut().context("stdin")?.write_all(b"g")?;
    }
    let line = read_line(&mut held)?;
    assert!(line.ends_with("ok"), "after the reloads: {line}");
    Ok(())
}

/// A bulk TCP stream between two services over loopback, both families:
/// nothing of it is dropped. Large GSO packets over `::1` carry a
/// Hop-by-Hop header the kernel adds, so the transport header is not
/// right after the fixed IPv6 header (an earlier parser took the
/// Hop-by-Hop header for the protocol and refused those segments: the
/// stream then crawled on retransmits).
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn bulk_stream_over_loopback_drops_nothing() -> anyhow::Result<()> {
    let policy = r#"version = 1
[services.app]
cgroup = "app"
defaults = { egress = "drop" }
[services.db]
cgroup = "db"
defaults = { ingress = "drop" }
[[services.app.egress]]
to_services = ["db"]
tcp = [5454]
[[services.db.ingress]]
from_services = ["app"]
tcp = [5454]
"#;
    let mut lab = SvcLab::new("bk", &["app", "db"], 93)?;
    let ns = lab.ns.name.clone();
    let _servers = [
        Helper::server(&lab.cg("db"), &ns, "serve-tcp-sink ::1 5454")?,
        Helper::server(&lab.cg("db"), &ns, "serve-tcp-sink 127.0.0.1 5454")?,
    ];
    lab.attach(policy)?;
    let dropped = |lab: &SvcLab| -> anyhow::Result<(u64, u64)> {
        let (_, v) = lab.json(&["status", "--services"])?;
        let svc = |name: &str, field: &str| {
            v["services"][0]["services"]
                .as_array()
                .and_then(|a| a.iter().find(|s| s["name"] == name))
                .and_then(|s| s["packets"][field].as_u64())
                .with_context(|| format!("{name}'s {field}: {v}"))
        };
        Ok((svc("app", "egress_dropped")?, svc("db", "ingress_dropped")?))
    };
    for to in ["::1 5454", "127.0.0.1 5454"] {
        let (ok, _) = Helper::run(&lab.cg("app"), &ns, &format!("bulk-tcp {to} 33554432"))?;
        assert!(ok, "32 MiB from app to db at {to}");
        assert_eq!(
            dropped(&lab)?,
            (0, 0),
            "no segment of the stream to {to} dropped (app egress, db ingress)"
        );
    }
    Ok(())
}

/// `explain --services --peer-service X` warns on stderr when an address
/// is not local to the host (a peer's service is known over loopback
/// only), and not when both are; the verdict is printed either way.
#[test]
fn explain_warns_of_a_peer_service_off_the_host() -> anyhow::Result<()> {
    // A directory of this test's own: the tests of a file run at once in
    // one process.
    let dir = std::env::temp_dir().join(format!("segbpf-svc-explain-warn-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let policy = dir.join("roles.toml");
    std::fs::write(&policy, MATRIX)?;
    let run = |src: &str, dst: &str| -> anyhow::Result<(bool, String)> {
        let out = Command::new(segbpf_bin())
            .args(["explain", policy.to_str().context("path")?])
            .args(["--services", "--service", "db", "--peer-service", "app"])
            .args([
                "--src", src, "--dst", dst, "--proto", "tcp", "--dport", "3306",
            ])
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let local = run("127.0.0.1", "127.0.0.1");
    // TEST-NET-1 (RFC 5737): on no host's interfaces.
    let remote = run("192.0.2.1", "127.0.0.1");
    let _ = std::fs::remove_dir_all(&dir);
    let (ok, err) = local?;
    assert!(ok && !err.contains("warning"), "loopback: {err}");
    let (ok, err) = remote?;
    assert!(
        ok && err.contains("warning") && err.contains("192.0.2.1") && !err.contains("127.0.0.1 "),
        "an address off the host: {err}"
    );
    Ok(())
}

/// `set`, `rollback`, `flows`, `monitor` and `reload` with `--services`
/// but without the `--cgroup-root` the attachment was made with fail
/// with the hint `status` gives (naming the root that has one) and leave
/// no file behind (no `.lock` of an attachment that does not exist).
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn services_commands_name_the_root_in_use() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("rt", &["app", "db", "other", "cache"], 106)?;
    lab.attach(MATRIX)?;
    let root = lab.root.to_string_lossy().to_string();
    let files = |lab: &SvcLab| -> anyhow::Result<Vec<String>> {
        let mut v: Vec<String> = std::fs::read_dir(&lab.state)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        Ok(v)
    };
    let before = files(&lab)?;
    let mut wrong = Vec::new();
    for args in [
        &["set", "add", "--services", "peers", "198.18.106.9"][..],
        &["set", "list", "--services"],
        &["rollback", "--services"],
        &["flows", "--services"],
        &["monitor", "--services"],
        &["reload", "--services"],
        &["detach", "--services"],
    ] {
        let out = lab.segbpf(args).output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !err.contains(&root) || !err.contains("--cgroup-root") {
            wrong.push(format!(
                "{args:?}: exit {:?}, stderr: {err}",
                out.status.code()
            ));
        }
    }
    let after = files(&lab)?;
    if before != after {
        wrong.push(format!(
            "files in the state dir changed: {before:?} -> {after:?}"
        ));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    Ok(())
}

/// The usage of `set add|del` shows the services form (no interface: the
/// first word is the set), which the interface form's `<IFACE>` hid.
#[test]
fn set_usage_shows_the_services_form() -> anyhow::Result<()> {
    for verb in ["add", "del"] {
        let out = Command::new(segbpf_bin())
            .args(["set", verb, "--help"])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let usage: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("Usage:"))
            .take_while(|l| !l.is_empty())
            .collect();
        assert!(
            out.status.success()
                && usage
                    .iter()
                    .any(|l| l.contains(&format!("set {verb} --services"))
                        && l.contains("<SET> <MEMBER>...")),
            "set {verb} --help: {usage:?}"
        );
    }
    Ok(())
}

/// Sends one byte to a `hold-tcp` helper: whether its next exchange on
/// the connection it holds worked.
fn hold_again(h: &mut Helper) -> anyhow::Result<bool> {
    let c = h.child.as_mut().context("child")?;
    c.stdin.as_mut().context("stdin")?.write_all(b"g")?;
    let out = c.stdout.as_mut().context("stdout")?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        out.read_exact(&mut byte)?;
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    Ok(line.ends_with(b"ok"))
}

const REVOKE: &str = r#"version = 1
[services.app]
cgroup = "app"
defaults = { egress = "drop" }
[services.db]
cgroup = "db"
[[services.app.egress]]
name = "app-out"
to = ["127.0.0.1", "::1", "198.18.114.2", "fd00:114::2"]
tcp = [3313, 3314]
[[services.db.ingress]]
name = "db-in"
from = ["198.18.114.2", "fd00:114::2"]
tcp = [3307, 3308]
"#;

/// A reload judges every established flow again at its next packet, as
/// the interface programs' reload prunes the connections the new policy
/// would not let open: flows app's egress opened over loopback and to
/// another host's address, and flows db received over an interface, both
/// families; each also with a server that speaks first, so that the
/// first packet after the reload is a reply. A reload that still allows
/// them lets them go on; one that no longer does cuts them.
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn reload_judges_every_flow_again() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("rv", &["app", "db", "none"], 111)?;
    let host = lab.ns.name.clone();
    // Another host: its own netns, joined by a veth.
    let peer = Netns::create(&format!("{host}-p"))?;
    lab.ns.ip(&[
        "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", &peer.name,
    ])?;
    lab.ns
        .ip(&["addr", "add", "198.18.114.1/24", "dev", "v0"])?;
    lab.ns
        .ip(&["addr", "add", "fd00:114::1/64", "dev", "v0", "nodad"])?;
    lab.ns.ip(&["link", "set", "v0", "up"])?;
    peer.ip(&["addr", "add", "198.18.114.2/24", "dev", "v1"])?;
    peer.ip(&["addr", "add", "fd00:114::2/64", "dev", "v1", "nodad"])?;
    peer.ip(&["link", "set", "v1", "up"])?;
    let mut servers = Vec::new();
    for a in ["127.0.0.1", "::1"] {
        servers.push(Helper::server(
            &lab.cg("none"),
            &host,
            &format!("serve-tcp-stream {a} 3313"),
        )?);
    }
    for a in ["198.18.114.2", "fd00:114::2"] {
        servers.push(Helper::server(
            &lab.cg("none"),
            &peer.name,
            &format!("serve-tcp-stream {a} 3313"),
        )?);
    }
    for a in ["198.18.114.1", "fd00:114::1"] {
        servers.push(Helper::server(
            &lab.cg("db"),
            &host,
            &format!("serve-tcp-stream {a} 3307"),
        )?);
        servers.push(Helper::server(
            &lab.cg("db"),
            &host,
            &format!("serve-tcp-tick {a} 3308"),
        )?);
    }
    // Servers that speak first: after a reload the first packet a
    // service's socket sees on the flow is a reply (app's ingress on
    // what its egress opened; db's egress on what it received).
    for a in ["127.0.0.1", "::1"] {
        servers.push(Helper::server(
            &lab.cg("none"),
            &host,
            &format!("serve-tcp-tick {a} 3314"),
        )?);
    }
    for a in ["198.18.114.2", "fd00:114::2"] {
        servers.push(Helper::server(
            &lab.cg("none"),
            &peer.name,
            &format!("serve-tcp-tick {a} 3314"),
        )?);
    }
    lab.attach(REVOKE)?;
    let mut held = Vec::new();
    for a in ["127.0.0.1", "::1", "198.18.114.2", "fd00:114::2"] {
        held.push((
            format!("app -> {a}:3313 (egress)"),
            Helper::server(&lab.cg("app"), &host, &format!("hold-tcp {a} 3313"))?,
        ));
    }
    for a in ["198.18.114.1", "fd00:114::1"] {
        held.push((
            format!("peer -> db {a}:3307 (received)"),
            Helper::server(&lab.cg("none"), &peer.name, &format!("hold-tcp {a} 3307"))?,
        ));
        held.push((
            format!("db's replies {a}:3308 -> peer (received)"),
            Helper::server(&lab.cg("none"), &peer.name, &format!("hold-ticks {a} 3308"))?,
        ));
    }
    for a in ["127.0.0.1", "::1", "198.18.114.2", "fd00:114::2"] {
        held.push((
            format!("replies {a}:3314 -> app (egress)"),
            Helper::server(&lab.cg("app"), &host, &format!("hold-ticks {a} 3314"))?,
        ));
    }
    let reload = |lab: &SvcLab, policy: &str| lab.reload(Some(policy));
    let mut wrong = Vec::new();
    // The same policy again: a new generation that allows every flow.
    reload(&lab, REVOKE)?;
    for (what, h) in &mut held {
        if !hold_again(h)? {
            wrong.push(format!("{what}: cut by a reload that allows it"));
        }
    }
    // Both rules now name another port: every flow is refused.
    reload(
        &lab,
        &REVOKE
            .replace("tcp = [3313, 3314]", "tcp = [3399]")
            .replace("tcp = [3307, 3308]", "tcp = [3398]"),
    )?;
    for (what, h) in &mut held {
        if hold_again(h)? {
            wrong.push(format!("{what}: goes on after a reload that refuses it"));
        }
    }
    drop(held);
    drop(servers);
    drop(peer);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    Ok(())
}

/// A reply on a flow app's egress allowed only `to_services = ["db"]`
/// must come from db: a process in no service, or another service, that
/// binds the port app sent to (db's listener is down, say restarting) and
/// sends to app's port is refused; db's own socket there is answered.
/// Both families.
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn to_services_replies_come_from_the_service() -> anyhow::Result<()> {
    let policy = concat!(
        include_str!("../fixtures/services_app_db_other.toml"),
        r#"[[services.app.egress]]
to_services = ["db"]
udp = [5000]
[[services.db.ingress]]
from_services = ["app"]
udp = [5000]
"#
    );
    let mut lab = SvcLab::new("sq", &["app", "db", "other", "none"], 112)?;
    let ns = lab.ns.name.clone();
    let _db = [
        Helper::server(&lab.cg("db"), &ns, "serve-udp 127.0.0.2 5000")?,
        Helper::server(&lab.cg("db"), &ns, "serve-udp fd00:112::1 5000")?,
    ];
    lab.attach(policy)?;
    let mut wrong = Vec::new();
    // db answers app (its replies name db).
    for a in ["127.0.0.2", "fd00:112::1"] {
        if !lab.udp("app", &format!("{a} 5000"))? {
            wrong.push(format!("app -> db {a}:5000: no answer"));
        }
    }
    let app = lab.cg("app").to_string_lossy().to_string();
    for a in ["127.0.0.1", "::1"] {
        for (squatter, want) in [("none", false), ("other", false), ("db", true)] {
            let sq = lab.cg(squatter).to_string_lossy().to_string();
            let (ok, out) = Helper::run(
                &lab.cg("none"),
                &ns,
                &format!("squat-udp {app} {sq} {a} 5000"),
            )?;
            let got = out.contains("got=1");
            if !ok || got != want {
                wrong.push(format!(
                    "{squatter} bound to {a}:5000 answering app: got {got}, want {want} ({out})"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    Ok(())
}

/// Sockets in LAST-ACK in the lab's namespace matching the `ss` filter
/// `filter` (`sport = :3306`).
fn last_acks(lab: &SvcLab, filter: &str) -> anyhow::Result<usize> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns.name,
            "ss",
            "-Htan",
            "state",
            "last-ack",
        ])
        .arg(format!("( {filter} )"))
        .output()?;
    if !out.status.success() {
        bail!("ss: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count())
}

/// The sockets in LAST-ACK matching `filter` once none is left or 30 s
/// have passed (a FIN whose ACK is dropped is retransmitted for minutes;
/// on a loaded machine the last closes take a moment).
fn last_acks_after(lab: &SvcLab, filter: &str) -> anyhow::Result<usize> {
    // A FIN whose ACK was lost (a loaded machine) is sent again after
    // 0.2, 0.4, 0.8 ... s: 30 s covers seven of them, while an ACK the
    // program refuses leaves the socket in LAST-ACK for minutes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = last_acks(lab, filter)?;
        if n == 0 || Instant::now() > deadline {
            return Ok(n);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A client that closes first leaves its side in TIME_WAIT; the kernel
/// acknowledges the server's FIN from its control socket, without app's
/// stamp. db's ingress takes that bare ACK on the flow it received from
/// app, so the server's socket closes: 200 connections leave no socket in
/// LAST-ACK. Both families; and the same for app's sockets when db closes
/// first on a `to_services` flow (whose replies must carry db's stamp).
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn client_closing_first_leaves_no_last_ack() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("la", &["app", "db"], 113)?;
    let ns = lab.ns.name.clone();
    let db = [
        Helper::server(&lab.cg("db"), &ns, "serve-tcp-close-late 127.0.0.1 3306")?,
        Helper::server(&lab.cg("db"), &ns, "serve-tcp-close-late ::1 3306")?,
    ];
    lab.attach(MATRIX)?;
    for a in ["127.0.0.1", "::1"] {
        let (ok, out) = Helper::run(&lab.cg("app"), &ns, &format!("close-first {a} 3306 200"))?;
        assert!(ok && out.contains("ok=200"), "app -> db {a}: {out}");
    }
    // The server closes 300 ms after each answer; its FIN is acknowledged
    // at once if the ACK passes, and retransmitted for minutes if not.
    let left = last_acks_after(&lab, "sport = :3306")?;
    assert_eq!(left, 0, "sockets left in LAST-ACK on db's port 3306");
    drop(db);
    drop(lab);
    // The other way round, on a flow app opened through `to_services`
    // (whose replies must carry db's stamp): db closes first, app 300 ms
    // later; the kernel's ACK for db's closed socket reaches app's.
    let policy = r#"version = 1
[services.app]
cgroup = "app"
defaults = { egress = "drop" }
[services.db]
cgroup = "db"
[[services.db.ingress]]
from_services = ["app"]
tcp = [3306]
[[services.app.egress]]
to_services = ["db"]
tcp = [3306]
"#;
    let mut lab = SvcLab::new("lb", &["app", "db"], 115)?;
    let ns = lab.ns.name.clone();
    let _db = [
        Helper::server(&lab.cg("db"), &ns, "serve-tcp-close-first 127.0.0.1 3306")?,
        Helper::server(&lab.cg("db"), &ns, "serve-tcp-close-first ::1 3306")?,
    ];
    lab.attach(policy)?;
    for a in ["127.0.0.1", "::1"] {
        let (ok, out) = Helper::run(&lab.cg("app"), &ns, &format!("close-late {a} 3306 200"))?;
        assert!(ok && out.contains("ok=200"), "app -> db {a}: {out}");
    }
    let left = last_acks_after(&lab, "dport = :3306")?;
    assert_eq!(
        left, 0,
        "app's sockets left in LAST-ACK towards db's port 3306"
    );
    Ok(())
}

/// A second set of pin and state roots for the same machine (another
/// operator's, or a test's): `detach --services --cgroup-root DIR` with
/// them when dropped, then their directories removed.
struct OtherRoots {
    bpffs: PathBuf,
    state: PathBuf,
    detach: Vec<PathBuf>,
}

impl OtherRoots {
    fn new(lab: &SvcLab) -> anyhow::Result<Self> {
        let o = OtherRoots {
            bpffs: PathBuf::from(format!("{}-2", lab.bpffs.display())),
            state: PathBuf::from(format!("{}-2", lab.state.display())),
            detach: Vec::new(),
        };
        std::fs::create_dir_all(&o.state)?;
        Ok(o)
    }

    fn segbpf(&self, args: &[&str]) -> Command {
        let mut c = Command::new(segbpf_bin());
        c.args(args)
            .env("SEGBPF_BPFFS", &self.bpffs)
            .env("SEGBPF_STATE_DIR", &self.state);
        c
    }
}

impl Drop for OtherRoots {
    fn drop(&mut self) {
        for d in &self.detach {
            let _ = self
                .segbpf(&["detach", "--services", "--cgroup-root"])
                .arg(d)
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// `attach --services --no-wait` below `root` with `cmd`'s roots: its
/// exit status and stderr; the follower it leaves is ended by PID.
fn attach_no_wait(
    mut cmd: Command,
    policy: &Path,
    root: &Path,
) -> anyhow::Result<(bool, String, Option<Kill>)> {
    let out = cmd
        .args(["attach", "--services", "--no-wait", "--policy"])
        .arg(policy)
        .arg("--cgroup-root")
        .arg(root)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let kill = follower_named(&err).map(Kill);
    Ok((out.status.success(), err, kill))
}

/// Services attachments never nest (they would overwrite each other's
/// sender stamps, and `to_services` would fail open): `attach --services`
/// refuses a root below or above a live attachment's, naming it, whatever
/// pin and state roots either uses (liveness from the kernel: a live
/// attachment whose state file is gone still counts, a state file left
/// by a detached one does not).
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn nested_attachments_are_refused() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("nest", &["app", "inner/a", "inner/b"], 121)?;
    let mut other = OtherRoots::new(&lab)?;
    let inner = lab.cg("inner");
    other.detach.push(inner.clone());
    let inner_policy = other.state.join("inner.toml");
    std::fs::write(
        &inner_policy,
        "version = 1\n[services.a]\ncgroup = \"a\"\ndefaults = { egress = \"drop\" }\n[[services.a.egress]]\nto_services = [\"b\"]\nudp = [4445]\n[services.b]\ncgroup = \"b\"\n",
    )?;
    // An outer attachment at the lab's root: an inner one is refused.
    lab.attach(MATRIX)?;
    let (ok, err, _k) = attach_no_wait(other.segbpf(&[]), &inner_policy, &inner)?;
    assert!(!ok, "a nested attach below a live one was accepted: {err}");
    assert!(
        err.contains(&lab.root.display().to_string()) && err.contains("nest"),
        "{err}"
    );
    assert!(other_links(&other).is_empty());
    // Review 10 L-c: a refused attach leaves nothing behind, not even the
    // pin root (SEGBPF_BPFFS) it made for its lock.
    assert!(
        !other.bpffs.exists(),
        "a refused attach left the pin root {}",
        other.bpffs.display()
    );
    // Nor can a reload make one: it applies to an attachment at its root.
    let out = other
        .segbpf(&["reload", "--services", "--cgroup-root"])
        .arg(&inner)
        .arg("--policy")
        .arg(&inner_policy)
        .output()?;
    assert!(!out.status.success());
    assert!(other_links(&other).is_empty());
    assert!(!other.bpffs.exists(), "a refused reload left the pin root");
    // The other way round: the inner one live (its state file removed),
    // the outer one is refused.
    lab.detach()?;
    if let Some(mut c) = lab.attach.take() {
        let _ = c.wait();
    }
    let (ok, err, _k_inner) = attach_no_wait(other.segbpf(&[]), &inner_policy, &inner)?;
    assert!(ok, "{err}");
    let inner_state: Vec<PathBuf> = std::fs::read_dir(&other.state)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    let saved: Vec<(PathBuf, Vec<u8>)> = inner_state
        .iter()
        .map(|p| Ok((p.clone(), std::fs::read(p)?)))
        .collect::<anyhow::Result<_>>()?;
    for p in &inner_state {
        std::fs::remove_file(p)?;
    }
    let outer_policy = lab.state.join("roles.toml");
    let (ok, err, _k) = attach_no_wait(lab.segbpf(&[]), &outer_policy, &lab.root)?;
    assert!(!ok, "an attach above a live one was accepted: {err}");
    assert!(
        err.contains(&inner.display().to_string()) && err.contains("nest"),
        "{err}"
    );
    // The inner one detached, its state file left behind (and a copy in
    // the outer's state directory): nothing blocks the outer one.
    for (p, _) in &saved {
        let _ = std::fs::write(p, b"{}");
    }
    let out = other
        .segbpf(&["detach", "--services", "--cgroup-root"])
        .arg(&inner)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (p, body) in &saved {
        std::fs::write(p, body)?;
        if let Some(name) = p.file_name() {
            std::fs::write(lab.state.join(name), body)?;
        }
    }
    let (ok, err, _k_outer) = attach_no_wait(lab.segbpf(&[]), &outer_policy, &lab.root)?;
    assert!(ok, "a stale state file blocked the attach: {err}");
    Ok(())
}

/// `sh -c` script: moves itself into the cgroup `$1`, enters a cgroup
/// namespace rooted there and a mount namespace of its own, mounts
/// cgroup2 at `$2` (showing the namespace's root as `/`, as in a
/// container) and runs the rest of its arguments.
const IN_CGROUP_NS: &str = r#"echo 0 > "$1/cgroup.procs" && exec unshare -Cm sh -c 'umount -l "$2" && mount -t cgroup2 cgroup2 "$2" && shift 2 && exec "$@"' sh "$@""#;

/// An attach from inside a cgroup namespace (`unshare -C`, as container
/// runtimes make one) sees the namespace's root as the cgroup v2 root:
/// it finds that root's absolute level from the kernel and enforces at
/// the kernel's levels (a process in no service cannot reach `b`), and it
/// is refused while another attachment lives above the namespace's root,
/// which it cannot see by path (found by the kernel's cgroup links).
#[test]
#[ignore = "needs root, cgroup v2, unshare and a kernel with BPF: run `cargo xtask test`"]
fn attach_inside_a_cgroup_namespace() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("cgns", &["app", "inner/a", "inner/b", "inner/c"], 131)?;
    let mut other = OtherRoots::new(&lab)?;
    let inner = lab.cg("inner");
    other.detach.push(inner.clone());
    let policy = other.state.join("inner.toml");
    std::fs::write(
        &policy,
        "version = 1\n[services.a]\ncgroup = \"a\"\n[services.b]\ncgroup = \"b\"\ndefaults = { ingress = \"drop\" }\n[[services.b.ingress]]\nfrom_services = [\"a\"]\ntcp = [3306]\n",
    )?;
    let mount = cgroup2_mount()?;
    let in_ns = || {
        let mut c = other.segbpf(&[]);
        let bin = c.get_program().to_owned();
        let mut sh = Command::new("sh");
        sh.args(["-c", IN_CGROUP_NS, "sh"])
            .arg(&inner)
            .arg(&mount)
            .arg(bin)
            .envs(
                c.get_envs()
                    .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))),
            );
        let _ = &mut c;
        sh
    };
    // An attachment above the namespace's root: refused from inside.
    lab.attach(MATRIX)?;
    let (ok, err, _k) = attach_no_wait(in_ns(), &policy, &mount)?;
    assert!(
        !ok,
        "an attach below a live one (seen from a cgroup namespace) was accepted: {err}"
    );
    assert!(
        err.contains("nest") && err.contains("outside this cgroup namespace"),
        "{err}"
    );
    assert!(other_links(&other).is_empty());
    lab.detach()?;
    if let Some(mut c) = lab.attach.take() {
        let _ = c.wait();
    }
    // Nothing above: enforced from inside, at the kernel's levels.
    let (ok, err, _k_inner) = attach_no_wait(in_ns(), &policy, &mount)?;
    assert!(ok, "{err}");
    let ns = lab.ns.name.clone();
    let _b = Helper::server(&lab.cg("inner/b"), &ns, "serve-tcp 127.0.0.1 3306")?;
    assert!(lab.connect("inner/a", "127.0.0.1 3306")?, "a reaches b");
    assert!(
        !lab.connect("inner/c", "127.0.0.1 3306")?,
        "c (in no service) is refused by b"
    );
    Ok(())
}

/// The pinned links under `other`'s pin root.
fn other_links(other: &OtherRoots) -> Vec<PathBuf> {
    std::fs::read_dir(&other.bpffs)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path().join("link_svc_ingress"))
                .filter(|p| p.exists())
                .collect()
        })
        .unwrap_or_default()
}

/// The services programs read a socket's cgroup ancestors down to level
/// 16 of the hierarchy: a service deeper than that is refused by `check`
/// (below the default root), `attach` and `reload` (below theirs), with
/// file, line and field, and a refused reload leaves the policy in force.
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn services_below_the_programs_reach_are_refused() -> anyhow::Result<()> {
    let lab = SvcLab::new("deep", &["other"], 122)?;
    let root_level = lab
        .root
        .strip_prefix(cgroup2_mount()?)?
        .components()
        .count();
    assert_eq!(root_level, 1, "the lab's root is one level below the mount");
    let policy = |depth: usize| {
        let path: Vec<String> = (1..=depth).map(|i| format!("l{i}")).collect();
        format!(
            "version = 1\n[services.deep]\ncgroup = \"{}\"\n[services.other]\ncgroup = \"other\"\n",
            path.join("/")
        )
    };
    let file = |name: &str, depth: usize| -> anyhow::Result<PathBuf> {
        let p = lab.state.join(name);
        std::fs::write(&p, policy(depth))?;
        Ok(p)
    };
    // check: below the default root (level 0), 16 levels fit, 17 do not.
    let ok16 = file("ok16.toml", 16)?;
    let deep17 = file("deep17.toml", 17)?;
    let out = lab.segbpf(&["check"]).arg(&ok16).output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = lab.segbpf(&["check"]).arg(&deep17).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("deep17.toml:3:") && err.contains("services.deep.cgroup"),
        "{err}"
    );
    // attach below the lab's root (level 1): 16 below it is level 17.
    let (ok, err, _k) = attach_no_wait(lab.segbpf(&[]), &ok16, &lab.root)?;
    assert!(!ok, "a service at level 17 was attached: {err}");
    assert!(
        err.contains("ok16.toml:3:") && err.contains("services.deep.cgroup"),
        "{err}"
    );
    assert!(!lab.bpffs.exists() || std::fs::read_dir(&lab.bpffs)?.next().is_none());
    let ok15 = file("ok15.toml", 15)?;
    let (ok, err, _k) = attach_no_wait(lab.segbpf(&[]), &ok15, &lab.root)?;
    assert!(ok, "{err}");
    // reload to the deeper one: refused, generation 1 stays.
    let root = lab.root.to_string_lossy().to_string();
    let out = lab
        .segbpf(&["reload", "--services", "--cgroup-root", &root, "--policy"])
        .arg(&ok16)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("services.deep.cgroup"), "{err}");
    let out = lab
        .segbpf(&["status", "--services", "--cgroup-root", &root, "-o", "json"])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["services"][0]["generation"], 1, "{v}");
    assert_eq!(v["services"][0]["services"][0]["enforceable"], true, "{v}");
    Ok(())
}

/// `status --services` says whether a follower runs (from the kernel's
/// lock table) and that new cgroups are held while none does; a
/// foreground attach that leaves says what it leaves behind; audit mode
/// reads "auditing", not "enforcing".
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn status_says_whether_a_follower_runs() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("fol", &["app", "db", "other", "cache"], 123)?;
    let root = lab.root.to_string_lossy().to_string();
    let status = |lab: &SvcLab| -> anyhow::Result<(serde_json::Value, String)> {
        let j = lab
            .segbpf(&["status", "--services", "--cgroup-root", &root, "-o", "json"])
            .output()?;
        let t = lab
            .segbpf(&["status", "--services", "--cgroup-root", &root])
            .output()?;
        Ok((
            serde_json::from_slice(&j.stdout)?,
            String::from_utf8_lossy(&t.stdout).into_owned(),
        ))
    };
    lab.attach(MATRIX)?;
    let pid = lab.attach.as_ref().context("attach")?.id();
    // The foreground attach claims the follower lock just after it enforces.
    let start = Instant::now();
    let (mut j, mut t) = status(&lab)?;
    while j["services"][0]["follower_running"] != true && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
        (j, t) = status(&lab)?;
    }
    assert_eq!(j["services"][0]["follower_running"], true, "{j}");
    assert_eq!(j["services"][0]["follower_pid"], pid, "{j}");
    assert!(t.contains(&format!("follower: process {pid}")), "{t}");
    // Ctrl-C: enforcement stays, nothing follows; both said.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )?;
    let _ = lab.attach.take().map(|mut c| c.wait());
    let log = std::fs::read_to_string(lab.state.join("attach.log"))?;
    assert!(log.contains("no process follows the cgroup tree"), "{log}");
    let (j, t) = status(&lab)?;
    assert_eq!(j["services"][0]["follower_running"], false, "{j}");
    assert!(
        t.contains("enforcing") && t.contains("follower: NONE") && t.contains("held"),
        "{t}"
    );
    // Audit mode, with a follower again (`--no-wait` leaves one).
    let policy = lab.state.join("roles.toml");
    let (_, _k) = lab.attach_follower(&policy, &["--audit"])?;
    let start = Instant::now();
    let (mut j, mut t) = status(&lab)?;
    while j["services"][0]["follower_running"] != true && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
        (j, t) = status(&lab)?;
    }
    assert_eq!(j["services"][0]["audit"], true, "{j}");
    assert_eq!(j["services"][0]["follower_running"], true, "{j}");
    assert!(
        t.contains("auditing (audit mode: nothing is dropped)"),
        "{t}"
    );
    assert!(!t.contains("enforcing"), "{t}");
    Ok(())
}

/// The background follower's log is capped: past the cap
/// (`SEGBPF_FOLLOW_LOG_MAX`, 1 MiB by default) it is rotated to `.1`,
/// however fast the cgroup tree churns.
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn follower_log_is_capped() -> anyhow::Result<()> {
    let lab = SvcLab::new("log", &["app", "db", "other", "cache"], 124)?;
    let policy = lab.state.join("roles.toml");
    std::fs::write(&policy, MATRIX)?;
    let mut cmd = lab.segbpf(&[]);
    cmd.env("SEGBPF_FOLLOW_LOG_MAX", "2048");
    let (ok, err, _k) = attach_no_wait(cmd, &policy, &lab.root)?;
    assert!(ok, "{err}");
    let log = err
        .split("(log: ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .map(PathBuf::from)
        .with_context(|| format!("no log in: {err}"))?;
    // Cgroups made and removed below the root (a guard): a line each.
    for i in 0..150 {
        let d = lab.cg(&format!("churn{i}"));
        std::fs::create_dir(&d)?;
        std::thread::sleep(Duration::from_millis(15));
        remove_cgroups(&d);
        std::thread::sleep(Duration::from_millis(15));
    }
    std::thread::sleep(Duration::from_millis(500));
    let size = std::fs::metadata(&log)?.len();
    let mut old = log.clone().into_os_string();
    old.push(".1");
    let old_size = std::fs::metadata(&old).map_or(0, |m| m.len());
    assert!(
        old_size > 0,
        "the log was never rotated (it holds {size} bytes)"
    );
    assert!(
        size < 2048 + 1024 && old_size < 2048 + 1024,
        "{size} and {old_size} bytes"
    );
    Ok(())
}

/// `explain` judges app's egress to a `to_services` destination as the
/// live egress program does (and `trace` says): it leaves, and the
/// receiver decides; without `--peer-service` too.
#[test]
#[ignore = "needs the segbpf binary: run `cargo xtask test`"]
fn explain_egress_to_services_as_the_live_program() -> anyhow::Result<()> {
    let dir =
        std::env::temp_dir().join(format!("segbpf-svc-explain-egress-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let policy = dir.join("roles.toml");
    std::fs::write(
        &policy,
        concat!(
            include_str!("../fixtures/services_app_db_other.toml"),
            "[[services.app.egress]]\nto_services = [\"db\"]\ntcp = [5000]\n"
        ),
    )?;
    let explain = |extra: &[&str]| -> anyhow::Result<(String, serde_json::Value)> {
        let mut args = svc_loopback_tcp(
            &["explain", policy.to_str().context("policy")?],
            "app",
            "egress",
            "5000",
        );
        args.extend_from_slice(extra);
        let text = Command::new(segbpf_bin()).args(&args).output()?;
        args.extend_from_slice(&["-o", "json"]);
        let json = Command::new(segbpf_bin()).args(&args).output()?;
        Ok((
            String::from_utf8_lossy(&text.stdout).into_owned(),
            serde_json::from_slice(&json.stdout).unwrap_or_default(),
        ))
    };
    let result = (|| -> anyhow::Result<()> {
        for extra in [
            &[][..],
            &["--peer-service", "db"],
            &["--peer-service", "other"],
        ] {
            let (t, j) = explain(extra)?;
            anyhow::ensure!(j["verdict"] == "allow", "{extra:?}: {j}");
            anyhow::ensure!(j["receiver_must_be"] == serde_json::json!(["db"]), "{j}");
            anyhow::ensure!(t.contains("the receiver's ingress drops it unless"), "{t}");
        }
        let (t, _) = explain(&["--peer-service", "other"])?;
        anyhow::ensure!(t.contains("other is not: dropped there"), "{t}");
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The PID holding the `flock` on the follower claim of the lab's
/// attachment, from the kernel's lock table (`/proc/locks`).
fn claim_holder(lab: &SvcLab) -> Option<i32> {
    use std::os::unix::fs::MetadataExt as _;
    let file = std::fs::read_dir(&lab.state)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".follow.lock"))?;
    let meta = std::fs::metadata(file).ok()?;
    let want = format!(
        "{:02x}:{:02x}:{}",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    std::fs::read_to_string("/proc/locks")
        .ok()?
        .lines()
        .find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.get(1) == Some(&"FLOCK") && w.get(5) == Some(&want.as_str()))
                .then(|| w.get(4)?.parse().ok())
                .flatten()
        })
}

/// Rounds of two or three `attach --services --no-wait` of one root at
/// once (the first a fresh attach; then with the follower killed before,
/// or alive): after each, exactly one follower lives, it holds the claim
/// in the kernel, every command names it, and it classifies a cgroup made
/// after the race (app, re-created, reaches db).
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn concurrent_no_wait_leave_one_named_follower() -> anyhow::Result<()> {
    let lab = SvcLab::new("nr", &["app", "db", "other", "stage"], 107)?;
    let ns = lab.ns.name.clone();
    let _db = Helper::server(&lab.cg("db"), &ns, "serve-udp 127.0.0.1 3306")?;
    std::fs::write(lab.state.join("roles.toml"), MATRIX)?;
    let root = lab.root.to_string_lossy().to_string();
    let attach = |lab: &SvcLab| -> anyhow::Result<Child> {
        Ok(lab
            .segbpf(&[
                "attach",
                "--services",
                "--no-wait",
                "--policy",
                "roles.toml",
                "--cgroup-root",
                &root,
            ])
            .current_dir(&lab.state)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?)
    };
    let named = follower_named;
    // Followers are ended by PID whatever happens.
    let mut kills: Vec<Kill> = Vec::new();
    let mut wrong = Vec::new();
    for round in 0..4 {
        if round == 2 {
            // The follower is gone: the next ones race for the claim.
            let before = followers_of(&lab);
            for p in &before {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let start = Instant::now();
            while !followers_of(&lab).is_empty() && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let n = if round % 2 == 0 { 3 } else { 2 };
        let children: Vec<Child> = (0..n).map(|_| attach(&lab)).collect::<Result<_, _>>()?;
        let outs: Vec<_> = children
            .into_iter()
            .map(Child::wait_with_output)
            .collect::<Result<_, _>>()?;
        // Losers leave at once; give them the time to.
        let start = Instant::now();
        while followers_of(&lab).len() > 1 && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(300));
        let live = followers_of(&lab);
        kills.extend(live.iter().map(|p| Kill(*p)));
        let holder = claim_holder(&lab);
        if live.len() != 1 || holder != live.first().copied() {
            wrong.push(format!(
                "round {round}: live followers {live:?}, claim held by {holder:?}"
            ));
        }
        for out in &outs {
            let log = String::from_utf8_lossy(&out.stderr);
            let pid = named(&log);
            if !out.status.success() || pid.is_none() || pid != holder {
                wrong.push(format!(
                    "round {round}: {} named {pid:?}, live followers {live:?}: {log}",
                    out.status
                ));
            }
        }
        // A cgroup made after the race is classified: app reaches db.
        remove_cgroups(&lab.cg("app"));
        std::fs::create_dir(lab.cg("app"))?;
        let prober = prober_in(&lab, "app", "127.0.0.1 3306")?;
        std::thread::sleep(Duration::from_millis(300));
        let (ok, _, _) = finish(prober)?;
        if ok == 0 {
            wrong.push(format!(
                "round {round}: the re-created app was not classified"
            ));
        }
    }
    if !wrong.is_empty() {
        for e in std::fs::read_dir(&lab.state)?.flatten() {
            if e.file_name().to_string_lossy().ends_with("follow.log") {
                wrong.push(std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
    }
    drop(kills);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    Ok(())
}

/// A connection only audit mode let through (db's rules refuse it) is cut
/// when enforcement starts, also when db has answered on it: the answers
/// are replies on the refused flow, not a flow db opened (which the
/// switch to enforcement would have kept open).
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn audited_flows_are_cut_when_enforcement_starts() -> anyhow::Result<()> {
    let policy = r#"version = 1
[services.db]
cgroup = "db"
defaults = { ingress = "drop" }
"#;
    let mut lab = SvcLab::new("au", &["db", "none"], 116)?;
    let ns = lab.ns.name.clone();
    let _db = Helper::server(&lab.cg("db"), &ns, "serve-tcp-stream 127.0.0.1 3306")?;
    lab.attach_with(policy, &["--audit"])?;
    // `server` waits for "ready": the connection's first exchange worked.
    let mut held = Helper::server(&lab.cg("none"), &ns, "hold-tcp 127.0.0.1 3306")?;
    assert!(
        hold_again(&mut held)?,
        "audit mode passes its exchanges, db answering"
    );
    // `flows --services` lists the flow as audit mode's, not as allowed.
    let port_3306 = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        v["flows"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| f["dport"] == 3306)
            .cloned()
            .collect()
    };
    let (_, v) = lab.json(&["flows", "--services"])?;
    let listed = port_3306(&v);
    assert!(!listed.is_empty(), "{v}");
    assert!(listed.iter().all(|f| f["audit"] == true), "{v}");
    // Enforcement: the same policy attached again without --audit.
    let path = lab.state.join("roles.toml");
    let (_, _k) = lab.attach_follower(&path, &[])?;
    let (_, v) = lab.json(&["status", "--services"])?;
    assert_eq!(v["services"][0]["audit"], false, "{v}");
    assert!(
        !hold_again(&mut held)?,
        "the audited connection is cut once the policy is enforced"
    );
    // ... and no longer listed as a flow (outside review 14: it stayed,
    // reading as allowed by a default).
    let (_, v) = lab.json(&["flows", "--services"])?;
    assert!(port_3306(&v).is_empty(), "{v}");
    assert!(
        !lab.connect("none", "127.0.0.1 3306")?,
        "and a new one is refused"
    );
    Ok(())
}

/// Two attaches at nested roots started at the same moment, each with its
/// own pin and state roots: exactly one of them enforces (the nesting
/// check and the attach are one step for all segbpf processes of the
/// machine, not only for those sharing a state directory).
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn nested_attaches_at_once_leave_one() -> anyhow::Result<()> {
    let lab = SvcLab::new("nrace", &["app", "inner/a", "inner/b"], 122)?;
    let mut other = OtherRoots::new(&lab)?;
    let inner = lab.cg("inner");
    other.detach.push(inner.clone());
    let inner_policy = other.state.join("inner.toml");
    std::fs::write(
        &inner_policy,
        "version = 1\n[services.a]\ncgroup = \"a\"\n[services.b]\ncgroup = \"b\"\n",
    )?;
    let outer_policy = lab.state.join("roles.toml");
    std::fs::write(&outer_policy, MATRIX)?;
    for round in 0..4 {
        let (c1, c2) = (lab.segbpf(&[]), other.segbpf(&[]));
        let (p1, r1) = (outer_policy.clone(), lab.root.clone());
        let (p2, r2) = (inner_policy.clone(), inner.clone());
        let t1 = std::thread::spawn(move || attach_no_wait(c1, &p1, &r1));
        let t2 = std::thread::spawn(move || attach_no_wait(c2, &p2, &r2));
        let (ok1, err1, _k1) = t1.join().map_err(|_| anyhow::anyhow!("thread"))??;
        let (ok2, err2, _k2) = t2.join().map_err(|_| anyhow::anyhow!("thread"))??;
        assert!(
            ok1 != ok2,
            "round {round}: exactly one of two nested attaches may enforce: outer {ok1} ({err1}), inner {ok2} ({err2})"
        );
        let loser = if ok1 { &err2 } else { &err1 };
        assert!(loser.contains("nest"), "round {round}: {loser}");
        for (cmd, root) in [(lab.segbpf(&[]), &lab.root), (other.segbpf(&[]), &inner)] {
            let mut cmd = cmd;
            let _ = cmd
                .args(["detach", "--services", "--cgroup-root"])
                .arg(root)
                .output()?;
        }
    }
    Ok(())
}

/// The cgroup root removed and made again (a container runtime restarting
/// a container's cgroup): the programs were attached to the cgroup that is
/// gone, so nothing below the new one is enforced. The follower must not
/// go on writing entries for the new tree as if it were enforced: it stops
/// and says why (exit 1).
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn follower_stops_when_its_root_is_removed() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("rg", &["app", "db"], 117)?;
    lab.attach(MATRIX)?;
    remove_cgroups(&lab.root);
    anyhow::ensure!(!lab.root.exists(), "the test could not remove its root");
    std::fs::create_dir_all(lab.root.join("app"))?;
    let start = Instant::now();
    let status = loop {
        if let Some(st) = lab
            .attach
            .as_mut()
            .map(Child::try_wait)
            .transpose()?
            .flatten()
        {
            break Some(st);
        }
        if start.elapsed() > Duration::from_secs(5) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(lab.state.join("attach.log"))?;
    assert!(
        status.is_some_and(|s| !s.success()),
        "the follower of a removed root goes on ({status:?}): {log}"
    );
    assert!(log.contains("was removed"), "{log}");
    lab.attach = None;
    Ok(())
}

/// `sh -c` script: in a mount namespace of its own, bind-mounts the
/// cgroup `$1` (a subtree) at `$3`, unmounts the cgroup v2 mount `$2` and
/// moves the subtree mount there (as a container runtime gives a container
/// its cgroup subtree: the only cgroup2 mount it sees), then runs the rest
/// of its arguments.
const IN_SUBTREE_MOUNT: &str = r#"exec unshare -m sh -c 'mount --bind "$1" "$3" && umount -l "$2" && mount --move "$3" "$2" && shift 3 && exec "$@"' sh "$@""#;

/// `other`'s segbpf run through the `sh -c` script `script` with `args`
/// before the binary (its environment kept).
fn wrapped(other: &OtherRoots, script: &str, args: &[&std::ffi::OsStr]) -> Command {
    let c = other.segbpf(&[]);
    let mut sh = Command::new("sh");
    sh.args(["-c", script, "sh"])
        .args(args)
        .arg(c.get_program())
        .envs(
            c.get_envs()
                .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))),
        );
    sh
}

/// Review 6: the attach lock is a file of one cgroup namespace and mount,
/// so an attach from inside a cgroup namespace (cgroup2 mounted at its
/// root) and one on the host at an ancestor could both pass the nesting
/// check. Each attach compares the kernel's links once its own exist:
/// started together, never both enforce (both may back off, with an
/// error saying so), and an attach afterwards succeeds.
#[test]
#[ignore = "needs root, cgroup v2, unshare and a kernel with BPF: run `cargo xtask test`"]
fn nested_attaches_across_cgroup_namespaces_never_both_enforce() -> anyhow::Result<()> {
    let lab = SvcLab::new("nsrace", &["app", "inner/a", "inner/b"], 124)?;
    let mut other = OtherRoots::new(&lab)?;
    let inner = lab.cg("inner");
    other.detach.push(inner.clone());
    let inner_policy = other.state.join("inner.toml");
    std::fs::write(
        &inner_policy,
        "version = 1\n[services.a]\ncgroup = \"a\"\n[services.b]\ncgroup = \"b\"\n",
    )?;
    let outer_policy = lab.state.join("roles.toml");
    std::fs::write(&outer_policy, MATRIX)?;
    let mount = cgroup2_mount()?;
    let rounds = 8;
    let (mut both, mut none) = (0, 0);
    for round in 0..rounds {
        let c1 = lab.segbpf(&[]);
        let c2 = wrapped(
            &other,
            IN_CGROUP_NS,
            &[inner.as_os_str(), mount.as_os_str()],
        );
        let (p1, r1) = (outer_policy.clone(), lab.root.clone());
        let (p2, r2) = (inner_policy.clone(), mount.clone());
        // The in-namespace attach first runs the level probe: the host's
        // start is staggered over the rounds to sweep the window.
        let delay = Duration::from_millis(60 * round);
        let t2 = std::thread::spawn(move || attach_no_wait(c2, &p2, &r2));
        std::thread::sleep(delay);
        let t1 = std::thread::spawn(move || attach_no_wait(c1, &p1, &r1));
        let (ok1, err1, _k1) = t1.join().map_err(|_| anyhow::anyhow!("thread"))??;
        let (ok2, err2, _k2) = t2.join().map_err(|_| anyhow::anyhow!("thread"))??;
        let undone = [&err1, &err2]
            .iter()
            .filter(|e| e.contains("was undone"))
            .count();
        eprintln!("round {round}: host {ok1}, in namespace {ok2}, undone after attaching {undone}");
        if ok1 && ok2 {
            both += 1;
        }
        if !ok1 && !ok2 {
            none += 1;
        }
        for (ok, err) in [(ok1, &err1), (ok2, &err2)] {
            assert!(ok || err.contains("nest"), "round {round}: {err}");
        }
        for (cmd, root) in [(lab.segbpf(&[]), &lab.root), (other.segbpf(&[]), &inner)] {
            let mut cmd = cmd;
            let _ = cmd
                .args(["detach", "--services", "--cgroup-root"])
                .arg(root)
                .output()?;
        }
    }
    eprintln!("{rounds} rounds: both enforcing {both}, both backed off {none}");
    assert_eq!(
        both, 0,
        "nested attaches from two cgroup namespaces both enforced in {both} of {rounds} rounds"
    );
    // Backing off leaves nothing behind: an attach now enforces.
    let (ok, err, _k) = attach_no_wait(lab.segbpf(&[]), &outer_policy, &lab.root)?;
    assert!(ok, "{err}");
    Ok(())
}

/// Review 6: through a cgroup2 mount of a subtree (a bind mount, the only
/// cgroup2 mount a container may see) the path walk to the ancestors ends
/// at the mount, so an attachment above it was not seen. The kernel's
/// links are compared with the root's ancestors: refused, nothing left;
/// with nothing above, the same attach enforces.
#[test]
#[ignore = "needs root, cgroup v2, unshare and a kernel with BPF: run `cargo xtask test`"]
fn nesting_through_a_subtree_mount_is_refused() -> anyhow::Result<()> {
    let mut lab = SvcLab::new("bind", &["app", "inner/a", "inner/b"], 125)?;
    let mut other = OtherRoots::new(&lab)?;
    let inner = lab.cg("inner");
    other.detach.push(inner.clone());
    let policy = other.state.join("inner.toml");
    std::fs::write(
        &policy,
        "version = 1\n[services.a]\ncgroup = \"a\"\n[services.b]\ncgroup = \"b\"\n",
    )?;
    let mount = cgroup2_mount()?;
    let spot = other.state.join("mnt");
    std::fs::create_dir_all(&spot)?;
    let bound = || {
        wrapped(
            &other,
            IN_SUBTREE_MOUNT,
            &[inner.as_os_str(), mount.as_os_str(), spot.as_os_str()],
        )
    };
    lab.attach(MATRIX)?;
    let (ok, err, _k) = attach_no_wait(bound(), &policy, &mount)?;
    assert!(
        !ok,
        "an attach through a subtree mount below a live attachment was accepted: {err}"
    );
    assert!(err.contains("nest"), "{err}");
    assert!(other_links(&other).is_empty());
    let out = lab
        .segbpf(&["detach", "--services", "--cgroup-root"])
        .arg(&lab.root)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(mut c) = lab.attach.take() {
        let _ = c.wait();
    }
    let (ok, err, _k_inner) = attach_no_wait(bound(), &policy, &mount)?;
    assert!(ok, "{err}");
    assert_eq!(other_links(&other).len(), 1);
    Ok(())
}

/// Review 6: a cgroup root removed (and made again, or not) leaves the
/// pins and state of the attachment that was on it. `status` reports it
/// as not enforcing (from the kernel: its links are on no cgroup) and
/// `detach --services` finds and removes it, whether the root's path now
/// holds another cgroup or nothing. And `status --services` from a cgroup
/// namespace without a cgroup2 mount of its own fails as the other
/// commands do (the level is unknown), not with "no services attachment".
#[test]
#[ignore = "needs root, cgroup v2, unshare and a kernel with BPF: run `cargo xtask test`"]
fn detach_and_status_find_an_attachment_whose_root_is_gone() -> anyhow::Result<()> {
    let lab = SvcLab::new("gone", &["app", "db"], 126)?;
    let policy = lab.state.join("roles.toml");
    std::fs::write(&policy, MATRIX)?;
    let root = lab.root.to_string_lossy().to_string();
    let left = |lab: &SvcLab| -> anyhow::Result<usize> {
        Ok(
            std::fs::read_dir(&lab.bpffs).map_or(0, |rd| rd.flatten().count())
                + std::fs::read_dir(&lab.state)?
                    .flatten()
                    .filter(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        // The follower's log is kept, as by every detach.
                        n.starts_with("services:") && !n.ends_with(".follow.log")
                    })
                    .count(),
        )
    };
    for made_again in [true, false] {
        let (ok, err, _k) = attach_no_wait(lab.segbpf(&[]), &policy, &lab.root)?;
        assert!(ok, "{err}");
        remove_cgroups(&lab.root);
        anyhow::ensure!(!lab.root.exists(), "the test could not remove its root");
        if made_again {
            std::fs::create_dir_all(lab.root.join("app"))?;
            let out = lab
                .segbpf(&["status", "--services", "--cgroup-root", &root, "-o", "json"])
                .output()?;
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "status: {err}");
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            assert_eq!(v["services"][0]["attached"], false, "{v}");
            assert_eq!(v["services"][0]["cgroup_gone"], true, "{v}");
        }
        assert!(left(&lab)? > 0);
        let out = lab
            .segbpf(&["detach", "--services", "--cgroup-root", &root])
            .output()?;
        assert!(
            out.status.success(),
            "detach (root made again: {made_again}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rest: Vec<String> = std::fs::read_dir(&lab.state)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("services:") && !n.ends_with(".follow.log"))
            .collect();
        assert_eq!(left(&lab)?, 0, "left behind: {rest:?}");
        std::fs::create_dir_all(lab.root.join("app"))?;
    }
    // A cgroup namespace rooted at `app` with the host's cgroup2 mount:
    // the level cannot be found.
    let script = r#"echo 0 > "$1/cgroup.procs" && shift && exec unshare -C "$@""#;
    let run = |args: &[&str]| -> anyhow::Result<(Option<i32>, String)> {
        let out = Command::new("sh")
            .args(["-c", script, "sh"])
            .arg(lab.cg("app"))
            .arg(segbpf_bin())
            .args(args)
            .env("SEGBPF_BPFFS", &lab.bpffs)
            .env("SEGBPF_STATE_DIR", &lab.state)
            .output()?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let (code, reload_err) = run(&["reload", "--services"])?;
    assert_eq!(code, Some(1), "{reload_err}");
    let (code, status_err) = run(&["status", "--services"])?;
    assert_eq!(code, Some(1), "{status_err}");
    assert!(
        !status_err.contains("no services attachment") && status_err == reload_err,
        "status: {status_err}; reload: {reload_err}"
    );
    Ok(())
}

/// Review 7: two segbpf runs that share the pin root (`SEGBPF_BPFFS`) but
/// not the state directory (a container with the host's /sys/fs/bpf and
/// its own /run; an admin's `SEGBPF_STATE_DIR=/tmp/x` beside the
/// service). The second `attach --services` at the same cgroup root used
/// to adopt the first's pins and start a second follower that wrote its
/// own policy's ids (a restarted service got another's identity). It is
/// refused, naming the other state directory, and changes nothing: not
/// one after the other, not from a cgroup namespace, not racing (never
/// both, never a raw pinning error); its `status` and `reload` neither
/// claim nor change the attachment.
#[test]
#[ignore = "needs root, cgroup v2, unshare and a kernel with BPF: run `cargo xtask test`"]
fn a_second_state_dir_sharing_the_pins_is_refused() -> anyhow::Result<()> {
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let lab = SvcLab::new("dual", &["a", "b"], 126)?;
    let state2 = PathBuf::from(format!("{}-s2", lab.state.display()));
    std::fs::create_dir_all(&state2)?;
    let _c2 = Cleanup(state2.clone());
    let s2 = || {
        let mut c = Command::new(segbpf_bin());
        c.env("SEGBPF_BPFFS", &lab.bpffs)
            .env("SEGBPF_STATE_DIR", &state2);
        c
    };
    let p1 = lab.state.join("p1.toml");
    std::fs::write(
        &p1,
        "version = 1\n[services.a]\ncgroup = \"a\"\ndefaults = { egress = \"drop\" }\n[services.b]\ncgroup = \"b\"\n",
    )?;
    // The same services listed the other way round: other ids.
    let p2 = state2.join("p2.toml");
    std::fs::write(
        &p2,
        "version = 1\n[services.b]\ncgroup = \"b\"\n[services.a]\ncgroup = \"a\"\n",
    )?;
    let root = lab.root.display().to_string();
    let state_files = |dir: &Path| -> usize {
        std::fs::read_dir(dir).map_or(0, |rd| {
            rd.flatten()
                .filter(|e| {
                    let p = e.path();
                    e.file_name().to_string_lossy().starts_with("services:")
                        && p.extension().is_some_and(|x| x == "json")
                })
                .count()
        })
    };
    let status = |mut c: Command| -> anyhow::Result<String> {
        let out = c
            .args(["status", "--services", "--cgroup-root", &root])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (ok, err, _k1) = attach_no_wait(lab.segbpf(&[]), &p1, &lab.root)?;
    assert!(ok, "{err}");
    // One after the other.
    let (ok, err, _k2) = attach_no_wait(s2(), &p2, &lab.root)?;
    assert!(
        !ok,
        "an attach from another state dir adopted the attachment: {err}"
    );
    assert!(
        err.contains("attached already") && err.contains(&lab.state.display().to_string()),
        "{err}"
    );
    assert_eq!(state_files(&state2), 0, "the refused attach left a state");
    // Nor any other file (review 7 L3: no lock or log left by a refusal).
    let left: Vec<String> = std::fs::read_dir(&state2)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("services:"))
        .collect();
    assert!(left.is_empty(), "the refused attach left {left:?}");
    let mine = status(lab.segbpf(&[]))?;
    assert!(mine.contains("enforcing, generation 1"), "{mine}");
    let theirs = status(s2())?;
    assert!(
        !theirs.contains("enforcing") && !theirs.contains("--no-wait"),
        "status from a state dir that only shares the pins: {theirs}"
    );
    assert!(theirs.contains("attached by"), "{theirs}");
    // Nor does a reload from there change it.
    let out = s2()
        .args(["reload", "--services", "--cgroup-root", &root, "--policy"])
        .arg(&p2)
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("attached already"), "{err}");
    let mine = status(lab.segbpf(&[]))?;
    assert!(mine.contains("enforcing, generation 1"), "{mine}");
    // From a cgroup namespace rooted at the same cgroup (cgroup2 mounted at
    // its root, the pins shared).
    let mount = cgroup2_mount()?;
    let mut in_ns = Command::new("sh");
    in_ns
        .args(["-c", IN_CGROUP_NS, "sh"])
        .arg(&lab.root)
        .arg(&mount)
        .arg(segbpf_bin())
        .env("SEGBPF_BPFFS", &lab.bpffs)
        .env("SEGBPF_STATE_DIR", &state2);
    let (ok, err, _k3) = attach_no_wait(in_ns, &p2, &mount)?;
    assert!(!ok, "an attach from a cgroup namespace adopted it: {err}");
    assert!(err.contains("attached already"), "{err}");
    assert_eq!(state_files(&state2), 0);
    let out = lab
        .segbpf(&["detach", "--services", "--cgroup-root", &root])
        .output()?;
    assert!(out.status.success());
    // Racing (the other one on the host, or in a cgroup namespace at the
    // same cgroup): exactly one enforces, the other gets the refusal.
    for round in 0..6 {
        let a = lab.segbpf(&[]);
        let (b, rb) = if round % 2 == 0 {
            (s2(), lab.root.clone())
        } else {
            let mut sh = Command::new("sh");
            sh.args(["-c", IN_CGROUP_NS, "sh"])
                .arg(&lab.root)
                .arg(&mount)
                .arg(segbpf_bin())
                .env("SEGBPF_BPFFS", &lab.bpffs)
                .env("SEGBPF_STATE_DIR", &state2);
            (sh, mount.clone())
        };
        let (pa, pb, ra) = (p1.clone(), p2.clone(), lab.root.clone());
        let ta = std::thread::spawn(move || attach_no_wait(a, &pa, &ra));
        let tb = std::thread::spawn(move || attach_no_wait(b, &pb, &rb));
        let (oka, erra, _ka) = ta.join().map_err(|_| anyhow::anyhow!("thread"))??;
        let (okb, errb, _kb) = tb.join().map_err(|_| anyhow::anyhow!("thread"))??;
        assert!(oka != okb, "round {round}: {oka} {okb}: {erra} / {errb}");
        let loser = if oka { &errb } else { &erra };
        assert!(loser.contains("attached already"), "round {round}: {loser}");
        assert_eq!(
            state_files(&lab.state) + state_files(&state2),
            1,
            "round {round}"
        );
        let winner = if oka { lab.segbpf(&[]) } else { s2() };
        let mut winner = winner;
        let out = winner
            .args(["detach", "--services", "--cgroup-root", &root])
            .output()?;
        assert!(out.status.success(), "round {round}");
    }
    // An attach that died (kill -9) between its pins and its state, with
    // only its egress link attached (review 8 N1): made by hand from a
    // whole attach (no follower, no state, the ingress link unpinned).
    let (ok, err, k4) = attach_no_wait(lab.segbpf(&[]), &p1, &lab.root)?;
    assert!(ok, "{err}");
    drop(k4);
    let mut pin_dir = None;
    for e in std::fs::read_dir(&lab.state)?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("services:") && e.path().extension().is_some_and(|x| x == "json") {
            std::fs::remove_file(e.path())?;
            pin_dir = Some(lab.bpffs.join(n.trim_end_matches(".json")));
        }
    }
    let pin_dir = pin_dir.context("no state file")?;
    std::fs::remove_file(pin_dir.join("link_svc_ingress"))?;
    let ours_at_root = || -> anyhow::Result<Vec<String>> {
        let v = bpftool(&["cgroup", "show", &root])?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter(|p| {
                p["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("segbpf_svc"))
            })
            .map(|p| p["attach_type"].as_str().unwrap_or("?").to_string())
            .collect())
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while ours_at_root()?.len() != 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ours_at_root()?, vec!["cgroup_inet_egress".to_string()]);
    // Another state directory is still refused.
    let (ok, err, _k5) = attach_no_wait(s2(), &p2, &lab.root)?;
    assert!(!ok && err.contains("attached already"), "{err}");
    // Not said to be in force where it is not linked (review 12 L4).
    assert!(
        err.contains("generation 1 PARTIALLY in force: its ingress link is not in the kernel"),
        "{err}"
    );
    // A mark naming this path but another directory (the same path in a
    // container's mount namespace: another st_dev:st_ino) is refused.
    let mark = std::fs::read_dir(&pin_dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("owner:"))
        .context("no owner mark")?;
    // owner:TOKEN:@DEV-INO:PATH (a mark without the identity: make one).
    let forged = if let Some((head, tail)) = mark.split_once(":@") {
        let (_, path) = tail.split_once(':').unwrap_or((tail, ""));
        format!("{head}:@1-1:{path}")
    } else {
        let (token, path) = mark["owner:".len()..]
            .split_once(':')
            .unwrap_or((&mark["owner:".len()..], ""));
        format!("owner:{token}:@1-1:{path}")
    };
    std::fs::rename(pin_dir.join(&mark), pin_dir.join(&forged))?;
    let (ok, err, _k6) = attach_no_wait(lab.segbpf(&[]), &p1, &lab.root)?;
    assert!(
        !ok && err.contains("attached already") && err.contains("detach"),
        "{err}"
    );
    std::fs::rename(pin_dir.join(&forged), pin_dir.join(&mark))?;
    // The same state directory (a restarted unit) rolls the crashed attach
    // back and attaches fresh: both directions in the kernel again.
    let (ok, err, _k7) = attach_no_wait(lab.segbpf(&[]), &p1, &lab.root)?;
    assert!(
        ok,
        "the same state dir could not re-attach after a crash: {err}"
    );
    let mut dirs = ours_at_root()?;
    dirs.sort();
    assert_eq!(
        dirs,
        vec![
            "cgroup_inet_egress".to_string(),
            "cgroup_inet_ingress".to_string()
        ]
    );
    assert!(status(lab.segbpf(&[]))?.contains("enforcing, generation 1"));
    let out = lab
        .segbpf(&["detach", "--services", "--cgroup-root", &root])
        .output()?;
    assert!(out.status.success());
    Ok(())
}

/// `sh -c` script for [`attach_lock_is_not_held_by_a_user`]: in a mount
/// namespace of its own, binds the cgroup `$1` at `$2` (the only cgroup2
/// mount left), has uid 65534 hold an exclusive `flock` on `$2` for 8 s,
/// and times `$3 attach --services --policy $4 --cgroup-root $2/k
/// --no-wait`; prints its stderr and `rc=RC ms=MS`, detaches, ends the
/// holder by PID.
const USER_HOLDS_THE_ROOT: &str = r#"mount --make-rprivate / && mount --bind "$1" "$2" || exit 9
umount -l "$5" || exit 9
setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/python3 -c 'import fcntl,os,sys,time; fd=os.open(sys.argv[1],os.O_RDONLY); fcntl.flock(fd,fcntl.LOCK_EX); print("held",flush=True); time.sleep(8)' "$2" > "$6" &
h=$!
i=0; while ! grep -q held "$6" && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
s=$(date +%s%N)
"$3" attach --services --policy "$4" --cgroup-root "$2/k" --no-wait 2>&1
rc=$?
e=$(date +%s%N)
echo "rc=$rc ms=$(( (e - s) / 1000000 ))"
"$3" detach --services --cgroup-root "$2/k" >/dev/null 2>&1
kill $h; wait $h 2>/dev/null; exit 0"#;

/// Review 7 M1: the lock that serialised fresh attaches was an `flock` on
/// the cgroup v2 root directory, which any local user may open: holding
/// it stopped every fresh `attach --services`, silently, for as long as
/// the user liked. The attach lock is now the pin root (root only); the
/// nesting lock on the cgroup root waits for a holder that is not root
/// one second only, names it on stderr (from /proc/locks), and the attach
/// goes on (the kernel link check after the attach still refuses a
/// nested one).
#[test]
#[ignore = "needs root, cgroup v2, unshare, setpriv and a kernel with BPF: run `cargo xtask test`"]
fn attach_lock_is_not_held_by_a_user() -> anyhow::Result<()> {
    let lab = SvcLab::new("ulock", &["k/a", "k/b"], 127)?;
    let mnt = lab.state.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    // The state directory is private; the user must reach the mount.
    std::fs::set_permissions(
        &lab.state,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o711),
    )?;
    let policy = lab.state.join("p.toml");
    std::fs::write(
        &policy,
        "version = 1\n[services.a]\ncgroup = \"a\"\n[services.b]\ncgroup = \"b\"\n",
    )?;
    let c = lab.segbpf(&[]);
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", USER_HOLDS_THE_ROOT, "sh"])
        .arg(&lab.root)
        .arg(&mnt)
        .arg(segbpf_bin())
        .arg(&policy)
        .arg(cgroup2_mount()?)
        .arg(lab.state.join("held"))
        .envs(
            c.get_envs()
                .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))),
        )
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let _k = follower_named(&text).map(Kill);
    eprintln!("{text}");
    let ms: u64 = text
        .rsplit_once("ms=")
        .and_then(|(_, m)| m.trim().parse().ok())
        .with_context(|| format!("no timing: {text}"))?;
    assert!(text.contains("rc=0"), "the attach failed: {text}");
    assert!(
        text.contains("held by process") && text.contains("uid 65534"),
        "the holder was not named: {text}"
    );
    assert!(
        ms < 6000,
        "a user's lock held the attach for {ms} ms (the holder keeps it 8 s)"
    );
    Ok(())
}

/// Review 7 M2: an attachment made inside a cgroup namespace records its
/// root as a path of that namespace. When that cgroup is removed (a
/// container restart) the host could not find it at the real path:
/// `status` and `detach` said "no services attachment" and its pins (about
/// 16 MB of locked kernel memory each) stayed. Gone attachments are found
/// from the pins and judged by the kernel: the host's `status --services`
/// at that path lists it and `detach --services` there removes it.
#[test]
#[ignore = "needs root, cgroup v2, unshare and a kernel with BPF: run `cargo xtask test`"]
fn a_gone_attachment_of_a_cgroup_namespace_is_found_from_the_host() -> anyhow::Result<()> {
    let lab = SvcLab::new("gonens", &["cns/a", "cns/b", "live/a", "live/b"], 128)?;
    let cns = lab.cg("cns");
    let policy = lab.state.join("p.toml");
    std::fs::write(
        &policy,
        "version = 1\n[services.a]\ncgroup = \"a\"\n[services.b]\ncgroup = \"b\"\n",
    )?;
    let mount = cgroup2_mount()?;
    let c = lab.segbpf(&[]);
    let mut in_ns = Command::new("sh");
    in_ns
        .args(["-c", IN_CGROUP_NS, "sh"])
        .arg(&cns)
        .arg(&mount)
        .arg(segbpf_bin())
        .envs(
            c.get_envs()
                .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))),
        );
    let (ok, err, k) = attach_no_wait(in_ns, &policy, &mount)?;
    assert!(ok, "{err}");
    // A second container, which stays (review 9 N4: listed beside a gone one).
    let live = lab.cg("live");
    let mut in_ns2 = Command::new("sh");
    in_ns2
        .args(["-c", IN_CGROUP_NS, "sh"])
        .arg(&live)
        .arg(&mount)
        .arg(segbpf_bin())
        .envs(
            c.get_envs()
                .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))),
        );
    let (ok, err, _k_live) = attach_no_wait(in_ns2, &policy, &mount)?;
    assert!(ok, "{err}");
    let pins = || -> usize {
        std::fs::read_dir(&lab.bpffs).map_or(0, |rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("services:"))
                .count()
        })
    };
    assert_eq!(pins(), 2);
    // Live (review 9 N4): the host's plain `status` lists it by its path
    // here, enforcing; so does `status --services` without a root.
    let cns_text = cns.display().to_string();
    let out = lab.segbpf(&["status"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains(&format!("services below {cns_text}: enforcing"))),
        "the host's status does not list the live attachment: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = lab.segbpf(&["status", "--services"]).output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&cns_text),
        "the host's status --services does not name the live attachment: {text}"
    );
    // The container stops (its follower with it) and is made again.
    drop(k);
    let start = Instant::now();
    // The whole subtree empties (cgroup.events: populated 0), not only
    // cns itself; a dying cgroup may still refuse rmdir for a moment
    // (EBUSY), so that is retried too.
    while !std::fs::read_to_string(cns.join("cgroup.events"))?.contains("populated 0")
        && start.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    for d in ["cns/a", "cns/b", "cns"] {
        let mut tries = 0;
        loop {
            match std::fs::remove_dir(lab.cg(d)) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 250 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                r => break r?,
            }
        }
    }
    std::fs::create_dir(&cns)?;
    // Without a root: the gone one and the live one.
    let out = lab.segbpf(&["status", "--services"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let live_text = live.display().to_string();
    assert!(
        text.contains("another cgroup namespace")
            && text
                .lines()
                .any(|l| l.contains(&format!("services below {live_text}: enforcing"))),
        "the host's status --services does not list the gone and the live one: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = lab
        .segbpf(&["status", "--services", "--cgroup-root"])
        .arg(&cns)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("removed") && text.contains("another cgroup namespace"),
        "the host's status does not list the gone attachment: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = lab
        .segbpf(&["detach", "--services", "--cgroup-root"])
        .arg(&cns)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(pins(), 1, "the gone attachment's pins stayed");
    let out = lab
        .segbpf(&["detach", "--services", "--cgroup-root"])
        .arg(&live)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(pins(), 0, "the live attachment's pins stayed");
    Ok(())
}

/// Review 7 L4: a read-only `status --services` from inside a cgroup
/// namespace whose root is not mounted (`unshare -C`, no remount) fails
/// clearly (exit 1) without telling the user to run `attach` on the host.
#[test]
#[ignore = "needs root, cgroup v2 and unshare: run `cargo xtask test`"]
fn status_in_an_unmounted_cgroup_namespace_says_what_to_do() -> anyhow::Result<()> {
    let lab = SvcLab::new("l4", &["x"], 129)?;
    let out = Command::new("sh")
        .args([
            "-c",
            r#"echo 0 > "$1/cgroup.procs" && shift && exec unshare -C "$@""#,
            "sh",
        ])
        .arg(lab.cg("x"))
        .arg(segbpf_bin())
        .args(["status", "--services"])
        .env("SEGBPF_BPFFS", &lab.bpffs)
        .env("SEGBPF_STATE_DIR", &lab.state)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("level"), "{err}");
    assert!(
        !err.contains("segbpf attach"),
        "a read-only status is told to attach: {err}"
    );
    Ok(())
}

/// The `--confirm` guard of a first attach removes that attachment only:
/// when it was detached from another state directory sharing the pins
/// and that one attached anew, the guard's deadline leaves the new
/// attachment (its owner mark is not this state's) in force.
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn a_guard_never_removes_another_state_dirs_attachment() -> anyhow::Result<()> {
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let lab = SvcLab::new("grd", &["app", "db", "other", "cache"], 130)?;
    let state2 = PathBuf::from(format!("{}-s2", lab.state.display()));
    std::fs::create_dir_all(&state2)?;
    let _c2 = Cleanup(state2.clone());
    let s2 = || {
        let mut c = Command::new(segbpf_bin());
        c.env("SEGBPF_BPFFS", &lab.bpffs)
            .env("SEGBPF_STATE_DIR", &state2);
        c
    };
    let root = lab.root.display().to_string();
    let (guard, follower) = attach_confirm(&lab, "3")?;
    let (_kg, _kf) = (Kill(guard), Kill(follower));
    let out = s2()
        .args(["detach", "--services", "--cgroup-root", &root])
        .output()?;
    assert!(out.status.success());
    let p2 = state2.join("p2.toml");
    std::fs::write(&p2, MATRIX)?;
    let (ok, err, _k2) = attach_no_wait(s2(), &p2, &lab.root)?;
    assert!(ok, "{err}");
    assert!(gone_within(guard, 15), "the guard did not end");
    let out = s2()
        .args(["status", "--services", "--cgroup-root", &root])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("enforcing"),
        "the other state dir's attachment was removed by the guard: {text}"
    );
    let _ = s2()
        .args(["detach", "--services", "--cgroup-root", &root])
        .output();
    Ok(())
}

/// `detach --services` with the attachment's state directory but another
/// pin root (`SEGBPF_BPFFS`) than the attach used (review 8 N2): the
/// kernel's programs on the root are not those pins, so it refuses (exit
/// status 1) and changes nothing: the state, the follower, the pins and
/// both programs stay, and `status` with the right pins still says
/// enforcing.
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn detach_from_other_pins_changes_nothing() -> anyhow::Result<()> {
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let lab = SvcLab::new("wrongpins", &["a", "b"], 127)?;
    let bpffs2 = PathBuf::from(format!("{}-p2", lab.bpffs.display()));
    let _c2 = Cleanup(bpffs2.clone());
    let p1 = lab.state.join("p1.toml");
    std::fs::write(
        &p1,
        "version = 1\n[services.a]\ncgroup = \"a\"\ndefaults = { egress = \"drop\" }\n[services.b]\ncgroup = \"b\"\n",
    )?;
    let root = lab.root.display().to_string();
    let (ok, err, _k) = attach_no_wait(lab.segbpf(&[]), &p1, &lab.root)?;
    assert!(ok, "{err}");
    let followers = followers_of(&lab);
    assert_eq!(followers.len(), 1, "{followers:?}");
    let state_file = std::fs::read_dir(&lab.state)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|x| x == "json")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("services:"))
        })
        .context("no state file")?;
    let before = std::fs::read(&state_file)?;
    let ours_at_root = || -> anyhow::Result<usize> {
        let v = bpftool(&["cgroup", "show", &root])?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter(|p| {
                p["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("segbpf_svc"))
            })
            .count())
    };
    assert_eq!(ours_at_root()?, 2);
    let out = lab
        .segbpf(&["detach", "--services", "--cgroup-root", &root])
        .env("SEGBPF_BPFFS", &bpffs2)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "stdout: {text}\nstderr: {err}");
    assert!(!text.contains("detached"), "{text}");
    assert!(err.contains("SEGBPF_BPFFS"), "{err}");
    assert_eq!(std::fs::read(&state_file)?, before, "the state changed");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(followers_of(&lab), followers, "the follower was stopped");
    assert_eq!(ours_at_root()?, 2);
    let out = lab
        .segbpf(&["status", "--services", "--cgroup-root", &root])
        .output()?;
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(status.contains("enforcing, generation 1"), "{status}");
    // The wrong pin root holding a pin directory for this cgroup with
    // only another state directory's mark (a crashed attach's, review 9
    // N5): still not this state's attachment, still refused.
    let pin_name = state_file
        .file_stem()
        .context("state name")?
        .to_string_lossy()
        .into_owned();
    std::fs::create_dir_all(bpffs2.join(&pin_name).join("owner:1234:@1-1:/elsewhere"))?;
    let out = lab
        .segbpf(&["detach", "--services", "--cgroup-root", &root])
        .env("SEGBPF_BPFFS", &bpffs2)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "stdout: {text}\nstderr: {err}");
    assert!(!text.contains("detached"), "{text}");
    assert_eq!(std::fs::read(&state_file)?, before, "the state changed");
    assert_eq!(ours_at_root()?, 2);
    assert!(
        bpffs2.join(&pin_name).exists(),
        "the other pin root's leftovers were removed"
    );
    // A detach killed half-way (review 8 N3): its ingress link unpinned,
    // its follower gone, the egress link and the state left. Status says
    // what the kernel enforces; an attach from here starts over.
    let pin_dir = lab.bpffs.join(
        state_file
            .file_stem()
            .context("state name")?
            .to_string_lossy()
            .into_owned(),
    );
    std::fs::remove_file(pin_dir.join("link_svc_ingress"))?;
    for pid in followers {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while ours_at_root()? != 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ours_at_root()?, 1);
    let out = lab
        .segbpf(&["status", "--services", "--cgroup-root", &root])
        .output()?;
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        status.contains("PARTIALLY attached: only egress is enforced"),
        "{status}"
    );
    let out = lab
        .segbpf(&[
            "status",
            "--services",
            "--cgroup-root",
            &root,
            "--output",
            "json",
        ])
        .output()?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let linked = json
        .pointer("/linked")
        .or_else(|| json.pointer("/0/linked"))
        .or_else(|| json.pointer("/services/0/linked"))
        .cloned();
    assert_eq!(
        linked,
        Some(serde_json::json!(["egress"])),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let (ok, err, _k2) = attach_no_wait(lab.segbpf(&[]), &p1, &lab.root)?;
    assert!(
        ok,
        "an attach from the same state dir after a killed detach: {err}"
    );
    assert_eq!(ours_at_root()?, 2);
    // With the right pins it detaches.
    let out = lab
        .segbpf(&["detach", "--services", "--cgroup-root", &root])
        .output()?;
    assert!(out.status.success());
    // (bpftool prints no JSON for a cgroup without programs.)
    assert_eq!(ours_at_root().unwrap_or(0), 0);
    Ok(())
}

/// The directions segbpf's services programs are attached for directly
/// at `root`, from the kernel (`bpftool cgroup show`): (ingress, egress).
fn directions_at(root: &str) -> (bool, bool) {
    let Ok(v) = bpftool(&["cgroup", "show", root]) else {
        // (bpftool prints no JSON for a cgroup without programs.)
        return (false, false);
    };
    let ours: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("segbpf_svc"))
        })
        .filter_map(|p| p["attach_type"].as_str().map(str::to_string))
        .collect();
    (
        ours.iter().any(|t| t.ends_with("ingress")),
        ours.iter().any(|t| t.ends_with("_egress")),
    )
}

/// The state file of the (one) services attachment of `lab`.
fn state_file_of(lab: &SvcLab) -> anyhow::Result<PathBuf> {
    std::fs::read_dir(&lab.state)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|x| x == "json")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("services:"))
        })
        .context("no state file")
}

/// Turns `lab`'s live attachment into what an attach killed after its
/// links and before its state leaves: the follower killed, the state
/// file removed (the owner mark and the links stay).
fn make_crash_leftover(lab: &SvcLab) -> anyhow::Result<PathBuf> {
    for pid in followers_of(lab) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let state = state_file_of(lab)?;
    let pins = lab.bpffs.join(state.file_stem().context("state name")?);
    std::fs::remove_file(&state)?;
    Ok(pins)
}

/// Re-attaching from the same state directory over a leftover of it that
/// enforces (review 9 L1: a crashed attach's links, both or egress only,
/// its owner mark, no state) never lifts enforcement: while the attach
/// runs, the root's programs (sampled from the kernel) never lack a
/// direction the leftover had, and a service whose egress is dropped
/// never reaches a server with real sockets.
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn reattach_over_a_leftover_never_lifts_enforcement() -> anyhow::Result<()> {
    let lab = SvcLab::new("gap", &["a", "b", "none", "stage"], 132)?;
    let ns = lab.ns.name.clone();
    let _srv = Helper::server(&lab.cg("none"), &ns, "serve-udp 127.0.0.1 9000")?;
    let p1 = lab.state.join("p1.toml");
    std::fs::write(
        &p1,
        "version = 1\n[services.a]\ncgroup = \"a\"\ndefaults = { egress = \"drop\" }\n[services.b]\ncgroup = \"b\"\n",
    )?;
    let root = lab.root.display().to_string();
    let (ok, err, _k) = attach_no_wait(lab.segbpf(&[]), &p1, &lab.root)?;
    assert!(ok, "{err}");
    let mut followers = Vec::new();
    for (round, egress_only) in [(0, false), (1, true)] {
        let pins = make_crash_leftover(&lab)?;
        if egress_only {
            std::fs::remove_file(pins.join("link_svc_ingress"))?;
        }
        let want = (!egress_only, true);
        let deadline = Instant::now() + Duration::from_secs(5);
        while directions_at(&root) != want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(directions_at(&root), want, "round {round}: the leftover");
        let forbidden = prober_in(&lab, "a", "127.0.0.1 9000")?;
        let allowed = prober_in(&lab, "b", "127.0.0.1 9000")?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let (stop, root) = (stop.clone(), root.clone());
            std::thread::spawn(move || {
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    samples.push(directions_at(&root));
                    std::thread::sleep(Duration::from_millis(2));
                }
                samples
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let (ok, err, k2) = attach_no_wait(lab.segbpf(&[]), &p1, &lab.root)?;
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        let samples = sampler
            .join()
            .map_err(|_| anyhow::anyhow!("sampler panicked"))?;
        let (bad, _, tries) = finish(forbidden)?;
        let (good, _, _) = finish(allowed)?;
        assert!(ok, "round {round}: the re-attach failed: {err}");
        let trace: String = samples
            .iter()
            .map(|&(i, e)| match (i, e) {
                (true, true) => '2',
                (false, true) => 'e',
                (true, false) => 'i',
                (false, false) => '0',
            })
            .collect();
        eprintln!(
            "round {round}: {} samples during the re-attach: {trace}",
            samples.len()
        );
        assert!(samples.len() > 5, "round {round}: {trace}");
        assert!(
            samples.iter().all(|&(i, e)| e && (i || egress_only)),
            "round {round}: the re-attach lifted a direction the leftover enforced (2 both, e egress only, 0 none): {trace}"
        );
        assert_eq!(
            bad, 0,
            "round {round}: a's dropped egress reached the server during the re-attach"
        );
        assert!(
            tries > 5 && good > 0,
            "round {round}: the probers did not run ({tries} tries, {good} allowed)"
        );
        assert_eq!(directions_at(&root), (true, true), "round {round}: after");
        let out = lab
            .segbpf(&["status", "--services", "--cgroup-root", &root])
            .output()?;
        let status = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(status.contains("enforcing, generation 1"), "{status}");
        assert!(
            !lab.bpffs
                .read_dir()?
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("services-next")),
            "round {round}: a side directory was left"
        );
        followers.extend(k2);
    }
    let out = lab
        .segbpf(&["detach", "--services", "--cgroup-root", &root])
        .output()?;
    assert!(out.status.success());
    assert_eq!(directions_at(&root), (false, false));
    Ok(())
}

/// Review 9 L3 and L2: a crash leftover that enforces (an attach killed
/// after its links, before its state; both programs, then egress only)
/// is listed by plain `segbpf status` from its own state directory and
/// from another one sharing the pins, and what the other one says is in
/// force comes from the kernel's links: "in force" with both,
/// "PARTIALLY in force" with egress only, "nothing in force" with the
/// owner mark alone.
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn status_lists_crash_leftovers_by_the_kernels_links() -> anyhow::Result<()> {
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let lab = SvcLab::new("lostat", &["a", "b"], 133)?;
    let state2 = PathBuf::from(format!("{}-s2", lab.state.display()));
    std::fs::create_dir_all(&state2)?;
    let _c2 = Cleanup(state2.clone());
    let run = |state: &Path, args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(segbpf_bin())
            .env("SEGBPF_BPFFS", &lab.bpffs)
            .env("SEGBPF_STATE_DIR", state)
            .args(args)
            .output()?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    };
    let p1 = lab.state.join("p1.toml");
    std::fs::write(
        &p1,
        "version = 1\n[services.a]\ncgroup = \"a\"\ndefaults = { egress = \"drop\" }\n[services.b]\ncgroup = \"b\"\n",
    )?;
    let root = lab.root.display().to_string();
    let (ok, err, _k) = attach_no_wait(lab.segbpf(&[]), &p1, &lab.root)?;
    assert!(ok, "{err}");
    let pins = make_crash_leftover(&lab)?;
    let line_of = |text: &str| -> String {
        text.lines()
            .find(|l| l.contains(&format!("services below {root}:")))
            .unwrap_or_default()
            .to_string()
    };
    // Both programs.
    let own = run(&lab.state, &["status"])?;
    assert!(
        line_of(&own).contains("died before recording its state")
            && line_of(&own).contains("both programs are attached"),
        "plain status of the state dir: {own}"
    );
    let other = run(&state2, &["status"])?;
    assert!(
        line_of(&other).contains("generation 1 in force"),
        "plain status of another state dir: {other}"
    );
    // Egress only.
    std::fs::remove_file(pins.join("link_svc_ingress"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while directions_at(&root) != (false, true) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let own = run(&lab.state, &["status"])?;
    assert!(
        line_of(&own).contains("only its egress program is attached"),
        "plain status of the state dir, egress only: {own}"
    );
    for args in [
        &["status"][..],
        &["status", "--services", "--cgroup-root", &root][..],
    ] {
        let other = run(&state2, args)?;
        let line = line_of(&other);
        assert!(
            line.contains("PARTIALLY in force") && !line.contains("generation 1 in force"),
            "{args:?} of another state dir, egress only: {other}"
        );
    }
    // The owner mark alone: nothing enforces.
    std::fs::remove_file(pins.join("link_svc_egress"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while directions_at(&root) != (false, false) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let other = run(&state2, &["status", "--services", "--cgroup-root", &root])?;
    let line = line_of(&other);
    assert!(
        line.contains("nothing in force") && !line.contains("generation 1 in force"),
        "another state dir, the owner mark alone: {other}"
    );
    let out = lab
        .segbpf(&["detach", "--services", "--cgroup-root", &root])
        .output()?;
    assert!(out.status.success());
    Ok(())
}

/// A detach killed after it removed the owner mark but before the last
/// link: the pins (egress still linked) are this state directory's
/// half-removed attachment, not another one's: `status --services` says
/// PARTIALLY attached (not "attached by" another state directory), an
/// attach from here replaces it and a detach removes it. And `status`
/// run with another `SEGBPF_BPFFS` points to the pins the state names.
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn a_half_detached_attachment_is_this_state_dirs() -> anyhow::Result<()> {
    let lab = SvcLab::new("halfdet", &["a", "b"], 134)?;
    let p1 = lab.state.join("p1.toml");
    std::fs::write(
        &p1,
        "version = 1\n[services.a]\ncgroup = \"a\"\ndefaults = { egress = \"drop\" }\n[services.b]\ncgroup = \"b\"\n",
    )?;
    let root = lab.root.display().to_string();
    let mut followers = Vec::new();
    let half_detach = |lab: &SvcLab| -> anyhow::Result<()> {
        for pid in followers_of(lab) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let state = state_file_of(lab)?;
        let pins = lab.bpffs.join(state.file_stem().context("state name")?);
        for e in std::fs::read_dir(&pins)?.flatten() {
            if e.file_name().to_string_lossy().starts_with("owner:") {
                std::fs::remove_dir(e.path())?;
            }
        }
        std::fs::remove_file(pins.join("link_svc_ingress"))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while directions_at(&lab.root.display().to_string()) != (false, true)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    };
    let (ok, err, k) = attach_no_wait(lab.segbpf(&[]), &p1, &lab.root)?;
    assert!(ok, "{err}");
    followers.extend(k);
    // Another pin root: status names where the pins are.
    let other_pins = PathBuf::from(format!("{}-p2", lab.bpffs.display()));
    let out = lab
        .segbpf(&["status", "--services", "--cgroup-root", &root])
        .env("SEGBPF_BPFFS", &other_pins)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&other_pins);
    assert!(
        text.contains(&lab.bpffs.display().to_string()) && text.contains("SEGBPF_BPFFS"),
        "status with another SEGBPF_BPFFS does not point to the pins: {text}"
    );
    half_detach(&lab)?;
    assert_eq!(directions_at(&root), (false, true));
    let out = lab
        .segbpf(&["status", "--services", "--cgroup-root", &root])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("PARTIALLY attached: only egress") && !text.contains("attached by"),
        "a half-detached attachment of this state dir: {text}"
    );
    let (ok, err, k) = attach_no_wait(lab.segbpf(&[]), &p1, &lab.root)?;
    followers.extend(k);
    assert!(
        ok,
        "an attach over this state dir's half-detached attachment: {err}"
    );
    assert_eq!(directions_at(&root), (true, true));
    half_detach(&lab)?;
    let out = lab
        .segbpf(&["detach", "--services", "--cgroup-root", &root])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while directions_at(&root) != (false, false) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(directions_at(&root), (false, false));
    assert!(
        state_file_of(&lab).is_err(),
        "the state stayed after the detach"
    );
    Ok(())
}

/// `bpf(BPF_OBJ_GET)`: an fd of the object pinned at `pin` (a link stays
/// in the kernel, attached, while the fd is open, pinned or not).
fn obj_get(pin: &Path) -> anyhow::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())?;
    let mut attr = [0u64; 3];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: a bpf_attr of 24 bytes (pathname, then zeros) whose path
    // outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            7, // BPF_OBJ_GET
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context(format!("BPF_OBJ_GET {}", pin.display()));
    }
    // SAFETY: a new fd the kernel just gave this process.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(i32::try_from(fd)?) })
}

/// `bpf(BPF_OBJ_PIN)`: pins the object of `fd` at `pin`.
fn obj_pin(fd: &std::os::fd::OwnedFd, pin: &Path) -> anyhow::Result<()> {
    use std::os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _};
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())?;
    let mut attr = [0u64; 3];
    attr[0] = path.as_ptr() as u64;
    attr[1] = u64::from(u32::try_from(fd.as_raw_fd())?);
    // SAFETY: a bpf_attr of 24 bytes (pathname, bpf_fd, zeros) whose path
    // outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            6, // BPF_OBJ_PIN
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context(format!("BPF_OBJ_PIN {}", pin.display()));
    }
    Ok(())
}

/// How many of segbpf's services programs the kernel has directly at
/// `root` (`bpftool cgroup show`).
fn svc_programs_at(root: &str) -> usize {
    bpftool(&["cgroup", "show", root])
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|p| {
            p["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("segbpf_svc"))
        })
        .count()
}

/// Review 10 L-a: a re-attach over a crash leftover killed half-way
/// leaves the side directory `services-next:ID` beside the pins, with 0,
/// 1 or 2 links of its own, before or after its swap. Each kill point is
/// made by hand (the leftover's links kept by fd while the re-attach
/// runs, then pinned where the killed attach had them). `status` names
/// the side directory and its extra links; the next attach from the same
/// state directory works at the first try (also while the kernel has not
/// yet released the side's links: their fds are held across it), never
/// lifts a direction meanwhile, and leaves 2 links and no side
/// directory; a detach removes all of it.
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn a_reattach_killed_mid_swap_leaves_a_leftover_the_next_attach_recovers() -> anyhow::Result<()> {
    let lab = SvcLab::new("midswap", &["a", "b"], 135)?;
    let p1 = lab.state.join("p1.toml");
    std::fs::write(
        &p1,
        "version = 1\n[services.a]\ncgroup = \"a\"\ndefaults = { egress = \"drop\" }\n[services.b]\ncgroup = \"b\"\n",
    )?;
    let root = lab.root.display().to_string();
    let (ok, err, k) = attach_no_wait(lab.segbpf(&[]), &p1, &lab.root)?;
    assert!(ok, "{err}");
    let mut followers = Vec::new();
    followers.extend(k);
    let links = ["link_svc_ingress", "link_svc_egress"];
    // (kill point, side links, recovered by detach)
    let rounds: [(&str, &[&str], bool); 6] = [
        (
            "after the swap, the side (old pins) not yet removed",
            &links,
            false,
        ),
        ("after the swap, the side half removed", &links[1..], false),
        ("before the swap, both new links made", &links, false),
        (
            "before the swap, the new egress link made",
            &links[1..],
            false,
        ),
        ("before the swap, the side marked only", &[], false),
        ("after the swap, removed by detach", &links, true),
    ];
    for (what, side_links, by_detach) in rounds {
        // The crash leftover A the killed re-attach ran over, its links
        // kept by fd.
        let pins = make_crash_leftover(&lab)?;
        let name = pins
            .file_name()
            .context("pins")?
            .to_string_lossy()
            .into_owned();
        let side = lab.bpffs.join(name.replace("services:", "services-next:"));
        let mark_a = std::fs::read_dir(&pins)?
            .flatten()
            .map(|e| e.file_name())
            .find(|n| n.to_string_lossy().starts_with("owner:"))
            .context("no owner mark")?;
        let a_links = links
            .iter()
            .map(|l| obj_get(&pins.join(l)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // The re-attach that gets killed: its new pins B.
        let (ok, err, k) = attach_no_wait(lab.segbpf(&[]), &p1, &lab.root)?;
        assert!(ok, "{what}: the re-attach: {err}");
        followers.extend(k);
        make_crash_leftover(&lab)?;
        if what.starts_with("after") {
            // B swapped in; the old pins A still at the side.
            std::fs::create_dir(&side)?;
            std::fs::create_dir(side.join(&mark_a))?;
            for l in side_links {
                let i = links.iter().position(|x| x == l).context("link")?;
                obj_pin(&a_links[i], &side.join(l))?;
            }
        } else {
            // B still at the side; the leftover A at the pins.
            std::fs::rename(&pins, &side)?;
            std::fs::create_dir(&pins)?;
            std::fs::create_dir(pins.join(&mark_a))?;
            for (l, fd) in links.iter().zip(&a_links) {
                obj_pin(fd, &pins.join(l))?;
            }
            for l in links {
                if !side_links.contains(&l) {
                    std::fs::remove_file(side.join(l))?;
                }
            }
        }
        // The side's links stay in the kernel while the recovery runs (as
        // when the kernel releases them late).
        let held = side_links
            .iter()
            .map(|l| obj_get(&side.join(l)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        drop(a_links);
        let deadline = Instant::now() + Duration::from_secs(5);
        while svc_programs_at(&root) != 2 + side_links.len() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(svc_programs_at(&root), 2 + side_links.len(), "{what}");
        let out = lab
            .segbpf(&["status", "--services", "--cgroup-root", &root])
            .output()?;
        let status = String::from_utf8_lossy(&out.stdout).into_owned();
        let extra = match side_links.len() {
            0 => "no program of it is attached",
            1 => "1 extra link",
            _ => "2 extra links",
        };
        assert!(
            status.contains(&side.display().to_string()) && status.contains(extra),
            "{what}: status does not name the side directory and its links ({extra}): {status}"
        );
        let out = lab
            .segbpf(&["status", "--services", "--cgroup-root", &root, "-o", "json"])
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        assert_eq!(
            v["services"][0]["side_linked"]
                .as_array()
                .map_or(0, Vec::len),
            side_links.len(),
            "{what}: {v}"
        );
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let (stop, root) = (stop.clone(), root.clone());
            std::thread::spawn(move || {
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    samples.push(directions_at(&root));
                    std::thread::sleep(Duration::from_millis(2));
                }
                samples
            })
        };
        let (ok, err) = if by_detach {
            let out = lab
                .segbpf(&["detach", "--services", "--cgroup-root", &root])
                .output()?;
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        } else {
            let (ok, err, k) = attach_no_wait(lab.segbpf(&[]), &p1, &lab.root)?;
            followers.extend(k);
            (ok, err)
        };
        stop.store(true, Ordering::Relaxed);
        let samples = sampler
            .join()
            .map_err(|_| anyhow::anyhow!("sampler panicked"))?;
        assert!(ok, "{what}: the next attach/detach failed: {err}");
        if !by_detach {
            assert!(
                samples.iter().all(|&d| d == (true, true)),
                "{what}: a direction was lifted during the recovery: {samples:?}"
            );
        }
        drop(held);
        let want = if by_detach { 0 } else { 2 };
        let deadline = Instant::now() + Duration::from_secs(5);
        while svc_programs_at(&root) != want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(svc_programs_at(&root), want, "{what}: links after");
        assert!(!side.exists(), "{what}: the side directory stayed");
        let out = lab
            .segbpf(&["status", "--services", "--cgroup-root", &root])
            .output()?;
        let status = String::from_utf8_lossy(&out.stdout).into_owned();
        if by_detach {
            assert!(state_file_of(&lab).is_err(), "{what}: a state stayed");
        } else {
            assert!(
                status.contains("enforcing, generation 1") && !status.contains("services-next"),
                "{what}: {status}"
            );
        }
    }
    drop(followers);
    Ok(())
}

/// Review 10 L-b: commands that find nothing, or not what they act on,
/// name the real cause. A rollback without history says there is none; a
/// reload with the wrong `SEGBPF_BPFFS` names the pin root of the
/// attachment (as status and detach do); a user who is not root is told
/// root is needed; a detach from another state dir of its own leftover
/// (a mark, no link) says the services there are still enforced by the
/// other attachment, which goes on enforcing; once another state dir
/// detached this one's attachment, status and reload say that the state
/// here remains without its pins.
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn messages_from_another_state_dir_pin_root_or_user_name_the_real_cause() -> anyhow::Result<()> {
    struct Cleanup(Vec<PathBuf>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for d in &self.0 {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
    let lab = SvcLab::new("cause", &["a", "b"], 136)?;
    let so = PathBuf::from(format!("{}-so", lab.state.display()));
    let p2 = PathBuf::from(format!("{}-p2", lab.bpffs.display()));
    let _c = Cleanup(vec![so.clone(), p2.clone()]);
    let p1 = lab.state.join("p1.toml");
    std::fs::write(
        &p1,
        "version = 1\n[services.a]\ncgroup = \"a\"\ndefaults = { egress = \"drop\" }\n[services.b]\ncgroup = \"b\"\n",
    )?;
    let root = lab.root.display().to_string();
    let run = |state: &Path, pins: &Path, args: &[&str], uid: Option<u32>| {
        let mut c = Command::new(segbpf_bin());
        c.env("SEGBPF_BPFFS", pins)
            .env("SEGBPF_STATE_DIR", state)
            .args(args)
            .args(["--cgroup-root", &root]);
        if let Some(u) = uid {
            c.uid(u).gid(u);
        }
        let out = c.output()?;
        anyhow::Ok((
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    };
    let (ok, err, _k) = attach_no_wait(lab.segbpf(&[]), &p1, &lab.root)?;
    assert!(ok, "{err}");
    let state = state_file_of(&lab)?;
    // No history.
    std::fs::remove_dir_all(state.with_extension("history"))?;
    let (code, text) = run(&lab.state, &lab.bpffs, &["rollback", "--services"], None)?;
    assert!(
        code == Some(1) && text.contains("there is no history") && !text.contains("kept: )"),
        "rollback without history: {text}"
    );
    // The wrong pin root.
    let (code, text) = run(&lab.state, &p2, &["reload", "--services"], None)?;
    assert!(
        code == Some(1)
            && text.contains(&lab.bpffs.display().to_string())
            && text.contains("SEGBPF_BPFFS"),
        "reload with another SEGBPF_BPFFS does not name the pin root: {text}"
    );
    assert!(!p2.exists(), "a refused reload made the pin root");
    // Not root.
    for args in [
        &["status", "--services"][..],
        &["reload", "--services"][..],
        &["detach", "--services"][..],
    ] {
        let (code, text) = run(&lab.state, &lab.bpffs, args, Some(65534))?;
        assert!(
            code == Some(1) && text.contains("need root"),
            "{args:?} as uid 65534: {text}"
        );
    }
    assert_eq!(directions_at(&root), (true, true));
    // Another state dir's mark-only leftover under another pin root.
    std::fs::create_dir_all(&so)?;
    let pins = lab.bpffs.join(state.file_stem().context("state")?);
    let leftover = p2.join(pins.file_name().context("pins")?);
    std::fs::create_dir_all(leftover.join("owner:0000000000000001"))?;
    let (code, text) = run(&so, &p2, &["detach", "--services"], None)?;
    assert!(
        code == Some(0)
            && text.contains("STILL enforced")
            && !text.contains("detached the services"),
        "detach of a mark-only leftover while another attachment enforces: {text}"
    );
    assert_eq!(directions_at(&root), (true, true));
    assert!(!leftover.exists());
    // Another state dir sharing the pins detaches this one's attachment.
    let (code, text) = run(&so, &lab.bpffs, &["detach", "--services"], None)?;
    assert_eq!(code, Some(0), "{text}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while directions_at(&root) != (false, false) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for args in [&["status", "--services"][..], &["reload", "--services"][..]] {
        let (code, text) = run(&lab.state, &lab.bpffs, args, None)?;
        assert!(
            code == Some(1) && text.contains("remains") && text.contains("gone"),
            "{args:?} with a state left after another dir detached: {text}"
        );
    }
    let (code, text) = run(&lab.state, &lab.bpffs, &["detach", "--services"], None)?;
    assert_eq!(code, Some(0), "{text}");
    assert!(state_file_of(&lab).is_err(), "the state stayed");
    Ok(())
}

/// Detaches, with the kernel (`bpftool link detach`, as root behind
/// segbpf's back), the pinned `link` (`link_svc_ingress` or
/// `link_svc_egress`) of `lab`'s attachment; its pin stays.
fn detach_link_behind(lab: &SvcLab, link: &str) -> anyhow::Result<()> {
    let state = state_file_of(lab)?;
    let pin = lab
        .bpffs
        .join(state.file_stem().context("state name")?)
        .join(link);
    let out = Command::new("bpftool")
        .args(["link", "detach", "pinned"])
        .arg(&pin)
        .output()?;
    if !out.status.success() {
        bail!(
            "bpftool link detach pinned {}: {}",
            pin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Polls `directions_at(root)` until it is `want` (at most `secs`).
fn directions_become(root: &str, want: (bool, bool), secs: u64) -> (bool, bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut now = directions_at(root);
    while now != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        now = directions_at(root);
    }
    now
}

/// Probes `to` from `cgroup` for a moment with real sockets: (worked, tries).
fn probe_a_moment(lab: &SvcLab, cgroup: &str, to: &str) -> anyhow::Result<(usize, usize)> {
    let h = prober_in(lab, cgroup, to)?;
    std::thread::sleep(Duration::from_millis(300));
    let (ok, _, tries) = finish(h)?;
    Ok((ok, tries))
}

/// Review 11 N1: a link of the attachment detached by another tool
/// (`bpftool link detach`, its pin left) is linked again by `reload
/// --services` (egress), by `attach --services` again (ingress), each
/// before it reports the policy in force, and by the follower within
/// seconds, logged: afterwards the kernel has both directions, and with
/// real sockets a's forbidden egress and a no-service sender to b's
/// forbidden ingress are refused again, while the same probes pass to an
/// allowed peer.
#[test]
#[ignore = "needs root, cgroup v2 and a kernel with BPF: run `cargo xtask test`"]
fn a_link_detached_by_another_tool_is_linked_again() -> anyhow::Result<()> {
    let lab = SvcLab::new("ldet", &["a", "b", "none", "stage"], 137)?;
    let ns = lab.ns.name.clone();
    let _to_none = Helper::server(&lab.cg("none"), &ns, "serve-udp 127.0.0.1 9000")?;
    let _to_b = Helper::server(&lab.cg("b"), &ns, "serve-udp 127.0.0.1 9001")?;
    let p1 = lab.state.join("p1.toml");
    std::fs::write(
        &p1,
        "version = 1\n[sets]\npeers = [\"198.18.137.9\"]\n[services.a]\ncgroup = \"a\"\ndefaults = { egress = \"drop\" }\n[services.b]\ncgroup = \"b\"\ndefaults = { ingress = \"drop\" }\n[[services.b.ingress]]\nfrom = \"peers\"\nudp = [9001]\n",
    )?;
    let root = lab.root.display().to_string();
    let (ok, err, k1) = attach_no_wait(lab.segbpf(&[]), &p1, &lab.root)?;
    assert!(ok, "{err}");
    assert_eq!(directions_at(&root), (true, true));
    // The allowed probes work (the servers run): none -> none's server.
    let (good, tries) = probe_a_moment(&lab, "none", "127.0.0.1 9000")?;
    assert!(good > 0, "none -> none's server: {good}/{tries}");
    // With no follower, so the commands alone must link again.
    drop(k1);
    for pid in followers_of(&lab) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    // 1. The egress link detached, then `reload --services`.
    detach_link_behind(&lab, "link_svc_egress")?;
    assert_eq!(directions_become(&root, (true, false), 5), (true, false));
    let out = lab
        .segbpf(&["reload", "--services", "--cgroup-root", &root])
        .output()?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "reload: {stdout} {stderr}");
    assert_eq!(
        directions_at(&root),
        (true, true),
        "reload said {stdout} {stderr} but did not link egress again"
    );
    assert!(stderr.contains("linked again"), "{stderr}");
    let (bad, tries) = probe_a_moment(&lab, "a", "127.0.0.1 9000")?;
    assert!(tries > 5, "{tries} probes");
    assert_eq!(bad, 0, "a's dropped egress passed after the reload");

    // 1b. Both links detached: status names the cause (review 12 L4), and
    // a `set add` that changes nothing (a member already there) still
    // says the generation stays in force, so it links both again first
    // (review 12 L1).
    detach_link_behind(&lab, "link_svc_egress")?;
    detach_link_behind(&lab, "link_svc_ingress")?;
    assert_eq!(directions_become(&root, (false, false), 5), (false, false));
    let out = lab
        .segbpf(&["status", "--services", "--cgroup-root", &root])
        .output()?;
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        status.contains("NOT attached: neither link is in the kernel (detached by another tool"),
        "{status}"
    );
    let out = lab
        .segbpf(&[
            "set",
            "add",
            "--services",
            "peers",
            "198.18.137.9",
            "--cgroup-root",
            &root,
        ])
        .output()?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "set add: {stdout} {stderr}");
    assert!(stdout.contains("nothing changed"), "{stdout} {stderr}");
    assert_eq!(
        directions_at(&root),
        (true, true),
        "set add said {stdout} {stderr} but did not link again"
    );
    assert!(stderr.contains("linked again"), "{stderr}");

    // 2. The ingress link detached, then `attach --services` again.
    detach_link_behind(&lab, "link_svc_ingress")?;
    assert_eq!(directions_become(&root, (false, true), 5), (false, true));
    let out = lab
        .segbpf(&["status", "--services", "--cgroup-root", &root])
        .output()?;
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        status.contains("only egress is enforced (the ingress link is not in the kernel: detached by another tool"),
        "{status}"
    );
    let (ok, err, k2) = attach_no_wait(lab.segbpf(&[]), &p1, &lab.root)?;
    assert!(ok, "{err}");
    // (The follower this attach started could link it again too: what
    // the attach says is checked, and the kernel.)
    assert!(err.contains("linked again"), "{err}");
    assert_eq!(directions_at(&root), (true, true), "attach said {err}");
    let (bad, tries) = probe_a_moment(&lab, "none", "127.0.0.1 9001")?;
    assert!(tries > 5, "{tries} probes");
    assert_eq!(bad, 0, "none reached b's dropped ingress after the attach");

    // 3. The follower (started by that attach) links a detached link again
    // within seconds, and logs it.
    assert!(!followers_of(&lab).is_empty(), "no follower runs");
    detach_link_behind(&lab, "link_svc_ingress")?;
    assert_eq!(
        directions_become(&root, (true, true), 5),
        (true, true),
        "the follower did not link ingress again"
    );
    let log = std::fs::read_dir(&lab.state)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".follow.log"))
        .and_then(|f| std::fs::read_to_string(f).ok())
        .unwrap_or_default();
    assert!(log.contains("linked again"), "follower log: {log}");
    let (bad, _) = probe_a_moment(&lab, "none", "127.0.0.1 9001")?;
    assert_eq!(bad, 0, "none reached b's dropped ingress after the relink");
    let out = lab
        .segbpf(&["status", "--services", "--cgroup-root", &root])
        .output()?;
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!status.contains("PARTIALLY"), "{status}");
    let out = lab
        .segbpf(&["detach", "--services", "--cgroup-root", &root])
        .output()?;
    assert!(out.status.success());
    drop(k2);
    assert_eq!(directions_at(&root), (false, false));
    Ok(())
}
