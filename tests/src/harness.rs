//! The kernel-side test harness: an [`Instance`] of segbpf's eBPF program
//! (both programs, XDP ingress and TC egress, with their maps) and frames
//! run through it with BPF_PROG_TEST_RUN.
//!
//! An instance is loaded either with maps of its own, holding a policy the
//! test compiled ([`Instance::with_policy`], [`Instance::with_compiled`]) or
//! none yet ([`Instance::load`]), or as a dry-run instance sharing an
//! existing attachment's pinned maps ([`Instance::dry_run`], or
//! [`Instance::trace`]: what `segbpf trace` loads, with its checks).
//! [`Instance::ingress`] runs a frame through the XDP program,
//! [`Instance::egress`] through the TC program; each returns a [`Verdict`]:
//! the program's return value and the decision it recorded in `SEG_TRACE`
//! (read and cleared after every run, so each verdict is the frame's own).
//! Instances in run mode `RUN_DRY` or `RUN_RECORD` record decisions; a
//! `RUN_RECORD` instance also keeps connection and fragment state like a
//! live one, a `RUN_DRY` instance changes no map but the trace record.
//!
//! Needs root and a kernel with BPF; built with the `harness` feature
//! (which links segbpf and its eBPF object).

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions},
};
use segbpf::{
    attachment::loader,
    attachment::maps,
    attachment::pins::Attachment,
    policy::compile::{self, Capacity, Compiled},
    policy::{Direction, Policy},
};
use segbpf_common::{LINK_ETHERNET, NO_RULE, reason};

/// Compiles `policy` for a host with `roles` on interface `iface`, as a
/// first attach does: slot 0, generation 1, default capacity.
pub fn compile(policy: &Policy, roles: &[String], iface: &str) -> anyhow::Result<Compiled> {
    Ok(compile::compile(
        policy,
        roles,
        Some(iface),
        0,
        1,
        Capacity::default(),
    )?)
}

/// A loaded instance of the program.
pub struct Instance {
    ebpf: Ebpf,
}

/// What the program decided for one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The program's return value: the XDP action for ingress (1 drop,
    /// 2 pass), the TC action for egress (0 ok, 2 shot).
    pub action: u32,
    /// Whether the program recorded a decision for the frame (the trace
    /// record's `valid`); when it did not, `reason` and `rule_id` are
    /// those of an empty record.
    pub recorded: bool,
    /// The reason code recorded (see `segbpf_common::reason`).
    pub reason: u8,
    /// The rule id recorded, or `NO_RULE`.
    pub rule_id: u32,
}

impl Verdict {
    /// Whether the recorded reason lets the frame through.
    pub fn passes(&self) -> bool {
        reason::passes(self.reason)
    }

    /// The rule that allowed the frame, if any.
    pub fn rule(&self) -> Option<u32> {
        (self.rule_id != NO_RULE).then_some(self.rule_id)
    }

    /// The verdict, or an error if the program recorded no decision.
    pub fn ensure_recorded(self) -> anyhow::Result<Verdict> {
        anyhow::ensure!(self.recorded, "no decision recorded");
        Ok(self)
    }
}

impl Instance {
    /// A fresh instance for an Ethernet device, with its own empty maps of
    /// default capacity, in run mode `mode` (`segbpf_common::RUN_DRY`,
    /// `RUN_RECORD` or `RUN_LIVE`).
    pub fn load(mode: u8) -> anyhow::Result<Instance> {
        Instance::load_for_link(mode, LINK_ETHERNET)
    }

    /// Like [`Instance::load`], for a device whose link layer is `link`
    /// (`segbpf_common::LINK_ETHERNET` or `LINK_RAW_IP`).
    pub fn load_for_link(mode: u8, link: u8) -> anyhow::Result<Instance> {
        Ok(Instance {
            ebpf: loader::load_for_link(Capacity::default(), mode, link)?,
        })
    }

    /// A fresh instance for an Ethernet device (as [`Instance::load`]) with
    /// `compiled` written to its maps and activated.
    pub fn with_compiled(compiled: &Compiled, mode: u8) -> anyhow::Result<Instance> {
        let mut instance = Instance::load(mode)?;
        instance.write_policy(compiled)?;
        Ok(instance)
    }

    /// A fresh instance for an Ethernet device with `policy` compiled for
    /// `roles` on `iface` (see [`compile`]) in its maps.
    pub fn with_policy(
        policy: &Policy,
        roles: &[String],
        iface: &str,
        mode: u8,
    ) -> anyhow::Result<Instance> {
        Instance::with_policy_for_link(policy, roles, iface, mode, LINK_ETHERNET)
    }

    /// Like [`Instance::with_policy`], for a device whose link layer is
    /// `link`.
    pub fn with_policy_for_link(
        policy: &Policy,
        roles: &[String],
        iface: &str,
        mode: u8,
        link: u8,
    ) -> anyhow::Result<Instance> {
        let mut instance = Instance::load_for_link(mode, link)?;
        instance.write_policy(&compile(policy, roles, iface)?)?;
        Ok(instance)
    }

    /// A dry-run instance on `att`'s pins: it shares every pinned map of
    /// the attachment (policy, config, counters, connection and fragment
    /// state) but changes none of them, and reads packets as the live
    /// program does (the link layer recorded at attach). Whatever holds the
    /// attachment's link (a pin, or a foreground `segbpf attach`), only the
    /// maps are used.
    pub fn dry_run(att: &Attachment) -> anyhow::Result<Instance> {
        Ok(Instance {
            ebpf: loader::load_dry_run(att)?,
        })
    }

    /// The dry-run instance `segbpf trace` loads for `att`
    /// (`segbpf::observe::trace::dry_run_instance`): as [`Instance::dry_run`],
    /// after `segbpf trace`'s checks that `att`'s link is pinned and every
    /// map it shares is there. Pass [`Instance::ebpf_mut`] to
    /// `segbpf::observe::trace::trace_with` to judge frames as `segbpf trace`
    /// does.
    pub fn trace(att: &Attachment) -> anyhow::Result<Instance> {
        Ok(Instance {
            ebpf: segbpf::observe::trace::dry_run_instance(att)?,
        })
    }

    /// Writes `compiled` to the instance's policy slot
    /// (`compiled.config.active_slot`) and activates it.
    pub fn write_policy(&mut self, compiled: &Compiled) -> anyhow::Result<()> {
        Ok(maps::write_policy(&mut self.ebpf, compiled)?)
    }

    /// Runs `frame` through the ingress (XDP) program.
    pub fn ingress(&mut self, frame: impl AsRef<[u8]>) -> anyhow::Result<Verdict> {
        self.run(Direction::Ingress, frame)
    }

    /// Runs `frame` through the egress (TC) program.
    pub fn egress(&mut self, frame: impl AsRef<[u8]>) -> anyhow::Result<Verdict> {
        self.run(Direction::Egress, frame)
    }

    /// Runs `frame` through the program of direction `dir`: XDP for
    /// ingress, TC for egress. An error is the test run failing (the
    /// kernel refusing the frame, for one); the trace record is then left
    /// as it was.
    pub fn run(&mut self, dir: Direction, frame: impl AsRef<[u8]>) -> anyhow::Result<Verdict> {
        let opts = TestRunOptions {
            data_in: Some(frame.as_ref()),
            ..TestRunOptions::new()
        };
        let result = match dir {
            Direction::Ingress => loader::xdp(&mut self.ebpf)?.test_run(opts)?,
            Direction::Egress => loader::tc(&mut self.ebpf)?.test_run(opts)?,
        };
        let t = maps::take_trace(&mut self.ebpf).context("reading the decision (SEG_TRACE)")?;
        Ok(Verdict {
            action: result.return_value,
            recorded: t.valid == 1,
            reason: t.reason,
            rule_id: t.rule_id,
        })
    }

    /// The loaded object, to read its maps.
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// The loaded object, mutably (map writes, `segbpf::observe::trace::trace_with`).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

/// A kernel LRU hash map made by hand (`BPF_MAP_CREATE`), as an earlier
/// build's connection table was: `name`, keys and values of the given
/// sizes. For tests of what this build does with such tables (read,
/// prune, adopt) and of batched reads.
pub fn lru_map(
    name: &str,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> anyhow::Result<aya::maps::MapData> {
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    map_by_hand(
        BPF_MAP_TYPE_LRU_HASH,
        name,
        key_size,
        value_size,
        max_entries,
        0,
    )
}

/// A kernel map made by hand (`BPF_MAP_CREATE`): its type, name, key and
/// value sizes, capacity and flags.
pub fn map_by_hand(
    map_type: u32,
    name: &str,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
) -> anyhow::Result<aya::maps::MapData> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    const BPF_MAP_CREATE: libc::c_long = 0;
    // union bpf_attr, BPF_MAP_CREATE: map_type, key_size, value_size,
    // max_entries, map_flags, inner_map_fd, numa_node (u32 each), then
    // map_name[16].
    let mut attr = [0u8; 128];
    for (i, v) in [map_type, key_size, value_size, max_entries, flags]
        .into_iter()
        .enumerate()
    {
        attr[4 * i..4 * i + 4].copy_from_slice(&v.to_ne_bytes());
    }
    let n = name.len().min(15);
    attr[28..28 + n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: the bpf syscall with a zeroed, initialised attribute buffer
    // of its documented layout and length; the result is a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    anyhow::ensure!(
        fd >= 0,
        "BPF_MAP_CREATE {name}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new fd the kernel just returned, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    Ok(aya::maps::MapData::from_fd(fd)?)
}
