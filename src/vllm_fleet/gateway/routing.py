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


# vLLM's routes for its own operators: those it serves with VLLM_SERVER_DEV_MODE=1
# (sleep mode, RPC into the workers, cache resets, weight updates, pause, elastic EP)
# and the profiler's. The fleet sleeps and wakes its engines itself; a client must
# never reach them, on any engine, dev mode or not (`/{id}/sleep` is refused).
ENGINE_ONLY_ROUTES = frozenset({
    # vLLM 0.32 with VLLM_SERVER_DEV_MODE=1: entrypoints/serve/dev/ and entrypoints/rl/
    "/sleep", "/wake_up", "/is_sleeping", "/release_kv_cache_memory", "/collective_rpc",
    "/reset_prefix_cache", "/reset_mm_cache", "/reset_encoder_cache", "/server_info",
    "/pause", "/resume", "/is_paused", "/abort_requests", "/get_world_size",
    "/init_weight_transfer_engine", "/shutdown_weight_transfer_engine",
    "/start_weight_update", "/start_draft_weight_update", "/finish_weight_update",
    "/update_weights", "/update_weight_version", "/weight_checker", "/weight_info",
    # elastic expert parallelism, fault tolerance, the profiler
    "/scale_elastic_ep", "/is_scaling_elastic_ep", "/fault_tolerance",
    "/start_profile", "/stop_profile",
    # LoRA adapters at run time (VLLM_ALLOW_RUNTIME_LORA_UPDATING): the fleet's adapters
    "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
})  # fmt: skip
LORA_ROUTES = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})


def _folded(path: str) -> str:
    """The path as a server that folds slashes reads it, without a trailing slash."""
    while "//" in path:
        path = path.replace("//", "/")
    return path.rstrip("/") or "/"


def engine_only(upstream_path: str) -> bool:
    """Whether an engine path is one of ENGINE_ONLY_ROUTES (or below one)."""
    path = _folded(upstream_path)  # a server behind that folds slashes must not see one
    if path in ENGINE_ONLY_ROUTES:
        return True
    return any(path.startswith(route + "/") for route in ENGINE_ONLY_ROUTES)


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
    code (when only one deployment serves that code). An adapter deployment is named by
    its id and aliases; its engines serve it as its id (`served`), and `bases` says whose
    engines those are."""

    def __init__(self, config: FleetConfig) -> None:
        self.ids = config.deployment_ids()
        self.served: dict[str, str] = {i: d.served_as for i, d in config.deployments.items()}
        self.bases: dict[str, str] = {a_id: a.base for a_id, a in config.adapters.items()}
        self.served.update({a_id: a_id for a_id in config.adapters})
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
        for a_id, adapter in config.adapters.items():
            for name in (*adapter.aliases, a_id):
                self._by_name[name] = a_id

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
        return ", ".join(self.label(i) for i in self.ids) or "none"

    def label(self, dep_id: str) -> str:
        """A deployment as listings show it: `qwen (Qwen/Qwen2.5-1.5B-Instruct)`, or
        `support-bot (adapter on qwen)`."""
        base = self.bases.get(dep_id)
        return f"{dep_id} (adapter on {base})" if base else f"{dep_id} ({self.served[dep_id]})"


def _refused(upstream_path: str, dep_id: str | None) -> RouteError | None:
    """The 403 for one of ENGINE_ONLY_ROUTES, on any route style; None for the rest."""
    if not engine_only(upstream_path):
        return None
    path = _folded(upstream_path)
    if path in LORA_ROUTES or any(path.startswith(route + "/") for route in LORA_ROUTES):
        return RouteError(
            403,
            f"`{path}` is the fleet's own route on its engines, never a client's: the "
            "fleet loads and unloads LoRA adapters itself; add an adapter as a deployment "
            "(`adapter:` and `base:`) in the fleet file and reload",
            "route_not_allowed",
        )
    where = dep_id or "<deployment>"
    return RouteError(
        403,
        f"`{upstream_path}` is the fleet's own route on its engines, never a "
        "client's (vLLM's dev-mode and profiler routes: the fleet sleeps, wakes and "
        "manages engines itself); to free or warm a deployment, an admin uses "
        f"POST /fleet/deployments/{where}/unload or /load",
        "route_not_allowed",
    )


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
        return _refused(path, None) or ByModel(path)
    if path.startswith("/openai/"):
        return _match_azure(path, names)
    first, sep, rest = path[1:].partition("/")
    if first in names.served:
        upstream_path = "/" + rest if sep else "/"
        return _refused(upstream_path, first) or Target(first, upstream_path, Style.PATH)
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
        upstream = path.removeprefix("/openai")
        return _refused(upstream, None) or ByModel(upstream)
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
        upstream = "/v1/" + rest
        return _refused(upstream, dep_id) or Target(dep_id, upstream, Style.AZURE)
    return RouteError(
        404,
        f"no such path `{path}`; Azure clients use "
        "/openai/deployments/<deployment>/chat/completions?api-version=...; "
        f"deployments: {names.listing()}",
        "not_found",
    )
