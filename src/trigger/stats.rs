//! Statistics of what a series recorded over one interval: quantiles
//! interpolated linearly within buckets, mean, min and max.
//!
//! Both kinds of histogram become one list of buckets, each a count of values
//! known to lie in `[lower, upper]`, ascending. The edges a histogram leaves
//! open are closed with what is known: values below the first explicit bound
//! are taken to start at the histogram's min, or at 0 when that bound is
//! positive (latencies and sizes are never negative); values above the last
//! bound end at the max, or at the last bound when no max is given. Every
//! bucket is then narrowed to `[min, max]` when those are known, which is what
//! makes a single slow request in a wide bucket read as its real latency.

use super::rules::Statistic;
use crate::signals::ExponentialBuckets;

/// `count` values known to lie in `[lower, upper]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Bucket {
    pub lower: f64,
    pub upper: f64,
    pub count: u64,
}

/// What a histogram recorded over one interval.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Recorded {
    pub count: u64,
    pub sum: Option<f64>,
    /// The interval's own extremes, when the points tell them (see
    /// [`super::series`] for when a cumulative point does).
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// Non-empty buckets, ascending.
    pub buckets: Vec<Bucket>,
}

/// The statistic cannot be computed from this kind of point at all (a
/// quantile of a gauge, a mean of a histogram sent without its sum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unsupported;

impl Recorded {
    /// The statistic over the interval's recordings; `Ok(None)` when the
    /// interval recorded nothing.
    pub fn statistic(&self, statistic: Statistic) -> Result<Option<f64>, Unsupported> {
        match statistic {
            Statistic::Value | Statistic::Rate => Err(Unsupported),
            Statistic::Mean if self.sum.is_none() => Err(Unsupported),
            _ if self.count == 0 => Ok(None),
            Statistic::Mean => Ok(self.sum.map(|sum| sum / self.count as f64)),
            Statistic::Max => Ok(self.max()),
            Statistic::Min => Ok(self.min.or_else(|| self.quantile(0.0))),
            Statistic::Quantile { percent } => Ok(self.quantile(percent)),
        }
    }

    /// The largest value recorded: exact when the points say, otherwise the
    /// upper edge of the highest non-empty bucket (itself capped by a known
    /// max), which is never below the truth.
    pub fn max(&self) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        self.max.or_else(|| self.quantile(100.0))
    }

    /// Interpolates linearly within the bucket that holds the value of rank
    /// `percent / 100 × count`. `None` for an empty interval, or when that
    /// bucket's edge is unknown (an explicit histogram without bounds, min
    /// or max).
    pub fn quantile(&self, percent: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        // Multiplying before dividing keeps p99.9 of 1000 values at rank 999
        // exactly, rather than a hair above it and into the next bucket.
        let rank = percent * self.count as f64 / 100.0;
        let mut below = 0u64;
        let mut chosen = None;
        for bucket in &self.buckets {
            chosen = Some((bucket, below));
            if (below + bucket.count) as f64 >= rank {
                break;
            }
            below += bucket.count;
        }
        let (bucket, below) = chosen?;
        if !(bucket.lower.is_finite() && bucket.upper.is_finite()) {
            return None;
        }
        let within = ((rank - below as f64) / bucket.count as f64).clamp(0.0, 1.0);
        Some(bucket.lower + (bucket.upper - bucket.lower) * within)
    }
}

/// Buckets of an explicit-bounds histogram: `counts[i]` holds the values in
/// `(bounds[i-1], bounds[i]]`, the last one everything above the last bound.
pub(crate) fn explicit_buckets(
    bounds: &[f64],
    counts: &[u64],
    min: Option<f64>,
    max: Option<f64>,
) -> Vec<Bucket> {
    let first_lower = match (min, bounds.first()) {
        (Some(min), _) => min,
        (None, Some(&first)) if first > 0.0 => 0.0,
        // Values of unknown sign below a bound: all that is known is that
        // they are at most the bound, so report the bound.
        (None, Some(&first)) => first,
        (None, None) => f64::NEG_INFINITY,
    };
    let last_upper = max.or(bounds.last().copied()).unwrap_or(f64::INFINITY);
    let buckets = counts.iter().enumerate().map(|(i, &count)| Bucket {
        lower: match i {
            0 => first_lower,
            // Ingest checks that there is one count more than bounds; should
            // a point slip through with more, the extra counts sit at the top.
            _ => bounds.get(i - 1).copied().unwrap_or(last_upper),
        },
        upper: bounds.get(i).copied().unwrap_or(last_upper),
        count,
    });
    narrowed(buckets, min, max)
}

/// Buckets of an exponential histogram of scale `scale`: positive bucket
/// `i` holds `(base^i, base^(i+1)]`, negative bucket `i` the mirror image,
/// with `base = 2^(2^-scale)`.
pub(crate) fn exponential_buckets(
    scale: i32,
    zero_count: u64,
    positive: &ExponentialBuckets,
    negative: &ExponentialBuckets,
    min: Option<f64>,
    max: Option<f64>,
) -> Vec<Bucket> {
    let exponent_step = (-f64::from(scale)).exp2();
    let boundary = |index: i64| (index as f64 * exponent_step).exp2();
    let indexed = |buckets: &ExponentialBuckets| {
        let offset = i64::from(buckets.offset);
        buckets
            .counts
            .iter()
            .enumerate()
            .map(move |(i, &count)| (offset + i as i64, count))
            .collect::<Vec<_>>()
    };
    let negatives = indexed(negative)
        .into_iter()
        .rev()
        .map(|(index, count)| Bucket {
            lower: -boundary(index + 1),
            upper: -boundary(index),
            count,
        });
    let zero = std::iter::once(Bucket {
        lower: 0.0,
        upper: 0.0,
        count: zero_count,
    });
    let positives = indexed(positive).into_iter().map(|(index, count)| Bucket {
        lower: boundary(index),
        upper: boundary(index + 1),
        count,
    });
    narrowed(negatives.chain(zero).chain(positives), min, max)
}

/// Drops empty buckets and narrows the rest to the known `[min, max]`.
fn narrowed(
    buckets: impl Iterator<Item = Bucket>,
    min: Option<f64>,
    max: Option<f64>,
) -> Vec<Bucket> {
    buckets
        .filter(|bucket| bucket.count > 0)
        .map(|mut bucket| {
            if let Some(min) = min {
                bucket.lower = bucket.lower.max(min);
            }
            if let Some(max) = max {
                bucket.upper = bucket.upper.min(max);
            }
            bucket.lower = bucket.lower.min(bucket.upper);
            bucket
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(buckets: Vec<Bucket>, min: Option<f64>, max: Option<f64>) -> Recorded {
        Recorded {
            count: buckets.iter().map(|bucket| bucket.count).sum(),
            sum: None,
            min,
            max,
            buckets,
        }
    }

    fn assert_close(actual: Option<f64>, expected: f64) {
        let actual = actual.expect("a value");
        assert!(
            (actual - expected).abs() < 1e-9,
            "expected {expected}, got {actual}"
        );
    }

    /// Bounds 0.1, 0.2, 0.5, 1.0 (seconds) with 10, 80, 9, 1 and 0 values.
    fn latency_interval(min: Option<f64>, max: Option<f64>) -> Recorded {
        recorded(
            explicit_buckets(&[0.1, 0.2, 0.5, 1.0], &[10, 80, 9, 1, 0], min, max),
            min,
            max,
        )
    }

    #[test]
    fn explicit_quantiles_interpolate_within_the_bucket() {
        let interval = latency_interval(None, None);
        // rank 50: 40 of the 80 values in (0.1, 0.2] → half way.
        assert_close(interval.quantile(50.0), 0.15);
        // rank 90: the last value of (0.1, 0.2].
        assert_close(interval.quantile(90.0), 0.2);
        // rank 95: 5 of 9 into (0.2, 0.5].
        assert_close(interval.quantile(95.0), 0.2 + 0.3 * 5.0 / 9.0);
        // rank 99: the last of those 9.
        assert_close(interval.quantile(99.0), 0.5);
        // rank 99.9: 0.9 of the single value in (0.5, 1.0].
        assert_close(interval.quantile(99.9), 0.95);
        // The first bucket starts at 0: bound 0.1 is positive.
        assert_close(interval.quantile(5.0), 0.05);
    }

    #[test]
    fn a_known_min_and_max_narrow_the_edge_buckets() {
        let interval = latency_interval(Some(0.04), Some(0.7));
        // (0.04, 0.1]: rank 5 is half way.
        assert_close(interval.quantile(5.0), 0.07);
        // (0.5, 0.7]: rank 99.9 is 0.9 of the way.
        assert_close(interval.quantile(99.9), 0.68);
        assert_close(interval.quantile(50.0), 0.15);
    }

    #[test]
    fn the_overflow_bucket_ends_at_the_max_or_else_at_the_last_bound() {
        let counts = [0, 0, 0, 2];
        let bounds = [0.1, 0.5, 1.0];
        let with_max = recorded(
            explicit_buckets(&bounds, &counts, None, Some(6.0)),
            None,
            None,
        );
        // rank 1 of 2 in (1.0, 6.0].
        assert_close(with_max.quantile(50.0), 3.5);
        let without = recorded(explicit_buckets(&bounds, &counts, None, None), None, None);
        assert_close(without.quantile(50.0), 1.0);
        assert_close(without.quantile(99.0), 1.0);
        assert_close(without.max(), 1.0);
    }

    #[test]
    fn max_and_min_are_exact_when_known_and_bucket_edges_otherwise() {
        let exact = latency_interval(Some(0.04), Some(0.7));
        assert_eq!(exact.statistic(Statistic::Max), Ok(Some(0.7)));
        assert_eq!(exact.statistic(Statistic::Min), Ok(Some(0.04)));
        let estimated = latency_interval(None, None);
        // Upper edge of (0.5, 1.0], lower edge of [0, 0.1].
        assert_eq!(estimated.statistic(Statistic::Max), Ok(Some(1.0)));
        assert_eq!(estimated.statistic(Statistic::Min), Ok(Some(0.0)));
    }

    #[test]
    fn mean_needs_the_sum_and_an_empty_interval_has_no_statistics() {
        let mut interval = latency_interval(None, None);
        assert_eq!(interval.statistic(Statistic::Mean), Err(Unsupported));
        interval.sum = Some(25.0);
        assert_eq!(interval.statistic(Statistic::Mean), Ok(Some(0.25)));
        let empty = recorded(Vec::new(), Some(0.1), Some(0.3));
        assert_eq!(
            empty.statistic(Statistic::Quantile { percent: 99.0 }),
            Ok(None)
        );
        assert_eq!(empty.statistic(Statistic::Max), Ok(None));
        assert_eq!(empty.statistic(Statistic::Min), Ok(None));
        assert_eq!(
            latency_interval(None, None).statistic(Statistic::Rate),
            Err(Unsupported)
        );
    }

    #[test]
    fn a_first_bound_at_or_below_zero_reports_the_bound() {
        let interval = recorded(
            explicit_buckets(&[-1.0, 0.0], &[4, 0, 0], None, None),
            None,
            None,
        );
        assert_close(interval.quantile(50.0), -1.0);
        let no_bounds = recorded(explicit_buckets(&[], &[3], None, None), None, None);
        assert_eq!(no_bounds.quantile(50.0), None);
        let no_bounds_known_range = recorded(
            explicit_buckets(&[], &[4], Some(1.0), Some(3.0)),
            None,
            None,
        );
        assert_close(no_bounds_known_range.quantile(50.0), 2.0);
    }

    #[test]
    fn surplus_counts_do_not_panic() {
        let interval = recorded(explicit_buckets(&[0.1], &[1, 1, 2], None, None), None, None);
        assert_close(interval.quantile(100.0), 0.1);
    }

    fn exponential(offset: i32, counts: &[u64]) -> ExponentialBuckets {
        ExponentialBuckets {
            offset,
            counts: counts.to_vec(),
        }
    }

    #[test]
    fn exponential_quantiles_at_scale_zero_use_powers_of_two() {
        // Buckets (1, 2], (2, 4], (4, 8] with 2, 6 and 2 values.
        let buckets = exponential_buckets(
            0,
            0,
            &exponential(0, &[2, 6, 2]),
            &exponential(0, &[]),
            None,
            None,
        );
        let interval = recorded(buckets, None, None);
        // rank 5: 3 of 6 into (2, 4].
        assert_close(interval.quantile(50.0), 3.0);
        // rank 9: 1 of 2 into (4, 8].
        assert_close(interval.quantile(90.0), 6.0);
        assert_close(interval.max(), 8.0);
        let capped = recorded(
            exponential_buckets(
                0,
                0,
                &exponential(0, &[2, 6, 2]),
                &exponential(0, &[]),
                None,
                Some(7.0),
            ),
            None,
            None,
        );
        assert_close(capped.quantile(90.0), 5.5);
    }

    #[test]
    fn exponential_buckets_follow_the_scale() {
        // Scale 1: base √2. Index 2 is (2, 2√2], index 3 is (2√2, 4].
        let interval = recorded(
            exponential_buckets(
                1,
                0,
                &exponential(2, &[1, 1]),
                &exponential(0, &[]),
                None,
                None,
            ),
            None,
            None,
        );
        assert_close(interval.quantile(25.0), 2.0 + (8f64.sqrt() - 2.0) * 0.5);
        assert_close(interval.quantile(100.0), 4.0);
        // Scale -1: base 4. Index -1 is (1/4, 1], index 0 is (1, 4].
        let coarse = recorded(
            exponential_buckets(
                -1,
                0,
                &exponential(-1, &[2, 2]),
                &exponential(0, &[]),
                None,
                None,
            ),
            None,
            None,
        );
        assert_close(coarse.quantile(25.0), 0.25 + 0.75 * 0.5);
        assert_close(coarse.quantile(75.0), 2.5);
    }

    #[test]
    fn exponential_negatives_come_before_zero_and_positives() {
        // Negative index 0 is [-2, -1), then 2 zeros, then (1, 2].
        let interval = recorded(
            exponential_buckets(
                0,
                2,
                &exponential(0, &[1]),
                &exponential(0, &[1]),
                None,
                None,
            ),
            None,
            None,
        );
        assert_close(interval.quantile(0.0), -2.0);
        assert_close(interval.quantile(25.0), -1.0);
        assert_close(interval.quantile(50.0), 0.0);
        assert_close(interval.quantile(100.0), 2.0);
    }
}
