#!/usr/bin/env python3
"""What `freezeframe run` costs, measured:

1. the armed flight recorder's overhead on a light request loop and on the
   ping-pong context-switch storm, interleaved round by round with no
   tracer (medians), plus the sidecar's own CPU use;
2. trigger-to-attached latency in on-trigger mode (the recorder's own
   measurement, logged per capture), and the pre-roll an armed capture has
   before its breach began;
3. the sidecar's resident memory when idle and armed.

Run as root after `cargo build --release`:  sudo bench/sidecar.py
"""

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FREEZEFRAME = ROOT / "target/release/freezeframe"
TICKS = os.sysconf("SC_CLK_TCK")


def build(name: str, out_dir: Path) -> Path:
    binary = out_dir / name
    subprocess.run(["rustc", "--edition", "2021", "-O", "-C", "force-frame-pointers=yes",
                    str(ROOT / f"bench/{name}.rs"), "-o", str(binary)], check=True)
    return binary


class Workload:
    def __init__(self, binary: Path):
        self.proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = int(self.proc.stdout.readline().split()[1])

    def run(self, argument) -> list:
        self.proc.stdin.write(f"run {argument}\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().split()

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Sidecar:
    def __init__(self, work: Path, mode: str, pid=None, rules: str = ""):
        self.directory = work / f"captures-{time.monotonic_ns()}"
        config = work / "bench.toml"
        target = f"[target]\npid = {pid}\n" if pid else ""
        config.write_text(f"""
[receiver]
grpc = "127.0.0.1:{free_port()}"
http = "127.0.0.1:{free_port()}"
{target}
[recorder]
mode = "{mode}"
history = "30s"
[telemetry]
listen = "127.0.0.1:{free_port()}"
[export]
directory = "{self.directory}"
{rules}
""")
        self.log_path = work / f"sidecar-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([str(FREEZEFRAME), "run", "--config", str(config)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"})
        deadline = time.monotonic() + 30
        while "freezeframe is running" not in self.log_path.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log_path.read_text()
            time.sleep(0.02)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def memory_kib(self):
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        get = lambda key: int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M).group(1))
        return get("VmRSS"), get("VmHWM")

    def events(self):
        path = self.directory / "captures.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.log.close()


def seconds(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def overhead(work: Path, binaries, rounds: int, request_seconds: float, round_trips: int):
    results = {(name, mode): [] for name in ("requests", "pingpong") for mode in ("none", "armed")}
    sidecar_cpu = []
    request_rate = []
    for round_index in range(rounds):
        for name, argument in (("requests", request_seconds), ("pingpong", round_trips)):
            modes = ("none", "armed") if round_index % 2 == 0 else ("armed", "none")
            for mode in modes:
                workload = Workload(binaries[name])
                workload.run(0.2 if name == "requests" else 10_000)  # warm up
                sidecar = Sidecar(work, "armed", workload.pid) if mode == "armed" else None
                cpu_before = sidecar.cpu_seconds() if sidecar else 0
                started = time.monotonic()
                words = workload.run(argument)
                elapsed = time.monotonic() - started
                if name == "requests":
                    request_rate.append(int(words[1]) / elapsed)
                if sidecar:
                    if name == "requests":
                        sidecar_cpu.append((sidecar.cpu_seconds() - cpu_before) / elapsed)
                    sidecar.stop()
                workload.stop()
                results[(name, mode)].append(float(words[-1]))

    print(f"armed flight recorder overhead ({rounds} interleaved rounds, medians)")
    for name, unit in (("requests", "CPU us/request"), ("pingpong", "ns/round trip")):
        base = statistics.median(results[(name, "none")])
        armed = statistics.median(results[(name, "armed")])
        print(f"  {name:9} untraced {base:9.2f}  armed {armed:9.2f} {unit}   ratio {armed / base:.4f}")
    # The probe runs in the traced threads' own context switches, so its cost
    # shows as their extra CPU time: per request, and as a share of a core.
    extra_us = statistics.median(results[("requests", "armed")]) - statistics.median(results[("requests", "none")])
    rate = statistics.median(request_rate)
    print(f"  request loop at {rate:.0f} requests/s: the probe adds {extra_us:.2f} us per request, "
          f"{extra_us * rate / 1e4:.3f} % of one core")
    print(f"  sidecar's own CPU while the request loop ran: {statistics.median(sidecar_cpu) * 100:.3f} % of one core")


class FlappingPort:
    """A TCP port that is open for `period` seconds, then closed as long:
    a probe rule on it breaches, recovers and breaches again."""

    def __init__(self, period: float):
        self.port = free_port()
        self.period = period
        self.running = True
        self.thread = threading.Thread(target=self.flap, daemon=True)
        self.thread.start()

    def flap(self):
        while self.running:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            listener.settimeout(0.05)
            opened = time.monotonic()
            while self.running and time.monotonic() - opened < self.period:
                try:
                    listener.accept()[0].close()
                except OSError:
                    pass
            listener.close()
            time.sleep(self.period)

    def stop(self):
        self.running = False
        self.thread.join()


def attach_latency(work: Path, binaries, captures: int):
    # Each time the port closes, the probe fails: a firing, and a capture.
    port = FlappingPort(period=2.0)
    rules = f"""
[[trigger]]
name = "flapping-port"
probe = "tcp://127.0.0.1:{port.port}"
interval = "200ms"
capture = "1s"
cooldown = "1s"
max_per_hour = 1000
"""
    workload = Workload(binaries["requests"])
    workload.proc.stdin.write("run 3600\n")
    workload.proc.stdin.flush()
    attach_ms, preroll_ms = [], []
    try:
        sidecar = Sidecar(work, "on-trigger", workload.pid, rules)
        deadline = time.monotonic() + captures * 5 + 20
        while len(attach_ms) < captures and time.monotonic() < deadline:
            time.sleep(0.5)
            attach_ms = [float(m) for m in re.findall(r"attach_ms=([\d.]+)", sidecar.log_path.read_text())]
        sidecar.stop()

        sidecar = Sidecar(work, "armed", workload.pid, rules)
        deadline = time.monotonic() + captures * 5 + 20
        while len([e for e in sidecar.events() if e["outcome"] == "captured"]) < captures and time.monotonic() < deadline:
            time.sleep(0.5)
        sidecar.stop()
        for event in sidecar.events():
            if event["outcome"] == "captured":
                preroll_ms.append((seconds(event["breach_start"]) - seconds(event["window"]["start"])) * 1e3)
    finally:
        port.stop()
        workload.stop()
    print(f"on-trigger: firing to probe attached, {len(attach_ms)} captures: "
          f"median {statistics.median(attach_ms):.1f} ms, max {max(attach_ms):.1f} ms")
    print(f"armed: profile starts before the breach by median {statistics.median(preroll_ms):.0f} ms "
          f"(min {min(preroll_ms):.0f}, max {max(preroll_ms):.0f}; {len(preroll_ms)} captures)")


def idle_memory(work: Path, binaries):
    workload = Workload(binaries["requests"])
    workload.proc.stdin.write("run 3600\n")
    workload.proc.stdin.flush()
    try:
        sidecar = Sidecar(work, "armed", workload.pid)
        time.sleep(10)
        rss, hwm = sidecar.memory_kib()
        sidecar.stop()
    finally:
        workload.stop()
    print(f"idle armed sidecar (watching the request loop, 10 s): RSS {rss / 1024:.1f} MiB, peak {hwm / 1024:.1f} MiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--request-seconds", type=float, default=5.0)
    parser.add_argument("--round-trips", type=int, default=200_000)
    parser.add_argument("--captures", type=int, default=8)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("sidecar.py loads BPF programs: run it as root")
    if not FREEZEFRAME.exists():
        sys.exit(f"{FREEZEFRAME} is missing: cargo build --release")
    out_dir = ROOT / "target/bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    binaries = {name: build(name, out_dir) for name in ("requests", "pingpong")}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        overhead(work, binaries, args.rounds, args.request_seconds, args.round_trips)
        attach_latency(work, binaries, args.captures)
        idle_memory(work, binaries)


if __name__ == "__main__":
    main()
