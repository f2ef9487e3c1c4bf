//! User stacks without frame pointers: DWARF unwinding (`.eh_frame`,
//! `.debug_frame`) of a stopped thread from the registers it entered the
//! kernel with, over its memory.
//!
//! Most of what users run (distribution C and C++, Debian's glibc,
//! libjvm) is built without frame pointers, so a frame-pointer walk stops
//! at the libc wrapper. A thread blocked for more than a few milliseconds
//! does not run: its registers and stack stay put while they are read.
//!
//! Every frame is confirmed before it is kept: a return address must land
//! in code, right after a call instruction, with the stack pointer moving
//! up. A value that cannot be confirmed ends the stack as
//! [`StackEnd::Truncated`]: a stack may stop early, it is never made up.
//! Within that rule:
//!   - modules with tables are unwound by them, so `rbp` is never read as
//!     a frame pointer in `-O2` code, where it holds anything;
//!   - code without tables (JIT code in anonymous memory, a module stripped
//!     of `.eh_frame`, V8's builtins embedded in node's `.text` without
//!     tables of their own) is walked by its frame pointers;
//!   - a signal handler's frame continues in the context the kernel saved
//!     at the trampoline's stack pointer;
//!   - the vDSO's tables come from memory: it has no file.

mod elf;
mod memory;
mod tables;

use std::collections::HashMap;

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64};
use framehop::{FrameAddress, Unwinder as _};

pub use memory::{Memory, ProcessMemory};
use tables::{Module, ReturnSite, Rules, Tables};

use crate::process_map::{AddressSpace, ProcessMap};

/// The user registers a thread entered the kernel with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserRegs {
    pub ip: u64,
    pub sp: u64,
    pub fp: u64,
}

/// Why the thread entered the kernel, which says what its `ip` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// A system call: `ip` is the instruction after `syscall`.
    SystemCall,
    /// A page fault: `ip` is the faulting instruction itself.
    Fault,
}

/// How an unwound stack ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackEnd {
    /// The tables say the outermost frame is the thread's root
    /// (`start_thread`, `_start`: no caller).
    Complete,
    /// The next frame could not be confirmed.
    Truncated,
}

/// A user stack, innermost first.
///
/// Addresses follow the convention of stacks the kernel walks, which the
/// symbolizer relies on when it looks up `ip - 1`: each is one past a byte
/// of the instruction it stands for. A return address is that already, as
/// is a system call's `ip`; an exact instruction (a page fault's, the one
/// a signal interrupted, the signal trampoline) is given plus one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unwound {
    pub ips: Vec<u64>,
    pub end: StackEnd,
    /// Of a stack unwound to its root ([`StackEnd::Complete`]): one past
    /// the highest byte of the stack the unwind read. The thread's root
    /// frame is there in every stack it has, so all of them lie below.
    pub stack_top: Option<u64>,
}

/// Default bound of [`Unwinder::table_bytes`]: glibc's tables take about
/// 0.2 MiB, libjvm's about 3 MiB.
pub const DEFAULT_TABLE_BUDGET: u64 = 64 << 20;

/// How many processes' module maps are kept within a cut; the least
/// recently used goes first.
const MAX_PROCESSES: usize = 1024;

/// `mov $0xf, %rax; syscall`: glibc's `__restore_rt`, where a signal
/// handler returns to, calling `rt_sigreturn`.
const SIGRETURN: [u8; 9] = [0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05];

/// Offsets in the `ucontext_t` the kernel saves for a signal handler:
/// `uc_mcontext` starts at 40, and its `gregs` are r8..r15, rdi, rsi, rbp,
/// rbx, rdx, rax, rcx, rsp, rip.
const UCONTEXT_RBP: u64 = 40 + 10 * 8;
const UCONTEXT_RSP: u64 = 40 + 15 * 8;
const UCONTEXT_RIP: u64 = 40 + 16 * 8;

/// Unwinds stopped threads. Keeps unwind tables (shared across processes
/// by build id, within a byte budget) between calls, and each process's
/// module map for as long as it is known to be whole
/// ([`Unwinder::begin_cut`]): one instance should serve every unwind.
///
/// Reading a module map takes the target's mmap_lock, as reading its
/// memory does: call from a thread that may block (see
/// `capture::threads::StackWalker`).
pub struct Unwinder {
    tables: Tables,
    processes: HashMap<u32, ProcessState>,
    /// Each process's address space as this cut found it.
    spaces: HashMap<u32, AddressSpace>,
    /// framehop's rule cache, kept across unwinds as it is meant to be.
    cache: CacheX86_64,
    clock: u64,
}

/// A process's module map, and the module each mapping asked about belongs
/// to (by the mapping's start).
struct ProcessState {
    map: ProcessMap,
    /// The address space the map was read from, where it was known then.
    read_from: Option<AddressSpace>,
    modules: HashMap<u64, Module>,
    last_used: u64,
}

/// An executable mapping of a process, and whose code it is.
#[derive(Clone, Copy)]
struct Code {
    start: u64,
    end: u64,
    module: Module,
}

impl Default for Unwinder {
    fn default() -> Self {
        Self::new(DEFAULT_TABLE_BUDGET)
    }
}

/// The next frame to unwind from.
#[derive(Clone, Copy)]
struct Frame {
    /// Exact for the first frame and the one a signal interrupted, a
    /// return address otherwise.
    address: FrameAddress,
    regs: UnwindRegsX86_64,
    /// The address the stack shows for it (see [`Unwound`]).
    shown: u64,
    /// A signal handler returned here, to the trampoline.
    at_trampoline: bool,
}

/// How a return address was confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Confirmed {
    Call,
    Trampoline,
}

/// What one step up the stack gave.
enum Step {
    Caller(Frame),
    Root,
    Unconfirmed,
}

impl Unwinder {
    /// An unwinder whose tables take at most `table_budget` bytes (one
    /// module's tables are kept even if they alone take more).
    pub fn new(table_budget: u64) -> Self {
        Unwinder {
            tables: Tables::new(table_budget),
            processes: HashMap::new(),
            spaces: HashMap::new(),
            cache: CacheX86_64::new(),
            clock: 0,
        }
    }

    /// Memory the loaded unwind tables take.
    pub fn table_bytes(&self) -> u64 {
        self.tables.bytes()
    }

    /// Starts a cut, at which each process has the address space `spaces`
    /// gives. A module map is kept from one cut to the next only if its
    /// process is found with the settled address space the map was read
    /// from; any other is read again when it is next used, then kept.
    ///
    /// A map read after the cut began holds every module the threads
    /// blocked at that cut have frames in: a thread's code was mapped when
    /// it blocked, and a module cannot go away under a thread that will
    /// return into it. A map kept once its process changed a mapping could
    /// be stale: a library unloaded since, another mapped where it was,
    /// would lend its tables to addresses that are no longer its own. For
    /// the same reason an address outside every mapping of a whole map is
    /// not worth reading the map again for: it is not code a blocked thread
    /// returns to, and the stack ends there.
    pub fn begin_cut(&mut self, spaces: HashMap<u32, AddressSpace>) {
        self.processes.retain(|pid, state| {
            state.read_from.is_some_and(|read_from| {
                read_from.is_settled() && spaces.get(pid) == Some(&read_from)
            })
        });
        self.spaces = spaces;
    }

    /// Unwinds the user stack of a thread of `pid` stopped with `regs`,
    /// reading its stack through `memory`, at most `max_depth` frames.
    pub fn unwind(
        &mut self,
        pid: u32,
        regs: UserRegs,
        entry: Entry,
        memory: &dyn Memory,
        max_depth: usize,
    ) -> Unwound {
        let first = match entry {
            Entry::SystemCall => regs.ip,
            Entry::Fault => regs.ip.wrapping_add(1),
        };
        let memory = &Reach::new(memory);
        let mut ips = vec![first];
        let mut frame = Frame {
            address: FrameAddress::from_instruction_pointer(regs.ip),
            regs: UnwindRegsX86_64::new(regs.ip, regs.sp, regs.fp),
            shown: first,
            at_trampoline: false,
        };
        let end = loop {
            if ips.len() >= max_depth {
                break StackEnd::Truncated;
            }
            match self.step(pid, frame, memory) {
                Step::Caller(caller) => {
                    ips.push(caller.shown);
                    frame = caller;
                }
                Step::Root => break StackEnd::Complete,
                Step::Unconfirmed => break StackEnd::Truncated,
            }
        };
        Unwound {
            stack_top: (end == StackEnd::Complete).then(|| memory.top.get()),
            ips,
            end,
        }
    }

    /// The caller of `frame`, confirmed.
    fn step(&mut self, pid: u32, frame: Frame, memory: &dyn Memory) -> Step {
        let lookup = frame.address.address_for_lookup();
        let Some(code) = self.code_at(pid, lookup) else {
            return Step::Unconfirmed;
        };
        if frame.at_trampoline {
            return signal_context(frame.regs.sp(), memory).map_or(Step::Unconfirmed, Step::Caller);
        }
        let mut regs = frame.regs;
        let return_address = match code.module {
            Module::Table(id, bias) => match self.tables.rules(id, lookup.wrapping_sub(bias)) {
                Some(Rules::Dwarf(dwarf)) => {
                    let Some(address) = rebase(frame.address, bias) else {
                        return Step::Unconfirmed;
                    };
                    let mut read_stack = |address| read_word(memory, address).ok_or(());
                    match dwarf.unwind_frame(address, &mut regs, &mut self.cache, &mut read_stack) {
                        Ok(Some(return_address)) => return_address,
                        Ok(None) => return Step::Root,
                        Err(_) => return Step::Unconfirmed,
                    }
                }
                // Code a module carries without tables beside code with
                // them is generated or hand-written, such as V8's builtins
                // embedded in node: it keeps rbp as a frame pointer, and the
                // caller's rbp came through the callee's tables.
                Some(Rules::NoTable) => match frame_pointer_step(&mut regs, memory) {
                    Some(return_address) => return_address,
                    None => return Step::Unconfirmed,
                },
                None => return Step::Unconfirmed,
            },
            Module::Anonymous => match frame_pointer_step(&mut regs, memory) {
                Some(return_address) => return_address,
                None => return Step::Unconfirmed,
            },
            Module::Unreadable => return Step::Unconfirmed,
        };
        if regs.sp() <= frame.regs.sp() {
            return Step::Unconfirmed;
        }
        let Some(address) = FrameAddress::from_return_address(return_address) else {
            return Step::Unconfirmed;
        };
        regs.set_ip(return_address);
        let Some(confirmed) = self.confirmed_return(pid, return_address, memory) else {
            return Step::Unconfirmed;
        };
        let at_trampoline = confirmed == Confirmed::Trampoline;
        Step::Caller(Frame {
            address,
            regs,
            // No call precedes the trampoline: it is shown as the exact
            // address it is.
            shown: if at_trampoline {
                return_address + 1
            } else {
                return_address
            },
            at_trampoline,
        })
    }

    /// Whether `address` is a return address: it lands in code right
    /// after a call instruction, or at the signal trampoline, where the
    /// kernel (not a call) sends a handler back to. One read covers both:
    /// from the module's file (remembered with its tables), or for code
    /// without one from memory (JIT code changes: read every time).
    fn confirmed_return(
        &mut self,
        pid: u32,
        address: u64,
        memory: &dyn Memory,
    ) -> Option<Confirmed> {
        let code = self.code_at(pid, address.checked_sub(1)?)?;
        let (before, after) = return_site_reach(address, code.start, code.end);
        match code.module {
            Module::Table(id, bias) => {
                let site = ReturnSite {
                    vaddr: address.wrapping_sub(bias),
                    before,
                    after,
                };
                self.tables.confirm(id, site, judge_return)
            }
            Module::Anonymous => {
                let mut bytes = vec![0; usize::from(before) + usize::from(after)];
                if !memory.read_code(address - u64::from(before), &mut bytes) {
                    return None;
                }
                let (before, after) = bytes.split_at(usize::from(before));
                judge_return(before, after)
            }
            Module::Unreadable => None,
        }
    }

    /// The executable mapping an address is in, as the process's map kept
    /// for this cut has it (see [`Unwinder::begin_cut`]).
    fn code_at(&mut self, pid: u32, address: u64) -> Option<Code> {
        self.clock += 1;
        if !self.processes.contains_key(&pid) {
            let map = ProcessMap::read_code(pid).ok()?;
            if self.processes.len() >= MAX_PROCESSES {
                if let Some(oldest) = self
                    .processes
                    .iter()
                    .min_by_key(|(_, state)| state.last_used)
                    .map(|(pid, _)| *pid)
                {
                    self.processes.remove(&oldest);
                }
            }
            let state = ProcessState {
                map,
                read_from: self.spaces.get(&pid).copied(),
                modules: HashMap::new(),
                last_used: 0,
            };
            self.processes.insert(pid, state);
        }
        let state = self.processes.get_mut(&pid)?;
        state.last_used = self.clock;
        let mapping = state.map.code(address)?;
        let module = match state.modules.get(&mapping.start) {
            // Its table was evicted since: loaded again.
            Some(Module::Table(id, _)) if !self.tables.contains(*id) => None,
            known => known.copied(),
        };
        let module = module.unwrap_or_else(|| {
            let module = self.tables.module(pid, mapping);
            state.modules.insert(mapping.start, module);
            module
        });
        Some(Code {
            start: mapping.start,
            end: mapping.end,
            module,
        })
    }
}

/// How many code bytes before and after `address` tell whether it is a
/// return address, in an executable mapping `start..end` that holds the
/// byte before it: at most a call's length before, at most the signal
/// trampoline's after.
pub(crate) fn return_site_reach(address: u64, start: u64, end: u64) -> (u8, u8) {
    let before = address.saturating_sub(start).min(MAX_CALL_LENGTH as u64) as u8;
    let after = end.saturating_sub(address).min(SIGRETURN.len() as u64) as u8;
    (before, after)
}

/// Whether the code around an address makes it one a frame can return
/// to: `before` and `after` are the bytes [`return_site_reach`] says.
pub(crate) fn is_return_site(before: &[u8], after: &[u8]) -> bool {
    judge_return(before, after).is_some()
}

/// How the code around a return address confirms it: the signal
/// trampoline right at it, or a call right before it.
fn judge_return(before: &[u8], after: &[u8]) -> Option<Confirmed> {
    if after == SIGRETURN {
        Some(Confirmed::Trampoline)
    } else if ends_with_call(before) {
        Some(Confirmed::Call)
    } else {
        None
    }
}

/// `address` moved into the module's own address space.
fn rebase(address: FrameAddress, bias: u64) -> Option<FrameAddress> {
    match address {
        FrameAddress::InstructionPointer(ip) => Some(FrameAddress::from_instruction_pointer(
            ip.wrapping_sub(bias),
        )),
        FrameAddress::ReturnAddress(ret) => {
            FrameAddress::from_return_address(ret.get().wrapping_sub(bias))
        }
    }
}

/// A memory that remembers how high up the stack it was read.
struct Reach<'a> {
    memory: &'a dyn Memory,
    top: std::cell::Cell<u64>,
}

impl<'a> Reach<'a> {
    fn new(memory: &'a dyn Memory) -> Self {
        Reach {
            memory,
            top: std::cell::Cell::new(0),
        }
    }
}

impl Memory for Reach<'_> {
    fn read(&self, address: u64, buffer: &mut [u8]) -> bool {
        let read = self.memory.read(address, buffer);
        if read {
            let end = address.saturating_add(buffer.len() as u64);
            self.top.set(self.top.get().max(end));
        }
        read
    }

    /// Code is not stack: not counted.
    fn read_code(&self, address: u64, buffer: &mut [u8]) -> bool {
        self.memory.read_code(address, buffer)
    }
}

fn read_word(memory: &dyn Memory, address: u64) -> Option<u64> {
    let mut word = [0; 8];
    memory
        .read(address, &mut word)
        .then(|| u64::from_le_bytes(word))
}

/// One frame-pointer step: `rbp` points at the caller's `rbp`, the return
/// address above it. The frame must lie above the stack pointer and the
/// chain must rise.
fn frame_pointer_step(regs: &mut UnwindRegsX86_64, memory: &dyn Memory) -> Option<u64> {
    let frame = regs.bp();
    if !frame.is_multiple_of(8) || frame < regs.sp() {
        return None;
    }
    let caller_frame = read_word(memory, frame)?;
    let return_address = read_word(memory, frame.checked_add(8)?)?;
    if caller_frame != 0 && caller_frame <= frame {
        return None;
    }
    regs.set_sp(frame + 16);
    regs.set_bp(caller_frame);
    Some(return_address)
}

/// The context a signal interrupted, saved by the kernel at `sp` when the
/// handler returned to the trampoline. The interrupted instruction is
/// exact: no call led there.
fn signal_context(sp: u64, memory: &dyn Memory) -> Option<Frame> {
    let ip = read_word(memory, sp.checked_add(UCONTEXT_RIP)?)?;
    let saved_sp = read_word(memory, sp.checked_add(UCONTEXT_RSP)?)?;
    let bp = read_word(memory, sp.checked_add(UCONTEXT_RBP)?)?;
    Some(Frame {
        address: FrameAddress::from_instruction_pointer(ip),
        regs: UnwindRegsX86_64::new(ip, saved_sp, bp),
        shown: ip.wrapping_add(1),
        at_trampoline: false,
    })
}

/// The longest call instruction: `ff /2` with a SIB byte and a 32-bit
/// displacement, after a REX prefix.
const MAX_CALL_LENGTH: usize = 7;

/// Whether `code` (the bytes right before a return address) ends with a
/// call: `e8 rel32`, or `ff /2` in any of its addressing forms.
fn ends_with_call(code: &[u8]) -> bool {
    let at = |back: usize| code.len().checked_sub(back).map(|index| code[index]);
    if at(5) == Some(0xe8) {
        return true;
    }
    (2..=MAX_CALL_LENGTH).any(|length| {
        let (Some(0xff), Some(modrm)) = (at(length), at(length - 1)) else {
            return false;
        };
        if (modrm >> 3) & 7 != 2 {
            return false;
        }
        let (mode, rm) = (modrm >> 6, modrm & 7);
        let sib = mode != 3 && rm == 4;
        let displacement = match mode {
            0 if rm == 5 => 4,
            0 if sib => match at(length - 2) {
                Some(sib_byte) if sib_byte & 7 == 5 => 4,
                Some(_) => 0,
                None => return false,
            },
            1 => 1,
            2 => 4,
            _ => 0,
        };
        2 + usize::from(sib) + displacement == length
    })
}

/// The registers where it is used, for tests that unwind their own stack:
/// the caller is stopped while its stack is read, so its frames hold still.
#[cfg(all(test, target_arch = "x86_64"))]
macro_rules! registers_here {
    () => {{
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
        $crate::unwind::UserRegs { ip, sp, fp }
    }};
}
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) use registers_here;

#[cfg(test)]
pub(crate) mod tests;
