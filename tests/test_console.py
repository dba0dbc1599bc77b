"""The console's pages and API over real run directories (HTTP level; the browser tests are in
tests/test_console_browser.py): values equal the run files, half-written and crashed runs
show as such, names in URLs are checked, tampered versions are flagged, reports stand alone.

The runs come from the real ServerApp and ClientApp code run in this process (no Ray).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from client.client_app import make_client_app
from common.certs import init_federation, init_hospital
from common.processes import MARKER_ENV
from console.app import create_app
from console.pages import fmt
from console.report import write_report
from server.federation import run_federation
from server.registry_http import start_registry_server
from tests.conftest import HEART
from tests.flower_helpers import task_identity
from tests.inprocess_grid import InProcessGrid, run_settings
from tests.tls_helpers import REFUSED, https_get, tls_context

FAST = ("federation.rounds=3", "federation.local.steps=2")


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory, heart_bundle: Path,
              signing_key_path: Path) -> Path:
    """A directory with one finished heart run (3 rounds, 4 hospitals)."""
    root = tmp_path_factory.mktemp("console") / "runs"
    settings = run_settings(HEART, FAST, root / "heart", heart_bundle, signing_key_path)
    with task_identity():
        run_federation(InProcessGrid(make_client_app(settings), 4), settings)
    return root


@pytest.fixture
def client(runs_root: Path, signing_pub_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(runs_root, signing_pub_path)) as c:
        yield c


class Spans(HTMLParser):
    """Text of elements with data-* attributes, and every href."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[tuple[str, str], ...], str] = {}
        self.links: list[str] = []
        self._open: list[tuple[tuple[str, str], ...]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        data = tuple(sorted((k, v or "") for k, v in attrs if k.startswith("data-")))
        if tag == "a":
            self.links += [v for k, v in attrs if k == "href" and v]
        if tag == "span":
            self._open.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "span" and self._open:
            self._open.pop()

    def handle_data(self, text: str) -> None:
        if self._open and self._open[-1]:
            self.cells[self._open[-1]] = self.cells.get(self._open[-1], "") + text


def parse(html: str) -> Spans:
    p = Spans()
    p.feed(html)
    return p


def rounds_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_page_shows_every_round_as_in_metrics_jsonl(client, runs_root) -> None:
    page = client.get("/runs/heart")
    assert page.status_code == 200
    cells = parse(page.text).cells
    rounds = rounds_of(runs_root / "heart")
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    checked = 0
    for r in rounds:
        for split in ("validation", "test"):
            for metric in ("auc", "balanced_accuracy", "sensitivity", "specificity", "loss"):
                key = (("data-metric", metric), ("data-round", str(r["round"])),
                       ("data-split", split))
                assert cells[key] == fmt(r[split].get(metric)), (key, cells[key])
                checked += 1
    assert checked == 40
    assert "test — not used for any choice" in page.text
    assert page.text.count("<svg") == 3  # metrics, loss, per-site


def test_runs_table_and_api_agree_with_the_summary(client, runs_root) -> None:
    api = client.get("/api/runs").json()["runs"]
    assert [r["name"] for r in api] == ["heart"]
    run = api[0]
    last = rounds_of(runs_root / "heart")[-1]
    assert (run["status"], run["rounds_done"], run["rounds_planned"]) == ("finished", 3, 3)
    assert run["validation"] == last["validation"]["auc"] and run["test"] == last["test"]["auc"]
    cells = parse(client.get("/").text).cells
    assert cells[(("data-run", "heart"), ("data-split", "validation"))] == fmt(run["validation"])
    detail = client.get("/api/runs/heart").json()
    summary = json.loads((runs_root / "heart" / "summary.json").read_text())
    assert detail["final"] == summary["final"] and detail["best"] == summary["best"]
    kept = {s["site"]: s["kept"] for s in detail["sites"]}
    assert kept == {n: m["kept"] for n, m in summary["site_models"].items()}
    assert detail["config"]["federation"]["rounds"] == 3  # the resolved config


def test_versions_page_marks_best_and_latest_and_verifies_signatures(client, runs_root) -> None:
    data = client.get("/api/runs/heart/versions").json()
    assert [v["version"] for v in data["versions"]] == [0, 1, 2, 3]
    assert {v["signature"] for v in data["versions"]} == {"verified"}
    best = json.loads((runs_root / "heart" / "registry" / "best.json").read_text())
    marked = {m: v["version"] for v in data["versions"] for m in v["markers"]}
    assert marked == {"best": best["version"], "latest": 3}
    page = client.get("/runs/heart/versions").text
    assert f"on {best['split']}" in page and "best</span>" in page
    card = client.get(f"/runs/heart/versions/{best['version']}")
    assert card.status_code == 200 and "Model card" in card.text
    download = client.get("/runs/heart/versions/1/files/manifest.json")
    assert download.status_code == 200
    assert download.content == (runs_root / "heart" / "registry" / "v0001" /
                                "manifest.json").read_bytes()


def test_every_link_of_every_page_answers_without_an_error(client) -> None:
    seen, todo = set(), ["/"]
    while todo:
        url = todo.pop()
        if url in seen:
            continue
        seen.add(url)
        answer = client.get(url)
        assert answer.status_code == 200, (url, answer.text[:300])
        _assert_locked_down(answer, url)
        if "text/html" in answer.headers["content-type"]:
            todo += [u for u in parse(answer.text).links if u.startswith("/")]
    assert len(seen) > 20  # pages, filters, model cards and files were all followed
    for url in ("/static/console.css", "/static/console.js", "/runs/nowhere",
                "/api/runs/nowhere"):
        _assert_locked_down(client.get(url), url)


def _assert_locked_down(answer: object, url: str) -> None:
    """Scripts and styles only from the console itself, never framed, never sniffed."""
    headers = answer.headers  # type: ignore[attr-defined]
    policy = headers.get("content-security-policy", "")
    assert "default-src 'none'" in policy and "script-src 'self'" in policy, url
    assert "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy, url
    assert headers.get("x-content-type-options") == "nosniff", url


def test_audit_filters_by_site_and_round(client, runs_root) -> None:
    everything = client.get("/api/runs/heart/audit").json()
    assert everything["sites"] == ["cleveland", "hungary", "switzerland", "va"]
    assert everything["rounds"] == [0, 1, 2, 3]
    one = client.get("/api/runs/heart/audit", params={"site": "va", "round": "2"}).json()
    assert one["total"] == 2  # va's train and evaluate replies of round 2
    assert {(e["site"], e["round"]) for e in one["entries"]} == {("va", 2)}
    assert {e["type"] for e in one["entries"]} == {"train", "evaluate"}
    page = client.get("/runs/heart/audit", params={"site": "va", "round": "2"}).text
    assert "2 of 2 entries" in page and "head.weight" in page


def test_hospitals_page_lists_each_with_its_rounds(runs_root, tmp_path, signing_pub_path
                                                   ) -> None:
    root = _copy(runs_root, tmp_path, "enrolled")
    # as `medfed server` writes it from hospitals.yaml: two of the four are registered
    (root / "enrolled" / "enrolment.json").write_text(json.dumps(
        {"names": {"1": "cleveland", "2": "va"}, "max_examples": {}}))
    with TestClient(create_app(root, signing_pub_path)) as c:
        data = c.get("/api/runs/enrolled/hospitals").json()
        page = c.get("/runs/enrolled/hospitals").text
    sites = [h["site"] for h in data["hospitals"]]
    assert sites == ["cleveland", "hungary", "switzerland", "va"]
    assert [h["registered"] for h in data["hospitals"]] == [True, False, False, True]
    assert all(h["trained_rounds"] == [1, 2, 3] for h in data["hospitals"])
    assert not any(h["online"] for h in data["hospitals"])  # the run is over
    assert page.count("1, 2, 3") == 4


@pytest.mark.parametrize("url", [
    "/runs/nope", "/runs/%2E%2E", "/runs/..%2F..%2Fetc", "/runs/heart%00", "/runs/.hidden",
    "/api/runs/%2E%2E", "/runs/heart/versions/99", "/runs/heart/versions/x",
    "/runs/heart/versions/1/files/..%2F..%2Fsummary.json",
    "/runs/heart/versions/1/files/signing.key", "/runs/heart/audit?round=-1",
])
def test_bad_names_in_urls_get_404_with_one_sentence(client, url) -> None:
    answer = client.get(url)
    assert answer.status_code == 404
    if "/api/" in url:
        assert set(answer.json()) == {"detail"}
    else:
        assert "Not found" in answer.text and "Traceback" not in answer.text


def test_a_symlinked_run_is_not_served(client, runs_root, tmp_path) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(runs_root / "heart", outside)
    link = runs_root / "linked"
    link.symlink_to(outside)
    try:
        assert client.get("/runs/linked").status_code == 404
        assert "linked" not in [r["name"] for r in client.get("/api/runs").json()["runs"]]
    finally:
        link.unlink()


def _copy(runs_root: Path, tmp_path: Path, name: str) -> Path:
    root = tmp_path / "runs"
    shutil.copytree(runs_root / "heart", root / name)
    (root / name / "processes.pid").unlink(missing_ok=True)
    return root


def test_a_half_written_run_shows_its_state_not_a_500(runs_root, tmp_path, signing_pub_path
                                                      ) -> None:
    root = _copy(runs_root, tmp_path, "crashed")
    run = root / "crashed"
    (run / "summary.json").unlink()
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text[: len(text) - 40])  # last line cut mid-write
    (run / "splits.json").write_text("{\"clev")
    with TestClient(create_app(root, signing_pub_path)) as c:
        page = c.get("/runs/crashed")
        assert page.status_code == 200
        assert 'data-status="failed"' in page.text
        assert "still being written" in page.text and "splits.json is incomplete" in page.text
        assert c.get("/api/runs/crashed").json()["rounds_done"] == 2  # the complete lines
        for sub in ("hospitals", "versions", "audit"):
            assert c.get(f"/runs/crashed/{sub}").status_code == 200


def test_a_running_run_says_so_and_polls_for_updates(runs_root, tmp_path, signing_pub_path
                                                     ) -> None:
    root = _copy(runs_root, tmp_path, "live")
    run = root / "live"
    (run / "summary.json").unlink()
    # as `medfed simulate` leaves it: owner (here: this test) alive, a marked child running
    marker = "console-test-" + os.urandom(4).hex()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             env={**os.environ, MARKER_ENV: marker})
    (run / "processes.pid").write_text(f"marker {marker}\nowner {os.getpid()}\n{child.pid}\n")
    try:
        _check_running(root, signing_pub_path)
    finally:
        child.kill()
        child.wait()
    with TestClient(create_app(root, signing_pub_path)) as c:  # the child gone: crashed
        assert c.get("/api/runs/live/status").json()["status"] == "failed"


def _check_running(root: Path, signing_pub_path: Path) -> None:
    with TestClient(create_app(root, signing_pub_path)) as c:
        page = c.get("/runs/live").text
        assert 'data-status="running"' in page
        assert re.search(r'<script src="/static/console.js" data-status-url='
                         r'"/api/runs/live/status"', page)
        assert c.get("/api/runs/live/status").json() == {"status": "running", "rounds_done": 3}
        assert c.get("/static/console.js").status_code == 200


def test_a_resumed_run_is_marked(runs_root, tmp_path, signing_pub_path) -> None:
    root = _copy(runs_root, tmp_path, "again")
    (root / "again" / "request.json").write_text(json.dumps({"resume": True}))
    with TestClient(create_app(root, signing_pub_path)) as c:
        (run,) = c.get("/api/runs").json()["runs"]
        assert (run["status"], run["resumed"]) == ("finished", True)
        assert 'data-status="resumed"' in c.get("/").text
        assert 'data-status="resumed"' in c.get("/runs/again").text


def test_a_tampered_version_is_flagged_and_gets_no_model_card(runs_root, tmp_path,
                                                              signing_pub_path) -> None:
    root = _copy(runs_root, tmp_path, "tampered")
    head = root / "tampered" / "registry" / "v0002" / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 0xFF
    head.write_bytes(bytes(data))
    with TestClient(create_app(root, signing_pub_path)) as c:
        sig = {v["version"]: v["signature"]
               for v in c.get("/api/runs/tampered/versions").json()["versions"]}
        assert sig[1] == "verified" and sig[2].startswith("INVALID: ")
        assert "head.safetensors" in sig[2]
        card = c.get("/runs/tampered/versions/2").text
        assert "No model card" in card and "INVALID" in card


def test_served_to_hospitals_under_the_registry_no_server_path_shows(
        runs_root, tmp_path, signing_pub_path) -> None:
    """Under the registry (a prefix) the console is the hospitals': neither the runs'
    directory nor a version's path may appear, also not in a failed signature check."""
    root = _copy(runs_root, tmp_path, "tampered")
    head = root / "tampered" / "registry" / "v0002" / "head.safetensors"
    head.write_bytes(head.read_bytes()[:-1] + b"\0")
    with TestClient(create_app(root, signing_pub_path, prefix="/console")) as c:
        pages = [c.get("/").text, c.get("/api/runs/tampered/versions").text,
                 c.get("/runs/tampered/versions/2").text]
    assert "INVALID" in pages[1] and "v0002" in pages[1]
    assert not any(str(tmp_path) in page for page in pages)


def test_report_is_one_self_contained_file_with_the_runs_numbers(runs_root, tmp_path) -> None:
    out = write_report(runs_root / "heart", tmp_path / "out" / "report.html")
    html = out.read_text()
    assert "<script" not in html and "<link" not in html
    assert not re.search(r'(src|href)="(?!#)', html)  # nothing to fetch, nowhere to go
    assert html.count("<svg") == 3 and "<style>" in html
    cells = parse(html).cells
    last = rounds_of(runs_root / "heart")[-1]
    key = (("data-metric", "auc"), ("data-round", "3"), ("data-split", "validation"))
    assert cells[key] == fmt(last["validation"]["auc"])
    with pytest.raises(FileNotFoundError, match="is not a run directory"):
        write_report(tmp_path, tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()


# --- behind `medfed server`'s mutual TLS ---------------------------------------------------------
def test_console_under_the_registry_server_needs_a_federation_certificate(
        runs_root: Path, tmp_path: Path, signing_pub_path: Path) -> None:
    fed = init_federation(tmp_path / "certs", [], [])
    hospital = init_hospital("hospital-a", fed.out / "hospitals", fed.out)
    run_dir = runs_root / "heart"  # `medfed server` mounts the console over its run directory
    handle = start_registry_server(
        run_dir / "registry", "127.0.0.1", 0, fed.server_cert, fed.server_key, fed.ca_cert,
        mounts={"/console": create_app(run_dir, signing_pub_path, prefix="/console")})
    try:
        with pytest.raises(REFUSED):
            https_get(handle.port, tls_context(fed.ca_cert), "/console/")
        enrolled = tls_context(fed.ca_cert, hospital.client_cert, hospital.client_key)
        status, body = https_get(handle.port, enrolled, "/console/api/runs")
        assert status == 200
        assert [(r["name"], r["status"]) for r in json.loads(body)["runs"]] == [
            ("heart", "finished")]
        status, body = https_get(handle.port, enrolled, "/console/runs/heart")
        page = body.decode()
        assert status == 200 and 'href="/console/static/console.css"' in page
        assert all(u.startswith("/console/") for u in parse(page).links)
        assert https_get(handle.port, enrolled, "/console/static/console.css")[0] == 200
        assert https_get(handle.port, enrolled, "/v1/versions")[0] == 200  # registry still
    finally:
        handle.stop()


def test_values_of_a_runs_files_are_escaped_wherever_they_are_shown(runs_root, tmp_path,
                                                                    signing_pub_path) -> None:
    """The split sizes and a site model's version were printed raw (the server writes them,
    but a page must not trust a file)."""
    root = _copy(runs_root, tmp_path, "odd")
    splits = root / "odd" / "splits.json"
    sizes = json.loads(splits.read_text())
    first = next(iter(sizes))
    sizes[first]["train"] = "<img src=x onerror=alert(1)>"
    splits.write_text(json.dumps(sizes))
    with TestClient(create_app(root, signing_pub_path)) as c:
        page = c.get("/runs/odd").text
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
