"""`--server HOST:PORT`: what `medfed client` and `medfed pull` accept before connecting."""

from __future__ import annotations

import pytest

from common.address import AddressError, parse_address


@pytest.mark.parametrize(("text", "default", "expected"), [
    ("fl.example.org:8443", None, ("fl.example.org", 8443)),
    ("localhost:9092", None, ("localhost", 9092)),
    ("my_host.local:9092", None, ("my_host.local", 9092)),  # internal DNS names use '_'
    ("10.0.0.1", 8443, ("10.0.0.1", 8443)),
    ("[::1]:9000", None, ("::1", 9000)),
    ("[fe80::1]", 8443, ("fe80::1", 8443)),
])
def test_an_address_is_split_into_host_and_port(text, default, expected) -> None:
    assert parse_address(text, "--server", default) == expected


@pytest.mark.parametrize(("text", "fragment"), [
    ("https://fl.example.org:9092", "is malformed; expected HOST:PORT or [IPv6]:PORT (no https://)"),
    ("fl example.org:9092", "is malformed"),
    ("-fl.example.org:9092", "is malformed"),
    ("fl..example.org:9092", "is malformed"),
    ("::1:9092", "is malformed"),
    (":9092", "is malformed"),
    ("[::1", "is malformed"),
    ("[::1]9092", "is malformed"),
    ("[fl.example.org]:9092", "'fl.example.org' is not an IPv6 address"),
    ("fl.example.org", "has no port"),
    ("fl.example.org:", "has port ''"),
    ("fl.example.org:0", "has port '0'; expected 1-65535"),
    ("fl.example.org:65536", "has port '65536'"),
    ("fl.example.org:grpc", "has port 'grpc'"),
])
def test_a_malformed_address_is_one_sentence_naming_the_flag(text, fragment) -> None:
    with pytest.raises(AddressError) as err:
        parse_address(text, "--server", None)
    assert str(err.value).startswith("--server ") and fragment in str(err.value)


def test_a_huge_address_is_shown_short() -> None:
    with pytest.raises(AddressError) as err:
        parse_address("a" * 100_000 + " :1", "--server", None)
    assert len(str(err.value)) < 200
