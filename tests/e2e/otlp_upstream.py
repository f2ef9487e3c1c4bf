"""The backends freezeframe forwards the app's telemetry to, for the tests:
an OTLP/gRPC server on grpcio (metrics, traces and logs services) and an
OTLP/HTTP server on the standard library.

Both keep every request's bytes exactly as they arrived: the gRPC
handlers are registered without a deserializer, so grpcio hands them the
raw message, and the HTTP handler keeps the body (inflated if gzip). Each
request is then decoded with the official opentelemetry-proto classes, so
that a request that is not valid OTLP fails the test where it arrives."""

import gzip
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

# signal: (gRPC service, request class, response class, HTTP path)
SIGNALS = {
    "metrics": (
        "opentelemetry.proto.collector.metrics.v1.MetricsService",
        metrics_service_pb2.ExportMetricsServiceRequest,
        metrics_service_pb2.ExportMetricsServiceResponse,
        "/v1/metrics",
    ),
    "traces": (
        "opentelemetry.proto.collector.trace.v1.TraceService",
        trace_service_pb2.ExportTraceServiceRequest,
        trace_service_pb2.ExportTraceServiceResponse,
        "/v1/traces",
    ),
    "logs": (
        "opentelemetry.proto.collector.logs.v1.LogsService",
        logs_service_pb2.ExportLogsServiceRequest,
        logs_service_pb2.ExportLogsServiceResponse,
        "/v1/logs",
    ),
}


@dataclass
class Arrived:
    signal: str
    raw: bytes
    message: object  # the decoded request
    at: float  # time.monotonic(), when it arrived


class Upstream:
    """What arrived, and an optional delay before each answer (a slow backend)."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.lock = threading.Lock()
        self.arrived: list[Arrived] = []

    def _arrive(self, signal: str, raw: bytes):
        message = SIGNALS[signal][1].FromString(raw)
        with self.lock:
            self.arrived.append(Arrived(signal, raw, message, time.monotonic()))
        if self.delay:
            time.sleep(self.delay)

    def requests(self, signal: Optional[str] = None) -> list[Arrived]:
        with self.lock:
            return [a for a in self.arrived if signal is None or a.signal == signal]

    def wait_for(self, count: int, timeout: float) -> list[Arrived]:
        deadline = time.monotonic() + timeout
        while len(arrived := self.requests()) < count:
            assert time.monotonic() < deadline, f"{len(arrived)} of {count} requests in {timeout}s"
            time.sleep(0.1)
        return arrived


class GrpcUpstream(Upstream):
    def __init__(self, port: Optional[int] = None, delay: float = 0.0):
        super().__init__(delay)
        # Enough workers that a slow answer never queues the next request
        # on our side: what is measured is freezeframe's queue.
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        for signal, (service, _, response, _) in SIGNALS.items():
            answer = response().SerializeToString()

            def export(raw, context, signal=signal, answer=answer):
                self._arrive(signal, raw)
                return answer

            handler = grpc.unary_unary_rpc_method_handler(export, request_deserializer=None, response_serializer=None)
            self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {"Export": handler}),))
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port or 0}")
        self.server.start()

    def stop(self):
        self.server.stop(grace=0).wait()


class HttpUpstream(Upstream):
    def __init__(self, port: Optional[int] = None, delay: float = 0.0):
        super().__init__(delay)
        upstream = self
        by_path = {path: (signal, response) for signal, (_, _, response, path) in SIGNALS.items()}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path not in by_path or self.headers.get("Content-Type") != "application/x-protobuf":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                signal, response = by_path[self.path]
                upstream._arrive(signal, body)
                payload = response().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port or 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
