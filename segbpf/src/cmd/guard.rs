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
    /// Interface (or --services).
    #[arg(required_unless_present = "services")]
    pub iface: Option<String>,
    /// The guard of the services attachment below --cgroup-root.
    #[arg(long, conflicts_with = "iface", requires = "cgroup_root")]
    pub services: bool,
    /// With --services: the cgroup root.
    #[arg(long, value_name = "DIR", requires = "services")]
    pub cgroup_root: Option<std::path::PathBuf>,
    /// Generation that must be confirmed.
    #[arg(long)]
    pub generation: u64,
}

/// Runs the guard until the change is confirmed, superseded or undone.
pub fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    let Some(iface) = args.iface.as_deref() else {
        return crate::cmd::services::guard(args.cgroup_root, args.generation);
    };
    let att = Attachment::new(iface, ns);
    guard::run_guard(&att, args.generation, &attach::GuardUndo)?;
    Ok(())
}
