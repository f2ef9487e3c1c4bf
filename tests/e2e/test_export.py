"""OTLP profiles export end to end: a real OpenTelemetry SDK app freezes, the
sidecar captures it, links the samples to the frozen requests and exports
to a real receiver, which decodes the bytes with the official
opentelemetry-proto classes. Then the faults: a backend that is down, a
sidecar killed with profiles spooled, throttling, refusal and slowness."""

import collections
import gzip
import os
import re
import socket
import subprocess
import time

import pytest
from opentelemetry.proto.profiles.v1development import profiles_pb2

from conftest import BINARY
from conftest import LATENCY_RULE as BASE_LATENCY_RULE
from otlp_receiver import GrpcAnswer, GrpcReceiver, HttpAnswer, HttpReceiver, reserve_port

import grpc

# Exports come one after another here: a short cooldown lets them.
LATENCY_RULE = BASE_LATENCY_RULE.replace('cooldown = "1m"', 'cooldown = "1s"')

DOWNWARD_API = {
    "K8S_POD_NAME": "feed-7d9f",
    "K8S_NAMESPACE_NAME": "shop",
    "K8S_CONTAINER_NAME": "freezeframe",
    "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=e2e,team=storage",
}


def export_config(port: int, protocol: str = "grpc", grace: str = "2s", extra: str = "") -> str:
    return f"""otlp_endpoint = "http://127.0.0.1:{port}"
protocol = "{protocol}"
link_grace = "{grace}"
{extra}"""


def any_value(value):
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def profiles_of(received):
    return [
        (resource, profile)
        for resource in received.request.resource_profiles
        for scope in resource.scope_profiles
        for profile in scope.profiles
    ]


def check_dictionary(dictionary):
    """Every table starts with its zero value and holds no duplicates."""
    assert dictionary.string_table[0] == ""
    assert len(set(dictionary.string_table)) == len(dictionary.string_table)
    tables = {
        "mapping_table": profiles_pb2.Mapping,
        "location_table": profiles_pb2.Location,
        "function_table": profiles_pb2.Function,
        "link_table": profiles_pb2.Link,
        "attribute_table": profiles_pb2.KeyValueAndUnit,
        "stack_table": profiles_pb2.Stack,
    }
    for name, message in tables.items():
        table = getattr(dictionary, name)
        assert len(table) >= 1, name
        assert table[0] == message(), f"{name}[0] is not the zero value"
        encoded = [entry.SerializeToString(deterministic=True) for entry in table]
        assert len(set(encoded)) == len(encoded), f"{name} has duplicates"


def check_indices(dictionary, profile):
    def in_range(index, table):
        return 0 <= index < len(table)

    strings = dictionary.string_table
    for sample in profile.samples:
        assert in_range(sample.stack_index, dictionary.stack_table)
        assert in_range(sample.link_index, dictionary.link_table)
        assert all(in_range(i, dictionary.attribute_table) and i != 0 for i in sample.attribute_indices)
        assert len(sample.values) == len(sample.timestamps_unix_nano) > 0
        for timestamp in sample.timestamps_unix_nano:
            assert profile.time_unix_nano <= timestamp < profile.time_unix_nano + profile.duration_nano
    for stack in dictionary.stack_table:
        assert all(in_range(i, dictionary.location_table) and i != 0 for i in stack.location_indices)
    for location in dictionary.location_table:
        assert in_range(location.mapping_index, dictionary.mapping_table)
        assert all(in_range(line.function_index, dictionary.function_table) for line in location.lines)
        assert all(in_range(i, dictionary.attribute_table) for i in location.attribute_indices)
    for function in dictionary.function_table:
        assert in_range(function.name_strindex, strings) and in_range(function.filename_strindex, strings)
    for mapping in dictionary.mapping_table:
        assert in_range(mapping.filename_strindex, strings)
    for attribute in dictionary.attribute_table:
        assert in_range(attribute.key_strindex, strings) and in_range(attribute.unit_strindex, strings)


def attributes(dictionary, indices) -> dict:
    return {
        dictionary.string_table[dictionary.attribute_table[i].key_strindex]: any_value(dictionary.attribute_table[i].value)
        for i in indices
    }


def function_names(dictionary, sample) -> list:
    names = []
    for location_index in dictionary.stack_table[sample.stack_index].location_indices:
        location = dictionary.location_table[location_index]
        function = dictionary.function_table[location.lines[-1].function_index]
        names.append(dictionary.string_table[function.name_strindex])
    return names


def pprof_samples(path) -> list:
    """`go tool pprof -raw` samples: (values, location texts leaf first, labels).

    A location's text holds every function it stands for, inlined ones too."""
    raw = subprocess.run(["go", "tool", "pprof", "-raw", str(path)], capture_output=True, text=True, check=True).stdout
    locations = {}
    section = None
    current = None
    samples = []
    for line in raw.splitlines():
        if line in ("Samples:", "Locations", "Mappings"):
            section = line
            continue
        if section == "Locations":
            start = re.match(r"\s+(\d+): 0x[0-9a-f]+ (.*)$", line)
            if start:
                current = start.group(1)
                locations[current] = start.group(2)
            elif current:
                locations[current] += "\n" + line.strip()
        elif section == "Samples:":
            sample = re.match(r"\s+(\d+(?:\s+\d+)*):((?:\s+\d+)*)\s*$", line)
            if sample:
                samples.append([list(map(int, sample.group(1).split())), sample.group(2).split(), {}])
            elif samples:
                for key, value in re.findall(r"(\w+):\[([^\]]*)\]", line):
                    samples[-1][2][key] = value
    assert samples, f"no samples parsed from:\n{raw}"
    return [(values, [locations[l] for l in ids], labels) for values, ids, labels in samples]


def freeze_and_capture(sidecar, app, seconds: float = 4):
    time.sleep(3)  # a busy, healthy baseline
    start, end = app.freeze(seconds)
    event = sidecar.wait_for_event(lambda e: e["rule"] == "feed-latency" and e["outcome"] == "captured", timeout=30)
    return start, end, event


@pytest.mark.parametrize(
    "protocol,app_options",
    [
        ("grpc", ()),
        ("http/protobuf", ()),
        ("grpc", ("--no-thread-ids",)),
        ("grpc", ("--no-traces",)),
    ],
    ids=["grpc-spans-with-threads", "http-spans-with-threads", "spans-without-threads", "exemplars-only"],
)
def test_the_exported_profile_decodes_and_links_the_frozen_requests(sidecar_factory, app_factory, protocol, app_options):
    receiver = GrpcReceiver() if protocol == "grpc" else HttpReceiver()
    try:
        compression = 'compression = "gzip"' if protocol != "grpc" else ""
        sidecar = sidecar_factory(LATENCY_RULE, export=export_config(receiver.port, protocol, extra=compression), env=DOWNWARD_API)
        app = app_factory("grpc", sidecar.grpc, *app_options)
        freeze_start, freeze_end, event = freeze_and_capture(sidecar, app)
        received = receiver.wait_for(1, timeout=30)[0]
    finally:
        receiver.stop()
    if protocol != "grpc":
        assert received.headers.get("content-encoding") == "gzip"

    request = received.request
    dictionary = request.dictionary
    check_dictionary(dictionary)
    [(resource, profile)] = profiles_of(received)
    check_indices(dictionary, profile)

    # The shape Pyroscope reads as off-CPU.
    strings = dictionary.string_table
    assert (strings[profile.sample_type.type_strindex], strings[profile.sample_type.unit_strindex]) == ("off_cpu", "nanoseconds")
    assert not profile.HasField("period_type") and profile.period == 0
    assert len(profile.profile_id) == 16 and any(profile.profile_id)
    assert profile.original_payload_format == "pprof"
    assert gzip.decompress(profile.original_payload)
    capture = attributes(dictionary, profile.attribute_indices)
    assert capture["freezeframe.rule.name"] == "feed-latency"
    assert capture["freezeframe.capture.id"] == event["capture_id"]
    assert capture["freezeframe.breach.start"] == event["breach_start"]

    # Whose profile: the app's own resource first, then the pod's.
    resource_attributes = {kv.key: any_value(kv.value) for kv in resource.resource.attributes}
    assert resource_attributes["service.name"] == "feed"
    assert resource_attributes["process.pid"] == app.pid
    assert resource_attributes["process.executable.name"].startswith("python")
    assert resource_attributes["host.name"] == socket.gethostname()
    assert resource_attributes["k8s.pod.name"] == "feed-7d9f"
    assert resource_attributes["k8s.namespace.name"] == "shop"
    assert resource_attributes["k8s.container.name"] == "freezeframe"
    assert resource_attributes["deployment.environment"] == "e2e"
    assert resource_attributes["team"] == "storage"

    # The request threads, blocked on the lock the freeze held.
    futex_samples = [s for s in profile.samples if any("futex" in name for name in function_names(dictionary, s))]
    assert futex_samples, "the blocked request threads are in the profile"
    # Series labels are few and take few values; thread ids stay in the files.
    for sample in profile.samples:
        sample_attributes = attributes(dictionary, sample.attribute_indices)
        assert set(sample_attributes) <= {"thread.name", "thread.state", "lock.kind"}, sample_attributes
        assert sample_attributes["thread.state"] in {"S", "D", "R", "other"}
    assert any(
        attributes(dictionary, m.attribute_indices).get("process.executable.build_id.gnu") for m in dictionary.mapping_table
    ), "mappings carry build ids"

    # Links lead to the requests the freeze held up, and only to those.
    frozen = app.requests(freeze_start, freeze_end)
    assert frozen
    linked = [s for s in profile.samples if s.link_index]
    assert linked, "some blocked time is linked to the requests it froze"
    link_traces = {dictionary.link_table[s.link_index].trace_id.hex() for s in linked}
    assert link_traces <= frozen, (link_traces - frozen, frozen)

    # Per thread, from the pprof on disk, which keeps the thread ids. The
    # SDK's own threads wait on futexes all along; the request threads
    # waited on the frozen lock.
    on_disk = pprof_samples(os.path.join(event["directory"], "profile.pb.gz"))
    request_threads = app.threads()
    thread_of = lambda sample: int(sample[2]["thread_id"])  # noqa: E731
    waiting = [s for s in on_disk if any("futex" in name for name in s[1]) and thread_of(s) in request_threads]
    # Each nanosecond is counted once: no thread was off the CPU for longer
    # than the profile lasts (a wait counted both before and after it
    # learnt its waker would be).
    off_cpu = collections.Counter()
    for sample in on_disk:
        off_cpu[thread_of(sample)] += sample[0][1]
    assert max(off_cpu.values()) <= 1.01 * profile.duration_nano, (off_cpu, profile.duration_nano)
    linked_ns = sum(s[0][1] for s in waiting if "span_id" in s[2])
    waiting_ns = sum(s[0][1] for s in waiting)
    assert waiting_ns > 0 and linked_ns >= 0.5 * waiting_ns, "most of the request threads' waiting is linked"
    if "--no-thread-ids" not in app_options and "--no-traces" not in app_options:
        # A span names its thread: only that thread's samples link to it.
        assert {thread_of(s) for s in on_disk if "span_id" in s[2]} <= request_threads
    assert sum(sum(s.values) for s in profile.samples) == sum(s[0][1] for s in on_disk), "the same time, over OTLP and on disk"

    # The pprof on disk carries the same links, as Pyroscope's labels.
    raw = subprocess.run(
        ["go", "tool", "pprof", "-raw", os.path.join(event["directory"], "profile.pb.gz")],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "trace_id" in raw and "span_id" in raw
    assert any(trace_id in raw for trace_id in link_traces)
    assert sidecar.wait_for_metric("freezeframe_export_total", 1, timeout=10, outcome="delivered") == 1


def test_a_backend_that_is_down_gets_every_profile_exactly_once_when_it_is_back(sidecar_factory, app_factory):
    port = reserve_port()
    sidecar = sidecar_factory(LATENCY_RULE, export=export_config(port, grace="1s"))
    app = app_factory("grpc", sidecar.grpc)
    time.sleep(3)
    for _ in range(2):
        app.freeze(3)
        time.sleep(3)
    assert sidecar.wait_for_metric("freezeframe_export_total", 2, timeout=40, outcome="queued") == 2
    assert sidecar.metric("freezeframe_spool_files") == 2
    assert sidecar.metric("freezeframe_export_total", outcome="retried") >= 1
    assert len(list((sidecar.directory / "spool").glob("*.pb"))) == 2

    receiver = GrpcReceiver(port=port)
    try:
        receiver.wait_for(2, timeout=60)
        time.sleep(3)  # room for a duplicate to show up, if there were one
        ids = receiver.profile_ids()
    finally:
        receiver.stop()
    assert len(ids) == 2 and len(set(ids)) == 2, ids
    assert sidecar.metric("freezeframe_export_total", outcome="delivered") == 2
    assert sidecar.metric("freezeframe_spool_files") == 0
    assert not list((sidecar.directory / "spool").glob("*.pb"))


def test_profiles_spooled_when_the_sidecar_is_killed_are_delivered_after_a_restart(sidecar_factory, app_factory):
    port = reserve_port()
    export = export_config(port, grace="1s")
    sidecar = sidecar_factory(LATENCY_RULE, export=export)
    app = app_factory("grpc", sidecar.grpc)
    freeze_and_capture(sidecar, app, 3)
    spool = sidecar.directory / "spool"
    deadline = time.monotonic() + 20
    while not list(spool.glob("*.pb")):
        assert time.monotonic() < deadline, sidecar.log_text()
        time.sleep(0.2)
    [spooled] = spool.glob("*.pb")
    spooled_request = spooled.read_bytes()
    sidecar.kill()

    receiver = GrpcReceiver(port=port)
    try:
        restarted = sidecar_factory("", export=export)
        [received] = receiver.wait_for(1, timeout=30)
        time.sleep(2)
        assert len(receiver.received) == 1
    finally:
        receiver.stop()
    assert received.raw == spooled_request, "the spooled request, byte for byte"
    assert "delivering profiles spooled by an earlier run" in restarted.log_text()
    deadline = time.monotonic() + 10
    while list(spool.glob("*.pb")):
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_throttling_with_retry_after_is_honoured(sidecar_factory, app_factory):
    receiver = HttpReceiver(answers=[HttpAnswer(503, {"Retry-After": "3"}), None])
    try:
        sidecar = sidecar_factory(LATENCY_RULE, export=export_config(receiver.port, "http/protobuf", grace="1s"))
        app = app_factory("grpc", sidecar.grpc)
        freeze_and_capture(sidecar, app, 3)
        attempts = receiver.wait_for(2, timeout=30, accepted=False)
        time.sleep(1)
    finally:
        receiver.stop()
    assert len(receiver.received) == 2
    waited = attempts[1].at - attempts[0].at
    assert 3.0 <= waited < 5.0, f"retried after {waited:.2f}s, asked for 3s"
    assert attempts[1].raw == attempts[0].raw
    assert sidecar.metric("freezeframe_export_total", outcome="retried") == 1
    assert sidecar.metric("freezeframe_export_total", outcome="delivered") == 1


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_a_request_the_backend_refuses_is_not_retried(sidecar_factory, app_factory, protocol):
    if protocol == "grpc":
        receiver = GrpcReceiver(answers=[GrpcAnswer(grpc.StatusCode.INVALID_ARGUMENT, "bad profile")])
    else:
        receiver = HttpReceiver(answers=[HttpAnswer(400)])
    try:
        sidecar = sidecar_factory(LATENCY_RULE, export=export_config(receiver.port, protocol, grace="1s"))
        app = app_factory("grpc", sidecar.grpc)
        freeze_and_capture(sidecar, app, 3)
        receiver.wait_for(1, timeout=30, accepted=False)
        time.sleep(4)
    finally:
        receiver.stop()
    assert len(receiver.received) == 1
    assert sidecar.metric("freezeframe_export_total", outcome="rejected") == 1
    assert sidecar.metric("freezeframe_export_total", outcome="retried") == 0
    assert sidecar.metric("freezeframe_spool_files") == 0
    assert "refused the profile for good" in sidecar.log_text()


def test_a_slow_backend_does_not_stall_captures(sidecar_factory, app_factory):
    receiver = GrpcReceiver(delay=60)
    try:
        sidecar = sidecar_factory(LATENCY_RULE, export=export_config(receiver.port, grace="0s", extra='timeout = "30s"'))
        app = app_factory("grpc", sidecar.grpc)
        _, _, first = freeze_and_capture(sidecar, app, 3)
        receiver.wait_for(1, timeout=20, accepted=False)
        # The backend now sits on the first export; the next freeze must be
        # captured as promptly as the first.
        time.sleep(2)
        freeze_start, _ = app.freeze(3)
        second = sidecar.wait_for_event(
            lambda e: e["outcome"] == "captured" and e["capture_id"] != first["capture_id"], timeout=30
        )
        # The second export is queued behind the first, which the backend
        # still sits on.
        assert sidecar.wait_for_metric("freezeframe_export_total", 2, timeout=10, outcome="queued") == 2
        assert sidecar.metric("freezeframe_spool_files") == 2
    finally:
        receiver.stop()
    from datetime import datetime, timezone

    written = datetime.strptime(second["window"]["end"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
    assert written - freeze_start / 1e9 < 15, second


def test_a_saved_capture_can_be_sent_again(sidecar_factory, app_factory, tmp_path):
    sidecar = sidecar_factory(LATENCY_RULE)
    app = app_factory("grpc", sidecar.grpc)
    _, _, event = freeze_and_capture(sidecar, app, 3)
    profile = os.path.join(event["directory"], "profile.pb.gz")
    receiver = HttpReceiver(answers=[HttpAnswer(503, {"Retry-After": "1"}), None])
    try:
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FREEZEFRAME_"))}
        environment.update(
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}",
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
            OTEL_EXPORTER_OTLP_HEADERS="x-scope-orgid=tenant-1",
        )
        result = subprocess.run([str(BINARY), "export", profile], capture_output=True, text=True, env=environment, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "delivered" in result.stdout
    finally:
        receiver.stop()
    assert len(receiver.received) == 2
    sent = receiver.accepted()[0]
    assert sent.headers.get("x-scope-orgid") == "tenant-1"
    [(resource, profile_message)] = profiles_of(sent)
    resource_attributes = {kv.key: any_value(kv.value) for kv in resource.resource.attributes}
    assert resource_attributes["service.name"] == "feed", "the series' resource, from captures.jsonl"
    assert attributes(sent.request.dictionary, profile_message.attribute_indices)["freezeframe.rule.name"] == "feed-latency"
    check_dictionary(sent.request.dictionary)
    check_indices(sent.request.dictionary, profile_message)
