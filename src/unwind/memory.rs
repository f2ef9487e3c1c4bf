//! Where the unwinder reads a stopped thread's stack from.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// A stopped thread's memory, as the unwinder reads it.
pub trait Memory {
    /// Fills `buffer` from `address`; false if any of it is unreadable.
    fn read(&self, address: u64, buffer: &mut [u8]) -> bool;

    /// Fills `buffer` with code of an executable mapping that has no file
    /// (JIT code), read to confirm the call before a return address. The
    /// same memory as [`Memory::read`] unless a memory holds stack only.
    fn read_code(&self, address: u64, buffer: &mut [u8]) -> bool {
        self.read(address, buffer)
    }
}

/// A process's memory through `/proc/PID/mem`, read a page at a time and
/// kept for the life of this value: make one per stack, so nothing read
/// outlives the stop it was read in.
///
/// Every read takes the target's mmap_read_lock, which blocks while a
/// writer holds or waits for it: read only from a thread allowed to hang
/// (the stack walker's).
pub struct ProcessMemory {
    file: File,
    pages: RefCell<HashMap<u64, Option<Box<[u8]>>>>,
}

const PAGE: u64 = 4096;
/// Pages kept per stack: a deeper stack is read straight through.
const MAX_PAGES: usize = 64;

impl ProcessMemory {
    pub fn open(pid: u32) -> io::Result<Self> {
        Ok(ProcessMemory {
            file: File::open(format!("/proc/{pid}/mem"))?,
            pages: RefCell::new(HashMap::new()),
        })
    }
}

impl Memory for ProcessMemory {
    fn read(&self, address: u64, buffer: &mut [u8]) -> bool {
        let mut pages = self.pages.borrow_mut();
        let mut filled = 0;
        while filled < buffer.len() {
            let Some(at) = address.checked_add(filled as u64) else {
                return false;
            };
            let page = at - at % PAGE;
            let within = (at - page) as usize;
            let wanted = (buffer.len() - filled).min(PAGE as usize - within);
            let target = &mut buffer[filled..filled + wanted];
            if !pages.contains_key(&page) && pages.len() >= MAX_PAGES {
                if self.file.read_exact_at(target, at).is_err() {
                    return false;
                }
            } else {
                let bytes = pages.entry(page).or_insert_with(|| {
                    let mut bytes = vec![0; PAGE as usize].into_boxed_slice();
                    self.file
                        .read_exact_at(&mut bytes, page)
                        .ok()
                        .map(|()| bytes)
                });
                let Some(bytes) = bytes else {
                    return false;
                };
                target.copy_from_slice(&bytes[within..within + wanted]);
            }
            filled += wanted;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_across_pages_and_refuses_what_is_not_mapped() {
        let data: Vec<u8> = (0..3 * PAGE).map(|index| (index % 251) as u8).collect();
        let memory = ProcessMemory::open(std::process::id()).unwrap();
        let start = data.as_ptr() as u64 + PAGE - 3;
        let mut buffer = [0u8; 10];
        assert!(memory.read(start, &mut buffer));
        assert_eq!(&buffer[..], &data[(PAGE - 3) as usize..(PAGE + 7) as usize]);
        assert!(!memory.read(8, &mut buffer), "page zero is never mapped");
    }
}
