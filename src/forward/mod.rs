//! The forward stage: every OTLP request the receivers accept goes on, as
//! it was received, to an upstream Collector or backend (`[forward]`), so
//! that freezeframe can sit in the app's telemetry path without
//! swallowing the telemetry.
//!
//! What is forwarded is the request's protobuf bytes, not a re-encoding of
//! what ingest understood of them: unknown fields, exemplars and schema
//! URLs arrive upstream untouched. (An OTLP/JSON request is converted to
//! protobuf once, as the Collector would.)
//!
//! The app never waits for the upstream: a request joins a [`Queue`]
//! bounded in bytes, and a few workers send from it with the export
//! path's client and retry classification. When the queue is full the
//! oldest requests go first. Everything is counted in
//! `freezeframe_forward_total{signal,outcome}`: `queued`, `delivered`,
//! `partial` (the upstream took the request but refused some of its
//! items), `retried`, `rejected` (refused for good), `dropped` (pushed out
//! by the budget) and `unsent` (still held when the shutdown grace ran
//! out). The bytes held are in `freezeframe_forward_queue_bytes`.

pub mod queue;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::export::delivery::{deliver, Delivered};
use crate::export::otlp::settings::Section;
use crate::export::otlp::{Exporter, OtlpSettings};
use crate::export::retry::Backoff;
use crate::export::ExportError;
use crate::telemetry;
pub use queue::{Queue, Request};

/// `[forward]`, for resolving its OTLP settings.
pub const SECTION: Section = Section {
    name: "[forward]",
    endpoint_key: "endpoint",
    http_path: None,
};

/// Requests sent at once. One would cap throughput at one round trip per
/// request; a few keep the link busy without opening many connections.
const WORKERS: usize = 4;

/// Forwarded telemetry is worth most while fresh: retry sooner than the
/// profiles exporter does, as the budget drops what waits too long anyway.
const BACKOFF: Backoff = Backoff {
    initial: Duration::from_millis(500),
    max: Duration::from_secs(5),
};

/// Outcome labels of `freezeframe_forward_total`: the profile exports'
/// own, and `unsent`.
pub mod outcome {
    pub use crate::export::delivery::outcome::{
        DELIVERED, DROPPED, PARTIAL, QUEUED, REJECTED, RETRIED,
    };
    pub const UNSENT: &str = "unsent";
    pub const ALL: [&str; 7] = [
        QUEUED, DELIVERED, PARTIAL, RETRIED, REJECTED, DROPPED, UNSENT,
    ];
}

/// The resolved `[forward]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardConfig {
    /// The upstream; for HTTP a base URL that `/v1/metrics`, `/v1/traces`
    /// and `/v1/logs` are appended to.
    pub otlp: OtlpSettings,
    /// Bytes of requests held for the upstream at most.
    pub queue_max_bytes: usize,
}

impl ForwardConfig {
    /// The default `queue_max_bytes`: a minute of a busy app's telemetry.
    pub const DEFAULT_QUEUE_MAX_BYTES: usize = 64 << 20;
}

impl fmt::Display for ForwardConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "metrics, traces and logs over {}; queue up to {} bytes",
            self.otlp, self.queue_max_bytes
        )
    }
}

/// The signals forwarded, each with its own export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Metrics,
    Traces,
    Logs,
}

impl Signal {
    pub const ALL: [Signal; 3] = [Signal::Metrics, Signal::Traces, Signal::Logs];

    /// The `signal` label.
    pub fn label(self) -> &'static str {
        match self {
            Signal::Metrics => "metrics",
            Signal::Traces => "traces",
            Signal::Logs => "logs",
        }
    }

    fn grpc_path(self) -> &'static str {
        match self {
            Signal::Metrics => "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
            Signal::Traces => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            Signal::Logs => "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
        }
    }

    fn http_path(self) -> &'static str {
        match self {
            Signal::Metrics => "/v1/metrics",
            Signal::Traces => "/v1/traces",
            Signal::Logs => "/v1/logs",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Where the receivers hand accepted requests; cheap to clone.
#[derive(Clone)]
pub struct Forwarder {
    shared: Arc<Shared>,
}

impl fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forwarder")
            .field("endpoint", &self.shared.endpoint)
            .finish_non_exhaustive()
    }
}

/// The running workers, and what shutdown needs to stop them.
pub struct Forwarding {
    shared: Arc<Shared>,
    workers: JoinSet<()>,
    draining: CancellationToken,
    stop: CancellationToken,
}

struct Shared {
    state: Mutex<State>,
    wake: Notify,
    endpoint: String,
    max_bytes: usize,
}

struct State {
    queue: Queue,
    /// A send failed and none has succeeded since.
    failing: bool,
    /// The upstream refused a request for good and took none since.
    rejecting: bool,
    /// Requests given up on at shutdown.
    unsent: u64,
    /// Requests dropped since the queue last ran empty; the first drop of
    /// a run is logged, the total once the queue catches up.
    dropped_since_empty: u64,
}

impl Forwarding {
    /// Starts the workers on the current tokio runtime. Connects only when
    /// first used, so an upstream that is down does not stop the sidecar.
    pub fn start(config: &ForwardConfig) -> Result<Self, ExportError> {
        let base = Exporter::new(&config.otlp)?;
        let base_url = config.otlp.endpoint.trim_end_matches('/');
        let exporters = Signal::ALL
            .iter()
            .map(|signal| {
                base.calling(
                    signal.grpc_path(),
                    &format!("{base_url}{}", signal.http_path()),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let exporters: Arc<[Exporter]> = exporters.into();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: Queue::new(config.queue_max_bytes),
                failing: false,
                rejecting: false,
                unsent: 0,
                dropped_since_empty: 0,
            }),
            wake: Notify::new(),
            endpoint: config.otlp.endpoint.clone(),
            max_bytes: config.queue_max_bytes,
        });
        let draining = CancellationToken::new();
        let stop = CancellationToken::new();
        let mut workers = JoinSet::new();
        for _ in 0..WORKERS {
            workers.spawn(work(
                Arc::clone(&shared),
                Arc::clone(&exporters),
                draining.clone(),
                stop.clone(),
            ));
        }
        shared.publish(&shared.lock());
        Ok(Forwarding {
            shared,
            workers,
            draining,
            stop,
        })
    }

    /// The handle the receivers forward through.
    pub fn forwarder(&self) -> Forwarder {
        Forwarder {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Call once the receivers have stopped: sends what is held for up to
    /// `grace`, then stops and counts what is left as `unsent`.
    pub async fn finish(mut self, grace: Duration) {
        self.draining.cancel();
        let drained = tokio::time::timeout(grace, async {
            while self.workers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            // Requests in flight end as unsent when their worker stops.
            self.stop.cancel();
            while self.workers.join_next().await.is_some() {}
        }
        let mut state = self.shared.lock();
        for request in state.queue.drain() {
            count(request.signal, outcome::UNSENT);
            state.unsent += 1;
        }
        self.shared.publish(&state);
        if state.unsent > 0 {
            tracing::warn!(
                unsent = state.unsent,
                endpoint = %self.shared.endpoint,
                "forwarding stopped after {} with requests not yet sent; they are lost",
                humantime::format_duration(grace)
            );
        }
    }
}

impl Forwarder {
    /// Queues a request for the upstream. Never waits: when the queue is
    /// full the oldest requests are dropped to make room.
    pub fn submit(&self, signal: Signal, body: Bytes) {
        let mut state = self.shared.lock();
        let dropped = state.queue.push(Request { signal, body });
        count(signal, outcome::QUEUED);
        for request in &dropped {
            count(request.signal, outcome::DROPPED);
        }
        if !dropped.is_empty() {
            if state.dropped_since_empty == 0 {
                tracing::warn!(
                    endpoint = %self.shared.endpoint,
                    "the forward queue is full ([forward] queue_max_bytes = {}): dropping the oldest requests until the upstream catches up",
                    self.shared.max_bytes
                );
            }
            state.dropped_since_empty += dropped.len() as u64;
        }
        self.shared.publish(&state);
        drop(state);
        self.shared.wake.notify_one();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every await-free step; a panic
        // elsewhere while holding the lock leaves nothing half-done.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn publish(&self, state: &State) {
        metrics::gauge!(telemetry::FORWARD_QUEUE_BYTES).set(state.queue.held_bytes() as f64);
    }

    fn take(&self) -> Option<Request> {
        let mut state = self.lock();
        let taken = state.queue.take();
        if taken.is_none() && state.dropped_since_empty > 0 {
            tracing::info!(
                endpoint = %self.endpoint,
                dropped = state.dropped_since_empty,
                "the forward queue has caught up; requests were dropped while it was full"
            );
            state.dropped_since_empty = 0;
        }
        taken
    }

    fn failed(&self, reason: &str) {
        let mut state = self.lock();
        if !state.failing {
            state.failing = true;
            tracing::warn!(
                endpoint = %self.endpoint,
                "cannot forward the app's telemetry, will retry and queue meanwhile: {reason}"
            );
        }
    }

    fn done(&self, request: &Request, delivered: Option<Delivered>) {
        let mut state = self.lock();
        state.queue.sent(request);
        let outcome = match delivered {
            Some(Delivered::Accepted { rejected, message }) => {
                if state.failing || state.rejecting {
                    tracing::info!(endpoint = %self.endpoint, "forwarding again");
                }
                state.failing = false;
                state.rejecting = false;
                if rejected > 0 {
                    tracing::debug!(
                        signal = request.signal.label(),
                        rejected,
                        "the upstream refused part of a forwarded request: {message}"
                    );
                    outcome::PARTIAL
                } else {
                    outcome::DELIVERED
                }
            }
            Some(Delivered::Rejected { reason }) => {
                // A misconfigured upstream refuses everything: say so once.
                if !state.rejecting {
                    state.rejecting = true;
                    tracing::warn!(
                        signal = request.signal.label(),
                        bytes = request.body.len(),
                        endpoint = %self.endpoint,
                        "the upstream refuses forwarded requests for good, dropping them: {reason}"
                    );
                }
                outcome::REJECTED
            }
            None => {
                state.unsent += 1;
                outcome::UNSENT
            }
        };
        count(request.signal, outcome);
        self.publish(&state);
    }
}

fn count(signal: Signal, outcome: &'static str) {
    metrics::counter!(telemetry::FORWARDS, "signal" => signal.label(), "outcome" => outcome)
        .increment(1);
}

async fn work(
    shared: Arc<Shared>,
    exporters: Arc<[Exporter]>,
    draining: CancellationToken,
    stop: CancellationToken,
) {
    loop {
        let Some(request) = shared.take() else {
            if draining.is_cancelled() {
                return;
            }
            tokio::select! {
                () = shared.wake.notified() => {}
                () = draining.cancelled() => {}
                () = stop.cancelled() => return,
            }
            continue;
        };
        let exporter = &exporters[request.signal.index()];
        let on_retry = |reason: &str, _delay: Duration, _attempt: u32| {
            count(request.signal, outcome::RETRIED);
            shared.failed(reason);
        };
        let delivered = deliver(exporter, request.body.clone(), BACKOFF, &stop, on_retry).await;
        shared.done(&request, delivered);
    }
}
