//! `segbpf monitor`: streams the drop (and audit) events of an interface
//! that is already enforcing, whether or not its `attach` process still
//! runs. While a monitor runs it is the ring's only reader (`attach`
//! yields to it), so it loses no event to a competing reader.

use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::{
    attachment::pins::Attachment,
    host::netns::Netns,
    observe::telemetry::{self, LogFormat, Reader},
};

/// Arguments of `segbpf monitor`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface whose events to stream.
    pub iface: String,
    /// Format of the event lines on stdout.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Seconds between summary lines of suppressed/lost events (when non-zero).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub summary_secs: u64,
}

/// Runs `segbpf monitor`.
pub async fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
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
        args.log_format,
        Reader::Monitor,
        Duration::from_secs(args.summary_secs),
        stop,
    )
    .await?;
    Ok(())
}
