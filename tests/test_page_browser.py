"""The status page (`GET /fleet/`) in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium) against a real `fleet up` of fake engines: it loads
with no console errors, shows every deployment ready, follows an engine that is killed
(restarting, then ready) without a page reload, restarts one with its button, and with
keys asks for an admin key and refuses another. Screenshots of each run are saved to
FLEET_SCREENSHOTS (default: .fleet/screenshots/ in the checkout)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import fake_fleet_file, wait_until
from tests.test_console import fake_nvidia_smi
from tests.test_fleet_up import FleetUp
from tests.test_fleet_up import fleets as fleets  # the fixture

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parent.parent
SHOTS = Path(os.environ.get("FLEET_SCREENSHOTS", REPO / ".fleet" / "screenshots"))
ADMIN, TEAM = "sk-admin-0123456789", "sk-team-0123456789"
CHAT = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": true}'
T = TypeVar("T")


def _browser_missing() -> str | None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if not missing:
        return None
    return (
        "the browser test needs "
        + ", ".join(missing)
        + (" (Debian: apt-get install chromium chromium-driver; .ci/run installs them)")
    )


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    why = _browser_missing()
    if why is not None:
        if os.environ.get("FLEET_E2E_REQUIRED") == "1":
            pytest.fail(why + " (FLEET_E2E_REQUIRED=1)")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    # This machine's network is closed: no background connections, no first-run work.
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-extensions",
        f"--user-data-dir={profile}", "--window-size=1366,900",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def eventually(check: Callable[[], T | None], timeout: float = 20.0, what: str = "") -> T:
    """`check()` until it gives something truthy, ignoring a DOM changed under the read."""
    from selenium.common.exceptions import StaleElementReferenceException

    def safe() -> T | None:
        try:
            return check()
        except StaleElementReferenceException:
            return None

    return wait_until(safe, timeout=timeout, interval=0.2, what=what)


def console_problems(driver: Any) -> list[str]:
    """The browser console's warnings and errors since the last call."""
    return [
        f"{e['level']}: {e['message']}"
        for e in driver.get_log("browser")
        if e["level"] in ("WARNING", "SEVERE")
    ]


def rows(driver: Any) -> dict[str, tuple[str, str]]:
    """Each replica row of the page: name -> (state, pid) as shown."""
    from selenium.webdriver.common.by import By

    found = {}
    for row in driver.find_elements(By.CSS_SELECTOR, "[data-replica]"):
        state = row.find_element(By.CSS_SELECTOR, ".state").text.strip()
        pid = row.find_element(By.CSS_SELECTOR, ".pid").text.strip()
        found[row.get_attribute("data-replica")] = (state, pid)
    return found


def shoot(driver: Any, name: str, width: int = 1366, height: int = 900) -> Path:
    """A screenshot of the whole page at `width`, saved under SHOTS."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    full = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, max(height, int(full) + 120))
    time.sleep(0.3)  # a layout pass at the new size
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(1366, 900)
    return path


def start(tmp_path: Path, fleets: list[FleetUp], gpus: bool = False, **gateway: Any) -> FleetUp:
    """Two deployments (chat: two replicas, on a GPU each with `gpus`; code: on TCP)."""
    chat: dict[str, Any] = {"model": "Qwen/Qwen2.5-1.5B-Instruct", "replicas": 2}
    if gpus:
        chat["gpus"] = 1
    path = fake_fleet_file(
        tmp_path,
        {"chat": chat, "code": {"model": "Qwen/Qwen2.5-Coder-7B-Instruct", "listen": "tcp"}},
        engines={"backoff_initial": 2, "backoff_max": 2},
        **gateway,
    )
    fleet = FleetUp(path)
    fleets.append(fleet)
    key = ADMIN if gateway.get("keys") else None

    def ready() -> bool:
        data = fleet.status_with_key(key) if key else fleet.status()
        ups = [u for d in (data or {}).get("deployments", {}).values() for u in d["upstreams"]]
        return len(ups) == 3 and all(u["state"] == "ready" for u in ups)

    wait_until(ready, timeout=30, what="3 engines ready")
    return fleet


def traffic(
    fleet: FleetUp, count: int, key: str | None = None, pause: float = 0.0, dep: str = "chat"
) -> None:
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    for _ in range(count):
        request = urllib.request.Request(
            f"{fleet.url}/{dep}/v1/chat/completions", data=CHAT, headers=headers
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()
        time.sleep(pause)


def _gpus_text(driver: Any) -> str:
    """The text of the page's GPU section."""
    from selenium.webdriver.common.by import By

    text: str = driver.find_element(By.ID, "gpus").text
    return text


def test_the_page_shows_every_deployment_ready_with_no_console_errors(
    tmp_path: Path, fleets: list[FleetUp], browser: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selenium.webdriver.common.by import By

    fake_nvidia_smi(tmp_path / "bin")  # two H200s, the second one busy
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    fleet = start(tmp_path, fleets, gpus=True)
    # Some traffic while the page is open, for its figures and charts (and the README's
    # screenshot): ~12 s of requests, spread over a few of the charts' 5-s points.
    failures: list[BaseException] = []

    def steady() -> None:
        try:
            traffic(fleet, 60, None, 0.2)
        except BaseException as exc:  # seen by the test, not lost in the thread
            failures.append(exc)

    background = threading.Thread(target=steady, daemon=True)
    background.start()
    traffic(fleet, 10, dep="code")
    browser.get(f"{fleet.url}/fleet/")
    pids = {u["name"]: str(u["pid"]) for u in fleet.upstreams()}
    shown = eventually(
        lambda: (r := rows(browser)) and all(s == "ready" for s, _ in r.values()) and r,
        what="every replica shown ready",
    )
    assert {name: pid for name, (_, pid) in shown.items()} == pids
    sections = browser.find_elements(By.CSS_SELECTOR, "[data-deployment]")
    assert sorted(s.get_attribute("data-deployment") for s in sections) == ["chat", "code"]
    chat = browser.find_element(By.CSS_SELECTOR, '[data-deployment="chat"]')
    assert "Qwen/Qwen2.5-1.5B-Instruct" in chat.text
    eventually(lambda: browser.find_element(By.ID, "last-update").text.strip(), what="polled")
    gpu_text = eventually(lambda: "chat-1" in (t := _gpus_text(browser)) and t, what="GPUs")
    assert "NVIDIA H200" in gpu_text and "chat-0" in gpu_text
    background.join(timeout=60)
    assert not background.is_alive() and failures == []
    time.sleep(2.5)  # a few more polls, charts drawn from the requests above
    shoot(browser, "fleet-page")
    shoot(browser, "fleet-page-phone", width=390, height=844)
    assert console_problems(browser) == []


def test_a_killed_engine_shows_restarting_then_ready_without_a_page_reload(
    tmp_path: Path, fleets: list[FleetUp], browser: Any
) -> None:
    fleet = start(tmp_path, fleets)
    browser.get(f"{fleet.url}/fleet/")
    eventually(lambda: rows(browser).get("chat-0", ("", ""))[0] == "ready", what="chat-0 ready")
    browser.execute_script("window.__sameDocument = true")  # gone if the page reloads
    victim = next(u for u in fleet.upstreams() if u["name"] == "chat-0")
    os.kill(victim["pid"], signal.SIGKILL)
    eventually(
        lambda: rows(browser)["chat-0"][0] in ("starting", "stopped"), what="chat-0 restarting"
    )
    shoot(browser, "fleet-page-restarting")
    _, pid = eventually(
        lambda: (r := rows(browser)["chat-0"])[0] == "ready" and r[1] != str(victim["pid"]) and r,
        what="chat-0 ready again with a new pid",
    )
    assert pid == str(next(u for u in fleet.upstreams() if u["name"] == "chat-0")["pid"])
    assert browser.execute_script("return window.__sameDocument") is True
    assert console_problems(browser) == []


def test_the_restart_button_restarts_the_engine(
    tmp_path: Path, fleets: list[FleetUp], browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    fleet = start(tmp_path, fleets)
    browser.get(f"{fleet.url}/fleet/")
    _, old_pid = eventually(
        lambda: (r := rows(browser).get("code-0")) and r[0] == "ready" and r, what="code-0"
    )
    row = browser.find_element(By.CSS_SELECTOR, '[data-replica="code-0"]')
    row.find_element(By.CSS_SELECTOR, "button.restart").click()
    confirm = eventually(lambda: _alert(browser), what="the confirmation")
    assert "code-0" in confirm.text
    confirm.accept()
    toast = eventually(
        lambda: browser.find_element(By.ID, "toast").text.strip(), what="the answer shown"
    )
    assert "restarting" in toast.lower()
    eventually(
        lambda: (r := rows(browser)["code-0"])[0] == "ready" and r[1] != old_pid,
        what="code-0 ready with a new pid",
    )
    up = next(u for u in fleet.upstreams() if u["name"] == "code-0")
    assert str(up["pid"]) != old_pid and up["restarts"] == 1
    assert console_problems(browser) == []


def _alert(driver: Any) -> Any:
    from selenium.common.exceptions import NoAlertPresentException

    with contextlib.suppress(NoAlertPresentException):
        return driver.switch_to.alert
    return None


def test_with_keys_the_page_asks_for_an_admin_key_and_refuses_another(
    tmp_path: Path, fleets: list[FleetUp], browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    keys = [{"name": "ops", "key": ADMIN, "admin": True}, {"name": "team", "key": TEAM}]
    fleet = start(tmp_path, fleets, keys=keys)
    traffic(fleet, 3, TEAM)
    browser.get(f"{fleet.url}/fleet/")
    login = eventually(
        lambda: (e := browser.find_element(By.ID, "login")).is_displayed() and e, what="login"
    )
    assert rows(browser) == {}
    field = browser.find_element(By.ID, "key")
    assert field.get_attribute("type") == "password"
    field.send_keys(TEAM)
    browser.find_element(By.ID, "sign-in").click()
    refused = eventually(
        lambda: browser.find_element(By.ID, "login-error").text.strip(), what="the refusal"
    )
    assert "admin" in refused.lower()
    assert rows(browser) == {} and login.is_displayed()
    field = browser.find_element(By.ID, "key")
    field.clear()
    field.send_keys(ADMIN)
    browser.find_element(By.ID, "sign-in").click()
    eventually(lambda: len(rows(browser)) == 3, what="the fleet, signed in")
    # The key is kept in the tab's session storage, never in the address.
    assert ADMIN not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('vllm-fleet-key')") == ADMIN
    assert browser.execute_script("return localStorage.length") == 0
    eventually(lambda: "team" in browser.page_source, what="the key's usage shown")
    shoot(browser, "fleet-page-keys")
    # The console may hold the 401/403 answers' network lines, nothing else.
    assert [p for p in console_problems(browser) if "/fleet/overview" not in p] == []


def test_an_on_demand_deployment_is_loaded_and_unloaded_with_its_buttons(
    tmp_path: Path, fleets: list[FleetUp], browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    path = fake_fleet_file(
        tmp_path,
        {
            "chat": {"model": "Qwen/Qwen2.5-1.5B-Instruct"},
            "lazy": {"model": "Qwen/Qwen2.5-Coder-7B-Instruct", "start": "on_demand"},
        },
    )
    fleet = FleetUp(path)
    fleets.append(fleet)
    wait_until(lambda: any(u["state"] == "ready" for u in fleet.upstreams()), what="chat ready")
    browser.get(f"{fleet.url}/fleet/")
    eventually(lambda: rows(browser).get("lazy-0", ("", ""))[0] == "unloaded", what="unloaded")

    def press(kind: str) -> None:
        card = browser.find_element(By.CSS_SELECTOR, '[data-deployment="lazy"]')
        eventually(lambda: card.find_element(By.CSS_SELECTOR, f"button.{kind}").is_enabled())
        card.find_element(By.CSS_SELECTOR, f"button.{kind}").click()
        confirm = eventually(lambda: _alert(browser), what=f"the {kind} confirmation")
        assert "lazy" in confirm.text
        confirm.accept()

    press("load")
    eventually(lambda: rows(browser)["lazy-0"][0] == "ready", what="lazy-0 loaded")
    assert next(u for u in fleet.upstreams() if u["name"] == "lazy-0")["state"] == "ready"
    eventually(lambda: "load" in browser.find_element(By.ID, "toast").text.lower(), what="toast")
    press("unload")
    eventually(lambda: rows(browser)["lazy-0"][0] == "unloaded", what="lazy-0 unloaded")
    assert next(u for u in fleet.upstreams() if u["name"] == "lazy-0")["pid"] is None
    assert console_problems(browser) == []
