"""Engine log files, kept to a size: rotated as logrotate's `copytruncate` does.

An engine writes its output straight into its log (no pipe through `fleet up`), with the
file open for appending. When the file passes `engines.log_max_mb`, it is copied to
`<log>.1` (older copies shift to `.2` ... up to `engines.log_keep`) and truncated; the
engine's next write lands at the start of the emptied file. Lines written between the
copy and the truncation are lost, the price of never stopping the engine.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def rotated_name(path: Path, number: int) -> Path:
    return path.with_name(f"{path.name}.{number}")


def rotate(path: Path, keep: int) -> None:
    """Copy `path` to `path.1` (shifting older copies, at most `keep`), then empty it.
    The copy is made first, so a failed one (a full disk) leaves the older copies as
    they were."""
    if keep > 0:
        fresh = path.with_name(f"{path.name}.new")
        try:
            shutil.copyfile(path, fresh)
            rotated_name(path, keep).unlink(missing_ok=True)
            for number in range(keep - 1, 0, -1):
                older = rotated_name(path, number)
                if older.exists():
                    os.replace(older, rotated_name(path, number + 1))
            os.replace(fresh, rotated_name(path, 1))
        except OSError as exc:
            # Emptying the log matters more than keeping its copy.
            log.warning("cannot keep a copy of %s (%s); emptying it anyway", path, exc)
            fresh.unlink(missing_ok=True)
    os.truncate(path, 0)


def rotate_if_over(path: Path, max_bytes: int, keep: int) -> bool:
    """Rotate `path` when it is over `max_bytes`; whether it was rotated. A log that
    does not exist yet (an engine's first start) is left alone, silently."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
        rotate(path, keep)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("cannot rotate %s: %s", path, exc)
        return False
    return True
