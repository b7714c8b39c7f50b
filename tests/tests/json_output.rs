//! `--output json` of the commands that change an attachment: `reload`
//! (with and without `--confirm`), `confirm`, `set add|del`, `rollback`
//! and `detach` each print one JSON document with the attachment, the
//! generation in force and what changed; the text forms are unchanged. A
//! command that fails prints nothing on stdout, or under `-o json` the
//! error document of docs/json.md, and `status` with a closed
//! stdout (`| head -1`) ends quietly with status 0.
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::process::{Command, Stdio};

use segbpf_tests::{Lab, lab::segbpf_bin};

fn example() -> String {
    format!("{}/../examples/roles.toml", env!("CARGO_MANIFEST_DIR"))
}

fn json(lab: &Lab, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = lab.segbpf_ok("db", args)?;
    serde_json::from_str(&out).map_err(|e| anyhow::anyhow!("{args:?}: {e}: {out}"))
}

/// The JSON fields every swap result has, checked against `generation`.
fn assert_swap(v: &serde_json::Value, generation: u64, ns: &str) {
    assert_eq!(v["schema"], 1, "docs/json.md's version: {v}");
    assert_eq!(v["iface"], "eth0", "{v}");
    assert_eq!(v["netns"], ns, "{v}");
    assert!(v["netns_inode"].as_u64().is_some(), "{v}");
    assert_eq!(v["applied"], true, "{v}");
    assert_eq!(v["generation"], generation, "{v}");
    assert_eq!(v["roles"], serde_json::json!(["db"]), "{v}");
    assert!(v["rules"].as_u64().is_some_and(|n| n > 0), "{v}");
    assert!(v["pruned"].as_u64().is_some(), "{v}");
    assert_eq!(v["warnings"], serde_json::json!([]), "{v}");
    assert!(
        v["policy"].as_str().is_some_and(|p| std::path::Path::new(p)
            .extension()
            .is_some_and(|e| e == "toml")),
        "{v}"
    );
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn changing_commands_print_one_json_document() -> anyhow::Result<()> {
    let mut lab = Lab::new("json")?;
    lab.add_host("db", &["10.10.1.30/16"])?;
    lab.attach("db", &example(), &["--role", "db"])?;
    let ns = lab.host("db").ns.name.clone();

    // Text stays as it was.
    let text = lab.segbpf_ok("db", &["reload", "eth0"])?;
    assert!(
        text.starts_with("reloaded ") && text.contains(" on eth0: generation 2 applied, roles db"),
        "{text}"
    );

    let v = json(&lab, &["reload", "eth0", "--output", "json"])?;
    assert_swap(&v, 3, &ns);
    assert!(v.get("confirm_secs").is_none(), "{v}");

    let v = json(
        &lab,
        &["set", "add", "eth0", "admin_net", "10.99.0.1", "-o", "json"],
    )?;
    assert_swap(&v, 4, &ns);
    assert_eq!(v["op"], "add");
    assert_eq!(v["set"], "admin_net");
    assert_eq!(v["changed"], 1);
    let v = json(
        &lab,
        &["set", "del", "eth0", "admin_net", "10.99.0.1", "-o", "json"],
    )?;
    assert_swap(&v, 5, &ns);
    assert_eq!(v["op"], "del");
    assert_eq!(v["changed"], 1);

    let v = json(&lab, &["reload", "eth0", "--confirm", "600", "-o", "json"])?;
    assert_swap(&v, 6, &ns);
    assert_eq!(v["confirm_secs"], 600);
    let v = json(&lab, &["confirm", "eth0", "-o", "json"])?;
    assert_eq!(v["iface"], "eth0");
    assert_eq!(v["netns"], ns.as_str());
    assert_eq!(v["generation"], 6);
    assert_eq!(v["confirmed"], true);
    assert_eq!(v["schema"], 1, "{v}");

    let v = json(&lab, &["rollback", "eth0", "-o", "json"])?;
    assert_swap(&v, 7, &ns);
    assert_eq!(v["restored_generation"], 5, "{v}");
    assert!(
        v["source"]
            .as_str()
            .is_some_and(|s| s.ends_with("roles.toml")),
        "{v}"
    );

    // Failures print nothing on stdout as text; under -o json, the error
    // document of docs/json.md (the same message as stderr's).
    for args in [
        &["confirm", "eth0"][..],
        &["set", "add", "eth0", "no_such_set", "10.99.0.2"],
    ] {
        let out = lab.segbpf("db", args)?;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            out.stdout.is_empty(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    for args in [
        &["confirm", "eth0", "-o", "json"][..],
        &["set", "del", "eth0", "admin_net", "10.99.0.2", "-o", "json"],
    ] {
        let out = lab.segbpf("db", args)?;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            anyhow::anyhow!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout))
        })?;
        assert_eq!(v["schema"], 1, "{v}");
        assert_eq!(v["ok"], false, "{v}");
        assert_eq!(v["error"]["kind"], "failure", "{v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !message.is_empty() && String::from_utf8_lossy(&out.stderr).contains(message),
            "{args:?}: {v}"
        );
    }

    // status with many lines and a closed stdout: exit 0, no panic.
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let out = Command::new(segbpf_bin())
        .args(["--netns", &ns, "status"])
        .env("SEGBPF_BPFFS", &lab.bpffs)
        .env("SEGBPF_STATE_DIR", &lab.state)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let v = json(&lab, &["detach", "eth0", "-o", "json"])?;
    assert_eq!(v["iface"], "eth0");
    assert_eq!(v["netns"], ns.as_str());
    assert_eq!(v["detached"], true);
    assert_eq!(v["was_attached"], true);
    Ok(())
}
