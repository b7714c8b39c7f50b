//! The state file of an attachment: what was applied (policy file, roles,
//! generation, mode) and the compiled rule table that `status` and `trace`
//! use to name rules. Written atomically (temp file + rename).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::policy::compile::RuleInfo;

/// Errors reading or writing a state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file could not be read.
    #[error("reading state file {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a state file.
    #[error("parsing state file {path}: {source}")]
    Parse {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// The file could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// What `attach` applied to an interface.
#[allow(
    clippy::struct_excessive_bools,
    reason = "a record of independent on/off settings, stored as JSON"
)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Interface name.
    pub iface: String,
    /// The network namespace's label (`ip netns` name, `host`), if known.
    pub netns: Option<String>,
    /// The network namespace's inode (the key of this file's directory).
    #[serde(default)]
    pub netns_inode: u64,
    /// The network namespace's cookie: files whose cookie is not the
    /// namespace's own were left by a namespace that is gone.
    #[serde(default)]
    pub netns_cookie: u64,
    /// Interface index at attach time.
    pub ifindex: u32,
    /// Absolute path of the policy file.
    pub policy: String,
    /// The host's roles.
    pub roles: Vec<String>,
    /// The `--role` arguments given to attach (empty: roles came from the
    /// interface's addresses at attach; reloads keep them unless
    /// `reload --redetect-roles`).
    #[serde(default)]
    pub role_args: Vec<String>,
    /// The roles before the last change of roles (empty: never changed).
    #[serde(default)]
    pub previous_roles: Vec<String>,
    /// Generation that changed the roles last (0: never).
    #[serde(default)]
    pub roles_changed_at: u64,
    /// Size of the per-rule counter map.
    #[serde(default)]
    pub rule_slots: u32,
    /// Capacity of each peer trie.
    #[serde(default)]
    pub peer_entries: u32,
    /// Capacity of the port trie.
    #[serde(default)]
    pub port_entries: u32,
    /// Live set edits (`segbpf set add/del`): set name → members in force,
    /// replacing the file's. Non-empty means the live state has drifted
    /// from the policy file; `segbpf reload` resolves it by the file.
    #[serde(default)]
    pub set_overrides: std::collections::BTreeMap<String, Vec<String>>,
    /// XDP mode in use: `native` or `skb`.
    pub mode: String,
    /// The device's `ARPHRD_*` type at attach (1 = Ethernet).
    #[serde(default = "ethernet")]
    pub link_type: u16,
    /// The device has no link-layer header: packets start at the IP header.
    #[serde(default)]
    pub raw_ip: bool,
    /// `attach --insecure-policy`: the policy file's ownership and
    /// permissions are not checked, at attach or at later reloads.
    #[serde(default)]
    pub insecure_policy: bool,
    /// Flow accounting in the connection table (`attach --flow-log`).
    #[serde(default = "yes")]
    pub flow_acct: bool,
    /// TC egress attachment: `tcx` (pinned link) or `clsact` (netlink filter).
    #[serde(default)]
    pub tc_mode: String,
    /// Kernel id of the TC egress program.
    #[serde(default)]
    pub tc_prog_id: u32,
    /// Connection table capacity.
    #[serde(default)]
    pub ct_size: u32,
    /// Audit mode (nothing enforced, would-be drops reported).
    #[serde(default)]
    pub audit: bool,
    /// Drop events per second.
    #[serde(default)]
    pub log_rate: u32,
    /// Event burst.
    #[serde(default)]
    pub log_burst: u32,
    /// Policy generation.
    pub generation: u64,
    /// Kernel id of the XDP program.
    pub prog_id: u32,
    /// Unix time of the attach.
    pub attached_at: u64,
    /// Entries written: IPv4 prefixes, IPv6 prefixes, port prefixes.
    pub entries: [usize; 3],
    /// Number of address classes.
    pub classes: u32,
    /// Rules that apply to this host.
    pub rules: Vec<RuleInfo>,
}

fn yes() -> bool {
    true
}

fn ethernet() -> u16 {
    1
}

impl State {
    /// `segbpf_common::LINK_RAW_IP` or `LINK_ETHERNET`: how the attached
    /// program reads packets.
    pub fn link(&self) -> u8 {
        if self.raw_ip {
            segbpf_common::LINK_RAW_IP
        } else {
            segbpf_common::LINK_ETHERNET
        }
    }

    /// Reads a state file.
    pub fn read(path: &Path) -> Result<State, StateError> {
        let text = std::fs::read_to_string(path).map_err(|source| StateError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| StateError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Writes the state file atomically (mode 0600).
    pub fn write(&self, path: &Path) -> Result<(), StateError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let dir = path.parent().unwrap_or(Path::new("."));
        crate::attachment::dirs::private_dir(dir).map_err(write_err(dir))?;
        let tmp = path.with_extension("json.tmp");
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(write_err(&tmp))?;
            // One buffer, one write: serde_json writes a File token by
            // token otherwise (hundreds of thousands of syscalls for a
            // state of 10,000 rules). Compact, not pretty-printed: every
            // edit reads and writes the file whole, and indentation made
            // it about twice the size.
            let mut text = serde_json::to_vec(self)
                .map_err(std::io::Error::from)
                .map_err(write_err(&tmp))?;
            text.push(b'\n');
            std::io::Write::write_all(&mut f, &text).map_err(write_err(&tmp))?;
        }
        std::fs::rename(&tmp, path).map_err(write_err(path))
    }

    /// The state of `att` as the kernel runs it: the pending state
    /// (`IFACE.next.json`) if a reload put that generation in force and
    /// stopped before renaming it, else the state file. Reads only, so any
    /// command may call it while a reload is under way; completing or
    /// discarding a pending state is [`State::repair`]'s job.
    pub fn current(att: &crate::attachment::pins::Attachment) -> Result<State, StateError> {
        if let Ok(pending) = State::read(&att.next_state()) {
            let live = crate::attachment::maps::pinned_config(att)
                .map(|c| c.generation)
                .ok();
            if live == Some(pending.generation) {
                return Ok(pending);
            }
        }
        State::read(&att.state)
    }

    /// Like [`State::current`], and completes the rename a killed reload
    /// left undone, or removes a pending state whose generation never came
    /// into force. Call only under the attachment's update lock: outside
    /// it, a reload between writing its pending state and the switch would
    /// lose that file.
    pub fn repair(att: &crate::attachment::pins::Attachment) -> Result<State, StateError> {
        let next = att.next_state();
        if let Ok(pending) = State::read(&next) {
            let live = crate::attachment::maps::pinned_config(att)
                .map(|c| c.generation)
                .ok();
            if live == Some(pending.generation) {
                std::fs::rename(&next, &att.state).map_err(write_err(&att.state))?;
                return Ok(pending);
            }
            let _ = std::fs::remove_file(&next);
        }
        State::read(&att.state)
    }

    /// The rule the kernel reports as `counter` (see `RuleInfo::counter`).
    pub fn rule(&self, counter: u32) -> Option<&RuleInfo> {
        self.rules.iter().find(|r| r.counter == counter)
    }
}
