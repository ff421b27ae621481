"""Fixtures for actor tests: no actor outlives the test (or the session) that started it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest
from refcache.actors import Cache, open_cache

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


# -- real caches -------------------------------------------------------------------------------

#: Seconds any single wait in an actor test may take (a hang fails fast, with a message).
WAIT = 30.0


@pytest.fixture
def cache_root(tmp_path: Path) -> Path:
    """The root directory of the test's cache (reopen it to simulate a restart)."""
    return tmp_path / "cache"


@pytest.fixture
def open_cache_at(cache_root: Path) -> Iterator[Callable[[], Cache]]:
    """Opens (or reopens, after ``close()``) the native cache at ``cache_root``.

    Every cache opened through it is closed at teardown (closing twice is a no-op).
    """
    opened: list[Cache] = []

    def _open() -> Cache:
        cache = open_cache(cache_root, snapshotter="native", timeout=WAIT)
        opened.append(cache)
        return cache

    yield _open
    for cache in reversed(opened):
        cache.close()


@pytest.fixture
def cache(open_cache_at: Callable[[], Cache]) -> Cache:
    """A real cache (LMDB, content store, native snapshotter) in ``tmp_path``."""
    return open_cache_at()
