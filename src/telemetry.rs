//! Self-metrics: every stage counts what it accepted, refused, sent and
//! failed, under `freezeframe_*`, served for Prometheus on `[telemetry]
//! listen` with `/healthz` and `/readyz`.
//!
//! Every series whose labels are known at start-up is registered at zero
//! then ([`register_startup_series`]). An absent series breaks `rate()`
//! and `increase()` over the first event (the step from "absent" to 1 is no
//! increase) and leaves dashboards with "no data" where "none yet" is meant.

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
pub const CAPTURE_START: &str = "freezeframe_capture_start_timestamp_seconds";
pub const BPF_DROPS: &str = "freezeframe_bpf_drops_total";
pub const TRIGGER_VALUE: &str = "freezeframe_trigger_value";
pub const TRIGGER_FIRING: &str = "freezeframe_trigger_firing";
pub const TRIGGER_FIRED: &str = "freezeframe_trigger_fired_total";
pub const TRIGGER_SUPPRESSED: &str = "freezeframe_trigger_suppressed_total";
pub const SERIES: &str = "freezeframe_series";
pub const SERIES_REFUSED: &str = "freezeframe_series_refused_total";
pub const TRIGGER_THRESHOLD: &str = "freezeframe_trigger_threshold";
pub const TRIGGER_SKIPPED: &str = "freezeframe_trigger_points_skipped_total";
pub const SYMBOLIZE_FRAMES: &str = "freezeframe_symbolize_frames_total";
pub const BUILD_INFO: &str = "freezeframe_build_info";

/// The ingest stage's counters, named here only to register them at zero;
/// `ingest::counters` counts them. The end-to-end test fails if traffic
/// brings up a name or label set that was not there at start-up, which is
/// what a drift between the two would look like.
const INGEST_POINTS: &str = "freezeframe_ingest_points_total";
const INGEST_REQUESTS: &str = "freezeframe_ingest_requests_total";
const INGEST_SPANS_DROPPED: &str = "freezeframe_ingest_spans_dropped_total";
const INGEST_SIGNALS: [&str; 2] = ["metrics", "traces"];
const INGEST_POINT_OUTCOMES: [&str; 3] = ["accepted", "rejected", "refused"];
const INGEST_TRANSPORTS: [&str; 2] = ["grpc", "http"];
const INGEST_REQUEST_OUTCOMES: [&str; 6] = [
    "accepted",
    "invalid",
    "too_large",
    "unsupported",
    "refused",
    "failed",
];

/// Reasons a breach did not become a firing (`TRIGGER_SUPPRESSED`).
pub const SUPPRESSION_REASONS: [&str; 2] = ["cooldown", "max_per_hour"];
/// Reasons a rule could not use a point (`TRIGGER_SKIPPED`).
pub const SKIP_REASONS: [&str; 2] = ["unit_mismatch", "unsupported"];
/// Frame kinds and lookup outcomes (`SYMBOLIZE_FRAMES`).
pub const FRAME_KINDS: [&str; 2] = ["kernel", "user"];
pub const FRAME_OUTCOMES: [&str; 2] = ["resolved", "unknown"];

/// Bucket bounds of `CAPTURE_DURATION`, in seconds: captures run from a
/// second (a short `capture` past a firing) to a couple of minutes (a long
/// history plus `capture`).
const CAPTURE_DURATION_BUCKETS: [f64; 9] = [1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0];
/// Bucket bounds of `CAPTURE_SAMPLES`: a quiet process has a handful of
/// distinct stacks, a thread pool thousands.
const CAPTURE_SAMPLES_BUCKETS: [f64; 5] = [1.0, 10.0, 100.0, 1000.0, 10000.0];
/// Bucket bounds of `LINKED_REQUESTS`: none, one request frozen, a pool's worth.
const LINKED_REQUESTS_BUCKETS: [f64; 7] = [0.0, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0];
pub const EXPORTS: &str = "freezeframe_export_total";
pub const SPOOL_BYTES: &str = "freezeframe_spool_bytes";
pub const UNWIND_TABLE_BYTES: &str = "freezeframe_unwind_table_bytes";
pub const SPOOL_FILES: &str = "freezeframe_spool_files";
pub const LINKED_REQUESTS: &str = "freezeframe_capture_linked_requests";
pub const FORWARDS: &str = "freezeframe_forward_total";
pub const FORWARD_QUEUE_BYTES: &str = "freezeframe_forward_queue_bytes";

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

/// Installs the global metrics recorder.
pub fn install() -> Result<PrometheusHandle, TelemetryError> {
    let handle = builder()?
        .install_recorder()
        .map_err(|err| TelemetryError::Install(err.to_string()))?;
    describe();
    Ok(handle)
}

/// The exporter's settings. Histograms get explicit buckets, or the
/// exporter would render summaries.
fn builder() -> Result<PrometheusBuilder, TelemetryError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(CAPTURE_DURATION.into()),
            &CAPTURE_DURATION_BUCKETS,
        )
        .and_then(|builder| {
            builder.set_buckets_for_metric(
                Matcher::Full(CAPTURE_SAMPLES.into()),
                &CAPTURE_SAMPLES_BUCKETS,
            )
        })
        .and_then(|builder| {
            builder.set_buckets_for_metric(
                Matcher::Full(LINKED_REQUESTS.into()),
                &LINKED_REQUESTS_BUCKETS,
            )
        })
        .map_err(|err| TelemetryError::Install(err.to_string()))
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        CAPTURE_START,
        Unit::Seconds,
        "Start of each rule's latest capture window, in seconds since the epoch (NaN before the first): \
         where Pyroscope indexes the profile, and where dashboards annotate the capture."
    );
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
        "Off-CPU time of the target's threads in all captures, in whole seconds (fractions carry over to the next capture)."
    );
    describe_histogram!(CAPTURE_SAMPLES, "Distinct thread stacks per capture.");
    describe_counter!(
        BPF_DROPS,
        "Events the BPF program had to drop, by the map that was full or failed."
    );
    describe_gauge!(
        TRIGGER_VALUE,
        "Latest value each rule compared with its threshold, in the rule's unit (s, By, or the metric's own); NaN before the first value."
    );
    describe_gauge!(
        TRIGGER_THRESHOLD,
        "Each rule's threshold, in the unit of freezeframe_trigger_value; NaN for a probe rule that only fires on failure."
    );
    describe_counter!(
        TRIGGER_SKIPPED,
        "Points a rule could not use, by reason: unit_mismatch (the threshold's unit does not fit the metric's) or unsupported (the statistic does not apply to the point)."
    );
    describe_counter!(
        SYMBOLIZE_FRAMES,
        "Distinct frames per capture, by kind (kernel, user) and lookup outcome (resolved, unknown: shown as [unknown] file+offset)."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which freezeframe is running."
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
        UNWIND_TABLE_BYTES,
        Unit::Bytes,
        "Bytes of unwind tables (.eh_frame, .debug_frame) loaded to unwind blocked threads' user stacks, shared across processes by build id."
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
    describe_counter!(
        FORWARDS,
        "OTLP requests forwarded upstream, by signal and outcome (queued, delivered, partial, retried, rejected, dropped, unsent)."
    );
    describe_gauge!(
        FORWARD_QUEUE_BYTES,
        Unit::Bytes,
        "Bytes of received requests held for the upstream, waiting or being sent."
    );
}

/// Label values that only the configuration or other stages know.
pub struct StartupLabels<'a> {
    /// Every configured rule's name.
    pub rules: &'a [String],
    /// Every outcome a firing can have (`CAPTURES`).
    pub capture_outcomes: &'a [&'static str],
    /// Every BPF map whose drops are counted (`BPF_DROPS`).
    pub bpf_maps: &'a [&'static str],
    /// The configured exporters' labels (none: no export) and every
    /// delivery outcome (`EXPORTS`).
    pub exporters: &'a [&'static str],
    pub export_outcomes: &'a [&'static str],
    /// Every forwarded signal and every forward outcome (`FORWARDS`), when
    /// forwarding is configured.
    pub forward: Option<(&'a [&'static str], &'a [&'static str])>,
}

/// Registers every series whose labels are known now, at zero (or NaN for
/// a value there is none of yet), so that Prometheus sees it from the first
/// scrape. Call once, after [`install`].
pub fn register_startup_series(labels: &StartupLabels) {
    use metrics::{counter, gauge, histogram};
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for &signal in &INGEST_SIGNALS {
        for &outcome in &INGEST_POINT_OUTCOMES {
            counter!(INGEST_POINTS, "signal" => signal, "outcome" => outcome).absolute(0);
        }
    }
    for &transport in &INGEST_TRANSPORTS {
        for &outcome in &INGEST_REQUEST_OUTCOMES {
            counter!(INGEST_REQUESTS, "transport" => transport, "outcome" => outcome).absolute(0);
        }
    }
    counter!(INGEST_SPANS_DROPPED).absolute(0);
    gauge!(SERIES).set(0.0);
    counter!(SERIES_REFUSED).absolute(0);
    for rule in labels.rules {
        // No value yet is not a value of 0: for a `below` rule, 0 would
        // read as a breach.
        gauge!(TRIGGER_VALUE, "rule" => rule.clone()).set(f64::NAN);
        gauge!(TRIGGER_FIRING, "rule" => rule.clone()).set(0.0);
        counter!(TRIGGER_FIRED, "rule" => rule.clone()).absolute(0);
        for &reason in &SUPPRESSION_REASONS {
            counter!(TRIGGER_SUPPRESSED, "rule" => rule.clone(), "reason" => reason).absolute(0);
        }
        for &reason in &SKIP_REASONS {
            counter!(TRIGGER_SKIPPED, "rule" => rule.clone(), "reason" => reason).absolute(0);
        }
        for &outcome in labels.capture_outcomes {
            counter!(CAPTURES, "rule" => rule.clone(), "outcome" => outcome).absolute(0);
        }
        gauge!(CAPTURE_START, "rule" => rule.clone()).set(f64::NAN);
    }
    // Registering a histogram makes it render, with empty buckets.
    drop(histogram!(CAPTURE_DURATION));
    drop(histogram!(CAPTURE_SAMPLES));
    counter!(CAPTURE_BLOCKED).absolute(0);
    gauge!(UNWIND_TABLE_BYTES).set(0.0);
    for &map in labels.bpf_maps {
        counter!(BPF_DROPS, "map" => map).absolute(0);
    }
    for &kind in &FRAME_KINDS {
        for &outcome in &FRAME_OUTCOMES {
            counter!(SYMBOLIZE_FRAMES, "kind" => kind, "outcome" => outcome).absolute(0);
        }
    }
    drop(histogram!(LINKED_REQUESTS));
    for &exporter in labels.exporters {
        for &outcome in labels.export_outcomes {
            counter!(EXPORTS, "exporter" => exporter, "outcome" => outcome).absolute(0);
        }
    }
    if !labels.exporters.is_empty() {
        gauge!(SPOOL_BYTES).set(0.0);
        gauge!(SPOOL_FILES).set(0.0);
    }
    if let Some((signals, outcomes)) = labels.forward {
        for &signal in signals {
            for &outcome in outcomes {
                counter!(FORWARDS, "signal" => signal, "outcome" => outcome).absolute(0);
            }
        }
        gauge!(FORWARD_QUEUE_BYTES).set(0.0);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The page a freshly started sidecar serves, before any data.
    fn startup_page() -> String {
        let recorder = builder().expect("valid buckets").build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe();
            register_startup_series(&StartupLabels {
                rules: &["slow".to_string()],
                capture_outcomes: &["captured", "failed"],
                bpf_maps: &["threads"],
                exporters: &["otlp_grpc"],
                export_outcomes: &["queued", "delivered"],
                forward: Some((&["logs"], &["dropped"])),
            });
        });
        handle.render()
    }

    #[test]
    fn every_metric_is_on_the_page_from_startup_with_help_and_type() {
        let page = startup_page();
        for (name, kind) in [
            (CAPTURES, "counter"),
            (CAPTURE_DURATION, "histogram"),
            (CAPTURE_BLOCKED, "counter"),
            (CAPTURE_SAMPLES, "histogram"),
            (CAPTURE_START, "gauge"),
            (BPF_DROPS, "counter"),
            (TRIGGER_VALUE, "gauge"),
            (TRIGGER_THRESHOLD, "gauge"),
            (TRIGGER_FIRING, "gauge"),
            (TRIGGER_FIRED, "counter"),
            (TRIGGER_SUPPRESSED, "counter"),
            (TRIGGER_SKIPPED, "counter"),
            (SERIES, "gauge"),
            (SERIES_REFUSED, "counter"),
            (SYMBOLIZE_FRAMES, "counter"),
            (BUILD_INFO, "gauge"),
            (FORWARDS, "counter"),
            (FORWARD_QUEUE_BYTES, "gauge"),
        ] {
            // The threshold is set by whoever knows the rules' units.
            if name == TRIGGER_THRESHOLD {
                continue;
            }
            assert!(page.contains(&format!("# HELP {name} ")), "{name}: {page}");
            assert!(
                page.contains(&format!("# TYPE {name} {kind}\n")),
                "{name}: {page}"
            );
        }
    }

    #[test]
    fn label_sets_known_at_startup_are_zero() {
        let page = startup_page();
        for line in [
            r#"freezeframe_captures_total{rule="slow",outcome="failed"} 0"#,
            r#"freezeframe_bpf_drops_total{map="threads"} 0"#,
            r#"freezeframe_trigger_firing{rule="slow"} 0"#,
            r#"freezeframe_trigger_suppressed_total{rule="slow",reason="max_per_hour"} 0"#,
            r#"freezeframe_symbolize_frames_total{kind="user",outcome="unknown"} 0"#,
            r#"freezeframe_capture_duration_seconds_bucket{le="+Inf"} 0"#,
            r#"freezeframe_forward_total{signal="logs",outcome="dropped"} 0"#,
            r#"freezeframe_forward_queue_bytes 0"#,
        ] {
            assert!(page.lines().any(|l| l == line), "{line} missing: {page}");
        }
        // No value is not a value of zero.
        assert!(page.contains(r#"freezeframe_trigger_value{rule="slow"} NaN"#));
    }

    #[test]
    fn histograms_render_as_histograms_with_our_buckets() {
        let page = startup_page();
        assert!(page.contains(r#"freezeframe_capture_duration_seconds_bucket{le="15"} 0"#));
        assert!(page.contains(r#"freezeframe_capture_samples_bucket{le="10000"} 0"#));
        assert!(!page.contains("quantile="));
    }
}
