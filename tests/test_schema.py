"""`fleet schema`: the fleet file's JSON Schema, checked by a real validator (jsonschema,
the draft editors use), against the example files and against the loader's own verdicts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator

from vllm_fleet.config import ConfigError, loads
from vllm_fleet.config.schema import fleet_schema

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))


def errors(data: Any) -> list[str]:
    validator = Draft7Validator(fleet_schema())
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(data)]


def test_schema_is_a_valid_draft_7_schema_with_title() -> None:
    schema = fleet_schema()
    Draft7Validator.check_schema(schema)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["title"] == "vllm-fleet fleet file"
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["deployments"]


def test_internal_fields_are_no_keys_of_the_file() -> None:
    # base_dir and source are set by the loader, and refused when written in the file.
    properties = fleet_schema()["properties"]
    assert set(properties) == {"gateway", "engines", "engine_command", "deployments"}
    assert "base_dir" not in json.dumps(fleet_schema())


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_fleet_file_validates(path: Path) -> None:
    assert errors(yaml.safe_load(path.read_text())) == []


OK = "deployments:\n  a: {model: m}\n"
# (fleet file, what the schema says): every case is checked against the loader too.
CASES = {
    "minimal": (OK, True),
    "unknown top-level key": ("deploymnets: {}\n" + OK, False),
    "unknown gateway key": ("gateway: {prot: 8081}\n" + OK, False),
    "unknown engines key": ("engines: {drain: 5}\n" + OK, False),
    "unknown deployment key": ("deployments:\n  a: {model: m, gpu: [0]}\n", False),
    "a key the loader sets": ("base_dir: /tmp\n" + OK, False),
    "a removed key": ("gateway: {drain_timeout: 5}\n" + OK, False),
    "port is text": ("gateway: {port: eighty}\n" + OK, False),
    "port out of range": ("gateway: {port: 70000}\n" + OK, False),
    "replicas below 1": ("deployments:\n  a: {model: m, replicas: 0}\n", False),
    "model missing": ("deployments:\n  a: {gpus: [0]}\n", False),
    "no deployment": ("deployments: {}\n", False),
    "deployments missing": ("gateway: {port: 8081}\n", False),
    "a bad id": ("deployments:\n  Bad_Id: {model: m}\n", False),
    "gpus as a list": ("deployments:\n  a: {model: m, gpus: [0, 1]}\n", True),
    "gpus as a count": ("deployments:\n  a: {model: m, gpus: 2}\n", True),
    "gpus as text": ("deployments:\n  a: {model: m, gpus: all}\n", False),
    "a yes/no where a number goes": ("deployments:\n  a: {model: m, replicas: yes}\n", False),
    "a ${VAR} where a number goes": ("gateway: {port: '${PORT:-8081}'}\n" + OK, True),
    "numbers in args, env, command": (
        "engine_command: [vllm, serve, '{model}', --seed, 7]\n"
        "deployments:\n  a: {model: m, args: [--max-model-len, 2048], env: {X: 1.5}}\n",
        True,
    ),
    "a yes/no in args": ("deployments:\n  a: {model: m, args: [--x, true]}\n", False),
    "no limit (null)": ("gateway: {max_connections: null}\n" + OK, True),
    "on demand, its keys": (
        "deployments:\n  a: {model: m, start: on_demand, idle_timeout: 60, sleep: 1, "
        "swap_group: big, queue_timeout: 30, max_queued: 0, swap_drain_timeout: 0, "
        "min_hold: 0}\n",
        True,
    ),
    "start neither always nor on_demand": ("deployments:\n  a: {model: m, start: lazy}\n", False),
    "sleep as a yes/no": ("deployments:\n  a: {model: m, start: on_demand, sleep: true}\n", False),
    "sleep level 3": ("deployments:\n  a: {model: m, start: on_demand, sleep: 3}\n", False),
    "a swap group name that is no id": (
        "deployments:\n  a: {model: m, start: on_demand, swap_group: Big}\n",
        False,
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_schema_and_loader_agree(name: str) -> None:
    text, valid = CASES[name]
    found = errors(yaml.safe_load(text))
    assert (found == []) is valid, found
    try:
        loads(text, environ={})
    except ConfigError as exc:
        assert not valid, exc.render()
    else:
        assert valid, "the loader took it"


def test_cli_prints_the_schema_as_json(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vllm_fleet.cli", "schema"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed == fleet_schema()
    out = tmp_path / "fleet.schema.json"
    written = subprocess.run(
        [sys.executable, "-m", "vllm_fleet.cli", "schema", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert written.returncode == 0, written.stderr
    assert written.stdout == ""
    assert json.loads(out.read_text()) == printed
