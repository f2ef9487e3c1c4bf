//! Pyroscope's push API (`push.v1.PusherService/Push`): a `PushRequest` of
//! one series per profile, each its labels and the profile as a gzipped
//! pprof.
//!
//! The series labels are `__name__` (named as Pyroscope names the OTLP
//! profile: `off_cpu`, `address_space`), `service_name`, and the resource
//! attributes as strings, under names every Pyroscope release takes. The
//! pprof carries the sample labels [`Target::Pyroscope`] maps: strings
//! only, `span_id` and `trace_id` for span profiles, and the detail as leaf
//! frames. Its period type is the kind's own, so the profile type id is the
//! one the OTLP path gives: `off_cpu:off_cpu:nanoseconds::`.
//!
//! The messages are written out by hand from Pyroscope's `push.v1` and
//! `types.v1` protos (field numbers as there), like the pprof ones.

use super::otlp::{Envelope, Value};
use super::pprof;
use crate::profile::labels::Target;
use crate::profile::{self as model, hex};

/// `push.v1.PushRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PushRequest {
    #[prost(message, repeated, tag = "1")]
    pub series: Vec<RawProfileSeries>,
}

/// `push.v1.RawProfileSeries`: one series and its profiles.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RawProfileSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<LabelPair>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<RawSample>,
}

/// `push.v1.RawSample`: one profile.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RawSample {
    /// A pprof, gzipped.
    #[prost(bytes = "vec", tag = "1")]
    pub raw_profile: Vec<u8>,
    /// The profile's id, as a UUID.
    #[prost(string, tag = "2")]
    pub id: String,
}

/// `types.v1.LabelPair`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LabelPair {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// What Pyroscope calls a service it was told nothing about.
const UNKNOWN_SERVICE: &str = "unknown_service";

/// One push request for a capture's profiles, each with its envelope.
pub fn push_request(profiles: &[(&model::Profile, &Envelope)]) -> PushRequest {
    PushRequest {
        series: profiles
            .iter()
            .map(|&(profile, envelope)| RawProfileSeries {
                labels: series_labels(profile, envelope),
                samples: vec![RawSample {
                    raw_profile: pprof::encode_for(profile, Target::Pyroscope),
                    id: uuid(&envelope.profile_id),
                }],
            })
            .collect(),
    }
}

/// The series name, as Pyroscope derives it for the same profile over
/// OTLP: the period type's, else the value type's.
pub fn series_name(kind: model::ProfileKind) -> &'static str {
    kind.period_type().unwrap_or(kind.value_type()).0
}

/// `__name__`, `service_name` and the resource, sorted by name, each name
/// once (the first resource attribute of a name wins).
fn series_labels(profile: &model::Profile, envelope: &Envelope) -> Vec<LabelPair> {
    let service = envelope
        .resource
        .iter()
        .find(|attribute| attribute.key == "service.name")
        .and_then(|attribute| match &attribute.value {
            Value::Str(name) if !name.is_empty() => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_else(|| UNKNOWN_SERVICE.to_string());
    let mut labels = vec![
        label("__name__", series_name(profile.kind).to_string()),
        label("service_name", service),
    ];
    for attribute in &envelope.resource {
        let name = label_name(&attribute.key);
        if attribute.key == "service.name" || labels.iter().any(|known| known.name == name) {
            continue;
        }
        let value = match &attribute.value {
            Value::Str(text) => text.clone(),
            Value::Int(number) => number.to_string(),
            Value::Double(number) => number.to_string(),
            Value::Bool(flag) => flag.to_string(),
        };
        labels.push(label(&name, value));
    }
    labels.sort_by(|a, b| a.name.cmp(&b.name));
    labels
}

fn label(name: &str, value: String) -> LabelPair {
    LabelPair {
        name: name.to_string(),
        value,
    }
}

/// An attribute key as a label name every Pyroscope release accepts
/// (Prometheus' `[a-zA-Z_][a-zA-Z0-9_]*`): `k8s.pod.name` is
/// `k8s_pod_name`, as Pyroscope 1.x writes it for OTLP too.
fn label_name(key: &str) -> String {
    let mut name: String = key
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        name.insert(0, '_');
    }
    name
}

/// 16 bytes in the 8-4-4-4-12 form of a UUID.
fn uuid(id: &[u8; 16]) -> String {
    let text = hex(id);
    format!(
        "{}-{}-{}-{}-{}",
        &text[..8],
        &text[8..12],
        &text[12..16],
        &text[16..20],
        &text[20..]
    )
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use prost::Message;

    use super::*;
    use crate::encode::otlp::Attribute;
    use crate::profile::labels::Key;
    use crate::profile::{ProfileKind, Sample, SampleLabels, SpanLink};

    fn profile(kind: ProfileKind) -> model::Profile {
        let mut labels = SampleLabels {
            thread_id: 7,
            process_id: 3,
            thread_name: "worker".into(),
            ..SampleLabels::default()
        };
        labels.set(Key::Lock, "futex@0x10");
        labels.set_span_link(SpanLink {
            trace_id: [0xaa; 16],
            span_id: [0xbb; 8],
        });
        model::Profile {
            kind,
            start: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            duration: Duration::from_secs(3),
            samples: vec![Sample {
                stack: vec![crate::profile::fixtures::kernel(0x10, "schedule")],
                value: 5,
                count: 1,
                labels,
                timeline: Vec::new(),
            }],
            mappings: Vec::new(),
            comments: Vec::new(),
        }
    }

    fn envelope() -> Envelope {
        Envelope {
            resource: vec![
                Attribute::str("k8s.pod.name", "feed-1"),
                Attribute::str("service.name", "feed"),
                Attribute::int("process.pid", 42),
                Attribute::str("k8s-pod-name", "shadowed"),
                Attribute::str("1st", "x"),
            ],
            profile_id: [0x12; 16],
            ..Envelope::default()
        }
    }

    fn pairs(series: &RawProfileSeries) -> Vec<(&str, &str)> {
        series
            .labels
            .iter()
            .map(|label| (label.name.as_str(), label.value.as_str()))
            .collect()
    }

    #[test]
    fn a_series_per_profile_named_as_over_otlp_with_the_resource_as_labels() {
        let (off_cpu, address_space) = (
            profile(ProfileKind::OffCpu),
            profile(ProfileKind::AddressSpace),
        );
        let envelope = envelope();
        let request = push_request(&[(&off_cpu, &envelope), (&address_space, &envelope)]);
        let request = PushRequest::decode(request.encode_to_vec().as_slice()).unwrap();
        assert_eq!(request.series.len(), 2);
        assert_eq!(
            pairs(&request.series[0]),
            [
                ("_1st", "x"),
                ("__name__", "off_cpu"),
                ("k8s_pod_name", "feed-1"),
                ("process_pid", "42"),
                ("service_name", "feed"),
            ]
        );
        assert_eq!(pairs(&request.series[1])[1], ("__name__", "address_space"));
        let sample = &request.series[0].samples[0];
        assert_eq!(sample.id, "12121212-1212-1212-1212-121212121212");
        let pprof = pprof::to_message_for(&off_cpu, Target::Pyroscope);
        assert_eq!(
            sample.raw_profile,
            pprof::encode_for(&off_cpu, Target::Pyroscope)
        );
        assert_eq!(pprof.period_type, None);
        assert!(pprof.sample[0].label.iter().all(|label| label.str != 0));
    }

    #[test]
    fn a_nameless_service_is_unknown() {
        let request = push_request(&[(&profile(ProfileKind::OffCpu), &Envelope::default())]);
        assert!(pairs(&request.series[0]).contains(&("service_name", "unknown_service")));
    }
}
