//! Finished captures on their way out: each is held for `[export]
//! link_grace` (the spans of the requests it froze end, and their exemplars
//! are recorded, only after the thaw), then linked to those requests, its
//! pprof rewritten with the links, and its OTLP request handed to delivery.
//!
//! Holding never blocks anything: each capture waits in a task of its own,
//! and at shutdown the waiting is cut short so that every capture is linked
//! with what has arrived and spooled before the sidecar exits.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use tokio::runtime::Handle;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::captures::describe;
use super::evidence::{self, ExemplarStore};
use crate::encode::otlp::{self, Envelope};
use crate::encode::trace::{self, CaptureSpan};
use crate::encode::{pprof, pyroscope};
use crate::export::delivery::Delivery;
use crate::export::files::FileSink;
use crate::export::resource::{self, CaptureFacts, ProcessFacts};
use crate::export::{host_name, links, random_id, Format};
use crate::ingest::SpanStore;
use crate::profile::Profile;
use crate::telemetry;
use crate::trigger::Firing;

/// Captures held at once, at most; beyond this a capture is linked at once
/// with what has arrived, so memory stays bounded in a storm of firings.
const MAX_HELD: usize = 16;

/// A capture that was written to files and awaits linking and export.
pub struct Finished {
    pub capture_id: String,
    pub firing: Firing,
    pub profile: Profile,
    /// The capture's large address-space calls, when it had any.
    pub address_space: Option<Profile>,
    pub process: ProcessFacts,
}

#[derive(Clone)]
pub struct Exports {
    inner: Arc<Inner>,
    held: Arc<Mutex<JoinSet<()>>>,
    /// Cancelled at shutdown: stop waiting, link and spool now.
    hurry: CancellationToken,
    runtime: Handle,
}

struct Inner {
    sink: FileSink,
    spans: Arc<SpanStore>,
    exemplars: Arc<ExemplarStore>,
    link_grace: Duration,
    max_resource_attributes: usize,
    /// Whether an OTLP exporter is configured at all.
    exporting: bool,
    /// Taken out at shutdown, to be drained.
    delivery: Mutex<Option<Delivery>>,
    host_name: Option<String>,
    /// The sidecar's own resource, for its capture spans.
    sidecar_resource: Vec<crate::encode::otlp::Attribute>,
}

impl Exports {
    /// Must be called inside the tokio runtime that will run the holds.
    pub fn new(
        sink: FileSink,
        spans: Arc<SpanStore>,
        exemplars: Arc<ExemplarStore>,
        link_grace: Duration,
        max_resource_attributes: usize,
        delivery: Option<Delivery>,
    ) -> Self {
        Exports {
            inner: Arc::new(Inner {
                sink,
                spans,
                exemplars,
                link_grace,
                max_resource_attributes,
                exporting: delivery.is_some(),
                delivery: Mutex::new(delivery),
                sidecar_resource: resource::sidecar(
                    |name| std::env::var(name).ok(),
                    host_name().as_deref(),
                ),
                host_name: host_name(),
            }),
            held: Arc::new(Mutex::new(JoinSet::new())),
            hurry: CancellationToken::new(),
            runtime: Handle::current(),
        }
    }

    /// Takes a finished capture; callable from any thread, never waits.
    pub fn submit(&self, finished: Finished) {
        let inner = Arc::clone(&self.inner);
        let hurry = self.hurry.clone();
        let mut held = self.held.lock().expect("held captures");
        while held.try_join_next().is_some() {}
        let grace = if held.len() >= MAX_HELD || hurry.is_cancelled() {
            Duration::ZERO
        } else {
            inner.link_grace
        };
        held.spawn_on(
            async move {
                tokio::select! {
                    () = tokio::time::sleep(grace) => {}
                    () = hurry.cancelled() => {}
                }
                // Encoding and gzip take a while for a big capture.
                let _ = tokio::task::spawn_blocking(move || inner.link_and_export(finished)).await;
            },
            &self.runtime,
        );
    }

    /// Links and spools every held capture now, then lets delivery run for
    /// up to `delivery_grace` before it stops; the rest stays spooled.
    pub async fn finish(&self, delivery_grace: Duration) {
        self.hurry.cancel();
        let mut held = std::mem::take(&mut *self.held.lock().expect("held captures"));
        while held.join_next().await.is_some() {}
        let delivery = self.inner.delivery.lock().expect("delivery").take();
        if let Some(delivery) = delivery {
            delivery.finish(delivery_grace).await;
        }
    }
}

impl Inner {
    fn link_and_export(&self, finished: Finished) {
        let Finished {
            capture_id,
            firing,
            mut profile,
            address_space,
            process,
        } = finished;
        let end = profile.start + profile.duration;
        let requests = evidence::requests(
            &self.spans,
            &self.exemplars,
            firing.series.as_ref(),
            (profile.start, end),
            slow_by_the_rule(&firing),
        );
        let summary = links::link(&mut profile, &requests);
        metrics::histogram!(telemetry::LINKED_REQUESTS).record(summary.requests as f64);
        let pprof = pprof::encode(&profile);
        if summary.requests > 0 {
            tracing::info!(
                capture = %capture_id,
                requests = summary.requests,
                candidates = requests.len(),
                linked_seconds = summary.linked_ns as f64 / 1e9,
                "capture linked to the requests it froze"
            );
            if let Err(err) = self.sink.replace_pprof(&capture_id, &pprof) {
                tracing::error!(capture = %capture_id, "cannot rewrite the pprof with its span links: {err}");
            }
        } else {
            tracing::info!(capture = %capture_id, candidates = requests.len(), "no request to link the capture to");
        }

        let bounded = resource::bound(
            resource::resource(
                firing.series.as_ref().map(|series| &series.resource),
                Some(&process),
                |name| std::env::var(name).ok(),
                self.host_name.as_deref(),
            ),
            self.max_resource_attributes,
        );
        if bounded.dropped > 0 {
            tracing::warn!(
                capture = %capture_id,
                dropped = bounded.dropped,
                kept = bounded.attributes.len(),
                "resource attributes left out of the export: too long for a Pyroscope label, or past [export] max_resource_attributes"
            );
        }
        let envelope = Envelope {
            resource: bounded.attributes,
            dropped_resource_attributes: bounded.dropped,
            attributes: resource::capture_attributes(&CaptureFacts {
                capture_id: capture_id.clone(),
                rule: firing.rule.clone(),
                cause: describe(&firing),
                metric: firing.series.as_ref().map(|series| series.metric.clone()),
                value: firing.value,
                threshold: firing.threshold,
                unit: firing.unit.clone(),
                breach_start: firing.breach_start,
                fired_at: firing.fired_at,
            }),
            profile_id: random_id(),
            original_pprof: Some(pprof),
        };
        // The address-space profile rides in the same request, with its
        // own id and pprof.
        let address_space = address_space.map(|address_space| {
            let envelope = Envelope {
                profile_id: random_id(),
                original_pprof: Some(pprof::encode(&address_space)),
                ..envelope.clone()
            };
            (address_space, envelope)
        });
        let mut profiles = vec![(&profile, &envelope)];
        if let Some((address_space, envelope)) = &address_space {
            profiles.push((address_space, envelope));
        }
        let otlp_request = otlp::combined_request(&profiles).encode_to_vec();
        // Written whether or not there is a backend: what was (or would
        // have been) sent over OTLP, for any OTLP tool to read.
        if let Err(err) = self.sink.write_otlp(&capture_id, &otlp_request) {
            tracing::error!(capture = %capture_id, "cannot write the OTLP request file: {err}");
        }
        if !self.exporting {
            return;
        }
        let delivery = self.delivery.lock().expect("delivery");
        let Some(delivery) = delivery.as_ref() else {
            tracing::error!(capture = %capture_id, "not exported: delivery has already stopped");
            return;
        };
        let request = match delivery.format() {
            Format::PyroscopePush => pyroscope::push_request(&profiles).encode_to_vec(),
            // The profiles' exporter is never the traces one.
            Format::OtlpProfiles | Format::OtlpTraces => otlp_request,
        };
        delivery.submit(&capture_id, profile.start, &request);
        if delivery.sends(Format::OtlpTraces) {
            let id = random_id();
            let span = trace::request(&CaptureSpan {
                profile: &profile,
                resource: &self.sidecar_resource,
                attributes: &envelope.attributes,
                trace_id: random_id(),
                span_id: id[..8].try_into().expect("8 of 16 bytes"),
            });
            delivery.submit_as(
                Format::OtlpTraces,
                &capture_id,
                profile.start,
                &span.encode_to_vec(),
            );
        }
    }
}

/// The rule's threshold when it is a duration: a request faster than that
/// was not held up by the freeze the rule saw.
fn slow_by_the_rule(firing: &Firing) -> Duration {
    firing
        .threshold
        .filter(|_| firing.unit == "s")
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
        .unwrap_or_default()
}

/// The executable name of a live process: its `comm`, or for names longer
/// than comm's 15 bytes, its executable's file name.
pub fn process_facts(pid: u32) -> ProcessFacts {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|path| {
            path.file_name()
                .map(|name| name.to_string_lossy().into_owned())
        });
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|comm| comm.trim_end().to_string());
    ProcessFacts {
        pid,
        executable: exe.or(comm),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_process_has_an_executable_name() {
        let facts = process_facts(std::process::id());
        assert!(facts.executable.is_some_and(|name| !name.is_empty()));
    }
}
