//! `segbpf detach`: remove segbpf from an interface: the pinned links
//! (which detaches the programs), programs, map pins, state and history
//! ([`crate::attach::detach`]).

use anyhow::bail;

use crate::{attach, netns::Netns, pins::Attachment};

/// Arguments of `segbpf detach`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface to remove segbpf from.
    pub iface: String,
}

/// Runs `segbpf detach`.
pub fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    crate::pins::Roots::from_env().check_visible()?;
    let att = Attachment::new(&args.iface, ns);
    if !att.dir.exists() && !att.state.exists() {
        bail!(
            "segbpf is not attached to {} (no {})",
            att.describe(),
            att.dir.display()
        );
    }
    if attach::detach(&att)? {
        println!("detached segbpf from {}", att.describe());
    } else {
        println!("removed stale segbpf files of {}", att.describe());
    }
    Ok(())
}
