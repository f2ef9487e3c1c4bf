//! Delivery that loses nothing: requests go into the [`Spool`] (which never
//! waits on the network), and one worker sends them oldest first, retrying
//! with backoff while the backend is away, until each is accepted or
//! refused for good.
//!
//! Every outcome is counted in `freezeframe_export_total{exporter,outcome}`:
//! `queued` (into the spool), `delivered`, `partial` (accepted, but the
//! backend rejected some profiles), `retried` (an attempt that will be
//! repeated), `rejected` (refused for good: dropped) and `dropped` (pushed
//! out of the spool by its size budget, unreadable, or spooled for another
//! exporter than the one configured now) and `expired` (older than the
//! backend takes: Pyroscope refuses a profile that started more than an
//! hour ago, so one spooled through a longer outage is dropped rather than
//! sent only to be refused). The spool's size is
//! in `freezeframe_spool_bytes` and `freezeframe_spool_files`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::retry::{jitter, Backoff, Verdict};
use super::spool::{Entry, Spool};
use super::{Attempt, Exporter, Format, OneAttempt};
use crate::telemetry;

/// Outcome labels of `freezeframe_export_total`.
pub mod outcome {
    pub const QUEUED: &str = "queued";
    pub const DELIVERED: &str = "delivered";
    pub const PARTIAL: &str = "partial";
    pub const RETRIED: &str = "retried";
    pub const REJECTED: &str = "rejected";
    pub const DROPPED: &str = "dropped";
    pub const EXPIRED: &str = "expired";
    pub const ALL: [&str; 7] = [
        QUEUED, DELIVERED, PARTIAL, RETRIED, REJECTED, DROPPED, EXPIRED,
    ];
}

/// Files the spool holds at most, whatever their size: each is a capture,
/// and captures are limited per hour, so this is days of an outage.
pub const MAX_SPOOL_FILES: usize = 10_000;

/// A running delivery worker and the spool it drains.
pub struct Delivery {
    shared: Arc<Shared>,
    worker: JoinHandle<()>,
    stop: CancellationToken,
}

struct Shared {
    spool: Spool,
    /// The format each exporter sends and its `exporter` label, in the
    /// order of the worker's exporters; the first is the profiles'.
    routes: Vec<(Format, &'static str)>,
    /// How old a capture the backend still takes; `None`: any.
    max_age: Option<Duration>,
    wake: Notify,
    /// Set at shutdown: the worker ends once the spool is empty.
    draining: AtomicBool,
}

/// How one request's delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// Accepted; `rejected` profiles of it were refused by the backend.
    Accepted { rejected: i64, message: String },
    /// Refused for good.
    Rejected { reason: String },
}

impl Delivery {
    /// Opens the spool in `directory` (dropping the oldest requests if an
    /// earlier run left more than `max_bytes`) and starts the worker.
    pub fn open(
        directory: &std::path::Path,
        max_bytes: u64,
        exporters: Vec<(Exporter, &'static str)>,
        backoff: Backoff,
        max_age: Option<Duration>,
    ) -> Result<Self, super::ExportError> {
        let (spool, evicted) = Spool::open(directory, max_bytes, MAX_SPOOL_FILES)?;
        let delivery = Self::start_many(spool, exporters, backoff, max_age);
        for entry in evicted {
            tracing::warn!(spooled = %entry.name, "the spool is over its budget: dropped its oldest profile");
            delivery.shared.count(entry.format, outcome::DROPPED);
        }
        delivery.shared.publish_usage();
        Ok(delivery)
    }

    /// Starts the worker on the current tokio runtime. Requests left in the
    /// spool by an earlier run are delivered first. A capture that started
    /// more than `max_age` ago is dropped, and counted as `expired`.
    pub fn start(
        spool: Spool,
        exporter: impl Into<Exporter>,
        exporter_label: &'static str,
        backoff: Backoff,
        max_age: Option<Duration>,
    ) -> Self {
        Self::start_many(
            spool,
            vec![(exporter.into(), exporter_label)],
            backoff,
            max_age,
        )
    }

    /// [`Self::start`] with an exporter per format, each with its label:
    /// the profiles' first, then others (the capture span's), which share
    /// the spool and its order.
    pub fn start_many(
        spool: Spool,
        exporters: Vec<(Exporter, &'static str)>,
        backoff: Backoff,
        max_age: Option<Duration>,
    ) -> Self {
        assert!(!exporters.is_empty(), "delivery needs an exporter");
        let routes = exporters
            .iter()
            .map(|(exporter, label)| (exporter.format(), *label))
            .collect();
        let exporters = exporters
            .into_iter()
            .map(|(exporter, _)| exporter)
            .collect();
        let shared = Arc::new(Shared {
            spool,
            routes,
            max_age,
            wake: Notify::new(),
            draining: AtomicBool::new(false),
        });
        shared.publish_usage();
        let (bytes, files) = shared.spool.usage();
        if files > 0 {
            tracing::info!(files, bytes, spool = %shared.spool.directory().display(), "delivering profiles spooled by an earlier run");
        }
        let stop = CancellationToken::new();
        let worker = tokio::spawn(work(Arc::clone(&shared), exporters, backoff, stop.clone()));
        Delivery {
            shared,
            worker,
            stop,
        }
    }

    /// Queues an encoded export request, of [`Self::format`], for a
    /// capture that `started` then. Writes it to the spool and returns:
    /// never waits for the backend.
    pub fn submit(&self, capture_id: &str, started: SystemTime, request: &[u8]) {
        self.shared
            .submit(self.format(), capture_id, started, request);
    }

    /// [`Self::submit`] for a request of another format this delivery has
    /// an exporter for; a request no exporter takes is dropped and counted.
    pub fn submit_as(&self, format: Format, capture_id: &str, started: SystemTime, request: &[u8]) {
        self.shared.submit(format, capture_id, started, request);
    }

    /// The format of the requests this delivery's (first) exporter sends.
    pub fn format(&self) -> Format {
        self.shared.routes[0].0
    }

    /// Whether an exporter of this delivery sends `format`.
    pub fn sends(&self, format: Format) -> bool {
        self.shared.route(format).is_some()
    }

    /// Keeps delivering for up to `within`, then stops; whatever was not
    /// delivered stays in the spool for the next run.
    pub async fn finish(mut self, within: Duration) {
        self.shared.draining.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        if tokio::time::timeout(within, &mut self.worker)
            .await
            .is_err()
        {
            self.stop.cancel();
            let _ = (&mut self.worker).await;
        }
        let (bytes, files) = self.shared.spool.usage();
        if files > 0 {
            tracing::warn!(files, bytes, spool = %self.shared.spool.directory().display(), "profiles not yet delivered stay spooled for the next run");
        }
    }
}

impl Shared {
    /// The position of the exporter of `format`.
    fn route(&self, format: Format) -> Option<usize> {
        self.routes.iter().position(|(sent, _)| *sent == format)
    }

    fn submit(&self, format: Format, capture_id: &str, started: SystemTime, request: &[u8]) {
        if self.route(format).is_none() {
            tracing::error!(
                capture = capture_id,
                "no exporter sends {} requests: not exported",
                format.tag()
            );
            self.count(format, outcome::DROPPED);
            return;
        }
        let put = self.spool.put(capture_id, format, started, request);
        // The spool's gauges first: whoever sees the profile counted as
        // queued sees it in the spool too.
        self.publish_usage();
        match put {
            Ok(put) => {
                for evicted in &put.evicted {
                    tracing::warn!(spooled = %evicted.name, bytes = evicted.bytes, "the spool is full: dropped its oldest profile to make room");
                    self.count(evicted.format, outcome::DROPPED);
                }
                match put.stored {
                    Some(_) => self.count(format, outcome::QUEUED),
                    None => {
                        tracing::error!(capture = capture_id, bytes = request.len(), "the profile is larger than the whole spool budget ([export] spool_max_bytes): not exported");
                        self.count(format, outcome::DROPPED);
                    }
                }
            }
            Err(err) => {
                tracing::error!(
                    capture = capture_id,
                    "cannot spool the profile, so it is not exported: {err}"
                );
                self.count(format, outcome::DROPPED);
            }
        }
        self.wake.notify_one();
    }

    /// How long the backend still takes the entry's capture; `Some(ZERO)`
    /// once it no longer does, `None` without a limit.
    fn time_left(&self, entry: &Entry) -> Option<Duration> {
        let max_age = self.max_age?;
        let age = SystemTime::now()
            .duration_since(entry.started)
            .unwrap_or_default();
        Some(max_age.saturating_sub(age))
    }

    fn expire(&self, entry: &Entry) {
        let age = SystemTime::now()
            .duration_since(entry.started)
            .unwrap_or_default();
        tracing::warn!(
            spooled = %entry.name,
            age = %humantime::format_duration(Duration::from_secs(age.as_secs())),
            "dropping a spooled profile older than the backend takes ([export] max_age; Pyroscope refuses profiles older than 1h)"
        );
        self.spool.remove(entry);
        self.count(entry.format, outcome::EXPIRED);
        self.publish_usage();
    }

    /// Counts under the label of the exporter of `format`, or the first's
    /// when none sends it.
    fn count(&self, format: Format, outcome: &'static str) {
        let label = self.routes[self.route(format).unwrap_or(0)].1;
        metrics::counter!(telemetry::EXPORTS, "exporter" => label, "outcome" => outcome)
            .increment(1);
    }

    fn publish_usage(&self) {
        let (bytes, files) = self.spool.usage();
        metrics::gauge!(telemetry::SPOOL_BYTES).set(bytes as f64);
        metrics::gauge!(telemetry::SPOOL_FILES).set(files as f64);
    }
}

async fn work(
    shared: Arc<Shared>,
    exporters: Vec<Exporter>,
    backoff: Backoff,
    stop: CancellationToken,
) {
    loop {
        let Some(entry) = shared.spool.oldest() else {
            if shared.draining.load(Ordering::Acquire) {
                return;
            }
            tokio::select! {
                () = shared.wake.notified() => continue,
                () = stop.cancelled() => return,
            }
        };
        if shared.time_left(&entry) == Some(Duration::ZERO) {
            shared.expire(&entry);
            continue;
        }
        let Some(route) = shared.route(entry.format) else {
            tracing::error!(spooled = %entry.name, "dropping a spooled {} request: no exporter configured now sends it", entry.format.tag());
            shared.spool.remove(&entry);
            shared.count(entry.format, outcome::DROPPED);
            shared.publish_usage();
            continue;
        };
        let exporter = &exporters[route];
        let request = match shared.spool.read(&entry) {
            Ok(Some(request)) => Bytes::from(request),
            // Pushed out of the spool meanwhile (already counted).
            Ok(None) => continue,
            Err(err) => {
                tracing::error!("dropping a spooled profile that cannot be read: {err}");
                shared.spool.remove(&entry);
                shared.count(entry.format, outcome::DROPPED);
                shared.publish_usage();
                continue;
            }
        };
        let on_retry = |reason: &str, delay: Duration, attempt: u32| {
            shared.count(entry.format, outcome::RETRIED);
            log_retry(&entry, reason, delay, attempt);
        };
        // Retrying stops when the backend would refuse the profile anyway.
        let left = shared.time_left(&entry);
        let expiry = async {
            match left {
                Some(left) => tokio::time::sleep(left).await,
                None => std::future::pending().await,
            }
        };
        let delivered = tokio::select! {
            delivered = deliver(exporter, request, backoff, &stop, on_retry) => delivered,
            () = expiry => {
                shared.expire(&entry);
                continue;
            }
        };
        let Some(delivered) = delivered else {
            // Stopped: the request stays in the spool.
            return;
        };
        shared.spool.remove(&entry);
        match delivered {
            Delivered::Accepted { rejected, message } if rejected > 0 => {
                tracing::warn!(spooled = %entry.name, rejected, "the backend accepted the profile only in part: {message}");
                shared.count(entry.format, outcome::PARTIAL);
            }
            Delivered::Accepted { message, .. } => {
                if !message.is_empty() {
                    tracing::warn!(spooled = %entry.name, "the backend accepted the profile with a warning: {message}");
                }
                tracing::info!(spooled = %entry.name, bytes = entry.bytes, "profile delivered");
                shared.count(entry.format, outcome::DELIVERED);
            }
            Delivered::Rejected { reason } => {
                tracing::error!(spooled = %entry.name, "the backend refused the profile for good, dropping it: {reason}");
                shared.count(entry.format, outcome::REJECTED);
            }
        }
        shared.publish_usage();
    }
}

/// Sends one request until it is accepted or refused for good, waiting
/// between attempts as the backend asks (`Retry-After`, `RetryInfo`) or
/// with exponential backoff. `None` if `stop` came first.
pub async fn deliver(
    exporter: &impl OneAttempt,
    request: Bytes,
    backoff: Backoff,
    stop: &CancellationToken,
    mut on_retry: impl FnMut(&str, Duration, u32),
) -> Option<Delivered> {
    let mut attempt: u32 = 0;
    loop {
        let answer = tokio::select! {
            answer = exporter.attempt(request.clone()) => answer,
            () = stop.cancelled() => return None,
        };
        let (after, reason) = match answer {
            Attempt::Accepted { rejected, message } => {
                return Some(Delivered::Accepted { rejected, message })
            }
            Attempt::Failed {
                verdict: Verdict::Final,
                reason,
            } => return Some(Delivered::Rejected { reason }),
            Attempt::Failed {
                verdict: Verdict::Retry { after },
                reason,
            } => (after, reason),
        };
        let delay = after.unwrap_or_else(|| backoff.delay(attempt, jitter()));
        on_retry(&reason, delay, attempt);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => return None,
        }
        attempt = attempt.saturating_add(1);
    }
}

/// The first failures and then every tenth: an outage of hours should not
/// flood the log.
fn log_retry(entry: &Entry, reason: &str, delay: Duration, attempt: u32) {
    if attempt < 3 || attempt.is_multiple_of(10) {
        tracing::warn!(
            spooled = %entry.name,
            attempt = attempt + 1,
            retry_in = %humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)),
            "export failed, will retry: {reason}"
        );
    }
}
