"""One typed config tree for an experiment, loaded from YAML with `key.sub=value` overrides.

Defaults live here, next to a short comment on units or advice. A YAML file from `configs/`
overrides them and command-line overrides come last. Unknown keys and wrong types stop with
one sentence naming the key (:class:`ConfigError`). The resolved tree is stored in every bundle.
"""

from __future__ import annotations

import dataclasses
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_EXPONENT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple = 2, 4, 4, 4
_SHORT.maxstring = _SHORT.maxother = 60


def show(value: Any) -> str:
    """A short repr for messages: a value from a file can be huge (never print it whole)."""
    return _SHORT.repr(value)


@dataclass(frozen=True)
class DataConfig:
    """Where a dataset comes from and how it is split into hospitals."""

    source: str = "heart"  # heart | medmnist | csv | synthetic
    # heart: "flamby" (FLamby's exact protocol) or "impute" (keep slope/ca/thal, impute on train)
    heart_protocol: str = "flamby"
    sites: tuple[str, ...] = ()  # restrict to these site names (empty: all)
    medmnist: str = "breast"  # breast | pneumonia | retina
    csv_paths: tuple[str, ...] = ()  # csv: one file per site (or one file with a site column)
    csv_schema: str = ""  # csv: YAML schema file (columns, types, ranges, label, missing values)
    site_column: str = ""  # csv: column naming the site when all sites share one file
    # csv: test files kept aside, one per file of csv_paths in the same order (or one file with
    # the site column); empty: each site's test split is carved (test_fraction)
    test_paths: tuple[str, ...] = ()
    # csv: column whose values (train, validation, test) say which split a row belongs to
    split_column: str = ""
    synthetic_sites: int = 6  # synthetic: number of hospitals (unequal sizes, label skew)
    synthetic_features: int = 13
    synthetic_samples: int = 1200  # synthetic: total rows over all sites
    # natural | iid | dirichlet:ALPHA | quantity:ALPHA ; non-natural partitions pool the train
    # splits (and test splits) and re-split them over `num_sites` simulated hospitals
    partition: str = "natural"
    num_sites: int = 0  # 0: the natural number of sites
    test_fraction: float = 0.34  # sources without a fixed test split (csv, synthetic)
    # share of each site's train split carved out (stratified, seeded) as its validation split,
    # unless the source gives one (MedMNIST's official val split, a split column)
    validation_fraction: float = 0.2
    split_seed: int = 43  # FLamby's seed for the heart train/test split
    # site: each site z-normalises with its own train-split statistics (FLamby);
    # bundle: everyone uses the statistics stored in the bundle (source train split)
    normalisation: str = "site"
    # the classes' names in class-index order, as predictions, model cards and reports show
    # them (e.g. [benign, malignant]); empty: the source's own (MedMNIST's, the CSV schema's
    # `labels`) or, for a federation whose hospitals bring their own images, the bundle's
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    """Backbone family, its constructor arguments, and which tensors train."""

    family: str = "mlp"  # mlp (tabular) | cnn (small CNN) | resnet (residual CNN, images)
    hidden: tuple[int, ...] = (32, 16)  # mlp: widths of the backbone blocks
    channels: tuple[int, ...] = (16, 32, 64)  # cnn, resnet: channels of the blocks / stages
    dropout: float = 0.0
    # head | head+last-N (N backbone blocks train too) | all
    trainable: str = "head"


@dataclass(frozen=True)
class OptimConfig:
    """Local optimisation: counted in optimiser steps so unequal sites stay comparable."""

    optimizer: str = "adam"  # adam | sgd
    lr: float = 0.01
    # the backbone's rate as a share of lr (the head trains at lr): below 1 fine-tunes a
    # pretrained backbone gently, keeping more of what it learnt (discriminative fine-tuning)
    backbone_lr_scale: float = 1.0
    weight_decay: float = 0.0
    batch_size: int = 32
    steps: int = 20  # optimiser steps per round (ignored when epochs > 0)
    epochs: int = 0  # >0: train whole passes over the local train split instead
    proximal_mu: float = 0.0  # FedProx term; set by the server when strategy is fedprox
    # images only: none | flip, shift, intensity joined by + (common/augment.py); with a
    # frozen prefix it turns the feature cache off (the prefix must see each augmented image)
    augment: str = "none"
    # cross_entropy | balanced_softmax: the loss adds log(site label prior) to the logits
    # (Ren et al. 2020), so a site with few positives still learns class evidence rather than
    # its own prevalence; label-skewed sites then pull the average the same way (FedLC idea)
    loss: str = "cross_entropy"


@dataclass(frozen=True)
class ContrastiveConfig:
    """The self-supervised stage of ``pretrain.objective: simclr`` (common/contrastive.py).

    The backbone learns from two random views of each image (SimCLR's NT-Xent loss through a
    small projection), on the source's training images and those of `also_medmnist` (labels
    unused); then the head is fitted on the source's labels with the backbone frozen.
    """

    steps: int = 3000  # optimiser steps of the contrastive stage
    batch_size: int = 256  # images per step (each gives two views)
    lr: float = 0.002  # Adam
    temperature: float = 0.2
    # other shipped MedMNIST sets whose train-split images join the contrastive stage, in the
    # source's channels (colour to grey by luminance); never the federation's own set
    also_medmnist: tuple[str, ...] = ()


@dataclass(frozen=True)
class PretrainConfig:
    """Central training of backbone + head on the source dataset."""

    data: DataConfig = field(default_factory=DataConfig)
    split: str = "train"  # which split of the listed sites to train on
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(steps=0, epochs=60))
    # supervised: backbone + head on the source's labels (optim); simclr: the contrastive
    # stage first, then the head alone on the source's labels (optim)
    objective: str = "supervised"
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)


@dataclass(frozen=True)
class StrategyConfig:
    """A Flower strategy and its knobs (only the ones the named strategy uses matter)."""

    name: str = "fedavg"  # fedavg|fedprox|fedadam|fedyogi|fedadagrad|fedmedian|fedtrimmedavg|krum
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_nodes: int = 2  # min train/evaluate/available nodes
    proximal_mu: float = 0.01  # fedprox
    eta: float = 0.01  # fedadam/fedyogi/fedadagrad server learning rate
    eta_l: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 0.001
    beta: float = 0.2  # fedtrimmedavg: fraction cut at each end
    num_malicious_nodes: int = 0  # krum: f attackers tolerated; needs min_nodes >= 2f + 3
    num_nodes_to_select: int = 0  # krum: 0 = Krum, >0 = MultiKrum
    round_timeout: float = 600.0  # seconds to wait for replies in one round


@dataclass(frozen=True)
class AdaptationConfig:
    """Local adaptation after federation: each site may fine-tune the global model.

    It never does harm: fine-tuning stops early on the site's validation split, is pulled
    toward the global weights, and the site keeps the global model unless the adapted one is
    better on validation by `selection_metric`. A site whose training data holds one class
    gets a bounded intercept (prior-shift) correction instead of fine-tuning.
    """

    enabled: bool = False
    steps: int = 30  # most fine-tuning steps
    lr: float = 0.005
    eval_every: int = 5  # steps between checks on the validation split
    patience: int = 3  # checks without improvement before stopping
    proximal_mu: float = 0.1  # pull toward the global weights (0: none)
    selection_metric: str = "loss"  # loss (log-loss) | auc | balanced_accuracy, on validation
    min_improvement: float = 0.0  # the adapted model must beat the global one by more than this
    prior_shift_max: float = 1.0  # one-class sites: largest intercept shift, in logits


@dataclass(frozen=True)
class OperatingPointConfig:
    """Calibration and decision threshold of each site's model, fitted on its validation split."""

    calibration: str = "temperature"  # temperature | none
    # youden | sensitivity>=X | specificity>=X | fixed:T (fixed = fixed:0.5)
    threshold: str = "fixed:0.5"
    # a threshold rule needs this many validation rows of each class; fewer: threshold 0.5
    # (a Youden threshold fitted on 4 negatives is noise)
    min_class_rows: int = 10


@dataclass(frozen=True)
class ValidationConfig:
    """Checks on every reply before it is used (see server/validation.py)."""

    # a reply's update norm must be <= this x the round's median update norm (0: no bound)
    max_norm_ratio: float = 10.0
    # ... and <= this absolute L2 norm, whatever the number of replies (0: no bound)
    max_update_norm: float = 1000.0
    # a reply's aggregation weight never exceeds a bound the server sets: the hospital's
    # enrolled size (hospitals.yaml `max_examples`; in simulation the data's train rows), else
    # this cap (0: none), else `max_examples_ratio` x the round's median claimed count
    max_examples: int = 0
    max_examples_ratio: float = 3.0
    min_valid_replies: int = 1  # fewer valid replies than this: retry the round, then stop
    max_round_retries: int = 1


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy and secure aggregation (both Flower's; off by default)."""

    dp: str = "off"  # off | server | client  (Flower's fixed-clipping DP wrappers)
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    delta: float = 1e-5  # the delta of the reported (epsilon, delta)
    # Flower SecAgg+ (only on Flower's legacy workflow API; see server/secagg.py)
    secure_aggregation: bool = False
    secagg_num_shares: int = 3
    secagg_reconstruction_threshold: int = 2
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 4194304


@dataclass(frozen=True)
class FaultsConfig:
    """SIMULATION ONLY: make some simulated hospitals misbehave, to test robustness."""

    byzantine_fraction: float = 0.0  # share of hospitals sending bad updates
    byzantine_mode: str = "scale"  # scale (update x byzantine_scale) | signflip
    byzantine_scale: float = 100.0
    fail_fraction: float = 0.0  # share of hospitals that fail every train/evaluate message
    # raise | hang (answer after hang_seconds) | vanish (never answer) | mixed (a third each)
    fail_mode: str = "raise"
    hang_seconds: float = 30.0
    # a malicious hospital: inflate-count (claims `attack_value` rows when it joins and in
    # every update) | omit-count (declares nothing) | huge-update (adds `attack_value` to its
    # tensors) | nan-update | spoof-name (calls itself like another site) | malformed (sends
    # records without their tensors or metrics) | mixed (the attackers take turns)
    attack: str = "none"
    attack_fraction: float = 0.0
    attack_value: float = 1e300
    seed: int = 0  # which hospitals misbehave


@dataclass(frozen=True)
class FederationConfig:
    """The federated run: target data, rounds, strategy, local training, checks."""

    data: DataConfig = field(default_factory=DataConfig)
    rounds: int = 5
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    local: OptimConfig = field(default_factory=OptimConfig)
    # what checks every global model and picks `best`; never a test split:
    # validation (the sites' validation splits, evaluated at the sites, mean over sites),
    # validation-median (the same, median over sites: a minority of lying sites cannot move
    # it beyond the others' figures), source-validation (a validation split of the
    # pretraining cohort, held by the server) or file:PATH
    heldout: str = "validation"
    # true: each train message also scores the global model it carries at the site, so a
    # round is one message per node (version r is published when round r+1's replies arrive;
    # the last version gets its own evaluate message); strategy.fraction_evaluate then does
    # not apply: the sites sampled to train are the sites that evaluate
    evaluate_with_train: bool = False
    best_metric: str = "auc"  # validation metric that picks `best` (ties: the later round)
    # the version delivered to hospitals and adapted at the end: best (on validation) | latest
    final_model: str = "best"
    # true when the target task differs from the source task (e.g. pneumonia -> breast):
    # the pretrained head is replaced by a fresh, seeded one before round 1
    reset_head: bool = False
    # the first N rounds train only the head on the received backbone, then model.trainable
    # applies: a fresh head's first, random gradients would otherwise reshape the pretrained
    # features before the head has learnt anything (linear probing, then fine-tuning)
    head_warmup_rounds: int = 0
    adaptation: AdaptationConfig = field(default_factory=AdaptationConfig)
    operating_point: OperatingPointConfig = field(default_factory=OperatingPointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)


@dataclass(frozen=True)
class Config:
    """A whole experiment."""

    name: str = "experiment"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | mps
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; convert lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {show(value)}")
        return _build(tp, value, key + ".")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key '{key}' must be a list, got {show(value)}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}' has the wrong type: got {show(value)}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"config key '{key}' must be null, got {show(value)}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {show(value)}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT.fullmatch(value):
            return float(value)  # YAML 1.1 reads 1e300 (no dot) as text
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key '{key}' must be a number, got {show(value)}")
        try:
            return float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise ConfigError(f"config key '{key}' is a number beyond any float "
                              f"({len(str(value))} digits)") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {show(value)}")
        return value
    raise ConfigError(f"config key '{key}' has an unsupported type {tp!r}")


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{prefix}{key}' (known keys: {known})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    return cls(**kwargs)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error, e.g. "expected ',' or ']', but got ':' at line 3, column 5".

    PyYAML's own text spans several lines with a source excerpt; the CLI prints one sentence.
    """
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def parse_override(text: str) -> dict[str, Any]:
    """Turn `federation.rounds=3` into a nested dict; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    dotted, raw_value = text.split("=", 1)
    if not dotted or any(not part for part in dotted.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = safe_yaml(raw_value, f"override '{dotted}'") if raw_value != "" else ""
    except ValueError as err:
        raise ConfigError(str(err)) from err
    except yaml.YAMLError as err:
        raise ConfigError(
            f"override '{text}': value is not valid YAML ({yaml_problem(err)})"
        ) from err
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return typing.cast(dict[str, Any], value)


def from_dict(raw: dict[str, Any], overrides: typing.Sequence[str] = ()) -> Config:
    """Build a :class:`Config` from a plain dict plus overrides."""
    merged = dict(raw)
    for text in overrides:
        merged = _merge(merged, parse_override(text))
    return typing.cast(Config, _build(Config, merged))


MAX_YAML_BYTES = 1 << 20  # an experiment or schema file is a few KB; refuse anything huge


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping: YAML keeps the last
    silently, so a second `federation:` block dropped every key of the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the constructor below says so
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {show(key)} written again (first at line {first}; YAML "
                    "would silently keep only the last)", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def safe_yaml(text: str, where: str) -> Any:
    """Parse small, alias-free YAML: anchors and aliases could expand a few bytes into GBs;
    a key written twice in one mapping is refused (raises ``yaml.YAMLError``).

    Raises ValueError naming `where` (callers turn it into their own error type).
    """
    if len(text.encode("utf-8")) > MAX_YAML_BYTES:
        raise ValueError(f"{where} is larger than {MAX_YAML_BYTES // 1024} KB")
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(token, yaml.AliasToken | yaml.AnchorToken):
            mark = token.start_mark
            raise ValueError(f"{where} uses a YAML anchor or alias at line {mark.line + 1}, "
                             "which medfed files do not allow")
    return yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 - a SafeLoader subclass


def read_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML experiment file and apply `key.sub=value` overrides: keys and types checked.

    :func:`common.config_check.load_config` also checks the values that name something
    (strategy, family, ...); use that one.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} does not exist") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text") from err
    except IsADirectoryError as err:
        raise ConfigError(f"config file {path} is a directory") from err
    try:
        raw = safe_yaml(text, f"config file {path}") or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(err)}") from err
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    try:
        return from_dict(raw, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return typing.cast(dict[str, Any], plain(dataclasses.asdict(config)))
