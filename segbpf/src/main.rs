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

/// mimalloc instead of glibc's malloc: a reload at 10,000 rules makes
/// some 10^6 small allocations (the policy tree, the compiled maps, the
/// rule table) and glibc's malloc, free and page faults were about a fifth
/// of its CPU (BENCHMARKS.md, "Live updates").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Everything segbpf writes (state, history, locks, pins) is private:
    // files 0600, directories 0700 (see `segbpf::attachment::dirs::private_dir`).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let json = cmd::args_ask_json(&argv);
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        // A usage error of a command line that asks for JSON: the error
        // document on stdout too (docs/json.md), then clap's text and
        // status 2 as always. --help and --version are not errors.
        Err(e) => {
            if json && e.use_stderr() {
                // clap's whole message: the names of missing or unknown
                // arguments are on the lines after the first.
                let full = e.to_string();
                let full = full.trim();
                let text = full.strip_prefix("error: ").unwrap_or(full);
                let _ = cmd::print_line(cmd::error_json(text, true));
            }
            e.exit()
        }
    };
    let json = cli.command.json_output();
    logging::init(cli.verbose);
    // setns() changes only the calling thread: enter the namespace before
    // the runtime starts any thread.
    if let Some(ns) = &cli.netns
        && let Err(e) = netns::enter(ns)
    {
        let text = cmd::error_text(&e.into());
        if json {
            let _ = cmd::print_line(cmd::error_json(&text, false));
        }
        eprintln!("error: {text}");
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
        Err(e) => {
            // Under -o json the error is a JSON document on stdout as well
            // (docs/json.md), unless the command printed its own.
            let reported = e.downcast_ref::<cmd::JsonReported>();
            let usage =
                reported.map_or_else(|| e.downcast_ref::<UsageError>().is_some(), |r| r.usage);
            let text = cmd::error_text(&e);
            if json && reported.is_none() {
                let _ = cmd::print_line(cmd::error_json(&text, usage));
            }
            eprintln!("error: {text}");
            ExitCode::from(if usage { 2 } else { 1 })
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
