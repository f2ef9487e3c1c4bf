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
    for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("FREEZEFRAME_")) {
        command.env_remove(key);
    }
    command.envs(env.iter().copied());
    command.output().unwrap()
}

const FILE: &str = r#"
[recorder]
history = "30s"

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
        ("FREEZEFRAME_EXPORT_DIRECTORY", "/env/captures"),
    ];
    let from_env = String::from_utf8(check(&file, &env, &[]).stdout).unwrap();
    assert!(from_env.contains("history 10s"), "{from_env}");
    assert!(from_env.contains("/env/captures"), "{from_env}");

    let from_flag =
        String::from_utf8(check(&file, &env, &["--recorder-history", "5s"]).stdout).unwrap();
    assert!(from_flag.contains("history 5s"), "{from_flag}");
    assert!(
        from_flag.contains("/env/captures"),
        "the environment still applies where no flag is given"
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
