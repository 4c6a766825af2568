"""GPU placement, checked on a machine with NVIDIA GPUs and PyTorch (CI has no GPU).

    PYTHONPATH=src python3 scripts/gpu_check.py [--out DIR]

What it checks, against the real `nvidia-smi`:
1. the inventory `fleet` reads (`gpus.read_inventory`) is the one `nvidia-smi -L` lists;
2. `fleet check` accepts a fleet that pins engines to GPUs (two sharing GPU 0 with
   `--gpu-memory-utilization`, one on the last GPU when there are several) and refuses,
   naming the place, a GPU index the machine lacks and a GPU count it cannot fill;
3. `fleet up` starts those engines (`scripts/cuda_fake_engine.py`: a fake vLLM that
   really holds GPU memory) and each one sees exactly the GPU its plan names, by UUID,
   with CUDA_DEVICE_ORDER=PCI_BUS_ID; requests through the gateway reach each of them;
4. after SIGTERM to `fleet up`, no engine process is left and the GPU memory they held
   is free again;
5. on-demand: `fleet check` of two `start: on_demand` deployments on GPU 0 shows one swap
   group and, for `sleep: 1`, adds --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1 with
   no "needs a GPU" warning; under `fleet up` a request to each in turn loads it, and
   nvidia-smi never shows both holding GPU memory (the cold-start path: the fake engine's
   sleep does not free CUDA memory, and vLLM itself is not installed on such machines).
Prints one PASS/FAIL line per check (also to OUT/summary.txt); exit 0 when all pass.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "scripts" / "cuda_fake_engine.py"
HOLD_MIB = 512

results: list[tuple[bool, str, str]] = []


def check(ok: bool, name: str, detail: str = "") -> bool:
    results.append((ok, name, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    return ok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def smi(*args: str) -> str:
    return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, check=True).stdout


def gpus() -> list[dict[str, Any]]:
    out = smi("--query-gpu=index,uuid,memory.used", "--format=csv,noheader,nounits")
    rows = [[c.strip() for c in line.split(",")] for line in out.strip().splitlines()]
    return [{"index": int(r[0]), "uuid": r[1], "used": int(r[2])} for r in rows]


def apps() -> list[dict[str, Any]]:
    out = smi("--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader,nounits")
    rows = [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line]
    return [{"pid": int(r[0]), "uuid": r[1], "used": r[2]} for r in rows if r[0].isdigit()]


def fleet(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "vllm_fleet.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def get(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def fleet_file(out: Path, port: int, base_port: int, count: int) -> tuple[Path, dict[str, int]]:
    """The fleet under test, and the GPU index each deployment is pinned to."""
    placed = {"first": 0, "second": 0}
    lines = [
        "gateway:",
        "  host: 127.0.0.1",
        f"  port: {port}",
        "engines:",
        f"  base_port: {base_port}",
        f"  log_dir: {out / 'logs'}",
        f'engine_command: ["{{python}}", "{ENGINE}", "{{model}}", "--hold-mib", "{HOLD_MIB}"]',
        "deployments:",
    ]
    for dep in ("first", "second"):
        lines += [
            f"  {dep}:",
            f"    model: check/{dep}",
            "    gpus: [0]",
            "    share_gpus: true",
            '    args: ["--gpu-memory-utilization", "0.3"]',
        ]
    if count > 1:
        placed["last"] = count - 1
        lines += ["  last:", "    model: check/last", f"    gpus: [{count - 1}]"]
    path = out / "gpu-check.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path, placed


def refused(out: Path, name: str, gpus_value: str, place: str) -> None:
    path = out / f"{name}.yaml"
    path.write_text(f"deployments:\n  big:\n    model: check/big\n    gpus: {gpus_value}\n")
    done = fleet("check", str(path))
    (out / f"{name}.txt").write_text(done.stdout + done.stderr)
    said = done.stdout + done.stderr
    check(
        done.returncode != 0 and place in said and "line 4" in said,
        f"fleet check refuses gpus: {gpus_value}",
        said.strip().splitlines()[-1] if said.strip() else f"exit {done.returncode}",
    )


def on_demand_check(out: Path) -> None:
    """5. (see the module docstring)"""
    port = free_port()
    path = out / "on-demand.yaml"
    lines = [
        f"gateway: {{host: 127.0.0.1, port: {port}}}",
        f"engines: {{base_port: {free_port()}, log_dir: {out / 'logs-on-demand'}}}",
        f'engine_command: ["{{python}}", "{ENGINE}", "{{model}}", "--hold-mib", "{HOLD_MIB}"]',
        "deployments:",
    ]
    for dep in ("first", "second"):
        lines += [f"  {dep}: {{model: check/{dep}, gpus: [0], start: on_demand, min_hold: 0}}"]
    path.write_text("\n".join(lines) + "\n")
    sleepy = out / "on-demand-sleep.yaml"
    sleepy.write_text(path.read_text().replace("min_hold: 0}", "min_hold: 0, sleep: 1}"))
    done = fleet("check", str(sleepy))
    said = done.stdout + done.stderr
    (out / "check-on-demand.txt").write_text(said)
    check(
        done.returncode == 0
        and "swap group gpu0: GPUs 0; members: first, second" in said
        and "--enable-sleep-mode" in said
        and "VLLM_SERVER_DEV_MODE=1" in said
        and "needs a GPU" not in said,
        "fleet check: one swap group on GPU 0, sleep mode's flag and env, no GPU warning",
        f"exit {done.returncode}",
    )
    log = (out / "up-on-demand.log").open("w")
    up = subprocess.Popen(
        [sys.executable, "-m", "vllm_fleet.cli", "up", str(path)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    gateway = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and up.poll() is None:
            with contextlib.suppress(OSError):
                if get(f"{gateway}/health")[0] == 200:
                    break
            time.sleep(0.5)
        base = {g["index"]: g["used"] for g in gpus()}[0]
        for dep in ("first", "second", "first"):
            code, body = get(
                f"{gateway}/{dep}/v1/chat/completions",
                {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            )
            status = get(f"{gateway}/fleet/status")[1]
            pids = {
                d: u.get("pid") for d, v in status["deployments"].items() for u in v["upstreams"]
            }
            mine = [a for a in apps() if a["pid"] in [p for p in pids.values() if p]]
            used = {g["index"]: g["used"] for g in gpus()}[0] - base
            check(
                code == 200
                and body.get("model") == f"check/{dep}"
                and [d for d, p in pids.items() if p] == [dep]
                and len(mine) <= 1
                and used < 2 * HOLD_MIB,
                f"on demand: {dep} loaded alone on GPU 0",
                f"{code}, engines running: {pids}, nvidia-smi: {mine}, +{used} MiB",
            )
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGTERM)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check")))
    out = parser.parse_args().out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "nvidia-smi.txt").write_text(smi() + smi("-L"))

    # 1. inventory
    from vllm_fleet.gpus import read_inventory

    inventory = read_inventory()
    listed = [line for line in smi("-L").splitlines() if line.startswith("GPU ")]
    real = gpus()
    seen = [(g.index, g.uuid) for g in inventory.gpus or ()]
    check(
        seen == [(g["index"], g["uuid"]) for g in real] and len(seen) == len(listed),
        "inventory matches nvidia-smi",
        f"{len(seen)} GPU(s): "
        + ", ".join(f"{g.index} {g.name} {g.memory_total_mib} MiB" for g in inventory.gpus or ()),
    )

    # 2. fleet check: accepted plan, refused asks
    port = free_port()
    path, placed = fleet_file(out, port, free_port(), len(real))
    done = fleet("check", str(path))
    (out / "check.txt").write_text(done.stdout + done.stderr)
    text = done.stdout + done.stderr
    check(
        done.returncode == 0 and "CUDA_VISIBLE_DEVICES=0" in text,
        "fleet check accepts the pinned fleet",
        f"exit {done.returncode}",
    )
    refused(out, "too-high-index", f"[{len(real)}]", "deployments.big.gpus")
    refused(out, "too-many", str(len(real) + 1), "deployments.big.gpus")

    # 3. fleet up: engines on their GPUs
    before = {g["index"]: g["used"] for g in gpus()}
    env = {**os.environ, "FLEET_GPU_REPORT_DIR": str(out / "engines")}
    log = (out / "up.log").open("w")
    up = subprocess.Popen(
        [sys.executable, "-m", "vllm_fleet.cli", "up", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    gateway = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    ready = False
    while time.monotonic() < deadline and up.poll() is None and not ready:
        with contextlib.suppress(OSError):
            ready = get(f"{gateway}/health?ready=1")[0] == 200
        time.sleep(1)
    check(ready, "fleet up: every engine ready", f"in {240 - (deadline - time.monotonic()):.0f} s")
    reports: dict[int, dict[str, Any]] = {}
    if ready:
        status = get(f"{gateway}/fleet/status")[1]
        (out / "status.json").write_text(json.dumps(status, indent=2))
        during = apps()
        (out / "apps-during.json").write_text(json.dumps(during, indent=2))
        used = {g["index"]: g["used"] for g in gpus()}
        for report in (out / "engines").glob("*.json"):
            data = json.loads(report.read_text())
            reports[data["pid"]] = data
        uuid_of = {g["index"]: g["uuid"] for g in real}
        for dep, index in placed.items():
            code, body = get(
                f"{gateway}/{dep}/v1/chat/completions",
                {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            )
            check(code == 200 and body.get("model") == f"check/{dep}", f"{dep}: answers", str(code))
            ups = status["deployments"][dep]["upstreams"]
            pid = ups[0].get("pid")
            report = reports.get(pid, {})
            visible = report.get("visible", [])
            check(
                report.get("CUDA_VISIBLE_DEVICES") == str(index)
                and report.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"
                and [v["uuid"] for v in visible] == [uuid_of[index]],
                f"{dep}: its engine sees only GPU {index}",
                f"pid {pid}, CUDA_VISIBLE_DEVICES={report.get('CUDA_VISIBLE_DEVICES')}, "
                f"sees {[v['uuid'] for v in visible]}, nvidia-smi GPU {index} is {uuid_of[index]}",
            )
            mine = [a for a in during if a["pid"] == pid]
            if mine:
                check(
                    mine[0]["uuid"] == uuid_of[index],
                    f"{dep}: nvidia-smi shows its process on GPU {index}",
                    json.dumps(mine),
                )
            else:  # nvidia-smi may list PIDs of another PID namespace, or none
                print(f"INFO {dep}: pid {pid} not in nvidia-smi's list {during}", flush=True)
        for index in sorted(set(placed.values())):
            sharers = sum(1 for i in placed.values() if i == index)
            grew = used[index] - before[index]
            check(
                grew >= sharers * HOLD_MIB,
                f"GPU {index}: memory taken by its {sharers} engine(s)",
                f"{before[index]} -> {used[index]} MiB",
            )

    # 4. stop: nothing left behind
    if up.poll() is None:
        os.killpg(up.pid, signal.SIGTERM)
    try:
        code = up.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(up.pid, signal.SIGKILL)
        code = up.wait()
    log.close()
    check(code == 0, "fleet up stops on SIGTERM", f"exit {code}")
    time.sleep(2)
    alive = []
    for pid in reports:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    after = {g["index"]: g["used"] for g in gpus()}
    check(not alive, "no engine process left", f"alive: {alive}" if alive else "")
    check(
        all(after[i] - before[i] < HOLD_MIB for i in before),
        "GPU memory freed",
        ", ".join(f"GPU {i}: {before[i]} -> {after[i]} MiB" for i in before),
    )
    leftover = [a for a in apps() if a["pid"] in reports]
    check(not leftover, "nvidia-smi lists no engine", json.dumps(leftover) if leftover else "")

    on_demand_check(out)

    failed = [name for ok, name, _ in results if not ok]
    summary = "\n".join(f"{'PASS' if ok else 'FAIL'} {n}: {d}" for ok, n, d in results)
    (out / "summary.txt").write_text(summary + "\n")
    print(f"{len(results) - len(failed)}/{len(results)} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
