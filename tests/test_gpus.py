"""GPU inventory: the parser against real nvidia-smi output, and `read_inventory` against a
real process named nvidia-smi found on PATH (a script printing that output)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vllm_fleet.gpus import (
    Gpu,
    GpuNow,
    GpuUse,
    Inventory,
    InventoryError,
    parse_gpu_use,
    parse_query_gpu,
    read_gpu_use,
    read_inventory,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "nvidia-smi-h200"
H200 = Gpu(
    index=0,
    uuid="GPU-f81e7441-b981-575f-05ad-1c042c2ac28f",
    name="NVIDIA H200",
    memory_total_mib=143771,
    memory_used_mib=0,
    memory_free_mib=143156,
)


# ---------------------------------------------------------------- parse (pure)


def test_parses_real_h200_output_ignoring_extra_columns() -> None:
    # The fixture has 8 columns (utilization.gpu and pci.bus_id too); the first 6 count.
    assert parse_query_gpu((FIXTURES / "query-gpu.csv").read_text()) == [H200]


def test_parses_several_gpus_and_skips_blank_lines() -> None:
    text = (
        "0, GPU-a, NVIDIA H100 80GB HBM3, 81559, 1, 81000\n"
        "\n"
        "1, GPU-b, NVIDIA H100 80GB HBM3, 81559, 40000, 41559\n"
    )
    gpus = parse_query_gpu(text)
    assert [(g.index, g.uuid, g.memory_used_mib) for g in gpus] == [
        (0, "GPU-a", 1),
        (1, "GPU-b", 40000),
    ]
    assert parse_query_gpu("") == []


def test_memory_not_available_reads_as_minus_one() -> None:
    (gpu,) = parse_query_gpu("0, GPU-a, Some Board, [N/A], [N/A], [N/A]\n")
    assert (gpu.memory_total_mib, gpu.memory_used_mib, gpu.memory_free_mib) == (-1, -1, -1)


def test_units_in_memory_values_are_tolerated() -> None:
    (gpu,) = parse_query_gpu("0, GPU-a, NVIDIA H200, 143771 MiB, 0 MiB, 143156 MiB\n")
    assert gpu.memory_total_mib == 143771 and gpu.memory_free_mib == 143156


def test_output_with_a_header_row_is_refused_naming_the_line() -> None:
    # `--format=csv` without noheader: the wrong command, refused rather than guessed at.
    with pytest.raises(InventoryError, match=r"^nvidia-smi line 1: .*'index, uuid, name"):
        parse_query_gpu((FIXTURES / "query-gpu-header.csv").read_text())


def test_too_few_columns_is_refused_naming_the_line() -> None:
    with pytest.raises(InventoryError, match=r"^nvidia-smi line 2: expected 6 columns"):
        parse_query_gpu("0, GPU-a, X, 1, 1, 1\n1, GPU-b\n")


def test_inventory_indices() -> None:
    assert Inventory((H200,)).indices == (0,)
    assert Inventory(None, "why").indices == ()


# ---------------------------------------------------------------- read_inventory (edge)


def fake_nvidia_smi(directory: Path, body: str) -> Path:
    """An executable named nvidia-smi: a real process for read_inventory to run."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


def test_reads_the_gpus_from_nvidia_smi_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    args_file = tmp_path / "args.txt"
    fixture = FIXTURES / "query-gpu.csv"
    fake_nvidia_smi(bin_dir, f'echo "$@" > "{args_file}"\ncat "{fixture}"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    inventory = read_inventory()
    assert inventory == Inventory((H200,))
    assert args_file.read_text().split() == [
        "--query-gpu=index,uuid,name,memory.total,memory.used,memory.free",
        "--format=csv,noheader,nounits",
    ]


def test_no_nvidia_smi_on_path_gives_no_inventory_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory
    inventory = read_inventory()
    assert inventory.gpus is None
    assert inventory.reason == "nvidia-smi not found: no NVIDIA GPU inventory on this machine"


def test_failing_nvidia_smi_gives_no_inventory_with_its_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver."
    fake_nvidia_smi(tmp_path, f"echo 'starting' >&2\necho '{message}' >&2\nexit 9\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    inventory = read_inventory()
    assert inventory.gpus is None
    assert inventory.reason == f"nvidia-smi failed: {message}"


def test_silent_failing_nvidia_smi_reports_its_exit_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvidia_smi(tmp_path, "exit 9\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    inventory = read_inventory()
    assert inventory.gpus is None
    assert inventory.reason == "nvidia-smi failed: exit status 9"


def test_unparsable_nvidia_smi_output_gives_no_inventory_with_the_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvidia_smi(tmp_path, "echo 'No devices were found, or something new'\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    inventory = read_inventory()
    assert inventory.gpus is None
    assert inventory.reason.startswith("nvidia-smi line 1: expected 6 columns")


def test_hanging_nvidia_smi_times_out_to_no_inventory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvidia_smi(tmp_path, "exec sleep 30\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    inventory = read_inventory(timeout=0.5)
    assert inventory.gpus is None
    assert inventory.reason.startswith("nvidia-smi failed: ")
    assert "timed out after 0.5 seconds" in inventory.reason


# ---------------------------------------------------------------- use, for the status page

# The H200's line of query-gpu.csv, in read_gpu_use's columns (index, name, memory.used,
# memory.total, utilization.gpu), and a busy board and one without a utilization figure.
USE_LINES = (
    "0, NVIDIA H200, 0, 143771, 0\n1, NVIDIA H200, 120034, 143771, 87\n2, X, 10, 20, [N/A]\n"
)


def test_gpu_use_is_parsed_with_utilization_missing_on_some_boards() -> None:
    gpus = parse_gpu_use(USE_LINES)
    assert gpus == [
        GpuNow(0, "NVIDIA H200", 0, 143771, 0),
        GpuNow(1, "NVIDIA H200", 120034, 143771, 87),
        GpuNow(2, "X", 10, 20, None),
    ]
    with pytest.raises(InventoryError, match=r"^nvidia-smi line 1: expected 5 columns"):
        parse_gpu_use("0, H200\n")


def test_gpu_use_is_read_from_nvidia_smi_on_path_with_its_query(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args_file = tmp_path / "args.txt"
    fake_nvidia_smi(tmp_path / "bin", f"echo \"$@\" > '{args_file}'\nprintf '{USE_LINES}'\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    use = read_gpu_use()
    assert use.gpus is not None and [g.utilization_pct for g in use.gpus] == [0, 87, None]
    assert args_file.read_text().split() == [
        "--query-gpu=index,name,memory.used,memory.total,utilization.gpu",
        "--format=csv,noheader,nounits",
    ]


def test_gpu_use_without_nvidia_smi_or_with_a_failing_one_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert read_gpu_use() == GpuUse(None, "nvidia-smi not found: no NVIDIA GPU on this machine")
    fake_nvidia_smi(tmp_path, "echo 'no driver' >&2\nexit 9\n")
    assert read_gpu_use() == GpuUse(None, "nvidia-smi failed: no driver")
