//! The feed DB's in-memory index (a std `HashMap`, that is a hashbrown
//! table) and the writer that fills it.

use std::collections::HashMap;
use std::hint::black_box;
use std::mem::{align_of, size_of};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A value stored under each `u64` key: `u64` (8 bytes) or `[u64; 2]` (16).
pub trait Value: Copy + Send + 'static {
    /// The value the writer stores under `key`.
    fn for_key(key: u64) -> Self;
}

impl Value for u64 {
    fn for_key(key: u64) -> Self {
        key.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

impl Value for [u64; 2] {
    fn for_key(key: u64) -> Self {
        [key.wrapping_mul(0x9e37_79b9_7f4a_7c15), !key]
    }
}

/// Bytes of one stored entry, `(K, V)`.
pub fn entry_bytes<V: Value>() -> usize {
    size_of::<(u64, V)>()
}

/// The width of hashbrown's control-byte groups: 16 where it uses SSE2,
/// 8 for its NEON and portable implementations.
#[cfg(all(
    target_feature = "sse2",
    any(target_arch = "x86", target_arch = "x86_64")
))]
const GROUP_WIDTH: usize = 16;
#[cfg(not(all(
    target_feature = "sse2",
    any(target_arch = "x86", target_arch = "x86_64")
)))]
const GROUP_WIDTH: usize = 8;

/// The buckets behind a table whose `capacity()` is `capacity`.
///
/// hashbrown keeps a power-of-two number of buckets and fills them at most
/// 7/8: `capacity() = buckets / 8 * 7` once there are 8 buckets or more
/// (capacity ≥ 7), and `buckets - 1` for the tiny 4-bucket table. So
/// `buckets = capacity * 8 / 7` for capacity ≥ 7 (exact, as buckets is a
/// multiple of 8 there), `capacity + 1` below, and an empty map (capacity 0)
/// has no table at all.
pub fn buckets(capacity: usize) -> usize {
    match capacity {
        0 => 0,
        1..7 => capacity + 1,
        _ => capacity / 7 * 8,
    }
}

/// The size of the one allocation holding a table of `buckets` buckets of
/// `(K, V)` entries:
///
/// ```text
/// round_up(buckets * size_of::<(K, V)>(), ctrl_align)   the entries
///   + buckets + GROUP_WIDTH                             the control bytes
/// ```
///
/// where `ctrl_align = max(align_of::<(K, V)>(), GROUP_WIDTH)` (16 on
/// x86-64): one control byte per bucket, plus a trailing copy of the first
/// group so that a probe can load a whole group anywhere.
pub fn table_bytes<V: Value>(buckets: usize) -> u64 {
    if buckets == 0 {
        return 0;
    }
    let ctrl_align = align_of::<(u64, V)>().max(GROUP_WIDTH);
    let entries = (buckets * entry_bytes::<V>()).next_multiple_of(ctrl_align);
    (entries + buckets + GROUP_WIDTH) as u64
}

/// One insert that grew the table.
#[derive(Debug, Clone)]
pub struct Resize {
    pub from_buckets: usize,
    pub to_buckets: usize,
    /// The new table's allocation, from [`table_bytes`].
    pub table_bytes: u64,
    pub started: Instant,
    /// The whole insert: allocating (and, under mlockall, populating) the
    /// new table, moving every entry over, and freeing the old table.
    pub took: Duration,
}

/// What the writer did.
pub struct Written<V> {
    /// Kept so that the index lives until the process exits.
    pub map: HashMap<u64, V>,
    pub inserted: u64,
    pub started: Instant,
    pub took: Duration,
    pub resizes: Vec<Resize>,
    /// Set when a signal cut the writer short.
    pub interrupted: bool,
}

/// What start-up loads by default for an index that will grow to
/// `entries`: 99 % of the largest table that cannot hold them all, so that
/// the live writes cross exactly one resize boundary, soon. (A database
/// loads its index from a snapshot at start-up, sized for what it holds;
/// growth comes later, while it serves.)
pub fn default_load(entries: u64) -> u64 {
    let mut buckets: u64 = 8;
    while (buckets * 2) / 8 * 7 < entries {
        buckets *= 2;
    }
    let below = buckets / 8 * 7;
    if below >= entries {
        return 0;
    }
    below / 100 * 99
}

/// Inserts keys `0..count` into a table sized for them: the start-up load.
pub fn load<V: Value>(map: &mut HashMap<u64, V>, count: u64) {
    map.reserve(
        usize::try_from(count)
            .unwrap_or(usize::MAX)
            .saturating_sub(map.len()),
    );
    for key in 0..count {
        map.insert(key, V::for_key(key));
    }
}

/// How many inserts go between two looks at the stop flag.
const STOP_CHECK_EVERY: u64 = 1 << 16;

/// Inserts keys `first..entries` as fast as it can, timing each insert
/// that grows the table, and calls `on_resize` right after each of those.
pub fn fill<V: Value>(
    mut map: HashMap<u64, V>,
    first: u64,
    entries: u64,
    stop: &AtomicBool,
    mut on_resize: impl FnMut(&Resize),
) -> Written<V> {
    let mut resizes = Vec::new();
    let mut interrupted = false;
    let started = Instant::now();
    let mut key = first;
    while key < entries {
        if key.is_multiple_of(STOP_CHECK_EVERY) && stop.load(Ordering::Relaxed) {
            interrupted = true;
            break;
        }
        let value = V::for_key(key);
        let capacity = map.capacity();
        // Keys are distinct and nothing is removed, so the table grows on
        // exactly the insert that finds it full: time that one alone.
        if map.len() == capacity {
            let before = Instant::now();
            map.insert(key, value);
            let took = before.elapsed();
            let to_buckets = buckets(map.capacity());
            let resize = Resize {
                from_buckets: buckets(capacity),
                to_buckets,
                table_bytes: table_bytes::<V>(to_buckets),
                started: before,
                took,
            };
            on_resize(&resize);
            resizes.push(resize);
        } else {
            map.insert(key, value);
        }
        key += 1;
    }
    let took = started.elapsed();
    Written {
        map: black_box(map),
        inserted: key - first,
        started,
        took,
        resizes,
        interrupted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_capacity() {
        assert_eq!(buckets(0), 0);
        assert_eq!(buckets(3), 4);
        assert_eq!(buckets(7), 8);
        assert_eq!(buckets(14), 16);
        assert_eq!(buckets(29_360_128), 1 << 25);
        assert_eq!(buckets(58_720_256), 1 << 26);
    }

    #[test]
    fn the_default_entries_cross_the_resize_boundary() {
        let mut map: HashMap<u64, u64> = HashMap::new();
        map.reserve(29_360_128);
        assert_eq!(buckets(map.capacity()), 1 << 25);
        map.reserve(29_360_129);
        assert_eq!(buckets(map.capacity()), 1 << 26);
    }

    #[test]
    fn every_capacity_maps_to_a_power_of_two() {
        for wanted in [
            1usize, 2, 3, 4, 7, 8, 13, 14, 15, 28, 29, 100, 1000, 100_000,
        ] {
            let map: HashMap<u64, [u64; 2]> = HashMap::with_capacity(wanted);
            let buckets = buckets(map.capacity());
            assert!(buckets.is_power_of_two(), "{wanted}: {buckets}");
            assert!(map.capacity() >= wanted);
        }
    }

    #[test]
    fn table_sizes() {
        // 2^26 buckets of 16-byte entries: 1 GiB of entries and 64 MiB + 16
        // control bytes.
        assert_eq!(
            table_bytes::<u64>(1 << 26),
            (1 << 30) + (1 << 26) + GROUP_WIDTH as u64
        );
        assert_eq!(table_bytes::<[u64; 2]>(4), 96 + 4 + GROUP_WIDTH as u64);
    }

    #[test]
    fn fill_times_every_growth() {
        let stop = AtomicBool::new(false);
        let mut seen = 0;
        let written = fill(HashMap::<u64, u64>::new(), 0, 1000, &stop, |_| seen += 1);
        assert_eq!(written.inserted, 1000);
        assert_eq!(written.map.len(), 1000);
        assert_eq!(seen, written.resizes.len());
        // 4, 8, 16, ..., 2048 buckets.
        let path: Vec<_> = written.resizes.iter().map(|r| r.to_buckets).collect();
        assert_eq!(path, (2..=11).map(|shift| 1 << shift).collect::<Vec<_>>());
        assert_eq!(written.resizes[0].from_buckets, 0);
        assert_eq!(written.map[&999], u64::for_key(999));
    }

    #[test]
    fn the_default_load_leaves_exactly_one_resize_to_the_writer() {
        assert_eq!(default_load(29_400_000), 29_360_128 / 100 * 99);
        assert_eq!(default_load(14_700_000), 14_680_064 / 100 * 99);
        assert_eq!(default_load(5), 0, "too small to have a table below");
        let stop = AtomicBool::new(false);
        let loaded = default_load(100_000);
        let mut map = HashMap::<u64, u64>::new();
        load(&mut map, loaded);
        let before = buckets(map.capacity());
        let written = fill(map, loaded, 100_000, &stop, |_| {});
        assert_eq!(written.inserted, 100_000 - loaded);
        assert_eq!(written.map.len(), 100_000);
        assert_eq!(written.resizes.len(), 1, "one resize while serving");
        assert_eq!(written.resizes[0].from_buckets, before);
        assert_eq!(written.resizes[0].to_buckets, 2 * before);
    }
}
