//! Drop events in userspace: decoding the kernel's versioned records into
//! stable, documented fields (docs/events.md), formatting them as text or
//! JSON Lines, and streaming them from an attachment's pinned ring buffer
//! with a periodic summary of suppressed and lost events.
//!
//! One ring buffer has one consumer position, so two readers would split
//! the events between them. A reader consumes only while it holds the
//! attachment's reader lock: `segbpf monitor` holds it for its whole run,
//! `segbpf attach` takes it for each batch and yields to a monitor, so no
//! event is lost to a competing reader.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use aya::maps::{Map, MapData, RingBuf};
use segbpf_common::{EVENT_AUDIT, EVENT_VERSION, Event, MAP_EVENTS, reason};
use serde::Serialize;
use tokio::io::unix::AsyncFd;

pub use crate::attachment::maps::EventStats;
use crate::{
    attachment::maps::pinned_event_stats,
    attachment::pins::{Attachment, LockKind},
    host::proto::proto_name,
};

/// Errors reading an attachment's events.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A pinned map could not be opened or read.
    #[error("{what}: {source}")]
    Map {
        /// Which map, and what was done.
        what: String,
        /// Why.
        source: aya::maps::MapError,
    },
    /// Writing the stream, polling the ring or taking the reader lock failed.
    #[error("{what}: {source}")]
    Io {
        /// What was done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

fn map_err(what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> TelemetryError {
    let what = what.into();
    move |source| TelemetryError::Map { what, source }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TelemetryError {
    let what = what.into();
    move |source| TelemetryError::Io { what, source }
}

/// Why an event record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The record is shorter than an event.
    #[error("event record of {0} bytes, expected {1}")]
    Size(usize, usize),
    /// The record has a layout version this build does not know.
    #[error("event version {0}, this segbpf reads version {EVENT_VERSION}")]
    Version(u8),
}

/// A decoded event, with the stable field names of docs/events.md.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EventRecord {
    /// The JSON dialect's version ([`crate::JSON_SCHEMA`], docs/json.md).
    pub schema: u32,
    /// `"event"` (summaries say `"summary"`).
    pub r#type: &'static str,
    /// Wall-clock time of the verdict, RFC 3339 UTC (from `ts_ns`).
    pub time: String,
    /// `drop` or `audit` (audit: would have been dropped, was let through):
    /// the text line's word; JSON says `verdict` and `audit`.
    #[serde(skip)]
    pub action: &'static str,
    /// The policy's verdict: always `drop` (events are about drops).
    pub verdict: &'static str,
    /// True when audit mode let the packet through.
    pub audit: bool,
    /// Kernel coarse monotonic clock (CLOCK_MONOTONIC_COARSE) of the verdict, ns.
    pub ts_ns: u64,
    /// Interface name (as the reader knows it).
    pub iface: String,
    /// Interface index.
    pub ifindex: u32,
    /// `ingress` or `egress`.
    pub direction: &'static str,
    /// `ipv4`, `ipv6`, or `unknown` (not parsed that far).
    pub family: &'static str,
    /// Protocol name or number.
    pub proto: String,
    /// Source address (absent when unknown).
    pub src: Option<IpAddr>,
    /// Destination address.
    pub dst: Option<IpAddr>,
    /// Source port (ICMP: echo id).
    pub sport: u16,
    /// Destination port (ICMP: type).
    pub dport: u16,
    /// TCP flags as letters (`S`, `SA`, `F`, `R`, `P`, `A`, `U`), empty
    /// otherwise: the text line's form.
    #[serde(skip)]
    pub tcp_flags: String,
    /// TCP flags by name (`["SYN", "ACK"]`), as in flow records; empty for
    /// other protocols.
    #[serde(rename = "tcp_flags")]
    pub tcp_flag_names: Vec<&'static str>,
    /// Reason name (docs/events.md lists them).
    pub reason: &'static str,
    /// Frame length, bytes.
    pub len: u32,
    /// Policy generation in force.
    pub generation: u64,
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8], iface: &str) -> Result<EventRecord, DecodeError> {
    let size = std::mem::size_of::<Event>();
    if bytes.len() < size {
        return Err(DecodeError::Size(bytes.len(), size));
    }
    if bytes[0] != EVENT_VERSION {
        return Err(DecodeError::Version(bytes[0]));
    }
    let e: Event = bytemuck::pod_read_unaligned(&bytes[..size]);
    let (family, src, dst) = match e.family {
        4 => {
            let a = |b: [u8; 16]| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
            ("ipv4", Some(a(e.src)), Some(a(e.dst)))
        }
        6 => (
            "ipv6",
            Some(IpAddr::V6(Ipv6Addr::from(e.src))),
            Some(IpAddr::V6(Ipv6Addr::from(e.dst))),
        ),
        _ => ("unknown", None, None),
    };
    Ok(EventRecord {
        schema: crate::JSON_SCHEMA,
        r#type: "event",
        action: if e.kind == EVENT_AUDIT {
            "audit"
        } else {
            "drop"
        },
        verdict: "drop",
        audit: e.kind == EVENT_AUDIT,
        time: crate::host::clock::rfc3339(crate::host::clock::wall_of_monotonic(e.ts_ns)),
        ts_ns: e.ts_ns,
        iface: iface.to_string(),
        ifindex: e.ifindex,
        direction: if e.dir == segbpf_common::DIR_EGRESS {
            "egress"
        } else {
            "ingress"
        },
        family,
        proto: if family == "unknown" {
            "unknown".into()
        } else {
            proto_name(e.proto)
        },
        src,
        dst,
        sport: e.sport,
        dport: e.dport,
        tcp_flags: if e.proto == segbpf_common::IPPROTO_TCP {
            crate::host::proto::tcp_flag_letters(e.tcp_flags)
        } else {
            String::new()
        },
        tcp_flag_names: if e.proto == segbpf_common::IPPROTO_TCP {
            crate::host::proto::tcp_flag_names(e.tcp_flags)
        } else {
            Vec::new()
        },
        reason: reason::name(e.reason),
        len: e.len,
        generation: e.generation,
    })
}

impl crate::observe::flows::Filter {
    /// Whether a drop event (`monitor`) is shown: events are drops, which
    /// no rule made, so `--rule` shows none.
    pub fn event(&self, e: &EventRecord) -> bool {
        self.matches(
            [Some(e.sport), Some(e.dport)],
            [e.src, e.dst],
            true,
            e.audit,
            None,
        )
    }
}

/// Output format of streamed events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// JSON Lines with the fields of docs/events.md.
    Json,
}

impl EventRecord {
    /// Writes the record as a journal entry of its own, with structured
    /// fields (`SEGBPF_IFACE`, `SEGBPF_REASON`, `SEGBPF_SRC`, ...).
    pub fn to_journal(&self) {
        let addr = |a: Option<IpAddr>| a.map(|a| a.to_string()).unwrap_or_default();
        tracing::warn!(
            target: "segbpf::event",
            action = self.action,
            iface = %self.iface,
            direction = self.direction,
            proto = %self.proto,
            src = %addr(self.src),
            sport = self.sport,
            dst = %addr(self.dst),
            dport = self.dport,
            reason = self.reason,
            tcp_flags = %self.tcp_flags,
            generation = self.generation,
            time = %self.time,
            "{}",
            self.line(LogFormat::Text)
        );
    }

    /// The event as one line in `format`.
    pub fn line(&self, format: LogFormat) -> String {
        match format {
            LogFormat::Json => serde_json::to_string(self).unwrap_or_default(),
            LogFormat::Text => {
                let addr = |a: Option<IpAddr>, port: u16| match a {
                    Some(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
                    Some(v4) => format!("{v4}:{port}"),
                    None => "?".into(),
                };
                format!(
                    "{} {} {} {} {} {} -> {} {}{} reason={} len={} gen={}",
                    self.time,
                    self.action.to_uppercase(),
                    self.iface,
                    self.direction,
                    self.proto,
                    addr(self.src, self.sport),
                    addr(self.dst, self.dport),
                    if self.tcp_flags.is_empty() {
                        ""
                    } else {
                        "flags="
                    },
                    if self.tcp_flags.is_empty() {
                        String::new()
                    } else {
                        format!("{} ", self.tcp_flags)
                    },
                    self.reason,
                    self.len,
                    self.generation
                )
            }
        }
    }
}

/// Who reads the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reader {
    /// `segbpf attach`: reads between monitors, yields to them.
    Attach,
    /// `segbpf monitor`: reads exclusively while it runs.
    Monitor,
}

/// Streams an attachment's events to stdout until `stop` resolves or the
/// attachment goes away. Every `summary_every`, a summary line reports
/// events suppressed and lost since the last one (when there are any).
/// Only the events `filter` selects are written (`monitor --port ...`).
pub async fn stream(
    att: &Attachment,
    format: LogFormat,
    reader: Reader,
    summary_every: Duration,
    filter: &crate::observe::flows::Filter,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), TelemetryError> {
    use std::io::Write as _;
    let ring_path = att.map(MAP_EVENTS);
    let what = || format!("opening {}", ring_path.display());
    // The kernel's id of the ring this stream reads: an attachment that was
    // detached and made again has another ring (the stream would read a
    // dead one), so the stream ends then too.
    let ring_id = || {
        aya::maps::MapInfo::from_pin(&ring_path)
            .ok()
            .map(|i| i.id())
    };
    let ours = ring_id();
    let data = MapData::from_pin(&ring_path).map_err(map_err(what()))?;
    let ring = RingBuf::try_from(Map::RingBuf(data)).map_err(map_err(what()))?;
    let mut fd = register(ring)?;
    let lock_path = att.lock_path(LockKind::Reader);
    let lock_file = att
        .lock_file(LockKind::Reader)
        .map_err(io_err(format!("opening {}", lock_path.display())))?;
    if reader == Reader::Monitor {
        // Blocks only while an attach process is in the middle of a batch.
        lock_file
            .lock()
            .map_err(io_err(format!("locking {}", lock_path.display())))?;
    }
    let out_err = || io_err("writing events to stdout");
    let mut last = pinned_event_stats(att).unwrap_or_default();
    let mut tick = tokio::time::interval(summary_every);
    tick.tick().await;
    let mut retry = tokio::time::interval(Duration::from_millis(200));
    let mut alive = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(stop);
    let stdout = std::io::stdout();
    loop {
        tokio::select! {
            () = &mut stop => break,
            _ = alive.tick() => {
                if !att.is_attached() {
                    tracing::info!("segbpf was detached from {}; stopping the event stream", att.iface);
                    break;
                }
                if ours.is_some() && ring_id() != ours {
                    tracing::info!(
                        "segbpf was detached from {} and attached again by another command; stopping the event stream of the old attachment",
                        att.iface
                    );
                    break;
                }
            }
            _ = tick.tick() => {
                let now = pinned_event_stats(att).unwrap_or(last);
                let (sup, lost) = (now.suppressed - last.suppressed, now.lost - last.lost);
                if sup > 0 || lost > 0 {
                    let line = match format {
                        LogFormat::Json => serde_json::json!({
                            "schema": crate::JSON_SCHEMA,
                            "type": "summary",
                            "time": crate::host::clock::rfc3339(std::time::SystemTime::now()),
                            "iface": att.iface,
                            "suppressed": sup, "lost": lost,
                            "suppressed_total": now.suppressed, "lost_total": now.lost,
                        }).to_string(),
                        LogFormat::Text => format!(
                            "{} SUMMARY {} suppressed={sup} lost={lost} (totals {} / {})",
                            crate::host::clock::rfc3339(std::time::SystemTime::now()),
                            att.iface, now.suppressed, now.lost
                        ),
                    };
                    writeln!(stdout.lock(), "{line}").map_err(out_err())?;
                }
                last = now;
            }
            guard = fd.readable_mut() => {
                let mut guard = guard.map_err(io_err("polling the event ring"))?;
                let locked = reader == Reader::Monitor || lock_file.try_lock().is_ok();
                if locked {
                    let ring = guard.get_inner_mut();
                    let mut out = stdout.lock();
                    while let Some(item) = ring.next() {
                        match decode(&item, &att.iface) {
                            Ok(ev) if !filter.event(&ev) => {}
                            Ok(ev) if crate::host::logging::to_journal() => ev.to_journal(),
                            Ok(ev) => writeln!(out, "{}", ev.line(format)).map_err(out_err())?,
                            Err(e) => tracing::warn!("skipping an event: {e}"),
                        }
                    }
                    out.flush().map_err(out_err())?;
                    if reader == Reader::Attach {
                        let _ = lock_file.unlock();
                    }
                    guard.clear_ready();
                } else {
                    // A monitor reads; leave the events to it.
                    guard.clear_ready();
                    retry.tick().await;
                }
            }
        }
    }
    Ok(())
}

/// Registers the ring with the runtime for readability.
fn register(ring: RingBuf<MapData>) -> Result<AsyncFd<RingBuf<MapData>>, TelemetryError> {
    // SAFETY: the ring owns its map fd, which stays open (and is what
    // `as_raw_fd` returns) for as long as the ring, and so the AsyncFd,
    // lives.
    unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }.map_err(|e| {
        TelemetryError::Io {
            what: "polling the event ring".into(),
            source: e.into(),
        }
    })
}

#[cfg(test)]
mod tests {
    use segbpf_common::{DIR_INGRESS, EVENT_DROP, IPPROTO_TCP};

    use super::*;

    fn sample() -> Event {
        let mut e = Event {
            version: EVENT_VERSION,
            kind: EVENT_DROP,
            dir: DIR_INGRESS,
            family: 4,
            proto: IPPROTO_TCP,
            reason: reason::DROP_DEFAULT,
            tcp_flags: 0x02,
            ifindex: 3,
            len: 74,
            ts_ns: 5,
            generation: 1,
            sport: 40000,
            dport: 5432,
            ..Event::default()
        };
        e.src[..4].copy_from_slice(&[10, 10, 1, 15]);
        e.dst[..4].copy_from_slice(&[10, 10, 1, 30]);
        e
    }

    #[test]
    fn decodes_and_formats_json_with_stable_fields() {
        let r = decode(bytemuck::bytes_of(&sample()), "eth0").unwrap();
        let v: serde_json::Value = serde_json::from_str(&r.line(LogFormat::Json)).unwrap();
        assert_eq!(v["type"], "event");
        assert_eq!(v["schema"], crate::JSON_SCHEMA);
        assert_eq!(v["verdict"], "drop");
        assert_eq!(v["audit"], false);
        assert!(v.get("action").is_none(), "{v}");
        assert_eq!(v["src"], "10.10.1.15");
        assert_eq!(v["dport"], 5432);
        assert_eq!(v["proto"], "tcp");
        assert_eq!(v["tcp_flags"], serde_json::json!(["SYN"]));
        assert_eq!(v["reason"], "default-drop");
        assert_eq!(v["direction"], "ingress");
        let time = v["time"].as_str().unwrap();
        assert!(
            time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "{time}"
        );
        let text = r.line(LogFormat::Text);
        assert!(
            text.starts_with(&format!(
                "{time} DROP eth0 ingress tcp 10.10.1.15:40000 -> 10.10.1.30:5432"
            )),
            "{text}"
        );
    }

    #[test]
    fn rejects_short_and_unknown_versions() {
        let e = sample();
        let b = bytemuck::bytes_of(&e);
        assert!(matches!(
            decode(&b[..10], "x"),
            Err(DecodeError::Size(10, _))
        ));
        let mut v = b.to_vec();
        v[0] = 99;
        assert_eq!(decode(&v, "x"), Err(DecodeError::Version(99)));
    }

    #[test]
    fn unparsed_packets_have_no_addresses() {
        let mut e = sample();
        e.family = 0;
        e.reason = reason::DROP_TRUNC_ETH;
        let r = decode(bytemuck::bytes_of(&e), "eth0").unwrap();
        assert_eq!(
            (r.src, r.family, r.proto.as_str()),
            (None, "unknown", "unknown")
        );
    }
}
