//! The kernel's scheduler and lock text, whose frames no stack keeps.
//!
//! When the kernel walks the stack of a task that is not running (a task
//! iterator's `bpf_get_task_stack`, `/proc/PID/stack`), it leaves out every
//! return address in its scheduler text (`__sched`: `schedule`,
//! `__schedule`, `do_nanosleep`, the rwsem and mutex slow paths, ...) and in
//! its lock text (`in_sched_functions()`), so that the stack starts where the
//! task chose to wait. A stack the probe takes while the waiter is still
//! current (the raw_tp hook's switch-out) keeps them. Dropping the same
//! frames from every stack makes one wait one stack, however it was caught.

use std::ops::Range;

/// Where kallsyms is read from.
const KALLSYMS: &str = "/proc/kallsyms";

/// The bounds of each text section the kernel leaves out, as kallsyms names
/// them.
const SECTIONS: [(&str, &str); 2] = [
    ("__sched_text_start", "__sched_text_end"),
    ("__lock_text_start", "__lock_text_end"),
];

/// The address ranges whose frames are dropped; empty when kallsyms does not
/// say (addresses hidden from us), and then nothing is.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct SchedulerText {
    ranges: Vec<Range<u64>>,
}

impl SchedulerText {
    /// Reads the running kernel's sections.
    pub fn read() -> Self {
        match std::fs::read_to_string(KALLSYMS) {
            Ok(kallsyms) => {
                let text = Self::parse(&kallsyms);
                if text.ranges.is_empty() {
                    tracing::warn!(
                        "{KALLSYMS} does not show the scheduler's text; kernel stacks keep the \
                         scheduler's frames, so one wait may show as two stacks"
                    );
                }
                text
            }
            Err(error) => {
                tracing::warn!(
                    "cannot read {KALLSYMS}: {error}; kernel stacks keep the scheduler's frames"
                );
                Self::default()
            }
        }
    }

    /// The sections named in kallsyms text; a section with a missing or
    /// zero (hidden) bound is left out.
    pub fn parse(kallsyms: &str) -> Self {
        let mut bounds = [[0u64; 2]; SECTIONS.len()];
        for line in kallsyms.lines() {
            let mut fields = line.split_ascii_whitespace();
            let (Some(address), Some(_kind), Some(name)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            for (section, (start, end)) in SECTIONS.iter().enumerate() {
                let bound = if name == *start {
                    0
                } else if name == *end {
                    1
                } else {
                    continue;
                };
                bounds[section][bound] = u64::from_str_radix(address, 16).unwrap_or(0);
            }
        }
        SchedulerText {
            ranges: bounds
                .into_iter()
                .filter(|&[start, end]| start != 0 && start < end)
                .map(|[start, end]| start..end)
                .collect(),
        }
    }

    /// Whether a kernel return address is one the kernel leaves out; as the
    /// kernel tests it, on the address itself.
    pub fn contains(&self, ip: u64) -> bool {
        self.ranges.iter().any(|range| range.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KALLSYMS_EXCERPT: &str = "\
ffffffff82265240 T __sched_text_start
ffffffff822652e0 t __schedule
ffffffff82266250 T schedule
ffffffff8226a430 t rwsem_down_write_slowpath
ffffffff8226df62 T __sched_text_end
ffffffff8226df70 T __lock_text_start
ffffffff8226e000 T _raw_spin_lock_irqsave
ffffffff8226f9f1 T __lock_text_end
ffffffff8226fa00 T vm_mmap_pgoff
ffffffffc0001000 t helper\t[some_module]
";

    #[test]
    fn the_scheduler_and_lock_text_are_left_out_and_nothing_else() {
        let text = SchedulerText::parse(KALLSYMS_EXCERPT);
        for inside in [
            0xffffffff82265240,
            0xffffffff8226a4a0,
            0xffffffff8226df61,
            0xffffffff8226e010,
        ] {
            assert!(text.contains(inside), "{inside:#x}");
        }
        // Each end is the first address past its section.
        for outside in [
            0xffffffff8226523f,
            0xffffffff8226df62,
            0xffffffff8226f9f1,
            0xffffffff8226fa10,
            0xffffffffc0001000,
        ] {
            assert!(!text.contains(outside), "{outside:#x}");
        }
    }

    #[test]
    fn hidden_or_missing_bounds_leave_every_frame_in() {
        // As kallsyms shows itself to a reader without the privilege.
        let hidden: String = KALLSYMS_EXCERPT
            .lines()
            .map(|line| format!("{:016x}{}\n", 0, &line[16..]))
            .collect();
        assert_eq!(SchedulerText::parse(&hidden), SchedulerText::default());
        assert_eq!(SchedulerText::parse(""), SchedulerText::default());
        let half = "ffffffff82265240 T __sched_text_start\n";
        assert!(!SchedulerText::parse(half).contains(0xffffffff82265300));
    }

    #[test]
    fn the_running_kernel_has_both_sections() {
        // As root, kallsyms shows addresses; the tests run as root.
        let text = SchedulerText::read();
        let kallsyms = std::fs::read_to_string(KALLSYMS).unwrap();
        let address_of = |wanted: &str| {
            kallsyms
                .lines()
                .find(|line| line.split_ascii_whitespace().nth(2) == Some(wanted))
                .and_then(|line| {
                    u64::from_str_radix(line.split_ascii_whitespace().next()?, 16).ok()
                })
                .unwrap()
        };
        if address_of("schedule") == 0 {
            // Addresses hidden from this user: nothing is left out.
            assert_eq!(text, SchedulerText::default());
            return;
        }
        assert_eq!(text.ranges.len(), 2);
        assert!(text.contains(address_of("schedule")));
        assert!(!text.contains(address_of("vfs_write")));
    }
}
