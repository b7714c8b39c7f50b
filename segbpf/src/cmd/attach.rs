//! `segbpf attach`: enforce a policy on an interface ([`crate::attachment::attach`]),
//! then stay in the foreground: stream drop events to stdout, serve
//! metrics, reload on SIGHUP or when the policy file changes (with
//! `--etcd`: follow the fleet's store instead, [`crate::fleet::agent`]), until
//! SIGINT/SIGTERM. Enforcement stays in place after the process exits;
//! `segbpf detach` removes it.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use tracing::info;

use crate::{
    attachment::attach::{self, Mode, Request},
    attachment::pins::Attachment,
    cmd::{MapSizes, UsageError},
    host::netns::Netns,
    observe::flowlog,
    observe::telemetry::{self, LogFormat, Reader},
};

/// Arguments of `segbpf attach`.
#[derive(Debug, clap::Args)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "command-line flags: each bool is one independent switch"
)]
pub struct Args {
    /// Interface to protect (or --services).
    #[arg(required_unless_present = "services")]
    pub iface: Option<String>,
    /// Enforce the policy's `[services.*]` on the sockets of their cgroups
    /// (systemd units, containers) instead of an interface: one pair of
    /// cgroup_skb programs at the cgroup root (docs/services.md).
    #[arg(long, conflicts_with_all = ["iface", "etcd", "role"])]
    pub services: bool,
    /// With --services: the cgroup v2 directory the services' `cgroup`
    /// paths are below (default: the cgroup v2 mount).
    #[arg(long, value_name = "DIR", requires = "services")]
    pub cgroup_root: Option<PathBuf>,
    /// With --services: only follow the cgroup tree of the attachment in
    /// force (what `--no-wait` leaves running in the background).
    #[arg(long, hide = true, requires = "services")]
    pub follow_only: bool,
    /// Policy file (roles.toml); or --etcd.
    #[arg(
        long,
        short = 'p',
        value_name = "FILE",
        required_unless_present = "etcd",
        conflicts_with = "etcd"
    )]
    pub policy: Option<PathBuf>,
    /// Fleet mode: the policy comes from etcd (docs/fleet.md).
    #[command(flatten)]
    pub fleet: crate::cmd::fleet::AgentArgs,
    /// The host's role (repeatable); default: roles whose `hosts` contain an address of IFACE.
    #[arg(long, value_name = "ROLE")]
    pub role: Vec<String>,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,
    /// Connection-table capacity: established flows per IP family, and a
    /// quarter of it for half-open ones (IPv4 and IPv6 have tables of
    /// their own, each holding both classes in one, with room to spare).
    /// Under pressure half-open and closing flows are evicted before
    /// established ones, least recently seen first. The tables are shared
    /// by every attachment of the network namespace: the first attachment
    /// sizes them.
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
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9469) while
    /// attach runs. An address in use is waited for up to 3 s (a segbpf
    /// just stopped may still hold it), then attach fails, nothing changed;
    /// SIGTERM or SIGINT meanwhile also ends it with exit 1, nothing changed.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Detach again after SECS seconds unless `segbpf confirm IFACE` runs
    /// (a guard in its own process undoes it even if attach is killed).
    /// With --services: `segbpf confirm --services`, first attach only.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub confirm: Option<u64>,
    /// Map sizes.
    #[command(flatten)]
    pub sizes: MapSizes,
    /// Apply and exit at once (enforcement stays in place) instead of staying in the foreground.
    #[arg(long)]
    pub no_wait: bool,
    /// How the running attach follows the policy file. `on` (default):
    /// an edit saved to the file is applied once the writer closes it or
    /// renames it into place (inotify; never a file still being written),
    /// and on SIGHUP, keeping live set edits; `off`: only on SIGHUP;
    /// `confirm:SECS`: as `on`, each automatic reload guarded like `reload
    /// --confirm SECS` (undone unless `segbpf confirm IFACE`). An automatic
    /// reload never applies what an explicit `reload` would refuse: a
    /// policy that cuts the SSH session attach runs in (`ssh-session`) is
    /// logged and not applied unless guarded, and a file whose text is
    /// already in force makes no new generation.
    #[arg(long, value_name = "on|off|confirm:SECS", default_value = "on", value_parser = parse_watch)]
    pub watch: attach::Watch,
    /// Attach even though the policy would cut the SSH session this
    /// command runs in (the `ssh-session` lint of `segbpf check`, for a
    /// session whose server address is on IFACE or whose client is routed
    /// out of IFACE; refused otherwise, unless --confirm guards it).
    #[arg(long)]
    pub force: bool,
    /// Accept a policy file that is writable by users other than root, or
    /// owned by one, or below such a directory (refused by default, as
    /// sshd's StrictModes does); holds for this attachment's later reloads
    /// too.
    #[arg(long)]
    pub insecure_policy: bool,
    /// Flow accounting and logs (docs/flows.md): `on` (default: flows are
    /// counted, denied traffic is aggregated for `segbpf flows` and
    /// `segbpf suggest`), `off` (neither, and no per-packet cost), or a
    /// file PATH to which attach also appends every flow record as JSON
    /// Lines, reopened on SIGHUP (for logrotate). Kept by reloads; an
    /// adopting attach applies it.
    #[arg(long, value_name = "on|off|PATH", default_value = "on", value_parser = parse_flow_log)]
    pub flow_log: FlowLog,
}

/// `--flow-log`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum FlowLog {
    /// Count packets, bytes and TCP flags per flow; aggregate denials.
    #[default]
    On,
    /// No flow accounting.
    Off,
    /// As `On`, and append every record to this file.
    File(PathBuf),
}

fn parse_flow_log(s: &str) -> Result<FlowLog, String> {
    match s {
        "on" => Ok(FlowLog::On),
        "off" => Ok(FlowLog::Off),
        "" => Err("expected on, off or a file path".into()),
        path => std::path::absolute(path)
            .map(FlowLog::File)
            .map_err(|e| format!("{path}: {e}")),
    }
}

fn parse_watch(s: &str) -> Result<attach::Watch, String> {
    match s {
        "on" => Ok(attach::Watch::On),
        "off" => Ok(attach::Watch::Off),
        _ => match s.strip_prefix("confirm:").map(str::parse::<u64>) {
            Some(Ok(secs)) if (1..=86_400).contains(&secs) => Ok(attach::Watch::Confirm(secs)),
            _ => Err("expected on, off or confirm:SECS (1 to 86400)".into()),
        },
    }
}

impl Args {
    /// The interface ("" with --services).
    pub fn iface(&self) -> &str {
        self.iface.as_deref().unwrap_or("")
    }

    /// The library's request for these arguments.
    fn request(&self, policy: PathBuf) -> Request {
        Request {
            iface: self.iface().to_string(),
            policy,
            roles: self.role.clone(),
            mode: self.mode,
            ct_size: self.ct_size,
            audit: self.audit,
            log_burst: self.log_burst,
            confirm: self.confirm,
            peer_entries: self.sizes.peer_entries,
            port_entries: self.sizes.port_entries,
            insecure_policy: self.insecure_policy,
            flow_acct: self.flow_log != FlowLog::Off,
        }
    }
}

/// Runs `segbpf attach IFACE` (`--services` is dispatched to
/// `cmd::services` by `cmd::run`).
pub async fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Handlers first, so a signal that arrives while applying is not fatal.
    let mut signals = (
        signal(SignalKind::terminate()).context("SIGTERM handler")?,
        signal(SignalKind::interrupt()).context("SIGINT handler")?,
    );
    let hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    if args.no_wait && matches!(args.flow_log, FlowLog::File(_)) {
        return Err(UsageError(
            "--flow-log PATH needs attach to stay in the foreground (drop --no-wait)".into(),
        )
        .into());
    }
    // Opened before anything is applied: a path that cannot be written is
    // a usage mistake, found before the kernel changes.
    let sink = match &args.flow_log {
        FlowLog::File(path) => Some(flowlog::FileSink::open(path.clone())?),
        _ => None,
    };
    let metrics = match args.metrics {
        // An address still held by a segbpf just stopped is waited for
        // (a few seconds); a signal meanwhile ends attach, nothing applied.
        // Stopped that way, attach did not do its work: exit 1, said so.
        Some(addr) if !args.no_wait => {
            let stopped = || {
                anyhow::anyhow!(
                    "stopped by a signal while waiting for --metrics {addr}; nothing was applied"
                )
            };
            tokio::select! {
                r = crate::observe::metrics::Server::bind(addr) => Some(r?),
                _ = signals.0.recv() => return Err(stopped()),
                _ = signals.1.recv() => return Err(stopped()),
            }
        }
        Some(_) => {
            return Err(UsageError(
                "--metrics needs attach to stay in the foreground (drop --no-wait)".into(),
            )
            .into());
        }
        None => None,
    };
    let fleet = args.fleet.config()?;
    let policy = match (&fleet, &args.policy) {
        (Some(cfg), _) => {
            // The cache at once, or the store's revision once it answers.
            // Stopped meanwhile (a service stopped while etcd is away), it
            // exits as a stopped service does, 0, and says nothing was
            // attached.
            let att = Attachment::new(args.iface(), ns);
            let stopped = || {
                tracing::warn!(
                    "stopped by a signal while waiting for the fleet's first policy; nothing was attached"
                );
            };
            tokio::select! {
                r = Box::pin(crate::fleet::agent::initial_policy(&att, cfg)) => r?.0,
                _ = signals.0.recv() => {
                    stopped();
                    return Ok(());
                }
                _ = signals.1.recv() => {
                    stopped();
                    return Ok(());
                }
            }
        }
        (None, Some(p)) => p.clone(),
        (None, None) => return Err(UsageError("--policy FILE or --etcd ENDPOINTS".into()).into()),
    };
    // Audit mode enforces nothing: it cannot cut a session (attaching
    // without --audit over an audit attachment, audit to enforce, is
    // checked).
    let req = args.request(policy);
    if fleet.is_none()
        && req.confirm.is_none()
        && !args.force
        && !req.audit
        && let Some(m) =
            crate::attachment::trust::file_cuts_ssh_session(&req.policy, &req.roles, &req.iface)
    {
        anyhow::bail!(
            "{}: refused: {m} [ssh-session]; nothing was changed (attach with --confirm SECS to apply it guarded, or --force)",
            req.policy.display()
        );
    }
    let applied = attach::apply(&req, ns)?;
    if args.no_wait {
        // Nothing streams: the summary is the result.
        crate::cmd::print_line(&applied.summary)?;
        return Ok(());
    }
    // stdout carries the event stream; the summary is a log line.
    info!("{}", applied.summary);
    let att = applied.att;
    if let Some(server) = metrics {
        server.start(att.clone())?;
    }
    info!(
        "enforcing on {}; drop events follow on stdout; Ctrl-C leaves the foreground (enforcement stays until `segbpf{} detach {}`)",
        att.describe(),
        ns.cli_option(),
        args.iface()
    );
    let flow_log = if args.flow_log == FlowLog::Off {
        None
    } else {
        let opts = flowlog::Options {
            flows: sink.is_some(),
            start: false,
            active_every: flowlog::ACTIVE_EVERY,
            denied_every: flowlog::DENIED_EVERY,
        };
        match flowlog::Runner::spawn(&att, opts, sink) {
            Ok(r) => Some(std::sync::Arc::new(r)),
            Err(e) => {
                tracing::warn!("flow log of {}: {e}", att.describe());
                None
            }
        }
    };
    // SIGHUP also reopens the flow-log file.
    if let Some(r) = flow_log.clone() {
        let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                r.reopen();
            }
        });
    }
    // Ready once everything that serves the attachment runs.
    crate::host::service::ready(&applied.summary);
    let result = wait_for_exit(
        &att,
        signals,
        hup,
        args.log_format,
        fleet.as_ref(),
        args.watch,
    )
    .await;
    if let Some(r) = flow_log {
        r.stop();
    }
    result
}

/// Streams events until SIGINT/SIGTERM, or until the attachment is
/// removed by `segbpf detach`, then says how enforcement can be removed.
async fn wait_for_exit(
    att: &Attachment,
    (mut term, mut int): (tokio::signal::unix::Signal, tokio::signal::unix::Signal),
    hup: tokio::signal::unix::Signal,
    format: LogFormat,
    fleet: Option<&crate::fleet::agent::AgentConfig>,
    watch: attach::Watch,
) -> anyhow::Result<()> {
    let mut signalled = false;
    {
        let stop = async {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
                () = follow(att, hup, fleet, watch) => {},
            }
        };
        let stop = async {
            stop.await;
            signalled = true;
        };
        telemetry::stream(
            att,
            format,
            Reader::Attach,
            Duration::from_secs(5),
            &crate::observe::flows::Filter::default(),
            stop,
        )
        .await?;
    }
    crate::host::service::stopping();
    if !signalled {
        return Ok(()); // detached by another command
    }
    info!(
        "leaving; segbpf stays attached to {} and keeps enforcing. Remove it with: segbpf{} detach {}",
        att.describe(),
        att.netns.cli_option(),
        att.iface
    );
    Ok(())
}

/// Follows the policy file, or the fleet's store with `--etcd`, and
/// re-attaches a link detached behind segbpf's back. Never returns.
async fn follow(
    att: &Attachment,
    hup: tokio::signal::unix::Signal,
    fleet: Option<&crate::fleet::agent::AgentConfig>,
    watch: attach::Watch,
) {
    let policy = async {
        match fleet {
            // Boxed: the etcd client's futures are large.
            Some(cfg) => Box::pin(crate::fleet::agent::run(att, cfg, hup)).await,
            None => attach::watch_policy(att, hup, watch).await,
        }
    };
    tokio::select! {
        () = policy => {},
        () = attach::watch_links(att) => {},
    }
}
