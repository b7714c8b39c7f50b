//! `segbpf check` as a user runs it: the example passes (exit 0), every
//! malformed policy in `bad-policies/` fails with exit 1 and an error that
//! names the file, line, column and field, and usage errors exit 2. Also
//! the JSON of `check` and `explain`, nothing on stdout when a command
//! fails, and a closed stdout (`| head -1`) ending a command quietly.
//! No privileges needed: `check` and `explain` never touch the kernel.
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
        stderr.contains("would block your SSH session's packets from 192.0.2.7"),
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
            "examples/roles.toml:8:1: warning: sets.lb: set `lb` is used by no rule and no role [unused-set]"
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
    // The count (6 since the peer trie writes the class of the gaps as one
    // default entry; 60 before): a number above the limit.
    let needs = stderr
        .split("needs ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse::<u32>().ok());
    assert!(
        needs.is_some_and(|n| n > 4) && stderr.contains(" entries in SEG_PEER_V4"),
        "names the count: {stderr}"
    );
}

/// A scratch directory under the system's temp dir, removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("segbpf-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    fn file(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write scratch file");
        path.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A policy with a lint warning at a line (`unused-set`) and one about the
/// whole file (`no-ssh-path`: nothing allows SSH from a specific set).
const LINTED: &str = r#"version = 1

[sets]
unused = ["10.0.0.0/8"]

[[base.ingress]]
from = "any"
tcp = [80]
"#;

#[test]
fn check_json_has_the_results_and_the_lint_warnings() {
    let dir = Scratch::new("json");
    let policy = dir.file("linted.toml", LINTED);
    let out = segbpf(&["check", "--policy", &policy, "--output", "json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(v["policy"], policy.as_str());
    assert_eq!(v["rules"], 1);
    let warnings = v["warnings"].as_array().expect("warnings");
    let unused = warnings
        .iter()
        .find(|w| w["kind"] == "unused-set")
        .expect("unused-set");
    assert_eq!(unused["file"], policy.as_str());
    assert_eq!(unused["line"], 4);
    assert_eq!(unused["column"], 1);
    assert_eq!(unused["field"], "sets.unused");
    assert!(
        unused["message"]
            .as_str()
            .unwrap()
            .contains("used by no rule"),
        "{unused}"
    );
    let ssh = warnings
        .iter()
        .find(|w| w["kind"] == "no-ssh-path")
        .expect("no-ssh-path");
    assert_eq!(ssh["file"], policy.as_str());
    for absent in ["line", "column", "field"] {
        assert!(ssh.get(absent).is_none(), "{absent} in {ssh}");
    }
    // -o and the example: its one warning is in the document too.
    let out = segbpf(&["check", "-p", "../examples/roles.toml", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(v["compiled"].as_array().map(Vec::len), Some(3), "{v}");
    assert_eq!(v["compiled"][2]["roles"][0], "db");
    assert_eq!(v["warnings"][0]["kind"], "unused-set");
    assert_eq!(v["warnings"][0]["line"], 8);
}

#[test]
fn each_lint_line_names_the_file_once() {
    let dir = Scratch::new("lint");
    let policy = dir.file("ok.toml", LINTED);
    let out = segbpf(&["check", "--policy", &policy]);
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("warning:")).collect();
    assert!(lines.len() >= 2, "{stderr}");
    for l in &lines {
        assert!(l.starts_with(&format!("{policy}:")), "{l}");
        assert_eq!(l.matches("ok.toml").count(), 1, "{l}");
    }
    assert!(
        lines.contains(&format!("{policy}:4:1: warning: sets.unused: set `unused` is used by no rule and no role [unused-set]").as_str()),
        "{stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{policy}: warning: no ingress rule allows SSH"))),
        "{stderr}"
    );
}

#[test]
fn a_failed_check_prints_nothing_on_stdout() {
    let out = segbpf(&[
        "check",
        "--peer-entries",
        "10",
        "--policy",
        "../examples/roles.toml",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds at most 10"));
    for output in ["text", "json"] {
        let out = segbpf(&[
            "check",
            "--policy",
            "../examples/roles.toml",
            "--deny-warnings",
            "--output",
            output,
        ]);
        assert_eq!(out.status.code(), Some(1));
        if output == "text" {
            assert!(out.stdout.is_empty(), "{output}");
        } else {
            // Under -o json the failure is a JSON error object on stdout.
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            assert_eq!(v["ok"], false, "{v}");
            assert!(
                v["errors"][0]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("--deny-warnings")),
                "{v}"
            );
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("warning: sets.lb"), "{output}: {stderr}");
    }
}

/// `many-errors.toml` has five mistakes: `check` reports each, with file,
/// line, column and field, and a hint where one helps (issue 22).
const MANY: &[(&str, &str)] = &[
    ("4:8: sets.web[0]: bad address", ""),
    (
        "6:1: defaults.ingres: unknown key `ingres`",
        "did you mean `ingress`?",
    ),
    (
        "9:13: roles.web.ingres: unknown key `ingres`",
        "did you mean `ingress`?",
    ),
    (
        "13:8: roles.web.ingress[0].from: unknown set `admin`",
        "did you mean `admins`?",
    ),
    (
        "14:8: roles.web.ingress[0].tcp[0]: bad port",
        "`ssh` is a service name; write its port number: 22",
    ),
];

#[test]
fn check_reports_every_error_with_hints() {
    let path = "tests/bad-policies/many-errors.toml";
    let out = segbpf(&["check", path]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty());
    let lines: Vec<&str> = stderr.lines().collect();
    for (at, hint) in MANY {
        let want = format!("{path}:{at}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&want) && l.contains(hint)),
            "want `{want}` … `{hint}` in:\n{stderr}"
        );
    }
    // Nothing reported twice or as a consequence of another mistake (the
    // broken set `web` is not also "unknown" where `hosts` names it).
    assert_eq!(lines.len(), MANY.len() + 1, "{stderr}");
    assert!(stderr.contains("5 error(s)"), "{stderr}");
}

#[test]
fn check_json_on_a_bad_file_is_an_error_object_on_stdout() {
    let path = "tests/bad-policies/many-errors.toml";
    let out = segbpf(&["check", "-p", path, "-o", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON document");
    assert_eq!(v["ok"], false, "{v}");
    // The policy by its canonical path (docs/json.md).
    let canonical = std::fs::canonicalize(path).expect("the file");
    assert_eq!(v["policy"], canonical.display().to_string().as_str(), "{v}");
    let errors = v["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), MANY.len(), "{v}");
    let e = &errors[3];
    assert_eq!(
        (
            &e["file"],
            &e["line"],
            &e["column"],
            &e["field"],
            &e["hint"]
        ),
        (
            &serde_json::json!(path),
            &serde_json::json!(13),
            &serde_json::json!(8),
            &serde_json::json!("roles.web.ingress[0].from"),
            &serde_json::json!("did you mean `admins`?")
        ),
        "{v}"
    );
    // A file that cannot be read is an error object too.
    let out = segbpf(&["check", "no-such.toml", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON document");
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot read")),
        "{v}"
    );
}

#[test]
fn check_takes_the_policy_as_a_positional_argument() {
    let out = segbpf(&["check", "../examples/roles.toml"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("9 rules"));
    // Both forms at once is a usage error.
    let out = segbpf(&[
        "check",
        "../examples/roles.toml",
        "-p",
        "../examples/roles.toml",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn unknown_role_says_which_was_meant() {
    let out = segbpf(&["check", "../examples/roles.toml", "--role", "dbs"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("unknown role `dbs`; did you mean `db`?"),
        "{stderr}"
    );
}

const EXPLAIN_DB: &[&str] = &[
    "explain",
    "--policy",
    "../examples/roles.toml",
    "--role",
    "db",
    "--src",
    "10.10.1.25",
    "--dst",
    "10.10.1.30",
    "-o",
    "json",
];

#[test]
fn explain_json_names_the_protocol_and_leaves_out_what_does_not_apply() {
    let out = segbpf(&[EXPLAIN_DB, &["--proto", "tcp", "--dport", "5432"]].concat());
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let p = &v["packet"];
    assert_eq!(p["proto"], "tcp", "{v}");
    assert_eq!(p["dport"], 5432);
    assert!(p.get("icmp_type").is_none(), "{v}");
    let out = segbpf(&[EXPLAIN_DB, &["--proto", "icmp"]].concat());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let p = &v["packet"];
    assert_eq!(p["proto"], "icmp", "{v}");
    assert_eq!(p["icmp_type"], 8);
    assert!(p.get("dport").is_none(), "{v}");
    assert!(v.get("rule").is_none(), "no rule allowed it: {v}");
    let out = segbpf(&[EXPLAIN_DB, &["--proto", "47"]].concat());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["packet"]["proto"], "47", "{v}");
    assert!(v["packet"].get("dport").is_none(), "{v}");
    assert!(v["packet"].get("icmp_type").is_none(), "{v}");
}

/// Runs segbpf with a stdout whose reader is already gone: every write
/// fails with EPIPE (Rust ignores SIGPIPE).
fn segbpf_closed_stdout(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_segbpf"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run segbpf")
}

/// State and pin roots of a host with no attachment (`status` reads
/// them unprivileged).
fn empty_roots(dir: &Scratch) -> [(String, String); 2] {
    let bpffs = dir.0.join("bpffs");
    let state = dir.0.join("state");
    std::fs::create_dir_all(&bpffs).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    [
        ("SEGBPF_BPFFS".into(), bpffs.display().to_string()),
        ("SEGBPF_STATE_DIR".into(), state.display().to_string()),
    ]
}

#[test]
fn a_closed_stdout_ends_a_command_quietly_with_status_0() {
    let dir = Scratch::new("epipe");
    let roots = empty_roots(&dir);
    let env: Vec<(&str, &str)> = roots
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let explain = [EXPLAIN_DB, &["--proto", "tcp", "--dport", "5432"]].concat();
    for args in [
        &["check", "--policy", "../examples/roles.toml"][..],
        &["check", "--policy", "../examples/roles.toml", "-o", "json"],
        &explain,
        &["status"],
        &["status", "-o", "json"],
        &[
            "export",
            "nft",
            "--policy",
            "../examples/roles.toml",
            "--role",
            "db",
        ],
    ] {
        let out = segbpf_closed_stdout(args, &env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(!stderr.contains("error"), "{args:?}: {stderr}");
    }
}

#[test]
fn status_piped_into_head_exits_0_without_a_panic() {
    let dir = Scratch::new("head");
    let roots = empty_roots(&dir);
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' status | head -1",
            env!("CARGO_BIN_EXE_segbpf")
        ))
        .envs(roots.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "segbpf is not attached to any interface"
    );
}

fn explain_json(args: &[&str]) -> serde_json::Value {
    let out = segbpf(
        &[
            &["explain", "../examples/roles.toml"][..],
            args,
            &["-o", "json"],
        ]
        .concat(),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn explain_infers_the_role_and_the_direction_from_the_addresses() {
    // app -> db: judged where it arrives, on a db host (its `hosts`).
    let v = explain_json(&[
        "--src",
        "10.10.1.25",
        "--dst",
        "10.10.1.30",
        "--proto",
        "tcp",
        "--dport",
        "5432",
    ]);
    assert_eq!(
        (&v["direction"], &v["roles"], &v["verdict"]),
        (
            &serde_json::json!("ingress"),
            &serde_json::json!(["db"]),
            &serde_json::json!("allow")
        ),
        "{v}"
    );
    // db -> backup (no role holds 10.10.2.50): leaves a db host.
    let v = explain_json(&[
        "--src",
        "10.10.1.30",
        "--dst",
        "10.10.2.50",
        "--proto",
        "tcp",
        "--dport",
        "873",
    ]);
    assert_eq!(
        (&v["direction"], &v["roles"]),
        (&serde_json::json!("egress"), &serde_json::json!(["db"])),
        "{v}"
    );
    // The same with --role: the role's hosts say which end the host is.
    let v = explain_json(&[
        "--role",
        "db",
        "--src",
        "10.10.1.30",
        "--dst",
        "10.10.2.50",
        "--proto",
        "tcp",
        "--dport",
        "873",
    ]);
    assert_eq!(v["direction"], "egress", "{v}");
    // --direction egress judges app -> db where it leaves, on the app host.
    let v = explain_json(&[
        "--src",
        "10.10.1.25",
        "--dst",
        "10.10.1.30",
        "--proto",
        "tcp",
        "--dport",
        "5432",
        "--direction",
        "egress",
    ]);
    assert_eq!(v["roles"], serde_json::json!(["app"]), "{v}");
    // Neither address has a role: say so and ask for --role.
    let out = segbpf(&[
        "explain",
        "../examples/roles.toml",
        "--src",
        "192.0.2.1",
        "--dst",
        "192.0.2.2",
        "--proto",
        "udp",
        "--dport",
        "53",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--role"));
}

#[test]
fn explain_text_shows_the_icmp_type_it_was_given() {
    let out = segbpf(&[
        "explain",
        "../examples/roles.toml",
        "--role",
        "db",
        "--src",
        "10.10.1.25",
        "--dst",
        "10.10.1.30",
        "--proto",
        "icmp",
        "--icmp-type",
        "13",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout
            .lines()
            .next()
            .is_some_and(|l| l.contains("icmp type 13")),
        "{stdout}"
    );
    assert!(!stdout.contains("icmp/0"), "{stdout}");
}

/// A JSON document of docs/json.md on stdout: parsed, with its version.
fn json_doc(out: &std::process::Output) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(v["schema"], 1, "{v}");
    v
}

/// docs/json.md's error document: kind, message (as on stderr), status.
fn assert_json_error(out: &std::process::Output, kind: &str, status: i32) -> serde_json::Value {
    let v = json_doc(out);
    assert_eq!(out.status.code(), Some(status), "{v}");
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"]["kind"], kind, "{v}");
    let message = v["error"]["message"].as_str().expect("a message");
    assert!(
        !message.is_empty() && String::from_utf8_lossy(&out.stderr).contains(message),
        "{v}"
    );
    v
}

/// A policy whose web rule has a name, for `export`.
const NAMED: &str = r#"version = 1
[sets]
web_nodes = ["198.18.1.10"]
[roles.web]
hosts = "web_nodes"
[[roles.web.ingress]]
name = "web-in"
from = "any"
tcp = [443]
[[base.ingress]]
from = "any"
tcp = [22]
"#;

#[test]
fn json_of_the_file_commands_follows_docs_json() {
    // check: the result, then a bad file's error document.
    let v = json_doc(&segbpf(&["check", "../examples/roles.toml", "-o", "json"]));
    assert!(v.get("ok").is_none() && v["compiled"].is_array(), "{v}");
    // Policy files by their canonical path, whatever path was given.
    let example = std::fs::canonicalize(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/roles.toml"
    ))
    .expect("the example")
    .display()
    .to_string();
    assert_eq!(v["policy"], example.as_str(), "{v}");
    let v = json_doc(&segbpf(&[
        "export",
        "nft",
        "-p",
        "../examples/roles.toml",
        "-o",
        "json",
    ]));
    assert_eq!(v["policy"], example.as_str(), "{v}");
    // A usage error's document has clap's whole message: the names of the
    // missing arguments too.
    let v = assert_json_error(&segbpf(&["export", "nft", "-o", "json"]), "usage", 2);
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("required arguments were not provided") && message.contains("--policy"),
        "{v}"
    );
    let out = segbpf(&["check", "tests/bad-policies/many-errors.toml", "-o", "json"]);
    let v = assert_json_error(&out, "failure", 1);
    assert!(
        v["errors"]
            .as_array()
            .is_some_and(|e| e.len() == MANY.len()),
        "{v}"
    );

    // explain: verdict and the rule object.
    let v = json_doc(&segbpf(
        &[EXPLAIN_DB, &["--proto", "tcp", "--dport", "5432"]].concat(),
    ));
    assert_eq!(v["verdict"], "allow", "{v}");
    assert!(
        v["rule"]["id"].is_u64() && v["rule"]["line"].is_u64(),
        "{v}"
    );
    assert!(
        v["rule"]["label"].is_string() && v["rule"]["services"].is_string(),
        "{v}"
    );

    // export: the ruleset in a document, and the rules left out named by
    // their name (text: at the top of the ruleset, and on stderr).
    let dir = Scratch::new("export");
    let policy = dir.file("named.toml", NAMED);
    let out = segbpf(&["export", "nft", "-p", &policy, "-o", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let v = json_doc(&out);
    assert_eq!(v["format"], "nft", "{v}");
    assert_eq!(v["roles"], serde_json::json!([]), "{v}");
    assert!(
        v["ruleset"]
            .as_str()
            .is_some_and(|r| r.contains("table inet segbpf {")),
        "{v}"
    );
    let left = v["left_out"].as_array().expect("left_out");
    assert_eq!(left.len(), 1, "{v}");
    assert_eq!(left[0]["rule"]["name"], "web-in", "{v}");
    assert_eq!(left[0]["rule"]["label"], "roles.web.ingress[0]", "{v}");
    assert_eq!(left[0]["why"], "role web not given", "{v}");
    let out = segbpf(&["export", "nft", "-p", &policy]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("#   web-in (roles.web.ingress[0], line 6): role web not given"),
        "{text}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("left out 1 rule(s)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_doc(&segbpf(&[
        "export", "nft", "-p", &policy, "--role", "web", "-o", "json",
    ]));
    assert_eq!(v["left_out"], serde_json::json!([]), "{v}");

    // status with nothing attached: an object, other namespaces listed.
    let roots = empty_roots(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_segbpf"))
        .args(["status", "-o", "json"])
        .envs(roots.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run segbpf");
    let v = json_doc(&out);
    assert_eq!(v["attachments"], serde_json::json!([]), "{v}");
    assert_eq!(v["other_netns"], serde_json::json!([]), "{v}");

    // Errors: usage (while parsing, and after), failure.
    assert_json_error(
        &segbpf(&[
            "explain",
            "-p",
            "../examples/roles.toml",
            "--src",
            "10.10.1.25",
            "-o",
            "json",
        ]),
        "usage",
        2,
    );
    assert_json_error(
        &segbpf(&[EXPLAIN_DB, &["--proto", "tcp"]].concat()),
        "usage",
        2,
    );
    assert_json_error(
        &segbpf(&["export", "nft", "-p", "no-such.toml", "--output=json"]),
        "failure",
        1,
    );
    // import: the policy text and the warnings.
    let rules = dir.file(
        "web.rules",
        "*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n",
    );
    let v = json_doc(&segbpf(&[
        "import",
        "iptables",
        "--host",
        &format!("web={rules}"),
        "-o",
        "json",
    ]));
    assert!(
        v["policy"]
            .as_str()
            .is_some_and(|p| p.contains("tcp = [22]")),
        "{v}"
    );
    assert!(v["warnings"].is_array(), "{v}");

    // A port with a protocol that has none, an ICMP type with tcp: usage.
    let v = assert_json_error(
        &segbpf(&[EXPLAIN_DB, &["--proto", "icmp", "--dport", "22"]].concat()),
        "usage",
        2,
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--dport")),
        "{v}"
    );
    assert_json_error(
        &segbpf(
            &[
                EXPLAIN_DB,
                &["--proto", "tcp", "--dport", "22", "--icmp-type", "8"],
            ]
            .concat(),
        ),
        "usage",
        2,
    );
    // monitor: -o json contradicts --log-format text (a usage error before
    // anything is looked up).
    assert_json_error(
        &segbpf(&["monitor", "eth0", "-o", "json", "--log-format", "text"]),
        "usage",
        2,
    );

    // Without -o json, nothing on stdout.
    let out = segbpf(&["export", "nft", "-p", "no-such.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
}
