//! The observed store: the `denied` flow records of an attachment (what
//! its policy dropped, or in audit mode would have dropped), kept in its
//! state directory for `segbpf suggest`, and followed by `segbpf flows
//! --follow` processes that are not the flow log's primary.
//!
//! Hourly JSON Lines files, `IFACE.observed/YYYYMMDDHH.jsonl` (UTC hour),
//! next to the attachment's state file (by default
//! `/run/segbpf/net/NETNS/IFACE.observed/`). Files older than
//! [`KEEP_HOURS`] are removed, and the oldest files while all of them
//! together exceed [`MAX_BYTES`]. Only the flow log's primary (the holder
//! of the attachment's flow-log lock) writes.
//!
//! `detach` keeps the store until its files expire, with a copy of the
//! state and policy that were in force ([`keep_policy`]), so `suggest`
//! still works on what was observed (audit, detach, suggest); the expired
//! files go when the attachment's files are next removed or read.

use std::{
    io::{Read as _, Seek as _, Write as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

/// Hours of records kept.
pub const KEEP_HOURS: u64 = 24;
/// Bytes kept in all, at most (the oldest hours go first).
pub const MAX_BYTES: u64 = 64 << 20;

/// The file name of the hour of `t`: `YYYYMMDDHH.jsonl`.
fn hour_file(t: SystemTime) -> String {
    let stamp: String = crate::clock::rfc3339(t)
        .chars()
        .take(13)
        .filter(char::is_ascii_digit)
        .collect();
    format!("{stamp}.jsonl")
}

/// The store's files, oldest first.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.len() == 16 && n.is_char_boundary(10) && &n[10..] == ".jsonl")
        .collect();
    names.sort();
    names
}

/// Appends records to the store.
#[derive(Debug)]
pub struct Writer {
    dir: PathBuf,
}

impl Writer {
    /// A writer of the store in `dir` (made on the first write).
    pub fn new(dir: PathBuf) -> Self {
        Writer { dir }
    }

    /// Appends `lines` (JSON, without newlines) to the current hour's file
    /// in one write, then removes what is beyond the limits.
    pub fn append(&mut self, lines: &[String]) -> std::io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        crate::pins::private_dir(&self.dir)?;
        let mut text = String::new();
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
        let path = self.dir.join(hour_file(SystemTime::now()));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        f.write_all(text.as_bytes())?;
        self.prune();
        Ok(())
    }

    fn prune(&self) {
        let names = files(&self.dir);
        let oldest_kept = hour_file(SystemTime::now() - Duration::from_secs(KEEP_HOURS * 3600));
        let mut total: u64 = names
            .iter()
            .filter_map(|n| std::fs::metadata(self.dir.join(n)).ok())
            .map(|m| m.len())
            .sum();
        for (i, n) in names.iter().enumerate() {
            let last = i + 1 == names.len();
            if *n >= oldest_kept && (total <= MAX_BYTES || last) {
                break;
            }
            let path = self.dir.join(n);
            let len = std::fs::metadata(&path).map_or(0, |m| m.len());
            if std::fs::remove_file(&path).is_ok() {
                total = total.saturating_sub(len);
                if *n >= oldest_kept {
                    tracing::warn!(
                        "observed store {} is over {} MiB: removed {n}",
                        self.dir.display(),
                        MAX_BYTES >> 20
                    );
                }
            }
        }
    }
}

/// The state of the attachment when it was detached, in the store.
pub fn detached_state(dir: &Path) -> PathBuf {
    dir.join("detached.state.json")
}

/// The policy text in force when the attachment was detached, in the store.
pub fn detached_policy(dir: &Path) -> PathBuf {
    dir.join("detached.policy.toml")
}

/// Keeps, in the store `dir` (if it has records), the state and the policy
/// text in force, for `suggest` after a detach.
pub fn keep_policy(dir: &Path, state: &[u8], policy: &str) -> std::io::Result<()> {
    if files(dir).is_empty() {
        return Ok(());
    }
    std::fs::write(detached_state(dir), state)?;
    std::fs::write(detached_policy(dir), policy)
}

/// Removes the files older than [`KEEP_HOURS`]; the whole store when none
/// is left.
pub fn expire(dir: &Path) -> std::io::Result<()> {
    let oldest_kept = hour_file(SystemTime::now() - Duration::from_secs(KEEP_HOURS * 3600));
    let names = files(dir);
    for n in names.iter().filter(|n| **n < oldest_kept) {
        let _ = std::fs::remove_file(dir.join(n));
    }
    if names.iter().all(|n| *n < oldest_kept) {
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Follows the store: the records appended since it was opened.
#[derive(Debug)]
pub struct Tail {
    dir: PathBuf,
    at: Option<(String, u64)>,
}

impl Tail {
    /// Starts at the current end of the store in `dir`.
    pub fn at_end(dir: PathBuf) -> Self {
        let at = files(&dir).pop().map(|n| {
            let len = std::fs::metadata(dir.join(&n)).map_or(0, |m| m.len());
            (n, len)
        });
        Tail { dir, at }
    }

    /// The complete lines appended since the last call.
    pub fn read_new(&mut self) -> Vec<String> {
        let names = files(&self.dir);
        let mut out = Vec::new();
        loop {
            let Some((name, offset)) = &mut self.at else {
                match names.first() {
                    Some(first) => {
                        self.at = Some((first.clone(), 0));
                        continue;
                    }
                    None => break,
                }
            };
            if let Ok(mut f) = std::fs::File::open(self.dir.join(&*name))
                && f.seek(std::io::SeekFrom::Start(*offset)).is_ok()
            {
                let mut buf = String::new();
                if f.read_to_string(&mut buf).is_ok() {
                    // Only whole lines: a write may be under way.
                    let whole = buf.rfind('\n').map_or(0, |i| i + 1);
                    out.extend(buf[..whole].lines().map(str::to_string));
                    *offset += whole as u64;
                }
            }
            match names.iter().find(|n| *n > &*name) {
                Some(next) => self.at = Some((next.clone(), 0)),
                None => break,
            }
        }
        out
    }
}

/// The records of the store in `dir` from the hour of `since` on, oldest
/// first (callers filter by each record's own time).
pub fn read_since(dir: &Path, since: SystemTime) -> std::io::Result<Vec<String>> {
    let first = hour_file(since);
    let mut out = Vec::new();
    for n in files(dir).into_iter().filter(|n| *n >= first) {
        match std::fs::read_to_string(dir.join(&n)) {
            Ok(text) => out.extend(text.lines().map(str::to_string)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_sees_what_is_appended_after_it_opened_and_only_whole_lines() {
        let dir = std::env::temp_dir().join(format!("segbpf-observed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut w = Writer::new(dir.clone());
        w.append(&["{\"a\":1}".into()]).expect("append");
        let mut tail = Tail::at_end(dir.clone());
        assert!(
            tail.read_new().is_empty(),
            "what was there before is not replayed"
        );
        w.append(&["{\"b\":2}".into(), "{\"c\":3}".into()])
            .expect("append");
        assert_eq!(tail.read_new(), ["{\"b\":2}", "{\"c\":3}"]);
        // A line being written is left for the next read.
        let name = files(&dir).pop().expect("a file");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join(name))
            .expect("open");
        f.write_all(b"{\"d\"").expect("write");
        assert!(tail.read_new().is_empty());
        f.write_all(b":4}\n").expect("write");
        assert_eq!(tail.read_new(), ["{\"d\":4}"]);
        let all = read_since(&dir, SystemTime::now() - Duration::from_hours(1)).expect("read");
        assert_eq!(all.len(), 4);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn hour_files_sort_by_time() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000);
        let a = hour_file(t);
        let b = hour_file(t + Duration::from_hours(1));
        assert_eq!(a.len(), 16);
        assert!(a < b);
    }
}
