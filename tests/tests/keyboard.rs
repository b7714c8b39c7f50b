//! At the keyboard (issue 22): `segbpf history` lists the generations an
//! attachment's history keeps, `segbpf diff` shows two generations or a
//! file against what is in force, `rollback --to N` restores any kept
//! generation and a second `rollback` goes further back rather than
//! undoing the first; `trace --tcp-flags` sets the flags of the packet it
//! runs through the loaded program. What is in force is judged by the
//! program in the kernel (`trace`), not by reading files.
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use segbpf_tests::{Lab, lab::one_tcp_port_policy};

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
