//! `segbpf attach --services`, `segbpf detach --services` and the services
//! part of `segbpf status`: argument handling and output around
//! [`crate::attachment::services`].

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use tracing::{info, warn};

use crate::{
    attachment::{
        cgroup_follow::{self as follow, FollowEvent},
        pins::Roots,
        services::{self as engine, SvcPaths},
        services_guard as guard_engine,
    },
    cmd::{Output, UsageError, print_json},
    observe::services as report,
    policy::Policy,
};

fn paths(cgroup_root: Option<&std::path::Path>) -> anyhow::Result<SvcPaths> {
    let root = crate::attachment::services_level::open_root(cgroup_root)?;
    Ok(SvcPaths::new(&Roots::from_env(), root))
}

/// `segbpf attach --services`.
pub async fn attach(args: crate::cmd::attach::Args) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup_sig = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    if args.confirm.is_some() && args.follow_only {
        return Err(UsageError("--confirm does not go with --follow-only".into()).into());
    }
    let Some(policy_path) = args.policy.clone() else {
        return Err(UsageError("--services needs --policy FILE".into()).into());
    };
    let roots = Roots::from_env();
    // The pin root itself is made by the attach, once it is not refused.
    roots.ensure_bpffs_mounted()?;
    let paths = paths(args.cgroup_root.as_deref())?;
    if !args.insecure_policy {
        crate::attachment::trust::check_policy_file(&policy_path)?;
    }
    if args.confirm.is_some() && paths.is_attached() {
        return Err(UsageError(format!(
            "--confirm with --services guards a first attach only; services are already enforced below {} (apply the change with `segbpf reload --services`, or `segbpf detach --services` first)",
            paths.root.dir.display()
        ))
        .into());
    }
    if !args.follow_only {
        let policy = Policy::load(&policy_path)?;
        let state = engine::attach(&paths, &policy, &policy_path, args.audit)?;
        if let Some(secs) = args.confirm {
            arm_guard(&paths, state.generation, secs)?;
        }
        let summary = format!(
            "services {} below {} (generation {}{}): {}",
            if state.audit { "audited" } else { "enforced" },
            paths.root.dir.display(),
            state.generation,
            if state.audit {
                ", audit mode: nothing is dropped"
            } else {
                ""
            },
            state
                .services
                .iter()
                .map(|s| format!("{} ({})", s.name, s.cgroup))
                .collect::<Vec<_>>()
                .join(", ")
        );
        info!("{summary}");
        if args.no_wait {
            // The cgroup tree must still be followed: a cgroup made below a
            // guard is held until classified. A follower stays behind,
            // unless one lives already (its claim is held in the kernel).
            if let Some(pid) = follow::live_follower(&paths)? {
                info!(
                    "the cgroup tree is already followed by {} until `segbpf detach --services`: no other follower started",
                    pid.map_or_else(|| "a live process".to_string(), |p| format!("process {p}"))
                );
                return Ok(());
            }
            let log_file = follow::follower_log_file(&paths);
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_file)
                .with_context(|| format!("opening {}", log_file.display()))?;
            let exe = std::env::current_exe().context("finding segbpf's own executable")?;
            let mut cmd = std::process::Command::new(exe);
            cmd.arg("attach")
                .arg("--services")
                .arg("--policy")
                .arg(&policy_path)
                .arg("--cgroup-root")
                .arg(&paths.root.dir)
                .arg("--follow-only")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                // Its log (cgroup changes, reloads on SIGHUP and their
                // errors, refused packets go to its stdout: none).
                .stderr(log);
            if args.audit {
                cmd.arg("--audit");
            }
            if args.insecure_policy {
                cmd.arg("--insecure-policy");
            }
            // SAFETY: setsid is async-signal-safe; nothing else runs in the child.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                    nix::unistd::setsid()
                        .map(|_| ())
                        .map_err(std::io::Error::from)
                });
            }
            let mut child = cmd.spawn().context("starting the cgroup follower")?;
            // Name the follower that holds the claim (the kernel says
            // which): this one, or one another `--no-wait` started at the
            // same time (this one then leaves).
            let Some(pid) =
                follow::await_follower(&paths, &mut child, std::time::Duration::from_secs(10))?
            else {
                anyhow::bail!(
                    "the cgroup follower (process {}) does not follow the cgroup tree: new cgroups below a service stay held until one does (see its log {}; run `segbpf attach --services --no-wait` again)",
                    child.id(),
                    log_file.display()
                );
            };
            if pid == child.id() {
                info!(
                    "the cgroup tree is followed by process {pid} until `segbpf detach --services` (log: {})",
                    log_file.display()
                );
            } else {
                info!(
                    "the cgroup tree is followed by process {pid}, started at the same time by another attach, until `segbpf detach --services` (log: {}): the one started here leaves",
                    log_file.display()
                );
            }
            return Ok(());
        }
        crate::host::service::ready(&summary);
    }
    // One follower per attachment: a second `--follow-only` (two
    // `--no-wait` at once) leaves; a foreground attach follows anyway (it
    // prints the refused packets) and says so.
    let claim = follow::claim_follower(&paths)?;
    if claim.is_none() {
        if args.follow_only {
            info!(
                "the cgroup tree below {} is already followed: this follower leaves",
                paths.root.dir.display()
            );
            return Ok(());
        }
        warn!("another process follows the cgroup tree too");
    }
    info!(
        "following the cgroup tree below {}; SIGHUP reloads the policy file in force (now {}); Ctrl-C leaves the foreground (enforcement stays until `segbpf detach --services`)",
        paths.root.dir.display(),
        paths
            .read_state()
            .map_or_else(|| policy_path.clone(), |s| s.policy)
            .display()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let hup = Arc::new(AtomicBool::new(false));
    let (s2, h2) = (stop.clone(), hup.clone());
    let json = args.log_format == crate::observe::telemetry::LogFormat::Json;
    let insecure = args.insecure_policy;
    let p2 = paths.clone();
    // The background follower's log is a file: capped (rotated).
    let rotate = args.follow_only.then(|| paths.clone());
    let worker = tokio::task::spawn_blocking(move || {
        follow::follow(&p2, insecure, &s2, &h2, |ev| {
            if let Some(p) = &rotate {
                follow::rotate_log(p);
            }
            match ev {
                FollowEvent::Rescanned { written, removed } => {
                    info!("cgroup tree changed: {written} entries written, {removed} removed");
                }
                FollowEvent::Reloaded(g) => info!("policy applied: generation {g}"),
                FollowEvent::ReloadFailed(e) => {
                    warn!("reload failed, the previous policy stays in force: {e}");
                }
                FollowEvent::Refused(r) => print_refused(&r, json),
                FollowEvent::Relinked(l) => warn!("{l}"),
                FollowEvent::RelinkFailed(e) => warn!("{e}"),
            }
        })
    });
    tokio::pin!(worker);
    loop {
        tokio::select! {
            _ = term.recv() => stop.store(true, Ordering::Relaxed),
            _ = int.recv() => stop.store(true, Ordering::Relaxed),
            _ = hup_sig.recv() => hup.store(true, Ordering::Relaxed),
            r = &mut worker => {
                r.context("the cgroup follower")??;
                drop(claim);
                left_behind(&paths, &policy_path);
                return Ok(());
            }
        }
    }
}

/// Says what a follower that leaves (Ctrl-C, SIGTERM) leaves behind while
/// the attachment stays: enforcement, and, unless another process follows
/// the tree, new cgroups below the guards held until a follower runs.
fn left_behind(paths: &SvcPaths, policy_path: &std::path::Path) {
    if !paths.is_attached() {
        return;
    }
    let root = cgroup_root_option(paths);
    if let Some(pid) = follow::follower_in_kernel(paths) {
        info!(
            "the services stay enforced below {}; process {pid} follows the cgroup tree",
            paths.root.dir.display()
        );
    } else {
        warn!(
            "the services stay enforced below {} but no process follows the cgroup tree now: a cgroup made below a guard (a restarted service, a new container) is held, its sockets can neither send nor receive, until a follower runs (`segbpf attach --services --no-wait --policy {}{root}`) or `segbpf detach --services{root}`",
            paths.root.dir.display(),
            policy_path.display()
        );
    }
}

/// Arms the lockout guard of a first services attach: the record, then
/// the guard process in its own session. If the guard cannot be started
/// the attach is undone (never an unguarded change that was asked to be
/// guarded).
fn arm_guard(paths: &SvcPaths, generation: u64, secs: u64) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let started = (|| -> anyhow::Result<u32> {
        guard_engine::arm(paths, generation, secs)?;
        let exe = std::env::current_exe().context("finding segbpf's own executable")?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["guard", "--services", "--cgroup-root"])
            .arg(&paths.root.dir)
            .args(["--generation", &generation.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            // Its log: a file next to the state (a terminal or pipe would
            // keep the caller waiting, or be gone when the guard speaks).
            .stderr(std::fs::File::create(
                paths.state.with_extension("guard.log"),
            )?);
        // SAFETY: setsid() is async-signal-safe; the child leaves our
        // session and process group, so signals to the attach miss it.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        Ok(cmd.spawn().context("starting the confirmation guard")?.id())
    })();
    match started {
        Ok(pid) => {
            warn!(
                "the services below {} are removed in {secs}s unless `segbpf confirm --services{}` runs (guard process {pid})",
                paths.root.dir.display(),
                cgroup_root_option(paths)
            );
            Ok(())
        }
        Err(e) => {
            let _ = guard_engine::confirm(paths);
            let _ = engine::detach(paths);
            Err(e.context("--confirm: the guard could not be armed; the attach was undone"))
        }
    }
}

/// ` --cgroup-root DIR` unless DIR is the default (the cgroup v2 mount).
fn cgroup_root_option(paths: &SvcPaths) -> String {
    root_option(&paths.root.dir)
}

/// ` --cgroup-root DIR` unless `dir` is the default cgroup root.
fn root_option(dir: &std::path::Path) -> String {
    match (
        crate::attachment::services_level::open_root(None),
        crate::attachment::services_level::open_root(Some(dir)),
    ) {
        (Ok(d), Ok(r)) if d.id == r.id => String::new(),
        _ => format!(" --cgroup-root {}", dir.display()),
    }
}

/// `segbpf confirm --services`.
pub fn confirm(cgroup_root: Option<PathBuf>, output: Output) -> anyhow::Result<()> {
    let paths = paths(cgroup_root.as_deref())?;
    let Some(generation) = guard_engine::confirm(&paths)? else {
        anyhow::bail!(
            "no services change below {} is waiting for confirmation",
            paths.root.dir.display()
        );
    };
    match output {
        Output::Json => print_json(&serde_json::json!({
            "services": true,
            "cgroup_root": paths.root.dir,
            "generation": generation,
            "confirmed": true,
        }))?,
        Output::Text => crate::cmd::print_line(format_args!(
            "confirmed generation {generation} of the services below {}",
            paths.root.dir.display()
        ))?,
    }
    Ok(())
}

/// The hidden `segbpf guard --services`.
pub fn guard(cgroup_root: Option<PathBuf>, generation: u64) -> anyhow::Result<()> {
    let paths = paths(cgroup_root.as_deref())?;
    let outcome = guard_engine::run_guard(&paths, generation);
    info!("services guard of generation {generation}: {outcome:?}");
    Ok(())
}

/// One event line on stdout (a closed stdout is ignored: enforcement goes on).
fn print_refused(r: &follow::Refused, json: bool) {
    let line = if json {
        crate::cmd::json_line(&crate::observe::services::SvcEventRecord::of(r)).unwrap_or_default()
    } else {
        event_text(r)
    };
    let _ = crate::cmd::print_line(line);
}

/// One event as a text line: `drop egress service=app tcp A:P -> B:Q`.
pub fn event_text(r: &follow::Refused) -> String {
    {
        let proto = match r.proto {
            6 => "tcp".to_string(),
            17 => "udp".to_string(),
            1 => "icmp".to_string(),
            58 => "icmpv6".to_string(),
            n => format!("proto {n}"),
        };
        let addr = |a: std::net::IpAddr, p: u16| match a {
            std::net::IpAddr::V4(a) => format!("{a}:{p}"),
            std::net::IpAddr::V6(a) => format!("[{a}]:{p}"),
        };
        format!(
            "{} {} service={} {proto} {} -> {}",
            r.action,
            r.direction,
            r.service,
            addr(r.src, r.sport),
            addr(r.dst, r.dport)
        )
    }
}

/// `segbpf detach --services`.
pub fn detach(cgroup_root: Option<PathBuf>, output: Output) -> anyhow::Result<()> {
    let (current, gone) = with_gone(cgroup_root.as_deref())?;
    let current = current.filter(|p| p.dir.exists() || p.state.exists());
    let Some(dir) = current
        .as_ref()
        .map(|p| p.root.dir.clone())
        .or_else(|| gone.first().map(|g| g.root.dir.clone()))
    else {
        return Err(paths(cgroup_root.as_deref()).map_or_else(|e| e, |p| p.not_attached().into()));
    };
    let mut was = false;
    if let Some(p) = &current {
        was = engine::detach(p)?;
    }
    for g in &gone {
        engine::detach(g)?;
        warn!(
            "removed the pins and state of the services attachment below {} whose cgroup (id {}) is gone",
            g.root.dir.display(),
            g.root.id
        );
    }
    // What the kernel still has there: another attachment's programs
    // (this detach waited for its own to leave).
    let still = crate::attachment::services_nest::services_programs_at(&dir);
    match output {
        Output::Json => print_json(&serde_json::json!({
            "services": true,
            "cgroup_root": dir,
            "detached": true,
            "was_attached": was,
            "still_enforced_by_programs": still,
            "gone_removed": gone.iter().map(|g| g.root.id).collect::<Vec<_>>(),
        }))?,
        Output::Text if still.is_empty() => {
            crate::cmd::print_line(format_args!(
                "detached the services below {}",
                dir.display()
            ))?;
        }
        Output::Text => {
            crate::cmd::print_line(format_args!(
                "removed what this state directory had below {} ({}); services there are STILL enforced, by another attachment: {} program(s) of it are attached at that cgroup (made with another SEGBPF_STATE_DIR or SEGBPF_BPFFS: `segbpf status --services` with those shows it, `segbpf detach --services` with those removes it)",
                dir.display(),
                if was {
                    "its pins and state"
                } else {
                    "nothing was there"
                },
                still.len()
            ))?;
        }
    }
    Ok(())
}

/// The attachment of the cgroup root `cgroup_root` (default: the cgroup
/// v2 mount), if that cgroup exists, and the attachments whose state names
/// that root but whose cgroup is gone ([`engine::gone_at`]). A root that
/// does not exist (removed) has only gone ones; any other error (the level
/// unknown) is returned.
fn with_gone(
    cgroup_root: Option<&std::path::Path>,
) -> anyhow::Result<(Option<SvcPaths>, Vec<SvcPaths>)> {
    let roots = Roots::from_env();
    match paths(cgroup_root) {
        Ok(p) => {
            let gone = engine::gone_at(&roots, &p.root.dir, Some(p.root.id));
            Ok((Some(p), gone))
        }
        Err(e) => match cgroup_root {
            Some(dir) if !dir.exists() => {
                crate::attachment::services_level::ns_root()?;
                Ok((None, engine::gone_at(&roots, dir, None)))
            }
            _ => Err(e),
        },
    }
}

/// `segbpf reload --services`: the policy file (default: the one in
/// force) applied to the services attachment; on any error the policy in
/// force stays.
pub fn reload(
    cgroup_root: Option<PathBuf>,
    policy: Option<PathBuf>,
    insecure_policy: bool,
    keep_set_edits: bool,
    output: Output,
) -> anyhow::Result<()> {
    let paths = paths(cgroup_root.as_deref())?;
    let state = paths.read_state().ok_or_else(|| {
        if paths.is_attached() {
            paths.foreign()
        } else {
            paths.not_attached()
        }
    })?;
    let path = policy.unwrap_or(state.policy.clone());
    if !insecure_policy {
        crate::attachment::trust::check_policy_file(&path)?;
    }
    let s = engine::reload_file(&paths, &path, state.audit, keep_set_edits)?;
    match output {
        Output::Json => print_json(&serde_json::json!({
            "services": true,
            "cgroup_root": paths.root.dir,
            "applied": true,
            "generation": s.generation,
            "policy": path,
        }))?,
        Output::Text => crate::cmd::print_line(format_args!(
            "services below {}: generation {} in force ({})",
            paths.root.dir.display(),
            s.generation,
            path.display()
        ))?,
    }
    Ok(())
}

/// Reports of every services attachment (or the one below `cgroup_root`).
pub fn reports(cgroup_root: Option<&std::path::Path>, all: bool) -> Vec<report::SvcReport> {
    let roots = Roots::from_env();
    if !all {
        let Ok((current, gone)) = with_gone(cgroup_root) else {
            return Vec::new();
        };
        return current
            .filter(|p| p.dir.exists())
            .iter()
            .chain(&gone)
            .map(report::report)
            .collect();
    }
    let mut out = Vec::new();
    for id in engine::list(&roots) {
        let state_file = roots.state.join(format!("{}{id}.json", engine::PIN_PREFIX));
        let dir = std::fs::read_to_string(&state_file)
            .ok()
            .and_then(|t| serde_json::from_str::<engine::SvcState>(&t).ok())
            .map(|s| s.cgroup_root);
        let root = dir.and_then(|d| crate::attachment::services_level::open_root(Some(&d)).ok());
        match root {
            Some(r) if r.id == id => out.push(report::report(&SvcPaths::new(&roots, r))),
            // No state here, or one naming its root by another cgroup
            // namespace's path: the cgroup found by its id in the kernel,
            // listed when its programs are linked (a crashed attach's
            // leftover that enforces) or a state here is for it (an
            // attachment made in a container).
            _ => {
                let found = crate::attachment::services_nest::cgroup_path(id)
                    .and_then(|d| crate::attachment::services_level::open_root(Some(&d)).ok())
                    .filter(|r| r.id == id);
                if let Some(r) = found {
                    let p = SvcPaths::new(&roots, r);
                    let r = report::report(&p);
                    if !r.linked.is_empty() || p.state.exists() {
                        out.push(r);
                    }
                }
            }
        }
    }
    // Attachments whose cgroup is gone, wherever they were (another
    // cgroup namespace's, one this state directory has no state for).
    out.extend(engine::gone_all(&roots).iter().map(report::report));
    out
}

/// The directions the kernel enforces through the pins, as text.
fn linked_text(linked: &[&str]) -> String {
    match linked {
        [] => "no program attached".to_string(),
        [one] => format!("only its {one} program is attached (it enforces {one})"),
        _ => "both programs are attached (they enforce)".to_string(),
    }
}

/// The status of a partial attachment (one direction linked).
fn partial(linked: &[&str]) -> &'static str {
    if linked.contains(&"egress") {
        "PARTIALLY attached: only egress is enforced (the ingress link is not in the kernel: detached by another tool, its pin removed, or an attach or detach killed half-way; a running follower links a detached link again within about a second, `segbpf attach --services` again restores it, `segbpf detach --services` removes the rest)"
    } else {
        "PARTIALLY attached: only ingress is enforced (the egress link is not in the kernel: detached by another tool, its pin removed, or an attach or detach killed half-way; a running follower links a detached link again within about a second, `segbpf attach --services` again restores it, `segbpf detach --services` removes the rest)"
    }
}

/// Prints services reports as text.
pub fn print_text(
    o: &mut impl std::io::Write,
    reports: &[report::SvcReport],
) -> std::io::Result<()> {
    for r in reports {
        if let Some(hint) = &r.pins_elsewhere {
            writeln!(o, "services below {}: {hint}", r.cgroup_root)?;
        }
        if let Some(side) = &r.side_dir {
            let extra = match r.side_linked.as_slice() {
                [] => "no program of it is attached".to_string(),
                [one] => format!(
                    "its {one} program is attached too (1 extra link, stricter: a packet passes only if every program passes it)"
                ),
                _ => "its ingress and egress programs are attached too (2 extra links, stricter: a packet passes only if every program passes it)".to_string(),
            };
            writeln!(
                o,
                "services below {}: a re-attach killed half-way left the side directory {side}: {extra}; the next `segbpf attach --services` or `segbpf detach --services{}` from the state directory that made it removes it",
                r.cgroup_root,
                root_option(std::path::Path::new(&r.cgroup_root))
            )?;
        }
        if r.crashed_attach {
            writeln!(
                o,
                "services below {}: left by an attach from this state directory that died before recording its state; {}; the next `segbpf attach --services` here replaces it, its links staying until the new ones enforce (or `segbpf detach --services{}`)",
                r.cgroup_root,
                linked_text(&r.linked),
                root_option(std::path::Path::new(&r.cgroup_root))
            )?;
            continue;
        }
        if r.foreign {
            // What is in force is the kernel's links' word, not the maps'.
            let in_force = match r.linked.as_slice() {
                _ if r.cgroup_gone => "nothing in force (its cgroup root was removed)".to_string(),
                [] => "nothing in force (no program of it is attached)".to_string(),
                [one] => format!(
                    "generation {} PARTIALLY in force (only its {one} program is attached: it enforces {one} only)",
                    r.generation
                ),
                _ => format!("generation {} in force", r.generation),
            };
            writeln!(
                o,
                "services below {}: attached by {}, {in_force}; this state directory has no state for it and does not change it (status, reload and detach with that SEGBPF_STATE_DIR; a crashed attach of this one: `segbpf detach --services{}`)",
                r.cgroup_root,
                r.owner_state_dir.as_deref().map_or_else(
                    || "another SEGBPF_STATE_DIR that shares these pins (or an attach that died before recording its state)".to_string(),
                    |d| format!("the segbpf whose SEGBPF_STATE_DIR is {d}")
                ),
                root_option(std::path::Path::new(&r.cgroup_root))
            )?;
            continue;
        }
        writeln!(
            o,
            "services below {}: {}, generation {}, policy {}",
            r.cgroup_root,
            match (r.attached, r.audit) {
                (false, _) if r.cgroup_gone =>
                    "NOT enforcing: its cgroup root was removed (`segbpf detach --services` removes what is left)",
                (false, _) if !r.linked.is_empty() => partial(&r.linked),
                (false, _) =>
                    "NOT attached: neither link is in the kernel (detached by another tool, their pins removed, or an attach or detach killed half-way; a running follower links detached links again within about a second, `segbpf attach --services` again restores them, `segbpf detach --services` removes the rest)",
                (true, true) => "auditing (audit mode: nothing is dropped)",
                (true, false) => "enforcing",
            },
            r.generation,
            r.policy.as_deref().unwrap_or("?")
        )?;
        if r.attached {
            match r.follower_pid {
                Some(pid) => writeln!(
                    o,
                    "  follower: process {pid} (new cgroups below the guards are classified as they appear)"
                )?,
                None => writeln!(
                    o,
                    "  follower: NONE: new cgroups below the guards are held (their sockets can neither send nor receive) until one runs: `segbpf attach --services --no-wait --policy FILE{}`",
                    root_option(std::path::Path::new(&r.cgroup_root))
                )?,
            }
        }
        if let Some(g) = r.restored {
            writeln!(o, "  the policy of generation {g}, restored by a rollback")?;
        }
        for (set, members) in &r.set_overrides {
            writeln!(
                o,
                "  set {set} edited live: {} (`segbpf reload --services` goes back to the file)",
                if members.is_empty() {
                    "(empty)".to_string()
                } else {
                    members.join(", ")
                }
            )?;
        }
        if let Some(deadline) = r.confirm_deadline {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            writeln!(
                o,
                "  PENDING: removed in {}s unless confirmed (`segbpf confirm --services{}`)",
                deadline.saturating_sub(now),
                root_option(std::path::Path::new(&r.cgroup_root))
            )?;
        }
        for s in &r.services {
            writeln!(
                o,
                "  {:<16} {:<40} {:<10} ingress {} ({} rules) egress {} ({} rules)  in {}/{} out {}/{} passed/dropped",
                s.name,
                s.cgroup,
                match (s.enforceable, s.cgroup_id.is_some()) {
                    (false, _) => "TOO-DEEP",
                    (true, true) => "present",
                    (true, false) => "absent",
                },
                s.ingress_default,
                s.ingress_rules,
                s.egress_default,
                s.egress_rules,
                s.packets.ingress_passed,
                s.packets.ingress_dropped,
                s.packets.egress_passed,
                s.packets.egress_dropped
            )?;
            if !s.enforceable {
                writeln!(
                    o,
                    "    NOT ENFORCED: its cgroup is at level {} of the hierarchy; the programs read down to level {} only",
                    s.cgroup_level,
                    crate::policy::services::MAX_CGROUP_LEVEL
                )?;
            }
        }
        writeln!(
            o,
            "  (no service)     in {}/{} out {}/{} passed/dropped",
            r.unserviced.ingress_passed,
            r.unserviced.ingress_dropped,
            r.unserviced.egress_passed,
            r.unserviced.egress_dropped
        )?;
        writeln!(
            o,
            "  stamps refused   {} (loopback packets with no valid sender stamp for them: judged as from no service)",
            r.stamps_refused
        )?;
    }
    Ok(())
}

/// The cgroup roots of the services attachments other than the one below
/// `cgroup_root` (default root when None).
fn reports_elsewhere(cgroup_root: Option<&std::path::Path>) -> Vec<String> {
    let this = crate::attachment::services_level::open_root(cgroup_root)
        .ok()
        .map(|r| r.id);
    reports(None, true)
        .into_iter()
        .filter(|r| {
            crate::attachment::services_level::open_root(Some(std::path::Path::new(&r.cgroup_root)))
                .ok()
                .map(|x| x.id)
                != this
        })
        .map(|r| r.cgroup_root)
        .collect()
}

/// `segbpf status --services`.
pub fn status(cgroup_root: Option<PathBuf>, output: Output) -> anyhow::Result<()> {
    // Where the level cannot be found, say so as every other services
    // command does (not "no services attachment").
    with_gone(cgroup_root.as_deref())?;
    let mut reports = reports(cgroup_root.as_deref(), false);
    // Without `--cgroup-root`: the live attachments elsewhere too, when
    // some are listed (gone ones; an attachment made in a cgroup
    // namespace is named by its path here).
    if cgroup_root.is_none() && !reports.is_empty() {
        let listed: Vec<String> = reports.iter().map(|r| r.cgroup_root.clone()).collect();
        reports.extend(
            self::reports(None, true)
                .into_iter()
                .filter(|r| !r.cgroup_gone && !listed.contains(&r.cgroup_root)),
        );
    }
    if reports.is_empty() {
        // The state here was made with another pin root: say where.
        // (Or it cannot be read, or it remains without its pins.)
        if let Ok(p) = paths(cgroup_root.as_deref())
            && let Some(hint) = p.absent_hint()
        {
            anyhow::bail!(
                "no services attachment below {} seen from here: {hint}",
                p.root.dir.display()
            );
        }
        let elsewhere: Vec<String> = reports_elsewhere(cgroup_root.as_deref());
        if elsewhere.is_empty() {
            anyhow::bail!("no services attachment");
        }
        anyhow::bail!(
            "no services attachment below this cgroup root; attached below: {} (add `--cgroup-root DIR`)",
            elsewhere.join(", ")
        );
    }
    match output {
        Output::Json => print_json(&serde_json::json!({ "services": reports }))?,
        Output::Text => print_text(&mut std::io::stdout().lock(), &reports)?,
    }
    Ok(())
}
