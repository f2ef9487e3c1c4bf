"""`freezeframe run` end to end: a real OpenTelemetry SDK app exports its
latency; the sidecar must notice the freeze on its own and capture it."""

import os
import signal
import subprocess
import threading
import time

import pytest

from conftest import BINARY, LATENCY_RULE, SILENCE_RULE


def rfc3339_seconds(text: str) -> float:
    from datetime import datetime, timezone

    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def pprof_raw(path) -> str:
    result = subprocess.run(["go", "tool", "pprof", "-raw", str(path)], capture_output=True, text=True, check=True)
    return result.stdout


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_latency_freeze_is_captured_while_it_happens(sidecar_factory, app_factory, protocol):
    sidecar = sidecar_factory(LATENCY_RULE)
    app = app_factory(protocol, sidecar.grpc if protocol == "grpc" else sidecar.http)
    time.sleep(3)  # a busy, healthy baseline
    freeze_start_ns, freeze_end_ns = app.freeze(4)

    event = sidecar.wait_for_event(lambda e: e["rule"] == "feed-latency" and e["outcome"] == "captured", timeout=30)
    assert event["target_pid"] == app.pid, "the target came from the series' process.pid"
    assert event["series"]["metric"] == "db.client.operation.duration"
    breach_start = rfc3339_seconds(event["breach_start"])
    freeze_start = freeze_start_ns / 1e9
    # Dated to the freeze, not to when the slow requests finally completed.
    assert freeze_start - 1.0 <= breach_start <= freeze_start + 1.5, (event, freeze_start)
    # The flight recorder covers from before the breach began.
    window_start = rfc3339_seconds(event["window"]["start"])
    assert window_start <= breach_start, event

    profile = os.path.join(event["directory"], "profile.pb.gz")
    raw = pprof_raw(profile)
    assert "futex_wait" in raw, "the blocked request threads' kernel stacks are in the profile"
    summary = subprocess.run([str(BINARY), "report", profile], capture_output=True, text=True, check=True).stdout
    assert "futex" in summary
    for name in ("stacks.folded", "flamegraph.svg"):
        assert os.path.getsize(os.path.join(event["directory"], name)) > 0


def test_silence_from_a_stopped_app_triggers_a_capture(sidecar_factory, app_factory):
    sidecar = sidecar_factory(SILENCE_RULE)
    app = app_factory("http", sidecar.http)
    time.sleep(2)
    os.kill(app.pid, signal.SIGSTOP)
    try:
        event = sidecar.wait_for_event(lambda e: e["rule"] == "feed-silent" and e["outcome"] == "captured", timeout=20)
    finally:
        os.kill(app.pid, signal.SIGCONT)
    assert event["target_pid"] == app.pid
    raw = pprof_raw(os.path.join(event["directory"], "profile.pb.gz"))
    assert "do_signal_stop" in raw, "stopped threads show where SIGSTOP parked them"


def test_on_trigger_mode_attaches_when_fired_and_one_capture_runs_per_target(sidecar_factory, app_factory):
    # Two rules see the same freeze: the first firing captures, the second
    # finds the target busy and is recorded, not stacked.
    second_rule = LATENCY_RULE.replace('name = "feed-latency"', 'name = "feed-latency-again"')
    sidecar = sidecar_factory(LATENCY_RULE + second_rule, mode="on-trigger")
    app = app_factory("grpc", sidecar.grpc)
    time.sleep(3)
    app.freeze(4)

    captured = sidecar.wait_for_event(lambda e: e["outcome"] == "captured", timeout=30)
    coalesced = sidecar.wait_for_event(lambda e: e["outcome"] == "coalesced", timeout=10)
    assert {captured["rule"], coalesced["rule"]} == {"feed-latency", "feed-latency-again"}
    assert coalesced["target_pid"] == app.pid
    # Attached only when fired: the window starts at the firing, not before,
    # yet the request threads already blocked then are in it (task iterator).
    assert rfc3339_seconds(captured["window"]["start"]) >= rfc3339_seconds(captured["fired_at"]) - 0.1
    raw = pprof_raw(os.path.join(captured["directory"], "profile.pb.gz"))
    assert "futex_wait" in raw


def test_sigterm_finishes_the_capture_in_flight(sidecar_factory, app_factory):
    rule = LATENCY_RULE.replace('capture = "3s"', 'capture = "60s"')
    sidecar = sidecar_factory(rule)
    app = app_factory("http", sidecar.http)
    time.sleep(3)
    freeze = threading.Thread(target=app.freeze, args=(3,))
    freeze.start()
    deadline = time.monotonic() + 20
    while "rule fired" not in sidecar.log_text():
        assert time.monotonic() < deadline, sidecar.log_text()
        time.sleep(0.1)
    time.sleep(1)
    sidecar.stop()
    freeze.join()
    assert sidecar.proc.returncode == 0, sidecar.log_text()
    event = next(e for e in sidecar.events() if e["outcome"] == "captured")
    window = rfc3339_seconds(event["window"]["end"]) - rfc3339_seconds(event["window"]["start"])
    assert window < 30, "cut short at shutdown, not run to its 60 s"
    assert os.path.getsize(os.path.join(event["directory"], "profile.pb.gz")) > 0
