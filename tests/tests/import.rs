//! `segbpf import`: real nftables and iptables rulesets (fixtures under
//! `tests/fixtures/import/`) read by the real tools, mapped to roles.toml,
//! and checked by `--verify`'s differential test (real packets through the
//! original ruleset in scratch namespaces against the reference evaluator):
//!
//! * a three-tier nftables setup (a base file included by per-role files,
//!   interval sets, admin SSH): the import passes `check`, `--verify` finds
//!   no difference, `export nft` of the result judges the same again, and a
//!   policy with one rule taken out is caught;
//! * a private-network iptables setup applied with `iptables` in namespaces
//!   and saved with `iptables-save`: every new-connection verdict is
//!   reproduced and the stateless `--sport` rule is flagged with its line;
//! * NAT and a drop-before-accept exception are warned about with their
//!   lines, `--verify` attributes the difference to the warning, `--strict`
//!   fails;
//! * broken input names the file and the line, exit 1.
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::{path::PathBuf, process::Output};

use segbpf::{
    policy::Policy,
    policy::import::{self, Flavor, HostFile, HostsArg, ruleset, verify},
};
use segbpf_tests::{lab::segbpf_bin, netns::Netns};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/import")
        .join(name)
}

fn segbpf(args: &[&str]) -> anyhow::Result<Output> {
    Ok(std::process::Command::new(segbpf_bin())
        .args(args)
        .output()?)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A private temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> anyhow::Result<Self> {
        let p = std::env::temp_dir().join(format!("segbpf-import-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The line (1-based) of the first line of `file` containing `needle`.
fn line_of(file: &std::path::Path, needle: &str) -> anyhow::Result<usize> {
    let t = std::fs::read_to_string(file)?;
    t.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .ok_or_else(|| anyhow::anyhow!("{needle} not in {}", file.display()))
}

const TIERS: [&str; 3] = ["web", "app", "db"];

#[test]
#[ignore = "needs root and nftables: run `cargo xtask test`"]
fn three_tier_nftables_import_checks_verifies_and_exports_the_same() -> anyhow::Result<()> {
    let tmp = TempDir::new("tiers")?;
    let mut args: Vec<String> = vec!["import".into(), "nft".into()];
    for t in TIERS {
        args.push("--host".into());
        args.push(format!(
            "{t}={}",
            fixture(&format!("nft/{t}.nft")).display()
        ));
        args.push("--hosts".into());
        args.push(format!("{t}={t}_nodes"));
    }
    args.push("--verify".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = segbpf(&args)?;
    let stderr = text(&out.stderr);
    eprintln!("{stderr}");
    assert!(out.status.success(), "import --verify failed:\n{stderr}");
    for t in TIERS {
        assert!(
            stderr.contains(&format!("{t}.nft ({t}): ")) && stderr.contains("0 differences"),
            "{stderr}"
        );
    }
    assert!(!stderr.contains("difference:"), "{stderr}");
    assert!(
        !stderr.contains(": warning:"),
        "a clean ruleset imports cleanly: {stderr}"
    );
    let imported = tmp.0.join("roles.toml");
    std::fs::write(&imported, &out.stdout)?;
    let toml = text(&out.stdout);

    // The import passes `check`.
    let check = segbpf(&["check", "--policy", &imported.display().to_string()])?;
    assert!(
        check.status.success(),
        "check: {}\n{toml}",
        text(&check.stderr)
    );

    // What it says: sets kept, base rules common to all, per-role rules.
    let policy = Policy::load(&imported)?;
    for s in [
        "admin_net",
        "web_nodes",
        "app_nodes",
        "db_nodes",
        "db_nodes6",
    ] {
        assert!(policy.sets.iter().any(|x| x.name == s), "set {s}:\n{toml}");
    }
    let ssh = policy
        .rules
        .iter()
        .find(|r| r.peer_text.contains("admin_net"))
        .expect("the admin SSH rule");
    assert_eq!(ssh.label(), "base.ingress[0]", "{toml}");
    assert_eq!(ssh.tcp.len(), 1);
    assert_eq!(
        policy.defaults.ingress,
        segbpf::policy::Action::Drop,
        "{toml}"
    );
    assert!(policy.defaults.established && policy.defaults.icmp);
    let ssh_line = line_of(&fixture("nft/base.nft"), "admin ssh")?;
    assert!(
        toml.contains(&format!("base.nft:{ssh_line}: ip saddr @admin_net")),
        "lines of included files:\n{toml}"
    );

    // `export nft` of the import judges every probe as the import does:
    // the same differential test, with the exported ruleset as the original.
    for t in TIERS {
        let ex = segbpf(&[
            "export",
            "nft",
            "--policy",
            &imported.display().to_string(),
            "--role",
            t,
        ])?;
        assert!(ex.status.success(), "export: {}", text(&ex.stderr));
        let file = tmp.0.join(format!("{t}.export.nft"));
        std::fs::write(&file, &ex.stdout)?;
        let rs = ruleset::read(Flavor::Nft, &file, &import::read_input(&file)?)?;
        let r = verify::verify_host(&file, &rs, &policy, t, &[])?;
        let diffs: Vec<String> = r.differences.iter().map(ToString::to_string).collect();
        assert!(
            diffs.is_empty(),
            "export nft of {t} differs:\n{}",
            diffs.join("\n")
        );
        assert!(r.original_accepts > 0 && r.original_accepts < r.probes);
    }

    // The test can fail: without app's egress rule to db_nodes, the
    // original app ruleset differs from the policy.
    let broken = std::fs::read_to_string(&imported)?.replacen(
        "to = \"db_nodes\"\ntcp = [3306, 5432]",
        "to = \"db_nodes\"\ntcp = [3306]",
        1,
    );
    assert_ne!(broken, toml, "the mutation applies");
    let broken = Policy::from_str(&broken, "broken.toml")?;
    let app = fixture("nft/app.nft");
    let rs = ruleset::read(Flavor::Nft, &app, &import::read_input(&app)?)?;
    let r = verify::verify_host(&app, &rs, &broken, "app", &[])?;
    assert!(
        r.differences
            .iter()
            .any(|d| d.dport == 5432 && d.original && !d.imported),
        "verify catches a missing rule: {:?}",
        r.differences
    );
    Ok(())
}

/// Applies the `iptables` commands of a fixture in a fresh namespace and
/// returns what `iptables-save` prints.
fn iptables_saved(host: &str, dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let ns = Netns::create(&format!("segbpf-ipt-{host}-{}", std::process::id()))?;
    let script = std::fs::read_to_string(fixture(&format!("iptables/{host}.sh")))?;
    for line in script
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        let mut args = vec!["netns", "exec", ns.name.as_str(), "iptables"];
        args.extend(line.split_whitespace());
        segbpf_tests::netns::sh("ip", &args)?;
    }
    let saved = segbpf_tests::netns::sh("ip", &["netns", "exec", &ns.name, "iptables-save"])?;
    let file = dir.join(format!("{host}.rules"));
    std::fs::write(&file, saved)?;
    Ok(file)
}

#[test]
#[ignore = "needs root and iptables: run `cargo xtask test`"]
fn private_network_iptables_import_reproduces_new_connection_verdicts() -> anyhow::Result<()> {
    let tmp = TempDir::new("ipt")?;
    let lb = iptables_saved("lb", &tmp.0)?;
    let private = iptables_saved("private", &tmp.0)?;
    let hosts = [
        HostFile::parse(&format!("lb={}", lb.display()))?,
        HostFile::parse(&format!("private={}", private.display()))?,
    ];
    let hosts_of = [
        HostsArg::parse("lb=198.18.10.1")?,
        HostsArg::parse("private=198.18.20.0/24")?,
    ];
    let imported = import::import(Flavor::Iptables, &hosts, &hosts_of)?;
    eprintln!("{}", imported.text);
    for w in &imported.warnings {
        eprintln!("{w}");
    }
    // The stateless DNS-reply rule is flagged, with its line in the saved file.
    let sport_line = line_of(&private, "--sport 53")?;
    let sport: Vec<_> = imported
        .warnings
        .iter()
        .filter(|w| w.kind == import::WarningKind::SourcePort)
        .collect();
    assert_eq!(sport.len(), 1, "{:?}", imported.warnings);
    assert_eq!(sport[0].origin.line, Some(u32::try_from(sport_line)?));
    assert!(sport[0].origin.file.ends_with("private.rules"));
    assert!(
        imported
            .text
            .contains(&format!("private.rules:{sport_line}")),
        "the flagged rule is a comment in the output:\n{}",
        imported.text
    );
    // Interfaces, and the hosts' different output policies: the load
    // balancer's egress accepts by default, the private hosts' drops.
    let p = &imported.policy;
    assert_eq!(p.defaults.egress, segbpf::policy::Action::Drop);
    assert!(
        p.rules
            .iter()
            .any(|r| r.label().starts_with("roles.lb.egress")
                && r.any_proto
                && r.peers.contains(&segbpf::policy::AddrRange::any_v4())),
        "lb gets an allow-any egress rule:\n{}",
        imported.text
    );
    let on = |iface: &str| {
        p.rules
            .iter()
            .filter(|r| r.interfaces.as_deref() == Some(&[iface.to_string()][..]))
            .count()
    };
    assert!(on("eth0") >= 1 && on("eth1") >= 3, "{}", imported.text);

    // Every new-connection verdict of the original, in both directions on
    // each interface, is the policy's.
    let reports = verify::verify(&imported)?;
    for r in &reports {
        let diffs: Vec<String> = r.differences.iter().map(ToString::to_string).collect();
        eprintln!(
            "{}: {} probes, {} accepted by the original",
            r.file, r.probes, r.original_accepts
        );
        assert!(diffs.is_empty(), "{}:\n{}", r.file, diffs.join("\n"));
        assert!(r.original_accepts > 0 && r.original_accepts < r.probes);
    }

    // The command: exit 0 with warnings, the TOML on stdout.
    let out = segbpf(&[
        "import",
        "iptables",
        "--host",
        &format!("lb={}", lb.display()),
        "--host",
        &format!("private={}", private.display()),
        "--hosts",
        "lb=198.18.10.1",
        "--hosts",
        "private=198.18.20.0/24",
    ])?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(&format!("private.rules:{sport_line}: warning:")));
    assert!(text(&out.stdout).contains("version = 1"));
    Ok(())
}

#[test]
#[ignore = "needs root and nftables: run `cargo xtask test`"]
fn nat_and_drop_before_accept_are_warned_and_strict_fails() -> anyhow::Result<()> {
    let file = fixture("nat_exception.nft");
    let host = format!("gw={}", file.display());
    let out = segbpf(&["import", "nft", "--host", &host, "--verify"])?;
    let stderr = text(&out.stderr);
    eprintln!("{stderr}");
    assert!(out.status.success(), "warnings alone exit 0: {stderr}");
    let nat = line_of(&file, "dnat to")?;
    let drop = line_of(&file, "198.18.20.66")?;
    let name = file.display().to_string();
    assert!(
        stderr.contains(&format!("{name}:{nat}: warning:")) && stderr.contains("[nat]"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{name}:{drop}: warning:"))
            && stderr.contains("[drop-before-accept]"),
        "{stderr}"
    );
    // The difference the exception makes is found, and attributed to it.
    assert!(
        stderr.contains("198.18.20.66") && stderr.contains(&format!("(reported: {name}:{drop}")),
        "{stderr}"
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("[drop-before-accept]") && stdout.contains("[nat]"));

    // The same for a machine: one JSON document.
    let json = segbpf(&["import", "nft", "--host", &host, "--verify", "-o", "json"])?;
    assert!(json.status.success(), "{}", text(&json.stderr));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    let lines: Vec<(String, u64)> = v["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            (
                w["kind"].as_str().unwrap_or("").to_string(),
                w["origin"]["line"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert!(
        lines.contains(&("nat".to_string(), u64::try_from(nat)?)),
        "{lines:?}"
    );
    assert!(
        lines.contains(&("drop-before-accept".to_string(), u64::try_from(drop)?)),
        "{lines:?}"
    );
    assert_eq!(v["verify"][0]["differences"][0]["original"], false);
    assert!(
        v["policy"]
            .as_str()
            .is_some_and(|p| p.contains("version = 1"))
    );

    let strict = segbpf(&["import", "nft", "--host", &host, "--strict"])?;
    assert_eq!(strict.status.code(), Some(1), "{}", text(&strict.stderr));
    assert!(strict.stdout.is_empty(), "nothing on stdout under --strict");
    assert!(text(&strict.stderr).contains("--strict"));
    Ok(())
}

#[test]
#[ignore = "needs root and nftables: run `cargo xtask test`"]
fn broken_input_names_file_and_line() -> anyhow::Result<()> {
    for (name, line) in [("bad_syntax.nft", 4), ("bad_family.nft", 1)] {
        let file = fixture(name);
        let out = segbpf(&["import", "nft", "--host", &format!("x={}", file.display())])?;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(out.stdout.is_empty());
        assert!(
            stderr.contains(&format!("{}:{line}:", file.display())),
            "{name}: the error names the file and line:\n{stderr}"
        );
    }
    let family = fixture("bad_family.nft");
    let out = segbpf(&[
        "import",
        "nft",
        "--host",
        &format!("x={}", family.display()),
    ])?;
    assert!(
        text(&out.stderr).contains(&format!(
            "{}:1: unknown table family `inet6`",
            family.display()
        )),
        "{}",
        text(&out.stderr)
    );
    let tmp = TempDir::new("broken")?;
    let bad = tmp.0.join("bad.rules");
    std::fs::write(
        &bad,
        "*filter\n:INPUT DROP [0:0]\n-A INPUT -p tcp --dport 22 -j ACCEPT\n-A INPUT -p tcp --dportx 80 -j ACCEPT\nCOMMIT\n",
    )?;
    let out = segbpf(&[
        "import",
        "iptables",
        "--host",
        &format!("x={}", bad.display()),
    ])?;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:4:", bad.display())),
        "{stderr}"
    );
    let missing = tmp.0.join("missing.nft");
    let out = segbpf(&[
        "import",
        "nft",
        "--host",
        &format!("x={}", missing.display()),
    ])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot read"),
        "{}",
        text(&out.stderr)
    );
    Ok(())
}

#[test]
#[ignore = "needs root, nftables and iptables: run `cargo xtask test`"]
fn input_with_nothing_that_filters_is_an_error_not_allow_all() -> anyhow::Result<()> {
    let tmp = TempDir::new("nofilter")?;
    let legacy =
        "# Warning: iptables-legacy tables present, use iptables-legacy-save to see them\n";
    let cases = [
        ("iptables", "legacy.rules", legacy),
        (
            "iptables",
            "nat.rules",
            "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n",
        ),
        ("nft", "comment.nft", "# nothing here\n"),
        (
            "nft",
            "meta.json",
            r#"{"nftables":[{"metainfo":{"version":"1.0.9","release_name":"Old Doc Yak #3","json_schema_version":1}}]}"#,
        ),
    ];
    for (flavor, name, content) in cases {
        let file = tmp.0.join(name);
        std::fs::write(&file, content)?;
        let host = format!("web={}", file.display());
        let out = segbpf(&["import", flavor, "--host", &host, "--verify", "--strict"])?;
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{name}: {stderr}{}",
            text(&out.stdout)
        );
        assert!(
            text(&out.stdout).is_empty(),
            "{name}: {}",
            text(&out.stdout)
        );
        assert!(
            stderr.contains(&format!("{}: no filter chain", file.display())),
            "{name}: {stderr}"
        );
        assert_eq!(
            stderr.contains("iptables-legacy-save"),
            name == "legacy.rules",
            "{name}: the legacy hint: {stderr}"
        );
        let out = segbpf(&["import", flavor, "--host", &host, "-o", "json"])?;
        assert_eq!(out.status.code(), Some(1), "{name}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| anyhow::anyhow!("{name}: {e}: {}", text(&out.stdout)))?;
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("no filter chain") && m.contains(name)),
            "{name}: {v}"
        );
    }
    // A filter table with no rules is a real allow-all and still imports.
    let open = tmp.0.join("open.rules");
    std::fs::write(
        &open,
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n",
    )?;
    let out = segbpf(&[
        "import",
        "iptables",
        "--host",
        &format!("web={}", open.display()),
    ])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    Ok(())
}

/// A web server's ruleset: drop by default, replies tracked, two ports
/// opened (one with the `new,established` idiom), echo from anyone.
const WEB_NFT: &str = "table inet f {
  chain in {
    type filter hook input priority 0; policy drop;
    ct state established,related accept
    tcp dport 80 ct state new,established accept
    tcp dport 443 accept
    icmp type echo-request accept
    icmpv6 type echo-request accept
  }
  chain out {
    type filter hook output priority 0; policy accept;
  }
}
";

#[test]
#[ignore = "needs root and nftables: run `cargo xtask test`"]
fn piped_input_is_read_once_and_verified_as_imported() -> anyhow::Result<()> {
    use std::io::Write as _;
    let tmp = TempDir::new("pipe")?;
    let file = tmp.0.join("web.nft");
    std::fs::write(&file, WEB_NFT)?;
    let check = |out: &Output, how: &str| {
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{how}: {stderr}");
        // The ruleset that was piped in, not an empty one (allow-all).
        assert!(stdout.contains("ingress = \"drop\""), "{how}:\n{stdout}");
        assert!(stdout.contains("established = true"), "{how}:\n{stdout}");
        assert!(stdout.contains("icmp = true"), "{how}:\n{stdout}");
        // `ct state new,established accept` is the allow rule it is.
        assert!(stdout.contains("tcp = [80]"), "{how}:\n{stdout}");
        assert!(stdout.contains("tcp = [443]"), "{how}:\n{stdout}");
        assert!(!stderr.contains("warning:"), "{how}: {stderr}");
        // --verify loaded the same bytes: the original drops what the
        // policy drops.
        assert!(
            stderr.contains("0 differences") && !stderr.contains(" 0 accepted by the original"),
            "{how}: {stderr}"
        );
        assert!(
            !stderr.contains("probed, 0 accepted") && stderr.contains("echo requests"),
            "{how}: {stderr}"
        );
    };
    // `cat web.nft | segbpf import nft --host web=/dev/stdin --verify`
    let mut child = std::process::Command::new(segbpf_bin())
        .args(["import", "nft", "--host", "web=/dev/stdin", "--verify"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("stdin"))?
        .write_all(WEB_NFT.as_bytes())?;
    check(&child.wait_with_output()?, "/dev/stdin");
    // `--host web=<(cat web.nft)`: a pipe under /dev/fd.
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "'{}' import nft --host web=<(cat '{}') --verify",
            segbpf_bin().display(),
            file.display()
        ))
        .output()?;
    check(&out, "<(cat ...)");
    // An empty pipe is refused, not read as "no rules".
    let out = std::process::Command::new(segbpf_bin())
        .args(["import", "nft", "--host", "web=/dev/stdin"])
        .stdin(std::process::Stdio::null())
        .output()?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stdout).is_empty());
    assert!(
        text(&out.stderr).contains("/dev/stdin: the input is empty"),
        "{}",
        text(&out.stderr)
    );
    Ok(())
}

#[test]
#[ignore = "needs root and iptables: run `cargo xtask test`"]
fn one_untranslatable_iptables_rule_touches_only_itself() -> anyhow::Result<()> {
    let tmp = TempDir::new("recent")?;
    let file = tmp.0.join("db.rules");
    std::fs::write(
        &file,
        "*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p icmp -m icmp --icmp-type 8 -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -m recent --set --name ssh
-A INPUT -p tcp -m tcp --dport 80 -m state --state NEW,ESTABLISHED -j ACCEPT
-A INPUT -p tcp -m tcp --dport 5432 -j ACCEPT
-A INPUT -m limit --limit 5/min -j LOG --log-prefix \"drop: \"
COMMIT
",
    )?;
    let out = segbpf(&[
        "import",
        "iptables",
        "--host",
        &format!("db={}", file.display()),
        "--verify",
        "-o",
        "json",
    ])?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let policy = v["policy"].as_str().unwrap_or_default();
    // The conntrack, ICMP echo and LOG rules on other lines are imported.
    for want in [
        "established = true",
        "icmp = true",
        "log_rate = 1",
        "tcp = [80]",
        "tcp = [5432]",
    ] {
        assert!(policy.contains(want), "{want}:\n{policy}");
    }
    // Only the `-m recent` line is warned about.
    let unsupported: Vec<&serde_json::Value> = v["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["kind"] == "unsupported")
        .collect();
    assert_eq!(unsupported.len(), 1, "{}", v["warnings"]);
    assert_eq!(unsupported[0]["origin"]["line"], 8, "{}", v["warnings"]);
    // --verify probed echo requests and established traffic too.
    let r = &v["verify"][0];
    assert!(r["echo_probes"].as_u64() > Some(0), "{r}");
    assert!(r["reply_probes"].as_u64() > Some(0), "{r}");
    assert_eq!(r["differences"], serde_json::json!([]), "{r}");
    Ok(())
}

#[test]
#[ignore = "needs root and nftables: run `cargo xtask test`"]
fn verify_probes_echo_requests_and_established_traffic() -> anyhow::Result<()> {
    let tmp = TempDir::new("estab")?;
    let file = tmp.0.join("web.nft");
    std::fs::write(&file, WEB_NFT)?;
    let imported = import::import(
        Flavor::Nft,
        &[HostFile::parse(&format!("web={}", file.display()))?],
        &[],
    )?;
    let rs = &imported.hosts[0].ruleset;
    let r = verify::verify_host(&file, rs, &imported.policy, "web", &[])?;
    assert!(r.differences.is_empty(), "{:?}", r.differences);
    // Without connection tracking the replies of allowed connections
    // differ; without `icmp` the echo requests do.
    let cut = |from: &str, to: &str| -> anyhow::Result<Policy> {
        let t = imported.text.replacen(from, to, 1);
        assert_ne!(t, imported.text, "{from}");
        Ok(Policy::from_str(&t, "mutated.toml")?)
    };
    let r = verify::verify_host(
        &file,
        rs,
        &cut("established = true", "established = false")?,
        "web",
        &[],
    )?;
    assert!(
        r.differences
            .iter()
            .any(|d| d.traffic == verify::Traffic::Reply && d.original && !d.imported),
        "verify catches lost replies: {:?}",
        r.differences
    );
    let r = verify::verify_host(&file, rs, &cut("icmp = true", "icmp = false")?, "web", &[])?;
    assert!(
        r.differences
            .iter()
            .any(|d| d.traffic == verify::Traffic::Echo
                && d.direction == segbpf::policy::Direction::Ingress
                && d.original
                && !d.imported),
        "verify catches echo requests: {:?}",
        r.differences
    );
    Ok(())
}
