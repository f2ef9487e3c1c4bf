#!/usr/bin/env python3
"""What tracing costs the traced process, and what the tracer costs itself.

Runs bench/pingpong.rs (a context-switch storm) with no tracer, under
`freezeframe capture`, under `freezeframe capture --min-alloc 0` (without
the system-call hooks that record large address-space changes), and under
libbpf-tools' `offcputime -p`, interleaved round by round so that machine
noise hits all alike, and prints medians. The storm is all pipe reads and
writes, so it is the worst case for the system-call hooks too. Also measures time from command start to probe attached, and the
peak RSS of each tracer over a 15 s window of the busy process.

Run as root after `cargo build --release`:  sudo bench/overhead.py
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FREEZEFRAME = ROOT / "target/release/freezeframe"
OFFCPUTIME = "/usr/sbin/offcputime"


def build_pingpong(out_dir: Path) -> Path:
    binary = out_dir / "pingpong"
    subprocess.run(
        ["rustc", "--edition", "2021", "-O", "-C", "force-frame-pointers=yes",
         str(ROOT / "bench/pingpong.rs"), "-o", str(binary)],
        check=True,
    )
    return binary


class PingPong:
    def __init__(self, binary: Path):
        self.proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = int(self.proc.stdout.readline().split()[1])

    def run(self, rounds: int) -> float:
        self.proc.stdin.write(f"run {rounds}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline().split()[1])

    def calls(self, count: int) -> float:
        self.proc.stdin.write(f"calls {count}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline().split()[1])

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def has_bpf_link(pid: int) -> bool:
    """Whether the process holds a BPF link: its probe is attached."""
    fd_dir = Path(f"/proc/{pid}/fdinfo")
    try:
        for fdinfo in fd_dir.iterdir():
            try:
                if "link_type:" in fdinfo.read_text():
                    return True
            except OSError:
                continue
    except OSError:
        pass
    return False


def start_tracer(mode: str, pid: int, seconds: int):
    """Starts a tracer on pid; returns (process, seconds until its probe was attached).

    Attachment is observed the same way for both tools, from outside: the
    moment the tracer process holds a BPF link fd."""
    if mode in ("freezeframe", "ff-no-alloc"):
        cmd = [str(FREEZEFRAME), "capture", "--pid", str(pid), "--duration", f"{seconds}s", "--min-block", "1ms"]
        if mode == "ff-no-alloc":
            cmd += ["--min-alloc", "0"]
    else:
        cmd = [OFFCPUTIME, "-p", str(pid), "-m", "1000", str(seconds)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not has_bpf_link(proc.pid):
        if proc.poll() is not None:
            raise RuntimeError(f"{mode} exited before attaching (status {proc.returncode})")
        if time.monotonic() - started > 30:
            raise RuntimeError(f"{mode} did not attach within 30 s")
        time.sleep(0.0005)
    return proc, time.monotonic() - started


def peak_rss_kib(cmd) -> int:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, _, usage = os.wait4(proc.pid, 0)
    return usage.ru_maxrss


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per mode")
    parser.add_argument("--round-trips", type=int, default=200_000, help="ping-pong round trips per measurement")
    parser.add_argument("--calls", type=int, default=5_000_000, help="system calls per measurement of the hooks")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("overhead.py loads BPF programs: run it as root")
    for tool in (FREEZEFRAME, Path(OFFCPUTIME)):
        if not tool.exists():
            sys.exit(f"{tool} is missing (cargo build --release; apt-get install libbpf-tools)")

    out_dir = ROOT / "target/bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    pingpong = build_pingpong(out_dir)
    modes = ["none", "freezeframe", "ff-no-alloc", "offcputime"]
    per_round_trip = {mode: [] for mode in modes}
    attach = {mode: [] for mode in modes if mode != "none"}

    for round_index in range(args.rounds):
        shift = round_index % len(modes)
        order = modes[shift:] + modes[:shift]
        for mode in order:
            workload = PingPong(pingpong)
            workload.run(10_000)  # warm up
            tracer = None
            if mode != "none":
                tracer, attach_s = start_tracer(mode, workload.pid, 600)
                attach[mode].append(attach_s)
            per_round_trip[mode].append(workload.run(args.round_trips))
            if tracer:
                tracer.send_signal(signal.SIGINT)
                tracer.wait(timeout=120)
            workload.stop()

    base = statistics.median(per_round_trip["none"])
    print(f"context-switch storm: {args.round_trips} round trips x {args.rounds} interleaved rounds (medians)")
    slowdown = {}
    for mode in modes:
        median = statistics.median(per_round_trip[mode])
        slowdown[mode] = median / base - 1
        print(f"  {mode:12} {median:9.1f} ns/round trip   slowdown {slowdown[mode] * 100:+6.1f} %")
    if slowdown["offcputime"] > 0:
        print(f"  freezeframe's slowdown / offcputime's: {slowdown['freezeframe'] / slowdown['offcputime']:.2f}")
    no_alloc = statistics.median(per_round_trip["ff-no-alloc"])
    with_alloc = statistics.median(per_round_trip["freezeframe"])
    print(f"  system-call hooks (address-space changes) add {(with_alloc / no_alloc - 1) * 100:+.1f} % "
          f"({with_alloc - no_alloc:+.1f} ns per round trip of 4 system calls)")
    # The system-call hooks alone: one thread making getppid() calls, which
    # never block, so no scheduler effect hides a few nanoseconds.
    hook_modes = ["none", "ff-no-alloc", "freezeframe"]
    per_call = {mode: [] for mode in hook_modes}
    for round_index in range(args.rounds):
        shift = round_index % len(hook_modes)
        for mode in hook_modes[shift:] + hook_modes[:shift]:
            workload = PingPong(pingpong)
            workload.calls(100_000)  # warm up
            tracer = None
            if mode != "none":
                tracer, _ = start_tracer(mode, workload.pid, 600)
            per_call[mode].append(workload.calls(args.calls))
            if tracer:
                tracer.send_signal(signal.SIGINT)
                tracer.wait(timeout=120)
            workload.stop()
    print(f"system-call loop: {args.calls} getppid() calls x {args.rounds} interleaved rounds (medians)")
    base_call = statistics.median(per_call["none"])
    for mode in hook_modes:
        median = statistics.median(per_call[mode])
        print(f"  {mode:12} {median:7.1f} ns/call   +{median - base_call:5.1f} ns")
    print("time from command start to probe attached (medians)")
    for mode, times in attach.items():
        print(f"  {mode:12} {statistics.median(times) * 1e3:7.1f} ms")

    # Peak RSS over a 15 s window of the busy process.
    workload = PingPong(pingpong)
    workload.proc.stdin.write(f"run {10**9}\n")
    workload.proc.stdin.flush()
    try:
        ours = peak_rss_kib([str(FREEZEFRAME), "capture", "--pid", str(workload.pid), "--duration", "15s",
                             "--output", str(out_dir / "busy.pb.gz")])
        theirs = peak_rss_kib([OFFCPUTIME, "-p", str(workload.pid), "-m", "1000", "15"])
    finally:
        workload.stop()
    print("peak RSS over a 15 s capture of the busy process")
    print(f"  freezeframe  {ours / 1024:7.1f} MiB")
    print(f"  offcputime   {theirs / 1024:7.1f} MiB")


if __name__ == "__main__":
    main()
