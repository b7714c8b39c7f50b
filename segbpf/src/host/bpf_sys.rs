//! The raw `bpf(2)` system call, for what aya does not offer (link info
//! by pin or id, program queries on a cgroup, batched map reads, a lookup
//! in a program array through its pin, links made by hand): the one place
//! segbpf makes the call, with the attribute blocks (members of `union
//! bpf_attr`) and the head of `struct bpf_link_info` its callers share.
//!
//! A program array is never opened by id here or by a caller: opening a
//! map by id gives it a user reference again and can leave a retired
//! tail-call table in the kernel for good (docs/architecture.md,
//! `prog_array_map_clear`); such maps are reached through their pins.

use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    os::unix::ffi::OsStrExt as _,
    path::Path,
};

/// `BPF_MAP_LOOKUP_ELEM`.
pub const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
/// `BPF_OBJ_PIN`.
pub const BPF_OBJ_PIN: libc::c_long = 6;
/// `BPF_OBJ_GET`.
pub const BPF_OBJ_GET: libc::c_long = 7;
/// `BPF_PROG_GET_FD_BY_ID`.
pub const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
/// `BPF_OBJ_GET_INFO_BY_FD`.
pub const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `BPF_PROG_QUERY`.
pub const BPF_PROG_QUERY: libc::c_long = 16;
/// `BPF_MAP_LOOKUP_BATCH`.
pub const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// `BPF_MAP_LOOKUP_AND_DELETE_BATCH`.
pub const BPF_MAP_LOOKUP_AND_DELETE_BATCH: libc::c_long = 25;
/// `BPF_LINK_CREATE`.
pub const BPF_LINK_CREATE: libc::c_long = 28;
/// `BPF_LINK_GET_FD_BY_ID`.
pub const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
/// `BPF_LINK_GET_NEXT_ID`.
pub const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
/// `BPF_LINK_TYPE_CGROUP`.
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// `bpf(cmd, attr, sizeof attr)`: the call's result (a new descriptor for
/// the commands that make one), or the error it set.
///
/// # Safety
///
/// `attr` must be a `#[repr(C)]` prefix of `union bpf_attr` as `cmd`
/// reads it, and every pointer in it must name memory of the size the
/// command reads or writes there, alive for the call.
pub unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: the caller's contract above: `attr` is a bpf_attr prefix of
    // its size, alive for the call, and what it points to is too.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A descriptor the kernel just returned from `bpf`.
fn owned(fd: libc::c_long) -> std::io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: a new file descriptor the kernel just gave this process,
    // owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `bpf_attr` for `BPF_OBJ_GET` / `BPF_OBJ_PIN`.
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `bpf_attr` for the `*_GET_NEXT_ID` / `*_GET_FD_BY_ID` commands.
#[repr(C)]
#[derive(Default)]
struct IdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

/// Opens a pinned object.
pub fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let name = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: name.as_ptr() as u64,
        ..ObjAttr::default()
    };
    // SAFETY: `attr` is the bpf_attr of BPF_OBJ_GET; `pathname` points to
    // `name`, a NUL-terminated string alive for the call.
    owned(unsafe { bpf(BPF_OBJ_GET, &mut attr) }?)
}

/// Pins the object `fd` at `path`.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
    let name = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: name.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..ObjAttr::default()
    };
    // SAFETY: `attr` is the bpf_attr of BPF_OBJ_PIN; `pathname` points to
    // `name`, a NUL-terminated string alive for the call.
    unsafe { bpf(BPF_OBJ_PIN, &mut attr) }.map(drop)
}

/// The head of `struct bpf_link_info`: type, id, program, then the first
/// 24 bytes of the union of the link types (XDP and TCX: the interface,
/// 0 once detached, and TCX's attach type; cgroup: the cgroup id, 0 once
/// the cgroup is gone, and the attach type).
#[repr(C)]
#[derive(Default)]
pub struct LinkInfo {
    /// `BPF_LINK_TYPE_*`.
    pub link_type: u32,
    /// The link's id.
    pub id: u32,
    /// The id of the program it runs.
    pub prog_id: u32,
    _pad: u32,
    union: [u8; 24],
}

impl LinkInfo {
    /// An XDP or TCX link's interface (0: detached).
    pub fn ifindex(&self) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.union[..4]);
        u32::from_ne_bytes(b)
    }

    /// A cgroup link's cgroup id (0: the cgroup is gone).
    pub fn cgroup_id(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.union[..8]);
        u64::from_ne_bytes(b)
    }
}

/// What the kernel says of the link `fd`.
pub fn link_info(fd: BorrowedFd<'_>) -> std::io::Result<LinkInfo> {
    let mut info = LinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    // SAFETY: `attr` is the bpf_attr of BPF_OBJ_GET_INFO_BY_FD; `info`
    // points to a `LinkInfo` of `info_len` bytes, alive for the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(info)
}

/// The id of the next link after `id` (`None`: no more).
pub fn link_next_id(id: u32) -> std::io::Result<Option<u32>> {
    let mut attr = IdAttr {
        id,
        ..IdAttr::default()
    };
    // SAFETY: `attr` is the bpf_attr of BPF_LINK_GET_NEXT_ID (no pointers).
    match unsafe { bpf(BPF_LINK_GET_NEXT_ID, &mut attr) } {
        Ok(_) => Ok(Some(attr.next_id)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens the link `id` (`None`: gone meanwhile).
pub fn link_by_id(id: u32) -> std::io::Result<Option<OwnedFd>> {
    let mut attr = IdAttr {
        id,
        ..IdAttr::default()
    };
    // SAFETY: `attr` is the bpf_attr of BPF_LINK_GET_FD_BY_ID (no pointers).
    match unsafe { bpf(BPF_LINK_GET_FD_BY_ID, &mut attr) } {
        Ok(fd) => owned(fd).map(Some),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens the program `id` (`None`: gone meanwhile).
pub fn prog_by_id(id: u32) -> std::io::Result<Option<OwnedFd>> {
    let mut attr = IdAttr {
        id,
        ..IdAttr::default()
    };
    // SAFETY: `attr` is the bpf_attr of BPF_PROG_GET_FD_BY_ID (no pointers).
    match unsafe { bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) } {
        Ok(fd) => owned(fd).map(Some),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// [`bpf`] for a command that returns a new descriptor
/// (`BPF_LINK_CREATE`): that descriptor.
///
/// # Safety
///
/// As for [`bpf`]; and `cmd` must be a command whose result is a new file
/// descriptor.
pub unsafe fn bpf_fd<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<OwnedFd> {
    // SAFETY: the caller's contract, passed on.
    owned(unsafe { bpf(cmd, attr) }?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_info_is_the_kernel_head() {
        // type, id, prog_id, pad, then the union at offset 16.
        assert_eq!(std::mem::size_of::<LinkInfo>(), 40);
        let mut i = LinkInfo::default();
        i.union[..8].copy_from_slice(&0x1234_5678_9abc_u64.to_ne_bytes());
        assert_eq!(i.cgroup_id(), 0x1234_5678_9abc);
        i.union[..4].copy_from_slice(&7u32.to_ne_bytes());
        assert_eq!(i.ifindex(), 7);
    }
}
