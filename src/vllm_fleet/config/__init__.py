"""The fleet file: its models, the checks that span them, the problems found with their
lines, the YAML source and `${VAR}` expansion. The flow: fleet file -> `load` ->
FleetConfig -> plan -> engines -> gateway.

Modules, each importing only those above it: `problems` (ConfigIssue, ConfigError),
`envsubst` (`${VAR}`), `yaml_source` (lines, numbers as written, duplicate keys),
`models` (pydantic), `on_demand` (the rules of `start: on_demand` and swap groups),
`checks` (cross-field rules on the models), `loading` (all together).
"""

from vllm_fleet.config.loading import load, loads
from vllm_fleet.config.models import Deployment, EnginesConfig, FleetConfig, GatewayConfig
from vllm_fleet.config.problems import ConfigError, ConfigIssue, Loc, format_loc

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "Deployment",
    "EnginesConfig",
    "FleetConfig",
    "GatewayConfig",
    "Loc",
    "format_loc",
    "load",
    "loads",
]
