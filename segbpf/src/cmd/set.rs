//! `segbpf set add|del|list`: edit a named address set of a live
//! attachment (like `nft add element` / `delete element`). Each edit is an
//! atomic policy swap (the same path as `segbpf reload`, which writes only
//! the map entries that change): it takes
//! effect for the next packet, the programs are not reloaded, and flows the
//! edited policy still allows keep their connection-table entries. Edits
//! are recorded in the attachment's state; `segbpf status` reports the
//! drift from the policy file and `segbpf reload` resolves it by the file.
//! Like `reload`, an edit that would cut the SSH session the command runs
//! in is refused unless `--confirm SECS` guards it or `--force`.

use anyhow::bail;
use serde::Serialize;

use crate::{
    attachment::pins::Attachment,
    attachment::state::State,
    attachment::swap::{self, Guarded, Swapped},
    cmd::{NetnsOut, Output, UsageError, print_json, print_line},
    host::netns::Netns,
    policy::{AddrRange, addr::parse_item},
};

/// Arguments of `segbpf set`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "An edit that would cut the SSH session the command runs in (SSH_CONNECTION; see `segbpf reload --help`) is refused, unless --confirm SECS guards it or --force.\n\nThe services attachment (docs/services.md) has no interface: `segbpf set add --services SET MEMBER...`, `segbpf set del --services SET MEMBER...`, `segbpf set list --services [SET]`."
)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub op: Op,
}

/// Set operations.
#[derive(Debug, clap::Subcommand)]
pub enum Op {
    /// Add addresses, CIDRs or ranges to a set.
    #[command(
        override_usage = "segbpf set add [OPTIONS] <IFACE> <SET> <ADDRS>...\n       segbpf set add --services [--cgroup-root DIR] [OPTIONS] <SET> <MEMBER>..."
    )]
    Add {
        /// Interface (with --services: none, the first word is the set).
        iface: String,
        /// Set name (as in roles.toml).
        set: String,
        /// Members to add.
        #[arg(required_unless_present = "services")]
        addrs: Vec<String>,
        /// Edit a set of the services attachment (docs/services.md): no
        /// IFACE, the words are SET MEMBER...
        #[arg(long, conflicts_with_all = ["confirm", "force"])]
        services: bool,
        /// With --services: the cgroup root it is attached below (default:
        /// the cgroup v2 mount).
        #[arg(long, value_name = "DIR", requires = "services")]
        cgroup_root: Option<std::path::PathBuf>,

        /// Undo the edit after SECS seconds unless `segbpf confirm IFACE`
        /// runs.
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
        confirm: Option<u64>,
        /// Apply even though an earlier change waits for `segbpf confirm`,
        /// or though the edit would cut the SSH session this command runs
        /// in (refused otherwise, unless --confirm guards it).
        #[arg(long)]
        force: bool,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Remove members (as listed by `set list`) from a set.
    #[command(
        override_usage = "segbpf set del [OPTIONS] <IFACE> <SET> <ADDRS>...\n       segbpf set del --services [--cgroup-root DIR] [OPTIONS] <SET> <MEMBER>..."
    )]
    Del {
        /// Interface (with --services: none, the first word is the set).
        iface: String,
        /// Set name.
        set: String,
        /// Members to remove.
        #[arg(required_unless_present = "services")]
        addrs: Vec<String>,
        /// Edit a set of the services attachment (docs/services.md): no
        /// IFACE, the words are SET MEMBER...
        #[arg(long, conflicts_with_all = ["confirm", "force"])]
        services: bool,
        /// With --services: the cgroup root it is attached below (default:
        /// the cgroup v2 mount).
        #[arg(long, value_name = "DIR", requires = "services")]
        cgroup_root: Option<std::path::PathBuf>,

        /// Undo the edit after SECS seconds unless `segbpf confirm IFACE`
        /// runs.
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
        confirm: Option<u64>,
        /// Apply even though an earlier change waits for `segbpf confirm`,
        /// or though the edit would cut the SSH session this command runs
        /// in (refused otherwise, unless --confirm guards it).
        #[arg(long)]
        force: bool,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// List the members in force of one set or of all sets.
    List {
        /// Interface (with --services: none, the word is the set).
        #[arg(required_unless_present = "services")]
        iface: Option<String>,
        /// Only this set.
        set: Option<String>,
        /// List the sets of the services attachment (docs/services.md).
        #[arg(long)]
        services: bool,
        /// With --services: the cgroup root it is attached below (default:
        /// the cgroup v2 mount).
        #[arg(long, value_name = "DIR", requires = "services")]
        cgroup_root: Option<std::path::PathBuf>,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Serialize)]
struct SetView {
    name: String,
    members: Vec<String>,
    edited: bool,
}

/// What `set list -o json` prints.
#[derive(Serialize)]
struct SetList {
    #[serde(flatten)]
    target: crate::cmd::Target,
    generation: u64,
    sets: Vec<SetView>,
}

impl Args {
    /// Whether the results are JSON.
    pub fn json_output(&self) -> bool {
        let (Op::Add { output, .. } | Op::Del { output, .. } | Op::List { output, .. }) = &self.op;
        *output == Output::Json
    }
}

/// Runs `segbpf set`.
pub fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    let is_add = matches!(args.op, Op::Add { .. });
    match args.op {
        Op::Add {
            iface,
            set,
            addrs,
            services: true,
            cgroup_root,
            output,
            ..
        }
        | Op::Del {
            iface,
            set,
            addrs,
            services: true,
            cgroup_root,
            output,
            ..
        } => {
            // `set add --services SET MEMBER...`: the words shift by one.
            let mut members = vec![set];
            members.extend(addrs);
            edit_services(cgroup_root, &iface, &members, is_add, output)
        }
        Op::Add {
            iface,
            set,
            addrs,
            confirm,
            force,
            output,
            ..
        } => edit(
            &iface,
            ns,
            &set,
            &addrs,
            true,
            Guarded { confirm, force },
            output,
        ),
        Op::Del {
            iface,
            set,
            addrs,
            confirm,
            force,
            output,
            ..
        } => edit(
            &iface,
            ns,
            &set,
            &addrs,
            false,
            Guarded { confirm, force },
            output,
        ),
        Op::List {
            iface,
            set,
            services: true,
            cgroup_root,
            output,
        } => {
            if set.is_some() {
                return Err(UsageError(
                    "set list --services takes at most one set name (no interface)".into(),
                )
                .into());
            }
            list_services(cgroup_root, iface.as_deref(), output)
        }
        Op::List {
            iface, set, output, ..
        } => list(&iface.unwrap_or_default(), ns, set.as_deref(), output),
    }
}

fn parse_members(addrs: &[String]) -> anyhow::Result<Vec<AddrRange>> {
    addrs
        .iter()
        .map(|a| {
            parse_item(a.trim())
                .map_err(|e| UsageError(format!("{a}: not an address, CIDR or range: {e}")).into())
        })
        .collect()
}

/// The result of `set add|del` in JSON.
#[derive(Serialize)]
struct Edited<'a> {
    /// `add` or `del`.
    op: &'static str,
    set: &'a str,
    /// Members added or removed (members already in, on add, are not counted).
    changed: usize,
    /// The swap that applied the edit.
    #[serde(flatten)]
    swap: &'a Swapped,
    #[serde(flatten)]
    netns: NetnsOut,
    /// Always true: an edit that was not applied is an error.
    applied: bool,
}

/// `set add` of members already in: nothing applied.
#[derive(Serialize)]
struct Unchanged<'a> {
    /// The attachment's interface (as the swap fields of an edit say it).
    iface: &'a str,
    op: &'static str,
    set: &'a str,
    changed: usize,
    #[serde(flatten)]
    netns: NetnsOut,
    /// False: no swap was made, the generation in force stays.
    applied: bool,
}

fn edit(
    iface: &str,
    ns: &Netns,
    set: &str,
    addrs: &[String],
    add: bool,
    guarded: Guarded,
    output: Output,
) -> anyhow::Result<()> {
    let att = Attachment::new(iface, ns);
    let members = parse_members(addrs)?;
    let (changed, swapped) = match swap::edit_set(&att, set, &members, add, guarded) {
        Err(swap::SwapError::Unchanged(m)) => {
            // Nothing to do is not a failure; no new generation was made.
            match output {
                Output::Json => print_json(&Unchanged {
                    iface,
                    op: if add { "add" } else { "del" },
                    set,
                    changed: 0,
                    netns: NetnsOut::of(&att),
                    applied: false,
                })?,
                Output::Text => print_line(&m)?,
            }
            return Ok(());
        }
        other => other?,
    };
    match output {
        Output::Json => print_json(&Edited {
            op: if add { "add" } else { "del" },
            set,
            changed,
            swap: &swapped,
            netns: NetnsOut::of(&att),
            applied: true,
        })?,
        Output::Text => print_line(format_args!(
            "{} {changed} member(s) {} set {set} on {}; {swapped}",
            if add { "added" } else { "removed" },
            if add { "to" } else { "from" },
            att.describe()
        ))?,
    }
    Ok(())
}

fn list(iface: &str, ns: &Netns, only: Option<&str>, output: Output) -> anyhow::Result<()> {
    let att = Attachment::new(iface, ns);
    if !att.is_attached() {
        bail!("segbpf is not attached to {}", att.describe());
    }
    let state = State::current(&att)?;
    let sets = swap::sets_in_force(&state)?;
    if let Some(name) = only
        && !sets.contains_key(name)
    {
        bail!("no set named `{name}`");
    }
    let views: Vec<SetView> = sets
        .into_iter()
        .filter(|(n, _)| only.is_none_or(|o| o == n))
        .map(|(name, members)| SetView {
            edited: state.set_overrides.contains_key(&name),
            name,
            members,
        })
        .collect();
    match output {
        // One object, as every command's JSON (docs/json.md), not a bare
        // array: the attachment, the generation the members are in force
        // in, and the sets.
        Output::Json => print_json(&SetList {
            target: crate::cmd::Target::of(&att),
            generation: state.generation,
            sets: views,
        })?,
        Output::Text => print_views(&views)?,
    }
    Ok(())
}

/// The services attachment below `cgroup_root` (default: the cgroup v2
/// mount).
fn svc_paths(
    cgroup_root: Option<&std::path::Path>,
) -> anyhow::Result<crate::attachment::services::SvcPaths> {
    let root = crate::attachment::services_level::open_root(cgroup_root)?;
    Ok(crate::attachment::services::SvcPaths::new(
        &crate::attachment::pins::Roots::from_env(),
        root,
    ))
}

/// `set add|del --services SET MEMBER...`.
fn edit_services(
    cgroup_root: Option<std::path::PathBuf>,
    set: &str,
    addrs: &[String],
    add: bool,
    output: Output,
) -> anyhow::Result<()> {
    use crate::attachment::services::ServicesError;
    let members = parse_members(addrs)?;
    let paths = svc_paths(cgroup_root.as_deref())?;
    let op = if add { "add" } else { "del" };
    let (changed, state) =
        match crate::attachment::services_edit::edit_set(&paths, set, &members, add) {
            Err(ServicesError::Unchanged(m)) => {
                match output {
                    Output::Json => print_json(&serde_json::json!({
                        "services": true,
                        "cgroup_root": paths.root.dir,
                        "op": op,
                        "set": set,
                        "changed": 0,
                        "applied": false,
                    }))?,
                    Output::Text => print_line(&m)?,
                }
                return Ok(());
            }
            other => other?,
        };
    match output {
        Output::Json => print_json(&serde_json::json!({
            "services": true,
            "cgroup_root": paths.root.dir,
            "policy": state.policy,
            "generation": state.generation,
            "rules": state.rules.len(),
            "op": op,
            "set": set,
            "changed": changed,
            "applied": true,
        }))?,
        Output::Text => print_line(format_args!(
            "{} {changed} member(s) {} set {set} of the services below {}; generation {} in force",
            if add { "added" } else { "removed" },
            if add { "to" } else { "from" },
            paths.root.dir.display(),
            state.generation
        ))?,
    }
    Ok(())
}

/// `set list --services [SET]`.
fn list_services(
    cgroup_root: Option<std::path::PathBuf>,
    only: Option<&str>,
    output: Output,
) -> anyhow::Result<()> {
    let paths = svc_paths(cgroup_root.as_deref())?;
    let Some(state) = paths.read_state().filter(|_| paths.is_attached()) else {
        return Err(paths.not_attached().into());
    };
    let sets = crate::attachment::services_edit::sets_in_force(&state)?;
    if let Some(name) = only
        && !sets.contains_key(name)
    {
        bail!("no set named `{name}`");
    }
    let views: Vec<SetView> = sets
        .into_iter()
        .filter(|(n, _)| only.is_none_or(|o| o == n))
        .map(|(name, members)| SetView {
            edited: state.set_overrides.contains_key(&name),
            name,
            members,
        })
        .collect();
    match output {
        Output::Json => print_json(&serde_json::json!({
            "services": true,
            "cgroup_root": paths.root.dir,
            "generation": state.generation,
            "sets": views,
        }))?,
        Output::Text => print_views(&views)?,
    }
    Ok(())
}

fn print_views(views: &[SetView]) -> std::io::Result<()> {
    for v in views {
        print_line(format_args!(
            "{}{}: {}",
            v.name,
            if v.edited { " (edited live)" } else { "" },
            if v.members.is_empty() {
                "(empty)".to_string()
            } else {
                v.members.join(", ")
            }
        ))?;
    }
    Ok(())
}
