//! `segbpf rollback`: restore the policy in force before the current one,
//! or generation `--to N`, from the attachment's history
//! ([`crate::timeline::rollback`]). A second rollback goes further back.

use serde::Serialize;

use crate::{
    cmd::{NetnsOut, Output, print_json, print_line},
    netns::Netns,
    pins::Attachment,
    swap::RolledBack,
    timeline,
};

/// Arguments of `segbpf rollback`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Each rollback is a new generation that stands for the one it restored: a second `rollback` goes one step further back, it does not undo the first. `segbpf history IFACE` lists the generations kept.\n\nExamples:\n  segbpf rollback eth0\n  segbpf rollback eth0 --to 3"
)]
pub struct Args {
    /// Interface whose previous policy to restore.
    pub iface: String,
    /// Restore this generation (see `segbpf history IFACE`) rather than the
    /// one before the policy in force.
    #[arg(long, value_name = "GENERATION")]
    pub to: Option<u64>,
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
    let rolled = timeline::rollback(&att, args.to)?;
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
