"""The cache manager actor: the record table and every operation on more than one record.

BuildKit's ``cm.mu`` made into a mailbox. The :class:`CacheManager` (a ``ThreadingActor``, its
own thread) owns the record table (:class:`~actors._table.RecordTable`: ``id ->
RecordEntry``, record actors' activation, holds, sizes), record creation and removal, equal-
pair links, and the global operations: ``get``, ``get_mutable``, ``new``, ``get_by_blob``,
``merge``, ``diff``, ``search``, ``disk_usage``, ``prune``, ``statistics``. It owns two
components, created here with explicit dependencies and running on its thread:
:class:`~actors._blobrecords.BlobRecords` (records by blob, and the table side of the blob
work that runs in callers' threads) and :class:`~actors._pruner.Pruner` (disk usage, prune,
listeners).

Records at rest are data: a compact :class:`~actors._entry.RecordEntry` plus their LMDB
metadata. A record's *actor* (:mod:`actors._record`) exists only while something needs it
(handles, a mount, a size computation) and is passivated when idle (a small LRU of idle
actors is kept to make get+release of unreferenced records cheap).

Messages (DESIGN.md): the public methods are called through the typed proxy
(:mod:`actors._proxy`); handles, jobs and record actors send the typed messages of
:mod:`actors._messages`, dispatched by class to the handler of the manager or of a component
(one dict lookup). The manager asks record actors (records never ask back); slow work —
snapshot copies, merges, size walks, prune deletions, GC — runs on the I/O executor
(:mod:`actors._jobs`, :mod:`actors._prune_jobs`) or in the calling thread, and the manager
finishes with a follow-up message. A public method that needs such work returns a future;
the manager's futures flatten nested futures, so ``manager.new().get()`` returns the ref.

A release is two steps where BuildKit has one critical section under ``cm.mu``: the record
actor drops the handle, then the manager's ``Unreferenced`` step decides the record's fate.
Other messages can come in between, so that step re-checks: a pair taken again meanwhile is
kept (its next last release decides), and before removing a record the manager settles its
actor (``RecordTable.quiesce``), after which a released handle can only clone through the
manager.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from datetime import timedelta
from typing import Any

import pykka
from pykka import ThreadingFuture

from ..storage import (
    KEY_CACHE_POLICY,
    KEY_COMMITTED,
    KEY_CREATED_AT,
    KEY_DESCRIPTION,
    KEY_EQUAL_MUTABLE,
    KEY_PARENT,
    KEY_RECORD_TYPE,
    KEY_SIZE,
    KEY_SNAPSHOT,
    Descriptor,
    InvalidError,
    LockedError,
    StorageItem,
    frozen_map,
)
from ._blobrecords import BlobRecords
from ._blobs import check_handlers, merge_handlers
from ._core import CacheCore, get_result
from ._entry import RecordEntry, new_id, parent_fields
from ._jobs import diff_job, diff_merge_job, merge_job, new_job
from ._messages import (
    ActorOf,
    AncestorsOf,
    CloneRecord,
    Commit,
    CommitFailed,
    FinalizeBegin,
    FinalizeEnd,
    FinalizePlan,
    Grant,
    InfoOf,
    LayerChain,
    MetadataChanged,
    Ping,
    RecordIdle,
    RecordSized,
    RecordUsed,
    Register,
    RegisterPiece,
    SetPolicy,
    SnapshotOf,
    Unhold,
    Unreferenced,
)
from ._protocol import Await, Message, bound_table, handles
from ._pruner import Pruner
from ._record_messages import Consume, SetKeptPair, SetMountSnapshot
from ._refs import ImmutableRef, MutableRef, check_bool
from ._statistics import table_statistics
from ._table import RecordTable
from ._types import CacheStatistics, DescHandler, PrunePolicy, RecordInfo, UsageInfo
from ._walk import ancestors, layer_walk

__all__ = ["CacheManager", "FlatteningFuture"]

logger = logging.getLogger(__name__)


class FlatteningFuture(ThreadingFuture[Any]):
    """A reply future that unwraps futures returned by a handler (for deferred replies).

    :meth:`add_done_callback` lets a caller that must not block (an event loop) learn when
    :meth:`get` would return at once, without a thread waiting per call.
    """

    def __init__(self) -> None:
        super().__init__()
        #: Callbacks to run once the final value is there; ``None`` once they ran.
        self._callbacks: list[Callable[[], None]] | None = []

    def set(self, value: Any | None = None) -> None:
        """Sets the reply (Pykka), then runs the done callbacks (see :meth:`add_done_callback`)."""
        super().set(value)
        self._fire()

    def set_exception(self, exc_info: Any = None) -> None:
        """Sets the failure (Pykka), then runs the done callbacks."""
        super().set_exception(exc_info if exc_info is not None else sys.exc_info())
        self._fire()

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        """Calls ``fn()`` once :meth:`get` returns without waiting (the reply and every
        deferred part it names are done); at once, in this thread, when that is already so.

        ``fn`` runs on the thread that completes the reply (the manager's, an I/O worker),
        so it must not block: it hands the news on (``loop.call_soon_threadsafe``). A failing
        ``fn`` is logged.
        """
        with self._condition:
            if self._callbacks is not None:
                self._callbacks.append(fn)
                return
        self._when_final(fn)

    def _fire(self) -> None:
        with self._condition:
            callbacks, self._callbacks = self._callbacks or [], None
        for fn in callbacks:
            self._when_final(fn)

    def _when_final(self, fn: Callable[[], None]) -> None:
        result = self._result
        value = result.value if result is not None and result.exc_info is None else None
        _when_flat(value, fn)

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


def _when_flat(value: Any, fn: Callable[[], None]) -> None:
    """Calls ``fn`` once ``value`` (a reply, maybe a future of one) is no future any more."""
    if isinstance(value, Future):
        value.add_done_callback(
            lambda f: _when_flat(None if f.cancelled() or f.exception() else f.result(), fn)
        )
    elif isinstance(value, FlatteningFuture):
        value.add_done_callback(fn)
    elif isinstance(value, pykka.Future):
        # A reply future of another actor (no handler returns one today): one short-lived
        # thread waits for it rather than the caller's.
        threading.Thread(target=_wait_then, args=(value, fn), daemon=True).start()
    else:
        try:
            fn()
        except Exception:
            logger.exception("done callback %r of a manager reply failed", fn)


def _wait_then(value: pykka.Future[Any], fn: Callable[[], None]) -> None:
    with contextlib.suppress(Exception):
        value.get()
    _when_flat(None, fn)


class CacheManager(pykka.ThreadingActor):
    """The manager actor (see the module docstring). Every method runs on its own thread."""

    use_daemon_thread = True

    def __init__(self, core: CacheCore, entries: dict[str, RecordEntry]) -> None:
        super().__init__()
        self.core = core
        self.table = RecordTable(core, entries)
        self.blobs = BlobRecords(core, self.table)
        self.pruner = Pruner(core, self.table)
        #: ``message class -> bound handler`` over the manager and its components.
        self._handlers: dict[type[Message[Any]], Callable[[Any], Any]] = bound_table(
            self, self.blobs, self.pruner
        )

    @staticmethod
    def _create_future() -> ThreadingFuture[Any]:
        # Pykka's reply-future hook: replies that are futures are flattened for the caller.
        return FlatteningFuture()

    # -- lifecycle and dispatch -----------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        """Dispatches a message of :mod:`actors._messages` to its handler."""
        handler = self._handlers.get(type(message))
        if handler is None:
            msg = f"the cache manager does not understand {message!r}"
            raise InvalidError(msg)
        return handler(message)

    def on_stop(self) -> None:
        """Stops the record actors of this cache (and only these); fails queued prunes."""
        self.pruner.fail_queued()
        self.table.stop_actors()

    # -- public API (proxy methods) -------------------------------------------------------------

    def get(
        self,
        id: str,
        *,
        update_last_used: bool = True,
        desc_handlers: Mapping[str, Any] | None = None,
    ) -> ImmutableRef:
        """Returns a new handle on an immutable record (see docs/API.md).

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
        table = self.table
        with self.core.timed("get"):
            e = table.entry(id)
            handlers = table.check_lazy(e, handlers)
            trigger = update_last_used
            if e.mutable:
                if table.mutable_locked(e):
                    msg = f"record {id!r} is locked: a mutable ref on it is open"
                    raise LockedError(msg)
                if e.equal_immutable is not None and e.equal_immutable in table.entries:
                    e = table.entries[e.equal_immutable]
                else:
                    e, written = self._commit_entry(e)
                    try:
                        # Rare (a get of a mutable nobody holds): wait here for the write.
                        get_result(written, self.core.timeout, f"the commit of {e.id!r}")
                    except BaseException:
                        table.remove(e, remove_snapshot=False)
                        raise
                    # BuildKit's implicit commit returns the commit's handle, which always
                    # counts a use (mref(trigger).commit() -> ref(true)).
                    trigger = True
            grant = table.acquire(e, trigger)
            return ImmutableRef(self.core, grant.record_id, grant.handle_id, grant.actor, handlers)

    def get_mutable(self, id: str) -> MutableRef:
        """Returns the exclusive handle on a mutable record.

        An unreferenced equal immutable is dropped (its id becomes not found).

        Raises:
            NotFoundError: unknown or removed id.
            InvalidError: the record is not mutable.
            LockedError: the mutable, or its equal immutable, is held.
        """
        table = self.table
        with self.core.timed("get_mutable"):
            e = table.entry(id)
            if not e.mutable:
                msg = f"record {id!r} is not mutable"
                raise InvalidError(msg)
            if table.mutable_locked(e):
                msg = f"record {id!r} is locked: a ref on it or its committed twin is open"
                raise LockedError(msg)
            if e.equal_immutable is not None:
                i = table.entries.get(e.equal_immutable)
                if i is not None:
                    if not table.quiesce(i):
                        msg = f"record {id!r} is locked: its committed twin {i.id!r} is held"
                        raise LockedError(msg)
                    table.remove(i, remove_snapshot=False)
                e.equal_immutable = None
            # Its snapshot may change from now on: a cached size is no longer true.
            table.reset_size(e, durable=True)
            grant = table.acquire(e, True)
            return MutableRef(self.core, grant.record_id, grant.handle_id, grant.actor)

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
        return self.blobs.get_by_blob(desc, parent, desc_handlers, extract, retain, description)

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
        parent_entry = self.table.ref_entry(parent, "parent") if parent is not None else None
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
            self.table.hold(parents)  # BuildKit clones the parent: the new record holds its own
        return self.core.submit(new_job, self.core, record_id, parents, values, handlers)

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
        entries = [self.table.ref_entry(p, "merge input") for p in refs]
        ids: list[str] = []
        for e in entries:
            ids.extend(e.parents if e.kind == "merge" else (e.id,))
        if not ids:
            return None
        # BuildKit: the merge's handle carries the union of its inputs' handlers.
        handlers = merge_handlers(*(r._desc_handlers for r in refs if r is not None))
        if len(ids) == 1:
            # The parent clone itself, which counts no use.
            grant = self.table.acquire(self.table.entries[ids[0]], False)
            return ImmutableRef(self.core, grant.record_id, grant.handle_id, grant.actor, handlers)
        self.table.hold(ids)
        return self.core.submit(merge_job, self.core, tuple(ids), handlers)

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
        table = self.table
        low = table.ref_entry(lower, "diff lower")
        up = table.ref_entry(upper, "diff upper") if upper is not None else None
        handlers = merge_handlers(
            lower._desc_handlers, upper._desc_handlers if upper is not None else frozen_map(None)
        )
        if up is not None:
            low_chain = layer_walk(table.entries, low.id)
            up_chain = layer_walk(table.entries, up.id)
            n = len(low_chain)
            if len(up_chain) > n + 1 and up_chain[:n] == low_chain:
                plan: list[tuple[str, str, str]] = []  # (kind, lower, upper) per piece
                for layer in (table.entries[lid] for lid in up_chain[n:]):
                    if layer.kind == "layer":
                        plan.append(("diff", layer.parents[0], layer.id))
                        table.hold((layer.parents[0], layer.id))
                    else:
                        plan.append(("self", "", layer.id))
                        table.hold((layer.id,))
                return self.core.submit(diff_merge_job, self.core, tuple(plan), handlers)
        parents = (low.id, up.id if up is not None else "")
        table.hold(parents)
        return self.core.submit(diff_job, self.core, parents, handlers)

    def search(self, index: str, *, prefix: bool = False) -> list[RecordInfo]:
        """Records in the metadata index ``index`` (exact, or every index with that prefix).

        Raises:
            InvalidError: ``index`` is not a string or ``prefix`` not a bool.
        """
        check_bool("search prefix", prefix)
        items = self.core.store.search(index, prefix=prefix)
        out = []
        for item in items:
            e = self.table.entries.get(item.id)
            if e is not None and not e.dead:
                out.append(self.table.info(e))
        return out

    def statistics(self) -> CacheStatistics:
        """One consistent snapshot of the cache for metrics (see :class:`CacheStatistics`).

        Sizes are counted as ``disk_usage`` shows them, from the same table: an equal pair
        once, a mutable record with open handles as 0, unknown sizes as 0; reclaimable are
        the records disk usage reports as not in use (a chain held only by unreferenced
        records included). After a ``disk_usage`` (which measures unknown sizes) the byte
        gauges therefore add up to its rows.
        """
        return table_statistics(self.core, self.table, self.pruner)

    def disk_usage(
        self, filters: Sequence[str] = (), *, age_limit: timedelta | None = None
    ) -> Future[list[UsageInfo]]:
        """One row per visible record (BuildKit ``DiskUsage``), computed off the manager's thread.

        An equal pair shows once; a chain held only by unreferenced records is not in use; a
        mutable record in use reports size 0; records whose layers the ref checker reports as
        used elsewhere are shared, and so are their ancestors. Unknown sizes are measured by
        the job (and cached).

        Args:
            filters: containerd filter strings (OR'ed; each a comma-separated AND) over
                ``id``, ``parents``, ``description``, ``type``, ``inuse``, ``mutable``,
                ``immutable``, ``shared``, ``private``.
            age_limit: Leave out records used more recently than this (never-used records
                are kept), as a prune with that ``keep_duration`` would.

        Raises:
            InvalidError: a malformed filter, a filter naming an unknown field, or a bad age
                limit.
        """
        return self.pruner.disk_usage(filters, age_limit)

    def prune(self, *policies: PrunePolicy) -> Future[list[UsageInfo]]:
        """Deletes unreferenced records by each policy in turn, then collects garbage.

        No policy means one that deletes everything unreferenced (``all``). Records are marked
        dead and ``cache.deleted`` is persisted before any removal; deletions and GC run off
        the manager's thread, so other operations keep being served. One prune runs at a
        time; later ones wait their turn (BuildKit ``muPrune``). Listeners get a
        ``("record_pruned", UsageInfo)`` tell per deleted record.

        Returns:
            A future of the deleted records (sizes measured), in deletion order.

        Raises:
            InvalidError: a malformed policy or filter, or a filter naming an unknown field.
        """
        return self.pruner.prune(policies)

    def subscribe(self, listener: pykka.ActorRef[Any]) -> None:
        """Sends this cache's events to ``listener`` (see :class:`CacheListener`).

        Raises:
            InvalidError: ``listener`` is not a Pykka actor reference.
        """
        self.pruner.subscribe(listener)

    def unsubscribe(self, listener: pykka.ActorRef[Any]) -> None:
        """Stops sending events to ``listener`` (no-op when it is not subscribed)."""
        self.pruner.unsubscribe(listener)

    # -- records from jobs ----------------------------------------------------------------------

    @handles(Ping)
    def _ping(self, m: Ping) -> bool:
        return True

    @handles(Register)
    def _register(self, m: Register) -> Grant:
        e = self.table.add(m.record_id, m.kind, m.parents, m.values)
        e.trigger_parents = m.triggers
        return self.table.acquire(e, True)

    @handles(RegisterPiece)
    def _register_piece(self, m: RegisterPiece) -> str:
        """Registers a record that a merge being made will own: one hold, which counts a use
        when it goes, and no handle."""
        e = self.table.add(m.record_id, m.kind, m.parents, m.values)
        e.holders = 1
        e.trigger_holds = 1
        return e.id

    @handles(Unhold)
    def _unhold(self, m: Unhold) -> None:
        self.table.unhold(m.ids, m.triggers)

    # -- one record -------------------------------------------------------------------------------

    @handles(SnapshotOf)
    def _snapshot_of(self, m: SnapshotOf) -> str:
        return self.table.entry(m.record_id).snapshot_id

    @handles(ActorOf)
    def _actor_of(self, m: ActorOf) -> pykka.ActorRef[Any]:
        return self.table.activate(self.table.entry(m.record_id))

    @handles(CloneRecord)
    def _clone(self, m: CloneRecord) -> Grant:
        return self.table.acquire(self.table.entry(m.record_id), False)

    @handles(InfoOf)
    def _info(self, m: InfoOf) -> RecordInfo:
        return self.table.info(self.table.entry(m.record_id))

    @handles(LayerChain)
    def _layer_chain(self, m: LayerChain) -> tuple[str, ...]:
        return tuple(layer_walk(self.table.entries, self.table.entry(m.record_id).id))

    @handles(AncestorsOf)
    def _ancestors(self, m: AncestorsOf) -> tuple[str, ...]:
        e = self.table.entry(m.record_id)
        return tuple(ancestors(self.table.entries, e.id, unique=False))

    @handles(SetPolicy)
    def _set_policy(self, m: SetPolicy) -> None:
        table = self.table
        e = table.entry(m.record_id)
        self.core.store.get(m.record_id).set(KEY_CACHE_POLICY, 1 if m.retain else None)
        e.retain = m.retain
        # An equal pair's immutable settles its own last release while the pair is retained.
        i = table.entries.get(e.equal_immutable) if e.equal_immutable else e
        twin = table.entries.get(i.equal_mutable) if i and i.equal_mutable else None
        if i is not None and twin is not None and i.actor is not None:
            with contextlib.suppress(pykka.ActorDeadError):
                i.actor.tell(SetKeptPair(i.retain or twin.retain))

    @handles(MetadataChanged)
    def _metadata_changed(self, m: MetadataChanged) -> None:
        """A handle wrote metadata: refresh the keys the table mirrors."""
        e = self.table.entries.get(m.record_id)
        if e is None:
            return
        values = m.values
        if KEY_DESCRIPTION in values:
            e.description = values[KEY_DESCRIPTION] or ""
        if KEY_RECORD_TYPE in values:
            e.record_type = values[KEY_RECORD_TYPE] or ""
        if KEY_CREATED_AT in values:
            e.created_at = values[KEY_CREATED_AT] or 0

    # -- from record actors -----------------------------------------------------------------------

    @handles(RecordIdle)
    def _record_idle(self, m: RecordIdle) -> None:
        """A plain immutable's (or a retained pair's immutable's) actor settled itself at its
        last release (a tell).

        Ignored when the manager has acquired a handle on that actor since (the tell is then
        stale: the record is in use again), so every record in the idle LRU has no handles.
        For a pair, what ``Unreferenced`` would decide follows: the kept mutable counts the
        use (and a pair no longer retained goes, as at any last release).
        """
        table = self.table
        e = table.entries.get(m.record_id)
        if e is None or e.dead or e.actor is None or e.acquires != m.acquires:
            return
        table.note_idle(e)
        twin = table.entries.get(e.equal_mutable) if e.equal_mutable else None
        if twin is None or twin.dead:
            return
        if e.retain or twin.retain:
            # The mutable of a live pair has no handles (get_mutable removes the immutable
            # first): no need to ask its actor.
            if m.used:
                table.touch(twin)
        elif table.handles(twin) == 0:
            self._mutable_released(twin, used=m.used)

    @handles(RecordUsed)
    def _record_used(self, m: RecordUsed) -> None:
        """A record actor counted a use (a tell, sent before the releasing caller's answer)."""
        e = self.table.entries.get(m.record_id)
        if e is not None and m.usage_count > e.usage_count:
            e.usage_count, e.last_used_at = m.usage_count, m.last_used_at

    @handles(RecordSized)
    def _record_sized(self, m: RecordSized) -> None:
        """A record actor measured its size (a tell, sent before the measuring caller's
        answer): the table and the metadata take it, and an equal twin."""
        e = self.table.entries.get(m.record_id)
        if e is not None:
            self.table.learn_size(e, m.size, m.generation, tell=False)

    # -- release, commit, finalize --------------------------------------------------------------

    @handles(Unreferenced)
    def _unreferenced(self, m: Unreferenced) -> None:
        """A last handle went: decide, as BuildKit's release does, what happens to the record."""
        table = self.table
        e = table.entries.get(m.record_id)
        if e is None or e.dead:
            return
        settled = table.settle(e)
        if settled is None:
            return
        if e.mutable:
            self._mutable_released(e)
            return
        if e.equal_mutable is not None:
            twin = table.entries.get(e.equal_mutable)
            if twin is not None and not twin.dead and table.handles(twin) == 0:
                # BuildKit: releasing a used immutable sets equalMutable.triggerLastUsed, so
                # a kept mutable counts the use when the pair's last ref goes.
                self._mutable_released(twin, used=settled.used)
            return
        if settled.had_view:
            table.drop_view_lease(e)

    def _mutable_released(self, m: RecordEntry, *, used: bool = False) -> None:
        table = self.table
        i = table.entries.get(m.equal_immutable) if m.equal_immutable else None
        if m.retain or (i is not None and i.retain):
            if used:
                table.touch(m)
            return
        if i is not None and (i.holders > 0 or not table.quiesce(i)):
            # The pair was taken again after the release that sent us here (a get() made
            # the twin, or a child being created holds it; its job finalizes the pair).
            # BuildKit decides under cm.mu at release time; here the twin's own last
            # release decides later. Removing it now would pull it from under its refs.
            return
        with self.core.env.write_txn() as txn:
            if i is not None:
                table.remove(i, remove_snapshot=False, txn=txn)
            table.remove(m, remove_snapshot=True, txn=txn)

    def _commit_entry(self, m: RecordEntry) -> tuple[RecordEntry, Future[None]]:
        """Creates the equal immutable of ``m`` (lazy commit: no snapshot work).

        The table has it at once; its metadata goes to the group writer, and the returned
        future completes once it is durable (nobody gets a handle on it before).
        """
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
        item = StorageItem(self.core.store, record_id, None)
        item.queue_many({k: v for k, v in values.items() if v is not None})
        written = self.core.env.group.submit(lambda txn: item.commit(txn=txn))
        i = self.table.add(record_id, m.kind, m.parents, values)
        self.table.hold(m.parents)  # the twin holds its parents too (BuildKit cloneParentRefs)
        m.equal_immutable = record_id
        return i, written

    @handles(Commit)
    def _commit(self, m: Commit) -> Await[Grant]:
        table = self.table
        mut = table.entries.get(m.record_id)
        if mut is None or mut.dead or not mut.mutable or mut.actor is None:
            msg = f"invalid mutable ref {m.record_id!r}: not an open mutable record"
            raise InvalidError(msg)
        if not table.ask(mut.actor, Consume(m.handle_id)):
            msg = f"invalid mutable ref {m.record_id!r}: the handle was released"
            raise InvalidError(msg)
        if mut.equal_immutable is not None:
            old = table.entries.get(mut.equal_immutable)
            if old is not None:
                table.remove(old, remove_snapshot=False)
        i, written = self._commit_entry(mut)
        table.settle(mut)
        grant = table.acquire(i, True)
        answer: Future[Grant] = Future()
        manager = self.actor_ref

        def durable(done: Future[None]) -> None:
            # On the group writer's thread: the manager hears of a failure before the caller.
            error = done.exception()
            if error is None:
                answer.set_result(grant)
                return
            with contextlib.suppress(pykka.ActorDeadError):
                manager.tell(CommitFailed(i.id, mut.id))
            answer.set_exception(error)

        written.add_done_callback(durable)
        return Await(answer)

    @handles(CommitFailed)
    def _commit_failed(self, m: CommitFailed) -> None:
        table = self.table
        i = table.entries.get(m.record_id)
        if i is not None:
            table.remove(i, remove_snapshot=False)
        mut = table.entries.get(m.mutable_id)
        if mut is not None and not mut.dead and table.handles(mut) == 0:
            self._mutable_released(mut)

    @handles(FinalizeBegin)
    def _finalize_begin(self, m: FinalizeBegin) -> FinalizePlan | Await[None] | None:
        i = self.table.entry(m.record_id)
        if i.equal_mutable is None:
            return None
        if i.finalizing is not None:
            return Await(i.finalizing)
        mut = self.table.entries.get(i.equal_mutable)
        if mut is None:
            i.equal_mutable = None
            return None
        mut.dead = True  # nobody may take the mutable while its snapshot is committed
        i.finalizing = Future()
        return FinalizePlan(i.snapshot_id, mut.snapshot_id)

    @handles(FinalizeEnd)
    def _finalize_end(self, m: FinalizeEnd) -> None:
        table = self.table
        i = table.entries.get(m.record_id)
        if i is None:
            return
        flight, i.finalizing = i.finalizing, None
        mut = table.entries.get(i.equal_mutable) if i.equal_mutable else None
        if m.error is not None:
            if mut is not None:
                mut.dead = False
            if flight is not None:
                flight.set_exception(m.error)
            return
        i.equal_mutable = None
        if mut is not None:
            mut.equal_immutable = None
            mut.dead = False
            table.remove(mut, remove_snapshot=True)
        if i.actor is not None:
            with contextlib.suppress(pykka.ActorDeadError):
                i.actor.tell(SetMountSnapshot(i.snapshot_id))
        if flight is not None:
            flight.set_result(None)
