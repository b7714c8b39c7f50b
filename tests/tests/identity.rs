//! An attachment is (network namespace, interface), and the namespace is
//! the kernel's, not a name segbpf was told.
//!
//! Two hosts whose interfaces share one name (`eth0`), driven with
//! `nsenter --net=...` and no `--netns`:
//! * they attach at the same moment with different policies, and each
//!   enforces its own (real TCP handshakes from a client);
//! * `status` inside each namespace shows only its own attachment;
//! * detaching one leaves the other enforcing;
//! * two attaches of one (namespace, interface) at the same moment give
//!   one clear outcome: exactly one attaches, the other then adopts that
//!   attachment (as a restarted `attach` does) and swaps its own policy in,
//!   and each says which it did.
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::{
    net::IpAddr,
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use segbpf_tests::{
    Lab,
    lab::{one_tcp_port_policy, segbpf_bin},
    net,
};

/// `nsenter --net=/run/netns/NS segbpf ARGS...`, with the lab's roots and
/// no `--netns`: segbpf must find the namespace itself.
fn nsenter(lab: &Lab, host: &str, args: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", lab.host(host).ns.name))
        .arg(segbpf_bin())
        .args(args)
        .env("SEGBPF_BPFFS", &lab.bpffs)
        .env("SEGBPF_STATE_DIR", &lab.state)
        .env_remove("SEGBPF_NETNS");
    c
}

fn run(mut c: Command) -> anyhow::Result<Output> {
    Ok(c.output()?)
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Whether a TCP handshake from the client reaches `dst:port` (a server
/// listens on both ports of both hosts, so only segbpf can refuse it).
fn open(lab: &Lab, dst: IpAddr, port: u16) -> anyhow::Result<bool> {
    let client = &lab.host("client");
    net::tcp_connect(
        &client.ns.name,
        client.addrs[0],
        dst,
        port,
        Duration::from_millis(700),
    )
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn same_interface_name_in_two_namespaces_entered_with_nsenter() -> anyhow::Result<()> {
    let mut lab = Lab::new("ident")?;
    lab.add_host("a", &["198.18.81.10/24"])?;
    lab.add_host("b", &["198.18.81.20/24"])?;
    lab.add_host("client", &["198.18.81.5/24"])?;
    let (a, b) = (lab.host("a").addrs[0], lab.host("b").addrs[0]);
    let mut servers = Vec::new();
    for (host, addr) in [("a", a), ("b", b)] {
        for port in [8080, 9090] {
            servers.push(net::Server::tcp_echo(&lab.host(host).ns.name, addr, port)?);
        }
    }
    let pa = lab.write_policy("a.toml", &one_tcp_port_policy(8080))?;
    let pb = lab.write_policy("b.toml", &one_tcp_port_policy(9090))?;

    // Both at the same moment, each from inside its own namespace.
    let spawn = |host: &str, p: &Path| {
        let mut c = nsenter(
            &lab,
            host,
            &[
                "attach",
                "eth0",
                "--policy",
                p.to_str().unwrap_or_default(),
                "--no-wait",
            ],
        );
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
    };
    let (ca, cb) = (spawn("a", &pa)?, spawn("b", &pb)?);
    let (oa, ob) = (ca.wait_with_output()?, cb.wait_with_output()?);
    assert_eq!(oa.status.code(), Some(0), "attach on a: {}", text(&oa));
    assert_eq!(ob.status.code(), Some(0), "attach on b: {}", text(&ob));

    // Each enforces its own policy.
    assert!(open(&lab, a, 8080)?, "a opens 8080");
    assert!(!open(&lab, a, 9090)?, "a's policy does not open 9090");
    assert!(open(&lab, b, 9090)?, "b opens 9090");
    assert!(!open(&lab, b, 8080)?, "b's policy does not open 8080");

    // Each namespace sees its own attachment only, and its own policy.
    for (host, file) in [("a", &pa), ("b", &pb)] {
        let o = run(nsenter(&lab, host, &["status", "--output", "json"]))?;
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        let atts = v["attachments"].as_array().cloned().unwrap_or_default();
        assert_eq!(atts.len(), 1, "{host}: {v}");
        let canonical = std::fs::canonicalize(file)?;
        assert_eq!(
            atts[0]["state"]["policy"].as_str(),
            canonical.to_str(),
            "{host}: {v}"
        );
        assert_eq!(
            atts[0]["netns"].as_str(),
            Some(lab.host(host).ns.name.as_str()),
            "the ip netns name is the label: {v}"
        );
    }
    // --netns NAME finds the same attachment as nsenter.
    let via_name = lab.status_json("a")?;
    assert_eq!(
        via_name["attachments"][0]["netns_inode"],
        serde_json::from_slice::<serde_json::Value>(
            &run(nsenter(&lab, "a", &["status", "--output", "json"]))?.stdout
        )?["attachments"][0]["netns_inode"]
    );

    // A second attach of a live attachment adopts it: the same policy is
    // kept as it is, another one is swapped in.
    let attach_a = |file: &Path| {
        run(nsenter(
            &lab,
            "a",
            &[
                "attach",
                "eth0",
                "--policy",
                file.to_str().unwrap_or_default(),
                "--no-wait",
            ],
        ))
    };
    let again = attach_a(&pa)?;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    let said = String::from_utf8_lossy(&again.stdout).to_string();
    assert!(
        said.starts_with("adopted") && said.contains("unchanged"),
        "{}",
        text(&again)
    );
    assert!(open(&lab, a, 8080)? && !open(&lab, a, 9090)?, "a unchanged");
    let other = attach_a(&pb)?;
    assert_eq!(other.status.code(), Some(0), "{}", text(&other));
    assert!(
        String::from_utf8_lossy(&other.stdout).starts_with("adopted"),
        "{}",
        text(&other)
    );
    assert!(
        open(&lab, a, 9090)? && !open(&lab, a, 8080)?,
        "a now enforces b's policy"
    );
    assert!(open(&lab, b, 9090)? && !open(&lab, b, 8080)?, "b untouched");

    // Detaching a leaves b enforcing.
    let o = run(nsenter(&lab, "a", &["detach", "eth0"]))?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // The kernel releases a link shortly after its last reference goes.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !(open(&lab, a, 9090)? && open(&lab, a, 8080)?) {
        assert!(
            std::time::Instant::now() < deadline,
            "a is not open again after detach"
        );
    }
    assert!(open(&lab, b, 9090)?, "b still opens 9090");
    assert!(!open(&lab, b, 8080)?, "b still enforces");
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn concurrent_attaches_of_one_interface_have_one_clear_outcome() -> anyhow::Result<()> {
    let mut lab = Lab::new("race")?;
    lab.add_host("a", &["198.18.82.10/24"])?;
    lab.add_host("client", &["198.18.82.5/24"])?;
    let a = lab.host("a").addrs[0];
    let _servers = [
        net::Server::tcp_echo(&lab.host("a").ns.name, a, 8080)?,
        net::Server::tcp_echo(&lab.host("a").ns.name, a, 9090)?,
    ];
    let files = [
        lab.write_policy("p8080.toml", &one_tcp_port_policy(8080))?,
        lab.write_policy("p9090.toml", &one_tcp_port_policy(9090))?,
    ];
    for round in 0..3 {
        let children = files
            .iter()
            .map(|f| {
                nsenter(
                    &lab,
                    "a",
                    &[
                        "attach",
                        "eth0",
                        "--policy",
                        f.to_str().unwrap_or_default(),
                        "--no-wait",
                    ],
                )
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let outs = children
            .into_iter()
            .map(std::process::Child::wait_with_output)
            .collect::<Result<Vec<_>, _>>()?;
        let both = format!("round {round}: {}\n---\n{}", text(&outs[0]), text(&outs[1]));
        assert!(outs.iter().all(|o| o.status.code() == Some(0)), "{both}");
        let said = |i: usize| String::from_utf8_lossy(&outs[i].stdout).to_string();
        let attached: Vec<usize> = (0..2)
            .filter(|&i| said(i).starts_with("attached"))
            .collect();
        let adopted: Vec<usize> = (0..2).filter(|&i| said(i).starts_with("adopted")).collect();
        assert_eq!((attached.len(), adopted.len()), (1, 1), "{both}");
        // The adopter came second: its policy is the one in force.
        let (open_port, closed_port) = if adopted[0] == 0 {
            (8080, 9090)
        } else {
            (9090, 8080)
        };
        assert!(
            open(&lab, a, open_port)?,
            "round {round}: the adopter's port"
        );
        assert!(
            !open(&lab, a, closed_port)?,
            "round {round}: the first policy is gone"
        );
        let o = run(nsenter(&lab, "a", &["detach", "eth0"]))?;
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    }
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn ip_netns_exec_is_refused_before_anything_is_pinned() -> anyhow::Result<()> {
    // `ip netns exec` gives its command a private /sys without the host's
    // bpffs; pins made there would vanish with that mount namespace, and
    // the firewall with them. segbpf says so and changes nothing.
    let mut lab = Lab::new("ipexec")?;
    lab.add_host("a", &["198.18.83.10/24"])?;
    let p = lab.write_policy("p.toml", &one_tcp_port_policy(8080))?;
    let o = Command::new("ip")
        .args(["netns", "exec", &lab.host("a").ns.name])
        .arg(segbpf_bin())
        .args(["attach", "eth0", "--policy"])
        .arg(&p)
        .arg("--no-wait")
        .env("SEGBPF_BPFFS", &lab.bpffs)
        .env("SEGBPF_STATE_DIR", &lab.state)
        .output()?;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("ip netns exec"),
        "the error names the cause: {}",
        text(&o)
    );
    let xdp = segbpf_tests::netns::sh(
        "ip",
        &["-n", &lab.host("a").ns.name, "-d", "link", "show", "eth0"],
    )?;
    assert!(!xdp.contains("xdp"), "nothing attached: {xdp}");
    let status = lab.segbpf_ok("a", &["status", "--output", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&status)?;
    assert_eq!(v["attachments"].as_array().map(Vec::len), Some(0), "{v}");
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn files_of_a_namespace_that_is_gone_are_removed_at_the_next_attach() -> anyhow::Result<()> {
    // A namespace with an attachment goes away (a container stops) with
    // nothing run to detach: its pins and state stay behind, keyed by its
    // inode. The next attach anywhere removes them, and only them: a live
    // namespace's attachment keeps its files and keeps enforcing.
    use std::os::unix::fs::MetadataExt as _;
    let mut lab = Lab::new("gone")?;
    lab.add_host("a", &["198.18.84.10/24"])?;
    lab.add_host("b", &["198.18.84.20/24"])?;
    lab.add_host("client", &["198.18.84.30/24"])?;
    let p = lab.write_policy("p.toml", &one_tcp_port_policy(8080))?;
    let p = p.display().to_string();
    let b_addr = lab.host("b").addrs[0];
    let _servers = [
        net::Server::tcp_echo(&lab.host("b").ns.name, b_addr, 8080)?,
        net::Server::tcp_echo(&lab.host("b").ns.name, b_addr, 9090)?,
    ];
    lab.attach("a", &p, &[])?;
    lab.attach("b", &p, &[])?;
    let inode = |host: &str| -> anyhow::Result<u64> {
        Ok(std::fs::metadata(format!("/run/netns/{}", lab.host(host).ns.name))?.ino())
    };
    let (a, b) = (inode("a")?, inode("b")?);
    let a_pins = lab.bpffs.join("net").join(a.to_string());
    let a_state = lab.state.join("net").join(a.to_string());
    let b_pins = lab.bpffs.join("net").join(b.to_string());
    let b_state = lab.state.join("net").join(b.to_string());
    assert!(a_pins.is_dir() && a_state.is_dir(), "a's files exist");
    // Namespace a goes away (its veth with it); the lab's own delete
    // later finds nothing.
    segbpf_tests::netns::ip(&["netns", "del", &lab.host("a").ns.name])?;
    assert!(a_pins.is_dir() && a_state.is_dir(), "left behind");

    // The kernel frees the namespace and detaches its links a moment
    // later; each attach of b (an adoption) prunes what is gone by then.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while a_pins.exists() || a_state.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the files of gone namespace net:[{a}] are still there: {} {}",
            a_pins.display(),
            a_state.display()
        );
        std::thread::sleep(Duration::from_millis(200));
        lab.attach("b", &p, &[])?;
    }
    assert!(b_pins.is_dir() && b_state.is_dir(), "b's files stay");
    assert!(lab.status_json("b")?["attachments"][0]["attached"] == true);
    assert!(open(&lab, b_addr, 8080)?, "b still lets 8080 in");
    assert!(!open(&lab, b_addr, 9090)?, "b still enforces");
    Ok(())
}
