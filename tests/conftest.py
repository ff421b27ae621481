"""Shared fixtures: real stores in ``tmp_path``; never mocks of refcache's own code."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # With --import-mode=importlib the checkout is not on sys.path by itself; an editable
    # install (dev-mode-exact) puts only the three packages there, which is what we import.
    sys.path.insert(0, str(ROOT))

from storage._env import MetaEnv  # noqa: E402


@pytest.fixture
def env(tmp_path: Path) -> Iterator[MetaEnv]:
    """A real LMDB metadata environment under ``tmp_path/meta``."""
    meta = MetaEnv(tmp_path / "meta")
    try:
        yield meta
    finally:
        meta.close()
