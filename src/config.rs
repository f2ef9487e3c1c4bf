//! The sidecar's configuration: one validated struct, read from a TOML file
//! and overridden by flags and `FREEZEFRAME_*` variables (clap gives flags
//! precedence over the environment). Precedence, highest first: flag, env,
//! file, default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::capture::recorder::RecorderMode;
use crate::cli::{ForwardOverrides, OtlpOverrides, RunOverrides};
use crate::export::otlp::settings::{self as otlp_settings, Compression, OtlpSettings, Protocol};
use crate::forward::{self, ForwardConfig};
use crate::ingest::ReceiverConfig;
use crate::logging::LogFormat;
use crate::trigger::{Rule, RuleConfig, RuleError};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error("[target]: set `pid` or `process_name`, not both")]
    TwoTargets,
    #[error("[recorder] history = {0:?}: must be at least 1s, so that a capture can reach back before its trigger")]
    HistoryTooShort(Duration),
    #[error("two [[trigger]] rules are named {0:?}: names must be unique, they label metrics and captures")]
    DuplicateRule(String),
    #[error("[recorder] min_allocation: {0}")]
    MinAllocation(String),
    #[error("[receiver] max_request_bytes = {0}: must be between 1 KiB and 256 MiB")]
    RequestLimit(usize),
    #[error("[export] link_grace = {0:?}: at most {max:?}; spans older than that may already be forgotten", max = defaults::MAX_LINK_GRACE)]
    LinkGraceTooLong(Duration),
    #[error("[export] spool_max_bytes = {0}: must be at least 64 KiB to hold one profile")]
    SpoolTooSmall(u64),
    #[error("[export] headers: {0}")]
    Header(String),
    #[error("[forward] headers: {0}")]
    ForwardHeader(String),
    #[error("[forward] protocol = \"pyroscope\": the app's telemetry goes on as OTLP; use grpc or http/protobuf")]
    ForwardProtocol,
    #[error("[forward] queue_max_bytes = {0}: must be between 64 KiB and 16 GiB; the queue holds whole requests of up to [receiver] max_request_bytes")]
    ForwardQueue(u64),
    #[error("[forward] queue_max_bytes: {0}")]
    ForwardQueueSize(String),
    #[error(
        "[export] max_resource_attributes = {0}: must be between 1 and {max}; Pyroscope \
         refuses a series with more than {names} label names, and {others} of them are \
         not the resource's",
        max = crate::export::resource::MAX_ATTRIBUTES,
        names = crate::export::resource::MAX_LABEL_NAMES,
        others = crate::export::resource::OTHER_SERIES_LABELS
    )]
    ResourceAttributes(usize),
    #[error(transparent)]
    Otlp(#[from] otlp_settings::SettingsError),
}

/// The resolved configuration of `freezeframe run`.
#[derive(Debug, Clone)]
pub struct Config {
    pub receiver: ReceiverConfig,
    pub target: Target,
    pub recorder: Recorder,
    pub rules: Vec<Rule>,
    pub telemetry: Telemetry,
    pub export: Export,
    /// Where the app's telemetry goes on to; `None` forwards nothing.
    pub forward: Option<ForwardConfig>,
}

/// Which process captures are taken of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Pid(u32),
    ProcessName(String),
    /// The `process.pid` resource attribute of the series that breached.
    FromResource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorder {
    pub mode: RecorderMode,
    pub history: Duration,
    pub min_block: Duration,
    /// mmap/munmap/mremap/brk/madvise calls moving at least this many
    /// bytes are recorded; `None` (0 in the file) records none.
    pub min_allocation: Option<u64>,
    /// Blocks at least this long get their user stack unwound without
    /// frame pointers; `None` ("0s") walks frame pointers only.
    pub unwind_threshold: Option<Duration>,
    /// The bpffs directory of the node's shared probe; `None` (empty in
    /// the file) runs a private one.
    pub shared_probe_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Telemetry {
    pub listen: SocketAddr,
    /// How log lines are written (default: text).
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// Where captures are written: `<id>/profile.pb.gz`, ..., `captures.jsonl`,
    /// and the delivery spool, `spool/`.
    pub directory: PathBuf,
    /// The OTLP profiles exporter; `None` when no endpoint is configured
    /// anywhere (captures then go to files only).
    pub otlp: Option<OtlpSettings>,
    /// How long a finished capture waits for the spans of the requests it
    /// froze before it is linked and exported.
    pub link_grace: Duration,
    /// The delivery spool's size budget; the oldest go first beyond it.
    pub spool_max_bytes: u64,
    /// Resource attributes an exported profile carries at most.
    pub max_resource_attributes: usize,
    /// A spooled capture that started longer ago is dropped, not sent;
    /// `None` ("0s" in the file) keeps every one.
    pub max_age: Option<Duration>,
    /// Where each capture's span goes; `None`: nowhere.
    pub traces: Option<OtlpSettings>,
}

/// The file's shape. Every section and key is optional; unknown keys are
/// errors, so that a typo never silently means "default".
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct File {
    receiver: ReceiverFile,
    target: TargetFile,
    recorder: RecorderFile,
    trigger: Vec<RuleConfig>,
    telemetry: TelemetryFile,
    export: ExportFile,
    forward: ForwardFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ReceiverFile {
    grpc: Option<SocketAddr>,
    http: Option<SocketAddr>,
    max_request_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TargetFile {
    pid: Option<u32>,
    process_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RecorderFile {
    mode: Option<RecorderMode>,
    #[serde(with = "duration_text")]
    history: Option<Duration>,
    #[serde(with = "duration_text")]
    min_block: Option<Duration>,
    /// A size: bytes, or text such as "64MiB".
    min_allocation: Option<SizeFile>,
    #[serde(with = "duration_text")]
    unwind_threshold: Option<Duration>,
    shared_probe_dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeFile {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TelemetryFile {
    listen: Option<SocketAddr>,
    log_format: Option<LogFormat>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ExportFile {
    directory: Option<PathBuf>,
    otlp_endpoint: Option<String>,
    protocol: Option<Protocol>,
    /// Sent with every export request, e.g. `{ "x-scope-orgid" = "ops" }`.
    headers: Option<std::collections::BTreeMap<String, String>>,
    #[serde(with = "duration_text")]
    timeout: Option<Duration>,
    compression: Option<Compression>,
    certificate: Option<PathBuf>,
    client_certificate: Option<PathBuf>,
    client_key: Option<PathBuf>,
    insecure: Option<bool>,
    #[serde(with = "duration_text")]
    link_grace: Option<Duration>,
    spool_max_bytes: Option<u64>,
    max_resource_attributes: Option<usize>,
    #[serde(with = "duration_text")]
    max_age: Option<Duration>,
    traces_endpoint: Option<String>,
    basic_auth: Option<String>,
    bearer_token: Option<String>,
    tenant_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ForwardFile {
    endpoint: Option<String>,
    protocol: Option<Protocol>,
    headers: Option<std::collections::BTreeMap<String, String>>,
    #[serde(with = "duration_text")]
    timeout: Option<Duration>,
    compression: Option<Compression>,
    certificate: Option<PathBuf>,
    client_certificate: Option<PathBuf>,
    client_key: Option<PathBuf>,
    insecure: Option<bool>,
    queue_max_bytes: Option<SizeFile>,
}

/// Defaults, as documented in the README.
pub mod defaults {
    use std::time::Duration;

    pub const GRPC: &str = "127.0.0.1:4317";
    pub const HTTP: &str = "127.0.0.1:4318";
    pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
    pub const HISTORY: Duration = Duration::from_secs(30);
    pub const MIN_BLOCK: Duration = Duration::from_millis(1);
    pub const MIN_ALLOCATION: u64 = crate::capture::DEFAULT_MIN_ADDRESS_CHANGE;
    pub const UNWIND_THRESHOLD: Duration = crate::capture::DEFAULT_UNWIND_THRESHOLD;
    pub const TELEMETRY: &str = "127.0.0.1:9464";
    pub const DIRECTORY: &str = "/var/lib/freezeframe";
    pub const LINK_GRACE: Duration = Duration::from_secs(10);
    /// Spans are kept two minutes after they arrive; waiting longer than
    /// half that could find the early ones gone.
    pub const MAX_LINK_GRACE: Duration = Duration::from_secs(60);
    pub const SPOOL_MAX_BYTES: u64 = 256 * 1024 * 1024;
    pub const MIN_SPOOL_BYTES: u64 = 64 * 1024;
    pub const MIN_FORWARD_QUEUE_BYTES: u64 = 64 * 1024;
    pub const MAX_FORWARD_QUEUE_BYTES: u64 = 16 << 30;
    /// Pyroscope's ingestion window: it refuses a profile that started
    /// more than an hour ago.
    pub const MAX_AGE: Duration = Duration::from_secs(3600);
}

/// Durations written as text ("30s", "500ms").
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(deserializer)?;
        text.map(|text| {
            humantime::parse_duration(text.trim()).map_err(|err| {
                serde::de::Error::custom(format!(
                    "{text:?} is not a duration ({err}); write e.g. \"30s\""
                ))
            })
        })
        .transpose()
    }
}

impl std::fmt::Display for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let target = match &self.target {
            Target::Pid(pid) => format!("pid {pid}"),
            Target::ProcessName(name) => format!("process named {name:?}"),
            Target::FromResource => "the process.pid of the series that breaches".to_string(),
        };
        writeln!(
            f,
            "receiver: OTLP/gRPC {}, OTLP/HTTP {}, requests up to {} bytes",
            self.receiver.grpc, self.receiver.http, self.receiver.max_request_bytes
        )?;
        writeln!(f, "target:   {target}")?;
        writeln!(
            f,
            "recorder: {:?}, history {}, blocks from {}, address-space changes {}, probe {}, \
             user stacks unwound without frame pointers {}",
            self.recorder.mode,
            humantime::format_duration(self.recorder.history),
            humantime::format_duration(self.recorder.min_block),
            self.recorder
                .min_allocation
                .map_or("off".to_string(), |bytes| format!(
                    "from {}",
                    crate::report::human_bytes(bytes)
                )),
            self.recorder
                .shared_probe_dir
                .as_ref()
                .map_or("private".to_string(), |dir| format!(
                    "shared in {} (private if that is not bpffs)",
                    dir.display()
                )),
            self.recorder
                .unwind_threshold
                .map_or("off".to_string(), |threshold| format!(
                    "for blocks from {}",
                    humantime::format_duration(threshold)
                )),
        )?;
        writeln!(
            f,
            "telemetry: http://{}/metrics, logs as {}",
            self.telemetry.listen, self.telemetry.log_format
        )?;
        writeln!(f, "export:   {}", self.export.directory.display())?;
        match &self.export.otlp {
            Some(otlp) => writeln!(
                f,
                "otlp:     {} {otlp}; linked after {}, spool up to {} bytes, at most {} resource attributes, {}",
                match otlp.protocol {
                    crate::export::otlp::Protocol::Pyroscope => "Pyroscope push",
                    _ => "OTLP profiles over",
                },
                humantime::format_duration(self.export.link_grace),
                self.export.spool_max_bytes,
                self.export.max_resource_attributes,
                self.export.max_age.map_or(
                    "spooled captures kept until delivered".to_string(),
                    |age| format!("dropped after {}", humantime::format_duration(age))
                ),
            )?,
            None => writeln!(f, "otlp:     off (no endpoint configured)")?,
        }
        match &self.forward {
            Some(forward) => writeln!(f, "forward:  {forward}")?,
            None => writeln!(
                f,
                "forward:  off (no [forward] endpoint: the app's telemetry stops here)"
            )?,
        }
        match &self.export.traces {
            Some(traces) => writeln!(f, "traces:   capture spans over {traces}")?,
            None => writeln!(f, "traces:   off (no traces endpoint configured)")?,
        }
        writeln!(f, "rules:    {}", self.rules.len())?;
        for rule in &self.rules {
            writeln!(f, "  {rule}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads `path` (if given) and applies `overrides` on top; the `OTEL_*`
    /// exporter variables come from the process environment.
    pub fn load(path: Option<&Path>, overrides: &RunOverrides) -> Result<Config, ConfigError> {
        Self::load_with_env(path, overrides, |name| std::env::var(name).ok())
    }

    /// [`Config::load`] with the `OTEL_*` variables looked up in `env`.
    pub fn load_with_env(
        path: Option<&Path>,
        overrides: &RunOverrides,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Self::parse(&text).map_err(|message| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message,
                })?
            }
            None => File::default(),
        };
        Self::resolve(file, overrides, env)
    }

    fn parse(text: &str) -> Result<File, String> {
        toml::from_str(text).map_err(|err| err.to_string().trim_end().to_string())
    }

    fn resolve(
        file: File,
        overrides: &RunOverrides,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let parse_default = |text: &str| {
            text.parse::<SocketAddr>()
                .expect("defaults are valid addresses")
        };
        let receiver = ReceiverConfig {
            grpc: overrides
                .grpc
                .or(file.receiver.grpc)
                .unwrap_or_else(|| parse_default(defaults::GRPC)),
            http: overrides
                .http
                .or(file.receiver.http)
                .unwrap_or_else(|| parse_default(defaults::HTTP)),
            max_request_bytes: overrides
                .max_request_bytes
                .or(file.receiver.max_request_bytes)
                .unwrap_or(defaults::MAX_REQUEST_BYTES),
        };
        if !(1024..=256 * 1024 * 1024).contains(&receiver.max_request_bytes) {
            return Err(ConfigError::RequestLimit(receiver.max_request_bytes));
        }

        // A pid or name given on the command line replaces the file's target
        // entirely: the two are alternatives, not layers.
        let (pid, process_name) = if overrides.pid.is_some() || overrides.process_name.is_some() {
            (overrides.pid, overrides.process_name.clone())
        } else {
            (
                file.target.pid.filter(|&pid| pid != 0),
                file.target.process_name,
            )
        };
        let target = match (pid, process_name) {
            (Some(_), Some(_)) => return Err(ConfigError::TwoTargets),
            (Some(pid), None) => Target::Pid(pid),
            (None, Some(name)) => Target::ProcessName(name),
            (None, None) => Target::FromResource,
        };

        let recorder = Recorder {
            mode: overrides
                .mode
                .or(file.recorder.mode)
                .unwrap_or(RecorderMode::Armed),
            history: overrides
                .history
                .or(file.recorder.history)
                .unwrap_or(defaults::HISTORY),
            min_block: overrides
                .min_block
                .or(file.recorder.min_block)
                .unwrap_or(defaults::MIN_BLOCK),
            min_allocation: match file.recorder.min_allocation {
                None => Some(defaults::MIN_ALLOCATION),
                Some(SizeFile::Bytes(bytes)) => Some(bytes),
                Some(SizeFile::Text(text)) => {
                    Some(crate::cli::parse_bytes(&text).map_err(ConfigError::MinAllocation)?)
                }
            }
            .filter(|&bytes| bytes > 0),
            unwind_threshold: Some(
                overrides
                    .unwind_threshold
                    .or(file.recorder.unwind_threshold)
                    .unwrap_or(defaults::UNWIND_THRESHOLD),
            )
            .filter(|threshold| !threshold.is_zero()),
            shared_probe_dir: Some(
                overrides
                    .shared_probe_dir
                    .clone()
                    .or(file.recorder.shared_probe_dir)
                    .unwrap_or_else(|| PathBuf::from(crate::capture::DEFAULT_SHARED_PROBE_DIR)),
            )
            .filter(|dir| crate::capture::shares_probe(dir)),
        };
        if recorder.history < Duration::from_secs(1) {
            return Err(ConfigError::HistoryTooShort(recorder.history));
        }

        let mut rules = Vec::with_capacity(file.trigger.len());
        for rule in file.trigger {
            let rule = crate::trigger::validate(rule)?;
            if rules
                .iter()
                .any(|existing: &Rule| existing.name == rule.name)
            {
                return Err(ConfigError::DuplicateRule(rule.name));
            }
            rules.push(rule);
        }

        Ok(Config {
            receiver,
            target,
            recorder,
            rules,
            telemetry: Telemetry {
                listen: overrides
                    .telemetry_listen
                    .or(file.telemetry.listen)
                    .unwrap_or_else(|| parse_default(defaults::TELEMETRY)),
                log_format: overrides
                    .log_format
                    .or(file.telemetry.log_format)
                    .unwrap_or_default(),
            },
            export: resolve_export(file.export, overrides, env)?,
            forward: resolve_forward(file.forward, &overrides.forward)?,
        })
    }
}

/// `[export]`: flag, `FREEZEFRAME_EXPORT_*`, file; then, for the OTLP
/// exporter, the `OTEL_EXPORTER_OTLP_*` variables (see
/// [`otlp_settings::resolve`]).
fn resolve_export(
    file: ExportFile,
    run: &RunOverrides,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Export, ConfigError> {
    let overrides: &OtlpOverrides = &run.otlp;
    let headers = headers(&overrides.headers, file.headers).map_err(ConfigError::Header)?;
    let explicit = otlp_settings::Explicit {
        endpoint: overrides.otlp_endpoint.clone().or(file.otlp_endpoint),
        protocol: overrides.protocol.or(file.protocol),
        headers,
        timeout: overrides.timeout.or(file.timeout),
        compression: overrides.compression.or(file.compression),
        certificate: overrides.certificate.clone().or(file.certificate),
        client_certificate: overrides
            .client_certificate
            .clone()
            .or(file.client_certificate),
        client_key: overrides.client_key.clone().or(file.client_key),
        insecure: overrides.insecure.or(file.insecure),
        basic_auth: overrides.basic_auth.clone().or(file.basic_auth),
        bearer_token: overrides.bearer_token.clone().or(file.bearer_token),
        tenant_id: overrides.tenant_id.clone().or(file.tenant_id),
    };
    let link_grace = run
        .link_grace
        .or(file.link_grace)
        .unwrap_or(defaults::LINK_GRACE);
    if link_grace > defaults::MAX_LINK_GRACE {
        return Err(ConfigError::LinkGraceTooLong(link_grace));
    }
    let spool_max_bytes = run
        .spool_max_bytes
        .or(file.spool_max_bytes)
        .unwrap_or(defaults::SPOOL_MAX_BYTES);
    if spool_max_bytes < defaults::MIN_SPOOL_BYTES {
        return Err(ConfigError::SpoolTooSmall(spool_max_bytes));
    }
    let max_resource_attributes = overrides
        .max_resource_attributes
        .or(file.max_resource_attributes)
        .unwrap_or(crate::export::resource::DEFAULT_MAX_ATTRIBUTES);
    if !(1..=crate::export::resource::MAX_ATTRIBUTES).contains(&max_resource_attributes) {
        return Err(ConfigError::ResourceAttributes(max_resource_attributes));
    }
    let traces_endpoint = overrides.traces_endpoint.clone().or(file.traces_endpoint);
    let otlp = otlp_settings::resolve(explicit, &env)?;
    let traces = match &otlp {
        Some(profiles) => otlp_settings::resolve_traces(traces_endpoint, profiles, &env)?,
        None => None,
    };
    let max_age = Some(
        overrides
            .max_age
            .or(file.max_age)
            .unwrap_or(defaults::MAX_AGE),
    )
    .filter(|age| !age.is_zero());
    Ok(Export {
        directory: run
            .directory
            .clone()
            .or(file.directory)
            .unwrap_or_else(|| PathBuf::from(defaults::DIRECTORY)),
        otlp,
        link_grace,
        spool_max_bytes,
        max_resource_attributes,
        max_age,
        traces,
    })
}

/// Headers from flags (`KEY=VALUE`), which replace the file's table whole.
fn headers(
    flags: &[String],
    file: Option<std::collections::BTreeMap<String, String>>,
) -> Result<Option<Vec<(String, String)>>, String> {
    if flags.is_empty() {
        return Ok(file.map(|table| {
            table
                .into_iter()
                .map(|(key, value)| (key.to_ascii_lowercase(), value))
                .collect()
        }));
    }
    flags
        .iter()
        .map(|pair| otlp_settings::parse_header(pair))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// `[forward]`: flag, `FREEZEFRAME_FORWARD_*`, file, default. No endpoint
/// means nothing is forwarded.
fn resolve_forward(
    file: ForwardFile,
    overrides: &ForwardOverrides,
) -> Result<Option<ForwardConfig>, ConfigError> {
    let explicit = otlp_settings::Explicit {
        endpoint: overrides.endpoint.clone().or(file.endpoint),
        protocol: overrides.protocol.or(file.protocol),
        headers: headers(&overrides.headers, file.headers).map_err(ConfigError::ForwardHeader)?,
        timeout: overrides.timeout.or(file.timeout),
        compression: overrides.compression.or(file.compression),
        certificate: overrides.certificate.clone().or(file.certificate),
        client_certificate: overrides
            .client_certificate
            .clone()
            .or(file.client_certificate),
        client_key: overrides.client_key.clone().or(file.client_key),
        insecure: overrides.insecure.or(file.insecure),
        // An upstream's credentials are headers, as the app's own are.
        basic_auth: None,
        bearer_token: None,
        tenant_id: None,
    };
    if explicit.protocol == Some(Protocol::Pyroscope) {
        return Err(ConfigError::ForwardProtocol);
    }
    // The `OTEL_*` variables configure the profiles exporter, not this.
    let Some(otlp) = otlp_settings::resolve_in(forward::SECTION, explicit, |_| None)? else {
        return Ok(None);
    };
    let queue_max_bytes = match (overrides.queue_max_bytes, file.queue_max_bytes) {
        (Some(bytes), _) | (None, Some(SizeFile::Bytes(bytes))) => bytes,
        (None, Some(SizeFile::Text(text))) => {
            crate::cli::parse_bytes(&text).map_err(ConfigError::ForwardQueueSize)?
        }
        (None, None) => ForwardConfig::DEFAULT_QUEUE_MAX_BYTES as u64,
    };
    if !(defaults::MIN_FORWARD_QUEUE_BYTES..=defaults::MAX_FORWARD_QUEUE_BYTES)
        .contains(&queue_max_bytes)
    {
        return Err(ConfigError::ForwardQueue(queue_max_bytes));
    }
    Ok(Some(ForwardConfig {
        otlp,
        queue_max_bytes: usize::try_from(queue_max_bytes)
            .map_err(|_| ConfigError::ForwardQueue(queue_max_bytes))?,
    }))
}
