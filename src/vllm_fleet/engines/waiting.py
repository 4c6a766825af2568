"""The waiting side of on-demand deployments, for `engines/demand.py`: a request waiting
for its deployment (`Waiter`), what is kept per deployment between steps (`Record`:
its queue, its clocks, the last thing worth saying), and the metrics of swaps and queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vllm_fleet.gateway.errors import Reply, error_reply

SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 600)

Resume = Callable[[Reply | None], None]


@dataclass(eq=False)
class Waiter:
    """One request waiting for its deployment to be loaded."""

    deployment: str
    since: float  # time.monotonic()
    resume: Resume
    queue: deque[Waiter] | None = None
    timer: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        """The client left: out of the queue, never resumed."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.queue is not None:
            with contextlib.suppress(ValueError):
                self.queue.remove(self)
            self.queue = None


@dataclass(eq=False)
class Record:
    """What the fleet keeps about one on-demand deployment between steps."""

    id: str
    queue: deque[Waiter] = field(default_factory=deque)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=time.monotonic)
    loaded_at: float = 0.0
    served: int = -1  # its engines' request count when last looked at
    retry_at: float = 0.0
    note: str = ""  # the last thing worth saying (a failed load, a sleep refused)
    last_load_s: float | None = None


class DemandMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        reg = registry if registry is not None else CollectorRegistry()
        self.swaps = Counter(
            "fleet_swaps", "engines loaded on demand, by swap group and kind (cold_start, wake)",
            ["group", "kind"], registry=reg,
        )  # fmt: skip
        self.swap_seconds = Histogram(
            "fleet_swap_seconds",
            "from the decision to swap (or load) to the engine ready: the holder's drain and "
            "unload, and the cold start or wake",
            ["group"], buckets=SECONDS_BUCKETS, registry=reg,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "fleet_queue_wait_seconds",
            "how long requests waited for their on-demand deployment to be loaded",
            ["deployment"], buckets=SECONDS_BUCKETS, registry=reg,
        )  # fmt: skip
        self.refused = Counter(
            "fleet_queue_refused",
            "requests for an on-demand deployment answered 503 by its queue, by reason "
            "(full, timeout, failed, stopping, removed)",
            ["deployment", "reason"], registry=reg,
        )  # fmt: skip
        self.queued = Gauge(
            "fleet_queued_requests",
            "requests waiting for their on-demand deployment to be loaded",
            ["deployment"], registry=reg,
        )  # fmt: skip


def refusal(message: str, code: str, retry_after: float) -> Reply:
    """A queue's 503, with Retry-After in whole seconds (at least 1)."""
    seconds = max(1, int(retry_after + 0.999))
    return error_reply(503, message, code, headers={"Retry-After": str(seconds)})
