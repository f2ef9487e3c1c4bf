//! The one place that touches BPF: it opens, tunes, loads and attaches the
//! `offcpu` skeleton and turns map bytes into owned values. Everything outside
//! this module sees plain Rust types.

use std::io::Read;
use std::mem::{size_of, MaybeUninit};
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Iter, Link, MapCore, MapFlags, OpenObject, PrintLevel};

use super::{BlockKey, CaptureError, DropCounts, InFlight, LockKind, LockMode, LockWait, StackRef};
use crate::profile::ThreadState;

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
}

/// The deepest stack the kernel records (PERF_MAX_STACK_DEPTH).
pub(super) const MAX_STACK_DEPTH: usize = 127;

/// A thread the task iterator found already blocked.
#[derive(Debug, Default)]
pub(super) struct Preblocked {
    pub kernel_ips: Vec<u64>,
    /// User registers at kernel entry, 0 when the thread has none.
    pub user_ip: u64,
    pub user_fp: u64,
}

/// Which attach point the kernel accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// `tp_btf/sched_switch`: typed arguments, the cheapest.
    TpBtf,
    /// `raw_tp/sched_switch`: the fallback for kernels that refuse tp_btf.
    RawTp,
}

/// What this kernel let the probe use, settled once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    pub hook: Hook,
    /// `lock:contention_begin/end` are there: blocked threads are labelled
    /// with the kernel lock they wait for and its holder.
    pub lock_contention: bool,
}

impl std::fmt::Display for Features {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hook = match self.hook {
            Hook::TpBtf => "tp_btf",
            Hook::RawTp => "raw_tp",
        };
        let locks = if self.lock_contention { "on" } else { "off" };
        write!(f, "sched_switch via {hook}, lock attribution {locks}")
    }
}

/// A loaded and attached off-CPU probe.
pub(super) struct Probe<'obj> {
    skel: OffcpuSkel<'obj>,
    _links: Vec<Link>,
    pub features: Features,
}

/// Plain-old-data skeleton types that may be built from map bytes.
///
/// # Safety
/// Implementors must be `repr(C)` structs of integers (or transparent integer
/// newtypes), valid for every bit pattern.
unsafe trait Pod: Copy + Default {}
unsafe impl Pod for types::block_start {}
unsafe impl Pod for types::block_key {}
unsafe impl Pod for types::block_total {}
unsafe impl Pod for types::preblocked_stack {}
unsafe impl Pod for types::lock_wait {}
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

fn stack_ref(id: i32) -> StackRef {
    match id as u32 {
        id if id == types::stack_id_special::STACK_ID_PREBLOCKED.0 => StackRef::Preblocked,
        _ if id < 0 => StackRef::Missing,
        _ => StackRef::Id(id as u32),
    }
}

fn key_from_kernel(key: &types::block_key) -> BlockKey {
    BlockKey {
        tgid: key.tgid,
        tid: key.tid,
        kernel_stack: stack_ref(key.kernel_stack_id),
        user_stack: stack_ref(key.user_stack_id),
        state: state_from_kernel(key.state),
        lock: lock_from_kernel(&key.lock),
    }
}

fn lock_from_kernel(lock: &types::lock_wait) -> Option<LockWait> {
    use types::lock_kind as bits;
    if lock.addr == 0 {
        return None;
    }
    let has = |bit: bits| lock.kind & bit.0 != 0;
    let kind = if has(bits::LOCK_MUTEX) {
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
        let features = Self::supported_features(filters, pidns);
        let skel = Self::open_tuned(storage, filters, pidns, features)?
            .load()
            .map_err(|err| CaptureError::Load {
                detail: format!("{features:?}: {err}"),
            })?;
        Ok(Probe {
            skel,
            _links: Vec::new(),
            features,
        })
    }

    /// Attaches the sched_switch hook and, when available, the lock
    /// contention tracepoints.
    pub fn attach(&mut self) -> Result<(), CaptureError> {
        let switch = match self.features.hook {
            Hook::TpBtf => &self.skel.progs.sched_switch_btf,
            Hook::RawTp => &self.skel.progs.sched_switch_raw,
        };
        let mut links = vec![switch.attach().map_err(|source| CaptureError::Attach {
            what: "sched_switch tracepoint",
            source,
        })?];
        if self.features.lock_contention {
            for (what, program) in [
                (
                    "lock:contention_begin tracepoint",
                    &self.skel.progs.contention_begin,
                ),
                (
                    "lock:contention_end tracepoint",
                    &self.skel.progs.contention_end,
                ),
            ] {
                links.push(
                    program
                        .attach()
                        .map_err(|source| CaptureError::Attach { what, source })?,
                );
            }
        }
        self._links = links;
        Ok(())
    }

    /// What this kernel takes, learned once per process by trial loads, best
    /// first: `tp_btf` with lock attribution, `tp_btf` alone, then `raw_tp`.
    fn supported_features(filters: &Filters, pidns: Option<(u64, u64)>) -> Features {
        static FEATURES: OnceLock<Features> = OnceLock::new();
        *FEATURES.get_or_init(|| {
            let candidates = [
                Features {
                    hook: Hook::TpBtf,
                    lock_contention: true,
                },
                Features {
                    hook: Hook::TpBtf,
                    lock_contention: false,
                },
            ];
            let chosen = candidates.into_iter().find(|&features| {
                let mut trial = MaybeUninit::uninit();
                let loaded = Self::open_tuned_raw(&mut trial, filters, pidns, features)
                    .and_then(|open| open.load())
                    .is_ok();
                loaded
            });
            let features = chosen.unwrap_or(Features {
                hook: Hook::RawTp,
                lock_contention: false,
            });
            if !features.lock_contention {
                tracing::warn!(
                    "this kernel has no usable lock:contention_begin/end tracepoints: \
                     blocked threads are captured without naming the lock they wait for"
                );
            }
            features
        })
    }

    fn open_tuned<'a>(
        storage: &'a mut MaybeUninit<OpenObject>,
        filters: &Filters,
        pidns: Option<(u64, u64)>,
        features: Features,
    ) -> Result<offcpu::OpenOffcpuSkel<'a>, CaptureError> {
        Self::open_tuned_raw(storage, filters, pidns, features).map_err(|err| CaptureError::Load {
            detail: err.to_string(),
        })
    }

    fn open_tuned_raw<'a>(
        storage: &'a mut MaybeUninit<OpenObject>,
        filters: &Filters,
        pidns: Option<(u64, u64)>,
        features: Features,
    ) -> Result<offcpu::OpenOffcpuSkel<'a>, libbpf_rs::Error> {
        let mut open = OffcpuSkelBuilder::default().open(storage)?;
        let rodata = open
            .maps
            .rodata_data
            .as_deref_mut()
            .expect("offcpu.bpf.c declares const volatile tunables");
        rodata.target_tid = filters.tid.unwrap_or(0);
        rodata.target_cgroup_id = filters.cgroup_id.unwrap_or(0);
        rodata.min_block_ns = filters.min_block_ns;
        rodata.max_block_ns = filters.max_block_ns.unwrap_or(u64::MAX);
        rodata.state_mask = filters
            .states
            .iter()
            .map(|state| state_bit(*state))
            .fold(0, |a, b| a | b);
        if let Some((dev, ino)) = pidns {
            rodata.pidns_dev = dev;
            rodata.pidns_ino = ino;
        }
        open.progs
            .sched_switch_btf
            .set_autoload(features.hook == Hook::TpBtf);
        open.progs
            .sched_switch_raw
            .set_autoload(features.hook == Hook::RawTp);
        open.progs
            .contention_begin
            .set_autoload(features.lock_contention);
        open.progs
            .contention_end
            .set_autoload(features.lock_contention);
        Ok(open)
    }

    pub fn add_target(&self, tgid: u32) -> Result<(), CaptureError> {
        self.skel
            .maps
            .targets
            .update(&tgid.to_ne_bytes(), &[1], MapFlags::ANY)
            .map_err(|source| CaptureError::Map {
                map: "targets",
                source,
            })
    }

    pub fn remove_target(&self, tgid: u32) -> Result<(), CaptureError> {
        match self.skel.maps.targets.delete(&tgid.to_ne_bytes()) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CaptureError::Map {
                map: "targets",
                source,
            }),
        }
    }

    /// Runs the task iterator once: target threads that are off the CPU right
    /// now are entered as blocks that start now.
    pub fn find_preblocked(&self) -> Result<(), CaptureError> {
        let link = self
            .skel
            .progs
            .find_blocked
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

    /// Blocks still in progress, by host tid.
    pub fn in_flight(&self) -> Result<Vec<InFlight>, CaptureError> {
        let map = &self.skel.maps.starts;
        let entries = map
            .lookup_batch(BATCH, MapFlags::ANY, MapFlags::ANY)
            .map_err(|source| CaptureError::Map {
                map: "starts",
                source,
            })?;
        let mut blocks = Vec::new();
        for (key, value) in entries {
            let host_tid =
                u32::from_ne_bytes(key.get(..4).and_then(|bytes| bytes.try_into().ok()).ok_or(
                    CaptureError::MapLayout {
                        expected: 4,
                        got: key.len(),
                    },
                )?);
            let start: types::block_start = from_bytes(&value)?;
            blocks.push(InFlight {
                host_tid,
                start_ns: start.start_ns,
                key: BlockKey {
                    tgid: start.tgid,
                    tid: start.tid,
                    kernel_stack: stack_ref(start.kernel_stack_id),
                    user_stack: stack_ref(start.user_stack_id),
                    state: state_from_kernel(start.state),
                    lock: lock_from_kernel(&start.lock),
                },
            });
        }
        Ok(blocks)
    }

    /// Takes every finished-block total out of the kernel.
    pub fn drain_blocked(&self) -> Result<Vec<(BlockKey, u64, u64)>, CaptureError> {
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
            totals.push((key_from_kernel(&key), total.blocked_ns, total.count));
        }
        Ok(totals)
    }

    /// The addresses of a recorded stack, innermost first.
    pub fn stack(&self, id: u32) -> Result<Vec<u64>, CaptureError> {
        let bytes = self
            .skel
            .maps
            .stacks
            .lookup(&id.to_ne_bytes(), MapFlags::ANY)
            .map_err(|source| CaptureError::Map {
                map: "stacks",
                source,
            })?
            .unwrap_or_default();
        Ok(bytes
            .chunks_exact(8)
            .map(|word| u64::from_ne_bytes(word.try_into().expect("chunks of 8")))
            .take_while(|&ip| ip != 0)
            .collect())
    }

    /// How many stacks the kernel-side stack map holds.
    pub fn stack_capacity(&self) -> u32 {
        self.skel.maps.stacks.max_entries()
    }

    /// Frees a stack map slot. A block recorded with this stack later simply
    /// records it again, under the same id (ids are hash buckets).
    pub fn forget_stack(&self, id: u32) -> Result<(), CaptureError> {
        match self.skel.maps.stacks.delete(&id.to_ne_bytes()) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CaptureError::Map {
                map: "stacks",
                source,
            }),
        }
    }

    /// What the task iterator found of a pre-blocked thread.
    pub fn preblocked_stack(&self, tid: u32) -> Result<Preblocked, CaptureError> {
        let bytes = self
            .skel
            .maps
            .preblocked_stacks
            .lookup(&tid.to_ne_bytes(), MapFlags::ANY)
            .map_err(|source| CaptureError::Map {
                map: "preblocked_stacks",
                source,
            })?;
        let Some(bytes) = bytes else {
            return Ok(Preblocked::default());
        };
        let stack: types::preblocked_stack = from_bytes(&bytes)?;
        let depth = (stack.depth as usize).min(stack.ips.len());
        Ok(Preblocked {
            kernel_ips: stack.ips[..depth].to_vec(),
            user_ip: stack.user_ip,
            user_fp: stack.user_fp,
        })
    }

    /// Drop counters summed over CPUs.
    pub fn drops(&self) -> Result<DropCounts, CaptureError> {
        let map = &self.skel.maps.drops;
        let mut counts = [0u64; types::drop_reason::DROP_REASON_COUNT.0 as usize];
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
        let at = |reason: types::drop_reason| counts[reason.0 as usize];
        Ok(DropCounts {
            start_map_full: at(types::drop_reason::DROP_START_MAP_FULL),
            blocked_map_full: at(types::drop_reason::DROP_BLOCKED_MAP_FULL),
            kernel_stack: at(types::drop_reason::DROP_KERNEL_STACK),
            user_stack: at(types::drop_reason::DROP_USER_STACK),
            preblocked_map_full: at(types::drop_reason::DROP_PREBLOCKED_MAP_FULL),
        })
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
        assert_eq!(stack_ref(-2), StackRef::Preblocked);
        assert_eq!(stack_ref(-1), StackRef::Missing);
        assert_eq!(stack_ref(-14), StackRef::Missing);
        assert_eq!(stack_ref(7), StackRef::Id(7));
    }

    #[test]
    fn short_map_values_are_an_error_not_a_panic() {
        let err = from_bytes::<types::block_total>(&[0u8; 3]).unwrap_err();
        assert!(matches!(
            err,
            CaptureError::MapLayout {
                expected: 16,
                got: 3
            }
        ));
    }
}
