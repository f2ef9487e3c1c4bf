//! The profile model every encoder reads: pprof, folded stacks, the flamegraph
//! and (later) OTLP profiles are all views of one [`Profile`].
//!
//! Stacks are stored leaf first, as pprof wants them. Frames and mappings are
//! plain owned data; deduplication into string, function and location tables
//! is the encoders' business.

use std::fmt;
use std::time::{Duration, SystemTime};

/// One captured off-CPU profile: where the target's threads were blocked, and
/// for how long, during `[start, start + duration)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
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

/// The summed off-CPU time of one thread with one stack in one state.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Leaf first: kernel frames, then user frames.
    pub stack: Vec<Frame>,
    pub blocked_ns: u64,
    /// How many separate blocks the time is made of.
    pub count: u64,
    pub labels: SampleLabels,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SampleLabels {
    pub process_id: u32,
    pub thread_id: u32,
    pub thread_name: String,
    pub state: ThreadState,
    /// Further string labels (`lock`, `trace_id`, ...), in insertion order.
    pub extra: Vec<(String, String)>,
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

impl Frame {
    pub fn marker_truncated() -> Self {
        Frame {
            kind: FrameKind::Truncated,
            address: 0,
            mapping: None,
            lines: vec![Line {
                function: TRUNCATED_FRAME.to_string(),
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
    pub fn total_blocked_ns(&self) -> u64 {
        self.samples.iter().map(|sample| sample.blocked_ns).sum()
    }
}
