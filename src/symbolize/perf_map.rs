//! The perf maps JIT runtimes write (`/tmp/perf-PID.map`, one
//! `START SIZE NAME` line per compiled function): the only names their code
//! has. Read here rather than by blazesym, whose reader refuses the `0x`
//! that HotSpot puts before its hex numbers and then fails the whole batch.

use std::fs;

/// One process's perf map, as read once for a batch of lookups.
#[derive(Debug, Default)]
pub(super) struct PerfMap {
    /// In file order: a runtime that reuses an address for newer code
    /// appends the newer entry, so the last match wins.
    functions: Vec<Function>,
}

#[derive(Debug, PartialEq, Eq)]
struct Function {
    start: u64,
    size: u64,
    name: String,
}

impl PerfMap {
    /// The map of `pid`, through its root (a process in a container writes
    /// to its own /tmp) and under its own namespace pid. `None` when the
    /// runtime wrote none.
    pub fn read(pid: u32) -> Option<Self> {
        let namespace_pid = crate::app::targets::innermost_pid(pid).unwrap_or(pid);
        let text = fs::read(format!("/proc/{pid}/root/tmp/perf-{namespace_pid}.map")).ok()?;
        Some(Self::parse(&String::from_utf8_lossy(&text)))
    }

    /// Skips lines it cannot read (the runtime may be writing the last one).
    pub fn parse(text: &str) -> Self {
        let functions = text.lines().filter_map(parse_line).collect();
        PerfMap { functions }
    }

    /// The function whose code holds `address`.
    pub fn name_of(&self, address: u64) -> Option<&str> {
        self.functions
            .iter()
            .rev()
            .find(|function| {
                (function.start..function.start.saturating_add(function.size)).contains(&address)
            })
            .map(|function| function.name.as_str())
    }
}

fn parse_line(line: &str) -> Option<Function> {
    let mut fields = line.trim_end().splitn(3, ' ');
    let start = parse_hex(fields.next()?)?;
    let size = parse_hex(fields.next()?)?;
    let name = fields.next()?.trim();
    (!name.is_empty()).then(|| Function {
        start,
        size,
        name: name.to_string(),
    })
}

/// perf takes hex with or without `0x`; so do the runtimes that write maps.
fn parse_hex(field: &str) -> Option<u64> {
    let digits = field.strip_prefix("0x").unwrap_or(field);
    u64::from_str_radix(digits, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hotspot_and_v8_lines_are_read() {
        let map = PerfMap::parse(
            "0x00007fc2fced12a0 0x00000000000001f8 long JitRequests.lookupAccount(int)\n\
             7fe9e8009a80 178 JS:*ffReadRequest /srv/app.js:20:23\n",
        );
        assert_eq!(
            map.name_of(0x7fc2_fced_12a0 + 0x1f7),
            Some("long JitRequests.lookupAccount(int)")
        );
        assert_eq!(map.name_of(0x7fc2_fced_12a0 + 0x1f8), None);
        assert_eq!(
            map.name_of(0x7fe9_e800_9b00),
            Some("JS:*ffReadRequest /srv/app.js:20:23")
        );
    }

    #[test]
    fn the_newest_entry_for_a_reused_address_wins() {
        let map = PerfMap::parse("1000 100 JS:^old\n1000 80 JS:*new\n");
        assert_eq!(map.name_of(0x1010), Some("JS:*new"));
        assert_eq!(map.name_of(0x1090), Some("JS:^old"));
    }

    #[test]
    fn lines_it_cannot_read_are_skipped() {
        let map = PerfMap::parse("garbage\n2000 zz bad size\n3000 10\n4000 10 good\n50");
        assert_eq!(map.functions.len(), 1);
        assert_eq!(map.name_of(0x4004), Some("good"));
    }
}
