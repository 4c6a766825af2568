"""Which replica takes a request, and its next try (`gateway.replicas.pick`, pure), and
the passive ejection it reads (`Upstream.eject` / `readmit`)."""

from __future__ import annotations

import time

import pytest

from vllm_fleet.gateway.replicas import pick
from vllm_fleet.registry import State, Upstream


def upstreams(count: int, *outstanding: int) -> list[Upstream]:
    ups = [
        Upstream(f"d-{i}", "d", f"http://127.0.0.1:{9000 + i}", False, None, State.READY)  # type: ignore[arg-type]
        for i in range(count)
    ]
    for up, busy in zip(ups, outstanding, strict=False):
        up.outstanding = busy
    return ups


def test_the_replica_with_the_fewest_outstanding_requests_is_picked() -> None:
    ups = upstreams(3, 4, 1, 2)
    assert all(pick(ups, set(), turn) is ups[1] for turn in range(6))


def test_ties_take_turns() -> None:
    ups = upstreams(3)
    assert [pick(ups, set(), turn) for turn in range(6)] == [*ups, *ups]


@pytest.mark.parametrize("state", [s for s in State if s is not State.READY])
def test_a_replica_that_is_not_ready_is_never_picked(state: State) -> None:
    ups = upstreams(2, 5, 0)
    ups[1].set_state(state)
    assert all(pick(ups, set(), turn) is ups[0] for turn in range(4))
    assert pick(ups[1:], set(), 0) is None


def test_an_ejected_replica_is_never_picked_until_readmitted() -> None:
    ups = upstreams(2, 5, 0)
    ups[1].eject("ConnectionRefusedError")
    assert all(pick(ups, set(), turn) is ups[0] for turn in range(4))
    assert pick(ups[1:], set(), 0) is None  # alone: still out (the deployment answers 503)
    assert ups[1].readmit(time.monotonic())
    assert pick(ups, set(), 0) is ups[1]


def test_a_failover_tries_each_replica_at_most_once() -> None:
    ups = upstreams(3)
    tried: set[Upstream] = set()
    order = []
    for turn in range(5):
        chosen = pick(ups, tried, turn)
        if chosen is None:
            break
        tried.add(chosen)
        order.append(chosen)
    assert sorted(u.name for u in order) == ["d-0", "d-1", "d-2"]
    assert pick(ups[:1], {ups[0]}, 0) is None


def test_no_candidates_no_replica() -> None:
    assert pick([], set(), 0) is None


def test_readmit_takes_only_a_health_check_begun_after_the_ejection() -> None:
    (up,) = upstreams(1)
    before = time.monotonic()
    assert up.eject("closed unanswered")
    assert not up.eject("closed unanswered again")  # already out: not a new ejection
    assert up.snapshot()["ejected"] == "closed unanswered again"
    assert not up.readmit(before)  # began before the failure: says nothing about it
    assert up.ejected is not None
    assert up.readmit(time.monotonic())
    assert up.ejected is None and up.snapshot()["ejected"] is None
    assert not up.readmit(time.monotonic())  # in the rotation already
