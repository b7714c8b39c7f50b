//! `segbpf confirm`: keep a change applied with `--confirm`, cancelling its
//! automatic rollback ([`crate::attachment::guard`]).

use serde::Serialize;

use crate::{
    attachment::guard,
    attachment::pins::Attachment,
    cmd::{Output, Target, print_json, print_line},
    host::netns::Netns,
};

/// Arguments of `segbpf confirm`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface whose pending change to keep (or --services).
    #[arg(required_unless_present = "services")]
    pub iface: Option<String>,
    /// Keep the services attachment applied with `attach --services
    /// --confirm` (docs/services.md).
    #[arg(long, conflicts_with = "iface")]
    pub services: bool,
    /// With --services: the cgroup root it was attached below (default:
    /// the cgroup v2 mount).
    #[arg(long, value_name = "DIR", requires = "services")]
    pub cgroup_root: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// The result of `confirm` in JSON.
#[derive(Serialize)]
struct ConfirmOut {
    #[serde(flatten)]
    target: Target,
    /// The generation kept.
    generation: u64,
    /// Always true: nothing to confirm is an error.
    confirmed: bool,
}

/// Runs `segbpf confirm`.
pub fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    let Some(iface) = args.iface.as_deref() else {
        return crate::cmd::services::confirm(args.cgroup_root, args.output);
    };
    let att = Attachment::new(iface, ns);
    let generation = guard::confirm(&att)?;
    match args.output {
        Output::Json => print_json(&ConfirmOut {
            target: Target::of(&att),
            generation,
            confirmed: true,
        })?,
        Output::Text => print_line(format_args!(
            "confirmed generation {generation} on {}",
            att.describe()
        ))?,
    }
    Ok(())
}
