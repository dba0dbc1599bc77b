"""`medfed report RUN_DIR --out report.html`: the run page as one self-contained file."""

from __future__ import annotations

from pathlib import Path

from common.atomic import atomic_write_text
from console import pages, runs


def write_report(run_dir: Path, out: Path) -> Path:
    """Write the report of the run in `run_dir` to `out` (atomic); returns `out`.

    Raises FileNotFoundError with one sentence when `run_dir` is not a run directory.
    """
    run_dir = Path(run_dir)
    if not runs.is_run(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a run directory (none of "
                                f"{', '.join(runs.RUN_MARKERS)} in it)")
    view = runs.read_run(run_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, pages.report_page(view, str(run_dir)))
    return out
