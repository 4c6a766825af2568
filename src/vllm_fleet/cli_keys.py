"""`fleet keys`: client keys for gateway.keys: make one (`new`), hash one (`hash`)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

keys_app = typer.Typer(
    help="Client keys for gateway.keys: make one, hash one.", no_args_is_help=True
)


def _split(text: str | None) -> list[str] | None:
    if text is None or text.strip() == "*":
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


Limit = Annotated[int | None, typer.Option(min=1, show_default=False)]


@keys_app.command("new")
def keys_new(
    name: Annotated[str, typer.Argument(help="The key's name (usage is counted by it).")],
    deployments: Annotated[
        str | None,
        typer.Option(help="Comma-separated deployment ids the key may use (default: all)."),
    ] = None,
    rpm: Limit = None,
    tpm: Limit = None,
    max_concurrent: Limit = None,
    admin: Annotated[
        bool,
        typer.Option(
            "--admin", help="May read /fleet/status, /metrics, /fleet/usage; reload, load, unload."
        ),
    ] = False,
) -> None:
    """Print a fresh random key, once, and the line to paste under `gateway.keys:` in the
    fleet file; the file keeps only the key's SHA-256."""
    from vllm_fleet.keygen import KeyNameError, check_name, key_line, new_key

    try:
        check_name(name)
    except KeyNameError as exc:
        raise typer.BadParameter(str(exc), param_hint="NAME") from None
    allowed = _split(deployments)
    if allowed == []:
        raise typer.BadParameter("list at least one deployment, or `*`", param_hint="--deployments")
    key = new_key()
    line = key_line(
        name, key, allowed, rpm=rpm, tpm=tpm, max_concurrent=max_concurrent, admin=admin
    )
    err_console.print(
        f"the key for {name}, shown this once (give it to its user; it is stored nowhere):",
        highlight=False,
    )
    console.print(key, highlight=False, markup=False)
    err_console.print(
        "paste this under `gateway.keys:` in the fleet file (only the key's SHA-256 goes "
        "there), then `fleet reload`:",
        highlight=False,
    )
    console.print(line, highlight=False, markup=False)


@keys_app.command("hash")
def keys_hash() -> None:
    """Read a key from stdin and print its SHA-256, the `key_sha256` of gateway.keys."""
    from vllm_fleet.config.models import key_digest

    if sys.stdin.isatty():
        import getpass

        key = getpass.getpass("key: ")
    else:
        key = sys.stdin.readline()
    key = key.strip()
    if not key:
        err_console.print("[bold red]error:[/] no key on stdin", highlight=False)
        raise typer.Exit(1)
    console.print(key_digest(key), highlight=False)
