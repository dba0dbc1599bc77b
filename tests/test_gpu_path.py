"""The GPU path as far as a CPU-only machine can check it: device flags, the GPU share per
simulated ClientApp, where training says its tensors were, and the GPU check's refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import gpu_check
from common.config import ModelConfig, OptimConfig
from common.models import build_model
from common.training import train_local
from medfed.cli import build_parser
from medfed.commands import with_device
from server.simulate import SimulateRequest, gpu_share

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def test_gpu_share_off_cuda_is_zero_and_on_cuda_split_over_what_runs_at_once() -> None:
    assert gpu_share(CPU, None, 1.0, 16) == 0.0
    assert gpu_share(CUDA, None, 1.0, 16) == pytest.approx(1 / 16)
    assert gpu_share(CUDA, None, 4.0, 16) == pytest.approx(1 / 4)
    assert gpu_share(CUDA, None, 8.0, 2) == 1.0  # one ClientApp at a time gets the whole GPU
    assert gpu_share(CUDA, 0.5, 1.0, 16) == 0.5  # as asked


def test_gpu_share_zero_on_cuda_is_refused() -> None:
    with pytest.raises(ValueError, match="--gpus-per-client 0 with device cuda"):
        gpu_share(CUDA, 0.0, 1.0, 16)


def test_simulate_request_carries_the_share_to_the_worker() -> None:
    request = SimulateRequest(config_path="c.yaml", overrides=(), bundle="b",  # type: ignore[arg-type]
                              run_dir="r", keys="k", gpus_per_client=0.25)  # type: ignore[arg-type]
    assert SimulateRequest.from_json(request.to_json()).gpus_per_client == 0.25
    unset = SimulateRequest.from_json(request.to_json().replace("0.25", "null"))
    assert unset.gpus_per_client is None


@pytest.mark.parametrize("command", ["pretrain", "simulate"])
def test_device_flag_is_the_last_config_override(command: str) -> None:
    extra = ["--bundle", "b"] if command == "simulate" else []
    args = build_parser().parse_args([command, "--config", "c.yaml", "--set", "device=cpu",
                                      "--device", "cuda:1", *extra, "--out", "o"])
    assert with_device(args) == ["device=cpu", "device=cuda:1"]
    args = build_parser().parse_args([command, "--config", "c.yaml", *extra, "--out", "o"])
    assert with_device(args) == []


@pytest.mark.parametrize("share", ["1.5", "-0.1", "half"])
def test_gpu_share_flag_outside_zero_to_one_is_refused(
        share: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["simulate", "--config", "c.yaml", "--bundle", "b",
                                   "--out", "o", "--gpus-per-client", share])
    assert stop.value.code == 2
    assert f"--gpus-per-client: must be a share of one GPU in 0..1, got '{share}'" in \
        capsys.readouterr().err


def test_training_reports_the_device_its_tensors_were_on() -> None:
    torch.manual_seed(0)
    model = build_model("resnet", (1, 8, 8), 2, ModelConfig(family="resnet", channels=(4, 4)))
    x, y = np.zeros((6, 1, 8, 8), np.float32), np.arange(6) % 2
    result = train_local(model, x, y, OptimConfig(steps=1), "head", CPU, 0)
    assert result.device == "cpu"


def test_gpu_check_without_cuda_says_so_and_writes_nothing(
        monkeypatch: pytest.MonkeyPatch, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "RESULT_FILE", tmp_path / "gpu_check.json")
    assert gpu_check.main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available here" in err[0]
    assert not (tmp_path / "gpu_check.json").exists()



def test_gpu_check_throughput_runs_the_breast_config_on_the_cpu() -> None:
    # the GPU check's first step, on the configs/breast.yaml it reads as it stands today
    assert gpu_check.throughput(CPU, 2) > 0
