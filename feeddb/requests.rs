//! The request threads: each serves "get feed" requests in a loop, the way
//! the incident's service did, and reports each request's latency.
//!
//! A request maps a response buffer straight from the kernel (as allocators
//! do for large blocks), fills it from a small per-thread structure and
//! unmaps it. It never touches the big index (the writer owns that) nor any
//! lock of ours: besides the CPU, what a request can wait for is the
//! kernel's `mmap_lock`, which mmap and munmap take for writing.

use std::collections::HashMap;
use std::hint::black_box;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use opentelemetry::metrics::Histogram;
use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::SdkTracer;

use crate::clock::Clock;
use crate::format::{duration, ns};
use crate::mapping;

/// The response buffer, mapped straight from the kernel as allocators do
/// for large blocks. (glibc's threshold starts at 128 KiB and moves, so the
/// request calls mmap itself rather than depend on an allocator's
/// heuristics: every request takes the lock.)
const RESPONSE_BYTES: usize = 64 * 1024;

/// The per-thread lookup structure: small, so that it stays in cache.
const FEEDS: u64 = 1024;

/// The pause between two requests of one thread: about 100 requests a
/// second per thread.
///
/// A stall delays one request per thread, and those requests all finish
/// together, in one export interval. A p99 over that interval passes the
/// stalled requests' latency only if they are more than 1 % of it, and the
/// interval that holds the stall's end may be almost all fast requests (the
/// SDK collects on its own clock, often in the middle of the stall). At one
/// request every 10 ms, a 500 ms interval holds at most about 50 requests a
/// thread, so the stalled ones are about 2 % of any interval, whatever its
/// phase. (At one every 2 ms they were 0.8 % of a 250 ms interval, and
/// whether the rule fired depended on when the SDK happened to collect.)
const PAUSE: Duration = Duration::from_millis(10);

/// Requests at least this slow are printed as they finish and counted.
pub const SLOW: Duration = Duration::from_millis(100);

/// Room for this many requests is reserved before serving starts, so that
/// recording one never has to grow the vector (which would map memory, and
/// wait on the very lock we measure) in the middle of a run. Past it, the
/// vector grows between requests, outside any measured time.
const RESERVED_SAMPLES: usize = 1 << 18;

pub const SPAN_NAME: &str = "get feed";

/// One served request.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// When it started, since the run's clock epoch.
    pub start_ns: u64,
    pub took_ns: u64,
}

/// What one request thread did.
pub struct Served {
    pub name: String,
    pub tid: i32,
    pub samples: Vec<Sample>,
    /// Why the thread stopped early, if it did.
    pub failed: Option<String>,
}

/// What a request thread needs.
pub struct Server {
    pub index: usize,
    pub clock: Clock,
    pub tracer: SdkTracer,
    pub histogram: Histogram<f64>,
    /// The histogram's attributes (the metric's identity).
    pub attributes: Vec<KeyValue>,
}

impl Server {
    pub fn name(index: usize) -> String {
        format!("feeddb-req-{index}")
    }

    /// Serves until `stop` is set, once every thread is `ready`.
    pub fn run(self, ready: &Barrier, stop: &AtomicBool) -> Served {
        let name = Self::name(self.index);
        let tid = unsafe { libc::gettid() };
        let feeds: HashMap<u64, u64> = (0..FEEDS)
            .map(|feed| (feed, feed.wrapping_mul(0x2545_f491_4f6c_dd1d)))
            .collect();
        let mut span_attributes = self.attributes.clone();
        span_attributes.push(KeyValue::new("thread.id", i64::from(tid)));
        span_attributes.push(KeyValue::new("thread.name", name.clone()));
        let mut samples = Vec::with_capacity(RESERVED_SAMPLES);
        let mut failed = None;
        let mut number: u64 = 0;
        ready.wait();
        while !stop.load(Ordering::Relaxed) {
            if samples.len() == samples.capacity() {
                samples.reserve(samples.capacity());
            }
            let started = Instant::now();
            let mut span = self
                .tracer
                .span_builder(SPAN_NAME)
                .with_kind(SpanKind::Server)
                .with_attributes(span_attributes.clone())
                .start(&self.tracer);
            let answer = respond(&feeds, number);
            let took = started.elapsed();
            match answer {
                Ok(answer) => {
                    black_box(answer);
                }
                Err(err) => {
                    span.set_status(Status::error(format!("mmap: {err}")));
                    span.end();
                    failed = Some(format!("the response buffer's mapping failed: {err}"));
                    break;
                }
            }
            self.histogram
                .record(took.as_secs_f64(), self.attributes.as_slice());
            span.end();
            let sample = Sample {
                start_ns: self.clock.since_epoch_ns(started),
                took_ns: ns(took),
            };
            samples.push(sample);
            if took >= SLOW {
                println!(
                    "{} slow request: {name} (tid {tid}) took {}",
                    self.clock.stamp(started),
                    duration(took)
                );
            }
            number += 1;
            thread::sleep(PAUSE);
        }
        Served {
            name,
            tid,
            samples,
            failed,
        }
    }
}

/// One request's work: map a response buffer, fill it from the thread's
/// feeds, unmap it.
fn respond(feeds: &HashMap<u64, u64>, number: u64) -> io::Result<u64> {
    let buffer = mapping::map(RESPONSE_BYTES)?;
    // SAFETY: a fresh private anonymous mapping, used only within its
    // length and unmapped once.
    unsafe {
        let words = buffer.cast::<u64>();
        let feed = feeds
            .get(&(number.wrapping_mul(7919) % FEEDS))
            .copied()
            .unwrap_or_default();
        for word in 0..RESPONSE_BYTES / 8 {
            words.add(word).write_volatile(feed ^ word as u64);
        }
        let answer = words.add(number as usize % (RESPONSE_BYTES / 8)).read();
        mapping::unmap(buffer, RESPONSE_BYTES)?;
        Ok(answer)
    }
}
