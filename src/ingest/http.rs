//! OTLP/HTTP: `POST /v1/metrics` and `POST /v1/traces` (and `/v1/logs`
//! when forwarding) with protobuf or JSON bodies, optionally gzip,
//! answered the way the Collector's receiver answers (OTLP specification,
//! "OTLP/HTTP").

use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http_body_util::BodyExt;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use serde_json::{Map, Value as Json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::body::{BodyError, Compression, LimitedBody};
use super::counters::{count_request, RequestOutcome, Transport};
use super::intake::{Accepted, Intake, Refused, Wire};

const PROTOBUF: &str = "application/x-protobuf";
const JSON: &str = "application/json";

/// After refusing an oversized body part-way, read and discard up to this
/// much more of it before answering. A client still writing when the server
/// closes gets a connection reset instead of the 413; discarding costs no
/// memory, and the bounds keep it from costing much time.
const DISCARD_BYTES: usize = 64 << 20;
const DISCARD_TIME: Duration = Duration::from_secs(2);

/// How long a sender refused for lack of room is asked to wait.
const RETRY_AFTER_SECONDS: &str = "1";

#[derive(Clone)]
struct HttpState {
    intake: Arc<Intake>,
    max_request_bytes: usize,
}

/// Serves OTLP/HTTP on `listener` until `stop` is cancelled, then lets
/// requests in flight finish.
pub(crate) async fn serve(
    listener: TcpListener,
    intake: Arc<Intake>,
    max_request_bytes: usize,
    stop: CancellationToken,
) -> io::Result<()> {
    let mut router = Router::new()
        .route("/v1/metrics", post(export_metrics))
        .route("/v1/traces", post(export_traces));
    if intake.forwards() {
        router = router.route("/v1/logs", post(export_logs));
    }
    let router = router.with_state(HttpState {
        intake,
        max_request_bytes,
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

/// An answer, and how to count it.
type Reply = (RequestOutcome, Response);

fn counted((outcome, response): Reply) -> Response {
    count_request(Transport::Http, outcome);
    response
}

async fn export_metrics(State(state): State<HttpState>, request: Request) -> Response {
    let reply = match receive::<ExportMetricsServiceRequest>(&state, request).await {
        Ok((request, format, wire)) => match state.intake.metrics(request, wire) {
            Ok(accepted) => success(format, accepted.metrics_response(), || {
                partial_success_json("rejectedDataPoints", &accepted)
            }),
            Err(refused) => refusal(format, refused),
        },
        Err(reply) => reply,
    };
    counted(reply)
}

async fn export_traces(State(state): State<HttpState>, request: Request) -> Response {
    let reply = match receive::<ExportTraceServiceRequest>(&state, request).await {
        Ok((request, format, wire)) => {
            let accepted = state.intake.traces(request, wire);
            success(format, accepted.traces_response(), || {
                partial_success_json("rejectedSpans", &accepted)
            })
        }
        Err(reply) => reply,
    };
    counted(reply)
}

async fn export_logs(State(state): State<HttpState>, request: Request) -> Response {
    let reply = match receive::<ExportLogsServiceRequest>(&state, request).await {
        Ok((request, format, wire)) => {
            state.intake.logs(request, wire);
            success(format, ExportLogsServiceResponse::default(), || {
                Json::Object(Map::new())
            })
        }
        Err(reply) => reply,
    };
    counted(reply)
}

/// An OTLP request message, in either of its HTTP encodings.
trait OtlpRequest: Message + Default + serde::de::DeserializeOwned {}

impl<T: Message + Default + serde::de::DeserializeOwned> OtlpRequest for T {}

/// The two OTLP/HTTP body encodings; the response uses the request's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Protobuf,
    Json,
}

impl Format {
    fn of(headers: &HeaderMap) -> Option<Self> {
        let media_type = media_type(headers.get(header::CONTENT_TYPE)?)?;
        if media_type.eq_ignore_ascii_case(PROTOBUF) {
            Some(Self::Protobuf)
        } else if media_type.eq_ignore_ascii_case(JSON) {
            Some(Self::Json)
        } else {
            None
        }
    }

    fn content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Self::Protobuf => PROTOBUF,
            Self::Json => JSON,
        })
    }

    fn decode<T: OtlpRequest>(self, bytes: &[u8]) -> Result<T, String> {
        match self {
            Self::Protobuf => {
                T::decode(bytes).map_err(|error| format!("invalid OTLP protobuf: {error}"))
            }
            Self::Json => {
                // serde would also take a struct written as an array; the
                // protobuf JSON mapping only has objects.
                if bytes.iter().find(|byte| !byte.is_ascii_whitespace()) != Some(&b'{') {
                    return Err("invalid OTLP/JSON: the body is not a JSON object".to_owned());
                }
                serde_json::from_slice::<T>(bytes)
                    .map_err(|error| format!("invalid OTLP/JSON: {error}"))
            }
        }
    }
}

/// `application/json; charset=utf-8` → `application/json`.
fn media_type(value: &HeaderValue) -> Option<&str> {
    Some(value.to_str().ok()?.split(';').next()?.trim())
}

fn compression_of(headers: &HeaderMap) -> Result<Compression, String> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(Compression::Identity);
    };
    let encoding = value.to_str().unwrap_or_default().trim();
    if encoding.eq_ignore_ascii_case("gzip") {
        Ok(Compression::Gzip)
    } else if encoding.is_empty() || encoding.eq_ignore_ascii_case("identity") {
        Ok(Compression::Identity)
    } else {
        Err(format!(
            "unsupported Content-Encoding {value:?}: send gzip or no encoding"
        ))
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Reads, decompresses and decodes a request body, or says why not.
async fn receive<T: OtlpRequest>(
    state: &HttpState,
    request: Request,
) -> Result<(T, Format, Wire), Reply> {
    let (parts, mut body) = request.into_parts();
    let Some(format) = Format::of(&parts.headers) else {
        let message = match parts.headers.get(header::CONTENT_TYPE) {
            Some(value) => format!("unsupported Content-Type {value:?}: send {PROTOBUF} or {JSON}"),
            None => format!("missing Content-Type: send {PROTOBUF} or {JSON}"),
        };
        return Err(unsupported(message));
    };
    let compression = compression_of(&parts.headers).map_err(unsupported)?;
    let limit = state.max_request_bytes;
    let declared = content_length(&parts.headers);
    // Refuse on the declared size alone, before reading a byte of the body.
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large(
            format,
            &BodyError::TooLarge {
                limit,
                inflated: false,
            },
        ));
    }

    let mut received = LimitedBody::new(compression, limit, declared);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| {
            let message = format!("cannot read the request body: {error}");
            bad_request(RequestOutcome::Failed, format, message)
        })?;
        let Ok(chunk) = frame.into_data() else {
            continue; // trailers carry nothing for OTLP
        };
        if let Err(error) = received.push(&chunk) {
            if matches!(error, BodyError::TooLarge { .. }) {
                discard_rest(&mut body).await;
            }
            return Err(body_error(format, &error));
        }
    }
    let bytes = received
        .finish()
        .map_err(|error| body_error(format, &error))?;
    let request = format
        .decode(&bytes)
        .map_err(|message| bad_request(RequestOutcome::Invalid, format, message))?;
    let wire = match format {
        Format::Protobuf => Wire::Protobuf(Bytes::from(bytes)),
        Format::Json => Wire::Json,
    };
    Ok((request, format, wire))
}

async fn discard_rest(body: &mut Body) {
    let deadline = tokio::time::Instant::now() + DISCARD_TIME;
    let mut discarded = 0_usize;
    while discarded < DISCARD_BYTES {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => discarded += frame.data_ref().map_or(0, |chunk| chunk.len()),
            _ => break,
        }
    }
}

fn body_error(format: Format, error: &BodyError) -> Reply {
    match error {
        BodyError::TooLarge { .. } => too_large(format, error),
        BodyError::Corrupt(_) => bad_request(RequestOutcome::Invalid, format, error.to_string()),
    }
}

fn bad_request(outcome: RequestOutcome, format: Format, message: String) -> Reply {
    let response = error_response(
        StatusCode::BAD_REQUEST,
        Some(format),
        Code::InvalidArgument,
        message,
    );
    (outcome, response)
}

fn too_large(format: Format, error: &BodyError) -> Reply {
    let mut response = error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        Some(format),
        Code::ResourceExhausted,
        error.to_string(),
    );
    // What is left of the body is not worth reading to keep the connection.
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    (RequestOutcome::TooLarge, response)
}

fn unsupported(message: String) -> Reply {
    (
        RequestOutcome::Unsupported,
        error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            None,
            Code::Unimplemented,
            message,
        ),
    )
}

fn refusal(format: Format, refused: Refused) -> Reply {
    let mut response = error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        Some(format),
        Code::Unavailable,
        refused.to_string(),
    );
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECONDS),
    );
    (RequestOutcome::Refused, response)
}

/// An export response; `json` is its OTLP/JSON form, built only when asked for.
fn success(format: Format, response: impl Message, json: impl FnOnce() -> Json) -> Reply {
    let body = match format {
        Format::Protobuf => response.encode_to_vec(),
        Format::Json => json().to_string().into_bytes(),
    };
    (
        RequestOutcome::Accepted,
        ([(header::CONTENT_TYPE, format.content_type())], body).into_response(),
    )
}

/// The OTLP/JSON form of an export response; int64 fields are strings in
/// the protobuf JSON mapping.
fn partial_success_json(rejected_field: &str, accepted: &Accepted) -> Json {
    let mut response = Map::new();
    if accepted.rejected > 0 {
        let mut partial = Map::new();
        partial.insert(
            rejected_field.to_owned(),
            Json::String(accepted.rejected.to_string()),
        );
        partial.insert(
            "errorMessage".to_owned(),
            Json::String(accepted.error_message.clone()),
        );
        response.insert("partialSuccess".to_owned(), Json::Object(partial));
    }
    Json::Object(response)
}

/// `google.rpc.Status`, the body OTLP/HTTP prescribes for errors.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

/// An error answer, in the request's format when it is known.
fn error_response(
    status: StatusCode,
    format: Option<Format>,
    code: Code,
    message: String,
) -> Response {
    tracing::debug!(%status, %message, "OTLP/HTTP request refused");
    let (content_type, body) = match format {
        Some(Format::Protobuf) => (
            Format::Protobuf.content_type(),
            RpcStatus {
                code: code as i32,
                message,
            }
            .encode_to_vec(),
        ),
        Some(Format::Json) => {
            let body = serde_json::json!({ "code": code as i32, "message": message });
            (Format::Json.content_type(), body.to_string().into_bytes())
        }
        None => (
            HeaderValue::from_static("text/plain; charset=utf-8"),
            message.into_bytes(),
        ),
    };
    (status, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| (name.clone(), HeaderValue::from_static(value)))
            .collect()
    }

    #[test]
    fn content_types_are_matched_without_parameters_or_case() {
        let json = headers(&[(header::CONTENT_TYPE, "Application/JSON; charset=utf-8")]);
        assert_eq!(Format::of(&json), Some(Format::Json));
        let protobuf = headers(&[(header::CONTENT_TYPE, "application/x-protobuf")]);
        assert_eq!(Format::of(&protobuf), Some(Format::Protobuf));
        assert_eq!(
            Format::of(&headers(&[(header::CONTENT_TYPE, "text/plain")])),
            None
        );
        assert_eq!(Format::of(&HeaderMap::new()), None);
    }

    #[test]
    fn only_gzip_and_identity_encodings_are_accepted() {
        assert_eq!(compression_of(&HeaderMap::new()), Ok(Compression::Identity));
        assert_eq!(
            compression_of(&headers(&[(header::CONTENT_ENCODING, "GZIP")])),
            Ok(Compression::Gzip)
        );
        assert_eq!(
            compression_of(&headers(&[(header::CONTENT_ENCODING, "identity")])),
            Ok(Compression::Identity)
        );
        assert!(compression_of(&headers(&[(header::CONTENT_ENCODING, "zstd")])).is_err());
    }

    #[test]
    fn partial_success_is_omitted_when_nothing_was_rejected() {
        let all = Accepted {
            rejected: 0,
            error_message: String::new(),
        };
        assert_eq!(
            partial_success_json("rejectedSpans", &all).to_string(),
            "{}"
        );
        let some = Accepted {
            rejected: 2,
            error_message: "bad".into(),
        };
        assert_eq!(
            partial_success_json("rejectedDataPoints", &some).to_string(),
            r#"{"partialSuccess":{"errorMessage":"bad","rejectedDataPoints":"2"}}"#
        );
    }
}
