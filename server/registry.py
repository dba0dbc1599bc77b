"""The model registry: one signed bundle per global-model version plus `latest`/`best` pointers.

Layout::

    registry/
      v0000/  v0001/ ...     # signed bundles (backbone, head, manifest.json, manifest.sig)
      latest.json            # {"version": N}
      best.json              # {"version": N, "metric": "auc", "value": 0.91}

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

VERSION_RE = re.compile(r"^v(\d{4,})$")


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
            match = VERSION_RE.match(child.name)
            if match and (child / "manifest.sig").exists():
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
    ) -> dict[str, Any]:
        """Write version `version` and move the pointers; returns the signed manifest."""
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
        if score is not None and math.isfinite(score) and (
            best_value is None or score > float(best_value)
        ):
            self._write_pointer("best", {"version": version, "metric": metric, "value": score})
        elif best is None and score is None:
            self._write_pointer("best", {"version": version, "metric": metric, "value": None})
        return written

    def repair_pointers(self, metric: str) -> None:
        """Recompute `latest` and `best` from the versions present (after a crash)."""
        versions = self.versions()
        if not versions:
            return
        self._write_pointer("latest", {"version": versions[-1]})
        best: tuple[float, int] | None = None
        for version in versions:
            manifest = json.loads((self.version_dir(version) / "manifest.json").read_text())
            value = manifest.get("metrics", {}).get("heldout", {}).get(metric)
            if isinstance(value, int | float) and math.isfinite(value) and (
                best is None or value > best[0]
            ):
                best = (float(value), version)
        if best is not None:
            self._write_pointer("best", {"version": best[1], "metric": metric, "value": best[0]})

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
        spec = str(spec).strip()
        if spec in ("latest", "best"):
            pointer = self.read_pointer(spec)
            if pointer is None:
                raise BundleError(f"registry {self.root} has no '{spec}' version yet")
            version = int(pointer["version"])
        elif spec.isdigit():
            version = int(spec)
        else:
            raise BundleError(f"version must be a number, 'latest' or 'best', got '{spec}'")
        path = self.version_dir(version)
        if version not in self.versions():
            raise BundleError(f"registry {self.root} has no version {version}")
        return path
