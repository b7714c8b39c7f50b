//! Whether a policy file may be trusted to decide what the firewall lets
//! through, as sshd's `StrictModes` decides for `authorized_keys`: the file
//! and every directory on its path up to `/` must belong to root (or the
//! user running segbpf) and be writable by nobody else; a directory may be
//! writable by others only with the sticky bit (as /tmp: others cannot
//! replace an entry they do not own there). A symbolic link on the way must
//! belong to root (or that user) too, and the walk follows it, checking the
//! directories of its target the same way: whoever could rename a directory
//! anywhere on the path could swap the policy for another file. `attach
//! --insecure-policy` overrides the check for an attachment and its later
//! reloads.
//!
//! And whether a policy would cut the SSH session that applies it
//! ([`cuts_ssh_session`]): the other check before a change is put in force.

use std::{
    ffi::OsString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Component, Path, PathBuf},
};

/// Symbolic links followed before giving up (Linux's own limit).
const MAX_LINKS: u32 = 40;

/// Why a policy file is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum UntrustedFile {
    /// The file or a directory on its path cannot be inspected.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Owned by another user.
    #[error(
        "{path}{what} belongs to uid {uid}: a policy file and every directory above it must belong to root \
         (or the user running segbpf); chown it, or attach with --insecure-policy"
    )]
    Owner {
        /// The path.
        path: PathBuf,
        /// Empty for the file itself, else what `path` is to it.
        what: &'static str,
        /// Its owner.
        uid: u32,
    },
    /// Writable by others.
    #[error(
        "{path}{what} is writable by {who} (mode {mode:04o}): anyone who can write it decides what this firewall \
         lets through; run `chmod go-w {path}`, or attach with --insecure-policy"
    )]
    Writable {
        /// The path.
        path: PathBuf,
        /// Empty for the file itself, else what `path` is to it.
        what: &'static str,
        /// `group`, `others` or `group and others`.
        who: &'static str,
        /// Its permission bits.
        mode: u32,
    },
}

/// What a path on the way is to the policy file, for the messages.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Link,
}

impl Kind {
    fn what(self) -> &'static str {
        match self {
            Kind::File => "",
            Kind::Dir => " (a directory on the policy file's path)",
            Kind::Link => " (a symbolic link on the policy file's path)",
        }
    }
}

/// Checks `path`, every directory from it up to `/` and every symbolic link
/// on the way (see the module docs).
pub fn check_policy_file(path: &Path) -> Result<(), UntrustedFile> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| UntrustedFile::Io { path, source }
    };
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        // getcwd(3) names the directory without symbolic links.
        std::env::current_dir().map_err(io(path))?.join(path)
    };
    // Components still to walk, the next one last.
    let mut todo: Vec<OsString> = Vec::new();
    push_components(&mut todo, &abs);
    let mut at = PathBuf::from("/");
    let mut links = 0;
    while let Some(name) = todo.pop() {
        match name.to_str() {
            Some("/") => {
                at = PathBuf::from("/");
                let meta = std::fs::metadata(&at).map_err(io(&at))?;
                check(&at, &meta, Kind::Dir)?;
                continue;
            }
            Some(".") => continue,
            Some("..") => {
                // `at` never holds a symbolic link: its parent is its parent.
                at.pop();
                continue;
            }
            _ => {}
        }
        let next = at.join(&name);
        let meta = std::fs::symlink_metadata(&next).map_err(io(&next))?;
        if meta.file_type().is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                return Err(UntrustedFile::Io {
                    path: next,
                    source: std::io::Error::from_raw_os_error(nix::libc::ELOOP),
                });
            }
            check(&next, &meta, Kind::Link)?;
            let target = std::fs::read_link(&next).map_err(io(&next))?;
            push_components(&mut todo, &target);
            continue;
        }
        let kind = if todo.is_empty() {
            Kind::File
        } else {
            Kind::Dir
        };
        check(&next, &meta, kind)?;
        at = next;
    }
    Ok(())
}

/// Pushes `path`'s components so that the first is popped first (`/` for
/// an absolute path, which restarts the walk at the root).
fn push_components(todo: &mut Vec<OsString>, path: &Path) {
    for c in path.components().rev() {
        todo.push(match c {
            Component::RootDir | Component::Prefix(_) => OsString::from("/"),
            Component::CurDir => OsString::from("."),
            Component::ParentDir => OsString::from(".."),
            Component::Normal(n) => n.to_os_string(),
        });
    }
}

fn check(path: &Path, meta: &std::fs::Metadata, kind: Kind) -> Result<(), UntrustedFile> {
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(UntrustedFile::Owner {
            path: path.to_path_buf(),
            what: kind.what(),
            uid: meta.uid(),
        });
    }
    if kind == Kind::Link {
        // A link's own mode means nothing; who may replace it is decided
        // by the directory holding it, checked already.
        return Ok(());
    }
    let mode = meta.permissions().mode() & 0o7777;
    let sticky = mode & 0o1000 != 0;
    let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
        _ if kind == Kind::Dir && sticky => return Ok(()),
        (true, true) => "group and others",
        (true, false) => "group",
        (false, true) => "others",
        (false, false) => return Ok(()),
    };
    Err(UntrustedFile::Writable {
        path: path.to_path_buf(),
        what: kind.what(),
        who,
        mode,
    })
}

/// [`cuts_ssh_session`] of the policy in the file `path`; `None` when the
/// file does not load (attaching reports that error itself). The live
/// sessions are asked first: with none, the file is not parsed.
pub fn file_cuts_ssh_session(path: &Path, roles: &[String], iface: &str) -> Option<String> {
    let sessions = ssh_sessions();
    if sessions.is_empty() {
        return None;
    }
    let policy = crate::policy::Policy::load(path).ok()?;
    // What the policy does to each session first (pure); only for the
    // sessions it would cut, whether they come through `iface` at all.
    let cut = crate::policy::lint::ssh_sessions_cut(&policy, roles, iface, sessions);
    crate::host::netif::first_through(iface, cut)
}

/// A message when `policy`, for a host with `roles` on `iface`, would
/// block a live SSH session: the one this process runs in
/// (`SSH_CONNECTION`), and every session the kernel knows of in this
/// network namespace ([`kernel_ssh_sessions`]: established TCP
/// connections to a port an `sshd` listens on, or to port 22 when no
/// sshd is visible). The second is what makes the check hold for callers
/// that run in no session at all (the watcher of an `attach` under
/// systemd, the fleet agent): a variable of the caller's environment says
/// nothing about who is logged in. The interface's policy can cut a
/// session that reaches this host through `iface`: one whose server
/// address is one of the interface's, or whose client the kernel routes
/// to out of `iface` (an `RTM_GETROUTE` lookup of the client address, as
/// `ip route get` does: a session to another address of the host, routed
/// through this interface). When the route cannot be looked up, the
/// session is taken to go through `iface` (the check runs rather than
/// being skipped).
pub fn cuts_ssh_session(
    policy: &crate::policy::Policy,
    roles: &[String],
    iface: &str,
) -> Option<String> {
    let cut = crate::policy::lint::ssh_sessions_cut(policy, roles, iface, ssh_sessions());
    crate::host::netif::first_through(iface, cut)
}

/// The caller's `SSH_CONNECTION` and the kernel's sessions, once each.
fn ssh_sessions() -> Vec<Session> {
    let mut sessions: Vec<Session> = crate::policy::lint::ssh_connection().into_iter().collect();
    for s in kernel_ssh_sessions() {
        if !sessions.contains(&s) {
            sessions.push(s);
        }
    }
    sessions
}

/// Whether any SSH session is live: the caller's `SSH_CONNECTION`, or one
/// the kernel has ([`kernel_ssh_sessions`]). Cheap next to parsing a
/// policy, so callers ask it first.
pub fn any_ssh_session() -> bool {
    crate::policy::lint::ssh_connection().is_some() || !kernel_ssh_sessions().is_empty()
}

/// An SSH session: client address, client port, server address, server port.
pub type Session = (IpAddr, u16, IpAddr, u16);

/// The SSH sessions the kernel has in the network namespace this thread
/// runs in: established TCP connections (`/proc/thread-self/net/tcp` and
/// `tcp6`) whose local port is one that a process named `sshd` listens
/// on (its listening sockets found by inode among its open files), or
/// local port 22 when no sshd listens in this namespace (sshd not visible,
/// or run under another name). Loopback sessions are left out (they never
/// cross an interface). Nothing here comes from the caller's environment.
pub fn kernel_ssh_sessions() -> Vec<Session> {
    // The kernel's own count of the namespace's TCP sockets first: when it
    // says none (of either family), there is no session to find and the
    // walk of the whole established hash (262,144 buckets here, twice:
    // about 10 ms) is skipped. Any other answer, or none, walks.
    if tcp_sockets_in_use() == Some(0) {
        return Vec::new();
    }
    let tables: Vec<Vec<TcpEntry>> = ["tcp", "tcp6"]
        .iter()
        .map(|t| {
            std::fs::read_to_string(format!("/proc/thread-self/net/{t}"))
                .map(|text| parse_proc_tcp(&text))
                .unwrap_or_default()
        })
        .collect();
    let established = |e: &&TcpEntry| e.state == TCP_ESTABLISHED && !e.remote.0.is_loopback();
    if !tables.iter().flatten().any(|e| established(&e)) {
        // No session of any port: the scan of every process's files for
        // sshd's listening sockets could not change that.
        return Vec::new();
    }
    let sshd = sshd_socket_inodes();
    let mut ports: Vec<u16> = tables
        .iter()
        .flatten()
        .filter(|e| e.state == TCP_LISTEN && sshd.contains(&e.inode))
        .map(|e| e.local.1)
        .collect();
    if ports.is_empty() {
        ports.push(22);
    }
    sessions_of(tables.iter().flatten(), &ports)
}

/// The TCP sockets the kernel counts as in use in this thread's network
/// namespace (`TCP: inuse` of `/proc/thread-self/net/sockstat` plus
/// `TCP6: inuse` of `sockstat6`: every hashed socket, listening or
/// connected, is counted in one of them); None when either is missing or
/// not a count (a negative transient included).
fn tcp_sockets_in_use() -> Option<u64> {
    let inuse = |file: &str, proto: &str| -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/thread-self/net/{file}")).ok()?;
        inuse_of(&text, proto)
    };
    Some(inuse("sockstat", "TCP:")? + inuse("sockstat6", "TCP6:")?)
}

/// The `inuse` count on the line of `proto` (`TCP:` or `TCP6:`) of a
/// `sockstat` file: `TCP: inuse 3 orphan 0 tw 0 alloc 5 mem 1`.
fn inuse_of(text: &str, proto: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(proto))?;
    let mut words = line.split_whitespace().skip(1);
    while let Some(w) = words.next() {
        if w == "inuse" {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// The established connections of `entries` to one of `ports`, as sessions.
fn sessions_of<'a>(entries: impl Iterator<Item = &'a TcpEntry>, ports: &[u16]) -> Vec<Session> {
    entries
        .filter(|e| e.state == TCP_ESTABLISHED && ports.contains(&e.local.1))
        .filter(|e| !e.remote.0.is_loopback())
        .map(|e| (e.remote.0, e.remote.1, e.local.0, e.local.1))
        .collect()
}

const TCP_ESTABLISHED: u8 = 0x01;
const TCP_LISTEN: u8 = 0x0A;

/// One line of `/proc/net/tcp` or `tcp6`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct TcpEntry {
    local: (IpAddr, u16),
    remote: (IpAddr, u16),
    state: u8,
    inode: u64,
}

/// The entries of a `/proc/net/tcp{,6}` table (lines that do not parse
/// are skipped). Addresses are the kernel's words in host byte order,
/// printed in hex; IPv4-mapped IPv6 addresses are given as IPv4.
fn parse_proc_tcp(text: &str) -> Vec<TcpEntry> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(TcpEntry {
                local: hex_endpoint(f.get(1)?)?,
                remote: hex_endpoint(f.get(2)?)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// `0100007F:0016` (IPv4) or 32 hex digits (IPv6), then the port.
fn hex_endpoint(s: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b)).to_canonical()
        }
        _ => return None,
    };
    Some((ip, port))
}

/// The inodes of the sockets open in processes named `sshd` (by their
/// `comm`, which the kernel keeps), all of them readable by root.
fn sshd_socket_inodes() -> Vec<u64> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let dir = p.path();
        if !p
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        if std::fs::read_to_string(dir.join("comm")).map_or(true, |c| c.trim_end() != "sshd") {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(dir.join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && let Some(inode) = target
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse().ok())
            {
                out.push(inode);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockstat_inuse_is_read_from_its_protocol_line_only() {
        let v4 =
            "sockets: used 120\nTCP: inuse 3 orphan 0 tw 1 alloc 5 mem 1\nUDP: inuse 0 mem 0\n";
        assert_eq!(inuse_of(v4, "TCP:"), Some(3));
        assert_eq!(inuse_of(v4, "UDP:"), Some(0));
        let v6 = "TCP6: inuse 0\nUDP6: inuse 2\n";
        assert_eq!(inuse_of(v6, "TCP6:"), Some(0));
        // A negative transient or a missing line is no answer: walk.
        assert_eq!(inuse_of("TCP: inuse -1 orphan 0\n", "TCP:"), None);
        assert_eq!(inuse_of("UDP: inuse 0\n", "TCP:"), None);
    }

    #[test]
    fn proc_net_tcp_sessions_to_the_ssh_ports() {
        // A listener on :22, a session from 10.10.1.15:50022 to
        // 10.10.1.30:22, one on :2222, an outgoing connection to a
        // remote :22 and a loopback session; IPv6: a session to [fd00::1]:22.
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1
   1: 1E010A0A:0016 0F010A0A:C3A6 01 00000000:00000000 00:00000000 00000000     0        0 222 1
   2: 1E010A0A:08AE 0F010A0A:C3A7 01 00000000:00000000 00:00000000 00000000     0        0 333 1
   3: 1E010A0A:C3A8 0F010A0A:0016 01 00000000:00000000 00:00000000 00000000     0        0 444 1
   4: 0100007F:0016 0100007F:C3A9 01 00000000:00000000 00:00000000 00000000     0        0 555 1
";
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 000000FD000000000000000001000000:0016 000000FD000000000000000002000000:C3AA 01 00000000:00000000 00:00000000 00000000     0        0 666 1
";
        let mut e = parse_proc_tcp(v4);
        e.extend(parse_proc_tcp(v6));
        assert_eq!(e.len(), 6);
        assert_eq!(e[0].state, TCP_LISTEN);
        assert_eq!(e[0].inode, 111);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            sessions_of(e.iter(), &[22]),
            vec![
                (ip("10.10.1.15"), 50086, ip("10.10.1.30"), 22),
                (ip("fd00::2"), 50090, ip("fd00::1"), 22),
            ]
        );
        assert_eq!(
            sessions_of(e.iter(), &[2222]),
            vec![(ip("10.10.1.15"), 50087, ip("10.10.1.30"), 2222)]
        );
    }

    #[test]
    fn writable_files_and_directories_are_refused() {
        let dir = std::env::temp_dir().join(format!("segbpf-trust-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = dir.join("roles.toml");
        std::fs::write(&file, "version = 1\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(check_policy_file(&file).is_ok());

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = check_policy_file(&file).unwrap_err().to_string();
        assert!(
            e.contains("writable by group and others") && e.contains("0666"),
            "{e}"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_policy_file(&file).unwrap_err().to_string();
        assert!(e.contains("writable by group and others"), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(
            check_policy_file(&file).is_ok(),
            "a sticky directory is fine"
        );

        // Every directory up to `/` counts, and so does a link's target.
        let mid = dir.join("mid");
        let pol = mid.join("pol");
        std::fs::create_dir_all(&pol).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&pol, std::fs::Permissions::from_mode(0o755)).unwrap();
        let deep = pol.join("roles.toml");
        std::fs::write(&deep, "version = 1\n").unwrap();
        std::fs::set_permissions(&deep, std::fs::Permissions::from_mode(0o644)).unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink("mid/pol", &link).unwrap();
        let via_link = link.join("roles.toml");
        std::fs::set_permissions(&mid, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_policy_file(&deep).is_ok());
        assert!(check_policy_file(&via_link).is_ok());
        std::fs::set_permissions(&mid, std::fs::Permissions::from_mode(0o777)).unwrap();
        for p in [&deep, &via_link] {
            let e = check_policy_file(p).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("{} (a directory", mid.display()))
                    && e.contains("writable by group and others"),
                "{e}"
            );
        }
        // `..` after a link is the link target's parent, as the kernel has it.
        let dotdot = link.join("..").join("pol").join("roles.toml");
        assert!(check_policy_file(&dotdot).is_err());
        std::fs::set_permissions(&mid, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(check_policy_file(&deep).is_ok());
        assert!(check_policy_file(&dotdot).is_ok());
        // A loop of links ends.
        std::os::unix::fs::symlink("loop", dir.join("loop")).unwrap();
        assert!(matches!(
            check_policy_file(&dir.join("loop")),
            Err(UntrustedFile::Io { .. })
        ));

        assert!(matches!(
            check_policy_file(&dir.join("missing.toml")),
            Err(UntrustedFile::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
