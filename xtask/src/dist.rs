//! `cargo xtask dist [--check]`: the Debian package
//! `target/dist/segbpf_VERSION_ARCH.deb`, built with cargo-deb from the
//! release binary (its eBPF object embedded by build.rs). The manual pages
//! and shell completions are generated from that binary (`segbpf man`,
//! `segbpf completions`) into `target/release/dist-gen/`; the rest of the package
//! is described in `[package.metadata.deb]` of `segbpf/Cargo.toml`.
//!
//! `--check` then inspects the package as an installer would see it:
//! `dpkg-deb --contents` and `--field`, no conffile but the logrotate
//! rules, the packaged binary
//! runs and checks the packaged example, the packaged unit passes
//! `systemd-analyze verify` against the packaged binary and manual pages,
//! and (as root) the packaged binary enforces the example on a veth
//! interface in a scratch network namespace, and the package is installed,
//! used as the README says and removed under a real systemd as PID 1
//! ([`crate::boot`]).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

use crate::{cargo, run, setup, workspace};

/// The package's name and version (the workspace's).
const PACKAGE: &str = "segbpf";
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Shells whose completions are packaged, and the file name of each in
/// `target/release/dist-gen/completions` (the names the shells look for;
/// `[package.metadata.deb]` installs them).
const COMPLETIONS: &[(&str, &str)] = &[
    ("bash", "segbpf"),
    ("zsh", "_segbpf"),
    ("fish", "segbpf.fish"),
];

/// Files every package must hold (besides one manual page per command).
const REQUIRED: &[&str] = &[
    "usr/sbin/segbpf",
    "usr/lib/systemd/system/segbpf@.service",
    "usr/lib/systemd/system/segbpf-services.service",
    "etc/logrotate.d/segbpf",
    "usr/share/doc/segbpf/examples/roles.toml",
    "usr/share/doc/segbpf/copyright",
    "usr/share/doc/segbpf/docs/service.md",
    "usr/share/doc/segbpf/docs/services.md",
    "usr/share/man/man8/segbpf.8.gz",
    "usr/share/man/man8/segbpf-attach.8.gz",
    "usr/share/bash-completion/completions/segbpf",
    "usr/share/zsh/vendor-completions/_segbpf",
    "usr/share/fish/vendor_completions.d/segbpf.fish",
];

/// Cargo's target directory (`$CARGO_TARGET_DIR`, else `target/`).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace().join("target"), PathBuf::from)
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {}", cmd.get_program().display()))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds the package; with `check`, inspects it. Returns its path.
pub(crate) fn run_dist(check: bool) -> anyhow::Result<PathBuf> {
    let started = std::time::Instant::now();
    setup::run()?;
    setup::ensure_dist_tools()?;
    run(cargo().args([
        "build",
        "--release",
        "--locked",
        "--package",
        "segbpf",
        "--bin",
        "segbpf",
    ]))?;
    let bin = target_dir().join("release/segbpf");
    let dist = workspace().join("target/dist");
    std::fs::create_dir_all(&dist)?;
    generate(&bin, &target_dir().join("release/dist-gen"))?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_string();
    let deb = dist.join(format!("{PACKAGE}_{VERSION}_{arch}.deb"));
    let _ = std::fs::remove_file(&deb);
    run(cargo()
        .current_dir(workspace())
        .args(["deb", "--package", "segbpf", "--no-build", "--locked"])
        .arg("--output")
        .arg(&deb))?;
    ensure!(deb.is_file(), "cargo deb did not write {}", deb.display());
    eprintln!("dist: {} built in {:.0?}", deb.display(), started.elapsed());
    if check {
        check_package(&deb, &arch)?;
        eprintln!("dist: {} checked", deb.display());
    }
    println!("{}", deb.display());
    Ok(deb)
}

/// Writes the manual pages (gzip'd) and completions of `bin` into `gen_dir`.
fn generate(bin: &Path, gen_dir: &Path) -> anyhow::Result<()> {
    if gen_dir.exists() {
        std::fs::remove_dir_all(gen_dir)
            .with_context(|| format!("removing {}", gen_dir.display()))?;
    }
    let man = gen_dir.join("man");
    run(Command::new(bin).arg("man").arg(&man))?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&man)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    pages.sort();
    ensure!(!pages.is_empty(), "segbpf man wrote no page");
    // -n: no name or time stamp inside, so the same page gives the same bytes.
    run(Command::new("gzip").args(["-9", "-n", "-f"]).args(&pages))?;
    let completions = gen_dir.join("completions");
    std::fs::create_dir_all(&completions)?;
    for (shell, file) in COMPLETIONS {
        let script = Command::new(bin)
            .args(["completions", shell])
            .output()
            .context("running segbpf completions")?;
        ensure!(
            script.status.success() && !script.stdout.is_empty(),
            "segbpf completions {shell} failed: {}",
            String::from_utf8_lossy(&script.stderr)
        );
        std::fs::write(completions.join(file), &script.stdout)?;
    }
    Ok(())
}

/// The paths (without the leading `./`) and modes of `dpkg-deb --contents`.
fn parse_contents(listing: &str) -> Vec<(String, String)> {
    listing
        .lines()
        .filter_map(|line| {
            let mode = line.split_whitespace().next()?;
            // The path is the last field; a symlink adds ` -> target`.
            let path = line.split(" -> ").next()?.split_whitespace().last()?;
            let path = path.trim_start_matches("./").trim_end_matches('/');
            (!path.is_empty()).then(|| (path.to_string(), mode.to_string()))
        })
        .collect()
}

/// What is wrong with a package of these contents, for manual pages
/// `pages` (file names such as `segbpf-attach.8`).
fn content_problems(contents: &[(String, String)], pages: &[String]) -> Vec<String> {
    let has = |p: &str| contents.iter().any(|(path, _)| path == p);
    let mut problems: Vec<String> = REQUIRED
        .iter()
        .filter(|p| !has(p))
        .map(|p| format!("missing /{p}"))
        .collect();
    for page in pages {
        // The section is the name's last extension (roles.toml.5: man5).
        let section = page.rsplit('.').next().unwrap_or("8");
        let path = format!("usr/share/man/man{section}/{page}.gz");
        if !has(&path) {
            problems.push(format!("missing /{path}"));
        }
    }
    match contents.iter().find(|(p, _)| p == "usr/sbin/segbpf") {
        Some((_, mode)) if mode != "-rwxr-xr-x" => {
            problems.push(format!("/usr/sbin/segbpf has mode {mode}, not -rwxr-xr-x"));
        }
        _ => {}
    }
    for (path, mode) in contents {
        let is_dir = mode.starts_with('d');
        if path.starts_with("etc/") && path != "etc/logrotate.d/segbpf" && !is_dir {
            problems.push(format!(
                "/{path}: the package ships no file under /etc but its logrotate rules (the unit makes /etc/segbpf; the policy is the operator's)"
            ));
        }
        let is_file = mode.starts_with('-');
        if is_file
            && path.starts_with("usr/share/man/")
            && Path::new(path).extension().is_none_or(|e| e != "gz")
        {
            problems.push(format!("/{path}: manual pages are gzip'd"));
        }
    }
    problems
}

/// The `description` of segbpf's Cargo.toml: the package's synopsis.
fn synopsis() -> anyhow::Result<String> {
    let manifest = std::fs::read_to_string(workspace().join("segbpf/Cargo.toml"))?;
    manifest
        .lines()
        .find_map(|l| l.strip_prefix("description = \""))
        .and_then(|l| l.strip_suffix('"'))
        .map(str::to_string)
        .context("no description in segbpf/Cargo.toml")
}

/// What is wrong with the control fields (`dpkg-deb --field` output);
/// `synopsis` is the first line `Description` must have, whole.
fn field_problems(fields: &str, arch: &str, synopsis: &str) -> Vec<String> {
    let field = |name: &str| {
        fields.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(':'))
                .map(str::trim)
        })
    };
    let mut problems = Vec::new();
    for (name, want) in [
        ("Package", PACKAGE),
        ("Version", VERSION),
        ("Architecture", arch),
    ] {
        if field(name) != Some(want) {
            problems.push(format!("{name}: {:?}, want {want:?}", field(name)));
        }
    }
    // cargo-deb wraps a long crate description into the extended one.
    if field("Description") != Some(synopsis) || synopsis.len() > 79 {
        problems.push(format!(
            "Description: {:?}, want {synopsis:?} (at most 79 characters)",
            field("Description")
        ));
    }
    // $auto (dpkg-shlibdeps) finds the C library the binary links.
    if !field("Depends").is_some_and(|d| d.contains("libc6")) {
        problems.push(format!("Depends: {:?}, want libc6", field("Depends")));
    }
    // `import --verify` runs nft and iptables-restore.
    let recommends: Vec<&str> = field("Recommends")
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .collect();
    for want in ["nftables", "iptables"] {
        if !recommends.contains(&want) {
            problems.push(format!(
                "Recommends: {:?}, want {want}",
                field("Recommends")
            ));
        }
    }
    problems
}

fn check_package(deb: &Path, arch: &str) -> anyhow::Result<()> {
    let listing = output(Command::new("dpkg-deb").arg("--contents").arg(deb))?;
    let contents = parse_contents(&listing);
    let scratch = ScratchDir::new("segbpf-dist-check")?;
    let root = scratch.0.join("root");
    run(Command::new("dpkg-deb")
        .arg("--extract")
        .arg(deb)
        .arg(&root))?;
    let bin = root.join("usr/sbin/segbpf");
    // The pages the packaged binary has, gzip'd or not, from the binary itself.
    let pages_dir = scratch.0.join("man/man8");
    output(Command::new(&bin).arg("man").arg(&pages_dir))?;
    let mut pages: Vec<String> = std::fs::read_dir(&pages_dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    pages.sort();
    let mut problems = content_problems(&contents, &pages);
    let fields = output(Command::new("dpkg-deb").arg("--field").arg(deb).args([
        "Package",
        "Version",
        "Architecture",
        "Depends",
        "Recommends",
        "Description",
    ]))?;
    problems.extend(field_problems(&fields, arch, &synopsis()?));
    let info = output(Command::new("dpkg-deb").arg("--info").arg(deb))?;
    if info.contains("conffiles") {
        let conffiles = output(
            Command::new("dpkg-deb")
                .arg("--info")
                .arg(deb)
                .arg("conffiles"),
        )?;
        for c in conffiles
            .lines()
            .filter(|l| *l != "/etc/logrotate.d/segbpf")
        {
            problems.push(format!(
                "conffile {c}: the only conffile is /etc/logrotate.d/segbpf"
            ));
        }
    }
    for script in ["postinst", "prerm", "postrm"] {
        if !info.contains(script) {
            problems.push(format!("no {script} maintainer script"));
        }
    }
    if !problems.is_empty() {
        bail!(
            "{}:\n  {}\n--- dpkg-deb --contents ---\n{listing}--- fields ---\n{fields}",
            deb.display(),
            problems.join("\n  ")
        );
    }
    eprintln!(
        "dist: contents ok ({} paths, {} manual pages), fields ok:\n{}",
        contents.len(),
        pages.len(),
        fields.trim_end()
    );

    // The packaged binary runs and accepts the packaged example.
    let version = output(Command::new(&bin).arg("--version"))?;
    ensure!(
        version.trim() == format!("segbpf {VERSION}"),
        "packaged segbpf --version says {version:?}"
    );
    let example = root.join("usr/share/doc/segbpf/examples/roles.toml");
    output(Command::new(&bin).args(["check", "--policy"]).arg(&example))?;

    verify_unit(&root, &scratch.0.join("man"))?;
    if nix_is_root() {
        enforce_example(&bin, &example, &scratch.0)?;
        crate::boot::check(deb, &scratch.0.join("boot"))?;
    } else {
        eprintln!("dist: not root: the packaged binary was not attached (run as root for that)");
    }
    Ok(())
}

/// `systemd-analyze verify` of the packaged units, their ExecStart pointed
/// at the packaged binary and `man` at the packaged binary's pages: any
/// message about a unit is a failure (verify exits 0 on warnings).
fn verify_unit(root: &Path, manpath: &Path) -> anyhow::Result<()> {
    let bin = root.join("usr/sbin/segbpf");
    let dir = root.join("verify");
    std::fs::create_dir_all(&dir)?;
    for (file, instance) in [
        ("segbpf@.service", "segbpf@eth0.service"),
        ("segbpf-services.service", "segbpf-services.service"),
    ] {
        let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system").join(file))?;
        std::fs::write(
            dir.join(file),
            unit.replace("/usr/sbin/segbpf", &bin.display().to_string()),
        )?;
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=yes"])
            .arg(dir.join(instance))
            .env("MANPATH", manpath)
            .output()
            .context("running systemd-analyze verify")?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify of the packaged unit {file} ({}): {said}",
            out.status
        );
        eprintln!("dist: systemd-analyze verify of the packaged unit {file}: clean");
    }
    Ok(())
}

/// Attaches the packaged binary (with its embedded eBPF object) to a
/// veth interface in a scratch network namespace, with private pin and
/// state roots, then detaches; the namespace goes at the end.
fn enforce_example(bin: &Path, example: &Path, scratch: &Path) -> anyhow::Result<()> {
    use segbpf_tests::netns::Netns;
    let ns = Netns::create(&format!("segbpf-dist-{}", std::process::id()))?;
    // A veth pair inside the namespace (the dummy driver may be missing).
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"])?;
    ns.ip(&["link", "set", "d0", "up"])?;
    ns.ip(&["link", "set", "d1", "up"])?;
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/segbpf-dist-{}", std::process::id()));
    let segbpf = |args: &[&str]| {
        let mut cmd = Command::new(bin);
        cmd.arg("--netns")
            .arg(&ns.name)
            .args(args)
            .env("SEGBPF_BPFFS", &bpffs)
            .env("SEGBPF_STATE_DIR", scratch.join("state"))
            .env("SEGBPF_HISTORY_DIR", scratch.join("history"));
        output(&mut cmd)
    };
    let example = example.display().to_string();
    let result = segbpf(&[
        "attach",
        "d0",
        "--policy",
        &example,
        "--role",
        "web",
        "--no-wait",
        // The extracted copy lives under the temporary directory, which
        // other users may write to.
        "--insecure-policy",
    ])
    .and_then(|attached| {
        let status = segbpf(&["status", "d0", "--output", "json"])?;
        ensure!(
            status.contains("\"attached\": true") || status.contains("\"attached\":true"),
            "status after attach: {status}"
        );
        eprintln!("dist: packaged binary enforces: {}", attached.trim());
        Ok(())
    });
    let detached = segbpf(&["detach", "d0"]);
    let _ = std::fs::remove_dir_all(&bpffs);
    result?;
    detached.map(|_| ())
}

fn nix_is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|s| s.trim() == "0")
}

/// A directory under the system's temporary directory, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(tag: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(ScratchDir(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = "\
drwxr-xr-x 0/0               0 2024-01-01 00:00 ./
drwxr-xr-x 0/0               0 2024-01-01 00:00 ./usr/
-rwxr-xr-x 0/0         9000000 2024-01-01 00:00 ./usr/sbin/segbpf
-rw-r--r-- 0/0            2500 2024-01-01 00:00 ./usr/lib/systemd/system/segbpf@.service
-rw-r--r-- 0/0            1500 2024-01-01 00:00 ./usr/lib/systemd/system/segbpf-services.service
-rw-r--r-- 0/0             400 2024-01-01 00:00 ./etc/logrotate.d/segbpf
-rw-r--r-- 0/0            4000 2024-01-01 00:00 ./usr/share/doc/segbpf/examples/roles.toml
-rw-r--r-- 0/0            1000 2024-01-01 00:00 ./usr/share/doc/segbpf/copyright
-rw-r--r-- 0/0            1000 2024-01-01 00:00 ./usr/share/doc/segbpf/docs/service.md
-rw-r--r-- 0/0            1000 2024-01-01 00:00 ./usr/share/doc/segbpf/docs/services.md
-rw-r--r-- 0/0             900 2024-01-01 00:00 ./usr/share/man/man8/segbpf.8.gz
-rw-r--r-- 0/0             900 2024-01-01 00:00 ./usr/share/man/man8/segbpf-attach.8.gz
-rw-r--r-- 0/0            9000 2024-01-01 00:00 ./usr/share/bash-completion/completions/segbpf
-rw-r--r-- 0/0            9000 2024-01-01 00:00 ./usr/share/zsh/vendor-completions/_segbpf
-rw-r--r-- 0/0            9000 2024-01-01 00:00 ./usr/share/fish/vendor_completions.d/segbpf.fish
lrwxrwxrwx 0/0               0 2024-01-01 00:00 ./usr/bin/segbpf -> ../sbin/segbpf
";

    fn pages() -> Vec<String> {
        vec!["segbpf.8".into(), "segbpf-attach.8".into()]
    }

    #[test]
    fn a_complete_package_has_no_problem() {
        let contents = parse_contents(LISTING);
        assert!(contents.contains(&("usr/sbin/segbpf".into(), "-rwxr-xr-x".into())));
        assert!(contents.iter().any(|(p, _)| p == "usr/bin/segbpf"));
        assert_eq!(content_problems(&contents, &pages()), Vec::<String>::new());
    }

    #[test]
    fn missing_files_conffiles_and_plain_pages_are_named() {
        let listing = LISTING
            .replace(
                "./usr/share/man/man8/segbpf-attach.8.gz",
                "./usr/share/man/man8/segbpf-attach.8",
            )
            .replace(
                "-rwxr-xr-x 0/0         9000000",
                "-rw-r--r-- 0/0         9000000",
            )
            + "-rw-r--r-- 0/0 10 2024-01-01 00:00 ./etc/segbpf/roles.toml\n";
        let mut pages = pages();
        pages.push("segbpf-reload.8".into());
        let problems = content_problems(&parse_contents(&listing), &pages);
        for want in [
            "missing /usr/share/man/man8/segbpf-attach.8.gz",
            "missing /usr/share/man/man8/segbpf-reload.8.gz",
            "/usr/sbin/segbpf has mode -rw-r--r--",
            "/etc/segbpf/roles.toml: the package ships no file under /etc",
            "/usr/share/man/man8/segbpf-attach.8: manual pages are gzip'd",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(want)),
                "{want} not in {problems:#?}"
            );
        }
    }

    #[test]
    fn control_fields_are_checked() {
        let good = format!(
            "Package: segbpf\nVersion: {VERSION}\nArchitecture: amd64\nDepends: libc6 (>= 2.34), libgcc-s1 (>= 4.2)\nRecommends: nftables, iptables\nDescription: A firewall\n more text\n"
        );
        assert!(field_problems(&good, "amd64", "A firewall").is_empty());
        let problems = field_problems(
            "Package: segbpf\nVersion: 9\nArchitecture: arm64\nDescription: A fire\n wall\n",
            "amd64",
            "A fire wall",
        );
        // Version, Architecture, Description, Depends, and both Recommends.
        assert_eq!(problems.len(), 6, "{problems:#?}");
        assert!(synopsis().unwrap().len() <= 79);
    }
}
