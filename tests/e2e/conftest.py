"""Shared by the end-to-end tests: the real freezeframe binary and the
Python OpenTelemetry app, on loopback ports picked for each test."""

import json
import os
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
    """`freezeframe run` with a config written for the test."""

    def __init__(self, tmp_path: Path, rules: str, mode: str = "armed"):
        self.grpc, self.http, self.telemetry = free_port(), free_port(), free_port()
        self.directory = tmp_path / "captures"
        self.config = tmp_path / "freezeframe.toml"
        self.config.write_text(
            f"""
[receiver]
grpc = "127.0.0.1:{self.grpc}"
http = "127.0.0.1:{self.http}"

[recorder]
mode = "{mode}"
history = "30s"

[telemetry]
listen = "127.0.0.1:{self.telemetry}"

[export]
directory = "{self.directory}"
{rules}
"""
        )
        self.log = open(tmp_path / "freezeframe.log", "w")
        self.proc = subprocess.Popen([str(BINARY), "run", "--config", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_listening(self.http)

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

    def __init__(self, protocol: str, port: int):
        endpoint = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, str(APP), "--protocol", protocol, "--endpoint", endpoint],
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

    def stop(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def sidecar_factory(tmp_path):
    started = []

    def start(rules: str, mode: str = "armed") -> Sidecar:
        sidecar = Sidecar(tmp_path, rules, mode)
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        sidecar.stop()


@pytest.fixture
def app_factory():
    started = []

    def start(protocol: str, port: int) -> App:
        app = App(protocol, port)
        started.append(app)
        return app

    yield start
    for app in started:
        app.stop()
