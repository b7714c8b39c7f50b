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
    let was_attached = remove(&att)?;
    if was_attached {
        println!("detached segbpf from {}", args.iface);
    } else {
        println!("removed stale segbpf pins of {}", args.iface);
    }
    Ok(())
}

/// Removes segbpf from `att`: the clsact egress filter when TCX was not
/// available (not a pinned link: removed by name), the history, a pending
/// confirmation, then every pin and the state. Returns whether it was
/// attached (not only stale pins). The guard undoes a first attach with it.
pub fn remove(att: &Attachment) -> anyhow::Result<bool> {
    let was_attached = att.is_attached();
    if let Ok(state) = crate::state::State::read(&att.state)
        && state.tc_mode == "clsact"
        && let Err(e) = aya::programs::tc::qdisc_detach_program(
            &att.iface,
            aya::programs::TcAttachType::Egress,
            segbpf_common::PROG_TC_EGRESS,
        )
    {
        tracing::warn!("removing the TC egress filter of {}: {e}", att.iface);
    }
    crate::history::remove(att);
    let _ = std::fs::remove_file(att.state.with_extension("confirm.json"));
    let _ = std::fs::remove_file(att.state.with_extension("confirm.restore.toml"));
    att.remove()
        .with_context(|| format!("removing {}", att.dir.display()))?;
    Ok(was_attached)
}
