//! `segbpf confirm`: keep a change applied with `--confirm`, cancelling its
//! automatic rollback ([`crate::guard`]).

use crate::{guard, netns::Netns, pins::Attachment};

/// Arguments of `segbpf confirm`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface whose pending change to keep.
    pub iface: String,
}

/// Runs `segbpf confirm`.
pub fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    let att = Attachment::new(&args.iface, ns);
    let generation = guard::confirm(&att)?;
    println!("confirmed generation {generation} on {}", att.describe());
    Ok(())
}
