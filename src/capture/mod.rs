//! Off-CPU capture: a BPF probe on `sched_switch` that stays attached while
//! windows are cut out of it.
//!
//! [`Tracer::start`] loads and attaches the probe for a set of target
//! processes; every [`Tracer::collect`] returns the off-CPU time of the period
//! since the previous one. Blocks that span a boundary are split exactly at
//! it (see [`ledger`]), so a one-shot capture is one `collect` at the end, and
//! an armed flight recorder is a `collect` every tick.

mod bpf;
mod ledger;
pub mod recorder;
mod threads;

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use bpf::{Features, Hook};
use libbpf_rs::OpenObject;

use crate::profile::{ThreadState, TimeSlice};
use ledger::Ledger;

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
}

/// The default for [`CaptureConfig::min_address_change`]: far above any
/// allocator's ordinary traffic, well below a big table's resize.
pub const DEFAULT_MIN_ADDRESS_CHANGE: u64 = 64 << 20;

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            tid: None,
            cgroup_id: None,
            min_block: Duration::from_millis(1),
            max_block: None,
            states: ThreadState::ALL.to_vec(),
            min_address_change: Some(DEFAULT_MIN_ADDRESS_CHANGE),
        }
    }
}

/// Where a block's stack is to be found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StackRef {
    /// An id in the probe's stack map.
    Id(u32),
    /// The thread was already blocked when the capture began; its kernel
    /// stack was taken by the task iterator.
    Preblocked,
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
    /// The key with what may change while a block is still in progress
    /// left out: a futex wait learns its waker only when it ends, so the
    /// same block is seen without one while in flight and with one at the
    /// end.
    pub fn settled_identity(&self) -> BlockKey {
        BlockKey {
            lock: self.lock.map(LockWait::without_waker),
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
    /// The call's return value (negative: an errno).
    pub result: i64,
    /// The caller's user stack at entry, innermost first.
    pub user_ips: Stack,
}

/// A block that has not ended yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    pub host_tid: u32,
    /// Monotonic clock (bpf_ktime_get_ns) at switch-out.
    pub start_ns: u64,
    pub key: BlockKey,
}

/// Work the kernel side had to drop, since the probe was loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounts {
    pub start_map_full: u64,
    pub blocked_map_full: u64,
    pub kernel_stack: u64,
    pub user_stack: u64,
    pub preblocked_map_full: u64,
    pub lock_hold_map_full: u64,
    pub address_change_map_full: u64,
}

impl DropCounts {
    /// What was dropped since `earlier` (counters only grow).
    fn since(&self, earlier: &DropCounts) -> DropCounts {
        DropCounts {
            start_map_full: self.start_map_full.saturating_sub(earlier.start_map_full),
            blocked_map_full: self
                .blocked_map_full
                .saturating_sub(earlier.blocked_map_full),
            kernel_stack: self.kernel_stack.saturating_sub(earlier.kernel_stack),
            user_stack: self.user_stack.saturating_sub(earlier.user_stack),
            preblocked_map_full: self
                .preblocked_map_full
                .saturating_sub(earlier.preblocked_map_full),
            lock_hold_map_full: self
                .lock_hold_map_full
                .saturating_sub(earlier.lock_hold_map_full),
            address_change_map_full: self
                .address_change_map_full
                .saturating_sub(earlier.address_change_map_full),
        }
    }

    /// Adds another period's drops to these.
    pub fn add(&mut self, other: &DropCounts) {
        self.start_map_full += other.start_map_full;
        self.blocked_map_full += other.blocked_map_full;
        self.kernel_stack += other.kernel_stack;
        self.user_stack += other.user_stack;
        self.preblocked_map_full += other.preblocked_map_full;
        self.lock_hold_map_full += other.lock_hold_map_full;
        self.address_change_map_full += other.address_change_map_full;
    }

    pub fn total(&self) -> u64 {
        self.start_map_full
            + self.blocked_map_full
            + self.kernel_stack
            + self.user_stack
            + self.preblocked_map_full
            + self.lock_hold_map_full
            + self.address_change_map_full
    }

    /// `(map, count)` pairs, for metrics and profile comments.
    pub fn by_map(&self) -> [(&'static str, u64); 7] {
        [
            ("starts", self.start_map_full),
            ("blocked", self.blocked_map_full),
            ("stacks_kernel", self.kernel_stack),
            ("stacks_user", self.user_stack),
            ("preblocked_stacks", self.preblocked_map_full),
            ("lock_holds", self.lock_hold_map_full),
            ("address_changes", self.address_change_map_full),
        ]
    }
}

/// Addresses of one stack, innermost first.
pub type Stack = Arc<[u64]>;

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
}

/// An attached off-CPU probe and the bookkeeping that cuts windows out of it.
pub struct Tracer<'obj> {
    probe: bpf::Probe<'obj>,
    ledger: Ledger,
    threads: threads::Threads,
    window_start_ns: u64,
    window_start_wall: SystemTime,
    stack_cache: HashMap<u32, Stack>,
    /// Stacks of threads found blocked at start, by tid: (kernel, user).
    preblocked: HashMap<u32, (Stack, Stack)>,
    /// The kernel's drop counters at the last cut.
    drops_so_far: DropCounts,
}

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
        let probe = bpf::Probe::load(storage, &filters)?;
        Ok(Loaded { probe, filters })
    }

    /// Attaches for `targets`, then finds the target threads that are
    /// already blocked so that they count from now on.
    pub fn attach(self, targets: &[u32]) -> Result<Tracer<'obj>, CaptureError> {
        let Loaded { mut probe, filters } = self;
        for &pid in targets {
            if !threads::process_exists(pid) {
                return Err(CaptureError::NoSuchProcess(pid));
            }
            probe.add_target(pid)?;
        }
        probe.attach()?;
        let window_start_ns = monotonic_ns()?;
        let window_start_wall = SystemTime::now();
        probe.find_preblocked()?;
        let mut tracer = Tracer {
            probe,
            ledger: Ledger::new(filters.min_block_ns, filters.max_block_ns),
            threads: threads::Threads::default(),
            window_start_ns,
            window_start_wall,
            stack_cache: HashMap::new(),
            preblocked: HashMap::new(),
            drops_so_far: DropCounts::default(),
        };
        tracer.note_preblocked_threads()?;
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

    /// What the kernel let the probe use.
    pub fn features(&self) -> Features {
        self.probe.features
    }

    /// Starts watching another process without reloading.
    pub fn add_target(&self, pid: u32) -> Result<(), CaptureError> {
        if !threads::process_exists(pid) {
            return Err(CaptureError::NoSuchProcess(pid));
        }
        self.probe.add_target(pid)
    }

    pub fn remove_target(&self, pid: u32) -> Result<(), CaptureError> {
        self.probe.remove_target(pid)
    }

    /// Takes the stacks of threads the iterator found blocked. Their user
    /// stacks are walked now, while they still sleep and the stack memory
    /// still holds the frames they blocked in.
    fn note_preblocked_threads(&mut self) -> Result<(), CaptureError> {
        for block in self.probe.in_flight()? {
            if block.key.kernel_stack != StackRef::Preblocked {
                continue;
            }
            let found = self.probe.preblocked_stack(block.key.tid)?;
            let user_ips = match found.user_ip {
                0 => Vec::new(),
                ip => threads::walk_user_stack(
                    block.key.tgid,
                    ip,
                    found.user_fp,
                    bpf::MAX_STACK_DEPTH,
                ),
            };
            self.preblocked
                .insert(block.key.tid, (found.kernel_ips.into(), user_ips.into()));
        }
        Ok(())
    }

    /// Ends the current window now and returns its off-CPU time: blocks that
    /// ended in it, and blocks still in progress up to now.
    pub fn collect(&mut self) -> Result<Window, CaptureError> {
        // Finished totals first, then the blocks still in progress: the
        // ledger relies on that order (see its docs).
        let finished = self.probe.drain_blocked()?;
        let in_flight = self.probe.in_flight()?;
        let end_ns = monotonic_ns()?;
        let settled = self.ledger.settle(end_ns, &finished, &in_flight);
        let holds = self.probe.drain_lock_holds()?;
        let changes = self.probe.drain_address_changes()?;
        let drops_so_far = self.probe.drops()?;
        let drops = drops_so_far.since(&self.drops_so_far);
        self.drops_so_far = drops_so_far;

        let mut stacks = Vec::with_capacity(settled.len());
        for (key, blocked_ns, count) in settled {
            let kernel_ips = self.kernel_ips(key)?;
            let user_ips = self.user_ips(key)?;
            stacks.push(BlockedStack {
                tgid: key.tgid,
                tid: key.tid,
                thread_name: self.threads.name(key.tgid, key.tid),
                state: key.state,
                kernel_ips,
                user_ips,
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
                result: change.result,
                user_ips: self.stack_of(change.user_stack)?,
            });
        }
        lock_holds.sort_by_key(|hold| hold.start);
        address_changes.sort_by_key(|change| change.start);
        // Only now that every stack of this window is read may slots be freed.
        self.reclaim_stacks(&in_flight)?;
        self.threads.end_window();
        let window = Window {
            start: self.window_start_wall,
            duration: Duration::from_nanos(end_ns.saturating_sub(self.window_start_ns)),
            stacks,
            lock_holds,
            address_changes,
            drops,
            features: self.probe.features,
        };
        self.window_start_wall += window.duration;
        self.window_start_ns = end_ns;
        Ok(window)
    }

    /// An armed tracer runs for days and the kernel's stack map would fill
    /// up; once half full, slots no block in progress refers to are freed
    /// (their frames stay cached here until then).
    fn reclaim_stacks(&mut self, in_flight: &[InFlight]) -> Result<(), CaptureError> {
        if self.stack_cache.len() * 2 < self.probe.stack_capacity() as usize {
            return Ok(());
        }
        let in_use: std::collections::HashSet<u32> = in_flight
            .iter()
            .flat_map(|block| [block.key.kernel_stack, block.key.user_stack])
            .filter_map(|stack| match stack {
                StackRef::Id(id) => Some(id),
                _ => None,
            })
            .collect();
        let unused: Vec<u32> = self
            .stack_cache
            .keys()
            .copied()
            .filter(|id| !in_use.contains(id))
            .collect();
        for id in unused {
            self.probe.forget_stack(id)?;
            self.stack_cache.remove(&id);
        }
        Ok(())
    }

    fn kernel_ips(&mut self, key: BlockKey) -> Result<Stack, CaptureError> {
        match key.kernel_stack {
            StackRef::Id(id) => self.cached_stack(id),
            StackRef::Preblocked => Ok(self.preblocked_ips(key.tid).0),
            StackRef::Missing => Ok(Stack::from([])),
        }
    }

    fn user_ips(&mut self, key: BlockKey) -> Result<Stack, CaptureError> {
        match key.user_stack {
            StackRef::Id(id) => self.cached_stack(id),
            StackRef::Preblocked => Ok(self.preblocked_ips(key.tid).1),
            StackRef::Missing => Ok(Stack::from([])),
        }
    }

    /// The name the kernel recorded with an event, else the thread's name
    /// now (if the thread is still there).
    fn name_at_the_time(&mut self, comm: &bpf::Comm, tgid: u32, tid: u32) -> String {
        bpf::comm_name(comm).unwrap_or_else(|| self.threads.name(tgid, tid))
    }

    /// A stack recorded by id alone (holds and address-space calls).
    fn stack_of(&mut self, stack: StackRef) -> Result<Stack, CaptureError> {
        match stack {
            StackRef::Id(id) => self.cached_stack(id),
            StackRef::Preblocked | StackRef::Missing => Ok(Stack::from([])),
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

    fn preblocked_ips(&self, tid: u32) -> (Stack, Stack) {
        self.preblocked
            .get(&tid)
            .cloned()
            .unwrap_or_else(|| (Stack::from([]), Stack::from([])))
    }

    fn cached_stack(&mut self, id: u32) -> Result<Stack, CaptureError> {
        if let Some(stack) = self.stack_cache.get(&id) {
            return Ok(Arc::clone(stack));
        }
        let stack: Stack = self.probe.stack(id)?.into();
        self.stack_cache.insert(id, Arc::clone(&stack));
        Ok(stack)
    }
}
