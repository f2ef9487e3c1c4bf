//! Trigger rules: when a capture should start, and since when the problem
//! has been going on. Pure logic, with no I/O and no clock of its own.
//!
//! Points travel `series` (what happened between two points of a series)
//! → `stats` (quantiles, mean, min, max of an interval) → `breach` (is
//! it a breach, since when, has it held for `for`) → [`Engine`] (every rule
//! against every series it matches; cooldown and hourly limits; firings).
//! `rules` validates the `[[trigger]]` tables and `units` compares
//! "200ms" with a metric in `s` or `ms`.

mod breach;
mod engine;
mod rules;
mod series;
mod stats;
mod units;

pub use breach::Cause;
pub use engine::{Engine, EngineCounters, Firing, RuleCounters, RuleStatus};
pub use rules::{
    validate, Comparison, Condition, Matchers, MetricCondition, ProbeCondition, Rule, RuleConfig,
    RuleError, SilenceCondition, StallDetection, Statistic, ThresholdValue, DEFAULT_CAPTURE,
    DEFAULT_COOLDOWN, DEFAULT_MAX_PER_HOUR, DEFAULT_PROBE_INTERVAL, DEFAULT_STALL_BUSY_RATE,
    DEFAULT_STALL_FRACTION,
};
pub use units::{metric_unit, Dimension, Threshold, Unit};

#[cfg(test)]
mod tests;
