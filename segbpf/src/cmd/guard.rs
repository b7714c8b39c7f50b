//! `segbpf guard` (hidden): the lockout guard process that `--confirm`
//! starts in its own session ([`crate::attachment::guard::run_guard`]).

use crate::{
    attachment::pins::Attachment,
    attachment::{attach, guard},
    host::netns::Netns,
};

/// Arguments of the hidden `segbpf guard`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface.
    pub iface: String,
    /// Generation that must be confirmed.
    #[arg(long)]
    pub generation: u64,
}

/// Runs the guard until the change is confirmed, superseded or undone.
pub fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    let att = Attachment::new(&args.iface, ns);
    guard::run_guard(&att, args.generation, &attach::GuardUndo)?;
    Ok(())
}
