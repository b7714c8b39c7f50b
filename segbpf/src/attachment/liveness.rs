//! Whether an attachment's programs really run on its interface, read from
//! the kernel: a pin file only says a link object exists. Another tool can
//! detach a link (`bpftool link detach`, `BPF_LINK_DETACH`) and leave its
//! pin behind; the kernel then reports the link's interface as 0. So each
//! pinned link is opened and asked (`BPF_OBJ_GET_INFO_BY_FD`) which
//! interface it is attached to and which program it runs, and that must be
//! the attachment's interface and segbpf's program.
//!
//! [`relink`] puts a detached link back: a new link of the pinned program
//! on the interface (`BPF_LINK_CREATE`), pinned under a temporary name and
//! renamed over the dead link's pin, so the pin never names nothing. The
//! maps, and with them the policy in force, connections and counters,
//! stay as they are.
//!
//! A clsact egress filter (kernels before 6.6, no TCX) is not a link and
//! is not checked here.

use std::{os::fd::AsFd as _, os::fd::AsRawFd as _, path::Path};

use serde::Serialize;

use crate::{
    attachment::pins::Attachment,
    attachment::state::State,
    host::bpf_sys::{BPF_LINK_CREATE, link_info, obj_get, obj_pin},
};

const BPF_XDP: u32 = 37;
const BPF_TCX_EGRESS: u32 = 47;
const XDP_FLAGS_SKB_MODE: u32 = 2;
const XDP_FLAGS_DRV_MODE: u32 = 4;

/// `bpf_attr` for `BPF_LINK_CREATE` (XDP and TCX: no extra fields set).
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 4],
}

/// The interface a pinned XDP or TCX link is attached to, as the kernel
/// says (0: detached, for instance with its interface destroyed).
pub fn pinned_link_ifindex(pin: &Path) -> std::io::Result<u32> {
    Ok(link_info(obj_get(pin)?.as_fd())?.ifindex())
}

/// One hook of an attachment as the kernel has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Hook {
    /// `xdp` (ingress) or `tc` (egress).
    pub hook: &'static str,
    /// segbpf's program runs there: the pinned link is attached to the
    /// attachment's interface and runs segbpf's program.
    pub live: bool,
    /// Kernel id of the pinned link (0: none could be read).
    pub link_id: u32,
    /// What is wrong, when not live.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl Hook {
    fn dead(hook: &'static str, link_id: u32, problem: String) -> Hook {
        Hook {
            hook,
            live: false,
            link_id,
            problem: Some(problem),
        }
    }
}

/// Asks the kernel about one pinned link: attached to `ifindex` (when
/// known, else to any interface) and running `prog_id` (when known).
fn check_link(
    hook: &'static str,
    pin: &Path,
    iface: &str,
    ifindex: Option<u32>,
    prog_id: Option<u32>,
) -> Hook {
    let fd = match obj_get(pin) {
        Ok(fd) => fd,
        Err(e) => return Hook::dead(hook, 0, format!("no link at {}: {e}", pin.display())),
    };
    let info = match link_info(fd.as_fd()) {
        Ok(i) => i,
        Err(e) => {
            return Hook::dead(
                hook,
                0,
                format!("asking the kernel about {}: {e}", pin.display()),
            );
        }
    };
    let problem = if info.ifindex() == 0 {
        Some(format!(
            "link {} is detached from {iface} (by another tool: the kernel reports no interface)",
            info.id
        ))
    } else if ifindex.is_some_and(|i| i != info.ifindex()) {
        Some(format!(
            "link {} is attached to interface index {}, not {iface}'s",
            info.id,
            info.ifindex()
        ))
    } else if prog_id.is_some_and(|p| p != 0 && p != info.prog_id) {
        Some(format!(
            "link {} runs program {}, not segbpf's",
            info.id, info.prog_id
        ))
    } else {
        None
    };
    Hook {
        hook,
        live: problem.is_none(),
        link_id: info.id,
        problem,
    }
}

/// The attachment's hooks as the kernel has them: XDP ingress, and TC
/// egress when it is a TCX link. `state` (if readable) gives the interface
/// index and programs to expect.
pub fn check(att: &Attachment, state: Option<&State>) -> Vec<Hook> {
    let ifindex = state.map(|s| s.ifindex);
    let mut hooks = vec![check_link(
        "xdp",
        &att.link_xdp(),
        &att.iface,
        ifindex,
        state.map(|s| s.prog_id),
    )];
    if state.is_none_or(|s| s.tc_mode != "clsact") {
        hooks.push(check_link(
            "tc",
            &att.link_tc(),
            &att.iface,
            ifindex,
            state.map(|s| s.tc_prog_id),
        ));
    }
    hooks
}

/// Whether every hook is live.
pub fn all_live(hooks: &[Hook]) -> bool {
    hooks.iter().all(|h| h.live)
}

/// Attaches the pinned program of `hook` to the attachment's interface
/// again and pins the new link over the old pin. Returns the new link's id.
fn relink_one(att: &Attachment, state: &State, hook: &str) -> std::io::Result<u32> {
    let (prog_pin, link_pin, attach_type, flags) = match hook {
        "xdp" => (
            att.prog_xdp(),
            att.link_xdp(),
            BPF_XDP,
            if state.mode == "skb" {
                XDP_FLAGS_SKB_MODE
            } else {
                XDP_FLAGS_DRV_MODE
            },
        ),
        _ => (att.prog_tc(), att.link_tc(), BPF_TCX_EGRESS, 0),
    };
    let ifindex = crate::host::netif::ifindex(&att.iface)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::NotFound, e.to_string()))?;
    if ifindex != state.ifindex {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "{} has index {ifindex} now, not {} (re-created): attach again",
                att.iface, state.ifindex
            ),
        ));
    }
    let step = |what: String| {
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"))
    };
    let prog = obj_get(&prog_pin).map_err(step(format!("opening {}", prog_pin.display())))?;
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type,
        flags,
        ..LinkCreateAttr::default()
    };
    // SAFETY: `attr` is the bpf_attr of BPF_LINK_CREATE (no pointers), a
    // command that returns a new descriptor.
    let link = unsafe { crate::host::bpf_sys::bpf_fd(BPF_LINK_CREATE, &mut attr) }
        .map_err(step(format!("creating a {hook} link")))?;
    // bpffs refuses dots in names.
    let mut tmp = link_pin.clone().into_os_string();
    tmp.push("_new");
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    obj_pin(link.as_fd(), &tmp).map_err(step(format!("pinning it at {}", tmp.display())))?;
    if let Err(e) = std::fs::rename(&tmp, &link_pin) {
        let _ = std::fs::remove_file(&tmp);
        return Err(step(format!("renaming it to {}", link_pin.display()))(e));
    }
    Ok(link_info(link.as_fd()).map_or(0, |i| i.id))
}

/// Puts back every hook of `att` that is not live (egress first, as at
/// attach): returns one line per hook re-attached. The caller holds the
/// attachment's update lock.
pub fn relink(att: &Attachment, state: &State) -> Result<Vec<String>, std::io::Error> {
    let mut hooks = check(att, Some(state));
    hooks.sort_by_key(|h| h.hook != "tc");
    let mut done = Vec::new();
    for h in hooks.iter().filter(|h| !h.live) {
        let id = relink_one(att, state, h.hook).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "re-attaching {} to {}: {e} ({})",
                    h.hook,
                    att.describe(),
                    h.problem.as_deref().unwrap_or("not live")
                ),
            )
        })?;
        done.push(format!(
            "{} re-attached to {} as link {id} ({})",
            h.hook,
            att.iface,
            h.problem.as_deref().unwrap_or("not live")
        ));
    }
    Ok(done)
}
