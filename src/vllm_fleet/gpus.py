"""GPU inventory: `nvidia-smi` is run at the edge (`read_inventory`), parsed in a pure function."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

QUERY_FIELDS = "index,uuid,name,memory.total,memory.used,memory.free"


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_total_mib: int
    memory_used_mib: int
    memory_free_mib: int


class InventoryError(Exception):
    pass


def parse_query_gpu(text: str) -> list[Gpu]:
    """Parse `nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,memory.free
    --format=csv,noheader,nounits` output. Extra trailing columns are ignored."""
    gpus = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) < 6:
            raise InventoryError(f"nvidia-smi line {number}: expected 6 columns, got {line!r}")
        try:
            gpus.append(
                Gpu(
                    index=int(cells[0]),
                    uuid=cells[1],
                    name=cells[2],
                    memory_total_mib=_mib(cells[3]),
                    memory_used_mib=_mib(cells[4]),
                    memory_free_mib=_mib(cells[5]),
                )
            )
        except ValueError as exc:
            raise InventoryError(f"nvidia-smi line {number}: {exc}: {line!r}") from None
    return gpus


def _mib(cell: str) -> int:
    cell = cell.removesuffix("MiB").strip()
    return int(cell) if cell.isdigit() else -1  # "[N/A]" on some boards


@dataclass(frozen=True)
class Inventory:
    """What the machine has; `gpus is None` means no inventory could be read."""

    gpus: tuple[Gpu, ...] | None
    reason: str = ""

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(g.index for g in self.gpus or ())


class _NoAnswer(Exception):
    """nvidia-smi is missing (`missing`) or failed; the message says how."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


def _query(fields: str, timeout: float) -> str:
    """nvidia-smi's CSV answer (no header, no units) to `--query-gpu=fields`."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise _NoAnswer("nvidia-smi not found", missing=True)
    try:
        done = subprocess.run(
            [exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _NoAnswer(f"nvidia-smi failed: {exc}") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        why = detail[-1] if detail else f"exit status {done.returncode}"
        raise _NoAnswer(f"nvidia-smi failed: {why}")
    return done.stdout


def read_inventory(timeout: float = 10.0) -> Inventory:
    """Ask nvidia-smi for the GPUs; never raises, says why when there is no inventory."""
    try:
        return Inventory(tuple(parse_query_gpu(_query(QUERY_FIELDS, timeout))))
    except _NoAnswer as exc:
        why = f"{exc}: no NVIDIA GPU inventory on this machine" if exc.missing else str(exc)
        return Inventory(None, why)
    except InventoryError as exc:
        return Inventory(None, str(exc))


# ---------------------------------------------------------------- use, for the status page

USE_FIELDS = "index,name,memory.used,memory.total,utilization.gpu"


@dataclass(frozen=True)
class GpuNow:
    """One GPU as the status page shows it (utilization None where the board has none)."""

    index: int
    name: str
    memory_used_mib: int
    memory_total_mib: int
    utilization_pct: int | None


@dataclass(frozen=True)
class GpuUse:
    """Every GPU's use now; `gpus is None`: none could be read, and `reason` says why."""

    gpus: tuple[GpuNow, ...] | None
    reason: str = ""


def parse_gpu_use(text: str) -> list[GpuNow]:
    """Parse `nvidia-smi --query-gpu=index,name,memory.used,memory.total,utilization.gpu
    --format=csv,noheader,nounits` output ("[N/A]" where a board lacks a figure)."""
    gpus = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) < 5:
            raise InventoryError(f"nvidia-smi line {number}: expected 5 columns, got {line!r}")
        try:
            index = int(cells[0])
        except ValueError:
            raise InventoryError(f"nvidia-smi line {number}: no GPU index: {line!r}") from None
        use = cells[4].removesuffix("%").strip()
        gpus.append(
            GpuNow(
                index=index,
                name=cells[1],
                memory_used_mib=_mib(cells[2]),
                memory_total_mib=_mib(cells[3]),
                utilization_pct=int(use) if use.isdigit() else None,
            )
        )
    return gpus


def read_gpu_use(timeout: float = 5.0) -> GpuUse:
    """Ask nvidia-smi how busy each GPU is now; never raises (blocking: call it in a thread)."""
    try:
        return GpuUse(tuple(parse_gpu_use(_query(USE_FIELDS, timeout))))
    except _NoAnswer as exc:
        return GpuUse(None, f"{exc}: no NVIDIA GPU on this machine" if exc.missing else str(exc))
    except InventoryError as exc:
        return GpuUse(None, str(exc))
