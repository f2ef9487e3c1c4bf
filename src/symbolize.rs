//! Turns raw stacks into frames with names: kernel addresses through
//! kallsyms, user addresses through the target's ELF and DWARF (demangled,
//! inlined frames, file:line), batched per process and cached.
//!
//! A lookup that fails is data, not an error: the frame stays, named
//! `[unknown] file+0xoffset` when at least the file is known.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::mpsc;

use blazesym::normalize::{Normalizer, UserMeta};
use blazesym::symbolize::source::{Kernel, Process, Source};
use blazesym::symbolize::{CodeInfo, Input, Symbolized, Symbolizer as Blazesym};
use blazesym::Pid;

mod perf_map;
mod returns;
mod scheduler;

use perf_map::PerfMap;
use returns::ReturnSites;
use scheduler::SchedulerText;

use crate::capture::{BlockedStack, LockHold, LockKind, LockMode, LockWait, UserStackEnd, Window};
use crate::process_map::{Mapping as ProcessMapping, ProcessMap};
use crate::profile::labels::{Key, STACK_SEPARATOR};
use crate::profile::{
    Frame, FrameKind, Line, Mapping, Profile, ProfileKind, Sample, SampleLabels, TimeSlice,
};

/// The deepest stack the kernel walks; a user stack this deep was cut off.
const MAX_STACK_DEPTH: usize = 127;

/// Outermost functions of a fully walked user stack: a process's first
/// thread starts in `_start`, the others in the thread-creation trampolines.
const STACK_ROOTS: &[&str] = &[
    "_start",
    "__libc_start_main",
    "__libc_start_call_main",
    "start_thread",
    "clone",
    "clone3",
    "__clone",
    "__clone3",
];

/// Symbolizes windows; keeps caches across calls, so one instance should
/// live as long as the tracer it serves.
pub struct Symbolizer {
    blazesym: Blazesym,
    normalizer: Normalizer,
    kernel: HashMap<u64, Frame>,
    /// Read from kallsyms with the first kernel stack.
    scheduler_text: std::cell::OnceCell<SchedulerText>,
    /// Per process: address to frame. Dropped when the process goes away.
    user: HashMap<u32, ProcessSymbols>,
}

#[derive(Default)]
struct ProcessSymbols {
    frames: HashMap<u64, UserFrame>,
    /// Every file-backed region seen in the process, in the order first
    /// seen: frames refer to them by index, so the list only grows, and it
    /// outlives the process, whose frames keep their files.
    regions: Vec<Region>,
    /// Every executable range seen in the process (files, the vDSO and
    /// JIT code alike): where a return address can point.
    code: Vec<(u64, u64)>,
    /// Addresses a frame-pointer walk returned to, and whether the code
    /// there confirmed them (see [`ReturnSites`]).
    returns: HashMap<u64, bool>,
}

impl ProcessSymbols {
    /// Adds the regions of a fresh read of the maps that are not known yet.
    fn learn_regions(&mut self, regions: Vec<Region>) {
        for region in regions {
            // Build ids are learned later: they do not tell regions apart.
            let known = self.regions.iter().any(|seen| {
                (seen.start, seen.end, seen.offset, &seen.path)
                    == (region.start, region.end, region.offset, &region.path)
            });
            if !known {
                self.regions.push(region);
            }
        }
    }

    /// Adds the executable ranges of a fresh read of the maps.
    fn learn_code(&mut self, map: &ProcessMap) {
        for mapping in map.mappings().iter().filter(|mapping| mapping.executable) {
            let range = (mapping.start, mapping.end);
            if !self.code.contains(&range) {
                self.code.push(range);
            }
        }
    }

    /// Whether an address was code in the process, as far as its maps were
    /// read; `None` if they never were (it was gone before the first read).
    fn is_code(&self, ip: u64) -> Option<bool> {
        (!self.code.is_empty()).then(|| {
            self.code
                .iter()
                .any(|&(start, end)| (start..end).contains(&ip))
        })
    }

    /// Whether a frame-pointer walk may go on at `ip`, its `depth`-th
    /// address: one outside the code the process was seen to have is not
    /// code at all, and below the first one (the instruction the thread
    /// entered the kernel at) each must be confirmed as a return address.
    /// An address never judged (its process was gone first) is kept.
    fn may_walk_to(&self, ip: u64, depth: usize) -> bool {
        self.is_code(ip) != Some(false)
            && (depth == 0 || self.returns.get(&ip).copied() != Some(false))
    }

    /// The region an address falls in; the latest one seen, should a range
    /// have been mapped again.
    fn region_of(&self, ip: u64) -> Option<usize> {
        self.regions
            .iter()
            .rposition(|region| (region.start..region.end).contains(&ip))
    }
}

/// A process's addresses to look up in a batch, and those among them a
/// frame-pointer walk returned to, whose code must confirm them.
#[derive(Default)]
struct Wanted {
    ips: HashSet<u64>,
    returns: HashSet<u64>,
}

#[derive(Clone)]
struct UserFrame {
    lines: Vec<Line>,
    /// Index into `regions`.
    region: Option<usize>,
    /// Looked up again in the next batch: a miss outside any file is JIT
    /// code whose perf map entry may not have been written yet.
    retry: bool,
}

/// A file-backed mapping of the process, as its frames' mappings name it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Region {
    start: u64,
    end: u64,
    offset: u64,
    path: String,
    build_id: Option<String>,
}

impl Region {
    fn of(mapping: &ProcessMapping) -> Option<Region> {
        Some(Region {
            start: mapping.start,
            end: mapping.end,
            offset: mapping.offset,
            path: mapping.path.clone()?,
            build_id: None,
        })
    }
}

/// What one window gives: its off-CPU profile and, when the targets made
/// large address-space calls in it, their profile.
#[derive(Debug, Clone)]
pub struct Profiles {
    pub off_cpu: Profile,
    pub address_space: Option<Profile>,
}

/// A [`Symbolizer`] on a thread of its own: blazesym's caches are not
/// `Send`, and one long-lived cache serves every capture best.
pub struct SymbolizerThread {
    requests: Option<mpsc::Sender<Request>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum Request {
    /// Look the window's frames up and keep them (see [`Symbolizer::learn`]).
    Learn(Window),
    Profiles(Window, mpsc::Sender<Profiles>),
}

#[derive(Debug, thiserror::Error)]
#[error("the symbolizer thread has stopped")]
pub struct SymbolizerStopped;

impl SymbolizerThread {
    pub fn start() -> std::io::Result<Self> {
        let (requests, inbox) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name("ff-symbolize".into())
            .spawn(move || {
                let mut symbolizer = Symbolizer::new();
                for request in inbox {
                    match request {
                        Request::Learn(window) => symbolizer.learn(&window),
                        Request::Profiles(window, reply) => {
                            let _ = reply.send(symbolizer.profiles(&window));
                        }
                    }
                }
            })?;
        Ok(SymbolizerThread {
            requests: Some(requests),
            thread: Some(thread),
        })
    }

    /// Has the thread look a window's frames up while their processes live;
    /// returns at once. Requests are served in order, so a later
    /// [`SymbolizerThread::profiles`] finds them.
    pub fn learn(&self, window: Window) {
        if let Some(requests) = &self.requests {
            let _ = requests.send(Request::Learn(window));
        }
    }

    /// Symbolizes a window; blocks until done.
    pub fn profiles(&self, window: Window) -> Result<Profiles, SymbolizerStopped> {
        let (reply, answer) = mpsc::channel();
        self.requests
            .as_ref()
            .ok_or(SymbolizerStopped)?
            .send(Request::Profiles(window, reply))
            .map_err(|_| SymbolizerStopped)?;
        answer.recv().map_err(|_| SymbolizerStopped)
    }
}

impl Drop for SymbolizerThread {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        Symbolizer {
            blazesym: Blazesym::builder()
                .enable_code_info(true)
                .enable_inlined_fns(true)
                .enable_demangling(true)
                .build(),
            normalizer: Normalizer::builder().enable_build_ids(true).build(),
            kernel: HashMap::new(),
            scheduler_text: std::cell::OnceCell::new(),
            user: HashMap::new(),
        }
    }

    /// Forgets what was cached for a process (it exited or was replaced).
    pub fn forget_process(&mut self, pid: u32) {
        self.user.remove(&pid);
    }

    /// Builds the profiles of a window. Must run while the target processes
    /// are still alive for their user frames to get names.
    pub fn profiles(&mut self, window: &Window) -> Profiles {
        let off_cpu = self.profile(window);
        let address_space = self.address_space(window);
        Profiles {
            off_cpu,
            address_space,
        }
    }

    /// The large address-space calls of a window, one sample per call:
    /// its bytes, its caller's user stack, its time in the timeline and its
    /// duration in a label. Calls are few and each matters on its own (one
    /// resize is one call), so none are merged; viewers sum them anyway.
    /// `None` when there were none. Follows [`Symbolizer::profile`] on the
    /// same window, which looked the frames up.
    fn address_space(&self, window: &Window) -> Option<Profile> {
        if window.address_changes.is_empty() {
            return None;
        }
        let mut mappings = Vec::new();
        let mut mapping_index = HashMap::new();
        let mut samples: Vec<Sample> = Vec::with_capacity(window.address_changes.len());
        for change in &window.address_changes {
            let slice = TimeSlice {
                start: change.start,
                duration: change.duration,
                value: change.size,
                count: 1,
            };
            let (mut stack, truncated) = self.walked_user_frames(
                change.tgid,
                &change.user_ips,
                &mut mappings,
                &mut mapping_index,
            );
            if truncated {
                stack.push(Frame::marker_truncated());
            }
            samples.push(Sample {
                stack,
                value: change.size,
                count: 1,
                labels: SampleLabels {
                    process_id: change.tgid,
                    thread_id: change.tid,
                    thread_name: change.thread_name.clone(),
                    // In a system call, on the CPU or not: never blocked on
                    // its own account.
                    state: crate::profile::ThreadState::Runnable,
                    extra: vec![
                        (Key::Syscall, change.call.name().to_string()),
                        (Key::SyscallNs, change.duration.as_nanos().to_string()),
                    ],
                    foreign: Vec::new(),
                },
                timeline: vec![slice],
            });
        }
        Some(Profile {
            kind: ProfileKind::AddressSpace,
            start: window.start,
            duration: window.duration,
            samples,
            mappings,
            comments: vec![format!(
                "freezeframe address-space changes ({}): mmap, munmap, mremap, brk and madvise calls \
                 above the capture's threshold",
                window.features
            )],
        })
    }

    /// Looks up the frames of a window and keeps them, so that a later
    /// [`Symbolizer::profiles`] names them even if their process has exited
    /// by then. A long capture calls this on each window it cuts.
    pub fn learn(&mut self, window: &Window) {
        self.symbolize_kernel(
            window
                .stacks
                .iter()
                .flat_map(|stack| stack.kernel_ips.iter())
                .chain(
                    window
                        .lock_holds
                        .iter()
                        .flat_map(|hold| hold.kernel_ips.iter()),
                ),
        );
        let mut by_process: HashMap<u32, Wanted> = HashMap::new();
        let mut want = |tgid: u32, ips: &[u64], walked: bool| {
            let wanted = by_process.entry(tgid).or_default();
            wanted.ips.extend(ips);
            if walked {
                wanted.returns.extend(ips.iter().skip(1));
            }
        };
        for stack in &window.stacks {
            want(
                stack.tgid,
                &stack.user_ips,
                stack.user_end == UserStackEnd::Walked,
            );
        }
        for hold in &window.lock_holds {
            want(hold.tgid, &hold.user_ips, true);
        }
        for change in &window.address_changes {
            want(change.tgid, &change.user_ips, true);
        }
        for (pid, wanted) in by_process {
            self.symbolize_process(pid, wanted);
        }
    }

    /// Builds the off-CPU profile of a window. Its user frames get names if
    /// their process is still alive, or was when [`Symbolizer::learn`] saw
    /// them.
    pub fn profile(&mut self, window: &Window) -> Profile {
        self.learn(window);
        let mut mappings = Vec::new();
        let mut mapping_index: HashMap<(u32, usize), usize> = HashMap::new();
        let samples = window
            .stacks
            .iter()
            .map(|stack| {
                let mut sample = self.sample(stack, &mut mappings, &mut mapping_index);
                if let Some(hold) = stack
                    .lock
                    .and_then(|wait| holder_of(wait, &window.lock_holds))
                {
                    self.label_hold(&mut sample.labels, hold);
                }
                sample
            })
            .collect();

        let mut comments = vec![format!("freezeframe off-CPU capture ({})", window.features)];
        for (map, dropped) in window.drops.by_map() {
            if dropped > 0 {
                comments.push(format!("bpf drops: {map}={dropped}"));
            }
        }
        Profile {
            kind: ProfileKind::OffCpu,
            start: window.start,
            duration: window.duration,
            samples,
            mappings,
            comments,
        }
    }

    fn sample(
        &self,
        stack: &BlockedStack,
        mappings: &mut Vec<Mapping>,
        mapping_index: &mut HashMap<(u32, usize), usize>,
    ) -> Sample {
        let scheduler_text = self.scheduler_text.get_or_init(SchedulerText::read);
        let mut frames: Vec<Frame> = stack
            .kernel_ips
            .iter()
            .filter(|&&ip| !scheduler_text.contains(ip))
            .map(|ip| {
                self.kernel
                    .get(ip)
                    .cloned()
                    .unwrap_or_else(|| unknown_kernel_frame(*ip))
            })
            .skip_while(is_tracing_machinery)
            .collect();
        let (user, truncated) = match stack.user_end {
            UserStackEnd::Walked => {
                self.walked_user_frames(stack.tgid, &stack.user_ips, mappings, mapping_index)
            }
            end => (
                self.user_frames(stack.tgid, &stack.user_ips, mappings, mapping_index),
                end == UserStackEnd::Truncated,
            ),
        };
        frames.extend(user);
        if stack.user_end == UserStackEnd::NotRead {
            frames.push(Frame::marker_not_read());
        }
        if truncated {
            frames.push(Frame::marker_truncated());
        }
        Sample {
            stack: frames,
            value: stack.blocked_ns,
            count: stack.count,
            labels: SampleLabels {
                process_id: stack.tgid,
                thread_id: stack.tid,
                thread_name: stack.thread_name.clone(),
                state: stack.state,
                extra: stack.lock.map(lock_labels).unwrap_or_default(),
                foreign: Vec::new(),
            },
            timeline: stack.timeline.clone(),
        }
    }

    /// The frames of a frame-pointer walk, as far as it holds up (see
    /// [`walked_part`]), and whether it stops short of the thread's root.
    fn walked_user_frames(
        &self,
        tgid: u32,
        ips: &[u64],
        mappings: &mut Vec<Mapping>,
        mapping_index: &mut HashMap<(u32, usize), usize>,
    ) -> (Vec<Frame>, bool) {
        let walked = walked_part(ips, self.user.get(&tgid));
        let frames = self.user_frames(tgid, walked, mappings, mapping_index);
        let truncated = walked.len() < ips.len() || user_stack_truncated(ips, &frames);
        (frames, truncated)
    }

    /// The user frames of a stack, with the mappings they point into added
    /// to `mappings` once per process and region.
    fn user_frames(
        &self,
        tgid: u32,
        ips: &[u64],
        mappings: &mut Vec<Mapping>,
        mapping_index: &mut HashMap<(u32, usize), usize>,
    ) -> Vec<Frame> {
        let symbols = self.user.get(&tgid);
        ips.iter()
            .map(|&ip| {
                let user = symbols.and_then(|symbols| symbols.frames.get(&ip));
                let mapping = user.and_then(|user| user.region).map(|region| {
                    *mapping_index.entry((tgid, region)).or_insert_with(|| {
                        let region = &symbols.expect("region implies symbols").regions[region];
                        mappings.push(Mapping {
                            memory_start: region.start,
                            memory_limit: region.end,
                            file_offset: region.offset,
                            file: region.path.clone(),
                            build_id: region.build_id.clone(),
                        });
                        mappings.len() - 1
                    })
                });
                Frame {
                    kind: FrameKind::User,
                    address: ip,
                    mapping,
                    lines: user
                        .map_or_else(|| vec![unknown_line(ip, None)], |user| user.lines.clone()),
                }
            })
            .collect()
    }

    /// What the waiter's labels say about the hold it waited behind: who,
    /// how long, and in which call (the holder's user stack).
    fn label_hold(&self, labels: &mut SampleLabels, hold: &LockHold) {
        labels.remove(Key::LockHeldBy);
        labels.set(Key::LockHolderTid, hold.tid.to_string());
        if !hold.thread_name.is_empty() {
            labels.set(Key::LockHolder, hold.thread_name.clone());
        }
        let mode = match (hold.mode, hold.downgraded) {
            (LockMode::Write, false) => "write",
            (LockMode::Write, true) => "write, then read",
            (LockMode::Read, _) => "read",
        };
        labels.set(Key::LockHolderMode, mode);
        labels.set(Key::LockHoldNs, hold.duration.as_nanos().to_string());
        let walked = walked_part(&hold.user_ips, self.user.get(&hold.tgid));
        let stack = self.user_functions(hold.tgid, walked);
        if !stack.is_empty() {
            labels.set(Key::LockHolderStack, stack.join(STACK_SEPARATOR));
        }
    }

    /// Function names of a user stack, innermost first, inlined frames
    /// included, at most [`LABEL_STACK_DEPTH`].
    pub(crate) fn user_functions(&self, tgid: u32, ips: &[u64]) -> Vec<String> {
        let symbols = self.user.get(&tgid);
        ips.iter()
            .flat_map(
                |ip| match symbols.and_then(|symbols| symbols.frames.get(ip)) {
                    Some(frame) => frame
                        .lines
                        .iter()
                        .map(|line| line.function.clone())
                        .collect(),
                    None => vec![unknown_line(*ip, None).function],
                },
            )
            .take(LABEL_STACK_DEPTH)
            .collect()
    }

    fn symbolize_kernel<'a>(&mut self, ips: impl Iterator<Item = &'a u64>) {
        let mut wanted: Vec<u64> = ips
            .copied()
            .filter(|ip| !self.kernel.contains_key(ip))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        if wanted.is_empty() {
            return;
        }
        let source = Source::Kernel(Kernel::default());
        let call_sites: Vec<u64> = wanted.iter().map(|ip| ip.saturating_sub(1)).collect();
        let symbolized = self
            .blazesym
            .symbolize(&source, Input::AbsAddr(&call_sites));
        for (index, &ip) in wanted.iter().enumerate() {
            let lines = match symbolized.as_ref().ok().and_then(|all| all.get(index)) {
                Some(Symbolized::Sym(sym)) => lines_of(sym),
                _ => vec![unknown_line(ip, None)],
            };
            self.kernel.insert(
                ip,
                Frame {
                    kind: FrameKind::Kernel,
                    address: ip,
                    mapping: None,
                    lines,
                },
            );
        }
    }

    fn symbolize_process(&mut self, pid: u32, wanted: Wanted) {
        let symbols = self.user.entry(pid).or_default();
        let returns: Vec<u64> = wanted
            .returns
            .into_iter()
            .filter(|ip| !symbols.returns.contains_key(ip))
            .collect();
        let mut wanted: Vec<u64> = wanted
            .ips
            .into_iter()
            .filter(|ip| symbols.frames.get(ip).is_none_or(|frame| frame.retry))
            .collect();
        if wanted.is_empty() && returns.is_empty() {
            return;
        }
        wanted.sort_unstable();
        // Regions are re-read for every batch: a new library may have been
        // loaded since the last one.
        let map = ProcessMap::read(pid).unwrap_or_default();
        symbols.learn_regions(regions_of(&map));
        symbols.learn_code(&map);
        // With no map (the process is gone) nothing can be judged: the
        // addresses stay unjudged rather than refuted.
        if !map.mappings().is_empty() {
            let mut sites = ReturnSites::new(pid, &map);
            for ip in returns {
                symbols.returns.insert(ip, sites.confirm(ip));
            }
        }
        if wanted.is_empty() {
            return;
        }
        let build_ids = build_ids(&self.normalizer, pid, &wanted);
        for region in &mut symbols.regions {
            if let Some(build_id) = build_ids.get(&region.path) {
                region.build_id = Some(build_id.clone());
            }
        }

        let mut process = Process::new(Pid::from(pid));
        // JIT code is looked up in its perf map below, by our own reader.
        process.perf_map = false;
        let source = Source::Process(process);
        let call_sites: Vec<u64> = wanted.iter().map(|ip| ip.saturating_sub(1)).collect();
        let symbolized = self
            .blazesym
            .symbolize(&source, Input::AbsAddr(&call_sites));
        let mut perf_map: Option<Option<PerfMap>> = None;
        for (index, (&ip, &call_site)) in wanted.iter().zip(&call_sites).enumerate() {
            let region = symbols.region_of(ip);
            let mut jit_name = || {
                perf_map
                    .get_or_insert_with(|| PerfMap::read(pid))
                    .as_ref()
                    .and_then(|map| map.name_of(call_site))
                    .map(|name| vec![named_line(name)])
            };
            let (lines, retry) = match symbolized.as_ref().ok().and_then(|all| all.get(index)) {
                Some(Symbolized::Sym(sym)) => (lines_of(sym), false),
                _ if region.is_none() => match jit_name() {
                    Some(lines) => (lines, false),
                    None => (vec![unknown_line(ip, None)], true),
                },
                _ => (
                    vec![unknown_line(
                        ip,
                        region.map(|region| &symbols.regions[region]),
                    )],
                    false,
                ),
            };
            symbols.frames.insert(
                ip,
                UserFrame {
                    lines,
                    region,
                    retry,
                },
            );
        }
    }
}

/// The kernel's tracepoint plumbing above a stack taken from a BPF program
/// (how many frames it adds depends on the hook): never part of a profile.
fn is_tracing_machinery(frame: &Frame) -> bool {
    const PREFIXES: [&str; 4] = ["bpf_prog_", "bpf_trace_run", "__bpf_trace_", "__traceiter_"];
    frame.lines.first().is_some_and(|line| {
        PREFIXES
            .iter()
            .any(|prefix| line.function.starts_with(prefix))
    })
}

/// GNU build ids of the files the addresses fall in, by path.
fn build_ids(normalizer: &Normalizer, pid: u32, sorted_ips: &[u64]) -> HashMap<String, String> {
    let Ok(output) = normalizer.normalize_user_addrs(Pid::from(pid), sorted_ips) else {
        return HashMap::new();
    };
    output
        .meta
        .iter()
        .filter_map(|meta| match meta {
            UserMeta::Elf(elf) => elf
                .build_id
                .as_ref()
                .map(|build_id| (elf.path.to_string_lossy().into_owned(), hex(build_id))),
            _ => None,
        })
        .collect()
}

/// How many functions of a holder's stack its waiters' labels carry.
const LABEL_STACK_DEPTH: usize = 32;

/// The recorded hold a waiter most likely waited behind: the longest hold
/// of the same lock by the thread the kernel named as its owner, else (a
/// rwsem held by readers names only the last one in, or none) the longest
/// hold of that lock at all.
fn holder_of(wait: LockWait, holds: &[LockHold]) -> Option<&LockHold> {
    let of_lock = || holds.iter().filter(move |hold| hold.lock_addr == wait.addr);
    let named = wait.holder_tid.and_then(|tid| {
        of_lock()
            .filter(|hold| hold.tid == tid)
            .max_by_key(|hold| hold.duration)
    });
    match named {
        Some(hold) if !wait.held_by_readers => Some(hold),
        _ => of_lock().max_by_key(|hold| hold.duration).or(named),
    }
}

/// The `lock`, `lock_mode` and `lock_holder_tid` labels of a lock wait.
fn lock_labels(lock: LockWait) -> Vec<(Key, String)> {
    let mut labels = vec![(Key::Lock, lock.name())];
    if let Some(mode) = lock.mode {
        let mode = match mode {
            LockMode::Read => "read",
            LockMode::Write => "write",
        };
        labels.push((Key::LockMode, mode.to_string()));
    }
    if let Some(holder) = lock.holder_tid {
        labels.push((Key::LockHolderTid, holder.to_string()));
        if lock.held_by_readers {
            labels.push((Key::LockHeldBy, "readers".to_string()));
        } else if lock.kind == LockKind::Futex {
            // Known from outside only as the thread that let go.
            labels.push((Key::LockHeldBy, "waker".to_string()));
        }
    }
    labels
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Lines of a symbol, innermost first. blazesym reports `f` with inlined
/// `g` and `h` as name `f` with inlined `[g, h]`, each carrying the source
/// location inside itself: `f`'s is the call site of `g`, `h`'s is the
/// address's own line.
fn lines_of(sym: &blazesym::symbolize::Sym<'_>) -> Vec<Line> {
    let outer = (&*sym.name, sym.code_info.as_deref());
    let inlined = sym
        .inlined
        .iter()
        .map(|inlined| (&*inlined.name, inlined.code_info.as_ref()));
    let mut lines: Vec<Line> = std::iter::once(outer)
        .chain(inlined)
        .map(|(name, location): (&str, Option<&CodeInfo<'_>>)| Line {
            function: name.to_string(),
            file: location.map(|info| info.to_path().display().to_string()),
            line: location.and_then(|info| info.line),
        })
        .collect();
    lines.reverse();
    lines
}

fn named_line(function: &str) -> Line {
    Line {
        function: function.to_string(),
        file: None,
        line: None,
    }
}

fn unknown_line(ip: u64, region: Option<&Region>) -> Line {
    let function = match region {
        Some(region) => {
            let file = Path::new(&region.path)
                .file_name()
                .map_or(region.path.clone(), |name| {
                    name.to_string_lossy().into_owned()
                });
            format!("[unknown] {file}+{:#x}", ip - region.start + region.offset)
        }
        None => format!("[unknown] {ip:#x}"),
    };
    Line {
        function,
        file: None,
        line: None,
    }
}

fn unknown_kernel_frame(ip: u64) -> Frame {
    Frame {
        kind: FrameKind::Kernel,
        address: ip,
        mapping: None,
        lines: vec![unknown_line(ip, None)],
    }
}

/// No mapping can start below this (`vm.mmap_min_addr`'s default, and what
/// x86-64 kernels enforce at least for unprivileged processes).
const LOWEST_MAPPING: u64 = 0x10000;

/// The part of a frame-pointer walk that can be return addresses. In code
/// built without frame pointers `rbp` is an ordinary register, and the walk
/// the kernel made from it may go on through whatever it pointed at. The
/// stack is cut before the first value that is not a return address: one
/// no mapping can hold (0, a small integer), one outside the code the
/// process was seen to have (a heap or stack address), or one in code that
/// no call precedes (see [`ProcessSymbols::may_walk_to`]).
fn walked_part<'a>(user_ips: &'a [u64], process: Option<&ProcessSymbols>) -> &'a [u64] {
    let end = user_ips
        .iter()
        .enumerate()
        .position(|(depth, &ip)| {
            ip < LOWEST_MAPPING || process.is_some_and(|process| !process.may_walk_to(ip, depth))
        })
        .unwrap_or(user_ips.len());
    &user_ips[..end]
}

/// Whether the walk stopped before reaching the thread's first frame.
fn user_stack_truncated(user_ips: &[u64], frames: &[Frame]) -> bool {
    if user_ips.is_empty() {
        // No user stack at all: a kernel-only thread, nothing to truncate.
        return false;
    }
    if user_ips.len() >= MAX_STACK_DEPTH {
        return true;
    }
    let root = frames
        .iter()
        .rev()
        .find(|frame| frame.kind == FrameKind::User);
    !root.is_some_and(|root| STACK_ROOTS.contains(&root.function()))
}

/// The regions of a process's mappings that have a name (files, and the
/// kernel's `[vdso]` and kind); none if the process is gone.
fn regions_of(map: &ProcessMap) -> Vec<Region> {
    map.mappings().iter().filter_map(Region::of).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Stack;

    #[test]
    fn maps_lines_with_a_file_become_regions() {
        let maps = "7f1c2a000000-7f1c2a1b6000 r-xp 00028000 fe:01 1837 /usr/lib/x86_64-linux-gnu/libc.so.6\n\
                    7ffd1000-7ffd2000 rw-p 00000000 00:00 0\n\
                    garbage\n";
        assert_eq!(
            regions_of(&ProcessMap::parse(maps)),
            vec![Region {
                start: 0x7f1c_2a00_0000,
                end: 0x7f1c_2a1b_6000,
                offset: 0x28000,
                path: "/usr/lib/x86_64-linux-gnu/libc.so.6".to_string(),
                build_id: None,
            }]
        );
    }

    #[test]
    fn jit_code_is_named_once_its_perf_map_is_written() {
        // Anonymous memory of this very process stands for a JIT's code cache.
        let code = vec![0u8; 4096];
        let start = code.as_ptr() as u64;
        let ip = start + 16;
        let pid = std::process::id();
        let perf_map = std::path::PathBuf::from(format!("/tmp/perf-{pid}.map"));
        let name_of =
            |symbolizer: &Symbolizer| symbolizer.user[&pid].frames[&ip].lines[0].function.clone();
        let mut symbolizer = Symbolizer::new();
        symbolizer.symbolize_process(
            pid,
            Wanted {
                ips: HashSet::from([ip]),
                returns: HashSet::new(),
            },
        );
        assert!(name_of(&symbolizer).starts_with("[unknown]"));

        std::fs::write(
            &perf_map,
            format!("{start:x} {:x} ff_compiled_late\n", code.len()),
        )
        .unwrap();
        symbolizer.symbolize_process(
            pid,
            Wanted {
                ips: HashSet::from([ip]),
                returns: HashSet::new(),
            },
        );
        let _ = std::fs::remove_file(&perf_map);
        assert_eq!(name_of(&symbolizer), "ff_compiled_late");
    }

    #[test]
    fn a_miss_names_the_file_and_offset() {
        let region = Region {
            start: 0x1000,
            end: 0x5000,
            offset: 0x2000,
            path: "/opt/app/libfoo.so".to_string(),
            build_id: None,
        };
        assert_eq!(
            unknown_line(0x1a2b, Some(&region)).function,
            "[unknown] libfoo.so+0x2a2b"
        );
        assert_eq!(unknown_line(0xdead, None).function, "[unknown] 0xdead");
    }

    fn user_frame(name: &str) -> Frame {
        Frame {
            kind: FrameKind::User,
            address: 1,
            mapping: None,
            lines: vec![Line {
                function: name.into(),
                file: None,
                line: None,
            }],
        }
    }

    #[test]
    fn a_stack_ending_in_a_thread_root_is_whole() {
        let frames = [user_frame("main"), user_frame("__libc_start_call_main")];
        assert!(!user_stack_truncated(&[1, 2], &frames));
        let frames = [user_frame("worker"), user_frame("clone3")];
        assert!(!user_stack_truncated(&[1, 2], &frames));
    }

    #[test]
    fn a_stack_that_stops_elsewhere_is_truncated() {
        let frames = [user_frame("__GI___nanosleep"), user_frame("worker")];
        assert!(user_stack_truncated(&[1, 2], &frames));
        // Kernel threads have no user stack to truncate.
        assert!(!user_stack_truncated(&[], &[]));
    }

    #[test]
    fn a_frame_pointer_walk_is_cut_before_a_value_no_mapping_can_hold() {
        let ips = [0x7f00_0000_1000, 0x55_0000_2000, 0, 0x55_0000_3000];
        assert_eq!(walked_part(&ips, None), &ips[..2]);
        assert_eq!(walked_part(&ips[..2], None), &ips[..2]);
        assert_eq!(walked_part(&[0x1234, 0x55_0000_2000], None), &[] as &[u64]);
    }

    #[test]
    fn a_frame_pointer_walk_is_cut_before_an_address_outside_the_process_s_code() {
        let map = ProcessMap::parse(
            "55000000-55010000 r-xp 00000000 08:01 42 /usr/bin/app\n\
             55010000-55020000 rw-p 00010000 08:01 42 /usr/bin/app\n\
             56000000-56100000 rw-p 00000000 00:00 0 [heap]\n\
             7f0000000000-7f0000100000 rwxp 00000000 00:00 0\n",
        );
        let mut process = ProcessSymbols::default();
        process.learn_code(&map);
        // Code of the binary, then JIT code, then a heap address (a mutex,
        // say, that rbp held), then code again.
        let ips = [0x5500_1000, 0x7f00_0000_2000, 0x5600_0040, 0x5500_2000];
        assert_eq!(walked_part(&ips, Some(&process)), &ips[..2]);
        // Data of the binary is not code either.
        assert_eq!(
            walked_part(&[0x5500_1000, 0x5501_0008], Some(&process)),
            &[0x5500_1000]
        );
        // A process whose maps were never read keeps the rule above only.
        assert_eq!(
            walked_part(&ips, Some(&ProcessSymbols::default())),
            &ips[..]
        );
    }

    // Code of our own file whose bytes are known: a call and where it
    // returns to, a run of `nop`s that no call precedes, and the signal
    // trampoline's `mov $0xf, %rax; syscall`. Never run.
    #[cfg(target_arch = "x86_64")]
    std::arch::global_asm!(
        ".pushsection .text.ff_return_sites, \"ax\", @progbits",
        ".globl ff_test_after_call, ff_test_after_nops, ff_test_trampoline",
        ".hidden ff_test_after_call, ff_test_after_nops, ff_test_trampoline",
        "    call 2f",
        "ff_test_after_call:",
        "    .fill 16, 1, 0x90",
        "ff_test_after_nops:",
        "    nop",
        "ff_test_trampoline:",
        "    .byte 0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05",
        "2:  ret",
        ".popsection",
    );

    #[cfg(target_arch = "x86_64")]
    extern "C" {
        static ff_test_after_call: u8;
        static ff_test_after_nops: u8;
        static ff_test_trampoline: u8;
    }

    /// The user frames' addresses of each sample, and whether it ends in
    /// the truncation marker.
    fn user_stacks(profile: &Profile) -> Vec<(Vec<u64>, bool)> {
        profile
            .samples
            .iter()
            .map(|sample| {
                let user = sample
                    .stack
                    .iter()
                    .filter(|frame| frame.kind == FrameKind::User);
                let marked = sample
                    .stack
                    .last()
                    .is_some_and(|frame| frame.function() == crate::profile::TRUNCATED_FRAME);
                (user.map(|frame| frame.address).collect(), marked)
            })
            .collect()
    }

    /// `rbp` in `-O2` code may hold an address in code, say a function's
    /// that was passed around: the kernel walks through it as if it were a
    /// frame. Only a call right before it (or the signal trampoline at it)
    /// makes it a return address, read from the file for file-backed code
    /// and from memory for JIT code.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn a_frame_pointer_walk_is_cut_before_code_that_no_call_precedes() {
        let after_call = &raw const ff_test_after_call as u64;
        let after_nops = &raw const ff_test_after_nops as u64;
        let trampoline = &raw const ff_test_trampoline as u64;
        let jit = crate::unwind::tests::JitPage::new();
        let jit_after_call = jit.address() + crate::unwind::tests::AFTER_CALL;
        let jit_after_ret = jit.address() + crate::unwind::tests::AFTER_RET;
        let walked = |tid, user_ips: &[u64]| BlockedStack {
            tgid: std::process::id(),
            tid,
            thread_name: "t".into(),
            state: crate::profile::ThreadState::Sleeping,
            kernel_ips: Stack::from([]),
            user_ips: Stack::from(user_ips),
            user_end: UserStackEnd::Walked,
            lock: None,
            blocked_ns: 1,
            count: 1,
            timeline: Vec::new(),
        };
        // The first address is where the thread entered the kernel, not a
        // return address: no call need precede it.
        let file = [
            after_nops, after_call, trampoline, after_call, after_nops, after_call,
        ];
        let jit_stack = [after_call, jit_after_call, jit_after_ret, after_call];
        let window = window_of(vec![walked(1, &file), walked(2, &jit_stack)]);
        let stacks = user_stacks(&Symbolizer::new().profile(&window));
        assert_eq!(
            stacks,
            vec![(file[..4].to_vec(), true), (jit_stack[..2].to_vec(), true)]
        );
    }

    /// A walk whose code could not be judged, its process gone before its
    /// maps were read, keeps the rules that need no maps.
    #[test]
    fn a_frame_pointer_walk_of_a_process_never_read_is_not_refuted() {
        let mut process = ProcessSymbols::default();
        process.returns.insert(0x5500_2000, false);
        let ips = [0x5500_2000, 0x5500_1000, 0x5500_2000];
        assert_eq!(walked_part(&ips, None), &ips[..]);
        // The first address is never a return address: only below it.
        assert_eq!(walked_part(&ips, Some(&process)), &ips[..2]);
    }

    /// One sample per way a user stack can end, of a frame of ours that
    /// is not a thread root.
    #[test]
    fn how_an_unwound_stack_ends_decides_its_marker() {
        let here = how_an_unwound_stack_ends_decides_its_marker as *const () as u64 + 1;
        let stack = |tid, user_ips: &[u64], user_end| BlockedStack {
            tgid: std::process::id(),
            tid,
            thread_name: "t".into(),
            state: crate::profile::ThreadState::Sleeping,
            kernel_ips: Stack::from([]),
            user_ips: Stack::from(user_ips),
            user_end,
            lock: None,
            blocked_ns: 1,
            count: 1,
            timeline: Vec::new(),
        };
        let window = window_of(vec![
            stack(1, &[here], UserStackEnd::Walked),
            stack(2, &[here], UserStackEnd::Complete),
            stack(3, &[here], UserStackEnd::Truncated),
            stack(4, &[], UserStackEnd::NotRead),
        ]);
        let profile = Symbolizer::new().profile(&window);
        let markers: Vec<Vec<&str>> = profile
            .samples
            .iter()
            .map(|sample| {
                sample
                    .stack
                    .iter()
                    .filter(|frame| frame.kind == FrameKind::Truncated)
                    .map(Frame::function)
                    .collect()
            })
            .collect();
        use crate::profile::{NOT_READ_FRAME, TRUNCATED_FRAME};
        assert_eq!(
            markers,
            vec![
                // Not a thread root: a frame-pointer walk that stopped here.
                vec![TRUNCATED_FRAME],
                // The unwinder reached the root, whatever its name.
                vec![],
                vec![TRUNCATED_FRAME],
                vec![NOT_READ_FRAME],
            ]
        );
    }

    fn window_of(stacks: Vec<BlockedStack>) -> Window {
        Window {
            start: std::time::SystemTime::UNIX_EPOCH,
            duration: std::time::Duration::from_secs(1),
            stacks,
            lock_holds: Vec::new(),
            address_changes: Vec::new(),
            drops: Default::default(),
            features: crate::capture::Features {
                hook: crate::capture::Hook::TpBtf,
                lock_contention: false,
                mmap_lock_holds: false,
                address_changes: false,
                stacks_on_return: false,
            },
            revisions: Vec::new(),
        }
    }

    /// A rwsem wait as a stack taken while the waiter is current has it,
    /// and as the kernel gives a sleeping task's: one stack once named.
    #[test]
    fn a_wait_taken_while_current_loses_the_frames_the_kernel_leaves_out_of_sleepers() {
        let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap();
        let call_in = |function: &str| {
            let line = kallsyms
                .lines()
                .find(|line| line.split_ascii_whitespace().nth(2) == Some(function))
                .unwrap_or_else(|| panic!("{function} is not in kallsyms"));
            let start = u64::from_str_radix(line.split_ascii_whitespace().next().unwrap(), 16);
            // A return address inside the function.
            start.unwrap() + 8
        };
        assert!(
            call_in("schedule") > 8,
            "kallsyms hides its addresses: run as root"
        );
        let stack = |tid, kernel: &[&str]| BlockedStack {
            tgid: 1,
            tid,
            thread_name: "t".into(),
            state: crate::profile::ThreadState::Disk,
            kernel_ips: kernel.iter().map(|function| call_in(function)).collect(),
            user_ips: Stack::from([]),
            user_end: UserStackEnd::Walked,
            lock: None,
            blocked_ns: 1,
            count: 1,
            timeline: Vec::new(),
        };
        let below = ["vm_mmap_pgoff", "ksys_mmap_pgoff", "do_syscall_64"];
        let mut current = vec!["__schedule", "schedule", "rwsem_down_write_slowpath"];
        current.extend(below);
        let profile = Symbolizer::new().profile(&window_of(vec![
            stack(1, &current),
            stack(2, &below),
            // Spinlocks' text is left out as well.
            stack(
                3,
                &[
                    "_raw_spin_lock_irqsave",
                    "vm_mmap_pgoff",
                    "ksys_mmap_pgoff",
                    "do_syscall_64",
                ],
            ),
        ]));
        for sample in &profile.samples {
            let functions: Vec<&str> = sample.stack.iter().map(Frame::function).collect();
            assert_eq!(functions, below, "thread {}", sample.labels.thread_id);
        }
    }

    fn hold(tid: u32, lock_addr: u64, ms: u64) -> LockHold {
        LockHold {
            tgid: 1,
            tid,
            thread_name: format!("t{tid}"),
            lock_addr,
            start: std::time::SystemTime::UNIX_EPOCH,
            duration: std::time::Duration::from_millis(ms),
            mode: LockMode::Read,
            downgraded: false,
            user_ips: Stack::from([]),
            kernel_ips: Stack::from([]),
        }
    }

    fn wait(addr: u64, holder_tid: Option<u32>, held_by_readers: bool) -> LockWait {
        LockWait {
            addr,
            kind: crate::capture::LockKind::RwSemaphore,
            mode: Some(LockMode::Write),
            is_mmap_lock: true,
            holder_tid,
            held_by_readers,
        }
    }

    #[test]
    fn a_named_owner_is_matched_to_its_longest_hold_of_that_lock() {
        let holds = [
            hold(7, 0x10, 5),
            hold(7, 0x10, 900),
            hold(8, 0x10, 2000),
            hold(7, 0x20, 5000),
        ];
        let found = holder_of(wait(0x10, Some(7), false), &holds).unwrap();
        assert_eq!((found.tid, found.duration.as_millis()), (7, 900));
    }

    #[test]
    fn a_lock_held_by_readers_is_put_down_to_its_longest_hold() {
        // The kernel names only the last reader in; the long hold is someone else's.
        let holds = [hold(7, 0x10, 3), hold(8, 0x10, 1200), hold(9, 0x20, 5000)];
        let found = holder_of(wait(0x10, Some(7), true), &holds).unwrap();
        assert_eq!(found.tid, 8);
        let unnamed = holder_of(wait(0x10, None, false), &holds).unwrap();
        assert_eq!(unnamed.tid, 8);
    }

    #[test]
    fn no_hold_of_the_lock_means_no_match() {
        let holds = [hold(7, 0x20, 3)];
        assert!(holder_of(wait(0x10, Some(7), false), &holds).is_none());
        assert!(holder_of(wait(0x10, None, true), &[]).is_none());
    }
}
