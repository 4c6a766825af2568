"""What the status page shows of each deployment's last minutes (gateway/recent.py)."""

from __future__ import annotations

from vllm_fleet.gateway.recent import KEEP_S, SAMPLES, STEP_S, WINDOW_S, Recent, percentile

T0 = 1_800_000_000.0  # a unix time on a bucket boundary (1_800_000_000 % 5 == 0)


def test_percentiles_are_nearest_rank_and_none_without_samples() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.95) == 95.0
    assert percentile([7.0], 0.95) == 7.0
    assert percentile([], 0.5) is None


def test_the_last_minute_counts_requests_errors_ttft_and_tokens() -> None:
    recent = Recent()
    for i in range(20):  # 20 answers over the last 40 s, 2 of them 502s
        status = 502 if i in (3, 7) else 200
        ttft = None if status != 200 else 0.010 * (i + 1)
        recent.add("qwen", status, ttft, 10, T0 - 40 + 2 * i)
    recent.add("other", 200, 5.0, 1000, T0 - 1)  # another deployment's answer
    figures = recent.figures("qwen", T0)
    assert figures["requests"] == 20
    assert figures["errors"] == 2
    # The window starts at the first bucket wholly inside the last minute: 55 s ago.
    assert (WINDOW_S, STEP_S) == (60, 5)
    assert figures["rps"] == round(20 / 55, 3)
    assert figures["tokens_per_s"] == round(200 / 55, 2)
    ttfts = sorted(0.010 * (i + 1) for i in range(20) if i not in (3, 7))
    assert figures["ttft_p50_ms"] == round(ttfts[8] * 1e3, 1)  # nearest rank 9 of 18
    assert figures["ttft_p95_ms"] == round(ttfts[17] * 1e3, 1)


def test_answers_older_than_the_window_leave_the_figures_but_stay_in_the_series() -> None:
    recent = Recent()
    recent.add("qwen", 200, 0.5, 1, T0 - 120)
    assert recent.figures("qwen", T0)["requests"] == 0
    assert recent.figures("qwen", T0)["ttft_p50_ms"] is None
    series = recent.series("qwen", T0)
    assert len(series["t"]) == KEEP_S // STEP_S
    at = series["t"].index(T0 - 120)
    assert series["rps"][at] == round(1 / STEP_S, 3)
    assert series["ttft_p50_ms"][at] == 500.0
    assert series["ttft_p50_ms"][at + 1] is None and series["rps"][at + 1] == 0.0
    assert series["t"] == sorted(series["t"]) and series["t"][-1] == T0


def test_buckets_past_the_series_are_dropped() -> None:
    recent = Recent()
    recent.add("qwen", 200, 0.1, 1, T0)
    recent.add("qwen", 200, 0.1, 1, T0 + KEEP_S + STEP_S)  # a new bucket prunes the old
    assert len(recent._buckets["qwen"]) == 1


def test_a_bucket_keeps_a_bounded_sample_of_times_to_first_token() -> None:
    recent = Recent()
    for i in range(SAMPLES * 3):
        recent.add("qwen", 200, 1.0 if i < SAMPLES * 2 else 2.0, 0, T0)
    (bucket,) = recent._buckets["qwen"].values()
    assert len(bucket.ttfts) == SAMPLES and bucket.requests == SAMPLES * 3
    assert set(bucket.ttfts) == {2.0}  # the newest replaced the oldest in turn


def test_an_unknown_deployment_reads_as_no_traffic() -> None:
    figures = Recent().figures("nope", T0)
    assert figures["requests"] == 0 and figures["rps"] == 0.0 and figures["ttft_p95_ms"] is None
