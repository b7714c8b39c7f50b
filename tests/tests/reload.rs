//! Policy swaps without reload: 1,000 swaps between two policies under a
//! steady stream of packets judged by the live maps, SIGKILLed reloads that
//! must leave exactly the old or the new policy in force, and a policy that
//! fails validation changing nothing.
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use segbpf::{
    attachment::pins::{Attachment, Roots},
    attachment::swap::reload_with,
    host::netns::Netns,
    host::packet::PacketSpec,
};
use segbpf_tests::{Lab, harness::Instance, lab::segbpf_bin};

const POLICY_A: &str = r#"
version = 1
[sets]
x = ["198.18.1.0/24"]
y = ["198.18.2.0/24"]
[defaults]
ingress = "drop"
egress = "allow"
[[base.ingress]]
from = "any"
udp = [53]
[roles.db]
hosts = "any"
[[roles.db.ingress]]
from = "x"
tcp = [80]
[[roles.db.ingress]]
from = "y"
tcp = [443]
"#;

/// B swaps the two services between the sets and keeps the base rule.
fn policy_b() -> String {
    POLICY_A
        .replace("tcp = [80]", "tcp = [TMP]")
        .replace("tcp = [443]", "tcp = [80]")
        .replace("tcp = [TMP]", "tcp = [443]")
}

struct Probe {
    name: &'static str,
    frame: Vec<u8>,
    a: bool,
    b: bool,
}

fn probes() -> Vec<Probe> {
    let host: IpAddr = "10.10.1.30".parse().unwrap();
    let tcp = |src: &str, port| {
        PacketSpec::tcp(src.parse().unwrap(), host, 40000, port)
            .build()
            .bytes
    };
    let udp = |src: &str, port| {
        PacketSpec::udp(src.parse().unwrap(), host, 40000, port)
            .build()
            .bytes
    };
    vec![
        Probe {
            name: "x:80",
            frame: tcp("198.18.1.5", 80),
            a: true,
            b: false,
        },
        Probe {
            name: "x:443",
            frame: tcp("198.18.1.5", 443),
            a: false,
            b: true,
        },
        Probe {
            name: "y:80",
            frame: tcp("198.18.2.5", 80),
            a: false,
            b: true,
        },
        Probe {
            name: "y:443",
            frame: tcp("198.18.2.5", 443),
            a: true,
            b: false,
        },
        Probe {
            name: "any udp/53 (both allow)",
            frame: udp("192.0.2.1", 53),
            a: true,
            b: true,
        },
        Probe {
            name: "x:22 (both drop)",
            frame: tcp("198.18.1.5", 22),
            a: false,
            b: false,
        },
        Probe {
            name: "z:80 (both drop)",
            frame: tcp("192.0.2.1", 80),
            a: false,
            b: false,
        },
    ]
}

struct Setup {
    lab: Lab,
    att: Attachment,
    a: PathBuf,
    b: PathBuf,
    dir: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn setup(tag: &str) -> anyhow::Result<Setup> {
    let mut lab = Lab::new(tag)?;
    lab.add_host("db", &["10.10.1.30/16"])?;
    let dir = std::env::temp_dir().join(format!("segbpf-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (a, b) = (dir.join("a.toml"), dir.join("b.toml"));
    std::fs::write(&a, POLICY_A)?;
    std::fs::write(&b, policy_b())?;
    lab.attach("db", a.to_str().unwrap(), &["--role", "db"])?;
    let att = Roots {
        bpffs: lab.bpffs.clone(),
        state: lab.state.clone(),
    }
    .attachment("eth0", &Netns::named(&lab.host("db").ns.name)?);
    Ok(Setup {
        lab,
        att,
        a,
        b,
        dir,
    })
}

/// Verdicts (pass?) of every probe through a dry-run instance on the live maps.
fn verdicts(instance: &mut Instance, probes: &[Probe]) -> anyhow::Result<Vec<bool>> {
    probes
        .iter()
        .map(|p| Ok(instance.ingress(&p.frame)?.passes()))
        .collect()
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn thousand_swaps_under_traffic_never_misjudge() -> anyhow::Result<()> {
    let s = setup("swap")?;
    let probes = Arc::new(probes());
    let stop = Arc::new(AtomicBool::new(false));
    let (judged, wrong) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (dropped_both, passed_neither) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let runner = {
        let (att, probes, stop) = (s.att.clone(), probes.clone(), stop.clone());
        let (judged, wrong) = (judged.clone(), wrong.clone());
        let (dropped_both, passed_neither) = (dropped_both.clone(), passed_neither.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mut instance = Instance::dry_run(&att)?;
            while !stop.load(Ordering::Relaxed) {
                for (p, pass) in probes.iter().zip(verdicts(&mut instance, &probes)?) {
                    judged.fetch_add(1, Ordering::Relaxed);
                    if pass != p.a && pass != p.b {
                        wrong.fetch_add(1, Ordering::Relaxed);
                        if p.a && p.b {
                            dropped_both.fetch_add(1, Ordering::Relaxed);
                        } else {
                            passed_neither.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            Ok(())
        })
    };
    let mut generations = Vec::new();
    for i in 0..1000 {
        let file = if i % 2 == 0 { &s.b } else { &s.a };
        reload_with(&s.att, Some(file), false)?;
        generations.push(segbpf::attachment::maps::pinned_config(&s.att)?.generation);
    }
    stop.store(true, Ordering::Relaxed);
    runner
        .join()
        .map_err(|_| anyhow::anyhow!("runner panicked"))??;
    let judged = judged.load(Ordering::Relaxed);
    eprintln!("1000 swaps, {judged} packets judged during them");
    assert!(judged > 5000, "the stream kept flowing ({judged} packets)");
    assert_eq!(
        wrong.load(Ordering::Relaxed),
        0,
        "packets judged by neither policy"
    );
    assert_eq!(
        dropped_both.load(Ordering::Relaxed),
        0,
        "allowed-by-both packets dropped"
    );
    assert_eq!(passed_neither.load(Ordering::Relaxed), 0);
    assert!(
        generations.windows(2).all(|w| w[1] == w[0] + 1),
        "one generation per swap"
    );
    // After an even number of swaps policy A is back, whole.
    let mut instance = Instance::dry_run(&s.att)?;
    let want: Vec<bool> = probes.iter().map(|p| p.a).collect();
    assert_eq!(verdicts(&mut instance, &probes)?, want);
    // The program was never replaced.
    let status = s.lab.status_json("db")?;
    let st = &status["attachments"][0]["state"];
    assert_eq!(st["generation"], 1001);
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn killed_reloads_leave_old_or_new_policy_whole() -> anyhow::Result<()> {
    let s = setup("kill")?;
    let probes = probes();
    let all_a: Vec<bool> = probes.iter().map(|p| p.a).collect();
    let all_b: Vec<bool> = probes.iter().map(|p| p.b).collect();
    let prog_id = s.lab.status_json("db")?["attachments"][0]["state"]["prog_id"].clone();
    let mut instance = Instance::dry_run(&s.att)?;
    let mut seed: u64 = 0x5eed;
    let mut outcomes = [0u32; 2];
    for i in 0..40 {
        let file: &Path = if i % 2 == 0 { &s.b } else { &s.a };
        let mut child = Command::new(segbpf_bin())
            .args([
                "--netns",
                &s.lab.host("db").ns.name,
                "reload",
                "eth0",
                "--policy",
            ])
            .arg(file)
            .env("SEGBPF_BPFFS", &s.lab.bpffs)
            .env("SEGBPF_STATE_DIR", &s.lab.state)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        std::thread::sleep(Duration::from_micros((seed >> 33) % 40_000));
        let _ = child.kill(); // SIGKILL, wherever it is
        let _ = child.wait();
        let got = verdicts(&mut instance, &probes)?;
        assert!(
            got == all_a || got == all_b,
            "after kill {i}: a mix of policies: {:?}",
            probes
                .iter()
                .zip(&got)
                .map(|(p, v)| (p.name, *v))
                .collect::<Vec<_>>()
        );
        outcomes[usize::from(got == all_b)] += 1;
        // The state the next command sees names the policy in force.
        let state = segbpf::attachment::state::State::current(&s.att)?;
        let expect = if got == all_a { &s.a } else { &s.b };
        assert_eq!(
            Path::new(&state.policy),
            std::fs::canonicalize(expect)?,
            "state file agrees with the kernel after kill {i}"
        );
    }
    eprintln!("old/new policy in force after kills: {outcomes:?}");
    // The attachment still works normally afterwards.
    reload_with(&s.att, Some(&s.a), false)?;
    assert_eq!(verdicts(&mut instance, &probes)?, all_a);
    let after = s.lab.status_json("db")?["attachments"][0]["state"]["prog_id"].clone();
    assert_eq!(prog_id, after, "no program reload");
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn invalid_policy_reload_changes_nothing() -> anyhow::Result<()> {
    let s = setup("bad")?;
    let probes = probes();
    let mut instance = Instance::dry_run(&s.att)?;
    let before = verdicts(&mut instance, &probes)?;
    let gen_before = segbpf::attachment::maps::pinned_config(&s.att)?.generation;
    let bad = s.dir.join("bad.toml");
    std::fs::write(&bad, POLICY_A.replace("198.18.2.0/24", "198.18.2.0/33"))?;
    let out = s
        .lab
        .segbpf("db", &["reload", "eth0", "--policy", bad.to_str().unwrap()])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("bad.toml:5:"),
        "names file and line: {stderr}"
    );
    assert_eq!(verdicts(&mut instance, &probes)?, before);
    assert_eq!(
        segbpf::attachment::maps::pinned_config(&s.att)?.generation,
        gen_before
    );
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn set_add_lets_a_blocked_peer_in_without_reloading_the_program() -> anyhow::Result<()> {
    use segbpf_tests::net;
    let mut lab = Lab::new("set")?;
    lab.add_host("db", &["10.10.1.30/16"])?;
    lab.add_host("client", &["10.10.1.15/16"])?;
    let (db_ns, client_ns) = (
        lab.host("db").ns.name.clone(),
        lab.host("client").ns.name.clone(),
    );
    let policy = format!("{}/../examples/roles.toml", env!("CARGO_MANIFEST_DIR"));
    let _pg = net::Server::tcp_echo(&db_ns, "0.0.0.0".parse()?, 5432)?;
    lab.attach("db", &policy, &[])?;
    let (web, db): (IpAddr, IpAddr) = ("10.10.1.15".parse()?, "10.10.1.30".parse()?);
    let t = Duration::from_secs(2);
    let prog = |lab: &Lab| -> anyhow::Result<serde_json::Value> {
        Ok(lab.status_json("db")?["attachments"][0]["state"]["prog_id"].clone())
    };
    let prog0 = prog(&lab)?;
    assert!(
        !net::tcp_exchange(&client_ns, web, db, 5432, t)?,
        "web tier blocked"
    );

    lab.segbpf_ok("db", &["set", "add", "eth0", "app_nodes", "10.10.1.15"])?;
    assert!(
        net::tcp_exchange(&client_ns, web, db, 5432, t)?,
        "added peer connects at once"
    );
    assert_eq!(prog(&lab)?, prog0, "program not reloaded");
    let list = lab.segbpf_ok("db", &["set", "list", "eth0", "app_nodes"])?;
    assert!(
        list.contains("10.10.1.15") && list.contains("edited live"),
        "{list}"
    );
    let st = lab.status_json("db")?;
    assert_eq!(
        st["attachments"][0]["drift"],
        serde_json::json!(["app_nodes"])
    );

    // A member that is not there is an error and changes nothing.
    let out = lab.segbpf("db", &["set", "del", "eth0", "app_nodes", "10.99.0.1"])?;
    assert_eq!(out.status.code(), Some(1));
    let out = lab.segbpf("db", &["set", "add", "eth0", "no_such_set", "10.99.0.1"])?;
    assert_eq!(out.status.code(), Some(1));

    lab.segbpf_ok("db", &["set", "del", "eth0", "app_nodes", "10.10.1.15"])?;
    assert!(
        !net::tcp_exchange(&client_ns, web, db, 5432, t)?,
        "removed peer blocked again"
    );

    lab.segbpf_ok("db", &["set", "add", "eth0", "app_nodes", "10.10.1.15"])?;
    lab.segbpf_ok("db", &["reload", "eth0"])?;
    let st = lab.status_json("db")?;
    assert_eq!(
        st["attachments"][0]["drift"],
        serde_json::json!([]),
        "reload resolves drift by the file"
    );
    assert!(
        !net::tcp_exchange(&client_ns, web, db, 5432, t)?,
        "the file's sets are back"
    );
    assert_eq!(prog(&lab)?, prog0);
    Ok(())
}

fn current_verdicts(s: &Setup) -> anyhow::Result<Vec<bool>> {
    let mut instance = Instance::dry_run(&s.att)?;
    verdicts(&mut instance, &probes())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn unconfirmed_change_is_rolled_back_after_the_deadline() -> anyhow::Result<()> {
    let s = setup("cfm")?;
    let all_a: Vec<bool> = probes().iter().map(|p| p.a).collect();
    let all_b: Vec<bool> = probes().iter().map(|p| p.b).collect();
    // One dry-run instance, loaded before the clock runs: it shares the
    // live maps, so it judges with whatever policy is in force when asked
    // (loading one takes seconds on a busy host, longer than a short
    // confirmation window).
    let mut dry = Instance::dry_run(&s.att)?;
    // The applying process exits at once; only the guard remains.
    s.lab.segbpf_ok(
        "db",
        &[
            "reload",
            "eth0",
            "--policy",
            s.b.to_str().unwrap(),
            "--confirm",
            "3",
        ],
    )?;
    assert_eq!(
        verdicts(&mut dry, &probes())?,
        all_b,
        "the change is in force"
    );
    let status = s.lab.segbpf_ok("db", &["status", "eth0"])?;
    assert!(status.contains("PENDING"), "{status}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !s.lab.status_json("db")?["attachments"][0]["pending"].is_null() {
        assert!(
            std::time::Instant::now() < deadline,
            "the guard never acted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        verdicts(&mut dry, &probes())?,
        all_a,
        "previous policy back after the deadline"
    );
    let status = s.lab.segbpf_ok("db", &["status", "eth0"])?;
    assert!(!status.contains("PENDING"), "{status}");

    // Confirmed in time: the change stays.
    s.lab.segbpf_ok(
        "db",
        &[
            "reload",
            "eth0",
            "--policy",
            s.b.to_str().unwrap(),
            "--confirm",
            "3",
        ],
    )?;
    s.lab.segbpf_ok("db", &["confirm", "eth0"])?;
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(current_verdicts(&s)?, all_b, "a confirmed change stays");

    // rollback restores the previous policy from the history, whatever the file says now.
    std::fs::write(&s.a, "this file was broken after it was applied")?;
    let out = s.lab.segbpf_ok("db", &["rollback", "eth0"])?;
    assert!(out.contains("rolled back"), "{out}");
    assert_eq!(current_verdicts(&s)?, all_a);
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn unconfirmed_attach_detaches_even_if_attach_was_killed() -> anyhow::Result<()> {
    let mut lab = Lab::new("cfa")?;
    lab.add_host("db", &["10.10.1.30/16"])?;
    let policy = format!("{}/../examples/roles.toml", env!("CARGO_MANIFEST_DIR"));
    let mut attach = Command::new(segbpf_bin())
        .args([
            "--netns",
            &lab.host("db").ns.name,
            "attach",
            "eth0",
            "--policy",
            &policy,
            "--confirm",
            "3",
        ])
        .env("SEGBPF_BPFFS", &lab.bpffs)
        .env("SEGBPF_STATE_DIR", &lab.state)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while lab.segbpf("db", &["status", "eth0"])?.status.code() != Some(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "attach did not come up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    attach.kill()?; // SIGKILL the applying process
    attach.wait()?;
    assert_eq!(
        lab.segbpf("db", &["status", "eth0"])?.status.code(),
        Some(0),
        "still attached"
    );
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        lab.segbpf("db", &["status", "eth0"])?.status.code(),
        Some(1),
        "detached by the guard after the deadline"
    );
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn attach_reloads_on_file_change_and_sighup() -> anyhow::Result<()> {
    let mut lab = Lab::new("hup")?;
    lab.add_host("db", &["10.10.1.30/16"])?;
    let dir = std::env::temp_dir().join(format!("segbpf-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("live.toml");
    std::fs::write(&file, POLICY_A)?;
    let mut attach = Command::new(segbpf_bin())
        .args([
            "--netns",
            &lab.host("db").ns.name,
            "attach",
            "eth0",
            "--role",
            "db",
            "--policy",
        ])
        .arg(&file)
        .env("SEGBPF_BPFFS", &lab.bpffs)
        .env("SEGBPF_STATE_DIR", &lab.state)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let s = Setup {
        att: Roots {
            bpffs: lab.bpffs.clone(),
            state: lab.state.clone(),
        }
        .attachment("eth0", &Netns::named(&lab.host("db").ns.name)?),
        a: file.clone(),
        b: file.clone(),
        dir: dir.clone(),
        lab,
    };
    wait_in_force(&s.lab)?;
    let all_a: Vec<bool> = probes().iter().map(|p| p.a).collect();
    let all_b: Vec<bool> = probes().iter().map(|p| p.b).collect();
    assert_eq!(current_verdicts(&s)?, all_a);
    // Editing the file is picked up (inotify).
    std::thread::sleep(Duration::from_millis(1100)); // a distinct mtime
    std::fs::write(&file, policy_b())?;
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(current_verdicts(&s)?, all_b, "file change reloaded");
    // A broken file on SIGHUP changes nothing.
    std::fs::write(&file, "version = 1\n[sets]\nx = [\"not an address\"]\n")?;
    signal(&attach, nix::sys::signal::Signal::SIGHUP)?;
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        current_verdicts(&s)?,
        all_b,
        "a refused reload changes nothing"
    );
    assert!(attach.try_wait()?.is_none(), "attach survives SIGHUP");
    signal(&attach, nix::sys::signal::Signal::SIGTERM)?;
    let out = attach.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("reload refused"), "{stderr}");
    assert!(
        stderr.contains("live.toml:3:"),
        "the refusal names file and line: {stderr}"
    );
    Ok(())
}

/// Waits (up to 10 s) until the verdicts on `s`'s live maps are `want`.
fn wait_verdicts(s: &Setup, want: &[bool]) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while current_verdicts(s)? != want {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "verdicts still {:?}, want {want:?}",
            current_verdicts(s)?
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A lab whose db host runs a foreground `attach` watching `live.toml`
/// (policy A; `Setup::a` and `Setup::b` both name it), in force. The
/// caller binds the pair as `(setup, attach)`, so the attach is dropped
/// (killed) before the lab.
fn watching(tag: &str) -> anyhow::Result<(Setup, segbpf_tests::lab::Running)> {
    let mut lab = Lab::new(tag)?;
    lab.add_host("db", &["10.10.1.30/16"])?;
    let dir = std::env::temp_dir().join(format!("segbpf-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("live.toml");
    std::fs::write(&file, POLICY_A)?;
    let s = Setup {
        att: Roots {
            bpffs: lab.bpffs.clone(),
            state: lab.state.clone(),
        }
        .attachment("eth0", &Netns::named(&lab.host("db").ns.name)?),
        a: file.clone(),
        b: file.clone(),
        dir,
        lab,
    };
    let attach = segbpf_tests::lab::Running::new(foreground(&s.lab, &file, &[])?);
    wait_in_force(&s.lab)?;
    Ok((s, attach))
}

/// The watcher of a running attach follows its file with inotify: an
/// editor's save (a new file renamed over the old one) is applied, and a
/// file still being written is never applied, even when what has been
/// written so far is a valid policy (here: the file cut before its last
/// rule, held open longer than the old 2 s poll).
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn the_watcher_applies_a_renamed_file_and_never_a_half_written_one() -> anyhow::Result<()> {
    use std::io::Write as _;
    // `attach` is dropped (killed) before the lab, also on failure.
    let (s, attach) = watching("inot")?;
    let (dir, file) = (s.dir.clone(), s.a.clone());
    let all_a: Vec<bool> = probes().iter().map(|p| p.a).collect();
    let all_b: Vec<bool> = probes().iter().map(|p| p.b).collect();
    assert_eq!(current_verdicts(&s)?, all_a);

    // An editor's save: write a new file, rename it over the policy.
    let tmp = dir.join(".live.toml.swp");
    std::fs::write(&tmp, policy_b())?;
    std::fs::rename(&tmp, &file)?;
    wait_verdicts(&s, &all_b)?;
    let g = generation(&s.lab)?;

    // A slow writer: policy A up to its last rule (a valid policy by
    // itself), the file held open, then the rest.
    let cut = POLICY_A.rfind("[[roles.db.ingress]]").unwrap();
    let mut f = std::fs::File::create(&file)?;
    f.write_all(&POLICY_A.as_bytes()[..cut])?;
    f.flush()?;
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        current_verdicts(&s)?,
        all_b,
        "a file still being written was applied"
    );
    assert_eq!(generation(&s.lab)?, g);
    f.write_all(&POLICY_A.as_bytes()[cut..])?;
    drop(f);
    wait_verdicts(&s, &all_a)?;
    assert_eq!(generation(&s.lab)?, g + 1, "one reload for the whole write");
    attach.terminate()?;
    attach.wait()?;
    Ok(())
}

/// Policy-file latency for `cargo xtask bench` (SEGBPF_BENCH_UPDATES=1;
/// the suite skips it): a foreground `attach` watching its file; each
/// round, an editor's save (a new file renamed over the policy, the two
/// policies in turn), timed from just before the rename until the
/// kernel's configuration has the next generation in force (polled every
/// 2 ms from the pins). Prints one JSON line (`policy_file_ms`, every
/// round and the median).
#[test]
#[ignore = "a benchmark: run by `cargo xtask bench` (SEGBPF_BENCH_ONLY=updates)"]
fn bench_policy_file_change_in_force() -> anyhow::Result<()> {
    if std::env::var_os("SEGBPF_BENCH_UPDATES").is_none() {
        eprintln!("skipped: set SEGBPF_BENCH_UPDATES=1 (cargo xtask bench)");
        return Ok(());
    }
    // `attach` is dropped (killed) before the lab, also on failure.
    let (s, attach) = watching("pfb")?;
    let (dir, file) = (s.dir.clone(), s.a.clone());
    let policies = [policy_b(), POLICY_A.to_string()];
    let mut ms = Vec::new();
    for round in 0..9 {
        let before = segbpf::attachment::maps::pinned_config(&s.att)?.generation;
        let tmp = dir.join(".live.toml.swp");
        std::fs::write(&tmp, &policies[round % 2])?;
        let start = std::time::Instant::now();
        std::fs::rename(&tmp, &file)?;
        while segbpf::attachment::maps::pinned_config(&s.att)?.generation <= before {
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(10),
                "round {round}: the change was not in force after 10 s"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        ms.push(start.elapsed().as_secs_f64() * 1e3);
        // Apart from the next round's write (the watcher waits for 30 ms
        // of quiet after a change).
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "policy_file_ms": { "rounds": ms, "median": sorted[sorted.len() / 2] }
        })
    );
    attach.terminate()?;
    attach.wait()?;
    Ok(())
}

/// A reload writes its pending state (`IFACE.next.json`) before the
/// switch. A command that only reads (status, trace, a metrics scrape, the
/// file watcher) must not remove it meanwhile, or the reload would switch
/// and then fail to record what it switched to. Only a change under the
/// update lock completes or discards a pending state.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn readers_never_touch_a_reload_in_progress() -> anyhow::Result<()> {
    let s = setup("rip")?;
    let next = s.att.state.with_extension("next.json");
    // What a reload has written just before its switch: the next
    // generation, not yet live.
    let mut pending: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&s.att.state)?)?;
    let live = pending["generation"].as_u64().unwrap_or(0);
    pending["generation"] = (live + 1).into();
    std::fs::write(&next, serde_json::to_vec(&pending)?)?;

    for args in [
        &["status", "eth0", "--output", "json"][..],
        &["status"][..],
        &[
            "trace",
            "eth0",
            "--src",
            "10.10.1.20",
            "--dst",
            "10.10.1.30",
            "--proto",
            "tcp",
            "--dport",
            "5432",
        ][..],
    ] {
        s.lab.segbpf_ok("db", args)?;
        assert!(
            next.exists(),
            "`segbpf {}` removed the pending state",
            args.join(" ")
        );
    }
    let status = s.lab.status_json("db")?;
    assert_eq!(
        status["attachments"][0]["state"]["generation"].as_u64(),
        Some(live),
        "readers report the generation in force"
    );
    // A change under the lock discards the stale pending state and applies.
    let out = s
        .lab
        .segbpf_ok("db", &["reload", "eth0", "--policy", s.b.to_str().unwrap()])?;
    assert!(out.contains("applied"), "{out}");
    assert!(!next.exists(), "the reload cleared the pending state");
    Ok(())
}

/// The guard's table, with a foreground `attach` watching its file:
///
/// | situation during a pending `--confirm` | outcome |
/// |---|---|
/// | the policy file (path) changes, SIGHUP | the automatic reload waits, logged |
/// | an explicit `reload` or `set` | refused; `reload --force` supersedes |
/// | not confirmed by the deadline | the previous policy is back, kept by the watcher |
/// | no history entry for the policy in force | the `--confirm` change is refused |
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn pending_confirmation_holds_against_watcher_and_explicit_changes() -> anyhow::Result<()> {
    let s = setup("gtab")?;
    let all_a: Vec<bool> = probes().iter().map(|p| p.a).collect();
    let all_b: Vec<bool> = probes().iter().map(|p| p.b).collect();
    // The same attachment, now with a foreground attach watching policy A.
    s.lab.segbpf_ok("db", &["detach", "eth0"])?;
    let mut attach = s.lab.spawn(
        "db",
        &[
            "attach",
            "eth0",
            "--role",
            "db",
            "--policy",
            s.a.to_str().unwrap(),
        ],
    )?;
    let mut stop = KillOnDrop(Some(attach.id()));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while s.lab.segbpf("db", &["status", "eth0"])?.status.code() != Some(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "attach did not come up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(current_verdicts(&s)?, all_a);

    // No history for the policy in force: the guard could not restore it,
    // so the change is refused and nothing moves.
    let empty = s.dir.join("no-history");
    let out = std::process::Command::new(segbpf_bin())
        .args([
            "--netns",
            &s.lab.host("db").ns.name,
            "reload",
            "eth0",
            "--policy",
        ])
        .arg(&s.b)
        .args(["--confirm", "3"])
        .env("SEGBPF_BPFFS", &s.lab.bpffs)
        .env("SEGBPF_STATE_DIR", &s.lab.state)
        .env("SEGBPF_HISTORY_DIR", &empty)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not in the history"), "{err}");
    assert_eq!(
        current_verdicts(&s)?,
        all_a,
        "a refused change changes nothing"
    );

    // A guarded change: policy B (another file) until confirmed.
    let b = s.b.to_str().unwrap();
    s.lab
        .segbpf_ok("db", &["reload", "eth0", "--policy", b, "--confirm", "10"])?;
    assert_eq!(current_verdicts(&s)?, all_b);
    // The watcher sees the state's file change and a SIGHUP: it waits.
    signal(&attach, nix::sys::signal::Signal::SIGHUP)?;
    // Explicit changes are refused while the confirmation is pending.
    let out = s.lab.segbpf("db", &["reload", "eth0", "--policy", b])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("waits for `segbpf confirm"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = s
        .lab
        .segbpf("db", &["set", "add", "eth0", "web_nodes", "10.10.9.9"])?;
    assert_eq!(
        out.status.code(),
        Some(1),
        "set during a pending confirmation"
    );
    // Not confirmed: A comes back at the deadline and stays (the watcher's
    // deferred reload re-applies what is in force, not B).
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while !s.lab.status_json("db")?["attachments"][0]["pending"].is_null() {
        assert!(
            std::time::Instant::now() < deadline,
            "the guard never acted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(current_verdicts(&s)?, all_a, "previous policy back");
    std::thread::sleep(Duration::from_secs(3)); // the watcher's deferred reload
    assert_eq!(
        current_verdicts(&s)?,
        all_a,
        "previous policy back and kept"
    );
    assert!(attach.try_wait()?.is_none(), "attach still runs");
    signal(&attach, nix::sys::signal::Signal::SIGTERM)?;
    stop.0 = None; // reaped below: its PID must not be signalled again
    let out = attach.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the automatic reload waits"),
        "the wait is logged: {stderr}"
    );

    // --force supersedes a pending change.
    s.lab
        .segbpf_ok("db", &["reload", "eth0", "--policy", b, "--confirm", "30"])?;
    s.lab.segbpf_ok(
        "db",
        &[
            "reload",
            "eth0",
            "--policy",
            s.a.to_str().unwrap(),
            "--force",
        ],
    )?;
    assert_eq!(current_verdicts(&s)?, all_a);
    Ok(())
}

/// Sends `sig` to a child we started and have not reaped.
fn signal(child: &std::process::Child, sig: nix::sys::signal::Signal) -> nix::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig)
}

/// Sends SIGKILL to a process we started, not yet reaped, when dropped (a
/// failing test leaves no foreground attach behind).
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Policies for the guard's tests: the host's role is found from its
/// address (no `--role`). OLD calls it `web` and opens tcp/8080; NEW calls
/// it `front` and opens tcp/9090 only, so the old policy does not know the
/// new role and the new one does not know the old.
fn renamed_role_policies(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let policy = |role: &str, port: u16| {
        format!(
            r#"version = 1
[defaults]
ingress = "drop"
egress = "allow"
[roles.{role}]
hosts = "198.18.7.0/24"
[[roles.{role}.ingress]]
from = "any"
tcp = [{port}]
"#
        )
    };
    let (old, new) = (dir.join("old.toml"), dir.join("new.toml"));
    std::fs::write(&old, policy("web", 8080))?;
    std::fs::write(&new, policy("front", 9090))?;
    Ok((old, new))
}

/// A lab with `srv` (198.18.7.10, role found from its address) serving
/// tcp/8080 and tcp/9090, and a client `cli`; segbpf attached to `srv`
/// with OLD.
struct Renamed {
    lab: Lab,
    att: Attachment,
    old: PathBuf,
    new: PathBuf,
    _servers: Vec<segbpf_tests::net::Server>,
    dir: PathBuf,
}

impl Drop for Renamed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn renamed_setup(tag: &str) -> anyhow::Result<Renamed> {
    let mut lab = Lab::new(tag)?;
    lab.add_host("srv", &["198.18.7.10/24"])?;
    lab.add_host("cli", &["198.18.7.20/24"])?;
    let dir = std::env::temp_dir().join(format!("segbpf-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (old, new) = renamed_role_policies(&dir)?;
    let ns = lab.host("srv").ns.name.clone();
    let addr = lab.host("srv").addrs[0];
    let servers = vec![
        segbpf_tests::net::Server::tcp_echo(&ns, addr, 8080)?,
        segbpf_tests::net::Server::tcp_echo(&ns, addr, 9090)?,
    ];
    lab.attach("srv", old.to_str().unwrap(), &[])?;
    let att = Roots {
        bpffs: lab.bpffs.clone(),
        state: lab.state.clone(),
    }
    .attachment("eth0", &Netns::named(&ns)?);
    Ok(Renamed {
        lab,
        att,
        old,
        new,
        _servers: servers,
        dir,
    })
}

/// `reload --policy NEW --redetect-roles --confirm SECS` on `srv`: NEW
/// in force, waiting for a confirmation that never comes.
fn reload_new_unconfirmed(r: &Renamed, secs: u32) -> anyhow::Result<String> {
    r.lab.segbpf_ok(
        "srv",
        &[
            "reload",
            "eth0",
            "--policy",
            r.new.to_str().unwrap(),
            "--redetect-roles",
            "--confirm",
            &secs.to_string(),
        ],
    )
}

/// Which of tcp/8080 (OLD's) and tcp/9090 (NEW's) a real client reaches.
fn open_ports(r: &Renamed) -> anyhow::Result<(bool, bool)> {
    Ok((
        r.lab.tcp_reachable("cli", "srv", 8080)?,
        r.lab.tcp_reachable("cli", "srv", 9090)?,
    ))
}

/// Waits (up to `secs`) until no change is pending on `srv`. It polls
/// `status` back to back, so a report taken while the guard restores is
/// likely: a report that says nothing is pending must show the restored
/// state (the guard removes the record only once it is in force).
fn wait_not_pending(r: &Renamed, secs: u64) -> anyhow::Result<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let status = r.lab.status_json("srv")?;
        let a = &status["attachments"][0];
        if a["pending"].is_null() && a["pending_unreadable"].is_null() {
            return Ok(status);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "still pending {secs}s later: {}",
            r.lab.segbpf_ok("srv", &["status", "eth0"])?
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Finding: `reload --policy NEW --redetect-roles --confirm 3`, where NEW
/// renames the host's role, was never undone (the guard tried the old
/// policy with the new role, failed and exited). The guard restores the
/// whole previous state: OLD's text with the role `web`, and the traffic
/// OLD allows.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn unconfirmed_change_that_renamed_the_role_is_undone_whole() -> anyhow::Result<()> {
    let r = renamed_setup("gren")?;
    assert_eq!(open_ports(&r)?, (true, false), "OLD in force");
    let before = r.lab.status_json("srv")?["attachments"][0]["state"].clone();
    assert_eq!(before["roles"], serde_json::json!(["web"]));
    reload_new_unconfirmed(&r, 3)?;
    let during = r.lab.status_json("srv")?["attachments"][0].clone();
    assert_eq!(during["state"]["roles"], serde_json::json!(["front"]));
    assert!(!during["pending"].is_null(), "{during}");
    assert_eq!(open_ports(&r)?, (false, true), "NEW in force");

    let after = wait_not_pending(&r, 30)?["attachments"][0]["state"].clone();
    assert_eq!(after["roles"], serde_json::json!(["web"]), "{after}");
    assert_eq!(after["role_args"], before["role_args"]);
    assert_eq!(after["policy"], before["policy"]);
    assert!(
        after["generation"].as_u64() > during["state"]["generation"].as_u64(),
        "{after}"
    );
    assert_eq!(open_ports(&r)?, (true, false), "OLD back in force");
    let text = r.lab.segbpf_ok("srv", &["status", "eth0"])?;
    assert!(!text.contains("PENDING"), "{text}");
    // The change is over: later reloads (the watcher's, the fleet
    // agent's) are not held waiting for a confirmation.
    r.lab.segbpf_ok(
        "srv",
        &["reload", "eth0", "--policy", r.old.to_str().unwrap()],
    )?;
    Ok(())
}

/// A restore that fails is tried again until it succeeds, and meanwhile
/// `status` says past the deadline that the restore is failing, and why
/// (text and JSON). The failure is real: the guard's copy of the old
/// policy is made writable by others, which the policy-file check refuses.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn failing_restore_is_retried_and_status_says_why() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let r = renamed_setup("gfail")?;
    reload_new_unconfirmed(&r, 2)?;
    // The guard writes its copy at the deadline; a copy others can write
    // is refused by every restore attempt.
    let copy = r.att.confirm_restore();
    std::fs::write(&copy, "")?;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o666))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let pending = loop {
        let p = r.lab.status_json("srv")?["attachments"][0]["pending"].clone();
        if p["restore_attempts"].as_u64().unwrap_or(0) >= 2 {
            break p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no failed attempts reported: {p}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(pending["overdue"], true, "{pending}");
    assert_eq!(pending["guard_running"], true, "{pending}");
    let why = pending["restore_error"].as_str().unwrap_or_default();
    assert!(why.contains("writable"), "{pending}");
    let text = r.lab.segbpf_ok("srv", &["status", "eth0"])?;
    assert!(
        text.contains("RESTORE FAILING") && text.contains("writable"),
        "{text}"
    );
    assert_eq!(open_ports(&r)?, (false, true), "NEW still in force");
    // Fixed: the next attempt (at most 30 s later) restores OLD.
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600))?;
    // Two more readers poll `status` meanwhile: whenever one is told that
    // nothing is pending, the state it reports must be OLD's (a report
    // that read the state before the restore and the record after it
    // once said NEW was in force with nothing pending).
    let torn = std::thread::scope(|scope| {
        let readers: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<Option<serde_json::Value>> {
                    let deadline = std::time::Instant::now() + Duration::from_secs(40);
                    while std::time::Instant::now() < deadline {
                        let st = r.lab.status_json("srv")?["attachments"][0].clone();
                        if st["pending"].is_null() {
                            return Ok(
                                (st["state"]["roles"] != serde_json::json!(["web"])).then_some(st)
                            );
                        }
                    }
                    Ok(None)
                })
            })
            .collect();
        let waited = wait_not_pending(&r, 40);
        let torn: Vec<serde_json::Value> = readers
            .into_iter()
            .filter_map(|h| h.join().ok()?.ok().flatten())
            .collect();
        waited.map(|st| (st, torn))
    });
    let (after, torn) = torn?;
    assert!(torn.is_empty(), "nothing pending, NEW in force: {torn:?}");
    let after = after["attachments"][0]["state"].clone();
    // On failure, the guard's own account of its attempts.
    let log = std::fs::read_to_string(r.att.guard_log()).unwrap_or_default();
    assert_eq!(
        after["roles"],
        serde_json::json!(["web"]),
        "{after}\nguard log:\n{log}"
    );
    assert_eq!(open_ports(&r)?, (true, false), "OLD back in force");
    Ok(())
}

/// Finding: the guard took a pending record it could not read for a
/// confirmation and stood down, leaving the unconfirmed change in force.
/// Only a missing record is a confirmation: while the record does not
/// parse, `status` says so, explicit changes and `confirm` are refused,
/// and at the deadline the guard undoes the change from the copy it read
/// before.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn an_unreadable_pending_record_is_never_a_confirmation() -> anyhow::Result<()> {
    let r = renamed_setup("gbad")?;
    reload_new_unconfirmed(&r, 10)?;
    let record = r.att.confirm_record();
    std::fs::write(&record, b"{ half written")?;
    // The guard notices, and runs on.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let progress = loop {
        let progress: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(r.att.guard_record())?)?;
        if progress["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("pending confirmation"))
        {
            break progress;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guard never said the record is unreadable: {progress}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let pid = progress["pid"].as_u64().unwrap_or(0);
    assert!(
        pid != 0 && std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the guard stood down: {progress}"
    );
    // `status` says so rather than that nothing is pending.
    let st = r.lab.status_json("srv")?["attachments"][0].clone();
    assert!(
        st["pending_unreadable"]
            .as_str()
            .is_some_and(|e| e.contains("confirm.json")),
        "{st}"
    );
    let shown = r.lab.segbpf_ok("srv", &["status", "eth0"])?;
    assert!(shown.contains("UNREADABLE RECORD"), "{shown}");
    // A change is refused as while a change is pending, and `confirm`
    // does not take it for nothing pending.
    for args in [
        vec!["reload", "eth0", "--policy", r.old.to_str().unwrap()],
        vec!["confirm", "eth0"],
    ] {
        let out = r.lab.segbpf("srv", &args)?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("confirm.json"), "{args:?}: {err}");
    }
    assert_eq!(open_ports(&r)?, (false, true), "NEW in force meanwhile");
    // A forced change that fails leaves the record (and its guard) as
    // they were: only a forced change in force supersedes it.
    let bad = r.dir.join("broken.toml");
    std::fs::write(&bad, "[roles.web\n")?;
    let out = r.lab.segbpf(
        "srv",
        &[
            "reload",
            "eth0",
            "--policy",
            bad.to_str().unwrap(),
            "--force",
        ],
    )?;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(&record)?,
        b"{ half written",
        "the record stays after a failed forced change"
    );
    // Still unreadable at the deadline: the guard undoes the change from
    // the copy it read before, and the record goes.
    let after = wait_not_pending(&r, 30)?["attachments"][0]["state"].clone();
    let log = std::fs::read_to_string(r.att.guard_log()).unwrap_or_default();
    assert_eq!(
        after["roles"],
        serde_json::json!(["web"]),
        "{after}\nguard log:\n{log}"
    );
    assert_eq!(open_ports(&r)?, (true, false), "OLD back in force");
    assert!(
        !record.exists(),
        "the unreadable record went with the change"
    );
    Ok(())
}

/// Finding: when the guard could not read the generation in force while
/// attached, it took the change for superseded, removed the pending record
/// and stood down with the unconfirmed change in force. It now tries
/// again until it reads, then undoes the change.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn a_guard_that_cannot_read_the_generation_in_force_keeps_trying() -> anyhow::Result<()> {
    let r = renamed_setup("glive")?;
    reload_new_unconfirmed(&r, 2)?;
    // The active slot's pin removed for a while (the map kept open here,
    // pinned again after): the generation in force cannot be read.
    let pin = r.att.map(segbpf_common::MAP_ACTIVE);
    let map = aya::maps::MapData::from_pin(&pin)?;
    std::fs::remove_file(&pin)?;
    std::thread::sleep(Duration::from_secs(4));
    let kept = r.att.confirm_record().exists();
    map.pin(&pin)?;
    assert!(
        kept,
        "the guard removed the pending record, NEW left in force"
    );
    assert_eq!(open_ports(&r)?, (false, true), "NEW in force meanwhile");
    let after = wait_not_pending(&r, 30)?["attachments"][0]["state"].clone();
    assert_eq!(after["roles"], serde_json::json!(["web"]), "{after}");
    assert_eq!(open_ports(&r)?, (true, false), "OLD back in force");
    Ok(())
}

/// The generation in force on `db`.
fn generation(lab: &Lab) -> anyhow::Result<u64> {
    let st = lab.status_json("db")?;
    st["attachments"][0]["state"]["generation"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no generation in {st}"))
}

/// `segbpf --netns db ARGS` with the lab's roots, run as if from an SSH
/// session of `10.10.1.15` to the host's port 22.
fn from_ssh(lab: &Lab) -> Command {
    let mut c = Command::new(segbpf_bin());
    c.args(["--netns", &lab.host("db").ns.name])
        .env("SEGBPF_BPFFS", &lab.bpffs)
        .env("SEGBPF_STATE_DIR", &lab.state)
        .env("SSH_CONNECTION", "10.10.1.15 50022 10.10.1.30 22");
    c
}

/// Policy A plus SSH from the session's network.
fn with_ssh() -> String {
    format!("{POLICY_A}[[roles.db.ingress]]\nfrom = \"10.10.0.0/16\"\ntcp = [22]\n")
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn reloads_refuse_a_policy_that_cuts_the_ssh_session_and_the_watcher_skips_no_ops()
-> anyhow::Result<()> {
    let mut lab = Lab::new("sshc")?;
    lab.add_host("db", &["10.10.1.30/16"])?;
    let dir = std::env::temp_dir().join(format!("segbpf-sshc-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let s = Setup {
        att: Roots {
            bpffs: lab.bpffs.clone(),
            state: lab.state.clone(),
        }
        .attachment("eth0", &Netns::named(&lab.host("db").ns.name)?),
        a: dir.join("live.toml"),
        b: dir.join("cut.toml"),
        dir: dir.clone(),
        lab,
    };
    std::fs::write(&s.a, with_ssh())?;
    std::fs::write(&s.b, POLICY_A)?;
    // attach refuses a policy that cuts the session it runs in.
    let out = from_ssh(&s.lab)
        .args(["attach", "eth0", "--role", "db", "--no-wait", "--policy"])
        .arg(&s.b)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("ssh-session"), "{err}");
    assert!(
        s.lab.segbpf("db", &["status", "eth0"])?.status.code() != Some(0),
        "nothing attached"
    );
    // A foreground attach from the SSH session, watching live.toml.
    let attach = from_ssh(&s.lab)
        .args(["attach", "eth0", "--role", "db", "--policy"])
        .arg(&s.a)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut stop = KillOnDrop(Some(attach.id()));
    wait_in_force(&s.lab)?;
    let g0 = generation(&s.lab)?;

    // An explicit reload from the session: refused, nothing changes.
    let out = from_ssh(&s.lab)
        .args(["reload", "eth0", "--policy"])
        .arg(&s.b)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("ssh-session") && err.contains("--confirm"),
        "{err}"
    );
    assert_eq!(generation(&s.lab)?, g0, "a refused reload changes nothing");

    // Saving the cutting policy to the watched file: never applied.
    std::thread::sleep(Duration::from_millis(1100)); // a distinct mtime
    std::fs::write(&s.a, POLICY_A)?;
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(generation(&s.lab)?, g0, "the watcher refuses it too");
    // Back to the text in force, a touch, a SIGHUP: nothing to reload.
    std::fs::write(&s.a, with_ssh())?;
    std::thread::sleep(Duration::from_secs(5));
    signal(&attach, nix::sys::signal::Signal::SIGHUP)?;
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(generation(&s.lab)?, g0, "no generation for no change");
    // A real edit still goes through.
    std::fs::write(&s.a, with_ssh().replace("udp = [53]", "udp = [54]"))?;
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(generation(&s.lab)?, g0 + 1, "an edit is applied");

    // --force applies the cutting policy when asked to.
    let out = from_ssh(&s.lab)
        .args(["reload", "eth0", "--force", "--policy"])
        .arg(&s.b)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(generation(&s.lab)?, g0 + 2);

    signal(&attach, nix::sys::signal::Signal::SIGTERM)?;
    stop.0 = None;
    let out = attach.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("an automatic reload never applies it"),
        "the refusal is logged: {stderr}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn reload_names_dropped_set_edits_or_keeps_them_and_a_no_op_set_add_keeps_the_generation()
-> anyhow::Result<()> {
    let s = setup("keep")?;
    s.lab
        .segbpf_ok("db", &["set", "add", "eth0", "x", "198.18.9.9"])?;
    let g = generation(&s.lab)?;
    let out = s
        .lab
        .segbpf_ok("db", &["set", "add", "eth0", "x", "198.18.9.9"])?;
    assert!(out.contains("nothing changed"), "{out}");
    assert_eq!(generation(&s.lab)?, g, "an add of a member already in");
    let list = |lab: &Lab| lab.segbpf_ok("db", &["set", "list", "eth0", "x"]);

    s.lab
        .segbpf_ok("db", &["reload", "eth0", "--keep-set-edits"])?;
    assert!(list(&s.lab)?.contains("198.18.9.9"), "kept on request");
    let out = s.lab.segbpf("db", &["reload", "eth0", "-o", "json"])?;
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["dropped_set_edits"], serde_json::json!(["x"]), "{v}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dropped the live edits of set(s) x") && err.contains("--keep-set-edits"),
        "{err}"
    );
    assert!(!list(&s.lab)?.contains("198.18.9.9"), "the file won");
    Ok(())
}

/// Starts a foreground `attach eth0 --role db --policy FILE EXTRA...` on
/// `db` and waits until it enforces.
/// Waits (up to 30 s) until `db`'s attachment is enforcing with a
/// generation in force: `status` can answer while an attach is still
/// writing its state.
fn wait_in_force(lab: &Lab) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let up = lab.status_json("db").is_ok_and(|st| {
            st["attachments"][0]["attached"] == true
                && st["attachments"][0]["state"]["generation"].is_u64()
        });
        if up {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "attach did not come up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn foreground(lab: &Lab, file: &Path, extra: &[&str]) -> anyhow::Result<std::process::Child> {
    let mut args = vec!["attach", "eth0", "--role", "db", "--policy"];
    let f = file.to_str().unwrap_or_default();
    args.push(f);
    args.extend_from_slice(extra);
    let child = lab.spawn("db", &args)?;
    wait_in_force(lab)?;
    Ok(child)
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn watch_off_reloads_on_sighup_only_and_watch_confirm_guards_each_reload() -> anyhow::Result<()> {
    let mut lab = Lab::new("wmode")?;
    lab.add_host("db", &["10.10.1.30/16"])?;
    let dir = std::env::temp_dir().join(format!("segbpf-wmode-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("live.toml");
    std::fs::write(&file, POLICY_A)?;
    let s = Setup {
        att: Roots {
            bpffs: lab.bpffs.clone(),
            state: lab.state.clone(),
        }
        .attachment("eth0", &Netns::named(&lab.host("db").ns.name)?),
        a: file.clone(),
        b: file.clone(),
        dir,
        lab,
    };
    let all_a: Vec<bool> = probes().iter().map(|p| p.a).collect();
    let all_b: Vec<bool> = probes().iter().map(|p| p.b).collect();

    // --watch off: a saved edit waits for SIGHUP.
    let attach = foreground(&s.lab, &file, &["--watch", "off"])?;
    let mut stop = KillOnDrop(Some(attach.id()));
    let g0 = generation(&s.lab)?;
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(&file, policy_b())?;
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(generation(&s.lab)?, g0, "not watched");
    assert_eq!(current_verdicts(&s)?, all_a);
    signal(&attach, nix::sys::signal::Signal::SIGHUP)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while generation(&s.lab)? == g0 {
        assert!(std::time::Instant::now() < deadline, "SIGHUP reloads");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(current_verdicts(&s)?, all_b);
    signal(&attach, nix::sys::signal::Signal::SIGTERM)?;
    stop.0 = None;
    attach.wait_with_output()?;

    // --watch confirm:SECS: a saved edit is applied under the guard.
    let attach = foreground(&s.lab, &file, &["--watch", "confirm:600"])?;
    let mut stop = KillOnDrop(Some(attach.id()));
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(&file, POLICY_A)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while s.lab.status_json("db")?["attachments"][0]["pending"].is_null() {
        assert!(
            std::time::Instant::now() < deadline,
            "the automatic reload waits for confirmation"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(current_verdicts(&s)?, all_a, "applied, guarded");
    s.lab.segbpf_ok("db", &["confirm", "eth0"])?;
    assert!(s.lab.status_json("db")?["attachments"][0]["pending"].is_null());
    signal(&attach, nix::sys::signal::Signal::SIGTERM)?;
    stop.0 = None;
    attach.wait_with_output()?;
    Ok(())
}

/// A policy for role `srv` whose ingress rule allows tcp/80 from `n`
/// single addresses that never merge (every other address of
/// 198.19.0.0/16): about `n` IPv4 prefixes in the peer trie.
fn spread_policy(n: u32) -> String {
    let peers: Vec<String> = (0..n)
        .map(|i| {
            let a = 2 * i;
            format!("\"198.19.{}.{}\"", a / 256, a % 256)
        })
        .collect();
    format!(
        "version = 1\n[defaults]\ningress = \"drop\"\negress = \"allow\"\n[roles.srv]\nhosts = \"any\"\n[[roles.srv.ingress]]\nfrom = [{}]\ntcp = [80]\n",
        peers.join(", ")
    )
}

/// IPv4 prefixes the `srv` host of `policy` compiles to (`segbpf check`).
fn ipv4_prefixes(lab: &Lab, policy: &Path) -> anyhow::Result<u64> {
    let out = lab.segbpf_ok(
        "db",
        &[
            "check",
            "--policy",
            policy.to_str().unwrap(),
            "--role",
            "srv",
            "--output",
            "json",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v["compiled"][0]["ipv4_prefixes"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no ipv4_prefixes in {out}"))
}

/// Entries of the attachment's IPv4 peer trie in the kernel, per policy slot.
fn peer_v4_entries(att: &Attachment) -> anyhow::Result<[usize; 2]> {
    use aya::maps::{LpmTrie, Map, MapData};
    let data = MapData::from_pin(att.map(segbpf_common::MAP_PEER_V4))?;
    let trie: LpmTrie<MapData, segbpf_common::PeerKeyV4, segbpf_common::PeerClass> =
        LpmTrie::try_from(Map::LpmTrie(data))?;
    let mut n = [0; 2];
    for k in trie.keys() {
        n[usize::from(k?.data().slot & 1)] += 1;
    }
    Ok(n)
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn capacity_counts_both_slots_and_a_refused_reload_leaves_nothing() -> anyhow::Result<()> {
    let mut lab = Lab::new("cap")?;
    lab.add_host("db", &["10.10.1.30/16"])?;
    let big = lab.write_policy("big.toml", &spread_policy(200))?;
    let small = lab.write_policy("small.toml", &spread_policy(4))?;
    let (p, s) = (ipv4_prefixes(&lab, &big)?, ipv4_prefixes(&lab, &small)?);
    assert!(p >= 200 && (2..50).contains(&s), "{p} / {s} prefixes");
    // Room for the big policy once, not for it beside the small one, nor twice.
    let limit = (p + s - 1).to_string();
    let sizes = ["--role", "srv", "--peer-entries", limit.as_str()];
    let needed = format!("--peer-entries {}", 2 * p);

    // `check` and `attach` refuse a policy that could attach but never be
    // reloaded, naming the count, the limit and the flag; nothing is pinned.
    for cmd in ["check", "attach"] {
        let mut args = vec![cmd];
        if cmd == "attach" {
            args.extend(["eth0", "--no-wait"]);
        }
        args.extend(["--policy", big.to_str().unwrap()]);
        args.extend(sizes);
        let out = lab.segbpf("db", &args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {stderr}");
        assert!(
            stderr.contains(&format!("needs {p} entries in SEG_PEER_V4"))
                && stderr.contains(&format!("holds at most {limit}"))
                && stderr.contains(&needed),
            "{cmd}: {stderr}"
        );
    }
    assert!(
        !lab.bpffs.join("net").exists(),
        "nothing pinned after a refused attach"
    );

    // A reload that does not fit changes nothing: no half-written slot,
    // the previous policy in force and reloadable.
    lab.attach("db", small.to_str().unwrap(), &sizes)?;
    let att = Roots {
        bpffs: lab.bpffs.clone(),
        state: lab.state.clone(),
    }
    .attachment("eth0", &Netns::named(&lab.host("db").ns.name)?);
    let gen_before = segbpf::attachment::maps::pinned_config(&att)?.generation;
    let active = usize::from(segbpf::attachment::maps::PolicyMaps::from_pins(&att)?.active_slot()?);
    let in_force = peer_v4_entries(&att)?;
    assert_eq!(in_force[active] as u64, s);
    // Attach wrote the mirror too: the slot not in force holds the same.
    assert_eq!(in_force[1 - active] as u64, s);
    let out = lab.segbpf("db", &["reload", "eth0", "--policy", big.to_str().unwrap()])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&needed), "names the flag: {stderr}");
    assert_eq!(
        peer_v4_entries(&att)?,
        in_force,
        "the refused reload left entries in the kernel"
    );
    assert_eq!(
        segbpf::attachment::maps::pinned_config(&att)?.generation,
        gen_before
    );
    lab.segbpf_ok("db", &["reload", "eth0"])?;
    lab.segbpf_ok("db", &["detach", "eth0"])?;

    // A policy that attaches can always be reloaded, again and again.
    let exact = (2 * p).to_string();
    lab.attach(
        "db",
        big.to_str().unwrap(),
        &["--role", "srv", "--peer-entries", &exact],
    )?;
    for _ in 0..3 {
        lab.segbpf_ok("db", &["reload", "eth0"])?;
    }
    let active = usize::from(segbpf::attachment::maps::PolicyMaps::from_pins(&att)?.active_slot()?);
    let n = peer_v4_entries(&att)?;
    // The slot not in force mirrors the one in force (the next change
    // writes only its difference there).
    assert_eq!((n[active] as u64, n[1 - active] as u64), (p, p));
    Ok(())
}

/// Runs `segbpf ARGS` from the simulated SSH session; Ok(exit code, stderr).
fn ssh_run(lab: &Lab, args: &[&str]) -> anyhow::Result<(Option<i32>, String)> {
    let out = from_ssh(lab).args(args).output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `setup(tag)`, then from the SSH session a reload of a policy that lets
/// the session in through set `x` (its file's path, the generation).
fn ssh_live(tag: &str) -> anyhow::Result<(Setup, String, u64)> {
    let s = setup(tag)?;
    let live = with_ssh()
        .replace("from = \"10.10.0.0/16\"", "from = \"x\"")
        .replace(
            "x = [\"198.18.1.0/24\"]",
            "x = [\"198.18.1.0/24\", \"10.10.0.0/16\"]",
        );
    let path = s.dir.join("live.toml");
    std::fs::write(&path, live)?;
    let path = path.display().to_string();
    let (code, err) = ssh_run(&s.lab, &["reload", "eth0", "--policy", &path])?;
    assert_eq!(code, Some(0), "{err}");
    let g = generation(&s.lab)?;
    Ok((s, path, g))
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn the_lockout_check_refuses_a_policy_that_drops_the_replies() -> anyhow::Result<()> {
    let (s, live, g) = ssh_live("sshr")?;
    // Untracked, egress dropped: the server's replies are cut.
    let cut = s.dir.join("noreply.toml");
    std::fs::write(
        &cut,
        std::fs::read_to_string(&live)?.replace(
            "egress = \"allow\"",
            "egress = \"drop\"\nestablished = false",
        ),
    )?;
    let cut = cut.display().to_string();
    let (code, err) = ssh_run(&s.lab, &["reload", "eth0", "--policy", &cut])?;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("ssh-session") && err.contains("replies"),
        "{err}"
    );
    assert_eq!(generation(&s.lab)?, g, "nothing was applied");
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn the_lockout_check_refuses_a_rollback_that_cuts_the_session() -> anyhow::Result<()> {
    let (s, _, g) = ssh_live("sshb")?;
    // Generation 1 is POLICY_A: no SSH rule.
    for args in [
        &["rollback", "eth0"][..],
        &["rollback", "eth0", "--to", "1"],
    ] {
        let (code, err) = ssh_run(&s.lab, args)?;
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("ssh-session"), "{err}");
    }
    assert_eq!(generation(&s.lab)?, g, "nothing was applied");
    // Guarded: applied, waiting for `segbpf confirm`.
    let (code, err) = ssh_run(
        &s.lab,
        &["rollback", "eth0", "--to", "1", "--confirm", "60"],
    )?;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(generation(&s.lab)?, g + 1);
    let pending = s.lab.status_json("db")?["attachments"][0]["pending"].clone();
    assert!(!pending.is_null(), "guarded: {pending}");
    s.lab.segbpf_ok("db", &["confirm", "eth0"])?;
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn the_lockout_check_refuses_a_set_edit_that_cuts_the_session() -> anyhow::Result<()> {
    let (s, _, g) = ssh_live("sshs")?;
    let (code, err) = ssh_run(&s.lab, &["set", "del", "eth0", "x", "10.10.0.0/16"])?;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("ssh-session"), "{err}");
    assert_eq!(generation(&s.lab)?, g, "nothing was applied");
    // Another member, or forced: applied.
    let (code, err) = ssh_run(&s.lab, &["set", "del", "eth0", "x", "198.18.1.0/24"])?;
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = ssh_run(
        &s.lab,
        &["set", "del", "eth0", "x", "10.10.0.0/16", "--force"],
    )?;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(generation(&s.lab)?, g + 2);
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn the_lockout_check_covers_sessions_routed_through_the_interface() -> anyhow::Result<()> {
    let s = setup("sshx")?;
    let b = s.b.display().to_string();
    let reload = |conn: &str| -> anyhow::Result<(Option<i32>, String)> {
        let out = from_ssh(&s.lab)
            .env("SSH_CONNECTION", conn)
            .args(["reload", "eth0", "--policy", &b])
            .output()?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let g = generation(&s.lab)?;
    // To another address of the host (not eth0's), the client reached
    // through eth0: B has no SSH rule, refused. Mapped forms too.
    for conn in [
        "10.10.1.15 50022 198.18.77.1 22",
        "::ffff:10.10.1.15 50022 ::ffff:10.10.1.30 22",
    ] {
        let (code, err) = reload(conn)?;
        assert_eq!(code, Some(1), "{conn}: {err}");
        assert!(err.contains("ssh-session"), "{err}");
    }
    assert_eq!(generation(&s.lab)?, g, "nothing was applied");
    // A client the host has no route to cannot be behind eth0.
    let (code, err) = reload("198.19.200.9 50022 198.18.77.1 22")?;
    assert_eq!(code, Some(0), "{err}");
    Ok(())
}

/// The policy tries of an attachment in the kernel, one snapshot per slot
/// (keys at slot 0, so the two compare as sets).
fn slots_in_kernel(att: &Attachment) -> anyhow::Result<[segbpf::attachment::delta::Snapshot; 2]> {
    use aya::maps::{LpmTrie, Map, MapData};
    use segbpf_common::{MAP_PEER_V4, MAP_PEER_V6, MAP_PORTS};
    let mut out: [segbpf::attachment::delta::Snapshot; 2] = Default::default();
    let v4: LpmTrie<MapData, segbpf_common::PeerKeyV4, segbpf_common::PeerClass> =
        LpmTrie::try_from(Map::LpmTrie(MapData::from_pin(att.map(MAP_PEER_V4))?))?;
    for e in &v4 {
        let (k, v) = e?;
        let mut d = k.data();
        let slot = usize::from(d.slot & 1);
        d.slot = 0;
        out[slot].peers_v4.push((k.prefix_len(), d, v));
    }
    let v6: LpmTrie<MapData, segbpf_common::PeerKeyV6, segbpf_common::PeerClass> =
        LpmTrie::try_from(Map::LpmTrie(MapData::from_pin(att.map(MAP_PEER_V6))?))?;
    for e in &v6 {
        let (k, v) = e?;
        let mut d = k.data();
        let slot = usize::from(d.slot & 1);
        d.slot = 0;
        out[slot].peers_v6.push((k.prefix_len(), d, v));
    }
    let ports: LpmTrie<MapData, segbpf_common::PortKey, segbpf_common::RuleRef> =
        LpmTrie::try_from(Map::LpmTrie(MapData::from_pin(att.map(MAP_PORTS))?))?;
    for e in &ports {
        let (k, v) = e?;
        let mut d = k.data();
        let slot = usize::from(d.slot & 1);
        d.slot = 0;
        out[slot].ports.push((k.prefix_len(), d, v));
    }
    Ok(out)
}

/// Each slot's port fast-miss bitmap in the kernel (`SEG_PORTMISS`) is
/// the bitmap of the port entries `fresh` compiles (which the slots hold):
/// every writer of a slot (attach, whole write, delta, mirror) wrote it.
fn assert_portmiss_follows(
    att: &Attachment,
    fresh: &segbpf::attachment::delta::Snapshot,
    what: &str,
) -> anyhow::Result<()> {
    use aya::maps::{Array, Map, MapData};
    let map: Array<MapData, segbpf_common::PortMiss> = Array::try_from(Map::Array(
        MapData::from_pin(att.map(segbpf_common::MAP_PORTMISS))?,
    ))?;
    let want = segbpf::policy::portmiss::bitmap(&fresh.ports);
    anyhow::ensure!(
        want.words.iter().any(|w| *w != 0),
        "{what}: the policy allows TCP or UDP ports, yet its bitmap is empty"
    );
    for slot in 0..2u32 {
        let got = map.get(&slot, 0)?;
        let differ = got
            .words
            .iter()
            .zip(want.words.iter())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differ, 0,
            "{what}: slot {slot}'s port fast-miss bitmap differs from its ports' in {differ} words"
        );
    }
    Ok(())
}

/// A fresh compile of the policy the state says is in force (the file and
/// its live set edits, the roles), with rule ids where the kernel keeps
/// counter slots mapped back to ids by the state's rules.
fn fresh_and_in_force(
    att: &Attachment,
) -> anyhow::Result<(
    segbpf::attachment::delta::Snapshot,
    [segbpf::attachment::delta::Snapshot; 2],
)> {
    let state = segbpf::attachment::state::State::current(att)?;
    let policy = segbpf::policy::Policy::load_with_sets(
        Path::new(&state.policy),
        &segbpf::attachment::swap::parse_overrides(&state.set_overrides)?,
    )?;
    let c = segbpf::policy::compile::compile(
        &policy,
        &state.roles,
        Some("eth0"),
        0,
        state.generation,
        segbpf::policy::compile::Capacity::default(),
    )?;
    let id_of: std::collections::HashMap<u32, u32> =
        state.rules.iter().map(|r| (r.counter, r.id)).collect();
    let mut slots = slots_in_kernel(att)?;
    for s in &mut slots {
        for (_, _, v) in &mut s.ports {
            v.rule_id = id_of[&v.rule_id];
        }
    }
    let mut fresh = segbpf::attachment::delta::Snapshot::of(&c, 0);
    fresh.generation = 0;
    Ok((fresh, slots))
}

/// The differential edit test on the kernel: a random sequence of set
/// edits (members that split and merge address classes, so the class and
/// port tries change too) and reloads through the command; after each, both
/// policy slots in the kernel hold exactly what a fresh compile of the
/// resulting policy gives (the slot in force, and the other one as its
/// mirror), and an edit wrote only the entries that changed.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn set_edits_write_only_what_changes_and_the_slots_equal_a_fresh_compile() -> anyhow::Result<()> {
    let s = setup("delta")?;
    let mut seed: u64 = std::env::var("SEGBPF_DELTA_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x00de_17a5);
    eprintln!("seed {seed} (SEGBPF_DELTA_SEED)");
    let mut rnd = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    // Attach leaves both slots equal to a fresh compile (the one not in
    // force as the mirror), so the first edit is already a delta.
    let (fresh, slots) = fresh_and_in_force(&s.att)?;
    for (i, slot) in slots.iter().enumerate() {
        assert_eq!(
            slot.clone().sorted(),
            fresh.clone().sorted(),
            "after attach: slot {i} differs from a fresh compile"
        );
    }
    assert_portmiss_follows(&s.att, &fresh, "after attach")?;
    let mut members: Vec<(String, String)> = Vec::new();
    for step in 0..24 {
        let before = slots_in_kernel(&s.att)?;
        let active =
            usize::from(segbpf::attachment::maps::PolicyMaps::from_pins(&s.att)?.active_slot()?);
        let op = rnd(8);
        let out = if op == 0 {
            members.clear();
            let file = if rnd(2) == 0 { &s.a } else { &s.b };
            s.lab.segbpf_ok(
                "db",
                &["reload", "eth0", "-p", file.to_str().unwrap(), "-o", "json"],
            )?
        } else if op <= 2 && !members.is_empty() {
            let (set, m) = members.remove(rnd(members.len() as u64) as usize);
            s.lab
                .segbpf_ok("db", &["set", "del", "eth0", &set, &m, "-o", "json"])?
        } else {
            let set = if rnd(2) == 0 { "x" } else { "y" };
            // Inside the other set's range (a new class), beside it, or far.
            let m = match rnd(3) {
                0 => format!("198.18.{}.{}", 1 + rnd(2), rnd(256)),
                1 => format!("198.18.{}.0/{}", 3 + rnd(4), 24 + rnd(8)),
                _ => format!("fd00:{:x}::{:x}", rnd(4), 1 + rnd(4096)),
            };
            let out = s
                .lab
                .segbpf_ok("db", &["set", "add", "eth0", set, &m, "-o", "json"])?;
            if serde_json::from_str::<serde_json::Value>(&out)?["changed"] == 1 {
                members.push((set.to_string(), m));
            }
            out
        };
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let (fresh, slots) = fresh_and_in_force(&s.att)?;
        for (i, slot) in slots.iter().enumerate() {
            assert_eq!(
                slot.clone().sorted(),
                fresh.clone().sorted(),
                "step {step}: slot {i} differs from a fresh compile ({v})"
            );
        }
        assert_portmiss_follows(&s.att, &fresh, &format!("step {step}"))?;
        if v["applied"] == true {
            // What the swap wrote into the slot it put in force is exactly
            // the difference between what that slot held and holds now.
            let now = slots_in_kernel(&s.att)?;
            let next = 1 - active;
            let changed = segbpf::attachment::delta::diff(
                &before[next],
                &segbpf::policy::compile::Compiled {
                    peers_v4: now[next].peers_v4.clone(),
                    peers_v6: now[next].peers_v6.clone(),
                    ports: now[next].ports.clone(),
                    ..Default::default()
                },
            );
            // Also the first change after attach: attach wrote the mirror.
            assert_eq!(
                v["written"].as_u64(),
                Some(changed.len() as u64),
                "step {step}: {v}"
            );
        }
    }
    Ok(())
}

/// Set edits take the fast path (no parse, no compile: the attachment's
/// compact compiled form, `IFACE.sets`) only while that form is of the
/// policy in force; a stale one (an earlier generation put back), an
/// altered or torn one, or a policy file edited since, fall back to the
/// full compile. After every edit, both slots equal a fresh compile of the
/// resulting policy and `set list` shows the members in force.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn set_edits_trust_the_compact_form_only_when_it_is_of_the_policy_in_force() -> anyhow::Result<()> {
    let s = setup("setidx")?;
    let index = s.att.set_index();
    // Runs a set edit; whether it took the fast path (its phase line).
    let edit = |args: &[&str]| -> anyhow::Result<bool> {
        let mut all = vec!["-v", "set"];
        all.extend_from_slice(args);
        let out = s.lab.segbpf("db", &all)?;
        let err = String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(out.status.success(), "set {args:?}: {err}");
        let phases = err
            .lines()
            .find(|l| l.contains("swap phases:"))
            .ok_or_else(|| anyhow::anyhow!("no phase line: {err}"))?;
        Ok(phases.contains("edit-classes="))
    };
    let check = |what: &str, members: &[&str]| -> anyhow::Result<()> {
        let (fresh, slots) = fresh_and_in_force(&s.att)?;
        for (i, slot) in slots.iter().enumerate() {
            assert_eq!(
                slot.clone().sorted(),
                fresh.clone().sorted(),
                "{what}: slot {i} differs from a fresh compile"
            );
        }
        assert_portmiss_follows(&s.att, &fresh, what)?;
        let list: serde_json::Value = serde_json::from_str(
            &s.lab
                .segbpf_ok("db", &["set", "list", "eth0", "x", "-o", "json"])?,
        )?;
        let got: Vec<&str> = list["sets"][0]["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap())
            .collect();
        assert_eq!(got, members, "{what}: set list");
        let state = segbpf::attachment::state::State::current(&s.att)?;
        let cfg = segbpf::attachment::maps::pinned_config(&s.att)?;
        assert_eq!(
            state.generation, cfg.generation,
            "{what}: generation in force"
        );
        Ok(())
    };
    assert!(
        edit(&["add", "eth0", "x", "198.18.9.1"])?,
        "a member beside the set: the fast path"
    );
    check("fast add", &["198.18.1.0/24", "198.18.9.1"])?;

    // Stale: the form of an earlier generation put back.
    let stale = std::fs::read(&index)?;
    assert!(edit(&["add", "eth0", "x", "198.18.9.2"])?);
    std::fs::write(&index, &stale)?;
    assert!(
        !edit(&["add", "eth0", "x", "198.18.9.3"])?,
        "a stale compact form must not be used"
    );
    check(
        "after a stale form",
        &["198.18.1.0/24", "198.18.9.1", "198.18.9.2", "198.18.9.3"],
    )?;
    // The full path wrote a new form: the next edit is fast again.
    assert!(edit(&["del", "eth0", "x", "198.18.9.1"])?);
    check("fast del", &["198.18.1.0/24", "198.18.9.2", "198.18.9.3"])?;

    // Altered (a member changed, checksum not) and torn.
    // (The form holds the members of the sets not edited live: y's.)
    let text = std::fs::read_to_string(&index)?;
    assert!(text.contains("198.18.2.0/24"));
    std::fs::write(&index, text.replace("198.18.2.0/24", "198.18.2.0/25"))?;
    assert!(
        !edit(&["del", "eth0", "x", "198.18.9.3"])?,
        "an altered form"
    );
    check("after an altered form", &["198.18.1.0/24", "198.18.9.2"])?;
    let bytes = std::fs::read(&index)?;
    std::fs::write(&index, &bytes[..bytes.len() / 2])?;
    assert!(!edit(&["add", "eth0", "x", "198.18.9.4"])?, "a torn form");
    check(
        "after a torn form",
        &["198.18.1.0/24", "198.18.9.2", "198.18.9.4"],
    )?;

    // The policy file edited since it was compiled: the edit applies the
    // file as it is now (set y grows in the file), as the full path does.
    assert!(edit(&["add", "eth0", "x", "198.18.9.5"])?);
    std::fs::write(
        &s.a,
        POLICY_A.replace(
            r#"y = ["198.18.2.0/24"]"#,
            r#"y = ["198.18.2.0/24", "198.18.7.0/24"]"#,
        ),
    )?;
    assert!(
        !edit(&["add", "eth0", "x", "198.18.9.6"])?,
        "a policy file edited since"
    );
    check(
        "after the file changed",
        &[
            "198.18.1.0/24",
            "198.18.9.2",
            "198.18.9.4",
            "198.18.9.5",
            "198.18.9.6",
        ],
    )?;

    // A member inside the other set makes a new address class: the full path.
    assert!(!edit(&["add", "eth0", "x", "198.18.2.9"])?);
    check(
        "a new class",
        &[
            "198.18.1.0/24",
            "198.18.9.2",
            "198.18.9.4",
            "198.18.9.5",
            "198.18.9.6",
            "198.18.2.9",
        ],
    )?;
    Ok(())
}

/// A policy whose set `big` has 5,120 members (every other address of
/// 198.18.100.0-198.18.139.255; 198.18.121.5 is odd: not in it), allowed
/// to tcp/5432 of role db; everything else dropped.
fn big_set_policy() -> String {
    use std::fmt::Write as _;
    let mut text = String::from("version = 1\n[sets]\nbig = [");
    for i in 0..5120u32 {
        let a = (100 << 8) + 2 * i;
        let _ = write!(
            text,
            "{}\"198.18.{}.{}\"",
            if i == 0 { "" } else { "," },
            a >> 8,
            a & 255
        );
    }
    text.push_str(
        "]\n[defaults]\ningress = \"drop\"\negress = \"allow\"\n[roles.db]\nhosts = \"any\"\n\
         [[roles.db.ingress]]\nfrom = \"big\"\ntcp = [5432]\n",
    );
    text
}

/// Set edits of a set kept in a live file, killed (SIGKILL) at random
/// points: the state the next command reads is whole (its live file read
/// back), names the generation the kernel runs, and the slot in force
/// equals a fresh compile of it; the edits go on normally afterwards.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn killed_large_set_edits_leave_the_state_and_the_slot_in_force_whole() -> anyhow::Result<()> {
    let mut lab = Lab::new("bigkill")?;
    lab.add_host("db", &["198.18.140.1/16"])?;
    let file = lab.write_policy("big.toml", &big_set_policy())?;
    lab.attach("db", file.to_str().unwrap(), &["--role", "db"])?;
    let att = Roots {
        bpffs: lab.bpffs.clone(),
        state: lab.state.clone(),
    }
    .attachment("eth0", &Netns::named(&lab.host("db").ns.name)?);
    let member = "198.18.121.5";
    let mut seed: u64 = 0xb16_5e7;
    let mut outcomes = [0u32; 2];
    for i in 0..30 {
        let before = segbpf::attachment::state::State::current(&att)?;
        let had = before
            .set_overrides
            .get("big")
            .is_some_and(|m| m.iter().any(|x| x == member));
        let mut child = Command::new(segbpf_bin())
            .args([
                "--netns",
                &lab.host("db").ns.name,
                "set",
                if had { "del" } else { "add" },
                "eth0",
                "big",
                member,
            ])
            .env("SEGBPF_BPFFS", &lab.bpffs)
            .env("SEGBPF_STATE_DIR", &lab.state)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        std::thread::sleep(Duration::from_micros((seed >> 33) % 250_000));
        let _ = child.kill();
        let _ = child.wait();
        let state = segbpf::attachment::state::State::current(&att)?;
        let cfg = segbpf::attachment::maps::pinned_config(&att)?;
        assert_eq!(
            state.generation, cfg.generation,
            "after kill {i}: generation"
        );
        let (fresh, slots) = fresh_and_in_force(&att)?;
        let active =
            usize::from(segbpf::attachment::maps::PolicyMaps::from_pins(&att)?.active_slot()?);
        assert_eq!(
            slots[active].clone().sorted(),
            fresh.sorted(),
            "after kill {i}: the slot in force is the state's policy"
        );
        outcomes[usize::from(state.generation != before.generation)] += 1;
    }
    eprintln!("edits killed before the switch / applied: {outcomes:?}");
    // Edits go on: both slots equal a fresh compile again.
    for _ in 0..2 {
        let state = segbpf::attachment::state::State::current(&att)?;
        let had = state
            .set_overrides
            .get("big")
            .is_some_and(|m| m.iter().any(|x| x == member));
        let op = if had { "del" } else { "add" };
        lab.segbpf_ok("db", &["set", op, "eth0", "big", member])?;
        let (fresh, slots) = fresh_and_in_force(&att)?;
        for (i, slot) in slots.iter().enumerate() {
            assert_eq!(
                slot.clone().sorted(),
                fresh.clone().sorted(),
                "{op}: slot {i}"
            );
        }
    }
    Ok(())
}

/// A set of thousands of members: an edit of one member or of ten works
/// on the changed region only (no parse, no compile, not the whole maps:
/// its phase line), and the state file holds no members (they are in one
/// hash-named live file beside it, `IFACE.live.HASH`). After every step
/// both slots equal a fresh compile, `set list` shows the members in
/// force and real TCP from a peer added or removed gets through or not. A
/// live file that does not match fails the edit, naming the file, with
/// the kernel untouched; a rollback restores the members of the history's
/// linked live file; a reload back to the file leaves no live file.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn large_set_edits_work_on_the_changed_region_and_keep_the_members_beside_the_state()
-> anyhow::Result<()> {
    use segbpf::attachment::{pins::live_files, state::State};
    let mut lab = Lab::new("bigset")?;
    lab.add_host("db", &["198.18.140.1/16"])?;
    lab.add_host("cli", &["198.18.121.5/16"])?;
    let text = big_set_policy();
    let file = lab.write_policy("big.toml", &text)?;
    lab.attach("db", file.to_str().unwrap(), &["--role", "db"])?;
    let att = Roots {
        bpffs: lab.bpffs.clone(),
        state: lab.state.clone(),
    }
    .attachment("eth0", &Netns::named(&lab.host("db").ns.name)?);
    let _server = segbpf_tests::net::Server::tcp_echo(
        &lab.host("db").ns.name,
        lab.host("db").addrs[0],
        5432,
    )?;
    let edit = |args: &[&str]| -> anyhow::Result<String> {
        let mut all = vec!["-v", "set"];
        all.extend_from_slice(args);
        let out = lab.segbpf("db", &all)?;
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        anyhow::ensure!(out.status.success(), "set {args:?}: {err}");
        Ok(err
            .lines()
            .find(|l| l.contains("swap phases:"))
            .unwrap_or_default()
            .to_string())
    };
    let region_path = |p: &str| {
        p.contains(" region=")
            && p.contains(" edit-classes=")
            && !p.contains("region-declined")
            && !p.contains(" parse=")
    };
    let check = |what: &str, count: usize, has: &[&str], lacks: &[&str]| -> anyhow::Result<()> {
        let (fresh, slots) = fresh_and_in_force(&att)?;
        for (i, slot) in slots.iter().enumerate() {
            assert_eq!(
                slot.clone().sorted(),
                fresh.clone().sorted(),
                "{what}: slot {i} differs from a fresh compile"
            );
        }
        let list: serde_json::Value = serde_json::from_str(
            &lab.segbpf_ok("db", &["set", "list", "eth0", "big", "-o", "json"])?,
        )?;
        let got: Vec<&str> = list["sets"][0]["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap())
            .collect();
        assert_eq!(got.len(), count, "{what}: members listed");
        for m in has {
            assert!(got.contains(m), "{what}: {m} listed");
        }
        for m in lacks {
            assert!(!got.contains(m), "{what}: {m} not listed");
        }
        Ok(())
    };
    assert!(
        !lab.tcp_reachable("cli", "db", 5432)?,
        "cli is not in the set"
    );

    let p = edit(&["add", "eth0", "big", "198.18.121.5"])?;
    assert!(region_path(&p), "one member: the region path: {p}");
    check("add one", 5121, &["198.18.121.5"], &[])?;
    assert!(
        lab.tcp_reachable("cli", "db", 5432)?,
        "cli is in the set now"
    );
    let head: serde_json::Value = serde_json::from_slice(&std::fs::read(&att.state)?)?;
    let big = head["set_overrides"]["big"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        big.len() == 1 && big[0].as_str().is_some_and(|m| m.starts_with("live:")),
        "the state file names the live file, no members: {}",
        head["set_overrides"]
    );
    assert!(std::fs::metadata(&att.state)?.len() < 16 * 1024);
    assert_eq!(live_files(&att.state).len(), 1);

    let p = edit(&["del", "eth0", "big", "198.18.110.20"])?;
    assert!(region_path(&p), "a removal in the middle: {p}");
    check("del one", 5120, &["198.18.121.5"], &["198.18.110.20"])?;
    let ten: Vec<String> = (0..10).map(|i| format!("198.18.130.{}", 2 * i)).collect();
    let mut args = vec!["del", "eth0", "big"];
    args.extend(ten.iter().map(String::as_str));
    let p = edit(&args)?;
    assert!(region_path(&p), "ten removed: {p}");
    check("del ten", 5110, &[], &["198.18.130.0", "198.18.130.18"])?;
    assert_eq!(
        live_files(&att.state).len(),
        1,
        "the live files of earlier generations are gone"
    );

    // A live file that does not match the state: refused, kernel untouched.
    let g = State::current(&att)?.generation;
    let before = slots_in_kernel(&att)?;
    let live = live_files(&att.state).remove(0);
    let bytes = std::fs::read(&live)?;
    std::fs::write(
        &live,
        String::from_utf8(bytes.clone())?.replacen("198.18.100.2\n", "198.18.100.3\n", 1),
    )?;
    let out = lab.segbpf("db", &["set", "del", "eth0", "big", "198.18.121.5"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("live set edits file") && err.contains(&live.display().to_string()),
        "{err}"
    );
    assert_eq!(segbpf::attachment::maps::pinned_config(&att)?.generation, g);
    let after = slots_in_kernel(&att)?;
    for i in 0..2 {
        assert_eq!(
            after[i].clone().sorted(),
            before[i].clone().sorted(),
            "slot {i}"
        );
    }
    assert!(
        lab.tcp_reachable("cli", "db", 5432)?,
        "the policy in force stays"
    );
    std::fs::write(&live, &bytes)?;

    // Rollback: the generation before the ten removals, from the history.
    lab.segbpf_ok("db", &["rollback", "eth0"])?;
    check(
        "rollback",
        5120,
        &["198.18.130.0", "198.18.121.5"],
        &["198.18.110.20"],
    )?;
    // Reload: the file's members, no live file left.
    lab.segbpf_ok("db", &["reload", "eth0"])?;
    check("reload", 5120, &["198.18.110.20"], &["198.18.121.5"])?;
    assert!(
        live_files(&att.state).is_empty(),
        "{:?}",
        live_files(&att.state)
    );
    assert!(!lab.tcp_reachable("cli", "db", 5432)?, "cli is out again");
    Ok(())
}

/// The rule descriptions live in their own file (`IFACE.rules.HASH`), not
/// in the state that every set edit reads and writes: a set edit leaves
/// that file as it is and the new state names it; a rules file that does
/// not hash to its name names no rule (never the altered text); a reload
/// writes a new one and removes the old; a detach leaves none.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn set_edits_keep_the_rules_file_and_a_rules_file_that_disagrees_names_no_rule()
-> anyhow::Result<()> {
    use segbpf::attachment::{pins::rules_files, state::State};
    let s = setup("rulesf")?;
    let head: serde_json::Value = serde_json::from_slice(&std::fs::read(&s.att.state)?)?;
    assert_eq!(
        head["rules"],
        serde_json::json!([]),
        "the state file holds no rule descriptions: {head}"
    );
    assert_eq!(head["rules_file"]["count"], 3, "{head}");
    // `status` still shows them.
    let status: serde_json::Value =
        serde_json::from_str(&s.lab.segbpf_ok("db", &["status", "eth0", "-o", "json"])?)?;
    assert_eq!(
        status["attachments"][0]["state"]["rules"]
            .as_array()
            .map(Vec::len),
        Some(3),
        "{status}"
    );
    let files = rules_files(&s.att.state);
    assert_eq!(files.len(), 1, "one rules file after attach: {files:?}");
    let before = State::current(&s.att)?;
    assert_eq!(
        before.rules.len(),
        3,
        "the three rules, read from their file"
    );
    let meta = |p: &std::path::Path| -> anyhow::Result<(u64, std::time::SystemTime)> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(p)?;
        Ok((m.ino(), m.modified()?))
    };
    let stamp = meta(&files[0])?;

    // A set edit: the same rules file, untouched, named by the new state.
    let out: serde_json::Value = serde_json::from_str(&s.lab.segbpf_ok(
        "db",
        &["set", "add", "eth0", "x", "198.18.9.1", "-o", "json"],
    )?)?;
    assert_eq!(out["rules"], 3, "{out}");
    assert_eq!(rules_files(&s.att.state), files);
    assert_eq!(meta(&files[0])?, stamp, "the rules file is not rewritten");
    let after = State::current(&s.att)?;
    assert_eq!(after.generation, before.generation + 1);
    assert_eq!(after.rules, before.rules);

    // Altered: a label changed. Its hash no longer matches its name.
    let text = std::fs::read_to_string(&files[0])?;
    assert!(text.contains("roles.db.ingress[0]"), "{text}");
    std::fs::write(
        &files[0],
        text.replace("roles.db.ingress[0]", "roles.db.ingress[9]"),
    )?;
    let altered = State::current(&s.att)?;
    assert!(
        altered.rules.is_empty(),
        "an altered rules file names no rule: {:?}",
        altered.rules
    );
    // A set edit still works and does not take the altered file for the
    // rules in force.
    s.lab
        .segbpf_ok("db", &["set", "add", "eth0", "x", "198.18.9.2"])?;
    assert!(State::current(&s.att)?.rules.is_empty());

    // A reload writes the rules anew and removes the file it replaces.
    s.lab.segbpf_ok("db", &["reload", "eth0"])?;
    let now = rules_files(&s.att.state);
    assert_eq!(now.len(), 1, "{now:?}");
    let labels = |st: &State| st.rules.iter().map(|r| r.label.clone()).collect::<Vec<_>>();
    assert_eq!(labels(&State::current(&s.att)?), labels(&before));
    // Torn: cut in half.
    let bytes = std::fs::read(&now[0])?;
    std::fs::write(&now[0], &bytes[..bytes.len() / 2])?;
    assert!(
        State::current(&s.att)?.rules.is_empty(),
        "a torn rules file"
    );

    s.lab.segbpf_ok("db", &["detach", "eth0"])?;
    assert!(
        rules_files(&s.att.state).is_empty(),
        "detach removes the rules files"
    );
    Ok(())
}

/// A set removal on the fast path prunes the connections whose peer is
/// in the removed addresses and that the policy no longer allows, and
/// judges no other (their rules did not change).
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn a_fast_set_del_prunes_the_connections_of_the_removed_addresses() -> anyhow::Result<()> {
    use segbpf_common::{CtEntry, CtKey, DIR_INGRESS};
    let s = setup("setprune")?;
    s.lab.segbpf_ok(
        "db",
        &["set", "add", "eth0", "x", "198.18.9.1", "198.18.9.2"],
    )?;
    let ifindex = segbpf::attachment::state::State::current(&s.att)?.ifindex;
    let key = |remote: [u8; 4]| {
        let mut k = CtKey {
            family: 4,
            proto: 6,
            local_port: 80,
            remote_port: 40_000,
            ifindex,
            ..CtKey::default()
        };
        k.local[..4].copy_from_slice(&[10, 10, 1, 30]);
        k.remote[..4].copy_from_slice(&remote);
        // IPv4 flows live in the IPv4 table, under the 16-byte key.
        k.narrow().expect("an IPv4 key")
    };
    let keys = [
        key([198, 18, 9, 1]),
        key([198, 18, 9, 2]),
        key([198, 18, 1, 5]),
    ];
    let open = || -> anyhow::Result<segbpf::attachment::ctmap::Ct4Map> {
        segbpf::attachment::cttables::map_pinned::<segbpf_common::Ct4>(&s.att)?
            .ok_or_else(|| anyhow::anyhow!("no IPv4 connection table"))
    };
    {
        let ct = open()?;
        for k in &keys {
            let entry = CtEntry {
                origin: DIR_INGRESS,
                ..CtEntry::default()
            };
            ct.insert(k, &entry, true, 0)?;
        }
    }
    let out = s.lab.segbpf(
        "db",
        &["-v", "set", "del", "eth0", "x", "198.18.9.1", "-o", "json"],
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("edit-classes="), "the fast path: {err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["pruned"], 1, "{v}");
    let ct = open()?;
    assert!(
        !ct.contains(&keys[0]),
        "the removed peer's connection is pruned"
    );
    assert!(
        ct.contains(&keys[1]),
        "a member still in the set keeps its connection"
    );
    assert!(
        ct.contains(&keys[2]),
        "a peer outside the edit keeps its connection"
    );
    Ok(())
}

/// A real SSH-like session from `admin` to `db`'s port 22: a listener in
/// `db`'s namespace (not named sshd: the check falls back to port 22)
/// echoing each message until the client leaves, and the client's
/// connection. `exchange` sends a message and waits for its echo.
struct LiveSession {
    client: std::net::TcpStream,
    server: Option<std::thread::JoinHandle<()>>,
}

impl LiveSession {
    fn open(lab: &Lab) -> anyhow::Result<Self> {
        use std::io::{Read as _, Write as _};
        let (db, admin) = (lab.host("db"), lab.host("admin"));
        let (server_addr, client_addr) = (db.addrs[0], admin.addrs[0]);
        let db_ns = format!("/run/netns/{}", db.ns.name);
        let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let server = std::thread::spawn(move || {
            let l = segbpf_tests::netns::enter(&db_ns)
                .and_then(|()| Ok(std::net::TcpListener::bind((server_addr, 22))?));
            let l = match l {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let Ok((mut c, _)) = l.accept() else { return };
            let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
            let mut buf = [0u8; 64];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 || c.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        rx.recv()??;
        let admin_ns = format!("/run/netns/{}", admin.ns.name);
        let client = std::thread::spawn(move || -> anyhow::Result<std::net::TcpStream> {
            segbpf_tests::netns::enter(&admin_ns)?;
            let sock = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            sock.bind(&std::net::SocketAddr::new(client_addr, 0).into())?;
            sock.connect_timeout(
                &std::net::SocketAddr::new(server_addr, 22).into(),
                Duration::from_secs(2),
            )?;
            Ok(sock.into())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        client.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(LiveSession {
            client,
            server: Some(server),
        })
    }

    /// Whether a message goes through and its echo comes back.
    fn exchange(&mut self) -> bool {
        use std::io::{Read as _, Write as _};
        let msg = b"still-here";
        if self.client.write_all(msg).is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        let mut got = 0;
        while got < msg.len() {
            match self.client.read(&mut buf[got..]) {
                Ok(0) | Err(_) => return false,
                Ok(n) => got += n,
            }
        }
        &buf[..got] == msg
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        let _ = self.client.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
    }
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn the_watcher_without_ssh_connection_keeps_a_live_ssh_session_found_in_the_kernel()
-> anyhow::Result<()> {
    let mut lab = Lab::new("sshk")?;
    lab.add_host("db", &["10.10.1.30/16"])?;
    lab.add_host("admin", &["10.10.1.15/16"])?;
    let file = lab.write_policy("live.toml", &with_ssh())?;
    // As under systemd: no SSH_CONNECTION anywhere (lab.spawn sets none).
    let attach = lab.spawn(
        "db",
        &[
            "attach",
            "eth0",
            "--role",
            "db",
            "--policy",
            file.to_str().unwrap_or_default(),
        ],
    )?;
    let mut stop = KillOnDrop(Some(attach.id()));
    wait_in_force(&lab)?;
    let g0 = generation(&lab)?;
    let mut session = LiveSession::open(&lab)?;
    assert!(
        session.exchange(),
        "the session works under the live policy"
    );

    // An explicit reload from a console (no SSH_CONNECTION) is refused:
    // the session is found in the kernel.
    let cut = lab.write_policy("cut.toml", POLICY_A)?;
    let out = lab.segbpf(
        "db",
        &[
            "reload",
            "eth0",
            "--policy",
            cut.to_str().unwrap_or_default(),
        ],
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("ssh-session") && err.contains("10.10.1.15"),
        "{err}"
    );

    // The watched file saved with the cutting policy: never applied.
    std::thread::sleep(Duration::from_millis(1100)); // a distinct mtime
    std::fs::write(&file, POLICY_A)?;
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(generation(&lab)?, g0, "the watcher refuses it");
    assert!(session.exchange(), "the live session is not cut");

    signal(&attach, nix::sys::signal::Signal::SIGTERM)?;
    stop.0 = None;
    let out = attach.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("an automatic reload never applies it"),
        "the refusal is logged: {stderr}"
    );
    drop(session);
    Ok(())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn audit_mode_is_not_a_lockout_but_audit_to_enforce_is() -> anyhow::Result<()> {
    let mut lab = Lab::new("ssha")?;
    lab.add_host("db", &["10.10.1.30/16"])?;
    // POLICY_A has no SSH rule: it cuts the session 10.10.1.15 -> :22.
    let cut = lab.write_policy("cut.toml", POLICY_A)?;
    let cut = cut.to_str().unwrap_or_default().to_string();
    let edited = lab.write_policy("cut2.toml", &POLICY_A.replace("udp = [53]", "udp = [54]"))?;
    let edited = edited.to_str().unwrap_or_default().to_string();
    // attach --audit from the session: enforces nothing, so no refusal.
    let (code, err) = ssh_run(
        &lab,
        &[
            "attach",
            "eth0",
            "--role",
            "db",
            "--audit",
            "--no-wait",
            "--policy",
            &cut,
        ],
    )?;
    assert_eq!(code, Some(0), "{err}");
    let g = generation(&lab)?;
    // A reload keeps audit mode: not refused either.
    let (code, err) = ssh_run(&lab, &["reload", "eth0", "--policy", &edited])?;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(generation(&lab)?, g + 1);
    // Audit to enforce (attach without --audit over it) is checked.
    let (code, err) = ssh_run(
        &lab,
        &[
            "attach",
            "eth0",
            "--role",
            "db",
            "--no-wait",
            "--policy",
            &edited,
        ],
    )?;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("ssh-session"), "{err}");
    assert_eq!(lab.status_json("db")?["attachments"][0]["mode"], "audit");
    Ok(())
}

/// The port fast-miss bitmap is kept with the port trie by every change.
/// When its pin is gone while the attached programs read it (the kernel
/// lists the map among their maps), a reload cannot keep it with the
/// trie: it fails and changes nothing (the policy in force stays, and so
/// do its verdicts); an attachment whose programs read no bitmap (an
/// older build's) is changed without one.
#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn reload_without_the_bitmap_pin_of_programs_that_read_it_changes_nothing() -> anyhow::Result<()> {
    let s = setup("pmiss")?;
    let g = generation(&s.lab)?;
    let mut instance = Instance::dry_run(&s.att)?;
    let before = verdicts(&mut instance, &probes())?;
    std::fs::remove_file(s.att.map(segbpf_common::MAP_PORTMISS))?;
    let out = s
        .lab
        .segbpf("db", &["reload", "eth0", "-p", s.b.to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(segbpf_common::MAP_PORTMISS), "{err}");
    assert_eq!(generation(&s.lab)?, g, "nothing was applied: {err}");
    assert_eq!(
        verdicts(&mut instance, &probes())?,
        before,
        "the policy in force judges as before"
    );
    Ok(())
}
