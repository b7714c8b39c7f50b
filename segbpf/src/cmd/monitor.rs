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
    /// Interface whose events to stream.
    pub iface: String,
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
    let att = Attachment::new(&args.iface, ns);
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
    tracing::info!("streaming events of {}", args.iface);
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
