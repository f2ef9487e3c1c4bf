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

use std::collections::HashMap;

use super::threads::walk_frame_pointers;
use super::{Stack, UserRegs};

/// Why the thread entered the kernel, which says what its `ip` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Entry {
    /// A system call: `ip` is the instruction after it.
    SystemCall,
    /// An exception or interrupt (a page fault, a preemption): `ip` is the
    /// instruction the thread stopped at.
    Fault,
}

/// One copy as the probe took it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StackCopy {
    /// The reference to it in its block's key ([`super::StackRef::Copy`]).
    pub id: u64,
    pub tgid: u32,
    pub regs: UserRegs,
    pub entry: Entry,
    /// The user stack from `regs.sp` up.
    pub bytes: Vec<u8>,
}

impl StackCopy {
    /// Fills `buffer` from `address`, if the copy holds all of it.
    pub fn read(&self, address: u64, buffer: &mut [u8]) -> bool {
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

    fn read_word(&self, address: u64) -> Option<u64> {
        let mut word = [0u8; 8];
        self.read(address, &mut word)
            .then(|| u64::from_ne_bytes(word))
    }

    /// The user stack, innermost first.
    fn unwind(&self, max_depth: usize) -> Vec<u64> {
        walk_frame_pointers(self.regs.ip, self.regs.fp, max_depth, |address| {
            self.read_word(address)
        })
    }
}

/// Unwound copies, by id, until the totals that refer to them have been
/// read. A total is drained at the cut that takes its copy out of the
/// kernel, or at the next one (when its block ended between the two reads
/// of a cut); a copy whose total never comes (the kernel's `blocked` map
/// was full) is forgotten after that.
#[derive(Debug, Default)]
pub(super) struct Copies {
    /// Each stack with the number of cuts since it arrived.
    unwound: HashMap<u64, (Stack, u32)>,
}

impl Copies {
    /// Unwinds the copies one cut took out of the kernel; their bytes go.
    pub fn receive(&mut self, copies: Vec<StackCopy>, max_depth: usize) {
        for copy in copies {
            let stack: Stack = copy.unwind(max_depth).into();
            self.unwound.insert(copy.id, (stack, 0));
        }
    }

    /// The unwound stack of a copy; empty if it never arrived.
    pub fn stack(&self, id: u64) -> Stack {
        self.unwound
            .get(&id)
            .map_or_else(|| Stack::from([]), |(stack, _)| Stack::clone(stack))
    }

    /// Ends a cut: copies received at the one before are done with.
    pub fn end_cut(&mut self) {
        self.unwound.retain(|_, (_, cuts)| {
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

    const SP: u64 = 0x7ffd_0000_1000;

    /// A copy of `words` from SP, as the probe would take it.
    fn copy(id: u64, ip: u64, fp: u64, words: &[u64]) -> StackCopy {
        StackCopy {
            id,
            tgid: 1,
            regs: UserRegs { ip, sp: SP, fp },
            entry: Entry::SystemCall,
            bytes: words.iter().flat_map(|word| word.to_ne_bytes()).collect(),
        }
    }

    #[test]
    fn reads_inside_the_copy_succeed_and_nothing_outside_it() {
        let copy = copy(1, 0, 0, &[0x1111, 0x2222]);
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

    #[test]
    fn a_frame_chain_inside_the_copy_is_walked_to_its_end() {
        // Two frames: [fp, return] pairs at rising addresses, the outer
        // frame's caller frame 0 (the thread's first).
        let words = [0xdead, SP + 24, 0x40_1000, 0, 0, 0x40_2000];
        let copy = copy(1, 0x40_0100, SP + 8, &words);
        assert_eq!(copy.unwind(127), vec![0x40_0100, 0x40_1000, 0x40_2000]);
    }

    #[test]
    fn a_chain_that_leaves_the_copy_ends_there_and_invents_nothing() {
        // The outer frame pointer points past the copied bytes.
        let words = [SP + 4096, 0x40_1000];
        let copy = copy(1, 0x40_0100, SP, &words);
        assert_eq!(copy.unwind(127), vec![0x40_0100, 0x40_1000]);
        // A frame pointer into nowhere gives the ip alone.
        let lost = StackCopy {
            regs: UserRegs {
                fp: 0x10,
                ..copy.regs
            },
            ..copy
        };
        assert_eq!(lost.unwind(127), vec![0x40_0100]);
    }

    #[test]
    fn a_copy_is_kept_for_its_cut_and_the_next_then_forgotten() {
        let mut copies = Copies::default();
        copies.receive(vec![copy(8, 0x40_0100, 0, &[])], 127);
        assert_eq!(&*copies.stack(8), &[0x40_0100]);
        copies.end_cut();
        assert_eq!(&*copies.stack(8), &[0x40_0100], "its total may come next");
        copies.receive(vec![copy(12, 0x40_0200, 0, &[])], 127);
        copies.end_cut();
        assert!(copies.stack(8).is_empty());
        assert_eq!(copies.len(), 1);
        copies.end_cut();
        assert_eq!(copies.len(), 0);
    }
}
