//! `cargo xtask demo`: web, app and db on one network, each running segbpf
//! with the same `examples/roles.toml` and picking its role from its own
//! address (default-deny in and out, replies by connection tracking); an
//! outside host behind the lab's router; a connectivity matrix of real TCP
//! exchanges; then everything is torn down.

use std::{net::IpAddr, time::Duration};

use anyhow::{Context as _, bail};
use segbpf_tests::{Lab, net};

struct Check {
    from: &'static str,
    to: &'static str,
    port: u16,
    allowed: bool,
    why: &'static str,
}

const MATRIX: &[Check] = &[
    Check {
        from: "web",
        to: "app",
        port: 8080,
        allowed: true,
        why: "web may call app on 8080",
    },
    Check {
        from: "app",
        to: "db",
        port: 5432,
        allowed: true,
        why: "app may call db on 5432",
    },
    Check {
        from: "web",
        to: "db",
        port: 5432,
        allowed: false,
        why: "web may not reach db",
    },
    Check {
        from: "outside",
        to: "web",
        port: 80,
        allowed: true,
        why: "web serves tcp/80 to anyone",
    },
    Check {
        from: "outside",
        to: "app",
        port: 8080,
        allowed: false,
        why: "app only serves web_nodes",
    },
    Check {
        from: "outside",
        to: "db",
        port: 5432,
        allowed: false,
        why: "db only serves app_nodes",
    },
    Check {
        from: "app",
        to: "outside",
        port: 25,
        allowed: false,
        why: "no egress rule for tcp/25",
    },
    Check {
        from: "app",
        to: "db",
        port: 22,
        allowed: false,
        why: "ssh only from admin_net",
    },
];

/// Runs the demo.
pub(crate) fn run() -> anyhow::Result<()> {
    let policy = std::fs::canonicalize(format!(
        "{}/../examples/roles.toml",
        env!("CARGO_MANIFEST_DIR")
    ))?
    .display()
    .to_string();
    let mut lab = Lab::new("demo")?;
    lab.route(&["10.10.255.254/16", "198.18.0.1/24"])?;
    for (name, addr) in [
        ("web", "10.10.1.10/16"),
        ("app", "10.10.1.20/16"),
        ("db", "10.10.1.30/16"),
    ] {
        lab.add_host(name, &[addr])?;
        lab.default_route(name, "10.10.255.254")?;
    }
    lab.add_host("outside", &["198.18.0.10/24"])?;
    lab.default_route("outside", "198.18.0.1")?;
    println!("lab: web 10.10.1.10, app 10.10.1.20, db 10.10.1.30, outside 198.18.0.10 (routed)");
    println!("policy: {policy}\n");

    let any: IpAddr = "0.0.0.0".parse()?;
    let mut listeners = Vec::new();
    for (host, ports) in [
        ("web", &[80u16][..]),
        ("app", &[8080]),
        ("db", &[5432, 22]),
        ("outside", &[25]),
    ] {
        let ns = lab.host(host).ns.name.clone();
        for p in ports {
            listeners.push(net::Server::tcp_echo(&ns, any, *p)?);
        }
    }
    for host in ["web", "app", "db"] {
        let out = lab
            .attach(host, &policy, &[])
            .with_context(|| format!("attach on {host}"))?;
        print!("{host}: {out}");
    }
    println!("\nconnectivity (real TCP exchanges; segbpf on web, app and db):");
    let mut wrong = 0;
    for c in MATRIX {
        let from = lab.host(c.from);
        let to = lab.host(c.to);
        let (src, dst) = (from.addrs[0], to.addrs[0]);
        let ok = net::tcp_exchange(&from.ns.name, src, dst, c.port, Duration::from_millis(1500))?;
        let verdict = if ok { "ALLOWED" } else { "BLOCKED" };
        let mark = if ok == c.allowed { "ok" } else { "UNEXPECTED" };
        if ok != c.allowed {
            wrong += 1;
        }
        println!(
            "  {verdict:<8} {:>7} -> {:<7} tcp/{:<5} {mark:<10} {}",
            c.from, c.to, c.port, c.why
        );
    }
    println!("\nsegbpf status on db:");
    print!("{}", lab.segbpf_ok("db", &["status", "eth0"])?);
    println!("\nsegbpf trace on db (the loaded program, dry run):");
    print!(
        "{}",
        lab.segbpf_ok(
            "db",
            &[
                "trace",
                "eth0",
                "--src",
                "10.10.1.10",
                "--dst",
                "10.10.1.30",
                "--proto",
                "tcp",
                "--dport",
                "5432"
            ]
        )?
    );
    drop(listeners);
    drop(lab);
    println!("\nlab torn down (namespaces, links and pins removed)");
    if wrong > 0 {
        bail!("{wrong} connectivity check(s) did not match the policy");
    }
    Ok(())
}
