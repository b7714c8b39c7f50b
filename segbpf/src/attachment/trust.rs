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

/// The `ssh-session` lint for a policy about to be put in force on `iface`
/// (of the current network namespace) for a host with `roles`: a message
/// when it would block the SSH session this process runs in. The
/// interface's policy can cut a session that reaches this host through
/// `iface`: one whose server address is one of the interface's, or whose
/// client the kernel routes to out of `iface` (an `RTM_GETROUTE` lookup of
/// the client address, as `ip route get` does: a session to another
/// address of the host, routed through this interface). When the route
/// cannot be looked up, the session is taken to go through `iface` (the
/// check runs rather than being skipped).
pub fn cuts_ssh_session(
    policy: &crate::policy::Policy,
    roles: &[String],
    iface: &str,
) -> Option<String> {
    let (client, _, server, _) = crate::policy::lint::ssh_connection()?;
    // What the policy does to the session first (pure), then whether the
    // session comes through `iface` at all (the kernel's addresses and
    // routes).
    let cut = crate::policy::lint::ssh_session(policy, roles, Some(iface))?;
    let on_iface = crate::host::netif::addresses(iface).is_ok_and(|a| a.contains(&server));
    let through = match crate::host::netif::route_oif(client) {
        Ok(Some(oif)) => crate::host::netif::ifindex(iface).is_ok_and(|i| i == oif),
        Ok(None) => false,
        Err(e) => {
            tracing::debug!("looking up the route to the SSH client {client}: {e}");
            true
        }
    };
    (on_iface || through).then_some(cut)
}

#[cfg(test)]
mod tests {
    use super::*;

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
