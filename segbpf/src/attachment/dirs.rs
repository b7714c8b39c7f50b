//! Directories segbpf makes for its state, history and pins: private to
//! the user running segbpf (normally root), so no other local user can
//! read its files or take its locks.

use std::path::Path;

/// Makes `dir` and any missing parents with mode 0700, then checks that
/// `dir` belongs to the effective user and sets its mode to 0700 (a
/// directory left by an older version, or made by someone else, is
/// refused rather than trusted).
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} belongs to uid {}, not to uid {me} that runs segbpf; refusing to keep state there",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    if meta.permissions().mode() & 0o777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Takes an exclusive `flock` on `f`, the file or directory at `path`.
/// When it is held elsewhere for more than a second, a warning on stderr
/// names the holder from the kernel's lock table (`/proc/locks`). Waits
/// for as long as the holder runs as root; a holder that does not (any
/// local user may open some of these directories) is waited for at most
/// `other_for`, then `Ok(false)` is returned without the lock.
pub fn lock_noting_holder(
    f: &std::fs::File,
    path: &Path,
    what: &str,
    other_for: Option<std::time::Duration>,
) -> std::io::Result<bool> {
    use std::time::{Duration, Instant};
    let start = Instant::now();
    let mut said = false;
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(true),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        let waited = start.elapsed();
        if waited >= Duration::from_secs(1) {
            let holder = flock_holder(path);
            if !said {
                said = true;
                tracing::warn!(
                    "{what}: waiting for the lock on {}, held by {}",
                    path.display(),
                    holder.as_ref().map_or_else(
                        || "a process this PID namespace does not show".to_string(),
                        LockHolder::describe
                    )
                );
            }
            if let Some(limit) = other_for
                && waited >= limit
                && holder.as_ref().is_none_or(|h| h.uid != Some(0))
            {
                return Ok(false);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process that holds a `flock`, from `/proc/locks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    /// Its PID.
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`).
    pub comm: Option<String>,
    /// Its effective uid (`/proc/PID/status`).
    pub uid: Option<u32>,
}

impl LockHolder {
    /// "process PID (COMM, uid UID)".
    pub fn describe(&self) -> String {
        format!(
            "process {} ({}, uid {})",
            self.pid,
            self.comm.as_deref().unwrap_or("?"),
            self.uid.map_or_else(|| "?".to_string(), |u| u.to_string())
        )
    }
}

/// The holder of a `flock` on the file at `path`, from the kernel's lock
/// table; `None` when none is listed or the kernel names no PID here.
pub fn flock_holder(path: &Path) -> Option<LockHolder> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let pid = holder_pid(&locks, meta.dev(), meta.ino())?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim().to_string());
    let uid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|u| u.parse().ok())
        });
    Some(LockHolder { pid, comm, uid })
}

/// The PID holding (not waiting for) a `flock` on `dev`/`ino` in `locks`,
/// the text of `/proc/locks`.
fn holder_pid(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; a waiter's line
    // reads "1: -> FLOCK ...".
    let file = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        let w: Vec<&str> = line.split_whitespace().collect();
        (w.get(1) == Some(&"FLOCK") && w.get(5) == Some(&file.as_str()))
            .then(|| w.get(4).and_then(|p| p.parse().ok()))
            .flatten()
            .filter(|p| *p != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_read_from_the_lock_table_not_a_waiter() {
        let dev = libc::makedev(0, 0x2e);
        let locks = "1: -> FLOCK  ADVISORY  WRITE 99 00:2e:77 0 EOF\n2: FLOCK  ADVISORY  WRITE 1234 00:2e:77 0 EOF\n3: FLOCK  ADVISORY  WRITE 5 00:2e:78 0 EOF\n";
        assert_eq!(holder_pid(locks, dev, 77), Some(1234));
        assert_eq!(holder_pid(locks, dev, 78), Some(5));
        assert_eq!(holder_pid(locks, dev, 79), None);
    }
}
