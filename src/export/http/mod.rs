//! The HTTP client every HTTP exporter shares: hyper over rustls for
//! `https` (the system's roots, a CA of one's own, a client certificate for
//! mutual TLS), fixed headers, optional gzip, and a deadline per request.
//!
//! It posts a body and returns the answer as it came; what a status means
//! is the exporter's business, and whether to try again
//! [`retry`](super::retry)'s.

pub mod tls;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use flate2::write::GzEncoder;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use super::retry::classify_http;
use super::{Attempt, ExportError};
use tls::TlsFiles;

/// Answers are small; a backend sending more is not talking to us.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Whether request bodies are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
}

/// TLS for `https` endpoints: the system's roots, plus a CA of one's own,
/// and a client certificate for mutual TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    pub certificate: Option<PathBuf>,
    pub client_certificate: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// Where and how to post.
pub struct Target<'a> {
    /// Full URL, path included.
    pub endpoint: &'a str,
    pub tls: &'a Tls,
    /// Sent with every request; names are lowercase.
    pub headers: &'a [(String, String)],
    pub content_type: &'static str,
    pub compression: Compression,
    pub timeout: Duration,
}

/// A backend's answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    /// The `Retry-After` header, as sent.
    pub retry_after: Option<String>,
    /// At most 1 MiB of it.
    pub body: Bytes,
}

impl Reply {
    /// The attempt a reply that is not a success makes, retried as its
    /// status says; `explained` is the backend's reason, `": ..."` or empty.
    pub fn failure(&self, explained: &str) -> Attempt {
        Attempt::Failed {
            verdict: classify_http(
                self.status.as_u16(),
                self.retry_after.as_deref(),
                std::time::SystemTime::now(),
            ),
            reason: format!("HTTP {}{explained}", self.status),
        }
    }
}

/// A client for one endpoint; cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    endpoint: http::Uri,
    headers: HeaderMap,
    compression: Compression,
    timeout: Duration,
}

impl HttpClient {
    /// Reads the TLS files and checks the endpoint and headers; connects
    /// only when first used.
    pub fn new(target: &Target<'_>) -> Result<Self, ExportError> {
        let invalid = |problem: String| ExportError::Endpoint {
            endpoint: target.endpoint.to_string(),
            problem,
        };
        let endpoint: http::Uri = target
            .endpoint
            .parse()
            .map_err(|err: http::uri::InvalidUri| invalid(err.to_string()))?;
        let tls = TlsFiles::read(target.tls)?.rustls_config(target.tls)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(target.timeout));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let mut headers = HeaderMap::new();
        for (key, value) in target.headers {
            let name = HeaderName::from_bytes(key.as_bytes())
                .map_err(|_| invalid(format!("{key:?} is not a header name")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| invalid(format!("the value of header {key} is not a header value")))?;
            headers.insert(name, value);
        }
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(target.content_type),
        );
        headers.insert(
            http::header::USER_AGENT,
            HeaderValue::from_static(concat!("freezeframe/", env!("CARGO_PKG_VERSION"))),
        );
        if target.compression == Compression::Gzip {
            headers.insert(
                http::header::CONTENT_ENCODING,
                HeaderValue::from_static("gzip"),
            );
        }
        Ok(HttpClient {
            client: Client::builder(TokioExecutor::new()).build(connector),
            endpoint,
            headers,
            compression: target.compression,
            timeout: target.timeout,
        })
    }

    /// This client posting to `url` instead; the connection pool, headers
    /// and TLS are shared.
    pub fn posting_to(&self, url: &str) -> Result<Self, ExportError> {
        let endpoint = url
            .parse()
            .map_err(|err: http::uri::InvalidUri| ExportError::Endpoint {
                endpoint: url.to_string(),
                problem: err.to_string(),
            })?;
        Ok(HttpClient {
            endpoint,
            ..self.clone()
        })
    }

    /// Posts `body` and waits for the answer, at most the timeout. `Err`
    /// says why no answer came: such a request may be tried again.
    pub async fn post(&self, body: Bytes) -> Result<Reply, String> {
        match tokio::time::timeout(self.timeout, self.exchange(body)).await {
            Ok(reply) => reply,
            Err(_) => Err(format!(
                "no answer within {}",
                humantime::format_duration(self.timeout)
            )),
        }
    }

    async fn exchange(&self, body: Bytes) -> Result<Reply, String> {
        let body = match self.compression {
            Compression::None => body,
            Compression::Gzip => gzip(&body),
        };
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.endpoint.clone();
        *request.headers_mut() = self.headers.clone();
        let response = self.client.request(request).await.map_err(|err| {
            let cause = std::error::Error::source(&err)
                .map(|source| format!(": {source}"))
                .unwrap_or_default();
            format!("cannot send: {err}{cause}")
        })?;
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
        Ok(Reply {
            status,
            retry_after,
            body,
        })
    }
}

/// The start of a text body, for an error message: `": message"`, or
/// nothing for an empty one.
pub fn text_excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let excerpt = text.chars().take(200).collect::<String>();
    let excerpt = excerpt.trim();
    if excerpt.is_empty() {
        String::new()
    } else {
        format!(": {excerpt}")
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
