"""The fleet file's JSON Schema (`fleet schema`), made from the models, for editors: with
it, yaml-language-server (VS Code's YAML extension and others) completes and checks a
fleet file as it is written.

Draft-07, the draft yaml-language-server implements. It is pydantic's schema of
FleetConfig with what the loader does before the models see the file written in:

- a `${VAR}` string is taken wherever a number or a yes/no goes (it expands first);
- engine arguments, `env` values and commands take numbers too (kept as written);
- deployment ids follow the id rule, and there is at least one deployment;
- `base_dir` and `source`, which the loader sets, are no keys of the file;
- a deployment is either one with engines (`model:`) or a LoRA adapter (`adapter:` and
  `base:`), which the loader moves to FleetConfig's `adapters` (no key of the file).

What spans fields (ports that clash, GPUs used twice, reserved ids) stays `fleet check`'s.
One thing the schema flags that the loader takes: a number or yes/no written in quotes
(`port: "8081"`), which pydantic converts; write it unquoted.
"""

from __future__ import annotations

from typing import Any

from vllm_fleet.config.models import ID_PATTERN, FleetConfig

DRAFT = "http://json-schema.org/draft-07/schema#"
TITLE = "vllm-fleet fleet file"
DESCRIPTION = (
    "A fleet file for `fleet up`: the gateway, the engines' defaults and the deployments "
    "(each one or more vLLM engines, or endpoints already running). `fleet check` validates "
    "it fully."
)
# Set by the loader (where the file is, its name), not keys of the fleet file.
INTERNAL_KEYS = ("base_dir", "source", "adapters")
# A string the loader expands before the models read it.
VARIABLE = {"type": "string", "pattern": r"\$\{"}
_SCALARS = ("integer", "number", "boolean")
# Annotations kept on the outside when a scalar also takes a `${VAR}`.
_ANNOTATIONS = ("title", "description", "default", "examples")


def fleet_schema() -> dict[str, Any]:
    """The JSON Schema of a fleet file (a new dict each call)."""
    schema = FleetConfig.model_json_schema(ref_template="#/definitions/{model}")
    definitions: dict[str, Any] = schema.pop("$defs")
    for key in INTERNAL_KEYS:
        del schema["properties"][key]
    schema["required"] = [k for k in schema.get("required", []) if k not in INTERNAL_KEYS]
    schema.pop("title", None)

    deployment = definitions["Deployment"]["properties"]
    for node in (
        schema["properties"]["engine_command"]["items"],
        deployment["args"]["items"],
        deployment["env"]["additionalProperties"],
        deployment["command"]["anyOf"][0]["items"],
    ):
        _text_or_number(node)
    deployments = schema["properties"]["deployments"]
    deployments["additionalProperties"] = {
        "anyOf": [deployments["additionalProperties"], {"$ref": "#/definitions/Adapter"}]
    }
    deployments["propertyNames"] = {"pattern": ID_PATTERN.pattern}
    deployments["minProperties"] = 1

    body = _allow_variables({**schema, "definitions": definitions})
    return {"$schema": DRAFT, "title": TITLE, "description": DESCRIPTION, **body}


def _text_or_number(node: dict[str, Any]) -> None:
    if node.get("type") != "string":
        raise AssertionError(f"expected a string schema, got {node}")
    node["type"] = ["string", "number"]


def _allow_variables(node: Any) -> Any:
    """A copy of `node` where every number or boolean schema also takes a `${VAR}`."""
    if isinstance(node, list):
        return [_allow_variables(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _allow_variables(value) for key, value in node.items()}
    if out.get("type") in _SCALARS:
        outer = {key: out.pop(key) for key in _ANNOTATIONS if key in out}
        return {**outer, "anyOf": [out, dict(VARIABLE)]}
    return out
