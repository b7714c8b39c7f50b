//! `aya::Pod` for the shared types (aya's typed maps need it).
use super::{
    Config, Counter, CtEntry, CtKey, CtKey4, DeniedBucket, DeniedKey, DeniedRate, Event, FragEntry,
    FragKey, PeerClass, PeerKeyV4, PeerKeyV6, PortKey, PortMiss, RateState, RuleRef, TraceResult,
};

// SAFETY: all types are #[repr(C)], have no padding holes (explicit
// `_pad` fields) and are `bytemuck::Pod`.
unsafe impl aya::Pod for PeerKeyV4 {}
// SAFETY: as above.
unsafe impl aya::Pod for PeerKeyV6 {}
// SAFETY: as above.
unsafe impl aya::Pod for PeerClass {}
// SAFETY: as above.
unsafe impl aya::Pod for PortKey {}
// SAFETY: as above.
unsafe impl aya::Pod for RuleRef {}
// SAFETY: as above.
unsafe impl aya::Pod for Config {}
// SAFETY: as above.
unsafe impl aya::Pod for TraceResult {}
// SAFETY: as above.
unsafe impl aya::Pod for Counter {}
// SAFETY: as above.
unsafe impl aya::Pod for RateState {}
// SAFETY: as above.
unsafe impl aya::Pod for Event {}
// SAFETY: as above.
unsafe impl aya::Pod for CtKey {}
// SAFETY: as above.
unsafe impl aya::Pod for CtKey4 {}
// SAFETY: as above.
unsafe impl aya::Pod for CtEntry {}
// SAFETY: as above.
unsafe impl aya::Pod for FragKey {}
// SAFETY: as above.
unsafe impl aya::Pod for FragEntry {}
// SAFETY: as above.
unsafe impl aya::Pod for DeniedKey {}
// SAFETY: as above.
unsafe impl aya::Pod for DeniedBucket {}
// SAFETY: as above.
unsafe impl aya::Pod for DeniedRate {}
// SAFETY: as above.
unsafe impl aya::Pod for PortMiss {}
