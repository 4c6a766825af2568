"""Pure routing: a request path (and, for `/v1`, the body's `model`) -> a deployment.

Three URL styles reach a deployment:
  /{id}/...                         -> the engine's /...            (the seed's nginx rewrite)
  /openai/deployments/{id}/...      -> the engine's /v1/...         (Azure OpenAI's layout)
  /v1/... and /openai/v1/...        -> the engine's /v1/...         (by the body's `model`)
On every style the body's `model` becomes the name the engine serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from vllm_fleet.config import FleetConfig

# Paths the gateway answers itself.
GATEWAY_PATHS = frozenset({"/health", "/metrics", "/fleet/status", "/v1/models", "/openai/models"})


class Style(StrEnum):
    PATH = "path"
    AZURE = "azure"
    OPENAI = "openai"


@dataclass(frozen=True)
class Target:
    """The request names its deployment in the path."""

    deployment: str
    upstream_path: str
    style: Style


@dataclass(frozen=True)
class ByModel:
    """The deployment comes from the body's `model` (plain OpenAI style)."""

    upstream_path: str


@dataclass(frozen=True)
class RouteError:
    status: int
    message: str
    code: str
    param: str | None = None


class Names:
    """Every name a client may use for a deployment: its id, its aliases, and its model
    code (when only one deployment serves that code)."""

    def __init__(self, config: FleetConfig) -> None:
        self.ids = list(config.deployments)
        self.served: dict[str, str] = {i: d.served_as for i, d in config.deployments.items()}
        self._by_name: dict[str, str] = {}
        self.ambiguous: dict[str, list[str]] = {}
        by_code: dict[str, list[str]] = {}
        for dep_id, dep in config.deployments.items():
            by_code.setdefault(dep.model, []).append(dep_id)
        for code, ids in by_code.items():
            if len(ids) == 1:
                self._by_name[code] = ids[0]
            else:
                self.ambiguous[code] = ids
        for dep_id, dep in config.deployments.items():
            served = [dep.served_name] if dep.served_name else []
            for alias in [*dep.aliases, *served]:
                self._by_name[alias] = dep_id
            self._by_name[dep_id] = dep_id

    def resolve(self, model: object) -> str | RouteError:
        """The deployment for a body `model`, or the error to answer."""
        if model is None:
            return RouteError(
                400,
                "the request has no `model`; name a deployment "
                f"({self.listing()}), or use /<deployment>/v1/... to choose it by path",
                "model_required",
                "model",
            )
        if not isinstance(model, str):
            return RouteError(400, "`model` must be a string", "invalid_model", "model")
        found = self._by_name.get(model)
        if found is not None:
            return found
        if model in self.ambiguous:
            ids = ", ".join(self.ambiguous[model])
            return RouteError(
                400,
                f"the model `{model}` is served by several deployments ({ids}); send one "
                "of their ids as `model`",
                "model_ambiguous",
                "model",
            )
        return RouteError(
            404,
            f"the model `{model}` does not exist in this fleet; deployments: {self.listing()}",
            "model_not_found",
            "model",
        )

    def listing(self) -> str:
        return ", ".join(f"{i} ({self.served[i]})" for i in self.ids) or "none"


def remove_dot_segments(path: str) -> str:
    """`path` with its `.` and `..` segments resolved (RFC 3986 §5.2.4), so a path never
    routes one way and means another to the server behind; `..` stops at the root."""
    if "/." not in path:
        return path
    segments = path.split("/")[1:]
    out: list[str] = []
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if segment in (".", ".."):
            if segment == ".." and out:
                out.pop()
            if index == last:
                out.append("")  # `/a/b/..` is `/a/`
            continue
        out.append(segment)
    return "/" + "/".join(out)


def match(path: str, names: Names) -> Target | ByModel | RouteError:
    """Route a request path that is not one of the gateway's own endpoints."""
    if path == "/v1" or path.startswith("/v1/"):
        return ByModel(path)
    if path.startswith("/openai/"):
        return _match_azure(path, names)
    first, sep, rest = path[1:].partition("/")
    if first in names.served:
        return Target(first, "/" + rest if sep else "/", Style.PATH)
    return RouteError(
        404,
        f"no deployment `{first}` and no such path `{path}`; deployments: {names.listing()}. "
        "Use /<deployment>/v1/..., /openai/deployments/<deployment>/... "
        "or /v1/... with the deployment as `model`",
        "deployment_not_found",
    )


def _match_azure(path: str, names: Names) -> Target | ByModel | RouteError:
    # Azure's newer v1 API: /openai/v1/chat/completions with the deployment as `model`.
    if path == "/openai/v1" or path.startswith("/openai/v1/"):
        return ByModel(path.removeprefix("/openai"))
    parts = path.split("/", 4)  # ["", "openai", "deployments", id, rest]
    if len(parts) >= 4 and parts[2] == "deployments" and parts[3]:
        dep_id = parts[3]
        if dep_id not in names.served:
            return RouteError(
                404,
                f"no deployment `{dep_id}`; deployments: {names.listing()}",
                "DeploymentNotFound",
            )
        rest = parts[4] if len(parts) == 5 else ""
        return Target(dep_id, "/v1/" + rest, Style.AZURE)
    return RouteError(
        404,
        f"no such path `{path}`; Azure clients use "
        "/openai/deployments/<deployment>/chat/completions?api-version=...; "
        f"deployments: {names.listing()}",
        "not_found",
    )
