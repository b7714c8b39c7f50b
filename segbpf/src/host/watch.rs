//! Following a policy file with inotify, for the watcher of a running
//! `attach` ([`crate::attach::watch_policy`]).
//!
//! The file's *directory* is watched, not the file: editors and
//! configuration tools replace a file by writing a new one and renaming it
//! over the old (`IN_MOVED_TO`), which a watch on the old inode would never
//! see. Only the end of a write counts: `IN_CLOSE_WRITE` (a writer closed
//! the file) or the rename into place, never `IN_MODIFY`, so a file is not
//! read while a writer is still writing it. Events for other names in the
//! directory are ignored. After a change the watcher waits until no other
//! change of the file has come for [`QUIET`] (a tool that writes the file
//! in several steps), then reports once. A file that still does not parse
//! is refused by the reload, which keeps the policy in force; the next
//! change is tried again.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    time::Duration,
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;

/// How long a file must stay unchanged after a change before it is read.
pub const QUIET: Duration = Duration::from_millis(30);

/// The inotify instance, as tokio polls it.
struct Fd(Inotify);

impl std::os::fd::AsRawFd for Fd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd as _;
        self.0.as_fd().as_raw_fd()
    }
}

/// An inotify watch on the directory of one file.
pub struct FileWatch {
    fd: AsyncFd<Fd>,
    dir: PathBuf,
    name: OsString,
    wd: WatchDescriptor,
    /// A change was seen and not reported yet. Kept here, not in
    /// [`FileWatch::changed`]'s future, so a caller that drops that future
    /// (a `select!` whose other branch won) loses no change: the events
    /// are already read, and the next call reports them.
    pending: bool,
}

fn split(file: &Path) -> std::io::Result<(PathBuf, OsString)> {
    let name = file.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: not a file name", file.display()),
        )
    })?;
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name.to_os_string()))
}

fn flags() -> AddWatchFlags {
    AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_MODIFY
}

impl FileWatch {
    /// Watches `file` (through its directory). Needs a tokio runtime.
    pub fn new(file: &Path) -> std::io::Result<Self> {
        let (dir, name) = split(file)?;
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let wd = inotify.add_watch(&dir, flags())?;
        Ok(FileWatch {
            // SAFETY: `Fd` owns the inotify descriptor (an `OwnedFd` inside
            // `Inotify`) for as long as the `AsyncFd` holds it, and returns
            // that same descriptor on every call.
            fd: unsafe { AsyncFd::register(Fd(inotify)) }.map_err(std::io::Error::from)?,
            dir,
            name,
            wd,
            pending: false,
        })
    }

    /// The file watched.
    pub fn file(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    /// Follows `file` from now on, if it is not the file watched already.
    pub fn retarget(&mut self, file: &Path) -> std::io::Result<()> {
        let (dir, name) = split(file)?;
        if dir != self.dir {
            let wd = self.fd.get_ref().0.add_watch(&dir, flags())?;
            let _ = self.fd.get_ref().0.rm_watch(self.wd);
            self.wd = wd;
            self.dir = dir;
        }
        self.name = name;
        Ok(())
    }

    /// Reads what is queued: (the file was written or replaced, the file is
    /// being written).
    fn drain(&self) -> std::io::Result<(bool, bool)> {
        let (mut done, mut writing) = (false, false);
        loop {
            match self.fd.get_ref().0.read_events() {
                Ok(events) => {
                    for e in events {
                        if e.wd != self.wd || e.name.as_deref() != Some(self.name.as_os_str()) {
                            continue;
                        }
                        if e.mask.intersects(
                            AddWatchFlags::IN_CLOSE_WRITE
                                | AddWatchFlags::IN_MOVED_TO
                                | AddWatchFlags::IN_ATTRIB,
                        ) {
                            done = true;
                        } else {
                            writing = true;
                        }
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => return Ok((done, writing)),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Waits until the file was written (a writer closed it) or replaced,
    /// and then for [`QUIET`] without a further change to it. Cancel-safe:
    /// a change seen by a call whose future was dropped is reported by the
    /// next call.
    pub async fn changed(&mut self) -> std::io::Result<()> {
        loop {
            if self.pending {
                // Wait for quiet: any event for the file starts it again.
                match tokio::time::timeout(QUIET, self.fd.readable()).await {
                    Err(_) => {
                        self.pending = false;
                        return Ok(());
                    }
                    Ok(guard) => {
                        let mut guard = guard?;
                        let (done, writing) = self.drain()?;
                        guard.clear_ready();
                        if writing && !done {
                            // Still being written: wait for its close.
                            self.pending = false;
                        }
                    }
                }
            } else {
                let mut guard = self.fd.readable().await?;
                let (done, _) = self.drain()?;
                guard.clear_ready();
                self.pending = done;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("segbpf-watch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Whether `changed` reports within `within`.
    async fn reports(w: &mut FileWatch, within: Duration) -> bool {
        tokio::time::timeout(within, w.changed()).await.is_ok()
    }

    #[test]
    fn a_write_and_a_rename_over_are_seen_other_files_are_not() {
        let d = dir("seen");
        let file = d.join("p.toml");
        std::fs::write(&file, "a").unwrap();
        rt().block_on(async {
            let mut w = FileWatch::new(&file).unwrap();
            std::fs::write(d.join("other.toml"), "x").unwrap();
            assert!(!reports(&mut w, Duration::from_millis(200)).await);
            std::fs::write(&file, "b").unwrap();
            assert!(reports(&mut w, Duration::from_secs(2)).await);
            // An editor's save: a new file renamed over the old one.
            let tmp = d.join(".p.toml.swp");
            std::fs::write(&tmp, "c").unwrap();
            std::fs::rename(&tmp, &file).unwrap();
            assert!(reports(&mut w, Duration::from_secs(2)).await);
            assert!(!reports(&mut w, Duration::from_millis(200)).await);
        });
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_file_held_open_for_writing_is_not_reported_until_closed() {
        use std::io::Write as _;
        let d = dir("half");
        let file = d.join("p.toml");
        std::fs::write(&file, "a").unwrap();
        rt().block_on(async {
            let mut w = FileWatch::new(&file).unwrap();
            let mut f = std::fs::File::create(&file).unwrap();
            f.write_all(b"version = ").unwrap();
            f.flush().unwrap();
            assert!(
                !reports(&mut w, Duration::from_millis(300)).await,
                "reported a half-written file"
            );
            f.write_all(b"1\n").unwrap();
            drop(f);
            assert!(reports(&mut w, Duration::from_secs(2)).await);
        });
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// The running attach polls `changed` in a `select!` with a 2 s tick:
    /// a tick during the quiet period drops the future after it read the
    /// events. The next call must still report the change (it was lost,
    /// and the file never applied, before the state moved into the watch).
    #[test]
    fn a_change_seen_by_a_dropped_call_is_reported_by_the_next() {
        let d = dir("cancel");
        let file = d.join("p.toml");
        std::fs::write(&file, "a").unwrap();
        rt().block_on(async {
            let mut w = FileWatch::new(&file).unwrap();
            std::fs::write(&file, "b").unwrap();
            // Dropped within the quiet period, after the events were read.
            assert!(!reports(&mut w, QUIET / 3).await);
            assert!(
                reports(&mut w, Duration::from_secs(2)).await,
                "the change was lost with the dropped call"
            );
            assert!(!reports(&mut w, Duration::from_millis(200)).await);
        });
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn retarget_follows_a_file_in_another_directory() {
        let (d1, d2) = (dir("r1"), dir("r2"));
        let (f1, f2) = (d1.join("p.toml"), d2.join("q.toml"));
        std::fs::write(&f1, "a").unwrap();
        std::fs::write(&f2, "a").unwrap();
        rt().block_on(async {
            let mut w = FileWatch::new(&f1).unwrap();
            w.retarget(&f2).unwrap();
            assert_eq!(w.file(), f2);
            std::fs::write(&f1, "b").unwrap();
            assert!(!reports(&mut w, Duration::from_millis(200)).await);
            std::fs::write(&f2, "b").unwrap();
            assert!(reports(&mut w, Duration::from_secs(2)).await);
        });
        std::fs::remove_dir_all(&d1).unwrap();
        std::fs::remove_dir_all(&d2).unwrap();
    }
}
