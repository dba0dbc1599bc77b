"""Client-side clipping for differential privacy, active only when the server asks for it.

Flower's `fixedclipping_mod` replies with an error when the train config lacks the
clipping-norm key, i.e. whenever DP is off or server-side. This mod hands the message to
`fixedclipping_mod` only when the key is there (the server runs
`DifferentialPrivacyClientSideFixedClipping`, see `server/privacy.py`), so the ClientApp
can carry it permanently.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM


def clip_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip the update to the server's clipping norm if the train config carries one."""
    asked = any(KEY_CLIPPING_NORM in rec for rec in msg.content.config_records.values())
    if asked:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
