//! A lab: hosts in network namespaces on one bridge (in a "switch"
//! namespace), and the `segbpf` binary run in them with private pin and
//! state roots. Dropping the lab detaches segbpf, removes its pins and
//! state and deletes every namespace (and with them every veth).

use std::{
    net::IpAddr,
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

use crate::netns::Netns;

/// A host of the lab.
#[derive(Debug)]
pub struct Host {
    /// Logical name (`web`, `db`, ...).
    pub name: String,
    /// Its namespace.
    pub ns: Netns,
    /// Its interface towards the switch.
    pub iface: String,
    /// Its addresses.
    pub addrs: Vec<IpAddr>,
}

/// A set of hosts on one L2 segment.
pub struct Lab {
    /// Unique id of this lab (prefix of its namespace names).
    pub id: String,
    /// Pin root given to segbpf (`SEGBPF_BPFFS`).
    pub bpffs: PathBuf,
    /// State root given to segbpf (`SEGBPF_STATE_DIR`).
    pub state: PathBuf,
    bin: PathBuf,
    hosts: Vec<Host>,
    switch: Option<Netns>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The `segbpf` binary: `$SEGBPF_BIN`, else `target/debug/segbpf` of this workspace.
pub fn segbpf_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SEGBPF_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    target.join("debug/segbpf")
}

impl Lab {
    /// Creates an empty lab (the switch namespace with its bridge).
    pub fn new(tag: &str) -> anyhow::Result<Lab> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{tag}{}x{n}", std::process::id());
        let bin = segbpf_bin();
        if !bin.exists() {
            bail!(
                "segbpf binary not found at {} (build it first: cargo build -p segbpf, or set SEGBPF_BIN)",
                bin.display()
            );
        }
        let switch = Netns::create(&format!("{id}-sw"))?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        Ok(Lab {
            bpffs: PathBuf::from(format!("/sys/fs/bpf/segbpf-lab-{id}")),
            state: std::env::temp_dir().join(format!("segbpf-lab-{id}")),
            id,
            bin,
            hosts: Vec::new(),
            switch: Some(switch),
        })
    }

    /// Adds a host with addresses in CIDR form (e.g. `10.10.1.30/16`,
    /// `fd00:10:1::30/64`) on interface `eth0`, plugged into the bridge.
    pub fn add_host(&mut self, name: &str, cidrs: &[&str]) -> anyhow::Result<&Host> {
        let ns = Netns::create(&format!("{}-{name}", self.id))?;
        let switch = self.switch.as_ref().context("lab has no switch")?;
        let port = format!("p{}", self.hosts.len());
        ip_ok(&[
            "link",
            "add",
            "eth0",
            "netns",
            &ns.name,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &switch.name,
        ])?;
        switch.ip(&["link", "set", &port, "master", "br0"])?;
        switch.ip(&["link", "set", &port, "up"])?;
        let mut addrs = Vec::new();
        for c in cidrs {
            let mut args = vec!["addr", "add", c, "dev", "eth0"];
            if c.contains(':') {
                args.push("nodad");
            }
            ns.ip(&args)?;
            let a: IpAddr = c
                .split('/')
                .next()
                .unwrap_or(c)
                .parse()
                .with_context(|| format!("address {c}"))?;
            addrs.push(a);
        }
        ns.ip(&["link", "set", "eth0", "up"])?;
        self.hosts.push(Host {
            name: name.to_string(),
            ns,
            iface: "eth0".to_string(),
            addrs,
        });
        Ok(self.hosts.last().expect("just pushed"))
    }

    /// Stops the switch namespace's own traffic (IGMP reports from the
    /// bridge, IPv6 router solicitations and MLD reports), for tests that
    /// expect counters to stay still. Call before adding hosts.
    pub fn quiet_switch(&self) -> anyhow::Result<()> {
        let switch = self.switch.as_ref().context("lab has no switch")?;
        quiet(&switch.name)
    }

    /// Stops a host's own background traffic (IPv6 is disabled in its
    /// namespace, link-local IGMP reports are off), for tests that expect
    /// its counters to stay still. Give such a host IPv4 addresses only.
    pub fn quiet_host(&self, name: &str) -> anyhow::Result<()> {
        quiet(&self.host(name).ns.name)
    }

    /// Makes the switch namespace a router too: it takes `gateways`
    /// (CIDRs on its bridge, one per subnet) and forwards between them,
    /// without ICMP redirects (hosts of several subnets share the bridge).
    pub fn route(&self, gateways: &[&str]) -> anyhow::Result<()> {
        let switch = self.switch.as_ref().context("lab has no switch")?;
        for g in gateways {
            switch.ip(&["addr", "add", g, "dev", "br0"])?;
        }
        crate::netns::sh(
            "ip",
            &[
                "netns",
                "exec",
                &switch.name,
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
                "-w",
                "net.ipv4.conf.all.send_redirects=0",
                "-w",
                "net.ipv4.conf.br0.send_redirects=0",
            ],
        )
        .map(|_| ())
    }

    /// Gives a host a default route via `gateway`.
    pub fn default_route(&self, host: &str, gateway: &str) -> anyhow::Result<()> {
        self.host(host)
            .ns
            .ip(&["route", "add", "default", "via", gateway])
            .map(|_| ())
    }

    /// The host called `name`.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in lab"))
    }

    /// Runs `segbpf --netns HOST ARGS...` with the lab's roots.
    pub fn segbpf(&self, host: &str, args: &[&str]) -> anyhow::Result<Output> {
        self.segbpf_from(&self.bin, host, args)
    }

    /// Like [`Lab::segbpf`], with another build of segbpf (`bin`): the
    /// benchmark's before-and-after runs.
    pub fn segbpf_from(
        &self,
        bin: &std::path::Path,
        host: &str,
        args: &[&str],
    ) -> anyhow::Result<Output> {
        let h = self.host(host);
        Command::new(bin)
            .arg("--netns")
            .arg(&h.ns.name)
            .args(args)
            .env("SEGBPF_BPFFS", &self.bpffs)
            .env("SEGBPF_STATE_DIR", &self.state)
            .output()
            .with_context(|| format!("running {}", bin.display()))
    }

    /// Like [`Lab::segbpf`] but fails unless the exit status is 0; returns stdout.
    pub fn segbpf_ok(&self, host: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self.segbpf(host, args)?;
        if !out.status.success() {
            bail!(
                "segbpf {} on {host} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `segbpf --netns HOST ARGS...` with the lab's roots in the
    /// background (stdout and stderr piped), e.g. a foreground attach.
    pub fn spawn(&self, host: &str, args: &[&str]) -> anyhow::Result<std::process::Child> {
        Command::new(&self.bin)
            .arg("--netns")
            .arg(&self.host(host).ns.name)
            .args(args)
            .env("SEGBPF_BPFFS", &self.bpffs)
            .env("SEGBPF_STATE_DIR", &self.state)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))
    }

    /// Starts `segbpf flows eth0 --follow --output json EXTRA...` on `host`
    /// and gives it a moment to take its first look at the tables; stop it
    /// with [`Running::json_lines`].
    pub fn follow_flows(&self, host: &str, extra: &[&str]) -> anyhow::Result<Running> {
        let mut args = vec!["flows", "eth0", "--follow", "--output", "json"];
        args.extend_from_slice(extra);
        let follower = Running::new(self.spawn(host, &args)?);
        std::thread::sleep(std::time::Duration::from_millis(1500));
        Ok(follower)
    }

    /// Waits (up to 20 s) until segbpf enforces on `host`'s eth0: pinned
    /// programs, maps and links, as `status` reports.
    pub fn wait_enforcing(&self, host: &str) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let enforcing = self
                .segbpf(host, &["status", "eth0", "--output", "json"])
                .ok()
                .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
                .is_some_and(|v| v["attachments"][0]["attached"] == true);
            if enforcing {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "segbpf did not come up on {host}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Attaches segbpf on `host` with `policy` (extra args appended) and returns stdout.
    pub fn attach(&self, host: &str, policy: &str, extra: &[&str]) -> anyhow::Result<String> {
        let iface = self.host(host).iface.clone();
        let mut args = vec!["attach", iface.as_str(), "--policy", policy, "--no-wait"];
        args.extend_from_slice(extra);
        self.segbpf_ok(host, &args)
    }

    /// Whether a TCP handshake from `from`'s first address reaches `to`'s
    /// first address on `port` within 400 ms.
    pub fn tcp_reachable(&self, from: &str, to: &str, port: u16) -> anyhow::Result<bool> {
        let src = self.host(from);
        crate::net::tcp_connect(
            &src.ns.name,
            src.addrs[0],
            self.host(to).addrs[0],
            port,
            std::time::Duration::from_millis(400),
        )
    }

    /// Writes a policy file `name` with `text` under the lab's state root
    /// (removed with the lab) and returns its path.
    pub fn write_policy(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let dir = self.state.join("policies");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// `segbpf status --output json` of `host`, parsed.
    pub fn status_json(&self, host: &str) -> anyhow::Result<serde_json::Value> {
        let iface = self.host(host).iface.clone();
        let out = self.segbpf_ok(host, &["status", &iface, "--output", "json"])?;
        serde_json::from_str(&out).context("status JSON")
    }
}

fn quiet(ns: &str) -> anyhow::Result<()> {
    crate::netns::sh(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "sysctl",
            "-q",
            "-w",
            "net.ipv6.conf.all.disable_ipv6=1",
            "-w",
            "net.ipv6.conf.default.disable_ipv6=1",
            "-w",
            "net.ipv4.igmp_link_local_mcast_reports=0",
        ],
    )
    .map(|_| ())
}

fn ip_ok(args: &[&str]) -> anyhow::Result<()> {
    crate::netns::ip(args).map(|_| ())
}

impl Drop for Lab {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = self.segbpf(&h.name, &["detach", &h.iface]);
        }
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir_all(&self.state);
        self.hosts.clear(); // deletes host namespaces
        self.switch = None;
    }
}

/// A policy for a role `srv` on any host that opens one TCP port
/// (ingress) and drops everything else coming in.
pub fn one_tcp_port_policy(port: u16) -> String {
    format!(
        r#"version = 1
[defaults]
ingress = "drop"
egress = "allow"
[roles.srv]
hosts = "any"
[[roles.srv.ingress]]
from = "any"
tcp = [{port}]
"#
    )
}

/// A child process we started (a foreground `segbpf attach`), killed and
/// reaped when dropped unless [`Running::wait`] reaped it first: a failing
/// test leaves no process behind.
pub struct Running(Option<std::process::Child>);

impl Running {
    /// Takes ownership of `child`.
    pub fn new(child: std::process::Child) -> Self {
        Running(Some(child))
    }

    /// Sends SIGTERM (the child is still ours: not yet reaped).
    pub fn terminate(&self) -> anyhow::Result<()> {
        self.signal(nix::sys::signal::Signal::SIGTERM)
    }

    /// Sends `sig` (the child is still ours: not yet reaped).
    pub fn signal(&self, sig: nix::sys::signal::Signal) -> anyhow::Result<()> {
        if let Some(c) = &self.0 {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig)?;
        }
        Ok(())
    }

    /// Whether the child has exited (without reaping it for good).
    pub fn try_wait(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        match &mut self.0 {
            Some(c) => Ok(c.try_wait()?),
            None => Ok(None),
        }
    }

    /// Ends the child (SIGTERM) and parses its stdout as JSON Lines
    /// (lines that are not JSON are left out).
    pub fn json_lines(self) -> anyhow::Result<Vec<serde_json::Value>> {
        self.terminate()?;
        let out = self.wait()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// Waits for the child to exit and returns its output.
    pub fn wait(mut self) -> anyhow::Result<Output> {
        let child = self.0.take().context("already reaped")?;
        Ok(child.wait_with_output()?)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
