//! Real BPF against a workload whose stacks are known: run as root, in CI too.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{
    assert_close, blocked_o2_binary, freezeframe, jvm_fixture_command, require_root, Announced,
    Workload,
};
use freezeframe::encode::pprof;
use freezeframe::profile::labels::Key;
use freezeframe::profile::{FrameKind, Profile, ProfileKind, Sample, ThreadState};

const WINDOW: &str = "3s";

/// Runs `freezeframe capture` on `pid`; once it has attached, calls
/// `after_attach`. Returns the command's output.
fn capture(pid: u32, extra: &[&str], output: &Path, after_attach: impl FnOnce()) -> Output {
    capture_for(WINDOW, pid, extra, output, after_attach)
}

/// Reads a capture's stderr up to the line that says it has attached (log
/// lines may come first, such as a private probe's notice).
fn wait_attached(stderr: &mut impl BufRead) {
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let read = stderr.read_line(&mut line).unwrap();
        assert!(read > 0, "freezeframe did not attach: {seen}");
        if line.contains("capturing off-CPU stacks") {
            return;
        }
        seen.push_str(&line);
    }
}

/// [`capture`] for `duration` (`3s`, ...).
fn capture_for(
    duration: &str,
    pid: u32,
    extra: &[&str],
    output: &Path,
    after_attach: impl FnOnce(),
) -> Output {
    let mut child = freezeframe()
        .args([
            "capture",
            "--pid",
            &pid.to_string(),
            "--duration",
            duration,
            "--output",
        ])
        .arg(output)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start freezeframe");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    wait_attached(&mut stderr);
    after_attach();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "capture failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn load(path: &Path) -> Profile {
    pprof::decode(&std::fs::read(path).unwrap()).expect("our own pprof decodes")
}

fn samples_of<'a>(profile: &'a Profile, thread: &str) -> Vec<&'a Sample> {
    profile
        .samples
        .iter()
        .filter(|sample| sample.labels.thread_name == thread)
        .collect()
}

fn blocked(profile: &Profile, thread: &str) -> Duration {
    Duration::from_nanos(
        samples_of(profile, thread)
            .iter()
            .map(|sample| sample.value)
            .sum(),
    )
}

fn functions(samples: &[&Sample], kind: FrameKind) -> Vec<String> {
    samples
        .iter()
        .flat_map(|sample| &sample.stack)
        .filter(|frame| frame.kind == kind)
        .flat_map(|frame| frame.lines.iter().map(|line| line.function.clone()))
        .collect()
}

fn assert_stack(profile: &Profile, thread: &str, kernel: &str, user: &str) {
    let samples = samples_of(profile, thread);
    assert!(!samples.is_empty(), "no samples for {thread}");
    let kernel_functions = functions(&samples, FrameKind::Kernel);
    assert!(
        kernel_functions
            .iter()
            .any(|function| function.contains(kernel)),
        "{thread}: no kernel frame like {kernel} in {kernel_functions:?}"
    );
    let user_functions = functions(&samples, FrameKind::User);
    assert!(
        user_functions
            .iter()
            .any(|function| function.ends_with(user)),
        "{thread}: no user frame {user} in {user_functions:?}"
    );
}

fn window_end(profile: &Profile) -> std::time::SystemTime {
    profile.start + profile.duration
}

#[test]
fn known_stacks_and_durations_are_captured() {
    require_root();
    let dir = tempdir("known");
    let output = dir.join("profile.pb.gz");
    let mut workload = Workload::start();
    let mut announced: Vec<Announced> = Vec::new();
    let folded_path = dir.join("stacks.folded");
    let folded_arg = folded_path.to_str().unwrap();
    let result = capture(workload.pid, &["--folded", folded_arg], &output, || {
        announced = workload.go();
    });
    let profile = load(&output);
    let window = profile.duration;
    assert_close("window", window, Duration::from_secs(3), 0.05);

    // Blocked from before the capture to after it: the whole window.
    assert_close(
        "ff-preblocked",
        blocked(&profile, "ff-preblocked"),
        window,
        0.10,
    );
    // Blocked nearly all the time, in many short blocks.
    assert_close("ff-sleeper", blocked(&profile, "ff-sleeper"), window, 0.10);
    assert_close("ff-pipe", blocked(&profile, "ff-pipe"), window, 0.10);
    // Blocked from their announcement to past the window's end.
    for thread in &announced {
        let truth = window_end(&profile).duration_since(thread.since).unwrap();
        assert_close(&thread.name, blocked(&profile, &thread.name), truth, 0.10);
        let tids: Vec<u32> = samples_of(&profile, &thread.name)
            .iter()
            .map(|s| s.labels.thread_id)
            .collect();
        assert!(
            tids.iter().all(|&tid| tid == thread.tid),
            "{}: tids {tids:?}",
            thread.name
        );
    }

    assert_stack(&profile, "ff-sleeper", "nanosleep", "ff_sleep_in_nanosleep");
    assert_stack(&profile, "ff-pipe", "pipe_read", "ff_read_pipe");
    assert_stack(&profile, "ff-mutex", "futex_wait", "ff_wait_on_mutex");
    assert_stack(&profile, "ff-stuck", "pipe_read", "ff_blocked_forever");
    // Found blocked by the task iterator; its user stack walked from its registers.
    assert_stack(&profile, "ff-preblocked", "pipe_read", "ff_blocked_forever");

    // Blocked past the window's end, its stack is unwound whole: through
    // the thread start to glibc's clone3.
    for sample in samples_of(&profile, "ff-stuck") {
        assert!(sample
            .stack
            .iter()
            .all(|frame| frame.kind != FrameKind::Truncated));
        let names: Vec<&str> = sample.stack.iter().map(|frame| frame.function()).collect();
        assert!(names.ends_with(&["start_thread", "clone3"]), "{names:?}");
    }
    // Kernel frames come first (leaf first), then user frames.
    for sample in &profile.samples {
        let first_user = sample
            .stack
            .iter()
            .position(|frame| frame.kind != FrameKind::Kernel);
        if let Some(first_user) = first_user {
            assert!(sample.stack[first_user..]
                .iter()
                .all(|frame| frame.kind != FrameKind::Kernel));
        }
    }
    // BPF's own frames never show.
    let kernel_functions: Vec<String> = profile
        .samples
        .iter()
        .flat_map(|sample| functions(&[sample], FrameKind::Kernel))
        .collect();
    assert!(
        !kernel_functions
            .iter()
            .any(|f| f.starts_with("bpf_") || f.contains("__bpf_trace")),
        "BPF frames in the profile: {kernel_functions:?}"
    );

    let summary = String::from_utf8(result.stdout).unwrap();
    assert!(summary.contains("ff-preblocked"), "summary: {summary}");
    assert!(summary.contains("ff_wait_on_mutex"), "summary: {summary}");
    let folded = std::fs::read_to_string(&folded_path).unwrap();
    assert!(folded
        .lines()
        .any(|line| line.starts_with("ff-sleeper;") && line.contains("ff_sleep_in_nanosleep")));

    // An independent decoder reads the same file.
    let raw_text = go_pprof_raw(&output);
    assert!(
        raw_text.contains("events/count off_cpu/nanoseconds"),
        "{raw_text}"
    );
    assert!(raw_text.contains("thread_name:[ff-mutex]"), "{raw_text}");
    assert!(
        raw_text.contains("workload::ff_sleep_in_nanosleep"),
        "{raw_text}"
    );
    assert!(raw_text.contains("[kernel.kallsyms]"), "{raw_text}");

    // And the address-space kind of the same real stacks, until a capture
    // writes one of its own.
    let address_space = dir.join("address-space.pb.gz");
    let as_bytes = Profile {
        kind: ProfileKind::AddressSpace,
        ..profile.clone()
    };
    std::fs::write(&address_space, pprof::encode(&as_bytes)).unwrap();
    let raw_text = go_pprof_raw(&address_space);
    assert!(
        raw_text.contains("PeriodType: address_space bytes"),
        "{raw_text}"
    );
    assert!(
        raw_text.contains("calls/count alloc_space/bytes[dflt]"),
        "{raw_text}"
    );
    assert!(
        raw_text.contains("workload::ff_sleep_in_nanosleep"),
        "{raw_text}"
    );
}

/// What `go tool pprof -raw` prints for `path`, which it must read.
fn go_pprof_raw(path: &Path) -> String {
    let raw = Command::new("go")
        .args(["tool", "pprof", "-raw"])
        .arg(path)
        .output()
        .expect("go tool pprof");
    assert!(
        raw.status.success(),
        "go tool pprof failed on {}: {}",
        path.display(),
        String::from_utf8_lossy(&raw.stderr)
    );
    String::from_utf8_lossy(&raw.stdout).into_owned()
}

/// The tid of `pid`'s thread named `name`.
fn thread_named(pid: u32, name: &str) -> u32 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| task.unwrap().file_name().to_str()?.parse().ok())
        .find(|tid: &u32| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == name)
        })
        .unwrap_or_else(|| panic!("{pid} has a thread named {name}"))
}

/// The entries, BTF-formatted, of every loaded map whose kernel name is
/// `name` (as bpftool shows them: one map's elements, or several maps').
fn map_entries(name: &str) -> Vec<serde_json::Value> {
    let shown = Command::new("bpftool")
        .args(["map", "dump", "name", name, "-j"])
        .output()
        .expect("bpftool (Debian's bpftool package)");
    assert!(shown.status.success(), "no map named {name} is loaded");
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    let mut entries = Vec::new();
    for item in shown.as_array().unwrap() {
        match item.get("elements") {
            Some(elements) => entries.extend(elements.as_array().unwrap().iter().cloned()),
            None => entries.push(item.clone()),
        }
    }
    entries
        .into_iter()
        .filter_map(|entry| entry.get("formatted").cloned())
        .collect()
}

/// While a capture of `pid` runs: the stack top the probe learned for
/// `tid`, once it has, and the size of the first copy of `tid`'s stack
/// seen in `small_copies` (copies wait there until the next cut), within
/// 2 s.
fn watch_copies_to_top(pid: u32, tid: u32) -> (Option<u64>, Option<u64>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let (mut top, mut small_copy) = (None, None);
    while std::time::Instant::now() < deadline && (top.is_none() || small_copy.is_none()) {
        top = top.or_else(|| {
            map_entries("stack_tops")
                .iter()
                .find(|entry| entry["key"].as_u64() == Some(u64::from(tid)))
                .and_then(|entry| entry["value"].as_u64())
        });
        small_copy = small_copy.or_else(|| {
            map_entries("small_copies")
                .iter()
                .map(|entry| &entry["value"])
                .find(|copy| {
                    copy["host_tid"].as_u64() == Some(u64::from(tid))
                        && copy["host_tgid"].as_u64() == Some(u64::from(pid))
                })
                .and_then(|copy| copy["size"].as_u64())
        });
        std::thread::sleep(Duration::from_millis(20));
    }
    (top, small_copy)
}

/// The user functions of a sample, innermost first.
fn user_chain(sample: &Sample) -> Vec<&str> {
    sample
        .stack
        .iter()
        .filter(|frame| frame.kind == FrameKind::User)
        .map(|frame| frame.function())
        .collect()
}

#[test]
fn long_blocks_in_code_without_frame_pointers_get_whole_user_stacks() {
    require_root();
    let dir = tempdir("nofp");
    let workload = Workload::start_with(Command::new(common::nofp_binary()));
    const THREAD: &str = "ff-nofp-sleep";
    let whole = |sample: &Sample| {
        let chain = user_chain(sample);
        let at = |name: &str| chain.iter().position(|function| *function == name);
        let (Some(leaf), Some(mid), Some(top)) = (at("nofp_leaf"), at("nofp_mid"), at("nofp_top"))
        else {
            return false;
        };
        leaf < mid
            && mid < top
            && sample
                .stack
                .iter()
                .all(|frame| frame.kind != FrameKind::Truncated)
            && chain
                .last()
                .is_some_and(|root| ["start_thread", "clone3", "__clone3"].contains(root))
    };

    // The thread's blocked time, and how much of it is under whole stacks.
    let whole_share = |samples: &[&Sample]| {
        let total: u64 = samples.iter().map(|sample| sample.value).sum();
        let whole_ns: u64 = samples
            .iter()
            .filter(|sample| whole(sample))
            .map(|sample| sample.value)
            .sum();
        (total, whole_ns)
    };

    // 50 ms sleeps, most of them begun and ended between two cuts: each is
    // unwound from the copy the probe took as it ended. Once one has been
    // unwound whole, the probe knows where the thread's stack ends, and the
    // copies after it stop there, small enough for the small copies' map.
    let sleeper = thread_named(workload.pid, THREAD);
    let unwound = dir.join("unwound.pb.gz");
    let mut copied_to_top = None;
    capture(
        workload.pid,
        &["--unwind-threshold", "10ms"],
        &unwound,
        || copied_to_top = Some(watch_copies_to_top(workload.pid, sleeper)),
    );
    let (top, small_copy) = copied_to_top.unwrap();
    assert!(
        top.is_some(),
        "the probe learned where {THREAD}'s stack ends"
    );
    let small_copy = small_copy.expect("a copy of the thread's stack went into small_copies");
    assert!(
        small_copy < 2048,
        "a copy to the top holds the frames only: {small_copy} bytes"
    );
    let profile = load(&unwound);
    let samples = samples_of(&profile, THREAD);
    let (total, whole_ns) = whole_share(&samples);
    println!(
        "with stack copies: {:.1} % of {THREAD}'s blocked time under whole stacks",
        whole_ns as f64 * 100.0 / total as f64
    );
    assert_close(THREAD, Duration::from_nanos(total), profile.duration, 0.10);
    // (The parts of blocks in progress at a cut are unwound from outside.)
    assert!(
        whole_ns * 10 >= total * 9,
        "{whole_ns} of {total} ns under whole stacks: {:?}",
        samples
            .iter()
            .map(|sample| (user_chain(sample), sample.value))
            .collect::<Vec<_>>()
    );
    for sample in samples.iter().filter(|sample| whole(sample)) {
        let chain = user_chain(sample);
        let leaf = chain.iter().position(|f| *f == "nofp_leaf").unwrap();
        assert!(
            chain[..leaf].iter().all(|f| f.contains("nanosleep")),
            "only libc's nanosleep lies below the fixture's own frames: {chain:?}"
        );
    }

    // Without copies, the blocks walk frame pointers as they end, and stop
    // in libc: only the parts in progress at a cut are whole.
    let walked = dir.join("walked.pb.gz");
    capture(workload.pid, &["--unwind-threshold", "0s"], &walked, || {});
    let profile = load(&walked);
    let samples = samples_of(&profile, THREAD);
    let (total, whole_ns) = whole_share(&samples);
    assert!(total > 0);
    println!(
        "without: {:.1} % under whole stacks",
        whole_ns as f64 * 100.0 / total as f64
    );
    assert!(
        whole_ns * 2 < total,
        "frame pointers alone cannot give these stacks: {whole_ns} of {total} ns whole"
    );
}

/// Waits until a thread sleeps in the kernel (it may still be on its way
/// in when it announces itself).
fn wait_until_asleep(pid: u32, tid: u32) {
    let task = format!("/proc/{pid}/task/{tid}");
    for _ in 0..500 {
        let stat = std::fs::read_to_string(format!("{task}/stat")).unwrap();
        let state = stat.rsplit(") ").next().unwrap().chars().next();
        let wchan = std::fs::read_to_string(format!("{task}/wchan")).unwrap();
        if matches!(state, Some('S' | 'D')) && wchan != "0" {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("thread {tid} never went to sleep");
}

#[test]
fn a_kernel_lock_wait_has_one_stack_whether_it_began_before_the_capture_or_during_it() {
    require_root();
    let dir = tempdir("one-wait");
    let mut workload = Workload::start();
    // ff-tty-holder sleeps in write() holding the terminal's write mutex;
    // ff-tty-early waits for that mutex before the capture begins, and
    // ff-tty-late from within it, in the same code.
    let announced = workload.command("tty", 2);
    let tid_of = |name: &str| announced.iter().find(|t| t.name == name).unwrap().tid;
    let (holder, early) = (tid_of("ff-tty-holder"), tid_of("ff-tty-early"));
    wait_until_asleep(workload.pid, early);
    let output = dir.join("tty.pb.gz");
    let pid = workload.pid;
    capture(pid, &[], &output, || {
        let late = workload.command("tty-late", 1);
        wait_until_asleep(pid, late[0].tid);
    });
    let profile = load(&output);
    // The wait for good is each thread's longest (on a busy machine a
    // thread may also be preempted on its way there).
    let wait_of = |thread: &str| {
        *samples_of(&profile, thread)
            .iter()
            .max_by_key(|sample| sample.value)
            .unwrap_or_else(|| panic!("no samples for {thread}"))
    };
    let kernel_of = |thread: &str| functions(&[wait_of(thread)], FrameKind::Kernel);
    let (before, during) = (kernel_of("ff-tty-early"), kernel_of("ff-tty-late"));
    assert_eq!(before, during, "one wait, one stack");
    // The stack starts in the call that wanted the mutex, as the kernel
    // shows a sleeping task's: none of the scheduler's or the mutex's own
    // frames, however the wait was caught.
    assert!(
        before.first().is_some_and(|f| f.contains("tty_write")),
        "{before:?}"
    );
    assert!(
        !before
            .iter()
            .any(|f| f.contains("schedule") || f.contains("mutex_lock")),
        "{before:?}"
    );
    // What the frames no longer say, the labels do: the wait seen
    // beginning is on a kernel mutex held by ff-tty-holder.
    let late = wait_of("ff-tty-late");
    let label = |key: &str| {
        late.labels
            .label(Key::from_name(key).expect("a label of the schema"))
            .map(str::to_string)
    };
    assert!(
        label("lock").is_some_and(|lock| lock.starts_with("mutex")),
        "{:?}",
        late.labels
    );
    assert_eq!(label("lock_holder_tid"), Some(holder.to_string()));
}

/// Whether a sample's user stack is the marker for one not read in time.
fn not_read(sample: &Sample) -> bool {
    functions(&[sample], FrameKind::Truncated)
        .iter()
        .any(|f| f == freezeframe::profile::NOT_READ_FRAME)
}

#[test]
fn a_wait_behind_a_frozen_address_space_keeps_its_user_stack_across_cuts() {
    require_root();
    let dir = tempdir("freeze");
    let mut workload = Workload::start();
    let pid = workload.pid;
    let output = dir.join("freeze.pb.gz");
    // Two freezes of most of a second each, within a 5 s capture cut every
    // 500 ms: a cut falls inside each wait, while the waiter's memory cannot
    // be read, and both waits are over well before the last cut.
    let mut waits_ms: Vec<u64> = Vec::new();
    capture_for("5s", pid, &[], &output, || {
        workload.command("freeze 2", 2);
        loop {
            let line = workload.next_line();
            if line == "thawed" {
                break;
            }
            if let Some(ms) = line.strip_prefix("waited ") {
                waits_ms.push(ms.parse().unwrap());
            }
        }
    });
    assert!(
        waits_ms.iter().any(|&ms| ms > 500),
        "no wait outlasted a cut, so none was cut in two: {waits_ms:?} ms"
    );
    let profile = load(&output);
    let in_mmap = |sample: &&Sample| {
        functions(&[sample], FrameKind::Kernel)
            .first()
            .is_some_and(|f| f == "vm_mmap_pgoff" || f == "__vm_munmap")
    };
    let waits: Vec<&Sample> = samples_of(&profile, "ff-frozen")
        .into_iter()
        .filter(in_mmap)
        .collect();
    // The part of a wait before a cut, while the waiter's memory could not
    // be read, is not left without its user frames: its window's stack is
    // revised once they are read, at a later cut.
    for sample in &waits {
        let user = functions(&[sample], FrameKind::User);
        assert!(
            !not_read(sample) && user.iter().any(|f| f == "workload::ff_wait_through_freeze"),
            "{} ms of the wait without the waiter's frames: {user:?} (not read: {})",
            sample.value / 1_000_000,
            not_read(sample)
        );
    }
    // And no time is lost, or moved, by revising.
    let counted_ms = waits.iter().map(|sample| sample.value).sum::<u64>() / 1_000_000;
    let reported_ms: u64 = waits_ms.iter().sum();
    assert!(
        counted_ms * 10 >= reported_ms * 9,
        "{counted_ms} ms of waits counted, {reported_ms} ms timed by the waiter"
    );
}

#[test]
fn kernel_lock_waits_name_the_lock_and_its_holder() {
    require_root();
    let dir = tempdir("locks");
    let mut workload = Workload::start();
    let announced = workload.command("mmap", 2);
    let holder = announced
        .iter()
        .find(|thread| thread.name == "ff-mmap-holder")
        .unwrap()
        .tid;
    let output = dir.join("locks.pb.gz");
    let alloc_output = dir.join("alloc.pb.gz");
    capture(
        workload.pid,
        &[
            "--state",
            "D",
            "--alloc-output",
            alloc_output.to_str().unwrap(),
        ],
        &output,
        || {},
    );
    let profile = load(&output);
    let label = |sample: &Sample, key: &str| {
        let key = Key::from_name(key).expect("a label of the schema");
        sample.labels.label(key).map(str::to_string)
    };

    // The waiter maps and unmaps while the holder populates and frees 256 MiB
    // under the same mmap_lock: it waits for it in mmap or munmap.
    let waiting = samples_of(&profile, "ff-mmap-waiter");
    let total: u64 = waiting.iter().map(|sample| sample.value).sum();
    let on_mmap_lock: Vec<&&Sample> = waiting
        .iter()
        .filter(|sample| label(sample, "lock").as_deref() == Some("mmap_lock"))
        .collect();
    let on_mmap_lock_ns: u64 = on_mmap_lock.iter().map(|sample| sample.value).sum();
    assert!(total > 0, "the waiter never blocked");
    assert!(
        on_mmap_lock_ns * 2 > total,
        "most of the waiter's blocked time is on mmap_lock: {on_mmap_lock_ns} of {total} ns"
    );
    for sample in &on_mmap_lock {
        assert_eq!(
            label(sample, "lock_mode").as_deref(),
            Some("write"),
            "mmap and munmap take it for writing"
        );
        // As the kernel shows a sleeping task's stack: from the call that
        // wanted the lock, without the rwsem's slow path.
        let kernel = functions(&[sample], FrameKind::Kernel);
        assert!(
            kernel
                .first()
                .is_some_and(|f| f == "vm_mmap_pgoff" || f == "__vm_munmap"),
            "a wait on mmap_lock starts in mmap or munmap: {kernel:?}"
        );
    }
    // A rwsem held by readers records only the last reader in, so the name
    // is a hint; the thread doing the big populate and unmap must still be
    // the one named for most of the wait.
    let holder_label = holder.to_string();
    let named_holder_ns: u64 = on_mmap_lock
        .iter()
        .filter(|sample| label(sample, "lock_holder_tid").as_deref() == Some(holder_label.as_str()))
        .map(|sample| sample.value)
        .sum();
    assert!(
        named_holder_ns * 2 > on_mmap_lock_ns,
        "ff-mmap-holder ({holder}) is named for {named_holder_ns} of {on_mmap_lock_ns} ns: {:?}",
        on_mmap_lock
            .iter()
            .map(|sample| (label(sample, "lock_holder_tid"), sample.value))
            .collect::<Vec<_>>()
    );

    // The holds behind the waits were seen being taken and released: each
    // wait names how long its hold lasted and the call that took the lock.
    // Populating 256 MiB takes tens of milliseconds at least.
    for sample in &on_mmap_lock {
        let hold_ns: u64 = label(sample, "lock_hold_ns")
            .expect("a wait on mmap_lock carries its hold's duration")
            .parse()
            .unwrap();
        assert!(hold_ns >= 1_000_000, "hold of {hold_ns} ns");
    }
    assert!(
        on_mmap_lock.iter().any(|sample| {
            label(sample, "lock_holder").as_deref() == Some("ff-mmap-holder")
                && label(sample, "lock_holder_stack")
                    .is_some_and(|stack| stack.contains("ff_hold_mmap_lock"))
        }),
        "the holder's stack names the function that maps: {:?}",
        on_mmap_lock
            .iter()
            .map(|sample| label(sample, "lock_holder_stack"))
            .collect::<Vec<_>>()
    );

    // The holder's 256 MiB maps and unmaps are the address-space changes:
    // exact sizes, from the function that makes them; the waiter's 64 KiB
    // calls are below the threshold.
    let changes = load(&alloc_output);
    assert_eq!(changes.kind, ProfileKind::AddressSpace);
    for call in ["mmap", "munmap"] {
        let samples: Vec<&Sample> = changes
            .samples
            .iter()
            .filter(|sample| label(sample, "syscall").as_deref() == Some(call))
            .collect();
        assert!(!samples.is_empty(), "no {call} recorded: {changes:?}");
        for sample in samples {
            assert_eq!(sample.labels.thread_name, "ff-mmap-holder");
            assert_eq!(sample.labels.thread_id, holder);
            assert!(sample.count > 0);
            assert_eq!(sample.value, sample.count * (256 << 20), "{call} sizes");
            assert!(
                functions(&[sample], FrameKind::User)
                    .iter()
                    .any(|f| f == "workload::ff_hold_mmap_lock"),
                "{call} is called from ff_hold_mmap_lock: {:?}",
                functions(&[sample], FrameKind::User)
            );
        }
    }
}

#[test]
fn user_space_lock_waits_name_the_futex_and_the_thread_that_let_go() {
    require_root();
    let dir = tempdir("futex");
    let mut workload = Workload::start();
    let announced = workload.command("futex", 2);
    let locker = announced
        .iter()
        .find(|thread| thread.name == "ff-locker")
        .unwrap()
        .tid;
    let output = dir.join("futex.pb.gz");
    capture(workload.pid, &["--state", "S"], &output, || {});
    let profile = load(&output);
    let label = |sample: &Sample, key: &str| {
        let key = Key::from_name(key).expect("a label of the schema");
        sample.labels.label(key).map(str::to_string)
    };

    // ff-lockwait spends nearly all its time in futex(), on one lock word,
    // and each wait ends when ff-locker lets go.
    let waiting = samples_of(&profile, "ff-lockwait");
    let total: u64 = waiting.iter().map(|sample| sample.value).sum();
    let on_futex: Vec<&&Sample> = waiting
        .iter()
        .filter(|sample| label(sample, "lock").is_some_and(|lock| lock.starts_with("futex@0x")))
        .collect();
    let on_futex_ns: u64 = on_futex.iter().map(|sample| sample.value).sum();
    assert!(
        on_futex_ns * 10 >= total * 9 && total > 1_000_000_000,
        "{on_futex_ns} of {total} ns on a futex"
    );
    let words: std::collections::HashSet<String> = on_futex
        .iter()
        .filter_map(|sample| label(sample, "lock"))
        .collect();
    assert_eq!(words.len(), 1, "one lock word: {words:?}");
    let locker_label = locker.to_string();
    let woken_by_locker: u64 = on_futex
        .iter()
        .filter(|sample| {
            label(sample, "lock_holder_tid").as_deref() == Some(locker_label.as_str())
                && label(sample, "lock_held_by").as_deref() == Some("waker")
        })
        .map(|sample| sample.value)
        .sum();
    // A wait still in progress when the window closes has no waker yet.
    assert!(
        woken_by_locker * 10 >= on_futex_ns * 7,
        "ff-locker ({locker}) woke {woken_by_locker} of {on_futex_ns} ns: {:?}",
        on_futex
            .iter()
            .map(|sample| (label(sample, "lock_holder_tid"), sample.value))
            .collect::<Vec<_>>()
    );
    // The waiter's own frame is under the futex wait.
    assert!(on_futex.iter().any(|sample| {
        functions(&[sample], FrameKind::User)
            .iter()
            .any(|f| f == "workload::ff_wait_for_lock")
    }));
}

#[test]
fn filters_apply_in_the_kernel() {
    require_root();
    let dir = tempdir("filters");
    let workload = Workload::start();
    let sleeper = thread_id(workload.pid, "ff-sleeper");

    let only_sleeper = dir.join("tid.pb.gz");
    capture(
        workload.pid,
        &["--tid", &sleeper.to_string()],
        &only_sleeper,
        || {},
    );
    let profile = load(&only_sleeper);
    assert!(!profile.samples.is_empty());
    assert!(profile
        .samples
        .iter()
        .all(|sample| sample.labels.thread_id == sleeper));

    // The sleeper's blocks are 100 ms: a 200 ms floor leaves only longer ones.
    let long_only = dir.join("min.pb.gz");
    capture(workload.pid, &["--min-block", "200ms"], &long_only, || {});
    let profile = load(&long_only);
    assert!(samples_of(&profile, "ff-sleeper").is_empty());
    assert!(!samples_of(&profile, "ff-preblocked").is_empty());

    // Nothing in the workload sleeps uninterruptibly.
    let disk_only = dir.join("state.pb.gz");
    capture(workload.pid, &["--state", "D"], &disk_only, || {});
    assert!(load(&disk_only).samples.is_empty());
}

#[test]
fn a_target_in_a_pid_namespace_is_captured_by_host_and_namespace_pid() {
    require_root();
    let dir = tempdir("pidns");
    let mut unshare = Command::new("unshare");
    // --kill-child: the workload must not outlive the test as an orphan pid 1.
    unshare
        .args(["--pid", "--fork", "--kill-child", "--mount-proc"])
        .arg(common::workload_binary());
    let workload = Workload::start_with(unshare);
    assert_eq!(
        workload.pid, 1,
        "inside its namespace the workload is pid 1"
    );
    let host_pid = child_of(workload.child.id());

    let by_host_pid = dir.join("host.pb.gz");
    capture(host_pid, &[], &by_host_pid, || {});
    let profile = load(&by_host_pid);
    assert_stack(&profile, "ff-sleeper", "nanosleep", "ff_sleep_in_nanosleep");
    assert!(profile
        .samples
        .iter()
        .all(|sample| sample.labels.process_id == host_pid));

    // freezeframe inside the namespace, given the namespace's own pid.
    let by_ns_pid = dir.join("ns.pb.gz");
    let script = format!(
        "{workload} </dev/null >/dev/null & sleep 0.5; exec {ff} capture --pid $! --duration 2s --output {out}",
        workload = common::workload_binary().display(),
        ff = env!("CARGO_BIN_EXE_freezeframe"),
        out = by_ns_pid.display(),
    );
    let status = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "sh", "-c", &script])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let profile = load(&by_ns_pid);
    assert_stack(&profile, "ff-sleeper", "nanosleep", "ff_sleep_in_nanosleep");
    assert_close(
        "ff-preblocked in a namespace",
        blocked(&profile, "ff-preblocked"),
        profile.duration,
        0.10,
    );
    // Ids are the namespace's: small numbers, not the host's.
    assert!(profile
        .samples
        .iter()
        .all(|sample| sample.labels.process_id < 100));
}

#[test]
fn bad_requests_get_clear_errors() {
    require_root();
    let unknown = freezeframe()
        .args(["capture", "--pid", "999999999", "--duration", "1s"])
        .output()
        .unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no process with pid 999999999"));

    let zero = freezeframe()
        .args(["capture", "--pid", "1", "--duration", "0s"])
        .output()
        .unwrap();
    assert!(!zero.status.success());
    assert!(String::from_utf8_lossy(&zero.stderr).contains("--duration must be longer than zero"));

    let absurd = freezeframe()
        .args(["capture", "--pid", "1", "--duration", "400d"])
        .output()
        .unwrap();
    assert!(!absurd.status.success());
    assert!(String::from_utf8_lossy(&absurd.stderr).contains("24 h"));

    // Without privileges: said so, before any BPF is touched.
    let unprivileged = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_freezeframe"))
        .args(["capture", "--pid", "1", "--duration", "1s"])
        .output()
        .unwrap();
    assert!(!unprivileged.status.success());
    let message = String::from_utf8_lossy(&unprivileged.stderr);
    assert!(
        message.contains("needs root, or CAP_BPF and CAP_PERFMON"),
        "{message}"
    );
}

fn thread_id(pid: u32, name: &str) -> u32 {
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid = entry
            .unwrap()
            .file_name()
            .to_string_lossy()
            .parse()
            .unwrap();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap();
        if comm.trim() == name {
            return tid;
        }
    }
    panic!("no thread {name} in {pid}");
}

/// The pid of `parent`'s only child (unshare's forked child).
fn child_of(parent: u32) -> u32 {
    let children =
        std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).unwrap();
    children
        .split_whitespace()
        .next()
        .expect("unshare has a child")
        .parse()
        .unwrap()
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("capture-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Threads the churn starts and ends: enough to fill every map many times
/// over had dead threads kept their entries.
const CHURN_THREADS: usize = 40_000;

/// What a capture of the churn must show: each short-lived thread with its
/// own 2 ms sleeps and nothing more (its last switch-out is not a block),
/// nothing dropped, and the known 2 s block that follows with its kernel and
/// user frames named, although the process has exited by then.
fn assert_churn_profile(profile: &Profile, churner_blocked_since: std::time::SystemTime) {
    assert!(
        !profile
            .comments
            .iter()
            .any(|comment| comment.starts_with("bpf drops")),
        "drops: {:?}",
        profile.comments
    );
    let churn = samples_of(profile, "ff-churn");
    let mut by_thread: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
    for sample in &churn {
        *by_thread.entry(sample.labels.thread_id).or_default() += sample.value;
        let kernel = functions(&[sample], FrameKind::Kernel);
        assert!(
            !kernel
                .iter()
                .any(|function| function.contains("do_task_dead")),
            "a thread's exit counted as a block: {kernel:?}"
        );
    }
    assert!(
        by_thread.len() * 2 > CHURN_THREADS,
        "only {} of {CHURN_THREADS} churn threads were seen",
        by_thread.len()
    );
    // A 2 ms sleep, and on a loaded machine a wait for the CPU: never the
    // seconds to the window's end that a thread's death would add.
    let longest = by_thread.values().max().copied().unwrap_or(0);
    assert!(
        longest < 1_000_000_000,
        "a short-lived thread was blocked {longest} ns"
    );
    let total: u64 = by_thread.values().sum();
    assert!(
        total < CHURN_THREADS as u64 * 10_000_000,
        "{total} ns blocked in {CHURN_THREADS} threads of 2 ms"
    );
    assert!(
        churn
            .iter()
            .any(|sample| functions(&[sample], FrameKind::User)
                .iter()
                .any(|function| function == "workload::ff_churn_sleep")),
        "the churn threads' own frame is named"
    );

    let churner: Vec<&Sample> = samples_of(profile, "ff-churner")
        .into_iter()
        .filter(|sample| {
            functions(&[sample], FrameKind::User)
                .iter()
                .any(|function| function == "workload::ff_block_after_churn")
        })
        .collect();
    assert!(
        !churner.is_empty(),
        "the 2 s block after the churn is in the profile, named: {:?}",
        samples_of(profile, "ff-churner")
            .iter()
            .map(|sample| functions(&[sample], FrameKind::User))
            .collect::<Vec<_>>()
    );
    let blocked = Duration::from_nanos(churner.iter().map(|sample| sample.value).sum());
    assert_close("ff-churner", blocked, Duration::from_secs(2), 0.10);
    assert!(functions(&churner, FrameKind::Kernel)
        .iter()
        .any(|function| function.contains("nanosleep")));
    // It began after the churn, inside the window.
    assert!(profile.start <= churner_blocked_since);
}

#[test]
fn thread_churn_leaves_no_trace_in_a_one_shot_capture() {
    require_root();
    let dir = tempdir("churn");
    let mut workload = Workload::start();
    let output = dir.join("churn.pb.gz");
    let mut since = None;
    capture_for("40s", workload.pid, &[], &output, || {
        let announced = workload.command(&format!("churn {CHURN_THREADS}"), 1);
        since = Some(announced[0].since);
    });
    let profile = load(&output);
    assert_churn_profile(&profile, since.unwrap());
}

#[test]
fn thread_churn_leaves_no_trace_in_the_flight_recorder() {
    use freezeframe::capture::recorder::{
        CaptureRequest, Recorder, RecorderConfig, RecorderMode, WindowObserver,
    };
    use freezeframe::capture::CaptureConfig;
    use freezeframe::symbolize::SymbolizerThread;
    use std::sync::Arc;
    use std::time::SystemTime;

    require_root();
    let mut workload = Workload::start();
    let symbolizer = Arc::new(SymbolizerThread::start().unwrap());
    let learner = Arc::clone(&symbolizer);
    let recorder = Recorder::start(RecorderConfig {
        mode: RecorderMode::Armed,
        history: Duration::from_secs(60),
        tick: Duration::from_millis(250),
        capture: CaptureConfig::default(),
        observer: Some(WindowObserver(Arc::new(move |window| {
            learner.learn(window.clone())
        }))),
    })
    .expect("the recorder loads BPF programs: run as root");
    recorder.add_target(workload.pid).unwrap();
    let from = SystemTime::now();
    let announced = workload.command(&format!("churn {CHURN_THREADS}"), 1);
    let answer = recorder
        .capture(CaptureRequest {
            target: workload.pid,
            from,
            until: announced[0].since + Duration::from_secs(4),
        })
        .unwrap();
    let window = answer
        .recv_timeout(Duration::from_secs(60))
        .expect("the capture is answered")
        .expect("the capture succeeds");
    assert!(
        workload.child.try_wait().unwrap().is_some(),
        "the workload has exited before the capture is symbolized"
    );
    let profile = symbolizer.profiles(window).unwrap().off_cpu;
    assert_churn_profile(&profile, announced[0].since);
}

/// The ids of the BPF programs a process holds, through its fds and links.
fn program_ids(pid: u32) -> std::collections::HashSet<u64> {
    let mut ids = std::collections::HashSet::new();
    for fdinfo in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let Ok(text) = std::fs::read_to_string(fdinfo.unwrap().path()) else {
            continue;
        };
        for line in text.lines() {
            if let Some(id) = line.strip_prefix("prog_id:") {
                ids.insert(id.trim().parse().unwrap());
            }
        }
    }
    ids
}

/// How often the kernel has run each of these programs (`run_cnt`, counted
/// while `kernel.bpf_stats_enabled` is on), by name.
fn program_runs(ids: &std::collections::HashSet<u64>) -> std::collections::HashMap<String, u64> {
    let shown = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .expect("bpftool (Debian's bpftool package)");
    assert!(shown.status.success());
    let programs: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    programs
        .as_array()
        .unwrap()
        .iter()
        .filter(|program| ids.contains(&program["id"].as_u64().unwrap()))
        .map(|program| {
            (
                program["name"].as_str().unwrap_or("?").to_string(),
                program["run_cnt"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Switches `kernel.bpf_stats_enabled` on while it lives.
struct BpfStats(String);

impl BpfStats {
    fn enable() -> Self {
        const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
        let was = std::fs::read_to_string(SYSCTL).unwrap();
        std::fs::write(SYSCTL, "1").unwrap();
        BpfStats(was)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", self.0.trim());
    }
}

#[test]
fn a_process_nobody_targets_runs_no_program_on_its_system_calls() {
    require_root();
    let dir = tempdir("neighbour");
    let idle = Workload::start();
    let output = dir.join("idle.pb.gz");
    const CALLS: u64 = 1_000_000;
    let _stats = BpfStats::enable();
    let mut child = freezeframe()
        .args([
            "capture",
            "--pid",
            &idle.pid.to_string(),
            "--duration",
            "20s",
            // Its own programs, attached by itself, are the ones counted:
            // on a shared probe another capture may have attached them.
            "--shared-probe-dir",
            "off",
        ])
        .arg("--output")
        .arg(&output)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    wait_attached(&mut stderr);
    let ids = program_ids(child.id());
    assert!(ids.len() >= 5, "the capture's programs: {ids:?}");
    let before = program_runs(&ids);
    // This test's own thread is the neighbour: a system call that never
    // blocks, over and over.
    for _ in 0..CALLS {
        // SAFETY: getppid has no preconditions.
        std::hint::black_box(unsafe { libc::syscall(libc::SYS_getppid) });
    }
    let runs: Vec<(String, u64)> = program_runs(&ids)
        .into_iter()
        .map(|(name, count)| {
            let earlier = before.get(&name).copied().unwrap_or(0);
            (name, count - earlier)
        })
        .collect();
    let _ = child.kill();
    let _ = child.wait();
    let total: u64 = runs.iter().map(|(_, count)| count).sum();
    // The machine's context switches, wake-ups and mmap_lock use still run
    // programs meanwhile; a hook on system calls would run one per call.
    assert!(
        total < CALLS / 100,
        "{total} program runs during {CALLS} system calls of a process nobody targets: {runs:?}"
    );
}

/// A JIT runtime's perf map (`/tmp/perf-PID.map`), removed when the test ends.
struct PerfMap(std::path::PathBuf);

impl PerfMap {
    fn of(pid: u32) -> Self {
        PerfMap(Path::new("/tmp").join(format!("perf-{pid}.map")))
    }
}

impl Drop for PerfMap {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The user functions of a sample, innermost first.
fn user_functions(sample: &Sample) -> Vec<&str> {
    sample
        .stack
        .iter()
        .filter(|frame| frame.kind == FrameKind::User)
        .flat_map(|frame| frame.lines.iter().map(|line| line.function.as_str()))
        .collect()
}

/// Asserts each sample names, innermost first, a function matching each of
/// `callees_first` (by `names`), callee before caller.
fn assert_calls(
    what: &str,
    samples: &[&Sample],
    callees_first: &[&str],
    names: impl Fn(&str, &str) -> bool,
) {
    assert!(!samples.is_empty(), "{what}: no samples");
    for sample in samples {
        let functions = user_functions(sample);
        let positions: Vec<Option<usize>> = callees_first
            .iter()
            .map(|wanted| functions.iter().position(|f| names(f, wanted)))
            .collect();
        assert!(
            positions.iter().all(Option::is_some) && positions.is_sorted(),
            "{what}: wanted {callees_first:?}, callee first, in {functions:?} (whole stack: {:?})",
            sample
                .stack
                .iter()
                .map(|frame| frame.function())
                .collect::<Vec<_>>()
        );
    }
}

/// The JVM's own threads, by the names HotSpot gives them.
const JVM_RUNTIME_THREADS: &[&str] = &[
    "GC Thread",
    "C1 CompilerThre",
    "C2 CompilerThre",
    "VM Thread",
];

#[test]
fn java_methods_compiled_by_the_jit_are_named_in_blocked_stacks() {
    require_root();
    let dir = tempdir("jvm");
    let output = dir.join("profile.pb.gz");
    let java = jvm_fixture_command();
    let jvm = Workload::start_with(java);
    let _perf_map = PerfMap::of(jvm.pid);
    let perfmap = Command::new("jcmd")
        .args([&jvm.pid.to_string(), "Compiler.perfmap"])
        .output()
        .expect("cannot run jcmd: install Debian's openjdk-17-jdk-headless");
    assert!(
        perfmap.status.success(),
        "jcmd Compiler.perfmap failed: {}",
        String::from_utf8_lossy(&perfmap.stdout)
    );
    capture(jvm.pid, &[], &output, || {});
    let profile = load(&output);

    // Each blocked in compiled code from before the capture to after it.
    let requests: Vec<&Sample> = profile
        .samples
        .iter()
        .filter(|sample| sample.labels.thread_name.starts_with("ff-request-"))
        .collect();
    let request_threads: HashSet<u32> = requests.iter().map(|s| s.labels.thread_id).collect();
    assert_eq!(
        request_threads.len(),
        4,
        "request threads: {request_threads:?}"
    );
    assert_calls(
        "the request threads",
        &requests,
        &[
            "JitRequests.lookupAccount(int)",
            "JitRequests.handleRequest(int)",
            "JitRequests.serveRequest(int)",
        ],
        |function, method| function.ends_with(method),
    );

    // The JVM's own threads block in the same glibc function: the stacks
    // below it are what tell a request thread from them.
    let runtime: Vec<&Sample> = profile
        .samples
        .iter()
        .filter(|sample| {
            JVM_RUNTIME_THREADS
                .iter()
                .any(|name| sample.labels.thread_name.starts_with(name))
        })
        .collect();
    assert!(
        !runtime.is_empty(),
        "no GC or compiler thread in the profile"
    );
    let request_stacks: HashSet<Vec<&str>> = requests.iter().map(|s| user_functions(s)).collect();
    for sample in &runtime {
        let functions = user_functions(sample);
        assert!(
            !request_stacks.contains(&functions)
                && !functions.iter().any(|f| f.contains("JitRequests.")),
            "{}'s stack looks like a request's: {functions:?}",
            sample.labels.thread_name
        );
    }
}

/// Whether `function` is the perf map's name of JavaScript function `name`:
/// V8 writes `JS:*name file:line:column` (`LazyCompile:*name ...` before
/// Node 20), `*` for optimized code.
fn names_js_function(function: &str, name: &str) -> bool {
    function
        .split_once(':')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|compiled| compiled.trim_start_matches(['*', '^', '~']) == name)
}

#[test]
fn javascript_functions_compiled_by_the_jit_are_named_in_blocked_stacks() {
    require_root();
    let dir = tempdir("node");
    let output = dir.join("profile.pb.gz");
    let mut node = Command::new("node");
    // V8 writes its code log (isolate-*-v8.log) into the working directory.
    node.current_dir(&dir)
        .args(["--perf-basic-prof", "--no-turbo-inlining"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jit_requests.js"));
    let mut node = Workload::start_with(node);
    let _perf_map = PerfMap::of(node.pid);
    let worker = node.next_announcement();
    capture(node.pid, &[], &output, || {});
    let profile = load(&output);

    let main: Vec<&Sample> = profile
        .samples
        .iter()
        .filter(|sample| sample.labels.thread_id == node.pid)
        .collect();
    assert_calls(
        "the main thread, in a synchronous read",
        &main,
        &["ffReadRequest", "ffHandleRequest", "ffServeRequest"],
        names_js_function,
    );
    let worker_samples: Vec<&Sample> = profile
        .samples
        .iter()
        .filter(|sample| sample.labels.thread_id == worker.tid)
        .collect();
    assert_calls(
        "the worker, in Atomics.wait",
        &worker_samples,
        &["ffWaitForJob", "ffAwaitJob"],
        names_js_function,
    );
}

/// The fixture's own functions each kind of thread blocks through,
/// innermost first, then the thread's start routine.
const O2_CHAINS: [(&str, &[&str]); 4] = [
    ("mutex", &["mutex_leaf", "mutex_mid", "mutex_top", "run"]),
    ("pipe", &["pipe_leaf", "pipe_mid", "pipe_top", "run"]),
    ("sleep", &["sleep_leaf", "sleep_mid", "sleep_top", "run"]),
    (
        "signal",
        &[
            "signal_handler_leaf",
            "signal_handler",
            "signal_leaf",
            "signal_mid",
            "signal_top",
            "run",
        ],
    ),
];

#[test]
fn stacks_without_frame_pointers_are_unwound_whole() {
    require_root();
    let dir = tempdir("unwound");
    let output = dir.join("profile.pb.gz");
    let mut workload = Workload::start_with(Command::new(blocked_o2_binary()));
    let mut announced = Vec::new();
    // `pre-*` threads are blocked before the capture begins, `post-*` ones
    // block during it.
    capture(workload.pid, &[], &output, || {
        announced = workload.command("go", O2_CHAINS.len());
    });
    assert!(announced
        .iter()
        .all(|thread| thread.name.starts_with("post-")));
    let profile = load(&output);
    let fixture = blocked_o2_binary().to_str().unwrap();
    for (kind, chain) in O2_CHAINS {
        let mut kernel_stacks = Vec::new();
        for prefix in ["pre", "post"] {
            let thread = format!("{prefix}-{kind}");
            // Its wait: the signal thread also spins before its signal,
            // and is preempted there (state R), which is no wait.
            let samples: Vec<&Sample> = samples_of(&profile, &thread)
                .into_iter()
                .filter(|sample| sample.labels.state == ThreadState::Sleeping)
                .collect();
            assert!(!samples.is_empty(), "no samples for {thread}");
            // Its known wait, through the chain's leaf. The thread also
            // waits briefly for the fixture's output lock as it announces
            // itself: a block shorter than the unwind threshold keeps the
            // frame-pointer walk, which in this code stops early, marked,
            // and invents nothing.
            let (waits, others): (Vec<&Sample>, Vec<&Sample>) =
                samples.into_iter().partition(|sample| {
                    functions(&[sample], FrameKind::User)
                        .iter()
                        .any(|f| f == chain[0])
                });
            assert!(!waits.is_empty(), "{thread} never waited in {}", chain[0]);
            for sample in others {
                let names = functions(&[sample], FrameKind::User);
                assert!(
                    names.iter().all(|name| !name.starts_with("[unknown]")),
                    "{thread}: {names:?}"
                );
            }
            for sample in waits {
                let user: Vec<&freezeframe::profile::Frame> = sample
                    .stack
                    .iter()
                    .filter(|frame| frame.kind != FrameKind::Kernel)
                    .collect();
                let names: Vec<&str> = user.iter().map(|frame| frame.function()).collect();
                // Whole: no marker, every frame named, down to the root.
                assert!(
                    user.iter().all(|frame| frame.kind == FrameKind::User),
                    "{thread}: a marker in {names:?}"
                );
                assert!(
                    names.iter().all(|name| !name.starts_with("[unknown]")),
                    "{thread}: {names:?}"
                );
                let root = names.iter().position(|&name| name == "start_thread");
                assert!(
                    root.is_some_and(|root| root + 2 >= names.len()),
                    "{thread}: start_thread is the root (or clone3's callee): {names:?}"
                );
                // No frame invented: the fixture's own frames are exactly
                // the chain it called through, in order, and every other
                // frame is glibc's.
                let file_of = |frame: &&freezeframe::profile::Frame| {
                    frame
                        .mapping
                        .map(|index| profile.mappings[index].file.as_str())
                };
                let own: Vec<&str> = user
                    .iter()
                    .filter(|frame| file_of(frame) == Some(fixture))
                    .map(|frame| frame.function())
                    .collect();
                assert_eq!(own, chain, "{thread}: {names:?}");
                assert!(
                    user.iter().all(|frame| {
                        file_of(frame)
                            .is_some_and(|file| file == fixture || file.contains("libc.so"))
                    }),
                    "{thread}: a frame outside the fixture and glibc: {names:?}"
                );
                kernel_stacks.push(functions(&[sample], FrameKind::Kernel));
            }
        }
        // One wait, one stack: blocked before the capture or during it,
        // the same wait shows the same kernel frames.
        kernel_stacks.dedup();
        assert_eq!(kernel_stacks.len(), 1, "{kind}: {kernel_stacks:?}");
    }
}
