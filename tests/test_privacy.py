"""Differential privacy: strategy wrapping, the (epsilon, delta) report, clipping, noise.

Federated runs here use `tests/inprocess_grid.py` (real ServerApp and ClientApp code, no Ray)
on the heart config with 4 hospitals; one slow test runs `medfed simulate` end to end.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from safetensors.numpy import load_file

from client.client_app import make_client_app
from common import records as rk
from common.bundle import load_bundle
from common.config import ConfigError, PrivacyConfig
from server.federation import load_payload, run_federation
from server.privacy import privacy_report, wrap_privacy
from tests.conftest import HEART
from tests.flower_helpers import call_client_app, task_identity
from tests.inprocess_grid import InProcessGrid, run_settings
from tests.limits import RUN_S

FAST = ("federation.adaptation.enabled=false",)  # adaptation is not what these tests check


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity():
        yield


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models train ~3x faster on one thread than with threads fighting over 2 CPUs."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _dp(mode: str, noise: float = 1.0, clip: float = 1.0) -> PrivacyConfig:
    return PrivacyConfig(dp=mode, noise_multiplier=noise, clipping_norm=clip)


# --- wrap_privacy ----------------------------------------------------------------------------
def test_dp_off_returns_the_strategy_itself() -> None:
    strategy = FedAvg()
    assert wrap_privacy(strategy, _dp("off"), 4) is strategy


@pytest.mark.parametrize(("mode", "flower_class"), [
    ("server", DifferentialPrivacyServerSideFixedClipping),
    ("client", DifferentialPrivacyClientSideFixedClipping),
])
def test_dp_modes_use_flowers_fixed_clipping_wrappers(mode, flower_class) -> None:
    wrapped = wrap_privacy(FedAvg(), _dp(mode, noise=0.7, clip=0.3), 4)
    assert isinstance(wrapped, flower_class)
    assert (wrapped.noise_multiplier, wrapped.clipping_norm, wrapped.num_sampled_clients) \
        == (0.7, 0.3, 4)


def test_unknown_dp_mode_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"'federation\.privacy\.dp'.*'local'"):
        wrap_privacy(FedAvg(), _dp("local"), 4)


def test_dp_refuses_a_strategy_that_does_not_average() -> None:
    with pytest.raises(ConfigError, match=r"'federation\.strategy\.name'"):
        wrap_privacy(FedMedian(), _dp("server"), 4)


# --- aggregation under DP --------------------------------------------------------------------
def _reply(node: int, update: list[float], weight: int) -> Message:
    sent = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(RecordDict({
        rk.ARRAYS: ArrayRecord({"w": Array(np.array(update, dtype=np.float32))}),
        rk.METRICS: MetricRecord({rk.NUM_EXAMPLES: weight}),
    }), reply_to=sent)


def _aggregate(replies: list[Message], clip: float, num_sampled: int) -> np.ndarray | None:
    """Server-side DP without noise, from a global model of zeros (update = reply)."""
    dp = wrap_privacy(FedAvg(), _dp("server", noise=0.0, clip=clip), num_sampled)
    dp.current_arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    arrays, _ = dp.aggregate_train(1, replies)
    return None if arrays is None else arrays["w"].numpy()


def test_dp_averages_updates_with_equal_weights() -> None:
    # weighted by num-examples (1 and 3) the mean would be [0.075, 0.45]
    got = _aggregate([_reply(1, [0.3, 0.0], 1), _reply(2, [0.0, 0.6], 3)], clip=1.0,
                     num_sampled=2)
    np.testing.assert_allclose(got, [0.15, 0.3], rtol=1e-6)


def test_server_side_dp_clips_each_update_to_the_norm() -> None:
    # [30, 40] has norm 50 -> scaled to norm 1: [0.6, 0.8]; [0, 0.2] is inside the norm
    # (an update of exactly zero crashes Flower's clipping: division by its norm)
    got = _aggregate([_reply(1, [30.0, 40.0], 5), _reply(2, [0.0, 0.2], 5)], clip=1.0,
                     num_sampled=2)
    np.testing.assert_allclose(got, [0.3, 0.5], rtol=1e-6)


def test_round_with_fewer_updates_than_sampled_is_skipped() -> None:
    assert _aggregate([_reply(1, [0.1, 0.1], 5)], clip=1.0, num_sampled=2) is None


def test_aggregation_leaves_the_replies_num_examples_alone() -> None:
    replies = [_reply(1, [0.1, 0.0], 7), _reply(2, [0.0, 0.1], 9)]
    _aggregate(replies, clip=1.0, num_sampled=2)
    assert [r.content.metric_records[rk.METRICS][rk.NUM_EXAMPLES] for r in replies] == [7, 9]


# --- privacy_report --------------------------------------------------------------------------
def _eps(rounds: int, noise: float = 1.0, rate: float = 1.0) -> float:
    report = privacy_report(_dp("server", noise=noise), rounds, rate)
    assert report is not None
    return float(report["epsilon"])


def test_no_report_when_dp_is_off() -> None:
    assert privacy_report(_dp("off"), 10, 1.0) is None


def test_epsilon_is_positive_and_grows_with_every_round() -> None:
    eps = [_eps(r) for r in (1, 2, 5, 10, 50)]
    assert eps[0] > 0
    assert all(a < b for a, b in zip(eps, eps[1:], strict=False)), eps


def test_more_noise_spends_less_epsilon() -> None:
    assert _eps(10, noise=2.0) < _eps(10, noise=1.0) < _eps(10, noise=0.7)


def test_full_participation_matches_the_gaussian_rdp_formula() -> None:
    """Sampling rate 1: R Gaussian releases have RDP R*a/(2 z^2) at order a, converted with
    eps = rdp + log(1 - 1/a) - log(delta * a) / (a - 1) (Balle et al. 2020, Prop. 12),
    minimised over dp-accounting's default orders."""
    rounds, z, delta = 20, 1.5, 1e-5
    orders = np.array([1 + x / 10 for x in range(1, 100)] + list(range(11, 64))
                      + [128, 256, 512, 1024], dtype=float)
    orders = orders[orders > 1.01]
    rdp = rounds * orders / (2 * z**2)
    expected = np.min(rdp + np.log1p(-1 / orders) - np.log(delta * orders) / (orders - 1))
    assert _eps(rounds, noise=z) == pytest.approx(float(expected), rel=1e-9)


def test_sampling_fewer_hospitals_claims_no_amplification() -> None:
    """The sample is drawn from the run's seeded generator and each version names its
    trainers: not secret, so every round counts in full; the amplified figure is kept apart,
    under a name that says what it would need."""
    report = privacy_report(_dp("server"), 10, 0.5)
    assert report is not None
    assert report["epsilon"] == pytest.approx(_eps(10, rate=1.0))
    assert report["epsilon_if_sampling_were_secret"] < report["epsilon"]


def test_zero_noise_reports_no_guarantee() -> None:
    report = privacy_report(_dp("server", noise=0.0), 10, 1.0)
    assert report is not None and report["epsilon"] is None


# --- client-side clipping in the ClientApp ---------------------------------------------------
def _train_update_norm(tmp_path: Path, heart_bundle: Path, keys: Path,
                       config_extra: dict[str, float]) -> tuple[Message, float]:
    app = make_client_app(run_settings(HEART, (), tmp_path / "run", heart_bundle, keys))
    payload = load_payload(heart_bundle)
    node = {"partition-id": 1, "num-partitions": 4}
    call_client_app(app, f"query.{rk.QUERY_BACKBONE}",
                    RecordDict({rk.BUNDLE_META: payload.meta(),
                                rk.BACKBONE_FILE: payload.arrays()}), node)
    head = load_bundle(heart_bundle).head
    config = ConfigRecord({rk.SERVER_ROUND: 1, rk.BACKBONE_SHA256: payload.sha256,
                           **config_extra})
    reply = call_client_app(app, "train", RecordDict({rk.ARRAYS: ArrayRecord(head),
                                                      rk.CONFIG: config}), node)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    got = reply.content.array_records[rk.ARRAYS].to_torch_state_dict()
    norm = math.sqrt(sum(float(((got[k] - head[k]) ** 2).sum()) for k in head))
    return reply, norm


def test_client_clips_its_update_when_the_server_asks(tmp_path, heart_bundle,
                                                      signing_key_path) -> None:
    _, norm = _train_update_norm(tmp_path, heart_bundle, signing_key_path,
                                 {KEY_CLIPPING_NORM: 0.01})
    assert norm <= 0.01 * (1 + 1e-5)


def test_client_without_clipping_key_trains_unclipped(tmp_path, heart_bundle,
                                                      signing_key_path) -> None:
    # the clipping mod is always installed: without the key it must not interfere
    _, norm = _train_update_norm(tmp_path, heart_bundle, signing_key_path, {})
    assert norm > 0.1


# --- whole runs ------------------------------------------------------------------------------
def _run(tmp_path: Path, name: str, heart_bundle: Path, keys: Path,
         overrides: tuple[str, ...]) -> Path:
    settings = run_settings(HEART, (*FAST, *overrides), tmp_path / name, heart_bundle, keys)
    run_federation(InProcessGrid(make_client_app(settings), 4), settings)
    return settings.run_dir


def _head(run_dir: Path, version: int) -> np.ndarray:
    tensors = load_file(run_dir / "registry" / f"v{version:04d}" / "head.safetensors")
    return np.concatenate([tensors[k].ravel() for k in sorted(tensors)])


def test_server_noise_has_the_calibrated_spread(tmp_path, heart_bundle, signing_key_path,
                                                one_thread) -> None:
    """Same run with noise multiplier 0 and 1: the heads of round 1 differ by the noise
    alone, whose standard deviation is noise * clip / hospitals = 1 * 0.5 / 4."""
    dp = ("federation.rounds=1", "federation.privacy.dp=server",
          "federation.privacy.clipping_norm=0.5")
    quiet = _run(tmp_path, "quiet", heart_bundle, signing_key_path,
                 (*dp, "federation.privacy.noise_multiplier=0"))
    noisy = _run(tmp_path, "noisy", heart_bundle, signing_key_path,
                 (*dp, "federation.privacy.noise_multiplier=1"))
    diff = _head(noisy, 1) - _head(quiet, 1)
    assert 0.125 * 0.6 < float(np.std(diff)) < 0.125 * 1.4, diff
    summary = json.loads((noisy / "summary.json").read_text(encoding="utf-8"))
    assert summary["privacy"]["epsilon"] == pytest.approx(_eps(1, noise=1.0))


def test_the_noise_cannot_be_drawn_again_from_the_published_seed(
        tmp_path, heart_bundle, signing_key_path, one_thread) -> None:
    """Flower draws DP noise from NumPy's global generator, which a run seeds with the
    config's seed, printed in every manifest: the same run twice gave the same noisy model,
    so anyone could subtract the noise. Two identical runs now differ by fresh noise."""
    dp = ("federation.rounds=1", "federation.privacy.dp=server",
          "federation.privacy.clipping_norm=0.5", "federation.privacy.noise_multiplier=1")
    first = _run(tmp_path, "first", heart_bundle, signing_key_path, dp)
    again = _run(tmp_path, "again", heart_bundle, signing_key_path, dp)
    diff = _head(first, 1) - _head(again, 1)
    # two independent draws of std 0.125: their difference has std 0.125 * sqrt(2)
    assert 0.125 * 1.414 * 0.6 < float(np.std(diff)) < 0.125 * 1.414 * 1.4, diff


def test_under_dp_no_update_is_excluded_by_its_norm_against_the_round(tmp_path) -> None:
    """Who is excluded, with the norm in the reason, would publish something of one
    hospital's raw update: clipping bounds updates instead."""
    from common.config_check import load_config
    from server.federation import reply_checks

    plain = reply_checks(load_config(HEART))
    assert plain.max_norm_ratio > 0 and plain.max_update_norm > 0
    server = reply_checks(load_config(HEART, ["federation.privacy.dp=server"]))
    assert (server.max_norm_ratio, server.max_update_norm) == (0.0, 0.0)
    client = reply_checks(load_config(HEART, ["federation.privacy.dp=client",
                                              "federation.privacy.clipping_norm=0.5"]))
    assert client.max_norm_ratio == 0.0 and client.max_update_norm == pytest.approx(0.5, rel=1e-4)


def test_a_resume_with_other_privacy_settings_is_refused(tmp_path, heart_bundle,
                                                         signing_key_path, one_thread) -> None:
    """2 rounds without noise, resumed with noise: the summary reported a finite epsilon
    for versions published with none."""
    from common.config import ConfigError
    from common.settings import RunSettings

    _run(tmp_path, "run", heart_bundle, signing_key_path, ("federation.rounds=2",))
    settings = RunSettings(config_path=HEART, run_dir=tmp_path / "run", bundle=heart_bundle,
                           keys=signing_key_path, resume=True,
                           overrides=(*FAST, "federation.rounds=4",
                                      "federation.privacy.dp=server"))
    with pytest.raises(ConfigError, match=r"started with other settings \(federation.privacy.dp "
                                          r"differ\): resuming would mix versions"):
        run_federation(InProcessGrid(make_client_app(settings), 4), settings)
    assert sorted(p.name for p in (tmp_path / "run" / "registry").glob("v*")) == \
        ["v0000", "v0001", "v0002"]


@pytest.mark.slow
def test_simulate_with_server_dp_reports_epsilon(tmp_path, heart_bundle, signing_key_path,
                                                 cli_env, one_thread) -> None:
    plain = _run(tmp_path, "plain", heart_bundle, signing_key_path, ("federation.rounds=2",))
    out = tmp_path / "dp"
    medfed = str(Path(sys.executable).parent / "medfed")
    proc = subprocess.run(
        [medfed, "simulate", "--config", str(HEART), "--bundle", str(heart_bundle),
         "--out", str(out), "--rounds", "2", "--set", "federation.privacy.dp=server",
         *[a for o in FAST for a in ("--set", o)]],
        env=cli_env, capture_output=True, text=True, timeout=RUN_S, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["privacy"]["epsilon"] == pytest.approx(_eps(2))
    assert "differential privacy: epsilon=" in proc.stdout
    assert np.max(np.abs(_head(out, 1) - _head(plain, 1))) > 1e-2  # noise was applied


def test_a_resume_with_another_strategy_or_seed_is_refused(tmp_path, heart_bundle,
                                                           signing_key_path, one_thread) -> None:
    """A FedAdam run resumed as FedAvg with another seed was accepted: the versions mixed
    two runs and FedAdam's moments were dropped without a word."""
    from common.config import ConfigError
    from common.settings import RunSettings

    _run(tmp_path, "run", heart_bundle, signing_key_path, ("federation.rounds=1",))
    resumed = RunSettings(config_path=HEART, run_dir=tmp_path / "run", bundle=heart_bundle,
                          keys=signing_key_path, resume=True,
                          overrides=(*FAST, "federation.rounds=2", "seed=7",
                                     "federation.strategy.name=fedyogi"))
    with pytest.raises(ConfigError, match=r"\(federation.strategy.name, seed differ\)"):
        run_federation(InProcessGrid(make_client_app(resumed), 4), resumed)


def test_a_kill_between_the_checkpoints_two_renames_resumes_from_the_last_commit(
        tmp_path, heart_bundle, signing_key_path, one_thread) -> None:
    """Killed after the old checkpoint was moved aside and before the new one took its
    place, a resume found no checkpoint and dropped every published version."""
    from common.settings import RunSettings

    run = _run(tmp_path, "run", heart_bundle, signing_key_path, ("federation.rounds=2",))
    first = (run / "registry" / "v0001" / "manifest.json").read_bytes()  # its signing time too
    (run / "checkpoint").rename(run / ".checkpoint.old-0123abcd")  # the window's state
    resumed = RunSettings(config_path=HEART, run_dir=run, bundle=heart_bundle,
                          keys=signing_key_path, resume=True,
                          overrides=(*FAST, "federation.rounds=3"))
    run_federation(InProcessGrid(make_client_app(resumed), 4), resumed)
    assert sorted(p.name for p in (run / "registry").glob("v0*")) == \
        ["v0000", "v0001", "v0002", "v0003"]
    assert (run / "registry" / "v0001" / "manifest.json").read_bytes() == first  # not redone
