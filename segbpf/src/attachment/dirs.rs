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
