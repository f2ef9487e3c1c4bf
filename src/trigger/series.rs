//! One series over time: from its points, as they arrive, to what happened
//! in the interval between two of them.
//!
//! A cumulative point covers the series' whole life, so the interval is the
//! *difference* from the previous point: bucket by bucket, count and sum. Its
//! min and max cover the whole life too (an OTel SDK sends them that way), so
//! they describe the interval only when they moved: a max that went up was
//! reached in this interval; one that stayed put says nothing more than "at
//! most this". A delta point is its own interval, taken as it is.
//!
//! A cumulative point that cannot follow the previous one (a new start time,
//! a count or bucket that went down, other bounds, another kind of point) is
//! a reset: the process behind it restarted, and the point starts a new
//! series with nothing to compare it with yet.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::stats::{self, Recorded};
use crate::signals::{
    ExponentialBuckets, ExponentialHistogram, Histogram, Point, PointValue, Temporality,
};

/// The time an OTLP timestamp names.
pub(crate) fn unix_time(unix_nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(unix_nanos)
}

/// What one series remembers between points.
#[derive(Debug, Default)]
pub(crate) struct Series {
    last: Option<Last>,
}

#[derive(Debug)]
struct Last {
    unit: String,
    start_time_unix_nano: u64,
    time_unix_nano: u64,
    value: PointValue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Gauge,
    Sum,
    Histogram,
}

/// What one accepted point tells.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    /// The point's own timestamp.
    pub time: SystemTime,
    pub kind: Kind,
    /// A gauge's or a sum's value, as the point states it.
    pub level: Option<f64>,
    /// What happened since the previous point. `None` for gauges, and for the
    /// first cumulative point of a series (or of a reset one).
    pub interval: Option<Interval>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Interval {
    pub start: SystemTime,
    /// From `start` to the sample's time; 0 when a delta point's start is
    /// unknown.
    pub seconds: f64,
    pub change: Change,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Change {
    /// How much a sum grew.
    Sum(f64),
    Histogram(Recorded),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Accepted {
    /// The point could not follow the previous one and began a new series.
    pub reset: bool,
    pub sample: Sample,
}

/// The point is not newer than the previous one: it was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutOfOrder;

impl Series {
    pub fn advance(&mut self, point: &Point) -> Result<Accepted, OutOfOrder> {
        if self
            .last
            .as_ref()
            .is_some_and(|last| point.time_unix_nano <= last.time_unix_nano)
        {
            return Err(OutOfOrder);
        }
        let previous = self.last.as_ref().filter(|last| same_shape(last, point));
        let delta_start = || match point.start_time_unix_nano {
            start if start > 0 && start < point.time_unix_nano => start,
            _ => previous.map_or(point.time_unix_nano, |last| last.time_unix_nano),
        };
        let (kind, level, interval) = match &point.value {
            PointValue::Gauge(value) => (Kind::Gauge, Some(*value), None),
            PointValue::Sum {
                value,
                temporality: Temporality::Delta,
                ..
            } => (
                Kind::Sum,
                Some(*value),
                Some((delta_start(), Change::Sum(*value))),
            ),
            PointValue::Sum { value, .. } => (
                Kind::Sum,
                Some(*value),
                previous.and_then(|last| cumulative_change(last, point)),
            ),
            PointValue::Histogram(histogram) => (
                Kind::Histogram,
                None,
                match histogram.temporality {
                    Temporality::Delta => Some((
                        delta_start(),
                        Change::Histogram(explicit_recorded(histogram)),
                    )),
                    Temporality::Cumulative => {
                        previous.and_then(|last| cumulative_change(last, point))
                    }
                },
            ),
            PointValue::ExponentialHistogram(histogram) => (
                Kind::Histogram,
                None,
                match histogram.temporality {
                    Temporality::Delta => Some((
                        delta_start(),
                        Change::Histogram(exponential_recorded(histogram)),
                    )),
                    Temporality::Cumulative => {
                        previous.and_then(|last| cumulative_change(last, point))
                    }
                },
            ),
        };
        // A cumulative point continues the series only if it could be
        // differenced; a delta point or a gauge, if it is of the same shape.
        let continues = if is_cumulative(&point.value) {
            interval.is_some()
        } else {
            previous.is_some()
        };
        let reset = self.last.is_some() && !continues;
        let interval = interval.map(|(start_unix_nano, change)| Interval {
            start: unix_time(start_unix_nano),
            seconds: (point.time_unix_nano - start_unix_nano) as f64 / 1e9,
            change,
        });
        self.last = Some(Last {
            unit: point.unit.clone(),
            start_time_unix_nano: point.start_time_unix_nano,
            time_unix_nano: point.time_unix_nano,
            value: point.value.clone(),
        });
        Ok(Accepted {
            reset,
            sample: Sample {
                time: unix_time(point.time_unix_nano),
                kind,
                level,
                interval,
            },
        })
    }
}

fn is_cumulative(value: &PointValue) -> bool {
    match value {
        PointValue::Gauge(_) => false,
        PointValue::Sum { temporality, .. } => *temporality == Temporality::Cumulative,
        PointValue::Histogram(histogram) => histogram.temporality == Temporality::Cumulative,
        PointValue::ExponentialHistogram(histogram) => {
            histogram.temporality == Temporality::Cumulative
        }
    }
}

/// Whether two points are of one kind of series: the same unit, kind and
/// temporality (and monotonicity, for sums).
fn same_shape(last: &Last, point: &Point) -> bool {
    let shapes_match = match (&last.value, &point.value) {
        (PointValue::Gauge(_), PointValue::Gauge(_)) => true,
        (
            PointValue::Sum {
                monotonic: was_monotonic,
                temporality: was,
                ..
            },
            PointValue::Sum {
                monotonic,
                temporality,
                ..
            },
        ) => was_monotonic == monotonic && was == temporality,
        (PointValue::Histogram(was), PointValue::Histogram(now)) => {
            was.temporality == now.temporality
        }
        (PointValue::ExponentialHistogram(was), PointValue::ExponentialHistogram(now)) => {
            was.temporality == now.temporality
        }
        _ => false,
    };
    shapes_match && last.unit == point.unit
}

/// The interval since `last`, as `(start, change)`, or `None` when the point
/// cannot follow it (a reset).
fn cumulative_change(last: &Last, point: &Point) -> Option<(u64, Change)> {
    if last.start_time_unix_nano != point.start_time_unix_nano {
        return None;
    }
    let change = match (&last.value, &point.value) {
        (
            PointValue::Sum { value: was, .. },
            PointValue::Sum {
                value, monotonic, ..
            },
        ) => {
            if *monotonic && value < was {
                return None;
            }
            Change::Sum(value - was)
        }
        (PointValue::Histogram(was), PointValue::Histogram(now)) => {
            Change::Histogram(explicit_difference(was, now)?)
        }
        (PointValue::ExponentialHistogram(was), PointValue::ExponentialHistogram(now)) => {
            Change::Histogram(exponential_difference(was, now)?)
        }
        _ => return None,
    };
    Some((last.time_unix_nano, change))
}

fn explicit_recorded(histogram: &Histogram) -> Recorded {
    Recorded {
        count: histogram.count,
        sum: histogram.sum,
        min: histogram.min,
        max: histogram.max,
        buckets: stats::explicit_buckets(
            &histogram.bounds,
            &histogram.bucket_counts,
            histogram.min,
            histogram.max,
        ),
    }
}

fn exponential_recorded(histogram: &ExponentialHistogram) -> Recorded {
    Recorded {
        count: histogram.count,
        sum: histogram.sum,
        min: histogram.min,
        max: histogram.max,
        buckets: stats::exponential_buckets(
            histogram.scale,
            histogram.zero_count,
            &histogram.positive,
            &histogram.negative,
            histogram.min,
            histogram.max,
        ),
    }
}

fn explicit_difference(was: &Histogram, now: &Histogram) -> Option<Recorded> {
    if was.bounds != now.bounds || was.bucket_counts.len() != now.bucket_counts.len() {
        return None;
    }
    let counts = now
        .bucket_counts
        .iter()
        .zip(&was.bucket_counts)
        .map(|(now, was)| now.checked_sub(*was))
        .collect::<Option<Vec<u64>>>()?;
    let (min, max) = moved_extremes(was.min, was.max, now.min, now.max);
    Some(Recorded {
        count: now.count.checked_sub(was.count)?,
        sum: difference(now.sum, was.sum),
        min,
        max,
        // The lifetime min and max still bound every value of the interval.
        buckets: stats::explicit_buckets(&now.bounds, &counts, now.min, now.max),
    })
}

fn exponential_difference(
    was: &ExponentialHistogram,
    now: &ExponentialHistogram,
) -> Option<Recorded> {
    // An SDK lowers the scale of a cumulative histogram as its range grows;
    // both points are brought to the coarser scale before subtracting.
    let scale = was.scale.min(now.scale);
    let positive = subtract(
        &downscale(&now.positive, now.scale.saturating_sub(scale)),
        &downscale(&was.positive, was.scale.saturating_sub(scale)),
    )?;
    let negative = subtract(
        &downscale(&now.negative, now.scale.saturating_sub(scale)),
        &downscale(&was.negative, was.scale.saturating_sub(scale)),
    )?;
    let zero_count = now.zero_count.checked_sub(was.zero_count)?;
    let (min, max) = moved_extremes(was.min, was.max, now.min, now.max);
    Some(Recorded {
        count: now.count.checked_sub(was.count)?,
        sum: difference(now.sum, was.sum),
        min,
        max,
        buckets: stats::exponential_buckets(
            scale, zero_count, &positive, &negative, now.min, now.max,
        ),
    })
}

fn difference(now: Option<f64>, was: Option<f64>) -> Option<f64> {
    Some(now? - was?)
}

/// The interval's own min and max, from lifetime ones: known only when they
/// moved.
fn moved_extremes(
    was_min: Option<f64>,
    was_max: Option<f64>,
    now_min: Option<f64>,
    now_max: Option<f64>,
) -> (Option<f64>, Option<f64>) {
    let min = match (was_min, now_min) {
        (Some(was), Some(now)) if now < was => Some(now),
        _ => None,
    };
    let max = match (was_max, now_max) {
        (Some(was), Some(now)) if now > was => Some(now),
        _ => None,
    };
    (min, max)
}

/// Merges buckets to a scale `shift` steps coarser: each step halves the
/// number of buckets, bucket `i` going into `i >> 1`.
fn downscale(buckets: &ExponentialBuckets, shift: i32) -> ExponentialBuckets {
    if shift <= 0 || buckets.counts.is_empty() {
        return buckets.clone();
    }
    let shift = shift.min(62);
    let offset = i64::from(buckets.offset);
    let first = offset >> shift;
    let last = (offset + buckets.counts.len() as i64 - 1) >> shift;
    let mut counts = vec![0u64; (last - first + 1) as usize];
    for (i, &count) in buckets.counts.iter().enumerate() {
        let slot = &mut counts[(((offset + i as i64) >> shift) - first) as usize];
        *slot = slot.saturating_add(count);
    }
    ExponentialBuckets {
        // A right shift of an i32 offset stays within i32.
        offset: first as i32,
        counts,
    }
}

/// `now - was`, bucket by bucket, on the index range of `now`; `None` when
/// any bucket went down (a reset).
fn subtract(now: &ExponentialBuckets, was: &ExponentialBuckets) -> Option<ExponentialBuckets> {
    let mut counts = now.counts.clone();
    for (i, &count) in was.counts.iter().enumerate() {
        if count == 0 {
            continue;
        }
        let index = i64::from(was.offset) + i as i64 - i64::from(now.offset);
        let slot = usize::try_from(index)
            .ok()
            .and_then(|index| counts.get_mut(index))?;
        *slot = slot.checked_sub(count)?;
    }
    Some(ExponentialBuckets {
        offset: now.offset,
        counts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::{Attributes, SeriesKey};
    use crate::trigger::stats::Bucket;

    const SECOND: u64 = 1_000_000_000;
    const START: u64 = 1_700_000_000 * SECOND;

    fn point(start: u64, time: u64, value: PointValue) -> Point {
        Point {
            series: SeriesKey {
                metric: "http.server.request.duration".to_string(),
                resource: Attributes::new(),
                attributes: Attributes::new(),
            },
            unit: "s".to_string(),
            start_time_unix_nano: start,
            time_unix_nano: time,
            value,
            exemplars: Vec::new(),
        }
    }

    fn histogram(
        temporality: Temporality,
        counts: &[u64],
        sum: f64,
        min: f64,
        max: f64,
    ) -> PointValue {
        PointValue::Histogram(Histogram {
            temporality,
            count: counts.iter().sum(),
            sum: Some(sum),
            min: Some(min),
            max: Some(max),
            bounds: vec![0.1, 0.5, 1.0],
            bucket_counts: counts.to_vec(),
        })
    }

    fn cumulative(time: u64, counts: &[u64], sum: f64, min: f64, max: f64) -> Point {
        point(
            START,
            time,
            histogram(Temporality::Cumulative, counts, sum, min, max),
        )
    }

    fn recorded_in(accepted: &Accepted) -> &Recorded {
        match &accepted
            .sample
            .interval
            .as_ref()
            .expect("an interval")
            .change
        {
            Change::Histogram(recorded) => recorded,
            Change::Sum(_) => panic!("a sum"),
        }
    }

    #[test]
    fn a_cumulative_histogram_is_differenced_bucket_by_bucket() {
        let mut series = Series::default();
        let first = series
            .advance(&cumulative(START + SECOND, &[5, 1, 0, 0], 0.6, 0.02, 0.3))
            .unwrap();
        assert_eq!(first.sample.interval, None, "nothing to compare with yet");
        assert!(!first.reset);
        let second = series
            .advance(&cumulative(
                START + 3 * SECOND / 2,
                &[9, 2, 0, 1],
                3.2,
                0.02,
                2.0,
            ))
            .unwrap();
        assert!(!second.reset);
        let interval = second.sample.interval.as_ref().unwrap();
        assert_eq!(interval.start, unix_time(START + SECOND));
        assert_eq!(interval.seconds, 0.5);
        let recorded = recorded_in(&second);
        assert_eq!(recorded.count, 6);
        assert!((recorded.sum.unwrap() - 2.6).abs() < 1e-12);
        // The max went up, so it was reached in this interval; the min did not move.
        assert_eq!((recorded.min, recorded.max), (None, Some(2.0)));
        assert_eq!(
            recorded.buckets,
            vec![
                Bucket {
                    lower: 0.02,
                    upper: 0.1,
                    count: 4
                },
                Bucket {
                    lower: 0.1,
                    upper: 0.5,
                    count: 1
                },
                Bucket {
                    lower: 1.0,
                    upper: 2.0,
                    count: 1
                },
            ]
        );
    }

    #[test]
    fn a_lifetime_max_that_did_not_move_only_caps_the_buckets() {
        let mut series = Series::default();
        series
            .advance(&cumulative(START + SECOND, &[0, 0, 0, 1], 5.0, 5.0, 5.0))
            .unwrap();
        let next = series
            .advance(&cumulative(
                START + 2 * SECOND,
                &[0, 1, 0, 1],
                5.3,
                0.3,
                5.0,
            ))
            .unwrap();
        let recorded = recorded_in(&next);
        assert_eq!((recorded.min, recorded.max), (Some(0.3), None));
        // Interval max estimated from the highest bucket, (0.1, 0.5].
        assert_eq!(recorded.max(), Some(0.5));
    }

    #[test]
    fn a_delta_histogram_is_taken_as_it_is() {
        let mut series = Series::default();
        let delta = point(
            START,
            START + SECOND / 2,
            histogram(Temporality::Delta, &[1, 0, 0, 1], 3.05, 0.05, 3.0),
        );
        let accepted = series.advance(&delta).unwrap();
        assert!(!accepted.reset);
        let interval = accepted.sample.interval.as_ref().unwrap();
        assert_eq!(interval.start, unix_time(START));
        assert_eq!(interval.seconds, 0.5);
        let recorded = recorded_in(&accepted);
        assert_eq!(recorded.count, 2);
        assert_eq!((recorded.min, recorded.max), (Some(0.05), Some(3.0)));
        // Without a start time, a delta point runs from the previous one.
        let next = point(
            0,
            START + SECOND,
            histogram(Temporality::Delta, &[2, 0, 0, 0], 0.1, 0.05, 0.05),
        );
        let accepted = series.advance(&next).unwrap();
        let interval = accepted.sample.interval.as_ref().unwrap();
        assert_eq!(interval.start, unix_time(START + SECOND / 2));
        assert_eq!(recorded_in(&accepted).count, 2);
    }

    #[test]
    fn a_new_start_time_or_a_falling_count_is_a_reset() {
        let mut series = Series::default();
        series
            .advance(&cumulative(START + SECOND, &[5, 1, 0, 0], 0.6, 0.02, 0.3))
            .unwrap();
        let fewer = series
            .advance(&cumulative(
                START + 2 * SECOND,
                &[1, 0, 0, 0],
                0.05,
                0.05,
                0.05,
            ))
            .unwrap();
        assert!(fewer.reset);
        assert_eq!(fewer.sample.interval, None);
        // The reset point is the new baseline.
        let after = series
            .advance(&cumulative(
                START + 3 * SECOND,
                &[2, 0, 0, 0],
                0.1,
                0.05,
                0.05,
            ))
            .unwrap();
        assert!(!after.reset);
        assert_eq!(recorded_in(&after).count, 1);
        let restarted = point(
            START + 10 * SECOND,
            START + 11 * SECOND,
            histogram(Temporality::Cumulative, &[3, 0, 0, 0], 0.1, 0.01, 0.05),
        );
        let accepted = series.advance(&restarted).unwrap();
        assert!(accepted.reset, "a new start time means a restart");
        assert_eq!(accepted.sample.interval, None);
    }

    #[test]
    fn one_bucket_going_down_is_a_reset_even_when_the_count_grows() {
        let mut series = Series::default();
        series
            .advance(&cumulative(START + SECOND, &[5, 1, 0, 0], 0.6, 0.02, 0.3))
            .unwrap();
        let accepted = series
            .advance(&cumulative(
                START + 2 * SECOND,
                &[4, 9, 0, 0],
                2.0,
                0.02,
                0.3,
            ))
            .unwrap();
        assert!(accepted.reset);
    }

    #[test]
    fn other_bounds_or_another_unit_are_a_reset() {
        let mut series = Series::default();
        series
            .advance(&cumulative(START + SECOND, &[5, 1, 0, 0], 0.6, 0.02, 0.3))
            .unwrap();
        let mut rebucketed = cumulative(START + 2 * SECOND, &[6, 1, 0, 0], 0.7, 0.02, 0.3);
        if let PointValue::Histogram(histogram) = &mut rebucketed.value {
            histogram.bounds = vec![0.2, 0.5, 1.0];
        }
        assert!(series.advance(&rebucketed).unwrap().reset);
        let mut in_ms = cumulative(START + 3 * SECOND, &[7, 1, 0, 0], 0.8, 0.02, 0.3);
        in_ms.unit = "ms".to_string();
        assert!(series.advance(&in_ms).unwrap().reset);
    }

    #[test]
    fn points_not_newer_than_the_last_are_dropped() {
        let mut series = Series::default();
        series
            .advance(&cumulative(
                START + 2 * SECOND,
                &[5, 1, 0, 0],
                0.6,
                0.02,
                0.3,
            ))
            .unwrap();
        let older = cumulative(START + SECOND, &[4, 1, 0, 0], 0.5, 0.02, 0.3);
        assert_eq!(series.advance(&older), Err(OutOfOrder));
        let same_time = cumulative(START + 2 * SECOND, &[5, 1, 0, 0], 0.6, 0.02, 0.3);
        assert_eq!(series.advance(&same_time), Err(OutOfOrder));
        // The dropped points left no trace: the next interval is from the last accepted point.
        let next = series
            .advance(&cumulative(
                START + 3 * SECOND,
                &[6, 1, 0, 0],
                0.65,
                0.02,
                0.3,
            ))
            .unwrap();
        assert_eq!(recorded_in(&next).count, 1);
        assert_eq!(
            next.sample.interval.unwrap().start,
            unix_time(START + 2 * SECOND)
        );
    }

    fn sum(value: f64, monotonic: bool, temporality: Temporality) -> PointValue {
        PointValue::Sum {
            value,
            monotonic,
            temporality,
        }
    }

    #[test]
    fn sums_give_their_growth_and_a_falling_counter_resets() {
        let mut series = Series::default();
        let first = series
            .advance(&point(
                START,
                START + SECOND,
                sum(100.0, true, Temporality::Cumulative),
            ))
            .unwrap();
        assert_eq!(first.sample.level, Some(100.0));
        assert_eq!(first.sample.interval, None);
        let grown = series
            .advance(&point(
                START,
                START + 3 * SECOND,
                sum(150.0, true, Temporality::Cumulative),
            ))
            .unwrap();
        let interval = grown.sample.interval.unwrap();
        assert_eq!(
            (interval.seconds, interval.change),
            (2.0, Change::Sum(50.0))
        );
        let fell = series
            .advance(&point(
                START,
                START + 4 * SECOND,
                sum(10.0, true, Temporality::Cumulative),
            ))
            .unwrap();
        assert!(fell.reset);
        // An up-down counter may fall.
        let mut gauge_like = Series::default();
        gauge_like
            .advance(&point(
                START,
                START + SECOND,
                sum(5.0, false, Temporality::Cumulative),
            ))
            .unwrap();
        let fell = gauge_like
            .advance(&point(
                START,
                START + 2 * SECOND,
                sum(3.0, false, Temporality::Cumulative),
            ))
            .unwrap();
        assert!(!fell.reset);
        assert_eq!(fell.sample.interval.unwrap().change, Change::Sum(-2.0));
        let mut delta = Series::default();
        let accepted = delta
            .advance(&point(
                START,
                START + 2 * SECOND,
                sum(8.0, true, Temporality::Delta),
            ))
            .unwrap();
        let interval = accepted.sample.interval.unwrap();
        assert_eq!((interval.seconds, interval.change), (2.0, Change::Sum(8.0)));
    }

    fn exponential(
        scale: i32,
        zero_count: u64,
        offset: i32,
        counts: &[u64],
        max: f64,
    ) -> PointValue {
        PointValue::ExponentialHistogram(ExponentialHistogram {
            temporality: Temporality::Cumulative,
            count: zero_count + counts.iter().sum::<u64>(),
            sum: None,
            min: Some(0.0),
            max: Some(max),
            scale,
            zero_count,
            positive: ExponentialBuckets {
                offset,
                counts: counts.to_vec(),
            },
            negative: ExponentialBuckets::default(),
        })
    }

    #[test]
    fn a_cumulative_exponential_histogram_is_differenced_across_a_scale_change() {
        let mut series = Series::default();
        // Scale 1: index 2 is (2, 2.83], index 3 (2.83, 4].
        series
            .advance(&point(
                START,
                START + SECOND,
                exponential(1, 1, 2, &[1, 1], 4.0),
            ))
            .unwrap();
        // Scale 0: index 1 is (2, 4] (both old buckets), index 2 (4, 8].
        let accepted = series
            .advance(&point(
                START,
                START + 2 * SECOND,
                exponential(0, 1, 1, &[3, 2], 8.0),
            ))
            .unwrap();
        assert!(!accepted.reset);
        let recorded = recorded_in(&accepted);
        assert_eq!(recorded.count, 3);
        assert_eq!(recorded.max, Some(8.0));
        assert_eq!(
            recorded.buckets,
            vec![
                Bucket {
                    lower: 2.0,
                    upper: 4.0,
                    count: 1
                },
                Bucket {
                    lower: 4.0,
                    upper: 8.0,
                    count: 2
                },
            ]
        );
    }

    #[test]
    fn exponential_buckets_that_vanish_or_fall_are_a_reset() {
        let mut series = Series::default();
        series
            .advance(&point(
                START,
                START + SECOND,
                exponential(0, 0, 5, &[1], 64.0),
            ))
            .unwrap();
        let moved = series
            .advance(&point(
                START,
                START + 2 * SECOND,
                exponential(0, 0, 0, &[2], 64.0),
            ))
            .unwrap();
        assert!(moved.reset, "bucket 5 vanished");
    }

    #[test]
    fn downscaling_merges_pairs_of_buckets_including_negative_indexes() {
        let buckets = ExponentialBuckets {
            offset: -3,
            counts: vec![1, 2, 3, 4, 5],
        };
        // Indexes -3..=1 go to -2, -1, -1, 0, 0.
        assert_eq!(
            downscale(&buckets, 1),
            ExponentialBuckets {
                offset: -2,
                counts: vec![1, 5, 9],
            }
        );
    }
}
