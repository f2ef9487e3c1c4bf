use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

use freezeframe::capture::recorder::merge;
use freezeframe::capture::{CaptureConfig, ProbeStorage, Tracer, Window};
use freezeframe::cli::{
    CaptureArgs, CheckConfigArgs, Cli, Command, ExportArgs, ReportArgs, RunOverrides, Views,
};
use freezeframe::config::Config;
use freezeframe::encode::{flamegraph, folded, pprof};
use freezeframe::export::delivery::{deliver, Delivered};
use freezeframe::export::retry::Backoff;
use freezeframe::export::{host_name, random_id, saved, Exporter};
use freezeframe::logging::LogFormat;
use freezeframe::preflight;
use freezeframe::profile::Profile;
use freezeframe::report;
use freezeframe::symbolize::Symbolizer;

fn main() {
    let cli = Cli::parse();
    // The demo narrates on stdout; the embedded sidecar's own log would
    // drown it, so only its warnings show unless asked for.
    let default_level = match cli.command {
        Command::Demo(_) => "warn",
        _ => "info",
    };
    // The sidecar's config is read first: its log format can come from
    // the file too. Everything else takes the flag's environment variable.
    let sidecar_config = match &cli.command {
        Command::Run(args) => Some(Config::load(args.config.as_deref(), &args.overrides)),
        _ => None,
    };
    let log_format = match &sidecar_config {
        Some(Ok(config)) => config.telemetry.log_format,
        _ => std::env::var("FREEZEFRAME_LOG_FORMAT")
            .ok()
            .and_then(|format| LogFormat::from_str(&format, true).ok())
            .unwrap_or_default(),
    };
    freezeframe::logging::init(log_format, default_level);
    let outcome = match cli.command {
        Command::Capture(args) => capture(args),
        Command::Report(args) => report(args),
        Command::Run(_) => run(sidecar_config.expect("read above for `run`")),
        Command::CheckConfig(args) => check_config(args),
        Command::Export(args) => export(args),
        Command::Demo(args) => freezeframe::demo::run(&args),
    };
    if let Err(err) = outcome {
        eprintln!("freezeframe: {err:#}");
        std::process::exit(1);
    }
}

/// How often a one-shot capture cuts a window out of the probe.
const CAPTURE_TICK: Duration = Duration::from_millis(500);

fn capture(args: CaptureArgs) -> Result<()> {
    if args.duration.is_zero() {
        bail!("--duration must be longer than zero");
    }
    if let Some(max_block) = args.max_block {
        if max_block < args.min_block {
            bail!(
                "--max-block ({max_block:?}) is shorter than --min-block ({:?})",
                args.min_block
            );
        }
    }
    preflight::check_can_trace()?;
    let config = CaptureConfig {
        tid: args.tid,
        cgroup_id: None,
        min_block: args.min_block,
        max_block: args.max_block,
        states: args.state.0.clone(),
        min_address_change: (args.min_alloc > 0).then_some(args.min_alloc),
        unwind_threshold: Some(args.unwind_threshold).filter(|threshold| !threshold.is_zero()),
        shared_probe_dir: Some(args.shared_probe_dir.clone())
            .filter(|dir| freezeframe::capture::shares_probe(dir)),
    };

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("cannot install signal handler")?;
    }

    let started = Instant::now();
    let mut storage = ProbeStorage::uninit();
    let mut tracer = Tracer::start(&mut storage, &config, &[args.pid])?;
    eprintln!(
        "freezeframe: capturing off-CPU stacks of pid {} for {} (attached in {:.1} ms: {}; Ctrl-C to stop early)",
        args.pid,
        humantime::format_duration(args.duration),
        started.elapsed().as_secs_f64() * 1e3,
        tracer.features(),
    );
    // The capture is cut into windows as it goes: the kernel's maps are
    // drained before they fill up, however many threads come and go, and
    // the frames of each window are looked up while their process lives.
    let mut symbolizer = Symbolizer::new();
    let mut windows = Vec::new();
    let deadline = Instant::now() + args.duration;
    let mut next_cut = Instant::now() + CAPTURE_TICK;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        std::thread::sleep(
            Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now())),
        );
        if Instant::now() >= next_cut {
            let window = tracer.collect()?;
            Window::revise(&window.revisions, windows.iter_mut());
            symbolizer.learn(&window);
            windows.push(window);
            next_cut += CAPTURE_TICK;
        }
    }
    let last = tracer.collect()?;
    Window::revise(&last.revisions, windows.iter_mut());
    windows.push(last);
    drop(tracer);
    let window = merge(&windows.iter().collect::<Vec<_>>(), args.pid);

    let profiles = symbolizer.profiles(&window);
    let profile = profiles.off_cpu;
    if let Some(path) = &args.output {
        write(path, &pprof::encode(&profile))?;
    }
    if let Some(path) = &args.alloc_output {
        match &profiles.address_space {
            Some(address_space) => write(path, &pprof::encode(address_space))?,
            None => eprintln!(
                "freezeframe: no address-space change of {} or more was seen; {} not written",
                report::human_bytes(args.min_alloc),
                path.display()
            ),
        }
    }
    show(&profile, &args.views)?;
    if let Some(address_space) = &profiles.address_space {
        println!();
        print!("{}", report::summary(address_space, args.views.top));
    }
    Ok(())
}

fn run(config: Result<Config, freezeframe::config::ConfigError>) -> Result<()> {
    let config = config?;
    preflight::check_can_trace()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("ff-runtime")
        .build()
        .context("cannot start the async runtime")?;
    // On a worker, not on this thread: the worker that drives the timers
    // then runs the trigger loop's ticks itself, without waking another
    // thread ten times a second.
    let app = runtime.spawn(freezeframe::app::run(config));
    match runtime.block_on(app) {
        Ok(result) => result,
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(err) => Err(anyhow::anyhow!("the sidecar's main task ended: {err}")),
    }
}

fn check_config(args: CheckConfigArgs) -> Result<()> {
    let config = Config::load(Some(&args.file), &args.overrides)?;
    print!("{config}");
    Ok(())
}

fn export(args: ExportArgs) -> Result<()> {
    let overrides = RunOverrides {
        otlp: args.otlp.clone(),
        ..RunOverrides::default()
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    let Some(otlp) = config.export.otlp else {
        bail!(
            "no OTLP endpoint is configured: pass --export-otlp-endpoint, or set [export] \
             otlp_endpoint or OTEL_EXPORTER_OTLP_ENDPOINT"
        );
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let host = host_name();
    let failures = runtime.block_on(async {
        let exporter = Exporter::new(&otlp)?;
        let mut failures = 0usize;
        for file in &args.files {
            let saved = match saved::request_from_file(
                file,
                exporter.format(),
                |name| std::env::var(name).ok(),
                host.as_deref(),
                random_id(),
                config.export.max_resource_attributes,
            ) {
                Ok(saved) => saved,
                Err(err) => {
                    eprintln!("freezeframe: {err}");
                    failures += 1;
                    continue;
                }
            };
            if !saved.recorded {
                eprintln!(
                    "freezeframe: {}: no record in captures.jsonl next to it; sending without the rule and the application's resource",
                    file.display()
                );
            }
            let deadline = tokio_util::sync::CancellationToken::new();
            let timer = {
                let deadline = deadline.clone();
                let within = args.deadline;
                tokio::spawn(async move {
                    tokio::time::sleep(within).await;
                    deadline.cancel();
                })
            };
            let delivered = deliver(
                &exporter,
                saved.request.into(),
                Backoff::default(),
                &deadline,
                |reason, delay, attempt| {
                    eprintln!(
                        "freezeframe: {}: attempt {} failed ({reason}); retrying in {}",
                        file.display(),
                        attempt + 1,
                        humantime::format_duration(Duration::from_millis(delay.as_millis() as u64))
                    )
                },
            )
            .await;
            timer.abort();
            match delivered {
                Some(Delivered::Accepted { rejected: 0, .. }) => {
                    println!("{}: delivered to {}", file.display(), otlp.endpoint)
                }
                Some(Delivered::Accepted { rejected, message }) => {
                    eprintln!(
                        "freezeframe: {}: the backend rejected {rejected} profile(s): {message}",
                        file.display()
                    );
                    failures += 1;
                }
                Some(Delivered::Rejected { reason }) => {
                    eprintln!("freezeframe: {}: refused: {reason}", file.display());
                    failures += 1;
                }
                None => {
                    eprintln!(
                        "freezeframe: {}: not delivered within {}",
                        file.display(),
                        humantime::format_duration(args.deadline)
                    );
                    failures += 1;
                }
            }
        }
        Ok::<_, anyhow::Error>(failures)
    })?;
    if failures > 0 {
        bail!(
            "{failures} of {} file(s) were not delivered",
            args.files.len()
        );
    }
    Ok(())
}

fn report(args: ReportArgs) -> Result<()> {
    let bytes =
        fs::read(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    let profile = pprof::decode(&bytes)
        .with_context(|| format!("{} is not a readable pprof profile", args.file.display()))?;
    show(&profile, &args.views)
}

fn show(profile: &Profile, views: &Views) -> Result<()> {
    if let Some(path) = &views.folded {
        write(path, folded::encode(profile).as_bytes())?;
    }
    if let Some(path) = &views.flamegraph {
        write(path, &flamegraph::encode(profile, profile.kind.title())?)?;
    }
    print!("{}", report::summary(profile, views.top));
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}
