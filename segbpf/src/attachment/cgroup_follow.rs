//! Following the cgroup tree while a services attachment is in force:
//! every cgroup made or removed below a guard is classified within
//! milliseconds (inotify), with a rescan every second as a backstop; a
//! hangup reloads the policy file. Until a new cgroup's entry is written
//! the programs hold its sockets (see [`crate::host::cgroups`]), so the delay is a delay
//! of service, never a gap.

use std::{
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use crate::{
    attachment::services::{self as engine, ServicesError, SvcMaps, SvcPaths},
    host::cgroups::Watcher,
    policy::Policy,
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
}

/// How often the tree is rescanned without an inotify event.
const RESCAN_EVERY: Duration = Duration::from_secs(1);

/// Follows the tree of the attachment at `paths` until `stop` is set or the
/// attachment is gone (detached). `hup` set: reload `policy_path` (checked
/// like at attach unless `insecure_policy`).
pub fn follow(
    paths: &SvcPaths,
    policy_path: &Path,
    audit: bool,
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
    // None: rescan at the next turn.
    let mut last: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Relaxed) || !paths.is_attached() {
            return Ok(());
        }
        if hup.swap(false, Ordering::Relaxed) {
            let trusted = if insecure_policy {
                Ok(())
            } else {
                crate::attachment::trust::check_policy_file(policy_path).map_err(|e| e.to_string())
            };
            let applied = trusted
                .and_then(|()| Policy::load(policy_path).map_err(|e| e.to_string()))
                .and_then(|p| {
                    engine::reload(paths, &p, policy_path, audit).map_err(|e| e.to_string())
                });
            match applied {
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
        if watcher.wait(Duration::from_millis(200)) {
            let (written, removed) = engine::rescan(paths, &mut maps)?;
            if written + removed > 0 {
                on_event(FollowEvent::Rescanned { written, removed });
            }
        }
    }
}
