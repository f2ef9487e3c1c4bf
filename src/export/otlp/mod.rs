//! OTLP profiles exporters, one per transport: gRPC (`ProfilesService/
//! Export`) and HTTP/protobuf (`POST /v1development/profiles`), configured
//! by [`settings`] the way OpenTelemetry SDKs are.
//!
//! An exporter makes one attempt per call and says what came of it; when
//! to try again is [`delivery`](super::delivery)'s business. The HTTP
//! transport posts through the shared [`http`](super::http) client.

mod grpc;
pub mod http;
pub mod settings;

use bytes::Bytes;

pub use super::Attempt;
use super::ExportError;
pub use settings::{Compression, OtlpSettings, Protocol};

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
            Protocol::Pyroscope => {
                return Err(ExportError::Endpoint {
                    endpoint: settings.endpoint.clone(),
                    problem: "pyroscope is Pyroscope's push API, not an OTLP transport; \
                              build it with export::Exporter::new"
                        .to_string(),
                })
            }
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
