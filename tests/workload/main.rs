//! A process whose off-CPU stacks are known in advance, for the real-BPF tests.
//!
//! Built by the tests with `rustc -C force-frame-pointers=yes`. Each blocking
//! thread makes its syscall straight from a distinctively named function (with
//! inline `syscall`), so that function is the innermost user frame whatever
//! libc does about frame pointers.
//!
//! Threads, named as `comm` shows them:
//! - `ff-preblocked`: blocked in `read` on a pipe nobody writes, from start-up,
//!   so it is already blocked when any capture begins;
//! - `ff-sleeper`: nanosleeps 100 ms at a time, forever;
//! - `ff-pipe`: reads a pipe that `ff-feeder` writes a byte to every 250 ms;
//! - after a `go` line on stdin: `ff-mutex` waits for a mutex that `ff-holder`
//!   holds forever, and `ff-stuck` blocks in `read` for good.
//!
//! On stdout it prints `ready PID` once the first threads run, then
//! `blocked NAME TID WALL_NS` as each long block begins (wall clock, ns).

use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SYS_READ: usize = 0;
const SYS_WRITE: usize = 1;
const SYS_PIPE: usize = 22;
const SYS_NANOSLEEP: usize = 35;
const SYS_GETTID: usize = 186;

#[inline(always)]
unsafe fn syscall3(nr: usize, a: usize, b: usize, c: usize) -> isize {
    let ret: isize;
    std::arch::asm!("syscall", inlateout("rax") nr as isize => ret, in("rdi") a, in("rsi") b,
        in("rdx") c, lateout("rcx") _, lateout("r11") _, options(nostack));
    ret
}

fn gettid() -> usize {
    unsafe { syscall3(SYS_GETTID, 0, 0, 0) as usize }
}

fn pipe() -> (usize, usize) {
    let mut fds = [0i32; 2];
    let ret = unsafe { syscall3(SYS_PIPE, fds.as_mut_ptr() as usize, 0, 0) };
    assert_eq!(ret, 0, "pipe failed");
    (fds[0] as usize, fds[1] as usize)
}

fn announce(name: &str) {
    let wall_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let mut out = std::io::stdout().lock();
    writeln!(out, "blocked {name} {} {wall_ns}", gettid()).unwrap();
    out.flush().unwrap();
}

#[inline(never)]
fn ff_sleep_in_nanosleep() {
    let request = [0i64, 100_000_000];
    loop {
        unsafe { syscall3(SYS_NANOSLEEP, request.as_ptr() as usize, 0, 0) };
    }
}

#[inline(never)]
fn ff_read_pipe(fd: usize) {
    let mut byte = 0u8;
    loop {
        unsafe { syscall3(SYS_READ, fd, &mut byte as *mut u8 as usize, 1) };
    }
}

#[inline(never)]
fn ff_feed_pipe(fd: usize) {
    let byte = 1u8;
    loop {
        thread::sleep(Duration::from_millis(250));
        unsafe { syscall3(SYS_WRITE, fd, &byte as *const u8 as usize, 1) };
    }
}

#[inline(never)]
fn ff_blocked_forever(name: &str, fd: usize) {
    announce(name);
    let mut byte = 0u8;
    unsafe { syscall3(SYS_READ, fd, &mut byte as *mut u8 as usize, 1) };
    unreachable!("nobody writes to this pipe");
}

#[inline(never)]
fn ff_wait_on_mutex(lock: &Mutex<()>) {
    announce("ff-mutex");
    let _guard = lock.lock().unwrap();
    unreachable!("the holder never lets go");
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) {
    thread::Builder::new()
        .name(name.to_string())
        .spawn(body)
        .unwrap();
}

fn main() {
    let (never_read, never_write) = pipe();
    spawn("ff-preblocked", move || {
        ff_blocked_forever("ff-preblocked", never_read)
    });
    spawn("ff-sleeper", ff_sleep_in_nanosleep);
    let (fed_read, fed_write) = pipe();
    spawn("ff-pipe", move || ff_read_pipe(fed_read));
    spawn("ff-feeder", move || ff_feed_pipe(fed_write));
    thread::sleep(Duration::from_millis(50));
    println!("ready {}", std::process::id());
    std::io::stdout().flush().unwrap();

    let mut lines = std::io::stdin().lock().lines();
    while let Some(Ok(line)) = lines.next() {
        if line.trim() != "go" {
            continue;
        }
        let lock = Arc::new(Mutex::new(()));
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let holder_lock = Arc::clone(&lock);
        spawn("ff-holder", move || {
            let _guard = holder_lock.lock().unwrap();
            held_tx.send(()).unwrap();
            loop {
                thread::park();
            }
        });
        held_rx.recv().unwrap();
        spawn("ff-mutex", move || ff_wait_on_mutex(&lock));
        spawn("ff-stuck", move || {
            ff_blocked_forever("ff-stuck", never_read)
        });
    }
    // Keep running after stdin closes, until killed.
    let _keep = never_write;
    loop {
        thread::park();
    }
}
