"""Data files shipped with medfed (UCI Heart Disease, MedMNIST), with licences and citations.

:func:`dataset_dir` finds them even when the code runs from a Flower app bundle (FAB): a FAB
carries only source and text files, so its copy of this package has no data files and the
installed medfed distribution is looked up instead.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

HERE = Path(__file__).resolve().parent


def _installed_root() -> Path | None:
    """Where the installed `medfed` distribution keeps `common/datasets`."""
    try:
        dist = metadata.distribution("medfed")
    except metadata.PackageNotFoundError:
        return None
    direct = dist.read_text("direct_url.json")
    if direct:  # editable install: the source tree
        url = json.loads(direct).get("url", "")
        if url.startswith("file://"):
            candidate = Path(unquote(urlparse(url).path)) / "common" / "datasets"
            if candidate.is_dir():
                return candidate
    located = Path(str(dist.locate_file("common/datasets")))
    return located if located.is_dir() else None


def dataset_dir(name: str, marker: str) -> Path:
    """Directory `name` holding file `marker`: $MEDFED_DATA_DIR, this package, or the install."""
    candidates = []
    if os.environ.get("MEDFED_DATA_DIR"):
        candidates.append(Path(os.environ["MEDFED_DATA_DIR"]) / name)
    candidates.append(HERE / name)
    installed = _installed_root()
    if installed is not None:
        candidates.append(installed / name)
    for folder in candidates:
        if (folder / marker).exists():
            return folder
    return HERE / name  # the caller reports the missing file with its full path
