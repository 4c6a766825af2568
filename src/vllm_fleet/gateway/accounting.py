"""What the gateway does once a request is answered: settle its key's limits, count its
tokens (the usage ledger, Prometheus by key name), write its access-log line.

`Accounting` lives as long as the gateway; the server (the edge) opens its files with
`reconfigure(config)` as it starts and on every reload, and its limiter's counters,
ledger and access log go on (a ledger or log whose path changed is reopened there).
Until then (a core made in a test), it counts limits and metrics and writes nothing.
`finished` runs on the event loop once per request, answered or cut off, and does no
I/O: the ledger batches in memory and the access log writes from a thread.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from vllm_fleet.config import FleetConfig
from vllm_fleet.gateway.limits import Limiter
from vllm_fleet.gateway.metrics import GatewayMetrics
from vllm_fleet.gateway.recent import Recent

if TYPE_CHECKING:
    from vllm_fleet.gateway.access_log import AccessLog
    from vllm_fleet.gateway.relay.request import Request
    from vllm_fleet.ledger import Ledger

CLIENT_CLOSED = 499  # nginx's status for a request the client left before its answer ended


class Accounting:
    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self.limiter = Limiter()
        self.recent = Recent()  # the last minutes of each deployment, for the status page
        self.ledger: Ledger | None = None
        self.access_log: AccessLog | None = None
        self._ledger_path: str | None = None
        self._log_path: str | None = None

    def reconfigure(self, config: FleetConfig) -> None:
        """The fleet file's ledger and access log, reopened where their paths changed."""
        gateway = config.gateway
        ledger_path = str(config.path_of(gateway.usage_db)) if gateway.usage_db else None
        if ledger_path != self._ledger_path:
            if self.ledger is not None:
                self.ledger.close()
            self.ledger = _open_ledger(ledger_path) if ledger_path else None
            self._ledger_path = ledger_path
        log_path = str(config.path_of(gateway.access_log)) if gateway.access_log else None
        if log_path != self._log_path:
            if self.access_log is not None:
                self.access_log.close()
            self.access_log = (
                _open_access_log(log_path, config.engines.log_max_bytes, config.engines.log_keep)
                if log_path
                else None
            )
            self._log_path = log_path

    def finished(self, request: Request, peer: bytes, cut: bool = False) -> None:
        """`request` was answered (`cut`: the client left before the answer ended)."""
        status = request.status
        meter = request.meter
        usage = meter.usage if meter is not None else None
        if cut and usage is None:
            # Left before the end. A stream whose usage event was read had ended for the
            # client (it may close as soon as it has `[DONE]`, before the engine's last
            # chunk reaches the gateway): that one is answered, not cut.
            status = CLIENT_CLOSED
        prompt, completion = usage or (0, 0)
        ticket = request.ticket
        now = time.monotonic()
        if ticket is not None:
            # No usage from an answer that began: charged as reserved (a client must not
            # get tokens free by leaving before the usage event).
            unknown = ticket.reserved if request.responded else 0
            ticket.settle(prompt + completion if usage is not None else unknown, now)
        client = request.client
        key = client.name if client is not None else None
        deployment = request.deployment
        # The ledger counts API requests (not the fleet's own endpoints): those that
        # reached a deployment, and those of a known key refused before one.
        if deployment and deployment != "-":  # an answer of a deployment, the gateway's own too
            # Time to first token: to a stream's first event (a whole answer's body comes
            # only once every token is made: no first token to time).
            first = request.first_body
            streamed = meter is not None and meter.sse
            ttft = first - request.began if first and streamed and status < 400 else None
            self.recent.add(deployment, status, ttft, completion, time.time())
        if self.ledger is not None and deployment and (deployment != "-" or key):
            self.ledger.record(key, deployment, prompt, completion, status >= 400)
        if key is not None and deployment:
            counts = self.metrics.key_requests
            at = (key, deployment or "-", status)
            counts[at] = counts.get(at, 0) + 1
            if usage is not None:
                tokens = self.metrics.key_tokens.setdefault((key, deployment or "-"), [0, 0])
                tokens[0] += prompt
                tokens[1] += completion
        if self.access_log is not None:
            self.access_log.write(_log_record(request, peer, status, usage, now))

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
        if self.access_log is not None:
            self.access_log.close()
            self.access_log = None


def _log_record(
    request: Request, peer: bytes, status: int, usage: tuple[int, int] | None, now: float
) -> dict[str, Any]:
    began = request.began
    first = request.first_byte
    client = request.client
    return {
        "time": round(time.time() - (now - began), 3),
        "key": client.name if client is not None else None,
        "deployment": request.deployment,
        "route": request.style,
        "method": request.method,
        "path": request.url.partition(b"?")[0].decode("latin-1")[:512],
        "status": status,
        "latency_ms": round((now - began) * 1e3, 2),
        "ttfb_ms": round((first - began) * 1e3, 2) if first else None,
        "prompt_tokens": usage[0] if usage is not None else None,
        "completion_tokens": usage[1] if usage is not None else None,
        "bytes_in": len(request.body),
        "bytes_out": request.bytes_out,
        "client": peer.decode("latin-1"),
        "request_id": request.request_id.decode("ascii"),
        "trace_id": request.trace_id(),
    }


def _open_ledger(path: str) -> Ledger:
    from pathlib import Path

    from vllm_fleet.ledger import Ledger

    return Ledger(Path(path))


def _open_access_log(path: str, max_bytes: int, keep: int) -> AccessLog:
    from pathlib import Path

    from vllm_fleet.gateway.access_log import AccessLog

    return AccessLog(Path(path), max_bytes, keep)
