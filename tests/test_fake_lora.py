"""The fake engine's LoRA adapters (fake_lora.py) behave as vLLM 0.32's: real subprocesses,
real HTTP. The expected messages are vLLM's own, copied from its source (serving.py of
entrypoints/openai/models, lora/peft_helper.py, lora/worker_manager.py, the validation
handler of entrypoints/serve/exception_handling) or from its handlers run on these bodies."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from vllm_fleet.testing.fake_lora import write_adapter
from vllm_fleet.testing.harness import (
    FakeEngine,
    engine_request,
    fake_vllm_argv,
    free_port,
    port_open,
    wait_port,
)

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
RUNTIME = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
NO_RUNTIME = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "0"}
ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


def _call(
    eng: FakeEngine, path: str, body: Any = None, raw: bytes | None = None
) -> tuple[int, Any]:
    """POST `body` as JSON (or `raw`), or GET without either: the status and the answer,
    decoded from JSON when it is JSON, else its text."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    status, answer = engine_request(eng.url, path, "GET" if data is None else "POST", data)
    try:
        return status, json.loads(answer)
    except ValueError:
        return status, answer.decode()


def _load(eng: FakeEngine, name: str, path: str | Path, **extra: Any) -> tuple[int, Any]:
    return _call(eng, ROUTES[0], {"lora_name": name, "lora_path": str(path), **extra})


def _error(status: int, message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    """vLLM's error envelope."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _chat(eng: FakeEngine, model: str) -> tuple[int, Any]:
    messages = [{"role": "user", "content": "hi"}]
    return _call(eng, "/v1/chat/completions", {"model": model, "messages": messages})


def _streamed_text(eng: FakeEngine, model: str) -> tuple[set[str], str]:
    """A streamed completion: the `model` of its chunks and the text they carry."""
    body = {"model": model, "prompt": "x", "stream": True, "max_tokens": 3}
    status, raw = engine_request(eng.url, "/v1/completions", "POST", json.dumps(body).encode())
    assert status == 200, raw
    events = raw.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    return {c["model"] for c in chunks}, "".join(c["choices"][0]["text"] for c in chunks)


def _adapters(eng: FakeEngine) -> dict[str, str]:
    adapters: dict[str, str] = _call(eng, "/fake/stats")[1]["adapters"]
    return adapters


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of adapters: bot (rank 8), big (rank 64), empty (no config)."""
    root = tmp_path_factory.mktemp("adapters")
    write_adapter(root / "bot", rank=8)
    write_adapter(root / "big", rank=64)
    (root / "empty").mkdir()
    return root


@pytest.fixture(scope="module")
def engine() -> Iterator[FakeEngine]:
    """Runtime updating on, LoRA enabled with vLLM's default max rank (16)."""
    with FakeEngine(MODEL, ["smol"], "--enable-lora", "--tokens", "3", env=RUNTIME) as eng:
        yield eng


def test_write_adapter_writes_a_peft_config(tmp_path: Path) -> None:
    path = write_adapter(tmp_path / "a" / "b", rank=32, base="org/base", lora_dropout=0.1)
    assert path == tmp_path / "a" / "b"
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 32
    assert config["base_model_name_or_path"] == "org/base"
    assert config["lora_alpha"] == 64 and config["target_modules"] == ["q_proj", "v_proj"]
    assert config["lora_dropout"] == 0.1


def test_static_lora_modules_are_served_and_listed_without_runtime_routes(
    adapters: Path,
) -> None:
    other = json.dumps({"name": "legal", "path": str(adapters / "big"), "base_model_name": "alias"})
    args = ("--enable-lora", "--max-lora-rank", "64", "--tokens", "2")
    modules = ("--lora-modules", f"support-bot={adapters / 'bot'}", other)
    with FakeEngine(MODEL, ["smol", "alias"], *args, *modules, env=NO_RUNTIME) as eng:
        cards = _call(eng, "/v1/models")[1]["data"]
        assert [c["id"] for c in cards] == ["smol", "alias", "support-bot", "legal"]
        assert [c["root"] for c in cards] == [MODEL, MODEL, f"{adapters}/bot", f"{adapters}/big"]
        assert [c["parent"] for c in cards] == [None, None, "smol", "alias"]
        assert [c["max_model_len"] for c in cards] == [2048, 2048, None, None]

        status, reply = _chat(eng, "support-bot")
        assert status == 200 and reply["model"] == "support-bot"
        assert reply["choices"][0]["message"]["content"] == "support-bot:tok0 support-bot:tok1"
        assert _chat(eng, "legal")[1]["choices"][0]["message"]["content"] == "legal:tok0 legal:tok1"
        status, reply = _chat(eng, "alias")
        assert reply["model"] == "smol" and reply["choices"][0]["message"]["content"] == "tok0 tok1"

        stats = _call(eng, "/fake/stats")[1]
        assert stats["adapters"] == {"support-bot": f"{adapters}/bot", "legal": f"{adapters}/big"}
        assert (stats["lora_loads"], stats["lora_unloads"]) == (2, 0)
        # Static modules need no runtime updating; the routes are then vLLM's 404.
        for path in ROUTES:
            assert _call(eng, path, {"lora_name": "support-bot"}) == (
                404,
                _error(404, "Not Found", "Not Found"),
            )
        assert "support-bot" in _adapters(eng)


@pytest.mark.parametrize(("value", "routes"), [("0", False), ("yes", False), (" True ", True)])
def test_routes_exist_only_when_runtime_updating_is_1_or_true(
    value: str, routes: bool, adapters: Path
) -> None:
    """vLLM reads the variable as `.strip().lower() in ("1", "true")`."""
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": value}
    with FakeEngine(MODEL, ["smol"], "--enable-lora", env=env) as eng:
        if routes:
            assert _load(eng, "bot", adapters / "bot")[0] == 200
            assert _call(eng, ROUTES[1], {"lora_name": "bot"})[0] == 200
            return
        for path in ROUTES:
            body = {"lora_name": "bot", "lora_path": str(adapters / "bot")}
            assert _call(eng, path, body) == (404, _error(404, "Not Found", "Not Found"))
        assert _adapters(eng) == {}


def test_runtime_load_answers_as_the_adapter_while_the_base_stays_plain(
    engine: FakeEngine, adapters: Path
) -> None:
    assert _load(engine, "support-bot", adapters / "bot") == (
        200,
        "Success: LoRA adapter 'support-bot' added successfully.",
    )
    try:
        client = OpenAI(base_url=f"{engine.url}/v1", api_key="x")
        reply = client.chat.completions.create(
            model="support-bot", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.model == "support-bot"
        text = "support-bot:tok0 support-bot:tok1 support-bot:tok2"
        assert reply.choices[0].message.content == text
        completion = client.completions.create(model="support-bot", prompt="a b")
        assert completion.model == "support-bot" and completion.choices[0].text == text
        assert _streamed_text(engine, "support-bot") == ({"support-bot"}, text)
        stream = client.chat.completions.create(
            model="support-bot", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = list(stream)
        assert {c.model for c in chunks} == {"support-bot"}
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
        embedded = client.embeddings.create(model="support-bot", input="x")
        assert embedded.model == "support-bot"

        base = client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "hi"}]
        )
        assert base.model == "smol" and base.choices[0].message.content == "tok0 tok1 tok2"
        assert _streamed_text(engine, "smol") == ({"smol"}, "tok0 tok1 tok2")
        cards = [c for c in _call(engine, "/v1/models")[1]["data"] if c["id"] == "support-bot"]
        assert [(c["root"], c["parent"]) for c in cards] == [(str(adapters / "bot"), "smol")]
        assert _adapters(engine) == {"support-bot": str(adapters / "bot")}
    finally:
        _call(engine, ROUTES[1], {"lora_name": "support-bot"})


def test_unload_then_the_adapter_name_gets_vllms_404(engine: FakeEngine, adapters: Path) -> None:
    before = _call(engine, "/fake/stats")[1]
    assert _load(engine, "gone", adapters / "bot")[0] == 200
    assert _chat(engine, "gone")[0] == 200
    assert _call(engine, ROUTES[1], {"lora_name": "gone"}) == (
        200,
        "Success: LoRA adapter 'gone' removed successfully.",
    )
    assert _chat(engine, "gone") == (
        404,
        _error(
            404, "The model `gone` does not exist. Valid aliases: smol.", "NotFoundError", "model"
        ),
    )
    assert "gone" not in [c["id"] for c in _call(engine, "/v1/models")[1]["data"]]
    assert _call(engine, ROUTES[1], {"lora_name": "gone"}) == (
        404,
        _error(404, "The lora adapter 'gone' cannot be found.", "NotFoundError"),
    )
    after = _call(engine, "/fake/stats")[1]
    assert after["lora_loads"] - before["lora_loads"] == 1
    assert after["lora_unloads"] - before["lora_unloads"] == 1


def _invalid(*errors: str, param: str | None) -> dict[str, Any]:
    """vLLM's answer to a body its request model refuses."""
    label = "error" if len(errors) == 1 else "errors"
    message = f"{len(errors)} validation {label}:\n" + "\n".join(f"  {e}" for e in errors)
    return _error(400, message, "Bad Request", param)


def _missing(field: str, items: int) -> str:
    return (
        f"{{'type': 'missing', 'loc': 'body.{field}', 'msg': 'Field required', "
        f"'input': '<dict of {items} items>'}}"
    )


INVALID_BODIES: list[tuple[str, bytes, dict[str, Any]]] = [
    (
        "no lora_path",
        b'{"lora_name": "x"}',
        _invalid(_missing("lora_path", 1), param="body.lora_path"),
    ),
    (
        "no fields",
        b"{}",
        _invalid(_missing("lora_name", 0), _missing("lora_path", 0), param="body.lora_name"),
    ),
    (
        "lora_name a number",
        b'{"lora_name": 5, "lora_path": "/p"}',
        _invalid(
            "{'type': 'string_type', 'loc': 'body.lora_name', "
            "'msg': 'Input should be a valid string', 'input': '5'}",
            param="body.lora_name",
        ),
    ),
    (
        "load_inplace not a boolean",
        b'{"lora_name": "x", "lora_path": "/p", "load_inplace": "maybe"}',
        _invalid(
            "{'type': 'bool_parsing', 'loc': 'body.load_inplace', 'msg': 'Input should be a "
            "valid boolean, unable to interpret input', 'input': 'maybe'}",
            param="body.load_inplace",
        ),
    ),
    (
        "a list",
        b"[1]",
        _invalid(
            "{'type': 'model_attributes_type', 'loc': 'body', 'msg': 'Input should be a valid "
            "dictionary or object to extract fields from', 'input': '<list of 1 items>'}",
            param="body",
        ),
    ),
    (
        "no body",
        b"",
        _invalid(
            "{'type': 'missing', 'loc': 'body', 'msg': 'Field required', 'input': 'None'}",
            param="body",
        ),
    ),
    (
        "broken JSON",
        b'{"lora_name": "a"',
        _invalid(
            "{'type': 'json_invalid', 'loc': 'body.17', 'msg': 'JSON decode error', 'input': "
            "'<dict of 0 items>', 'ctx': {'error': \"Expecting ',' delimiter\"}}",
            param="body.17",
        ),
    ),
    (
        "empty name and path",
        b'{"lora_name": "", "lora_path": ""}',
        _error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput"),
    ),
]


@pytest.mark.parametrize(
    ("case", "raw", "answer"), INVALID_BODIES, ids=[c[0] for c in INVALID_BODIES]
)
def test_malformed_load_requests_get_vllms_400(
    engine: FakeEngine, case: str, raw: bytes, answer: dict[str, Any]
) -> None:
    assert _call(engine, ROUTES[0], raw=raw) == (400, answer)
    assert _adapters(engine) == {}


def test_unload_requests_are_validated_as_vllm_does(engine: FakeEngine) -> None:
    assert _call(engine, ROUTES[1], raw=b"{}") == (
        400,
        _invalid(_missing("lora_name", 0), param="body.lora_name"),
    )
    assert _call(engine, ROUTES[1], {"lora_name": ""}) == (
        400,
        _error(
            400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput"
        ),
    )


def test_load_needs_a_json_content_type(engine: FakeEngine, adapters: Path) -> None:
    body = json.dumps({"lora_name": "x", "lora_path": str(adapters / "bot")}).encode()
    conn_status, answer = _post_as(engine, ROUTES[0], body, "text/plain")
    assert (conn_status, json.loads(answer)) == (
        400,
        _invalid("Unsupported Media Type: Only 'application/json' is allowed", param=None),
    )
    assert _adapters(engine) == {}


def _post_as(eng: FakeEngine, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", eng.port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def test_load_refusals_have_vllms_status_and_message(engine: FakeEngine, adapters: Path) -> None:
    # The rank, checked against --max-lora-rank (16 by default) when the adapter loads.
    assert _load(engine, "big", adapters / "big") == (
        500,
        _error(
            500,
            "Call to add_lora method failed: LoRA rank 64 is greater than max_lora_rank 16.",
            "InternalServerError",
        ),
    )
    # No adapter at the path, or a directory without adapter_config.json.
    assert _load(engine, "x", "no/such/adapter") == (
        404,
        _error(404, "Loading lora x failed: No adapter found for no/such/adapter", "NotFoundError"),
    )
    assert _load(engine, "x", f"{adapters}/empty")[1]["error"]["message"].startswith(
        "Loading lora x failed: No adapter found for "
    )
    # vLLM redacts paths under /tmp, /home, ... in every message.
    assert _load(engine, "x", "/tmp/vllm-fleet-no-such-adapter/x") == (
        404,
        _error(404, "Loading lora x failed: No adapter found for <path>", "NotFoundError"),
    )
    # A served base model's name.
    assert _load(engine, "smol", adapters / "bot") == (
        400,
        _error(
            400, "The lora adapter 'smol' conflicts with a served base model.", "InvalidUserInput"
        ),
    )
    assert _adapters(engine) == {}
    # The same name twice, unless load_inplace.
    assert _load(engine, "dup", adapters / "bot")[0] == 200
    try:
        assert _load(engine, "dup", adapters / "bot") == (
            400,
            _error(
                400,
                "The lora adapter 'dup' has already been loaded. If you want to load the "
                "adapter in place, set 'load_inplace' to True.",
                "InvalidUserInput",
            ),
        )
        assert _load(engine, "dup", adapters / "big", load_inplace=True)[0] == 500  # rank
        assert _adapters(engine) == {"dup": str(adapters / "bot")}
        write_adapter(adapters / "bot-v2", rank=16)
        assert _load(engine, "dup", adapters / "bot-v2", load_inplace=True) == (
            200,
            "Success: LoRA adapter 'dup' added successfully.",
        )
        assert _adapters(engine) == {"dup": str(adapters / "bot-v2")}
    finally:
        _call(engine, ROUTES[1], {"lora_name": "dup"})


def test_unreadable_adapter_configs_fail_as_in_vllms_worker(
    engine: FakeEngine, tmp_path: Path
) -> None:
    def refusal(config: Any) -> tuple[int, Any]:
        path = tmp_path / f"adapter-{len(list(tmp_path.iterdir()))}"
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps(config) if config is not None else "{")
        status, answer = _load(engine, "x", path)
        return status, answer["error"]["message"].removeprefix("Call to add_lora method failed: ")

    assert refusal({"r": 8, "lora_alpha": 16}) == (
        500,
        "Missing required configuration fields: {'target_modules'}",
    )
    assert refusal({"r": 0, "lora_alpha": 16, "target_modules": ["q_proj"]}) == (
        500,
        "LoRA rank `r` must be a positive integer, got 0.",
    )
    assert refusal({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "all"}) == (
        500,
        "Adapter bias is not supported.",
    )
    assert refusal(None) == (
        500,
        "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
    )
    assert _adapters(engine) == {}


def test_without_enable_lora_loads_fail_in_the_engine(adapters: Path) -> None:
    with FakeEngine(MODEL, ["smol"], env=RUNTIME) as eng:
        assert _load(eng, "bot", adapters / "bot") == (
            500,
            _error(
                500,
                "Call to add_lora method failed: LoRA is not enabled. Use --enable-lora to "
                "enable LoRA.",
                "InternalServerError",
            ),
        )
        assert _chat(eng, "bot")[0] == 404
        assert _call(eng, ROUTES[1], {"lora_name": "bot"})[0] == 404


def test_relative_paths_resolve_against_the_engines_working_directory(tmp_path: Path) -> None:
    write_adapter(tmp_path / "adapters" / "bot")
    port = free_port()
    argv = fake_vllm_argv(MODEL, port, "--served-model-name", "smol", "--enable-lora")
    argv += ["--lora-modules", "static=adapters/bot"]
    env = {**os.environ, **RUNTIME, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    try:
        wait_port(port, proc=proc)
        eng = FakeEngine(MODEL, port=port)
        assert _load(eng, "runtime", "adapters/bot")[0] == 200
        assert _load(eng, "elsewhere", "bot")[0] == 404  # not relative to adapters/
        cards = {c["id"]: c["root"] for c in _call(eng, "/v1/models")[1]["data"]}
        assert cards == {"smol": MODEL, "static": "adapters/bot", "runtime": "adapters/bot"}
        assert _chat(eng, "runtime")[1]["model"] == "runtime"
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


@pytest.mark.parametrize(
    ("flags", "code", "stderr"),
    [
        (
            ("--enable-lora", "--lora-modules", "bad=/tmp/vllm-fleet-no-such-adapter"),
            1,
            "ValueError: Loading lora bad failed: No adapter found for <path>",
        ),
        (
            ("--enable-lora", "--lora-modules", "big={big}"),
            1,
            "ValueError: Call to add_lora method failed: LoRA rank 64 is greater than "
            "max_lora_rank 16.",
        ),
        (
            ("--lora-modules", "bot={bot}"),
            1,
            "ValueError: Call to add_lora method failed: LoRA is not enabled. Use --enable-lora "
            "to enable LoRA.",
        ),
        (
            ("--enable-lora", "--lora-modules", "bot={bot}", "bot={bot}"),
            1,
            "ValueError: The lora adapter 'bot' has already been loaded.",
        ),
        (
            ("--enable-lora", "--lora-modules", '{"name": "x"}'),
            2,
            'Invalid fields for --lora-modules: {"name": "x"} - LoRAModulePath.__init__() '
            "missing 1 required positional argument: 'path'",
        ),
        (
            ("--enable-lora", "--lora-modules", "{nope"),
            2,
            "Invalid JSON format for --lora-modules: {nope",
        ),
        (
            ("--enable-lora", "--max-lora-rank", "12"),
            2,
            "argument --max-lora-rank: invalid choice: 12",
        ),
        (
            ("--enable-lora", "--max-loras", "2", "--max-cpu-loras", "1"),
            1,
            "max_cpu_loras (1) must be >= max_loras (2).",
        ),
    ],
    ids=[
        "missing",
        "rank",
        "not-enabled",
        "twice",
        "json-fields",
        "json",
        "rank-choice",
        "cpu-loras",
    ],
)
def test_bad_lora_flags_fail_the_start_as_vllm(
    adapters: Path, flags: tuple[str, ...], code: int, stderr: str
) -> None:
    argv = [
        f.replace("{big}", f"{adapters}/big").replace("{bot}", f"{adapters}/bot") for f in flags
    ]
    eng = FakeEngine(MODEL, ["smol"], *argv, wait=False).start()
    assert eng.proc is not None
    try:
        _, err = eng.proc.communicate(timeout=15)
        assert eng.proc.returncode == code
        assert stderr in err.decode()
        assert not port_open(eng.port)
    finally:
        eng.stop()
