"""Local training, prediction and evaluation of a :class:`~common.models.SplitModel`.

Work is counted in optimiser steps (``cfg.steps``) so that hospitals of very different sizes
do comparable work per round; ``cfg.epochs > 0`` switches to whole passes instead. Only the
tensors named by ``trainable`` are optimised; frozen blocks always run in eval mode.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.augment import augment_batch, parse_augment
from common.config import OptimConfig
from common.device import seed_torch
from common.metrics import compute_metrics
from common.models import SplitModel, forward_from, frozen_prefix_blocks, set_trainable
from common.optim import LocalOptimizer, ParamGroup

ArrayLike = np.ndarray | Tensor


LOSSES = ("cross_entropy", "balanced_softmax")  # OptimConfig.loss


class TrainingError(ValueError):
    """Training or evaluation inputs (arrays, labels, optimiser settings) are invalid."""


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train_local`: mean cross-entropy over steps, steps, examples, and
    the device the trained tensors were on (read from the model, not from the request)."""

    loss: float
    steps: int
    num_examples: int
    device: str = "cpu"
    threads: int = 1  # torch's intra-op threads while training


def _inputs(x: ArrayLike) -> Tensor:
    out = (
        x.detach().float().cpu()
        if isinstance(x, Tensor)
        else torch.as_tensor(np.asarray(x, dtype=np.float32))
    )
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        raise TrainingError(f"inputs must be finite numbers, found {bad} NaN/inf entries")
    return out


def _labels(y: ArrayLike, num_rows: int, num_classes: int) -> Tensor:
    arr = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
    if arr.ndim != 1 or len(arr) != num_rows:
        raise TrainingError(f"labels must have shape ({num_rows},), found {arr.shape}")
    if num_rows == 0:
        raise TrainingError("no rows to train or evaluate on (0 examples)")
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.mod(arr, 1) == 0):
        raise TrainingError(f"labels must be integer class indices, found dtype {arr.dtype}")
    outside = int(np.sum((arr < 0) | (arr >= num_classes)))
    if outside:
        raise TrainingError(
            f"labels must lie in 0..{num_classes - 1}, found {outside} of {num_rows} outside"
        )
    return torch.as_tensor(arr.astype(np.int64))


@contextlib.contextmanager
def _kept_modes(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _batches(num_rows: int, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """``steps`` index batches from reshuffled passes; the last batch of a pass may be short."""
    rng = np.random.default_rng(seed)
    done = 0
    while True:
        order = rng.permutation(num_rows)
        for start in range(0, num_rows, batch_size):
            if done == steps:
                return
            yield order[start : start + batch_size]
            done += 1


def round_trainable(trainable: str, head_warmup_rounds: int, server_round: int) -> str:
    """What trains in ``server_round`` (1-based): the head alone in the first
    ``head_warmup_rounds`` rounds, then ``trainable``. The tensors exchanged stay
    ``trainable``'s: during the warm-up the backbone's come back as they were received."""
    return "head" if server_round <= head_warmup_rounds else trainable


def warmup_note(trainable: str, head_warmup_rounds: int, rounds: int) -> str | None:
    """A sentence when the head-only warm-up spans the whole run, so ``trainable`` beyond the
    head never trains (a short run of a config made for many rounds); else None."""
    if trainable == "head" or head_warmup_rounds < rounds:
        return None
    return (f"federation.head_warmup_rounds is {head_warmup_rounds} and federation.rounds "
            f"{rounds}: every round trains the head only, and the rest of trainable "
            f"'{trainable}' goes back to the server as it was received")


def _optimizer(params: Mapping[str, nn.Parameter], cfg: OptimConfig) -> LocalOptimizer:
    """The configured optimiser; backbone tensors at ``lr * backbone_lr_scale``."""
    head = [p for n, p in params.items() if not n.startswith("backbone.")]
    backbone = [p for n, p in params.items() if n.startswith("backbone.")]
    groups = [ParamGroup(group, lr) for group, lr in
              ((head, cfg.lr), (backbone, cfg.lr * cfg.backbone_lr_scale)) if group]
    try:
        return LocalOptimizer(cfg.optimizer, groups, cfg.weight_decay)
    except ValueError as err:
        raise TrainingError(str(err)) from None


def _num_steps(num_rows: int, cfg: OptimConfig) -> int:
    if cfg.batch_size < 1:
        raise TrainingError(f"batch_size must be at least 1, found {cfg.batch_size}")
    if cfg.epochs > 0:
        return cfg.epochs * math.ceil(num_rows / cfg.batch_size)
    if cfg.steps < 1:
        raise TrainingError("steps must be at least 1 when epochs is 0, found steps=0")
    return cfg.steps


def _augmentations(cfg: OptimConfig, inputs: Tensor, features_cached: bool) -> tuple[str, ...]:
    """The augmentation operations to apply to each batch (none on cached features)."""
    try:
        ops = parse_augment(cfg.augment)
    except ValueError as err:
        raise TrainingError(str(err)) from err
    if ops and features_cached:
        raise TrainingError("augmentation needs raw images, but the inputs are cached frozen "
                            "features; train on the images (no feature cache)")
    if ops and inputs.dim() != 4:
        raise TrainingError(f"augment '{cfg.augment}' needs image inputs (N, C, H, W), got "
                            f"shape {tuple(inputs.shape)}")
    return ops


def _log_prior(loss: str, labels: Tensor, num_classes: int) -> Tensor:
    """What the loss adds to the logits: 0, or log of the smoothed label prior of these rows
    (balanced softmax; prediction uses the plain logits)."""
    if loss == "cross_entropy":
        return torch.zeros(num_classes)
    if loss not in LOSSES:
        raise TrainingError(f"loss '{loss}' is unknown; expected {' or '.join(LOSSES)}")
    counts = torch.bincount(labels, minlength=num_classes).double()
    return torch.log((counts + 1.0) / (counts.sum() + num_classes)).float()


def _anchor(
    params: dict[str, nn.Parameter], global_state: Mapping[str, Tensor] | None
) -> dict[str, Tensor]:
    """FedProx anchor: the received weights, or the current ones when none are given."""
    if global_state is None:
        return {name: p.detach().clone() for name, p in params.items()}
    anchor = {}
    for name, param in params.items():
        if name not in global_state:
            raise TrainingError(f"global_state lacks trainable tensor '{name}' for FedProx")
        if tuple(global_state[name].shape) != tuple(param.shape):
            raise TrainingError(
                f"global_state tensor '{name}' has shape {tuple(global_state[name].shape)}, "
                f"expected {tuple(param.shape)}"
            )
        anchor[name] = global_state[name].detach().to(param.device, param.dtype)
    return anchor


def train_local(
    model: SplitModel,
    x: ArrayLike,
    y: ArrayLike,
    cfg: OptimConfig,
    trainable: str,
    device: torch.device,
    seed: int,
    *,
    global_state: Mapping[str, Tensor] | None = None,
    features_cached: bool = False,
    check_every: int = 0,
    check: Callable[[int], bool] | None = None,
) -> TrainResult:
    """Train the trainable tensors of ``model`` in place on one site's data.

    Parameters
    ----------
    model : SplitModel
        Moved to ``device`` and left there; its ``requires_grad`` flags are set from
        ``trainable``; its train/eval flags are restored afterwards.
    x, y : array or tensor
        Inputs (or cached frozen features when ``features_cached``) and class indices.
        A site with a single class is fine.
    cfg : OptimConfig
        Optimiser, steps or epochs, batch size and FedProx ``proximal_mu``.
    trainable : str
        ``head``, ``head+last-N`` or ``all``.
    device : torch.device
        Where to train.
    seed : int
        Seeds batch order and dropout; the global RNG state is left untouched.
    global_state : Mapping[str, Tensor], optional
        Received weights, the FedProx anchor when ``cfg.proximal_mu > 0``; defaults to the
        model's trainable weights at entry.
    features_cached : bool
        ``x`` holds :func:`~common.models.frozen_features` output.
    check_every, check : int, callable
        Early stopping: after every ``check_every`` steps (and before the first),
        ``check(steps_done)`` runs with the model in eval mode; returning True stops.

    Returns
    -------
    TrainResult
        Mean cross-entropy over the steps taken (without the proximal term), steps taken,
        examples.
    """
    inputs = _inputs(x)
    labels = _labels(y, len(inputs), model.head.out_features)
    steps = _num_steps(len(inputs), cfg)
    names = set(set_trainable(model, trainable))
    model.to(device)
    params = {n: p for n, p in model.named_parameters() if n in names}
    optimizer = _optimizer(params, cfg)
    ops = _augmentations(cfg, inputs, features_cached)
    log_prior = _log_prior(cfg.loss, labels, model.head.out_features).to(device)
    draws = torch.Generator().manual_seed(seed)
    anchor = _anchor(params, global_state) if cfg.proximal_mu > 0 else {}
    frozen = model.backbone[: frozen_prefix_blocks(model, trainable)]
    total = 0.0
    done = 0
    cuda = [device.index or 0] if device.type == "cuda" else []

    def stop_here(last: bool = False) -> bool:
        if check is None or check_every < 1 or (done % check_every and not last):
            return False
        with _kept_modes(model):
            model.eval()
            return check(done)

    with _kept_modes(model), torch.random.fork_rng(devices=cuda):
        seed_torch(seed)  # dropout masks depend on the seed only
        model.train()
        frozen.eval()  # frozen blocks are feature extractors: no dropout
        for idx in _batches(len(inputs), cfg.batch_size, steps, seed):
            if stop_here():
                break
            xb = augment_batch(inputs[idx], ops, draws).to(device)
            yb = labels[idx].to(device)
            logits = forward_from(model, xb, trainable) if features_cached else model(xb)
            loss = F.cross_entropy(logits + log_prior, yb)
            objective = loss
            if anchor:
                # FedProx: stay near the received weights so skewed sites drift less
                drift = sum(((params[n] - anchor[n]) ** 2).sum() for n in anchor)
                objective = loss + 0.5 * cfg.proximal_mu * drift
            optimizer.zero_grad()
            torch.autograd.backward(objective)
            optimizer.step()
            total += float(loss.detach())
            done += 1
        else:
            stop_here(last=True)  # the state after the last step is a candidate too
    on = str(next(iter(params.values())).device) if params else str(device)
    return TrainResult(loss=total / max(done, 1), steps=done, num_examples=len(inputs),
                       device=on, threads=torch.get_num_threads())


def _logits(
    model: SplitModel,
    x: ArrayLike,
    device: torch.device,
    trainable: str,
    features_cached: bool,
    batch_size: int,
) -> Tensor:
    inputs = _inputs(x)
    model.to(device)
    parts = []
    with _kept_modes(model), torch.no_grad():
        model.eval()
        # max(..., 1): an empty input still yields a (0, C) result
        for start in range(0, max(len(inputs), 1), batch_size):
            xb = inputs[start : start + batch_size].to(device)
            out = forward_from(model, xb, trainable) if features_cached else model(xb)
            parts.append(out.float().cpu())
    return torch.cat(parts)


def predict_proba(
    model: SplitModel,
    x: ArrayLike,
    device: torch.device,
    trainable: str = "all",
    features_cached: bool = False,
    batch_size: int = 512,
) -> np.ndarray:
    """Softmax probabilities, shape (N, C), float64; ``trainable`` matters only for caches."""
    logits = _logits(model, x, device, trainable, features_cached, batch_size)
    return torch.softmax(logits.double(), dim=1).numpy()


def evaluate(
    model: SplitModel,
    x: ArrayLike,
    y: ArrayLike,
    device: torch.device,
    trainable: str = "all",
    features_cached: bool = False,
    batch_size: int = 512,
) -> dict[str, float | None]:
    """Mean cross-entropy ``loss`` plus :func:`common.metrics.compute_metrics` on (x, y)."""
    logits = _logits(model, x, device, trainable, features_cached, batch_size).double()
    labels = _labels(y, len(logits), model.head.out_features)
    metrics: dict[str, float | None] = {"loss": float(F.cross_entropy(logits, labels))}
    metrics.update(compute_metrics(labels.numpy(), torch.softmax(logits, dim=1).numpy()))
    return metrics
