"""The optional API key, checked the same way for gRPC metadata and HTTP headers.

A client sends `authorization: Bearer KEY` or `x-api-key: KEY`; the comparison takes constant time.
"""

from __future__ import annotations

import hmac
from typing import Iterable

from router.errors import Unauthenticated

MISSING_KEY = "missing API key: send 'authorization: Bearer <key>' or 'x-api-key: <key>'"


def presented_key(pairs: Iterable[tuple[str, str]]) -> str | None:
    """The key in (lower-case name, value) pairs, or None if none is sent."""
    for key, value in pairs or ():
        if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
            return value[7:].strip()
        if key == "x-api-key" and isinstance(value, str):
            return value.strip()
    return None


class ApiKey:
    def __init__(self, api_key: str):
        self._api_key = api_key.encode()

    def refusal(self, pairs: Iterable[tuple[str, str]]) -> str | None:
        """Why the request is refused, or None when it carries the key."""
        presented = presented_key(pairs)
        if presented is None:
            return MISSING_KEY
        if not hmac.compare_digest(presented.encode(), self._api_key):
            return "wrong API key"
        return None

    def check(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Raises Unauthenticated unless the pairs carry the key."""
        reason = self.refusal(pairs)
        if reason is not None:
            raise Unauthenticated(reason)
