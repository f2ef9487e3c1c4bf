//! Units of thresholds and of metrics, so that "200ms" means the same against
//! a metric declared in `s` as against one declared in `ms`.
//!
//! Every unit is an exact whole number of its dimension's smallest unit (the
//! nanosecond, the byte). A conversion multiplies by one such size and then
//! divides by another, both exact, so "200ms" against a metric in `s` comes
//! out as the very `f64` an SDK writes for 0.2: a value equal to the threshold
//! compares equal, not a rounding error above it.

use std::fmt;

/// What a unit measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    Time,
    Bytes,
}

impl Dimension {
    /// The unit that values of this dimension are reported in.
    pub fn report_symbol(self) -> &'static str {
        match self {
            Dimension::Time => "s",
            Dimension::Bytes => "By",
        }
    }

    fn report_size(self) -> f64 {
        match self {
            Dimension::Time => NANOS_PER_SECOND,
            Dimension::Bytes => 1.0,
        }
    }
}

/// A unit of time or of size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Unit {
    pub dimension: Dimension,
    /// Nanoseconds or bytes in one of this unit.
    pub size: f64,
}

impl Unit {
    /// A value in this unit of time, in seconds.
    pub(crate) fn seconds(self, value: f64) -> f64 {
        value * self.size / NANOS_PER_SECOND
    }
}

const NANOS_PER_SECOND: f64 = 1e9;

const fn time(size: f64) -> Unit {
    Unit {
        dimension: Dimension::Time,
        size,
    }
}

const fn bytes(size: f64) -> Unit {
    Unit {
        dimension: Dimension::Bytes,
        size,
    }
}

const KIB: f64 = 1024.0;

/// Metric units as OTLP producers declare them (UCUM, as the semantic
/// conventions use it).
const METRIC_UNITS: &[(&str, Unit)] = &[
    ("ns", time(1.0)),
    ("us", time(1e3)),
    ("ms", time(1e6)),
    ("s", time(1e9)),
    ("min", time(60e9)),
    ("h", time(3600e9)),
    ("d", time(86400e9)),
    ("By", bytes(1.0)),
    ("kBy", bytes(1e3)),
    ("MBy", bytes(1e6)),
    ("GBy", bytes(1e9)),
    ("TBy", bytes(1e12)),
    ("KiBy", bytes(KIB)),
    ("MiBy", bytes(KIB * KIB)),
    ("GiBy", bytes(KIB * KIB * KIB)),
    ("TiBy", bytes(KIB * KIB * KIB * KIB)),
];

/// Units a threshold may be written in: what people write, plus the UCUM
/// spellings, so that copying a metric's unit into a threshold works too.
const THRESHOLD_UNITS: &[(&str, Unit)] = &[
    ("ns", time(1.0)),
    ("us", time(1e3)),
    ("µs", time(1e3)),
    ("ms", time(1e6)),
    ("s", time(1e9)),
    ("m", time(60e9)),
    ("min", time(60e9)),
    ("h", time(3600e9)),
    ("B", bytes(1.0)),
    ("By", bytes(1.0)),
    ("kB", bytes(1e3)),
    ("KB", bytes(1e3)),
    ("kBy", bytes(1e3)),
    ("MB", bytes(1e6)),
    ("MBy", bytes(1e6)),
    ("GB", bytes(1e9)),
    ("GBy", bytes(1e9)),
    ("TB", bytes(1e12)),
    ("TBy", bytes(1e12)),
    ("KiB", bytes(KIB)),
    ("KiBy", bytes(KIB)),
    ("MiB", bytes(KIB * KIB)),
    ("MiBy", bytes(KIB * KIB)),
    ("GiB", bytes(KIB * KIB * KIB)),
    ("GiBy", bytes(KIB * KIB * KIB)),
    ("TiB", bytes(KIB * KIB * KIB * KIB)),
    ("TiBy", bytes(KIB * KIB * KIB * KIB)),
];

fn lookup(table: &[(&str, Unit)], symbol: &str) -> Option<Unit> {
    table
        .iter()
        .find(|(name, _)| *name == symbol)
        .map(|(_, unit)| *unit)
}

/// The unit a metric was declared in, if it is one of time or size; `None`
/// for everything else (`1`, `{request}`, ...).
pub fn metric_unit(ucum: &str) -> Option<Unit> {
    lookup(METRIC_UNITS, ucum)
}

/// A threshold as written in a rule: an amount in a unit, or a bare number
/// that is compared in each metric's own unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    pub amount: f64,
    pub unit: Option<Unit>,
}

impl Threshold {
    /// A bare number, in the metric's own unit.
    pub fn bare(amount: f64) -> Threshold {
        Threshold { amount, unit: None }
    }

    /// Parses "200ms", "1.5s", "3MiB", "0.2" (bare). The error is the reason,
    /// for the caller to put next to the rule and key.
    pub fn parse(text: &str) -> Result<Threshold, String> {
        let text = text.trim();
        if let Ok(amount) = text.parse::<f64>() {
            return finite(amount).map(Threshold::bare);
        }
        let number_end = text
            .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+')))
            .unwrap_or(text.len());
        let (number, symbol) = text.split_at(number_end);
        let amount = number.parse::<f64>().map_err(|_| {
            "expected a number with an optional unit, like \"200ms\", \"1.5s\", \"3MiB\" or \"0.2\""
                .to_string()
        })?;
        let amount = finite(amount)?;
        let symbol = symbol.trim();
        let unit = lookup(THRESHOLD_UNITS, symbol).ok_or_else(|| {
            format!(
                "unknown unit `{symbol}` (durations: ns, us, ms, s, m, h; sizes: B, kB, MB, GB, \
                 TB, KiB, MiB, GiB, TiB; or a bare number in the metric's own unit)"
            )
        })?;
        if amount < 0.0 {
            return Err("a duration or size cannot be negative".to_string());
        }
        Ok(Threshold {
            amount,
            unit: Some(unit),
        })
    }

    /// The threshold in a metric's unit, or `None` when the two measure
    /// different things (a duration against a metric in bytes, or in no
    /// unit of time or size at all).
    pub(crate) fn in_metric_unit(&self, metric: Option<Unit>) -> Option<f64> {
        match (self.unit, metric) {
            (None, _) => Some(self.amount),
            (Some(own), Some(metric)) if own.dimension == metric.dimension => {
                Some(self.amount * own.size / metric.size)
            }
            _ => None,
        }
    }

    /// A value in the metric's unit, converted to the unit this threshold
    /// reports in (see [`Threshold::in_report_unit`]).
    pub(crate) fn value_in_report_unit(&self, value: f64, metric: Option<Unit>) -> f64 {
        match (self.unit, metric) {
            (Some(own), Some(metric)) => value * metric.size / own.dimension.report_size(),
            _ => value,
        }
    }

    /// The threshold in seconds for a duration, in bytes for a size, and as
    /// written for a bare number.
    pub fn in_report_unit(&self) -> f64 {
        match self.unit {
            Some(own) => self.amount * own.size / own.dimension.report_size(),
            None => self.amount,
        }
    }
}

fn finite(amount: f64) -> Result<f64, String> {
    if amount.is_finite() {
        Ok(amount)
    } else {
        Err("expected a finite number".to_string())
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.unit {
            Some(unit) => write!(
                f,
                "{} {}",
                self.in_report_unit(),
                unit.dimension.report_symbol()
            ),
            None => write!(f, "{} (in the metric's own unit)", self.amount),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Threshold {
        Threshold::parse(text).unwrap()
    }

    #[test]
    fn a_duration_threshold_meets_a_metric_in_seconds_or_milliseconds_exactly() {
        let threshold = parse("200ms");
        assert_eq!(threshold.in_metric_unit(metric_unit("s")), Some(0.2));
        assert_eq!(threshold.in_metric_unit(metric_unit("ms")), Some(200.0));
        assert_eq!(threshold.in_metric_unit(metric_unit("us")), Some(200_000.0));
        assert_eq!(threshold.in_metric_unit(metric_unit("ns")), Some(2e8));
        assert_eq!(threshold.in_report_unit(), 0.2);
        assert_eq!(
            parse("1.5s").in_metric_unit(metric_unit("ms")),
            Some(1500.0)
        );
        assert_eq!(parse("2m").in_report_unit(), 120.0);
        assert_eq!(
            parse("250 µs").in_metric_unit(metric_unit("ms")),
            Some(0.25)
        );
    }

    #[test]
    fn values_are_reported_in_seconds_or_bytes() {
        let threshold = parse("200ms");
        assert_eq!(
            threshold.value_in_report_unit(250.0, metric_unit("ms")),
            0.25
        );
        assert_eq!(threshold.value_in_report_unit(0.25, metric_unit("s")), 0.25);
        let size = parse("1KiB");
        assert_eq!(size.value_in_report_unit(2.0, metric_unit("KiBy")), 2048.0);
        let bare = parse("7");
        assert_eq!(bare.value_in_report_unit(250.0, metric_unit("ms")), 250.0);
    }

    #[test]
    fn byte_thresholds_convert_between_binary_and_decimal_units() {
        let threshold = parse("3MiB");
        assert_eq!(
            threshold.in_metric_unit(metric_unit("By")),
            Some(3.0 * 1048576.0)
        );
        assert_eq!(threshold.in_metric_unit(metric_unit("KiBy")), Some(3072.0));
        assert_eq!(
            parse("1.5GB").in_metric_unit(metric_unit("MBy")),
            Some(1500.0)
        );
        assert_eq!(parse("512 KiBy").in_report_unit(), 524288.0);
        assert_eq!(parse("2kB").in_metric_unit(metric_unit("By")), Some(2000.0));
    }

    #[test]
    fn a_threshold_refuses_a_metric_of_another_dimension() {
        assert_eq!(parse("200ms").in_metric_unit(metric_unit("By")), None);
        assert_eq!(parse("3MiB").in_metric_unit(metric_unit("s")), None);
        assert_eq!(
            parse("200ms").in_metric_unit(metric_unit("{request}")),
            None
        );
        assert_eq!(parse("200ms").in_metric_unit(None), None);
    }

    #[test]
    fn a_bare_number_is_in_the_metric_s_own_unit() {
        let threshold = parse("0.2");
        assert_eq!(threshold, Threshold::bare(0.2));
        assert_eq!(threshold.in_metric_unit(metric_unit("ms")), Some(0.2));
        assert_eq!(threshold.in_metric_unit(None), Some(0.2));
        assert_eq!(parse("-3").amount, -3.0);
        assert_eq!(parse("1e-3").amount, 0.001);
    }

    #[test]
    fn bad_thresholds_say_what_is_wrong() {
        let unknown = Threshold::parse("200 parsecs").unwrap_err();
        assert!(unknown.starts_with("unknown unit `parsecs`"), "{unknown}");
        assert!(Threshold::parse("fast")
            .unwrap_err()
            .starts_with("expected a number"));
        assert!(Threshold::parse("")
            .unwrap_err()
            .starts_with("expected a number"));
        assert_eq!(
            Threshold::parse("-5ms").unwrap_err(),
            "a duration or size cannot be negative"
        );
        assert_eq!(
            Threshold::parse("inf").unwrap_err(),
            "expected a finite number"
        );
    }
}
