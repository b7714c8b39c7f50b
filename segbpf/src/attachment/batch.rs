//! Batched reads of hash maps: `BPF_MAP_LOOKUP_BATCH` and
//! `BPF_MAP_LOOKUP_AND_DELETE_BATCH` (Linux 5.6), which aya 0.14 does not
//! wrap, called with the `bpf` syscall on the map's descriptor. One call
//! returns up to [`BATCH`] entries, where iterating costs two syscalls per
//! entry (next key, lookup) and a drain three (with the delete). The
//! connection tables (`flows`) and the denied aggregates (flow logs) are
//! read with them; where the kernel refuses them (`EINVAL`, `ENOTSUPP`) the
//! caller falls back to iterating.

use std::os::fd::{AsRawFd as _, BorrowedFd};

use bytemuck::Pod;

/// Entries asked for per call.
pub const BATCH: u32 = 4096;

use crate::host::bpf_sys::{BPF_MAP_LOOKUP_AND_DELETE_BATCH, BPF_MAP_LOOKUP_BATCH, bpf};

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// What a batched read cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    /// `bpf` syscalls made.
    pub calls: u64,
    /// Entries read.
    pub entries: u64,
}

/// Whether an error means the kernel does not do batches for this map (the
/// caller then iterates).
pub fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOTSUP | libc::ENOSYS)
    ) || e.raw_os_error() == Some(524) // ENOTSUPP (kernel-internal)
}

/// Entries read by [`read_all`]: each key with its value (one per CPU for
/// a per-CPU map).
pub type Entries<K, V> = Vec<(K, Vec<V>)>;

/// Reads every entry of the hash map `fd` (keys `K`, values `V`; a per-CPU
/// map gives `cpus` values per key, else pass 1), deleting what it reads
/// when `delete`. Entries come in the map's bucket order.
pub fn read_all<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    cpus: usize,
    delete: bool,
) -> std::io::Result<(Entries<K, V>, Cost)> {
    let key_size = size_of::<K>();
    // Per-CPU values are laid out 8-byte aligned, one per possible CPU.
    let stride = if cpus > 1 {
        size_of::<V>().div_ceil(8) * 8
    } else {
        size_of::<V>()
    };
    let per_key = stride * cpus.max(1);
    let mut count = BATCH;
    let mut out = Vec::new();
    let mut cost = Cost::default();
    // The batch token of a hash map is a bucket index (u32); room for 8.
    let mut token_in = [0u8; 8];
    let mut token_out = [0u8; 8];
    let mut first = true;
    loop {
        let mut keys = vec![0u8; key_size * count as usize];
        let mut values = vec![0u8; per_key * count as usize];
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let cmd = if delete {
            BPF_MAP_LOOKUP_AND_DELETE_BATCH
        } else {
            BPF_MAP_LOOKUP_BATCH
        };
        // SAFETY: `attr` is a valid `bpf_attr.batch` whose pointers name
        // buffers of `count` keys and values of this map's sizes and two
        // 8-byte tokens, all alive until the call returns; the size passed
        // is that of `attr`.
        let rc = unsafe { bpf(cmd, &mut attr) };
        cost.calls += 1;
        let err = rc.err();
        let got = attr.count as usize;
        match &err {
            // A bucket holds more than `count` entries: ask for more.
            Some(e) if e.raw_os_error() == Some(libc::ENOSPC) && got == 0 => {
                count = count.saturating_mul(2);
                continue;
            }
            Some(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                return Err(std::io::Error::from_raw_os_error(
                    e.raw_os_error().unwrap_or(0),
                ));
            }
            _ => {}
        }
        for i in 0..got {
            let k: K = bytemuck::pod_read_unaligned(&keys[i * key_size..(i + 1) * key_size]);
            let base = i * per_key;
            let vs = (0..cpus.max(1))
                .map(|c| {
                    let at = base + c * stride;
                    bytemuck::pod_read_unaligned(&values[at..at + size_of::<V>()])
                })
                .collect();
            out.push((k, vs));
        }
        cost.entries += got as u64;
        if err.is_some() {
            // ENOENT: the whole map was read.
            return Ok((out, cost));
        }
        first = false;
        token_in = token_out;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attr_is_the_kernels_layout() {
        // union bpf_attr's batch member: 4 u64, 2 u32, 2 u64.
        assert_eq!(size_of::<BatchAttr>(), 56);
        assert_eq!(std::mem::offset_of!(BatchAttr, count), 32);
        assert_eq!(std::mem::offset_of!(BatchAttr, map_fd), 36);
        assert_eq!(std::mem::offset_of!(BatchAttr, elem_flags), 40);
    }

    #[test]
    fn unsupported_covers_old_kernels_only() {
        assert!(unsupported(&std::io::Error::from_raw_os_error(
            libc::EINVAL
        )));
        assert!(unsupported(&std::io::Error::from_raw_os_error(524)));
        assert!(!unsupported(&std::io::Error::from_raw_os_error(
            libc::EPERM
        )));
    }
}
