"""URL redaction for logs, and HOST:PORT parsing: the helpers every module shares."""

from __future__ import annotations

import pytest

from extauth.addresses import split_host_port
from extauth.redact import redact_url, scrub_url


@pytest.mark.parametrize(("url", "shown"), [
    ("https://user:pa55@idp.example/jwks?key=s3cret#frag", "https://***@idp.example/jwks?***#***"),
    ("https://idp.example:8443/.well-known/jwks.json", "https://idp.example:8443/.well-known/jwks.json"),
    ("http://[::1]:80/jwks?k=v", "http://[::1]:80/jwks?***"),
    # A store URL whose password holds "@": cut at the last one, as the Redis client does.
    ("redis://:s3cr@t-pass@redis.internal:6379/0", "redis://***@redis.internal:6379/0"),
    ("redis://redis.internal:6379/0", "redis://redis.internal:6379/0"),
    ("http://[::1/jwks", "<unparsable url>"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_scrub_url_cuts_every_secret_part_out_of_a_message() -> None:
    url = "https://user:pa55@idp.example/jwks?key=s3cret#frag"
    text = scrub_url(f"cannot fetch {url}: user:pa55 rejected, key=s3cret, frag", url)
    assert "pa55" not in text and "s3cret" not in text and "frag" not in text
    assert text.startswith("cannot fetch ***")
    assert scrub_url("no secret here", "https://idp.example/jwks") == "no secret here"


@pytest.mark.parametrize(("value", "parsed"), [
    ("127.0.0.1:9002", ("127.0.0.1", 9002)),
    ("[::1]:0", ("::1", 0)),
    ("redis.internal:6379", ("redis.internal", 6379)),
])
def test_split_host_port(value: str, parsed: tuple[str, int]) -> None:
    assert split_host_port(value) == parsed


@pytest.mark.parametrize("value", ["", "9002", ":9002", "host:", "host:port", "host:65536", "host:-1"])
def test_split_host_port_refuses(value: str) -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        split_host_port(value)
