//! OTLP export requests turned into [`signals`](crate::signals) values.
//!
//! Conversion is pure and point by point: a bad data point is counted and
//! skipped with a reason, and never costs the rest of its request. The
//! checks are the ones that would otherwise poison statistics downstream:
//! non-finite values, bucket layouts that do not add up, unsorted bounds,
//! missing or inverted timestamps. Whether a series moves backwards *between*
//! requests is for whoever keeps series state to judge.

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1 as otlp;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::{exemplar, number_data_point};
use opentelemetry_proto::tonic::trace::v1 as otlp_trace;

use super::attributes;
use crate::signals::{
    Attributes, Exemplar, ExponentialBuckets, ExponentialHistogram, Histogram, Point, PointValue,
    SeriesKey, Span, Temporality,
};

/// Scales OTLP allows for exponential histograms.
const EXPONENTIAL_SCALES: std::ops::RangeInclusive<i32> = -10..=20;

/// The outcome of converting one request.
#[derive(Debug)]
pub(crate) struct Converted<T> {
    /// The valid items, in request order.
    pub items: Vec<T>,
    /// Valid points flagged "no recorded value" (staleness markers): accepted,
    /// but they carry nothing to deliver.
    pub without_value: u64,
    pub rejections: Rejections,
}

impl<T> Default for Converted<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            without_value: 0,
            rejections: Rejections::default(),
        }
    }
}

/// Rejected items of one request, and why the first one was rejected: the
/// message an OTLP partial-success response carries back to the sender.
#[derive(Debug, Default)]
pub(crate) struct Rejections {
    count: u64,
    first_reason: Option<String>,
}

impl Rejections {
    fn add(&mut self, count: u64, reason: impl FnOnce() -> String) {
        if count == 0 {
            return;
        }
        self.count += count;
        if self.first_reason.is_none() {
            self.first_reason = Some(reason());
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Empty when nothing was rejected.
    pub fn message(&self) -> String {
        match (&self.first_reason, self.count) {
            (None, _) => String::new(),
            (Some(reason), 1) => reason.clone(),
            (Some(reason), count) => format!("{reason} (and {} more rejected)", count - 1),
        }
    }
}

/// Counts the data points of a request without converting it, so that a
/// refused request can be counted cheaply.
pub(crate) fn count_metric_points(request: &ExportMetricsServiceRequest) -> u64 {
    request
        .resource_metrics
        .iter()
        .flat_map(|resource| &resource.scope_metrics)
        .flat_map(|scope| &scope.metrics)
        .filter_map(|metric| metric.data.as_ref())
        .map(points_in)
        .sum()
}

fn points_in(data: &Data) -> u64 {
    let points = match data {
        Data::Gauge(gauge) => gauge.data_points.len(),
        Data::Sum(sum) => sum.data_points.len(),
        Data::Histogram(histogram) => histogram.data_points.len(),
        Data::ExponentialHistogram(histogram) => histogram.data_points.len(),
        Data::Summary(summary) => summary.data_points.len(),
    };
    points as u64
}

/// Converts every data point of a metrics export request.
pub(crate) fn metric_points(request: ExportMetricsServiceRequest) -> Converted<Point> {
    let mut converted = Converted::default();
    for resource_metrics in request.resource_metrics {
        let resource = resource_metrics
            .resource
            .map(|resource| attributes::render(&resource.attributes))
            .unwrap_or_default();
        for scope_metrics in resource_metrics.scope_metrics {
            for metric in scope_metrics.metrics {
                convert_metric(&resource, metric, &mut converted);
            }
        }
    }
    converted
}

/// What every point of one metric shares.
struct MetricContext<'a> {
    name: &'a str,
    unit: &'a str,
    resource: &'a Attributes,
}

impl MetricContext<'_> {
    fn point(
        &self,
        attributes: &[KeyValue],
        start_time_unix_nano: u64,
        time_unix_nano: u64,
        value: PointValue,
        exemplars: Vec<otlp::Exemplar>,
    ) -> Point {
        Point {
            series: SeriesKey {
                metric: self.name.to_owned(),
                resource: self.resource.clone(),
                attributes: attributes::render(attributes),
            },
            unit: self.unit.to_owned(),
            start_time_unix_nano,
            time_unix_nano,
            value,
            exemplars: convert_exemplars(exemplars),
        }
    }
}

/// `Ok(None)`: a valid point without a value, see [`Converted::without_value`].
type PointResult = Result<Option<Point>, String>;

fn convert_metric(resource: &Attributes, metric: otlp::Metric, converted: &mut Converted<Point>) {
    let Some(data) = metric.data else {
        return;
    };
    let name = metric.name.as_str();
    if name.is_empty() {
        converted
            .rejections
            .add(points_in(&data), || "a metric has no name".to_owned());
        return;
    }
    let context = MetricContext {
        name,
        unit: &metric.unit,
        resource,
    };
    let mut record = |result: PointResult| match result {
        Ok(Some(point)) => converted.items.push(point),
        Ok(None) => converted.without_value += 1,
        Err(reason) => converted
            .rejections
            .add(1, || format!("metric {name:?}: {reason}")),
    };
    match data {
        Data::Gauge(gauge) => {
            for point in gauge.data_points {
                record(number_point(&context, point, |value| {
                    Ok(PointValue::Gauge(value))
                }));
            }
        }
        Data::Sum(sum) => {
            let temporality = temporality(sum.aggregation_temporality);
            let monotonic = sum.is_monotonic;
            for point in sum.data_points {
                record(number_point(&context, point, |value| {
                    let temporality = temporality.clone()?;
                    if monotonic && value < 0.0 {
                        return Err(format!("monotonic sum has a negative value {value}"));
                    }
                    Ok(PointValue::Sum {
                        value,
                        monotonic,
                        temporality,
                    })
                }));
            }
        }
        Data::Histogram(histogram) => {
            let temporality = temporality(histogram.aggregation_temporality);
            for point in histogram.data_points {
                record(histogram_point(&context, point, temporality.clone()));
            }
        }
        Data::ExponentialHistogram(histogram) => {
            let temporality = temporality(histogram.aggregation_temporality);
            for point in histogram.data_points {
                record(exponential_point(&context, point, temporality.clone()));
            }
        }
        Data::Summary(summary) => {
            for _ in summary.data_points {
                record(Err(
                    "summary metrics are not supported; export a histogram".to_owned()
                ));
            }
        }
    }
}

fn temporality(aggregation_temporality: i32) -> Result<Temporality, String> {
    match otlp::AggregationTemporality::try_from(aggregation_temporality) {
        Ok(otlp::AggregationTemporality::Delta) => Ok(Temporality::Delta),
        Ok(otlp::AggregationTemporality::Cumulative) => Ok(Temporality::Cumulative),
        _ => Err(format!(
            "aggregation temporality {aggregation_temporality} is not delta or cumulative"
        )),
    }
}

/// A point flagged "no recorded value" marks a series as stale; it is valid
/// OTLP even though its value fields are empty or NaN.
fn has_no_recorded_value(flags: u32) -> bool {
    flags & otlp::DataPointFlags::NoRecordedValueMask as u32 != 0
}

fn check_times(start_time_unix_nano: u64, time_unix_nano: u64) -> Result<(), String> {
    if time_unix_nano == 0 {
        return Err("time_unix_nano is missing".to_owned());
    }
    // A start time of 0 means "unknown", which OTLP allows.
    if start_time_unix_nano > time_unix_nano {
        return Err(format!(
            "start_time_unix_nano {start_time_unix_nano} is after time_unix_nano {time_unix_nano}"
        ));
    }
    Ok(())
}

fn finite(value: f64, what: &str) -> Result<f64, String> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(format!("{what} is {value}"))
    }
}

fn optional_finite(value: Option<f64>, what: &str) -> Result<Option<f64>, String> {
    value.map(|value| finite(value, what)).transpose()
}

fn check_min_max(min: Option<f64>, max: Option<f64>) -> Result<(), String> {
    match (min, max) {
        (Some(min), Some(max)) if min > max => Err(format!("min {min} is above max {max}")),
        _ => Ok(()),
    }
}

fn number_point(
    context: &MetricContext<'_>,
    point: otlp::NumberDataPoint,
    value_of: impl FnOnce(f64) -> Result<PointValue, String>,
) -> PointResult {
    check_times(point.start_time_unix_nano, point.time_unix_nano)?;
    if has_no_recorded_value(point.flags) {
        return Ok(None);
    }
    let number = match point.value {
        Some(number_data_point::Value::AsDouble(value)) => finite(value, "value")?,
        Some(number_data_point::Value::AsInt(value)) => value as f64,
        None => return Err("the point has no value".to_owned()),
    };
    let value = value_of(number)?;
    Ok(Some(context.point(
        &point.attributes,
        point.start_time_unix_nano,
        point.time_unix_nano,
        value,
        point.exemplars,
    )))
}

fn histogram_point(
    context: &MetricContext<'_>,
    point: otlp::HistogramDataPoint,
    temporality: Result<Temporality, String>,
) -> PointResult {
    check_times(point.start_time_unix_nano, point.time_unix_nano)?;
    if has_no_recorded_value(point.flags) {
        return Ok(None);
    }
    let temporality = temporality?;
    let (bounds, bucket_counts) =
        if point.bucket_counts.is_empty() && point.explicit_bounds.is_empty() {
            // OTLP allows a histogram without buckets (count and sum only); one
            // +Inf bucket holding every observation says exactly that.
            (Vec::new(), vec![point.count])
        } else {
            (point.explicit_bounds, point.bucket_counts)
        };
    if bucket_counts.len() != bounds.len() + 1 {
        return Err(format!(
            "{} bucket counts for {} bounds (expected {})",
            bucket_counts.len(),
            bounds.len(),
            bounds.len() + 1
        ));
    }
    if let Some(bound) = bounds.iter().find(|bound| !bound.is_finite()) {
        return Err(format!("bucket bound {bound} is not finite"));
    }
    if bounds.windows(2).any(|pair| pair[0] >= pair[1]) {
        return Err("bucket bounds are not strictly ascending".to_owned());
    }
    check_total(bucket_counts.iter(), point.count)?;
    let sum = optional_finite(point.sum, "sum")?;
    let min = optional_finite(point.min, "min")?;
    let max = optional_finite(point.max, "max")?;
    check_min_max(min, max)?;
    let value = PointValue::Histogram(Histogram {
        temporality,
        count: point.count,
        sum,
        min,
        max,
        bounds,
        bucket_counts,
    });
    Ok(Some(context.point(
        &point.attributes,
        point.start_time_unix_nano,
        point.time_unix_nano,
        value,
        point.exemplars,
    )))
}

fn exponential_point(
    context: &MetricContext<'_>,
    point: otlp::ExponentialHistogramDataPoint,
    temporality: Result<Temporality, String>,
) -> PointResult {
    check_times(point.start_time_unix_nano, point.time_unix_nano)?;
    if has_no_recorded_value(point.flags) {
        return Ok(None);
    }
    let temporality = temporality?;
    if !EXPONENTIAL_SCALES.contains(&point.scale) {
        return Err(format!(
            "scale {} is outside {}..={}",
            point.scale,
            EXPONENTIAL_SCALES.start(),
            EXPONENTIAL_SCALES.end()
        ));
    }
    let positive = exponential_buckets(point.positive);
    let negative = exponential_buckets(point.negative);
    let zero = [point.zero_count];
    check_total(
        zero.iter().chain(&positive.counts).chain(&negative.counts),
        point.count,
    )?;
    let sum = optional_finite(point.sum, "sum")?;
    let min = optional_finite(point.min, "min")?;
    let max = optional_finite(point.max, "max")?;
    check_min_max(min, max)?;
    let value = PointValue::ExponentialHistogram(ExponentialHistogram {
        temporality,
        count: point.count,
        sum,
        min,
        max,
        scale: point.scale,
        zero_count: point.zero_count,
        positive,
        negative,
    });
    Ok(Some(context.point(
        &point.attributes,
        point.start_time_unix_nano,
        point.time_unix_nano,
        value,
        point.exemplars,
    )))
}

fn exponential_buckets(
    buckets: Option<otlp::exponential_histogram_data_point::Buckets>,
) -> ExponentialBuckets {
    buckets
        .map(|buckets| ExponentialBuckets {
            offset: buckets.offset,
            counts: buckets.bucket_counts,
        })
        .unwrap_or_default()
}

/// The buckets of a histogram must hold exactly `count` observations.
fn check_total<'a>(
    mut bucket_counts: impl Iterator<Item = &'a u64>,
    count: u64,
) -> Result<(), String> {
    let total = bucket_counts
        .try_fold(0_u64, |total, &bucket| total.checked_add(bucket))
        .ok_or_else(|| "bucket counts overflow".to_owned())?;
    if total != count {
        return Err(format!(
            "bucket counts add up to {total}, but count is {count}"
        ));
    }
    Ok(())
}

/// An exemplar is a hint attached to a point, not a point: one that cannot be
/// used is dropped without rejecting its point.
fn convert_exemplars(exemplars: Vec<otlp::Exemplar>) -> Vec<Exemplar> {
    exemplars
        .into_iter()
        .filter_map(|exemplar| {
            let value = match exemplar.value? {
                exemplar::Value::AsDouble(value) => value,
                exemplar::Value::AsInt(value) => value as f64,
            };
            value.is_finite().then(|| Exemplar {
                time_unix_nano: exemplar.time_unix_nano,
                value,
                trace_id: id(&exemplar.trace_id),
                span_id: id(&exemplar.span_id),
            })
        })
        .collect()
}

/// A trace or span id: exactly `N` bytes, not all zero (all-zero ids are
/// invalid in W3C Trace Context and OTLP).
fn id<const N: usize>(bytes: &[u8]) -> Option<[u8; N]> {
    let id: [u8; N] = bytes.try_into().ok()?;
    (id != [0; N]).then_some(id)
}

/// Converts every span of a traces export request.
pub(crate) fn spans(request: ExportTraceServiceRequest) -> Converted<Span> {
    let mut converted = Converted::default();
    for resource_spans in request.resource_spans {
        let resource = resource_spans
            .resource
            .map(|resource| attributes::render(&resource.attributes))
            .unwrap_or_default();
        for scope_spans in resource_spans.scope_spans {
            for span in scope_spans.spans {
                let name = span.name.clone();
                match convert_span(&resource, span) {
                    Ok(span) => converted.items.push(span),
                    Err(reason) => converted
                        .rejections
                        .add(1, || format!("span {name:?}: {reason}")),
                }
            }
        }
    }
    converted
}

fn convert_span(resource: &Attributes, span: otlp_trace::Span) -> Result<Span, String> {
    let trace_id = id(&span.trace_id).ok_or_else(|| {
        format!(
            "trace_id has {} bytes or is all zero (needs 16)",
            span.trace_id.len()
        )
    })?;
    let span_id = id(&span.span_id).ok_or_else(|| {
        format!(
            "span_id has {} bytes or is all zero (needs 8)",
            span.span_id.len()
        )
    })?;
    if span.start_time_unix_nano == 0 {
        return Err("start_time_unix_nano is missing".to_owned());
    }
    if span.end_time_unix_nano < span.start_time_unix_nano {
        return Err(format!(
            "end_time_unix_nano {} is before start_time_unix_nano {}",
            span.end_time_unix_nano, span.start_time_unix_nano
        ));
    }
    Ok(Span {
        trace_id,
        span_id,
        attributes: attributes::render(&span.attributes),
        name: span.name,
        start_time_unix_nano: span.start_time_unix_nano,
        end_time_unix_nano: span.end_time_unix_nano,
        resource: resource.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue};
    use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets;
    use opentelemetry_proto::tonic::metrics::v1::{
        ExponentialHistogramDataPoint, HistogramDataPoint, NumberDataPoint, ResourceMetrics,
        ScopeMetrics, SummaryDataPoint,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};

    const CUMULATIVE: i32 = otlp::AggregationTemporality::Cumulative as i32;
    const DELTA: i32 = otlp::AggregationTemporality::Delta as i32;
    const T0: u64 = 1_700_000_000_000_000_000;
    const T1: u64 = T0 + 500_000_000;

    fn text(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.to_owned())),
            }),
            ..Default::default()
        }
    }

    fn request(metrics: Vec<otlp::Metric>) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![text("service.name", "feed")],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn metric(name: &str, unit: &str, data: Data) -> otlp::Metric {
        otlp::Metric {
            name: name.to_owned(),
            unit: unit.to_owned(),
            data: Some(data),
            ..Default::default()
        }
    }

    fn number(value: number_data_point::Value) -> NumberDataPoint {
        NumberDataPoint {
            attributes: vec![text("db.system", "feeddb")],
            start_time_unix_nano: T0,
            time_unix_nano: T1,
            value: Some(value),
            ..Default::default()
        }
    }

    fn gauge(points: Vec<NumberDataPoint>) -> Data {
        Data::Gauge(otlp::Gauge {
            data_points: points,
        })
    }

    fn histogram_point(bounds: Vec<f64>, counts: Vec<u64>, count: u64) -> HistogramDataPoint {
        HistogramDataPoint {
            start_time_unix_nano: T0,
            time_unix_nano: T1,
            count,
            sum: Some(1.5),
            bucket_counts: counts,
            explicit_bounds: bounds,
            min: Some(0.001),
            max: Some(0.9),
            ..Default::default()
        }
    }

    fn histogram(temporality: i32, points: Vec<HistogramDataPoint>) -> Data {
        Data::Histogram(otlp::Histogram {
            data_points: points,
            aggregation_temporality: temporality,
        })
    }

    fn exponential_point() -> ExponentialHistogramDataPoint {
        ExponentialHistogramDataPoint {
            start_time_unix_nano: T0,
            time_unix_nano: T1,
            count: 10,
            sum: Some(12.5),
            scale: 3,
            zero_count: 1,
            positive: Some(Buckets {
                offset: -2,
                bucket_counts: vec![2, 3, 0, 4],
            }),
            negative: None,
            min: Some(0.0),
            max: Some(4.0),
            ..Default::default()
        }
    }

    /// Converts one metric; returns the points and the rejection message.
    fn convert(data: Data) -> (Vec<Point>, u64, String) {
        let converted = metric_points(request(vec![metric(
            "db.client.operation.duration",
            "s",
            data,
        )]));
        let rejections = &converted.rejections;
        (converted.items, rejections.count(), rejections.message())
    }

    fn rejected_with(data: Data, reason: &str) {
        let (points, rejected, message) = convert(data);
        assert!(points.is_empty(), "{points:?}");
        assert_eq!(rejected, 1, "{message}");
        assert!(
            message.contains(reason),
            "{message:?} should mention {reason:?}"
        );
    }

    #[test]
    fn a_gauge_point_keeps_its_series_unit_times_and_value() {
        let (points, rejected, _) = convert(gauge(vec![number(
            number_data_point::Value::AsDouble(0.25),
        )]));
        assert_eq!(rejected, 0);
        let [point] = points.as_slice() else {
            panic!("one point expected: {points:?}")
        };
        assert_eq!(point.series.metric, "db.client.operation.duration");
        assert_eq!(
            point
                .series
                .resource
                .get("service.name")
                .map(String::as_str),
            Some("feed")
        );
        assert_eq!(
            point.series.attributes.get("db.system").map(String::as_str),
            Some("feeddb")
        );
        assert_eq!(point.unit, "s");
        assert_eq!((point.start_time_unix_nano, point.time_unix_nano), (T0, T1));
        assert_eq!(point.value, PointValue::Gauge(0.25));
    }

    #[test]
    fn sums_keep_monotonicity_and_temporality_and_ints_become_floats() {
        let data = Data::Sum(otlp::Sum {
            data_points: vec![number(number_data_point::Value::AsInt(42))],
            aggregation_temporality: DELTA,
            is_monotonic: true,
        });
        let (points, rejected, _) = convert(data);
        assert_eq!(rejected, 0);
        assert_eq!(
            points[0].value,
            PointValue::Sum {
                value: 42.0,
                monotonic: true,
                temporality: Temporality::Delta
            }
        );
    }

    #[test]
    fn a_monotonic_sum_cannot_go_negative_but_a_gauge_can() {
        let sum = |monotonic| {
            Data::Sum(otlp::Sum {
                data_points: vec![number(number_data_point::Value::AsDouble(-1.0))],
                aggregation_temporality: CUMULATIVE,
                is_monotonic: monotonic,
            })
        };
        rejected_with(sum(true), "negative");
        assert_eq!(convert(sum(false)).1, 0);
        assert_eq!(
            convert(gauge(vec![number(number_data_point::Value::AsDouble(
                -1.0
            ))]))
            .1,
            0
        );
    }

    #[test]
    fn unspecified_temporality_is_rejected() {
        let data = Data::Sum(otlp::Sum {
            data_points: vec![number(number_data_point::Value::AsDouble(1.0))],
            aggregation_temporality: 0,
            is_monotonic: false,
        });
        rejected_with(data, "temporality 0");
        rejected_with(
            histogram(7, vec![histogram_point(vec![1.0], vec![1, 0], 1)]),
            "temporality 7",
        );
    }

    #[test]
    fn non_finite_values_are_rejected_and_the_valid_points_kept() {
        let points = vec![
            number(number_data_point::Value::AsDouble(1.0)),
            number(number_data_point::Value::AsDouble(f64::NAN)),
            number(number_data_point::Value::AsDouble(f64::INFINITY)),
            number(number_data_point::Value::AsDouble(2.0)),
        ];
        let (points, rejected, message) = convert(gauge(points));
        let values: Vec<_> = points.iter().map(|point| point.value.clone()).collect();
        assert_eq!(values, [PointValue::Gauge(1.0), PointValue::Gauge(2.0)]);
        assert_eq!(rejected, 2);
        assert_eq!(
            message,
            r#"metric "db.client.operation.duration": value is NaN (and 1 more rejected)"#
        );
    }

    #[test]
    fn points_without_a_value_or_a_time_are_rejected() {
        rejected_with(
            gauge(vec![NumberDataPoint {
                value: None,
                ..number(number_data_point::Value::AsInt(1))
            }]),
            "no value",
        );
        let untimed = NumberDataPoint {
            time_unix_nano: 0,
            ..number(number_data_point::Value::AsInt(1))
        };
        rejected_with(gauge(vec![untimed]), "time_unix_nano is missing");
        let inverted = NumberDataPoint {
            start_time_unix_nano: T1 + 1,
            ..number(number_data_point::Value::AsInt(1))
        };
        rejected_with(gauge(vec![inverted]), "is after time_unix_nano");
        let unknown_start = NumberDataPoint {
            start_time_unix_nano: 0,
            ..number(number_data_point::Value::AsInt(1))
        };
        assert_eq!(convert(gauge(vec![unknown_start])).1, 0);
    }

    #[test]
    fn points_flagged_without_a_recorded_value_are_accepted_but_not_delivered() {
        let stale = NumberDataPoint {
            flags: otlp::DataPointFlags::NoRecordedValueMask as u32,
            value: Some(number_data_point::Value::AsDouble(f64::NAN)),
            ..number(number_data_point::Value::AsInt(0))
        };
        let converted = metric_points(request(vec![metric("up", "1", gauge(vec![stale]))]));
        assert!(converted.items.is_empty());
        assert_eq!(converted.without_value, 1);
        assert_eq!(converted.rejections.count(), 0);
    }

    #[test]
    fn an_explicit_histogram_keeps_buckets_and_optional_statistics() {
        let mut point = histogram_point(vec![0.005, 0.1, 1.0], vec![1, 2, 3, 4], 10);
        point.exemplars = vec![otlp::Exemplar {
            time_unix_nano: T1,
            trace_id: (1..=16).collect(),
            span_id: (1..=8).collect(),
            value: Some(exemplar::Value::AsDouble(0.7)),
            ..Default::default()
        }];
        let (points, rejected, _) = convert(histogram(CUMULATIVE, vec![point]));
        assert_eq!(rejected, 0);
        assert_eq!(
            points[0].value,
            PointValue::Histogram(Histogram {
                temporality: Temporality::Cumulative,
                count: 10,
                sum: Some(1.5),
                min: Some(0.001),
                max: Some(0.9),
                bounds: vec![0.005, 0.1, 1.0],
                bucket_counts: vec![1, 2, 3, 4],
            })
        );
        let trace_id: [u8; 16] = std::array::from_fn(|index| index as u8 + 1);
        let span_id: [u8; 8] = std::array::from_fn(|index| index as u8 + 1);
        assert_eq!(
            points[0].exemplars,
            [Exemplar {
                time_unix_nano: T1,
                value: 0.7,
                trace_id: Some(trace_id),
                span_id: Some(span_id)
            }]
        );
    }

    #[test]
    fn a_histogram_without_buckets_holds_its_count_in_one_infinite_bucket() {
        let mut point = histogram_point(vec![], vec![], 5);
        point.min = None;
        point.max = None;
        point.sum = None;
        let (points, rejected, _) = convert(histogram(DELTA, vec![point]));
        assert_eq!(rejected, 0);
        let PointValue::Histogram(histogram) = &points[0].value else {
            panic!("histogram expected")
        };
        assert_eq!(
            (histogram.bounds.len(), histogram.bucket_counts.as_slice()),
            (0, &[5][..])
        );
        assert_eq!(
            (histogram.sum, histogram.min, histogram.max),
            (None, None, None)
        );
    }

    #[test]
    fn histogram_bucket_layouts_must_add_up() {
        let data = |bounds: Vec<f64>, counts: Vec<u64>, count| {
            histogram(CUMULATIVE, vec![histogram_point(bounds, counts, count)])
        };
        rejected_with(
            data(vec![0.1, 1.0], vec![1, 2], 3),
            "2 bucket counts for 2 bounds (expected 3)",
        );
        rejected_with(
            data(vec![0.1, 1.0], vec![1, 2, 3], 7),
            "add up to 6, but count is 7",
        );
        rejected_with(
            data(vec![1.0, 0.1], vec![1, 2, 3], 6),
            "not strictly ascending",
        );
        rejected_with(
            data(vec![0.1, 0.1], vec![1, 2, 3], 6),
            "not strictly ascending",
        );
        rejected_with(data(vec![0.1, f64::NAN], vec![1, 2, 3], 6), "not finite");
        rejected_with(data(vec![1.0], vec![u64::MAX, 1], 0), "overflow");
    }

    #[test]
    fn histogram_statistics_must_be_finite_and_ordered() {
        let with = |change: fn(&mut HistogramDataPoint)| {
            let mut point = histogram_point(vec![1.0], vec![1, 1], 2);
            change(&mut point);
            histogram(CUMULATIVE, vec![point])
        };
        rejected_with(with(|point| point.sum = Some(f64::NAN)), "sum is NaN");
        rejected_with(with(|point| point.max = Some(f64::INFINITY)), "max is inf");
        rejected_with(
            with(|point| point.min = Some(2.0)),
            "min 2 is above max 0.9",
        );
    }

    #[test]
    fn an_exponential_histogram_keeps_scale_zero_bucket_and_ranges() {
        let data = Data::ExponentialHistogram(otlp::ExponentialHistogram {
            data_points: vec![exponential_point()],
            aggregation_temporality: DELTA,
        });
        let (points, rejected, _) = convert(data);
        assert_eq!(rejected, 0);
        assert_eq!(
            points[0].value,
            PointValue::ExponentialHistogram(ExponentialHistogram {
                temporality: Temporality::Delta,
                count: 10,
                sum: Some(12.5),
                min: Some(0.0),
                max: Some(4.0),
                scale: 3,
                zero_count: 1,
                positive: ExponentialBuckets {
                    offset: -2,
                    counts: vec![2, 3, 0, 4]
                },
                negative: ExponentialBuckets::default(),
            })
        );
    }

    #[test]
    fn exponential_histograms_must_add_up_and_keep_a_valid_scale() {
        let with = |change: fn(&mut ExponentialHistogramDataPoint)| {
            let mut point = exponential_point();
            change(&mut point);
            Data::ExponentialHistogram(otlp::ExponentialHistogram {
                data_points: vec![point],
                aggregation_temporality: CUMULATIVE,
            })
        };
        rejected_with(
            with(|point| point.count = 11),
            "add up to 10, but count is 11",
        );
        rejected_with(
            with(|point| {
                point.negative = Some(Buckets {
                    offset: 0,
                    bucket_counts: vec![1],
                })
            }),
            "add up to 11",
        );
        rejected_with(
            with(|point| point.scale = 21),
            "scale 21 is outside -10..=20",
        );
        rejected_with(
            with(|point| point.sum = Some(f64::NEG_INFINITY)),
            "sum is -inf",
        );
    }

    #[test]
    fn summaries_and_nameless_metrics_are_rejected_point_by_point() {
        let summary = Data::Summary(otlp::Summary {
            data_points: vec![SummaryDataPoint::default(); 2],
        });
        let (_, rejected, message) = convert(summary);
        assert_eq!(rejected, 2);
        assert!(
            message.contains("summary metrics are not supported"),
            "{message}"
        );

        let nameless = metric(
            "",
            "s",
            gauge(vec![number(number_data_point::Value::AsInt(1)); 3]),
        );
        let converted = metric_points(request(vec![nameless]));
        assert_eq!(converted.rejections.count(), 3);
        assert_eq!(
            converted.rejections.message(),
            "a metric has no name (and 2 more rejected)"
        );
    }

    #[test]
    fn exemplars_that_cannot_be_used_are_dropped_and_bad_ids_ignored() {
        let mut point = number(number_data_point::Value::AsDouble(1.0));
        point.exemplars = vec![
            otlp::Exemplar {
                value: None,
                ..Default::default()
            },
            otlp::Exemplar {
                value: Some(exemplar::Value::AsDouble(f64::NAN)),
                ..Default::default()
            },
            otlp::Exemplar {
                value: Some(exemplar::Value::AsInt(3)),
                trace_id: vec![0; 16],
                span_id: vec![1; 7],
                ..Default::default()
            },
        ];
        let (points, rejected, _) = convert(gauge(vec![point]));
        assert_eq!(rejected, 0);
        assert_eq!(
            points[0].exemplars,
            [Exemplar {
                time_unix_nano: 0,
                value: 3.0,
                trace_id: None,
                span_id: None
            }]
        );
    }

    #[test]
    fn points_are_counted_without_converting() {
        let request = request(vec![
            metric(
                "a",
                "1",
                gauge(vec![number(number_data_point::Value::AsInt(1)); 2]),
            ),
            metric(
                "b",
                "s",
                histogram(DELTA, vec![histogram_point(vec![], vec![], 0); 3]),
            ),
            otlp::Metric {
                name: "empty".into(),
                ..Default::default()
            },
        ]);
        assert_eq!(count_metric_points(&request), 5);
    }

    fn span(trace_id: Vec<u8>, span_id: Vec<u8>, start: u64, end: u64) -> otlp_trace::Span {
        otlp_trace::Span {
            trace_id,
            span_id,
            name: "GET /feed".into(),
            start_time_unix_nano: start,
            end_time_unix_nano: end,
            attributes: vec![text("http.route", "/feed")],
            ..Default::default()
        }
    }

    fn trace_request(spans: Vec<otlp_trace::Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![text("service.name", "feed")],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn spans_keep_ids_times_and_attributes() {
        let converted = spans(trace_request(vec![span(vec![9; 16], vec![8; 8], T0, T1)]));
        assert_eq!(converted.rejections.count(), 0);
        let span = &converted.items[0];
        assert_eq!((span.trace_id, span.span_id), ([9; 16], [8; 8]));
        assert_eq!(
            (span.start_time_unix_nano, span.end_time_unix_nano),
            (T0, T1)
        );
        assert_eq!(span.name, "GET /feed");
        assert_eq!(
            span.attributes.get("http.route").map(String::as_str),
            Some("/feed")
        );
        assert_eq!(
            span.resource.get("service.name").map(String::as_str),
            Some("feed")
        );
    }

    #[test]
    fn invalid_spans_are_rejected_one_by_one() {
        let converted = spans(trace_request(vec![
            span(vec![9; 15], vec![8; 8], T0, T1),
            span(vec![9; 16], vec![0; 8], T0, T1),
            span(vec![9; 16], vec![8; 8], 0, T1),
            span(vec![9; 16], vec![8; 8], T1, T0),
            span(vec![9; 16], vec![8; 8], T0, T0),
        ]));
        assert_eq!(converted.items.len(), 1);
        assert_eq!(converted.rejections.count(), 4);
        assert_eq!(
            converted.rejections.message(),
            r#"span "GET /feed": trace_id has 15 bytes or is all zero (needs 16) (and 3 more rejected)"#
        );
    }
}
