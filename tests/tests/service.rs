//! The systemd unit `dist/systemd/segbpf@.service`:
//! - `systemd-analyze verify` has nothing to say about it (verify exits 0
//!   on warnings, so any message fails), its Documentation= pages included;
//! - its sandbox lets segbpf do a service's work. systemd is not PID 1
//!   here (`cargo xtask dist --check` runs the packaged unit under a real
//!   one, xtask/src/boot.rs), so the sandbox is reproduced piece by piece: segbpf runs with
//!   exactly the unit's CapabilityBoundingSet and no_new_privs (setpriv),
//!   under strace, while it enforces, reloads on SIGHUP, exits on SIGTERM
//!   with enforcement kept, and while a `--confirm` guard undoes an
//!   unconfirmed attach; then every system call it made must pass the
//!   unit's SystemCallFilter (as `systemd-analyze syscall-filter` expands
//!   it), every socket family its RestrictAddressFamilies, and every file
//!   it wrote must lie under the directories the unit leaves writable
//!   (ProtectSystem=strict).
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use segbpf_tests::{
    Lab,
    lab::{one_tcp_port_policy, segbpf_bin},
    net,
};

const UNIT: &str = include_str!("../../dist/systemd/segbpf@.service");

/// The value of every `key=` line of the unit, in order.
fn lines_of(key: &str) -> Vec<&'static str> {
    UNIT.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .collect()
}

/// The values of every `key=` line of the unit, split on whitespace.
fn directive(key: &str) -> Vec<String> {
    lines_of(key)
        .into_iter()
        .flat_map(|v| v.split_whitespace().map(str::to_string))
        .collect()
}

/// A directory under the system's temporary directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("segbpf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn unit_passes_systemd_analyze_verify_without_a_word() -> anyhow::Result<()> {
    let scratch = Scratch::new("verify")?;
    // The manual pages the package installs, for Documentation=man:...
    let man8 = scratch.0.join("man/man8");
    std::fs::create_dir_all(&man8)?;
    for page in segbpf::cmd::man::pages()? {
        std::fs::write(man8.join(&page.name), &page.text)?;
    }
    // verify wants ExecStart's program to exist and be executable; what
    // it is does not matter to it (this test's own executable will do).
    let exe = std::env::current_exe()?;
    let units = scratch.0.join("units");
    std::fs::create_dir_all(&units)?;
    std::fs::write(
        units.join("segbpf@.service"),
        UNIT.replace("/usr/sbin/segbpf", &exe.display().to_string()),
    )?;
    for unit in ["segbpf@.service", "segbpf@eth0.service"] {
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=yes"])
            .arg(units.join(unit))
            .env("MANPATH", scratch.0.join("man"))
            .output()
            .context("running systemd-analyze (package systemd)")?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify {unit} ({}):\n{said}",
            out.status
        );
    }
    Ok(())
}

#[test]
fn unit_keeps_what_the_service_relies_on() {
    let one = |key: &str| directive(key).join(" ");
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("NotifyAccess"), "main");
    // The guard must outlive a stop, a restart or a crash of attach.
    assert_eq!(one("KillMode"), "process");
    assert_eq!(one("RuntimeDirectoryPreserve"), "yes");
    assert_eq!(one("DefaultDependencies"), "no");
    assert!(directive("Before").contains(&"network-pre.target".to_string()));
    assert!(directive("ExecStart").contains(&"/usr/sbin/segbpf".to_string()));
    assert_eq!(lines_of("SystemCallFilter").last(), Some(&"bpf"));
    // Settings that would break BPF or the pins.
    for key in [
        "ProtectKernelTunables",
        "PrivateNetwork",
        "PrivateUsers",
        "ProcSubset",
        "IPAddressDeny",
        // A private bpffs (systemd 256+): pins would vanish with the service.
        "PrivateBPF",
    ] {
        assert!(directive(key).is_empty(), "{key}= breaks segbpf");
    }
}

/// Where the sandboxed segbpf keeps things: the lab's roots stand for
/// the unit's /sys/fs/bpf, /run/segbpf and /var/lib/segbpf.
struct Sandbox<'a> {
    lab: &'a Lab,
    history: PathBuf,
    traces: PathBuf,
}

impl Sandbox<'_> {
    /// `segbpf ARGS` in `srv`'s namespace with the unit's capabilities
    /// and no_new_privs, traced into `traces/NAME` (children followed).
    fn command(&self, trace: &str, args: &[&str]) -> Command {
        let caps: Vec<String> = directive("CapabilityBoundingSet")
            .iter()
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.lab.host("srv").ns.name))
            .args([
                "--",
                "setpriv",
                "--no-new-privs",
                "--inh-caps=-all",
                "--ambient-caps=-all",
            ])
            .arg(format!("--bounding-set=-all,{}", caps.join(",")))
            .args(["--", "strace", "-f", "-qq", "-y", "-s", "256", "-o"])
            .arg(self.traces.join(trace))
            .arg(segbpf_bin())
            .args(args)
            .env("SEGBPF_BPFFS", &self.lab.bpffs)
            .env("SEGBPF_STATE_DIR", &self.lab.state)
            .env("SEGBPF_HISTORY_DIR", &self.history);
        cmd
    }
}

fn reachable(lab: &Lab, port: u16) -> anyhow::Result<bool> {
    lab.tcp_reachable("client", "srv", port)
}

/// Waits until `check` holds, up to `secs` seconds.
fn wait_for(secs: u64, what: &str, mut check: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !check() {
        ensure!(
            std::time::Instant::now() < deadline,
            "{what}: not within {secs}s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// A process we started, killed and reaped on drop unless waited for.
struct Started(Option<std::process::Child>);

impl Started {
    fn id(&self) -> anyhow::Result<u32> {
        self.0
            .as_ref()
            .map(std::process::Child::id)
            .context("already reaped")
    }

    /// Kills the process and returns what it wrote.
    fn stop(mut self) -> anyhow::Result<std::process::Output> {
        let mut child = self.0.take().context("already reaped")?;
        let _ = child.kill();
        Ok(child.wait_with_output()?)
    }

    fn wait(mut self) -> anyhow::Result<std::process::Output> {
        let child = self.0.take().context("already reaped")?;
        Ok(child.wait_with_output()?)
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The one child of `pid` (strace's tracee: segbpf).
fn child_of(pid: u32) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))?;
    text.split_whitespace()
        .next()
        .context("strace has no child yet")?
        .parse()
        .context("child pid")
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) -> anyhow::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)?;
    Ok(())
}

/// Every system call the unit's SystemCallFilter lets through, as
/// `systemd-analyze syscall-filter` lists its groups: the first line is an
/// allow list, later lines add to it, or take away with `~`, in order.
fn allowed_syscalls() -> anyhow::Result<BTreeSet<String>> {
    fn expand(item: &str, out: &mut BTreeSet<String>) -> anyhow::Result<()> {
        if !item.starts_with('@') {
            out.insert(item.to_string());
            return Ok(());
        }
        let text = segbpf_tests::netns::sh("systemd-analyze", &["syscall-filter", item])?;
        for line in text.lines().skip(1) {
            let word = line.trim();
            if word.is_empty() || word.starts_with('#') {
                continue;
            }
            expand(word, out)?;
        }
        Ok(())
    }
    let mut out = BTreeSet::new();
    for (i, line) in lines_of("SystemCallFilter").into_iter().enumerate() {
        let (deny, items) = match line.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        ensure!(
            !(deny && i == 0),
            "the filter starts with a deny list: this test reads allow lists"
        );
        let mut set = BTreeSet::new();
        for item in items.split_whitespace() {
            expand(item, &mut set)?;
        }
        if deny {
            out.retain(|s| !set.contains(s));
        } else {
            out.extend(set);
        }
    }
    Ok(out)
}

/// What a trace shows: system calls made, socket families asked for,
/// paths written (created, opened for writing, renamed, removed, made,
/// pinned).
#[derive(Default)]
struct Seen {
    syscalls: BTreeSet<String>,
    families: BTreeSet<String>,
    written: BTreeSet<String>,
}

/// The paths a call names: its quoted strings, a relative one joined to
/// the directory of the call's first descriptor (`strace -y` writes
/// `3</dir>`).
fn paths_of(call: &str) -> Vec<String> {
    let dir = call
        .split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map(|(d, _)| d);
    call.split('"')
        .skip(1)
        .step_by(2)
        .map(|p| match dir {
            Some(d) if !p.starts_with('/') => format!("{d}/{p}"),
            _ => p.to_string(),
        })
        .collect()
}

fn read_trace(path: &Path, seen: &mut Seen) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    for line in text.lines() {
        // `PID name(args) = ret`, `PID <... name resumed>...`, `PID +++ exited ...`.
        let Some(rest) = line.split_once(' ').map(|(_, r)| r.trim_start()) else {
            continue;
        };
        let name: String = rest
            .strip_prefix("<... ")
            .unwrap_or(rest)
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() || rest.starts_with("---") || rest.starts_with("+++") {
            continue;
        }
        seen.syscalls.insert(name.clone());
        if (name == "socket" || name == "socketpair")
            && let Some(family) = rest
                .split_once('(')
                .and_then(|(_, a)| a.split([',', ')']).next())
        {
            seen.families.insert(family.trim().to_string());
        }
        let writes = match name.as_str() {
            "openat" | "open" => {
                rest.contains("O_WRONLY") || rest.contains("O_RDWR") || rest.contains("O_CREAT")
            }
            "mkdir" | "mkdirat" | "rename" | "renameat" | "renameat2" | "unlink" | "unlinkat"
            | "rmdir" | "chmod" | "fchmodat" | "symlink" | "symlinkat" | "link" | "linkat" => true,
            "bpf" => rest.contains("BPF_OBJ_PIN"),
            _ => false,
        };
        // Failed calls wrote nothing.
        if writes && !rest.contains("= -1") {
            seen.written.extend(paths_of(rest));
        }
    }
    Ok(())
}

#[test]
#[ignore = "needs root, a kernel with BPF, setpriv and strace: run `cargo xtask test`"]
fn the_units_sandbox_lets_segbpf_enforce_reload_and_guard() -> anyhow::Result<()> {
    let mut lab = Lab::new("svc")?;
    lab.add_host("srv", &["198.18.86.10/24"])?;
    lab.add_host("client", &["198.18.86.5/24"])?;
    let srv = lab.host("srv").addrs[0];
    let _servers = [8080, 9090]
        .into_iter()
        .map(|p| net::Server::tcp_echo(&lab.host("srv").ns.name, srv, p))
        .collect::<Result<Vec<_>, _>>()?;
    let scratch = Scratch::new("sandbox")?;
    let sandbox = Sandbox {
        lab: &lab,
        history: scratch.0.join("history"),
        traces: scratch.0.join("traces"),
    };
    std::fs::create_dir_all(&sandbox.traces)?;
    let etc = scratch.0.join("etc");
    std::fs::create_dir_all(&etc)?;
    let file = etc.join("roles.toml");
    std::fs::write(&file, one_tcp_port_policy(8080))?;
    let file_arg = file.display().to_string();

    // The service's main process: enforce, stay in the foreground.
    let attach = Started(Some(
        sandbox
            .command("attach", &["attach", "eth0", "--policy", &file_arg])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("starting nsenter")?,
    ));
    if let Err(e) = lab.wait_enforcing("srv") {
        let out = attach.stop()?;
        bail!(
            "{e}; attach under the sandbox said:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(reachable(&lab, 8080)?, "8080 allowed");
    assert!(!reachable(&lab, 9090)?, "9090 dropped");

    // ExecReload: SIGHUP after the file changed.
    std::fs::write(&file, one_tcp_port_policy(9090))?;
    let main = child_of(attach.id()?)?;
    signal(main, nix::sys::signal::Signal::SIGHUP)?;
    wait_for(20, "the SIGHUP reload", || {
        reachable(&lab, 9090).unwrap_or(false)
    })?;
    assert!(!reachable(&lab, 8080)?, "8080 dropped after the reload");

    // Stop: SIGTERM to the main process; enforcement stays.
    signal(main, nix::sys::signal::Signal::SIGTERM)?;
    let out = attach.wait()?;
    assert!(
        out.status.success(),
        "attach under the sandbox: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lab.status_json("srv")?["attachments"][0]["attached"], true);
    assert!(reachable(&lab, 9090)?, "still enforcing after the stop");
    assert!(!reachable(&lab, 8080)?, "still enforcing after the stop");
    lab.segbpf_ok("srv", &["detach", "eth0"])?;

    // The guard, started by attach --confirm inside the sandbox, undoes
    // the unconfirmed attach with the same capabilities (strace -f waits
    // for it: it is a child, in its own session).
    let out = sandbox
        .command(
            "guard",
            &[
                "attach",
                "eth0",
                "--policy",
                &file_arg,
                "--confirm",
                "2",
                "--no-wait",
            ],
        )
        .output()?;
    assert!(
        out.status.success(),
        "attach --confirm under the sandbox: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(20, "the guard's detach", || {
        lab.segbpf("srv", &["status", "eth0"]).is_ok_and(|o| {
            !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not attached")
        })
    })?;
    assert!(reachable(&lab, 8080)?, "open again once the guard detached");

    let mut seen = Seen::default();
    for trace in std::fs::read_dir(&sandbox.traces)? {
        read_trace(&trace?.path(), &mut seen)?;
    }
    ensure!(seen.syscalls.contains("bpf"), "no bpf() in the traces?");
    ensure!(
        seen.written
            .iter()
            .any(|p| Path::new(p).starts_with(&lab.bpffs)),
        "no pin in the traces?"
    );
    let allowed = allowed_syscalls()?;
    let denied: Vec<&String> = seen.syscalls.difference(&allowed).collect();
    assert!(
        denied.is_empty(),
        "system calls SystemCallFilter= would refuse: {denied:?}"
    );
    let families: BTreeSet<String> = directive("RestrictAddressFamilies").into_iter().collect();
    let foreign: Vec<&String> = seen.families.difference(&families).collect();
    assert!(
        foreign.is_empty(),
        "socket families RestrictAddressFamilies= would refuse: {foreign:?}"
    );
    let writable = [
        lab.bpffs.clone(),
        lab.state.clone(),
        sandbox.history.clone(),
        PathBuf::from("/dev/null"),
    ];
    let outside: Vec<&String> = seen
        .written
        .iter()
        .filter(|p| !writable.iter().any(|w| Path::new(p).starts_with(w)))
        .collect();
    if !outside.is_empty() {
        bail!("written outside the unit's writable directories: {outside:?}");
    }
    Ok(())
}
