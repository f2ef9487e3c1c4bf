"""The Pyroscope push exporter end to end: a real OpenTelemetry SDK app
freezes, the sidecar captures it and pushes it (`protocol = "pyroscope"`)
to a receiver speaking the connect protocol, which decodes the PushRequest
with classes generated from our own proto of Pyroscope's push messages and
reads raw_profile with `go tool pprof -raw`. Then throttling and refusal."""

import base64
import os
import re
import time

from pyroscope_receiver import ConnectAnswer, PushReceiver, push_pb2
from test_export import DOWNWARD_API, LATENCY_RULE, freeze_and_capture, pprof_samples

LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def push_config(port: int, extra: str = "") -> str:
    return f"""otlp_endpoint = "http://127.0.0.1:{port}"
protocol = "pyroscope"
link_grace = "2s"
{extra}"""


def test_a_capture_is_pushed_with_its_series_labels_span_ids_and_credentials(sidecar_factory, app_factory, tmp_path):
    receiver = PushReceiver()
    try:
        sidecar = sidecar_factory(
            LATENCY_RULE,
            export=push_config(receiver.port, 'basic_auth = "tenant-17:s3cret"\ntenant_id = "ops"'),
            env=DOWNWARD_API,
        )
        app = app_factory("grpc", sidecar.grpc)
        freeze_start, freeze_end, event = freeze_and_capture(sidecar, app)
        [pushed] = receiver.wait_for(1, timeout=30)
    finally:
        receiver.stop()

    headers = pushed.headers
    assert headers["content-type"] == "application/proto"
    assert headers["connect-protocol-version"] == "1"
    assert pushed.compressed and headers["content-encoding"] == "gzip", "gzip by default"
    assert headers["authorization"] == "Basic " + base64.b64encode(b"tenant-17:s3cret").decode()
    assert headers["x-scope-orgid"] == "ops"
    assert "s3cret" not in sidecar.log_text()

    [series] = pushed.request.series
    labels = [(label.name, label.value) for label in series.labels]
    assert labels == sorted(labels), "sorted by name"
    names = dict(labels)
    assert names["__name__"] == "off_cpu"
    assert names["service_name"] == "feed"
    assert names["k8s_pod_name"] == "feed-7d9f"
    assert names["team"] == "storage"
    assert "service.name" not in names
    assert all(LABEL_NAME.match(name) for name in names), names
    assert len(names) <= 30 and all(len(value) <= 2048 for value in names.values())

    [sample] = series.samples
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", sample.ID), sample.ID
    profile = tmp_path / "pushed.pb.gz"
    profile.write_bytes(sample.raw_profile)
    raw = os.popen(f"go tool pprof -raw {profile}").read()
    assert "PeriodType: off_cpu" not in raw, "off_cpu:off_cpu:nanoseconds::, as over OTLP"
    samples = pprof_samples(profile)
    frozen = app.requests(freeze_start, freeze_end)
    linked = [labels for _, _, labels in samples if "span_id" in labels]
    assert linked, "the frozen requests' span ids ride on the samples"
    for labels in linked:
        assert re.fullmatch(r"[0-9a-f]{16}", labels["span_id"]), labels
        assert re.fullmatch(r"[0-9a-f]{32}", labels["trace_id"]), labels
    assert {labels["trace_id"] for labels in linked} <= frozen
    # Series labels only, all strings (Pyroscope drops numeric ones); the
    # detail is in the frames.
    for _, locations, labels in samples:
        assert set(labels) <= {"thread_name", "thread_state", "lock_kind", "span_id", "trace_id"}, labels
    assert any(location.startswith("[waiting for futex@0x") for _, locations, _ in samples for location in locations)
    assert sidecar.wait_for_metric("freezeframe_export_total", 1, timeout=10, exporter="pyroscope", outcome="delivered") == 1
    assert list((sidecar.directory / "spool").glob("*.pyroscope.pb")) == []


def test_throttled_and_unavailable_pushes_are_retried(sidecar_factory, app_factory):
    receiver = PushReceiver(
        answers=[ConnectAnswer(429, "resource_exhausted", {"Retry-After": "1"}), ConnectAnswer(503), None]
    )
    try:
        sidecar = sidecar_factory(LATENCY_RULE, export=push_config(receiver.port))
        app = app_factory("grpc", sidecar.grpc)
        freeze_and_capture(sidecar, app, 3)
        receiver.wait_for(1, timeout=40)
    finally:
        receiver.stop()
    assert len(receiver.received) == 3
    first, second, third = (pushed.request.SerializeToString() for pushed in receiver.received)
    assert first == second == third, "the same request, again"
    assert receiver.received[1].at - receiver.received[0].at >= 1.0, "Retry-After is honoured"
    assert sidecar.metric("freezeframe_export_total", exporter="pyroscope", outcome="retried") == 2
    assert sidecar.wait_for_metric("freezeframe_export_total", 1, timeout=10, exporter="pyroscope", outcome="delivered") == 1


def test_a_refused_push_is_not_retried(sidecar_factory, app_factory):
    receiver = PushReceiver(answers=[ConnectAnswer(400, "invalid_argument")])
    try:
        sidecar = sidecar_factory(LATENCY_RULE, export=push_config(receiver.port))
        app = app_factory("grpc", sidecar.grpc)
        freeze_and_capture(sidecar, app, 3)
        receiver.wait_for(1, timeout=30, accepted=False)
        sidecar.wait_for_metric("freezeframe_export_total", 1, timeout=10, exporter="pyroscope", outcome="rejected")
        time.sleep(3)  # room for a retry to show up, if there were one
    finally:
        receiver.stop()
    assert len(receiver.received) == 1
    assert sidecar.metric("freezeframe_export_total", exporter="pyroscope", outcome="retried") == 0
    assert "invalid_argument scripted failure" in sidecar.log_text()


def test_a_spooled_capture_older_than_pyroscope_takes_is_dropped_and_counted(sidecar_factory, tmp_path):
    # What a long outage leaves: a push spooled two hours ago, and one
    # spooled a minute ago, by a run that has since stopped.
    spool = tmp_path / "captures" / "spool"
    spool.mkdir(parents=True)
    request = push_pb2.PushRequest()
    request.series.add().labels.add(name="__name__", value="off_cpu")
    now = time.time()
    for sequence, (label, age) in enumerate([("stale", 2 * 3600), ("recent", 60)]):
        path = spool / f"{sequence:020}-{label}.pyroscope.pb"
        path.write_bytes(request.SerializeToString())
        os.utime(path, (now - age, now - age))
    receiver = PushReceiver()
    try:
        sidecar = sidecar_factory(LATENCY_RULE, export=push_config(receiver.port))
        receiver.wait_for(1, timeout=20)
        assert sidecar.wait_for_metric("freezeframe_export_total", 1, timeout=10, exporter="pyroscope", outcome="expired") == 1
        time.sleep(1)
    finally:
        receiver.stop()
    assert len(receiver.received) == 1, "the stale one is never sent"
    assert sidecar.metric("freezeframe_export_total", exporter="pyroscope", outcome="delivered") == 1
    assert "dropping a spooled profile older than the backend takes" in sidecar.log_text()
    assert "stale" in sidecar.log_text()
    assert not list(spool.iterdir())
