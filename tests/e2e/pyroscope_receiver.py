"""A tiny Pyroscope push endpoint: `POST /push.v1.PusherService/Push` in the
connect protocol, decoding what freezeframe sends with classes generated
(by grpcio-tools, at import) from our own proto/pyroscope_push.proto.

Scripted like the OTLP receivers: `answers` is what to do with the 1st,
2nd, ... request (then the last repeats); `None` accepts."""

import gzip
import importlib
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from grpc_tools import protoc

from otlp_receiver import Receiver

PUSH_PATH = "/push.v1.PusherService/Push"
PROTO = Path(__file__).with_name("proto") / "pyroscope_push.proto"


def _generated():
    out = tempfile.mkdtemp(prefix="pyroscope-proto-")
    status = protoc.main(["grpc_tools.protoc", f"-I{PROTO.parent}", f"--python_out={out}", str(PROTO)])
    assert status == 0, f"protoc failed on {PROTO}"
    sys.path.insert(0, out)
    try:
        return importlib.import_module("pyroscope_push_pb2")
    finally:
        sys.path.remove(out)


push_pb2 = _generated()


@dataclass
class Pushed:
    at: float
    request: object
    headers: dict
    compressed: bool
    answered: bool = False


@dataclass
class ConnectAnswer:
    status: int
    code: str = "unavailable"
    headers: dict = field(default_factory=dict)


class PushReceiver(Receiver):
    def __init__(self, answers=None):
        super().__init__(answers)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != PUSH_PATH:
                    self.send_response(404)
                    self.end_headers()
                    return
                compressed = self.headers.get("Content-Encoding") == "gzip"
                if compressed:
                    body = gzip.decompress(body)
                pushed = Pushed(
                    at=time.monotonic(),
                    request=push_pb2.PushRequest.FromString(body),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    compressed=compressed,
                )
                answer = receiver._next_answer(pushed)
                if answer is None:
                    pushed.answered = True
                    self.send_response(200)
                    self.send_header("Content-Type", "application/proto")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                payload = f'{{"code":"{answer.code}","message":"scripted failure"}}'.encode()
                self.send_response(answer.status)
                for key, value in answer.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
