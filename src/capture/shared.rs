//! The node's shared probe on the file system: where it is pinned, which
//! instances use it, and which of them are gone.
//!
//! Every program of the probe runs for every process on the node, so eight
//! freezeframes with a probe each would cost every neighbour eight times.
//! Instead the first one pins its maps (and, while anyone captures, its
//! attached programs) under a bpffs directory named after the BPF object's
//! version, and later ones of the same version reuse them:
//!
//! ```text
//! <dir>/offcpu-<version>/              one probe per BPF object version
//!     map_<name>                       every map but the instance's own .rodata
//!     link_<program>                   the attached programs, while anyone captures
//!     instances/<id>/                  one per live instance, flock()ed by it
//!     instances/<id>/attached          while that instance captures
//! ```
//!
//! Liveness is the kernel's, not a promise kept on the way out: an instance
//! holds a shared `flock` on its own directory for as long as it lives,
//! and the kernel drops it however the instance ends. Whoever then gets an
//! exclusive lock on that directory knows its owner is gone and clears up
//! after it. Every change to the probe's directory happens under an
//! exclusive lock on the directory itself.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `statfs(2)`'s `f_type` for bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// How long to wait for another instance to finish changing the probe.
const LOCK_PATIENCE: Duration = Duration::from_secs(10);

/// Why an instance runs a private probe instead of joining the node's.
#[derive(Debug, thiserror::Error)]
pub enum NotShared {
    #[error(
        "{dir} is not on a BPF file system (bpffs); mount one (`mount -t bpf bpf /sys/fs/bpf`) \
         or, in Kubernetes, mount the node's as a hostPath volume"
    )]
    NotBpffs { dir: PathBuf },
    #[error("cannot use {dir}: {source}")]
    Io { dir: PathBuf, source: io::Error },
    #[error("another freezeframe has held the lock on {dir} for over {patience:?}")]
    Busy { dir: PathBuf, patience: Duration },
}

/// The probe directory of one BPF object version, locked for a change.
pub(super) struct Node {
    dir: PathBuf,
    _lock: File,
}

/// An instance's registration: alive for as long as this lives.
pub(super) struct Membership {
    dir: PathBuf,
    _alive: File,
}

/// Another instance, as its directory tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Peer {
    pub id: u64,
    pub alive: bool,
    pub attached: bool,
}

fn flock(file: &File, operation: libc::c_int) -> io::Result<()> {
    // SAFETY: flock only reads the descriptor, which `file` keeps open.
    if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn is_bpffs(dir: &Path) -> io::Result<bool> {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
    // SAFETY: statfs writes only into the struct we pass.
    let mut stats: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut stats) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stats.f_type as i64 == BPF_FS_MAGIC)
}

/// Creates `dir` (and its parents) unless it is there; races with other
/// instances doing the same are fine.
fn make_dir(dir: &Path) -> io::Result<()> {
    match fs::create_dir_all(dir) {
        Err(err) if err.kind() != io::ErrorKind::AlreadyExists => Err(err),
        _ => Ok(()),
    }
}

/// Removes a file or an empty directory that may be gone already.
fn remove(path: &Path, directory: bool) -> io::Result<()> {
    let removed = if directory {
        fs::remove_dir(path)
    } else {
        fs::remove_file(path)
    };
    match removed {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// Takes the exclusive lock on `dir`, waiting (politely) for whoever has it.
fn lock_exclusive(dir: &Path) -> Result<File, NotShared> {
    let io_error = |source| NotShared::Io {
        dir: dir.to_path_buf(),
        source,
    };
    let file = File::open(dir).map_err(io_error)?;
    let started = Instant::now();
    loop {
        match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => return Ok(file),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                if started.elapsed() > LOCK_PATIENCE {
                    return Err(NotShared::Busy {
                        dir: dir.to_path_buf(),
                        patience: LOCK_PATIENCE,
                    });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(err) => return Err(io_error(err)),
        }
    }
}

impl Node {
    /// Locks the probe directory of `version` under `base`, creating it if
    /// need be. `base` must be on bpffs.
    pub fn lock(base: &Path, version: &str) -> Result<Node, NotShared> {
        let io_error = |source| NotShared::Io {
            dir: base.to_path_buf(),
            source,
        };
        let parent = base.parent().unwrap_or(base);
        // Either the directory is there already (a Kubernetes hostPath) or
        // it is made in a bpffs parent; anything else is not shared.
        let on_bpffs = if base.is_dir() {
            is_bpffs(base)
        } else {
            is_bpffs(parent)
        }
        .map_err(io_error)?;
        if !on_bpffs {
            return Err(NotShared::NotBpffs {
                dir: base.to_path_buf(),
            });
        }
        let dir = base.join(format!("offcpu-{version}"));
        make_dir(&dir.join("instances")).map_err(io_error)?;
        let lock = lock_exclusive(&dir)?;
        // Whoever removed the directory last may have done so between our
        // mkdir and our lock: then it is made again, under the lock.
        make_dir(&dir.join("instances")).map_err(io_error)?;
        Ok(Node { dir, _lock: lock })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a map is pinned.
    pub fn map_pin(&self, map: &str) -> PathBuf {
        self.dir.join(format!("map_{map}"))
    }

    /// Where an attached program's link is pinned.
    pub fn link_pin(&self, program: &str) -> PathBuf {
        self.dir.join(format!("link_{program}"))
    }

    fn instance_dir(&self, id: u64) -> PathBuf {
        self.dir.join("instances").join(format!("{id:016x}"))
    }

    /// Registers instance `id`; it counts as alive until the result is
    /// dropped or its process ends, whichever comes first.
    pub fn join(&self, id: u64) -> io::Result<Membership> {
        let dir = self.instance_dir(id);
        fs::create_dir(&dir)?;
        let alive = File::open(&dir)?;
        flock(&alive, libc::LOCK_SH)?;
        Ok(Membership { dir, _alive: alive })
    }

    /// Every other registered instance, alive or not.
    pub fn peers(&self, me: Option<&Membership>) -> io::Result<Vec<Peer>> {
        let mut peers = Vec::new();
        for entry in fs::read_dir(self.dir.join("instances"))? {
            let entry = entry?;
            if me.is_some_and(|me| me.dir == entry.path()) {
                continue;
            }
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|name| u64::from_str_radix(name, 16).ok())
            else {
                continue;
            };
            let Ok(dir) = File::open(entry.path()) else {
                continue; // removed meanwhile: gone
            };
            // An exclusive lock is to be had only once its owner is gone.
            let alive = match flock(&dir, libc::LOCK_EX | libc::LOCK_NB) {
                Ok(()) => false,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => true,
                Err(err) => return Err(err),
            };
            peers.push(Peer {
                id,
                alive,
                attached: entry.path().join("attached").is_dir(),
            });
        }
        Ok(peers)
    }

    /// Forgets an instance that is gone (or leaving).
    pub fn forget(&self, id: u64) -> io::Result<()> {
        let dir = self.instance_dir(id);
        remove(&dir.join("attached"), true)?;
        remove(&dir, true)
    }

    /// Marks `me` as capturing, or not.
    pub fn set_attached(&self, me: &Membership, attached: bool) -> io::Result<()> {
        let marker = me.dir.join("attached");
        if attached {
            make_dir(&marker)
        } else {
            remove(&marker, true)
        }
    }

    /// Whether the maps are pinned already: then this instance joins.
    pub fn maps_pinned(&self, any_map: &str) -> bool {
        self.map_pin(any_map).exists()
    }

    /// Whether the programs are attached (by whoever).
    pub fn links_pinned(&self) -> io::Result<bool> {
        Ok(self.pins("link_")?.next().is_some())
    }

    fn pins(&self, prefix: &'static str) -> io::Result<impl Iterator<Item = PathBuf>> {
        Ok(fs::read_dir(&self.dir)?.filter_map(move |entry| {
            let entry = entry.ok()?;
            let name = entry.file_name();
            name.to_str()?.starts_with(prefix).then(|| entry.path())
        }))
    }

    /// Detaches the programs: their links were held only by these pins
    /// (and the descriptors of whoever attached them).
    pub fn unpin_links(&self) -> io::Result<()> {
        for pin in self.pins("link_")?.collect::<Vec<_>>() {
            remove(&pin, false)?;
        }
        Ok(())
    }

    /// Removes the whole probe: nobody uses it any more.
    pub fn remove_all(self) -> io::Result<()> {
        self.unpin_links()?;
        for pin in self.pins("map_")?.collect::<Vec<_>>() {
            remove(&pin, false)?;
        }
        remove(&self.dir.join("instances"), true)?;
        remove(&self.dir, true)?;
        // The base too, if this was its last probe and we made it (a
        // mount point or a hostPath is not removable, which is fine).
        if let Some(base) = self.dir.parent() {
            let _ = fs::remove_dir(base);
        }
        Ok(())
    }
}

/// Removes the probes of other versions whose instances are all gone:
/// their pinned programs would otherwise run, for nobody, until the next
/// instance of their own version came by.
pub(super) fn sweep_abandoned(base: &Path, keep: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Some(version) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.strip_prefix("offcpu-"))
            .map(str::to_string)
        else {
            continue;
        };
        if dir == keep {
            continue;
        }
        let Ok(lock) = File::open(&dir) else {
            continue;
        };
        // Someone is changing it: it is not abandoned.
        if flock(&lock, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            continue;
        }
        let node = Node { dir, _lock: lock };
        let Ok(peers) = node.peers(None) else {
            continue;
        };
        if peers.iter().any(|peer| peer.alive) {
            continue;
        }
        for peer in &peers {
            let _ = node.forget(peer.id);
        }
        match node.remove_all() {
            Ok(()) => tracing::info!(
                version,
                "removed the pinned probe of another freezeframe version: all its instances \
                 are gone"
            ),
            Err(err) => tracing::warn!(version, "cannot remove an abandoned pinned probe: {err}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_that_is_not_bpffs_is_not_shared() {
        let dir = std::env::temp_dir().join(format!("ff-not-bpffs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let refused = Node::lock(&dir, "0123")
            .err()
            .expect("a tmp dir is not bpffs");
        assert!(matches!(refused, NotShared::NotBpffs { .. }), "{refused}");
        assert!(refused.to_string().contains("mount -t bpf"), "{refused}");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A bpffs of the test's own, unmounted when dropped. Needs root.
    struct Bpffs(PathBuf);

    impl Bpffs {
        fn mount(name: &str) -> Bpffs {
            let dir = std::env::temp_dir().join(format!("ff-{name}-{}", std::process::id()));
            fs::create_dir_all(&dir).unwrap();
            let status = std::process::Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success(), "mounting a bpffs needs root");
            Bpffs(dir)
        }
    }

    impl Drop for Bpffs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
            let _ = fs::remove_dir(&self.0);
        }
    }

    #[test]
    fn an_instance_is_alive_while_it_holds_its_membership() {
        let bpffs = Bpffs::mount("liveness");
        let base = bpffs.0.join("freezeframe");
        let node = Node::lock(&base, "v1").unwrap();
        let first = node.join(1).unwrap();
        let second = node.join(2).unwrap();
        node.set_attached(&second, true).unwrap();
        let mut peers = node.peers(Some(&first)).unwrap();
        assert_eq!(
            peers,
            vec![Peer {
                id: 2,
                alive: true,
                attached: true
            }]
        );
        // However an instance ends, its descriptor closes with it.
        drop(second);
        peers = node.peers(Some(&first)).unwrap();
        assert_eq!(peers.len(), 1);
        assert!(!peers[0].alive);
        node.forget(2).unwrap();
        assert!(node.peers(Some(&first)).unwrap().is_empty());
        // Alive while held, even to a check that does not skip it.
        assert!(node.peers(None).unwrap()[0].alive);
        drop(first);
        node.forget(1).unwrap();
        let dir = node.dir().to_path_buf();
        node.remove_all().unwrap();
        assert!(!dir.exists() && !base.exists());
    }

    #[test]
    fn versions_have_directories_of_their_own_and_abandoned_ones_are_swept() {
        let bpffs = Bpffs::mount("versions");
        let base = bpffs.0.join("freezeframe");
        let old = Node::lock(&base, "old").unwrap();
        let gone = old.join(7).unwrap();
        let old_dir = old.dir().to_path_buf();
        drop(old);
        let new = Node::lock(&base, "new").unwrap();
        assert_ne!(new.dir(), old_dir);
        // Its only instance lives: the old version's probe stays.
        sweep_abandoned(&base, new.dir());
        assert!(old_dir.exists());
        drop(gone);
        sweep_abandoned(&base, new.dir());
        assert!(!old_dir.exists(), "all its instances are gone");
        assert!(new.dir().exists());
    }
}
