"""Forwarding end to end: a real OpenTelemetry SDK app exports its metrics
and traces to freezeframe, and freezeframe sends every request on to a
real upstream, unchanged, while the upstream is healthy, dead or slow.

Byte identity is checked against what the SDK itself sent: the app
records each request body where its exporter hands it to the transport
(`latency_app.py --record`), and the upstream keeps each request's bytes
as they arrived (`otlp_upstream.py`)."""

import collections
import gzip
import json
import re
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2

from conftest import LATENCY_RULE
from otlp_receiver import reserve_port
from otlp_upstream import GrpcUpstream, HttpUpstream

QUEUE_BUDGET = 64 * 1024  # the smallest [forward] queue_max_bytes


def forward_config(upstream_port: int, protocol: str, extra: str = "") -> str:
    return f"""endpoint = "http://127.0.0.1:{upstream_port}"
protocol = "{protocol}"
{extra}"""


def start_upstream(protocol: str, port=None, delay: float = 0.0):
    return GrpcUpstream(port, delay) if protocol == "grpc" else HttpUpstream(port, delay)


def sent(record: Path) -> list[tuple[str, bytes]]:
    path = record / "sent.jsonl"
    if not path.exists():
        return []
    return [(entry["signal"], bytes.fromhex(entry["body"])) for entry in map(json.loads, path.read_text().splitlines())]


def exports(record: Path) -> list[dict]:
    path = record / "exports.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def exemplars(arrived) -> list:
    return [
        exemplar
        for request in arrived
        if request.signal == "metrics"
        for resource in request.message.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.WhichOneof("data") == "histogram"
        for point in metric.histogram.data_points
        for exemplar in point.exemplars
    ]


def post(port: int, path: str, body: bytes, content_type: str, encoding=None) -> int:
    headers = {"Content-Type": content_type}
    if encoding:
        headers["Content-Encoding"] = encoding
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status


def wait_until(condition, timeout: float, message):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message()
        time.sleep(0.1)


@pytest.mark.parametrize(
    "app_protocol,upstream_protocol", [("grpc", "grpc"), ("http", "http/protobuf"), ("grpc", "http/protobuf")]
)
def test_every_request_the_app_sends_arrives_upstream_byte_for_byte(
    sidecar_factory, app_factory, tmp_path, app_protocol, upstream_protocol
):
    upstream = start_upstream("grpc" if upstream_protocol == "grpc" else "http")
    try:
        sidecar = sidecar_factory(LATENCY_RULE, forward=forward_config(upstream.port, upstream_protocol))
        record = tmp_path / "app"
        app = app_factory(app_protocol, sidecar.grpc if app_protocol == "grpc" else sidecar.http, "--record", str(record))
        time.sleep(3)
        app.shutdown()
        sent_requests = sent(record)
        signals = collections.Counter(signal for signal, _ in sent_requests)
        assert signals["metrics"] >= 4 and signals["traces"] >= 2, signals
        assert all(export["result"] == "SUCCESS" for export in exports(record)), exports(record)

        arrived = upstream.wait_for(len(sent_requests), timeout=10)
        time.sleep(0.5)  # nothing more may come
        arrived = upstream.requests()
        assert sorted((a.signal, a.raw) for a in arrived) == sorted(sent_requests), (
            "every request arrives once, as the SDK sent it"
        )
        with_ids = [e for e in exemplars(arrived) if len(e.trace_id) == 16 and len(e.span_id) == 8]
        assert with_ids, "the histogram points' exemplars arrive with their trace and span ids"
        assert sidecar.metric("freezeframe_forward_total", signal="metrics", outcome="delivered") == signals["metrics"]
        assert sidecar.metric("freezeframe_forward_total", signal="traces", outcome="delivered") == signals["traces"]
        assert sidecar.metric("freezeframe_forward_total", outcome="dropped") == 0
    finally:
        upstream.stop()


def histogram_point(trace_id: bytes, span_id: bytes):
    """A latency point with one exemplar of the request `trace_id`/`span_id`."""
    return metrics_pb2.HistogramDataPoint(
        start_time_unix_nano=1,
        time_unix_nano=2,
        count=3,
        sum=0.5,
        bucket_counts=[1, 2],
        explicit_bounds=[0.1],
        exemplars=[metrics_pb2.Exemplar(time_unix_nano=2, as_double=0.3, trace_id=trace_id, span_id=span_id)],
    )


def metrics_request_with_what_we_do_not_read() -> bytes:
    """A metrics request with a schema URL, an exemplar and, at the top and
    deep inside, fields no OTLP version defines: a re-encoding by any
    decoder that knows only OTLP would lose them."""
    point = histogram_point(b"\x01" * 16, b"\x02" * 8)
    # Field 99, varint 7: unknown to every OTLP data point.
    point_bytes = point.SerializeToString() + bytes([0x98, 0x06, 0x07])
    metric = metrics_pb2.Metric(name="db.client.operation.duration", unit="s")
    metric.histogram.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
    metric.histogram.data_points.add().ParseFromString(point_bytes)
    request = metrics_service_pb2.ExportMetricsServiceRequest()
    resource_metrics = request.resource_metrics.add(schema_url="https://opentelemetry.io/schemas/1.26.0")
    resource_metrics.scope_metrics.add(schema_url="https://opentelemetry.io/schemas/1.26.0").metrics.append(metric)
    # Field 100, length-delimited "future": unknown at the top too. The
    # Python classes keep unknown fields and write them back out.
    return request.SerializeToString() + bytes([0xA2, 0x06, 0x06]) + b"future"


def test_unknown_fields_logs_and_json_are_forwarded_as_received(sidecar_factory):
    upstream = GrpcUpstream()
    try:
        sidecar = sidecar_factory(LATENCY_RULE, forward=forward_config(upstream.port, "grpc"))
        unknown = metrics_request_with_what_we_do_not_read()
        assert b"future" in unknown and metrics_service_pb2.ExportMetricsServiceRequest.FromString(unknown)
        assert post(sidecar.http, "/v1/metrics", unknown, "application/x-protobuf") == 200
        assert post(sidecar.http, "/v1/metrics", gzip.compress(unknown), "application/x-protobuf", "gzip") == 200

        record = logs_pb2.LogRecord(time_unix_nano=5, severity_text="WARN", body=common_pb2.AnyValue(string_value="slow"))
        logs = logs_service_pb2.ExportLogsServiceRequest()
        logs.resource_logs.add().scope_logs.add().log_records.append(record)
        logs_bytes = logs.SerializeToString()
        assert post(sidecar.http, "/v1/logs", logs_bytes, "application/x-protobuf") == 200
        with grpc.insecure_channel(f"127.0.0.1:{sidecar.grpc}") as channel:
            export = channel.unary_unary(
                "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
                request_serializer=None,
                response_deserializer=logs_service_pb2.ExportLogsServiceResponse.FromString,
            )
            export(logs_bytes, timeout=5)

        # OTLP/JSON, as the specification writes it: ids in hex, 64-bit
        # integers as strings.
        trace_id, span_id = "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174"
        json_body = {
            "resourceMetrics": [
                {
                    "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "feed"}}]},
                    "scopeMetrics": [
                        {
                            "scope": {"name": "feed-db"},
                            "metrics": [
                                {
                                    "name": "db.client.operation.duration",
                                    "unit": "s",
                                    "histogram": {
                                        "aggregationTemporality": 2,
                                        "dataPoints": [
                                            {
                                                "startTimeUnixNano": "1",
                                                "timeUnixNano": "2",
                                                "count": "3",
                                                "sum": 0.5,
                                                "bucketCounts": ["1", "2"],
                                                "explicitBounds": [0.1],
                                                "exemplars": [
                                                    {
                                                        "timeUnixNano": "2",
                                                        "asDouble": 0.3,
                                                        "traceId": trace_id,
                                                        "spanId": span_id,
                                                    }
                                                ],
                                            }
                                        ],
                                    },
                                }
                            ],
                        }
                    ],
                    "schemaUrl": "https://opentelemetry.io/schemas/1.26.0",
                }
            ]
        }
        assert post(sidecar.http, "/v1/metrics", json.dumps(json_body).encode(), "application/json") == 200

        arrived = upstream.wait_for(5, timeout=10)
        metrics = [a for a in arrived if a.signal == "metrics"]
        assert [a.raw for a in metrics[:2]] == [unknown, unknown], "unknown fields and all, gzip or not"
        assert [a.raw for a in arrived if a.signal == "logs"] == [logs_bytes, logs_bytes], "logs over HTTP and gRPC"

        expected = metrics_service_pb2.ExportMetricsServiceRequest()
        resource = expected.resource_metrics.add(schema_url="https://opentelemetry.io/schemas/1.26.0")
        resource.resource.attributes.add(key="service.name").value.string_value = "feed"
        scope = resource.scope_metrics.add()
        scope.scope.name = "feed-db"
        metric = scope.metrics.add(name="db.client.operation.duration", unit="s")
        metric.histogram.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
        metric.histogram.data_points.append(histogram_point(bytes.fromhex(trace_id), bytes.fromhex(span_id)))
        assert metrics[2].message == expected, "the JSON request arrives as the equivalent protobuf"
        assert sidecar.metric("freezeframe_forward_total", signal="logs", outcome="delivered") == 2
    finally:
        upstream.stop()


def test_without_an_endpoint_nothing_is_forwarded_and_logs_are_not_accepted(sidecar_factory):
    sidecar = sidecar_factory(LATENCY_RULE)
    with pytest.raises(urllib.error.HTTPError) as refused:
        post(sidecar.http, "/v1/logs", b"", "application/x-protobuf")
    assert refused.value.code == 404
    assert "freezeframe_forward_total" not in urllib.request.urlopen(f"http://127.0.0.1:{sidecar.telemetry}/metrics").read().decode()


def rfc3339_seconds(text: str) -> float:
    from datetime import datetime, timezone

    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def freeze_is_caught_on_time(sidecar, app):
    """Freezes the app and checks the latency rule fires as it does without
    forwarding: the breach dated to the freeze, the firing `for` later."""
    freeze_start_ns, _ = app.freeze(4)
    event = sidecar.wait_for_event(lambda e: e["rule"] == "feed-latency" and e["outcome"] == "captured", timeout=30)
    freeze_start = freeze_start_ns / 1e9
    breach_start = rfc3339_seconds(event["breach_start"])
    assert freeze_start - 1.0 <= breach_start <= freeze_start + 1.5, (event, freeze_start)
    assert rfc3339_seconds(event["fired_at"]) - freeze_start <= 3.5, (event, freeze_start)


def exports_were_prompt(record: Path):
    calls = exports(record)
    assert len(calls) >= 10, calls
    assert all(call["result"] == "SUCCESS" for call in calls), [c for c in calls if c["result"] != "SUCCESS"]
    slowest = max(call["seconds"] for call in calls)
    # An export to a local freezeframe takes milliseconds; waiting on the
    # upstream would take its timeout (or the 10 s a slow one needs).
    assert slowest < 0.5, f"an export call took {slowest:.3f} s"


def test_a_dead_upstream_costs_the_app_nothing_and_gets_the_rest_when_it_comes_back(
    sidecar_factory, app_factory, tmp_path
):
    port = reserve_port()
    sidecar = sidecar_factory(
        LATENCY_RULE, forward=forward_config(port, "grpc", f"queue_max_bytes = {QUEUE_BUDGET}\ntimeout = \"2s\"")
    )
    record = tmp_path / "app"
    app = app_factory("grpc", sidecar.grpc, "--record", str(record))
    time.sleep(3)
    freeze_is_caught_on_time(sidecar, app)
    held = []
    for _ in range(10):
        held.append(sidecar.metric("freezeframe_forward_queue_bytes"))
        time.sleep(0.2)
    assert 0 < max(held) <= QUEUE_BUDGET, held
    dropped = sidecar.metric("freezeframe_forward_total", signal="traces", outcome="dropped")
    dropped += sidecar.metric("freezeframe_forward_total", signal="metrics", outcome="dropped")
    assert dropped > 0, "the budget was reached and the oldest dropped"
    assert sidecar.metric("freezeframe_forward_total", outcome="delivered") == 0
    exports_were_prompt(record)
    log = sidecar.log_text()
    assert log.count("cannot forward the app's telemetry") == 1, "one warning per outage, not per request"
    assert log.count("the forward queue is full") == 1, log

    upstream = GrpcUpstream(port)
    try:
        app.shutdown()
        counts = lambda outcome: sum(  # noqa: E731
            sidecar.metric("freezeframe_forward_total", signal=signal, outcome=outcome) for signal in ("metrics", "traces")
        )
        wait_until(
            lambda: counts("delivered") + counts("dropped") == counts("queued") > 0,
            timeout=20,
            message=lambda: f"queued {counts('queued')}, delivered {counts('delivered')}, dropped {counts('dropped')}",
        )
        assert sidecar.metric("freezeframe_forward_queue_bytes") == 0
        arrived = upstream.requests()
        assert len(arrived) == counts("delivered") > 0
        sent_requests = set(sent(record))
        assert all((a.signal, a.raw) in sent_requests for a in arrived), "what was kept arrives as the app sent it"
        newest_sent = sent(record)[-1]
        assert (newest_sent[0], newest_sent[1]) in {(a.signal, a.raw) for a in arrived}, "the newest are kept"
        assert "the forward queue has caught up" in sidecar.log_text()
    finally:
        upstream.stop()


def test_a_slow_upstream_changes_neither_the_apps_exports_nor_the_trigger(sidecar_factory, app_factory, tmp_path):
    upstream = GrpcUpstream(delay=10)
    try:
        sidecar = sidecar_factory(
            LATENCY_RULE, forward=forward_config(upstream.port, "grpc", f"queue_max_bytes = {QUEUE_BUDGET}\ntimeout = \"30s\"")
        )
        record = tmp_path / "app"
        app = app_factory("grpc", sidecar.grpc, "--record", str(record))
        time.sleep(3)
        freeze_is_caught_on_time(sidecar, app)
        exports_were_prompt(record)
        assert sidecar.metric("freezeframe_forward_queue_bytes") <= QUEUE_BUDGET
        # Each answer takes 10 s; the first were sent at start-up.
        upstream.wait_for(1, timeout=5)
        sidecar.wait_for_metric("freezeframe_forward_total", 1, timeout=15, signal="metrics", outcome="delivered")

        # Shutdown: the grace runs out with requests still at the upstream.
        app.stop()
        started = time.monotonic()
        sidecar.stop()
        assert sidecar.proc.returncode == 0
        assert time.monotonic() - started < 15, "the forward grace is bounded"
        log = sidecar.log_text()
        unsent = re.search(r"forwarding stopped after 5s with requests not yet sent; they are lost unsent=(\d+)", log)
        assert unsent and int(unsent.group(1)) >= 1, log
    finally:
        upstream.stop()
