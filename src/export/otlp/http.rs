//! OTLP/HTTP: `POST /v1development/profiles` with a protobuf body, over
//! hyper with rustls for `https`.

use std::io::Write;
use std::time::SystemTime;

use bytes::Bytes;
use flate2::write::GzEncoder;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prost::Message;

use super::settings::{Compression, OtlpSettings};
use super::tls::TlsFiles;
use super::{Attempt, ExportResponse};
use crate::export::retry::{classify_http, Verdict};
use crate::export::ExportError;

const PROTOBUF: &str = "application/x-protobuf";
/// Answers are small; a backend sending more is not talking OTLP.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

#[derive(Clone)]
pub struct HttpExporter {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    endpoint: http::Uri,
    headers: HeaderMap,
    compression: Compression,
    timeout: std::time::Duration,
}

impl HttpExporter {
    pub fn new(settings: &OtlpSettings) -> Result<Self, ExportError> {
        let invalid = |problem: String| ExportError::Endpoint {
            endpoint: settings.endpoint.clone(),
            problem,
        };
        let endpoint: http::Uri = settings
            .endpoint
            .parse()
            .map_err(|err: http::uri::InvalidUri| invalid(err.to_string()))?;
        let tls = TlsFiles::read(&settings.tls)?.rustls_config(&settings.tls)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(settings.timeout));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let mut headers = HeaderMap::new();
        for (key, value) in &settings.headers {
            let name = HeaderName::from_bytes(key.as_bytes())
                .map_err(|_| invalid(format!("{key:?} is not a header name")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| invalid(format!("the value of header {key} is not a header value")))?;
            headers.insert(name, value);
        }
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(PROTOBUF),
        );
        headers.insert(
            http::header::USER_AGENT,
            HeaderValue::from_static(concat!("freezeframe/", env!("CARGO_PKG_VERSION"))),
        );
        if settings.compression == Compression::Gzip {
            headers.insert(
                http::header::CONTENT_ENCODING,
                HeaderValue::from_static("gzip"),
            );
        }
        Ok(HttpExporter {
            client: Client::builder(TokioExecutor::new()).build(connector),
            endpoint,
            headers,
            compression: settings.compression,
            timeout: settings.timeout,
        })
    }

    /// This exporter posting to `url` instead; the connection pool is shared.
    pub fn calling(&self, url: &str) -> Result<Self, ExportError> {
        let endpoint = url
            .parse()
            .map_err(|err: http::uri::InvalidUri| ExportError::Endpoint {
                endpoint: url.to_string(),
                problem: err.to_string(),
            })?;
        Ok(HttpExporter {
            endpoint,
            ..self.clone()
        })
    }

    pub async fn send(&self, body: Bytes) -> Attempt {
        match tokio::time::timeout(self.timeout, self.exchange(body)).await {
            Ok(attempt) => attempt,
            Err(_) => Attempt::failed_retryable(format!(
                "no answer within {}",
                humantime::format_duration(self.timeout)
            )),
        }
    }

    async fn exchange(&self, body: Bytes) -> Attempt {
        let body = match self.compression {
            Compression::None => body,
            Compression::Gzip => gzip(&body),
        };
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.endpoint.clone();
        *request.headers_mut() = self.headers.clone();
        let response = match self.client.request(request).await {
            Ok(response) => response,
            Err(err) => {
                let cause = std::error::Error::source(&err)
                    .map(|source| format!(": {source}"))
                    .unwrap_or_default();
                return Attempt::failed_retryable(format!("cannot send: {err}{cause}"));
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string);
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map(|collected| collected.to_bytes())
            .unwrap_or_default();
        if status.is_success() {
            // An empty body is a full success; OTLP allows it.
            return ExportResponse::decode(body).unwrap_or_default().accepted();
        }
        Attempt::Failed {
            verdict: classify_http(status.as_u16(), retry_after.as_deref(), SystemTime::now()),
            reason: format!("HTTP {status}{}", explain(&body)),
        }
    }
}

impl Attempt {
    pub(crate) fn failed_retryable(reason: String) -> Self {
        Attempt::Failed {
            verdict: Verdict::Retry { after: None },
            reason,
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
    let message = RpcStatus::decode(body)
        .ok()
        .map(|status| status.message)
        .filter(|message| !message.is_empty())
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            text.chars()
                .take(200)
                .collect::<String>()
                .trim()
                .to_string()
        });
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

fn gzip(bytes: &[u8]) -> Bytes {
    let mut encoder = GzEncoder::new(
        Vec::with_capacity(bytes.len() / 2),
        flate2::Compression::default(),
    );
    encoder
        .write_all(bytes)
        .expect("gzip into a Vec cannot fail");
    Bytes::from(encoder.finish().expect("gzip into a Vec cannot fail"))
}
