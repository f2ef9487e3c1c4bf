//! The one place that touches BPF: it opens, tunes, loads and attaches the
//! `offcpu` skeleton and turns map bytes into owned values. Everything outside
//! this module sees plain Rust types.

use std::cell::RefCell;
use std::io::Read;
use std::mem::{size_of, MaybeUninit};
use std::os::unix::fs::MetadataExt;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{
    Iter, Link, MapCore, MapFlags, OpenObject, PrintLevel, RingBuffer, RingBufferBuilder,
};

use super::copies::StackCopy;
use super::{
    AddressCall, BlockKey, CaptureError, DropCounts, InFlight, LockKind, LockMode, LockWait,
    SavedRegs, StackRef, UserRegs,
};
use crate::profile::ThreadState;
use crate::unwind::Entry;

#[allow(
    clippy::all,
    clippy::pedantic,
    dead_code,
    unused_imports,
    non_camel_case_types
)]
mod offcpu {
    include!(concat!(env!("OUT_DIR"), "/offcpu.skel.rs"));
}

use offcpu::types;
use offcpu::{OffcpuSkel, OffcpuSkelBuilder};

// One drop counter per name in DROP_MAPS, in the kernel's order.
const _: () = assert!(types::drop_reason::DROP_REASON_COUNT.0 as usize == super::DROP_MAPS.len());

/// `/proc/self/ns/pid` of the initial pid namespace (PROC_PID_INIT_INO).
const INITIAL_PIDNS_INO: u64 = 0xEFFF_FFFC;
const BATCH: u32 = 4096;

/// Kernel-side filters, fixed for the life of a loaded probe.
#[derive(Debug, Clone)]
pub(super) struct Filters {
    pub tid: Option<u32>,
    pub cgroup_id: Option<u64>,
    pub min_block_ns: u64,
    pub max_block_ns: Option<u64>,
    pub states: Vec<ThreadState>,
    /// Address-space calls smaller than this are not recorded; `None`: none are.
    pub min_address_change: Option<u64>,
    /// Finished blocks at least this long get a copy of their user stack to
    /// unwind; `None`: none do.
    pub unwind_threshold_ns: Option<u64>,
}

/// The deepest stack the kernel records (PERF_MAX_STACK_DEPTH).
pub(super) const MAX_STACK_DEPTH: usize = 127;

/// A finished-block total as the kernel summed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RawTotal {
    pub key: BlockKey,
    pub blocked_ns: u64,
    pub count: u64,
    /// The thread's name when the total began: it may be gone by now.
    pub comm: Comm,
}

/// A thread's name as the kernel keeps it (`comm`, NUL-padded).
pub(super) type Comm = [u8; 16];

/// The name in a `comm`, or `None` if the kernel gave none.
pub(super) fn comm_name(comm: &Comm) -> Option<String> {
    let end = comm
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(comm.len());
    (end > 0).then(|| String::from_utf8_lossy(&comm[..end]).into_owned())
}

/// A finished mmap_lock hold as the kernel recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RawHold {
    pub tgid: u32,
    pub tid: u32,
    /// The holder's name as the kernel had it.
    pub comm: Comm,
    pub lock_addr: u64,
    /// Monotonic clock at acquisition.
    pub start_ns: u64,
    pub duration_ns: u64,
    pub write: bool,
    pub downgraded: bool,
    pub user_stack: StackRef,
    pub kernel_stack: StackRef,
}

/// A finished large address-space call as the kernel recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RawAddressChange {
    pub tgid: u32,
    pub tid: u32,
    /// The caller's name as the kernel had it.
    pub comm: Comm,
    pub call: AddressCall,
    /// Monotonic clock at entry.
    pub start_ns: u64,
    pub duration_ns: u64,
    pub addr: u64,
    pub size: u64,
    pub arg: u32,
    /// A population under a later read hold is still to come (see
    /// `CHANGE_POPULATE_PENDING`): the call's duration is not final.
    pub populate_pending: bool,
    pub user_stack: StackRef,
}

/// Which attach point the kernel accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// `tp_btf/sched_switch`: typed arguments, the cheapest.
    TpBtf,
    /// `raw_tp/sched_switch`: the fallback for kernels that refuse tp_btf.
    RawTp,
}

/// What this kernel let the probe use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    pub hook: Hook,
    /// `lock:contention_begin/end` are there: blocked threads are labelled
    /// with the kernel lock they wait for and its holder.
    pub lock_contention: bool,
    /// `mmap_lock:mmap_lock_acquire_returned/released` are there: long
    /// mmap_lock holds are recorded with the holder's stack.
    pub mmap_lock_holds: bool,
    /// Large address-space calls are recorded (wanted, and seen through
    /// the mmap_lock holds they take).
    pub address_changes: bool,
    /// `rseq:rseq_update` is there: a block's user stack is taken on the
    /// thread's way back to user space, only for blocks that reached
    /// min_block, instead of at every switch-out.
    pub stacks_on_return: bool,
}

impl std::fmt::Display for Features {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hook = match self.hook {
            Hook::TpBtf => "tp_btf",
            Hook::RawTp => "raw_tp",
        };
        let on = |yes: bool| if yes { "on" } else { "off" };
        write!(
            f,
            "sched_switch via {hook}, lock attribution {}, mmap_lock holds {}, \
             address-space changes {}, user stacks {}",
            on(self.lock_contention),
            on(self.mmap_lock_holds),
            on(self.address_changes),
            if self.stacks_on_return {
                "on return"
            } else {
                "at switch-out"
            }
        )
    }
}

/// Optional tracepoints: what they give, and whether the kernel's refusal
/// has been reported yet (once per process, not once per capture).
struct Optional {
    tracepoints: &'static str,
    without: &'static str,
    reported: AtomicBool,
}

static LOCK_CONTENTION: Optional = Optional {
    tracepoints: "lock:contention_begin/end",
    without: "blocked threads are captured without naming the lock they wait for",
    reported: AtomicBool::new(false),
};
static MMAP_LOCK: Optional = Optional {
    tracepoints: "mmap_lock:mmap_lock_acquire_returned/released",
    without: "mmap_lock waits are captured without the holder's hold time and stack",
    reported: AtomicBool::new(false),
};
static WAKEUPS: Optional = Optional {
    tracepoints: "sched:sched_waking",
    without: "user-space lock (futex) waits are captured without the thread that woke them",
    reported: AtomicBool::new(false),
};
static RSEQ: Optional = Optional {
    tracepoints: "rseq:rseq_update",
    without: "user stacks are taken at every switch-out of a target thread, which costs its \
              threads a stack walk per context switch",
    reported: AtomicBool::new(false),
};

impl Optional {
    fn unavailable(&self, err: &libbpf_rs::Error) {
        if !self.reported.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "this kernel refused the {} tracepoints ({err}): {}",
                self.tracepoints,
                self.without
            );
        }
    }
}

/// A loaded and attached off-CPU probe.
pub(super) struct Probe<'obj> {
    skel: OffcpuSkel<'obj>,
    _links: Vec<Link>,
    /// `stack_copies`, consumed into `copied` at every cut.
    copies: RingBuffer<'static>,
    copied: Rc<RefCell<Vec<Vec<u8>>>>,
    pub features: Features,
}

/// Plain-old-data skeleton types that may be built from map bytes.
///
/// # Safety
/// Implementors must be `repr(C)` structs of integers (or transparent integer
/// newtypes), valid for every bit pattern.
unsafe trait Pod: Copy + Default {}
unsafe impl Pod for types::thread {}
unsafe impl Pod for types::block_key {}
unsafe impl Pod for types::block_total {}
unsafe impl Pod for types::stack {}
unsafe impl Pod for types::target {}
unsafe impl Pod for types::lock_wait {}
unsafe impl Pod for types::lock_wait_stack {}
unsafe impl Pod for types::lock_hold {}
unsafe impl Pod for types::address_change {}
unsafe impl Pod for types::stack_copy {}
unsafe impl Pod for u32 {}
unsafe impl Pod for u64 {}

fn from_bytes<T: Pod>(bytes: &[u8]) -> Result<T, CaptureError> {
    if bytes.len() < size_of::<T>() {
        return Err(CaptureError::MapLayout {
            expected: size_of::<T>(),
            got: bytes.len(),
        });
    }
    // SAFETY: the length is checked above and `T: Pod` is valid for any bits;
    // read_unaligned copes with the Vec's alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn state_from_kernel(state: types::thread_state) -> ThreadState {
    match state {
        types::thread_state::THREAD_STATE_RUNNABLE => ThreadState::Runnable,
        types::thread_state::THREAD_STATE_SLEEPING => ThreadState::Sleeping,
        types::thread_state::THREAD_STATE_DISK => ThreadState::Disk,
        _ => ThreadState::Other,
    }
}

fn state_bit(state: ThreadState) -> u32 {
    let class = match state {
        ThreadState::Runnable => types::thread_state::THREAD_STATE_RUNNABLE,
        ThreadState::Sleeping => types::thread_state::THREAD_STATE_SLEEPING,
        ThreadState::Disk => types::thread_state::THREAD_STATE_DISK,
        ThreadState::Other => types::thread_state::THREAD_STATE_OTHER,
    };
    1 << class.0
}

fn stack_ref(key: u64) -> StackRef {
    use types::stack_special as special;
    if key & 1 == 1 {
        return StackRef::Id(key);
    }
    match key & u64::from(special::STACK_KIND_MASK.0) {
        kind if kind == u64::from(special::STACK_COPY.0) => StackRef::Copy(key),
        _ if key == u64::from(special::STACK_SAVED_REGS.0) => StackRef::SavedRegs,
        _ => StackRef::Missing,
    }
}

/// A record of `stack_copies`: its header, then the copied stack.
fn stack_copy_from_record(record: &[u8]) -> Result<StackCopy, CaptureError> {
    let header: types::stack_copy = from_bytes(record)?;
    let bytes = &record[size_of::<types::stack_copy>()..];
    let size = header.size as usize;
    if bytes.len() < size {
        return Err(CaptureError::MapLayout {
            expected: size_of::<types::stack_copy>() + size,
            got: record.len(),
        });
    }
    Ok(StackCopy {
        id: header.id,
        tgid: header.tgid,
        regs: UserRegs {
            ip: header.ip,
            sp: header.sp,
            fp: header.fp,
        },
        entry: if header.flags & types::stack_copy_flags::STACK_COPY_FAULT.0 != 0 {
            Entry::Fault
        } else {
            Entry::SystemCall
        },
        bytes: bytes[..size].to_vec(),
    })
}

fn key_from_kernel(key: &types::block_key) -> BlockKey {
    BlockKey {
        tgid: key.tgid,
        tid: key.tid,
        kernel_stack: stack_ref(key.kernel_stack),
        user_stack: stack_ref(key.user_stack),
        state: state_from_kernel(key.state),
        lock: lock_from_kernel(&key.lock),
    }
}

/// A 4-byte map key, as the kernel hands it back.
fn u32_key(key: &[u8]) -> Result<u32, CaptureError> {
    from_bytes::<u32>(key)
}

fn lock_from_kernel(lock: &types::lock_wait) -> Option<LockWait> {
    use types::lock_kind as bits;
    if lock.addr == 0 {
        return None;
    }
    let has = |bit: bits| lock.kind & bit.0 != 0;
    let kind = if has(bits::LOCK_FUTEX) {
        LockKind::Futex
    } else if has(bits::LOCK_MUTEX) {
        if has(bits::LOCK_RT) {
            LockKind::RtMutex
        } else {
            LockKind::Mutex
        }
    } else if has(bits::LOCK_SPIN) {
        if has(bits::LOCK_READ) || has(bits::LOCK_WRITE) {
            LockKind::RwLock
        } else {
            LockKind::Spinlock
        }
    } else if has(bits::LOCK_PERCPU) {
        LockKind::PercpuRwSemaphore
    } else if has(bits::LOCK_READ) || has(bits::LOCK_WRITE) {
        LockKind::RwSemaphore
    } else {
        LockKind::Other
    };
    let mode = if has(bits::LOCK_WRITE) {
        Some(LockMode::Write)
    } else if has(bits::LOCK_READ) {
        Some(LockMode::Read)
    } else {
        None
    };
    Some(LockWait {
        addr: lock.addr,
        kind,
        mode,
        is_mmap_lock: has(bits::LOCK_MMAP),
        holder_tid: (lock.holder_tid != 0).then_some(lock.holder_tid),
        held_by_readers: has(bits::LOCK_HOLDER_READER),
    })
}

/// Our own pid namespace, if it is not the initial one: BPF then reports
/// (and filters on) pids as we see them, not host pids.
fn own_pid_namespace() -> Result<Option<(u64, u64)>, CaptureError> {
    let meta = std::fs::metadata("/proc/self/ns/pid").map_err(CaptureError::PidNamespace)?;
    if meta.ino() == INITIAL_PIDNS_INO {
        Ok(None)
    } else {
        Ok(Some((meta.dev(), meta.ino())))
    }
}

/// libbpf narrates every load on stderr; keep its warnings (prefixed, so a
/// reader knows where they come from) and drop the chatter.
fn route_libbpf_messages() {
    fn print(level: PrintLevel, message: String) {
        if level == PrintLevel::Warn {
            eprint!("libbpf: {message}");
        }
    }
    libbpf_rs::set_print(Some((PrintLevel::Warn, print)));
}

impl<'obj> Probe<'obj> {
    /// Loads the program (`tp_btf`, falling back to `raw_tp`) without
    /// attaching it: a loaded probe costs nothing until [`Probe::attach`].
    pub fn load(
        storage: &'obj mut MaybeUninit<OpenObject>,
        filters: &Filters,
    ) -> Result<Self, CaptureError> {
        route_libbpf_messages();
        let pidns = own_pid_namespace()?;
        let hook = Self::supported_hook(filters, pidns);
        let skel = Self::open_tuned(storage, filters, pidns, hook)?
            .load()
            .map_err(|err| CaptureError::Load {
                detail: format!("sched_switch via {hook:?}: {err}"),
            })?;
        let copied = Rc::new(RefCell::new(Vec::new()));
        let arrived = Rc::clone(&copied);
        let mut builder = RingBufferBuilder::new();
        builder
            .add(&skel.maps.stack_copies, move |record: &[u8]| {
                arrived.borrow_mut().push(record.to_vec());
                0
            })
            .map_err(|source| CaptureError::Map {
                map: "stack_copies",
                source,
            })?;
        let copies = builder.build().map_err(|source| CaptureError::Map {
            map: "stack_copies",
            source,
        })?;
        Ok(Probe {
            skel,
            _links: Vec::new(),
            copies,
            copied,
            features: Features {
                hook,
                lock_contention: false,
                mmap_lock_holds: false,
                address_changes: false,
                stacks_on_return: false,
            },
        })
    }

    /// Attaches the sched_switch hook, then whichever attribution
    /// tracepoints this kernel has: a kernel without them still gets
    /// off-CPU profiles, and says once what it is missing.
    pub fn attach(&mut self) -> Result<(), CaptureError> {
        let progs = &self.skel.progs;
        let switch = match self.features.hook {
            Hook::TpBtf => &progs.sched_switch_btf,
            Hook::RawTp => &progs.sched_switch_raw,
        };
        let mut links = vec![switch.attach().map_err(|source| CaptureError::Attach {
            what: "sched_switch tracepoint",
            source,
        })?];
        let mut attach_all =
            |optional: &Optional, attached: Vec<libbpf_rs::Result<Link>>| match attached
                .into_iter()
                .collect::<Result<Vec<Link>, _>>()
            {
                Ok(attached) => {
                    links.extend(attached);
                    true
                }
                Err(err) => {
                    optional.unavailable(&err);
                    false
                }
            };
        self.features.lock_contention = attach_all(
            &LOCK_CONTENTION,
            vec![
                progs.contention_begin.attach(),
                progs.contention_end.attach(),
            ],
        );
        // The waker of a futex wait: without it the wait is still named.
        let wakeup = match self.features.hook {
            Hook::TpBtf => &progs.sched_waking_btf,
            Hook::RawTp => &progs.sched_waking_raw,
        };
        attach_all(&WAKEUPS, vec![wakeup.attach()]);
        self.features.mmap_lock_holds = attach_all(
            &MMAP_LOCK,
            vec![
                progs.mmap_lock_acquired.attach(),
                progs.mmap_lock_released.attach(),
            ],
        );
        let wanted = self
            .skel
            .maps
            .rodata_data
            .as_ref()
            .is_some_and(|rodata| rodata.tunables.min_address_change > 0);
        self.features.address_changes = wanted && self.features.mmap_lock_holds;
        // The raw_tp switch hook takes every stack at switch-out anyway.
        if self.features.hook == Hook::TpBtf {
            self.features.stacks_on_return = attach_all(&RSEQ, vec![progs.rseq_update.attach()]);
        }
        self._links = links;
        if self.features.stacks_on_return {
            self.bss().stacks_on_return = 1;
        }
        Ok(())
    }

    fn bss(&mut self) -> &mut types::bss {
        self.skel
            .maps
            .bss_data
            .as_deref_mut()
            .expect("offcpu.bpf.c declares .bss globals")
    }

    /// Which sched_switch hook this kernel takes, learned once per process
    /// by a trial load: `tp_btf`, else `raw_tp`.
    fn supported_hook(filters: &Filters, pidns: Option<(u64, u64)>) -> Hook {
        static HOOK: OnceLock<Hook> = OnceLock::new();
        *HOOK.get_or_init(|| {
            let mut trial = MaybeUninit::uninit();
            let loaded = Self::open_tuned_raw(&mut trial, filters, pidns, Hook::TpBtf)
                .and_then(|open| open.load())
                .is_ok();
            if loaded {
                Hook::TpBtf
            } else {
                Hook::RawTp
            }
        })
    }

    fn open_tuned<'a>(
        storage: &'a mut MaybeUninit<OpenObject>,
        filters: &Filters,
        pidns: Option<(u64, u64)>,
        hook: Hook,
    ) -> Result<offcpu::OpenOffcpuSkel<'a>, CaptureError> {
        Self::open_tuned_raw(storage, filters, pidns, hook).map_err(|err| CaptureError::Load {
            detail: err.to_string(),
        })
    }

    fn open_tuned_raw<'a>(
        storage: &'a mut MaybeUninit<OpenObject>,
        filters: &Filters,
        pidns: Option<(u64, u64)>,
        hook: Hook,
    ) -> Result<offcpu::OpenOffcpuSkel<'a>, libbpf_rs::Error> {
        let mut open = OffcpuSkelBuilder::default().open(storage)?;
        let rodata = open
            .maps
            .rodata_data
            .as_deref_mut()
            .expect("offcpu.bpf.c declares const volatile tunables");
        let (pidns_dev, pidns_ino) = pidns.unwrap_or((0, 0));
        rodata.tunables = types::tunables {
            min_block_ns: filters.min_block_ns,
            max_block_ns: filters.max_block_ns.unwrap_or(u64::MAX),
            cgroup_id: filters.cgroup_id.unwrap_or(0),
            min_address_change: filters.min_address_change.unwrap_or(0),
            pidns_dev,
            pidns_ino,
            unwind_threshold_ns: filters.unwind_threshold_ns.unwrap_or(u64::MAX),
            tid: filters.tid.unwrap_or(0),
            state_mask: filters
                .states
                .iter()
                .map(|state| state_bit(*state))
                .fold(0, |a, b| a | b),
        };
        open.progs
            .sched_switch_btf
            .set_autoload(hook == Hook::TpBtf);
        open.progs
            .sched_switch_raw
            .set_autoload(hook == Hook::RawTp);
        Ok(open)
    }

    /// Watches a process (by its tgid in our namespace). Its host tgid is
    /// learned, and its bit in `target_bits` set, by the next survey.
    pub fn add_target(&self, tgid: u32) -> Result<(), CaptureError> {
        // host_tgid 0: not seen yet.
        let unseen = [0u8; size_of::<types::target>()];
        self.skel
            .maps
            .targets
            .update(&tgid.to_ne_bytes(), &unseen, MapFlags::NO_EXIST)
            .or_else(|err| match err.kind() {
                libbpf_rs::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(err),
            })
            .map_err(|source| CaptureError::Map {
                map: "targets",
                source,
            })
    }

    /// Stops watching a process, and lets go of the entries of its threads.
    pub fn remove_target(&mut self, tgid: u32) -> Result<(), CaptureError> {
        let map_error = |source| CaptureError::Map {
            map: "targets",
            source,
        };
        let key = tgid.to_ne_bytes();
        let Some(value) = self
            .skel
            .maps
            .targets
            .lookup(&key, MapFlags::ANY)
            .map_err(map_error)?
        else {
            return Ok(());
        };
        let host_tgid = from_bytes::<types::target>(&value)?.host_tgid;
        if host_tgid != 0 {
            self.clear_target_bit(host_tgid);
        }
        match self.skel.maps.targets.delete(&key) {
            Ok(()) => {}
            Err(err) if err.kind() == libbpf_rs::ErrorKind::NotFound => {}
            Err(source) => return Err(map_error(source)),
        }
        let threads = &self.skel.maps.threads;
        for (host_tid, value) in threads
            .lookup_batch(BATCH, MapFlags::ANY, MapFlags::ANY)
            .map_err(|source| CaptureError::Map {
                map: "threads",
                source,
            })?
        {
            if from_bytes::<types::thread>(&value)?.key.tgid == tgid {
                // Gone already if the thread exited meanwhile.
                let _ = threads.delete(&host_tid);
            }
        }
        Ok(())
    }

    /// Clears a host tgid's bit. The survey sets bits concurrently (in the
    /// kernel, atomically), so the word is changed atomically here too.
    fn clear_target_bit(&mut self, host_tgid: u32) {
        let word = (host_tgid >> 6) as usize;
        let bits = &mut self.bss().target_bits;
        if let Some(slot) = bits.get_mut(word) {
            // SAFETY: the slot is an aligned u64 of the mapped .bss, which
            // lives as long as the skeleton; the kernel only ever changes it
            // with atomic operations.
            let atomic = unsafe { AtomicU64::from_ptr(slot as *mut u64) };
            atomic.fetch_and(!(1u64 << (host_tgid & 63)), Ordering::SeqCst);
        }
    }

    /// Runs the survey once (see `survey` in offcpu.bpf.c): new targets get
    /// their bits, threads already off the CPU are entered as blocks that
    /// start now, and blocks in progress get their stacks and registers.
    pub fn survey(&self) -> Result<(), CaptureError> {
        let link = self
            .skel
            .progs
            .survey
            .attach()
            .map_err(|err| CaptureError::Attach {
                what: "task iterator",
                source: err,
            })?;
        let mut iter = Iter::new(&link).map_err(|err| CaptureError::Attach {
            what: "task iterator",
            source: err,
        })?;
        // The program writes nothing; reading to the end is what runs it.
        let mut sink = Vec::new();
        iter.read_to_end(&mut sink).map_err(CaptureError::Iterate)?;
        Ok(())
    }

    /// Blocks still in progress, and ended ones still owed their user
    /// stack, by host tid.
    pub fn in_flight(&self) -> Result<Vec<InFlight>, CaptureError> {
        let entries = self
            .skel
            .maps
            .threads
            .lookup_batch(BATCH, MapFlags::ANY, MapFlags::ANY)
            .map_err(|source| CaptureError::Map {
                map: "threads",
                source,
            })?;
        let mut blocks = Vec::new();
        for (key, value) in entries {
            let host_tid = u32_key(&key)?;
            let thread: types::thread = from_bytes(&value)?;
            if thread.start_ns == 0 {
                continue;
            }
            let key = key_from_kernel(&thread.key);
            blocks.push(InFlight {
                host_tid,
                start_ns: thread.start_ns,
                owed: thread.owed_ns != 0,
                surveyed: thread.flags & types::thread_flags::THREAD_SURVEYED.0 != 0,
                regs: (key.user_stack == StackRef::SavedRegs).then_some(SavedRegs {
                    regs: UserRegs {
                        ip: thread.user_ip,
                        sp: thread.user_sp,
                        fp: thread.user_fp,
                    },
                    entry: if thread.flags & types::thread_flags::THREAD_USER_FAULT.0 != 0 {
                        Entry::Fault
                    } else {
                        Entry::SystemCall
                    },
                }),
                key,
            });
        }
        Ok(blocks)
    }

    /// The start (`bpf_ktime_get_ns`) of the block a thread is in now, by
    /// host tid: `None` if it is on the CPU, gone, or its block has ended
    /// (even if its total still waits for a user stack).
    pub fn block_start(&self, host_tid: u32) -> Result<Option<u64>, CaptureError> {
        let value = self
            .skel
            .maps
            .threads
            .lookup(&host_tid.to_ne_bytes(), MapFlags::ANY)
            .map_err(|source| CaptureError::Map {
                map: "threads",
                source,
            })?;
        let Some(value) = value else {
            return Ok(None);
        };
        let thread: types::thread = from_bytes(&value)?;
        Ok((thread.start_ns != 0 && thread.owed_ns == 0).then_some(thread.start_ns))
    }

    /// Takes every finished-block total out of the kernel.
    pub fn drain_blocked(&self) -> Result<Vec<RawTotal>, CaptureError> {
        let map = &self.skel.maps.blocked;
        let entries = map
            .lookup_and_delete_batch(BATCH, MapFlags::ANY, MapFlags::ANY)
            .map_err(|source| CaptureError::Map {
                map: "blocked",
                source,
            })?;
        let mut totals = Vec::new();
        for (key, value) in entries {
            let key: types::block_key = from_bytes(&key)?;
            let total: types::block_total = from_bytes(&value)?;
            totals.push(RawTotal {
                key: key_from_kernel(&key),
                blocked_ns: total.blocked_ns,
                count: total.count,
                comm: total.comm.map(|byte| byte as u8),
            });
        }
        Ok(totals)
    }

    /// Takes every finished mmap_lock hold out of the kernel.
    pub fn drain_lock_holds(&self) -> Result<Vec<RawHold>, CaptureError> {
        use types::hold_flags as flags;
        let entries = self
            .skel
            .maps
            .lock_holds
            .lookup_and_delete_batch(BATCH, MapFlags::ANY, MapFlags::ANY)
            .map_err(|source| CaptureError::Map {
                map: "lock_holds",
                source,
            })?;
        let mut holds = Vec::new();
        for (_, value) in entries {
            let hold: types::lock_hold = from_bytes(&value)?;
            holds.push(RawHold {
                tgid: hold.tgid,
                tid: hold.tid,
                comm: hold.comm.map(|byte| byte as u8),
                lock_addr: hold.lock_addr,
                start_ns: hold.start_ns,
                duration_ns: hold.duration_ns,
                write: hold.flags & flags::HOLD_WRITE.0 != 0,
                downgraded: hold.flags & flags::HOLD_DOWNGRADED.0 != 0,
                user_stack: stack_ref(hold.user_stack),
                kernel_stack: stack_ref(hold.kernel_stack),
            });
        }
        Ok(holds)
    }

    /// Takes every finished large address-space call out of the kernel.
    pub fn drain_address_changes(&self) -> Result<Vec<RawAddressChange>, CaptureError> {
        use types::address_call as calls;
        let entries = self
            .skel
            .maps
            .address_changes
            .lookup_and_delete_batch(BATCH, MapFlags::ANY, MapFlags::ANY)
            .map_err(|source| CaptureError::Map {
                map: "address_changes",
                source,
            })?;
        let mut changes = Vec::new();
        for (_, value) in entries {
            let change: types::address_change = from_bytes(&value)?;
            let call = match calls(change.call) {
                calls::ADDRESS_MMAP => AddressCall::Mmap,
                calls::ADDRESS_MUNMAP => AddressCall::Munmap,
                calls::ADDRESS_MREMAP => AddressCall::Mremap,
                calls::ADDRESS_BRK => AddressCall::Brk,
                _ => AddressCall::Madvise,
            };
            changes.push(RawAddressChange {
                tgid: change.tgid,
                tid: change.tid,
                comm: change.comm.map(|byte| byte as u8),
                call,
                start_ns: change.start_ns,
                duration_ns: change.duration_ns,
                addr: change.addr,
                size: change.size,
                arg: change.arg,
                populate_pending: change.flags
                    & types::address_change_flags::CHANGE_POPULATE_PENDING.0
                    != 0,
                user_stack: stack_ref(change.user_stack),
            });
        }
        Ok(changes)
    }

    /// Takes every user stack copy out of the kernel: their memory there is
    /// free again for the next ones.
    pub fn take_stack_copies(&self) -> Result<Vec<StackCopy>, CaptureError> {
        self.copies.consume().map_err(|source| CaptureError::Map {
            map: "stack_copies",
            source,
        })?;
        let records = std::mem::take(&mut *self.copied.borrow_mut());
        records
            .iter()
            .map(|record| stack_copy_from_record(record))
            .collect()
    }

    /// A stack's frames, innermost first; empty if it is no longer kept.
    pub fn stack(&self, key: u64) -> Result<Vec<u64>, CaptureError> {
        let bytes = self
            .skel
            .maps
            .stacks
            .lookup(&key.to_ne_bytes(), MapFlags::ANY)
            .map_err(|source| CaptureError::Map {
                map: "stacks",
                source,
            })?;
        let Some(bytes) = bytes else {
            return Ok(Vec::new());
        };
        let stack: types::stack = from_bytes(&bytes)?;
        let depth = (stack.depth as usize).min(stack.ips.len());
        Ok(stack.ips[..depth].to_vec())
    }

    /// How many stacks the kernel side holds.
    pub fn stack_capacity(&self) -> u32 {
        self.skel.maps.stacks.max_entries()
    }

    /// Frees a stack's slot; a later event with the same stack stores it
    /// again under the same key.
    pub fn forget_stack(&self, key: u64) -> Result<(), CaptureError> {
        match self.skel.maps.stacks.delete(&key.to_ne_bytes()) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CaptureError::Map {
                map: "stacks",
                source,
            }),
        }
    }

    /// Drop counters summed over CPUs.
    pub fn drops(&self) -> Result<DropCounts, CaptureError> {
        let map = &self.skel.maps.drops;
        let mut counts = [0u64; super::DROP_MAPS.len()];
        for (reason, slot) in counts.iter_mut().enumerate() {
            let per_cpu = map
                .lookup_percpu(&(reason as u32).to_ne_bytes(), MapFlags::ANY)
                .map_err(|source| CaptureError::Map {
                    map: "drops",
                    source,
                })?
                .unwrap_or_default();
            for value in per_cpu {
                *slot += from_bytes::<u64>(&value)?;
            }
        }
        Ok(DropCounts { counts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_has_its_own_filter_bit() {
        let bits: Vec<u32> = ThreadState::ALL
            .iter()
            .map(|state| state_bit(*state))
            .collect();
        let all = bits.iter().fold(0, |acc, bit| acc | bit);
        assert_eq!(all.count_ones(), 4);
    }

    #[test]
    fn special_stack_ids_are_recognised() {
        assert_eq!(stack_ref(2), StackRef::SavedRegs);
        assert_eq!(stack_ref(0), StackRef::Missing);
        assert_eq!(
            stack_ref(7 << 24 | 1 << 8 | 4),
            StackRef::Copy(7 << 24 | 1 << 8 | 4)
        );
        assert_eq!(
            stack_ref(0x9e37_79b9_7f4a_7c15),
            StackRef::Id(0x9e37_79b9_7f4a_7c15)
        );
    }

    #[test]
    fn a_stack_copy_record_is_its_header_then_its_bytes() {
        let header = types::stack_copy {
            id: 3 << 24 | 4,
            ip: 0x40_1000,
            sp: 0x7ffd_0000,
            fp: 0x1,
            tgid: 42,
            size: 16,
            flags: types::stack_copy_flags::STACK_COPY_FAULT.0,
            _pad: 0,
        };
        // SAFETY: a plain repr(C) struct of integers, read as its bytes.
        let mut record = unsafe {
            std::slice::from_raw_parts(
                (&header as *const types::stack_copy).cast::<u8>(),
                size_of::<types::stack_copy>(),
            )
        }
        .to_vec();
        record.extend(0u8..16);
        let copy = stack_copy_from_record(&record).unwrap();
        assert_eq!(
            (copy.id, copy.tgid, copy.regs.sp),
            (3 << 24 | 4, 42, 0x7ffd_0000)
        );
        assert_eq!(copy.entry, Entry::Fault);
        assert_eq!(copy.bytes, (0u8..16).collect::<Vec<_>>());
        // A record shorter than its header says is refused, not read past.
        let cut = &record[..record.len() - 1];
        assert!(matches!(
            stack_copy_from_record(cut),
            Err(CaptureError::MapLayout { .. })
        ));
    }

    #[test]
    fn short_map_values_are_an_error_not_a_panic() {
        let err = from_bytes::<types::block_total>(&[0u8; 3]).unwrap_err();
        assert!(matches!(
            err,
            CaptureError::MapLayout {
                expected: 32,
                got: 3
            }
        ));
    }

    /// The lock and mmap_lock bookkeeping, driven through the real,
    /// verified programs with BPF_PROG_TEST_RUN: each call runs the program
    /// on this thread with made-up tracepoint arguments. Needs root.
    mod bookkeeping {
        use super::*;

        const MM_A: u64 = 0xffff_8880_0000_1000;
        const MM_B: u64 = 0xffff_8880_0000_9000;
        const LCB_F_SPIN: u64 = 1 << 0;
        const LCB_F_MUTEX: u64 = 1 << 5;

        fn probe(storage: &mut MaybeUninit<OpenObject>, min_block_ns: u64) -> Probe<'_> {
            let filters = Filters {
                tid: None,
                cgroup_id: None,
                min_block_ns,
                max_block_ns: None,
                states: ThreadState::ALL.to_vec(),
                min_address_change: None,
                unwind_threshold_ns: None,
            };
            let probe = Probe::load(storage, &filters)
                .expect("these tests load BPF programs: run them as root");
            probe.add_target(std::process::id()).unwrap();
            // The survey sets the process's bit, which every program tests first.
            probe.survey().unwrap();
            probe
        }

        fn run(program: &libbpf_rs::ProgramMut, args: &[u64]) {
            use std::os::fd::{AsFd, AsRawFd};
            run_fd(program.as_fd().as_raw_fd(), args);
        }

        /// BPF_PROG_TEST_RUN by file descriptor, so that another thread
        /// (another tid) can run the same program.
        fn run_fd(fd: i32, args: &[u64]) {
            use libbpf_rs::libbpf_sys;
            let context: Vec<u8> = args.iter().flat_map(|arg| arg.to_ne_bytes()).collect();
            // SAFETY: zeroed test-run options are the documented default.
            let mut opts: libbpf_sys::bpf_test_run_opts = unsafe { std::mem::zeroed() };
            opts.sz = size_of::<libbpf_sys::bpf_test_run_opts>() as _;
            opts.ctx_in = context.as_ptr().cast();
            opts.ctx_size_in = context.len() as _;
            // SAFETY: `opts` points at `context`, which outlives the call.
            let rc = unsafe { libbpf_sys::bpf_prog_test_run_opts(fd, &mut opts) };
            assert_eq!(
                rc,
                0,
                "BPF_PROG_TEST_RUN: {}",
                std::io::Error::last_os_error()
            );
        }

        fn acquire(probe: &Probe, mm: u64, write: bool, success: bool) {
            run(
                &probe.skel.progs.mmap_lock_acquired,
                &[mm, write as u64, success as u64],
            );
        }

        fn release(probe: &Probe, mm: u64, write: bool) {
            run(&probe.skel.progs.mmap_lock_released, &[mm, write as u64]);
        }

        fn holds_in_progress(probe: &Probe) -> usize {
            probe.skel.maps.mmap_holds.keys().count()
        }

        fn my_tid() -> u32 {
            // SAFETY: gettid has no preconditions.
            unsafe { libc::gettid() as u32 }
        }

        #[test]
        fn a_hold_is_paired_from_acquisition_to_release() {
            let mut storage = MaybeUninit::uninit();
            let probe = probe(&mut storage, 0);
            acquire(&probe, MM_A, true, true);
            assert_eq!(holds_in_progress(&probe), 1);
            release(&probe, MM_A, true);
            assert_eq!(holds_in_progress(&probe), 0);

            let holds = probe.drain_lock_holds().unwrap();
            assert_eq!(holds.len(), 1, "{holds:?}");
            let hold = holds[0];
            assert_eq!((hold.tgid, hold.tid), (std::process::id(), my_tid()));
            assert!(hold.write && !hold.downgraded);
            // &mm->mmap_lock: inside the mm_struct, not at its start.
            assert!(hold.lock_addr > MM_A && hold.lock_addr < MM_A + 4096);
            assert!(matches!(hold.user_stack, StackRef::Id(_)), "{hold:?}");
            // Named at release, for a holder that may be gone by the cut.
            let comm =
                std::fs::read_to_string(format!("/proc/self/task/{}/comm", my_tid())).unwrap();
            assert_eq!(comm_name(&hold.comm).as_deref(), Some(comm.trim_end()));
            assert!(probe.drain_lock_holds().unwrap().is_empty(), "drained once");
        }

        #[test]
        fn a_failed_trylock_holds_nothing() {
            let mut storage = MaybeUninit::uninit();
            let probe = probe(&mut storage, 0);
            acquire(&probe, MM_A, false, false);
            assert_eq!(holds_in_progress(&probe), 0);
            // A release without a recorded acquisition (taken before we
            // attached) is ignored too.
            release(&probe, MM_A, false);
            assert!(probe.drain_lock_holds().unwrap().is_empty());
        }

        #[test]
        fn nested_read_holds_end_with_the_outermost_release() {
            let mut storage = MaybeUninit::uninit();
            let probe = probe(&mut storage, 0);
            acquire(&probe, MM_A, false, true);
            acquire(&probe, MM_A, false, true);
            release(&probe, MM_A, false);
            assert!(probe.drain_lock_holds().unwrap().is_empty());
            assert_eq!(holds_in_progress(&probe), 1);
            release(&probe, MM_A, false);
            let holds = probe.drain_lock_holds().unwrap();
            assert_eq!(holds.len(), 1);
            assert!(!holds[0].write);
        }

        #[test]
        fn a_downgraded_write_hold_is_one_hold() {
            let mut storage = MaybeUninit::uninit();
            let probe = probe(&mut storage, 0);
            acquire(&probe, MM_A, true, true);
            // mmap_write_downgrade() reports a read acquisition.
            acquire(&probe, MM_A, false, true);
            release(&probe, MM_A, false);
            let holds = probe.drain_lock_holds().unwrap();
            assert_eq!(holds.len(), 1, "{holds:?}");
            assert!(holds[0].write && holds[0].downgraded);
            assert_eq!(holds_in_progress(&probe), 0);
        }

        #[test]
        fn holds_of_two_mms_and_two_threads_are_kept_apart() {
            let mut storage = MaybeUninit::uninit();
            let probe = probe(&mut storage, 0);
            acquire(&probe, MM_A, true, true);
            acquire(&probe, MM_B, true, true);
            // Another thread releasing MM_A does not end this thread's hold.
            use std::os::fd::{AsFd, AsRawFd};
            let released = probe.skel.progs.mmap_lock_released.as_fd().as_raw_fd();
            std::thread::scope(|scope| {
                scope.spawn(|| run_fd(released, &[MM_A, 1]));
            });
            assert_eq!(holds_in_progress(&probe), 2);
            release(&probe, MM_B, true);
            release(&probe, MM_A, true);
            let mut holds = probe.drain_lock_holds().unwrap();
            holds.sort_by_key(|hold| hold.lock_addr);
            assert_eq!(holds.len(), 2, "{holds:?}");
            assert!(holds[0].lock_addr - MM_A == holds[1].lock_addr - MM_B);
            assert!(holds[0].start_ns < holds[1].start_ns, "A was taken first");
        }

        #[test]
        fn holds_shorter_than_min_block_are_not_recorded() {
            let mut storage = MaybeUninit::uninit();
            let probe = probe(&mut storage, 1_000_000_000);
            acquire(&probe, MM_A, true, true);
            release(&probe, MM_A, true);
            assert!(probe.drain_lock_holds().unwrap().is_empty());
            assert_eq!(holds_in_progress(&probe), 0, "but the pairing is done");
        }

        /// The kernel locks this thread contends for, from its entry.
        fn waits(probe: &Probe) -> Option<types::lock_wait_stack> {
            probe
                .skel
                .maps
                .threads
                .lookup(&my_tid().to_ne_bytes(), MapFlags::ANY)
                .unwrap()
                .map(|bytes| from_bytes::<types::thread>(&bytes).unwrap().waits)
        }

        #[test]
        fn an_inner_contention_does_not_end_the_outer_one() {
            let mut storage = MaybeUninit::uninit();
            let probe = probe(&mut storage, 0);
            let (outer, inner) = (0x1000_u64, 0x2000_u64);
            let begin = &probe.skel.progs.contention_begin;
            let end = &probe.skel.progs.contention_end;
            run(begin, &[outer, LCB_F_MUTEX]);
            run(begin, &[inner, LCB_F_SPIN]);
            let nested = waits(&probe).expect("two waits");
            assert_eq!(nested.depth, 2);
            assert_eq!((nested.waits[0].addr, nested.waits[1].addr), (outer, inner));
            run(end, &[inner, 0]);
            let after = waits(&probe).expect("the mutex wait goes on");
            assert_eq!(after.depth, 1);
            assert_eq!(after.waits[0].addr, outer);
            assert_eq!(after.waits[0].kind, LCB_F_MUTEX as u32);
            run(end, &[outer, 0]);
            assert_eq!(waits(&probe).expect("the thread's entry stays").depth, 0);
        }

        #[test]
        fn a_contention_end_without_a_begin_is_ignored() {
            let mut storage = MaybeUninit::uninit();
            let probe = probe(&mut storage, 0);
            run(&probe.skel.progs.contention_end, &[0x1000, 0]);
            assert!(waits(&probe).is_none());
        }
    }
}
