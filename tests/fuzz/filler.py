"""Filler: text and tokens made from one hypothesis choice (a seed), not one per character.

Hypothesis spends about 0.2 ms on each choice it records; a string drawn character by
character costs as much as the rest of a request. The content of a name, a header value
or a prompt rarely matters to the gateway, so it comes from `random.Random(seed)`: still
reproducible, and shrinking moves the seed towards 0 (the empty or shortest filler).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from hypothesis import strategies as st

T = TypeVar("T")
SEEDS = st.integers(min_value=0, max_value=(1 << 32) - 1)

TOKEN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~"
# Visible ASCII, space and tab, and obs-text (as latin-1): what a header value may hold.
FIELD = "".join(chr(c) for c in range(0x20, 0x7F)) + "\t\x80\xe9\xff"
# Text for JSON strings: ASCII (but E, e, T, t: no "Error", "Exception" or "Traceback"
# can be spelt), controls, and characters from other planes and scripts.
TEXT = (
    "abcdfghijklmnopqrsuvwxyzABCDFGHIJKLMNOPQRSUVWXYZ0123456789 !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    "\x00\x01\x1f\x7f\u00e9\u00fc\u2028\u2029\ufeff\u65e5\u672c\U0001f600\U00010348"
)
PATH = "abcdwxyz0189-._~!$&'()*+,;=:@%"


def _string(seed: int, alphabet: str, longest: int, shortest: int = 0) -> str:
    rng = random.Random(seed)
    size = 0 if seed == 0 else rng.randint(shortest, longest)
    return "".join(rng.choice(alphabet) for _ in range(max(size, shortest)))


def tokens(longest: int = 20) -> st.SearchStrategy[str]:
    return SEEDS.map(lambda s: _string(s, TOKEN, longest, shortest=1))


def field_values(longest: int = 60) -> st.SearchStrategy[str]:
    return SEEDS.map(lambda s: _string(s, FIELD, longest).strip(" \t"))


def texts(longest: int = 40) -> st.SearchStrategy[str]:
    return SEEDS.map(lambda s: _string(s, TEXT, longest))


def path_segments(longest: int = 12) -> st.SearchStrategy[str]:
    return SEEDS.map(lambda s: _string(s, PATH, longest))


def percent_encoded(path: str, seed: int) -> str:
    """`path` with about one character in five percent-encoded (either case of hex)."""
    rng = random.Random(seed)
    out = []
    for char in path:
        if char != "/" and rng.random() < 0.2:
            hex_ = f"{ord(char):02x}"
            out.append("%" + (hex_.upper() if rng.random() < 0.5 else hex_))
        else:
            out.append(char)
    return "".join(out)


_INTS: dict[tuple[int, int], st.SearchStrategy[int]] = {}


def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    """`st.integers(lo, hi)`, made once: a strategy built inside a draw is validated anew
    each time, which costs more than the draw."""
    strategy = _INTS.get((lo, hi))
    if strategy is None:
        strategy = _INTS[(lo, hi)] = st.integers(lo, hi)
    return strategy


def pick(draw: st.DrawFn, options: Sequence[T]) -> T:
    """One of `options` (shrinks towards the first), like `st.sampled_from`."""
    return options[draw(ints(0, len(options) - 1))]
