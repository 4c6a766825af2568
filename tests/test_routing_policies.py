"""The routing policies (`routing:`; gateway/policies/, pure) with fake upstreams: the
same conversation goes to the same replica while it is within the load bound, over the
bound it goes elsewhere, a replica that leaves moves only its own share; sessions by
header or `user`; round robin; what the prompt hashing reads of a request."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from typing import Any

import pytest

from vllm_fleet.config import ConfigError, loads
from vllm_fleet.gateway.body import Body
from vllm_fleet.gateway.policies import check_lines, for_fleet
from vllm_fleet.gateway.policies.load import within_bound
from vllm_fleet.gateway.policies.prefix import PrefixPolicy
from vllm_fleet.gateway.policies.round_robin import RoundRobin
from vllm_fleet.gateway.policies.session import SessionPolicy
from vllm_fleet.gateway.prompt import BLOCK, MAX_BLOCKS, prompt_blocks
from vllm_fleet.registry import State, Upstream


def upstreams(count: int) -> list[Upstream]:
    return [
        Upstream(f"d-{i}", "d", f"http://127.0.0.1:{9000 + i}", False, None, State.READY)  # type: ignore[arg-type]
        for i in range(count)
    ]


def words(seed: int, count: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(("alpha", "beta", "gamma", "delta", "omega")) for _ in range(count))


def conversation(seed: int, turns: int) -> list[dict[str, Any]]:
    """The messages of a conversation's turn `turns`: its own system prompt, then each
    earlier turn's question and answer."""
    messages = [{"role": "system", "content": f"conversation {seed}: {words(seed, 200)}"}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"question {turn}: {words(seed + turn, 20)}"})
        messages.append({"role": "assistant", "content": f"answer {turn}"})
    messages.append({"role": "user", "content": "and next?"})
    return messages


def body(**obj: Any) -> Body:
    return Body(obj, True)


TURNS = itertools.count()  # as the gateway's: one more per pick, where ties start


def route(policy: PrefixPolicy, ups: list[Upstream], messages: list[dict[str, Any]]) -> Upstream:
    chosen = policy.pick(ups, set(), policy.hint(body(messages=messages), ()), next(TURNS))
    assert chosen is not None
    return chosen


def test_every_turn_of_a_conversation_goes_where_its_first_turn_went() -> None:
    ups, policy = upstreams(3), PrefixPolicy()
    first = {seed: route(policy, ups, conversation(seed, 0)) for seed in range(12)}
    # Idle replicas: new conversations spread over all of them (least loaded, in turn).
    assert set(first.values()) == set(ups)
    for turn in range(1, 6):
        for seed in range(12):
            assert route(policy, ups, conversation(seed, turn)) is first[seed], (seed, turn)
    assert policy.stats()["hits"] == 12 * 5 and policy.stats()["misses"] == 12


def test_a_replica_over_the_load_bound_sends_the_conversation_elsewhere() -> None:
    ups, policy = upstreams(2), PrefixPolicy()
    home = route(policy, ups, conversation(1, 0))
    other = next(u for u in ups if u is not home)
    home.outstanding = 1  # within the bound: a second request while the other is idle
    assert route(policy, ups, conversation(1, 1)) is home
    home.outstanding = 2  # over: 3 against a mean of 1.5
    assert not within_bound(home, ups)
    moved = route(policy, ups, conversation(1, 2))
    assert moved is other and policy.stats()["spills"] == 1
    home.outstanding = 0
    # Its longest prefix is now remembered on the other replica: the next turn follows.
    assert route(policy, ups, conversation(1, 3)) is other


def test_requests_the_engine_reports_waiting_count_as_load() -> None:
    ups, policy = upstreams(2), PrefixPolicy()
    home = route(policy, ups, conversation(7, 0))
    home.engine_waiting = 3  # a queue at the engine the gateway did not send
    assert route(policy, ups, conversation(7, 1)) is not home


def test_a_full_kv_cache_is_over_the_bound_while_another_has_room() -> None:
    ups, policy = upstreams(2), PrefixPolicy()
    home = route(policy, ups, conversation(8, 0))
    home.kv_cache = 0.97
    assert route(policy, ups, conversation(8, 1)) is not home
    for up in ups:
        up.kv_cache = 0.97  # all full: the prefix wins again
    assert route(policy, ups, conversation(8, 2)) is not home  # now held by the other


def test_a_replica_that_leaves_moves_only_its_own_conversations() -> None:
    ups, policy = upstreams(3), PrefixPolicy()
    first = {seed: route(policy, ups, conversation(seed, 0)) for seed in range(30)}
    gone = ups[1]
    gone.set_state(State.FAILED)
    after = {seed: route(policy, ups, conversation(seed, 1)) for seed in range(30)}
    for seed, was in first.items():
        if was is gone:
            assert after[seed] is not gone
        else:
            assert after[seed] is was, seed  # untouched by the other's leaving
    gone.set_state(State.READY)  # back: its conversations now live elsewhere and stay
    again = {seed: route(policy, ups, conversation(seed, 2)) for seed in range(30)}
    assert again == after


def test_a_replica_this_request_tried_already_is_not_picked_again() -> None:
    ups, policy = upstreams(2), PrefixPolicy()
    home = route(policy, ups, conversation(3, 0))
    hint = policy.hint(body(messages=conversation(3, 1)), ())
    assert policy.pick(ups, {home}, hint, 0) is not home
    assert policy.pick(ups, set(ups), hint, 0) is None


def test_the_table_forgets_the_least_recently_used_blocks_first() -> None:
    ups, policy = upstreams(2), PrefixPolicy(capacity=20)
    route(policy, ups, conversation(1, 0))
    assert policy.stats()["blocks"] <= 20
    for seed in range(2, 10):
        route(policy, ups, conversation(seed, 0))
    assert policy.stats()["blocks"] == 20
    assert policy.holder(policy.hint(body(messages=conversation(1, 0)), ()) or (), ups) is None


def test_prompt_blocks_chain_whole_blocks_of_the_prompt_in_order() -> None:
    short = body(messages=[{"role": "user", "content": "hi"}])
    assert prompt_blocks(short.obj) == ()  # shorter than a block: nothing to share
    turn1 = prompt_blocks({"messages": conversation(5, 1)})
    turn2 = prompt_blocks({"messages": conversation(5, 4)})
    shared = len(turn1) - 1  # the last block of turn 1 holds its closing question
    assert turn1[:shared] == turn2[:shared] and len(turn2) > len(turn1)
    assert prompt_blocks({"messages": conversation(6, 1)})[0] != turn1[0]
    text = "x" * (BLOCK * 3)
    assert len(prompt_blocks({"prompt": text})) == 3
    assert prompt_blocks({"prompt": [text]}) == prompt_blocks({"prompt": text})
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}
    assert prompt_blocks(parts) == prompt_blocks({"messages": [{"role": "user", "content": text}]})
    assert prompt_blocks({"input": text}) == prompt_blocks({"prompt": text})
    assert len(prompt_blocks({"prompt": "y" * (BLOCK * 1000)})) == MAX_BLOCKS  # the first 8 KiB
    assert prompt_blocks({"messages": "not a list", "prompt": 3}) == ()


def test_sessions_stick_by_header_or_user_and_spread_over_replicas() -> None:
    ups, policy = upstreams(4), SessionPolicy("X-Session-Id")
    lines = [b"X-Session-ID", b": ", b"abc", b"\r\n"]
    assert policy.hint(None, lines) == "abc"  # the header's name in any case
    assert policy.hint(body(user="u1"), [b"Accept", b": ", b"*/*", b"\r\n"]) == "u1"
    assert policy.hint(body(), ()) is None
    homes = {}
    for session in (f"s{i}" for i in range(200)):
        homes[session] = policy.pick(ups, set(), session, 0)
        assert all(policy.pick(ups, set(), session, t) is homes[session] for t in range(3))
    spread = Counter(homes.values())
    assert len(spread) == 4 and min(spread.values()) >= 25, spread


def test_a_session_over_the_bound_goes_to_its_next_choice_and_leaving_moves_only_its_own() -> None:
    ups, policy = upstreams(3), SessionPolicy("x-session-id")
    homes = {s: policy.pick(ups, set(), s, 0) for s in (f"s{i}" for i in range(60))}
    home = homes["s1"]
    assert home is not None
    home.outstanding = 5
    assert policy.pick(ups, set(), "s1", 0) is not home
    home.outstanding = 0
    gone = ups[2]
    gone.set_state(State.STOPPED)
    for session, was in homes.items():
        now = policy.pick(ups, set(), session, 0)
        assert now is not gone and (was is gone or now is was), session
    assert policy.pick(ups, set(), None, 0) is not None  # no session: least loaded


def test_round_robin_takes_each_replica_in_turn_whatever_its_load() -> None:
    ups, policy = upstreams(3), RoundRobin()
    ups[0].outstanding = 9
    assert [policy.pick(ups, set(), None, 0) for _ in range(6)] == [*ups, *ups]


def test_policies_are_kept_across_a_reload_while_the_deployment_keeps_its_policy() -> None:
    def fleet(routing: str, header: str = "x-session-id") -> Any:
        return loads(
            f"gateway: {{session_header: {header}}}\n"
            "deployments:\n"
            f"  a: {{model: org/a, endpoints: [http://127.0.0.1:9001], routing: {routing}}}\n"
            "  b: {model: org/b, endpoints: [http://127.0.0.1:9002]}\n"
        )

    first = for_fleet(fleet("prefix"), {})
    assert set(first) == {"a"}  # b routes by least outstanding: the default, no policy
    assert for_fleet(fleet("prefix"), first)["a"] is first["a"]  # what it learnt stays
    assert isinstance(for_fleet(fleet("session"), first)["a"], SessionPolicy)
    sessions = for_fleet(fleet("session"), {})
    assert for_fleet(fleet("session", "x-user"), sessions)["a"] is not sessions["a"]


def test_fleet_check_says_each_policy_and_where_it_can_do_nothing() -> None:
    config = loads(
        "deployments:\n"
        "  chat: {model: org/c, replicas: 2, routing: prefix}\n"
        "  nocache: {model: org/o, replicas: 2, routing: prefix,"
        " args: [--no-enable-prefix-caching]}\n"
        "  one: {model: org/one, routing: session}\n"
        "  plain: {model: org/p, replicas: 2}\n"
    )
    assert check_lines(config) == [
        "routing: chat by prefix over 2 replica(s)",
        "routing: nocache by prefix over 2 replica(s); its engines run with "
        "--no-enable-prefix-caching: no cache to route to",
        "routing: one by session over 1 replica(s) (the x-session-id header, else the body's "
        "`user`); with one replica there is nothing to choose (add replicas)",
    ]


def test_a_request_without_a_prompt_goes_to_the_least_loaded_and_is_not_counted() -> None:
    ups, policy = upstreams(2), PrefixPolicy()
    ups[0].outstanding = 3
    assert policy.pick(ups, set(), policy.hint(None, ()), 0) is ups[1]
    short = policy.hint(body(messages=[{"role": "user", "content": "hi"}]), ())
    assert policy.pick(ups, set(), short, 0) is ups[1]
    assert policy.stats() == {"policy": "prefix", "hits": 0, "misses": 0, "spills": 0, "blocks": 0}


@pytest.mark.parametrize("header", ["X-Request-Id", "authorization", "api-key", "Connection"])
def test_a_session_header_the_gateway_consumes_is_refused_at_load(header: str) -> None:
    with pytest.raises(ConfigError, match=r"gateway\.session_header: .* reads or replaces itself"):
        loads(f"gateway: {{session_header: {header}}}\ndeployments: {{a: {{model: org/a}}}}\n")


def test_every_header_the_relay_does_not_pass_on_as_sent_is_refused_as_a_session_header() -> None:
    from vllm_fleet.config.models import GATEWAY_HEADERS
    from vllm_fleet.gateway.relay.request import CTYPE, HEADER_KIND, TRACE

    passed_on = (CTYPE, TRACE)  # kept in the forwarded lines as sent
    consumed = {name.decode() for name, kind in HEADER_KIND.items() if kind not in passed_on}
    assert consumed <= GATEWAY_HEADERS
