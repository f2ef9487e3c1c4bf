//! Wires the stages into the sidecar (`freezeframe run`):
//! ingest -> trigger -> capture (flight recorder) -> symbolize -> export.
//!
//! Shutdown goes in the order data flows: the receivers stop first, the
//! trigger loop ends, captures in flight are cut short and written, held
//! captures are linked and spooled, delivery and forwarding get a last few
//! seconds, and the probe is detached last.

pub mod captures;
pub mod evidence;
pub mod exports;
pub mod probe;
pub mod targets;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::capture::recorder::{Recorder, RecorderConfig, WindowObserver};
use crate::capture::Window;
use crate::capture::{CaptureConfig, DropCounts};
use crate::config::{Config, Target};
use crate::export::delivery::Delivery;
use crate::export::files::FileSink;
use crate::export::otlp::http::HttpExporter;
use crate::export::retry::Backoff;
use crate::export::Exporter;
use crate::forward::{self, Forwarding};
use crate::ingest::{self, SpanStore};
use crate::signals::MetricBatch;
use crate::symbolize::SymbolizerThread;
use crate::telemetry::{self, Readiness};
use crate::trigger::{Condition, Engine};
use captures::Captures;
use evidence::ExemplarStore;
use exports::Exports;
use probe::ProbeTarget;

/// How often the flight recorder cuts a window: the resolution of a
/// capture's start.
const RECORDER_TICK: Duration = Duration::from_millis(500);
/// How soon rules are evaluated after points arrive, and how often while a
/// silence rule watches a live series.
const TRIGGER_TICK: Duration = Duration::from_millis(100);
/// How often otherwise: nothing then changes between points but the
/// expiry of series.
const IDLE_TRIGGER_TICK: Duration = Duration::from_secs(1);
/// Export requests waiting for the trigger loop; beyond this, receivers
/// answer "try later" rather than queue without bound.
const METRIC_QUEUE: usize = 256;
/// Series the trigger engine tracks at most.
const MAX_SERIES: usize = 10_000;
/// Finished spans kept for linking captures to the requests they froze.
const SPAN_CAPACITY: usize = 50_000;
const SPAN_RETENTION: Duration = Duration::from_secs(120);
/// Metric points whose exemplars are kept for linking, at most; each is a
/// handful of exemplars. Kept as long as spans.
const EXEMPLAR_POINTS: usize = 20_000;
/// At shutdown, how long delivery may go on once every capture is spooled;
/// what is not delivered by then is sent at the next start.
const DELIVERY_GRACE: Duration = Duration::from_secs(5);
/// At shutdown, how long the app's telemetry held for the upstream may
/// take to go out once the receivers have stopped; what is left is lost.
const FORWARD_GRACE: Duration = Duration::from_secs(5);
/// The `exporter` label of the capture spans' deliveries.
const TRACES_EXPORTER: &str = "otlp_traces";
/// Processes learned from `process.pid` resource attributes, at most.
const MAX_LEARNED_TARGETS: usize = 64;

/// Where a running sidecar listens, once it does.
#[derive(Debug, Clone, Copy)]
pub struct Listening {
    pub grpc: std::net::SocketAddr,
    pub http: std::net::SocketAddr,
    pub telemetry: std::net::SocketAddr,
}

/// Runs the sidecar until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<()> {
    run_until(config, shutdown_signal(), None).await
}

/// Runs the sidecar until `stop` completes, then shuts down in order. Once
/// every listener is bound, their addresses go to `listening` (an embedding
/// program may have asked for port 0).
pub async fn run_until(
    config: Config,
    stop: impl std::future::Future<Output = ()>,
    listening: Option<tokio::sync::oneshot::Sender<Listening>>,
) -> Result<()> {
    let handle = telemetry::install()?;
    ingest::describe_metrics();
    let rule_names: Vec<String> = config.rules.iter().map(|rule| rule.name.clone()).collect();
    let forward_signals = forward::Signal::ALL.map(forward::Signal::label);
    telemetry::register_startup_series(&telemetry::StartupLabels {
        rules: &rule_names,
        capture_outcomes: &captures::CAPTURE_OUTCOMES.map(captures::outcome_label),
        bpf_maps: &DropCounts::default().by_map().map(|(map, _)| map),
        exporters: &config
            .export
            .otlp
            .iter()
            .map(|otlp| otlp.protocol.exporter_label())
            .chain(config.export.traces.iter().map(|_| TRACES_EXPORTER))
            .collect::<Vec<_>>(),
        export_outcomes: &crate::export::delivery::outcome::ALL,
        forward: config
            .forward
            .as_ref()
            .map(|_| (forward_signals.as_slice(), forward::outcome::ALL.as_slice())),
    });
    for rule in &config.rules {
        metrics::gauge!(telemetry::TRIGGER_THRESHOLD, "rule" => rule.name.clone())
            .set(captures::threshold_in_report_unit(rule));
    }
    let readiness = Readiness::default();
    let shutdown = CancellationToken::new();
    let telemetry_addr = telemetry::serve(
        config.telemetry.listen,
        handle,
        readiness.clone(),
        shutdown.child_token(),
    )
    .await?;

    let sink = FileSink::new(&config.export.directory)?;
    // One symbolizer for the whole sidecar: it sees every window as it is
    // cut, and so names the frames of processes gone by capture time.
    let symbolizer =
        Arc::new(SymbolizerThread::start().context("cannot start the symbolizer thread")?);
    let learner = Arc::clone(&symbolizer);
    let recorder_config = RecorderConfig {
        mode: config.recorder.mode,
        history: config.recorder.history,
        tick: RECORDER_TICK,
        capture: CaptureConfig {
            min_block: config.recorder.min_block,
            min_address_change: config.recorder.min_allocation,
            unwind_threshold: config.recorder.unwind_threshold,
            shared_probe_dir: config.recorder.shared_probe_dir.clone(),
            ..CaptureConfig::default()
        },
        observer: Some(WindowObserver(Arc::new(move |window: &Window| {
            learner.learn(window.clone())
        }))),
    };
    let recorder = Arc::new(
        tokio::task::spawn_blocking(move || Recorder::start(recorder_config))
            .await?
            .context("cannot start the flight recorder")?,
    );
    let targets = targets::Tracker::new(config.target.clone(), Arc::clone(&recorder));
    targets
        .refresh()
        .context("cannot watch the configured target")?;

    let delivery = match &config.export.otlp {
        Some(otlp) => {
            let mut exporters = vec![(
                Exporter::new(otlp).context("cannot set up the exporter")?,
                otlp.protocol.exporter_label(),
            )];
            let spool = config.export.directory.join("spool");
            tracing::info!(spool = %spool.display(), "exporting profiles over {otlp}");
            if let Some(traces) = &config.export.traces {
                let exporter = HttpExporter::new(traces)
                    .context("cannot set up the capture spans' exporter")?;
                exporters.push((Exporter::Traces(Box::new(exporter)), TRACES_EXPORTER));
                tracing::info!("exporting capture spans over {traces}");
            }
            Some(
                Delivery::open(
                    &spool,
                    config.export.spool_max_bytes,
                    exporters,
                    Backoff::default(),
                    config.export.max_age,
                )
                .context("cannot start delivery")?,
            )
        }
        None => None,
    };

    let forwarding = match &config.forward {
        Some(forward) => {
            tracing::info!("forwarding the app's {forward}");
            Some(Forwarding::start(forward).context("cannot set up forwarding")?)
        }
        None => None,
    };

    let (metric_sender, mut metric_batches) = mpsc::channel::<MetricBatch>(METRIC_QUEUE);
    let spans = Arc::new(SpanStore::new(SPAN_CAPACITY, SPAN_RETENTION));
    let exemplars = Arc::new(ExemplarStore::new(EXEMPLAR_POINTS, SPAN_RETENTION));
    let exports = Exports::new(
        sink.clone(),
        Arc::clone(&spans),
        Arc::clone(&exemplars),
        config.export.link_grace,
        config.export.max_resource_attributes,
        delivery,
    );
    let receivers_stop = shutdown.child_token();
    let receivers = ingest::serve(
        config.receiver.clone(),
        ingest::Sinks {
            metrics: metric_sender,
            spans,
            forward: forwarding.as_ref().map(Forwarding::forwarder),
        },
        receivers_stop.clone(),
    )
    .await?;
    readiness.set_ready();
    tracing::info!(
        grpc = %receivers.grpc_addr(),
        http = %receivers.http_addr(),
        telemetry = %telemetry_addr,
        mode = ?config.recorder.mode,
        rules = config.rules.len(),
        "freezeframe is running"
    );
    if let Some(listening) = listening {
        // Whoever asked may have given up waiting; that is theirs to handle.
        let _ = listening.send(Listening {
            grpc: receivers.grpc_addr(),
            http: receivers.http_addr(),
            telemetry: telemetry_addr,
        });
    }

    let captures = Captures::new(
        Arc::clone(&recorder),
        symbolizer,
        sink,
        config.recorder.history,
        targets.clone(),
        exports.clone(),
    );
    let (probe_sender, mut probe_results) = mpsc::channel(64);
    for rule in &config.rules {
        if let Condition::Probe(condition) = &rule.condition {
            let target = ProbeTarget::parse(&condition.url).map_err(anyhow::Error::msg)?;
            let patience = condition
                .above
                .unwrap_or(condition.interval)
                .max(Duration::from_millis(10));
            let (name, interval, results, stop) = (
                rule.name.clone(),
                condition.interval,
                probe_sender.clone(),
                shutdown.child_token(),
            );
            tokio::spawn(async move {
                let mut every = tokio::time::interval(interval);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = every.tick() => {
                            let (at, outcome) = target.probe(patience).await;
                            if results.send((name.clone(), at, outcome)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    }
    drop(probe_sender);

    let mut engine = Engine::new(config.rules.clone(), MAX_SERIES);
    let mut learned: HashSet<u32> = HashSet::new();
    let mut last_tick = tokio::time::Instant::now();
    let mut next_tick = last_tick;
    let mut target_refresh = tokio::time::interval(Duration::from_secs(1));
    let mut published = None;
    let terminate = stop;
    tokio::pin!(terminate);
    loop {
        tokio::select! {
            _ = &mut terminate => break,
            Some(batch) = metric_batches.recv() => {
                for point in &batch.points {
                    engine.observe(point, batch.received_at);
                }
                exemplars.record(&batch);
                if config.target == Target::FromResource && learned.len() < MAX_LEARNED_TARGETS {
                    targets.learn_from(&batch, &mut learned);
                }
                next_tick = next_tick.min(last_tick + TRIGGER_TICK);
            }
            Some((rule, at, outcome)) = probe_results.recv() => {
                if let Err(err) = engine.probe_result(&rule, at, outcome) {
                    tracing::warn!("probe result for an unknown rule: {err}");
                }
                next_tick = next_tick.min(last_tick + TRIGGER_TICK);
            }
            _ = target_refresh.tick() => {
                if let Err(err) = targets.refresh() {
                    tracing::warn!("cannot watch the target: {err:#}");
                }
            }
            () = tokio::time::sleep_until(next_tick) => {
                for firing in engine.tick(SystemTime::now()) {
                    captures.fire(firing);
                }
                captures::export_rule_status(&engine, &mut published);
                // An idle sidecar wakes once a second, not ten times.
                last_tick = tokio::time::Instant::now();
                next_tick = last_tick
                    + if engine.judges_silence() {
                        TRIGGER_TICK
                    } else {
                        IDLE_TRIGGER_TICK
                    };
            }
        }
    }

    tracing::info!("shutting down: stopping receivers, then finishing captures in flight");
    receivers_stop.cancel();
    if let Err(err) = receivers.stopped().await {
        tracing::warn!("receivers stopped with an error: {err}");
    }
    // Forwarding drains while captures finish: neither waits for the other.
    let forwarded = async {
        if let Some(forwarding) = forwarding {
            forwarding.finish(FORWARD_GRACE).await;
        }
    };
    let finished = async {
        captures.finish().await;
        exports.finish(DELIVERY_GRACE).await;
    };
    tokio::join!(forwarded, finished);
    shutdown.cancel();
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
