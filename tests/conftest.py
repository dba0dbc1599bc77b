"""Shared fixtures: a private MEDFED_HOME with a signing key, and a small pretrained heart bundle.

Nothing here touches `~/.medfed`: keys and bundles live in pytest's temporary directories, and
subprocess tests get an environment whose MEDFED_HOME points there too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

# One thread per process for the whole suite (this process and every `medfed`/Flower process it
# starts inherit it): the models here are tiny, so one thread is as fast, and on a busy machine
# spinning OpenMP threads made in-process runs about 10x slower (tests/test_robustness.py beside
# three busy loops on 2 cores: ~10 minutes with torch's 2 threads, 52 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from common.config_check import load_config  # noqa: E402
from common.pretrain import pretrain  # noqa: E402
from common.signing import load_or_create_signing_key, public_key_path  # noqa: E402
from tests.limits import TEST_S  # noqa: E402

torch.set_num_threads(1)

PROJECT = Path(__file__).resolve().parents[1]
HEART = PROJECT / "configs" / "heart.yaml"
BREAST = PROJECT / "configs" / "breast.yaml"
SYNTHETIC = Path(__file__).resolve().parent / "configs" / "synthetic.yaml"
# 5 epochs over Cleveland's 199 rows: a real, verifying bundle in about a second
FAST_PRETRAIN = ("pretrain.optim.epochs=5",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test gets pytest-timeout's limit from tests/limits.py (a hang fails one test).

    Files holding slow tests come first, each kept whole and in order: pytest-xdist hands
    files out in this order (pyproject's `--dist loadfile`), so the long ones start at once
    and the quick files fill the gaps instead of leaving one worker with a long tail.
    """
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_S))
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: files stay whole


@pytest.fixture(scope="session")
def medfed_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MEDFED_HOME of our own (keys, node caches) for the whole session."""
    return tmp_path_factory.mktemp("medfed_home")


@pytest.fixture(scope="session")
def signing_key_path(medfed_home: Path) -> Path:
    """The server's bundle-signing key, where `medfed` would create it in `medfed_home`."""
    path = medfed_home / "signing.key"
    load_or_create_signing_key(path)
    return path


@pytest.fixture(scope="session")
def signing_key(signing_key_path: Path) -> Ed25519PrivateKey:
    """The private signing key."""
    return load_or_create_signing_key(signing_key_path)[0]


@pytest.fixture(scope="session")
def signing_pub_path(signing_key_path: Path) -> Path:
    """The public half, as given to hospitals."""
    return public_key_path(signing_key_path)


@pytest.fixture(scope="session", autouse=True)
def _private_medfed_home(medfed_home: Path, signing_key_path: Path) -> Iterator[None]:
    """In-process code reads `$MEDFED_HOME` too (keys, pull state): never the user's own."""
    before = os.environ.get("MEDFED_HOME")
    os.environ["MEDFED_HOME"] = str(medfed_home)
    yield
    if before is None:
        os.environ.pop("MEDFED_HOME", None)
    else:
        os.environ["MEDFED_HOME"] = before


@pytest.fixture(scope="session")
def heart_bundle(tmp_path_factory: pytest.TempPathFactory, signing_key: Ed25519PrivateKey
                 ) -> Path:
    """A signed heart bundle pretrained briefly on Cleveland (read-only: copy before editing)."""
    out = tmp_path_factory.mktemp("heart_bundle") / "pretrain"
    pretrain(load_config(HEART, FAST_PRETRAIN), out, signing_key)
    return out


@pytest.fixture(scope="session")
def cli_env(medfed_home: Path) -> dict[str, str]:
    """Environment for `medfed` / `flwr` subprocesses: our MEDFED_HOME, the venv on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "MEDFED_HOME": str(medfed_home),
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
    }


def heart_csv_without(site: str, column: str, path: Path) -> Path:
    """A heart centre's CSV as a hospital would export it, with one column missing."""
    from common.data.heart import export_site_csv  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    export_site_csv(site, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    drop = lines[0].split(",").index(column)
    path.write_text("\n".join(",".join(c for j, c in enumerate(line.split(",")) if j != drop)
                              for line in lines) + "\n", encoding="utf-8")
    return path
