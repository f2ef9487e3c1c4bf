//! The evidence a capture is linked with: exemplars of recent metric points,
//! kept here because only the trigger loop sees the points, and the spans
//! the receivers keep in the [`SpanStore`].

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use crate::export::links::{self, Request};
use crate::ingest::SpanStore;
use crate::signals::{Exemplar, MetricBatch, SeriesKey};

/// Exemplars of recent points, by series: at most `capacity` points' worth,
/// each kept for `retention` after it arrived (our clock, as for spans).
#[derive(Debug)]
pub struct ExemplarStore {
    capacity: usize,
    retention: Duration,
    points: Mutex<VecDeque<Recorded>>,
}

#[derive(Debug)]
struct Recorded {
    arrived: Instant,
    series: SeriesKey,
    unit: String,
    exemplars: Vec<Exemplar>,
}

impl ExemplarStore {
    pub fn new(capacity: usize, retention: Duration) -> Self {
        ExemplarStore {
            capacity,
            retention,
            points: Mutex::new(VecDeque::new()),
        }
    }

    /// Keeps the exemplars of a batch's points that carry trace ids.
    pub fn record(&self, batch: &MetricBatch) {
        let now = Instant::now();
        let mut points = self.lock();
        for point in &batch.points {
            let exemplars: Vec<Exemplar> = point
                .exemplars
                .iter()
                .filter(|exemplar| exemplar.trace_id.is_some() && exemplar.span_id.is_some())
                .cloned()
                .collect();
            if exemplars.is_empty() {
                continue;
            }
            points.push_back(Recorded {
                arrived: now,
                series: point.series.clone(),
                unit: point.unit.clone(),
                exemplars,
            });
        }
        let excess = points.len().saturating_sub(self.capacity);
        points.drain(..excess);
        while points
            .front()
            .is_some_and(|oldest| now.saturating_duration_since(oldest.arrived) > self.retention)
        {
            points.pop_front();
        }
    }

    /// Requests the exemplars of `series` stand for that overlap
    /// `[start, end)`.
    pub fn requests(&self, series: &SeriesKey, start: SystemTime, end: SystemTime) -> Vec<Request> {
        self.lock()
            .iter()
            .filter(|recorded| recorded.series == *series)
            .flat_map(|recorded| {
                recorded
                    .exemplars
                    .iter()
                    .filter_map(|exemplar| Request::from_exemplar(exemplar, &recorded.unit))
            })
            .filter(|request| request.start < end && request.end > start)
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Recorded>> {
        // Each update leaves the queue consistent.
        self.points.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The requests a capture of `[start, end)` may have frozen: spans that
/// overlap the window, and the exemplars of the series that breached, that
/// took at least `at_least`. Spans of other services are left out when the
/// series names its service.
pub fn requests(
    spans: &SpanStore,
    exemplars: &ExemplarStore,
    series: Option<&SeriesKey>,
    (start, end): (SystemTime, SystemTime),
    at_least: Duration,
) -> Vec<Request> {
    let service = series.and_then(|series| series.resource.get("service.name"));
    let from_spans = spans
        .overlapping(start, end)
        .iter()
        .filter(|span| service.is_none() || span.resource.get("service.name") == service)
        .filter_map(Request::from_span)
        .collect();
    let from_exemplars = series
        .map(|series| exemplars.requests(series, start, end))
        .unwrap_or_default();
    links::candidates(from_spans, from_exemplars, at_least)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::{Attributes, Point, PointValue};

    const SECOND: u64 = 1_000_000_000;

    fn series(service: &str) -> SeriesKey {
        SeriesKey {
            metric: "db.client.operation.duration".into(),
            resource: Attributes::from([("service.name".into(), service.into())]),
            attributes: Attributes::new(),
        }
    }

    fn point(service: &str, exemplars: Vec<Exemplar>) -> Point {
        Point {
            series: series(service),
            unit: "s".into(),
            start_time_unix_nano: 0,
            time_unix_nano: 100 * SECOND,
            value: PointValue::Gauge(1.0),
            exemplars,
        }
    }

    fn exemplar(number: u8, at_s: u64, took_s: f64) -> Exemplar {
        Exemplar {
            time_unix_nano: at_s * SECOND,
            value: took_s,
            trace_id: Some([number; 16]),
            span_id: Some([number; 8]),
        }
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn exemplars_of_the_series_in_the_window_become_requests() {
        let store = ExemplarStore::new(100, Duration::from_secs(60));
        store.record(&MetricBatch {
            received_at: at(100),
            points: vec![
                point("feed", vec![exemplar(1, 50, 4.0), exemplar(2, 90, 0.1)]),
                point("other", vec![exemplar(3, 50, 4.0)]),
                point(
                    "feed",
                    vec![Exemplar {
                        trace_id: None,
                        ..exemplar(4, 50, 4.0)
                    }],
                ),
            ],
        });
        let found = store.requests(&series("feed"), at(40), at(47));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].link.span_id, [1; 8]);
        assert_eq!(found[0].start, at(46));
    }

    #[test]
    fn the_store_is_bounded() {
        let store = ExemplarStore::new(2, Duration::from_secs(60));
        for number in 1..=3 {
            store.record(&MetricBatch {
                received_at: at(100),
                points: vec![point("feed", vec![exemplar(number, 50, 1.0)])],
            });
        }
        let kept: Vec<u8> = store
            .requests(&series("feed"), at(0), at(100))
            .iter()
            .map(|request| request.link.span_id[0])
            .collect();
        assert_eq!(kept, [2, 3]);
    }
}
