//! What /proc says about target threads: their names, and the user stacks of
//! threads blocked while a cut looks (unwound from their saved registers).

use std::collections::HashMap;
use std::fs;
use std::sync::mpsc;
use std::time::Duration;

use super::bpf::MAX_STACK_DEPTH;
use super::copies::StackCopy;
use super::SavedRegs;
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

/// Unwinds the user stacks of blocked threads on a thread of its own, each
/// within a deadline. Reading a target's memory (and its module map) takes
/// its `mmap_lock`, and a process frozen behind an `mmap_lock` writer (the
/// freeze freezeframe exists for) holds up whoever reads it until the
/// freeze ends: the tracer must not wait with it. One walk is outstanding
/// at most; while it is stuck, further walks are declined at once.
///
/// The user stacks the probe copied are unwound here too: the copies are
/// the memory, but the unwinder reads the process's module map, which
/// takes the same lock.
pub(super) struct StackWalker {
    requests: mpsc::Sender<Job>,
    stuck: Option<mpsc::Receiver<Unwound>>,
    /// A batch of copies still being unwound past its deadline.
    stuck_copies: Option<mpsc::Receiver<Vec<(u64, Unwound)>>>,
}

enum Job {
    Walk(Walk),
    Copies {
        copies: Vec<StackCopy>,
        reply: mpsc::Sender<Vec<(u64, Unwound)>>,
    },
}

struct Walk {
    tgid: u32,
    saved: SavedRegs,
    reply: mpsc::Sender<Unwound>,
}

/// How long a walk may take before the tracer goes on without it. Loading
/// a module's tables the first time takes a few ms.
const WALK_DEADLINE: Duration = Duration::from_millis(20);

/// How long one cut's copies may take to unwind: about 5 us each, plus a
/// few ms for each module whose tables are loaded for the first time.
const COPIES_DEADLINE: Duration = Duration::from_millis(50);

impl StackWalker {
    pub fn start() -> std::io::Result<Self> {
        let (requests, inbox) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("ff-stackwalk".into())
            .spawn(move || {
                // One unwinder for every capture: its tables outlive them.
                let mut unwinder = Unwinder::default();
                for job in inbox {
                    match job {
                        Job::Walk(walk) => {
                            let unwound = unwind_user_stack(&mut unwinder, walk.tgid, walk.saved);
                            let _ = walk.reply.send(unwound);
                        }
                        Job::Copies { copies, reply } => {
                            let unwound = copies
                                .iter()
                                .map(|copy| (copy.id, copy.unwind(&mut unwinder, MAX_STACK_DEPTH)))
                                .collect();
                            let _ = reply.send(unwound);
                        }
                    }
                    metrics::gauge!(telemetry::UNWIND_TABLE_BYTES)
                        .set(unwinder.table_bytes() as f64);
                }
            })?;
        Ok(StackWalker {
            requests,
            stuck: None,
            stuck_copies: None,
        })
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

    /// The user stack from the saved registers, or `None` if it could not
    /// be read in time (the caller tries again at its next cut).
    pub fn walk(&mut self, tgid: u32, saved: SavedRegs) -> Option<Unwound> {
        if let Some(stuck) = &self.stuck {
            match stuck.try_recv() {
                Err(mpsc::TryRecvError::Empty) => return None,
                // Done at last (its block has been read since), or gone.
                _ => self.stuck = None,
            }
        }
        let (reply, answer) = mpsc::channel();
        self.requests
            .send(Job::Walk(Walk { tgid, saved, reply }))
            .ok()?;
        match answer.recv_timeout(WALK_DEADLINE) {
            Ok(unwound) => Some(unwound),
            Err(_) => {
                tracing::debug!(
                    pid = tgid,
                    "a blocked thread's user stack could not be read in time (its process's \
                     mmap_lock is taken); trying again at the next cut"
                );
                self.stuck = Some(answer);
                None
            }
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

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn a_walk_within_its_deadline_gives_the_whole_stack() {
        let (ip, sp, fp): (u64, u64, u64);
        // SAFETY: copies three registers, touches nothing else.
        unsafe {
            std::arch::asm!(
                "lea {ip}, [rip]",
                "mov {sp}, rsp",
                "mov {fp}, rbp",
                ip = out(reg) ip,
                sp = out(reg) sp,
                fp = out(reg) fp,
            )
        };
        let mut walker = StackWalker::start().unwrap();
        // This thread waits in walk() while its stack is read: it holds still.
        let saved = SavedRegs {
            regs: UserRegs { ip, sp, fp },
            entry: Entry::Fault,
        };
        let unwound = walker.walk(std::process::id(), saved).unwrap();
        assert_eq!(unwound.ips[0], ip + 1);
        assert_eq!(unwound.end, StackEnd::Complete, "{:x?}", unwound.ips);
        let here = a_walk_within_its_deadline_gives_the_whole_stack as *const () as u64;
        assert!(unwound
            .ips
            .iter()
            .any(|&ret| ret > here && ret < here + 4096));
    }
}
