//! `freezeframe check-config`: the file, the environment and flags, in that
//! order of precedence, and clear words for every mistake.

use std::path::PathBuf;
use std::process::{Command, Output};

fn config_file(name: &str, text: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn check(file: &PathBuf, env: &[(&str, &str)], flags: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_freezeframe"));
    command.arg("check-config").arg(file).args(flags);
    let inherited = std::env::vars()
        .filter(|(key, _)| key.starts_with("FREEZEFRAME_") || key.starts_with("OTEL_"));
    for (key, _) in inherited {
        command.env_remove(key);
    }
    command.envs(env.iter().copied());
    command.output().unwrap()
}

const FILE: &str = r#"
[recorder]
history = "30s"
unwind_threshold = "50ms"

[export]
directory = "/srv/captures"

[[trigger]]
name = "feed-latency"
metric = "db.client.operation.duration"
statistic = "p99"
above = "200ms"
for = "2s"
"#;

#[test]
fn flags_beat_the_environment_which_beats_the_file() {
    let file = config_file("precedence.toml", FILE);
    let from_file = String::from_utf8(check(&file, &[], &[]).stdout).unwrap();
    assert!(from_file.contains("history 30s"), "{from_file}");
    assert!(
        from_file.contains("frame pointers for blocks from 50ms"),
        "{from_file}"
    );
    assert!(from_file.contains("/srv/captures"), "{from_file}");
    assert!(
        from_file.contains("127.0.0.1:4317"),
        "defaults fill the rest: {from_file}"
    );
    assert!(
        from_file.contains("feed-latency: p99 of db.client.operation.duration"),
        "{from_file}"
    );

    let env = [
        ("FREEZEFRAME_RECORDER_HISTORY", "10s"),
        ("FREEZEFRAME_RECORDER_UNWIND_THRESHOLD", "20ms"),
        ("FREEZEFRAME_EXPORT_DIRECTORY", "/env/captures"),
    ];
    let from_env = String::from_utf8(check(&file, &env, &[]).stdout).unwrap();
    assert!(from_env.contains("history 10s"), "{from_env}");
    assert!(
        from_env.contains("frame pointers for blocks from 20ms"),
        "{from_env}"
    );
    assert!(from_env.contains("/env/captures"), "{from_env}");

    let from_flag = String::from_utf8(
        check(
            &file,
            &env,
            &[
                "--recorder-history",
                "5s",
                "--recorder-unwind-threshold",
                "0s",
            ],
        )
        .stdout,
    )
    .unwrap();
    assert!(from_flag.contains("history 5s"), "{from_flag}");
    assert!(
        from_flag.contains("without frame pointers off"),
        "0s turns unwinding off: {from_flag}"
    );
    assert!(
        from_flag.contains("/env/captures"),
        "the environment still applies where no flag is given"
    );
}

#[test]
fn the_allocation_threshold_takes_sizes_and_zero_turns_it_off() {
    let shown = |text: &str| {
        let output = check(&config_file("min-allocation.toml", text), &[], &[]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    assert!(shown("").contains("address-space changes from 64 MiB"));
    assert!(shown("[recorder]\nmin_allocation = \"1GiB\"\n").contains("changes from 1.00 GiB"));
    assert!(shown("[recorder]\nmin_allocation = 1048576\n").contains("changes from 1.0 MiB"));
    assert!(shown("[recorder]\nmin_allocation = 0\n").contains("address-space changes off"));
}

#[test]
fn the_shared_probe_dir_takes_the_flag_then_the_environment_then_the_file_and_off_is_private() {
    let shown = |text: &str, env: &[(&str, &str)], flags: &[&str]| {
        settings_line(
            &check(&config_file("shared-probe.toml", text), env, flags),
            "recorder:",
        )
    };
    assert!(shown("", &[], &[]).contains("probe shared in /sys/fs/bpf/freezeframe"));
    let file = "[recorder]\nshared_probe_dir = \"/sys/fs/bpf/from-file\"\n";
    assert!(shown(file, &[], &[]).contains("probe shared in /sys/fs/bpf/from-file"));
    let env = [("FREEZEFRAME_SHARED_PROBE_DIR", "/sys/fs/bpf/from-env")];
    assert!(shown(file, &env, &[]).contains("probe shared in /sys/fs/bpf/from-env"));
    let flag = ["--shared-probe-dir", "/sys/fs/bpf/from-flag"];
    assert!(shown(file, &env, &flag).contains("probe shared in /sys/fs/bpf/from-flag"));
    assert!(shown(file, &env, &["--shared-probe-dir", "off"]).contains("probe private"));
    assert!(shown("[recorder]\nshared_probe_dir = \"\"\n", &[], &[]).contains("probe private"));
}

#[test]
fn the_log_format_takes_the_flag_then_the_environment_then_the_file() {
    let shown = |text: &str, env: &[(&str, &str)], flags: &[&str]| {
        let output = check(&config_file("log-format.toml", text), env, flags);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    assert!(shown("", &[], &[]).contains("logs as text"));
    let json_file = "[telemetry]\nlog_format = \"json\"\n";
    assert!(shown(json_file, &[], &[]).contains("logs as json"));
    let env = [("FREEZEFRAME_LOG_FORMAT", "text")];
    assert!(shown(json_file, &env, &[]).contains("logs as text"));
    assert!(shown(json_file, &env, &["--log-format", "json"]).contains("logs as json"));
    let wrong = check(
        &config_file(
            "log-format-wrong.toml",
            "[telemetry]\nlog_format = \"xml\"\n",
        ),
        &[],
        &[],
    );
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("log_format"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
}

#[test]
fn mistakes_are_named() {
    let cases = [
        (
            "unknown-key.toml",
            "[recorder]\nhistroy = \"30s\"\n",
            "unknown field `histroy`",
        ),
        (
            "bad-duration.toml",
            "[recorder]\nhistory = \"thirty\"\n",
            "\"thirty\" is not a duration",
        ),
        (
            "bad-threshold.toml",
            &FILE.replace("200ms", "200 parsecs"),
            "unknown unit `parsecs`",
        ),
        (
            "two-targets.toml",
            "[target]\npid = 10\nprocess_name = \"db\"\n",
            "set `pid` or `process_name`, not both",
        ),
        (
            "bad-size.toml",
            "[recorder]\nmin_allocation = \"64 parsecs\"\n",
            "[recorder] min_allocation: unknown size unit \"parsecs\"",
        ),
        (
            "short-history.toml",
            "[recorder]\nhistory = \"100ms\"\n",
            "must be at least 1s",
        ),
        (
            "duplicate.toml",
            &format!("{FILE}{}", &FILE[FILE.find("[[trigger]]").unwrap()..]),
            "two [[trigger]] rules are named \"feed-latency\"",
        ),
    ];
    for (name, text, expected) in cases {
        let output = check(&config_file(name, text), &[], &[]);
        assert!(!output.status.success(), "{name} was accepted");
        let message = String::from_utf8_lossy(&output.stderr);
        assert!(message.contains(expected), "{name}: {message}");
    }
}

/// The line `check-config` prints that starts with `label`.
fn settings_line(output: &Output, label: &str) -> String {
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text.lines()
        .find(|line| line.starts_with(label))
        .unwrap_or_else(|| panic!("no {label} line in {text}"))
        .to_string()
}

/// The `otlp:` line `check-config` prints.
fn otlp_line(output: &Output) -> String {
    settings_line(output, "otlp:")
}

#[test]
fn exporter_settings_take_flags_then_freezeframe_then_file_then_otel_variables() {
    let bare = config_file(
        "export-bare.toml",
        "[export]\ndirectory = \"/srv/captures\"\n",
    );
    let with_endpoint = config_file(
        "export-file.toml",
        "[export]\notlp_endpoint = \"http://file:4317\"\ntimeout = \"4s\"\n",
    );
    assert!(otlp_line(&check(&bare, &[], &[])).contains("off"));

    let generic = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4318"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "x-scope-orgid=generic"),
    ];
    let line = otlp_line(&check(&bare, &generic, &[]));
    assert!(
        line.contains("over http/protobuf to http://generic:4318/v1development/profiles"),
        "{line}"
    );
    assert!(line.contains("timeout 2s 500ms"), "{line}");
    assert!(
        line.contains("headers x-scope-orgid (values hidden)"),
        "{line}"
    );
    assert!(
        !line.contains("generic,"),
        "header values never print: {line}"
    );

    let signal = [
        generic.as_slice(),
        &[
            (
                "OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT",
                "http://signal:4040/custom",
            ),
            ("OTEL_EXPORTER_OTLP_PROFILES_TIMEOUT", "1500"),
        ],
    ]
    .concat();
    let line = otlp_line(&check(&bare, &signal, &[]));
    assert!(line.contains("to http://signal:4040/custom,"), "{line}");
    assert!(line.contains("timeout 1s 500ms"), "{line}");

    let line = otlp_line(&check(&with_endpoint, &signal, &[]));
    assert!(
        line.contains("over http/protobuf to http://file:4317/v1development/profiles"),
        "the file beats the OTEL variables: {line}"
    );
    assert!(line.contains("timeout 4s"), "{line}");

    let ours = [
        signal.as_slice(),
        &[
            ("FREEZEFRAME_EXPORT_OTLP_ENDPOINT", "http://ours:4317"),
            ("FREEZEFRAME_EXPORT_PROTOCOL", "grpc"),
        ],
    ]
    .concat();
    let line = otlp_line(&check(&with_endpoint, &ours, &[]));
    assert!(line.contains("over grpc to http://ours:4317,"), "{line}");

    let line = otlp_line(&check(
        &with_endpoint,
        &ours,
        &[
            "--export-otlp-endpoint",
            "http://flag:4317",
            "--export-timeout",
            "9s",
        ],
    ));
    assert!(line.contains("over grpc to http://flag:4317,"), "{line}");
    assert!(line.contains("timeout 9s"), "{line}");
}

#[test]
fn exporter_mistakes_are_named() {
    let bare = config_file("export-mistakes.toml", "[export]\nlink_grace = \"5m\"\n");
    let output = check(&bare, &[], &[]);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("link_grace"),
        "{output:?}"
    );

    let fine = config_file("export-fine.toml", "");
    let output = check(
        &fine,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROFILES_COMPRESSION", "brotli"),
        ],
        &[],
    );
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("OTEL_EXPORTER_OTLP_PROFILES_COMPRESSION = \"brotli\": use gzip or none"),
        "{message}"
    );
}

/// The `forward:` line `check-config` prints.
fn forward_line(output: &Output) -> String {
    settings_line(output, "forward:")
}

#[test]
fn forward_settings_take_flags_then_freezeframe_then_file_and_never_otel_variables() {
    let bare = config_file("forward-bare.toml", "");
    let otel = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4317")];
    assert!(
        forward_line(&check(&bare, &otel, &[])).contains("off"),
        "the OTEL variables are the profiles exporter's"
    );

    let file = config_file(
        "forward-file.toml",
        "[forward]\nendpoint = \"http://file:4318\"\nprotocol = \"http/protobuf\"\n\
         timeout = \"4s\"\nheaders = { \"x-scope-orgid\" = \"file\" }\nqueue_max_bytes = \"8MiB\"\n",
    );
    let line = forward_line(&check(&file, &[], &[]));
    assert!(
        line.contains("metrics, traces and logs over http/protobuf to http://file:4318,"),
        "an HTTP upstream stays a base URL: {line}"
    );
    assert!(line.contains("timeout 4s"), "{line}");
    assert!(
        line.contains("headers x-scope-orgid (values hidden)"),
        "{line}"
    );
    assert!(line.contains("queue up to 8388608 bytes"), "{line}");

    let env = [
        ("FREEZEFRAME_FORWARD_ENDPOINT", "collector:4317"),
        ("FREEZEFRAME_FORWARD_PROTOCOL", "grpc"),
        ("FREEZEFRAME_FORWARD_INSECURE", "true"),
        ("FREEZEFRAME_FORWARD_COMPRESSION", "gzip"),
        ("FREEZEFRAME_FORWARD_QUEUE_MAX_BYTES", "1MiB"),
    ];
    let line = forward_line(&check(&file, &env, &[]));
    assert!(
        line.contains("over grpc to http://collector:4317,"),
        "{line}"
    );
    assert!(line.contains("compression gzip"), "{line}");
    assert!(
        line.contains("timeout 4s"),
        "the file still sets the rest: {line}"
    );
    assert!(line.contains("queue up to 1048576 bytes"), "{line}");

    let line = forward_line(&check(
        &file,
        &env,
        &[
            "--forward-endpoint",
            "https://flag:4317",
            "--forward-timeout",
            "9s",
            "--forward-queue-max-bytes",
            "65536",
        ],
    ));
    assert!(line.contains("over grpc to https://flag:4317,"), "{line}");
    assert!(line.contains("timeout 9s"), "{line}");
    assert!(line.contains("queue up to 65536 bytes"), "{line}");
}

#[test]
fn forward_mistakes_are_named() {
    for (name, text, expected) in [
        (
            "forward-bare-http.toml",
            "[forward]\nendpoint = \"collector:4318\"\nprotocol = \"http/protobuf\"\n",
            "[forward] endpoint = \"collector:4318\": an HTTP endpoint is a URL",
        ),
        (
            "forward-small-queue.toml",
            "[forward]\nendpoint = \"http://c:4317\"\nqueue_max_bytes = 1024\n",
            "[forward] queue_max_bytes = 1024: must be between 64 KiB",
        ),
        (
            "forward-half-mtls.toml",
            "[forward]\nendpoint = \"https://c:4317\"\nclient_key = \"/k.pem\"\n",
            "mutual TLS needs both",
        ),
        (
            "forward-typo.toml",
            "[forward]\nendpiont = \"http://c:4317\"\n",
            "unknown field `endpiont`",
        ),
    ] {
        let output = check(&config_file(name, text), &[], &[]);
        assert!(!output.status.success(), "{name} was accepted");
        let message = String::from_utf8_lossy(&output.stderr);
        assert!(message.contains(expected), "{name}: {message}");
    }
}

#[test]
fn the_resource_budget_takes_the_flag_then_freezeframe_then_the_file() {
    let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317");
    let bare = config_file("resource-bare.toml", "");
    assert!(
        otlp_line(&check(&bare, &[endpoint], &[])).contains("at most 20 resource attributes"),
        "the default"
    );
    let file = config_file(
        "resource-file.toml",
        "[export]\nmax_resource_attributes = 12\n",
    );
    assert!(otlp_line(&check(&file, &[endpoint], &[])).contains("at most 12 resource"));
    let ours = [
        endpoint,
        ("FREEZEFRAME_EXPORT_MAX_RESOURCE_ATTRIBUTES", "15"),
    ];
    assert!(otlp_line(&check(&file, &ours, &[])).contains("at most 15 resource"));
    let line = otlp_line(&check(
        &file,
        &ours,
        &["--export-max-resource-attributes", "9"],
    ));
    assert!(line.contains("at most 9 resource"), "{line}");

    let too_many = check(
        &bare,
        &[endpoint],
        &["--export-max-resource-attributes", "24"],
    );
    let message = String::from_utf8_lossy(&too_many.stderr);
    assert!(
        !too_many.status.success()
            && message.contains("max_resource_attributes = 24: must be between 1 and 23"),
        "{message}"
    );
}

#[test]
fn pyroscope_push_and_its_credentials_come_from_flags_the_environment_and_the_file() {
    let file = config_file(
        "pyroscope-file.toml",
        "[export]\notlp_endpoint = \"http://file:4040\"\nprotocol = \"pyroscope\"\ntenant_id = \"from-file\"\n",
    );
    let line = otlp_line(&check(&file, &[], &[]));
    assert!(
        line.contains("Pyroscope push pyroscope to http://file:4040/push.v1.PusherService/Push"),
        "{line}"
    );
    assert!(line.contains("compression gzip"), "{line}");
    assert!(
        line.contains("headers x-scope-orgid (values hidden)"),
        "{line}"
    );
    let ours = [
        ("FREEZEFRAME_EXPORT_BASIC_AUTH", "user:secret-password"),
        ("FREEZEFRAME_EXPORT_TENANT_ID", "from-env"),
    ];
    let output = check(&file, &ours, &[]);
    let line = otlp_line(&output);
    assert!(
        line.contains("headers authorization, x-scope-orgid (values hidden)"),
        "{line}"
    );
    assert!(!String::from_utf8_lossy(&output.stdout).contains("secret-password"));
    let both = check(&file, &ours, &["--export-bearer-token", "tok"]);
    assert!(
        String::from_utf8_lossy(&both.stderr).contains("set one"),
        "{both:?}"
    );
    let line = otlp_line(&check(
        &file,
        &[],
        &[
            "--export-bearer-token",
            "tok",
            "--export-protocol",
            "http/protobuf",
        ],
    ));
    assert!(line.contains("OTLP profiles over http/protobuf"), "{line}");
    assert!(
        line.contains("headers authorization, x-scope-orgid"),
        "{line}"
    );
}

#[test]
fn the_spool_age_limit_takes_the_flag_then_freezeframe_then_the_file() {
    let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317");
    let bare = config_file("age-bare.toml", "");
    assert!(otlp_line(&check(&bare, &[endpoint], &[])).contains("dropped after 1h"));
    let file = config_file("age-file.toml", "[export]\nmax_age = \"30m\"\n");
    assert!(otlp_line(&check(&file, &[endpoint], &[])).contains("dropped after 30m"));
    let ours = [endpoint, ("FREEZEFRAME_EXPORT_MAX_AGE", "0s")];
    assert!(otlp_line(&check(&file, &ours, &[])).contains("kept until delivered"));
    let line = otlp_line(&check(&file, &ours, &["--export-max-age", "2h"]));
    assert!(line.contains("dropped after 2h"), "{line}");
}

#[test]
fn the_capture_spans_endpoint_takes_the_flag_then_freezeframe_then_the_file_then_otel() {
    let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317");
    let traces_line = |output: &Output| {
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        text.lines()
            .find(|line| line.starts_with("traces:"))
            .unwrap_or_else(|| panic!("no traces line in {text}"))
            .to_string()
    };
    let bare = config_file("traces-bare.toml", "");
    assert!(traces_line(&check(&bare, &[endpoint], &[])).contains("off"));
    let otel = [
        endpoint,
        (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://otel:4318/v1/traces",
        ),
    ];
    assert!(traces_line(&check(&bare, &otel, &[])).contains("to http://otel:4318/v1/traces,"));
    let file = config_file(
        "traces-file.toml",
        "[export]\ntraces_endpoint = \"http://file:4318\"\n",
    );
    assert!(traces_line(&check(&file, &otel, &[])).contains("to http://file:4318/v1/traces,"));
    let ours = [
        otel[0],
        otel[1],
        ("FREEZEFRAME_EXPORT_TRACES_ENDPOINT", "http://ours:4318"),
    ];
    assert!(traces_line(&check(&file, &ours, &[])).contains("to http://ours:4318/v1/traces,"));
    let line = traces_line(&check(
        &file,
        &ours,
        &["--export-traces-endpoint", "http://flag:4318/custom"],
    ));
    assert!(
        line.contains("over http/protobuf to http://flag:4318/custom,"),
        "{line}"
    );
}
