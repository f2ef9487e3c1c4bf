//! Whose profile it is and why it was taken: the OTLP resource and profile
//! attributes of a capture.
//!
//! The resource describes the *captured* application, so its own OTLP
//! resource (from the series that breached) comes first; the sidecar's
//! environment fills the gaps: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! the Kubernetes downward API (`K8S_POD_NAME`, `K8S_NAMESPACE_NAME`,
//! `K8S_CONTAINER_NAME`, `K8S_NODE_NAME`, `K8S_POD_UID`) and the host name.
//! In a pod, the two containers share those facts. Pure: the caller passes
//! the environment and the host name in.
//!
//! Pyroscope makes every resource attribute a label of the profile's
//! series and refuses a series with more than 30 label names or a value
//! over 2048 bytes, so [`bound`] keeps a resource within a budget and
//! counts what it leaves out.

use std::time::SystemTime;

use crate::encode::otlp::{Attribute, Value};
use crate::signals::Attributes;

/// The captured process, as freezeframe sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessFacts {
    pub pid: u32,
    pub executable: Option<String>,
}

/// Downward-API variables and the resource attributes they stand for.
pub const DOWNWARD_API: [(&str, &str); 5] = [
    ("K8S_POD_NAME", "k8s.pod.name"),
    ("K8S_NAMESPACE_NAME", "k8s.namespace.name"),
    ("K8S_CONTAINER_NAME", "k8s.container.name"),
    ("K8S_NODE_NAME", "k8s.node.name"),
    ("K8S_POD_UID", "k8s.pod.uid"),
];

/// Resource attributes, first of each key winning (the encoder keeps the
/// first): the application's own, then the process, then the environment.
pub fn resource(
    application: Option<&Attributes>,
    process: Option<&ProcessFacts>,
    env: impl Fn(&str) -> Option<String>,
    host_name: Option<&str>,
) -> Vec<Attribute> {
    let mut attributes: Vec<Attribute> = Vec::new();
    for (key, value) in application.into_iter().flatten() {
        attributes.push(typed(key, value));
    }
    if let Some(process) = process {
        attributes.push(Attribute::int("process.pid", process.pid.into()));
        if let Some(executable) = &process.executable {
            attributes.push(Attribute::str("process.executable.name", executable));
        }
    }
    if let Some(service) = env("OTEL_SERVICE_NAME").filter(|name| !name.trim().is_empty()) {
        attributes.push(Attribute::str("service.name", service.trim()));
    }
    if let Some(text) = env("OTEL_RESOURCE_ATTRIBUTES") {
        for (key, value) in parse_resource_attributes(&text) {
            attributes.push(Attribute::str(key, value));
        }
    }
    for (variable, key) in DOWNWARD_API {
        if let Some(value) = env(variable).filter(|value| !value.trim().is_empty()) {
            attributes.push(Attribute::str(key, value.trim()));
        }
    }
    if let Some(host) = host_name.map(str::trim).filter(|host| !host.is_empty()) {
        attributes.push(Attribute::str("host.name", host));
    }
    // The specification's fallback, so a backend never files the profile
    // under an empty service.
    let executable = process.and_then(|process| process.executable.as_deref());
    attributes.push(Attribute::str(
        "service.name",
        executable.map_or_else(
            || "unknown_service".to_string(),
            |name| format!("unknown_service:{name}"),
        ),
    ));
    attributes
}

/// Resource attributes a profile carries by default: Pyroscope's 30 label
/// names less the [`OTHER_SERIES_LABELS`], with room to spare.
pub const DEFAULT_MAX_ATTRIBUTES: usize = 20;

/// The label names a series may have in Pyroscope (v2.2's default
/// `max_label_names_per_series`).
pub const MAX_LABEL_NAMES: usize = 30;

/// Series labels besides the resource's: Pyroscope's own `__name__`,
/// `__delta__`, `__otel__` and `service_name`, and at most three sample
/// attributes (thread name, state, and lock kind or system call).
pub const OTHER_SERIES_LABELS: usize = 7;

/// The most resource attributes a profile may be configured to carry.
pub const MAX_ATTRIBUTES: usize = MAX_LABEL_NAMES - OTHER_SERIES_LABELS;
const _: () = assert!(DEFAULT_MAX_ATTRIBUTES <= MAX_ATTRIBUTES);

/// Pyroscope's longest label value and name, in bytes.
pub const MAX_VALUE_BYTES: usize = 2048;
pub const MAX_NAME_BYTES: usize = 1024;

/// A resource within its budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Bounded {
    pub attributes: Vec<Attribute>,
    /// Attributes left out: too long for a label, or past the budget.
    pub dropped: u32,
}

/// The first of each key of `attributes`, at most `max` of them, with
/// `service.name` kept whatever its place (it names the series); a key or
/// text value too long for a Pyroscope label is left out. What is left
/// out is counted, for the resource's `dropped_attributes_count`.
pub fn bound(attributes: Vec<Attribute>, max: usize) -> Bounded {
    let mut unique: Vec<Attribute> = Vec::with_capacity(attributes.len());
    for attribute in attributes {
        if !unique.iter().any(|kept| kept.key == attribute.key) {
            unique.push(attribute);
        }
    }
    let before = unique.len();
    unique.retain(|attribute| {
        attribute.key.len() <= MAX_NAME_BYTES
            && !matches!(&attribute.value, Value::Str(text) if text.len() > MAX_VALUE_BYTES)
    });
    if let Some(position) = unique
        .iter()
        .position(|attribute| attribute.key == "service.name")
    {
        let service = unique.remove(position);
        unique.insert(0, service);
    }
    unique.truncate(max);
    Bounded {
        dropped: u32::try_from(before - unique.len()).unwrap_or(u32::MAX),
        attributes: unique,
    }
}

/// The sidecar's own resource, for the spans it sends about its captures:
/// the service `freezeframe` in the pod (downward API) and on the host
/// where it runs.
pub fn sidecar(env: impl Fn(&str) -> Option<String>, host_name: Option<&str>) -> Vec<Attribute> {
    let mut attributes = vec![
        Attribute::str("service.name", env!("CARGO_PKG_NAME")),
        Attribute::str("service.version", env!("CARGO_PKG_VERSION")),
    ];
    for (variable, key) in DOWNWARD_API {
        if let Some(value) = env(variable).filter(|value| !value.trim().is_empty()) {
            attributes.push(Attribute::str(key, value.trim()));
        }
    }
    if let Some(host) = host_name.map(str::trim).filter(|host| !host.is_empty()) {
        attributes.push(Attribute::str("host.name", host));
    }
    attributes
}

/// Attribute values arrive as text; the well-known integer ones go back to
/// integers, as the semantic conventions type them.
fn typed(key: &str, value: &str) -> Attribute {
    const INTEGERS: [&str; 3] = ["process.pid", "process.parent_pid", "thread.id"];
    match value.parse::<i64>() {
        Ok(number) if INTEGERS.contains(&key) => Attribute::int(key, number),
        _ => Attribute::str(key, value),
    }
}

/// `key1=value1,key2=value2`, values percent-decoded; malformed pairs are
/// skipped, as SDKs do.
pub fn parse_resource_attributes(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            let key = key.trim();
            let value = percent_decode(value.trim())?;
            (!key.is_empty()).then(|| (key.to_string(), value))
        })
        .collect()
}

fn percent_decode(text: &str) -> Option<String> {
    let mut decoded = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(byte) = bytes.next() {
        if byte == b'%' {
            let high = char::from(bytes.next()?).to_digit(16)?;
            let low = char::from(bytes.next()?).to_digit(16)?;
            decoded.push((high * 16 + low) as u8);
        } else {
            decoded.push(byte);
        }
    }
    String::from_utf8(decoded).ok()
}

/// What a capture was for, as recorded in `captures.jsonl`.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptureFacts {
    pub capture_id: String,
    pub rule: String,
    pub cause: String,
    pub metric: Option<String>,
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    pub unit: String,
    pub breach_start: SystemTime,
    pub fired_at: SystemTime,
}

/// Profile attributes recording the capture.
pub fn capture_attributes(facts: &CaptureFacts) -> Vec<Attribute> {
    let mut attributes = vec![
        Attribute::str("freezeframe.capture.id", &facts.capture_id),
        Attribute::str("freezeframe.rule.name", &facts.rule),
        Attribute::str("freezeframe.rule.cause", &facts.cause),
    ];
    if let Some(metric) = &facts.metric {
        attributes.push(Attribute::str("freezeframe.rule.metric", metric));
    }
    let unit = (!facts.unit.is_empty()).then_some(facts.unit.as_str());
    for (key, value) in [
        ("freezeframe.rule.value", facts.value),
        ("freezeframe.rule.threshold", facts.threshold),
    ] {
        if let Some(value) = value.filter(|value| value.is_finite()) {
            let attribute = Attribute::new(key, Value::Double(value));
            attributes.push(match unit {
                Some(unit) => attribute.with_unit(unit),
                None => attribute,
            });
        }
    }
    attributes.push(Attribute::str(
        "freezeframe.breach.start",
        humantime::format_rfc3339_millis(facts.breach_start).to_string(),
    ));
    attributes.push(Attribute::str(
        "freezeframe.fired_at",
        humantime::format_rfc3339_millis(facts.fired_at).to_string(),
    ));
    attributes
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        move |key| map.get(key).cloned()
    }

    /// The first value of each key, as the encoder keeps it.
    fn effective(attributes: &[Attribute]) -> Vec<(String, Value)> {
        let mut seen: Vec<(String, Value)> = Vec::new();
        for attribute in attributes {
            if !seen.iter().any(|(key, _)| *key == attribute.key) {
                seen.push((attribute.key.clone(), attribute.value.clone()));
            }
        }
        seen
    }

    fn value_of(attributes: &[Attribute], key: &str) -> Option<Value> {
        effective(attributes)
            .into_iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value)
    }

    #[test]
    fn the_application_names_itself_and_the_environment_fills_in() {
        let application = Attributes::from([
            ("service.name".to_string(), "feed".to_string()),
            ("process.pid".to_string(), "7".to_string()),
            ("deployment.environment".to_string(), "prod".to_string()),
        ]);
        let process = ProcessFacts {
            pid: 48211,
            executable: Some("python3".into()),
        };
        let env = env(&[
            ("OTEL_SERVICE_NAME", "freezeframe"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "team=storage,deployment.environment=staging,note=a%2Cb",
            ),
            ("K8S_POD_NAME", "feed-7d9"),
            ("K8S_NAMESPACE_NAME", "shop"),
            ("K8S_CONTAINER_NAME", "feed"),
        ]);
        let attributes = resource(Some(&application), Some(&process), env, Some("node-1\n"));
        let get = |key| value_of(&attributes, key);
        assert_eq!(get("service.name"), Some(Value::Str("feed".into())));
        assert_eq!(
            get("process.pid"),
            Some(Value::Int(7)),
            "the pid the application reports"
        );
        assert_eq!(
            get("process.executable.name"),
            Some(Value::Str("python3".into()))
        );
        assert_eq!(
            get("deployment.environment"),
            Some(Value::Str("prod".into()))
        );
        assert_eq!(get("team"), Some(Value::Str("storage".into())));
        assert_eq!(get("note"), Some(Value::Str("a,b".into())));
        assert_eq!(get("k8s.pod.name"), Some(Value::Str("feed-7d9".into())));
        assert_eq!(get("k8s.namespace.name"), Some(Value::Str("shop".into())));
        assert_eq!(get("k8s.container.name"), Some(Value::Str("feed".into())));
        assert_eq!(get("k8s.node.name"), None);
        assert_eq!(get("host.name"), Some(Value::Str("node-1".into())));
    }

    #[test]
    fn without_a_series_the_environment_and_process_decide() {
        let process = ProcessFacts {
            pid: 42,
            executable: Some("feed-db".into()),
        };
        let named = resource(
            None,
            Some(&process),
            env(&[("OTEL_SERVICE_NAME", "db")]),
            None,
        );
        assert_eq!(
            value_of(&named, "service.name"),
            Some(Value::Str("db".into()))
        );
        assert_eq!(value_of(&named, "process.pid"), Some(Value::Int(42)));
        let unnamed = resource(None, Some(&process), env(&[]), None);
        assert_eq!(
            value_of(&unnamed, "service.name"),
            Some(Value::Str("unknown_service:feed-db".into()))
        );
        let nothing = resource(None, None, env(&[]), None);
        assert_eq!(
            effective(&nothing),
            [(
                "service.name".to_string(),
                Value::Str("unknown_service".into())
            )]
        );
    }

    #[test]
    fn a_resource_is_bounded_and_what_is_left_out_counted() {
        let mut attributes: Vec<Attribute> = (0..30)
            .map(|index| Attribute::str(format!("team.{index}"), "x"))
            .collect();
        attributes.insert(3, Attribute::str("team.0", "a second one"));
        attributes.insert(5, Attribute::str("huge", "x".repeat(MAX_VALUE_BYTES + 1)));
        attributes.insert(6, Attribute::str("k".repeat(MAX_NAME_BYTES + 1), "x"));
        attributes.insert(7, Attribute::int("long.number", i64::MAX));
        attributes.push(Attribute::str("service.name", "feed"));
        let bounded = bound(attributes, DEFAULT_MAX_ATTRIBUTES);
        assert_eq!(bounded.attributes.len(), DEFAULT_MAX_ATTRIBUTES);
        assert_eq!(
            bounded.attributes[0],
            Attribute::str("service.name", "feed")
        );
        assert_eq!(
            bounded.attributes[1],
            Attribute::str("team.0", "x"),
            "the first of a key"
        );
        assert!(bounded.attributes.iter().any(|a| a.key == "long.number"));
        // 34 distinct keys: two too long, 12 past the budget.
        assert_eq!(bounded.dropped, 14);
        let roomy = bound(vec![Attribute::str("a", "1")], DEFAULT_MAX_ATTRIBUTES);
        assert_eq!((roomy.attributes.len(), roomy.dropped), (1, 0));
    }

    #[test]
    fn resource_attribute_text_skips_what_it_cannot_read() {
        assert_eq!(
            parse_resource_attributes("a=1, b = two ,=x,novalue,c=%E2%9C%93,d=%zz"),
            [
                ("a".to_string(), "1".to_string()),
                ("b".to_string(), "two".to_string()),
                ("c".to_string(), "✓".to_string())
            ]
        );
    }

    #[test]
    fn capture_attributes_carry_the_rule_with_units() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_734_192_915);
        let attributes = capture_attributes(&CaptureFacts {
            capture_id: "id".into(),
            rule: "feed-latency".into(),
            cause: "value 0.75 s against threshold 0.2 s".into(),
            metric: Some("db.client.operation.duration".into()),
            value: Some(0.75),
            threshold: Some(0.2),
            unit: "s".into(),
            breach_start: at,
            fired_at: at + Duration::from_secs(2),
        });
        let value = attributes
            .iter()
            .find(|a| a.key == "freezeframe.rule.value")
            .unwrap();
        assert_eq!(
            (value.value.clone(), value.unit.as_deref()),
            (Value::Double(0.75), Some("s"))
        );
        assert_eq!(
            value_of(&attributes, "freezeframe.breach.start"),
            Some(Value::Str("2026-11-26T23:03:12.915Z".into()))
        );
        assert_eq!(
            value_of(&attributes, "freezeframe.rule.name"),
            Some(Value::Str("feed-latency".into()))
        );
    }
}
