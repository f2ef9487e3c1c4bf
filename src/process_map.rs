//! What a process has mapped, from `/proc/PID/maps`: which file (or
//! anonymous memory) backs an address, at which offset, and whether it
//! holds code. The symbolizer names frames with it and the unwinder finds
//! the unwind tables and confirms return addresses with it, so both read
//! one process's maps the same way.

use std::fs::{self, File};
use std::io;

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// Offset in the file of `start` (0 for anonymous memory).
    pub offset: u64,
    pub executable: bool,
    /// Device and inode of the file: with the path, they tell one file from
    /// another of the same name (a library replaced on disk).
    pub device: String,
    pub inode: u64,
    /// The file, or the kernel's name (`[vdso]`, `[stack]`, `[heap]`);
    /// `None` for anonymous memory.
    pub path: Option<String>,
}

impl Mapping {
    /// Backed by a file the process mapped (not `[vdso]` and its kind).
    pub fn is_file(&self) -> bool {
        self.inode != 0
            && self
                .path
                .as_deref()
                .is_some_and(|path| path.starts_with('/'))
    }

    /// Code without a file: what JIT compilers emit (and perf maps name).
    pub fn is_anonymous_code(&self) -> bool {
        self.executable && self.path.is_none()
    }

    pub fn contains(&self, address: u64) -> bool {
        (self.start..self.end).contains(&address)
    }

    /// Opens the file mapped here in process `pid`. `map_files` names the
    /// very file mapped, even if it was replaced on disk since or lives in
    /// another mount namespace; the path under the process's root serves
    /// where `map_files` is refused.
    pub fn open(&self, pid: u32) -> io::Result<File> {
        let path = self
            .path
            .as_deref()
            .filter(|_| self.is_file())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no file is mapped here"))?;
        File::open(format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            self.start, self.end
        ))
        .or_else(|_| File::open(format!("/proc/{pid}/root{path}")))
    }
}

/// Which address space a process has, and how many times it has been
/// locked for writing, as the probe last found them (`struct target` in
/// `bpf/offcpu.h`). Every change of a mapping takes that lock, so a map read
/// after a [`AddressSpace::is_settled`] one was found is still whole while
/// the process is found with the same one again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressSpace {
    /// The kernel's `mm_struct` (an exec gives the process another).
    pub id: u64,
    /// `mm->mm_lock_seq`: odd while a writer holds the lock, 0 where the
    /// kernel does not count.
    pub writes: u32,
}

impl AddressSpace {
    /// Known, and no writer at work on it.
    pub fn is_settled(&self) -> bool {
        self.id != 0 && self.writes != 0 && self.writes.is_multiple_of(2)
    }
}

/// A process's mappings, sorted by address (as the kernel lists them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessMap {
    mappings: Vec<Mapping>,
}

impl ProcessMap {
    /// Reads `/proc/PID/maps`. Reading it takes the process's mmap_lock,
    /// like reading its memory does.
    pub fn read(pid: u32) -> io::Result<Self> {
        fs::read_to_string(format!("/proc/{pid}/maps")).map(|maps| Self::parse(&maps))
    }

    /// Reads the executable mappings of `/proc/PID/maps` only, for what
    /// needs code alone (the unwinder, at every cut): the rest of the lines
    /// (thread stacks, heaps, data) are skipped before they are parsed.
    pub fn read_code(pid: u32) -> io::Result<Self> {
        fs::read_to_string(format!("/proc/{pid}/maps")).map(|maps| Self::parse_code(&maps))
    }

    /// Lines that do not parse are left out.
    pub fn parse(maps: &str) -> Self {
        Self::from_lines(maps.lines())
    }

    /// [`ProcessMap::parse`], executable mappings only.
    pub fn parse_code(maps: &str) -> Self {
        Self::from_lines(
            maps.lines()
                .filter(|line| line.split_ascii_whitespace().nth(1).is_some_and(executable)),
        )
    }

    fn from_lines<'a>(lines: impl Iterator<Item = &'a str>) -> Self {
        let mut mappings: Vec<Mapping> = lines.filter_map(parse_mapping).collect();
        mappings.sort_by_key(|mapping| mapping.start);
        ProcessMap { mappings }
    }

    pub fn mappings(&self) -> &[Mapping] {
        &self.mappings
    }

    /// The mapping an address falls in.
    pub fn find(&self, address: u64) -> Option<&Mapping> {
        let after = self
            .mappings
            .partition_point(|mapping| mapping.start <= address);
        let mapping = self.mappings.get(after.checked_sub(1)?)?;
        mapping.contains(address).then_some(mapping)
    }

    /// The mapping of the address if it holds code.
    pub fn code(&self, address: u64) -> Option<&Mapping> {
        self.find(address).filter(|mapping| mapping.executable)
    }
}

/// Whether a line's permissions (`r-xp`) let its mapping run.
fn executable(perms: &str) -> bool {
    perms.as_bytes().get(2) == Some(&b'x')
}

fn parse_mapping(line: &str) -> Option<Mapping> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let device = fields.next()?;
    let inode = fields.next()?;
    let path = fields.collect::<Vec<_>>().join(" ");
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        offset: u64::from_str_radix(offset, 16).ok()?,
        executable: executable(perms),
        device: device.to_string(),
        inode: inode.parse().ok()?,
        path: (!path.is_empty()).then_some(path),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 4242 /opt/app/server
55d0c0a01000-55d0c0a05000 r-xp 00001000 fe:01 4242 /opt/app/server
7f1c2a000000-7f1c2a1b6000 r-xp 00028000 fe:01 1837 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c2b000000-7f1c2b100000 rwxp 00000000 00:00 0
7ffd10000000-7ffd10021000 rw-p 00000000 00:00 0                          [stack]
7ffd10100000-7ffd10102000 r-xp 00000000 00:00 0                          [vdso]
garbage
";

    #[test]
    fn lines_become_mappings_and_garbage_is_left_out() {
        let map = ProcessMap::parse(MAPS);
        assert_eq!(map.mappings().len(), 6);
        assert_eq!(
            map.mappings()[2],
            Mapping {
                start: 0x7f1c_2a00_0000,
                end: 0x7f1c_2a1b_6000,
                offset: 0x28000,
                executable: true,
                device: "fe:01".into(),
                inode: 1837,
                path: Some("/usr/lib/x86_64-linux-gnu/libc.so.6".into()),
            }
        );
        assert_eq!(map.mappings()[4].path.as_deref(), Some("[stack]"));
        assert_eq!(map.mappings()[3].path, None);
    }

    #[test]
    fn reading_code_only_keeps_exactly_the_executable_mappings() {
        let all = ProcessMap::parse(MAPS);
        let code = ProcessMap::parse_code(MAPS);
        let executable: Vec<&Mapping> = all.mappings().iter().filter(|m| m.executable).collect();
        assert_eq!(code.mappings().iter().collect::<Vec<_>>(), executable);
        assert_eq!(code.mappings().len(), 4);
        let here = reading_code_only_keeps_exactly_the_executable_mappings as *const () as u64;
        let ours = ProcessMap::read_code(std::process::id()).unwrap();
        assert!(ours.code(here).is_some());
        assert_eq!(
            ours.code(here),
            ProcessMap::read(std::process::id()).unwrap().code(here)
        );
    }

    #[test]
    fn an_address_finds_its_mapping_and_only_code_counts_as_code() {
        let map = ProcessMap::parse(MAPS);
        let libc = map.find(0x7f1c_2a00_1234).unwrap();
        assert!(libc.is_file() && libc.executable);
        assert!(map.find(0x7f1c_2a1b_6000).is_none(), "end is exclusive");
        assert!(map.find(0x1000).is_none());
        assert!(
            map.code(0x7ffd_1000_0010).is_none(),
            "the stack is not code"
        );
        let jit = map.code(0x7f1c_2b00_0040).unwrap();
        assert!(jit.is_anonymous_code() && !jit.is_file());
        let vdso = map.code(0x7ffd_1010_0100).unwrap();
        assert!(!vdso.is_file() && !vdso.is_anonymous_code());
    }

    #[test]
    fn our_own_maps_hold_our_code() {
        let map = ProcessMap::read(std::process::id()).unwrap();
        let here = our_own_maps_hold_our_code as *const () as u64;
        let mapping = map
            .code(here)
            .expect("this function is in an executable mapping");
        assert!(mapping.is_file());
    }
}
