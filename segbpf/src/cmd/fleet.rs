//! `segbpf fleet push|status|history|diff|rollback`: the operator's side
//! of fleet mode ([`crate::fleet`]); agents are `segbpf attach IFACE
//! --etcd ...`.

use std::{path::PathBuf, time::Duration};

use serde::Serialize;

use crate::{
    cmd::{Output, UsageError, check::WarningOut, print_json, print_line},
    fleet::{self, FleetError, Store, TlsFiles, agent::AgentConfig},
};

/// Where the fleet's keys are (shared by `fleet` and `attach --etcd`).
#[derive(Clone, Debug, clap::Args)]
pub struct EtcdArgs {
    /// etcd client endpoints, comma-separated (`host:port`, `http://...`,
    /// `https://...`); default: $SEGBPF_ETCD.
    #[arg(
        long,
        value_name = "ENDPOINTS",
        value_delimiter = ',',
        env = "SEGBPF_ETCD"
    )]
    pub etcd: Vec<String>,
    /// Key prefix of this fleet in etcd.
    #[arg(long, value_name = "PREFIX", default_value = "/segbpf")]
    pub prefix: String,
    /// CA certificate (PEM) that signed the etcd servers' certificates
    /// (turns TLS on).
    #[arg(long, value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-certificate authentication.
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// Key (PEM) of the client certificate.
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdArgs {
    /// Whether `--etcd` was given.
    pub fn given(&self) -> bool {
        !self.etcd.is_empty()
    }

    /// The store these arguments name.
    pub fn store(&self) -> anyhow::Result<Store> {
        if self.etcd.is_empty() {
            return Err(UsageError("--etcd ENDPOINTS (or SEGBPF_ETCD) is required".into()).into());
        }
        Store::new(
            self.etcd.clone(),
            &self.prefix,
            TlsFiles {
                ca: self.etcd_ca.clone(),
                cert: self.etcd_cert.clone(),
                key: self.etcd_key.clone(),
            },
        )
        .map_err(|e| match e {
            FleetError::Usage(m) => UsageError(m).into(),
            e => e.into(),
        })
    }
}

/// The agent's options of `attach --etcd`.
#[derive(Clone, Debug, clap::Args)]
pub struct AgentArgs {
    /// The store.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// This host's name in the fleet's status keys (default: the system's
    /// host name). While another live agent holds that name, this one
    /// reports as NAME~MACHINEID-NETNS and warns.
    #[arg(long, value_name = "NAME", requires = "etcd")]
    pub fleet_host: Option<String>,
    /// Longest wait between attempts to reach etcd (the wait doubles from
    /// 0.5 s after each failure; each is between half and all of it).
    #[arg(long, value_name = "SECS", default_value_t = 30, requires = "etcd",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub etcd_retry_max: u64,
    /// TTL of the lease of this agent's status key: the key goes away this
    /// long after the agent dies.
    #[arg(long, value_name = "SECS", default_value_t = 10, requires = "etcd",
          value_parser = clap::value_parser!(i64).range(3..=3600))]
    pub etcd_lease_ttl: i64,
}

impl AgentArgs {
    /// The agent's configuration, if `--etcd` was given.
    pub fn config(&self) -> anyhow::Result<Option<AgentConfig>> {
        if !self.etcd.given() {
            return Ok(None);
        }
        Ok(Some(AgentConfig {
            store: self.etcd.store()?,
            host: self
                .fleet_host
                .clone()
                .unwrap_or_else(fleet::agent::system_hostname),
            lease_ttl: self.etcd_lease_ttl,
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(self.etcd_retry_max),
        }))
    }
}

/// Arguments of `segbpf fleet`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub command: FleetCommand,
}

/// `segbpf fleet` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum FleetCommand {
    /// Validate a policy and store it as the fleet's next revision.
    Push(PushArgs),
    /// One row per agent: the revision it enforces, its roles, its last error.
    Status(StatusArgs),
    /// List the stored revisions, the one in force marked.
    History(StatusArgs),
    /// Show what changed between two stored revisions (default: the one
    /// before the current and the current).
    Diff(DiffArgs),
    /// Push a stored revision again as the next revision (default: the one
    /// before the current), with push's checks and options.
    Rollback(RollbackArgs),
}

/// Arguments of `segbpf fleet diff`.
#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// The first revision (default: the one before the current).
    pub from: Option<u64>,
    /// The second revision (default: the current).
    pub to: Option<u64>,
    /// The store.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// Arguments of `segbpf fleet rollback`.
#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    /// The revision to push again (default: the one before the current).
    #[arg(long, value_name = "N")]
    pub to: Option<u64>,
    /// push's options.
    #[command(flatten)]
    pub push: PushOptions,
}

/// Arguments of `segbpf fleet push`.
#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// Policy file (roles.toml).
    pub policy: PathBuf,
    /// The options shared with `fleet rollback`.
    #[command(flatten)]
    pub opts: PushOptions,
}

/// The options of `fleet push` and `fleet rollback`.
#[derive(Debug, clap::Args)]
pub struct PushOptions {
    /// The store.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Store nothing: show which hosts' roles would change (exit 1 when
    /// an agent could not apply it).
    #[arg(long)]
    pub dry_run: bool,
    /// Push even though reporting agents could not apply the policy (they
    /// keep the policy in force and report the error).
    #[arg(long)]
    pub force: bool,
    /// Agents apply the revision under the lockout guard: undone after SECS
    /// unless the agent reaches etcd again through the new policy.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub confirm: Option<u64>,
    /// Publish to N agents first (chosen by a stable hash of HOST/IFACE),
    /// and to the rest only when they all report the revision without error.
    #[arg(long, value_name = "N", requires = "wait",
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub canary: Option<u64>,
    /// How long to wait for the canaries.
    #[arg(long, value_name = "SECS", requires = "canary",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub wait: Option<u64>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// Arguments of `segbpf fleet status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The store.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

impl Args {
    /// Whether the result is JSON.
    pub fn json_output(&self) -> bool {
        Output::Json
            == match &self.command {
                FleetCommand::Push(a) => a.opts.output,
                FleetCommand::Rollback(a) => a.push.output,
                FleetCommand::Status(a) | FleetCommand::History(a) => a.output,
                FleetCommand::Diff(a) => a.output,
            }
    }
}

/// Runs `segbpf fleet`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        FleetCommand::Push(a) => {
            let checked = fleet::check(&a.policy)?;
            push(checked, a.opts).await
        }
        FleetCommand::Status(a) => status(a).await,
        FleetCommand::History(a) => history(a).await,
        FleetCommand::Diff(a) => diff(a).await,
        FleetCommand::Rollback(a) => rollback(a).await,
    }
}

/// The agents of `changes` that could not apply the policy, one a line.
fn cannot_apply(changes: &[fleet::RoleChange]) -> Vec<String> {
    changes
        .iter()
        .filter_map(|c| Some(format!("{}: {}", c.agent, c.error.as_ref()?)))
        .collect()
}

async fn push(checked: fleet::Checked, args: PushOptions) -> anyhow::Result<()> {
    let store = args.etcd.store()?;
    for w in &checked.warnings {
        eprintln!("{}", WarningOut::lint(&checked.policy.source, w).line());
    }
    if args.dry_run {
        let changes = fleet::dry_run(&store, &checked.policy).await?;
        return print_plan(&changes, args.output);
    }
    // A revision a reporting agent cannot apply (no role matches it, a
    // role it was given is gone) is refused unless --force.
    if !args.force {
        let changes = fleet::dry_run(&store, &checked.policy).await?;
        let failing = cannot_apply(&changes);
        if !failing.is_empty() {
            anyhow::bail!(
                "{}: refused: {} of {} agents could not apply it ({}); nothing was stored (`--dry-run` shows the plan; `--force` pushes it anyway, and those agents keep the policy in force and report the error)",
                checked.policy.source,
                failing.len(),
                changes.len(),
                failing.join("; ")
            );
        }
    }
    let req = fleet::PushRequest {
        source: checked.policy.source.clone(),
        text: checked.text,
        confirm: args.confirm,
        canary: args
            .canary
            .zip(args.wait)
            .map(|(n, w)| (n as usize, Duration::from_secs(w))),
    };
    let pushed = fleet::push(&store, &req, |msg| tracing::info!("{msg}")).await?;
    let mut v = serde_json::to_value(&pushed)?;
    v["source"] = checked.policy.source.clone().into();
    match args.output {
        Output::Json => print_json(&v),
        Output::Text => Ok(print_line(format_args!("revision {}", pushed.revision))?),
    }
}

fn print_plan(changes: &[fleet::RoleChange], output: Output) -> anyhow::Result<()> {
    #[derive(Serialize)]
    struct Plan<'a> {
        changes: Vec<&'a fleet::RoleChange>,
        unchanged: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        ok: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<crate::cmd::ErrorBody>,
    }
    let changed: Vec<&fleet::RoleChange> = changes
        .iter()
        .filter(|c| c.error.is_some() || c.from != c.to)
        .collect();
    let unchanged = changes.len() - changed.len();
    // Exit 1 when an agent could not apply it: what a real push refuses.
    let failing = cannot_apply(changes);
    let failed = (!failing.is_empty()).then(|| {
        anyhow::anyhow!(
            "dry run: {} of {} agents could not apply it; a push is refused unless --force",
            failing.len(),
            changes.len()
        )
    });
    match output {
        Output::Json => {
            let error = failed.as_ref().map(crate::cmd::ErrorBody::of);
            print_json(&Plan {
                changes: changed,
                unchanged,
                ok: failed.as_ref().map(|_| false),
                error,
            })?;
            match failed {
                Some(e) => Err(crate::cmd::JsonReported {
                    message: crate::cmd::error_text(&e),
                    usage: false,
                }
                .into()),
                None => Ok(()),
            }
        }
        Output::Text => {
            let none = |r: &[String]| {
                if r.is_empty() {
                    "-".to_string()
                } else {
                    r.join(",")
                }
            };
            for c in &changed {
                match &c.error {
                    Some(e) => print_line(format_args!("{}: cannot apply: {e}", c.agent))?,
                    None => print_line(format_args!(
                        "{}: roles {} -> {}",
                        c.agent,
                        none(&c.from),
                        none(&c.to)
                    ))?,
                }
            }
            print_line(format_args!(
                "dry run: {} of {} agents change roles or cannot apply; nothing stored",
                changed.len(),
                changes.len()
            ))?;
            failed.map_or(Ok(()), Err)
        }
    }
}

async fn history(args: StatusArgs) -> anyhow::Result<()> {
    let store = args.etcd.store()?;
    let revisions = fleet::revisions(&store).await?;
    if args.output == Output::Json {
        return print_json(&serde_json::json!({ "revisions": revisions }));
    }
    if revisions.is_empty() {
        print_line("no revision stored")?;
    }
    print_line(format_args!(
        "  {:>8}  {:<16}  {:>5}",
        "REVISION", "HASH", "LINES"
    ))?;
    for r in &revisions {
        print_line(format_args!(
            "{} {:>8}  {:<16}  {:>5}",
            if r.current { "*" } else { " " },
            r.revision,
            r.hash,
            r.lines
        ))?;
    }
    Ok(())
}

/// The revision before the current one among `revisions`.
fn before_current(revisions: &[fleet::Revision]) -> anyhow::Result<u64> {
    let current = revisions
        .iter()
        .find(|r| r.current)
        .map(|r| r.revision)
        .ok_or_else(|| anyhow::anyhow!("no revision is in force"))?;
    revisions
        .iter()
        .map(|r| r.revision)
        .filter(|&n| n < current)
        .max()
        .ok_or_else(|| anyhow::anyhow!("revision {current} is the first stored: nothing before it"))
}

fn find(revisions: &[fleet::Revision], n: u64) -> anyhow::Result<&fleet::Revision> {
    revisions.iter().find(|r| r.revision == n).ok_or_else(|| {
        anyhow::anyhow!(
            "revision {n} is not stored (stored: {})",
            revisions
                .iter()
                .map(|r| r.revision.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

async fn diff(args: DiffArgs) -> anyhow::Result<()> {
    let store = args.etcd.store()?;
    let revisions = fleet::revisions(&store).await?;
    let from = match args.from {
        Some(n) => n,
        None => before_current(&revisions)?,
    };
    let to = match args.to {
        Some(n) => n,
        None => revisions
            .iter()
            .find(|r| r.current)
            .map(|r| r.revision)
            .ok_or_else(|| anyhow::anyhow!("no revision is in force"))?,
    };
    let (a, b) = (find(&revisions, from)?, find(&revisions, to)?);
    let all = crate::attachment::timeline::diff_lines(&a.text, &b.text);
    let differ = all
        .iter()
        .any(|l| !matches!(l, crate::attachment::timeline::Line::Same(_)));
    if args.output == Output::Json {
        return print_json(&serde_json::json!({
            "from": a.revision,
            "to": b.revision,
            "differ": differ,
            "lines": all
                .iter()
                .filter(|l| !matches!(l, crate::attachment::timeline::Line::Same(_)))
                .collect::<Vec<_>>(),
        }));
    }
    print_line(format_args!("--- revision {}", a.revision))?;
    print_line(format_args!("+++ revision {}", b.revision))?;
    crate::cmd::diff::print_hunks(&all)?;
    Ok(())
}

async fn rollback(args: RollbackArgs) -> anyhow::Result<()> {
    let store = args.push.etcd.store()?;
    let revisions = fleet::revisions(&store).await?;
    let n = match args.to {
        Some(n) => n,
        None => before_current(&revisions)?,
    };
    let r = find(&revisions, n)?;
    let source = format!("revision {n}");
    // Checked as a pushed file is: the stored text is parsed, compiled and
    // linted again before anything is written.
    let checked = fleet::check_text(&r.text, &source)?;
    tracing::info!("pushing the source of {source} again");
    push(checked, args.push).await
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    #[derive(Serialize)]
    struct Row<'a> {
        #[serde(flatten)]
        agent: &'a fleet::AgentStatus,
        latest: bool,
    }
    #[derive(Serialize)]
    struct Out<'a> {
        current: Option<&'a fleet::Current>,
        agents: Vec<Row<'a>>,
        at_latest: usize,
        total: usize,
        name_collisions: Vec<fleet::NameCollision>,
    }
    let store = args.etcd.store()?;
    let st = fleet::status(&store).await?;
    let out = Out {
        current: st.current.as_ref(),
        agents: st
            .agents
            .iter()
            .map(|a| Row {
                agent: a,
                latest: st.is_latest(a),
            })
            .collect(),
        at_latest: st.at_latest(),
        total: st.agents.len(),
        name_collisions: st.name_collisions(),
    };
    if args.output == Output::Json {
        let mut v = serde_json::to_value(&out)?;
        crate::cmd::times_as_rfc3339(&mut v, &["pushed_at", "updated_at"]);
        return print_json(&v);
    }
    print_line(format_args!(
        "{:<20} {:<8} {:<20} {:>8} {:<6} ERROR",
        "HOST", "IFACE", "ROLES", "REVISION", "LATEST"
    ))?;
    for r in &out.agents {
        let a = r.agent;
        print_line(format_args!(
            "{:<20} {:<8} {:<20} {:>8} {:<6} {}",
            a.host,
            a.iface,
            a.roles.join(","),
            a.revision
                .map_or_else(|| "-".to_string(), |r| r.to_string()),
            if r.latest { "yes" } else { "no" },
            a.error.as_deref().unwrap_or("-")
        ))?;
    }
    let latest = st
        .current
        .as_ref()
        .map_or_else(|| "none pushed".to_string(), |c| c.revision.to_string());
    print_line(format_args!(
        "{} of {} at the latest revision ({latest})",
        out.at_latest, out.total
    ))?;
    for c in &out.name_collisions {
        print_line(format_args!(
            "NAME COLLISION: {} agents were given the host name {} for {}: {} (cloned images or namespaces sharing a host name: give each its own --fleet-host)",
            c.agents.len(),
            c.name,
            c.iface,
            c.agents.join(", ")
        ))?;
    }
    Ok(())
}
