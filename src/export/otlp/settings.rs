//! Where and how OTLP profiles are sent, resolved the way opentelemetry-otlp
//! does: what freezeframe was told (flag, `FREEZEFRAME_*`, config file),
//! then `OTEL_EXPORTER_OTLP_PROFILES_*`, then `OTEL_EXPORTER_OTLP_*`, then the
//! default. Each setting is resolved on its own, so a file may set the
//! endpoint while the environment brings the headers.
//!
//! With no endpoint anywhere, nothing is sent: captures still go to files.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The HTTP path of the profiles export, appended to a base endpoint.
pub const HTTP_PATH: &str = "/v1development/profiles";

/// The config section a set of settings comes from: named in error
/// messages, and saying what an HTTP endpoint without a path means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section {
    /// As written in the file, e.g. `[export]`.
    pub name: &'static str,
    /// The key of the endpoint in it.
    pub endpoint_key: &'static str,
    /// Appended to an HTTP endpoint given without a path. `None`: the
    /// endpoint is a base URL that each signal appends its own path to.
    pub http_path: Option<&'static str>,
}

/// `[export]`, the profiles exporter.
pub const EXPORT: Section = Section {
    name: "[export]",
    endpoint_key: "otlp_endpoint",
    http_path: Some(HTTP_PATH),
};
/// The path of the OTLP/HTTP traces export, appended to a base endpoint.
pub const TRACES_PATH: &str = "/v1/traces";

/// The path of Pyroscope's push API, appended to a base endpoint.
pub const PYROSCOPE_PATH: &str = "/push.v1.PusherService/Push";

/// The OTLP specification's default export timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
pub enum Protocol {
    /// `ProfilesService/Export` over HTTP/2.
    #[serde(rename = "grpc")]
    #[value(name = "grpc")]
    Grpc,
    /// `POST /v1development/profiles` with a protobuf body.
    #[serde(rename = "http/protobuf")]
    #[value(name = "http/protobuf")]
    HttpProtobuf,
    /// Not OTLP: Pyroscope's own push API (`POST
    /// /push.v1.PusherService/Push`, connect protocol), which every
    /// Pyroscope 1.x and 2.x takes. Only the endpoint freezeframe is given
    /// is used, never an `OTEL_EXPORTER_OTLP_*ENDPOINT`.
    #[serde(rename = "pyroscope")]
    #[value(name = "pyroscope")]
    Pyroscope,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
            Protocol::Pyroscope => "pyroscope",
        }
    }

    /// The `exporter` label of the export metrics.
    pub fn exporter_label(self) -> &'static str {
        match self {
            Protocol::Grpc => "otlp_grpc",
            Protocol::HttpProtobuf => "otlp_http",
            Protocol::Pyroscope => "pyroscope",
        }
    }
}

pub use crate::export::http::{Compression, Tls};

/// Settings freezeframe was given itself, highest precedence first already
/// applied (flag, then `FREEZEFRAME_*`, then file). `None` lets the `OTEL_*`
/// variables decide.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Explicit {
    pub endpoint: Option<String>,
    pub protocol: Option<Protocol>,
    pub headers: Option<Vec<(String, String)>>,
    pub timeout: Option<Duration>,
    pub compression: Option<Compression>,
    pub certificate: Option<PathBuf>,
    pub client_certificate: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub insecure: Option<bool>,
    /// `user:password` for HTTP basic auth.
    pub basic_auth: Option<String>,
    /// Sent as `Authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
    /// Sent as `X-Scope-OrgID`, the tenant of Pyroscope, Mimir or Tempo.
    pub tenant_id: Option<String>,
}

/// The resolved OTLP exporter.
#[derive(Clone, PartialEq, Eq)]
pub struct OtlpSettings {
    /// Full URL: for HTTP the export path included.
    pub endpoint: String,
    pub protocol: Protocol,
    /// Sent with every request (gRPC metadata or HTTP headers).
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub compression: Compression,
    pub tls: Tls,
}

impl OtlpSettings {
    pub fn uses_tls(&self) -> bool {
        self.endpoint.starts_with("https://")
    }

    /// Where and how the shared HTTP client posts for these settings, with
    /// `headers` (these settings' own, or more).
    pub fn http_target<'a>(
        &'a self,
        content_type: &'static str,
        headers: &'a [(String, String)],
    ) -> crate::export::http::Target<'a> {
        crate::export::http::Target {
            endpoint: &self.endpoint,
            tls: &self.tls,
            headers,
            content_type,
            compression: self.compression,
            timeout: self.timeout,
        }
    }
}

/// Header values are often credentials: never print them.
impl fmt::Debug for OtlpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtlpSettings")
            .field("endpoint", &self.endpoint)
            .field("protocol", &self.protocol)
            .field(
                "headers",
                &self.headers.iter().map(|(key, _)| key).collect::<Vec<_>>(),
            )
            .field("timeout", &self.timeout)
            .field("compression", &self.compression)
            .field("tls", &self.tls)
            .finish()
    }
}

impl fmt::Display for OtlpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} to {}, timeout {}, compression {}",
            self.protocol.name(),
            self.endpoint,
            humantime::format_duration(self.timeout),
            match self.compression {
                Compression::None => "none",
                Compression::Gzip => "gzip",
            }
        )?;
        if !self.headers.is_empty() {
            let names: Vec<&str> = self.headers.iter().map(|(key, _)| key.as_str()).collect();
            write!(f, ", headers {} (values hidden)", names.join(", "))?;
        }
        if let Some(ca) = &self.tls.certificate {
            write!(f, ", CA {}", ca.display())?;
        }
        if let Some(cert) = &self.tls.client_certificate {
            write!(f, ", client certificate {}", cert.display())?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error("{source_name} = {value:?}: {problem}")]
    Invalid {
        /// The variable or key the value came from.
        source_name: String,
        value: String,
        problem: String,
    },
}

/// A setting and where it came from, for error messages.
struct Found {
    source_name: String,
    value: String,
}

/// Looks a setting up in the signal-specific variable, then the generic one.
fn from_env(env: &impl Fn(&str) -> Option<String>, suffix: &str) -> Option<Found> {
    [
        format!("OTEL_EXPORTER_OTLP_PROFILES_{suffix}"),
        format!("OTEL_EXPORTER_OTLP_{suffix}"),
    ]
    .into_iter()
    .find_map(|name| {
        env(&name)
            .map(|value| value.trim().to_string())
            .filter(|value| !value.is_empty())
            .map(|value| Found {
                source_name: name,
                value,
            })
    })
}

fn invalid(found: &Found, problem: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        source_name: found.source_name.clone(),
        value: found.value.clone(),
        problem: problem.into(),
    }
}

/// Resolves the exporter from what freezeframe was given and the `OTEL_*`
/// variables `env` looks up. `Ok(None)`: no endpoint anywhere, no export.
pub fn resolve(
    explicit: Explicit,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<OtlpSettings>, SettingsError> {
    resolve_in(EXPORT, explicit, env)
}

/// [`resolve`] for the settings of another `section`.
pub fn resolve_in(
    section: Section,
    explicit: Explicit,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<OtlpSettings>, SettingsError> {
    let protocol = match explicit.protocol {
        Some(protocol) => protocol,
        None => match from_env(&env, "PROTOCOL") {
            Some(found) => match found.value.as_str() {
                "grpc" => Protocol::Grpc,
                "http/protobuf" => Protocol::HttpProtobuf,
                "http/json" => {
                    return Err(invalid(
                        &found,
                        "OTLP/JSON is not supported for profiles; use grpc or http/protobuf",
                    ))
                }
                _ => return Err(invalid(&found, "use grpc or http/protobuf")),
            },
            None => Protocol::Grpc,
        },
    };

    let insecure = match explicit.insecure {
        Some(insecure) => insecure,
        None => match from_env(&env, "INSECURE") {
            Some(found) => match found.value.to_ascii_lowercase().as_str() {
                "true" => true,
                "false" => false,
                _ => return Err(invalid(&found, "use true or false")),
            },
            None => false,
        },
    };

    let endpoint = if let Some(endpoint) = explicit.endpoint.filter(|e| !e.trim().is_empty()) {
        let found = Found {
            source_name: format!("{} {}", section.name, section.endpoint_key),
            value: endpoint.trim().to_string(),
        };
        let url = with_scheme(&found, protocol, insecure)?;
        match (protocol, section.http_path) {
            // Given without a path, the export path is the only sensible one.
            (Protocol::HttpProtobuf, Some(http_path)) if path_of(&url).is_empty() => {
                format!("{}{http_path}", url.trim_end_matches('/'))
            }
            (Protocol::Pyroscope, _) if path_of(&url).is_empty() => {
                format!("{}{PYROSCOPE_PATH}", url.trim_end_matches('/'))
            }
            _ => url,
        }
    } else if protocol == Protocol::Pyroscope {
        // The OTEL variables name OTLP receivers, never Pyroscope's push API.
        return Ok(None);
    } else if let Some(found) = env("OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT")
        .map(|value| value.trim().to_string())
        .filter(|value| !value.is_empty())
        .map(|value| Found {
            source_name: "OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT".to_string(),
            value,
        })
    {
        // The signal's own endpoint is used exactly as given.
        with_scheme(&found, protocol, insecure)?
    } else if let Some(found) = env("OTEL_EXPORTER_OTLP_ENDPOINT")
        .map(|value| value.trim().to_string())
        .filter(|value| !value.is_empty())
        .map(|value| Found {
            source_name: "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
            value,
        })
    {
        let url = with_scheme(&found, protocol, insecure)?;
        match protocol {
            // The generic endpoint is a base URL that each signal appends
            // its path to.
            Protocol::HttpProtobuf => format!("{}{HTTP_PATH}", url.trim_end_matches('/')),
            Protocol::Grpc | Protocol::Pyroscope => url,
        }
    } else {
        return Ok(None);
    };

    let mut headers = match explicit.headers {
        Some(headers) => headers,
        None => match from_env(&env, "HEADERS") {
            Some(found) => {
                parse_headers(&found.value).map_err(|problem| invalid(&found, problem))?
            }
            None => Vec::new(),
        },
    };
    add_credentials(
        &mut headers,
        explicit.basic_auth.as_deref(),
        explicit.bearer_token.as_deref(),
        explicit.tenant_id.as_deref(),
    )?;
    for (key, value) in &headers {
        check_header(key, value).map_err(|problem| SettingsError::Invalid {
            source_name: format!("{} headers", section.name),
            value: key.clone(),
            problem,
        })?;
    }

    let timeout = match explicit.timeout {
        Some(timeout) => timeout,
        None => match from_env(&env, "TIMEOUT") {
            Some(found) => match found.value.parse::<u64>() {
                Ok(0) | Err(_) => {
                    return Err(invalid(
                        &found,
                        "write a whole number of milliseconds above 0",
                    ))
                }
                Ok(millis) => Duration::from_millis(millis),
            },
            None => DEFAULT_TIMEOUT,
        },
    };
    if timeout.is_zero() {
        return Err(SettingsError::Invalid {
            source_name: format!("{} timeout", section.name),
            value: "0s".to_string(),
            problem: "an export needs some time: set at least 1ms".to_string(),
        });
    }

    let compression = match explicit.compression {
        Some(compression) => compression,
        None => match from_env(&env, "COMPRESSION") {
            Some(found) => match found.value.as_str() {
                "gzip" => Compression::Gzip,
                "none" => Compression::None,
                _ => return Err(invalid(&found, "use gzip or none")),
            },
            // Pyroscope's own clients always compress.
            None if protocol == Protocol::Pyroscope => Compression::Gzip,
            None => Compression::None,
        },
    };

    let path = |explicit: Option<PathBuf>, suffix: &str| {
        explicit.or_else(|| from_env(&env, suffix).map(|found| PathBuf::from(found.value)))
    };
    let tls = Tls {
        certificate: path(explicit.certificate, "CERTIFICATE"),
        client_certificate: path(explicit.client_certificate, "CLIENT_CERTIFICATE"),
        client_key: path(explicit.client_key, "CLIENT_KEY"),
    };
    if tls.client_certificate.is_some() != tls.client_key.is_some() {
        return Err(SettingsError::Invalid {
            source_name: "client certificate".to_string(),
            value: format!("{:?} / {:?}", tls.client_certificate, tls.client_key),
            problem: "mutual TLS needs both the client certificate and its key".to_string(),
        });
    }

    Ok(Some(OtlpSettings {
        endpoint,
        protocol,
        headers,
        timeout,
        compression,
        tls,
    }))
}

/// Where capture spans go: `explicit` (flag, `FREEZEFRAME_*`, file;
/// `/v1/traces` appended to a URL without a path), else
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as given. Spans go over OTLP/HTTP
/// with the profiles exporter's headers, TLS, timeout and compression.
/// `Ok(None)`: no endpoint, no span.
pub fn resolve_traces(
    explicit: Option<String>,
    profiles: &OtlpSettings,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<OtlpSettings>, SettingsError> {
    let endpoint = match explicit.filter(|endpoint| !endpoint.trim().is_empty()) {
        Some(endpoint) => {
            let found = Found {
                source_name: "[export] traces_endpoint".to_string(),
                value: endpoint.trim().to_string(),
            };
            let url = with_scheme(&found, Protocol::HttpProtobuf, false)?;
            if path_of(&url).is_empty() {
                format!("{}{TRACES_PATH}", url.trim_end_matches('/'))
            } else {
                url
            }
        }
        None => match env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .map(|value| value.trim().to_string())
            .filter(|value| !value.is_empty())
        {
            Some(value) => with_scheme(
                &Found {
                    source_name: "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT".to_string(),
                    value,
                },
                Protocol::HttpProtobuf,
                false,
            )?,
            None => return Ok(None),
        },
    };
    Ok(Some(OtlpSettings {
        endpoint,
        protocol: Protocol::HttpProtobuf,
        ..profiles.clone()
    }))
}

/// The basic-auth, bearer-token and tenant settings as the headers they
/// stand for. They replace a header of the same name: a dedicated setting
/// is the more deliberate of the two.
fn add_credentials(
    headers: &mut Vec<(String, String)>,
    basic_auth: Option<&str>,
    bearer_token: Option<&str>,
    tenant_id: Option<&str>,
) -> Result<(), SettingsError> {
    let problem = |source_name: &str, problem: &str| SettingsError::Invalid {
        source_name: source_name.to_string(),
        value: "(hidden)".to_string(),
        problem: problem.to_string(),
    };
    if basic_auth.is_some() && bearer_token.is_some() {
        return Err(problem(
            "[export] basic_auth and bearer_token",
            "both set the Authorization header; set one",
        ));
    }
    let mut set = |name: &str, value: String, source_name: &str| {
        if http::HeaderValue::from_str(&value).is_err() {
            return Err(problem(source_name, "not valid in an HTTP header"));
        }
        headers.retain(|(key, _)| key != name);
        headers.push((name.to_string(), value));
        Ok(())
    };
    if let Some(pair) = basic_auth {
        if !pair.contains(':') {
            return Err(problem(
                "[export] basic_auth",
                "write user:password (the password may be empty)",
            ));
        }
        set(
            "authorization",
            format!("Basic {}", base64(pair.as_bytes())),
            "[export] basic_auth",
        )?;
    }
    if let Some(token) = bearer_token {
        set(
            "authorization",
            format!("Bearer {}", token.trim()),
            "[export] bearer_token",
        )?;
    }
    if let Some(tenant) = tenant_id {
        set(
            "x-scope-orgid",
            tenant.trim().to_string(),
            "[export] tenant_id",
        )?;
    }
    Ok(())
}

/// Standard base64 with padding, as basic auth wants it.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let word = chunk.iter().enumerate().fold(0u32, |word, (index, &byte)| {
            word | u32::from(byte) << (16 - 8 * index)
        });
        for position in 0..4 {
            if position <= chunk.len() {
                let sextet = (word >> (18 - 6 * position)) & 0x3f;
                text.push(char::from(ALPHABET[sextet as usize]));
            } else {
                text.push('=');
            }
        }
    }
    text
}

/// The endpoint with its scheme. gRPC endpoints may be given as bare
/// `host:port`; then `insecure` decides between http and https, as the
/// OTLP specification says. HTTP endpoints must be URLs.
fn with_scheme(found: &Found, protocol: Protocol, insecure: bool) -> Result<String, SettingsError> {
    let value = &found.value;
    let url = if value.starts_with("http://") || value.starts_with("https://") {
        value.clone()
    } else if value.contains("://") {
        return Err(invalid(found, "the scheme must be http or https"));
    } else if protocol == Protocol::Grpc {
        let scheme = if insecure { "http" } else { "https" };
        format!("{scheme}://{value}")
    } else {
        return Err(invalid(
            found,
            "an HTTP endpoint is a URL: write http://host:port or https://host:port",
        ));
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|err| invalid(found, format!("not a URL: {err}")))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid(found, "no host"));
    }
    if uri.query().is_some() {
        return Err(invalid(found, "an endpoint takes no query string"));
    }
    Ok(url)
}

/// The path of a URL, `""` for none or `/`.
fn path_of(url: &str) -> &str {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    after_scheme
        .find('/')
        .map_or("", |slash| &after_scheme[slash..])
        .trim_end_matches('/')
}

/// `key1=value1,key2=value2`, values percent-decoded (the W3C baggage form
/// the OTLP specification uses for `OTEL_EXPORTER_OTLP_HEADERS`).
pub fn parse_headers(text: &str) -> Result<Vec<(String, String)>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(parse_header)
        .collect()
}

/// One `key=value` header.
pub fn parse_header(pair: &str) -> Result<(String, String), String> {
    let (key, value) = pair
        .split_once('=')
        .ok_or_else(|| format!("{pair:?} is not key=value"))?;
    let key = key.trim().to_ascii_lowercase();
    let value = percent_decode(value.trim())
        .ok_or_else(|| format!("the value of {key:?} is not valid percent-encoded UTF-8"))?;
    check_header(&key, &value)?;
    Ok((key, value))
}

fn check_header(key: &str, value: &str) -> Result<(), String> {
    http::HeaderName::from_bytes(key.as_bytes())
        .map_err(|_| format!("{key:?} is not a valid header name"))?;
    http::HeaderValue::from_str(value)
        .map_err(|_| format!("the value of {key:?} is not a valid header value"))?;
    // gRPC reserves these; letting a user set them would break the call.
    if key.starts_with("grpc-") || key == "content-type" || key == "te" {
        return Err(format!("{key:?} is set by the exporter itself"));
    }
    Ok(())
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = text.get(index + 1..index + 3)?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        move |key| map.get(key).cloned()
    }

    fn resolved(explicit: Explicit, pairs: &[(&str, &str)]) -> OtlpSettings {
        resolve(explicit, env(pairs)).unwrap().unwrap()
    }

    #[test]
    fn nothing_configured_means_no_export() {
        assert_eq!(resolve(Explicit::default(), env(&[])), Ok(None));
        assert_eq!(
            resolve(
                Explicit::default(),
                env(&[("OTEL_EXPORTER_OTLP_HEADERS", "a=b")])
            ),
            Ok(None)
        );
    }

    #[test]
    fn explicit_beats_the_signal_variable_which_beats_the_generic_one() {
        let all = [
            ("OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT", "http://signal:4317"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4317"),
            ("OTEL_EXPORTER_OTLP_PROFILES_TIMEOUT", "2000"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "3000"),
            ("OTEL_EXPORTER_OTLP_PROFILES_HEADERS", "x-tenant=signal"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=generic,x-other=1"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_PROFILES_CERTIFICATE", "/signal/ca.pem"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/generic/ca.pem"),
        ];
        let from_env = resolved(Explicit::default(), &all);
        assert_eq!(from_env.endpoint, "http://signal:4317");
        assert_eq!(from_env.timeout, Duration::from_secs(2));
        assert_eq!(
            from_env.headers,
            [("x-tenant".to_string(), "signal".to_string())]
        );
        assert_eq!(from_env.compression, Compression::Gzip);
        assert_eq!(
            from_env.tls.certificate,
            Some(PathBuf::from("/signal/ca.pem"))
        );
        assert_eq!(from_env.protocol, Protocol::Grpc, "the default");

        let generic_only: Vec<_> = all
            .iter()
            .copied()
            .filter(|(key, _)| !key.contains("PROFILES"))
            .collect();
        let generic = resolved(Explicit::default(), &generic_only);
        assert_eq!(generic.endpoint, "http://generic:4317");
        assert_eq!(generic.timeout, Duration::from_secs(3));
        assert_eq!(generic.headers.len(), 2);
        assert_eq!(
            generic.tls.certificate,
            Some(PathBuf::from("/generic/ca.pem"))
        );

        let explicit = resolved(
            Explicit {
                endpoint: Some("http://explicit:4317".into()),
                timeout: Some(Duration::from_millis(500)),
                headers: Some(vec![("x-tenant".into(), "explicit".into())]),
                compression: Some(Compression::None),
                ..Explicit::default()
            },
            &all,
        );
        assert_eq!(explicit.endpoint, "http://explicit:4317");
        assert_eq!(explicit.timeout, Duration::from_millis(500));
        assert_eq!(
            explicit.headers,
            [("x-tenant".to_string(), "explicit".to_string())]
        );
        assert_eq!(explicit.compression, Compression::None);
        assert_eq!(
            explicit.tls.certificate,
            Some(PathBuf::from("/signal/ca.pem")),
            "settings resolve one by one"
        );
    }

    #[test]
    fn http_endpoints_get_the_profiles_path_where_the_specification_says() {
        let http = |explicit: Option<&str>, pairs: &[(&str, &str)]| {
            resolved(
                Explicit {
                    endpoint: explicit.map(str::to_string),
                    protocol: Some(Protocol::HttpProtobuf),
                    ..Explicit::default()
                },
                pairs,
            )
            .endpoint
        };
        assert_eq!(
            http(
                None,
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]
            ),
            "http://collector:4318/v1development/profiles"
        );
        assert_eq!(
            http(
                None,
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://gateway/otlp")]
            ),
            "https://gateway/otlp/v1development/profiles",
            "a base path is kept"
        );
        assert_eq!(
            http(
                None,
                &[(
                    "OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT",
                    "http://pyroscope:4040/custom"
                )]
            ),
            "http://pyroscope:4040/custom",
            "the signal's endpoint is used as given"
        );
        assert_eq!(
            http(Some("http://collector:4318"), &[]),
            "http://collector:4318/v1development/profiles"
        );
        assert_eq!(
            http(Some("http://collector:4318/ingest/profiles"), &[]),
            "http://collector:4318/ingest/profiles"
        );
    }

    #[test]
    fn grpc_endpoints_without_a_scheme_follow_insecure() {
        let bare = [("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")];
        assert_eq!(
            resolved(Explicit::default(), &bare).endpoint,
            "https://collector:4317"
        );
        let insecure = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROFILES_INSECURE", "true"),
        ];
        let settings = resolved(Explicit::default(), &insecure);
        assert_eq!(settings.endpoint, "http://collector:4317");
        assert!(!settings.uses_tls());
    }

    #[test]
    fn protocol_comes_from_the_environment_too() {
        let settings = resolved(
            Explicit::default(),
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ],
        );
        assert_eq!(settings.protocol, Protocol::HttpProtobuf);
        assert_eq!(settings.endpoint, "http://c:4318/v1development/profiles");
        let explicit = resolved(
            Explicit {
                protocol: Some(Protocol::Grpc),
                ..Explicit::default()
            },
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ],
        );
        assert_eq!(explicit.protocol, Protocol::Grpc);
        assert_eq!(explicit.endpoint, "http://c:4317");
    }

    #[test]
    fn mistakes_name_their_source() {
        let error = |pairs: &[(&str, &str)]| {
            resolve(Explicit::default(), env(pairs))
                .unwrap_err()
                .to_string()
        };
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317");
        assert!(
            error(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).contains(
                "OTEL_EXPORTER_OTLP_PROTOCOL = \"http/json\": OTLP/JSON is not supported"
            )
        );
        assert!(error(&[endpoint, ("OTEL_EXPORTER_OTLP_PROFILES_TIMEOUT", "10s")])
            .contains("OTEL_EXPORTER_OTLP_PROFILES_TIMEOUT = \"10s\": write a whole number of milliseconds"));
        assert!(
            error(&[endpoint, ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")])
                .contains("use gzip or none")
        );
        assert!(error(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://c")]).contains("http or https"));
        assert!(
            error(&[endpoint, ("OTEL_EXPORTER_OTLP_HEADERS", "novalue")]).contains("not key=value")
        );
        assert!(
            error(&[endpoint, ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/k.pem")]).contains("needs both")
        );
        let http_bare = resolve(
            Explicit {
                protocol: Some(Protocol::HttpProtobuf),
                endpoint: Some("collector:4318".into()),
                ..Explicit::default()
            },
            env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(http_bare.contains("[export] otlp_endpoint"), "{http_bare}");
    }

    #[test]
    fn another_section_keeps_a_base_url_and_names_itself_in_errors() {
        const FORWARD: Section = Section {
            name: "[forward]",
            endpoint_key: "endpoint",
            http_path: None,
        };
        let http = |endpoint: &str| {
            resolve_in(
                FORWARD,
                Explicit {
                    endpoint: Some(endpoint.into()),
                    protocol: Some(Protocol::HttpProtobuf),
                    ..Explicit::default()
                },
                env(&[]),
            )
        };
        assert_eq!(
            http("http://collector:4318").unwrap().unwrap().endpoint,
            "http://collector:4318"
        );
        let bare = http("collector:4318").unwrap_err().to_string();
        assert!(bare.starts_with("[forward] endpoint = "), "{bare}");
    }

    #[test]
    fn headers_are_percent_decoded_and_checked() {
        assert_eq!(
            parse_headers(" Authorization=Basic%20dXNlcg== , x-scope-orgid=tenant-1,").unwrap(),
            [
                ("authorization".to_string(), "Basic dXNlcg==".to_string()),
                ("x-scope-orgid".to_string(), "tenant-1".to_string())
            ]
        );
        assert!(parse_headers("a=%zz").is_err());
        assert!(parse_headers("bad key=1").is_err());
        assert!(parse_headers("grpc-timeout=1S")
            .unwrap_err()
            .contains("set by the exporter"));
    }

    #[test]
    fn pyroscope_takes_its_push_path_gzip_and_only_an_endpoint_it_was_given() {
        let pyroscope = |endpoint: Option<&str>| {
            resolve(
                Explicit {
                    endpoint: endpoint.map(str::to_string),
                    protocol: Some(Protocol::Pyroscope),
                    ..Explicit::default()
                },
                env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")]),
            )
            .unwrap()
        };
        assert_eq!(pyroscope(None), None, "an OTLP endpoint is no Pyroscope");
        let settings = pyroscope(Some("http://pyroscope:4040/")).unwrap();
        assert_eq!(
            settings.endpoint,
            "http://pyroscope:4040/push.v1.PusherService/Push"
        );
        assert_eq!(settings.compression, Compression::Gzip);
        assert_eq!(
            pyroscope(Some("https://gw/custom/push")).unwrap().endpoint,
            "https://gw/custom/push"
        );
        assert!(format!("{settings}").starts_with("pyroscope to"));
    }

    #[test]
    fn credentials_become_headers_and_replace_their_namesakes() {
        let settings = resolved(
            Explicit {
                endpoint: Some("http://p:4040".into()),
                headers: Some(vec![
                    ("authorization".into(), "Bearer old".into()),
                    ("x-other".into(), "1".into()),
                ]),
                basic_auth: Some("Aladdin:open sesame".into()),
                tenant_id: Some(" ops ".into()),
                ..Explicit::default()
            },
            &[],
        );
        assert_eq!(
            settings.headers,
            [
                ("x-other".to_string(), "1".to_string()),
                (
                    "authorization".to_string(),
                    "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==".to_string()
                ),
                ("x-scope-orgid".to_string(), "ops".to_string()),
            ]
        );
        assert!(!format!("{settings}").contains("QWxh"));
        let bearer = resolved(
            Explicit {
                endpoint: Some("http://p:4040".into()),
                bearer_token: Some("glc_abc".into()),
                ..Explicit::default()
            },
            &[],
        );
        assert_eq!(
            bearer.headers,
            [("authorization".to_string(), "Bearer glc_abc".to_string())]
        );
        let both = resolve(
            Explicit {
                endpoint: Some("http://p:4040".into()),
                bearer_token: Some("t".into()),
                basic_auth: Some("u:p".into()),
                ..Explicit::default()
            },
            env(&[]),
        );
        assert!(both.unwrap_err().to_string().contains("set one"));
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
    }

    #[test]
    fn capture_spans_go_where_they_are_told_with_the_profiles_credentials() {
        let profiles = resolved(
            Explicit {
                endpoint: Some("http://pyroscope:4040".into()),
                protocol: Some(Protocol::Pyroscope),
                tenant_id: Some("ops".into()),
                ..Explicit::default()
            },
            &[],
        );
        let traces_env = [(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://tempo:4318/v1/traces",
        )];
        assert_eq!(resolve_traces(None, &profiles, env(&[])), Ok(None));
        let from_env = resolve_traces(None, &profiles, env(&traces_env))
            .unwrap()
            .unwrap();
        assert_eq!(from_env.endpoint, "http://tempo:4318/v1/traces");
        assert_eq!(from_env.protocol, Protocol::HttpProtobuf);
        assert_eq!(from_env.headers, profiles.headers);
        let explicit = resolve_traces(Some("https://gw:443".into()), &profiles, env(&traces_env))
            .unwrap()
            .unwrap();
        assert_eq!(explicit.endpoint, "https://gw:443/v1/traces");
        assert!(
            resolve_traces(Some("tempo:4318".into()), &profiles, env(&[]))
                .unwrap_err()
                .to_string()
                .contains("[export] traces_endpoint")
        );
    }

    #[test]
    fn header_values_never_show() {
        let settings = resolved(
            Explicit::default(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=secret-token"),
            ],
        );
        assert!(!format!("{settings}").contains("secret-token"));
        assert!(!format!("{settings:?}").contains("secret-token"));
        assert!(format!("{settings}").contains("authorization"));
    }
}
