//! Logs on stderr, through `tracing`: `info` by default, `-v` debug, `-vv`
//! trace, `RUST_LOG` overrides. Colour only when stderr is a terminal, so
//! a file or the journal gets plain lines.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// Installs the stderr logger for a command run with `verbose` `-v` flags.
pub fn init(verbose: u8) {
    let level = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}
