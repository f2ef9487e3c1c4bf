//! Off-CPU capture: a BPF probe on `sched_switch` that stays attached while
//! windows are cut out of it.
//!
//! [`Tracer::start`] loads and attaches the probe for a set of target
//! processes; every [`Tracer::collect`] returns the off-CPU time of the period
//! since the previous one. Blocks that span a boundary are split exactly at
//! it (see [`ledger`]), so a capture is the merge of the windows it spans
//! ([`recorder::merge`]), whether one-shot or from the armed flight recorder.
//!
//! ## What a block learns, and when
//!
//! The probe's cost is in its stack walks, so a block learns its identity
//! in stages, and only a block that reaches `min_block` is walked at all:
//! - at switch-out: its start, state and any contended kernel lock (its
//!   stacks too where the switch-in cannot take them: see `on_switch_out`);
//! - at switch-in: its kernel stack, taken from the still-sleeping thread,
//!   its futex word and the thread that woke it;
//! - on the thread's way back to user space: its user stack. Only then is
//!   the block added to the kernel's totals. A block that reached the
//!   unwind threshold gets a copy of its user registers and the top of its
//!   user stack instead of a frame-pointer walk, unwound here when the cut
//!   reads it (see [`copies`]), so that code without frame pointers gets
//!   whole stacks too.
//!
//! A block still in progress at a cut is completed from outside by the
//! survey iterator (kernel stack, futex word, the user registers it entered
//! the kernel with), and its user stack is walked here from those
//! registers. The parts credited while it was in progress and the total
//! that arrives at its end are matched on what both know
//! ([`BlockKey::settled_identity`]); a later stage that unwinds user stacks
//! without frame pointers plugs in where the saved registers are walked.
//!
//! ## One probe per node, one owner per target
//!
//! Every program runs for every process on the node, so the freezeframes
//! of a node share one probe ([`shared`]): the first pins its maps under
//! bpffs, at a path named after the BPF object's version, and the others
//! reuse them. Settings travel with each target (`struct target_config`),
//! not with the programs, and so does the pid namespace its ids are
//! reported in.
//!
//! Every kernel entry has exactly one owner, the instance that watches its
//! process, and only the owner reads or frees it: a block's total and
//! records carry their process's host tgid, and a stack's key hashes the
//! process with its frames, so no two processes share a stack. An instance
//! takes its own totals out entry by entry, each atomically, and frees its
//! stacks when no block of its own still refers to them. The alternative,
//! one reader fanning data out to the others, would make every instance
//! depend on that one staying alive and keeping up.
//!
//! A private probe is the same with a single owner; it is what runs where
//! bpffs is not there to share.

mod batch;
mod bpf;
mod calls;
mod copies;
mod ledger;
pub mod recorder;
mod shared;
mod threads;

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

pub use bpf::{Features, Hook};
use libbpf_rs::OpenObject;

use crate::profile::{ThreadState, TimeSlice};
use ledger::{BlockId, Ledger};

/// Storage the loaded BPF object lives in; the caller owns it so that a
/// [`Tracer`] can borrow it for as long as it stays attached.
pub type ProbeStorage = MaybeUninit<OpenObject>;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "cannot load the off-CPU BPF program: {detail} (needs root, or CAP_BPF and CAP_PERFMON, \
         and a kernel with BTF at /sys/kernel/btf/vmlinux)"
    )]
    Load { detail: String },
    #[error("cannot attach the {what}: {source} (needs CAP_BPF and CAP_PERFMON)")]
    Attach {
        what: &'static str,
        source: libbpf_rs::Error,
    },
    #[error("cannot run the task iterator: {0}")]
    Iterate(std::io::Error),
    #[error("BPF map {map} failed: {source}")]
    Map {
        map: &'static str,
        source: libbpf_rs::Error,
    },
    #[error("BPF map value has {got} bytes where {expected} were expected: rebuild freezeframe")]
    MapLayout { expected: usize, got: usize },
    #[error("cannot read /proc/self/ns/pid to learn our pid namespace: {0}")]
    PidNamespace(std::io::Error),
    #[error("no process with pid {0} (as seen from freezeframe's pid namespace)")]
    NoSuchProcess(u32),
    #[error("cannot read the monotonic clock: {0}")]
    Clock(std::io::Error),
    #[error("cannot start the stack walker thread: {0}")]
    Walker(std::io::Error),
    #[error("the node's shared BPF probe: {0}")]
    Shared(String),
    #[error(
        "process {0} is watched already by another freezeframe on this node, which shares its \
         probe; one process has one watcher"
    )]
    WatchedElsewhere(u32),
}

/// What to capture. Pids are as seen from freezeframe's own pid namespace.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// Only this thread of the targets.
    pub tid: Option<u32>,
    /// Only threads in this cgroup (v2 id).
    pub cgroup_id: Option<u64>,
    /// Blocks shorter than this are ignored, in the kernel.
    pub min_block: Duration,
    /// Blocks longer than this are ignored, in the kernel.
    pub max_block: Option<Duration>,
    /// Thread states to capture.
    pub states: Vec<ThreadState>,
    /// mmap/munmap/mremap/brk/madvise calls that move at least this many
    /// bytes are recorded with their caller's stack; `None` records none
    /// (and leaves every other process's system calls untouched).
    pub min_address_change: Option<u64>,
    /// Blocks at least this long have their user stack copied and unwound
    /// without frame pointers; shorter ones, or all with `None`, get a
    /// frame-pointer walk.
    pub unwind_threshold: Option<Duration>,
    /// The bpffs directory where the node's freezeframes share one probe;
    /// `None`, or a directory that is not on bpffs, runs a private one.
    pub shared_probe_dir: Option<PathBuf>,
}

/// Where the node's shared probe is pinned unless configured otherwise.
pub const DEFAULT_SHARED_PROBE_DIR: &str = "/sys/fs/bpf/freezeframe";

/// Whether a configured shared-probe directory asks for sharing at all:
/// `off` (or nothing) asks for a private probe.
pub fn shares_probe(dir: &std::path::Path) -> bool {
    !dir.as_os_str().is_empty() && dir != std::path::Path::new("off")
}

/// The default for [`CaptureConfig::min_address_change`]: far above any
/// allocator's ordinary traffic, well below a big table's resize.
pub const DEFAULT_MIN_ADDRESS_CHANGE: u64 = 64 << 20;

/// The default for [`CaptureConfig::unwind_threshold`]. A recorded block
/// with a 16 KiB copy costs about 16.6 µs of BPF time (`bench/probe_cost.py`,
/// `copies`: 18.3 µs with a 70-frame frame-pointer walk instead), and user
/// space about 22 µs to unwind it (`cargo bench --bench unwind`): under
/// 40 µs per block, so a thread blocking back to back for 10 ms at a time
/// costs under 0.4 % of a core. The waits a freeze is made of are far
/// longer; the many short ones (lock handoffs, fast I/O) stay with the
/// frame-pointer walk, which costs hundreds of ns on a shallow stack and
/// would otherwise flood the copy buffer.
pub const DEFAULT_UNWIND_THRESHOLD: Duration = Duration::from_millis(10);

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            tid: None,
            cgroup_id: None,
            min_block: Duration::from_millis(1),
            max_block: None,
            states: ThreadState::ALL.to_vec(),
            min_address_change: Some(DEFAULT_MIN_ADDRESS_CHANGE),
            unwind_threshold: Some(DEFAULT_UNWIND_THRESHOLD),
            shared_probe_dir: Some(PathBuf::from(DEFAULT_SHARED_PROBE_DIR)),
        }
    }
}

/// Where a block's stack is to be found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StackRef {
    /// A stack the probe keeps, by the hash of its frames.
    Id(u64),
    /// A block in progress, seen from outside: its user stack is walked
    /// from the registers the thread entered the kernel with.
    SavedRegs,
    /// A finished block's user stack, copied by the probe to be unwound
    /// here; the copy's id.
    Copy(u64),
    /// No stack was recorded (counted in [`DropCounts`], or a thread with no
    /// user stack at all).
    Missing,
}

/// What the kernel side sums blocked time under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub tgid: u32,
    pub tid: u32,
    pub kernel_stack: StackRef,
    pub user_stack: StackRef,
    pub state: ThreadState,
    pub lock: Option<LockWait>,
}

impl BlockKey {
    /// The key with what a block learns only when it ends left out, so
    /// that the same block is recognised in flight and at its end:
    /// - a futex wait learns its waker when it is woken;
    /// - the user stack is taken on the thread's way back to user space,
    ///   while a block in progress has only its saved registers.
    pub fn settled_identity(&self) -> BlockKey {
        BlockKey {
            lock: self.lock.map(LockWait::without_waker),
            user_stack: StackRef::Missing,
            ..*self
        }
    }
}

/// The kernel lock a thread was waiting for when it blocked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LockWait {
    pub addr: u64,
    pub kind: LockKind,
    /// How the waiter wanted it, for reader-writer locks.
    pub mode: Option<LockMode>,
    /// The waiter's own `mm->mmap_lock`: the lock behind address-space freezes.
    pub is_mmap_lock: bool,
    /// The owner when the wait began, as a tid in our pid namespace; for
    /// a futex, the thread that woke the waiter.
    pub holder_tid: Option<u32>,
    /// A rwsem held by readers, where `holder_tid` is only the last reader in.
    pub held_by_readers: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LockKind {
    /// A user-space lock word, waited on in futex(); the holder is the
    /// thread that woke the waiter.
    Futex,
    Mutex,
    RtMutex,
    RwSemaphore,
    PercpuRwSemaphore,
    Spinlock,
    RwLock,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LockMode {
    Read,
    Write,
}

impl LockWait {
    /// A wait on the futex word at `addr`, woken by `waker` if known.
    #[cfg(test)]
    pub(crate) fn futex(addr: u64, waker: Option<u32>) -> LockWait {
        LockWait {
            addr,
            kind: LockKind::Futex,
            mode: None,
            is_mmap_lock: false,
            holder_tid: waker,
            held_by_readers: false,
        }
    }

    /// A futex wait without the thread that woke it; any other wait as is.
    pub fn without_waker(self) -> LockWait {
        match self.kind {
            LockKind::Futex => LockWait {
                holder_tid: None,
                ..self
            },
            _ => self,
        }
    }

    /// A name for labels: `mmap_lock`, or the kind and address.
    pub fn name(&self) -> String {
        if self.is_mmap_lock {
            return "mmap_lock".to_string();
        }
        let kind = match self.kind {
            LockKind::Futex => "futex",
            LockKind::Mutex => "mutex",
            LockKind::RtMutex => "rt_mutex",
            LockKind::RwSemaphore => "rwsem",
            LockKind::PercpuRwSemaphore => "percpu_rwsem",
            LockKind::Spinlock => "spinlock",
            LockKind::RwLock => "rwlock",
            LockKind::Other => "lock",
        };
        format!("{kind}@{:#x}", self.addr)
    }
}

/// A target thread's hold of its process's mmap_lock, long enough to have
/// blocked someone (at least `min_block`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHold {
    pub tgid: u32,
    pub tid: u32,
    pub thread_name: String,
    /// The lock's address, as [`LockWait::addr`] gives it to its waiters.
    pub lock_addr: u64,
    pub start: SystemTime,
    pub duration: Duration,
    /// How it was taken: a write hold may have been downgraded to read.
    pub mode: LockMode,
    pub downgraded: bool,
    /// The holder's user stack: the call that took the lock.
    pub user_ips: Stack,
    /// The holder's kernel stack where it let go.
    pub kernel_ips: Stack,
}

/// The system calls that grow or shrink an address space by large amounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressCall {
    Mmap,
    Munmap,
    Mremap,
    Brk,
    Madvise,
}

impl AddressCall {
    pub fn name(self) -> &'static str {
        match self {
            AddressCall::Mmap => "mmap",
            AddressCall::Munmap => "munmap",
            AddressCall::Mremap => "mremap",
            AddressCall::Brk => "brk",
            AddressCall::Madvise => "madvise",
        }
    }
}

/// One large address-space call of a target thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressChange {
    pub tgid: u32,
    pub tid: u32,
    pub thread_name: String,
    pub call: AddressCall,
    pub start: SystemTime,
    pub duration: Duration,
    /// The range's start (for brk, the old break).
    pub addr: u64,
    /// Bytes mapped, unmapped, remapped (the change in length) or advised.
    pub size: u64,
    /// mmap's flags, madvise's advice, mremap's flags; 0 otherwise.
    pub arg: u32,
    /// The caller's user stack at entry, innermost first.
    pub user_ips: Stack,
}

use crate::unwind::StackEnd;
pub use crate::unwind::{Entry, UserRegs};

/// Where to unwind a block's user stack from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SavedRegs {
    /// The user registers the thread entered the kernel with.
    pub regs: UserRegs,
    /// Through a system call or a page fault, which says what `regs.ip` is.
    pub entry: Entry,
}

/// A block that has not reached the finished totals yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    pub host_tid: u32,
    /// Monotonic clock (bpf_ktime_get_ns) at switch-out.
    pub start_ns: u64,
    /// The block has ended, but its total waits for the user stack the
    /// thread gives on its way back to user space: nothing more to credit.
    pub owed: bool,
    /// The survey has given the block its stacks. One it has not (it woke
    /// while the survey looked, or began after) is not credited: its parts
    /// would stand under other stacks than its total.
    pub surveyed: bool,
    /// For a [`StackRef::SavedRegs`] user stack: where to unwind it from.
    pub regs: Option<SavedRegs>,
    pub key: BlockKey,
}

/// The maps the kernel side counts drops for, in the order of its
/// `enum drop_reason`: the names metrics and profile comments use.
pub const DROP_MAPS: [&str; 8] = [
    "threads",
    "blocked",
    "stacks_kernel",
    "stacks_user",
    "stacks",
    "lock_holds",
    "address_changes",
    "stack_copies",
];

/// Work the kernel side had to drop, since the probe was loaded, counted
/// per [`DROP_MAPS`] entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounts {
    pub counts: [u64; DROP_MAPS.len()],
}

impl DropCounts {
    /// What was dropped since `earlier` (counters only grow).
    fn since(&self, earlier: &DropCounts) -> DropCounts {
        let mut since = *self;
        for (count, before) in since.counts.iter_mut().zip(earlier.counts) {
            *count = count.saturating_sub(before);
        }
        since
    }

    /// Adds another period's drops to these.
    pub fn add(&mut self, other: &DropCounts) {
        for (count, more) in self.counts.iter_mut().zip(other.counts) {
            *count += more;
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `(map, count)` pairs, for metrics and profile comments.
    pub fn by_map(&self) -> [(&'static str, u64); DROP_MAPS.len()] {
        std::array::from_fn(|index| (DROP_MAPS[index], self.counts[index]))
    }
}

/// Addresses of one stack, innermost first.
pub type Stack = Arc<[u64]>;

/// How a block's user stack ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum UserStackEnd {
    /// Walked by the kernel along frame pointers: its outermost frame
    /// tells whether it is whole.
    #[default]
    Walked,
    /// Unwound to the thread's root.
    Complete,
    /// Unwound until a frame could not be confirmed.
    Truncated,
    /// Not read in time: the process's memory was locked (a freeze in
    /// progress holds its mmap_lock), or the thread woke while it was read.
    /// The stack is empty.
    NotRead,
}

impl From<StackEnd> for UserStackEnd {
    fn from(end: StackEnd) -> Self {
        match end {
            StackEnd::Complete => UserStackEnd::Complete,
            StackEnd::Truncated => UserStackEnd::Truncated,
        }
    }
}

/// Raw (unsymbolized) stacks of one thread's blocked time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockedStack {
    pub tgid: u32,
    pub tid: u32,
    pub thread_name: String,
    pub state: ThreadState,
    /// Kernel return addresses, innermost first. Shared: the same stack
    /// recurs in window after window.
    pub kernel_ips: Stack,
    /// User addresses, innermost first.
    pub user_ips: Stack,
    /// How the user stack ends, where the capture knows.
    pub user_end: UserStackEnd,
    /// The kernel lock it waited for, when it waited for one.
    pub lock: Option<LockWait>,
    pub blocked_ns: u64,
    pub count: u64,
    /// When the time was spent, per window merged into this one; empty for
    /// a window cut straight from the tracer (it is one slice itself).
    pub timeline: Vec<TimeSlice>,
}

/// The off-CPU time of one period, as cut out of a running probe.
#[derive(Debug, Clone)]
pub struct Window {
    pub start: SystemTime,
    pub duration: Duration,
    pub stacks: Vec<BlockedStack>,
    /// mmap_lock holds that ended in this window.
    pub lock_holds: Vec<LockHold>,
    /// Large address-space calls that returned in this window.
    pub address_changes: Vec<AddressChange>,
    /// What the kernel side dropped during this window.
    pub drops: DropCounts,
    pub features: Features,
    /// User stacks of earlier windows of the same tracer that were not
    /// read in time then and are known now.
    pub revisions: Vec<Revision>,
}

/// A user stack, read late, for a stack of an earlier window whose user
/// stack was not read in time: the same block's, so its time stays in the
/// window it was spent in and only gains its frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    /// Which window: 1 is the one cut just before the window that carries
    /// this, 2 the one before that, and so on.
    pub windows_back: usize,
    /// The stack's index in that window's `stacks`.
    pub index: usize,
    pub user_ips: Stack,
    pub user_end: UserStackEnd,
}

/// How many windows back a stack not read in time is still revised: a
/// block frozen for longer keeps its marker in the windows before.
const REVISE_BACK: usize = 8;

impl Window {
    /// Applies `revisions` to the windows cut before this one, `earlier`,
    /// oldest first (the newest of them is 1 window back).
    pub fn revise<'a>(
        revisions: &[Revision],
        earlier: impl DoubleEndedIterator<Item = &'a mut Window>,
    ) {
        if revisions.is_empty() {
            return;
        }
        for (back, window) in earlier.rev().enumerate().take(REVISE_BACK) {
            for revision in revisions.iter().filter(|r| r.windows_back == back + 1) {
                if let Some(stack) = window.stacks.get_mut(revision.index) {
                    if stack.user_end == UserStackEnd::NotRead {
                        stack.user_ips = Stack::clone(&revision.user_ips);
                        stack.user_end = revision.user_end;
                    }
                }
            }
        }
    }
}

/// An attached off-CPU probe and the bookkeeping that cuts windows out of it.
pub struct Tracer<'obj> {
    probe: bpf::Probe<'obj>,
    ledger: Ledger,
    /// What every target of this tracer is watched with.
    filters: bpf::Filters,
    /// When the node's shared probe was last cleared of gone instances.
    tended: Instant,
    threads: threads::Threads,
    window_start_ns: u64,
    window_start_wall: SystemTime,
    /// Frames of the probe's stacks, by hash.
    stack_cache: HashMap<u64, Stack>,
    /// User stacks unwound from saved registers, per block in progress
    /// (host tid, start): unwound once, however many cuts the block spans.
    walked: HashMap<BlockId, (Stack, UserStackEnd)>,
    /// Stacks of earlier windows whose user stack was not read in time,
    /// by block: how many windows back, and the index there.
    unread: Vec<(BlockId, usize, usize)>,
    walker: threads::StackWalker,
    copies: copies::Copies,
    calls: calls::Calls,
    /// The kernel's drop counters at the last cut.
    drops_so_far: DropCounts,
}

/// How often a tracer on the node's shared probe looks for instances that
/// ended without leaving it.
const TEND_EVERY: Duration = Duration::from_secs(2);

/// `CLOCK_MONOTONIC`, the clock bpf_ktime_get_ns() reads.
pub fn monotonic_ns() -> Result<u64, CaptureError> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the timespec we pass.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } != 0 {
        return Err(CaptureError::Clock(std::io::Error::last_os_error()));
    }
    Ok(now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64)
}

impl CaptureConfig {
    fn filters(&self) -> bpf::Filters {
        bpf::Filters {
            tid: self.tid,
            cgroup_id: self.cgroup_id,
            min_block_ns: self.min_block.as_nanos() as u64,
            max_block_ns: self.max_block.map(|max| max.as_nanos() as u64),
            states: self.states.clone(),
            min_address_change: self.min_address_change.filter(|&bytes| bytes > 0),
            unwind_threshold_ns: self
                .unwind_threshold
                .filter(|threshold| !threshold.is_zero())
                .map(|threshold| threshold.as_nanos() as u64),
        }
    }
}

/// A probe loaded into the kernel but not attached: it costs nothing, and
/// attaching it is all a capture then has to wait for (on-trigger mode
/// keeps one ready).
pub struct Loaded<'obj> {
    probe: bpf::Probe<'obj>,
    filters: bpf::Filters,
}

impl<'obj> Loaded<'obj> {
    pub fn load(
        storage: &'obj mut ProbeStorage,
        config: &CaptureConfig,
    ) -> Result<Self, CaptureError> {
        let filters = config.filters();
        let probe = bpf::Probe::load(storage, config.shared_probe_dir.as_deref())?;
        Ok(Loaded { probe, filters })
    }

    /// Whether this probe is the node's shared one (else it is private).
    pub fn is_shared(&self) -> bool {
        self.probe.is_shared()
    }

    /// Attaches for `targets`, then finds the target threads that are
    /// already blocked so that they count from now on.
    pub fn attach(self, targets: &[u32]) -> Result<Tracer<'obj>, CaptureError> {
        let Loaded { mut probe, filters } = self;
        for &pid in targets {
            if !threads::process_exists(pid) {
                return Err(CaptureError::NoSuchProcess(pid));
            }
            probe.add_target(pid, &filters)?;
        }
        probe.attach()?;
        let window_start_ns = monotonic_ns()?;
        let window_start_wall = SystemTime::now();
        probe.survey()?;
        let mut tracer = Tracer {
            probe,
            ledger: Ledger::new(filters.min_block_ns, filters.max_block_ns),
            filters,
            tended: Instant::now(),
            threads: threads::Threads::default(),
            window_start_ns,
            window_start_wall,
            stack_cache: HashMap::new(),
            walked: HashMap::new(),
            unread: Vec::new(),
            walker: threads::StackWalker::start().map_err(CaptureError::Walker)?,
            copies: copies::Copies::default(),
            calls: calls::Calls::default(),
            drops_so_far: DropCounts::default(),
        };
        // Threads blocked before we came: their stacks are read from now
        // on, not when the first cut wants them.
        let in_flight = tracer.probe.in_flight()?;
        tracer.request_walks(&in_flight)?;
        Ok(tracer)
    }
}

impl<'obj> Tracer<'obj> {
    /// Loads and attaches the probe for `targets`, then finds the target
    /// threads that are already blocked so that they count from now on.
    pub fn start(
        storage: &'obj mut ProbeStorage,
        config: &CaptureConfig,
        targets: &[u32],
    ) -> Result<Self, CaptureError> {
        Loaded::load(storage, config)?.attach(targets)
    }

    /// Whether this probe is the node's shared one (else it is private).
    pub fn is_shared(&self) -> bool {
        self.probe.is_shared()
    }

    /// What the kernel let the probe use.
    pub fn features(&self) -> Features {
        self.probe.features
    }

    /// Starts watching another process without reloading; its threads
    /// that are already blocked count from now on.
    pub fn add_target(&mut self, pid: u32) -> Result<(), CaptureError> {
        if !threads::process_exists(pid) {
            return Err(CaptureError::NoSuchProcess(pid));
        }
        self.probe.add_target(pid, &self.filters)
    }

    pub fn remove_target(&mut self, pid: u32) -> Result<(), CaptureError> {
        self.probe.remove_target(pid)
    }

    /// Ends the current window now and returns its off-CPU time: blocks that
    /// ended in it, and blocks still in progress up to now.
    pub fn collect(&mut self) -> Result<Window, CaptureError> {
        // Finished totals first, then the blocks still in progress: the
        // ledger relies on that order (see its docs). The survey in between
        // gives blocks in progress their stacks before they are read.
        let finished = self.probe.drain_blocked()?;
        self.probe.survey()?;
        let in_flight = self.probe.in_flight()?;
        self.request_walks(&in_flight)?;
        // After the drain: every copy a drained total refers to was put in
        // before its total was.
        let copies = self.probe.take_stack_copies()?;
        // A block walked from its saved registers while it lasted left the
        // same stack in its copy: the thread ran no user instruction since.
        // Only the others are unwound.
        let mut to_unwind = Vec::with_capacity(copies.len());
        let copy_of_block: HashMap<BlockId, u64> =
            copies.iter().map(|copy| (copy.block, copy.id)).collect();
        for copy in copies {
            match self.walked.get(&copy.block) {
                Some(walked) => self.copies.keep(copy.id, walked.clone()),
                None => to_unwind.push(copy),
            }
        }
        let copied: HashMap<u64, (u32, bool)> = to_unwind
            .iter()
            .map(|copy| (copy.id, (copy.block.0, copy.to_top)))
            .collect();
        let unwound = self.walker.unwind_copies(to_unwind);
        self.learn_stack_tops(&unwound, &copied)?;
        self.copies.receive(unwound);
        let end_ns = monotonic_ns()?;
        let totals: Vec<(BlockKey, u64, u64)> = finished
            .iter()
            .map(|total| (total.key, total.blocked_ns, total.count))
            .collect();
        let settled = self.ledger.settle(end_ns, &totals, &in_flight);
        let holds = self.probe.drain_lock_holds()?;
        let changes = self
            .calls
            .settle(self.probe.drain_address_changes()?, end_ns);
        let drops_so_far = self.probe.drops()?;
        let drops = drops_so_far.since(&self.drops_so_far);
        self.drops_so_far = drops_so_far;

        // A key's kernel-recorded name, for threads that may have exited.
        let names: foldhash::HashMap<BlockKey, bpf::Comm> = finished
            .iter()
            .map(|total| (total.key, total.comm))
            .collect();
        let saved_regs: foldhash::HashMap<BlockKey, &InFlight> = in_flight
            .iter()
            .filter(|block| block.regs.is_some())
            .map(|block| (block.key, block))
            .collect();
        let mut stacks = Vec::with_capacity(settled.len());
        let mut unread = Vec::new();
        for (key, blocked_ns, count) in settled {
            let kernel_ips = self.stack_of(key.kernel_stack)?;
            let (user_ips, user_end) = match (key.user_stack, saved_regs.get(&key)) {
                (StackRef::SavedRegs, Some(block)) => {
                    let walked = self.walked_stack(block)?;
                    if walked.1 == UserStackEnd::NotRead {
                        unread.push(((block.host_tid, block.start_ns), stacks.len()));
                    }
                    walked
                }
                (StackRef::Copy(id), _) => self.copies.stack(id),
                (stack, _) => (self.stack_of(stack)?, UserStackEnd::Walked),
            };
            let thread_name = match names.get(&key) {
                Some(comm) => self.name_at_the_time(comm, key.tgid, key.tid),
                None => self.threads.name(key.tgid, key.tid),
            };
            stacks.push(BlockedStack {
                tgid: key.tgid,
                tid: key.tid,
                thread_name,
                state: key.state,
                kernel_ips,
                user_ips,
                user_end,
                lock: key.lock,
                blocked_ns,
                count,
                timeline: Vec::new(),
            });
        }
        let mut lock_holds = Vec::with_capacity(holds.len());
        for hold in holds {
            lock_holds.push(LockHold {
                tgid: hold.tgid,
                tid: hold.tid,
                thread_name: self.name_at_the_time(&hold.comm, hold.tgid, hold.tid),
                lock_addr: hold.lock_addr,
                start: self.wall_time(hold.start_ns),
                duration: Duration::from_nanos(hold.duration_ns),
                mode: if hold.write {
                    LockMode::Write
                } else {
                    LockMode::Read
                },
                downgraded: hold.downgraded,
                user_ips: self.stack_of(hold.user_stack)?,
                kernel_ips: self.stack_of(hold.kernel_stack)?,
            });
        }
        let mut address_changes = Vec::with_capacity(changes.len());
        for change in changes {
            address_changes.push(AddressChange {
                tgid: change.tgid,
                tid: change.tid,
                thread_name: self.name_at_the_time(&change.comm, change.tgid, change.tid),
                call: change.call,
                start: self.wall_time(change.start_ns),
                duration: Duration::from_nanos(change.duration_ns),
                addr: change.addr,
                size: change.size,
                arg: change.arg,
                user_ips: self.stack_of(change.user_stack)?,
            });
        }
        lock_holds.sort_by_key(|hold| hold.start);
        address_changes.sort_by_key(|change| change.start);
        self.probe.end_cut();
        if self.tended.elapsed() >= TEND_EVERY {
            self.probe.tend()?;
            self.tended = Instant::now();
        }
        // Only now that every stack of this window is read may slots be freed.
        self.reclaim_stacks(&in_flight)?;
        let flying: std::collections::HashSet<BlockId> = in_flight
            .iter()
            .map(|block| (block.host_tid, block.start_ns))
            .collect();
        let revisions = self.revisions(unread, &copy_of_block, &flying);
        self.walked.retain(|block, _| flying.contains(block));
        self.walker.retain(&flying);
        self.copies.end_cut();
        self.threads.end_window();
        let window = Window {
            start: self.window_start_wall,
            duration: Duration::from_nanos(end_ns.saturating_sub(self.window_start_ns)),
            stacks,
            lock_holds,
            address_changes,
            drops,
            features: self.probe.features,
            revisions,
        };
        self.window_start_wall += window.duration;
        self.window_start_ns = end_ns;
        Ok(window)
    }

    /// The user stacks, known by now, of the stacks of earlier windows that
    /// were not read in time: the block's walk, if it lasts and was walked
    /// at this cut, or the copy taken as it ended. A block still frozen is
    /// looked for again at the next cut; one that ended without either is
    /// not. `unread` are this window's, to look for from the next cut on.
    fn revisions(
        &mut self,
        unread: Vec<(BlockId, usize)>,
        copy_of_block: &HashMap<BlockId, u64>,
        flying: &std::collections::HashSet<BlockId>,
    ) -> Vec<Revision> {
        let mut revisions = Vec::new();
        let mut still_unread = Vec::new();
        for (block, windows_back, index) in std::mem::take(&mut self.unread) {
            let known = match (self.walked.get(&block), copy_of_block.get(&block)) {
                (Some(walked), _) => Some(walked.clone()),
                (None, Some(&copy)) => Some(self.copies.stack(copy)),
                (None, None) => None,
            };
            match known {
                Some((user_ips, user_end)) if user_end != UserStackEnd::NotRead => {
                    revisions.push(Revision {
                        windows_back,
                        index,
                        user_ips,
                        user_end,
                    });
                }
                _ if flying.contains(&block) && windows_back < REVISE_BACK => {
                    still_unread.push((block, windows_back + 1, index));
                }
                _ => {}
            }
        }
        still_unread.extend(unread.into_iter().map(|(block, index)| (block, 1, index)));
        self.unread = still_unread;
        revisions
    }

    /// Tells the probe where the stacks of threads end, from copies that
    /// were unwound whole, so that their next copies stop there. A copy
    /// that stopped at its thread's top and still could not be unwound
    /// whole may have been cut short by it (a coroutine's stack, a tid
    /// that another thread has now): that top is taken away.
    fn learn_stack_tops(
        &mut self,
        unwound: &[(u64, crate::unwind::Unwound)],
        copied: &HashMap<u64, (u32, bool)>,
    ) -> Result<(), CaptureError> {
        for (id, stack) in unwound {
            let Some(&(host_tid, to_top)) = copied.get(id) else {
                // Late, from an earlier cut: it says as much, but its
                // thread is not known here.
                continue;
            };
            match (stack.stack_top, to_top) {
                (Some(top), _) => self.probe.set_stack_top(host_tid, Some(top))?,
                (None, true) => self.probe.set_stack_top(host_tid, None)?,
                (None, false) => {}
            }
        }
        Ok(())
    }

    /// Starts the walker's cut, then has it start on the user stacks of
    /// blocks in progress that have none yet, while the rest of the cut
    /// goes on.
    fn request_walks(&mut self, in_flight: &[InFlight]) -> Result<(), CaptureError> {
        self.walker.begin_cut(self.probe.address_spaces()?);
        for block in in_flight {
            let id = (block.host_tid, block.start_ns);
            if let (Some(saved), false) = (block.regs, self.walked.contains_key(&id)) {
                self.walker.request(id, block.key.tgid, saved);
            }
        }
        Ok(())
    }

    /// The user stack of a block in progress, unwound once from the
    /// registers the survey saved: the thread sleeps, so its stack holds
    /// the frames it blocked in. Empty and [`UserStackEnd::NotRead`] for
    /// this cut if its memory could not be read in time, or the thread woke
    /// while it was read (what was read may be the running thread's).
    fn walked_stack(&mut self, block: &InFlight) -> Result<(Stack, UserStackEnd), CaptureError> {
        let id = (block.host_tid, block.start_ns);
        if let Some(walked) = self.walked.get(&id) {
            return Ok(walked.clone());
        }
        let not_read = (Stack::from([]), UserStackEnd::NotRead);
        let Some(saved) = block.regs else {
            return Ok(not_read);
        };
        let Some(unwound) = self.walker.walk(id, block.key.tgid, saved) else {
            return Ok(not_read);
        };
        let start_now = self.probe.block_start(block.host_tid)?;
        let Some(unwound) = threads::if_still_in(id, start_now, unwound) else {
            return Ok(not_read);
        };
        if unwound.stack_top.is_some() {
            self.probe
                .set_stack_top(block.host_tid, unwound.stack_top)?;
        }
        let walked = (Stack::from(unwound.ips), unwound.end.into());
        self.walked.insert(id, walked.clone());
        Ok(walked)
    }

    /// An armed tracer runs for days and the kernel's stack map would fill
    /// up; once half full, slots no block in progress refers to are freed
    /// (their frames stay cached here until then).
    fn reclaim_stacks(&mut self, in_flight: &[InFlight]) -> Result<(), CaptureError> {
        if self.stack_cache.len() * 2 < self.probe.stack_capacity() as usize {
            return Ok(());
        }
        let in_use: std::collections::HashSet<StackRef> = in_flight
            .iter()
            .flat_map(|block| [block.key.kernel_stack, block.key.user_stack])
            .collect();
        let unused: Vec<u64> = self
            .stack_cache
            .keys()
            .copied()
            .filter(|hash| !in_use.contains(&StackRef::Id(*hash)))
            .collect();
        for hash in unused {
            self.probe.forget_stack(hash)?;
            self.stack_cache.remove(&hash);
        }
        Ok(())
    }

    /// The name the kernel recorded with an event, else the thread's name
    /// now (if the thread is still there).
    fn name_at_the_time(&mut self, comm: &bpf::Comm, tgid: u32, tid: u32) -> String {
        bpf::comm_name(comm).unwrap_or_else(|| self.threads.name(tgid, tid))
    }

    /// The frames of a stack the kernel side keeps.
    fn stack_of(&mut self, stack: StackRef) -> Result<Stack, CaptureError> {
        match stack {
            StackRef::Id(hash) => {
                if let Some(stack) = self.stack_cache.get(&hash) {
                    return Ok(Arc::clone(stack));
                }
                let stack: Stack = self.probe.stack(hash)?.into();
                self.stack_cache.insert(hash, Arc::clone(&stack));
                Ok(stack)
            }
            StackRef::SavedRegs | StackRef::Copy(_) | StackRef::Missing => Ok(Stack::from([])),
        }
    }

    /// The wall-clock time of a monotonic timestamp of this window.
    fn wall_time(&self, monotonic_ns: u64) -> SystemTime {
        if monotonic_ns >= self.window_start_ns {
            self.window_start_wall + Duration::from_nanos(monotonic_ns - self.window_start_ns)
        } else {
            self.window_start_wall - Duration::from_nanos(self.window_start_ns - monotonic_ns)
        }
    }
}
