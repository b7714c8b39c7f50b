//! `segbpf monitor`: streams the drop (and audit) events of an interface
//! that is already enforcing, whether or not its `attach` process still
//! runs. While a monitor runs it is the ring's only reader (`attach`
//! yields to it), so it loses no event to a competing reader.

use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::{
    attachment::pins::Attachment,
    cmd::Output,
    host::netns::Netns,
    observe::telemetry::{self, LogFormat, Reader},
};

/// Arguments of `segbpf monitor`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface whose events to stream (or --services).
    #[arg(required_unless_present = "services")]
    pub iface: Option<String>,
    /// Stream the events of the services attachment (docs/services.md):
    /// packets of a service dropped (or, in audit mode, let through), each
    /// with its `service`.
    #[arg(long, conflicts_with = "iface")]
    pub services: bool,
    /// With --services: the cgroup root it is attached below (default: the
    /// cgroup v2 mount).
    #[arg(long, value_name = "DIR", requires = "services")]
    pub cgroup_root: Option<std::path::PathBuf>,
    /// Format of the event lines on stdout (`-o json` is the same as
    /// `--log-format json`: JSON Lines, one object per event or summary;
    /// default text). `--log-format text` with `-o json` is a usage error.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Output format: `json` streams JSON Lines (docs/json.md).
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Which events to show (`--rule` shows none: events are drops, which
    /// no rule made; `segbpf flows --rule` follows a rule's flows).
    #[command(flatten)]
    pub filter: crate::cmd::flows::FilterArgs,
    /// Seconds between summary lines of suppressed/lost events (when non-zero).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub summary_secs: u64,
}

impl Args {
    /// Whether the events are printed as JSON Lines.
    pub fn json_output(&self) -> bool {
        self.output == Output::Json || self.log_format == Some(LogFormat::Json)
    }
}

/// Runs `segbpf monitor`.
pub async fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    if args.output == Output::Json && args.log_format == Some(LogFormat::Text) {
        return Err(crate::cmd::UsageError(
            "-o json and --log-format text contradict each other: give one (-o json is --log-format json)".into(),
        )
        .into());
    }
    if !args.filter.rules.is_empty() {
        return Err(crate::cmd::UsageError(
            "--rule: monitor streams drop events, which no rule made; `segbpf flows IFACE --follow --rule RULE` follows the flows a rule let through".into(),
        )
        .into());
    }
    if args.filter.verdict == Some(crate::observe::flows::FilterVerdict::Allow) {
        return Err(crate::cmd::UsageError(
            "--verdict allow: monitor streams drop events only; `segbpf flows IFACE --follow --verdict allow` follows allowed flows".into(),
        )
        .into());
    }
    let Some(iface) = args.iface.clone() else {
        return services(&args).await;
    };
    let att = Attachment::new(&iface, ns);
    if !att.is_attached() {
        bail!("segbpf is not attached to {}", att.describe());
    }
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let stop = async {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    };
    tracing::info!("streaming events of {iface}");
    telemetry::stream(
        &att,
        if args.json_output() {
            LogFormat::Json
        } else {
            LogFormat::Text
        },
        Reader::Monitor,
        Duration::from_secs(args.summary_secs),
        &args.filter.filter(),
        stop,
    )
    .await?;
    Ok(())
}

/// `segbpf monitor --services`: the events of the services attachment, in
/// the format of `attach --services` (text) or as records of
/// docs/json.md (`-o json`), until SIGINT/SIGTERM or the detach.
async fn services(args: &Args) -> anyhow::Result<()> {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    use tokio::signal::unix::{SignalKind, signal};
    let f = &args.filter;
    if !f.ports.is_empty() || !f.peers.is_empty() || !f.rules.is_empty() || f.verdict.is_some() {
        return Err(crate::cmd::UsageError(
            "--port, --peer, --rule and --verdict do not apply to monitor --services".into(),
        )
        .into());
    }
    let root = crate::attachment::services_level::open_root(args.cgroup_root.as_deref())?;
    let paths = crate::attachment::services::SvcPaths::new(
        &crate::attachment::pins::Roots::from_env(),
        root,
    );
    if !paths.is_attached() {
        return Err(paths.not_attached().into());
    }
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let json = args.json_output();
    tracing::info!(
        "streaming events of the services below {}",
        paths.root.dir.display()
    );
    let worker = tokio::task::spawn_blocking(move || {
        crate::observe::services::stream_events(&paths, &s2, |r| {
            let line = if json {
                crate::cmd::json_line(&crate::observe::services::SvcEventRecord::of(&r))
                    .unwrap_or_default()
            } else {
                crate::cmd::services::event_text(&r)
            };
            // A closed stdout ends nothing: the next SIGINT does.
            let _ = crate::cmd::print_line(line);
        })
    });
    tokio::pin!(worker);
    loop {
        tokio::select! {
            _ = term.recv() => stop.store(true, Ordering::Relaxed),
            _ = int.recv() => stop.store(true, Ordering::Relaxed),
            r = &mut worker => {
                r.context("the event reader")??;
                return Ok(());
            }
        }
    }
}
