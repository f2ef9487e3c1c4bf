"""Tiny OTLP profiles backends for the tests: a gRPC ProfilesService on
grpcio and an HTTP endpoint on the standard library, both decoding what
freezeframe sends with the official opentelemetry-proto classes.

Each can be scripted: `answers` is a list of what to do with the 1st, 2nd,
... request (then the last entry repeats); `None` accepts. A receiver can
also be told to take its time (`delay`), to see a slow backend."""

import gzip
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import grpc
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2 as service_pb2
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2_grpc as service_grpc

HTTP_PATH = "/v1development/profiles"


@dataclass
class Received:
    """One request as it arrived."""

    at: float  # time.monotonic()
    request: service_pb2.ExportProfilesServiceRequest
    raw: bytes
    headers: dict = field(default_factory=dict)
    answered: bool = False


@dataclass
class HttpAnswer:
    status: int
    headers: dict = field(default_factory=dict)


@dataclass
class GrpcAnswer:
    code: grpc.StatusCode
    message: str = "scripted failure"


class Receiver:
    def __init__(self, answers=None, delay: float = 0.0):
        self.answers = list(answers or [None])
        self.delay = delay
        self.received: list[Received] = []
        self.lock = threading.Lock()

    def _next_answer(self, received: Received):
        with self.lock:
            self.received.append(received)
            index = len(self.received) - 1
        return self.answers[min(index, len(self.answers) - 1)]

    def accepted(self) -> list[Received]:
        """Requests answered with success."""
        with self.lock:
            return [r for r in self.received if r.answered]

    def profile_ids(self) -> list[bytes]:
        return [
            profile.profile_id
            for received in self.accepted()
            for resource in received.request.resource_profiles
            for scope in resource.scope_profiles
            for profile in scope.profiles
        ]

    def wait_for(self, count: int, timeout: float, accepted: bool = True) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                got = [r for r in self.received if r.answered or not accepted]
            if len(got) >= count:
                return got
            time.sleep(0.1)
        raise AssertionError(f"{len(got)} of {count} requests in {timeout}s")


class GrpcReceiver(Receiver):
    """`ProfilesService/Export` on grpcio, plain or TLS."""

    def __init__(self, port: Optional[int] = None, answers=None, delay: float = 0.0, tls=None):
        super().__init__(answers, delay)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        service_grpc.add_ProfilesServiceServicer_to_server(_Servicer(self), self.server)
        address = f"127.0.0.1:{port or 0}"
        if tls:
            certificate, key = tls
            credentials = grpc.ssl_server_credentials([(open(key, "rb").read(), open(certificate, "rb").read())])
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        self.server.start()

    def stop(self):
        self.server.stop(grace=0).wait()


class _Servicer(service_grpc.ProfilesServiceServicer):
    def __init__(self, receiver: GrpcReceiver):
        self.receiver = receiver

    def Export(self, request, context):
        received = Received(
            at=time.monotonic(),
            request=request,
            raw=request.SerializeToString(),
            headers=dict(context.invocation_metadata()),
        )
        answer = self.receiver._next_answer(received)
        if self.receiver.delay:
            time.sleep(self.receiver.delay)
        if answer is not None:
            context.abort(answer.code, answer.message)
        received.answered = True
        return service_pb2.ExportProfilesServiceResponse()


class HttpReceiver(Receiver):
    """`POST /v1development/profiles`, plain or TLS."""

    def __init__(self, port: Optional[int] = None, answers=None, delay: float = 0.0, tls=None, partial=None):
        super().__init__(answers, delay)
        receiver = self
        self.partial = partial

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != HTTP_PATH:
                    self.send_response(404)
                    self.end_headers()
                    return
                request = service_pb2.ExportProfilesServiceRequest.FromString(body)
                received = Received(
                    at=time.monotonic(), request=request, raw=body, headers={k.lower(): v for k, v in self.headers.items()}
                )
                answer = receiver._next_answer(received)
                if receiver.delay:
                    time.sleep(receiver.delay)
                if answer is not None:
                    self.send_response(answer.status)
                    for key, value in answer.headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                response = service_pb2.ExportProfilesServiceResponse()
                if receiver.partial:
                    response.partial_success.rejected_profiles = receiver.partial[0]
                    response.partial_success.error_message = receiver.partial[1]
                payload = response.SerializeToString()
                received.answered = True
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port or 0), Handler)
        if tls:
            import ssl

            certificate, key = tls
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certificate, key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def reserve_port() -> int:
    """A port nothing listens on (yet): a backend that is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
