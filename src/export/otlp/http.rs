//! OTLP/HTTP: `POST /v1development/profiles` with a protobuf body, over
//! the shared [`HttpClient`].

use std::time::SystemTime;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceResponse;
use prost::Message;

use super::settings::OtlpSettings;
use crate::export::http::{self as client, HttpClient};
use crate::export::retry::classify_http;
use crate::export::{Attempt, ExportError};

const PROTOBUF: &str = "application/x-protobuf";

#[derive(Clone)]
pub struct HttpExporter {
    client: HttpClient,
}

impl HttpExporter {
    pub fn new(settings: &OtlpSettings) -> Result<Self, ExportError> {
        let client = HttpClient::new(&client::Target {
            endpoint: &settings.endpoint,
            tls: &settings.tls,
            headers: &settings.headers,
            content_type: PROTOBUF,
            compression: settings.compression,
            timeout: settings.timeout,
        })?;
        Ok(HttpExporter { client })
    }

    pub async fn send(&self, body: Bytes) -> Attempt {
        let reply = match self.client.post(body).await {
            Ok(reply) => reply,
            Err(reason) => return Attempt::failed_retryable(reason),
        };
        if reply.status.is_success() {
            // An empty body is a full success; OTLP allows it.
            let partial = ExportProfilesServiceResponse::decode(reply.body)
                .ok()
                .and_then(|answer| answer.partial_success)
                .unwrap_or_default();
            return Attempt::Accepted {
                rejected: partial.rejected_profiles,
                message: partial.error_message,
            };
        }
        Attempt::Failed {
            verdict: classify_http(
                reply.status.as_u16(),
                reply.retry_after.as_deref(),
                SystemTime::now(),
            ),
            reason: format!("HTTP {}{}", reply.status, explain(&reply.body)),
        }
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
