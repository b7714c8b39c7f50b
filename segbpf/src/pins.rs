//! Where an attachment lives: its bpffs pin directory (program, link, maps)
//! and its state file (policy path, roles, rule table) under /run.
//!
//! Layout, with `ROOT` = `$SEGBPF_BPFFS` (default `/sys/fs/bpf/segbpf`) and
//! `STATE` = `$SEGBPF_STATE_DIR` (default `/run/segbpf`):
//! - `ROOT/ifaces/IFACE/` for interfaces of the initial network namespace,
//!   `ROOT/netns/NAME/IFACE/` with `--netns NAME`;
//!   inside: `prog_xdp`, `link_xdp`, `prog_tc`, `link_tc` and one file per
//!   map (`SEG_*`);
//! - `STATE/ifaces/IFACE.json` or `STATE/netns/NAME/IFACE.json`.
//!
//! Every directory segbpf makes is private ([`private_dir`]: mode 0700,
//! owned by the user running segbpf, normally root) and `segbpf` runs with
//! umask 077, so its state, history, lock files and pins are 0600: no other
//! local user can read them or take their locks.

use std::path::{Path, PathBuf};

/// Default bpffs directory for segbpf's pins.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/segbpf";
/// Default directory for state files.
pub const DEFAULT_STATE_DIR: &str = "/run/segbpf";

/// The two roots: bpffs directory for pins and directory for state files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Roots {
    /// bpffs directory (`$SEGBPF_BPFFS`, default [`DEFAULT_BPFFS`]).
    pub bpffs: PathBuf,
    /// State directory (`$SEGBPF_STATE_DIR`, default [`DEFAULT_STATE_DIR`]).
    pub state: PathBuf,
}

impl Roots {
    /// Roots from the environment, or the defaults.
    pub fn from_env() -> Self {
        let var = |name: &str, default: &str| {
            std::env::var_os(name)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(default))
        };
        Roots {
            bpffs: var("SEGBPF_BPFFS", DEFAULT_BPFFS),
            state: var("SEGBPF_STATE_DIR", DEFAULT_STATE_DIR),
        }
    }

    /// The attachment of `iface` (in `netns`, if given).
    pub fn attachment(&self, iface: &str, netns: Option<&str>) -> Attachment {
        let (dir, state) = match netns {
            None => (
                self.bpffs.join("ifaces").join(iface),
                self.state.join("ifaces"),
            ),
            Some(ns) => (
                self.bpffs.join("netns").join(ns).join(iface),
                self.state.join("netns").join(ns),
            ),
        };
        Attachment {
            iface: iface.to_string(),
            netns: netns.map(str::to_string),
            dir,
            state: state.join(format!("{iface}.json")),
            bpffs_root: self.bpffs.clone(),
        }
    }

    /// Every attachment that has a pin directory (of `netns`, if given).
    pub fn list(&self, netns: Option<&str>) -> Vec<Attachment> {
        let parent = match netns {
            None => self.bpffs.join("ifaces"),
            Some(ns) => self.bpffs.join("netns").join(ns),
        };
        let mut names: Vec<String> = std::fs::read_dir(&parent)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names.iter().map(|n| self.attachment(n, netns)).collect()
    }

    /// Makes sure a bpffs is mounted at `/sys/fs/bpf` when the pin root is
    /// under it, and creates the pin root.
    pub fn ensure_bpffs(&self) -> std::io::Result<()> {
        let base = Path::new("/sys/fs/bpf");
        if self.bpffs.starts_with(base) && !is_bpffs(base) {
            nix::mount::mount(
                Some("bpf"),
                base,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(std::io::Error::from)?;
        }
        private_dir(&self.bpffs)
    }
}

/// The paths of one attachment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// Interface name.
    pub iface: String,
    /// Network namespace name (`--netns`), if any.
    pub netns: Option<String>,
    /// Pin directory.
    pub dir: PathBuf,
    /// State file.
    pub state: PathBuf,
    /// The bpffs root (empty parent directories are removed up to and including it).
    pub bpffs_root: PathBuf,
}

impl Attachment {
    /// The attachment of `iface` under the roots from the environment.
    pub fn new(iface: &str, netns: Option<&str>) -> Self {
        Roots::from_env().attachment(iface, netns)
    }

    /// Pin path of a map.
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Pin path of the XDP program.
    pub fn prog_xdp(&self) -> PathBuf {
        self.dir.join("prog_xdp")
    }

    /// Pin path of the XDP link.
    pub fn link_xdp(&self) -> PathBuf {
        self.dir.join("link_xdp")
    }

    /// Pin path of the TC egress program.
    pub fn prog_tc(&self) -> PathBuf {
        self.dir.join("prog_tc")
    }

    /// Pin path of the TC egress (TCX) link.
    pub fn link_tc(&self) -> PathBuf {
        self.dir.join("link_tc")
    }

    /// Whether the attachment exists (its link is pinned).
    pub fn is_attached(&self) -> bool {
        self.link_xdp().exists()
    }

    /// Removes the pin directory and state file (detaching the program when
    /// no process holds the link). Missing files are not an error.
    pub fn remove(&self) -> std::io::Result<()> {
        remove_dir_if_exists(&self.dir)?;
        match std::fs::remove_file(&self.state) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        for ext in ["next.json", "reader.lock", "update.lock", "confirm.json"] {
            let _ = std::fs::remove_file(self.state.with_extension(ext));
        }
        // An empty per-netns state directory goes too.
        if self.netns.is_some()
            && let Some(dir) = self.state.parent()
        {
            let _ = std::fs::remove_dir(dir);
        }
        // Tidy empty parents up to the root; remove_dir fails on non-empty ones.
        let mut parent = self.dir.parent();
        while let Some(p) = parent {
            if !p.starts_with(&self.bpffs_root) || std::fs::remove_dir(p).is_err() {
                break;
            }
            parent = p.parent();
        }
        Ok(())
    }
}

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

fn remove_dir_if_exists(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    // The field's integer type differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC)
        .unwrap_or(false)
}
