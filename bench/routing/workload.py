"""The workloads: multi-turn conversations that share a long prefix turn after turn, and a
control of one-turn requests that share none. Deterministic for a seed, so every setup
sends the very same requests in the same order.

The assistant's turns in a conversation's history are made-up text, not the engine's
answer, so the prompts do not depend on which setup produced the previous answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

# Plain English words: each is one or two tokens for SmolLM2's tokenizer.
_WORDS = (
    "the of and to in is was for on are with as by at from this that which have has be "
    "not or one all were when there been their more will would about into time only new "
    "some could these two may first then do any like other than now people my made over "
    "did down way find use water long little very after word called just where most know "
    "get through back much before go good own same right take three also around another "
    "came come work must part because does even place well such here think help every "
    "line set end why turn ask went men read need land different home move try kind hand "
    "picture again change off play spell air away animal house point page letter mother "
    "answer found study still learn should America world high near add food between below "
    "country plant last school father keep tree never start city earth eye light thought "
    "head under story saw left few while along might close something seem next hard open "
    "example begin life always those both paper together got group often run important "
    "until children side feet car mile night walk white sea began grow took river four "
    "carry state once book hear stop without second late miss idea enough eat face watch"
)
WORDS = tuple(_WORDS.split())


@dataclass(frozen=True)
class Shape:
    """The size of a workload."""

    # Odd, so round robin's alternation cannot line up with the conversations' order.
    conversations: int = 15
    turns: int = 6
    system_words: int = 400  # several hundred tokens of system prompt per conversation
    user_words: int = 24
    assistant_words: int = 24
    max_tokens: int = 8
    concurrency: int = 4  # requests in flight at once
    control_requests: int = 16
    seed: int = 16


@dataclass
class Conversation:
    """One conversation: its system prompt and its user turns, asked in order, each with
    every earlier turn (and a made-up answer) in its history."""

    index: int
    system: str
    users: list[str]
    answers: list[str]
    replicas: list[str] = field(default_factory=list)  # who answered each turn, if known

    def messages(self, turn: int) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.system}]
        for earlier in range(turn):
            messages.append({"role": "user", "content": self.users[earlier]})
            messages.append({"role": "assistant", "content": self.answers[earlier]})
        messages.append({"role": "user", "content": self.users[turn]})
        return messages


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def conversations(shape: Shape) -> list[Conversation]:
    rng = random.Random(shape.seed)
    return [
        Conversation(
            index=i,
            system=f"You are assistant number {i}. {_text(rng, shape.system_words)}",
            users=[f"Question {t}: {_text(rng, shape.user_words)}?" for t in range(shape.turns)],
            answers=[_text(rng, shape.assistant_words) + "." for _ in range(shape.turns)],
        )
        for i in range(shape.conversations)
    ]


def control(shape: Shape) -> list[list[dict[str, Any]]]:
    """One-turn requests of a first turn's size, each with a system prompt of its own from
    its first word (a system message, so the chat template adds no default one: nothing is
    shared but the template's first few tokens, less than a KV block)."""
    rng = random.Random(shape.seed + 1)
    return [
        [
            {"role": "system", "content": f"Request {i}. {_text(rng, shape.system_words)}"},
            {"role": "user", "content": f"{_text(rng, shape.user_words)}?"},
        ]
        for i in range(shape.control_requests)
    ]
