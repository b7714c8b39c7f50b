//! The `segbpf` command. See `segbpf --help` and README.md.
#![allow(
    unused_crate_dependencies,
    reason = "the library uses the dependencies; the binary only calls it"
)]

use std::process::ExitCode;

use clap::Parser as _;
use segbpf::{
    cmd::{self, Cli, UsageError},
    logging, netns,
};

fn main() -> ExitCode {
    // Everything segbpf writes (state, history, locks, pins) is private:
    // files 0600, directories 0700 (see `segbpf::pins::private_dir`).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = Cli::parse(); // exits 2 on usage errors
    logging::init(cli.verbose);
    // setns() changes only the calling thread: enter the namespace before
    // the runtime starts any thread.
    if let Some(ns) = &cli.netns
        && let Err(e) = netns::enter(ns)
    {
        eprintln!("error: {e:#}");
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
        Err(e) if e.downcast_ref::<UsageError>().is_some() => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
