//! At the keyboard (issue 22): `segbpf history` lists the generations an
//! attachment's history keeps, `segbpf diff` shows two generations or a
//! file against what is in force, `rollback --to N` restores any kept
//! generation and a second `rollback` goes further back rather than
//! undoing the first; `trace --tcp-flags` sets the flags of the packet it
//! runs through the loaded program. What is in force is judged by the
//! program in the kernel (`trace`), not by reading files. Every command's
//! JSON follows docs/json.md (version, times, rule object, verdict, flags,
//! error documents), and `status` lists every namespace's attachments
//! (`--all-netns`), labels audit mode and says how long ago. A rollback
//! across set edits restores their members exactly, or refuses when the
//! history's record of them is missing or changed.
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use segbpf_tests::{
    Lab,
    lab::{Running, one_tcp_port_policy},
};

const HOST: &str = "198.18.5.2";

/// A lab with host `srv` attached with the policy opening tcp/81, then
/// reloaded with tcp/82 and tcp/83: generations 1, 2 and 3.
fn three_generations(tag: &str) -> anyhow::Result<(Lab, Vec<String>)> {
    let mut lab = Lab::new(tag)?;
    lab.add_host("srv", &[&format!("{HOST}/24")])?;
    let mut files = Vec::new();
    for port in [81, 82, 83] {
        let p = lab.write_policy(&format!("p{port}.toml"), &one_tcp_port_policy(port))?;
        files.push(p.display().to_string());
    }
    lab.attach("srv", &files[0], &["--role", "srv"])?;
    for f in &files[1..] {
        lab.segbpf_ok("srv", &["reload", "eth0", "--policy", f])?;
    }
    Ok((lab, files))
}

fn json(lab: &Lab, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = lab.segbpf_ok("srv", args)?;
    serde_json::from_str(&out).map_err(|e| anyhow::anyhow!("{args:?}: {e}: {out}"))
}

/// The one port of 81-83 the program on `srv` lets a new connection in on.
fn open_port(lab: &Lab) -> anyhow::Result<Vec<u16>> {
    let mut open = Vec::new();
    for port in [81u16, 82, 83] {
        let p = port.to_string();
        let v = json(
            lab,
            &[
                "trace",
                "eth0",
                "--src",
                "198.18.5.9",
                "--dst",
                HOST,
                "--proto",
                "tcp",
                "--dport",
                &p,
                "-o",
                "json",
            ],
        )?;
        if v["verdict"] == "allow" {
            open.push(port);
        }
    }
    Ok(open)
}

fn restored(v: &serde_json::Value) -> Option<u64> {
    v["restored_generation"].as_u64()
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn history_lists_generations_and_rollbacks_walk_back() -> anyhow::Result<()> {
    let (lab, files) = three_generations("hist")?;
    assert_eq!(open_port(&lab)?, vec![83]);

    let h = json(&lab, &["history", "eth0", "-o", "json"])?;
    assert_eq!(h["in_force"], 3, "{h}");
    let gens: Vec<(u64, String, bool)> = h["generations"]
        .as_array()
        .expect("generations")
        .iter()
        .map(|g| {
            (
                g["generation"].as_u64().unwrap_or(0),
                g["source"].as_str().unwrap_or("").to_string(),
                g["in_force"] == true,
            )
        })
        .collect();
    assert_eq!(
        gens,
        vec![
            (1, files[0].clone(), false),
            (2, files[1].clone(), false),
            (3, files[2].clone(), true)
        ],
        "{h}"
    );
    assert!(h["generations"][0]["recorded"].as_str().is_some(), "{h}");
    let text = lab.segbpf_ok("srv", &["history", "eth0"])?;
    assert!(
        text.lines()
            .any(|l| l.starts_with("*      3") && l.ends_with("p83.toml")),
        "{text}"
    );

    // Rollback, then rollback again: 2, then 1, each checked in the kernel.
    let v = json(&lab, &["rollback", "eth0", "-o", "json"])?;
    assert_eq!(
        (restored(&v), v["generation"].as_u64()),
        (Some(2), Some(4)),
        "{v}"
    );
    assert_eq!(open_port(&lab)?, vec![82]);
    let v = json(&lab, &["rollback", "eth0", "-o", "json"])?;
    assert_eq!(
        restored(&v),
        Some(1),
        "a second rollback goes further back: {v}"
    );
    assert_eq!(open_port(&lab)?, vec![81]);
    let out = lab.segbpf("srv", &["rollback", "eth0"])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("oldest kept"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        open_port(&lab)?,
        vec![81],
        "a refused rollback changes nothing"
    );

    // --to picks any generation kept; history says what each rollback restored.
    let v = json(&lab, &["rollback", "eth0", "--to", "3", "-o", "json"])?;
    assert_eq!(restored(&v), Some(3), "{v}");
    assert_eq!(open_port(&lab)?, vec![83]);
    let h = json(&lab, &["history", "eth0", "-o", "json"])?;
    let marks: Vec<(u64, Option<u64>)> = h["generations"]
        .as_array()
        .expect("generations")
        .iter()
        .map(|g| {
            (
                g["generation"].as_u64().unwrap_or(0),
                g["restored"].as_u64(),
            )
        })
        .collect();
    assert_eq!(
        marks,
        vec![
            (1, None),
            (2, None),
            (3, None),
            (4, Some(2)),
            (5, Some(1)),
            (6, Some(3))
        ],
        "{h}"
    );
    let out = lab.segbpf("srv", &["rollback", "eth0", "--to", "42"])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the history"));
    assert_eq!(open_port(&lab)?, vec![83]);
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn diff_shows_generations_and_a_file_against_what_is_in_force() -> anyhow::Result<()> {
    let (lab, files) = three_generations("diff")?;
    let v = json(&lab, &["diff", "eth0", "1", "3", "-o", "json"])?;
    assert_eq!(v["differ"], true, "{v}");
    assert_eq!(
        v["lines"],
        serde_json::json!([
            {"op": "del", "line": "tcp = [81]"},
            {"op": "add", "line": "tcp = [83]"}
        ]),
        "{v}"
    );
    assert_eq!(v["from"]["generation"], 1);
    assert_eq!(v["to"]["generation"], 3);

    // The file the attachment came from is what is in force.
    let v = json(&lab, &["diff", "eth0", "-o", "json"])?;
    assert_eq!(v["differ"], false, "{v}");
    assert_eq!(
        lab.segbpf("srv", &["diff", "eth0", "--exit-code"])?
            .status
            .code(),
        Some(0)
    );

    // A candidate file against what is in force, as text.
    let cand = lab.write_policy("cand.toml", &one_tcp_port_policy(8443))?;
    let cand = cand.display().to_string();
    let out = lab.segbpf("srv", &["diff", "eth0", &cand, "--exit-code"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "--exit-code: they differ");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("--- generation 3 (") && lines[0].contains(&files[2]),
        "{text}"
    );
    assert_eq!(lines[1], format!("+++ {cand}"), "{text}");
    assert!(
        lines.contains(&"-tcp = [83]") && lines.contains(&"+tcp = [8443]"),
        "{text}"
    );

    // A generation the history does not keep is an error naming those kept.
    let out = lab.segbpf("srv", &["diff", "eth0", "9"])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("kept: 1, 2, 3"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn trace_sets_the_tcp_flags_it_was_given() -> anyhow::Result<()> {
    let (lab, _) = three_generations("tflags")?;
    let base = [
        "trace",
        "eth0",
        "--src",
        "198.18.5.9",
        "--dst",
        HOST,
        "--proto",
        "tcp",
        "--dport",
        "83",
    ];
    let text = lab.segbpf_ok("srv", &base)?;
    assert!(
        text.contains("tcp/83 [S]: ALLOW"),
        "a SYN by default: {text}"
    );
    let text = lab.segbpf_ok("srv", &[&base[..], &["--tcp-flags", "SA"]].concat())?;
    assert!(text.contains("tcp/83 [SA]"), "{text}");
    let text = lab.segbpf_ok("srv", &[&base[..], &["--tcp-flags", "RST,ACK"]].concat())?;
    assert!(text.contains("tcp/83 [AR]"), "{text}");
    for bad in [&["--tcp-flags", "SX"][..], &["--tcp-flags", "FOO,ACK"][..]] {
        let out = lab.segbpf("srv", &[&base[..], bad].concat())?;
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
    }
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn rollback_puts_back_the_roles_of_the_generation_it_restores() -> anyhow::Result<()> {
    let mut lab = Lab::new("kbroles")?;
    lab.add_host("srv", &[&format!("{HOST}/24")])?;
    let a = lab.write_policy("a.toml", &one_tcp_port_policy(81))?;
    let b = one_tcp_port_policy(82).replace("roles.srv", "roles.web");
    let b = lab.write_policy("b.toml", &b)?;
    // Roles from the addresses: srv, then renamed web by --redetect-roles.
    lab.attach("srv", &a.display().to_string(), &[])?;
    let b = b.display().to_string();
    lab.segbpf_ok(
        "srv",
        &["reload", "eth0", "--policy", &b, "--redetect-roles"],
    )?;
    let v = json(&lab, &["rollback", "eth0", "--to", "1", "-o", "json"])?;
    assert_eq!(v["roles"], serde_json::json!(["srv"]), "{v}");
    assert_eq!(open_port(&lab)?, vec![81]);
    Ok(())
}

/// The policy of the JSON test: a named rule opens tcp/81, a set of admins
/// may reach tcp/22.
const JSON_POLICY: &str = r#"version = 1
[sets]
admins = ["198.18.5.200"]
[defaults]
ingress = "drop"
egress = "allow"
[roles.srv]
hosts = "any"
[[roles.srv.ingress]]
name = "web-in"
from = "any"
tcp = [81]
[[roles.srv.ingress]]
from = "admins"
tcp = [22]
"#;

/// A JSON time of docs/json.md: an RFC 3339 UTC string.
fn is_time(v: &serde_json::Value) -> bool {
    v.as_str()
        .is_some_and(|t| t.len() >= 20 && t.as_bytes()[10] == b'T' && t.ends_with('Z'))
}

/// The fields every document has, and the attachment's.
fn assert_doc(v: &serde_json::Value, ns: &str) {
    assert_eq!(v["schema"], 1, "{v}");
    assert_eq!(v["iface"], "eth0", "{v}");
    assert_eq!(v["netns"], ns, "{v}");
    assert!(v["netns_inode"].as_u64().is_some_and(|i| i > 0), "{v}");
    assert!(v.get("ok").is_none(), "{v}");
}

/// docs/json.md's rule object for the rule named `web-in`.
fn assert_web_in(r: &serde_json::Value) {
    assert!(r["id"].as_u64().is_some(), "{r}");
    assert_eq!(r["name"], "web-in", "{r}");
    assert_eq!(r["label"], "roles.srv.ingress[0]", "{r}");
    assert!(r["line"].as_u64().is_some_and(|l| l > 0), "{r}");
    assert_eq!(r["services"], "tcp/81", "{r}");
}

/// docs/json.md's error document, its exit status and stderr.
fn assert_error(out: &std::process::Output, kind: &str, status: i32) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(out.status.code(), Some(status), "{v}");
    assert_eq!(v["schema"], 1, "{v}");
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"]["kind"], kind, "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        !message.is_empty() && String::from_utf8_lossy(&out.stderr).contains(message),
        "{v}"
    );
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn every_command_speaks_one_json_dialect() -> anyhow::Result<()> {
    let mut lab = Lab::new("dialect")?;
    lab.add_host("srv", &[&format!("{HOST}/24")])?;
    lab.add_host("cli", &["198.18.5.3/24"])?;
    let policy = lab.write_policy("json.toml", JSON_POLICY)?;
    let file = policy.display().to_string();
    lab.attach("srv", &file, &["--role", "srv"])?;
    let ns = lab.host("srv").ns.name.clone();

    // status: times are RFC 3339 strings, the mode is named.
    let v = json(&lab, &["status", "-o", "json"])?;
    assert_eq!(v["schema"], 1, "{v}");
    let att = &v["attachments"][0];
    assert_eq!(att["iface"], "eth0", "{att}");
    assert_eq!(att["mode"], "enforcing", "{att}");
    assert!(is_time(&att["state"]["attached_at"]), "{att}");
    assert!(att["state"]["generation"].as_u64() == Some(1), "{att}");
    // A generation, not a unix time: null while the roles never changed.
    assert!(att["state"]["roles_changed_at"].is_null(), "{att}");
    assert!(att["rules"].as_array().is_some_and(|r| {
        r.iter()
            .any(|x| x["name"] == "web-in" && x["packets"].is_u64())
    }));

    // trace: the attachment, the generation, the packet with its flags by
    // name, the rule object; no numeric `action`.
    let v = json(
        &lab,
        &[
            "trace",
            "eth0",
            "--src",
            "198.18.5.3",
            "--dst",
            HOST,
            "--proto",
            "tcp",
            "--dport",
            "81",
            "-o",
            "json",
        ],
    )?;
    assert_doc(&v, &ns);
    assert_eq!(v["generation"], 1, "{v}");
    assert_eq!(v["verdict"], "allow", "{v}");
    assert_eq!(v["packet"]["tcp_flags"], serde_json::json!(["SYN"]), "{v}");
    assert_eq!(v["packet"]["proto"], "tcp", "{v}");
    assert_eq!(v["packet"]["dport"], 81, "{v}");
    assert!(
        v["return_value"].is_u64() && v.get("action").is_none(),
        "{v}"
    );
    assert_web_in(&v["rule"]);

    // monitor -o json: one object per line, flags by name, verdict + audit.
    let monitor = Running::new(lab.spawn("srv", &["monitor", "eth0", "-o", "json"])?);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let follower = lab.follow_flows("srv", &["--start"])?;
    let _server = segbpf_tests::net::Server::tcp_echo(&ns, HOST.parse()?, 81)?;
    assert!(
        !lab.tcp_reachable("cli", "srv", 9999)?,
        "tcp/9999 is closed"
    );
    assert!(lab.tcp_reachable("cli", "srv", 81)?, "tcp/81 is open");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let events = monitor.json_lines()?;
    let ev = events
        .iter()
        .find(|x| x["type"] == "event" && x["dport"] == 9999)
        .ok_or_else(|| anyhow::anyhow!("no event for tcp/9999: {events:?}"))?;
    assert_eq!(ev["schema"], 1, "{ev}");
    assert_eq!(ev["verdict"], "drop", "{ev}");
    assert_eq!(ev["audit"], false, "{ev}");
    assert!(ev.get("action").is_none(), "{ev}");
    assert!(is_time(&ev["time"]), "{ev}");
    assert_eq!(ev["tcp_flags"], serde_json::json!(["SYN"]), "{ev}");

    // flows --follow -o json: records with the version, host, namespace,
    // verdict and the rule object.
    let records = follower.json_lines()?;
    let rec = records
        .iter()
        .find(|x| x["state"] == "start" && x["dport"] == 81)
        .ok_or_else(|| anyhow::anyhow!("no start record for tcp/81: {records:?}"))?;
    assert_doc(rec, &ns);
    assert!(rec["host"].as_str().is_some_and(|h| !h.is_empty()), "{rec}");
    assert_eq!(rec["verdict"], "allow", "{rec}");
    assert_eq!(rec["audit"], false, "{rec}");
    assert!(
        is_time(&rec["first_seen"]) && is_time(&rec["time"]),
        "{rec}"
    );
    assert_web_in(&rec["rule"]);

    // flows snapshot: the same rule object and flags.
    let v = json(&lab, &["flows", "eth0", "-o", "json"])?;
    assert_doc(&v, &ns);
    let f = v["flows"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["dport"] == 81))
        .ok_or_else(|| anyhow::anyhow!("no flow to tcp/81: {v}"))?;
    assert_web_in(&f["rule"]);
    assert!(
        f["tcp_flags"]
            .as_array()
            .is_some_and(|a| a.contains(&"SYN".into())),
        "{f}"
    );

    // set list: an object, not a bare array.
    let v = json(&lab, &["set", "list", "eth0", "-o", "json"])?;
    assert_doc(&v, &ns);
    assert_eq!(v["generation"], 1, "{v}");
    assert_eq!(v["sets"][0]["name"], "admins", "{v}");
    assert_eq!(
        v["sets"][0]["members"],
        serde_json::json!(["198.18.5.200"]),
        "{v}"
    );
    let v = json(
        &lab,
        &["set", "add", "eth0", "admins", "198.18.5.201", "-o", "json"],
    )?;
    assert_doc(&v, &ns);
    assert_eq!(v["generation"], 2, "{v}");
    // A set add that changes nothing: the attachment still named.
    let v = json(
        &lab,
        &["set", "add", "eth0", "admins", "198.18.5.201", "-o", "json"],
    )?;
    assert_doc(&v, &ns);
    assert_eq!(v["applied"], false, "{v}");

    // reload of a relative path: the policy by its absolute path.
    let cwd = std::env::current_dir()?;
    let relative = format!(
        "{}{}",
        "../".repeat(cwd.components().count() - 1),
        file.trim_start_matches('/')
    );
    let v = json(
        &lab,
        &["reload", "eth0", "--policy", &relative, "-o", "json"],
    )?;
    assert_doc(&v, &ns);
    assert_eq!(v["policy"], file.as_str(), "{v}");
    assert_eq!(v["generation"], 3, "{v}");

    // rollback: `policy` is the file as given, the history's copy apart.
    let v = json(&lab, &["rollback", "eth0", "-o", "json"])?;
    assert_doc(&v, &ns);
    assert_eq!(v["policy"], file.as_str(), "{v}");
    assert!(v["history_file"].as_str().is_some_and(|h| h != file), "{v}");

    // history and diff.
    let v = json(&lab, &["history", "eth0", "-o", "json"])?;
    assert_doc(&v, &ns);
    let gens = v["generations"].as_array().cloned().unwrap_or_default();
    assert!(
        gens.len() >= 3 && gens.iter().all(|g| is_time(&g["recorded"])),
        "{v}"
    );
    let v = json(&lab, &["diff", "eth0", "1", "2", "-o", "json"])?;
    assert_doc(&v, &ns);
    assert!(v["differ"].is_boolean(), "{v}");
    // --exit-code: one document, the diff; the exit status says they differ.
    let out = lab.segbpf(
        "srv",
        &["diff", "eth0", "1", "2", "--exit-code", "-o", "json"],
    )?;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        anyhow::anyhow!(
            "one document: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    assert_eq!(v["differ"], true, "{v}");
    assert!(v.get("error").is_none(), "{v}");

    // Errors: a document on stdout, the exit status as ever.
    assert_error(
        &lab.segbpf("srv", &["status", "eth9", "-o", "json"])?,
        "failure",
        1,
    );
    assert_error(
        &lab.segbpf("srv", &["confirm", "eth0", "-o", "json"])?,
        "failure",
        1,
    );
    assert_error(
        &lab.segbpf("srv", &["trace", "eth0", "--src", HOST, "-o", "json"])?,
        "usage",
        2,
    );
    assert_error(
        &lab.segbpf(
            "srv",
            &[
                "trace",
                "eth0",
                "--src",
                "198.18.5.3",
                "--dst",
                HOST,
                "--proto",
                "tcp",
                "-o",
                "json",
            ],
        )?,
        "usage",
        2,
    );

    let v = json(&lab, &["detach", "eth0", "-o", "json"])?;
    assert_doc(&v, &ns);
    assert_eq!(v["detached"], true, "{v}");
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn status_sees_every_namespace_names_audit_and_says_when() -> anyhow::Result<()> {
    let mut lab = Lab::new("allns")?;
    lab.add_host("srv", &[&format!("{HOST}/24")])?;
    lab.add_host("aud", &["198.18.5.4/24"])?;
    let policy = lab.write_policy("p.toml", &one_tcp_port_policy(81))?;
    let file = policy.display().to_string();
    lab.attach("srv", &file, &["--role", "srv"])?;
    lab.attach("aud", &file, &["--role", "srv", "--audit"])?;
    let aud_ns = lab.host("aud").ns.name.clone();

    // Audit mode is labelled audit, never "enforcing".
    let text = lab.segbpf_ok("aud", &["status"])?;
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.contains("AUDIT") && !first.contains("enforcing"),
        "{text}"
    );
    let v = lab.status_json("aud")?;
    assert_eq!(v["attachments"][0]["mode"], "audit", "{v}");

    // Times for people beside the absolute time.
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("attached:") && l.contains(" ago (")),
        "{text}"
    );

    // From srv's namespace: aud's attachment is mentioned, and listed
    // with --all-netns (judged from aud's own namespace: it is live).
    let text = lab.segbpf_ok("srv", &["status"])?;
    assert!(
        text.contains("other network namespaces have attachments")
            && text.contains(&format!("netns {aud_ns}: eth0")),
        "{text}"
    );
    let v = json(&lab, &["status", "--all-netns", "-o", "json"])?;
    let atts = v["attachments"].as_array().cloned().unwrap_or_default();
    assert_eq!(atts.len(), 2, "{v}");
    let aud = atts
        .iter()
        .find(|a| a["netns"] == aud_ns.as_str())
        .ok_or_else(|| anyhow::anyhow!("no attachment of {aud_ns}: {v}"))?;
    assert_eq!(aud["mode"], "audit", "{aud}");
    assert_eq!(aud["attached"], true, "{aud}");
    assert!(aud["conntrack"]["size"].as_u64() > Some(0), "{aud}");
    let text = lab.segbpf_ok("srv", &["status", "--all-netns"])?;
    assert!(
        text.contains(&format!("eth0 (netns {aud_ns}): AUDIT")),
        "{text}"
    );
    Ok(())
}

/// Two named rules: tcp/81 (`web-in`) and tcp/82 (`alt-in`).
const TWO_RULES: &str = r#"version = 1
[defaults]
ingress = "drop"
egress = "allow"
[roles.srv]
hosts = "any"
[[roles.srv.ingress]]
name = "web-in"
from = "any"
tcp = [81]
[[roles.srv.ingress]]
name = "alt-in"
from = "any"
tcp = [82]
"#;

/// The destination ports of `flows -o json FILTER...`'s flows, sorted.
fn flow_ports(lab: &Lab, filter: &[&str]) -> anyhow::Result<Vec<u64>> {
    let v = json(
        lab,
        &[&["flows", "eth0", "-o", "json"][..], filter].concat(),
    )?;
    let mut ports: Vec<u64> = v["flows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["dport"].as_u64())
        .collect();
    ports.sort_unstable();
    Ok(ports)
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn flows_and_monitor_filter_by_port_peer_verdict_and_rule() -> anyhow::Result<()> {
    let mut lab = Lab::new("filter")?;
    lab.add_host("srv", &[&format!("{HOST}/24")])?;
    lab.add_host("c1", &["198.18.5.3/24"])?;
    lab.add_host("c2", &["198.18.5.4/24"])?;
    let policy = lab.write_policy("two.toml", TWO_RULES)?;
    lab.attach("srv", &policy.display().to_string(), &["--role", "srv"])?;
    let ns = lab.host("srv").ns.name.clone();
    let _s81 = segbpf_tests::net::Server::tcp_echo(&ns, HOST.parse()?, 81)?;
    let _s82 = segbpf_tests::net::Server::tcp_echo(&ns, HOST.parse()?, 82)?;

    let monitor = Running::new(lab.spawn(
        "srv",
        &[
            "monitor",
            "eth0",
            "-o",
            "json",
            "--port",
            "9999",
            "--peer",
            "198.18.5.4",
        ],
    )?);
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert!(lab.tcp_reachable("c1", "srv", 81)?);
    assert!(lab.tcp_reachable("c2", "srv", 82)?);
    for (c, port) in [("c1", 9999), ("c2", 9999), ("c2", 9998)] {
        assert!(!lab.tcp_reachable(c, "srv", port)?, "{c} tcp/{port}");
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    let events = monitor.json_lines()?;
    let shown: Vec<(String, u64)> = events
        .iter()
        .filter(|e| e["type"] == "event")
        .map(|e| {
            (
                e["src"].as_str().unwrap_or("").to_string(),
                e["dport"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert!(
        !shown.is_empty(),
        "c2's drops to tcp/9999 are shown: {events:?}"
    );
    assert!(
        shown
            .iter()
            .all(|(src, port)| src == "198.18.5.4" && *port == 9999),
        "only c2's drops to tcp/9999: {shown:?}"
    );

    assert_eq!(flow_ports(&lab, &[])?, vec![81, 82]);
    assert_eq!(flow_ports(&lab, &["--port", "81"])?, vec![81]);
    assert_eq!(
        flow_ports(&lab, &["--port", "81", "--port", "82"])?,
        vec![81, 82]
    );
    assert_eq!(flow_ports(&lab, &["--peer", "198.18.5.4"])?, vec![82]);
    assert_eq!(flow_ports(&lab, &["--peer", "198.18.5.4/31"])?, vec![82]);
    assert_eq!(flow_ports(&lab, &["--rule", "alt-in"])?, vec![82]);
    assert_eq!(
        flow_ports(&lab, &["--rule", "roles.srv.ingress[0]"])?,
        vec![81]
    );
    assert_eq!(flow_ports(&lab, &["--verdict", "allow"])?, vec![81, 82]);
    assert!(flow_ports(&lab, &["--verdict", "drop"])?.is_empty());
    assert!(flow_ports(&lab, &["--rule", "web-in", "--port", "82"])?.is_empty());

    // Events are drops no rule made: --rule is a usage error with a pointer.
    let out = lab.segbpf("srv", &["monitor", "eth0", "--rule", "web-in"])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("segbpf flows IFACE --follow --rule"));

    // flows --follow --denied-secs, while another process drains: says why
    // it is ignored.
    let first = lab.follow_flows("srv", &[])?;
    let mut second = Running::new(lab.spawn(
        "srv",
        &[
            "flows",
            "eth0",
            "--follow",
            "-o",
            "json",
            "--denied-secs",
            "2",
        ],
    )?);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(second.try_wait()?.is_none(), "the second follower runs");
    second.terminate()?;
    let out = second.wait()?;
    drop(first);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--denied-secs 2 is ignored")
            && stderr.contains("drains the denied tables"),
        "{stderr}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn suggest_sees_the_last_second_while_attach_drains() -> anyhow::Result<()> {
    let mut lab = Lab::new("drainnow")?;
    lab.add_host("srv", &[&format!("{HOST}/24")])?;
    lab.add_host("cli", &["198.18.5.3/24"])?;
    let policy = lab.write_policy("p.toml", &one_tcp_port_policy(81))?;
    // attach in the foreground is the flow log's primary: it drains the
    // denied tables every 10 s.
    let attach = Running::new(lab.spawn(
        "srv",
        &[
            "attach",
            "eth0",
            "--policy",
            policy.to_str().unwrap_or_default(),
            "--role",
            "srv",
        ],
    )?);
    lab.wait_enforcing("srv")?;
    let started = std::time::Instant::now();
    assert!(
        !lab.tcp_reachable("cli", "srv", 7777)?,
        "tcp/7777 is closed"
    );
    // Within attach's first interval: only a drain on demand brings the
    // attempt to the store before suggest reads it.
    let out = lab.segbpf_ok("srv", &["suggest", "eth0"])?;
    let took = started.elapsed();
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("tcp") && l.contains("7777")),
        "the attempt of {took:?} ago is suggested:\n{out}"
    );
    assert!(
        took < std::time::Duration::from_secs(9),
        "{took:?}: the test raced attach's own drain"
    );
    drop(attach);
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn completions_offer_the_names_of_the_namespace_on_the_line() -> anyhow::Result<()> {
    let mut lab = Lab::new("compl")?;
    lab.add_host("srv", &[&format!("{HOST}/24")])?;
    let policy = lab.write_policy("json.toml", JSON_POLICY)?;
    lab.attach("srv", &policy.display().to_string(), &["--role", "srv"])?;
    let ns = lab.host("srv").ns.name.clone();
    // An interface only the lab's namespace has.
    lab.host("srv").ns.ip(&[
        "link", "add", "cmpl0", "type", "veth", "peer", "name", "cmpl1",
    ])?;
    let names = |index: &str, words: &[&str]| -> anyhow::Result<Vec<String>> {
        let out = std::process::Command::new(segbpf_tests::lab::segbpf_bin())
            .args(["complete-names", "--index", index, "--"])
            .args(words)
            .env("SEGBPF_BPFFS", &lab.bpffs)
            .env("SEGBPF_STATE_DIR", &lab.state)
            .output()?;
        anyhow::ensure!(out.status.success(), "{out:?}");
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    };
    // `--netns NS` on the line being completed: that namespace's names.
    let ifaces = names("4", &["segbpf", "--netns", &ns, "status", ""])?;
    assert!(
        ifaces.contains(&"cmpl0".to_string()) && ifaces.contains(&"eth0".to_string()),
        "{ifaces:?}"
    );
    let ifaces = names("3", &["segbpf", "status", &format!("--netns={ns}"), ""])?;
    assert!(ifaces.contains(&"cmpl0".to_string()), "{ifaces:?}");
    // The sets in force on the namespace's attachment.
    let sets = names("6", &["segbpf", "--netns", &ns, "set", "add", "eth0", ""])?;
    assert_eq!(sets, vec!["admins".to_string()], "{sets:?}");
    // Without --netns: this namespace's interfaces, not the lab's.
    let here = names("2", &["segbpf", "status", ""])?;
    assert!(!here.contains(&"cmpl0".to_string()), "{here:?}");
    Ok(())
}

/// Whether the program on `srv` lets `src` open tcp/81.
fn admits(lab: &Lab, src: &str) -> anyhow::Result<bool> {
    let v = json(
        lab,
        &[
            "trace", "eth0", "--src", src, "--dst", HOST, "--proto", "tcp", "--dport", "81", "-o",
            "json",
        ],
    )?;
    Ok(v["verdict"] == "allow")
}

/// A rollback across set edits restores exactly the members in force then
/// (kept beside the history's index, `GENERATION.sets.json`); a changed or
/// missing members file withdraws its generation: `rollback` refuses it
/// and changes nothing, `history` no longer lists it. Judged by the
/// program in the kernel (`trace`).
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn a_rollback_across_set_edits_restores_the_members_or_refuses() -> anyhow::Result<()> {
    let mut lab = Lab::new("hsets")?;
    lab.add_host("srv", &[&format!("{HOST}/24")])?;
    let p = lab.write_policy(
        "p.toml",
        r#"version = 1
[sets]
peers = ["198.18.5.9"]
[defaults]
ingress = "drop"
egress = "allow"
[roles.srv]
hosts = "any"
[[roles.srv.ingress]]
from = "peers"
tcp = [81]
"#,
    )?;
    lab.attach("srv", &p.display().to_string(), &["--role", "srv"])?;
    for m in ["198.18.5.10", "198.18.5.11", "198.18.5.12"] {
        lab.segbpf_ok("srv", &["set", "add", "eth0", "peers", m])?;
    }
    // Generations 2, 3, 4; back to 3: .10 and .11, not .12.
    let v = json(&lab, &["rollback", "eth0", "-o", "json"])?;
    assert_eq!(restored(&v), Some(3), "{v}");
    let seen = |lab: &Lab| -> anyhow::Result<Vec<bool>> {
        ["198.18.5.9", "198.18.5.10", "198.18.5.11", "198.18.5.12"]
            .iter()
            .map(|s| admits(lab, s))
            .collect()
    };
    assert_eq!(seen(&lab)?, [true, true, true, false]);
    let h = json(&lab, &["history", "eth0", "-o", "json"])?;
    let dir = std::path::PathBuf::from(h["dir"].as_str().expect("dir"));
    let g2 = &h["generations"][1];
    assert_eq!(g2["generation"], 2, "{h}");
    assert_eq!(
        g2["set_overrides"]["peers"],
        serde_json::json!(["198.18.5.9", "198.18.5.10"]),
        "{h}"
    );
    // Generation 2's members changed on disk: refused, nothing changes.
    std::fs::write(
        dir.join("2.sets.json"),
        r#"{"peers":["198.18.5.9","198.18.5.12"]}"#,
    )?;
    let out = lab.segbpf("srv", &["rollback", "eth0", "--to", "2"])?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(seen(&lab)?, [true, true, true, false]);
    let h = json(&lab, &["history", "eth0", "-o", "json"])?;
    let gens: Vec<u64> = h["generations"]
        .as_array()
        .expect("generations")
        .iter()
        .filter_map(|g| g["generation"].as_u64())
        .collect();
    assert_eq!(gens, [3, 4, 5], "{h}");
    // Generation 3's file missing: the rollback from 5 (which stands for
    // 3) has nothing before it it could restore exactly.
    std::fs::remove_file(dir.join("3.sets.json"))?;
    let out = lab.segbpf("srv", &["rollback", "eth0"])?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(seen(&lab)?, [true, true, true, false]);
    Ok(())
}
