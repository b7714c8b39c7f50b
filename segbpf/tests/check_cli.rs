//! `segbpf check` as a user runs it: the example passes (exit 0), every
//! malformed policy in `bad-policies/` fails with exit 1 and an error that
//! names the file, line, column and field, and usage errors exit 2.
//! No privileges needed: `check` never touches the kernel.
#![allow(
    unused_crate_dependencies,
    reason = "an integration test sees every dependency of the package; it runs the binary"
)]

use std::process::Command;

fn segbpf(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_segbpf"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run segbpf")
}

#[test]
fn example_policy_checks_ok() {
    let out = segbpf(&["check", "--policy", "../examples/roles.toml"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("9 rules"), "{stdout}");
    assert!(stdout.contains("role db"), "{stdout}");
}

/// (file, expected `line:col`, expected field, a word of the message).
const BAD: &[(&str, &str, &str, &str)] = &[
    ("bad-address.toml", "3:8", "sets.web[0]", "bad address"),
    (
        "reversed-range.toml",
        "3:8",
        "sets.web[0]",
        "reversed range",
    ),
    ("empty-range.toml", "3:8", "sets.web[0]", "empty range"),
    (
        "unknown-set.toml",
        "5:8",
        "base.ingress[0].from",
        "unknown set `webb`",
    ),
    (
        "port-out-of-range.toml",
        "4:8",
        "base.ingress[0].tcp[0]",
        "out of range",
    ),
    (
        "reversed-ports.toml",
        "4:8",
        "base.ingress[0].tcp[0]",
        "reversed port range",
    ),
    (
        "unknown-key.toml",
        "4:1",
        "base.ingress[0].ports",
        "unknown key `ports`",
    ),
    (
        "to-in-ingress.toml",
        "3:1",
        "base.ingress[0].to",
        "unknown key `to`",
    ),
    ("duplicate-set.toml", "4:1", "sets.a", "defined twice"),
    ("duplicate-role.toml", "4:8", "roles.web", "defined twice"),
    (
        "empty-role.toml",
        "2:1",
        "roles.empty",
        "no `hosts` and no rules",
    ),
    ("version-missing.toml", "1:1", "version", "missing"),
    ("no-protocol.toml", "2:1", "base.ingress[0]", "no protocol"),
    (
        "bad-default.toml",
        "3:11",
        "defaults.ingress",
        "\"drop\" or \"allow\"",
    ),
    ("toml-syntax.toml", "3:6", "", "invalid TOML"),
];

#[test]
fn every_malformed_policy_fails_with_file_line_column_and_field() {
    let mut failures = Vec::new();
    for (file, loc, field, word) in BAD {
        let path = format!("tests/bad-policies/{file}");
        let out = segbpf(&["check", "--policy", &path]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let want = format!("{path}:{loc}: {field}");
        if out.status.code() != Some(1) || !stderr.contains(&want) || !stderr.contains(word) {
            failures.push(format!(
                "{file}: exit {:?}, want `{want}` and `{word}` in: {stderr}",
                out.status.code()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(segbpf(&["check"]).status.code(), Some(2));
    assert_eq!(segbpf(&["no-such-command"]).status.code(), Some(2));
    let out = segbpf(&[
        "explain",
        "--policy",
        "../examples/roles.toml",
        "--role",
        "db",
        "--src",
        "10.0.0.1",
        "--dst",
        "fd00::1",
        "--proto",
        "tcp",
        "--dport",
        "5432",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "mixed families are a usage error"
    );
}

#[test]
fn explain_names_the_rule_and_its_line() {
    let out = segbpf(&[
        "explain",
        "--policy",
        "../examples/roles.toml",
        "--role",
        "db",
        "--src",
        "10.10.1.25",
        "--dst",
        "10.10.1.30",
        "--proto",
        "tcp",
        "--dport",
        "5432",
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["verdict"], "allow");
    assert_eq!(v["rule"]["label"], "roles.db.ingress[0]");
    assert_eq!(v["rule"]["line"], 59);
    let out = segbpf(&[
        "explain",
        "--policy",
        "../examples/roles.toml",
        "--role",
        "db",
        "--src",
        "10.10.1.15",
        "--dst",
        "10.10.1.30",
        "--proto",
        "tcp",
        "--dport",
        "5432",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("DROP (default-drop)"), "{stdout}");
}

fn check_with_ssh(conn: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_segbpf"))
        .args(["check", "--policy", "../examples/roles.toml"])
        .env("SSH_CONNECTION", conn)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run segbpf")
}

#[test]
fn check_warns_when_the_policy_would_cut_the_current_ssh_session() {
    // From outside admin_net to a db host: blocked, so a warning.
    let out = check_with_ssh("192.0.2.7 51000 10.10.1.30 22");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stderr.contains("would block your SSH session from 192.0.2.7"),
        "{stderr}"
    );
    assert!(stderr.contains("roles: db"), "{stderr}");
    // From admin_net: allowed, no warning.
    let out = check_with_ssh("10.10.0.5 51000 10.10.1.30 22");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("SSH session"), "{stderr}");
}

#[test]
fn lint_warnings_and_deny_warnings() {
    // The example defines `lb` but never uses it.
    let out = segbpf(&["check", "--policy", "../examples/roles.toml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stderr.contains(
            "examples/roles.toml:8:1: sets.lb: set `lb` is used by no rule and no role [unused-set]"
        ),
        "{stderr}"
    );
    let out = segbpf(&[
        "check",
        "--policy",
        "../examples/roles.toml",
        "--deny-warnings",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "--deny-warnings makes them errors"
    );
}

#[test]
fn over_capacity_policy_is_rejected_with_limit_and_count() {
    let out = segbpf(&[
        "check",
        "--policy",
        "../examples/roles.toml",
        "--peer-entries",
        "4",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("SEG_PEER_V4, which holds at most 4"),
        "{stderr}"
    );
    assert!(
        stderr.contains("needs 60 entries"),
        "names the count: {stderr}"
    );
}
