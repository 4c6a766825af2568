"""The engines' Unix sockets on disk: their private directory, stale files, group access.

Local engines listen on `engines.socket_dir/<id>-<replica>.sock` (plan.py picks the
names). Only the fleet's user may open the directory (0700), so no other user's process
can reach an engine around the gateway; with `engines.socket_group` the directory is
0750 and each socket 0660, both owned by that group (for nginx's worker user). Every
function here raises nothing: a problem comes back as a sentence for the engine's
`failed` state, naming the key to change.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
import stat
from pathlib import Path


def _gid(group: str | None) -> tuple[int | None, str | None]:
    if group is None:
        return None, None
    try:
        return grp.getgrnam(group).gr_gid, None
    except KeyError:
        return None, f"engines.socket_group: there is no group {group!r} on this machine"


def prepare_dir(folder: Path, group: str | None) -> str | None:
    """Make `folder` (and its parents) and give it its modes: 0700, or 0750 owned by
    `group`. None when done, else why not. A folder owned by another user is refused:
    whoever owns it could reach, or replace, the engines' sockets."""
    gid, problem = _gid(group)
    if problem is not None:
        return problem
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode):
            return f"engines.socket_dir {folder} is not a directory; point it at a directory"
        if info.st_uid != os.geteuid():
            return (
                f"engines.socket_dir {folder} belongs to user {info.st_uid}, not to the "
                f"fleet's user ({os.geteuid()}); remove it or set engines.socket_dir to a "
                "directory of the fleet's own"
            )
        if gid is not None:
            os.chown(folder, -1, gid)
        os.chmod(folder, 0o750 if gid is not None else 0o700)
    except OSError as exc:
        return (
            f"cannot prepare engines.socket_dir {folder} ({exc.strerror or exc}); set "
            "engines.socket_dir to a directory the fleet's user can write"
        )
    return None


def socket_problem(path: Path) -> str | None:
    """None when an engine can bind `path` now (a stale socket left by an earlier run is
    removed), else why not: a live listener holds it, or it is not a socket."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    if not stat.S_ISSOCK(info.st_mode):
        return "it exists and is not a socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                return exc.strerror or str(exc)
        else:
            return "a process is listening on it"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # nobody listens: left by an engine that died
    return None


def share(path: Path, group: str | None) -> str | None:
    """With a `group`, make the socket 0660 and owned by it (nginx connects through it);
    None when done or nothing to do, else why not."""
    gid, problem = _gid(group)
    if gid is None:
        return problem
    try:
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
    except OSError as exc:
        return (
            f"cannot give socket {path} to group {group!r} ({exc.strerror or exc}); the "
            "fleet's user must be in engines.socket_group"
        )
    return None


def remove(path: Path) -> None:
    """Remove an engine's socket after its process is gone (if it left one)."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
