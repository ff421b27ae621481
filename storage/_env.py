"""The one LMDB environment that holds every piece of refcache metadata.

Everything that must agree after a crash lives in one environment under ``<root>/meta/``, in
named databases: record metadata, secondary indexes, external values, snapshot metadata,
content labels, leases and lease resources. One write transaction can therefore create a
record and its lease atomically.

Transactions:

* :meth:`MetaEnv.read_txn` gives a consistent snapshot (LMDB MVCC); readers never block the
  writer, and a second *process* may open the environment read-only and read while this one
  writes (that is what lets ``refcache du`` inspect a live cache).
* :meth:`MetaEnv.write_txn` is a diskcache-style context manager: it yields a
  :class:`WriteTxn` whose writes commit together on a clean exit and roll back on any
  exception; file deletions scheduled with :meth:`WriteTxn.after_commit` run only after the
  commit succeeded (containerd's "forget first, delete files last").
* Batch writers use :meth:`WriteTxn.put_many` and :meth:`ReadTxn.get_many` (LMDB cursor
  ``putmulti``/``getmulti``: one C loop per batch), and bulk readers
  ``read_txn(buffers=True)`` with :meth:`ReadTxn.views` (zero-copy, decode inside the
  transaction).

Map growth: the map starts large (1 GiB of address space, not of disk). When LMDB reports
``MapFullError`` the transaction is aborted, the map is doubled, and the logged writes of the
whole transaction are replayed in a fresh transaction. Replay is exact because every writer in
this process holds :attr:`MetaEnv._write_lock` for the whole transaction, and a cache has a
single writing process (``open_cache`` takes an exclusive lock file).

Durability (fsync policy): every commit flushes its data pages (LMDB ``sync=True``) and defers
the meta-page flush to the next commit (``metasync=False``, LMDB's ``MDB_NOMETASYNC``): one
fsync per commit instead of two. A committed write survives ``kill -9`` of the writer (the
page cache survives it); on power loss LMDB stays consistent (atomicity, consistency and
isolation hold) but the last committed transaction may be undone. Opening after such a loss
repairs what that can leave behind (records whose files went: see ``actors/_load.py`` and
``storage.check``). Callers batch writes into few commits (BuildKit's queue + ``Commit``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import struct
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import lmdb
import msgpack

from ._errors import (
    CorruptedError,
    IncompatibleSchemaError,
    InvalidError,
    RefcacheError,
    StoreFullError,
)
from ._groupwrite import GroupWriter
from ._layout import PRIVATE_FILE_MODE, access_error, lock_held, make_private_dir
from ._tree import fsync_dir, remove_tree

try:  # py-lmdb >= 3.0: an offline structural verifier that never maps the file
    from lmdb import verify as _lmdb_verify
except ImportError:  # pragma: no cover - older py-lmdb: the header check alone
    _lmdb_verify = None  # type: ignore[assignment]

__all__ = [
    "DB_CONTENT",
    "DB_EXTERNAL",
    "DB_INDEX",
    "DB_INFO",
    "DB_LEASES",
    "DB_LEASE_RESOURCES",
    "DB_NAMES",
    "DB_RECORDS",
    "DB_SNAPSHOTS",
    "SCHEMA_VERSION",
    "MetaEnv",
    "ReadTxn",
    "WriteTxn",
    "WriteWatch",
]

logger = logging.getLogger(__name__)

#: Current on-disk schema. Bump only with a migration; an unknown version refuses to open.
SCHEMA_VERSION = 1

DB_INFO = "info"  #: schema version and environment facts
DB_RECORDS = "records"  #: record id -> msgpack map of metadata fields
DB_INDEX = "index"  #: ``<index>::<record id>`` -> b"" (secondary indexes)
DB_EXTERNAL = "external"  #: ``<record id>\0<key>`` -> raw bytes (large values)
DB_SNAPSHOTS = "snapshots"  #: snapshotter metadata (keys, parents, kinds, usage, labels)
DB_CONTENT = "content"  #: content store metadata (labels, created/updated times)
DB_LEASES = "leases"  #: lease id -> msgpack lease record
DB_LEASE_RESOURCES = "lease_resources"  #: ``<lease>\0<type>\0<id>`` -> b""

DB_NAMES: tuple[str, ...] = (
    DB_INFO,
    DB_RECORDS,
    DB_INDEX,
    DB_EXTERNAL,
    DB_SNAPSHOTS,
    DB_CONTENT,
    DB_LEASES,
    DB_LEASE_RESOURCES,
)

_SCHEMA_KEY = b"schema_version"
_DEFAULT_MAP_SIZE = 1 << 30
_CLOSE_WAIT = 30.0  #: seconds close waits for a write transaction in flight
_MAX_MAP_SIZE = 1 << 40
_MAX_DBS = 32
_MAX_READERS = 1024

# Operations in a write transaction's replay log.
_PUT, _DELETE, _PUT_MANY = 0, 1, 2


class ReadTxn:
    """A read-only view of the environment, consistent for its whole life."""

    __slots__ = ("_env", "_txn")

    def __init__(self, env: MetaEnv, txn: lmdb.Transaction) -> None:
        self._env = env
        self._txn = txn

    def get(self, db: str, key: bytes) -> bytes | None:
        """Returns the raw value stored under ``key`` in ``db``, or ``None``."""
        try:
            value = self._txn.get(key, db=self._env.handle(db))
        except lmdb.Error as exc:
            raise self._env.error(f"metadata read of {db!r} key {key!r}", exc) from exc
        return None if value is None else bytes(value)

    def items(self, db: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Yields ``(key, value)`` pairs of ``db`` whose key starts with ``prefix``, in order."""
        try:
            with self._txn.cursor(db=self._env.handle(db)) as cursor:
                if not cursor.set_range(prefix):
                    return
                for raw, value in cursor:
                    key = bytes(raw)
                    if not key.startswith(prefix):
                        return
                    yield key, bytes(value)
        except lmdb.Error as exc:
            raise self._env.error(f"metadata scan of {db!r}", exc) from exc

    def keys(self, db: str, prefix: bytes = b"") -> Iterator[bytes]:
        """Yields the keys of ``db`` that start with ``prefix``, in key order."""
        try:
            with self._txn.cursor(db=self._env.handle(db)) as cursor:
                if not cursor.set_range(prefix):
                    return
                for raw in cursor.iternext(keys=True, values=False):
                    key = bytes(raw)
                    if not key.startswith(prefix):
                        return
                    yield key
        except lmdb.Error as exc:
            raise self._env.error(f"metadata scan of {db!r}", exc) from exc

    def get_many(self, db: str, keys: Iterable[bytes]) -> dict[bytes, bytes]:
        """Returns ``{key: value}`` for those of ``keys`` that exist in ``db``.

        One C-level lookup loop (LMDB cursor ``getmulti``) instead of a Python call per key:
        batch writers check which of their records already exist this way.
        """
        try:
            with self._txn.cursor(db=self._env.handle(db)) as cursor:
                found = cursor.getmulti(keys)
            return {bytes(key): bytes(value) for key, value in found}
        except lmdb.Error as exc:
            raise self._env.error(f"metadata read of {db!r}", exc) from exc

    def views(self, db: str) -> Iterator[tuple[Any, Any]]:
        """Yields every ``(key, value)`` of ``db`` in key order, without copying.

        In a transaction opened with ``read_txn(buffers=True)`` keys and values are
        :class:`memoryview` objects over LMDB's map: zero-copy, valid only until the
        transaction ends. Decode them inside the transaction and never keep them (copy with
        ``bytes()`` what must outlive it). Otherwise they are ``bytes``.
        """
        try:
            with self._txn.cursor(db=self._env.handle(db)) as cursor:
                yield from cursor.iternext()
        except lmdb.Error as exc:
            raise self._env.error(f"metadata scan of {db!r}", exc) from exc

    def count(self, db: str) -> int:
        """Returns the number of entries in ``db``."""
        try:
            return int(self._txn.stat(self._env.handle(db))["entries"])
        except lmdb.Error as exc:
            raise self._env.error(f"metadata count of {db!r}", exc) from exc


class WriteTxn(ReadTxn):
    """A write transaction whose writes are logged so that the whole of it can be replayed.

    Reads see this transaction's own writes. Only :meth:`put`, :meth:`put_many`,
    :meth:`delete` and :meth:`delete_prefix` change data.
    """

    __slots__ = ("_after", "_after_unlock", "_before", "_log", "_replaying", "_rollback")

    def __init__(self, env: MetaEnv, txn: lmdb.Transaction) -> None:
        super().__init__(env, txn)
        self._replaying = False
        # (op, db, key or list of pairs, value): kept only to replay the transaction after a
        # map growth or a rollback to a savepoint, so it holds references, never copies.
        self._log: list[tuple[int, str, Any, bytes]] = []
        self._after: list[Callable[[], object]] = []
        self._after_unlock: list[Callable[[], object]] = []
        self._rollback: list[Callable[[], object]] = []
        self._before: dict[object, Callable[[], object]] = {}

    def put(self, db: str, key: bytes, value: bytes) -> None:
        """Stores ``value`` under ``key`` in ``db`` (overwriting)."""
        self._log.append((_PUT, db, key, value))
        if self._env._watches:
            for watch in self._env._watches:
                watch.note(db, key, value)
        handle = self._env._dbs.get(db)
        if handle is None or self._replaying:
            self._apply(_PUT, db, key, value)
            return
        try:
            self._txn.put(key, value, db=handle)
        except lmdb.MapFullError:
            self._txn.abort()
            self._env._regrow(self)
        except lmdb.Error as exc:
            raise self._env.error(f"metadata write to {db!r} key {key!r}", exc, write=True) from exc

    def put_many(self, db: str, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        """Stores every ``(key, value)`` of ``pairs`` in ``db`` (overwriting), in that order.

        The same as :meth:`put` for each pair, in one C-level loop (LMDB cursor ``putmulti``).
        Pass the pairs sorted by key when you can: B-tree inserts in key order touch each page
        once.
        """
        items = list(pairs)
        if not items:
            return
        self._log.append((_PUT_MANY, db, items, b""))
        for watch in self._env._watches:
            for key, value in items:
                watch.note(db, key, value)
        self._apply(_PUT_MANY, db, items, b"")

    def delete(self, db: str, key: bytes) -> bool:
        """Deletes ``key`` from ``db``; returns whether it existed."""
        self._log.append((_DELETE, db, key, b""))
        return self._apply(_DELETE, db, key, b"")

    def delete_prefix(self, db: str, prefix: bytes) -> int:
        """Deletes every key of ``db`` that starts with ``prefix``; returns how many."""
        doomed = list(self.keys(db, prefix))
        for key in doomed:
            self.delete(db, key)
        return len(doomed)

    def after_commit(self, callback: Callable[[], object]) -> None:
        """Runs ``callback`` once this transaction has committed (never if it rolls back).

        Used for file deletions: the metadata forgets an object first, the files go last, so a
        crash in between leaves only orphan files that ``open`` or ``check --fix`` removes.
        """
        self._after.append(callback)

    def after_unlock(self, callback: Callable[[], object]) -> None:
        """Runs ``callback`` after the commit, once the write lock is released.

        For slow cleanup (deleting a tree whose name was already retired by an
        :meth:`after_commit` rename) that must not hold up the next writer.
        """
        self._after_unlock.append(callback)

    def after_rollback(self, callback: Callable[[], object]) -> None:
        """Runs ``callback`` if this transaction rolls back (never if it commits).

        Used to remove files staged for a transaction that did not happen.
        """
        self._rollback.append(callback)

    def before_commit(self, key: object, callback: Callable[[], object]) -> None:
        """Runs ``callback`` once, just before this transaction commits (with the lock held).

        Callbacks registered under an equal ``key`` run once per transaction: writes that
        share a group commit share one ``fsync`` of a directory they renamed into. A failing
        callback rolls the whole transaction back.
        """
        self._before.setdefault(key, callback)

    def _rolled_back(self) -> None:
        for callback in self._rollback:
            try:
                callback()
            except Exception:
                logger.exception("after-rollback callback %r failed", callback)

    def _run_before(self) -> None:
        for callback in self._before.values():
            callback()

    def _mark(self) -> tuple[int, int, int, int, int]:
        """A savepoint: how far the log and each callback list reach now."""
        return (
            len(self._log),
            len(self._after),
            len(self._after_unlock),
            len(self._rollback),
            len(self._before),
        )

    def _rollback_to(self, mark: tuple[int, int, int, int, int]) -> None:
        """Undoes everything done since ``mark`` and keeps the transaction open.

        LMDB has no savepoints short of nested transactions; the log makes one: the LMDB
        transaction is aborted, the rollback callbacks registered since ``mark`` run, and a
        new transaction replays the log up to ``mark`` (exact: the caller holds the write
        lock throughout, as for a map growth).
        """
        log, after, unlock, rollback, before = mark
        with contextlib.suppress(lmdb.Error):
            self._txn.abort()
        undo = self._rollback[rollback:]
        del self._log[log:], self._after[after:], self._after_unlock[unlock:]
        del self._rollback[rollback:]
        for key in list(self._before)[before:]:
            del self._before[key]
        for callback in undo:
            try:
                callback()
            except Exception:
                logger.exception("after-rollback callback %r failed", callback)
        self._txn = self._env._begin(write=True)
        try:
            self._replay()
        except lmdb.MapFullError:
            self._txn.abort()
            self._env._regrow(self)

    def _apply(self, op: int, db: str, key: Any, value: bytes) -> bool:
        handle = self._env.handle(db)
        try:
            if op == _PUT:
                return bool(self._txn.put(key, value, db=handle))
            if op == _DELETE:
                return bool(self._txn.delete(key, db=handle))
            with self._txn.cursor(db=handle) as cursor:
                cursor.putmulti(key)
            return True
        except lmdb.MapFullError:
            if self._replaying:
                raise
            # Grow and replay the whole transaction so far (this write included), then go on:
            # the caller's body never notices.
            self._txn.abort()
            return self._env._regrow(self)
        except lmdb.Error as exc:
            if op == _PUT_MANY:
                # putmulti does not say which pair failed: name the first unstorable key.
                bad = [k for k, _ in key if not k or len(k) > self._env._max_key_size]
                what = f"key {bad[0]!r}" if bad else f"of {len(key)} entries"
            else:
                what = f"key {key!r}"
            raise self._env.error(f"metadata write to {db!r} {what}", exc, write=True) from exc

    def _replay(self) -> bool:
        self._replaying = True
        result = False
        try:
            for op, db, key, value in self._log:
                result = self._apply(op, db, key, value)
        finally:
            self._replaying = False
        return result


class WriteWatch:
    """The puts to some databases since a point in time, for a reader that must see them.

    :meth:`MetaEnv.watch_writes` registers it and begins :attr:`snapshot`, a read
    transaction, at the same instant (under the write lock, so no write transaction is half
    done): everything the snapshot does not show is noted here, whether its transaction
    committed or rolled back. The garbage collector marks on the snapshot and, in each
    sweep transaction, spares whatever a noted write may have made reachable since.

    Notes are made by writers holding the write lock; :meth:`drain` them while holding it
    too (inside a write transaction) to see every finished transaction's writes.
    """

    __slots__ = ("_dbs", "_notes", "snapshot")

    def __init__(self, dbs: Iterable[str], snapshot: AbstractContextManager[ReadTxn]) -> None:
        self._dbs = frozenset(dbs)
        self._notes: list[tuple[str, bytes, bytes]] = []
        #: A read transaction (as a context manager) begun when the watch was registered.
        self.snapshot = snapshot

    def note(self, db: str, key: bytes, value: bytes) -> None:
        """Called by :meth:`WriteTxn.put` for every write while the watch is registered."""
        if db in self._dbs:
            self._notes.append((db, bytes(key), bytes(value)))

    def drain(self) -> list[tuple[str, bytes, bytes]]:
        """The ``(db, key, value)`` writes noted since the last drain, oldest first."""
        notes, self._notes = self._notes, []
        return notes


class _ReadScope:
    """The context manager of :meth:`MetaEnv.read_txn`."""

    __slots__ = ("_buffers", "_env", "_txn")

    def __init__(self, env: MetaEnv, buffers: bool) -> None:
        self._env = env
        self._buffers = buffers
        self._txn: lmdb.Transaction | None = None

    def __enter__(self) -> ReadTxn:
        env = self._env
        env._enter_reader()
        try:
            txn = env._begin(write=False, buffers=self._buffers)
        except BaseException:
            env._leave_reader()
            raise
        self._txn = txn
        return ReadTxn(env, txn)

    def __exit__(self, *exc_info: object) -> None:
        txn, self._txn = self._txn, None
        try:
            if txn is not None:
                txn.abort()
        finally:
            self._env._leave_reader()


class MetaEnv:
    """The LMDB environment of one cache root (``<root>/meta/``).

    Thread-safe: any thread may open read transactions; write transactions are serialised by
    LMDB's writer lock and by :attr:`_write_lock` (which also makes map growth safe).

    Args:
        path: Directory of the environment; created when missing (unless ``readonly``).
        readonly: Open for reading only (another process may be writing).
        map_size: Initial map size in bytes (grown on demand when writable).
        max_map_size: Growth stops here; past it a write raises :class:`StoreFullError`.
        verify: How ``data.mdb`` is checked before it is mapped: ``"full"`` walks every
            page (py-lmdb's offline verifier), ``"header"`` checks both meta pages and the
            file size only. Default: ``"header"`` for a read-only open of a cache whose
            writer is running (its pages change under a walk), ``"full"`` otherwise.

    Raises:
        IncompatibleSchemaError: The stored schema version is newer or unknown.
        CorruptedError: ``data.mdb`` is damaged (truncated, overwritten, broken pages):
            found before it is mapped, so damage never crashes the process.
        PermissionDeniedError: The environment is on a read-only file system or not ours.
        RefcacheError: A read-only open of a missing environment, or another LMDB failure.
    """

    #: Environments open in this process, by real path (LMDB allows one handle per process).
    _open: ClassVar[weakref.WeakValueDictionary[str, MetaEnv]] = weakref.WeakValueDictionary()
    _open_lock = threading.Lock()

    @classmethod
    def lookup(cls, path: str | os.PathLike[str]) -> MetaEnv | None:
        """The environment at ``path`` if this process has it open, else ``None``."""
        with cls._open_lock:
            env = cls._open.get(os.path.realpath(path))
        if env is None or env._closed:
            return None
        return env

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        readonly: bool = False,
        map_size: int = _DEFAULT_MAP_SIZE,
        max_map_size: int = _MAX_MAP_SIZE,
        verify: Literal["full", "header"] | None = None,
    ) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._max_map_size = max_map_size
        self._write_lock = threading.RLock()
        # Map growth needs every transaction of this process closed: readers register here.
        # The gate's lock is also used bare: Condition's Python-level __enter__ costs more
        # than a whole LMDB read transaction.
        self._gate_lock = threading.Lock()
        self._gate = threading.Condition(self._gate_lock)
        self._readers = 0
        self._growing = False
        # Registered WriteWatch objects (a tuple, replaced whole: writers read it unlocked).
        self._watches: tuple[WriteWatch, ...] = ()
        data = self.path / _DATA_FILE
        if readonly:
            if not data.exists():
                msg = f"no refcache metadata at {self.path}"
                raise RefcacheError(msg)
        else:
            try:
                make_private_dir(self.path, parents=True)
                self._remove_staging_leftovers()
                if not data.exists():
                    self._create(map_size)
            except OSError as exc:
                raise access_error(
                    "cannot create the metadata environment", self.path, exc
                ) from exc
        if verify is None:
            verify = "header" if readonly and lock_held(self.path.parent) else "full"
        check_data_file(data, full=verify == "full")
        options: dict[str, Any] = {
            "map_size": map_size,
            "max_dbs": _MAX_DBS,
            "max_readers": _MAX_READERS,
            "readonly": readonly,
            "create": False,
            "mode": PRIVATE_FILE_MODE,
            "sync": True,
            "metasync": False,
            "readahead": False,
        }
        try:
            try:
                self._env = lmdb.open(str(self.path), **options)
            except lmdb.Error as exc:
                if not (readonly and getattr(exc, "code", 0) == errno.EROFS):
                    raise
                # A cache on a read-only file system: nobody can be writing it, so a reader
                # needs no lock table (LMDB's documented use of MDB_NOLOCK).
                self._env = lmdb.open(str(self.path), lock=False, **options)
        except lmdb.Error as exc:
            raise self.error("cannot open the metadata environment", exc) from exc
        self._closed = False
        self._group: GroupWriter | None = None
        try:
            self._max_key_size = int(self._env.max_key_size())
            self._open_dbs()
            self._check_schema()
        except lmdb.Error as exc:
            self._env.close()
            raise self.error("cannot read the metadata environment", exc) from exc
        except BaseException:
            # LMDB allows one open handle per environment and process: never leak one.
            self._env.close()
            raise
        with MetaEnv._open_lock:
            MetaEnv._open[os.path.realpath(self.path)] = self

    def _open_dbs(self) -> None:
        self._dbs: dict[str, Any] = {}
        if self.readonly:
            # Without a txn argument py-lmdb opens each handle in its own committed read
            # transaction: a handle opened in an aborted read transaction would be invalid.
            for name in DB_NAMES:
                try:
                    self._dbs[name] = self._env.open_db(name.encode(), create=False)
                except lmdb.NotFoundError:
                    self._dbs[name] = None
        else:
            with self._env.begin(write=True) as txn:
                for name in DB_NAMES:
                    self._dbs[name] = self._env.open_db(name.encode(), txn=txn)

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the environment (after draining the group writer). Safe to call twice."""
        group = self._group
        if group is not None:
            group.close()
        self._closed = True
        with MetaEnv._open_lock:
            key = os.path.realpath(self.path)
            if MetaEnv._open.get(key) is self:
                del MetaEnv._open[key]
        # Wait (bounded) for a write transaction in flight in another thread (a job, or a
        # caller writing a group batch): closing LMDB under it would invalidate it midway.
        locked = self._write_lock.acquire(timeout=_CLOSE_WAIT)
        try:
            self._env.close()
        finally:
            if locked:
                self._write_lock.release()

    def __enter__(self) -> MetaEnv:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def handle(self, db: str) -> Any:
        """Returns the LMDB handle of the named database."""
        try:
            handle = self._dbs[db]
        except KeyError:
            msg = f"unknown metadata database {db!r}; known: {', '.join(DB_NAMES)}"
            raise RefcacheError(msg) from None
        if handle is None:
            msg = f"metadata database {db!r} does not exist yet in read-only {self.path}"
            raise RefcacheError(msg)
        return handle

    # -- schema ---------------------------------------------------------------------------

    def _check_schema(self) -> None:
        with self.read_txn() as txn:
            raw = txn.get(DB_INFO, _SCHEMA_KEY) if self._dbs.get(DB_INFO) is not None else None
            has_records = self._dbs.get(DB_RECORDS) is not None and txn.count(DB_RECORDS) > 0
        if raw is None:
            if has_records:
                msg = f"metadata at {self.path} has records but no schema version; not guessing"
                raise IncompatibleSchemaError(msg)
            if not self.readonly:
                with self.write_txn() as wtxn:
                    wtxn.put(DB_INFO, _SCHEMA_KEY, msgpack.packb(SCHEMA_VERSION))
            return
        try:
            version = msgpack.unpackb(raw)
        except (ValueError, msgpack.UnpackException) as exc:
            msg = f"metadata at {self.path} has an unreadable schema version {raw!r}"
            raise IncompatibleSchemaError(msg) from exc
        if not isinstance(version, int) or isinstance(version, bool) or version != SCHEMA_VERSION:
            msg = (
                f"metadata at {self.path} has schema version {version!r}; this refcache "
                f"understands version {SCHEMA_VERSION} only (newer data needs a newer refcache)"
            )
            raise IncompatibleSchemaError(msg)

    # -- transactions -----------------------------------------------------------------------

    def read_txn(self, *, buffers: bool = False) -> AbstractContextManager[ReadTxn]:
        """Returns a context manager yielding a consistent read-only view.

        Keep it short (it pins old pages). A plain class rather than a generator context
        manager: one ``store.get`` is a few microseconds, and the generator machinery and a
        wake-up of every waiter on each exit were half of it.

        Args:
            buffers: Make :meth:`ReadTxn.views` yield zero-copy :class:`memoryview` objects
                (valid only inside the transaction). The other reads return ``bytes`` either way.
        """
        return _ReadScope(self, buffers)

    def _enter_reader(self) -> None:
        with self._gate_lock:
            while self._growing:
                self._gate.wait()
            self._readers += 1

    def _leave_reader(self) -> None:
        with self._gate_lock:
            self._readers -= 1
            if self._growing:
                self._gate.notify_all()  # only a map growth waits for readers to leave

    @contextmanager
    def write_txn(self) -> Iterator[WriteTxn]:
        """Yields a write transaction; commits on a clean exit, rolls back on any exception.

        Callbacks registered with :meth:`WriteTxn.after_commit` run after the commit, in order;
        a failing callback is logged and does not undo the commit.

        Raises:
            StoreFullError: The map could not grow enough for this transaction.
        """
        if self.readonly:
            msg = f"metadata environment {self.path} is open read-only"
            raise RefcacheError(msg)
        with self._write_lock:
            wtxn = WriteTxn(self, self._begin(write=True))
            try:
                yield wtxn
            except BaseException:
                wtxn._txn.abort()
                wtxn._rolled_back()
                raise
            try:
                wtxn._run_before()
                self._commit(wtxn)
            except BaseException:
                with contextlib.suppress(lmdb.Error):
                    wtxn._txn.abort()
                wtxn._rolled_back()
                raise
            for callback in wtxn._after:
                try:
                    callback()
                except Exception:
                    logger.exception("after-commit callback %r failed", callback)
            # Callbacks often refer to the transaction (a batch holding it): dropping them
            # leaves no reference cycle per write for the cyclic collector to find.
            wtxn._after.clear()
        for callback in wtxn._after_unlock:
            try:
                callback()
            except Exception:
                logger.exception("after-unlock callback %r failed", callback)
        wtxn._after_unlock.clear()

    @property
    def group(self) -> GroupWriter:
        """The group-commit writer of this environment (started on first use).

        ``env.group.write(fn)`` runs ``fn(txn)`` in a transaction shared with the writes
        other threads submit meanwhile and returns once it is durable (see
        :mod:`storage._groupwrite`).
        """
        group = self._group
        if group is None:
            with self._gate_lock:
                if self._group is None:
                    self._group = GroupWriter(self)
                group = self._group
        return group

    @contextmanager
    def watch_writes(self, dbs: Iterable[str]) -> Iterator[WriteWatch]:
        """Notes every put to ``dbs`` from now until the block exits (see :class:`WriteWatch`).

        The watch's :attr:`~WriteWatch.snapshot` is a read transaction begun at the instant
        the watch was registered; enter it (once) to read that state, and leave it before
        opening a write transaction in the same thread.
        """
        scope = self.read_txn()
        opened = False

        @contextmanager
        def snapshot() -> Iterator[ReadTxn]:
            nonlocal opened
            try:
                yield rtxn
            finally:
                if opened:
                    opened = False
                    scope.__exit__(None, None, None)

        watch = WriteWatch(dbs, snapshot())
        with self._write_lock:
            # Begun while no write transaction is open: it shows every write not noted.
            rtxn = scope.__enter__()
            opened = True
            self._watches = (*self._watches, watch)
        try:
            yield watch
        finally:
            if opened:
                opened = False
                scope.__exit__(None, None, None)
            with self._write_lock:
                self._watches = tuple(w for w in self._watches if w is not watch)

    @contextmanager
    def joined_write(self, txn: WriteTxn | None) -> Iterator[WriteTxn]:
        """Yields the caller's ``txn`` (its commit stays the caller's), else a new one.

        For the backends' ``txn=`` parameters: with a transaction, the work joins it;
        without, it runs in its own :meth:`write_txn`.
        """
        if txn is not None:
            yield txn
            return
        with self.write_txn() as own:
            yield own

    @contextmanager
    def joined_read(self, txn: ReadTxn | None) -> Iterator[ReadTxn]:
        """Yields the caller's ``txn``, else a new :meth:`read_txn`."""
        if txn is not None:
            yield txn
            return
        with self.read_txn() as own:
            yield own

    def _new_write_txn(self) -> WriteTxn:
        # For the group writer, which holds _write_lock itself.
        return WriteTxn(self, self._begin(write=True))

    def _commit(self, wtxn: WriteTxn) -> None:
        try:
            wtxn._txn.commit()
        except lmdb.MapFullError:
            wtxn._txn.abort()
            self._regrow(wtxn)
            self._commit(wtxn)
        except lmdb.Error as exc:
            with contextlib.suppress(lmdb.Error):
                wtxn._txn.abort()
            raise self.error("metadata commit", exc, write=True) from exc

    def _regrow(self, wtxn: WriteTxn) -> bool:
        """Grows the map and replays every logged write of ``wtxn`` in a new transaction.

        Runs with :attr:`_write_lock` held and ``wtxn``'s old transaction aborted, so no other
        writer of this process saw or changed anything in between: the replay is exact.
        Returns the result of the last replayed write.
        """
        while True:
            self._grow()
            wtxn._txn = self._begin(write=True)
            try:
                return wtxn._replay()
            except lmdb.MapFullError:
                wtxn._txn.abort()

    def _grow(self) -> None:
        try:
            current = int(self._env.info()["map_size"])
        except lmdb.Error as exc:
            raise self.error("reading the metadata map size", exc) from exc
        new = current * 2
        if new > self._max_map_size:
            msg = (
                f"metadata map in {self.path} is full at {current} bytes and may not grow past "
                f"{self._max_map_size}"
            )
            raise StoreFullError(msg)
        with self._gate:
            self._growing = True
            try:
                while self._readers:
                    self._gate.wait()
                try:
                    self._env.set_mapsize(new)
                except lmdb.Error as exc:
                    raise self.error("growing the metadata map", exc, write=True) from exc
            finally:
                self._growing = False
                self._gate.notify_all()
        logger.info("metadata map in %s grown from %d to %d bytes", self.path, current, new)

    def _begin(self, *, write: bool, buffers: bool = False) -> lmdb.Transaction:
        try:
            try:
                return self._begin_raw(write, buffers)
            except lmdb.MapResizedError:
                # Another process grew the map: adopt its size (LMDB's documented remedy).
                self._env.set_mapsize(0)
                return self._begin_raw(write, buffers)
        except lmdb.Error as exc:
            raise self.error("cannot begin a metadata transaction", exc, write=write) from exc

    def _begin_raw(self, write: bool, buffers: bool) -> lmdb.Transaction:
        if buffers:
            return self._env.begin(write=write, buffers=True)
        return self._env.begin(write=write)

    # -- facts ----------------------------------------------------------------------------

    def map_info(self) -> tuple[int, int]:
        """Returns ``(map_size, used_bytes)`` of the environment (for metrics)."""
        try:
            info = self._env.info()
            stat = self._env.stat()
        except lmdb.Error as exc:
            raise self.error("cannot read the metadata environment's size", exc) from exc
        used = (int(info["last_pgno"]) + 1) * int(stat["psize"])
        return int(info["map_size"]), used

    def error(self, what: str, exc: lmdb.Error, *, write: bool = False) -> RefcacheError:
        """The refcache error for an LMDB error met doing ``what`` (the storage boundary).

        Damage (corrupt or missing pages, bad meta pages, a transaction LMDB gave up on)
        is :class:`CorruptedError`; a full disk (``ENOSPC``/``EDQUOT``, or ``EIO`` while
        writing: LMDB reports a short write as ``EIO``) is :class:`StoreFullError`;
        ``EROFS``/``EACCES`` are :class:`PermissionDeniedError`; an unstorable key is
        :class:`InvalidError`. The message names the environment.
        """
        code = getattr(exc, "code", 0)
        where = f"{what} failed in {self.path}"
        if isinstance(exc, _CORRUPTION):
            return CorruptedError(f"{where}: the metadata is damaged: {exc}")
        if isinstance(exc, lmdb.DiskError) or code in (errno.ENOSPC, errno.EDQUOT):
            return StoreFullError(f"{where}: the disk is full: {exc}")
        if write and code == errno.EIO:
            return StoreFullError(
                f"{where}: {exc} (a short write: the disk is full or failing; "
                f"{_free_bytes(self.path)} bytes free)"
            )
        if isinstance(exc, lmdb.ReadonlyError) or code in (errno.EROFS, errno.EACCES, errno.EPERM):
            oserr = OSError(code or errno.EACCES, os.strerror(code or errno.EACCES))
            return access_error(f"{what}: cannot use", self.path, oserr)
        if isinstance(exc, lmdb.BadValsizeError):
            return InvalidError(f"{where}: {exc}")
        return RefcacheError(f"{where}: {exc}")

    def _remove_staging_leftovers(self) -> None:
        # A creation killed half-way (the cache's lock makes this the only writer).
        for leftover in self.path.parent.glob(_staging_prefix(self.path) + "*"):
            with contextlib.suppress(OSError):
                remove_tree(leftover)

    def _create(self, map_size: int) -> None:
        """Creates a new, empty environment in a staging directory, then moves it in.

        ``data.mdb`` appears complete (valid meta pages, the schema version written) or not
        at all, so an empty or half-written ``data.mdb`` is always damage, never "new".
        """
        stage = self.path.parent / (_staging_prefix(self.path) + secrets.token_hex(6))
        make_private_dir(stage)
        try:
            env = lmdb.open(str(stage), map_size=map_size, max_dbs=_MAX_DBS, mode=PRIVATE_FILE_MODE)
            try:
                with env.begin(write=True) as txn:
                    for name in DB_NAMES:
                        env.open_db(name.encode(), txn=txn)
                    info = env.open_db(DB_INFO.encode(), txn=txn)
                    txn.put(_SCHEMA_KEY, msgpack.packb(SCHEMA_VERSION), db=info)
                env.sync(True)
            finally:
                env.close()
            os.rename(stage / _DATA_FILE, self.path / _DATA_FILE)
            fsync_dir(self.path)
        except lmdb.Error as exc:
            raise self.error("cannot create the metadata environment", exc, write=True) from exc
        finally:
            with contextlib.suppress(OSError):
                remove_tree(stage)


_DATA_FILE = "data.mdb"


def _staging_prefix(path: Path) -> str:
    return f".{path.name}.new-"


# LMDB errors that mean the environment itself is damaged.
_CORRUPTION: tuple[type[lmdb.Error], ...] = tuple(
    getattr(lmdb, name)
    for name in (
        "CorruptedError",
        "PageNotFoundError",
        "InvalidError",
        "VersionMismatchError",
        "PanicError",
        "BadTxnError",
        "BadRslotError",
        "BadDbiError",
        "IncompatibleError",
        "BadChecksumError",
        "ProblemError",
    )
    if hasattr(lmdb, name)
)

# On-disk constants of LMDB's meta pages (64-bit builds; both engines).
_MDB_MAGIC = 0xBEEFC0DE
_META_HEADER_SIZES = {16: 1, 24: 3}  # page header size -> data version (LMDB 0.9, 1.0)
_MDB_DB_SIZE = 48
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")


def _data_version() -> int:
    """The data-file version the linked LMDB writes (1 for 0.9.x, 3 for 1.0)."""
    major = lmdb.version()[0]
    return 3 if major >= 1 else 1


def _read_meta(fd: int, offset: int, hdrsz: int, data: Path, slot: int) -> tuple[int, int, int]:
    """``(page size, last page, txnid)`` of the meta page at ``offset``."""
    buf = os.pread(fd, hdrsz + 24 + 2 * _MDB_DB_SIZE + 16, offset)
    if len(buf) < hdrsz + 24 + 2 * _MDB_DB_SIZE + 16:
        msg = f"metadata file {data} is damaged: meta page {slot} is truncated"
        raise CorruptedError(msg)
    (magic,) = _U32.unpack_from(buf, hdrsz)
    (version,) = _U32.unpack_from(buf, hdrsz + 4)
    if magic != _MDB_MAGIC:
        msg = f"metadata file {data} is damaged: meta page {slot} has bad magic {magic:#x}"
        raise CorruptedError(msg)
    if version != _data_version():
        msg = (
            f"metadata file {data} is damaged or foreign: meta page {slot} is data version "
            f"{version}, this LMDB writes {_data_version()}"
        )
        raise CorruptedError(msg)
    (psize,) = _U32.unpack_from(buf, hdrsz + 24)  # mm_psize: the free DB's md_pad
    (last_pg,) = _U64.unpack_from(buf, hdrsz + 24 + 2 * _MDB_DB_SIZE)
    (txnid,) = _U64.unpack_from(buf, hdrsz + 24 + 2 * _MDB_DB_SIZE + 8)
    return psize, last_pg, txnid


def check_data_file(data: Path, *, full: bool = True) -> None:
    """Checks an LMDB ``data.mdb`` before it is mapped (a short file would be ``SIGBUS``).

    Reads both meta pages with ``pread`` (never ``mmap``): magic and data version must be
    right in both, their page sizes must agree, and the file must hold every page the newer
    one commits (``(last_pg + 1) * page_size`` bytes). With ``full``, py-lmdb's offline
    verifier then walks every reachable page (tree structure, page numbers, free list).

    Raises:
        CorruptedError: naming the file and what is wrong with it.
    """
    try:
        fd = os.open(data, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise access_error("cannot read the metadata file", data, exc) from exc
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            msg = f"metadata file {data} is damaged: it is empty (truncated)"
            raise CorruptedError(msg)
        head = os.pread(fd, 64, 0)
        hdrsz = next(
            (
                h
                for h in _META_HEADER_SIZES
                if len(head) >= h + 4 and _U32.unpack_from(head, h)[0] == _MDB_MAGIC
            ),
            None,
        )
        if hdrsz is None:
            msg = f"metadata file {data} is damaged: it is not an LMDB data file (no magic)"
            raise CorruptedError(msg)
        psize, last0, txn0 = _read_meta(fd, 0, hdrsz, data, 0)
        if psize < 512 or psize > 65536 or psize & (psize - 1):
            msg = f"metadata file {data} is damaged: implausible page size {psize}"
            raise CorruptedError(msg)
        psize1, last1, txn1 = _read_meta(fd, psize, hdrsz, data, 1)
        if psize1 != psize:
            msg = f"metadata file {data} is damaged: its meta pages disagree on the page size"
            raise CorruptedError(msg)
        last_pg = last1 if txn1 > txn0 else last0
        need = (last_pg + 1) * psize
        if size < need:
            msg = (
                f"metadata file {data} is damaged: it is {size} bytes, but its committed "
                f"state needs {need} ({last_pg + 1} pages of {psize}); it was truncated"
            )
            raise CorruptedError(msg)
    finally:
        os.close(fd)
    if full and _lmdb_verify is not None:
        try:
            problems = _lmdb_verify.verify(str(data), subdir=False)
        except _lmdb_verify.VerifyError as exc:
            msg = f"metadata file {data} is damaged: {exc}"
            raise CorruptedError(msg) from exc
        except OSError as exc:
            raise access_error("cannot read the metadata file", data, exc) from exc
        if problems:
            shown = "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else "")
            msg = f"metadata file {data} is damaged: {len(problems)} problem(s): {shown}"
            raise CorruptedError(msg)


def _free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize
