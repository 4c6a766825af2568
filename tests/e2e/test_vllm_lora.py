"""On real vLLM: LoRA adapters as fleet deployments. The CPU demo's SmolLM2 (`chat`) is the
base; `support-bot` is a PEFT adapter on it, made here (tests/e2e/lora_adapter.py, run
with the engines' python). The fleet starts the base with LoRA enabled and loads the
adapter at run time before the base counts as ready; then, at temperature 0:

- the adapter answers on all three route styles (path, Azure, plain `/v1` with `model`)
  with the same text, which is peft's own greedy answer with that adapter and not the
  base's, and the response's `model` is the adapter's deployment name;
- the gateway's `/v1/models` lists the adapter with `parent` = the base deployment;
- a reload that adds `second-bot` (another seed) serves it without restarting the base;
  a reload that removes `support-bot` makes it 404 (and unloads it from the engine) while
  `chat` and `second-bot` keep answering as before.

Requests are made one at a time, never concurrently: vLLM 0.32's CPU LoRA kernels apply
the adapter in the last LoRA slot to base-model requests batched together with adapter
requests (vllm-project/vllm PRs #48421, #49656), which would change `chat`'s answer.

Timings are printed (run with `-s`) and written to `lora-figures.json` in the test's
folder. Needs `make engines-env models` (peft is in the engines' pins); skips without
them, fails with FLEET_E2E_REQUIRED=1.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
import yaml
from openai import AzureOpenAI, NotFoundError, OpenAI

from tests.conftest import free_port, wait_until
from tests.e2e.test_vllm_cpu import (
    DEMO_FILE,
    ENGINE_PYTHON,
    MESSAGES,
    MODELS,
    READY_TIMEOUT,
    REPO,
    Fleet,
    _stop,
    demo_env,
    http,
    require_prerequisites,
    two_server_ports,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1500)]

# ---- The fleet side's names (the LoRA-deployments feature): adjust here if they change.
ADAPTER_KEY = "adapter"  # a deployment's PEFT adapter folder (or Hugging Face id)
BASE_KEY = "base"  # the deployment whose engine serves the adapter
PARENT_FIELD = "parent"  # the gateway's /v1/models card: the base deployment's name
BASE = "chat"
FIRST = "support-bot"
SECOND = "second-bot"
SEEDS = {FIRST: 0, SECOND: 1}  # tests/e2e/lora_adapter.py --seed, per adapter
RANK = 8

CHAT_MODEL = MODELS / "smollm2-135m-instruct"
ADAPTER_MAKER = Path(__file__).with_name("lora_adapter.py")
REFERENCE = Path(__file__).with_name("reference_answer.py")
MAX_TOKENS = 30  # the adapters' answers differ from the base's (and each other's) by then
DTYPE = "float32"  # the demo's chat engine's --dtype
ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


class LoraFleet(Fleet):
    """`Fleet`, for a status where an adapter deployment may list no upstreams."""

    @staticmethod
    def upstreams(status: dict[str, Any]) -> list[dict[str, Any]]:
        return [u for dep in status["deployments"].values() for u in dep.get("upstreams", [])]


def adapter_deployment(folder: Path) -> dict[str, Any]:
    return {ADAPTER_KEY: str(folder), BASE_KEY: BASE}


def lora_file(path: Path, adapters: dict[str, Path]) -> None:
    """The CPU demo's `chat` alone (no embed: two cores) with these adapter deployments."""
    demo = yaml.safe_load(DEMO_FILE.read_text())
    deployments: dict[str, Any] = {BASE: demo["deployments"][BASE]}
    assert "2048" in deployments[BASE]["args"], deployments[BASE]  # --max-model-len 2048
    for name, folder in adapters.items():
        deployments[name] = adapter_deployment(folder)
    demo["deployments"] = deployments
    path.write_text(yaml.safe_dump(demo, sort_keys=False))


def require_peft() -> None:
    """Skip (fail with FLEET_E2E_REQUIRED=1) when the engines' python has no peft: an
    engines' environment made before peft was pinned (`make engines-env` remakes it)."""
    found = subprocess.run(
        [str(ENGINE_PYTHON), "-c", "import importlib.util as u; exit(u.find_spec('peft') is None)"],
        capture_output=True,
        timeout=60,
    )
    if found.returncode != 0:
        reason = f"the LoRA e2e test needs peft in {ENGINE_PYTHON} (run `make engines-env`)"
        if os.environ.get("FLEET_E2E_REQUIRED") == "1":
            pytest.fail(reason + " (FLEET_E2E_REQUIRED=1)")
        pytest.skip(reason)


def make_adapter(out: Path, seed: int) -> float:
    """tests/e2e/lora_adapter.py with the engines' python; the seconds it took."""
    began = time.monotonic()
    done = subprocess.run(
        [str(ENGINE_PYTHON), str(ADAPTER_MAKER), "--model", str(CHAT_MODEL), "--out", str(out),
         "--rank", str(RANK), "--seed", str(seed)],
        capture_output=True, text=True, timeout=300, env=os.environ | ENGINE_ENV,
    )  # fmt: skip
    assert done.returncode == 0, f"lora_adapter.py failed:\n{done.stderr[-3000:]}"
    assert (out / "adapter_config.json").is_file(), done.stdout
    return time.monotonic() - began


def peft_answer(adapter: Path | None) -> str:
    """transformers' (and peft's, with `adapter`) greedy answer to MESSAGES on this machine."""
    args = [str(ENGINE_PYTHON), str(REFERENCE), str(CHAT_MODEL), str(MAX_TOKENS), DTYPE]
    done = subprocess.run(
        args + ([str(adapter)] if adapter else []),
        input=json.dumps(MESSAGES), capture_output=True, text=True, timeout=300,
        env=os.environ | ENGINE_ENV,
    )  # fmt: skip
    assert done.returncode == 0, f"reference_answer.py failed:\n{done.stderr[-3000:]}"
    text: str = json.loads(done.stdout.strip().splitlines()[-1])["text"]
    return text


def start_lora_fleet(path: Path, workdir: Path) -> tuple[LoraFleet, dict[str, str], float]:
    """`fleet up path`, waited for until the base's engine is ready (which, with adapters,
    means they are loaded); the fleet, its environment, the seconds to ready."""
    port = free_port()
    env = demo_env(workdir, two_server_ports())
    output = workdir / "fleet-up.out"
    began = time.monotonic()
    with output.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_fleet.cli", "up", str(path), "--port", str(port)],
            cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    fleet = LoraFleet(base=f"http://127.0.0.1:{port}", proc=proc, output=output)

    def base_ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"`fleet up` exited with {proc.returncode}:\n{fleet.tail()}")
        try:
            ups = fleet.status()["deployments"][BASE]["upstreams"]
        except (OSError, AssertionError):
            return False  # the gateway is not listening yet
        if any(u["state"] == "failed" for u in ups):
            raise AssertionError(f"{BASE} failed to start:\n{fleet.tail()}")
        return bool(ups) and all(u["state"] == "ready" for u in ups)

    try:
        wait_until(base_ready, timeout=READY_TIMEOUT, interval=1.0, what=f"{BASE} ready")
    except BaseException as exc:
        tail = fleet.tail()
        with contextlib.suppress(AssertionError):
            _stop(fleet)
        if isinstance(exc, TimeoutError):
            pytest.fail(f"{BASE} not ready within {READY_TIMEOUT:.0f}s:\n{tail}")
        raise
    return fleet, env, time.monotonic() - began


def reload(fleet: Fleet, path: Path, env: dict[str, str]) -> tuple[float, str]:
    """`fleet reload --wait path`: returns once the reload is applied (adapters loaded and
    unloaded); the seconds it took and its output."""
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "vllm_fleet.cli", "reload", str(path), "--url", fleet.base,
         "--wait"],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return time.monotonic() - began, done.stdout


def chat(client: OpenAI, model: str = "anything") -> tuple[str, str]:
    """(the response's model, its text) of one greedy chat."""
    reply = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0
    )
    text = reply.choices[0].message.content or ""
    assert text.strip(), reply
    return reply.model, text


def path_client(fleet: Fleet, dep: str) -> OpenAI:
    return OpenAI(base_url=f"{fleet.base}/{dep}/v1", api_key="unused", max_retries=0)


def every_route(fleet: Fleet, dep: str) -> dict[str, tuple[str, str]]:
    """(model, text) of the same greedy chat to `dep` on each of the three route styles."""
    azure = AzureOpenAI(
        azure_endpoint=fleet.base, azure_deployment=dep, api_version="2024-06-01",
        api_key="unused", max_retries=0,
    )  # fmt: skip
    plain = OpenAI(base_url=f"{fleet.base}/v1", api_key="unused", max_retries=0)
    return {
        "path": chat(path_client(fleet, dep)),
        "azure": chat(azure, "not-a-model-anyone-serves"),
        "v1": chat(plain, dep),
    }


def gateway_models(fleet: Fleet) -> dict[str, dict[str, Any]]:
    code, _, body = http("GET", f"{fleet.base}/v1/models")
    assert code == 200, body
    return {card["id"]: card for card in json.loads(body)["data"]}


def engine_models(upstream: dict[str, Any]) -> set[str]:
    """The names the base's vLLM itself serves (its adapters included), asked directly."""
    url: str = upstream["url"]
    if not url.startswith("unix:"):
        code, _, body = http("GET", f"{url}/v1/models")
        assert code == 200, body
        return {card["id"] for card in json.loads(body)["data"]}
    conn = HTTPConnection("localhost", timeout=10)
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.sock.connect(url.removeprefix("unix:"))
    try:
        conn.request("GET", "/v1/models")
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, body
    finally:
        conn.close()
    return {card["id"] for card in json.loads(body)["data"]}


def test_lora_adapters_as_deployments_answer_reload_and_leave(tmp_path: Path) -> None:
    require_prerequisites()
    require_peft()
    figures: dict[str, Any] = {}
    folders = {name: tmp_path / "adapters" / name for name in SEEDS}
    figures["make_adapter_s"] = {n: round(make_adapter(folders[n], SEEDS[n]), 1) for n in SEEDS}
    reference = {BASE: peft_answer(None)} | {n: peft_answer(folders[n]) for n in SEEDS}
    assert len(set(reference.values())) == 3, f"the adapters are too weak: {reference}"

    path = tmp_path / "fleet.yaml"
    lora_file(path, {FIRST: folders[FIRST]})
    fleet, env, ready_s = start_lora_fleet(path, tmp_path)
    figures["fleet_up_to_ready_s"] = round(ready_s, 1)
    try:
        base_pid = fleet.upstream(BASE)["pid"]
        base_model, base_text = chat(path_client(fleet, BASE))
        assert base_text.strip() == reference[BASE].strip(), (base_text, reference[BASE])

        # The adapter on every route style: its own answer (peft's), not the base's.
        began = time.monotonic()
        answers = every_route(fleet, FIRST)
        figures["three_adapter_chats_s"] = round(time.monotonic() - began, 1)
        for route, (model, text) in answers.items():
            assert model == FIRST, (route, model)
            assert text.strip() == reference[FIRST].strip(), (route, text, reference[FIRST])
            assert text != base_text, route
        cards = gateway_models(fleet)
        assert cards[FIRST][PARENT_FIELD] == BASE, cards[FIRST]
        assert FIRST in engine_models(fleet.upstream(BASE))

        # A reload adds a second adapter: served by the same engine, not restarted.
        lora_file(path, {FIRST: folders[FIRST], SECOND: folders[SECOND]})
        took, output = reload(fleet, path, env)
        figures["reload_add_s"] = round(took, 1)
        figures["reload_add_output"] = output
        assert fleet.upstream(BASE)["pid"] == base_pid, "the base's engine was restarted"
        model, second_text = chat(path_client(fleet, SECOND))
        assert model == SECOND, model
        assert second_text.strip() == reference[SECOND].strip(), (second_text, reference)
        assert gateway_models(fleet)[SECOND][PARENT_FIELD] == BASE
        assert chat(path_client(fleet, FIRST)) == (FIRST, answers["path"][1])

        # A reload removes the first: 404 on the gateway, unloaded from the engine.
        lora_file(path, {SECOND: folders[SECOND]})
        took, output = reload(fleet, path, env)
        figures["reload_remove_s"] = round(took, 1)
        figures["reload_remove_output"] = output
        upstream = fleet.upstream(BASE)
        assert upstream["pid"] == base_pid, "the base's engine was restarted"
        code, _, body = http(
            "POST",
            f"{fleet.base}/{FIRST}/v1/chat/completions",
            {"messages": MESSAGES, "max_tokens": 5},
        )
        assert code == 404, body
        with pytest.raises(NotFoundError):
            chat(OpenAI(base_url=f"{fleet.base}/v1", api_key="unused", max_retries=0), FIRST)
        assert FIRST not in gateway_models(fleet)
        assert FIRST not in engine_models(upstream)
        assert chat(path_client(fleet, SECOND)) == (SECOND, second_text)
        assert chat(path_client(fleet, BASE)) == (base_model, base_text)

        (tmp_path / "lora-figures.json").write_text(json.dumps(figures, indent=2))
        print("\nreal-vLLM LoRA figures:", json.dumps(figures))
    except BaseException:
        print(fleet.tail())
        raise
    finally:
        _stop(fleet)
