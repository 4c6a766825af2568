"""Every fleet file in examples/ stays valid: it loads and plans on a machine without GPUs."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_fleet.config import load
from vllm_fleet.gpus import Inventory
from vllm_fleet.plan import build_plan

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))


def test_there_are_examples() -> None:
    names = {path.name for path in EXAMPLES}
    assert {"seed-two-models.yaml", "cpu-demo.yaml", "fake-engines.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads_and_plans(path: Path) -> None:
    config = load(path, environ={})
    plan = build_plan(config, Inventory(None, "tests"), "python")
    assert plan.engines or plan.remotes
    for engine in plan.engines:
        assert engine.host == "127.0.0.1"  # no example exposes an engine to the network
        assert engine.cwd == path.parent.resolve()
