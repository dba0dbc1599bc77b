"""Model contract: shapes, which tensors train, state split/load, cached features."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch

from common.config import ModelConfig
from common.models import (
    FAMILIES,
    ModelError,
    SplitModel,
    build_model,
    build_model_from_args,
    forward_from,
    frozen_features,
    frozen_prefix_blocks,
    load_state,
    model_args,
    parse_trainable,
    set_trainable,
    split_state,
    trainable_names,
)

MLP_SHAPE = (13,)
GREY = (1, 28, 28)
RGB = (3, 28, 28)


def _mlp(num_classes: int = 3, dropout: float = 0.0) -> SplitModel:
    torch.manual_seed(0)
    return build_model("mlp", MLP_SHAPE, num_classes, ModelConfig(hidden=(8, 6), dropout=dropout))


def _cnn(shape: tuple[int, ...] = GREY, num_classes: int = 3) -> SplitModel:
    torch.manual_seed(0)
    return build_model("cnn", shape, num_classes, ModelConfig(family="cnn", channels=(4, 8)))


def _resnet(shape: tuple[int, ...] = GREY, num_classes: int = 3) -> SplitModel:
    torch.manual_seed(0)
    return build_model("resnet", shape, num_classes,
                       ModelConfig(family="resnet", channels=(4, 8, 8)))


def _grads(model: SplitModel, x: torch.Tensor, trainable: str) -> set[str]:
    """Names of parameters that receive a gradient after one backward pass."""
    set_trainable(model, trainable)
    model(x).sum().backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


def test_registry_lists_the_families() -> None:
    assert set(FAMILIES) == {"mlp", "cnn", "resnet"}


@pytest.mark.parametrize(
    ("family", "shape", "x_shape"),
    [("mlp", MLP_SHAPE, (5, 13)), ("cnn", GREY, (5, 1, 28, 28)), ("cnn", RGB, (5, 3, 28, 28)),
     ("resnet", GREY, (5, 1, 28, 28)), ("resnet", (3, 64, 64), (5, 3, 64, 64))],
)
def test_forward_has_odd_head_width(family: str, shape: tuple[int, ...], x_shape: tuple) -> None:
    model = build_model(family, shape, 3, ModelConfig(family=family))
    logits = model(torch.randn(x_shape))
    assert logits.shape == (5, 3)
    assert model.features(torch.randn(x_shape)).shape == (5, model.feature_dim)


def test_mlp_without_hidden_is_logistic_regression() -> None:
    model = build_model("mlp", MLP_SHAPE, 2, ModelConfig(hidden=()))
    assert len(model.backbone) == 0
    assert model(torch.randn(4, 13)).shape == (4, 2)


def test_unknown_family_lists_known_ones() -> None:
    with pytest.raises(ModelError, match="known families: cnn, mlp, resnet"):
        build_model("vit", GREY, 2, ModelConfig())


def test_cnn_with_too_many_poolings_is_refused() -> None:
    with pytest.raises(ModelError, match="5 blocks"):
        build_model("cnn", GREY, 2, ModelConfig(channels=(4, 4, 4, 4, 4)))


def test_models_hold_no_buffers() -> None:
    for model in (_mlp(dropout=0.2), _cnn()):
        assert list(model.buffers()) == []


def test_head_mode_gives_gradients_to_head_only() -> None:
    assert _grads(_cnn(), torch.randn(2, *GREY), "head") == {"head.weight", "head.bias"}


def test_head_plus_last_one_adds_the_last_block() -> None:
    got = _grads(_cnn(), torch.randn(2, *GREY), "head+last-1")
    assert got == {
        "head.weight",
        "head.bias",
        "backbone.1.0.weight",
        "backbone.1.0.bias",
        "backbone.1.1.weight",
        "backbone.1.1.bias",
    }


def test_all_mode_gives_gradients_everywhere() -> None:
    model = _mlp()
    assert _grads(model, torch.randn(2, 13), "all") == {n for n, _ in model.named_parameters()}


def test_trainable_names_mlp() -> None:
    model = _mlp()
    assert trainable_names(model, "head") == ["head.weight", "head.bias"]
    assert trainable_names(model, "head+last-1") == [
        "backbone.1.0.weight",
        "backbone.1.0.bias",
        "head.weight",
        "head.bias",
    ]
    assert trainable_names(model, "all") == list(model.state_dict())


@pytest.mark.parametrize("shape", [GREY, RGB])
def test_trainable_names_cnn(shape: tuple[int, ...]) -> None:
    model = _cnn(shape)
    block1 = [f"backbone.1.{i}.{k}" for i in (0, 1) for k in ("weight", "bias")]
    assert trainable_names(model, "head") == ["head.weight", "head.bias"]
    assert trainable_names(model, "head+last-1") == [*block1, "head.weight", "head.bias"]
    assert trainable_names(model, "all") == list(model.state_dict())
    assert model.state_dict()["backbone.0.0.weight"].shape == (4, shape[0], 3, 3)


def test_set_trainable_flags_match_names() -> None:
    model = _mlp()
    names = set_trainable(model, "head+last-1")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == names


@pytest.mark.parametrize(
    ("text", "n"), [("head", 0), ("head+last-1", 1), ("head+last-3", 3), ("all", 3)]
)
def test_parse_trainable(text: str, n: int) -> None:
    assert parse_trainable(text, 3) == n


@pytest.mark.parametrize("text", ["head+last-0", "head+last-4", "backbone", "Head", "head+last-"])
def test_parse_trainable_rejects(text: str) -> None:
    with pytest.raises(ModelError, match=re.escape(f"'{text}'")):
        parse_trainable(text, 3)


def test_frozen_prefix_blocks() -> None:
    model = _cnn()
    assert [frozen_prefix_blocks(model, t) for t in ("head", "head+last-1", "all")] == [2, 1, 0]


def test_split_state_partitions_keys_and_copies() -> None:
    model = _mlp()
    backbone, head = split_state(model)
    assert set(head) == {"head.weight", "head.bias"}
    assert list(backbone) + list(head) == list(model.state_dict())
    head["head.bias"].add_(1.0)
    assert not torch.equal(head["head.bias"], model.head.bias)


def test_load_state_loads_a_subset() -> None:
    model, other = _mlp(), _mlp()
    with torch.no_grad():
        other.head.bias.fill_(0.5)
    _, head = split_state(other)
    before = model.state_dict()["backbone.0.1.weight"].clone()
    load_state(model, head, "test")
    assert torch.equal(model.head.bias, torch.full((3,), 0.5))
    assert torch.equal(model.state_dict()["backbone.0.1.weight"], before)


def test_load_state_names_key_and_shapes_on_mismatch() -> None:
    with pytest.raises(
        ModelError,
        match=r"reply: tensor 'head.bias' has shape \(4,\), "
        r"expected \(3,\)",
    ):
        load_state(_mlp(), {"head.bias": torch.zeros(4)}, "reply")


def test_load_state_rejects_unknown_key() -> None:
    with pytest.raises(ModelError, match="'head.extra'"):
        load_state(_mlp(), {"head.extra": torch.zeros(3)}, "reply")


def test_load_state_rejects_integer_tensor() -> None:
    with pytest.raises(ModelError, match="floating point"):
        load_state(_mlp(), {"head.bias": torch.zeros(3, dtype=torch.int64)}, "reply")


@pytest.mark.parametrize(("family", "shape"),
                         [("mlp", MLP_SHAPE), ("cnn", RGB), ("resnet", RGB)])
def test_model_args_round_trip(family: str, shape: tuple[int, ...]) -> None:
    cfg = ModelConfig(family=family, hidden=(5,), channels=(4, 4), dropout=0.1)
    args = model_args(family, shape, 3, cfg)
    rebuilt = build_model_from_args(args)
    original = build_model(family, shape, 3, cfg)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in original.state_dict().items()
    }
    assert model_args(family, shape, 3, cfg) == args  # JSON-able: lists, not tuples
    assert all(not isinstance(v, tuple) for v in args.values())


def test_build_model_from_args_rejects_extra_key() -> None:
    args = {**model_args("mlp", MLP_SHAPE, 2, ModelConfig()), "channels": [4]}
    with pytest.raises(ModelError, match="must have keys"):
        build_model_from_args(args)


@pytest.mark.parametrize("trainable", ["head", "head+last-1", "all"])
@pytest.mark.parametrize("make", [_mlp, _cnn, _resnet])
def test_cached_features_reproduce_forward(make: Callable[[], SplitModel], trainable: str) -> None:
    model = make()
    x = torch.randn(7, *MLP_SHAPE) if make is _mlp else torch.randn(7, *GREY)
    feats = frozen_features(model, x, trainable, batch_size=3)
    with torch.no_grad():
        torch.testing.assert_close(forward_from(model, feats, trainable), model.eval()(x))


def test_frozen_features_ignore_dropout_in_train_mode() -> None:
    model = _mlp(dropout=0.5).train()
    x = torch.randn(6, 13)
    first = frozen_features(model, x, "head")
    torch.testing.assert_close(first, frozen_features(model, x, "head"))
    assert model.training and model.backbone[0].training  # mode restored


def test_resnet_stages_halve_the_resolution_and_skip_connections_carry_the_input() -> None:
    model = _resnet()
    x = torch.randn(2, *GREY)
    sizes = []
    out = x
    for block in model.backbone[:-1]:
        out = block(out)
        sizes.append(tuple(out.shape[1:]))
    assert sizes == [(4, 28, 28), (8, 14, 14)]
    assert model.features(x).shape == (2, 8)
    # a residual unit whose convolutions are zero passes relu(skip(x)) through
    unit, stage_in = model.backbone[1][0], model.backbone[0](x)
    with torch.no_grad():
        unit.conv2.weight.zero_()
        torch.testing.assert_close(unit(stage_in), torch.relu(unit.skip(stage_in)))


def test_resnet_trainable_last_stage_is_one_block() -> None:
    model = _resnet()
    names = trainable_names(model, "head+last-1")
    assert names[-2:] == ["head.weight", "head.bias"]
    assert {n.split(".")[1] for n in names if n.startswith("backbone.")} == {"2"}
    assert _grads(model, torch.randn(2, *GREY), "head+last-1") == set(names)


def test_resnet_with_too_many_stages_is_refused() -> None:
    with pytest.raises(ModelError, match="allows at most"):
        build_model("resnet", (1, 4, 4), 2, ModelConfig(family="resnet", channels=(4,) * 5))
