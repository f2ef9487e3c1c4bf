//! `freezeframe demo`: the seed incident, reproduced on this machine and
//! caught by the whole pipeline.
//!
//! The sidecar runs embedded, exactly as `freezeframe run` would with the
//! config written to `<output>/freezeframe.toml`. The reproducer `feeddb`
//! (built next to freezeframe) serves requests and exports their latency
//! over OTLP while its writer grows a `HashMap` past a resize; under
//! `mlockall(MCL_FUTURE)` the kernel populates the new table while holding
//! the process's mmap_lock, and every request thread that maps a buffer
//! waits. The rule fires on the latency it reports, the flight recorder
//! hands over the seconds around it, and the capture is read back from the
//! files it produced and explained. A second run with `--preallocate`
//! (`HashMap::with_capacity`) shows the freeze gone.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::app::{self, Listening};
use crate::cli::{DemoArgs, RunOverrides};
use crate::config::Config;
use crate::encode::pprof;
use crate::export::files::{ADDRESS_SPACE_FILE, CAPTURE_LOG, OTLP_FILE, PPROF_FILE};
use crate::preflight;
use crate::profile::Profile;
use crate::report;

/// The reproducer's binary name; it is built and installed next to ours.
pub const REPRODUCER: &str = "feeddb";

/// The demo's rule. The seed's rule is p99 > 200 ms for 2 s with a 15 s
/// capture: right for a 10-15 s freeze, but a stall of a few hundred
/// milliseconds (what a 1-2 GiB table gives) is over before 2 s of breach
/// could accumulate. So: any export interval whose p99 passes 100 ms fires
/// at once (`for = "0s"`), and 4 s are captured after it; the flight
/// recorder supplies the breach's start, so the stall's onset is in.
const RULE: &str = r#"[[trigger]]
name = "feed-db-latency"
metric = "db.client.operation.duration"
attributes = { "db.system" = "feeddb" }
statistic = "p99"
above = "100ms"
for = "0s"
capture = "4s"
cooldown = "1m"
"#;

/// How often the reproducer exports its metrics: the trigger's resolution.
const EXPORT_INTERVAL_MS: u32 = 250;
/// How long the frozen run keeps serving after its writer is done, at most:
/// the capture must be cut and symbolized while the process lives. The demo
/// stops it as soon as the capture is written.
const FROZEN_COOLDOWN: &str = "20s";
/// After the fixed run, how long a late firing is waited for.
const QUIET_GRACE: Duration = Duration::from_secs(3);
/// How long a capture may take to appear once the reproducer is done.
const CAPTURE_PATIENCE: Duration = Duration::from_secs(20);

/// What `feeddb --report` writes (the fields the demo reads).
#[derive(Debug, Deserialize)]
pub struct ReproducerReport {
    pub pid: u32,
    pub writer_tid: u32,
    pub entries: u64,
    pub preallocated: bool,
    pub mlockall: bool,
    pub resizes: Vec<Resize>,
    pub requests: RequestStats,
}

#[derive(Debug, Deserialize)]
pub struct Resize {
    pub from_buckets: u64,
    pub to_buckets: u64,
    pub table_bytes: u64,
    pub duration_ns: u64,
}

#[derive(Debug, Deserialize)]
pub struct RequestStats {
    pub count: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
    pub over_100ms: u64,
}

/// The parts of a `captures.jsonl` line the demo reads.
#[derive(Debug, Clone, Deserialize)]
struct LoggedCapture {
    capture_id: String,
    outcome: String,
    cause: String,
    target_pid: Option<u32>,
    directory: Option<PathBuf>,
}

/// One run of the reproducer and what the sidecar made of it.
struct RunOutcome {
    report: ReproducerReport,
    capture: Option<LoggedCapture>,
}

pub fn run(args: &DemoArgs) -> Result<()> {
    preflight::check_can_trace()?;
    let reproducer = locate_reproducer(args.reproducer.as_deref())?;
    fs::create_dir_all(&args.output)
        .with_context(|| format!("cannot create {}", args.output.display()))?;
    let output = args
        .output
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", args.output.display()))?;
    let config_path = output.join("freezeframe.toml");
    fs::write(&config_path, demo_config(&output))
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let config = Config::load(Some(&config_path), &RunOverrides::default())?;

    println!("freezeframe demo: a feed database freezes while its index grows, and freezeframe says why.");
    println!("Sidecar config: {} (rule: p99 of db.client.operation.duration > 100 ms, fire at once, capture 4 s).", config_path.display());
    println!();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("ff-demo")
        .build()
        .context("cannot start the async runtime")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready, listening) = tokio::sync::oneshot::channel();
    let sidecar = runtime.spawn(app::run_until(
        config,
        async {
            let _ = stopped.await;
        },
        Some(ready),
    ));
    let listening = match runtime.block_on(listening) {
        Ok(listening) => listening,
        Err(_) => {
            // The sidecar ended before it listened: its error says why.
            return match runtime.block_on(sidecar) {
                Ok(Err(err)) => Err(err.context("the embedded sidecar did not start")),
                _ => bail!("the embedded sidecar did not start"),
            };
        }
    };

    let log = output.join(CAPTURE_LOG);
    let session = Session {
        reproducer: &reproducer,
        listening,
        log: &log,
        output: &output,
        entries: args.entries,
    };
    let outcome = session.reproduce(false).and_then(|frozen| {
        println!();
        let fixed = session.reproduce(true)?;
        Ok((frozen, fixed))
    });
    let _ = stop.send(());
    match runtime.block_on(sidecar) {
        Ok(Ok(())) => {}
        Ok(Err(err)) => eprintln!("freezeframe demo: the sidecar stopped with an error: {err:#}"),
        Err(err) => eprintln!("freezeframe demo: the sidecar task failed: {err}"),
    }
    let (frozen, fixed) = outcome?;
    println!();
    conclude(&frozen, &fixed, &output)
}

/// The reproducer next to our own executable, or the one given.
fn locate_reproducer(given: Option<&Path>) -> Result<PathBuf> {
    let path = match given {
        Some(path) => path.to_path_buf(),
        None => std::env::current_exe()
            .context("cannot find freezeframe's own executable")?
            .with_file_name(REPRODUCER),
    };
    if !path.is_file() {
        bail!(
            "the reproducer {} is missing: it is built with freezeframe (`cargo build --release` \
             builds both) and installed next to it; or pass --reproducer PATH",
            path.display()
        );
    }
    Ok(path)
}

/// The sidecar's config: loopback receivers on ports of the kernel's
/// choosing, the target learned from the reporting process's `process.pid`,
/// an armed flight recorder, and everything written under `output`.
fn demo_config(output: &Path) -> String {
    let directory = toml::Value::String(output.display().to_string());
    format!(
        r#"# Written by `freezeframe demo`; `freezeframe run --config` takes it as it is
# (the ports are the kernel's choice: set them to serve a real application).
[receiver]
grpc = "127.0.0.1:0"
http = "127.0.0.1:0"

# No [target]: the process is the one whose metrics breach (its process.pid).

[recorder]
mode = "armed"
history = "30s"
min_block = "1ms"

{RULE}
[telemetry]
listen = "127.0.0.1:0"

[export]
directory = {directory}
"#
    )
}

struct Session<'a> {
    reproducer: &'a Path,
    listening: Listening,
    log: &'a Path,
    output: &'a Path,
    entries: Option<u64>,
}

impl Session<'_> {
    /// Runs the reproducer once; with `preallocate`, with the fix.
    fn reproduce(&self, preallocate: bool) -> Result<RunOutcome> {
        let name = if preallocate { "fixed" } else { "frozen" };
        if preallocate {
            println!("Run 2: the same workload with the fix, HashMap::with_capacity (feeddb --preallocate)");
        } else {
            println!("Run 1: feeddb grows its index past a resize under mlockall(MCL_FUTURE)");
        }
        let report_path = self.output.join(format!("feeddb-{name}.json"));
        let _ = fs::remove_file(&report_path);
        let seen = logged_captures(self.log)?.len();
        let mut command = Command::new(self.reproducer);
        command
            .arg("--report")
            .arg(&report_path)
            .arg("--cooldown")
            .arg(if preallocate { "2s" } else { FROZEN_COOLDOWN })
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://{}", self.listening.grpc),
            )
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            .env(
                "OTEL_METRIC_EXPORT_INTERVAL",
                EXPORT_INTERVAL_MS.to_string(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        if preallocate {
            command.arg("--preallocate");
        }
        if let Some(entries) = self.entries {
            command.arg("--entries").arg(entries.to_string());
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", self.reproducer.display()))?;
        let echo = echo_output(&mut child);

        let capture = self.await_capture(&mut child, seen, preallocate)?;
        let _ = echo.join();
        let report = fs::read(&report_path)
            .with_context(|| format!("feeddb wrote no report to {}", report_path.display()))?;
        let report: ReproducerReport = serde_json::from_slice(&report)
            .with_context(|| format!("cannot read {}", report_path.display()))?;
        if let Some(capture) = &capture {
            println!(
                "  -> capture {} written: {}",
                capture.capture_id, capture.cause
            );
        } else {
            println!("  -> no capture: the rule never fired");
        }
        Ok(RunOutcome { report, capture })
    }

    /// Watches the capture log while the reproducer runs. Once a capture of
    /// it is written (and its OTLP file, the export stage's last step), the
    /// reproducer is stopped: the capture is the point of the run.
    fn await_capture(
        &self,
        child: &mut Child,
        seen: usize,
        preallocate: bool,
    ) -> Result<Option<LoggedCapture>> {
        let mut exited_at: Option<Instant> = None;
        let patience = if preallocate {
            QUIET_GRACE
        } else {
            CAPTURE_PATIENCE
        };
        loop {
            let fresh = logged_captures(self.log)?;
            let captured = fresh.into_iter().skip(seen).find(|logged| {
                logged.outcome == "captured"
                    && logged
                        .directory
                        .as_ref()
                        .is_some_and(|dir| dir.join(OTLP_FILE).is_file())
            });
            if let Some(capture) = captured {
                if exited_at.is_none() {
                    stop_child(child);
                }
                let _ = child.wait();
                return Ok(Some(capture));
            }
            match exited_at {
                Some(at) if at.elapsed() >= patience => return Ok(None),
                Some(_) => {}
                None => {
                    if let Some(status) = child.try_wait().context("cannot wait for feeddb")? {
                        if !status.success() {
                            bail!("feeddb failed ({status}); its output above says why");
                        }
                        exited_at = Some(Instant::now());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Prints the reproducer's output as it comes, indented under the demo's.
fn echo_output(child: &mut Child) -> std::thread::JoinHandle<()> {
    let stdout = child.stdout.take().expect("stdout is piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("  feeddb | {line}");
        }
    })
}

/// SIGTERM: feeddb then writes its report and flushes its telemetry.
fn stop_child(child: &Child) {
    // SAFETY: kill(2) on our own child's pid; it cannot have been reaped
    // (and its pid reused) before we wait for it.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
}

/// Every line of the capture log so far; a line still being written (no
/// newline yet) is left for the next look.
fn logged_captures(log: &Path) -> Result<Vec<LoggedCapture>> {
    let text = match fs::read_to_string(log) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", log.display())),
    };
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .with_context(|| format!("cannot parse a line of {}: {line}", log.display()))
        })
        .collect()
}

/// Reads the capture back from its files, explains it, and compares the
/// two runs. Fails when the demo did not show what it set out to.
fn conclude(frozen: &RunOutcome, fixed: &RunOutcome, output: &Path) -> Result<()> {
    let Some(capture) = &frozen.capture else {
        bail!(
            "no freeze was caught: feeddb's worst request took {} (p99 {}), below the rule's 100 ms; \
             this machine may populate memory faster than expected, so try a larger --entries",
            report::human_duration(frozen.report.requests.max_ns),
            report::human_duration(frozen.report.requests.p99_ns),
        );
    };
    if capture.target_pid != Some(frozen.report.pid) {
        bail!(
            "the capture is of pid {:?}, not of feeddb (pid {})",
            capture.target_pid,
            frozen.report.pid
        );
    }
    let directory = capture
        .directory
        .clone()
        .context("a captured line without its directory")?;
    let offcpu = read_profile(&directory.join(PPROF_FILE))?;
    let address_space = read_profile(&directory.join(ADDRESS_SPACE_FILE)).ok();

    println!("What happened");
    print!("{}", report::explain(&offcpu, address_space.as_ref()));
    if let Some(resize) = frozen.report.resizes.last() {
        println!(
            "  feeddb's own account: the resize to {} buckets allocated a {} table, and the insert \
             that triggered it took {}.",
            resize.to_buckets,
            report::human_bytes(resize.table_bytes),
            report::human_duration(resize.duration_ns),
        );
    }
    println!();
    println!("Before and after the fix");
    for (label, run) in [("without the fix", frozen), ("with_capacity  ", fixed)] {
        let requests = &run.report.requests;
        println!(
            "  {label}: {} requests, p50 {}, p99 {}, worst {}, {} over 100 ms; {}",
            requests.count,
            report::human_duration(requests.p50_ns),
            report::human_duration(requests.p99_ns),
            report::human_duration(requests.max_ns),
            requests.over_100ms,
            if run.capture.is_some() {
                "the rule fired"
            } else {
                "the rule stayed quiet"
            },
        );
    }
    println!();
    println!("Everything is in {}:", output.display());
    println!(
        "  {}/{PPROF_FILE}   off-CPU pprof (go tool pprof, Pyroscope)",
        directory.display()
    );
    if address_space.is_some() {
        println!(
            "  {}/{ADDRESS_SPACE_FILE}     the large allocations, as pprof (alloc_space/bytes)",
            directory.display()
        );
    }
    println!(
        "  {}/flamegraph.svg  off-CPU flamegraph",
        directory.display()
    );
    println!(
        "  {}/{OTLP_FILE}  the OTLP profiles export request",
        directory.display()
    );
    println!(
        "  {}  the capture log; freezeframe.toml, the sidecar's config",
        CAPTURE_LOG
    );
    println!(
        "Read it again with: freezeframe report {}/{PPROF_FILE}",
        directory.display()
    );

    if let Some(capture) = &fixed.capture {
        bail!(
            "with --preallocate the rule still fired ({}): the fix did not remove the freeze here",
            capture.cause
        );
    }
    Ok(())
}

fn read_profile(path: &Path) -> Result<Profile> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    pprof::decode(&bytes).with_context(|| format!("cannot decode {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_config_is_a_valid_sidecar_config_with_the_documented_rule() {
        let dir = std::env::temp_dir().join(format!("ff-demo-config-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("freezeframe.toml");
        fs::write(&path, demo_config(&dir)).unwrap();
        let config = Config::load(Some(&path), &RunOverrides::default()).unwrap();
        assert_eq!(config.rules.len(), 1);
        let shown = config.to_string();
        assert!(shown.contains("feed-db-latency"), "{shown}");
        assert_eq!(config.export.directory, dir);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_half_written_log_line_is_left_for_later() {
        let dir = std::env::temp_dir().join(format!("ff-demo-log-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join(CAPTURE_LOG);
        assert!(logged_captures(&log).unwrap().is_empty(), "no log yet");
        fs::write(
            &log,
            "{\"capture_id\":\"a\",\"outcome\":\"captured\",\"cause\":\"c\",\"target_pid\":1,\"directory\":\"/x\"}\n{\"capture_id\":",
        )
        .unwrap();
        let lines = logged_captures(&log).unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].capture_id, "a");
        fs::remove_dir_all(&dir).unwrap();
    }
}
