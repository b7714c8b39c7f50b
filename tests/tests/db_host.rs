//! End to end: segbpf attached with `examples/roles.toml` to the db host
//! (role picked from its own address) in a network namespace. Real TCP
//! connections from an app-tier address reach tcp/5432; from a web-tier
//! address they do not; `segbpf status` counters move accordingly.
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::{net::IpAddr, time::Duration};

use segbpf_tests::{Lab, net};

fn example_policy() -> String {
    format!("{}/../examples/roles.toml", env!("CARGO_MANIFEST_DIR"))
}

fn counter(status: &serde_json::Value, name: &str) -> u64 {
    status["attachments"][0]["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("counter {name} missing in {status}"))
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn db_accepts_app_tier_and_blocks_web_tier() -> anyhow::Result<()> {
    let mut lab = Lab::new("db")?;
    lab.add_host("db", &["10.10.1.30/16", "fd00:10:1::30/64"])?;
    // One client namespace holding an app-tier and a web-tier address.
    lab.add_host(
        "client",
        &["10.10.1.25/16", "10.10.1.15/16", "fd00:10:1::99/64"],
    )?;
    let db_ns = lab.host("db").ns.name.clone();
    let client_ns = lab.host("client").ns.name.clone();
    let db: IpAddr = "10.10.1.30".parse()?;
    let app: IpAddr = "10.10.1.25".parse()?;
    let web: IpAddr = "10.10.1.15".parse()?;
    let listener = net::Server::tcp_echo(&db_ns, "0.0.0.0".parse()?, 5432)?;
    let t = Duration::from_secs(2);

    // Before segbpf: both connect (the test can fail for the right reason).
    assert!(
        net::tcp_connect(&client_ns, web, db, 5432, t)?,
        "lab broken: web cannot reach db without segbpf"
    );

    let out = lab.attach("db", &example_policy(), &[])?;
    assert!(
        out.contains("roles db"),
        "role from the host's address: {out}"
    );
    let before = lab.status_json("db")?;
    let (rule0, drop0) = (counter(&before, "rule"), counter(&before, "default-drop"));
    let est0 = counter(&before, "established");

    assert!(
        net::tcp_connect(&client_ns, app, db, 5432, t)?,
        "app tier must reach db:5432"
    );
    assert!(
        !net::tcp_connect(&client_ns, web, db, 5432, t)?,
        "web tier must not reach db:5432"
    );
    assert!(
        !net::tcp_connect(&client_ns, app, db, 22, t)?,
        "ssh from outside admin_net must be blocked"
    );
    assert_eq!(
        listener.handled(),
        2,
        "exactly the pre-attach and the app connection were accepted"
    );

    let after = lab.status_json("db")?;
    let rule1 = counter(&after, "rule");
    let drop1 = counter(&after, "default-drop");
    let est1 = counter(&after, "established");
    // The app's SYN opens the connection through the rule; the rest of the
    // handshake (SYN-ACK out, ACK in) rides on the tracked connection.
    assert!(rule1 > rule0, "rule counter must move: {rule0} -> {rule1}");
    assert!(
        est1 >= est0 + 2,
        "established counter must move: {est0} -> {est1}"
    );
    // The web SYN is retried, and the ssh SYN too: at least 2 drops.
    assert!(
        drop1 >= drop0 + 2,
        "default-drop counter must move: {drop0} -> {drop1}"
    );
    assert_eq!(after["attachments"][0]["attached"], true);

    // Per-rule counters: each connection's SYN is judged by the db rule
    // (the rest rides on the connection table), so the rule counts exactly
    // the connections made.
    let rule_packets = |status: &serde_json::Value| -> u64 {
        status["attachments"][0]["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .find(|r| r["label"] == "roles.db.ingress[0]")
            .and_then(|r| r["packets"].as_u64())
            .expect("db rule counter")
    };
    let n0 = rule_packets(&after);
    for _ in 0..5 {
        assert!(net::tcp_connect(&client_ns, app, db, 5432, t)?);
    }
    let n1 = rule_packets(&lab.status_json("db")?);
    assert_eq!(
        n1 - n0,
        5,
        "the rule counted exactly the 5 connections sent through it"
    );

    // Detach restores connectivity and removes the pins.
    lab.segbpf_ok("db", &["detach", "eth0"])?;
    assert!(
        net::tcp_connect(&client_ns, web, db, 5432, t)?,
        "after detach web reaches db again"
    );
    let status = lab.segbpf("db", &["status", "eth0"])?;
    assert_eq!(
        status.status.code(),
        Some(1),
        "status of a detached interface fails"
    );
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn bad_policy_changes_nothing_and_names_line() -> anyhow::Result<()> {
    let mut lab = Lab::new("bad")?;
    lab.add_host("db", &["10.10.1.30/16"])?;
    let dir = std::env::temp_dir().join(format!("segbpf-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "version = 1\n[sets]\ndb = [\"10.10.1.300\"]\n")?;
    let out = lab.segbpf(
        "db",
        &[
            "attach",
            "eth0",
            "--policy",
            bad.to_str().unwrap(),
            "--no-wait",
        ],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("bad.toml:3:"),
        "error names file and line: {stderr}"
    );
    assert!(
        !lab.bpffs.join("net").exists(),
        "nothing pinned after a rejected policy"
    );
    // Over capacity: rejected with the limit, before the kernel changes.
    let out = lab.segbpf(
        "db",
        &[
            "attach",
            "eth0",
            "--policy",
            &example_policy(),
            "--peer-entries",
            "2",
            "--no-wait",
        ],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("holds at most 2"), "{stderr}");
    assert!(
        !lab.bpffs.join("net").exists(),
        "nothing pinned after a rejected capacity"
    );
    let usage = lab.segbpf("db", &["attach"])?;
    assert_eq!(usage.status.code(), Some(2), "usage errors exit 2");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn foreground_attach_leaves_enforcement_in_place_on_sigterm() -> anyhow::Result<()> {
    let mut lab = Lab::new("fg")?;
    lab.add_host("db", &["10.10.1.30/16"])?;
    let mut child = lab.spawn("db", &["attach", "eth0", "--policy", &example_policy()])?;
    // Wait until it enforces, then stop the process.
    lab.wait_enforcing("db")?;
    assert!(
        child.try_wait()?.is_none(),
        "attach stays in the foreground"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("detach eth0"),
        "says how to remove it: {stderr}"
    );
    let status = lab.status_json("db")?;
    assert_eq!(
        status["attachments"][0]["attached"], true,
        "still enforcing after exit"
    );
    Ok(())
}
