"""Pure: what an on-demand deployment, or a swap group of them, does next.

The members of a swap group share GPUs, so at most one of them holds the GPUs at a time
(the holder: loaded). An on-demand deployment that shares nothing is a group of its own,
with no one to swap with. `next_step` looks at the members as they are now and says
what to do; the edge (`engines/demand.py`) does it, one step at a time per group (so one
swap at a time), and asks again.

- Requests wait for a member that is not loaded (unloaded, sleeping, or being unloaded
  to make room); the member whose oldest request has waited longest goes first.
- Free GPUs: it is loaded at once. Else the holder makes room, unless it is in use
  (requests in flight) and has held the GPUs for less than its `min_hold`: then the
  swap waits until its `min_hold` is up, so two members used in turn do not thrash.
- The holder that makes room is taken out of the rotation (its new requests queue like
  any other member's, behind the older ones), drained for up to its
  `swap_drain_timeout`, then slept or stopped; then the member asked for is loaded.
- A loaded member without requests for its `idle_timeout` is unloaded.
- A member whose load failed is not loaded again before `retry_at` (a broken model must
  not evict a working one on every request).

Also here: whether a level-1 sleep fits in host memory (`sleep_fits`), since level 1
copies the weights to the host's RAM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from vllm_fleet.registry import State, Upstream


class Phase(StrEnum):
    """An on-demand deployment's place in its group (what `/v1/models` shows)."""

    UNLOADED = "unloaded"  # no engine runs
    SLEEPING = "sleeping"  # engines asleep (vLLM sleep mode): woken in seconds
    LOADING = "loading"  # a cold start or a wake in progress
    LOADED = "loaded"  # holds the GPUs; routed to
    UNLOADING = "unloading"  # out of the rotation, draining, then slept or stopped
    FAILED = "failed"  # its last load failed


HOLDING = frozenset({Phase.LOADED, Phase.LOADING, Phase.UNLOADING})
# Engine states that hold the GPUs while the engine comes up (a start, a restart, a wake).
_COMING_UP = frozenset({State.STARTING, State.STOPPED, State.STALLED, State.STOPPING})


def phase_of(upstreams: Sequence[Upstream]) -> Phase:
    """A deployment's phase from its engines' states: loaded when one is ready."""
    states = {u.state for u in upstreams}
    if State.READY in states:
        return Phase.LOADED
    if State.UNLOADING in states:
        return Phase.UNLOADING
    if states & _COMING_UP:
        return Phase.LOADING
    if State.SLEEPING in states:
        return Phase.SLEEPING
    if State.FAILED in states or State.UNREACHABLE in states:
        return Phase.FAILED
    return Phase.UNLOADED


@dataclass(frozen=True)
class Member:
    """One member as `next_step` sees it (times are time.monotonic())."""

    deployment: str
    phase: Phase
    in_flight: int  # requests its engines are answering
    oldest_queued: float | None  # when its oldest waiting request came; None: none waits
    last_used: float  # the last time it had a request in flight (or was loaded)
    loaded_at: float  # when it last became loaded
    idle_timeout: float | None
    min_hold: float
    retry_at: float = 0.0  # after a failed load: not loaded again before this


@dataclass(frozen=True)
class Load:
    """Load `deployment` (cold start or wake), first making room by unloading `evict`
    (the holder; more than one only after a reload joined members that both ran)."""

    deployment: str
    evict: tuple[str, ...] = ()


@dataclass(frozen=True)
class Unload:
    deployment: str
    why: str


@dataclass(frozen=True)
class Wait:
    """Nothing to do before `until` (None: until something changes)."""

    until: float | None


Step = Load | Unload | Wait


def next_step(members: Sequence[Member], now: float) -> Step:
    """What the group does next (see the module docstring)."""
    waiting = sorted(
        (
            m
            for m in members
            if m.oldest_queued is not None and m.phase is not Phase.LOADED and m.retry_at <= now
        ),
        key=lambda m: (m.oldest_queued, m.deployment),
    )
    holders = [m for m in members if m.phase in HOLDING]
    if waiting:
        wanted = waiting[0]
        if wanted.phase in HOLDING:  # loading already (a restart), or draining
            return Wait(None)
        others = [m for m in holders if m.deployment != wanted.deployment]
        busy = [m.loaded_at + m.min_hold for m in others if m.in_flight > 0]
        if busy and now < max(busy):
            return Wait(max(busy))
        return Load(wanted.deployment, tuple(m.deployment for m in others))
    retries = [m.retry_at for m in members if m.oldest_queued is not None and m.retry_at > now]
    deadlines = [*retries]
    for member in holders:
        if member.phase is not Phase.LOADED or member.idle_timeout is None:
            continue
        if member.in_flight > 0:
            continue
        idle_until = member.last_used + member.idle_timeout
        if now >= idle_until:
            return Unload(member.deployment, f"idle for {member.idle_timeout:g}s")
        deadlines.append(idle_until)
    return Wait(min(deadlines) if deadlines else None)


def sleep_fits(weights: int | None, available: int | None) -> str | None:
    """None when a level-1 sleep can copy `weights` bytes into host memory with
    `available` bytes free (unknown sizes are given the benefit of the doubt), else why
    not, in words. A quarter of what is free is kept back for everything else."""
    if weights is None or available is None:
        return None
    if weights <= available * 0.75:
        return None
    return (
        f"its weights (~{weights / 2**30:.1f} GiB) would not fit in the host's free memory "
        f"({available / 2**30:.1f} GiB available) for a level-1 sleep; stopped instead "
        "(a cold start next time). Free host memory, or set `sleep: 2`"
    )
