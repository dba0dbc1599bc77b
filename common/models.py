"""Backbone registry, the backbone/head split, and which tensors train and travel.

Every model is a :class:`SplitModel`: a backbone made of numbered *blocks* followed by one
linear head. ``trainable`` (``head``, ``head+last-N`` or ``all``) picks the head plus the last
N blocks; those tensors are what a hospital trains and sends back. Models hold parameters
only (GroupNorm, never BatchNorm), so "the state" and "the parameters" are the same keys and
no running statistics have to travel or be averaged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from common.config import ModelConfig


class ModelError(ValueError):
    """A model family, its arguments, a trainable spec or a set of tensors is invalid."""


class SplitModel(nn.Module):
    """A backbone of blocks (``backbone.0``, ``backbone.1``, ...) and a linear ``head``.

    Parameters
    ----------
    backbone : nn.Sequential
        Blocks, each an ``nn.Sequential``; the last one must output (N, feature_dim) or a
        tensor that flattens to it.
    feature_dim : int
        Width of the features the head reads.
    num_classes : int
        Width of the head (logits).
    """

    def __init__(self, backbone: nn.Sequential, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def features(self, x: Tensor) -> Tensor:
        """Backbone output, flattened to (N, feature_dim)."""
        return torch.flatten(self.backbone(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        """Logits, shape (N, num_classes)."""
        logits: Tensor = self.head(self.features(x))
        return logits


Factory = Callable[..., SplitModel]
FAMILIES: dict[str, Factory] = {}
# ModelConfig fields each family's factory takes as keyword arguments (its manifest args)
_FAMILY_FIELDS: dict[str, tuple[str, ...]] = {}


def register_family(name: str, *config_fields: str) -> Callable[[Factory], Factory]:
    """Register a factory ``f(input_shape, num_classes, **fields)`` under ``name``.

    ``config_fields`` name the :class:`ModelConfig` fields passed as keyword arguments; they
    are also what :func:`model_args` stores in the manifest.
    """

    def decorator(factory: Factory) -> Factory:
        FAMILIES[name] = factory
        _FAMILY_FIELDS[name] = config_fields
        return factory

    return decorator


@register_family("mlp", "hidden", "dropout")
def mlp(
    input_shape: tuple[int, ...], num_classes: int, *, hidden: tuple[int, ...], dropout: float
) -> SplitModel:
    """Tabular MLP: one block (Linear + ReLU [+ Dropout]) per hidden width.

    With ``hidden=()`` the backbone is empty and the model is logistic regression (the
    FLamby Fed-Heart-Disease baseline).
    """
    width = 1
    for size in input_shape:
        width *= size
    blocks: list[nn.Module] = []
    for i, out in enumerate(hidden):
        # flatten in the first block so image-shaped inputs also work; no-op on (N, F)
        layers: list[nn.Module] = [nn.Flatten()] if i == 0 else []
        layers += [nn.Linear(width, out), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        blocks.append(nn.Sequential(*layers))
        width = out
    return SplitModel(nn.Sequential(*blocks), width, num_classes)


def _groups(channels: int) -> int:
    """Largest group count in (8, 4, 2, 1) that divides ``channels``."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


@register_family("cnn", "channels", "dropout")
def cnn(
    input_shape: tuple[int, ...], num_classes: int, *, channels: tuple[int, ...], dropout: float
) -> SplitModel:
    """Small CNN for (C, H, W) images: Conv3x3 + GroupNorm + ReLU + MaxPool per block.

    The last block ends with global average pooling and flatten, so features are
    (N, channels[-1]) for any image size that survives the poolings.
    """
    if len(input_shape) != 3:
        raise ModelError(f"model family 'cnn' expects input_shape (C, H, W), got {input_shape}")
    if not channels:
        raise ModelError("model.channels must list at least one width for family 'cnn'")
    in_ch, height, width = input_shape
    if min(height, width) < 2 ** len(channels):
        raise ModelError(
            f"model.channels has {len(channels)} blocks but a {height}x{width} image allows "
            f"at most {min(height, width).bit_length() - 1} 2x2 poolings"
        )
    stages: list[list[nn.Module]] = []
    for out in channels:
        stages.append([
            nn.Conv2d(in_ch, out, kernel_size=3, padding=1),
            nn.GroupNorm(_groups(out), out),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ])
        in_ch = out
    return _pooled_model(stages, in_ch, num_classes, dropout)


def _pooled_model(stages: list[list[nn.Module]], width: int, num_classes: int,
                  dropout: float) -> SplitModel:
    """One backbone block per stage; the last ends with global average pooling, flatten and
    (when asked) dropout, so features are (N, width) for any image size."""
    stages[-1] += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout > 0:
        stages[-1].append(nn.Dropout(dropout))
    return SplitModel(nn.Sequential(*(nn.Sequential(*layers) for layers in stages)), width,
                      num_classes)


class ResidualUnit(nn.Module):
    """Two Conv3x3 + GroupNorm layers with a skip connection (1x1 conv when shapes change)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.skip = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                      nn.GroupNorm(_groups(out_ch), out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.skip(x))


@register_family("resnet", "channels", "dropout")
def resnet(
    input_shape: tuple[int, ...], num_classes: int, *, channels: tuple[int, ...], dropout: float
) -> SplitModel:
    """Residual CNN for (C, H, W) images (28x28 or 64x64 MedMNIST): one stage per width.

    Stage 0 is a Conv3x3 stem and a residual unit at full resolution; each later stage is a
    residual unit that halves the resolution. GroupNorm, not BatchNorm: no running statistics
    to average across hospitals whose images differ (the FedBN problem does not arise), and
    training on batches of a few images stays stable. The last stage ends with global average
    pooling, so features are (N, channels[-1]).
    """
    if len(input_shape) != 3:
        raise ModelError(f"model family 'resnet' expects input_shape (C, H, W), got {input_shape}")
    if not channels:
        raise ModelError("model.channels must list at least one width for family 'resnet'")
    in_ch, height, width = input_shape
    if min(height, width) < 2 ** (len(channels) - 1):
        raise ModelError(
            f"model.channels has {len(channels)} stages but a {height}x{width} image allows at "
            f"most {min(height, width).bit_length()} (each stage after the first halves it)"
        )
    stages: list[list[nn.Module]] = []
    for i, out in enumerate(channels):
        if i == 0:
            stages.append([nn.Conv2d(in_ch, out, 3, padding=1, bias=False),
                           nn.GroupNorm(_groups(out), out), nn.ReLU(),
                           ResidualUnit(out, out, stride=1)])
        else:
            stages.append([ResidualUnit(in_ch, out, stride=2)])
        in_ch = out
    return _pooled_model(stages, in_ch, num_classes, dropout)


def _check_common(family: str, input_shape: tuple[int, ...], num_classes: int) -> None:
    if family not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise ModelError(f"model family '{family}' is unknown; known families: {known}")
    if not input_shape or any(not isinstance(s, int) or s < 1 for s in input_shape):
        raise ModelError(f"input_shape must be positive integers, got {input_shape}")
    if num_classes < 2:
        raise ModelError(f"num_classes must be at least 2 (softmax head), got {num_classes}")


def build_model(
    family: str, input_shape: tuple[int, ...], num_classes: int, cfg: ModelConfig
) -> SplitModel:
    """Build a registered model family; weights come from the current torch seed."""
    _check_common(family, tuple(input_shape), num_classes)
    kwargs = {name: getattr(cfg, name) for name in _FAMILY_FIELDS[family]}
    return FAMILIES[family](tuple(input_shape), num_classes, **kwargs)


def model_args(
    family: str, input_shape: tuple[int, ...], num_classes: int, cfg: ModelConfig
) -> dict[str, Any]:
    """JSON-able constructor arguments for the manifest (rebuilt by build_model_from_args)."""
    _check_common(family, tuple(input_shape), num_classes)
    args: dict[str, Any] = {
        "family": family,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
    }
    for name in _FAMILY_FIELDS[family]:
        value = getattr(cfg, name)
        args[name] = list(value) if isinstance(value, tuple) else value
    return args


# Bounds on what a manifest may ask to build: a signed but hostile (or broken) manifest must
# not allocate gigabytes or overflow before anything is checked.
MAX_WIDTH = 8192  # units or channels per block
MAX_BLOCKS = 32
MAX_INPUT = 10_000_000  # input elements per example
MAX_CLASSES = 1000


def _check_args(family: str, args: Mapping[str, Any]) -> None:
    shape = args.get("input_shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 4 or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_INPUT for s in shape):
        raise ModelError(f"model args 'input_shape' must be 1-4 positive integers, got "
                         f"{str(shape)[:80]}")
    total = 1
    for s in shape:
        total *= s
    if total > MAX_INPUT:
        raise ModelError(f"model args 'input_shape' {shape} has {total} elements; at most "
                         f"{MAX_INPUT}")
    classes = args.get("num_classes")
    if not isinstance(classes, int) or isinstance(classes, bool) or not 2 <= classes <= MAX_CLASSES:
        raise ModelError(f"model args 'num_classes' must be an integer in 2..{MAX_CLASSES}, "
                         f"got {str(classes)[:40]}")
    for name in _FAMILY_FIELDS[family]:
        value = args.get(name)
        if isinstance(value, list):
            if len(value) > MAX_BLOCKS or not all(
                    isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_WIDTH
                    for v in value):
                raise ModelError(f"model args '{name}' must list at most {MAX_BLOCKS} widths "
                                 f"in 1..{MAX_WIDTH}, got {str(value)[:80]}")
        elif name == "dropout" and not (isinstance(value, int | float)
                                        and not isinstance(value, bool) and 0 <= value < 1):
            raise ModelError(f"model args 'dropout' must be in [0, 1), got {str(value)[:40]}")


def build_model_from_args(args: Mapping[str, Any]) -> SplitModel:
    """Rebuild a model from :func:`model_args` output (e.g. read from a manifest).

    Every argument is bounded first (:data:`MAX_WIDTH` ...): a manifest is untrusted input.
    """
    family = args.get("family")
    if not isinstance(family, str) or family not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise ModelError(f"model args 'family' must be one of {known}, got {family!r}")
    expected = {"family", "input_shape", "num_classes", *_FAMILY_FIELDS[family]}
    if set(args) != expected:
        raise ModelError(
            f"model args for '{family}' must have keys {sorted(expected)}, got "
            f"{sorted(args)[:20]}"
        )
    _check_args(family, args)
    fields: dict[str, Any] = {
        name: tuple(v) if isinstance(v, list) else v
        for name, v in args.items()
        if name in _FAMILY_FIELDS[family]
    }
    try:
        cfg = ModelConfig(family=family, **fields)
        shape = tuple(int(s) for s in args["input_shape"])
        return build_model(family, shape, int(args["num_classes"]), cfg)
    except (TypeError, ValueError) as err:
        if isinstance(err, ModelError):
            raise
        raise ModelError(f"model args for '{family}' are invalid: {err}") from err


_HEAD_PLUS = re.compile(r"head\+last-(\d+)")


def parse_trainable(text: str, num_blocks: int) -> int:
    """Number of trailing backbone blocks that train: ``head`` 0, ``head+last-N`` N, ``all``."""
    if text == "head":
        return 0
    if text == "all":
        return num_blocks
    match = _HEAD_PLUS.fullmatch(text)
    if match is not None and 1 <= int(match.group(1)) <= num_blocks:
        return int(match.group(1))
    raise ModelError(
        f"model.trainable '{text}' is invalid; expected head, all or head+last-N with "
        f"1 <= N <= {num_blocks} (the backbone has {num_blocks} blocks)"
    )


def frozen_prefix_blocks(model: SplitModel, trainable: str) -> int:
    """How many leading backbone blocks are frozen."""
    num_blocks = len(model.backbone)
    return num_blocks - parse_trainable(trainable, num_blocks)


def trainable_names(model: SplitModel, trainable: str) -> list[str]:
    """State keys of the head and the last N blocks, in ``state_dict`` order."""
    first = frozen_prefix_blocks(model, trainable)
    prefixes = ("head.", *(f"backbone.{i}." for i in range(first, len(model.backbone))))
    return [name for name in model.state_dict() if name.startswith(prefixes)]


def set_trainable(model: SplitModel, trainable: str) -> list[str]:
    """Set ``requires_grad`` on exactly the trainable tensors; return their names."""
    names = trainable_names(model, trainable)
    chosen = set(names)
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return names


def split_state(model: SplitModel) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(backbone tensors, head tensors) keyed by full state keys; contiguous CPU copies."""
    backbone: dict[str, Tensor] = {}
    head: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        target = head if name.startswith("head.") else backbone
        # copies, so later training cannot change tensors already handed out
        target[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return backbone, head


def load_state(
    model: SplitModel, tensors: Mapping[str, Tensor], where: str, *, complete: bool = False
) -> None:
    """Load a subset of state keys, refusing unknown keys, wrong shapes and non-float dtypes.

    Parameters
    ----------
    model : SplitModel
        Model to update in place; keys not in ``tensors`` keep their values.
    tensors : Mapping[str, Tensor]
        Full state keys (``backbone.0.1.weight``, ``head.bias``) to tensors.
    where : str
        Where the tensors come from (a file name, "reply from node 7"); used in messages.
    complete : bool
        Require every key of the model (a whole bundle): a missing tensor would otherwise
        silently keep its random initial value.
    """
    own = model.state_dict()
    missing = [name for name in own if name not in tensors]
    if complete and missing:
        raise ModelError(
            f"{where}: tensor '{missing[0]}' is missing ({len(missing)} of the model's "
            f"{len(own)} tensors are absent)"
        )
    unknown = sorted(name for name in tensors if name not in own)
    if unknown:
        raise ModelError(f"{where}: tensor '{unknown[0]}' is not a key of this model")
    # the model's order, not the file's: safetensors does not keep one, and the first
    # mismatch reported should not change from run to run
    for name in (n for n in own if n in tensors):
        tensor = tensors[name]
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            found = tensor.dtype if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ModelError(f"{where}: tensor '{name}' must be floating point, found {found}")
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ModelError(
                f"{where}: tensor '{name}' has shape {tuple(tensor.shape)}, "
                f"expected {tuple(own[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor)  # state_dict tensors share storage with the parameters


def frozen_features(model: SplitModel, x: Tensor, trainable: str, batch_size: int = 512) -> Tensor:
    """Output of the frozen leading blocks (eval mode, no grad), on CPU: the feature cache.

    With ``trainable="all"`` nothing is frozen and ``x`` comes back as float32.
    """
    first = frozen_prefix_blocks(model, trainable)
    x = torch.as_tensor(x, dtype=torch.float32)
    if first == 0:
        return x.cpu()
    frozen = model.backbone[:first]
    device = next(model.parameters()).device
    was_training = [m.training for m in frozen.modules()]
    frozen.eval()  # frozen blocks never use dropout, so their output is cacheable
    try:
        with torch.no_grad():
            # max(..., 1): an empty input still runs once and keeps the feature shape
            parts = [
                frozen(x[i : i + batch_size].to(device)).cpu()
                for i in range(0, max(len(x), 1), batch_size)
            ]
    finally:
        for module, flag in zip(frozen.modules(), was_training, strict=True):
            module.training = flag
    return torch.cat(parts)


def forward_from(model: SplitModel, feats: Tensor, trainable: str) -> Tensor:
    """Logits from cached :func:`frozen_features`: the remaining blocks, then the head."""
    first = frozen_prefix_blocks(model, trainable)
    out = model.backbone[first:](feats) if first < len(model.backbone) else feats
    logits: Tensor = model.head(torch.flatten(out, 1))
    return logits
