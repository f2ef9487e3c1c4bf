//! Turns firings into captures: one capture per target at a time, each
//! asked of the flight recorder from the breach's start, symbolized while
//! the target lives, written out, logged in `captures.jsonl`, and handed to
//! the export stage.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::task::JoinSet;

use crate::capture::recorder::{CaptureRequest, Recorder};
use crate::export::files::{CaptureEvent, FileSink, Outcome, WindowRecord};
use crate::symbolize::SymbolizerThread;
use crate::telemetry;
use crate::trigger::{Cause, Engine, Firing};

use super::exports::{self, Exports, Finished};
use super::targets::Tracker;

#[derive(Clone)]
pub struct Captures {
    inner: Arc<Inner>,
    running: Arc<Mutex<JoinSet<()>>>,
}

struct Inner {
    recorder: Arc<Recorder>,
    sink: FileSink,
    history: Duration,
    targets: Tracker,
    symbolizer: SymbolizerThread,
    exports: Exports,
    /// Targets being captured now.
    busy: Mutex<HashSet<u32>>,
}

impl Captures {
    pub fn new(
        recorder: Arc<Recorder>,
        sink: FileSink,
        history: Duration,
        targets: Tracker,
        exports: Exports,
    ) -> std::io::Result<Self> {
        Ok(Captures {
            inner: Arc::new(Inner {
                recorder,
                sink,
                history,
                targets,
                symbolizer: SymbolizerThread::start()?,
                exports,
                busy: Mutex::new(HashSet::new()),
            }),
            running: Arc::new(Mutex::new(JoinSet::new())),
        })
    }

    /// Starts a capture for a firing, or records why there is none.
    pub fn fire(&self, firing: Firing) {
        let capture_id = FileSink::capture_id(&firing.rule, firing.fired_at);
        tracing::info!(rule = %firing.rule, cause = %describe(&firing), breach_start = %humantime::format_rfc3339_millis(firing.breach_start), "rule fired");
        let Some(pid) = self.inner.targets.resolve(&firing) else {
            self.inner.record(CaptureEvent::new(
                &capture_id,
                Outcome::NoTarget,
                &firing,
                None,
            ));
            return;
        };
        if !self.inner.busy.lock().expect("busy set").insert(pid) {
            // One capture per target: the running one already covers this.
            self.inner.record(CaptureEvent::new(
                &capture_id,
                Outcome::Coalesced,
                &firing,
                Some(pid),
            ));
            return;
        }
        let inner = Arc::clone(&self.inner);
        let mut running = self.running.lock().expect("running captures");
        // Forget captures that are done, so a long run keeps no backlog.
        while running.try_join_next().is_some() {}
        // Blocking: waiting on the recorder and symbolizing take seconds.
        running.spawn_blocking(move || {
            let (event, finished) = inner.capture(&capture_id, &firing, pid);
            inner.busy.lock().expect("busy set").remove(&pid);
            inner.record(event);
            if let Some(finished) = finished {
                inner.exports.submit(finished);
            }
        });
    }

    /// Cuts captures in flight short and waits until they are written.
    pub async fn finish(&self) {
        if let Err(err) = self.inner.recorder.flush() {
            tracing::warn!("cannot flush the flight recorder: {err}");
        }
        let mut running = std::mem::take(&mut *self.running.lock().expect("running captures"));
        while running.join_next().await.is_some() {}
    }
}

impl Inner {
    /// Captures, symbolizes and writes; the profile goes on to export.
    fn capture(
        &self,
        capture_id: &str,
        firing: &Firing,
        pid: u32,
    ) -> (CaptureEvent, Option<Finished>) {
        let failed = |error: String| (CaptureEvent::failed(capture_id, firing, pid, error), None);
        let now = SystemTime::now();
        // From the breach's start, as far back as the recorder remembers.
        let from = firing
            .breach_start
            .max(now - self.history)
            .min(firing.fired_at);
        let request = CaptureRequest {
            target: pid,
            from,
            until: firing.fired_at + firing.capture,
        };
        let window = self.recorder.capture(request).and_then(|answer| {
            answer
                .recv()
                .map_err(|_| crate::capture::recorder::RecorderError::Stopped)?
        });
        let window = match window {
            Ok(window) => window,
            Err(err) => return failed(err.to_string()),
        };
        let duration = window.duration;
        let (start, drops) = (window.start, window.drops);
        let mut profile = match self.symbolizer.profile(window) {
            Ok(profile) => profile,
            Err(err) => return failed(err.to_string()),
        };
        // Read now, while the target surely lives.
        let process = exports::process_facts(pid);
        profile
            .comments
            .push(format!("rule {}: {}", firing.rule, describe(firing)));
        profile.comments.push(format!(
            "breach start {}",
            humantime::format_rfc3339_millis(firing.breach_start)
        ));
        let directory = match self.sink.write_profile(capture_id, &profile) {
            Ok(directory) => directory,
            Err(err) => return failed(err.to_string()),
        };

        let blocked_seconds = profile.total_blocked_ns() as f64 / 1e9;
        metrics::histogram!(telemetry::CAPTURE_DURATION).record(duration.as_secs_f64());
        metrics::histogram!(telemetry::CAPTURE_SAMPLES).record(profile.samples.len() as f64);
        metrics::counter!(telemetry::CAPTURE_BLOCKED).increment(blocked_seconds.round() as u64);
        for (map, dropped) in drops.by_map() {
            metrics::counter!(telemetry::BPF_DROPS, "map" => map).absolute(dropped);
        }
        let mut event = CaptureEvent::new(capture_id, Outcome::Captured, firing, Some(pid));
        event.window = Some(WindowRecord {
            start,
            end: start + duration,
        });
        event.blocked_seconds = Some(blocked_seconds);
        event.directory = Some(directory);
        let finished = Finished {
            capture_id: capture_id.to_string(),
            firing: firing.clone(),
            profile,
            process,
        };
        (event, Some(finished))
    }

    fn record(&self, event: CaptureEvent) {
        let outcome = serde_json::to_value(event.outcome)
            .ok()
            .and_then(|value| value.as_str().map(str::to_owned));
        metrics::counter!(telemetry::CAPTURES, "rule" => event.rule.clone(), "outcome" => outcome.unwrap_or_default())
            .increment(1);
        match event.outcome {
            Outcome::Captured => {
                tracing::info!(capture = %event.capture_id, directory = ?event.directory, "capture written")
            }
            Outcome::Failed => {
                tracing::error!(capture = %event.capture_id, error = ?event.error, "capture failed")
            }
            outcome => tracing::info!(capture = %event.capture_id, ?outcome, "no capture"),
        }
        if let Err(err) = self.sink.append_event(&event) {
            tracing::error!("cannot log the capture event: {err}");
        }
    }
}

impl CaptureEvent {
    fn new(capture_id: &str, outcome: Outcome, firing: &Firing, target_pid: Option<u32>) -> Self {
        CaptureEvent {
            capture_id: capture_id.to_string(),
            outcome,
            rule: firing.rule.clone(),
            series: firing.series.clone(),
            value: firing.value,
            threshold: firing.threshold,
            unit: firing.unit.clone(),
            cause: describe(firing),
            breach_start: firing.breach_start,
            fired_at: firing.fired_at,
            target_pid,
            window: None,
            blocked_seconds: None,
            directory: None,
            error: None,
        }
    }

    fn failed(capture_id: &str, firing: &Firing, pid: u32, error: String) -> Self {
        let mut event = CaptureEvent::new(capture_id, Outcome::Failed, firing, Some(pid));
        event.error = Some(error);
        event
    }
}

/// A firing's cause, in words.
pub fn describe(firing: &Firing) -> String {
    let number = |value: Option<f64>| {
        value.map_or_else(|| "nothing".to_string(), |value| format!("{value:.4}"))
    };
    match &firing.cause {
        Cause::Threshold => format!(
            "value {} {} against threshold {} {}",
            number(firing.value),
            firing.unit,
            number(firing.threshold),
            firing.unit
        ),
        Cause::Stall { completions_per_second, busy_per_second } => format!(
            "completions stalled: {completions_per_second:.1}/s against a recent {busy_per_second:.1}/s"
        ),
        Cause::Silence => "the series stopped reporting".to_string(),
        Cause::ProbeFailed { error } => format!("probe failed: {error}"),
    }
}

/// Publishes each rule's state as gauges and counters.
pub fn export_rule_status(engine: &Engine) {
    for status in engine.status() {
        let rule = status.rule.clone();
        if let Some(value) = status.value {
            metrics::gauge!(telemetry::TRIGGER_VALUE, "rule" => rule.clone()).set(value);
        }
        metrics::gauge!(telemetry::TRIGGER_FIRING, "rule" => rule.clone()).set(if status.firing {
            1.0
        } else {
            0.0
        });
        metrics::counter!(telemetry::TRIGGER_FIRED, "rule" => rule.clone())
            .absolute(status.counters.fired);
        metrics::counter!(telemetry::TRIGGER_SUPPRESSED, "rule" => rule.clone(), "reason" => "cooldown")
            .absolute(status.counters.suppressed_cooldown);
        metrics::counter!(telemetry::TRIGGER_SUPPRESSED, "rule" => rule, "reason" => "max_per_hour")
            .absolute(status.counters.suppressed_hourly);
    }
    let counters = engine.counters();
    metrics::gauge!(telemetry::SERIES).set(counters.series as f64);
    metrics::counter!(telemetry::SERIES_REFUSED).absolute(counters.series_refused);
}
