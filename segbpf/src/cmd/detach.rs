//! `segbpf detach`: remove the pinned links (which detaches the programs),
//! the programs, map pins and the state file of an interface.

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
    // A clsact (netlink) egress filter is not a pinned link: remove it by name.
    if let Ok(state) = crate::state::State::read(&att.state)
        && state.tc_mode == "clsact"
        && let Err(e) = aya::programs::tc::qdisc_detach_program(
            &args.iface,
            aya::programs::TcAttachType::Egress,
            segbpf_common::PROG_TC_EGRESS,
        )
    {
        tracing::warn!("removing the TC egress filter of {}: {e}", args.iface);
    }
    crate::history::remove(&att);
    let _ = std::fs::remove_file(att.state.with_extension("confirm.json"));
    att.remove()
        .with_context(|| format!("removing {}", att.dir.display()))?;
    if was_attached {
        println!("detached segbpf from {}", args.iface);
    } else {
        println!("removed stale segbpf pins of {}", args.iface);
    }
    Ok(())
}
