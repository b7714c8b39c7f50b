//! `segbpf attach`: validate and compile the policy, load the program, fill
//! its maps, pin program, maps and link under bpffs, attach at XDP, then
//! stay in the foreground until SIGINT/SIGTERM. Enforcement stays in place
//! after the process exits; `segbpf detach` removes it.
//!
//! Everything that can fail on bad input (policy, interface, roles,
//! capacity) is checked before the kernel is touched; a failure after that
//! removes whatever was pinned, so nothing is left half-applied.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use aya::programs::{TcAttachType, XdpMode, links::FdLink, tc};
use tracing::{info, warn};

use crate::{
    compile::{self, Capacity},
    loader, maps, netif,
    pins::{self, Attachment},
    policy::{Policy, roles},
    state::State,
    telemetry::{self, LogFormat, Reader},
};

/// XDP attach mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Native (driver) mode when the driver supports it, else generic (skb).
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode.
    Skb,
}

/// Arguments of `segbpf attach`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface to protect.
    pub iface: String,
    /// Policy file (roles.toml).
    #[arg(long, short = 'p', value_name = "FILE")]
    pub policy: PathBuf,
    /// The host's role (repeatable); default: roles whose `hosts` contain an address of IFACE.
    #[arg(long, value_name = "ROLE")]
    pub role: Vec<String>,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,
    /// Connection-table capacity (entries; least recently used are evicted when full).
    #[arg(long, value_name = "ENTRIES", default_value_t = segbpf_common::DEFAULT_CT_ENTRIES,
          value_parser = clap::value_parser!(u32).range(1024..=(1 << 26)))]
    pub ct_size: u32,
    /// Audit mode: enforce nothing; packets the policy would drop pass and
    /// are reported as `audit` events.
    #[arg(long)]
    pub audit: bool,
    /// Events allowed in one burst by the kernel rate limiter (default: `log_rate`).
    #[arg(long, value_name = "EVENTS", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub log_burst: Option<u32>,
    /// Format of the event lines printed on stdout while attach runs.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9469) while attach runs.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Detach again after SECS seconds unless `segbpf confirm IFACE` runs
    /// (a guard in its own process undoes it even if attach is killed).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub confirm: Option<u64>,
    /// Map sizes.
    #[command(flatten)]
    pub sizes: crate::cmd::MapSizes,
    /// Apply and exit at once (enforcement stays in place) instead of staying in the foreground.
    #[arg(long)]
    pub no_wait: bool,
    /// Accept a policy file that is writable by users other than root, or
    /// owned by one (refused by default, as sshd's StrictModes does); holds
    /// for this attachment's later reloads too.
    #[arg(long)]
    pub insecure_policy: bool,
}

/// Runs `segbpf attach`.
pub async fn run(args: Args, netns: Option<&str>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Handlers first, so a signal that arrives while applying is not fatal.
    let signals = (
        signal(SignalKind::terminate()).context("SIGTERM handler")?,
        signal(SignalKind::interrupt()).context("SIGINT handler")?,
    );
    let hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let listener = match args.metrics {
        Some(addr) if !args.no_wait => Some(crate::metrics::bind(addr).await?),
        Some(_) => {
            return Err(crate::cmd::UsageError(
                "--metrics needs attach to stay in the foreground (drop --no-wait)".into(),
            )
            .into());
        }
        None => None,
    };
    let (att, summary) = apply(&args, netns)?;
    if args.no_wait {
        // Nothing streams: the summary is the result.
        println!("{summary}");
        return Ok(());
    }
    // stdout carries the event stream; the summary is a log line.
    info!("{summary}");
    let _metrics = listener.map(|listener| {
        let att = att.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(listener, att).await {
                tracing::error!("{e:#}");
            }
        })
    });
    info!(
        "enforcing on {}; drop events follow on stdout; Ctrl-C leaves the foreground (enforcement stays until `segbpf detach {}`)",
        args.iface, args.iface
    );
    wait_for_exit(&att, signals, hup, args.log_format).await?;
    Ok(())
}

/// Applies the policy to the interface; returns the attachment and a one-line summary.
pub fn apply(args: &Args, netns: Option<&str>) -> anyhow::Result<(Attachment, String)> {
    // 1. Everything that depends only on input: no kernel change yet.
    if !args.insecure_policy {
        crate::trust::check_policy_file(&args.policy)?;
    }
    let policy = Policy::load(&args.policy)?;
    let ifindex = netif::ifindex(&args.iface)?;
    // The device type decides where packets start; refuse what we cannot parse.
    let link = netif::link_layer(&args.iface)?;
    let addrs = netif::addresses(&args.iface)?;
    let roles = roles::resolve(&policy, &args.role, &args.iface, &addrs)?;
    let generation = 1;
    let capacity = Capacity {
        ct: args.ct_size,
        ..args.sizes.capacity(&policy)
    };
    let mut compiled =
        compile::compile(&policy, &roles, Some(&args.iface), 0, generation, capacity)
            .with_context(|| format!("{}: compiling for {}", policy.source, args.iface))?;
    compiled.config.audit = args.audit as u8;
    compiled.config.log_burst = args.log_burst.unwrap_or(policy.defaults.log_rate.max(1));
    let att = Attachment::new(&args.iface, netns);
    if att.is_attached() {
        bail!(
            "segbpf is already attached to {} ({}); run `segbpf detach {}` first",
            args.iface,
            att.dir.display(),
            args.iface
        );
    }

    // 2. Kernel: load, fill, pin, attach. Undo on any failure.
    pins::Roots::from_env()
        .ensure_bpffs()
        .context("mounting bpffs")?;
    if att.dir.exists() {
        warn!("removing stale pins in {}", att.dir.display());
        att.remove()?;
    }
    // The guard starts before the kernel changes, so no moment exists
    // where the change is in force without its guard.
    if let Some(secs) = args.confirm {
        crate::cmd::confirm::arm(&att, generation, secs, None)?;
    }
    let result = load_and_attach(&att, &compiled, capacity, link.link, args.mode);
    let attached = match result {
        Ok(v) => v,
        Err(e) => {
            crate::cmd::confirm::disarm(&att);
            if let Err(cleanup) = att.remove() {
                warn!("cleaning up {}: {cleanup}", att.dir.display());
            }
            return Err(e);
        }
    };
    let state = State {
        iface: args.iface.clone(),
        netns: netns.map(str::to_string),
        ifindex,
        policy: std::fs::canonicalize(&args.policy)
            .unwrap_or_else(|_| args.policy.clone())
            .display()
            .to_string(),
        roles: roles.clone(),
        role_args: args.role.clone(),
        previous_roles: Vec::new(),
        roles_changed_at: 0,
        set_overrides: Default::default(),
        rule_slots: capacity.rule_stats,
        peer_entries: capacity.peer_v4,
        port_entries: capacity.ports,
        mode: attached.xdp_mode.to_string(),
        link_type: link.arphrd,
        raw_ip: link.is_raw_ip(),
        insecure_policy: args.insecure_policy,
        tc_mode: attached.tc_mode.to_string(),
        tc_prog_id: attached.tc_prog_id,
        ct_size: capacity.ct,
        audit: args.audit,
        log_rate: compiled.config.log_rate,
        log_burst: compiled.config.log_burst,
        generation,
        prog_id: attached.xdp_prog_id,
        attached_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        entries: [
            compiled.peers_v4.len(),
            compiled.peers_v6.len(),
            compiled.ports.len(),
        ],
        classes: compiled.classes,
        rules: compiled.rules.clone(),
    };
    if let Err(e) = state.write(&att.state) {
        let _ = att.remove();
        return Err(e);
    }
    if let Some(secs) = args.confirm {
        // In force now: the confirmation time starts.
        crate::cmd::confirm::start_clock(&att, generation, secs)?;
    }
    let canonical = std::path::PathBuf::from(&state.policy);
    if let Err(e) = crate::history::record(&att, generation, &canonical, &Default::default()) {
        tracing::warn!("policy history not updated: {e:#}");
    }

    let summary = format!(
        "attached segbpf to {} (xdp {} prog {}, tc {} prog {}){}: policy {}, roles {}, {} rules, {} classes",
        args.iface,
        attached.xdp_mode,
        attached.xdp_prog_id,
        attached.tc_mode,
        attached.tc_prog_id,
        if args.audit { " in AUDIT mode" } else { "" },
        policy.source,
        roles.join(","),
        compiled.rules.len(),
        compiled.classes
    );
    Ok((att, summary))
}

/// What was attached.
struct Attached {
    xdp_prog_id: u32,
    xdp_mode: &'static str,
    tc_prog_id: u32,
    tc_mode: &'static str,
}

fn load_and_attach(
    att: &Attachment,
    compiled: &compile::Compiled,
    capacity: Capacity,
    link: u8,
    mode: Mode,
) -> anyhow::Result<Attached> {
    let mut ebpf = loader::load_for_link(capacity, segbpf_common::RUN_LIVE, link)?;
    maps::write_policy(&mut ebpf, compiled)?;
    pins::private_dir(&att.dir).with_context(|| format!("creating {}", att.dir.display()))?;
    maps::pin_all(&mut ebpf, att)?;

    // Egress first: replies to what the host sends must be tracked before
    // ingress starts dropping what is not.
    let prog = loader::tc(&mut ebpf)?;
    prog.pin(att.prog_tc())
        .with_context(|| format!("pinning program at {}", att.prog_tc().display()))?;
    let tc_prog_id = prog.info().map(|i| i.id()).unwrap_or(0);
    use aya::util::KernelVersion;
    let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    if !tcx {
        // Older kernels: a netlink filter under the clsact qdisc.
        let _ = tc::qdisc_add_clsact(&att.iface);
    }
    let link_id = prog
        .attach(&att.iface, TcAttachType::Egress)
        .with_context(|| format!("attaching TC egress to {}", att.iface))?;
    let link = prog.take_link(link_id)?;
    let tc_mode = match FdLink::try_from(link) {
        Ok(fd_link) => {
            fd_link
                .pin(att.link_tc())
                .with_context(|| format!("pinning link at {}", att.link_tc().display()))?;
            "tcx"
        }
        Err(e) => {
            // A netlink filter is not an fd-based link and cannot be pinned;
            // it stays in the kernel until `detach` removes it by name.
            tracing::debug!("TC link is not pinnable ({e}); kept as a clsact filter");
            "clsact"
        }
    };

    let prog = loader::xdp(&mut ebpf)?;
    prog.pin(att.prog_xdp())
        .with_context(|| format!("pinning program at {}", att.prog_xdp().display()))?;
    let xdp_prog_id = prog.info().map(|i| i.id()).unwrap_or(0);
    let attempts: &[(XdpMode, &'static str)] = match mode {
        Mode::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "skb")],
        Mode::Native => &[(XdpMode::Driver, "native")],
        Mode::Skb => &[(XdpMode::Skb, "skb")],
    };
    let mut last_err = None;
    for (xdp_mode, name) in attempts {
        match prog.attach(&att.iface, *xdp_mode) {
            Ok(link_id) => {
                let link = prog.take_link(link_id)?;
                let fd_link = FdLink::try_from(link).context(
                    "the kernel attached XDP without a bpf_link, which cannot be pinned (kernel >= 5.9 needed)",
                )?;
                fd_link
                    .pin(att.link_xdp())
                    .with_context(|| format!("pinning link at {}", att.link_xdp().display()))?;
                return Ok(Attached {
                    xdp_prog_id,
                    xdp_mode: name,
                    tc_prog_id,
                    tc_mode,
                });
            }
            Err(e) => {
                tracing::debug!("xdp {name} attach on {} failed: {e}", att.iface);
                last_err = Some((name, e));
            }
        }
    }
    if tc_mode == "clsact" {
        let _ = tc::qdisc_detach_program(
            &att.iface,
            TcAttachType::Egress,
            segbpf_common::PROG_TC_EGRESS,
        );
    }
    match last_err {
        Some((name, e)) => {
            Err(anyhow::Error::new(e)
                .context(format!("attaching XDP ({name} mode) to {}", att.iface)))
        }
        None => bail!("no XDP mode to try"),
    }
}

/// Reloads the policy on SIGHUP, or when the policy file changes (checked
/// every 2 seconds), keeping live set edits. A policy that fails
/// validation changes nothing; the reason is logged. While a change waits
/// for `segbpf confirm`, automatic reloads wait too (logged once): they
/// would supersede the unconfirmed change and its guard would stand down.
/// Never returns.
async fn watch_policy(att: &Attachment, mut hup: tokio::signal::unix::Signal) {
    let mtime = |att: &Attachment| {
        State::current(att)
            .ok()
            .and_then(|s| std::fs::metadata(&s.policy).ok())
            .and_then(|m| m.modified().ok())
    };
    let mut seen = mtime(att);
    let mut deferred: Option<&'static str> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        let why = tokio::select! {
            _ = hup.recv() => "SIGHUP",
            _ = tick.tick() => {
                let now = mtime(att);
                match deferred {
                    Some(why) if crate::cmd::confirm::pending(att).is_none() => why,
                    _ if now == seen || now.is_none() => continue,
                    _ => "the policy file changed",
                }
            }
        };
        if let Some(p) = crate::cmd::confirm::pending(att) {
            if deferred.is_none() {
                warn!(
                    "{why}: generation {} waits for `segbpf confirm {}`; the automatic reload waits until it is confirmed or undone",
                    p.generation, att.iface
                );
            }
            deferred = Some(why);
            seen = mtime(att);
            continue;
        }
        deferred = None;
        match crate::cmd::reload::reload_keeping_sets(att) {
            Ok(msg) => info!("{why}: {msg}"),
            Err(e) => {
                tracing::error!("{why}: reload refused, the policy in force is unchanged: {e:#}")
            }
        }
        seen = mtime(att);
    }
}

/// Streams events until SIGINT/SIGTERM, or until the attachment is
/// removed by `segbpf detach`, then says how enforcement can be removed.
async fn wait_for_exit(
    att: &Attachment,
    (mut term, mut int): (tokio::signal::unix::Signal, tokio::signal::unix::Signal),
    hup: tokio::signal::unix::Signal,
    format: LogFormat,
) -> anyhow::Result<()> {
    let mut signalled = false;
    {
        let stop = async {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
                _ = watch_policy(att, hup) => {},
            }
        };
        let stop = async {
            stop.await;
            signalled = true;
        };
        telemetry::stream(att, format, Reader::Attach, Duration::from_secs(5), stop).await?;
    }
    if !signalled {
        return Ok(()); // detached by another command
    }
    let ns = att
        .netns
        .as_deref()
        .map(|n| format!(" --netns {n}"))
        .unwrap_or_default();
    info!(
        "leaving; segbpf stays attached to {} and keeps enforcing. Remove it with: segbpf{ns} detach {}",
        att.iface, att.iface
    );
    Ok(())
}
