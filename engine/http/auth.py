"""The HTTP API key: derived from the engine's token, so only who can read CLORA_HOME/token
(the engine's owner) can compute it. One key for every HTTP API of the engine; it starts
with `tml-`, which Tinker's SDK requires of its keys."""

from __future__ import annotations

import hashlib
import hmac

KEY_PREFIX = "tml-"


def api_key(token: str) -> str:
    return KEY_PREFIX + hmac.new(token.encode(), b"clora http api key v1", hashlib.sha256).hexdigest()


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a request carries: `Authorization: Bearer KEY` or `X-API-Key: KEY`."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return x_api_key.strip() if x_api_key else None


def key_ok(presented: str | None, expected: str) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())
