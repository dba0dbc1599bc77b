"""Differential privacy for a federated run: Flower's fixed-clipping wrappers and the budget.

What is protected (DP-FedAvg, McMahan et al. 2018, at hospital level): each round, every
sampled hospital's whole update (new trainable tensors minus the global ones) is clipped to
L2 norm `clipping_norm`, the clipped updates are averaged with EQUAL weights, and Gaussian
noise of standard deviation ``noise_multiplier * clipping_norm / sampled`` is added to the
mean. Neighbouring federations differ by one hospital's entire data set, so the guarantee
covers everything a hospital contributes to the model, not only one patient.

The noise is calibrated to an unweighted mean: with Flower's default weighting by
`num-examples` the largest hospital would move the mean by more than
``clipping_norm / sampled`` and the reported epsilon would be wrong. Under DP the wrappers
below therefore give every reply the same weight (Flower's own accountant refuses weighted
aggregation for the same reason). For the same reason only strategies that aggregate like
FedAvg (fedavg, fedprox) are accepted: a median, Krum or an adaptive server optimiser
applied before the noise has a different sensitivity.

Trust model: the server sees the individual updates (`server` mode) or the clipped but
noise-free updates (`client` mode); DP protects what leaves the server — every published
registry version and the final model given to hospitals — not the updates in transit (see
`server/secagg.py` for hiding those). Per-site metrics (loss, counts, local test scores) are
NOT noised, and the pretrained backbone (central training on the source data) is outside
the guarantee.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from importlib.metadata import version
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore.differential_privacy import compute_stdv

from common.config import Config, ConfigError, PrivacyConfig
from common.config_check import check_privacy, sampled_per_round

log = logging.getLogger("medfed.server")


def _equal_weight(reply: Message, key: str) -> Message:
    """A shallow copy of `reply` whose weight `key` is 1 (the original stays untouched).

    The original replies are also read for per-site metrics, which must keep real counts.
    """
    if reply.has_error():
        return reply
    out = copy.copy(reply)
    out.content = RecordDict({
        name: MetricRecord({**rec, key: 1}) if isinstance(rec, MetricRecord) else rec
        for name, rec in reply.content.items()
    })
    return out


class _EqualWeights:
    """Mixin: aggregate exactly `num_sampled_clients` clipped updates with equal weights.

    The noise is scaled for that many hospitals; a round with fewer updates (failures,
    timeouts, updates rejected by validation) would be under-noised, so it is skipped and
    the global model stays as it was (like Flower's wrappers do in accounting mode).
    """

    num_sampled_clients: int
    noise_multiplier: float
    clipping_norm: float

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        """Flower's noise (same standard deviation), drawn from fresh operating-system
        entropy. Flower draws it from NumPy's global generator, which a run seeds with the
        config's seed, and that seed is in every published manifest: anyone could draw the
        same noise and subtract it. So DP runs are not bit-for-bit repeatable, by design."""
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        rng = np.random.default_rng()  # no seed: OS entropy, never the run's
        noisy = {}
        for name, array in zip(aggregated_arrays.keys(),
                               aggregated_arrays.to_numpy_ndarrays(), strict=True):
            noisy[name] = Array(np.asarray(array + rng.normal(0.0, std, array.shape)
                                           .astype(array.dtype)))
        log.info("differential privacy: Gaussian noise of standard deviation %.4g added to "
                 "the mean of %d clipped updates", std, self.num_sampled_clients)
        return ArrayRecord(noisy)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        replies = list(replies)
        valid = sum(1 for r in replies if not r.has_error())
        if valid != self.num_sampled_clients or valid != len(replies):
            log.warning("round %d: %d valid updates of %d expected; differential privacy "
                        "skips the round (global model unchanged)", server_round, valid,
                        self.num_sampled_clients)
            return None, None
        key = cast(FedAvg, self.strategy).weighted_by_key  # type: ignore[attr-defined]
        return super().aggregate_train(  # type: ignore[misc]
            server_round, [_equal_weight(r, key) for r in replies])


class ServerSideDP(_EqualWeights, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping + noise, with equally weighted replies."""


class ClientSideDP(_EqualWeights, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (`fixedclipping_mod`) + server noise, equal weights."""


def wrap_privacy(strategy: Strategy, cfg: PrivacyConfig, num_sampled: int) -> Strategy:
    """Wrap `strategy` in Flower's fixed-clipping DP wrapper chosen by `cfg.dp`.

    Parameters
    ----------
    strategy : Strategy
        From `build_strategy`; must aggregate like FedAvg when DP is on.
    cfg : PrivacyConfig
        `federation.privacy`.
    num_sampled : int
        Hospitals sampled per round (see :func:`sampled_per_round`); the noise is scaled by it.

    Returns
    -------
    Strategy
        `strategy` itself when `cfg.dp` is "off", else the DP wrapper around it.
    """
    check_privacy(cfg)
    if cfg.dp == "off":
        return strategy
    if not isinstance(strategy, FedAvg) or type(strategy).aggregate_train \
            is not FedAvg.aggregate_train:
        raise ConfigError("config key 'federation.strategy.name' must be fedavg or fedprox when "
                          f"federation.privacy.dp is '{cfg.dp}', got {type(strategy).__name__}")
    if num_sampled < 1:
        raise ConfigError(f"differential privacy needs at least one sampled hospital per round, "
                          f"got {num_sampled}")
    wrapper = ServerSideDP if cfg.dp == "server" else ClientSideDP
    return wrapper(strategy, noise_multiplier=cfg.noise_multiplier,
                   clipping_norm=cfg.clipping_norm, num_sampled_clients=num_sampled)


def _epsilon(noise_multiplier: float, rounds: int, sample_rate: float, delta: float) -> float:
    """Epsilon of `rounds` Poisson-subsampled Gaussian releases (dp-accounting's RDP)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
        rounds)
    accountant = RdpAccountant()  # add-or-remove-one neighbouring relation (one hospital)
    accountant.compose(event)
    absl = logging.getLogger("absl")
    level = absl.level
    # fractional RDP orders that do not converge are skipped with a warning per order
    absl.setLevel(logging.ERROR)
    try:
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def privacy_report(cfg: PrivacyConfig, rounds: int, sample_rate: float) -> dict[str, Any] | None:
    """(epsilon, delta) spent after `rounds` DP-FedAvg rounds; None when DP is off.

    Accounted mechanism: each round releases the mean of the sampled hospitals' clipped
    updates plus Gaussian noise with noise multiplier `cfg.noise_multiplier` (noise stdev /
    per-hospital sensitivity); rounds compose. Computed by Google's `dp-accounting` RDP
    accountant over `rounds` compositions of a Poisson-subsampled Gaussian with sampling
    rate `sample_rate` (share of hospitals sampled per round) under add/remove-one-hospital
    adjacency. `epsilon` counts every round in full (no amplification by sampling): a run's
    sample of hospitals is drawn from its seeded generator and each published version names
    its round's trainers, so the sampling is not secret and amplification does not hold.
    With `sample_rate` < 1 the report also gives `epsilon_if_sampling_were_secret` (the
    Poisson-amplified figure; Flower samples a fixed number, so even then approximate), which
    no medfed run can claim.

    Parameters
    ----------
    cfg : PrivacyConfig
        `federation.privacy`.
    rounds : int
        Completed rounds (private releases).
    sample_rate : float
        Sampled hospitals / all hospitals, in (0, 1].

    Returns
    -------
    dict or None
        `epsilon` (None when there is no noise: no guarantee), `delta`, `rounds` and the
        mechanism's parameters.
    """
    check_privacy(cfg)
    if cfg.dp == "off":
        return None
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    report: dict[str, Any] = {
        "mechanism": "DP-FedAvg, hospital level: whole update clipped, Gaussian noise on mean",
        "dp": cfg.dp, "noise_multiplier": cfg.noise_multiplier,
        "clipping_norm": cfg.clipping_norm, "delta": cfg.delta, "rounds": rounds,
        "sample_rate": sample_rate,
        "accountant": "RDP, Gaussian, every round counted in full "
                      f"(dp-accounting {version('dp-accounting')})",
    }
    if cfg.noise_multiplier == 0:
        report["epsilon"] = None  # clipping without noise: no DP guarantee
        return report
    if rounds == 0:
        report["epsilon"] = 0.0
        return report
    report["epsilon"] = _epsilon(cfg.noise_multiplier, rounds, 1.0, cfg.delta)
    if sample_rate < 1:
        report["epsilon_if_sampling_were_secret"] = _epsilon(cfg.noise_multiplier, rounds,
                                                             sample_rate, cfg.delta)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The line `medfed simulate` prints after the table."""
    if report.get("epsilon") is None:
        return (f"differential privacy: no guarantee (noise_multiplier 0) after "
                f"{report['rounds']} rounds")
    return (f"differential privacy: epsilon={report['epsilon']:.3g} at "
            f"delta={report['delta']:g} after {report['rounds']} rounds")


def privacy_summary(cfg: Config, rounds: int, num_nodes: int) -> dict[str, Any]:
    """`{"privacy": report}` for `summary.json` (empty when DP is off); logs epsilon."""
    sampled = sampled_per_round(cfg.federation.strategy, num_nodes)
    report = privacy_report(cfg.federation.privacy, rounds, sampled / max(num_nodes, 1))
    if report is None:
        return {}
    log.info("%s", format_report(report))
    return {"privacy": report}
