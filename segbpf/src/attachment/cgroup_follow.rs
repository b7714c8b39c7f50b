//! Following the cgroup tree while a services attachment is in force:
//! every cgroup made or removed below a guard is classified within
//! milliseconds (inotify), with a rescan every second as a backstop; a
//! hangup reloads the policy file in force (recorded in the state); a
//! link another tool detached (`bpftool link detach`) is linked again
//! within a second ([`relink_detached`]). Until a new cgroup's entry is written
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
    /// A link another tool detached was linked again (what was done).
    Relinked(String),
    /// A link another tool detached could not be linked again: only the
    /// other direction is enforced.
    RelinkFailed(String),
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
/// left). Who holds it is read from the kernel's lock table
/// ([`live_follower`]); the PID and start time the file records are for
/// people only, never read back.
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
/// PID (None: held, but the kernel names no PID in this PID namespace).
/// Read from the kernel's lock table (`/proc/locks`), never by taking the
/// lock: a probe that took it, even for a moment, would make a follower
/// claiming it at that moment leave, and two such probes at once could
/// leave no follower at all. A holder that is exiting (killed: its lock
/// goes within moments) is waited for, at most a second, so a dying
/// follower is not named.
pub fn live_follower(paths: &SvcPaths) -> Result<Option<Option<u32>>, ServicesError> {
    let start = Instant::now();
    loop {
        // A PID the kernel does not name here (0, -1): held all the same.
        let holder = claim_holder(paths)?.map(|pid| u32::try_from(pid).ok().filter(|p| *p != 0));
        match holder {
            Some(Some(pid)) if exiting(pid) && start.elapsed() < Duration::from_secs(1) => {
                std::thread::sleep(Duration::from_millis(5));
            }
            _ => return Ok(holder),
        }
    }
}

/// Whether process `pid` is exiting (`PF_EXITING` in `/proc/PID/stat`)
/// or gone.
fn exiting(pid: u32) -> bool {
    const PF_EXITING: u64 = 0x4;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The flags are the 9th field, the 7th after the command.
            stat.rsplit_once(") ")?
                .1
                .split_whitespace()
                .nth(6)?
                .parse::<u64>()
                .ok()
        })
        .is_none_or(|flags| flags & PF_EXITING != 0)
}

/// The holder of the follower claim in the kernel's lock table (see
/// [`flock_holder`]).
fn claim_holder(paths: &SvcPaths) -> Result<Option<i64>, ServicesError> {
    use std::os::unix::fs::MetadataExt as _;
    let file = follower_lock_file(paths);
    let meta = match std::fs::metadata(&file) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ServicesError::Io {
                what: format!("reading {}", file.display()),
                source,
            });
        }
    };
    let locks = std::fs::read_to_string("/proc/locks").map_err(|source| ServicesError::Io {
        what: "reading /proc/locks".into(),
        source,
    })?;
    Ok(flock_holder(&locks, meta.dev(), meta.ino()))
}

/// The holder of a `flock` on the file `dev`/`ino` in `locks` (the text
/// of `/proc/locks`): its PID as the kernel shows it (0 or -1 when it
/// names none in this PID namespace).
fn flock_holder(locks: &str, dev: u64, ino: u64) -> Option<i64> {
    // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; a waiter's line
    // reads "1: -> FLOCK ..." (none here: the claim never waits).
    let file = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.get(1) == Some(&"FLOCK") && w.get(5) == Some(&file.as_str()) {
            Some(w.get(4).and_then(|p| p.parse().ok()).unwrap_or(-1))
        } else {
            None
        }
    })
}

/// After starting the follower `child` (`attach --services --no-wait`):
/// waits (at most `within`) until a live process holds the claim, and
/// returns its PID, from the kernel: `child`'s, or that of a follower
/// started at the same time by another attach (`child` then lost the
/// claim and leaves). None: `child` exited and nobody holds the claim,
/// or nobody did within `within`.
pub fn await_follower(
    paths: &SvcPaths,
    child: &mut std::process::Child,
    within: Duration,
) -> Result<Option<u32>, ServicesError> {
    let start = Instant::now();
    loop {
        let exited = child.try_wait().ok().flatten().is_some();
        match live_follower(paths)? {
            // A holder the kernel names: the claim is exclusive, so it is
            // the one follower (`child` or the one it lost to).
            Some(Some(pid)) => return Ok(Some(pid)),
            // Nobody, or a process of another PID namespace (not
            // `child`), holds it, and `child` has left.
            Some(None) | None if exited => return Ok(None),
            _ => {}
        }
        if start.elapsed() > within {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The process that follows `paths` now, from the kernel's table of
/// file locks (`/proc/locks`): the holder of the `flock` on the follower
/// claim. Takes no lock itself, so a probe (`status`) never makes a
/// follower that starts at that moment think another one holds the claim.
/// None: no live process follows the tree (new cgroups below the guards
/// are held until one does).
pub fn follower_in_kernel(paths: &SvcPaths) -> Option<u32> {
    live_follower(paths).ok().flatten().flatten()
}

/// Whether the attachment's cgroup root is gone: its directory missing,
/// or another cgroup (another id, from the kernel: the inode) made at its
/// path since. The programs were attached to the one that is gone.
fn root_is_gone(paths: &SvcPaths) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(&paths.root.dir).map_or(true, |m| m.ino() != paths.root.id)
}

/// Links again a direction whose link another tool detached (read from
/// the kernel: two link lookups, no lock, while both are linked). Under
/// the attachment's locks, and only while it is still attached (a detach
/// in progress is left alone).
fn relink_detached(
    paths: &SvcPaths,
    failed: &mut Option<String>,
    on_event: &mut impl FnMut(FollowEvent),
) {
    if engine::unlinked(paths).is_empty() {
        *failed = None;
        return;
    }
    let result = engine::lock(paths).and_then(|state_lock| {
        let pins_lock = paths.lock()?;
        let done = if paths.is_attached() && paths.owner() == engine::Owner::Mine {
            engine::relink(paths)
        } else {
            Ok(Vec::new())
        };
        drop(pins_lock);
        drop(state_lock);
        done
    });
    match result {
        Ok(done) => {
            *failed = None;
            for l in done {
                on_event(FollowEvent::Relinked(l));
            }
        }
        Err(e) => {
            let e = e.to_string();
            if failed.as_ref() != Some(&e) {
                on_event(FollowEvent::RelinkFailed(e.clone()));
                *failed = Some(e);
            }
        }
    }
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
    // The last relink failure reported (reported again only when it changes).
    let mut relink_failed: Option<String> = None;
    loop {
        if stop.load(Ordering::Relaxed) || !paths.is_attached() {
            return Ok(());
        }
        if root_is_gone(paths) {
            return Err(ServicesError::Io {
                what: format!(
                    "the cgroup root {} was removed (its cgroup {} is gone; a directory made there since is another cgroup, without the programs): nothing is enforced below it any more, so the follower stops; `segbpf detach --services` removes what is left, `attach --services` enforces again",
                    paths.root.dir.display(),
                    paths.root.id
                ),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
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
            relink_detached(paths, &mut relink_failed, &mut on_event);
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
    use super::flock_holder;

    const LOCKS: &str = "\
1: POSIX  ADVISORY  WRITE 501 08:01:77 0 EOF
2: FLOCK  ADVISORY  WRITE 4242 00:2a:1234 0 EOF
3: FLOCK  ADVISORY  WRITE 77 00:2a:12345 0 EOF
4: OFDLCK ADVISORY  READ  -1 00:2a:999 0 EOF
";

    #[test]
    fn the_holder_of_the_file_is_named() {
        let dev = libc::makedev(0, 0x2a);
        assert_eq!(flock_holder(LOCKS, dev, 1234), Some(4242));
        assert_eq!(flock_holder(LOCKS, dev, 12345), Some(77));
        // Same inode on another device, a POSIX or OFD lock: not a claim.
        assert_eq!(flock_holder(LOCKS, libc::makedev(8, 1), 1234), None);
        assert_eq!(flock_holder(LOCKS, libc::makedev(8, 1), 77), None);
        assert_eq!(flock_holder(LOCKS, dev, 999), None);
        assert_eq!(flock_holder("", dev, 1234), None);
    }

    #[test]
    fn a_holder_without_pid_is_still_a_holder() {
        let dev = libc::makedev(0, 0x2a);
        let locks = "9: FLOCK  ADVISORY  WRITE 0 00:2a:5 0 EOF\n";
        assert_eq!(flock_holder(locks, dev, 5), Some(0));
    }
}
