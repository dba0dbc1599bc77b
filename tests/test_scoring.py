"""Scoring a model in float64 (common/scoring.py)."""

from __future__ import annotations

import numpy as np
import torch

from common.models import SplitModel
from common.scoring import OperatingPoint, score_model, score_splits


def test_scoring_several_splits_from_one_copy_equals_scoring_each() -> None:
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU()))
    model = SplitModel(backbone, feature_dim=4, num_classes=2)
    rng = np.random.default_rng(0)
    splits = [(rng.normal(size=(n, 5)).astype(np.float32), rng.integers(0, 2, n))
              for n in (30, 17)]
    op = OperatingPoint()
    together = score_splits(model, splits, op)
    assert together == [score_model(model, x, y, op) for x, y in splits]
    assert together[0] != together[1]
