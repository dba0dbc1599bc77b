"""The console in a real headless browser (Debian's Chromium driven by Selenium) over a real
`medfed simulate` run of the heart federation, while it runs and once it has finished.

The browser reads the rendered DOM; the values shown must equal metrics.jsonl / summary.json,
every link must load without an error page, and each page kind is saved as a screenshot
under the test's tmp dir. `make test` installs Chromium (apt-get) when it is missing; without
it these tests fail with a sentence saying so (they must run in CI).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import pytest

from common.processes import free_port, wait_for_port
from console.pages import fmt
from tests.conftest import HEART, PROJECT
from tests.flower_helpers import descendants, still_alive
from tests.limits import COMMAND_S, RUN_S, SOCKET_S, STOP_S

pytestmark = pytest.mark.slow
MEDFED = [sys.executable, "-m", "medfed.cli"]
CHROMIUM = ("chromium", "chromium-browser")
DRIVER = ("chromedriver",)
ROUNDS = 15  # long enough for the browser to see the run while it runs
T = TypeVar("T")


def _which(names: tuple[str, ...]) -> str | None:
    for name in names:
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists()
                                       else None)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    chromium, driver = _which(CHROMIUM), _which(DRIVER)
    if chromium is None or driver is None:
        pytest.fail("the browser tests need Debian's chromium and chromium-driver: `make test` "
                    "installs them with apt-get; or run `apt-get install chromium "
                    "chromium-driver` yourself")
    os.environ.setdefault("SE_AVOID_STATS", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP reports land here
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1100", "--no-first-run", "--disable-extensions",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    service = Service(executable_path=driver, log_output=str(
        tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"))
    drv = webdriver.Chrome(options=options, service=service)
    drv.set_page_load_timeout(COMMAND_S)
    tree = descendants(os.getpid())
    try:
        yield drv
    finally:
        drv.quit()
        started = descendants(os.getpid()) - tree
        deadline = time.monotonic() + STOP_S
        while still_alive(started) and time.monotonic() < deadline:
            time.sleep(0.2)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def live_run(tmp_path_factory: pytest.TempPathFactory, heart_bundle: Path,
             cli_env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[str], Path, str]]:
    """A heart simulation that is running (round 2 done), and the console over its runs."""
    root = tmp_path_factory.mktemp("console-runs")
    out = root / "heart"
    sim = subprocess.Popen(
        [*MEDFED, "simulate", "--config", str(HEART), "--bundle", str(heart_bundle),
         "--out", str(out), "--rounds", str(ROUNDS)],
        cwd=PROJECT, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    lines: list[str] = []
    second = threading.Event()

    def read() -> None:
        assert sim.stdout is not None
        for line in sim.stdout:
            lines.append(line)
            if "round 2/" in line:
                second.set()

    threading.Thread(target=read, daemon=True).start()
    port = free_port()
    console = subprocess.Popen(
        [*MEDFED, "console", "--runs", str(root), "--port", str(port)], cwd=PROJECT,
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        assert wait_for_port("127.0.0.1", port, COMMAND_S, console), "console did not start"
        assert second.wait(RUN_S), "".join(lines[-30:])
        yield sim, out, f"http://127.0.0.1:{port}"
    finally:
        _stop(sim)
        _stop(console)


def _shown(drv: object, selector: str) -> dict[tuple[str, ...], str]:
    """Rendered text of every element matching `selector`, keyed by its data-* attributes
    (one round trip to the browser: a script reads the DOM)."""
    cells = drv.execute_script(  # type: ignore[attr-defined]
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => ["
        "e.getAttribute('data-round') || '', e.getAttribute('data-split') || '',"
        "e.getAttribute('data-metric') || '', e.innerText]);", selector)
    return {(r, s, m): text for r, s, m, text in cells}


def _settled(read: Callable[[], T]) -> T:
    """`read()` the page again when a live reload replaced it under the reader."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    for _ in range(20):
        try:
            return read()
        except (StaleElementReferenceException, NoSuchElementException):
            time.sleep(0.2)
    return read()


def _rounds(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_page_matches_metrics(drv: object, run: Path) -> int:
    shown = _settled(lambda: _shown(drv, "span[data-metric]"))
    rounds = {r["round"]: r for r in _rounds(run)}
    rows = {int(k[0]) for k in shown}
    assert rows and rows <= set(rounds)  # the page shows completed rounds only
    for (rnd, split, metric), text in shown.items():
        assert text == fmt(rounds[int(rnd)][split].get(metric)), (rnd, split, metric)
    return max(rows)


def test_the_running_run_is_shown_live_and_matches_its_files(browser, live_run, tmp_path
                                                             ) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    sim, run, base = live_run
    drv = browser
    drv.get(base + "/")  # type: ignore[attr-defined]
    status = drv.find_element(By.CSS_SELECTOR, "span[data-status]")  # type: ignore[attr-defined]
    assert status.text == "running"
    drv.get(base + "/runs/heart")  # type: ignore[attr-defined]
    assert _settled(lambda: drv.find_element(  # type: ignore[attr-defined]
        By.CSS_SELECTOR, "h1 span[data-status]").text) == "running"
    first = _assert_page_matches_metrics(drv, run)
    drv.save_screenshot(str(tmp_path / "run-running.png"))  # type: ignore[attr-defined]
    # live update: the page reloads itself when a round completes (no refresh from here)

    def later(d: object) -> bool:
        return int(_settled(lambda: d.find_element(  # type: ignore[attr-defined]
            By.CSS_SELECTOR, "span[data-field=rounds_done]").text)) > first

    WebDriverWait(drv, RUN_S).until(later)
    _assert_page_matches_metrics(drv, run)
    assert not _refused(drv)  # the live-update script runs under the console's policy


def _refused(drv: object) -> list[str]:
    """What the browser's Content-Security-Policy blocked since the last call."""
    return [e["message"] for e in drv.get_log("browser")  # type: ignore[attr-defined]
            if "Content Security Policy" in e["message"]]


def _crawl(drv: object, base: str, shots: Path) -> set[str]:
    """Open every console page reachable from / in the browser; fetch the downloads."""
    from selenium.webdriver.common.by import By

    seen: set[str] = set()
    todo = ["/"]
    kinds: set[str] = set()
    while todo:
        path = todo.pop(0)
        if path in seen:
            continue
        seen.add(path)
        if "/files/" in path:  # a bundle file: a download, not a page
            with urllib.request.urlopen(base + path, timeout=SOCKET_S) as answer:
                assert answer.status == 200 and answer.read(), path
            continue
        drv.get(base + path)  # type: ignore[attr-defined]
        title = drv.title  # type: ignore[attr-defined]
        body = drv.find_element(By.TAG_NAME, "body").text  # type: ignore[attr-defined]
        assert "Not found" not in title and "Internal Server Error" not in body, (path, body)
        # the console's own stylesheet applies under its Content-Security-Policy, and the
        # browser refused nothing on the page
        header = drv.execute_script(  # type: ignore[attr-defined]
            "return getComputedStyle(document.querySelector('header')).backgroundColor")
        assert header == "rgb(17, 34, 51)", (path, header)
        assert not _refused(drv), path
        # nothing from elsewhere: scripts, styles and images come from the console itself
        for tag, attr in (("script", "src"), ("link", "href"), ("img", "src")):
            for el in drv.find_elements(By.TAG_NAME, tag):  # type: ignore[attr-defined]
                url = el.get_attribute(attr) or ""
                assert not url or url.startswith(base + "/"), (path, tag, url)
        kind = urlsplit(path).path.rstrip("/").split("/")[-1] if path != "/" else "runs"
        kind = "version" if kind.isdigit() else kind
        if kind not in kinds:
            kinds.add(kind)
            drv.save_screenshot(str(shots / f"{kind}.png"))  # type: ignore[attr-defined]
        for a in drv.find_elements(By.TAG_NAME, "a"):  # type: ignore[attr-defined]
            href = a.get_attribute("href") or ""
            if href.startswith(base):
                todo.append(href[len(base):])
    return kinds


def test_the_finished_run_matches_its_files_and_every_link_works(browser, live_run, tmp_path
                                                                 ) -> None:
    from selenium.webdriver.common.by import By

    sim, run, base = live_run
    assert sim.wait(timeout=RUN_S * 2) == 0
    drv = browser
    drv.get(base + "/runs/heart")  # type: ignore[attr-defined]
    assert drv.find_element(By.CSS_SELECTOR, "h1 span[data-status]").text == "finished"  # type: ignore[attr-defined]
    assert _assert_page_matches_metrics(drv, run) == ROUNDS
    summary = json.loads((run / "summary.json").read_text())
    last_val = drv.find_element(By.CSS_SELECTOR, "span[data-field=last_validation]").text  # type: ignore[attr-defined]
    assert last_val == fmt(_rounds(run)[-1]["validation"]["auc"])
    drv.save_screenshot(str(tmp_path / "run-finished.png"))  # type: ignore[attr-defined]
    drv.get(base + "/runs/heart/versions")  # type: ignore[attr-defined]
    best = drv.find_element(By.CSS_SELECTOR, "span.badge-best")  # type: ignore[attr-defined]
    row = best.find_element(By.XPATH, "./ancestor::tr")
    assert row.text.startswith(f"v{summary['best']['version']:04d}")
    signatures = {el.text for el in drv.find_elements(By.CSS_SELECTOR, "span[data-signature]")}  # type: ignore[attr-defined]
    assert signatures == {"verified"}
    kinds = _crawl(drv, base, tmp_path)
    assert {"runs", "heart", "hospitals", "versions", "version", "audit"} <= kinds
    assert all((tmp_path / f"{k}.png").stat().st_size > 1000 for k in kinds)
