"""The model registry: one signed bundle per global-model version plus `latest`/`best` pointers.

Written by the server (`server/federation.py`), read by the registry's HTTPS server and by
`medfed pull`; it lives in `common/` because both sides use it.

Layout::

    registry/
      v0000/  v0001/ ...     # signed bundles (backbone, head, manifest.json, manifest.sig)
      latest.json            # {"version": N}
      best.json              # {"version": N, "metric": "auc", "split": "validation",
                             #  "source": "...", "value": 0.91}

`best` is chosen on validation metrics only (`metrics.validation` of each version); ties go
to the later version.

Every file is written atomically, so a crash leaves either the old or the new state.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.atomic import atomic_write_text
from common.bundle import BundleError, write_bundle

VERSION_RE = re.compile(r"v(\d{4,})")
LOWER_IS_BETTER = ("loss", "brier", "ece")


def improves(metric: str, value: float, best: float | None) -> bool:
    """`value` is at least as good as `best` (ties: the later version wins)."""
    if best is None:
        return True
    return value <= best if metric in LOWER_IS_BETTER else value >= best


class Registry:
    """Writes and resolves model versions under `root`."""

    def __init__(self, root: Path, signing_key: Ed25519PrivateKey | None = None) -> None:
        self.root = Path(root)
        self.signing_key = signing_key

    def version_dir(self, version: int) -> Path:
        """Directory of one version."""
        return self.root / f"v{version:04d}"

    def versions(self) -> list[int]:
        """Completed versions, ascending (temp dirs of an interrupted write are ignored)."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = VERSION_RE.fullmatch(child.name)
            # a symlink is never a version: it could point anywhere on the disk
            if match and child.is_dir() and not child.is_symlink() \
                    and (child / "manifest.sig").is_file():
                found.append(int(match.group(1)))
        return sorted(found)

    def publish(
        self,
        version: int,
        backbone: dict[str, torch.Tensor],
        head: dict[str, torch.Tensor],
        manifest: dict[str, Any],
        score: float | None,
        metric: str,
        source: str = "validation",
    ) -> dict[str, Any]:
        """Write version `version` and move the pointers; returns the signed manifest.

        `score` is the version's validation `metric` (None: undefined); `source` says which
        validation set it comes from.
        """
        if self.signing_key is None:
            raise BundleError(f"registry {self.root} was opened read-only")
        self.root.mkdir(parents=True, exist_ok=True)
        written = write_bundle(
            self.version_dir(version), backbone=backbone, head=head, manifest=manifest,
            signing_key=self.signing_key, replace=True,
        )
        self._write_pointer("latest", {"version": version})
        if score is not None and not math.isfinite(score):
            score = None  # undefined (NaN) counts like a missing score
        best = self.read_pointer("best")
        best_value = best.get("value") if best else None
        pointer = {"version": version, "metric": metric, "split": "validation",
                   "source": source, "value": score}
        if score is not None and improves(metric, score,
                                          None if best_value is None else float(best_value)):
            self._write_pointer("best", pointer)
        elif best is None:
            self._write_pointer("best", pointer)
        return written

    def repair_pointers(self, metric: str) -> None:
        """Recompute `latest` and `best` from the versions present (after a crash); a
        pointer with no version to name is removed, never left naming a dropped one."""
        versions = self.versions()
        if not versions:
            for name in ("latest", "best"):
                (self.root / f"{name}.json").unlink(missing_ok=True)
            return
        self._write_pointer("latest", {"version": versions[-1]})
        best: tuple[float, int, str] | None = None
        for version in versions:
            manifest = json.loads((self.version_dir(version) / "manifest.json").read_text())
            validation = manifest.get("metrics", {}).get("validation", {})
            value = validation.get(metric)
            if isinstance(value, int | float) and math.isfinite(value) and improves(
                    metric, float(value), None if best is None else best[0]):
                best = (float(value), version, str(validation.get("source", "validation")))
        if best is not None:
            self._write_pointer("best", {"version": best[1], "metric": metric,
                                         "split": "validation", "source": best[2],
                                         "value": best[0]})
        else:  # no version with a defined score: no `best` (it may name a dropped one)
            (self.root / "best.json").unlink(missing_ok=True)

    def _write_pointer(self, name: str, data: dict[str, Any]) -> None:
        atomic_write_text(self.root / f"{name}.json", json.dumps(data, indent=2) + "\n")

    def read_pointer(self, name: str) -> dict[str, Any] | None:
        """Contents of `latest.json` / `best.json`, or None before the first version."""
        path = self.root / f"{name}.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("version"), int):
            raise BundleError(f"registry pointer {path} is malformed")
        return data

    def resolve(self, spec: str) -> Path:
        """Directory for `latest`, `best` or a version number."""
        spec = str(spec)
        if spec in ("latest", "best"):
            pointer = self.read_pointer(spec)
            if pointer is None:
                raise BundleError(f"registry {self.root} has no '{spec}' version yet")
            version = int(pointer["version"])
        elif re.fullmatch(r"[0-9]{1,9}", spec):
            version = int(spec)
        else:
            raise BundleError(f"version must be a number, 'latest' or 'best', got '{spec}'")
        path = self.version_dir(version)
        if version not in self.versions():
            raise BundleError(f"registry {self.root} has no version {version}")
        return path
