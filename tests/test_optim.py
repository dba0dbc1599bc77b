"""medfed's Adam and SGD steps give the weights torch.optim gives, bit for bit, on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.optim import LocalOptimizer, ParamGroup


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 16), nn.ReLU(), nn.Linear(16, 2), nn.Linear(2, 2))


def _train(net: nn.Sequential, opt: LocalOptimizer | torch.optim.Optimizer) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        x = torch.randn(32, 13, generator=gen)
        y = torch.randint(0, 2, (32,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(net[:3](x), y).backward()  # the last layer gets no gradient
        opt.step()


@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_the_steps_match_torch_optim_exactly(kind: str, weight_decay: float) -> None:
    ours, theirs = _net(), _net()

    def groups(net: nn.Sequential) -> list[tuple[list[nn.Parameter], float]]:
        # two learning rates, as a backbone scaled against its head
        return [(list(net[0].parameters()), 0.003),
                ([*net[2].parameters(), *net[3].parameters()], 0.05)]

    _train(ours, LocalOptimizer(kind, [ParamGroup(p, lr) for p, lr in groups(ours)],
                                weight_decay))
    torch_groups = [{"params": p, "lr": lr} for p, lr in groups(theirs)]
    cls = torch.optim.Adam if kind == "adam" else torch.optim.SGD
    _train(theirs, cls(torch_groups, lr=0.1, weight_decay=weight_decay))

    before = _net().state_dict()
    for name, value in ours.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[name]), name
        moved = not torch.equal(value, before[name])
        assert moved == (not name.startswith("3.")), name  # no gradient, no step


def test_an_unknown_optimizer_is_named() -> None:
    with pytest.raises(ValueError, match="optimizer 'adagrad' is unknown; expected adam or sgd"):
        LocalOptimizer("adagrad", [])
