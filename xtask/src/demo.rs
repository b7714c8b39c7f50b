//! `cargo xtask demo`: three hosts (web, app, db) on one bridge; segbpf
//! enforces `examples/roles.toml` on db, which picks its role from its own
//! address; a connectivity matrix of real TCP connections from web and app;
//! then everything is torn down.

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
        from: "app",
        to: "db",
        port: 5432,
        allowed: true,
        why: "db accepts tcp/5432 from app_nodes",
    },
    Check {
        from: "app",
        to: "db",
        port: 3306,
        allowed: true,
        why: "db accepts tcp/3306 from app_nodes",
    },
    Check {
        from: "web",
        to: "db",
        port: 5432,
        allowed: false,
        why: "web_nodes are not app_nodes",
    },
    Check {
        from: "web",
        to: "db",
        port: 3306,
        allowed: false,
        why: "web_nodes are not app_nodes",
    },
    Check {
        from: "app",
        to: "db",
        port: 22,
        allowed: false,
        why: "ssh only from admin_net",
    },
    Check {
        from: "web",
        to: "db",
        port: 8080,
        allowed: false,
        why: "db does not serve tcp/8080",
    },
];

/// Runs the demo.
pub fn run() -> anyhow::Result<()> {
    let policy = std::fs::canonicalize(format!(
        "{}/../examples/roles.toml",
        env!("CARGO_MANIFEST_DIR")
    ))?
    .display()
    .to_string();
    let mut lab = Lab::new("demo")?;
    for (name, addr) in [
        ("web", "10.10.1.10/16"),
        ("app", "10.10.1.20/16"),
        ("db", "10.10.1.30/16"),
    ] {
        lab.add_host(name, &[addr])?;
    }
    println!("lab: web 10.10.1.10, app 10.10.1.20, db 10.10.1.30 on one bridge; policy {policy}\n");
    let mut listeners = Vec::new();
    let db_ns = lab.host("db").ns.name.clone();
    for port in [5432u16, 3306, 22, 8080] {
        listeners.push(net::Listener::start(&db_ns, "0.0.0.0".parse()?, port)?);
    }
    // This slice enforces ingress only, without connection tracking: a
    // protected host would drop the replies to connections it opens itself,
    // so the demo protects the server tier (db) and uses web and app as
    // clients. The role comes from db's own address.
    let out = lab.attach("db", &policy, &[]).context("attach on db")?;
    print!("db: {out}");
    println!("\nconnectivity to db (real TCP handshakes, ingress enforced at XDP on db):");
    let mut wrong = 0;
    for c in MATRIX {
        let from = lab.host(c.from);
        let to = lab.host(c.to);
        let (src, dst): (IpAddr, IpAddr) = (from.addrs[0], to.addrs[0]);
        let ok = net::tcp_connect(&from.ns.name, src, dst, c.port, Duration::from_millis(1500))?;
        let verdict = if ok { "ALLOWED" } else { "BLOCKED" };
        let mark = if ok == c.allowed { "ok" } else { "UNEXPECTED" };
        if ok != c.allowed {
            wrong += 1;
        }
        println!(
            "  {verdict:<8} {:>3} ({src}) -> {:>3} ({dst}) tcp/{:<5} {mark:<10} {}",
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
