"""The snapshotter protocol and the directory life cycle shared by the native and overlay backends.

A port of containerd's backend snapshotter contract (``core/snapshots/snapshotter.go``) with
BuildKit's merge (``snapshot/merge.go``). The pieces live apart: the metadata records in
``storage/_snapmeta.py``, copying and measuring trees in ``storage/_fscopy.py``, the change
walk in ``storage/_changes.py`` and the merge applier in ``storage/_merge.py``; the backends
are ``storage/_native.py`` and ``storage/_overlay.py``.

Directories: ``<root>/snapshots/<id>`` (native: the tree itself; overlay: ``fs/`` and
``work/``). File work follows containerd: a new snapshot is built in ``new-<random>``, renamed
to ``<id>`` inside the write transaction that records it (after an ``fsync`` of the tree), and
thrown away if that transaction fails; a removed snapshot's directory is renamed to
``<root>/trash/<id>`` inside the transaction that forgets it and deleted by the trash's
background worker once that transaction has committed (``storage/_trash.py``): neither the
write lock nor the caller waits for a tree to be deleted. :meth:`BaseSnapshotter.cleanup`
(run at open) renames back the trash entry of a snapshot whose removal never committed,
throws away leftover ``new-*``/``rm-*`` directories and directories that no record names,
and has the worker delete whatever is in the trash.

Caller transactions: with ``txn=…`` the directory is built and renamed into place inside the
caller's transaction. If that transaction rolls back, ``WriteTxn.after_rollback`` removes the
directory (and :meth:`BaseSnapshotter.cleanup` at the next open, after a crash). Ids are never
reused while such a directory exists.

Thread safety: a snapshotter may be used from several threads. Metadata changes are LMDB
write transactions (serialised); copies, merges and size walks run outside them (re-checking
what they read when they commit), except when the caller passes its own ``txn``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import msgpack

from ._changes import LayerStack
from ._env import DB_SNAPSHOTS, MetaEnv, ReadTxn, WriteTxn
from ._errors import (
    AlreadyExistsError,
    CorruptMetadataError,
    FailedPreconditionError,
    InvalidError,
    NotFoundError,
    RefcacheError,
    StoreFullError,
)
from ._filters import map_field, parse_filters
from ._fscopy import disk_usage, sync_filesystem
from ._layout import make_private_dir
from ._merge import merge_into
from ._snapmeta import (
    SEQ_KEY,
    SNAPSHOTTER_NAME_KEY,
    SnapshotRecord,
    check_key,
    check_labels,
    check_parent,
    check_txn,
    child_key,
    get_record,
    has_children,
    iter_records,
    must_get_record,
    parent_chain,
    put_record,
    read_seq,
    record_fields,
    stored_snapshotter_name,
)
from ._trash import Trash
from ._tree import fsync_dir, fsync_tree_dirs, remove_tree
from ._types import Kind, Mount, SnapshotInfo, Usage

__all__ = ["BaseSnapshotter", "BuildPlan", "Snapshotter"]

logger = logging.getLogger(__name__)


@runtime_checkable
class Snapshotter(Protocol):
    """containerd's backend snapshotter, with BuildKit's ``merge`` and a local ``path``.

    Keys name active and view snapshots, names name committed ones; both share one
    namespace. Every mutating method takes an optional ``txn``: the metadata work then joins
    that write transaction, and file deletions wait for its commit.
    """

    @property
    def name(self) -> str:
        """``"native"`` or ``"overlayfs"`` (lease resource type ``snapshots/<name>``)."""
        ...

    def stat(self, key: str) -> SnapshotInfo:
        """Returns the info of ``key`` (any kind)."""
        ...

    def update(
        self, info: SnapshotInfo, *fieldpaths: str, txn: WriteTxn | None = None
    ) -> SnapshotInfo:
        """Updates the labels of ``info.name``; only ``labels``/``labels.<k>`` may change."""
        ...

    def usage(self, key: str) -> Usage:
        """Own disk usage of ``key``, excluding parents (live for active snapshots)."""
        ...

    def mounts(self, key: str) -> list[Mount]:
        """The mounts of an active or view snapshot (as ``prepare``/``view`` returned)."""
        ...

    def prepare(
        self,
        key: str,
        parent: str = "",
        *,
        labels: Mapping[str, str] | None = None,
        txn: WriteTxn | None = None,
    ) -> list[Mount]:
        """Creates an active (writable) snapshot ``key`` on the committed ``parent``."""
        ...

    def stage_prepare(
        self, key: str, parent: str = "", *, labels: Mapping[str, str] | None = None
    ) -> StagedSnapshot:
        """Builds active snapshot ``key``'s directory now; it is recorded in a transaction
        later (:meth:`StagedSnapshot.record`): ``prepare`` split for a group write."""
        ...

    def view(
        self,
        key: str,
        parent: str = "",
        *,
        labels: Mapping[str, str] | None = None,
        txn: WriteTxn | None = None,
    ) -> list[Mount]:
        """Creates a read-only view ``key`` of the committed ``parent``."""
        ...

    def commit(
        self,
        name: str,
        key: str,
        *,
        labels: Mapping[str, str] | None = None,
        txn: WriteTxn | None = None,
    ) -> None:
        """Turns active ``key`` into committed ``name`` (``key`` goes away)."""
        ...

    def remove(self, key: str, *, txn: WriteTxn | None = None) -> None:
        """Removes a snapshot without children."""
        ...

    def walk(self, *filters: str) -> Iterator[SnapshotInfo]:
        """Yields the snapshots matching any of the containerd filter strings."""
        ...

    def kinds(self, keys: Iterable[str]) -> dict[str, Kind]:
        """The kind of each of ``keys`` that exists, read in one transaction (a batched
        :meth:`stat` for checks over many records)."""
        ...

    def close(self) -> None:
        """Closes the snapshotter (idempotent)."""
        ...

    def path(self, key: str) -> Path:
        """A plain local directory of ``key`` (native: the tree; overlay: its own layer)."""
        ...

    def merge(
        self,
        key: str,
        diffs: Sequence[tuple[str, str]],
        *,
        labels: Mapping[str, str] | None = None,
        txn: WriteTxn | None = None,
    ) -> None:
        """Creates committed ``key`` by applying each ``(lower, upper)`` diff in order."""
        ...

    def cleanup(self) -> list[Path]:
        """Deletes directories no record needs; returns them."""
        ...

    def orphans(self) -> list[Path]:
        """Directories under the snapshot root that no record needs."""
        ...

    def missing(self) -> list[str]:
        """Keys whose directory is missing."""
        ...


class StagedSnapshot:
    """A new active snapshot whose directory is built but not yet recorded.

    :meth:`BaseSnapshotter.stage_prepare` does the slow half of ``prepare`` (building the
    ``new-*`` directory and flushing it) outside any transaction; :meth:`record` does the
    rest inside the caller's write transaction, which may be a group commit shared with other
    writers: the directory is renamed to ``<id>`` there, the ``fsync`` of the snapshot root
    that makes the rename durable runs once per transaction, before its commit, and a
    rollback removes the directory. :meth:`discard` removes a directory never recorded.
    """

    __slots__ = ("_labels", "_plan", "_recorded", "_sn", "_tmp", "_usage")

    def __init__(
        self,
        sn: BaseSnapshotter,
        plan: BuildPlan,
        tmp: Path | None,
        labels: dict[str, str],
        usage: Usage | None,
    ) -> None:
        self._sn = sn
        self._plan = plan
        self._tmp = tmp
        self._labels = labels
        self._usage = usage
        self._recorded = False

    def record(self, txn: WriteTxn) -> None:
        """Records the snapshot in ``txn`` (the caller commits).

        Raises:
            AlreadyExistsError: the key was taken meanwhile.
            FailedPreconditionError: the parent chain changed meanwhile.
        """
        sn, plan, tmp = self._sn, self._plan, self._tmp
        if self._recorded:
            msg = f"snapshot {plan.key!r} was recorded already"
            raise FailedPreconditionError(msg)
        parent = plan.parent.key if plan.parent else ""
        again = sn._plan(txn, plan.kind, plan.key, parent)
        _check_same_chain(plan, again)
        sid: str | None = None
        try:
            sid = sn._stage(txn, again, tmp, self._labels, self._usage, sync_dir=False)
        except BaseException:
            sn._discard(tmp, sid)
            self._tmp = None
            raise
        self._recorded = True
        if tmp is not None:
            staged = sid
            dirs = sn._dirs
            txn.before_commit(("fsync_dir", str(dirs)), lambda: fsync_dir(dirs))
            txn.after_commit(lambda: sn._forget_inflight(staged))
            txn.after_rollback(lambda: sn._discard(None, staged))

    def discard(self) -> None:
        """Removes the directory if it was never recorded (safe to call after a failure)."""
        if not self._recorded and self._tmp is not None:
            self._sn._discard(self._tmp, None)
            self._tmp = None


@dataclass(slots=True)
class BuildPlan:
    """What a new snapshot is: its kind and key, its parent and the parent's whole chain."""

    kind: Kind
    key: str
    parent: SnapshotRecord | None
    chain: list[SnapshotRecord]


class BaseSnapshotter:
    """The :class:`Snapshotter` protocol over the shared metadata, for both backends.

    Subclasses set :attr:`name` and implement :meth:`_build`, :meth:`_mounts`,
    :meth:`_owns_dir`, :meth:`_usage_dir`, :meth:`_local_dir` and
    :meth:`_content_tree`.

    Args:
        root: The cache root (``open_cache`` passes it); snapshot directories live in
            ``root/snapshots``.
        env: The cache's metadata environment.
        clean: Record the backend name and remove leftovers at open (``False`` for an
            inspecting view of a cache that is open elsewhere).

    Raises:
        FailedPreconditionError: The cache was created with another snapshotter.
    """

    name: str = ""

    def __init__(self, root: str | os.PathLike[str], env: MetaEnv, *, clean: bool = True) -> None:
        if not isinstance(env, MetaEnv):
            msg = f"env must be a MetaEnv, got {env!r}"
            raise InvalidError(msg)
        self.root = Path(root)
        self._env = env
        self._dirs = self.root / "snapshots"
        self._lock = threading.Lock()
        self._inflight: set[str] = set()
        self._closed = False
        stored = stored_snapshotter_name(env)
        if stored is not None and stored != self.name:
            msg = (
                f"the cache metadata in {env.path} was created with the {stored!r} "
                f"snapshotter; it cannot be opened with {self.name!r} (open it with "
                f"{stored!r} or 'auto')"
            )
            raise FailedPreconditionError(msg)
        #: What :meth:`cleanup` threw away when the snapshotter was opened.
        self.cleaned: list[Path] = []
        writable = clean and not env.readonly
        #: Removed directories wait here until its worker has deleted them.
        self.trash = Trash(self.root, create=writable)
        # clean=False: an inspecting view of a cache that another object may be writing
        # (``storage.check``); it must neither record a name nor remove anything.
        if writable:
            # Private (0700): snapshots hold set-id files and devices of extracted layers.
            make_private_dir(self._dirs, parents=True)
            if stored is None:
                with env.write_txn() as txn:
                    if txn.get(DB_SNAPSHOTS, SNAPSHOTTER_NAME_KEY) is None:
                        txn.put(DB_SNAPSHOTS, SNAPSHOTTER_NAME_KEY, msgpack.packb(self.name))
            self.cleaned = self.cleanup()
            if self.cleaned:
                logger.info(
                    "snapshotter %s at %s: removed leftovers %s",
                    self.name,
                    self.root,
                    [str(p) for p in self.cleaned],
                )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    # -- backend hooks ----------------------------------------------------------------------

    def _snapshot_dir(self, sid: str) -> Path:
        return self._dirs / sid

    def _owns_dir(self, kind: Kind, has_parent: bool) -> bool:
        raise NotImplementedError

    def _build(self, tmp: Path, plan: BuildPlan) -> None:
        """Fills the new snapshot directory ``tmp`` (already created, mode 0755)."""
        raise NotImplementedError

    def _mounts(self, rec: SnapshotRecord, chain: list[SnapshotRecord]) -> list[Mount]:
        raise NotImplementedError

    def _usage_dir(self, sid: str) -> Path:
        raise NotImplementedError

    def _content_tree(self, rec: SnapshotRecord, chain: list[SnapshotRecord]) -> LayerStack:
        """The full content of committed ``rec`` (with parents): its layer directories."""
        raise NotImplementedError

    def _local_dir(self, rec: SnapshotRecord, chain: list[SnapshotRecord]) -> Path:
        """The plain local directory :meth:`path` returns for ``rec``."""
        raise NotImplementedError

    def path(self, key: str) -> Path:
        """A plain local directory of snapshot ``key``.

        Native: the snapshot's tree, ``<root>/snapshots/<id>`` (for a view of a parent, the
        parent's directory, which the view mounts). Overlay: the snapshot's own layer,
        ``<root>/snapshots/<id>/fs`` (an active snapshot's upperdir), not its merged
        content; :func:`~._mount.local_mount` of :meth:`mounts` shows the whole tree.

        Raises:
            InvalidError: ``key`` is not a valid key.
            NotFoundError: No such snapshot.
        """
        key = check_key(key)
        self._check_open()
        with self._env.read_txn() as txn:
            rec = must_get_record(txn, key)
            chain = parent_chain(txn, rec) if rec.kind == Kind.VIEW and rec.parent else []
        return self._local_dir(rec, chain)

    # -- helpers ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            msg = f"{self.name} snapshotter at {self.root} is closed"
            raise FailedPreconditionError(msg)

    def _read(self, key: str) -> SnapshotRecord:
        with self._env.read_txn() as txn:
            return must_get_record(txn, key)

    def _allocate_id(self, txn: WriteTxn) -> str:
        seq = read_seq(txn)
        while True:
            seq += 1
            sid = str(seq)
            # A rolled-back caller transaction may have used this id for a directory that is
            # still on disk: never reuse such an id.
            with self._lock:
                busy = sid in self._inflight or f"rm-{sid}" in self._inflight
            if not busy and not os.path.lexists(self._dirs / sid):
                break
        txn.put(DB_SNAPSHOTS, SEQ_KEY, msgpack.packb(seq))
        return sid

    def _plan(self, txn: ReadTxn, kind: Kind, key: str, parent: str) -> BuildPlan:
        if get_record(txn, key) is not None:
            msg = f"snapshot {key!r} already exists"
            raise AlreadyExistsError(msg)
        if not parent:
            return BuildPlan(kind, key, None, [])
        prec = get_record(txn, parent)
        if prec is None:
            msg = f"parent snapshot {parent!r} of {key!r} does not exist"
            raise NotFoundError(msg)
        if prec.kind != Kind.COMMITTED:
            # containerd storage.CreateSnapshot: ErrInvalidArgument.
            msg = f"parent {parent!r} of {key!r} is not a committed snapshot ({prec.kind.value})"
            raise InvalidError(msg)
        return BuildPlan(kind, key, prec, [prec, *parent_chain(txn, prec)])

    def _new_tmp(self) -> Path:
        name = "new-" + secrets.token_hex(8)
        with self._lock:
            self._inflight.add(name)
        tmp = self._dirs / name
        tmp.mkdir(0o755)
        # containerd: mkdtemp, then chmod 0755 (a rootfs is world-readable; umask not ours).
        os.chmod(tmp, 0o755)  # noqa: S103
        return tmp

    def _forget_inflight(self, *names: str) -> None:
        with self._lock:
            for name in names:
                self._inflight.discard(name)

    def _stage(
        self,
        txn: WriteTxn,
        plan: BuildPlan,
        tmp: Path | None,
        labels: dict[str, str],
        usage: Usage | None,
        *,
        sync_dir: bool = True,
    ) -> str:
        sid = self._allocate_id(txn)
        now = time.time_ns()
        rec = SnapshotRecord(
            plan.key,
            {
                "id": sid,
                "kind": plan.kind.value,
                "parent": plan.parent.key if plan.parent else "",
                "labels": {k: v for k, v in labels.items() if v},
                "created_at": now,
                "updated_at": now,
                "usage": [usage.size, usage.inodes] if usage is not None else None,
            },
        )
        put_record(txn, rec)
        if plan.parent is not None:
            txn.put(DB_SNAPSHOTS, child_key(plan.parent.key, plan.key), b"")
        if tmp is not None:
            with self._lock:
                self._inflight.add(sid)
            final = self._snapshot_dir(sid)
            try:
                os.rename(tmp, final)
            except OSError as exc:
                self._forget_inflight(sid)
                msg = f"cannot move new snapshot {plan.key!r} from {tmp} to {final}: {exc}"
                raise RefcacheError(msg) from exc
            self._forget_inflight(tmp.name)
            if sync_dir:
                fsync_dir(self._dirs)
        return sid

    def _discard(self, tmp: Path | None, sid: str | None) -> None:
        # The transaction that would have recorded the directory failed: throw away what we
        # made (this may run under the write lock, after a rollback: a rename, no deletion).
        for path in (tmp, self._snapshot_dir(sid) if sid else None):
            if path is not None:
                self._throw_away(path)
        names = [n for n in (tmp.name if tmp else None, sid) if n]
        self._forget_inflight(*names)

    def _throw_away(self, path: Path) -> None:
        """Moves ``path`` into the trash (deleted in the background), else deletes it now."""
        try:
            self.trash.throw_away(path)
        except OSError as exc:
            logger.debug("cannot move %s to the trash (%s); deleting it now", path, exc)
            _remove_quietly(path)

    def _create(
        self,
        kind: Kind,
        key: str,
        parent: str,
        labels: Mapping[str, str] | None,
        txn: WriteTxn | None,
        *,
        build: Callable[[Path, BuildPlan], Usage | None] | None = None,
    ) -> SnapshotRecord:
        key = check_key(key)
        parent = check_parent(parent)
        checked = check_labels(labels)
        txn = check_txn(txn)
        self._check_open()
        builder = build or self._build_default
        if txn is not None:
            return self._create_in(txn, kind, key, parent, checked, builder)
        with self._env.read_txn() as rtxn:
            plan = self._plan(rtxn, kind, key, parent)
        tmp, usage = self._make_dir(plan, builder)
        sid: str | None = None
        try:
            with self._env.write_txn() as wtxn:
                again = self._plan(wtxn, kind, key, parent)
                _check_same_chain(plan, again)
                sid = self._stage(wtxn, again, tmp, checked, usage)
                rec = must_get_record(wtxn, key)
        except BaseException:
            self._discard(tmp, sid)
            raise
        if sid is not None:
            self._forget_inflight(sid)
        return rec

    def _create_in(
        self,
        txn: WriteTxn,
        kind: Kind,
        key: str,
        parent: str,
        labels: dict[str, str],
        builder: Callable[[Path, BuildPlan], Usage | None],
    ) -> SnapshotRecord:
        """Builds and records the snapshot inside the caller's ``txn``."""
        plan = self._plan(txn, kind, key, parent)
        tmp, usage = self._make_dir(plan, builder)
        sid: str | None = None
        try:
            sid = self._stage(txn, plan, tmp, labels, usage)
            rec = must_get_record(txn, key)
        except BaseException:
            self._discard(tmp, sid)
            raise
        if tmp is not None:
            # The directory is in place before the caller's transaction ends: it stops being
            # in flight when that commits, and goes if it rolls back.
            staged = rec.id
            txn.after_commit(lambda: self._forget_inflight(staged))
            txn.after_rollback(lambda: self._discard(None, staged))
        return rec

    def _build_default(self, tmp: Path, plan: BuildPlan) -> Usage | None:
        self._build(tmp, plan)
        return None

    def _make_dir(
        self, plan: BuildPlan, builder: Callable[[Path, BuildPlan], Usage | None]
    ) -> tuple[Path | None, Usage | None]:
        if not self._owns_dir(plan.kind, plan.parent is not None):
            return None, None
        tmp = self._new_tmp()
        try:
            usage = builder(tmp, plan)
            # Flush the tree before the transaction that points at it commits, but outside
            # that transaction's writer lock. A snapshot without a parent holds only empty
            # directories: fsyncing them is enough (syncfs would flush the whole disk).
            if plan.parent is not None:
                sync_filesystem(tmp)
            else:
                fsync_tree_dirs(tmp)
        except BaseException as exc:
            self._discard(tmp, None)
            if isinstance(exc, OSError):
                msg = f"cannot build snapshot {plan.key!r} in {tmp}: {exc}"
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise StoreFullError(msg) from exc
                raise RefcacheError(msg) from exc
            raise
        return tmp, usage

    # -- containerd Snapshotter -------------------------------------------------------------

    def stat(self, key: str) -> SnapshotInfo:
        """Returns the info of snapshot ``key``.

        Raises:
            InvalidError: ``key`` is not a valid key.
            NotFoundError: No such snapshot.
        """
        key = check_key(key)
        self._check_open()
        return self._read(key).info()

    def kinds(self, keys: Iterable[str]) -> dict[str, Kind]:
        """The kind of each of ``keys`` that exists, read in one transaction.

        A batched :meth:`stat` for checks over many records (loading the cache at open):
        one lookup per key, no per-key transaction or :class:`SnapshotInfo`.

        Raises:
            CorruptMetadataError: a stored record of one of ``keys`` is malformed.
        """
        self._check_open()
        with self._env.read_txn() as txn:
            found = txn.get_many(DB_SNAPSHOTS, [key.encode() for key in keys])
        return {
            key: record_fields(key, raw)[1]
            for raw_key, raw in found.items()
            for key in (raw_key.decode(),)
        }

    def update(
        self, info: SnapshotInfo, *fieldpaths: str, txn: WriteTxn | None = None
    ) -> SnapshotInfo:
        """Updates the labels of snapshot ``info.name`` (containerd ``Update``).

        Args:
            info: The snapshot's new info; only its labels are used.
            *fieldpaths: ``"labels"`` replaces all labels, ``"labels.<k>"`` sets one (an
                absent or empty value deletes it); none replaces all labels.
            txn: Join this write transaction.

        Returns:
            The stored info after the update (``updated_at`` is now).

        Raises:
            InvalidError: Bad types, bad labels, or a fieldpath other than labels.
            NotFoundError: No such snapshot.
        """
        if not isinstance(info, SnapshotInfo):
            msg = f"update needs a SnapshotInfo, got {info!r}"
            raise InvalidError(msg)
        key = check_key(info.name)
        new_labels = check_labels(dict(info.labels))
        for path in fieldpaths:
            if not isinstance(path, str):
                msg = f"fieldpath must be a string, got {path!r}"
                raise InvalidError(msg)
            if path != "labels" and not (path.startswith("labels.") and len(path) > 7):
                msg = f"cannot update {path!r} field on snapshot {key!r}: only labels are mutable"
                raise InvalidError(msg)
        txn = check_txn(txn)
        self._check_open()

        def apply(wtxn: WriteTxn) -> SnapshotInfo:
            rec = must_get_record(wtxn, key)
            labels = dict(rec.raw.get("labels") or {})
            if not fieldpaths:
                labels = new_labels
            for path in fieldpaths:
                if path == "labels":
                    labels = dict(new_labels)
                else:
                    label = path.removeprefix("labels.")
                    value = new_labels.get(label, "")
                    if value:
                        labels[label] = value
                    else:
                        labels.pop(label, None)
            rec.raw["labels"] = {k: v for k, v in labels.items() if v}
            rec.raw["updated_at"] = time.time_ns()
            put_record(wtxn, rec)
            return rec.info()

        with self._env.joined_write(txn) as wtxn:
            return apply(wtxn)

    def usage(self, key: str) -> Usage:
        """Own disk usage of ``key`` (containerd ``Usage``).

        Active snapshots are measured now (a walk of their own directory); committed ones
        return what was stored at commit (or merge); views own nothing and return zero.

        Raises:
            InvalidError: ``key`` is not a valid key.
            NotFoundError: No such snapshot.
        """
        key = check_key(key)
        self._check_open()
        rec = self._read(key)
        if rec.kind == Kind.ACTIVE:
            return disk_usage(self._usage_dir(rec.id))
        stored = rec.raw.get("usage")
        if isinstance(stored, list | tuple) and len(stored) == 2:
            return Usage(size=int(stored[0]), inodes=int(stored[1]))
        return Usage(0, 0)

    def mounts(self, key: str) -> list[Mount]:
        """The mounts of active or view snapshot ``key``.

        Raises:
            InvalidError: ``key`` is not a valid key.
            NotFoundError: No such snapshot.
            FailedPreconditionError: ``key`` is committed (containerd ``GetSnapshot``).
        """
        key = check_key(key)
        self._check_open()
        with self._env.read_txn() as txn:
            rec = must_get_record(txn, key)
            if rec.kind == Kind.COMMITTED:
                msg = f"snapshot {key!r} is committed; only active and view snapshots mount"
                raise FailedPreconditionError(msg)
            chain = parent_chain(txn, rec)
        return self._mounts(rec, chain)

    def prepare(
        self,
        key: str,
        parent: str = "",
        *,
        labels: Mapping[str, str] | None = None,
        txn: WriteTxn | None = None,
    ) -> list[Mount]:
        """Creates active snapshot ``key`` whose content starts as ``parent``'s.

        Args:
            key: The new snapshot's key.
            parent: A committed snapshot, or ``""`` for an empty one.
            labels: The snapshot's labels.
            txn: Join this write transaction (the directory is built inside it).

        Returns:
            Read-write mounts.

        Raises:
            InvalidError: Bad arguments, or ``parent`` is not committed.
            AlreadyExistsError: ``key`` exists.
            NotFoundError: ``parent`` does not exist.
        """
        rec = self._create(Kind.ACTIVE, key, parent, labels, txn)
        return self._mounts_of(rec, txn)

    def stage_prepare(
        self, key: str, parent: str = "", *, labels: Mapping[str, str] | None = None
    ) -> StagedSnapshot:
        """The slow half of :meth:`prepare`: builds the directory, records nothing.

        The caller records it with :meth:`StagedSnapshot.record` in a write transaction of
        its own (a group commit: see :class:`StagedSnapshot`), or discards it.

        Raises:
            InvalidError: Bad arguments, or ``parent`` is not committed.
            AlreadyExistsError: ``key`` exists.
            NotFoundError: ``parent`` does not exist.
        """
        key = check_key(key)
        parent = check_parent(parent)
        checked = check_labels(labels)
        self._check_open()
        with self._env.read_txn() as rtxn:
            plan = self._plan(rtxn, Kind.ACTIVE, key, parent)
        tmp, usage = self._make_dir(plan, self._build_default)
        return StagedSnapshot(self, plan, tmp, checked, usage)

    def view(
        self,
        key: str,
        parent: str = "",
        *,
        labels: Mapping[str, str] | None = None,
        txn: WriteTxn | None = None,
    ) -> list[Mount]:
        """Creates read-only view ``key`` of ``parent`` (containerd ``View``).

        Raises:
            InvalidError: Bad arguments, or ``parent`` is not committed.
            AlreadyExistsError: ``key`` exists.
            NotFoundError: ``parent`` does not exist.
        """
        rec = self._create(Kind.VIEW, key, parent, labels, txn)
        return self._mounts_of(rec, txn)

    def _mounts_of(self, rec: SnapshotRecord, txn: WriteTxn | None) -> list[Mount]:
        with self._env.joined_read(txn) as rtxn:
            return self._mounts(rec, parent_chain(rtxn, rec))

    def commit(
        self,
        name: str,
        key: str,
        *,
        labels: Mapping[str, str] | None = None,
        txn: WriteTxn | None = None,
    ) -> None:
        """Commits active ``key`` as ``name`` (containerd ``Commit`` / ``CommitActive``).

        The directory stays where it is (same id); ``key`` is removed; the labels are
        *replaced* by ``labels``; the usage of the snapshot's own directory is stored.

        Raises:
            InvalidError: Bad arguments.
            AlreadyExistsError: ``name`` exists.
            NotFoundError: ``key`` does not exist.
            FailedPreconditionError: ``key`` is not active.
        """
        name = check_key(name, "name")
        key = check_key(key)
        checked = check_labels(labels)
        txn = check_txn(txn)
        self._check_open()

        def check(rtxn: ReadTxn) -> SnapshotRecord:
            if get_record(rtxn, name) is not None:
                msg = f"cannot commit {key!r}: snapshot {name!r} already exists"
                raise AlreadyExistsError(msg)
            rec = must_get_record(rtxn, key)
            if rec.kind != Kind.ACTIVE:
                msg = f"cannot commit snapshot {key!r}: it is {rec.kind.value}, not active"
                raise FailedPreconditionError(msg)
            return rec

        def apply(wtxn: WriteTxn, rec: SnapshotRecord, usage: Usage) -> None:
            now = time.time_ns()
            raw = dict(rec.raw)
            raw.update(
                kind=Kind.COMMITTED.value,
                labels={k: v for k, v in checked.items() if v},
                created_at=now,
                updated_at=now,
                usage=[usage.size, usage.inodes],
            )
            wtxn.delete(DB_SNAPSHOTS, key.encode())
            put_record(wtxn, SnapshotRecord(name, raw))
            if rec.parent:
                wtxn.delete(DB_SNAPSHOTS, child_key(rec.parent, key))
                wtxn.put(DB_SNAPSHOTS, child_key(rec.parent, name), b"")

        if txn is not None:
            rec = check(txn)
            usage = disk_usage(self._usage_dir(rec.id))
            sync_filesystem(self._dirs)
            apply(txn, rec, usage)
            return
        with self._env.read_txn() as rtxn:
            rec = check(rtxn)
        usage = disk_usage(self._usage_dir(rec.id))
        sync_filesystem(self._dirs)
        with self._env.write_txn() as wtxn:
            again = check(wtxn)
            if again.id != rec.id:
                msg = f"snapshot {key!r} changed while it was being committed"
                raise FailedPreconditionError(msg)
            apply(wtxn, again, usage)

    def remove(self, key: str, *, txn: WriteTxn | None = None) -> None:
        """Removes snapshot ``key`` of any kind.

        Its directory is renamed into the trash inside the transaction and deleted by the
        trash's worker after the commit (in the background: this call does not wait).

        Raises:
            InvalidError: ``key`` is not a valid key.
            NotFoundError: No such snapshot.
            FailedPreconditionError: ``key`` has children.
        """
        key = check_key(key)
        txn = check_txn(txn)
        self._check_open()

        def apply(wtxn: WriteTxn) -> None:
            rec = must_get_record(wtxn, key)
            if has_children(wtxn, key):
                msg = f"cannot remove snapshot {key!r}: it has children"
                raise FailedPreconditionError(msg)
            wtxn.delete(DB_SNAPSHOTS, key.encode())
            if rec.parent:
                wtxn.delete(DB_SNAPSHOTS, child_key(rec.parent, key))
            if self._owns_dir(rec.kind, bool(rec.parent)):
                sid = rec.id
                # Renamed into the trash inside the transaction, before its commit: a reader
                # of the committed state (storage.check) never sees the directory of a
                # snapshot it does not know any more. A rollback renames it back; a crash
                # before the commit leaves trash/<id> of a live snapshot, which the next
                # open renames back. Only a committed removal reaches the trash's worker.
                self._retire_dir(sid)
                wtxn.after_rollback(lambda: self._unretire_dir(sid))
                wtxn.after_commit(lambda: self._forget_inflight(f"rm-{sid}"))
                wtxn.after_unlock(lambda: self.trash.add(sid))

        with self._env.joined_write(txn) as wtxn:
            apply(wtxn)

    def _retire_dir(self, sid: str) -> None:
        # containerd renames to a garbage name first, so that a crash mid-delete leaves a
        # name cleanup knows is garbage; here the name is trash/<id>, and the deletion is
        # the trash worker's. Fast (one rename): runs while the metadata write lock is held.
        # While the transaction is open, "rm-<id>" in _inflight says the entry is not
        # garbage yet (cleanup must neither restore nor delete it).
        with self._lock:
            self._inflight.add(f"rm-{sid}")
        try:
            self.trash.move_in(self._snapshot_dir(sid), sid)
        except FileNotFoundError:
            self._forget_inflight(f"rm-{sid}")
        except OSError as exc:
            self._forget_inflight(f"rm-{sid}")
            msg = f"cannot move snapshot directory {sid} to {self.trash.path}: {exc}"
            raise RefcacheError(msg) from exc

    def _unretire_dir(self, sid: str) -> None:
        # The removing transaction rolled back: the snapshot is still recorded.
        doomed = self.trash.path / sid
        try:
            os.rename(doomed, self._snapshot_dir(sid))
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("cannot restore snapshot directory %s: %s", doomed, exc)
        finally:
            self._forget_inflight(f"rm-{sid}")

    def _restore_retired(self, live: set[str]) -> list[str]:
        """Renames the trash entry (or, from older versions, ``snapshots/rm-<id>``) of a
        still-recorded snapshot back (a removal that crashed before its commit); returns
        the ids restored."""
        restored: list[str] = []
        found = [(self.trash.path / name, name) for name in self.trash.entries()]
        with contextlib.suppress(FileNotFoundError):
            found += [
                (self._dirs / name, name.removeprefix("rm-"))
                for name in os.listdir(self._dirs)
                if name.startswith("rm-")
            ]
        for path, sid in found:
            if sid not in live or os.path.lexists(self._dirs / sid):
                continue
            try:
                os.rename(path, self._dirs / sid)
            except OSError as exc:
                logger.warning("cannot restore snapshot directory %s: %s", path, exc)
                continue
            restored.append(sid)
            logger.warning(
                "snapshot directory %s restored from %s (its removal never committed)",
                self._dirs / sid,
                path,
            )
        return restored

    def walk(self, *filters: str) -> Iterator[SnapshotInfo]:
        """Yields the snapshots matching any of ``filters`` (containerd filter syntax).

        Fields: ``name``, ``parent``, ``kind`` and ``labels.<key>``. The list is read in one
        read transaction before the first item is yielded, so the caller may stat, create or
        remove snapshots while iterating.

        Raises:
            InvalidError: A filter does not parse.
        """
        matcher = parse_filters(*filters)
        self._check_open()
        with self._env.read_txn() as txn:
            infos = [rec.info() for rec in iter_records(txn)]

        def adaptor_of(info: SnapshotInfo) -> Callable[[Sequence[str]], tuple[str, bool]]:
            def adaptor(fieldpath: Sequence[str]) -> tuple[str, bool]:
                if not fieldpath:
                    return "", False
                head = fieldpath[0]
                if head == "name":
                    return info.name, True
                if head == "parent":
                    return info.parent, True
                if head == "kind":
                    return info.kind.value, True
                if head == "labels":
                    return map_field(fieldpath[1:], info.labels)
                return "", False

            return adaptor

        return iter([info for info in infos if matcher.match(adaptor_of(info))])

    def close(self) -> None:
        """Closes the snapshotter; later calls raise :class:`FailedPreconditionError`.

        Stops the trash's worker (what it has not deleted yet stays in the trash for the
        next open). Idempotent. The metadata environment is the cache's and stays open.
        """
        self._closed = True
        self.trash.close()

    # -- merge (BuildKit MergeSnapshotter) --------------------------------------------------

    def merge(
        self,
        key: str,
        diffs: Sequence[tuple[str, str]],
        *,
        labels: Mapping[str, str] | None = None,
        txn: WriteTxn | None = None,
    ) -> None:
        """Creates committed snapshot ``key`` by applying each diff in order on an empty tree.

        BuildKit's merge snapshotter with hardlinks (``tryCrossSnapshotLink``): each
        ``(lower, upper)`` is the change set from committed ``lower`` to committed ``upper``
        (``lower == ""``: all of ``upper``; ``upper == ""``: delete all of ``lower``). Files
        are hardlinked from the inputs' directories (copied on ``EXDEV``/``EMLINK``), deleted
        paths are removed, directories are created. The stored usage counts only inodes that
        are not shared with the inputs, as BuildKit's merge usage does. The result has no
        parent (base layers are not skipped, unlike BuildKit's overlay merges).

        Raises:
            InvalidError: Bad arguments.
            AlreadyExistsError: ``key`` exists.
            NotFoundError: An input snapshot does not exist.
            FailedPreconditionError: An input is not committed.
        """
        checked = self._check_diffs(diffs)
        key = check_key(key)
        check_labels(labels)
        txn = check_txn(txn)
        self._check_open()
        with self._env.joined_read(txn) as rtxn:
            stacks = self._merge_inputs(rtxn, checked)

        def build(tmp: Path, plan: BuildPlan) -> Usage:
            # OSErrors become refcache errors in _make_dir, which discards the directory.
            return merge_into(self._merge_target(tmp), stacks)

        self._create(Kind.COMMITTED, key, "", labels, txn, build=build)

    @staticmethod
    def _check_diffs(diffs: object) -> list[tuple[str, str]]:
        if isinstance(diffs, str | bytes) or not isinstance(diffs, Sequence):
            msg = f"merge diffs must be a sequence of (lower, upper) pairs, got {diffs!r}"
            raise InvalidError(msg)
        out: list[tuple[str, str]] = []
        for pair in diffs:
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                msg = f"merge diff must be a (lower, upper) pair, got {pair!r}"
                raise InvalidError(msg)
            lower, upper = pair
            out.append((check_parent(lower), check_parent(upper)))
        return out

    def _merge_inputs(
        self, txn: ReadTxn, diffs: list[tuple[str, str]]
    ) -> list[tuple[LayerStack | None, LayerStack | None]]:
        stacks: dict[str, LayerStack] = {}

        def stack(key: str) -> LayerStack | None:
            if not key:
                return None
            if key not in stacks:
                rec = must_get_record(txn, key)
                if rec.kind != Kind.COMMITTED:
                    msg = f"merge input {key!r} is {rec.kind.value}, not committed"
                    raise FailedPreconditionError(msg)
                found = self._content_tree(rec, parent_chain(txn, rec))
                for layer in found.layers:
                    if not layer.is_dir():
                        msg = f"cannot read merge input {key!r}: {layer} is not a directory"
                        raise RefcacheError(msg)
                stacks[key] = found
            return stacks[key]

        return [(stack(lower), stack(upper)) for lower, upper in diffs]

    def _merge_target(self, tmp: Path) -> Path:
        return tmp

    # -- consistency ------------------------------------------------------------------------

    def owned_dirs(self, txn: ReadTxn) -> dict[str, str]:
        """``{directory name: snapshot key}`` of every snapshot that owns a directory, and
        the last id handed out, as ``txn`` sees them (for ``storage.check``)."""
        records = iter_records(txn)
        return {rec.id: rec.key for rec in records if self._owns_dir(rec.kind, bool(rec.parent))}

    @staticmethod
    def last_id(txn: ReadTxn) -> int:
        """The last snapshot id handed out as ``txn`` sees it (ids are never reused, so a
        directory named by a larger id belongs to a transaction that has not committed)."""
        try:
            return read_seq(txn)
        except CorruptMetadataError:
            return 0  # reported by the record checks; no directory is "newer" then

    def dir_of(self, sid: str) -> Path:
        """The directory whose existence says snapshot directory ``sid`` is there."""
        return self._usage_dir(sid)

    def _live_dirs(self) -> tuple[set[str], list[SnapshotRecord]]:
        live: set[str] = set()
        owning: list[SnapshotRecord] = []
        with self._env.read_txn() as txn:
            for rec in iter_records(txn):
                if self._owns_dir(rec.kind, bool(rec.parent)):
                    live.add(rec.id)
                    owning.append(rec)
        return live, owning

    def _live_ids(self) -> set[str]:
        """:meth:`_live_dirs`' names alone, from one scan that builds no records (open)."""
        live: set[str] = set()
        owns = self._owns_dir
        with self._env.read_txn(buffers=True) as txn:
            for raw_key, raw in txn.views(DB_SNAPSHOTS):
                if raw_key[:1] == b"\x00":
                    continue  # bookkeeping keys
                key = str(raw_key, "utf-8", "surrogateescape")
                sid, kind, parent = record_fields(key, raw)
                if owns(kind, bool(parent)):
                    live.add(sid)
        return live

    def orphans(self) -> list[Path]:
        """Entries of the snapshot directory that no record needs (``storage.check``).

        Leftover ``new-*``/``rm-*`` directories count; work in progress of this process does
        not.
        """
        return self._orphans(self._live_ids())

    def _orphans(self, live: set[str]) -> list[Path]:
        with self._lock:
            busy = set(self._inflight)
        try:
            names = sorted(os.listdir(self._dirs))
        except FileNotFoundError:
            return []
        return [self._dirs / n for n in names if n not in live and n not in busy]

    def missing(self) -> list[str]:
        """Keys of snapshots whose directory is missing (``storage.check``)."""
        _, owning = self._live_dirs()
        return sorted(rec.key for rec in owning if not self._usage_dir(rec.id).is_dir())

    def cleanup(self) -> list[Path]:
        """Throws away the :meth:`orphans` (containerd ``Cleaner``); returns them.

        First renames back the directories of snapshots whose removal never committed; then
        moves every orphan into the trash and has the trash's worker delete whatever the
        trash holds (in the background: the trees are gone from ``snapshots/`` when this
        returns, and deleted later; :meth:`Trash.wait_idle` waits for that).
        """
        self._check_open()
        live = self._live_ids()
        with self._lock:
            busy = set(self._inflight)
        retiring = {n.removeprefix("rm-") for n in busy if n.startswith("rm-")}
        self._restore_retired(live - retiring)
        removed = []
        for path in self._orphans(live):
            try:
                self.trash.throw_away(path)
            except OSError as exc:
                logger.debug("cannot move %s to the trash (%s); deleting it now", path, exc)
                try:
                    remove_tree(path)
                except OSError as exc2:
                    logger.warning("cannot remove leftover snapshot directory %s: %s", path, exc2)
                    continue
            removed.append(path)
        self.trash.resume(skip=retiring)
        return removed


def _check_same_chain(before: BuildPlan, after: BuildPlan) -> None:
    if [r.id for r in after.chain] != [r.id for r in before.chain]:
        parent = before.parent.key if before.parent else ""
        msg = f"parent {parent!r} of {before.key!r} changed while the snapshot was built"
        raise FailedPreconditionError(msg)


def _remove_quietly(path: Path) -> None:
    """Removes a tree, logging (not raising) what cannot go: ``cleanup`` retries at open."""
    try:
        remove_tree(path)
    except OSError as exc:
        logger.warning("cannot remove %s: %s", path, exc)
