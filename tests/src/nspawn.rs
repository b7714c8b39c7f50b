//! This machine's own systemd booted as PID 1 of a container:
//! `systemd-nspawn --volatile=yes -D / --boot` (package systemd-container).
//!
//! A tmpfs root, `/usr`, `/etc` and `/var` as overlays of the host's whose
//! changes vanish with the container, a network namespace of its own
//! (`--private-network`), segbpf's capabilities and `bpf()` past nspawn's
//! own system-call filter. Units that would change the host's kernel
//! settings from inside (sysctl, binfmt, udev's coldplug trigger) are
//! masked, and so are services of this machine that have no business in
//! the container (etcd, PostgreSQL).
//!
//! One implementation for the three users: `cargo xtask dist --check`
//! (the package installed on a machine booted by a real systemd), the
//! `under_systemd` test (segbpf-services.service before the units it
//! governs) and the bench's `IPAddressAllow=` comparison. What differs
//! between them is set on [`Nspawn`] before [`Nspawn::boot`]: the files
//! bound in, a fresh bpffs, the cgroup nspawn starts in, the environment
//! of commands run inside.
//!
//! A [`Container`] is powered off when dropped (SIGTERM to nspawn, SIGKILL
//! if it does not go within 30 s), and what [`Nspawn::boot`] made is
//! removed also when the boot fails: the bpffs unmounted, the cgroup tree
//! removed, and (with [`Nspawn::remove_work`]) the work directory.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

/// Units masked in every container (see the module's documentation).
pub const MASKED: &[&str] = &[
    "systemd-sysctl.service",
    "systemd-binfmt.service",
    "systemd-udev-trigger.service",
    "etcd.service",
    "etcd2.service",
    "postgresql.service",
];

/// The prefix a work directory's name must have for [`Nspawn::remove_work`]
/// to remove it.
pub const WORK_PREFIX: &str = "segbpf-nspawn-";

/// How to boot one container.
#[derive(Debug, Clone)]
pub struct Nspawn {
    machine: String,
    work: PathBuf,
    /// nspawn's options beyond the common ones (binds, `-q`).
    options: Vec<String>,
    /// nspawn's own environment.
    own_env: Vec<(&'static str, &'static str)>,
    bpffs: bool,
    cgroup: Option<(PathBuf, PathBuf)>,
    env: Vec<String>,
    remove_work: bool,
}

impl Nspawn {
    /// A container named `machine` (`-M`); its console and nspawn's own
    /// output go to `console.log` and `nspawn.log` in `work` (made here).
    #[must_use]
    pub fn new(machine: &str, work: &Path) -> Self {
        Nspawn {
            machine: machine.to_string(),
            work: work.to_path_buf(),
            options: Vec::new(),
            own_env: Vec::new(),
            bpffs: false,
            cgroup: None,
            env: Vec::new(),
            remove_work: false,
        }
    }

    /// Binds `src` read-only at `dst` in the container.
    #[must_use]
    pub fn bind_ro(mut self, src: &Path, dst: &str) -> Self {
        self.options
            .push(format!("--bind-ro={}:{dst}", src.display()));
        self
    }

    /// A fresh bpffs instance (mounted at `WORK/bpffs`) as the
    /// container's `/sys/fs/bpf`; unmounted when the container is gone.
    #[must_use]
    pub fn bpffs(mut self) -> Self {
        self.bpffs = true;
        self
    }

    /// nspawn's `-q`.
    #[must_use]
    pub fn quiet(mut self) -> Self {
        self.options.push("-q".to_string());
        self
    }

    /// `/sys` writable in the container, so that udev runs and systemd
    /// has device units.
    #[must_use]
    pub fn writable_sys(mut self) -> Self {
        self.own_env
            .push(("SYSTEMD_NSPAWN_API_VFS_WRITABLE", "yes"));
        self
    }

    /// Starts nspawn in the cgroup `top/below` (made here); the tree
    /// below `top`, `top` included, is removed once the container is
    /// gone.
    #[must_use]
    pub fn in_cgroup(mut self, top: PathBuf, below: &str) -> Self {
        let caller = top.join(below);
        self.cgroup = Some((top, caller));
        self
    }

    /// `NAME=VALUE` in the environment of [`Container::command`] (beside
    /// a `PATH` of the system's directories; nothing else is passed).
    #[must_use]
    pub fn env(mut self, name_value: &str) -> Self {
        self.env.push(name_value.to_string());
        self
    }

    /// Removes the work directory once the container is gone: only an
    /// absolute one whose name starts with [`WORK_PREFIX`].
    #[must_use]
    pub fn remove_work(mut self) -> Self {
        self.remove_work = true;
        self
    }

    /// Boots the container and waits until its systemd has finished
    /// booting (`running` or `degraded`).
    pub fn boot(self) -> anyhow::Result<Container> {
        std::fs::create_dir_all(&self.work)?;
        let mut c = Container {
            nspawn: None,
            pid1: 0,
            bpffs: None,
            cgroup: None,
            work: self.remove_work.then(|| self.work.clone()),
            env: self.env.clone(),
        };
        if self.bpffs {
            let bpffs = self.work.join("bpffs");
            std::fs::create_dir_all(&bpffs)?;
            ensure!(
                Command::new("mount")
                    .args(["-t", "bpf", "bpf"])
                    .arg(&bpffs)
                    .status()?
                    .success(),
                "mounting a bpffs for the container at {}",
                bpffs.display()
            );
            c.bpffs = Some(bpffs);
        }
        let mut cmd = if let Some((top, caller)) = &self.cgroup {
            c.cgroup = Some(top.clone());
            std::fs::create_dir_all(caller)?;
            let mut cmd = Command::new("sh");
            cmd.args(["-c", r#"echo 0 > "$0" && exec "$@""#])
                .arg(caller.join("cgroup.procs"))
                .arg("systemd-nspawn");
            cmd
        } else {
            Command::new("systemd-nspawn")
        };
        cmd.args(["--volatile=yes", "-D", "/", "--boot", "--register=no"])
            .args(["--keep-unit", "--private-network"])
            .args(["-M", &self.machine])
            .args([
                "--overlay=/usr::/usr",
                "--overlay=/etc::/etc",
                "--overlay=/var::/var",
            ]);
        if let Some(bpffs) = &c.bpffs {
            cmd.arg(format!("--bind={}:/sys/fs/bpf", bpffs.display()));
        }
        cmd.args(&self.options)
            // segbpf's capabilities, and bpf() past nspawn's own filter.
            .args([
                "--capability=CAP_BPF,CAP_PERFMON",
                "--system-call-filter=bpf",
            ]);
        for unit in MASKED {
            cmd.arg(format!("--bind-ro=/dev/null:/etc/systemd/system/{unit}"));
        }
        cmd.arg("systemd.firstboot=off")
            .envs(self.own_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(self.work.join("console.log"))?)
            .stderr(std::fs::File::create(self.work.join("nspawn.log"))?);
        let nspawn = c
            .nspawn
            .insert(cmd.spawn().context("running systemd-nspawn")?);
        let children = format!("/proc/{0}/task/{0}/children", nspawn.id());
        let started = Instant::now();
        while c.pid1 == 0 {
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "systemd-nspawn started no container: {}",
                std::fs::read_to_string(self.work.join("nspawn.log")).unwrap_or_default()
            );
            // nspawn's children: a short-lived helper, then the
            // container's PID 1 once it runs systemd.
            if let Some(pid) = std::fs::read_to_string(&children)
                .unwrap_or_default()
                .split_whitespace()
                .find(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|comm| comm.trim() == "systemd")
                })
            {
                c.pid1 = pid.parse()?;
            } else {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        c.wait_running()?;
        Ok(c)
    }
}

/// A booted container: see the module's documentation.
#[derive(Debug)]
pub struct Container {
    nspawn: Option<Child>,
    pid1: u32,
    bpffs: Option<PathBuf>,
    cgroup: Option<PathBuf>,
    work: Option<PathBuf>,
    env: Vec<String>,
}

impl Container {
    /// The container's PID 1 (its systemd), as the host sees it.
    #[must_use]
    pub fn pid1(&self) -> u32 {
        self.pid1
    }

    /// Waits until systemd has finished booting (running or degraded),
    /// 90 s at the most.
    pub fn wait_running(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let state = self.command("systemctl is-system-running").output()?;
            let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
            if state == "running" || state == "degraded" {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(90) {
                bail!("the container's systemd did not finish booting: {state}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `sh -c SCRIPT` in all of the container's namespaces (not in a
    /// unit's cgroup: what it runs is outside the container's cgroup
    /// tree), with the environment set by [`Nspawn::env`].
    #[must_use]
    pub fn command(&self, script: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.pid1.to_string(), "-a", "--"])
            .args(["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
            .args(&self.env)
            .args(["sh", "-c", script])
            .stdin(Stdio::null());
        cmd
    }

    /// Runs [`Container::command`]; fails with what it printed if it
    /// fails.
    pub fn output(&self, script: &str) -> anyhow::Result<Output> {
        let out = self.command(script).output()?;
        ensure!(
            out.status.success(),
            "in the container, `{script}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out)
    }

    /// Runs [`Container::command`]; returns stdout and stderr together,
    /// or fails with them if it fails.
    pub fn sh(&self, script: &str) -> anyhow::Result<String> {
        let out = self.output(script)?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// `systemctl is-active UNIT` (`active`, `inactive`, ...; empty if it
    /// could not be asked).
    #[must_use]
    pub fn is_active(&self, unit: &str) -> String {
        self.command(&format!("systemctl is-active {unit}"))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(nspawn) = &mut self.nspawn {
            // nspawn powers the container off on SIGTERM.
            if let Ok(pid) = i32::try_from(nspawn.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = nspawn.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !matches!(nspawn.try_wait(), Ok(Some(_))) {
                let _ = nspawn.kill();
                let _ = nspawn.wait();
            }
        }
        if let Some(top) = &self.cgroup {
            remove_cgroup_tree(top);
        }
        if let Some(bpffs) = &self.bpffs
            && !Command::new("umount")
                .arg(bpffs)
                .status()
                .is_ok_and(|s| s.success())
        {
            eprintln!("could not unmount {}; left in place", bpffs.display());
            return;
        }
        // Only an absolute, unique directory of our own.
        if let Some(work) = &self.work
            && work.is_absolute()
            && work
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(WORK_PREFIX))
        {
            let _ = std::fs::remove_dir_all(work);
        }
    }
}

/// Removes the cgroup directory `dir` and every one below it, deepest
/// first (a cgroup goes once its processes have; each is retried for up
/// to 1 s).
pub fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let started = Instant::now();
    while std::fs::remove_dir(dir).is_err()
        && dir.exists()
        && started.elapsed() < Duration::from_secs(1)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
}
