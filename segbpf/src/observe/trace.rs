//! Tracing a packet through the program loaded on an interface with
//! BPF_PROG_TEST_RUN. The run uses a dry-run instance of the program that
//! shares the live maps but writes no counters and no connection or
//! fragment state, so tracing changes nothing. It reports whether the
//! packet matched a tracked connection, and which rule allowed it.

use aya::programs::{TestRun as _, TestRunOptions};
use segbpf_common::{NO_RULE, reason};
use serde::Serialize;

use crate::{
    attachment::loader::{self, LoadError},
    attachment::maps::{self, MapsError},
    attachment::pins::Attachment,
    attachment::state::State,
    policy::Direction,
};

/// Errors tracing a packet.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Nothing to trace through.
    #[error("segbpf is not attached to {0}")]
    NotAttached(String),
    /// A pinned map is missing.
    #[error("{0} is missing: the attachment is incomplete; detach and attach again")]
    Incomplete(String),
    /// The attachment's connection tables are an older build's.
    #[error(
        "{0} was attached by an older segbpf build whose connection tables this build does not trace through: attach it again with this build (its flows are moved into the new tables)"
    )]
    OlderBuild(String),
    /// The dry-run instance could not be loaded.
    #[error("loading a dry-run instance: {0}")]
    Load(#[from] LoadError),
    /// BPF_PROG_TEST_RUN failed.
    #[error("BPF_PROG_TEST_RUN: {0}")]
    Run(#[from] aya::programs::ProgramError),
    /// The trace record could not be read.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// The program ran but recorded nothing.
    #[error("the program did not record a decision")]
    NoDecision,
}

/// What the program decided for the traced packet.
#[derive(Debug, Serialize)]
pub struct Traced {
    /// `allow` or `drop`.
    pub verdict: &'static str,
    /// Reason name.
    pub reason: &'static str,
    /// Direction judged.
    pub direction: Direction,
    /// The program's return code (XDP action, or TC action for egress).
    #[serde(rename = "return_value")]
    pub action: u32,
    /// Whether the packet matched a tracked connection.
    pub ct_hit: bool,
    /// Rule id, label and line, if a rule allowed the packet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<crate::policy::compile::RuleJson>,
    /// Address class of the peer, if the peer is in any rule's peers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<u32>,
}

/// Runs `frame` through a dry-run instance sharing `att`'s maps: the XDP
/// program for ingress, the TC program for egress.
pub fn trace_packet(att: &Attachment, dir: Direction, frame: &[u8]) -> Result<Traced, TraceError> {
    let mut ebpf = dry_run_instance(att)?;
    trace_with(&mut ebpf, att, dir, frame)
}

/// Loads the dry-run instance `trace_packet` uses for `att` (verifying the
/// programs takes a second or two; [`trace_with`] reuses one instance for
/// many packets).
pub fn dry_run_instance(att: &Attachment) -> Result<aya::Ebpf, TraceError> {
    if !att.is_attached() {
        return Err(TraceError::NotAttached(att.describe()));
    }
    for m in loader::dry_run_maps() {
        if !att.map(m).exists() {
            let older = segbpf_common::SHARED_MAPS.contains(&m)
                && segbpf_common::LEGACY_SHARED_MAPS
                    .iter()
                    .any(|old| att.map(old).exists());
            if older {
                return Err(TraceError::OlderBuild(att.describe()));
            }
            return Err(TraceError::Incomplete(att.map(m).display().to_string()));
        }
    }
    Ok(loader::load_dry_run(att)?)
}

/// Runs `frame` through `ebpf`, a [`dry_run_instance`] of `att`.
pub fn trace_with(
    ebpf: &mut aya::Ebpf,
    att: &Attachment,
    dir: Direction,
    frame: &[u8],
) -> Result<Traced, TraceError> {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    let result = match dir {
        Direction::Ingress => loader::xdp(ebpf)?.test_run(opts),
        Direction::Egress => loader::tc(ebpf)?.test_run(opts),
    }?;
    let t = maps::take_trace(ebpf)?;
    if t.valid == 0 {
        return Err(TraceError::NoDecision);
    }
    let state = State::current(att).ok();
    let rule = (t.rule_id != NO_RULE).then(|| {
        let info = state.as_ref().and_then(|s| s.rule(t.rule_id));
        crate::policy::compile::RuleJson::new(t.rule_id, info)
    });
    Ok(Traced {
        verdict: if reason::passes(t.reason) {
            "allow"
        } else {
            "drop"
        },
        reason: reason::name(t.reason),
        direction: dir,
        action: result.return_value,
        ct_hit: t.reason == reason::PASS_CT,
        rule,
        class: (t.class_id != u32::MAX).then_some(t.class_id),
    })
}
