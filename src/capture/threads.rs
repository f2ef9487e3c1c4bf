//! What /proc says about target threads: their names, and the user stacks of
//! threads that were blocked before we attached.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::time::Duration;

use super::bpf::MAX_STACK_DEPTH;

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
    let Ok(memory) = fs::File::open(format!("/proc/{tgid}/mem")) else {
        return vec![ip];
    };
    walk_frame_pointers(ip, fp, max_depth, |address| {
        let mut word = [0u8; 8];
        memory
            .read_exact_at(&mut word, address)
            .ok()
            .map(|()| u64::from_ne_bytes(word))
    })
}

/// Walks a frame-pointer chain from `ip` and `fp` through `read_word`,
/// innermost first; stops at the first frame it cannot read.
pub(super) fn walk_frame_pointers(
    ip: u64,
    fp: u64,
    max_depth: usize,
    read_word: impl Fn(u64) -> Option<u64>,
) -> Vec<u64> {
    let mut stack = vec![ip];
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
pub(super) struct StackWalker {
    requests: mpsc::Sender<Walk>,
    stuck: Option<mpsc::Receiver<Vec<u64>>>,
}

struct Walk {
    tgid: u32,
    ip: u64,
    fp: u64,
    reply: mpsc::Sender<Vec<u64>>,
}

/// How long a walk may take before the tracer goes on without it.
const WALK_DEADLINE: Duration = Duration::from_millis(20);

impl StackWalker {
    pub fn start() -> std::io::Result<Self> {
        let (requests, inbox) = mpsc::channel::<Walk>();
        std::thread::Builder::new()
            .name("ff-stackwalk".into())
            .spawn(move || {
                for walk in inbox {
                    let stack = walk_user_stack(walk.tgid, walk.ip, walk.fp, MAX_STACK_DEPTH);
                    let _ = walk.reply.send(stack);
                }
            })?;
        Ok(StackWalker {
            requests,
            stuck: None,
        })
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
            .send(Walk {
                tgid,
                ip,
                fp,
                reply,
            })
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
