"""A service that reports its request latency with the OpenTelemetry Python
SDK, and can be told to freeze.

Request threads serve "requests" (a few ms of work each), each in a span
that names its thread (`thread.id`, the OS thread id, as the semantic
conventions say), and record their latency in the
`db.client.operation.duration` histogram (unit s), exported over OTLP every
500 ms with exemplars of the spans. A line `freeze SECONDS` on stdin makes a
writer thread hold the lock every request needs for that long: request
threads block in the kernel on a futex, exactly what an off-CPU profile must
show.

Prints `ready PID` once exporting, and `frozen START_NS END_NS` (wall clock)
after each freeze. A line `requests START_NS END_NS` prints `requests` and
the hex trace ids of the finished requests that overlapped that interval:
the requests a freeze held up. A line `threads` prints `threads` and the OS
thread ids of the request threads. A line `stop` shuts the SDK down (its
last exports flushed) and prints `stopped`.

With `--record DIR`, every request body the exporters send is appended to
DIR/sent.jsonl (signal and hex bytes), taken where the SDK hands it to
the transport: the serialized message gRPC writes, the bytes HTTP posts.
Every export call's duration and result go to DIR/exports.jsonl.
"""

import argparse
import collections
import json
import os
import sys
import threading
import time

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


def exporters(protocol: str, endpoint: str):
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPMetricExporter(endpoint=endpoint, insecure=True), OTLPSpanExporter(endpoint=endpoint, insecure=True)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return (
        OTLPMetricExporter(endpoint=f"{endpoint}/v1/metrics"),
        OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces"),
    )


class Recorder:
    """What the exporters sent, and how long each export call took."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        self.lock = threading.Lock()
        self.sent = open(os.path.join(directory, "sent.jsonl"), "a")
        self.exports = open(os.path.join(directory, "exports.jsonl"), "a")

    def _write(self, file, record):
        with self.lock:
            file.write(json.dumps(record) + "\n")
            file.flush()

    def body(self, signal: str, body: bytes):
        self._write(self.sent, {"signal": signal, "body": body.hex()})

    def wrap(self, protocol: str, signal: str, exporter):
        if protocol == "grpc":
            # The stub serializes the request with SerializeToString: the
            # bytes on the wire are these.
            translate = exporter._translate_data

            def translated(*args, **kwargs):
                request = translate(*args, **kwargs)
                self.body(signal, request.SerializeToString())
                return request

            exporter._translate_data = translated
        else:
            client = exporter._client
            post = client.export

            def posted(body, *args, **kwargs):
                self.body(signal, body)
                return post(body, *args, **kwargs)

            client.export = posted
        export = exporter.export

        def timed(*args, **kwargs):
            started = time.monotonic()
            result = export(*args, **kwargs)
            self._write(
                self.exports,
                {"signal": signal, "at": started, "seconds": time.monotonic() - started, "result": result.name},
            )
            return result

        exporter.export = timed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--no-thread-ids", action="store_true", help="spans do not say which thread ran them")
    parser.add_argument("--no-traces", action="store_true", help="export metrics only (exemplars still name the spans)")
    parser.add_argument("--record", metavar="DIR", help="record what the exporters send and how long exports take")
    args = parser.parse_args()

    resource = Resource.create({"service.name": "feed", "process.pid": os.getpid()})
    metric_exporter, span_exporter = exporters(args.protocol, args.endpoint)
    if args.record:
        recorder = Recorder(args.record)
        recorder.wrap(args.protocol, "metrics", metric_exporter)
        recorder.wrap(args.protocol, "traces", span_exporter)
    reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=500)
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    metrics.set_meter_provider(meter_provider)
    tracer_provider = TracerProvider(resource=resource)
    if not args.no_traces:
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(tracer_provider)

    meter = metrics.get_meter("feed-db")
    # The semantic conventions' advised buckets: the SDK's defaults are for
    # milliseconds and would put every request of this seconds histogram
    # in one bucket.
    duration = meter.create_histogram(
        "db.client.operation.duration",
        unit="s",
        explicit_bucket_boundaries_advisory=[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10],
    )
    tracer = trace.get_tracer("feed-db")
    table_lock = threading.Lock()
    attributes = {"db.system": "feeddb", "db.operation.name": "get"}

    # (trace id, start ns, end ns) of recent requests, for `requests`.
    finished = collections.deque(maxlen=100_000)
    request_threads = []

    def serve():
        # The OS thread id: what the off-CPU samples of this thread carry.
        request_threads.append(threading.get_native_id())
        span_attributes = {} if args.no_thread_ids else {"thread.id": threading.get_native_id()}
        while True:
            with tracer.start_as_current_span("get", attributes=span_attributes) as span:
                start_ns = time.time_ns()
                started = time.monotonic()
                with table_lock:
                    time.sleep(0.002)
                duration.record(time.monotonic() - started, attributes)
            finished.append((format(span.get_span_context().trace_id, "032x"), start_ns, time.time_ns()))
            time.sleep(0.003)

    for index in range(args.threads):
        threading.Thread(target=serve, name=f"request-{index}", daemon=True).start()

    print(f"ready {os.getpid()}", flush=True)
    for line in sys.stdin:
        words = line.split()
        if len(words) == 2 and words[0] == "freeze":
            start = time.time_ns()
            with table_lock:
                time.sleep(float(words[1]))
            print(f"frozen {start} {time.time_ns()}", flush=True)
        elif len(words) == 3 and words[0] == "requests":
            start, end = int(words[1]), int(words[2])
            held_up = sorted({trace_id for trace_id, began, ended in list(finished) if began < end and ended > start})
            print(" ".join(["requests", *held_up]), flush=True)
        elif words == ["threads"]:
            print(" ".join(["threads", *map(str, request_threads)]), flush=True)
        elif words == ["stop"]:
            tracer_provider.shutdown()
            meter_provider.shutdown()
            print("stopped", flush=True)
    # stdin closed: keep serving until killed.
    threading.Event().wait()


if __name__ == "__main__":
    main()
