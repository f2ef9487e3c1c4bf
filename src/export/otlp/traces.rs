//! OTLP/HTTP traces: `POST /v1/traces` with a protobuf body, for the
//! capture span, over the shared [`HttpClient`].

use std::time::SystemTime;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;

use super::settings::OtlpSettings;
use crate::export::http::{self as client, HttpClient};
use crate::export::retry::classify_http;
use crate::export::{Attempt, ExportError};

const PROTOBUF: &str = "application/x-protobuf";

#[derive(Clone)]
pub struct TracesExporter {
    client: HttpClient,
}

impl TracesExporter {
    /// `settings.endpoint` is the traces URL, path included.
    pub fn new(settings: &OtlpSettings) -> Result<Self, ExportError> {
        let client = HttpClient::new(&client::Target {
            endpoint: &settings.endpoint,
            tls: &settings.tls,
            headers: &settings.headers,
            content_type: PROTOBUF,
            compression: settings.compression,
            timeout: settings.timeout,
        })?;
        Ok(TracesExporter { client })
    }

    /// One attempt at exporting an encoded `ExportTraceServiceRequest`.
    pub async fn send(&self, body: Bytes) -> Attempt {
        let reply = match self.client.post(body).await {
            Ok(reply) => reply,
            Err(reason) => return Attempt::failed_retryable(reason),
        };
        if reply.status.is_success() {
            let partial = ExportTraceServiceResponse::decode(reply.body)
                .ok()
                .and_then(|answer| answer.partial_success)
                .unwrap_or_default();
            return Attempt::Accepted {
                rejected: partial.rejected_spans,
                message: partial.error_message,
            };
        }
        Attempt::Failed {
            verdict: classify_http(
                reply.status.as_u16(),
                reply.retry_after.as_deref(),
                SystemTime::now(),
            ),
            reason: format!("HTTP {}{}", reply.status, client::text_excerpt(&reply.body)),
        }
    }
}
