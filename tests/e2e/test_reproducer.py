"""The seed incident, end to end: the feeddb reproducer (a Rust service
instrumented with the OpenTelemetry SDK) grows a HashMap past a resize
under mlockall, its request threads stall on the process's mmap_lock, and
the real sidecar must catch it on its own and name the lock, the resizing
thread and the allocation. With --preallocate nothing fires. Then
`freezeframe demo`, the README's first command, runs as a user would run it.
"""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2

from conftest import ROOT
from pyroscope_rules import assert_pyroscope_accepts
from test_export import attributes, check_dictionary, check_indices, function_names, pprof_samples

RELEASE = ROOT / "target/release"
FEEDDB = RELEASE / "feeddb"

# The demo's rule: a sub-second stall is over before a `for` of seconds
# could pass, so any export interval whose p99 passes 100 ms fires.
REPRODUCER_RULE = """
[[trigger]]
name = "feed-db-latency"
metric = "db.client.operation.duration"
attributes = { "db.system" = "feeddb" }
statistic = "p99"
above = "100ms"
for = "0s"
capture = "4s"
cooldown = "1m"
"""

# Just past hashbrown's capacity for 2^24 buckets (14,680,064): the last
# insert doubles the table to 2^25 buckets, 544 MiB of u64 -> u64.
SMALL_ENTRIES = 14_700_000


class Reproducer:
    def __init__(self, tmp_path: Path, sidecar, *options: str):
        assert FEEDDB.exists(), f"{FEEDDB} is missing: cargo build --release first"
        self.report_path = tmp_path / f"feeddb{len(list(tmp_path.glob('feeddb*.json')))}.json"
        environment = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
        environment.update(
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{sidecar.grpc}",
            OTEL_METRIC_EXPORT_INTERVAL="250",
        )
        self.output = open(tmp_path / "feeddb.log", "a")
        self.proc = subprocess.Popen(
            [str(FEEDDB), "--entries", str(SMALL_ENTRIES), "--report", str(self.report_path), *options],
            stdout=self.output, stderr=subprocess.STDOUT, env=environment,
        )

    def stop(self):
        """SIGTERM: it writes its report and flushes its telemetry."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=60) == 0, Path(self.output.name).read_text()
        self.output.close()
        return json.loads(self.report_path.read_text())

    def wait(self, timeout: float):
        assert self.proc.wait(timeout=timeout) == 0, Path(self.output.name).read_text()
        self.output.close()
        return json.loads(self.report_path.read_text())


def test_the_resize_freeze_is_caught_and_attributed(sidecar_factory, tmp_path):
    sidecar = sidecar_factory(REPRODUCER_RULE)
    # Serves until stopped: the capture is symbolized while it lives.
    feeddb = Reproducer(tmp_path, sidecar, "--cooldown", "30s")
    missed = None
    try:
        event = sidecar.wait_for_event(
            lambda e: e["rule"] == "feed-db-latency" and e["outcome"] == "captured"
            and (Path(e["directory"]) / "profiles.otlp.pb").exists(),
            timeout=90,
        )
    except AssertionError as error:
        missed = error
    finally:
        report = feeddb.stop()
    # What feeddb measured tells a stall too short for the rule from a
    # stall the pipeline lost.
    assert missed is None, f"{missed}\nfeeddb measured: {report['requests']}, longest: {report['longest_stall']}"
    assert event["target_pid"] == report["pid"], "the target came from the series' process.pid"
    resize = report["resizes"][-1]
    assert resize["to_buckets"] == 2 * resize["from_buckets"] == 2**25, resize
    writer = report["writer_tid"]

    # The official OTLP classes read the off-CPU profile: request threads
    # waited on mmap_lock, and the holder named is the resizing writer.
    request = profiles_service_pb2.ExportProfilesServiceRequest()
    request.ParseFromString((Path(event["directory"]) / "profiles.otlp.pb").read_bytes())
    dictionary = request.dictionary
    check_dictionary(dictionary)
    profiles = [p for r in request.resource_profiles for s in r.scope_profiles for p in s.profiles]
    kinds = {dictionary.string_table[p.sample_type.type_strindex]: p for p in profiles}
    assert set(kinds) == {"off_cpu", "alloc_space"}, kinds.keys()
    for profile in profiles:
        check_indices(dictionary, profile)
    # Pyroscope would take both profiles of the request, with few series.
    converted = assert_pyroscope_accepts(request, time.time_ns())
    assert {profile.profile_type for profile in converted} == {
        "off_cpu:off_cpu:nanoseconds::",
        "address_space:alloc_space:bytes:address_space:bytes",
    }

    # The lock's kind is a series label; who held it, for how long and in
    # which call are frames at the leaf, where a flame graph shows them.
    off_cpu = kinds["off_cpu"]
    waits = []
    for sample in off_cpu.samples:
        labels = attributes(dictionary, sample.attribute_indices)
        assert set(labels) <= {"thread.name", "thread.state", "lock.kind"}, labels
        if labels.get("lock.kind") == "mmap_lock" and labels.get("thread.name", "").startswith("feeddb-req"):
            waits.append((sum(sample.values), labels, function_names(dictionary, sample)))
    assert waits, "no request thread waited on mmap_lock"
    waited_ns = sum(ns for ns, _, _ in waits)
    assert waited_ns >= 100_000_000, f"only {waited_ns} ns on mmap_lock"
    behind_writer = sum(
        ns for ns, _, names in waits
        if any(name.startswith("[waiting for mmap_lock") and re.search(rf"\btid {writer}\b", name) for name in names)
    )
    assert behind_writer * 2 > waited_ns, (writer, [names[:3] for _, _, names in waits])
    # The waits' kernel frames start where the kernel shows a sleeping
    # thread's: in the mmap or munmap that wanted the lock, not in the
    # rwsem's slow path, which the frame naming the lock stands for.
    assert any("vm_mmap_pgoff" in names or "__vm_munmap" in names for _, _, names in waits)
    assert not any(name.startswith("rwsem_down_") for _, _, names in waits for name in names)
    assert any(
        name.startswith("[holder] ") and "reserve_rehash" in name for _, _, names in waits for name in names
    ), [names[:8] for _, _, names in waits]

    # The pprof on disk keeps it all as labels.
    waits_on_disk = [labels for _, _, labels in pprof_samples(Path(event["directory"]) / "profile.pb.gz") if labels.get("lock") == "mmap_lock"]
    assert any(labels.get("lock_holder_tid") == str(writer) for labels in waits_on_disk), waits_on_disk
    assert any("reserve_rehash" in labels.get("lock_holder_stack", "") for labels in waits_on_disk), waits_on_disk

    # The address-space profile (pprof, read by go tool pprof) names the
    # resize and its size: the new table, as the reproducer computed it.
    allocations = pprof_samples(Path(event["directory"]) / "alloc.pb.gz")
    resize_maps = [
        (values, names, labels)
        for values, names, labels in allocations
        if labels.get("syscall") == "mmap" and any("reserve_rehash" in name for name in names)
    ]
    assert resize_maps, allocations
    values, names, labels = max(resize_maps, key=lambda sample: sample[0][1])
    assert labels["thread_id"] == str(writer), labels
    calls, size = values
    assert calls == 1, values
    assert abs(size - resize["table_bytes"]) <= resize["table_bytes"] * 0.10, (size, resize)


def test_with_preallocation_nothing_fires(sidecar_factory, tmp_path):
    sidecar = sidecar_factory(REPRODUCER_RULE)
    report = Reproducer(tmp_path, sidecar, "--preallocate", "--cooldown", "2s").wait(timeout=120)
    time.sleep(3)  # a late firing would show by now
    assert report["preallocated"] and not report["resizes"][1:], report["resizes"]
    assert report["requests"]["over_100ms"] == 0, report["requests"]
    assert sidecar.events() == [], sidecar.events()
    points = sidecar.metric("freezeframe_ingest_points_total", signal="metrics", outcome="accepted")
    assert points > 0, "the metrics did arrive: the rule had its chance"


def test_freezeframe_demo_reproduces_explains_and_shows_the_fix(tmp_path):
    output = tmp_path / "demo"
    result = subprocess.run(
        [str(RELEASE / "freezeframe"), "demo", "--output", str(output)],
        capture_output=True, text=True, timeout=600,
    )
    text = result.stdout
    assert result.returncode == 0, text + result.stderr
    # The explanation: who waited, on what, who held it, doing what, how big.
    assert re.search(r"waiting for the process's mmap_lock", text), text
    assert re.search(r"feeddb-req-\d \(tid \d+\) waited", text), text
    # Where in feeddb they asked for it: the user frames of a wait that a cut
    # may have fallen inside of, while feeddb's memory could not be read.
    asked = text.split("They asked for it", 1)[-1].split(" held it", 1)[0]
    assert "feeddb::requests::respond" in asked, text
    writer = json.loads((output / "feeddb-frozen.json").read_text())["writer_tid"]
    assert f"feeddb-writer (tid {writer}) held it" in text, text
    assert "reserve_rehash" in text, text
    assert re.search(rf"feeddb-writer \(tid {writer}\) moved [\d.]+ [GM]iB in one mmap", text), text
    assert "the rule stayed quiet" in text and "the rule fired" in text, text
    events = [json.loads(line) for line in (output / "captures.jsonl").read_text().splitlines()]
    assert [event["outcome"] for event in events] == ["captured"], events
    for name in ("profile.pb.gz", "alloc.pb.gz", "flamegraph.svg", "profiles.otlp.pb"):
        assert (Path(events[0]["directory"]) / name).stat().st_size > 0, name
