//! `segbpf attach`: enforce a policy on an interface ([`crate::attach`]),
//! then stay in the foreground: stream drop events to stdout, serve
//! metrics, reload on SIGHUP or when the policy file changes, until
//! SIGINT/SIGTERM. Enforcement stays in place after the process exits;
//! `segbpf detach` removes it.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use tracing::info;

use crate::{
    attach::{self, Mode, Request},
    cmd::{MapSizes, UsageError},
    netns::Netns,
    pins::Attachment,
    telemetry::{self, LogFormat, Reader},
};

/// Arguments of `segbpf attach`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface to protect.
    pub iface: String,
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
    pub sizes: MapSizes,
    /// Apply and exit at once (enforcement stays in place) instead of staying in the foreground.
    #[arg(long)]
    pub no_wait: bool,
    /// Accept a policy file that is writable by users other than root, or
    /// owned by one (refused by default, as sshd's StrictModes does); holds
    /// for this attachment's later reloads too.
    #[arg(long)]
    pub insecure_policy: bool,
    /// Flow accounting in the connection table (`segbpf flows`): `on`
    /// (default) or `off`, which removes its per-packet cost. Kept by
    /// reloads; an adopting attach applies it.
    #[arg(long, value_enum, default_value_t = FlowLog::On)]
    pub flow_log: FlowLog,
}

/// `--flow-log`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FlowLog {
    /// Count packets, bytes and TCP flags per flow.
    #[default]
    On,
    /// No flow accounting.
    Off,
}

impl Args {
    /// The library's request for these arguments.
    fn request(&self, policy: PathBuf) -> Request {
        Request {
            iface: self.iface.clone(),
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
            flow_acct: self.flow_log == FlowLog::On,
        }
    }
}

/// Runs `segbpf attach`.
pub async fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Handlers first, so a signal that arrives while applying is not fatal.
    let mut signals = (
        signal(SignalKind::terminate()).context("SIGTERM handler")?,
        signal(SignalKind::interrupt()).context("SIGINT handler")?,
    );
    let hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let metrics = match args.metrics {
        Some(addr) if !args.no_wait => Some(crate::metrics::Server::bind(addr)?),
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
            let att = Attachment::new(&args.iface, ns);
            tokio::select! {
                r = Box::pin(crate::fleet::agent::initial_policy(&att, cfg)) => r?.0,
                _ = signals.0.recv() => return Ok(()),
                _ = signals.1.recv() => return Ok(()),
            }
        }
        (None, Some(p)) => p.clone(),
        (None, None) => return Err(UsageError("--policy FILE or --etcd ENDPOINTS".into()).into()),
    };
    let applied = attach::apply(&args.request(policy), ns)?;
    if args.no_wait {
        // Nothing streams: the summary is the result.
        crate::cmd::print_line(&applied.summary)?;
        return Ok(());
    }
    // stdout carries the event stream; the summary is a log line.
    info!("{}", applied.summary);
    crate::service::ready(&applied.summary);
    let att = applied.att;
    if let Some(server) = metrics {
        server.start(att.clone())?;
    }
    info!(
        "enforcing on {}; drop events follow on stdout; Ctrl-C leaves the foreground (enforcement stays until `segbpf{} detach {}`)",
        att.describe(),
        ns.cli_option(),
        args.iface
    );
    wait_for_exit(&att, signals, hup, args.log_format, fleet.as_ref()).await?;
    Ok(())
}

/// Streams events until SIGINT/SIGTERM, or until the attachment is
/// removed by `segbpf detach`, then says how enforcement can be removed.
async fn wait_for_exit(
    att: &Attachment,
    (mut term, mut int): (tokio::signal::unix::Signal, tokio::signal::unix::Signal),
    hup: tokio::signal::unix::Signal,
    format: LogFormat,
    fleet: Option<&crate::fleet::agent::AgentConfig>,
) -> anyhow::Result<()> {
    let mut signalled = false;
    {
        let stop = async {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
                () = follow(att, hup, fleet) => {},
            }
        };
        let stop = async {
            stop.await;
            signalled = true;
        };
        telemetry::stream(att, format, Reader::Attach, Duration::from_secs(5), stop).await?;
    }
    crate::service::stopping();
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

/// Follows the policy file, or the fleet's store with `--etcd`. Never returns.
async fn follow(
    att: &Attachment,
    hup: tokio::signal::unix::Signal,
    fleet: Option<&crate::fleet::agent::AgentConfig>,
) {
    match fleet {
        // Boxed: the etcd client's futures are large.
        Some(cfg) => Box::pin(crate::fleet::agent::run(att, cfg, hup)).await,
        None => attach::watch_policy(att, hup).await,
    }
}
