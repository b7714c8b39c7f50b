//! The `segbpf` command. See `segbpf --help` and README.md.
#![allow(
    unused_crate_dependencies,
    reason = "the library uses the dependencies; the binary only calls it"
)]

use std::process::ExitCode;

use clap::Parser as _;
use segbpf::{
    cmd::{self, Cli, UsageError},
    host::logging,
    host::netns,
};

fn main() -> ExitCode {
    // Everything segbpf writes (state, history, locks, pins) is private:
    // files 0600, directories 0700 (see `segbpf::attachment::dirs::private_dir`).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = Cli::parse(); // exits 2 on usage errors
    logging::init(cli.verbose);
    // setns() changes only the calling thread: enter the namespace before
    // the runtime starts any thread.
    if let Some(ns) = &cli.netns
        && let Err(e) = netns::enter(ns)
    {
        eprintln!("error: {}", cmd::error_text(&e.into()));
        return ExitCode::from(1);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(cmd::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of stdout went away (`segbpf status | head -1`): end
        // quietly with status 0, as the issue asks, rather than panicking
        // in println! or reporting an error. Rust ignores SIGPIPE, so a
        // write to a closed pipe fails with EPIPE; results are written with
        // `cmd::print_line`, which returns that error, and the event stream
        // returns it too. Restoring SIGPIPE's default action instead would
        // kill the process (status 141 under `set -o pipefail`). segbpf
        // writes to no other pipe (the guard's stdio is /dev/null), so a
        // broken pipe is stdout's.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<UsageError>().is_some() => {
            eprintln!("error: {}", cmd::error_text(&e));
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {}", cmd::error_text(&e));
            ExitCode::from(1)
        }
    }
}

/// Whether `e` comes from writing to a pipe whose reader has gone.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
