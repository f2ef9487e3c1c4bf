//! OTLP export (gRPC) of the requests' latency, as a histogram, and of the
//! requests themselves, as spans. Where to send and how often come from the
//! standard variables the SDK reads (`OTEL_EXPORTER_OTLP_ENDPOINT`,
//! `OTEL_METRIC_EXPORT_INTERVAL`, ...).

use std::env;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use opentelemetry::metrics::{Histogram, MeterProvider as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{MetricExporter, SpanExporter};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

/// The OTel semantic-convention histogram for database operations.
pub const METRIC: &str = "db.client.operation.duration";

/// Bucket boundaries, in seconds, fine from 100 µs to 10 s: a p99 computed
/// from bucket counts can only be as sharp as these are.
const BOUNDARIES: [f64; 23] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3,
    0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
];

/// The export interval when `OTEL_METRIC_EXPORT_INTERVAL` is unset (the
/// SDK's own default, 60 s, is far too coarse to see a freeze).
const DEFAULT_INTERVAL: Duration = Duration::from_millis(500);

const INTERVAL_VARIABLE: &str = "OTEL_METRIC_EXPORT_INTERVAL";

/// The attributes of every measurement and span.
pub fn attributes() -> Vec<KeyValue> {
    vec![
        KeyValue::new("db.system", "feeddb"),
        KeyValue::new("db.operation.name", "get"),
    ]
}

pub struct Telemetry {
    /// Runs tonic's connections; the exporters themselves run on the SDK's
    /// own threads.
    runtime: tokio::runtime::Runtime,
    meters: SdkMeterProvider,
    tracers: SdkTracerProvider,
    pub histogram: Histogram<f64>,
    pub tracer: SdkTracer,
}

impl Telemetry {
    pub fn start(service_name: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("feeddb-otlp")
            .enable_all()
            .build()
            .context("cannot start the async runtime for the OTLP exporters")?;
        // tonic's lazily connected channels belong to the runtime current
        // when they are built.
        let inside = runtime.enter();
        let resource = Resource::builder()
            .with_service_name(service_name.to_owned())
            .with_attribute(KeyValue::new("process.pid", i64::from(std::process::id())))
            .build();

        let metrics = MetricExporter::builder()
            .with_tonic()
            .build()
            .context("cannot build the OTLP metric exporter")?;
        let mut reader = PeriodicReader::builder(metrics);
        if env::var_os(INTERVAL_VARIABLE).is_none() {
            reader = reader.with_interval(DEFAULT_INTERVAL);
        }
        let meters = SdkMeterProvider::builder()
            .with_reader(reader.build())
            .with_resource(resource.clone())
            .build();
        let histogram = meters
            .meter("feeddb")
            .f64_histogram(METRIC)
            .with_unit("s")
            .with_description("Duration of the feed DB's get requests")
            .with_boundaries(BOUNDARIES.to_vec())
            .build();

        let spans = SpanExporter::builder()
            .with_tonic()
            .build()
            .context("cannot build the OTLP span exporter")?;
        let tracers = SdkTracerProvider::builder()
            .with_batch_exporter(spans)
            .with_resource(resource)
            .build();
        let tracer = tracers.tracer("feeddb");
        drop(inside);
        Ok(Telemetry {
            runtime,
            meters,
            tracers,
            histogram,
            tracer,
        })
    }

    /// Where the exporters send and how often, as the SDK resolves it.
    pub fn describe() -> String {
        let endpoint = |signal: &str| {
            env::var(format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))
                .or_else(|_| env::var("OTEL_EXPORTER_OTLP_ENDPOINT"))
                .unwrap_or_else(|_| "http://localhost:4317".to_owned())
        };
        let (metrics, traces) = (endpoint("METRICS"), endpoint("TRACES"));
        let interval = match env::var(INTERVAL_VARIABLE) {
            Ok(ms) => format!("{ms} ms ({INTERVAL_VARIABLE})"),
            Err(_) => format!("{} ms", DEFAULT_INTERVAL.as_millis()),
        };
        if metrics == traces {
            format!("OTLP/gRPC to {metrics}: {METRIC} every {interval}, spans in batches")
        } else {
            format!(
                "OTLP/gRPC: {METRIC} to {metrics} every {interval}, spans in batches to {traces}"
            )
        }
    }

    /// Flushes the last points and spans and stops the exporters, waiting
    /// at most `within`. Returns what failed, for a warning: the run's own
    /// figures stand regardless.
    pub fn shutdown(self, within: Duration) -> Vec<String> {
        let (done, wait) = mpsc::channel();
        let flush = thread::Builder::new()
            .name("feeddb-flush".to_owned())
            .spawn(move || {
                let mut failures = Vec::new();
                if let Err(err) = self.tracers.shutdown() {
                    failures.push(format!("spans: {err}"));
                }
                if let Err(err) = self.meters.shutdown() {
                    failures.push(format!("metrics: {err}"));
                }
                self.runtime.shutdown_timeout(Duration::from_millis(100));
                done.send(failures).ok();
            });
        if let Err(err) = flush {
            return vec![format!("cannot start the flushing thread: {err}")];
        }
        wait.recv_timeout(within).unwrap_or_else(|_| {
            vec![format!(
                "not done within {}; exiting without waiting longer",
                humantime::format_duration(within)
            )]
        })
    }
}
