//! What both transports do with a decoded request: convert it, hand it on,
//! forward it, count it, and say what to answer.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tokio::sync::mpsc::{self, error::TrySendError};

use super::convert::{self, Rejections};
use super::counters::{count_points, PointOutcome, Signal};
use super::spans::SpanStore;
use crate::forward::{self, Forwarder};
use crate::signals::MetricBatch;

/// The stage's outputs, shared by both transports.
#[derive(Debug)]
pub(crate) struct Intake {
    metrics: mpsc::Sender<MetricBatch>,
    spans: Arc<SpanStore>,
    forward: Option<Forwarder>,
}

/// How a request arrived, for forwarding it as it was.
#[derive(Debug)]
pub(crate) enum Wire {
    /// The protobuf bytes, decompressed.
    Protobuf(Bytes),
    /// OTLP/JSON: forwarded as the protobuf encoding of what was decoded.
    Json,
    /// Not kept, because nothing is forwarded.
    Dropped,
}

/// A request was taken; `rejected` of its items were invalid and skipped.
#[derive(Debug)]
pub(crate) struct Accepted {
    pub rejected: u64,
    /// Why the first rejected item was rejected; empty when none was.
    pub error_message: String,
}

impl Accepted {
    fn from_rejections(rejections: &Rejections) -> Self {
        Self {
            rejected: rejections.count(),
            error_message: rejections.message(),
        }
    }

    fn rejected_i64(&self) -> i64 {
        i64::try_from(self.rejected).unwrap_or(i64::MAX)
    }

    pub fn metrics_response(&self) -> ExportMetricsServiceResponse {
        ExportMetricsServiceResponse {
            partial_success: (self.rejected > 0).then(|| ExportMetricsPartialSuccess {
                rejected_data_points: self.rejected_i64(),
                error_message: self.error_message.clone(),
            }),
        }
    }

    pub fn traces_response(&self) -> ExportTraceServiceResponse {
        ExportTraceServiceResponse {
            partial_success: (self.rejected > 0).then(|| ExportTracePartialSuccess {
                rejected_spans: self.rejected_i64(),
                error_message: self.error_message.clone(),
            }),
        }
    }
}

/// A request was refused as a whole; the sender should retry later, as it
/// would when a Collector's memory limiter refuses data.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub(crate) enum Refused {
    #[error("the metrics pipeline is full; retry later")]
    Full,
    #[error("freezeframe is shutting down; retry later")]
    ShuttingDown,
}

impl Intake {
    pub fn new(
        metrics: mpsc::Sender<MetricBatch>,
        spans: Arc<SpanStore>,
        forward: Option<Forwarder>,
    ) -> Self {
        Self {
            metrics,
            spans,
            forward,
        }
    }

    /// Whether accepted requests go on upstream: then the transports keep
    /// their bytes, and logs are accepted.
    pub fn forwards(&self) -> bool {
        self.forward.is_some()
    }

    /// Hands an accepted request to the forwarder, as it arrived.
    fn forward(&self, signal: forward::Signal, request: &impl Message, wire: Wire) {
        let Some(forwarder) = &self.forward else {
            return;
        };
        let body = match wire {
            Wire::Protobuf(bytes) => bytes,
            Wire::Json => Bytes::from(request.encode_to_vec()),
            Wire::Dropped => {
                tracing::error!(
                    signal = signal.label(),
                    "a request to forward arrived without its bytes; not forwarded"
                );
                return;
            }
        };
        forwarder.submit(signal, body);
    }

    /// Converts a metrics request and queues its valid points as one batch.
    /// Never waits: when the queue is full the request is refused at once, so
    /// a slow consumer cannot stall the receivers or the senders. A request
    /// that is taken is forwarded whole; one refused is not, as the sender
    /// will send it again.
    pub fn metrics(
        &self,
        request: ExportMetricsServiceRequest,
        wire: Wire,
    ) -> Result<Accepted, Refused> {
        let offered = convert::count_metric_points(&request);
        if offered == 0 {
            self.forward(forward::Signal::Metrics, &request, wire);
            return Ok(Accepted {
                rejected: 0,
                error_message: String::new(),
            });
        }
        // Reserve first: when there is no room, refusing costs no conversion.
        let permit = match self.metrics.try_reserve() {
            Ok(permit) => permit,
            Err(full_or_closed) => {
                count_points(Signal::Metrics, PointOutcome::Refused, offered);
                return Err(match full_or_closed {
                    TrySendError::Full(()) => Refused::Full,
                    TrySendError::Closed(()) => Refused::ShuttingDown,
                });
            }
        };
        self.forward(forward::Signal::Metrics, &request, wire);
        let converted = convert::metric_points(request);
        let accepted = converted.items.len() as u64 + converted.without_value;
        count_points(Signal::Metrics, PointOutcome::Accepted, accepted);
        count_points(
            Signal::Metrics,
            PointOutcome::Rejected,
            converted.rejections.count(),
        );
        if !converted.items.is_empty() {
            permit.send(MetricBatch {
                received_at: SystemTime::now(),
                points: converted.items,
            });
        }
        Ok(Accepted::from_rejections(&converted.rejections))
    }

    /// Converts a traces request and keeps its valid spans, and forwards
    /// the request. The span store makes room by evicting, so spans are
    /// never refused.
    pub fn traces(&self, request: ExportTraceServiceRequest, wire: Wire) -> Accepted {
        self.forward(forward::Signal::Traces, &request, wire);
        let converted = convert::spans(request);
        count_points(
            Signal::Traces,
            PointOutcome::Accepted,
            converted.items.len() as u64,
        );
        count_points(
            Signal::Traces,
            PointOutcome::Rejected,
            converted.rejections.count(),
        );
        if !converted.items.is_empty() {
            self.spans.insert(converted.items);
        }
        Accepted::from_rejections(&converted.rejections)
    }

    /// Forwards a logs request: freezeframe reads no logs, it only passes
    /// them on. The transports route logs only when forwarding.
    pub fn logs(&self, request: ExportLogsServiceRequest, wire: Wire) {
        self.forward(forward::Signal::Logs, &request, wire);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    use metrics::{
        Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
    };
    use opentelemetry_proto::tonic::metrics::v1::{
        metric::Data, number_data_point, Gauge as OtlpGauge, Metric, NumberDataPoint,
        ResourceMetrics, ScopeMetrics,
    };
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    /// Counters by `name{label=value,...}`.
    #[derive(Default)]
    struct Tally(Mutex<BTreeMap<String, Arc<AtomicU64>>>);

    impl Tally {
        fn get(&self, key: &str) -> u64 {
            let counters = self.0.lock().expect("not poisoned");
            counters
                .get(key)
                .map_or(0, |counter| counter.load(Ordering::Relaxed))
        }
    }

    impl Recorder for Tally {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            let labels: Vec<String> = key
                .labels()
                .map(|label| format!("{}={}", label.key(), label.value()))
                .collect();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            let mut counters = self.0.lock().expect("not poisoned");
            Counter::from_arc(Arc::clone(counters.entry(name).or_default()))
        }

        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }

        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    fn gauges(values: &[f64]) -> ExportMetricsServiceRequest {
        let data_points = values
            .iter()
            .map(|&value| NumberDataPoint {
                time_unix_nano: 1,
                value: Some(number_data_point::Value::AsDouble(value)),
                ..Default::default()
            })
            .collect();
        let metric = Metric {
            name: "queue.depth".into(),
            data: Some(Data::Gauge(OtlpGauge { data_points })),
            ..Default::default()
        };
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                scope_metrics: vec![ScopeMetrics {
                    metrics: vec![metric],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn intake(capacity: usize) -> (Intake, mpsc::Receiver<MetricBatch>, Arc<SpanStore>) {
        let (sender, receiver) = mpsc::channel(capacity);
        let spans = Arc::new(SpanStore::new(10, Duration::from_secs(60)));
        (
            Intake::new(sender, Arc::clone(&spans), None),
            receiver,
            spans,
        )
    }

    const ACCEPTED: &str = "freezeframe_ingest_points_total{signal=metrics,outcome=accepted}";
    const REJECTED: &str = "freezeframe_ingest_points_total{signal=metrics,outcome=rejected}";
    const REFUSED: &str = "freezeframe_ingest_points_total{signal=metrics,outcome=refused}";

    #[test]
    fn valid_points_are_queued_and_every_point_is_counted() {
        let tally = Tally::default();
        let (intake, mut batches, _) = intake(4);
        let accepted = metrics::with_local_recorder(&tally, || {
            intake.metrics(gauges(&[1.0, f64::NAN, 2.0]), Wire::Dropped)
        })
        .expect("room in the channel");
        assert_eq!(accepted.rejected, 1);
        assert_eq!(
            accepted
                .metrics_response()
                .partial_success
                .map(|partial| partial.rejected_data_points),
            Some(1)
        );
        assert_eq!(batches.try_recv().expect("a batch").points.len(), 2);
        assert_eq!(
            (tally.get(ACCEPTED), tally.get(REJECTED), tally.get(REFUSED)),
            (2, 1, 0)
        );
    }

    #[test]
    fn a_full_channel_refuses_the_whole_request_at_once() {
        let tally = Tally::default();
        let (intake, mut batches, _) = intake(1);
        metrics::with_local_recorder(&tally, || {
            intake
                .metrics(gauges(&[1.0]), Wire::Dropped)
                .expect("room for one");
            let refused = intake
                .metrics(gauges(&[2.0, 3.0, f64::NAN]), Wire::Dropped)
                .expect_err("no room");
            assert!(matches!(refused, Refused::Full));
        });
        assert_eq!(
            (tally.get(ACCEPTED), tally.get(REJECTED), tally.get(REFUSED)),
            (1, 0, 3)
        );
        assert_eq!(batches.try_recv().expect("the first batch").points.len(), 1);
        assert!(batches.try_recv().is_err());

        drop(batches);
        assert!(matches!(
            intake.metrics(gauges(&[4.0]), Wire::Dropped),
            Err(Refused::ShuttingDown)
        ));
    }

    #[test]
    fn a_request_with_nothing_valid_sends_no_batch() {
        let (intake, mut batches, _) = intake(1);
        assert_eq!(
            intake
                .metrics(ExportMetricsServiceRequest::default(), Wire::Dropped)
                .expect("empty is fine")
                .rejected,
            0
        );
        assert_eq!(
            intake
                .metrics(gauges(&[f64::NAN]), Wire::Dropped)
                .expect("taken")
                .rejected,
            1
        );
        assert!(batches.try_recv().is_err());
    }

    #[tokio::test]
    async fn requests_taken_are_forwarded_and_refused_ones_are_not() {
        use crate::export::otlp::settings::{self, Explicit};
        use crate::forward::{ForwardConfig, Forwarding};

        // Nothing listens there, and the workers do not get to run: the
        // requests stay queued, and the counts say which were handed on.
        let explicit = Explicit {
            endpoint: Some("http://127.0.0.1:9".into()),
            ..Explicit::default()
        };
        let config = ForwardConfig {
            otlp: settings::resolve_in(forward::SECTION, explicit, |_| None)
                .expect("valid")
                .expect("an endpoint"),
            queue_max_bytes: 1 << 20,
        };
        let forwarding = Forwarding::start(&config).expect("starts");
        let (sender, mut batches) = mpsc::channel(1);
        let spans = Arc::new(SpanStore::new(10, Duration::from_secs(60)));
        let intake = Intake::new(sender, spans, Some(forwarding.forwarder()));
        let tally = Tally::default();
        metrics::with_local_recorder(&tally, || {
            let request = gauges(&[1.0]);
            let wire = Wire::Protobuf(Bytes::from(request.encode_to_vec()));
            intake.metrics(request, wire).expect("room for one");
            intake
                .metrics(gauges(&[2.0]), Wire::Json)
                .expect_err("the channel is full");
            intake.traces(ExportTraceServiceRequest::default(), Wire::Json);
            intake.logs(ExportLogsServiceRequest::default(), Wire::Json);
        });
        let queued = |signal: &str| {
            tally.get(&format!(
                "freezeframe_forward_total{{signal={signal},outcome=queued}}"
            ))
        };
        assert_eq!(
            (queued("metrics"), queued("traces"), queued("logs")),
            (1, 1, 1)
        );
        assert!(batches.try_recv().is_ok());
    }

    #[test]
    fn spans_are_stored_and_counted() {
        let tally = Tally::default();
        let (intake, _, spans) = intake(1);
        let span = |span_id: Vec<u8>| Span {
            trace_id: vec![1; 16],
            span_id,
            start_time_unix_nano: 1,
            end_time_unix_nano: 2,
            ..Default::default()
        };
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![span(vec![2; 8]), span(vec![])],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let accepted =
            metrics::with_local_recorder(&tally, || intake.traces(request, Wire::Dropped));
        assert_eq!(
            accepted
                .traces_response()
                .partial_success
                .map(|partial| partial.rejected_spans),
            Some(1)
        );
        assert_eq!(spans.len(), 1);
        assert_eq!(
            tally.get("freezeframe_ingest_points_total{signal=traces,outcome=accepted}"),
            1
        );
        assert_eq!(
            tally.get("freezeframe_ingest_points_total{signal=traces,outcome=rejected}"),
            1
        );
    }
}
