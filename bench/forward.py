#!/usr/bin/env python3
"""What forwarding ([forward]) costs the app, measured with the real
OpenTelemetry SDK app of the end-to-end tests and the release binary:

1. the app's export calls (metrics every 500 ms, spans in batches), p50 and
   p99, with freezeframe not forwarding, forwarding to a live upstream (a
   second freezeframe, a real OTLP receiver) and forwarding to a dead one,
   over gRPC and over HTTP;
2. freezeframe's peak resident memory with the forward queue full (the
   upstream is dead, requests keep coming and the oldest are dropped),
   next to its peak under the same load without forwarding: most of the
   memory a flood of metrics costs is the trigger stage's own queue.

Run as root (freezeframe loads its probe) after `cargo build --release`,
with the Python of the end-to-end tests' virtualenv (it has the SDK):
  sudo .../e2e-venv/bin/python bench/forward.py
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FREEZEFRAME = ROOT / "target/release/freezeframe"
APP = ROOT / "tests/e2e/latency_app.py"
RUNNING = re.compile(r"freezeframe is running grpc=\S+:(\d+) http=\S+:(\d+) telemetry=\S+:(\d+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
QUEUE_BYTES = 64 << 20


class Freezeframe:
    def __init__(self, work: Path, name: str, forward: str = ""):
        config = work / f"{name}.toml"
        config.write_text(f"""
[receiver]
grpc = "127.0.0.1:0"
http = "127.0.0.1:0"
[recorder]
mode = "on-trigger"
[telemetry]
listen = "127.0.0.1:0"
[export]
directory = "{work / name}"
{"[forward]" if forward else ""}
{forward}
""")
        self.log = work / f"{name}.log"
        self.proc = subprocess.Popen([str(FREEZEFRAME), "run", "--config", str(config)],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not (running := RUNNING.search(ANSI.sub("", self.log.read_text()))):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        self.grpc, self.http, self.telemetry = (int(port) for port in running.groups())

    def metric(self, name: str, **labels) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.telemetry}/metrics", timeout=5).read().decode()
        wanted = [f'{key}="{value}"' for key, value in labels.items()]
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name)] in " {" and all(label in line for label in wanted):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def peak_rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def dead_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def export_latency(work: Path, name: str, forward: str, protocol: str, seconds: float):
    sidecar = Freezeframe(work, name, forward)
    record = work / f"{name}-app"
    port = sidecar.grpc if protocol == "grpc" else sidecar.http
    app = subprocess.Popen([sys.executable, str(APP), "--protocol", protocol, "--endpoint", f"http://127.0.0.1:{port}",
                            "--record", str(record)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    app.stdout.readline()
    time.sleep(seconds)
    app.kill()
    app.wait()
    sidecar.stop()
    calls = [json.loads(line) for line in (record / "exports.jsonl").read_text().splitlines()]
    # The first calls set up the connection; the steady state is what the app lives with.
    calls = calls[4:]
    failed = sum(call["result"] != "SUCCESS" for call in calls)
    by_signal = {}
    for signal in ("metrics", "traces"):
        durations = sorted(call["seconds"] * 1000 for call in calls if call["signal"] == signal)
        by_signal[signal] = (statistics.median(durations), durations[int(len(durations) * 0.99) - 1], len(durations))
    return by_signal, failed


def request_body(points: int) -> bytes:
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
    from opentelemetry.proto.metrics.v1 import metrics_pb2

    request = metrics_service_pb2.ExportMetricsServiceRequest()
    resource = request.resource_metrics.add()
    resource.resource.attributes.add(key="service.name").value.string_value = "feed"
    metric = resource.scope_metrics.add().metrics.add(name="db.client.operation.duration", unit="s")
    metric.histogram.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
    for index in range(points):
        point = metric.histogram.data_points.add(start_time_unix_nano=1, time_unix_nano=2, count=100, sum=1.5,
                                                 bucket_counts=[10, 20, 30, 20, 10, 5, 3, 1, 1, 0],
                                                 explicit_bounds=[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10])
        point.attributes.add(key="db.operation.name").value.string_value = f"op-{index}"
    return request.SerializeToString()


def flood_memory(work: Path, seconds: float, forwarding: bool):
    forward = f'endpoint = "http://127.0.0.1:{dead_port()}"\nqueue_max_bytes = {QUEUE_BYTES}' if forwarding else ""
    sidecar = Freezeframe(work, f"flood-{forwarding}", forward)
    time.sleep(1)
    idle = sidecar.peak_rss_mib()
    body = request_body(500)
    stop = threading.Event()

    def send():
        while not stop.is_set():
            request = urllib.request.Request(f"http://127.0.0.1:{sidecar.http}/v1/metrics", data=body,
                                             headers={"Content-Type": "application/x-protobuf"}, method="POST")
            try:
                urllib.request.urlopen(request, timeout=5).read()
            except urllib.error.HTTPError as error:
                # 503: the trigger stage's queue is full; back off as an SDK would.
                assert error.code == 503, error
                time.sleep(0.05)

    senders = [threading.Thread(target=send) for _ in range(4)]
    for sender in senders:
        sender.start()
    started = time.monotonic()
    highest_queue = 0.0
    while time.monotonic() - started < seconds:
        highest_queue = max(highest_queue, sidecar.metric("freezeframe_forward_queue_bytes"))
        time.sleep(0.5)
    stop.set()
    for sender in senders:
        sender.join()
    dropped = sidecar.metric("freezeframe_forward_total", outcome="dropped")
    queued = sidecar.metric("freezeframe_forward_total", outcome="queued")
    peak = sidecar.peak_rss_mib()
    sidecar.stop()
    return idle, peak, highest_queue, queued, dropped, len(body)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20, help="how long each export-latency run lasts")
    parser.add_argument("--part", choices=["latency", "memory", "all"], default="all")
    parser.add_argument("--protocol", choices=["grpc", "http"], action="append", help="the app's (default: both)")
    args = parser.parse_args()
    assert FREEZEFRAME.exists(), "cargo build --release first"
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        if args.part in ("latency", "all"):
            export_latencies(work, args.seconds, args.protocol or ["grpc", "http"])
        if args.part in ("memory", "all"):
            for forwarding in (False, True):
                idle, peak, highest_queue, queued, dropped, size = flood_memory(work, 20, forwarding)
                what = f"forward queue full (dead upstream, queue_max_bytes {QUEUE_BYTES >> 20} MiB)" if forwarding else "not forwarding"
                print(f"flood of {size} B metrics requests, {what}: peak RSS {peak:.1f} MiB (idle {idle:.1f} MiB), "
                      f"forward queue up to {highest_queue / 2**20:.1f} MiB, {queued:.0f} queued, {dropped:.0f} dropped")


def export_latencies(work: Path, seconds: float, protocols: list):
    upstream = Freezeframe(work, "upstream")
    try:
        print("export call latency of the SDK app (ms, steady state):")
        for protocol in protocols:
            live_port = upstream.grpc if protocol == "grpc" else upstream.http
            upstream_protocol = "grpc" if protocol == "grpc" else "http/protobuf"
            scenarios = {
                "not forwarding": "",
                "forwarding, live upstream": f'endpoint = "http://127.0.0.1:{live_port}"\nprotocol = "{upstream_protocol}"',
                "forwarding, dead upstream": f'endpoint = "http://127.0.0.1:{dead_port()}"\nprotocol = "{upstream_protocol}"',
            }
            for label, forward in scenarios.items():
                name = f"{protocol}-{label.replace(' ', '').replace(',', '-')}"
                by_signal, failed = export_latency(work, name, forward, protocol, seconds)
                figures = ", ".join(f"{signal} p50 {p50:.2f} p99 {p99:.2f} ({count} calls)"
                                    for signal, (p50, p99, count) in by_signal.items())
                print(f"  {protocol:4} {label:27} {figures}; {failed} failed")
    finally:
        upstream.stop()


if __name__ == "__main__":
    main()
