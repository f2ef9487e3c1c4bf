//! Re-sending a saved capture (`freezeframe export FILE.pb.gz`): the pprof
//! is read back into the model and turned into an OTLP request again, with
//! the rule, the series' resource and the target from the capture's line
//! in `captures.jsonl` when the file sits in its capture directory.

use std::collections::BTreeMap;
use std::path::Path;

use prost::Message;
use serde::Deserialize;

use super::files::CAPTURE_LOG;
use super::resource::{self, CaptureFacts, ProcessFacts};
use super::ExportError;
use super::Format;
use crate::encode::otlp::{self, Envelope};
use crate::encode::{pprof, pyroscope};

/// A saved capture, ready to send.
#[derive(Debug)]
pub struct Saved {
    /// For logs and the spool: the capture id, or the file name.
    pub label: String,
    /// The encoded request, of the format asked for.
    pub request: Vec<u8>,
    /// Whether the capture's record was found in `captures.jsonl`.
    pub recorded: bool,
}

/// The parts of a `captures.jsonl` line a re-send needs.
#[derive(Debug, Deserialize)]
struct Recorded {
    capture_id: String,
    outcome: String,
    rule: String,
    series: Option<RecordedSeries>,
    value: Option<f64>,
    threshold: Option<f64>,
    unit: String,
    cause: String,
    breach_start: String,
    fired_at: String,
    target_pid: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct RecordedSeries {
    metric: String,
    resource: BTreeMap<String, String>,
}

/// Builds the export request, of `format`, for a saved pprof. `env` and
/// `host_name` give the resource attributes of the environment, as for a
/// live capture, and at most `max_resource_attributes` of them are sent.
pub fn request_from_file(
    path: &Path,
    format: Format,
    env: impl Fn(&str) -> Option<String>,
    host_name: Option<&str>,
    profile_id: [u8; 16],
    max_resource_attributes: usize,
) -> Result<Saved, ExportError> {
    let bytes = std::fs::read(path).map_err(|source| ExportError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let profile = pprof::decode(&bytes).map_err(|source| ExportError::Decode {
        path: path.to_path_buf(),
        source,
    })?;
    let recorded = find_record(path);
    let label = recorded.as_ref().map_or_else(
        || {
            path.file_name().map_or_else(
                || "capture".to_string(),
                |name| name.to_string_lossy().into_owned(),
            )
        },
        |recorded| recorded.capture_id.clone(),
    );
    // The pid the capture was of: recorded, or the samples' own.
    let pid = recorded
        .as_ref()
        .and_then(|recorded| recorded.target_pid)
        .or_else(|| {
            profile
                .samples
                .first()
                .map(|sample| sample.labels.process_id)
        });
    let process = pid.map(|pid| ProcessFacts {
        pid,
        executable: None,
    });
    let application = recorded
        .as_ref()
        .and_then(|recorded| recorded.series.as_ref())
        .map(|series| &series.resource);
    let bounded = resource::bound(
        resource::resource(application, process.as_ref(), env, host_name),
        max_resource_attributes,
    );
    let envelope = Envelope {
        resource: bounded.attributes,
        dropped_resource_attributes: bounded.dropped,
        attributes: recorded
            .as_ref()
            .map(|recorded| {
                resource::capture_attributes(&CaptureFacts {
                    capture_id: recorded.capture_id.clone(),
                    rule: recorded.rule.clone(),
                    cause: recorded.cause.clone(),
                    metric: recorded.series.as_ref().map(|series| series.metric.clone()),
                    value: recorded.value,
                    threshold: recorded.threshold,
                    unit: recorded.unit.clone(),
                    breach_start: parse_time(&recorded.breach_start),
                    fired_at: parse_time(&recorded.fired_at),
                })
            })
            .unwrap_or_default(),
        profile_id,
        original_pprof: Some(if bytes.starts_with(&[0x1f, 0x8b]) {
            bytes
        } else {
            pprof::encode(&profile)
        }),
    };
    Ok(Saved {
        label,
        request: match format {
            // A saved capture is a profile: a traces exporter never sends
            // one, and OTLP is the profile's own format.
            Format::OtlpProfiles | Format::OtlpTraces => {
                otlp::request(&profile, &envelope).encode_to_vec()
            }
            Format::PyroscopePush => {
                pyroscope::push_request(&[(&profile, &envelope)]).encode_to_vec()
            }
        },
        recorded: recorded.is_some(),
    })
}

/// The capture's line in `<export directory>/captures.jsonl`, when `path`
/// is `<export directory>/<capture id>/profile.pb.gz`.
fn find_record(path: &Path) -> Option<Recorded> {
    let capture_dir = path.canonicalize().ok()?.parent()?.to_path_buf();
    let capture_id = capture_dir.file_name()?.to_str()?.to_string();
    let log = std::fs::read_to_string(capture_dir.parent()?.join(CAPTURE_LOG)).ok()?;
    log.lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<Recorded>(line).ok())
        .find(|recorded| recorded.capture_id == capture_id && recorded.outcome == "captured")
}

fn parse_time(text: &str) -> std::time::SystemTime {
    humantime::parse_rfc3339(text).unwrap_or(std::time::SystemTime::UNIX_EPOCH)
}
