//! The OTLP receivers over real sockets, with real clients: reqwest for
//! OTLP/HTTP, the generated tonic clients for OTLP/gRPC, and a bare TCP
//! stream where a well-behaved client cannot send what we need to test.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flate2::write::GzEncoder;
use freezeframe::ingest::{self, IngestError, ReceiverConfig, Running, Sinks, SpanStore};
use freezeframe::signals::{MetricBatch, PointValue, Temporality};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use reqwest::header::{CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::Code;

const LIMIT: usize = 4 << 20;
const PROTOBUF: &str = "application/x-protobuf";
const JSON: &str = "application/json";
const T0: u64 = 1_700_000_000_000_000_000;
const T1: u64 = 1_700_000_000_500_000_000;

/// A running pair of receivers and the far ends of their sinks.
struct Receivers {
    running: Running,
    batches: mpsc::Receiver<MetricBatch>,
    spans: Arc<SpanStore>,
    stop: CancellationToken,
    http: reqwest::Client,
}

impl Receivers {
    async fn start(channel_capacity: usize) -> Self {
        let (metrics, batches) = mpsc::channel(channel_capacity);
        let spans = Arc::new(SpanStore::new(1000, Duration::from_secs(60)));
        let config = ReceiverConfig {
            grpc: SocketAddr::from(([127, 0, 0, 1], 0)),
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_request_bytes: LIMIT,
        };
        let stop = CancellationToken::new();
        let sinks = Sinks {
            metrics,
            spans: Arc::clone(&spans),
            forward: None,
        };
        let running = ingest::serve(config, sinks, stop.clone())
            .await
            .expect("receivers start");
        Self {
            running,
            batches,
            spans,
            stop,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.running.http_addr())
    }

    fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.running.grpc_addr())
    }

    async fn post(&self, path: &str, content_type: &str, body: Vec<u8>) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .header(CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .await
            .expect("the HTTP receiver answers")
    }

    async fn next_batch(&mut self) -> MetricBatch {
        tokio::time::timeout(Duration::from_secs(5), self.batches.recv())
            .await
            .expect("a batch arrives in time")
            .expect("the channel is open")
    }

    fn no_batch_waiting(&mut self) -> bool {
        self.batches.try_recv().is_err()
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.running.stopped())
            .await
            .expect("the receivers stop in time")
            .expect("the receivers stop cleanly");
    }
}

fn text(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..Default::default()
    }
}

fn gauge_point(value: f64) -> NumberDataPoint {
    NumberDataPoint {
        attributes: vec![text("queue", "orders")],
        start_time_unix_nano: T0,
        time_unix_nano: T1,
        value: Some(number_data_point::Value::AsDouble(value)),
        ..Default::default()
    }
}

fn gauges(values: &[f64]) -> ExportMetricsServiceRequest {
    gauges_with_resource(values, vec![text("service.name", "feed")])
}

fn gauges_with_resource(values: &[f64], resource: Vec<KeyValue>) -> ExportMetricsServiceRequest {
    let metric = Metric {
        name: "queue.depth".into(),
        unit: "1".into(),
        data: Some(metric::Data::Gauge(Gauge {
            data_points: values.iter().map(|&value| gauge_point(value)).collect(),
        })),
        ..Default::default()
    };
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: resource,
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![metric],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// A request of more than `bytes` bytes, all of it one attribute value.
fn oversized(bytes: usize) -> ExportMetricsServiceRequest {
    gauges_with_resource(&[1.0], vec![text("padding", &"x".repeat(bytes))])
}

fn spans(count: u8) -> ExportTraceServiceRequest {
    let spans = (1..=count)
        .map(|number| Span {
            trace_id: vec![number; 16],
            span_id: vec![number; 8],
            name: format!("GET /feed/{number}"),
            start_time_unix_nano: T0,
            end_time_unix_nano: T1,
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![text("service.name", "feed")],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder
        .write_all(bytes)
        .expect("writing to a Vec cannot fail");
    encoder.finish().expect("writing to a Vec cannot fail")
}

fn gauge_values(batch: &MetricBatch) -> Vec<f64> {
    batch
        .points
        .iter()
        .map(|point| match point.value {
            PointValue::Gauge(value) => value,
            ref other => panic!("gauge expected, got {other:?}"),
        })
        .collect()
}

/// `google.rpc.Status`, the error body OTLP/HTTP prescribes.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

async fn rpc_status(response: reqwest::Response) -> RpcStatus {
    let body = response.bytes().await.expect("an error body");
    RpcStatus::decode(body).expect("the error body is a google.rpc.Status")
}

#[tokio::test]
async fn protobuf_metrics_over_http_are_converted_and_delivered() {
    let mut receivers = Receivers::start(8).await;
    let response = receivers
        .post("/v1/metrics", PROTOBUF, gauges(&[1.5, 2.0]).encode_to_vec())
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[CONTENT_TYPE], PROTOBUF);
    let body = response.bytes().await.expect("a body");
    let answer = ExportMetricsServiceResponse::decode(body).expect("an export response");
    assert_eq!(answer.partial_success, None);

    let batch = receivers.next_batch().await;
    assert_eq!(gauge_values(&batch), [1.5, 2.0]);
    let point = &batch.points[0];
    assert_eq!(point.series.metric, "queue.depth");
    assert_eq!(point.series.resource["service.name"], "feed");
    assert_eq!(point.series.attributes["queue"], "orders");
    assert_eq!((point.start_time_unix_nano, point.time_unix_nano), (T0, T1));
    receivers.stop().await;
}

#[tokio::test]
async fn gzip_protobuf_over_http_is_accepted() {
    let mut receivers = Receivers::start(8).await;
    let response = receivers
        .http
        .post(receivers.url("/v1/metrics"))
        .header(CONTENT_TYPE, PROTOBUF)
        .header(CONTENT_ENCODING, "gzip")
        .body(gzip(&gauges(&[7.0]).encode_to_vec()))
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(gauge_values(&receivers.next_batch().await), [7.0]);
    receivers.stop().await;
}

/// OTLP/JSON as the specification writes it: lowerCamelCase names, 64-bit
/// integers as strings, enums as numbers, trace and span ids in hex.
const HAND_WRITTEN_METRICS: &str = r#"{
  "resourceMetrics": [{
    "resource": {
      "attributes": [
        {"key": "service.name", "value": {"stringValue": "feed"}},
        {"key": "process.pid", "value": {"intValue": "4242"}}
      ]
    },
    "scopeMetrics": [{
      "scope": {"name": "feed.instrumentation", "version": "1.0.0"},
      "metrics": [
        {
          "name": "db.client.operation.duration",
          "unit": "s",
          "description": "not used, and unknown fields are ignored",
          "histogram": {
            "aggregationTemporality": 2,
            "dataPoints": [{
              "attributes": [
                {"key": "db.system", "value": {"stringValue": "feeddb"}},
                {"key": "retry", "value": {"boolValue": false}},
                {"key": "tags", "value": {"arrayValue": {"values": [{"stringValue": "a"}, {"intValue": "2"}]}}}
              ],
              "startTimeUnixNano": "1700000000000000000",
              "timeUnixNano": "1700000000500000000",
              "count": "6",
              "sum": 1.25,
              "bucketCounts": ["1", "2", "3"],
              "explicitBounds": [0.1, 1.0],
              "min": 0.01,
              "max": 0.9,
              "exemplars": [{
                "timeUnixNano": "1700000000400000000",
                "asDouble": 0.9,
                "traceId": "5b8efff798038103d269b633813fc60c",
                "spanId": "eee19b7ec3c1b174"
              }]
            }]
          }
        },
        {
          "name": "requests",
          "unit": "{request}",
          "sum": {
            "aggregationTemporality": 1,
            "isMonotonic": true,
            "dataPoints": [{"timeUnixNano": "1700000000500000000", "asInt": "42"}]
          }
        },
        {
          "name": "latency",
          "unit": "ms",
          "exponentialHistogram": {
            "aggregationTemporality": 2,
            "dataPoints": [{
              "timeUnixNano": "1700000000500000000",
              "count": "4",
              "scale": 2,
              "zeroCount": "1",
              "positive": {"offset": -1, "bucketCounts": ["1", "2"]}
            }]
          }
        }
      ]
    }]
  }]
}"#;

#[tokio::test]
async fn hand_written_otlp_json_is_converted() {
    let mut receivers = Receivers::start(8).await;
    let response = receivers
        .post(
            "/v1/metrics",
            "application/json; charset=utf-8",
            HAND_WRITTEN_METRICS.into(),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[CONTENT_TYPE], JSON);
    assert_eq!(response.text().await.expect("a body"), "{}");

    let batch = receivers.next_batch().await;
    let [histogram, sum, exponential] = batch.points.as_slice() else {
        panic!("three points expected: {:?}", batch.points)
    };
    assert_eq!(histogram.series.resource["process.pid"], "4242");
    assert_eq!(histogram.series.attributes["retry"], "false");
    assert_eq!(histogram.series.attributes["tags"], r#"["a",2]"#);
    assert_eq!(
        (histogram.start_time_unix_nano, histogram.time_unix_nano),
        (T0, T1)
    );
    let PointValue::Histogram(buckets) = &histogram.value else {
        panic!("histogram expected")
    };
    assert_eq!(
        (buckets.count, buckets.sum, buckets.min, buckets.max),
        (6, Some(1.25), Some(0.01), Some(0.9))
    );
    assert_eq!(
        (buckets.bounds.as_slice(), buckets.bucket_counts.as_slice()),
        (&[0.1, 1.0][..], &[1, 2, 3][..])
    );
    assert_eq!(buckets.temporality, Temporality::Cumulative);
    let exemplar = &histogram.exemplars[0];
    assert_eq!(
        exemplar.trace_id,
        Some(hex::<16>("5b8efff798038103d269b633813fc60c"))
    );
    assert_eq!(exemplar.span_id, Some(hex::<8>("eee19b7ec3c1b174")));
    assert_eq!(exemplar.time_unix_nano, 1_700_000_000_400_000_000);

    assert_eq!(sum.unit, "{request}");
    assert_eq!(
        sum.value,
        PointValue::Sum {
            value: 42.0,
            monotonic: true,
            temporality: Temporality::Delta
        }
    );
    let PointValue::ExponentialHistogram(exponential) = &exponential.value else {
        panic!("exponential expected")
    };
    assert_eq!(
        (exponential.scale, exponential.zero_count, exponential.count),
        (2, 1, 4)
    );
    assert_eq!(
        (
            exponential.positive.offset,
            exponential.positive.counts.as_slice()
        ),
        (-1, &[1, 2][..])
    );
    receivers.stop().await;
}

fn hex<const N: usize>(text: &str) -> [u8; N] {
    std::array::from_fn(|index| {
        u8::from_str_radix(&text[2 * index..2 * index + 2], 16).expect("hex digits")
    })
}

#[tokio::test]
async fn hand_written_otlp_json_traces_reach_the_span_store() {
    let receivers = Receivers::start(8).await;
    let body = r#"{"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "feed"}}]},
        "scopeSpans": [{"scope": {"name": "feed"}, "spans": [{
            "traceId": "5b8efff798038103d269b633813fc60c",
            "spanId": "eee19b7ec3c1b174",
            "parentSpanId": "",
            "name": "GET /feed",
            "kind": 2,
            "startTimeUnixNano": "1700000000000000000",
            "endTimeUnixNano": "1700000000500000000",
            "attributes": [{"key": "http.response.status_code", "value": {"intValue": "200"}}],
            "status": {"code": 1}
        }]}]
    }]}"#;
    let response = receivers.post("/v1/traces", JSON, body.into()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.expect("a body"), "{}");
    let window = std::time::UNIX_EPOCH + Duration::from_nanos(T0 + 1);
    let stored = receivers.spans.overlapping(window, window);
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].trace_id,
        hex::<16>("5b8efff798038103d269b633813fc60c")
    );
    assert_eq!(stored[0].span_id, hex::<8>("eee19b7ec3c1b174"));
    assert_eq!(stored[0].attributes["http.response.status_code"], "200");
    receivers.stop().await;
}

#[tokio::test]
async fn a_nan_point_is_reported_as_partial_success_and_the_rest_delivered() {
    let mut receivers = Receivers::start(8).await;
    let response = receivers
        .post(
            "/v1/metrics",
            PROTOBUF,
            gauges(&[1.0, f64::NAN, 3.0]).encode_to_vec(),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer = ExportMetricsServiceResponse::decode(response.bytes().await.expect("a body"))
        .expect("a response");
    let partial = answer.partial_success.expect("a partial success");
    assert_eq!(partial.rejected_data_points, 1);
    assert!(
        partial.error_message.contains("NaN"),
        "{}",
        partial.error_message
    );
    assert_eq!(gauge_values(&receivers.next_batch().await), [1.0, 3.0]);

    // The JSON answer has the same shape, with int64 as a string.
    let json = r#"{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"name":"h","histogram":{
        "aggregationTemporality":2,
        "dataPoints":[{"timeUnixNano":"1","count":"5","bucketCounts":["1","1"],"explicitBounds":[1.0]}]
    }}]}]}]}"#;
    let response = receivers.post("/v1/metrics", JSON, json.into()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer = json_body(response).await;
    assert_eq!(answer["partialSuccess"]["rejectedDataPoints"], "1");
    assert!(answer["partialSuccess"]["errorMessage"]
        .as_str()
        .is_some_and(|text| text.contains("count is 5")));
    assert!(
        receivers.no_batch_waiting(),
        "nothing valid, nothing delivered"
    );
    receivers.stop().await;
}

async fn json_body(response: reqwest::Response) -> serde_json::Value {
    serde_json::from_slice(&response.bytes().await.expect("a body")).expect("a JSON body")
}

#[tokio::test]
async fn undecodable_bodies_are_400_in_the_requests_format() {
    let receivers = Receivers::start(8).await;
    let response = receivers
        .post(
            "/v1/metrics",
            PROTOBUF,
            b"\xff\xff\xff\xff garbage".to_vec(),
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        rpc_status(response).await.code,
        Code::InvalidArgument as i32
    );

    let response = receivers
        .post("/v1/traces", JSON, b"{\"resourceSpans\": [".to_vec())
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.headers()[CONTENT_TYPE], JSON);
    let status = json_body(response).await;
    assert_eq!(status["code"], Code::InvalidArgument as i32);
    assert!(status["message"]
        .as_str()
        .is_some_and(|text| text.contains("invalid OTLP/JSON")));

    let response = receivers
        .http
        .post(receivers.url("/v1/metrics"))
        .header(CONTENT_TYPE, PROTOBUF)
        .header(CONTENT_ENCODING, "gzip")
        .body(b"not gzip".to_vec())
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(rpc_status(response)
        .await
        .message
        .contains("not valid gzip"));
    receivers.stop().await;
}

#[tokio::test]
async fn unknown_types_encodings_methods_and_paths_are_refused() {
    let receivers = Receivers::start(8).await;
    let response = receivers
        .post("/v1/metrics", "text/plain", b"queue.depth 3".to_vec())
        .await;
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(response
        .text()
        .await
        .expect("a body")
        .contains("application/x-protobuf"));

    let response = receivers
        .http
        .post(receivers.url("/v1/metrics"))
        .header(CONTENT_TYPE, PROTOBUF)
        .header(CONTENT_ENCODING, "br")
        .body(gauges(&[1.0]).encode_to_vec())
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let response = receivers
        .http
        .get(receivers.url("/v1/metrics"))
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let response = receivers.post("/v1/logs", PROTOBUF, Vec::new()).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    receivers.stop().await;
}

/// Sends `head` (and whatever `body` yields) on a bare connection and
/// returns the status code and body of the answer.
async fn raw_exchange(addr: SocketAddr, head: String, body: Vec<Vec<u8>>) -> (u16, String) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    writer
        .write_all(head.as_bytes())
        .await
        .expect("send the head");
    // The server may answer and close before the body is all sent; write
    // errors then are expected, and the answer is what matters.
    let sender = tokio::spawn(async move {
        for chunk in body {
            if writer.write_all(&chunk).await.is_err() {
                break;
            }
        }
        writer
    });
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read the answer");
    drop(sender.await);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    (status, answer)
}

#[tokio::test]
async fn a_declared_oversize_is_413_before_any_body_is_sent() {
    let receivers = Receivers::start(8).await;
    let head = format!(
        "POST /v1/metrics HTTP/1.1\r\nHost: localhost\r\nContent-Type: {PROTOBUF}\r\nContent-Length: {}\r\n\r\n",
        100 << 20
    );
    let (status, answer) = raw_exchange(receivers.running.http_addr(), head, Vec::new()).await;
    assert_eq!(status, 413, "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    receivers.stop().await;
}

#[tokio::test]
async fn an_undeclared_oversize_is_413_while_reading() {
    let receivers = Receivers::start(8).await;
    let head = format!(
        "POST /v1/metrics HTTP/1.1\r\nHost: localhost\r\nContent-Type: {PROTOBUF}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let chunk = vec![b'x'; 64 << 10];
    let mut chunks: Vec<Vec<u8>> = (0..(2 * LIMIT / chunk.len()))
        .map(|_| {
            [
                format!("{:x}\r\n", chunk.len()).into_bytes(),
                chunk.clone(),
                b"\r\n".to_vec(),
            ]
            .concat()
        })
        .collect();
    chunks.push(b"0\r\n\r\n".to_vec());
    let (status, answer) = raw_exchange(receivers.running.http_addr(), head, chunks).await;
    assert_eq!(status, 413, "{answer}");
    receivers.stop().await;
}

#[tokio::test]
async fn an_oversize_body_with_content_length_is_413() {
    let receivers = Receivers::start(8).await;
    let response = receivers
        .post("/v1/metrics", PROTOBUF, oversized(LIMIT).encode_to_vec())
        .await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        rpc_status(response).await.code,
        Code::ResourceExhausted as i32
    );
    receivers.stop().await;
}

#[tokio::test]
async fn a_full_channel_refuses_with_503_and_unavailable_then_recovers() {
    let mut receivers = Receivers::start(1).await;
    let first = receivers
        .post("/v1/metrics", PROTOBUF, gauges(&[1.0]).encode_to_vec())
        .await;
    assert_eq!(first.status(), StatusCode::OK);

    let refused = receivers
        .post("/v1/metrics", PROTOBUF, gauges(&[2.0]).encode_to_vec())
        .await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()[RETRY_AFTER], "1");
    assert_eq!(rpc_status(refused).await.code, Code::Unavailable as i32);

    let mut client = MetricsServiceClient::connect(receivers.grpc_endpoint())
        .await
        .expect("connect");
    let status = client.export(gauges(&[3.0])).await.expect_err("refused");
    assert_eq!(status.code(), Code::Unavailable, "{status}");

    // Spans never wait on the metrics channel.
    let response = receivers
        .post("/v1/traces", PROTOBUF, spans(2).encode_to_vec())
        .await;
    assert_eq!(response.status(), StatusCode::OK);

    assert_eq!(gauge_values(&receivers.next_batch().await), [1.0]);
    client.export(gauges(&[4.0])).await.expect("room again");
    assert_eq!(gauge_values(&receivers.next_batch().await), [4.0]);
    receivers.stop().await;
}

#[tokio::test]
async fn grpc_exports_with_and_without_gzip_are_delivered() {
    let mut receivers = Receivers::start(8).await;
    let mut client = MetricsServiceClient::connect(receivers.grpc_endpoint())
        .await
        .expect("connect");
    let answer = client
        .export(gauges(&[1.0, f64::INFINITY]))
        .await
        .expect("accepted")
        .into_inner();
    let partial = answer.partial_success.expect("one point rejected");
    assert_eq!(partial.rejected_data_points, 1);
    assert_eq!(gauge_values(&receivers.next_batch().await), [1.0]);

    let mut compressed = client
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip);
    let answer = compressed
        .export(gauges(&[2.0]))
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(answer.partial_success, None);
    assert_eq!(gauge_values(&receivers.next_batch().await), [2.0]);

    let mut traces = TraceServiceClient::connect(receivers.grpc_endpoint())
        .await
        .expect("connect");
    let answer: ExportTraceServiceResponse = traces
        .export(spans(3))
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(answer.partial_success, None);
    assert_eq!(receivers.spans.len(), 3);
    receivers.stop().await;
}

#[tokio::test]
async fn grpc_refuses_oversize_and_garbage_and_still_serves_afterwards() {
    let mut receivers = Receivers::start(8).await;
    let channel = tonic::transport::Endpoint::from_shared(receivers.grpc_endpoint())
        .expect("an endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = MetricsServiceClient::new(channel.clone());

    let status = client
        .export(oversized(LIMIT))
        .await
        .expect_err("too large");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");

    // Small on the wire, past the limit once inflated.
    let mut compressed = client.clone().send_compressed(CompressionEncoding::Gzip);
    let status = compressed
        .export(oversized(LIMIT))
        .await
        .expect_err("too large inflated");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");

    let status = raw_grpc_export(channel.clone(), b"\xff\xff\xff\xff garbage".to_vec())
        .await
        .expect_err("undecodable");
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");

    let answer = client
        .export(gauges(&[5.0]))
        .await
        .expect("a valid request still succeeds")
        .into_inner();
    assert_eq!(answer.partial_success, None);
    assert_eq!(gauge_values(&receivers.next_batch().await), [5.0]);
    receivers.stop().await;
}

/// Sends `payload` as the message of a MetricsService/Export call, as is.
async fn raw_grpc_export(
    channel: tonic::transport::Channel,
    payload: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|error| tonic::Status::unknown(error.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
    );
    let response = grpc
        .unary(tonic::Request::new(payload), path, RawBytes)
        .await?;
    Ok(response.into_inner())
}

/// A codec that sends bytes exactly as given.
struct RawBytes;

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }

    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        buffer: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        buffer.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buffer: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        Ok(Some(buffer.copy_to_bytes(buffer.remaining()).to_vec()))
    }
}

#[tokio::test]
async fn http_still_serves_after_every_kind_of_bad_request() {
    let mut receivers = Receivers::start(8).await;
    let bad: [(&str, Vec<u8>); 3] = [
        (PROTOBUF, b"\x0a\xff\xff".to_vec()),
        (JSON, b"[]".to_vec()),
        ("application/xml", b"<metrics/>".to_vec()),
    ];
    for (content_type, body) in bad {
        let response = receivers.post("/v1/metrics", content_type, body).await;
        assert!(
            response.status().is_client_error(),
            "{content_type}: {}",
            response.status()
        );
    }
    let response = receivers
        .post("/v1/metrics", PROTOBUF, oversized(LIMIT).encode_to_vec())
        .await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let response = receivers
        .post("/v1/metrics", PROTOBUF, gauges(&[9.0]).encode_to_vec())
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(gauge_values(&receivers.next_batch().await), [9.0]);
    receivers.stop().await;
}

#[tokio::test]
async fn shutdown_closes_both_ports() {
    let receivers = Receivers::start(8).await;
    let (grpc, http) = (receivers.running.grpc_addr(), receivers.running.http_addr());
    assert_ne!(grpc.port(), 0);
    assert_ne!(http.port(), 0);
    receivers.stop().await;
    assert!(
        TcpStream::connect(grpc).await.is_err(),
        "gRPC port still open"
    );
    assert!(
        TcpStream::connect(http).await.is_err(),
        "HTTP port still open"
    );
}

#[tokio::test]
async fn a_taken_port_is_reported_with_the_key_to_change() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let config = ReceiverConfig {
        grpc: taken.local_addr().expect("an address"),
        http: SocketAddr::from(([127, 0, 0, 1], 0)),
        max_request_bytes: LIMIT,
    };
    let (metrics, _batches) = mpsc::channel(1);
    let sinks = Sinks {
        metrics,
        spans: Arc::new(SpanStore::new(1, Duration::from_secs(1))),
        forward: None,
    };
    let error = ingest::serve(config, sinks, CancellationToken::new())
        .await
        .expect_err("the port is taken");
    assert!(matches!(error, IngestError::Listen { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains("is another collector running? set [receiver] grpc"),
        "{message}"
    );
}
