//! The DWARF unwinder on threads blocked the way distribution-built C code
//! blocks: the `-O2 -fomit-frame-pointer` fixture of the real-BPF tests
//! (`tests/fixtures/blocked_o2.c`, built here with gcc), glibc its only
//! library. Each blocked thread's `sp` and `pc` come from
//! `/proc/PID/task/TID/syscall`, as the survey's saved registers would.
//! Prints the first unwind (tables loaded then), the cost per unwound stack
//! once they are, what a cut pays (the module map read again, then every
//! blocked thread unwound once), and the tables' memory. Then the tables' memory for a JVM
//! (the JIT fixture, `tests/fixtures/JitRequests.java`, with every thread
//! unwound once). `cargo bench --bench unwind` (as root, or with ptrace
//! rights over the fixtures).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use common::{blocked_o2_binary, jvm_fixture_command, Workload};

use freezeframe::process_map::AddressSpace;
use freezeframe::unwind::{Entry, ProcessMemory, StackEnd, Unwinder, UserRegs};

const ROUNDS: usize = 2000;

/// `sp` and `pc` of a thread blocked in a system call.
fn saved_registers(pid: u32, tid: u32) -> Option<UserRegs> {
    let line = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    // `NR ARG1..ARG6 SP PC` while in a system call.
    if fields.len() != 9 {
        return None;
    }
    let hex = |field: &str| u64::from_str_radix(field.trim_start_matches("0x"), 16).ok();
    Some(UserRegs {
        ip: hex(fields[8])?,
        sp: hex(fields[7])?,
        // The unwind tables do not need it, and -O2 code keeps none.
        fp: 0,
    })
}

fn main() {
    let mut fixture = Workload::start_with(Command::new(blocked_o2_binary()));
    fixture.command("go", 4);
    // Announced just before they block.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let pid = fixture.pid;

    let blocked = blocked_threads(pid);
    println!(
        "fixture pid {pid}: {} threads blocked in a system call",
        blocked.len()
    );

    let mut unwinder = Unwinder::default();
    let started = Instant::now();
    let memory = ProcessMemory::open(pid).unwrap();
    let first = unwinder.unwind(pid, blocked[0].1, Entry::SystemCall, &memory, 127);
    println!(
        "first unwind (loads the tables, reads the maps): {:.0} µs, {} frames",
        started.elapsed().as_secs_f64() * 1e6,
        first.ips.len()
    );
    for &(tid, regs) in &blocked {
        let memory = ProcessMemory::open(pid).unwrap();
        let unwound = unwinder.unwind(pid, regs, Entry::SystemCall, &memory, 127);
        let end = if unwound.end == StackEnd::Complete {
            "complete"
        } else {
            "truncated"
        };
        println!("  tid {tid}: {} frames, {end}", unwound.ips.len());
    }

    let mut frames = 0;
    let started = Instant::now();
    for round in 0..ROUNDS {
        let (_, regs) = blocked[round % blocked.len()];
        // A fresh view of memory per stack, as the walker makes one.
        let memory = ProcessMemory::open(pid).unwrap();
        frames += unwinder
            .unwind(pid, regs, Entry::SystemCall, &memory, 127)
            .ips
            .len();
    }
    let elapsed = started.elapsed();
    println!(
        "{ROUNDS} stacks unwound in {:.1} ms: {:.1} µs per stack ({:.1} frames on average), \
         /proc/PID/mem opened and read per stack",
        elapsed.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e6 / ROUNDS as f64,
        frames as f64 / ROUNDS as f64
    );

    // As the stack walker does at each cut, for every new block: with an
    // address space the probe did not find settled (the map is read again),
    // and with one it found unchanged since the map was read (kept).
    let cuts = ROUNDS / blocked.len();
    let unchanged = HashMap::from([(pid, AddressSpace { id: 1, writes: 2 })]);
    for (spaces, what) in [
        (HashMap::new(), "the process's module map read once per cut"),
        (
            unchanged,
            "the module map kept, the address space unchanged",
        ),
    ] {
        let started = Instant::now();
        for _ in 0..cuts {
            unwinder.begin_cut(spaces.clone());
            for &(_, regs) in &blocked {
                let memory = ProcessMemory::open(pid).unwrap();
                unwinder.unwind(pid, regs, Entry::SystemCall, &memory, 127);
            }
        }
        let per_cut = started.elapsed().as_secs_f64() * 1e6 / cuts as f64;
        println!(
            "{cuts} cuts of {} blocked threads: {per_cut:.1} µs per cut, {:.1} µs per stack, \
             {what}",
            blocked.len(),
            per_cut / blocked.len() as f64
        );
    }
    println!(
        "unwind tables for a glibc-only process (fixture, libc, ld.so as touched, vDSO as \
         touched): {} bytes ({:.1} KiB)",
        unwinder.table_bytes(),
        unwinder.table_bytes() as f64 / 1024.0
    );
    drop(fixture);
    jvm_tables();
}

/// Starts `command` (stdin and stdout piped).
fn start(mut command: Command) -> Child {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("cannot start the fixture")
}

/// Waits for the fixture's `ready PID` line.
fn ready_pid(child: &mut Child) -> u32 {
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    loop {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "the fixture exited before it was ready"
        );
        if let Some(pid) = line.strip_prefix("ready ") {
            // Kept open: a fixture that writes to a closed pipe dies.
            child.stdout = Some(stdout.into_inner());
            return pid.trim().parse().unwrap();
        }
    }
}

/// The threads of `pid` blocked in a system call, with their registers.
fn blocked_threads(pid: u32) -> Vec<(u32, UserRegs)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|tid| Some((tid, saved_registers(pid, tid)?)))
        .collect()
}

/// The tables a JVM's blocked threads need: libjvm's are by far the largest.
fn jvm_tables() {
    let java = jvm_fixture_command();
    let mut child = start(java);
    let pid = ready_pid(&mut child);
    let blocked = blocked_threads(pid);
    let mut unwinder = Unwinder::default();
    let started = Instant::now();
    for &(_, regs) in &blocked {
        let memory = ProcessMemory::open(pid).unwrap();
        unwinder.unwind(pid, regs, Entry::SystemCall, &memory, 127);
    }
    println!(
        "unwind tables for a JVM (OpenJDK 17, {} blocked threads unwound once, {:.1} ms in all): \
         {} bytes ({:.1} MiB)",
        blocked.len(),
        started.elapsed().as_secs_f64() * 1e3,
        unwinder.table_bytes(),
        unwinder.table_bytes() as f64 / (1024.0 * 1024.0)
    );
    let _ = child.kill();
    let _ = child.wait();
}
