"""docs/own-data.md runs as written: every ```bash block, in order, in an empty folder that
holds a copy of configs/ (as a fresh clone would), with the venv's `medfed` on PATH."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT
from tests.limits import RUN_S

DOC = PROJECT / "docs" / "own-data.md"
BLOCK = re.compile(r"```bash\n(.*?)```", re.DOTALL)


def _blocks() -> list[str]:
    return BLOCK.findall(DOC.read_text(encoding="utf-8"))


def test_every_config_key_the_doc_names_is_in_the_example_yaml() -> None:
    example = yaml.safe_load((PROJECT / "configs" / "own-data.yaml").read_text())

    def keys(d: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            out.add(k)
            if isinstance(v, dict):
                out |= keys(v, f"{prefix}{k}.")
        return out

    # every backticked name that is a config key (any section), dotted or not
    text = DOC.read_text(encoding="utf-8")
    words = {w.split(".")[-1] for w in re.findall(r"`([a-z_.]+)`", text)}
    config_keys = {f.name for cls in _config_classes() for f in dataclasses.fields(cls)}
    named = (words & config_keys) - {"train", "validation", "test"}  # also split names
    known = keys(example)
    assert len(named) >= 8 and named <= known, named - known


def _config_classes() -> list[type]:
    from common import config

    return [c for c in vars(config).values()
            if isinstance(c, type) and dataclasses.is_dataclass(c)]


@pytest.mark.slow
def test_the_walk_through_runs_as_written(tmp_path: Path, cli_env: dict[str, str]) -> None:
    shutil.copytree(PROJECT / "configs", tmp_path / "configs")
    blocks = _blocks()
    assert len(blocks) >= 5
    outputs = []
    for block in blocks:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path,
                              env=cli_env, capture_output=True, text=True, timeout=RUN_S)
        assert done.returncode == 0, f"{block}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)
    text = "\n".join(outputs)
    # the blanked cells: drafted as imputed, and the heart label codes asked about
    assert "column 'chol' has" in text and "missing cell" in text
    assert "label 'num' has codes 0, 1, 2, 3, 4" in text
    assert "hungary: " in text and " validation, " in text  # split sizes printed
    report = json.loads((tmp_path / "reports" / "hungary.json").read_text())
    summary = json.loads((tmp_path / "runs" / "own" / "federated" / "summary.json").read_text())
    reported = summary["site_models"]["hungary"]["site_model"]["test"]
    for key in ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity", "brier"):
        assert report["metrics"][key] == pytest.approx(reported[key], abs=1e-9), key
    assert "95% bootstrap interval" in text  # the evaluate table
    for name in ("hungary_roc.png", "hungary_reliability.png", "hungary-predictions.csv"):
        assert (tmp_path / "reports" / name).stat().st_size > 0
