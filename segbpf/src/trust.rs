//! Whether a policy file may be trusted to decide what the firewall lets
//! through, as sshd's `StrictModes` decides for `authorized_keys`: the file
//! must belong to root (or the user running segbpf) and be writable by
//! nobody else, and so must the directory that holds it, unless that
//! directory has the sticky bit (as /tmp has: others cannot replace a file
//! they do not own there). `attach --insecure-policy` overrides the check
//! for an attachment and its later reloads.

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

/// Why a policy file is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum UntrustedFile {
    /// The file or its directory cannot be inspected.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Owned by another user.
    #[error(
        "{path} belongs to uid {uid}: a policy file must belong to root (or the user running segbpf); \
         chown it, or attach with --insecure-policy"
    )]
    Owner {
        /// The path.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// Writable by others.
    #[error(
        "{path} is writable by {who} (mode {mode:04o}): anyone who can write it decides what this firewall \
         lets through; run `chmod go-w {path}`, or attach with --insecure-policy"
    )]
    Writable {
        /// The path.
        path: PathBuf,
        /// `group`, `others` or `group and others`.
        who: &'static str,
        /// Its permission bits.
        mode: u32,
    },
}

/// Checks `path` and the directory holding it (see the module docs).
pub fn check_policy_file(path: &Path) -> Result<(), UntrustedFile> {
    let file = std::fs::canonicalize(path).map_err(|source| UntrustedFile::Io {
        path: path.to_path_buf(),
        source,
    })?;
    check(&file, false)?;
    if let Some(dir) = file.parent() {
        check(dir, true)?;
    }
    Ok(())
}

fn check(path: &Path, is_dir: bool) -> Result<(), UntrustedFile> {
    let meta = std::fs::metadata(path).map_err(|source| UntrustedFile::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(UntrustedFile::Owner {
            path: path.to_path_buf(),
            uid: meta.uid(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    let sticky = mode & 0o1000 != 0;
    let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
        _ if is_dir && sticky => return Ok(()),
        (true, true) => "group and others",
        (true, false) => "group",
        (false, true) => "others",
        (false, false) => return Ok(()),
    };
    Err(UntrustedFile::Writable {
        path: path.to_path_buf(),
        who,
        mode,
    })
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

        assert!(matches!(
            check_policy_file(&dir.join("missing.toml")),
            Err(UntrustedFile::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
