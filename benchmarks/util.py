"""Shared helpers of the benchmarks: paths, machine description, result files, timing,
process-tree memory sampling, and small table formatting."""

from __future__ import annotations

import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = RESULTS / "tmp"  # scratch: bundles, run directories, logs (git-ignored)


def machine() -> dict[str, Any]:
    """CPU, cores, memory, OS and library versions, plus the load when this was called."""
    import flwr
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
    }


def summary(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean and sample std over seeds of the defined values (None when none is defined)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "std": std, "n": len(vals)}


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table; "undef." for None (e.g. AUC of a one-class split)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "undef."
    if isinstance(value, dict):  # a summary(): mean ± std
        if value.get("mean") is None:
            return "undef."
        if value.get("n", 1) > 1:
            return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"
        return f"{value['mean']:.{digits}f}"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells that are not strings go through :func:`fmt`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [c if isinstance(c, str) else fmt(c) for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 if it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


class PeakRss:
    """Samples the process tree of `pid` in a thread: `peak` is the largest summed RSS seen,
    `cpu_s` the CPU time (user + system) of every process seen in the tree.

    Summed RSS counts pages shared between processes (libraries, Ray's shared object store)
    once per process, so it is an upper bound on the memory the tree really uses. CPU time is
    the sum of each process's own last sampled total; what a process spends in its last
    interval before it exits is missed (at most `interval` of CPU per process).
    """

    def __init__(self, pid: int, interval: float = 0.25, progress: Path | None = None) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._cpu: dict[tuple[int, float], float] = {}
        self.progress = progress  # a file the command appends one line to per step
        self.cpu_at_line: list[float] = []  # tree CPU seconds when line i+1 was first seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the whole tree so far."""
        return sum(self._cpu.values())

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = 0
        for proc in procs:
            try:
                with proc.oneshot():
                    total += proc.memory_info().rss
                    t = proc.cpu_times()
                    key = (proc.pid, proc.create_time())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            self._cpu[key] = t.user + t.system  # own time only: children are sampled too
        self.peak = max(self.peak, total)
        if self.progress is not None:
            try:
                lines = self.progress.read_bytes().count(b"\n")
            except OSError:
                lines = 0
            while len(self.cpu_at_line) < lines:
                self.cpu_at_line.append(self.cpu_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class LoadSampler:
    """The 1-minute load average every `interval` seconds while the `with` block runs."""

    def __init__(self, interval: float = 15.0) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(os.getloadavg()[0])

    def figures(self) -> dict[str, float | None]:
        """Mean, max and min of the samples (None before the first one)."""
        s = self.samples
        return {"load_1min_mean": round(sum(s) / len(s), 2) if s else None,
                "load_1min_max": max(s, default=None), "load_1min_min": min(s, default=None)}

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class CmdResult:
    """Exit code, wall time, peak process-tree RSS and tree CPU time of one command."""

    code: int
    wall_s: float
    peak_rss_bytes: int
    cpu_s: float = 0.0
    cpu_at_line: tuple[float, ...] = ()  # see PeakRss.cpu_at_line


def bench_env(home: Path) -> dict[str, str]:
    """Environment for medfed commands run by a benchmark (private MEDFED_HOME)."""
    return {**os.environ, "MEDFED_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}


def medfed(*args: str) -> list[str]:
    """Command line of the medfed CLI in this interpreter."""
    return [sys.executable, "-m", "medfed.cli", *args]


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process started with start_new_session=True and everything in its group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


def run_cmd(cmd: list[str], env: dict[str, str], log: Path, timeout: float = 3600.0,
            progress: Path | None = None, interval: float = 0.25) -> CmdResult:
    """Run `cmd` in its own process group, log to `log`, sample its tree's RSS and CPU."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        try:
            with PeakRss(proc.pid, interval, progress) as rss:
                code = proc.wait(timeout=timeout)
        finally:
            stop_group(proc)
    return CmdResult(code, time.perf_counter() - start, rss.peak, rss.cpu_s,
                     tuple(rss.cpu_at_line))


def require_ok(result: CmdResult, log: Path) -> None:
    """Raise with the log's tail when a command failed."""
    if result.code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"command failed with exit code {result.code}; log {log}:\n{tail}")
