"""The `fleet` command: thin; it parses, calls the modules that do the work, and prints."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from vllm_fleet import __version__
from vllm_fleet.cli_keys import keys_app
from vllm_fleet.config import ConfigError, FleetConfig, load
from vllm_fleet.gateway.policies import check_lines as routing_lines
from vllm_fleet.gpus import Inventory, read_inventory
from vllm_fleet.ledger import By
from vllm_fleet.lora import check_lines
from vllm_fleet.masking import mask_argv, mask_env
from vllm_fleet.plan import EngineSpec, Plan, build_plan, stall_watch
from vllm_fleet.swap_groups import on_demand_lines

if TYPE_CHECKING:
    from vllm_fleet.status import Trust

app = typer.Typer(
    help="Serve several vLLM models behind one OpenAI- and Azure-compatible endpoint.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# soft_wrap: messages stay whole lines in pipes and CI logs (no wrapping at 80 columns).
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

FleetFile = Annotated[Path, typer.Argument(help="The fleet file (YAML).", show_default=False)]


def _load_plan(path: Path) -> tuple[FleetConfig, Plan]:
    """Load and plan, or print every problem and exit 1."""
    try:
        config = load(path)
        plan = build_plan(config, read_inventory(), sys.executable)
    except ConfigError as exc:
        err_console.print(f"[bold red]error:[/] {exc.render()}", highlight=False)
        raise typer.Exit(1) from None
    return config, plan


def _describe_inventory(inventory: Inventory) -> str:
    if inventory.gpus is None:
        return f"no GPU inventory ({inventory.reason}); GPU indices in the file are trusted"
    listed = ", ".join(f"{g.index}: {g.name} ({g.memory_total_mib} MiB)" for g in inventory.gpus)
    return f"{len(inventory.gpus)} GPU(s): {listed}"


def _describe_engine_watch(config: FleetConfig, engine: EngineSpec) -> str:
    """The engine's VLLM_PORT range and whether its stalls are watched, in one line."""
    ports = engine.vllm_ports
    if ports is not None:
        vllm = f"vLLM internal ports: {ports.start}-{ports.stop - 1} (VLLM_PORT={ports.start})"
    else:
        vllm = (
            f"vLLM internal ports: from VLLM_PORT={engine.env.get('VLLM_PORT')}, set in the "
            "deployment's env (it wins; no range reserved)"
        )
    _, stalls = stall_watch(config, config.deployments[engine.deployment])
    return f"{vllm}; stall check: {stalls}"


@app.command()
def check(fleet_file: FleetFile) -> None:
    """Validate a fleet file and print the plan: every engine's GPUs, port, command line
    and environment (secrets masked), its range of vLLM's internal ports and whether its
    stalls are watched; then the on-demand deployments and their swap groups. Exit code
    0 when valid, 1 when not."""
    from vllm_fleet.gateway.tls import server_tls
    from vllm_fleet.runner import gateway_url

    config, plan = _load_plan(fleet_file)
    try:
        tls = server_tls(config)  # the certificate and key `fleet up` would serve with
    except ConfigError as exc:
        err_console.print(f"[bold red]error:[/] {exc.render()}", highlight=False)
        raise typer.Exit(1) from None
    adapters = f" and {len(config.adapters)} LoRA adapter(s)" if config.adapters else ""
    console.print(
        f"[bold green]ok[/] {fleet_file}: {len(config.deployments)} deployment(s){adapters}"
    )
    served = f" (TLS: {tls.cert}, {tls.key})" if tls is not None else ""
    console.print(f"gateway: {gateway_url(config)}{served}", highlight=False)
    console.print(f"GPUs: {_describe_inventory(plan.inventory)}")
    if plan.engines:
        console.print(
            f"engines start in {plan.engines[0].cwd} (relative paths in the file are "
            "relative to it)",
            highlight=False,
        )
    for engine in plan.engines:
        gpus = ",".join(map(str, engine.gpus)) if engine.gpus is not None else "not pinned"
        console.print(
            f"\n[bold]{engine.name}[/]  GPUs: {gpus}  listens: {engine.address}"
            f"  log: {engine.log_path}",
            highlight=False,
        )
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in mask_env(dict(engine.env)).items())
        line = shlex.join(mask_argv(engine.argv))
        console.print(f"  {env} {line}" if env else f"  {line}", highlight=False, soft_wrap=True)
        console.print(f"  {_describe_engine_watch(config, engine)}", highlight=False)
    for remote in plan.remotes:
        console.print(f"\n[bold]{remote.name}[/]  remote: {remote.url} (routed to, not started)")
    console.print()
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    on_demand = on_demand_lines(config, plan.groups)
    for line in ([""] if plan.warnings and on_demand else []) + on_demand:
        console.print(line, highlight=False)
    lora = check_lines(config, [(e.deployment, e.argv) for e in plan.engines])
    for line in ([""] if (plan.warnings or on_demand) and lora else []) + lora:
        console.print(line, highlight=False, markup=False)
    routing = routing_lines(config)
    for line in ([""] if (plan.warnings or on_demand or lora) and routing else []) + routing:
        console.print(line, highlight=False, markup=False)


@app.command()
def up(
    fleet_file: FleetFile,
    host: Annotated[str | None, typer.Option(help="Override gateway.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Override gateway.port.")] = None,
) -> None:
    """Start every engine, wait until each is ready, and serve the gateway in front of them.
    Ctrl-C or SIGTERM stops everything."""
    from vllm_fleet.reloader import with_overrides
    from vllm_fleet.runner import run_fleet

    config, plan = _load_plan(fleet_file)
    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    config = with_overrides(config, overrides)
    exit_code = run_fleet(
        config, plan, console=err_console, file=fleet_file.resolve(), overrides=overrides
    )
    raise typer.Exit(exit_code)


Url = Annotated[str | None, typer.Option(help="The gateway, e.g. http://127.0.0.1:8080.")]
ApiKey = Annotated[
    str | None,
    typer.Option(
        envvar="FLEET_API_KEY",
        help="An admin key of the fleet (gateway.keys with admin: true, or gateway.api_keys).",
    ),
]
CaCert = Annotated[
    Path | None,
    typer.Option(
        "--cacert",
        envvar="FLEET_CACERT",
        help="PEM CA certificate(s) to trust for an https gateway, besides the system's "
        "(and SSL_CERT_FILE); a fleet file given trusts its own gateway.tls.cert.",
    ),
]


def _gateway_of(
    fleet_file: Path | None, url: str | None, api_key: str | None, cacert: Path | None = None
) -> tuple[str, str | None, Trust]:
    """The gateway's URL, key and what its certificate is checked against: as given,
    else from the fleet file, else the default. A fleet file with problems prints them
    and exits 1."""
    from vllm_fleet.runner import gateway_url
    from vllm_fleet.status import Trust

    pinned = None
    if fleet_file is not None:
        try:
            config = load(fleet_file)
        except ConfigError as exc:
            err_console.print(f"[bold red]error:[/] {exc.render()}", highlight=False)
            raise typer.Exit(1) from None
        gateway = config.gateway
        if gateway.tls is not None:
            pinned = config.path_of(gateway.tls.cert)
        if url is None:
            url = gateway_url(config)
            # An admin key the file holds in plain (`key: ${VAR}`); a hashed one cannot be
            # read back: pass it with --api-key / FLEET_API_KEY.
            admin = (k.key for k in gateway.keys if k.admin and k.key is not None)
            api_key = api_key or next(iter(gateway.api_keys), None) or next(admin, None)
    return url or "http://127.0.0.1:8080", api_key, Trust(cacert, pinned)


@app.command()
def status(
    fleet_file: Annotated[
        Path | None,
        typer.Argument(help="Read the gateway's address (and key) from this fleet file."),
    ] = None,
    url: Url = None,
    api_key: ApiKey = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False,
    cacert: CaCert = None,
) -> None:
    """Show every engine of a running fleet: state, pid, port, GPUs, restarts, and why
    an engine failed (from the gateway's /fleet/status); the fleet file's generation and
    last reload. Exit code 1 when unreachable."""
    from vllm_fleet.status import StatusError, fetch_status, render_status

    url, api_key, trust = _gateway_of(fleet_file, url, api_key, cacert)
    try:
        data = fetch_status(url, api_key, trust=trust)
    except StatusError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    if as_json:
        console.print_json(data=data)
    else:
        console.print(render_status(data))


DeploymentName = Annotated[str, typer.Argument(help="The on-demand deployment's id.")]
FleetFileArg = Annotated[
    Path | None,
    typer.Argument(help="Read the gateway's address (and key) from this fleet file."),
]


@app.command("load")
def load_deployment(
    deployment: DeploymentName,
    fleet_file: FleetFileArg = None,
    url: Url = None,
    api_key: ApiKey = None,
    cacert: CaCert = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for it.")] = 3600.0,
) -> None:
    """Load an on-demand deployment now (waking or starting its engines, making room in
    its swap group first) and wait until it is loaded."""
    _deployment_action("load", deployment, fleet_file, url, api_key, cacert, timeout)


@app.command("unload")
def unload_deployment(
    deployment: DeploymentName,
    fleet_file: FleetFileArg = None,
    url: Url = None,
    api_key: ApiKey = None,
    cacert: CaCert = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for it.")] = 600.0,
) -> None:
    """Unload an on-demand deployment: drain its requests in flight, stop its engines."""
    _deployment_action("unload", deployment, fleet_file, url, api_key, cacert, timeout)


def _deployment_action(
    action: str,
    deployment: str,
    fleet_file: Path | None,
    url: str | None,
    api_key: str | None,
    cacert: Path | None,
    timeout: float,
) -> None:
    from rich.markup import escape

    from vllm_fleet.deployment_client import ask

    url, api_key, trust = _gateway_of(fleet_file, url, api_key, cacert)
    ok, said = ask(url, api_key, trust, deployment, action, timeout)
    if not ok:
        err_console.print(f"[bold red]error:[/] {escape(said)}", highlight=False)
        raise typer.Exit(1)
    console.print(said, highlight=False, markup=False)


def _ask_reload(
    fleet_file: Path | None,
    url: str | None,
    api_key: str | None,
    dry_run: bool,
    cacert: Path | None = None,
) -> tuple[str, str | None, Trust, dict[str, Any]]:
    from vllm_fleet.reload_client import plan_lines, post_reload
    from vllm_fleet.status import StatusError

    if fleet_file is not None:
        _load_plan(fleet_file)  # a bad file: its problems, exit 1, nothing sent
    url, api_key, trust = _gateway_of(fleet_file, url, api_key, cacert)
    file = str(fleet_file.resolve()) if fleet_file is not None else None
    try:
        status_code, data = post_reload(url, api_key, file, dry_run, trust=trust)
    except StatusError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    if status_code >= 400:
        error = data.get("error") if isinstance(data.get("error"), dict) else {}
        message = error.get("message") if isinstance(error, dict) else None
        err_console.print(
            f"[bold red]error:[/] {message or data}; the fleet runs as it was",
            highlight=False,
            markup=True,
        )
        raise typer.Exit(1)
    for line in plan_lines(data):
        console.print(line, highlight=False, markup=False)
    return url, api_key, trust, data


@app.command()
def reload(
    fleet_file: Annotated[
        Path | None,
        typer.Argument(
            help="The fleet file to apply (default: the one `fleet up` was started with); "
            "it is the fleet's file from then on.",
            show_default=False,
        ),
    ] = None,
    url: Url = None,
    api_key: ApiKey = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; change nothing.")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Follow the reload until it is done.")
    ] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to follow it.")] = 3600.0,
    cacert: CaCert = None,
) -> None:
    """Apply the fleet file to the running fleet, changing only what changed: new
    engines start, removed ones drain and stop, changed ones are replaced (replica by
    replica), the rest keeps running. Prints the plan first. Exit code 1 when the file
    is invalid (nothing changes) or a step failed."""
    from vllm_fleet.reload_client import follow
    from vllm_fleet.status import StatusError

    url, api_key, trust, data = _ask_reload(fleet_file, url, api_key, dry_run, cacert)
    result = data.get("result")
    if result != "applying":
        if result == "planned":
            console.print("(dry run: nothing changed)", highlight=False)
        return
    record = data.get("reload") or {}
    generation = int(record.get("generation", 0))
    console.print(f"applying generation {generation}...", highlight=False)
    if not wait:
        return
    try:
        done = follow(url, api_key, generation, timeout, trust=trust)
    except StatusError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    for line in done.get("done") or []:
        console.print(f"  ✓ {line}", highlight=False, markup=False)
    for line in done.get("failures") or []:
        console.print(f"  ✗ {line}", highlight=False, markup=False)
    outcome = done.get("result")
    took = done.get("took_s")
    if outcome == "applied":
        console.print(f"[bold green]applied[/] generation {generation} in {took}s")
        return
    if outcome == "applying":
        console.print(f"still applying after {timeout:g}s; see `fleet status`")
        raise typer.Exit(1)
    console.print(
        f"[bold red]{outcome}[/]: generation {generation}, the rest is applied; see `fleet status`",
        highlight=False,
    )
    raise typer.Exit(1)


@app.command()
def diff(
    fleet_file: FleetFile, url: Url = None, api_key: ApiKey = None, cacert: CaCert = None
) -> None:
    """Print what `fleet reload FLEET_FILE` would do to the running fleet, per
    deployment and replica, and why; change nothing."""
    _ask_reload(fleet_file, url, api_key, dry_run=True, cacert=cacert)


@app.command()
def usage(
    fleet_file: FleetFile,
    since: Annotated[
        str | None,
        typer.Option(help="Count from: 30m, 24h, 7d, 2w back, or a UTC date (2026-12-01)."),
    ] = None,
    by: Annotated[By, typer.Option(help="Rows per key name, per deployment, or both.")] = "both",
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False,
) -> None:
    """Requests, errors and tokens by key name and deployment, from the usage ledger the
    fleet file names (gateway.usage_db), read while the fleet runs. Exit code 1 when the
    file has no ledger or none was written yet."""
    from vllm_fleet.ledger import LedgerError, parse_since, read_usage
    from vllm_fleet.usage_report import render_usage

    try:
        start = parse_since(since) if since is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None
    try:
        config = load(fleet_file)
    except ConfigError as exc:
        err_console.print(f"[bold red]error:[/] {exc.render()}", highlight=False)
        raise typer.Exit(1) from None
    if config.gateway.usage_db is None:
        err_console.print(
            f"[bold red]error:[/] {fleet_file} keeps no usage ledger (gateway.usage_db: null); "
            "set gateway.usage_db (default .fleet/usage.db) and restart `fleet up`",
            highlight=False,
        )
        raise typer.Exit(1)
    path = config.path_of(config.gateway.usage_db)
    try:
        data = read_usage(path, start, by)
    except LedgerError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    if as_json:
        console.print_json(data=data)
    else:
        console.print(render_usage(data, str(path)))


app.add_typer(keys_app, name="keys")


@app.command()
def nginx(
    fleet_file: FleetFile,
    listen: Annotated[str, typer.Option(help="nginx `listen`: PORT or ADDRESS:PORT.")] = "80",
    server_name: Annotated[str, typer.Option(help="nginx `server_name`.")] = "_",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the vhost here.")
    ] = None,
    check_it: Annotated[
        bool, typer.Option("--check", help="Run `nginx -t` on it in a throwaway prefix.")
    ] = False,
) -> None:
    """Render the nginx vhost equivalent to the gateway's path and Azure routes."""
    from vllm_fleet.nginx import NginxRenderError, render, warnings
    from vllm_fleet.nginx_run import NginxNotFound
    from vllm_fleet.nginx_run import check as nginx_check

    config, plan = _load_plan(fleet_file)
    for warning in warnings(config):
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    try:
        text = render(config, plan, listen=listen, server_name=server_name)
    except NginxRenderError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    if output is not None:
        output.write_text(text, encoding="utf-8")
        err_console.print(f"wrote {output}", highlight=False)
    elif not check_it:
        sys.stdout.write(text)
    if check_it:
        try:
            ok, said = nginx_check(text)
        except NginxNotFound as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(1) from None
        if not ok:
            err_console.print(f"[bold red]nginx rejects it:[/]\n{said}", highlight=False)
            raise typer.Exit(1)
        err_console.print("[bold green]ok[/] nginx accepts it (nginx -t)", highlight=False)


@app.command()
def systemd(
    fleet_file: FleetFile,
    user: Annotated[str | None, typer.Option(help="Run the service as this user (User=).")] = None,
    env_file: Annotated[
        Path | None,
        typer.Option(
            help="EnvironmentFile=: KEY=VALUE lines for the fleet file's ${VAR}s (HF_TOKEN, "
            "API keys), kept out of the fleet file."
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the unit here.")
    ] = None,
) -> None:
    """Render a systemd service unit that runs `fleet up FLEET_FILE`: `systemctl reload`
    re-reads the fleet file, `systemctl stop` drains, then stops every engine. The file is
    checked first, in the environment the service will have (exit 1 with its problems)."""
    import os

    from vllm_fleet.systemd import (
        SystemdRenderError,
        find_fleet_command,
        read_service_env,
        render_unit,
    )

    fleet_path = Path(os.path.abspath(fleet_file))
    env_path = Path(os.path.abspath(env_file)) if env_file is not None else None
    command = find_fleet_command(sys.executable)
    try:
        service = read_service_env(command, user, env_path)
        for warning in service.warnings:
            err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
        config = load(fleet_path, environ=service.environ)
        build_plan(config, read_inventory(), sys.executable)
        text = render_unit(config, fleet_path, command, user, env_path)
    except ConfigError as exc:
        err_console.print(f"[bold red]error:[/] {exc.render()}", highlight=False)
        if any(i.message.startswith("environment variable") for i in exc.issues):
            err_console.print(
                f"note: ${{VAR}}s were read as the service will see them: {service.described}",
                highlight=False,
            )
        raise typer.Exit(1) from None
    except SystemdRenderError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    _write_or_print(text, output)


@app.command()
def schema(
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the schema here.")
    ] = None,
) -> None:
    """Print the fleet file's JSON Schema, for editors: save it (`fleet schema >
    fleet.schema.json`) and start the fleet file with `# yaml-language-server:
    $schema=./fleet.schema.json`."""
    import json

    from vllm_fleet.config.schema import fleet_schema

    text = json.dumps(fleet_schema(), indent=2) + "\n"
    _write_or_print(text, output)


def _write_or_print(text: str, output: Path | None) -> None:
    if output is not None:
        output.write_text(text, encoding="utf-8")
        err_console.print(f"wrote {output}", highlight=False)
    else:
        sys.stdout.write(text)


@app.command()
def version() -> None:
    """Print the version."""
    console.print(f"vllm-fleet {__version__}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
