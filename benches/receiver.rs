//! OTLP/HTTP receiver throughput: histogram data points accepted per second
//! with the receiver on a single-threaded runtime (one core), fed by a
//! client on another thread, and the converted batches drained as the
//! trigger loop would. `cargo bench --bench receiver`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use freezeframe::ingest::{self, ReceiverConfig, Sinks, SpanStore};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, AggregationTemporality, Histogram, HistogramDataPoint, Metric, ResourceMetrics,
    ScopeMetrics,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use tokio_util::sync::CancellationToken;

const POINTS_PER_REQUEST: usize = 500;
const CLIENTS: usize = 4;
const RUN: Duration = Duration::from_secs(5);

fn attribute(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value)),
        }),
        ..Default::default()
    }
}

/// One export request: a latency histogram with many attribute sets, as a
/// busy service with many operations would send.
fn request_body() -> Vec<u8> {
    let bounds = vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0];
    let points = (0..POINTS_PER_REQUEST)
        .map(|index| HistogramDataPoint {
            attributes: vec![attribute("db.operation.name", format!("op-{index}"))],
            start_time_unix_nano: 1_700_000_000_000_000_000,
            time_unix_nano: 1_700_000_000_500_000_000,
            count: 100,
            sum: Some(1.5),
            bucket_counts: vec![10, 20, 30, 20, 10, 5, 3, 1, 1, 0],
            explicit_bounds: bounds.clone(),
            min: Some(0.0005),
            max: Some(6.0),
            ..Default::default()
        })
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![attribute("service.name", "feed".into())],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: "db.client.operation.duration".into(),
                    unit: "s".into(),
                    data: Some(metric::Data::Histogram(Histogram {
                        data_points: points,
                        aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

fn main() {
    let accepted = Arc::new(AtomicU64::new(0));
    let (address_tx, address_rx) = std::sync::mpsc::channel();
    let stop = CancellationToken::new();
    let server_stop = stop.clone();
    let counted = Arc::clone(&accepted);
    let server = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let (metrics, mut batches) = tokio::sync::mpsc::channel(256);
            let config = ReceiverConfig {
                grpc: SocketAddr::from(([127, 0, 0, 1], 0)),
                http: SocketAddr::from(([127, 0, 0, 1], 0)),
                max_request_bytes: 4 << 20,
            };
            let sinks = Sinks {
                metrics,
                spans: Arc::new(SpanStore::new(1000, Duration::from_secs(60))),
                forward: None,
            };
            let running = ingest::serve(config, sinks, server_stop.clone())
                .await
                .unwrap();
            address_tx.send(running.http_addr()).unwrap();
            let drain = tokio::spawn(async move {
                while let Some(batch) = batches.recv().await {
                    counted.fetch_add(batch.points.len() as u64, Ordering::Relaxed);
                }
            });
            running.stopped().await.unwrap();
            drain.abort();
        });
    });
    let address = address_rx.recv().unwrap();
    let body = request_body();
    println!(
        "request: {POINTS_PER_REQUEST} histogram points, {} bytes of protobuf",
        body.len()
    );

    let client_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let elapsed = client_runtime.block_on(async {
        let client = reqwest::Client::new();
        let url = format!("http://{address}/v1/metrics");
        let started = Instant::now();
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            clients.push(tokio::spawn(async move {
                while started.elapsed() < RUN {
                    let response = client
                        .post(&url)
                        .header("content-type", "application/x-protobuf")
                        .body(body.clone())
                        .send()
                        .await
                        .unwrap();
                    assert!(response.status().is_success(), "{}", response.status());
                    response.bytes().await.unwrap();
                }
            }));
        }
        for client in clients {
            client.await.unwrap();
        }
        started.elapsed()
    });
    stop.cancel();
    server.join().unwrap();
    let points = accepted.load(Ordering::Relaxed);
    println!(
        "accepted {points} points in {:.2} s: {:.0} points/s with the receiver on one core",
        elapsed.as_secs_f64(),
        points as f64 / elapsed.as_secs_f64()
    );
}
