"""A non-editable install of medfed, as the Docker image has it, for end-to-end tests.

The fresh environment borrows the test environment's third-party packages through a `.pth`
line (no network, no second torch download); medfed itself comes only from the wheel, so a
path into the checkout (PROJECT_ROOT and friends) would fail there. Flower's console scripts
are written for the fresh interpreter as pip would write them.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from importlib.metadata import distribution
from pathlib import Path

from tests.conftest import PROJECT
from tests.limits import INSTALL_S


def fresh_env(tmp: Path) -> Path:
    """A venv holding medfed's wheel only, with this environment's dependencies importable."""
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(PROJECT)],
                   check=True, timeout=INSTALL_S, cwd=tmp)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=INSTALL_S)
    python = venv / "bin" / "python"
    (wheel,) = wheels.glob("medfed-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                    "--no-deps", str(wheel)], check=True, timeout=INSTALL_S, cwd=tmp)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True).stdout
    # .pth lines only extend sys.path: the test env's editable-install hook is not run
    (Path(site.strip()) / "medfed-test-deps.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    for ep in distribution("flwr").entry_points:
        if ep.group != "console_scripts":
            continue
        module, func = ep.value.split(":")
        script = venv / "bin" / ep.name
        script.write_text(f"#!{python}\nimport sys\nfrom {module} import {func}\n"
                          f"sys.exit({func}())\n", encoding="utf-8")
        script.chmod(0o755)
    return venv
