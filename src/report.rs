//! The summary a human reads after a capture (and from `freezeframe report`):
//! which threads were blocked, for how long, and the call sites that
//! blocked them, heaviest first. For an address-space profile, the same
//! view in bytes and syscalls: which threads changed their address space,
//! by how much, and from where.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::{self, Write};

use crate::profile::labels::{Key, STACK_SEPARATOR};
use crate::profile::{Frame, FrameKind, Profile, ProfileKind, Sample, SampleLabels, ThreadState};

/// At most this many thread ids are listed under one stack; a thread pool
/// blocked in one place would otherwise fill the screen.
const MAX_THREADS_PER_STACK: usize = 8;

/// Renders `profile` as a plain-text summary:
///
/// 1. a header: the capture window, total blocked time, thread count;
/// 2. the `top` most blocked threads, with their time per state and the
///    share of the window they spent blocked;
/// 3. the `top` stacks with the most blocked time, identical stacks merged
///    across threads, each printed leaf first with its kernel and user
///    frames under separate headings;
/// 4. the profile's comments (drop counts and the like), if any.
///
/// An address-space profile reads the same way with sizes (KiB, MiB, GiB)
/// for times and syscalls for blocks, and without thread states.
pub fn summary(profile: &Profile, top: usize) -> String {
    let mut out = String::new();
    write_summary(&mut out, profile, top).expect("writing to a String cannot fail");
    out
}

fn write_summary(out: &mut String, profile: &Profile, top: usize) -> fmt::Result {
    let threads = thread_totals(profile);
    let stacks = stack_totals(profile);
    let total_value = profile.total_value();
    let total_count: u64 = profile.samples.iter().map(|sample| sample.count).sum();
    let words = Words::of(profile.kind);

    writeln!(
        out,
        "{} from {}, window {}",
        words.profile,
        humantime::format_rfc3339_seconds(profile.start),
        human_duration(duration_ns(profile)),
    )?;
    if profile.samples.is_empty() {
        writeln!(out, "{}", words.nothing)?;
    } else {
        writeln!(
            out,
            "{} {} in total across {} ({} in {} distinct {})",
            words.verb,
            words.amount(total_value),
            plural(threads.len(), "thread"),
            plural_u64(total_count, words.event),
            stacks.len(),
            if stacks.len() == 1 { "stack" } else { "stacks" },
        )?;
        match profile.kind {
            ProfileKind::OffCpu => write_threads(out, profile, &threads, top)?,
            ProfileKind::AddressSpace => write_thread_sizes(out, &threads, top)?,
        }
        write_stacks(out, profile.kind, &stacks, total_value, top)?;
    }

    if !profile.comments.is_empty() {
        writeln!(out, "\nNotes:")?;
        for comment in &profile.comments {
            writeln!(out, "  {comment}")?;
        }
    }
    Ok(())
}

/// How the summary speaks of one kind of profile.
struct Words {
    /// What the profile is, at the head of the summary.
    profile: &'static str,
    /// What the summary says of a profile without samples.
    nothing: &'static str,
    /// What the threads did, before the total.
    verb: &'static str,
    /// What a sample's count counts.
    event: &'static str,
    /// The thing ranked, after "by".
    measure: &'static str,
    /// The whole a stack's share is of, after "of all".
    whole: &'static str,
    kind: ProfileKind,
}

impl Words {
    fn of(kind: ProfileKind) -> Self {
        match kind {
            ProfileKind::OffCpu => Words {
                profile: "Off-CPU profile",
                nothing: "No thread was blocked long enough to be recorded.",
                verb: "Blocked",
                event: "block",
                measure: "blocked time",
                whole: "blocked time",
                kind,
            },
            ProfileKind::AddressSpace => Words {
                profile: "Address-space changes",
                nothing: "No thread changed its address space by enough to be recorded.",
                verb: "Changed",
                event: "call",
                measure: "size",
                whole: "bytes",
                kind,
            },
        }
    }

    /// A sample value in human units: a duration, or a size.
    fn amount(&self, value: u64) -> String {
        match self.kind {
            ProfileKind::OffCpu => human_duration(value),
            ProfileKind::AddressSpace => human_bytes(value),
        }
    }
}

/// The values of one thread over the whole window.
struct ThreadTotal<'a> {
    thread_id: u32,
    thread_name: &'a str,
    value: u64,
    count: u64,
    by_state: BTreeMap<ThreadState, u64>,
}

/// The values of one stack, over every thread that sampled it.
struct StackTotal<'a> {
    stack: &'a [Frame],
    value: u64,
    count: u64,
    /// (name, tid), sorted so that a pool's threads come out together.
    threads: BTreeSet<(&'a str, u32)>,
    by_state: BTreeMap<ThreadState, u64>,
    /// Kernel locks waited for in this stack, in words, with their time.
    lock_waits: BTreeMap<String, u64>,
}

/// How many frames of a stack an explanation quotes.
const EXPLAIN_FRAMES: usize = 32;

/// The kernel functions every sleeping thread's stack starts with; an
/// explanation starts below them, where the reason to sleep is.
const SCHEDULER: &[&str] = &[
    "__schedule",
    "schedule",
    "schedule_preempt_disabled",
    "schedule_timeout",
    "io_schedule",
    "preempt_schedule",
    "preempt_schedule_common",
];

/// A capture explained in sentences, for someone who has never read a
/// profile: which threads were blocked and for how long, on which lock,
/// who held it, for how long and in which call, and the largest
/// address-space change, with its size and caller. Built from the labels
/// and stacks of the profiles alone, so it explains saved files too.
pub fn explain(off_cpu: &Profile, address_space: Option<&Profile>) -> String {
    let mut out = String::new();
    write_explanation(&mut out, off_cpu, address_space).expect("writing to a String cannot fail");
    out
}

fn write_explanation(
    out: &mut String,
    off_cpu: &Profile,
    address_space: Option<&Profile>,
) -> fmt::Result {
    let threads = thread_totals(off_cpu);
    let largest =
        address_space.and_then(|profile| profile.samples.iter().max_by_key(|sample| sample.value));
    writeln!(
        out,
        "  {} of the process were off the CPU for {} in total during the {} captured \
         (idle threads waiting for work count too).",
        plural(threads.len(), "thread"),
        human_duration(off_cpu.total_value()),
        human_duration(duration_ns(off_cpu)),
    )?;

    // The lock most threads waited for, then the most time was lost to: a
    // freeze stops many threads on one lock, while an idle thread waiting
    // for work on its own condition variable stops only itself.
    let mut by_lock: BTreeMap<&str, (BTreeSet<u32>, u64)> = BTreeMap::new();
    for sample in &off_cpu.samples {
        if let Some(lock) = sample.labels.label(Key::Lock) {
            let (threads, waited) = by_lock.entry(lock).or_default();
            threads.insert(sample.labels.thread_id);
            *waited += sample.value;
        }
    }
    let chosen = by_lock
        .iter()
        .max_by_key(|(_, (threads, waited))| (threads.len(), *waited))
        .map(|(lock, (_, waited))| (*lock, *waited));
    if let Some((lock, waited)) = chosen {
        let waits: Vec<_> = off_cpu
            .samples
            .iter()
            .filter(|sample| sample.labels.label(Key::Lock) == Some(lock))
            .collect();
        let mut waiters: BTreeMap<(&str, u32), u64> = BTreeMap::new();
        for sample in &waits {
            *waiters
                .entry((&sample.labels.thread_name, sample.labels.thread_id))
                .or_default() += sample.value;
        }
        let mut waiters: Vec<_> = waiters.into_iter().collect();
        waiters.sort_by_key(|(_, ns)| Reverse(*ns));
        let what = if lock == "mmap_lock" {
            "the process's mmap_lock (the lock on its whole address space)".to_string()
        } else {
            format!("the kernel lock {lock}")
        };
        writeln!(
            out,
            "  {} of that was waiting for {what}, by {}:",
            human_duration(waited),
            plural(waiters.len(), "thread"),
        )?;
        for ((name, tid), ns) in waiters.iter().take(MAX_THREADS_PER_STACK) {
            writeln!(
                out,
                "    {} (tid {tid}) waited {}",
                display_name(name, *tid),
                human_duration(*ns)
            )?;
        }
        if let Some(heaviest) = waits.iter().max_by_key(|sample| sample.value) {
            let mode = heaviest
                .labels
                .label(Key::LockMode)
                .map_or(String::new(), |mode| format!(" for {mode}"));
            writeln!(out, "  They asked for it{mode} in:")?;
            let asked = heaviest
                .stack
                .iter()
                .filter(|frame| frame.kind != FrameKind::Truncated)
                .skip_while(|frame| {
                    frame.kind == FrameKind::Kernel && SCHEDULER.contains(&frame.function())
                });
            write_quoted_frames(out, asked)?;
        }
        // The hold they waited behind: the longest recorded, else the
        // owner the kernel named.
        let hold = waits
            .iter()
            .filter_map(|sample| {
                let ns: u64 = sample.labels.label(Key::LockHoldNs)?.parse().ok()?;
                Some((ns, &sample.labels))
            })
            .max_by_key(|(ns, _)| *ns);
        match hold {
            Some((ns, labels)) => {
                let tid = labels.label(Key::LockHolderTid).unwrap_or("?");
                let name = labels.label(Key::LockHolder).unwrap_or("");
                let mode = labels.label(Key::LockHolderMode).unwrap_or("?");
                let stack = labels.label(Key::LockHolderStack);
                // When the hold is the largest allocation's own call, its
                // stack is quoted once, with the allocation.
                let in_allocation = largest.is_some_and(|largest| {
                    largest.labels.thread_id.to_string() == tid
                        && stack.is_some_and(|stack| {
                            user_functions(largest)
                                .zip(stack.split(STACK_SEPARATOR))
                                .all(|(a, b)| a == b)
                        })
                });
                let taken = if in_allocation {
                    " in the address-space change below.".to_string()
                } else {
                    ", having taken it in:".to_string()
                };
                writeln!(
                    out,
                    "  {} (tid {tid}) held it ({mode}) for {}{taken}",
                    if name.is_empty() { "a thread" } else { name },
                    human_duration(ns),
                )?;
                if let (Some(stack), false) = (stack, in_allocation) {
                    write_stack(out, stack.split(STACK_SEPARATOR))?;
                }
            }
            None => {
                if let Some(tid) = waits
                    .iter()
                    .find_map(|sample| sample.labels.label(Key::LockHolderTid))
                {
                    let how = if waits
                        .iter()
                        .any(|sample| sample.labels.label(Key::LockHeldBy) == Some("waker"))
                    {
                        "Tid {tid} woke them: it let go of the lock."
                    } else {
                        "The kernel named tid {tid} as its holder."
                    };
                    writeln!(out, "  {}", how.replace("{tid}", tid))?;
                }
            }
        }
    } else {
        writeln!(
            out,
            "  None of it was spent waiting for a kernel lock that was recorded."
        )?;
    }

    match largest {
        Some(largest) => {
            let call = largest.labels.label(Key::Syscall).unwrap_or("system call");
            let took = largest
                .labels
                .label(Key::SyscallNs)
                .and_then(|ns| ns.parse().ok())
                .map_or(String::new(), |ns: u64| {
                    format!(", taking {}", human_duration(ns))
                });
            let calls = if largest.count == 1 {
                format!("in one {call}")
            } else {
                format!("in {} {call} calls", largest.count)
            };
            writeln!(
                out,
                "  The largest address-space change: {} (tid {}) moved {} {calls}{took}, called from:",
                display_name(&largest.labels.thread_name, largest.labels.thread_id),
                largest.labels.thread_id,
                human_bytes(largest.value),
            )?;
            write_stack(out, user_functions(largest))?;
        }
        None => writeln!(
            out,
            "  No large mmap, munmap, mremap, brk or madvise call was recorded."
        )?,
    }
    Ok(())
}

/// The user functions of a sample's stack, innermost first.
fn user_functions(sample: &Sample) -> impl Iterator<Item = &str> {
    sample
        .stack
        .iter()
        .filter(|frame| frame.kind == FrameKind::User)
        .flat_map(|frame| frame.lines.iter().map(|line| line.function.as_str()))
}

/// Function names of frames, innermost first, inlined ones included.
fn write_quoted_frames<'a>(
    out: &mut String,
    frames: impl Iterator<Item = &'a Frame>,
) -> fmt::Result {
    write_stack(
        out,
        frames.flat_map(|frame| frame.lines.iter().map(|line| line.function.as_str())),
    )
}

/// A stack as an explanation quotes it: innermost first, callers after
/// `<`, generic arguments left out, wrapped to a readable width, and
/// stopping where a Rust thread's start-up scaffolding begins.
fn write_stack<'a>(out: &mut String, functions: impl Iterator<Item = &'a str>) -> fmt::Result {
    const INDENT: &str = "      ";
    const WIDTH: usize = 100;
    let mut line = String::new();
    let functions = functions
        .take_while(|function| !function.ends_with("__rust_begin_short_backtrace"))
        .take(EXPLAIN_FRAMES);
    for (index, function) in functions.enumerate() {
        let name = without_generics(function);
        let piece = if index == 0 {
            name
        } else {
            format!("< {name}")
        };
        if !line.is_empty() && INDENT.len() + line.len() + 1 + piece.len() > WIDTH {
            writeln!(out, "{INDENT}{line}")?;
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&piece);
    }
    if !line.is_empty() {
        writeln!(out, "{INDENT}{line}")?;
    }
    Ok(())
}

/// `hashbrown::raw::RawTable<T,A>::reserve_rehash` without `<T,A>`: the
/// generic arguments that follow a name (or a `{closure#0}`). A leading
/// `<T as Trait>` stays.
fn without_generics(function: &str) -> String {
    let mut out = String::with_capacity(function.len());
    let mut depth = 0usize;
    let mut previous = ' ';
    for c in function.chars() {
        match c {
            '<' if depth > 0
                || previous.is_alphanumeric()
                || previous == '_'
                || previous == '}' =>
            {
                depth += 1
            }
            '>' if depth > 0 => depth -= 1,
            _ if depth > 0 => {}
            _ => out.push(c),
        }
        if depth == 0 && c != '>' {
            previous = c;
        }
    }
    out
}

fn display_name(name: &str, tid: u32) -> String {
    if name.is_empty() {
        format!("thread {tid}")
    } else {
        name.to_string()
    }
}

/// The kernel lock a sample waited for, in words, from its `lock*` labels.
fn lock_wait(labels: &SampleLabels) -> Option<String> {
    let label = |key: Key| labels.label(key);
    let mut text = label(Key::Lock)?.to_string();
    if let Some(mode) = label(Key::LockMode) {
        text.push_str(&format!(" for {mode}"));
    }
    if let Some(holder) = label(Key::LockHolderTid) {
        let how = match label(Key::LockHeldBy) {
            Some("readers") => " (last reader in)",
            Some("waker") => " (who woke it)",
            _ => "",
        };
        text.push_str(&format!(", held by tid {holder}{how}"));
    }
    Some(text)
}

/// Threads, largest value first; ties keep the order of first appearance.
fn thread_totals(profile: &Profile) -> Vec<ThreadTotal<'_>> {
    let mut totals: Vec<ThreadTotal> = Vec::new();
    let mut position: HashMap<(u32, u32), usize> = HashMap::new();
    for sample in &profile.samples {
        let labels = &sample.labels;
        let index = *position
            .entry((labels.process_id, labels.thread_id))
            .or_insert_with(|| {
                totals.push(ThreadTotal {
                    thread_id: labels.thread_id,
                    thread_name: &labels.thread_name,
                    value: 0,
                    count: 0,
                    by_state: BTreeMap::new(),
                });
                totals.len() - 1
            });
        let total = &mut totals[index];
        total.value += sample.value;
        total.count += sample.count;
        *total.by_state.entry(labels.state).or_default() += sample.value;
    }
    totals.sort_by_key(|total| Reverse(total.value));
    totals
}

/// Distinct stacks, largest value first; ties keep the order of first
/// appearance.
fn stack_totals(profile: &Profile) -> Vec<StackTotal<'_>> {
    let mut totals: Vec<StackTotal> = Vec::new();
    let mut position: HashMap<&[Frame], usize> = HashMap::new();
    for sample in &profile.samples {
        let index = *position.entry(&sample.stack).or_insert_with(|| {
            totals.push(StackTotal {
                stack: &sample.stack,
                value: 0,
                count: 0,
                threads: BTreeSet::new(),
                by_state: BTreeMap::new(),
                lock_waits: BTreeMap::new(),
            });
            totals.len() - 1
        });
        let total = &mut totals[index];
        total.value += sample.value;
        total.count += sample.count;
        total
            .threads
            .insert((&sample.labels.thread_name, sample.labels.thread_id));
        *total.by_state.entry(sample.labels.state).or_default() += sample.value;
        if let Some(wait) = lock_wait(&sample.labels) {
            *total.lock_waits.entry(wait).or_default() += sample.value;
        }
    }
    totals.sort_by_key(|total| Reverse(total.value));
    totals
}

/// The threads of an off-CPU profile: blocked time, its share of the
/// window, and how it splits by state.
fn write_threads(
    out: &mut String,
    profile: &Profile,
    threads: &[ThreadTotal],
    top: usize,
) -> fmt::Result {
    let shown = &threads[..top.min(threads.len())];
    let name_width = shown
        .iter()
        .map(|thread| thread.thread_name.chars().count())
        .max();
    let name_width = name_width.unwrap_or(0).max("NAME".len());
    let window_ns = duration_ns(profile);

    writeln!(out, "\nThreads by blocked time:")?;
    writeln!(
        out,
        "  {:>8}  {:<name_width$}  {:>9}  {:>9}  STATES",
        "TID", "NAME", "BLOCKED", "OF WINDOW"
    )?;
    for thread in shown {
        let states: Vec<String> = thread
            .by_state
            .iter()
            .map(|(state, &blocked_ns)| format!("{state} {}", human_duration(blocked_ns)))
            .collect();
        writeln!(
            out,
            "  {:>8}  {:<name_width$}  {:>9}  {:>9}  {}",
            thread.thread_id,
            thread.thread_name,
            human_duration(thread.value),
            percent(thread.value, window_ns),
            states.join(", "),
        )?;
    }
    if let Some(rest) = threads.get(shown.len()..).filter(|rest| !rest.is_empty()) {
        let rest_ns = rest.iter().map(|thread| thread.value).sum();
        writeln!(
            out,
            "  ... and {}, blocked {} together",
            plural(rest.len(), "more thread"),
            human_duration(rest_ns),
        )?;
    }
    Ok(())
}

/// The threads of an address-space profile: bytes changed and in how many
/// syscalls. A share of the window would mean nothing for bytes, and the
/// thread was running when it made the calls, so states say nothing new.
fn write_thread_sizes(out: &mut String, threads: &[ThreadTotal], top: usize) -> fmt::Result {
    let shown = &threads[..top.min(threads.len())];
    let name_width = shown
        .iter()
        .map(|thread| thread.thread_name.chars().count())
        .max();
    let name_width = name_width.unwrap_or(0).max("NAME".len());

    writeln!(out, "\nThreads by size:")?;
    writeln!(
        out,
        "  {:>8}  {:<name_width$}  {:>10}  {:>6}",
        "TID", "NAME", "SIZE", "CALLS"
    )?;
    for thread in shown {
        writeln!(
            out,
            "  {:>8}  {:<name_width$}  {:>10}  {:>6}",
            thread.thread_id,
            thread.thread_name,
            human_bytes(thread.value),
            thread.count,
        )?;
    }
    if let Some(rest) = threads.get(shown.len()..).filter(|rest| !rest.is_empty()) {
        let rest_bytes = rest.iter().map(|thread| thread.value).sum();
        writeln!(
            out,
            "  ... and {}, {} together",
            plural(rest.len(), "more thread"),
            human_bytes(rest_bytes),
        )?;
    }
    Ok(())
}

fn write_stacks(
    out: &mut String,
    kind: ProfileKind,
    stacks: &[StackTotal],
    total_value: u64,
    top: usize,
) -> fmt::Result {
    let words = Words::of(kind);
    let shown = &stacks[..top.min(stacks.len())];
    writeln!(
        out,
        "\nTop {} of {} stacks by {}:",
        shown.len(),
        stacks.len(),
        words.measure,
    )?;
    for (rank, stack) in (1..).zip(shown) {
        writeln!(
            out,
            "\n#{rank}  {} in {} ({} of all {})",
            words.amount(stack.value),
            plural_u64(stack.count, words.event),
            percent(stack.value, total_value),
            words.whole,
        )?;
        writeln!(out, "    threads: {}", thread_list(&stack.threads))?;
        if kind == ProfileKind::OffCpu {
            write_blocking(out, stack)?;
        }
        write_frames(out, stack.stack)?;
    }
    Ok(())
}

/// How an off-CPU stack's time splits by state, and the locks it waited
/// for longest.
fn write_blocking(out: &mut String, stack: &StackTotal) -> fmt::Result {
    let states: Vec<String> = stack
        .by_state
        .iter()
        .map(|(state, &blocked_ns)| format!("{state} {}", human_duration(blocked_ns)))
        .collect();
    writeln!(out, "    states:  {}", states.join(", "))?;
    let mut waits: Vec<(&String, &u64)> = stack.lock_waits.iter().collect();
    waits.sort_by_key(|(_, blocked_ns)| Reverse(**blocked_ns));
    for (wait, blocked_ns) in waits.into_iter().take(3) {
        writeln!(out, "    waiting: {wait} ({})", human_duration(*blocked_ns))?;
    }
    Ok(())
}

/// Writes a stack leaf first, opening a `kernel:` or `user:` heading each
/// time the walk crosses between the two.
fn write_frames(out: &mut String, stack: &[Frame]) -> fmt::Result {
    if stack.is_empty() {
        writeln!(out, "    (no stack was recorded)")?;
    }
    let mut heading = None;
    for frame in stack {
        let section = if frame.kind == FrameKind::Kernel {
            "kernel:"
        } else {
            "user:"
        };
        if heading != Some(section) {
            writeln!(out, "    {section}")?;
            heading = Some(section);
        }
        if frame.kind == FrameKind::Truncated {
            let why = if frame.function() == crate::profile::NOT_READ_FRAME {
                "... not read in time: the process's memory was locked (a freeze in progress?)"
            } else {
                "... truncated: the callers could not be walked (no unwind tables or frame pointers?)"
            };
            writeln!(out, "      {why}")?;
            continue;
        }
        // Innermost first, like the stack itself; all but the last line were
        // inlined into the one after them.
        for (position, line) in frame.lines.iter().enumerate() {
            write!(out, "      {}", line.function)?;
            match (&line.file, line.line) {
                (Some(file), Some(number)) => write!(out, " at {file}:{number}")?,
                (Some(file), None) => write!(out, " at {file}")?,
                (None, _) => {}
            }
            if position + 1 < frame.lines.len() {
                out.push_str(" (inlined)");
            }
            out.push('\n');
        }
    }
    Ok(())
}

/// `worker (101, 102), reader (103)`, capped at a few thread ids.
fn thread_list(threads: &BTreeSet<(&str, u32)>) -> String {
    let mut by_name: Vec<(&str, Vec<String>)> = Vec::new();
    for &(name, thread_id) in threads.iter().take(MAX_THREADS_PER_STACK) {
        let name = if name.is_empty() { "?" } else { name };
        match by_name.last_mut() {
            Some((last, thread_ids)) if *last == name => thread_ids.push(thread_id.to_string()),
            _ => by_name.push((name, vec![thread_id.to_string()])),
        }
    }
    let mut list: Vec<String> = by_name
        .into_iter()
        .map(|(name, thread_ids)| format!("{name} ({})", thread_ids.join(", ")))
        .collect();
    if threads.len() > MAX_THREADS_PER_STACK {
        list.push(format!(
            "and {} more",
            threads.len() - MAX_THREADS_PER_STACK
        ));
    }
    list.join(", ")
}

fn duration_ns(profile: &Profile) -> u64 {
    u64::try_from(profile.duration.as_nanos()).unwrap_or(u64::MAX)
}

/// A duration as a person reads it: `12.03 s`, `340 ms`, `2.5 ms`, `85 µs`.
pub fn human_duration(ns: u64) -> String {
    // Units switch where rounding would otherwise print `1000 ms`.
    let value = ns as f64;
    if ns >= 999_500_000 {
        format!("{:.2} s", value / 1e9)
    } else if ns >= 999_500 {
        short(value / 1e6, "ms")
    } else if ns >= 1_000 {
        short(value / 1e3, "µs")
    } else {
        format!("{ns} ns")
    }
}

/// A size as a person reads it, in binary units: `3.26 GiB`, `192 MiB`,
/// `1.5 KiB`, `512 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    // Units switch where rounding would otherwise print `1024 MiB`.
    while value >= 1023.5 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    // From GiB up, the hundredths are still hundreds of MiB.
    if unit >= 2 {
        format!("{value:.2} {}", UNITS[unit])
    } else {
        short(value, UNITS[unit])
    }
}

/// Whole numbers from 10 up, one decimal below, which is all the precision
/// a blocked time or a size in KiB or MiB needs.
fn short(value: f64, unit: &str) -> String {
    if value >= 9.95 {
        format!("{value:.0} {unit}")
    } else {
        format!("{value:.1} {unit}")
    }
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".to_string();
    }
    format!("{:.1}%", part as f64 * 100.0 / whole as f64)
}

fn plural(count: usize, noun: &str) -> String {
    plural_u64(count as u64, noun)
}

fn plural_u64(count: u64, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::profile::{Line, ProfileKind, Sample, SampleLabels};

    fn frame(kind: FrameKind, function: &str, file: Option<&str>, line: Option<u32>) -> Frame {
        Frame {
            kind,
            address: 0x1000,
            mapping: None,
            lines: vec![Line {
                function: function.to_string(),
                file: file.map(str::to_string),
                line,
            }],
        }
    }

    fn sample(
        thread_id: u32,
        name: &str,
        state: ThreadState,
        stack: Vec<Frame>,
        blocked_ns: u64,
    ) -> Sample {
        Sample {
            stack,
            value: blocked_ns,
            count: 2,
            labels: SampleLabels {
                process_id: 100,
                thread_id,
                thread_name: name.to_string(),
                state,
                extra: Vec::new(),
                foreign: Vec::new(),
            },
            timeline: Vec::new(),
        }
    }

    fn profile() -> Profile {
        let mut inlined = frame(
            FrameKind::User,
            "hashbrown::reserve",
            Some("map.rs"),
            Some(40),
        );
        inlined.lines.push(Line {
            function: "app::insert".to_string(),
            file: Some("src/app.rs".to_string()),
            line: Some(7),
        });
        let lock_stack = vec![
            frame(FrameKind::Kernel, "schedule", None, None),
            frame(FrameKind::Kernel, "futex_wait", None, None),
            inlined,
            frame(FrameKind::User, "main", Some("src/main.rs"), None),
        ];
        let read_stack = vec![
            frame(FrameKind::Kernel, "io_schedule", None, None),
            frame(FrameKind::User, "read", None, None),
            Frame::marker_truncated(),
        ];
        Profile {
            kind: ProfileKind::OffCpu,
            start: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            duration: Duration::from_secs(20),
            samples: vec![
                sample(12, "reader", ThreadState::Disk, read_stack, 340_000_000),
                sample(
                    11,
                    "worker",
                    ThreadState::Sleeping,
                    lock_stack.clone(),
                    12_030_000_000,
                ),
                sample(13, "worker", ThreadState::Runnable, lock_stack, 85_000),
            ],
            mappings: Vec::new(),
            comments: vec!["dropped 3 events".to_string()],
        }
    }

    /// A 3.5 GB map rehash in two threads and two mmaps in a third.
    fn address_space_profile() -> Profile {
        let mut inlined = frame(
            FrameKind::User,
            "hashbrown::raw::RawTable<T,A>::reserve_rehash",
            Some("raw/mod.rs"),
            Some(1083),
        );
        inlined.lines.push(Line {
            function: "app::insert".to_string(),
            file: Some("src/app.rs".to_string()),
            line: Some(7),
        });
        let rehash_stack = vec![
            inlined,
            frame(FrameKind::User, "main", Some("src/main.rs"), None),
        ];
        let mmap_stack = vec![
            frame(FrameKind::User, "mmap64", None, None),
            Frame::marker_truncated(),
        ];
        let calls = |count, sample: Sample| Sample { count, ..sample };
        let running = ThreadState::Runnable;
        Profile {
            kind: ProfileKind::AddressSpace,
            samples: vec![
                calls(2, sample(12, "loader", running, mmap_stack, 192 << 20)),
                calls(
                    1,
                    sample(11, "worker", running, rehash_stack.clone(), 3_500_000_000),
                ),
                calls(1, sample(13, "worker", running, rehash_stack, 64 << 20)),
            ],
            ..profile()
        }
    }

    /// Asserts that `needles` occur in `text` in this order.
    fn assert_in_order(text: &str, needles: &[&str]) {
        let mut from = 0;
        for needle in needles {
            let found = text[from..].find(needle);
            assert!(
                found.is_some(),
                "{needle:?} missing after byte {from} in:\n{text}"
            );
            from += found.unwrap() + needle.len();
        }
    }

    #[test]
    fn summary_reads_header_threads_stacks_then_notes() {
        let text = summary(&profile(), 10);
        assert_in_order(
            &text,
            &[
                "Off-CPU profile from 2023-11-14T22:13:20Z, window 20.00 s",
                "Blocked 12.37 s in total across 3 threads (6 blocks in 2 distinct stacks)",
                "Threads by blocked time:",
                "       TID  NAME      BLOCKED  OF WINDOW  STATES",
                "        11  worker    12.03 s      60.1%  S 12.03 s",
                "        12  reader     340 ms       1.7%  D 340 ms",
                "        13  worker      85 µs       0.0%  R 85 µs",
                "Top 2 of 2 stacks by blocked time:",
                "#1  12.03 s in 4 blocks (97.3% of all blocked time)",
                "threads: worker (11, 13)",
                "states:  R 85 µs, S 12.03 s",
                "kernel:",
                "schedule",
                "futex_wait",
                "user:",
                "hashbrown::reserve at map.rs:40 (inlined)",
                "app::insert at src/app.rs:7\n",
                "main at src/main.rs\n",
                "#2  340 ms in 2 blocks (2.7% of all blocked time)",
                "threads: reader (12)",
                "kernel:",
                "io_schedule",
                "user:",
                "read\n",
                "... truncated: the callers could not be walked",
                "Notes:",
                "dropped 3 events",
            ],
        );
    }

    #[test]
    fn an_address_space_summary_speaks_of_sizes_and_calls() {
        let text = summary(&address_space_profile(), 10);
        assert_in_order(
            &text,
            &[
                "Address-space changes from 2023-11-14T22:13:20Z, window 20.00 s",
                "Changed 3.51 GiB in total across 3 threads (4 calls in 2 distinct stacks)",
                "Threads by size:",
                "       TID  NAME          SIZE   CALLS",
                "        11  worker    3.26 GiB       1",
                "        12  loader     192 MiB       2",
                "        13  worker      64 MiB       1",
                "Top 2 of 2 stacks by size:",
                "#1  3.32 GiB in 2 calls (94.7% of all bytes)",
                "threads: worker (11, 13)",
                "user:",
                "hashbrown::raw::RawTable<T,A>::reserve_rehash at raw/mod.rs:1083 (inlined)",
                "app::insert at src/app.rs:7\n",
                "main at src/main.rs\n",
                "#2  192 MiB in 2 calls (5.3% of all bytes)",
                "threads: loader (12)",
                "mmap64\n",
                "... truncated",
                "Notes:",
            ],
        );
        for off_cpu_only in ["Blocked", "blocked", "states:", "OF WINDOW", " ms", " s "] {
            assert!(!text.contains(off_cpu_only), "{off_cpu_only:?} in:\n{text}");
        }
    }

    #[test]
    fn an_address_space_summary_is_capped_and_says_when_empty() {
        let text = summary(&address_space_profile(), 1);
        assert!(
            text.contains("... and 2 more threads, 256 MiB together"),
            "{text}"
        );
        let mut empty = address_space_profile();
        empty.samples.clear();
        let text = summary(&empty, 10);
        assert!(
            text.contains("No thread changed its address space by enough to be recorded."),
            "{text}"
        );
        assert!(!text.contains("Threads by"), "{text}");
    }

    #[test]
    fn sizes_are_humanized_in_binary_units() {
        let cases = [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (1_047_552, "1023 KiB"),
            (1_048_064, "1.0 MiB"),
            (64 << 20, "64 MiB"),
            (3_500_000_000, "3.26 GiB"),
            (12 << 30, "12.00 GiB"),
            (u64::MAX, "16.00 EiB"),
        ];
        for (bytes, text) in cases {
            assert_eq!(human_bytes(bytes), text, "{bytes} bytes");
        }
    }

    #[test]
    fn top_limits_threads_and_stacks() {
        let text = summary(&profile(), 1);
        assert!(
            text.contains("... and 2 more threads, blocked 340 ms together"),
            "{text}"
        );
        assert!(text.contains("Top 1 of 2 stacks"), "{text}");
        assert!(!text.contains("#2"), "{text}");
    }

    #[test]
    fn empty_profile_says_so() {
        let mut empty = profile();
        empty.samples.clear();
        empty.comments.clear();
        let text = summary(&empty, 10);
        assert!(text.contains("No thread was blocked"), "{text}");
        assert!(!text.contains("Threads by"), "{text}");
    }

    #[test]
    fn many_threads_under_one_stack_are_capped() {
        let stack = vec![frame(FrameKind::Kernel, "schedule", None, None)];
        let samples = (1..=10)
            .map(|tid| sample(tid, "pool", ThreadState::Sleeping, stack.clone(), 1_000))
            .collect();
        let text = summary(
            &Profile {
                samples,
                ..profile()
            },
            3,
        );
        assert!(
            text.contains("threads: pool (1, 2, 3, 4, 5, 6, 7, 8), and 2 more"),
            "{text}"
        );
    }

    #[test]
    fn durations_are_humanized() {
        let cases = [
            (12_030_000_000, "12.03 s"),
            (999_600_000, "1.00 s"),
            (340_000_000, "340 ms"),
            (2_500_000, "2.5 ms"),
            (85_000, "85 µs"),
            (999, "999 ns"),
        ];
        for (ns, text) in cases {
            assert_eq!(human_duration(ns), text);
        }
    }

    #[test]
    fn lock_waits_are_put_in_words() {
        let mut labels = SampleLabels::default();
        assert_eq!(lock_wait(&labels), None);
        labels.set(Key::Lock, "mmap_lock");
        labels.set(Key::LockMode, "write");
        labels.set(Key::LockHolderTid, "4242");
        labels.set(Key::LockHeldBy, "readers");
        assert_eq!(
            lock_wait(&labels).as_deref(),
            Some("mmap_lock for write, held by tid 4242 (last reader in)")
        );
    }

    fn labelled(mut sample: Sample, labels: &[(&str, &str)]) -> Sample {
        sample.labels.extra = labels
            .iter()
            .map(|(key, value)| {
                let key = Key::from_name(key).expect("a label of the schema");
                (key, value.to_string())
            })
            .collect();
        sample
    }

    /// What a request thread that waited behind feeddb's resizing writer
    /// carries: the lock, and the hold it waited behind.
    const WRITER_HOLD: [(&str, &str); 6] = [
        ("lock", "mmap_lock"),
        ("lock_holder_tid", "10"),
        ("lock_holder", "feeddb-writer"),
        ("lock_holder_mode", "read"),
        ("lock_hold_ns", "352000000"),
        (
            "lock_holder_stack",
            "feeddb::mapping::map < hashbrown::raw::RawTable<T>::reserve_rehash",
        ),
    ];

    #[test]
    fn an_explanation_names_waiters_lock_holder_and_allocation() {
        let waiting = vec![
            frame(FrameKind::Kernel, "__schedule", None, None),
            frame(FrameKind::Kernel, "schedule", None, None),
            frame(FrameKind::Kernel, "rwsem_down_write_slowpath", None, None),
            frame(FrameKind::Kernel, "vm_mmap_pgoff", None, None),
            frame(FrameKind::User, "feeddb::requests::respond", None, None),
        ];
        let hold = [&[("lock_mode", "write")][..], &WRITER_HOLD].concat();
        let mut off_cpu = profile();
        off_cpu.samples = vec![
            labelled(
                sample(
                    11,
                    "feeddb-req-0",
                    ThreadState::Disk,
                    waiting.clone(),
                    350_000_000,
                ),
                &hold,
            ),
            labelled(
                sample(12, "feeddb-req-1", ThreadState::Disk, waiting, 340_000_000),
                &hold,
            ),
            // An idle thread waiting for work on its own condition
            // variable: longer, but one thread, so not the freeze.
            labelled(
                sample(13, "idle", ThreadState::Sleeping, Vec::new(), 5_000_000_000),
                &[
                    ("lock", "futex@0x10"),
                    ("lock_holder_tid", "14"),
                    ("lock_held_by", "waker"),
                ],
            ),
        ];
        let mut allocations = profile();
        allocations.kind = ProfileKind::AddressSpace;
        allocations.samples = vec![
            labelled(
                sample(
                    10,
                    "feeddb-writer",
                    ThreadState::Runnable,
                    vec![frame(
                        FrameKind::User,
                        "hashbrown::raw::RawTable<T>::reserve_rehash",
                        None,
                        None,
                    )],
                    1_140_850_704,
                ),
                &[("syscall", "mmap"), ("syscall_ns", "360000000")],
            ),
            labelled(
                sample(
                    10,
                    "feeddb-writer",
                    ThreadState::Runnable,
                    Vec::new(),
                    570_425_360,
                ),
                &[("syscall", "munmap"), ("syscall_ns", "80000000")],
            ),
        ];
        for sample in &mut allocations.samples {
            sample.count = 1;
        }

        let text = explain(&off_cpu, Some(&allocations));
        let expected = [
            "3 threads of the process were off the CPU for 5.69 s in total",
            "690 ms of that was waiting for the process's mmap_lock (the lock on its whole address space), by 2 threads:",
            "feeddb-req-0 (tid 11) waited 350 ms",
            "feeddb-req-1 (tid 12) waited 340 ms",
            "They asked for it for write in:\n      rwsem_down_write_slowpath < vm_mmap_pgoff < feeddb::requests::respond\n",
            "feeddb-writer (tid 10) held it (read) for 352 ms, having taken it in:\n      feeddb::mapping::map < hashbrown::raw::RawTable::reserve_rehash\n",
            "feeddb-writer (tid 10) moved 1.06 GiB in one mmap, taking 360 ms, called from:\n      hashbrown::raw::RawTable::reserve_rehash\n",
        ];
        for line in expected {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }

    #[test]
    fn an_explanation_without_locks_or_allocations_says_so() {
        let text = explain(&profile(), None);
        assert!(
            text.contains("None of it was spent waiting for a kernel lock"),
            "{text}"
        );
        assert!(
            text.contains("No large mmap, munmap, mremap, brk or madvise call was recorded"),
            "{text}"
        );
    }

    #[test]
    fn quoted_stacks_drop_generic_arguments_and_wrap() {
        assert_eq!(
            without_generics("hashbrown::raw::RawTable<(u64, u64)>::reserve_rehash<F>"),
            "hashbrown::raw::RawTable::reserve_rehash"
        );
        assert_eq!(
            without_generics("<alloc::boxed::Box<F, A> as core::ops::FnOnce<Args>>::call_once"),
            "<alloc::boxed::Box as core::ops::FnOnce>::call_once"
        );
        assert_eq!(without_generics("{closure#0}<u64>"), "{closure#0}");
        let mut out = String::new();
        let long = ["a_fairly_long_function_name_number_one"; 6];
        write_stack(&mut out, long.into_iter()).unwrap();
        assert!(out.lines().count() > 1, "{out}");
        assert!(
            out.lines()
                .all(|line| line.len() <= 100 && line.starts_with("      ")),
            "{out}"
        );
        assert_eq!(out.matches("a_fairly").count(), 6);
    }

    #[test]
    fn a_hold_inside_the_largest_allocation_is_quoted_once() {
        let call = vec![
            frame(FrameKind::User, "feeddb::mapping::map", None, None),
            frame(
                FrameKind::User,
                "hashbrown::raw::RawTable<T>::reserve_rehash",
                None,
                None,
            ),
        ];
        let mut off_cpu = profile();
        off_cpu.samples = vec![labelled(
            sample(
                11,
                "feeddb-req-0",
                ThreadState::Disk,
                Vec::new(),
                350_000_000,
            ),
            &WRITER_HOLD,
        )];
        let mut allocations = profile();
        allocations.kind = ProfileKind::AddressSpace;
        allocations.samples = vec![labelled(
            sample(10, "feeddb-writer", ThreadState::Runnable, call, 1 << 30),
            &[("syscall", "mmap")],
        )];
        let text = explain(&off_cpu, Some(&allocations));
        assert!(
            text.contains("feeddb-writer (tid 10) held it (read) for 352 ms in the address-space change below."),
            "{text}"
        );
        assert_eq!(text.matches("reserve_rehash").count(), 1, "{text}");
    }
}
