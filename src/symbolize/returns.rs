//! Whether an address a frame-pointer walk found is one a frame returns
//! to: a call right before it, or the signal trampoline at it. The kernel
//! walks `rbp` without asking, and in code built without frame pointers
//! `rbp` holds anything, code addresses included.
//!
//! The code is read from the file the process maps there, which no freeze
//! of the process holds up. Code without a file (JIT code, the vDSO) is
//! read from the process's memory, which takes its mmap_lock, as reading
//! its maps already does here.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::process_map::ProcessMap;
use crate::unwind::{self, Memory, ProcessMemory};

/// Reads the code around addresses of one process, through `map` (read
/// for this batch), opening each file and the memory once.
pub(super) struct ReturnSites<'a> {
    pid: u32,
    map: &'a ProcessMap,
    /// By the mapping's start.
    files: HashMap<u64, Option<File>>,
    memory: Option<Option<ProcessMemory>>,
}

impl<'a> ReturnSites<'a> {
    pub fn new(pid: u32, map: &'a ProcessMap) -> Self {
        ReturnSites {
            pid,
            map,
            files: HashMap::new(),
            memory: None,
        }
    }

    /// Whether `address` is confirmed as a return address. One whose code
    /// cannot be read (its file gone, the process gone) is not.
    pub fn confirm(&mut self, address: u64) -> bool {
        let Some(mapping) = address.checked_sub(1).and_then(|byte| self.map.code(byte)) else {
            return false;
        };
        let (before, after) = unwind::return_site_reach(address, mapping.start, mapping.end);
        let first = address - u64::from(before);
        let mut code = vec![0; usize::from(before) + usize::from(after)];
        let pid = self.pid;
        let read = if mapping.is_file() {
            self.files
                .entry(mapping.start)
                .or_insert_with(|| mapping.open(pid).ok())
                .as_ref()
                .is_some_and(|file| {
                    let offset = mapping.offset + (first - mapping.start);
                    file.read_exact_at(&mut code, offset).is_ok()
                })
        } else {
            self.memory
                .get_or_insert_with(|| ProcessMemory::open(pid).ok())
                .as_ref()
                .is_some_and(|memory| memory.read_code(first, &mut code))
        };
        let (before, after) = code.split_at(usize::from(before));
        read && unwind::is_return_site(before, after)
    }
}
