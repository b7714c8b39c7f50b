//! `cargo xtask`: developer tasks for segbpf.
//!
//! - `setup`: install what building and testing need, only what is missing
//!   (nightly rust-src, LLVM 22 dev packages, bpf-linker built against
//!   LLVM 22, iproute2, nftables, iptables, curl, bpffs mount). Fast when
//!   everything is present.
//! - `test`: setup, build, then every test including the privileged ones
//!   (BPF_PROG_TEST_RUN fixtures, namespace end-to-end tests). The
//!   differential tests run their fixed seed plus a fresh random one,
//!   printed so a failure can be reproduced with `fuzz-diff --seed`.
//! - `lint`: rustfmt check and clippy (host crates and the eBPF crate).
//! - `bench [--quick]`: benchmarks, see BENCHMARKS.md.
//! - `fuzz [--seconds N] [--target T]`: cargo-fuzz targets (policy
//!   parser/compiler, event decoder) from the checked-in corpus.
//! - `fuzz-diff --cases N --seed S [--nft-cases M]`: differential testing
//!   on random policies and packets with one seed: kernel against the
//!   reference evaluator (N cases), and segbpf, the evaluator and
//!   `export nft` with real packets (M cases).
//! - `demo`: a three-host lab from `examples/roles.toml` with a
//!   connectivity matrix, torn down at the end.
//! - `dist [--check]`: the Debian package `target/dist/segbpf_VERSION_ARCH.deb`
//!   (cargo-deb), and with `--check` an inspection of it (contents, control
//!   fields, the packaged unit verified, the packaged binary attached).

mod boot;
mod demo;
mod dist;
mod setup;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "segbpf developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install missing build/test dependencies (idempotent).
    Setup,
    /// Setup, build, and run all tests (unit + privileged kernel tests).
    Test {
        /// Extra arguments passed to the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// rustfmt --check and clippy -D warnings on every crate.
    Lint,
    /// Build a three-host lab, enforce examples/roles.toml, show the matrix, tear down.
    Demo,
    /// Differential testing with more cases: reference evaluator vs kernel
    /// on random policies and packets (any mismatch prints a reproducer).
    FuzzDiff {
        /// Number of kernel cases.
        #[arg(long, default_value_t = 200_000)]
        cases: u64,
        /// Generator seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Number of nftables cases (packets sent for real through
        /// `export nft` and segbpf).
        #[arg(long, default_value_t = 240)]
        nft_cases: u64,
    },
    /// Coverage-guided fuzzing (cargo-fuzz) of the policy parser/compiler
    /// and of the event decoder, each for the given time.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        /// Only this target (`policy` or `event`).
        #[arg(long)]
        target: Option<String>,
    },
    /// Benchmarks (BENCHMARKS.md): per-packet cost, rule scaling, update cost, events, load cases.
    Bench {
        /// Fewer sizes and rounds (a few minutes).
        #[arg(long)]
        quick: bool,
    },
    /// Build the Debian package target/dist/segbpf_VERSION_ARCH.deb (release build, cargo-deb).
    Dist {
        /// Then check the package: contents, control fields, the packaged
        /// unit (systemd-analyze verify) and binary (attached, as root).
        #[arg(long)]
        check: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::run(),
        Cmd::Test { args } => test(&args),
        Cmd::Lint => lint(),
        Cmd::FuzzDiff {
            cases,
            seed,
            nft_cases,
        } => {
            setup::run()?;
            build_segbpf()?;
            run(cargo()
                .args([
                    "test",
                    "--package",
                    "segbpf-tests",
                    "--test",
                    "differential",
                    "--",
                    "--include-ignored",
                    "--nocapture",
                ])
                .env("SEGBPF_DIFF_CASES", cases.to_string())
                .env("SEGBPF_DIFF_SEED", seed.to_string())
                .env("SEGBPF_DIFF_NFT_CASES", nft_cases.to_string())
                .env("SEGBPF_BIN", segbpf_tests::lab::segbpf_bin()))
        }
        Cmd::Fuzz { seconds, target } => {
            setup::run()?;
            setup::ensure_cargo_fuzz()?;
            let fuzz_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
            let targets: Vec<String> = match target {
                Some(t) => vec![t],
                None => vec!["policy".into(), "event".into()],
            };
            for t in targets {
                // The checked-in corpus is the seed; new inputs go to a
                // scratch directory so the repository stays clean.
                let scratch = std::env::temp_dir().join(format!("segbpf-fuzz-{t}"));
                std::fs::create_dir_all(&scratch)?;
                run(Command::new("cargo")
                    .current_dir(&fuzz_dir)
                    .env_remove("RUSTUP_TOOLCHAIN")
                    .env_remove("CARGO")
                    .args(["+nightly", "fuzz", "run", &t])
                    .arg(&scratch)
                    .arg(format!("corpus/{t}"))
                    .args([
                        "--",
                        &format!("-max_total_time={seconds}"),
                        "-print_final_stats=1",
                    ]))?;
            }
            Ok(())
        }
        Cmd::Bench { quick } => {
            setup::run()?;
            // The veth comparisons run the segbpf binary: build the one
            // they use, whatever else the checkout holds.
            run(cargo().args([
                "build",
                "--release",
                "--package",
                "segbpf",
                "--bin",
                "segbpf",
            ]))?;
            let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
                || std::path::PathBuf::from("target"),
                std::path::PathBuf::from,
            );
            let bin = std::fs::canonicalize(target.join("release/segbpf"))
                .context("locating the release segbpf binary")?;
            let only = std::env::var("SEGBPF_BENCH_ONLY").ok();
            if !matches!(only.as_deref(), Some("load" | "updates")) {
                let mut cmd = cargo();
                cmd.env("SEGBPF_BIN", &bin);
                cmd.args([
                    "run",
                    "--release",
                    "--package",
                    "segbpf",
                    "--example",
                    "bench",
                    "--",
                ]);
                if quick {
                    cmd.arg("--quick");
                }
                run(&mut cmd)?;
            }
            // The load cases of issue 28 at full size: the bench-size
            // variants in tests/tests/tcp_tracking.rs (real sockets between
            // namespaces), which the suite skips. About a minute; not
            // with --quick.
            // The updates table (issue 25): live edits, reloads and attach
            // time against nftables (examples/updates.rs), then the fleet
            // push latency with three agents and a real etcd.
            if only.is_none() || only.as_deref() == Some("updates") {
                // The updates example, release build, with its arguments.
                let updates = |extra: &[&str]| {
                    let mut cmd = cargo();
                    cmd.env("SEGBPF_BIN", &bin)
                        .args([
                            "run",
                            "--release",
                            "--package",
                            "segbpf",
                            "--example",
                            "updates",
                            "--",
                        ])
                        .args(extra);
                    cmd
                };
                let mut cmd = updates(&[]);
                if quick {
                    cmd.arg("--quick");
                }
                run(&mut cmd)?;
                // Set edits at 1,000,000 prefixes (`--million`; about half
                // a minute). nftables only with SEGBPF_BENCH_MILLION_NFT=1:
                // each of its edits takes about 2 minutes at that size.
                let mut cmd = updates(&["--million"]);
                if quick {
                    cmd.arg("--quick");
                }
                if std::env::var_os("SEGBPF_BENCH_MILLION_NFT").is_some_and(|v| v == "1") {
                    cmd.arg("--nft");
                }
                run(&mut cmd)?;
                // The benchmarks among the kernel tests (the suite skips
                // them): the fleet push latency, and a change of the
                // policy file until it is in force (the watcher's inotify
                // path, nine editor's saves).
                for (file, filter) in [("fleet", "bench_fleet"), ("reload", "bench_policy_file")] {
                    run(cargo()
                        .env("SEGBPF_BIN", &bin)
                        .env("SEGBPF_BENCH_UPDATES", "1")
                        .args([
                            "test",
                            "--package",
                            "segbpf-tests",
                            "--test",
                            file,
                            "--",
                            "--ignored",
                            "--nocapture",
                            filter,
                        ]))?;
                }
            }
            if (only.is_none() && !quick) || only.as_deref() == Some("load") {
                run(cargo()
                    .env("SEGBPF_BIN", &bin)
                    .env("SEGBPF_BENCH_LOAD", "1")
                    .args([
                        "test",
                        "--package",
                        "segbpf-tests",
                        "--test",
                        "tcp_tracking",
                        "--",
                        "--ignored",
                        "--nocapture",
                        "--test-threads",
                        "1",
                        "bench_",
                    ]))?;
            }
            Ok(())
        }
        Cmd::Demo => {
            setup::run()?;
            build_segbpf()?;
            demo::run()
        }
        Cmd::Dist { check } => dist::run_dist(check).map(|_| ()),
    }
}

/// The workspace root (the parent of xtask/).
pub(crate) fn workspace() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command, failing when it fails.
pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("running {}", cmd.get_program().display()))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Builds the segbpf binary (and with it the eBPF object).
fn build_segbpf() -> anyhow::Result<()> {
    run(cargo().args(["build", "--package", "segbpf", "--bin", "segbpf"]))
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    build_segbpf()?;
    let bin = segbpf_tests::lab::segbpf_bin();
    // The differential tests run their fixed seed and one drawn now, a
    // new one every run; printed so a failure can be reproduced.
    let fresh = fresh_seed();
    eprintln!(
        "xtask: differential tests with the fixed seed and fresh seed {fresh} (reproduce a failure: cargo xtask fuzz-diff --seed {fresh})"
    );
    let mut cmd = cargo();
    cmd.env("SEGBPF_DIFF_FRESH_SEED", fresh.to_string());
    cmd.args([
        "test",
        "--workspace",
        "--exclude",
        "segbpf-ebpf",
        "--",
        "--include-ignored",
    ])
    .args(extra)
    .env("SEGBPF_BIN", &bin);
    run(&mut cmd)
}

/// A seed nobody chose: from the kernel's random pool, else the clock.
fn fresh_seed() -> u64 {
    use std::io::Read as _;
    let mut b = [0u8; 8];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    let seed = if random.is_ok() {
        u64::from_ne_bytes(b)
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    };
    // Below 2^53, so it survives any tool that reads it as a float.
    seed >> 11
}

fn lint() -> anyhow::Result<()> {
    setup::run()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "segbpf-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(Command::new("cargo")
        .current_dir("segbpf-ebpf")
        .args([
            "+nightly",
            "clippy",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO"))
}
