//! `segbpf rollback`: restore the policy in force before the current one,
//! from the attachment's history ([`crate::swap::rollback`]).

use crate::{netns::Netns, pins::Attachment, swap};

/// Arguments of `segbpf rollback`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface whose previous policy to restore.
    pub iface: String,
}

/// Runs `segbpf rollback`.
pub fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    let att = Attachment::new(&args.iface, ns);
    println!("{}", swap::rollback(&att)?);
    Ok(())
}
