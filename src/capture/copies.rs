//! User stacks of finished blocks that reached the unwind threshold: the
//! probe copies the thread's user registers and the top of its user stack
//! on its way back to user space (`copy_user_stack` in offcpu.bpf.c), and
//! each copy is unwound here, once, when the cut that takes it out of the
//! kernel reads it.
//!
//! A copy is unwound from its own bytes only, never from the process's
//! memory now: the thread has run on since, and the copy is the stack it
//! blocked with. A read outside the copy fails, so a stack deeper than what
//! was copied ends early, marked truncated; it is never made up.

use std::cell::OnceCell;
use std::collections::HashMap;

use super::ledger::BlockId;
use super::{Stack, UserRegs, UserStackEnd};
use crate::unwind::{Entry, Memory, ProcessMemory, Unwinder, Unwound};

/// One copy as the probe took it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StackCopy {
    /// The reference to it in its block's key ([`super::StackRef::Copy`]).
    pub id: u64,
    /// The block it was taken for, at its end: `(host tid, start_ns)`.
    pub block: BlockId,
    pub tgid: u32,
    pub regs: UserRegs,
    /// How it entered the kernel: by an exception or interrupt (a page
    /// fault, a preemption) it is a [`Entry::Fault`], its ip exact.
    pub entry: Entry,
    /// The user stack from `regs.sp` up.
    pub bytes: Vec<u8>,
    /// The copy stopped at the thread's stack top the probe was given
    /// (see `stack_tops` in offcpu.bpf.c).
    pub to_top: bool,
}

impl Memory for StackCopy {
    /// Fills `buffer` from `address`, if the copy holds all of it: what
    /// lies outside it is unknown, not zero.
    fn read(&self, address: u64, buffer: &mut [u8]) -> bool {
        let Some(offset) = address.checked_sub(self.regs.sp) else {
            return false;
        };
        let Ok(offset) = usize::try_from(offset) else {
            return false;
        };
        match offset
            .checked_add(buffer.len())
            .and_then(|end| self.bytes.get(offset..end))
        {
            Some(bytes) => {
                buffer.copy_from_slice(bytes);
                true
            }
            None => false,
        }
    }
}

impl StackCopy {
    /// The user stack, innermost first, from the copy alone. JIT code,
    /// which has no file, is read from the process to confirm a return
    /// into it: the stack the copy holds is gone, the code is not.
    pub fn unwind(&self, unwinder: &mut Unwinder, max_depth: usize) -> Unwound {
        let memory = CopiedStack {
            copy: self,
            process: OnceCell::new(),
        };
        unwinder.unwind(self.tgid, self.regs, self.entry, &memory, max_depth)
    }
}

/// A copy's stack, and the live process's JIT code: the process is opened
/// only for a stack that returns into such code.
struct CopiedStack<'a> {
    copy: &'a StackCopy,
    process: OnceCell<Option<ProcessMemory>>,
}

impl Memory for CopiedStack<'_> {
    fn read(&self, address: u64, buffer: &mut [u8]) -> bool {
        self.copy.read(address, buffer)
    }

    fn read_code(&self, address: u64, buffer: &mut [u8]) -> bool {
        self.process
            .get_or_init(|| ProcessMemory::open(self.copy.tgid).ok())
            .as_ref()
            .is_some_and(|process| process.read(address, buffer))
    }
}

/// Unwound copies, by id, until the totals that refer to them have been
/// read. A total is drained at the cut that takes its copy out of the
/// kernel, or at the next one (when its block ended between the two reads
/// of a cut); a copy whose total never comes (the kernel's `blocked` map
/// was full) is forgotten after that.
#[derive(Debug, Default)]
pub(super) struct Copies {
    /// Each stack and how it ends, with the number of cuts since it arrived.
    unwound: HashMap<u64, (Stack, UserStackEnd, u32)>,
}

impl Copies {
    /// Keeps the stacks unwound from the copies one cut took out of the
    /// kernel, by copy id.
    pub fn receive(&mut self, unwound: impl IntoIterator<Item = (u64, Unwound)>) {
        for (id, stack) in unwound {
            self.unwound
                .insert(id, (Stack::from(stack.ips), stack.end.into(), 0));
        }
    }

    /// Keeps `stack` for a copy whose block's stack was read already.
    pub fn keep(&mut self, id: u64, (stack, end): (Stack, UserStackEnd)) {
        self.unwound.insert(id, (stack, end, 0));
    }

    /// The unwound stack of a copy; empty and not read if it was let go
    /// (see [`super::threads::StackWalker::unwind_copies`]).
    pub fn stack(&self, id: u64) -> (Stack, UserStackEnd) {
        self.unwound.get(&id).map_or_else(
            || (Stack::from([]), UserStackEnd::NotRead),
            |(stack, end, _)| (Stack::clone(stack), *end),
        )
    }

    /// Ends a cut: copies received at the one before are done with.
    pub fn end_cut(&mut self) {
        self.unwound.retain(|_, (_, _, cuts)| {
            *cuts += 1;
            *cuts < 2
        });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.unwound.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unwind::{ProcessMemory, StackEnd};

    const SP: u64 = 0x7ffd_0000_1000;

    /// A copy of `words` from SP, as the probe would take it.
    fn copy(id: u64, words: &[u64]) -> StackCopy {
        StackCopy {
            id,
            block: (1, id),
            tgid: 1,
            regs: UserRegs {
                ip: 0x40_0100,
                sp: SP,
                fp: 0,
            },
            entry: Entry::SystemCall,
            bytes: words.iter().flat_map(|word| word.to_ne_bytes()).collect(),
            to_top: false,
        }
    }

    #[test]
    fn code_is_read_from_the_process_and_stack_from_the_copy_alone() {
        static CODE: [u8; 8] = *b"\x0f\x05code!!";
        let mut copied = copy(1, &[0x1111]);
        copied.tgid = std::process::id();
        let memory = CopiedStack {
            copy: &copied,
            process: OnceCell::new(),
        };
        let address = CODE.as_ptr() as u64;
        let mut bytes = [0u8; 8];
        assert!(memory.read_code(address, &mut bytes));
        assert_eq!(bytes, CODE);
        assert!(
            !memory.read(address, &mut bytes),
            "never the live process's stack"
        );
        assert!(memory.read(SP, &mut bytes));
    }

    #[test]
    fn reads_inside_the_copy_succeed_and_nothing_outside_it() {
        let copy = copy(1, &[0x1111, 0x2222]);
        let mut word = [0u8; 8];
        assert!(copy.read(SP + 8, &mut word));
        assert_eq!(u64::from_ne_bytes(word), 0x2222);
        let mut straddling = [0u8; 8];
        assert!(!copy.read(SP + 12, &mut straddling), "runs past the end");
        assert!(!copy.read(SP - 8, &mut word), "below sp");
        assert!(!copy.read(u64::MAX - 3, &mut word), "wraps around");
        let mut nothing = [0u8; 0];
        assert!(copy.read(SP + 16, &mut nothing));
    }

    /// This thread's registers here and `bytes` of its stack from sp, as
    /// the probe copies a blocked thread's.
    #[inline(never)]
    #[cfg(target_arch = "x86_64")]
    fn copy_own_stack(bytes: usize) -> (StackCopy, Unwound) {
        let (ip, sp, fp): (u64, u64, u64);
        // SAFETY: reads rip, rsp and rbp into registers, nothing else.
        unsafe {
            std::arch::asm!(
                "lea {ip}, [rip]", "mov {sp}, rsp", "mov {fp}, rbp",
                ip = out(reg) ip, sp = out(reg) sp, fp = out(reg) fp,
            )
        };
        // Up to the end of the stack's mapping, as the probe stops there.
        let map = crate::process_map::ProcessMap::read(std::process::id()).unwrap();
        let end = map.find(sp).expect("sp is in a mapping").end;
        let bytes = bytes.min((end - sp) as usize);
        // SAFETY: [sp, end) is this thread's stack mapping; the callers'
        // frames in it are live while this runs.
        let stack = unsafe { std::slice::from_raw_parts(sp as *const u8, bytes) }.to_vec();
        let copy = StackCopy {
            id: 1,
            block: (std::process::id(), 1),
            tgid: std::process::id(),
            regs: UserRegs { ip, sp, fp },
            entry: Entry::Fault,
            bytes: stack,
            to_top: false,
        };
        // The same stack read live, while the frames are still there.
        let memory = ProcessMemory::open(std::process::id()).unwrap();
        let live = Unwinder::default().unwind(copy.tgid, copy.regs, copy.entry, &memory, 127);
        (copy, live)
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn a_copy_unwinds_as_the_live_stack_does_as_far_as_it_reaches() {
        let (whole, live) = std::thread::Builder::new()
            .stack_size(8 << 20)
            .spawn(|| copy_own_stack(64 << 10))
            .unwrap()
            .join()
            .unwrap();
        let from_copy = whole.unwind(&mut Unwinder::default(), 127);
        assert!(live.ips.len() > 3, "{live:x?}");
        assert_eq!(from_copy, live, "a copy holding the whole stack");

        // A copy too short for the callers ends early, with frames the
        // live stack has too: never one of its own.
        let short = StackCopy {
            bytes: whole.bytes[..64].to_vec(),
            ..whole
        };
        let from_short = short.unwind(&mut Unwinder::default(), 127);
        assert_eq!(from_short.end, StackEnd::Truncated);
        assert!(from_short.ips.len() < live.ips.len(), "{from_short:x?}");
        assert_eq!(from_short.ips[..], live.ips[..from_short.ips.len()]);

        // A copy up to the stack top the whole unwind found is enough for
        // the whole stack; a byte less is not.
        let top = live.stack_top.expect("a whole stack has a top");
        assert!(top > whole.regs.sp && top - whole.regs.sp < whole.bytes.len() as u64);
        let to_top = |bytes: u64| StackCopy {
            bytes: whole.bytes[..bytes as usize].to_vec(),
            to_top: true,
            ..whole.clone()
        };
        let used = top - whole.regs.sp;
        assert_eq!(to_top(used).unwind(&mut Unwinder::default(), 127), live);
        let short = to_top(used - 1).unwind(&mut Unwinder::default(), 127);
        assert_eq!((short.end, short.stack_top), (StackEnd::Truncated, None));
    }

    #[test]
    fn a_copy_is_kept_for_its_cut_and_the_next_then_forgotten() {
        let mut copies = Copies::default();
        let stack = |ip: u64| Unwound {
            ips: vec![ip],
            end: StackEnd::Complete,
            stack_top: None,
        };
        let kept = (Stack::from([0x40_0100]), UserStackEnd::Complete);
        copies.receive([(8, stack(0x40_0100))]);
        assert_eq!(copies.stack(8), kept);
        copies.end_cut();
        assert_eq!(copies.stack(8), kept, "its total may come next");
        copies.receive([(12, stack(0x40_0200))]);
        copies.end_cut();
        assert_eq!(copies.stack(8), (Stack::from([]), UserStackEnd::NotRead));
        assert_eq!(copies.len(), 1);
        copies.end_cut();
        assert_eq!(copies.len(), 0);
    }
}
