"""`fleet systemd`: the unit's directives and their values (pure), the command as a person
runs it (a real subprocess), and systemd's own verdict on the unit (`systemd-analyze
verify`, where systemd is installed)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import vllm_fleet
from vllm_fleet.config import FleetConfig, load
from vllm_fleet.systemd import (
    SystemdRenderError,
    find_fleet_command,
    parse_env_file,
    render_unit,
    service_environ,
)

REPO = Path(__file__).resolve().parent.parent
SEED = REPO / "examples" / "seed-two-models.yaml"
FAKE = REPO / "examples" / "fake-engines.yaml"
FLEET = ["/opt/fleet/bin/fleet"]


def directives(text: str) -> dict[str, list[tuple[str, str]]]:
    """The unit as systemd reads its lines: section -> (key, value) in order, comments out."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, value = line.split("=", 1)
        current.append((key, value))
    return sections


def values(text: str, section: str, key: str) -> list[str]:
    return [v for k, v in directives(text)[section] if k == key]


def one(text: str, section: str, key: str) -> str:
    found = values(text, section, key)
    assert len(found) == 1, f"{section}.{key}: {found}"
    return found[0]


def comments_above(text: str, directive: str) -> str:
    """The comment lines right above the line starting with `directive`, joined."""
    lines = text.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith(directive))
    block: list[str] = []
    while lines[index - 1 - len(block)].startswith("#"):
        block.insert(0, lines[index - 1 - len(block)])
    return "\n".join(block)


def config_at(path: Path, text: str = "deployments: {a: {model: m}}\n") -> FleetConfig:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return load(path, environ={})


# ---- the rendering (pure) ---------------------------------------------------------------


def test_unit_has_every_directive_with_its_value() -> None:
    config = load(SEED, environ={})
    unit = render_unit(config, SEED, FLEET, None, None)
    assert list(directives(unit)) == ["Unit", "Service", "Install"]
    assert one(unit, "Unit", "Description") == f"vLLM fleet ({SEED})"
    assert one(unit, "Unit", "After") == "network-online.target"
    assert one(unit, "Unit", "Wants") == "network-online.target"
    expected = {
        "Type": "simple",
        "ExecStart": f"/opt/fleet/bin/fleet up {SEED}",
        "WorkingDirectory": str(SEED.parent),
        "TimeoutStartSec": "infinity",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "KillMode": "mixed",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": "75",  # the defaults: drain 30 + stop 30 + 15
        "LimitNOFILE": "1048576",
        "Restart": "on-failure",
        "RestartSec": "5",
    }
    for key, value in expected.items():
        assert one(unit, "Service", key) == value, key
    assert values(unit, "Service", "Environment") == [
        "PYTHONUNBUFFERED=1",
        "PATH=/opt/fleet/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ]
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    assert values(unit, "Service", "User") == []
    assert values(unit, "Service", "EnvironmentFile") == []


def test_header_says_how_to_install_reload_and_stop() -> None:
    unit = render_unit(load(SEED, environ={}), SEED, FLEET, None, None)
    header = unit.split("\n\n", 1)[0].splitlines()
    assert all(line.startswith("#") for line in header)
    text = "\n".join(header)
    assert f"fleet systemd {SEED} | sudo tee /etc/systemd/system/vllm-fleet.service" in text
    assert "systemctl daemon-reload" in text
    assert "systemctl enable --now vllm-fleet" in text
    assert "systemctl reload vllm-fleet         # re-read the fleet file" in text
    assert "systemctl stop vllm-fleet" in text
    assert f"engine logs: {SEED.parent / '.fleet' / 'logs'}" in text


def test_timeout_stop_follows_the_fleet_files_drain_and_stop_timeouts(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    config = config_at(
        path, "engines: {drain_timeout: 7.5, stop_timeout: 12}\ndeployments: {a: {model: m}}\n"
    )
    unit = render_unit(config, path, FLEET, None, None)
    assert one(unit, "Service", "TimeoutStopSec") == "35"  # ceil(7.5 + 12) + 15
    assert comments_above(unit, "TimeoutStopSec=") == (
        "# engines.drain_timeout (7.5s) + engines.stop_timeout (12s) + 15s margin, from the "
        "fleet file."
    )
    config = config_at(
        path, "engines: {drain_timeout: 0, stop_timeout: 300}\ndeployments: {a: {model: m}}\n"
    )
    assert one(render_unit(config, path, FLEET, None, None), "Service", "TimeoutStopSec") == "315"


def test_user_and_environment_file_only_when_given(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    config = config_at(path)
    env = Path("/etc/vllm-fleet/secrets.env")
    unit = render_unit(config, path, FLEET, "vllm", env)
    assert one(unit, "Service", "User") == "vllm"
    assert one(unit, "Service", "EnvironmentFile") == str(env)
    assert comments_above(unit, "EnvironmentFile=") == (
        "# KEY=VALUE lines for the ${VAR}s of the fleet file: secrets such as HF_TOKEN or\n"
        "# gateway API keys stay out of the fleet file and this unit (chmod 600 it)."
    )
    only_user = render_unit(config, path, FLEET, "vllm", None)
    assert one(only_user, "Service", "User") == "vllm"
    assert values(only_user, "Service", "EnvironmentFile") == []
    only_env = render_unit(config, path, FLEET, None, env)
    assert values(only_env, "Service", "User") == []
    assert one(only_env, "Service", "EnvironmentFile") == str(env)
    assert f"--user vllm --env-file {env} | sudo tee" in unit


def test_paths_must_be_absolute(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    config = config_at(path)
    with pytest.raises(
        SystemdRenderError, match=re.escape("the fleet file `fleet.yaml` must be an absolute path")
    ):
        render_unit(config, Path("fleet.yaml"), FLEET, None, None)
    with pytest.raises(
        SystemdRenderError, match=re.escape("environment file `x.env` must be an absolute")
    ):
        render_unit(config, path, FLEET, None, Path("x.env"))
    with pytest.raises(SystemdRenderError, match="must start with an absolute path"):
        render_unit(config, path, ["fleet"], None, None)


def test_special_characters_are_escaped_the_way_systemd_reads_them(tmp_path: Path) -> None:
    # `%` is a specifier everywhere (%% for itself); `$` is a variable in ExecStart='s
    # arguments ($$), not in its executable's path; a word with a blank is quoted.
    path = tmp_path / "my 100% $HOME" / "fleet file.yaml"
    config = config_at(path)
    exe = ["/opt/my venv/bin/python", "-m", "vllm_fleet.cli"]
    unit = render_unit(config, path, exe, None, tmp_path / "a%b.env")
    quoted_file = f'"{tmp_path}/my 100%% $$HOME/fleet file.yaml"'
    assert one(unit, "Service", "ExecStart") == (
        f'"/opt/my venv/bin/python" -m vllm_fleet.cli up {quoted_file}'
    )
    assert one(unit, "Service", "WorkingDirectory") == f"{tmp_path}/my 100%% $HOME"
    assert (
        one(unit, "Unit", "Description")
        == f"vLLM fleet ({tmp_path}/my 100%% $HOME/fleet file.yaml)"
    )
    assert one(unit, "Service", "EnvironmentFile") == f"{tmp_path}/a%%b.env"
    assert values(unit, "Service", "Environment")[1] == (
        '"PATH=/opt/my venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"'
    )
    quotes = tmp_path / 'say "hi" \\ there' / "f.yaml"
    unit = render_unit(config_at(quotes), quotes, FLEET, None, None)
    assert one(unit, "Service", "ExecStart").endswith(
        f' up "{tmp_path}/say \\"hi\\" \\\\ there/f.yaml"'
    )


def test_values_systemd_cannot_carry_are_refused(tmp_path: Path) -> None:
    config = config_at(tmp_path / "fleet.yaml")
    broken = tmp_path / "two\nlines" / "fleet.yaml"
    with pytest.raises(SystemdRenderError, match="line break"):
        render_unit(config, broken, FLEET, None, None)
    trailing = tmp_path / "dir " / "fleet.yaml"
    with pytest.raises(SystemdRenderError, match="ends with a blank"):
        render_unit(config, trailing, FLEET, None, None)
    for user in ("a b", "-x", "a:b", "a/b", ""):
        with pytest.raises(SystemdRenderError, match="not a user name systemd takes"):
            render_unit(config, tmp_path / "fleet.yaml", FLEET, user, None)
    assert (
        one(render_unit(config, tmp_path / "fleet.yaml", FLEET, "1001", None), "Service", "User")
        == "1001"
    )


def test_find_fleet_command_prefers_the_script_beside_the_interpreter(tmp_path: Path) -> None:
    venv, other, empty = tmp_path / "venv" / "bin", tmp_path / "other", tmp_path / "empty"
    for folder in (venv, other, empty):
        folder.mkdir(parents=True)
    python = venv / "python"
    for exe in (python, venv / "fleet", other / "fleet"):
        exe.write_text("#!/bin/sh\n")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    # beside the interpreter (its own environment) wins over another `fleet` on PATH
    assert find_fleet_command(str(python), search_path=str(other)) == [str(venv / "fleet")]
    (venv / "fleet").unlink()
    assert find_fleet_command(str(python), search_path=str(other)) == [str(other / "fleet")]
    assert find_fleet_command(str(python), search_path=str(empty)) == [
        str(python), "-m", "vllm_fleet.cli",
    ]  # fmt: skip


def test_the_fallback_command_runs_the_cli() -> None:
    # `python -m vllm_fleet.cli`, the command when no `fleet` script is found, works.
    done = subprocess.run(
        [sys.executable, "-m", "vllm_fleet.cli", "version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("vllm-fleet ")


def test_parse_env_file_reads_assignments_as_systemd_does() -> None:
    text = (
        "# a comment\n; another\n\nHF_TOKEN=hf_abc\n  SPACED = two words  \n"
        "QUOTED=\"x y\"\nSINGLE='z'\nnot an assignment\nexport BAD=1\nEMPTY=\n"
    )
    assert parse_env_file(text) == {
        "HF_TOKEN": "hf_abc",
        "SPACED": "two words",
        "QUOTED": "x y",
        "SINGLE": "z",
        "EMPTY": "",
    }


def test_service_environ_is_what_the_unit_gives_fleet_up() -> None:
    environ = service_environ(FLEET, {"HF_TOKEN": "t", "PATH": "/mine"}, {"HOME": "/home/v"})
    assert environ == {"PATH": "/mine", "PYTHONUNBUFFERED": "1", "HOME": "/home/v", "HF_TOKEN": "t"}
    assert service_environ(FLEET, {})["PATH"].startswith("/opt/fleet/bin:/usr/local/sbin:")


# ---- `fleet systemd` as a person runs it --------------------------------------------------


def fleet_systemd(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `fleet systemd ARGS` in `cwd`, with no nvidia-smi on PATH, a wide terminal and
    the package this test imports (whatever the cwd)."""
    full_env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    package = str(Path(vllm_fleet.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (package, os.environ.get("PYTHONPATH")) if p)
    full_env.update(PATH=str(cwd), PYTHONPATH=path, COLUMNS="400", NO_COLOR="1", **env)
    return subprocess.run(
        [sys.executable, "-m", "vllm_fleet.cli", "systemd", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def test_cli_prints_a_unit_whose_command_runs_this_fleet(tmp_path: Path) -> None:
    fleet_file = tmp_path / "fleet.yaml"
    shutil.copy(FAKE, fleet_file)
    done = fleet_systemd("fleet.yaml", cwd=tmp_path)  # a relative path, made absolute
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    unit = done.stdout
    exec_start = shlex.split(one(unit, "Service", "ExecStart"))
    assert exec_start[-2:] == ["up", str(fleet_file)]
    assert Path(exec_start[0]).is_absolute() and os.access(exec_start[0], os.X_OK)
    assert one(unit, "Service", "WorkingDirectory") == str(tmp_path)
    # The command in the unit is a working `fleet`: the same CLI, by its absolute path.
    ran = subprocess.run(
        [*exec_start[:-2], "version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("vllm-fleet ")


def test_cli_writes_the_unit_with_output(tmp_path: Path) -> None:
    out = tmp_path / "vllm-fleet.service"
    done = fleet_systemd(str(SEED), "--user", "root", "-o", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert done.stderr.strip() == f"wrote {out}"
    unit = out.read_text()
    assert one(unit, "Service", "User") == "root"
    assert one(unit, "Service", "ExecStart").endswith(f" up {SEED}")


def test_cli_bad_fleet_file_exits_1_with_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.yaml"
    bad.write_text("gateway:\n  prot: 8080\ndeployments:\n  a: {model: m}\n")
    done = fleet_systemd(str(bad), cwd=tmp_path)
    assert done.returncode == 1
    assert f"error: {bad}: 1 problem(s) in the fleet file" in done.stderr
    assert "line 2, gateway.prot: unknown key `prot`; did you mean `port`?" in done.stderr
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    missing = fleet_systemd(str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert missing.returncode == 1
    assert "file not found; check the path" in missing.stderr


def test_cli_reads_variables_as_the_service_will_see_them(tmp_path: Path) -> None:
    # HF_TOKEN set in the shell that runs `fleet systemd` is not in the service's
    # environment: only the EnvironmentFile (and systemd's own variables) are.
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("deployments:\n  a:\n    model: m\n    env: {HF_TOKEN: '${HF_TOKEN}'}\n")
    done = fleet_systemd(str(fleet_file), cwd=tmp_path, HF_TOKEN="from-the-shell")
    assert done.returncode == 1
    assert "line 4, deployments.a.env.HF_TOKEN: environment variable HF_TOKEN is not set" in (
        done.stderr
    )
    assert "note: ${VAR}s were read as the service will see them: systemd's own variables" in (
        done.stderr
    )
    env_file = tmp_path / "secrets.env"
    env_file.write_text("HF_TOKEN=hf_secret\n")
    done = fleet_systemd(str(fleet_file), "--env-file", "secrets.env", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert one(done.stdout, "Service", "EnvironmentFile") == str(env_file)
    assert "hf_secret" not in done.stdout + done.stderr  # the unit names the file, not secrets
    # An env file that cannot be read: said, and the shell's environment is used instead.
    done = fleet_systemd(str(fleet_file), "--env-file", "gone.env", cwd=tmp_path, HF_TOKEN="x")
    assert done.returncode == 0, done.stderr
    assert (
        f"warning: cannot read {tmp_path / 'gone.env'} (No such file or directory): the service "
        "will not start until it does; the fleet file's ${VAR}s are checked in this shell's "
        "environment instead"
    ) in done.stderr


def test_cli_refuses_a_user_name_systemd_would_refuse(tmp_path: Path) -> None:
    done = fleet_systemd(str(FAKE), "--user", "a b", cwd=tmp_path)
    assert done.returncode == 1
    assert "error: `a b` is not a user name systemd takes" in done.stderr
    assert done.stdout == ""
    unknown = fleet_systemd(str(FAKE), "--user", "no-such-user-here", cwd=tmp_path)
    assert unknown.returncode == 0, unknown.stderr
    assert "warning: no user `no-such-user-here` on this machine" in unknown.stderr


# ---- systemd's own verdict ----------------------------------------------------------------


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze") or (
        "/usr/bin/systemd-analyze" if os.path.exists("/usr/bin/systemd-analyze") else None
    )
    if found is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    return found


def verify(unit_text: str, folder: Path) -> list[str]:
    """`systemd-analyze verify` on the unit: the lines it says about this unit's file.
    (Its messages about the unit name it `vllm-fleet.service:LINE:` or by the unit's
    name; in a container it may also talk about units it cannot reach, which are not ours.)"""
    path = folder / "vllm-fleet.service"  # systemd needs the .service suffix
    path.write_text(unit_text)
    done = subprocess.run(
        [systemd_analyze(), "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    said = (done.stdout + done.stderr).splitlines()
    return [line for line in said if "vllm-fleet.service" in line]


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    env_file = tmp_path / "secrets.env"
    env_file.write_text("HF_TOKEN=x\n")
    command = find_fleet_command(sys.executable)  # a real, executable `fleet`
    unit = render_unit(load(SEED, environ={}), SEED, command, "root", env_file)
    assert verify(unit, tmp_path) == []


def test_systemd_reads_escaped_paths_as_the_real_ones(tmp_path: Path) -> None:
    # A fleet executable and a fleet file in a folder named with a blank, `%h` (systemd's
    # home directory specifier) and `$HOME`: verify checks that the executable exists and
    # can run, so a clean verdict means systemd read the escaped path as the real one.
    weird = tmp_path / "my %h $HOME"
    weird.mkdir()
    (weird / "fleet").symlink_to(find_fleet_command(sys.executable)[0])
    fleet_file = weird / "fleet file.yaml"
    unit = render_unit(config_at(fleet_file), fleet_file, [str(weird / "fleet")], None, None)
    exe = f'"{tmp_path}/my %%h $HOME/fleet"'
    assert one(unit, "Service", "ExecStart").startswith(f"{exe} up ")
    assert verify(unit, tmp_path) == []
    # Not vacuous: the same unit with `%h` unescaped, or with `$` doubled in the
    # executable's path (as in its arguments), names another file, and systemd says so.
    for wrong in (f'"{tmp_path}/my %h $HOME/fleet"', f'"{tmp_path}/my %%h $$HOME/fleet"'):
        said = verify(unit.replace(exe, wrong), tmp_path)
        assert any("is not executable: No such file or directory" in line for line in said), said


def test_systemd_analyze_reports_a_broken_unit(tmp_path: Path) -> None:
    # The filter keeps what systemd says about the unit's own lines.
    unit = render_unit(load(FAKE, environ={}), FAKE, find_fleet_command(sys.executable), None, None)
    said = verify(unit.replace("Type=simple", "Type=simpl\nBogus=1"), tmp_path)
    assert any("Failed to parse service type" in line for line in said), said
    assert any("Unknown key 'Bogus'" in line for line in said), said
