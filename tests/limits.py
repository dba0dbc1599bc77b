"""The one place for the test suite's time limits.

Limits are safety nets, never measurements: a test waits at most this long for something that
should happen, so that a hung process fails the test instead of the whole suite. They are
generous for a busy laptop (load twice the core count); `MEDFED_TEST_TIME_SCALE` multiplies
them all for a slower machine (e.g. 2 on an emulated CPU). No test asserts how fast anything
ran; the one exception is a requirement of the product (processes gone within 10 s of their
medfed parent's SIGKILL), which is not scaled.
"""

from __future__ import annotations

import os


def _scale() -> float:
    text = os.environ.get("MEDFED_TEST_TIME_SCALE", "1")
    try:
        value = float(text)
    except ValueError:
        raise SystemExit(f"MEDFED_TEST_TIME_SCALE must be a number, got {text!r}") from None
    return value if value > 0 else 1.0


SCALE = _scale()

SOCKET_S = 30.0 * SCALE  # one socket operation or TLS handshake on loopback
COMMAND_S = 300.0 * SCALE  # one short `medfed` command (pretrain, pull, predict, certs)
STOP_S = 60.0 * SCALE  # a process to exit after it was told to (signal, end of run)
RUN_S = 900.0 * SCALE  # a whole simulation or deployment run, start to summary
INSTALL_S = 600.0 * SCALE  # building and installing the wheel into a fresh venv
TEST_S = 1800.0 * SCALE  # pytest-timeout's limit for any one test (conftest.py)

# A product requirement, not a safety net: every Flower process is gone this soon after its
# medfed parent is killed (issue 12), on a loaded machine too.
GONE_WITHIN_S = 10.0
