"""Where Prometheus scrapes each engine (`GET /fleet/targets`), decided by
`gateway/targets.py`: Prometheus HTTP SD target groups, one per engine, with the labels a
dashboard sums by."""

from __future__ import annotations

import json

from vllm_fleet import config
from vllm_fleet.gateway.targets import engine_metrics_path, scrape_targets
from vllm_fleet.gpus import Inventory
from vllm_fleet.plan import build_plan
from vllm_fleet.registry import Registry, State

FLEET = """\
engines: {socket_dir: /run/fleet}
deployments:
  qwen: {model: Qwen/Qwen2.5-1.5B-Instruct, replicas: 2}
  smol: {model: org/smol, listen: tcp, port: 8101}
  wide: {model: org/wide, listen: tcp, host: 0.0.0.0, port: 8102}
  six: {model: org/six, listen: tcp, host: '::1', port: 8103}
  far:
    model: org/far
    endpoints: [http://10.1.2.3:8000, https://gpu.example.com/vllm/]
"""


def registry(text: str = FLEET) -> Registry:
    cfg = config.loads(text, environ={})
    return Registry(cfg, build_plan(cfg, Inventory(None, "test"), "py"))


def by_engine(groups: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    found = {}
    for group in groups:
        labels = group["labels"]
        assert isinstance(labels, dict)
        found[labels["upstream"]] = group
    return found


def test_every_engine_is_one_group_labelled_for_a_dashboard() -> None:
    groups = scrape_targets(registry(), "gw.example:8080", False, node="box1")
    engines = by_engine(groups)
    assert list(engines) == ["qwen-0", "qwen-1", "smol-0", "wide-0", "six-0", "far-0", "far-1"]
    assert engines["smol-0"] == {
        "targets": ["127.0.0.1:8101"],
        "labels": {
            "deployment": "smol", "replica": "0", "upstream": "smol-0", "model": "org/smol",
            "node": "box1", "__metrics_path__": "/metrics",
        },
    }  # fmt: skip
    assert engines["qwen-1"]["labels"] == {
        "deployment": "qwen", "replica": "1", "upstream": "qwen-1",
        "model": "Qwen/Qwen2.5-1.5B-Instruct", "node": "box1",
        "__metrics_path__": "/fleet/engines/qwen-1/metrics",
    }  # fmt: skip
    json.dumps(groups)  # what the route sends as it is


def test_an_engine_on_a_unix_socket_is_scraped_through_the_gateway() -> None:
    engines = by_engine(scrape_targets(registry(), "gw.example:8080", False, node="n"))
    for name in ("qwen-0", "qwen-1"):
        assert engines[name]["targets"] == ["gw.example:8080"]
        labels = engines[name]["labels"]
        assert isinstance(labels, dict)
        assert labels["__metrics_path__"] == f"/fleet/engines/{name}/metrics"


def test_via_gateway_every_engine_and_endpoint_goes_through_the_gateway() -> None:
    groups = scrape_targets(registry(), "10.9.9.9:8080", True, node="n")
    assert len(groups) == 7
    for group in groups:
        labels = group["labels"]
        assert group["targets"] == ["10.9.9.9:8080"]
        assert labels["__metrics_path__"] == f"/fleet/engines/{labels['upstream']}/metrics"
        assert "__scheme__" not in labels


def test_an_engine_on_every_interface_is_reached_by_the_gateways_host() -> None:
    engines = by_engine(scrape_targets(registry(), "gw.example:8080", False, node="n"))
    assert engines["wide-0"]["targets"] == ["gw.example:8102"]
    assert engines["six-0"]["targets"] == ["[::1]:8103"]
    ipv6 = by_engine(scrape_targets(registry(), "[fd00::7]:8080", False, node="n"))
    assert ipv6["wide-0"]["targets"] == ["[fd00::7]:8102"]


def test_a_remote_endpoint_is_scraped_where_it_serves_with_its_scheme() -> None:
    engines = by_engine(scrape_targets(registry(), "gw:8080", False, node="n"))
    plain, tls = engines["far-0"], engines["far-1"]
    assert plain["targets"] == ["10.1.2.3:8000"]
    assert plain["labels"] == {
        "deployment": "far", "replica": "0", "upstream": "far-0", "model": "org/far",
        "node": "n", "__metrics_path__": "/metrics",
    }  # fmt: skip
    assert tls["targets"] == ["gpu.example.com:443"]
    labels = tls["labels"]
    assert isinstance(labels, dict)
    assert labels["__metrics_path__"] == "/vllm/metrics"
    assert labels["__scheme__"] == "https"


def test_an_engine_that_is_not_running_is_still_a_target() -> None:
    reg = registry()
    reg.upstreams("smol")[0].set_state(State.FAILED, "exited 1")
    reg.upstreams("qwen")[0].set_state(State.UNLOADED)
    assert len(scrape_targets(reg, "gw:8080", False, node="n")) == 7


def test_the_proxy_path_quotes_the_name() -> None:
    assert engine_metrics_path("a.b-0") == "/fleet/engines/a.b-0/metrics"
    assert engine_metrics_path("x/y z") == "/fleet/engines/x%2Fy%20z/metrics"


def test_behind_a_tls_gateway_what_goes_through_it_is_scraped_over_https() -> None:
    groups = scrape_targets(registry(), "gw.example:8443", True, node="n", tls=True)
    assert groups and all(g["labels"]["__scheme__"] == "https" for g in groups)
    plain = scrape_targets(registry(), "gw.example:8080", True, node="n")
    assert all("__scheme__" not in g["labels"] for g in plain)
