"""The fake engine's LoRA adapters, served as vLLM 0.32 serves them, and `write_adapter`,
which makes an adapter for tests. Imports no `fake_vllm`.

Flags (vLLM's): `--enable-lora`, `--lora-modules NAME=PATH | '{"name": .., "path": ..,
"base_model_name": ..}' ...` (vLLM's parser: a malformed one exits 2 at start),
`--max-loras N` (1), `--max-lora-rank R` (16; one of `MAX_LORA_RANKS`), `--max-cpu-loras N`
(>= `--max-loras`; both only checked: the fake batches nothing and caches no weights). The
`--lora-modules` are loaded at start like runtime loads; one that fails makes the engine
exit 1 before its port opens, with `ValueError: <message>` on stderr.

An adapter is a directory holding PEFT's `adapter_config.json`; its rank is its `"r"`. A
load is checked in vLLM's order, each refusal with vLLM's status and message: name and path
given (400), the name no base's (400), not loaded yet unless `load_inplace` (400), LoRA
enabled (500), the config there (404 "No adapter found"), readable with `r`, `lora_alpha`
and `target_modules` (500), rank <= `--max-lora-rank`, no bias, no DoRA (500). Relative
paths are resolved against the engine's working directory (vLLM would try the Hugging Face
Hub for one that does not exist there; the fake answers 404 at once). Paths in messages are
redacted as vLLM's `sanitize_message` does (`/tmp/...` reads `<path>`). The fake reads no
weights: a config is enough.

`POST /v1/load_lora_adapter {"lora_name", "lora_path"[, "load_inplace"]}` and `POST
/v1/unload_lora_adapter {"lora_name"}` exist only with `VLLM_ALLOW_RUNTIME_LORA_UPDATING`
"1" or "true" (else 404 like any unknown path); a body must be `application/json` and
fit vLLM's request model (else its 400 "N validation error(s)"); success is 200 with vLLM's
plain-text sentence. `/v1/models` lists a card per adapter after the base's (`root` its
path as given, `parent` its base: the first served name unless its `base_model_name` names
another); a request whose `model` is an adapter is answered by it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

RUNTIME_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks
DEFAULT_MAX_RANK = 16
CONFIG_FILE = "adapter_config.json"
_PEFT_REQUIRED = ("r", "lora_alpha", "target_modules")  # PEFTHelper's fields sans default


def runtime_updating(environ: Mapping[str, str] = os.environ) -> bool:
    """vLLM's `VLLM_ALLOW_RUNTIME_LORA_UPDATING`: "1" or "true", any case and spacing."""
    return environ.get(RUNTIME_ENV, "0").strip().lower() in ("1", "true")


def sanitize(message: str) -> str:
    """vLLM's `sanitize_message`, which every error message goes through: addresses,
    tracebacks and file paths out."""
    message = re.sub(r" at 0x[0-9a-fA-F]+>", ">", message)
    message = re.sub(r'\n?\s*File "[^"]+", line \d+, in \S+(\n\s+.*)?', "", message)
    message = re.sub(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+", "<path>", message)
    message = re.sub(r"(?:/[\w\-]+)+/[\w\-]+\.\w+", "<path>", message)
    return message.strip()


@dataclass
class Refusal:
    """An error answer in vLLM's envelope; `message` is sanitized when answered."""

    status: int
    message: str
    kind: str
    param: str | None = None

    def response(self) -> web.Response:
        error = {"message": sanitize(self.message), "type": self.kind,
                 "param": self.param, "code": self.status}  # fmt: skip
        return web.json_response({"error": error}, status=self.status)


@dataclass
class LoRAModulePath:
    """vLLM's, field for field: a JSON `--lora-modules` with other keys fails with the
    same TypeError text."""

    name: str
    path: str
    base_model_name: str | None = None
    is_3d_lora_weight: bool = False


class LoRAModulesAction(argparse.Action):
    """vLLM's `LoRAParserAction`: `name=path` (with no comma), else a JSON object."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        modules: list[LoRAModulePath] = []
        for item in [values] if isinstance(values, str) else values or []:
            if not item:
                continue
            if "=" in item and "," not in item:
                name, path = item.split("=", 1)
                modules.append(LoRAModulePath(name, path))
                continue
            try:
                modules.append(LoRAModulePath(**json.loads(item)))
            except json.JSONDecodeError:
                parser.error(f"Invalid JSON format for --lora-modules: {item}")
            except TypeError as exc:
                parser.error(f"Invalid fields for --lora-modules: {item} - {exc}")
        setattr(namespace, self.dest, modules)


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--enable-lora", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--lora-modules", nargs="+", action=LoRAModulesAction, default=None)
    parser.add_argument("--max-loras", type=int, default=1)
    parser.add_argument(
        "--max-lora-rank", type=int, choices=MAX_LORA_RANKS, default=DEFAULT_MAX_RANK
    )
    parser.add_argument("--max-cpu-loras", type=int, default=None)


def _invalid_user_input(message: str) -> Refusal:
    return Refusal(400, message, "InvalidUserInput")


def _engine_failed(error: str) -> Refusal:
    """An error raised in vLLM's engine core by `add_lora`, as its API server answers it."""
    return Refusal(500, f"Call to add_lora method failed: {error}", "InternalServerError")


def _resolve(path: str) -> str:
    """vLLM's `get_adapter_absolute_path`, less the Hub download."""
    if os.path.isabs(path):
        return path
    if path.startswith("~"):
        return os.path.expanduser(path)
    return os.path.abspath(path) if os.path.exists(path) else path


def _check_adapter(name: str, path: str, max_rank: int) -> Refusal | None:
    """What vLLM's worker checks when it loads the adapter (PEFTHelper, validate_legal)."""
    try:
        with open(os.path.join(_resolve(path), CONFIG_FILE), encoding="utf-8") as file:
            config = json.load(file)
        config["vllm_max_position_embeddings"] = None  # as vLLM: a TypeError if no dict
    except FileNotFoundError:
        return Refusal(
            404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError"
        )
    except (OSError, ValueError, TypeError) as exc:
        return _engine_failed(str(exc))
    if missing := set(_PEFT_REQUIRED) - set(config):
        return _engine_failed(f"Missing required configuration fields: {missing}")
    rank = config["r"]
    try:
        if rank <= 0:
            return _engine_failed(f"LoRA rank `r` must be a positive integer, got {rank}.")
        top = max([rank, *(rank for _, rank in (config.get("rank_pattern") or {}).items())])
    except (TypeError, AttributeError) as exc:
        return _engine_failed(str(exc))
    errors = ["vLLM does not yet support DoRA."] if config.get("use_dora") else []
    if top > max_rank:
        errors.append(f"LoRA rank {top} is greater than max_lora_rank {max_rank}.")
    if config.get("bias", "none") != "none":
        errors.append("Adapter bias is not supported.")
    return _engine_failed(" ".join(errors)) if errors else None


def card(
    ident: str, root: str, parent: str | None, max_model_len: int | None = None
) -> dict[str, Any]:
    """A `/v1/models` card, a base's or an adapter's, as vLLM's ModelCard."""
    return {"id": ident, "object": "model", "created": int(time.time()), "owned_by": "vllm",
            "root": root, "parent": parent, "max_model_len": max_model_len,
            "permission": []}  # fmt: skip


@dataclass
class Loras:
    """The engine's LoRA state: its flags, the environment, and the adapters loaded
    (`adapters`: name -> path as given; `parents`: those with a `base_model_name`)."""

    enabled: bool = False
    max_loras: int = 1
    max_rank: int = DEFAULT_MAX_RANK
    max_cpu_loras: int | None = None
    runtime_updating: bool = False
    base_names: list[str] = field(default_factory=list)
    adapters: dict[str, str] = field(default_factory=dict)
    parents: dict[str, str] = field(default_factory=dict)
    loads: int = 0  # successful loads, static ones and in-place reloads included
    unloads: int = 0

    def load(
        self, name: str, path: str, base_model_name: str | None = None, inplace: bool = False
    ) -> Refusal | None:
        """Load (or with `inplace` reload) an adapter: None, or vLLM's refusal."""
        if not name or not path:
            return _invalid_user_input("Both 'lora_name' and 'lora_path' must be provided.")
        if name in self.base_names:
            return _invalid_user_input(
                f"The lora adapter '{name}' conflicts with a served base model."
            )
        if not inplace and name in self.adapters:
            return _invalid_user_input(
                f"The lora adapter '{name}' has already been loaded. If you want to load "
                "the adapter in place, set 'load_inplace' to True."
            )
        if not self.enabled:
            return _engine_failed("LoRA is not enabled. Use --enable-lora to enable LoRA.")
        if (refused := _check_adapter(name, path, self.max_rank)) is not None:
            return refused
        self.adapters[name] = path
        self.parents.pop(name, None)
        if base_model_name is not None and base_model_name in self.base_names:
            self.parents[name] = base_model_name
        self.loads += 1
        return None

    def unload(self, name: str) -> Refusal | None:
        if not name:
            return _invalid_user_input("'lora_name' needs to be provided to unload a LoRA adapter.")
        if name not in self.adapters:
            return Refusal(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.adapters[name]
        self.parents.pop(name, None)
        self.unloads += 1
        return None

    def adapter(self, model: object) -> str | None:
        """`model` when it names a loaded adapter (which then answers), else None."""
        return model if isinstance(model, str) and model in self.adapters else None

    def cards(self) -> list[dict[str, Any]]:
        """The adapters' `/v1/models` cards, as vLLM's (no `max_model_len`)."""
        return [
            card(name, path, self.parents.get(name, self.base_names[0]))
            for name, path in self.adapters.items()
        ]

    def stats(self) -> dict[str, Any]:
        return {"adapters": dict(self.adapters), "lora_loads": self.loads,
                "lora_unloads": self.unloads}  # fmt: skip


def start(args: argparse.Namespace, base_names: list[str]) -> Loras:
    """The engine's LoRA state from its flags, its `--lora-modules` loaded; ValueError with
    vLLM's message when the flags do not fit together or a module does not load."""
    loras = Loras(
        enabled=args.enable_lora,
        max_loras=args.max_loras,
        max_rank=args.max_lora_rank,
        max_cpu_loras=args.max_cpu_loras if (args.max_cpu_loras or 0) > 0 else None,
        runtime_updating=runtime_updating(),
        base_names=list(base_names),
    )
    if loras.enabled and loras.max_loras < 1:
        raise ValueError("max_loras: Input should be greater than or equal to 1")
    if loras.enabled and loras.max_cpu_loras is not None and loras.max_cpu_loras < loras.max_loras:
        raise ValueError(
            f"max_cpu_loras ({loras.max_cpu_loras}) must be >= max_loras ({loras.max_loras})."
        )
    for module in args.lora_modules or []:
        if (refused := loras.load(module.name, module.path, module.base_model_name)) is not None:
            raise ValueError(sanitize(refused.message))
    return loras


def _summary(value: object) -> str:
    """The `input` vLLM's validation errors show: containers described, the rest str()."""
    if isinstance(value, list | dict):
        return f"<{type(value).__name__} of {len(value)} items>"
    text = str(value)
    return text[:200] + "...[truncated]" if len(text) > 200 else text


def _entry(kind: str, loc: str, msg: str, value: object) -> dict[str, Any]:
    """One error of a validation answer, as pydantic and vLLM's handler word it."""
    return {"type": kind, "loc": loc, "msg": msg, "input": _summary(value)}


def _invalid(*errors: dict[str, Any]) -> Refusal:
    """vLLM's answer to a body its request model refuses (FastAPI's RequestValidationError)."""
    label = "error" if len(errors) == 1 else "errors"
    message = f"{len(errors)} validation {label}:\n" + "".join(f"  {e}\n" for e in errors)
    return Refusal(400, message.rstrip(), "Bad Request", errors[0]["loc"])


_TRUE = ("1", "on", "t", "true", "y", "yes")
_FALSE = ("0", "off", "f", "false", "n", "no")


def _as_bool(value: object) -> bool | None:
    """Pydantic's lax bool: bools, 0 and 1, and its words; None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    return None


def _field_errors(
    body: dict[str, Any], strings: tuple[str, ...], flags: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Pydantic's errors for required str fields `strings` and bool fields `flags` (which
    default to False); coerced bools are written back into `body`."""
    errors = []
    for name in strings:
        if name not in body:
            errors.append(_entry("missing", f"body.{name}", "Field required", body))
        elif not isinstance(body[name], str):
            message = "Input should be a valid string"
            errors.append(_entry("string_type", f"body.{name}", message, body[name]))
    for name in flags:
        value = body.get(name, False)
        if (coerced := _as_bool(value)) is not None:
            body[name] = coerced
        elif isinstance(value, str | int | float):
            message = "Input should be a valid boolean, unable to interpret input"
            errors.append(_entry("bool_parsing", f"body.{name}", message, value))
        else:
            message = "Input should be a valid boolean"
            errors.append(_entry("bool_type", f"body.{name}", message, value))
    return errors


async def _body(
    request: web.Request, strings: tuple[str, ...], flags: tuple[str, ...] = ()
) -> dict[str, Any] | Refusal:
    """The JSON body as vLLM's route validates it (its media type, then its request
    model): a dict, or vLLM's 400."""
    if request.content_type != "application/json":
        only_json = "Unsupported Media Type: Only 'application/json' is allowed"
        return Refusal(400, f"1 validation error:\n  {only_json}", "Bad Request")
    raw = await request.read()
    try:
        body = json.loads(raw) if raw else None
    except json.JSONDecodeError as exc:
        error = _entry("json_invalid", f"body.{exc.pos}", "JSON decode error", {})
        return _invalid({**error, "ctx": {"error": exc.msg}})
    except ValueError as exc:  # not UTF-8
        return _invalid(_entry("json_invalid", "body.0", "JSON decode error", str(exc)))
    if body is None:
        return _invalid(_entry("missing", "body", "Field required", None))
    if not isinstance(body, dict):
        message = "Input should be a valid dictionary or object to extract fields from"
        return _invalid(_entry("model_attributes_type", "body", message, body))
    errors = _field_errors(body, strings, flags)
    return _invalid(*errors) if errors else body


def install(app: web.Application, loras: Loras) -> None:
    """Before the catch-all route: vLLM's load and unload routes, with runtime updating
    allowed only (as vLLM registers them)."""
    if not loras.runtime_updating:
        return

    async def load(request: web.Request) -> web.Response:
        body = await _body(
            request, ("lora_name", "lora_path"), ("load_inplace", "is_3d_lora_weight")
        )
        if isinstance(body, Refusal):
            return body.response()
        name = body["lora_name"]
        refused = loras.load(name, body["lora_path"], inplace=body["load_inplace"])
        if refused is not None:
            return refused.response()
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(request: web.Request) -> web.Response:
        body = await _body(request, ("lora_name",))
        if isinstance(body, Refusal):
            return body.response()
        name = body["lora_name"]
        if (refused := loras.unload(name)) is not None:
            return refused.response()
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    app.router.add_post("/v1/load_lora_adapter", load)
    app.router.add_post("/v1/unload_lora_adapter", unload)


def write_adapter(
    directory: str | os.PathLike[str],
    rank: int = 8,
    base: str = "HuggingFaceTB/SmolLM2-135M-Instruct",
    **config: Any,
) -> Path:
    """Make `directory` (and its parents) an adapter the fake engine loads: a PEFT
    `adapter_config.json` of rank `rank` for `base` (`config` adds or overrides keys);
    returns the directory."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    peft = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        **config,
    }
    (path / CONFIG_FILE).write_text(json.dumps(peft, indent=2) + "\n", encoding="utf-8")
    return path
