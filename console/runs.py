"""What the console shows, read from run directories: runs, rounds, sites, versions, audit.

Every reader here is read-only and total: a file that is missing, still being written (a
last line without its newline) or damaged becomes a `problems` sentence in the result, never
an exception, so a crashed or running run shows as such. Run names from URLs are checked
like the registry's specs: one directory name, no separators, no symlink, inside the root.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.bundle import BundleError
from common.data.splits import TEST_LABEL
from common.processes import alive, marked_pids

RUN_MARKERS = ("metrics.jsonl", "summary.json", "request.json", "registry")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION = re.compile(r"v(\d{4,9})")
AUDIT_LIMIT = 2000  # entries per audit answer: a long run's audit is large
HEADLINE_METRIC = "auc"


class UnknownRun(LookupError):
    """The name is not a run under the console's root (or not a valid name at all)."""


@dataclass
class Read:
    """A file's content, or why it has none."""

    value: Any = None
    problem: str | None = None


def read_json(path: Path) -> Read:
    """A JSON file; `problem` says why not (missing, being written, not JSON)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Read(problem=f"{path.name} does not exist (yet)")
    except OSError as err:
        return Read(problem=f"{path.name} cannot be read: {err.strerror}")
    try:
        return Read(json.loads(text))
    except ValueError:
        return Read(problem=f"{path.name} is incomplete or not JSON (still being written?)")


def read_jsonl(path: Path) -> Read:
    """The complete lines of a JSON-lines file; a last line without its newline is one being
    written and is left out; a damaged line in the middle is reported and skipped."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return Read([], f"{path.name} does not exist (yet)")
    except OSError as err:
        return Read([], f"{path.name} cannot be read: {err.strerror}")
    lines = text.split("\n")
    partial = lines.pop()  # "" when the file ends with a newline
    rows, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    problem = None
    if bad:
        problem = f"{path.name}: {bad} damaged line(s) skipped"
    elif partial.strip():
        problem = f"{path.name}: its last line is still being written"
    return Read(rows, problem)


def is_run(path: Path) -> bool:
    """A directory one medfed run wrote (simulation or deployment)."""
    return path.is_dir() and not path.is_symlink() and any(
        (path / m).exists() for m in RUN_MARKERS)


def run_dirs(root: Path) -> dict[str, Path]:
    """Runs by name: `root` itself when it is one run, else its run subdirectories."""
    root = Path(root)
    if is_run(root):
        return {root.name: root} if _NAME.fullmatch(root.name) else {"run": root}
    try:
        children = sorted(root.iterdir())
    except OSError:
        return {}
    return {p.name: p for p in children if _NAME.fullmatch(p.name) and is_run(p)}


def find_run(root: Path, name: str) -> Path:
    """The run directory called `name`, or UnknownRun with one sentence."""
    if not _NAME.fullmatch(name):
        raise UnknownRun(f"{name!r} is not a run name (letters, digits, '.', '_', '-')")
    path = run_dirs(root).get(name)
    if path is None or not path.resolve().is_relative_to(Path(root).resolve()):
        raise UnknownRun(f"there is no run {name!r} here")
    return path


def owner_pid(run_dir: Path) -> int | None:
    """The pid of the medfed command that holds the run's processes, while it lives: its
    pid file names it and the marker its processes carry (a pid alone may have been reused
    since a crash)."""
    try:
        text = (run_dir / "processes.pid").read_text(encoding="utf-8")
    except OSError:
        return None
    fields = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
    owner, marker = fields.get("owner", "").strip(), fields.get("marker", "").strip()
    if not owner.isdigit() or not marker or not alive(int(owner)):
        return None
    return int(owner) if marked_pids(marker) else None


def status(run_dir: Path) -> str:
    """running (its command is alive) / finished (summary written) / failed (neither)."""
    if (run_dir / "summary.json").exists():
        return "finished"
    if owner_pid(run_dir) is not None:
        return "running"
    return "failed"


@dataclass
class RunView:
    """One run as the pages and the API show it."""

    name: str
    status: str
    resumed: bool
    started: float | None
    strategy: str | None
    rounds_done: int
    rounds_planned: int | None
    best_metric: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def last(self, split: str) -> dict[str, Any]:
        """The last completed round's metrics on `split` (validation or test)."""
        return dict(self.rounds[-1].get(split, {})) if self.rounds else {}

    def headline(self) -> dict[str, Any]:
        """What the runs table shows of this run."""
        metric = self.best_metric
        return {
            "name": self.name, "status": self.status, "resumed": self.resumed,
            "started": self.started, "strategy": self.strategy, "rounds_done": self.rounds_done,
            "rounds_planned": self.rounds_planned, "metric": metric,
            "validation": self.last("validation").get(metric),
            "test": self.last("test").get(metric), "test_label": TEST_LABEL,
            "problems": self.problems,
        }

    def sites(self) -> list[dict[str, Any]]:
        """Per-site table: rows, last reply, excluded replies and reasons, kept model."""
        excluded: dict[str, list[str]] = {}
        for r in self.rounds:
            for site, reason in (r.get("excluded") or {}).items():
                excluded.setdefault(site, []).append(f"round {r['round']}: {reason}")
        last_seen: dict[str, int] = {}
        for r in self.rounds:
            for site in (r.get("sites") or {}):
                last_seen[site] = r["round"]
        site_models = self.summary.get("site_models") or {}
        names = sorted(set(self.splits) | set(last_seen) | set(excluded) | set(site_models))
        out = []
        for name in names:
            kept = site_models.get(name, {})
            out.append({
                "site": name, "rows": self.splits.get(name, {}),
                "last_reply_round": last_seen.get(name),
                "excluded": excluded.get(name, []),
                "kept": kept.get("kept"), "kept_reason": kept.get("reason"),
                "based_on_version": kept.get("based_on_version"),
            })
        return out

    def to_json(self) -> dict[str, Any]:
        """The API form (what the run page is drawn from)."""
        cfg_fed = self.config.get("federation", {}) if isinstance(self.config, dict) else {}
        return {
            **self.headline(), "best_metric": self.best_metric, "rounds": self.rounds,
            "sites": self.sites(), "privacy": self.summary.get("privacy"),
            "validation_settings": cfg_fed.get("validation"),
            "heldout": cfg_fed.get("heldout"), "final": self.summary.get("final"),
            "best": self.summary.get("best"), "latest": self.summary.get("latest"),
            "config": self.config,
        }


def _latest_manifest_config(run_dir: Path) -> dict[str, Any]:
    registry = run_dir / "registry"
    try:
        versions = sorted(p for p in registry.iterdir() if _VERSION.fullmatch(p.name))
    except OSError:
        return {}
    for vdir in reversed(versions):
        manifest = read_json(vdir / "manifest.json").value
        if isinstance(manifest, dict) and isinstance(manifest.get("config"), dict):
            return dict(manifest["config"])
    return {}


def read_run(run_dir: Path, name: str | None = None) -> RunView:
    """Everything the run page needs from one run directory."""
    problems: list[str] = []
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    rounds = sorted((r for r in metrics.value if isinstance(r.get("round"), int)),
                    key=lambda r: r["round"])
    state = status(run_dir)
    summary = read_json(run_dir / "summary.json")
    request = read_json(run_dir / "request.json")
    splits = read_json(run_dir / "splits.json")
    for got in (metrics, summary if state == "finished" else Read(), splits):
        if got.problem and not (state == "running" and "does not exist" in got.problem):
            problems.append(got.problem)
    if state == "failed":
        problems.insert(0, "the run stopped before it finished (no summary.json and no "
                           "medfed command holds it)")
    config = _latest_manifest_config(run_dir)
    req = request.value if isinstance(request.value, dict) else {}
    fed = config.get("federation", {}) if config else {}
    planned = fed.get("rounds") if isinstance(fed.get("rounds"), int) else None
    started = None
    for path in (run_dir / "request.json", run_dir / "enrolment.json", run_dir / "metrics.jsonl"):
        try:
            started = path.stat().st_mtime
            break
        except OSError:
            continue
    if rounds and isinstance(rounds[0].get("elapsed_s"), int | float) and started is None:
        started = time.time() - float(rounds[-1]["elapsed_s"])
    strategy = (fed.get("strategy") or {}).get("name") if isinstance(fed, dict) else None
    summ = summary.value if isinstance(summary.value, dict) else {}
    best_metric = str(summ.get("best_metric") or fed.get("best_metric") or HEADLINE_METRIC)
    return RunView(
        name=name or run_dir.name, status=state, resumed=bool(req.get("resume")),
        started=started, strategy=strategy, rounds_done=rounds[-1]["round"] if rounds else 0,
        rounds_planned=planned, best_metric=best_metric, rounds=rounds, summary=summ,
        config=config, splits=splits.value if isinstance(splits.value, dict) else {},
        problems=problems,
    )


def list_runs(root: Path) -> list[dict[str, Any]]:
    """The runs table: one headline per run, newest first."""
    views = [read_run(path, name) for name, path in run_dirs(root).items()]
    views.sort(key=lambda v: v.started or 0.0, reverse=True)
    return [v.headline() for v in views]


# --- versions ---------------------------------------------------------------------------------
def public_key_for(run_dir: Path, given: Path | None) -> Path | None:
    """The key that verifies the run's versions: given, the run's own (simulate records its
    signing key's path), else $MEDFED_HOME/signing.pub."""
    from common.settings import medfed_home
    from common.signing import public_key_path

    if given is not None:
        return given
    req = read_json(run_dir / "request.json").value
    if isinstance(req, dict) and isinstance(req.get("keys"), str):
        candidate = public_key_path(Path(req["keys"]))
        if candidate.exists():
            return candidate
    home = medfed_home() / "signing.pub"
    return home if home.exists() else None


def signature_status(vdir: Path, public_key: Path | None) -> str:
    """'verified', or one sentence on why the version cannot be trusted."""
    from client.trust import open_manifest
    from common.signing import load_public_key

    if public_key is None:
        return "not checked: no federation public key (give --public-key)"
    try:
        open_manifest(vdir, load_public_key(public_key))
    except (BundleError, ValueError, OSError) as err:
        # the version by its name: the console may be served to hospitals (under the
        # registry), which must not learn the server's directories
        return "INVALID: " + str(err).replace(str(vdir), vdir.name)
    return "verified"


def versions(run_dir: Path, public_key: Path | None) -> dict[str, Any]:
    """Every registry version with its metrics, signature status and files; the pointers."""
    registry = run_dir / "registry"
    out: list[dict[str, Any]] = []
    problems: list[str] = []
    try:
        dirs = sorted(p for p in registry.iterdir() if _VERSION.fullmatch(p.name) and p.is_dir()
                      and not p.is_symlink())
    except OSError:
        dirs = []
        problems.append("the run has no model registry (yet)")
    pointers = {}
    for name in ("best", "latest"):
        got = read_json(registry / f"{name}.json")
        if isinstance(got.value, dict) and isinstance(got.value.get("version"), int):
            pointers[name] = got.value
        elif got.problem and "does not exist" not in got.problem:
            problems.append(got.problem)
    for vdir in dirs:
        manifest = read_json(vdir / "manifest.json")
        m = manifest.value if isinstance(manifest.value, dict) else {}
        metrics = m.get("metrics") or {}
        version = int(vdir.name[1:])
        out.append({
            "version": version, "round": m.get("round"), "created": m.get("created"),
            "validation": metrics.get("validation", {}), "test": metrics.get("test", {}),
            "signature": signature_status(vdir, public_key) if manifest.value else
            f"INVALID: {manifest.problem}",
            "files": sorted(p.name for p in vdir.iterdir() if p.is_file()),
            "markers": [n for n, p in pointers.items() if p["version"] == version],
        })
    return {"versions": out, "pointers": pointers, "test_label": TEST_LABEL,
            "problems": problems}


def version_dir(run_dir: Path, version: int) -> Path:
    """The bundle directory of `version`; UnknownRun when the run has none such."""
    vdir = run_dir / "registry" / f"v{version:04d}"
    if not vdir.is_dir() or vdir.is_symlink():
        raise UnknownRun(f"the run has no model version {version}")
    return vdir


# --- audit and hospitals ------------------------------------------------------------------------
def _audit_entries(run_dir: Path) -> Read:
    """audit.jsonl, each entry under the name its node went by: a hospital's first reply can
    come before it said its name (the server then wrote `node-<id>`)."""
    got = read_jsonl(run_dir / "audit.jsonl")
    names = {e.get("node"): e["site"] for e in got.value
             if isinstance(e.get("site"), str) and not e["site"].startswith("node-")}
    for e in got.value:
        if e.get("site") == f"node-{e.get('node')}" and e.get("node") in names:
            e["site"] = names[e["node"]]
    return got


def audit(run_dir: Path, site: str | None = None, rnd: int | None = None,
          limit: int = AUDIT_LIMIT) -> dict[str, Any]:
    """What each hospital sent, newest last, filtered by site and round; at most `limit`."""
    got = _audit_entries(run_dir)
    rows = [e for e in got.value if (site is None or e.get("site") == site)
            and (rnd is None or e.get("round") == rnd)]
    return {"entries": rows[-limit:], "total": len(rows), "shown": min(len(rows), limit),
            "sites": sorted({str(e["site"]) for e in got.value if e.get("site")}),
            "rounds": sorted({e["round"] for e in got.value if isinstance(e.get("round"), int)}),
            "problems": [got.problem] if got.problem else []}


def hospitals(run_dir: Path) -> dict[str, Any]:
    """Registered hospitals, when each was last heard from, refused joins, participation."""
    from server.deploy import refused_join

    enrolment = read_json(run_dir / "enrolment.json").value or {}
    registered = sorted(set((enrolment.get("names") or {}).values())
                        | set(enrolment.get("max_examples") or {}))
    entries = _audit_entries(run_dir).value
    last_seen: dict[str, float] = {}
    rounds: dict[str, set[int]] = {}
    for e in entries:
        name = e.get("site")
        if not isinstance(name, str):
            continue
        if isinstance(e.get("time"), int | float):
            last_seen[name] = max(last_seen.get(name, 0.0), float(e["time"]))
        if e.get("type") == "train" and isinstance(e.get("round"), int) and "error" not in e:
            rounds.setdefault(name, set()).add(e["round"])
    refused: list[str] = []
    try:
        with (run_dir / "superlink.log").open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                sentence = refused_join(line)
                if sentence is not None and sentence not in refused:
                    refused.append(sentence)
    except OSError:
        pass
    running = status(run_dir) == "running"
    now = time.time()
    table = []
    for name in sorted(set(registered) | set(last_seen)):
        seen = last_seen.get(name)
        table.append({
            "site": name, "registered": name in registered, "last_seen": seen,
            "online": bool(running and seen is not None and now - seen < 120),
            "trained_rounds": sorted(rounds.get(name, set())),
        })
    return {"hospitals": table, "refused_joins": refused, "running": running}
