//! What /proc says about target threads: their names, and the user stacks of
//! threads blocked while a cut looks (unwound from their saved registers).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::sync::mpsc;
use std::time::Duration;

use super::bpf::MAX_STACK_DEPTH;
use super::copies::StackCopy;
use super::ledger::BlockId;
use super::SavedRegs;
use crate::process_map::AddressSpace;
use crate::telemetry;
use crate::unwind::{Memory, ProcessMemory, Unwinder, Unwound};

/// Thread names by tid, kept for the threads of this window and the last
/// one only: an armed tracer runs for days while threads come and go.
#[derive(Debug, Default)]
pub(super) struct Threads {
    names: HashMap<u32, String>,
    previous_names: HashMap<u32, String>,
}

pub(super) fn process_exists(pid: u32) -> bool {
    pid != 0 && fs::metadata(format!("/proc/{pid}")).is_ok()
}

impl Threads {
    /// The thread's name, from /proc while it lives; `[exited]` after.
    pub fn name(&mut self, tgid: u32, tid: u32) -> String {
        if let Some(name) = self.names.get(&tid) {
            return name.clone();
        }
        let name = self.previous_names.remove(&tid).unwrap_or_else(|| {
            fs::read_to_string(format!("/proc/{tgid}/task/{tid}/comm"))
                .map(|comm| comm.trim_end().to_string())
                .unwrap_or_else(|_| "[exited]".to_string())
        });
        self.names.insert(tid, name.clone());
        name
    }

    /// Forgets the names of threads not seen in the window just ended.
    pub fn end_window(&mut self) {
        self.previous_names = std::mem::take(&mut self.names);
    }
}

/// Unwinds a blocked thread's user stack from the registers it entered
/// the kernel with, reading the target's memory: the thread sleeps, so its
/// stack holds the frames it blocked in.
pub(super) fn unwind_user_stack(unwinder: &mut Unwinder, tgid: u32, saved: SavedRegs) -> Unwound {
    match ProcessMemory::open(tgid) {
        Ok(memory) => unwinder.unwind(tgid, saved.regs, saved.entry, &memory, MAX_STACK_DEPTH),
        // Gone: only the registers remain.
        Err(_) => unwinder.unwind(tgid, saved.regs, saved.entry, &Unreadable, MAX_STACK_DEPTH),
    }
}

/// The memory of a process that could not be opened.
struct Unreadable;

impl Memory for Unreadable {
    fn read(&self, _address: u64, _buffer: &mut [u8]) -> bool {
        false
    }
}

/// Unwinds the user stacks of blocked threads on a thread of its own.
/// Reading a target's memory (and its module map) takes its `mmap_lock`,
/// and a process frozen behind an `mmap_lock` writer (the freeze
/// freezeframe exists for) holds up whoever reads it until the freeze
/// ends: the tracer must not wait with it. Walks are asked for early
/// ([`StackWalker::request`]) and waited for within a deadline; once one
/// has missed it, nothing more is waited for until the walker answers
/// again.
///
/// The user stacks the probe copied are unwound here too: the copies are
/// the memory, but the unwinder reads the process's module map, which
/// takes the same lock.
pub(super) struct StackWalker {
    requests: mpsc::Sender<Job>,
    answers: mpsc::Receiver<(BlockId, Unwound)>,
    /// Asked for, not answered yet.
    pending: HashSet<BlockId>,
    answered: HashMap<BlockId, Unwound>,
    /// A wait missed its deadline and no answer has come since.
    stuck: bool,
    /// A batch of copies still being unwound past its deadline.
    stuck_copies: Option<mpsc::Receiver<Vec<(u64, Unwound)>>>,
}

enum Job {
    /// A cut begins, with the targets' address spaces as it found them:
    /// process maps read before are kept only while they are whole (see
    /// [`Unwinder::begin_cut`]).
    BeginCut(HashMap<u32, AddressSpace>),
    Walk(Walk),
    Copies {
        copies: Vec<StackCopy>,
        reply: mpsc::Sender<Vec<(u64, Unwound)>>,
    },
}

struct Walk {
    id: BlockId,
    tgid: u32,
    saved: SavedRegs,
}

/// A walk's answer, kept only if its thread is still in the block it was
/// asked for: `start_now` is the start of the block the thread is in once
/// the answer is in hand (`None`: on the CPU, gone, or between blocks). A
/// thread that woke while its stack was read has written over it since;
/// what was read may mix the frames it blocked in with those it runs in
/// now, each confirmed on its own and wrong together.
pub(super) fn if_still_in(
    block: BlockId,
    start_now: Option<u64>,
    unwound: Unwound,
) -> Option<Unwound> {
    (start_now == Some(block.1)).then_some(unwound)
}

/// How long the tracer waits for a walk before it goes on without it.
/// Loading a module's tables the first time takes a few ms.
const WALK_DEADLINE: Duration = Duration::from_millis(20);
/// Walks asked for and not answered, at most: past that, more are declined.
const MAX_PENDING: usize = 4096;
/// How long one cut's copies may take to unwind: about 5 us each, plus a
/// few ms for each module whose tables are loaded for the first time.
const COPIES_DEADLINE: Duration = Duration::from_millis(50);

impl StackWalker {
    pub fn start() -> std::io::Result<Self> {
        let (requests, inbox) = mpsc::channel::<Job>();
        let (reply, answers) = mpsc::channel();
        std::thread::Builder::new()
            .name("ff-stackwalk".into())
            .spawn(move || {
                // One unwinder for every capture: its tables outlive them.
                let mut unwinder = Unwinder::default();
                for job in inbox {
                    let answered = match job {
                        Job::BeginCut(spaces) => {
                            unwinder.begin_cut(spaces);
                            true
                        }
                        Job::Walk(walk) => {
                            let unwound = unwind_user_stack(&mut unwinder, walk.tgid, walk.saved);
                            reply.send((walk.id, unwound)).is_ok()
                        }
                        Job::Copies { copies, reply } => {
                            let unwound = copies
                                .iter()
                                .map(|copy| (copy.id, copy.unwind(&mut unwinder, MAX_STACK_DEPTH)))
                                .collect();
                            // A batch given up on is still answered, late.
                            let _ = reply.send(unwound);
                            true
                        }
                    };
                    metrics::gauge!(telemetry::UNWIND_TABLE_BYTES)
                        .set(unwinder.table_bytes() as f64);
                    if !answered {
                        break;
                    }
                }
            })?;
        Ok(StackWalker {
            requests,
            answers,
            pending: HashSet::new(),
            answered: HashMap::new(),
            stuck: false,
            stuck_copies: None,
        })
    }

    /// Starts a cut at which the targets have the address spaces `spaces`
    /// (by pid): the walks and copies asked for from now on see their
    /// module maps as they are now.
    pub fn begin_cut(&mut self, spaces: HashMap<u32, AddressSpace>) {
        // Only fails once the walker is gone; a walk asked for then says so.
        let _ = self.requests.send(Job::BeginCut(spaces));
    }

    /// Asks for a block's user stack without waiting for it.
    pub fn request(&mut self, id: BlockId, tgid: u32, saved: SavedRegs) {
        if self.pending.contains(&id)
            || self.answered.contains_key(&id)
            || self.pending.len() >= MAX_PENDING
        {
            return;
        }
        if self
            .requests
            .send(Job::Walk(Walk { id, tgid, saved }))
            .is_ok()
        {
            self.pending.insert(id);
        }
    }

    /// The block's user stack, asked for now if it was not before; `None`
    /// if it could not be read in time (the caller tries again at its next
    /// cut). The caller must confirm the block is still the same.
    pub fn walk(&mut self, id: BlockId, tgid: u32, saved: SavedRegs) -> Option<Unwound> {
        self.request(id, tgid, saved);
        self.take_answers();
        if let Some(unwound) = self.answered.remove(&id) {
            return Some(unwound);
        }
        if self.stuck || !self.pending.contains(&id) {
            return None;
        }
        let deadline = std::time::Instant::now() + WALK_DEADLINE;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.answers.recv_timeout(left) {
                Ok((answered, unwound)) => {
                    self.pending.remove(&answered);
                    if answered == id {
                        return Some(unwound);
                    }
                    self.answered.insert(answered, unwound);
                }
                Err(_) => break,
            }
        }
        tracing::debug!(
            pid = tgid,
            "a blocked thread's user stack could not be read in time (its process's mmap_lock \
             is taken?); trying again at the next cut"
        );
        self.stuck = true;
        None
    }

    /// The user stacks of one cut's copies, by copy id, with those of an
    /// earlier batch that missed its deadline and is done now. While such
    /// a batch is still being unwound, the new copies are let go: their
    /// blocks go without a user stack rather than pile up behind it.
    pub fn unwind_copies(&mut self, copies: Vec<StackCopy>) -> Vec<(u64, Unwound)> {
        let mut unwound = Vec::new();
        if let Some(stuck) = &self.stuck_copies {
            match stuck.try_recv() {
                Err(mpsc::TryRecvError::Empty) => {
                    if !copies.is_empty() {
                        tracing::debug!(
                            copies = copies.len(),
                            "user stack copies let go: the unwinder is still busy with \
                             earlier ones (a process's mmap_lock is taken)"
                        );
                    }
                    return unwound;
                }
                Ok(late) => unwound = late,
                Err(mpsc::TryRecvError::Disconnected) => {}
            }
            self.stuck_copies = None;
        }
        if copies.is_empty() {
            return unwound;
        }
        let (reply, answer) = mpsc::channel();
        if self.requests.send(Job::Copies { copies, reply }).is_err() {
            return unwound;
        }
        match answer.recv_timeout(COPIES_DEADLINE) {
            Ok(stacks) => unwound.extend(stacks),
            Err(_) => {
                tracing::debug!(
                    "user stack copies could not be unwound in time (a process's mmap_lock \
                     is taken); taking what is done at the next cut"
                );
                self.stuck_copies = Some(answer);
            }
        }
        unwound
    }

    /// Forgets answers and requests for blocks that are no longer in progress.
    pub fn retain(&mut self, in_progress: &HashSet<BlockId>) {
        self.take_answers();
        self.answered.retain(|id, _| in_progress.contains(id));
    }

    fn take_answers(&mut self) {
        while let Ok((id, unwound)) = self.answers.try_recv() {
            self.pending.remove(&id);
            self.answered.insert(id, unwound);
            self.stuck = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unwind::{Entry, StackEnd, UserRegs};

    #[test]
    fn names_are_kept_for_two_windows_then_forgotten() {
        let me = std::process::id();
        let mut threads = Threads::default();
        let name = threads.name(me, me);
        assert_ne!(name, "[exited]");
        // A name read while the thread lived survives into the next window...
        threads.end_window();
        assert_eq!(threads.name(me, me), name);
        threads.end_window();
        threads.end_window();
        // ...but not beyond a window in which the thread did not appear.
        assert!(threads.names.is_empty() && threads.previous_names.is_empty());
        assert_eq!(threads.name(0, 0), "[exited]");
    }

    #[test]
    fn an_unreadable_process_gives_just_the_pc() {
        let saved = SavedRegs {
            regs: UserRegs {
                ip: 0x42,
                sp: 0x1000,
                fp: 0x1000,
            },
            entry: Entry::SystemCall,
        };
        let unwound = unwind_user_stack(&mut Unwinder::default(), 0, saved);
        assert_eq!(
            (unwound.ips, unwound.end),
            (vec![0x42], StackEnd::Truncated)
        );
    }

    /// The thread's count of voluntary context switches: one more each
    /// time it blocks, so it names the block it is in.
    fn blocks_so_far(tid: u32) -> u64 {
        let status = fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|count| count.trim().parse().ok())
            .unwrap()
    }

    /// A walk of one of our own threads, asked for again as the tracer would
    /// at its next cut while it is not served: loading this test binary's
    /// tables may itself take longer than a walk's deadline. For 5 s at most.
    fn walk_until_served(
        walker: &mut StackWalker,
        id: BlockId,
        saved: SavedRegs,
    ) -> Option<Unwound> {
        for _ in 0..100 {
            if let Some(unwound) = walker.walk(id, std::process::id(), saved) {
                return Some(unwound);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Waits until `tid` sleeps, and gives its count of blocks then.
    fn asleep(tid: u32) -> u64 {
        loop {
            let before = blocks_so_far(tid);
            if state_of(std::process::id(), tid) == Some('S') && blocks_so_far(tid) == before {
                return before;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn a_walk_is_kept_only_while_its_thread_is_in_the_block_it_was_asked_for() {
        use std::io::{Read, Write};
        let (mut reader, mut writer) = std::io::pipe().unwrap();
        let (tids, tid) = mpsc::channel();
        let sleeper = std::thread::spawn(move || {
            // Where the walk starts: this frame and those above it hold
            // still while the thread sleeps below it.
            let saved = SavedRegs {
                regs: crate::unwind::registers_here!(),
                entry: Entry::Fault,
            };
            tids.send((unsafe { libc::gettid() } as u32, saved))
                .unwrap();
            let mut byte = [0u8];
            // Two blocks in the same read: the first ends when the test
            // writes, the second when it closes the pipe.
            reader.read_exact(&mut byte).unwrap();
            let _ = reader.read(&mut byte);
        });
        let (tid, saved) = tid.recv().unwrap();
        let first = asleep(tid);
        let block = (tid, first);
        let mut walker = StackWalker::start().unwrap();
        let unwound = walk_until_served(&mut walker, block, saved)
            .expect("the sleeping thread's stack was never read");
        assert_eq!(unwound.end, StackEnd::Complete, "{:x?}", unwound.ips);

        // Still in that block: the answer stands.
        let now = Some(blocks_so_far(tid));
        assert_eq!(
            if_still_in(block, now, unwound.clone()),
            Some(unwound.clone())
        );
        // Woken, and blocked again in the very same place: the answer was
        // read for a block that is over, and it goes.
        writer.write_all(b"x").unwrap();
        let second = loop {
            let now = asleep(tid);
            if now != first {
                break now;
            }
        };
        assert_eq!(if_still_in(block, Some(second), unwound.clone()), None);
        assert_eq!(if_still_in(block, None, unwound), None, "on the CPU");
        drop(writer);
        sleeper.join().unwrap();
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn a_walk_within_its_deadline_gives_the_whole_stack() {
        let regs = crate::unwind::registers_here!();
        let mut walker = StackWalker::start().unwrap();
        // This thread waits in walk() while its stack is read: it holds still.
        let saved = SavedRegs {
            regs,
            entry: Entry::Fault,
        };
        let unwound = walker.walk((1, 1), std::process::id(), saved).unwrap();
        assert_eq!(unwound.ips[0], regs.ip + 1);
        assert_eq!(unwound.end, StackEnd::Complete, "{:x?}", unwound.ips);
        let here = a_walk_within_its_deadline_gives_the_whole_stack as *const () as u64;
        assert!(unwound
            .ips
            .iter()
            .any(|&ret| ret > here && ret < here + 4096));
    }

    /// A process that freezes its own address space over and over, as the
    /// seed incident did: its main thread populates 1 GiB under
    /// `mmap_lock`, while another thread waits to map (for write), so every
    /// reader of its memory waits behind that writer.
    const FREEZER: &str = r#"
import ctypes, mmap, threading
# Dies with the test that started it, however that ends.
ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
def writer(tids):
    tids.append(threading.get_native_id())
    while True:
        mmap.mmap(-1, 1 << 16).close()
tids = []
threading.Thread(target=writer, args=(tids,), daemon=True).start()
while not tids:
    pass
print(tids[0], flush=True)
while True:
    mmap.mmap(-1, 1 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE).close()
"#;

    /// A child process that is killed, and reaped, when the test ends.
    struct KillOnDrop(std::process::Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn state_of(pid: u32, tid: u32) -> Option<char> {
        let stat = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
        stat.rsplit(") ").next()?.chars().next()
    }

    /// The registers a blocked thread entered its system call with, from
    /// `/proc/PID/task/TID/syscall` (which takes no `mmap_lock`).
    fn syscall_regs(pid: u32, tid: u32) -> Option<SavedRegs> {
        let line = fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
        let fields: Vec<u64> = line
            .split_ascii_whitespace()
            .skip(7)
            .map(|field| u64::from_str_radix(field.trim_start_matches("0x"), 16).ok())
            .collect::<Option<_>>()?;
        let [sp, ip] = fields[..] else { return None };
        Some(SavedRegs {
            regs: UserRegs { ip, sp, fp: 0 },
            entry: Entry::SystemCall,
        })
    }

    #[test]
    fn a_walk_of_a_process_frozen_behind_an_mmap_lock_writer_is_given_up_on_and_retried() {
        use std::io::BufRead;
        let freezer = std::process::Command::new("python3")
            .args(["-c", FREEZER])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs the freezer");
        let pid = freezer.id();
        let mut freezer = KillOnDrop(freezer);
        let mut line = String::new();
        std::io::BufReader::new(freezer.0.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let writer: u32 = line.trim().parse().unwrap();
        let mut walker = StackWalker::start().unwrap();

        // The writer sleeps (D) while it waits behind a populate; a walk
        // asked for then reads memory that is locked for up to a second,
        // and the tracer must not wait for it.
        let mut given_up = None;
        for block in 0..200 {
            let saved = loop {
                if state_of(pid, writer) == Some('D') {
                    if let Some(saved) = syscall_regs(pid, writer) {
                        break saved;
                    }
                }
                std::thread::yield_now();
            };
            // Some reads fall between two freezes and are served.
            if walker.walk((writer, block), pid, saved).is_none() {
                given_up = Some(block);
                break;
            }
        }
        let block = given_up.expect("no walk was ever held up by the frozen process");
        drop(freezer);

        // The freeze over, the walker comes back: the late answer is taken
        // for the block it was asked for, and walks are served again.
        let mut back = false;
        for _ in 0..100 {
            walker.take_answers();
            if !walker.stuck && !walker.pending.contains(&(writer, block)) {
                back = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(back, "the walker never came back from the frozen process");
        let own = SavedRegs {
            regs: crate::unwind::registers_here!(),
            entry: Entry::Fault,
        };
        let unwound = walk_until_served(&mut walker, (1, 2), own)
            .expect("the walker never served a walk after the freeze");
        assert_eq!(unwound.end, StackEnd::Complete, "{:x?}", unwound.ips);
    }
}
