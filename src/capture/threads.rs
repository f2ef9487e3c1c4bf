//! What /proc says about target threads: their names, and the user stacks of
//! threads that were blocked before we attached.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::time::Duration;

use super::bpf::MAX_STACK_DEPTH;
use super::copies::StackCopy;
use super::Stack;
use crate::unwind::Unwinder;

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

/// Walks a blocked thread's user stack by its frame pointers, reading the
/// target's memory: what `bpf_get_stackid` would have done had the thread
/// switched out while we watched. Innermost first; stops at the first frame
/// it cannot read.
pub(super) fn walk_user_stack(tgid: u32, ip: u64, fp: u64, max_depth: usize) -> Vec<u64> {
    let mut stack = vec![ip];
    let Ok(memory) = fs::File::open(format!("/proc/{tgid}/mem")) else {
        return stack;
    };
    let read_word = |address: u64| {
        let mut word = [0u8; 8];
        memory
            .read_exact_at(&mut word, address)
            .ok()
            .map(|()| u64::from_ne_bytes(word))
    };
    let mut frame = fp;
    while stack.len() < max_depth && frame != 0 && frame.is_multiple_of(8) {
        let (Some(caller_frame), Some(return_address)) = (read_word(frame), read_word(frame + 8))
        else {
            break;
        };
        if return_address == 0 {
            break;
        }
        stack.push(return_address);
        // Frames live at rising addresses; anything else is not a frame chain.
        if caller_frame <= frame {
            break;
        }
        frame = caller_frame;
    }
    stack
}

/// Walks the user stacks of blocked threads on a thread of its own, each
/// within a deadline. Reading a target's memory takes its `mmap_lock`, and
/// a process frozen behind an `mmap_lock` writer (the freeze freezeframe
/// exists for) holds up whoever reads it until the freeze ends: the tracer
/// must not wait with it. One walk is outstanding at most; while it is
/// stuck, further walks are declined at once.
///
/// The user stacks the probe copied are unwound here too: the copies are
/// the memory, but the unwinder reads the process's module map, which
/// takes the same lock.
pub(super) struct StackWalker {
    requests: mpsc::Sender<Job>,
    stuck: Option<mpsc::Receiver<Vec<u64>>>,
    /// A batch of copies still being unwound past its deadline.
    stuck_copies: Option<mpsc::Receiver<Vec<(u64, Stack)>>>,
}

enum Job {
    Walk(Walk),
    Copies {
        copies: Vec<StackCopy>,
        reply: mpsc::Sender<Vec<(u64, Stack)>>,
    },
}

struct Walk {
    tgid: u32,
    ip: u64,
    fp: u64,
    reply: mpsc::Sender<Vec<u64>>,
}

/// How long a walk may take before the tracer goes on without it.
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
                            let stack =
                                walk_user_stack(walk.tgid, walk.ip, walk.fp, MAX_STACK_DEPTH);
                            let _ = walk.reply.send(stack);
                        }
                        Job::Copies { copies, reply } => {
                            let unwound = copies
                                .iter()
                                .map(|copy| {
                                    let stack = copy.unwind(&mut unwinder, MAX_STACK_DEPTH);
                                    (copy.id, Stack::from(stack.ips))
                                })
                                .collect();
                            let _ = reply.send(unwound);
                        }
                    }
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
    pub fn unwind_copies(&mut self, copies: Vec<StackCopy>) -> Vec<(u64, Stack)> {
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

    /// The user stack from `ip` and `fp`, or `None` if it could not be
    /// read in time (the caller tries again at its next cut).
    pub fn walk(&mut self, tgid: u32, ip: u64, fp: u64) -> Option<Vec<u64>> {
        if let Some(stuck) = &self.stuck {
            match stuck.try_recv() {
                Err(mpsc::TryRecvError::Empty) => return None,
                // Done at last (its block has been read since), or gone.
                _ => self.stuck = None,
            }
        }
        let (reply, answer) = mpsc::channel();
        self.requests
            .send(Job::Walk(Walk {
                tgid,
                ip,
                fp,
                reply,
            }))
            .ok()?;
        match answer.recv_timeout(WALK_DEADLINE) {
            Ok(stack) => Some(stack),
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

    #[inline(never)]
    #[cfg(target_arch = "x86_64")]
    fn walk_own_stack() -> Vec<u64> {
        let fp: u64;
        // SAFETY: copies the frame pointer register, nothing else.
        unsafe { std::arch::asm!("mov {}, rbp", out(reg) fp) };
        walk_user_stack(std::process::id(), 0x1, fp, 127)
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn walks_a_frame_pointer_chain_through_proc_mem() {
        // This crate is built with frame pointers, so our own stack must walk
        // back through the test harness.
        let stack = walk_own_stack();
        assert_eq!(stack[0], 0x1);
        assert!(stack.len() > 5, "only {} frames: {stack:x?}", stack.len());
        let here = walks_a_frame_pointer_chain_through_proc_mem as *const () as u64;
        assert!(
            stack.iter().any(|&ret| ret > here && ret < here + 4096),
            "this test's own return address is on the walked stack: {stack:x?}"
        );
    }

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
        assert_eq!(walk_user_stack(0, 0x42, 0x1000, 127), vec![0x42]);
    }
}

#[cfg(test)]
mod walker_tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn a_walk_within_its_deadline_gives_the_stack() {
        let fp: u64;
        // SAFETY: copies the frame pointer register, nothing else.
        unsafe { std::arch::asm!("mov {}, rbp", out(reg) fp) };
        let mut walker = StackWalker::start().unwrap();
        let stack = walker.walk(std::process::id(), 0x1, fp).unwrap();
        assert_eq!(stack[0], 0x1);
        assert!(stack.len() > 3, "{stack:x?}");
    }
}
