//! Logs on stderr, through `tracing`: `info` by default, `-v` debug, `-vv`
//! trace, `RUST_LOG` overrides. Colour only when stderr is a terminal, so
//! a file or a pipe gets plain lines.
//!
//! Under systemd (`JOURNAL_STREAM` names the file stderr is), logs go to
//! the journal natively, with structured fields prefixed `SEGBPF_`
//! (`SEGBPF_IFACE`, `SEGBPF_REASON`, ...), and `attach`'s drop events
//! become journal entries of their own ([`to_journal`]) instead of lines on
//! stdout.

use std::{io::IsTerminal as _, os::fd::AsFd, sync::OnceLock};

use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _};

static JOURNAL: OnceLock<bool> = OnceLock::new();

/// Whether `fd` is the stream systemd connected to the journal
/// (`JOURNAL_STREAM=DEVICE:INODE`, as sd_journal_stream_fd(3) describes).
pub fn is_journal_stream(fd: impl AsFd) -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(fd.as_fd()) else {
        return false;
    };
    dev.parse::<u64>().is_ok_and(|d| d == st.st_dev)
        && ino.parse::<u64>().is_ok_and(|i| i == st.st_ino)
}

/// Whether logs and events go to the journal natively (set by [`init`]).
pub fn to_journal() -> bool {
    JOURNAL.get().copied().unwrap_or(false)
}

/// Installs the logger for a command run with `verbose` `-v` flags.
pub fn init(verbose: u8) {
    let level = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    if is_journal_stream(std::io::stderr())
        && let Ok(layer) = tracing_journald::layer()
    {
        let layer = layer.with_field_prefix(Some("SEGBPF".into()));
        if tracing_subscriber::registry()
            .with(filter())
            .with(layer)
            .try_init()
            .is_ok()
        {
            let _ = JOURNAL.set(true);
            return;
        }
    }
    let _ = JOURNAL.set(false);
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_stream_is_recognised_by_device_and_inode_only() {
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        let st = nix::sys::stat::fstat(f.as_fd()).unwrap();
        // The environment is process-wide: one test sets and clears it.
        // SAFETY: no other test reads JOURNAL_STREAM.
        unsafe { std::env::set_var("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino)) };
        assert!(is_journal_stream(&f));
        unsafe { std::env::set_var("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino + 1)) };
        assert!(!is_journal_stream(&f));
        unsafe { std::env::set_var("JOURNAL_STREAM", "garbage") };
        assert!(!is_journal_stream(&f));
        unsafe { std::env::remove_var("JOURNAL_STREAM") };
        assert!(!is_journal_stream(&f));
    }
}
