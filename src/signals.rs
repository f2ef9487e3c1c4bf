//! What ingest makes of OTLP, and trigger evaluates: metric points and spans
//! as owned, validated domain values. Attribute values are kept as strings
//! (OTLP `AnyValue`s rendered the way the Collector's debug exporter does),
//! which is all that matching and labelling need.

use std::collections::BTreeMap;
use std::time::SystemTime;

/// Attribute set, ordered so that it can identify a series.
pub type Attributes = BTreeMap<String, String>;

/// One time series: a metric of one resource with one attribute set.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct SeriesKey {
    pub metric: String,
    pub resource: Attributes,
    pub attributes: Attributes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Temporality {
    /// Each point covers `[start_time, time)` since the series started (or reset).
    Cumulative,
    /// Each point covers only the interval since the previous one.
    Delta,
}

/// A sampled request on a histogram point, linking it to a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Exemplar {
    pub time_unix_nano: u64,
    pub value: f64,
    pub trace_id: Option<[u8; 16]>,
    pub span_id: Option<[u8; 8]>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub temporality: Temporality,
    pub count: u64,
    pub sum: Option<f64>,
    /// On a cumulative series these cover the series' whole lifetime.
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// Upper bounds, ascending; `bucket_counts` has one more entry (+Inf).
    pub bounds: Vec<f64>,
    pub bucket_counts: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExponentialBuckets {
    pub offset: i32,
    pub counts: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExponentialHistogram {
    pub temporality: Temporality,
    pub count: u64,
    pub sum: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// Bucket `i` covers `(base^i, base^(i+1)]` with `base = 2^(2^-scale)`.
    pub scale: i32,
    pub zero_count: u64,
    pub positive: ExponentialBuckets,
    pub negative: ExponentialBuckets,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PointValue {
    Gauge(f64),
    Sum {
        value: f64,
        monotonic: bool,
        temporality: Temporality,
    },
    Histogram(Histogram),
    ExponentialHistogram(ExponentialHistogram),
}

/// One data point of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub series: SeriesKey,
    /// UCUM unit as the producer declared it (`s`, `ms`, `By`, `1`, ...).
    pub unit: String,
    pub start_time_unix_nano: u64,
    pub time_unix_nano: u64,
    pub value: PointValue,
    pub exemplars: Vec<Exemplar>,
}

/// Points of one export request, as they arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricBatch {
    pub received_at: SystemTime,
    pub points: Vec<Point>,
}

/// A finished span, kept briefly so captures can link to the requests
/// they froze.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub name: String,
    pub start_time_unix_nano: u64,
    pub end_time_unix_nano: u64,
    pub resource: Attributes,
    pub attributes: Attributes,
}
