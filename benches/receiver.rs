//! OTLP/HTTP receiver throughput: histogram data points accepted per second
//! with the receiver on a single-threaded runtime (one core), fed by a
//! client on another thread, and the converted batches drained as the
//! trigger loop would. Then the same with forwarding to a second receiver
//! over gRPC and over HTTP: what the first receiver still accepts, and what
//! reaches the upstream. `cargo bench --bench receiver`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use freezeframe::export::otlp::settings::{self, Protocol};
use freezeframe::forward::{self, ForwardConfig, Forwarding};
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

/// A receiver on a single-threaded runtime of its own (one core), its
/// converted batches drained as the trigger loop would, optionally
/// forwarding everything it accepts.
struct Receiver {
    grpc: SocketAddr,
    http: SocketAddr,
    points: Arc<AtomicU64>,
    stop: CancellationToken,
    thread: std::thread::JoinHandle<()>,
}

impl Receiver {
    fn start(forward: Option<ForwardConfig>) -> Self {
        let points = Arc::new(AtomicU64::new(0));
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        let stop = CancellationToken::new();
        let (server_stop, counted) = (stop.clone(), Arc::clone(&points));
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let forwarding = forward.map(|config| Forwarding::start(&config).unwrap());
                let (metrics, mut batches) = tokio::sync::mpsc::channel(256);
                let config = ReceiverConfig {
                    grpc: SocketAddr::from(([127, 0, 0, 1], 0)),
                    http: SocketAddr::from(([127, 0, 0, 1], 0)),
                    max_request_bytes: 4 << 20,
                };
                let sinks = Sinks {
                    metrics,
                    spans: Arc::new(SpanStore::new(1000, Duration::from_secs(60))),
                    forward: forwarding.as_ref().map(Forwarding::forwarder),
                };
                let running = ingest::serve(config, sinks, server_stop.clone())
                    .await
                    .unwrap();
                address_tx
                    .send((running.grpc_addr(), running.http_addr()))
                    .unwrap();
                let drain = tokio::spawn(async move {
                    while let Some(batch) = batches.recv().await {
                        counted.fetch_add(batch.points.len() as u64, Ordering::Relaxed);
                    }
                });
                running.stopped().await.unwrap();
                if let Some(forwarding) = forwarding {
                    forwarding.finish(Duration::from_secs(5)).await;
                }
                drain.abort();
            });
        });
        let (grpc, http) = address_rx.recv().unwrap();
        Receiver {
            grpc,
            http,
            points,
            stop,
            thread,
        }
    }

    fn points(&self) -> u64 {
        self.points.load(Ordering::Relaxed)
    }

    fn stop(self) {
        self.stop.cancel();
        self.thread.join().unwrap();
    }
}

/// Sends `body` to `address` from `CLIENTS` connections for `RUN`.
fn load(address: SocketAddr, body: &[u8]) -> Duration {
    let client_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    client_runtime.block_on(async {
        let client = reqwest::Client::new();
        let url = format!("http://{address}/v1/metrics");
        let started = Instant::now();
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            let (client, url, body) = (client.clone(), url.clone(), body.to_vec());
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
    })
}

fn forward_to(endpoint: String, protocol: Protocol) -> ForwardConfig {
    let explicit = settings::Explicit {
        endpoint: Some(endpoint),
        protocol: Some(protocol),
        ..settings::Explicit::default()
    };
    ForwardConfig {
        otlp: settings::resolve_in(forward::SECTION, explicit, |_| None)
            .unwrap()
            .unwrap(),
        queue_max_bytes: ForwardConfig::DEFAULT_QUEUE_MAX_BYTES,
    }
}

fn main() {
    let body = request_body();
    println!(
        "request: {POINTS_PER_REQUEST} histogram points, {} bytes of protobuf",
        body.len()
    );

    let receiver = Receiver::start(None);
    let elapsed = load(receiver.http, &body);
    let points = receiver.points();
    receiver.stop();
    println!(
        "accepted {points} points in {:.2} s: {:.0} points/s with the receiver on one core",
        elapsed.as_secs_f64(),
        points as f64 / elapsed.as_secs_f64()
    );

    // The upstream is a second receiver, on a core of its own; forwarding
    // shares the first receiver's core.
    for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
        let upstream = Receiver::start(None);
        let port = if protocol == Protocol::Grpc {
            upstream.grpc
        } else {
            upstream.http
        };
        let endpoint = format!("http://{port}");
        let receiver = Receiver::start(Some(forward_to(endpoint, protocol)));
        let elapsed = load(receiver.http, &body);
        let (accepted, during) = (receiver.points(), upstream.points());
        // Let what is still queued go out: until nothing more arrives for a
        // second. What never arrives was dropped by the full queue.
        let settle = Instant::now();
        let mut last = (upstream.points(), Instant::now());
        while last.1.elapsed() < Duration::from_secs(1) {
            std::thread::sleep(Duration::from_millis(50));
            if upstream.points() != last.0 {
                last = (upstream.points(), Instant::now());
            }
        }
        let drained = last.1 - settle;
        let delivered = upstream.points();
        receiver.stop();
        upstream.stop();
        let seconds = elapsed.as_secs_f64();
        println!(
            "forwarding over {}: accepted {:.0} points/s; forwarded {:.0} points/s under load, \
             {:.0} points/s over load and drain ({:.1} s); {} of {accepted} points dropped by the full queue",
            protocol.name(),
            accepted as f64 / seconds,
            during as f64 / seconds,
            delivered as f64 / (seconds + drained.as_secs_f64()),
            drained.as_secs_f64(),
            accepted - delivered.min(accepted),
        );
    }
}
