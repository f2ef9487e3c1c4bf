"""What operators deploy next to freezeframe, checked with the real tools
that run here: the sidecar's /metrics and probes, Debian's Prometheus
scraping it and loading the alert rules, promtool on the rules and on every
dashboard's PromQL, kubernetes-validate on the manifests, and the
capability list of the pod spec tried on a real capture.

A missing tool is a failure, never a skip."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import BINARY, LATENCY_RULE, ROOT, SILENCE_RULE, free_port

PROMETHEUS_DIR = ROOT / "deploy/prometheus"
ALERTS = PROMETHEUS_DIR / "freezeframe-alerts.yml"
KUBERNETES_DIR = ROOT / "deploy/kubernetes"
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
OPERATIONS_DOC = ROOT / "docs/operations.md"

RULES = LATENCY_RULE + SILENCE_RULE
RULE_NAMES = ["feed-latency", "feed-silent"]
CAPTURE_OUTCOMES = ["captured", "coalesced", "no_target", "failed"]
BPF_MAPS = ["threads", "blocked", "stacks_kernel", "stacks_user", "stacks", "lock_holds", "address_changes",
            "stack_copies"]

# Every metric a freshly started sidecar must serve, with its type.
EXPECTED_TYPES = {
    "freezeframe_build_info": "gauge",
    "freezeframe_ingest_points_total": "counter",
    "freezeframe_ingest_requests_total": "counter",
    "freezeframe_ingest_spans_dropped_total": "counter",
    "freezeframe_series": "gauge",
    "freezeframe_series_refused_total": "counter",
    "freezeframe_trigger_value": "gauge",
    "freezeframe_trigger_threshold": "gauge",
    "freezeframe_trigger_firing": "gauge",
    "freezeframe_trigger_fired_total": "counter",
    "freezeframe_trigger_suppressed_total": "counter",
    "freezeframe_trigger_points_skipped_total": "counter",
    "freezeframe_captures_total": "counter",
    "freezeframe_capture_duration_seconds": "histogram",
    "freezeframe_capture_samples": "histogram",
    "freezeframe_capture_start_timestamp_seconds": "gauge",
    "freezeframe_capture_blocked_seconds_total": "counter",
    "freezeframe_bpf_drops_total": "counter",
    "freezeframe_unwind_table_bytes": "gauge",
    "freezeframe_symbolize_frames_total": "counter",
    "freezeframe_capture_linked_requests": "histogram",
    "freezeframe_export_total": "counter",
    "freezeframe_spool_bytes": "gauge",
    "freezeframe_spool_files": "gauge",
    "freezeframe_unwind_table_bytes": "gauge",
    "freezeframe_forward_total": "counter",
    "freezeframe_forward_queue_bytes": "gauge",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: scripts/prerequisites.sh installs it (Debian package prometheus)"
    return path


def run(command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def http_get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read().decode()


class Exposition:
    """The Prometheus text format, parsed: HELP and TYPE per family, and
    every sample as (name, frozenset of labels) -> value."""

    SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
    LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

    def __init__(self, text: str):
        self.help, self.types, self.samples = {}, {}, {}
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("# HELP "):
                name, _, description = line[len("# HELP "):].partition(" ")
                self.help[name] = description
            elif line.startswith("# TYPE "):
                name, _, kind = line[len("# TYPE "):].partition(" ")
                self.types[name] = kind
            else:
                match = self.SAMPLE.match(line)
                assert match, f"not an exposition line: {line!r}"
                name, labels, value = match.groups()
                key = (name, frozenset(self.LABEL.findall(labels or "")))
                self.samples[key] = float(value)

    def names(self) -> set:
        return {name for name, _ in self.samples}

    def series(self, name: str) -> dict:
        return {labels: value for (sample, labels), value in self.samples.items() if sample == name}

    def value(self, name: str, **labels) -> float:
        return self.samples[(name, frozenset(labels.items()))]


def scrape(sidecar) -> Exposition:
    status, content_type, body = http_get(f"http://127.0.0.1:{sidecar.telemetry}/metrics")
    assert status == 200, body
    assert content_type.startswith("text/plain"), content_type
    return Exposition(body)


@pytest.fixture
def fresh_sidecar(sidecar_factory):
    # With an exporter and forwarding configured (at ports nobody listens
    # on: nothing is sent before a capture or a request), so that their
    # series are served as well.
    sidecar = sidecar_factory(
        RULES,
        export=f'otlp_endpoint = "http://127.0.0.1:{free_port()}"',
        forward=f'endpoint = "http://127.0.0.1:{free_port()}"',
    )
    sidecar.wait_listening(sidecar.telemetry)
    return sidecar


def test_every_metric_is_served_from_startup_with_help_and_type(fresh_sidecar):
    page = scrape(fresh_sidecar)
    for name, kind in EXPECTED_TYPES.items():
        assert page.types.get(name) == kind, f"{name}: TYPE {page.types.get(name)}, expected {kind}"
        assert len(page.help.get(name, "")) > 20, f"{name} has no HELP text worth the name"
    unexpected = {name for name in page.types if name.startswith("freezeframe_")} - set(EXPECTED_TYPES)
    assert not unexpected, f"metrics this test does not know of (add them here and to docs): {unexpected}"

    for rule in RULE_NAMES:
        for outcome in CAPTURE_OUTCOMES:
            assert page.value("freezeframe_captures_total", rule=rule, outcome=outcome) == 0
        assert page.value("freezeframe_trigger_firing", rule=rule) == 0
        assert page.value("freezeframe_trigger_fired_total", rule=rule) == 0
        for reason in ("cooldown", "max_per_hour"):
            assert page.value("freezeframe_trigger_suppressed_total", rule=rule, reason=reason) == 0
        for reason in ("unit_mismatch", "unsupported"):
            assert page.value("freezeframe_trigger_points_skipped_total", rule=rule, reason=reason) == 0
        # No value yet is not a value of 0.
        assert math.isnan(page.value("freezeframe_trigger_value", rule=rule))
    # Thresholds in the unit of the value: seconds for both rules.
    assert page.value("freezeframe_trigger_threshold", rule="feed-latency") == pytest.approx(0.2)
    assert page.value("freezeframe_trigger_threshold", rule="feed-silent") == pytest.approx(2.0)
    for bpf_map in BPF_MAPS:
        assert page.value("freezeframe_bpf_drops_total", map=bpf_map) == 0
    for signal_name in ("metrics", "traces"):
        for outcome in ("accepted", "rejected", "refused"):
            assert page.value("freezeframe_ingest_points_total", signal=signal_name, outcome=outcome) == 0
    for kind in ("kernel", "user"):
        for outcome in ("resolved", "unknown"):
            assert page.value("freezeframe_symbolize_frames_total", kind=kind, outcome=outcome) == 0
    # Histograms, not summaries, with their buckets there and empty.
    assert page.value("freezeframe_capture_duration_seconds_bucket", le="+Inf") == 0
    assert page.value("freezeframe_capture_samples_bucket", le="+Inf") == 0
    assert not any(dict(labels).get("quantile") for _, labels in page.samples)
    assert page.value("freezeframe_build_info", version="0.1.0") == 1


def test_healthz_and_readyz_answer(fresh_sidecar):
    assert http_get(f"http://127.0.0.1:{fresh_sidecar.telemetry}/healthz")[0] == 200
    deadline = time.monotonic() + 10
    while http_get(f"http://127.0.0.1:{fresh_sidecar.telemetry}/readyz")[0] != 200:
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.1)


def test_traffic_and_a_capture_bring_up_no_series_that_startup_lacked(sidecar_factory, app_factory):
    """What a drift between a stage's metric names and the ones registered
    at start-up would look like: a series that appears only later."""
    sidecar = sidecar_factory(RULES)
    sidecar.wait_listening(sidecar.telemetry)
    at_startup = scrape(sidecar)
    app = app_factory("grpc", sidecar.grpc)
    time.sleep(3)
    app.freeze(4)
    sidecar.wait_for_event(lambda e: e["rule"] == "feed-latency" and e["outcome"] == "captured", timeout=30)
    time.sleep(1)  # the trigger loop publishes rule status at each tick, a second apart at most
    later = scrape(sidecar)

    new = {key for key in later.samples if key[0].startswith("freezeframe_")} - set(at_startup.samples)
    assert not new, f"series missing at start-up: {sorted(new, key=str)}"
    # And the series did move.
    assert later.value("freezeframe_captures_total", rule="feed-latency", outcome="captured") == 1
    assert later.value("freezeframe_trigger_fired_total", rule="feed-latency") >= 1
    assert later.value("freezeframe_capture_duration_seconds_count") == 1
    assert later.value("freezeframe_capture_blocked_seconds_total") >= 3, "4 threads blocked for most of 4 s"
    assert later.value("freezeframe_symbolize_frames_total", kind="kernel", outcome="resolved") > 0
    assert later.value("freezeframe_ingest_points_total", signal="metrics", outcome="accepted") > 0
    assert later.value("freezeframe_ingest_requests_total", transport="grpc", outcome="accepted") > 0
    assert not math.isnan(later.value("freezeframe_trigger_value", rule="feed-latency"))


class Prometheus:
    """Debian's Prometheus server on loopback, with a throwaway TSDB."""

    def __init__(self, directory: Path, scrape_target: str, rule_files):
        self.port = free_port()
        self.config = directory / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{"job_name": "freezeframe", "static_configs": [{"targets": [scrape_target]}]}],
        }))
        self.log = open(directory / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={self.config}", f"--storage.tsdb.path={directory / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, _, body = http_get(url)
        assert status == 200, body
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return answer["data"]

    def wait_for(self, what: str, check, timeout: float = 30):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited: {Path(self.log.name).read_text()}"
            try:
                last = check()
                if last:
                    return last
            except (OSError, AssertionError) as err:
                last = err
            time.sleep(0.5)
        raise AssertionError(f"{what} within {timeout}s; last: {last}\n{Path(self.log.name).read_text()[-3000:]}")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def test_logs_carry_no_escape_codes_off_a_terminal_and_json_logs_parse(sidecar_factory):
    text = sidecar_factory(RULES)
    text.wait_listening(text.telemetry)
    assert "freezeframe is running" in text.log_text()
    assert "\x1b" not in text.log_text(), "colour codes in a log written to a file"

    logged = sidecar_factory(RULES, env={"FREEZEFRAME_LOG_FORMAT": "json"})
    logged.wait_listening(logged.telemetry)
    lines = [line for line in logged.log_text().splitlines() if line.strip()]
    # libbpf's own warnings are written as they come, outside the log.
    events = [json.loads(line) for line in lines if not line.startswith("libbpf: ")]
    assert events, logged.log_text()
    for event in events:
        assert event["level"] in ("TRACE", "DEBUG", "INFO", "WARN", "ERROR"), event
        assert "timestamp" in event and "message" in event["fields"], event
    running = [event for event in events if event["fields"]["message"] == "freezeframe is running"]
    assert running and running[0]["fields"]["grpc"] == f"127.0.0.1:{logged.grpc}", events


def test_prometheus_scrapes_the_sidecar_and_evaluates_the_alerts_on_it(fresh_sidecar, tmp_path):
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{fresh_sidecar.telemetry}", [ALERTS])
    try:
        def scraped():
            result = prometheus.api("query", query='freezeframe_captures_total{job="freezeframe"}')["result"]
            return result if len(result) == len(RULE_NAMES) * len(CAPTURE_OUTCOMES) else None

        series = prometheus.wait_for("a scrape with every captures_total series", scraped)
        assert {s["metric"]["rule"] for s in series} == set(RULE_NAMES)
        assert all(s["value"][1] == "0" for s in series)

        up = prometheus.api("query", query='up{job="freezeframe"}')["result"]
        assert [s["value"][1] for s in up] == ["1"]
        # Through PromQL too, a rule without data is NaN, not 0.
        values = prometheus.api("query", query="freezeframe_trigger_value")["result"]
        assert sorted(s["value"][1] for s in values) == ["NaN", "NaN"]

        # The alert rules load and evaluate against the live series: the
        # NaN values put FreezeframeRuleHasNoData into pending for both rules.
        def evaluated():
            groups = prometheus.api("rules")["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            return rules if rules and all(rule.get("lastEvaluation", "").startswith("2") and
                                          not rule["lastEvaluation"].startswith("0001") for rule in rules) else None

        rules = prometheus.wait_for("every alert rule evaluated", evaluated)
        assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
        assert len(rules) == len(yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"])

        def pending():
            alerts = prometheus.api("alerts")["alerts"]
            no_data = [a for a in alerts if a["labels"]["alertname"] == "FreezeframeRuleHasNoData"]
            return no_data if len(no_data) == len(RULE_NAMES) else None

        pending_alerts = prometheus.wait_for("FreezeframeRuleHasNoData pending", pending)
        assert {a["state"] for a in pending_alerts} == {"pending"}
        firing = [a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"]
        assert not firing, f"a fresh, healthy sidecar must raise nothing: {firing}"
    finally:
        prometheus.stop()


def test_promtool_checks_and_unit_tests_the_alert_rules():
    promtool = tool("promtool")
    run([promtool, "check", "rules", ALERTS])
    tests = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
    assert tests
    result = run([promtool, "test", "rules", *tests], cwd=PROMETHEUS_DIR / "tests")
    assert "SUCCESS" in result.stdout

    # Every alert has a test in which it fires.
    alerts = {rule["alert"] for rule in yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]}
    tested = set()
    for test_file in tests:
        for case in yaml.safe_load(test_file.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    tested.add(check["alertname"])
    assert alerts == tested, f"alerts without a firing test: {alerts - tested}"

    # Every alert tells where its runbook is, and that section exists.
    doc = OPERATIONS_DOC.read_text()
    for rule in yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]:
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), rule["alert"]
        assert annotations["runbook_url"] == f"docs/operations.md#{rule['alert'].lower()}"
        assert re.search(rf"^#+ {rule['alert']}$", doc, re.MULTILINE), f"no runbook section {rule['alert']}"


def test_promtool_checks_the_scrape_configs(tmp_path):
    promtool = tool("promtool")
    run([promtool, "check", "config", PROMETHEUS_DIR / "scrape-config.yml"])
    # Debian's Prometheus has no Kubernetes discovery: check the job with a
    # static target in its place, relabelling and all.
    config = yaml.safe_load((PROMETHEUS_DIR / "scrape-config-kubernetes.yml").read_text())
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
        job["static_configs"] = [{"targets": ["127.0.0.1:9464"]}]
    swapped = tmp_path / "scrape-config-kubernetes.yml"
    swapped.write_text(yaml.safe_dump(config))
    run([promtool, "check", "config", swapped])
    relabelled = {r.get("target_label"): r.get("replacement") for r in config["scrape_configs"][0]["relabel_configs"]}
    assert relabelled["job"] == "freezeframe", "the alerts select job=\"freezeframe\""


def dashboard_exprs(board: dict) -> list:
    """Every PromQL expression of a board: panel targets, annotations and
    variable queries, with Grafana's variables replaced by what they stand
    for at query time."""
    exprs = []

    def visit_panel(panel):
        for target in panel.get("targets", []):
            if target.get("datasource", panel.get("datasource", {})).get("type") == "prometheus":
                exprs.append((panel["title"], target["expr"]))
        for inner in panel.get("panels", []):
            visit_panel(inner)

    for panel in board["panels"]:
        visit_panel(panel)
    for annotation in board["annotations"]["list"]:
        if annotation.get("datasource", {}).get("type") == "prometheus":
            exprs.append((annotation["name"], annotation["expr"]))
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*), *[a-z_]+\)", variable["query"]["query"])
            assert match, variable
            exprs.append((variable["name"], match.group(1)))
    substituted = []
    for where, expr in exprs:
        for variable, value in [("$__rate_interval", "1m"), ("$__interval", "1m"), ("$__range", "6h"),
                                ("$instance", ".*"), ("$rule", ".*")]:
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{where}: unsubstituted variable in {expr}"
        substituted.append((where, expr))
    return substituted


def test_every_dashboard_expression_parses_with_promtool(tmp_path):
    promtool = tool("promtool")
    assert len(DASHBOARDS) == 2
    rules = []
    for board_file in DASHBOARDS:
        for where, expr in dashboard_exprs(json.loads(board_file.read_text())):
            rules.append({"record": f"dashboard:{board_file.stem.replace('-', '_')}:{len(rules)}", "expr": expr})
    assert len(rules) > 20
    as_rules = tmp_path / "dashboards.rules.yml"
    as_rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = run([promtool, "check", "rules", as_rules])
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_dashboards_are_importable_with_no_fixed_datasource():
    for board_file in DASHBOARDS:
        board = json.loads(board_file.read_text())
        assert board["uid"] is None and board["id"] is None, board_file
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        text = board_file.read_text()
        # Every datasource reference is a variable.
        for uid in re.findall(r'"uid": "([^"]*)"', text):
            assert uid.startswith("${") or uid == "-- Grafana --", f"{board_file.name}: fixed uid {uid}"
        ids = []

        def collect(panels):
            for panel in panels:
                ids.append(panel["id"])
                assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
                collect(panel.get("panels", []))

        collect(board["panels"])
        assert len(ids) == len(set(ids)), f"{board_file.name}: duplicate panel ids"
    freezes = json.loads((ROOT / "dashboards/freezes.json").read_text())
    annotations = {a["name"]: a for a in freezes["annotations"]["list"]}
    assert {"Captures", "Rule firing"} <= set(annotations)
    # A capture is marked where Pyroscope files its profile: at its start.
    captures = annotations["Captures"]
    assert captures["useValueForTime"] and "1000 * freezeframe_capture_start_timestamp_seconds" in captures["expr"]
    explore = [link["url"] for panel in freezes["panels"] for link in panel.get("links", []) if "grafana-pyroscope-app" in link["url"]]
    assert explore, "a link to Explore Profiles"
    for url in explore:
        for part in ("explorationType=flame-graph", "var-serviceName=${service", "var-profileMetricId=off_cpu:off_cpu:nanoseconds::",
                     "from=${__from}", "to=${__to}"):
            assert part in url, (part, url)
    links = json.dumps(freezes)
    assert "off_cpu:off_cpu:nanoseconds::" in links, "the Pyroscope links ask for the off_cpu profile"
    assert "tempo" in links and "/explore?" in links


def test_metric_names_in_dashboards_alerts_and_docs_exist_on_a_fresh_sidecar(fresh_sidecar):
    page = scrape(fresh_sidecar)
    # Sample names, and the family names histograms' samples derive from.
    served = page.names() | set(page.types)
    sources = {path: path.read_text() for path in [*DASHBOARDS, ALERTS, KUBERNETES_DIR / "prometheusrule.yaml",
                                                   OPERATIONS_DOC]}
    for path, text in sources.items():
        names = set(re.findall(r"\bfreezeframe_[a-z0-9_]*[a-z0-9]", text))
        assert names, path
        missing = names - served
        assert not missing, f"{path.relative_to(ROOT)} uses metrics a fresh sidecar does not serve: {missing}"
    # The docs describe every metric there is.
    documented = set(re.findall(r"\bfreezeframe_[a-z0-9_]*[a-z0-9]", OPERATIONS_DOC.read_text()))
    assert set(EXPECTED_TYPES) <= documented, f"undocumented: {set(EXPECTED_TYPES) - documented}"


def manifests(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_kubernetes_manifests_validate(tmp_path):
    validator = Path(sys.executable).with_name("kubernetes-validate")
    assert validator.exists(), f"{validator} is missing: tests/e2e/requirements.txt installs kubernetes-validate"
    files = sorted(path.relative_to(ROOT) for path in KUBERNETES_DIR.glob("*.yaml"))
    result = subprocess.run([validator, "--strict", *files], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    passed = {line.split()[1] for line in lines if line.startswith("INFO") and " passed " in line}
    unchecked = {line.split()[1] for line in lines if line.startswith("WARN")}
    # Core objects against the schema, strictly. Only the operator's CRDs
    # and kustomize's own file have none here; the next test checks them.
    core = {str(f) for f in files if manifests(ROOT / f)[0]["apiVersion"] in ("v1", "apps/v1")}
    assert len(core) == 2 and passed == core, result.stdout
    assert unchecked == {str(f) for f in files} - core, result.stdout

    # Strict mode bites: a misspelt field fails.
    broken = tmp_path / "deployment.yaml"
    broken.write_text((KUBERNETES_DIR / "deployment.yaml").read_text().replace("readOnlyRootFilesystem", "readOnlyRootFileSystem"))
    assert subprocess.run([validator, "--strict", broken], capture_output=True, text=True).returncode != 0


def sidecar_container(deployment: dict) -> dict:
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    return containers["freezeframe"]


def test_kubernetes_objects_fit_together(tmp_path):
    deployment = manifests(KUBERNETES_DIR / "deployment.yaml")[0]
    pod = deployment["spec"]["template"]["spec"]
    sidecar = sidecar_container(deployment)
    assert pod["shareProcessNamespace"] is True
    assert not pod.get("hostPID")
    security = sidecar["securityContext"]
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "SYS_ADMIN" not in security["capabilities"]["add"]
    # The shared probe: freezeframe's own bpffs directory, at the default
    # shared_probe_dir, and nothing more of the node's bpffs.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert volumes["shared-probe"]["hostPath"] == {"path": "/sys/fs/bpf/freezeframe", "type": "DirectoryOrCreate"}
    assert mounts["shared-probe"]["mountPath"] == "/sys/fs/bpf/freezeframe"
    assert [v for v in pod["volumes"] if "hostPath" in v] == [volumes["shared-probe"]]
    assert sidecar["resources"]["requests"] and sidecar["resources"]["limits"]
    env = {e["name"]: e for e in sidecar["env"]}
    assert env["K8S_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert "k8s.pod.name=$(K8S_POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"]["value"]

    # The ConfigMap's config is one freezeframe accepts, telemetry reachable
    # on the pod IP at the port the probes and the PodMonitor use.
    configmap = manifests(KUBERNETES_DIR / "configmap.yaml")[0]
    assert pod["volumes"][0]["configMap"]["name"] == configmap["metadata"]["name"]
    config_text = configmap["data"]["freezeframe.toml"]
    config_file = tmp_path / "freezeframe.toml"
    config_file.write_text(config_text)
    checked = run([BINARY, "check-config", config_file])
    assert "feed-db-latency" in checked.stdout
    listen = tomllib.loads(config_text)["telemetry"]["listen"]
    host, _, port = listen.rpartition(":")
    assert host in ("0.0.0.0", "[::]"), "the kubelet probes the pod IP, not the container's loopback"
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports["ff-telemetry"] == int(port)
    for probe, path in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/readyz")]:
        assert sidecar[probe]["httpGet"] == {"path": path, "port": "ff-telemetry"}, probe
    # The app's telemetry goes on to the gateway that takes the profiles:
    # deploying the manifest loses none of it.
    forward = tomllib.loads(config_text)["forward"]
    assert forward["endpoint"].rsplit(":", 1)[0] == env["OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT"]["value"].rsplit(":", 1)[0]
    assert f"forward:  metrics, traces and logs over {forward['protocol']} to {forward['endpoint']}," in checked.stdout
    app = next(c for c in pod["containers"] if c["name"] == "app")
    app_endpoint = {e["name"]: e.get("value") for e in app["env"]}["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert app_endpoint.endswith(":" + tomllib.loads(config_text)["receiver"]["grpc"].rsplit(":", 1)[1])
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    assert mounts["/var/lib/freezeframe"]["name"] == "captures", "captures need a writable place"
    assert tomllib.loads(config_text)["export"]["directory"] == "/var/lib/freezeframe"

    podmonitor = manifests(KUBERNETES_DIR / "podmonitor.yaml")[0]
    assert podmonitor["kind"] == "PodMonitor"
    selector = podmonitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    endpoint = podmonitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "ff-telemetry" and endpoint["path"] == "/metrics"
    assert {"action": "replace", "targetLabel": "job", "replacement": "freezeframe"} in endpoint["relabelings"]

    rule = manifests(KUBERNETES_DIR / "prometheusrule.yaml")[0]
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text()), "prometheusrule.yaml and freezeframe-alerts.yml differ"

    kustomization = manifests(KUBERNETES_DIR / "kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    present = {f.name for f in KUBERNETES_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert sidecar["image"] in {image["name"] for image in kustomization["images"]}


def capture_folded(binary, pid: int, capabilities: list, tmp_path: Path) -> str:
    """`freezeframe capture` as uid 0 holding exactly `capabilities`, with a
    memlock limit too small for any BPF map: what the pod spec grants."""
    folded = tmp_path / "stacks.folded"
    folded.unlink(missing_ok=True)
    bounding = "-all," + ",".join(f"+{cap.lower()}" for cap in capabilities)
    run(["prlimit", "--memlock=65536:65536", "setpriv", f"--bounding-set={bounding}", "--inh-caps=-all",
         binary, "capture", "--pid", pid, "--duration", "1s", "--folded", folded], timeout=60)
    return folded.read_text()


def test_the_pod_spec_capabilities_are_enough_and_each_one_counts(tmp_path):
    """The sidecar's capability list, tried: with exactly those, a capture of
    another user's process names its kernel and its user frames; without
    SYSLOG the kernel frames, and without CHECKPOINT_RESTORE or
    DAC_READ_SEARCH the user frames, stay [unknown]."""
    capabilities = sidecar_container(manifests(KUBERNETES_DIR / "deployment.yaml")[0])["securityContext"]["capabilities"]["add"]
    assert sorted(capabilities) == sorted(["BPF", "PERFMON", "SYS_PTRACE", "SYSLOG", "CHECKPOINT_RESTORE", "DAC_READ_SEARCH"])
    sleep = tool("sleep")
    tool("setpriv")
    tool("prlimit")
    # Another user, as the app container is.
    target = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sleep, "60"])
    try:
        time.sleep(0.3)
        stacks = capture_folded(BINARY, target.pid, capabilities, tmp_path)
        assert "hrtimer_nanosleep" in stacks, f"kernel frames named: {stacks}"
        assert re.search(r";[_a-zA-Z]*clock_nanosleep;", stacks), f"libc frame named: {stacks}"
        # Every frame is named, but those of `sleep` itself: Debian ships
        # it stripped, so nothing can name them, and the whole unwind now
        # reaches them (module and offset still say where they are).
        assert "symtab" not in subprocess.run(["readelf", "-S", sleep], capture_output=True, text=True).stdout
        unnamed = set(re.findall(r"\[unknown\] ([^;]*?)\+0x", stacks))
        assert unnamed <= {os.path.basename(sleep)}, stacks
        assert "[unknown] 0x" not in stacks, stacks

        without_syslog = capture_folded(BINARY, target.pid, [c for c in capabilities if c != "SYSLOG"], tmp_path)
        assert "hrtimer_nanosleep" not in without_syslog and "[unknown] 0xffff" in without_syslog, without_syslog
        for needed in ("CHECKPOINT_RESTORE", "DAC_READ_SEARCH"):
            stacks = capture_folded(BINARY, target.pid, [c for c in capabilities if c != needed], tmp_path)
            assert "[unknown] libc.so.6+" in stacks, f"without {needed}: {stacks}"
    finally:
        target.kill()
        target.wait()


def test_btf_is_in_a_fresh_sysfs_as_a_container_gets_it(tmp_path):
    """What runc mounts for a pod in its own network namespace: the
    deployment relies on /sys/kernel/btf/vmlinux being there unmounted."""
    mountpoint = tmp_path / "sys"
    mountpoint.mkdir()
    result = run(["unshare", "--net", "--mount", "--fork", "sh", "-c",
                  f"mount -t sysfs -o ro,nosuid,nodev,noexec sysfs {mountpoint} && test -r {mountpoint}/kernel/btf/vmlinux && echo present"])
    assert result.stdout.strip() == "present"


def owning_package(path: str) -> str:
    """The Debian package that ships a file, under either of the names
    merged /usr gives it (dpkg knows only the one the package lists)."""
    other = path[len("/usr"):] if path.startswith("/usr/") else "/usr" + path
    for candidate in (path, other):
        result = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        if result.returncode == 0:
            return result.stdout.split(":")[0]
    raise AssertionError(f"no Debian package ships {path}")


def test_the_dockerfile_installs_what_the_binary_links_and_the_build_needs():
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", dockerfile, flags=re.MULTILINE)[1:]
    assert len(stages) == 2, "a builder and a runtime stage"
    builder, runtime = stages
    assert " AS builder" in builder.splitlines()[0]
    assert "COPY --from=builder /out/freezeframe" in runtime

    def apt_packages(stage: str) -> set:
        joined = stage.replace("\\\n", " ")
        match = re.search(r"apt-get install[^&]*?--no-install-recommends\s+([^&]+)", joined)
        assert match, stage
        return set(match.group(1).split())

    build_needs = {"clang", "llvm", "make", "pkg-config", "libelf-dev", "zlib1g-dev", "bpftool"}
    assert build_needs <= apt_packages(builder)
    prerequisites = (ROOT / "scripts/prerequisites.sh").read_text()
    for package in build_needs:
        assert re.search(rf"\b{re.escape(package)}\b", prerequisites), package

    # Every shared library the binary loads comes from a package the
    # runtime stage installs, or from the base image's own libc6/libgcc-s1.
    linked = run(["ldd", BINARY]).stdout
    libraries = re.findall(r"=> (/\S+)", linked)
    assert libraries
    packages = {owning_package(library) for library in libraries}
    in_base_image = {"libc6", "libgcc-s1"}
    assert packages - in_base_image <= apt_packages(runtime), f"{packages} linked, runtime installs {apt_packages(runtime)}"

    # The image's Rust is new enough for us and for every crate built into
    # the Linux binary (crates of other platforms may need newer ones).
    def version(text: str) -> tuple:
        return tuple(int(part) for part in text.split(".")[:2])

    rust = version(re.search(r"ARG RUST_VERSION=(\S+)", dockerfile).group(1))
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    assert rust >= version(cargo["package"]["rust-version"])
    tree = run(["cargo", "tree", "--locked", "--target", "x86_64-unknown-linux-gnu", "-e", "normal,build",
                "--prefix", "none", "--format", "{p}"], cwd=ROOT).stdout
    # "name vX.Y.Z", less markers such as "(proc-macro)" and "(*)".
    built = {" ".join(line.split()[:2]) for line in tree.splitlines()}
    metadata = json.loads(run(["cargo", "metadata", "--locked", "--format-version", "1"], cwd=ROOT).stdout)
    too_new = [f"{package['name']} {package['version']} needs {package['rust_version']}"
               for package in metadata["packages"]
               if f"{package['name']} v{package['version']}" in built
               and package.get("rust_version") and version(package["rust_version"]) > rust]
    assert not too_new, too_new
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert "target/" in dockerignore


def test_collector_configs_are_consistent():
    """No Collector runs here: the configs are checked for what a reader
    can check (see otel/README.md), not validated by otelcol."""
    configs = {path.name: yaml.safe_load(path.read_text()) for path in (ROOT / "otel").glob("*.yaml")}
    assert set(configs) == {"collector-app-metrics.yaml", "collector-profiles.yaml"}
    for name, config in configs.items():
        for pipeline, parts in config["service"]["pipelines"].items():
            for kind in ("receivers", "processors", "exporters"):
                for component in parts.get(kind, []):
                    assert component in config.get(kind, {}), f"{name}: {pipeline} uses undefined {kind[:-1]} {component}"
    fanout = configs["collector-app-metrics.yaml"]
    pipelines = fanout["service"]["pipelines"]
    assert "otlp/freezeframe" in pipelines["metrics/freezeframe"]["exporters"]
    assert "prometheus" in pipelines["metrics/prometheus"]["exporters"]
    assert "batch" not in pipelines["metrics/freezeframe"].get("processors", []), "batching delays breaches"
    readme = (ROOT / "otel/README.md").read_text()
    freezeframe_endpoint = fanout["exporters"]["otlp/freezeframe"]["endpoint"]
    assert f"FREEZEFRAME_RECEIVER_GRPC={freezeframe_endpoint}" in readme
    profiles = configs["collector-profiles.yaml"]["service"]["pipelines"]
    assert profiles["profiles"]["exporters"] == ["otlp/pyroscope"]
    for signal in ("metrics", "traces", "logs"):
        assert profiles[signal]["receivers"] == ["otlp"], f"the gateway takes the forwarded {signal}"
    deployment = manifests(KUBERNETES_DIR / "deployment.yaml")[0]
    env = {e["name"]: e.get("value") for e in sidecar_container(deployment)["env"]}
    receiver_port = configs["collector-profiles.yaml"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rsplit(":", 1)[1]
    assert env["OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT"].endswith(f":{receiver_port}")
