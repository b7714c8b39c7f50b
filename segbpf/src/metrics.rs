//! Prometheus metrics (`segbpf attach --metrics ADDR`): per-rule packets
//! and bytes, packets and bytes per direction and reason, events emitted /
//! suppressed / lost, and connection-table size and fill. Values are read
//! from the attachment's pinned maps on each scrape (the same numbers
//! `segbpf status --output json` shows) and encoded by `prometheus-client`.

use std::net::SocketAddr;

use anyhow::Context as _;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{pins::Attachment, report};

type Labels = Vec<(String, String)>;

fn counter_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    registry.register(name, help, f.clone());
    f
}

/// The attachment's metrics in the Prometheus text format.
pub fn render(att: &Attachment) -> anyhow::Result<String> {
    let r = report::report(att)?;
    let mut registry = Registry::with_prefix("segbpf");
    let iface = || ("iface".to_string(), att.iface.clone());

    let rule_packets = counter_family(
        &mut registry,
        "rule_packets",
        "Packets allowed by each rule (connection openers)",
    );
    let rule_bytes = counter_family(
        &mut registry,
        "rule_bytes",
        "Bytes allowed by each rule (connection openers)",
    );
    for rule in &r.rules {
        let labels = vec![
            iface(),
            ("rule".into(), rule.id.to_string()),
            ("label".into(), rule.label.clone()),
            ("direction".into(), rule.direction.clone()),
            ("line".into(), rule.line.to_string()),
        ];
        rule_packets.get_or_create(&labels).inc_by(rule.packets);
        rule_bytes.get_or_create(&labels).inc_by(rule.bytes);
    }
    let packets = counter_family(
        &mut registry,
        "packets",
        "Packets by direction and verdict reason",
    );
    let bytes = counter_family(
        &mut registry,
        "bytes",
        "Bytes by direction and verdict reason",
    );
    for (dir, by_reason) in &r.directions {
        for (reason, c) in by_reason {
            let labels = vec![
                iface(),
                ("direction".into(), dir.clone()),
                ("reason".into(), reason.clone()),
                (
                    "verdict".into(),
                    if is_pass(reason) { "pass" } else { "drop" }.into(),
                ),
            ];
            packets.get_or_create(&labels).inc_by(c.packets);
            bytes.get_or_create(&labels).inc_by(c.bytes);
        }
    }
    let events = counter_family(
        &mut registry,
        "events",
        "Drop events: emitted, suppressed by the rate limit, lost (ring full)",
    );
    for (outcome, n) in [
        ("emitted", r.events.emitted),
        ("suppressed", r.events.suppressed),
        ("lost", r.events.lost),
    ] {
        events
            .get_or_create(&vec![iface(), ("outcome".into(), outcome.into())])
            .inc_by(n);
    }
    let ct = Family::<Labels, Gauge>::default();
    registry.register(
        "conntrack_entries",
        "Connection-table entries in use",
        ct.clone(),
    );
    ct.get_or_create(&vec![iface()])
        .set(r.conntrack.entries as i64);
    let ct_size = Family::<Labels, Gauge>::default();
    registry.register(
        "conntrack_size",
        "Connection-table capacity",
        ct_size.clone(),
    );
    ct_size
        .get_or_create(&vec![iface()])
        .set(r.conntrack.size as i64);
    let half_open = Family::<Labels, Gauge>::default();
    registry.register(
        "conntrack_half_open_entries",
        "Half-open connection-table entries in use (openers without a reply; a flood evicts only these)",
        half_open.clone(),
    );
    half_open
        .get_or_create(&vec![iface()])
        .set(r.conntrack.half_open_entries as i64);
    let half_open_size = Family::<Labels, Gauge>::default();
    registry.register(
        "conntrack_half_open_size",
        "Half-open connection-table capacity",
        half_open_size.clone(),
    );
    half_open_size
        .get_or_create(&vec![iface()])
        .set(r.conntrack.half_open_size as i64);
    let frags = Family::<Labels, Gauge>::default();
    registry.register(
        "fragment_entries",
        "Fragment-table entries in use (table: assured or other)",
        frags.clone(),
    );
    for (table, n) in [
        ("assured", r.fragments.assured_entries),
        ("other", r.fragments.other_entries),
    ] {
        frags
            .get_or_create(&vec![iface(), ("table".into(), table.into())])
            .set(n as i64);
    }

    let mut out = String::new();
    encode(&mut out, &registry).context("encoding metrics")?;
    Ok(out)
}

fn is_pass(reason_name: &str) -> bool {
    segbpf_common::reason::ALL
        .iter()
        .find(|&&c| segbpf_common::reason::name(c) == reason_name)
        .is_some_and(|&c| segbpf_common::reason::passes(c))
}

/// Binds the metrics address (before anything is applied, so a bad
/// address changes nothing).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics: binding {addr}"))
}

/// Serves the metrics (any path answers) until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, att: Attachment) -> anyhow::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("serving Prometheus metrics on http://{addr}/metrics");
    }
    loop {
        let (mut sock, _) = listener.accept().await?;
        let body = render(&att);
        // Read (and ignore) the request head; answer and close.
        let mut buf = [0u8; 1024];
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), sock.read(&mut buf)).await;
        let (status, ctype, body) = match body {
            Ok(b) => (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                b,
            ),
            Err(e) => (
                "500 Internal Server Error",
                "text/plain",
                format!("{e:#}\n"),
            ),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = sock.write_all(head.as_bytes()).await;
        let _ = sock.write_all(body.as_bytes()).await;
        let _ = sock.shutdown().await;
    }
}
