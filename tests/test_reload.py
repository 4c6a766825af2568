"""Reload by diff with real processes: `fleet up` on fake engines, changed with
`fleet reload`, SIGHUP and POST /fleet/reload while requests run through it."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import fake_fleet_file, pid_alive, wait_until
from tests.test_fleet_up import FleetUp
from tests.test_fleet_up import fleets as fleets  # the fixture
from vllm_fleet.testing.harness import FakeEngine

SLOW = ["--token-delay", "0.02"]


def free_base_port(count: int = 16) -> int:
    """The first of `count` free ports in a row, below Linux's ephemeral ports (a port
    the kernel hands out, like free_port()'s, has neighbours that outgoing connections
    take at random) and above the engines' default VLLM_PORT ranges."""
    for _ in range(200):
        first = random.randrange(21000, 32000 - count)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(first, first + count):
                    sock = stack.enter_context(socket.socket())
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"found no {count} free ports in a row in 21000-32000")


def fleet_file(tmp_path: Path, deployments: dict[str, dict[str, Any]], **kw: Any) -> Path:
    """Engines without fixed ports (counted from a free base port), so a replace can run
    beside the engine it replaces."""
    deps = {
        d: spec if "endpoints" in spec else {"port": None, **spec}
        for d, spec in deployments.items()
    }
    engines = {"base_port": free_base_port(), **kw.pop("engines", {})}
    return fake_fleet_file(tmp_path, deps, engines=engines, **kw)


def up(
    fleets: list[FleetUp],
    tmp_path: Path,
    deployments: dict[str, dict[str, Any]],
    ready: int,
    **kw: Any,
) -> tuple[Path, FleetUp]:
    """`fleet up` on a `fleet_file`, once `ready` engines are."""
    path = fleet_file(tmp_path, deployments, **kw)
    fleet = FleetUp(path)
    fleets.append(fleet)
    fleet.wait_ready(ready)
    return path, fleet


def rewrite(path: Path, change: Any) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def fleet_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vllm_fleet.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def pids(fleet: FleetUp) -> dict[str, int]:
    return {u["name"]: u["pid"] for u in fleet.upstreams()}


def status(fleet: FleetUp) -> dict[str, Any]:
    data = fleet.status()
    assert data is not None
    return data


def chat(url: str, dep: str, tokens: int = 3) -> tuple[int, dict[str, Any]]:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens})
    request = urllib.request.Request(
        f"{url}/{dep}/v1/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


class Stream:
    """A streamed chat completion on a raw socket, read in a thread to its end."""

    def __init__(self, url: str, dep: str, tokens: int) -> None:
        body = json.dumps({"messages": [], "max_tokens": tokens, "stream": True}).encode()
        port = int(url.rsplit(":", 1)[1])
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.sendall(
            f"POST /{dep}/v1/chat/completions HTTP/1.1\r\nHost: x\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        self.data = bytearray(self.sock.recv(65536))
        assert self.data.startswith(b"HTTP/1.1 200"), bytes(self.data[:300])
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _complete(self) -> bool:
        head_end = self.data.find(b"\r\n\r\n")
        body = self.data[head_end + 4 :] if head_end >= 0 else b""
        return body == b"0\r\n\r\n" or body.endswith(b"\r\n0\r\n\r\n")  # the last chunk

    def _read(self) -> None:
        with self.sock:
            while not self._complete():
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                self.data += chunk

    def result(self, timeout: float = 60) -> bytes:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream did not end"
        return bytes(self.data)


def tokens_in(answer: bytes) -> int:
    return answer.count(b'"delta": {"content":')


def wait_reload(fleet: FleetUp, generation: int) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        record = (status(fleet).get("fleet") or {}).get("reload") or {}
        if record.get("generation") == generation and record.get("result") != "applying":
            return dict(record)
        return None

    found: dict[str, Any] = wait_until(done, timeout=60, what=f"reload {generation} done")
    return found


def test_a_reload_adds_removes_and_replaces_while_streams_through_the_rest_finish(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    path = fleet_file(
        tmp_path,
        {
            "chat": {"model": "org/chat", "args": SLOW},
            "gone": {"model": "org/gone", "args": SLOW},
            "tuned": {"model": "org/tuned", "args": ["--max-model-len", "512"]},
        },
    )
    fleet = FleetUp(path)
    fleets.append(fleet)
    fleet.wait_ready(3)
    before = pids(fleet)
    streams = [Stream(fleet.url, "chat", 150) for _ in range(3)]  # 3 s each
    gone_stream = Stream(fleet.url, "gone", 100)

    def change(data: dict[str, Any]) -> None:
        del data["deployments"]["gone"]
        data["deployments"]["tuned"]["args"] = ["--max-model-len", "1024"]
        data["deployments"]["added"] = {"model": "org/added", "port": None}

    rewrite(path, change)
    done = fleet_cli("reload", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "chat: unchanged (1 replica(s) keep running)" in out
    assert "gone-0: stop (deployment removed from the file)" in out
    assert "tuned-0: replace (args changed); the new engine starts beside the old one" in out
    assert "added-0: start (new deployment)" in out
    assert "applied generation 2" in out
    for stream in streams:  # every token of the streams through `chat` arrived
        answer = stream.result()
        assert tokens_in(answer) == 150, answer[-300:]
        assert b"data: [DONE]" in answer
    gone_answer = gone_stream.result()  # the removed deployment's stream drained whole
    assert tokens_in(gone_answer) == 100 and b"data: [DONE]" in gone_answer
    after = pids(fleet)
    assert after["chat-0"] == before["chat-0"]
    assert after["tuned-0"] != before["tuned-0"]
    assert not pid_alive(before["tuned-0"]) and not pid_alive(before["gone-0"])
    assert "gone-0" not in after
    code, body = chat(fleet.url, "gone")
    assert code == 404
    assert "added" in body["error"]["message"] and "chat" in body["error"]["message"]
    assert chat(fleet.url, "added")[0] == 200
    assert chat(fleet.url, "tuned")[0] == 200
    fleet_info = status(fleet)["fleet"]
    assert fleet_info["generation"] == 2
    assert fleet_info["reload"]["result"] == "applied"
    assert len(fleet_info["hash"]) == 12


def test_a_rolling_replace_of_two_replicas_under_steady_load_fails_no_request(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    path, fleet = up(fleets, tmp_path, {"chat": {"model": "org/chat", "replicas": 2}}, ready=2)
    before = pids(fleet)
    results: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            results.append(chat(fleet.url, "chat")[0])

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(0.5)
    rewrite(path, lambda d: d["deployments"]["chat"].update(args=["--max-model-len", "999"]))
    done = fleet_cli("reload", str(path))
    time.sleep(0.5)
    stop.set()
    for worker in workers:
        worker.join(30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "chat-0: replace (args changed)" in done.stdout
    assert "chat-1: replace (args changed)" in done.stdout
    after = pids(fleet)
    assert set(after.values()).isdisjoint(before.values())
    failed = len(results) - results.count(200)
    print(f"\nrolling replace under load: {len(results)} requests, {failed} failed")
    assert len(results) > 50, "the load did not run during the reload"
    assert results.count(200) == len(results), {c: results.count(c) for c in set(results)}


def test_an_invalid_file_changes_nothing_and_says_where(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    path, fleet = up(fleets, tmp_path, {"chat": {"model": "org/chat"}}, ready=1)
    before = pids(fleet)
    good = path.read_text()
    path.write_text(good.replace("model: org/chat", "model: org/chat\n    replicas: many"))
    done = fleet_cli("reload", str(path))
    assert done.returncode == 1
    assert "deployments.chat.replicas" in done.stderr and "line " in done.stderr
    # The same file by SIGHUP: the running fleet refuses it and says so.
    fleet.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: (status(fleet)["fleet"].get("reload") or {}).get("result") == "invalid",
        what="the SIGHUP reload refused",
    )
    record = status(fleet)["fleet"]["reload"]
    assert "deployments.chat.replicas" in record["message"]
    assert record["via"] == "SIGHUP"
    assert pids(fleet) == before
    assert status(fleet)["fleet"]["generation"] == 1
    assert chat(fleet.url, "chat")[0] == 200
    # A new gateway port is refused whole: nothing else of the file is applied.
    port = yaml.safe_load(good)["gateway"]["port"]
    changed = good.replace(f"port: {port}", f"port: {port + 1}", 1).replace("org/chat", "org/other")
    path.write_text(changed)
    code, body = post_reload(fleet.url, {"file": str(path)})
    assert code == 409
    assert body["error"]["code"] == "restart_required"
    assert f"gateway.port changed from {port} to {port + 1}" in body["error"]["message"]
    assert pids(fleet) == before
    assert "refused" in fleet.text()


def post_reload(url: str, body: dict[str, Any], key: str = "") -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        f"{url}/fleet/reload", data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_sighup_reloads_the_file_fleet_up_was_started_with(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    path, fleet = up(fleets, tmp_path, {"chat": {"model": "org/chat"}}, ready=1)
    rewrite(path, lambda d: d["deployments"].update(more={"model": "org/more", "port": None}))
    fleet.proc.send_signal(signal.SIGHUP)
    record = wait_reload(fleet, 2)
    assert record["result"] == "applied", record
    assert record["via"] == "SIGHUP"
    assert chat(fleet.url, "more")[0] == 200
    text = fleet.text()
    assert "reload (SIGHUP): generation 2" in text and "more-0: start (new deployment)" in text
    metrics = urllib.request.urlopen(f"{fleet.url}/metrics", timeout=5).read().decode()
    assert 'fleet_reloads_total{result="applied"} 1.0' in metrics
    assert 'fleet_engine_starts_total{deployment="more",reason="reload"} 1.0' in metrics
    assert "fleet_generation 2.0" in metrics


def test_a_replacement_that_fails_to_start_leaves_the_old_engine_serving(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    path, fleet = up(
        fleets, tmp_path, {"chat": {"model": "org/chat"}}, engines={"max_restarts": 1}, ready=1
    )
    before = pids(fleet)
    rewrite(path, lambda d: d["deployments"]["chat"].update(args=["--fail-start"]))
    done = fleet_cli("reload", str(path))
    assert done.returncode == 1, done.stdout
    assert "chat-0: its replacement did not start" in done.stdout
    assert "the old engine keeps serving" in done.stdout
    assert pids(fleet) == before
    assert chat(fleet.url, "chat")[0] == 200
    assert status(fleet)["fleet"]["reload"]["result"] == "failed"


def test_dry_run_and_diff_print_the_plan_and_change_nothing(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    path, fleet = up(fleets, tmp_path, {"chat": {"model": "org/chat", "replicas": 2}}, ready=2)
    before = pids(fleet)
    rewrite(path, lambda d: d["deployments"]["chat"].update(replicas=1, aliases=["c"]))
    for args in (("diff", str(path)), ("reload", "--dry-run", str(path))):
        done = fleet_cli(*args)
        assert done.returncode == 0, done.stderr
        assert "chat-1: stop (replicas 2 -> 1)" in done.stdout
        assert "chat-0: update (aliases changed)" in done.stdout
        assert "gateway: chat: aliases - -> c (in place)" in done.stdout
    assert pids(fleet) == before
    assert status(fleet)["fleet"]["generation"] == 1


def test_a_new_deployment_answers_503_while_it_loads_and_one_reload_runs_at_a_time(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    path = fleet_file(tmp_path, {"chat": {"model": "org/chat"}}, api_keys=["sk-admin"])
    fleet = FleetUp(path)
    fleets.append(fleet)
    wait_until(lambda: fleet.status_with_key("sk-admin"), what="the gateway")
    wait_until(
        lambda: all(
            u["state"] == "ready"
            for d in fleet.status_with_key("sk-admin")["deployments"].values()
            for u in d["upstreams"]
        ),
        what="ready",
    )
    slow = {"model": "org/slow", "port": None, "args": ["--startup-delay", "3"]}
    rewrite(path, lambda d: d["deployments"].update(slow=slow))
    # With keys, a reload needs one (from this machine too).
    assert post_reload(fleet.url, {})[0] == 401
    code, body = post_reload(fleet.url, {}, key="sk-admin")
    assert code == 202, body
    assert body["result"] == "applying"
    code, again = post_reload(fleet.url, {}, key="sk-admin")
    assert code == 409 and again["error"]["code"] == "reload_in_progress"
    request = urllib.request.Request(
        f"{fleet.url}/slow/v1/chat/completions",
        data=b'{"messages": []}',
        headers={"Content-Type": "application/json", "Authorization": "Bearer sk-admin"},
    )
    try:
        urllib.request.urlopen(request, timeout=10)
        raise AssertionError("a deployment still loading answered")
    except urllib.error.HTTPError as exc:
        assert exc.code == 503
        assert int(exc.headers["Retry-After"]) > 0
        assert "still loading" in json.loads(exc.read())["error"]["message"]

    def applied() -> bool:
        record = fleet.status_with_key("sk-admin")["fleet"]["reload"]
        return bool(record.get("result") == "applied")

    wait_until(applied, timeout=30, what="the reload applied")


def test_remote_endpoints_are_added_replaced_and_dropped_by_a_reload(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    with FakeEngine("org/r", ["org/r"]) as a, FakeEngine("org/r", ["org/r"]) as b:
        path = fleet_file(
            tmp_path,
            {"chat": {"model": "org/chat"}, "r": {"model": "org/r", "endpoints": [a.url]}},
        )
        fleet = FleetUp(path)
        fleets.append(fleet)
        fleet.wait_ready(2)
        before = pids(fleet)

        def endpoints(urls: list[str]) -> None:
            rewrite(path, lambda d: d["deployments"]["r"].update(endpoints=urls))
            done = fleet_cli("reload", str(path))
            assert done.returncode == 0, done.stdout + done.stderr

        endpoints([a.url, b.url])
        ups = status(fleet)["deployments"]["r"]["upstreams"]
        assert [u["url"] for u in ups] == [a.url, b.url]
        endpoints([b.url])
        wait_until(
            lambda: [u["url"] for u in status(fleet)["deployments"]["r"]["upstreams"]] == [b.url],
            what="r served by b alone",
        )
        for _ in range(4):
            assert chat(fleet.url, "r")[0] == 200
        a.stop()  # nothing routes to a any more: no request fails
        for _ in range(4):
            assert chat(fleet.url, "r")[0] == 200
        assert pids(fleet)["chat-0"] == before["chat-0"]


def test_sigterm_during_a_reload_stops_everything_and_says_the_reload_was_interrupted(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    path, fleet = up(fleets, tmp_path, {"chat": {"model": "org/chat"}}, ready=1)
    slow = {"model": "org/slow", "port": None, "args": ["--startup-delay", "60"]}
    rewrite(path, lambda d: d["deployments"].update(slow=slow))
    assert post_reload(fleet.url, {})[0] == 202
    loading = wait_until(
        lambda: next((u for u in fleet.upstreams() if u["name"] == "slow-0" and u["pid"]), None),
        what="the new engine started",
    )
    assert fleet.stop(signal.SIGTERM, timeout=30) == 0
    text = fleet.text()
    assert "reload generation 2 interrupted" in text
    assert "applied" not in text.split("reload (POST /fleet/reload)")[1]
    assert not pid_alive(loading["pid"])


def test_reloading_the_same_file_starts_again_an_engine_that_had_failed(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    port = free_base_port(1)
    path = fleet_file(
        tmp_path,
        {
            "chat": {"model": "org/chat"},
            "pinned": {"model": "org/p", "listen": "tcp", "port": port},
        },
    )
    holder = socket.socket()  # the port is taken: `pinned` fails at once
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", port))
    holder.listen()
    fleet = FleetUp(path)
    fleets.append(fleet)
    wait_until(
        lambda: (
            {u["name"]: u["state"] for u in fleet.upstreams()}
            == {"chat-0": "ready", "pinned-0": "failed"}
        ),
        what="chat ready, pinned failed",
    )
    holder.close()
    done = fleet_cli("reload", "--url", fleet.url)  # no file: the one it was started with
    assert "pinned-0: restart (it had failed)" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    assert chat(fleet.url, "pinned")[0] == 200


def test_keys_change_on_a_reload_their_counters_go_on_and_no_engine_moves(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    keys = [
        {"name": "ops", "key": "sk-ops", "admin": True},
        {"name": "a", "key": "sk-a", "deployments": ["chat"], "rpm": 2},
    ]
    path = fleet_file(tmp_path, {"chat": {"model": "org/chat"}}, keys=keys, usage_db=None)
    fleet = FleetUp(path)
    fleets.append(fleet)

    def engines() -> dict[str, Any]:
        data = fleet.status_with_key("sk-ops")
        ups = [u for d in data.get("deployments", {}).values() for u in d["upstreams"]]
        return {u["name"]: u["pid"] for u in ups if u["state"] == "ready"}

    wait_until(lambda: engines(), what="chat ready")
    before = engines()

    def ask(key: str) -> int:
        request = urllib.request.Request(
            f"{fleet.url}/chat/v1/chat/completions",
            data=b'{"messages": [], "max_tokens": 1}',
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    assert [ask("sk-a"), ask("sk-a"), ask("sk-a"), ask("sk-b")] == [200, 200, 429, 401]

    def change(data: dict[str, Any]) -> None:
        data["gateway"]["keys"][1]["rpm"] = 3
        data["gateway"]["keys"].append({"name": "b", "key": "sk-b"})

    rewrite(path, change)
    done = fleet_cli("reload", str(path))  # the CLI sends the file's plain admin key
    assert done.returncode == 0, done.stdout + done.stderr
    assert "keys: added b; changed a" in done.stdout
    assert "sk-" not in done.stdout + done.stderr  # names, never the keys
    # `a` used 2 of its minute; under its new limit of 3 one more passes, not three.
    assert [ask("sk-b"), ask("sk-a"), ask("sk-a")] == [200, 200, 429]
    assert engines() == before
