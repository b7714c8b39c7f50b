//! The agent of `segbpf attach IFACE --etcd ...`: enforces the fleet's
//! revision, follows the pointer key, and reports under a lease-bound key.
//!
//! Every revision goes through the same atomic swap as `segbpf reload`
//! ([`crate::attachment::swap::swap_with`], roles worked out again from the
//! interface's permanent addresses unless `--role` was given), with the
//! same validation and, when the push asked for `--confirm`, the same
//! lockout guard: the agent confirms the change itself once it reaches etcd
//! again after the switch, so a revision that cuts the host off from the
//! control plane is undone by the guard.
//!
//! Every revision the agent applies, on every path (the pointer's own
//! revision, a canary stage's `previous`, the first fetch of an agent with
//! no cache, the cache itself), is checked against the hash its push
//! recorded ([`super::Current::verify`]); one that does not match is not
//! applied, and is reported.
//!
//! A status key held by another live agent is never overwritten: each
//! report is a transaction that writes the key only if it is absent or was
//! written by this same agent ([`owner`]: the kernel's boot id and the
//! network namespace's inode, never a name). Two agents with one host name
//! (cloned images, namespaces on one machine) therefore do not overwrite
//! each other: the second reports as `HOST~MACHINEID-NETNS` (or
//! `HOST~BOOTID-NETNS`), warns, and takes its own name back once the other
//! agent's key is gone; `fleet status` flags the collision.
//!
//! Fail static: the last revision applied is cached on disk ([`cache_dir`]:
//! `IFACE.toml`, its revision in `IFACE.json`; `detach` keeps it).
//! While etcd is unreachable the agent keeps enforcing it and retries with
//! backoff; an agent started while etcd is down enforces the cache at once.
//! A revision that fails on this host changes nothing, is reported, and is
//! not retried until a newer one is pushed.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use etcd_client::{Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{AgentStatus, Current, FleetError, Store, agent_id, hash, now};
use crate::{
    attachment::guard,
    attachment::pins::Attachment,
    attachment::state::State,
    attachment::swap::{self, Choice},
    host::netif,
};

/// How an agent runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The store.
    pub store: Store,
    /// This host's name in status keys.
    pub host: String,
    /// TTL of the status key's lease (seconds).
    pub lease_ttl: i64,
    /// First retry delay after etcd fails; doubles up to `retry_max`.
    pub retry_min: Duration,
    /// Longest delay between retries.
    pub retry_max: Duration,
}

/// The system's host name (`/proc/sys/kernel/hostname`).
pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Where the fleet cache of the default state directory is kept: on disk,
/// not in /run, so that it survives a reboot.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/segbpf/fleet";

/// The directory of `att`'s cache: [`DEFAULT_CACHE_DIR`] for attachments
/// under the default state directory, else `fleet/` in their own state
/// directory (private roots, as tests use); then `net/NETNS/`.
pub fn cache_dir(att: &Attachment) -> PathBuf {
    let state_root = att.state.ancestors().nth(3).unwrap_or(Path::new("/"));
    let base = if state_root == Path::new(crate::attachment::pins::DEFAULT_STATE_DIR) {
        PathBuf::from(DEFAULT_CACHE_DIR)
    } else {
        state_root.join("fleet")
    };
    base.join("net").join(att.netns.key())
}

/// The cached policy of `att` (the last revision it applied): `IFACE.toml`.
pub fn cache_path(att: &Attachment) -> PathBuf {
    cache_dir(att).join(format!("{}.toml", att.iface))
}

fn cache_meta_path(att: &Attachment) -> PathBuf {
    cache_dir(att).join(format!("{}.json", att.iface))
}

fn next_path(att: &Attachment) -> PathBuf {
    cache_dir(att).join(format!("{}.next.toml", att.iface))
}

/// What the cache holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheMeta {
    /// The revision cached.
    pub revision: u64,
    /// Its hash.
    pub hash: String,
    /// The key prefix it came from.
    pub prefix: String,
}

/// The cache's record, if any (and if its policy file is there).
pub fn cached(att: &Attachment) -> Option<CacheMeta> {
    let text = std::fs::read_to_string(cache_meta_path(att)).ok()?;
    let meta: CacheMeta = serde_json::from_str(&text).ok()?;
    cache_path(att).exists().then_some(meta)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FleetError + '_ {
    move |source| FleetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `text` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, text: &[u8]) -> Result<(), FleetError> {
    if let Some(dir) = path.parent() {
        crate::attachment::dirs::private_dir(dir).map_err(io(dir))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn write_meta(att: &Attachment, meta: &CacheMeta) -> Result<(), FleetError> {
    write_atomic(
        &cache_meta_path(att),
        &serde_json::to_vec(meta).unwrap_or_default(),
    )
}

/// The policy file a starting agent attaches with: the cache when there is
/// one (enforced at once, whether etcd is up or not), else the revision
/// etcd points this agent at, fetched with retries until etcd answers and
/// a policy has been pushed (nothing is enforced before: never an empty
/// policy). Returns the file and the revision in it. Without a cache it
/// first tells the service manager it is ready: the unit runs before the
/// network is configured, and waiting for etcd there would hold the boot
/// (nothing was ever enforced here, so nothing is lost by going on).
pub async fn initial_policy(
    att: &Attachment,
    cfg: &AgentConfig,
) -> Result<(PathBuf, u64), FleetError> {
    if cached(att).is_none() {
        crate::host::service::ready(
            "no cached fleet policy: waiting for etcd, nothing enforced yet",
        );
    }
    if let Some(meta) = cached(att) {
        let text = std::fs::read(cache_path(att)).unwrap_or_default();
        if hash(&text) == meta.hash {
            info!(
                "enforcing the cached revision {} of {} at once; etcd is asked next",
                meta.revision, meta.prefix
            );
            return Ok((cache_path(att), meta.revision));
        }
        tracing::error!(
            "the cached revision {} in {} does not match its recorded hash; not enforced, etcd is asked",
            meta.revision,
            cache_path(att).display()
        );
    }
    let id = agent_id(&cfg.host, &att.iface);
    let mut delay = cfg.retry_min;
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        let fetched = async {
            let mut client = cfg.store.connect().await?;
            let (Some(current), _) = get_current(&cfg.store, &mut client).await? else {
                return Ok(None);
            };
            let Some(target) = current.target_for(&id) else {
                return Ok(None);
            };
            let text = get_revision(&cfg.store, &mut client, target).await?;
            current.verify(target, &cfg.store.revision_key(target), &text)?;
            Ok::<_, FleetError>(Some((target, text)))
        }
        .await;
        match fetched {
            Ok(Some((revision, text))) => {
                let path = cache_path(att);
                write_atomic(&path, text.as_bytes())?;
                write_meta(
                    att,
                    &CacheMeta {
                        revision,
                        hash: hash(text.as_bytes()),
                        prefix: cfg.store.prefix.clone(),
                    },
                )?;
                return Ok((path, revision));
            }
            Ok(None) => warn!(
                "no policy pushed under {} yet (segbpf fleet push); nothing is enforced until one is; asking again in at most {} ms",
                cfg.store.prefix,
                delay.as_millis()
            ),
            Err(e @ FleetError::Tampered { .. }) => tracing::error!(
                "{e}; no cached policy: nothing is enforced until a revision that matches is pushed; asking again in at most {} ms",
                delay.as_millis()
            ),
            Err(e) => warn!(
                "{e}; no cached policy: nothing is enforced until etcd answers; retrying in at most {} ms",
                delay.as_millis()
            ),
        }
        tokio::time::sleep(jitter(delay, &id, attempt)).await;
        delay = (delay * 2).min(cfg.retry_max);
    }
}

/// The pointer (if any) and the store's revision it was read at.
async fn get_current(
    store: &Store,
    client: &mut Client,
) -> Result<(Option<Current>, i64), FleetError> {
    let p = super::read_pointer(store, client).await?;
    Ok((p.current, p.store_revision))
}

async fn get_revision(store: &Store, client: &mut Client, n: u64) -> Result<String, FleetError> {
    let key = store.revision_key(n);
    let resp = store
        .timed(
            &format!("reading revision {n}"),
            client.get(key.clone(), None),
        )
        .await?;
    let kv = resp.kvs().first().ok_or_else(|| FleetError::Malformed {
        key: key.clone(),
        reason: "missing (the pointer names a revision that is not stored)".into(),
    })?;
    kv.value_str()
        .map(str::to_string)
        .map_err(|e| FleetError::Malformed {
            key,
            reason: e.to_string(),
        })
}

/// Who runs an agent, from the kernel: the boot id (random at each boot,
/// so cloned images differ) and the inode of the attachment's network
/// namespace. Written in the agent's status; a key whose owner differs is
/// another agent's.
pub fn owner(att: &Attachment) -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    format!("{}/net:[{}]", boot.trim(), att.netns.inode)
}

/// The names this agent may report under, in order of preference: the
/// host name, then the host name with the machine id and the namespace's
/// inode, then with the boot id instead of the machine id (cloned images
/// can share a machine id).
fn identities(host: &str, att: &Attachment) -> Vec<String> {
    let short = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .map(|t| {
                t.trim()
                    .replace('-', "")
                    .chars()
                    .take(8)
                    .collect::<String>()
            })
            .filter(|t| !t.is_empty())
    };
    let ino = att.netns.inode;
    let mut out = vec![host.to_string()];
    for id in [
        short("/etc/machine-id"),
        short("/proc/sys/kernel/random/boot_id"),
    ]
    .into_iter()
    .flatten()
    {
        let name = format!("{host}~{id}-{ino}");
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// What the agent knows between sessions.
struct Local {
    /// `HOST/IFACE` as this agent reports (what canaries are chosen by).
    id: String,
    /// The name its status key holds under the current lease, if any.
    claimed: Option<String>,
    /// The revision in force (from the cache).
    applied: Option<u64>,
    applied_hash: Option<String>,
    /// The last revision that failed here, and why.
    failed: Option<(u64, String)>,
    /// The pointer last seen.
    current: Option<Current>,
}

/// Follows the store for `att` until the process ends: never returns.
/// `hup` (SIGHUP) asks etcd again at once.
pub async fn run(att: &Attachment, cfg: &AgentConfig, mut hup: tokio::signal::unix::Signal) {
    let meta = cached(att);
    let mut local = Local {
        id: agent_id(&cfg.host, &att.iface),
        claimed: None,
        applied: meta.as_ref().map(|m| m.revision),
        applied_hash: meta.map(|m| m.hash),
        failed: None,
        current: None,
    };
    let mut delay = cfg.retry_min;
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        let err = Box::pin(session(att, cfg, &mut local, &mut hup, &mut delay)).await;
        warn!(
            "{err}; {} stays in force; retrying in at most {} ms",
            local.applied.map_or_else(
                || "the policy applied at attach".to_string(),
                |r| format!("revision {r}")
            ),
            delay.as_millis()
        );
        tokio::time::sleep(jitter(delay, &local.id, attempt)).await;
        delay = (delay * 2).min(cfg.retry_max);
    }
}

/// Between half of `delay` and all of it, spread by agent and attempt:
/// hundreds of agents that lost etcd together do not all come back in the
/// same instant.
fn jitter(delay: Duration, id: &str, attempt: u64) -> Duration {
    let half = delay / 2;
    let spread = u64::try_from(half.as_millis()).unwrap_or(u64::MAX).max(1);
    let h = super::fnv1a(format!("{id}#{attempt}").as_bytes());
    half + Duration::from_millis(h % spread)
}

/// One connection to etcd: returns why it ended.
async fn session(
    att: &Attachment,
    cfg: &AgentConfig,
    local: &mut Local,
    hup: &mut tokio::signal::unix::Signal,
    delay: &mut Duration,
) -> FleetError {
    match session_inner(att, cfg, local, hup, delay).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

async fn session_inner(
    att: &Attachment,
    cfg: &AgentConfig,
    local: &mut Local,
    hup: &mut tokio::signal::unix::Signal,
    delay: &mut Duration,
) -> Result<Never, FleetError> {
    let store = &cfg.store;
    let mut client = store.connect().await?;
    let lease = store
        .timed(
            "granting the status lease",
            client.lease_grant(cfg.lease_ttl, None),
        )
        .await?
        .id();
    let (mut keeper, mut keep_stream) = store
        .timed("keeping the lease alive", client.lease_keep_alive(lease))
        .await?;
    *delay = cfg.retry_min;
    info!(
        "connected to etcd ({}); following {}",
        store.endpoints.join(","),
        store.current_key()
    );
    // A new lease: the status key is claimed again (and with it the name
    // canaries know this agent by) before the pointer is followed.
    local.claimed = None;
    report(att, cfg, &mut client, local, lease).await;

    let (current, from) = get_current(store, &mut client).await?;
    if let Some(current) = current {
        follow(att, cfg, &mut client, local, current).await;
    }
    report(att, cfg, &mut client, local, lease).await;
    let mut stream = store
        .timed(
            "watching the current revision",
            client.watch(
                store.current_key(),
                Some(WatchOptions::new().with_start_revision(from + 1)),
            ),
        )
        .await?;
    let secs = u64::try_from(cfg.lease_ttl).unwrap_or(1).max(1);
    let mut keepalive = tokio::time::interval(Duration::from_millis(secs * 1000 / 3));
    let mut retry = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            msg = stream.message() => {
                let msg = msg.map_err(store_err(store, "watching"))?;
                let Some(msg) = msg else {
                    return Err(watch_ended(store, "the watch ended"));
                };
                if msg.canceled() {
                    return Err(watch_ended(store, msg.cancel_reason()));
                }
                for ev in msg.events() {
                    if ev.event_type() != EventType::Put {
                        warn!("{} was deleted; the policy in force stays", store.current_key());
                        continue;
                    }
                    if let Some(kv) = ev.kv() {
                        let current = Current::parse(&store.current_key(), kv.value())?;
                        follow(att, cfg, &mut client, local, current).await;
                    }
                }
                report(att, cfg, &mut client, local, lease).await;
            }
            _ = keepalive.tick() => {
                store.timed("keeping the lease alive", keeper.keep_alive()).await?;
                let resp = store
                    .timed("keeping the lease alive", keep_stream.message())
                    .await?;
                if resp.is_none_or(|r| r.ttl() <= 0) {
                    return Err(watch_ended(store, "the status lease expired"));
                }
            }
            _ = retry.tick() => {
                // A revision that waited for a pending confirmation.
                if let Some(c) = local.current.clone().filter(|c| wants(local, c)) {
                    follow(att, cfg, &mut client, local, c).await;
                    report(att, cfg, &mut client, local, lease).await;
                } else if local.claimed.as_deref() != Some(cfg.host.as_str()) {
                    // Reporting under another name (or none): its own
                    // name may be free again.
                    report(att, cfg, &mut client, local, lease).await;
                }
            }
            _ = hup.recv() => {
                if let (Some(current), _) = get_current(store, &mut client).await? {
                    local.failed = None; // SIGHUP: try the revision again
                    follow(att, cfg, &mut client, local, current).await;
                }
                report(att, cfg, &mut client, local, lease).await;
            }
        }
    }
}

fn store_err(store: &Store, what: &str) -> impl FnOnce(etcd_client::Error) -> FleetError {
    let endpoints = store.endpoints.join(",");
    let what = what.to_string();
    move |cause| FleetError::Etcd {
        endpoints,
        what,
        cause,
    }
}

fn watch_ended(store: &Store, why: &str) -> FleetError {
    FleetError::Etcd {
        endpoints: store.endpoints.join(","),
        what: "following the pointer".into(),
        cause: etcd_client::Error::WatchError(why.to_string()),
    }
}

/// Whether `current` asks for a revision this agent has neither applied
/// nor failed.
fn wants(local: &Local, current: &Current) -> bool {
    let Some(target) = current.target_for(&local.id) else {
        return false;
    };
    local.applied != Some(target) && local.failed.as_ref().is_none_or(|(r, _)| *r != target)
}

/// Applies what `current` asks of this agent, if it is new.
async fn follow(
    att: &Attachment,
    cfg: &AgentConfig,
    client: &mut Client,
    local: &mut Local,
    current: Current,
) {
    local.current = Some(current.clone());
    if !wants(local, &current) {
        return;
    }
    let Some(target) = current.target_for(&local.id) else {
        return;
    };
    let text = match get_revision(&cfg.store, client, target).await {
        Ok(t) => t,
        Err(e) => {
            // Not this host's failure: asked again on the next retry tick.
            warn!("revision {target}: {e}");
            return;
        }
    };
    if let Err(e) = current.verify(target, &cfg.store.revision_key(target), &text) {
        let e = e.to_string();
        tracing::error!("{e}");
        local.failed = Some((target, e));
        return;
    }
    let Some(applied) = apply(att, target, &text, current.confirm) else {
        return;
    };
    crate::host::service::ready(&match &applied {
        Ok(_) => format!("fleet revision {target} applied"),
        Err(e) => format!("fleet revision {target} refused, the policy in force is unchanged: {e}"),
    });
    match applied {
        Ok(swapped) => {
            if let Some(secs) = current.confirm {
                // The guard undoes the change after `secs` unless confirmed:
                // confirm once etcd answers through the new policy.
                let wait = Duration::from_secs(secs.div_ceil(2).clamp(1, 10));
                let reached = tokio::time::timeout(wait, client.get(cfg.store.current_key(), None))
                    .await
                    .is_ok_and(|r| r.is_ok());
                if !reached {
                    let e = format!("revision {target} {CUT_OFF} within {secs} s");
                    warn!("{e}");
                    local.failed = Some((target, e));
                    return;
                }
                if let Err(e) = guard::confirm(att) {
                    warn!("confirming revision {target}: {e}");
                }
            }
            if let Err(e) = commit(att, cfg, target, &text) {
                warn!("caching revision {target}: {e}");
            }
            info!("revision {target}: {swapped}");
            local.applied = Some(target);
            local.applied_hash = Some(hash(text.as_bytes()));
            local.failed = None;
        }
        Err(e) => {
            tracing::error!(
                "revision {target} refused on {}, the policy in force is unchanged: {e}",
                att.describe()
            );
            local.failed = Some((target, e.to_string()));
        }
    }
}

/// Stages revision `target` (`text`) in the cache, then swaps it in as
/// `reload` does, through one guarded swap (guarded when `confirm`); the
/// state names the cache file. `None` while a change of this host waits for
/// `segbpf confirm`: the revision waits too (the retry tick comes back to it).
fn apply(
    att: &Attachment,
    target: u64,
    text: &str,
    confirm: Option<u64>,
) -> Option<Result<swap::Swapped, FleetError>> {
    let next = next_path(att);
    let cache = cache_path(att);
    let staged = write_atomic(&next, text.as_bytes());
    if guard::may_be_pending(att) {
        warn!(
            "revision {target}: a change of {} waits for `segbpf confirm {}`; the revision is applied after it",
            att.describe(),
            att.iface
        );
        return None;
    }
    // Under systemd (Type=notify) a revision is framed as a reload is.
    crate::host::service::reloading(&format!("fleet revision {target}"));
    let guarded = swap::Guarded {
        confirm,
        force: false,
    };
    Some(staged.and_then(|()| {
        guarded
            .run(att, || {
                swap::swap_with(att, true, |old| {
                    let choice = Choice::copy_of(next.clone(), cache, BTreeMap::new());
                    if confirm.is_none() {
                        // An automatic apply never does what an explicit
                        // reload would refuse: cutting a live SSH session
                        // (found in the kernel).
                        swap::Guarded::default().refuse_lockout(
                            att,
                            &choice,
                            &old.roles,
                            &format!("fleet revision on {}", att.describe()),
                        )?;
                    }
                    Ok(choice)
                })
            })
            .map_err(FleetError::from)
    }))
}

/// The revision is in force (and confirmed): it becomes the cache.
fn commit(
    att: &Attachment,
    cfg: &AgentConfig,
    revision: u64,
    text: &str,
) -> Result<(), FleetError> {
    let next = next_path(att);
    let cache = cache_path(att);
    std::fs::rename(&next, &cache).map_err(io(&cache))?;
    write_meta(
        att,
        &CacheMeta {
            revision,
            hash: hash(text.as_bytes()),
            prefix: cfg.store.prefix.clone(),
        },
    )
}

/// Writes this agent's status under its lease. A failure is logged, not
/// fatal: an agent that may not write its status (etcd permissions) still
/// follows the policy; a lost connection ends the session through the
/// watch or the lease keep-alive.
async fn report(
    att: &Attachment,
    cfg: &AgentConfig,
    client: &mut Client,
    local: &mut Local,
    lease: i64,
) {
    if let Err(e) = try_report(att, cfg, client, local, lease).await {
        warn!("{e}");
    }
}

/// What a status row says while the lockout guard has yet to undo a
/// revision that cut the host off (followed by `within N s`).
const CUT_OFF: &str = "cut this host off from etcd; the lockout guard restores the previous policy";

/// The row's text once the guard acted: the future tense is gone.
fn guard_acted(revision: u64) -> String {
    format!(
        "revision {revision} cut this host off from etcd; the lockout guard restored the policy in force before it"
    )
}

async fn try_report(
    att: &Attachment,
    cfg: &AgentConfig,
    client: &mut Client,
    local: &mut Local,
    lease: i64,
) -> Result<(), FleetError> {
    // Who this agent is first, then what the attachment and the kernel
    // say (each asked once for every name it reports under).
    let me = owner(att);
    let names = identities(&cfg.host, att);
    // The guard's announcement is replaced once it acted (nothing waits
    // for confirmation any more): the row says what happened.
    if let Some((revision, e)) = &mut local.failed
        && e.contains(CUT_OFF)
        && !guard::may_be_pending(att)
    {
        *e = guard_acted(*revision);
    }
    let state = State::current(att).ok();
    let addresses: Vec<String> = netif::permanent_addresses(&att.iface)
        .unwrap_or_default()
        .iter()
        .map(ToString::to_string)
        .collect();
    let status = |host: &str| AgentStatus {
        host: host.to_string(),
        name: Some(cfg.host.clone()),
        owner: Some(me.clone()),
        iface: att.iface.clone(),
        roles: state.as_ref().map(|s| s.roles.clone()).unwrap_or_default(),
        role_args: state
            .as_ref()
            .map(|s| s.role_args.clone())
            .unwrap_or_default(),
        addresses: addresses.clone(),
        revision: local.applied,
        hash: local.applied_hash.clone(),
        generation: state.as_ref().map_or(0, |s| s.generation),
        error: local.failed.as_ref().map(|(_, e)| e.clone()),
        failed_revision: local.failed.as_ref().map(|(r, _)| *r),
        updated_at: now(),
    };
    let store = &cfg.store;
    let mut held_by = Vec::new();
    for name in names {
        let key = store.status_key(&name, &att.iface);
        let resp = store
            .timed(
                "reading the agent's status key",
                client.get(key.clone(), None),
            )
            .await?;
        // Written only if absent, or if this agent wrote what is there.
        let when = match resp.kvs().first() {
            None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            Some(kv) => {
                let theirs = serde_json::from_slice::<AgentStatus>(kv.value())
                    .ok()
                    .and_then(|s| s.owner);
                if theirs.as_deref() != Some(me.as_str()) {
                    held_by.push(format!(
                        "{key} (owner {})",
                        theirs.as_deref().unwrap_or("unknown: an older segbpf")
                    ));
                    continue;
                }
                Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision())
            }
        };
        let value = serde_json::to_string(&status(&name)).unwrap_or_default();
        let txn = Txn::new().when([when]).and_then([TxnOp::put(
            key.clone(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )]);
        let resp = store
            .timed("writing the agent's status", client.txn(txn))
            .await?;
        if !resp.succeeded() {
            // Another agent wrote it in between: theirs.
            held_by.push(format!("{key} (written by another agent just now)"));
            continue;
        }
        if local.claimed.as_deref() != Some(name.as_str()) {
            if let Some(old) = local.claimed.take() {
                // Back to a better name: the old key goes (if still ours).
                let old_key = store.status_key(&old, &att.iface);
                let txn = Txn::new()
                    .when([Compare::lease(old_key.clone(), CompareOp::Equal, lease)])
                    .and_then([TxnOp::delete(old_key, None)]);
                store
                    .timed("removing the agent's previous status key", client.txn(txn))
                    .await?;
            }
            if name == cfg.host {
                info!("reporting as {}", agent_id(&name, &att.iface));
            } else {
                warn!(
                    "another live agent reports as {} ({}): this one reports as {} instead; give each host its own name (--fleet-host)",
                    agent_id(&cfg.host, &att.iface),
                    held_by.join(", "),
                    agent_id(&name, &att.iface)
                );
            }
            local.claimed = Some(name.clone());
            local.id = agent_id(&name, &att.iface);
        }
        return Ok(());
    }
    local.claimed = None;
    Err(FleetError::Malformed {
        key: store.status_key(&cfg.host, &att.iface),
        reason: format!(
            "every name this agent may report under is held by another live agent: {}; no status reported",
            held_by.join(", ")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_between_half_and_all_of_the_delay_and_spreads() {
        let d = Duration::from_secs(8);
        let waits: Vec<Duration> = (0..50)
            .map(|i| jitter(d, &format!("h{i}/eth0"), 1))
            .collect();
        assert!(waits.iter().all(|w| *w >= d / 2 && *w <= d));
        let distinct: std::collections::BTreeSet<_> = waits.iter().collect();
        assert!(distinct.len() > 40, "{distinct:?}");
        assert_eq!(jitter(Duration::ZERO, "h/eth0", 1), Duration::ZERO);
    }
}
