"""Config: YAML + overrides into one typed tree; unknown keys and wrong types are refused."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from common.config import Config, ConfigError, from_dict, parse_override, to_dict
from common.config_check import (
    RANGES,
    UNBOUNDED,
    Range,
    config_value,
    load_config,
    range_text,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["heart.yaml", "breast.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, Config)
    assert cfg.name == name.removesuffix(".yaml")


def test_yaml_values_override_defaults() -> None:
    cfg = load_config(CONFIGS / "heart.yaml")
    assert cfg.pretrain.data.sites == ("cleveland",)
    assert cfg.model.hidden == (16,)  # lists become tuples
    assert cfg.federation.strategy.min_nodes == 4


def test_override_nested_key_and_int_to_float() -> None:
    cfg = load_config(CONFIGS / "heart.yaml", ["federation.rounds=3", "federation.local.lr=1"])
    assert cfg.federation.rounds == 3
    assert cfg.federation.local.lr == 1.0
    assert isinstance(cfg.federation.local.lr, float)


def test_override_list_value() -> None:
    cfg = from_dict({}, ["model.hidden=[8, 4, 2]"])
    assert cfg.model.hidden == (8, 4, 2)


def test_unknown_key_names_the_full_path() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'federation\.strategy\.nme'"):
        from_dict({"federation": {"strategy": {"nme": "fedavg"}}})


def test_unknown_override_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'federation.roundz'"):
        load_config(CONFIGS / "heart.yaml", ["federation.roundz=3"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("federation.rounds=three", "federation.rounds"),
        ("federation.rounds=2.5", "federation.rounds"),
        ("federation.adaptation.enabled=maybe", "federation.adaptation.enabled"),
        ("model.hidden=16", "model.hidden"),
        ("federation.local.lr=fast", "federation.local.lr"),
        ("federation.rounds=true", "federation.rounds"),
        ("model=mlp", "model"),
    ],
)
def test_wrong_type_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(CONFIGS / "heart.yaml", [override])


def test_override_without_equals_is_refused() -> None:
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        parse_override("federation.rounds")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=str(missing)):
        load_config(missing)


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "latin.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def test_error_in_file_names_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "exp.yaml"
    bad.write_text("federation:\n  rounds: many\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"exp.yaml: config key 'federation.rounds'"):
        load_config(bad)


def test_resolved_config_round_trips_through_plain_dict() -> None:
    cfg = load_config(CONFIGS / "breast.yaml", ["federation.rounds=7"])
    again = from_dict(to_dict(cfg))
    assert again == cfg


def _outside(bound: Range, integer: bool) -> list[float]:
    """Values just outside `bound` (below it, above it where it has a top)."""
    low, low_ok, high, high_ok = bound
    step: float = 1 if integer else 0.5
    values = [] if low is None else [low - step if low_ok else low]
    if high is not None:
        values.append(high + step if high_ok else high)
    return values


def _leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted key, type) of every leaf field of the config dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", tp))
    return out


NUMBER_KEYS = [key for key, tp in _leaf_fields(Config) if tp in (int, float)]


@pytest.mark.parametrize("key", sorted(RANGES))
def test_a_number_outside_its_range_is_refused_naming_key_range_and_value(key: str) -> None:
    integer = isinstance(config_value(Config(), key), int)
    bound = RANGES[key]
    for value in _outside(bound, integer):
        text = str(value) if integer else f"{value:g}"
        with pytest.raises(ConfigError) as err:
            load_config(CONFIGS / "heart.yaml", [f"{key}={text}"])
        assert str(err.value).endswith(
            f"config key '{key}' must be {range_text(bound)}, got {text}"), str(err.value)


# what else an edge value needs to make a valid config (0 steps: epochs; no site evaluation:
# another held-out check)
EDGE_NEEDS = {"federation.local.steps": ["federation.local.epochs=1"],
              "pretrain.optim.steps": ["pretrain.optim.epochs=1"],
              "federation.strategy.fraction_evaluate": ["federation.heldout=source-validation"],
              # heart pretrains on one of its hospitals, which both must carve alike: here the
              # federation leaves that one out
              **{f"{side}.data.split_seed": ["federation.data.sites=[hungary, switzerland, va]",
                                             "federation.strategy.min_nodes=3"]
                 for side in ("pretrain", "federation")}}


@pytest.mark.parametrize("key", sorted(RANGES))
def test_the_edge_of_each_range_is_accepted(key: str) -> None:
    low, low_ok, high, high_ok = RANGES[key]
    edges = [v for v, ok in ((low, low_ok), (high, high_ok)) if v is not None and ok]
    for value in edges:
        extra = EDGE_NEEDS.get(key, [])
        cfg = load_config(CONFIGS / "heart.yaml", [f"{key}={value!r}", *extra])
        assert config_value(cfg, key) == value


def test_every_number_in_the_config_has_a_range_or_is_checked_where_it_is_used() -> None:
    unclassified = [key for key in NUMBER_KEYS
                    if key not in RANGES and key.rsplit(".", 1)[-1] not in UNBOUNDED]
    assert not unclassified
    assert len(RANGES) >= 45


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_an_infinite_or_missing_number_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="config key 'federation.local.lr' must be"):
        load_config(CONFIGS / "heart.yaml", [f"federation.local.lr={value}"])


def test_training_needs_steps_or_epochs() -> None:
    with pytest.raises(ConfigError, match=r"'federation\.local\.steps' must be at least 1 when "
                                          r"'federation\.local\.epochs' is 0"):
        load_config(CONFIGS / "heart.yaml", ["federation.local.steps=0"])
    cfg = load_config(CONFIGS / "heart.yaml", ["federation.local.steps=0",
                                               "federation.local.epochs=2"])
    assert cfg.federation.local.epochs == 2


@pytest.mark.parametrize(("family", "key"), [("mlp", "hidden"), ("cnn", "channels")])
@pytest.mark.parametrize("width", [0, 8193, 99_999_999_999])
def test_a_block_width_a_bundle_could_not_load_is_refused(family: str, key: str,
                                                          width: int) -> None:
    """Loading a bundle bounds its widths (common/models.py): a config beyond them made a
    signed bundle no command would open, or tried to allocate terabytes."""
    with pytest.raises(ConfigError, match=rf"'model\.{key}\[1\]' must be in 1\.\.8192 .*"
                                          rf"got {width}"):
        load_config(CONFIGS / "heart.yaml", [f"model.family={family}",
                                             f"model.{key}=[8, {width}]"])


def test_more_blocks_than_a_bundle_may_have_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"'model\.hidden' lists 33 blocks; at most 32"):
        load_config(CONFIGS / "heart.yaml", [f"model.hidden=[{', '.join(['4'] * 33)}]"])


def test_a_key_written_twice_is_refused_not_half_dropped(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys: a second `federation:` block dropped every
    setting of the first without a word."""
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: x\nfederation:\n  rounds: 3\nseed: 1\nfederation:\n  rounds: 7\n",
                   encoding="utf-8")
    with pytest.raises(ConfigError, match=r"dup.yaml is not valid YAML: key 'federation' "
                                          r"written again \(first at line 2.*at line 5"):
        load_config(dup)


def test_an_integer_beyond_any_float_is_one_sentence() -> None:
    with pytest.raises(ConfigError, match=r"'federation.local.lr' is a number beyond any float "
                                          r"\(400 digits\)"):
        load_config(CONFIGS / "heart.yaml", [f"federation.local.lr={'1' * 400}"])


def test_a_seed_numpy_cannot_take_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'seed' must be in \[0, 4294967295\], got 4294967296"):
        load_config(CONFIGS / "heart.yaml", ["seed=4294967296"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["federation.privacy.dp=local"], r"'federation\.privacy\.dp' must be one of off, server, "
                                      r"client, got 'local'"),
    (["federation.privacy.dp=server", "federation.strategy.name=fedadam"],
     r"'federation\.strategy\.name' must be fedavg or fedprox when federation\.privacy\.dp is "
     r"'server', got 'fedadam'"),
    (["federation.privacy.secure_aggregation=true", "federation.privacy.dp=client"],
     r"'federation\.privacy\.dp' must be 'off' when federation\.privacy\.secure_aggregation"),
    (["federation.privacy.secure_aggregation=true", "federation.strategy.name=fedprox"],
     r"'federation\.strategy\.name' must be 'fedavg' with secure aggregation"),
    (["federation.privacy.secure_aggregation=true",
      "federation.privacy.secagg_reconstruction_threshold=3"],
     r"'federation\.privacy\.secagg_reconstruction_threshold' must be in 2\.\.2"),
])
def test_privacy_settings_that_cannot_run_are_refused_when_the_config_loads(
        overrides: list[str], message: str) -> None:
    """Once found only inside the ServerApp, after the run directory was started."""
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "heart.yaml", overrides)


def test_krum_promising_more_than_its_hospitals_allow_is_refused() -> None:
    """Krum withstands f attackers among at least 2f + 3 updates; below that Flower's Krum
    still runs, silently without that protection."""
    with pytest.raises(ConfigError, match=r"'federation\.strategy\.num_malicious_nodes' is 2, "
                       r"but Krum withstands f malicious hospitals only among at least 2f \+ 3 "
                       r"= 7 per round and 'federation\.strategy\.min_nodes' is 5"):
        load_config(CONFIGS / "heart.yaml", ["federation.strategy.name=krum",
                                             "federation.strategy.num_malicious_nodes=2",
                                             "federation.strategy.min_nodes=5"])
    for ok in (["federation.strategy.min_nodes=7"], ["federation.strategy.num_malicious_nodes=0"]):
        load_config(CONFIGS / "heart.yaml", ["federation.strategy.name=krum",
                                             "federation.strategy.num_malicious_nodes=2",
                                             "federation.strategy.min_nodes=5", *ok])


@pytest.mark.parametrize(("override", "message"), [
    ("pretrain.split=test", r"'pretrain.split' is 'test': pretraining fits a train split only"),
    ("pretrain.split=validation", r"'pretrain.split' is 'validation': pretraining fits"),
    # heart pretrains on Cleveland, one of the federation's hospitals: carved otherwise, its
    # pretraining rows held half of the federation's Cleveland test rows
    ("pretrain.data.split_seed=7", r"'pretrain.data.split_seed' \(7\) and "
                                   r"'federation.data.split_seed' \(43\) differ"),
    ("pretrain.data.validation_fraction=0.05", r"'pretrain.data.validation_fraction' \(0.05\)"),
])
def test_pretraining_never_fits_rows_the_federation_validates_or_tests_on(
        override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "heart.yaml", [override])


def test_a_re_split_of_the_pretraining_hospitals_is_said_to_inflate_validation() -> None:
    from common.config_check import pretrain_overlap_note

    assert pretrain_overlap_note(load_config(CONFIGS / "heart.yaml")) is None  # natural
    assert pretrain_overlap_note(load_config(CONFIGS / "breast.yaml")) is None  # other set
    note = pretrain_overlap_note(load_config(CONFIGS / "heart.yaml",
                                             ["federation.data.partition=iid"]))
    assert note is not None and "(cleveland)" in note and "test figures are unaffected" in note
    other = ["federation.data.partition=iid", "federation.data.sites=[hungary, va]"]
    assert pretrain_overlap_note(load_config(CONFIGS / "heart.yaml", other)) is None
