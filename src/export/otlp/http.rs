//! OTLP/HTTP: a protobuf body posted over the shared [`HttpClient`], to
//! `POST /v1development/profiles` for profiles or `POST /v1/traces` for the
//! capture spans. The two differ only in the answer they decode.

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceResponse;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;

use super::settings::OtlpSettings;
use crate::export::http::{self as client, HttpClient};
use crate::export::{Attempt, ExportError};

const PROTOBUF: &str = "application/x-protobuf";

/// The partial success of a signal's answer: what it rejected, and why.
type Partial = fn(Bytes) -> (i64, String);

#[derive(Clone)]
pub struct HttpExporter {
    client: HttpClient,
    partial: Partial,
}

impl HttpExporter {
    /// The profiles exporter.
    pub fn new(settings: &OtlpSettings) -> Result<Self, ExportError> {
        Self::with(settings, |body| {
            let partial = ExportProfilesServiceResponse::decode(body)
                .ok()
                .and_then(|answer| answer.partial_success)
                .unwrap_or_default();
            (partial.rejected_profiles, partial.error_message)
        })
    }

    /// The capture spans' exporter; `settings.endpoint` is the traces URL.
    pub fn traces(settings: &OtlpSettings) -> Result<Self, ExportError> {
        Self::with(settings, |body| {
            let partial = ExportTraceServiceResponse::decode(body)
                .ok()
                .and_then(|answer| answer.partial_success)
                .unwrap_or_default();
            (partial.rejected_spans, partial.error_message)
        })
    }

    fn with(settings: &OtlpSettings, partial: Partial) -> Result<Self, ExportError> {
        let client = HttpClient::new(&settings.http_target(PROTOBUF, &settings.headers))?;
        Ok(HttpExporter { client, partial })
    }

    pub async fn send(&self, body: Bytes) -> Attempt {
        let reply = match self.client.post(body).await {
            Ok(reply) => reply,
            Err(reason) => return Attempt::failed_retryable(reason),
        };
        if reply.status.is_success() {
            // An empty body is a full success; OTLP allows it.
            let (rejected, message) = (self.partial)(reply.body);
            return Attempt::Accepted { rejected, message };
        }
        let explained = explain(&reply.body);
        reply.failure(&explained)
    }
}

/// The message of an OTLP error body (a `google.rpc.Status`), or the start
/// of a text one.
fn explain(body: &[u8]) -> String {
    #[derive(Clone, PartialEq, prost::Message)]
    struct RpcStatus {
        #[prost(string, tag = "2")]
        message: String,
    }
    match RpcStatus::decode(body)
        .ok()
        .map(|status| status.message)
        .filter(|message| !message.is_empty())
    {
        Some(message) => format!(": {message}"),
        None => client::text_excerpt(body),
    }
}
