"""``refcache.open_cache``: the front door, where the layers that may not know each other meet.

:func:`refcache.actors.open_cache` opens a cache and knows nothing of metrics (``metrics``
sits above ``actors``); this one opens it the same way and, when asked, serves its
Prometheus ``/metrics`` (:func:`refcache.metrics.serve`) until the cache closes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import actors
from .metrics import serve
from .storage import MAX_LAYER_ENTRIES, MAX_LAYER_SIZE, MetaEnv, Snapshotter

__all__ = ["open_cache"]


def open_cache(
    root: str | os.PathLike[str],
    *,
    snapshotter: str | Callable[[Path, MetaEnv], Snapshotter] = "auto",
    ref_checker: Callable[[str, Sequence[str]], bool] | None = None,
    pool: actors.ActorPool | None = None,
    pool_workers: int = 2,
    io_workers: int = 4,
    timeout: float = 300.0,
    map_size: int = 1 << 30,
    max_layer_size: int = MAX_LAYER_SIZE,
    max_layer_entries: int = MAX_LAYER_ENTRIES,
    metrics_port: int | None = None,
    metrics_addr: str = "127.0.0.1",
    **options: Any,
) -> actors.Cache:
    """Opens (creating if needed) the cache under ``root``; optionally serves its metrics.

    Runs on the caller's thread and blocks until the cache is open (the record table loaded,
    the manager actor answering) and, with ``metrics_port``, the server listens.

    Args:
        root: The cache directory.
        snapshotter: ``"auto"``, ``"native"``, ``"overlay"``, or a factory
            ``(root, env) -> Snapshotter``.
        ref_checker: BuildKit's ``PruneRefChecker`` (records whose layers are used outside
            the cache are *shared*).
        pool: A record actor pool shared with other caches (default: one of its own).
        pool_workers: Worker threads of the cache's own pool.
        io_workers: Threads of the I/O executor.
        timeout: Seconds any internal wait may take before ``TimeoutError``.
        map_size: Initial LMDB map size (it grows on demand).
        max_layer_size: Cap on one layer's uncompressed size when it is applied.
        max_layer_entries: Cap on one layer's number of tar entries.
        metrics_port: Serve Prometheus ``/metrics`` for this cache on this port (0: any
            free port; ``cache.metrics_server.port`` says which); :meth:`Cache.close` stops
            it. ``None`` (the default) serves nothing.
        metrics_addr: The address to listen on (loopback by default).
        **options: Reserved; unknown options are rejected.

    Returns:
        The open :class:`~refcache.actors.Cache` (a context manager).

    Raises:
        The errors of :func:`refcache.actors.open_cache` (``LockedError``,
        ``PermissionDeniedError``, ``CorruptedError``, ``InvalidError``, ...), and
        ``InvalidError``/``FailedPreconditionError`` from :func:`refcache.metrics.serve` (a
        bad port or address; the port is taken). When the server cannot start, the cache
        is closed again.
    """
    cache = actors.open_cache(
        root,
        snapshotter=snapshotter,
        ref_checker=ref_checker,
        pool=pool,
        pool_workers=pool_workers,
        io_workers=io_workers,
        timeout=timeout,
        map_size=map_size,
        max_layer_size=max_layer_size,
        max_layer_entries=max_layer_entries,
        **options,
    )
    if metrics_port is None:
        return cache
    try:
        cache.metrics_server = serve(cache, metrics_port, metrics_addr)
    except BaseException:
        cache.close()
        raise
    return cache
