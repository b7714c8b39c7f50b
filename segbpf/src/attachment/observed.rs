//! The observed store: the `denied` flow records of an attachment (what
//! its policy dropped, or in audit mode would have dropped), kept in its
//! state directory for `segbpf suggest`, and followed by `segbpf flows
//! --follow` processes that are not the flow log's primary.
//!
//! JSON Lines files per UTC hour, `IFACE.observed/YYYYMMDDHH.N.jsonl`
//! (`N` counts the hour's files from 1; a file of an older version,
//! `YYYYMMDDHH.jsonl`, comes first). A file is closed when it reaches an
//! eighth of the cap, so the cap holds at all times, also under a flood
//! within one hour: before each write the oldest files go (the current
//! hour's too) until what is kept plus what is written fits in the cap.
//! Files older than [`KEEP_HOURS`] are removed too. The cap is
//! [`MAX_BYTES`] unless `SEGBPF_OBSERVED_MAX_BYTES` says otherwise
//! ([`cap_from_env`]). Only the flow log's primary (the holder of the
//! attachment's flow-log lock) writes.
//!
//! The store lives next to the attachment's state file (by default
//! `/run/segbpf/net/NETNS/IFACE.observed/`). `detach` keeps it until its
//! files expire, with a copy of the state and policy that were in force
//! ([`keep_policy`]), so `suggest` still works on what was observed (audit,
//! detach, suggest); the expired files go when the attachment's files are
//! next removed or read.

use std::{
    cmp::Ordering,
    io::{Read as _, Seek as _, Write as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

/// Hours of records kept.
pub const KEEP_HOURS: u64 = 24;
/// Bytes kept in all by default, at most (the oldest files go first).
pub const MAX_BYTES: u64 = 64 << 20;
/// The smallest cap accepted.
pub const MIN_BYTES: u64 = 64 << 10;
/// The environment variable that sets the cap, in bytes (a `K`, `M` or
/// `G` suffix multiplies by 1024, 1024² or 1024³).
pub const CAP_ENV: &str = "SEGBPF_OBSERVED_MAX_BYTES";
/// Files per cap: a file is closed once it holds cap / `PARTS` bytes.
const PARTS: u64 = 8;

/// The cap set by [`CAP_ENV`] (unset or empty: [`MAX_BYTES`]).
///
/// # Errors
///
/// A value that is not a size, or is below [`MIN_BYTES`].
pub fn cap_from_env() -> Result<u64, String> {
    match std::env::var(CAP_ENV) {
        Ok(v) if !v.trim().is_empty() => parse_cap(&v).map_err(|e| format!("{CAP_ENV}={v}: {e}")),
        _ => Ok(MAX_BYTES),
    }
}

fn parse_cap(v: &str) -> Result<u64, String> {
    let v = v.trim();
    let (digits, unit) = match v.char_indices().last() {
        Some((i, 'K' | 'k')) => (&v[..i], 1 << 10),
        Some((i, 'M' | 'm')) => (&v[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&v[..i], 1 << 30),
        _ => (v, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| "not a size in bytes (e.g. 67108864, 64M)".to_string())?;
    let bytes = n.checked_mul(unit).ok_or_else(|| "too large".to_string())?;
    if bytes < MIN_BYTES {
        return Err(format!("below the smallest cap, {} KiB", MIN_BYTES >> 10));
    }
    Ok(bytes)
}

/// `YYYYMMDDHH` of the UTC hour of `t`.
fn hour_of(t: SystemTime) -> String {
    crate::host::clock::rfc3339(t)
        .chars()
        .take(13)
        .filter(char::is_ascii_digit)
        .collect()
}

/// The hour and number of a store file's name (`YYYYMMDDHH.N.jsonl`, or
/// `YYYYMMDDHH.jsonl` as number 0); `None` for any other name.
fn key(name: &str) -> Option<(&str, u64)> {
    let stem = name.strip_suffix(".jsonl")?;
    let hour = stem
        .get(..10)
        .filter(|h| h.bytes().all(|b| b.is_ascii_digit()))?;
    match stem.get(10..)? {
        "" => Some((hour, 0)),
        n => {
            let n = n.strip_prefix('.')?;
            (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .then(|| n.parse().ok())
                .flatten()
                .map(|n| (hour, n))
        }
    }
}

fn by_key(a: &str, b: &str) -> Ordering {
    key(a).cmp(&key(b))
}

/// The store's files, oldest first.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| key(n).is_some())
        .collect();
    names.sort_by(|a, b| by_key(a, b));
    names
}

/// Appends records to the store.
#[derive(Debug)]
pub struct Writer {
    dir: PathBuf,
    cap: u64,
}

impl Writer {
    /// A writer of the store in `dir` (made on the first write) that keeps
    /// at most `cap` bytes.
    pub fn new(dir: PathBuf, cap: u64) -> Self {
        Writer { dir, cap }
    }

    /// Appends `lines` (JSON, without newlines): to the current hour's
    /// newest file while it holds less than an eighth of the cap, else to a
    /// new one, after removing what is beyond the limits.
    ///
    /// # Errors
    ///
    /// The directory or a file cannot be written, or a single record is
    /// larger than the cap (the rest are written).
    pub fn append(&mut self, lines: &[String]) -> std::io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        crate::attachment::dirs::private_dir(&self.dir)?;
        let hour = hour_of(SystemTime::now());
        let part_max = (self.cap / PARTS).max(1);
        let mut rest = lines;
        let mut too_large = 0;
        while !rest.is_empty() {
            let names = files(&self.dir);
            let newest = names
                .iter()
                .rev()
                .find_map(|n| key(n).filter(|(h, _)| *h == hour).map(|(_, i)| (n, i)));
            let len_of = |n: &str| std::fs::metadata(self.dir.join(n)).map_or(0, |m| m.len());
            let (mut name, mut len) = match newest {
                Some((n, _)) if len_of(n) < part_max => (n.clone(), len_of(n)),
                Some((_, i)) => (format!("{hour}.{}.jsonl", i + 1), 0),
                None => (format!("{hour}.1.jsonl"), 0),
            };
            let mut text = String::new();
            let mut took = 0;
            for l in rest {
                let add = l.len() as u64 + 1;
                if len + text.len() as u64 + add > part_max && took > 0 {
                    break;
                }
                if len + add > part_max && len > 0 {
                    // Not even one more record fits: the next file.
                    let i = key(&name).map_or(0, |(_, i)| i);
                    name = format!("{hour}.{}.jsonl", i + 1);
                    len = 0;
                }
                text.push_str(l);
                text.push('\n');
                took += 1;
            }
            rest = &rest[took..];
            if text.len() as u64 > self.cap {
                too_large += 1;
                continue;
            }
            self.make_room(&name, text.len() as u64);
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(&name))?;
            f.write_all(text.as_bytes())?;
        }
        if too_large > 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{too_large} records larger than the cap of {} bytes",
                    self.cap
                ),
            ));
        }
        Ok(())
    }

    /// Removes the files older than [`KEEP_HOURS`], then the oldest files
    /// but `current` until what is left plus `adding` bytes fits in the cap.
    fn make_room(&self, current: &str, adding: u64) {
        let names = files(&self.dir);
        let oldest_kept = hour_of(SystemTime::now() - Duration::from_secs(KEEP_HOURS * 3600));
        let len_of = |n: &str| std::fs::metadata(self.dir.join(n)).map_or(0, |m| m.len());
        let mut total: u64 = names.iter().map(|n| len_of(n)).sum();
        for n in names.iter().filter(|n| *n != current) {
            let recent = key(n).is_some_and(|(h, _)| h >= oldest_kept.as_str());
            if recent && total + adding <= self.cap {
                break;
            }
            let path = self.dir.join(n);
            let len = len_of(n);
            if std::fs::remove_file(&path).is_ok() {
                total = total.saturating_sub(len);
                if recent {
                    tracing::warn!(
                        "observed store {} would exceed its cap of {} KiB: removed {n}",
                        self.dir.display(),
                        self.cap >> 10
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
    let oldest_kept = hour_of(SystemTime::now() - Duration::from_secs(KEEP_HOURS * 3600));
    let expired = |n: &String| key(n).is_some_and(|(h, _)| h < oldest_kept.as_str());
    let names = files(dir);
    for n in names.iter().filter(|n| expired(n)) {
        let _ = std::fs::remove_file(dir.join(n));
    }
    if names.iter().all(expired) {
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
            match names.iter().find(|n| by_key(n, name) == Ordering::Greater) {
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
    let first = hour_of(since);
    let mut out = Vec::new();
    for n in files(dir)
        .into_iter()
        .filter(|n| key(n).is_some_and(|(h, _)| h >= first.as_str()))
    {
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
        let mut w = Writer::new(dir.clone(), MAX_BYTES);
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
    fn files_sort_by_hour_then_number() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000);
        let a = hour_of(t);
        let b = hour_of(t + Duration::from_hours(1));
        assert_eq!(a.len(), 10);
        assert!(a < b);
        let mut names = vec![
            format!("{b}.1.jsonl"),
            format!("{a}.10.jsonl"),
            format!("{a}.2.jsonl"),
            format!("{a}.jsonl"),
            format!("{a}.1.jsonl"),
        ];
        names.sort_by(|x, y| by_key(x, y));
        assert_eq!(
            names,
            [
                format!("{a}.jsonl"),
                format!("{a}.1.jsonl"),
                format!("{a}.2.jsonl"),
                format!("{a}.10.jsonl"),
                format!("{b}.1.jsonl"),
            ]
        );
        for bad in [
            "x.jsonl",
            "2026120606..jsonl",
            "2026120606.1a.jsonl",
            "2026120606.1.json",
        ] {
            assert!(key(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn the_cap_holds_within_one_hour() {
        let dir = std::env::temp_dir().join(format!("segbpf-observed-cap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cap = MIN_BYTES;
        let mut w = Writer::new(dir.clone(), cap);
        let line = format!("{{\"pad\":\"{}\"}}", "x".repeat(200));
        let total = |dir: &Path| -> u64 {
            files(dir)
                .iter()
                .map(|n| std::fs::metadata(dir.join(n)).map_or(0, |m| m.len()))
                .sum()
        };
        let mut written = 0u64;
        for batch in [1usize, 7, 300, 2, 1000, 50] {
            w.append(&vec![line.clone(); batch]).expect("append");
            written += batch as u64 * (line.len() as u64 + 1);
            assert!(total(&dir) <= cap, "{} > {cap}", total(&dir));
        }
        assert!(written > 4 * cap, "the test writes more than the cap");
        // What is kept is the newest, whole lines, and nearly the cap.
        let kept = read_since(&dir, SystemTime::now() - Duration::from_hours(1)).expect("read");
        assert!(kept.iter().all(|l| *l == line));
        assert!(total(&dir) > cap - cap / PARTS - 2 * line.len() as u64);
        // A record larger than the cap is refused, the others kept.
        let huge = "y".repeat(cap as usize);
        assert!(w.append(&[huge, line.clone()]).is_err());
        assert!(total(&dir) <= cap);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn caps_parse() {
        assert_eq!(parse_cap("64M"), Ok(64 << 20));
        assert_eq!(parse_cap("65536"), Ok(65536));
        assert_eq!(parse_cap(" 1g "), Ok(1 << 30));
        assert!(parse_cap("1K").is_err());
        assert!(parse_cap("lots").is_err());
        assert!(parse_cap("99999999999999G").is_err());
    }
}
