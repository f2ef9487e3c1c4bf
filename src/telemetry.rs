//! Self-metrics: every stage counts what it accepted, refused, sent and
//! failed, under `freezeframe_*`, served for Prometheus on `[telemetry]
//! listen` with `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

pub const CAPTURES: &str = "freezeframe_captures_total";
pub const CAPTURE_DURATION: &str = "freezeframe_capture_duration_seconds";
pub const CAPTURE_BLOCKED: &str = "freezeframe_capture_blocked_seconds_total";
pub const CAPTURE_SAMPLES: &str = "freezeframe_capture_samples";
pub const BPF_DROPS: &str = "freezeframe_bpf_drops_total";
pub const TRIGGER_VALUE: &str = "freezeframe_trigger_value";
pub const TRIGGER_FIRING: &str = "freezeframe_trigger_firing";
pub const TRIGGER_FIRED: &str = "freezeframe_trigger_fired_total";
pub const TRIGGER_SUPPRESSED: &str = "freezeframe_trigger_suppressed_total";
pub const SERIES: &str = "freezeframe_series";
pub const SERIES_REFUSED: &str = "freezeframe_series_refused_total";
pub const EXPORTS: &str = "freezeframe_export_total";
pub const SPOOL_BYTES: &str = "freezeframe_spool_bytes";
pub const SPOOL_FILES: &str = "freezeframe_spool_files";
pub const LINKED_REQUESTS: &str = "freezeframe_capture_linked_requests";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot install the Prometheus recorder: {0}")]
    Install(String),
    #[error("cannot listen on {addr} for /metrics: {source} (set [telemetry] listen)")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Installs the global metrics recorder. Histograms get explicit buckets, or
/// the exporter would render summaries.
pub fn install() -> Result<PrometheusHandle, TelemetryError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(CAPTURE_DURATION.into()),
            &[1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0],
        )
        .and_then(|builder| {
            builder.set_buckets_for_metric(
                Matcher::Full(CAPTURE_SAMPLES.into()),
                &[1.0, 10.0, 100.0, 1000.0, 10000.0],
            )
        })
        .and_then(|builder| {
            builder.set_buckets_for_metric(
                Matcher::Full(LINKED_REQUESTS.into()),
                &[0.0, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0],
            )
        })
        .map_err(|err| TelemetryError::Install(err.to_string()))?
        .install_recorder()
        .map_err(|err| TelemetryError::Install(err.to_string()))?;
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        CAPTURES,
        "Trigger firings by rule and what became of them (captured, coalesced, no_target, failed)."
    );
    describe_histogram!(
        CAPTURE_DURATION,
        Unit::Seconds,
        "Length of the off-CPU window each capture covered."
    );
    describe_counter!(
        CAPTURE_BLOCKED,
        Unit::Seconds,
        "Off-CPU time of the target's threads in all captures."
    );
    describe_histogram!(CAPTURE_SAMPLES, "Distinct thread stacks per capture.");
    describe_counter!(
        BPF_DROPS,
        "Events the BPF program had to drop, by the map that was full or failed."
    );
    describe_gauge!(
        TRIGGER_VALUE,
        "Latest value each rule compared with its threshold, in the rule's unit."
    );
    describe_gauge!(
        TRIGGER_FIRING,
        "1 while a rule's breach has held for `for` and goes on."
    );
    describe_counter!(TRIGGER_FIRED, "Firings of each rule.");
    describe_counter!(
        TRIGGER_SUPPRESSED,
        "Breaches not turned into firings, by reason (cooldown, max_per_hour)."
    );
    describe_gauge!(SERIES, "Metric series the trigger engine tracks.");
    describe_counter!(
        SERIES_REFUSED,
        "New series refused because the series limit was reached."
    );
    describe_counter!(
        EXPORTS,
        "OTLP profile exports by exporter and outcome (queued, delivered, partial, retried, rejected, dropped)."
    );
    describe_gauge!(
        SPOOL_BYTES,
        Unit::Bytes,
        "Bytes of export requests waiting in the delivery spool."
    );
    describe_gauge!(
        SPOOL_FILES,
        "Export requests waiting in the delivery spool."
    );
    describe_histogram!(
        LINKED_REQUESTS,
        "Requests (spans) each exported capture's samples were linked to."
    );
}

/// Whether the sidecar is ready: receivers listening and, when armed, the
/// probe attached.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct Served {
    handle: PrometheusHandle,
    readiness: Readiness,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`.
pub async fn serve(
    listen: SocketAddr,
    handle: PrometheusHandle,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<SocketAddr, TelemetryError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| TelemetryError::Listen {
            addr: listen,
            source,
        })?;
    let bound = listener
        .local_addr()
        .map_err(|source| TelemetryError::Listen {
            addr: listen,
            source,
        })?;
    let router = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_page))
        .with_state(Served { handle, readiness });
    tokio::spawn(async move {
        let server =
            axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned());
        if let Err(err) = server.await {
            tracing::error!("telemetry endpoint on {bound} failed: {err}");
        }
    });
    Ok(bound)
}

async fn metrics_page(State(served): State<Served>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        served.handle.render(),
    )
}

async fn ready_page(State(served): State<Served>) -> impl IntoResponse {
    if served.readiness.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}
