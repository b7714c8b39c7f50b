//! Denied aggregates: reading and emptying the kernel's tables of dropped
//! (and audit-mode would-be dropped) traffic, counted per (direction,
//! source, destination, protocol, destination port, reason).
//!
//! The kernel counts into one of two per-CPU tables of buckets (see
//! `segbpf_common::denied`). [`Drainer::drain`] points the kernel at the
//! other table, waits for programs already running to finish, then reads
//! and resets the one it left: a packet is either in this drain or in the
//! next, never lost between a read and a reset.
//!
//! A bucket belongs to the first key that reached it; packets of other
//! keys that hashed to it were not attributed: the kernel counts them in
//! `SEG_DENY_LOST` (reported as [`Drained::lost`]) and marks the bucket
//! shared. Every aggregate read from an index some CPU marked shared is
//! reported with [`Denied::exact`] false: its key may have had packets
//! among the unattributed ones, so its counts are a lower bound. The
//! other aggregates are exact, unless the drain saw a flood: under a
//! flood the kernel keeps the aggregates on a sample and counts the other
//! drops as unsampled (`SEG_DENY_RATE`, reported as
//! [`Drained::unsampled`]); every aggregate of such a drain is reported
//! with [`Denied::exact`] false, since any key's packets may be among them.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use aya::maps::{Array, Map, MapData, PerCpuArray, PerCpuValues};
use segbpf_common::{
    DENIED_BUCKETS, DeniedBucket, DeniedKey, DeniedRate, MAP_DENIED0, MAP_DENIED1, MAP_DENY_LOST,
    MAP_DENY_SEL,
};

use crate::{
    attachment::maps::{self, MapsError},
    attachment::pins::Attachment,
};

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
    /// False when the aggregate's bucket was shared with another key on
    /// some CPU, or the drain saw a flood kept on a sample: some of its
    /// packets may be among the unattributed ones ([`Drained::lost`],
    /// [`Drained::unsampled`]), so the counts are a lower bound.
    pub exact: bool,
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

/// The aggregates of one table from its buckets: `buckets` gives, per
/// index, the bucket of each CPU. Buckets of one key (on other CPUs, or at
/// another index after the instance was replaced) add up; an aggregate is
/// exact unless some CPU marked one of its indices shared.
pub fn merge<'a, I>(buckets: I) -> Vec<Denied>
where
    I: IntoIterator<Item = &'a [DeniedBucket]>,
{
    let mut by_key: HashMap<DeniedKey, Denied> = HashMap::new();
    for cpus in buckets {
        let shared = cpus.iter().any(|b| b.shared != 0);
        for b in cpus.iter().filter(|b| b.packets > 0) {
            let a = by_key.entry(b.key).or_insert(Denied {
                key: b.key,
                packets: 0,
                bytes: 0,
                first_ns: u64::MAX,
                last_ns: 0,
                tcp_flags: 0,
                exact: true,
            });
            a.packets += b.packets;
            a.bytes += b.bytes;
            a.first_ns = a.first_ns.min(b.first_ns);
            a.last_ns = a.last_ns.max(b.last_ns);
            a.tcp_flags |= b.tcp_flags;
            a.exact &= !shared;
        }
    }
    by_key.into_values().collect()
}

/// What one drain found.
#[derive(Clone, Debug, Default)]
pub struct Drained {
    /// The aggregates, in no particular order.
    pub aggregates: Vec<Denied>,
    /// Denied packets the kernel did not attribute to an aggregate since
    /// the previous drain (their bucket belonged to another key). The
    /// exact totals per direction and reason are the attachment's
    /// counters (`segbpf status`).
    pub lost: u64,
    /// Denied packets the kernel did not give to their aggregate since the
    /// previous drain because it kept a flood on a sample
    /// (`segbpf_common::denied_attributed`).
    pub unsampled: u64,
}

/// Reads and empties an attachment's denied tables. Hold the attachment's
/// flow-log lock (`LockKind::FlowLog`) while draining: two drainers would
/// each see part of the traffic.
pub struct Drainer {
    sel: Array<MapData, u32>,
    tables: [PerCpuArray<MapData, DeniedBucket>; 2],
    /// The tables' descriptors, for batched reads ([`crate::attachment::batch`]).
    fds: [std::os::fd::OwnedFd; 2],
    /// Possible CPUs (values per index of the per-CPU tables).
    cpus: usize,
    /// Whether the kernel does batched reads of the tables.
    batches: bool,
    lost: PerCpuArray<MapData, u64>,
    lost_seen: u64,
    /// The flood state (None for an attachment made by a segbpf without it).
    rate: Option<PerCpuArray<MapData, DeniedRate>>,
    unsampled_seen: u64,
    /// Drops were left unsampled between the previous drain's flip and
    /// its last read: some may be of the table this drain reads.
    unsampled_around_flip: bool,
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

fn syscall(map: &'static str, call: &'static str, io_error: std::io::Error) -> MapsError {
    err(map)(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
        call,
        io_error,
    }))
}

fn open(att: &Attachment, name: &'static str) -> Result<MapData, MapsError> {
    MapData::from_pin(att.map(name)).map_err(err(name))
}

impl Drainer {
    /// Opens the pinned tables of `att`. Packets lost before this call are
    /// not reported again.
    pub fn open(att: &Attachment) -> Result<Self, MapsError> {
        let table = |name| -> Result<PerCpuArray<MapData, DeniedBucket>, MapsError> {
            PerCpuArray::try_from(Map::PerCpuArray(open(att, name)?)).map_err(err(name))
        };
        let fd = |name| -> Result<std::os::fd::OwnedFd, MapsError> {
            use std::os::fd::AsFd as _;
            open(att, name)?
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| syscall(name, "dup", e))
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| syscall(MAP_DENIED0, "nr_cpus", e))?;
        let mut d = Drainer {
            fds: [fd(MAP_DENIED0)?, fd(MAP_DENIED1)?],
            cpus,
            batches: true,
            sel: Array::try_from(Map::Array(open(att, MAP_DENY_SEL)?))
                .map_err(err(MAP_DENY_SEL))?,
            tables: [table(MAP_DENIED0)?, table(MAP_DENIED1)?],
            lost: PerCpuArray::try_from(Map::PerCpuArray(open(att, MAP_DENY_LOST)?))
                .map_err(err(MAP_DENY_LOST))?,
            lost_seen: 0,
            rate: maps::pinned_deny_rate(att).ok().flatten(),
            unsampled_seen: 0,
            unsampled_around_flip: false,
        };
        d.lost_seen = d.lost_total()?;
        d.unsampled_seen = d.unsampled_total()?;
        Ok(d)
    }

    fn unsampled_total(&self) -> Result<u64, MapsError> {
        self.rate.as_ref().map_or(Ok(0), maps::deny_unsampled)
    }

    fn lost_total(&self) -> Result<u64, MapsError> {
        let v = self.lost.get(&0, 0).map_err(err(MAP_DENY_LOST))?;
        Ok(v.iter().sum())
    }

    /// Every bucket of the table `current`: (index, one bucket per CPU).
    fn read(
        &mut self,
        current: u32,
        name: &'static str,
    ) -> Result<Vec<(u32, Vec<DeniedBucket>)>, MapsError> {
        if self.batches {
            use std::os::fd::AsFd as _;
            match crate::attachment::batch::read_all::<u32, DeniedBucket>(
                self.fds[current as usize].as_fd(),
                self.cpus,
                false,
            ) {
                Ok((entries, cost)) => {
                    tracing::debug!(
                        "read {name}: {} buckets in {} bpf calls",
                        cost.entries,
                        cost.calls
                    );
                    return Ok(entries);
                }
                Err(e) if crate::attachment::batch::unsupported(&e) => {
                    tracing::debug!("batched reads of {name}: {e}; reading bucket by bucket");
                    self.batches = false;
                }
                Err(e) => return Err(syscall(name, "bpf_map_lookup_batch", e)),
            }
        }
        let table = &self.tables[current as usize];
        (0..DENIED_BUCKETS.min(table.len()))
            .map(|i| {
                let v = table.get(&i, 0).map_err(err(name))?;
                Ok((i, v.iter().copied().collect()))
            })
            .collect()
    }

    /// Everything denied since the previous drain.
    pub fn drain(&mut self) -> Result<Drained, MapsError> {
        let current = self.sel.get(&0, 0).map_err(err(MAP_DENY_SEL))? & 1;
        // The unsampled count is not swapped with the tables: read at the
        // flip too, so drops left unsampled around it (between this read
        // and the one below) make the next drain's records inexact as well.
        let at_flip = self.unsampled_total()?;
        self.sel.set(0, current ^ 1, 0).map_err(err(MAP_DENY_SEL))?;
        std::thread::sleep(GRACE);
        let name = if current == 0 {
            MAP_DENIED0
        } else {
            MAP_DENIED1
        };
        let buckets = self.read(current, name)?;
        let mut aggregates = merge(buckets.iter().map(|(_, v)| v.as_slice()));
        // Reset what the kernel wrote; the table is not current, so no
        // program writes it meanwhile.
        let table = &mut self.tables[current as usize];
        for (i, v) in &buckets {
            if v.iter().any(|b| b.packets > 0 || b.shared != 0) {
                let zeros = PerCpuValues::try_from(vec![DeniedBucket::default(); v.len()])
                    .map_err(|e| syscall(name, "bpf_map_update_elem", e))?;
                table.set(*i, zeros, 0).map_err(err(name))?;
            }
        }
        let total = self.lost_total()?;
        let lost = total.saturating_sub(self.lost_seen);
        self.lost_seen = total;
        let total = self.unsampled_total()?;
        let (unsampled, inexact, around_flip) = unsampled_marking(
            self.unsampled_seen,
            at_flip,
            total,
            self.unsampled_around_flip,
        );
        self.unsampled_seen = total;
        self.unsampled_around_flip = around_flip;
        if inexact {
            for a in &mut aggregates {
                a.exact = false;
            }
        }
        Ok(Drained {
            aggregates,
            lost,
            unsampled,
        })
    }
}

/// The unsampled drops of a drain and whether its records are inexact,
/// from the count at the previous drain's last read (`seen`), at this
/// drain's flip (`at_flip`) and at its last read (`total`), and whether
/// drops went unsampled around the previous flip (`carried`); returns
/// also whether drops went unsampled around this flip (the next drain's
/// `carried`). The count is not swapped with the tables, so a drop left
/// unsampled between a flip and the read after it may belong to either
/// table: both drains are marked.
fn unsampled_marking(seen: u64, at_flip: u64, total: u64, carried: bool) -> (u64, bool, bool) {
    let unsampled = total.saturating_sub(seen);
    (unsampled, unsampled > 0 || carried, total > at_flip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> DeniedKey {
        DeniedKey {
            family: 4,
            dport: port,
            ..DeniedKey::default()
        }
    }

    fn b(port: u16, packets: u64, first_ns: u64, last_ns: u64, shared: u8) -> DeniedBucket {
        DeniedBucket {
            key: key(port),
            packets,
            bytes: packets * 60,
            first_ns,
            last_ns,
            shared,
            ..DeniedBucket::default()
        }
    }

    fn find(all: &[Denied], port: u16) -> &Denied {
        all.iter().find(|a| a.key.dport == port).unwrap()
    }

    #[test]
    fn one_key_adds_up_over_cpus_and_empty_buckets_add_nothing() {
        let idx0 = [
            b(22, 2, 5000, 6000, 0),
            b(22, 3, 4000, 7000, 0),
            DeniedBucket::default(),
        ];
        let all = merge([&idx0[..]]);
        assert_eq!(all.len(), 1);
        let a = &all[0];
        assert_eq!((a.packets, a.bytes), (5, 300));
        assert_eq!((a.first_ns, a.last_ns), (4000, 7000));
        assert!(a.exact);
    }

    #[test]
    fn drops_unsampled_around_a_flip_make_both_drains_inexact() {
        // A burst straddles drain 1's flip: its unsampled drops are counted
        // after the flip (100 -> 160), its sampled records land in the next
        // table, which drain 2 reads with no new unsampled drops.
        let (n1, inexact1, carry) = unsampled_marking(100, 100, 160, false);
        assert_eq!((n1, inexact1, carry), (60, true, true));
        let (n2, inexact2, carry2) = unsampled_marking(160, 160, 160, carry);
        assert_eq!((n2, inexact2), (0, true), "the straddling burst's records");
        let (n3, inexact3, _) = unsampled_marking(160, 160, 160, carry2);
        assert_eq!(
            (n3, inexact3),
            (0, false),
            "a quiet drain after is exact again"
        );
        // Unsampled drops only before the flip: this drain alone.
        let (n, inexact, carry) = unsampled_marking(0, 40, 40, false);
        assert_eq!((n, inexact, carry), (40, true, false));
    }

    #[test]
    fn a_shared_index_makes_every_owner_there_inexact() {
        // Index 0: CPU 0 owned by port 22, CPU 1 by port 80, which also
        // turned a packet of another key away. Index 1: port 443 alone.
        let idx0 = [b(22, 1, 10, 10, 0), b(80, 4, 20, 30, 1)];
        let idx1 = [b(443, 2, 10, 20, 0), DeniedBucket::default()];
        let all = merge([&idx0[..], &idx1[..]]);
        assert_eq!(all.len(), 3);
        assert!(
            !find(&all, 22).exact,
            "its packets on CPU 1 may be the lost ones"
        );
        assert!(!find(&all, 80).exact);
        assert!(find(&all, 443).exact);
        // The same key at two indices: one aggregate, inexact if either
        // index was shared.
        let all = merge([&idx0[..], &[b(22, 5, 1, 50, 0)][..]]);
        let a = find(&all, 22);
        assert_eq!((a.packets, a.first_ns, a.last_ns), (6, 1, 50));
        assert!(!a.exact);
    }
}
