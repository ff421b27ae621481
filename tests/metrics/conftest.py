"""Fixtures for metrics tests: stub actors that never outlive their test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pykka
import pytest

_STOP_TIMEOUT = 5.0


@pytest.fixture
def start() -> Iterator[Callable[..., pykka.ActorProxy[Any]]]:
    """Starts real actors for a test and stops them (newest first) afterwards."""
    refs: list[pykka.ActorRef[Any]] = []

    def _start(actor_class: type[pykka.ThreadingActor], *args: Any) -> pykka.ActorProxy[Any]:
        ref = actor_class.start(*args)
        refs.append(ref)
        return ref.proxy()

    yield _start
    futures = [ref.stop(block=False) for ref in reversed(refs)]
    for future in futures:
        try:
            future.get(timeout=_STOP_TIMEOUT)
        except pykka.Timeout:
            continue  # a wedged stub; its test already failed on its own assertions
