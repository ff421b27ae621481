"""The cache manager actor: the record table and every operation on more than one record.

BuildKit's ``cm.mu`` made into a mailbox. The :class:`CacheManager` (a ``ThreadingActor``, its
own thread) owns the record table (``id -> RecordEntry``), record creation and removal, the
counted holds that child records keep on their parents, equal-pair links, and the global
operations: ``get``, ``get_mutable``, ``new``, ``get_by_blob``, ``merge``, ``diff``,
``search``, ``disk_usage``, ``prune``, ``statistics``; and the table side of the blob work
(``node``, ``set_blob``, ``chain_metadata``, ``extracted``, ``size_reset``), whose slow half
runs in callers' threads (:mod:`actors._blobs`, :mod:`actors._remote`).

Records at rest are data: a compact :class:`RecordEntry` here plus their LMDB metadata. A
record's *actor* (:mod:`actors._record`) exists only while something needs it (handles, a
mount, a size computation) and is passivated when idle (a small LRU of idle actors is kept
to make get+release of unreferenced records cheap).

Message discipline (DESIGN.md): the manager asks record actors (records never ask back);
slow work — snapshot copies, merges, size walks, prune deletions, GC — runs on the I/O
executor or in the calling thread, and the manager finishes with a follow-up message. A
public method that needs such work returns a future; the manager's futures flatten nested
futures, so ``manager.new().get()`` returns the ref itself.

Refcount model: a record's refcount is its user handles (held in the record actor) plus
``holders``, the counted handles that child records hold on it (BuildKit's ``parentRefs``:
every record owns one handle per parent slot; ``Diff(a, a)`` holds ``a`` twice). The holds of
records at rest are kept here, so a parent does not need an actor while its children rest.
Removal releases a record's holds one parent at a time, by the manager.

A release is two steps where BuildKit has one critical section under ``cm.mu``: the record
actor drops the handle, then the manager's ``unreferenced`` step decides the record's fate.
Other messages can come in between, so that step re-checks: a pair taken again meanwhile is
kept (its next last release decides), and before removing a record the manager settles its
actor (``_quiesce``), after which a released handle can only clone through the manager.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pykka
from pykka import ThreadingFuture

from ..storage import (
    INDEX_BLOB_CHAIN,
    INDEX_CHAIN,
    KEY_BLOB,
    KEY_BLOB_CHAIN_ID,
    KEY_BLOB_ONLY,
    KEY_BLOB_SIZE,
    KEY_CACHE_POLICY,
    KEY_CHAIN_ID,
    KEY_COMMITTED,
    KEY_CREATED_AT,
    KEY_DESCRIPTION,
    KEY_DIFF_ID,
    KEY_EQUAL_MUTABLE,
    KEY_LAST_USED_AT,
    KEY_LAYER_URLS,
    KEY_MEDIA_TYPE,
    KEY_PARENT,
    KEY_RECORD_TYPE,
    KEY_SIZE,
    KEY_SNAPSHOT,
    KEY_USAGE_COUNT,
    RESOURCE_CONTENT,
    Descriptor,
    FailedPreconditionError,
    InvalidError,
    LockedError,
    NeedsRemoteProviderError,
    NotFoundError,
    RefcacheError,
    Resource,
    WriteTxn,
    frozen_map,
)
from ._blobs import (
    BlobNode,
    chain_id,
    check_handlers,
    diff_id_of,
    merge_handlers,
)
from ._core import CacheCore, ask
from ._entry import RecordEntry, new_id, parent_fields
from ._prune import PruneMixin, records_in_use, visible_records
from ._record import SIZE_UNKNOWN, CacheRecord, RecordState, Settled
from ._refs import (
    ImmutableRef,
    MutableRef,
    check_bool,
    extract_record,
    finalize_record,
)
from ._types import (
    CacheStatistics,
    DescHandler,
    PrunePolicy,
    RecordInfo,
    RecordKind,
    UsageInfo,
)

__all__ = [
    "BlobRecordPlan",
    "CacheManager",
    "FlatteningFuture",
    "RecordEntry",
    "new_id",
]

logger = logging.getLogger(__name__)

IDLE_ACTORS = 4096  #: idle record actors kept activated (LRU) before passivation


class FlatteningFuture(ThreadingFuture[Any]):
    """A reply future that unwraps futures returned by a handler (for deferred replies)."""

    def get(self, *, timeout: float | None = None) -> Any:
        """Returns the final value, waiting for nested futures within ``timeout`` overall.

        Raises:
            pykka.Timeout: the reply (or its deferred part) did not come within ``timeout``,
                as for any Pykka future; the public proxy turns it into refcache's
                :class:`TimeoutError`. A refcache ``TimeoutError`` is the operation's own
                (a wait inside the job ran past the cache's timeout).
            concurrent.futures.CancelledError: the deferred part was cancelled by
                :meth:`Cache.close` (the public proxy and ``get_result`` turn it into
                :class:`ClosedError`).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        value = super().get(timeout=timeout)
        while isinstance(value, pykka.Future | Future):
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                if isinstance(value, pykka.Future):
                    value = value.get(timeout=left)
                else:
                    value = value.result(timeout=left)
            except TimeoutError as exc:
                if isinstance(value, Future) and value.done():
                    raise  # the job's own exception, not this wait running out
                msg = f"the deferred reply did not come within {timeout:g} s"
                raise pykka.Timeout(msg) from exc
        return value


@dataclass(frozen=True, slots=True)
class BlobRecordPlan:
    """One layer record a ``pull`` wants (see ``CacheManager._op_by_blobs``).

    Attributes:
        key: The record's blob-chain ID.
        parent: The parent's blob-chain ID (``""`` for a base layer).
        desc: The layer blob's descriptor.
        diff_id: Its diffID.
        description: Description of a new record.
        record_type: Record type of a new record (``""``: regular).
        created_at: Creation time of a new record (ns; 0: now).
    """

    key: str
    parent: str
    desc: Descriptor
    diff_id: str
    description: str = ""
    record_type: str = ""
    created_at: int = 0


@dataclass(frozen=True, slots=True)
class _ByBlob:
    """One ``get_by_blob`` request, checked (crosses to the I/O executor and back)."""

    desc: Descriptor
    diff_id: str
    handlers: Mapping[str, DescHandler]
    retain: bool
    description: str


class CacheManager(PruneMixin, pykka.ThreadingActor):
    """The manager actor (see the module docstring). Every method runs on its own thread."""

    use_daemon_thread = True

    def __init__(self, core: CacheCore, entries: dict[str, RecordEntry]) -> None:
        super().__init__()
        self.core = core
        self.entries = entries
        self._idle: OrderedDict[str, None] = OrderedDict()
        self._prune_running = False
        self._prune_queue: list[tuple[tuple[PrunePolicy, ...], Future[list[UsageInfo]]]] = []
        self._prune_stats = [0, 0, 0.0]  # records, bytes, seconds
        self._gc_stats = [0, 0]  # runs, bytes
        # Blob-only records in the table: while there are none, the lazy-provider check of
        # get() has nothing to walk.
        self._blob_only = sum(1 for e in entries.values() if e.blob_only)

    @staticmethod
    def _create_future() -> ThreadingFuture[Any]:
        # Pykka's reply-future hook: replies that are futures are flattened for the caller.
        return FlatteningFuture()

    # -- message dispatch for handles and jobs -------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        """Dispatches ``(operation, *args)`` tuples from handles and jobs to ``_op_<name>``."""
        handler = getattr(self, "_op_" + message[0], None)
        if handler is None:
            msg = f"the cache manager does not understand {message[0]!r}"
            raise InvalidError(msg)
        return handler(*message[1:])

    def on_stop(self) -> None:
        """Stops the record actors of this cache (and only these); fails queued prunes."""
        queued, self._prune_queue = self._prune_queue, []
        for _, waiter in queued:
            waiter.set_exception(self.core.closed_error("run a queued prune"))
        futures = []
        for e in self.entries.values():
            if e.actor is not None:
                futures.append(e.actor.stop(block=False))
                e.actor = None
        for f in futures:
            with contextlib.suppress(Exception):
                f.get(timeout=self.core.timeout)

    # -- helpers ------------------------------------------------------------------------------

    def _entry(self, record_id: object) -> RecordEntry:
        if not isinstance(record_id, str):
            msg = f"record id must be a string, not {type(record_id).__name__} {record_id!r}"
            raise InvalidError(msg)
        e = self.entries.get(record_id)
        if e is None or e.dead:
            msg = f"record {record_id!r} not found"
            raise NotFoundError(msg)
        return e

    def _ref_entry(self, ref: object, what: str) -> RecordEntry:
        if not isinstance(ref, ImmutableRef):
            msg = f"{what} must be an ImmutableRef, not {type(ref).__name__}"
            raise InvalidError(msg)
        self.core.check_owner(ref._token, f"{what} {ref.id!r}")
        if ref._consumed:
            msg = f"{what} {ref.id!r} was consumed"
            raise InvalidError(msg)
        return self._entry(ref.id)

    def _ask(self, actor: pykka.ActorRef[Any], message: tuple[Any, ...]) -> Any:
        return ask(actor, message, self.core.timeout, f"record {message[0]!r}")

    def _activate(self, e: RecordEntry) -> pykka.ActorRef[Any]:
        self._idle.pop(e.id, None)
        if e.actor is None:
            mount_sid = e.snapshot_id
            if e.equal_mutable is not None:
                m = self.entries.get(e.equal_mutable)
                if m is not None:
                    mount_sid = m.snapshot_id
            state = RecordState(
                e.id,
                e.mutable,
                e.snapshot_id,
                mount_sid,
                e.usage_count,
                e.last_used_at,
                e.size,
                e.size_gen,
                e.trigger_holds,
            )
            e.actor = CacheRecord.start_on(self.core.pool, self.core, state)
            e.acquires = 0
        return e.actor

    def _handles(self, e: RecordEntry) -> int:
        if e.actor is None:
            return 0
        return int(self._ask(e.actor, ("count",)))

    def _handle_counts(self) -> dict[str, int]:
        """Open handles of every active record (asks all first, then collects)."""
        # Actors in the idle LRU have no handles (see _op_idle): no need to ask them.
        futures = {
            rid: e.actor.ask(("count",), block=False)
            for rid, e in self.entries.items()
            if e.actor is not None and rid not in self._idle
        }
        counts = {}
        for rid, f in futures.items():
            try:
                counts[rid] = int(f.get(timeout=self.core.timeout))
            except pykka.ActorDeadError:
                counts[rid] = 0
        return counts

    def _acquire(self, e: RecordEntry, trigger: bool) -> tuple[str, int, pykka.ActorRef[Any]]:
        # A tell, not an ask: the handle id is chosen here, and the record handles this
        # message before anything the new handle sends it (one sender's messages keep their
        # order, and the handle exists only after this reply). The manager does not wait for a
        # pool worker on every get.
        hid = self.core.next_handle_id()
        actor = self._activate(e)
        try:
            e.acquires += 1
            actor.tell(("acquire_as", hid, trigger))
        except pykka.ActorDeadError:
            e.actor = None
            actor = self._activate(e)
            e.acquires += 1
            actor.tell(("acquire_as", hid, trigger))
        return e.id, hid, actor

    def _settle(self, e: RecordEntry) -> Settled | None:
        """Takes an idle record back from its actor; keeps the actor in the idle LRU."""
        if e.actor is None:
            return None
        try:
            settled: Settled | None = self._ask(e.actor, ("settle",))
        except pykka.ActorDeadError:
            e.actor = None
            return None
        if settled is None:
            return None
        self._idle[e.id] = None
        self._evict_idle()
        return settled

    def _evict_idle(self) -> None:
        """Passivates the least recently idle actors beyond :data:`IDLE_ACTORS`."""
        while len(self._idle) > IDLE_ACTORS:
            old_id, _ = self._idle.popitem(last=False)
            old = self.entries.get(old_id)
            if old is not None and old.actor is not None:
                old.actor.stop(block=False)
                old.actor = None

    def _op_idle(self, record_id: str, acquires: int) -> None:
        """A plain immutable's actor settled itself at its last release (a tell).

        Ignored when the manager has acquired a handle on that actor since (the tell is then
        stale: the record is in use again), so every record in the idle LRU has no handles.
        """
        e = self.entries.get(record_id)
        if e is None or e.dead or e.actor is None or e.acquires != acquires:
            return
        self._idle[e.id] = None
        self._idle.move_to_end(e.id)
        self._evict_idle()

    def _quiesce(self, e: RecordEntry) -> bool:
        """Whether ``e`` has no handles, settling its actor if so (before removing ``e``).

        Between a last release and the manager's ``unreferenced`` step, a released handle can
        still clone through the record actor. Settling the actor closes that window: from
        then on such a clone goes through the manager, which sees the removal.
        """
        if e.actor is None:
            return True
        # _settle forgets an actor that died (no handles can live there either).
        return self._settle(e) is not None or e.actor is None

    def _mutable_locked(self, m: RecordEntry) -> bool:
        if self._handles(m) > 0:
            return True
        if m.equal_immutable is not None:
            i = self.entries.get(m.equal_immutable)
            # A hold on the twin is a child being created on it (new/merge/diff parent):
            # it is in use, and the child's job finalizes it (BuildKit holds the parent ref
            # for the whole synchronous New, so the pair cannot be dropped meanwhile).
            if i is not None and (i.holders > 0 or self._handles(i) > 0):
                return True
        return False

    def _delete_leases(self, txn: WriteTxn, ids: Iterable[str]) -> None:
        for lease_id in ids:
            with contextlib.suppress(NotFoundError):
                self.core.leases.delete(lease_id, txn=txn)

    def _remove(
        self, e: RecordEntry, *, remove_snapshot: bool, txn: WriteTxn | None = None
    ) -> None:
        """Forgets a record: metadata, leases, actor; releases its holds on its parents.

        With ``txn``, the metadata work joins that transaction (one fsync for a pair).
        """
        if self.entries.get(e.id) is not e:
            return
        e.dead = True
        del self.entries[e.id]
        if e.blob_only:
            self._blob_only -= 1
        self._idle.pop(e.id, None)
        if e.actor is not None:
            with contextlib.suppress(pykka.ActorDeadError):
                e.actor.tell(("kill",))
            e.actor.stop(block=False)
            e.actor = None
        self.core.writer.discard(e.id)
        leases = [e.id + "-view"]
        if remove_snapshot:
            leases += [e.id, e.id + "-variants"]
        elif e.equal_mutable is not None:
            # An unfinalized twin has no snapshot of its own: a '<id>' lease can only be
            # left by a finalize that crashed before its commit, and would leak.
            leases.append(e.id)
        if txn is not None:
            self.core.store.clear(e.id, txn=txn)
            self._delete_leases(txn, leases)
        else:
            with self.core.env.write_txn() as own:
                self.core.store.clear(e.id, txn=own)
                self._delete_leases(own, leases)
        for parent_id in e.parents:
            parent = self.entries.get(parent_id) if parent_id else None
            if parent is not None:
                parent.holders -= 1
                if parent_id in e.trigger_parents:
                    self._release_trigger_hold(parent)
        if e.equal_mutable is not None:
            m = self.entries.get(e.equal_mutable)
            if m is not None and m.equal_immutable == e.id:
                m.equal_immutable = None
        if e.equal_immutable is not None:
            i = self.entries.get(e.equal_immutable)
            if i is not None and i.equal_mutable == e.id:
                i.equal_mutable = None

    def _hold(self, ids: Iterable[str]) -> None:
        for rid in ids:
            if rid:
                self.entries[rid].holders += 1

    def _unhold(self, ids: Iterable[str]) -> None:
        for rid in ids:
            e = self.entries.get(rid) if rid else None
            if e is not None:
                e.holders -= 1

    def _lazy_digests(self, e: RecordEntry, handlers: Mapping[str, DescHandler]) -> list[str]:
        """Blobs of lazy records in ``e``'s ancestry that ``handlers`` do not cover.

        BuildKit ``isLazy`` + ``walkUniqueAncestors``: blob-only with a blob that is not in
        the content store (one LMDB read snapshot). Root first, each digest once.
        """
        if self._blob_only == 0:
            return []
        missing: list[str] = []
        seen: set[str] = set()
        stack = [e]
        content = self.core.content
        with self.core.env.read_txn() as txn:
            while stack:
                cur = stack.pop()
                if cur.id in seen:
                    continue
                seen.add(cur.id)
                if (
                    cur.blob_only
                    and cur.blob
                    and cur.blob not in handlers
                    and not content.exists(cur.blob, txn=txn)
                ):
                    missing.append(cur.blob)
                stack.extend(self.entries[p] for p in cur.parents if p and p in self.entries)
        return list(dict.fromkeys(reversed(missing)))

    def _check_lazy(
        self, e: RecordEntry, handlers: Mapping[str, DescHandler]
    ) -> Mapping[str, DescHandler]:
        """``handlers``, plus the registered handlers of pulled sources for the lazy blobs
        of ``e``'s ancestry it does not cover (:meth:`CacheCore.register_handlers`).

        Raises:
            NeedsRemoteProviderError: lazy blobs that no handler covers.
        """
        missing = self._lazy_digests(e, handlers)
        if not missing:
            return handlers
        found = self.core.remote_handlers_for(missing)
        if len(found) < len(missing):
            raise NeedsRemoteProviderError([d for d in missing if d not in found])
        return merge_handlers(handlers, found)

    def _reset_size(self, e: RecordEntry, *, durable: bool = False) -> None:
        """The record's size is unknown again (new blob variant, extraction, a mutable taken).

        A new generation makes measurements begun before the reset uncacheable. With
        ``durable`` the reset is on disk before the caller goes on (a mutable about to change).
        """
        e.size_gen += 1
        if e.size != SIZE_UNKNOWN:
            e.size = SIZE_UNKNOWN
            self.core.writer.submit(e.id, {KEY_SIZE: SIZE_UNKNOWN})
            if durable:
                self.core.writer.flush()
        if e.actor is not None:
            with contextlib.suppress(pykka.ActorDeadError):
                e.actor.tell(("size_reset", e.size_gen))

    def _learn_size(self, e: RecordEntry, size: int, generation: int, *, tell: bool) -> bool:
        """Caches a measured size: table, metadata (write-behind) and the record's actor.

        Refused when the size was reset since the measurement began (``generation``). An
        equal pair shares one snapshot until finalize: its twin learns the same size, so the
        pair has one size whichever half disk usage shows. ``tell`` hands the size to the
        record's actor too (not needed when the actor measured it).
        """
        if e.dead or generation != e.size_gen or size < 0:
            return False
        self._set_size(e, size, tell=tell)
        twin_id = e.equal_mutable or e.equal_immutable
        twin = self.entries.get(twin_id) if twin_id else None
        if twin is not None and not twin.dead and twin.size != size:
            self._set_size(twin, size, tell=True)
        return True

    def _set_size(self, e: RecordEntry, size: int, *, tell: bool) -> None:
        if e.size != size:
            e.size = size
            self.core.writer.submit(e.id, {KEY_SIZE: size})
        if tell and e.actor is not None:
            with contextlib.suppress(pykka.ActorDeadError):
                e.actor.tell(("size_known", size, e.size_gen))

    def _new_entry(
        self,
        record_id: str,
        kind: RecordKind,
        parents: tuple[str, ...],
        values: Mapping[str, Any],
    ) -> RecordEntry:
        e = RecordEntry(record_id, kind, parents)
        e.mutable = not values.get(KEY_COMMITTED, False)
        e.equal_mutable = values.get(KEY_EQUAL_MUTABLE)
        e.retain = values.get(KEY_CACHE_POLICY) == 1
        e.snapshot_id = values.get(KEY_SNAPSHOT) or record_id
        e.description = values.get(KEY_DESCRIPTION) or ""
        e.created_at = values.get(KEY_CREATED_AT, 0)
        e.record_type = values.get(KEY_RECORD_TYPE) or ""
        e.size = values.get(KEY_SIZE, SIZE_UNKNOWN)
        e.blob = values.get(KEY_BLOB) or ""
        e.blob_only = bool(values.get(KEY_BLOB_ONLY, False))
        e.diff_id = values.get(KEY_DIFF_ID) or ""
        e.chain_id = values.get(KEY_CHAIN_ID) or ""
        e.blob_chain_id = values.get(KEY_BLOB_CHAIN_ID) or ""
        e.media_type = values.get(KEY_MEDIA_TYPE) or ""
        self.entries[record_id] = e
        if e.blob_only:
            self._blob_only += 1
        return e

    def _shown_size(self, e: RecordEntry, handles: int) -> int:
        """The size disk usage shows for ``e`` (:func:`~actors._prune.shown_size`)."""
        if e.mutable and handles > 0:
            return 0
        if e.size == SIZE_UNKNOWN and e.equal_immutable is not None:
            twin = self.entries.get(e.equal_immutable)
            if twin is not None:
                return twin.size
        return e.size

    def _size_snapshot(self, e: RecordEntry) -> str:
        """The snapshot whose usage is the record's size (an equal mutable's, until finalize)."""
        if e.equal_mutable is not None and e.equal_mutable in self.entries:
            return self.entries[e.equal_mutable].snapshot_id
        return e.snapshot_id

    def _info(self, e: RecordEntry) -> RecordInfo:
        # The table is current: record actors tell every use and size before they answer.
        return RecordInfo(
            id=e.id,
            kind=e.kind,
            mutable=e.mutable,
            description=e.description,
            created_at=e.created_at,
            last_used_at=e.last_used_at,
            usage_count=e.usage_count,
            record_type=e.record_type or "regular",
            cache_policy="retain" if e.retain else "default",
            parents=e.parent_ids(),
            blob=e.blob,
            blob_only=e.blob_only,
            diff_id=e.diff_id,
            chain_id=e.chain_id,
            blob_chain_id=e.blob_chain_id,
            snapshot_id=e.snapshot_id,
            media_type=e.media_type,
            size=e.size,
            equal_mutable=e.equal_mutable,
        )

    # -- public API (proxy methods) -------------------------------------------------------------

    def get(
        self,
        id: str,
        *,
        update_last_used: bool = True,
        desc_handlers: Mapping[str, Any] | None = None,
    ) -> ImmutableRef:
        """Returns a new handle on an immutable record (see API.md).

        A mutable record that nobody holds is committed implicitly (a handle on its equal
        immutable, whose id differs, is returned).

        ``desc_handlers`` (digest -> :class:`DescHandler`) travel with the handle: every lazy
        (blob-only, blob not local) record in the ancestry needs one, checked before a handle
        is taken (BuildKit ``checkLazyProviders``).

        Raises:
            NotFoundError: unknown or removed id.
            LockedError: the record is a mutable that is held.
            NeedsRemoteProviderError: lazy ancestors without a handler (``.digests``).
            InvalidError: malformed ``desc_handlers``, or ``update_last_used`` is not a bool.
        """
        check_bool("get update_last_used", update_last_used)
        handlers = check_handlers(desc_handlers)
        with self.core.timed("get"):
            e = self._entry(id)
            handlers = self._check_lazy(e, handlers)
            trigger = update_last_used
            if e.mutable:
                if self._mutable_locked(e):
                    msg = f"record {id!r} is locked: a mutable ref on it is open"
                    raise LockedError(msg)
                if e.equal_immutable is not None and e.equal_immutable in self.entries:
                    e = self.entries[e.equal_immutable]
                else:
                    e = self._commit_entry(e)
                    # BuildKit's implicit commit returns the commit's handle, which always
                    # counts a use (mref(trigger).commit() -> ref(true)).
                    trigger = True
            rid, hid, actor = self._acquire(e, trigger)
            return ImmutableRef(self.core, rid, hid, actor, handlers)

    def get_mutable(self, id: str) -> MutableRef:
        """Returns the exclusive handle on a mutable record.

        An unreferenced equal immutable is dropped (its id becomes not found).

        Raises:
            NotFoundError: unknown or removed id.
            InvalidError: the record is not mutable.
            LockedError: the mutable, or its equal immutable, is held.
        """
        with self.core.timed("get_mutable"):
            e = self._entry(id)
            if not e.mutable:
                msg = f"record {id!r} is not mutable"
                raise InvalidError(msg)
            if self._mutable_locked(e):
                msg = f"record {id!r} is locked: a ref on it or its committed twin is open"
                raise LockedError(msg)
            if e.equal_immutable is not None:
                i = self.entries.get(e.equal_immutable)
                if i is not None:
                    if not self._quiesce(i):
                        msg = f"record {id!r} is locked: its committed twin {i.id!r} is held"
                        raise LockedError(msg)
                    self._remove(i, remove_snapshot=False)
                e.equal_immutable = None
            # Its snapshot may change from now on: a cached size is no longer true.
            self._reset_size(e, durable=True)
            rid, hid, actor = self._acquire(e, True)
            return MutableRef(self.core, rid, hid, actor)

    def get_by_blob(
        self,
        desc: Descriptor,
        parent: ImmutableRef | None = None,
        *,
        desc_handlers: Mapping[str, DescHandler] | None = None,
        extract: bool = False,
        retain: bool = False,
        description: str | None = None,
    ) -> ImmutableRef | Future[ImmutableRef]:
        """Gets or creates the lazy (blob-only) record of a layer blob (BuildKit ``GetByBlob``).

        The diffID comes from ``desc.annotations["containerd.io/uncompressed"]``;
        ``chainID = ChainID([parent.chainID, diffID])`` (``diffID`` without parent) and
        ``blobChainID = ChainID([parent.blobChainID, ChainID([blob, diffID])])``. A record
        already in the ``blobchainid:`` index is returned (a new handle); otherwise a new
        blob-only record is made, re-using the snapshot of a ``chainid:`` match (or naming
        its snapshot by the chainID). Lazy matches without handlers are skipped. The parent
        is not consumed; the new handle carries the parent handle's handlers plus
        ``desc_handlers``. With ``extract`` the snapshot is materialised before the reply.

        Raises:
            InvalidError: a missing or malformed diffID, bad arguments, or a parent without
                chain IDs ("non-addressable").
            NeedsRemoteProviderError: the blob (or a lazy ancestor's) is neither in the
                content store nor covered by a handler.
        """
        if not isinstance(desc, Descriptor):
            msg = f"get_by_blob needs a Descriptor, not {type(desc).__name__}"
            raise InvalidError(msg)
        diff_id = diff_id_of(desc)
        check_bool("get_by_blob extract", extract)
        check_bool("get_by_blob retain", retain)
        if description is not None and not isinstance(description, str):
            msg = f"description must be a string, not {description!r}"
            raise InvalidError(msg)
        handlers = check_handlers(desc_handlers)
        parent_entry = self._ref_entry(parent, "parent") if parent is not None else None
        if parent is not None:
            handlers = merge_handlers(parent._desc_handlers, handlers)
        with self.core.timed("get_by_blob"):
            if desc.digest not in handlers and not self.core.content.exists(desc.digest):
                found = self.core.remote_handlers_for([desc.digest])
                if not found:
                    raise NeedsRemoteProviderError([desc.digest])
                handlers = merge_handlers(handlers, found)
            if parent_entry is not None:
                handlers = self._check_lazy(parent_entry, handlers)
                self._addressable(parent_entry)
            # BuildKit finalizes the parent here. An addressable parent is finalized already:
            # chain IDs need a blob, and set_blob finalizes before it sets one.
            request = _ByBlob(desc, diff_id, handlers, retain, description or "")
            ref = self._by_blob(request, parent_entry.id if parent_entry is not None else "")
        if extract:
            return self.core.submit(self._extract_job, ref)
        return ref

    def _extract_job(self, ref: ImmutableRef) -> ImmutableRef:
        try:
            extract_record(self.core, ref.id, ref._desc_handlers)
        except BaseException:
            with contextlib.suppress(RefcacheError):
                ref.release()
            raise
        return ref

    def _addressable(self, parent: RecordEntry) -> None:
        if not parent.chain_id or not parent.blob_chain_id:
            msg = (
                f"failed to get ref by blob on non-addressable parent {parent.id!r} "
                "(it has no chain IDs: set its blob first)"
            )
            raise InvalidError(msg)

    def _by_blob(self, request: _ByBlob, parent_id: str) -> ImmutableRef:
        """The indexed search and the insert of ``get_by_blob`` (BuildKit steps 4-6)."""
        desc = request.desc
        cid = request.diff_id
        bcid = chain_id(desc.digest, request.diff_id)
        if parent_id:
            p = self._entry(parent_id)
            cid = chain_id(p.chain_id, request.diff_id)
            bcid = chain_id(p.blob_chain_id, bcid)
        for item in self.core.store.search(INDEX_BLOB_CHAIN + bcid):
            e = self.entries.get(item.id)
            if e is None or e.dead or e.mutable or e.poisoned:
                continue
            if self._lazy_digests(e, request.handlers):
                continue  # BuildKit skips not-found and needs-provider matches
            rid, hid, actor = self._acquire(e, True)
            return ImmutableRef(self.core, rid, hid, actor, request.handlers)
        snapshot_id = cid
        for item in self.core.store.search(INDEX_CHAIN + cid):
            e = self.entries.get(item.id)
            if e is None or e.dead or e.mutable or e.poisoned:
                continue
            if self._lazy_digests(e, request.handlers):
                continue
            snapshot_id = e.snapshot_id  # re-use the linked record's snapshot
            break
        record_id = new_id()
        parents = (parent_id,) if parent_id else ()
        values: dict[str, Any] = {
            KEY_COMMITTED: True,
            KEY_CREATED_AT: time.time_ns(),
            KEY_SNAPSHOT: snapshot_id,
            KEY_SIZE: SIZE_UNKNOWN,
            KEY_DIFF_ID: request.diff_id,
            KEY_BLOB: desc.digest,
            KEY_CHAIN_ID: cid,
            KEY_BLOB_CHAIN_ID: bcid,
            # Always blob-only, even when a linked snapshot exists (BuildKit 99bd0d804).
            KEY_BLOB_ONLY: True,
            KEY_MEDIA_TYPE: desc.media_type,
            KEY_BLOB_SIZE: desc.size,
            KEY_LAYER_URLS: list(desc.urls) or None,
            KEY_CACHE_POLICY: 1 if request.retain else None,
            KEY_DESCRIPTION: request.description or None,
            **parent_fields("layer" if parent_id else "base", parents),
        }
        sn = self.core.snapshotter
        with self.core.env.write_txn() as txn:
            # The lease holds the snapshot and the blob before either exists (BuildKit).
            self.core.leases.create(record_id, flat=True, txn=txn)
            self.core.leases.add_resource(
                record_id, Resource(snapshot_id, f"snapshots/{sn.name}"), txn=txn
            )
            self.core.leases.add_resource(
                record_id, Resource(desc.digest, RESOURCE_CONTENT), txn=txn
            )
            item = self.core.store.get(record_id)
            item.queue_many(
                {k: v for k, v in values.items() if v is not None},
                {KEY_CHAIN_ID: INDEX_CHAIN + cid, KEY_BLOB_CHAIN_ID: INDEX_BLOB_CHAIN + bcid},
            )
            item.commit(txn=txn)
        e = self._new_entry(record_id, "layer" if parent_id else "base", parents, values)
        self._hold(parents)  # the new record owns a counted hold on its parent
        rid, hid, actor = self._acquire(e, True)
        return ImmutableRef(self.core, rid, hid, actor, request.handlers)

    def _op_by_blobs(
        self,
        plans: tuple[BlobRecordPlan, ...],
        known: Mapping[str, str],
        handlers: Mapping[str, DescHandler],
        want: frozenset[str],
    ) -> tuple[dict[str, str], dict[str, tuple[str, int, pykka.ActorRef[Any]]]]:
        """``get_by_blob`` for a batch of layer chains in one transaction (``pull``).

        ``plans`` are in chain order (a parent before its children); each is keyed by its
        blob-chain ID and names its parent by the parent's key (``""`` for a base). A key
        already in the ``blobchainid:`` index (and not lazy without a handler) is that
        record, as in ``get_by_blob``; the others are created blob-only, in one LMDB
        transaction (one fsync however many records). ``known`` maps keys resolved by
        earlier batches to record ids (the caller holds handles on them).

        Returns:
            ``(key -> record id for every plan, key -> (id, handle id, actor) for the keys
            in want)``: handles the caller wraps in :class:`ImmutableRef` (carrying
            ``handlers``) and releases.

        Raises:
            InvalidError: a plan whose key is not its blob-chain ID, or an unknown parent.
        """
        with self.core.timed("pull_records"):
            resolved: dict[str, str] = dict(known)
            chains: dict[str, str] = {}  # key -> chain ID
            todo: list[BlobRecordPlan] = []
            for p in plans:  # identities first (pure), so that lookups can be batched
                if p.key in resolved or p.key in chains:
                    continue
                parent_cid = ""
                if p.parent:
                    parent_cid = chains.get(p.parent, "")
                    if not parent_cid:
                        if p.parent not in resolved:
                            msg = f"pull: parent {p.parent} of layer {p.desc.digest} is unknown"
                            raise InvalidError(msg)
                        parent_cid = self._entry(resolved[p.parent]).chain_id
                own = chain_id(p.desc.digest, p.diff_id)
                bcid = chain_id(p.parent, own) if p.parent else own
                if bcid != p.key:
                    msg = f"pull: layer {p.desc.digest} has blob-chain ID {bcid}, not {p.key}"
                    raise InvalidError(msg)
                chains[p.key] = chain_id(parent_cid, p.diff_id) if parent_cid else p.diff_id
                todo.append(p)
            # Every index lookup of the batch in one read transaction.
            found_ids = self.core.store.search_ids(
                [INDEX_BLOB_CHAIN + p.key for p in todo]
                + [INDEX_CHAIN + chains[p.key] for p in todo]
            )
            creates: list[tuple[BlobRecordPlan, str, str, str]] = []  # plan, id, parent, sid
            for p in todo:
                found = self._first_usable(found_ids[INDEX_BLOB_CHAIN + p.key], handlers)
                if found is not None:
                    resolved[p.key] = found.id
                    continue
                cid = chains[p.key]
                linked = self._first_usable(found_ids[INDEX_CHAIN + cid], handlers)
                record_id = new_id()
                resolved[p.key] = record_id
                parent_id = resolved[p.parent] if p.parent else ""
                creates.append((p, record_id, parent_id, linked.snapshot_id if linked else cid))
            self._create_blob_records(creates, chains)
            handles = {}
            for key in want:
                rid = resolved.get(key)
                if rid is not None:
                    handles[key] = self._acquire(self.entries[rid], True)
            return {p.key: resolved[p.key] for p in plans}, handles

    def _first_usable(
        self, ids: Iterable[str], handlers: Mapping[str, DescHandler]
    ) -> RecordEntry | None:
        for rid in ids:
            e = self.entries.get(rid)
            if e is None or e.dead or e.mutable or self._lazy_digests(e, handlers):
                continue  # BuildKit skips not-found and needs-provider matches
            return e
        return None

    def _create_blob_records(
        self, creates: list[tuple[BlobRecordPlan, str, str, str]], chains: Mapping[str, str]
    ) -> None:
        if not creates:
            return
        sn = self.core.snapshotter
        rows = []
        with self.core.env.write_txn() as txn:
            for p, record_id, parent_id, snapshot_id in creates:
                cid = chains[p.key]
                parents = (parent_id,) if parent_id else ()
                kind: RecordKind = "layer" if parent_id else "base"
                values: dict[str, Any] = {
                    KEY_COMMITTED: True,
                    KEY_CREATED_AT: p.created_at or time.time_ns(),
                    KEY_SNAPSHOT: snapshot_id,
                    KEY_SIZE: SIZE_UNKNOWN,
                    KEY_DIFF_ID: p.diff_id,
                    KEY_BLOB: p.desc.digest,
                    KEY_CHAIN_ID: cid,
                    KEY_BLOB_CHAIN_ID: p.key,
                    KEY_BLOB_ONLY: True,
                    KEY_MEDIA_TYPE: p.desc.media_type,
                    KEY_BLOB_SIZE: p.desc.size,
                    KEY_LAYER_URLS: list(p.desc.urls) or None,
                    KEY_DESCRIPTION: p.description or None,
                    KEY_RECORD_TYPE: p.record_type or None,
                    **parent_fields(kind, parents),
                }
                # As get_by_blob: the lease holds the snapshot and the blob before either
                # exists.
                self.core.leases.create(record_id, flat=True, txn=txn)
                self.core.leases.add_resource(
                    record_id, Resource(snapshot_id, f"snapshots/{sn.name}"), txn=txn
                )
                self.core.leases.add_resource(
                    record_id, Resource(p.desc.digest, RESOURCE_CONTENT), txn=txn
                )
                item = self.core.store.get(record_id)
                item.queue_many(
                    {k: v for k, v in values.items() if v is not None},
                    {KEY_CHAIN_ID: INDEX_CHAIN + cid, KEY_BLOB_CHAIN_ID: INDEX_BLOB_CHAIN + p.key},
                )
                item.commit(txn=txn)
                rows.append((record_id, kind, parents, values))
        for record_id, kind, parents, values in rows:
            self._new_entry(record_id, kind, parents, values)
            self._hold(parents)

    def new(
        self,
        parent: ImmutableRef | None = None,
        *,
        retain: bool = False,
        description: str | None = None,
        record_type: str | None = None,
        created_at: int | None = None,
    ) -> Future[MutableRef]:
        """Creates a mutable record on ``parent`` (not consumed: the record holds its own).

        The snapshot is prepared off the manager's thread; the reply completes when it is.
        """
        check_bool("new retain", retain)
        for name, value in (("description", description), ("record_type", record_type)):
            if value is not None and not isinstance(value, str):
                msg = f"{name} must be a string, not {value!r}"
                raise InvalidError(msg)
        if created_at is not None and (
            not isinstance(created_at, int) or isinstance(created_at, bool) or created_at < 0
        ):
            msg = f"created_at must be nanoseconds since the epoch, not {created_at!r}"
            raise InvalidError(msg)
        parent_entry = self._ref_entry(parent, "parent") if parent is not None else None
        record_id = new_id()
        values: dict[str, Any] = {
            KEY_CREATED_AT: created_at if created_at is not None else time.time_ns(),
            KEY_SNAPSHOT: record_id,
            KEY_CACHE_POLICY: 1 if retain else None,
            KEY_DESCRIPTION: description or None,
            KEY_RECORD_TYPE: record_type or None,
        }
        parents: tuple[str, ...] = ()
        handlers: Mapping[str, DescHandler] = frozen_map(None)
        if parent_entry is not None and parent is not None:
            parents = (parent_entry.id,)
            values[KEY_PARENT] = parent_entry.id
            handlers = parent._desc_handlers  # BuildKit: the new handle inherits them
            self._hold(parents)  # BuildKit clones the parent: the new record holds its own
        return self.core.submit(self._new_job, record_id, parents, values, handlers)

    def _new_job(
        self,
        record_id: str,
        parents: tuple[str, ...],
        values: dict[str, Any],
        handlers: Mapping[str, DescHandler],
    ) -> MutableRef:
        # Runs on the I/O executor: finalize the parent, then lease + metadata in one
        # transaction (a crash after it leaves a mutable without snapshot, which loading
        # removes), then the snapshot copy outside any transaction.
        core = self.core
        try:
            with core.timed("new"):
                parent_sid = ""
                if parents:
                    # BuildKit New: finalize the parent, then extract it (a merge or diff
                    # has no snapshot until then), and use its snapshot as the parent.
                    finalize_record(core, parents[0])
                    extract_record(core, parents[0], handlers)
                    parent_sid = core.ask_manager(("snapshot_of", parents[0]))
                sn = core.snapshotter
                with core.env.write_txn() as txn:
                    core.leases.create(record_id, flat=True, txn=txn)
                    core.leases.add_resource(
                        record_id, Resource(record_id, f"snapshots/{sn.name}"), txn=txn
                    )
                    item = core.store.get(record_id)
                    item.queue_many({k: v for k, v in values.items() if v is not None})
                    item.commit(txn=txn)
                try:
                    sn.prepare(record_id, parent_sid)
                except BaseException:
                    with core.env.write_txn() as txn:
                        core.store.clear(record_id, txn=txn)
                        with contextlib.suppress(NotFoundError):
                            core.leases.delete(record_id, txn=txn)
                    raise
        except BaseException:
            with contextlib.suppress(RefcacheError):
                core.ask_manager(("unhold", parents))
            raise
        rid, hid, actor = core.ask_manager(
            ("register", record_id, "layer" if parents else "base", parents, values)
        )
        return MutableRef(core, rid, hid, actor, handlers)

    def merge(
        self, parents: Sequence[ImmutableRef | None]
    ) -> Future[ImmutableRef | None] | ImmutableRef | None:
        """Merges refs; inputs are not consumed.

        ``None``s are skipped and inputs that are merges are replaced by their inputs
        (flattened) first; then no input gives ``None`` and one input a new handle on it
        (BuildKit ``createMergeRef``: "merge of 1 thing is that thing"), so ``merge([m])``
        of a merge ``m`` is a new merge of ``m``'s inputs.
        """
        if isinstance(parents, ImmutableRef) or not isinstance(parents, Sequence):
            msg = f"merge takes a sequence of ImmutableRef, not {type(parents).__name__}"
            raise InvalidError(msg)
        refs = [p for p in parents if p is not None]
        entries = [self._ref_entry(p, "merge input") for p in refs]
        ids: list[str] = []
        for e in entries:
            ids.extend(e.parents if e.kind == "merge" else (e.id,))
        if not ids:
            return None
        # BuildKit: the merge's handle carries the union of its inputs' handlers.
        handlers = merge_handlers(*(r._desc_handlers for r in refs if r is not None))
        if len(ids) == 1:
            # The parent clone itself, which counts no use.
            rid, hid, actor = self._acquire(self.entries[ids[0]], False)
            return ImmutableRef(self.core, rid, hid, actor, handlers)
        self._hold(ids)
        return self.core.submit(self._merge_job, tuple(ids), handlers)

    def _merge_job(
        self,
        ids: tuple[str, ...],
        handlers: Mapping[str, DescHandler] | None = None,
        triggers: frozenset[str] = frozenset(),
    ) -> ImmutableRef:
        # The holds on ``ids`` are this job's: the new record takes them over, or they are
        # dropped on failure. ``triggers``: inputs whose hold counts a use when it goes.
        core = self.core
        try:
            with core.timed("merge"):
                for rid in dict.fromkeys(ids):
                    finalize_record(core, rid)
        except BaseException:
            with contextlib.suppress(RefcacheError):
                core.ask_manager(("unhold", ids, triggers))
            raise
        rid, hid, actor = self._register_immutable_job("merge", ids, {}, triggers)
        return ImmutableRef(core, rid, hid, actor, handlers)

    def _register_immutable_job(
        self,
        kind: RecordKind,
        parents: tuple[str, ...],
        extra: dict[str, Any],
        triggers: frozenset[str] = frozenset(),
        *,
        piece: bool = False,
    ) -> Any:
        # Runs on the I/O executor: lease + metadata in one transaction, then registration:
        # a handle for the caller, or (``piece``) a record a merge being made will hold.
        core = self.core
        record_id = new_id()
        values: dict[str, Any] = {
            KEY_COMMITTED: True,
            KEY_CREATED_AT: time.time_ns(),
            KEY_SNAPSHOT: record_id,
            KEY_SIZE: SIZE_UNKNOWN,
            **parent_fields(kind, parents),
            **extra,
        }
        try:
            with core.env.write_txn() as txn:
                core.leases.create(record_id, flat=True, txn=txn)
                core.leases.add_resource(
                    record_id, Resource(record_id, f"snapshots/{core.snapshotter.name}"), txn=txn
                )
                item = core.store.get(record_id)
                item.queue_many({k: v for k, v in values.items() if v is not None})
                item.commit(txn=txn)
        except BaseException:
            with contextlib.suppress(RefcacheError):
                core.ask_manager(("unhold", parents, triggers))
            raise
        if piece:
            return core.ask_manager(("register_piece", record_id, kind, parents, values))
        return core.ask_manager(("register", record_id, kind, parents, values, triggers))

    def diff(self, lower: ImmutableRef | None, upper: ImmutableRef | None) -> Future[ImmutableRef]:
        """The changes from ``lower`` to ``upper`` (``None``: nothing), as a record.

        When ``lower``'s layer chain is a strict prefix of ``upper``'s and ``upper`` has more
        than one extra layer, the result is a merge of per-layer diffs (BuildKit).

        Raises:
            InvalidError: ``lower`` is ``None``.
        """
        if lower is None:
            msg = "lower ref for diff cannot be None"
            raise InvalidError(msg)
        low = self._ref_entry(lower, "diff lower")
        up = self._ref_entry(upper, "diff upper") if upper is not None else None
        handlers = merge_handlers(
            lower._desc_handlers, upper._desc_handlers if upper is not None else frozen_map(None)
        )
        if up is not None:
            low_chain = self._layer_walk(low)
            up_chain = self._layer_walk(up)
            n = len(low_chain)
            if len(up_chain) > n + 1 and [x.id for x in up_chain[:n]] == [x.id for x in low_chain]:
                pieces = up_chain[n:]
                plan: list[tuple[str, str, str]] = []  # (kind, lower, upper) per piece
                for layer in pieces:
                    if layer.kind == "layer":
                        plan.append(("diff", layer.parents[0], layer.id))
                        self._hold((layer.parents[0], layer.id))
                    else:
                        plan.append(("self", "", layer.id))
                        self._hold((layer.id,))
                return self.core.submit(self._diff_merge_job, tuple(plan), handlers)
        parents = (low.id, up.id if up is not None else "")
        self._hold(parents)
        return self.core.submit(self._diff_job, parents, handlers)

    def _diff_job(
        self,
        parents: tuple[str, str],
        handlers: Mapping[str, DescHandler] | None = None,
    ) -> ImmutableRef:
        self._finalize_inputs(parents)
        rid, hid, actor = self._register_immutable_job("diff", parents, {})
        return ImmutableRef(self.core, rid, hid, actor, handlers)

    def _finalize_inputs(self, parents: tuple[str, ...]) -> None:
        # The job owns the holds on ``parents``: dropped here if a finalize fails.
        core = self.core
        try:
            with core.timed("diff"):
                for rid in dict.fromkeys(p for p in parents if p):
                    finalize_record(core, rid)
        except BaseException:
            with contextlib.suppress(RefcacheError):
                core.ask_manager(("unhold", parents))
            raise

    def _diff_merge_job(
        self,
        plan: tuple[tuple[str, str, str], ...],
        handlers: Mapping[str, DescHandler] | None = None,
    ) -> ImmutableRef:
        """A multi-layer diff: a merge of one diff record per layer (BuildKit ``Diff``).

        Each per-layer diff is made with one hold, the merge's, and that hold counts a use
        when it goes (BuildKit hands the merge the diff's own handle, whose triggerLastUsed
        is set): a piece is first used when the merge that owns it is removed, not when it
        is made. A layer without a parent is merged as itself (an ordinary hold).
        """
        core = self.core
        ids: list[str] = []
        triggers: list[str] = []
        started = 0  # plan entries whose holds were handed over (to a piece, or to ids)
        try:
            for kind, low, up in plan:
                started += 1
                if kind == "diff":
                    # _finalize_inputs and _register_immutable_job drop these holds on failure.
                    self._finalize_inputs((low, up))
                    desc = {KEY_DESCRIPTION: f'diff "{low}" -> "{up}"'}
                    rid = self._register_immutable_job("diff", (low, up), desc, piece=True)
                    ids.append(rid)
                    triggers.append(rid)
                else:
                    ids.append(up)  # the hold diff() took becomes the merge's
        except BaseException:
            with contextlib.suppress(RefcacheError):
                core.ask_manager(("unhold", tuple(ids), frozenset(triggers)))
            for kind, low, up in plan[started:]:
                with contextlib.suppress(RefcacheError):
                    core.ask_manager(("unhold", (low, up) if kind == "diff" else (up,)))
            raise
        return self._merge_job(tuple(ids), handlers, frozenset(triggers))

    def search(self, index: str, *, prefix: bool = False) -> list[RecordInfo]:
        """Records in the metadata index ``index`` (exact, or every index with that prefix).

        Raises:
            InvalidError: ``index`` is not a string or ``prefix`` not a bool.
        """
        check_bool("search prefix", prefix)
        items = self.core.store.search(index, prefix=prefix)
        out = []
        for item in items:
            e = self.entries.get(item.id)
            if e is not None and not e.dead:
                out.append(self._info(e))
        return out

    def statistics(self) -> CacheStatistics:
        """One consistent snapshot of the cache for metrics (see :class:`CacheStatistics`).

        Sizes are counted as ``disk_usage`` shows them, from the same table: an equal pair
        once, a mutable record with open handles as 0, unknown sizes as 0; reclaimable are
        the records disk usage reports as not in use (a chain held only by unreferenced
        records included). After a ``disk_usage`` (which measures unknown sizes) the byte
        gauges therefore add up to its rows.
        """
        counts = self._handle_counts()
        by_kind: dict[str, int] = dict.fromkeys(("base", "layer", "merge", "diff"), 0)
        bytes_by_kind: dict[str, int] = dict.fromkeys(("base", "layer", "merge", "diff"), 0)
        mutable = lazy = in_use = handles = reclaimable = 0
        entries = self.entries
        refs: dict[str, int] = {}
        for rid, e in entries.items():
            by_kind[e.kind] += 1
            mutable += e.mutable
            lazy += e.blob_only
            n = counts.get(rid, 0)
            handles += n
            in_use += n > 0
            refs[rid] = n + e.holders
        going = self._prune_state().pruning
        visible = visible_records(entries, refs, going)
        held = records_in_use(entries, refs, visible, going)
        detail = []
        for rid in visible:
            e = entries[rid]
            n = counts.get(rid, 0)
            size = self._shown_size(e, n)
            bytes_by_kind[e.kind] += max(size, 0)
            if rid not in held:
                reclaimable += max(size, 0)
            detail.append((rid, n, size))
        if len(visible) != len(entries):
            # The hidden half of a pair has no size of its own to show; its handles count.
            shown = set(visible)
            detail.extend(
                (rid, n, SIZE_UNKNOWN) for rid, n in counts.items() if n and rid not in shown
            )
        detail.sort(key=lambda d: (d[1] == 0, d[0]))
        doubles, ops, lat_sum, lat_buckets = self.core.counters()
        map_size, used = self.core.env.map_info()
        reg = self.core.registry_counters()
        total = len(self.entries)
        return CacheStatistics(
            records=total,
            records_by_kind=by_kind,
            mutable=mutable,
            immutable=total - mutable,
            lazy=lazy,
            in_use=in_use,
            dead=0,
            open_handles=handles,
            bytes_by_kind=bytes_by_kind,
            reclaimable_bytes=reclaimable,
            active_actors=sum(1 for e in self.entries.values() if e.actor is not None),
            pool_workers=self.core.pool.workers,
            operations=ops,
            latency_sum_seconds=lat_sum,
            latency_buckets=lat_buckets,
            prune_records_total=int(self._prune_stats[0]),
            prune_bytes_total=int(self._prune_stats[1]),
            prune_seconds_total=float(self._prune_stats[2]),
            gc_runs_total=self._gc_stats[0],
            gc_bytes_total=self._gc_stats[1],
            double_releases_total=doubles,
            lmdb_map_size_bytes=map_size,
            lmdb_used_bytes=used,
            records_detail=tuple(detail),
            registry_bytes=reg.bytes,
            registry_blobs=reg.blobs,
            registry_requests=reg.requests,
            registry_latency_sum_seconds=reg.latency_sum,
            registry_latency_buckets={k: tuple(v) for k, v in reg.latency_buckets.items()},
        )

    # -- internal operations (from handles and jobs) --------------------------------------

    def _op_ping(self) -> bool:
        return True

    def _op_register(
        self,
        record_id: str,
        kind: RecordKind,
        parents: tuple[str, ...],
        values: dict[str, Any],
        triggers: frozenset[str] = frozenset(),
    ) -> tuple[str, int, pykka.ActorRef[Any]]:
        e = self._new_entry(record_id, kind, parents, values)
        e.trigger_parents = triggers
        return self._acquire(e, True)

    def _op_register_piece(
        self, record_id: str, kind: RecordKind, parents: tuple[str, ...], values: dict[str, Any]
    ) -> str:
        """Registers a record that a merge being made will own: one hold, which counts a use
        when it goes, and no handle."""
        e = self._new_entry(record_id, kind, parents, values)
        e.holders = 1
        e.trigger_holds = 1
        return e.id

    def _op_unhold(self, ids: tuple[str, ...], triggers: frozenset[str] = frozenset()) -> None:
        for rid in ids:
            e = self.entries.get(rid) if rid else None
            if e is not None:
                e.holders -= 1
                if rid in triggers:
                    self._release_trigger_hold(e)

    def _op_snapshot_of(self, record_id: str) -> str:
        return self._entry(record_id).snapshot_id

    def _op_actor_of(self, record_id: str) -> pykka.ActorRef[Any]:
        return self._activate(self._entry(record_id))

    def _op_clone(self, record_id: str) -> tuple[str, int, pykka.ActorRef[Any]]:
        return self._acquire(self._entry(record_id), False)

    def _op_info(self, record_id: str) -> RecordInfo:
        return self._info(self._entry(record_id))

    def _op_set_policy(self, record_id: str, retain: bool) -> None:
        e = self._entry(record_id)
        self.core.store.get(record_id).set(KEY_CACHE_POLICY, 1 if retain else None)
        e.retain = retain

    def _op_md_changed(self, record_id: str, values: dict[str, Any]) -> None:
        """A handle wrote metadata: refresh the keys the table mirrors."""
        e = self.entries.get(record_id)
        if e is None:
            return
        if KEY_DESCRIPTION in values:
            e.description = values[KEY_DESCRIPTION] or ""
        if KEY_RECORD_TYPE in values:
            e.record_type = values[KEY_RECORD_TYPE] or ""
        if KEY_CREATED_AT in values:
            e.created_at = values[KEY_CREATED_AT] or 0

    def _op_used(self, record_id: str, usage_count: int, last_used_at: int | None) -> None:
        """A record actor counted a use (a tell, sent before the releasing caller's answer)."""
        e = self.entries.get(record_id)
        if e is not None and usage_count > e.usage_count:
            e.usage_count, e.last_used_at = usage_count, last_used_at

    def _op_sized(self, record_id: str, size: int, generation: int) -> None:
        """A record actor measured its size (a tell, sent before the measuring caller's
        answer): the table and the metadata take it, and an equal twin."""
        e = self.entries.get(record_id)
        if e is not None:
            self._learn_size(e, size, generation, tell=False)

    def _op_unreferenced(self, record_id: str) -> None:
        """A last handle went: decide, as BuildKit's release does, what happens to the record."""
        e = self.entries.get(record_id)
        if e is None or e.dead:
            return
        settled = self._settle(e)
        if settled is None:
            return
        if e.mutable:
            self._mutable_released(e)
            return
        if e.equal_mutable is not None:
            m = self.entries.get(e.equal_mutable)
            if m is not None and not m.dead and self._handles(m) == 0:
                # BuildKit: releasing a used immutable sets equalMutable.triggerLastUsed, so
                # a kept mutable counts the use when the pair's last ref goes.
                self._mutable_released(m, used=settled.used)
            return
        if settled.had_view:
            with self.core.env.write_txn() as txn:
                self._delete_leases(txn, [e.id + "-view"])

    def _mutable_released(self, m: RecordEntry, *, used: bool = False) -> None:
        i = self.entries.get(m.equal_immutable) if m.equal_immutable else None
        if m.retain or (i is not None and i.retain):
            if used:
                self._touch_entry(m)
            return
        if i is not None and (i.holders > 0 or not self._quiesce(i)):
            # The pair was taken again after the release that sent us here (a get() made
            # the twin, or a child being created holds it; its job finalizes the pair).
            # BuildKit decides under cm.mu at release time; here the twin's own last
            # release decides later. Removing it now would pull it from under its refs.
            return
        with self.core.env.write_txn() as txn:
            if i is not None:
                self._remove(i, remove_snapshot=False, txn=txn)
            self._remove(m, remove_snapshot=True, txn=txn)

    def _touch_entry(self, e: RecordEntry) -> None:
        """Counts one use of a record no user handle counts uses on (BuildKit
        ``updateLastUsed``): the table, the metadata, and the record's actor."""
        e.usage_count += 1
        e.last_used_at = time.time_ns()
        self.core.writer.submit(
            e.id, {KEY_USAGE_COUNT: e.usage_count, KEY_LAST_USED_AT: e.last_used_at}
        )
        if e.actor is not None:
            with contextlib.suppress(pykka.ActorDeadError):
                e.actor.tell(("usage", e.usage_count, e.last_used_at))

    def _release_trigger_hold(self, e: RecordEntry) -> None:
        """A hold that counts uses went (BuildKit ``parentRefs.release`` of a handle with
        triggerLastUsed): a use, unless another reference that counts uses remains."""
        e.trigger_holds -= 1
        if e.actor is not None:
            try:
                self._ask(e.actor, ("trigger_holds", e.trigger_holds))
                if e.trigger_holds == 0 and self._ask(e.actor, ("trigger_handles",)):
                    return
            except pykka.ActorDeadError:
                e.actor = None
        if e.trigger_holds == 0:
            self._touch_entry(e)

    def _commit_entry(self, m: RecordEntry) -> RecordEntry:
        """Creates the equal immutable of ``m`` (lazy commit: no snapshot work)."""
        record_id = new_id()
        values: dict[str, Any] = {
            KEY_COMMITTED: True,
            KEY_CREATED_AT: time.time_ns(),
            KEY_SNAPSHOT: record_id,
            # The twin's size is the mutable's snapshot usage: known when the mutable rested
            # since it was measured (BuildKit measures it again: the same number).
            KEY_SIZE: m.size,
            KEY_EQUAL_MUTABLE: m.id,
            KEY_DESCRIPTION: m.description or None,
            **parent_fields(m.kind, m.parents),
        }
        item = self.core.store.get(record_id)
        item.queue_many({k: v for k, v in values.items() if v is not None})
        item.commit()
        i = self._new_entry(record_id, m.kind, m.parents, values)
        self._hold(m.parents)  # the twin holds its parents too (BuildKit cloneParentRefs)
        m.equal_immutable = record_id
        return i

    def _op_commit(self, record_id: str, hid: int) -> tuple[str, int, pykka.ActorRef[Any]]:
        m = self.entries.get(record_id)
        if m is None or m.dead or not m.mutable or m.actor is None:
            msg = f"invalid mutable ref {record_id!r}: not an open mutable record"
            raise InvalidError(msg)
        if not self._ask(m.actor, ("consume", hid)):
            msg = f"invalid mutable ref {record_id!r}: the handle was released"
            raise InvalidError(msg)
        if m.equal_immutable is not None:
            old = self.entries.get(m.equal_immutable)
            if old is not None:
                self._remove(old, remove_snapshot=False)
        i = self._commit_entry(m)
        self._settle(m)
        return self._acquire(i, True)

    def _op_finalize_begin(self, record_id: str) -> tuple[Any, ...] | None:
        i = self._entry(record_id)
        if i.equal_mutable is None:
            return None
        if i.finalizing is not None:
            return ("wait", i.finalizing)
        m = self.entries.get(i.equal_mutable)
        if m is None:
            i.equal_mutable = None
            return None
        m.dead = True  # nobody may take the mutable while its snapshot is committed
        i.finalizing = ThreadingFuture()
        return ("do", i.snapshot_id, m.snapshot_id)

    def _op_finalize_end(self, record_id: str, error: BaseException | None) -> None:
        i = self.entries.get(record_id)
        if i is None:
            return
        flight, i.finalizing = i.finalizing, None
        m = self.entries.get(i.equal_mutable) if i.equal_mutable else None
        if error is not None:
            if m is not None:
                m.dead = False
            if flight is not None:
                flight.set_exception(exc_info=(type(error), error, error.__traceback__))
            return
        i.equal_mutable = None
        if m is not None:
            m.equal_immutable = None
            m.dead = False
            self._remove(m, remove_snapshot=True)
        if i.actor is not None:
            with contextlib.suppress(pykka.ActorDeadError):
                i.actor.tell(("set_mount_snapshot", i.snapshot_id))
        if flight is not None:
            flight.set(None)

    def _layer_walk(self, top: RecordEntry) -> list[RecordEntry]:
        """The layers as they would appear in an image, root first (BuildKit ``layerWalk``)."""
        out: list[RecordEntry] = []
        stack: list[tuple[RecordEntry, bool]] = [(top, False)]
        while stack:
            e, expanded = stack.pop()
            if expanded:
                out.append(e)
                continue
            if e.kind == "merge":
                for p in reversed(e.parents):
                    stack.append((self.entries[p], False))
            elif e.kind == "diff":
                low = self.entries.get(e.parents[0]) if e.parents[0] else None
                up = self.entries.get(e.parents[1]) if e.parents[1] else None
                if (up is not None and low is None and up.kind == "base") or (
                    up is not None
                    and low is not None
                    and up.kind == "layer"
                    and up.parents[0] == low.id
                ):
                    out.append(up)
                else:
                    out.append(e)
            elif e.kind == "layer":
                stack.append((e, True))
                stack.append((self.entries[e.parents[0]], False))
            else:
                out.append(e)
        return out

    def _op_layer_chain(self, record_id: str) -> list[str]:
        return [e.id for e in self._layer_walk(self._entry(record_id))]

    def _op_ancestors(self, record_id: str) -> list[str]:
        out: list[str] = []
        stack = [self._entry(record_id)]
        while stack:
            e = stack.pop()
            out.append(e.id)
            stack.extend(self.entries[p] for p in e.parents if p and p in self.entries)
        return out

    def _op_extract_plan(
        self, record_id: str
    ) -> tuple[str, list[str], list[tuple[str, str]]] | None:
        e = self._entry(record_id)
        if e.kind not in ("merge", "diff"):
            return None
        diffs: list[tuple[str, str]] = []
        deps: list[str] = []

        def sid(rid: str) -> str:
            return self.entries[rid].snapshot_id if rid else ""

        for layer in self._layer_walk(e):
            if layer.kind == "diff":
                low, up = layer.parents
                diffs.append((sid(low), sid(up)))
                deps.extend(x for x in (low, up) if x)
            elif layer.kind == "layer":
                diffs.append((sid(layer.parents[0]), layer.snapshot_id))
                deps.append(layer.id)
            else:
                diffs.append(("", layer.snapshot_id))
                deps.append(layer.id)
        return e.snapshot_id, list(dict.fromkeys(deps)), diffs

    # -- blob operations (from actors._blobs / actors._remote, in callers' threads) ---------

    def _op_node(self, record_id: str) -> BlobNode:
        e = self._entry(record_id)
        return BlobNode(
            id=e.id,
            kind=e.kind,
            parents=e.parents,
            snapshot_id=e.snapshot_id,
            blob=e.blob,
            blob_only=e.blob_only,
            diff_id=e.diff_id,
            chain_id=e.chain_id,
            blob_chain_id=e.blob_chain_id,
            media_type=e.media_type,
            mutable=e.mutable,
            finalized=e.equal_mutable is None,
            poisoned=e.poisoned,
        )

    def _op_poisoned(self, record_id: str, actual_diff_id: str) -> bool:
        """The record's blob does not have the diffID the record claims (found by an apply
        or a conversion): the record may never be found by chain ID, lend or take a
        snapshot, or be exported again. Its chain IDs and their index entries go.

        Returns whether the blob should leave the content store too: yes, unless another
        live record claims the diffID the blob really has (for that record it is honest).
        """
        e = self.entries.get(record_id)
        if e is None:
            return True
        e.poisoned = True
        if e.chain_id or e.blob_chain_id:
            item = self.core.store.get(record_id)
            # None deletes the value and its chainid:/blobchainid: index entry.
            item.queue_many({KEY_CHAIN_ID: None, KEY_BLOB_CHAIN_ID: None})
            item.commit()
            e.chain_id = e.blob_chain_id = ""
        return not any(
            o.blob == e.blob and o.diff_id == actual_diff_id and not o.poisoned and not o.dead
            for o in self.entries.values()
            if o is not e
        )

    def _op_size_inputs(self, record_id: str) -> tuple[str, bool]:
        e = self._entry(record_id)
        return e.blob, e.blob_only

    def _op_size_reset(self, record_id: str) -> None:
        e = self.entries.get(record_id)
        if e is not None:
            self._reset_size(e)

    def _op_extracted(self, record_id: str) -> None:
        """A blob-only record's snapshot was extracted (BuildKit ``unlazyLayer``'s end)."""
        e = self.entries.get(record_id)
        if e is None or e.dead:
            return
        if e.blob_only:
            self.core.store.get(record_id).set(KEY_BLOB_ONLY, False)
            e.blob_only = False
            self._blob_only -= 1
        self._reset_size(e)

    def _op_set_blob(self, record_id: str, desc: Descriptor) -> bool:
        """BuildKit ``setBlob`` (the table part): returns whether the blob was set.

        The record must be finalized (the caller did it). A record with a blob keeps it.
        """
        e = self._entry(record_id)
        if e.mutable:
            msg = f"cannot set a blob on mutable record {record_id!r}"
            raise InvalidError(msg)
        if e.equal_mutable is not None:
            msg = f"cannot set a blob on record {record_id!r} before it is finalized"
            raise FailedPreconditionError(msg)
        if e.blob:
            return False
        diff_id = diff_id_of(desc)
        with self.core.env.write_txn() as txn:
            # The blob joins the record's lease in the transaction that names it.
            self.core.leases.add_resource(
                record_id, Resource(desc.digest, RESOURCE_CONTENT), txn=txn
            )
            item = self.core.store.get(record_id)
            item.queue_many(
                {
                    KEY_DIFF_ID: diff_id,
                    KEY_BLOB: desc.digest,
                    KEY_MEDIA_TYPE: desc.media_type,
                    KEY_BLOB_SIZE: desc.size,
                }
            )
            item.append_strings(KEY_LAYER_URLS, desc.urls)
            item.commit(txn=txn)
        e.diff_id, e.blob, e.media_type = diff_id, desc.digest, desc.media_type
        return True

    def _op_chain_metadata(self, record_id: str, layers: frozenset[str]) -> None:
        """BuildKit ``computeChainMetadata`` for one record (parents computed before)."""
        e = self._entry(record_id)
        if e.poisoned:
            msg = (
                f"record {record_id} was quarantined: its blob {e.blob} does not have the "
                f"diffID {e.diff_id} it claims"
            )
            raise InvalidError(msg)
        if e.chain_id:
            return
        cid = bcid = ""
        if e.kind == "base":
            if record_id not in layers:
                return
            cid, bcid = e.diff_id, chain_id(e.blob, e.diff_id)
        elif e.kind == "layer":
            if record_id not in layers:
                return
            p = self._entry(e.parents[0])
            if p.id in layers:
                if not p.chain_id or not p.blob_chain_id:
                    msg = (
                        f"failed to set chain for record {record_id!r} with non-addressable "
                        f"parent {p.id!r}"
                    )
                    raise FailedPreconditionError(msg)
                cid, bcid = p.chain_id, p.blob_chain_id
            cid = chain_id(cid, e.diff_id)
            bcid = chain_id(bcid, chain_id(e.blob, e.diff_id))
        elif e.kind == "merge":
            base = self._entry(e.parents[0])
            if base.id not in layers:
                return  # not enough information at this time
            cid, bcid = base.chain_id, base.blob_chain_id
            for other in e.parents[1:]:
                for layer in self._layer_walk(self._entry(other)):
                    if layer.id not in layers:
                        return
                    cid = chain_id(cid, layer.diff_id)
                    bcid = chain_id(bcid, chain_id(layer.blob, layer.diff_id))
        elif record_id in layers:  # a diff that is its own blob
            cid, bcid = e.diff_id, chain_id(e.blob, e.diff_id)
        else:  # a diff re-using its upper's blob
            up = self._entry(e.parents[1])
            cid, bcid = up.chain_id, up.blob_chain_id
        values: dict[str, Any] = {}
        indexes: dict[str, str] = {}
        if cid:
            values[KEY_CHAIN_ID] = cid
            indexes[KEY_CHAIN_ID] = INDEX_CHAIN + cid
        if bcid:
            values[KEY_BLOB_CHAIN_ID] = bcid
            indexes[KEY_BLOB_CHAIN_ID] = INDEX_BLOB_CHAIN + bcid
        if not values:
            return
        item = self.core.store.get(record_id)
        item.queue_many(values, indexes)
        item.commit()
        e.chain_id, e.blob_chain_id = cid, bcid
