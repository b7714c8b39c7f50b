//! segbpf's files are root's alone, and the policy must be too.
//!
//! * Run as `nobody`, no file or directory that segbpf keeps for an
//!   attachment (state, history, lock files, pins) can be opened or
//!   listed, so no local user can read the state or take a lock that
//!   `reload`, `set`, the guard or the event reader wait for.
//! * A policy file writable by group or others is refused at attach, and
//!   so is one in a directory others can write (without the sticky bit),
//!   changing nothing in the kernel; `--insecure-policy` overrides it.
//! * So is one below a directory another user owns anywhere up to `/`:
//!   that user could swap the policy's directory for a symbolic link. A
//!   reload (by hand or automatic) refuses it too, naming the directory,
//!   and the policy in force stays.
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::{os::unix::fs::PermissionsExt as _, os::unix::process::CommandExt as _, path::Path};

use segbpf_tests::Lab;

/// uid/gid of `nobody` / `nogroup` on Debian.
const NOBODY: u32 = 65534;

fn example() -> String {
    format!("{}/../examples/roles.toml", env!("CARGO_MANIFEST_DIR"))
}

/// Every path under `root` (itself included).
fn walk(root: &Path, out: &mut Vec<std::path::PathBuf>) {
    out.push(root.to_path_buf());
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn nobody_can_open_no_file_segbpf_keeps() -> anyhow::Result<()> {
    let mut lab = Lab::new("perm")?;
    lab.add_host("db", &["198.18.70.30/24"])?;
    lab.attach("db", &example(), &["--role", "db"])?;
    // A reload makes the update lock and the history's second entry.
    lab.segbpf_ok("db", &["reload", "eth0"])?;
    let mut paths = Vec::new();
    walk(&lab.state, &mut paths);
    walk(&lab.bpffs, &mut paths);
    let files = paths.iter().filter(|p| p.is_file()).count();
    assert!(files >= 15, "only {files} files under the roots: {paths:?}");
    assert!(
        paths
            .iter()
            .any(|p| p.to_string_lossy().ends_with("update.lock")),
        "no update lock among {paths:?}"
    );
    for root in [&lab.state, &lab.bpffs] {
        let mode = std::fs::metadata(root)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} has mode {mode:o}", root.display());
    }
    // As nobody (its own group; the test runs as root, whose supplementary
    // groups stay, but none of segbpf's files grants anything to a group):
    // try to read, write and list every path.
    let mut script = String::from("for p in \"$@\"; do\n");
    script.push_str("  if [ -d \"$p\" ]; then ls \"$p\" >/dev/null 2>&1 && echo \"listed $p\";\n");
    script.push_str("  else (exec 3<\"$p\") 2>/dev/null && echo \"read $p\";\n");
    script.push_str("       (exec 3>>\"$p\") 2>/dev/null && echo \"wrote $p\"; fi\n");
    script.push_str("done\n");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .arg("sh")
        .args(&paths)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()?;
    let opened = String::from_utf8_lossy(&out.stdout);
    assert!(
        opened.trim().is_empty(),
        "nobody could open segbpf's files:\n{opened}"
    );
    // The check can fail: nobody does read a file it may read.
    let probe = std::env::temp_dir().join(format!("segbpf-perm-probe-{}", std::process::id()));
    std::fs::write(&probe, "x")?;
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o644))?;
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .arg("sh")
        .arg(&probe)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()?;
    let _ = std::fs::remove_file(&probe);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("read "),
        "the probe must be readable by nobody: {out:?}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn a_policy_others_can_write_is_refused() -> anyhow::Result<()> {
    let mut lab = Lab::new("pol")?;
    lab.add_host("db", &["198.18.71.30/24"])?;
    let dir = std::env::temp_dir().join(format!("segbpf-pol-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = Cleanup(dir.clone());
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let file = dir.join("roles.toml");
    std::fs::copy(example(), &file)?;
    let policy = file.to_string_lossy().to_string();
    let attach = |extra: &[&str]| {
        let mut args = vec![
            "attach",
            "eth0",
            "--policy",
            &policy,
            "--role",
            "db",
            "--no-wait",
        ];
        args.extend_from_slice(extra);
        lab.segbpf("db", &args)
    };

    for (file_mode, dir_mode, why) in [
        (0o666, 0o755, "writable by group and others"),
        (0o620, 0o755, "writable by group"),
        (0o644, 0o777, "writable by group and others"),
    ] {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(file_mode))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(dir_mode))?;
        let out = attach(&[])?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "file {file_mode:o}, dir {dir_mode:o}: {err}"
        );
        assert!(
            err.contains(why),
            "file {file_mode:o}, dir {dir_mode:o}: {err}"
        );
        let status = lab.segbpf("db", &["status", "eth0"])?;
        assert_ne!(
            status.status.code(),
            Some(0),
            "nothing attached after a refusal"
        );
    }
    // A sticky directory (like /tmp) is fine; so is the override.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777))?;
    let out = attach(&[])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lab.segbpf_ok("db", &["detach", "eth0"])?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666))?;
    let out = attach(&["--insecure-policy"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The override holds for the attachment's reloads.
    lab.segbpf_ok("db", &["reload", "eth0"])?;
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn a_policy_below_a_directory_another_user_owns_is_refused() -> anyhow::Result<()> {
    use segbpf_tests::lab::{Running, one_tcp_port_policy};
    let mut lab = Lab::new("gp")?;
    lab.add_host("srv", &["198.18.72.30/24"])?;
    lab.add_host("cli", &["198.18.72.31/24"])?;
    let srv = lab.host("srv").addrs[0];
    let _servers = [8080, 8081]
        .into_iter()
        .map(|p| segbpf_tests::net::Server::tcp_echo(&lab.host("srv").ns.name, srv, p))
        .collect::<Result<Vec<_>, _>>()?;
    // ROOT/gp/pol/roles.toml, all root's and 0755 but for gp.
    let root = std::env::temp_dir().join(format!("segbpf-gp-{}", std::process::id()));
    let _cleanup = Cleanup(root.clone());
    let gp = root.join("gp");
    let pol = gp.join("pol");
    let other = root.join("other");
    std::fs::create_dir_all(&pol)?;
    std::fs::create_dir_all(&other)?;
    for d in [&root, &gp, &pol, &other] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    let file = pol.join("roles.toml");
    std::fs::write(&file, one_tcp_port_policy(8080))?;
    let policy = file.to_string_lossy().to_string();
    let gp_named = format!("{} (a directory on the policy file's path)", gp.display());

    // Owned by nobody, or writable by all without the sticky bit: refused.
    std::os::unix::fs::chown(&gp, Some(NOBODY), Some(NOBODY))?;
    let args = ["attach", "eth0", "--policy", &policy, "--role", "srv"];
    let out = lab.segbpf("srv", &[&args[..], &["--no-wait"]].concat())?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&gp_named) && err.contains("belongs to uid 65534"),
        "{err}"
    );
    std::os::unix::fs::chown(&gp, Some(0), Some(0))?;
    std::fs::set_permissions(&gp, std::fs::Permissions::from_mode(0o777))?;
    let out = lab.segbpf("srv", &[&args[..], &["--no-wait"]].concat())?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&gp_named) && err.contains("writable by group and others"),
        "{err}"
    );
    assert_ne!(
        lab.segbpf("srv", &["status", "eth0"])?.status.code(),
        Some(0),
        "nothing attached after a refusal"
    );

    // A trusted path attaches (in the foreground: it reloads by itself
    // when the policy file changes).
    std::fs::set_permissions(&gp, std::fs::Permissions::from_mode(0o755))?;
    // Its log goes to a file: waiting for "enforcing" there allows for a
    // slow start on a loaded machine, and the watch starts right after.
    let log_path = root.join("attach.log");
    let attach = Running::new(
        std::process::Command::new(segbpf_tests::lab::segbpf_bin())
            .args(["--netns", &lab.host("srv").ns.name])
            .args(args)
            .env("SEGBPF_BPFFS", &lab.bpffs)
            .env("SEGBPF_STATE_DIR", &lab.state)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()?,
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while !log().contains("enforcing on eth0") {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "attach did not come up:\n{}",
            log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert!(lab.tcp_reachable("cli", "srv", 8080)?);
    assert!(!lab.tcp_reachable("cli", "srv", 8081)?);

    // gp passes to nobody, who swaps the policy's directory for a link to
    // another root-owned policy.
    std::os::unix::fs::chown(&gp, Some(NOBODY), Some(NOBODY))?;
    std::fs::write(other.join("roles.toml"), one_tcp_port_policy(8081))?;
    std::fs::rename(&pol, gp.join("pol.old"))?;
    std::os::unix::fs::symlink(&other, &pol)?;
    // The automatic reload (it looks every 2 s) and a SIGHUP are refused...
    std::thread::sleep(std::time::Duration::from_secs(5));
    attach.signal(nix::sys::signal::Signal::SIGHUP)?;
    std::thread::sleep(std::time::Duration::from_secs(1));
    // ...and so is a reload by hand, naming the directory.
    let out = lab.segbpf("srv", &["reload", "eth0"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&gp_named), "{err}");
    // The policy in force is the first one, generation 1.
    let status = lab.status_json("srv")?;
    assert_eq!(
        status["attachments"][0]["state"]["generation"], 1,
        "{status}"
    );
    assert!(lab.tcp_reachable("cli", "srv", 8080)?);
    assert!(!lab.tcp_reachable("cli", "srv", 8081)?);
    attach.terminate()?;
    attach.wait()?;
    let log = log();
    for why in ["the policy file changed", "SIGHUP"] {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("{why}: reload refused")) && l.contains(&gp_named)),
            "no refused automatic reload ({why}) naming {}:\n{log}",
            gp.display()
        );
    }
    Ok(())
}

/// Removes a directory when dropped (also when the test fails).
struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `attach eth0 --role db --no-wait` of the example policy on the lab's
/// db host, with the lab's roots.
fn attach_db(lab: &Lab) -> anyhow::Result<std::process::Output> {
    let policy = example();
    lab.segbpf(
        "db",
        &[
            "attach",
            "eth0",
            "--policy",
            &policy,
            "--role",
            "db",
            "--no-wait",
        ],
    )
}

/// `status eth0 --output json` on the lab's db host.
fn status_db(lab: &Lab) -> anyhow::Result<std::process::Output> {
    lab.segbpf("db", &["status", "eth0", "--output", "json"])
}

/// Fails if the JSON status `out` says anything is attached.
fn assert_nothing_attached(out: &std::process::Output) {
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        !status.contains("\"attached\": true") && !status.contains("\"attached\":true"),
        "something was attached: {status}"
    );
}

/// A state directory other users can write (`/tmp`'s mode 1777, root's)
/// is refused as it is: not made private by a change of its mode, and
/// nothing attached. Another user could have put files in it first (a
/// lock segbpf would take as held, a symlink it would write through).
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn a_state_dir_others_can_write_is_refused() -> anyhow::Result<()> {
    let mut lab = Lab::new("sdir")?;
    lab.add_host("db", &["198.18.72.30/24"])?;
    std::fs::create_dir_all(&lab.state)?;
    std::fs::set_permissions(&lab.state, std::fs::Permissions::from_mode(0o1777))?;
    let out = attach_db(&lab)?;
    let mode = std::fs::metadata(&lab.state)?.permissions().mode() & 0o7777;
    let attached = status_db(&lab)?;
    // Made private again, so the lab's cleanup and later runs may use it.
    std::fs::set_permissions(&lab.state, std::fs::Permissions::from_mode(0o700))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "attach: {stderr}");
    assert!(
        stderr.contains("can be written by other users") && stderr.contains("1777"),
        "the refusal names why: {stderr}"
    );
    assert_eq!(mode, 0o1777, "the shared directory's mode was changed");
    assert_nothing_attached(&attached);
    Ok(())
}

/// A state directory of root's, mode 0700, inside a directory any user
/// can write without the sticky bit: another user could rename it away
/// and put a forged one in its place after the attach, so it is refused
/// before anything is attached.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn a_state_dir_in_a_directory_others_can_write_is_refused() -> anyhow::Result<()> {
    // Before the lab: dropped after it (its detach may write state there).
    let open = std::env::temp_dir().join(format!("segbpf-open-{}", std::process::id()));
    std::fs::create_dir_all(&open)?;
    let _cleanup = Cleanup(open.clone());
    let mut lab = Lab::new("sdpar")?;
    lab.add_host("db", &["198.18.73.30/24"])?;
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777))?;
    // Not made yet: the refused attach must not leave the directory it
    // made inside the open one (review 12 L2).
    let state = open.join("state");
    lab.state = state.clone();
    let out = attach_db(&lab)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !state.exists(),
        "the refused attach left {} behind: {stderr}",
        state.display()
    );
    let status = status_db(&lab)?;
    assert_eq!(out.status.code(), Some(1), "attach: {stderr}");
    assert!(
        stderr.contains(&open.display().to_string()) && stderr.contains("0777"),
        "the refusal names the open directory: {stderr}"
    );
    assert_nothing_attached(&status);
    Ok(())
}

/// The same through a symbolic link: `SEGBPF_STATE_DIR` is root's link
/// to a root directory inside a directory of another user (nobody), who
/// could rename the real directory away after the attach. Refused,
/// naming that directory, and nothing attached.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn a_state_dir_reached_through_a_symlink_into_another_users_directory_is_refused()
-> anyhow::Result<()> {
    use std::os::unix::fs::chown;
    // Before the lab: dropped after it (its detach may write state there).
    let base = std::env::temp_dir().join(format!("segbpf-symst-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    let _cleanup = Cleanup(base.clone());
    let theirs = base.join("nobodys");
    let inner = theirs.join("inner");
    std::fs::create_dir_all(&inner)?;
    std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o700))?;
    chown(&theirs, Some(65534), Some(65534))?;
    let link = base.join("state");
    std::os::unix::fs::symlink(&inner, &link)?;
    let mut lab = Lab::new("symst")?;
    lab.add_host("db", &["198.18.74.30/24"])?;
    lab.state = link;
    let out = attach_db(&lab)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let status = status_db(&lab)?;
    assert_eq!(out.status.code(), Some(1), "attach: {stderr}");
    assert!(
        stderr.contains(&format!("{} belongs to uid 65534", theirs.display())),
        "the refusal names the other user's directory: {stderr}"
    );
    assert_nothing_attached(&status);
    Ok(())
}
