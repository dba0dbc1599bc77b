"""The bad-input matrix: every case runs `medfed.cli.main` in-process and must end with

- exit code 2 (bad input),
- exactly one line on stderr, ``medfed: error: ...``, naming the file, column or key,
- nothing on stdout and nothing written (the work directory is unchanged, no output path).

Each row of ``CASES`` builds its own bad input in a fresh directory and returns the command
line plus the names the message must contain. Bundles and certificates are made once per module.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID

from common import certs
from common.bundle import (
    BACKBONE_FILE,
    HEAD_FILE,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    SITE_STATS_FILE,
    manifest_to_bytes,
    sha256_bytes,
    state_to_bytes,
    write_bundle,
)
from common.config import Config, DataConfig, FederationConfig, ModelConfig
from common.data.heart import export_site_csv
from common.data.normalise import Normaliser
from common.data.preprocess import SiteStats
from common.data.splits import DataSpec
from common.manifest import make_manifest
from common.models import build_model, model_args, split_state
from common.signing import sign
from medfed.cli import EXIT_BAD_INPUT, main
from tests.conftest import HEART
from tests.limits import COMMAND_S

IMAGE_ROWS = 6  # images per bad npz: small, and more than one


@dataclass(frozen=True)
class Ctx:
    """What a case may use: a fresh directory, and read-only shared bundles and certificates."""

    tmp: Path
    heart_bundle: Path
    heart_csv: str  # Cleveland as `medfed export-heart` writes it
    cnn_bundle: Path
    signing_key: Ed25519PrivateKey
    signing_key_path: Path  # exists: commands given it create no key
    signing_pub: Path
    federation: Path  # `medfed certs init` output, with hospitals/hospital-a inside
    other_federation: Path  # a second, unrelated federation


@dataclass(frozen=True)
class Call:
    """A command line, where it must not write, and what its message must name."""

    argv: list[str]
    out: Path
    names: tuple[str, ...]


Builder = Callable[[Ctx], Call]


# ---------------------------------------------------------------------------- shared inputs


@pytest.fixture(scope="module")
def heart_csv(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("heart_csv") / "cleveland.csv"
    export_site_csv("cleveland", path)
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def cnn_bundle(tmp_path_factory: pytest.TempPathFactory, signing_key: Ed25519PrivateKey) -> Path:
    """A tiny untrained grey 28x28 CNN bundle (one conv block): enough to check inputs."""
    model_cfg = ModelConfig(family="cnn", channels=(4,))
    data_cfg = DataConfig(source="medmnist", medmnist="breast", normalisation="bundle")
    cfg = Config(name="tiny-cnn", model=model_cfg, federation=FederationConfig(data=data_cfg))
    spec = DataSpec("image", (1, 28, 28), 2, ("normal/benign", "malignant"))
    rng = np.random.default_rng(0)
    normaliser = SiteStats(Normaliser.fit(rng.random((8, 1, 28, 28))))
    model = build_model("cnn", spec.input_shape, 2, model_cfg)
    backbone, head = split_state(model)
    manifest = make_manifest(
        cfg, spec, normaliser, model_args("cnn", spec.input_shape, 2, model_cfg),
        version=0, round_num=0, strategy=None, metrics={}, sites=[], source="test",
    )
    out = tmp_path_factory.mktemp("cnn_bundle") / "bundle"
    write_bundle(out, backbone=backbone, head=head, manifest=manifest, signing_key=signing_key)
    return out


@pytest.fixture(scope="module")
def federations(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("federations")
    ours = certs.init_federation(root / "ours", ["localhost"], [])
    certs.init_hospital("hospital-a", ours.out / "hospitals", ours.out)
    other = certs.init_federation(root / "other", ["localhost"], [])
    certs.init_hospital("hospital-a", other.out / "hospitals", other.out)
    return ours.out, other.out


@pytest.fixture
def ctx(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    heart_bundle: Path,
    heart_csv: str,
    cnn_bundle: Path,
    signing_key: Ed25519PrivateKey,
    signing_key_path: Path,
    signing_pub_path: Path,
    federations: tuple[Path, Path],
) -> Ctx:
    home = tmp_path / "medfed-home"
    home.mkdir()
    # the federation's public key where a hospital's medfed looks for it by default
    shutil.copy2(signing_pub_path, home / "signing.pub")
    monkeypatch.setenv("MEDFED_HOME", str(home))
    return Ctx(tmp_path, heart_bundle, heart_csv, cnn_bundle, signing_key, signing_key_path,
               signing_pub_path, *federations)


# ---------------------------------------------------------------------------- config cases


def _pretrain(c: Ctx, config: Path, *overrides: str) -> list[str]:
    sets = [arg for text in overrides for arg in ("--set", text)]
    return ["pretrain", "--config", str(config), *sets, "--out", str(c.tmp / "bundle"),
            "--keys", str(c.tmp / "keys" / "signing.key")]


def _config_file(c: Ctx, content: bytes) -> Path:
    path = c.tmp / "experiment.yaml"
    path.write_bytes(content)
    return path


def config_unknown_key_in_file(c: Ctx) -> Call:
    path = _config_file(c, b"name: t\nmodel:\n  hiddn: [8]\n")
    return Call(_pretrain(c, path), c.tmp / "bundle", ("experiment.yaml", "model.hiddn"))


def config_unknown_key_in_set(c: Ctx) -> Call:
    argv = _pretrain(c, HEART, "federation.roundz=3")
    return Call(argv, c.tmp / "bundle", ("heart.yaml", "federation.roundz"))


def config_wrong_type(c: Ctx) -> Call:
    argv = _pretrain(c, HEART, "federation.rounds=three")
    return Call(argv, c.tmp / "bundle", ("federation.rounds", "integer"))


def config_missing_file(c: Ctx) -> Call:
    return Call(_pretrain(c, c.tmp / "nope.yaml"), c.tmp / "bundle", ("nope.yaml",))


def config_invalid_yaml(c: Ctx) -> Call:
    path = _config_file(c, b"name: t\nmodel: [unclosed\nseed: 1\n")
    return Call(_pretrain(c, path), c.tmp / "bundle", ("experiment.yaml", "YAML", "line"))


def config_not_utf8(c: Ctx) -> Call:
    path = _config_file(c, "name: caf\u00e9\n".encode("latin-1"))
    return Call(_pretrain(c, path), c.tmp / "bundle", ("experiment.yaml", "UTF-8"))


def config_bad_partition(c: Ctx) -> Call:
    argv = _pretrain(c, HEART, "federation.data.partition=dirichlet:x")
    return Call(argv, c.tmp / "bundle", ("federation.data.partition", "dirichlet:x"))


def config_unknown_strategy(c: Ctx) -> Call:
    argv = _pretrain(c, HEART, "federation.strategy.name=fedfoo")
    return Call(argv, c.tmp / "bundle", ("federation.strategy.name", "fedfoo"))


def config_unknown_family(c: Ctx) -> Call:
    argv = _pretrain(c, HEART, "model.family=transformer")
    return Call(argv, c.tmp / "bundle", ("model.family", "transformer"))


def config_bad_trainable(c: Ctx) -> Call:
    argv = _pretrain(c, HEART, "model.trainable=head+last-9")
    return Call(argv, c.tmp / "bundle", ("model.trainable", "head+last-9"))


def config_unknown_device(c: Ctx) -> Call:
    argv = _pretrain(c, HEART, "device=tpu")
    return Call(argv, c.tmp / "bundle", ("device", "tpu"))


def config_unknown_augmentation(c: Ctx) -> Call:
    argv = _pretrain(c, HEART, "pretrain.optim.augment=flip+blur")
    return Call(argv, c.tmp / "bundle", ("pretrain.optim.augment", "'blur'"))


def config_unknown_loss(c: Ctx) -> Call:
    argv = _pretrain(c, HEART, "federation.local.loss=focal")
    return Call(argv, c.tmp / "bundle", ("federation.local.loss", "focal"))


def config_backbone_lr_scale_not_positive(c: Ctx) -> Call:
    argv = _pretrain(c, HEART, "federation.local.backbone_lr_scale=0")
    return Call(argv, c.tmp / "bundle", ("federation.local.backbone_lr_scale", "more than 0"))


def config_negative_head_warmup(c: Ctx) -> Call:
    argv = _pretrain(c, HEART, "federation.head_warmup_rounds=-1")
    return Call(argv, c.tmp / "bundle", ("federation.head_warmup_rounds", "0 or more"))


def config_zero_batch_size(c: Ctx) -> Call:
    """Once accepted: every hospital then failed in round 1 with a traceback."""
    argv = _pretrain(c, HEART, "federation.local.batch_size=0")
    return Call(argv, c.tmp / "bundle", ("federation.local.batch_size", "at least 1", "got 0"))


def config_no_rounds(c: Ctx) -> Call:
    """Once accepted: the run published the starting model as if it had been trained."""
    argv = _pretrain(c, HEART, "federation.rounds=-1")
    return Call(argv, c.tmp / "bundle", ("federation.rounds", "at least 1", "got -1"))


def config_yaml_alias_bomb(c: Ctx) -> Call:
    """393 bytes of nested aliases once expanded to a 254 MB error line."""
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
              f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(8)]
    path = _config_file(c, ("\n".join(lines) + "\nname: *i\n").encode())
    return Call(_pretrain(c, path), c.tmp / "bundle", ("experiment.yaml", "anchor or alias"))


def config_huge_value_is_shown_short(c: Ctx) -> Call:
    path = _config_file(c, ("name: t\nseed: '" + "9" * 100_000 + "'\n").encode())
    return Call(_pretrain(c, path), c.tmp / "bundle", ("'seed'", "integer", "..."))


CONFIG_CASES: list[Builder] = [
    config_yaml_alias_bomb, config_huge_value_is_shown_short,
    config_unknown_key_in_file, config_unknown_key_in_set, config_wrong_type,
    config_missing_file, config_invalid_yaml, config_not_utf8, config_bad_partition,
    config_unknown_strategy, config_unknown_family, config_bad_trainable, config_unknown_device,
    config_unknown_augmentation, config_unknown_loss, config_backbone_lr_scale_not_positive,
    config_negative_head_warmup, config_zero_batch_size, config_no_rounds,
]


# ---------------------------------------------------------------------------- CSV cases


def _table(text: str) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(io.StringIO(text)))
    return rows[0], rows[1:]


def _csv(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    return buf.getvalue()


def _set_cell(text: str, column: str, value: str, row: int = 3) -> str:
    header, rows = _table(text)
    rows[row][header.index(column)] = value
    return _csv(header, rows)


def _drop_column(text: str, column: str) -> str:
    header, rows = _table(text)
    i = header.index(column)
    return _csv(header[:i] + header[i + 1:], [r[:i] + r[i + 1:] for r in rows])


def _add_column(text: str, column: str, value: str) -> str:
    header, rows = _table(text)
    return _csv([*header, column], [[*r, value] for r in rows])


def _rename_column(text: str, old: str, new: str) -> str:
    header, rows = _table(text)
    header[header.index(old)] = new
    return _csv(header, rows)


def _predict_argv(c: Ctx, data: Path, out: Path, model: Path | None = None,
                  pub: Path | None = None, stats: Path | None = None) -> list[str]:
    """`medfed predict` of `data` into `out` (the heart bundle unless `model` is given)."""
    return ["predict", "--model", str(model or c.heart_bundle), "--data", str(data), "--out",
            str(out), "--public-key", str(pub or c.signing_pub), "--device", "cpu",
            *(["--site-stats", str(stats)] if stats is not None else [])]


def _bundle_stats(c: Ctx, manifest: dict) -> Path:
    """The bundle's own statistics as a site_stats.json, standing in for a hospital's."""
    stats = c.tmp / "site_stats.json"
    stats.write_text(json.dumps({k: v for k, v in manifest["preprocessing"]["normalisation"].items()
                                 if k != "mode"}))
    return stats


def _break_line(text: str, row: int) -> str:
    """A lone carriage return after the first character of the file's row `row` (1: header),
    outside any quotes: read as a line break, it leaves that row one field."""
    lines = text.split("\n")
    lines[row - 1] = lines[row - 1][:1] + "\r" + lines[row - 1][1:]
    return "\n".join(lines)


def _locale_export(text: str) -> str:
    """The file as a spreadsheet in a decimal-comma locale saves it: ';' between fields,
    ',' before decimals."""
    header, rows = _table(text)
    return "".join(";".join(cell.replace(".", ",") for cell in row) + "\n"
                   for row in [header, *rows])


def _not_utf8(text: str) -> bytes:
    lines = text.encode("utf-8").split(b"\n")
    lines[4] = lines[4] + b"\xe9"  # a Latin-1 e-acute after the last cell of row 4
    return b"\n".join(lines)


# mutation of Cleveland's CSV -> (file bytes, names the message must contain)
CSV_MUTATIONS: dict[str, Callable[[str], tuple[bytes, tuple[str, ...]]]] = {
    "missing-column": lambda t: (_drop_column(t, "chol").encode(), ("'chol'", "missing")),
    "extra-column": lambda t: (_add_column(t, "bmi", "25").encode(), ("'bmi'", "unexpected")),
    # row 3 of the data is the file's (spreadsheet's) row 5: the header is row 1
    "text-in-numeric": lambda t: (_set_cell(t, "age", "old").encode(),
                                  ("'age'", "where a number", "(row 5)")),
    "out-of-range": lambda t: (_set_cell(t, "age", "150").encode(), ("'age'", "range", "(row 5)")),
    "column-name-case": lambda t: (_rename_column(t, "chol", "Chol").encode(),
                                   ("'chol'", "missing", "'Chol'")),
    "field-over-csv-limit": lambda t: (_set_cell(t, "age", "9" * 200_000).encode(),
                                       ("row 5", "not valid CSV")),
    "stray-carriage-return": lambda t: (_break_line(t, 5).encode(),
                                        ("row 5", "fields but the header")),
    "semicolon-separated": lambda t: (_locale_export(t).encode(),
                                      ("semicolon", "comma-separated")),
    "decimal-comma": lambda t: (_set_cell(t, "oldpeak", "2,3").encode(),
                                ("'oldpeak'", "decimal comma", "(row 5)")),
    "empty-file": lambda t: (b"", ("empty",)),
    "header-only": lambda t: (t.splitlines(keepends=True)[0].encode(), ("no data rows",)),
    "label-not-in-codes": lambda t: (_set_cell(t, "num", "7").encode(), ("'num'", "positive")),
    "not-utf8": lambda t: (_not_utf8(t), ("UTF-8",)),
    "duplicated-header": lambda t: (_rename_column(t, "chol", "age").encode(),
                                    ("'age'", "more than once")),
    "unknown-category": lambda t: (_set_cell(t, "cp", "9").encode(), ("'cp'", "code")),
    "spreadsheet-error": lambda t: (_set_cell(t, "chol", "#N/A").encode(),
                                    ("'chol'", "(row 5)", "spreadsheet errors", "#N/A")),
    "column-name-with-unit": lambda t: (_rename_column(t, "chol", "chol (mg/dl)").encode(),
                                        ("'chol'", "missing", "'chol (mg/dl)'")),
    "unnamed-column-with-values": lambda t: (_add_column(t, "", "1").encode(), (
        f"column {len(_table(t)[0]) + 1} has no name", "name it or delete it")),
}


# how a hospital file is read: as `medfed client` would (check-data --purpose training), by
# `medfed predict`, and by check-data --purpose prediction (which must agree with predict)
CSV_READERS = ("check-training", "predict", "check-prediction")


def _csv_case(mutation: str, reader: str) -> Builder:
    def build(c: Ctx) -> Call:
        content, names = CSV_MUTATIONS[mutation](c.heart_csv)
        data = c.tmp / "hospital.csv"
        data.write_bytes(content)
        out = c.tmp / "preds.csv"
        if reader == "predict":
            argv = _predict_argv(c, data, out)
        else:
            argv = ["check-data", "--model", str(c.heart_bundle), "--data", str(data),
                    "--purpose", reader.removeprefix("check-")]
        return Call(argv, out, ("hospital.csv", *names))

    build.__name__ = f"csv_{mutation}_{reader}"
    return build


def csv_one_class_source_for_pretrain(c: Ctx) -> Call:
    """A federated site may hold one class (check-data only warns); a pretraining source not."""
    header, rows = _table(c.heart_csv)
    label = header.index("num")
    data = c.tmp / "positives.csv"
    data.write_text(_csv(header, [r for r in rows if r[label] != "0"]), encoding="utf-8")
    schema = c.tmp / "schema.yaml"
    manifest = json.loads((c.heart_bundle / MANIFEST_FILE).read_bytes())
    schema.write_text(json.dumps(manifest["preprocessing"]["schema"]), encoding="utf-8")
    config = _config_file(c, json.dumps({
        "name": "one-class", "model": {"family": "mlp", "hidden": [8]},
        "pretrain": {"data": {"source": "csv", "csv_paths": [str(data)],
                              "csv_schema": str(schema)}},
    }).encode())
    argv = ["pretrain", "--config", str(config), "--out", str(c.tmp / "bundle"),
            "--keys", str(c.signing_key_path)]
    return Call(argv, c.tmp / "bundle", ("positives.csv", "pretrain.data", "two classes"))


def _own_data(c: Ctx, schema: dict, train: str, test: str | None = None, *,
              command: str = "pretrain") -> list[str]:
    """A csv-source experiment (pretrain, or simulate with it as the federation data)."""
    (c.tmp / "schema.yaml").write_text(json.dumps(schema), encoding="utf-8")
    (c.tmp / "site.csv").write_text(train, encoding="utf-8")
    data: dict = {"source": "csv", "csv_paths": [str(c.tmp / "site.csv")],
                  "csv_schema": str(c.tmp / "schema.yaml")}
    if test is not None:
        (c.tmp / "test.csv").write_text(test, encoding="utf-8")
        data["test_paths"] = [str(c.tmp / "test.csv")]
    section = "pretrain" if command == "pretrain" else "federation"
    config = _config_file(c, json.dumps({"name": "own", "model": {"hidden": [8]},
                                         section: {"data": data}}).encode())
    if command == "pretrain":
        return ["pretrain", "--config", str(config), "--out", str(c.tmp / "bundle"),
                "--keys", str(c.tmp / "keys" / "signing.key")]
    return ["simulate", "--config", str(config), "--bundle", str(c.heart_bundle), "--out",
            str(c.tmp / "bundle"), "--keys", str(c.tmp / "keys" / "signing.key")]


def _heart_schema(c: Ctx) -> dict:
    manifest = json.loads((c.heart_bundle / MANIFEST_FILE).read_bytes())
    return dict(manifest["preprocessing"]["schema"])


def own_schema_does_not_match_the_csv(c: Ctx) -> Call:
    schema = _heart_schema(c)
    schema["columns"] = [*schema["columns"], {"name": "bmi", "type": "numeric"}]
    return Call(_own_data(c, schema, c.heart_csv), c.tmp / "bundle",
                ("site.csv", "'bmi'", "missing"))


def own_schema_imputes_the_label(c: Ctx) -> Call:
    schema = _heart_schema(c)
    schema["columns"] = [*schema["columns"], {"name": "num", "type": "numeric",
                                              "missing": "median"}]
    return Call(_own_data(c, schema, c.heart_csv), c.tmp / "bundle",
                ("schema.yaml", "'num'", "label", "cannot be imputed"))


def own_test_file_with_other_columns(c: Ctx) -> Call:
    test = _add_column(c.heart_csv, "bmi", "25")
    return Call(_own_data(c, _heart_schema(c), c.heart_csv, test), c.tmp / "bundle",
                ("test.csv", "'bmi'", "unexpected"))


def own_site_too_small_for_a_validation_split(c: Ctx) -> Call:
    header, rows = _table(c.heart_csv)
    tiny = _csv(header, rows[:2])  # 2 rows: train and test, no room for validation
    return Call(_own_data(c, _heart_schema(c), tiny, command="simulate"), c.tmp / "bundle",
                ("site 'site'", "too few", "validation"))


def own_trailing_comma_on_every_row(c: Ctx) -> Call:
    shifted = "\n".join(line + "," if i else line
                        for i, line in enumerate(c.heart_csv.strip().splitlines())) + "\n"
    return Call(_own_data(c, _heart_schema(c), shifted), c.tmp / "bundle",
                ("site.csv", "row 2", "fields", "header"))


def _simulate_heart(c: Ctx, *overrides: str) -> list[str]:
    sets = [arg for text in overrides for arg in ("--set", text)]
    return ["simulate", "--config", str(HEART), *sets, "--bundle", str(c.heart_bundle),
            "--out", str(c.tmp / "run"), "--keys", str(c.tmp / "keys" / "signing.key")]


def heldout_file_missing(c: Ctx) -> Call:
    argv = _simulate_heart(c, f"federation.heldout=file:{c.tmp / 'nope.csv'}")
    return Call(argv, c.tmp / "run", ("federation.heldout", "nope.csv", "does not exist"))


def heldout_file_with_a_missing_column(c: Ctx) -> Call:
    path = c.tmp / "operator.csv"
    path.write_text(_drop_column(c.heart_csv, "chol"), encoding="utf-8")
    argv = _simulate_heart(c, f"federation.heldout=file:{path}")
    return Call(argv, c.tmp / "run", ("operator.csv", "'chol'", "missing"))


def simulate_waits_for_more_hospitals_than_it_has(c: Ctx) -> Call:
    """Once accepted: the first round waited for hospitals that never joined, until the round
    timeout."""
    argv = _simulate_heart(c, "federation.strategy.min_nodes=5")
    return Call(argv, c.tmp / "run", ("federation.strategy.min_nodes", "is 5",
                                      "the simulation has 4 hospitals", "at most 4"))


def simulate_secagg_shares_above_the_hospitals_sampled(c: Ctx) -> Call:
    """Once found in the ServerApp, after Flower's runtime had started: a traceback, exit 1."""
    argv = _simulate_heart(c, "federation.privacy.secure_aggregation=true",
                           "federation.privacy.secagg_num_shares=5")
    return Call(argv, c.tmp / "run", ("federation.privacy.secagg_num_shares", "is 5",
                                      "at most 4"))


def simulate_more_cores_per_hospital_than_the_machine_has(c: Ctx) -> Call:
    """Once: Ray waited for ever for a worker it could never place (0 and -1 hung too)."""
    cores = os.cpu_count() or 1
    argv = [*_simulate_heart(c), "--cpus-per-client", str(cores + 1)]
    return Call(argv, c.tmp / "run", ("--cpus-per-client", f"at most the {cores} CPU cores",
                                      f"got {cores + 1}"))


def simulate_no_hospitals(c: Ctx) -> Call:
    argv = [*_simulate_heart(c), "--partition", "iid", "--hospitals", "0"]
    return Call(argv, c.tmp / "run", ("--hospitals", "at least 1", "got 0"))


def simulate_cuda_without_a_gpu(c: Ctx) -> Call:
    """Stops before Ray starts, not in every hospital's first round (cuda:99: missing on a
    GPU machine too)."""
    argv = [*_simulate_heart(c), "--device", "cuda:99"]
    return Call(argv, c.tmp / "run", ("device 'cuda:99' was requested",))


def heldout_unknown_mode(c: Ctx) -> Call:
    argv = _simulate_heart(c, "federation.heldout=pooled-test")
    return Call(argv, c.tmp / "run", ("federation.heldout", "pooled-test"))


def _hospital_csv(c: Ctx) -> Path:
    data = c.tmp / "hospital.csv"
    data.write_text(c.heart_csv, encoding="utf-8")
    return data


def predict_out_is_the_data_file(c: Ctx) -> Call:
    """Writing the predictions over the patients' file would destroy it."""
    data = _hospital_csv(c)
    return Call(_predict_argv(c, data, data), c.tmp / "nothing",
                ("hospital.csv", "an input file", "another output"))


def predict_out_is_a_directory(c: Ctx) -> Call:
    """Once: an IsADirectoryError traceback, after every prediction was computed."""
    (c.tmp / "preds").mkdir()
    return Call(_predict_argv(c, _hospital_csv(c), c.tmp / "preds"), c.tmp / "nothing",
                ("preds", "is a directory where a file is written"))


def simulate_out_is_a_file(c: Ctx) -> Call:
    """Once: '[Errno 17] File exists: ...'."""
    (c.tmp / "run").write_text("")
    return Call(_simulate_heart(c), c.tmp / "nothing",
                ("--out", "run is a file; give a directory"))


def export_heart_under_a_file(c: Ctx) -> Call:
    (c.tmp / "data").write_text("")
    argv = ["export-heart", "--out", str(c.tmp / "data" / "heart")]
    return Call(argv, c.tmp / "data" / "heart", ("data/heart", "a part of this path is a file"))


def predict_out_is_a_link_to_the_data_file(c: Ctx) -> Call:
    data = _hospital_csv(c)
    link = c.tmp / "preds.csv"
    os.link(data, link)  # another name, the same file
    return Call(_predict_argv(c, data, link), c.tmp / "nothing",
                ("preds.csv", "the input file", "hospital.csv"))


def evaluate_out_is_the_data_file(c: Ctx) -> Call:
    data = _hospital_csv(c)
    argv = ["evaluate", "--model", str(c.heart_bundle), "--data", str(data), "--out", str(data),
            "--public-key", str(c.signing_pub)]
    return Call(argv, c.tmp / "nothing", ("hospital.csv", "input file"))


def evaluate_out_is_the_site_stats_file(c: Ctx) -> Call:
    """Once: exit 0, and the hospital's site_stats.json replaced by the report."""
    stats = _bundle_stats(c, json.loads((c.heart_bundle / MANIFEST_FILE).read_bytes()))
    argv = ["evaluate", "--model", str(c.heart_bundle), "--data", str(_hospital_csv(c)),
            "--site-stats", str(stats), "--out", str(stats), "--public-key", str(c.signing_pub),
            "--bootstrap", "10"]
    return Call(argv, c.tmp / "nothing", ("site_stats.json", "input file"))


def predict_out_is_a_file_of_the_model(c: Ctx) -> Call:
    """Once: exit 0, and the bundle's manifest replaced by predictions (it no longer loads)."""
    model = _bundle_copy(c)
    stats = _bundle_stats(c, json.loads((model / MANIFEST_FILE).read_bytes()))
    return Call(_predict_argv(c, _hospital_csv(c), model / MANIFEST_FILE, model, stats=stats),
                c.tmp / "nothing", ("manifest.json", "inside the model directory"))


def evaluate_out_is_inside_the_model(c: Ctx) -> Call:
    """A report (and its plots) written into the signed bundle's own directory."""
    model = _bundle_copy(c)
    stats = _bundle_stats(c, json.loads((model / MANIFEST_FILE).read_bytes()))
    argv = ["evaluate", "--model", str(model), "--data", str(_hospital_csv(c)),
            "--site-stats", str(stats), "--out", str(model / "report.json"),
            "--public-key", str(c.signing_pub), "--bootstrap", "10"]
    return Call(argv, model / "report.json", ("report.json", "inside the model directory"))


def evaluate_bootstrap_beyond_reason(c: Ctx) -> Call:
    """Once: 10**11 resamples tried to allocate 220 TiB and ended in a MemoryError traceback."""
    argv = ["evaluate", "--model", str(c.heart_bundle), "--data", str(_hospital_csv(c)),
            "--out", str(c.tmp / "report"), "--public-key", str(c.signing_pub),
            "--bootstrap", str(10**11)]
    return Call(argv, c.tmp / "report", ("--bootstrap", "1..100000", str(10**11)))


def evaluate_negative_seed(c: Ctx) -> Call:
    """Once: NumPy's own 'expected non-negative integer', naming no flag."""
    argv = ["evaluate", "--model", str(c.heart_bundle), "--data", str(_hospital_csv(c)),
            "--out", str(c.tmp / "report"), "--public-key", str(c.signing_pub), "--seed", "-1"]
    return Call(argv, c.tmp / "report", ("--seed", "got -1"))


def schema_out_is_a_data_file_even_with_force(c: Ctx) -> Call:
    data = _hospital_csv(c)
    argv = ["schema", "--data", str(data), "--label", "num", "--out", str(data), "--force"]
    return Call(argv, c.tmp / "nothing", ("hospital.csv", "input file"))


CSV_CASES: list[Builder] = [
    predict_out_is_the_data_file, predict_out_is_a_link_to_the_data_file,
    predict_out_is_a_directory, simulate_out_is_a_file, export_heart_under_a_file,
    evaluate_out_is_the_data_file, schema_out_is_a_data_file_even_with_force,
    evaluate_out_is_the_site_stats_file, predict_out_is_a_file_of_the_model,
    evaluate_out_is_inside_the_model,
    evaluate_bootstrap_beyond_reason, evaluate_negative_seed,
    heldout_file_missing, heldout_file_with_a_missing_column, heldout_unknown_mode,
    simulate_waits_for_more_hospitals_than_it_has, simulate_no_hospitals,
    simulate_secagg_shares_above_the_hospitals_sampled,
    simulate_more_cores_per_hospital_than_the_machine_has,
    simulate_cuda_without_a_gpu,
    *(_csv_case(m, r) for r in CSV_READERS for m in CSV_MUTATIONS),
    csv_one_class_source_for_pretrain, own_schema_does_not_match_the_csv,
    own_schema_imputes_the_label, own_test_file_with_other_columns,
    own_site_too_small_for_a_validation_split, own_trailing_comma_on_every_row,
]


# ---------------------------------------------------------------------------- image cases


def _npz(path: Path, images: np.ndarray | None, allow_pickle: bool = False) -> None:
    if images is None:
        np.savez(path)
        return
    labels = np.arange(len(images)) % 2
    with open(path, "wb") as handle:
        np.savez(handle, images=images, labels=labels, allow_pickle=allow_pickle)


def _truncated(path: Path) -> None:
    _npz(path, np.zeros((IMAGE_ROWS, 28, 28), np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flipped_byte(path: Path) -> None:
    _npz(path, np.zeros((IMAGE_ROWS, 28, 28), np.uint8))
    _flip_byte(path, 400)  # inside the image data: the zip member's CRC no longer matches


def _object_images(path: Path) -> None:
    images = np.empty((IMAGE_ROWS,), dtype=object)
    images[:] = [np.zeros((28, 28), np.uint8) for _ in range(IMAGE_ROWS)]
    np.savez(path, images=images, labels=np.zeros(IMAGE_ROWS, np.int64))


# bad image file -> (writer, names the message must contain)
IMAGE_MUTATIONS: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "wrong-size": (lambda p: _npz(p, np.zeros((IMAGE_ROWS, 32, 32), np.uint8)),
                   ("(1, 32, 32)", "(1, 28, 28)")),
    "rgb-for-grey": (lambda p: _npz(p, np.zeros((IMAGE_ROWS, 28, 28, 3), np.uint8)),
                     ("(3, 28, 28)", "(1, 28, 28)")),
    "string-dtype": (lambda p: _npz(p, np.full((IMAGE_ROWS, 28, 28), "x")), ("dtype",)),
    "complex-dtype": (lambda p: _npz(p, np.zeros((IMAGE_ROWS, 28, 28), np.complex64)),
                      ("complex64",)),
    "object-dtype": (_object_images, ("pickle",)),
    "truncated": (_truncated, ("npz", "corrupt")),
    "flipped-byte": (_flipped_byte, ("npz", "corrupt")),
    "empty-npz": (lambda p: _npz(p, None), ("npz",)),
}


def _image_case(mutation: str, purpose: str) -> Builder:
    def build(c: Ctx) -> Call:
        writer, names = IMAGE_MUTATIONS[mutation]
        data = c.tmp / "scans.npz"
        writer(data)
        out = c.tmp / "preds.csv"
        if purpose == "training":
            argv = ["check-data", "--model", str(c.cnn_bundle), "--data", str(data)]
        else:
            argv = ["predict", "--model", str(c.cnn_bundle), "--data", str(data),
                    "--out", str(out), "--device", "cpu"]
        return Call(argv, out, ("scans.npz", *names))

    build.__name__ = f"image_{mutation}_{purpose}"
    return build


def _npz_bomb(path: Path) -> None:
    """A 200-byte npz whose header promises 4 GB of images (never decompressed)."""
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (400000, 100, 100)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("images.npy", header.getvalue() + bytes(1000))
        archive.writestr("labels.npy", header.getvalue() + bytes(10))


IMAGE_MUTATIONS["decompression-bomb"] = (_npz_bomb, ("GiB once decompressed", "refused"))


def image_png_too_large(c: Ctx) -> Call:
    from PIL import Image

    folder = c.tmp / "scans"
    folder.mkdir()
    Image.new("L", (5000, 5000)).save(folder / "big.png")  # 25 Mpixel, a few KB on disk
    out = c.tmp / "preds.csv"
    argv = ["predict", "--model", str(c.cnn_bundle), "--data", str(folder), "--out", str(out),
            "--device", "cpu"]
    return Call(argv, out, ("big.png", "5000x5000", "refused"))


IMAGE_CASES: list[Builder] = [
    *(_image_case(m, p) for p in ("training", "prediction") for m in IMAGE_MUTATIONS),
    image_png_too_large,
]


# ---------------------------------------------------------------------------- bundle cases


def _bundle_copy(c: Ctx) -> Path:
    model = c.tmp / "model"
    shutil.copytree(c.heart_bundle, model)
    return model


def _predict(c: Ctx, model: Path, pub: Path | None = None) -> list[str]:
    data = c.tmp / "new.csv"
    data.write_text(c.heart_csv, encoding="utf-8")
    return _predict_argv(c, data, c.tmp / "preds.csv", model, pub)


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _resign(c: Ctx, model: Path, backbone: bytes | None = None,
            manifest_bytes: bytes | None = None) -> None:
    """Replace the backbone (or the manifest bytes) and sign as the real server would."""
    if backbone is not None:
        (model / BACKBONE_FILE).write_bytes(backbone)
        manifest = json.loads((model / MANIFEST_FILE).read_bytes())
        manifest["files"][BACKBONE_FILE] = manifest["backbone_sha256"] = sha256_bytes(backbone)
        manifest_bytes = manifest_to_bytes(manifest)
    assert manifest_bytes is not None
    (model / MANIFEST_FILE).write_bytes(manifest_bytes)
    (model / SIGNATURE_FILE).write_bytes(sign(c.signing_key, manifest_bytes))


def bundle_missing_head(c: Ctx) -> Call:
    model = _bundle_copy(c)
    (model / HEAD_FILE).unlink()
    return Call(_predict(c, model), c.tmp / "preds.csv", ("model", HEAD_FILE, "missing"))


def bundle_flipped_head_byte(c: Ctx) -> Call:
    model = _bundle_copy(c)
    _flip_byte(model / HEAD_FILE, -5)
    return Call(_predict(c, model), c.tmp / "preds.csv", (HEAD_FILE, "sha256"))


def bundle_flipped_backbone_byte(c: Ctx) -> Call:
    model = _bundle_copy(c)
    _flip_byte(model / BACKBONE_FILE, -5)
    return Call(_predict(c, model), c.tmp / "preds.csv", (BACKBONE_FILE, "sha256"))


def bundle_flipped_manifest_byte(c: Ctx) -> Call:
    model = _bundle_copy(c)
    _flip_byte(model / MANIFEST_FILE, 40)
    return Call(_predict(c, model), c.tmp / "preds.csv", (MANIFEST_FILE, "signature"))


def bundle_wrong_public_key(c: Ctx) -> Call:
    model = _bundle_copy(c)
    pub = c.tmp / "stranger.pub"
    pub.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return Call(_predict(c, model, pub), c.tmp / "preds.csv", (MANIFEST_FILE, "signature"))


def bundle_incompatible_backbone(c: Ctx) -> Call:
    model = _bundle_copy(c)
    narrow = build_model("mlp", (13,), 2, ModelConfig(hidden=(8,)))  # the bundle's is 16 wide
    _resign(c, model, backbone=state_to_bytes(split_state(narrow)[0]))
    names = ("backbone.0.1.weight", "(8, 13)", "(16, 13)")
    return Call(_predict(c, model), c.tmp / "preds.csv", names)


def bundle_backbone_missing_tensor(c: Ctx) -> Call:
    model = _bundle_copy(c)
    wide = build_model("mlp", (13,), 2, ModelConfig(hidden=(16,)))
    backbone = split_state(wide)[0]
    del backbone["backbone.0.1.bias"]
    _resign(c, model, backbone=state_to_bytes(backbone))
    return Call(_predict(c, model), c.tmp / "preds.csv", ("backbone.0.1.bias", "missing"))


def bundle_manifest_not_json(c: Ctx) -> Call:
    model = _bundle_copy(c)
    _resign(c, model, manifest_bytes=b"{'format': 1,")  # signed, but not JSON
    return Call(_predict(c, model), c.tmp / "preds.csv", (MANIFEST_FILE, "JSON"))


def _forge(c: Ctx) -> Path:
    """Weights and their hash changed together, the manifest NOT re-signed."""
    model = _bundle_copy(c)
    wide = build_model("mlp", (13,), 2, ModelConfig(hidden=(16,)))
    backbone = state_to_bytes(split_state(wide)[0])
    (model / BACKBONE_FILE).write_bytes(backbone)
    manifest = json.loads((model / MANIFEST_FILE).read_bytes())
    manifest["files"][BACKBONE_FILE] = manifest["backbone_sha256"] = sha256_bytes(backbone)
    (model / MANIFEST_FILE).write_bytes(manifest_to_bytes(manifest))
    return model


def bundle_forged_predict_without_any_flag(c: Ctx) -> Call:
    argv = [a for a in _predict(c, _forge(c)) if a != str(c.signing_pub)]
    argv.remove("--public-key")  # the key comes from $MEDFED_HOME/signing.pub by default
    return Call(argv, c.tmp / "preds.csv", (MANIFEST_FILE, "signature"))


def bundle_forged_check_data_and_model_card(c: Ctx) -> Call:
    return Call(["model-card", "--model", str(_forge(c))], c.tmp / "preds.csv",
                (MANIFEST_FILE, "signature"))


def bundle_absurd_model_arguments(c: Ctx) -> Call:
    """A correctly signed manifest asking for a 2^31-unit layer is refused before building."""
    model = _bundle_copy(c)
    manifest = json.loads((model / MANIFEST_FILE).read_bytes())
    manifest["model"]["hidden"] = [2147483648]
    _resign(c, model, manifest_bytes=manifest_to_bytes(manifest))
    return Call(_predict(c, model), c.tmp / "preds.csv", ("'hidden'", "widths", "8192"))


def predict_unknown_device(c: Ctx) -> Call:
    argv = [*_predict(c, c.heart_bundle)[:-1], "tpu"]
    return Call(argv, c.tmp / "preds.csv", ("device", "tpu"))


BUNDLE_CASES: list[Builder] = [
    bundle_missing_head, bundle_flipped_head_byte, bundle_flipped_backbone_byte,
    bundle_flipped_manifest_byte, bundle_wrong_public_key, bundle_incompatible_backbone,
    bundle_backbone_missing_tensor, bundle_manifest_not_json, bundle_absurd_model_arguments,
    bundle_forged_predict_without_any_flag, bundle_forged_check_data_and_model_card,
    predict_unknown_device,
]


# ---------------------------------------------------------------------------- certificate cases


def _server(c: Ctx, certs_dir: Path) -> list[str]:
    return ["server", "--config", str(HEART), "--bundle", str(c.heart_bundle), "--certs",
            str(certs_dir), "--run-dir", str(c.tmp / "run"), "--exit-after-run"]


def _client(c: Ctx, hospital: Path, device: str = "cpu", server: str = "127.0.0.1:9"
            ) -> list[str]:
    data = c.tmp / "hospital.csv"
    data.write_text(c.heart_csv, encoding="utf-8")
    return ["client", "--server", server, "--data", str(data), "--certs", str(hospital),
            "--name", "hospital-a", "--workdir", str(c.tmp / "work"), "--max-retries", "1",
            "--device", device]


def _server_certs(c: Ctx) -> Path:
    out = c.tmp / "certs"
    shutil.copytree(c.federation, out, ignore=shutil.ignore_patterns("hospitals"))
    return out


def _hospital_certs(c: Ctx) -> Path:
    out = c.tmp / "hospital-a"
    shutil.copytree(c.federation / "hospitals" / "hospital-a", out)
    return out


def server_expired_certificate(c: Ctx) -> Call:
    out = _server_certs(c)
    fed = certs.FederationPaths(out)
    ca_key = serialization.load_pem_private_key(fed.ca_key.read_bytes(), None)
    server_key = serialization.load_pem_private_key(fed.server_key.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    assert isinstance(server_key, ec.EllipticCurvePrivateKey)
    expired = certs._issue(
        certs.load_certificate(fed.ca_cert, "CA"), ca_key, server_key.public_key(), "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH, days=30, now=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
    )
    fed.server_cert.write_bytes(certs._cert_pem(expired))
    return Call(_server(c, out), c.tmp / "run", ("server.pem", "expired"))


def server_certificate_from_other_ca(c: Ctx) -> Call:
    out = _server_certs(c)
    for name in ("server.pem", "server.key"):
        shutil.copy2(c.other_federation / name, out / name)
    return Call(_server(c, out), c.tmp / "run", ("server.pem", "ca.crt", "not issued"))


def server_certificate_made_for_a_hospital(c: Ctx) -> Call:
    """Once: accepted, the registry started, and every hospital's pull then failed with
    'unsuitable certificate purpose'."""
    out = _server_certs(c)
    hospital = c.federation / "hospitals" / "hospital-a"
    shutil.copy2(hospital / "client.pem", out / "server.pem")
    shutil.copy2(hospital / "client.key", out / "server.key")
    hospitals = c.tmp / "hospitals.yaml"
    hospitals.write_text(f"- name: hospital-a\n  public_key: {hospital / 'node_key.pub'}\n")
    argv = [*_server(c, out), "--hospitals", str(hospitals),
            "--set", "federation.strategy.min_nodes=1"]
    return Call(argv, c.tmp / "run", ("server.pem", "not marked for TLS servers"))


def server_key_readable_by_others(c: Ctx) -> Call:
    out = _server_certs(c)
    (out / "server.key").chmod(0o644)
    return Call(_server(c, out), c.tmp / "run", ("server.key", "0644", "0600"))


def client_certificate_from_other_ca(c: Ctx) -> Call:
    hospital = _hospital_certs(c)
    shutil.copy2(c.other_federation / "ca.crt", hospital / "ca.crt")
    return Call(_client(c, hospital), c.tmp / "work", ("client.pem", "ca.crt", "not issued"))


def client_node_key_readable_by_others(c: Ctx) -> Call:
    hospital = _hospital_certs(c)
    (hospital / "node_key").chmod(0o644)
    return Call(_client(c, hospital), c.tmp / "work", ("node_key", "0644", "0600"))


def client_unknown_device(c: Ctx) -> Call:
    """Valid certificates, but a device the ClientApp would only reject in round 1."""
    argv = _client(c, _hospital_certs(c), device="tpu")
    return Call(argv, c.tmp / "work", ("device", "tpu"))


def client_server_given_as_a_url(c: Ctx) -> Call:
    """Once: flower-supernode started and exited 1, pointing at its log."""
    argv = _client(c, _hospital_certs(c), server="https://127.0.0.1:9092")
    return Call(argv, c.tmp / "work", ("--server", "https://127.0.0.1:9092", "no https://"))


def client_server_without_a_port(c: Ctx) -> Call:
    """Once: 'cannot reach the server at 127.0.0.1 for 600 s' after retries."""
    argv = _client(c, _hospital_certs(c), server="127.0.0.1")
    return Call(argv, c.tmp / "work", ("--server", "'127.0.0.1'", "has no port"))


def client_workdir_is_a_file(c: Ctx) -> Call:
    """Once: '[Errno 17] File exists'."""
    (c.tmp / "afile").write_text("")
    argv = [*_client(c, _hospital_certs(c)), "--workdir", str(c.tmp / "afile")]
    return Call(argv, c.tmp / "work", ("--workdir", "afile", "is a file"))


def client_negative_give_up_after(c: Ctx) -> Call:
    argv = [*_client(c, _hospital_certs(c)), "--give-up-after", "-5"]
    return Call(argv, c.tmp / "work", ("--give-up-after", "0 or more", "got -5"))


def certs_hospital_name_with_a_newline(c: Ctx) -> Call:
    argv = ["certs", "hospital", "--name", "hospital-a\n", "--out", str(c.tmp / "h"),
            "--ca", str(c.federation)]
    return Call(argv, c.tmp / "h", ("hospital-a",))


def certs_server_name_with_a_newline(c: Ctx) -> Call:
    argv = ["certs", "init", "--out", str(c.tmp / "fed"), "--server-name", "fl.example.org\n"]
    return Call(argv, c.tmp / "fed", ("fl.example.org",))


def server_hospitals_file_with_a_bad_name(c: Ctx) -> Call:
    hospitals = c.tmp / "hospitals.yaml"
    pub = c.federation / "hospitals" / "hospital-a" / "node_key.pub"
    hospitals.write_text(f'- name: "hospital-a\\n12:00 ok"\n  public_key: {pub}\n')
    out = _server_certs(c)
    argv = [*_server(c, out), "--hospitals", str(hospitals)]
    return Call(argv, c.tmp / "run", ("hospitals.yaml", "entry 0", "lowercase letters"))


@dataclass(frozen=True)
class _ServerFlag:
    flag: str
    value: str
    names: tuple[str, ...]


def _server_with(c: Ctx, case: _ServerFlag) -> Call:
    """A server start whose only fault is `case` (hospital-a enrolled, waited for alone)."""
    hospitals = c.tmp / "hospitals.yaml"
    pub = c.federation / "hospitals" / "hospital-a" / "node_key.pub"
    hospitals.write_text(f"- name: hospital-a\n  public_key: {pub}\n")
    argv = [*_server(c, _server_certs(c)), "--hospitals", str(hospitals),
            "--set", "federation.strategy.min_nodes=1", case.flag, case.value]
    return Call(argv, c.tmp / "run", case.names)


def server_tls_without_hospitals(c: Ctx) -> Call:
    """Once: the server started and waited for hospitals none of which could join."""
    return Call(_server(c, _server_certs(c)), c.tmp / "run",
                ("--certs", "no --hospitals file is given"))


def server_port_out_of_range(c: Ctx) -> Call:
    """Once: an OverflowError traceback from bind()."""
    return _server_with(c, _ServerFlag("--port", "70000",
                                       ("port 70000", "(--port)", "outside 1-65535")))


def server_host_not_of_this_machine(c: Ctx) -> Call:
    """Once: 'port … is in use, perhaps by another medfed server'."""
    return _server_with(c, _ServerFlag("--host", "192.0.2.1",
                                       ("192.0.2.1", "not an address of this machine")))


def _server_enrolling_b_with(c: Ctx, key_of_b: Path, names: tuple[str, ...]) -> Call:
    """A server start enrolling hospital-a (its own key) and hospital-b with `key_of_b`."""
    hospitals = c.tmp / "hospitals.yaml"
    pub = c.federation / "hospitals" / "hospital-a" / "node_key.pub"
    hospitals.write_text(f"- name: hospital-a\n  public_key: {pub}\n"
                         f"- name: hospital-b\n  public_key: {key_of_b}\n")
    argv = [*_server(c, _server_certs(c)), "--hospitals", str(hospitals),
            "--set", "federation.strategy.min_nodes=2"]
    return Call(argv, c.tmp / "run", ("hospitals.yaml", *names))


def server_hospitals_file_with_a_certificate_as_a_node_key(c: Ctx) -> Call:
    """Once: the SuperLink started, registered the hospitals before it, then stopped,
    leaving a run directory whose registrations a second start could not name."""
    return _server_enrolling_b_with(c, c.federation / "ca.crt",
                                    ("ca.crt", "'hospital-b'", "not an OpenSSH public key"))


def server_hospitals_file_with_one_key_twice(c: Ctx) -> Call:
    """Once: accepted; only one node could join, so the first round waited for ever."""
    return _server_enrolling_b_with(
        c, c.federation / "hospitals" / "hospital-a" / "node_key.pub",
        ("'hospital-b' has the same public key as 'hospital-a'",))


def server_waits_for_more_hospitals_than_it_enrols(c: Ctx) -> Call:
    """With node authentication only enrolled hospitals join: heart.yaml waits for 4."""
    hospitals = c.tmp / "hospitals.yaml"
    pub = c.federation / "hospitals" / "hospital-a" / "node_key.pub"
    hospitals.write_text(f"- name: hospital-a\n  public_key: {pub}\n")
    argv = [*_server(c, _server_certs(c)), "--hospitals", str(hospitals)]
    return Call(argv, c.tmp / "run", ("federation.strategy.min_nodes", "is 4",
                                      "hospitals.yaml enrols 1 hospital:", "at most 1"))


CERT_CASES: list[Builder] = [
    certs_hospital_name_with_a_newline, certs_server_name_with_a_newline,
    server_hospitals_file_with_a_bad_name, server_waits_for_more_hospitals_than_it_enrols,
    server_hospitals_file_with_a_certificate_as_a_node_key,
    server_hospitals_file_with_one_key_twice, server_certificate_made_for_a_hospital,
    server_port_out_of_range, server_host_not_of_this_machine, server_tls_without_hospitals,
    server_expired_certificate, server_certificate_from_other_ca, server_key_readable_by_others,
    client_certificate_from_other_ca, client_node_key_readable_by_others, client_unknown_device,
    client_server_given_as_a_url, client_server_without_a_port, client_workdir_is_a_file,
    client_negative_give_up_after,
]


def report_of_a_directory_that_is_no_run(c: Ctx) -> Call:
    (c.tmp / "notarun").mkdir(exist_ok=True)
    argv = ["report", str(c.tmp / "notarun"), "--out", str(c.tmp / "report.html")]
    return Call(argv, c.tmp / "report.html", ("notarun", "not a run directory"))


def console_over_a_missing_directory(c: Ctx) -> Call:
    argv = ["console", "--runs", str(c.tmp / "no-runs"), "--port", "1"]
    return Call(argv, c.tmp / "no-runs", ("no-runs", "not a directory"))


CONSOLE_CASES: list[Builder] = [report_of_a_directory_that_is_no_run,
                                console_over_a_missing_directory]


# ---------------------------------------------------------------------------- the matrix

CASES: list[Builder] = (CONFIG_CASES + CSV_CASES + IMAGE_CASES + BUNDLE_CASES + CERT_CASES
                         + CONSOLE_CASES)


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for directories)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
            for p in sorted(root.rglob("*"))}


def test_the_matrix_has_at_least_30_distinct_cases() -> None:
    names = [b.__name__ for b in CASES]
    assert len(set(names)) == len(names) >= 30


@pytest.mark.parametrize("build", CASES, ids=[b.__name__ for b in CASES])
def test_bad_input_fails_with_one_sentence_and_writes_nothing(
    build: Builder, ctx: Ctx, capsys: pytest.CaptureFixture[str]
) -> None:
    call = build(ctx)
    before = _tree(ctx.tmp)
    capsys.readouterr()

    code = main(call.argv)

    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == EXIT_BAD_INPUT, captured.err
    assert len(lines) == 1 and lines[0].startswith("medfed: error: "), captured.err
    missing = [name for name in call.names if name not in lines[0]]
    assert not missing, f"message does not name {missing}: {lines[0]}"
    assert captured.out == ""
    assert not call.out.exists()
    assert _tree(ctx.tmp) == before


# ------------------------------------------------------------------------ accepted by check-data


@pytest.mark.parametrize("purpose", ["training", "prediction"])
def test_check_data_accepts_a_valid_csv_and_counts_rows_and_columns(
    purpose: str, ctx: Ctx, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ctx.tmp / "hospital.csv"
    data.write_text(ctx.heart_csv, encoding="utf-8")
    header, rows = _table(ctx.heart_csv)

    code = main(["check-data", "--model", str(ctx.heart_bundle), "--data", str(data),
                 "--purpose", purpose])

    captured = capsys.readouterr()
    assert (code, captured.err) == (0, "")
    assert captured.out.startswith(f"ok: {len(rows)} rows, {len(header)} columns")
    if purpose == "training":  # the rows as the client splits them: test 34%, then 20% of train
        sizes = re.search(r"train (\d+), validation (\d+), test (\d+)\)$", captured.out.strip())
        assert sizes is not None, captured.out
        train, val, test = map(int, sizes.groups())
        assert train + val + test == len(rows)
        assert abs(test - 0.34 * len(rows)) <= 2 and abs(val - 0.2 * (train + val)) <= 2


def test_check_data_accepts_valid_images_and_reports_their_shape(
    ctx: Ctx, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ctx.tmp / "scans.npz"
    _npz(data, np.zeros((IMAGE_ROWS, 28, 28), np.uint8))

    code = main(["check-data", "--model", str(ctx.cnn_bundle), "--data", str(data)])

    assert (code, capsys.readouterr().out) == (
        0, f"ok: {IMAGE_ROWS} images of shape 1x28x28 (train 2, validation 2, test 2)\n")


def test_check_data_warns_but_accepts_a_training_site_with_one_class(
    ctx: Ctx, capsys: pytest.CaptureFixture[str]
) -> None:
    # Like Switzerland's test split: a federated site may see one class; it can still train.
    header, rows = _table(ctx.heart_csv)
    positives = [r for r in rows if r[header.index("num")] != "0"]
    data = ctx.tmp / "positives.csv"
    data.write_text(_csv(header, positives), encoding="utf-8")

    code = main(["check-data", "--model", str(ctx.heart_bundle), "--data", str(data)])

    captured = capsys.readouterr()
    assert code == 0
    assert captured.out.startswith(f"ok: {len(positives)} rows, {len(header)} columns (train ")
    warnings = captured.err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("medfed: warning: ")
    assert f"all {len(positives)} rows have label 'disease'" in warnings[0]


def test_check_data_warns_when_rows_repeat_within_the_file_or_in_the_test_file(
    ctx: Ctx, capsys: pytest.CaptureFixture[str]
) -> None:
    # a double export: if the repeats are the same patients, the carved splits and the
    # hospital's own test file can hold patients the model trained on (optimistic figures)
    header, rows = _table(ctx.heart_csv)
    data = ctx.tmp / "site.csv"
    data.write_text(_csv(header, [*rows[:100], *rows[10:13]]), encoding="utf-8")
    test = ctx.tmp / "site-test.csv"
    test.write_text(_csv(header, [*rows[150:200], rows[20], rows[150]]), encoding="utf-8")

    code = main(["check-data", "--model", str(ctx.heart_bundle), "--data", str(data)])
    captured = capsys.readouterr()
    assert code == 0 and captured.out.startswith("ok: 103 rows, ")
    assert captured.err.splitlines() == [
        "medfed: warning: " + str(data) + ": 3 rows (rows 102, 103, 104) repeat an earlier row "
        "exactly: if they are the same patients, the validation and test splits carved from "
        "this file can hold patients it trains on, and their figures are optimistic; remove "
        "the repeats"]

    code = main(["check-data", "--model", str(ctx.heart_bundle), "--data", str(test)])
    assert code == 0 and "repeats an earlier row" in capsys.readouterr().err  # row 53

    clean = ctx.tmp / "clean.csv"
    clean.write_text(_csv(header, rows[:100]), encoding="utf-8")
    code = main(["check-data", "--model", str(ctx.heart_bundle), "--data", str(clean),
                 "--test-data", str(test)])
    err = capsys.readouterr().err
    assert code == 0
    assert "1 row (row 52) of the test file site-test.csv repeats a row of clean.csv" in err
    assert "earlier row" not in err  # repeats inside a test file leak nothing into training


def test_a_label_that_looks_like_a_formula_is_escaped_in_the_predictions(
        ctx: Ctx, capsys: pytest.CaptureFixture[str]) -> None:
    model = _bundle_copy(ctx)
    manifest = json.loads((model / MANIFEST_FILE).read_bytes())
    manifest["labels"] = ["no disease", '=HYPERLINK("http://x.example","click")']
    _resign(ctx, model, manifest_bytes=manifest_to_bytes(manifest))
    data = ctx.tmp / "new.csv"
    data.write_text(_add_column(ctx.heart_csv, "id", "@cmd"), encoding="utf-8")
    out = ctx.tmp / "preds.csv"
    stats = _bundle_stats(ctx, manifest)
    code = main(["predict", "--model", str(model), "--data", str(data), "--out", str(out),
                 "--site-stats", str(stats)])
    assert code == 0, capsys.readouterr().err
    text = out.read_text()
    assert "'=HYPERLINK" in text and "\n2,'@cmd," in text  # row 2: the first after the header
    assert ",=HYPERLINK" not in text and ",@cmd" not in text


def test_each_prediction_names_its_patients_row_as_the_spreadsheet_shows_it(
        ctx: Ctx, capsys: pytest.CaptureFixture[str]) -> None:
    """The `row` of a prediction is the input's row number with the header as row 1, blank
    lines counted: the numbers a spreadsheet shows and the data messages use."""
    lines = ctx.heart_csv.splitlines()
    data = ctx.tmp / "new.csv"
    data.write_text("\n".join([*lines[:3], "", *lines[3:6]]) + "\n", encoding="utf-8")
    out = ctx.tmp / "preds.csv"
    stats = _bundle_stats(ctx, json.loads((ctx.heart_bundle / MANIFEST_FILE).read_bytes()))
    assert main(_predict_argv(ctx, data, out, stats=stats)) == 0, capsys.readouterr().err
    with out.open(newline="") as fh:
        preds = list(csv.DictReader(fh))
    assert [p["row"] for p in preds] == ["2", "3", "5", "6", "7"]
    # the patient on row 5 gets the prediction it gets alone in a file
    alone = ctx.tmp / "alone.csv"
    alone.write_text("\n".join([lines[0], lines[3]]) + "\n", encoding="utf-8")
    assert main(_predict_argv(ctx, alone, ctx.tmp / "alone-preds.csv", stats=stats)) == 0
    with (ctx.tmp / "alone-preds.csv").open(newline="") as fh:
        (single,) = list(csv.DictReader(fh))
    assert {k: v for k, v in single.items() if k != "row"} == \
        {k: v for k, v in preds[2].items() if k != "row"}


def test_unsigned_runs_a_forged_bundle_only_when_asked_and_says_so(
        ctx: Ctx, capsys: pytest.CaptureFixture[str]) -> None:
    model = _forge(ctx)
    code = main(["model-card", "--model", str(model), "--unsigned"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.err.startswith("medfed: warning: --unsigned")
    assert "signature NOT checked" in captured.out


def test_medfed_client_stops_its_supernode_when_the_data_is_refused(tmp_path) -> None:
    import json
    import subprocess
    import sys

    from client.deploy import ClientRequest, Supervisor
    from common import records as rk

    req = ClientRequest(server="127.0.0.1:9", data=tmp_path / "x.csv", test_data=None,
                        certs=None, name="a", device="cpu", workdir=tmp_path, port=0,
                        insecure=True, max_retries=0)
    refused = tmp_path / rk.DATA_REFUSED_FILE
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], text=True)
    try:
        refused.write_text(json.dumps({"time": 0, "reason": "x.csv: missing column(s) 'chol'"}))
        supervisor = Supervisor(req, None, 0)
        supervisor._watch_refusal(proc, refused, linger=0.5)  # stops the process
        assert proc.wait(timeout=COMMAND_S) != 0
        assert supervisor.verdict is not None and supervisor.verdict.kind == "data"
        assert supervisor.verdict.message == \
            "its data does not match the model: x.csv: missing column(s) 'chol'"
    finally:
        proc.kill()
        proc.wait()


def test_a_client_that_cannot_reach_the_server_says_what_ended_its_wait(tmp_path, cli_env
                                                                        ) -> None:
    """--max-retries ends the wait long before --give-up-after: the sentence says which
    (it used to say 'for 600 s' after a few seconds). A real flower-supernode, a closed port."""
    import subprocess
    import sys

    from common.processes import free_port

    data = tmp_path / "cleveland.csv"
    export_site_csv("cleveland", data)
    server = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "medfed.cli", "client", "--server", server, "--data", str(data),
         "--insecure", "--name", "hospital-a", "--workdir", str(tmp_path / "work"),
         "--max-retries", "2"],
        capture_output=True, text=True, env=cli_env, timeout=COMMAND_S)
    assert result.returncode == 3, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"medfed: error: hospital hospital-a: cannot reach the server at {server} "
                    "after at most 2 attempts: connection refused or no route (is it running, "
                    "and are the address and port right?)"), result.stderr
    # the work directory it made holds patient-derived features: its user's only
    assert (tmp_path / "work").stat().st_mode & 0o777 == 0o700
    assert "chmod 700" not in result.stdout + result.stderr


def test_a_client_warns_when_its_work_directory_is_open_to_others(tmp_path) -> None:
    from client.deploy import _open_to_others

    work = tmp_path / "work"
    work.mkdir()
    for mode, said in ((0o755, "open to every user of this machine (mode 0755)"),
                       (0o750, "open to its group (mode 0750)"), (0o700, None)):
        work.chmod(mode)
        assert _open_to_others(work) == said


def test_a_full_disk_while_writing_predictions_is_one_sentence_naming_the_file(
        ctx: Ctx, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Once: a traceback (main caught only some OSErrors; a full disk's write() names no
    file)."""
    import client.predict

    def full_disk(path: Path, text: str) -> None:
        with open("/dev/full", "w") as handle:  # raises ENOSPC, without a file name
            handle.write(text)

    monkeypatch.setattr(client.predict, "atomic_write_text", full_disk)
    out = ctx.tmp / "preds.csv"
    stats = _bundle_stats(ctx, json.loads((ctx.heart_bundle / MANIFEST_FILE).read_bytes()))
    code = main(_predict_argv(ctx, _hospital_csv(ctx), out, stats=stats))
    captured = capsys.readouterr()
    assert code == EXIT_BAD_INPUT, captured.err
    assert captured.err == f"medfed: error: {out}: No space left on device\n"
    assert captured.out == ""


def test_a_site_models_statistics_are_the_verified_bytes_not_a_second_read(
        ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    """site_stats.json was hash-checked, then read again from disk: a file swapped in between
    was used unverified and reported as 'signed with the bundle'."""
    import client.predict

    model = _bundle_copy(ctx)
    manifest = json.loads((model / MANIFEST_FILE).read_bytes())
    stats = _bundle_stats(ctx, manifest).read_bytes()
    (model / SITE_STATS_FILE).write_bytes(stats)  # a site model: its statistics signed with it
    manifest["files"][SITE_STATS_FILE] = sha256_bytes(stats)
    _resign(ctx, model, manifest_bytes=manifest_to_bytes(manifest))
    data = _hospital_csv(ctx)
    honest = client.predict.predict(model, data, ctx.tmp / "a.csv", ctx.signing_pub)

    read_inputs = client.predict.read_inputs

    def swap_then_read(*args: object, **kwargs: object) -> object:  # after the bundle's check
        forged = json.loads(stats)
        forged["mean"] = [m + 50.0 for m in forged["mean"]]
        (model / SITE_STATS_FILE).write_text(json.dumps(forged))
        return read_inputs(*args, **kwargs)

    monkeypatch.setattr(client.predict, "read_inputs", swap_then_read)
    client.predict.predict(model, data, ctx.tmp / "b.csv", ctx.signing_pub)
    assert (ctx.tmp / "b.csv").read_bytes() == (ctx.tmp / "a.csv").read_bytes()
    assert honest["statistics"].endswith("(signed with the bundle)")


def test_an_operating_system_error_is_said_in_words_naming_the_path(tmp_path) -> None:
    from medfed.cli import sentence

    (tmp_path / "afile").write_text("")
    with pytest.raises(FileExistsError) as exists:
        (tmp_path / "afile").mkdir(parents=True, exist_ok=True)
    assert sentence(exists.value) == (f"{tmp_path / 'afile'} is a file where a directory is "
                                      "needed; give a directory path")
    (tmp_path / "adir").mkdir()
    with pytest.raises(IsADirectoryError) as is_dir:
        os.replace(tmp_path / "afile", tmp_path / "adir")
    assert sentence(is_dir.value).startswith(f"{tmp_path / 'adir'} is a directory")
    assert sentence(FileExistsError("bundle b exists; pass --force")) == \
        "bundle b exists; pass --force"  # medfed's own sentences are kept as they are
