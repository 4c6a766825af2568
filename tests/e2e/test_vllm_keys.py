"""On real vLLM: the CPU demo fleet with one key per deployment and an admin key. Each key
reaches its own deployment and is refused the other's; the usage ledger's rows equal the
`usage` vLLM reported, for streams (whether or not the client asked for usage: one that did
not never sees the usage chunk) and for embeddings.

Needs `make engines-env models`; skips without them, fails with FLEET_E2E_REQUIRED=1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.e2e.test_vllm_cpu import (
    CHAT_NAME,
    DEMO_FILE,
    MESSAGES,
    _stop,
    http,
    require_prerequisites,
    start_fleet,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

KEYS = {"chat-team": "sk-e2e-chat", "embed-team": "sk-e2e-embed", "ops": "sk-e2e-ops"}


def test_one_key_per_deployment_and_usage_equal_to_vllms(tmp_path: Path) -> None:
    require_prerequisites()
    demo = yaml.safe_load(DEMO_FILE.read_text())
    demo["gateway"]["keys"] = [
        {"name": "chat-team", "key": KEYS["chat-team"], "deployments": ["chat"]},
        {"name": "embed-team", "key": KEYS["embed-team"], "deployments": ["embed"]},
        {"name": "ops", "key": KEYS["ops"], "admin": True},
    ]
    demo["gateway"]["usage_db"] = str(tmp_path / "usage.db")
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(demo, sort_keys=False))
    fleet, _ = start_fleet(path, tmp_path, api_key=KEYS["ops"])
    try:
        _check(fleet.base)
    except BaseException:
        print(fleet.tail())
        raise
    finally:
        _stop(fleet)


def _check(base: str) -> None:
    chat = openai.OpenAI(base_url=f"{base}/v1", api_key=KEYS["chat-team"], max_retries=0)
    embed = openai.OpenAI(base_url=f"{base}/v1", api_key=KEYS["embed-team"], max_retries=0)
    # Allowed and refused, both ways.
    with pytest.raises(openai.PermissionDeniedError):
        chat.embeddings.create(model="embed", input="x")
    with pytest.raises(openai.PermissionDeniedError):
        embed.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=2)
    assert [m.id for m in chat.models.list()] == ["chat"]

    ask: dict[str, Any] = {"model": "chat", "messages": MESSAGES, "temperature": 0}
    plain = chat.chat.completions.create(**ask, max_tokens=12)
    assert plain.model == CHAT_NAME and plain.usage is not None
    expected = [plain.usage.prompt_tokens, plain.usage.completion_tokens]
    # The same greedy stream twice: once asking for usage (vLLM's own numbers, seen),
    # once not (the gateway asks vLLM for them, counts them, and drops the chunk).
    seen = list(
        chat.chat.completions.create(
            **ask, max_tokens=16, stream=True, stream_options={"include_usage": True}
        )
    )
    usage = seen[-1].usage
    assert usage is not None and seen[-1].choices == []
    unseen = list(chat.chat.completions.create(**ask, max_tokens=16, stream=True))
    assert unseen and all(c.usage is None for c in unseen)
    text = lambda chunks: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # noqa: E731
    assert text(unseen) == text(seen)  # the same answer: the same usage
    expected[0] += 2 * usage.prompt_tokens
    expected[1] += 2 * usage.completion_tokens

    vectors = embed.embeddings.create(model="embed", input="usage of an embedding")
    embed_prompt = vectors.usage.prompt_tokens
    assert embed_prompt > 0

    code, _, body = http("GET", f"{base}/fleet/usage?by=both", api_key=KEYS["ops"])
    assert code == 200, body
    rows = {(r["key"], r["deployment"]): r for r in json.loads(body)["rows"]}
    served = rows[("chat-team", "chat")]
    assert (served["requests"], served["errors"]) == (3, 0)
    assert [served["prompt_tokens"], served["completion_tokens"]] == expected
    embedded = rows[("embed-team", "embed")]
    assert (embedded["prompt_tokens"], embedded["completion_tokens"]) == (embed_prompt, 0)
    # The refusals are counted as errors of the key that was refused.
    assert rows[("chat-team", "embed")]["errors"] == 1
    assert rows[("embed-team", "chat")]["errors"] == 1
    code, _, _ = http("GET", f"{base}/fleet/usage", api_key=KEYS["chat-team"])
    assert code == 403
