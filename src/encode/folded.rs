//! Brendan Gregg's folded stacks, in the shape `offcputime -f` prints them:
//!
//! ```text
//! worker;main;run;std::thread::sleep;entry_SYSCALL_64;do_nanosleep;schedule 1500
//! ```
//!
//! The thread name comes first, then the user frames root to leaf, then the
//! kernel frames root to leaf; the number is in the [`unit`] of the
//! profile's kind: blocked time in microseconds, or bytes of address space.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::profile::{Profile, ProfileKind, Sample};

/// Encodes `profile` as folded stacks, one line per distinct stack, sorted.
///
/// Each value is summed over every sample that folds to the same line. For
/// off-CPU time it is the **blocked time in microseconds** (rounded to the
/// nearest µs; lines under half a microsecond are left out, as a `0` would
/// only add noise); for address-space changes it is **bytes**. Inlined
/// functions appear as frames of their own, outer function first.
pub fn encode(profile: &Profile) -> String {
    let mut value_by_stack: BTreeMap<String, u64> = BTreeMap::new();
    for sample in &profile.samples {
        let value = value_by_stack.entry(fold(sample)).or_default();
        *value = value.saturating_add(sample.value);
    }
    let mut folded = String::new();
    for (stack, value) in value_by_stack {
        let shown = match profile.kind {
            ProfileKind::OffCpu => value.saturating_add(500) / 1000,
            ProfileKind::AddressSpace => value,
        };
        if shown > 0 {
            writeln!(folded, "{stack} {shown}").expect("writing to a String cannot fail");
        }
    }
    folded
}

/// The unit of the numbers [`encode`] writes for a profile of `kind`, as
/// flame graph tools name it.
pub fn unit(kind: ProfileKind) -> &'static str {
    match kind {
        ProfileKind::OffCpu => "us",
        ProfileKind::AddressSpace => "bytes",
    }
}

/// The stack part of a folded line: thread, then frames root first.
fn fold(sample: &Sample) -> String {
    let mut stack = String::new();
    if sample.labels.thread_name.is_empty() {
        write!(stack, "tid {}", sample.labels.thread_id).expect("writing to a String cannot fail");
    } else {
        push_frame(&mut stack, &sample.labels.thread_name);
    }
    // Stacks and inline chains are both stored innermost first.
    for line in sample
        .stack
        .iter()
        .rev()
        .flat_map(|frame| frame.lines.iter().rev())
    {
        stack.push(';');
        push_frame(&mut stack, &line.function);
    }
    stack
}

/// Appends one frame name, replacing the characters that would break the
/// line format: `;` separates frames (Rust types such as `[u8; 4]` contain
/// it) and a line break would end the record.
fn push_frame(stack: &mut String, name: &str) {
    stack.extend(name.chars().map(|c| match c {
        ';' => ',',
        '\n' | '\r' => ' ',
        c => c,
    }));
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::profile::{Frame, FrameKind, Line, ProfileKind, SampleLabels};

    fn frame(kind: FrameKind, functions: &[&str]) -> Frame {
        Frame {
            kind,
            address: 0x1000,
            mapping: None,
            lines: functions
                .iter()
                .map(|function| Line {
                    function: function.to_string(),
                    file: None,
                    line: None,
                })
                .collect(),
        }
    }

    fn sample(thread_name: &str, stack: Vec<Frame>, blocked_ns: u64) -> Sample {
        Sample {
            stack,
            value: blocked_ns,
            count: 1,
            labels: SampleLabels {
                thread_id: 7,
                thread_name: thread_name.to_string(),
                ..SampleLabels::default()
            },
            timeline: Vec::new(),
        }
    }

    fn profile(samples: Vec<Sample>) -> Profile {
        profile_of(ProfileKind::OffCpu, samples)
    }

    fn profile_of(kind: ProfileKind, samples: Vec<Sample>) -> Profile {
        Profile {
            kind,
            start: UNIX_EPOCH,
            duration: Duration::from_secs(1),
            samples,
            mappings: Vec::new(),
            comments: Vec::new(),
        }
    }

    fn sleep_stack() -> Vec<Frame> {
        vec![
            frame(FrameKind::Kernel, &["schedule"]),
            frame(FrameKind::Kernel, &["do_nanosleep"]),
            // `sleep` inlined into `run`.
            frame(FrameKind::User, &["sleep", "run"]),
            frame(FrameKind::User, &["main"]),
        ]
    }

    #[test]
    fn thread_then_user_root_to_kernel_leaf_in_microseconds() {
        let folded = encode(&profile(vec![sample("worker", sleep_stack(), 1_500_000)]));
        assert_eq!(folded, "worker;main;run;sleep;do_nanosleep;schedule 1500\n");
    }

    #[test]
    fn identical_stacks_merge_and_lines_are_sorted() {
        let other = vec![frame(FrameKind::User, &["poll"])];
        let folded = encode(&profile(vec![
            sample("worker", sleep_stack(), 1_000),
            sample("io", other.clone(), 3_000),
            sample("worker", sleep_stack(), 2_000),
            sample("io", other, 4_000),
        ]));
        assert_eq!(
            folded,
            "io;poll 7\nworker;main;run;sleep;do_nanosleep;schedule 3\n"
        );
    }

    #[test]
    fn truncated_marker_sits_at_the_root_of_the_user_stack() {
        let stack = vec![
            frame(FrameKind::Kernel, &["schedule"]),
            frame(FrameKind::User, &["read"]),
            Frame::marker_truncated(),
        ];
        let folded = encode(&profile(vec![sample("worker", stack, 2_000)]));
        assert_eq!(folded, "worker;[truncated];read;schedule 2\n");
    }

    #[test]
    fn separators_in_names_are_replaced_and_nameless_threads_use_the_tid() {
        let stack = vec![frame(FrameKind::User, &["<[u8; 4] as Debug>::fmt"])];
        let folded = encode(&profile(vec![sample("", stack, 1_000)]));
        assert_eq!(folded, "tid 7;<[u8, 4] as Debug>::fmt 1\n");
    }

    #[test]
    fn address_space_changes_are_in_bytes() {
        let rehash = vec![
            frame(FrameKind::User, &["reserve_rehash", "insert"]),
            frame(FrameKind::User, &["main"]),
        ];
        let folded = encode(&profile_of(
            ProfileKind::AddressSpace,
            vec![
                sample("worker", rehash.clone(), 3_500_000_000),
                sample("worker", rehash, 499),
                sample("idle", Vec::new(), 0),
            ],
        ));
        assert_eq!(folded, "worker;main;insert;reserve_rehash 3500000499\n");
        assert_eq!(unit(ProfileKind::AddressSpace), "bytes");
    }

    #[test]
    fn sub_microsecond_stacks_are_left_out() {
        let folded = encode(&profile(vec![sample("worker", sleep_stack(), 499)]));
        assert_eq!(folded, "");
    }
}
