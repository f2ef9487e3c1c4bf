//! Anonymous mappings made with the `mmap`/`munmap` system calls directly,
//! and the allocator that hands out large blocks that way.
//!
//! Database allocators map large blocks straight from the kernel, and so
//! does feeddb: every block of [`LARGE`] bytes or more, the index's table
//! among them, is its own mapping. The system call is issued from Rust,
//! not through glibc's wrapper, for a profiler's sake: Debian's glibc is
//! built without frame pointers, so a frame-pointer walk that starts in its
//! `mmap` (and in `malloc` under it) stops there, and the stack would never
//! reach `HashMap::reserve_rehash`. From here, every frame is walkable.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io;
use std::ptr;

/// Blocks from this size up get a mapping of their own.
pub const LARGE: usize = 1 << 20;
const PAGE: usize = 4096;

/// Maps `len` bytes of private anonymous memory, readable and writable.
pub fn map(len: usize) -> io::Result<*mut u8> {
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as usize;
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as usize;
    // SAFETY: a fresh mapping at an address of the kernel's choosing
    // touches no memory of ours.
    let ret = unsafe { syscall6(libc::SYS_mmap as usize, 0, len, prot, flags, usize::MAX, 0) };
    if (-4095..0).contains(&ret) {
        return Err(io::Error::from_raw_os_error(-ret as i32));
    }
    Ok(ret as *mut u8)
}

/// Unmaps what [`map`] mapped.
///
/// # Safety
/// `address` and `len` must be one mapping made by [`map`], no longer used.
pub unsafe fn unmap(address: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: the caller hands over a whole mapping of ours.
    let ret = unsafe { syscall6(libc::SYS_munmap as usize, address as usize, len, 0, 0, 0, 0) };
    if ret < 0 {
        return Err(io::Error::from_raw_os_error(-ret as i32));
    }
    Ok(())
}

/// The system call instruction itself, so that the caller's frame is the
/// innermost one a stack walk sees.
///
/// # Safety
/// The arguments must make a system call that is safe to make.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn syscall6(nr: usize, a: usize, b: usize, c: usize, d: usize, e: usize, f: usize) -> isize {
    let ret: isize;
    // SAFETY: the kernel's x86-64 system call convention; it clobbers
    // rcx and r11 only.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a, in("rsi") b, in("rdx") c, in("r10") d, in("r8") e, in("r9") f,
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

#[cfg(target_arch = "aarch64")]
#[inline(always)]
unsafe fn syscall6(nr: usize, a: usize, b: usize, c: usize, d: usize, e: usize, f: usize) -> isize {
    let ret: isize;
    // SAFETY: the kernel's arm64 system call convention.
    unsafe {
        std::arch::asm!(
            "svc 0",
            in("x8") nr,
            inlateout("x0") a as isize => ret,
            in("x1") b, in("x2") c, in("x3") d, in("x4") e, in("x5") f,
            options(nostack),
        );
    }
    ret
}

/// The global allocator: large blocks are mappings of their own (see the
/// module docs), the rest come from the system allocator.
pub struct Allocator;

fn mapped(layout: &Layout) -> bool {
    layout.size() >= LARGE && layout.align() <= PAGE
}

// SAFETY: large blocks are whole fresh mappings, page aligned (which meets
// any alignment up to a page) and zeroed; they are returned exactly once.
// Everything else is the system allocator's.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if mapped(&layout) {
            return map(layout.size()).unwrap_or(ptr::null_mut());
        }
        // SAFETY: the caller's layout contract passes through.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if mapped(&layout) {
            // Fresh anonymous memory reads as zero.
            return map(layout.size()).unwrap_or(ptr::null_mut());
        }
        // SAFETY: as for alloc.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        if mapped(&layout) {
            // SAFETY: a large block is one mapping of exactly this size.
            // Failing to unmap leaks it; an allocator cannot report that.
            let _ = unsafe { unmap(block, layout.size()) };
            return;
        }
        // SAFETY: as for alloc.
        unsafe { System.dealloc(block, layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapping_is_usable_and_unmapped() {
        let len = 3 * PAGE;
        let block = map(len).unwrap();
        // SAFETY: the mapping is ours and `len` long.
        unsafe {
            block.add(len - 1).write(7);
            assert_eq!(block.add(len - 1).read(), 7);
            assert_eq!(block.read(), 0, "fresh mappings read as zero");
            unmap(block, len).unwrap();
        }
    }

    #[test]
    fn kernel_errors_come_back_as_errors() {
        // A zero-length mapping is EINVAL.
        assert_eq!(map(0).unwrap_err().raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn large_blocks_round_trip_through_the_allocator() {
        let mut table: Vec<u64> = Vec::with_capacity(LARGE / 8 * 3);
        table.extend(0..(LARGE as u64 / 8 * 3));
        assert_eq!(table.iter().next_back(), Some(&(LARGE as u64 / 8 * 3 - 1)));
        assert!(mapped(&Layout::array::<u64>(table.capacity()).unwrap()));
        drop(table);
        let small: Box<[u8]> = Box::new([1u8; 16]);
        assert!(!mapped(&Layout::for_value(&*small)));
    }
}
