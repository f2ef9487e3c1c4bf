"""Several `freezeframe run` sidecars on one node share one pinned probe.

Each test mounts a bpffs of its own, so that what it pins (and checks is
gone afterwards) is nobody else's. The probe's maps and links are read with
bpftool, the kernel's own view of what is loaded, pinned and attached.
"""

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import LATENCY_RULE
from test_export import pprof_samples

# The seed's rule, with a cooldown short enough to fire again in a test.
RULE = LATENCY_RULE.replace('cooldown = "1m"', 'cooldown = "5s"')

VARIANT = os.environ.get("FREEZEFRAME_VARIANT_BINARY")


def bpftool(*args):
    return json.loads(subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True).stdout)


def probe_maps(probe: Path) -> set:
    """The kernel ids of a probe's pinned maps."""
    return {bpftool("map", "show", "pinned", str(pin))["id"] for pin in probe.glob("map_*")}


def programs_using(maps: set) -> list:
    """Programs loaded anywhere in the kernel that use any of these maps:
    the probe's own, by whichever instance loaded them. (Other BPF users
    on the machine are none of this test's business.)"""
    return [prog for prog in bpftool("prog", "show") if maps & set(prog.get("map_ids", []))]


def attached_switch_hooks(maps: set) -> int:
    """Attached sched_switch programs of a probe: how many run per switch."""
    names = {prog["id"]: prog.get("name", "") for prog in programs_using(maps)}
    return sum(1 for link in bpftool("link", "show") if names.get(link.get("prog_id"), "").startswith("sched_switch"))


@pytest.fixture
def bpffs(tmp_path):
    mount = tmp_path / "bpffs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(mount)], check=True)
    yield mount / "freezeframe"
    subprocess.run(["umount", str(mount)], check=True)


def probes(shared: Path) -> list:
    return sorted(shared.glob("offcpu-*")) if shared.exists() else []


def targets(probe: Path) -> dict:
    """The shared target map: host tgid -> owning instance."""
    entries = bpftool("map", "dump", "pinned", str(probe / "map_targets"))
    return {entry["formatted"]["key"]: entry["formatted"]["value"]["owner"] for entry in entries}


def wait_for(what, predicate, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what}: still not so after {timeout}s"
        time.sleep(0.2)
    return value


class Pod:
    """An app and its own sidecar, as Kubernetes would run them."""

    def __init__(self, sidecar_factory, app_factory, shared: Path, binary=None):
        env = {"FREEZEFRAME_SHARED_PROBE_DIR": str(shared)}
        self.sidecar = sidecar_factory(RULE, env=env, binary=binary)
        self.app = app_factory("grpc", self.sidecar.grpc)
        self.shared = shared

    def restart_sidecar(self, sidecar_factory, app_factory):
        self.app.stop()
        self.__init__(sidecar_factory, app_factory, self.shared)

    def captures(self) -> list:
        """Its own captures: every sidecar of a test writes to one directory."""
        return [
            event
            for event in self.sidecar.events()
            if event["outcome"] == "captured" and event["target_pid"] == self.app.pid
        ]


def freeze_and_check(pods, seconds: float = 4):
    """Freezes every pod's app at once; each sidecar must capture its own
    app's freeze, accurately, and nothing of any other process."""
    before = {id(pod): len(pod.captures()) for pod in pods}
    freezes = {}

    def freeze(pod):
        freezes[id(pod)] = pod.app.freeze(seconds)

    threads = [threading.Thread(target=freeze, args=(pod,)) for pod in pods]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for pod in pods:
        wait_for("a capture", lambda: len(pod.captures()) > before[id(pod)], timeout=30)
        event = pod.captures()[before[id(pod)]]
        assert event["target_pid"] == pod.app.pid, event
        samples = pprof_samples(Path(event["directory"]) / "profile.pb.gz")
        pids = {labels.get("process_id") for _, _, labels in samples}
        assert pids == {str(pod.app.pid)}, f"another process in {pod.app.pid}'s profile: {pids}"
        # The app's main thread holds the lock in one sleep: its nanosleep
        # time is the part of the freeze the capture's window covers.
        start_ns, end_ns = freezes[id(pod)]
        window_start = rfc3339_ns(event["window"]["start"])
        window_end = rfc3339_ns(event["window"]["end"])
        expected = min(end_ns, window_end) - max(start_ns, window_start)
        assert expected > 1e9, (event, start_ns, end_ns)
        slept = sum(
            values[1]
            for values, frames, labels in samples
            if labels.get("thread_id") == str(pod.app.pid) and any("nanosleep" in frame for frame in frames)
        )
        assert abs(slept - expected) <= 0.1 * expected, f"{slept / 1e9:.3f} s captured of {expected / 1e9:.3f} s"


def rfc3339_ns(text: str) -> int:
    from datetime import datetime, timezone

    whole, _, fraction = text.rstrip("Z").partition(".")
    seconds = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    return int(seconds) * 10**9 + int((fraction or "0").ljust(9, "0")[:9])


def test_sidecars_share_one_probe_survive_each_other_and_leave_nothing_behind(bpffs, sidecar_factory, app_factory):
    assert VARIANT and Path(VARIANT).exists(), (
        "FREEZEFRAME_VARIANT_BINARY must name a build with FREEZEFRAME_BPF_VARIANT set (scripts/test makes one)"
    )
    pods = [Pod(sidecar_factory, app_factory, bpffs) for _ in range(3)]

    # One probe: one set of maps, one copy of each program attached.
    [probe] = wait_for("one probe", lambda: probes(bpffs))
    maps = probe_maps(probe)
    owners = wait_for("three targets", lambda: len(t := targets(probe)) == 3 and t)
    assert set(owners) == {pod.app.pid for pod in pods}
    assert len(set(owners.values())) == 3, f"each target has its own owner: {owners}"
    assert len(list((probe / "instances").iterdir())) == 3
    assert attached_switch_hooks(maps) == 1
    time.sleep(3)  # a busy, healthy baseline
    freeze_and_check(pods)

    # SIGKILL one: the others clear its target up and keep capturing.
    killed = pods[0]
    killed.sidecar.kill()
    wait_for("the killed instance's target to go", lambda: killed.app.pid not in targets(probe))
    assert set(targets(probe)) == {pods[1].app.pid, pods[2].app.pid}
    assert len(list((probe / "instances").iterdir())) == 2
    freeze_and_check(pods[1:])

    # Restarted, it joins the same probe again.
    killed.restart_sidecar(sidecar_factory, app_factory)
    wait_for("the restarted instance's target", lambda: killed.app.pid in targets(probe))
    assert probes(bpffs) == [probe]
    assert attached_switch_hooks(maps) == 1
    time.sleep(3)
    freeze_and_check([killed])

    # Another BPF object version runs beside them, on a probe of its own.
    other = Pod(sidecar_factory, app_factory, bpffs, binary=VARIANT)
    [theirs] = wait_for("a second probe", lambda: [p for p in probes(bpffs) if p != probe])
    wait_for("the other version's target", lambda: other.app.pid in targets(theirs))
    their_maps = probe_maps(theirs)
    assert not maps & their_maps
    assert attached_switch_hooks(their_maps) == 1
    assert other.app.pid not in targets(probe)
    assert set(targets(theirs)) == {other.app.pid}
    time.sleep(3)
    freeze_and_check([other])
    other.sidecar.stop()
    assert probes(bpffs) == [probe], "the other version's probe left with its last instance"

    # The last one out leaves nothing pinned, loaded or attached.
    for pod in pods:
        pod.sidecar.stop()
    assert probes(bpffs) == [], list(bpffs.rglob("*")) if bpffs.exists() else []
    assert not programs_using(maps | their_maps), programs_using(maps | their_maps)
    assert attached_switch_hooks(maps | their_maps) == 0


def test_a_sidecar_without_bpffs_runs_a_private_probe_and_says_so_once(tmp_path, sidecar_factory, app_factory):
    not_bpffs = tmp_path / "not-bpffs"
    not_bpffs.mkdir()
    sidecar = sidecar_factory(RULE, mode="on-trigger", env={"FREEZEFRAME_SHARED_PROBE_DIR": str(not_bpffs)})
    app = app_factory("grpc", sidecar.grpc)
    time.sleep(3)
    # Two captures: each loads a probe, and the refusal is told once.
    for expected in (1, 2):
        app.freeze(3)
        wait_for("a capture", lambda: len([e for e in sidecar.events() if e["outcome"] == "captured"]) >= expected, 40)
        time.sleep(6)  # past the cooldown
    assert sidecar.log_text().count("running a private BPF probe") == 1, sidecar.log_text()
    assert "is not on a BPF file system" in sidecar.log_text()
    assert list(not_bpffs.iterdir()) == [], "nothing was made there"
