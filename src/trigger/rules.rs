//! Trigger rules: one `[[trigger]]` table of the config as written
//! ([`RuleConfig`]), and [`validate`], which turns it into a [`Rule`] or
//! says exactly which key of which rule is wrong and why.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::units::{Dimension, Threshold};
use crate::signals::{Attributes, SeriesKey};

/// How long a capture runs when the rule does not say.
pub const DEFAULT_CAPTURE: Duration = Duration::from_secs(15);
/// The least time between two firings of one rule, when the rule does not say.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(300);
/// Firings of one rule in any hour, when the rule does not say.
pub const DEFAULT_MAX_PER_HOUR: u32 = 4;
/// How often a probe runs, when the rule does not say.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Completions per second a series needs before a collapse counts as a stall.
pub const DEFAULT_STALL_BUSY_RATE: f64 = 1.0;
/// An interval completing fewer than this fraction of the recent rate is a stall.
pub const DEFAULT_STALL_FRACTION: f64 = 0.1;

/// One `[[trigger]]` table as written. Durations and thresholds stay text
/// here, so that [`validate`] can name the rule and the key it is unhappy with.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    pub metric: Option<String>,
    #[serde(default)]
    pub attributes: Attributes,
    #[serde(default)]
    pub resource: Attributes,
    pub statistic: Option<String>,
    pub above: Option<ThresholdValue>,
    pub below: Option<ThresholdValue>,
    #[serde(rename = "for")]
    pub hold: Option<String>,
    pub capture: Option<String>,
    pub cooldown: Option<String>,
    pub max_per_hour: Option<u32>,
    pub silence: Option<String>,
    pub probe: Option<String>,
    pub interval: Option<String>,
    /// `"breach"` or `"ignore"`: what a collapse of completions means.
    pub stall: Option<String>,
    pub stall_busy_rate: Option<f64>,
    pub stall_fraction: Option<f64>,
}

/// A threshold as TOML gives it: `"200ms"`, or a plain number (`0.2`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ThresholdValue {
    Number(f64),
    Text(String),
}

impl fmt::Display for ThresholdValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ThresholdValue::Number(number) => write!(f, "{number}"),
            ThresholdValue::Text(text) => write!(f, "{text:?}"),
        }
    }
}

/// Why a rule cannot be used. Every message names the rule.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuleError {
    /// A key has a value that cannot be used.
    #[error("trigger {rule:?}: `{key}` = {value}: {reason}")]
    Value {
        rule: String,
        key: &'static str,
        value: String,
        reason: String,
    },
    /// Keys are missing, or do not go together.
    #[error("trigger {rule:?}: {reason}")]
    Shape { rule: String, reason: String },
    /// A probe result was handed in for a rule that is not a probe rule.
    #[error("no probe rule named {rule:?}")]
    NoSuchProbe { rule: String },
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub condition: Condition,
    /// How long the capture a firing asks for should run.
    pub capture: Duration,
    /// The least time between two firings of this rule.
    pub cooldown: Duration,
    /// At most this many firings in any hour (a sliding hour).
    pub max_per_hour: u32,
}

/// What makes a rule fire.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    Metric(MetricCondition),
    Silence(SilenceCondition),
    Probe(ProbeCondition),
}

/// Which series a rule looks at. An absent metric or an empty map matches all.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Matchers {
    pub metric: Option<String>,
    pub attributes: Attributes,
    pub resource: Attributes,
}

impl Matchers {
    /// Whether the series has this metric name and every attribute listed.
    pub fn matches(&self, series: &SeriesKey) -> bool {
        self.metric
            .as_ref()
            .is_none_or(|name| *name == series.metric)
            && subset(&self.attributes, &series.attributes)
            && subset(&self.resource, &series.resource)
    }
}

fn subset(wanted: &Attributes, present: &Attributes) -> bool {
    wanted
        .iter()
        .all(|(key, value)| present.get(key) == Some(value))
}

/// A statistic of a series compared with a threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricCondition {
    /// `metric` is always set.
    pub matchers: Matchers,
    pub statistic: Statistic,
    pub comparison: Comparison,
    pub threshold: Threshold,
    /// How long the breach must hold before the rule fires (`for`).
    pub hold: Duration,
    /// `None` when stalls are ignored.
    pub stall: Option<StallDetection>,
}

/// What is computed from each point (or from the interval since the previous one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Statistic {
    /// A gauge's value, or a sum's.
    Value,
    /// Sum over count of the interval's histogram recordings.
    Mean,
    Max,
    Min,
    /// A quantile of the interval's recordings, as a percentage (99.9 for p999).
    Quantile {
        percent: f64,
    },
    /// Per second: a sum's increase, or a histogram's completions.
    Rate,
}

impl Statistic {
    /// Statistics of the values a histogram records, for which a collapse of
    /// completions hides a breach and slow completions date it.
    pub fn is_of_recorded_values(self) -> bool {
        matches!(
            self,
            Statistic::Mean | Statistic::Max | Statistic::Min | Statistic::Quantile { .. }
        )
    }

    fn parse(text: &str) -> Option<Statistic> {
        match text {
            "value" => Some(Statistic::Value),
            "mean" => Some(Statistic::Mean),
            "max" => Some(Statistic::Max),
            "min" => Some(Statistic::Min),
            "rate" => Some(Statistic::Rate),
            _ => parse_percentile(text.strip_prefix('p')?)
                .map(|percent| Statistic::Quantile { percent }),
        }
    }
}

/// `50` is 50 %, `999` is 99.9 %, `9999` is 99.99 %, `99.5` is 99.5 %. Forms
/// of three or more digits must start with 99, so that `p100` is refused
/// rather than read as 10.0 %.
fn parse_percentile(digits: &str) -> Option<f64> {
    let percent = if digits.contains('.') {
        digits.parse::<f64>().ok()?
    } else if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if digits.len() <= 2 {
            digits.parse::<f64>().ok()?
        } else if let Some(decimals) = digits.strip_prefix("99") {
            format!("99.{decimals}").parse::<f64>().ok()?
        } else {
            return None;
        }
    } else {
        return None;
    };
    (percent > 0.0 && percent < 100.0).then_some(percent)
}

impl fmt::Display for Statistic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Statistic::Value => write!(f, "value"),
            Statistic::Mean => write!(f, "mean"),
            Statistic::Max => write!(f, "max"),
            Statistic::Min => write!(f, "min"),
            Statistic::Quantile { percent } => write!(f, "p{percent}"),
            Statistic::Rate => write!(f, "rate"),
        }
    }
}

/// Which side of the threshold is a breach. Both are strict: a value equal
/// to the threshold does not breach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Above,
    Below,
}

impl Comparison {
    pub(crate) fn breaches(self, value: f64, threshold: f64) -> bool {
        match self {
            Comparison::Above => value > threshold,
            Comparison::Below => value < threshold,
        }
    }
}

/// When a collapse of completions counts as a breach (`stall = "breach"`).
///
/// A latency histogram records a request only when it completes, so during a
/// total freeze the interval has no recordings and no quantile. What the
/// freeze does leave is the count: an interval of a series that was busy
/// (its recent completion rate at least `busy_rate`) that completes nothing,
/// or fewer than `fraction` of that recent rate, is in breach.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StallDetection {
    /// Completions per second (`stall_busy_rate`).
    pub busy_rate: f64,
    /// `stall_fraction`, in `[0, 1)`; 0 means only a complete stop.
    pub fraction: f64,
}

/// A series that was reporting and went quiet (`silence`).
#[derive(Debug, Clone, PartialEq)]
pub struct SilenceCondition {
    pub matchers: Matchers,
    /// Fires once nothing has arrived for longer than this.
    pub silence: Duration,
}

/// An endpoint probed every `interval`; a failure breaches, and so does a
/// latency above `above` when it is set.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeCondition {
    /// `http://host[:port]/path` (a GET) or `tcp://host:port` (a connect),
    /// checked to be one of those.
    pub url: String,
    pub interval: Duration,
    pub above: Option<Duration>,
    pub hold: Duration,
}

/// Turns one `[[trigger]]` table into a rule, with defaults filled in.
/// (That names are unique across rules is for the caller to check.)
pub fn validate(config: RuleConfig) -> Result<Rule, RuleError> {
    let check = Checker { config: &config };
    if config.name.trim().is_empty() {
        return Err(check.shape("`name` must not be empty"));
    }
    let condition = match (&config.silence, &config.probe) {
        (Some(_), Some(_)) => {
            return Err(check.shape(
                "`silence` and `probe` make two different kinds of rule; define two triggers",
            ))
        }
        (Some(silence), None) => check.silence(silence)?,
        (None, Some(probe)) => check.probe(probe)?,
        (None, None) => check.metric()?,
    };
    let max_per_hour = config.max_per_hour.unwrap_or(DEFAULT_MAX_PER_HOUR);
    if max_per_hour == 0 {
        return Err(check.value(
            "max_per_hour",
            "0",
            "must be at least 1; to turn the rule off, remove it",
        ));
    }
    let capture = check.positive_duration("capture", config.capture.as_deref(), DEFAULT_CAPTURE)?;
    let cooldown = check.duration("cooldown", config.cooldown.as_deref(), DEFAULT_COOLDOWN)?;
    Ok(Rule {
        name: config.name,
        condition,
        capture,
        cooldown,
        max_per_hour,
    })
}

/// Builds the messages of [`validate`], each naming the rule.
struct Checker<'a> {
    config: &'a RuleConfig,
}

impl Checker<'_> {
    fn shape(&self, reason: impl Into<String>) -> RuleError {
        RuleError::Shape {
            rule: self.config.name.clone(),
            reason: reason.into(),
        }
    }

    fn value(
        &self,
        key: &'static str,
        value: impl fmt::Display,
        reason: impl Into<String>,
    ) -> RuleError {
        RuleError::Value {
            rule: self.config.name.clone(),
            key,
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    fn duration(
        &self,
        key: &'static str,
        text: Option<&str>,
        default: Duration,
    ) -> Result<Duration, RuleError> {
        match text {
            None => Ok(default),
            Some(text) => humantime::parse_duration(text).map_err(|error| {
                self.value(
                    key,
                    format!("{text:?}"),
                    format!("{error} (write a duration like \"500ms\", \"2s\" or \"5m\")"),
                )
            }),
        }
    }

    fn positive_duration(
        &self,
        key: &'static str,
        text: Option<&str>,
        default: Duration,
    ) -> Result<Duration, RuleError> {
        let duration = self.duration(key, text, default)?;
        if duration.is_zero() {
            return Err(self.value(
                key,
                format!("{:?}", text.unwrap_or("")),
                "must be longer than zero",
            ));
        }
        Ok(duration)
    }

    /// Refuses the first key present that this kind of rule does not use.
    fn refuse(&self, kind: &str, keys: &[(&str, bool)]) -> Result<(), RuleError> {
        match keys.iter().find(|(_, present)| *present) {
            Some((key, _)) => Err(self.shape(format!("`{key}` does not apply to {kind}"))),
            None => Ok(()),
        }
    }

    fn stall_keys(&self) -> [(&'static str, bool); 3] {
        [
            ("stall", self.config.stall.is_some()),
            ("stall_busy_rate", self.config.stall_busy_rate.is_some()),
            ("stall_fraction", self.config.stall_fraction.is_some()),
        ]
    }

    fn matchers(&self) -> Matchers {
        Matchers {
            metric: self.config.metric.clone(),
            attributes: self.config.attributes.clone(),
            resource: self.config.resource.clone(),
        }
    }

    fn metric(&self) -> Result<Condition, RuleError> {
        let config = self.config;
        if config.metric.is_none() {
            return Err(self.shape(
                "needs `metric` (an OTLP metric name), or `silence` or `probe` for the other \
                 kinds of rule",
            ));
        }
        self.refuse("a metric rule", &[("interval", config.interval.is_some())])?;
        let statistic =
            match &config.statistic {
                None => return Err(self.shape(
                    "needs `statistic` (value, mean, max, min, p50, p90, p95, p99, p999 or rate)",
                )),
                Some(text) => Statistic::parse(text).ok_or_else(|| {
                    self.value(
                        "statistic",
                        format!("{text:?}"),
                        "expected value, mean, max, min, rate or a percentile: pNN for NN %, \
                     p999 for 99.9 %, p99.5 for 99.5 %",
                    )
                })?,
            };
        let (comparison, key, written) =
            match (&config.above, &config.below) {
                (Some(_), Some(_)) => return Err(self.shape(
                    "has both `above` and `below`; a rule compares one way, so define two triggers",
                )),
                (None, None) => return Err(self.shape("needs `above` or `below`")),
                (Some(above), None) => (Comparison::Above, "above", above),
                (None, Some(below)) => (Comparison::Below, "below", below),
            };
        let threshold = match written {
            ThresholdValue::Number(number) if number.is_finite() => Threshold::bare(*number),
            ThresholdValue::Number(number) => {
                return Err(self.value(key, number, "expected a finite number"))
            }
            ThresholdValue::Text(text) => {
                Threshold::parse(text).map_err(|reason| self.value(key, written, reason))?
            }
        };
        Ok(Condition::Metric(MetricCondition {
            matchers: self.matchers(),
            statistic,
            comparison,
            threshold,
            hold: self.duration("for", config.hold.as_deref(), Duration::ZERO)?,
            stall: self.stall(statistic, comparison, threshold)?,
        }))
    }

    /// Stall detection is on by default wherever it can mean something: an
    /// `above` rule on a statistic of recorded values, whose threshold is a
    /// duration or a bare number (a size histogram has nothing to freeze).
    fn stall(
        &self,
        statistic: Statistic,
        comparison: Comparison,
        threshold: Threshold,
    ) -> Result<Option<StallDetection>, RuleError> {
        let config = self.config;
        let applies = comparison == Comparison::Above
            && statistic.is_of_recorded_values()
            && threshold
                .unit
                .is_none_or(|unit| unit.dimension == Dimension::Time);
        if !applies {
            return match self.stall_keys().iter().find(|(_, present)| *present) {
                Some((key, _)) => Err(self.shape(format!(
                    "`{key}` applies only to `above` rules on mean, max, min or a percentile \
                     of a latency histogram"
                ))),
                None => Ok(None),
            };
        }
        match config.stall.as_deref() {
            None | Some("breach") => {}
            Some("ignore") => {
                return match self.stall_keys()[1..].iter().find(|(_, present)| *present) {
                    Some((key, _)) => {
                        Err(self.shape(format!("`{key}` has no effect with `stall` = \"ignore\"")))
                    }
                    None => Ok(None),
                };
            }
            Some(other) => {
                return Err(self.value(
                    "stall",
                    format!("{other:?}"),
                    "expected \"breach\" or \"ignore\"",
                ))
            }
        }
        let busy_rate = config.stall_busy_rate.unwrap_or(DEFAULT_STALL_BUSY_RATE);
        if !(busy_rate.is_finite() && busy_rate > 0.0) {
            return Err(self.value(
                "stall_busy_rate",
                busy_rate,
                "must be a positive number of completions per second",
            ));
        }
        let fraction = config.stall_fraction.unwrap_or(DEFAULT_STALL_FRACTION);
        if !(0.0..1.0).contains(&fraction) {
            return Err(self.value(
                "stall_fraction",
                fraction,
                "must be at least 0 (only a complete stop) and below 1",
            ));
        }
        Ok(Some(StallDetection {
            busy_rate,
            fraction,
        }))
    }

    fn silence(&self, silence: &str) -> Result<Condition, RuleError> {
        let config = self.config;
        let mut refused = vec![
            ("statistic", config.statistic.is_some()),
            ("above", config.above.is_some()),
            ("below", config.below.is_some()),
            ("for", config.hold.is_some()),
            ("interval", config.interval.is_some()),
        ];
        refused.extend(self.stall_keys());
        self.refuse("a silence rule", &refused)?;
        Ok(Condition::Silence(SilenceCondition {
            matchers: self.matchers(),
            silence: self.positive_duration("silence", Some(silence), Duration::ZERO)?,
        }))
    }

    fn probe(&self, probe: &str) -> Result<Condition, RuleError> {
        let config = self.config;
        let mut refused = vec![
            ("metric", config.metric.is_some()),
            ("attributes", !config.attributes.is_empty()),
            ("resource", !config.resource.is_empty()),
            ("statistic", config.statistic.is_some()),
            ("below", config.below.is_some()),
        ];
        refused.extend(self.stall_keys());
        self.refuse("a probe rule", &refused)?;
        check_probe_url(probe)
            .map_err(|reason| self.value("probe", format!("{probe:?}"), reason))?;
        let above = match &config.above {
            None => None,
            Some(written) => {
                let threshold = match written {
                    ThresholdValue::Text(text) => Threshold::parse(text).ok(),
                    ThresholdValue::Number(_) => None,
                };
                let seconds = threshold
                    .filter(|threshold| {
                        threshold
                            .unit
                            .is_some_and(|unit| unit.dimension == Dimension::Time)
                    })
                    .map(|threshold| threshold.in_report_unit())
                    .ok_or_else(|| {
                        self.value(
                            "above",
                            written,
                            "a probe's threshold is a latency, like \"200ms\"",
                        )
                    })?;
                Some(Duration::from_secs_f64(seconds))
            }
        };
        Ok(Condition::Probe(ProbeCondition {
            url: probe.to_string(),
            interval: self.positive_duration(
                "interval",
                config.interval.as_deref(),
                DEFAULT_PROBE_INTERVAL,
            )?,
            above,
            hold: self.duration("for", config.hold.as_deref(), Duration::ZERO)?,
        }))
    }
}

fn check_probe_url(url: &str) -> Result<(), String> {
    if let Some(rest) = url.strip_prefix("http://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if authority.is_empty() {
            return Err("the URL has no host".to_string());
        }
        return Ok(());
    }
    if let Some(address) = url.strip_prefix("tcp://") {
        let (host, port) = address.rsplit_once(':').ok_or("expected tcp://host:port")?;
        if host.is_empty() || host.contains('/') {
            return Err("expected tcp://host:port".to_string());
        }
        return match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok(()),
            _ => Err(format!("`{port}` is not a TCP port")),
        };
    }
    Err("expected http://host[:port]/path or tcp://host:port (https is not supported)".to_string())
}

impl fmt::Display for Rule {
    /// One line, as `check-config` prints resolved rules.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}; capture {}, cooldown {}, at most {} per hour",
            self.name,
            self.condition,
            humantime::format_duration(self.capture),
            humantime::format_duration(self.cooldown),
            self.max_per_hour
        )
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Condition::Metric(metric) => {
                let side = match metric.comparison {
                    Comparison::Above => "above",
                    Comparison::Below => "below",
                };
                write!(f, "{} of {}", metric.statistic, metric.matchers)?;
                write!(
                    f,
                    " {side} {} for {}",
                    metric.threshold,
                    humantime::format_duration(metric.hold)
                )?;
                match metric.stall {
                    Some(stall) => write!(
                        f,
                        "; a stall (completions below {} of a recent rate of at least {}/s) \
                         breaches",
                        stall.fraction, stall.busy_rate
                    ),
                    None => write!(f, "; stalls ignored"),
                }
            }
            Condition::Silence(silence) => write!(
                f,
                "silence of {} for more than {}",
                silence.matchers,
                humantime::format_duration(silence.silence)
            ),
            Condition::Probe(probe) => {
                write!(
                    f,
                    "probe {} every {}, breaching on failure",
                    probe.url,
                    humantime::format_duration(probe.interval)
                )?;
                if let Some(above) = probe.above {
                    write!(f, " or latency above {}", humantime::format_duration(above))?;
                }
                write!(f, " for {}", humantime::format_duration(probe.hold))
            }
        }
    }
}

impl fmt::Display for Matchers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.metric.as_deref().unwrap_or("any metric"))?;
        for (label, attributes) in [
            ("attributes", &self.attributes),
            ("resource", &self.resource),
        ] {
            if !attributes.is_empty() {
                let pairs: Vec<String> = attributes
                    .iter()
                    .map(|(key, value)| format!("{key}={value:?}"))
                    .collect();
                write!(f, " {label} {{{}}}", pairs.join(", "))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Document {
        trigger: Vec<RuleConfig>,
    }

    fn parse(toml_text: &str) -> Vec<RuleConfig> {
        toml::from_str::<Document>(toml_text).unwrap().trigger
    }

    /// Validates one `[[trigger]]` table, given as its lines.
    fn rule(lines: &[&str]) -> Result<Rule, RuleError> {
        let configs = parse(&format!("[[trigger]]\n{}", lines.join("\n")));
        validate(configs.into_iter().next().unwrap())
    }

    fn message(lines: &[&str]) -> String {
        rule(lines).unwrap_err().to_string()
    }

    /// The message for a valid metric rule with `line` added.
    fn message_adding(line: &str) -> String {
        message(&[
            NAME,
            METRIC,
            r#"statistic = "max""#,
            r#"above = "1s""#,
            line,
        ])
    }

    const NAME: &str = r#"name = "r""#;
    const METRIC: &str = r#"metric = "m""#;

    #[test]
    fn the_design_example_validates_with_its_values_and_the_defaults() {
        let configs = parse(
            r#"
            [[trigger]]
            name = "feed-db-latency"
            metric = "db.client.operation.duration"
            attributes = { "db.system" = "feeddb" }
            resource = { "service.name" = "feed" }
            statistic = "p99"
            above = "200ms"
            for = "2s"
            capture = "15s"
            cooldown = "5m"
            max_per_hour = 4

            [[trigger]]
            name = "feed-silent"
            silence = "3s"

            [[trigger]]
            name = "health-probe"
            probe = "http://127.0.0.1:8080/health"
            interval = "500ms"
            above = "200ms"
            for = "2s"
            "#,
        );
        let rules: Vec<Rule> = configs
            .into_iter()
            .map(|config| validate(config).unwrap())
            .collect();
        let Condition::Metric(latency) = &rules[0].condition else {
            panic!("a metric rule")
        };
        assert_eq!(
            latency.matchers.metric.as_deref(),
            Some("db.client.operation.duration")
        );
        assert_eq!(latency.matchers.attributes["db.system"], "feeddb");
        assert_eq!(latency.matchers.resource["service.name"], "feed");
        assert_eq!(latency.statistic, Statistic::Quantile { percent: 99.0 });
        assert_eq!(latency.comparison, Comparison::Above);
        assert_eq!(latency.threshold.in_report_unit(), 0.2);
        assert_eq!(latency.hold, Duration::from_secs(2));
        assert_eq!(
            latency.stall,
            Some(StallDetection {
                busy_rate: DEFAULT_STALL_BUSY_RATE,
                fraction: DEFAULT_STALL_FRACTION,
            })
        );
        assert_eq!(
            rules[1],
            Rule {
                name: "feed-silent".to_string(),
                condition: Condition::Silence(SilenceCondition {
                    matchers: Matchers::default(),
                    silence: Duration::from_secs(3),
                }),
                capture: DEFAULT_CAPTURE,
                cooldown: DEFAULT_COOLDOWN,
                max_per_hour: DEFAULT_MAX_PER_HOUR,
            }
        );
        assert_eq!(
            rules[2].condition,
            Condition::Probe(ProbeCondition {
                url: "http://127.0.0.1:8080/health".to_string(),
                interval: Duration::from_millis(500),
                above: Some(Duration::from_millis(200)),
                hold: Duration::from_secs(2),
            })
        );
        assert_eq!(
            rules[0].to_string(),
            "feed-db-latency: p99 of db.client.operation.duration attributes \
             {db.system=\"feeddb\"} resource {service.name=\"feed\"} above 0.2 s for 2s; a stall \
             (completions below 0.1 of a recent rate of at least 1/s) breaches; capture 15s, \
             cooldown 5m, at most 4 per hour"
        );
    }

    #[test]
    fn statistics_and_percentiles_parse() {
        for (text, statistic) in [
            ("value", Statistic::Value),
            ("mean", Statistic::Mean),
            ("max", Statistic::Max),
            ("min", Statistic::Min),
            ("rate", Statistic::Rate),
            ("p50", Statistic::Quantile { percent: 50.0 }),
            ("p5", Statistic::Quantile { percent: 5.0 }),
            ("p95", Statistic::Quantile { percent: 95.0 }),
            ("p999", Statistic::Quantile { percent: 99.9 }),
            ("p9999", Statistic::Quantile { percent: 99.99 }),
            ("p995", Statistic::Quantile { percent: 99.5 }),
            ("p99.5", Statistic::Quantile { percent: 99.5 }),
        ] {
            assert_eq!(Statistic::parse(text), Some(statistic), "{text}");
        }
        for text in ["p100", "p0", "p", "p950", "p-1", "P99", "median", "p99x"] {
            assert_eq!(Statistic::parse(text), None, "{text}");
        }
    }

    #[test]
    fn a_threshold_may_be_a_toml_number() {
        let rule = rule(&[NAME, METRIC, r#"statistic = "value""#, r#"below = 3"#]).unwrap();
        let Condition::Metric(metric) = rule.condition else {
            panic!("a metric rule")
        };
        assert_eq!(metric.threshold, Threshold::bare(3.0));
        assert_eq!(metric.comparison, Comparison::Below);
        assert_eq!(metric.stall, None, "stalls concern `above` rules");
        assert_eq!(metric.hold, Duration::ZERO);
    }

    #[test]
    fn bad_values_name_the_rule_the_key_and_the_reason() {
        assert!(message(&[
            r#"name = "feed-db-latency""#,
            METRIC,
            r#"statistic = "p99""#,
            r#"above = "200 parsecs""#
        ])
        .starts_with(
            "trigger \"feed-db-latency\": `above` = \"200 parsecs\": unknown unit `parsecs`"
        ));
        assert_eq!(
            message(&[NAME, METRIC, r#"statistic = "p100""#, r#"above = "1s""#]),
            "trigger \"r\": `statistic` = \"p100\": expected value, mean, max, min, rate or a \
             percentile: pNN for NN %, p999 for 99.9 %, p99.5 for 99.5 %"
        );
        assert!(message_adding(r#"for = "soon""#).starts_with("trigger \"r\": `for` = \"soon\": "));
        assert_eq!(
            message_adding(r#"max_per_hour = 0"#),
            "trigger \"r\": `max_per_hour` = 0: must be at least 1; to turn the rule off, remove it"
        );
        assert_eq!(
            message_adding(r#"capture = "0s""#),
            "trigger \"r\": `capture` = \"0s\": must be longer than zero"
        );
        assert_eq!(
            message_adding(r#"stall = "panic""#),
            "trigger \"r\": `stall` = \"panic\": expected \"breach\" or \"ignore\""
        );
        assert_eq!(
            message_adding(r#"stall_fraction = 1.5"#),
            "trigger \"r\": `stall_fraction` = 1.5: must be at least 0 (only a complete stop) \
             and below 1"
        );
        assert!(
            message(&[r#"name = "p""#, r#"probe = "https://example.com/""#])
                .starts_with("trigger \"p\": `probe` = \"https://example.com/\": expected http://")
        );
        assert_eq!(
            message(&[r#"name = "p""#, r#"probe = "tcp://db:99999""#]),
            "trigger \"p\": `probe` = \"tcp://db:99999\": `99999` is not a TCP port"
        );
        assert_eq!(
            message(&[
                r#"name = "p""#,
                r#"probe = "tcp://db:5432""#,
                r#"above = "3MiB""#
            ]),
            "trigger \"p\": `above` = \"3MiB\": a probe's threshold is a latency, like \"200ms\""
        );
    }

    #[test]
    fn missing_and_conflicting_keys_are_explained() {
        assert_eq!(
            message(&[NAME]),
            "trigger \"r\": needs `metric` (an OTLP metric name), or `silence` or `probe` for the \
             other kinds of rule"
        );
        assert!(message(&[NAME, METRIC, r#"above = "1s""#]).contains("needs `statistic`"));
        assert_eq!(
            message(&[NAME, METRIC, r#"statistic = "max""#]),
            "trigger \"r\": needs `above` or `below`"
        );
        assert!(message(&[
            NAME,
            METRIC,
            r#"statistic = "max""#,
            r#"above = 1"#,
            r#"below = 0"#
        ])
        .contains("has both `above` and `below`"));
        assert_eq!(
            message(&[r#"name = "s""#, r#"silence = "3s""#, r#"above = "1s""#]),
            "trigger \"s\": `above` does not apply to a silence rule"
        );
        assert_eq!(
            message(&[
                r#"name = "s""#,
                r#"silence = "3s""#,
                r#"probe = "tcp://db:5432""#
            ]),
            "trigger \"s\": `silence` and `probe` make two different kinds of rule; define two \
             triggers"
        );
        assert_eq!(
            message(&[r#"name = "p""#, r#"probe = "tcp://db:5432""#, METRIC]),
            "trigger \"p\": `metric` does not apply to a probe rule"
        );
        assert_eq!(
            message(&[
                NAME,
                METRIC,
                r#"statistic = "max""#,
                r#"above = 1"#,
                r#"interval = "1s""#
            ]),
            "trigger \"r\": `interval` does not apply to a metric rule"
        );
        assert_eq!(
            message(&[r#"name = " ""#, r#"silence = "3s""#]),
            "trigger \" \": `name` must not be empty"
        );
    }

    #[test]
    fn stall_settings_are_refused_where_they_cannot_apply() {
        assert!(message(&[
            NAME,
            METRIC,
            r#"statistic = "rate""#,
            r#"below = 1"#,
            r#"stall = "breach""#
        ])
        .starts_with("trigger \"r\": `stall` applies only to `above` rules"));
        assert!(message(&[
            NAME,
            METRIC,
            r#"statistic = "p99""#,
            r#"above = "3MiB""#,
            r#"stall = "breach""#
        ])
        .starts_with("trigger \"r\": `stall` applies only to `above` rules"));
        assert_eq!(
            message(&[
                NAME,
                METRIC,
                r#"statistic = "p99""#,
                r#"above = "1s""#,
                r#"stall = "ignore""#,
                r#"stall_busy_rate = 5.0"#
            ]),
            "trigger \"r\": `stall_busy_rate` has no effect with `stall` = \"ignore\""
        );
        let ignored = rule(&[
            NAME,
            METRIC,
            r#"statistic = "p99""#,
            r#"above = "1s""#,
            r#"stall = "ignore""#,
        ])
        .unwrap();
        let Condition::Metric(metric) = ignored.condition else {
            panic!("a metric rule")
        };
        assert_eq!(metric.stall, None);
        let tuned = rule(&[
            NAME,
            METRIC,
            r#"statistic = "mean""#,
            r#"above = 0.5"#,
            r#"stall_busy_rate = 20.0"#,
            r#"stall_fraction = 0"#,
        ])
        .unwrap();
        let Condition::Metric(metric) = tuned.condition else {
            panic!("a metric rule")
        };
        assert_eq!(
            metric.stall,
            Some(StallDetection {
                busy_rate: 20.0,
                fraction: 0.0
            })
        );
    }

    #[test]
    fn a_tcp_probe_keeps_host_and_port_and_a_silence_rule_its_matchers() {
        let probe = rule(&[r#"name = "p""#, r#"probe = "tcp://[::1]:5432""#]).unwrap();
        assert_eq!(
            probe.condition,
            Condition::Probe(ProbeCondition {
                url: "tcp://[::1]:5432".to_string(),
                interval: DEFAULT_PROBE_INTERVAL,
                above: None,
                hold: Duration::ZERO,
            })
        );
        let silence = rule(&[
            r#"name = "s""#,
            r#"silence = "3s""#,
            METRIC,
            r#"resource = { "service.name" = "feed" }"#,
        ])
        .unwrap();
        let Condition::Silence(silence) = silence.condition else {
            panic!("a silence rule")
        };
        assert_eq!(silence.matchers.metric.as_deref(), Some("m"));
        assert_eq!(silence.matchers.resource["service.name"], "feed");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let error = toml::from_str::<Document>(
            r#"
            [[trigger]]
            name = "r"
            metric = "m"
            statistic = "max"
            abvoe = "1s"
            "#,
        )
        .err()
        .unwrap();
        assert!(
            error.to_string().contains("unknown field `abvoe`"),
            "{error}"
        );
    }

    #[test]
    fn matchers_need_every_listed_attribute() {
        let matchers = Matchers {
            metric: Some("m".to_string()),
            attributes: [("db.system".to_string(), "feeddb".to_string())].into(),
            resource: Attributes::new(),
        };
        let mut series = SeriesKey {
            metric: "m".to_string(),
            resource: [("service.name".to_string(), "feed".to_string())].into(),
            attributes: [
                ("db.system".to_string(), "feeddb".to_string()),
                ("db.operation".to_string(), "get".to_string()),
            ]
            .into(),
        };
        assert!(matchers.matches(&series));
        series
            .attributes
            .insert("db.system".to_string(), "other".to_string());
        assert!(!matchers.matches(&series));
        assert!(Matchers::default().matches(&series));
    }
}
