//! Turns firings into captures: one capture per target at a time, each
//! asked of the flight recorder from the breach's start, symbolized while
//! the target lives, written out, logged in `captures.jsonl`, and handed to
//! the export stage.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::task::JoinSet;

use crate::capture::recorder::{CaptureRequest, Recorder};
use crate::export::files::{CaptureEvent, FileSink, Outcome, WindowRecord};
use crate::profile::{FrameKind, Profile};
use crate::symbolize::SymbolizerThread;
use crate::telemetry;
use crate::trigger::{Cause, Condition, Engine, EngineCounters, Firing, Rule, RuleStatus};

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
    symbolizer: Arc<SymbolizerThread>,
    exports: Exports,
    /// Targets being captured now.
    busy: Mutex<HashSet<u32>>,
    /// Off-CPU time of all captures so far. The counter takes whole
    /// seconds; summing nanoseconds here keeps sub-second captures from
    /// being rounded away one by one.
    blocked_ns: AtomicU64,
}

impl Captures {
    pub fn new(
        recorder: Arc<Recorder>,
        symbolizer: Arc<SymbolizerThread>,
        sink: FileSink,
        history: Duration,
        targets: Tracker,
        exports: Exports,
    ) -> Self {
        Captures {
            inner: Arc::new(Inner {
                recorder,
                sink,
                history,
                targets,
                symbolizer,
                exports,
                busy: Mutex::new(HashSet::new()),
                blocked_ns: AtomicU64::new(0),
            }),
            running: Arc::new(Mutex::new(JoinSet::new())),
        }
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
        let start = window.start;
        let (mut profile, address_space) = match self.symbolizer.profiles(window) {
            Ok(profiles) => (profiles.off_cpu, profiles.address_space),
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
        if let Some(address_space) = &address_space {
            if let Err(err) = self.sink.write_address_space(capture_id, address_space) {
                return failed(err.to_string());
            }
        }

        let blocked_ns = profile.total_value();
        let blocked_seconds = blocked_ns as f64 / 1e9;
        metrics::histogram!(telemetry::CAPTURE_DURATION).record(duration.as_secs_f64());
        metrics::histogram!(telemetry::CAPTURE_SAMPLES).record(profile.samples.len() as f64);
        let all_blocked_ns = self.blocked_ns.fetch_add(blocked_ns, Ordering::Relaxed) + blocked_ns;
        metrics::counter!(telemetry::CAPTURE_BLOCKED).absolute(all_blocked_ns / 1_000_000_000);
        for ((kind, outcome), frames) in frame_lookups(&profile) {
            metrics::counter!(telemetry::SYMBOLIZE_FRAMES, "kind" => kind, "outcome" => outcome)
                .increment(frames);
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
            address_space,
            process,
        };
        (event, Some(finished))
    }

    fn record(&self, event: CaptureEvent) {
        metrics::counter!(telemetry::CAPTURES, "rule" => event.rule.clone(), "outcome" => outcome_label(event.outcome))
            .increment(1);
        if let Some(window) = &event.window {
            let start = window
                .start
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            metrics::gauge!(telemetry::CAPTURE_START, "rule" => event.rule.clone())
                .set(start.as_secs_f64());
        }
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

/// Every outcome of a firing, for metrics registered at start-up.
pub const CAPTURE_OUTCOMES: [Outcome; 4] = [
    Outcome::Captured,
    Outcome::Coalesced,
    Outcome::NoTarget,
    Outcome::Failed,
];

/// An outcome's `outcome` label: the word `captures.jsonl` uses too.
pub fn outcome_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Captured => "captured",
        Outcome::Coalesced => "coalesced",
        Outcome::NoTarget => "no_target",
        Outcome::Failed => "failed",
    }
}

/// Distinct frames of a profile by `(kind, lookup outcome)`; a frame that
/// recurs in many stacks was looked up once. Marker frames are not lookups.
fn frame_lookups(profile: &Profile) -> Vec<((&'static str, &'static str), u64)> {
    let mut seen = HashSet::new();
    let mut counts = std::collections::BTreeMap::new();
    for frame in profile.samples.iter().flat_map(|sample| &sample.stack) {
        let kind = match frame.kind {
            FrameKind::Kernel => "kernel",
            FrameKind::User => "user",
            FrameKind::Truncated | FrameKind::Detail => continue,
        };
        if !seen.insert((kind, frame.address)) {
            continue;
        }
        // The symbolizer names a miss `[unknown] file+0xoffset`.
        let outcome = if frame.function().starts_with("[unknown]") {
            "unknown"
        } else {
            "resolved"
        };
        *counts.entry((kind, outcome)).or_insert(0) += 1;
    }
    counts.into_iter().collect()
}

/// A rule's threshold in the unit of its reported value, for the
/// `freezeframe_trigger_threshold` gauge; NaN for a probe that only fires
/// on failure.
pub fn threshold_in_report_unit(rule: &Rule) -> f64 {
    match &rule.condition {
        Condition::Metric(metric) => metric.threshold.in_report_unit(),
        Condition::Silence(silence) => silence.silence.as_secs_f64(),
        Condition::Probe(probe) => probe.above.map_or(f64::NAN, |above| above.as_secs_f64()),
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

/// The rules' state as last published.
pub type PublishedStatus = Option<(Vec<RuleStatus>, EngineCounters)>;

/// Publishes each rule's state as gauges and counters, if it has changed
/// since `published`: the trigger loop asks ten times a second, and the
/// state moves far less often.
pub fn export_rule_status(engine: &Engine, published: &mut PublishedStatus) {
    let now = (engine.status(), engine.counters());
    if published.as_ref() == Some(&now) {
        return;
    }
    let (statuses, counters) = published.insert(now);
    for status in statuses.iter() {
        let rule = status.rule.clone();
        // NaN, not the last value, once the rule has none (its series expired).
        metrics::gauge!(telemetry::TRIGGER_VALUE, "rule" => rule.clone())
            .set(status.value.unwrap_or(f64::NAN));
        metrics::gauge!(telemetry::TRIGGER_FIRING, "rule" => rule.clone()).set(if status.firing {
            1.0
        } else {
            0.0
        });
        metrics::counter!(telemetry::TRIGGER_FIRED, "rule" => rule.clone())
            .absolute(status.counters.fired);
        metrics::counter!(telemetry::TRIGGER_SUPPRESSED, "rule" => rule.clone(), "reason" => "cooldown")
            .absolute(status.counters.suppressed_cooldown);
        metrics::counter!(telemetry::TRIGGER_SUPPRESSED, "rule" => rule.clone(), "reason" => "max_per_hour")
            .absolute(status.counters.suppressed_hourly);
        metrics::counter!(telemetry::TRIGGER_SKIPPED, "rule" => rule.clone(), "reason" => "unit_mismatch")
            .absolute(status.counters.unit_mismatches);
        metrics::counter!(telemetry::TRIGGER_SKIPPED, "rule" => rule, "reason" => "unsupported")
            .absolute(status.counters.unsupported_points);
    }
    metrics::gauge!(telemetry::SERIES).set(counters.series as f64);
    metrics::counter!(telemetry::SERIES_REFUSED).absolute(counters.series_refused);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Frame, Line, ProfileKind, Sample, SampleLabels};

    #[test]
    fn outcome_labels_are_the_words_of_captures_jsonl() {
        for outcome in CAPTURE_OUTCOMES {
            assert_eq!(
                serde_json::to_value(outcome).unwrap(),
                outcome_label(outcome),
                "{outcome:?}"
            );
        }
    }

    fn frame(kind: FrameKind, address: u64, function: &str) -> Frame {
        Frame {
            kind,
            address,
            mapping: None,
            lines: vec![Line {
                function: function.to_string(),
                file: None,
                line: None,
            }],
        }
    }

    #[test]
    fn frame_lookups_count_each_distinct_frame_once() {
        let stack = vec![
            frame(FrameKind::Kernel, 0xffff_1000, "schedule"),
            frame(FrameKind::Kernel, 0xffff_2000, "[unknown] 0xffff2000"),
            frame(FrameKind::User, 0x1000, "main"),
            frame(FrameKind::User, 0x2000, "[unknown] libfoo.so+0x2000"),
            Frame::marker_truncated(),
        ];
        let sample = Sample {
            stack,
            value: 1,
            count: 1,
            labels: SampleLabels::default(),
            timeline: Vec::new(),
        };
        let profile = Profile {
            kind: ProfileKind::OffCpu,
            start: SystemTime::UNIX_EPOCH,
            duration: Duration::from_secs(1),
            samples: vec![sample.clone(), sample],
            mappings: Vec::new(),
            comments: Vec::new(),
        };
        assert_eq!(
            frame_lookups(&profile),
            vec![
                (("kernel", "resolved"), 1),
                (("kernel", "unknown"), 1),
                (("user", "resolved"), 1),
                (("user", "unknown"), 1),
            ]
        );
    }
}
