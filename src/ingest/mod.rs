//! The ingest stage: OTLP receivers for the application's metrics and
//! traces (and its logs, when they are forwarded).
//!
//! Applications export to freezeframe as they would to an OpenTelemetry
//! Collector: gRPC on `127.0.0.1:4317`, HTTP on `127.0.0.1:4318` (protobuf or
//! JSON, optionally gzip). Each request is taken in under a hard size limit
//! (`body`), decoded, and converted point by point into
//! [`signals`](crate::signals) values (`convert`); invalid points are
//! skipped and reported back as a partial success. Metric batches go to the
//! trigger stage through a bounded channel, spans into a bounded
//! [`SpanStore`] (`intake`). With `[forward]` configured, every request
//! taken is also handed, as received, to the [`forward`](crate::forward)
//! stage.
//!
//! The answers are the Collector's, so SDK exporters retry when retrying can
//! help (HTTP 503 / gRPC `UNAVAILABLE` while the channel is full) and drop
//! the data when it cannot (400 / `INVALID_ARGUMENT`, 413 /
//! `RESOURCE_EXHAUSTED`).

mod attributes;
mod body;
mod convert;
mod counters;
mod grpc;
mod http;
mod intake;
mod spans;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use counters::{describe_metrics, Transport};
pub use spans::SpanStore;

use crate::forward::Forwarder;
use crate::signals::MetricBatch;
use intake::Intake;

/// Once shutdown is asked for, how long requests in flight may take before
/// their connections are dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Where the receivers listen and what they accept (`[receiver]` in the
/// config file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverConfig {
    /// OTLP/gRPC address; port 0 picks a free port. Default `127.0.0.1:4317`:
    /// in a pod, localhost is shared with the application.
    pub grpc: SocketAddr,
    /// OTLP/HTTP address; port 0 picks a free port. Default `127.0.0.1:4318`.
    pub http: SocketAddr,
    /// Largest request accepted, both as sent and once decompressed.
    /// Default 4 MiB, the Collector's gRPC default.
    pub max_request_bytes: usize,
}

impl ReceiverConfig {
    /// The default `max_request_bytes`.
    pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 << 20;
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            grpc: SocketAddr::from(([127, 0, 0, 1], 4317)),
            http: SocketAddr::from(([127, 0, 0, 1], 4318)),
            max_request_bytes: Self::DEFAULT_MAX_REQUEST_BYTES,
        }
    }
}

/// Where received data goes.
#[derive(Debug, Clone)]
pub struct Sinks {
    /// One batch per export request that had valid points. Bounded: when it
    /// is full, requests are refused (503 / `UNAVAILABLE`) rather than queued.
    pub metrics: mpsc::Sender<MetricBatch>,
    /// Finished spans, for linking captures to the requests they froze.
    pub spans: Arc<SpanStore>,
    /// Where every accepted request goes on, as received; `None` forwards
    /// nothing (and logs are not accepted).
    pub forward: Option<Forwarder>,
}

/// Receivers that are listening. Dropping this does not stop them: cancel
/// the token given to [`serve`], then await [`Running::stopped`].
#[derive(Debug)]
pub struct Running {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    grpc: JoinHandle<Result<(), IngestError>>,
    http: JoinHandle<Result<(), IngestError>>,
}

impl Running {
    /// The address the gRPC receiver is bound to (the real port when 0 was asked).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The address the HTTP receiver is bound to (the real port when 0 was asked).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Waits until both receivers have stopped: after the shutdown token is
    /// cancelled and requests in flight are answered (or 5 s have passed),
    /// or after one receiver failed, which stops the other too.
    pub async fn stopped(self) -> Result<(), IngestError> {
        let grpc = joined(Transport::Grpc, self.grpc_addr, self.grpc.await);
        let http = joined(Transport::Http, self.http_addr, self.http.await);
        grpc.and(http)
    }
}

fn joined(
    transport: Transport,
    addr: SocketAddr,
    result: Result<Result<(), IngestError>, tokio::task::JoinError>,
) -> Result<(), IngestError> {
    result.unwrap_or_else(|panic| {
        Err(IngestError::Serve {
            transport,
            addr,
            source: Box::new(panic),
        })
    })
}

/// Why the receivers could not start or stopped on their own.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// A receiver's address could not be bound.
    #[error("cannot listen on {addr} for {transport}: {source} ({})", listen_hint(*.transport, .source))]
    Listen {
        transport: Transport,
        addr: SocketAddr,
        source: io::Error,
    },
    /// A receiver stopped with an error while serving.
    #[error("the {transport} receiver on {addr} failed: {source}")]
    Serve {
        transport: Transport,
        addr: SocketAddr,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// `max_request_bytes` was 0.
    #[error("[receiver] max_request_bytes is 0, so every request would be refused: set it to the largest OTLP request to accept (default {})", ReceiverConfig::DEFAULT_MAX_REQUEST_BYTES)]
    NoRequestSize,
}

fn listen_hint(transport: Transport, error: &io::Error) -> String {
    let key = transport.config_key();
    match error.kind() {
        io::ErrorKind::AddrInUse => {
            format!("is another collector running? set [receiver] {key} to a free address")
        }
        io::ErrorKind::PermissionDenied => {
            format!("ports below 1024 need CAP_NET_BIND_SERVICE; set [receiver] {key}")
        }
        io::ErrorKind::AddrNotAvailable => {
            format!("that address is not on this host; set [receiver] {key}")
        }
        _ => format!("check [receiver] {key}"),
    }
}

/// Binds both receivers on the current tokio runtime and returns once both
/// listen. They stop when `shutdown` is cancelled: they stop accepting at
/// once, answer requests in flight, and are gone within 5 s.
pub async fn serve(
    config: ReceiverConfig,
    sinks: Sinks,
    shutdown: CancellationToken,
) -> Result<Running, IngestError> {
    if config.max_request_bytes == 0 {
        return Err(IngestError::NoRequestSize);
    }
    let (grpc_listener, grpc_addr) = bind(Transport::Grpc, config.grpc).await?;
    let (http_listener, http_addr) = bind(Transport::Http, config.http).await?;
    let intake = Arc::new(Intake::new(sinks.metrics, sinks.spans, sinks.forward));
    // A child token, so that a receiver that fails can stop its sibling
    // without cancelling anything else of the caller's.
    let stop = shutdown.child_token();

    let grpc_server = grpc::serve(
        grpc_listener,
        Arc::clone(&intake),
        config.max_request_bytes,
        stop.clone(),
    );
    let grpc = tokio::spawn(supervise(
        Transport::Grpc,
        grpc_addr,
        grpc_server,
        stop.clone(),
    ));
    let http_server = http::serve(
        http_listener,
        intake,
        config.max_request_bytes,
        stop.clone(),
    );
    let http = tokio::spawn(supervise(Transport::Http, http_addr, http_server, stop));

    tracing::info!(grpc = %grpc_addr, http = %http_addr, "OTLP receivers listening");
    Ok(Running {
        grpc_addr,
        http_addr,
        grpc,
        http,
    })
}

async fn bind(
    transport: Transport,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), IngestError> {
    let listen_error = |source| IngestError::Listen {
        transport,
        addr,
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(listen_error)?;
    let bound = listener.local_addr().map_err(listen_error)?;
    Ok((listener, bound))
}

/// Runs one receiver until it stops, bounding its graceful shutdown.
async fn supervise<E>(
    transport: Transport,
    addr: SocketAddr,
    server: impl std::future::Future<Output = Result<(), E>>,
    stop: CancellationToken,
) -> Result<(), IngestError>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let grace_over = async {
        stop.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let result = tokio::select! {
        served = server => served.map_err(|error| IngestError::Serve { transport, addr, source: Box::new(error) }),
        () = grace_over => {
            tracing::warn!(%transport, %addr, "requests still in flight after {SHUTDOWN_GRACE:?}; dropping them");
            Ok(())
        }
    };
    stop.cancel();
    result
}
