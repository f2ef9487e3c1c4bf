//! The engine driven the way ingest drives it: points as an OTel SDK exports
//! them, every 500 ms, and a tick after each.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;
use crate::signals::{Attributes, Histogram, Point, PointValue, SeriesKey, Temporality};

/// Test time is milliseconds after this instant.
const T0_MS: u64 = 1_700_000_000_000;

fn at(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(T0_MS.checked_add_signed(ms).unwrap())
}

fn unix_nanos(ms: u64) -> u64 {
    (T0_MS + ms) * 1_000_000
}

fn engine(toml_text: &str) -> Engine {
    engine_with_limit(toml_text, 100)
}

fn engine_with_limit(toml_text: &str, max_series: usize) -> Engine {
    #[derive(serde::Deserialize)]
    struct Document {
        trigger: Vec<RuleConfig>,
    }
    let document: Document = toml::from_str(toml_text).unwrap();
    let rules = document
        .trigger
        .into_iter()
        .map(|config| validate(config).unwrap());
    Engine::new(rules.collect(), max_series)
}

fn key(metric: &str) -> SeriesKey {
    SeriesKey {
        metric: metric.to_string(),
        resource: [
            ("service.name".to_string(), "feed".to_string()),
            ("process.pid".to_string(), "4242".to_string()),
        ]
        .into(),
        attributes: Attributes::new(),
    }
}

fn gauge(metric: &str, unit: &str, ms: u64, value: f64) -> Point {
    Point {
        series: key(metric),
        unit: unit.to_string(),
        start_time_unix_nano: 0,
        time_unix_nano: unix_nanos(ms),
        value: PointValue::Gauge(value),
        exemplars: Vec::new(),
    }
}

/// Sends a point received at its own time, then ticks.
fn send(engine: &mut Engine, point: &Point) -> Vec<Firing> {
    let received = UNIX_EPOCH + Duration::from_nanos(point.time_unix_nano);
    engine.observe(point, received);
    engine.tick(received)
}

fn assert_close(actual: Option<f64>, expected: f64) {
    let actual = actual.expect("a value");
    assert!(
        (actual - expected).abs() < 1e-9,
        "expected {expected}, got {actual}"
    );
}

/// An application's request latency histogram, in seconds, as an OTel SDK
/// keeps it: cumulative, with lifetime min and max.
struct Latencies {
    start_ms: u64,
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    min: Option<f64>,
    max: Option<f64>,
}

impl Latencies {
    fn new() -> Latencies {
        let bounds = vec![
            0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        ];
        Latencies {
            start_ms: 0,
            counts: vec![0; bounds.len() + 1],
            bounds,
            sum: 0.0,
            min: None,
            max: None,
        }
    }

    fn record(&mut self, seconds: f64, times: u64) -> &mut Latencies {
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(self.bounds.len());
        self.counts[bucket] += times;
        self.sum += seconds * times as f64;
        self.min = Some(self.min.map_or(seconds, |min| min.min(seconds)));
        self.max = Some(self.max.map_or(seconds, |max| max.max(seconds)));
        self
    }

    /// 100 requests of 20 ms: 200 per second at a 500 ms export interval.
    fn busy(&mut self) -> &mut Latencies {
        self.record(0.02, 100)
    }

    /// 95 fast requests and 5 of 400 ms: p99 is 0.37 s.
    fn slow(&mut self) -> &mut Latencies {
        self.record(0.01, 95).record(0.4, 5)
    }

    /// The process restarted at `ms`.
    fn restart(&mut self, ms: u64) {
        *self = Latencies {
            start_ms: ms,
            ..Latencies::new()
        };
    }

    fn point(&self, ms: u64) -> Point {
        Point {
            series: key("http.server.request.duration"),
            unit: "s".to_string(),
            start_time_unix_nano: unix_nanos(self.start_ms),
            time_unix_nano: unix_nanos(ms),
            value: PointValue::Histogram(Histogram {
                temporality: Temporality::Cumulative,
                count: self.counts.iter().sum(),
                sum: Some(self.sum),
                min: self.min,
                max: self.max,
                bounds: self.bounds.clone(),
                bucket_counts: self.counts.clone(),
            }),
            exemplars: Vec::new(),
        }
    }
}

const P99_RULE: &str = r#"
    [[trigger]]
    name = "latency"
    metric = "http.server.request.duration"
    statistic = "p99"
    above = "200ms"
    for = "2s"
"#;

#[test]
fn a_breach_fires_once_it_has_held_for_exactly_for() {
    let mut engine = engine(P99_RULE);
    let mut app = Latencies::new();
    for ms in [0, 500, 1000] {
        assert!(send(&mut engine, &app.busy().point(ms)).is_empty());
    }
    // Breaching intervals from 1000 on.
    for ms in [1500, 2000, 2500, 2999] {
        assert!(
            send(&mut engine, &app.slow().point(ms)).is_empty(),
            "held {} ms",
            ms - 1000
        );
    }
    let firings = send(&mut engine, &app.slow().point(3000));
    assert_eq!(firings.len(), 1, "held 2000 ms");
    let firing = &firings[0];
    assert_eq!(firing.rule, "latency");
    assert_eq!(firing.series, Some(key("http.server.request.duration")));
    assert_eq!(firing.cause, Cause::Threshold);
    // rank 99 of 100: 4 of the 5 slow requests into (0.25, 0.4], 0.4 being the max.
    assert_close(firing.value, 0.37);
    assert_eq!(firing.threshold, Some(0.2));
    assert_eq!(firing.unit, "s");
    // The first breaching interval began at 1000 and its slowest request
    // took 400 ms, so it was sent at 600 at the latest.
    assert_eq!(firing.breach_start, at(600));
    assert_eq!(firing.fired_at, at(3000));
    assert_eq!(firing.capture, DEFAULT_CAPTURE);
    assert_eq!(firing.target_pid, Some(4242));
    // It fired; the breach goes on without firing again.
    assert!(send(&mut engine, &app.slow().point(3500)).is_empty());
    assert_eq!(engine.status()[0].counters.fired, 1);
}

#[test]
fn an_interval_that_does_not_breach_restarts_the_clock() {
    let mut engine = engine(&P99_RULE.replace("2s", "1s"));
    let mut app = Latencies::new();
    send(&mut engine, &app.busy().point(0));
    assert!(send(&mut engine, &app.slow().point(500)).is_empty());
    assert!(send(&mut engine, &app.busy().point(1000)).is_empty());
    // Without the clear interval, the breach would have held 1.5 s here.
    assert!(send(&mut engine, &app.slow().point(1500)).is_empty());
    assert_eq!(
        send(&mut engine, &app.slow().point(2000)).len(),
        1,
        "held 1 s since 1000"
    );
}

#[test]
fn a_stall_in_a_busy_series_is_a_breach_dated_one_interval_back() {
    let mut engine = engine(&P99_RULE.replace("2s", "1s"));
    let mut app = Latencies::new();
    for ms in (0..=5000).step_by(500) {
        assert!(send(&mut engine, &app.busy().point(ms)).is_empty());
    }
    // The freeze: points keep coming, their counts do not move.
    assert!(send(&mut engine, &app.point(5500)).is_empty());
    assert!(engine.status()[0].in_breach);
    let firings = send(&mut engine, &app.point(6000));
    assert_eq!(firings.len(), 1);
    let firing = &firings[0];
    let Cause::Stall {
        completions_per_second,
        busy_per_second,
    } = firing.cause
    else {
        panic!("a stall, not {:?}", firing.cause)
    };
    assert_eq!(completions_per_second, 0.0);
    assert!(
        (190.0..=200.0).contains(&busy_per_second),
        "{busy_per_second}"
    );
    assert_eq!(firing.value, None, "nothing completed");
    // The first empty interval began at 5000; the collapse began in the one before.
    assert_eq!(firing.breach_start, at(4500));
    // The thaw: requests stuck since 4200 complete at last.
    app.record(4.3, 100);
    assert!(send(&mut engine, &app.point(8500)).is_empty());
    let status = &engine.status()[0];
    assert!(status.firing);
    // rank 99 of 100 in (2.5, 4.3], 4.3 being the max.
    assert_close(status.value, 2.5 + 1.8 * 0.99);
    send(&mut engine, &app.busy().point(9000));
    assert!(!engine.status()[0].in_breach);
}

#[test]
fn a_partial_collapse_below_the_fraction_is_a_stall_and_a_dip_is_not() {
    let mut engine = engine(&P99_RULE.replace("2s", "0s"));
    let mut app = Latencies::new();
    for ms in (0..=2000).step_by(500) {
        send(&mut engine, &app.busy().point(ms));
    }
    // Half the usual completions: a dip, not a stall.
    assert!(send(&mut engine, &app.record(0.02, 50).point(2500)).is_empty());
    // 5 % of the usual rate: a stall.
    let firings = send(&mut engine, &app.record(0.02, 5).point(3000));
    let Cause::Stall {
        completions_per_second,
        ..
    } = firings[0].cause
    else {
        panic!("a stall, not {:?}", firings[0].cause)
    };
    assert_eq!(completions_per_second, 10.0);
    assert_close(firings[0].value, 0.02);
}

#[test]
fn a_series_that_was_never_busy_cannot_stall() {
    let mut engine = engine(&format!(
        "{}stall_busy_rate = 50.0\n",
        P99_RULE.replace("2s", "0s")
    ));
    let mut app = Latencies::new();
    for ms in (0..=2000).step_by(500) {
        send(&mut engine, &app.record(0.02, 10).point(ms));
    }
    for ms in (2500..=5000).step_by(500) {
        assert!(send(&mut engine, &app.point(ms)).is_empty());
    }
    assert!(!engine.status()[0].in_breach);
}

#[test]
fn an_empty_interval_is_no_stall_when_few_completions_were_expected() {
    let mut engine = engine(&P99_RULE.replace("2s", "0s"));
    let mut app = Latencies::new();
    // 4 per second is busy (above 1/s), but only 2 are expected per interval.
    for ms in (0..=2000).step_by(500) {
        send(&mut engine, &app.record(0.02, 2).point(ms));
    }
    assert!(send(&mut engine, &app.point(2500)).is_empty());
    assert!(!engine.status()[0].in_breach);
}

#[test]
fn with_stalls_ignored_a_freeze_shows_only_when_it_thaws_dated_back_by_the_max() {
    let mut engine = engine(&format!(
        "{}stall = \"ignore\"\n",
        P99_RULE.replace("2s", "0s")
    ));
    let mut app = Latencies::new();
    for ms in (0..=4000).step_by(500) {
        send(&mut engine, &app.busy().point(ms));
    }
    for ms in (4500..=8500).step_by(500) {
        assert!(send(&mut engine, &app.point(ms)).is_empty());
        assert!(!engine.status()[0].in_breach);
    }
    app.record(4.3, 100);
    let firings = send(&mut engine, &app.point(9000));
    assert_eq!(firings[0].cause, Cause::Threshold);
    // The interval began at 8500, and its slowest request took 4.3 s (the
    // lifetime max moved, so it is this interval's).
    assert_eq!(firings[0].breach_start, at(4200));
}

#[test]
fn when_the_lifetime_max_does_not_move_the_highest_bucket_dates_the_breach() {
    let mut engine = engine(&format!(
        "{}stall = \"ignore\"\n",
        P99_RULE.replace("2s", "0s")
    ));
    let mut app = Latencies::new();
    // One 6 s request early on among 1000 fast ones: p99 is fast, the
    // lifetime max is now 6 s.
    send(&mut engine, &app.busy().point(0));
    assert!(send(
        &mut engine,
        &app.record(0.01, 999).record(6.0, 1).point(500)
    )
    .is_empty());
    send(&mut engine, &app.busy().point(1000));
    app.record(4.3, 100);
    let firings = send(&mut engine, &app.point(1500));
    // 4.3 s lands in (2.5, 5.0]; its upper edge is all that is known.
    assert_eq!(firings[0].breach_start, at(1000 - 5000));
}

#[test]
fn a_counter_reset_starts_the_series_and_its_breach_afresh() {
    let mut engine = engine(&P99_RULE.replace("2s", "1s"));
    let mut app = Latencies::new();
    send(&mut engine, &app.busy().point(0));
    assert!(send(&mut engine, &app.slow().point(500)).is_empty());
    assert!(engine.status()[0].in_breach);
    app.restart(700);
    // The restarted series' first point is a baseline with nothing to judge.
    // Without the reset, the breach would have held for 1 s here.
    assert!(send(&mut engine, &app.slow().point(1000)).is_empty());
    assert!(!engine.status()[0].in_breach);
    assert_eq!(engine.counters().counter_resets, 1);
    assert!(send(&mut engine, &app.slow().point(1500)).is_empty());
    assert_eq!(send(&mut engine, &app.slow().point(2000)).len(), 1);
}

#[test]
fn out_of_order_points_are_dropped_and_counted() {
    let mut engine = engine(&P99_RULE.replace("2s", "0s"));
    let mut app = Latencies::new();
    send(&mut engine, &app.busy().point(0));
    let early = app.busy().point(500);
    send(&mut engine, &early);
    send(&mut engine, &app.busy().point(1000));
    assert!(send(&mut engine, &early).is_empty());
    assert_eq!(engine.counters().points_out_of_order, 1);
    let firings = send(&mut engine, &app.slow().point(1500));
    // The interval runs from 1000, the last accepted point.
    assert_eq!(firings[0].breach_start, at(1000 - 400));
}

#[test]
fn delta_points_are_judged_on_their_own() {
    let mut engine = engine(&P99_RULE.replace("2s", "0s"));
    let point = Point {
        start_time_unix_nano: unix_nanos(1000),
        value: PointValue::Histogram(Histogram {
            temporality: Temporality::Delta,
            count: 10,
            sum: Some(3.0),
            min: Some(0.01),
            max: Some(2.0),
            bounds: vec![0.1, 1.0],
            bucket_counts: vec![9, 0, 1],
        }),
        ..Latencies::new().point(1500)
    };
    let firings = send(&mut engine, &point);
    // rank 9.9: 0.9 of the one value in (1.0, 2.0].
    assert_close(firings[0].value, 1.9);
    assert_eq!(firings[0].breach_start, at(1000 - 2000));
}

#[test]
fn cooldown_holds_back_a_second_breach_until_it_is_over() {
    let mut engine = engine(
        r#"
        [[trigger]]
        name = "queue"
        metric = "queue.depth"
        statistic = "value"
        above = 100
        cooldown = "1m"
        "#,
    );
    let depth = |ms, value| gauge("queue.depth", "{item}", ms, value);
    let first = send(&mut engine, &depth(0, 150.0));
    assert_eq!((first.len(), first[0].unit.as_str()), (1, "{item}"));
    send(&mut engine, &depth(10_000, 50.0));
    // A new breach within the cooldown: suppressed, and counted once.
    assert!(send(&mut engine, &depth(20_000, 150.0)).is_empty());
    assert!(send(&mut engine, &depth(59_999, 150.0)).is_empty());
    assert_eq!(engine.status()[0].counters.suppressed_cooldown, 1);
    // Still breaching when the cooldown is over, to the millisecond.
    let later = send(&mut engine, &depth(60_000, 150.0));
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].breach_start, at(20_000));
    assert_eq!(engine.status()[0].counters.fired, 2);
}

#[test]
fn a_suppressed_breach_whose_series_went_quiet_does_not_fire_later() {
    let mut engine = engine(
        r#"
        [[trigger]]
        name = "queue"
        metric = "queue.depth"
        statistic = "value"
        above = 100
        cooldown = "1m"
        "#,
    );
    send(&mut engine, &gauge("queue.depth", "1", 0, 150.0));
    send(&mut engine, &gauge("queue.depth", "1", 10_000, 50.0));
    assert!(send(&mut engine, &gauge("queue.depth", "1", 20_000, 150.0)).is_empty());
    assert!(engine.tick(at(61_000)).is_empty());
    assert!(engine.tick(at(600_000)).is_empty());
}

#[test]
fn max_per_hour_counts_over_a_sliding_hour() {
    let mut engine = engine(
        r#"
        [[trigger]]
        name = "queue"
        metric = "queue.depth"
        statistic = "value"
        above = 100
        cooldown = "1m"
        max_per_hour = 2
        "#,
    );
    let depth = |ms, value| gauge("queue.depth", "1", ms, value);
    assert_eq!(send(&mut engine, &depth(0, 150.0)).len(), 1);
    send(&mut engine, &depth(30_000, 50.0));
    assert_eq!(send(&mut engine, &depth(60_000, 150.0)).len(), 1);
    send(&mut engine, &depth(90_000, 50.0));
    assert!(send(&mut engine, &depth(130_000, 150.0)).is_empty());
    assert!(send(&mut engine, &depth(3_599_999, 150.0)).is_empty());
    let counters = engine.status()[0].counters;
    assert_eq!(
        (counters.suppressed_hourly, counters.suppressed_cooldown),
        (1, 0)
    );
    // The firing at 0 leaves the hour at 3 600 000.
    let firings = send(&mut engine, &depth(3_600_000, 150.0));
    assert_eq!(firings.len(), 1);
    assert_eq!(firings[0].breach_start, at(130_000));
}

#[test]
fn one_rule_s_cooldown_covers_all_its_series_and_the_earliest_breach_goes_first() {
    let mut engine = engine(
        r#"
        [[trigger]]
        name = "queue"
        metric = "queue.depth"
        statistic = "value"
        above = 100
        "#,
    );
    let mut early = gauge("queue.depth", "1", 1000, 150.0);
    early
        .series
        .attributes
        .insert("queue".to_string(), "a".to_string());
    let mut late = gauge("queue.depth", "1", 1500, 150.0);
    late.series
        .attributes
        .insert("queue".to_string(), "b".to_string());
    // Both arrive before the tick; the later breach arrives first.
    engine.observe(&late, at(1600));
    engine.observe(&early, at(1600));
    let firings = engine.tick(at(1600));
    assert_eq!(firings.len(), 1);
    assert_eq!(firings[0].series, Some(early.series));
    assert_eq!(engine.status()[0].counters.suppressed_cooldown, 1);
}

#[test]
fn thresholds_compare_in_the_metric_s_unit_and_report_in_the_rule_s() {
    let mut engine = engine(
        r#"
        [[trigger]]
        name = "duration"
        metric = "op.duration"
        statistic = "value"
        above = "200ms"

        [[trigger]]
        name = "size"
        metric = "heap.size"
        statistic = "value"
        above = "3MiB"

        [[trigger]]
        name = "bare"
        metric = "wait.time"
        statistic = "value"
        above = 250
        "#,
    );
    let mut fire = |metric, unit, ms, value| send(&mut engine, &gauge(metric, unit, ms, value));
    let in_ms = fire("op.duration", "ms", 0, 250.0);
    assert_eq!(
        (in_ms[0].value, in_ms[0].threshold),
        (Some(0.25), Some(0.2))
    );
    assert_eq!(in_ms[0].unit, "s");
    // Exactly the threshold is not above it, in either unit.
    let mut exact = engine_with_limit(
        &P99_RULE
            .replace("p99", "value")
            .replace("http.server.request.duration", "op.duration"),
        10,
    );
    assert!(send(&mut exact, &gauge("op.duration", "s", 0, 0.2)).is_empty());
    let mut exact_ms = engine_with_limit(
        &P99_RULE
            .replace("p99", "value")
            .replace("http.server.request.duration", "op.duration")
            .replace("2s", "0s"),
        10,
    );
    assert!(send(&mut exact_ms, &gauge("op.duration", "ms", 0, 200.0)).is_empty());
    assert_eq!(
        send(&mut exact_ms, &gauge("op.duration", "ms", 500, 200.001)).len(),
        1
    );

    let mut fire = |metric, unit, ms, value| send(&mut engine, &gauge(metric, unit, ms, value));
    assert!(fire("heap.size", "By", 0, 3_145_728.0).is_empty());
    let bytes = fire("heap.size", "By", 500, 3_145_729.0);
    assert_eq!(
        (bytes[0].value, bytes[0].unit.as_str()),
        (Some(3_145_729.0), "By")
    );
    let bare = fire("wait.time", "ms", 0, 300.0);
    assert_eq!(
        (bare[0].value, bare[0].threshold),
        (Some(300.0), Some(250.0))
    );
    assert_eq!(bare[0].unit, "ms");
}

#[test]
fn a_threshold_of_another_dimension_or_a_statistic_the_point_lacks_is_counted() {
    let mut engine = engine(
        r#"
        [[trigger]]
        name = "duration"
        metric = "heap.size"
        statistic = "value"
        above = "200ms"

        [[trigger]]
        name = "p99-of-gauge"
        metric = "heap.size"
        statistic = "p99"
        above = 10
        "#,
    );
    assert!(send(&mut engine, &gauge("heap.size", "By", 0, 1e9)).is_empty());
    let status = engine.status();
    assert_eq!(status[0].counters.unit_mismatches, 1);
    assert_eq!(status[1].counters.unsupported_points, 1);
}

#[test]
fn rates_are_per_second_over_the_interval() {
    let mut engine = engine(
        r#"
        [[trigger]]
        name = "network"
        metric = "network.io"
        statistic = "rate"
        above = "1MiB"

        [[trigger]]
        name = "throughput"
        metric = "http.server.request.duration"
        statistic = "rate"
        below = 10
        "#,
    );
    let bytes = |ms, value| Point {
        start_time_unix_nano: unix_nanos(0),
        value: PointValue::Sum {
            value,
            monotonic: true,
            temporality: Temporality::Cumulative,
        },
        ..gauge("network.io", "By", ms, 0.0)
    };
    assert!(send(&mut engine, &bytes(1000, 0.0)).is_empty());
    let firings = send(&mut engine, &bytes(3000, 4.0 * 1048576.0));
    assert_eq!(
        (firings[0].value, firings[0].unit.as_str()),
        (Some(2.0 * 1048576.0), "By/s")
    );

    // A histogram's rate counts completions, whatever it measures.
    let mut app = Latencies::new();
    send(&mut engine, &app.busy().point(0));
    assert!(send(&mut engine, &app.busy().point(500)).is_empty());
    let firings = send(&mut engine, &app.record(0.02, 4).point(1000));
    assert_eq!(firings[0].rule, "throughput");
    assert_eq!(
        (firings[0].value, firings[0].unit.as_str()),
        (Some(8.0), "1/s")
    );
}

const SILENCE_RULE: &str = r#"
    [[trigger]]
    name = "silent"
    silence = "3s"
    resource = { "service.name" = "feed" }
"#;

#[test]
fn a_series_that_stops_reporting_fires_once_silent_for_longer_than_silence() {
    let mut engine = engine(SILENCE_RULE);
    send(&mut engine, &gauge("queue.depth", "1", 0, 1.0));
    send(&mut engine, &gauge("queue.depth", "1", 500, 1.0));
    assert!(engine.tick(at(3500)).is_empty(), "silent for exactly 3 s");
    let firings = engine.tick(at(3501));
    assert_eq!(firings.len(), 1);
    let firing = &firings[0];
    assert_eq!(firing.cause, Cause::Silence);
    assert_eq!(firing.breach_start, at(500));
    assert_close(firing.value, 3.001);
    assert_eq!((firing.threshold, firing.unit.as_str()), (Some(3.0), "s"));
    assert_eq!(firing.target_pid, Some(4242));
    assert!(engine.tick(at(4000)).is_empty(), "one firing per silence");
    // It reports again, then goes quiet again within the cooldown.
    send(&mut engine, &gauge("queue.depth", "1", 5000, 1.0));
    assert!(!engine.status()[0].in_breach);
    assert!(engine.tick(at(9000)).is_empty());
    assert!(engine.tick(at(9500)).is_empty());
    assert_eq!(engine.status()[0].counters.suppressed_cooldown, 1);
}

#[test]
fn silence_needs_a_series_that_was_reporting_and_matches() {
    let mut engine = engine(SILENCE_RULE);
    send(&mut engine, &gauge("once", "1", 0, 1.0));
    let mut elsewhere = gauge("queue.depth", "1", 0, 1.0);
    elsewhere
        .series
        .resource
        .insert("service.name".to_string(), "other".to_string());
    send(&mut engine, &elsewhere);
    elsewhere.time_unix_nano = unix_nanos(500);
    send(&mut engine, &elsewhere);
    assert!(engine.tick(at(60_000)).is_empty());
    assert_eq!(engine.counters().points_unmatched, 2);
}

#[test]
fn ticks_between_points_matter_only_while_a_silence_rule_watches_a_live_series() {
    let mut silence = engine(SILENCE_RULE);
    assert!(!silence.judges_silence(), "no series yet");
    send(&mut silence, &gauge("queue.depth", "1", 0, 1.0));
    assert!(
        !silence.judges_silence(),
        "one point is not a source that reports"
    );
    send(&mut silence, &gauge("queue.depth", "1", 500, 1.0));
    assert!(silence.judges_silence());

    let mut thresholds = engine(
        r#"
        [[trigger]]
        name = "depth"
        metric = "queue.depth"
        statistic = "value"
        above = 10
        "#,
    );
    for ms in [0, 500, 1000] {
        send(&mut thresholds, &gauge("queue.depth", "1", ms, 1.0));
    }
    assert!(
        !thresholds.judges_silence(),
        "a threshold is judged on points"
    );
}

#[test]
fn probes_breach_on_latency_or_failure_from_when_the_slow_probe_was_sent() {
    let mut engine = engine(
        r#"
        [[trigger]]
        name = "health"
        probe = "http://127.0.0.1:8080/health"
        interval = "500ms"
        above = "200ms"
        for = "1s"
        "#,
    );
    let mut probe = |ms, outcome| {
        engine.probe_result("health", at(ms), outcome).unwrap();
        engine.tick(at(ms))
    };
    assert!(probe(0, Ok(Duration::from_millis(50))).is_empty());
    assert!(probe(500, Ok(Duration::from_millis(300))).is_empty());
    assert!(
        probe(1000, Ok(Duration::from_millis(200))).is_empty(),
        "200 ms is not above"
    );
    // Unanswered from 1500 to 1900, then refused at 2500: held 1 s.
    assert!(probe(1500, Ok(Duration::from_millis(400))).is_empty());
    let firings = probe(2500, Err("connection refused".to_string()));
    assert_eq!(firings.len(), 1);
    let firing = &firings[0];
    assert_eq!(
        firing.cause,
        Cause::ProbeFailed {
            error: "connection refused".to_string()
        }
    );
    assert_eq!((firing.value, firing.threshold), (None, Some(0.2)));
    assert_eq!(firing.breach_start, at(1500));
    assert_eq!((firing.series.as_ref(), firing.target_pid), (None, None));
}

#[test]
fn one_probe_unanswered_for_longer_than_for_is_a_breach_that_held() {
    let mut engine = engine(
        r#"
        [[trigger]]
        name = "health"
        probe = "tcp://127.0.0.1:5432"
        above = "200ms"
        for = "2s"
        "#,
    );
    engine
        .probe_result("health", at(0), Ok(Duration::from_millis(1999)))
        .unwrap();
    assert!(engine.tick(at(1999)).is_empty());
    engine
        .probe_result("health", at(1000), Ok(Duration::from_millis(2000)))
        .unwrap();
    let firings = engine.tick(at(3000));
    assert_eq!(firings[0].breach_start, at(0));
    assert_close(firings[0].value, 2.0);
}

#[test]
fn probe_results_must_name_a_probe_rule() {
    let mut engine = engine(SILENCE_RULE);
    for name in ["nope", "silent"] {
        assert_eq!(
            engine.probe_result(name, at(0), Ok(Duration::ZERO)),
            Err(RuleError::NoSuchProbe {
                rule: name.to_string()
            })
        );
    }
}

#[test]
fn new_series_beyond_the_limit_are_refused_and_counted() {
    let mut engine = engine_with_limit(SILENCE_RULE, 2);
    for metric in ["a", "b", "c", "d"] {
        send(&mut engine, &gauge(metric, "1", 0, 1.0));
    }
    // Known series still get through.
    send(&mut engine, &gauge("a", "1", 500, 1.0));
    let counters = engine.counters();
    assert_eq!((counters.series, counters.series_refused), (2, 2));
}

#[test]
fn long_gone_series_are_forgotten() {
    let mut engine = engine(&P99_RULE.replace("2s", "0s"));
    send(&mut engine, &Latencies::new().busy().point(0));
    engine.tick(at(15 * 60 * 1000));
    assert_eq!(engine.counters().series, 1);
    engine.tick(at(15 * 60 * 1000 + 1));
    let counters = engine.counters();
    assert_eq!((counters.series, counters.series_expired), (0, 1));
}

#[test]
fn the_status_shows_the_value_closest_to_firing() {
    let mut engine = engine(
        r#"
        [[trigger]]
        name = "low"
        metric = "free.memory"
        statistic = "value"
        below = "100MiB"
        for = "1s"

        [[trigger]]
        name = "high"
        metric = "free.memory"
        statistic = "value"
        above = "1GiB"
        "#,
    );
    let mut host_a = gauge("free.memory", "MiBy", 0, 50.0);
    host_a
        .series
        .attributes
        .insert("host".to_string(), "a".to_string());
    let mut host_b = gauge("free.memory", "MiBy", 0, 500.0);
    host_b
        .series
        .attributes
        .insert("host".to_string(), "b".to_string());
    send(&mut engine, &host_a);
    send(&mut engine, &host_b);
    let status = engine.status();
    assert_eq!(status[0].value, Some(50.0 * 1048576.0));
    assert!(status[0].in_breach && !status[0].firing);
    assert_eq!(status[1].value, Some(500.0 * 1048576.0));
    assert!(!status[1].in_breach);
}
