//! The state file of an attachment: what was applied (policy file, roles,
//! generation, mode) and the compiled rule table that `status` and `trace`
//! use to name rules. Written atomically (temp file + rename).

use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::compile::RuleInfo;

/// What `attach` applied to an interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Interface name.
    pub iface: String,
    /// Network namespace (`--netns`), if any.
    pub netns: Option<String>,
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
    pub fn read(path: &Path) -> anyhow::Result<State> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading state file {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("parsing state file {}", path.display()))
    }

    /// Writes the state file atomically (mode 0600).
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let dir = path.parent().context("state path has no parent")?;
        crate::pins::private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = path.with_extension("json.tmp");
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            serde_json::to_writer_pretty(&mut f, self)?;
            std::io::Write::write_all(&mut f, b"\n")?;
        }
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// The state of `att` as the kernel runs it: the pending state
    /// (`IFACE.next.json`) if a reload put that generation in force and
    /// stopped before renaming it, else the state file. Reads only, so any
    /// command may call it while a reload is under way; completing or
    /// discarding a pending state is [`State::repair`]'s job.
    pub fn current(att: &crate::pins::Attachment) -> anyhow::Result<State> {
        if let Ok(pending) = State::read(&next_path(&att.state)) {
            let live = crate::maps::pinned_config(att).map(|c| c.generation).ok();
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
    pub fn repair(att: &crate::pins::Attachment) -> anyhow::Result<State> {
        let next = next_path(&att.state);
        if let Ok(pending) = State::read(&next) {
            let live = crate::maps::pinned_config(att).map(|c| c.generation).ok();
            if live == Some(pending.generation) {
                std::fs::rename(&next, &att.state)
                    .with_context(|| format!("completing {}", next.display()))?;
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

/// Where a reload writes the state it is about to put in force.
pub fn next_path(state: &Path) -> std::path::PathBuf {
    state.with_extension("next.json")
}
