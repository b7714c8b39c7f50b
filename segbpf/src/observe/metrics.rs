//! Prometheus metrics (`segbpf attach --metrics ADDR`): per-rule packets
//! and bytes, packets and bytes per direction and reason, events emitted /
//! suppressed / lost, connection-table size and fill, and whether the
//! kernel runs segbpf's programs (`segbpf_attached{iface,hook}`). Counters are read
//! from the attachment's pinned maps on each scrape (the same numbers
//! `segbpf status --output json` shows) and encoded by `prometheus-client`.
//!
//! The server is hyper's HTTP/1 server on a thread and runtime of its own,
//! off the event path: a slow or hostile client never delays the event
//! stream or a reload. Connections are bounded ([`MAX_CONNECTIONS`]; more
//! are closed at once), a request head must arrive within
//! [`HEADER_TIMEOUT`], a connection lives at most [`CONNECTION_TIMEOUT`],
//! and only `GET /metrics` is answered (anything else: 404). The table fill
//! levels, which take a walk of each table, are sampled every
//! [`FILL_EVERY`] in the background, never by a scrape.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{attachment::maps::MapsError, attachment::pins::Attachment, observe::report};

/// At most this many connections at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 256;
/// Time a client has to send a request head (on every request of a kept-alive connection).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection may live, reads and writes included.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Server::bind`] waits for an address that is in use.
pub const BIND_WAIT: Duration = Duration::from_secs(3);

/// How often [`Server::bind`] tries an address in use again.
pub const BIND_RETRY: Duration = Duration::from_millis(100);

/// How often the connection and fragment tables' fill is sampled.
pub const FILL_EVERY: Duration = Duration::from_secs(10);

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address could not be bound.
    #[error("--metrics: binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The server thread could not start.
    #[error("starting the metrics server: {0}")]
    Start(std::io::Error),
    /// The counters could not be read.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// The text could not be encoded.
    #[error("encoding metrics: {0}")]
    Encode(#[from] std::fmt::Error),
}

/// Table fill levels, sampled in the background.
#[derive(Clone, Copy, Debug, Default)]
struct Fill {
    ct: u64,
    half_open: u64,
    frag_assured: u64,
    frag_other: u64,
}

type Labels = Vec<(String, String)>;

fn counter_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    registry.register(name, help, f.clone());
    f
}

/// The attachment's metrics in the Prometheus text format, counting the
/// tables' entries now.
pub fn render(att: &Attachment) -> Result<String, MetricsError> {
    let (ct, half_open, frag_assured, frag_other) = report::table_fill(att);
    render_with(
        att,
        Fill {
            ct,
            half_open,
            frag_assured,
            frag_other,
        },
    )
}

fn render_with(att: &Attachment, fill: Fill) -> Result<String, MetricsError> {
    let mut r = report::build(att, false)?;
    r.conntrack.entries = fill.ct;
    r.conntrack.half_open_entries = fill.half_open;
    r.fragments.assured_entries = fill.frag_assured;
    r.fragments.other_entries = fill.frag_other;
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
        // The rule's name, else its label (`roles.db.ingress[0]`): both
        // survive edits that move lines, so series keep their identity.
        let labels = vec![
            iface(),
            (
                "rule".into(),
                rule.name.clone().unwrap_or_else(|| rule.label.clone()),
            ),
            ("direction".into(), rule.direction.clone()),
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
    counter_family(
        &mut registry,
        "denied_lost",
        "Denied packets not attributed to an aggregate for the flow log (their bucket had another owner, or a flood was aggregated on a sample)",
    )
    .get_or_create(&vec![iface()])
    .inc_by(r.denied_lost);
    let ct = Family::<Labels, Gauge>::default();
    registry.register(
        "conntrack_entries",
        "Live flows in the assured connection table (expired entries not counted)",
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
        .set(i64::from(r.conntrack.size));
    let half_open = Family::<Labels, Gauge>::default();
    registry.register(
        "conntrack_half_open_entries",
        "Live flows in the half-open connection table (openers without a reply, closing flows; a flood evicts only these; expired entries not counted)",
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
        .set(i64::from(r.conntrack.half_open_size));
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

    let attached = Family::<Labels, Gauge>::default();
    registry.register(
        "attached",
        "Whether the kernel runs segbpf's program on the interface at this hook (1) or not (0: its link was detached)",
        attached.clone(),
    );
    for h in &r.links {
        attached
            .get_or_create(&vec![iface(), ("hook".into(), h.hook.into())])
            .set(i64::from(h.live));
    }
    let info = Family::<Labels, Gauge>::default();
    registry.register(
        "build_info",
        "The segbpf build serving these metrics (value 1)",
        info.clone(),
    );
    info.get_or_create(&vec![("version".into(), env!("CARGO_PKG_VERSION").into())])
        .set(1);
    let generation = Family::<Labels, Gauge>::default();
    registry.register(
        "policy_generation",
        "Generation of the policy in force (1 at attach, +1 per change)",
        generation.clone(),
    );
    if let Some(s) = &r.state {
        generation
            .get_or_create(&vec![iface()])
            .set(i64::try_from(s.generation).unwrap_or(i64::MAX));
    }
    if let Some(last) = &r.last_change {
        let ok = Family::<Labels, Gauge>::default();
        registry.register(
            "last_reload_success",
            "Whether the last policy change (reload, set, rollback, guard) was applied (1) or refused (0)",
            ok.clone(),
        );
        ok.get_or_create(&vec![iface()]).set(i64::from(last.ok));
        let at = Family::<Labels, Gauge>::default();
        registry.register(
            "last_reload_timestamp_seconds",
            "Unix time of the last policy change attempt",
            at.clone(),
        );
        at.get_or_create(&vec![iface()])
            .set(i64::try_from(last.at).unwrap_or(i64::MAX));
    }

    let mut out = String::new();
    encode(&mut out, &registry)?;
    Ok(out)
}

fn is_pass(reason_name: &str) -> bool {
    segbpf_common::reason::ALL
        .iter()
        .find(|&&c| segbpf_common::reason::name(c) == reason_name)
        .is_some_and(|&c| segbpf_common::reason::passes(c))
}

/// A bound metrics address, not serving yet.
#[derive(Debug)]
pub struct Server {
    listener: std::net::TcpListener,
}

impl Server {
    /// Binds the metrics address (before anything is applied, so a bad
    /// address changes nothing). An address in use is tried again every
    /// [`BIND_RETRY`] for up to [`BIND_WAIT`] (said once on stderr): a
    /// segbpf just detached or told to stop may hold it for a moment
    /// longer; then the error is that of the last try.
    pub async fn bind(addr: SocketAddr) -> Result<Server, MetricsError> {
        let deadline = std::time::Instant::now() + BIND_WAIT;
        let mut said = false;
        loop {
            match std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
            {
                Ok(listener) => return Ok(Server { listener }),
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && std::time::Instant::now() < deadline =>
                {
                    if !said {
                        tracing::info!(
                            "--metrics: {addr} is in use; waiting up to {} s for it (a segbpf that was just stopped may still hold it)",
                            BIND_WAIT.as_secs()
                        );
                        said = true;
                    }
                    tokio::time::sleep(BIND_RETRY).await;
                }
                Err(source) => return Err(MetricsError::Bind { addr, source }),
            }
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves `att`'s metrics from a thread of its own for as long as the
    /// process runs.
    pub fn start(self, att: Attachment) -> Result<(), MetricsError> {
        if let Some(addr) = self.local_addr() {
            tracing::info!("serving Prometheus metrics on http://{addr}/metrics");
        }
        std::thread::Builder::new()
            .name("segbpf-metrics".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match rt {
                    Ok(rt) => rt.block_on(serve(self.listener, att)),
                    Err(e) => tracing::error!("metrics server: {e}"),
                }
            })
            .map(drop)
            .map_err(MetricsError::Start)
    }
}

/// Answers requests from a task of its own, and samples the tables' fill
/// levels every [`FILL_EVERY`], until the process ends.
async fn serve(listener: std::net::TcpListener, att: Attachment) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("metrics server: {e}");
            return;
        }
    };
    let att = Arc::new(att);
    let fill = Arc::new(Mutex::new(Fill::default()));
    tokio::spawn(accept(listener, att.clone(), fill.clone()));
    let mut tick = tokio::time::interval(FILL_EVERY);
    loop {
        tick.tick().await;
        let (ct, half_open, frag_assured, frag_other) = report::table_fill(&att);
        if let Ok(mut f) = fill.lock() {
            *f = Fill {
                ct,
                half_open,
                frag_assured,
                frag_other,
            };
        }
    }
}

/// Accepts connections until the process ends.
async fn accept(listener: tokio::net::TcpListener, att: Arc<Attachment>, fill: Arc<Mutex<Fill>>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors or memory: back off, never spin.
                tracing::warn!("metrics server: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream); // at the limit: closed at once
            continue;
        };
        let (att, fill) = (att.clone(), fill.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (att, fill) = (att.clone(), fill.clone());
                async move { Ok::<_, Infallible>(answer(&req, &att, &fill)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(permit);
        });
    }
}

/// The response to one request: the metrics for `GET /metrics`, 404 else.
fn answer<B>(req: &Request<B>, att: &Attachment, fill: &Mutex<Fill>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(ctype),
        );
        r
    };
    if req.method() != Method::GET || req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into());
    }
    let sample = fill.lock().map(|f| *f).unwrap_or_default();
    match render_with(att, sample) {
        Ok(body) => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body,
        ),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
    }
}
