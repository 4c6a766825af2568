"""Pure: the few numbers the stall check reads from a vLLM engine's `/metrics`.

vLLM 0.32 (vllm/v1/metrics/loggers.py) exports, labelled `model_name` and `engine` (one
series per data-parallel engine core):

- `vllm:num_requests_running`: requests in the batch being computed (gauge);
- `vllm:num_requests_waiting`: requests queued for the batch (gauge);
- `vllm:generation_tokens_total`: tokens generated so far (counter);
- `vllm:prompt_tokens_total`: prompt tokens prefilled so far (counter; counted when a
  request's prefill ends). An embedding engine only ever moves this one.
- `vllm:kv_cache_usage_perc`: the share of KV-cache blocks in use, 0 to 1 (gauge).

`--disable-log-stats` turns them off; a command that is not vLLM has none of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
GENERATION_TOKENS = "vllm:generation_tokens_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
KV_CACHE = "vllm:kv_cache_usage_perc"
_WANTED = frozenset({RUNNING, WAITING, GENERATION_TOKENS, PROMPT_TOKENS, KV_CACHE})


@dataclass(frozen=True)
class EngineLoad:
    """One reading of an engine's /metrics, summed over its engine cores."""

    running: float
    waiting: float
    generation_tokens: float
    prompt_tokens: float
    kv_cache: float = 0.0  # the fullest engine core's share of KV-cache blocks in use

    @property
    def busy(self) -> bool:
        """Requests running or waiting: the engine owes someone tokens."""
        return self.running > 0 or self.waiting > 0

    @property
    def tokens(self) -> float:
        """Every token the engine has computed so far: what moves while it works."""
        return self.generation_tokens + self.prompt_tokens


def parse_load(text: str) -> EngineLoad | None:
    """The load in a Prometheus text page, or None when it lacks vLLM's request gauges
    or its token counter (not vLLM, `--disable-log-stats`) or cannot be parsed."""
    sums: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in _WANTED and not math.isnan(sample.value):
                    if sample.name == KV_CACHE:  # a share: the fullest core's
                        sums[KV_CACHE] = max(sums.get(KV_CACHE, 0.0), sample.value)
                    else:
                        sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    except ValueError:  # not the Prometheus text format
        return None
    if not {RUNNING, WAITING, GENERATION_TOKENS} <= sums.keys():
        return None
    return EngineLoad(
        running=sums[RUNNING],
        waiting=sums[WAITING],
        generation_tokens=sums[GENERATION_TOKENS],
        prompt_tokens=sums.get(PROMPT_TOKENS, 0.0),
        kv_cache=sums.get(KV_CACHE, 0.0),
    )
