//! The flight recorder: keeps the probe attached to the targets and the last
//! `history` of off-CPU time in memory, so that a capture asked for *after*
//! a freeze began still covers its onset.
//!
//! libbpf objects are not `Send`, so the probe lives on a thread of its own;
//! the rest of the sidecar talks to it through a channel. Every `tick` the
//! thread cuts a window out of the tracer; a capture is the merge of the
//! windows that overlap what was asked for.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use super::{
    BlockedStack, CaptureConfig, CaptureError, DropCounts, Loaded, LockWait, ProbeStorage, Stack,
    Tracer, UserStackEnd, Window,
};
use crate::profile::{ThreadState, TimeSlice};

/// When the probe is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RecorderMode {
    /// Always attached; captures include up to `history` before they were asked for.
    Armed,
    /// Attached only while a capture runs: no overhead between freezes, no pre-roll.
    OnTrigger,
}

#[derive(Debug, Clone)]
pub struct RecorderConfig {
    pub mode: RecorderMode,
    pub history: Duration,
    /// How often a window is cut: the time resolution of a capture's start.
    pub tick: Duration,
    pub capture: CaptureConfig,
    /// Shown every window as it is cut, while the threads in it still live.
    pub observer: Option<WindowObserver>,
}

/// Something that wants each window as it is cut: the symbolizer looks its
/// frames up while their processes live, so that a process that exits
/// before a capture is answered still has named frames.
#[derive(Clone)]
pub struct WindowObserver(pub std::sync::Arc<dyn Fn(&Window) + Send + Sync>);

impl std::fmt::Debug for WindowObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WindowObserver")
    }
}

/// A capture asked of the recorder: the off-CPU time of `target` in
/// `[from, until)`, delivered once `until` has passed.
#[derive(Debug, Clone)]
pub struct CaptureRequest {
    pub target: u32,
    pub from: SystemTime,
    pub until: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("the flight recorder could not read the probe: {0}")]
    Collect(String),
    #[error("the flight recorder has stopped")]
    Stopped,
    #[error(
        "nothing was recorded for the capture window (the recorder stopped before its first tick)"
    )]
    NothingRecorded,
    #[error("cannot start the flight recorder thread: {0}")]
    Thread(std::io::Error),
}

enum Command {
    /// Answer every pending capture now, with what has been recorded.
    Flush,
    AddTarget(u32, Sender<Result<(), CaptureError>>),
    RemoveTarget(u32),
    Capture(CaptureRequest, Sender<Result<Window, RecorderError>>),
}

/// Handle to the recorder thread. Dropping it ends pending captures early
/// (with what was recorded so far) and detaches the probe.
pub struct Recorder {
    commands: Option<Sender<Command>>,
    thread: Option<JoinHandle<()>>,
}

impl Recorder {
    /// Starts the recorder thread. In armed mode this loads and attaches the
    /// probe before returning, so a BPF failure is reported here.
    pub fn start(config: RecorderConfig) -> Result<Self, RecorderError> {
        let (commands, inbox) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("ff-recorder".into())
            .spawn(move || run(config, inbox, ready_tx))
            .map_err(RecorderError::Thread)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Recorder {
                commands: Some(commands),
                thread: Some(thread),
            }),
            Ok(Err(err)) => {
                let _ = thread.join();
                Err(err.into())
            }
            Err(_) => Err(RecorderError::Stopped),
        }
    }

    /// Starts watching a process (armed mode attaches to it at once).
    pub fn add_target(&self, pid: u32) -> Result<(), RecorderError> {
        let (reply, answer) = mpsc::channel();
        self.send(Command::AddTarget(pid, reply))?;
        answer
            .recv()
            .map_err(|_| RecorderError::Stopped)?
            .map_err(Into::into)
    }

    pub fn remove_target(&self, pid: u32) -> Result<(), RecorderError> {
        self.send(Command::RemoveTarget(pid))
    }

    /// Asks for a capture; the answer arrives on the returned channel once
    /// `request.until` has passed (or the recorder is shut down).
    pub fn capture(
        &self,
        request: CaptureRequest,
    ) -> Result<Receiver<Result<Window, RecorderError>>, RecorderError> {
        let (reply, answer) = mpsc::channel();
        self.send(Command::Capture(request, reply))?;
        Ok(answer)
    }

    /// Cuts every pending capture short: each is answered at once with what
    /// was recorded so far. For shutdown, so that no capture is lost.
    pub fn flush(&self) -> Result<(), RecorderError> {
        self.send(Command::Flush)
    }

    fn send(&self, command: Command) -> Result<(), RecorderError> {
        self.commands
            .as_ref()
            .ok_or(RecorderError::Stopped)?
            .send(command)
            .map_err(|_| RecorderError::Stopped)
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // Closing the channel tells the thread to finish up.
        self.commands.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Pending {
    request: CaptureRequest,
    reply: Sender<Result<Window, RecorderError>>,
}

/// Recorded windows, oldest first, bounded by `history`.
#[derive(Default)]
struct History {
    windows: VecDeque<Window>,
}

impl History {
    fn push(&mut self, window: Window, keep_from: SystemTime) {
        self.windows.push_back(window);
        while self
            .windows
            .front()
            .is_some_and(|oldest| oldest.start + oldest.duration < keep_from)
        {
            self.windows.pop_front();
        }
    }

    /// The merged off-CPU time of `target` in the windows overlapping
    /// `[from, until)`. Windows are whole, so the result starts at or before
    /// `from` (by up to a tick) when the history reaches back that far.
    fn cut(&self, target: u32, from: SystemTime, until: SystemTime) -> Option<Window> {
        let overlapping: Vec<&Window> = self
            .windows
            .iter()
            .filter(|window| window.start < until && window.start + window.duration > from)
            .collect();
        (!overlapping.is_empty()).then(|| merge(&overlapping, target))
    }
}

/// What makes two stacks of a thread the same: its tid, state, kernel and
/// user frames, how the user stack ended, and the lock it waited for.
type StackIdentity = (
    u32,
    ThreadState,
    Stack,
    Stack,
    UserStackEnd,
    Option<LockWait>,
);

/// Sums consecutive windows into one, keeping only `target`'s threads.
/// `windows` must not be empty.
pub fn merge(windows: &[&Window], target: u32) -> Window {
    let mut totals: HashMap<StackIdentity, BlockedStack> = HashMap::new();
    for window in windows {
        for stack in window.stacks.iter().filter(|stack| stack.tgid == target) {
            let identity = (
                stack.tid,
                stack.state,
                stack.kernel_ips.clone(),
                stack.user_ips.clone(),
                stack.user_end,
                stack.lock,
            );
            // Windows come oldest first, so each timeline stays in order.
            let slice = TimeSlice {
                start: window.start,
                duration: window.duration,
                value: stack.blocked_ns,
                count: stack.count,
            };
            totals
                .entry(identity)
                .and_modify(|total| {
                    total.blocked_ns += stack.blocked_ns;
                    total.count += stack.count;
                    total.timeline.push(slice);
                })
                .or_insert_with(|| BlockedStack {
                    timeline: vec![slice],
                    ..stack.clone()
                });
        }
    }
    let stacks = join_futex_waits(totals.into_values().collect());
    let mut drops = DropCounts::default();
    for window in windows {
        drops.add(&window.drops);
    }
    let lock_holds = windows
        .iter()
        .flat_map(|window| &window.lock_holds)
        .filter(|hold| hold.tgid == target)
        .cloned()
        .collect();
    let address_changes = windows
        .iter()
        .flat_map(|window| &window.address_changes)
        .filter(|change| change.tgid == target)
        .cloned()
        .collect();
    let first = windows.first().expect("merge is given at least one window");
    let last = windows.last().expect("merge is given at least one window");
    let end = last.start + last.duration;
    Window {
        start: first.start,
        duration: end.duration_since(first.start).unwrap_or_default(),
        stacks,
        lock_holds,
        address_changes,
        drops,
        features: last.features,
        revisions: Vec::new(),
    }
}

/// A futex wait cut by the recorder's ticks is seen without its waker
/// while in progress, and with it once it ends. Where one thread waited
/// on one word, in one place, and was woken by one thread only, the parts
/// before the waker was known are that same wait: they join it. Where
/// several threads woke it, which part was whose is unknown, and the
/// parts stay apart.
fn join_futex_waits(stacks: Vec<BlockedStack>) -> Vec<BlockedStack> {
    let place = |stack: &BlockedStack| -> StackIdentity {
        (
            stack.tid,
            stack.state,
            stack.kernel_ips.clone(),
            stack.user_ips.clone(),
            stack.user_end,
            stack.lock.map(LockWait::without_waker),
        )
    };
    // A futex wait's waker, `Some(None)` while unknown; `None` for other waits.
    let futex_waker = |stack: &BlockedStack| {
        stack
            .lock
            .filter(|lock| lock.kind == crate::capture::LockKind::Futex)
            .map(|lock| lock.holder_tid)
    };
    let mut woken: HashMap<StackIdentity, Vec<usize>> = HashMap::new();
    for (index, stack) in stacks.iter().enumerate() {
        if let Some(Some(_)) = futex_waker(stack) {
            woken.entry(place(stack)).or_default().push(index);
        }
    }
    let mut joined: Vec<Option<BlockedStack>> = stacks.into_iter().map(Some).collect();
    for index in 0..joined.len() {
        let Some(stack) = &joined[index] else {
            continue;
        };
        if futex_waker(stack) != Some(None) {
            continue;
        }
        let Some([into]) = woken.get(&place(stack)).map(Vec::as_slice) else {
            continue;
        };
        let part = joined[index].take().expect("checked above");
        let whole = joined[*into].as_mut().expect("woken waits are never taken");
        whole.blocked_ns += part.blocked_ns;
        whole.count += part.count;
        whole.timeline.extend(part.timeline);
        whole.timeline.sort_by_key(|slice| slice.start);
        // One slice per window: parts of one window add up.
        whole.timeline.dedup_by(|later, earlier| {
            let same = later.start == earlier.start;
            if same {
                earlier.value += later.value;
                earlier.count += later.count;
            }
            same
        });
    }
    joined.into_iter().flatten().collect()
}

fn run(config: RecorderConfig, inbox: Receiver<Command>, ready: Sender<Result<(), CaptureError>>) {
    match config.mode {
        RecorderMode::Armed => {
            let mut storage = ProbeStorage::uninit();
            let tracer = match Tracer::start(&mut storage, &config.capture, &[]) {
                Ok(tracer) => tracer,
                Err(err) => {
                    let _ = ready.send(Err(err));
                    return;
                }
            };
            tracing::info!(
                shared = tracer.is_shared(),
                features = %tracer.features(),
                "off-CPU probe attached"
            );
            let _ = ready.send(Ok(()));
            Session::new(tracer, &config, Vec::new()).run(&inbox, false);
        }
        RecorderMode::OnTrigger => {
            // Every capture attaches a probe loaded in advance: loading (the
            // verifier) is most of the cost, and a loaded probe costs nothing.
            let mut ready = Some(ready);
            loop {
                let mut storage = ProbeStorage::uninit();
                let loaded = match (ready.take(), Loaded::load(&mut storage, &config.capture)) {
                    (Some(ready), Ok(loaded)) => {
                        tracing::info!(
                            shared = loaded.is_shared(),
                            "off-CPU probe loaded, to be attached when a rule fires"
                        );
                        let _ = ready.send(Ok(()));
                        Ok(loaded)
                    }
                    (Some(ready), Err(err)) => {
                        let _ = ready.send(Err(err));
                        return;
                    }
                    // A later failure is the next capture's answer.
                    (None, loaded) => loaded,
                };
                let Some((request, reply)) = next_capture(&inbox) else {
                    return;
                };
                let asked = Instant::now();
                let tracer = match loaded.and_then(|loaded| loaded.attach(&[request.target])) {
                    Ok(tracer) => {
                        tracing::info!(
                            pid = request.target,
                            attach_ms = asked.elapsed().as_secs_f64() * 1e3,
                            "probe attached for an on-trigger capture"
                        );
                        tracer
                    }
                    Err(err) => {
                        let _ = reply.send(Err(err.into()));
                        continue;
                    }
                };
                let mut session = Session::new(tracer, &config, vec![request.target]);
                session.pending.push(Pending { request, reply });
                if session.run(&inbox, true) == SessionEnd::Disconnected {
                    return;
                }
            }
        }
    }
}

/// Waits, detached, for the next capture request. Targets need no watching
/// while nothing is attached; `None` once the recorder's handle is gone.
fn next_capture(
    inbox: &Receiver<Command>,
) -> Option<(CaptureRequest, Sender<Result<Window, RecorderError>>)> {
    loop {
        match inbox.recv().ok()? {
            Command::Capture(request, reply) => return Some((request, reply)),
            Command::AddTarget(_, reply) => {
                let _ = reply.send(Ok(()));
            }
            Command::Flush | Command::RemoveTarget(_) => {}
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum SessionEnd {
    /// Nothing left to capture (on-trigger mode detaches).
    Idle,
    /// The recorder's handle was dropped.
    Disconnected,
}

/// An attached tracer, its recorded history and the captures waiting on it.
struct Session<'obj, 'cfg> {
    tracer: Tracer<'obj>,
    config: &'cfg RecorderConfig,
    targets: Vec<u32>,
    history: History,
    pending: Vec<Pending>,
}

impl<'obj, 'cfg> Session<'obj, 'cfg> {
    fn new(tracer: Tracer<'obj>, config: &'cfg RecorderConfig, targets: Vec<u32>) -> Self {
        Session {
            tracer,
            config,
            targets,
            history: History::default(),
            pending: Vec::new(),
        }
    }

    fn run(&mut self, inbox: &Receiver<Command>, end_when_idle: bool) -> SessionEnd {
        let mut next_tick = Instant::now() + self.config.tick;
        loop {
            let disconnected =
                match inbox.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
                    Ok(command) => {
                        self.handle(command);
                        false
                    }
                    Err(RecvTimeoutError::Timeout) => false,
                    Err(RecvTimeoutError::Disconnected) => true,
                };
            if Instant::now() < next_tick && !disconnected {
                continue;
            }
            next_tick = Instant::now() + self.config.tick;
            self.tick(disconnected);
            if disconnected {
                return SessionEnd::Disconnected;
            }
            if end_when_idle && self.pending.is_empty() {
                return SessionEnd::Idle;
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Flush => self.tick(true),
            Command::AddTarget(pid, reply) => {
                let _ = reply.send(self.watch(pid));
            }
            Command::RemoveTarget(pid) => {
                self.targets.retain(|&target| target != pid);
                let _ = self.tracer.remove_target(pid);
            }
            Command::Capture(request, reply) => match self.watch(request.target) {
                Ok(()) => self.pending.push(Pending { request, reply }),
                Err(err) => {
                    let _ = reply.send(Err(err.into()));
                }
            },
        }
    }

    fn watch(&mut self, pid: u32) -> Result<(), CaptureError> {
        if !self.targets.contains(&pid) {
            self.tracer.add_target(pid)?;
            self.targets.push(pid);
        }
        Ok(())
    }

    /// Cuts a window, and answers the captures that are due (all of them
    /// when the recorder is ending: they get what was recorded so far).
    fn tick(&mut self, ending: bool) {
        match self.tracer.collect() {
            Ok(window) => {
                Window::revise(&window.revisions, self.history.windows.iter_mut());
                if let Some(observer) = &self.config.observer {
                    (observer.0)(&window);
                }
                self.history
                    .push(window, SystemTime::now() - self.config.history)
            }
            Err(err) => {
                let reason = err.to_string();
                for waiting in self.pending.drain(..) {
                    let _ = waiting
                        .reply
                        .send(Err(RecorderError::Collect(reason.clone())));
                }
            }
        }
        let now = SystemTime::now();
        let history = &self.history;
        self.pending.retain(|waiting| {
            if waiting.request.until > now && !ending {
                return true;
            }
            let request = &waiting.request;
            let window = history
                .cut(request.target, request.from, request.until)
                .ok_or(RecorderError::NothingRecorded);
            let _ = waiting.reply.send(window);
            false
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{Features, Hook, Revision};
    use std::sync::Arc;

    fn window(start_s: u64, stacks: Vec<BlockedStack>) -> Window {
        Window {
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(start_s),
            duration: Duration::from_secs(1),
            stacks,
            lock_holds: Vec::new(),
            address_changes: Vec::new(),
            drops: DropCounts::default(),
            features: Features {
                hook: Hook::TpBtf,
                lock_contention: true,
                mmap_lock_holds: true,
                address_changes: true,
                stacks_on_return: true,
            },
            revisions: Vec::new(),
        }
    }

    fn stack(tgid: u32, tid: u32, kernel: &Stack, blocked_ms: u64) -> BlockedStack {
        BlockedStack {
            tgid,
            tid,
            thread_name: format!("t{tid}"),
            state: ThreadState::Sleeping,
            kernel_ips: Arc::clone(kernel),
            user_ips: Stack::from([]),
            user_end: UserStackEnd::Walked,
            lock: None,
            blocked_ns: blocked_ms * 1_000_000,
            count: 1,
            timeline: Vec::new(),
        }
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn a_cut_merges_overlapping_windows_of_the_target_only() {
        let futex: Stack = Arc::from([1u64, 2, 3]);
        let pipe: Stack = Arc::from([4u64, 5]);
        let mut history = History::default();
        for second in 0..5 {
            history.push(
                window(
                    second,
                    vec![
                        stack(10, 11, &futex, 1000),
                        stack(10, 12, &pipe, 300),
                        stack(99, 99, &pipe, 1000),
                    ],
                ),
                at(0),
            );
        }
        let cut = history
            .cut(10, at(1) + Duration::from_millis(500), at(4))
            .unwrap();
        assert_eq!(cut.start, at(1), "starts with the window holding `from`");
        assert_eq!(cut.duration, Duration::from_secs(3));
        let mut totals: Vec<(u32, u64, u64)> = cut
            .stacks
            .iter()
            .map(|s| (s.tid, s.blocked_ns / 1_000_000, s.count))
            .collect();
        totals.sort();
        assert_eq!(totals, vec![(11, 3000, 3), (12, 900, 3)]);
        let futex_thread = cut.stacks.iter().find(|s| s.tid == 11).unwrap();
        let slices: Vec<(SystemTime, u64)> = futex_thread
            .timeline
            .iter()
            .map(|slice| (slice.start, slice.value / 1_000_000))
            .collect();
        assert_eq!(
            slices,
            vec![(at(1), 1000), (at(2), 1000), (at(3), 1000)],
            "the merge remembers when each part of the time was spent"
        );
    }

    #[test]
    fn a_revision_gives_an_unread_stack_of_an_earlier_window_its_frames() {
        let unread = |tid| BlockedStack {
            user_ips: Stack::from([]),
            user_end: UserStackEnd::NotRead,
            ..stack(10, tid, &Stack::from([0xffff_1000]), 100)
        };
        let read = stack(10, 3, &Stack::from([0xffff_1000]), 100);
        let mut earlier = [
            window(1, vec![unread(1)]),
            window(2, vec![read.clone(), unread(2)]),
        ];
        let frames = Stack::from([0x5555_1000, 0x5555_2000]);
        let revision = |windows_back, index| Revision {
            windows_back,
            index,
            user_ips: Stack::clone(&frames),
            user_end: UserStackEnd::Complete,
        };
        Window::revise(
            &[
                revision(1, 1),
                revision(2, 0),
                revision(1, 0),
                revision(1, 7),
            ],
            earlier.iter_mut(),
        );
        for (window, index) in [(0, 0), (1, 1)] {
            let revised = &earlier[window].stacks[index];
            assert_eq!(revised.user_ips, frames);
            assert_eq!(revised.user_end, UserStackEnd::Complete);
            assert_eq!(revised.blocked_ns, 100_000_000, "the time stays as it was");
        }
        // A stack that was read is left as it is; an index past the end is no panic.
        assert_eq!(earlier[1].stacks[0], read);
    }

    #[test]
    fn history_forgets_windows_older_than_it_keeps() {
        let mut history = History::default();
        for second in 0..10 {
            history.push(window(second, Vec::new()), at(second.saturating_sub(3)));
        }
        // Seconds 5..10 remain: the window ending exactly at the horizon is kept.
        assert_eq!(history.windows.len(), 5);
        assert!(history.cut(1, at(0), at(5)).is_none());
    }

    #[test]
    fn futex_waits_seen_before_their_waker_join_the_woken_wait() {
        let kernel: Stack = Arc::from([1u64, 2]);
        let futex = |waker| Some(LockWait::futex(0x1000, waker));
        let with_lock = |mut stack: BlockedStack, lock| {
            stack.lock = lock;
            stack
        };
        // Thread 2 waited 1 s, cut at a tick before it was woken by tid 7.
        let first = window(10, vec![with_lock(stack(1, 2, &kernel, 1000), futex(None))]);
        let second = window(
            11,
            vec![with_lock(stack(1, 2, &kernel, 300), futex(Some(7)))],
        );
        let merged = merge(&[&first, &second], 1);
        assert_eq!(merged.stacks.len(), 1, "{:?}", merged.stacks);
        let wait = &merged.stacks[0];
        assert_eq!(wait.lock.unwrap().holder_tid, Some(7));
        assert_eq!(wait.blocked_ns, 1300 * 1_000_000);
        assert_eq!(wait.timeline.len(), 2);
        assert!(wait.timeline[0].start < wait.timeline[1].start);

        // Woken by two threads: which part was whose is unknown.
        let third = window(
            12,
            vec![with_lock(stack(1, 2, &kernel, 200), futex(Some(8)))],
        );
        let merged = merge(&[&first, &second, &third], 1);
        assert_eq!(merged.stacks.len(), 3);
    }
}
