//! The lockout guard when the process applying a `--confirm` change is
//! killed while a foreground `attach` watches the policy: whatever moment
//! the applier dies at, after the deadline the previous policy is in force
//! (the watcher does not re-apply the unconfirmed one), and the interface is
//! never left open on the way. Checked with real TCP handshakes.
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::{path::Path, time::Duration};

use segbpf_tests::{
    Lab,
    lab::{Running, one_tcp_port_policy, segbpf_bin},
    net,
};

fn reachable(lab: &Lab, port: u16) -> anyhow::Result<bool> {
    lab.tcp_reachable("client", "srv", port)
}

fn pending(lab: &Lab) -> anyhow::Result<bool> {
    Ok(!lab.status_json("srv")?["attachments"][0]["pending"].is_null())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn killed_applier_under_a_foreground_attach_ends_on_the_previous_policy() -> anyhow::Result<()> {
    let mut lab = Lab::new("gkill")?;
    lab.add_host("srv", &["198.18.84.10/24"])?;
    lab.add_host("client", &["198.18.84.5/24"])?;
    let srv = lab.host("srv").addrs[0];
    let _servers = [8080, 9090, 7070]
        .into_iter()
        .map(|p| net::Server::tcp_echo(&lab.host("srv").ns.name, srv, p))
        .collect::<Result<Vec<_>, _>>()?;
    let a = lab.write_policy("a.toml", &one_tcp_port_policy(8080))?;
    let b = lab.write_policy("b.toml", &one_tcp_port_policy(9090))?;
    let attach = Running::new(lab.spawn("srv", &["attach", "eth0", "--policy", path(&a)])?);
    lab.wait_enforcing("srv")?;
    assert!(reachable(&lab, 8080)? && !reachable(&lab, 9090)?);

    for delay_ms in [0u64, 40, 150, 600] {
        let applier = std::process::Command::new(segbpf_bin())
            .args(["--netns", &lab.host("srv").ns.name])
            .args(["reload", "eth0", "--policy", path(&b), "--confirm", "3"])
            .env("SEGBPF_BPFFS", &lab.bpffs)
            .env("SEGBPF_STATE_DIR", &lab.state)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let applier = Running::new(applier);
        std::thread::sleep(Duration::from_millis(delay_ms));
        drop(applier); // SIGKILL (a no-op if it already finished), then reaped
        // Until the guard has acted, and a little after: never open.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut settled = None;
        loop {
            assert!(
                !reachable(&lab, 7070)?,
                "delay {delay_ms} ms: a port no policy opens was reachable"
            );
            if settled.is_none() && !pending(&lab)? {
                settled = Some(std::time::Instant::now());
            }
            if settled.is_some_and(|t| t.elapsed() > Duration::from_secs(3)) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "delay {delay_ms} ms: the guard never acted"
            );
        }
        assert!(
            reachable(&lab, 8080)?,
            "delay {delay_ms} ms: the previous policy is in force"
        );
        assert!(
            !reachable(&lab, 9090)?,
            "delay {delay_ms} ms: the unconfirmed policy is gone"
        );
        let status = lab.status_json("srv")?;
        let canonical = std::fs::canonicalize(&a)?;
        assert_eq!(
            status["attachments"][0]["state"]["policy"].as_str(),
            canonical.to_str(),
            "delay {delay_ms} ms: the state names the previous file"
        );
    }
    attach.terminate()?;
    let out = attach.wait()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}
