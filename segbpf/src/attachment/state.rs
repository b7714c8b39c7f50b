//! The state file of an attachment: what was applied (policy file, roles,
//! generation, mode) and the compiled rule table that `status` and `trace`
//! use to name rules. Written atomically (temp file + rename).
//!
//! The rule table is kept in its own file beside the state,
//! `IFACE.rules.HASH` (HASH: [`crate::attachment::setindex::hash_bytes`]
//! of its bytes, 16 hex digits), which the state names with its hash and
//! rule count ([`RulesRef`]). A set edit changes no rule, so it reads and
//! writes only the small state ([`State::repair_head`]) and the new state
//! names the same rules file. The rules file is trusted only when its
//! bytes hash to the name and count the state records; anything else (a
//! missing, torn or altered file) is reported and treated as no rule
//! names known, never as another generation's.
//!
//! Large live set edits (at least [`LIVE_INLINE_MIN`] members in all) are
//! kept the same way, in `IFACE.live.HASH` ([`LiveRef`]; HASH:
//! [`crate::attachment::setindex::hash_policy`] of its bytes): a header
//! line, then per set a line `COUNT NAME` and its members one a line. Read
//! as text lines (no JSON string per member): at 1,000,000 members the
//! state's JSON took about 50 ms to read and 20 ms to write. The state
//! file then names the file and lists each such set with one placeholder
//! member `live:HASH` (not an address: a version that does not know the
//! file refuses the state's set edits instead of dropping them). A live
//! file that is missing, altered or of another count is an error, never
//! read as no edits.

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
    /// A live set edits file that does not match the state naming it.
    #[error("live set edits file {path}: {why}")]
    Live {
        /// The file.
        path: std::path::PathBuf,
        /// What does not match.
        why: String,
    },
    /// A rules file that does not match the state naming it.
    #[error("rules file {path}: {why}")]
    Rules {
        /// The file.
        path: std::path::PathBuf,
        /// What does not match.
        why: String,
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

/// Writes `bytes` to `path` atomically (temp file + rename, mode 0600),
/// in one `write` (serde_json writes a file token by token otherwise).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(write_err(&tmp))?;
        std::io::Write::write_all(&mut f, bytes).map_err(write_err(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(write_err(path))
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
    /// Rules that apply to this host. In the state file an empty list
    /// (older versions kept them inline, which is still read): they are in
    /// the rules file that [`State::rules_file`] names, read by
    /// [`State::read`] and left out by [`State::read_head`]. `status`
    /// shows them.
    #[serde(default)]
    pub rules: Vec<RuleInfo>,
    /// The rules file of this generation (`None` in memory: [`State::write`]
    /// writes [`State::rules`] to a new one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules_file: Option<RulesRef>,
    /// The file of the live set edits, when they are kept beside the state
    /// (see the module docs). Set by [`State::write`] from
    /// [`State::set_overrides`] every time (never trusted from memory);
    /// [`State::read_head`] reads the members back into `set_overrides`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_file: Option<LiveRef>,
}

/// Which file holds a state's live set edits (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveRef {
    /// [`crate::attachment::setindex::hash_policy`] of the file's bytes.
    pub hash: u64,
    /// How many members it holds (all sets).
    pub count: usize,
}

/// Live set edits of at least this many members in all are kept in a
/// live file; fewer stay inline in the state file.
pub const LIVE_INLINE_MIN: usize = 4096;

const LIVE_MAGIC: &str = "SEGLIVE1\n";

/// The bytes of a live file of `o`; None when a set name or member
/// cannot be written one a line (empty, or with a newline or a leading
/// space in a name).
pub fn live_bytes(o: &std::collections::BTreeMap<String, Vec<String>>) -> Option<Vec<u8>> {
    let size: usize = o
        .iter()
        .map(|(n, m)| n.len() + 24 + m.iter().map(|x| x.len() + 1).sum::<usize>())
        .sum();
    let mut out = Vec::with_capacity(LIVE_MAGIC.len() + size);
    out.extend_from_slice(LIVE_MAGIC.as_bytes());
    for (name, members) in o {
        if name.is_empty() || name.contains('\n') {
            return None;
        }
        out.extend_from_slice(format!("{} {name}\n", members.len()).as_bytes());
        for m in members {
            if m.is_empty() || m.contains('\n') {
                return None;
            }
            out.extend_from_slice(m.as_bytes());
            out.push(b'\n');
        }
    }
    Some(out)
}

/// Parses a live file's bytes ([`live_bytes`]); None unless well formed.
pub fn parse_live(bytes: &[u8]) -> Option<std::collections::BTreeMap<String, Vec<String>>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let rest = text.strip_prefix(LIVE_MAGIC)?;
    if !rest.is_empty() && !rest.ends_with('\n') {
        return None;
    }
    let mut lines = rest.split_terminator('\n');
    let mut out = std::collections::BTreeMap::new();
    while let Some(head) = lines.next() {
        let (n, name) = head.split_once(' ')?;
        let n: usize = n.parse().ok()?;
        let mut members = Vec::with_capacity(n.min(bytes.len() / 2));
        for _ in 0..n {
            let m = lines.next()?;
            if m.is_empty() {
                return None;
            }
            members.push(m.to_string());
        }
        if name.is_empty() || out.insert(name.to_string(), members).is_some() {
            return None;
        }
    }
    Some(out)
}

/// Removes the live files beside `state` other than `keep`'s.
pub fn prune_live(state: &Path, keep: Option<LiveRef>) {
    let keep = keep.map(|r| crate::attachment::pins::live_path(state, r.hash));
    for path in crate::attachment::pins::live_files(state) {
        if Some(&path) != keep.as_ref() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Which rules file holds a state's rules (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RulesRef {
    /// [`crate::attachment::setindex::hash_bytes`] of the file's bytes.
    pub hash: u64,
    /// How many rules it holds.
    pub count: usize,
}

/// Removes the rules files beside `state` other than `keep`'s.
pub fn prune_rules(state: &Path, keep: Option<RulesRef>) {
    let keep = keep.map(|r| crate::attachment::pins::rules_path(state, r.hash));
    for path in crate::attachment::pins::rules_files(state) {
        if Some(&path) != keep.as_ref() {
            let _ = std::fs::remove_file(path);
        }
    }
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

    /// Reads a state file with its rules (a rules file that does not
    /// match is logged and leaves [`State::rules`] empty).
    pub fn read(path: &Path) -> Result<State, StateError> {
        let mut state = State::read_head(path)?;
        if let Err(e) = state.load_rules(path) {
            tracing::warn!("{e} (rules are not named)");
        }
        Ok(state)
    }

    /// Reads a state file without the rules of a rules file
    /// ([`State::rules`] stays empty; [`State::rules_file`] names them).
    pub fn read_head(path: &Path) -> Result<State, StateError> {
        match State::read_json(path)?.with_live(path) {
            // A change may have replaced the state and removed the live
            // file of the one read here in between: read once more.
            Err(StateError::Live { .. }) => State::read_json(path)?.with_live(path),
            other => other,
        }
    }

    fn read_json(path: &Path) -> Result<State, StateError> {
        let text = std::fs::read(path).map_err(|source| StateError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| StateError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The state with the members of its live file (if it names one) in
    /// [`State::set_overrides`]; `path`: the state file's.
    fn with_live(mut self, path: &Path) -> Result<State, StateError> {
        let Some(r) = self.live_file else {
            return Ok(self);
        };
        let file = crate::attachment::pins::live_path(
            &path.with_file_name(format!("{}.json", self.iface)),
            r.hash,
        );
        let bad = |why: String| StateError::Live {
            path: file.clone(),
            why,
        };
        let bytes = std::fs::read(&file).map_err(|e| bad(e.to_string()))?;
        if crate::attachment::setindex::hash_policy(&bytes) != r.hash {
            return Err(bad(
                "its bytes do not hash to the value the state names".into()
            ));
        }
        let sets = parse_live(&bytes).ok_or_else(|| bad("not a live set edits file".into()))?;
        let count: usize = sets.values().map(Vec::len).sum();
        if count != r.count || !sets.keys().eq(self.set_overrides.keys()) {
            return Err(bad(format!(
                "{count} members of sets {:?}, the state names {} of {:?}",
                sets.keys().collect::<Vec<_>>(),
                r.count,
                self.set_overrides.keys().collect::<Vec<_>>()
            )));
        }
        self.set_overrides = sets;
        Ok(self)
    }

    /// Reads the rules [`State::rules_file`] names into [`State::rules`],
    /// if they are not there yet; `path` is the state file's (or the
    /// pending state's: both live in one directory). A file whose bytes do
    /// not hash to the name, or that holds another number of rules, is an
    /// error and leaves the rules empty.
    pub fn load_rules(&mut self, path: &Path) -> Result<(), StateError> {
        let Some(r) = self.rules_file else {
            return Ok(());
        };
        if !self.rules.is_empty() {
            return Ok(());
        }
        let file = crate::attachment::pins::rules_path(
            &path.with_file_name(format!("{}.json", self.iface)),
            r.hash,
        );
        let bytes = std::fs::read(&file).map_err(|source| StateError::Read {
            path: file.clone(),
            source,
        })?;
        let bad = |why: String| StateError::Rules {
            path: file.clone(),
            why,
        };
        if crate::attachment::setindex::hash_bytes(&bytes) != r.hash {
            return Err(bad(
                "its bytes do not hash to the value the state names".into()
            ));
        }
        let rules: Vec<RuleInfo> =
            serde_json::from_slice(&bytes).map_err(|source| StateError::Parse {
                path: file.clone(),
                source,
            })?;
        if rules.len() != r.count {
            return Err(bad(format!(
                "{} rules, the state names {}",
                rules.len(),
                r.count
            )));
        }
        self.rules = rules;
        Ok(())
    }

    /// Writes the state file atomically (mode 0600). Without a
    /// [`State::rules_file`], it first writes [`State::rules`] to a rules
    /// file (content-named, so the file of the state in force is never
    /// overwritten) and names it.
    pub fn write(&mut self, path: &Path) -> Result<(), StateError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        crate::attachment::dirs::private_dir(dir).map_err(write_err(dir))?;
        if self.rules_file.is_none() {
            let mut text = serde_json::to_vec(&self.rules)
                .map_err(std::io::Error::from)
                .map_err(write_err(path))?;
            text.push(b'\n');
            let hash = crate::attachment::setindex::hash_bytes(&text);
            let file = crate::attachment::pins::rules_path(
                &path.with_file_name(format!("{}.json", self.iface)),
                hash,
            );
            // Same name, same bytes: a file already there is this one
            // unless altered, so it is checked, not trusted.
            let same = std::fs::read(&file).is_ok_and(|b| b == text);
            if !same {
                write_private(&file, &text)?;
            }
            self.rules_file = Some(RulesRef {
                hash,
                count: self.rules.len(),
            });
        }
        // Large live set edits go to their own file (see the module docs),
        // named from the members in memory, never from an earlier write.
        self.live_file = None;
        let count: usize = self.set_overrides.values().map(Vec::len).sum();
        let live = if count >= LIVE_INLINE_MIN
            && let Some(bytes) = live_bytes(&self.set_overrides)
        {
            let hash = crate::attachment::setindex::hash_policy(&bytes);
            let file = crate::attachment::pins::live_path(
                &path.with_file_name(format!("{}.json", self.iface)),
                hash,
            );
            let same = std::fs::read(&file).is_ok_and(|b| b == bytes);
            if !same {
                write_private(&file, &bytes)?;
            }
            self.live_file = Some(LiveRef { hash, count });
            let placeholder = vec![format!("live:{hash:016x}")];
            let names = self
                .set_overrides
                .keys()
                .map(|k| (k.clone(), placeholder.clone()))
                .collect();
            Some(std::mem::replace(&mut self.set_overrides, names))
        } else {
            None
        };
        // The state file names the rules file and holds no rules (an
        // empty list); the rules stay in memory for the caller.
        let rules = std::mem::take(&mut self.rules);
        let text = serde_json::to_vec(&*self);
        self.rules = rules;
        if let Some(members) = live {
            self.set_overrides = members;
        }
        let mut text = text
            .map_err(std::io::Error::from)
            .map_err(write_err(path))?;
        text.push(b'\n');
        write_private(path, &text)
    }

    /// The state of `att` as the kernel runs it: the pending state
    /// (`IFACE.next.json`) if a reload put that generation in force and
    /// stopped before renaming it, else the state file. Reads only, so any
    /// command may call it while a reload is under way; completing or
    /// discarding a pending state is [`State::repair`]'s job.
    pub fn current(att: &crate::attachment::pins::Attachment) -> Result<State, StateError> {
        let mut state = State::current_head(att)?;
        if state.load_rules(&att.state).is_err() {
            // A change may have put its state in force and removed the
            // rules file of the one read here in between: read once more.
            state = State::current_head(att)?;
            if let Err(e) = state.load_rules(&att.state) {
                tracing::warn!("{e} (rules are not named)");
            }
        }
        Ok(state)
    }

    /// [`State::current`] without the rules of a rules file.
    pub fn current_head(att: &crate::attachment::pins::Attachment) -> Result<State, StateError> {
        if let Ok(pending) = State::read_head(&att.next_state()) {
            let live = crate::attachment::maps::pinned_config(att)
                .map(|c| c.generation)
                .ok();
            if live == Some(pending.generation) {
                return Ok(pending);
            }
        }
        State::read_head(&att.state)
    }

    /// Like [`State::current`], and completes the rename a killed reload
    /// left undone, or removes a pending state whose generation never came
    /// into force. Call only under the attachment's update lock: outside
    /// it, a reload between writing its pending state and the switch would
    /// lose that file.
    pub fn repair(att: &crate::attachment::pins::Attachment) -> Result<State, StateError> {
        let mut state = State::repair_head(att)?;
        if let Err(e) = state.load_rules(&att.state) {
            tracing::warn!("{e} (rules are not named)");
        }
        Ok(state)
    }

    /// [`State::repair`] without the rules of a rules file (what a change
    /// reads: only a change that compiles needs the rules in force, for
    /// their counters, and reads them with [`State::load_rules`]).
    pub fn repair_head(att: &crate::attachment::pins::Attachment) -> Result<State, StateError> {
        let next = att.next_state();
        if let Ok(pending) = State::read_head(&next) {
            let live = crate::attachment::maps::pinned_config(att)
                .map(|c| c.generation)
                .ok();
            if live == Some(pending.generation) {
                std::fs::rename(&next, &att.state).map_err(write_err(&att.state))?;
                return Ok(pending);
            }
            let _ = std::fs::remove_file(&next);
        }
        State::read_head(&att.state)
    }

    /// [`crate::attachment::setindex::hash_overrides`] of the live set
    /// edits: the hash their live file is named by, when the state keeps
    /// them in one (read back and checked against it, or just written),
    /// else computed.
    pub fn overrides_hash(&self) -> u64 {
        self.live_file.map_or_else(
            || crate::attachment::setindex::hash_overrides(&self.set_overrides),
            |r| r.hash,
        )
    }

    /// How many rules apply to this host (also when read without them).
    pub fn rule_count(&self) -> usize {
        self.rules_file.map_or(self.rules.len(), |r| r.count)
    }

    /// The rule the kernel reports as `counter` (see `RuleInfo::counter`).
    pub fn rule(&self, counter: u32) -> Option<&RuleInfo> {
        self.rules.iter().find(|r| r.counter == counter)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn state(overrides: BTreeMap<String, Vec<String>>) -> State {
        let mut s: State = serde_json::from_value(serde_json::json!({
            "iface": "eth9", "ifindex": 9, "policy": "/p.toml", "roles": ["r"],
            "mode": "skb", "generation": 4, "prog_id": 1, "attached_at": 0,
            "entries": [0, 0, 0], "classes": 0,
        }))
        .unwrap();
        s.set_overrides = overrides;
        s
    }

    fn members(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255))
            .collect()
    }

    /// Large live set edits go to a hash-named file beside the state and
    /// read back exactly; the state names it and holds only placeholders
    /// (which no version parses as an address); small ones stay inline; a
    /// missing, altered or miscounted file is an error naming it, never
    /// "no edits"; a state of the earlier form (members inline) reads.
    #[test]
    fn large_live_edits_live_beside_the_state_and_read_back_exactly() {
        let dir = std::env::temp_dir().join(format!("segbpf-live-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("eth9.json");
        let big = BTreeMap::from([
            ("a".to_string(), members(LIVE_INLINE_MIN)),
            ("b".to_string(), vec!["fd00::1".to_string()]),
            ("empty".to_string(), Vec::new()),
        ]);
        let mut s = state(big.clone());
        s.write(&path).unwrap();
        assert_eq!(s.set_overrides, big, "the members stay in memory");
        let r = s.live_file.expect("a live file");
        assert_eq!(r.count, LIVE_INLINE_MIN + 1);
        assert_eq!(
            r.hash,
            crate::attachment::setindex::hash_overrides(&big),
            "the file's name is the hash of the edits (what the index records)"
        );
        let head: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let placeholder = format!("live:{:016x}", r.hash);
        assert_eq!(head["set_overrides"]["a"], serde_json::json!([placeholder]));
        assert!(std::fs::metadata(&path).unwrap().len() < 4096, "{head}");
        let file = crate::attachment::pins::live_path(&path, r.hash);
        assert_eq!(
            crate::attachment::pins::live_files(&path),
            vec![file.clone()]
        );
        assert_eq!(State::read_head(&path).unwrap().set_overrides, big);

        // Altered (one member), miscounted, missing: errors naming the file.
        let bytes = std::fs::read(&file).unwrap();
        let altered =
            String::from_utf8(bytes.clone())
                .unwrap()
                .replacen("10.0.0.7\n", "10.0.0.8\n", 1);
        std::fs::write(&file, altered).unwrap();
        let e = State::read_head(&path).unwrap_err().to_string();
        assert!(
            e.contains("live set edits file") && e.contains("live."),
            "{e}"
        );
        std::fs::remove_file(&file).unwrap();
        assert!(State::read_head(&path).is_err());
        std::fs::write(&file, &bytes).unwrap();
        let mut miscounted = head.clone();
        miscounted["live_file"]["count"] = serde_json::json!(r.count - 1);
        std::fs::write(&path, serde_json::to_vec(&miscounted).unwrap()).unwrap();
        assert!(State::read_head(&path).is_err());
        std::fs::write(&path, serde_json::to_vec(&head).unwrap()).unwrap();
        assert_eq!(State::read_head(&path).unwrap().set_overrides, big);

        // Fewer members: inline, no live file named; the old one pruned.
        let small = BTreeMap::from([("a".to_string(), members(3))]);
        let mut s = state(small.clone());
        s.write(&path).unwrap();
        assert_eq!(s.live_file, None);
        prune_live(&path, s.live_file);
        assert!(crate::attachment::pins::live_files(&path).is_empty());
        assert_eq!(State::read_head(&path).unwrap().set_overrides, small);

        // The earlier form: a large set inline in the state file.
        let mut inline = serde_json::to_value(state(big.clone())).unwrap();
        inline.as_object_mut().unwrap().remove("live_file");
        std::fs::write(&path, serde_json::to_vec(&inline).unwrap()).unwrap();
        assert_eq!(State::read_head(&path).unwrap().set_overrides, big);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn live_files_parse_back_or_not_at_all() {
        let o = BTreeMap::from([
            (
                "x y".to_string(),
                vec!["10.0.0.1".to_string(), "10.0.0.0/8".to_string()],
            ),
            ("z".to_string(), Vec::new()),
        ]);
        let b = live_bytes(&o).unwrap();
        assert_eq!(parse_live(&b), Some(o));
        assert_eq!(parse_live(&b[..b.len() - 1]), None, "torn");
        assert_eq!(parse_live(&b[..b.len() - 9]), None, "a member short");
        assert_eq!(
            live_bytes(&BTreeMap::from([("a\nb".to_string(), Vec::new())])),
            None
        );
        assert_eq!(
            live_bytes(&BTreeMap::from([("a".to_string(), vec![String::new()])])),
            None
        );
    }
}
