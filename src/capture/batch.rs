//! Batched reads of the probe's maps, into buffers kept between reads.
//!
//! A cut reads half a dozen maps twice a second, most of them nearly
//! empty. libbpf-rs's batch iterator allocates and zeroes buffers for a
//! whole batch on every read: for stack copies (16 KiB each) that was most
//! of an idle sidecar's CPU. Here the buffers live as long as the thread
//! that reads (the recorder's), hold [`BATCH_BYTES`] or a few entries,
//! whichever is more, and are only ever written by the kernel.
//!
//! A batch smaller than the hash bucket it reaches is refused with ENOSPC;
//! libbpf-rs ends its iteration there without a word, leaving the rest of
//! the map unread. Here the batch doubles and the read goes on.

use std::cell::RefCell;
use std::os::fd::AsRawFd;

use libbpf_rs::libbpf_sys;
use libbpf_rs::MapCore;

/// Entries per batch: as many as fit in this many bytes of keys and values...
const BATCH_BYTES: usize = 64 << 10;
/// ...but at least this many (a bucket rarely holds more)...
const MIN_BATCH: usize = 8;
/// ...and at most this many.
const MAX_BATCH: usize = 4096;

/// One entry: key and value bytes.
pub(super) type Entry = (Vec<u8>, Vec<u8>);

#[derive(Default)]
struct Buffers {
    keys: Vec<u8>,
    values: Vec<u8>,
    /// Where the kernel says the next batch starts, and where the last one
    /// did (a bucket index for hash maps, an index for arrays).
    next: Vec<u8>,
    from: Vec<u8>,
}

impl Buffers {
    /// Room for `count` entries; grown with zeros, never shrunk.
    fn fit(&mut self, count: usize, key_size: usize, value_size: usize, position_size: usize) {
        let grow = |buffer: &mut Vec<u8>, bytes: usize| {
            if buffer.len() < bytes {
                buffer.resize(bytes, 0);
            }
        };
        grow(&mut self.keys, count * key_size);
        grow(&mut self.values, count * value_size);
        grow(&mut self.next, position_size);
        grow(&mut self.from, position_size);
    }
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers::default());
}

/// Every entry of `map`, read in batches; with `delete`, each batch is
/// deleted as it is read (`BPF_MAP_LOOKUP_AND_DELETE_BATCH`).
pub(super) fn entries(map: &impl MapCore, delete: bool) -> libbpf_rs::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    visit(map, delete, |key, value| {
        entries.push((key.to_vec(), value.to_vec()));
    })?;
    Ok(entries)
}

/// Shows `each` every entry of `map` where the kernel put it, read as
/// [`entries`] reads them: for large values of which the caller keeps a
/// part, or nothing. `each` must not read a map through this module: the
/// buffers are its caller's while it runs.
pub(super) fn visit(
    map: &impl MapCore,
    delete: bool,
    mut each: impl FnMut(&[u8], &[u8]),
) -> libbpf_rs::Result<()> {
    let key_size = map.key_size() as usize;
    // Where a batch starts is a bucket or an index: 4 bytes at least.
    let position_size = key_size.max(4);
    let value_size = map.value_size() as usize;
    let mut count = (BATCH_BYTES / (key_size + value_size).max(1)).clamp(MIN_BATCH, MAX_BATCH);
    let opts = libbpf_sys::bpf_map_batch_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_map_batch_opts>() as _,
        ..Default::default()
    };
    let fd = map.as_fd().as_raw_fd();
    BUFFERS.with_borrow_mut(|buffers| {
        let mut first = true;
        loop {
            buffers.fit(count, key_size, value_size, position_size);
            let mut got = count as u32;
            let from = if first {
                std::ptr::null_mut()
            } else {
                buffers.from.as_mut_ptr().cast()
            };
            // SAFETY: every buffer holds what the kernel may write for
            // `count` entries of this map (fit above), and `from` holds
            // the position the previous call returned.
            let ret = unsafe {
                let read = if delete {
                    libbpf_sys::bpf_map_lookup_and_delete_batch
                } else {
                    libbpf_sys::bpf_map_lookup_batch
                };
                read(
                    fd,
                    from,
                    buffers.next.as_mut_ptr().cast(),
                    buffers.keys.as_mut_ptr().cast(),
                    buffers.values.as_mut_ptr().cast(),
                    &mut got,
                    &opts,
                )
            };
            let error = (ret < 0).then(|| -ret);
            match error {
                Some(libc::EINTR) => continue,
                Some(libc::ENOSPC) if got == 0 && count < MAX_BATCH * 16 => {
                    count *= 2;
                    continue;
                }
                Some(code) if code != libc::ENOENT => {
                    return Err(libbpf_rs::Error::from_raw_os_error(code));
                }
                _ => {}
            }
            let got = (got as usize).min(count);
            for index in 0..got {
                each(
                    &buffers.keys[index * key_size..(index + 1) * key_size],
                    &buffers.values[index * value_size..(index + 1) * value_size],
                );
            }
            if error == Some(libc::ENOENT) {
                return Ok(());
            }
            std::mem::swap(&mut buffers.from, &mut buffers.next);
            first = false;
        }
    })
}

#[cfg(test)]
mod tests {
    use libbpf_rs::{MapFlags, MapHandle, MapType};

    use super::*;

    /// A hash map of `count` entries with values the size of a stack copy:
    /// eight to a batch, so reading it takes several.
    fn filled(count: u32) -> MapHandle {
        let opts = libbpf_sys::bpf_map_create_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
            ..Default::default()
        };
        let map = MapHandle::create(
            MapType::Hash,
            Some("ff_batch_test"),
            4,
            16 << 10,
            256,
            &opts,
        )
        .expect("creating a BPF map (the tests run as root)");
        for key in 0..count {
            let value = vec![key as u8; 16 << 10];
            map.update(&key.to_ne_bytes(), &value, MapFlags::ANY)
                .unwrap();
        }
        map
    }

    fn keys(entries: &[Entry]) -> Vec<u32> {
        let mut keys: Vec<u32> = entries
            .iter()
            .map(|(key, value)| {
                let key = u32::from_ne_bytes(key[..].try_into().unwrap());
                assert!(
                    value.iter().all(|&byte| byte == key as u8),
                    "{key}'s own value"
                );
                key
            })
            .collect();
        keys.sort_unstable();
        keys
    }

    #[test]
    fn every_entry_is_read_across_batches_and_taken_ones_are_gone() {
        let map = filled(100);
        let read = entries(&map, false).unwrap();
        assert_eq!(keys(&read), (0..100).collect::<Vec<_>>());
        let taken = entries(&map, true).unwrap();
        assert_eq!(keys(&taken), (0..100).collect::<Vec<_>>());
        assert!(entries(&map, false).unwrap().is_empty());
        assert!(entries(&filled(0), true).unwrap().is_empty());
    }
}
