//! A context-switch storm: two threads pass one byte back and forth over two
//! pipes, so every round trip is two blocks and two wake-ups. Used by
//! bench/probe_cost.py to measure what a tracer costs the traced process.
//!
//! Prints `ready PID`, then for every `run N` line on stdin runs N round trips
//! and prints `ns_per_round_trip X`. A `calls N` line makes N getppid()
//! system calls on one thread instead, with no blocking at all (what
//! system-call hooks cost, alone), and prints `ns_per_call X`. A
//! `sleeps N MS KIB` line sleeps N times for MS milliseconds with KIB KiB
//! of stack in use below the caller (what copying a long block's user stack
//! costs), and prints `ns_per_sleep X`.

use std::io::{pipe, BufRead, Read, Write};
use std::thread;
use std::time::Instant;

fn main() {
    let (mut to_echo_read, mut to_echo_write) = pipe().unwrap();
    let (mut back_read, mut back_write) = pipe().unwrap();
    thread::Builder::new()
        .name("echo".into())
        .spawn(move || {
            let mut byte = [0u8];
            while to_echo_read.read_exact(&mut byte).is_ok() {
                back_write.write_all(&byte).unwrap();
            }
        })
        .unwrap();

    println!("ready {}", std::process::id());
    std::io::stdout().flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        if let Some(args) = line.strip_prefix("sleeps ") {
            let args: Vec<u64> = args.split_whitespace().filter_map(|n| n.parse().ok()).collect();
            if let [count, ms, kib] = args[..] {
                let ns = sleep_deep(count, std::time::Duration::from_millis(ms), kib);
                println!("ns_per_sleep {ns:.1}");
                std::io::stdout().flush().unwrap();
            }
            continue;
        }
        if let Some(calls) = line.strip_prefix("calls ").and_then(|n| n.trim().parse::<u64>().ok()) {
            let started = Instant::now();
            for _ in 0..calls {
                std::hint::black_box(std::os::unix::process::parent_id());
            }
            let elapsed = started.elapsed();
            println!("ns_per_call {:.1}", elapsed.as_nanos() as f64 / calls as f64);
            std::io::stdout().flush().unwrap();
            continue;
        }
        let Some(rounds) = line.strip_prefix("run ").and_then(|n| n.trim().parse::<u64>().ok()) else {
            continue;
        };
        let mut byte = [1u8];
        let started = Instant::now();
        for _ in 0..rounds {
            to_echo_write.write_all(&byte).unwrap();
            back_read.read_exact(&mut byte).unwrap();
        }
        let elapsed = started.elapsed();
        println!("ns_per_round_trip {:.1}", elapsed.as_nanos() as f64 / rounds as f64);
        std::io::stdout().flush().unwrap();
    }
}

/// Sleeps `count` times from `kib` KiB further down the stack, 1 KiB a frame.
#[inline(never)]
fn sleep_deep(count: u64, each: std::time::Duration, kib: u64) -> f64 {
    let frame = std::hint::black_box([0u8; 1024]);
    if kib > 0 {
        return sleep_deep(count, each, kib - 1) + f64::from(frame[0]);
    }
    let started = Instant::now();
    for _ in 0..count {
        thread::sleep(each);
    }
    started.elapsed().as_nanos() as f64 / count as f64
}
