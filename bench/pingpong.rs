//! A context-switch storm: two threads pass one byte back and forth over two
//! pipes, so every round trip is two blocks and two wake-ups. Used by
//! bench/probe_cost.py to measure what a tracer costs the traced process.
//!
//! Prints `ready PID`, then for every `run N` line on stdin runs N round trips
//! and prints `ns_per_round_trip X`. A `calls N` line makes N getppid()
//! system calls on one thread instead, with no blocking at all (what
//! system-call hooks cost, alone), and prints `ns_per_call X`.

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
