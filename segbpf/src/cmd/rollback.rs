//! `segbpf rollback`: restore the policy in force before the current one,
//! from the attachment's history ([`crate::swap::rollback`]).

use serde::Serialize;

use crate::{
    cmd::{NetnsOut, Output, print_json, print_line},
    netns::Netns,
    pins::Attachment,
    swap::{self, RolledBack},
};

/// Arguments of `segbpf rollback`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface whose previous policy to restore.
    pub iface: String,
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
    let rolled = swap::rollback(&att)?;
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
