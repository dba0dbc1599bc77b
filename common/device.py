"""Device choice and seeding, one helper each, so every entry point behaves the same."""

from __future__ import annotations

import random
import re

import numpy as np
import torch

DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")


class DeviceError(ValueError):
    """The requested device is unknown or not available on this machine."""


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str) -> torch.device:
    """Turn a config device name into a :class:`torch.device`.

    Parameters
    ----------
    name : str
        ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Returns
    -------
    torch.device
        The device to run on.

    Raises
    ------
    DeviceError
        If the name is unknown or the accelerator it names is not available; asking for a GPU
        that is missing is an error rather than a silent fall-back to CPU.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise DeviceError(
                "device 'mps' was requested but Apple MPS is not available here; "
                "use device=cpu or device=auto"
            )
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        known = ", ".join(DEVICE_NAMES)
        raise DeviceError(f"device '{name}' is unknown; expected one of {known} (or cuda:N)")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device '{name}' was requested but CUDA is not available here; "
            "use device=cpu or device=auto"
        )
    index = int(match.group(1)) if match.group(1) is not None else None
    if index is not None and index >= torch.cuda.device_count():
        raise DeviceError(
            f"device '{name}' was requested but only {torch.cuda.device_count()} CUDA "
            "device(s) exist"
        )
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's global generators (CPU and all GPUs).

    Parameters
    ----------
    seed : int
        The seed; the same seed gives the same initial weights and batch order.
    """
    random.seed(seed)
    np.random.seed(seed)
    seed_torch(seed)


def seed_torch(seed: int) -> None:
    """Seed PyTorch's CPU generator and, where CUDA is present, every GPU's.

    Same generators as `torch.manual_seed` for CPU and CUDA; without CUDA that one also queues
    a CUDA seeding with a captured Python stack (`torch.cuda._lazy_call`), which costs more
    than the small-head training step it precedes (measured in simulation actors).
    """
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
