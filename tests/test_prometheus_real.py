"""A real Prometheus with the README's scrape config finds every engine of a real fleet
through `GET /fleet/targets` (an engine on TCP scraped where it listens, one on a Unix
socket through the gateway's `/fleet/engines/<name>/metrics`), labels its series with the
engine's deployment, sees the token counters move with traffic through the gateway, and
has every metric the Grafana dashboard (examples/grafana/fleet.json) queries.

Needs Prometheus (`apt-get install prometheus`: /usr/bin/prometheus); skips without it,
fails with FLEET_E2E_REQUIRED=1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.conftest import fake_fleet_file, free_port, wait_until
from tests.test_fleet_up import FleetUp

PROMETHEUS = Path("/usr/bin/prometheus")
DASHBOARD = Path(__file__).parents[1] / "examples" / "grafana" / "fleet.json"

# The README's scrape config, as it is printed there (GATEWAY: the gateway's host:port).
SCRAPE_CONFIG = """\
scrape_configs:
  - job_name: vllm-fleet
    static_configs:
      - targets: ["GATEWAY"]
  - job_name: vllm-fleet-engines
    http_sd_configs:
      - url: http://GATEWAY/fleet/targets
"""

# PromQL's functions and aggregations (Prometheus 2.x and 3.x), and its keywords: every
# other name in an expression, outside label matchers and grouping lists, is a metric.
FUNCTIONS = frozenset((
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
    "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh",
    "count_over_time", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "deg",
    "delta", "deriv", "double_exponential_smoothing", "end", "exp", "floor", "histogram_avg",
    "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_stddev",
    "histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta", "increase", "info",
    "irate", "label_join", "label_replace", "last_over_time", "ln", "log10", "log2",
    "mad_over_time", "max_over_time", "min_over_time", "minute", "month", "pi",
    "predict_linear", "present_over_time", "quantile_over_time", "rad", "rate", "resets",
    "round", "scalar", "sgn", "sin", "sinh", "sort", "sort_by_label", "sort_by_label_desc",
    "sort_desc", "sqrt", "start", "stddev_over_time", "stdvar_over_time", "sum_over_time",
    "tan", "tanh", "time", "timestamp", "vector", "year"
))  # fmt: skip
AGGREGATIONS = frozenset((
    "avg", "bottomk", "count", "count_values", "group", "limit_ratio", "limitk", "max", "min",
    "quantile", "stddev", "stdvar", "sum", "topk"
))  # fmt: skip
KEYWORDS = frozenset((
    "and", "atan2", "bool", "by", "group_left", "group_right", "ignoring", "offset", "on", "or",
    "unless", "without"
))  # fmt: skip
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# Grafana's variable query: `label_values(metric, label)`, `label_values(label)`.
LABEL_VALUES = re.compile(r"^label_values\(\s*(?:([a-zA-Z_:][\w:]*)\s*,\s*)?[a-zA-Z_]\w*\s*\)$")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads. Strings, label matchers, ranges,
    numbers, durations and grouping label lists are dropped first; then a name followed by
    `(` must be a PromQL function or aggregation (else AssertionError: a typo, or a
    function this list lacks), a keyword is skipped, and any other name is a metric."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', " ", expr)
    text = re.sub(r"\$\{[^}]*\}|\$\w+", " ", text)  # Grafana variables ($__rate_interval)
    assert "{" not in re.sub(r"\{[^{}]*\}", "", text), f"unbalanced braces: {expr}"
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = GROUPING.sub(r" \1 ", text)
    text = re.sub(r"(?<![\w:])(?:\d[\w.]*|\.\d[\w.]*)", " ", text)
    names = set()
    for match in NAME.finditer(text):
        token, rest = match.group(), text[match.end() :].lstrip()
        if token in AGGREGATIONS and (rest.startswith("(") or NAME.match(rest)):
            continue  # `sum (`, `sum by (...) (`: the grouping list is gone already
        if token in KEYWORDS:
            continue
        if rest.startswith("("):
            assert token in FUNCTIONS, f"`{token}` is not a PromQL function: {expr}"
            continue
        names.add(token)
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard's panels (rows' panels included)."""
    panels = list(dashboard["panels"])
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", []))
    return [t["expr"] for p in panels for t in p.get("targets", []) if t.get("expr")]


def dashboard_metrics(dashboard: dict[str, Any]) -> set[str]:
    """The metric names the panels and the template variables query."""
    names = set().union(*(metric_names(expr) for expr in dashboard_queries(dashboard)))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        match = LABEL_VALUES.match(query.strip())
        if match is None:
            names |= metric_names(query)
        elif match.group(1):
            names.add(match.group(1))
    return names


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


# ---------------------------------------------------------------- the dashboard alone


def test_metric_names_are_read_from_promql_strictly() -> None:
    assert metric_names(
        'sum by (deployment, status) (rate(fleet_requests_total{deployment=~"$deployment", '
        'status=~"5.."}[1m]))'
    ) == {"fleet_requests_total"}
    assert metric_names(
        "histogram_quantile(0.95, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket"
        "[$__rate_interval]))) > bool 1e-3"
    ) == {"vllm:time_to_first_token_seconds_bucket"}
    assert metric_names(
        "sum(rate(a_total[5m] offset 1h)) by (deployment) / on (deployment) group_left(model) "
        "max without (engine) (b:c{x='y'})"
    ) == {"a_total", "b:c"}
    with pytest.raises(AssertionError, match="not a PromQL function"):
        metric_names("histogram_quantil(0.5, x_bucket)")


def test_the_dashboard_loads_and_every_panel_queries_prometheus() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    deployment = variables["deployment"]
    assert deployment["query"]["query"] == "label_values(fleet_requests_total, deployment)"
    assert deployment["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]  # rows: layout only
    assert len(panels) >= 10
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target["datasource"] == panel["datasource"], panel["title"]
            if "vllm:" in target["expr"] or "fleet_" in target["expr"]:
                assert '{deployment=~"$deployment"' in target["expr"], target["expr"]
    titles = " / ".join(p["title"] for p in panels)
    for wanted in ("Requests/s", "Errors/s", "in flight", "Ready", "running and waiting",
                   "KV-cache", "first token", "Generation tokens/s", "Prefix cache"):  # fmt: skip
        assert wanted in titles, (wanted, titles)


# ---------------------------------------------------------------- a real Prometheus


@pytest.fixture
def prometheus_binary() -> Path:
    """Prometheus' binary; asked for before the fleet starts, so a skip starts nothing."""
    if PROMETHEUS.exists():
        return PROMETHEUS
    reason = f"Prometheus is not installed ({PROMETHEUS}): apt-get install prometheus"
    if os.environ.get("FLEET_E2E_REQUIRED") == "1":
        pytest.fail(reason + " (FLEET_E2E_REQUIRED=1)")
    pytest.skip(reason)


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as resp:
                answer = json.load(resp)
        except urllib.error.HTTPError as exc:  # a bad query: 400 with the error in JSON
            answer = json.load(exc)
        assert answer["status"] == "success", (path, params, answer)
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FleetUp]:
    path = fake_fleet_file(
        tmp_path,
        {
            # Engines on TCP: Prometheus scrapes each where it listens.
            "tcp": {"model": "org/tcp-model", "listen": "tcp", "replicas": 2},
            # An engine on a Unix socket: scraped through the gateway.
            "uds": {"model": "org/uds-model"},
        },
    )
    up = FleetUp(path)
    try:
        up.wait_ready(3)
        yield up
    finally:
        if up.proc.poll() is None:
            up.proc.send_signal(signal.SIGTERM)
            try:
                up.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                up.proc.kill()
                up.proc.wait()


@pytest.fixture
def prometheus(tmp_path: Path, prometheus_binary: Path, fleet: FleetUp) -> Iterator[Prometheus]:
    binary = prometheus_binary
    home = tmp_path / "prometheus"
    home.mkdir()
    gateway = f"127.0.0.1:{fleet.gateway_port}"
    config = home / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        + SCRAPE_CONFIG.replace("GATEWAY", gateway)
    )
    port = free_port()
    log = home / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(binary),
                f"--config.file={config}",
                f"--storage.tsdb.path={home / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=home,
            start_new_session=True,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:

        def ready() -> bool:
            assert proc.poll() is None, server.text()
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_until(ready, timeout=30, interval=0.2, what="Prometheus ready")
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


ENGINES = {  # engine -> (deployment, replica, model)
    "tcp-0": ("tcp", "0", "org/tcp-model"),
    "tcp-1": ("tcp", "1", "org/tcp-model"),
    "uds-0": ("uds", "0", "org/uds-model"),
}


def engine_targets(prom: Prometheus) -> dict[str, dict[str, Any]] | None:
    """The engines' targets once every one was scraped and is up, by engine name."""
    active = prom.api("targets", state="active")["activeTargets"]
    found = {
        t["labels"].get("upstream"): t for t in active if t["scrapePool"] == "vllm-fleet-engines"
    }
    up = all(t["health"] == "up" for t in found.values())
    return found if set(found) == set(ENGINES) and up else None


def test_prometheus_scrapes_every_engine_through_fleet_targets(
    prometheus: Prometheus, fleet: FleetUp
) -> None:
    prom = prometheus
    try:
        targets = wait_until(lambda: engine_targets(prom), timeout=30, interval=0.5,
                             what="every engine's target up")  # fmt: skip
    except TimeoutError:
        active = prom.api("targets", state="active")["activeTargets"]
        raise AssertionError(json.dumps(active, indent=1) + prom.text()) from None
    ports = {u["name"]: u["port"] for u in fleet.upstreams()}
    for name, (deployment, replica, model) in ENGINES.items():
        labels = targets[name]["labels"]
        assert labels["job"] == "vllm-fleet-engines"
        assert (labels["deployment"], labels["replica"], labels["model"]) == (
            deployment, replica, model,
        )  # fmt: skip
        assert labels["node"] == socket.gethostname()
        if deployment == "tcp":  # where the engine listens, vLLM's own path
            assert targets[name]["scrapeUrl"] == f"http://127.0.0.1:{ports[name]}/metrics"
        else:  # a Unix socket: the gateway's proxy of its /metrics
            assert targets[name]["scrapeUrl"] == f"{fleet.url}/fleet/engines/{name}/metrics"
    (gateway,) = [t for t in prom.api("targets", state="active")["activeTargets"]
                  if t["scrapePool"] == "vllm-fleet"]  # fmt: skip
    wait_until(lambda: prom.query('up{job="vllm-fleet"} == 1'), timeout=10,
               what="the gateway's own /metrics scraped")  # fmt: skip
    assert gateway["scrapeUrl"] == f"{fleet.url}/metrics"

    # One series per engine, labelled with its deployment and name (`upstream`, as the
    # gateway's own metrics); vLLM's own `engine` label (the engine core's index) is kept.
    running = prom.query("vllm:num_requests_running")
    by_engine = {s["metric"]["upstream"]: s["metric"] for s in running}
    assert set(by_engine) == set(ENGINES), running
    for name, metric in by_engine.items():
        assert metric["deployment"] == ENGINES[name][0]
        assert metric["model_name"] == ENGINES[name][2]
        assert metric["engine"] == "0" and "exported_engine" not in metric

    # Traffic through the gateway moves the engines' token counters, per deployment.
    def tokens() -> dict[str, float]:
        rows = prom.query("sum by (deployment) (vllm:generation_tokens_total)")
        return {r["metric"]["deployment"]: float(r["value"][1]) for r in rows}

    before = wait_until(lambda: tokens() if len(tokens()) == 2 else None, what="token counters")
    for deployment, count in (("tcp", 4), ("uds", 3)):
        client = OpenAI(base_url=f"{fleet.url}/{deployment}/v1", api_key="none")
        for _ in range(count):
            reply = client.chat.completions.create(
                model="any", messages=[{"role": "user", "content": "hello"}], max_tokens=5
            )
            assert reply.usage is not None and reply.usage.completion_tokens == 5
    expected = {"tcp": before["tcp"] + 20, "uds": before["uds"] + 15}
    wait_until(lambda: tokens() == expected, timeout=15, what=f"tokens {expected}")

    # Every metric the dashboard reads is one Prometheus has (histograms' _bucket too),
    # and every query parses and, but for the errors panel (no 5xx here), has data.
    dashboard = load_dashboard()
    wanted = dashboard_metrics(dashboard)
    assert {"fleet_requests_total", "vllm:time_to_first_token_seconds_bucket"} <= wanted

    def missing() -> set[str]:
        return wanted - set(prom.api("label/__name__/values"))

    try:
        wait_until(lambda: not missing(), timeout=15, what="the dashboard's metrics")
    except TimeoutError:
        raise AssertionError(f"Prometheus has no {sorted(missing())}") from None
    for expr in dashboard_queries(dashboard):
        concrete = expr.replace("$deployment", ".*")

        def answered(concrete: str = concrete) -> list[dict[str, Any]]:
            return prom.query(concrete)

        if 'status=~"5.."' in expr:
            answered()  # parses; no 5xx was answered
        else:
            wait_until(answered, timeout=15, what=f"data for {concrete}")
