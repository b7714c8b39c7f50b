//! Directories segbpf makes for its state, history and pins: private to
//! the user running segbpf (normally root), so no other local user can
//! read its files or take its locks.

use std::path::{Path, PathBuf};

/// Default bpffs directory for segbpf's pins.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/segbpf";
/// Default directory for state files.
pub const DEFAULT_STATE_DIR: &str = "/run/segbpf";

/// The pin root (`$SEGBPF_BPFFS`) and the state root
/// (`$SEGBPF_STATE_DIR`), or their defaults.
pub fn roots_from_env() -> [PathBuf; 2] {
    let var = |name: &str, default: &str| {
        std::env::var_os(name).map_or_else(|| PathBuf::from(default), PathBuf::from)
    };
    [
        var("SEGBPF_BPFFS", DEFAULT_BPFFS),
        var("SEGBPF_STATE_DIR", DEFAULT_STATE_DIR),
    ]
}

/// Makes `dir` and any missing parents with mode 0700, then checks that
/// `dir` belongs to the effective user and that no other user can write
/// in it, and sets its mode to 0700 (a directory left by an older
/// version, or made by someone else, is refused rather than trusted). A
/// directory others can write (`/tmp`, mode 1777) is refused as it is,
/// never made private: another user may already have put files in it
/// (a lock segbpf would take as held, a symlink it would write through),
/// and changing a shared directory's mode would break its other users.
///
/// A refused directory that this call made (and any parents it made) is
/// removed again while still empty: a refusal leaves nothing behind.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    // The directories this call makes, deepest first.
    let made: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && std::fs::symlink_metadata(a).is_err())
        .map(Path::to_path_buf)
        .collect();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let checked = check_private(dir);
    if checked.is_err() {
        for d in &made {
            // Only an empty directory goes (`rmdir`): never what another
            // user may have put in it meanwhile.
            if std::fs::remove_dir(d).is_err() {
                break;
            }
        }
    }
    checked
}

/// The checks of [`private_dir`] on `dir`, which exists.
fn check_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let me = nix::unistd::geteuid().as_raw();
    // The directory and, when it is below the state or pin root, every
    // directory from that root down to it: another user's directory (or
    // symlink) on the way could be swapped for anything.
    let roots = roots_from_env();
    if let Some(root) = roots.iter().find(|r| dir.starts_with(r)) {
        for a in dir.ancestors().skip(1) {
            if !a.starts_with(root) {
                break;
            }
            only_mine(a, me)?;
        }
        trusted_path(root, me)?;
    }
    let mode = only_mine(dir, me)?;
    if mode & 0o777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Checks every directory above `root` up to `/`, and every symbolic link
/// on the way and where it leads: each must belong to root or uid `me`,
/// and a directory may be writable by others only with the sticky bit
/// (`/tmp`: then only its owner may rename what is in it, and the entry
/// below is checked in turn). Otherwise another user could rename the
/// state or pin root away and put their own in its place.
fn trusted_path(root: &Path, me: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let abs = if root.is_absolute() {
        root.to_path_buf()
    } else {
        std::env::current_dir()?.join(root)
    };
    // The path as written: who may replace each directory or symbolic
    // link on it, and, for a link, the real directories it leads to.
    for a in abs.ancestors().skip(1) {
        let meta = std::fs::symlink_metadata(a)?;
        if meta.file_type().is_symlink() {
            if meta.uid() != 0 && meta.uid() != me {
                return Err(unsafe_place(
                    root,
                    a,
                    format!("belongs to uid {}", meta.uid()),
                ));
            }
            trusted_real(root, &std::fs::canonicalize(a)?, me)?;
            continue;
        }
        safe_dir(root, a, &meta, me)?;
    }
    // The real directories above the root itself (a root that is a
    // symbolic link, or below one).
    let real = std::fs::canonicalize(&abs)?;
    match real.parent() {
        Some(parent) => trusted_real(root, parent, me),
        None => Ok(()),
    }
}

/// [`safe_dir`] for `real`, a path without symbolic links, and every
/// directory above it.
fn trusted_real(root: &Path, real: &Path, me: u32) -> std::io::Result<()> {
    for a in real.ancestors() {
        let meta = std::fs::symlink_metadata(a)?;
        safe_dir(root, a, &meta, me)?;
    }
    Ok(())
}

/// A directory `a` above the state or pin root `root` is safe when it
/// belongs to root or uid `me` and other users cannot write in it, or
/// only with the sticky bit.
fn safe_dir(root: &Path, a: &Path, meta: &std::fs::Metadata, me: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    if meta.uid() != 0 && meta.uid() != me {
        return Err(unsafe_place(
            root,
            a,
            format!("belongs to uid {}", meta.uid()),
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(unsafe_place(
            root,
            a,
            format!("can be written by other users (mode {mode:04o}, no sticky bit)"),
        ));
    }
    Ok(())
}

/// The refusal of `root` because of the directory or link `a` above it.
fn unsafe_place(root: &Path, a: &Path, why: String) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!(
            "{} is not a safe place for segbpf's state: {} {why}, so another user could replace it; use a directory whose every parent only root can write",
            root.display(),
            a.display()
        ),
    )
}

/// The mode of `dir` when it is no symlink, belongs to uid `me` and no
/// other user can write in it; an error naming why otherwise.
fn only_mine(dir: &Path, me: u32) -> std::io::Result<u32> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let refuse = |why: String| {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} {why}; refusing to keep state there", dir.display()),
        ))
    };
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.uid() != me {
        return refuse(format!(
            "belongs to uid {}, not to uid {me} that runs segbpf",
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if meta.file_type().is_symlink() {
        // Ours: follow it, and judge where it leads.
        let target = std::fs::metadata(dir)?;
        if target.uid() != me {
            return refuse(format!("leads to a directory of uid {}", target.uid()));
        }
        let mode = target.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 {
            return refuse(format!(
                "leads to a directory other users can write (mode {mode:04o}; files may have been put in it): use a directory only uid {me} can write"
            ));
        }
        return Ok(mode);
    }
    if mode & 0o022 != 0 {
        return refuse(format!(
            "can be written by other users (mode {mode:04o}; files may have been put in it): use a directory only uid {me} can write"
        ));
    }
    Ok(mode)
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
