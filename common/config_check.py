"""Value checks on a loaded :class:`~common.config.Config`, run before anything is written.

:mod:`common.config` checks keys and types; this module checks the texts that name something
(strategy, model family, trainable part, partition, device), so that a typo stops
`medfed pretrain`, `simulate` or `server` at once instead of after the first output (or the
first federated round). Each check reuses the parser the consumer uses.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterable
from pathlib import Path

from common.augment import parse_augment
from common.config import Config, ConfigError, read_config
from common.data.federated import check_data_config, data_key_prefix
from common.data.partition import parse_partition
from common.data.schema import DataError
from common.device import DEVICE_NAMES
from common.models import FAMILIES, ModelError, parse_trainable
from common.training import LOSSES

# server/strategies.py builds these (it imports Flower, which common/ must not)
STRATEGY_NAMES = (
    "fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum",
)
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
HELDOUT_MODES = ("validation", "source-validation", "file:PATH")
# metrics a validation check reports that can pick `best` (higher is better; loss/brier/ece:
# lower is better)
SELECTION_METRICS = ("auc", "balanced_accuracy", "accuracy", "f1", "loss", "brier", "ece")
LOWER_IS_BETTER = ("loss", "brier", "ece")
ADAPTATION_METRICS = ("loss", "auc", "balanced_accuracy")
CALIBRATIONS = ("temperature", "none")
ATTACKS = ("inflate-count", "omit-count", "huge-update", "nan-update", "spoof-name",
           "malformed")  # client/faults.py carries them out
_UNIT = r"(0(\.\d+)?|1(\.0+)?)"  # a number in [0, 1]
_THRESHOLD = re.compile(rf"youden|fixed(:{_UNIT})?|(sensitivity|specificity)>={_UNIT}")



def _one_of(key: str, value: object, allowed: Iterable[str]) -> None:
    """One sentence naming the key, the allowed values and what was given."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"config key {key!r} must be one of {', '.join(allowed)}, "
                          f"got {value!r}")

def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read an experiment YAML with overrides and check every value (one sentence if bad)."""
    cfg = read_config(path, overrides)
    try:
        check_config(cfg)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    return cfg
# one backbone block per listed width
_BLOCK_WIDTHS = {"mlp": "hidden", "cnn": "channels", "resnet": "channels"}


def check_config(cfg: Config) -> None:
    """Raise :class:`ConfigError` naming the first key whose value names nothing known."""
    if not _DEVICE.fullmatch(cfg.device):
        raise ConfigError(
            f"config key 'device' must be one of {', '.join(DEVICE_NAMES)} or cuda:N, "
            f"got {cfg.device!r}"
        )
    if cfg.model.family not in FAMILIES:
        raise ConfigError(
            f"config key 'model.family' must be one of {', '.join(sorted(FAMILIES))}, "
            f"got {cfg.model.family!r}"
        )
    width_key = _BLOCK_WIDTHS.get(cfg.model.family)
    if width_key is not None:  # a family registered later is checked when it is built
        blocks = len(getattr(cfg.model, width_key))
        try:
            parse_trainable(cfg.model.trainable, blocks)
        except ModelError as err:
            raise ConfigError(
                f"config key 'model.trainable' must be head, all or head+last-N with "
                f"1 <= N <= {blocks} (model.{width_key} gives {blocks} backbone blocks), "
                f"got {cfg.model.trainable!r}"
            ) from err
    data_configs = (("pretrain.data", cfg.pretrain.data), ("federation.data", cfg.federation.data))
    for key, data in data_configs:
        try:
            with data_key_prefix(key):
                parse_partition(data.partition)
                check_data_config(data)
        except DataError as err:
            raise ConfigError(str(err)) from err
    for key, optim in (("pretrain.optim", cfg.pretrain.optim),
                       ("federation.local", cfg.federation.local)):
        try:
            parse_augment(optim.augment)
        except ValueError as err:
            raise ConfigError(f"config key '{key}.augment': {err}") from err
        _one_of(f"{key}.loss", optim.loss, LOSSES)
        if not optim.backbone_lr_scale > 0:
            raise ConfigError(f"config key '{key}.backbone_lr_scale' must be more than 0 "
                              f"(1: the backbone trains at lr), got {optim.backbone_lr_scale}")
    _check_federation(cfg)
    if cfg.federation.strategy.name.lower() not in STRATEGY_NAMES:
        raise ConfigError(
            f"config key 'federation.strategy.name' must be one of {', '.join(STRATEGY_NAMES)}, "
            f"got {cfg.federation.strategy.name!r}"
        )


def _check_federation(cfg: Config) -> None:
    fed = cfg.federation
    if not (fed.heldout in ("validation", "source-validation")
            or (fed.heldout.startswith("file:") and len(fed.heldout) > 5)):
        raise ConfigError(f"config key 'federation.heldout' must be one of "
                          f"{', '.join(HELDOUT_MODES)}, got {fed.heldout!r}")
    if fed.heldout == "validation" and fed.strategy.fraction_evaluate <= 0:
        raise ConfigError(
            "config key 'federation.strategy.fraction_evaluate' is 0 but 'federation.heldout' "
            "is 'validation', which evaluates every global model at the sites; raise it or use "
            "heldout source-validation or file:PATH"
        )
    if fed.evaluate_with_train and fed.privacy.secure_aggregation:
        raise ConfigError(
            "config key 'federation.evaluate_with_train' is true but "
            "'federation.privacy.secure_aggregation' runs Flower's legacy workflow, whose train "
            "replies carry only the masked update; set one of them to false")
    if fed.head_warmup_rounds < 0:
        raise ConfigError("config key 'federation.head_warmup_rounds' must be 0 or more, "
                          f"got {fed.head_warmup_rounds}")
    if fed.final_model not in ("best", "latest"):
        raise ConfigError(f"config key 'federation.final_model' must be best or latest, "
                          f"got {fed.final_model!r}")
    _one_of("federation.best_metric", fed.best_metric, SELECTION_METRICS)
    ad = fed.adaptation
    _one_of("federation.adaptation.selection_metric", ad.selection_metric, ADAPTATION_METRICS)
    for key, value, low in (("steps", ad.steps, 1), ("eval_every", ad.eval_every, 1),
                            ("patience", ad.patience, 1)):
        if value < low:
            raise ConfigError(f"config key 'federation.adaptation.{key}' must be at least {low}, "
                              f"got {value}")
    for key, fvalue in (("proximal_mu", ad.proximal_mu), ("prior_shift_max", ad.prior_shift_max),
                        ("min_improvement", ad.min_improvement)):
        if not fvalue >= 0:
            raise ConfigError(f"config key 'federation.adaptation.{key}' must be 0 or more, "
                              f"got {fvalue}")
    _one_of("federation.faults.attack", fed.faults.attack, ("none", *ATTACKS, "mixed"))
    op = fed.operating_point
    _one_of("federation.operating_point.calibration", op.calibration, CALIBRATIONS)
    if op.min_class_rows < 1:
        raise ConfigError("config key 'federation.operating_point.min_class_rows' must be at "
                          f"least 1, got {op.min_class_rows}")
    if not _THRESHOLD.fullmatch(op.threshold):
        raise ConfigError(
            "config key 'federation.operating_point.threshold' must be youden, "
            "sensitivity>=X, specificity>=X or fixed:T with X, T in [0, 1], "
            f"got {op.threshold!r}")
