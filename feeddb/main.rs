//! feeddb: a reproducer of the freeze freezeframe was built to catch.
//!
//! A "feed DB" keeps its index in a Rust `HashMap` that grows across a
//! resize boundary while request threads serve requests and export their
//! latency over OTLP. With `mlockall(MCL_FUTURE)`, as latency-sensitive
//! databases do, the kernel populates the resized table's new mapping
//! under the process's `mmap_lock`, and every request thread that maps or
//! unmaps memory meanwhile waits for it: the service freezes for hundreds
//! of milliseconds while its CPU chart shows one busy core. Preallocating
//! the table at start-up (`--preallocate`) removes the freeze.

mod clock;
mod format;
mod mapping;
mod report;
mod requests;
mod table;
mod telemetry;

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Barrier};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::builder::BoolishValueParser;
use clap::{Parser, ValueEnum};

use crate::clock::Clock;
use crate::format::{bytes, duration};
use crate::report::{Report, ResizeEntry};
use crate::requests::{Served, Server, SLOW};
use crate::table::{buckets, entry_bytes, table_bytes, Value, Written};
use crate::telemetry::Telemetry;

#[global_allocator]
static ALLOCATOR: mapping::Allocator = mapping::Allocator;

/// The reproducer workload: a feed DB whose in-memory index (a Rust
/// HashMap) grows across a resize boundary while request threads serve
/// and export their latency (db.client.operation.duration) and spans over
/// OTLP/gRPC. The OTEL_* variables say where to (OTEL_EXPORTER_OTLP_ENDPOINT,
/// default http://localhost:4317) and how often (OTEL_METRIC_EXPORT_INTERVAL
/// in ms, default here 500).
#[derive(Debug, Parser)]
#[command(name = "feeddb", version)]
struct Args {
    /// Keys to insert. The default is just past the capacity of a table of
    /// 2^25 buckets (29360128), so the last inserts double it to 2^26.
    #[arg(long, env = "FEEDDB_ENTRIES", default_value_t = 29_400_000)]
    entries: u64,

    /// Bytes of each value (keys are u64): 8 (u64) or 16 ([u64; 2]).
    #[arg(long, env = "FEEDDB_VALUE_BYTES", value_enum, default_value = "8")]
    value_bytes: ValueBytes,

    /// Entries loaded at start-up, before serving, into a table sized for
    /// them (default: 99 % of the largest table that cannot hold
    /// --entries, so that the live writes cross exactly one resize).
    #[arg(long, env = "FEEDDB_LOAD")]
    load: Option<u64>,

    /// The fix: allocate the whole table (HashMap::with_capacity) at
    /// start-up, before the request threads and the exporters start.
    #[arg(long, env = "FEEDDB_PREALLOCATE", value_parser = BoolishValueParser::new())]
    preallocate: bool,

    /// Do not call mlockall(MCL_FUTURE) at start-up (by default it is
    /// called, as latency-sensitive databases do; it is what makes the
    /// kernel populate each new mapping under the mmap_lock).
    #[arg(long, env = "FEEDDB_NO_MLOCKALL", value_parser = BoolishValueParser::new())]
    no_mlockall: bool,

    /// Threads serving requests, each one request every ~10 ms.
    #[arg(long, env = "FEEDDB_REQUEST_THREADS", default_value_t = 3,
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    request_threads: u16,

    /// Serving before the writer starts.
    #[arg(long, env = "FEEDDB_WARMUP", default_value = "3s", value_parser = humantime::parse_duration)]
    warmup: Duration,

    /// Serving after the writer finishes.
    #[arg(long, env = "FEEDDB_COOLDOWN", default_value = "3s", value_parser = humantime::parse_duration)]
    cooldown: Duration,

    /// Write a JSON report of the run here.
    #[arg(long, env = "FEEDDB_REPORT")]
    report: Option<PathBuf>,

    /// The service.name resource attribute.
    #[arg(long, env = "FEEDDB_SERVICE_NAME", default_value = "feed-db")]
    service_name: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ValueBytes {
    #[value(name = "8")]
    Eight,
    #[value(name = "16")]
    Sixteen,
}

/// How long the exporters get to send their last points and spans at exit
/// (an unreachable endpoint would otherwise hold the exit for its retries).
const FLUSH_WITHIN: Duration = Duration::from_secs(2);

fn main() {
    let args = Args::parse();
    let outcome = match args.value_bytes {
        ValueBytes::Eight => run::<u64>(&args),
        ValueBytes::Sixteen => run::<[u64; 2]>(&args),
    };
    if let Err(err) = outcome {
        eprintln!("feeddb: {err:#}");
        std::process::exit(1);
    }
}

fn run<V: Value>(args: &Args) -> Result<()> {
    let pid = std::process::id();
    println!("feeddb: pid {pid}");
    io::stdout().flush().ok();
    let clock = Clock::start();
    let stop = stop_on_signals()?;

    let mlockall = !args.no_mlockall;
    if mlockall {
        lock_memory::<V>(args.entries, args.preallocate)?;
        println!(
            "feeddb: mlockall(MCL_FUTURE): the kernel populates every new mapping as it is made"
        );
    }
    println!(
        "feeddb: {} entries of {} bytes (u64 keys, {}-byte values), {} request thread(s)",
        args.entries,
        entry_bytes::<V>(),
        std::mem::size_of::<V>(),
        args.request_threads
    );

    let mut map: HashMap<u64, V> = if args.preallocate {
        let started = Instant::now();
        let map = HashMap::with_capacity(usize::try_from(args.entries)?);
        let buckets = buckets(map.capacity());
        println!(
            "{} preallocated: capacity {} ({buckets} buckets, table {}) in {}",
            clock.stamp(Instant::now()),
            map.capacity(),
            bytes(table_bytes::<V>(buckets)),
            duration(started.elapsed())
        );
        map
    } else {
        HashMap::new()
    };
    let loaded = args
        .load
        .unwrap_or_else(|| table::default_load(args.entries))
        .min(args.entries);
    if loaded > 0 {
        let started = Instant::now();
        table::load(&mut map, loaded);
        let buckets = buckets(map.capacity());
        println!(
            "{} loaded {loaded} entries at start-up in {}: {buckets} buckets (table {}), room for {} more",
            clock.stamp(Instant::now()),
            duration(started.elapsed()),
            bytes(table_bytes::<V>(buckets)),
            map.capacity() - map.len()
        );
    }

    let telemetry = Telemetry::start(&args.service_name)?;
    println!("feeddb: exporting {}", Telemetry::describe());

    // Every thread starts before serving does: under mlockall a new
    // thread's stack is populated under the mmap_lock too, which would
    // stall the requests already running.
    let (go, writer) = spawn_writer::<V>(map, loaded, args.entries, &stop, clock)?;
    let threads = usize::from(args.request_threads);
    let ready = Arc::new(Barrier::new(threads + 1));
    let servers = (0..threads)
        .map(|index| {
            let server = Server {
                index,
                clock,
                tracer: telemetry.tracer.clone(),
                histogram: telemetry.histogram.clone(),
                attributes: telemetry::attributes(),
            };
            let stop = Arc::clone(&stop);
            let ready = Arc::clone(&ready);
            thread::Builder::new()
                .name(Server::name(index))
                .spawn(move || server.run(&ready, &stop))
                .context("cannot start a request thread")
        })
        .collect::<Result<Vec<_>>>()?;
    ready.wait();
    println!(
        "{} serving; the writer starts in {}",
        clock.stamp(Instant::now()),
        humantime::format_duration(args.warmup)
    );

    if pause(&stop, args.warmup) {
        go.send(()).ok();
    }
    drop(go);
    let (writer_tid, written) = writer.join().expect("the writer panicked");
    if let Some(done) = &written {
        let table = buckets(done.map.capacity());
        println!(
            "{} writer: inserted {} entries in {}{}; table {} buckets ({}), capacity {}",
            clock.stamp(Instant::now()),
            done.inserted,
            duration(done.took),
            if done.interrupted {
                " (interrupted)"
            } else {
                ""
            },
            table,
            bytes(table_bytes::<V>(table)),
            done.map.capacity()
        );
        if !stop.load(Ordering::Relaxed) {
            println!(
                "{} serving for {} more",
                clock.stamp(Instant::now()),
                humantime::format_duration(args.cooldown)
            );
        }
        pause(&stop, args.cooldown);
    }
    // Set by a signal already, or now by us.
    let interrupted = stop.swap(true, Ordering::Relaxed);
    if interrupted {
        println!("{} interrupted: stopping", clock.stamp(Instant::now()));
    }
    let served: Vec<Served> = servers
        .into_iter()
        .map(|server| server.join().expect("a request thread panicked"))
        .collect();
    let finished = Instant::now();
    for thread in &served {
        if let Some(failed) = &thread.failed {
            eprintln!("feeddb: {} (tid {}): {failed}", thread.name, thread.tid);
        }
    }

    let report = build_report(
        args,
        pid,
        writer_tid,
        loaded,
        written.as_ref(),
        &served,
        clock,
        finished,
        mlockall,
        interrupted,
    );
    for line in report::summary(&report) {
        println!("summary: {line}");
    }
    let saved = args.report.as_ref().map(|path| {
        let mut json = serde_json::to_vec_pretty(&report)?;
        json.push(b'\n');
        fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
        println!("feeddb: report written to {}", path.display());
        Ok::<_, anyhow::Error>(())
    });
    io::stdout().flush().ok();

    for failure in telemetry.shutdown(FLUSH_WITHIN) {
        eprintln!("feeddb: warning: flushing the OTLP exporters at exit: {failure}");
    }
    saved.transpose()?;
    // The index lives until here; the kernel takes it back at exit.
    drop(written);
    Ok(())
}

/// Starts the writer's thread, which waits for the word to go (a message
/// on the returned sender; dropped unsent, the writer returns at once), then
/// fills the index. It returns its kernel tid and what it wrote.
#[allow(clippy::type_complexity)]
fn spawn_writer<V: Value>(
    map: HashMap<u64, V>,
    first: u64,
    entries: u64,
    stop: &Arc<AtomicBool>,
    clock: Clock,
) -> Result<(Sender<()>, JoinHandle<(i32, Option<Written<V>>)>)> {
    let stop = Arc::clone(stop);
    let (go, wait) = mpsc::channel();
    let writer = thread::Builder::new()
        .name("feeddb-writer".to_owned())
        .spawn(move || {
            let tid = unsafe { libc::gettid() };
            if wait.recv().is_err() {
                return (tid, None);
            }
            println!(
                "{} writer: inserting {} entries, up to {entries} (tid {tid})",
                clock.stamp(Instant::now()),
                entries - first
            );
            let written = table::fill(map, first, entries, &stop, |resize| {
                // Small tables come and go in microseconds: only the
                // resizes that allocate a MiB or more are worth a line.
                if resize.table_bytes >= 1 << 20 {
                    println!(
                        "{} resize: {} -> {} buckets, new table {}, insert took {} (writer tid {tid})",
                        clock.stamp(resize.started),
                        resize.from_buckets,
                        resize.to_buckets,
                        bytes(resize.table_bytes),
                        duration(resize.took)
                    );
                }
            });
            (tid, Some(written))
        })
        .context("cannot start the writer thread")?;
    Ok((go, writer))
}

#[allow(clippy::too_many_arguments)]
fn build_report<V: Value>(
    args: &Args,
    pid: u32,
    writer_tid: i32,
    loaded: u64,
    written: Option<&Written<V>>,
    served: &[Served],
    clock: Clock,
    finished: Instant,
    mlockall: bool,
    interrupted: bool,
) -> Report {
    let resizes: Vec<ResizeEntry> = written
        .map(|written| {
            written
                .resizes
                .iter()
                .map(|resize| ResizeEntry::new(resize, &clock))
                .collect()
        })
        .unwrap_or_default();
    let writer = written.map(|written| {
        let buckets = buckets(written.map.capacity());
        report::Writer {
            started_unix_ns: clock.unix_ns(clock.since_epoch_ns(written.started)),
            duration_ns: format::ns(written.took),
            capacity: written.map.capacity(),
            buckets,
            table_bytes: table_bytes::<V>(buckets),
        }
    });
    Report {
        pid,
        writer_tid,
        entries: args.entries,
        loaded,
        inserted: written.map_or(0, |written| written.inserted),
        value_bytes: std::mem::size_of::<V>(),
        entry_bytes: entry_bytes::<V>(),
        preallocated: args.preallocate,
        mlockall,
        service_name: args.service_name.clone(),
        request_threads: served
            .iter()
            .map(|thread| report::Thread {
                name: thread.name.clone(),
                tid: thread.tid,
                requests: thread.samples.len() as u64,
                failed: thread.failed.clone(),
            })
            .collect(),
        started_unix_ns: clock.unix_ns(0),
        finished_unix_ns: clock.unix_ns(clock.since_epoch_ns(finished)),
        interrupted,
        writer,
        resizes,
        requests: report::requests(served, None),
        requests_while_writing: written.map(|written| {
            let from = clock.since_epoch_ns(written.started);
            report::requests(served, Some((from, from + format::ns(written.took))))
        }),
        longest_stall: report::longest(served, &clock),
        slow_requests: report::slower_than(served, format::ns(SLOW), &clock),
        rss_bytes: status_bytes("VmRSS"),
        peak_rss_bytes: status_bytes("VmHWM"),
    }
}

/// SIGINT and SIGTERM set the returned flag: everything winds down, and
/// the report is still written. A second SIGINT or SIGTERM exits at once.
fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop))
            .context("cannot install a signal handler")?;
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("cannot install a signal handler")?;
    }
    Ok(stop)
}

/// Sleeps for `length` unless `stop` is set first; whether it slept it all.
fn pause(stop: &AtomicBool, length: Duration) -> bool {
    let until = Instant::now() + length;
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        thread::sleep(left.min(Duration::from_millis(20)));
    }
}

/// `mlockall(MCL_FUTURE)`, refusing to go on where the locked index could
/// not fit under RLIMIT_MEMLOCK: an allocation past it fails, and the
/// process would abort half way through the run.
fn lock_memory<V: Value>(entries: u64, preallocate: bool) -> Result<()> {
    const ADVICE: &str = "raise RLIMIT_MEMLOCK (`ulimit -l unlimited`, or the container's \
                          memlock limit), grant CAP_IPC_LOCK, or run with --no-mlockall";
    // SAFETY: no pointers; it only changes how later mappings are made.
    if unsafe { libc::mlockall(libc::MCL_FUTURE) } != 0 {
        let err = io::Error::last_os_error();
        let why = match err.raw_os_error() {
            Some(libc::EPERM) => {
                "EPERM: without CAP_IPC_LOCK, locking needs a nonzero RLIMIT_MEMLOCK"
            }
            Some(libc::ENOMEM) => "ENOMEM: more is mapped than RLIMIT_MEMLOCK allows",
            _ => "unexpected",
        };
        bail!("mlockall(MCL_FUTURE) failed: {err} ({why}); {ADVICE}");
    }
    if has_capability(CAP_IPC_LOCK) {
        return Ok(());
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: writes one rlimit we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return Ok(());
    }
    // The final table, and while the last resize copies, the one before it.
    let last = (usize::try_from(entries)
        .unwrap_or(usize::MAX)
        .saturating_mul(8)
        / 7)
    .next_power_of_two()
    .max(4);
    let mut index = table_bytes::<V>(last);
    if !preallocate {
        index += table_bytes::<V>(last / 2);
    }
    // Every other mapping counts too, even reserved and inaccessible ones:
    // thread stacks, the allocator's per-thread arenas (64 MiB reserved
    // each), the exporters' buffers. This is a floor, not a bound.
    const OTHER_MAPPINGS: u64 = 512 << 20;
    if limit.rlim_cur < index + OTHER_MAPPINGS {
        // SAFETY: undoes the call above.
        unsafe { libc::munlockall() };
        bail!(
            "mlockall(MCL_FUTURE) makes every later mapping count against RLIMIT_MEMLOCK, which is \
             {} here without CAP_IPC_LOCK, but the index alone needs {} and the process's other \
             mappings (stacks, allocator arenas) about {} more: an allocation or a thread would \
             fail with EAGAIN part way through; {ADVICE}",
            bytes(limit.rlim_cur),
            bytes(index),
            bytes(OTHER_MAPPINGS)
        );
    }
    Ok(())
}

const CAP_IPC_LOCK: u32 = 14;

/// Whether the process has `capability` in its effective set.
fn has_capability(capability: u32) -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("CapEff:"))?;
            u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
        })
        .is_some_and(|effective| effective & (1 << capability) != 0)
}

/// A `kB` field of /proc/self/status, in bytes.
fn status_bytes(field: &str) -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status
        .lines()
        .find(|line| line.split(':').next() == Some(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli() {
        Args::command().debug_assert();
        let args =
            Args::try_parse_from(["feeddb", "--value-bytes", "16", "--preallocate"]).unwrap();
        assert!(matches!(args.value_bytes, ValueBytes::Sixteen));
        assert!(args.preallocate && !args.no_mlockall);
        assert_eq!(args.entries, 29_400_000);
        assert!(Args::try_parse_from(["feeddb", "--value-bytes", "12"]).is_err());
    }

    #[test]
    fn reads_proc_status() {
        assert!(status_bytes("VmRSS").unwrap() > 0);
    }
}
