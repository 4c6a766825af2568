"""Pure: the routing policies a deployment can choose (`routing:` in the fleet file), one
module each, behind one small interface (DESIGN.md: routing policies):

- `least_outstanding` (the default): the replica with the fewest requests in flight
  through the gateway; ties take turns. gateway/replicas.py, the fast path.
- `round_robin`: each replica in turn (round_robin.py).
- `prefix`: the replica that served the longest prefix of this prompt before, whose KV
  blocks vLLM's prefix cache likely still holds, while it is within the load bound; else
  the least loaded (prefix.py).
- `session`: the same replica for the same session (a header, or the body's `user`),
  by rendezvous hashing, within the load bound (session.py).

A policy's `hint(parsed, lines)` reads what it needs of a request (gateway/prompt.py),
once, in the gateway's routing step; `pick(candidates, tried, hint, turn)` chooses among
the replicas that may take it (load.py: ready, in the rotation, not tried by this
request) and remembers what it must. Policies do no I/O; their state (the prefix table)
lives as long as the deployment keeps its policy, across reloads.
"""

from __future__ import annotations

from collections.abc import Mapping

from vllm_fleet.config import FleetConfig
from vllm_fleet.gateway.policies.base import Hint, Policy
from vllm_fleet.gateway.policies.prefix import PrefixPolicy
from vllm_fleet.gateway.policies.round_robin import RoundRobin
from vllm_fleet.gateway.policies.session import SessionPolicy

__all__ = ["Hint", "Policy", "check_lines", "for_fleet", "make"]


def for_fleet(config: FleetConfig, prior: Mapping[str, Policy]) -> dict[str, Policy]:
    """The policy of every deployment (and adapter: its base's `routing`) that does not
    route by least outstanding; `prior`'s are kept, with what they learnt, where the
    policy (and a session policy's header) stays the same."""
    header = config.gateway.session_header
    wanted = {d_id: d.routing for d_id, d in config.deployments.items()}
    wanted |= {a_id: wanted.get(a.base, "least_outstanding") for a_id, a in config.adapters.items()}
    out: dict[str, Policy] = {}
    for dep_id, name in wanted.items():
        kept = prior.get(dep_id)
        if kept is not None and _same(kept, name, header):
            out[dep_id] = kept
            continue
        made = make(name, header)
        if made is not None:
            out[dep_id] = made
    return out


def _same(kept: Policy, name: str, header: str) -> bool:
    """Whether `kept` is the policy `name` would make (a session one, with its header)."""
    if kept.name != name:
        return False
    return not isinstance(kept, SessionPolicy) or kept.header == header.lower().encode("latin-1")


def make(name: str, session_header: str) -> Policy | None:
    """The policy called `name`; None for `least_outstanding` (gateway/replicas.py)."""
    if name == "prefix":
        return PrefixPolicy()
    if name == "session":
        return SessionPolicy(session_header)
    if name == "round_robin":
        return RoundRobin()
    return None


def check_lines(config: FleetConfig) -> list[str]:
    """What `fleet check` says of the deployments that route by another policy than the
    default: the policy, over how many replicas, and where it can do nothing."""
    out: list[str] = []
    for dep_id, dep in config.deployments.items():
        if dep.routing == "least_outstanding":
            continue
        count = len(dep.endpoints) or dep.replicas
        line = f"routing: {dep_id} by {dep.routing} over {count} replica(s)"
        if dep.routing == "session":
            line += f" (the {config.gateway.session_header} header, else the body's `user`)"
        if count < 2:
            line += "; with one replica there is nothing to choose (add replicas)"
        elif dep.routing == "prefix" and "--no-enable-prefix-caching" in dep.args:
            line += "; its engines run with --no-enable-prefix-caching: no cache to route to"
        out.append(line)
    return out
