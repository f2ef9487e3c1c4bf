//! Unwind tables per module: loaded once per file (by build id, so every
//! process mapping the same library shares them), kept within a byte
//! budget, least recently used first out.

use foldhash::HashMap;
use std::fs::File;
use std::ops::Range;
use std::sync::Arc;

use framehop::x86_64::UnwinderX86_64;
use framehop::{ExplicitModuleSectionInfo, Unwinder as _};
use gimli::{
    BaseAddresses, CieOrFde, DebugFrame, EhFrame, EhFrameHdr, LittleEndian, UnwindSection,
};

use super::elf::{Elf, Image, Section};
use super::Confirmed;
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
    /// Answers about file addresses already asked about. Blocked threads
    /// of a process wait in the same few places cut after cut; the file's
    /// bytes do not change under a table, so neither do the answers.
    covered: Memo<u64, bool>,
    returns: Memo<ReturnSite, Option<Confirmed>>,
    /// The tables' bytes, without the memos'.
    bytes: u64,
    last_used: u64,
}

/// A return address to confirm, as a file address, with how many code
/// bytes the mapping holds before it (at most a call's length) and after
/// it (at most the signal trampoline's): the answer depends on both.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct ReturnSite {
    pub vaddr: u64,
    pub before: u8,
    pub after: u8,
}

/// Answers kept per table, at most [`MEMO_ENTRIES`]; when full it starts
/// over (the places threads wait in are soon asked about again).
struct Memo<K, V> {
    answers: HashMap<K, V>,
}

/// A few thousand places threads wait in per module: about 100 KiB at most
/// for both memos of a table.
const MEMO_ENTRIES: usize = 2048;

impl<K: std::hash::Hash + Eq, V: Copy> Memo<K, V> {
    fn new() -> Self {
        Memo {
            answers: HashMap::default(),
        }
    }

    fn get(&self, key: &K) -> Option<V> {
        self.answers.get(key).copied()
    }

    fn insert(&mut self, key: K, value: V) {
        if self.answers.len() >= MEMO_ENTRIES {
            self.answers.clear();
        }
        self.answers.insert(key, value);
    }

    /// What the memo takes, counting the hash table's own overhead.
    fn bytes(&self) -> u64 {
        (self.answers.capacity() * (std::mem::size_of::<(K, V)>() + 1)) as u64
    }
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
            unwinder.add_module(framehop::Module::new(name, code, 0, section_info));
            unwinder
        });
        Some(Table {
            elf,
            image,
            dwarf,
            coverage,
            covered: Memo::new(),
            returns: Memo::new(),
            bytes,
            last_used: 0,
        })
    }

    fn total_bytes(&self) -> u64 {
        self.bytes + self.covered.bytes() + self.returns.bytes()
    }

    /// What to subtract from a process address in `mapping` to get the
    /// file address.
    fn bias(&self, mapping: &Mapping) -> Option<u64> {
        let vaddr = self.elf.vaddr_of_offset(mapping.offset)?;
        Some(mapping.start.wrapping_sub(vaddr))
    }

    /// The module's code bytes at a file address.
    fn code(&self, vaddr: u64, length: usize) -> Option<Vec<u8>> {
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

/// A loaded table, as long as it stays loaded: ids are not reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct TableId(u64);

/// What the tables say about one mapping of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Module {
    /// The module's table, and what to subtract from a process address in
    /// the mapping to get the file address.
    Table(TableId, u64),
    /// Code with no file (JIT): no tables.
    Anonymous,
    /// The file could not be read (gone, not ELF): nothing to unwind by.
    Unreadable,
}

/// How to step up from a file address of a module.
pub(super) enum Rules<'a> {
    Dwarf(&'a UnwinderX86_64<Bytes>),
    /// The tables do not describe it (or there are none).
    NoTable,
}

/// The loaded tables, within a byte budget.
pub(super) struct Tables {
    tables: HashMap<TableId, Table>,
    ids: HashMap<TableKey, TableId>,
    files: HashMap<FileId, TableId>,
    next_id: u64,
    bytes: u64,
    budget: u64,
    clock: u64,
}

impl Tables {
    pub fn new(budget: u64) -> Self {
        Tables {
            tables: HashMap::default(),
            ids: HashMap::default(),
            files: HashMap::default(),
            next_id: 0,
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

    /// Whether the table is (still) loaded.
    pub fn contains(&self, id: TableId) -> bool {
        self.tables.contains_key(&id)
    }

    /// The module `mapping` belongs to in process `pid`, its table loaded
    /// on first use.
    pub fn module(&mut self, pid: u32, mapping: &Mapping) -> Module {
        let id = if mapping.path.as_deref() == Some("[vdso]") {
            self.vdso(mapping)
        } else if mapping.is_file() {
            self.file(pid, mapping)
        } else if mapping.is_anonymous_code() {
            return Module::Anonymous;
        } else {
            None
        };
        let Some(id) = id else {
            return Module::Unreadable;
        };
        match self.tables.get(&id).and_then(|table| table.bias(mapping)) {
            Some(bias) => Module::Table(id, bias),
            None => Module::Unreadable,
        }
    }

    /// How to step up from the file address `vaddr`; `None` if the table
    /// is no longer loaded.
    pub fn rules(&mut self, id: TableId, vaddr: u64) -> Option<Rules<'_>> {
        let table = self.used(id)?;
        let covered = match table.covered.get(&vaddr) {
            Some(covered) => covered,
            None => {
                let covered = table.coverage.covers(vaddr);
                self.remember(id, |table| table.covered.insert(vaddr, covered));
                covered
            }
        };
        let table = &self.tables[&id];
        Some(match (&table.dwarf, covered) {
            (Some(dwarf), true) => Rules::Dwarf(dwarf),
            _ => Rules::NoTable,
        })
    }

    /// How the code around a return address confirms it, judged by
    /// `judge` on the bytes before and after it; `None` if it does not or
    /// the bytes cannot be read.
    pub fn confirm(
        &mut self,
        id: TableId,
        site: ReturnSite,
        judge: impl FnOnce(&[u8], &[u8]) -> Option<Confirmed>,
    ) -> Option<Confirmed> {
        let table = self.used(id)?;
        if let Some(confirmed) = table.returns.get(&site) {
            return confirmed;
        }
        let start = site.vaddr.checked_sub(u64::from(site.before))?;
        let code = table.code(start, usize::from(site.before) + usize::from(site.after))?;
        let (before, after) = code.split_at(usize::from(site.before));
        let confirmed = judge(before, after);
        // A read that failed is not remembered: it may succeed next time.
        self.remember(id, |table| table.returns.insert(site, confirmed));
        confirmed
    }

    /// Adds an answer to a table's memos, its bytes counted with the rest.
    fn remember(&mut self, id: TableId, add: impl FnOnce(&mut Table)) {
        if let Some(table) = self.tables.get_mut(&id) {
            let before = table.total_bytes();
            add(table);
            self.bytes = self.bytes + table.total_bytes() - before;
        }
    }

    fn used(&mut self, id: TableId) -> Option<&mut Table> {
        self.clock += 1;
        let table = self.tables.get_mut(&id)?;
        table.last_used = self.clock;
        Some(table)
    }

    fn file(&mut self, pid: u32, mapping: &Mapping) -> Option<TableId> {
        let path = mapping.path.clone()?;
        let file_id = FileId {
            device: mapping.device.clone(),
            inode: mapping.inode,
            path,
        };
        if let Some(&id) = self.files.get(&file_id) {
            if self.tables.contains_key(&id) {
                return Some(id);
            }
        }
        let file = mapping.open(pid).ok()?;
        let key = |table: &Table| match &table.elf.build_id {
            Some(build_id) => TableKey::BuildId(build_id.clone()),
            None => TableKey::File(file_id.clone()),
        };
        let table = Table::load(file_id.path.clone(), Image::File(file))?;
        let key = key(&table);
        // Another file with the same build id has its table loaded already.
        let id = match self.ids.get(&key) {
            Some(&id) if self.tables.contains_key(&id) => id,
            _ => self.insert(key, table),
        };
        self.files.insert(file_id, id);
        Some(id)
    }

    /// Every 64-bit process maps the kernel's one vDSO image, ours
    /// included: its tables are read from our own, which no freeze of the
    /// target can hold up.
    fn vdso(&mut self, mapping: &Mapping) -> Option<TableId> {
        let id = match self.ids.get(&TableKey::Vdso) {
            Some(&id) if self.tables.contains_key(&id) => id,
            _ => {
                let table = Table::load("[vdso]".into(), Image::Bytes(own_vdso()?))?;
                self.insert(TableKey::Vdso, table)
            }
        };
        let length = match &self.tables.get(&id)?.image {
            Image::Bytes(bytes) => bytes.len() as u64,
            Image::File(_) => 0,
        };
        (mapping.end - mapping.start == length).then_some(id)
    }

    fn insert(&mut self, key: TableKey, mut table: Table) -> TableId {
        self.clock += 1;
        table.last_used = self.clock;
        let id = TableId(self.next_id);
        self.next_id += 1;
        self.bytes += table.total_bytes();
        self.tables.insert(id, table);
        if let Some(old) = self.ids.insert(key, id) {
            self.evict(old);
        }
        while self.bytes > self.budget && self.tables.len() > 1 {
            let Some(oldest) = self
                .tables
                .iter()
                .min_by_key(|(_, table)| table.last_used)
                .map(|(id, _)| *id)
            else {
                break;
            };
            self.evict(oldest);
        }
        id
    }

    fn evict(&mut self, id: TableId) {
        if let Some(evicted) = self.tables.remove(&id) {
            self.bytes -= evicted.total_bytes();
        }
        self.ids.retain(|_, kept| *kept != id);
        self.files.retain(|_, kept| *kept != id);
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

    fn loaded(tables: &mut Tables, pid: u32, mapping: &Mapping) -> (TableId, u64) {
        match tables.module(pid, mapping) {
            Module::Table(id, bias) => (id, bias),
            other => panic!("{mapping:?} has tables, not {other:?}"),
        }
    }

    #[test]
    fn our_own_code_is_covered_and_shared_by_build_id() {
        let here = our_own_code_is_covered_and_shared_by_build_id as *const () as u64;
        let mapping = own_mapping_of(here);
        let mut tables = Tables::new(u64::MAX);
        let (id, bias) = loaded(&mut tables, std::process::id(), &mapping);
        assert!(matches!(
            tables.rules(id, here - bias),
            Some(Rules::Dwarf(_))
        ));
        assert!(matches!(
            tables.rules(id, u64::MAX - 1),
            Some(Rules::NoTable)
        ));
        let bytes = tables.bytes();
        assert!(bytes > 0);
        // Another process mapping the same file (our parent would not;
        // the same mapping seen again stands for it) adds nothing.
        assert_eq!(loaded(&mut tables, 1, &mapping), (id, bias));
        assert_eq!((tables.bytes(), tables.len()), (bytes, 1));
    }

    #[test]
    fn answers_are_remembered_within_the_budget() {
        let here = answers_are_remembered_within_the_budget as *const () as u64;
        let mut tables = Tables::new(u64::MAX);
        let (id, bias) = loaded(&mut tables, std::process::id(), &own_mapping_of(here));
        let bytes = tables.bytes();
        let site = ReturnSite {
            vaddr: here - bias + 1,
            before: 1,
            after: 2,
        };
        let mut judged = Vec::new();
        let mut judge = |before: &[u8], after: &[u8]| {
            judged.push((before.len(), after.len()));
            Some(Confirmed::Call)
        };
        assert_eq!(tables.confirm(id, site, &mut judge), Some(Confirmed::Call));
        assert!(tables.bytes() > bytes, "the memo counts in the budget");
        assert_eq!(tables.confirm(id, site, &mut judge), Some(Confirmed::Call));
        assert_eq!(judged, vec![(1, 2)], "judged once, then remembered");
        let unreadable = ReturnSite {
            vaddr: u64::MAX - 4,
            ..site
        };
        assert_eq!(
            tables.confirm(id, unreadable, |_, _| Some(Confirmed::Call)),
            None
        );

        let mut memo = Memo::new();
        for key in 0..=MEMO_ENTRIES as u64 {
            memo.insert(key, true);
        }
        assert_eq!(memo.get(&(MEMO_ENTRIES as u64)), Some(true));
        assert!(memo.answers.len() <= MEMO_ENTRIES);
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
        let (id, bias) = loaded(&mut tables, std::process::id(), vdso);
        let text = tables.tables[&id].elf.text.clone().unwrap();
        let vaddr_zero = tables.tables[&id].elf.vaddr_of_offset(0).unwrap();
        assert!(matches!(
            tables.rules(id, text.start),
            Some(Rules::Dwarf(_))
        ));
        assert_eq!(bias.wrapping_add(vaddr_zero), vdso.start);
    }

    #[test]
    fn the_budget_evicts_the_least_recently_used() {
        let here = the_budget_evicts_the_least_recently_used as *const () as u64;
        let ours = own_mapping_of(here);
        let libc = own_mapping_of(libc::getpid as *const () as u64);
        assert_ne!(ours.path, libc.path);
        let mut tables = Tables::new(1);
        let (our_id, _) = loaded(&mut tables, std::process::id(), &ours);
        let (libc_id, _) = loaded(&mut tables, std::process::id(), &libc);
        assert_eq!(tables.len(), 1, "only one table fits");
        assert!(!tables.contains(our_id) && tables.contains(libc_id));
        assert!(
            tables.rules(our_id, 0).is_none(),
            "an evicted id finds nothing"
        );
        assert_eq!(loaded(&mut tables, std::process::id(), &libc).0, libc_id);
        assert!(tables.files.len() == 1 && tables.ids.len() == 1);
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
        assert_eq!(tables.module(1, &jit), Module::Anonymous);
        let gone = Mapping {
            path: Some("/nonexistent/lib.so".into()),
            inode: 7,
            ..jit
        };
        assert_eq!(tables.module(u32::MAX, &gone), Module::Unreadable);
    }
}
