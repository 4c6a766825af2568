"""`fleet up`: the gateway first, then every engine; stop everything on SIGINT/SIGTERM.

Order of events:

1. SIGINT/SIGTERM handlers are installed before anything starts, so a signal at any
   moment leads to the stop sequence below (never to an orphan engine).
2. The gateway binds `gateway.host:gateway.port` (a busy port exits 1 with a message),
   serving HTTPS with `gateway.tls` (a certificate or key it cannot use exits 1 first).
   While engines load it answers 503 with Retry-After for their deployments.
3. The supervisor starts every engine; progress shows which are loading, for how long,
   which are ready; then a "ready" line with the three URL styles.
4. On the first signal: stop accepting connections and let the requests in flight
   finish, for up to `engines.drain_timeout` seconds (engines keep serving them); then
   stop every engine concurrently (SIGTERM to its group, `engines.stop_timeout` grace,
   SIGKILL, reap), close the gateway (cutting off what is left), exit 0. A second
   signal cuts the drain short and skips the grace period (SIGKILL at once).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import resource
import signal
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.status import Status
from rich.text import Text

from vllm_fleet.config import ConfigError, FleetConfig
from vllm_fleet.engines import EngineEvent, Supervisor
from vllm_fleet.engines.demand import Demand
from vllm_fleet.fleet_control import FleetControl
from vllm_fleet.gateway.relay.server import connection_limit
from vllm_fleet.gateway.server import serve
from vllm_fleet.gateway.tls import server_tls
from vllm_fleet.plan import Plan
from vllm_fleet.registry import Registry, State
from vllm_fleet.reloader import Reloader

log = logging.getLogger(__name__)


def run_fleet(
    config: FleetConfig,
    plan: Plan,
    console: Console,
    file: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> int:
    """Run the fleet until SIGINT/SIGTERM; the exit code (0, or 1 when it cannot start).
    `file`: the fleet file, which a reload (SIGHUP, `fleet reload`) reads again;
    `overrides`: `--host`/`--port`, kept for every reload."""
    _setup_logging(console)
    source = file if file is not None else Path(config.source).resolve()
    return _run_loop(_run(config, plan, console, source, overrides or {}))


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover (uvloop is a dependency off Windows)
        return asyncio.run(main)
    return uvloop.run(main)


class _NotEngineEvents(logging.Filter):
    """The progress display already shows what the supervisor logs; drop the repeat."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("vllm_fleet.engines.supervisor")


def _setup_logging(console: Console) -> None:
    root = logging.getLogger()
    if root.handlers:
        return  # configured by whoever embeds us
    handler = RichHandler(console=console, show_path=False, show_time=False)
    handler.addFilter(_NotEngineEvents())
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


# Below this many open files, `fleet up` warns: every proxied stream holds two (the
# client's connection and the engine's).
FEW_OPEN_FILES = 4096


def raise_open_files_limit() -> int:
    """Raise this process's open-files limit to the hard limit (engines inherit it), as
    nginx's worker_rlimit_nofile or Go's runtime do; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # kept as it was (a container's limit, say)
    return soft


def display_url(host: str, port: int, tls: bool = False) -> str:
    """The gateway's URL as a client on this machine reaches it (https with `gateway.tls`)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"{'https' if tls else 'http'}://{shown}:{port}"


def gateway_url(config: FleetConfig) -> str:
    gateway = config.gateway
    return display_url(gateway.host, gateway.port, gateway.tls is not None)


class Progress:
    """Prints engine events as they happen and a live line while engines load."""

    def __init__(self, console: Console, registry: Registry) -> None:
        self.console = console
        self.registry = registry
        self.started = time.monotonic()

    def on_event(self, event: EngineEvent) -> None:
        up, name = event.upstream, escape(event.upstream.name)
        if event.state is State.READY:
            self.console.print(f"[green]✓[/] {name} {escape(event.message)}")
        elif event.state in (State.SLEEPING, State.UNLOADED) or (
            event.state is State.STARTING and event.message.startswith("waking")
        ):
            # On demand: swaps and idle unloads, said plainly.
            self.console.print(f"  {name} {escape(event.message)}", style="dim", highlight=False)
        elif event.state is State.STARTING and event.message != "starting":
            # A failure and the restart it leads to (a plain spawn says only "starting").
            self.console.print(f"[yellow]![/] {name} {escape(event.message)}")
        elif event.state in (State.UNREACHABLE, State.STALLED):
            self.console.print(f"[yellow]![/] {name} {escape(event.message)}")
        elif event.state is State.FAILED:
            self.console.print(f"[bold red]✗ {name} failed:[/] {escape(event.message)}")
            if event.log_tail:
                log_path = getattr(up.spec, "log_path", "")
                self.console.print(f"  last lines of {log_path}:", style="dim", highlight=False)
                for line in event.log_tail:
                    self.console.print(Text(f"  │ {line}"), highlight=False)

    def loading_line(self) -> str:
        managed = [u for u in self.registry.all() if u.managed]
        loading = [u for u in managed if u.state is State.STARTING]
        ready = sum(1 for u in managed if u.state is State.READY)
        now = time.time()
        parts = ", ".join(f"{u.name} ({now - u.since:.0f}s)" for u in loading)
        return f"loading {parts}; ready {ready}/{len(managed)}"

    async def until_settled(self, supervisor: Supervisor, stop: asyncio.Event) -> None:
        """Show a live 'loading' line until no engine is starting (or the fleet stops)."""
        settled = asyncio.ensure_future(supervisor.wait_settled())
        stopping = asyncio.ensure_future(stop.wait())
        status: Status | None = None
        if self.console.is_terminal:
            status = self.console.status(escape(self.loading_line()))
            status.start()
        last_note = time.monotonic()
        try:
            while not settled.done() and not stop.is_set():
                await asyncio.wait(
                    {settled, stopping}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED
                )
                if status is not None:
                    status.update(escape(self.loading_line()))
                elif time.monotonic() - last_note >= 30:
                    # Not a terminal (a log file, systemd): a plain line now and then.
                    self.console.print(self.loading_line(), highlight=False)
                    last_note = time.monotonic()
        finally:
            if status is not None:
                status.stop()
            stopping.cancel()
            if not settled.done():
                settled.cancel()

    def print_ready(self, config: FleetConfig) -> None:
        everything = [u for u in self.registry.all() if u.managed]
        # On-demand engines wait to be asked for: counted apart.
        deployments = self.registry.config.deployments  # (a reload may have come already)
        managed = [u for u in everything if not deployments[u.deployment].on_demand]
        ready = sum(1 for u in managed if u.state is State.READY)
        failed = [u.name for u in managed if u.state is State.FAILED]
        url = gateway_url(config)
        took = time.monotonic() - self.started
        summary = f"{ready}/{len(managed)} engines ready in {took:.0f}s"
        on_demand = sorted({u.deployment for u in everything} - {u.deployment for u in managed})
        if on_demand:
            summary += f"; loaded on demand: {', '.join(on_demand)}"
        if (
            managed
            and len(failed) == len(managed)
            and not self.registry.plan.remotes
            and not on_demand
        ):
            self.console.print(
                f"[bold red]every engine failed[/] (see above, or `fleet status`); the gateway "
                f"at {url} answers 503 until you fix the fleet file and run `fleet up` again. "
                "Ctrl-C stops it.",
                highlight=False,
            )
            return
        if failed:
            self.console.print(
                f"[bold yellow]ready with failures:[/] {url}  ({summary}; failed: "
                f"{escape(', '.join(failed))}; see above, or `fleet status`)",
                highlight=False,
            )
        else:
            self.console.print(f"[bold green]ready:[/] {url}  ({summary})", highlight=False)
        example = next(iter(config.deployments))
        model = config.deployments[example].served_as
        lines = [
            f"  path:   {url}/{example}/v1   (OpenAI SDK base_url; any `model` works)",
            f'  azure:  AzureOpenAI(azure_endpoint="{url}", azure_deployment="{example}", '
            'api_version="2024-10-21")',
            f'  openai: {url}/v1   with model="{example}" or "{model}"',
            f"  status: fleet status --url {url}   (or GET {url}/fleet/status)"
            if config.gateway.tls is None
            else f"  status: fleet status {config.source}   (it trusts gateway.tls.cert; or "
            f"--url {url} --cacert CA.pem)",
            f"  page:   {url}/fleet/   (the live status page, in a browser)",
            "Ctrl-C or SIGTERM stops the gateway and every engine.",
        ]
        for line in lines:
            self.console.print(escape(line), highlight=False, soft_wrap=True)


def _print_plan(console: Console, config: FleetConfig, registry: Registry, open_files: int) -> None:
    url = gateway_url(config)
    console.print(
        f"gateway listening on {config.gateway.host}:{config.gateway.port} ({url}); "
        "deployments answer 503 until their engines are ready",
        highlight=False,
    )
    limit = connection_limit(config.gateway.max_connections)
    console.print(
        f"  up to {limit} client connections at once (open files: {open_files}; "
        "gateway.max_connections)",
        highlight=False,
    )
    if open_files < FEW_OPEN_FILES:
        console.print(
            f"[yellow]warning:[/] only {open_files} open files are allowed, "
            f"so about {open_files // 2} streams at once; raise it (`ulimit -Hn`, "
            "LimitNOFILE= in a systemd unit)",
            highlight=False,
        )
    for up in registry.all():
        spec = up.spec
        if not up.managed:
            console.print(f"  {escape(up.name)}: remote {escape(up.url)} (not started here)")
            continue
        gpus = getattr(spec, "gpus", None)
        on = "GPUs " + ",".join(map(str, gpus)) if gpus is not None else "GPUs not pinned"
        when = ", loaded on demand" if up.state is State.UNLOADED else ""
        console.print(
            f"  {escape(up.name)}: {on}, listens {escape(getattr(spec, 'address', '?'))}, "
            f"log {escape(str(getattr(spec, 'log_path', '')))}{when}",
            highlight=False,
        )


async def _run(
    config: FleetConfig, plan: Plan, console: Console, file: Path, overrides: dict[str, Any]
) -> int:
    loop = asyncio.get_running_loop()
    open_files = raise_open_files_limit()
    registry = Registry(config, plan)
    progress = Progress(console, registry)
    supervisor = Supervisor(registry, on_event=progress.on_event)
    demand: Demand | None = None
    stop = asyncio.Event()
    hurry = asyncio.Event()  # a second signal: no more waiting for anything
    reloader = Reloader(file, config, registry, supervisor, console, overrides, hurry)
    control = FleetControl(reloader, supervisor, registry)
    signals = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            console.print(
                f"\n{sig.name}: stopping (requests in flight get up to "
                f"{reloader.config.engines.drain_timeout:g}s to finish, then engines get SIGTERM, "
                f"SIGKILL after {reloader.config.engines.stop_timeout:g}s; again to kill at once)",
                highlight=False,
            )
            stop.set()
        else:
            console.print(f"{sig.name} again: SIGKILL to every engine", highlight=False)
            hurry.set()
            supervisor.kill_now()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)

    reloads: set[asyncio.Task[Any]] = set()

    def on_hangup() -> None:
        # `systemctl reload`: re-read the fleet file; the reloader prints what it does.
        if stop.is_set():
            return
        task = asyncio.ensure_future(reloader.reload(None, False, via="SIGHUP"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)

    host, port = config.gateway.host, config.gateway.port
    try:
        tls = server_tls(config)
    except ConfigError as exc:  # a certificate or key that cannot be used: nothing starts
        console.print(f"[bold red]error:[/] {escape(exc.render())}", highlight=False)
        return 1
    try:
        context = tls.context if tls is not None else None
        gateway = await serve(config, registry, host, port, control=control, tls=context)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            console.print(
                f"[bold red]error:[/] port {port} in use; set gateway.port in the fleet "
                "file or pass --port",
                highlight=False,
            )
        else:
            reason = exc.strerror or str(exc)
            console.print(
                f"[bold red]error:[/] cannot listen on {escape(host)}:{port}: {escape(reason)}; "
                "check gateway.host / --host and gateway.port / --port",
                highlight=False,
            )
        return 1
    reloader.server, reloader.tls = gateway, tls
    demand = Demand(registry, supervisor, gateway.core.metrics.prometheus)
    gateway.core.demand = reloader.demand = demand

    # Everything loaded so far (config, modules) lives as long as the process: keep it out
    # of the cyclic collector's scans, which otherwise walk it all on every full pass.
    gc.collect()
    gc.freeze()
    try:
        _print_plan(console, config, registry, open_files)
        if not stop.is_set():
            await supervisor.start()
            demand.start()
            await progress.until_settled(supervisor, stop)
        if not stop.is_set():
            progress.print_ready(config)
        await stop.wait()
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        reloader.cancel()  # a reload still applying stops where it is
        if demand is not None:  # requests waiting for an engine get their 503 now
            await demand.stop()
        # Engines stop only once the requests they serve are done (or the drain timed out).
        await gateway.drain(reloader.config.engines.drain_timeout, cut_short=hurry)
        stopping = asyncio.create_task(supervisor.stop())
        await asyncio.sleep(0)  # stop() has begun: no engine is restarted any more
        if hurry.is_set():  # the second signal came during the drain
            supervisor.kill_now()
        await stopping
        await gateway.close(grace=0)
    left = [u.name for u in registry.all() if u.managed and u.pid is not None]
    if left:  # pragma: no cover (stop() reaps every engine)
        log.error("engines may still be running: %s", ", ".join(left))
    console.print("stopped: gateway closed, every engine reaped", highlight=False)
    return 0
