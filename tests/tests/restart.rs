//! `attach` as a service runs it: restarted without a gap, and telling
//! the service manager (systemd `Type=notify`) what it is doing.
//!
//! * The foreground `attach` is killed with SIGKILL five times and started
//!   again with the same command while a client probes an allowed and a
//!   denied port without pause (real TCP handshakes): not one wrong
//!   outcome, and the last process keeps running (it adopts the
//!   attachment each time instead of failing with "already attached").
//! * With `NOTIFY_SOCKET` set, `READY=1` arrives only once the policy is in
//!   force, and a SIGHUP reload is framed by `RELOADING=1` and `READY=1`.
//! * A foreground `attach` whose attachment was detached and made again by
//!   other commands stops instead of running beside the new one.
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::{
    os::unix::net::UnixDatagram,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use segbpf_tests::{
    Lab,
    lab::{Running, one_tcp_port_policy},
    net,
};

fn lab(tag: &str) -> anyhow::Result<(Lab, String)> {
    let mut lab = Lab::new(tag)?;
    lab.add_host("srv", &["198.18.85.10/24"])?;
    lab.add_host("client", &["198.18.85.5/24"])?;
    let policy = lab.write_policy("p.toml", &one_tcp_port_policy(8080))?;
    let policy = policy.to_str().unwrap_or_default().to_string();
    Ok((lab, policy))
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn sigkilled_enforcer_restarted_five_times_never_misjudges() -> anyhow::Result<()> {
    let (lab, policy) = lab("restart")?;
    let srv = lab.host("srv").addrs[0];
    let _servers = [8080, 9090]
        .into_iter()
        .map(|p| net::Server::tcp_echo(&lab.host("srv").ns.name, srv, p))
        .collect::<Result<Vec<_>, _>>()?;
    let args = ["attach", "eth0", "--policy", policy.as_str()];
    let mut attach = Running::new(lab.spawn("srv", &args)?);
    lab.wait_enforcing("srv")?;

    // The prober: an allowed and a denied handshake, over and over.
    let stop = Arc::new(AtomicBool::new(false));
    let (probes, wrong) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client = lab.host("client");
    let (ns, src) = (client.ns.name.clone(), client.addrs[0]);
    let prober = {
        let (stop, probes, wrong) = (stop.clone(), probes.clone(), wrong.clone());
        std::thread::spawn(move || -> anyhow::Result<Vec<String>> {
            let mut what = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let allowed = net::tcp_connect(&ns, src, srv, 8080, Duration::from_secs(3))?;
                let denied = net::tcp_connect(&ns, src, srv, 9090, Duration::from_millis(300))?;
                probes.fetch_add(2, Ordering::Relaxed);
                if !allowed {
                    wrong.fetch_add(1, Ordering::Relaxed);
                    what.push("an allowed handshake failed".into());
                }
                if denied {
                    wrong.fetch_add(1, Ordering::Relaxed);
                    what.push("a denied handshake completed".into());
                }
            }
            Ok(what)
        })
    };

    for round in 0..5 {
        std::thread::sleep(Duration::from_millis(700));
        drop(attach); // SIGKILL, reaped
        attach = Running::new(lab.spawn("srv", &args)?);
        // Up again: the new process says it adopted the attachment.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let state = lab.status_json("srv")?;
            assert_eq!(
                state["attachments"][0]["attached"], true,
                "round {round}: enforcing throughout"
            );
            if attach.try_wait()?.is_some() {
                let out = attach.wait()?;
                panic!(
                    "round {round}: the restarted attach exited: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            if Instant::now() > deadline {
                anyhow::bail!("round {round}: no adoption within 30 s");
            }
            std::thread::sleep(Duration::from_millis(200));
            if state["attachments"][0]["state"]["generation"].as_u64() == Some(1) {
                break; // same policy: kept, not swapped
            }
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let what = prober
        .join()
        .map_err(|_| anyhow::anyhow!("prober panicked"))??;
    let n = probes.load(Ordering::Relaxed);
    assert!(n >= 10, "only {n} probes ran");
    assert_eq!(
        wrong.load(Ordering::Relaxed),
        0,
        "{n} probes, wrong outcomes: {what:?}"
    );
    assert!(
        attach.try_wait()?.is_none(),
        "the last attach keeps running"
    );
    attach.terminate()?;
    let out = attach.wait()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("adopted"), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "logs to a pipe carry no escape codes: {stderr:?}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn notify_socket_hears_ready_only_when_enforcing_and_reloads() -> anyhow::Result<()> {
    let (lab, policy) = lab("notify")?;
    let sock_path = lab.state.with_extension("notify");
    let _ = std::fs::remove_file(&sock_path);
    let sock = UnixDatagram::bind(&sock_path)?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut cmd = std::process::Command::new(segbpf_tests::lab::segbpf_bin());
    cmd.args(["--netns", &lab.host("srv").ns.name])
        .args(["attach", "eth0", "--policy", &policy])
        .env("SEGBPF_BPFFS", &lab.bpffs)
        .env("SEGBPF_STATE_DIR", &lab.state)
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let attach = Running::new(cmd.spawn()?);
    let recv = || -> anyhow::Result<String> {
        let mut buf = vec![0u8; 4096];
        let n = sock.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    let first = recv()?;
    assert!(first.lines().any(|l| l == "READY=1"), "{first}");
    // When READY arrives, the policy is already in force.
    let state = lab.status_json("srv")?;
    assert_eq!(state["attachments"][0]["attached"], true, "{state}");

    attach.signal(nix::sys::signal::Signal::SIGHUP)?;
    let reloading = recv()?;
    assert!(
        reloading.lines().any(|l| l == "RELOADING=1")
            && reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading}"
    );
    let ready = recv()?;
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");

    attach.terminate()?;
    let stopping = recv()?;
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    attach.wait()?;
    let _ = std::fs::remove_file(&sock_path);
    Ok(())
}

/// A foreground `attach` whose attachment is detached and made again by
/// other commands (`detach`, then a new `attach` within a second) stops:
/// identity from the kernel (the pinned event ring's id), not from the
/// pins' existence, so it never keeps running beside the new one.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn an_attach_whose_attachment_was_detached_and_made_again_stops() -> anyhow::Result<()> {
    let (lab, policy) = lab("reatt")?;
    let args = ["attach", "eth0", "--policy", policy.as_str()];
    let mut old = Running::new(lab.spawn("srv", &args)?);
    lab.wait_enforcing("srv")?;
    lab.segbpf_ok("srv", &["detach", "eth0"])?;
    lab.attach("srv", &policy, &[])?;
    let start = Instant::now();
    let mut exited = None;
    while start.elapsed() < Duration::from_secs(15) {
        if let Some(status) = old.try_wait()? {
            exited = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        exited.is_some_and(|s| s.success()),
        "the old attach still runs (or failed: {exited:?}) 15 s after its attachment was replaced"
    );
    // The new attachment is untouched by the old process leaving.
    lab.wait_enforcing("srv")?;
    lab.segbpf_ok("srv", &["detach", "eth0"])?;
    Ok(())
}
