"""The ``refcache`` command line with every layer wired: ``python -m refcache`` and the
console script.

The command line itself lives in ``actors`` (``refcache.actors.cli_main``); ``demo``'s
``/metrics`` server comes from ``metrics``, which sits above ``actors``, so it is handed
down from here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .actors import cli_main
from .metrics import serve

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``refcache`` command line; returns its exit code (see ``refcache --help``)."""
    return cli_main(argv, serve_metrics=serve)


if __name__ == "__main__":
    sys.exit(main())
