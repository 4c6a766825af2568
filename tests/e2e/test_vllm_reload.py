"""On real vLLM: the CPU demo fleet (examples/cpu-demo.yaml, copied beside the test) is
reloaded with a third deployment, a second SmolLM2 engine with other args, while a stream
runs through `chat` and clients keep calling both deployments. The stream completes,
`chat` and `embed` keep their engine processes, the new deployment answers, and no
request fails. The reload's time and the requests made during it are printed (run with
`-s` to see them) and written to `reload-figures.json` in the test's folder.

Needs `make engines-env models`; skips without them, fails with FLEET_E2E_REQUIRED=1.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from openai import OpenAI

from tests.e2e.test_vllm_cpu import (
    DEMO_FILE,
    MESSAGES,
    Fleet,
    _stop,
    require_prerequisites,
    start_fleet,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1200)]

# Seconds between one client's requests, by deployment. Paced: on 2 cores, clients calling
# back to back (or the embed engine kept busy on the CPU the new engine is bound to)
# starve the new engine, which then loads for many minutes.
PACE = {"chat": 0.5, "embed": 2.0}
STREAM_TOKENS = 300

# The new deployment: the chat model again, with another context length and its own name.
SECOND = {
    "model": "${FLEET_MODELS:-../.cache/models}/smollm2-135m-instruct",
    "served_name": "smollm2-short",
    "env": {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "${FLEET_EMBED_CPUS:-1}",
        "HF_HUB_OFFLINE": "1",
    },
    "args": ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024"],
}


def test_a_reload_adds_a_deployment_while_a_stream_runs_and_nothing_else_moves(
    tmp_path: Path,
) -> None:
    require_prerequisites()
    path = tmp_path / "fleet.yaml"  # the demo file, beside which the new one is written
    path.write_text(DEMO_FILE.read_text())
    fleet, env = start_fleet(path, tmp_path)
    try:
        before = {u["name"]: u["pid"] for u in fleet.upstreams(fleet.status())}
        figures = _reload_under_load(fleet, path, env)
        after = {u["name"]: u["pid"] for u in fleet.upstreams(fleet.status())}
        assert after["chat-0"] == before["chat-0"], "chat's engine was restarted"
        assert after["embed-0"] == before["embed-0"], "embed's engine was restarted"
        assert after.get("chat2-0"), after
        reply = OpenAI(base_url=f"{fleet.base}/chat2/v1", api_key="x").chat.completions.create(
            model="anything", messages=MESSAGES, max_tokens=20, temperature=0
        )
        assert reply.model == "smollm2-short"
        assert (reply.choices[0].message.content or "").strip()
        figures["pids"] = {"before": before, "after": after}
        (tmp_path / "reload-figures.json").write_text(json.dumps(figures, indent=2))
        print("\nreal-vLLM reload figures:", json.dumps(figures))
        assert figures["failed"] == 0, figures
        # Every token of the stream arrived, the last ones while the reload ran.
        assert figures["stream_finish_reason"] == "length", figures
        assert figures["stream_tokens"] == STREAM_TOKENS, figures
        assert figures["stream_ended_s_after_reload_began"] > 0, figures
    except BaseException:
        print(fleet.tail())
        raise
    finally:
        _stop(fleet)


def _reload_under_load(fleet: Fleet, path: Path, env: dict[str, str]) -> dict[str, Any]:
    """Start a stream through chat and two clients calling chat and embed, reload with a
    third deployment, and count: the reload's time, requests made, requests failed."""
    client = OpenAI(base_url=f"{fleet.base}/v1", api_key="x", max_retries=0, timeout=120)
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}
    errors: list[str] = []
    stream_result: dict[str, Any] = {}
    began_at = [time.monotonic()]  # when the reload began (set below)

    def calls(dep: str) -> None:
        # Paced (a few requests a second): on 2 cores, clients calling back to back keep
        # both CPUs busy and the new engine would load for many minutes.
        while not stop.wait(PACE[dep]):
            try:
                if dep == "embed":
                    client.embeddings.create(model="embed", input="steady load")
                else:
                    client.chat.completions.create(
                        model=dep, messages=MESSAGES, max_tokens=8, temperature=0
                    )
                counts["ok"] += 1
            except Exception as exc:  # counted and shown: the goal is none
                counts["failed"] += 1
                errors.append(f"{dep}: {exc}")

    def stream() -> None:
        # vLLM's ignore_eos: every one of the tokens, so it runs well into the reload.
        pieces, finish, tokens = [], None, None
        for chunk in client.chat.completions.create(
            model="chat", messages=MESSAGES, max_tokens=STREAM_TOKENS, temperature=0,
            stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        ):  # fmt: skip
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        stream_result.update(
            finish=finish, chunks=len(pieces), tokens=tokens,
            ended=time.monotonic() - began_at[0],
        )  # fmt: skip

    latencies: list[float] = []

    def probe() -> None:  # how long the gateway takes to answer its own /health
        while not stop.wait(0.2):
            started = time.monotonic()
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{fleet.base}/health", timeout=60).read()
            latencies.append(time.monotonic() - started)

    workers = [threading.Thread(target=calls, args=(d,)) for d in ("chat", "embed")]
    workers.append(threading.Thread(target=probe))
    streamer = threading.Thread(target=stream)
    streamer.start()
    for worker in workers:
        worker.start()
    time.sleep(1.0)
    data = yaml.safe_load(path.read_text())
    data["deployments"]["chat2"] = SECOND
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    began = began_at[0] = time.monotonic()
    assert streamer.is_alive(), "the stream ended before the reload began"
    done = subprocess.run(
        [sys.executable, "-m", "vllm_fleet.cli", "reload", str(path), "--url", fleet.base],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    took = time.monotonic() - began
    stop.set()
    streamer.join(300)
    for worker in workers:
        worker.join(120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "chat: unchanged" in done.stdout and "embed: unchanged" in done.stdout
    assert "chat2-0: start (new deployment)" in done.stdout
    assert not streamer.is_alive(), "the stream through chat did not end"
    return {
        "reload_seconds": round(took, 1),
        "requests_during_reload": counts["ok"] + counts["failed"],
        "failed": counts["failed"],
        "errors": errors[:5],
        "gateway_health_ms": {
            "p50": round(1000 * sorted(latencies)[len(latencies) // 2], 1) if latencies else None,
            "max": round(1000 * max(latencies), 1) if latencies else None,
        },
        "stream_chunks": stream_result.get("chunks"),
        "stream_tokens": stream_result.get("tokens"),
        "stream_finish_reason": stream_result.get("finish"),
        "stream_ended_s_after_reload_began": round(stream_result.get("ended", -1.0), 1),
        "reload_output": done.stdout,
    }
