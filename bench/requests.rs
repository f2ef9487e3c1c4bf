//! A light request loop: every 2 ms a "request" does ~20 µs of work. Used by
//! bench/sidecar.py to measure what an armed flight recorder costs an
//! ordinary service.
//!
//! Prints `ready PID`; for every `run SECONDS` line on stdin it serves for
//! that long and prints `served N cpu_us_per_request X`.

use std::hint::black_box;
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<[i64; 18]>::zeroed();
    // getrusage(RUSAGE_SELF) without a libc crate: x86_64 syscall 98.
    unsafe {
        std::arch::asm!("syscall", inlateout("rax") 98i64 => _, in("rdi") 0i64, in("rsi") usage.as_mut_ptr(),
            lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    let fields = unsafe { usage.assume_init() };
    // ru_utime and ru_stime: two timevals.
    Duration::from_micros((fields[0] * 1_000_000 + fields[1] + fields[2] * 1_000_000 + fields[3]) as u64)
}

#[inline(never)]
fn handle_request(seed: u64) -> u64 {
    let mut hash = seed;
    for round in 0..20_000u64 {
        hash = hash.rotate_left(5) ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    hash
}

fn main() {
    println!("ready {}", std::process::id());
    std::io::stdout().flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let Some(seconds) = line.strip_prefix("run ").and_then(|s| s.trim().parse::<f64>().ok()) else {
            continue;
        };
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        let cpu_before = cpu_time();
        let mut served = 0u64;
        while Instant::now() < deadline {
            black_box(handle_request(served));
            served += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        let cpu = cpu_time() - cpu_before;
        println!("served {served} cpu_us_per_request {:.2}", cpu.as_secs_f64() * 1e6 / served as f64);
        std::io::stdout().flush().unwrap();
    }
}
