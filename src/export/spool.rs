//! The delivery queue, on disk: every export request is written to
//! `<export directory>/spool/` before it is sent, and removed once the
//! backend has answered for good. Profiles therefore survive a backend
//! outage *and* a sidecar restart.
//!
//! The spool is bounded by bytes and by files. When a new request does not
//! fit, the oldest ones are dropped (and counted) to make room: the newest
//! freeze is the one an operator is looking at. Requests are delivered
//! oldest first. Files are written whole (to a temporary name, synced, then
//! renamed), so a crash leaves either a complete request or none.
//!
//! A file's name says its request's [`Format`]
//! (`<sequence>-<capture>.<format>.pb`), so that a run whose exporter
//! changed knows what an earlier run left. Files of releases that knew
//! only OTLP (`<sequence>-<capture>.pb`) are OTLP requests. A file's
//! modification time is set to when its capture started, so that a later
//! run still knows how old the profile is, and whether the backend would
//! still take it.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use super::{ExportError, Format};

const EXTENSION: &str = "pb";
const TEMPORARY_EXTENSION: &str = "tmp";

/// One request waiting in the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Sequence number; orders delivery.
    pub sequence: u64,
    /// File name within the spool directory.
    pub name: String,
    pub bytes: u64,
    pub format: Format,
    /// When the capture in it started.
    pub started: SystemTime,
}

/// What [`Spool::put`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Put {
    /// The request's entry, unless it was larger than the whole budget.
    pub stored: Option<Entry>,
    /// Older entries dropped to make room.
    pub evicted: Vec<Entry>,
}

/// The spool directory and what it holds.
#[derive(Debug)]
pub struct Spool {
    directory: PathBuf,
    max_bytes: u64,
    max_files: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// By sequence number, oldest first.
    entries: BTreeMap<u64, Entry>,
    bytes: u64,
    next_sequence: u64,
}

impl Spool {
    /// Opens (creating) the spool directory and takes stock of what an
    /// earlier run left: complete requests are kept for delivery, partial
    /// writes removed. If that already exceeds the budget (it was lowered),
    /// the oldest are dropped at once; they are returned.
    pub fn open(
        directory: &Path,
        max_bytes: u64,
        max_files: usize,
    ) -> Result<(Spool, Vec<Entry>), ExportError> {
        let spool_error = |source| ExportError::Spool {
            path: directory.to_path_buf(),
            source,
        };
        fs::create_dir_all(directory).map_err(spool_error)?;
        let mut state = State::default();
        for dir_entry in fs::read_dir(directory).map_err(spool_error)? {
            let dir_entry = dir_entry.map_err(spool_error)?;
            let path = dir_entry.path();
            let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
                continue;
            };
            match path.extension().and_then(|extension| extension.to_str()) {
                Some(TEMPORARY_EXTENSION) => {
                    // A write that a crash cut short.
                    let _ = fs::remove_file(&path);
                }
                Some(EXTENSION) => {
                    let Some(sequence) = parse_sequence(name) else {
                        continue;
                    };
                    // A later release's format is kept for that release,
                    // and its number is not reused.
                    state.next_sequence = state.next_sequence.max(sequence + 1);
                    let Some(format) = parse_format(name) else {
                        continue;
                    };
                    let metadata = dir_entry.metadata().map_err(spool_error)?;
                    let bytes = metadata.len();
                    let started = metadata.modified().unwrap_or_else(|_| SystemTime::now());
                    state.bytes += bytes;
                    state.entries.insert(
                        sequence,
                        Entry {
                            sequence,
                            name: name.to_string(),
                            bytes,
                            format,
                            started,
                        },
                    );
                }
                _ => {}
            }
        }
        let spool = Spool {
            directory: directory.to_path_buf(),
            max_bytes,
            max_files: max_files.max(1),
            state: Mutex::new(state),
        };
        let evicted = {
            let mut state = spool.lock();
            spool.make_room(&mut state, 0, 0)
        };
        Ok((spool, evicted))
    }

    /// Adds a request of `format` for a capture that `started` then,
    /// labelled for people with `label` (the capture id). Never blocks on
    /// the network; drops the oldest entries if needed.
    pub fn put(
        &self,
        label: &str,
        format: Format,
        started: SystemTime,
        request: &[u8],
    ) -> Result<Put, ExportError> {
        let bytes = request.len() as u64;
        let mut state = self.lock();
        if bytes > self.max_bytes {
            // Keeping it would mean dropping everything else, and still not fit.
            return Ok(Put::default());
        }
        let evicted = self.make_room(&mut state, bytes, 1);
        let sequence = state.next_sequence;
        state.next_sequence += 1;
        let name = format!(
            "{sequence:020}-{}.{}.{EXTENSION}",
            sanitize(label),
            format.tag()
        );
        let path = self.directory.join(&name);
        write_whole(&path, request, started).map_err(|source| ExportError::Spool {
            path: path.clone(),
            source,
        })?;
        let entry = Entry {
            sequence,
            name,
            bytes,
            format,
            started,
        };
        state.bytes += bytes;
        state.entries.insert(sequence, entry.clone());
        Ok(Put {
            stored: Some(entry),
            evicted,
        })
    }

    /// The oldest entry, if any.
    pub fn oldest(&self) -> Option<Entry> {
        self.lock().entries.values().next().cloned()
    }

    /// Reads an entry's request; `Ok(None)` if it was dropped meanwhile.
    pub fn read(&self, entry: &Entry) -> Result<Option<Vec<u8>>, ExportError> {
        if !self.lock().entries.contains_key(&entry.sequence) {
            return Ok(None);
        }
        let path = self.directory.join(&entry.name);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                self.forget(entry);
                Ok(None)
            }
            Err(source) => Err(ExportError::Spool { path, source }),
        }
    }

    /// Removes an entry (delivered, or given up on). Harmless if it is gone.
    pub fn remove(&self, entry: &Entry) {
        if self.forget(entry) {
            let _ = fs::remove_file(self.directory.join(&entry.name));
        }
    }

    /// Bytes and files held now.
    pub fn usage(&self) -> (u64, usize) {
        let state = self.lock();
        (state.bytes, state.entries.len())
    }

    pub fn directory(&self) -> &Path {
        &self.directory
    }

    fn forget(&self, entry: &Entry) -> bool {
        let mut state = self.lock();
        match state.entries.remove(&entry.sequence) {
            Some(removed) => {
                state.bytes -= removed.bytes;
                true
            }
            None => false,
        }
    }

    /// Drops the oldest entries until `bytes` more in `files` more fit.
    fn make_room(&self, state: &mut State, bytes: u64, files: usize) -> Vec<Entry> {
        let mut evicted = Vec::new();
        while state.bytes + bytes > self.max_bytes || state.entries.len() + files > self.max_files {
            let Some((_, oldest)) = state.entries.pop_first() else {
                break;
            };
            state.bytes -= oldest.bytes;
            let _ = fs::remove_file(self.directory.join(&oldest.name));
            evicted.push(oldest);
        }
        evicted
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Writes to a temporary name, syncs, and renames: the file appears whole,
/// modified at `modified`.
fn write_whole(path: &Path, bytes: &[u8], modified: SystemTime) -> std::io::Result<()> {
    let temporary = path.with_extension(TEMPORARY_EXTENSION);
    let result = (|| {
        let mut file = fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.set_modified(modified)?;
        file.sync_all()?;
        fs::rename(&temporary, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    result
}

fn parse_sequence(name: &str) -> Option<u64> {
    name.split_once('-')?.0.parse().ok()
}

/// The format a spool file's name says. Labels are sanitized to hold no
/// dot, so a dot in the stem starts the format.
fn parse_format(name: &str) -> Option<Format> {
    let stem = name.strip_suffix(EXTENSION)?.strip_suffix('.')?;
    match stem.rsplit_once('.') {
        Some((_, tag)) => Format::from_tag(tag),
        None => Some(Format::OtlpProfiles),
    }
}

fn sanitize(label: &str) -> String {
    label
        .chars()
        .take(80)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("freezeframe-spool-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn names(entries: &[Entry]) -> Vec<&str> {
        entries.iter().map(|entry| entry.name.as_str()).collect()
    }

    #[test]
    fn requests_come_out_oldest_first_and_survive_a_reopen() {
        let dir = TempDir::new("reopen");
        let (spool, evicted) = Spool::open(&dir.0, 1000, 10).unwrap();
        assert!(evicted.is_empty());
        let first = spool
            .put(
                "capture/one",
                Format::OtlpProfiles,
                SystemTime::now(),
                b"first",
            )
            .unwrap()
            .stored
            .unwrap();
        spool
            .put("two", Format::OtlpProfiles, SystemTime::now(), b"second!")
            .unwrap();
        assert_eq!(first.name, "00000000000000000000-capture_one.otlp.pb");
        assert_eq!(spool.usage(), (12, 2));
        drop(spool);

        // A crash mid-write leaves a temporary file: it is not a request.
        fs::write(dir.0.join("00000000000000000009-x.tmp"), b"half").unwrap();
        let (spool, _) = Spool::open(&dir.0, 1000, 10).unwrap();
        assert!(!dir.0.join("00000000000000000009-x.tmp").exists());
        assert_eq!(spool.usage(), (12, 2));
        let oldest = spool.oldest().unwrap();
        assert_eq!(spool.read(&oldest).unwrap().unwrap(), b"first");
        spool.remove(&oldest);
        spool.remove(&oldest);
        let next = spool.oldest().unwrap();
        assert_eq!(spool.read(&next).unwrap().unwrap(), b"second!");
        let third = spool
            .put("three", Format::OtlpProfiles, SystemTime::now(), b"3")
            .unwrap()
            .stored
            .unwrap();
        assert_eq!(third.sequence, 2, "numbering continues after a restart");
        assert_eq!(spool.usage(), (8, 2));
    }

    #[test]
    fn the_oldest_make_room_for_the_newest() {
        let dir = TempDir::new("budget");
        let (spool, _) = Spool::open(&dir.0, 10, 3).unwrap();
        spool
            .put("a", Format::OtlpProfiles, SystemTime::now(), b"aaaa")
            .unwrap();
        spool
            .put("b", Format::OtlpProfiles, SystemTime::now(), b"bbbb")
            .unwrap();
        let put = spool
            .put("c", Format::OtlpProfiles, SystemTime::now(), b"cccc")
            .unwrap();
        assert_eq!(names(&put.evicted), ["00000000000000000000-a.otlp.pb"]);
        assert!(!dir.0.join("00000000000000000000-a.otlp.pb").exists());
        assert_eq!(spool.usage(), (8, 2));

        let too_big = spool
            .put("huge", Format::OtlpProfiles, SystemTime::now(), &[0; 11])
            .unwrap();
        assert_eq!(
            too_big,
            Put::default(),
            "larger than the budget: refused, nothing evicted"
        );
        assert_eq!(spool.usage(), (8, 2));

        spool
            .put("d", Format::OtlpProfiles, SystemTime::now(), b"d")
            .unwrap();
        let put = spool
            .put("e", Format::OtlpProfiles, SystemTime::now(), b"e")
            .unwrap();
        assert_eq!(
            names(&put.evicted),
            ["00000000000000000001-b.otlp.pb"],
            "the file limit holds too"
        );
        assert_eq!(spool.usage(), (6, 3));
    }

    #[test]
    fn a_lowered_budget_drops_the_oldest_at_open() {
        let dir = TempDir::new("lowered");
        let (spool, _) = Spool::open(&dir.0, 100, 10).unwrap();
        for label in ["a", "b", "c"] {
            spool
                .put(label, Format::OtlpProfiles, SystemTime::now(), b"12345")
                .unwrap();
        }
        drop(spool);
        let (spool, evicted) = Spool::open(&dir.0, 10, 10).unwrap();
        assert_eq!(names(&evicted), ["00000000000000000000-a.otlp.pb"]);
        assert_eq!(spool.usage(), (10, 2));
    }

    #[test]
    fn entries_keep_their_format_and_old_entries_are_otlp() {
        let dir = TempDir::new("formats");
        fs::create_dir_all(&dir.0).unwrap();
        // As releases before formats were tagged wrote them.
        fs::write(dir.0.join("00000000000000000004-old.pb"), b"old").unwrap();
        fs::write(dir.0.join("00000000000000000005-x.unknown.pb"), b"?").unwrap();
        let (spool, _) = Spool::open(&dir.0, 1000, 10).unwrap();
        assert_eq!(spool.usage(), (3, 1), "an unknown format is left alone");
        let old = spool.oldest().unwrap();
        assert_eq!((old.sequence, old.format), (4, Format::OtlpProfiles));
        let started = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let new = spool
            .put("new", Format::OtlpProfiles, started, b"new")
            .unwrap()
            .stored
            .unwrap();
        assert_eq!(new.name, "00000000000000000006-new.otlp.pb");
        drop(spool);
        let (spool, _) = Spool::open(&dir.0, 1000, 10).unwrap();
        spool.remove(&old);
        assert_eq!(spool.oldest().unwrap(), new, "its capture's start too");
    }

    #[test]
    fn an_entry_dropped_while_in_flight_reads_as_gone() {
        let dir = TempDir::new("gone");
        let (spool, _) = Spool::open(&dir.0, 8, 10).unwrap();
        let first = spool
            .put("a", Format::OtlpProfiles, SystemTime::now(), b"aaaa")
            .unwrap()
            .stored
            .unwrap();
        spool
            .put("b", Format::OtlpProfiles, SystemTime::now(), b"bbbb")
            .unwrap();
        spool
            .put("c", Format::OtlpProfiles, SystemTime::now(), b"cccc")
            .unwrap();
        assert_eq!(spool.read(&first).unwrap(), None);
        spool.remove(&first);
        assert_eq!(spool.usage(), (8, 2));
    }
}
