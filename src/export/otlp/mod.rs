//! OTLP profiles exporters, one per transport: gRPC (`ProfilesService/
//! Export`) and HTTP/protobuf (`POST /v1development/profiles`), configured
//! by [`settings`] the way OpenTelemetry SDKs are.
//!
//! An exporter makes one attempt per call and says what came of it; when
//! to try again is [`delivery`](super::delivery)'s business. The HTTP
//! transport posts through the shared [`http`](super::http) client. The
//! same exporter can call the other signals' exports too
//! ([`Exporter::calling`]), which is how [`forward`](crate::forward) sends
//! the app's telemetry on.

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

    /// The same exporter, over the same connections and with the same
    /// headers, TLS and timeout, calling another OTLP export: the gRPC
    /// method `grpc_path`, or the HTTP URL `http_url`.
    pub fn calling(&self, grpc_path: &'static str, http_url: &str) -> Result<Self, ExportError> {
        Ok(match self {
            Exporter::Grpc(exporter) => Exporter::Grpc(exporter.calling(grpc_path)),
            Exporter::Http(exporter) => Exporter::Http(Box::new(exporter.calling(http_url)?)),
        })
    }

    /// One attempt at exporting an encoded `ExportProfilesServiceRequest`
    /// (or the request of whichever export [`Exporter::calling`] chose).
    pub async fn send(&self, request: Bytes) -> Attempt {
        match self {
            Exporter::Grpc(exporter) => exporter.send(request).await,
            Exporter::Http(exporter) => exporter.send(request).await,
        }
    }
}

/// Every OTLP `Export*ServiceResponse` has this shape (`partial_success = 1`
/// holding `rejected_<items> = 1` and `error_message = 2`): decoding it by
/// shape lets one client serve every signal.
#[derive(Clone, PartialEq, prost::Message)]
struct ExportResponse {
    #[prost(message, optional, tag = "1")]
    partial_success: Option<PartialSuccess>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PartialSuccess {
    #[prost(int64, tag = "1")]
    rejected: i64,
    #[prost(string, tag = "2")]
    error_message: String,
}

impl ExportResponse {
    fn accepted(self) -> Attempt {
        let partial = self.partial_success.unwrap_or_default();
        Attempt::Accepted {
            rejected: partial.rejected,
            message: partial.error_message,
        }
    }
}
