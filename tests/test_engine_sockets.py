"""No way around the gateway: engines the fleet starts listen on Unix sockets in a
directory only the fleet's user can open, on no TCP port, and serve every route through
the gateway; stale sockets do not break a start; `listen: tcp` still works."""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import openai
import pytest

from tests.conftest import fake_fleet_file, listening_ports
from tests.test_fleet_up import FleetUp
from tests.test_supervisor import make_supervisor, only, run, until
from vllm_fleet.registry import State
from vllm_fleet.testing.harness import engine_json


def test_engines_serve_every_route_over_their_sockets_and_listen_on_no_tcp_port(
    tmp_path: Path,
) -> None:
    path = fake_fleet_file(tmp_path, {"chat": {"model": "org/chat", "replicas": 2}})
    fleet = FleetUp(path)
    try:
        ups = fleet.wait_ready(2)
        folder = tmp_path / ".fleet" / "sockets"
        assert sorted(u["socket"] for u in ups) == [
            str(folder / "chat-0.sock"),
            str(folder / "chat-1.sock"),
        ]
        assert all(u["url"] == f"unix:{u['socket']}" and u["port"] is None for u in ups)
        # The directory: the fleet's user's only; the sockets are sockets.
        info = folder.stat()
        assert stat.S_IMODE(info.st_mode) == 0o700
        assert info.st_uid == os.geteuid()
        for up in ups:
            assert stat.S_ISSOCK(Path(up["socket"]).stat().st_mode)
            assert listening_ports([up["pid"]]) == set()  # the fake engine opened no TCP port
        # Every route style, through the gateway, reaches the engines over their sockets.
        seen = set()
        client = openai.OpenAI(base_url=f"{fleet.url}/chat/v1", api_key="x")
        for _ in range(4):
            reply = client.chat.completions.create(
                model="anything", messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
            seen.add(reply.system_fingerprint)
        assert seen == {"fake-chat-0", "fake-chat-1"}  # both replicas, by socket name
        plain = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="x")
        streamed = plain.completions.create(model="chat", prompt="x", max_tokens=3, stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == "tok0 tok1 tok2"
        azure = openai.AzureOpenAI(
            azure_endpoint=fleet.url, azure_deployment="chat", api_version="2024-10-21",
            api_key="x",
        )  # fmt: skip
        reply = azure.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert reply.choices[0].message.content == "tok0 tok1"
        # `fleet status` shows the socket.
        status = subprocess.run(
            [sys.executable, "-m", "vllm_fleet.cli", "status", "--url", fleet.url],
            capture_output=True, text=True, timeout=30, check=False,
            env={**os.environ, "COLUMNS": "250"},
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert str(folder / "chat-0.sock") in status.stdout
    finally:
        assert fleet.stop() == 0
    assert list(folder.iterdir()) == []  # each engine's socket removed after it stopped


NOBODY_CONNECTS = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("refused")
else:
    print("connected")
"""


def test_another_user_cannot_open_an_engines_socket(tmp_path: Path) -> None:
    # The modes are checked always; a real connection as `nobody` only where the test runs
    # as root (it can drop privileges in a child) and `nobody` exists. The sockets live in
    # a directory under /tmp whose parents `nobody` may pass through (pytest's own are
    # 0700), so the fleet's 0700 is the only thing in the way: with it opened to everyone,
    # the same client connects.
    with tempfile.TemporaryDirectory(prefix="fleet-", dir="/tmp") as open_dir:
        os.chmod(open_dir, 0o755)
        path = fake_fleet_file(
            tmp_path, {"m": {"model": "org/m"}}, engines={"socket_dir": f"{open_dir}/s"}
        )
        sup, registry, _ = make_supervisor(path)
        answers: list[str] = []
        python = "/usr/bin/python3"  # `nobody` may not be able to open the project's venv
        as_nobody = os.geteuid() == 0 and _has_user("nobody") and os.access(python, os.X_OK)

        async def connect_as_nobody(sock: str) -> None:
            done = await asyncio.to_thread(
                subprocess.run, [python, "-c", NOBODY_CONNECTS, sock],
                user="nobody", capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            answers.append(done.stdout.strip() or done.stderr)

        async def body() -> None:
            await sup.start()
            try:
                up = only(registry)
                await until(lambda: up.state is State.READY, what="engine ready")
                assert up.spec.uds is not None  # type: ignore[union-attr]
                sock = up.spec.uds  # type: ignore[union-attr]
                assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
                assert sock.parent.stat().st_uid == os.geteuid()
                assert engine_json(up.url, "/fake/env")["pid"] == up.pid  # the owner can
                if as_nobody:
                    await connect_as_nobody(str(sock))
                    os.chmod(sock.parent, 0o755)  # the control: opened to everyone
                    os.chmod(sock, 0o777)
                    await connect_as_nobody(str(sock))
            finally:
                await sup.stop()

        run(body)
    if not answers:
        pytest.skip(
            "not root (or no user `nobody`, or no /usr/bin/python3): cannot run a client as "
            "another user; the modes were checked"
        )
    assert answers == ["refused", "connected"]


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def test_a_stale_socket_is_replaced_and_a_live_one_is_refused_with_a_fix(tmp_path: Path) -> None:
    folder = tmp_path / ".fleet" / "sockets"
    folder.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(folder / "m-0.sock"))
    stale.close()  # the file stays: as an engine killed with SIGKILL leaves it
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(folder / "busy-0.sock"))
    live.listen()
    try:
        path = fake_fleet_file(tmp_path, {"m": {"model": "org/m"}, "busy": {"model": "org/b"}})
        sup, registry, _ = make_supervisor(path)
        ups = {u.name: u for u in registry.all()}

        async def body() -> None:
            await sup.start()
            try:
                await until(lambda: ups["m-0"].state is State.READY, what="m-0 ready")
                await until(lambda: ups["busy-0"].state is State.FAILED, what="busy-0 refused")
            finally:
                await sup.stop()

        run(body)
    finally:
        live.close()
    message = ups["busy-0"].message
    assert f"socket {folder / 'busy-0.sock'} is not free (a process is listening on it)" in message
    assert "engines.socket_dir" in message
    assert ups["busy-0"].pid is None and ups["busy-0"].restarts == 0


def test_a_socket_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("not root: cannot make a directory owned by another user")
    folder = tmp_path / "theirs"
    folder.mkdir()
    os.chown(folder, 65534, 65534)
    path = fake_fleet_file(tmp_path, {"m": {"model": "org/m"}}, engines={"socket_dir": str(folder)})
    sup, registry, _ = make_supervisor(path)

    async def body() -> None:
        await sup.start()
        try:
            await until(lambda: only(registry).state is State.FAILED, what="refused")
        finally:
            await sup.stop()

    run(body)
    assert "belongs to user 65534, not to the fleet's user" in only(registry).message


def test_socket_group_makes_the_directory_and_sockets_that_groups(tmp_path: Path) -> None:
    group = _a_group()
    path = fake_fleet_file(
        tmp_path, {"m": {"model": "org/m"}}, engines={"socket_group": group.gr_name}
    )
    sup, registry, _ = make_supervisor(path)
    seen: list[os.stat_result] = []

    async def body() -> None:
        await sup.start()
        try:
            up = only(registry)
            await until(lambda: up.state is State.READY, what="engine ready")
            sock = up.spec.uds  # type: ignore[union-attr]
            assert sock is not None
            seen.extend([sock.parent.stat(), sock.stat()])
        finally:
            await sup.stop()

    run(body)
    folder, sock = seen
    assert (stat.S_IMODE(folder.st_mode), folder.st_gid) == (0o750, group.gr_gid)
    assert (stat.S_IMODE(sock.st_mode), sock.st_gid) == (0o660, group.gr_gid)


def _a_group() -> grp.struct_group:
    """A group the fleet's user may give files to: one of its own, not its primary one
    when it has another (root may use any)."""
    own = [g for g in os.getgroups() if g != os.getegid()] or [os.getegid()]
    if os.geteuid() == 0:
        for name in ("www-data", "nogroup", "daemon"):
            try:
                return grp.getgrnam(name)
            except KeyError:
                continue
    return grp.getgrgid(own[0])


def test_listen_tcp_engines_serve_on_their_port(tmp_path: Path) -> None:
    path = fake_fleet_file(tmp_path, {"t": {"model": "org/t", "listen": "tcp"}})
    fleet = FleetUp(path)
    try:
        (up,) = fleet.wait_ready(1)
        assert up["socket"] is None and up["url"] == f"http://127.0.0.1:{up['port']}"
        assert listening_ports([up["pid"]]) == {up["port"]}
        client = openai.OpenAI(base_url=f"{fleet.url}/t/v1", api_key="x")
        reply = client.completions.create(model="x", prompt="x", max_tokens=2)
        assert reply.system_fingerprint == f"fake-{up['port']}"
    finally:
        assert fleet.stop() == 0
