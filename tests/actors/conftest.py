"""Fixtures for actor tests: no actor outlives the test (or the session) that started it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pykka
import pytest

_STOP_TIMEOUT = 5.0


def _stop(refs: list[pykka.ActorRef[Any]]) -> None:
    """Stop ``refs`` newest first without waiting for ever on a wedged handler."""
    futures = [ref.stop(block=False) for ref in reversed(refs)]
    for future in futures:
        try:
            future.get(timeout=_STOP_TIMEOUT)
        except pykka.Timeout:
            # A test left a handler blocked; its own assertions say why. Do not hang here.
            continue


@pytest.fixture(autouse=True, scope="session")
def _stop_all_actors_at_session_end() -> Iterator[None]:
    """Last resort: a forgotten ThreadingActor is a non-daemon thread that blocks exit."""
    yield
    _stop(pykka.ActorRegistry.get_all())


@pytest.fixture(autouse=True)
def _stop_actors_started_by_the_test() -> Iterator[None]:
    """Stop the actors a test started and left running.

    Actors that already existed when the test began (started by module- or session-scoped
    fixtures, which are set up first) are left alone.
    """
    before = {ref.actor_urn for ref in pykka.ActorRegistry.get_all()}
    yield
    _stop([ref for ref in pykka.ActorRegistry.get_all() if ref.actor_urn not in before])
