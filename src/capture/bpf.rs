//! The one place that touches BPF: it opens, tunes, loads and attaches the
//! `offcpu` skeleton and turns map bytes into owned values. Everything outside
//! this module sees plain Rust types.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::mem::{size_of, MaybeUninit};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, OpenObject, PrintLevel};

use super::batch;
use super::copies::StackCopy;
use super::shared::{self, Membership, Node};
use super::{
    AddressCall, BlockKey, CaptureError, DropCounts, InFlight, LockKind, LockMode, LockWait,
    SavedRegs, StackRef, UserRegs,
};
use crate::process_map::AddressSpace;
use crate::profile::ThreadState;
use crate::unwind;

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
/// `TARGET_WORDS` in offcpu.h: the length of `target_bits`.
const TARGET_WORDS: usize = 1 << 16;
const _: () = assert!(size_of::<types::bss>() >= TARGET_WORDS * size_of::<u64>());

/// Stack tops remembered as written, as many as `stack_tops` holds: past
/// that the kernel's LRU lets some go, and the memory starts over.
const MAX_STACK_TOPS: usize = 16384;

/// The BPF object's version: instances share a pinned probe only if theirs
/// are the same bytes.
pub(super) const VERSION: &str = env!("FREEZEFRAME_OFFCPU_VERSION");

/// Kernel-side filters of one target, fixed while it is watched.
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

impl Filters {
    fn config(&self) -> types::target_config {
        types::target_config {
            min_block_ns: self.min_block_ns,
            max_block_ns: self.max_block_ns.unwrap_or(u64::MAX),
            cgroup_id: self.cgroup_id.unwrap_or(0),
            min_address_change: self.min_address_change.unwrap_or(0),
            unwind_threshold_ns: self.unwind_threshold_ns.unwrap_or(u64::MAX),
            tid: self.tid.unwrap_or(0),
            state_mask: self
                .states
                .iter()
                .map(|state| state_bit(*state))
                .fold(0, |a, b| a | b),
        }
    }
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

/// The off-CPU probe as one instance uses it: its own, or the node's shared
/// one (see [`shared`]). Either way the instance reads and frees only what
/// belongs to its own targets.
pub(super) struct Probe<'obj> {
    skel: OffcpuSkel<'obj>,
    bss: KernelBss,
    /// The links this instance attached, by program; on a shared probe
    /// the pins keep them attached after we are gone, for as long as
    /// anyone captures.
    links: Vec<(&'static str, Link)>,
    pub features: Features,
    /// Random, never 0: the owner of our targets in the maps.
    instance: u64,
    /// Our registration on the node's probe; `None` for a private probe.
    membership: Option<Membership>,
    /// Where the shared probe lives, for the changes that need its lock.
    sharing: Option<std::path::PathBuf>,
    attached: bool,
    /// Our targets, by tgid in our namespace: their host tgid, once the
    /// survey has seen them.
    targets: HashMap<u32, Option<u32>>,
    /// Host tgids of targets removed since the last drain: their last
    /// totals are still ours to read.
    retired: Vec<u32>,
    /// Whether the kernel lets the survey visit one process at a time.
    survey_by_process: bool,
    /// The stack tops we last wrote to `stack_tops`, by host tid.
    stack_tops: HashMap<u32, u64>,
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        if let Err(err) = self.leave() {
            tracing::warn!("could not leave the node's shared BPF probe cleanly: {err}");
        }
    }
}

/// The probe's .bss as the kernel has it, mapped from the map itself: an
/// instance that joined a shared probe must see and change the memory its
/// programs use, and libbpf maps a reused map's .bss for its creator only.
struct KernelBss {
    ptr: std::ptr::NonNull<types::bss>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory that the kernel changes only
// atomically (target_bits) or that is a lone u32 (attached).
unsafe impl Send for KernelBss {}

impl KernelBss {
    fn map(map: &libbpf_rs::MapMut<'_>) -> Result<Self, CaptureError> {
        use std::os::fd::{AsFd, AsRawFd};
        let len = size_of::<types::bss>();
        // SAFETY: a fresh shared mapping of the map's fd, checked below;
        // the kernel sizes it to the map's value (rounded up to a page).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(CaptureError::Load {
                detail: format!(
                    "cannot map the probe's .bss: {}",
                    std::io::Error::last_os_error()
                ),
            });
        }
        let ptr = std::ptr::NonNull::new(ptr.cast()).expect("mmap never returns null here");
        Ok(KernelBss { ptr, len })
    }

    fn attached(&self) -> u32 {
        // SAFETY: the mapping lives as long as self; a u32 load may race
        // only with whole u32 stores.
        unsafe { std::ptr::addr_of!((*self.ptr.as_ptr()).attached).read_volatile() }
    }

    fn set_attached(&self, features: u32) {
        // SAFETY: as in `attached`.
        unsafe { std::ptr::addr_of_mut!((*self.ptr.as_ptr()).attached).write_volatile(features) }
    }

    /// Clears a host tgid's bit. The survey sets bits concurrently (in the
    /// kernel, atomically), so the word is changed atomically here too.
    fn clear_target_bit(&self, host_tgid: u32) {
        let word = (host_tgid >> 6) as usize;
        if word >= TARGET_WORDS {
            return;
        }
        // SAFETY: the word is within the mapping, aligned (the array is
        // u64s), and the kernel only ever changes it atomically.
        let atomic = unsafe {
            AtomicU64::from_ptr(std::ptr::addr_of_mut!(
                (*self.ptr.as_ptr()).target_bits[word]
            ))
        };
        atomic.fetch_and(!(1u64 << (host_tgid & 63)), Ordering::SeqCst);
    }
}

impl Drop for KernelBss {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Refusals to share are told once per process: every capture of an
/// on-trigger sidecar loads a probe.
static NOT_SHARED_REPORTED: AtomicBool = AtomicBool::new(false);

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
unsafe impl Pod for types::wanted {}
unsafe impl Pod for types::wanted_key {}
unsafe impl Pod for types::lock_wait {}
unsafe impl Pod for types::lock_wait_stack {}
unsafe impl Pod for types::lock_hold {}
unsafe impl Pod for types::address_change {}
unsafe impl Pod for types::stack_copy {}
unsafe impl Pod for types::stack_copy_small {}
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

/// A value's bytes, as a map key or value.
fn pod_bytes<T: Pod>(value: &T) -> &[u8] {
    // SAFETY: `T: Pod` is a repr(C) struct of integers whose padding the
    // generated types spell out as fields, so every byte is initialised.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
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

// Both sizes of copy share their fields' layout (STACK_COPY_HEADER): a
// value of either is read by `stack_copy`'s offsets.
const _: () = {
    use std::mem::offset_of;
    type Small = types::stack_copy_small;
    type Copy = types::stack_copy;
    assert!(offset_of!(Small, bytes) == offset_of!(Copy, bytes));
    assert!(offset_of!(Small, host_tgid) == offset_of!(Copy, host_tgid));
    assert!(offset_of!(Small, start_ns) == offset_of!(Copy, start_ns));
    assert!(offset_of!(Small, flags) == offset_of!(Copy, flags));
};

/// Whose copy a value of `stack_copies` or `small_copies` is.
fn copy_owner(value: &[u8]) -> Result<u32, CaptureError> {
    field_at(value, std::mem::offset_of!(types::stack_copy, host_tgid))
}

/// A value of `stack_copies` or `small_copies`: the registers, then
/// the copied stack.
fn stack_copy_from_bytes(value: &[u8]) -> Result<StackCopy, CaptureError> {
    use std::mem::offset_of;
    type Copy = types::stack_copy;
    // Its fields one by one: of the copy's bytes, `size` are used.
    let bytes = offset_of!(Copy, bytes);
    let smallest = size_of::<types::stack_copy_small>();
    if value.len() < smallest {
        return Err(CaptureError::MapLayout {
            expected: smallest,
            got: value.len(),
        });
    }
    let u64_at = |offset| field_at::<u64>(value, offset);
    let u32_at = |offset| field_at::<u32>(value, offset);
    let size = (u32_at(offset_of!(Copy, size))? as usize).min(value.len() - bytes);
    let flags = u32_at(offset_of!(Copy, flags))?;
    Ok(StackCopy {
        id: u64_at(offset_of!(Copy, id))?,
        block: (
            u32_at(offset_of!(Copy, host_tid))?,
            u64_at(offset_of!(Copy, start_ns))?,
        ),
        tgid: u32_at(offset_of!(Copy, tgid))?,
        regs: UserRegs {
            ip: u64_at(offset_of!(Copy, ip))?,
            sp: u64_at(offset_of!(Copy, sp))?,
            fp: u64_at(offset_of!(Copy, fp))?,
        },
        entry: if flags & types::stack_copy_flags::STACK_COPY_FAULT.0 != 0 {
            unwind::Entry::Fault
        } else {
            unwind::Entry::SystemCall
        },
        to_top: flags & types::stack_copy_flags::STACK_COPY_TO_TOP.0 != 0,
        bytes: value[bytes..bytes + size].to_vec(),
    })
}

/// The field at `offset` of a value's bytes, read alone.
fn field_at<F: Pod>(bytes: &[u8], offset: usize) -> Result<F, CaptureError> {
    from_bytes(bytes.get(offset..).unwrap_or_default())
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

/// A map entry's key and value bytes.
type MapEntry = batch::Entry;

/// An entry's bytes, as they are.
fn raw_entry(key: &[u8], value: &[u8]) -> Result<MapEntry, CaptureError> {
    Ok((key.to_vec(), value.to_vec()))
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

/// Our own pid namespace's inode, 0 for the initial one: BPF then reports
/// (and filters on) pids as we see them, not host pids.
fn own_pid_namespace() -> Result<u64, CaptureError> {
    let meta = std::fs::metadata("/proc/self/ns/pid").map_err(CaptureError::PidNamespace)?;
    Ok(if meta.ino() == INITIAL_PIDNS_INO {
        0
    } else {
        meta.ino()
    })
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

/// A fresh instance id: random, so that instances in different pid
/// namespaces (and restarts of one) never take each other's.
fn new_instance_id() -> u64 {
    let mut bytes = [0u8; 8];
    loop {
        // SAFETY: getrandom writes at most `bytes.len()` bytes into it.
        let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        let id = u64::from_ne_bytes(bytes);
        if got == bytes.len() as isize && id != 0 {
            return id;
        }
    }
}

/// The maps every instance shares: all but the instance's own .rodata
/// (which names the instance to its survey).
fn shared_map(name: &std::ffi::OsStr) -> bool {
    !name.as_encoded_bytes().ends_with(b".rodata")
}

/// A map name as a file name in bpffs, which reserves names with dots
/// (libbpf names .bss `offcpu_b.bss`).
fn pin_name(name: &std::ffi::OsStr) -> String {
    name.to_string_lossy().replace(['.', '/'], "_")
}

fn map_error(map: &'static str) -> impl Fn(libbpf_rs::Error) -> CaptureError {
    move |source| CaptureError::Map { map, source }
}

/// Deletes the entries of `table` that belong to one of `host_tgids`, as
/// `owner_of` reads an entry's process from its key and value.
fn delete_owned(
    table: &libbpf_rs::MapMut<'_>,
    map: &'static str,
    host_tgids: &HashSet<u32>,
    owner_of: impl Fn(&[u8], &[u8]) -> Result<u32, CaptureError>,
) -> Result<(), CaptureError> {
    for (key, value) in batch::entries(table, false).map_err(map_error(map))? {
        if host_tgids.contains(&owner_of(&key, &value)?) {
            deleted(table.delete(&key), map)?;
        }
    }
    Ok(())
}

/// One of our entries as the batch read found it: its key, and for an
/// entry written once, what it holds (see [`Probe::take_owned`]).
type OwnedEntry<T> = (Vec<u8>, Option<Result<T, CaptureError>>);

/// Whether a map's entries may change once they are in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entries {
    /// Totals the probe adds to: what was read may be out of date.
    Growing,
    /// Put in once, whole (a stack copy, with `BPF_NOEXIST`).
    WrittenOnce,
}

/// A map operation's "not there": fine when deleting.
fn deleted(result: libbpf_rs::Result<()>, map: &'static str) -> Result<(), CaptureError> {
    match result {
        Err(err) if err.kind() != libbpf_rs::ErrorKind::NotFound => Err(map_error(map)(err)),
        _ => Ok(()),
    }
}

impl<'obj> Probe<'obj> {
    /// Loads the programs (`tp_btf`, falling back to `raw_tp`) without
    /// attaching them: a loaded probe costs nothing until [`Probe::attach`].
    /// With `sharing`, a bpffs directory, the maps are the node's shared
    /// ones (pinned there by the first instance of this version); a
    /// directory that cannot be shared gives a private probe, said once.
    pub fn load(
        storage: &'obj mut MaybeUninit<OpenObject>,
        sharing: Option<&Path>,
    ) -> Result<Self, CaptureError> {
        route_libbpf_messages();
        let pidns_ino = own_pid_namespace()?;
        let instance = new_instance_id();
        let hook = Self::supported_hook(pidns_ino);
        let node = sharing.and_then(|dir| match Node::lock(dir, VERSION) {
            Ok(node) => Some(node),
            Err(why) => {
                // The probe works either way; what it costs the node differs.
                if !NOT_SHARED_REPORTED.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        "running a private BPF probe, not the node's shared one: {why}; every \
                         freezeframe on this node then costs its neighbours a probe of its own"
                    );
                }
                None
            }
        });
        let mut open = Self::open_tuned(storage, instance, pidns_ino, hook)?;
        let joining = node
            .as_ref()
            .is_some_and(|node| node.maps_pinned("targets"));
        if let (Some(node), true) = (&node, joining) {
            for mut map in open.open_object_mut().maps_mut() {
                let name = pin_name(map.name());
                if shared_map(map.name()) {
                    map.reuse_pinned_map(node.map_pin(&name)).map_err(|err| {
                        CaptureError::Load {
                            detail: format!("cannot reuse the shared map {name}: {err}"),
                        }
                    })?;
                }
            }
        }
        let mut skel = open.load().map_err(|err| CaptureError::Load {
            detail: format!("sched_switch via {hook:?}: {err}"),
        })?;
        let mut membership = None;
        if let Some(node) = &node {
            if !joining {
                for mut map in skel.object_mut().maps_mut() {
                    let name = pin_name(map.name());
                    if shared_map(map.name()) {
                        map.pin(node.map_pin(&name))
                            .map_err(|err| CaptureError::Load {
                                detail: format!("cannot pin the map {name}: {err}"),
                            })?;
                    }
                }
            }
            membership = Some(node.join(instance).map_err(|err| CaptureError::Load {
                detail: format!("cannot register in {}: {err}", node.dir().display()),
            })?);
        }
        let bss = KernelBss::map(&skel.maps.bss)?;
        let mut probe = Probe {
            skel,
            bss,
            links: Vec::new(),
            features: Features {
                hook,
                lock_contention: false,
                mmap_lock_holds: false,
                address_changes: false,
                stacks_on_return: false,
            },
            instance,
            membership,
            sharing: sharing.filter(|_| node.is_some()).map(Path::to_path_buf),
            attached: false,
            targets: HashMap::new(),
            retired: Vec::new(),
            stack_tops: HashMap::new(),
            survey_by_process: true,
        };
        if let Some(node) = &node {
            probe.reap(node)?;
            shared::sweep_abandoned(node.dir().parent().unwrap_or(node.dir()), node.dir());
            tracing::debug!(
                dir = %node.dir().display(),
                joined = joining,
                "using the node's shared BPF probe"
            );
        }
        Ok(probe)
    }

    /// Whether this instance shares the node's probe.
    pub fn is_shared(&self) -> bool {
        self.membership.is_some()
    }

    /// The node's probe directory, locked, if this probe is shared.
    fn lock_node(&self) -> Result<Option<Node>, CaptureError> {
        let Some(dir) = &self.sharing else {
            return Ok(None);
        };
        Node::lock(dir, VERSION)
            .map(Some)
            .map_err(|why| CaptureError::Shared(why.to_string()))
    }

    /// Attaches the programs, unless the node's probe has them attached
    /// already. On a shared probe their links are pinned, so that they stay
    /// attached for as long as anyone captures.
    pub fn attach(&mut self) -> Result<(), CaptureError> {
        let node = self.lock_node()?;
        let running = match &node {
            Some(node) => node
                .links_pinned()
                .map_err(|err| CaptureError::Shared(err.to_string()))?,
            None => false,
        };
        if !running {
            self.attach_programs()?;
            if let Some(node) = &node {
                for (program, link) in &mut self.links {
                    link.pin(node.link_pin(program))
                        .map_err(|source| CaptureError::Attach {
                            what: "pinned link",
                            source,
                        })?;
                }
            }
        }
        if let (Some(node), Some(me)) = (&node, &self.membership) {
            node.set_attached(me, true)
                .map_err(|err| CaptureError::Shared(err.to_string()))?;
        }
        self.attached = true;
        self.features = self.attached_features();
        Ok(())
    }

    /// What the kernel side says was attached, by whoever attached it.
    fn attached_features(&self) -> Features {
        use types::probe_feature as bits;
        let attached = self.bss.attached();
        let has = |bit: bits| attached & bit.0 != 0;
        Features {
            hook: if has(bits::FEATURE_SWITCH_RAW_TP) {
                Hook::RawTp
            } else {
                Hook::TpBtf
            },
            lock_contention: has(bits::FEATURE_LOCK_CONTENTION),
            mmap_lock_holds: has(bits::FEATURE_MMAP_LOCK),
            // Per target; see `Probe::add_target`.
            address_changes: has(bits::FEATURE_MMAP_LOCK) && self.features.address_changes,
            stacks_on_return: has(bits::FEATURE_RSEQ),
        }
    }

    /// Attaches the sched_switch hook, then whichever attribution
    /// tracepoints this kernel has: a kernel without them still gets
    /// off-CPU profiles, and says once what it is missing.
    fn attach_programs(&mut self) -> Result<(), CaptureError> {
        use types::probe_feature as bits;
        let progs = &self.skel.progs;
        let hook = self.features.hook;
        let switch = match hook {
            Hook::TpBtf => &progs.sched_switch_btf,
            Hook::RawTp => &progs.sched_switch_raw,
        };
        let mut links = vec![(
            "sched_switch",
            switch.attach().map_err(|source| CaptureError::Attach {
                what: "sched_switch tracepoint",
                source,
            })?,
        )];
        let mut features = if hook == Hook::RawTp {
            bits::FEATURE_SWITCH_RAW_TP.0
        } else {
            0
        };
        let mut attach_all =
            |optional: &Optional, attached: Vec<(&'static str, libbpf_rs::Result<Link>)>| {
                let mut all = Vec::new();
                for (program, link) in attached {
                    match link {
                        Ok(link) => all.push((program, link)),
                        Err(err) => {
                            optional.unavailable(&err);
                            return false;
                        }
                    }
                }
                links.extend(all);
                true
            };
        if attach_all(
            &LOCK_CONTENTION,
            vec![
                ("contention_begin", progs.contention_begin.attach()),
                ("contention_end", progs.contention_end.attach()),
            ],
        ) {
            features |= bits::FEATURE_LOCK_CONTENTION.0;
        }
        // The waker of a futex wait: without it the wait is still named.
        let wakeup = match hook {
            Hook::TpBtf => &progs.sched_waking_btf,
            Hook::RawTp => &progs.sched_waking_raw,
        };
        if attach_all(&WAKEUPS, vec![("sched_waking", wakeup.attach())]) {
            features |= bits::FEATURE_WAKING.0;
        }
        if attach_all(
            &MMAP_LOCK,
            vec![
                ("mmap_lock_acquired", progs.mmap_lock_acquired.attach()),
                ("mmap_lock_released", progs.mmap_lock_released.attach()),
            ],
        ) {
            features |= bits::FEATURE_MMAP_LOCK.0;
        }
        // The raw_tp switch hook takes every stack at switch-out anyway.
        if hook == Hook::TpBtf
            && attach_all(&RSEQ, vec![("rseq_update", progs.rseq_update.attach())])
        {
            features |= bits::FEATURE_RSEQ.0;
        }
        self.links = links;
        self.bss.set_attached(features);
        Ok(())
    }

    /// Which sched_switch hook this kernel takes, learned once per process
    /// by a trial load: `tp_btf`, else `raw_tp`.
    fn supported_hook(pidns_ino: u64) -> Hook {
        static HOOK: OnceLock<Hook> = OnceLock::new();
        *HOOK.get_or_init(|| {
            let mut trial = MaybeUninit::uninit();
            let loaded = Self::open_tuned_raw(&mut trial, 1, pidns_ino, Hook::TpBtf)
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
        instance: u64,
        pidns_ino: u64,
        hook: Hook,
    ) -> Result<offcpu::OpenOffcpuSkel<'a>, CaptureError> {
        Self::open_tuned_raw(storage, instance, pidns_ino, hook).map_err(|err| CaptureError::Load {
            detail: err.to_string(),
        })
    }

    fn open_tuned_raw<'a>(
        storage: &'a mut MaybeUninit<OpenObject>,
        instance: u64,
        pidns_ino: u64,
        hook: Hook,
    ) -> Result<offcpu::OpenOffcpuSkel<'a>, libbpf_rs::Error> {
        let mut open = OffcpuSkelBuilder::default().open(storage)?;
        let rodata = open
            .maps
            .rodata_data
            .as_deref_mut()
            .expect("offcpu.bpf.c declares const volatile globals");
        rodata.instance = types::instance {
            id: instance,
            pidns_ino,
        };
        open.progs
            .sched_switch_btf
            .set_autoload(hook == Hook::TpBtf);
        open.progs
            .sched_switch_raw
            .set_autoload(hook == Hook::RawTp);
        Ok(open)
    }

    /// Watches a process (by its tgid in our namespace) with `filters`.
    /// The survey makes it a target, learns its host tgid and sets its bit
    /// in `target_bits`; a process another instance on the node watches
    /// already is refused.
    pub fn add_target(&mut self, tgid: u32, filters: &Filters) -> Result<(), CaptureError> {
        if self.targets.contains_key(&tgid) {
            return Ok(());
        }
        let key = self.wanted_key(tgid);
        let want = types::wanted {
            config: filters.config(),
            ..Default::default()
        };
        self.skel
            .maps
            .wanted
            .update(pod_bytes(&key), pod_bytes(&want), MapFlags::ANY)
            .map_err(map_error("wanted"))?;
        self.targets.insert(tgid, None);
        if filters.min_address_change.is_some() {
            self.features.address_changes = true;
        }
        self.survey()?;
        self.learn_targets()
    }

    fn wanted_key(&self, tgid: u32) -> types::wanted_key {
        types::wanted_key {
            owner: self.instance,
            ns_tgid: tgid,
            ..Default::default()
        }
    }

    /// Reads back what the survey made of the processes we asked for.
    fn learn_targets(&mut self) -> Result<(), CaptureError> {
        use types::wanted_status as status;
        let pending: Vec<u32> = self
            .targets
            .iter()
            .filter(|(_, host)| host.is_none())
            .map(|(&tgid, _)| tgid)
            .collect();
        for tgid in pending {
            let key = self.wanted_key(tgid);
            let Some(bytes) = self
                .skel
                .maps
                .wanted
                .lookup(pod_bytes(&key), MapFlags::ANY)
                .map_err(map_error("wanted"))?
            else {
                continue;
            };
            let want: types::wanted = from_bytes(&bytes)?;
            match status(want.status) {
                status::WANTED_WATCHED => {
                    self.targets.insert(tgid, Some(want.host_tgid));
                }
                status::WANTED_ELSEWHERE => {
                    self.targets.remove(&tgid);
                    deleted(self.skel.maps.wanted.delete(pod_bytes(&key)), "wanted")?;
                    return Err(CaptureError::WatchedElsewhere(tgid));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Each watched target's address space as the last survey found it, by
    /// its pid in our namespace.
    pub fn address_spaces(&self) -> Result<HashMap<u32, AddressSpace>, CaptureError> {
        let mut spaces = HashMap::new();
        for (&tgid, host) in &self.targets {
            let Some(host_tgid) = host else { continue };
            let Some(bytes) = self
                .skel
                .maps
                .targets
                .lookup(&host_tgid.to_ne_bytes(), MapFlags::ANY)
                .map_err(map_error("targets"))?
            else {
                continue;
            };
            let target: types::target = from_bytes(&bytes)?;
            spaces.insert(
                tgid,
                AddressSpace {
                    id: target.mm,
                    writes: target.mm_seq,
                },
            );
        }
        Ok(spaces)
    }

    /// Host tgids whose kernel entries are ours to read.
    fn owned(&self) -> HashSet<u32> {
        self.targets
            .values()
            .flatten()
            .copied()
            .chain(self.retired.iter().copied())
            .collect()
    }

    /// Stops watching a process and lets go of its threads' entries; its
    /// last totals are read at the next drain.
    pub fn remove_target(&mut self, tgid: u32) -> Result<(), CaptureError> {
        let Some(host) = self.targets.remove(&tgid) else {
            return Ok(());
        };
        let key = self.wanted_key(tgid);
        deleted(self.skel.maps.wanted.delete(pod_bytes(&key)), "wanted")?;
        if let Some(host_tgid) = host {
            self.unwatch(&HashSet::from([host_tgid]))?;
            self.retired.push(host_tgid);
        }
        Ok(())
    }

    /// Takes processes out of the kernel side: their bits, their target
    /// entries and their threads' entries (totals, records and stacks stay
    /// for the owner to read, or for [`Probe::forget_processes`]).
    fn unwatch(&mut self, host_tgids: &HashSet<u32>) -> Result<(), CaptureError> {
        for &host_tgid in host_tgids {
            self.bss.clear_target_bit(host_tgid);
            deleted(
                self.skel.maps.targets.delete(&host_tgid.to_ne_bytes()),
                "targets",
            )?;
        }
        let maps = &self.skel.maps;
        delete_owned(&maps.threads, "threads", host_tgids, |_, value| {
            Ok(from_bytes::<types::thread>(value)?.key.host_tgid)
        })?;
        delete_owned(
            &maps.calls_in_progress,
            "calls_in_progress",
            host_tgids,
            |_, value| Ok(from_bytes::<types::address_change>(value)?.host_tgid),
        )
    }

    /// Clears everything processes left behind: those of a gone instance,
    /// or our own as we leave.
    fn forget_processes(&mut self, host_tgids: &HashSet<u32>) -> Result<(), CaptureError> {
        self.unwatch(host_tgids)?;
        let maps = &self.skel.maps;
        for (copies, name) in [
            (&maps.stack_copies, "stack_copies"),
            (&maps.small_copies, "small_copies"),
        ] {
            delete_owned(copies, name, host_tgids, |_, value| copy_owner(value))?;
        }
        delete_owned(&maps.blocked, "blocked", host_tgids, |key, _| {
            Ok(from_bytes::<types::block_key>(key)?.host_tgid)
        })?;
        delete_owned(&maps.stacks, "stacks", host_tgids, |_, value| {
            Ok(from_bytes::<types::stack>(value)?.host_tgid)
        })?;
        delete_owned(&maps.lock_holds, "lock_holds", host_tgids, |_, value| {
            Ok(from_bytes::<types::lock_hold>(value)?.host_tgid)
        })?;
        delete_owned(
            &maps.address_changes,
            "address_changes",
            host_tgids,
            |_, value| Ok(from_bytes::<types::address_change>(value)?.host_tgid),
        )
    }

    /// Clears up after the node's instances that are gone: their targets
    /// leave the maps, and if none of the live ones captures, the programs
    /// are detached. Liveness is the kernel's (see [`shared`]).
    fn reap(&mut self, node: &Node) -> Result<(), CaptureError> {
        let shared_error = |err: std::io::Error| CaptureError::Shared(err.to_string());
        let peers = node.peers(self.membership.as_ref()).map_err(shared_error)?;
        let gone: HashSet<u64> = peers
            .iter()
            .filter(|peer| !peer.alive)
            .map(|peer| peer.id)
            .collect();
        if !gone.is_empty() {
            let mut orphans = HashSet::new();
            for (host_tgid, value) in
                batch::entries(&self.skel.maps.targets, false).map_err(map_error("targets"))?
            {
                if gone.contains(&from_bytes::<types::target>(&value)?.owner) {
                    orphans.insert(u32_key(&host_tgid)?);
                }
            }
            for (key, _) in
                batch::entries(&self.skel.maps.wanted, false).map_err(map_error("wanted"))?
            {
                if gone.contains(&from_bytes::<types::wanted_key>(&key)?.owner) {
                    deleted(self.skel.maps.wanted.delete(&key), "wanted")?;
                }
            }
            self.forget_processes(&orphans)?;
            for id in &gone {
                node.forget(*id).map_err(shared_error)?;
            }
            tracing::warn!(
                instances = gone.len(),
                processes = orphans.len(),
                "freezeframe instances on this node ended without leaving the shared probe; \
                 their targets are removed"
            );
        }
        let anyone_attached = self.attached || peers.iter().any(|peer| peer.alive && peer.attached);
        if !anyone_attached {
            node.unpin_links().map_err(shared_error)?;
            self.bss.set_attached(0);
        }
        Ok(())
    }

    /// Looks after the node's probe: clears up after instances that are
    /// gone. Run now and then by every instance that shares it.
    pub fn tend(&mut self) -> Result<(), CaptureError> {
        if let Some(node) = self.lock_node()? {
            self.reap(&node)?;
        }
        Ok(())
    }

    /// Leaves the node's probe: our targets go, and the last instance out
    /// (or the last one capturing) takes the pins with it.
    fn leave(&mut self) -> Result<(), CaptureError> {
        // A private probe's maps go with it.
        if !self.is_shared() {
            return Ok(());
        }
        for &tgid in self.targets.keys() {
            let key = self.wanted_key(tgid);
            deleted(self.skel.maps.wanted.delete(pod_bytes(&key)), "wanted")?;
        }
        let ours: HashSet<u32> = self
            .targets
            .drain()
            .filter_map(|(_, host)| host)
            .chain(self.retired.drain(..))
            .collect();
        self.forget_processes(&ours)?;
        let Some(node) = self.lock_node()? else {
            return Ok(());
        };
        self.attached = false;
        let shared_error = |err: std::io::Error| CaptureError::Shared(err.to_string());
        self.reap(&node)?;
        if let Some(me) = self.membership.take() {
            node.forget(self.instance).map_err(shared_error)?;
            drop(me);
        }
        if node.peers(None).map_err(shared_error)?.is_empty() {
            node.remove_all().map_err(shared_error)?;
        }
        Ok(())
    }

    /// Runs the survey once (see `survey` in offcpu.bpf.c): new targets get
    /// their bits, threads already off the CPU are entered as blocks that
    /// start now, and blocks in progress get their stacks and registers.
    pub fn survey(&mut self) -> Result<(), CaptureError> {
        // Once every target is known, only their threads need a look: a
        // survey of the whole node costs every sidecar on it a visit to
        // every task, each second.
        let known: Option<Vec<u32>> = self
            .targets
            .iter()
            .map(|(&tgid, host)| host.map(|_| tgid))
            .collect();
        match known {
            Some(tgids) if self.survey_by_process => {
                for tgid in tgids {
                    if let Err(err) = self.run_survey(Some(tgid)) {
                        // Before Linux 6.1 a task iterator cannot be given
                        // one process; the whole node is still surveyed.
                        tracing::debug!("surveying the whole node from now on: {err}");
                        self.survey_by_process = false;
                        self.run_survey(None)?;
                        break;
                    }
                }
            }
            _ => self.run_survey(None)?,
        }
        self.learn_targets()
    }

    /// Runs the survey over the threads of one process (by its tgid in our
    /// namespace, where the kernel looks it up), or over every task.
    fn run_survey(&self, process: Option<u32>) -> Result<(), CaptureError> {
        use libbpf_rs::libbpf_sys;
        use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

        let attach_error = |code: i32| CaptureError::Attach {
            what: "task iterator",
            source: libbpf_rs::Error::from_raw_os_error(code.abs()),
        };
        let mut info = libbpf_sys::bpf_iter_link_info::default();
        // SAFETY: both are plain C structs, for which zeroes are "unset".
        let mut opts: libbpf_sys::bpf_link_create_opts = unsafe { std::mem::zeroed() };
        opts.sz = size_of::<libbpf_sys::bpf_link_create_opts>() as _;
        if let Some(tgid) = process {
            info.task.pid = tgid;
            opts.iter_info = &mut info;
            opts.iter_info_len = size_of::<libbpf_sys::bpf_iter_link_info>() as _;
        }
        let program = self.skel.progs.survey.as_fd().as_raw_fd();
        // SAFETY: `opts` and the `info` it points to outlive the call.
        let link =
            unsafe { libbpf_sys::bpf_link_create(program, 0, libbpf_sys::BPF_TRACE_ITER, &opts) };
        if link < 0 {
            return Err(attach_error(link));
        }
        // SAFETY: the kernel just gave us this descriptor, and nothing else owns it.
        let link = unsafe { OwnedFd::from_raw_fd(link) };
        // SAFETY: `link` is an iterator link, open for the call.
        let iter = unsafe { libbpf_sys::bpf_iter_create(link.as_raw_fd()) };
        if iter < 0 {
            return Err(attach_error(iter));
        }
        // SAFETY: as for `link`.
        let mut iter = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(iter) });
        // The program writes nothing; reading to the end is what runs it.
        let mut sink = Vec::new();
        iter.read_to_end(&mut sink).map_err(CaptureError::Iterate)?;
        Ok(())
    }

    /// Blocks still in progress, and ended ones still owed their user
    /// stack, by host tid: ours only.
    pub fn in_flight(&self) -> Result<Vec<InFlight>, CaptureError> {
        let owned = self.owned();
        let entries =
            batch::entries(&self.skel.maps.threads, false).map_err(map_error("threads"))?;
        let mut blocks = Vec::new();
        for (key, value) in entries {
            let host_tid = u32_key(&key)?;
            let thread: types::thread = from_bytes(&value)?;
            if thread.start_ns == 0 || !owned.contains(&thread.key.host_tgid) {
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
                        unwind::Entry::Fault
                    } else {
                        unwind::Entry::SystemCall
                    },
                }),
                key,
            });
        }
        Ok(blocks)
    }

    /// Takes the entries of `map` that `owner_of` says are ours out of the
    /// kernel, each atomically (another instance's stay for it to read),
    /// as `parse` reads them. A private probe owns everything and takes it
    /// in batches.
    fn take_owned<T>(
        &self,
        table: &libbpf_rs::MapMut<'obj>,
        map: &'static str,
        entries: Entries,
        owner_of: impl Fn(&[u8], &[u8]) -> Result<u32, CaptureError>,
        parse: impl Fn(&[u8], &[u8]) -> Result<T, CaptureError>,
    ) -> Result<Vec<T>, CaptureError> {
        let mut taken = Vec::new();
        let mut failed = None;
        if !self.is_shared() {
            batch::visit(table, true, |key, value| match parse(key, value) {
                Ok(entry) => taken.push(entry),
                Err(err) => {
                    failed.get_or_insert(err);
                }
            })
            .map_err(map_error(map))?;
            return failed.map_or(Ok(taken), Err);
        }
        let owned = self.owned();
        let mut ours: Vec<OwnedEntry<T>> = Vec::new();
        batch::visit(table, false, |key, value| match owner_of(key, value) {
            Ok(owner) if owned.contains(&owner) => ours.push((
                key.to_vec(),
                (entries == Entries::WrittenOnce).then(|| parse(key, value)),
            )),
            Ok(_) => {}
            Err(err) => {
                failed.get_or_insert(err);
            }
        })
        .map_err(map_error(map))?;
        if let Some(err) = failed {
            return Err(err);
        }
        for (key, parsed) in ours {
            match parsed {
                // Read again as it is taken: it may have grown since.
                None => {
                    if let Some(value) = table.lookup_and_delete(&key).map_err(map_error(map))? {
                        taken.push(parse(&key, &value)?);
                    }
                }
                // As read, if it is still there to take.
                Some(parsed) => match table.delete(&key) {
                    Ok(()) => taken.push(parsed?),
                    Err(err) if err.kind() == libbpf_rs::ErrorKind::NotFound => {}
                    Err(err) => return Err(map_error(map)(err)),
                },
            }
        }
        Ok(taken)
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
            .map_err(map_error("threads"))?;
        let Some(value) = value else {
            return Ok(None);
        };
        let thread: types::thread = from_bytes(&value)?;
        Ok((thread.start_ns != 0 && thread.owed_ns == 0).then_some(thread.start_ns))
    }

    /// Takes our user stack copies out of the kernel: their memory there
    /// is free again for the next ones.
    pub fn take_stack_copies(&self) -> Result<Vec<StackCopy>, CaptureError> {
        let mut copies = Vec::new();
        for (map, name) in [
            (&self.skel.maps.small_copies, "small_copies"),
            (&self.skel.maps.stack_copies, "stack_copies"),
        ] {
            copies.extend(self.take_owned(
                map,
                name,
                Entries::WrittenOnce,
                |_, value| copy_owner(value),
                |_, value| stack_copy_from_bytes(value),
            )?);
        }
        Ok(copies)
    }

    /// Tells the probe where a thread's user stack ends (see `stack_tops`
    /// in offcpu.bpf.c), or that it does not know, with `None`. A top is
    /// written only if it changed.
    ///
    /// A top left behind by a thread that is gone is harmless: the next
    /// thread with its tid has a stack elsewhere, whose sp the top does not
    /// lie within a copy's reach of, or a copy cut short by it fails to
    /// unwind, and its owner takes the top away.
    pub fn set_stack_top(&mut self, host_tid: u32, top: Option<u64>) -> Result<(), CaptureError> {
        let tops = &mut self.stack_tops;
        // A top is taken away even if not remembered: it may be older than
        // the memory.
        if top.is_some() && tops.get(&host_tid) == top.as_ref() {
            return Ok(());
        }
        let key = host_tid.to_ne_bytes();
        let map = &self.skel.maps.stack_tops;
        match top {
            Some(top) => {
                map.update(&key, &top.to_ne_bytes(), MapFlags::ANY)
                    .map_err(map_error("stack_tops"))?;
                if tops.len() >= MAX_STACK_TOPS {
                    tops.clear();
                }
                tops.insert(host_tid, top);
            }
            None => {
                match map.delete(&key) {
                    Ok(()) => {}
                    Err(err) if err.kind() == libbpf_rs::ErrorKind::NotFound => {}
                    Err(err) => return Err(map_error("stack_tops")(err)),
                }
                tops.remove(&host_tid);
            }
        }
        Ok(())
    }

    /// Takes our finished-block totals out of the kernel. Retired targets'
    /// last totals are taken too, and then they are forgotten.
    pub fn drain_blocked(&self) -> Result<Vec<RawTotal>, CaptureError> {
        let entries = self.take_owned(
            &self.skel.maps.blocked,
            "blocked",
            Entries::Growing,
            |key, _| Ok(from_bytes::<types::block_key>(key)?.host_tgid),
            raw_entry,
        )?;
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

    /// Forgets retired targets once everything of theirs has been read.
    pub fn end_cut(&mut self) {
        self.retired.clear();
    }

    /// Takes our finished mmap_lock holds out of the kernel.
    pub fn drain_lock_holds(&self) -> Result<Vec<RawHold>, CaptureError> {
        use types::hold_flags as flags;
        let entries = self.take_owned(
            &self.skel.maps.lock_holds,
            "lock_holds",
            Entries::Growing,
            |_, value| Ok(from_bytes::<types::lock_hold>(value)?.host_tgid),
            raw_entry,
        )?;
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

    /// Takes our finished large address-space calls out of the kernel.
    pub fn drain_address_changes(&self) -> Result<Vec<RawAddressChange>, CaptureError> {
        use types::address_call as calls;
        let entries = self.take_owned(
            &self.skel.maps.address_changes,
            "address_changes",
            Entries::Growing,
            |_, value| Ok(from_bytes::<types::address_change>(value)?.host_tgid),
            raw_entry,
        )?;
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
    fn a_stack_copy_is_read_field_by_field_and_only_its_used_bytes_kept() {
        let mut copy = types::stack_copy {
            id: 3 << 24 | 1 << 8 | 4,
            ip: 0x5555_0000_1234,
            sp: 0x7ffc_0000_0100,
            fp: 0x7ffc_0000_0180,
            tgid: 7,
            host_tgid: 4007,
            host_tid: 4011,
            start_ns: 123_456_789,
            flags: types::stack_copy_flags::STACK_COPY_FAULT.0,
            size: 24,
            ..Default::default()
        };
        for (index, byte) in copy.bytes.iter_mut().enumerate() {
            *byte = index as u8;
        }
        let parsed = stack_copy_from_bytes(pod_bytes(&copy)).unwrap();
        assert_eq!(parsed.id, copy.id);
        assert_eq!(parsed.block, (4011, 123_456_789));
        assert_eq!(parsed.tgid, 7);
        assert_eq!(
            (parsed.regs.ip, parsed.regs.sp, parsed.regs.fp),
            (copy.ip, copy.sp, copy.fp)
        );
        assert_eq!(parsed.entry, unwind::Entry::Fault);
        assert_eq!(parsed.bytes, (0..24).collect::<Vec<u8>>());

        // A size beyond the buffer keeps the buffer, no more.
        copy.size = u32::MAX;
        let parsed = stack_copy_from_bytes(pod_bytes(&copy)).unwrap();
        assert_eq!(parsed.bytes.len(), copy.bytes.len());
        let short = &pod_bytes(&copy)[..100];
        assert!(matches!(
            stack_copy_from_bytes(short),
            Err(CaptureError::MapLayout { got: 100, .. })
        ));

        // A value of the small map reads the same, its bytes its own.
        let small = types::stack_copy_small {
            id: copy.id,
            sp: copy.sp,
            host_tid: copy.host_tid,
            start_ns: copy.start_ns,
            flags: types::stack_copy_flags::STACK_COPY_TO_TOP.0,
            size: 40,
            bytes: [7; 2048],
            ..Default::default()
        };
        let parsed = stack_copy_from_bytes(pod_bytes(&small)).unwrap();
        assert_eq!(
            (parsed.id, parsed.block, parsed.regs.sp),
            (copy.id, (4011, 123_456_789), copy.sp)
        );
        assert_eq!(parsed.entry, unwind::Entry::SystemCall);
        assert!(parsed.to_top);
        assert_eq!(parsed.bytes, [7; 40]);
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
        use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

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
            // A private probe: the tests read what their own programs wrote.
            let mut probe = Probe::load(storage, None)
                .expect("these tests load BPF programs: run them as root");
            // Its survey sets the process's bit, which every program tests first.
            probe.add_target(std::process::id(), &filters).unwrap();
            probe
        }

        fn run(program: &libbpf_rs::ProgramMut, args: &[u64]) {
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
        fn the_survey_finds_a_target_s_address_space_and_counts_every_change_of_it() {
            let mut storage = MaybeUninit::uninit();
            let mut probe = probe(&mut storage, 0);
            let pid = std::process::id();
            // The other tests' threads map memory too: a look that finds a
            // writer at work is taken again.
            let mut look = || {
                for _ in 0..100 {
                    probe.survey().unwrap();
                    let spaces = probe.address_spaces().unwrap();
                    let space = *spaces.get(&pid).expect("the survey saw its target");
                    if space.is_settled() {
                        return space;
                    }
                }
                panic!("a writer held our mmap_lock at each of 100 surveys");
            };
            let before = look();
            // SAFETY: a fresh private anonymous page, unmapped at once.
            unsafe {
                let page = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(page, libc::MAP_FAILED);
                assert_eq!(libc::munmap(page, 4096), 0);
            }
            let after = look();
            assert_eq!(after.id, before.id, "the same address space");
            // Each of mmap and munmap locked it for writing: 2 each.
            assert!(
                after.writes.wrapping_sub(before.writes) >= 4,
                "{before:?}, then {after:?}"
            );
        }

        /// How often the survey program has run, while `stats` keeps the
        /// kernel counting: once per task it visits, and once at the end.
        fn survey_runs(probe: &Probe, _stats: &OwnedFd) -> u64 {
            use libbpf_rs::libbpf_sys;
            let mut info = libbpf_sys::bpf_prog_info::default();
            let mut len = size_of::<libbpf_sys::bpf_prog_info>() as u32;
            let fd = probe.skel.progs.survey.as_fd().as_raw_fd();
            // SAFETY: `info` is as large as `len` says.
            let rc = unsafe { libbpf_sys::bpf_prog_get_info_by_fd(fd, &mut info, &mut len) };
            assert_eq!(rc, 0, "BPF_OBJ_GET_INFO_BY_FD on the survey");
            info.run_cnt
        }

        #[test]
        fn once_its_targets_are_known_the_survey_visits_their_threads_only() {
            use libbpf_rs::libbpf_sys;
            // Other tasks on the node: a process nobody watches, with 200
            // sleeping threads. One process, so that starting it does not
            // load the machine the other tests time walks on.
            const CROWD: usize = 200;
            struct Crowd(std::process::Child);
            impl Drop for Crowd {
                fn drop(&mut self) {
                    let _ = self.0.kill();
                    let _ = self.0.wait();
                }
            }
            let crowd = Crowd(
                std::process::Command::new("python3")
                    .args([
                        "-c",
                        "import threading, time\n\
                         for _ in range(200):\n    \
                         threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n\
                         time.sleep(60)",
                    ])
                    .spawn()
                    .unwrap(),
            );
            let tasks = format!("/proc/{}/task", crowd.0.id());
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::fs::read_dir(&tasks).map_or(0, |dir| dir.count()) <= CROWD {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the crowd never gathered"
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let mut storage = MaybeUninit::uninit();
            let mut probe = probe(&mut storage, 0);
            assert!(
                probe.targets.values().all(Option::is_some),
                "the target is known"
            );
            // SAFETY: no preconditions; the kernel counts runs while the fd is open.
            let stats = unsafe { libbpf_sys::bpf_enable_stats(libbpf_sys::BPF_STATS_RUN_TIME) };
            assert!(stats >= 0, "BPF_ENABLE_STATS");
            // SAFETY: a descriptor the kernel just gave us.
            let stats = unsafe { OwnedFd::from_raw_fd(stats) };

            let before = survey_runs(&probe, &stats);
            probe.survey().unwrap();
            let by_process = survey_runs(&probe, &stats) - before;
            let threads = std::fs::read_dir("/proc/self/task").unwrap().count() as u64;
            assert!(
                probe.survey_by_process,
                "Linux 6.1 and later survey one process"
            );
            // This test binary's threads come and go as the other tests run.
            assert!(
                by_process >= 2 && by_process <= threads + 16,
                "{by_process} visits for a process of about {threads} threads"
            );

            probe.survey_by_process = false;
            let before = survey_runs(&probe, &stats);
            probe.survey().unwrap();
            let whole_node = survey_runs(&probe, &stats) - before;
            assert!(
                whole_node >= by_process + CROWD as u64,
                "the whole node: {whole_node} visits, {by_process} for the target"
            );
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
