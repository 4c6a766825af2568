"""A fuzz campaign: the gateway (`fleet up`, its own process) in front of the recording
engine, and hypothesis-generated cases sent to it over real sockets, in batches.

Every case is checked as it runs (oracle.py); every `CHECK_EVERY` cases a plain valid
request must still be answered by the engine, the gateway must be alive and its RSS is
sampled; at the end its output must hold no traceback and no client connection may be
left open. Batch `b` of a campaign with seed `s` runs with hypothesis seed `s + b`, so a
failing batch reruns alone with `--seed s+b --count <batch size>`.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

from tests.fuzz.fleet import FleetGateway
from tests.fuzz.grammar import PLACEHOLDER, Case, Fate, Req, cases
from tests.fuzz.oracle import Broken, Outcome, check_seen, converse, leaks
from tests.fuzz.upstream import RecordingEngine, Seen

BATCH = 1000
CHECK_EVERY = 250
WINDOW = 5000  # cases whose requests are remembered, for engine records that come late
RSS_GROWTH_LIMIT_KIB = 200 * 1024  # peak RSS over the start's, past which memory "leaks"
PLAIN = (
    b"POST /raw/v1/chat/completions HTTP/1.1\r\nHost: t\r\nX-Fuzz-Id: %s\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
)
PLAIN_BODY = b'{"model":"anything","messages":[{"role":"user","content":"hi"}]}'


class GatewayDown(BaseException):
    """The gateway process is gone: no later case can say anything (not shrunk)."""


@dataclass
class Sent:
    """A case as sent: its number, requests (ids bound), and what the client saw."""

    number: int
    case: Case
    reqs: tuple[Req, ...]
    by_id: dict[bytes, int]  # X-Fuzz-Id -> index of the request
    smuggled: set[bytes]
    outcome: Outcome | None = None
    relayed: int = 0  # answers that came from the engine (or its failure, 502)
    seen: list[bytes] = field(default_factory=list)

    @property
    def first_close(self) -> int | None:
        for index, req in enumerate(self.reqs):
            if req.closes or req.fate is Fate.REFUSE:
                return index
        return None


@dataclass
class Figures:
    cases: int = 0
    requests: int = 0
    answers: int = 0
    engine_requests: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    fates: collections.Counter[str] = field(default_factory=collections.Counter)
    notes: collections.Counter[str] = field(default_factory=collections.Counter)
    timeouts: int = 0
    resets: int = 0
    early_closes: int = 0
    plain_checks: int = 0
    late_records: int = 0
    rss_kib: list[int] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    timed_out_notes: collections.Counter[str] = field(default_factory=collections.Counter)


def bind(case: Case, number: int) -> tuple[bytes, tuple[Req, ...]]:
    """The case's bytes and requests with its number in the id placeholder."""
    tag = b"%08x" % number
    reqs = tuple(
        replace(
            r,
            wire=r.wire.replace(PLACEHOLDER, tag),
            rid=r.rid.replace(PLACEHOLDER, tag) if r.rid is not None else None,
            body=r.body.replace(PLACEHOLDER, tag),
            smuggled=tuple(s.replace(PLACEHOLDER, tag) for s in r.smuggled),
        )
        for r in case.reqs
    )
    return b"".join(r.wire for r in reqs), reqs


class Campaign:
    """`with Campaign() as c: c.run(count, seed)`; then `c.figures`."""

    def __init__(self, workdir: Path | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="fleet-fuzz-") if workdir is None else None
        self.workdir = Path(self._tmp.name) if self._tmp is not None else workdir  # type: ignore[arg-type]
        self.engine = RecordingEngine()
        self.gateway = FleetGateway(self.workdir, self.engine.port)
        self.figures = Figures()
        self.window: OrderedDict[int, Sent] = OrderedDict()
        self.number = 0

    def __enter__(self) -> Campaign:
        self.gateway.start()
        self.figures.rss_kib.append(self.gateway.rss_kib())
        self.plain_request()
        self.figures.rss_kib[0] = self.gateway.rss_kib()  # warmed up by one request
        return self

    def __exit__(self, *exc: object) -> None:
        self.gateway.stop()
        self.engine.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    # ------------------------------------------------------------ running

    def run(
        self,
        count: int,
        seed: int,
        batch: int = BATCH,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        """`count` cases in batches of `batch`; raises Broken (from hypothesis, shrunk)."""
        done = 0
        index = 0
        batches = -(-count // batch)
        while done < count:
            size = min(batch, count - done)
            self.run_batch(seed + index, size)
            done += size
            index += 1
            if progress is not None:
                figures = self.figures
                rate = figures.cases / (time.monotonic() - figures.started)
                progress(
                    f"batch {index}/{batches} (seed {seed + index - 1}): {figures.cases} cases, "
                    f"{rate:.0f}/s, gateway RSS {self.gateway.rss_kib() // 1024} MiB, "
                    f"{len(figures.findings)} findings"
                )
        self.finish()

    def run_batch(self, batch_seed: int, count: int) -> None:
        @settings(
            max_examples=count,
            database=None,
            deadline=None,
            phases=[Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False,
            print_blob=False,
        )
        @hypothesis_seed(batch_seed)
        @given(cases())
        def fuzz_case(case: Case) -> None:
            self.run_case(case)

        fuzz_case()

    def run_case(self, case: Case) -> None:
        if not self.gateway.alive():
            raise GatewayDown(
                f"the gateway exited ({self.gateway.proc and self.gateway.proc.returncode})"
            )
        self.number += 1
        number = self.number
        wire, reqs = bind(case, number)
        sent = Sent(
            number,
            case,
            reqs,
            {r.rid: i for i, r in enumerate(reqs) if r.rid is not None},
            {s for r in reqs for s in r.smuggled},
        )
        self.window[number] = sent
        if len(self.window) > WINDOW:
            self.window.popitem(last=False)
        figures = self.figures
        figures.cases += 1
        figures.requests += len(reqs)
        for req in reqs:
            figures.fates[req.fate.value] += 1
            figures.notes.update(req.notes)
        figures.notes.update(case.notes)
        try:
            outcome = converse(self.gateway.port, case, wire, reqs)
        except Broken as exc:
            time.sleep(0.002)
            self.drain(current=number)  # its engine records: this case's, already failed
            raise Broken(f"case {number}: {exc}") from None
        except OSError as exc:
            if not self.gateway.alive():
                raise GatewayDown(f"the gateway exited during case {number}") from exc
            raise Broken(f"case {number}: connecting to the gateway failed: {exc}") from None
        sent.outcome = outcome
        figures.answers += len(outcome.answers)
        figures.statuses.update(a.status for a in outcome.answers)
        figures.timeouts += outcome.timed_out and outcome.expected > 0
        figures.resets += outcome.reset
        figures.early_closes += outcome.early_close
        if outcome.timed_out and outcome.expected > 0:
            figures.timed_out_notes.update(n for r in reqs for n in r.notes)
        sent.relayed = sum(
            1
            for a in outcome.answers
            if a.upstream is not None or a.status == 502  # 502: the engine got it, then failed
        )
        found = leaks(bytes(outcome.raw), wire)
        if found:
            context = [around for _, around in found]
            raise Broken(f"case {number}: Python's words in what the gateway sent: {context}")
        if case.early_close or any(r.fate is Fate.PARTIAL for r in reqs):
            time.sleep(0.002)  # let what the gateway forwards (if anything) land
        problems = self.drain(current=number)
        if problems:
            raise Broken(f"case {number}: " + "; ".join(problems))
        if number % CHECK_EVERY == 0:
            self.checkpoint()

    def drain(self, current: int | None = None) -> list[str]:
        """Check the engine's records so far; the current case's problems are returned,
        an earlier case's are findings of their own."""
        mine: list[str] = []
        while True:
            try:
                seen = self.engine.records.get_nowait()
            except queue.Empty:
                break
            self.figures.engine_requests += 1
            problems, number = self.check_record(seen)
            if number == current:
                mine += problems
            elif problems:
                sent = self.window.get(number) if number is not None else None
                wire = bind(sent.case, sent.number)[0][:600] if sent is not None else b"?"
                self.figures.findings += [f"case {number} (late): {p}: {wire!r}" for p in problems]
        while True:
            try:
                problem = self.engine.problems.get_nowait()
            except queue.Empty:
                break
            if current is not None:
                mine.append(problem)
            else:
                self.figures.findings.append(problem)
        if current is not None and not mine:
            sent = self.window[current]
            outcome = sent.outcome
            if outcome is not None and outcome.clean and len(sent.seen) != sent.relayed:
                mine.append(
                    f"the engine received {len(sent.seen)} requests, the client got "
                    f"{sent.relayed} answers from it"
                )
        return mine

    def check_record(self, seen: Seen) -> tuple[list[str], int | None]:
        rid = seen.fuzz_id.encode("latin-1") if seen.fuzz_id is not None else None
        number = None
        if rid is not None and len(rid) > 8:
            with contextlib.suppress(ValueError):
                number = int(rid[:8], 16)
        sent = self.window.get(number) if number is not None else None
        if sent is None:
            if number is not None and number <= self.number - WINDOW:
                self.figures.late_records += 1
                return [], number
            return check_seen(seen, None, 0, None), number
        assert rid is not None
        if rid in sent.smuggled:
            return [
                f"a request hidden in a body reached the engine: {seen.target!r} {rid!r}"
            ], number
        index = sent.by_id.get(rid)
        req = sent.reqs[index] if index is not None else None
        problems = []
        if rid in sent.seen:
            problems.append(f"the engine received request {rid!r} twice")
        sent.seen.append(rid)
        outcome = sent.outcome
        after = sent.first_close
        if outcome is not None and outcome.close_after is not None:
            after = outcome.close_after if after is None else min(after, outcome.close_after)
        problems += check_seen(seen, req, index or 0, after)
        if outcome is not None and outcome.clean and len(sent.seen) > sent.relayed:
            problems.append("the engine received a request the client got no answer for")
        return problems, number

    # ------------------------------------------------------------ health of the gateway

    def plain_request(self) -> None:
        """A plain valid request: the engine answers it, through the gateway."""
        self.number += 1
        rid = b"%08xplain" % self.number
        wire = PLAIN % (rid, len(PLAIN_BODY), PLAIN_BODY)
        req = Req(rid=rid, wire=wire, method="POST", fate=Fate.PASS, body=PLAIN_BODY)
        case = Case((req,))
        self.window[self.number] = Sent(self.number, case, (req,), {rid: 0}, set())
        outcome = converse(self.gateway.port, case, wire, (req,))
        self.window[self.number].outcome = outcome
        answers = outcome.answers
        if len(answers) != 1 or answers[0].status != 200 or answers[0].upstream is None:
            summary = [(a.status, a.body[:200]) for a in answers]
            raise Broken(f"a plain valid request was not answered by the engine: {summary}")
        self.window[self.number].relayed = 1
        problems = self.drain(current=self.number)
        if problems:
            raise Broken("a plain valid request: " + "; ".join(problems))
        self.figures.plain_checks += 1

    def checkpoint(self) -> None:
        if not self.gateway.alive():
            raise GatewayDown("the gateway exited")
        self.plain_request()
        self.figures.rss_kib.append(self.gateway.rss_kib())

    def finish(self) -> None:
        """The end of the campaign: the gateway still answers, leaks nothing, and lets go
        of every client connection."""
        figures = self.figures
        self.checkpoint()
        time.sleep(0.2)
        figures.findings += self.drain()
        open_connections = None
        for _ in range(50):
            open_connections = self.gateway.metric("fleet_client_connections")
            if open_connections is not None and open_connections <= 1:  # this request's own
                break
            time.sleep(0.1)
        if open_connections is None or open_connections > 1:
            figures.findings.append(f"client connections left open at the end: {open_connections}")
        figures.rss_kib.append(self.gateway.rss_kib())
        start, peak = figures.rss_kib[0], max(figures.rss_kib)
        if peak - start > RSS_GROWTH_LIMIT_KIB:
            figures.findings.append(
                f"the gateway's RSS grew from {start // 1024} MiB to {peak // 1024} MiB"
            )
        figures.seconds = time.monotonic() - figures.started
        output = self.gateway.output()
        for word in ("Traceback", "unexpected error", "Exception"):
            if word in output:
                at = output.index(word)
                figures.findings.append(
                    f"the gateway's output holds {word!r}: {output[at - 200 : at + 800]}"
                )
