//! `segbpf rollback`: restore the policy in force before the current one,
//! or generation `--to N`, from the attachment's history
//! ([`crate::attachment::timeline::rollback`]). A second rollback goes further back.
//! Like `reload`, one that would cut the SSH session the command runs in
//! is refused unless `--confirm SECS` guards it or `--force`.

use serde::Serialize;

use crate::{
    attachment::pins::Attachment,
    attachment::swap::{Guarded, RolledBack},
    attachment::timeline,
    cmd::{NetnsOut, Output, print_json, print_line},
    host::netns::Netns,
};

/// Arguments of `segbpf rollback`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Each rollback is a new generation that stands for the one it restored, with the roles recorded with it (entries from versions that did not record roles keep the roles in force): a second `rollback` goes one step further back, it does not undo the first. `segbpf history IFACE` lists the generations kept. Like `reload`, a rollback that would cut the SSH session the command runs in (SSH_CONNECTION) is refused unless --confirm SECS guards it or --force.\n\nExamples:\n  segbpf rollback eth0\n  segbpf rollback eth0 --to 3"
)]
pub struct Args {
    /// Interface whose previous policy to restore (or --services).
    #[arg(required_unless_present = "services")]
    pub iface: Option<String>,
    /// Restore the services attachment's previous policy
    /// (docs/services.md).
    #[arg(long, conflicts_with_all = ["iface", "confirm", "force"])]
    pub services: bool,
    /// With --services: the cgroup root it is attached below (default: the
    /// cgroup v2 mount).
    #[arg(long, value_name = "DIR", requires = "services")]
    pub cgroup_root: Option<std::path::PathBuf>,
    /// Restore this generation (see `segbpf history IFACE`) rather than the
    /// one before the policy in force.
    #[arg(long, value_name = "GENERATION")]
    pub to: Option<u64>,
    /// Undo the rollback after SECS seconds unless `segbpf confirm IFACE`
    /// runs.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub confirm: Option<u64>,
    /// Apply even though an earlier change waits for `segbpf confirm`, or
    /// though the restored policy would cut the SSH session this command
    /// runs in (refused otherwise, unless --confirm guards it).
    #[arg(long)]
    pub force: bool,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// The result of `rollback` in JSON.
#[derive(Serialize)]
struct RollbackOut<'a> {
    #[serde(flatten)]
    rolled: &'a RolledBack,
    #[serde(flatten)]
    netns: NetnsOut,
    /// Always true: a rollback that was not applied is an error.
    applied: bool,
}

/// Runs `segbpf rollback`.
pub fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    let Some(iface) = args.iface.as_deref() else {
        return services(args.cgroup_root.as_deref(), args.to, args.output);
    };
    let att = Attachment::new(iface, ns);
    let rolled = timeline::rollback(
        &att,
        args.to,
        Guarded {
            confirm: args.confirm,
            force: args.force,
        },
    )?;
    match args.output {
        Output::Json => {
            // `policy` is the file as the operator knows it (as in reload
            // and status); the history's copy that was applied is
            // `history_file`.
            let mut v = serde_json::to_value(RollbackOut {
                rolled: &rolled,
                netns: NetnsOut::of(&att),
                applied: true,
            })?;
            v["history_file"] = v["policy"].take();
            v["policy"] = rolled.source.clone().into();
            print_json(&v)?;
        }
        Output::Text => print_line(&rolled)?,
    }
    Ok(())
}

/// `segbpf rollback --services`.
fn services(
    cgroup_root: Option<&std::path::Path>,
    to: Option<u64>,
    output: Output,
) -> anyhow::Result<()> {
    let root = crate::attachment::services_level::open_root(cgroup_root)?;
    let paths = crate::attachment::services::SvcPaths::new(
        &crate::attachment::pins::Roots::from_env(),
        root,
    );
    let r = crate::attachment::services_edit::rollback(&paths, to)?;
    match output {
        Output::Json => {
            let mut v = serde_json::to_value(&r)?;
            v["services"] = true.into();
            v["cgroup_root"] = serde_json::to_value(&paths.root.dir)?;
            v["source"] = v["policy"].clone();
            v["applied"] = true.into();
            print_json(&v)?;
        }
        Output::Text => print_line(format_args!(
            "services below {}: restored the policy of generation {} as generation {} ({})",
            paths.root.dir.display(),
            r.restored_generation,
            r.generation,
            r.policy.display()
        ))?,
    }
    Ok(())
}
