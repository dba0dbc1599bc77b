"""Adam and SGD steps for local training, in plain tensor operations.

Why not ``torch.optim``: its optimisers import ``torch._dynamo`` the first time one is built
(``torch._disable_dynamo``), about 1.3 s of CPU in every process that trains. A deployed
hospital pays that on every training message, because Flower starts a fresh ClientApp process
per message. On CPU these steps do the same operations in the same order as torch's
single-tensor Adam and SGD (torch's default there), so the weights come out bit-identical
(tests/test_optim.py compares them); on CUDA torch would use its multi-tensor kernels, which
round differently in the last bits.

Only what medfed configures is supported: Adam (betas 0.9/0.999, eps 1e-8, L2 weight decay
added to the gradient, no AMSGrad) and SGD without momentum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults


@dataclass
class ParamGroup:
    """Tensors that share one learning rate."""

    params: Sequence[nn.Parameter]
    lr: float


@dataclass
class _AdamState:
    """One tensor's running moments and how many steps it took."""

    exp_avg: Tensor
    exp_avg_sq: Tensor
    steps: int = 0


@dataclass
class LocalOptimizer:
    """``zero_grad()`` and ``step()`` over parameter groups, like a ``torch.optim`` optimiser.

    Parameters without a gradient are skipped by ``step``, as torch does.
    """

    kind: str  # "adam" or "sgd"
    groups: Sequence[ParamGroup]
    weight_decay: float = 0.0
    _adam_state: dict[nn.Parameter, _AdamState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("adam", "sgd"):
            raise ValueError(f"optimizer '{self.kind}' is unknown; expected adam or sgd")

    def zero_grad(self) -> None:
        """Drop every gradient (``set_to_none=True``)."""
        for group in self.groups:
            for param in group.params:
                param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        for group in self.groups:
            for param in group.params:
                if param.grad is None:
                    continue
                grad = param.grad
                if self.weight_decay != 0:
                    grad = grad.add(param, alpha=self.weight_decay)
                if self.kind == "sgd":
                    param.add_(grad, alpha=-group.lr)
                else:
                    self._adam(param, grad, group.lr)

    def _adam(self, param: nn.Parameter, grad: Tensor, lr: float) -> None:
        state = self._adam_state.get(param)
        if state is None:
            state = self._adam_state[param] = _AdamState(
                torch.zeros_like(param, memory_format=torch.preserve_format),
                torch.zeros_like(param, memory_format=torch.preserve_format))
        state.steps += 1
        step = float(state.steps)
        state.exp_avg.lerp_(grad, 1 - BETA1)
        state.exp_avg_sq.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
        bias_correction1 = 1 - BETA1**step
        bias_correction2 = 1 - BETA2**step
        step_size = lr / bias_correction1
        denom = (state.exp_avg_sq.sqrt() / bias_correction2**0.5).add_(EPS)
        param.addcdiv_(state.exp_avg, denom, value=-step_size)
