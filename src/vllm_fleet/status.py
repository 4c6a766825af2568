"""`fleet status`: fetch a running gateway's `/fleet/status` and render it as a table."""

from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

STATE_STYLES = {
    "ready": "green",
    "starting": "yellow",
    "stopping": "yellow",
    "stopped": "dim",
    "failed": "bold red",
    "unreachable": "red",
    "stalled": "bold red",
    "unloaded": "dim",
    "unloading": "yellow",
    "sleeping": "cyan",
}


class StatusError(Exception):
    """The gateway could not be asked; the message says what to check."""


@dataclass(frozen=True)
class Trust:
    """What an https gateway's certificate is checked against, besides the system's CAs
    (and `SSL_CERT_FILE`): `--cacert FILE`, and the fleet file's own `gateway.tls.cert`
    (trusted as it stands) when the command was given the fleet file."""

    cacert: Path | None = None
    pinned: Path | None = None

    def context(self) -> ssl.SSLContext:
        from vllm_fleet.gateway.tls import client_context

        try:
            return client_context(self.cacert, self.pinned)
        except (OSError, ssl.SSLError) as exc:
            which = f"--cacert {self.cacert}" if self.cacert else f"gateway.tls.cert {self.pinned}"
            raise StatusError(f"cannot read {which} as PEM certificates: {exc}") from None


def ask_gateway(
    url: str,
    path: str,
    api_key: str | None,
    timeout: float,
    body: dict[str, Any] | None = None,
    unreachable_hint: str = "",
    trust: Trust | None = None,
) -> tuple[int, dict[str, Any]]:
    """GET (or POST `body` to) {url}{path}: the status and the JSON object it answered,
    error statuses included; StatusError when there is no gateway or no JSON object.
    An https URL is verified against `trust` (and the system's CAs)."""
    target = url.rstrip("/") + path
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(target, data=data, headers=headers)
    https = target.lower().startswith("https:")
    context = (trust or Trust()).context() if https else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise StatusError(
                f"the gateway at {url} has a certificate this machine does not trust "
                f"({reason.verify_message}); pass the fleet file (its gateway.tls.cert is "
                "trusted), --cacert CA.pem, or SSL_CERT_FILE"
            ) from None
        if isinstance(reason, ssl.SSLError):
            raise StatusError(
                f"no TLS at {url} ({reason}); is the gateway serving https (gateway.tls)? "
                "Use an http:// URL for one without"
            ) from None
        if not https and isinstance(reason, ConnectionResetError | http.client.HTTPException):
            # What a TLS socket does to plain HTTP: the handshake fails, the line drops.
            unreachable_hint += "; a gateway with gateway.tls answers https:// only"
        raise StatusError(
            f"no gateway at {url} ({reason}); is `fleet up` running there? "
            f"Pass the fleet file or --url{unreachable_hint}"
        ) from None
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise StatusError(
            f"{target} answered {status} without a JSON object; is this a vllm-fleet gateway?"
        )
    return status, answer


def fetch_status(
    url: str, api_key: str | None = None, timeout: float = 5.0, trust: Trust | None = None
) -> dict[str, Any]:
    """GET {url}/fleet/status and return the decoded JSON."""
    status, data = ask_gateway(url, "/fleet/status", api_key, timeout, trust=trust)
    if status != 200:
        hint = " (pass --api-key, or the fleet file)" if status == 401 else ""
        raise StatusError(f"{url.rstrip('/')}/fleet/status answered {status}{hint}")
    if not isinstance(data.get("deployments"), dict):
        raise StatusError(f"{url.rstrip('/')}/fleet/status answered JSON without `deployments`")
    return data


def _age(since: Any, now: float) -> str:
    if not isinstance(since, int | float):
        return ""
    seconds = max(0, int(now - since))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def render_status(data: dict[str, Any], now: float | None = None) -> Group:
    """One row per upstream, then a note under the table for each one not ready or
    ejected by the gateway (its message and log file), and for each ready one that was
    restarted (why, and when)."""
    now = time.time() if now is None else now
    table = Table(header_style="bold")
    for column in ("deployment", "engine", "state", "for", "pid", "listens", "GPUs"):
        table.add_column(column, overflow="fold")
    table.add_column("restarts", justify="right")
    table.add_column("busy", justify="right")
    notes: list[Text] = []
    for dep_id, dep in data["deployments"].items():
        label = Text(dep_id, style="bold")
        label.append(f" {dep.get('ready', 0)}/{dep.get('replicas', 0)}", style="dim")
        for index, up in enumerate(dep.get("upstreams", [])):
            state = str(up.get("state", "?"))
            gpus = up.get("gpus")
            managed = up.get("managed", True)
            ejected = up.get("ejected")
            shown = Text(state, style=STATE_STYLES.get(state, ""))
            if ejected:
                shown = Text(f"{state}, ejected", style="yellow")
            table.add_row(
                label if index == 0 else "",
                str(up.get("name", "")),
                shown,
                _age(up.get("since"), now),
                str(up.get("pid") or "-"),
                str(up.get("socket") or up.get("port") or "-") if managed else "remote",
                ",".join(map(str, gpus)) if isinstance(gpus, list) else "-",
                str(up.get("restarts", 0)),
                str(up.get("outstanding", 0)),
            )
            if state in ("unloaded", "sleeping"):
                pass  # on demand: said once per deployment below the table
            elif state != "ready" or not managed or ejected:
                note = Text(f"{up.get('name', '')}: ", style="bold")
                if ejected:
                    note.append(f"out of the rotation until a health check passes: {ejected}")
                else:
                    note.append(str(up.get("message") or state))
                if not managed:
                    note.append(f" (remote {up.get('url', '')})")
                elif up.get("log"):
                    note.append(f"\n  log: {up['log']}", style="dim")
                notes.append(note)
            elif up.get("last_failure"):
                note = Text(f"{up.get('name', '')}: ", style="bold")
                note.append(f"ready; last restarted after: {up['last_failure']}")
                ago = _age(up.get("last_failure_at"), now)
                note.append(f" ({ago} ago)" if ago else "", style="dim")
                notes.append(note)
    for key, doing in (("standby", "replacing the engine of that name, not routed to yet"),
                       ("retiring", "out of routing, draining, then stopped")):  # fmt: skip
        for up in data.get(key) or []:
            note = Text(f"{up.get('name', '')} ({key}): ", style="bold")
            busy = up.get("outstanding", 0)
            note.append(f"{doing}; {up.get('state', '?')}, pid {up.get('pid') or '-'}")
            note.append(f", {busy} request(s) in flight" if busy else "")
            notes.append(note)
    head = _fleet_line(data.get("fleet"), now)
    adapters = _adapter_lines(data.get("adapters"))
    routing = _routing_lines(data.get("routing"))
    demand = _on_demand_lines(data.get("on_demand"), now)
    return Group(*head, table, *notes, *adapters, *routing, *demand)


# What each policy's counters mean, in the order shown.
_ROUTING_WORDS = {
    "hits": "to the replica holding its prefix",
    "spills": "elsewhere, that one over the load bound",
    "misses": "no prefix seen before",
    "kept": "to its session's replica",
    "unkeyed": "no session",
}


def _routing_lines(data: Any) -> list[Text]:
    """Each deployment routed by another policy than least outstanding, with what its
    requests met (`prefix`: hits, spills, misses)."""
    if not isinstance(data, dict) or not data:
        return []
    out = [Text("routing", style="bold")]
    for dep_id, stats in data.items():
        if not isinstance(stats, dict):
            continue
        line = Text(f"  {dep_id}", style="bold")
        line.append(f": {stats.get('policy', '?')}")
        counts = [f"{stats[key]} {words}" for key, words in _ROUTING_WORDS.items() if key in stats]
        if counts:
            line.append(f" ({'; '.join(counts)})", style="dim")
        out.append(line)
    return out


def _adapter_lines(data: Any) -> list[Text]:
    """Each LoRA adapter: its base, on how many of the base's engines it is loaded, and
    every failed load with vLLM's message."""
    if not isinstance(data, dict) or not data:
        return []
    out = [Text("adapters (LoRA)", style="bold")]
    for a_id, adapter in data.items():
        ready, replicas = adapter.get("ready", 0), adapter.get("replicas", 0)
        line = Text(f"  {a_id}", style="bold")
        line.append(f" on {adapter.get('base', '?')}: ")
        line.append(f"loaded {ready}/{replicas}", style="green" if ready else "yellow")
        line.append(f" ({adapter.get('adapter', '')})", style="dim")
        for engine, state in (adapter.get("engines") or {}).items():
            if str(state).startswith("failed"):
                line.append(f"\n    {engine}: {state}", style="red")
        out.append(line)
    return out


def _on_demand_lines(data: Any, now: float) -> list[Text]:
    """Swap groups (holder, queue, last swap) and each on-demand deployment's state."""
    if not isinstance(data, dict) or not (data.get("deployments") or data.get("groups")):
        return []
    out = [Text("on demand", style="bold")]
    for name, group in (data.get("groups") or {}).items():
        gpus = ",".join(map(str, group.get("gpus") or []))
        line = Text(f"  swap group {name} ", style="bold")
        where = f"(GPUs {gpus})" if gpus else "(no GPUs)"
        line.append(f"{where}: {', '.join(group.get('members') or [])}; holder ")
        line.append(str(group.get("holder") or "none"), style="green")
        line.append(f"; {group.get('queued', 0)} queued; {group.get('swaps', 0)} swap(s)")
        last = group.get("last_swap")
        if isinstance(last, dict):
            took = last.get("seconds")
            line.append(
                f"; last: {', '.join(last.get('from') or []) or 'nothing'} -> {last.get('to')} "
                f"({str(last.get('kind')).replace('_', ' ')}, {took}s, "
                f"{_age(last.get('at'), now)} ago)",
                style="dim",
            )
            if last.get("failed"):
                line.append(f" failed: {last['failed']}", style="red")
        out.append(line)
    for dep_id, dep in (data.get("deployments") or {}).items():
        state = str(dep.get("state", "?"))
        line = Text(f"  {dep_id}: ")
        line.append(state, style=STATE_STYLES.get(state, "green" if state == "loaded" else ""))
        if dep.get("queued"):
            line.append(f", {dep['queued']} queued (oldest {dep.get('oldest_wait_s')}s)")
        idle = dep.get("idle_timeout")
        line.append(
            f"; idle {dep.get('idle_s')}s" + (f" of {idle:g}s" if idle else " (no idle_timeout)"),
            style="dim",
        )
        if dep.get("last_load_s") is not None:
            line.append(f"; last load {dep['last_load_s']}s", style="dim")
        if dep.get("note"):
            line.append(f"\n    {dep['note']}", style="yellow")
        out.append(line)
    return out


def _fleet_line(fleet: Any, now: float) -> list[Text]:
    """The fleet file, its generation, and the last reload (with what failed)."""
    if not isinstance(fleet, dict):
        return []
    line = Text(f"fleet file {fleet.get('file', '?')}", style="bold")
    line.append(f"  generation {fleet.get('generation', '?')}")
    if fleet.get("hash"):
        line.append(f" (sha256 {fleet['hash']})", style="dim")
    out = [line]
    record = fleet.get("reload")
    if isinstance(record, dict):
        result = str(record.get("result", "?"))
        style = {"applied": "green", "unchanged": "green", "applying": "yellow"}.get(
            result, "bold red"
        )
        last = Text("last reload: ")
        last.append(result, style=style)
        if record.get("generation") is not None and result not in ("invalid", "refused"):
            last.append(f", generation {record['generation']}")
        if record.get("took_s") is not None:
            last.append(f", took {record['took_s']}s")
        ago = _age(record.get("at"), now)
        last.append(f" ({record.get('via', '?')}, {ago} ago)" if ago else "", style="dim")
        out.append(last)
        for failure in record.get("failures") or []:
            out.append(Text(f"  ✗ {failure}", style="red"))
        if result in ("invalid", "refused") and record.get("message"):
            out.append(Text(f"  {record['message']}", style="red"))
    return out
