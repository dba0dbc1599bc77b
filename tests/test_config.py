"""Config: YAML + overrides into one typed tree; unknown keys and wrong types are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import Config, ConfigError, from_dict, parse_override, to_dict
from common.config_check import load_config

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
