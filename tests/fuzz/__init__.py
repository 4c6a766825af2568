"""Fuzzing the gateway over real sockets: `make fuzz` (tests/fuzz/__main__.py) runs a
campaign of hypothesis-generated raw HTTP/1.1 requests against `fleet up`, and
tests/test_fuzz_gateway.py runs a short one in the suite.

grammar.py, bodies.py and filler.py generate; upstream.py is the recording engine; fleet.py
runs the gateway; oracle.py holds the invariants; campaign.py drives it all.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis.configuration import set_hypothesis_home_dir

# Hypothesis keeps caches (and, were it on, its example database: the campaigns turn it
# off) under .hypothesis/; outside the repository.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "vllm-fleet-hypothesis")
