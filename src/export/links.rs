//! Links blocked samples to the requests they froze, so that a trace of a
//! slow request leads to the stacks that held it up (Pyroscope's span
//! profiles, Grafana's trace-to-profiles).
//!
//! The evidence is what the application sent: spans that overlap the
//! capture window, and exemplars (trace and span ids) on the points of the
//! histogram that breached. Only requests at least as slow as the rule's
//! threshold count (when the threshold is a duration): a request that was
//! fast by the rule's own measure was not held up by the freeze it saw.
//! Pure: the caller gathers the evidence.
//!
//! How a sample is linked, per slice of its timeline:
//! - A span that carries `thread.id` links that thread's time within the
//!   span. Once any request names its thread, only such exact matches link:
//!   there is no guessing about threads the application told us about.
//! - With no thread known at all (an application that does not tag its
//!   spans, or exemplars alone), a request links the time of every thread
//!   blocked while it ran: what the process was stuck on during it.
//!
//! A request claims a slice only if it ran for at least half the time the
//! thread was blocked in it: a 3 ms request that merely touches a 500 ms
//! slice did not spend that slice blocked. Where several requests qualify,
//! the slowest wins: the request a freeze held up longest, and of nested
//! spans, the outermost, which is the one Pyroscope keys span profiles on.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::profile::{Profile, ProfileKind, Sample, SpanLink, TimeSlice};
use crate::signals::{Exemplar, Span};
use crate::trigger::metric_unit;

/// The span attribute naming the thread that ran the span (semantic
/// conventions: the OS thread id).
pub const THREAD_ID_ATTRIBUTE: &str = "thread.id";

/// At most this many requests are considered per capture, the slowest
/// first: the ones a freeze held up are the slow ones, and the bound keeps
/// linking cheap however busy the service is.
pub const MAX_CANDIDATES: usize = 2048;

/// A request the capture may have frozen.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub link: SpanLink,
    pub start: SystemTime,
    pub end: SystemTime,
    /// The thread that served it, when the span says.
    pub thread_id: Option<u32>,
}

impl Request {
    pub fn duration(&self) -> Duration {
        self.end.duration_since(self.start).unwrap_or_default()
    }

    /// A received span; `None` for one with invalid (all-zero) ids.
    pub fn from_span(span: &Span) -> Option<Self> {
        let link = valid_link(span.trace_id, span.span_id)?;
        Some(Request {
            link,
            start: from_unix_nanos(span.start_time_unix_nano),
            end: from_unix_nanos(span.end_time_unix_nano.max(span.start_time_unix_nano)),
            thread_id: span
                .attributes
                .get(THREAD_ID_ATTRIBUTE)
                .and_then(|id| id.parse().ok()),
        })
    }

    /// An exemplar of a duration histogram in `unit`: the measurement was
    /// recorded as the request ended, and its value is how long it took.
    /// For a histogram of anything but time, the request is the instant of
    /// the measurement. `None` without trace and span ids.
    pub fn from_exemplar(exemplar: &Exemplar, unit: &str) -> Option<Self> {
        let link = valid_link(exemplar.trace_id?, exemplar.span_id?)?;
        let end = from_unix_nanos(exemplar.time_unix_nano);
        let took = metric_unit(unit)
            .filter(|unit| unit.dimension == crate::trigger::Dimension::Time)
            .map(|unit| unit.seconds(exemplar.value))
            .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
            .map_or(Duration::ZERO, |seconds| {
                Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX)
            });
        Some(Request {
            link,
            start: end.checked_sub(took).unwrap_or(UNIX_EPOCH),
            end,
            thread_id: None,
        })
    }

    /// Whether the request ran for at least half of `slice`'s blocked
    /// time within it, so that most of that time can be its. The slice is
    /// of an off-CPU profile: its value is blocked nanoseconds.
    fn accounts_for(&self, slice: &TimeSlice) -> bool {
        let from = self.start.max(slice.start);
        let until = self.end.min(slice.end());
        let overlap = until.duration_since(from).unwrap_or_default();
        overlap.as_nanos() * 2 >= u128::from(slice.value) && self.start < slice.end()
    }
}

/// Combines spans and exemplars into the requests to link to: those that
/// took at least `at_least`, slowest first, at most
/// [`MAX_CANDIDATES`]. An exemplar that names a received span adds nothing:
/// the span's own times and thread are better evidence than a measurement.
pub fn candidates(
    spans: Vec<Request>,
    exemplars: Vec<Request>,
    at_least: Duration,
) -> Vec<Request> {
    let mut by_link: HashMap<SpanLink, Request> = HashMap::with_capacity(spans.len());
    for request in spans.into_iter().chain(exemplars) {
        by_link.entry(request.link).or_insert(request);
    }
    let mut requests: Vec<Request> = by_link
        .into_values()
        .filter(|request| request.duration() >= at_least)
        .collect();
    requests.sort_by(|a, b| {
        b.duration()
            .cmp(&a.duration())
            .then(a.start.cmp(&b.start))
            .then(a.link.cmp(&b.link))
    });
    requests.truncate(MAX_CANDIDATES);
    requests
}

/// What linking did, for the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkSummary {
    /// Distinct requests some sample now links to.
    pub requests: usize,
    /// Blocked time now linked to a request.
    pub linked_ns: u64,
}

/// Links `profile`'s samples to `requests` (slowest first, as
/// [`candidates`] orders them). A sample whose timeline meets several
/// requests is split, one sample per request and one for the unlinked
/// rest; a sample without a timeline is taken as spread over the whole
/// window.
///
/// Only off-CPU profiles are linked: the rule weighs a request's duration
/// against blocked time, and the value of another kind is not a time.
pub fn link(profile: &mut Profile, requests: &[Request]) -> LinkSummary {
    if requests.is_empty() || profile.kind != ProfileKind::OffCpu {
        return LinkSummary::default();
    }
    let threads_known = requests.iter().any(|request| request.thread_id.is_some());
    let window = (profile.start, profile.start + profile.duration);
    let mut linked = Vec::with_capacity(profile.samples.len());
    let mut used: std::collections::HashSet<SpanLink> = std::collections::HashSet::new();
    let mut linked_ns = 0;
    for sample in profile.samples.drain(..) {
        let whole = [TimeSlice {
            start: window.0,
            duration: profile.duration,
            value: sample.value,
            count: sample.count,
        }];
        let slices: &[TimeSlice] = if sample.timeline.is_empty() {
            &whole
        } else {
            &sample.timeline
        };
        // Parts in order of first appearance, so the output is stable.
        let mut parts: Vec<(Option<SpanLink>, Vec<TimeSlice>)> = Vec::new();
        for slice in slices {
            let chosen = requests
                .iter()
                .filter(|request| {
                    !threads_known || request.thread_id == Some(sample.labels.thread_id)
                })
                .find(|request| request.accounts_for(slice))
                .map(|request| request.link);
            match parts.iter_mut().find(|(link, _)| *link == chosen) {
                Some((_, part)) => part.push(*slice),
                None => parts.push((chosen, vec![*slice])),
            }
        }
        if let [(None, _)] = parts.as_slice() {
            linked.push(sample);
            continue;
        }
        for (chosen, part) in parts {
            let mut piece = Sample {
                value: part.iter().map(|slice| slice.value).sum(),
                count: part.iter().map(|slice| slice.count).sum(),
                timeline: if sample.timeline.is_empty() {
                    Vec::new()
                } else {
                    part
                },
                ..sample.clone()
            };
            if let Some(link) = chosen {
                piece.labels.set_span_link(link);
                linked_ns += piece.value;
                used.insert(link);
            }
            linked.push(piece);
        }
    }
    profile.samples = linked;
    LinkSummary {
        requests: used.len(),
        linked_ns,
    }
}

fn valid_link(trace_id: [u8; 16], span_id: [u8; 8]) -> Option<SpanLink> {
    let nonzero = |bytes: &[u8]| bytes.iter().any(|&byte| byte != 0);
    (nonzero(&trace_id) && nonzero(&span_id)).then_some(SpanLink { trace_id, span_id })
}

fn from_unix_nanos(nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Frame, SampleLabels, ThreadState};
    use crate::signals::Attributes;

    const MS: u64 = 1_000_000;
    const BASE_NS: u64 = 1_700_000_000 * 1_000_000_000;

    fn at(ms: u64) -> SystemTime {
        from_unix_nanos(BASE_NS + ms * MS)
    }

    fn link_of(number: u8) -> SpanLink {
        SpanLink {
            trace_id: [number; 16],
            span_id: [number; 8],
        }
    }

    fn request(number: u8, start_ms: u64, end_ms: u64, thread_id: Option<u32>) -> Request {
        Request {
            link: link_of(number),
            start: at(start_ms),
            end: at(end_ms),
            thread_id,
        }
    }

    fn slice(start_ms: u64, blocked_ms: u64) -> TimeSlice {
        TimeSlice {
            start: at(start_ms),
            duration: Duration::from_millis(500),
            value: blocked_ms * MS,
            count: 1,
        }
    }

    fn sample(thread_id: u32, timeline: Vec<TimeSlice>) -> Sample {
        Sample {
            stack: vec![Frame::marker_truncated()],
            value: timeline.iter().map(|slice| slice.value).sum(),
            count: timeline.len() as u64,
            labels: SampleLabels {
                process_id: 1,
                thread_id,
                thread_name: format!("t{thread_id}"),
                state: ThreadState::Sleeping,
                extra: Vec::new(),
                foreign: Vec::new(),
            },
            timeline,
        }
    }

    fn profile(samples: Vec<Sample>) -> Profile {
        Profile {
            kind: ProfileKind::OffCpu,
            start: at(0),
            duration: Duration::from_secs(3),
            samples,
            mappings: Vec::new(),
            comments: Vec::new(),
        }
    }

    /// (thread, link number or 0, blocked ms) per sample.
    fn shape(profile: &Profile) -> Vec<(u32, u8, u64)> {
        profile
            .samples
            .iter()
            .map(|sample| {
                let link = sample.labels.span_link().map_or(0, |link| link.span_id[0]);
                (sample.labels.thread_id, link, sample.value / MS)
            })
            .collect()
    }

    #[test]
    fn a_span_with_a_thread_links_that_thread_in_its_time_only() {
        let mut profile = profile(vec![
            sample(
                7,
                vec![
                    slice(0, 100),
                    slice(500, 500),
                    slice(1000, 500),
                    slice(2500, 50),
                ],
            ),
            sample(8, vec![slice(500, 500)]),
        ]);
        let requests = [request(1, 600, 1400, Some(7))];
        let summary = link(&mut profile, &requests);
        assert_eq!(
            shape(&profile),
            [(7, 0, 150), (7, 1, 1000), (8, 0, 500)],
            "thread 8 ran no request we know of; thread 7 only in the span's time"
        );
        assert_eq!(
            summary,
            LinkSummary {
                requests: 1,
                linked_ns: 1000 * MS
            }
        );
        let linked = &profile.samples[1];
        assert_eq!(linked.timeline.len(), 2);
        assert_eq!(linked.count, 2);
        assert_eq!(
            profile.samples.iter().map(|s| s.value).sum::<u64>(),
            1650 * MS,
            "splitting keeps every nanosecond"
        );
    }

    #[test]
    fn only_off_cpu_profiles_are_linked() {
        let mut profile = Profile {
            kind: ProfileKind::AddressSpace,
            ..profile(vec![sample(7, vec![slice(500, 500)])])
        };
        let unlinked = profile.clone();
        let summary = link(&mut profile, &[request(1, 0, 2900, Some(7))]);
        assert_eq!(summary, LinkSummary::default());
        assert_eq!(profile, unlinked);
    }

    #[test]
    fn the_slowest_of_overlapping_requests_wins() {
        let mut profile = profile(vec![sample(7, vec![slice(1000, 500)])]);
        // A child span inside its parent, both on thread 7.
        let requests = candidates(
            vec![
                request(2, 1000, 1100, Some(7)),
                request(1, 0, 2900, Some(7)),
            ],
            Vec::new(),
            Duration::ZERO,
        );
        assert_eq!(requests[0].link, link_of(1));
        link(&mut profile, &requests);
        assert_eq!(shape(&profile), [(7, 1, 500)]);
    }

    #[test]
    fn without_any_thread_a_request_links_everything_blocked_while_it_ran() {
        let mut profile = profile(vec![
            sample(7, vec![slice(500, 500), slice(2500, 20)]),
            sample(8, vec![slice(1000, 400)]),
        ]);
        let requests = [request(1, 400, 1600, None)];
        link(&mut profile, &requests);
        assert_eq!(shape(&profile), [(7, 1, 500), (7, 0, 20), (8, 1, 400)]);
    }

    #[test]
    fn once_threads_are_known_unthreaded_evidence_does_not_guess() {
        let mut profile = profile(vec![sample(8, vec![slice(1000, 400)])]);
        let requests = candidates(
            vec![request(1, 900, 1200, Some(7))],
            vec![request(2, 0, 2900, None)],
            Duration::ZERO,
        );
        let summary = link(&mut profile, &requests);
        assert_eq!(shape(&profile), [(8, 0, 400)]);
        assert_eq!(summary, LinkSummary::default());
    }

    #[test]
    fn a_sample_without_a_timeline_spans_the_window() {
        let mut untimed = sample(7, Vec::new());
        untimed.value = 300 * MS;
        let mut profile = profile(vec![untimed]);
        link(&mut profile, &[request(1, 2000, 2950, Some(7))]);
        assert_eq!(shape(&profile), [(7, 1, 300)]);
        assert!(profile.samples[0].timeline.is_empty());
    }

    #[test]
    fn a_request_that_merely_touches_a_slice_does_not_claim_it() {
        let mut profile = profile(vec![sample(7, vec![slice(500, 400), slice(1000, 300)])]);
        // 5 ms inside the first slice; 200 ms of the second, which held 300.
        let requests = [
            request(1, 995, 1200, Some(7)),
            request(2, 600, 605, Some(7)),
        ];
        link(&mut profile, &requests);
        assert_eq!(shape(&profile), [(7, 0, 400), (7, 1, 300)]);
    }

    #[test]
    fn no_requests_leaves_the_profile_alone() {
        let original = profile(vec![sample(7, vec![slice(0, 10)])]);
        let mut linked = original.clone();
        assert_eq!(link(&mut linked, &[]), LinkSummary::default());
        assert_eq!(linked, original);
    }

    #[test]
    fn candidates_are_slow_enough_bounded_and_spans_beat_their_exemplars() {
        let span = request(1, 100, 900, Some(7));
        let exemplar = request(1, 0, 2000, None);
        let requests = candidates(vec![span.clone()], vec![exemplar], Duration::ZERO);
        assert_eq!(requests, [span]);
        let slow_only = candidates(
            vec![request(2, 0, 199, Some(7)), request(3, 0, 200, Some(7))],
            Vec::new(),
            Duration::from_millis(200),
        );
        assert_eq!(slow_only.len(), 1);
        assert_eq!(
            slow_only[0].link,
            link_of(3),
            "as slow as the threshold counts"
        );

        let many = (0..MAX_CANDIDATES as u64 + 10)
            .map(|i| Request {
                link: SpanLink {
                    trace_id: [1; 16],
                    span_id: (i + 1).to_be_bytes(),
                },
                start: at(0),
                end: at(i),
                thread_id: None,
            })
            .collect();
        let kept = candidates(many, Vec::new(), Duration::ZERO);
        assert_eq!(kept.len(), MAX_CANDIDATES);
        assert_eq!(
            kept[0].duration(),
            Duration::from_millis(MAX_CANDIDATES as u64 + 9)
        );
    }

    #[test]
    fn exemplars_become_requests_that_ended_when_measured() {
        let exemplar = Exemplar {
            time_unix_nano: BASE_NS + 5_000 * MS,
            value: 4.5,
            trace_id: Some([3; 16]),
            span_id: Some([4; 8]),
        };
        let request = Request::from_exemplar(&exemplar, "s").unwrap();
        assert_eq!((request.start, request.end), (at(500), at(5000)));
        let in_ms = Exemplar {
            value: 4500.0,
            ..exemplar.clone()
        };
        assert_eq!(Request::from_exemplar(&in_ms, "ms").unwrap().start, at(500));
        let sizes = Request::from_exemplar(&exemplar, "By").unwrap();
        assert_eq!(sizes.start, sizes.end);
        let untraced = Exemplar {
            trace_id: None,
            ..exemplar.clone()
        };
        assert_eq!(Request::from_exemplar(&untraced, "s"), None);
        let zero = Exemplar {
            span_id: Some([0; 8]),
            ..exemplar
        };
        assert_eq!(Request::from_exemplar(&zero, "s"), None);
    }

    #[test]
    fn spans_name_their_thread() {
        let span = Span {
            trace_id: [1; 16],
            span_id: [2; 8],
            name: "get".into(),
            start_time_unix_nano: BASE_NS,
            end_time_unix_nano: BASE_NS + 4_000 * MS,
            resource: Attributes::new(),
            attributes: Attributes::from([(THREAD_ID_ATTRIBUTE.to_string(), "4242".to_string())]),
        };
        let request = Request::from_span(&span).unwrap();
        assert_eq!(request.thread_id, Some(4242));
        assert_eq!(request.duration(), Duration::from_secs(4));
        let untagged = Span {
            attributes: Attributes::new(),
            ..span
        };
        assert_eq!(Request::from_span(&untagged).unwrap().thread_id, None);
    }
}
