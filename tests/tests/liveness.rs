//! Liveness from the kernel, not from pin files: another tool detaches
//! segbpf's pinned links (`BPF_LINK_DETACH`, as `bpftool link detach`
//! does) and leaves the pins. `status` (text and JSON) and the metrics must
//! say that nothing is enforced, `attach` must attach again instead of
//! "adopting" a dead attachment, and a running `attach` (the service) must
//! notice and attach again by itself. Traffic from real sockets shows
//! what the kernel does at each step.
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::{ffi::CString, os::unix::ffi::OsStrExt as _, path::Path, time::Duration};

use anyhow::ensure;
use segbpf::{
    attachment::pins::{Attachment, Roots},
    host::netns::Netns,
};
use segbpf_tests::{Lab, lab::Running, net};

/// Detaches the link pinned at `pin` as another tool would, leaving the
/// pin in place (`BPF_OBJ_GET`, then `BPF_LINK_DETACH`).
fn detach_behind_segbpfs_back(pin: &Path) -> anyhow::Result<()> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let path = CString::new(pin.as_os_str().as_bytes())?;
    // bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags, path_fd.
    let mut get = [0u64; 3];
    get[0] = path.as_ptr() as u64;
    // SAFETY: a zeroed bpf_attr prefix of the size passed, alive for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, get.as_mut_ptr(), 24usize) };
    ensure!(
        fd >= 0,
        "opening {}: {}",
        pin.display(),
        std::io::Error::last_os_error()
    );
    // bpf_attr for BPF_LINK_DETACH: link_fd.
    let mut detach = [0u32; 4];
    detach[0] = fd as u32;
    // SAFETY: as above.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, detach.as_mut_ptr(), 16usize) };
    let err = std::io::Error::last_os_error();
    // SAFETY: `fd` is the descriptor BPF_OBJ_GET gave us, closed once.
    unsafe { libc::close(fd as i32) };
    ensure!(rc == 0, "detaching {}: {err}", pin.display());
    Ok(())
}

/// Which of tcp/8080 (allowed) and tcp/9090 (closed by the policy, but
/// served) a real client on `cli` reaches on `srv`.
fn reachable(lab: &Lab) -> anyhow::Result<(bool, bool)> {
    Ok((
        lab.tcp_reachable("cli", "srv", 8080)?,
        lab.tcp_reachable("cli", "srv", 9090)?,
    ))
}

fn hook<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["attachments"][0]["links"]
        .as_array()
        .and_then(|l| l.iter().find(|h| h["hook"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

/// The value of `segbpf_attached{...hook="HOOK"}`.
fn attached_metric(metrics: &str, hook: &str) -> Option<u64> {
    metrics.lines().find_map(|l| {
        let (head, value) = l.rsplit_once(' ')?;
        (head.starts_with("segbpf_attached{") && head.contains(&format!("hook=\"{hook}\"")))
            .then(|| value.parse().ok())?
    })
}

/// Waits (up to 20 s) until `status` says `srv` enforces again.
fn wait_enforcing_again(lab: &Lab) -> anyhow::Result<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = lab.status_json("srv")?;
        if status["attachments"][0]["attached"] == true {
            return Ok(status);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "not attached again: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn links_detached_behind_segbpfs_back_are_reported_and_attached_again() -> anyhow::Result<()> {
    let mut lab = Lab::new("live")?;
    lab.add_host("srv", &["198.18.9.10/24"])?;
    lab.add_host("cli", &["198.18.9.20/24"])?;
    let ns = lab.host("srv").ns.name.clone();
    let addr = lab.host("srv").addrs[0];
    let _servers = [
        net::Server::tcp_echo(&ns, addr, 8080)?,
        net::Server::tcp_echo(&ns, addr, 9090)?,
    ];
    let policy = lab.write_policy("one.toml", &segbpf_tests::lab::one_tcp_port_policy(8080))?;
    let policy = policy.to_str().unwrap_or_default().to_string();
    lab.attach("srv", &policy, &[])?;
    let att: Attachment = Roots {
        bpffs: lab.bpffs.clone(),
        state: lab.state.clone(),
    }
    .attachment("eth0", &Netns::named(&ns)?);
    assert_eq!(reachable(&lab)?, (true, false), "enforcing after attach");
    let before = lab.status_json("srv")?;
    assert_eq!(before["attachments"][0]["attached"], true, "{before}");

    // Another tool detaches the XDP link; the pin stays.
    detach_behind_segbpfs_back(&att.link_xdp())?;
    assert!(att.link_xdp().exists());
    assert_eq!(
        reachable(&lab)?,
        (true, true),
        "the kernel no longer filters: the closed port is reached"
    );
    let status = lab.status_json("srv")?;
    let a = &status["attachments"][0];
    assert_eq!(a["attached"], false, "{status}");
    assert_eq!(hook(&status, "xdp")["live"], false, "{status}");
    assert!(
        hook(&status, "xdp")["problem"]
            .as_str()
            .is_some_and(|p| p.contains("detached")),
        "{status}"
    );
    assert_eq!(hook(&status, "tc")["live"], true, "{status}");
    let text = lab.segbpf_ok("srv", &["status", "eth0"])?;
    assert!(
        text.contains("NOT ENFORCING") && !text.contains("enforcing"),
        "{text}"
    );
    let metrics = segbpf::observe::metrics::render(&att)?;
    assert_eq!(attached_metric(&metrics, "xdp"), Some(0), "{metrics}");
    assert_eq!(attached_metric(&metrics, "tc"), Some(1), "{metrics}");

    // attach attaches it again (the policy is the one in force).
    let out = lab.attach("srv", &policy, &[])?;
    assert!(out.contains("xdp re-attached"), "{out}");
    let status = lab.status_json("srv")?;
    assert_eq!(status["attachments"][0]["attached"], true, "{status}");
    assert_eq!(hook(&status, "xdp")["live"], true, "{status}");
    assert_eq!(hook(&status, "tc")["live"], true, "{status}");
    assert_eq!(reachable(&lab)?, (true, false), "enforcing again");
    let metrics = segbpf::observe::metrics::render(&att)?;
    assert_eq!(attached_metric(&metrics, "xdp"), Some(1), "{metrics}");

    // A running attach (the service) notices by itself, both hooks. Its
    // metrics endpoint answers once it has adopted the attachment: from
    // then on only its watch can put the links back.
    let running = Running::new(lab.spawn(
        "srv",
        &[
            "attach",
            "eth0",
            "--policy",
            &policy,
            "--metrics",
            "127.0.0.1:9471",
        ],
    )?);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let scraped = loop {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "curl", "-sf"])
            .arg("http://127.0.0.1:9471/metrics")
            .output()?;
        if out.status.success() {
            break String::from_utf8(out.stdout)?;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the running attach never served its metrics"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(attached_metric(&scraped, "xdp"), Some(1), "{scraped}");
    assert_eq!(attached_metric(&scraped, "tc"), Some(1), "{scraped}");
    detach_behind_segbpfs_back(&att.link_tc())?;
    detach_behind_segbpfs_back(&att.link_xdp())?;
    let status = wait_enforcing_again(&lab)?;
    assert_eq!(hook(&status, "xdp")["live"], true, "{status}");
    assert_eq!(hook(&status, "tc")["live"], true, "{status}");
    assert_eq!(reachable(&lab)?, (true, false), "enforcing again");
    running.terminate()?;
    let out = running.wait()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("re-attached"), "{stderr}");
    Ok(())
}
