"""Retries of registry exchanges: the transient-failure signal and the backoff.

Exponential backoff (0.1 s doubling to 2 s, with jitter) for as long as a deadline allows;
the client (``_registry.py``) and the blob reader (``_blobstream.py``) share it.
"""

from __future__ import annotations

import random
import time
from typing import Final

__all__ = ["Retry", "backoff"]

_BACKOFF_FIRST: Final = 0.1
_BACKOFF_MAX: Final = 2.0


class Retry(Exception):  # noqa: N818 (internal control flow, never escapes)
    """A transient failure the caller may retry (connection error, 5xx, 429)."""

    def __init__(self, reason: str, status: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status  #: the HTTP status when the registry answered (5xx, 429)


def backoff(attempt: int, deadline: float) -> bool:
    """Sleeps before retry ``attempt`` (1, 2, ...); ``False`` when the deadline is past."""
    delay = min(_BACKOFF_FIRST * 2 ** (attempt - 1), _BACKOFF_MAX)
    delay *= 0.75 + random.random() / 2  # jitter: workers retrying together spread out
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return False
    time.sleep(min(delay, remaining))
    return time.monotonic() < deadline
