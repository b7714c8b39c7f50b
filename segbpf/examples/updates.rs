//! The updates benchmark (`cargo xtask bench`, `SEGBPF_BENCH_ONLY=updates`):
//! segbpf against nftables for live edits, every tool run as a whole
//! process, interleaved rounds, medians.
//!
//! * A 10,000-rule policy: set `peers` of 10,000 addresses allowed to
//!   tcp/22, and 9,999 rules each allowing one address to one port. The
//!   nftables reference holds the same: one interval set and one
//!   concatenated-key (`ipv4_addr . inet_service`) verdict map, in its own
//!   namespace.
//! * Per round: `set add` / `set del` of one member against `nft add
//!   element` / `delete element`; a 10,000-member batch added and removed
//!   in one call each; a reload of the whole policy with one rule changed
//!   against `nft -f` of the whole ruleset (one rule changed); attaching
//!   the example policy (process start to exit of `attach --no-wait`, which
//!   returns once the programs and the policy are in force); ten such
//!   attachments started at once (until the last exits). The batches and
//!   the ten attaches run in the first rounds only (2 and 3; 1 with
//!   `--quick`). `nft delete element` of the 10,000 took nft minutes
//!   here: it is not measured (a reload of the table removes them).
//! * The kernel-side part of a `set add` (delta write, switch, mirror of
//!   the old slot) and the entries written come from `segbpf -v` and its
//!   JSON output.
//!
//! * `--million`: instead of all that, one set of 1,000,000 IPv4
//!   addresses (every other address from 10.0.0.0, so 1,000,000 /32
//!   prefixes) and one rule naming it, attached with `--peer-entries
//!   2200000`; per round `set add` / `set del` of one member, and in the
//!   first rounds (2; 1 with `--quick`) 10,000 members added and removed
//!   in one call each, with the `-v` phase lines of every edit. The edits
//!   follow each other without a reload, so from the second on the state
//!   holds the edited set (as live set edits do). nftables is off in this
//!   mode (loading the set took nft 14 s and each one-member edit about
//!   2 minutes here); `--nft` adds `nft add element` / `delete element` of
//!   one member into the same set. Writes `bench/updates-million.json`.
//!
//! Needs root, `nft` and the segbpf binary in `SEGBPF_BIN` (release).
//! Writes `bench/updates.json` (every sample, the machine, the command).
#![allow(
    unused_crate_dependencies,
    reason = "an example sees every dependency of the package"
)]

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, ensure};
use segbpf_tests::Lab;

const RULES: u32 = 10_000;

fn peer(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 + 2 * i) // 10.0.0.0, every other address
}

fn rule_peer(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a80_0000 + 2 * i) // 10.128.0.0, every other address
}

fn batch_member(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0b00_0000 + 2 * i) // 11.0.0.0, every other address
}

/// The segbpf policy; `bump` changes the port of one rule.
fn policy(bump: bool) -> String {
    let mut t = String::from("version = 1\n[sets]\npeers = [");
    for i in 0..RULES {
        let _ = write!(t, "{}\"{}\"", if i == 0 { "" } else { "," }, peer(i));
    }
    t.push_str("]\n[defaults]\ningress = \"drop\"\negress = \"allow\"\nlog_rate = 1\n[roles.r]\nhosts = \"any\"\n");
    t.push_str("[[roles.r.ingress]]\nfrom = \"peers\"\ntcp = [22]\n");
    for i in 1..RULES {
        let port = if bump && i == RULES / 2 {
            60_001
        } else {
            1000 + i
        };
        let _ = write!(
            t,
            "[[roles.r.ingress]]\nfrom = [\"{}\"]\ntcp = [{port}]\n",
            rule_peer(i)
        );
    }
    t
}

/// The equivalent nftables ruleset (replacing the table atomically).
fn ruleset(bump: bool) -> String {
    let mut t = String::from(
        "table inet segbench\ndelete table inet segbench\ntable inet segbench {\n  set peers {\n    type ipv4_addr; flags interval;\n    elements = { ",
    );
    for i in 0..RULES {
        let _ = write!(t, "{}{}", if i == 0 { "" } else { ", " }, peer(i));
    }
    t.push_str(" }\n  }\n  map rules {\n    type ipv4_addr . inet_service : verdict; flags interval;\n    elements = { ");
    for i in 1..RULES {
        let port = if bump && i == RULES / 2 {
            60_001
        } else {
            1000 + i
        };
        let _ = write!(
            t,
            "{}{} . {port} : accept",
            if i == 1 { "" } else { ", " },
            rule_peer(i)
        );
    }
    t.push_str(" }\n  }\n  chain input {\n    type filter hook input priority 0; policy drop;\n    ip saddr @peers tcp dport 22 accept\n    ip saddr . tcp dport vmap @rules\n  }\n}\n");
    t
}

/// The table of one run's samples: each operation's median, min and max.
fn print_samples(samples: &std::collections::BTreeMap<&str, Vec<f64>>) {
    println!(
        "{:<44} {:>10} {:>10} {:>10}",
        "operation", "median ms", "min", "max"
    );
    for (name, v) in samples {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, 0f64), |(a, b), x| (a.min(*x), b.max(*x)));
        println!("{name:<44} {:>10.1} {lo:>10.1} {hi:>10.1}", median(v));
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `/proc/loadavg`.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The phase timings and the program load line of a `segbpf -v attach`
/// (the first of them: 10,000 rules; then the example policy per round).
fn phase_lines(stderr: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| l.contains("phases:") || l.contains("load: object and maps"))
        .map(str::to_string)
        .collect()
}

/// Milliseconds `cmd` took as a whole process; fails when it fails.
fn timed(mut cmd: Command) -> anyhow::Result<(f64, std::process::Output)> {
    let what: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .take(8)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let t = Instant::now();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{ms:>10.1} ms  {}", what.join(" "));
    Ok((ms, out))
}

struct Bench<'a> {
    lab: &'a Lab,
    seg_ns: String,
    nft_ns: String,
}

impl Bench<'_> {
    fn segbpf(&self, args: &[&str]) -> Command {
        let mut c = Command::new(segbpf_tests::lab::segbpf_bin());
        c.arg("--netns")
            .arg(&self.seg_ns)
            .args(args)
            .env("SEGBPF_BPFFS", &self.lab.bpffs)
            .env("SEGBPF_STATE_DIR", &self.lab.state);
        c
    }

    fn nft(&self, args: &[&str]) -> Command {
        // nsenter only enters the network namespace, as `segbpf --netns`
        // does (`ip netns exec` also remounts /sys, which nft would pay).
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.nft_ns))
            .arg("nft")
            .args(args);
        c
    }
}

/// The kernel-side milliseconds of a swap from its `-v` phase line: the
/// writes into the slot put in force, the switch and the mirror of the old
/// slot (the grace period between them is a sleep, not kernel work).
fn kernel_ms(stderr: &str) -> Option<f64> {
    let line = stderr.lines().find(|l| l.contains("swap phases:"))?;
    let get = |name: &str| -> Option<f64> {
        let at = line.find(&format!(" {name}="))? + name.len() + 2;
        line[at..].split("ms").next()?.parse().ok()
    };
    Some(
        get("write-delta").or_else(|| get("write-whole"))? + get("flip")? + get("mirror-old-slot")?,
    )
}

/// Prefixes of the `--million` policy's one set.
const MILLION: u32 = 1_000_000;

/// The `--million` policy: one set of [`MILLION`] addresses, one rule.
fn million_policy() -> String {
    let mut t = String::with_capacity(16 * MILLION as usize);
    t.push_str("version = 1\n[sets]\npeers = [");
    for i in 0..MILLION {
        let _ = write!(t, "{}\"{}\"", if i == 0 { "" } else { "," }, peer(i));
    }
    t.push_str(
        "]\n[defaults]\ningress = \"drop\"\negress = \"allow\"\n[roles.r]\nhosts = \"any\"\n",
    );
    t.push_str("[[roles.r.ingress]]\nfrom = \"peers\"\ntcp = [22]\n");
    t
}

/// The same set as an nftables interval set.
fn million_ruleset() -> String {
    let mut t = String::with_capacity(16 * MILLION as usize);
    t.push_str("table inet segbench {\n  set peers {\n    type ipv4_addr; flags interval;\n    elements = { ");
    for i in 0..MILLION {
        let _ = write!(t, "{}{}", if i == 0 { "" } else { ", " }, peer(i));
    }
    t.push_str(" }\n  }\n  chain input {\n    type filter hook input priority 0; policy drop;\n    ip saddr @peers tcp dport 22 accept\n  }\n}\n");
    t
}

/// The `swap phases:` line of a `segbpf -v` edit.
fn swap_line(stderr: &[u8]) -> Option<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .find(|l| l.contains("swap phases:"))
        .map(str::to_string)
}

/// `--million`: set edits at 1,000,000 prefixes (see the module docs).
#[allow(clippy::too_many_lines, reason = "one benchmark, in order")]
fn million(quick: bool, with_nft: bool) -> anyhow::Result<()> {
    let rounds = if quick { 3 } else { 7 };
    let batch_rounds = if quick { 1 } else { 2 };
    let mut lab = Lab::new("upm")?;
    lab.add_host("seg", &["198.18.95.10/24"])?;
    lab.add_host("nft", &["198.18.95.11/24"])?;
    let b = Bench {
        lab: &lab,
        seg_ns: lab.host("seg").ns.name.clone(),
        nft_ns: lab.host("nft").ns.name.clone(),
    };
    let file = lab.write_policy("m.toml", &million_policy())?;
    let loadavg_start = loadavg();
    let (attach_ms, out) = timed(b.segbpf(&[
        "-v",
        "attach",
        "eth0",
        "--role",
        "r",
        "--no-wait",
        "--peer-entries",
        "2200000",
        "-p",
        file.to_str().unwrap_or_default(),
    ]))?;
    let attach_phases = phase_lines(&out.stderr);
    let mut nft_load_ms = None;
    if with_nft {
        let f = lab.write_policy("m.nft", &million_ruleset())?;
        nft_load_ms = Some(timed(b.nft(&["-f", f.to_str().unwrap_or_default()]))?.0);
    }
    let batch: Vec<String> = (0..10_000).map(|i| batch_member(i).to_string()).collect();
    let mut samples: std::collections::BTreeMap<&str, Vec<f64>> = std::collections::BTreeMap::new();
    let mut phases: std::collections::BTreeMap<&str, Vec<String>> =
        std::collections::BTreeMap::new();
    let mut written = Vec::new();
    for round in 0..rounds {
        let one = Ipv4Addr::from(0xc612_6000 + round as u32).to_string(); // 198.18.96.x
        for (name, op) in [("segbpf set add one", "add"), ("segbpf set del one", "del")] {
            let (ms, out) =
                timed(b.segbpf(&["-v", "set", op, "eth0", "peers", &one, "-o", "json"]))?;
            samples.entry(name).or_default().push(ms);
            phases
                .entry(name)
                .or_default()
                .extend(swap_line(&out.stderr));
            if op == "add" {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
                written.push(v["written"].as_u64().unwrap_or(0));
                if let Some(k) = kernel_ms(&String::from_utf8_lossy(&out.stderr)) {
                    samples
                        .entry("segbpf set add one, kernel side")
                        .or_default()
                        .push(k);
                }
            }
        }
        if with_nft {
            let one_nft = format!("{{ {one} }}");
            for (name, op) in [
                ("nft add element one", "add"),
                ("nft delete element one", "delete"),
            ] {
                let (ms, _) =
                    timed(b.nft(&[op, "element", "inet", "segbench", "peers", &one_nft]))?;
                samples.entry(name).or_default().push(ms);
            }
        }
        if round < batch_rounds {
            for (name, op) in [
                ("segbpf set add 10,000", "add"),
                ("segbpf set del 10,000", "del"),
            ] {
                let mut args = vec!["-v", "set", op, "eth0", "peers"];
                args.extend(batch.iter().map(String::as_str));
                let (ms, out) = timed(b.segbpf(&args))?;
                samples.entry(name).or_default().push(ms);
                phases
                    .entry(name)
                    .or_default()
                    .extend(swap_line(&out.stderr));
            }
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    let (status_ms, _) = timed(b.segbpf(&["status", "eth0", "-o", "json"]))?;
    let _ = timed(b.segbpf(&["detach", "eth0"]));

    println!("\nSet edits at {MILLION} prefixes ({rounds} rounds, medians; whole processes):");
    print_samples(&samples);
    println!("attach at {MILLION} prefixes (once): {attach_ms:.0} ms");
    println!("attach phases: {}", attach_phases.join(" | "));
    if let Some(ms) = nft_load_ms {
        println!("nft -f of the set (once): {ms:.0} ms");
    }
    println!("status after the edits (once): {status_ms:.0} ms");
    println!("entries written by `set add` of one member: {written:?}");
    for (name, lines) in &phases {
        for line in lines {
            println!("{name}: {line}");
        }
    }
    let json = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "machine": {
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "cpus": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            "loadavg_start": loadavg_start,
            "loadavg": loadavg(),
            "nft": with_nft.then(|| Command::new("nft").arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()),
        },
        "prefixes": MILLION,
        "rounds": rounds,
        "attach_ms": attach_ms,
        "attach_phases": attach_phases,
        "nft_load_ms": nft_load_ms,
        "status_ms": status_ms,
        "set_add_written": written,
        "phases": phases,
        "samples_ms": samples,
        "medians_ms": samples.iter().map(|(k, v)| (*k, median(v))).collect::<std::collections::BTreeMap<_, _>>(),
    });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/updates-million.json");
    std::fs::write(&out, serde_json::to_string_pretty(&json)? + "\n")?;
    println!("wrote {}", out.display());
    Ok(())
}

#[allow(clippy::too_many_lines, reason = "one benchmark, in order")]
fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    if std::env::args().any(|a| a == "--million") {
        return million(quick, std::env::args().any(|a| a == "--nft"));
    }
    let rounds = if quick { 3 } else { 9 };
    let batch_rounds = if quick { 1 } else { 2 };
    let ten_rounds = if quick { 1 } else { 3 };
    let mut lab = Lab::new("upd")?;
    lab.add_host("seg", &["198.18.95.10/24"])?;
    lab.add_host("nft", &["198.18.95.11/24"])?;
    let seg_ns = lab.host("seg").ns.name.clone();
    for i in 0..10 {
        let (a, b) = (format!("att{i}"), format!("att{i}p"));
        let ok = Command::new("ip")
            .args([
                "-n", &seg_ns, "link", "add", &a, "type", "veth", "peer", "name", &b,
            ])
            .status()?
            .success()
            && Command::new("ip")
                .args(["-n", &seg_ns, "link", "set", &a, "up"])
                .status()?
                .success()
            && Command::new("ip")
                .args(["-n", &seg_ns, "link", "set", &b, "up"])
                .status()?
                .success();
        ensure!(ok, "making {a}");
    }
    let b = Bench {
        lab: &lab,
        seg_ns,
        nft_ns: lab.host("nft").ns.name.clone(),
    };
    let files: Vec<PathBuf> = [false, true]
        .iter()
        .enumerate()
        .map(|(i, bump)| lab.write_policy(&format!("p{i}.toml"), &policy(*bump)))
        .collect::<anyhow::Result<_>>()?;
    let nft_files: Vec<PathBuf> = [false, true]
        .iter()
        .enumerate()
        .map(|(i, bump)| lab.write_policy(&format!("r{i}.nft"), &ruleset(*bump)))
        .collect::<anyhow::Result<_>>()?;
    let example = lab.write_policy(
        "roles.toml",
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/roles.toml"),
        )?,
    )?;
    let p0 = files[0].to_str().unwrap_or_default();
    let loadavg_start = loadavg();
    let (attach_10k_ms, out) =
        timed(b.segbpf(&["-v", "attach", "eth0", "--role", "r", "--no-wait", "-p", p0]))?;
    let mut attach_phases = vec![phase_lines(&out.stderr)];
    // `nft -f` of a file whose first lines delete the table needs it to exist.
    timed(b.nft(&["add", "table", "inet", "segbench"]))?;
    timed(b.nft(&["-f", nft_files[0].to_str().unwrap_or_default()]))?;

    let batch: Vec<String> = (0..10_000).map(|i| batch_member(i).to_string()).collect();
    let batch_nft = format!("{{ {} }}", batch.join(", "));
    let mut samples: std::collections::BTreeMap<&str, Vec<f64>> = std::collections::BTreeMap::new();
    let mut written = Vec::new();
    let mut set_add_phases: Vec<String> = Vec::new();
    let mut reload_phases: Vec<String> = Vec::new();
    for round in 0..rounds {
        let one = Ipv4Addr::from(0xc612_6000 + round as u32).to_string(); // 198.18.96.x
        let one_nft = format!("{{ {one} }}");
        let mut batch_args = vec!["set", "add", "eth0", "peers"];
        batch_args.extend(batch.iter().map(String::as_str));

        let (ms, out) =
            timed(b.segbpf(&["-v", "set", "add", "eth0", "peers", &one, "-o", "json"]))?;
        samples.entry("segbpf set add one").or_default().push(ms);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if let Some(line) = stderr.lines().find(|l| l.contains("swap phases:")) {
            set_add_phases.push(line.to_string());
        }
        if let Some(k) = kernel_ms(&stderr) {
            samples
                .entry("segbpf set add one, kernel side")
                .or_default()
                .push(k);
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        written.push(v["written"].as_u64().unwrap_or(0));
        let (ms, _) = timed(b.nft(&["add", "element", "inet", "segbench", "peers", &one_nft]))?;
        samples.entry("nft add element one").or_default().push(ms);

        let (ms, _) = timed(b.segbpf(&["set", "del", "eth0", "peers", &one]))?;
        samples.entry("segbpf set del one").or_default().push(ms);
        let (ms, _) = timed(b.nft(&["delete", "element", "inet", "segbench", "peers", &one_nft]))?;
        samples
            .entry("nft delete element one")
            .or_default()
            .push(ms);

        // The batches run in the first rounds only.
        if round < batch_rounds {
            let (ms, _) = timed(b.segbpf(&batch_args))?;
            samples.entry("segbpf set add 10,000").or_default().push(ms);
            let (ms, _) =
                timed(b.nft(&["add", "element", "inet", "segbench", "peers", &batch_nft]))?;
            samples
                .entry("nft add element 10,000")
                .or_default()
                .push(ms);
            batch_args[1] = "del";
            let (ms, _) = timed(b.segbpf(&batch_args))?;
            samples.entry("segbpf set del 10,000").or_default().push(ms);
            // Deleting 10,000 members of the interval set took nft more
            // than three minutes here: the members go with a reload of the
            // table instead (not timed).
            timed(b.nft(&["-f", nft_files[round % 2].to_str().unwrap_or_default()]))?;
        }
        let f = files[(round + 1) % 2].to_str().unwrap_or_default();
        let (ms, out) = timed(b.segbpf(&["-v", "reload", "eth0", "-p", f]))?;
        samples
            .entry("segbpf reload, one rule changed")
            .or_default()
            .push(ms);
        let stderr = String::from_utf8_lossy(&out.stderr);
        reload_phases.extend(
            stderr
                .lines()
                .filter(|l| l.contains("phases:"))
                .map(str::to_string),
        );
        let nf = nft_files[(round + 1) % 2].to_str().unwrap_or_default();
        let (ms, _) = timed(b.nft(&["-f", nf]))?;
        samples
            .entry("nft -f, one rule changed")
            .or_default()
            .push(ms);

        let ex = example.to_str().unwrap_or_default();
        let (ms, out) = timed(b.segbpf(&[
            "-v",
            "attach",
            "att0",
            "--role",
            "web",
            "--no-wait",
            "-p",
            ex,
        ]))?;
        attach_phases.push(phase_lines(&out.stderr));
        samples
            .entry("segbpf attach example policy")
            .or_default()
            .push(ms);
        timed(b.segbpf(&["detach", "att0"]))?;

        if round >= ten_rounds {
            // Ten verifications at once take most of a round: fewer samples.
            eprintln!("round {} of {rounds} done", round + 1);
            continue;
        }
        let t = Instant::now();
        let children: Vec<_> = (0..10)
            .map(|i| {
                b.segbpf(&[
                    "attach",
                    &format!("att{i}"),
                    "--role",
                    "web",
                    "--no-wait",
                    "-p",
                    ex,
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
            })
            .collect::<Result<_, _>>()?;
        for c in children {
            let out = c.wait_with_output()?;
            ensure!(
                out.status.success(),
                "attach: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        samples
            .entry("segbpf attach example policy x10 at once")
            .or_default()
            .push(t.elapsed().as_secs_f64() * 1e3);
        for i in 0..10 {
            timed(b.segbpf(&["detach", &format!("att{i}")]))?;
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    let _ = timed(b.segbpf(&["detach", "eth0"]));

    println!("\nUpdates at {RULES} rules ({rounds} rounds, medians; whole processes):");
    print_samples(&samples);
    println!("attach at {RULES} rules (once): {attach_10k_ms:.0} ms");
    for lines in &attach_phases {
        println!("attach phases: {}", lines.join(" | "));
    }
    println!("entries written by `set add` of one member: {written:?}");
    for line in &set_add_phases {
        println!("set add {line}");
    }
    for line in &reload_phases {
        println!("reload {line}");
    }
    let pairs = [
        ("segbpf set add one", "nft add element one"),
        ("segbpf set del one", "nft delete element one"),
        ("segbpf set add 10,000", "nft add element 10,000"),
        (
            "segbpf reload, one rule changed",
            "nft -f, one rule changed",
        ),
    ];
    for (a, n) in pairs {
        println!(
            "{a} / {n}: {:.2}x",
            median(&samples[a]) / median(&samples[n])
        );
    }
    let json = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "machine": {
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "cpus": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            "loadavg_start": loadavg_start,
            "loadavg": loadavg(),
            "nft": Command::new("nft").arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default(),
        },
        "rules": RULES,
        "rounds": rounds,
        "attach_10k_ms": attach_10k_ms,
        "attach_phases": attach_phases,
        "set_add_phases": set_add_phases,
        "reload_phases": reload_phases,
        "set_add_written": written,
        "samples_ms": samples,
        "medians_ms": samples.iter().map(|(k, v)| (*k, median(v))).collect::<std::collections::BTreeMap<_, _>>(),
    });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/updates.json");
    std::fs::write(&out, serde_json::to_string_pretty(&json)? + "\n")?;
    println!("wrote {}", out.display());
    Ok(())
}
