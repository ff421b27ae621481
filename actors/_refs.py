"""Ref handles: ``ImmutableRef``, ``MutableRef``, ``RefList``, ``RefMetadata``, ``Mountable``.

A handle is one counted reference (BuildKit's ``immutableRef``/``mutableRef``): the record
actor holds its id in the record's handle set. Handles are plain thread-safe objects owned by
callers; their methods block and return values. They talk to their record actor directly for
per-record work (clone, release of a non-last handle, mounts, size, metadata) and to the
manager for anything that touches the record table (the last release, commit, finalize).

Slow work a method needs (creating a view, computing a size, committing a snapshot at
finalize) runs in the *caller's* thread after the actor handed out a plan, never inside an
actor handler (DESIGN.md rule 3). Every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import CancelledError, Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

import pykka

from ..storage import (
    KEY_CACHE_POLICY,
    KEY_CREATED_AT,
    KEY_DESCRIPTION,
    KEY_LAYER_TYPE,
    KEY_RECORD_TYPE,
    RESERVED_EXTERNAL_KEYS,
    AlreadyExistsError,
    InvalidError,
    Mount,
    NotFoundError,
    RefcacheError,
    Resource,
    frozen_map,
    local_mount,
    readonly_mounts,
    reserved_index,
    reserved_key,
)
from ._blobs import (
    check_compression,
    check_handlers,
    extract_record,
    measure_record,
    merge_handlers,
    snapshot_usage,
)
from ._core import CacheCore, get_result
from ._entry import mirrored
from ._messages import (
    ActorOf,
    AncestorsOf,
    CloneRecord,
    Commit,
    Grant,
    InfoOf,
    LayerChain,
    MetadataChanged,
    SetPolicy,
    SizeInputs,
    Unreferenced,
)
from ._protocol import Await, Message, ask, may_run_here
from ._record_messages import (
    CachedMounts,
    CloneHandle,
    KnownSize,
    MountBegin,
    MountEnd,
    ReadMetadata,
    Release,
    SizeBegin,
    SizeEnd,
    WriteMetadata,
)
from ._remote import file_list, finalize_record, get_remotes
from ._runtime import NOT_RUN, CallbackFuture, run_here
from ._types import DescHandler

if TYPE_CHECKING:
    from ._types import RecordInfo, Remote

__all__ = [
    "ImmutableRef",
    "Mountable",
    "MutableRef",
    "RefList",
    "RefMetadata",
    "check_bool",
    # slow work in the caller's thread (defined in actors._blobs / actors._remote)
    "compute_size",
    "extract_record",
    "finalize_record",
    "snapshot_usage",
]

logger = logging.getLogger(__name__)

R = TypeVar("R")

#: Times a handle re-asks the manager for its record's actor when it finds it passivated.
_REACTIVATIONS = 3


@dataclass(frozen=True, slots=True)
class Mountable:
    """The mounts of a ref, containerd style, and a way to get a local directory for them.

    Attributes:
        readonly: Whether the mounts are read-only.
        mounts: The mount descriptions.
        mount_root: Where :meth:`local` makes its mount point: ``<cache root>/mounts``
            for a ref's mounts (a mount left by a killed process is removed at the next
            open); the system temp dir when ``None``.
    """

    readonly: bool
    mounts: tuple[Mount, ...]
    mount_root: Path | None = None

    @contextmanager
    def local(self) -> Iterator[Path]:
        """Yields a local directory: a bind source directly, an overlay really mounted."""
        with local_mount(list(self.mounts), tmp_root=self.mount_root) as path:
            yield Path(path)


class RefMetadata:
    """Metadata of one record (BuildKit ``RefMetadata``); writes are durable on return.

    The keys the cache manages itself (``cache.*`` and ``snapshot.*``: the record structure,
    blob and chain IDs, statistics) are refused by every setter with :class:`InvalidError`,
    except the user-settable strings ``cache.description``, ``cache.recordType`` and
    ``cache.layerType``; creation time and cache policy are set through their properties.
    So are the cache's own indexes (``chainid:``, ``blobchainid:``) and external values
    (``filelist``). A refused or ill-typed write changes nothing.
    """

    def __init__(self, ref: _Ref) -> None:
        self._ref = ref

    @property
    def id(self) -> str:
        """The record id."""
        return self._ref.id

    def _key(self, key: object) -> str:
        if not isinstance(key, str) or not key or "\x00" in key:
            msg = (
                f"metadata key of record {self._ref.id!r} must be a non-empty string without "
                f"NUL, not {key!r}"
            )
            raise InvalidError(msg)
        return key

    def _settable(self, key: object, what: str) -> str:
        key = self._key(key)
        if reserved_key(key):
            msg = (
                f"cannot {what} metadata key {key!r} of record {self._ref.id!r}: the cache "
                "manages it (reserved)"
            )
            raise InvalidError(msg)
        return key

    def _get(self, key: str) -> Any:
        return self._ref._ask_record(ReadMetadata(key), "read metadata")

    def _set(self, values: Mapping[str, Any], indexes: Mapping[str, str] | None = None) -> None:
        message = WriteMetadata(frozen_map(values), frozen_map(indexes) if indexes else None)
        result = self._ref._ask_record(message, "write metadata")
        get_result(result, self._ref._core.timeout, f"metadata write of {self._ref.id!r}")
        # The manager's table mirrors a few keys (description, record type, creation time)
        # for disk usage, prune filters and info(): BuildKit's in-memory metadata sees a
        # setter at once, so the table must too.
        self._ref._core.ask_manager(MetadataChanged(self._ref.id, mirrored(values)))

    def get_string(self, key: str) -> str:
        """Returns the string stored under ``key`` (``""`` when unset).

        Raises:
            InvalidError: ``key`` is not a non-empty string, or its value is not a string.
        """
        key = self._key(key)
        value = self._get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            msg = f"metadata {key!r} of record {self._ref.id!r} is not a string: {value!r}"
            raise InvalidError(msg)
        return value

    def set_string(self, key: str, value: str, index: str | None = None) -> None:
        """Stores ``value`` under ``key``; ``index`` adds the record to that search index.

        Raises:
            InvalidError: ``key`` is reserved or not a non-empty string, ``value`` is not a
                string, or ``index`` is not a string or is one of the cache's own indexes;
                nothing is written.
        """
        key = self._settable(key, "set")
        if not isinstance(value, str):
            msg = f"metadata {key!r} of record {self._ref.id!r} must be a string, not {value!r}"
            raise InvalidError(msg)
        if index is not None:
            if not isinstance(index, str):
                msg = f"index of metadata {key!r} must be a string, not {index!r}"
                raise InvalidError(msg)
            if reserved_index(index):
                msg = (
                    f"cannot index metadata {key!r} of record {self._ref.id!r} as {index!r}: "
                    "the cache maintains that index (reserved)"
                )
                raise InvalidError(msg)
        self._set({key: value}, {key: index} if index else None)

    def clear(self, key: str, index_prefix: str | None = None) -> None:
        """Removes ``key`` and its index entry (BuildKit ``ClearValueAndIndex``).

        Raises:
            InvalidError: ``key`` is reserved or not a non-empty string; ``index_prefix`` is
                not a string.
        """
        key = self._settable(key, "clear")
        if index_prefix is not None and not isinstance(index_prefix, str):
            msg = f"index prefix of metadata {key!r} must be a string, not {index_prefix!r}"
            raise InvalidError(msg)
        # The index entry always goes with its value here: index_prefix is accepted for
        # BuildKit's signature only.
        self._set({key: None})

    def get_external(self, key: str) -> bytes:
        """Returns the external (large) value ``key``.

        Raises:
            NotFoundError: there is none.
            InvalidError: ``key`` is not a non-empty string.
        """
        key = self._key(key)
        self._ref._check_usable("read external metadata")
        return self._ref._core.store.get(self._ref.id).get_external(key)

    def set_external(self, key: str, data: bytes) -> None:
        """Stores the external (large) value ``key``.

        Raises:
            InvalidError: ``key`` is reserved (the cache's own external values, such as the
                file list cache) or not a non-empty string, or ``data`` is not bytes;
                nothing is written.
        """
        key = self._settable(key, "set external")
        if key in RESERVED_EXTERNAL_KEYS:
            msg = (
                f"cannot set external metadata {key!r} of record {self._ref.id!r}: the cache "
                "computes it (reserved)"
            )
            raise InvalidError(msg)
        if not isinstance(data, bytes | bytearray | memoryview):
            msg = (
                f"external metadata {key!r} of record {self._ref.id!r} must be bytes, "
                f"not {type(data).__name__}"
            )
            raise InvalidError(msg)
        self._ref._check_usable("write external metadata")
        self._ref._core.store.get(self._ref.id).set_external(key, bytes(data))

    @property
    def description(self) -> str:
        """Human description."""
        return self.get_string(KEY_DESCRIPTION)

    @description.setter
    def description(self, value: str) -> None:
        self.set_string(KEY_DESCRIPTION, value)

    @property
    def record_type(self) -> str:
        """Record type (``regular`` when unset)."""
        return self.get_string(KEY_RECORD_TYPE) or "regular"

    @record_type.setter
    def record_type(self, value: str) -> None:
        self.set_string(KEY_RECORD_TYPE, value)

    @property
    def layer_type(self) -> str:
        """Layer type (``"windows"`` for Windows layers)."""
        return self.get_string(KEY_LAYER_TYPE)

    @layer_type.setter
    def layer_type(self, value: str) -> None:
        self.set_string(KEY_LAYER_TYPE, value)

    @property
    def created_at(self) -> int:
        """Creation time, nanoseconds since the epoch."""
        value = self._get(KEY_CREATED_AT)
        return int(value or 0)

    @created_at.setter
    def created_at(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            msg = f"created_at of record {self._ref.id!r} must be nanoseconds, not {value!r}"
            raise InvalidError(msg)
        self._set({KEY_CREATED_AT: value})

    @property
    def cache_policy(self) -> str:
        """``"default"`` or ``"retain"``."""
        return "retain" if self._get(KEY_CACHE_POLICY) == 1 else "default"

    @cache_policy.setter
    def cache_policy(self, value: str) -> None:
        if value not in ("default", "retain"):
            msg = f"cache policy of record {self._ref.id!r} must be 'default' or 'retain'"
            raise InvalidError(msg)
        self._ref._check_usable("set the cache policy")
        self._ref._core.ask_manager(SetPolicy(self._ref.id, value == "retain"))


class _Ref:
    """Common part of both handle kinds (thread-safe: local flags under a lock)."""

    _kind = "ref"

    def __init__(
        self,
        core: CacheCore,
        record_id: str,
        handle_id: int,
        actor: pykka.ActorRef[Any],
        desc_handlers: Mapping[str, DescHandler] | None = None,
    ) -> None:
        self._core = core
        self._id = record_id
        self._hid = handle_id
        self._actor = actor
        # BuildKit: descriptor handlers belong to the handle; clones and children inherit
        # them. A read-only mapping, validated by whoever built it.
        self._desc_handlers: Mapping[str, DescHandler] = (
            desc_handlers if desc_handlers is not None else frozen_map(None)
        )
        self._lock = threading.Lock()
        self._released = False
        self._consumed = False
        self._token = core.token

    def __repr__(self) -> str:
        state = "released" if self._released else "consumed" if self._consumed else "open"
        return f"{type(self).__name__}({self._id!r}, {state})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    @property
    def id(self) -> str:
        """The record id."""
        return self._id

    @property
    def released(self) -> bool:
        """Whether this handle was released (or consumed by a commit)."""
        return self._released or self._consumed

    @property
    def metadata(self) -> RefMetadata:
        """The record's metadata."""
        return RefMetadata(self)

    @property
    def desc_handlers(self) -> Mapping[str, DescHandler]:
        """The descriptor handlers this handle carries (read-only)."""
        return self._desc_handlers

    def desc_handler(self, digest: str) -> DescHandler | None:
        """BuildKit ``DescHandler(dgst)``: the handler for blob ``digest``, if any."""
        return self._desc_handlers.get(digest)

    def _check_usable(self, what: str) -> None:
        self._core.check_open(f"{what} on ref {self._id!r}")
        if self._consumed:
            msg = f"cannot {what}: mutable ref {self._id!r} was consumed by commit()"
            raise InvalidError(msg)
        if self._released:
            msg = f"cannot {what}: ref {self._id!r} was released"
            raise InvalidError(msg)

    def _ask_record(self, message: Message[R], what: str) -> R:
        self._check_usable(what)
        return self._ask_actor(message, what)

    def _ask_actor(self, message: Message[R], what: str) -> R:
        for _ in range(_REACTIVATIONS):
            try:
                return ask(self._actor, message, self._core.timeout, f"{what} on {self._id!r}")
            except pykka.ActorDeadError:
                # Passivated: the manager reactivates the record and tells us its new actor
                # (ClosedError once the manager has stopped: the cache is closing).
                self._actor = self._core.ask_manager(ActorOf(self._id))
        try:
            return ask(self._actor, message, self._core.timeout, f"{what} on {self._id!r}")
        except pykka.ActorDeadError as exc:
            if self._core.closed:
                raise self._core.closed_error(f"{what} on ref {self._id!r}") from exc
            msg = f"cannot {what} on ref {self._id!r}: its record actor keeps stopping"
            raise RefcacheError(msg) from exc

    def release(self) -> None:
        """Releases this handle. Releasing twice is a counted no-op.

        A mutable handle consumed by :meth:`MutableRef.commit` belongs to the new immutable
        record: releasing it is a logged, counted no-op.
        """
        with self._lock:
            if self._released or self._consumed:
                what = "consumed" if self._consumed else "released"
                logger.debug("release of %s %s ref %s ignored", what, self._kind, self._id)
                self._core.count_double_release()
                return
            # After close the handle stays as it was (its record loads again at reopen).
            self._core.check_open(f"release ref {self._id!r}")
            self._released = True
        with self._core.timed("release"):
            found, manager_needed = self._ask_actor(Release(self._hid), "release")
            if not found:
                self._core.count_double_release()
                return
            if manager_needed:
                self._core.ask_manager(Unreferenced(self._id))

    def start_release(self) -> Future[None]:
        """:meth:`release` without waiting: the returned future is done once it is.

        For callers that must not block (:mod:`refcache.aio`): the asks are chained on the
        actors' reply callbacks, so no thread waits meanwhile; the future's own callbacks
        run on the actor thread that completes it (they must not block). The same outcomes
        as :meth:`release`, as the future's result or exception.
        """
        out: Future[None] = Future()
        with self._lock:
            if self._released or self._consumed:
                self._core.count_double_release()
                out.set_result(None)
                return out
            try:
                self._core.check_open(f"release ref {self._id!r}")
            except RefcacheError as exc:
                out.set_exception(exc)
                return out
            self._released = True
        started = time.perf_counter()

        def finish(exc: BaseException | None) -> None:
            self._core.observe(
                "release",
                "ok" if exc is None else type(exc).__name__,
                time.perf_counter() - started,
            )
            if exc is None:
                out.set_result(None)
            else:
                out.set_exception(exc)

        def unreferenced(reply: Any) -> None:
            try:
                reply.get(timeout=0)
            except BaseException as exc:
                finish(_public_error(self._core, exc, f"release ref {self._id!r}"))
                return
            finish(None)

        def released(reply: Any) -> None:
            try:
                found, manager_needed = reply.get(timeout=0)
            except pykka.ActorDeadError:
                # A passivated record (rare for a held handle): the blocking path re-asks
                # the manager for its actor; one short-lived thread runs it.
                _in_thread(out, self._release_rest, started)
                return
            except BaseException as exc:
                finish(_public_error(self._core, exc, f"release ref {self._id!r}"))
                return
            if not found:
                self._core.count_double_release()
                finish(None)
            elif manager_needed:
                _ask_then(self._core.manager, Unreferenced(self._id), unreferenced)
            else:
                finish(None)

        _ask_then(self._actor, Release(self._hid), released)
        return out

    def _release_rest(self, started: float) -> None:
        try:
            found, manager_needed = self._ask_actor(Release(self._hid), "release")
            if not found:
                self._core.count_double_release()
            elif manager_needed:
                self._core.ask_manager(Unreferenced(self._id))
        except BaseException as exc:
            self._core.observe("release", type(exc).__name__, time.perf_counter() - started)
            raise
        self._core.observe("release", "ok", time.perf_counter() - started)

    def info(self) -> RecordInfo:
        """Everything known about the record."""
        self._check_usable("read info")
        return self._core.ask_manager(InfoOf(self._id))

    def mount(self, readonly: bool = True) -> Mountable:
        """The record's mounts (see :class:`Mountable`)."""
        raise NotImplementedError

    def _mounts(self, what: str) -> tuple[Mount, ...]:
        """Mount cache with single flight: the first caller does the work in its thread."""
        plan = self._ask_record(MountBegin(), what)
        if isinstance(plan, CachedMounts):
            return plan.mounts
        if isinstance(plan, Await):
            mounted: tuple[Mount, ...] = get_result(
                plan.future, self._core.timeout, f"mount of {self._id!r}"
            )
            return mounted
        snapshot_id, view, own = plan.snapshot_id, plan.view, plan.own
        try:
            try:
                mounts = tuple(self._make_mounts(snapshot_id, view))
            except NotFoundError:
                if snapshot_id == own:
                    raise
                # The equal mutable's snapshot was committed meanwhile by a concurrent
                # finalize (BuildKit serialises mount and finalize on the pair's shared
                # mutex): wait for that finalize, then view the record's own snapshot.
                finalize_record(self._core, self._id)
                mounts = tuple(self._make_mounts(own, True))
        except BaseException as exc:
            self._ask_actor(MountEnd(None, exc), what)
            raise
        self._ask_actor(MountEnd(mounts, None), what)
        return mounts

    def _make_mounts(self, snapshot_id: str, view: bool) -> list[Mount]:
        core = self._core
        if not view:
            return core.snapshotter.mounts(snapshot_id)
        # BuildKit: a temporary flat lease <id>-view holds a read-only view <sid>-view, dropped
        # when the record's refcount reaches 0.
        view_id = snapshot_id + "-view"
        lease_id = self._id + "-view"
        with core.env.write_txn() as txn:
            with contextlib.suppress(AlreadyExistsError):
                core.leases.create(lease_id, flat=True, temporary=True, txn=txn)
            with contextlib.suppress(AlreadyExistsError):
                core.leases.add_resource(
                    lease_id, Resource(view_id, f"snapshots/{core.snapshotter.name}"), txn=txn
                )
        try:
            return core.snapshotter.view(view_id, snapshot_id)
        except AlreadyExistsError:
            return core.snapshotter.mounts(view_id)


class ImmutableRef(_Ref):
    """A counted handle on an immutable record (see API.md)."""

    _kind = "immutable"

    def clone(self) -> ImmutableRef:
        """A new handle on the same record (works on a released handle while it lives).

        Raises:
            NotFoundError: the record is gone.
        """
        self._core.check_open(f"clone ref {self._id!r}")
        if self._consumed:
            self._check_usable("clone")
        with self._core.timed("clone"):
            try:
                hid = ask(self._actor, CloneHandle(self._hid), self._core.timeout, "clone")
            except pykka.ActorDeadError:
                hid = None
            if hid is not None:
                return ImmutableRef(self._core, self._id, hid, self._actor, self._desc_handlers)
            grant = self._core.ask_manager(CloneRecord(self._id))
            return ImmutableRef(
                self._core, grant.record_id, grant.handle_id, grant.actor, self._desc_handlers
            )

    def start_clone(self) -> Future[ImmutableRef]:
        """:meth:`clone` without waiting: the returned future gives the new handle.

        For callers that must not block (:mod:`refcache.aio`): the asks are chained on the
        actors' reply callbacks, so no thread waits meanwhile; the future's own callbacks
        run on the actor thread that completes it (they must not block). The same outcomes
        as :meth:`clone`, as the future's result or exception.
        """
        out: Future[ImmutableRef] = Future()
        try:
            self._core.check_open(f"clone ref {self._id!r}")
            if self._consumed:
                self._check_usable("clone")
        except RefcacheError as exc:
            out.set_exception(exc)
            return out
        started = time.perf_counter()
        core, handlers = self._core, self._desc_handlers

        def finish(ref: ImmutableRef | None, exc: BaseException | None) -> None:
            core.observe(
                "clone",
                "ok" if exc is None else type(exc).__name__,
                time.perf_counter() - started,
            )
            if exc is None:
                out.set_result(ref)  # type: ignore[arg-type]
            else:
                out.set_exception(exc)

        def granted(reply: Any) -> None:
            try:
                grant = reply.get(timeout=0)
            except BaseException as exc:
                finish(None, _public_error(core, exc, f"clone ref {self._id!r}"))
                return
            finish(
                ImmutableRef(core, grant.record_id, grant.handle_id, grant.actor, handlers), None
            )

        def cloned(reply: Any) -> None:
            try:
                hid = reply.get(timeout=0)
            except pykka.ActorDeadError:
                hid = None
            except BaseException as exc:
                finish(None, _public_error(core, exc, f"clone ref {self._id!r}"))
                return
            if hid is not None:
                finish(ImmutableRef(core, self._id, hid, self._actor, handlers), None)
            else:
                _ask_then(core.manager, CloneRecord(self._id), granted)

        _ask_then(self._actor, CloneHandle(self._hid), cloned)
        return out

    def finalize(self) -> None:
        """Commits the snapshot of an equal pair (lazy commit); a no-op otherwise."""
        self._check_usable("finalize")
        finalize_record(self._core, self._id)

    def mount(self, readonly: bool = True) -> Mountable:
        """Mounts the record read-only (an immutable mount is always read-only).

        BuildKit: a writable mount request first finalizes an equal pair; the mount itself is
        read-only anyway.

        Raises:
            InvalidError: ``readonly`` is not a bool.
            NotFoundError: the record's snapshot directory is missing from disk.
        """
        check_bool("mount readonly", readonly)
        self._check_usable("mount")
        with self._core.timed("mount"):
            if not readonly:
                finalize_record(self._core, self._id)
            extract_record(self._core, self._id, self._desc_handlers)
            mounts = self._mounts("mount")
            _check_mount_paths(self._id, mounts)
        return Mountable(True, tuple(readonly_mounts(list(mounts))), self._core.mount_root)

    def extract(self, desc_handlers: Mapping[str, DescHandler] | None = None) -> None:
        """Materialises the snapshot of a lazy (blob-only), merge or diff record.

        Lazy blobs are fetched through the handle's descriptor handlers, plus
        ``desc_handlers`` (which win). Concurrent extractions of one record share one; a blob
        is fetched once however many records and callers need it. A layer that is not
        blob-only returns at once (BuildKit ``Extract``).

        Raises:
            NeedsRemoteProviderError: a lazy blob has no handler.
            FailedPreconditionError: a fetched blob does not match its descriptor.
            RefcacheError: a provider failed (the record stays lazy; retry with a good one).
        """
        self._check_usable("extract")
        handlers = merge_handlers(self._desc_handlers, check_handlers(desc_handlers))
        with self._core.timed("extract"):
            extract_record(self._core, self._id, handlers)

    def size(self) -> int:
        """Disk usage in bytes (computed once and cached; concurrent callers share it)."""
        self._check_usable("size")
        with self._core.timed("size"):
            return compute_size(self, self._core)

    def layer_chain(self) -> RefList:
        """Clones of the refs forming the layer chain, root first; release the list."""
        self._check_usable("layer_chain")
        ids = self._core.ask_manager(LayerChain(self._id))
        refs = RefList()
        try:
            for record_id in ids:
                if record_id == self._id:
                    refs.append(self.clone())
                else:
                    g = self._core.ask_manager(CloneRecord(record_id))
                    refs.append(
                        ImmutableRef(
                            self._core, g.record_id, g.handle_id, g.actor, self._desc_handlers
                        )
                    )
        except BaseException:
            refs.release()
            raise
        return refs

    def walk_ancestors(self) -> list[str]:
        """Ids of the record and every ancestor, depth first (BuildKit ``walkAncestors``)."""
        self._check_usable("walk ancestors")
        ids = self._core.ask_manager(AncestorsOf(self._id))
        return list(ids)

    def get_remotes(
        self,
        compression: str = "gzip",
        *,
        create_if_needed: bool = True,
        all: bool = False,
        force: bool = False,
        prefer_non_dist: bool = False,
    ) -> list[Remote]:
        """The record's layers as descriptors plus a provider (BuildKit ``GetRemotes``).

        Missing layer blobs are computed with the differ in ``compression`` (when
        ``create_if_needed``); with ``force`` every layer is given as a ``compression`` blob
        (converted, keeping its diffID); ``prefer_non_dist`` keeps non-distributable media
        types and URLs. With ``all`` (not ``force``) the list goes on with every remote whose
        topmost layer is a ``compression`` variant, over all combinations of the lower
        layers' known variants. Runs in the calling thread.

        Raises:
            InvalidError: unknown compression (``estargz`` is out of scope).
            NotFoundError: a layer has no blob and ``create_if_needed`` is false.
            NeedsRemoteProviderError: a lazy layer must be converted and has no handler.
        """
        self._check_usable("get_remotes")
        check_compression(compression)
        for name, flag in (
            ("create_if_needed", create_if_needed),
            ("all", all),
            ("force", force),
            ("prefer_non_dist", prefer_non_dist),
        ):
            check_bool(f"get_remotes {name}", flag)
        with self._core.timed("get_remotes"):
            return get_remotes(
                self._core,
                self._id,
                compression=compression,
                create_if_needed=create_if_needed,
                all=all,
                force=force,
                prefer_non_dist=prefer_non_dist,
                handlers=self._desc_handlers,
            )

    def file_list(self) -> list[str]:
        """Sorted paths in the record's layer tarball (BuildKit ``FileList``); ``[]`` when the
        record has no blob. Cached as external metadata; a lazy blob is fetched first."""
        self._check_usable("file_list")
        return file_list(self._core, self._id, self._desc_handlers)


class MutableRef(_Ref):
    """The exclusive handle on a mutable record (see API.md)."""

    _kind = "mutable"

    def commit(self) -> ImmutableRef:
        """Creates the equal immutable record (lazy commit) and consumes this handle.

        Raises:
            InvalidError: the handle was released or already committed.
        """
        with self._lock:
            self._check_usable("commit")
            self._consumed = True
        try:
            with self._core.timed("commit"):
                durable = self._core.ask_manager(Commit(self._id, self._hid))
                grant: Grant = get_result(
                    durable.future, self._core.timeout, f"the commit of {self._id!r}"
                )
        except BaseException:
            with self._lock:
                self._consumed = False
            raise
        return ImmutableRef(
            self._core, grant.record_id, grant.handle_id, grant.actor, self._desc_handlers
        )

    def start_commit(self) -> Future[ImmutableRef]:
        """:meth:`commit` without waiting: the returned future gives the immutable handle.

        For callers that must not block (:mod:`refcache.aio`), as :meth:`start_clone`: the
        handle is consumed at once; a failed commit gives it back, as :meth:`commit` does.
        """
        out: Future[ImmutableRef] = Future()
        with self._lock:
            try:
                self._check_usable("commit")
            except RefcacheError as exc:
                out.set_exception(exc)
                return out
            self._consumed = True
        started = time.perf_counter()
        core, handlers = self._core, self._desc_handlers

        def failed(exc: BaseException) -> None:
            with self._lock:
                self._consumed = False
            error = _public_error(core, exc, f"commit ref {self._id!r}")
            core.observe("commit", type(error).__name__, time.perf_counter() - started)
            out.set_exception(error)

        def durable(written: Future[Grant]) -> None:
            # The manager answered at once; the grant comes once the group write is durable.
            try:
                done(written.result(timeout=0))
            except BaseException as exc:
                failed(exc)

        def granted(reply: Any) -> None:
            try:
                answer = reply.get(timeout=0)
            except BaseException as exc:
                failed(exc)
                return
            if isinstance(answer, Await):
                answer.future.add_done_callback(durable)
            else:
                done(answer)

        def done(grant: Grant) -> None:
            core.observe("commit", "ok", time.perf_counter() - started)
            out.set_result(
                ImmutableRef(core, grant.record_id, grant.handle_id, grant.actor, handlers)
            )

        _ask_then(core.manager, Commit(self._id, self._hid), granted)
        return out

    def mount(self, readonly: bool = False) -> Mountable:
        """Mounts the active snapshot (read-only when asked).

        Raises:
            InvalidError: ``readonly`` is not a bool.
            NotFoundError: the record's snapshot directory is missing from disk.
        """
        check_bool("mount readonly", readonly)
        self._check_usable("mount")
        with self._core.timed("mount"):
            mounts = list(self._mounts("mount"))
            _check_mount_paths(self._id, mounts)
        if readonly:
            mounts = readonly_mounts(mounts)
        return Mountable(readonly, tuple(mounts), self._core.mount_root)


class RefList(list[ImmutableRef]):
    """A list of immutable refs whose :meth:`release` releases each (idempotent)."""

    def __init__(self, refs: Iterable[ImmutableRef] = ()) -> None:
        super().__init__(refs)

    def release(self) -> None:
        """Releases every ref; already released ones are skipped silently."""
        errors: list[BaseException] = []
        for ref in self:
            if ref.released:
                continue
            try:
                ref.release()
            except RefcacheError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _ask_then(actor: pykka.ActorRef[Any] | None, message: Any, then: Callable[[Any], None]) -> None:
    """Asks ``actor`` without waiting; ``then(reply_future)`` runs once the reply is set.

    The cache's actors reply with futures that call back (``CallbackFuture``, the manager's
    ``FlatteningFuture``): ``then`` runs on the replying actor's thread, and
    ``reply_future.get(timeout=0)`` gives the reply or raises its error (``ActorDeadError``
    for a stopped actor).
    """
    if actor is None:
        dead: CallbackFuture = CallbackFuture()
        exc = pykka.ActorDeadError("the cache manager has stopped")
        dead.set_exception((type(exc), exc, None))
        then(dead)
        return
    # An idle record handles the ask in this thread, as the blocking path's ask does (its
    # handlers are short and never block: DESIGN.md, "Asks to an idle record").
    try:
        value = run_here(actor, message) if may_run_here() else NOT_RUN
    except Exception as exc:
        failed: CallbackFuture = CallbackFuture()
        failed.set_exception((type(exc), exc, exc.__traceback__))
        then(failed)
        return
    if value is not NOT_RUN:
        done: CallbackFuture = CallbackFuture()
        done.set(value)
        then(done)
        return
    reply: Any = actor.ask(message, block=False)
    if isinstance(reply, CallbackFuture):
        reply.add_done_callback(then)
    else:  # the manager's reply future calls back without an argument
        reply.add_done_callback(lambda: then(reply))


def _public_error(core: CacheCore, exc: BaseException, what: str) -> BaseException:
    """The error a blocking call would raise for ``exc`` (Pykka's and concurrent's mapped)."""
    if isinstance(exc, pykka.ActorDeadError | CancelledError):
        return core.closed_error(what)
    return exc


def _in_thread(out: Future[Any], fn: Callable[..., Any], *args: Any) -> None:
    """Runs blocking ``fn(*args)`` on a short-lived thread; its outcome completes ``out``."""

    def run() -> None:
        try:
            out.set_result(fn(*args))
        except BaseException as exc:
            out.set_exception(exc)

    threading.Thread(target=run, daemon=True, name="refcache-release").start()


def check_bool(name: str, value: object) -> None:
    """Raises :class:`InvalidError` unless ``value`` is a bool (``1`` and ``b"x"`` are not).

    A truthy non-bool is refused rather than read as a flag: ``mount(readonly="no")`` must
    not make a writable mount.
    """
    if not isinstance(value, bool):
        msg = f"{name} must be a bool, not {value!r}"
        raise InvalidError(msg)


def _mount_paths(mounts: Iterable[Mount]) -> list[str]:
    """The directories ``mounts`` need: bind sources, overlay lower/upper/work dirs."""
    paths: list[str] = []
    for m in mounts:
        if m.type == "overlay":
            for option in m.options:
                key, _, value = option.partition("=")
                if key == "lowerdir":
                    paths.extend(value.split(":"))
                elif key in ("upperdir", "workdir"):
                    paths.append(value)
        elif m.source:
            paths.append(m.source)
    return [p for p in paths if p]


def _check_mount_paths(record_id: str, mounts: Iterable[Mount]) -> None:
    """Raises :class:`NotFoundError` when a directory the mounts need is gone from disk.

    The metadata says the snapshot exists; a directory removed behind the cache's back
    would otherwise be handed out as a missing path (and a mutable's later commit would
    record an empty snapshot). One ``stat`` per directory, also for cached mounts.
    """
    for path in _mount_paths(mounts):
        if not os.path.isdir(path):
            msg = f"cannot mount record {record_id!r}: its snapshot directory {path} is missing"
            raise NotFoundError(msg)


# -- slow work in the caller's thread ------------------------------------------------------


def compute_size(ref: _Ref, core: CacheCore) -> int:
    """The record's size (BuildKit ``size()``): snapshot usage unless blob-only, plus its
    blob and every compression variant; computed here, cached by the record actor."""
    plan = ref._ask_record(SizeBegin(), "size")
    if isinstance(plan, KnownSize):
        return plan.size
    if isinstance(plan, Await):
        return int(get_result(plan.future, core.timeout, f"size of {ref.id!r}"))
    snapshot_id, own, generation = plan.snapshot_id, plan.own, plan.generation
    try:
        blob, blob_only = core.ask_manager(SizeInputs(ref.id))
        size, cacheable = measure_record(core, snapshot_id, blob, blob_only)
        if not cacheable and snapshot_id != own:
            # The equal mutable's snapshot was committed by a concurrent finalize: measure
            # the record's own snapshot once that finalize is done.
            finalize_record(core, ref.id)
            size, cacheable = measure_record(core, own, blob, blob_only)
    except BaseException as exc:
        ref._ask_actor(SizeEnd(None, exc, generation), "size")
        raise
    # A missing snapshot (a merge or diff not extracted yet) counts 0 but is not cached:
    # extraction would otherwise leave the record at size 0 for ever.
    ref._ask_actor(SizeEnd(size, None, generation, cacheable), "size")
    return size
