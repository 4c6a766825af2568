"""`fleet systemd`: the systemd service unit that runs `fleet up FLEET_FILE` as a service.

`render_unit` is pure: from the fleet file (its stop timeouts, its log folder), the command
that runs `fleet` and the options, the unit's text. Each value is written the way systemd
reads that setting (systemd.syntax(7), systemd.service(5)): `%` is a specifier everywhere,
`$` a variable in ExecStart='s arguments (not in its executable's path), and words of
ExecStart= and Environment= are double-quoted when not plain. A value systemd cannot carry
(a line break, a path ending in a blank or a backslash, a user name it refuses) is refused,
never mangled.

The fleet file is checked in the environment the service will have (`service_environ`,
from the EnvironmentFile's assignments: `parse_env_file`). Two functions look at the
machine: `find_fleet_command` (which `fleet` runs this package) and `read_service_env`
(the user database and the EnvironmentFile).
"""

from __future__ import annotations

import math
import os
import pwd
import re
import shlex
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vllm_fleet.config import FleetConfig

UNIT_NAME = "vllm-fleet.service"
# TimeoutStopSec = engines.drain_timeout + engines.stop_timeout + this: `fleet up`'s own
# stop sequence gets the whole of its two waits, and time to reap and exit after them.
STOP_MARGIN_S = 15
LIMIT_NOFILE = 1048576
RESTART_SEC = 5
# systemd's PATH for services (`systemd-path search-binaries-default`); the unit puts the
# fleet's own bin directory before it.
SYSTEMD_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

# Words written bare in ExecStart=; anything else is double-quoted.
_BARE_WORD = re.compile(r"[A-Za-z0-9_@+=:,./-]+")
# User=: a name or a UID, as systemd's relaxed check takes them (no blanks, `/` or `:`).
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,255}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class SystemdRenderError(ValueError):
    """A value the unit cannot hold as given; the message says which and why."""


def stop_timeout_seconds(config: FleetConfig) -> int:
    """TimeoutStopSec: the drain, the engines' grace period and a margin, whole seconds."""
    engines = config.engines
    return math.ceil(engines.drain_timeout + engines.stop_timeout) + STOP_MARGIN_S


def service_path(fleet_command: Sequence[str]) -> str:
    """PATH for the service: the directory of `fleet` (its virtualenv's bin, where a `vllm`
    installed beside it is), then systemd's own."""
    first = str(Path(fleet_command[0]).parent)
    return ":".join(dict.fromkeys((first, *SYSTEMD_PATH)))


def check_user(user: str) -> str:
    """`user` if systemd takes it for User=, else SystemdRenderError saying why."""
    if not _USER.fullmatch(user):
        raise SystemdRenderError(
            f"`{user}` is not a user name systemd takes (letters, digits, `_`, `.`, `-`, `@`)"
        )
    return user


def _check_plain(what: str, value: str) -> str:
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise SystemdRenderError(f"{what} `{value!r}` holds a line break or control character")
    if value != value.strip() or value.endswith("\\"):
        raise SystemdRenderError(
            f"{what} `{value}` begins or ends with a blank or ends with a backslash, "
            "which systemd would drop or read as a line continuation; rename it"
        )
    return value


def _plain(what: str, value: str) -> str:
    """A value systemd takes as the rest of the line (a path, a description)."""
    return _check_plain(what, value).replace("%", "%%")


def _path(what: str, path: Path) -> str:
    if not path.is_absolute():
        raise SystemdRenderError(f"{what} `{path}` must be an absolute path")
    return _plain(what, str(path))


def _quoted(value: str, *, dollars: bool) -> str:
    """One word of ExecStart= (dollars: an argument, where `$` is a variable) or of
    Environment=, quoted when it is not plain."""
    _check_plain("the value", value)
    value = value.replace("%", "%%")
    if dollars:
        value = value.replace("$", "$$")
    if _BARE_WORD.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_unit(
    config: FleetConfig,
    fleet_file: Path,
    fleet_command: Sequence[str],
    user: str | None,
    env_file: Path | None,
) -> str:
    """The unit running `<fleet_command> up <fleet_file>`; paths must be absolute.

    fleet_command: the argv that runs `fleet` (its executable, or `python -m vllm_fleet.cli`)."""
    if not fleet_command or not Path(fleet_command[0]).is_absolute():
        raise SystemdRenderError(
            f"the fleet command {list(fleet_command)} must start with an absolute path"
        )
    fleet = _path("the fleet file", fleet_file)
    workdir = _path("the fleet file's directory", fleet_file.parent)
    # systemd expands `$` in the arguments but takes the executable's path as written.
    program, args = fleet_command[0], [*fleet_command[1:], "up", str(fleet_file)]
    exec_start = " ".join(
        [_quoted(program, dollars=False), *(_quoted(a, dollars=True) for a in args)]
    )
    if user is not None:
        check_user(user)
    env = _path("the environment file", env_file) if env_file is not None else None
    logs = _check_plain("the log directory", str(config.log_dir()))
    again = ["fleet", "systemd", str(fleet_file)]
    again += ["--user", user] if user is not None else []
    again += ["--env-file", str(env_file)] if env_file is not None else []
    drain, grace = config.engines.drain_timeout, config.engines.stop_timeout
    out = [
        f"# {UNIT_NAME}: runs `fleet up {fleet_file}` as a service.",
        "# Generated by `fleet systemd`; edit the fleet file and re-run, not this file.",
        "#",
        f"#   {shlex.join(again)} | sudo tee /etc/systemd/system/{UNIT_NAME}",
        "#   sudo systemctl daemon-reload",
        "#   sudo systemctl enable --now vllm-fleet   # start now and at every boot",
        "#   sudo systemctl reload vllm-fleet         # re-read the fleet file",
        "#   sudo systemctl stop vllm-fleet           # drain, then stop every engine",
        f"#   journalctl -u vllm-fleet -f              # fleet up's output; engine logs: {logs}",
        "",
        "[Unit]",
        f"Description=vLLM fleet ({fleet})",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={exec_start}",
        f"WorkingDirectory={workdir}",
        "# Started once `fleet up` runs: it binds the gateway at once and loads the engines in",
        "# the background (503 for a deployment still loading), watching each for up to its",
        "# start_timeout itself; systemd has no start-up to time.",
        "TimeoutStartSec=infinity",
        "# `systemctl reload`: SIGHUP makes `fleet up` re-read the fleet file.",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "# `systemctl stop`: SIGTERM to `fleet up` alone, which lets the requests in flight",
        "# finish, then stops every engine (SIGTERM to its process group, grace, SIGKILL, reap).",
        "# Whatever is left when it exits, or after TimeoutStopSec, gets SIGKILL.",
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"# engines.drain_timeout ({drain:g}s) + engines.stop_timeout ({grace:g}s) + "
        f"{STOP_MARGIN_S}s margin, from the fleet file.",
        f"TimeoutStopSec={stop_timeout_seconds(config)}",
        "# Thousands of streams: each holds two sockets (the client's and the engine's).",
        f"LimitNOFILE={LIMIT_NOFILE}",
        "Restart=on-failure",
        f"RestartSec={RESTART_SEC}",
    ]
    if user is not None:
        out += [
            f"# {user} must be able to read the fleet file and write the engine logs.",
            f"User={_plain('the user', user)}",
        ]
    if env is not None:
        out += [
            "# KEY=VALUE lines for the ${VAR}s of the fleet file: secrets such as HF_TOKEN or",
            "# gateway API keys stay out of the fleet file and this unit (chmod 600 it).",
            f"EnvironmentFile={env}",
        ]
    out += [
        "Environment=PYTHONUNBUFFERED=1",
        "# The fleet's own bin directory first, so engines find a `vllm` installed beside it.",
        f"Environment={_quoted('PATH=' + service_path(fleet_command), dollars=False)}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(out)


def parse_env_file(text: str) -> dict[str, str]:
    """The assignments of an EnvironmentFile, in their common forms: `KEY=VALUE` lines,
    blanks around them dropped, one pair of enclosing quotes removed; empty lines and
    those starting with `#` or `;` ignored, as systemd does. (Multi-line values and
    backslash escapes are not read: enough to check which variables the service has.)"""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        if not _ENV_NAME.fullmatch(key):
            continue
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def service_environ(
    fleet_command: Sequence[str],
    env_file_values: Mapping[str, str],
    user_record: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment `fleet up` gets from the unit (what its ${VAR}s can read): systemd's
    PATH as the unit sets it, PYTHONUNBUFFERED, USER/LOGNAME/HOME/SHELL when User= is set
    (user_record), and the EnvironmentFile's assignments over them."""
    environ = {"PATH": service_path(fleet_command), "PYTHONUNBUFFERED": "1"}
    environ.update(user_record or {})
    environ.update(env_file_values)
    return environ


# What this machine has: the `fleet` to run, the user, the environment file.


def find_fleet_command(python: str, search_path: str | None = None) -> list[str]:
    """The absolute command that runs `fleet`: the console script beside `python` (the
    interpreter running now, so this package's own environment), else `fleet` on the
    search path (PATH by default), else `python -m vllm_fleet.cli`."""
    beside = Path(python).parent / "fleet"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [os.path.abspath(beside)]
    found = shutil.which("fleet", path=search_path)
    if found is not None:
        return [os.path.abspath(found)]
    return [os.path.abspath(python), "-m", "vllm_fleet.cli"]


@dataclass(frozen=True)
class ServiceEnv:
    """The environment to check the fleet file in, and what to tell the person."""

    environ: dict[str, str] | None  # None: this shell's (the env file could not be read)
    described: str  # where its ${VAR}s come from, for a note beside a problem
    warnings: list[str]


def read_service_env(
    fleet_command: Sequence[str], user: str | None, env_file: Path | None
) -> ServiceEnv:
    """The environment the unit gives `fleet up`, from the user database and the env file
    (reads both; SystemdRenderError for a user name systemd refuses)."""
    warnings: list[str] = []
    record: dict[str, str] | None = None
    if user is not None:
        try:
            check_user(user)
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            warnings.append(
                f"no user `{user}` on this machine: the service will not start until there is one"
            )
        else:
            name, home, shell = entry.pw_name, entry.pw_dir, entry.pw_shell
            record = {"USER": name, "LOGNAME": name, "HOME": home, "SHELL": shell}
    if env_file is None:
        described = "systemd's own variables only; pass the file's ${VAR}s with --env-file"
        return ServiceEnv(service_environ(fleet_command, {}, record), described, warnings)
    try:
        values = parse_env_file(env_file.read_text(encoding="utf-8"))
    except OSError as exc:
        then = "the service will not start until it does; "
        then = then if isinstance(exc, FileNotFoundError) else ""
        warnings.append(
            f"cannot read {env_file} ({exc.strerror}): {then}the fleet file's ${{VAR}}s are "
            "checked in this shell's environment instead"
        )
        return ServiceEnv(None, "this shell's environment", warnings)
    described = f"systemd's own variables and those of {env_file}"
    return ServiceEnv(service_environ(fleet_command, values, record), described, warnings)
