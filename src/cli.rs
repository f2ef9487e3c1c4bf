//! Command-line interface. Every flag can also be set through a
//! `FREEZEFRAME_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::capture::recorder::RecorderMode;
use crate::export::otlp::{Compression, Protocol};
use crate::logging::LogFormat;
use crate::profile::ThreadState;

#[derive(Debug, Parser)]
#[command(
    name = "freezeframe",
    version,
    about = "Catches the freezes that logs and CPU charts never show"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Capture off-CPU stacks of one process for a while (needs root, or
    /// CAP_BPF and CAP_PERFMON), print the top stacks, and save them.
    Capture(CaptureArgs),
    /// Summarise a saved profile, or turn it into folded stacks or a flamegraph.
    Report(ReportArgs),
    /// The sidecar: receive OTLP metrics, evaluate trigger rules, keep a
    /// flight recorder of off-CPU time, and capture when a rule fires.
    Run(RunArgs),
    /// Validate a config file and print the resolved settings and rules.
    CheckConfig(CheckConfigArgs),
    /// Send saved captures to the OTLP profiles backend again (after an
    /// outage, or to a backend added later).
    Export(ExportArgs),
    /// Reproduce the HashMap-resize freeze on this machine, catch it with
    /// the embedded sidecar, and explain it; then show the fix removes it
    /// (needs root, and about 2 GiB of memory for a minute).
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where everything the demo writes goes: the sidecar's config, the
    /// capture log and files, the reproducer's reports.
    #[arg(
        long,
        short,
        env = "FREEZEFRAME_DEMO_OUTPUT",
        default_value = "freezeframe-demo"
    )]
    pub output: PathBuf,
    /// Entries the reproducer's index grows to (default: its own, just past
    /// a resize to a 1 GiB table).
    #[arg(long, env = "FREEZEFRAME_DEMO_ENTRIES")]
    pub entries: Option<u64>,
    /// The reproducer binary (default: `feeddb` next to freezeframe).
    #[arg(long, env = "FREEZEFRAME_DEMO_REPRODUCER")]
    pub reproducer: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML config file (see the README for every key).
    #[arg(long, short, env = "FREEZEFRAME_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: RunOverrides,
}

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The config file to check.
    pub file: PathBuf,
    #[command(flatten)]
    pub overrides: RunOverrides,
}

/// Settings that flags and the environment override in the config file.
#[derive(Debug, Args, Default, Clone)]
pub struct RunOverrides {
    /// OTLP/gRPC listen address ([receiver] grpc).
    #[arg(long = "receiver-grpc", env = "FREEZEFRAME_RECEIVER_GRPC")]
    pub grpc: Option<SocketAddr>,
    /// OTLP/HTTP listen address ([receiver] http).
    #[arg(long = "receiver-http", env = "FREEZEFRAME_RECEIVER_HTTP")]
    pub http: Option<SocketAddr>,
    /// Largest accepted request, compressed or not ([receiver] max_request_bytes).
    #[arg(long, env = "FREEZEFRAME_RECEIVER_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Process to capture ([target] pid).
    #[arg(long = "target-pid", env = "FREEZEFRAME_TARGET_PID")]
    pub pid: Option<u32>,
    /// Process to capture, by name ([target] process_name).
    #[arg(long = "target-process-name", env = "FREEZEFRAME_TARGET_PROCESS_NAME")]
    pub process_name: Option<String>,
    /// armed or on-trigger ([recorder] mode).
    #[arg(long = "recorder-mode", env = "FREEZEFRAME_RECORDER_MODE")]
    pub mode: Option<RecorderMode>,
    /// How much off-CPU history the armed recorder keeps ([recorder] history).
    #[arg(long = "recorder-history", env = "FREEZEFRAME_RECORDER_HISTORY", value_parser = parse_duration)]
    pub history: Option<Duration>,
    /// Ignore shorter blocks ([recorder] min_block).
    #[arg(long = "recorder-min-block", env = "FREEZEFRAME_RECORDER_MIN_BLOCK", value_parser = parse_duration)]
    pub min_block: Option<Duration>,
    /// Blocks at least this long get their user stack copied and unwound
    /// without frame pointers; 0s turns copies off ([recorder] unwind_threshold).
    #[arg(long = "recorder-unwind-threshold", env = "FREEZEFRAME_RECORDER_UNWIND_THRESHOLD", value_parser = parse_duration)]
    pub unwind_threshold: Option<Duration>,
    /// The bpffs directory where the node's freezeframes share one probe;
    /// `off` for a private probe ([recorder] shared_probe_dir).
    #[arg(long = "shared-probe-dir", env = "FREEZEFRAME_SHARED_PROBE_DIR")]
    pub shared_probe_dir: Option<PathBuf>,
    /// Address for /metrics, /healthz and /readyz ([telemetry] listen).
    #[arg(long = "telemetry-listen", env = "FREEZEFRAME_TELEMETRY_LISTEN")]
    pub telemetry_listen: Option<SocketAddr>,
    /// How log lines are written on stderr ([telemetry] log_format).
    #[arg(long = "log-format", env = "FREEZEFRAME_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Where captures are written, and the delivery spool kept ([export] directory).
    #[arg(long = "export-directory", env = "FREEZEFRAME_EXPORT_DIRECTORY")]
    pub directory: Option<PathBuf>,
    /// How long a finished capture waits for the spans it froze before export,
    /// at most 60s ([export] link_grace).
    #[arg(long = "export-link-grace", env = "FREEZEFRAME_EXPORT_LINK_GRACE", value_parser = parse_duration)]
    pub link_grace: Option<Duration>,
    /// Size budget of the delivery spool, in bytes ([export] spool_max_bytes).
    #[arg(
        long = "export-spool-max-bytes",
        env = "FREEZEFRAME_EXPORT_SPOOL_MAX_BYTES"
    )]
    pub spool_max_bytes: Option<u64>,
    #[command(flatten)]
    pub otlp: OtlpOverrides,
    #[command(flatten)]
    pub forward: ForwardOverrides,
}

/// `[forward]` from flags and the environment: where the app's telemetry
/// goes on to. The `OTEL_*` variables play no part: they configure the
/// profiles exporter.
#[derive(Debug, Args, Default, Clone)]
pub struct ForwardOverrides {
    /// Upstream for the app's metrics, traces and logs, e.g.
    /// http://otel-collector:4317 ([forward] endpoint).
    #[arg(
        id = "forward-endpoint",
        long = "forward-endpoint",
        env = "FREEZEFRAME_FORWARD_ENDPOINT"
    )]
    pub endpoint: Option<String>,
    /// grpc or http/protobuf ([forward] protocol).
    #[arg(
        id = "forward-protocol",
        long = "forward-protocol",
        env = "FREEZEFRAME_FORWARD_PROTOCOL"
    )]
    pub protocol: Option<Protocol>,
    /// A header sent with every forwarded request, KEY=VALUE; repeat it, or
    /// separate with commas in the variable ([forward] headers).
    #[arg(
        id = "forward-header",
        long = "forward-header",
        env = "FREEZEFRAME_FORWARD_HEADERS",
        value_delimiter = ','
    )]
    pub headers: Vec<String>,
    /// How long one forwarding attempt may take ([forward] timeout).
    #[arg(id = "forward-timeout", long = "forward-timeout", env = "FREEZEFRAME_FORWARD_TIMEOUT", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// gzip or none ([forward] compression).
    #[arg(
        id = "forward-compression",
        long = "forward-compression",
        env = "FREEZEFRAME_FORWARD_COMPRESSION"
    )]
    pub compression: Option<Compression>,
    /// PEM CA certificate to trust for an https upstream ([forward] certificate).
    #[arg(
        id = "forward-certificate",
        long = "forward-certificate",
        env = "FREEZEFRAME_FORWARD_CERTIFICATE"
    )]
    pub certificate: Option<PathBuf>,
    /// PEM client certificate for mutual TLS ([forward] client_certificate).
    #[arg(
        id = "forward-client-certificate",
        long = "forward-client-certificate",
        env = "FREEZEFRAME_FORWARD_CLIENT_CERTIFICATE"
    )]
    pub client_certificate: Option<PathBuf>,
    /// PEM private key of the client certificate ([forward] client_key).
    #[arg(
        id = "forward-client-key",
        long = "forward-client-key",
        env = "FREEZEFRAME_FORWARD_CLIENT_KEY"
    )]
    pub client_key: Option<PathBuf>,
    /// For a gRPC upstream given without a scheme: plain text instead of TLS ([forward] insecure).
    #[arg(id = "forward-insecure", long = "forward-insecure", env = "FREEZEFRAME_FORWARD_INSECURE", num_args = 0..=1, default_missing_value = "true")]
    pub insecure: Option<bool>,
    /// Bytes of requests held for the upstream at most; beyond, the oldest
    /// are dropped ([forward] queue_max_bytes).
    #[arg(id = "forward-queue-max-bytes", long = "forward-queue-max-bytes",
        env = "FREEZEFRAME_FORWARD_QUEUE_MAX_BYTES",
        value_parser = parse_bytes
    )]
    pub queue_max_bytes: Option<u64>,
}

/// The OTLP exporter's `[export]` settings from flags and the environment.
/// Where neither these nor the file set one, the
/// `OTEL_EXPORTER_OTLP_PROFILES_*` and then `OTEL_EXPORTER_OTLP_*`
/// variables do.
#[derive(Debug, Args, Default, Clone)]
pub struct OtlpOverrides {
    /// Profiles endpoint, e.g. http://pyroscope:4040: OTLP, or with protocol
    /// pyroscope the Pyroscope server ([export] otlp_endpoint).
    #[arg(
        long = "export-otlp-endpoint",
        env = "FREEZEFRAME_EXPORT_OTLP_ENDPOINT"
    )]
    pub otlp_endpoint: Option<String>,
    /// grpc, http/protobuf or pyroscope, Pyroscope's own push API ([export] protocol).
    #[arg(long = "export-protocol", env = "FREEZEFRAME_EXPORT_PROTOCOL")]
    pub protocol: Option<Protocol>,
    /// A header sent with every export, KEY=VALUE; repeat it, or separate
    /// with commas in the variable ([export] headers).
    #[arg(
        long = "export-header",
        env = "FREEZEFRAME_EXPORT_HEADERS",
        value_delimiter = ','
    )]
    pub headers: Vec<String>,
    /// How long one export attempt may take ([export] timeout).
    #[arg(long = "export-timeout", env = "FREEZEFRAME_EXPORT_TIMEOUT", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// gzip or none ([export] compression).
    #[arg(long = "export-compression", env = "FREEZEFRAME_EXPORT_COMPRESSION")]
    pub compression: Option<Compression>,
    /// PEM CA certificate to trust for https endpoints, besides the system's ([export] certificate).
    #[arg(long = "export-certificate", env = "FREEZEFRAME_EXPORT_CERTIFICATE")]
    pub certificate: Option<PathBuf>,
    /// PEM client certificate for mutual TLS ([export] client_certificate).
    #[arg(
        long = "export-client-certificate",
        env = "FREEZEFRAME_EXPORT_CLIENT_CERTIFICATE"
    )]
    pub client_certificate: Option<PathBuf>,
    /// PEM private key of the client certificate ([export] client_key).
    #[arg(long = "export-client-key", env = "FREEZEFRAME_EXPORT_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
    /// For a gRPC endpoint given without a scheme: plain text instead of TLS ([export] insecure).
    #[arg(long = "export-insecure", env = "FREEZEFRAME_EXPORT_INSECURE", num_args = 0..=1, default_missing_value = "true")]
    pub insecure: Option<bool>,
    /// Resource attributes a profile carries at most, 1 to 23 (default 20):
    /// each is a Pyroscope series label, and a series may have 30
    /// ([export] max_resource_attributes).
    #[arg(
        long = "export-max-resource-attributes",
        env = "FREEZEFRAME_EXPORT_MAX_RESOURCE_ATTRIBUTES"
    )]
    pub max_resource_attributes: Option<usize>,
    /// Drop a spooled capture that started longer ago than this instead of
    /// sending it; 0s keeps every one (default 1h, Pyroscope's ingestion
    /// window) ([export] max_age).
    #[arg(long = "export-max-age", env = "FREEZEFRAME_EXPORT_MAX_AGE", value_parser = parse_duration)]
    pub max_age: Option<Duration>,
    /// OTLP/HTTP traces endpoint for each capture's `freezeframe.capture`
    /// span, e.g. http://tempo:4318 (`/v1/traces` is appended); unset, the
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT variable, else no span ([export] traces_endpoint).
    #[arg(
        long = "export-traces-endpoint",
        env = "FREEZEFRAME_EXPORT_TRACES_ENDPOINT"
    )]
    pub traces_endpoint: Option<String>,
    /// USER:PASSWORD for HTTP basic auth, e.g. Grafana Cloud's instance id
    /// and token ([export] basic_auth).
    #[arg(long = "export-basic-auth", env = "FREEZEFRAME_EXPORT_BASIC_AUTH")]
    pub basic_auth: Option<String>,
    /// A token sent as `Authorization: Bearer` ([export] bearer_token).
    #[arg(long = "export-bearer-token", env = "FREEZEFRAME_EXPORT_BEARER_TOKEN")]
    pub bearer_token: Option<String>,
    /// The tenant, sent as `X-Scope-OrgID` ([export] tenant_id).
    #[arg(long = "export-tenant-id", env = "FREEZEFRAME_EXPORT_TENANT_ID")]
    pub tenant_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Saved captures: the profile.pb.gz of a capture directory, or any
    /// pprof freezeframe wrote.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// The sidecar's config file, for its [export] settings.
    #[arg(long, short, env = "FREEZEFRAME_CONFIG")]
    pub config: Option<PathBuf>,
    /// Give up on a file the backend keeps refusing for this long.
    #[arg(long, env = "FREEZEFRAME_EXPORT_DEADLINE", default_value = "1m", value_parser = parse_duration)]
    pub deadline: Duration,
    #[command(flatten)]
    pub otlp: OtlpOverrides,
}

#[derive(Debug, Args)]
pub struct CaptureArgs {
    /// Process to capture, as seen from freezeframe's pid namespace.
    #[arg(long, env = "FREEZEFRAME_PID")]
    pub pid: u32,
    /// Only this thread of the process.
    #[arg(long, env = "FREEZEFRAME_TID")]
    pub tid: Option<u32>,
    /// How long to capture (e.g. 15s, 500ms). Ctrl-C ends it early and keeps what was seen.
    #[arg(long, env = "FREEZEFRAME_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Ignore blocks shorter than this.
    #[arg(long, env = "FREEZEFRAME_MIN_BLOCK", default_value = "1ms", value_parser = parse_duration)]
    pub min_block: Duration,
    /// Ignore blocks longer than this.
    #[arg(long, env = "FREEZEFRAME_MAX_BLOCK", value_parser = parse_duration)]
    pub max_block: Option<Duration>,
    /// Blocks at least this long get their user stack copied and unwound
    /// without frame pointers (shorter ones walk frame pointers); 0s turns
    /// copies off. A block in progress at a cut is unwound whole either way.
    #[arg(long, env = "FREEZEFRAME_UNWIND_THRESHOLD", default_value = "10ms", value_parser = parse_duration)]
    pub unwind_threshold: Duration,
    /// Thread states to capture: S (sleeping), D (uninterruptible), R (preempted),
    /// other, or any; comma-separated.
    #[arg(long, env = "FREEZEFRAME_STATE", default_value = "any", value_parser = parse_states)]
    pub state: StateSet,
    /// Record mmap/munmap/mremap/brk/madvise calls that move at least this
    /// much memory (e.g. 64MiB, 1GiB; 0 turns it off), with their callers' stacks.
    #[arg(long, env = "FREEZEFRAME_MIN_ALLOC", default_value = "64MiB", value_parser = parse_bytes)]
    pub min_alloc: u64,
    /// The bpffs directory where the node's freezeframes share one probe;
    /// `off` for a private probe.
    #[arg(long, env = "FREEZEFRAME_SHARED_PROBE_DIR", default_value = crate::capture::DEFAULT_SHARED_PROBE_DIR)]
    pub shared_probe_dir: PathBuf,
    /// Write the profile as gzipped pprof.
    #[arg(long, short, env = "FREEZEFRAME_OUTPUT")]
    pub output: Option<PathBuf>,
    /// Write the large address-space calls as a second gzipped pprof
    /// (sample type alloc_space/bytes).
    #[arg(long, env = "FREEZEFRAME_ALLOC_OUTPUT")]
    pub alloc_output: Option<PathBuf>,
    #[command(flatten)]
    pub views: Views,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// A profile written by `freezeframe capture --output` (gzipped or plain pprof).
    pub file: PathBuf,
    #[command(flatten)]
    pub views: Views,
}

/// The human-facing views of a profile, shared by `capture` and `report`.
#[derive(Debug, Args)]
pub struct Views {
    /// Write folded stacks (blocked microseconds per stack; bytes for an
    /// address-space profile).
    #[arg(long, env = "FREEZEFRAME_FOLDED")]
    pub folded: Option<PathBuf>,
    /// Write an SVG flamegraph.
    #[arg(long, env = "FREEZEFRAME_FLAMEGRAPH")]
    pub flamegraph: Option<PathBuf>,
    /// How many stacks the summary lists.
    #[arg(long, env = "FREEZEFRAME_TOP", default_value_t = 10)]
    pub top: usize,
}

/// Thread states chosen with `--state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateSet(pub Vec<ThreadState>);

/// The longest capture we accept: longer than this is almost surely a typo
/// (a unit forgotten), and would pin kernel maps for days.
const MAX_CAPTURE: Duration = Duration::from_secs(24 * 3600);

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|err| format!("{err} (write a duration such as 15s, 500ms or 2m)"))?;
    if duration > MAX_CAPTURE {
        return Err(format!("{text} is longer than the 24 h limit"));
    }
    Ok(duration)
}

/// A size in bytes: a plain number, or one with a binary unit (KiB, MiB,
/// GiB, TiB; the `i` and `B` may be left out, the units stay binary).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (write one such as 64MiB or 1GiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?} (use KiB, MiB, GiB or TiB)"
            ))
        }
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text} is too large"))
}

pub fn parse_states(text: &str) -> Result<StateSet, String> {
    let mut states = Vec::new();
    for part in text.split(',').map(str::trim) {
        if part.eq_ignore_ascii_case("any") {
            return Ok(StateSet(ThreadState::ALL.to_vec()));
        }
        let state = ThreadState::from_code(part)
            .ok_or_else(|| format!("unknown thread state {part:?}: use S, D, R, other or any"))?;
        if !states.contains(&state) {
            states.push(state);
        }
    }
    Ok(StateSet(states))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_parse_and_absurd_ones_are_refused() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("15").is_err());
        assert!(parse_duration("400d").unwrap_err().contains("24 h"));
    }

    #[test]
    fn states_parse_as_a_set() {
        assert_eq!(parse_states("any").unwrap().0.len(), 4);
        assert_eq!(
            parse_states("D,s,D").unwrap(),
            StateSet(vec![ThreadState::Disk, ThreadState::Sleeping])
        );
        assert!(parse_states("Z")
            .unwrap_err()
            .contains("unknown thread state"));
    }
}
