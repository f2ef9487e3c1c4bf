//! Pyroscope's push API: `POST /push.v1.PusherService/Push` in the connect
//! protocol (a unary call over HTTP/1.1, `Content-Type: application/proto`,
//! gzip by default), through the shared [`HttpClient`]. Every Pyroscope
//! 1.x and 2.x takes it, and Grafana Cloud Profiles too.
//!
//! Connect answers a failure with an HTTP status (429 for
//! `resource_exhausted`, 503 for `unavailable`, 400 for `invalid_argument`)
//! and a JSON body naming the error, so retrying is decided as for OTLP/HTTP.

use bytes::Bytes;
use serde::Deserialize;

use super::http::{self as client, HttpClient};
use super::otlp::settings::OtlpSettings;
use super::{Attempt, ExportError};

const PROTO: &str = "application/proto";
const CONNECT_VERSION: (&str, &str) = ("connect-protocol-version", "1");

#[derive(Clone)]
pub struct PyroscopeExporter {
    client: HttpClient,
}

impl PyroscopeExporter {
    /// Reads TLS files; connects only when first used.
    pub fn new(settings: &OtlpSettings) -> Result<Self, ExportError> {
        let mut headers = settings.headers.clone();
        headers.push((CONNECT_VERSION.0.to_string(), CONNECT_VERSION.1.to_string()));
        let client = HttpClient::new(&settings.http_target(PROTO, &headers))?;
        Ok(PyroscopeExporter { client })
    }

    /// One attempt at pushing an encoded `PushRequest`.
    pub async fn send(&self, body: Bytes) -> Attempt {
        let reply = match self.client.post(body).await {
            Ok(reply) => reply,
            Err(reason) => return Attempt::failed_retryable(reason),
        };
        if reply.status.is_success() {
            return Attempt::Accepted {
                rejected: 0,
                message: String::new(),
            };
        }
        let explained = explain(&reply.body);
        reply.failure(&explained)
    }
}

/// The code and message of a connect error body, or the start of a text
/// one.
fn explain(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ConnectError {
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<ConnectError>(body) {
        Ok(error) => format!(": {} {}", error.code, error.message)
            .trim_end()
            .to_string(),
        Err(_) => client::text_excerpt(body),
    }
}

#[cfg(test)]
mod tests {
    use super::explain;

    #[test]
    fn connect_errors_are_put_in_words() {
        assert_eq!(
            explain(br#"{"code":"invalid_argument","message":"profile too old"}"#),
            ": invalid_argument profile too old"
        );
        assert_eq!(explain(b"upstream gone\n"), ": upstream gone");
        assert_eq!(explain(b""), "");
    }
}
