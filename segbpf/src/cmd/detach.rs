//! `segbpf detach`: remove the pinned link (which detaches the program),
//! the program, map pins and the state file of an interface.

use anyhow::{Context as _, bail};

use crate::pins::Attachment;

/// Arguments of `segbpf detach`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface to remove segbpf from.
    pub iface: String,
}

/// Runs `segbpf detach`.
pub fn run(args: Args, netns: Option<&str>) -> anyhow::Result<()> {
    let att = Attachment::new(&args.iface, netns);
    if !att.dir.exists() {
        bail!(
            "segbpf is not attached to {} (no {})",
            args.iface,
            att.dir.display()
        );
    }
    let was_attached = att.is_attached();
    att.remove()
        .with_context(|| format!("removing {}", att.dir.display()))?;
    if was_attached {
        println!("detached segbpf from {}", args.iface);
    } else {
        println!("removed stale segbpf pins of {}", args.iface);
    }
    Ok(())
}
