"""Engine logs kept to a size (`engines.log_max_mb`, `engines.log_keep`), rotated under a
writer that keeps its file open, as an engine does."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import fake_fleet_file, wait_until
from vllm_fleet.config import ConfigError, load
from vllm_fleet.engines.logs import rotate, rotate_if_over


def test_rotation_keeps_copies_in_order_and_the_open_writer_goes_on_at_the_start(
    tmp_path: Path,
) -> None:
    path = tmp_path / "engine.log"
    with open(path, "ab", buffering=0) as engine:  # the engine's own file: O_APPEND
        for generation in range(4):
            engine.write(b"generation %d\n" % generation * 10)
            rotate(path, keep=2)
            assert path.stat().st_size == 0
        engine.write(b"after\n")
    assert path.read_bytes() == b"after\n"  # not at the old offset, no hole of zeros
    assert (tmp_path / "engine.log.1").read_bytes() == b"generation 3\n" * 10
    assert (tmp_path / "engine.log.2").read_bytes() == b"generation 2\n" * 10
    assert not (tmp_path / "engine.log.3").exists()


def test_keep_zero_empties_without_copies(tmp_path: Path) -> None:
    path = tmp_path / "engine.log"
    path.write_bytes(b"x" * 100)
    assert rotate_if_over(path, 99, keep=0)
    assert path.read_bytes() == b""
    assert [p.name for p in tmp_path.iterdir()] == ["engine.log"]


def test_a_log_under_the_limit_or_missing_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "engine.log"
    assert not rotate_if_over(path, 10, keep=3)  # an engine's first start: no log yet
    assert caplog.records == []
    path.write_bytes(b"x" * 10)
    assert not rotate_if_over(path, 10, keep=3)
    assert path.read_bytes() == b"x" * 10


def test_a_failed_copy_keeps_the_older_copies_and_still_empties_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "engine.log"
    path.write_bytes(b"now\n" * 10)
    (tmp_path / "engine.log.1").write_bytes(b"before\n")

    def disk_full(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", disk_full)
    assert rotate_if_over(path, 1, keep=2)
    assert path.read_bytes() == b""
    assert (tmp_path / "engine.log.1").read_bytes() == b"before\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine.log", "engine.log.1"]


def test_an_engines_log_is_rotated_while_it_runs(tmp_path: Path) -> None:
    """`fleet up` with an engine whose log grows: it is rotated at the size set, without
    stopping the engine."""
    engines = {"log_max_mb": 0.001, "log_keep": 1, "health_interval": 0.2}
    path = fake_fleet_file(tmp_path, {"smol": {"model": "org/smol"}}, engines=engines)
    log_path = load(path).log_dir() / "smol-0.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_fleet.cli", "up", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(log_path.exists, what="the engine's log")
        with open(log_path, "ab") as more:  # the engine's output, grown past the limit
            more.write(b"x" * 2048)
        rotated = log_path.with_name("smol-0.log.1")
        wait_until(rotated.exists, timeout=20, what="the rotated log")
        assert rotated.stat().st_size >= 2048
        assert log_path.stat().st_size < 2048
        assert proc.poll() is None  # the fleet and its engine went on
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_the_log_size_settings_are_checked_at_load(tmp_path: Path) -> None:
    path = fake_fleet_file(tmp_path, {"smol": {"model": "org/smol"}}, engines={"log_max_mb": 0})
    with pytest.raises(ConfigError, match="log_max_mb"):
        load(path)
