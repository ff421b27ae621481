"""``open_cache``: the one wiring function (ordered start, reverse stop in ``finally``).

Open order: lock file -> private permissions (the root and its trees made ``0700`` again if
they were wider, with a warning) -> stale mounts under ``<root>/mounts`` unmounted ->
metadata environment (checked before it is mapped) -> snapshotter -> content store -> leases
(temporary leases from an earlier run deleted) -> load the record table -> record actor pool
-> manager actor -> ping. :meth:`Cache.close` stops them in reverse and stops only this
cache's actors.

One process writes a cache at a time: ``open_cache`` takes an exclusive ``flock`` on
``<root>/lock`` (a second writer gets :class:`LockedError` at once). Read-only tools (``refcache
du``/``inspect``/``check``) open the metadata read-only and need no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import pykka

from ..storage import (
    MAX_LAYER_ENTRIES,
    MAX_LAYER_SIZE,
    MOUNTS_DIR,
    PRIVATE_FILE_MODE,
    Credentials,
    InvalidError,
    LmdbLeaseManager,
    LocalContentStore,
    LockedError,
    MetadataStore,
    MetaEnv,
    Snapshotter,
    access_error,
    check_cap,
    clean_mount_dir,
    make_private_dir,
    make_snapshotter,
    secure_root,
)
from . import _distribution as distribution
from ._core import CacheCore
from ._distribution import ProgressEvent, PushResult
from ._load import LoadReport, load_records
from ._manager import CacheManager
from ._messages import Ping
from ._protocol import ask
from ._proxy import CacheManagerProxy
from ._refs import ImmutableRef
from ._runtime import ActorPool

__all__ = ["Cache", "open_cache"]

logger = logging.getLogger(__name__)


class Cache:
    """An open cache: the manager proxy and the backends it was opened with.

    Attributes:
        root: The cache root directory.
        manager: Typed proxy of the manager actor (:class:`CacheManagerProxy`): its methods
            return futures whose ``get()`` raises refcache errors only.
        metadata: Record metadata store.
        content: Content store.
        snapshotter: Snapshotter.
        leases: Lease manager.
        load_report: What loading repaired at open.
    """

    def __init__(
        self,
        root: Path,
        core: CacheCore,
        manager_ref: pykka.ActorRef[CacheManager],
        lock_fd: int,
        load_report: LoadReport,
        owns_pool: bool,
    ) -> None:
        self.root = root
        self._core = core
        self._manager_ref = manager_ref
        self.manager = CacheManagerProxy(core, manager_ref)
        self.metadata = core.store
        self.content = core.content
        self.snapshotter = core.snapshotter
        self.leases = core.leases
        self.env = core.env
        self.load_report = load_report
        self._lock_fd = lock_fd
        self._owns_pool = owns_pool
        self._closed = False
        #: A ``/metrics`` server serving this cache, attached by the layer above
        #: (``refcache.open_cache(metrics_port=...)``); :meth:`close` stops it first.
        self.metrics_server: Any = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r}{', closed' if self._closed else ''})"

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran."""
        return self._closed

    def push(
        self,
        target: str,
        refs: Mapping[str, ImmutableRef],
        *,
        compression: str = "zstd",
        force_compression: bool = False,
        credentials: tuple[str, str] | Credentials | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        docker_config: str | os.PathLike[str] | None = None,
        progress: Callable[[ProgressEvent], None] | None = None,
    ) -> PushResult:
        """Exports named records as one tagged cache image (BuildKit's registry cache export).

        Each name becomes an OCI image manifest of the record's layer chain (blobs from
        ``get_remotes``: missing ones are computed in ``compression``; with
        ``force_compression`` every layer is sent as ``compression``, converted as needed,
        keeping its diffID), with a ``rootfs`` config carrying the diffIDs and the records'
        description, type and creation time; the manifests form one OCI image index,
        tagged. Blobs the target has already are not sent again (``HEAD``), and a blob known
        to be in another repository of the same registry is mounted from there. Runs in the
        calling thread (plus a few transfer threads); docs/DISTRIBUTED.md has the details.

        Args:
            target: ``registry://HOST[:PORT]/REPO:TAG`` or ``oci-layout://DIR[:TAG]``.
            refs: Name -> record (names: ``[A-Za-z0-9][A-Za-z0-9._/@+=-]*``).
            compression: ``"zstd"``, ``"gzip"`` or ``"uncompressed"``.
            force_compression: Convert layers that are in another compression.
            credentials: ``(username, password)`` for the registry; default: Docker's
                configuration (``$DOCKER_CONFIG/config.json``, ``~/.docker/config.json``).
            ca_file: PEM file of a CA to trust for the registry (HTTPS).
            insecure: Plain HTTP to the registry (never by default).
            docker_config: Directory of Docker's ``config.json`` (default as above).
            progress: Called with each :class:`ProgressEvent` (from transfer threads).

        Returns:
            What was sent and skipped, the index digest and each name's manifest digest.

        Raises:
            InvalidError: a malformed target (naming it), bad names or refs, an unknown
                compression.
            AuthError: the registry refused the credentials (naming it).
            UnavailableError: the registry stayed unreachable within the cache's timeout.
            RefcacheError: anything else the registry refused (naming it).
        """
        self._check_open()
        return distribution.push(
            self._core,
            target,
            refs,
            compression=compression,
            force_compression=force_compression,
            credentials=credentials,
            ca_file=ca_file,
            insecure=insecure,
            docker_config=docker_config,
            progress=progress,
        )

    def pull(
        self,
        source: str,
        *,
        fetch: bool = False,
        extract: bool = False,
        credentials: tuple[str, str] | Credentials | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        docker_config: str | os.PathLike[str] | None = None,
        progress: Callable[[ProgressEvent], None] | None = None,
    ) -> dict[str, ImmutableRef]:
        r"""Imports a cache image: one *lazy* record per layer, a handle per name.

        Reads the index and the manifests only. Every layer becomes a blob-only record made
        through ``get_by_blob``'s rules (found again by its blob-chain ID: pulling twice, or
        an image sharing layers with local records, makes no duplicate). Blobs are fetched
        from the source when a record is first extracted or mounted (one fetch per digest,
        resumed after a broken connection, verified while it streams in). The handles carry
        the source's descriptor handlers, and so do later ``get``\ s of these records while
        this cache is open. Lazy records do not survive a restart (BuildKit's rule: no
        handler at open); pull again, which costs the manifests only.

        Args:
            source: ``registry://HOST[:PORT]/REPO:TAG`` (or ``@sha256:...``) or
                ``oci-layout://DIR[:TAG]``. A plain image (a manifest, not a cache image)
                is imported too, under its tag as the name.
            fetch: Download every missing blob now (the records stay blob-only, and stay
                across a restart); a failed download leaves no record.
            extract: Also unpack every record (implies ``fetch``).
            credentials, ca_file, insecure, docker_config: As for :meth:`push`.
            progress: Called with each :class:`ProgressEvent`.

        Returns:
            Name -> a new handle on the record (release each).

        Raises:
            InvalidError: a malformed source, or not a cache image.
            NotFoundError: no such tag.
            AuthError / UnavailableError / RefcacheError: as for :meth:`push`.
        """
        self._check_open()
        return distribution.pull(
            self._core,
            source,
            fetch=fetch,
            extract=extract,
            credentials=credentials,
            ca_file=ca_file,
            insecure=insecure,
            docker_config=docker_config,
            progress=progress,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise self._core.closed_error()

    def close(self) -> None:
        """Stops this cache's actors and closes its stores (reverse of open). Idempotent.

        Handles still open are reported (log + count in the returned log line), not leaked
        silently: their records stay on disk as they are and load again at the next open.
        """
        if self._closed:
            return
        self._closed = True
        core = self._core
        # From here on the public API refuses calls (ClosedError); calls in flight drain
        # through the manager's mailbox or fail with ClosedError when their job is cancelled.
        core.closed = True
        if self.metrics_server is not None:
            with contextlib.suppress(Exception):
                self.metrics_server.stop()
        try:
            with contextlib.suppress(Exception):
                stats = self._manager_ref.proxy().statistics().get(timeout=core.timeout)
                if stats.open_handles:
                    logger.warning(
                        "closing cache %s with %d open handles", self.root, stats.open_handles
                    )
            with contextlib.suppress(pykka.ActorDeadError):
                self._manager_ref.stop(timeout=core.timeout)
        finally:
            core.closed = True
            core.executor.shutdown(wait=True, cancel_futures=True)
            core.close_foreign()
            for closer in reversed(core.closers):
                with contextlib.suppress(Exception):
                    closer()
            core.writer.close()
            if self._owns_pool:
                core.pool.shutdown(timeout=core.timeout)
            with contextlib.suppress(Exception):
                core.snapshotter.close()
            core.env.close()
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)


def _check_open_args(
    options: dict[str, Any],
    timeout: object,
    ref_checker: object,
    max_layer_size: int,
    max_layer_entries: int,
) -> None:
    """Refuses what :func:`open_cache` cannot take (``InvalidError`` naming the value)."""
    if options:
        msg = f"unknown open_cache options: {', '.join(sorted(options))}"
        raise InvalidError(msg)
    if (
        not isinstance(timeout, int | float)
        or isinstance(timeout, bool)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        msg = f"open_cache timeout must be seconds > 0, not {timeout!r}"
        raise InvalidError(msg)
    if ref_checker is not None and not callable(ref_checker):
        msg = f"open_cache ref_checker must be callable, not {ref_checker!r}"
        raise InvalidError(msg)
    check_cap("max_layer_size", max_layer_size)
    check_cap("max_layer_entries", max_layer_entries)


def _lock_root(root_path: Path) -> int:
    """Creates the private root and takes its lock file (``LockedError`` if held)."""
    try:
        make_private_dir(root_path, parents=True)
        lock_fd = os.open(
            root_path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE
        )
    except OSError as exc:
        raise access_error("cannot open cache", root_path, exc) from exc
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(lock_fd)
        msg = f"cache {root_path} is open in another process"
        raise LockedError(msg) from exc
    return lock_fd


def open_cache(
    root: str | os.PathLike[str],
    *,
    snapshotter: str | Callable[[Path, MetaEnv], Snapshotter] = "auto",
    ref_checker: Callable[[str, Sequence[str]], bool] | None = None,
    pool: ActorPool | None = None,
    pool_workers: int = 2,
    io_workers: int = 4,
    timeout: float = 300.0,
    map_size: int = 1 << 30,
    max_layer_size: int = MAX_LAYER_SIZE,
    max_layer_entries: int = MAX_LAYER_ENTRIES,
    **options: Any,
) -> Cache:
    """Opens (creating if needed) the embedded cache under ``root``.

    Args:
        root: Cache directory: ``meta/`` (LMDB), ``content/``, ``snapshots/``.
        snapshotter: ``"auto"`` (overlay when a probe mount works, else native),
            ``"native"`` or ``"overlay"``; or a factory ``(root, env) -> Snapshotter`` for
            an embedder's own backend (the tests' fault injection uses this).
        ref_checker: BuildKit's ``PruneRefChecker``: ``(record_id, layer_digest_chain) ->
            bool`` says whether a record's layers are also used outside the cache (an image
            store); such records and their ancestors are *shared* in ``disk_usage`` and kept
            by prunes without ``all``.
        pool: Record actor pool to share with other caches (default: one of its own).
        pool_workers: Worker threads of the cache's own pool.
        io_workers: Threads of the I/O executor (snapshot copies, merges, sizes, prune).
        timeout: Seconds any internal wait may take (a snapshot job, a descriptor provider,
            each ``ref_checker`` call...) before it fails with refcache's ``TimeoutError``.
        map_size: Initial LMDB map size (it grows on demand).
        max_layer_size: Cap on the uncompressed size of one layer when it is applied
            (default 64 GiB); a larger layer fails with ``InvalidError`` naming its blob.
        max_layer_entries: Cap on the number of tar entries of one layer (default 10
            million), likewise.
        **options: Reserved for future options; unknown ones are rejected.

    Raises:
        LockedError: another process has the cache open for writing.
        PermissionDeniedError: the root is on a read-only file system, or this process may
            not write it (``EROFS``/``EACCES``); the message names the root.
        CorruptedError: the metadata environment is damaged (checked before it is mapped).
        InvalidError: bad arguments (unknown options, a timeout that is not seconds > 0, a
            ref_checker that is not callable).
        RefcacheError: unreadable stores.
    """
    _check_open_args(options, timeout, ref_checker, max_layer_size, max_layer_entries)
    root_path = Path(root)
    lock_fd = _lock_root(root_path)
    stack = contextlib.ExitStack()
    try:
        # Nobody else has the cache open now: its modes and its mount dir are ours to fix.
        secure_root(root_path)
        for line in clean_mount_dir(root_path / MOUNTS_DIR):
            logger.warning("cache %s: %s (left by a process that died)", root_path, line)
        env = MetaEnv(root_path / "meta", map_size=map_size)
        stack.callback(env.close)
        if callable(snapshotter):
            sn: Snapshotter = snapshotter(root_path, env)
        else:
            sn = make_snapshotter(snapshotter, root_path, env)
        stack.callback(sn.close)
        content = LocalContentStore(root_path / "content", env)
        leases = LmdbLeaseManager(env)
        removed = leases.delete_temporary()
        if removed:
            logger.info("deleted %d temporary leases left from the last run", removed)
        entries, report = load_records(env, MetadataStore(env), sn, leases)
        own_pool = pool is None
        actor_pool = (
            pool if pool is not None else ActorPool(workers=pool_workers, name="refcache-records")
        )
        if own_pool:
            stack.callback(actor_pool.shutdown)
        core = CacheCore(
            root=root_path,
            env=env,
            snapshotter=sn,
            content=content,
            leases=leases,
            pool=actor_pool,
            io_workers=io_workers,
            timeout=timeout,
            max_layer_size=max_layer_size,
            max_layer_entries=max_layer_entries,
        )
        core.ref_checker = ref_checker
        stack.callback(core.writer.close)
        stack.callback(core.executor.shutdown)
        manager_ref = CacheManager.start(core, entries)
        core.manager = manager_ref
        ask(manager_ref, Ping(), timeout, "cache manager start")
        cache = Cache(root_path, core, manager_ref, lock_fd, report, own_pool)
    except BaseException:
        stack.close()
        with contextlib.suppress(OSError):
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):  # Cache.close may have closed it already
            os.close(lock_fd)
        raise
    stack.pop_all()
    return cache
