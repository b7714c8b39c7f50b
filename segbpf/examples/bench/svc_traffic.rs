//! Loopback traffic between two services with real TCP sockets: TCP_RR
//! (1-byte request/response round trips per second over one connection)
//! and stream throughput (bulk send, MB/s), over 127.0.0.1 and ::1,
//! between a server process in service `db`'s cgroup and a client
//! process in service `app`'s, below a scratch cgroup root. Cases: no
//! program, the empty `cgroup_skb` program on the root (both
//! directions), and segbpf's services attachment with a policy that
//! allows the pair (`db` accepts `from_services = ["app"]`, `app` has an
//! egress allow-list and `egress` default drop). Rounds interleave the
//! cases; medians.
//!
//! The peers are this bench binary run as `bench --svc-peer CGROUP OP
//! ...` ([`peer`]), so the same code runs under systemd in
//! `systemd_ipaddressallow` (`SEGBPF_BENCH_ONLY=services-systemd`):
//! this machine's systemd booted by systemd-nspawn, the pair as two
//! transient units with and without `IPAddressDeny=any
//! IPAddressAllow=localhost`.

use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use segbpf::{
    attachment::{pins::Roots, services as engine},
    host::cgroups::CgroupRoot,
    policy::Policy,
};
use segbpf_tests::nspawn::Nspawn;
use serde_json::json;

/// One peer: `CGROUP serve ADDR PORT` (runs until killed; prints
/// `listening` once it listens), `CGROUP rr ADDR PORT SECS` or `CGROUP
/// stream ADDR PORT SECS` (prints one JSON line). CGROUP: a cgroup v2
/// directory the process moves itself into before any socket, or `-`.
pub(crate) fn peer(args: &[String]) -> anyhow::Result<()> {
    let [cg, op, addr, port, rest @ ..] = args else {
        anyhow::bail!("usage: --svc-peer CGROUP serve|rr|stream ADDR PORT [SECS]");
    };
    if cg != "-" {
        std::fs::write(
            Path::new(cg).join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .with_context(|| format!("joining {cg}"))?;
    }
    let to = SocketAddr::new(addr.parse()?, port.parse()?);
    let secs: f64 = rest.first().map_or(Ok(2.0), |s| s.parse())?;
    match op.as_str() {
        "serve" => serve(to),
        "rr" => {
            let mut c = connect(to)?;
            c.write_all(b"r")?;
            let start = Instant::now();
            let mut n = 0u64;
            let mut b = [0u8; 1];
            while start.elapsed().as_secs_f64() < secs {
                c.write_all(b"x")?;
                c.read_exact(&mut b)?;
                n += 1;
            }
            let per_s = n as f64 / start.elapsed().as_secs_f64();
            println!("{}", json!({"op": "rr", "per_s": per_s}));
            Ok(())
        }
        "stream" => {
            let mut c = connect(to)?;
            c.write_all(b"s")?;
            let buf = vec![0x5au8; 128 * 1024];
            let start = Instant::now();
            while start.elapsed().as_secs_f64() < secs {
                c.write_all(&buf)?;
            }
            c.shutdown(Shutdown::Write)?;
            // The receiver's count once it has read everything: what was
            // delivered, not what sits in the socket buffers.
            let mut got = [0u8; 8];
            c.read_exact(&mut got)?;
            let bytes = u64::from_be_bytes(got);
            let mb_s = bytes as f64 / 1e6 / start.elapsed().as_secs_f64();
            println!("{}", json!({"op": "stream", "mb_s": mb_s}));
            Ok(())
        }
        other => anyhow::bail!("--svc-peer: unknown op {other}"),
    }
}

fn connect(to: SocketAddr) -> anyhow::Result<TcpStream> {
    let start = Instant::now();
    loop {
        match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
            Ok(c) => {
                c.set_nodelay(true)?;
                c.set_read_timeout(Some(Duration::from_secs(10)))?;
                return Ok(c);
            }
            Err(e) if start.elapsed() > Duration::from_secs(5) => {
                return Err(e).with_context(|| format!("connecting to {to}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn serve(at: SocketAddr) -> anyhow::Result<()> {
    let l = TcpListener::bind(at).with_context(|| format!("listening on {at}"))?;
    println!("listening");
    std::io::stdout().flush()?;
    for c in l.incoming() {
        let Ok(mut c) = c else { continue };
        std::thread::spawn(move || -> std::io::Result<()> {
            c.set_nodelay(true)?;
            let mut mode = [0u8; 1];
            c.read_exact(&mut mode)?;
            if mode[0] == b'r' {
                let mut b = [0u8; 1];
                while c.read(&mut b)? == 1 {
                    c.write_all(&b)?;
                }
            } else {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                loop {
                    let k = c.read(&mut buf)?;
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                c.write_all(&n.to_be_bytes())?;
            }
            Ok(())
        });
    }
    Ok(())
}

/// Peer processes, killed (by their own handles) when dropped.
struct Peers(Vec<Child>);

impl Drop for Peers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `bench --svc-peer ARGS` and waits for its `listening`.
fn start_server(cmd: &mut Command) -> anyhow::Result<Child> {
    let mut c = cmd.stdout(Stdio::piped()).spawn()?;
    let mut line = String::new();
    let out = c.stdout.take().context("server stdout")?;
    std::io::BufReader::new(out).read_line(&mut line)?;
    if line.trim() != "listening" {
        let _ = c.kill();
        let _ = c.wait();
        anyhow::bail!("the server did not start: {line:?}");
    }
    Ok(c)
}

/// Runs a client to its end; the number it printed.
fn run_client(cmd: &mut Command) -> anyhow::Result<f64> {
    let out = cmd.stderr(Stdio::inherit()).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "client failed: {text}");
    let v: serde_json::Value = serde_json::from_str(
        text.lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .with_context(|| format!("no result in {text:?}"))?,
    )?;
    v["per_s"]
        .as_f64()
        .or_else(|| v["mb_s"].as_f64())
        .with_context(|| format!("no number in {v}"))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// A free TCP port on both loopback addresses (as of now).
/// The result rows: per case, family and test (TCP_RR, stream) the
/// median of `samples[case][family][test]`, its samples and its ratio
/// (`ratio`) to the first case's median.
fn rows(
    cases: &[&str],
    families: &[(&str, &str)],
    samples: &[Vec<[Vec<f64>; 2]>],
    ratio: &str,
) -> Vec<serde_json::Value> {
    let mut rows = Vec::new();
    for (ci, case) in cases.iter().enumerate() {
        for (fi, (fam, _)) in families.iter().enumerate() {
            for (ti, (test, unit)) in [("TCP_RR", "transactions/s"), ("stream", "MB/s")]
                .iter()
                .enumerate()
            {
                let m = median(&samples[ci][fi][ti]);
                let none = median(&samples[0][fi][ti]);
                let mut row = json!({
                    "case": case, "family": fam, "test": test, "unit": unit,
                    "median": m,
                    "samples": samples[ci][fi][ti],
                });
                row[ratio] = json!(m / none);
                rows.push(row);
            }
        }
    }
    rows
}

fn free_port() -> anyhow::Result<u16> {
    for _ in 0..20 {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let p = l.local_addr()?.port();
        if TcpListener::bind(("::1", p)).is_ok() {
            return Ok(p);
        }
    }
    anyhow::bail!("no free port on 127.0.0.1 and ::1")
}

/// The scratch cgroup root with `app` and `db`, the attachment's pins
/// and state: detached and removed when dropped (after the peers).
struct Scratch {
    root: PathBuf,
    roots: Roots,
}

impl Scratch {
    fn paths(&self) -> anyhow::Result<engine::SvcPaths> {
        Ok(engine::SvcPaths::new(
            &self.roots,
            CgroupRoot::open(Some(&self.root))?,
        ))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Ok(p) = self.paths() {
            let _ = engine::detach(&p);
        }
        let _ = std::fs::remove_dir_all(&self.roots.bpffs);
        let _ = std::fs::remove_dir_all(&self.roots.state);
        for d in ["app", "db", ""] {
            let _ = std::fs::remove_dir(self.root.join(d));
        }
    }
}

const CASES: [&str; 3] = ["no program", "empty cgroup_skb", "segbpf services"];

/// Rows: (case, family, test, median, unit, ratio to no program).
pub(crate) fn loopback(rounds: usize, secs: f64) -> anyhow::Result<serde_json::Value> {
    let (mount, _) = segbpf::host::cgroups::cgroup2_mount()?;
    let pid = std::process::id();
    let scratch = Scratch {
        root: mount.join(format!("segbpf-bench-lo-{pid}")),
        roots: Roots {
            bpffs: PathBuf::from(format!("/sys/fs/bpf/segbpf-bench-lo-{pid}")),
            state: std::env::temp_dir().join(format!("segbpf-bench-lo-{pid}")),
        },
    };
    for d in ["app", "db"] {
        std::fs::create_dir_all(scratch.root.join(d))?;
    }
    std::fs::create_dir_all(&scratch.roots.bpffs)?;
    std::fs::create_dir_all(&scratch.roots.state)?;
    let port = free_port()?;
    let policy_text = format!(
        "version = 1\n\
         [services.app]\ncgroup = \"app\"\ndefaults = {{ egress = \"drop\" }}\n\
         [services.db]\ncgroup = \"db\"\n\
         [[services.db.ingress]]\nfrom_services = [\"app\"]\ntcp = [{port}]\n\
         [[services.app.egress]]\nto = [\"127.0.0.1\", \"::1\"]\ntcp = [{port}]\n"
    );
    let policy_path = scratch.roots.state.join("roles.toml");
    std::fs::write(&policy_path, &policy_text)?;
    let policy = Policy::from_str(&policy_text, &policy_path.display().to_string())?;
    let exe = std::env::current_exe()?;
    let cg = |s: &str| scratch.root.join(s).display().to_string();
    let peer_cmd = |cgroup: &str, args: &[&str]| {
        let mut c = Command::new(&exe);
        c.arg("--svc-peer").arg(cgroup).args(args);
        c
    };
    let port_s = port.to_string();
    let secs_s = format!("{secs}");
    let families = [("IPv4", "127.0.0.1"), ("IPv6", "::1")];
    let mut servers = Peers(Vec::new());
    for (_, a) in families {
        servers.0.push(start_server(&mut peer_cmd(
            &cg("db"),
            &["serve", a, &port_s],
        ))?);
    }
    let load_before = load_average();
    // samples[case][family][test]
    let mut samples = vec![vec![[Vec::new(), Vec::new()]; families.len()]; CASES.len()];
    for round in 0..rounds {
        for (ci, case) in CASES.iter().enumerate() {
            // The empty program, attached while `empty` holds it.
            let mut empty = None;
            match ci {
                1 => {
                    let paths = scratch.paths()?;
                    let mut ebpf = engine::load_unattached(&paths, &policy)?;
                    let cgroup = std::fs::File::open(&scratch.root)?;
                    let p: &mut aya::programs::CgroupSkb = ebpf
                        .program_mut(segbpf_common::PROG_SVC_EMPTY)
                        .context("no empty program")?
                        .try_into()?;
                    p.load()?;
                    for t in [
                        aya::programs::CgroupSkbAttachType::Egress,
                        aya::programs::CgroupSkbAttachType::Ingress,
                    ] {
                        p.attach(&cgroup, t, aya::programs::CgroupAttachMode::Single)?;
                    }
                    empty = Some(ebpf);
                }
                2 => {
                    engine::attach(&scratch.paths()?, &policy, &policy_path, false)?;
                }
                _ => {}
            }
            for (fi, (_, a)) in families.iter().enumerate() {
                for (ti, op) in ["rr", "stream"].iter().enumerate() {
                    let v = run_client(&mut peer_cmd(&cg("app"), &[op, a, &port_s, &secs_s]))
                        .with_context(|| format!("{case}, {a}, {op}"))?;
                    samples[ci][fi][ti].push(v);
                }
            }
            if empty.take().is_some() {
                // The maps load_unattached pinned.
                let _ = std::fs::remove_dir_all(scratch.paths()?.dir);
            }
            if ci == 2 {
                engine::detach(&scratch.paths()?)?;
            }
        }
        eprintln!("services loopback: round {} of {rounds} done", round + 1);
    }
    let load_after = load_average();
    drop(servers);
    drop(scratch);
    let rows = rows(&CASES, &families, &samples, "ratio_to_none");
    Ok(json!({
        "rounds": rounds, "seconds_each": secs,
        "load_average_before": load_before, "load_average_after": load_after,
        "rows": rows,
    }))
}

/// Prints the loopback rows as a table.
pub(crate) fn print_loopback(v: &serde_json::Value, out: &mut String) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "services loopback traffic ({} rounds of {} s, medians; load average {} -> {}):",
        v["rounds"], v["seconds_each"], v["load_average_before"], v["load_average_after"]
    );
    for r in v["rows"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<18} {:<5} {:<7} {:>12.0} {:<15} {:>6.2}x",
            r["case"].as_str().unwrap_or(""),
            r["family"].as_str().unwrap_or(""),
            r["test"].as_str().unwrap_or(""),
            r["median"].as_f64().unwrap_or(0.0),
            r["unit"].as_str().unwrap_or(""),
            r["ratio_to_none"].as_f64().unwrap_or(0.0)
        );
    }
}

/// The loopback pair as two transient units of a systemd booted by
/// systemd-nspawn, with and without `IPAddressDeny=any
/// IPAddressAllow=localhost` on both units (systemd's own `cgroup_skb`
/// programs); rounds interleaved, medians. Checks first that the
/// container's systemd enforces: a client unit with `IPAddressDeny=any`
/// alone must fail to connect.
pub(crate) fn systemd_ipaddressallow(
    rounds: usize,
    secs: f64,
) -> anyhow::Result<serde_json::Value> {
    // A container booted by systemd-nspawn from this machine's `/`
    // (`--volatile=yes`), this binary at /usr/sbin/segbpf-bench; powered
    // off and its work directory removed when dropped.
    let work = std::env::temp_dir().join(format!("segbpf-nspawn-bench-{}", std::process::id()));
    let c = Nspawn::new(&format!("segbpf-bench-{}", std::process::id()), &work)
        .quiet()
        .remove_work()
        .bind_ro(&std::env::current_exe()?, "/usr/sbin/segbpf-bench")
        .boot()?;
    // `sh -c SCRIPT` in the container's namespaces: its stdout.
    let sh = |script: &str| -> anyhow::Result<String> {
        Ok(String::from_utf8_lossy(&c.output(script)?.stdout).into_owned())
    };
    let version = sh("systemctl --version | head -1")?.trim().to_string();
    let cases = [
        ("systemd units", ""),
        (
            "systemd units, IPAddressAllow=localhost",
            "-p IPAddressDeny=any -p IPAddressAllow=localhost",
        ),
    ];
    let families = [("IPv4", "127.0.0.1"), ("IPv6", "::1")];
    // Servers: one unit per case and family, ports 5001..
    for (ci, (_, props)) in cases.iter().enumerate() {
        for (fi, (_, a)) in families.iter().enumerate() {
            let port = 5001 + ci * 2 + fi;
            sh(&format!(
                "systemd-run -q --unit=svcb-db-{ci}-{fi} {props} \
                 /usr/sbin/segbpf-bench --svc-peer - serve {a} {port}"
            ))?;
        }
    }
    let client = |props: &str, op: &str, a: &str, port: usize, n: usize| {
        sh(&format!(
            "systemd-run -q --wait --pipe --collect --unit=svcb-app-{n} {props} \
             /usr/sbin/segbpf-bench --svc-peer - {op} {a} {port} {secs}"
        ))
    };
    // Enforcement is real here: deny-any alone refuses the connection.
    let refused = client("-p IPAddressDeny=any", "rr", "127.0.0.1", 5003, 0).is_err();
    anyhow::ensure!(
        refused,
        "a unit with IPAddressDeny=any connected over loopback: systemd enforces nothing here"
    );
    let mut n = 1;
    let load_before = load_average();
    let mut samples = vec![vec![[Vec::new(), Vec::new()]; families.len()]; cases.len()];
    for round in 0..rounds {
        for (ci, (_, props)) in cases.iter().enumerate() {
            for (fi, (_, a)) in families.iter().enumerate() {
                for (ti, op) in ["rr", "stream"].iter().enumerate() {
                    let out = client(props, op, a, 5001 + ci * 2 + fi, n)?;
                    n += 1;
                    let v: serde_json::Value = serde_json::from_str(
                        out.lines()
                            .rev()
                            .find(|l| l.starts_with('{'))
                            .with_context(|| format!("no result in {out:?}"))?,
                    )?;
                    samples[ci][fi][ti].push(
                        v["per_s"]
                            .as_f64()
                            .or_else(|| v["mb_s"].as_f64())
                            .context("no number")?,
                    );
                }
            }
        }
        eprintln!(
            "services under systemd: round {} of {rounds} done",
            round + 1
        );
    }
    let load_after = load_average();
    drop(c);
    let names: Vec<&str> = cases.iter().map(|(case, _)| *case).collect();
    let rows = rows(&names, &families, &samples, "ratio_to_plain_units");
    Ok(json!({
        "systemd": version,
        "deny_any_refused": refused,
        "rounds": rounds, "seconds_each": secs,
        "load_average_before": load_before, "load_average_after": load_after,
        "rows": rows,
    }))
}
