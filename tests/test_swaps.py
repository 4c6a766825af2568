"""swaps.py: what a swap group (or a lone on-demand deployment) does next. Pure."""

from __future__ import annotations

from pathlib import Path

from vllm_fleet.plan import EngineSpec
from vllm_fleet.registry import State, Upstream
from vllm_fleet.swaps import Load, Member, Phase, Unload, Wait, next_step, phase_of, sleep_fits


def member(
    name: str,
    phase: Phase = Phase.UNLOADED,
    in_flight: int = 0,
    queued: float | None = None,
    last_used: float = 0.0,
    loaded_at: float = 0.0,
    idle_timeout: float | None = None,
    min_hold: float = 10.0,
    retry_at: float = 0.0,
) -> Member:
    return Member(
        name, phase, in_flight, queued, last_used, loaded_at, idle_timeout, min_hold, retry_at
    )


def test_nothing_asked_for_nothing_done() -> None:
    assert next_step([member("a"), member("b", Phase.LOADED)], 100.0) == Wait(None)


def test_free_gpus_load_at_once() -> None:
    step = next_step([member("a", queued=99.0), member("b")], 100.0)
    assert step == Load("a", ())


def test_an_idle_holder_makes_room_at_once_even_within_min_hold() -> None:
    members = [member("a", queued=99.0), member("b", Phase.LOADED, loaded_at=99.5)]
    assert next_step(members, 100.0) == Load("a", ("b",))


def test_a_busy_holder_keeps_the_gpus_for_its_min_hold() -> None:
    members = [
        member("a", queued=99.0),
        member("b", Phase.LOADED, in_flight=3, loaded_at=95.0, min_hold=10.0),
    ]
    assert next_step(members, 100.0) == Wait(105.0)
    # Once the hold is up, it is drained and unloaded for the one waiting.
    assert next_step(members, 105.0) == Load("a", ("b",))


def test_the_oldest_request_goes_first() -> None:
    members = [
        member("a", queued=50.0),
        member("b", queued=40.0),
        member("c", Phase.LOADED),
    ]
    assert next_step(members, 100.0) == Load("b", ("c",))


def test_a_sleeping_member_is_not_a_holder() -> None:
    members = [member("a", queued=99.0), member("b", Phase.SLEEPING)]
    assert next_step(members, 100.0) == Load("a", ())


def test_requests_for_a_member_coming_up_wait_for_it() -> None:
    members = [member("a", Phase.LOADING, queued=99.0), member("b")]
    assert next_step(members, 100.0) == Wait(None)


def test_a_failed_load_is_not_retried_before_its_time() -> None:
    members = [member("a", Phase.FAILED, queued=99.0, retry_at=130.0), member("b", Phase.LOADED)]
    assert next_step(members, 100.0) == Wait(130.0)
    assert next_step(members, 130.0) == Load("a", ("b",))


def test_idle_unload_after_idle_timeout() -> None:
    members = [member("a", Phase.LOADED, last_used=10.0, idle_timeout=60.0)]
    assert next_step(members, 50.0) == Wait(70.0)
    step = next_step(members, 70.0)
    assert isinstance(step, Unload) and step.deployment == "a"


def test_no_idle_unload_with_requests_in_flight_or_without_idle_timeout() -> None:
    busy = [member("a", Phase.LOADED, in_flight=1, last_used=0.0, idle_timeout=5.0)]
    assert next_step(busy, 100.0) == Wait(None)
    forever = [member("a", Phase.LOADED, last_used=0.0)]
    assert next_step(forever, 1e9) == Wait(None)


def test_two_holders_after_a_reload_are_both_evicted() -> None:
    members = [member("a", queued=1.0), member("b", Phase.LOADED), member("c", Phase.LOADED)]
    assert next_step(members, 100.0) == Load("a", ("b", "c"))


def _upstream(state: State) -> Upstream:
    spec = EngineSpec(
        "d", 0, ("x",), {}, "127.0.0.1", 1, None, Path("/tmp/d.log"), 1.0, Path("."),
        ("d",), None, None,
    )  # fmt: skip
    up = Upstream("d-0", "d", "http://127.0.0.1:1", True, spec)
    up.set_state(state)
    return up


def test_phase_of_engine_states() -> None:
    assert phase_of([_upstream(State.READY), _upstream(State.STARTING)]) is Phase.LOADED
    assert phase_of([_upstream(State.STARTING)]) is Phase.LOADING
    assert phase_of([_upstream(State.SLEEPING)]) is Phase.SLEEPING
    assert phase_of([_upstream(State.UNLOADING)]) is Phase.UNLOADING
    assert phase_of([_upstream(State.UNLOADED)]) is Phase.UNLOADED
    assert phase_of([_upstream(State.FAILED)]) is Phase.FAILED


def test_sleep_fits_in_host_memory() -> None:
    gib = 2**30
    assert sleep_fits(2 * gib, 16 * gib) is None
    assert sleep_fits(None, 1) is None  # unknown: given the benefit of the doubt
    said = sleep_fits(14 * gib, 16 * gib)
    assert said is not None and "14.0 GiB" in said and "16.0 GiB" in said
