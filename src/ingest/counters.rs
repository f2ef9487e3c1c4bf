//! What the ingest stage counts, through the `metrics` facade (whoever runs
//! the process installs the exporter).

use std::fmt;

const POINTS: &str = "freezeframe_ingest_points_total";
const REQUESTS: &str = "freezeframe_ingest_requests_total";
pub(crate) const SPANS_DROPPED: &str = "freezeframe_ingest_spans_dropped_total";

/// Registers descriptions for the ingest counters. Call once after the
/// metrics recorder is installed, so `/metrics` carries HELP text.
pub fn describe_metrics() {
    metrics::describe_counter!(
        POINTS,
        "OTLP data points (signal=metrics) and spans (signal=traces) received, by outcome: \
         accepted, rejected (invalid, skipped) or refused (request refused whole because the pipeline was full; the sender may retry)"
    );
    metrics::describe_counter!(
        REQUESTS,
        "OTLP export requests received, by transport (grpc, http) and outcome"
    );
    metrics::describe_counter!(
        SPANS_DROPPED,
        "Spans evicted from the span store before their retention ran out, because it was full"
    );
}

/// The two OTLP transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// OTLP/gRPC, `[receiver] grpc`.
    Grpc,
    /// OTLP/HTTP, `[receiver] http`.
    Http,
}

impl Transport {
    fn label(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Http => "http",
        }
    }

    /// The `[receiver]` key that sets this transport's address.
    pub(crate) fn config_key(self) -> &'static str {
        self.label()
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Self::Grpc => "OTLP/gRPC",
            Self::Http => "OTLP/HTTP",
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Signal {
    Metrics,
    Traces,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum PointOutcome {
    /// Valid, and handed on.
    Accepted,
    /// Invalid, skipped; reported back in a partial-success response.
    Rejected,
    /// In a request refused whole because the pipeline had no room; the
    /// sender may retry.
    Refused,
}

/// How a request ended, as the sender saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestOutcome {
    /// Taken, possibly with some points rejected (partial success).
    Accepted,
    /// Undecodable (HTTP 400, gRPC `INVALID_ARGUMENT`).
    Invalid,
    /// Past `max_request_bytes` (HTTP 413, gRPC `RESOURCE_EXHAUSTED`).
    TooLarge,
    /// Unknown content type, encoding or method (HTTP 415, gRPC `UNIMPLEMENTED`).
    Unsupported,
    /// The pipeline was full (HTTP 503, gRPC `UNAVAILABLE`).
    Refused,
    /// Anything else, such as a client that went away mid-request.
    Failed,
}

impl RequestOutcome {
    fn label(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Invalid => "invalid",
            Self::TooLarge => "too_large",
            Self::Unsupported => "unsupported",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

pub(crate) fn count_points(signal: Signal, outcome: PointOutcome, points: u64) {
    if points == 0 {
        return;
    }
    let signal = match signal {
        Signal::Metrics => "metrics",
        Signal::Traces => "traces",
    };
    let outcome = match outcome {
        PointOutcome::Accepted => "accepted",
        PointOutcome::Rejected => "rejected",
        PointOutcome::Refused => "refused",
    };
    metrics::counter!(POINTS, "signal" => signal, "outcome" => outcome).increment(points);
}

pub(crate) fn count_request(transport: Transport, outcome: RequestOutcome) {
    metrics::counter!(REQUESTS, "transport" => transport.label(), "outcome" => outcome.label())
        .increment(1);
}
