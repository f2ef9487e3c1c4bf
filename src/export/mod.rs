//! Where finished captures go: files in the export directory, and profiles
//! to a backend.
//!
//! The backend path: [`links`] ties samples to the requests they froze,
//! [`resource`] says whose profile it is, the encoder builds the request
//! in the [`Format`] the [`Exporter`] speaks, and [`delivery`] sends it
//! through the on-disk [`spool`], retrying as [`retry`] decides. The
//! exporters ([`otlp`], [`pyroscope`]) post over the shared [`http`]
//! client.

pub mod delivery;
pub mod files;
pub mod http;
pub mod links;
pub mod otlp;
pub mod pyroscope;
pub mod resource;
pub mod retry;
pub mod saved;
pub mod spool;

use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::time::SystemTime;

use bytes::Bytes;

use retry::Verdict;

/// What came of one export attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The backend took the request. `rejected > 0` or a message is a
    /// partial success: the backend will not take those profiles, ever.
    Accepted { rejected: i64, message: String },
    /// No success; `verdict` says whether trying again can help.
    Failed { verdict: Verdict, reason: String },
}

impl Attempt {
    /// An attempt that got no answer: worth repeating.
    pub(crate) fn failed_retryable(reason: String) -> Self {
        Attempt::Failed {
            verdict: Verdict::Retry { after: None },
            reason,
        }
    }
}

/// An exporter of any kind: one attempt at sending an encoded request
/// per call, for [`delivery::deliver`] to repeat as needed.
pub trait OneAttempt {
    fn attempt(&self, request: Bytes) -> impl std::future::Future<Output = Attempt> + Send;
}

impl OneAttempt for Exporter {
    fn attempt(&self, request: Bytes) -> impl std::future::Future<Output = Attempt> + Send {
        self.send(request)
    }
}

impl OneAttempt for otlp::Exporter {
    fn attempt(&self, request: Bytes) -> impl std::future::Future<Output = Attempt> + Send {
        self.send(request)
    }
}

/// What an encoded export request is: which exporter can send it, and so
/// what a spooled request left by an earlier run holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// An OTLP `ExportProfilesServiceRequest`.
    OtlpProfiles,
    /// A Pyroscope `push.v1.PushRequest`.
    PyroscopePush,
    /// An OTLP `ExportTraceServiceRequest`: the capture span.
    OtlpTraces,
}

impl Format {
    pub const ALL: [Format; 3] = [
        Format::OtlpProfiles,
        Format::PyroscopePush,
        Format::OtlpTraces,
    ];

    /// The name spool files carry.
    pub fn tag(self) -> &'static str {
        match self {
            Format::OtlpProfiles => "otlp",
            Format::PyroscopePush => "pyroscope",
            Format::OtlpTraces => "traces",
        }
    }

    pub fn from_tag(tag: &str) -> Option<Format> {
        Self::ALL.into_iter().find(|format| format.tag() == tag)
    }
}

/// An exporter to one backend; makes one attempt per call.
#[derive(Clone)]
pub enum Exporter {
    Otlp(otlp::Exporter),
    Pyroscope(Box<pyroscope::PyroscopeExporter>),
    /// The capture span's: OTLP/HTTP traces.
    Traces(Box<otlp::http::HttpExporter>),
}

impl Exporter {
    /// The exporter `settings` name. Reads TLS files, but connects only
    /// when first used, so a backend that is down does not stop the
    /// sidecar. Must run inside a tokio runtime.
    pub fn new(settings: &otlp::OtlpSettings) -> Result<Self, ExportError> {
        Ok(match settings.protocol {
            otlp::Protocol::Pyroscope => {
                Exporter::Pyroscope(Box::new(pyroscope::PyroscopeExporter::new(settings)?))
            }
            otlp::Protocol::Grpc | otlp::Protocol::HttpProtobuf => {
                Exporter::Otlp(otlp::Exporter::new(settings)?)
            }
        })
    }

    /// The format of the requests it sends.
    pub fn format(&self) -> Format {
        match self {
            Exporter::Otlp(_) => Format::OtlpProfiles,
            Exporter::Pyroscope(_) => Format::PyroscopePush,
            Exporter::Traces(_) => Format::OtlpTraces,
        }
    }

    /// One attempt at exporting an encoded request of [`Self::format`].
    pub async fn send(&self, request: Bytes) -> Attempt {
        match self {
            Exporter::Otlp(exporter) => exporter.send(request).await,
            Exporter::Pyroscope(exporter) => exporter.send(request).await,
            Exporter::Traces(exporter) => exporter.send(request).await,
        }
    }
}

impl From<otlp::Exporter> for Exporter {
    fn from(exporter: otlp::Exporter) -> Self {
        Exporter::Otlp(exporter)
    }
}

/// Why exporting could not start or a request could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(
        "cannot use the delivery spool at {path}: {source} \
         (it lives in [export] directory, which must be writable)"
    )]
    Spool {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS file {path:?}: {problem} (check [export] certificate, client_certificate, client_key and the OTEL_EXPORTER_OTLP_*CERTIFICATE/KEY variables)")]
    Tls { path: PathBuf, problem: String },
    #[error("export endpoint {endpoint}: {problem}")]
    Endpoint { endpoint: String, problem: String },
    #[error(transparent)]
    Settings(#[from] otlp::settings::SettingsError),
    #[error("cannot read {path:?}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path:?} is not a profile freezeframe can send: {source}")]
    Decode {
        path: PathBuf,
        source: crate::encode::EncodeError,
    },
}

/// The host's name, as `host.name` wants it (in a pod: the pod's name).
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
}

/// A random 16-byte id, never all zero, from the standard library's
/// randomly keyed hasher: profile ids need uniqueness, not cryptography.
pub fn random_id() -> [u8; 16] {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mut id = [0u8; 16];
    for (half, chunk) in id.chunks_mut(8).enumerate() {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(now);
        hasher.write_usize(half);
        chunk.copy_from_slice(&hasher.finish().to_le_bytes());
    }
    if id == [0; 16] {
        id[15] = 1;
    }
    id
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_differ_and_are_valid() {
        let (a, b) = (super::random_id(), super::random_id());
        assert_ne!(a, b);
        assert_ne!(a, [0; 16]);
    }
}
