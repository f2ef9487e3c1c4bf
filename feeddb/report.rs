//! The run's figures: the summary printed at the end and the JSON report.

use serde::Serialize;

use crate::clock::Clock;
use crate::format::{bytes, nanos};
use crate::requests::{Sample, Served, SLOW};
use crate::table::Resize;

#[derive(Debug, Serialize)]
pub struct Report {
    pub pid: u32,
    /// The writer's kernel thread id.
    pub writer_tid: i32,
    pub entries: u64,
    /// Entries loaded at start-up, before serving.
    pub loaded: u64,
    /// Entries the writer inserted while serving (fewer than `entries -
    /// loaded` if interrupted).
    pub inserted: u64,
    pub value_bytes: usize,
    /// `size_of::<(u64, V)>()`.
    pub entry_bytes: usize,
    pub preallocated: bool,
    pub mlockall: bool,
    pub service_name: String,
    pub request_threads: Vec<Thread>,
    pub started_unix_ns: u64,
    pub finished_unix_ns: u64,
    /// A signal cut the run short.
    pub interrupted: bool,
    pub writer: Option<Writer>,
    /// Every insert that grew the table, in order.
    pub resizes: Vec<ResizeEntry>,
    pub requests: Requests,
    /// The same over the requests that overlapped the writer's run.
    pub requests_while_writing: Option<Requests>,
    /// The slowest request.
    pub longest_stall: Option<Request>,
    /// Every request at least 100 ms slow, in the order they started.
    pub slow_requests: Vec<Request>,
    /// VmRSS at the end and VmHWM (the peak), from /proc/self/status.
    pub rss_bytes: Option<u64>,
    pub peak_rss_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct Thread {
    pub name: String,
    pub tid: i32,
    pub requests: u64,
    /// Why it stopped early, if it did.
    pub failed: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Writer {
    pub started_unix_ns: u64,
    pub duration_ns: u64,
    /// The table at the end.
    pub capacity: usize,
    pub buckets: usize,
    pub table_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct ResizeEntry {
    pub from_buckets: usize,
    pub to_buckets: usize,
    pub table_bytes: u64,
    pub started_unix_ns: u64,
    pub duration_ns: u64,
}

impl ResizeEntry {
    pub fn new(resize: &Resize, clock: &Clock) -> Self {
        ResizeEntry {
            from_buckets: resize.from_buckets,
            to_buckets: resize.to_buckets,
            table_bytes: resize.table_bytes,
            started_unix_ns: clock.unix_ns(clock.since_epoch_ns(resize.started)),
            duration_ns: crate::format::ns(resize.took),
        }
    }
}

/// Latency over every request of every thread; percentiles by nearest
/// rank over the exact durations.
#[derive(Debug, Serialize)]
pub struct Requests {
    pub count: u64,
    pub p50_ns: Option<u64>,
    pub p99_ns: Option<u64>,
    pub max_ns: Option<u64>,
    pub over_100ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Request {
    pub started_unix_ns: u64,
    pub duration_ns: u64,
    pub thread: String,
    pub tid: i32,
}

/// The percentile `per_mille`/1000 by nearest rank over sorted values.
fn percentile(sorted: &[u64], per_mille: usize) -> Option<u64> {
    let rank = (sorted.len() * per_mille).div_ceil(1000);
    sorted.get(rank.max(1) - 1).copied()
}

/// Latency over every request, or over the requests that overlapped
/// `window` (from, until: nanoseconds since the clock's epoch).
pub fn requests(served: &[Served], window: Option<(u64, u64)>) -> Requests {
    let within = |sample: &Sample| {
        window.is_none_or(|(from, until)| {
            sample.start_ns < until && sample.start_ns + sample.took_ns > from
        })
    };
    let mut took: Vec<u64> = served
        .iter()
        .flat_map(|thread| thread.samples.iter())
        .filter(|sample| within(sample))
        .map(|sample| sample.took_ns)
        .collect();
    took.sort_unstable();
    let slow = crate::format::ns(SLOW);
    Requests {
        count: took.len() as u64,
        p50_ns: percentile(&took, 500),
        p99_ns: percentile(&took, 990),
        max_ns: took.last().copied(),
        over_100ms: took.iter().filter(|&&ns| ns >= slow).count() as u64,
    }
}

/// Requests at least `threshold_ns` slow, in the order they started.
pub fn slower_than(served: &[Served], threshold_ns: u64, clock: &Clock) -> Vec<Request> {
    let mut slow: Vec<Request> = served
        .iter()
        .flat_map(|thread| {
            thread
                .samples
                .iter()
                .filter(move |sample| sample.took_ns >= threshold_ns)
                .map(move |sample| Request {
                    started_unix_ns: clock.unix_ns(sample.start_ns),
                    duration_ns: sample.took_ns,
                    thread: thread.name.clone(),
                    tid: thread.tid,
                })
        })
        .collect();
    slow.sort_by_key(|request| request.started_unix_ns);
    slow
}

pub fn longest(served: &[Served], clock: &Clock) -> Option<Request> {
    served
        .iter()
        .flat_map(|thread| thread.samples.iter().map(move |sample| (thread, sample)))
        .max_by_key(|(_, sample)| sample.took_ns)
        .map(|(thread, sample)| Request {
            started_unix_ns: clock.unix_ns(sample.start_ns),
            duration_ns: sample.took_ns,
            thread: thread.name.clone(),
            tid: thread.tid,
        })
}

/// `ns` as "X after" / "X before" (relative to something).
fn relative(delta_ns: i128) -> String {
    let magnitude = nanos(u64::try_from(delta_ns.unsigned_abs()).unwrap_or(u64::MAX));
    if delta_ns < 0 {
        format!("{magnitude} before")
    } else {
        format!("{magnitude} after")
    }
}

/// Where the longest stall sits: against the resize it overlaps most, or
/// else against the writer's run.
pub fn stall_context(stall: &Request, resizes: &[ResizeEntry], writer: &Writer) -> String {
    let start = i128::from(stall.started_unix_ns);
    let end = start + i128::from(stall.duration_ns);
    let span = |started: u64, took: u64| {
        let from = i128::from(started);
        (from, from + i128::from(took))
    };
    let overlap = |resize: &&ResizeEntry| {
        let (from, until) = span(resize.started_unix_ns, resize.duration_ns);
        end.min(until) - start.max(from)
    };
    if let Some(resize) = resizes
        .iter()
        .max_by_key(overlap)
        .filter(|resize| overlap(resize) > 0)
    {
        let (from, until) = span(resize.started_unix_ns, resize.duration_ns);
        return format!(
            "it began {} the {} -> {} buckets resize began and ended {} it ended (that insert took {})",
            relative(start - from),
            resize.from_buckets,
            resize.to_buckets,
            relative(end - until),
            nanos(resize.duration_ns),
        );
    }
    let (from, until) = span(writer.started_unix_ns, writer.duration_ns);
    if start < from {
        format!("it began {} the writer started", relative(start - from))
    } else if start > until {
        format!("it began {} the writer finished", relative(start - until))
    } else {
        format!(
            "it began {} into the writer's run, during no resize",
            nanos(u64::try_from(start - from).unwrap_or_default())
        )
    }
}

/// The summary's lines.
pub fn summary(report: &Report) -> Vec<String> {
    let mut lines = Vec::new();
    let requests = &report.requests;
    let threads = report.request_threads.len();
    let served_for = report
        .finished_unix_ns
        .saturating_sub(report.started_unix_ns);
    lines.push(format!(
        "requests: {} served by {threads} thread(s) in {}",
        requests.count,
        nanos(served_for)
    ));
    if let (Some(p50), Some(p99), Some(max)) = (requests.p50_ns, requests.p99_ns, requests.max_ns) {
        lines.push(format!(
            "latency: p50 {}, p99 {}, max {}; {} request(s) took 100 ms or more",
            nanos(p50),
            nanos(p99),
            nanos(max),
            requests.over_100ms
        ));
    }
    if let Some(Requests {
        count,
        p99_ns: Some(p99),
        max_ns: Some(max),
        over_100ms,
        ..
    }) = &report.requests_while_writing
    {
        lines.push(format!(
            "while the writer ran: {count} requests, p99 {}, max {}; {over_100ms} took 100 ms or more",
            nanos(*p99),
            nanos(*max)
        ));
    }
    if let Some(stall) = &report.longest_stall {
        let context = report
            .writer
            .as_ref()
            .map(|writer| format!("; {}", stall_context(stall, &report.resizes, writer)))
            .unwrap_or_default();
        lines.push(format!(
            "longest stall: {} in {} (tid {}){context}",
            nanos(stall.duration_ns),
            stall.thread,
            stall.tid
        ));
    }
    if let Some(largest) = report
        .resizes
        .iter()
        .max_by_key(|resize| resize.table_bytes)
    {
        lines.push(format!(
            "largest resize: {} -> {} buckets, new table {}, insert took {}",
            largest.from_buckets,
            largest.to_buckets,
            bytes(largest.table_bytes),
            nanos(largest.duration_ns)
        ));
    } else if report.preallocated {
        lines.push("no resize: the table was allocated at start-up".to_owned());
    }
    if let (Some(rss), Some(peak)) = (report.rss_bytes, report.peak_rss_bytes) {
        lines.push(format!(
            "memory: RSS {} at the end, peak {}",
            bytes(rss),
            bytes(peak)
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 500), Some(50));
        assert_eq!(percentile(&values, 990), Some(99));
        assert_eq!(percentile(&[7], 990), Some(7));
        assert_eq!(percentile(&[], 500), None);
    }

    #[test]
    fn stall_against_resizes() {
        let resize = |from, started, took| ResizeEntry {
            from_buckets: from,
            to_buckets: from * 2,
            table_bytes: 0,
            started_unix_ns: started,
            duration_ns: took,
        };
        let resizes = [resize(4, 100, 10), resize(1 << 25, 1_000_000, 500_000_000)];
        let stall = Request {
            started_unix_ns: 3_000_000,
            duration_ns: 400_000_000,
            thread: "feeddb-req-0".into(),
            tid: 1,
        };
        let writer = Writer {
            started_unix_ns: 50,
            duration_ns: 2_000_000_000,
            capacity: 0,
            buckets: 0,
            table_bytes: 0,
        };
        assert_eq!(
            stall_context(&stall, &resizes, &writer),
            "it began 2.0 ms after the 33554432 -> 67108864 buckets resize began and ended \
             98.0 ms before it ended (that insert took 500.0 ms)"
        );
        let early = Request {
            started_unix_ns: 0,
            duration_ns: 10,
            ..stall.clone()
        };
        assert_eq!(
            stall_context(&early, &resizes, &writer),
            "it began 0 µs before the writer started"
        );
        let between = Request {
            started_unix_ns: 600_000_000,
            duration_ns: 5_000_000,
            ..stall
        };
        assert_eq!(
            stall_context(&between, &resizes, &writer),
            "it began 600.0 ms into the writer's run, during no resize"
        );
    }
}
