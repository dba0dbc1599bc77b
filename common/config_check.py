"""Value checks on a loaded :class:`~common.config.Config`, run before anything is written.

:mod:`common.config` checks keys and types; this module checks the texts that name something
(strategy, model family, trainable part, partition, device) and the range of every number
(:data:`RANGES`), so that a typo stops
`medfed pretrain`, `simulate` or `server` at once instead of after the first output (or the
first federated round). Each check reuses the parser the consumer uses.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.augment import parse_augment
from common.config import Config, ConfigError, PrivacyConfig, StrategyConfig, read_config
from common.data.federated import check_data_config, data_key_prefix
from common.data.medmnist import DATASETS as MEDMNIST_SETS
from common.data.partition import parse_partition
from common.data.schema import DataError
from common.device import DEVICE_NAMES
from common.models import FAMILIES, MAX_BLOCKS, MAX_WIDTH, ModelError, parse_trainable
from common.training import LOSSES

# server/strategies.py builds these (it imports Flower, which common/ must not)
STRATEGY_NAMES = (
    "fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum",
)
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
MEDIAN_MODE = "validation-median"
AT_SITES = ("validation", MEDIAN_MODE)  # heldout modes the sites evaluate
HELDOUT_MODES = (*AT_SITES, "source-validation", "file:PATH")
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


# Numeric ranges: (lowest, lowest allowed, highest, highest allowed); None: no bound. A value
# outside its range would otherwise surface late: a batch size of 0 failed every hospital in
# round 1, a negative round count published the starting model as if trained.
Range = tuple[float | None, bool, float | None, bool]
POSITIVE: Range = (0, False, None, False)
NON_NEGATIVE: Range = (0, True, None, False)
COUNT: Range = (1, True, None, False)
SHARE: Range = (0, True, 1, True)  # [0, 1]
SAMPLED: Range = (0, False, 1, True)  # (0, 1]: a share that must pick someone
UNDER_ONE: Range = (0, True, 1, False)  # [0, 1)
TRIM: Range = (0, True, 0.5, False)  # a share cut at each end
SEED: Range = (0, True, 2**32 - 1, True)  # what NumPy's global generator takes

_OPTIM: dict[str, Range] = {"lr": POSITIVE, "backbone_lr_scale": POSITIVE,
                            "weight_decay": NON_NEGATIVE, "batch_size": COUNT,
                            "steps": NON_NEGATIVE, "epochs": NON_NEGATIVE,
                            "proximal_mu": NON_NEGATIVE}
RANGES: dict[str, Range] = {
    "seed": SEED,
    "model.dropout": UNDER_ONE,
    **{f"{data}.split_seed": SEED for data in ("pretrain.data", "federation.data")},
    **{f"{optim}.{key}": bound for optim in ("pretrain.optim", "federation.local")
       for key, bound in _OPTIM.items()},
    "pretrain.contrastive.steps": COUNT,
    "pretrain.contrastive.batch_size": (2, True, None, False),  # each view needs a negative
    "pretrain.contrastive.lr": POSITIVE,
    "pretrain.contrastive.temperature": POSITIVE,
    "federation.rounds": COUNT,
    "federation.head_warmup_rounds": NON_NEGATIVE,
    "federation.strategy.fraction_train": SAMPLED,
    "federation.strategy.fraction_evaluate": SHARE,
    "federation.strategy.min_nodes": COUNT,
    "federation.strategy.proximal_mu": NON_NEGATIVE,
    "federation.strategy.eta": POSITIVE,
    "federation.strategy.eta_l": POSITIVE,
    "federation.strategy.beta_1": UNDER_ONE,
    "federation.strategy.beta_2": UNDER_ONE,
    "federation.strategy.tau": POSITIVE,
    "federation.strategy.beta": TRIM,
    "federation.strategy.num_malicious_nodes": NON_NEGATIVE,
    "federation.strategy.num_nodes_to_select": NON_NEGATIVE,
    "federation.strategy.round_timeout": POSITIVE,
    "federation.adaptation.steps": COUNT,
    "federation.adaptation.lr": POSITIVE,
    "federation.adaptation.eval_every": COUNT,
    "federation.adaptation.patience": COUNT,
    "federation.adaptation.proximal_mu": NON_NEGATIVE,
    "federation.adaptation.min_improvement": NON_NEGATIVE,
    "federation.adaptation.prior_shift_max": NON_NEGATIVE,
    "federation.operating_point.min_class_rows": COUNT,
    "federation.validation.max_norm_ratio": NON_NEGATIVE,
    "federation.validation.max_update_norm": NON_NEGATIVE,
    "federation.validation.max_examples": NON_NEGATIVE,
    "federation.validation.max_examples_ratio": NON_NEGATIVE,
    "federation.validation.min_valid_replies": COUNT,
    "federation.validation.max_round_retries": NON_NEGATIVE,
    "federation.privacy.noise_multiplier": NON_NEGATIVE,
    "federation.privacy.clipping_norm": POSITIVE,
    "federation.privacy.delta": (0, False, 1, False),
    "federation.privacy.secagg_num_shares": (3, True, None, False),
    "federation.privacy.secagg_reconstruction_threshold": (2, True, None, False),
    "federation.privacy.secagg_clipping_range": POSITIVE,
    "federation.privacy.secagg_quantization_range": COUNT,
    "federation.faults.byzantine_fraction": SHARE,
    "federation.faults.fail_fraction": SHARE,
    "federation.faults.attack_fraction": SHARE,
    "federation.faults.hang_seconds": NON_NEGATIVE,
    "federation.faults.seed": SEED,
}
# numbers checked elsewhere: the synthetic source's sizes (common/data/synthetic.py), the number
# of sites and the split fractions (common/data/federated.py, splits.py); and those where any
# finite value is an answer
UNBOUNDED = ("byzantine_scale", "attack_value", "synthetic_sites", "synthetic_features",
             "synthetic_samples", "num_sites", "test_fraction", "validation_fraction")
PRIVACY = "federation.privacy."  # the keys check_privacy owns
DP_MODES = ("off", "server", "client")  # server/privacy.py: Flower's fixed-clipping wrappers
DP_STRATEGIES = ("fedavg", "fedprox")  # the wrappers add noise to a weighted mean


def shown(value: float) -> str:
    """A number as a config file would hold it: integers in full, others short."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def range_text(bound: Range) -> str:
    """`more than 0`, `at least 1`, `0 or more`, `in [0, 1)`."""
    low, low_ok, high, high_ok = bound
    if high is None:
        assert low is not None
        if low_ok:
            return "0 or more" if low == 0 else f"at least {shown(low)}"
        return f"more than {shown(low)}"
    return (f"in {'[' if low_ok else '('}{shown(low or 0)}, {shown(high)}"
            f"{']' if high_ok else ')'}")


def in_range(value: float, bound: Range) -> bool:
    """Whether the finite `value` lies in `bound` (inf and nan never do)."""
    low, low_ok, high, high_ok = bound
    if not math.isfinite(value):
        return False
    above = low is None or value > low or (low_ok and value == low)
    below = high is None or value < high or (high_ok and value == high)
    return above and below


def config_value(cfg: Config, key: str) -> Any:
    """The value at dotted `key` (`federation.local.lr`)."""
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _check_range(root: Any, ranges: dict[str, Range], prefix: str = "") -> None:
    """Each `prefix + key` of `ranges` inside its range (`key` is read from `root`)."""
    for key, bound in ranges.items():
        value = config_value(root, key.removeprefix(prefix))
        if not in_range(value, bound):
            raise ConfigError(f"config key {key!r} must be {range_text(bound)}, "
                              f"got {shown(value)}")


def check_privacy(pc: PrivacyConfig, strategy_name: str | None = None) -> None:
    """`federation.privacy` on its own and, given `strategy_name`, with the strategy (the
    server calls it too before it wraps a strategy, whoever built the config)."""
    _one_of("federation.privacy.dp", pc.dp, DP_MODES)
    _check_range(pc, {k: b for k, b in RANGES.items() if k.startswith(PRIVACY)}, PRIVACY)
    if strategy_name is None:
        return
    if pc.dp != "off" and strategy_name.lower() not in DP_STRATEGIES:
        raise ConfigError(f"config key 'federation.strategy.name' must be "
                          f"{' or '.join(DP_STRATEGIES)} when federation.privacy.dp is "
                          f"'{pc.dp}', got '{strategy_name}'")
    if not pc.secure_aggregation:
        return
    if pc.dp != "off":
        raise ConfigError("config key 'federation.privacy.dp' must be 'off' when "
                          f"federation.privacy.secure_aggregation is true, got '{pc.dp}'")
    if strategy_name.lower() != "fedavg":
        raise ConfigError("config key 'federation.strategy.name' must be 'fedavg' with secure "
                          f"aggregation, got '{strategy_name}'")
    if not pc.secagg_reconstruction_threshold < pc.secagg_num_shares:
        raise ConfigError("config key 'federation.privacy.secagg_reconstruction_threshold' must "
                          f"be in 2..{pc.secagg_num_shares - 1} (below secagg_num_shares), got "
                          f"{pc.secagg_reconstruction_threshold}")


def sampled_per_round(cfg: StrategyConfig, num_nodes: int) -> int:
    """How many of `num_nodes` hospitals Flower's FedAvg samples for training each round."""
    return min(num_nodes, max(int(num_nodes * cfg.fraction_train), cfg.min_nodes))


def check_hospital_count(cfg: Config, available: int, which: str) -> None:
    """Refuse a run that `available` hospitals can never carry (`which` says how that count is
    known: the simulated sites, the enrolment): a first round waiting for more hospitals than
    can join, or SecAgg+ sharing each update among more hospitals than a round samples."""
    need = cfg.federation.strategy.min_nodes
    plural = "s" if available != 1 else ""
    if need > available:
        raise ConfigError(
            f"config key 'federation.strategy.min_nodes' is {need} but {which} {available} "
            f"hospital{plural}: every round would wait for hospitals that cannot join; set it "
            f"to at most {available}")
    pc = cfg.federation.privacy
    sampled = sampled_per_round(cfg.federation.strategy, available)
    if pc.secure_aggregation and pc.secagg_num_shares > sampled:
        raise ConfigError(
            f"config key 'federation.privacy.secagg_num_shares' is {pc.secagg_num_shares} but "
            f"a round samples at most {sampled} of the {available} hospital{plural} {which} "
            f"available; set it to at most {sampled}")


def check_numbers(cfg: Config) -> None:
    """Raise :class:`ConfigError` naming the first number outside its range (privacy's are
    :func:`check_privacy`'s, which the server also calls)."""
    _check_range(cfg, {k: b for k, b in RANGES.items() if not k.startswith(PRIVACY)})
    width_key = _BLOCK_WIDTHS.get(cfg.model.family)
    widths = getattr(cfg.model, width_key) if width_key else ()
    # the bounds every loader of a bundle applies (common/models.py): a bundle built beyond
    # them could be signed but never used, and 1e11 units would try to allocate terabytes
    if len(widths) > MAX_BLOCKS:
        raise ConfigError(f"config key 'model.{width_key}' lists {len(widths)} blocks; at most "
                          f"{MAX_BLOCKS}")
    for i, width in enumerate(widths):
        if not 1 <= width <= MAX_WIDTH:
            raise ConfigError(f"config key 'model.{width_key}[{i}]' must be in 1..{MAX_WIDTH} "
                              f"(a block's width), got {width}")
    for key in ("pretrain.optim", "federation.local"):
        optim = config_value(cfg, key)
        if optim.steps == 0 and optim.epochs == 0:
            raise ConfigError(f"config key '{key}.steps' must be at least 1 when "
                              f"'{key}.epochs' is 0 (one of them sets how long to train)")


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
    _check_pretrain(cfg)
    check_numbers(cfg)
    _check_pretrain_rows(cfg)  # after the ranges: a seed out of range is said as such
    check_privacy(cfg.federation.privacy, cfg.federation.strategy.name)
    _check_federation(cfg)
    if cfg.federation.strategy.name.lower() not in STRATEGY_NAMES:
        raise ConfigError(
            f"config key 'federation.strategy.name' must be one of {', '.join(STRATEGY_NAMES)}, "
            f"got {cfg.federation.strategy.name!r}"
        )


PRETRAIN_OBJECTIVES = ("supervised", "simclr")  # common/pretrain.py


# what carves a site of a shared cohort into train, validation and test (common/data/)
_CARVING = ("split_seed", "validation_fraction", "test_fraction", "heart_protocol")


def _check_pretrain_rows(cfg: Config) -> None:
    """Pretraining fits a train split only, and when it reads hospitals of the federation's
    own cohort (heart, csv), that split must be carved as theirs is: otherwise rows the
    federation validates on, or only reports (test), train the backbone. (A re-partitioned
    federation is only warned about: :func:`pretrain_overlap_note`.)"""
    pre, fed = cfg.pretrain.data, cfg.federation.data
    if cfg.pretrain.split not in ("train", "validation", "val", "test"):
        return  # common.pretrain names the allowed values
    if cfg.pretrain.split != "train":
        raise ConfigError(f"config key 'pretrain.split' is {cfg.pretrain.split!r}: pretraining "
                          "fits a train split only (a validation split checks models, a test "
                          "split is only reported)")
    shared = pre.source == fed.source and pre.source in ("heart", "csv") and (
        pre.source != "csv" or set(pre.csv_paths) & set(fed.csv_paths))
    if not shared or (pre.sites and fed.sites and not set(pre.sites) & set(fed.sites)):
        return
    for key in _CARVING:
        if getattr(pre, key) != getattr(fed, key):
            raise ConfigError(
                f"config keys 'pretrain.data.{key}' ({getattr(pre, key)!r}) and "
                f"'federation.data.{key}' ({getattr(fed, key)!r}) differ, and both read the "
                f"same {pre.source} hospitals: the pretraining train split would hold rows "
                "the federation validates or tests on; give both the same value")


def pretrain_overlap_note(cfg: Config) -> str | None:
    """A warning when a re-partitioned federation shares hospitals with the pretraining
    cohort: its train rows are pooled and re-split, so some of the backbone's training rows
    become simulated hospitals' validation rows and the validation figures read high (the
    test rows are pooled apart, so test figures stay clean)."""
    pre, fed = cfg.pretrain.data, cfg.federation.data
    if fed.partition == "natural" or pre.source != fed.source or pre.source not in ("heart",
                                                                                    "csv"):
        return None
    if pre.sites and fed.sites and not set(pre.sites) & set(fed.sites):
        return None
    if pre.source == "csv" and not set(pre.csv_paths) & set(fed.csv_paths):
        return None
    who = ", ".join(pre.sites) if pre.sites else f"every {pre.source} hospital"
    return (f"federation.data.partition {fed.partition} re-splits the train rows of hospitals "
            f"the backbone was pretrained on ({who}): some become validation rows, so the "
            "validation figures (and the choice of best) read them again; test figures are "
            "unaffected. Use partition natural, or pretrain on other hospitals, for honest "
            "validation figures")


def _check_pretrain(cfg: Config) -> None:
    """The objective, and the extra sets of the contrastive stage: shipped MedMNIST sets other
    than the source and never the federation's own (its hospitals' images stay with them)."""
    pre = cfg.pretrain
    _one_of("pretrain.objective", pre.objective, PRETRAIN_OBJECTIVES)
    also = pre.contrastive.also_medmnist
    if pre.objective != "simclr":
        if also:
            raise ConfigError("config key 'pretrain.contrastive.also_medmnist' is used only by "
                              "pretrain.objective simclr, which is not set")
        return
    if pre.data.source != "medmnist":
        raise ConfigError(f"config key 'pretrain.objective' simclr needs images (pretrain.data."
                          f"source medmnist), got source {pre.data.source!r}")
    own = cfg.federation.data.medmnist if cfg.federation.data.source == "medmnist" else None
    for i, name in enumerate(also):
        key = f"pretrain.contrastive.also_medmnist[{i}]"
        _one_of(key, name, MEDMNIST_SETS)
        if name == own:
            raise ConfigError(f"config key {key!r} names {name!r}, the federation's own set: "
                              "its hospitals' images must not be pooled for pretraining")
        if name == pre.data.medmnist:
            raise ConfigError(f"config key {key!r} names {name!r}, pretrain.data's own set: "
                              "its images are in the contrastive stage already")
        if name in also[:i]:
            raise ConfigError(f"config key {key!r} names {name!r} a second time")


def _check_federation(cfg: Config) -> None:
    fed = cfg.federation
    if not (fed.heldout in (*AT_SITES, "source-validation")
            or (fed.heldout.startswith("file:") and len(fed.heldout) > 5)):
        raise ConfigError(f"config key 'federation.heldout' must be one of "
                          f"{', '.join(HELDOUT_MODES)}, got {fed.heldout!r}")
    if fed.heldout in AT_SITES and fed.strategy.fraction_evaluate <= 0:
        raise ConfigError(
            "config key 'federation.strategy.fraction_evaluate' is 0 but 'federation.heldout' "
            f"is {fed.heldout!r}, which evaluates every global model at the sites; raise it or "
            "use heldout source-validation or file:PATH"
        )
    if fed.evaluate_with_train and fed.privacy.secure_aggregation:
        raise ConfigError(
            "config key 'federation.evaluate_with_train' is true but "
            "'federation.privacy.secure_aggregation' runs Flower's legacy workflow, whose train "
            "replies carry only the masked update; set one of them to false")
    st = fed.strategy
    if st.name.lower() == "krum" and st.num_malicious_nodes > 0 \
            and st.min_nodes < 2 * st.num_malicious_nodes + 3:
        # Flower's Krum then scores each update against max(1, n - f - 2) neighbours: it
        # runs, but without the protection the setting promises
        raise ConfigError(
            f"config key 'federation.strategy.num_malicious_nodes' is "
            f"{st.num_malicious_nodes}, but Krum withstands f malicious hospitals only among "
            f"at least 2f + 3 = {2 * st.num_malicious_nodes + 3} per round and "
            f"'federation.strategy.min_nodes' is {st.min_nodes}; lower it or raise min_nodes")
    if fed.final_model not in ("best", "latest"):
        raise ConfigError(f"config key 'federation.final_model' must be best or latest, "
                          f"got {fed.final_model!r}")
    _one_of("federation.best_metric", fed.best_metric, SELECTION_METRICS)
    ad = fed.adaptation
    _one_of("federation.adaptation.selection_metric", ad.selection_metric, ADAPTATION_METRICS)
    _one_of("federation.faults.attack", fed.faults.attack, ("none", *ATTACKS, "mixed"))
    op = fed.operating_point
    _one_of("federation.operating_point.calibration", op.calibration, CALIBRATIONS)
    if not _THRESHOLD.fullmatch(op.threshold):
        raise ConfigError(
            "config key 'federation.operating_point.threshold' must be youden, "
            "sensitivity>=X, specificity>=X or fixed:T with X, T in [0, 1], "
            f"got {op.threshold!r}")
