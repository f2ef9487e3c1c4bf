//! Recently finished spans, kept briefly so that a capture can name the
//! requests it froze.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::counters::SPANS_DROPPED;
use crate::signals::Span;

/// A bounded store of finished spans: at most `capacity` spans, each kept
/// for `retention` after it arrived. When full, the oldest arrivals go first
/// and are counted as dropped.
///
/// Retention runs on arrival time (our monotonic clock), not on the span's
/// own timestamps, so a sender with a skewed clock cannot pin spans in
/// memory or have them expire early.
#[derive(Debug)]
pub struct SpanStore {
    capacity: usize,
    retention: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// In arrival order, oldest first.
    spans: VecDeque<(Instant, Span)>,
    dropped: u64,
}

impl SpanStore {
    /// A store for up to `capacity` spans, each kept for `retention`.
    pub fn new(capacity: usize, retention: Duration) -> Self {
        Self {
            capacity,
            retention,
            state: Mutex::new(State::default()),
        }
    }

    /// Adds spans that just arrived.
    pub fn insert(&self, spans: Vec<Span>) {
        self.insert_at(Instant::now(), spans);
    }

    /// Spans that overlap the wall-clock window `[start, end]`, in arrival
    /// order.
    pub fn overlapping(&self, start: SystemTime, end: SystemTime) -> Vec<Span> {
        self.overlapping_at(Instant::now(), start, end)
    }

    /// Spans held now.
    pub fn len(&self) -> usize {
        self.lock().spans.len()
    }

    /// Whether no span is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Spans evicted because the store was full, since it was created.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    fn insert_at(&self, now: Instant, spans: Vec<Span>) {
        let mut state = self.lock();
        self.expire(&mut state, now);
        state
            .spans
            .extend(spans.into_iter().map(|span| (now, span)));
        let excess = state.spans.len().saturating_sub(self.capacity);
        if excess > 0 {
            state.spans.drain(..excess);
            state.dropped += excess as u64;
            metrics::counter!(SPANS_DROPPED).increment(excess as u64);
        }
    }

    fn overlapping_at(&self, now: Instant, start: SystemTime, end: SystemTime) -> Vec<Span> {
        let (start, end) = (unix_nanos(start), unix_nanos(end));
        let mut state = self.lock();
        self.expire(&mut state, now);
        state
            .spans
            .iter()
            .filter(|(_, span)| {
                span.start_time_unix_nano <= end && span.end_time_unix_nano >= start
            })
            .map(|(_, span)| span.clone())
            .collect()
    }

    fn expire(&self, state: &mut State, now: Instant) {
        while let Some((arrived, _)) = state.spans.front() {
            if now.saturating_duration_since(*arrived) <= self.retention {
                break;
            }
            state.spans.pop_front();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent after every statement, so a panic elsewhere
        // while holding the lock leaves nothing half-done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn span(number: u8, start_s: u64, end_s: u64) -> Span {
        Span {
            trace_id: [number; 16],
            span_id: [number; 8],
            name: format!("span {number}"),
            start_time_unix_nano: start_s * SECOND,
            end_time_unix_nano: end_s * SECOND,
            resource: Default::default(),
            attributes: Default::default(),
        }
    }

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    fn names(spans: &[Span]) -> Vec<&str> {
        spans.iter().map(|span| span.name.as_str()).collect()
    }

    #[test]
    fn finds_spans_that_overlap_the_window_at_all() {
        let store = SpanStore::new(10, Duration::from_secs(60));
        store.insert(vec![
            span(1, 100, 105),
            span(2, 108, 120),
            span(3, 121, 122),
            span(4, 90, 130),
        ]);
        let found = store.overlapping(at(105), at(110));
        assert_eq!(names(&found), ["span 1", "span 2", "span 4"]);
        assert!(store.overlapping(at(131), at(140)).is_empty());
    }

    #[test]
    fn a_full_store_drops_the_oldest_arrivals_and_counts_them() {
        let store = SpanStore::new(3, Duration::from_secs(60));
        store.insert(vec![span(1, 1, 2), span(2, 1, 2)]);
        store.insert(vec![span(3, 1, 2), span(4, 1, 2), span(5, 1, 2)]);
        assert_eq!(store.len(), 3);
        assert_eq!(store.dropped(), 2);
        assert_eq!(
            names(&store.overlapping(at(0), at(10))),
            ["span 3", "span 4", "span 5"]
        );
    }

    #[test]
    fn spans_expire_after_the_retention_without_counting_as_dropped() {
        let store = SpanStore::new(10, Duration::from_secs(30));
        let start = Instant::now();
        store.insert_at(start, vec![span(1, 1, 2)]);
        store.insert_at(start + Duration::from_secs(20), vec![span(2, 1, 2)]);
        let window = (at(0), at(10));
        assert_eq!(
            store
                .overlapping_at(start + Duration::from_secs(30), window.0, window.1)
                .len(),
            2
        );
        let later = store.overlapping_at(start + Duration::from_secs(31), window.0, window.1);
        assert_eq!(names(&later), ["span 2"]);
        assert_eq!(store.dropped(), 0);
        assert!(store
            .overlapping_at(start + Duration::from_secs(60), window.0, window.1)
            .is_empty());
        assert!(store.is_empty());
    }
}
