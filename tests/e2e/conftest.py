"""Shared by the end-to-end tests: the real freezeframe binary and the
Python OpenTelemetry app, on loopback ports picked for each test."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("FREEZEFRAME_BINARY", ROOT / "target/debug/freezeframe"))
APP = Path(__file__).with_name("latency_app.py")


# The rules the end-to-end tests run the sidecar with: the seed's latency
# rule at the test app's scale (a 4 s freeze, exports every 500 ms), and a
# silence rule.
LATENCY_RULE = """
[[trigger]]
name = "feed-latency"
metric = "db.client.operation.duration"
attributes = { "db.system" = "feeddb" }
resource = { "service.name" = "feed" }
statistic = "p99"
above = "200ms"
for = "1s"
capture = "3s"
cooldown = "1m"
"""

SILENCE_RULE = """
[[trigger]]
name = "feed-silent"
silence = "2s"
capture = "2s"
cooldown = "1m"
"""


RUNNING = re.compile(
    r"freezeframe is running grpc=127\.0\.0\.1:(\d+) http=127\.0\.0\.1:(\d+) telemetry=127\.0\.0\.1:(\d+)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True, scope="session")
def require_root():
    # These tests load BPF for real: without root they must fail, not skip.
    assert os.geteuid() == 0, "the end-to-end tests load BPF programs: run them as root"
    assert BINARY.exists(), f"{BINARY} is missing: cargo build first"


class Sidecar:
    """`freezeframe run` with a config written for the test. `export` adds
    lines to its [export] section, `forward` makes a [forward] section of
    its lines; `env` adds environment variables; `binary` runs another
    build. Another Sidecar on the same `tmp_path` shares the export
    directory (and spool)."""

    def __init__(
        self, tmp_path: Path, rules: str, mode: str = "armed", export: str = "", env=None, forward: str = "", binary=None
    ):
        self.directory = tmp_path / "captures"
        runs = len(list(tmp_path.glob("freezeframe*.toml")))
        self.config = tmp_path / f"freezeframe{runs or ''}.toml"
        self.config.write_text(
            f"""
[receiver]
grpc = "127.0.0.1:0"
http = "127.0.0.1:0"

[recorder]
mode = "{mode}"
history = "30s"

[telemetry]
listen = "127.0.0.1:0"

[export]
directory = "{self.directory}"
{export}
{"[forward]" if forward else ""}
{forward}
{rules}
"""
        )
        self.log = open(tmp_path / f"freezeframe{runs or ''}.log", "w")
        environment = {key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "FREEZEFRAME_"))}
        environment.update(env or {})
        self.proc = subprocess.Popen(
            [str(binary or BINARY), "run", "--config", str(self.config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=environment,
        )
        self.grpc, self.http, self.telemetry = self.wait_running()

    def wait_running(self, timeout: float = 30):
        """The ports the kernel gave the receivers and /metrics, from the
        start-up line. (A port picked by the test and bound later by the
        sidecar could be taken in between, by any process's connection.)"""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = RUNNING.search(self.log_text()) or self._running_in_json()
            if running:
                return tuple(int(port) for port in running.groups())
            assert self.proc.poll() is None, f"freezeframe exited: {self.log_text()}"
            time.sleep(0.05)
        raise AssertionError(f"freezeframe did not start in {timeout}s: {self.log_text()}")

    def _running_in_json(self):
        """The start-up line of a sidecar that logs JSON, in text form."""
        for line in self.log_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            fields = event.get("fields", {}) if isinstance(event, dict) else {}
            if fields.get("message") == "freezeframe is running":
                return RUNNING.search(
                    f"freezeframe is running grpc={fields['grpc']} http={fields['http']} telemetry={fields['telemetry']}"
                )
        return None

    def wait_listening(self, port: int, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"freezeframe exited: {self.log_text()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"freezeframe did not listen on {port}: {self.log_text()}")

    def log_text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text()

    def events(self):
        path = self.directory / "captures.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait_for_event(self, predicate, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if predicate(event):
                    return event
            assert self.proc.poll() is None, f"freezeframe exited: {self.log_text()}"
            time.sleep(0.1)
        raise AssertionError(f"no matching capture event in {timeout}s: {self.events()}\n{self.log_text()}")

    def metric(self, name: str, **labels) -> float:
        """The value of one self-metric series, 0 if it is not there yet."""
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.telemetry}/metrics", timeout=5).read().decode()
        wanted = [f'{key}="{value}"' for key, value in labels.items()]
        for line in text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {") and all(label in line for label in wanted):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def wait_for_metric(self, name: str, at_least: float, timeout: float, **labels) -> float:
        """The series' value once it reaches `at_least`. A capture's event is
        written before its export is queued, sent and counted, so a count
        read right after an event can still be one short."""
        deadline = time.monotonic() + timeout
        while (value := self.metric(name, **labels)) < at_least:
            assert self.proc.poll() is None, f"freezeframe exited: {self.log_text()}"
            assert time.monotonic() < deadline, f"{name}{labels} stayed at {value} for {timeout}s:\n{self.log_text()}"
            time.sleep(0.1)
        return value

    def kill(self):
        """SIGKILL: no shutdown, no flush."""
        self.proc.kill()
        self.proc.wait()
        self.log.close()

    def stop(self):
        if self.log.closed:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        self.log.close()


class App:
    """The Python OpenTelemetry app, exporting to the sidecar."""

    def __init__(self, protocol: str, port: int, *options: str):
        endpoint = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, str(APP), "--protocol", protocol, "--endpoint", endpoint, *options],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.pid = int(self.proc.stdout.readline().split()[1])

    def freeze(self, seconds: float):
        """Freezes the request threads; returns (start, end) in wall-clock ns."""
        self.proc.stdin.write(f"freeze {seconds}\n")
        self.proc.stdin.flush()
        words = self.proc.stdout.readline().split()
        assert words[0] == "frozen", words
        return int(words[1]), int(words[2])

    def threads(self) -> set:
        """OS thread ids of the request threads."""
        self.proc.stdin.write("threads\n")
        self.proc.stdin.flush()
        words = self.proc.stdout.readline().split()
        assert words[0] == "threads", words
        return {int(word) for word in words[1:]}

    def shutdown(self):
        """Shuts the SDK down: its last exports are sent and no more follow."""
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        words = self.proc.stdout.readline().split()
        assert words == ["stopped"], words

    def requests(self, start_ns: int, end_ns: int) -> set:
        """Hex trace ids of the finished requests that overlapped the interval."""
        self.proc.stdin.write(f"requests {start_ns} {end_ns}\n")
        self.proc.stdin.flush()
        words = self.proc.stdout.readline().split()
        assert words[0] == "requests", words
        return set(words[1:])

    def stop(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def sidecar_factory(tmp_path):
    started = []

    def start(rules: str, mode: str = "armed", export: str = "", env=None, forward: str = "", binary=None) -> Sidecar:
        sidecar = Sidecar(tmp_path, rules, mode, export, env, forward, binary)
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        sidecar.stop()


@pytest.fixture
def app_factory():
    started = []

    def start(protocol: str, port: int, *options: str) -> App:
        app = App(protocol, port, *options)
        started.append(app)
        return app

    yield start
    for app in started:
        app.stop()
