//! The observe layer: what the kernel saw and did, read back for people
//! and machines: drop events ([`telemetry`]), denied aggregates
//! ([`denied`]), flows and the flow log, metrics, the status report,
//! packet traces and policy suggestions from what was observed.
//!
//! May import `attachment`, `policy` and `host`; never `fleet` or `cmd`.

pub mod denied;
pub mod flowlog;
pub mod flows;
pub mod metrics;
pub mod report;
pub mod suggest;
pub mod telemetry;
pub mod trace;
