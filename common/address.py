"""A server address as typed on a command line (`--server HOST:PORT`), checked before use.

Flower's SuperNode takes any text and then only fails to connect: a URL (`https://...`), a
space or a missing port read as "cannot reach the server", after retries. Checking the text
first turns those into one sentence naming the flag.
"""

from __future__ import annotations

import ipaddress
import re

from common.config import show

# a DNS name: dot-separated labels of letters, digits, '-' (and '_', which internal DNS uses)
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")


class AddressError(ValueError):
    """An address that is not HOST:PORT."""


def parse_address(text: str, flag: str, default_port: int | None) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` into (host, port); the port may be left out when
    `default_port` is given. Raises :class:`AddressError` naming `flag`."""
    shape = f"expected HOST:PORT or [IPv6]:PORT{' (no https://)' if '://' in text else ''}"
    bad = AddressError(f"{flag} {show(text)} is malformed; {shape}")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise bad
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"{flag} {show(text)}: {show(host)} is not an IPv6 address"
                               ) from None
    else:
        if text.count(":") > 1:
            raise bad
        host, _, port_text = text.partition(":")
        if not host or len(host) > 253 or not _HOSTNAME.fullmatch(host):
            raise bad
    if not port_text and ":" not in text.rpartition("]")[2]:
        if default_port is None:
            raise AddressError(f"{flag} {show(text)} has no port; {shape}")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise AddressError(f"{flag} {show(text)} has port {show(port_text)}; expected 1-65535")
    return host, int(port_text)
