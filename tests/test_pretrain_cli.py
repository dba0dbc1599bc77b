"""`medfed` command line: help with examples, `pretrain` bundles, bad overrides, key creation."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from common.bundle import load_bundle
from common.signing import load_public_key
from medfed.cli import EXIT_BAD_INPUT, build_parser, main
from tests.conftest import BREAST, HEART, PROJECT
from tests.limits import COMMAND_S

FAST = ["--set", "pretrain.optim.epochs=1"]


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
              ) -> list[tuple[str, ...]]:
    """Every (sub)command path of the parser, found from the parser itself."""
    out = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _commands(sub, (*prefix, name))
    return out


COMMANDS = _commands(build_parser())


def test_the_command_tree_holds_the_documented_commands() -> None:
    names = {c[0] for c in COMMANDS if c}
    assert {"pretrain", "simulate", "server", "client", "pull", "predict", "certs"} <= names


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "medfed")
def test_help_exits_0_and_shows_an_example(command, capsys) -> None:
    with pytest.raises(SystemExit) as end:
        main([*command, "--help"])
    assert end.value.code == 0
    assert "example:\n  medfed " in capsys.readouterr().out


def test_console_entry_point_runs_help() -> None:
    done = subprocess.run([sys.executable, "-m", "medfed.cli", "--help"], cwd=PROJECT,
                          capture_output=True, text=True, timeout=COMMAND_S)
    assert done.returncode == 0
    assert "example:" in done.stdout


def test_pretrain_breast_writes_a_verifying_bundle(tmp_path, cli_env) -> None:
    # PneumoniaMNIST, 4708 images, one epoch on CPU: about 10-20 s
    out, keys = tmp_path / "bundle", tmp_path / "keys" / "signing.key"
    done = subprocess.run(
        [sys.executable, "-m", "medfed.cli", "pretrain", "--config", str(BREAST), *FAST,
         "--out", str(out), "--keys", str(keys)],
        cwd=PROJECT, env=cli_env, capture_output=True, text=True, timeout=COMMAND_S,
    )
    assert done.returncode == 0, done.stderr
    bundle = load_bundle(out, load_public_key(keys.with_suffix(".pub")), require_signature=True)
    assert bundle.manifest["version"] == 0
    assert f"wrote bundle {out}" in done.stdout


@pytest.mark.parametrize("override, key", [
    ("pretrain.optim.epoch=1", "pretrain.optim.epoch"),  # unknown key
    ("pretrain.optim.epochs=many", "pretrain.optim.epochs"),  # wrong type
    ("model.hidden=3", "model.hidden"),  # a list expected
])
def test_bad_override_exits_2_with_one_line_naming_the_key(override, key, tmp_path, capsys,
                                                           monkeypatch) -> None:
    monkeypatch.setenv("MEDFED_HOME", str(tmp_path / "home"))
    code = main(["pretrain", "--config", str(HEART), "--set", override,
                 "--out", str(tmp_path / "bundle")])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("medfed: error: ") and f"'{key}'" in err
    assert not (tmp_path / "bundle").exists()
    assert not (tmp_path / "home").exists()  # nothing created before the config was checked


def test_missing_config_file_exits_2_naming_it(tmp_path, capsys) -> None:
    code = main(["pretrain", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert "nope.yaml" in err and len(err.strip().splitlines()) == 1


def _created_key_path(stdout: str) -> Path:
    line = next(x for x in stdout.splitlines() if x.startswith("created bundle-signing key "))
    return Path(line.removeprefix("created bundle-signing key ").split(" (public key: ")[0])


def test_signing_key_is_created_in_medfed_home_where_the_message_says(tmp_path, capsys,
                                                                      monkeypatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("MEDFED_HOME", str(home))
    assert main(["pretrain", "--config", str(HEART), *FAST, "--out", str(tmp_path / "b")]) == 0
    said = _created_key_path(capsys.readouterr().out)
    assert said == home / "signing.key"
    assert said.is_file() and said.with_suffix(".pub").is_file()
    load_bundle(tmp_path / "b", load_public_key(said.with_suffix(".pub")), require_signature=True)


def test_signing_key_goes_to_keys_when_given_and_is_reused(tmp_path, capsys,
                                                           monkeypatch) -> None:
    monkeypatch.setenv("MEDFED_HOME", str(tmp_path / "home"))
    keys = tmp_path / "k" / "server.key"
    args = ["pretrain", "--config", str(HEART), *FAST, "--keys", str(keys)]
    assert main([*args, "--out", str(tmp_path / "b1")]) == 0
    assert _created_key_path(capsys.readouterr().out) == keys
    assert main([*args, "--out", str(tmp_path / "b2")]) == 0
    assert "created bundle-signing key" not in capsys.readouterr().out
    assert not (tmp_path / "home").exists()
    pub = load_public_key(keys.with_suffix(".pub"))
    for out in ("b1", "b2"):
        load_bundle(tmp_path / out, pub, require_signature=True)


def test_pretrain_refuses_to_overwrite_a_bundle_without_force(tmp_path, capsys,
                                                              monkeypatch) -> None:
    monkeypatch.setenv("MEDFED_HOME", str(tmp_path / "home"))
    args = ["pretrain", "--config", str(HEART), *FAST, "--out", str(tmp_path / "b")]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == EXIT_BAD_INPUT
    assert "medfed: error:" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


@pytest.mark.parametrize("case", ["not a bundle", "holds the key"])
def test_force_replaces_only_a_bundle_never_the_commands_own_files(case, tmp_path,
                                                                   capsys) -> None:
    """`pretrain --force --out $MEDFED_HOME` exited 0 and deleted the signing key and the
    config with the directory."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("keep me")
    if case == "holds the key":
        (home / "manifest.json").write_text("{}")  # looks like a bundle, but holds the key
    key = home / "signing.key"
    code = main(["pretrain", "--config", str(HEART), "--out", str(home), "--force",
                 "--keys", str(key)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert ("is not a bundle directory" if case == "not a bundle" else
            f"holds {key}, an input of this command") in err
    assert (home / "notes.txt").read_text() == "keep me" and not key.exists()
