//! The few parts of an ELF file the unwinder reads: its loadable segments
//! (to place it in a process), its build id (to share it across
//! processes), and the sections holding unwind tables. The only byte
//! parsing of the unwinder; 64-bit little-endian files only, which is what
//! x86-64 processes map.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// Where an ELF image is read from: a file, or bytes already in memory
/// (the vDSO has no file).
pub(super) enum Image {
    File(File),
    Bytes(Vec<u8>),
}

impl Image {
    /// `length` bytes at `offset`; `None` past the end or on a read error.
    pub fn read(&self, offset: u64, length: usize) -> Option<Vec<u8>> {
        match self {
            Image::File(file) => {
                let mut bytes = vec![0; length];
                file.read_exact_at(&mut bytes, offset).ok()?;
                Some(bytes)
            }
            Image::Bytes(bytes) => {
                let start = usize::try_from(offset).ok()?;
                bytes
                    .get(start..start.checked_add(length)?)
                    .map(<[u8]>::to_vec)
            }
        }
    }
}

/// A `PT_LOAD` segment: file bytes at `offset` are mapped at `vaddr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Segment {
    pub offset: u64,
    pub vaddr: u64,
    pub file_size: u64,
    pub executable: bool,
}

/// A section's address in the file's own address space and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Section {
    pub address: Range<u64>,
    /// Shared with framehop, which reads the same bytes.
    pub bytes: Arc<[u8]>,
}

/// What the unwinder keeps of an ELF file.
#[derive(Debug, Default)]
pub(super) struct Elf {
    pub segments: Vec<Segment>,
    pub build_id: Option<Vec<u8>>,
    pub text: Option<Range<u64>>,
    pub eh_frame: Option<Section>,
    pub eh_frame_hdr: Option<Section>,
    pub debug_frame: Option<Section>,
}

/// Section headers bigger than this are not an ELF file we unwind through.
const MAX_SECTIONS: usize = 4096;
/// Unwind sections bigger than this are refused rather than loaded: a
/// table this size (libjvm's `.eh_frame` is ~2 MiB) is not a real one.
const MAX_SECTION_BYTES: u64 = 64 << 20;

/// Segments are mapped in whole pages.
const PAGE: u64 = 4096;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PF_X: u32 = 1;
const NT_GNU_BUILD_ID: u32 = 3;

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

impl Elf {
    /// Reads the headers and the unwind sections; `None` if the image is
    /// not a 64-bit little-endian ELF file or its headers do not parse.
    pub fn read(image: &Image) -> Option<Elf> {
        let header = image.read(0, 64)?;
        if header.get(..6)? != b"\x7fELF\x02\x01" {
            return None;
        }
        let mut elf = Elf {
            segments: Vec::new(),
            ..Elf::default()
        };
        elf.read_segments(image, &header)?;
        elf.read_sections(image, &header)?;
        Some(elf)
    }

    fn read_segments(&mut self, image: &Image, header: &[u8]) -> Option<()> {
        let (offset, entry_size, count) = (
            u64_at(header, 32)?,
            usize::from(u16_at(header, 54)?),
            usize::from(u16_at(header, 56)?),
        );
        if entry_size < 56 {
            return None;
        }
        let table = image.read(offset, entry_size * count)?;
        for entry in table.chunks_exact(entry_size) {
            let (kind, flags) = (u32_at(entry, 0)?, u32_at(entry, 4)?);
            let (offset, vaddr, file_size) =
                (u64_at(entry, 8)?, u64_at(entry, 16)?, u64_at(entry, 32)?);
            match kind {
                PT_LOAD => self.segments.push(Segment {
                    offset,
                    vaddr,
                    file_size,
                    executable: flags & PF_X != 0,
                }),
                PT_NOTE if self.build_id.is_none() && file_size <= 1 << 16 => {
                    let notes = image.read(offset, file_size as usize)?;
                    self.build_id = build_id_in(&notes);
                }
                _ => {}
            }
        }
        Some(())
    }

    fn read_sections(&mut self, image: &Image, header: &[u8]) -> Option<()> {
        let (offset, entry_size, count, names_index) = (
            u64_at(header, 40)?,
            usize::from(u16_at(header, 58)?),
            usize::from(u16_at(header, 60)?),
            usize::from(u16_at(header, 62)?),
        );
        if offset == 0 || count == 0 {
            // No section headers (stripped to the bone): no tables.
            return Some(());
        }
        if entry_size < 64 || count > MAX_SECTIONS {
            return None;
        }
        let table = image.read(offset, entry_size * count)?;
        let entries: Vec<&[u8]> = table.chunks_exact(entry_size).collect();
        let names = entries.get(names_index)?;
        let names = image.read(
            u64_at(names, 24)?,
            usize::try_from(u64_at(names, 32)?).ok()?,
        )?;
        for entry in entries {
            let name_at = usize::try_from(u32_at(entry, 0)?).ok()?;
            let name = names.get(name_at..)?;
            let name = &name[..name.iter().position(|&byte| byte == 0)?];
            let (kind, address, offset, size) = (
                u32_at(entry, 4)?,
                u64_at(entry, 16)?,
                u64_at(entry, 24)?,
                u64_at(entry, 32)?,
            );
            const SHT_NOBITS: u32 = 8;
            let wanted = match name {
                b".text" => {
                    self.text = Some(address..address.checked_add(size)?);
                    continue;
                }
                b".eh_frame" => &mut self.eh_frame,
                b".eh_frame_hdr" => &mut self.eh_frame_hdr,
                b".debug_frame" => &mut self.debug_frame,
                _ => continue,
            };
            // A separate-debug-info file keeps the headers but not the bytes.
            if kind == SHT_NOBITS || size == 0 || size > MAX_SECTION_BYTES {
                continue;
            }
            *wanted = Some(Section {
                address: address..address + size,
                bytes: image.read(offset, size as usize)?.into(),
            });
        }
        Some(())
    }

    /// The file address that a mapping of code at file offset `offset`
    /// starts at. The kernel maps a segment from its first page, which may
    /// begin before the segment does (and end another one).
    pub fn vaddr_of_offset(&self, offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .filter(|segment| segment.executable)
            .find(|segment| {
                let first_page = segment.offset - segment.offset % PAGE;
                (first_page..segment.offset + segment.file_size.max(1)).contains(&offset)
            })
            .map(|segment| {
                segment
                    .vaddr
                    .wrapping_sub(segment.offset)
                    .wrapping_add(offset)
            })
    }

    /// The file offset of a file address in a loaded segment.
    pub fn offset_of_vaddr(&self, vaddr: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|segment| (segment.vaddr..segment.vaddr + segment.file_size).contains(&vaddr))
            .map(|segment| segment.offset + (vaddr - segment.vaddr))
    }

    /// The end of the highest executable segment: the file's code range.
    pub fn code_end(&self) -> u64 {
        self.segments
            .iter()
            .filter(|segment| segment.executable)
            .map(|segment| segment.vaddr + segment.file_size)
            .max()
            .unwrap_or(0)
    }
}

/// The GNU build id among the notes of a `PT_NOTE` segment.
fn build_id_in(notes: &[u8]) -> Option<Vec<u8>> {
    let align4 = |length: usize| length.div_ceil(4) * 4;
    let mut at = 0;
    while at + 12 <= notes.len() {
        let name_size = usize::try_from(u32_at(notes, at)?).ok()?;
        let desc_size = usize::try_from(u32_at(notes, at + 4)?).ok()?;
        let kind = u32_at(notes, at + 8)?;
        let name_at = at + 12;
        let desc_at = name_at.checked_add(align4(name_size))?;
        let end = desc_at.checked_add(align4(desc_size))?;
        if kind == NT_GNU_BUILD_ID && notes.get(name_at..name_at + name_size)? == b"GNU\0" {
            return notes.get(desc_at..desc_at + desc_size).map(<[u8]>::to_vec);
        }
        at = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_executable_reads_with_its_tables_and_build_id() {
        let file = File::open("/proc/self/exe").unwrap();
        let elf = Elf::read(&Image::File(file)).expect("our own executable is ELF");
        assert!(elf
            .eh_frame
            .as_ref()
            .is_some_and(|section| !section.bytes.is_empty()));
        assert!(elf.eh_frame_hdr.is_some());
        assert!(elf.text.is_some());
        assert!(elf.segments.iter().any(|segment| segment.executable));
        assert!(elf.code_end() > 0);
        // rustc asks the linker for a build id on Linux.
        assert!(elf.build_id.as_ref().is_some_and(|id| id.len() >= 8));
    }

    #[test]
    fn what_is_not_elf_is_refused_without_a_panic() {
        assert!(Elf::read(&Image::Bytes(b"#!/bin/sh\n".to_vec())).is_none());
        assert!(Elf::read(&Image::Bytes(Vec::new())).is_none());
        let mut header = b"\x7fELF\x02\x01".to_vec();
        header.resize(64, 0xff);
        assert!(Elf::read(&Image::Bytes(header)).is_none());
    }

    #[test]
    fn a_build_id_note_is_found_among_others() {
        let mut notes = Vec::new();
        // An ABI-tag note first, then the build id.
        notes.extend(4u32.to_le_bytes());
        notes.extend(16u32.to_le_bytes());
        notes.extend(1u32.to_le_bytes());
        notes.extend(b"GNU\0");
        notes.extend([0u8; 16]);
        notes.extend(4u32.to_le_bytes());
        notes.extend(3u32.to_le_bytes());
        notes.extend(NT_GNU_BUILD_ID.to_le_bytes());
        notes.extend(b"GNU\0");
        notes.extend([0xab, 0xcd, 0xef, 0]);
        assert_eq!(build_id_in(&notes), Some(vec![0xab, 0xcd, 0xef]));
        assert_eq!(build_id_in(&notes[..20]), None);
    }
}
