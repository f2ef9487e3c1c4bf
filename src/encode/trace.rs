//! A capture as an OTLP span, `freezeframe.capture`, over its window on the
//! sidecar's own service: in a trace view the freeze then sits next to the
//! requests it held up.
//!
//! The span links to each request the capture's samples are linked to
//! (most blocked time first), carries the rule, its value and the lock
//! most time was lost to, and names in `pyroscope.profile.id` the span id
//! of the request it holds the most blocked time of: an id the profile's
//! samples carry as `span_id`, which is what Tempo's "Profiles for this
//! span" asks Pyroscope for.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::{Link, SpanKind};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

use super::otlp::Attribute;
use crate::profile::labels::Key;
use crate::profile::{hex, Profile, SpanLink};

/// The span's name.
pub const SPAN_NAME: &str = "freezeframe.capture";
/// The attribute Tempo's `tracesToProfiles` looks for.
pub const PROFILE_ID: &str = "pyroscope.profile.id";
/// Links a span carries at most: the OpenTelemetry SDKs' default limit.
pub const MAX_LINKS: usize = 128;

/// What the span says besides the profile.
pub struct CaptureSpan<'a> {
    /// The off-CPU profile, linked to the requests it froze.
    pub profile: &'a Profile,
    /// The sidecar's own resource.
    pub resource: &'a [Attribute],
    /// The rule, its value and the capture id (see
    /// [`capture_attributes`](crate::export::resource::capture_attributes)).
    pub attributes: &'a [Attribute],
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
}

/// The linked requests, most blocked time first (ties by id).
pub fn linked_requests(profile: &Profile) -> Vec<(SpanLink, u64)> {
    let mut linked: HashMap<SpanLink, u64> = HashMap::new();
    for sample in &profile.samples {
        if let Some(link) = sample.labels.span_link() {
            *linked.entry(link).or_default() += sample.value;
        }
    }
    let mut linked: Vec<(SpanLink, u64)> = linked.into_iter().collect();
    linked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    linked
}

/// The lock the profile's samples waited longest for, by name.
fn lock_waited_longest(profile: &Profile) -> Option<&str> {
    let mut waited: HashMap<&str, u64> = HashMap::new();
    for sample in &profile.samples {
        if let Some(lock) = sample.labels.label(Key::Lock) {
            *waited.entry(lock).or_default() += sample.value;
        }
    }
    waited
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
        .map(|(lock, _)| lock)
}

/// The export request of one capture span.
pub fn request(span: &CaptureSpan<'_>) -> ExportTraceServiceRequest {
    let profile = span.profile;
    let linked = linked_requests(profile);
    let mut attributes: Vec<KeyValue> = span.attributes.iter().map(key_value).collect();
    if let Some(unit) = span
        .attributes
        .iter()
        .find_map(|attribute| attribute.unit.clone())
    {
        attributes.push(key_value(&Attribute::str("freezeframe.rule.unit", unit)));
    }
    if let Some(lock) = lock_waited_longest(profile) {
        attributes.push(key_value(&Attribute::str("freezeframe.lock", lock)));
    }
    attributes.push(key_value(&Attribute::int(
        "freezeframe.blocked_ns",
        i64::try_from(profile.total_value()).unwrap_or(i64::MAX),
    )));
    if let Some((link, _)) = linked.first() {
        attributes.push(key_value(&Attribute::str(PROFILE_ID, hex(&link.span_id))));
    }
    let links = linked
        .iter()
        .take(MAX_LINKS)
        .map(|(link, blocked_ns)| Link {
            trace_id: link.trace_id.to_vec(),
            span_id: link.span_id.to_vec(),
            attributes: vec![key_value(&Attribute::int(
                "freezeframe.blocked_ns",
                i64::try_from(*blocked_ns).unwrap_or(i64::MAX),
            ))],
            ..Link::default()
        })
        .collect();
    let otlp_span = Span {
        trace_id: span.trace_id.to_vec(),
        span_id: span.span_id.to_vec(),
        name: SPAN_NAME.to_string(),
        kind: SpanKind::Internal as i32,
        start_time_unix_nano: unix_nanos(profile.start),
        end_time_unix_nano: unix_nanos(profile.start + profile.duration),
        attributes,
        links,
        dropped_links_count: u32::try_from(linked.len().saturating_sub(MAX_LINKS))
            .unwrap_or(u32::MAX),
        ..Span::default()
    };
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: span.resource.iter().map(key_value).collect(),
                ..Resource::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: env!("CARGO_PKG_NAME").to_string(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    ..InstrumentationScope::default()
                }),
                spans: vec![otlp_span],
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

fn key_value(attribute: &Attribute) -> KeyValue {
    KeyValue {
        key: attribute.key.clone(),
        value: Some(attribute.value.to_any()),
        ..KeyValue::default()
    }
}

fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::profile::{ProfileKind, Sample, SampleLabels};

    fn sample(value: u64, link: Option<SpanLink>, lock: Option<&str>) -> Sample {
        let mut labels = SampleLabels::default();
        if let Some(link) = link {
            labels.set_span_link(link);
        }
        if let Some(lock) = lock {
            labels.set(Key::Lock, lock);
        }
        Sample {
            stack: Vec::new(),
            value,
            count: 1,
            labels,
            timeline: Vec::new(),
        }
    }

    #[test]
    fn the_span_covers_the_window_links_the_requests_and_names_the_heaviest() {
        let (small, large) = (
            SpanLink {
                trace_id: [1; 16],
                span_id: [1; 8],
            },
            SpanLink {
                trace_id: [2; 16],
                span_id: [2; 8],
            },
        );
        let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let profile = Profile {
            kind: ProfileKind::OffCpu,
            start,
            duration: Duration::from_secs(3),
            samples: vec![
                sample(10, Some(small), Some("futex@0x10")),
                sample(25, Some(large), Some("mmap_lock")),
                sample(20, Some(small), Some("futex@0x10")),
                sample(7, None, None),
            ],
            mappings: Vec::new(),
            comments: Vec::new(),
        };
        let resource = [Attribute::str("service.name", "freezeframe")];
        let attributes = [Attribute::str("freezeframe.rule.name", "feed-latency")];
        let request = request(&CaptureSpan {
            profile: &profile,
            resource: &resource,
            attributes: &attributes,
            trace_id: [9; 16],
            span_id: [8; 8],
        });
        let span = &request.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.name, SPAN_NAME);
        assert_eq!(
            (span.start_time_unix_nano, span.end_time_unix_nano),
            (unix_nanos(start), unix_nanos(start) + 3_000_000_000)
        );
        let linked: Vec<&[u8]> = span
            .links
            .iter()
            .map(|link| link.span_id.as_slice())
            .collect();
        assert_eq!(
            linked,
            [&[1u8; 8][..], &[2u8; 8][..]],
            "30 ns behind the first, 25 behind the second"
        );
        let value = |key: &str| {
            span.attributes
                .iter()
                .find(|kv| kv.key == key)
                .and_then(|kv| kv.value.clone())
        };
        let text = |key: &str| match value(key).and_then(|v| v.value) {
            Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => s,
            other => panic!("{key}: {other:?}"),
        };
        assert_eq!(text(PROFILE_ID), "0101010101010101");
        assert_eq!(text("freezeframe.lock"), "futex@0x10");
        assert_eq!(text("freezeframe.rule.name"), "feed-latency");
    }

    #[test]
    fn without_a_linked_request_there_is_no_profile_id() {
        let profile = Profile {
            kind: ProfileKind::OffCpu,
            start: UNIX_EPOCH,
            duration: Duration::from_secs(1),
            samples: vec![sample(5, None, None)],
            mappings: Vec::new(),
            comments: Vec::new(),
        };
        let request = request(&CaptureSpan {
            profile: &profile,
            resource: &[],
            attributes: &[],
            trace_id: [9; 16],
            span_id: [8; 8],
        });
        let span = &request.resource_spans[0].scope_spans[0].spans[0];
        assert!(span.links.is_empty());
        assert!(span.attributes.iter().all(|kv| kv.key != PROFILE_ID));
    }
}
