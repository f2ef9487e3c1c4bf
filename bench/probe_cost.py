#!/usr/bin/env python3
"""What the probe costs, in the kernel's own numbers.

Wall-clock slowdowns of a few per cent are noise on a small VM; the
kernel's BPF statistics (`kernel.bpf_stats_enabled`, then `run_time_ns`
and `run_cnt` per program from `bpftool prog show -j`) are not. This
script reads them for every program a tracer owns, around a measured
stretch of work, and prints:

  1. on the target: BPF ns per round trip of a two-thread pipe storm
     (bench/pingpong.rs) traced by `freezeframe capture` and by
     libbpf-tools' `offcputime -p`, and ns per run of each program;
  2. on a neighbour: freezeframe watches an idle process while another
     process runs the storm and a getppid() loop; BPF ns per round trip
     and per system call of that neighbour, per program;
  3. wall clock, interleaved round by round, medians: the storm untraced,
     under freezeframe and under offcputime; the neighbour's getppid()
     untraced and next to freezeframe;
  4. the armed sidecar's own CPU and RSS, idle and with a busy target;
  5. K armed sidecars (0, 1, 4, 8) on the machine, each watching its own
     idle process, sharing one probe, and 8 with a private probe each: the
     storm and getppid() of a process none of them watches, interleaved,
     medians, in wall clock and in BPF ns, and each sidecar's RSS and CPU;
  6. what a user stack copy costs: a thread sleeps 2 ms at a time, deep
     enough in its stack that every copy is a whole one, traced with
     every block copied and with copies off: rseq_update's ns per run
     with a copy, and with the frame-pointer walk it replaces;
  7. the recorder with long-blocked threads in code without frame
     pointers (bench/blocked.c): P processes of T threads each, blocked for
     seconds at a time (across cuts) and for tens of ms (between cuts),
     each process watched by its own armed sidecar, the sidecars sharing
     one probe, as one sidecar per pod deploys them: the sidecars' CPU
     and the probe's BPF time, with the default unwind threshold and with
     0s (no stack copies), interleaved, medians.

The statistics' own bookkeeping (two clock reads per run, about 20 ns) is
part of every figure. Statistics are switched off again at the end.

Run as root after `cargo build --release`:  bench/probe_cost.py
Compare two builds in one run with --baseline PATH (another freezeframe
binary): every freezeframe figure is then given for both.
"""

import argparse
import contextlib
import ctypes
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FREEZEFRAME = ROOT / "target/release/freezeframe"
OFFCPUTIME = Path("/usr/sbin/offcputime")
STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def build_blocked(out_dir: Path) -> Path:
    """bench/blocked.c, built as distributions build C: no frame pointers."""
    binary = out_dir / "blocked"
    subprocess.run(["gcc", "-O2", "-fomit-frame-pointer", "-g", "-pthread", "-Wall",
                    str(ROOT / "bench/blocked.c"), "-o", str(binary)], check=True)
    return binary


def build_pingpong(out_dir: Path) -> Path:
    binary = out_dir / "pingpong"
    subprocess.run(
        ["rustc", "--edition", "2021", "-O", "-C", "force-frame-pointers=yes",
         str(ROOT / "bench/pingpong.rs"), "-o", str(binary)],
        check=True,
    )
    return binary


class PingPong:
    """bench/pingpong.rs: `run N` round trips, `calls N` getppid() calls, `sleeps N MS KIB`."""

    def __init__(self, binary: Path):
        self.proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = int(self.proc.stdout.readline().split()[1])

    def _ask(self, line: str) -> float:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline().split()[1])

    def run(self, rounds: int) -> float:
        return self._ask(f"run {rounds}")

    def calls(self, count: int) -> float:
        return self._ask(f"calls {count}")

    def sleeps(self, count: int, ms: int, kib: int) -> float:
        return self._ask(f"sleeps {count} {ms} {kib}")

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def program_ids(pid: int) -> set:
    """The ids of the BPF programs a process holds open, directly or through links."""
    ids = set()
    try:
        fdinfos = list(Path(f"/proc/{pid}/fdinfo").iterdir())
    except OSError:
        return ids
    for fdinfo in fdinfos:
        try:
            text = fdinfo.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("prog_id:"):
                ids.add(int(line.split()[1]))
    return ids


def programs_of(*pids: int) -> dict:
    """The BPF programs the processes hold: {id: (name, run_time_ns, run_cnt)}."""
    ids = set().union(*(program_ids(pid) for pid in pids))
    shown = json.loads(subprocess.run(["bpftool", "prog", "show", "-j"], check=True,
                                      capture_output=True, text=True).stdout)
    return {prog["id"]: (prog.get("name", "?"), prog.get("run_time_ns", 0), prog.get("run_cnt", 0))
            for prog in shown if prog["id"] in ids}


def has_bpf_link(pid: int) -> bool:
    try:
        for fdinfo in Path(f"/proc/{pid}/fdinfo").iterdir():
            try:
                if "link_type:" in fdinfo.read_text():
                    return True
            except OSError:
                continue
    except OSError:
        pass
    return False


def joined_shared_probe(shared_probe_dir, pid: int) -> bool:
    """Whether `pid` captures through the node's shared probe: it then holds
    no link of its own, but its instance directory says it is attached."""
    if shared_probe_dir == "off":
        return False
    attached = set(Path(shared_probe_dir).glob("offcpu-*/instances/*/attached"))
    # An instance's directory is held open (flock) by its process.
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if Path(os.readlink(fd)) / "attached" in attached:
                return True
        except OSError:
            continue
    return False


class Tracer:
    """A tracer process on `pid`, started and waited for until attached."""

    def __init__(self, cmd):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.monotonic()
        while not has_bpf_link(self.proc.pid):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited before attaching (status {self.proc.returncode})")
            if time.monotonic() - started > 30:
                raise RuntimeError(f"{cmd[0]} did not attach within 30 s")
            time.sleep(0.001)
        # Attached links may still be coming (the optional tracepoints).
        time.sleep(0.3)

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def freezeframe_capture(binary: Path, pid: int, *extra: str, min_block="1ms"):
    return Tracer([str(binary), "capture", "--pid", str(pid), "--duration", "600s", "--min-block", min_block,
                   *extra])


def offcputime(pid: int):
    return Tracer([str(OFFCPUTIME), "-p", str(pid), "-m", "1000", "600"])


def measured(tracer: Tracer, work):
    """Runs `work()` and returns (its result, {program: (ns, runs)}) for the tracer's programs."""
    before = programs_of(tracer.proc.pid)
    result = work()
    return result, by_name(before, programs_of(tracer.proc.pid))


def by_name(before: dict, after: dict) -> dict:
    """What each program (by name, its instances summed) ran between two
    readings of programs_of(): {name: [ns, runs]}."""
    per_program = {}
    for prog_id, (name, run_ns, runs) in after.items():
        _, run_ns0, runs0 = before.get(prog_id, (name, 0, 0))
        total = per_program.setdefault(name, [0, 0])
        total[0] += run_ns - run_ns0
        total[1] += runs - runs0
    return per_program


def print_programs(title: str, per_program: dict, units: int, unit: str):
    total_ns = sum(ns for ns, _ in per_program.values())
    print(f"  {title}: {total_ns / units:8.1f} BPF ns per {unit}")
    for name, (ns, runs) in sorted(per_program.items(), key=lambda item: -item[1][0]):
        if runs:
            print(f"      {name:18} {ns / runs:8.1f} ns/run  {runs / units:6.2f} runs per {unit}")
    return total_ns / units


def kernel_side(binaries: dict, pingpong: Path, round_trips: int, calls: int):
    print(f"BPF time on the target: a pipe storm of {round_trips} round trips")
    on_target = {}
    for label, start in [*((name, lambda pid, b=b: freezeframe_capture(b, pid)) for name, b in binaries.items()),
                         ("offcputime", offcputime)]:
        storm = PingPong(pingpong)
        storm.run(10_000)
        tracer = start(storm.pid)
        try:
            _, per_program = measured(tracer, lambda: storm.run(round_trips))
        finally:
            tracer.stop()
            storm.stop()
        on_target[label] = print_programs(label, per_program, round_trips, "round trip")
    for label in binaries:
        print(f"  {label} / offcputime: {on_target[label] / on_target['offcputime']:.3f}")

    print(f"BPF time on a neighbour: freezeframe watches an idle process; another runs "
          f"{round_trips} round trips and {calls} getppid() calls")
    for label, binary in binaries.items():
        idle = PingPong(pingpong)
        neighbour = PingPong(pingpong)
        neighbour.run(10_000)
        tracer = freezeframe_capture(binary, idle.pid)
        try:
            _, storm_programs = measured(tracer, lambda: neighbour.run(round_trips))
            _, call_programs = measured(tracer, lambda: neighbour.calls(calls))
        finally:
            tracer.stop()
            idle.stop()
            neighbour.stop()
        print_programs(f"{label}, neighbour storm", storm_programs, round_trips, "round trip")
        print_programs(f"{label}, neighbour getppid()", call_programs, calls, "call")


def stack_copies(binaries: dict, pingpong: Path, sleeps: int, rounds: int):
    """rseq_update runs for every rseq thread of the node on its way back to
    user space, so its ns per run mixes the sleeper's blocks with the rest
    of the machine's runs. What the sleeper's user stack costs is the
    difference of rseq_update's total time from a run where its sleeps are
    not recorded at all (min_block above them), per sleep: the rest of the
    machine adds to every mode alike (interleaved, medians). A private
    probe, so that no other freezeframe's targets run in these programs."""
    print(f"BPF time per user stack copy: {sleeps} sleeps of 2 ms, 64 KiB down the stack, "
          f"{rounds} rounds (medians)")
    settings = {"copied": ("1ms", "1ms"), "walked": ("1ms", "0s"), "unrecorded": ("1s", "0s")}
    for label, binary in binaries.items():
        def measure(mode):
            sleeper = PingPong(pingpong)
            min_block, threshold = settings[mode]
            tracer = freezeframe_capture(binary, sleeper.pid, "--shared-probe-dir", "off",
                                         "--unwind-threshold", threshold, min_block=min_block)
            try:
                _, per_program = measured(tracer, lambda: sleeper.sleeps(sleeps, 2, 64))
            finally:
                tracer.stop()
                sleeper.stop()
            return per_program.get("rseq_update", (0, 0))

        rseq = interleaved(list(settings), rounds, measure)
        for mode, results in rseq.items():
            per_run = statistics.median(ns / runs for ns, runs in results if runs)
            runs = statistics.median(runs for _, runs in results) / sleeps
            line = f"  {label} {mode:10}: rseq_update {per_run:8.1f} ns/run, {runs:5.2f} runs per sleep"
            if mode != "unrecorded":
                extra = statistics.median((ns - idle_ns) / sleeps
                                          for (ns, _), (idle_ns, _) in zip(results, rseq["unrecorded"]))
                what = "a 16 KiB stack copy" if mode == "copied" else "a walk of 70 frame pointers"
                line += f"; {extra:8.1f} ns per sleep more than unrecorded: {what}"
            print(line)


@contextlib.contextmanager
def bpf_stats():
    """The kernel's BPF run-time statistics on, as they were after."""
    was = STATS.read_text().strip()
    STATS.write_text("1")
    try:
        yield
    finally:
        STATS.write_text(was)


@contextlib.contextmanager
def scratch_bpffs():
    """A bpffs mounted for the run: sidecars share a probe in it without
    touching the node's own."""
    bpffs = Path(tempfile.mkdtemp(prefix="ff-bench-bpffs-"))
    subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], check=True)
    try:
        yield bpffs
    finally:
        subprocess.run(["umount", str(bpffs)], check=True)
        bpffs.rmdir()


def interleaved(modes: list, rounds: int, measure) -> dict:
    """`measure(mode)` for every mode, `rounds` times, the order rotating
    each round so that machine noise hits all modes alike."""
    results = {mode: [] for mode in modes}
    for index in range(rounds):
        for mode in modes[index % len(modes):] + modes[:index % len(modes)]:
            results[mode].append(measure(mode))
    return results


def print_medians(title: str, results: dict, unit: str):
    base = statistics.median(results["none"])
    print(title)
    for mode, values in results.items():
        median = statistics.median(values)
        print(f"  {mode:14} {median:8.1f} ns/{unit}  x{median / base:.3f}")


def wall_clock(binaries: dict, pingpong: Path, rounds: int, round_trips: int, calls: int):
    def traced_storm(mode):
        workload = PingPong(pingpong)
        workload.run(10_000)
        tracer = None
        if mode == "offcputime":
            tracer = offcputime(workload.pid)
        elif mode != "none":
            tracer = freezeframe_capture(binaries[mode], workload.pid)
        result = workload.run(round_trips)
        if tracer:
            tracer.stop()
        workload.stop()
        return result

    def neighbour_calls(mode):
        idle = PingPong(pingpong)
        neighbour = PingPong(pingpong)
        neighbour.calls(100_000)
        tracer = None if mode == "none" else freezeframe_capture(binaries[mode], idle.pid)
        result = neighbour.calls(calls)
        if tracer:
            tracer.stop()
        idle.stop()
        neighbour.stop()
        return result

    print_medians(f"wall clock, the storm traced ({rounds} interleaved rounds, medians)",
                  interleaved(["none", *binaries, "offcputime"], rounds, traced_storm), "round trip")
    print_medians(f"wall clock, a neighbour's getppid() ({rounds} interleaved rounds, medians)",
                  interleaved(["none", *binaries], rounds, neighbour_calls), "call")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LIBC = ctypes.CDLL(None, use_errno=True)


def cpu_seconds(pid: int) -> float:
    """CPU time of a process, threads that have exited included, to the ns:
    its CPU-time clock (clock_getcpuclockid). /proc/PID/stat counts in
    clock ticks, which over 20 s is steps of 0.05 % of a core, as large as
    the differences measured here."""
    clock = ctypes.c_int()
    error = LIBC.clock_getcpuclockid(pid, ctypes.byref(clock))
    if error:
        raise OSError(error, f"no CPU clock for process {pid}: {os.strerror(error)}")
    return time.clock_gettime(clock.value)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class ArmedSidecar:
    """`freezeframe run`, armed, watching `pid` (with none, the processes
    that report their `process.pid` over OTLP), with nothing to export."""

    def __init__(self, binary: Path, pid=None, shared_probe_dir="off", unwind_threshold=None, settle=2.0):
        self.directory = tempfile.TemporaryDirectory()
        threshold = f'unwind_threshold = "{unwind_threshold}"' if unwind_threshold else ""
        target = f"[target]\npid = {pid}" if pid else ""
        self.http = free_port()
        config = Path(self.directory.name) / "freezeframe.toml"
        self.log = Path(self.directory.name) / "freezeframe.log"
        config.write_text(f"""
[receiver]
grpc = "127.0.0.1:0"
http = "127.0.0.1:{self.http}"
{target}
[recorder]
mode = "armed"
history = "30s"
shared_probe_dir = "{shared_probe_dir}"
{threshold}
[telemetry]
listen = "127.0.0.1:0"
[export]
directory = "{self.directory.name}/captures"
[[trigger]]
name = "quiet"
silence = "1h"
""")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([str(binary), "run", "--config", str(config)],
                                         stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"})
        started = time.monotonic()
        while not (has_bpf_link(self.proc.pid) or joined_shared_probe(shared_probe_dir, self.proc.pid)):
            if self.proc.poll() is not None or time.monotonic() - started > 30:
                self.proc.kill()
                raise RuntimeError("the sidecar did not attach")
            time.sleep(0.01)
        time.sleep(settle)

    def report_pids(self, pids: list):
        """Sends a gauge from each of `pids`, as their OTLP SDKs would, and
        waits until the sidecar watches them all."""
        deadline = time.monotonic() + 30
        # The probe is attached before the receivers listen.
        while "freezeframe is running" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the sidecar's receivers did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        body = {"resourceMetrics": [{
            "resource": {"attributes": [{"key": "process.pid", "value": {"intValue": str(pid)}}]},
            "scopeMetrics": [{"metrics": [{"name": "bench.up", "gauge": {"dataPoints": [
                {"timeUnixNano": str(time.time_ns()), "asDouble": 1}]}}]}],
        } for pid in pids]}
        request = urllib.request.Request(f"http://127.0.0.1:{self.http}/v1/metrics", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=5):
            pass
        deadline = time.monotonic() + 10
        while self.log.read_text().count("watching a process that reports") < len(pids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sidecar did not watch the reporting processes:\n{self.log.read_text()}")
            time.sleep(0.05)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.directory.cleanup()


def sidecar(binaries: dict, pingpong: Path, seconds: int):
    print(f"the armed sidecar itself, over {seconds} s")
    for label, binary in binaries.items():
        for busy in (False, True):
            app = PingPong(pingpong)
            armed = ArmedSidecar(binary, app.pid)
            try:
                if busy:
                    app.proc.stdin.write(f"run {10**10}\n")
                    app.proc.stdin.flush()
                    time.sleep(1)
                cpu0, wall0 = cpu_seconds(armed.proc.pid), time.monotonic()
                time.sleep(seconds)
                cpu = (cpu_seconds(armed.proc.pid) - cpu0) / (time.monotonic() - wall0)
                print(f"  {label:14} {'busy' if busy else 'idle'} target: "
                      f"{cpu * 100:5.2f} % of a core, RSS {rss_mib(armed.proc.pid):6.1f} MiB")
            finally:
                armed.stop()
                app.stop()


def node_scale(binary: Path, pingpong: Path, rounds: int, round_trips: int, calls: int, counts: list):
    """K armed sidecars on the machine, each watching an idle process of its
    own, and a process none of them watches running the storm and the
    getppid() loop: what every sidecar on a node costs everyone else. The
    sidecars share one probe (in a bpffs mounted for the run), or each runs
    a private one, as they did before probes were shared."""
    def measure(mode):
        sharing, count = mode
        apps = [PingPong(pingpong) for _ in range(count)]
        sidecars = [ArmedSidecar(binary, app.pid, shared_dir if sharing == "shared" else "off") for app in apps]
        neighbour = PingPong(pingpong)
        neighbour.run(10_000)
        try:
            cpu0, wall0 = [cpu_seconds(armed.proc.pid) for armed in sidecars], time.monotonic()
            pids = [armed.proc.pid for armed in sidecars]
            before = programs_of(*pids)
            storm = neighbour.run(round_trips)
            middle = programs_of(*pids)
            getppid = neighbour.calls(calls)
            after = programs_of(*pids)

            def bpf_ns(start, end, units):
                return sum(end[i][1] - start[i][1] for i in end if i in start) / units

            return (storm, getppid, bpf_ns(before, middle, round_trips), bpf_ns(middle, after, calls),
                    [rss_mib(armed.proc.pid) for armed in sidecars],
                    [(cpu_seconds(armed.proc.pid) - cpu) / (time.monotonic() - wall0)
                     for armed, cpu in zip(sidecars, cpu0)])
        finally:
            neighbour.stop()
            for armed in sidecars:
                armed.stop()
            for app in apps:
                app.stop()

    modes = [("none", 0)] + [("shared", count) for count in counts if count] + [("private", max(counts))]
    with bpf_stats(), scratch_bpffs() as bpffs:
        shared_dir = bpffs / "freezeframe"
        results = interleaved(modes, rounds, measure)

    def label(mode):
        return "none" if mode[1] == 0 else f"{mode[0]} K={mode[1]}"

    for index, title, unit in ((0, "storm", "round trip"), (1, "getppid()", "call")):
        series = {label(mode): [result[index] for result in results[mode]] for mode in modes}
        print_medians(f"K sidecars beside a neighbour's {title} ({rounds} interleaved rounds, medians)",
                      series, unit)
    print("BPF ns the neighbour's work costs, all sidecars' programs summed (bpf_stats, medians)")
    for mode in modes[1:]:
        storm = statistics.median(result[2] for result in results[mode])
        getppid = statistics.median(result[3] for result in results[mode])
        print(f"  {label(mode):18} {storm:8.1f} ns/round trip  {getppid:6.2f} ns/call")
    for mode in modes[1:]:
        rss = [mib for result in results[mode] for mib in result[4]]
        cpu = [share for result in results[mode] for share in result[5]]
        print(f"  {label(mode)}: per sidecar, RSS median {statistics.median(rss):.1f} MiB, "
              f"CPU median {statistics.median(cpu) * 100:.2f} % of a core")


class Blocked:
    """bench/blocked.c: `threads` threads blocked `long_ms` at a time, then
    `shorts` times `short_ms`, over and over."""

    def __init__(self, binary: Path, threads: int, long_ms: int, short_ms: int, shorts: int):
        self.proc = subprocess.Popen([str(binary), str(threads), str(long_ms), str(short_ms), str(shorts)],
                                     stdout=subprocess.PIPE, text=True)
        self.pid = int(self.proc.stdout.readline().split()[1])
        # The same spread of long blocks as blocked.c's serve().
        cycles = [long_ms * 3 / 4 + long_ms * (index * 37 % 50) / 100 + shorts * short_ms
                  for index in range(threads)]
        self.long_per_s = sum(1000 / cycle for cycle in cycles)
        self.short_per_s = self.long_per_s * shorts

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def blocked_threads(binaries: dict, fixture: Path, processes: int, threads: int, seconds: int, rounds: int):
    """The recorder's own cost where unwinding matters most: many threads
    that block for long in code without frame pointers. One armed sidecar
    per process, sharing the node's probe (one sidecar per pod, the
    deployment docs/operations.md describes); every long block is unwound
    from its saved registers at the first cut it spans, every short one
    past the threshold from its stack copy. With a baseline, both builds'
    rounds are interleaved."""
    long_ms, short_ms, shorts = 3000, 30, 2
    apps = [Blocked(fixture, threads, long_ms, short_ms, shorts) for _ in range(processes)]
    long_per_s = sum(app.long_per_s for app in apps)
    short_per_s = sum(app.short_per_s for app in apps)
    print(f"the recorder beside {processes} processes x {threads} threads without frame pointers, "
          f"blocked ~{long_ms} ms at a time (across cuts, {long_per_s:.0f}/s) and {shorts} x {short_ms} ms "
          f"between (between cuts, {short_per_s:.0f}/s); {processes} armed sidecars sharing one probe, "
          f"{seconds} s, {rounds} interleaved rounds, medians; unwind_threshold at its default and at 0s "
          f"(no stack copies; blocks in progress at a cut are unwound either way)")

    def measure(mode):
        build, deployment, threshold = mode
        binary = binaries[build]
        threshold = "0s" if threshold == "threshold 0s" else None
        sidecars = []
        try:
            if deployment == "1 sidecar":
                sidecars.append(ArmedSidecar(binary, None, shared_dir, threshold, settle=0))
                sidecars[0].report_pids([app.pid for app in apps])
            else:
                for app in apps:
                    sidecars.append(ArmedSidecar(binary, app.pid, shared_dir, threshold, settle=0))
            # Past the start: the blocks in progress at attach are unwound
            # once, the unwind tables loaded once; neither is steady state.
            time.sleep(5)
            pids = [armed.proc.pid for armed in sidecars]
            before, cpu0, wall0 = programs_of(*pids), [cpu_seconds(pid) for pid in pids], time.monotonic()
            time.sleep(seconds)
            after, cpu1, wall = programs_of(*pids), [cpu_seconds(pid) for pid in pids], time.monotonic() - wall0
            return ([(end - start) / wall for start, end in zip(cpu0, cpu1)],
                    {name: (ns / wall, runs / wall) for name, (ns, runs) in by_name(before, after).items()})
        finally:
            for armed in sidecars:
                armed.stop()

    # unwind_threshold = "0s" turns off the stack copies only: a block in
    # progress at a cut is still unwound from its saved registers.
    modes = [(build, deployment, threshold) for deployment in (f"{processes} sidecars", "1 sidecar")
             for threshold in ("default", "threshold 0s") for build in binaries]
    try:
        with bpf_stats(), scratch_bpffs() as bpffs:
            shared_dir = bpffs / "freezeframe"
            results = interleaved(modes, rounds, measure)
    finally:
        for app in apps:
            app.stop()
    print(f"  {'':40} {'all sidecars':>13} {'per sidecar':>12} {'BPF, node-wide':>15}   (% of one core)")
    for mode in modes:
        total = statistics.median(sum(cpu) for cpu, _ in results[mode])
        each = statistics.median(share for cpu, _ in results[mode] for share in cpu)
        bpf = statistics.median(sum(ns for ns, _ in programs.values()) for _, programs in results[mode])
        print(f"  {', '.join(mode):40} {total * 100:12.3f}% {each * 100:11.3f}% {bpf / 1e7:14.3f}%")
    print("  BPF programs (medians), ns per run x runs per second, for: " + "; ".join(", ".join(mode) for mode in modes))
    names = sorted({name for mode in modes for _, programs in results[mode] for name in programs})
    for name in names:
        figures = []
        for mode in modes:
            rates = [programs[name] for _, programs in results[mode] if programs.get(name, (0, 0))[1]]
            ns_per_run = statistics.median(ns / runs for ns, runs in rates) if rates else float("nan")
            runs = statistics.median(runs for _, runs in rates) if rates else 0
            figures.append(f"{ns_per_run:7.1f} ns x {runs:7.1f}/s")
        print(f"      {name:18} {'  '.join(figures)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--freezeframe", type=Path, default=FREEZEFRAME, help="the build to measure")
    parser.add_argument("--baseline", type=Path, help="another freezeframe build to measure beside it")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved wall-clock rounds per mode")
    parser.add_argument("--round-trips", type=int, default=200_000)
    parser.add_argument("--calls", type=int, default=5_000_000)
    parser.add_argument("--sidecar-seconds", type=int, default=10)
    parser.add_argument("--sleeps", type=int, default=2000, help="2 ms sleeps per stack-copy round")
    parser.add_argument("--blocked-seconds", type=int, default=20,
                        help="how long each round of the blocked-threads part is measured")
    parser.add_argument("--blocked", type=int, nargs=2, default=[5, 20], metavar=("PROCESSES", "THREADS"),
                        help="the blocked-threads part's processes, and threads in each")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["kernel", "wall", "sidecar", "node", "copies", "blocked"],
                        help="leave out a part (repeatable)")
    parser.add_argument("--sidecars", type=int, nargs="+", default=[0, 1, 4, 8],
                        help="sidecar counts for the node-scale part (0 must come first)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("probe_cost.py loads BPF programs: run it as root")
    binaries = {"freezeframe": args.freezeframe}
    if args.baseline:
        binaries["baseline"] = args.baseline
    for tool in [*binaries.values(), OFFCPUTIME]:
        if not tool.exists():
            sys.exit(f"{tool} is missing (cargo build --release; apt-get install libbpf-tools)")
    out_dir = ROOT / "target/bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    pingpong = build_pingpong(out_dir)

    if "kernel" not in args.skip:
        with bpf_stats():
            kernel_side(binaries, pingpong, args.round_trips, args.calls)
    if "copies" not in args.skip:
        with bpf_stats():
            # A build from before stack copies has neither the flags nor the copies.
            stack_copies({"freezeframe": args.freezeframe}, pingpong, args.sleeps, 5)
    if "wall" not in args.skip:
        wall_clock(binaries, pingpong, args.rounds, args.round_trips, args.calls)
    if "sidecar" not in args.skip:
        sidecar(binaries, pingpong, args.sidecar_seconds)
    if "node" not in args.skip:
        node_scale(args.freezeframe, pingpong, args.rounds, args.round_trips, args.calls, args.sidecars)
    if "blocked" not in args.skip:
        blocked_threads(binaries, build_blocked(out_dir), *args.blocked, args.blocked_seconds, args.rounds)


if __name__ == "__main__":
    main()
