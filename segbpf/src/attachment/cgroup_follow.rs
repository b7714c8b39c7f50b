//! Following the cgroup tree while a services attachment is in force:
//! every cgroup made or removed below a guard is classified within
//! milliseconds (inotify), with a rescan every second as a backstop; a
//! hangup reloads the policy file in force (recorded in the state). Until a new cgroup's entry is written
//! the programs hold its sockets (see [`crate::host::cgroups`]), so the delay is a delay
//! of service, never a gap. One follower per attachment claims it
//! ([`claim_follower`]; liveness from a kernel-held `flock`, never from a
//! file alone).

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use crate::{
    attachment::services::{self as engine, ServicesError, SvcMaps, SvcPaths},
    host::cgroups::Watcher,
};

/// What happened while following.
#[derive(Debug)]
pub enum FollowEvent {
    /// The cgroup table changed: entries written and removed.
    Rescanned {
        /// Entries written.
        written: usize,
        /// Entries removed.
        removed: usize,
    },
    /// The policy file was applied (its generation).
    Reloaded(u64),
    /// The policy file could not be applied; the previous one stays.
    ReloadFailed(String),
    /// A packet of a service was dropped (or let through in audit mode).
    Refused(Refused),
}

/// A refused packet of a service, as the kernel reported it (its JSON
/// record is [`crate::observe::services::SvcEventRecord`]).
#[derive(Debug)]
pub struct Refused {
    /// The service's name (`?` when its policy is no longer in force).
    pub service: String,
    /// `ingress` or `egress`.
    pub direction: &'static str,
    /// `drop`, or `audit` (audit mode: it passed).
    pub action: &'static str,
    /// IP protocol number.
    pub proto: u8,
    /// Source address.
    pub src: std::net::IpAddr,
    /// Source port (ICMP echo: the id).
    pub sport: u16,
    /// Destination address.
    pub dst: std::net::IpAddr,
    /// Destination port.
    pub dport: u16,
}

impl Refused {
    /// The event `ev`, its service named by `state` (the policy in force).
    pub fn of(ev: &segbpf_common::SvcEvent, state: Option<&engine::SvcState>) -> Self {
        let ip = |b| crate::host::proto::ip_from(ev.family, b);
        let stride = segbpf_common::SVC_SLOT_STRIDE;
        let service = state
            .filter(|s| s.slot == ev.slot / stride)
            .and_then(|s| s.services.iter().find(|x| x.id == ev.slot % stride))
            .map_or_else(|| "?".to_string(), |x| x.name.clone());
        Refused {
            service,
            direction: if ev.dir == segbpf_common::DIR_INGRESS {
                "ingress"
            } else {
                "egress"
            },
            action: if ev.audit != 0 { "audit" } else { "drop" },
            proto: ev.proto,
            src: ip(ev.src_be),
            sport: u16::from_be_bytes(ev.sport_be),
            dst: ip(ev.dst_be),
            dport: u16::from_be_bytes(ev.dport_be),
        }
    }
}

/// The event ring of the attachment at `paths` (None: absent, in an
/// attachment made by an older segbpf).
pub fn open_ring(paths: &SvcPaths) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
    aya::maps::MapData::from_pin(paths.dir.join(segbpf_common::MAP_SVC_EVENTS))
        .ok()
        .and_then(|m| aya::maps::RingBuf::try_from(aya::maps::Map::RingBuf(m)).ok())
}

/// The file a `monitor --services` holds locked while it reads the ring:
/// the follower leaves the ring to it meanwhile (one reader loses no
/// event to another).
pub fn monitor_lock_path(paths: &SvcPaths) -> std::path::PathBuf {
    paths.state.with_extension("monitor.lock")
}

/// Whether a `monitor --services` reads the ring now (holds its lock).
fn monitor_running(paths: &SvcPaths) -> bool {
    std::fs::File::open(monitor_lock_path(paths))
        .is_ok_and(|f| matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)))
}

/// Delivers the events waiting in the ring.
pub fn drain(
    ring: &mut Option<aya::maps::RingBuf<aya::maps::MapData>>,
    paths: &SvcPaths,
    on_event: &mut impl FnMut(FollowEvent),
) {
    let Some(ring) = ring else {
        return;
    };
    let mut state = None;
    while let Some(item) = ring.next() {
        if item.len() < size_of::<segbpf_common::SvcEvent>() {
            continue;
        }
        let ev: segbpf_common::SvcEvent =
            bytemuck::pod_read_unaligned(&item[..size_of::<segbpf_common::SvcEvent>()]);
        if state.is_none() {
            state = Some(paths.read_state());
        }
        on_event(FollowEvent::Refused(Refused::of(
            &ev,
            state.as_ref().and_then(Option::as_ref),
        )));
    }
}

/// Applies again the policy file in force, with the audit mode in force:
/// both as the last attach or reload recorded them in the attachment's
/// state (whoever made it: this process, a `reload --services -p OTHER`,
/// another attach), never the file this process was started with, so a
/// hangup cannot undo a later reload. The file is checked like at attach
/// unless `insecure_policy`; live set edits are kept. On any error
/// nothing changes.
pub fn reload_in_force(
    paths: &SvcPaths,
    insecure_policy: bool,
) -> Result<engine::SvcState, String> {
    let state = paths.read_state().ok_or_else(|| {
        format!(
            "no state of the attachment in force ({}): nothing to reload",
            paths.state.display()
        )
    })?;
    let policy_path = state.policy.as_path();
    if !insecure_policy {
        crate::attachment::trust::check_policy_file(policy_path).map_err(|e| e.to_string())?;
    }
    // Live set edits (`segbpf set --services`) stay over the file, as a
    // running `attach IFACE` keeps them.
    engine::reload_file(paths, policy_path, state.audit, true).map_err(|e| e.to_string())
}

/// The follower's claim on an attachment: an exclusive `flock` on
/// `STATE/services:ID.follow.lock`, held by the kernel for as long as the
/// follower lives (its process dies: the lock is gone, whatever file is
/// left). The file also records the holder's PID and start time (for
/// messages only; checked against `/proc` before it is shown).
pub struct FollowerClaim(#[allow(dead_code, reason = "held for its flock")] std::fs::File);

/// The follower lock file of `paths`.
pub fn follower_lock_file(paths: &SvcPaths) -> std::path::PathBuf {
    paths.state.with_extension("follow.lock")
}

/// The log of the `--no-wait` follower: `STATE/services:ID.follow.log`.
pub fn follower_log_file(paths: &SvcPaths) -> std::path::PathBuf {
    paths.state.with_extension("follow.log")
}

/// The size past which the follower's log is rotated (1 MiB), unless
/// `SEGBPF_FOLLOW_LOG_MAX` (bytes, at least 1024) says otherwise.
pub const FOLLOW_LOG_MAX: u64 = 1 << 20;

fn follow_log_max() -> u64 {
    std::env::var("SEGBPF_FOLLOW_LOG_MAX")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(FOLLOW_LOG_MAX, |n| n.max(1024))
}

/// Caps the follower's log: when this process's stderr is the log of
/// `paths` ([`follower_log_file`]) and it has grown past
/// [`FOLLOW_LOG_MAX`], it becomes `….follow.log.1` (replacing the one
/// before) and stderr goes on in a new, empty log. At most about twice the
/// cap is kept, whatever the churn of the cgroup tree. Returns whether it
/// rotated.
pub fn rotate_log(paths: &SvcPaths) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let log = follower_log_file(paths);
    let (Ok(cur), Ok(err)) = (
        std::fs::metadata(&log),
        std::fs::metadata("/proc/self/fd/2"),
    ) else {
        return false;
    };
    if (cur.dev(), cur.ino()) != (err.dev(), err.ino()) || cur.len() < follow_log_max() {
        return false;
    }
    let mut old = log.clone().into_os_string();
    old.push(".1");
    if std::fs::rename(&log, &old).is_err() {
        return false;
    }
    let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
    else {
        return false;
    };
    // SAFETY: dup2 of a descriptor we own onto stderr; both are valid.
    let rc = unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&f), 2) };
    rc >= 0
}

/// A process's start time (clock ticks since boot), from `/proc`.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

fn open_lock(paths: &SvcPaths) -> Result<std::fs::File, ServicesError> {
    let file = follower_lock_file(paths);
    if let Some(parent) = file.parent() {
        crate::attachment::dirs::private_dir(parent).map_err(|source| ServicesError::Io {
            what: format!("creating {}", parent.display()),
            source,
        })?;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&file)
        .map_err(|source| ServicesError::Io {
            what: format!("opening {}", file.display()),
            source,
        })
}

/// Tries `flock(LOCK_EX | LOCK_NB)` on `f`: whether it was taken.
fn try_lock(f: &std::fs::File) -> Result<bool, ServicesError> {
    use std::os::fd::AsRawFd as _;
    loop {
        // SAFETY: flock on a file descriptor the caller owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => {}
            _ => {
                return Err(ServicesError::Io {
                    what: "locking the follower claim".into(),
                    source: e,
                });
            }
        }
    }
}

/// Claims the following of `paths` for this process: None when another
/// live process holds the claim.
pub fn claim_follower(paths: &SvcPaths) -> Result<Option<FollowerClaim>, ServicesError> {
    use std::io::{Seek as _, Write as _};
    let mut f = open_lock(paths)?;
    if !try_lock(&f)? {
        return Ok(None);
    }
    let pid = std::process::id();
    let record = format!("{pid} {}\n", start_time(pid).unwrap_or(0));
    let _ = f.set_len(0);
    let _ = f.seek(std::io::SeekFrom::Start(0));
    let _ = f.write_all(record.as_bytes());
    Ok(Some(FollowerClaim(f)))
}

/// Whether a live process follows `paths` (its claim is held), and its
/// PID when the record matches a live process's start time.
pub fn live_follower(paths: &SvcPaths) -> Result<Option<Option<u32>>, ServicesError> {
    let f = open_lock(paths)?;
    if try_lock(&f)? {
        // Nobody holds it (closing the file drops our lock).
        return Ok(None);
    }
    let text = std::fs::read_to_string(follower_lock_file(paths)).unwrap_or_default();
    let mut w = text.split_whitespace().map(str::parse::<u64>);
    let pid = match (w.next(), w.next()) {
        (Some(Ok(pid)), Some(Ok(start))) => u32::try_from(pid)
            .ok()
            .filter(|p| start != 0 && start_time(*p) == Some(start)),
        _ => None,
    };
    Ok(Some(pid))
}

/// The process that follows `paths` now, from the kernel's table of
/// file locks (`/proc/locks`): the holder of the `flock` on the follower
/// claim. Takes no lock itself, so a probe (`status`) never makes a
/// follower that starts at that moment think another one holds the claim.
/// None: no live process follows the tree (new cgroups below the guards
/// are held until one does).
pub fn follower_in_kernel(paths: &SvcPaths) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(follower_lock_file(paths)).ok()?;
    let dev = meta.dev();
    // The kernel's `MAJOR:MINOR:INODE` of the file (major and minor in hex).
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let want = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    held_by(&locks, &want)
}

/// The PID of the process that holds an `flock` on the file `dev_ino`
/// (`MAJOR:MINOR:INODE` as /proc/locks writes it), from the text of
/// /proc/locks (waiters, lines with `->`, hold nothing).
fn held_by(locks: &str, dev_ino: &str) -> Option<u32> {
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE START END
        (f.len() >= 6 && f[1] == "FLOCK" && f[5] == dev_ino)
            .then(|| f[4].parse().ok())
            .flatten()
    })
}

/// How often the tree is rescanned without an inotify event.
const RESCAN_EVERY: Duration = Duration::from_secs(1);

/// Follows the tree of the attachment at `paths` until `stop` is set or the
/// attachment is gone (detached). `hup` set: reload the policy in force
/// (see [`reload_in_force`]).
pub fn follow(
    paths: &SvcPaths,
    insecure_policy: bool,
    stop: &AtomicBool,
    hup: &AtomicBool,
    mut on_event: impl FnMut(FollowEvent),
) -> Result<(), ServicesError> {
    let mut watcher = Watcher::new().map_err(|source| ServicesError::Io {
        what: "inotify".into(),
        source,
    })?;
    let mut maps = SvcMaps::from_pins(&paths.dir)?;
    // The event ring (absent in an attachment made by an older segbpf).
    let mut ring = open_ring(paths);
    // None: rescan at the next turn.
    let mut last: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Relaxed) || !paths.is_attached() {
            return Ok(());
        }
        if hup.swap(false, Ordering::Relaxed) {
            match reload_in_force(paths, insecure_policy) {
                Ok(s) => on_event(FollowEvent::Reloaded(s.generation)),
                Err(e) => on_event(FollowEvent::ReloadFailed(e)),
            }
            last = None;
        }
        // Watch first, then scan: a cgroup made in between is in the scan
        // or raises an event.
        watcher.watch(&engine::guards(paths));
        if last.is_none_or(|t| t.elapsed() >= RESCAN_EVERY) {
            let (written, removed) = engine::rescan(paths, &mut maps)?;
            if written + removed > 0 {
                on_event(FollowEvent::Rescanned { written, removed });
            }
            last = Some(Instant::now());
        }
        if !monitor_running(paths) {
            drain(&mut ring, paths, &mut on_event);
        }
        if watcher.wait(Duration::from_millis(200)) {
            let (written, removed) = engine::rescan(paths, &mut maps)?;
            if written + removed > 0 {
                on_event(FollowEvent::Rescanned { written, removed });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::held_by;

    #[test]
    fn the_follower_is_the_holder_of_its_flock_in_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 77 00:1a:99 0 EOF\n2: FLOCK  ADVISORY  WRITE 4242 00:1a:1234 0 EOF\n2: -> FLOCK  ADVISORY  WRITE 5555 00:1a:1234 0 EOF\n";
        assert_eq!(held_by(locks, "00:1a:1234"), Some(4242));
        assert_eq!(held_by(locks, "00:1a:99"), None);
        assert_eq!(held_by(locks, "00:1a:12345"), None);
    }
}
