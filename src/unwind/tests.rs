//! The unwinder on this process's own stacks (real tables, real memory),
//! and on stacks made up around a page of code without tables.

use std::sync::Mutex;

use super::*;

/// Registers at a point of the caller, then the unwind of its stack: the
/// caller is stopped in this call, so its frames hold still.
#[inline(never)]
#[cfg(target_arch = "x86_64")]
fn unwind_here(unwinder: &mut Unwinder) -> Unwound {
    let regs = registers_here!();
    let memory = ProcessMemory::open(std::process::id()).unwrap();
    // The ip is exact, as a fault's is.
    unwinder.unwind(std::process::id(), regs, Entry::Fault, &memory, 127)
}

/// Whether a stack has a return address into the function at `start`.
fn returns_into(stack: &[u64], start: u64) -> bool {
    stack.iter().any(|&ip| ip > start && ip < start + 4096)
}

#[test]
#[cfg(target_arch = "x86_64")]
fn our_own_stack_unwinds_to_the_thread_root() {
    let mut unwinder = Unwinder::default();
    let unwound = unwind_here(&mut unwinder);
    assert_eq!(unwound.end, StackEnd::Complete, "{:x?}", unwound.ips);
    let here = our_own_stack_unwinds_to_the_thread_root as *const () as u64;
    assert!(returns_into(&unwound.ips, here), "{:x?}", unwound.ips);
    assert!(unwinder.table_bytes() > 0);
    // Tables stay loaded: a second unwind costs no more memory.
    let bytes = unwinder.table_bytes();
    assert_eq!(unwind_here(&mut unwinder).end, StackEnd::Complete);
    assert_eq!(unwinder.table_bytes(), bytes);
}

#[test]
#[cfg(target_arch = "x86_64")]
fn a_depth_limit_truncates() {
    let unwound = unwind_here(&mut Unwinder::default()).ips.len();
    let short = {
        let regs = registers_here!();
        let memory = ProcessMemory::open(std::process::id()).unwrap();
        Unwinder::default().unwind(std::process::id(), regs, Entry::Fault, &memory, 2)
    };
    assert!(unwound > 2);
    assert_eq!((short.ips.len(), short.end), (2, StackEnd::Truncated));
}

static IN_HANDLER: Mutex<Option<Unwound>> = Mutex::new(None);

#[cfg(target_arch = "x86_64")]
extern "C" fn unwind_in_handler(_signal: libc::c_int) {
    let unwound = unwind_here(&mut Unwinder::default());
    *IN_HANDLER.lock().unwrap() = Some(unwound);
}

#[inline(never)]
fn raise_the_signal() {
    // SAFETY: raises a signal whose handler is installed; the handler
    // runs on this thread before raise returns.
    unsafe { libc::raise(libc::SIGUSR2) };
}

#[test]
#[cfg(target_arch = "x86_64")]
fn a_signal_handler_unwinds_through_the_signal_frame_into_what_it_interrupted() {
    // SAFETY: installs a handler for a signal nothing else in the tests
    // uses; the struct is zeroed, then filled as sigaction(2) wants.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = unwind_in_handler as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        assert_eq!(
            libc::sigaction(libc::SIGUSR2, &action, std::ptr::null_mut()),
            0
        );
    }
    raise_the_signal();
    let unwound = IN_HANDLER.lock().unwrap().take().expect("the handler ran");
    let memory = ProcessMemory::open(std::process::id()).unwrap();
    // Shown as its exact address plus one: no call led there.
    let is_trampoline = |&ip: &u64| {
        let mut code = [0; SIGRETURN.len()];
        memory.read(ip - 1, &mut code) && code == SIGRETURN
    };
    let trampoline = unwound.ips.iter().position(is_trampoline);
    let raiser = raise_the_signal as *const () as u64;
    let into_raiser = unwound
        .ips
        .iter()
        .rposition(|&ip| ip > raiser && ip < raiser + 4096);
    assert!(
        trampoline.is_some() && into_raiser > trampoline,
        "the handler, the trampoline, then what raised the signal: {:x?}",
        unwound.ips
    );
    assert_eq!(unwound.end, StackEnd::Complete, "{:x?}", unwound.ips);
}

/// A page of code in anonymous memory, as a JIT compiler makes it: no
/// file, no tables. `call_through(callback)` keeps a frame pointer and
/// calls `callback`.
#[cfg(target_arch = "x86_64")]
pub(crate) struct JitPage {
    start: *mut libc::c_void,
}

/// `push rbp; mov rbp, rsp; call rdi; pop rbp; ret`, then `nop`s.
#[cfg(target_arch = "x86_64")]
const CALL_THROUGH: [u8; 9] = [0x55, 0x48, 0x89, 0xe5, 0xff, 0xd7, 0x5d, 0xc3, 0x90];
/// Offset of the return address after `call rdi`.
pub(crate) const AFTER_CALL: u64 = 6;
/// Offset of the `nop` after `ret`: in code, with no call before it.
pub(crate) const AFTER_RET: u64 = 8;

#[cfg(target_arch = "x86_64")]
impl JitPage {
    pub(crate) fn new() -> JitPage {
        // SAFETY: a fresh private anonymous mapping, written before it is
        // made executable, unmapped on drop.
        unsafe {
            let start = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(start, libc::MAP_FAILED);
            std::ptr::copy_nonoverlapping(CALL_THROUGH.as_ptr(), start.cast(), CALL_THROUGH.len());
            assert_eq!(
                libc::mprotect(start, 4096, libc::PROT_READ | libc::PROT_EXEC),
                0
            );
            JitPage { start }
        }
    }

    pub(crate) fn address(&self) -> u64 {
        self.start as u64
    }

    #[inline(never)]
    fn call_through(&self, callback: extern "C" fn()) {
        // SAFETY: the page holds CALL_THROUGH, a function of the C ABI
        // taking one pointer argument.
        let function: extern "C" fn(extern "C" fn()) = unsafe { std::mem::transmute(self.start) };
        function(callback);
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for JitPage {
    fn drop(&mut self) {
        // SAFETY: unmaps the page mapped in new().
        unsafe { libc::munmap(self.start, 4096) };
    }
}

static THROUGH_JIT: Mutex<Option<Unwound>> = Mutex::new(None);

#[cfg(target_arch = "x86_64")]
extern "C" fn unwind_from_callback() {
    let unwound = unwind_here(&mut Unwinder::default());
    *THROUGH_JIT.lock().unwrap() = Some(unwound);
}

#[test]
#[cfg(target_arch = "x86_64")]
fn code_without_tables_is_walked_by_its_frame_pointer() {
    let jit = JitPage::new();
    jit.call_through(unwind_from_callback);
    let unwound = THROUGH_JIT.lock().unwrap().take().unwrap();
    let into_jit = unwound
        .ips
        .iter()
        .position(|&ip| ip == jit.address() + AFTER_CALL);
    let caller = JitPage::call_through as *const () as u64;
    let into_caller = unwound
        .ips
        .iter()
        .position(|&ip| ip > caller && ip < caller + 4096);
    assert!(
        into_jit.is_some() && into_caller == into_jit.map(|at| at + 1),
        "the JIT frame, then its caller: {:x?}",
        unwound.ips
    );
    assert_eq!(unwound.end, StackEnd::Complete, "{:x?}", unwound.ips);
}

/// A stack made up in a buffer at a made-up address; the rest of memory
/// (code) is this process's.
struct FakeStack {
    base: u64,
    words: Vec<u64>,
    rest: ProcessMemory,
}

impl FakeStack {
    fn new(base: u64, words: Vec<u64>) -> Self {
        FakeStack {
            base,
            words,
            rest: ProcessMemory::open(std::process::id()).unwrap(),
        }
    }
}

impl Memory for FakeStack {
    fn read(&self, address: u64, buffer: &mut [u8]) -> bool {
        let bytes: Vec<u8> = self
            .words
            .iter()
            .flat_map(|word| word.to_le_bytes())
            .collect();
        let end = self.base + bytes.len() as u64;
        if !(self.base..end).contains(&address) {
            return self.rest.read(address, buffer);
        }
        let start = (address - self.base) as usize;
        match bytes.get(start..start + buffer.len()) {
            Some(slice) => {
                buffer.copy_from_slice(slice);
                true
            }
            None => false,
        }
    }
}

#[test]
#[cfg(target_arch = "x86_64")]
fn garbage_in_the_frame_pointer_gives_no_frame() {
    let jit = JitPage::new();
    let pid = std::process::id();
    // Stopped in code without tables, at the instruction after `call rdi`.
    let ip = jit.address() + AFTER_CALL + 1;
    let stack = FakeStack::new(
        0x7000_0000_0000,
        vec![
            0,
            0x7000_0000_0020,
            // Not a return address: the start of a function, after no call.
            garbage_in_the_frame_pointer_gives_no_frame as *const () as u64,
            0,
            0,
            // A frame whose return address is real: after `call rdi`.
            jit.address() + AFTER_CALL,
        ],
    );
    let unwind = |fp| {
        Unwinder::default().unwind(
            pid,
            UserRegs {
                ip,
                sp: stack.base,
                fp,
            },
            Entry::SystemCall,
            &stack,
            127,
        )
    };
    for garbage in [
        0x7000_0000_0008, // points at a code address after no call
        0x6fff_ffff_fff0, // below the stack pointer
        0x7000_0000_0003, // misaligned
        0xdead_beef_0000, // unreadable
        jit.address(),    // code, not stack
    ] {
        let unwound = unwind(garbage);
        assert_eq!(
            (unwound.ips.as_slice(), unwound.end),
            (&[ip][..], StackEnd::Truncated),
            "rbp {garbage:#x}"
        );
    }
    // The same walk from a real frame gives its caller, then stops where
    // the made-up stack does.
    let unwound = unwind(0x7000_0000_0020);
    assert_eq!(unwound.ips, vec![ip, jit.address() + AFTER_CALL]);
    assert_eq!(unwound.end, StackEnd::Truncated);
}

#[test]
fn an_address_in_no_code_ends_the_stack_at_once() {
    let stack = FakeStack::new(0x1000, vec![0; 4]);
    let unwound = Unwinder::default().unwind(
        std::process::id(),
        UserRegs {
            ip: 0x10,
            sp: 0x1000,
            fp: 0,
        },
        Entry::Fault,
        &stack,
        127,
    );
    // A fault's ip is exact: given plus one, as the convention says.
    assert_eq!(
        (unwound.ips, unwound.end),
        (vec![0x11], StackEnd::Truncated)
    );
}

#[test]
fn call_instructions_are_recognised_in_every_form() {
    let calls: [&[u8]; 9] = [
        &[0xe8, 1, 2, 3, 4],             // call rel32
        &[0xff, 0xd0],                   // call rax
        &[0x41, 0xff, 0xd4],             // call r12
        &[0xff, 0x15, 1, 2, 3, 4],       // call [rip+disp32]
        &[0xff, 0x10],                   // call [rax]
        &[0xff, 0x50, 0x08],             // call [rax+disp8]
        &[0xff, 0x54, 0x24, 0x08],       // call [rsp+disp8]
        &[0xff, 0x90, 1, 2, 3, 4],       // call [rax+disp32]
        &[0xff, 0x14, 0x25, 1, 2, 3, 4], // call [disp32] through a SIB
    ];
    for call in calls {
        let mut code = vec![0x90; 8];
        code.extend_from_slice(call);
        assert!(ends_with_call(&code), "{call:x?}");
    }
    let not_calls: [&[u8]; 5] = [
        &[0x90, 0x90, 0x90, 0x90, 0x90], // nops
        &[0xff, 0xe0],                   // jmp rax
        &[0xc3],                         // ret
        &[0xff, 0x15, 1, 2],             // a call cut short
        &[],
    ];
    for code in not_calls {
        assert!(!ends_with_call(code), "{code:x?}");
    }
}

#[test]
#[cfg(target_arch = "x86_64")]
fn a_module_map_is_kept_across_cuts_only_while_its_address_space_is_found_settled_and_the_same() {
    let pid = std::process::id();
    let settled = AddressSpace {
        id: 0xffff_8880_0001_0000,
        writes: 40,
    };
    let mut unwinder = Unwinder::default();
    // Begins a cut at which the process has `space`, and says whether its
    // map was kept; then unwinds, which reads it if it was not.
    let mut cut = |space: Option<AddressSpace>| {
        let spaces = space.map(|space| HashMap::from([(pid, space)]));
        unwinder.begin_cut(spaces.unwrap_or_default());
        let kept = unwinder.processes.contains_key(&pid);
        assert_eq!(unwind_here(&mut unwinder).end, StackEnd::Complete);
        kept
    };
    let changed = AddressSpace {
        writes: settled.writes + 2,
        ..settled
    };
    let being_changed = AddressSpace {
        writes: changed.writes + 1,
        ..changed
    };
    let after_exec = AddressSpace {
        id: settled.id + 0x1000,
        ..changed
    };
    let steps = [
        (Some(settled), false, "nothing read yet"),
        (Some(settled), true, "found the same"),
        (Some(changed), false, "a mapping changed"),
        (Some(changed), true, "found the same again"),
        (Some(being_changed), false, "a writer at work"),
        (
            Some(being_changed),
            false,
            "read while a writer was at work",
        ),
        (None, false, "not found by the probe"),
        (
            Some(changed),
            false,
            "read while its address space was unknown",
        ),
        (Some(after_exec), false, "another address space"),
        (
            Some(AddressSpace {
                writes: 0,
                ..after_exec
            }),
            false,
            "a kernel that does not count",
        ),
    ];
    for (space, kept, why) in steps {
        assert_eq!(cut(space), kept, "{why}: {space:?}");
    }
}
