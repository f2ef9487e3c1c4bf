//! OTLP profiles exporters, one per transport: gRPC (`ProfilesService/
//! Export`) and HTTP/protobuf (`POST /v1development/profiles`), configured
//! by [`settings`] the way OpenTelemetry SDKs are.
//!
//! An exporter makes one attempt per call and says what came of it; when
//! to try again is [`delivery`](super::delivery)'s business.

mod grpc;
mod http;
pub mod settings;
mod tls;

use bytes::Bytes;

use super::retry::Verdict;
use super::ExportError;
pub use settings::{Compression, OtlpSettings, Protocol};

/// What came of one export attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The backend took the request. `rejected > 0` or a message is a
    /// partial success: the backend will not take those profiles, ever.
    Accepted { rejected: i64, message: String },
    /// No success; `verdict` says whether trying again can help.
    Failed { verdict: Verdict, reason: String },
}

/// An exporter for the configured transport.
#[derive(Clone)]
pub enum Exporter {
    Grpc(grpc::GrpcExporter),
    Http(Box<http::HttpExporter>),
}

impl Exporter {
    /// Builds the exporter; reads TLS files, but connects only when first
    /// used, so a backend that is down does not stop the sidecar.
    /// Must run inside a tokio runtime.
    pub fn new(settings: &OtlpSettings) -> Result<Self, ExportError> {
        Ok(match settings.protocol {
            Protocol::Grpc => Exporter::Grpc(grpc::GrpcExporter::new(settings)?),
            Protocol::HttpProtobuf => Exporter::Http(Box::new(http::HttpExporter::new(settings)?)),
        })
    }

    /// One attempt at exporting an encoded `ExportProfilesServiceRequest`.
    pub async fn send(&self, request: Bytes) -> Attempt {
        match self {
            Exporter::Grpc(exporter) => exporter.send(request).await,
            Exporter::Http(exporter) => exporter.send(request).await,
        }
    }
}
