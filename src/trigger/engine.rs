//! The engine: every rule against every series it matches, firings out,
//! cooldown and hourly limits applied, and a read-out for self-metrics.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime};

use super::breach::{self, Cause, Skipped, Tracker};
use super::rules::{Condition, Rule, RuleError};
use super::series::{OutOfOrder, Series};
use crate::signals::{Point, SeriesKey};

/// A series is forgotten after this long without a point (or twice the
/// longest `silence`, if that is longer), so that series which are gone for
/// good, like those of a restarted process, free their place under the
/// series limit.
const MIN_SERIES_EXPIRY: Duration = Duration::from_secs(15 * 60);

const HOUR: Duration = Duration::from_secs(3600);

/// A rule fired: a capture should start.
#[derive(Debug, Clone, PartialEq)]
pub struct Firing {
    pub rule: String,
    /// The series that breached; `None` for a probe rule.
    pub series: Option<SeriesKey>,
    pub cause: Cause,
    /// The statistic's latest value, in `unit`. For a stall it may be below
    /// the threshold (the few requests that still completed), and it is
    /// `None` when there was nothing to measure: a stall with no
    /// completions, a failed probe.
    pub value: Option<f64>,
    /// The threshold, in `unit`. For a silence rule, the `silence`; `None`
    /// for a probe rule that breaches on failure only.
    pub threshold: Option<f64>,
    /// `s` for duration thresholds, silence and probes; `By` for sizes; the
    /// metric's own unit for a bare number; with `/s` for a rate.
    pub unit: String,
    /// When the breach began, as far as the evidence tells: at or before the
    /// start of the first breaching interval (see the `breach` module). A
    /// capture should cover from here.
    pub breach_start: SystemTime,
    pub fired_at: SystemTime,
    /// How long the capture should run.
    pub capture: Duration,
    /// The `process.pid` resource attribute of the series, if it has one.
    pub target_pid: Option<u32>,
}

/// Counts of one rule, for self-metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleCounters {
    pub fired: u64,
    /// Breaches that held but fell within `cooldown` of the last firing
    /// (each counted once, however long it kept trying).
    pub suppressed_cooldown: u64,
    /// Breaches that held but found `max_per_hour` used up.
    pub suppressed_hourly: u64,
    /// Points whose unit the threshold cannot be compared with (a duration
    /// threshold on a metric in bytes).
    pub unit_mismatches: u64,
    /// Points the statistic does not apply to (p99 of a gauge, the mean of
    /// a histogram sent without its sum).
    pub unsupported_points: u64,
}

/// One rule's state, for self-metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleStatus {
    pub rule: String,
    /// The latest value closest to firing among the rule's series (the
    /// highest for `above`, silence and probes, the lowest for `below`), in
    /// the rule's report unit; `None` before the first value.
    pub value: Option<f64>,
    /// Some series is in breach now.
    pub in_breach: bool,
    /// Some breach has held for `for` and is still going on.
    pub firing: bool,
    pub counters: RuleCounters,
}

/// Counts of the engine, for self-metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineCounters {
    /// Series tracked now.
    pub series: usize,
    /// Points of new series refused because the series limit was reached.
    pub series_refused: u64,
    /// Series forgotten after a long silence.
    pub series_expired: u64,
    /// Points no rule is interested in.
    pub points_unmatched: u64,
    /// Points not newer than the previous point of their series, dropped.
    pub points_out_of_order: u64,
    /// Points that restarted their series (a new start time, a counter
    /// that went down).
    pub counter_resets: u64,
}

/// Evaluates trigger rules against metric points and probe results. Pure:
/// time is what the caller says it is.
#[derive(Debug)]
pub struct Engine {
    rules: Vec<RuleState>,
    series: HashMap<SeriesKey, Tracked>,
    max_series: usize,
    series_expiry: Duration,
    counters: EngineCounters,
}

#[derive(Debug)]
struct RuleState {
    rule: Rule,
    counters: RuleCounters,
    last_fired: Option<SystemTime>,
    /// Firings of the last hour, oldest first.
    recent_firings: VecDeque<SystemTime>,
    /// For a probe rule, its one tracker.
    probe: Option<Tracker>,
}

#[derive(Debug)]
struct Tracked {
    series: Series,
    target_pid: Option<u32>,
    last_received: SystemTime,
    points_received: u64,
    /// One per rule that matches the series, by rule index.
    trackers: Vec<(usize, Tracker)>,
}

enum Suppression {
    Cooldown,
    Hourly,
}

impl Engine {
    /// An engine for these rules, tracking at most `max_series` series.
    /// Rule names should be unique (the config checks): a probe result goes
    /// to the first rule of its name.
    pub fn new(rules: Vec<Rule>, max_series: usize) -> Engine {
        let longest_silence = rules
            .iter()
            .filter_map(|rule| match &rule.condition {
                Condition::Silence(silence) => Some(silence.silence),
                _ => None,
            })
            .max()
            .unwrap_or_default();
        Engine {
            rules: rules
                .into_iter()
                .map(|rule| RuleState {
                    probe: matches!(rule.condition, Condition::Probe(_)).then(Tracker::default),
                    rule,
                    counters: RuleCounters::default(),
                    last_fired: None,
                    recent_firings: VecDeque::new(),
                })
                .collect(),
            series: HashMap::new(),
            max_series,
            series_expiry: MIN_SERIES_EXPIRY.max(longest_silence.saturating_mul(2)),
            counters: EngineCounters::default(),
        }
    }

    /// Takes one validated point, received at `received_at`.
    pub fn observe(&mut self, point: &Point, received_at: SystemTime) {
        if !self.series.contains_key(&point.series) {
            let matching: Vec<usize> = self
                .rules
                .iter()
                .enumerate()
                .filter(|(_, state)| watches(&state.rule.condition, &point.series))
                .map(|(index, _)| index)
                .collect();
            if matching.is_empty() {
                self.counters.points_unmatched += 1;
                return;
            }
            if self.series.len() >= self.max_series {
                self.counters.series_refused += 1;
                return;
            }
            let tracked = Tracked {
                series: Series::default(),
                target_pid: point
                    .series
                    .resource
                    .get("process.pid")
                    .and_then(|pid| pid.parse().ok()),
                last_received: received_at,
                points_received: 0,
                trackers: matching
                    .into_iter()
                    .map(|index| (index, Tracker::default()))
                    .collect(),
            };
            self.series.insert(point.series.clone(), tracked);
        }
        let Some(tracked) = self.series.get_mut(&point.series) else {
            return;
        };
        // Any point, even one dropped below, shows the source is alive.
        tracked.last_received = received_at;
        tracked.points_received += 1;
        for (index, tracker) in &mut tracked.trackers {
            if let Condition::Silence(_) = self.rules[*index].rule.condition {
                tracker.episode = None;
                tracker.value = Some(0.0);
            }
        }
        let accepted = match tracked.series.advance(point) {
            Ok(accepted) => accepted,
            Err(OutOfOrder) => {
                self.counters.points_out_of_order += 1;
                return;
            }
        };
        if accepted.reset {
            self.counters.counter_resets += 1;
        }
        for (index, tracker) in &mut tracked.trackers {
            let state = &mut self.rules[*index];
            let Condition::Metric(condition) = &state.rule.condition else {
                continue;
            };
            if accepted.reset {
                // A new process behind the series: its breach and its busy
                // rate are not this one's.
                *tracker = Tracker::default();
            }
            match breach::judge(condition, &accepted.sample, &point.unit, tracker) {
                Ok(()) => {}
                Err(Skipped::UnitMismatch) => state.counters.unit_mismatches += 1,
                Err(Skipped::Unsupported) => state.counters.unsupported_points += 1,
            }
        }
    }

    /// Takes the outcome of one probe of the named probe rule, sent at `at`:
    /// its latency, or why it failed.
    pub fn probe_result(
        &mut self,
        rule: &str,
        at: SystemTime,
        outcome: Result<Duration, String>,
    ) -> Result<(), RuleError> {
        let state = self
            .rules
            .iter_mut()
            .find(|state| state.rule.name == rule)
            .ok_or_else(|| RuleError::NoSuchProbe {
                rule: rule.to_string(),
            })?;
        match (&state.rule.condition, &mut state.probe) {
            (Condition::Probe(condition), Some(tracker)) => {
                breach::judge_probe(condition, at, outcome, tracker);
                Ok(())
            }
            _ => Err(RuleError::NoSuchProbe {
                rule: rule.to_string(),
            }),
        }
    }

    /// Judges silences at `now`, forgets long-gone series, and returns the
    /// firings due, earliest breach first.
    pub fn tick(&mut self, now: SystemTime) -> Vec<Firing> {
        let expiry = self.series_expiry;
        let before = self.series.len();
        self.series
            .retain(|_, tracked| elapsed(tracked.last_received, now) <= expiry);
        self.counters.series_expired += (before - self.series.len()) as u64;

        for tracked in self.series.values_mut() {
            // One point does not make a source that reports periodically.
            if tracked.points_received < 2 {
                continue;
            }
            for (index, tracker) in &mut tracked.trackers {
                if let Condition::Silence(condition) = &self.rules[*index].rule.condition {
                    breach::judge_silence(condition, tracked.last_received, now, tracker);
                }
            }
        }

        let mut due: Vec<(SystemTime, usize, Option<SeriesKey>)> = Vec::new();
        for (key, tracked) in &self.series {
            for (index, tracker) in &tracked.trackers {
                if let Some(episode) = tracker.episode.as_ref().filter(|episode| episode.ready) {
                    due.push((episode.breach_start, *index, Some(key.clone())));
                }
            }
        }
        for (index, state) in self.rules.iter().enumerate() {
            let probe_episode = state
                .probe
                .as_ref()
                .and_then(|tracker| tracker.episode.as_ref());
            if let Some(episode) = probe_episode.filter(|episode| episode.ready) {
                due.push((episode.breach_start, index, None));
            }
        }
        due.sort();

        let mut firings = Vec::new();
        for (_, index, key) in due {
            let RuleState {
                rule,
                counters,
                last_fired,
                recent_firings,
                probe,
            } = &mut self.rules[index];
            let admission = admit(rule, last_fired, recent_firings, now);
            let (tracker, target_pid) = match &key {
                Some(key) => {
                    let Some(tracked) = self.series.get_mut(key) else {
                        continue;
                    };
                    let target_pid = tracked.target_pid;
                    let Some((_, tracker)) =
                        tracked.trackers.iter_mut().find(|(rule, _)| *rule == index)
                    else {
                        continue;
                    };
                    (tracker, target_pid)
                }
                None => match probe {
                    Some(tracker) => (tracker, None),
                    None => continue,
                },
            };
            let Some(episode) = tracker.episode.as_mut() else {
                continue;
            };
            episode.ready = false;
            match admission {
                Ok(()) => {
                    episode.fired = true;
                    counters.fired += 1;
                    firings.push(Firing {
                        rule: rule.name.clone(),
                        series: key,
                        cause: episode.evidence.cause.clone(),
                        value: episode.evidence.value,
                        threshold: episode.evidence.threshold,
                        unit: episode.evidence.unit.clone(),
                        breach_start: episode.breach_start,
                        fired_at: now,
                        capture: rule.capture,
                        target_pid,
                    });
                }
                Err(suppression) => {
                    if !episode.suppressed {
                        episode.suppressed = true;
                        match suppression {
                            Suppression::Cooldown => counters.suppressed_cooldown += 1,
                            Suppression::Hourly => counters.suppressed_hourly += 1,
                        }
                    }
                }
            }
        }
        firings
    }

    /// Whether a tick may find something between points: a silence rule
    /// watching a series that has reported more than once (see
    /// [`Engine::tick`]). Breaches of thresholds and probes come with points
    /// and probe results; without a silence to judge, a tick only expires
    /// series.
    pub fn judges_silence(&self) -> bool {
        self.series.values().any(|tracked| {
            tracked.points_received >= 2
                && tracked.trackers.iter().any(|(index, _)| {
                    matches!(self.rules[*index].rule.condition, Condition::Silence(_))
                })
        })
    }

    /// Each rule's current value, state and counters, in rule order.
    pub fn status(&self) -> Vec<RuleStatus> {
        self.rules
            .iter()
            .enumerate()
            .map(|(index, state)| {
                let lowest_is_worst = matches!(
                    &state.rule.condition,
                    Condition::Metric(metric) if metric.comparison == super::Comparison::Below
                );
                let mut status = RuleStatus {
                    rule: state.rule.name.clone(),
                    value: None,
                    in_breach: false,
                    firing: false,
                    counters: state.counters,
                };
                let series_trackers = self.series.values().flat_map(|tracked| {
                    tracked
                        .trackers
                        .iter()
                        .filter(|(rule, _)| *rule == index)
                        .map(|(_, tracker)| tracker)
                });
                for tracker in series_trackers.chain(state.probe.iter()) {
                    if let Some(value) = tracker.value {
                        status.value = Some(match status.value {
                            None => value,
                            Some(worst) if lowest_is_worst => worst.min(value),
                            Some(worst) => worst.max(value),
                        });
                    }
                    if let Some(episode) = &tracker.episode {
                        status.in_breach = true;
                        status.firing |= episode.held;
                    }
                }
                status
            })
            .collect()
    }

    /// The engine's own counters.
    pub fn counters(&self) -> EngineCounters {
        EngineCounters {
            series: self.series.len(),
            ..self.counters
        }
    }
}

/// Whether a rule looks at a series at all.
fn watches(condition: &Condition, series: &SeriesKey) -> bool {
    match condition {
        Condition::Metric(metric) => metric.matchers.matches(series),
        Condition::Silence(silence) => silence.matchers.matches(series),
        Condition::Probe(_) => false,
    }
}

/// Lets a firing through `cooldown` and `max_per_hour`, and books it.
fn admit(
    rule: &Rule,
    last_fired: &mut Option<SystemTime>,
    recent_firings: &mut VecDeque<SystemTime>,
    now: SystemTime,
) -> Result<(), Suppression> {
    while recent_firings
        .front()
        .is_some_and(|&fired| elapsed(fired, now) >= HOUR)
    {
        recent_firings.pop_front();
    }
    if last_fired.is_some_and(|fired| elapsed(fired, now) < rule.cooldown) {
        return Err(Suppression::Cooldown);
    }
    if recent_firings.len() >= rule.max_per_hour as usize {
        return Err(Suppression::Hourly);
    }
    *last_fired = Some(now);
    recent_firings.push_back(now);
    Ok(())
}

/// Time from `earlier` to `now`; zero if the clock says `earlier` is later.
fn elapsed(earlier: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(earlier).unwrap_or_default()
}
