//! The one schema of a sample's labels, and how each target shows them.
//!
//! The symbolizer writes labels under a [`Key`], `report` reads them back
//! by the same key, and every encoder asks [`SampleLabels::mapped`] what
//! its [`Target`] gets: which labels, under which names, which detail
//! becomes a synthetic frame at the leaf instead, and (by leaving it out)
//! what stays in the files alone.
//!
//! The split follows what a label costs in a backend. Pyroscope makes each
//! distinct set of sample labels a series of its own, and a tenant has
//! 5000 active series by default. So what a backend gets as labels is what
//! a person filters by and what takes few values: the thread's name, its
//! state, the kind of lock and the system call. What is unique to one
//! capture (the lock's holder and its stack, hold and call durations, lock
//! addresses, thread ids) becomes frames, which every flame graph shows
//! and no index stores. The files keep everything, as labels.

use std::borrow::Cow;

use super::{parse_hex, SampleLabels, SpanLink};
use crate::report::human_duration;

/// A label of the schema, besides the thread and state every sample has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// The lock waited for: `mmap_lock`, or its kind and address
    /// (`futex@0x7f1c2a000010`, `rwsem@0xffff...`).
    Lock,
    /// `read` or `write`, when the lock has modes.
    LockMode,
    /// The thread the kernel named as the lock's owner, or that woke a
    /// futex waiter.
    LockHolderTid,
    /// How the holder was known: `readers` (the last reader in) or `waker`.
    LockHeldBy,
    /// The name of the thread whose recorded hold the waiter waited behind.
    LockHolder,
    /// `read`, `write`, or `write, then read`.
    LockHolderMode,
    /// How long that hold lasted, in nanoseconds.
    LockHoldNs,
    /// The holder's user functions, innermost first, joined by
    /// [`STACK_SEPARATOR`].
    LockHolderStack,
    /// The address-space call: `mmap`, `munmap`, `mremap`, `brk`, `madvise`.
    Syscall,
    /// How long that call took, in nanoseconds.
    SyscallNs,
    /// The trace of the request the sample held up, 32 lowercase hex.
    TraceId,
    /// The span of that request, 16 lowercase hex.
    SpanId,
}

/// Joins the functions of [`Key::LockHolderStack`].
pub const STACK_SEPARATOR: &str = " < ";

impl Key {
    pub const ALL: [Key; 12] = [
        Key::Lock,
        Key::LockMode,
        Key::LockHolderTid,
        Key::LockHeldBy,
        Key::LockHolder,
        Key::LockHolderMode,
        Key::LockHoldNs,
        Key::LockHolderStack,
        Key::Syscall,
        Key::SyscallNs,
        Key::TraceId,
        Key::SpanId,
    ];

    /// The label's name in pprof files; Pyroscope's span profiles read
    /// `span_id` and `trace_id` under exactly these.
    pub fn name(self) -> &'static str {
        match self {
            Key::Lock => "lock",
            Key::LockMode => "lock_mode",
            Key::LockHolderTid => "lock_holder_tid",
            Key::LockHeldBy => "lock_held_by",
            Key::LockHolder => "lock_holder",
            Key::LockHolderMode => "lock_holder_mode",
            Key::LockHoldNs => "lock_hold_ns",
            Key::LockHolderStack => "lock_holder_stack",
            Key::Syscall => "syscall",
            Key::SyscallNs => "syscall_ns",
            Key::TraceId => "trace_id",
            Key::SpanId => "span_id",
        }
    }

    pub fn from_name(name: &str) -> Option<Key> {
        Self::ALL.into_iter().find(|key| key.name() == name)
    }
}

/// Where a sample's labels go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// pprof files, read by `go tool pprof` and `freezeframe report`: every
    /// label under its file name, thread and process ids as numbers.
    Files,
    /// OTLP sample attributes, which Pyroscope turns into series labels.
    /// The span link travels in OTLP's link table, not as attributes.
    Otlp,
    /// The pprof labels of a Pyroscope push, which become series labels
    /// too: strings only (Pyroscope drops numeric ones), under names that
    /// every Pyroscope release accepts, with `span_id` and `trace_id` for
    /// its span profiles.
    Pyroscope,
}

/// A label's value as a target writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    Str(Cow<'a, str>),
    Int(i64),
}

/// What a target gets of one sample's labels.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mapped<'a> {
    /// Name and value, in a stable order, each name once.
    pub labels: Vec<(Cow<'a, str>, Value<'a>)>,
    /// Function names of synthetic frames for the leaf end of the stack,
    /// leaf first.
    pub frames: Vec<String>,
}

/// Label names of the [`Target::Otlp`] and [`Target::Pyroscope`] series.
pub mod series {
    pub const OTLP_THREAD_NAME: &str = "thread.name";
    /// Namespaced, as a bare `state` would clash with resource attributes.
    pub const OTLP_THREAD_STATE: &str = "thread.state";
    pub const OTLP_LOCK_KIND: &str = "lock.kind";
    pub const OTLP_SYSCALL: &str = "syscall";
    pub const PYROSCOPE_THREAD_NAME: &str = "thread_name";
    pub const PYROSCOPE_THREAD_STATE: &str = "thread_state";
    pub const PYROSCOPE_LOCK_KIND: &str = "lock_kind";
    pub const PYROSCOPE_SYSCALL: &str = "syscall";
}

/// pprof label names of the thread and process, in the files.
pub const THREAD_ID: &str = "thread_id";
pub const PROCESS_ID: &str = "process_id";
pub const THREAD_NAME: &str = "thread_name";
pub const STATE: &str = "state";

impl SampleLabels {
    /// The value of the label `key`.
    pub fn label(&self, key: Key) -> Option<&str> {
        self.extra
            .iter()
            .find(|(name, _)| *name == key)
            .map(|(_, value)| value.as_str())
    }

    /// Sets `key` to `value`, replacing what it held.
    pub fn set(&mut self, key: Key, value: impl Into<String>) {
        self.remove(key);
        self.extra.push((key, value.into()));
    }

    pub fn remove(&mut self, key: Key) {
        self.extra.retain(|(name, _)| *name != key);
    }

    /// The span this sample is linked to, when both id labels are present
    /// and well formed.
    pub fn span_link(&self) -> Option<SpanLink> {
        Some(SpanLink {
            trace_id: parse_hex(self.label(Key::TraceId)?)?,
            span_id: parse_hex(self.label(Key::SpanId)?)?,
        })
    }

    /// Links the sample to `link`, replacing any link it had.
    pub fn set_span_link(&mut self, link: SpanLink) {
        self.set(Key::TraceId, super::hex(&link.trace_id));
        self.set(Key::SpanId, super::hex(&link.span_id));
    }

    /// What `target` writes of these labels.
    pub fn mapped(&self, target: Target) -> Mapped<'_> {
        match target {
            Target::Files => self.for_files(),
            Target::Otlp | Target::Pyroscope => self.for_series(target),
        }
    }

    fn for_files(&self) -> Mapped<'_> {
        let mut labels = vec![
            (Cow::Borrowed(THREAD_ID), Value::Int(self.thread_id.into())),
            (
                Cow::Borrowed(PROCESS_ID),
                Value::Int(self.process_id.into()),
            ),
            (
                Cow::Borrowed(THREAD_NAME),
                Value::Str(Cow::Borrowed(&self.thread_name)),
            ),
            (
                Cow::Borrowed(STATE),
                Value::Str(Cow::Borrowed(self.state.code())),
            ),
        ];
        labels.extend(self.extra.iter().map(|(key, value)| {
            (
                Cow::Borrowed(key.name()),
                Value::Str(Cow::Borrowed(value.as_str())),
            )
        }));
        labels.extend(self.foreign.iter().map(|(key, value)| {
            (
                Cow::Borrowed(key.as_str()),
                Value::Str(Cow::Borrowed(value.as_str())),
            )
        }));
        Mapped {
            labels,
            frames: Vec::new(),
        }
    }

    /// The few labels a series is made of, and the detail as frames.
    fn for_series(&self, target: Target) -> Mapped<'_> {
        let otlp = target == Target::Otlp;
        let name = |otlp_name: &'static str, pyroscope_name: &'static str| {
            Cow::Borrowed(if otlp { otlp_name } else { pyroscope_name })
        };
        let text = |value: &'static str| Value::Str(Cow::Borrowed(value));
        let mut labels = Vec::new();
        if !self.thread_name.is_empty() {
            labels.push((
                name(series::OTLP_THREAD_NAME, series::PYROSCOPE_THREAD_NAME),
                Value::Str(Cow::Borrowed(self.thread_name.as_str())),
            ));
        }
        labels.push((
            name(series::OTLP_THREAD_STATE, series::PYROSCOPE_THREAD_STATE),
            text(self.state.code()),
        ));
        if let Some(lock) = self.label(Key::Lock) {
            labels.push((
                name(series::OTLP_LOCK_KIND, series::PYROSCOPE_LOCK_KIND),
                Value::Str(Cow::Borrowed(lock_kind(lock))),
            ));
        }
        if let Some(call) = self.label(Key::Syscall) {
            labels.push((
                name(series::OTLP_SYSCALL, series::PYROSCOPE_SYSCALL),
                Value::Str(Cow::Borrowed(call)),
            ));
        }
        if !otlp && self.span_link().is_some() {
            for key in [Key::SpanId, Key::TraceId] {
                let value = self.label(key).unwrap_or_default();
                labels.push((Cow::Borrowed(key.name()), Value::Str(Cow::Borrowed(value))));
            }
        }
        Mapped {
            labels,
            frames: self.detail_frames(),
        }
    }

    /// The capture-unique detail as frame names, leaf first: the holder's
    /// stack (so that a flame graph shows, above the wait, what the holder
    /// was doing), then the wait itself; or the address-space call and
    /// how long it took.
    fn detail_frames(&self) -> Vec<String> {
        let mut frames = Vec::new();
        if let Some(lock) = self.label(Key::Lock) {
            if let Some(stack) = self.label(Key::LockHolderStack) {
                frames.extend(
                    stack
                        .split(STACK_SEPARATOR)
                        .map(|function| format!("[holder] {function}")),
                );
            }
            frames.push(self.wait_frame(lock));
        }
        if let Some(call) = self.label(Key::Syscall) {
            let took = self
                .label(Key::SyscallNs)
                .and_then(|ns| ns.parse().ok())
                .map_or(String::new(), |ns| {
                    format!(" taking {}", human_duration(ns))
                });
            frames.push(format!("[{call}{took}]"));
        }
        frames
    }

    /// `[waiting for mmap_lock to write, held by feeddb-writer (tid 10) to
    /// read for 3.70 s]`.
    fn wait_frame(&self, lock: &str) -> String {
        let mut text = format!("[waiting for {lock}");
        if let Some(mode) = self.label(Key::LockMode) {
            text.push_str(&format!(" to {mode}"));
        }
        let tid = self.label(Key::LockHolderTid);
        let holder = match (self.label(Key::LockHolder), tid) {
            (Some(name), Some(tid)) => Some(format!("{name} (tid {tid})")),
            (Some(name), None) => Some(name.to_string()),
            (None, Some(tid)) => Some(format!("tid {tid}")),
            (None, None) => None,
        };
        if let Some(holder) = holder {
            match self.label(Key::LockHeldBy) {
                Some("waker") => text.push_str(&format!(", woken by {holder}")),
                Some("readers") => {
                    text.push_str(&format!(", held by {holder}, the last reader in"))
                }
                _ => text.push_str(&format!(", held by {holder}")),
            }
        }
        if let Some(mode) = self.label(Key::LockHolderMode) {
            text.push_str(&format!(" to {mode}"));
        }
        if let Some(ns) = self.label(Key::LockHoldNs).and_then(|ns| ns.parse().ok()) {
            text.push_str(&format!(" for {}", human_duration(ns)));
        }
        text.push(']');
        text
    }
}

/// A lock's kind, without the address that makes each lock a value of its
/// own: `futex@0x10` is a `futex`, `mmap_lock` is itself.
pub fn lock_kind(lock: &str) -> &str {
    lock.split_once('@').map_or(lock, |(kind, _)| kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::ThreadState;

    fn waiter() -> SampleLabels {
        let mut labels = SampleLabels {
            process_id: 9,
            thread_id: 12,
            thread_name: "feeddb-req-3".to_string(),
            state: ThreadState::Disk,
            ..SampleLabels::default()
        };
        labels.set(Key::Lock, "mmap_lock");
        labels.set(Key::LockMode, "write");
        labels.set(Key::LockHolderTid, "10");
        labels.set(Key::LockHolder, "feeddb-writer");
        labels.set(Key::LockHolderMode, "read");
        labels.set(Key::LockHoldNs, "3700000000");
        labels.set(Key::LockHolderStack, "__munmap < resize < main");
        labels.set_span_link(SpanLink {
            trace_id: [0xab; 16],
            span_id: [0x01; 8],
        });
        labels
    }

    fn names<'a>(mapped: &'a Mapped<'_>) -> Vec<&'a str> {
        mapped
            .labels
            .iter()
            .map(|(name, _)| name.as_ref())
            .collect()
    }

    #[test]
    fn keys_are_known_by_their_file_names() {
        for key in Key::ALL {
            assert_eq!(Key::from_name(key.name()), Some(key));
        }
        assert_eq!(Key::from_name("thread_id"), None);
    }

    #[test]
    fn the_files_keep_every_label() {
        let mut labels = waiter();
        labels
            .foreign
            .push(("goroutine".to_string(), "7".to_string()));
        let mapped = labels.mapped(Target::Files);
        assert!(mapped.frames.is_empty());
        let mut expected = vec![THREAD_ID, PROCESS_ID, THREAD_NAME, STATE];
        expected.extend(labels.extra.iter().map(|(key, _)| key.name()));
        expected.push("goroutine");
        assert_eq!(names(&mapped), expected);
        assert_eq!(mapped.labels[0].1, Value::Int(12));
    }

    #[test]
    fn series_get_few_labels_and_the_detail_as_frames() {
        let labels = waiter();
        let otlp = labels.mapped(Target::Otlp);
        assert_eq!(
            names(&otlp),
            [
                series::OTLP_THREAD_NAME,
                series::OTLP_THREAD_STATE,
                series::OTLP_LOCK_KIND
            ]
        );
        assert_eq!(
            otlp.frames,
            [
                "[holder] __munmap",
                "[holder] resize",
                "[holder] main",
                "[waiting for mmap_lock to write, held by feeddb-writer (tid 10) to read for 3.70 s]",
            ]
        );
        let pyroscope = labels.mapped(Target::Pyroscope);
        assert_eq!(
            names(&pyroscope),
            [
                series::PYROSCOPE_THREAD_NAME,
                series::PYROSCOPE_THREAD_STATE,
                series::PYROSCOPE_LOCK_KIND,
                "span_id",
                "trace_id"
            ]
        );
        assert!(pyroscope
            .labels
            .iter()
            .all(|(_, value)| matches!(value, Value::Str(_))));
        assert_eq!(pyroscope.frames, otlp.frames);
    }

    #[test]
    fn a_lock_address_never_reaches_a_series() {
        let mut labels = SampleLabels::default();
        labels.set(Key::Lock, "futex@0x7f1c2a000010");
        labels.set(Key::LockHolderTid, "14");
        labels.set(Key::LockHeldBy, "waker");
        let mapped = labels.mapped(Target::Otlp);
        assert_eq!(
            mapped.labels[1],
            (
                Cow::Borrowed(series::OTLP_LOCK_KIND),
                Value::Str(Cow::Borrowed("futex"))
            )
        );
        assert_eq!(
            mapped.frames,
            ["[waiting for futex@0x7f1c2a000010, woken by tid 14]"]
        );
    }

    #[test]
    fn a_call_becomes_a_label_and_its_duration_a_frame() {
        let mut labels = SampleLabels::default();
        labels.set(Key::Syscall, "munmap");
        labels.set(Key::SyscallNs, "80000000");
        let mapped = labels.mapped(Target::Pyroscope);
        assert_eq!(
            names(&mapped),
            [series::PYROSCOPE_THREAD_STATE, series::PYROSCOPE_SYSCALL]
        );
        assert_eq!(mapped.frames, ["[munmap taking 80 ms]"]);
    }

    #[test]
    fn a_malformed_link_is_not_sent() {
        let mut labels = SampleLabels::default();
        labels.set(Key::TraceId, "stale");
        labels.set(Key::SpanId, "0101010101010101");
        assert_eq!(labels.span_link(), None);
        for target in [Target::Otlp, Target::Pyroscope] {
            let mapped = labels.mapped(target);
            assert!(!names(&mapped).contains(&"span_id"), "{target:?}");
        }
    }
}
