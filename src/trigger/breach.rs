//! Whether what a series or a probe just showed is a breach, since when the
//! breach has been going on, and whether it has held for long enough.
//!
//! Time here is the time of the evidence: a point's own timestamps, a
//! probe's send time and latency, a series' last arrival for silence. Every
//! observation covers a span: a histogram or sum point the interval since
//! the previous point, a probe from its sending to its answer, a gauge point
//! (or a failed probe) an instant. `for` runs from the start of the first
//! breaching span to the end of the latest one, so export jitter or a batch
//! of late points neither stretches nor shrinks it. An observation that does
//! not breach, or that has nothing to measure, ends the breach: it must be
//! *seen* to hold.
//!
//! The breach start a firing reports may be earlier than where `for` starts,
//! when the evidence says so: slow completions date it back by their
//! latency, and a stall by one interval (the collapse began somewhere in the
//! interval before the first empty one). The flight recorder captures from
//! there.

use std::time::{Duration, SystemTime};

use super::rules::{
    Comparison, MetricCondition, ProbeCondition, SilenceCondition, StallDetection, Statistic,
};
use super::series::{Change, Interval, Kind, Sample};
use super::units::{self, Dimension};

/// Why a rule fired.
#[derive(Debug, Clone, PartialEq)]
pub enum Cause {
    /// The statistic, or the probe's latency, crossed the threshold.
    Threshold,
    /// Completions collapsed in a series that was busy: its requests are stuck.
    Stall {
        completions_per_second: f64,
        /// The series' recent completion rate before this interval.
        busy_per_second: f64,
    },
    /// The series stopped reporting.
    Silence,
    /// The probe failed.
    ProbeFailed { error: String },
}

/// The time constant of a series' recent completion rate. Long enough that
/// a freeze of several seconds barely moves it (6 s take 10 % off), short
/// enough that a lasting drop in traffic becomes the new normal within
/// minutes rather than a stall for ever.
const BUSY_RATE_WINDOW_SECONDS: f64 = 60.0;

/// An interval is judged for a stall only if at least this many completions
/// were expected in it at the recent rate. Completions arrive roughly as a
/// Poisson process: with 10 expected, an interval with none happens by
/// chance once in 20 000; with 1 expected (2 per second at a 500 ms export
/// interval), one time in three.
const MIN_EXPECTED_COMPLETIONS: f64 = 10.0;

/// One rule's view of one series (or of its probe).
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    pub episode: Option<Episode>,
    /// Latest value, in the rule's report unit, for the read-out.
    pub value: Option<f64>,
    /// Recent completions per second, for stall detection.
    busy_rate: Option<f64>,
}

/// A breach from its first breaching observation to the first one that is not.
#[derive(Debug)]
pub(crate) struct Episode {
    /// Start of the first breaching observation: what `for` counts from.
    pub observed_since: SystemTime,
    /// End of the latest breaching observation.
    pub latest: SystemTime,
    /// `observed_since`, or earlier where the evidence dates the breach back.
    pub breach_start: SystemTime,
    /// What the latest breaching observation showed.
    pub evidence: Evidence,
    /// It has held for `for`.
    pub held: bool,
    /// Held, not fired, and seen breaching since the last tick: a firing
    /// may go out. Requiring fresh evidence keeps a suppressed breach of a
    /// series that has since gone quiet from firing long after the fact.
    pub ready: bool,
    pub fired: bool,
    /// Already counted as suppressed, which is counted once per episode.
    pub suppressed: bool,
}

/// What a breaching observation showed, in the rule's report unit.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Evidence {
    pub cause: Cause,
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    pub unit: String,
}

#[derive(Debug)]
struct Breach {
    evidence: Evidence,
    /// When the evidence says the breach began.
    began: SystemTime,
}

/// A point a rule could not judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Skipped {
    /// The threshold and the metric measure different things.
    UnitMismatch,
    /// The statistic does not exist for this kind of point.
    Unsupported,
}

impl Tracker {
    fn record(
        &mut self,
        breach: Option<Breach>,
        observed_from: SystemTime,
        observed_to: SystemTime,
        hold: Duration,
    ) {
        let Some(Breach { evidence, began }) = breach else {
            self.episode = None;
            return;
        };
        let episode = match &mut self.episode {
            Some(episode) => {
                episode.latest = episode.latest.max(observed_to);
                episode.breach_start = episode.breach_start.min(began);
                episode.evidence = evidence;
                episode
            }
            None => self.episode.insert(Episode {
                observed_since: observed_from,
                latest: observed_to,
                breach_start: began.min(observed_from),
                evidence,
                held: false,
                ready: false,
                fired: false,
                suppressed: false,
            }),
        };
        episode.held = episode.held
            || episode
                .latest
                .duration_since(episode.observed_since)
                .is_ok_and(|held_for| held_for >= hold);
        episode.ready = episode.held && !episode.fired;
    }

    /// Judges an interval's completions against the series' recent rate, and
    /// then folds them into that rate.
    fn stall(
        &mut self,
        detection: StallDetection,
        completions: u64,
        seconds: f64,
    ) -> Option<Cause> {
        if seconds <= 0.0 {
            return None;
        }
        let rate = completions as f64 / seconds;
        let recent = self.busy_rate;
        let weight = 1.0 - (-seconds / BUSY_RATE_WINDOW_SECONDS).exp();
        self.busy_rate = Some(recent.map_or(rate, |recent| recent + (rate - recent) * weight));
        let recent = recent?;
        let stalled = recent >= detection.busy_rate
            && recent * seconds >= MIN_EXPECTED_COMPLETIONS
            && (completions == 0 || rate < detection.fraction * recent);
        stalled.then_some(Cause::Stall {
            completions_per_second: rate,
            busy_per_second: recent,
        })
    }
}

/// What a statistic makes of one sample.
enum Measure {
    Value(f64),
    /// The interval holds nothing to measure (no completions, no time).
    Empty,
    /// The first point of a series: nothing to compare with yet.
    Pending,
}

fn measure(statistic: Statistic, sample: &Sample) -> Result<Measure, Skipped> {
    let interval = sample.interval.as_ref();
    match (statistic, sample.kind) {
        (Statistic::Value, _) => sample.level.map(Measure::Value).ok_or(Skipped::Unsupported),
        (Statistic::Rate, Kind::Gauge) => Err(Skipped::Unsupported),
        (Statistic::Rate, _) => Ok(match interval {
            None => Measure::Pending,
            Some(interval) if interval.seconds <= 0.0 => Measure::Empty,
            Some(Interval {
                seconds, change, ..
            }) => Measure::Value(match change {
                Change::Sum(growth) => growth / seconds,
                Change::Histogram(recorded) => recorded.count as f64 / seconds,
            }),
        }),
        (_, Kind::Histogram) => match interval.map(|interval| &interval.change) {
            None => Ok(Measure::Pending),
            Some(Change::Histogram(recorded)) => recorded
                .statistic(statistic)
                .map(|value| value.map_or(Measure::Empty, Measure::Value))
                .map_err(|_| Skipped::Unsupported),
            Some(Change::Sum(_)) => Err(Skipped::Unsupported),
        },
        _ => Err(Skipped::Unsupported),
    }
}

/// Judges one sample of a series (in `unit`) against a metric rule.
pub(crate) fn judge(
    condition: &MetricCondition,
    sample: &Sample,
    unit: &str,
    tracker: &mut Tracker,
) -> Result<(), Skipped> {
    // A histogram's rate counts completions, whatever the histogram measures.
    let counts_completions =
        condition.statistic == Statistic::Rate && sample.kind == Kind::Histogram;
    let metric_unit = if counts_completions {
        None
    } else {
        units::metric_unit(unit)
    };
    let threshold = condition
        .threshold
        .in_metric_unit(metric_unit)
        .ok_or(Skipped::UnitMismatch)?;
    let value = match measure(condition.statistic, sample)? {
        Measure::Pending => return Ok(()),
        Measure::Empty => None,
        Measure::Value(value) => Some(value),
    };
    let interval = sample
        .interval
        .as_ref()
        .filter(|_| condition.statistic != Statistic::Value);
    // Latencies recorded on completion: the case where a freeze hides and
    // slow completions tell how long ago it began.
    let latency = match (metric_unit, interval) {
        (Some(unit), Some(interval))
            if unit.dimension == Dimension::Time
                && condition.comparison == Comparison::Above
                && condition.statistic.is_of_recorded_values() =>
        {
            match &interval.change {
                Change::Histogram(recorded) => Some((unit, interval, recorded)),
                Change::Sum(_) => None,
            }
        }
        _ => None,
    };
    let stall = match (condition.stall, latency) {
        (Some(detection), Some((_, interval, recorded))) => {
            tracker.stall(detection, recorded.count, interval.seconds)
        }
        _ => None,
    };
    tracker.value = value.map(|value| condition.threshold.value_in_report_unit(value, metric_unit));
    let crossed = value.is_some_and(|value| condition.comparison.breaches(value, threshold));
    let cause = if crossed {
        Some(Cause::Threshold)
    } else {
        stall
    };
    let observed_from = interval.map_or(sample.time, |interval| interval.start);
    let breach = cause.map(|cause| {
        let mut began = observed_from;
        if let Some((unit, interval, recorded)) = latency {
            if let Some(slowest) = recorded.max() {
                began = began.min(earlier(interval.start, unit.seconds(slowest)));
            }
            if matches!(cause, Cause::Stall { .. }) {
                began = began.min(earlier(interval.start, interval.seconds));
            }
        }
        let symbol = match condition.threshold.unit {
            Some(own) => own.dimension.report_symbol(),
            None if counts_completions => "1",
            None => unit,
        };
        Breach {
            evidence: Evidence {
                cause,
                value: tracker.value,
                threshold: Some(condition.threshold.in_report_unit()),
                unit: if condition.statistic == Statistic::Rate {
                    format!("{symbol}/s")
                } else {
                    symbol.to_string()
                },
            },
            began,
        }
    });
    tracker.record(breach, observed_from, sample.time, condition.hold);
    Ok(())
}

/// `seconds` before `time`; `time` itself when that cannot be said.
fn earlier(time: SystemTime, seconds: f64) -> SystemTime {
    Duration::try_from_secs_f64(seconds)
        .ok()
        .and_then(|duration| time.checked_sub(duration))
        .unwrap_or(time)
}

/// Judges a probe result. `at` is when the probe was sent: a latency shows
/// the endpoint unanswering from then for that long, a failure only that it
/// failed.
pub(crate) fn judge_probe(
    condition: &ProbeCondition,
    at: SystemTime,
    outcome: Result<Duration, String>,
    tracker: &mut Tracker,
) {
    let (value, cause, answered) = match outcome {
        Err(error) => (None, Some(Cause::ProbeFailed { error }), at),
        Ok(latency) => {
            let slow = condition.above.is_some_and(|above| latency > above);
            (
                Some(latency.as_secs_f64()),
                slow.then_some(Cause::Threshold),
                at.checked_add(latency).unwrap_or(at),
            )
        }
    };
    tracker.value = value;
    let breach = cause.map(|cause| Breach {
        evidence: Evidence {
            cause,
            value,
            threshold: condition.above.map(|above| above.as_secs_f64()),
            unit: "s".to_string(),
        },
        began: at,
    });
    tracker.record(breach, at, answered, condition.hold);
}

/// Judges a series' silence at `now`. A silence breaches from the series'
/// last report, and needs no `for`: `silence` is its own.
pub(crate) fn judge_silence(
    condition: &SilenceCondition,
    last_report: SystemTime,
    now: SystemTime,
    tracker: &mut Tracker,
) {
    let silent_for = now.duration_since(last_report).unwrap_or_default();
    tracker.value = Some(silent_for.as_secs_f64());
    if silent_for <= condition.silence {
        return;
    }
    let breach = Breach {
        evidence: Evidence {
            cause: Cause::Silence,
            value: tracker.value,
            threshold: Some(condition.silence.as_secs_f64()),
            unit: "s".to_string(),
        },
        began: last_report,
    };
    tracker.record(Some(breach), last_report, now, Duration::ZERO);
}
