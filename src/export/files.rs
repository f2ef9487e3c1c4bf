//! Writes each capture to `<directory>/<capture-id>/` (pprof, folded stacks,
//! flamegraph) and appends one JSON line per capture event to
//! `<directory>/captures.jsonl`, the log an operator greps first.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use crate::encode::{flamegraph, folded, pprof};
use crate::profile::Profile;
use crate::signals::SeriesKey;

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("cannot create the export directory {path}: {source} (set [export] directory to a writable place)")]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The pprof of a capture, in its directory.
pub const PPROF_FILE: &str = "profile.pb.gz";
/// The address-space profile of a capture (when it made large calls).
pub const ADDRESS_SPACE_FILE: &str = "alloc.pb.gz";
/// The OTLP `ExportProfilesServiceRequest` of a capture, as it is (or
/// would be) sent: readable with the opentelemetry-proto classes.
pub const OTLP_FILE: &str = "profiles.otlp.pb";
/// The capture log, in the export directory.
pub const CAPTURE_LOG: &str = "captures.jsonl";

/// What happened to one firing, as recorded in `captures.jsonl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Captured and written.
    Captured,
    /// The target was already being captured: recorded, not stacked.
    Coalesced,
    /// No process to capture (no pid known, or it is gone).
    NoTarget,
    /// The capture failed; `error` says why.
    Failed,
}

/// One line of `captures.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureEvent {
    pub capture_id: String,
    pub outcome: Outcome,
    pub rule: String,
    pub series: Option<SeriesKey>,
    /// The breaching value and the threshold, in `unit`; absent for a
    /// stall, a silence or a probe that got no answer.
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    pub unit: String,
    /// Why the rule fired, in words.
    pub cause: String,
    #[serde(with = "rfc3339")]
    pub breach_start: SystemTime,
    #[serde(with = "rfc3339")]
    pub fired_at: SystemTime,
    pub target_pid: Option<u32>,
    /// The capture window actually covered, when there was one.
    pub window: Option<WindowRecord>,
    pub blocked_seconds: Option<f64>,
    pub directory: Option<PathBuf>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WindowRecord {
    #[serde(with = "rfc3339")]
    pub start: SystemTime,
    #[serde(with = "rfc3339")]
    pub end: SystemTime,
}

mod rfc3339 {
    use std::time::SystemTime;

    use serde::Serializer;

    pub fn serialize<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_rfc3339_millis(*time))
    }
}

/// The export directory.
#[derive(Debug, Clone)]
pub struct FileSink {
    directory: PathBuf,
}

impl FileSink {
    pub fn new(directory: &Path) -> Result<Self, FilesError> {
        fs::create_dir_all(directory).map_err(|source| FilesError::Directory {
            path: directory.to_path_buf(),
            source,
        })?;
        Ok(FileSink {
            directory: directory.to_path_buf(),
        })
    }

    /// A directory-safe id: the firing time and the rule's name.
    pub fn capture_id(rule: &str, fired_at: SystemTime) -> String {
        let stamp = humantime::format_rfc3339_millis(fired_at)
            .to_string()
            .replace([':', '.'], "");
        let rule: String = rule
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("{stamp}-{rule}")
    }

    /// Writes a capture's files; returns the directory they are in.
    pub fn write_profile(
        &self,
        capture_id: &str,
        profile: &Profile,
    ) -> Result<PathBuf, FilesError> {
        let dir = self.directory.join(capture_id);
        fs::create_dir_all(&dir).map_err(|source| FilesError::Directory {
            path: dir.clone(),
            source,
        })?;
        write(&dir.join(PPROF_FILE), &pprof::encode(profile))?;
        write(
            &dir.join("stacks.folded"),
            folded::encode(profile).as_bytes(),
        )?;
        // An empty capture has no flamegraph to draw; the pprof says so.
        if let Ok(svg) =
            flamegraph::encode(profile, &format!("{}: {capture_id}", profile.kind.title()))
        {
            write(&dir.join("flamegraph.svg"), &svg)?;
        }
        Ok(dir)
    }

    /// Writes a capture's address-space profile beside its off-CPU one.
    pub fn write_address_space(
        &self,
        capture_id: &str,
        profile: &Profile,
    ) -> Result<(), FilesError> {
        write(
            &self.directory.join(capture_id).join(ADDRESS_SPACE_FILE),
            &pprof::encode(profile),
        )
    }

    /// Writes the OTLP request of a capture, atomically: a reader never
    /// sees half of it.
    pub fn write_otlp(&self, capture_id: &str, request: &[u8]) -> Result<(), FilesError> {
        let path = self.directory.join(capture_id).join(OTLP_FILE);
        let temporary = path.with_extension("pb.tmp");
        write(&temporary, request)?;
        fs::rename(&temporary, &path).map_err(|source| FilesError::Write { path, source })
    }

    /// Replaces a capture's pprof (once it is linked to the requests it
    /// froze). Atomic: a reader sees the old file or the new one.
    pub fn replace_pprof(&self, capture_id: &str, pprof: &[u8]) -> Result<(), FilesError> {
        let path = self.directory.join(capture_id).join(PPROF_FILE);
        let temporary = path.with_extension("gz.tmp");
        write(&temporary, pprof)?;
        fs::rename(&temporary, &path).map_err(|source| FilesError::Write { path, source })
    }

    /// Appends one event to `captures.jsonl`, whole lines only.
    pub fn append_event(&self, event: &CaptureEvent) -> Result<(), FilesError> {
        let path = self.directory.join(CAPTURE_LOG);
        let mut line = serde_json::to_vec(event).expect("capture events serialize");
        line.push(b'\n');
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| FilesError::Write {
                path: path.clone(),
                source,
            })?;
        file.write_all(&line)
            .map_err(|source| FilesError::Write { path, source })
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), FilesError> {
    fs::write(path, bytes).map_err(|source| FilesError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn capture_ids_are_safe_directory_names() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_734_192_915);
        let id = FileSink::capture_id("feed db/latency", at);
        assert_eq!(id, "2026-11-26T230312915Z-feed_db_latency");
    }

    #[test]
    fn events_are_appended_as_json_lines() {
        let dir = std::env::temp_dir().join(format!("freezeframe-files-{}", std::process::id()));
        let sink = FileSink::new(&dir).unwrap();
        let event = CaptureEvent {
            capture_id: "x".into(),
            outcome: Outcome::Coalesced,
            rule: "r".into(),
            series: None,
            value: Some(0.25),
            threshold: Some(0.2),
            unit: "s".into(),
            cause: "p99 above threshold".into(),
            breach_start: SystemTime::UNIX_EPOCH,
            fired_at: SystemTime::UNIX_EPOCH + Duration::from_secs(2),
            target_pid: Some(7),
            window: None,
            blocked_seconds: None,
            directory: None,
            error: None,
        };
        sink.append_event(&event).unwrap();
        sink.append_event(&event).unwrap();
        let text = fs::read_to_string(dir.join("captures.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["outcome"], "coalesced");
        assert_eq!(lines[0]["fired_at"], "1970-01-01T00:00:02.000Z");
        fs::remove_dir_all(dir).unwrap();
    }
}
