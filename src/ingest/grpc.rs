//! OTLP/gRPC: `MetricsService/Export` and `TraceService/Export` (and
//! `LogsService/Export` when forwarding) on tonic.
//!
//! The two services are written here instead of taken from the generated
//! servers, to give the answers the Collector gives where tonic's defaults
//! differ: an undecodable message is `INVALID_ARGUMENT` (tonic's prost codec
//! says `INTERNAL`), and a message whose length prefix is past the size limit
//! is `RESOURCE_EXHAUSTED` (tonic says `OUT_OF_RANGE`). Tonic still does the
//! framing, the gzip decompression under the same limit, and HTTP/2.
//!
//! When forwarding, the codec keeps each message's bytes as they arrived,
//! to send on unchanged.

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http;
use bytes::{Buf, Bytes};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{Grpc, UnaryService};
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};
use tower_service::Service;

use super::counters::{count_request, RequestOutcome, Transport};
use super::intake::{Intake, Wire};

const METRICS_EXPORT: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";
const TRACES_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
const LOGS_EXPORT: &str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";

/// Serves OTLP/gRPC on `listener` until `stop` is cancelled, then lets
/// requests in flight finish.
pub(crate) async fn serve(
    listener: TcpListener,
    intake: Arc<Intake>,
    max_request_bytes: usize,
    stop: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .serve_with_incoming_shutdown(
            OtlpGrpc {
                intake,
                max_request_bytes,
            },
            incoming,
            stop.cancelled_owned(),
        )
        .await
}

/// Both export services behind one HTTP/2 endpoint, routed by path.
#[derive(Clone)]
struct OtlpGrpc {
    intake: Arc<Intake>,
    max_request_bytes: usize,
}

impl OtlpGrpc {
    fn grpc<Req, Resp>(&self) -> Grpc<Protobuf<Req, Resp>>
    where
        Req: Message + Default + Send + 'static,
        Resp: Message + Send + 'static,
    {
        // The limit applies to the message as sent and again as it inflates.
        Grpc::new(Protobuf::keeping_bytes(self.intake.forwards()))
            .accept_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(self.max_request_bytes)
    }

    async fn handle(self, request: http::Request<Body>) -> http::Response<Body> {
        let response = match request.uri().path() {
            METRICS_EXPORT => {
                let export = ExportMetrics(Arc::clone(&self.intake));
                self.grpc().unary(export, request).await
            }
            TRACES_EXPORT => {
                let export = ExportTraces(Arc::clone(&self.intake));
                self.grpc().unary(export, request).await
            }
            LOGS_EXPORT if self.intake.forwards() => {
                let export = ExportLogs(Arc::clone(&self.intake));
                self.grpc().unary(export, request).await
            }
            path => Status::unimplemented(format!(
                "no such method {path}: freezeframe receives OTLP metrics and traces"
            ))
            .into_http(),
        };
        let (outcome, response) = classify(response);
        count_request(Transport::Grpc, outcome);
        response
    }
}

impl Service<http::Request<Body>> for OtlpGrpc {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _context: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let service = self.clone();
        Box::pin(async move { Ok(service.handle(request).await) })
    }
}

/// Reads the outcome off a response, fixing the size-limit status on the way.
fn classify(response: http::Response<Body>) -> (RequestOutcome, http::Response<Body>) {
    // Errors go out as trailers-only responses, with the status in the
    // headers; a response without one carries a message and `OK` trailers.
    let Some(status) = Status::from_header_map(response.headers()) else {
        return (RequestOutcome::Accepted, response);
    };
    match status.code() {
        Code::Ok => (RequestOutcome::Accepted, response),
        // The handlers never answer OUT_OF_RANGE: this is tonic refusing a
        // length prefix past `max_decoding_message_size`.
        Code::OutOfRange => (
            RequestOutcome::TooLarge,
            Status::resource_exhausted(status.message()).into_http(),
        ),
        Code::ResourceExhausted => (RequestOutcome::TooLarge, response),
        Code::InvalidArgument => (RequestOutcome::Invalid, response),
        Code::Unimplemented => (RequestOutcome::Unsupported, response),
        Code::Unavailable => (RequestOutcome::Refused, response),
        _ => (RequestOutcome::Failed, response),
    }
}

struct ExportMetrics(Arc<Intake>);

impl UnaryService<Received<ExportMetricsServiceRequest>> for ExportMetrics {
    type Response = ExportMetricsServiceResponse;
    type Future = Ready<Result<Response<Self::Response>, Status>>;

    fn call(&mut self, request: Request<Received<ExportMetricsServiceRequest>>) -> Self::Future {
        let Received { message, wire } = request.into_inner();
        ready(match self.0.metrics(message, wire) {
            Ok(accepted) => Ok(Response::new(accepted.metrics_response())),
            Err(refused) => Err(Status::unavailable(refused.to_string())),
        })
    }
}

struct ExportTraces(Arc<Intake>);

impl UnaryService<Received<ExportTraceServiceRequest>> for ExportTraces {
    type Response = ExportTraceServiceResponse;
    type Future = Ready<Result<Response<Self::Response>, Status>>;

    fn call(&mut self, request: Request<Received<ExportTraceServiceRequest>>) -> Self::Future {
        let Received { message, wire } = request.into_inner();
        let accepted = self.0.traces(message, wire);
        ready(Ok(Response::new(accepted.traces_response())))
    }
}

struct ExportLogs(Arc<Intake>);

impl UnaryService<Received<ExportLogsServiceRequest>> for ExportLogs {
    type Response = ExportLogsServiceResponse;
    type Future = Ready<Result<Response<Self::Response>, Status>>;

    fn call(&mut self, request: Request<Received<ExportLogsServiceRequest>>) -> Self::Future {
        let Received { message, wire } = request.into_inner();
        self.0.logs(message, wire);
        ready(Ok(Response::new(ExportLogsServiceResponse::default())))
    }
}

/// A decoded request, and its bytes when they are kept for forwarding.
struct Received<Req> {
    message: Req,
    wire: Wire,
}

/// Protobuf for one RPC: decodes `Req`, encodes `Resp`; keeps the request's
/// bytes if asked to.
struct Protobuf<Req, Resp> {
    keep_bytes: bool,
    types: PhantomData<fn(Req) -> Resp>,
}

impl<Req, Resp> Protobuf<Req, Resp> {
    fn keeping_bytes(keep_bytes: bool) -> Self {
        Self {
            keep_bytes,
            types: PhantomData,
        }
    }
}

impl<Req, Resp> Codec for Protobuf<Req, Resp>
where
    Req: Message + Default + Send + 'static,
    Resp: Message + Send + 'static,
{
    type Encode = Resp;
    type Decode = Received<Req>;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self {
        Self::keeping_bytes(self.keep_bytes)
    }

    fn decoder(&mut self) -> Self {
        Self::keeping_bytes(self.keep_bytes)
    }
}

impl<Req, Resp: Message> Encoder for Protobuf<Req, Resp> {
    type Item = Resp;
    type Error = Status;

    fn encode(&mut self, item: Resp, buffer: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buffer)
            .map_err(|error| Status::internal(format!("cannot encode the response: {error}")))
    }
}

impl<Req: Message + Default, Resp> Decoder for Protobuf<Req, Resp> {
    type Item = Received<Req>;
    type Error = Status;

    fn decode(&mut self, buffer: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        let invalid = |error: prost::DecodeError| {
            Status::invalid_argument(format!("invalid OTLP protobuf: {error}"))
        };
        if !self.keep_bytes {
            let message = Req::decode(buffer).map_err(invalid)?;
            return Ok(Some(Received {
                message,
                wire: Wire::Dropped,
            }));
        }
        let bytes: Bytes = buffer.copy_to_bytes(buffer.remaining());
        let message = Req::decode(bytes.clone()).map_err(invalid)?;
        Ok(Some(Received {
            message,
            wire: Wire::Protobuf(bytes),
        }))
    }
}
