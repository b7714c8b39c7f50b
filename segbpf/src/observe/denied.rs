//! Denied aggregates: reading and emptying the kernel's tables of dropped
//! (and audit-mode would-be dropped) traffic, counted per (direction,
//! source, destination, protocol, destination port, reason).
//!
//! The kernel counts into one of two per-CPU tables. [`Drainer::drain`]
//! points the kernel at the other table, waits for programs already
//! running to finish, then reads and empties the one it left: a packet is
//! either in this drain or in the next, never lost between a read and a
//! delete. Packets that found the table full are counted by the kernel
//! (`SEG_DENY_LOST`) and reported as [`Drained::lost`].

use std::{net::IpAddr, time::Duration};

use aya::maps::{Array, Map, MapData, PerCpuArray, PerCpuHashMap};
use segbpf_common::{
    DeniedKey, DeniedStat, MAP_DENIED0, MAP_DENIED1, MAP_DENY_FULL, MAP_DENY_LOST, MAP_DENY_SEL,
};

use crate::{attachment::maps::MapsError, attachment::pins::Attachment};

/// How long programs that read the old selector may still be running:
/// one BPF program run takes microseconds; this is generous.
const GRACE: Duration = Duration::from_millis(20);

/// One aggregate of denied traffic since the previous drain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    /// The aggregate's key (direction, addresses, protocol, port, reason, kind).
    pub key: DeniedKey,
    /// Packets, summed over the CPUs.
    pub packets: u64,
    /// Bytes, summed over the CPUs.
    pub bytes: u64,
    /// Monotonic ns of the first packet.
    pub first_ns: u64,
    /// Monotonic ns of the last packet.
    pub last_ns: u64,
    /// The OR of the TCP flags seen.
    pub tcp_flags: u8,
}

impl Denied {
    /// The source address (None when the packet was not parsed as IP).
    pub fn src(&self) -> Option<IpAddr> {
        addr(self.key.family, self.key.src)
    }

    /// The destination address.
    pub fn dst(&self) -> Option<IpAddr> {
        addr(self.key.family, self.key.dst)
    }
}

fn addr(family: u8, b: [u8; 16]) -> Option<IpAddr> {
    matches!(family, 4 | 6).then(|| crate::host::proto::ip_from(family, b))
}

/// One aggregate from its per-CPU values. A CPU whose slot the kernel
/// never wrote (zeros: the element was made on another CPU) adds nothing;
/// a CPU that found the element made by another counts into its slot
/// without a first time (0, "never written"), so `first_ns` is the
/// earliest nonzero one: 0 would read as the machine's boot time.
pub fn merge<'a>(key: DeniedKey, values: impl Iterator<Item = &'a DeniedStat>) -> Denied {
    let mut a = Denied {
        key,
        packets: 0,
        bytes: 0,
        first_ns: u64::MAX,
        last_ns: 0,
        tcp_flags: 0,
    };
    let mut earliest_last = u64::MAX;
    for v in values.filter(|v| v.packets > 0) {
        a.packets += v.packets;
        a.bytes += v.bytes;
        if v.first_ns != 0 {
            a.first_ns = a.first_ns.min(v.first_ns);
        }
        earliest_last = earliest_last.min(v.last_ns);
        a.last_ns = a.last_ns.max(v.last_ns);
        a.tcp_flags |= v.tcp_flags;
    }
    if a.first_ns == u64::MAX {
        // No CPU has a first time: the earliest last time is the best known.
        a.first_ns = if earliest_last == u64::MAX {
            0
        } else {
            earliest_last
        };
    }
    a
}

/// What one drain found.
#[derive(Clone, Debug, Default)]
pub struct Drained {
    /// The aggregates, in no particular order.
    pub aggregates: Vec<Denied>,
    /// Denied packets the kernel could not aggregate since the previous
    /// drain (a table was full).
    pub lost: u64,
}

/// Reads and empties an attachment's denied tables. Hold the attachment's
/// flow-log lock (`LockKind::FlowLog`) while draining: two drainers would
/// each see part of the traffic.
pub struct Drainer {
    sel: Array<MapData, u32>,
    full: Array<MapData, u32>,
    tables: [PerCpuHashMap<MapData, DeniedKey, DeniedStat>; 2],
    /// The tables' descriptors, for batched reads ([`crate::attachment::batch`]).
    fds: [std::os::fd::OwnedFd; 2],
    /// Possible CPUs (values per key of the per-CPU tables).
    cpus: usize,
    /// Whether the kernel does batched reads of the tables.
    batches: bool,
    lost: PerCpuArray<MapData, u64>,
    lost_seen: u64,
}

impl std::fmt::Debug for Drainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drainer")
            .field("lost_seen", &self.lost_seen)
            .finish_non_exhaustive()
    }
}

fn err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> MapsError {
    move |source| MapsError::Map { map, source }
}

fn open(att: &Attachment, name: &'static str) -> Result<MapData, MapsError> {
    MapData::from_pin(att.map(name)).map_err(err(name))
}

impl Drainer {
    /// Opens the pinned tables of `att`. Packets lost before this call are
    /// not reported again.
    pub fn open(att: &Attachment) -> Result<Self, MapsError> {
        let table = |name| -> Result<PerCpuHashMap<MapData, DeniedKey, DeniedStat>, MapsError> {
            PerCpuHashMap::try_from(Map::PerCpuHashMap(open(att, name)?)).map_err(err(name))
        };
        let fd = |name| -> Result<std::os::fd::OwnedFd, MapsError> {
            use std::os::fd::AsFd as _;
            open(att, name)?
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| {
                    err(name)(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                        call: "dup",
                        io_error: e,
                    }))
                })
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| {
            err(MAP_DENIED0)(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "nr_cpus",
                io_error: e,
            }))
        })?;
        let mut d = Drainer {
            fds: [fd(MAP_DENIED0)?, fd(MAP_DENIED1)?],
            cpus,
            batches: true,
            sel: Array::try_from(Map::Array(open(att, MAP_DENY_SEL)?))
                .map_err(err(MAP_DENY_SEL))?,
            full: Array::try_from(Map::Array(open(att, MAP_DENY_FULL)?))
                .map_err(err(MAP_DENY_FULL))?,
            tables: [table(MAP_DENIED0)?, table(MAP_DENIED1)?],
            lost: PerCpuArray::try_from(Map::PerCpuArray(open(att, MAP_DENY_LOST)?))
                .map_err(err(MAP_DENY_LOST))?,
            lost_seen: 0,
        };
        d.lost_seen = d.lost_total()?;
        Ok(d)
    }

    fn lost_total(&self) -> Result<u64, MapsError> {
        let v = self.lost.get(&0, 0).map_err(err(MAP_DENY_LOST))?;
        Ok(v.iter().sum())
    }

    /// Everything denied since the previous drain.
    pub fn drain(&mut self) -> Result<Drained, MapsError> {
        let current = self.sel.get(&0, 0).map_err(err(MAP_DENY_SEL))? & 1;
        self.sel.set(0, current ^ 1, 0).map_err(err(MAP_DENY_SEL))?;
        std::thread::sleep(GRACE);
        let name = if current == 0 {
            MAP_DENIED0
        } else {
            MAP_DENIED1
        };
        if self.batches {
            use std::os::fd::AsFd as _;
            match crate::attachment::batch::read_all::<DeniedKey, DeniedStat>(
                self.fds[current as usize].as_fd(),
                self.cpus,
                true,
            ) {
                Ok((entries, cost)) => {
                    tracing::debug!(
                        "drained {name}: {} aggregates in {} bpf calls",
                        cost.entries,
                        cost.calls
                    );
                    let aggregates = entries
                        .into_iter()
                        .map(|(k, v)| merge(k, v.iter()))
                        .filter(|a| a.packets > 0)
                        .collect();
                    return self.finish(current, aggregates);
                }
                Err(e) if crate::attachment::batch::unsupported(&e) => {
                    tracing::debug!("batched reads of {name}: {e}; reading entry by entry");
                    self.batches = false;
                }
                Err(e) => {
                    return Err(err(name)(aya::maps::MapError::SyscallError(
                        aya::sys::SyscallError {
                            call: "bpf_map_lookup_and_delete_batch",
                            io_error: e,
                        },
                    )));
                }
            }
        }
        let table = &mut self.tables[current as usize];
        let keys: Vec<DeniedKey> = table.keys().filter_map(Result::ok).collect();
        let mut aggregates = Vec::with_capacity(keys.len());
        for key in keys {
            let values = match table.get(&key, 0) {
                Ok(v) => v,
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(err(name)(e)),
            };
            let a = merge(key, values.iter());
            match table.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(err(name)(e)),
            }
            if a.packets > 0 {
                aggregates.push(a);
            }
        }
        self.finish(current, aggregates)
    }

    /// After the table `current` was emptied: lets the kernel insert into
    /// it again and counts what was lost.
    fn finish(&mut self, current: u32, aggregates: Vec<Denied>) -> Result<Drained, MapsError> {
        // Emptied: the kernel may insert into it again once it is current.
        self.full.set(current, 0, 0).map_err(err(MAP_DENY_FULL))?;
        let total = self.lost_total()?;
        let lost = total.saturating_sub(self.lost_seen);
        self.lost_seen = total;
        Ok(Drained { aggregates, lost })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(packets: u64, first_ns: u64, last_ns: u64) -> DeniedStat {
        DeniedStat {
            packets,
            bytes: packets * 60,
            first_ns,
            last_ns,
            tcp_flags: 0,
            _pad: [0; 7],
        }
    }

    #[test]
    fn first_seen_ignores_slots_without_a_first_time() {
        let key = DeniedKey::default();
        // CPU 0 made the element at 5000; CPU 1 counted into its empty slot
        // (first 0); CPU 2 never saw the aggregate.
        let values = [stat(2, 5000, 6000), stat(3, 0, 7000), stat(0, 0, 0)];
        let a = merge(key, values.iter());
        assert_eq!(a.packets, 5);
        assert_eq!(a.bytes, 300);
        assert_eq!(a.first_ns, 5000, "not 0 (boot time)");
        assert_eq!(a.last_ns, 7000);
        // Only slots without a first time: the earliest last time.
        let a = merge(key, [stat(1, 0, 9000), stat(1, 0, 8000)].iter());
        assert_eq!(a.first_ns, 8000);
        let a = merge(key, [stat(1, 4000, 4000), stat(1, 3000, 3500)].iter());
        assert_eq!((a.first_ns, a.last_ns), (3000, 4000));
    }
}
