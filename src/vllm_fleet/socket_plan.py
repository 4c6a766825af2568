"""Pure: the Unix sockets of the planned engines (`listen: uds`, the default).

Each engine listens on `<id>-<replica>.sock` in engines.socket_dir; a replacement
starting beside the engine it replaces (a rolling replace) takes `<id>-<replica>.<n>.sock`
with the first n no running engine holds, as it takes a port of its own. An AF_UNIX path
is at most 107 bytes: a deeper directory is a problem at `engines.socket_dir`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Set
from pathlib import Path

from vllm_fleet.config import ConfigIssue, FleetConfig

# AF_UNIX paths: 108 bytes in `struct sockaddr_un`, the last one the terminating NUL.
UDS_PATH_MAX = 107


def socket_dir(config: FleetConfig) -> Path:
    """engines.socket_dir, absolute (relative to the fleet file's directory)."""
    path = Path(config.engines.socket_dir).expanduser()
    return Path(os.path.abspath(path if path.is_absolute() else Path(config.base_dir) / path))


def assign_sockets(
    config: FleetConfig,
    issues: list[ConfigIssue],
    kept: Mapping[tuple[str, int], Path],
    held: Set[Path],
) -> dict[tuple[str, int], Path]:
    """Each `listen: uds` engine's socket, by (deployment, replica): a kept engine's own
    (`kept`); else `<id>-<replica>.sock` in engines.socket_dir, or `<id>-<replica>.<n>.sock`
    with the first n that no running engine holds (`held`)."""
    folder = socket_dir(config)
    taken = set(held)
    sockets: dict[tuple[str, int], Path] = {}
    too_long: list[str] = []
    for dep_id, dep in config.deployments.items():
        if dep.remote or dep.listen != "uds":
            continue
        for replica in range(dep.replicas):
            old = kept.get((dep_id, replica))
            if old is not None:
                sockets[(dep_id, replica)] = old
                continue
            path, n = folder / f"{dep_id}-{replica}.sock", 0
            while path in taken:
                n += 1
                path = folder / f"{dep_id}-{replica}.{n}.sock"
            taken.add(path)
            sockets[(dep_id, replica)] = path
            if len(os.fsencode(path)) > UDS_PATH_MAX:
                too_long.append(str(path))
    if too_long:
        issues.append(
            ConfigIssue(
                loc=("engines", "socket_dir"),
                message=f"the engines' Unix socket paths would be longer than the "
                f"{UDS_PATH_MAX} bytes the system allows ({too_long[0]}: "
                f"{len(os.fsencode(too_long[0]))}); set engines.socket_dir to a shorter "
                "directory, e.g. /tmp/fleet-sockets (the fleet makes it 0700)",
            )
        )
    return sockets
