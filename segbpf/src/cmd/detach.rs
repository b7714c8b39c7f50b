//! `segbpf detach`: remove segbpf from an interface: the pinned links
//! (which detaches the programs), programs, map pins, state and history
//! ([`crate::attachment::attach::detach`]); the observed store stays until it expires
//! ([`crate::attachment::observed`]).

use anyhow::bail;
use serde::Serialize;

use crate::{
    attachment::attach,
    attachment::pins::Attachment,
    cmd::{Output, Target, print_json, print_line},
    host::netns::Netns,
};

/// Arguments of `segbpf detach`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface to remove segbpf from.
    pub iface: String,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// The result of `detach` in JSON.
#[derive(Serialize)]
struct DetachOut {
    #[serde(flatten)]
    target: Target,
    /// Always true: files that could not be removed are an error.
    detached: bool,
    /// Whether programs were attached (false: only stale files were removed).
    was_attached: bool,
}

/// Runs `segbpf detach`.
pub fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    crate::attachment::pins::Roots::from_env().check_visible()?;
    let att = Attachment::new(&args.iface, ns);
    if !att.dir.exists() && !att.state.exists() {
        bail!(
            "segbpf is not attached to {} (no {})",
            att.describe(),
            att.dir.display()
        );
    }
    let was_attached = attach::detach(&att)?;
    match args.output {
        Output::Json => print_json(&DetachOut {
            target: Target::of(&att),
            detached: true,
            was_attached,
        })?,
        Output::Text if was_attached => {
            print_line(format_args!("detached segbpf from {}", att.describe()))?;
        }
        Output::Text => {
            print_line(format_args!(
                "removed stale segbpf files of {}",
                att.describe()
            ))?;
        }
    }
    Ok(())
}
