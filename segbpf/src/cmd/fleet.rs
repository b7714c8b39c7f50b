//! `segbpf fleet push|status`: the operator's side of fleet mode
//! ([`crate::fleet`]); agents are `segbpf attach IFACE --etcd ...`.

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
    /// `https://...`).
    #[arg(long, value_name = "ENDPOINTS", value_delimiter = ',')]
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
            return Err(UsageError("--etcd ENDPOINTS is required".into()).into());
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
}

/// Arguments of `segbpf fleet push`.
#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// Policy file (roles.toml).
    pub policy: PathBuf,
    /// The store.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Store nothing: show which hosts' roles would change.
    #[arg(long)]
    pub dry_run: bool,
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
        match &self.command {
            FleetCommand::Push(a) => a.output == Output::Json,
            FleetCommand::Status(a) => a.output == Output::Json,
        }
    }
}

/// Runs `segbpf fleet`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        FleetCommand::Push(a) => push(a).await,
        FleetCommand::Status(a) => status(a).await,
    }
}

async fn push(args: PushArgs) -> anyhow::Result<()> {
    let store = args.etcd.store()?;
    // Everything is checked before etcd is asked anything.
    let checked = fleet::check(&args.policy)?;
    for w in &checked.warnings {
        eprintln!("{}", WarningOut::lint(&checked.policy.source, w).line());
    }
    if args.dry_run {
        let changes = fleet::dry_run(&store, &checked.policy).await?;
        return print_plan(&changes, args.output);
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
    match args.output {
        Output::Json => print_json(&pushed),
        Output::Text => Ok(print_line(format_args!("revision {}", pushed.revision))?),
    }
}

fn print_plan(changes: &[fleet::RoleChange], output: Output) -> anyhow::Result<()> {
    #[derive(Serialize)]
    struct Plan<'a> {
        changes: Vec<&'a fleet::RoleChange>,
        unchanged: usize,
    }
    let changed: Vec<&fleet::RoleChange> = changes
        .iter()
        .filter(|c| c.error.is_some() || c.from != c.to)
        .collect();
    let unchanged = changes.len() - changed.len();
    match output {
        Output::Json => print_json(&Plan {
            changes: changed,
            unchanged,
        }),
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
            Ok(())
        }
    }
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
