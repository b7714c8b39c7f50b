//! Which network namespace a command runs in, as the kernel says.
//!
//! An attachment is (network namespace, interface). Interface names repeat
//! across namespaces (every container has an `eth0`), so segbpf never keys
//! anything by a name it was told: it asks the kernel.
//! - The **inode** of `/proc/thread-self/ns/net` keys the pin, state and
//!   history directories (`net/INODE/`). It is what `lsns`, `ip netns
//!   identify` and `readlink /proc/PID/ns/net` show, and it is unique among
//!   live namespaces.
//! - The **cookie** (`SO_NETNS_COOKIE`, 64 bits, never reused while the
//!   system runs) is stored with the state, so files left by a namespace that
//!   is gone are never taken for a live attachment of a newer namespace that
//!   happens to get the same inode.
//! - The **label** is for people only: the `ip netns` name whose
//!   `/run/netns/NAME` is this namespace, `host` for the initial namespace.
//!
//! The same commands therefore find the same attachment whether they were
//! started with `--netns NAME`, `ip netns exec NAME`, `nsenter --net=...`,
//! or from inside a container.

use std::{os::fd::AsFd as _, os::unix::fs::MetadataExt as _, path::Path};

/// The kernel's fixed inode of the initial network namespace (`PROC_NET_INIT_INO`).
pub const INIT_NET_INODE: u64 = 0xEFFF_FFF9;
/// The kernel's fixed inode of the initial mount namespace (`PROC_MNT_INIT_INO`).
pub const INIT_MNT_INODE: u64 = 0xEFFF_FFF8;

/// Errors finding or entering a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A `--netns` name that cannot be a name under /run/netns.
    #[error("invalid network namespace name {0:?}")]
    InvalidName(String),
    /// `/run/netns/NAME` could not be opened.
    #[error("network namespace {name} (/run/netns/{name}): {source}")]
    Open {
        /// The name.
        name: String,
        /// Why.
        source: std::io::Error,
    },
    /// setns(2) failed.
    #[error("entering network namespace {name}: {source}")]
    Enter {
        /// The name.
        name: String,
        /// Why.
        source: nix::Error,
    },
    /// The calling thread's namespace could not be read.
    #[error("reading this thread's network namespace ({what}): {source}")]
    Identify {
        /// What was read.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// A network namespace, identified by the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    /// Inode of the namespace (nsfs), the key of segbpf's directories.
    pub inode: u64,
    /// `SO_NETNS_COOKIE`: unique for the life of the system.
    pub cookie: u64,
    /// A name for people: the `ip netns` name, `host`, or none.
    pub label: Option<String>,
}

impl Netns {
    /// The namespace the calling thread is in.
    pub fn current() -> Result<Netns, NetnsError> {
        let inode = std::fs::metadata("/proc/thread-self/ns/net")
            .map_err(|source| NetnsError::Identify {
                what: "/proc/thread-self/ns/net",
                source,
            })?
            .ino();
        let cookie = cookie().map_err(|source| NetnsError::Identify {
            what: "SO_NETNS_COOKIE",
            source,
        })?;
        Ok(Netns {
            inode,
            cookie,
            label: label_of(inode, Path::new("/run/netns")),
        })
    }

    /// The namespace `/run/netns/NAME` (as made by `ip netns add`), read
    /// from a short-lived thread that enters it: the calling thread stays
    /// where it is.
    pub fn named(name: &str) -> Result<Netns, NetnsError> {
        let name = name.to_string();
        std::thread::spawn(move || {
            enter(&name)?;
            Netns::current()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(NetnsError::Identify {
                what: "a thread entering the namespace",
                source: std::io::Error::other("panicked"),
            })
        })
    }

    /// The global `--netns NAME` option that selects this namespace in a
    /// command line for people (` --netns NAME`), when it has an `ip netns`
    /// name; empty otherwise (run the command in the same namespace).
    pub fn cli_option(&self) -> String {
        match &self.label {
            Some(l) if !self.is_initial() => format!(" --netns {l}"),
            _ => String::new(),
        }
    }

    /// The directory name that keys this namespace's files: its inode.
    pub fn key(&self) -> String {
        self.inode.to_string()
    }

    /// How messages name the namespace: `netns NAME` or `netns net:[INODE]`.
    pub fn describe(&self) -> String {
        match &self.label {
            Some(l) => format!("netns {l}"),
            None => format!("netns net:[{}]", self.inode),
        }
    }

    /// Whether this is the initial network namespace.
    pub fn is_initial(&self) -> bool {
        self.inode == INIT_NET_INODE
    }
}

/// Moves the calling thread into the network namespace `/run/netns/NAME`
/// (as created by `ip netns add`). Call before starting any other thread.
pub fn enter(name: &str) -> Result<(), NetnsError> {
    if name.contains('/') || name.is_empty() || name == "." || name == ".." {
        return Err(NetnsError::InvalidName(name.to_string()));
    }
    let f =
        std::fs::File::open(format!("/run/netns/{name}")).map_err(|source| NetnsError::Open {
            name: name.to_string(),
            source,
        })?;
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| {
        NetnsError::Enter {
            name: name.to_string(),
            source,
        }
    })
}

/// Whether the calling thread is in the initial mount namespace (false
/// inside `ip netns exec`, which gives its command a private /sys, and in
/// most containers).
pub fn in_initial_mount_namespace() -> bool {
    let Ok(mine) = std::fs::metadata("/proc/thread-self/ns/mnt").map(|m| m.ino()) else {
        return false;
    };
    // Kernels since 6.15 give the initial namespace a fixed inode; older
    // ones are compared with PID 1's (readable by root on most hosts).
    mine == INIT_MNT_INODE || std::fs::metadata("/proc/1/ns/mnt").is_ok_and(|m| m.ino() == mine)
}

/// The namespace's cookie, from a socket made in it.
fn cookie() -> std::io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    // Any socket carries its namespace; a UNIX datagram socket needs no
    // address family to be configured.
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which is
    // a u64 of that size, on a descriptor we own.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

/// The label of the namespace with `inode`: the name of a bind mount in
/// `run_netns` that is that namespace, else `host` for the initial one.
fn label_of(inode: u64, run_netns: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(run_netns)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| std::fs::metadata(e.path()).is_ok_and(|m| m.ino() == inode))
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
        .into_iter()
        .next()
        .or_else(|| (inode == INIT_NET_INODE).then(|| "host".to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_matching_inodes_only() {
        let dir = std::env::temp_dir().join(format!("segbpf-netns-label-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("b-name");
        let b = dir.join("a-name");
        std::fs::write(&a, "").unwrap();
        std::fs::write(&b, "").unwrap();
        let ino = std::fs::metadata(&a).unwrap().ino();
        assert_eq!(label_of(ino, &dir).as_deref(), Some("b-name"));
        assert_eq!(label_of(1, &dir), None);
        assert_eq!(label_of(INIT_NET_INODE, &dir).as_deref(), Some("host"));
        assert_eq!(
            label_of(INIT_NET_INODE, &dir.join("missing")).as_deref(),
            Some("host")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_current_namespace_has_a_cookie_and_an_inode() {
        let ns = Netns::current().unwrap();
        assert_ne!(ns.inode, 0);
        assert_ne!(ns.cookie, 0);
        assert_eq!(Netns::current().unwrap(), ns);
    }
}
