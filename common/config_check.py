"""Value checks on a loaded :class:`~common.config.Config`, run before anything is written.

:mod:`common.config` checks keys and types; this module checks the texts that name something
(strategy, model family, trainable part, partition, device), so that a typo stops
`medfed pretrain`, `simulate` or `server` at once instead of after the first output (or the
first federated round). Each check reuses the parser the consumer uses.
"""

from __future__ import annotations

import re

from common.config import Config, ConfigError
from common.data.partition import parse_partition
from common.device import DEVICE_NAMES
from common.models import FAMILIES, ModelError, parse_trainable

# server/strategies.py builds these (it imports Flower, which common/ must not)
STRATEGY_NAMES = (
    "fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum",
)
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_BLOCK_WIDTHS = {"mlp": "hidden", "cnn": "channels"}  # one backbone block per listed width


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
            parse_partition(data.partition)
        except ValueError as err:
            raise ConfigError(str(err).replace("'data.partition'", f"'{key}.partition'")) from err
    if cfg.federation.strategy.name.lower() not in STRATEGY_NAMES:
        raise ConfigError(
            f"config key 'federation.strategy.name' must be one of {', '.join(STRATEGY_NAMES)}, "
            f"got {cfg.federation.strategy.name!r}"
        )
