//! Drop telemetry end to end: rate-limited JSON Lines events from a
//! foreground `attach` under a flood (allowed connections still complete),
//! suppressed and lost events counted and reported, `monitor` reading the
//! events of a host whose `attach` has exited, and audit mode.
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::{io::Read as _, net::IpAddr, process::Command, time::Duration};

use segbpf_tests::{Lab, net};

fn example_policy() -> String {
    format!("{}/../examples/roles.toml", env!("CARGO_MANIFEST_DIR"))
}

fn sigterm(child: &std::process::Child) -> anyhow::Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    Ok(())
}

fn lab() -> anyhow::Result<Lab> {
    // Quiet hosts (IPv4 only, no IGMP/MLD of their own): the counters
    // compared below move only with the test's traffic.
    let mut lab = Lab::new("tel")?;
    lab.quiet_switch()?;
    lab.add_host("db", &["10.10.1.30/16"])?;
    lab.add_host("client", &["10.10.1.25/16", "10.10.1.15/16"])?;
    lab.quiet_host("db")?;
    lab.quiet_host("client")?;
    Ok(lab)
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn flood_events_are_rate_limited_json_lines() -> anyhow::Result<()> {
    let lab = lab()?;
    let (db_ns, client_ns) = (
        lab.host("db").ns.name.clone(),
        lab.host("client").ns.name.clone(),
    );
    let db: IpAddr = "10.10.1.30".parse()?;
    let (app, web): (IpAddr, IpAddr) = ("10.10.1.25".parse()?, "10.10.1.15".parse()?);
    let _pg = net::Server::tcp_echo(&db_ns, "0.0.0.0".parse()?, 5432)?;
    // examples/roles.toml: log_rate = 10; burst 5.
    let mut attach = lab.spawn(
        "db",
        &[
            "attach",
            "eth0",
            "--policy",
            &example_policy(),
            "--log-format",
            "json",
            "--log-burst",
            "5",
        ],
    )?;
    lab.wait_enforcing("db")?;

    let flood_secs = 4;
    let flood = {
        let ns = client_ns.clone();
        std::thread::spawn(move || {
            net::udp_flood(&ns, web, db, 9999, Duration::from_secs(flood_secs))
        })
    };
    // Allowed connections complete during the flood.
    let mut connected = 0;
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(400));
        if net::tcp_exchange(&client_ns, app, db, 5432, Duration::from_secs(2))? {
            connected += 1;
        }
    }
    let sent = flood
        .join()
        .map_err(|_| anyhow::anyhow!("flood panicked"))??;
    assert!(sent > 1000, "the flood sent only {sent} datagrams");
    assert_eq!(
        connected, 5,
        "allowed TCP exchanges complete during the flood"
    );
    std::thread::sleep(Duration::from_secs(6)); // one summary period
    sigterm(&attach)?;
    let mut stdout = String::new();
    attach
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)?;
    let status = attach.wait()?;
    assert_eq!(status.code(), Some(0));

    let mut events = Vec::new();
    let mut summaries = Vec::new();
    for line in stdout.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("not JSON: {line:?}: {e}"))?;
        match v["type"].as_str() {
            Some("event") => events.push(v),
            Some("summary") => summaries.push(v),
            other => anyhow::bail!("unknown line type {other:?}: {line}"),
        }
    }
    let flood_events: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["dport"] == 9999 && e["proto"] == "udp")
        .collect();
    assert!(
        !flood_events.is_empty(),
        "flood drops were reported: {stdout}"
    );
    // Every record carries its wall-clock time, RFC 3339 UTC, today.
    let today = segbpf::host::clock::rfc3339(std::time::SystemTime::now())[..10].to_string();
    for r in events.iter().chain(&summaries) {
        let t = r["time"].as_str().unwrap_or_default();
        assert!(
            t.len() == 24 && t.ends_with('Z') && t.as_bytes()[10] == b'T',
            "not RFC 3339: {r}"
        );
        assert!(
            t.starts_with(&today) || t < today.as_str(),
            "time from the future: {r}"
        );
    }
    for e in &flood_events {
        assert_eq!(e["verdict"], "drop");
        assert_eq!(e["audit"], false);
        assert_eq!(e["reason"], "default-drop");
        assert_eq!(e["src"], "10.10.1.15");
        assert_eq!(e["direction"], "ingress");
    }
    // Within rate * span + burst (+1 per CPU racing at a window edge).
    let ts: Vec<u64> = events.iter().filter_map(|e| e["ts_ns"].as_u64()).collect();
    let span = (ts.iter().max().unwrap() - ts.iter().min().unwrap()) as f64 / 1e9;
    let cpus = std::thread::available_parallelism()?.get() as f64;
    let bound = 10.0 * span + 5.0 + cpus * (span / 0.5 + 1.0);
    assert!(
        (events.len() as f64) <= bound,
        "{} events in {span:.1}s exceeds the limit (bound {bound:.0})",
        events.len()
    );
    assert!(
        summaries
            .iter()
            .any(|s| s["suppressed"].as_u64().unwrap_or(0) > 0),
        "a summary line reports suppressed events: {summaries:?}"
    );
    let st = lab.status_json("db")?;
    let suppressed = st["attachments"][0]["events"]["suppressed"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        suppressed > 1000,
        "status reports suppressed events: {suppressed}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn lost_events_are_counted_and_monitor_reads_after_attach_exited() -> anyhow::Result<()> {
    let lab = lab()?;
    let client_ns = lab.host("client").ns.name.clone();
    let db: IpAddr = "10.10.1.30".parse()?;
    let web: IpAddr = "10.10.1.15".parse()?;
    // A policy that asks for every drop, and no reader: the ring fills.
    let dir = std::env::temp_dir().join(format!("segbpf-tel-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let loud = dir.join("loud.toml");
    let text =
        std::fs::read_to_string(example_policy())?.replace("log_rate = 10 ", "log_rate = 1000000 ");
    anyhow::ensure!(text.contains("log_rate = 1000000"), "policy edit failed");
    std::fs::write(&loud, text)?;
    lab.attach("db", loud.to_str().unwrap(), &["--log-burst", "1000000"])?;
    net::udp_flood(&client_ns, web, db, 9999, Duration::from_secs(2))?;
    let st = lab.status_json("db")?;
    let ev = &st["attachments"][0]["events"];
    assert!(ev["emitted"].as_u64().unwrap_or(0) > 1000, "{ev}");
    assert!(
        ev["lost"].as_u64().unwrap_or(0) > 0,
        "a full ring loses events, counted: {ev}"
    );

    // No attach process runs: monitor drains what the ring holds.
    let mut monitor = lab.spawn("db", &["monitor", "eth0", "--log-format", "json"])?;
    std::thread::sleep(Duration::from_secs(2));
    sigterm(&monitor)?;
    let mut out = String::new();
    monitor
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)?;
    assert_eq!(monitor.wait()?.code(), Some(0));
    let n = out
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .is_ok_and(|v| v["type"] == "event" && v["dport"] == 9999)
        })
        .count();
    assert!(n > 1000, "monitor received the events ({n})");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn audit_mode_lets_denied_traffic_pass_and_reports_it() -> anyhow::Result<()> {
    let lab = lab()?;
    let (db_ns, client_ns) = (
        lab.host("db").ns.name.clone(),
        lab.host("client").ns.name.clone(),
    );
    let db: IpAddr = "10.10.1.30".parse()?;
    let web: IpAddr = "10.10.1.15".parse()?;
    let _pg = net::Server::tcp_echo(&db_ns, "0.0.0.0".parse()?, 5432)?;
    lab.attach("db", &example_policy(), &["--audit"])?;
    let mut monitor = lab.spawn("db", &["monitor", "eth0", "--log-format", "json"])?;
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        net::tcp_exchange(&client_ns, web, db, 5432, Duration::from_secs(2))?,
        "in audit mode the denied connection succeeds"
    );
    std::thread::sleep(Duration::from_millis(500));
    sigterm(&monitor)?;
    let mut out = String::new();
    monitor
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)?;
    monitor.wait()?;
    let audit = out.lines().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        (v["audit"] == true && v["dport"] == 5432 && v["src"] == "10.10.1.15").then_some(v)
    });
    let audit =
        audit.ok_or_else(|| anyhow::anyhow!("no audit event for web -> db:5432 in {out}"))?;
    assert_eq!(audit["reason"], "default-drop");
    let st = lab.segbpf_ok("db", &["status", "eth0"])?;
    assert!(st.contains("AUDIT"), "status shows the mode: {st}");
    Ok(())
}

/// A foreground `attach eth0` of the example policy on the lab's `db`
/// host serving metrics on `addr`, once it enforces (ended when dropped).
fn attach_with_metrics(lab: &Lab, addr: &str) -> anyhow::Result<segbpf_tests::lab::Running> {
    let attach = spawn_with_metrics(lab, addr)?;
    lab.wait_enforcing("db")?;
    Ok(attach)
}

/// `attach eth0 --policy examples/roles.toml --metrics ADDR` on db, in
/// the foreground, started (not waited for).
fn spawn_with_metrics(lab: &Lab, addr: &str) -> anyhow::Result<segbpf_tests::lab::Running> {
    Ok(segbpf_tests::lab::Running::new(lab.spawn(
        "db",
        &[
            "attach",
            "eth0",
            "--policy",
            &example_policy(),
            "--metrics",
            addr,
        ],
    )?))
}

/// `GET /metrics` from `addr` inside the namespace `ns` (curl).
fn scrape(ns: &str, addr: &str) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "curl",
            "-sf",
            &format!("http://{addr}/metrics"),
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The value of the sample `name{...}` whose labels include all of `labels`.
fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<u64> {
    metrics.lines().find_map(|l| {
        let (head, value) = l.rsplit_once(' ')?;
        (head.starts_with(&format!("{name}{{")) && labels.iter().all(|x| head.contains(x)))
            .then(|| value.parse().ok())?
    })
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn metrics_show_the_same_numbers_as_status() -> anyhow::Result<()> {
    let lab = lab()?;
    let (db_ns, client_ns) = (
        lab.host("db").ns.name.clone(),
        lab.host("client").ns.name.clone(),
    );
    let db: IpAddr = "10.10.1.30".parse()?;
    let (app, web): (IpAddr, IpAddr) = ("10.10.1.25".parse()?, "10.10.1.15".parse()?);
    let _pg = net::Server::tcp_echo(&db_ns, "0.0.0.0".parse()?, 5432)?;
    let attach = attach_with_metrics(&lab, "127.0.0.1:9469")?;
    for _ in 0..3 {
        assert!(net::tcp_exchange(
            &client_ns,
            app,
            db,
            5432,
            Duration::from_secs(2)
        )?);
    }
    assert!(!net::tcp_exchange(
        &client_ns,
        web,
        db,
        5432,
        Duration::from_millis(500)
    )?);
    std::thread::sleep(Duration::from_millis(300));
    // A refused change (a policy that does not parse) is in the metrics.
    let bad = lab.state.join("bad.toml");
    std::fs::write(&bad, "version = 1\n[defaults]\ningress = \"sometimes\"\n")?;
    let refused = lab.segbpf(
        "db",
        &[
            "reload",
            "eth0",
            "--policy",
            bad.to_str().unwrap_or_default(),
        ],
    )?;
    assert_eq!(refused.status.code(), Some(1));
    // Quiesce: compare a snapshot of status with a scrape taken right after.
    let status = lab.status_json("db")?;
    let metrics = scrape(&db_ns, "127.0.0.1:9469")?;
    attach.terminate()?;
    attach.wait()?;

    let a = &status["attachments"][0];
    let rule = a["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .find(|r| r["label"] == "roles.db.ingress[0]")
        .expect("db rule");
    assert_eq!(rule["packets"], 3);
    assert_eq!(
        sample(
            &metrics,
            "segbpf_rule_packets_total",
            &["rule=\"roles.db.ingress[0]\""]
        ),
        rule["packets"].as_u64(),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "segbpf_rule_bytes_total",
            &["rule=\"roles.db.ingress[0]\""]
        ),
        rule["bytes"].as_u64()
    );
    let drops = a["directions"]["ingress"]["default-drop"]["packets"].as_u64();
    assert!(drops.unwrap_or(0) > 0);
    assert_eq!(
        sample(
            &metrics,
            "segbpf_packets_total",
            &["direction=\"ingress\"", "reason=\"default-drop\""]
        ),
        drops
    );
    assert_eq!(
        sample(&metrics, "segbpf_events_total", &["outcome=\"emitted\""]),
        a["events"]["emitted"].as_u64()
    );
    assert_eq!(
        sample(&metrics, "segbpf_conntrack_size", &["iface=\"eth0\""]),
        a["conntrack"]["size"].as_u64()
    );
    assert_eq!(
        sample(&metrics, "segbpf_build_info", &["version="]),
        Some(1)
    );
    assert_eq!(
        sample(&metrics, "segbpf_policy_generation", &["iface=\"eth0\""]),
        a["state"]["generation"].as_u64()
    );
    assert_eq!(
        sample(&metrics, "segbpf_last_reload_success", &["iface=\"eth0\""]),
        Some(0),
        "the refused reload: {metrics}"
    );
    assert!(
        sample(
            &metrics,
            "segbpf_last_reload_timestamp_seconds",
            &["iface=\"eth0\""]
        )
        .unwrap_or(0)
            > 1_700_000_000
    );
    assert!(!metrics.contains("line=\""), "no line labels: {metrics}");
    Ok(())
}

/// One HTTP/1.1 request on a fresh connection from inside `ns`; the
/// status line, or an error (a read timeout of `within` included).
fn http(
    ns: &segbpf_tests::netns::Netns,
    request: &'static str,
    within: Duration,
) -> anyhow::Result<String> {
    ns.run(move || -> anyhow::Result<String> {
        use std::io::Write as _;
        let mut s = std::net::TcpStream::connect("127.0.0.1:9470")?;
        s.set_read_timeout(Some(within))?;
        s.write_all(request.as_bytes())?;
        let mut head = [0u8; 64];
        let n = s.read(&mut head)?;
        Ok(String::from_utf8_lossy(&head[..n])
            .lines()
            .next()
            .unwrap_or_default()
            .to_string())
    })?
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn metrics_server_stays_up_under_idle_connections_and_answers_only_get_metrics()
-> anyhow::Result<()> {
    let lab = lab()?;
    let attach = attach_with_metrics(&lab, "127.0.0.1:9470")?;
    let ns = &lab.host("db").ns;
    // 200 connections that never send a byte.
    let idle = ns.run(|| {
        (0..200)
            .map(|_| std::net::TcpStream::connect("127.0.0.1:9470"))
            .collect::<Result<Vec<_>, _>>()
    })??;
    let get = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let status = http(ns, get, Duration::from_secs(1))?;
    assert_eq!(status, "HTTP/1.1 200 OK", "a scrape answers within 1 s");
    for other in [
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /metrics/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        "DELETE /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ] {
        let status = http(ns, other, Duration::from_secs(1))?;
        assert_eq!(status, "HTTP/1.1 404 Not Found", "{other:?}");
    }
    // The idle connections are closed once the header timeout passes.
    let mut first = idle.into_iter().next().expect("an idle connection");
    first.set_read_timeout(Some(Duration::from_secs(15)))?;
    let mut buf = [0u8; 16];
    let n = first.read(&mut buf);
    assert!(
        matches!(n, Ok(0))
            || n.is_err()
                && !matches!(
                    n.as_ref().map_err(std::io::Error::kind),
                    Err(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
                ),
        "an idle connection is closed by the server: {n:?}"
    );
    // Scrapes keep working.
    assert_eq!(http(ns, get, Duration::from_secs(1))?, "HTTP/1.1 200 OK");
    attach.terminate()?;
    attach.wait()?;
    Ok(())
}

/// `status`, the metrics and `flows` count a connection-table entry whose
/// timeout has passed as no flow (it stays in the LRU table until reused):
/// a closed TCP connection (closing timeout 10 s) is counted while live
/// and not after; a connection held open stays counted.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn status_and_metrics_count_only_live_flows() -> anyhow::Result<()> {
    let lab = lab()?;
    let attach = attach_with_metrics(&lab, "127.0.0.1:9471")?;
    // Real sockets of the kernel's stack: app (10.10.1.25) to db:5432,
    // allowed by examples/roles.toml.
    let listener = lab.host("db").ns.run(|| {
        let l = std::net::TcpListener::bind("10.10.1.30:5432")?;
        l.set_nonblocking(false)?;
        anyhow::Ok(l)
    })??;
    let connect = || -> anyhow::Result<(std::net::TcpStream, std::net::TcpStream)> {
        let client = lab.host("client").ns.run(|| {
            let s = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            s.bind(&"10.10.1.25:0".parse::<std::net::SocketAddr>()?.into())?;
            s.connect_timeout(
                &"10.10.1.30:5432".parse::<std::net::SocketAddr>()?.into(),
                Duration::from_secs(2),
            )?;
            anyhow::Ok(std::net::TcpStream::from(s))
        })??;
        let (server, _) = listener.accept()?;
        Ok((client, server))
    };
    let held = connect()?;
    let (client, server) = connect()?;
    // Both sides close: the flow is closing (half-open table, 10 s).
    drop(client);
    drop(server);
    std::thread::sleep(Duration::from_millis(300));
    let closed_at = std::time::Instant::now();
    let ct = |st: &serde_json::Value| st["attachments"][0]["conntrack"].clone();
    let flows = || -> anyhow::Result<usize> {
        let v: serde_json::Value =
            serde_json::from_str(&lab.segbpf_ok("db", &["flows", "eth0", "--output", "json"])?)?;
        Ok(v["flows"].as_array().map_or(0, Vec::len))
    };
    let before = ct(&lab.status_json("db")?);
    assert_eq!(before["entries"], 1, "the held connection: {before}");
    assert_eq!(before["half_open_entries"], 1, "the closed one: {before}");
    assert_eq!(flows()?, 2);

    // Past the closing timeout (10 s; the kernel's clock is coarse).
    std::thread::sleep(Duration::from_secs(11).saturating_sub(closed_at.elapsed()));
    let after = ct(&lab.status_json("db")?);
    assert_eq!(after["entries"], 1, "the held connection: {after}");
    assert_eq!(
        after["half_open_entries"], 0,
        "the closed connection expired: {after}"
    );
    assert!(after["expired_entries"].as_u64() >= Some(1), "{after}");
    assert_eq!(after["table_half_open_entries"], 0, "{after}");
    assert_eq!(flows()?, 1);

    // The metrics sample the tables every 10 s: scrape until a sample
    // taken past the expiry shows (one is due within 10 s).
    let db_ns = lab.host("db").ns.name.clone();
    let scrape = || scrape(&db_ns, "127.0.0.1:9471");
    let half_open = |m: &str| sample(m, "segbpf_conntrack_half_open_entries", &["iface=\"eth0\""]);
    let deadline = closed_at + Duration::from_secs(25);
    let mut metrics = scrape()?;
    while half_open(&metrics) != Some(0) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        metrics = scrape()?;
    }
    assert_eq!(half_open(&metrics), Some(0), "{metrics}");
    assert_eq!(
        sample(&metrics, "segbpf_conntrack_entries", &["iface=\"eth0\""]),
        Some(1),
        "{metrics}"
    );
    drop(held);
    attach.terminate()?;
    attach.wait()?;
    Ok(())
}

/// `attach --metrics ADDR` started while another process still holds ADDR
/// for a moment (a segbpf just detached or told to stop) waits for it
/// and comes up serving.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn metrics_address_held_for_a_moment_is_waited_for() -> anyhow::Result<()> {
    let lab = lab()?;
    let db_ns = lab.host("db").ns.name.clone();
    let held = lab
        .host("db")
        .ns
        .run(|| std::net::TcpListener::bind("127.0.0.1:9472"))??;
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        drop(held);
    });
    let attach = attach_with_metrics(&lab, "127.0.0.1:9472");
    release
        .join()
        .map_err(|_| anyhow::anyhow!("release thread panicked"))?;
    let attach = attach?;
    let metrics = scrape(&db_ns, "127.0.0.1:9472")?;
    assert!(
        sample(&metrics, "segbpf_build_info", &["version="]) == Some(1),
        "{metrics}"
    );
    attach.terminate()?;
    attach.wait()?;
    Ok(())
}

/// `attach --metrics ADDR` on an address held the whole time gives up
/// after a short wait (said on stderr): exit 1, the address named, and
/// nothing attached.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn metrics_address_held_throughout_fails_with_nothing_attached() -> anyhow::Result<()> {
    let lab = lab()?;
    let held = lab
        .host("db")
        .ns
        .run(|| std::net::TcpListener::bind("127.0.0.1:9473"))??;
    let mut attach = spawn_with_metrics(&lab, "127.0.0.1:9473")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while attach.try_wait()?.is_none() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "attach kept running although the address is held"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = attach.wait()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("127.0.0.1:9473") && stderr.contains("in use"),
        "the error names the address: {stderr}"
    );
    assert!(
        stderr.contains("waiting up to"),
        "it said it waits: {stderr}"
    );
    let status = lab.segbpf("db", &["status", "eth0", "--output", "json"])?;
    let attached = serde_json::from_slice::<serde_json::Value>(&status.stdout)
        .ok()
        .is_some_and(|v| v["attachments"][0]["attached"] == true);
    assert!(
        !attached,
        "nothing attached: {}",
        String::from_utf8_lossy(&status.stdout)
    );
    drop(held);
    Ok(())
}

/// `attach --metrics ADDR` stopped by SIGTERM while it waits for a held
/// address exits 1 saying nothing was applied, and the policy in force
/// before stays (outside review 14: it exited 0 without a word).
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn metrics_wait_ended_by_a_signal_fails_with_the_previous_policy_in_force() -> anyhow::Result<()> {
    let lab = lab()?;
    lab.attach("db", &example_policy(), &[])?;
    let before = lab.segbpf("db", &["status", "eth0", "--output", "json"])?;
    let generation = |out: &std::process::Output| {
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .map(|v| v["attachments"][0]["state"]["generation"].clone())
    };
    let held = lab
        .host("db")
        .ns
        .run(|| std::net::TcpListener::bind("127.0.0.1:9474"))??;
    let attach = spawn_with_metrics(&lab, "127.0.0.1:9474")?;
    std::thread::sleep(Duration::from_millis(1200));
    attach.terminate()?;
    let out = attach.wait()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("nothing was applied") && stderr.contains("127.0.0.1:9474"),
        "it says why and that nothing changed: {stderr}"
    );
    let after = lab.segbpf("db", &["status", "eth0", "--output", "json"])?;
    assert!(
        generation(&before).is_some_and(|g| !g.is_null()),
        "{before:?}"
    );
    assert_eq!(
        generation(&before),
        generation(&after),
        "the policy in force before stays: {}",
        String::from_utf8_lossy(&after.stdout)
    );
    drop(held);
    Ok(())
}
