"""Shared fixtures: real stores in ``tmp_path``; never mocks of refcache's own code."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from refcache.storage._env import MetaEnv


@pytest.fixture
def env(tmp_path: Path) -> Iterator[MetaEnv]:
    """A real LMDB metadata environment under ``tmp_path/meta``."""
    meta = MetaEnv(tmp_path / "meta")
    try:
        yield meta
    finally:
        meta.close()
