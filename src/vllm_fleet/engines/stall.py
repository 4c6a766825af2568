"""Pure: is a ready engine stalled? Readings of its /metrics in, a verdict out.

vLLM's API server keeps answering `GET /health` with 200 while its engine core is
deadlocked (vLLM #39863: throughput 0, requests piling up in the waiting queue), so the
health check cannot see it. Progress can: an engine that has requests (running or
waiting) computes tokens, and its token counters move. The rule:

- the engine is idle (nothing running or waiting): not stalled, the clock restarts;
- its token count moved since the last reading (up, or down after a restart of its
  counters): not stalled, the clock restarts;
- it is busy and the count has not moved for `timeout` seconds: stalled.

The clock starts at the last reading that showed progress or idleness, so a request
that just arrived is timed from the reading before it (at most one interval early).
A prefill counts its prompt tokens only when it ends: `timeout` must exceed the
longest prefill the engine may run, hence its generous default (120 s).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_fleet.engines.vllm_metrics import EngineLoad


@dataclass(frozen=True)
class Progress:
    """What the decision remembers between readings (start with `Progress()`)."""

    tokens: float | None = None
    since: float | None = None  # when the engine last moved or was idle (monotonic s)


@dataclass(frozen=True)
class Verdict:
    progress: Progress  # to pass with the next reading
    stalled_for: float  # seconds busy without a token (0 while progressing or idle)
    reason: str | None  # set when stalled: what `fleet status` and the log show

    @property
    def stalled(self) -> bool:
        return self.reason is not None


def judge(progress: Progress, load: EngineLoad, now: float, timeout: float) -> Verdict:
    """The verdict on one reading taken at `now` (monotonic seconds)."""
    moved = progress.tokens is None or load.tokens != progress.tokens
    if moved or not load.busy or progress.since is None:
        return Verdict(Progress(load.tokens, now), 0.0, None)
    stalled_for = now - progress.since
    if stalled_for < timeout:
        return Verdict(progress, stalled_for, None)
    reason = (
        f"stalled: {load.running:g} request(s) running and {load.waiting:g} waiting, but no "
        f"token computed for {stalled_for:.0f}s (stall_timeout {timeout:g}s) while "
        "/health still answered 200"
    )
    return Verdict(progress, stalled_for, reason)
