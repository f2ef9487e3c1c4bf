//! Unwind tables per module: loaded once per file (by build id, so every
//! process mapping the same library shares them), kept within a byte
//! budget, least recently used first out.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::sync::Arc;

use framehop::x86_64::UnwinderX86_64;
use framehop::{ExplicitModuleSectionInfo, Module, Unwinder as _};
use gimli::{
    BaseAddresses, CieOrFde, DebugFrame, EhFrame, EhFrameHdr, LittleEndian, UnwindSection,
};

use super::elf::{Elf, Image, Section};
use crate::process_map::{Mapping, ProcessMap};

/// Which file a table was loaded from, for processes that map it later.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileId {
    device: String,
    inode: u64,
    path: String,
}

/// A table is shared by every file with its build id; a file without one
/// is its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum TableKey {
    BuildId(Vec<u8>),
    File(FileId),
    /// The kernel's vDSO, the same image in every 64-bit process.
    Vdso,
}

type Bytes = Arc<[u8]>;

/// What is known about unwinding through one module.
pub(super) struct Table {
    elf: Elf,
    image: Image,
    /// framehop's view of the module's `.eh_frame` (or `.debug_frame`), in
    /// the file's own address space; `None` when it has neither.
    dwarf: Option<UnwinderX86_64<Bytes>>,
    /// Which file addresses the tables describe. framehop walks frame
    /// pointers where a table has no entry, which in code built without
    /// them yields garbage: such an address ends the stack instead.
    coverage: Coverage,
    bytes: u64,
    last_used: u64,
}

/// How to tell whether the tables describe an address.
enum Coverage {
    /// `.eh_frame_hdr`'s sorted table, searched on demand: nothing to
    /// build at load time.
    Indexed {
        eh_frame: Section,
        eh_frame_hdr: Section,
        bases: BaseAddresses,
    },
    /// The ranges of every entry, sorted and merged (no index to search).
    Ranges(Vec<Range<u64>>),
}

impl Coverage {
    fn of(elf: &Elf) -> Coverage {
        if let (Some(eh_frame), Some(eh_frame_hdr)) = (&elf.eh_frame, &elf.eh_frame_hdr) {
            let mut bases = BaseAddresses::default()
                .set_eh_frame(eh_frame.address.start)
                .set_eh_frame_hdr(eh_frame_hdr.address.start);
            if let Some(text) = &elf.text {
                bases = bases.set_text(text.start);
            }
            let header = EhFrameHdr::new(&eh_frame_hdr.bytes, LittleEndian);
            if header
                .parse(&bases, 8)
                .is_ok_and(|parsed| parsed.table().is_some())
            {
                return Coverage::Indexed {
                    eh_frame: eh_frame.clone(),
                    eh_frame_hdr: eh_frame_hdr.clone(),
                    bases,
                };
            }
        }
        Coverage::Ranges(ranges(elf))
    }

    fn covers(&self, address: u64) -> bool {
        match self {
            Coverage::Indexed {
                eh_frame,
                eh_frame_hdr,
                bases,
            } => {
                let header = EhFrameHdr::new(&eh_frame_hdr.bytes, LittleEndian);
                let Ok(parsed) = header.parse(bases, 8) else {
                    return false;
                };
                let Some(table) = parsed.table() else {
                    return false;
                };
                let section = EhFrame::new(&eh_frame.bytes, LittleEndian);
                table
                    .fde_for_address(&section, bases, address, |section, bases, offset| {
                        section.cie_from_offset(bases, offset)
                    })
                    .is_ok()
            }
            Coverage::Ranges(ranges) => {
                let after = ranges.partition_point(|range| range.start <= address);
                after
                    .checked_sub(1)
                    .is_some_and(|index| ranges[index].contains(&address))
            }
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Coverage::Ranges(ranges) if ranges.is_empty())
    }

    fn bytes(&self) -> u64 {
        match self {
            Coverage::Indexed { .. } => 0,
            Coverage::Ranges(ranges) => (ranges.len() * std::mem::size_of::<Range<u64>>()) as u64,
        }
    }
}

impl Table {
    fn load(name: String, image: Image) -> Option<Table> {
        let elf = Elf::read(&image)?;
        let code = 0..elf.code_end();
        let coverage = Coverage::of(&elf);
        let bytes = [&elf.eh_frame, &elf.eh_frame_hdr, &elf.debug_frame]
            .iter()
            .filter_map(|section| section.as_ref())
            .map(|section| section.bytes.len() as u64)
            .sum::<u64>()
            + coverage.bytes();
        let dwarf = (!coverage.is_empty()).then(|| {
            let bytes_of = |section: &Option<Section>| section.as_ref().map(|s| s.bytes.clone());
            let range_of = |section: &Option<Section>| section.as_ref().map(|s| s.address.clone());
            let section_info = ExplicitModuleSectionInfo {
                base_svma: 0,
                text_svma: elf.text.clone(),
                eh_frame_svma: range_of(&elf.eh_frame),
                eh_frame: bytes_of(&elf.eh_frame),
                eh_frame_hdr_svma: range_of(&elf.eh_frame_hdr),
                eh_frame_hdr: bytes_of(&elf.eh_frame_hdr),
                debug_frame: bytes_of(&elf.debug_frame),
                ..ExplicitModuleSectionInfo::default()
            };
            let mut unwinder = UnwinderX86_64::new();
            unwinder.add_module(Module::new(name, code, 0, section_info));
            unwinder
        });
        Some(Table {
            elf,
            image,
            dwarf,
            coverage,
            bytes,
            last_used: 0,
        })
    }

    /// framehop's unwinder for the module, if the tables describe the file
    /// address `address`.
    pub fn dwarf_for(&self, address: u64) -> Option<&UnwinderX86_64<Bytes>> {
        let dwarf = self.dwarf.as_ref()?;
        self.coverage.covers(address).then_some(dwarf)
    }

    /// Whether the module has unwind tables at all.
    pub fn has_tables(&self) -> bool {
        self.dwarf.is_some()
    }

    /// What to subtract from a process address in `mapping` to get the
    /// file address.
    pub fn bias(&self, mapping: &Mapping) -> Option<u64> {
        let vaddr = self.elf.vaddr_of_offset(mapping.offset)?;
        Some(mapping.start.wrapping_sub(vaddr))
    }

    /// The module's code bytes at a file address.
    pub fn code(&self, vaddr: u64, length: usize) -> Option<Vec<u8>> {
        self.image.read(self.elf.offset_of_vaddr(vaddr)?, length)
    }
}

/// The file address ranges `.eh_frame` (else `.debug_frame`) describes.
fn ranges(elf: &Elf) -> Vec<Range<u64>> {
    let mut ranges = Vec::new();
    if let Some(eh_frame) = &elf.eh_frame {
        let mut bases = BaseAddresses::default().set_eh_frame(eh_frame.address.start);
        if let Some(text) = &elf.text {
            bases = bases.set_text(text.start);
        }
        if let Some(hdr) = &elf.eh_frame_hdr {
            bases = bases.set_eh_frame_hdr(hdr.address.start);
        }
        let section = EhFrame::new(&eh_frame.bytes, LittleEndian);
        collect_ranges(&section, &bases, &mut ranges);
    } else if let Some(debug_frame) = &elf.debug_frame {
        let mut section = DebugFrame::new(&debug_frame.bytes, LittleEndian);
        section.set_address_size(8);
        collect_ranges(&section, &BaseAddresses::default(), &mut ranges);
    }
    ranges.sort_by_key(|range| range.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match merged.last_mut() {
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => merged.push(range),
        }
    }
    merged
}

fn collect_ranges<'a, S>(section: &S, bases: &BaseAddresses, ranges: &mut Vec<Range<u64>>)
where
    S: UnwindSection<gimli::EndianSlice<'a, LittleEndian>>,
{
    let mut entries = section.entries(bases);
    // A malformed entry ends the list: what was read so far still holds.
    while let Ok(Some(entry)) = entries.next() {
        if let CieOrFde::Fde(partial) = entry {
            if let Ok(fde) =
                partial.parse(|section, bases, offset| section.cie_from_offset(bases, offset))
            {
                let start = fde.initial_address();
                ranges.push(start..start.saturating_add(fde.len()));
            }
        }
    }
}

/// What the tables say about one mapping of a process.
pub(super) enum Lookup<'a> {
    Module(&'a Table, u64),
    /// Code with no file (JIT): no tables.
    Anonymous,
    /// The file could not be read (gone, not ELF): nothing to unwind by.
    Unreadable,
}

/// The loaded tables, within a byte budget.
pub(super) struct Tables {
    tables: HashMap<TableKey, Table>,
    files: HashMap<FileId, TableKey>,
    bytes: u64,
    budget: u64,
    clock: u64,
}

impl Tables {
    pub fn new(budget: u64) -> Self {
        Tables {
            tables: HashMap::new(),
            files: HashMap::new(),
            bytes: 0,
            budget,
            clock: 0,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.tables.len()
    }

    /// The table of the module `mapping` belongs to in process `pid`,
    /// loaded on first use, and the mapping's bias.
    pub fn lookup(&mut self, pid: u32, mapping: &Mapping) -> Lookup<'_> {
        self.clock += 1;
        let key = if mapping.path.as_deref() == Some("[vdso]") {
            self.vdso(mapping)
        } else if mapping.is_file() {
            self.file(pid, mapping)
        } else if mapping.is_anonymous_code() {
            return Lookup::Anonymous;
        } else {
            None
        };
        let Some(key) = key else {
            return Lookup::Unreadable;
        };
        let clock = self.clock;
        match self.tables.get_mut(&key) {
            Some(table) => {
                table.last_used = clock;
                match table.bias(mapping) {
                    Some(bias) => Lookup::Module(table, bias),
                    None => Lookup::Unreadable,
                }
            }
            None => Lookup::Unreadable,
        }
    }

    fn file(&mut self, pid: u32, mapping: &Mapping) -> Option<TableKey> {
        let path = mapping.path.clone()?;
        let id = FileId {
            device: mapping.device.clone(),
            inode: mapping.inode,
            path,
        };
        if let Some(key) = self.files.get(&id) {
            if self.tables.contains_key(key) {
                return Some(key.clone());
            }
        }
        // map_files names the very file mapped, even if it was replaced on
        // disk since or lives in another mount namespace.
        let file = File::open(format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            mapping.start, mapping.end
        ))
        .or_else(|_| File::open(format!("/proc/{pid}/root{}", id.path)))
        .ok()?;
        let table = Table::load(id.path.clone(), Image::File(file))?;
        let key = match &table.elf.build_id {
            Some(build_id) => TableKey::BuildId(build_id.clone()),
            None => TableKey::File(id.clone()),
        };
        self.files.insert(id, key.clone());
        self.insert(key.clone(), table);
        Some(key)
    }

    /// Every 64-bit process maps the kernel's one vDSO image, ours
    /// included: its tables are read from our own, which no freeze of the
    /// target can hold up.
    fn vdso(&mut self, mapping: &Mapping) -> Option<TableKey> {
        if !self.tables.contains_key(&TableKey::Vdso) {
            let table = Table::load("[vdso]".into(), Image::Bytes(own_vdso()?))?;
            self.insert(TableKey::Vdso, table);
        }
        let table = &self.tables[&TableKey::Vdso];
        let length = match &table.image {
            Image::Bytes(bytes) => bytes.len() as u64,
            Image::File(_) => 0,
        };
        (mapping.end - mapping.start == length).then_some(TableKey::Vdso)
    }

    fn insert(&mut self, key: TableKey, mut table: Table) {
        table.last_used = self.clock;
        self.bytes += table.bytes;
        if let Some(old) = self.tables.insert(key, table) {
            self.bytes -= old.bytes;
        }
        while self.bytes > self.budget && self.tables.len() > 1 {
            let Some(oldest) = self
                .tables
                .iter()
                .min_by_key(|(_, table)| table.last_used)
                .map(|(key, _)| key.clone())
            else {
                break;
            };
            if let Some(evicted) = self.tables.remove(&oldest) {
                self.bytes -= evicted.bytes;
            }
            self.files.retain(|_, key| *key != oldest);
        }
    }
}

/// Our own vDSO's bytes.
fn own_vdso() -> Option<Vec<u8>> {
    let map = ProcessMap::read(std::process::id()).ok()?;
    let vdso = map
        .mappings()
        .iter()
        .find(|mapping| mapping.path.as_deref() == Some("[vdso]"))?;
    let memory = File::open("/proc/self/mem").ok()?;
    let mut bytes = vec![0; usize::try_from(vdso.end - vdso.start).ok()?];
    std::os::unix::fs::FileExt::read_exact_at(&memory, &mut bytes, vdso.start).ok()?;
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_mapping_of(address: u64) -> Mapping {
        ProcessMap::read(std::process::id())
            .unwrap()
            .code(address)
            .cloned()
            .unwrap()
    }

    #[test]
    fn our_own_code_is_covered_and_shared_by_build_id() {
        let here = our_own_code_is_covered_and_shared_by_build_id as *const () as u64;
        let mapping = own_mapping_of(here);
        let mut tables = Tables::new(u64::MAX);
        let Lookup::Module(table, bias) = tables.lookup(std::process::id(), &mapping) else {
            panic!("our executable has tables");
        };
        assert!(table.dwarf_for(here - bias).is_some());
        assert!(table.dwarf_for(u64::MAX - 1).is_none());
        let bytes = tables.bytes();
        assert!(bytes > 0);
        // Another process mapping the same file (our parent would not;
        // the same mapping seen again stands for it) adds nothing.
        tables.lookup(1, &mapping);
        assert_eq!((tables.bytes(), tables.len()), (bytes, 1));
    }

    #[test]
    fn the_vdso_has_tables_read_from_memory() {
        let map = ProcessMap::read(std::process::id()).unwrap();
        let Some(vdso) = map
            .mappings()
            .iter()
            .find(|mapping| mapping.path.as_deref() == Some("[vdso]"))
        else {
            return; // booted with vdso=0: nothing to test
        };
        let mut tables = Tables::new(u64::MAX);
        let Lookup::Module(table, bias) = tables.lookup(std::process::id(), vdso) else {
            panic!("the vDSO's tables load from memory");
        };
        assert!(table.has_tables());
        let text = table.elf.text.clone().unwrap();
        assert!(table.dwarf_for(text.start).is_some());
        assert_eq!(
            bias.wrapping_add(table.elf.vaddr_of_offset(0).unwrap()),
            vdso.start
        );
    }

    #[test]
    fn the_budget_evicts_the_least_recently_used() {
        let here = the_budget_evicts_the_least_recently_used as *const () as u64;
        let ours = own_mapping_of(here);
        let libc = own_mapping_of(libc::getpid as *const () as u64);
        assert_ne!(ours.path, libc.path);
        let mut tables = Tables::new(1);
        tables.lookup(std::process::id(), &ours);
        tables.lookup(std::process::id(), &libc);
        assert_eq!(tables.len(), 1, "only one table fits");
        assert!(matches!(
            tables.lookup(std::process::id(), &libc),
            Lookup::Module(..)
        ));
        assert!(tables.files.len() == 1);
    }

    #[test]
    fn anonymous_code_and_data_have_no_tables() {
        let jit = Mapping {
            start: 0x1000,
            end: 0x2000,
            offset: 0,
            executable: true,
            device: "00:00".into(),
            inode: 0,
            path: None,
        };
        let mut tables = Tables::new(u64::MAX);
        assert!(matches!(tables.lookup(1, &jit), Lookup::Anonymous));
        let gone = Mapping {
            path: Some("/nonexistent/lib.so".into()),
            inode: 7,
            ..jit
        };
        assert!(matches!(tables.lookup(u32::MAX, &gone), Lookup::Unreadable));
    }
}
