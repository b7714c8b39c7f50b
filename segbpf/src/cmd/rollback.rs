//! `segbpf rollback`: restore the policy in force before the current one,
//! or generation `--to N`, from the attachment's history
//! ([`crate::attachment::timeline::rollback`]). A second rollback goes further back.
//! Like `reload`, one that would cut the SSH session the command runs in
//! is refused unless `--confirm SECS` guards it or `--force`.

use serde::Serialize;

use crate::{
    attachment::pins::Attachment,
    attachment::swap::{Guarded, RolledBack},
    attachment::timeline,
    cmd::{NetnsOut, Output, print_json, print_line},
    host::netns::Netns,
};

/// Arguments of `segbpf rollback`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Each rollback is a new generation that stands for the one it restored, with the roles recorded with it (entries from versions that did not record roles keep the roles in force): a second `rollback` goes one step further back, it does not undo the first. `segbpf history IFACE` lists the generations kept. Like `reload`, a rollback that would cut the SSH session the command runs in (SSH_CONNECTION) is refused unless --confirm SECS guards it or --force.\n\nExamples:\n  segbpf rollback eth0\n  segbpf rollback eth0 --to 3"
)]
pub struct Args {
    /// Interface whose previous policy to restore.
    pub iface: String,
    /// Restore this generation (see `segbpf history IFACE`) rather than the
    /// one before the policy in force.
    #[arg(long, value_name = "GENERATION")]
    pub to: Option<u64>,
    /// Undo the rollback after SECS seconds unless `segbpf confirm IFACE`
    /// runs.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub confirm: Option<u64>,
    /// Apply even though an earlier change waits for `segbpf confirm`, or
    /// though the restored policy would cut the SSH session this command
    /// runs in (refused otherwise, unless --confirm guards it).
    #[arg(long)]
    pub force: bool,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// The result of `rollback` in JSON.
#[derive(Serialize)]
struct RollbackOut<'a> {
    #[serde(flatten)]
    rolled: &'a RolledBack,
    #[serde(flatten)]
    netns: NetnsOut,
    /// Always true: a rollback that was not applied is an error.
    applied: bool,
}

/// Runs `segbpf rollback`.
pub fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    let att = Attachment::new(&args.iface, ns);
    let rolled = timeline::rollback(
        &att,
        args.to,
        Guarded {
            confirm: args.confirm,
            force: args.force,
        },
    )?;
    match args.output {
        Output::Json => print_json(&RollbackOut {
            rolled: &rolled,
            netns: NetnsOut::of(&att),
            applied: true,
        })?,
        Output::Text => print_line(&rolled)?,
    }
    Ok(())
}
