//! OTLP/HTTP: a protobuf body posted over the shared [`HttpClient`], to
//! `POST /v1development/profiles` for profiles, `POST /v1/traces` for the
//! capture spans, or whichever export [`HttpExporter::calling`] names.

use bytes::Bytes;
use prost::Message;

use super::settings::OtlpSettings;
use super::ExportResponse;
use crate::export::http::{self as client, HttpClient};
use crate::export::{Attempt, ExportError};

const PROTOBUF: &str = "application/x-protobuf";

#[derive(Clone)]
pub struct HttpExporter {
    client: HttpClient,
}

impl HttpExporter {
    /// The exporter of `settings.endpoint`: the profiles URL, or for the
    /// capture spans the traces URL.
    pub fn new(settings: &OtlpSettings) -> Result<Self, ExportError> {
        let client = HttpClient::new(&settings.http_target(PROTOBUF, &settings.headers))?;
        Ok(HttpExporter { client })
    }

    /// This exporter posting to `url` instead; the connection pool is shared.
    pub fn calling(&self, url: &str) -> Result<Self, ExportError> {
        Ok(HttpExporter {
            client: self.client.posting_to(url)?,
        })
    }

    pub async fn send(&self, body: Bytes) -> Attempt {
        let reply = match self.client.post(body).await {
            Ok(reply) => reply,
            Err(reason) => return Attempt::failed_retryable(reason),
        };
        if reply.status.is_success() {
            // An empty body is a full success; OTLP allows it.
            return ExportResponse::decode(reply.body)
                .unwrap_or_default()
                .accepted();
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
