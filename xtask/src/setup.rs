//! Installs what segbpf needs to build and test, skipping what is present.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::run as run_cmd;

/// Debian packages needed to build bpf-linker against LLVM 22.
const LLVM_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev", "libzstd-dev"];

/// Debian packages segbpf's build needs: the etcd client's build script
/// runs protoc on etcd's .proto files, which import protobuf's well-known
/// types (libprotobuf-dev). xtask itself does not depend on that crate, so
/// it builds before these are installed.
const BUILD_PACKAGES: &[&str] = &["protobuf-compiler", "libprotobuf-dev"];

/// Debian packages the tests need: systemd-nspawn boots a real systemd
/// for tests/tests/services.rs `under_systemd` (and `dist --check`).
const TEST_PACKAGES: &[&str] = &["systemd-container"];

/// Installs what is missing. Safe to run repeatedly.
pub(crate) fn run() -> anyhow::Result<()> {
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()?;
    ensure_tools()?;
    apt_install(BUILD_PACKAGES)?;
    apt_install(TEST_PACKAGES)?;
    ensure_bpffs()?;
    Ok(())
}

fn output_ok(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rustup() -> Command {
    let mut c = Command::new("rustup");
    // Inside `cargo xtask` the stable toolchain is selected through these;
    // rustup must see the user's view.
    c.env_remove("RUSTUP_TOOLCHAIN");
    c
}

fn ensure_nightly_rust_src() -> anyhow::Result<()> {
    let toolchains = output_ok(rustup().args(["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("setup: installing the nightly toolchain (eBPF build)");
        run_cmd(rustup().args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let comps =
        output_ok(rustup().args(["component", "list", "--toolchain", "nightly", "--installed"]))
            .unwrap_or_default();
    if !comps.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to nightly");
        run_cmd(rustup().args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn bpf_linker_works() -> bool {
    let path = cargo_bin_dir().join("bpf-linker");
    let cmd = if path.exists() {
        path
    } else {
        PathBuf::from("bpf-linker")
    };
    output_ok(Command::new(cmd).arg("--version")).is_some()
}

fn deb_installed(pkg: &str) -> bool {
    output_ok(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

/// Installs the Debian packages of `pkgs` that are missing.
pub(crate) fn ensure_packages(pkgs: &[&str]) -> anyhow::Result<()> {
    apt_install(pkgs)
}

fn apt_install(pkgs: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !deb_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !nix_is_root() {
        bail!("missing Debian packages {missing:?}; run as root or install them");
    }
    eprintln!("setup: apt-get install {}", missing.join(" "));
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn nix_is_root() -> bool {
    output_ok(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    apt_install(LLVM_PACKAGES)?;
    eprintln!("setup: building bpf-linker against LLVM 22 (about a minute)");
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run_cmd(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                // The release checked to build with this machine's toolchains.
                "--version",
                "0.13.0",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO"),
    )
    .context("installing bpf-linker")?;
    if !bpf_linker_works() {
        bail!("bpf-linker was installed but does not run (is libllvm22 installed?)");
    }
    Ok(())
}

/// Commands the tests and the demo run, and the Debian package of each:
/// iproute2 (namespaces, veth), nftables and iptables (reference
/// firewalls), curl (metrics scrape), iputils-ping (ICMP echo from the
/// kernel's own stack in `tests/tests/real_traffic.rs`), and the tools of
/// the service tests.
const TOOLS: &[(&str, &str, &str)] = &[
    ("ip", "-V", "iproute2"),
    ("nft", "--version", "nftables"),
    ("iptables", "--version", "iptables"),
    // `segbpf import` reads iptables-save files through the nf_tables backend.
    ("iptables-nft-restore", "--version", "iptables"),
    ("sysctl", "--version", "procps"),
    // `cargo xtask bench`: iptables with an ipset, and GRO on the
    // receiver's veth (so it takes the generator's XDP frames).
    ("ipset", "--version", "ipset"),
    ("ethtool", "--version", "ethtool"),
    // `cargo xtask bench`: xdp-filter (xdp-tools), the stateless XDP
    // filter segbpf's per-packet and traffic rows are compared with.
    // (`load --version`: only the subcommands know --version.)
    ("xdp-filter", "load --version", "xdp-tools"),
    ("curl", "--version", "curl"),
    ("ping", "-V", "iputils-ping"),
    // `tests/tests/service.rs`: the unit is checked with systemd-analyze
    // (and `man` for its Documentation=), its sandbox with setpriv and strace.
    ("systemd-analyze", "--version", "systemd"),
    ("man", "--version", "man-db"),
    ("setpriv", "--version", "util-linux"),
    ("strace", "-V", "strace"),
    // `tests/tests/fleet.rs`: a real etcd for fleet mode, etcdctl to
    // write keys by hand, and openssl for TLS certificates.
    ("etcd", "--version", "etcd-server"),
    ("etcdctl", "version", "etcd-client"),
    ("openssl", "version", "openssl"),
];

fn ensure_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(cmd, args, _)| {
            output_ok(Command::new(cmd).args(args.split_whitespace())).is_none()
        })
        .map(|(_, _, pkg)| *pkg)
        .collect();
    apt_install(&missing)
}

fn ensure_bpffs() -> anyhow::Result<()> {
    if !nix_is_root() {
        return Ok(());
    }
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "));
    if !mounted {
        eprintln!("setup: mounting bpffs on /sys/fs/bpf");
        run_cmd(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

/// Installs cargo-fuzz if it is missing (only `cargo xtask fuzz` needs it).
pub(crate) fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    if output_ok(
        Command::new("cargo")
            .args(["fuzz", "--version"])
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
    .is_some()
    {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz");
    run_cmd(
        Command::new("cargo")
            .args(["install", "cargo-fuzz", "--version", "0.13.2"])
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO"),
    )
}

/// What `cargo xtask dist` needs besides the build: cargo-deb, and
/// dpkg-shlibdeps (dpkg-dev) for the package's computed Depends; dpkg-deb
/// and gzip are part of every Debian system.
pub(crate) fn ensure_dist_tools() -> anyhow::Result<()> {
    apt_install(&["dpkg-dev"])?;
    if output_ok(
        Command::new("cargo")
            .args(["deb", "--version"])
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
    .is_some()
    {
        return Ok(());
    }
    eprintln!("setup: installing cargo-deb (a few minutes)");
    run_cmd(
        Command::new("cargo")
            .args(["install", "cargo-deb", "--version", "3.8.0", "--locked"])
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO"),
    )
    .context("installing cargo-deb")
}
