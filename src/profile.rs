//! The profile model every encoder reads: pprof, folded stacks, the flamegraph
//! and OTLP profiles are all views of one [`Profile`].
//!
//! A profile is of one [`ProfileKind`], which says what its sample values
//! measure: off-CPU time, or bytes of address space changed by syscalls.
//!
//! Stacks are stored leaf first, as pprof wants them. Frames and mappings are
//! plain owned data; deduplication into string, function and location tables
//! is the encoders' business.
//!
//! A sample may say *when* its time was spent ([`Sample::timeline`]) and
//! which request it held up (the `trace_id`/`span_id` labels, see
//! [`SampleLabels::span_link`]): OTLP profiles carry both, pprof the labels.
//!
//! What a sample's labels are, and what each target makes of them, is
//! [`labels`]' one schema.

pub mod labels;

use std::fmt;
use std::time::{Duration, SystemTime};

/// One captured profile: the stacks at which the target's threads spent
/// what the [`kind`](Profile::kind) measures during `[start, start + duration)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub kind: ProfileKind,
    /// Wall-clock start of the capture window.
    pub start: SystemTime,
    pub duration: Duration,
    pub samples: Vec<Sample>,
    /// Executables and libraries that user frames point into.
    pub mappings: Vec<Mapping>,
    /// Free-form notes carried into the pprof `comment` field: drop counts,
    /// the command line, anything a reader of the file should know.
    pub comments: Vec<String>,
}

/// What a profile measures. It decides the unit of [`Sample::value`] and
/// what [`Sample::count`] counts, and so the sample types every encoder
/// writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProfileKind {
    /// Where threads were blocked off the CPU: values are nanoseconds,
    /// counts are separate blocks.
    #[default]
    OffCpu,
    /// Where threads changed their address space in large steps (mmap,
    /// munmap, mremap, brk, madvise): values are bytes, counts are
    /// syscalls. Stacks are the user stacks that made the syscalls.
    AddressSpace,
}

impl ProfileKind {
    pub const ALL: [ProfileKind; 2] = [Self::OffCpu, Self::AddressSpace];

    /// The pprof `(type, unit)` of [`Sample::count`].
    pub fn count_type(self) -> (&'static str, &'static str) {
        match self {
            Self::OffCpu => ("events", "count"),
            Self::AddressSpace => ("calls", "count"),
        }
    }

    /// The pprof `(type, unit)` of [`Sample::value`]: the type a viewer
    /// shows by default, and the period type.
    pub fn value_type(self) -> (&'static str, &'static str) {
        match self {
            Self::OffCpu => ("off_cpu", "nanoseconds"),
            Self::AddressSpace => ("alloc_space", "bytes"),
        }
    }

    /// The `(type, unit)` of the period, which Pyroscope names a profile's
    /// series after unless the value type is one it knows: none for off-CPU
    /// time (`off_cpu/nanoseconds` alone is the shape it recognises as
    /// off-CPU, `__name__=off_cpu`), and `address_space/bytes` for the
    /// address-space profile, so that its series is `address_space` rather
    /// than nameless, which Pyroscope refuses.
    pub fn period_type(self) -> Option<(&'static str, &'static str)> {
        match self {
            Self::OffCpu => None,
            Self::AddressSpace => Some(("address_space", "bytes")),
        }
    }

    /// The pprof sample types in the order a sample's values are written:
    /// count, then value.
    pub fn sample_types(self) -> [(&'static str, &'static str); 2] {
        [self.count_type(), self.value_type()]
    }

    /// The kind whose [`value_type`](Self::value_type) is `type_name/unit`.
    pub fn from_value_type(type_name: &str, unit: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.value_type() == (type_name, unit))
    }

    /// What the profile shows, as a title: `Off-CPU time`.
    pub fn title(self) -> &'static str {
        match self {
            Self::OffCpu => "Off-CPU time",
            Self::AddressSpace => "Address-space changes",
        }
    }
}

/// The summed measurements of one thread with one stack in one state.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Leaf first: kernel frames, then user frames.
    pub stack: Vec<Frame>,
    /// Off-CPU nanoseconds in an [`OffCpu`](ProfileKind::OffCpu) profile,
    /// bytes of address space in an
    /// [`AddressSpace`](ProfileKind::AddressSpace) one.
    pub value: u64,
    /// How many separate events `value` is made of: blocks, or syscalls.
    pub count: u64,
    pub labels: SampleLabels,
    /// When the value was measured, oldest first, at the resolution the
    /// capture was cut in (the flight recorder's tick). The slices sum to
    /// `value`. Empty when unknown: a one-shot capture, a saved pprof.
    pub timeline: Vec<TimeSlice>,
}

/// The part of one sample measured within one stretch of the capture
/// window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeSlice {
    pub start: SystemTime,
    pub duration: Duration,
    /// In the unit of [`Sample::value`].
    pub value: u64,
    /// Events first seen in this slice (a block spanning slices counts once,
    /// in the first).
    pub count: u64,
}

impl TimeSlice {
    pub fn end(&self) -> SystemTime {
        self.start + self.duration
    }
}

/// A span a sample is linked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpanLink {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SampleLabels {
    pub process_id: u32,
    pub thread_id: u32,
    pub thread_name: String,
    pub state: ThreadState,
    /// Further labels of the schema (`lock`, `trace_id`, ...), in the order
    /// they were set; see [`SampleLabels::set`].
    pub extra: Vec<(labels::Key, String)>,
    /// Labels of a read pprof that the schema does not know (another
    /// tool's, a later version's): kept in the files, sent nowhere else.
    pub foreign: Vec<(String, String)>,
}

/// How a thread left the CPU, as `ps` would print it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub enum ThreadState {
    /// Preempted while it still wanted the CPU (R).
    Runnable,
    /// Interruptible sleep (S).
    #[default]
    Sleeping,
    /// Uninterruptible sleep (D).
    Disk,
    /// Stopped, traced, parked or another rare state.
    Other,
}

impl ThreadState {
    pub const ALL: [ThreadState; 4] = [Self::Runnable, Self::Sleeping, Self::Disk, Self::Other];

    /// The one-letter code used in labels and on the command line.
    pub fn code(self) -> &'static str {
        match self {
            Self::Runnable => "R",
            Self::Sleeping => "S",
            Self::Disk => "D",
            Self::Other => "other",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|state| state.code().eq_ignore_ascii_case(code))
    }
}

impl fmt::Display for ThreadState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// One entry of a stack: an address and the source lines it stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Frame {
    pub kind: FrameKind,
    /// The address as the stack walk reported it (0 for marker frames).
    pub address: u64,
    /// Index into [`Profile::mappings`], for user frames that fall in a file.
    pub mapping: Option<usize>,
    /// Innermost first: an address inside inlined code yields the inlined
    /// function, then the function it was inlined into. Never empty.
    pub lines: Vec<Line>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    Kernel,
    User,
    /// Not a real frame: marks a user stack that the walk could not finish
    /// (no frame pointers), placed where the missing callers would be.
    Truncated,
    /// Not a real frame: detail of the sample (the lock's holder, how long
    /// it held it) that an encoder shows as a frame at the leaf, where a
    /// flame graph shows it, rather than as a label; see
    /// [`labels::Mapped::frames`].
    Detail,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Line {
    /// Demangled function name, or `[unknown] file+0xoffset` for a miss.
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
}

/// Name of the marker frame that stands for the unwalked rest of a stack.
pub const TRUNCATED_FRAME: &str = "[truncated]";
/// Name of the marker frame that stands for a user stack that could not be
/// read in time: its process's memory was locked (a freeze in progress
/// holds its mmap_lock), or the thread woke while it was read.
pub const NOT_READ_FRAME: &str = "[not read in time]";

impl Frame {
    pub fn marker_truncated() -> Self {
        Self::marker(TRUNCATED_FRAME)
    }

    /// The [`NOT_READ_FRAME`] marker, where the user stack would be.
    pub fn marker_not_read() -> Self {
        Self::marker(NOT_READ_FRAME)
    }

    fn marker(name: &str) -> Self {
        Frame {
            kind: FrameKind::Truncated,
            address: 0,
            mapping: None,
            lines: vec![Line {
                function: name.to_string(),
                file: None,
                line: None,
            }],
        }
    }

    /// A [`FrameKind::Detail`] frame named `text`.
    pub fn detail(text: String) -> Self {
        Frame {
            kind: FrameKind::Detail,
            address: 0,
            mapping: None,
            lines: vec![Line {
                function: text,
                file: None,
                line: None,
            }],
        }
    }

    /// The outermost function at this address: the one a flat stack shows.
    pub fn function(&self) -> &str {
        self.lines
            .last()
            .map_or("[unknown]", |line| line.function.as_str())
    }
}

/// A file mapped into the target's address space.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mapping {
    pub memory_start: u64,
    pub memory_limit: u64,
    pub file_offset: u64,
    /// Path as the target process sees it.
    pub file: String,
    /// GNU build id, lowercase hex.
    pub build_id: Option<String>,
}

impl Profile {
    /// The sum of every sample's value, in the unit of the profile's kind.
    pub fn total_value(&self) -> u64 {
        self.samples.iter().map(|sample| sample.value).sum()
    }
}

/// Lowercase hex, the way W3C trace context and Pyroscope write ids.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Parses exactly `N` bytes of hex; `None` for anything else, including an
/// all-zero id, which OTLP and W3C define as invalid.
pub fn parse_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.is_ascii() {
        return None;
    }
    let mut bytes = [0u8; N];
    for (index, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * index..2 * index + 2], 16).ok()?;
    }
    bytes.iter().any(|&byte| byte != 0).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::labels::Key;
    use super::*;

    #[test]
    fn span_links_round_trip_through_labels() {
        let mut labels = SampleLabels::default();
        labels.set(Key::Lock, "mmap_lock");
        labels.set(Key::TraceId, "stale");
        assert_eq!(labels.span_link(), None);
        let link = SpanLink {
            trace_id: [0xab; 16],
            span_id: [0x01; 8],
        };
        labels.set_span_link(link);
        assert_eq!(labels.span_link(), Some(link));
        assert_eq!(labels.extra[0].0, Key::Lock);
        assert_eq!(labels.extra.len(), 3);
        assert_eq!(labels.label(Key::SpanId), Some("0101010101010101"));
    }

    #[test]
    fn each_kind_is_known_by_its_value_type() {
        assert_eq!(ProfileKind::default(), ProfileKind::OffCpu);
        for kind in ProfileKind::ALL {
            let (type_name, unit) = kind.value_type();
            assert_eq!(ProfileKind::from_value_type(type_name, unit), Some(kind));
            assert_eq!(kind.sample_types()[1], kind.value_type());
        }
        assert_eq!(
            ProfileKind::AddressSpace.sample_types(),
            [("calls", "count"), ("alloc_space", "bytes")]
        );
        assert_eq!(ProfileKind::from_value_type("off_cpu", "bytes"), None);
        assert_eq!(ProfileKind::from_value_type("cpu", "nanoseconds"), None);
    }

    #[test]
    fn ids_must_be_whole_and_nonzero() {
        assert_eq!(parse_hex::<2>("0aFf"), Some([0x0a, 0xff]));
        assert_eq!(parse_hex::<2>("0aF"), None);
        assert_eq!(parse_hex::<2>("0aFg"), None);
        assert_eq!(parse_hex::<2>("0000"), None);
        assert_eq!(parse_hex::<2>("é0a"), None);
    }
}

/// Frame builders shared by the encoders' tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::{Frame, FrameKind, Line};

    pub fn line(function: &str, file: Option<&str>, number: Option<u32>) -> Line {
        Line {
            function: function.to_string(),
            file: file.map(str::to_string),
            line: number,
        }
    }

    pub fn kernel(address: u64, function: &str) -> Frame {
        Frame {
            kind: FrameKind::Kernel,
            address,
            mapping: None,
            lines: vec![line(function, None, None)],
        }
    }

    pub fn user(address: u64, mapping: usize, lines: Vec<Line>) -> Frame {
        Frame {
            kind: FrameKind::User,
            address,
            mapping: Some(mapping),
            lines,
        }
    }
}
