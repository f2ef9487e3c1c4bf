//! Shared by the real-kernel tests: the known workload, and the real binary.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// These tests load BPF for real. Without root they must fail, loudly: a
/// skipped kernel test is a missing test.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the BPF tests must run as root (they load real BPF programs); run them with sudo"
    );
}

pub fn freezeframe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_freezeframe"))
}

/// Compiles `tests/fixtures/workload.rs` once, with frame pointers, so its
/// user stacks walk all the way up.
pub fn workload_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("freezeframe-workload");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/workload.rs");
        let status = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
            .args([
                "--edition",
                "2021",
                "-O",
                "-g",
                "-C",
                "force-frame-pointers=yes",
                "-o",
            ])
            .arg(&out)
            .arg(&source)
            .status()
            .expect("cannot run rustc to build the test workload");
        assert!(status.success(), "the test workload does not compile");
        out
    })
}

/// Compiles a C fixture as distributions build C: `-O2`, no frame
/// pointers, against the system glibc.
fn build_without_frame_pointers(source: &str, binary: &str) -> PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(binary);
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(source);
    let status = Command::new("gcc")
        .args([
            "-O2",
            "-fomit-frame-pointer",
            "-g",
            "-pthread",
            "-Wall",
            "-o",
        ])
        .arg(&out)
        .arg(&source)
        .status()
        .expect("cannot run gcc to build a C fixture (scripts/prerequisites.sh installs it)");
    assert!(status.success(), "{} does not compile", source.display());
    out
}

/// `tests/fixtures/blocked_o2.c`, built once: threads blocked in a mutex,
/// a pipe, a sleep and a signal handler.
pub fn blocked_o2_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| build_without_frame_pointers("blocked_o2.c", "freezeframe-blocked-o2"))
}

/// `tests/fixtures/nofp.c`, built once: a thread that blocks for 50 ms
/// again and again, between cuts.
pub fn nofp_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| build_without_frame_pointers("nofp.c", "freezeframe-nofp"))
}

/// `tests/fixtures/JitRequests.java`, compiled once: the directory of its class.
pub fn jvm_fixture_classes() -> &'static Path {
    static CLASSES: OnceLock<PathBuf> = OnceLock::new();
    CLASSES.get_or_init(|| {
        let classes = Path::new(env!("CARGO_TARGET_TMPDIR")).join("freezeframe-jvm-classes");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/JitRequests.java");
        let status = Command::new("javac")
            .arg("-d")
            .arg(&classes)
            .arg(&source)
            .status()
            .expect("cannot run javac: install Debian's openjdk-17-jdk-headless");
        assert!(status.success(), "the JVM fixture does not compile");
        classes
    })
}

/// The JVM fixture as the docs say to run Java: frame pointers kept, its
/// request methods compiled (and not inlined) before they block.
pub fn jvm_fixture_command() -> Command {
    let mut java = Command::new("java");
    java.args([
        "-XX:+PreserveFramePointer",
        "-Xbatch",
        "-XX:CompileCommand=quiet",
        "-XX:CompileCommand=dontinline,JitRequests::*",
        "-cp",
    ])
    .arg(jvm_fixture_classes())
    .arg("JitRequests");
    java
}

/// The running workload, killed on drop.
pub struct Workload {
    pub child: Child,
    pub pid: u32,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

/// A long block the workload announced: which thread, and since when.
#[derive(Debug, Clone)]
pub struct Announced {
    pub name: String,
    pub tid: u32,
    pub since: SystemTime,
}

impl Workload {
    pub fn start() -> Self {
        Self::start_with(Command::new(workload_binary()))
    }

    /// Starts the workload through `command` (e.g. `unshare ... WORKLOAD`).
    pub fn start_with(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cannot start the test workload");
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut pid = None;
        while pid.is_none() {
            let mut line = String::new();
            assert!(
                stdout.read_line(&mut line).unwrap() > 0,
                "the workload exited before it was ready"
            );
            pid = line
                .strip_prefix("ready ")
                .map(|pid| pid.trim().parse().unwrap());
        }
        Workload {
            pid: pid.unwrap(),
            child,
            stdin,
            stdout,
        }
    }

    /// Starts the threads that block after a capture has begun, and returns
    /// what they announced.
    pub fn go(&mut self) -> Vec<Announced> {
        self.command("go", 2)
    }

    /// Sends a command line and returns the `announced` blocks it starts.
    pub fn command(&mut self, line: &str, announced: usize) -> Vec<Announced> {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
        (0..announced).map(|_| self.next_announcement()).collect()
    }

    pub fn next_announcement(&mut self) -> Announced {
        let line = self.next_line();
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[0], "blocked", "unexpected workload output {line:?}");
        Announced {
            name: fields[1].to_string(),
            tid: fields[2].parse().unwrap(),
            since: UNIX_EPOCH + Duration::from_nanos(fields[3].parse().unwrap()),
        }
    }

    /// The next line the workload prints, without its newline.
    pub fn next_line(&mut self) -> String {
        let mut line = String::new();
        assert!(
            self.stdout.read_line(&mut line).unwrap() > 0,
            "the workload exited"
        );
        line.trim_end().to_string()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts `measured` is within `tolerance` (a fraction) of `truth`.
pub fn assert_close(what: &str, measured: Duration, truth: Duration, tolerance: f64) {
    let error = (measured.as_secs_f64() - truth.as_secs_f64()).abs() / truth.as_secs_f64();
    assert!(
        error <= tolerance,
        "{what}: measured {measured:?}, truth {truth:?} ({:.1}% off, allowed {:.0}%)",
        error * 100.0,
        tolerance * 100.0
    );
}
