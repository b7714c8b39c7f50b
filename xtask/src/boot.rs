//! `cargo xtask dist --check`, as root: the package on a machine booted
//! with a real systemd as PID 1.
//!
//! `systemd-nspawn --volatile=yes -D / --boot` boots this machine's own
//! systemd in a container (package systemd-container; the boot is
//! `segbpf_tests::nspawn`, shared with the `under_systemd` test and the
//! bench): a tmpfs root, `/usr`,
//! `/etc` and `/var` as overlays of the host's whose changes vanish with the
//! container, a network namespace of its own (`--private-network`), a bpffs
//! of its own (a fresh instance mounted for it), writable `/sys` so that
//! udev runs and systemd has device units (udev is installed inside from
//! its package, `apt-get download udev`). Units that would change the
//! host's kernel settings from inside (sysctl, binfmt, udev's coldplug
//! trigger) are masked, and so are services of this machine that have no
//! business in the container (etcd, PostgreSQL).
//!
//! Inside, as on a fresh machine:
//! - the README's install steps, line by line as written (`apt install`
//!   of the package, copying the example, `check`, `systemctl enable
//!   --now segbpf@eth1`, ...), `eth1` being one end of a veth pair whose
//!   other end lives in a client namespace made here; the policy must be
//!   enforced (a connection to a closed port dropped) the moment
//!   `systemctl enable --now` returns;
//! - reload (a policy that opens a port: open within seconds of
//!   `systemctl reload`; `ExecReload=` only signals, so systemctl does
//!   not wait for the swap), restart (the XDP program stays attached and a closed port
//!   stays closed at every sample taken while the restart runs), stop (the
//!   policy stays in force), the interface going away (the instance
//!   stops) and coming back (it starts again and enforces);
//! - `apt remove segbpf`: says which interfaces it left open (`eth1`, and
//!   one attached by hand in another network namespace), and leaves no
//!   program attached.
//!
//! The container is powered off (SIGTERM to nspawn, SIGKILL if it does not
//! go), the bpffs unmounted and the client namespace deleted also when a
//! step fails.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use segbpf_tests::{net, netns::Netns, nspawn};

/// The container's address on `eth1` (no role of the example policy)
/// and the one that gives it the example's `db` role (`db_nodes`).
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 77, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 77, 2);
const DB_ADDR: &str = "fd00:10:1::31/64";
/// A port the reload opens, and one that stays closed throughout.
const OPENED: u16 = 8080;
const CLOSED: u16 = 9090;

/// The policy the reload swaps in: the `db` role (which the example
/// gave the interface) with port [`OPENED`] open to everyone.
const RELOADED_POLICY: &str = r#"version = 1
[sets]
db_nodes = ["fd00:10:1::30/124"]
[defaults]
ingress = "drop"
egress = "allow"
established = true
icmp = true
[roles.db]
hosts = "db_nodes"
[[roles.db.ingress]]
from = "any"
tcp = [8080]
"#;

/// The README's install steps: the command lines of the first code block
/// after "## Install and run as a service", comments removed.
fn readme_steps(readme: &str) -> anyhow::Result<Vec<String>> {
    let section = readme
        .split("## Install and run as a service")
        .nth(1)
        .context("README.md has no \"Install and run as a service\" section")?;
    let block = section
        .split("```")
        .nth(1)
        .context("no code block in the README's install section")?;
    let steps: Vec<String> = block
        .lines()
        .map(|l| l.split(" #").next().unwrap_or("").trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    ensure!(!steps.is_empty(), "the README's install block is empty");
    Ok(steps)
}

/// A booted container (`segbpf_tests::nspawn`, which powers it off and
/// unmounts its bpffs on drop) and its network namespace as
/// `/run/netns/NAME` (deleted first: fields drop in order).
struct Container {
    ns: Option<Netns>,
    c: nspawn::Container,
    pid1: u32,
}

impl Container {
    /// Boots one, sharing `share` (read-only, at `/root/share`) and the
    /// package at `/root/target/dist/NAME`.
    fn boot(work: &Path, share: &Path, deb: &Path) -> anyhow::Result<Container> {
        let name = format!("segbpf-boot-{}", std::process::id());
        let deb_name = deb.file_name().context("package name")?.to_string_lossy();
        let c = nspawn::Nspawn::new(&name, work)
            .bpffs()
            .bind_ro(share, "/root/share")
            .bind_ro(deb, &format!("/root/target/dist/{deb_name}"))
            // /sys writable: udev runs and systemd has device units.
            .writable_sys()
            .env("HOME=/root")
            .env("LANG=C.UTF-8")
            .env("DEBIAN_FRONTEND=noninteractive")
            .boot()?;
        let pid1 = c.pid1();
        segbpf_tests::netns::ip(&["netns", "attach", &name, &pid1.to_string()])?;
        Ok(Container {
            ns: Some(Netns { name }),
            c,
            pid1,
        })
    }

    /// Waits until systemd has finished booting (running or degraded).
    fn wait_running(&self) -> anyhow::Result<()> {
        self.c.wait_running()
    }

    /// Runs `script` with `sh -c` in the container (in /root); fails with
    /// what it printed if it fails. Returns stdout and stderr together.
    fn sh(&self, script: &str) -> anyhow::Result<String> {
        self.c.sh(&format!("cd /root && {script}"))
    }

    fn ns(&self) -> &str {
        self.ns.as_ref().map_or("", |n| n.name.as_str())
    }

    /// `systemctl is-active UNIT`.
    fn is_active(&self, unit: &str) -> String {
        self.c.is_active(unit)
    }

    /// Waits until `unit` is `want` (`active`, `inactive`).
    fn wait_state(&self, unit: &str, want: &str, secs: u64) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let state = self.is_active(unit);
            if state == want {
                return Ok(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(secs) {
                let log = self
                    .sh(&format!("journalctl -u {unit} --no-pager | tail -20"))
                    .unwrap_or_default();
                bail!("{unit} is {state}, not {want}, after {secs} s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The id of the XDP program on `eth1`, if any (`ip -d link`).
    fn xdp_prog(&self) -> anyhow::Result<Option<u32>> {
        xdp_prog_of(self.ns())
    }
}

fn xdp_prog_of(ns: &str) -> anyhow::Result<Option<u32>> {
    let out = segbpf_tests::netns::ip(&["-n", ns, "-d", "link", "show", "eth1"])?;
    Ok(out
        .split("prog/xdp id ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|id| id.parse().ok()))
}

/// Makes the veth pair: `c0` in the client namespace, `eth1` in the
/// container, both addressed and up.
fn make_link(client: &Netns, c: &Container) -> anyhow::Result<()> {
    client.ip(&["link", "add", "c0", "type", "veth", "peer", "name", "eth1"])?;
    client.ip(&["link", "set", "eth1", "netns", &c.pid1.to_string()])?;
    client.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "c0"])?;
    client.ip(&["link", "set", "c0", "up"])?;
    let ns = c.ns();
    let ip = |args: &[&str]| {
        let mut full = vec!["-n", ns];
        full.extend_from_slice(args);
        segbpf_tests::netns::ip(&full)
    };
    ip(&["addr", "add", &format!("{SERVER}/24"), "dev", "eth1"])?;
    ip(&["addr", "add", DB_ADDR, "dev", "eth1", "nodad"])?;
    ip(&["link", "set", "eth1", "up"])?;
    Ok(())
}

/// Whether a TCP connection from the client to `port` on the container
/// completes (a dropped SYN: no, after `wait`).
fn opens(client: &Netns, port: u16, wait: Duration) -> anyhow::Result<bool> {
    net::tcp_connect(
        &client.name,
        IpAddr::V4(CLIENT),
        IpAddr::V4(SERVER),
        port,
        wait,
    )
}

/// `OPENED` answers and `CLOSED` does not: the reloaded policy in force.
fn reloaded_policy_enforced(client: &Netns, what: &str) -> anyhow::Result<()> {
    ensure!(
        opens(client, OPENED, Duration::from_secs(3))?,
        "{what}: port {OPENED} (opened by the reloaded policy) does not answer"
    );
    ensure!(
        !opens(client, CLOSED, Duration::from_secs(1))?,
        "{what}: port {CLOSED} answers: the policy is not enforced"
    );
    Ok(())
}

/// Runs the whole check; `work` is a scratch directory (removed by the caller).
pub(crate) fn check(deb: &Path, work: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    // nftables and iptables: the package recommends them, and the
    // container has no network to fetch them from.
    crate::setup::ensure_packages(&["systemd-container", "nftables", "iptables"])?;
    let share = work.join("share");
    std::fs::create_dir_all(&share)?;
    download_udev(&share)?;
    std::fs::write(share.join("reloaded.toml"), RELOADED_POLICY)?;
    let readme = std::fs::read_to_string(crate::workspace().join("README.md"))?;
    let steps = readme_steps(&readme)?;

    let c = Container::boot(work, &share, deb)?;
    eprintln!(
        "dist: booted systemd in a container (pid {}) in {:.1?}",
        c.pid1,
        started.elapsed()
    );
    // udev, so that systemd has device units (segbpf@.service binds to
    // its interface's); its start is left to this script, its coldplug
    // trigger is masked. systemd picks device units up once re-executed
    // with udev running.
    c.sh(
        "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d \
         && dpkg -i /root/share/udev.deb && rm /usr/sbin/policy-rc.d \
         && systemctl start systemd-udevd && systemctl daemon-reexec",
    )?;
    c.wait_running()?;
    let client = Netns::create(&format!("segbpf-bootc-{}", std::process::id()))?;
    make_link(&client, &c)?;
    let _servers = [
        net::Server::tcp_echo(c.ns(), IpAddr::V4(SERVER), OPENED)?,
        net::Server::tcp_echo(c.ns(), IpAddr::V4(SERVER), CLOSED)?,
    ];
    ensure!(
        opens(&client, CLOSED, Duration::from_secs(3))?,
        "before segbpf, port {CLOSED} does not answer: the check could not tell enforcement"
    );
    c.wait_state("sys-subsystem-net-devices-eth1.device", "active", 10)?;

    // The README, as written.
    for step in &steps {
        let said = c.sh(step).with_context(|| {
            format!("the README's install step `{step}` fails on a fresh machine")
        })?;
        eprintln!("dist: README step ok: {step}");
        if step.contains("enable --now") {
            ensure!(
                !opens(&client, CLOSED, Duration::from_secs(1))?,
                "`{step}` returned, but port {CLOSED} still answers: READY before enforcing\n{said}"
            );
        }
    }
    ensure!(
        c.xdp_prog()?.is_some(),
        "no XDP program on eth1 after the README's steps"
    );

    // Reload: the new policy is in force (within the connect's 3 s:
    // `ExecReload=` only signals, so systemctl does not wait for it).
    ensure!(
        !opens(&client, OPENED, Duration::from_secs(1))?,
        "port {OPENED} answers under the example policy"
    );
    c.sh("cp /root/share/reloaded.toml /etc/segbpf/roles.toml && systemctl reload segbpf@eth1")?;
    reloaded_policy_enforced(&client, "after systemctl reload")?;

    // Restart: programs stay attached and the closed port stays closed
    // at every sample taken while systemctl restart runs.
    let prog = c.xdp_prog()?.context("no XDP program before the restart")?;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, ns, client) = (stop.clone(), c.ns().to_string(), client.name.clone());
        std::thread::spawn(move || -> anyhow::Result<u32> {
            let mut samples = 0;
            while !stop.load(Ordering::Relaxed) || samples == 0 {
                let now = xdp_prog_of(&ns)?;
                ensure!(
                    now == Some(prog),
                    "during the restart eth1's XDP program was {now:?}, not {prog}"
                );
                ensure!(
                    !net::tcp_connect(
                        &client,
                        IpAddr::V4(CLIENT),
                        IpAddr::V4(SERVER),
                        CLOSED,
                        Duration::from_millis(50)
                    )?,
                    "during the restart port {CLOSED} answered"
                );
                samples += 1;
            }
            Ok(samples)
        })
    };
    let restarted = c.sh("systemctl restart segbpf@eth1");
    stop.store(true, Ordering::Relaxed);
    let samples = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("the restart sampler panicked"))??;
    restarted?;
    ensure!(
        c.is_active("segbpf@eth1") == "active",
        "segbpf@eth1 not active after restart"
    );
    ensure!(
        c.xdp_prog()? == Some(prog),
        "the restart replaced the XDP program (not adopted)"
    );
    reloaded_policy_enforced(&client, "after systemctl restart")?;
    eprintln!("dist: restart: attached and closed at all {samples} samples");

    // Stop: the policy stays in force.
    c.sh("systemctl stop segbpf@eth1")?;
    ensure!(
        c.is_active("segbpf@eth1") == "inactive",
        "segbpf@eth1 still running after stop"
    );
    ensure!(
        c.xdp_prog()? == Some(prog),
        "systemctl stop removed the XDP program"
    );
    reloaded_policy_enforced(&client, "after systemctl stop")?;
    c.sh("systemctl start segbpf@eth1")?;

    // The interface goes away: the instance stops; it comes back: the
    // instance starts again (enabled: wanted by the device) and enforces.
    client.ip(&["link", "del", "c0"])?;
    let gone = c.wait_state("segbpf@eth1", "inactive", 15)?;
    make_link(&client, &c)?;
    let back = c.wait_state("segbpf@eth1", "active", 30)?;
    reloaded_policy_enforced(&client, "after eth1 came back")?;
    ensure!(
        c.xdp_prog()?.is_some(),
        "no XDP program on the re-created eth1"
    );
    eprintln!(
        "dist: eth1 removed: instance stopped after {gone:.1?}; re-created: enforcing after {back:.1?}"
    );

    // apt remove: segbpf is taken off every interface, also one in
    // another network namespace (attached by hand), and says so.
    c.sh(
        "ip netns add inner && ip -n inner link add v0 type veth peer name v1 \
         && ip -n inner link set v0 up && ip -n inner link set v1 up \
         && segbpf --netns inner attach v0 --policy /etc/segbpf/roles.toml --role db --no-wait",
    )?;
    let said = c.sh("apt-get remove -y segbpf 2>&1")?;
    for iface in ["eth1;", "v0 (netns"] {
        ensure!(
            said.contains(&format!("detached segbpf from {iface}")),
            "apt remove did not say it took segbpf off {iface}:\n{said}"
        );
    }
    ensure!(
        !c.sh("ip -n inner -d link show v0")?.contains("prog/xdp"),
        "after apt remove v0 (netns inner) still has an XDP program"
    );
    ensure!(
        c.xdp_prog()?.is_none(),
        "after apt remove eth1 still has an XDP program, with no segbpf left to remove it"
    );
    ensure!(
        opens(&client, CLOSED, Duration::from_secs(3))?,
        "after apt remove port {CLOSED} is still closed, with no segbpf left"
    );
    eprintln!(
        "dist: README steps, reload, restart, stop, interface away and back, apt remove under systemd as PID 1: ok ({:.0?})",
        started.elapsed()
    );
    drop(client);
    Ok(())
}

/// `apt-get download udev` into `dir` (as `udev.deb`): the version of
/// the installed libudev1, which udev depends on exactly, else the
/// candidate.
fn download_udev(dir: &Path) -> anyhow::Result<()> {
    let libudev = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", "libudev1"])
        .output()?;
    let pinned = format!("udev={}", String::from_utf8_lossy(&libudev.stdout).trim());
    let fetch = |what: &str| {
        Command::new("apt-get")
            .args(["download", "-qq", what])
            .current_dir(dir)
            .output()
    };
    let ok = |what: &str| fetch(what).is_ok_and(|o| o.status.success());
    if !ok(&pinned) && !ok("udev") {
        crate::run(Command::new("apt-get").args(["update", "-qq"]))?;
        if !ok(&pinned) {
            let out = fetch("udev")?;
            ensure!(
                out.status.success(),
                "apt-get download udev: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let deb = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("udev_"))
        })
        .context("apt-get download udev wrote no package")?;
    std::fs::rename(deb, dir.join("udev.deb"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_has_install_steps() {
        let readme = std::fs::read_to_string(crate::workspace().join("README.md")).unwrap();
        let steps = readme_steps(&readme).unwrap();
        assert!(
            steps[0].starts_with("apt install ./target/dist/"),
            "{steps:?}"
        );
        assert!(
            steps
                .iter()
                .any(|s| s.contains("systemctl enable --now segbpf@eth1"))
        );
    }
}
