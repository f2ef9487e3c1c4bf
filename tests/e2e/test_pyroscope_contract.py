"""The OTLP export against Pyroscope's ingest rules (pyroscope_rules.py,
read from Grafana Pyroscope v2.2): a capture of a real OpenTelemetry SDK app,
made in a pod-like environment (the downward-API K8S_* variables and a dozen
OTEL_RESOURCE_ATTRIBUTES), decoded with the official opentelemetry-proto
classes. Every profile must be accepted and make few series. The demo's
request is held to the same rules in test_reproducer.py."""

import time
from datetime import datetime

import pytest
from opentelemetry.proto.common.v1 import common_pb2

from otlp_receiver import GrpcReceiver
from pyroscope_rules import MAX_LABEL_NAMES_PER_SERIES, PYROSCOPE_VERSION, assert_pyroscope_accepts, series_of
from test_export import LATENCY_RULE, export_config, freeze_and_capture

DOZEN = ",".join(f"deployment.attribute{index}=value-{index}" for index in range(12))
POD = {
    "K8S_POD_NAME": "feed-7d9f-x2kq",
    "K8S_NAMESPACE_NAME": "shop",
    "K8S_CONTAINER_NAME": "freezeframe",
    "K8S_NODE_NAME": "node-17",
    "K8S_POD_UID": "3f0c9d8e-2b1a-4c5d-9e8f-7a6b5c4d3e2f",
    "OTEL_RESOURCE_ATTRIBUTES": DOZEN,
}


def off_cpu_start_s(request) -> float:
    return request.resource_profiles[0].scope_profiles[0].profiles[0].time_unix_nano / 1e9


def test_a_capture_in_a_pod_is_accepted_and_makes_few_series(sidecar_factory, app_factory):
    receiver = GrpcReceiver()
    try:
        sidecar = sidecar_factory(LATENCY_RULE, export=export_config(receiver.port), env=POD)
        app = app_factory("grpc", sidecar.grpc)
        _, _, event = freeze_and_capture(sidecar, app)
        received = receiver.wait_for(1, timeout=30)[0]
    finally:
        receiver.stop()
    request = received.request
    now_ns = time.time_ns()

    converted = assert_pyroscope_accepts(request, now_ns)
    [off_cpu] = converted
    assert off_cpu.profile_type == "off_cpu:off_cpu:nanoseconds::", off_cpu.profile_type
    # Under the limit with room to spare, and what did not fit is counted.
    widest = max(len(series) for series in off_cpu.series)
    assert widest <= MAX_LABEL_NAMES_PER_SERIES, widest
    resource = request.resource_profiles[0].resource
    assert len(resource.attributes) == 20, [kv.key for kv in resource.attributes]
    assert resource.dropped_attributes_count > 0
    assert resource.attributes[0].key == "service.name"
    # Nothing unique to this capture names a series: no thread id, no lock
    # address, no duration.
    for series in off_cpu.series:
        labels = dict(series)
        assert not {"thread.id", "lock_holder_tid", "lock_hold_ns", "lock"} & set(labels), labels
        assert not any("@0x" in value for value in labels.values()), labels
    # Dashboards mark the capture where Pyroscope files it: at its start.
    start = datetime.fromisoformat(event["window"]["start"].replace("Z", "+00:00")).timestamp()
    assert sidecar.metric("freezeframe_capture_start_timestamp_seconds", rule="feed-latency") == pytest.approx(start, abs=0.001)
    assert off_cpu_start_s(request) == pytest.approx(start, abs=0.001)
    print(f"Pyroscope {PYROSCOPE_VERSION} rules: {len(off_cpu.series)} series, widest {widest} label names")

    # The rules do refuse what Pyroscope refuses: too many resource
    # attributes, a stale capture, a nameless profile.
    crowded = type(request)()
    crowded.CopyFrom(request)
    for index in range(MAX_LABEL_NAMES_PER_SERIES):
        crowded.resource_profiles[0].resource.attributes.add(key=f"extra.{index}", value=common_pb2.AnyValue(string_value="x"))
    assert any("label names" in reason for reason in series_of(crowded, now_ns)[0].refused)
    assert any("ingestion window" in reason for reason in series_of(request, now_ns + 2 * 3600 * 10**9)[0].refused)
    nameless = type(request)()
    nameless.CopyFrom(request)
    profile = nameless.resource_profiles[0].scope_profiles[0].profiles[0]
    profile.sample_type.type_strindex = profile.sample_type.unit_strindex
    assert any("empty __name__" in reason for reason in series_of(nameless, now_ns)[0].refused)
