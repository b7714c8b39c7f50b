//! The operators' functional test of the three-tier example, end to end:
//! web, app, db, an admin host and an outside host, each a namespace,
//! routed through a namespace that acts as the network. web, app and db
//! run segbpf with the SAME `examples/roles.toml` and pick their roles
//! from their own addresses (default-deny both ways, replies by connection
//! tracking). Every check is a real exchange: a TCP handshake plus a
//! message and its echo, or a UDP request and its response; what must
//! work is asserted to work and what must be blocked to fail.
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::{net::IpAddr, time::Duration};

use segbpf_tests::{Lab, net};

const T: Duration = Duration::from_millis(1500);

fn example_policy() -> String {
    format!("{}/../examples/roles.toml", env!("CARGO_MANIFEST_DIR"))
}

/// What enforces the policy on web, app and db.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Enforcer {
    Segbpf,
    /// `segbpf export nft` loaded with `nft -f` in each host's namespace.
    Nftables,
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn three_tier_functional_test() -> anyhow::Result<()> {
    matrix(Enforcer::Segbpf)
}

#[test]
#[ignore = "needs root and nftables: run `cargo xtask test`"]
fn nft_export_gives_the_same_verdicts() -> anyhow::Result<()> {
    matrix(Enforcer::Nftables)
}

fn matrix(enforcer: Enforcer) -> anyhow::Result<()> {
    let mut lab = Lab::new("tt")?;
    lab.route(&["10.10.255.254/16", "198.18.0.1/24"])?;
    for (name, addr) in [
        ("web", "10.10.1.10/16"),
        ("app", "10.10.1.20/16"),
        ("db", "10.10.1.30/16"),
        ("admin", "10.10.0.5/16"),
    ] {
        lab.add_host(name, &[addr])?;
        lab.default_route(name, "10.10.255.254")?;
    }
    lab.add_host("outside", &["198.18.0.10/24"])?;
    lab.default_route("outside", "198.18.0.1")?;

    let any: IpAddr = "0.0.0.0".parse()?;
    let addr = |h: &str| lab.host(h).addrs[0];
    let ns = |h: &str| lab.host(h).ns.name.clone();
    let mut servers = Vec::new();
    for (host, ports) in [
        ("web", &[80u16, 443, 22][..]),
        ("app", &[8080, 22]),
        ("db", &[5432, 3306, 22]),
        ("outside", &[25, 80]),
    ] {
        for p in ports {
            servers.push(net::Server::tcp_echo(&ns(host), any, *p)?);
        }
    }
    let _dns = net::Server::udp(&ns("outside"), any, 53, true)?;

    // The lab works without segbpf (so a failure below is segbpf's doing).
    assert!(net::tcp_exchange(
        &ns("web"),
        addr("web"),
        addr("db"),
        5432,
        T
    )?);
    assert!(net::tcp_exchange(
        &ns("outside"),
        addr("outside"),
        addr("app"),
        8080,
        T
    )?);

    for host in ["web", "app", "db"] {
        let out = lab.attach(host, &example_policy(), &[])?;
        assert!(
            out.contains(&format!("roles {host}")),
            "{host} picks its role: {out}"
        );
    }

    let tcp = |from: &str, to: &str, port: u16| {
        net::tcp_exchange(&ns(from), addr(from), addr(to), port, T).expect("tcp exchange")
    };
    let mut wrong = Vec::new();
    let mut expect = |what: String, got: bool, want: bool| {
        if got != want {
            wrong.push(format!(
                "{what}: {} but must be {}",
                verdict(got),
                verdict(want)
            ));
        }
    };
    expect("web -> app:8080".into(), tcp("web", "app", 8080), true);
    expect("app -> db:5432".into(), tcp("app", "db", 5432), true);
    expect("web -> db:5432".into(), tcp("web", "db", 5432), false);
    expect("app -> outside:25".into(), tcp("app", "outside", 25), false);
    expect("outside -> web:80".into(), tcp("outside", "web", 80), true);
    expect(
        "outside -> web:443".into(),
        tcp("outside", "web", 443),
        true,
    );
    expect(
        "outside -> app:8080".into(),
        tcp("outside", "app", 8080),
        false,
    );
    expect(
        "outside -> db:5432".into(),
        tcp("outside", "db", 5432),
        false,
    );
    for target in ["web", "app", "db"] {
        expect(
            format!("admin -> {target}:22"),
            tcp("admin", target, 22),
            true,
        );
        expect(
            format!("outside -> {target}:22"),
            tcp("outside", target, 22),
            false,
        );
    }
    expect("web -> app:22".into(), tcp("web", "app", 22), false);
    expect(
        "db -> outside:80 (base egress)".into(),
        tcp("db", "outside", 80),
        true,
    );
    for host in ["web", "app", "db", "admin"] {
        let ok = net::udp_exchange(&ns(host), addr(host), addr("outside"), 53, T)?;
        expect(format!("{host} -> outside udp/53 gets its reply"), ok, true);
    }
    assert!(
        wrong.is_empty(),
        "three-tier matrix:\n  {}",
        wrong.join("\n  ")
    );

    if enforcer == Enforcer::Nftables {
        return Ok(());
    }
    // Counters show the connection table at work on db.
    let status = lab.status_json("db")?;
    let established = status["attachments"][0]["counters"]["established"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        established > 0,
        "replies passed by connection tracking: {status}"
    );
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "works" } else { "is blocked" }
}
