//! Fleet mode: one policy kept in etcd v3, every host's agent enforces it
//! and reports back (docs/fleet.md).
//!
//! Keys under a prefix (default `/segbpf`):
//! * `PREFIX/policy/revisions/NNNNNNNNNN`: the source of each pushed
//!   revision (zero-padded, so the revision is in the key and keys sort);
//! * `PREFIX/policy/current`: which revision is in force ([`Current`]: the
//!   revision, its hash, the `--confirm` time, and during a canary rollout
//!   the canaries and the revision the others keep);
//! * `PREFIX/status/HOST/IFACE`: each agent's report ([`AgentStatus`]),
//!   bound to a lease that expires when the agent dies.
//!
//! [`push`] validates a policy as `segbpf check` does, then writes the
//! revision and the pointer in one transaction; [`status`] reads the
//! reports; [`agent`] is the side that runs in `segbpf attach --etcd`.
//!
//! The fleet layer may import `attachment`, `policy` and `host`; never
//! `observe` or `cmd`.

pub mod agent;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, SortOrder,
    SortTarget, TlsOptions, Txn, TxnOp,
};
use serde::{Deserialize, Serialize};

use crate::{
    policy::compile::{self, Capacity},
    policy::{Policy, PolicyError, lint::Warning, roles},
};

/// Errors of fleet mode. None of them changes a host's policy in force.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// etcd could not be reached, or refused a request.
    #[error("etcd ({endpoints}): {what}: {source}")]
    Etcd {
        /// The endpoints asked.
        endpoints: String,
        /// What was attempted.
        what: String,
        /// Why.
        source: etcd_client::Error,
    },
    /// etcd did not answer in time.
    #[error("etcd ({endpoints}): {what}: no answer within {secs} s")]
    Timeout {
        /// The endpoints asked.
        endpoints: String,
        /// What was attempted.
        what: String,
        /// The time allowed.
        secs: u64,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The policy does not parse or validate.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The policy does not compile for one of its roles.
    #[error(transparent)]
    Compile(#[from] compile::HostCompileError),
    /// A value in etcd is not what segbpf writes there.
    #[error("etcd key {key}: {reason}")]
    Malformed {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// Bad arguments (endpoints, prefix, TLS files).
    #[error("{0}")]
    Usage(String),
    /// Another push changed the pointer at the same time.
    #[error(
        "another push changed {key} while this one ran; nothing was written by this push (run it again)"
    )]
    Conflict {
        /// The pointer key.
        key: String,
    },
    /// A canary could not apply the revision: the rollout stopped.
    #[error(
        "canary {agent} could not apply revision {revision}: {error}; the rollout stopped and the fleet stays at {kept}"
    )]
    CanaryFailed {
        /// `HOST/IFACE`.
        agent: String,
        /// The revision pushed.
        revision: u64,
        /// The agent's report.
        error: String,
        /// What the fleet keeps.
        kept: String,
    },
    /// Canaries did not report the revision in time.
    #[error(
        "canaries {agents} did not report revision {revision} within {secs} s; the rollout stopped and the fleet stays at {kept}"
    )]
    CanaryTimeout {
        /// The canaries that did not report.
        agents: String,
        /// The revision pushed.
        revision: u64,
        /// `--wait`.
        secs: u64,
        /// What the fleet keeps.
        kept: String,
    },
    /// The swap of a revision failed (the policy in force is unchanged).
    #[error(transparent)]
    Swap(#[from] crate::attachment::swap::SwapError),
    /// A revision's stored source is not what the push recorded.
    #[error("revision {revision}: its source in {key} {reason}; not applied")]
    Tampered {
        /// The revision.
        revision: u64,
        /// Its key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A canary rollout was asked for with no agent reporting.
    #[error("--canary {0}: no agent reports under the prefix; push without --canary")]
    NoAgents(usize),
}

/// TLS material for etcd (PEM files).
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// CA bundle that signed the servers' certificates.
    pub ca: Option<PathBuf>,
    /// Client certificate.
    pub cert: Option<PathBuf>,
    /// Client key.
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// Whether any TLS file was given.
    pub fn any(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

/// Where the fleet's keys are: endpoints, prefix and TLS.
#[derive(Clone, Debug)]
pub struct Store {
    /// etcd client endpoints (`host:port`, `http://...`, `https://...`).
    pub endpoints: Vec<String>,
    /// Key prefix without a trailing `/` (e.g. `/segbpf`).
    pub prefix: String,
    /// TLS files (none: plain HTTP unless an endpoint says `https://`).
    pub tls: TlsFiles,
    /// Time allowed for connecting and for each request.
    pub timeout: Duration,
}

/// Which agent an entry is about: `HOST/IFACE`.
pub fn agent_id(host: &str, iface: &str) -> String {
    format!("{host}/{iface}")
}

impl Store {
    /// A store, checking the prefix (absolute, no trailing `/`).
    pub fn new(endpoints: Vec<String>, prefix: &str, tls: TlsFiles) -> Result<Self, FleetError> {
        if endpoints.is_empty() {
            return Err(FleetError::Usage("--etcd: no endpoint given".into()));
        }
        if !prefix.starts_with('/') {
            return Err(FleetError::Usage(format!(
                "--prefix {prefix}: must start with `/` (e.g. /segbpf)"
            )));
        }
        if tls.key.is_some() != tls.cert.is_some() {
            return Err(FleetError::Usage(
                "--etcd-cert and --etcd-key go together (client certificate and its key)".into(),
            ));
        }
        Ok(Store {
            endpoints,
            // `/` is the root: keys are `/policy/...`, `/status/...`.
            prefix: prefix.trim_end_matches('/').to_string(),
            tls,
            timeout: Duration::from_secs(5),
        })
    }

    fn describe(&self) -> String {
        self.endpoints.join(",")
    }

    /// The pointer to the revision in force.
    pub fn current_key(&self) -> String {
        format!("{}/policy/current", self.prefix)
    }

    /// The prefix of all revisions.
    pub fn revisions_prefix(&self) -> String {
        format!("{}/policy/revisions/", self.prefix)
    }

    /// The key of revision `n`.
    pub fn revision_key(&self, n: u64) -> String {
        format!("{}{n:010}", self.revisions_prefix())
    }

    /// The prefix of all agents' reports.
    pub fn status_prefix(&self) -> String {
        format!("{}/status/", self.prefix)
    }

    /// The key of one agent's report.
    pub fn status_key(&self, host: &str, iface: &str) -> String {
        format!("{}{host}/{iface}", self.status_prefix())
    }

    fn etcd(&self, what: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> FleetError {
        let endpoints = self.describe();
        let what = what.into();
        move |source| FleetError::Etcd {
            endpoints,
            what,
            source,
        }
    }

    /// Runs `fut` with the store's timeout.
    pub async fn timed<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, FleetError> {
        // Boxed: the client's futures are large (clippy::large_futures).
        match tokio::time::timeout(self.timeout, Box::pin(fut)).await {
            Ok(r) => r.map_err(self.etcd(what)),
            Err(_) => Err(FleetError::Timeout {
                endpoints: self.describe(),
                what: what.to_string(),
                secs: self.timeout.as_secs(),
            }),
        }
    }

    fn options(&self) -> Result<ConnectOptions, FleetError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            .with_timeout(self.timeout)
            .with_keep_alive(Duration::from_secs(5), self.timeout);
        if self.tls.any() {
            let read = |p: &Path| {
                std::fs::read(p).map_err(|source| FleetError::Io {
                    path: p.to_path_buf(),
                    source,
                })
            };
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.tls.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&self.tls.cert, &self.tls.key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            opts = opts.with_tls(tls);
        }
        Ok(opts)
    }

    /// Connects (endpoints without a scheme use TLS when TLS files are given).
    pub async fn connect(&self) -> Result<Client, FleetError> {
        let tls = self.tls.any();
        let endpoints: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| {
                if tls && e.starts_with("http://") {
                    e.replacen("http://", "https://", 1)
                } else {
                    e.clone()
                }
            })
            .collect();
        let opts = self.options()?;
        self.timed("connecting", Client::connect(endpoints, Some(opts)))
            .await
    }
}

/// FNV-1a (64 bits) of `bytes` as 16 hex digits: the policy hash agents
/// report (to tell revisions apart, not a security measure) and the
/// stable order of canaries.
pub fn hash(bytes: &[u8]) -> String {
    format!("{:016x}", fnv1a(bytes))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// `PREFIX/policy/current`: the revision in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Current {
    /// The revision pushed last.
    pub revision: u64,
    /// Its hash ([`hash`] of the source).
    pub hash: String,
    /// Agents apply it under the lockout guard with this many seconds to
    /// confirm (they confirm themselves once they reach etcd again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm: Option<u64>,
    /// During a canary rollout: who applies `revision` first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
    /// Unix time of the push.
    #[serde(default)]
    pub pushed_at: u64,
}

/// The canary stage of a rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Canary {
    /// The canaries (`HOST/IFACE`).
    pub agents: Vec<String>,
    /// The revision every other agent keeps (none: the first push).
    pub previous: Option<u64>,
    /// Its hash, as the push that made it recorded it (every revision an
    /// agent applies is checked against the hash its push recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_hash: Option<String>,
}

impl Current {
    /// The revision agent `id` (`HOST/IFACE`) should enforce.
    pub fn target_for(&self, id: &str) -> Option<u64> {
        match &self.canary {
            Some(c) if !c.agents.iter().any(|a| a == id) => c.previous,
            _ => Some(self.revision),
        }
    }

    /// The hash the push recorded for `revision`, if this pointer holds
    /// one: the pointer's own revision, or during a canary stage the
    /// revision the others keep.
    pub fn hash_of(&self, revision: u64) -> Option<&str> {
        if revision == self.revision {
            return Some(&self.hash);
        }
        self.canary
            .as_ref()
            .filter(|c| c.previous == Some(revision))
            .and_then(|c| c.previous_hash.as_deref())
    }

    /// Checks `text`, the stored source of `revision` (at `key`), against
    /// the hash the push recorded ([`Current::hash_of`]).
    pub fn verify(&self, revision: u64, key: &str, text: &str) -> Result<(), FleetError> {
        let tampered = |reason: String| FleetError::Tampered {
            revision,
            key: key.to_string(),
            reason,
        };
        match self.hash_of(revision) {
            Some(h) if h == hash(text.as_bytes()) => Ok(()),
            Some(_) => Err(tampered(
                "does not match the hash the push recorded (changed after the push?)".into(),
            )),
            None => Err(tampered(
                "has no hash recorded by a push in the pointer (a pointer written by an older segbpf, or by hand?)"
                    .into(),
            )),
        }
    }

    fn parse(key: &str, value: &[u8]) -> Result<Self, FleetError> {
        serde_json::from_slice(value).map_err(|e| FleetError::Malformed {
            key: key.to_string(),
            reason: e.to_string(),
        })
    }
}

/// What an agent reports under `PREFIX/status/HOST/IFACE`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The name the agent reports under: its host name, or when another
    /// live agent holds that, `HOST~MACHINEID-NETNS` (or `HOST~BOOTID-NETNS`).
    pub host: String,
    /// The host name it was given (`--fleet-host`, default the system's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Who wrote the report: the kernel's boot id and the network
    /// namespace's inode ([`agent::owner`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Interface.
    pub iface: String,
    /// Roles in force.
    pub roles: Vec<String>,
    /// Roles given with `--role` (empty: from the addresses).
    #[serde(default)]
    pub role_args: Vec<String>,
    /// Permanent addresses of the interface (what roles are decided from).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Revision in force (none: a policy not from this store).
    pub revision: Option<u64>,
    /// Hash of its source.
    pub hash: Option<String>,
    /// The attachment's generation.
    pub generation: u64,
    /// Why the last revision asked for was not applied (none: it was).
    pub error: Option<String>,
    /// The revision that failed, when `error` is about one.
    #[serde(default)]
    pub failed_revision: Option<u64>,
    /// Unix time of the report.
    pub updated_at: u64,
}

/// Unix time now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A policy checked for pushing: its source, parsed, and the lint warnings.
#[derive(Debug)]
pub struct Checked {
    /// The file as read.
    pub text: String,
    /// Parsed and validated.
    pub policy: Policy,
    /// Lint warnings (shown, not fatal).
    pub warnings: Vec<Warning>,
}

/// Validates `path` as `segbpf check` does with default map sizes: parse
/// (errors name `file:line:col`), compile for every role, lint.
pub fn check(path: &Path) -> Result<Checked, FleetError> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError::io(path, e))?;
    let policy = Policy::from_str(&text, &path.display().to_string())?;
    compile::compile_hosts(
        &policy,
        compile::one_host_per_role(&policy),
        Capacity::for_policy(&policy),
    )?;
    let warnings = crate::policy::lint::lint(&policy);
    Ok(Checked {
        text,
        policy,
        warnings,
    })
}

/// How a host's roles change with a push (`--dry-run`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RoleChange {
    /// `HOST/IFACE`.
    pub agent: String,
    /// Roles now.
    pub from: Vec<String>,
    /// Roles with the new policy (empty with `error`).
    pub to: Vec<String>,
    /// Why the host could not apply it (no role matches, unknown role).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The roles each reporting agent would have with `policy`.
pub fn plan(policy: &Policy, agents: &[AgentStatus]) -> Vec<RoleChange> {
    agents
        .iter()
        .map(|a| {
            let addrs: Vec<std::net::IpAddr> =
                a.addresses.iter().filter_map(|s| s.parse().ok()).collect();
            let (to, error) = match roles::resolve(policy, &a.role_args, &a.iface, &addrs) {
                Ok(r) => (r, None),
                Err(e) => (Vec::new(), Some(e.to_string())),
            };
            RoleChange {
                agent: agent_id(&a.host, &a.iface),
                from: a.roles.clone(),
                to,
                error,
            }
        })
        .collect()
}

/// The `n` canaries among `agents` (`HOST/IFACE`): the lowest by [`hash`]
/// of the name, so the same hosts go first every time.
pub fn choose_canaries(agents: &[String], n: usize) -> Vec<String> {
    let mut sorted: Vec<&String> = agents.iter().collect();
    sorted.sort_by_key(|a| (fnv1a(a.as_bytes()), (*a).clone()));
    sorted.into_iter().take(n).cloned().collect()
}

/// The fleet as the store sees it.
#[derive(Clone, Debug, Serialize)]
pub struct FleetStatus {
    /// The pointer (none: nothing pushed yet).
    pub current: Option<Current>,
    /// The agents' reports, by `HOST/IFACE`.
    pub agents: Vec<AgentStatus>,
}

/// Agents that were given one host name for one interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NameCollision {
    /// The host name they share.
    pub name: String,
    /// The interface.
    pub iface: String,
    /// The names they report under (`HOST/IFACE`).
    pub agents: Vec<String>,
}

impl FleetStatus {
    /// Host names more than one live agent was given for one interface
    /// (cloned images, namespaces on one machine).
    pub fn name_collisions(&self) -> Vec<NameCollision> {
        let mut by_name: std::collections::BTreeMap<(&str, &str), Vec<String>> =
            std::collections::BTreeMap::new();
        for a in &self.agents {
            let name = a.name.as_deref().unwrap_or(&a.host);
            by_name
                .entry((name, &a.iface))
                .or_default()
                .push(agent_id(&a.host, &a.iface));
        }
        by_name
            .into_iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|((name, iface), agents)| NameCollision {
                name: name.to_string(),
                iface: iface.to_string(),
                agents,
            })
            .collect()
    }

    /// Agents at the latest revision without an error.
    pub fn at_latest(&self) -> usize {
        self.agents.iter().filter(|a| self.is_latest(a)).count()
    }

    /// Whether `a` enforces the latest revision.
    pub fn is_latest(&self, a: &AgentStatus) -> bool {
        self.current
            .as_ref()
            .is_some_and(|c| a.revision == Some(c.revision))
    }
}

/// Reads the pointer and every agent's report.
pub async fn status(store: &Store) -> Result<FleetStatus, FleetError> {
    let mut client = store.connect().await?;
    read_status(store, &mut client).await
}

async fn read_status(store: &Store, client: &mut Client) -> Result<FleetStatus, FleetError> {
    let (current, _) = read_current(store, client).await?;
    let resp = store
        .timed(
            "reading the agents' status",
            client.get(store.status_prefix(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
    let mut agents = Vec::new();
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        match serde_json::from_slice::<AgentStatus>(kv.value()) {
            Ok(s) => agents.push(s),
            Err(e) => tracing::warn!("etcd key {key}: not an agent status ({e}); skipped"),
        }
    }
    agents.sort_by(|a, b| (&a.host, &a.iface).cmp(&(&b.host, &b.iface)));
    Ok(FleetStatus { current, agents })
}

/// The pointer as read now.
pub(crate) struct Pointer {
    /// The pointer, if any.
    pub(crate) current: Option<Current>,
    /// Its mod revision (0: absent): what a push compares against.
    pub(crate) mod_revision: i64,
    /// The store's revision at the read: where a watch starts.
    pub(crate) store_revision: i64,
}

/// Reads the pointer.
pub(crate) async fn read_pointer(
    store: &Store,
    client: &mut Client,
) -> Result<Pointer, FleetError> {
    let key = store.current_key();
    let resp = store
        .timed(
            "reading the current revision",
            client.get(key.clone(), None),
        )
        .await?;
    let store_revision = resp
        .header()
        .map_or(0, etcd_client::ResponseHeader::revision);
    Ok(match resp.kvs().first() {
        Some(kv) => Pointer {
            current: Some(Current::parse(&key, kv.value())?),
            mod_revision: kv.mod_revision(),
            store_revision,
        },
        None => Pointer {
            current: None,
            mod_revision: 0,
            store_revision,
        },
    })
}

/// The pointer and its mod revision (0: absent).
async fn read_current(
    store: &Store,
    client: &mut Client,
) -> Result<(Option<Current>, i64), FleetError> {
    let p = read_pointer(store, client).await?;
    Ok((p.current, p.mod_revision))
}

/// What to push.
#[derive(Clone, Debug)]
pub struct PushRequest {
    /// The checked policy.
    pub source: String,
    /// Its text.
    pub text: String,
    /// Seconds agents get to confirm (lockout guard).
    pub confirm: Option<u64>,
    /// Canaries first: how many, and how long to wait for them.
    pub canary: Option<(usize, Duration)>,
}

/// What a push did.
#[derive(Clone, Debug, Serialize)]
pub struct Pushed {
    /// The new revision.
    pub revision: u64,
    /// Its hash.
    pub hash: String,
    /// The revision before (none: the first push).
    pub previous: Option<u64>,
    /// The canaries that applied it first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub canaries: Vec<String>,
}

/// Reads the agents' reports and the roles each would have with `policy`.
pub async fn dry_run(store: &Store, policy: &Policy) -> Result<Vec<RoleChange>, FleetError> {
    let st = status(store).await?;
    Ok(plan(policy, &st.agents))
}

/// Stores `req` as the next revision and points every agent (or, with a
/// canary, the canaries first) at it. `progress` hears about the stages.
pub async fn push(
    store: &Store,
    req: &PushRequest,
    mut progress: impl FnMut(String),
) -> Result<Pushed, FleetError> {
    let mut client = store.connect().await?;
    let (current, current_rev) = read_current(store, &mut client).await?;
    // The next number: after every stored revision (a stopped canary
    // rollout leaves its revision stored but not current).
    let last = store
        .timed(
            "reading the last revision",
            client.get(
                store.revisions_prefix(),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_keys_only()
                        .with_sort(SortTarget::Key, SortOrder::Descend)
                        .with_limit(1),
                ),
            ),
        )
        .await?;
    let last = last
        .kvs()
        .first()
        .and_then(|kv| {
            String::from_utf8_lossy(kv.key())
                .rsplit('/')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let revision = last.max(current.as_ref().map_or(0, |c| c.revision)) + 1;
    // What the fleet enforces now (a canary stage left by a push that was
    // killed: the revision the others kept).
    let (previous, previous_hash) = match current.as_ref().map(|c| (c, &c.canary)) {
        Some((_, Some(k))) => (k.previous, k.previous_hash.clone()),
        Some((c, None)) => (Some(c.revision), Some(c.hash.clone())),
        None => (None, None),
    };
    let canaries = match req.canary {
        Some((n, _)) => {
            let st = read_status(store, &mut client).await?;
            let ids: Vec<String> = st
                .agents
                .iter()
                .map(|a| agent_id(&a.host, &a.iface))
                .collect();
            if ids.is_empty() {
                return Err(FleetError::NoAgents(n));
            }
            choose_canaries(&ids, n)
        }
        None => Vec::new(),
    };
    let hash = hash(req.text.as_bytes());
    let pointer = Current {
        revision,
        hash: hash.clone(),
        confirm: req.confirm,
        canary: (!canaries.is_empty()).then(|| Canary {
            agents: canaries.clone(),
            previous,
            previous_hash,
        }),
        pushed_at: now(),
    };
    let rev_key = store.revision_key(revision);
    let key = store.current_key();
    let txn = Txn::new()
        .when([
            Compare::mod_revision(key.clone(), CompareOp::Equal, current_rev),
            Compare::create_revision(rev_key.clone(), CompareOp::Equal, 0),
        ])
        .and_then([
            TxnOp::put(rev_key, req.text.clone(), None),
            TxnOp::put(key.clone(), to_json(&pointer), None),
        ]);
    let resp = store.timed("storing the revision", client.txn(txn)).await?;
    if !resp.succeeded() {
        return Err(FleetError::Conflict { key });
    }
    let pushed = Pushed {
        revision,
        hash,
        previous,
        canaries: canaries.clone(),
    };
    let Some((_, wait)) = req.canary else {
        return Ok(pushed);
    };
    progress(format!(
        "revision {revision} stored; canaries first: {}",
        canaries.join(", ")
    ));
    let outcome = wait_for_canaries(store, &mut client, &canaries, revision, wait).await;
    let published_rev = resp
        .header()
        .map_or(0, etcd_client::ResponseHeader::revision);
    match outcome {
        Ok(()) => {
            let all = Current {
                canary: None,
                ..pointer
            };
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    published_rev,
                )])
                .and_then([TxnOp::put(key.clone(), to_json(&all), None)]);
            let resp = store
                .timed("publishing to every agent", client.txn(txn))
                .await?;
            if !resp.succeeded() {
                return Err(FleetError::Conflict { key });
            }
            progress(format!(
                "canaries report revision {revision}; published to every agent"
            ));
            Ok(pushed)
        }
        Err(e) => {
            // Back to what was in force, unless another push came first.
            let restore = match &current {
                Some(c) => TxnOp::put(key.clone(), to_json(c), None),
                None => TxnOp::delete(key.clone(), None),
            };
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    published_rev,
                )])
                .and_then([restore]);
            store
                .timed("restoring the previous pointer", client.txn(txn))
                .await?;
            Err(e)
        }
    }
}

fn kept(previous: Option<u64>) -> String {
    previous.map_or_else(
        || "no policy (nothing was in force)".to_string(),
        |p| format!("revision {p}"),
    )
}

async fn wait_for_canaries(
    store: &Store,
    client: &mut Client,
    canaries: &[String],
    revision: u64,
    wait: Duration,
) -> Result<(), FleetError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let st = read_status(store, client).await?;
        let previous = st
            .current
            .as_ref()
            .and_then(|c| c.canary.as_ref())
            .and_then(|c| c.previous);
        let mut waiting = Vec::new();
        for id in canaries {
            let report = st
                .agents
                .iter()
                .find(|a| agent_id(&a.host, &a.iface) == *id);
            match report {
                Some(a) if a.failed_revision == Some(revision) => {
                    return Err(FleetError::CanaryFailed {
                        agent: id.clone(),
                        revision,
                        error: a.error.clone().unwrap_or_default(),
                        kept: kept(previous),
                    });
                }
                Some(a) if a.revision == Some(revision) && a.error.is_none() => {}
                _ => waiting.push(id.clone()),
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(FleetError::CanaryTimeout {
                agents: waiting.join(", "),
                revision,
                secs: wait.as_secs(),
                kept: kept(previous),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn to_json(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(host: &str, addr: &str, roles: &[&str]) -> AgentStatus {
        AgentStatus {
            host: host.into(),
            name: None,
            owner: None,
            iface: "eth0".into(),
            roles: roles.iter().map(ToString::to_string).collect(),
            role_args: Vec::new(),
            addresses: vec![addr.into()],
            revision: Some(1),
            hash: None,
            generation: 1,
            error: None,
            failed_revision: None,
            updated_at: 0,
        }
    }

    #[test]
    fn canaries_are_stable_and_independent_of_order() {
        let a: Vec<String> = (0..20).map(|i| format!("h{i}/eth0")).collect();
        let mut b = a.clone();
        b.reverse();
        let first = choose_canaries(&a, 3);
        assert_eq!(first.len(), 3);
        assert_eq!(first, choose_canaries(&b, 3));
        // More canaries keep the first ones.
        assert_eq!(choose_canaries(&a, 5)[..3], first[..]);
        assert_eq!(choose_canaries(&a, 50).len(), 20);
    }

    #[test]
    fn canary_stage_sends_only_canaries_to_the_new_revision() {
        let mut c = Current {
            revision: 7,
            hash: String::new(),
            confirm: None,
            canary: Some(Canary {
                agents: vec!["a/eth0".into()],
                previous: Some(6),
                previous_hash: Some(hash(b"six")),
            }),
            pushed_at: 0,
        };
        c.hash = hash(b"seven");
        assert_eq!(c.target_for("a/eth0"), Some(7));
        assert_eq!(c.target_for("b/eth0"), Some(6));
        // Each revision is checked against its own recorded hash.
        let key = "/segbpf/policy/revisions/x";
        assert!(c.verify(7, key, "seven").is_ok());
        assert!(c.verify(6, key, "six").is_ok());
        assert!(c.verify(6, key, "seven").is_err());
        assert!(c.verify(7, key, "six").is_err());
        assert!(c.verify(5, key, "five").is_err(), "no hash recorded");
        if let Some(k) = c.canary.as_mut() {
            k.previous_hash = None;
        }
        assert!(c.verify(6, key, "six").is_err(), "no hash recorded");
        c.canary = None;
        assert_eq!(c.target_for("b/eth0"), Some(7));
    }

    #[test]
    fn plan_names_role_changes_and_hosts_that_cannot_apply() {
        let policy = Policy::from_str(
            r#"version = 1
[roles.web]
hosts = ["198.18.0.0/24"]
[roles.db]
hosts = ["198.18.1.0/24", "198.18.0.9/32"]
"#,
            "p.toml",
        )
        .expect("policy");
        let agents = [
            agent("w1", "198.18.0.5", &["web"]),
            agent("w9", "198.18.0.9", &["web"]),
            agent("x", "198.18.7.1", &["web"]),
        ];
        let plan = plan(&policy, &agents);
        assert_eq!(plan[0].to, ["web"]);
        // 198.18.0.9 is in both roles now.
        assert!(plan[1].to.contains(&"db".to_string()) && plan[1].to.contains(&"web".to_string()));
        assert!(
            plan[2]
                .error
                .as_deref()
                .is_some_and(|e| e.contains("no role matches"))
        );
    }

    #[test]
    fn store_checks_its_arguments() {
        let tls = TlsFiles::default();
        assert!(Store::new(vec![], "/segbpf", tls.clone()).is_err());
        assert!(Store::new(vec!["e:2379".into()], "segbpf", tls.clone()).is_err());
        let s = Store::new(vec!["e:2379".into()], "/fleet/a/", tls).expect("store");
        assert_eq!(s.current_key(), "/fleet/a/policy/current");
        assert_eq!(s.revision_key(42), "/fleet/a/policy/revisions/0000000042");
        assert_eq!(s.status_key("web1", "eth0"), "/fleet/a/status/web1/eth0");
        let root = Store::new(vec!["e:2379".into()], "/", TlsFiles::default()).expect("root");
        assert_eq!(root.current_key(), "/policy/current");
        let half = TlsFiles {
            cert: Some("c.pem".into()),
            ..TlsFiles::default()
        };
        assert!(Store::new(vec!["e:2379".into()], "/s", half).is_err());
    }

    #[test]
    fn agents_given_one_name_are_flagged() {
        let mut second = agent("w1~0123abcd-4026532000", "198.18.0.6", &["web"]);
        second.name = Some("w1".into());
        let mut first = agent("w1", "198.18.0.5", &["web"]);
        first.name = Some("w1".into());
        let mut other_iface = agent("w1", "198.18.0.7", &["web"]);
        other_iface.iface = "eth1".into();
        let st = FleetStatus {
            current: None,
            agents: vec![
                first,
                second,
                agent("w2", "198.18.0.8", &["web"]),
                other_iface,
            ],
        };
        assert_eq!(
            st.name_collisions(),
            [NameCollision {
                name: "w1".into(),
                iface: "eth0".into(),
                agents: vec!["w1/eth0".into(), "w1~0123abcd-4026532000/eth0".into()],
            }]
        );
    }

    #[test]
    fn hash_tells_texts_apart() {
        assert_eq!(hash(b"a"), hash(b"a"));
        assert_ne!(hash(b"a"), hash(b"b"));
        assert_eq!(hash(b"").len(), 16);
    }
}
