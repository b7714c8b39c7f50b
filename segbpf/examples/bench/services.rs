//! Per-packet cost of the services programs (`cgroup_skb`, docs/services.md)
//! through BPF_PROG_TEST_RUN, against an empty `cgroup_skb` program. The
//! kernel gives the test packet a socket of the calling process's cgroup,
//! so the bench moves itself into a service's cgroup (below a scratch
//! cgroup root) for the service cases, and back afterwards.

use std::path::{Path, PathBuf};

use aya::programs::{CgroupSkb, TestRun as _, TestRunOptions};
use segbpf::{
    attachment::{pins::Roots, services as engine},
    host::{cgroups::CgroupRoot, packet::PacketSpec},
    policy::Policy,
};
use segbpf_common::{PROG_SVC_EGRESS, PROG_SVC_EMPTY, PROG_SVC_INGRESS};
use serde_json::json;

const POLICY: &str = r#"version = 1
[services.app]
cgroup = "app"
defaults = { egress = "drop" }
[services.db]
cgroup = "db"
[[services.db.ingress]]
from_services = ["app"]
tcp = [3306]
[[services.app.egress]]
to = ["192.0.2.1", "2001:db8::1"]
tcp = [1000]
"#;

/// The scratch cgroup root, pins and state; removed (and the bench moved
/// back to its own cgroup) when dropped.
struct Scratch {
    root: PathBuf,
    home: PathBuf,
    roots: Roots,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.home.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        let _ = std::fs::remove_dir_all(&self.roots.bpffs);
        let _ = std::fs::remove_dir_all(&self.roots.state);
        for d in ["app", "db", ""] {
            let _ = std::fs::remove_dir(self.root.join(d));
        }
    }
}

fn join(cgroup: &Path) -> anyhow::Result<()> {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())?;
    Ok(())
}

fn ns(prog: &CgroupSkb, frame: &[u8], repeat: u32) -> anyhow::Result<f64> {
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..TestRunOptions::new()
    })?;
    Ok(r.duration.as_nanos() as f64)
}

/// Rows: (case, median ns, ratio to the empty program's median).
pub(crate) fn per_packet(rounds: usize, repeat: u32) -> anyhow::Result<serde_json::Value> {
    let (mount, _) = segbpf::host::cgroups::cgroup2_mount()?;
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/")
        .trim_start_matches('/')
        .to_string();
    let pid = std::process::id();
    let scratch = Scratch {
        root: mount.join(format!("segbpf-bench-{pid}")),
        home: mount.join(own),
        roots: Roots {
            bpffs: PathBuf::from(format!("/sys/fs/bpf/segbpf-bench-svc-{pid}")),
            state: std::env::temp_dir().join(format!("segbpf-bench-svc-{pid}")),
        },
    };
    for d in ["app", "db"] {
        std::fs::create_dir_all(scratch.root.join(d))?;
    }
    std::fs::create_dir_all(&scratch.roots.bpffs)?;
    let paths = engine::SvcPaths::new(&scratch.roots, CgroupRoot::open(Some(&scratch.root))?);
    let policy = Policy::from_str(POLICY, "bench")?;
    let mut ebpf = engine::load_unattached(&paths, &policy)?;
    for name in [PROG_SVC_EMPTY, PROG_SVC_EGRESS, PROG_SVC_INGRESS] {
        let p: &mut CgroupSkb = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow::anyhow!("no {name}"))?
            .try_into()?;
        p.load()?;
    }
    let prog = |name: &str| -> anyhow::Result<&CgroupSkb> {
        Ok(ebpf
            .program(name)
            .ok_or_else(|| anyhow::anyhow!("no {name}"))?
            .try_into()?)
    };
    let local: std::net::IpAddr = "192.0.2.9".parse()?;
    let allowed = PacketSpec::tcp(local, "192.0.2.1".parse()?, 40000, 1000)
        .build()
        .bytes;
    let denied = PacketSpec::tcp(local, "192.0.2.1".parse()?, 40000, 2000)
        .build()
        .bytes;
    let allowed6 = PacketSpec::tcp("2001:db8::9".parse()?, "2001:db8::1".parse()?, 40000, 1000)
        .build()
        .bytes;
    // (name, cgroup to be in, program, frame)
    let cases: Vec<(&str, PathBuf, &str, &Vec<u8>)> = vec![
        (
            "svc: socket in no service (egress)",
            scratch.root.clone(),
            PROG_SVC_EGRESS,
            &allowed,
        ),
        (
            "svc: app, allowed tcp, flow entry hit (egress)",
            scratch.root.join("app"),
            PROG_SVC_EGRESS,
            &allowed,
        ),
        (
            "svc: app, allowed tcp IPv6, flow entry hit (egress)",
            scratch.root.join("app"),
            PROG_SVC_EGRESS,
            &allowed6,
        ),
        (
            "svc: app, denied tcp: rules + default drop (egress)",
            scratch.root.join("app"),
            PROG_SVC_EGRESS,
            &denied,
        ),
        (
            "svc: db, no rule matches: default drop (ingress)",
            scratch.root.join("db"),
            PROG_SVC_INGRESS,
            &denied,
        ),
    ];
    let mut floor = Vec::new();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..rounds {
        join(&scratch.root)?;
        floor.push(ns(prog(PROG_SVC_EMPTY)?, &allowed, repeat)?);
        for (i, (_, cg, p, frame)) in cases.iter().enumerate() {
            join(cg)?;
            samples[i].push(ns(prog(p)?, frame, repeat)?);
        }
    }
    join(&scratch.home)?;
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let floor_med = med(&mut floor.clone());
    let mut rows = vec![
        json!({"case": "empty cgroup_skb program (floor)", "median_ns": floor_med, "ratio_to_floor": 1.0}),
    ];
    for (i, (name, ..)) in cases.iter().enumerate() {
        let m = med(&mut samples[i]);
        rows.push(json!({"case": name, "median_ns": m, "ratio_to_floor": m / floor_med}));
    }
    drop(ebpf);
    drop(scratch);
    Ok(serde_json::Value::Array(rows))
}
