"""The record table: ``id -> RecordEntry``, record actors' activation, holds and sizes.

A :class:`RecordTable` is owned by the manager actor and runs on its thread only (it has no
lock: the manager's mailbox serialises every change). The manager and the components it owns
(:class:`~actors._blobrecords.BlobRecords`, :class:`~actors._pruner.Pruner`) work on records
through it: finding and checking entries, adding and removing records, the counted holds of
child records on their parents, granting handles (which activates a record's actor), taking
idle records back from their actors (and passivating them, beyond a small LRU), and the
sizes and uses the table mirrors.

Refcount model: a record's refcount is its user handles (held in the record actor) plus
``holders``, the counted handles that child records hold on it (BuildKit's ``parentRefs``:
every record owns one handle per parent slot; ``Diff(a, a)`` holds ``a`` twice). The holds of
records at rest are kept here, so a parent does not need an actor while its children rest.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import pykka

from ..storage import (
    KEY_LAST_USED_AT,
    KEY_SIZE,
    KEY_USAGE_COUNT,
    InvalidError,
    NeedsRemoteProviderError,
    NotFoundError,
    WriteTxn,
)
from ._blobs import merge_handlers
from ._core import CacheCore
from ._entry import RecordEntry, clear_record, delete_leases, lease_ids
from ._messages import Grant
from ._protocol import Message, ask, tell
from ._record import CacheRecord, RecordState
from ._record_messages import (
    Acquire,
    CountHandles,
    ForgetSize,
    HasTriggerHandles,
    Kill,
    LearnSize,
    Settle,
    Settled,
    SetTriggerHolds,
    UseCounted,
)
from ._refs import ImmutableRef
from ._types import SIZE_UNKNOWN, DescHandler, RecordInfo, RecordKind
from ._walk import ancestors

__all__ = ["IDLE_ACTORS", "RecordTable"]

R = TypeVar("R")

IDLE_ACTORS = 4096  #: idle record actors kept activated (LRU) before passivation


class RecordTable:
    """The manager's record table (see the module docstring). Runs on the manager's thread.

    Args:
        core: The services of the cache.
        entries: The records loaded at open (the table takes them over).
    """

    def __init__(self, core: CacheCore, entries: dict[str, RecordEntry]) -> None:
        self.core = core
        self.entries = entries
        #: Records whose actor is activated but has no handles, least recently idle first.
        self.idle: OrderedDict[str, None] = OrderedDict()
        # Blob-only records in the table: while there are none, the lazy-provider check of
        # get() has nothing to walk.
        self._blob_only = sum(1 for e in entries.values() if e.blob_only)

    # -- finding records --------------------------------------------------------------------

    def entry(self, record_id: object) -> RecordEntry:
        """The live entry of ``record_id``.

        Raises:
            InvalidError: ``record_id`` is not a string.
            NotFoundError: no such record, or it is being removed.
        """
        if not isinstance(record_id, str):
            msg = f"record id must be a string, not {type(record_id).__name__} {record_id!r}"
            raise InvalidError(msg)
        e = self.entries.get(record_id)
        if e is None or e.dead:
            msg = f"record {record_id!r} not found"
            raise NotFoundError(msg)
        return e

    def ref_entry(self, ref: object, what: str) -> RecordEntry:
        """The live entry of an :class:`ImmutableRef` of this cache, ``what`` in messages.

        Raises:
            InvalidError: not an open ``ImmutableRef`` of this cache.
            NotFoundError: its record is gone.
        """
        if not isinstance(ref, ImmutableRef):
            msg = f"{what} must be an ImmutableRef, not {type(ref).__name__}"
            raise InvalidError(msg)
        self.core.check_owner(ref._token, f"{what} {ref.id!r}")
        if ref._consumed:
            msg = f"{what} {ref.id!r} was consumed"
            raise InvalidError(msg)
        return self.entry(ref.id)

    def info(self, e: RecordEntry) -> RecordInfo:
        """Everything the table knows about ``e``."""
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

    # -- record actors ------------------------------------------------------------------------

    def ask(self, actor: pykka.ActorRef[Any], message: Message[R]) -> R:
        """Asks a record actor (records never ask back: this cannot deadlock)."""
        return ask(actor, message, self.core.timeout)

    def activate(self, e: RecordEntry) -> pykka.ActorRef[Any]:
        """The record's actor, started on the record pool if it is passivated."""
        self.idle.pop(e.id, None)
        if e.actor is None:
            mount_sid = e.snapshot_id
            kept = False
            if e.equal_mutable is not None:
                m = self.entries.get(e.equal_mutable)
                if m is not None:
                    mount_sid = m.snapshot_id
                    kept = e.retain or m.retain
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
                kept,
            )
            e.actor = CacheRecord.start_on(self.core.pool, self.core, state)
            e.acquires = 0
        return e.actor

    def handles(self, e: RecordEntry) -> int:
        """The record's open handles."""
        if e.actor is None:
            return 0
        return self.ask(e.actor, CountHandles())

    def handle_counts(self, chunk: Iterable[RecordEntry] | None = None) -> dict[str, int]:
        """Open handles of the active records of ``chunk`` (default: every record with an
        activated actor that is not idle); asks them all first, then collects."""
        if chunk is None:
            # Actors in the idle LRU have no handles (see RecordIdle): no need to ask them.
            chunk = (
                e for rid, e in self.entries.items() if e.actor is not None and rid not in self.idle
            )
        count = CountHandles()
        futures = {e.id: e.actor.ask(count, block=False) for e in chunk if e.actor is not None}
        counts = {}
        for rid, f in futures.items():
            try:
                counts[rid] = int(f.get(timeout=self.core.timeout))
            except pykka.ActorDeadError:
                counts[rid] = 0
        return counts

    def acquire(self, e: RecordEntry, trigger: bool) -> Grant:
        """A new handle on ``e`` (``trigger``: its release counts a use)."""
        # A tell, not an ask: the handle id is chosen here, and the record handles this
        # message before anything the new handle sends it (one sender's messages keep their
        # order, and the handle exists only after this reply). The manager does not wait for a
        # pool worker on every get (an idle record handles it in this thread: DESIGN.md,
        # "Asks to an idle record").
        hid = self.core.next_handle_id()
        actor = self.activate(e)
        try:
            e.acquires += 1
            tell(actor, Acquire(hid, trigger))
        except pykka.ActorDeadError:
            e.actor = None
            actor = self.activate(e)
            e.acquires += 1
            tell(actor, Acquire(hid, trigger))
        return Grant(e.id, hid, actor)

    def settle(self, e: RecordEntry) -> Settled | None:
        """Takes an idle record back from its actor; keeps the actor in the idle LRU."""
        if e.actor is None:
            return None
        try:
            settled = self.ask(e.actor, Settle())
        except pykka.ActorDeadError:
            e.actor = None
            return None
        if settled is None:
            return None
        self.idle[e.id] = None
        self.evict_idle()
        return settled

    def note_idle(self, e: RecordEntry) -> None:
        """``e``'s actor has no handles: the most recently idle of the LRU."""
        self.idle[e.id] = None
        self.idle.move_to_end(e.id)
        self.evict_idle()

    def evict_idle(self) -> None:
        """Passivates the least recently idle actors beyond :data:`IDLE_ACTORS`."""
        while len(self.idle) > IDLE_ACTORS:
            old_id, _ = self.idle.popitem(last=False)
            old = self.entries.get(old_id)
            if old is not None and old.actor is not None:
                old.actor.stop(block=False)
                old.actor = None

    def quiesce(self, e: RecordEntry) -> bool:
        """Whether ``e`` has no handles, settling its actor if so (before removing ``e``).

        Between a last release and the manager's ``Unreferenced`` step, a released handle can
        still clone through the record actor. Settling the actor closes that window: from
        then on such a clone goes through the manager, which sees the removal.
        """
        if e.actor is None:
            return True
        # settle forgets an actor that died (no handles can live there either).
        return self.settle(e) is not None or e.actor is None

    def mutable_locked(self, m: RecordEntry) -> bool:
        """Whether the mutable ``m`` or its equal immutable is in use."""
        if self.handles(m) > 0:
            return True
        if m.equal_immutable is not None:
            i = self.entries.get(m.equal_immutable)
            # A hold on the twin is a child being created on it (new/merge/diff parent):
            # it is in use, and the child's job finalizes it (BuildKit holds the parent ref
            # for the whole synchronous New, so the pair cannot be dropped meanwhile).
            if i is not None and (i.holders > 0 or self.handles(i) > 0):
                return True
        return False

    def stop_actors(self) -> None:
        """Stops every record actor of this cache (the manager is stopping)."""
        futures = []
        for e in self.entries.values():
            if e.actor is not None:
                futures.append(e.actor.stop(block=False))
                e.actor = None
        for f in futures:
            with contextlib.suppress(Exception):
                f.get(timeout=self.core.timeout)

    # -- adding and removing records ------------------------------------------------------------

    def add(
        self,
        record_id: str,
        kind: RecordKind,
        parents: tuple[str, ...],
        values: Mapping[str, Any],
    ) -> RecordEntry:
        """Adds the record just written with metadata ``values`` (no holds taken)."""
        e = RecordEntry.from_values(record_id, kind, parents, values)
        self.entries[record_id] = e
        if e.blob_only:
            self._blob_only += 1
        return e

    def no_longer_blob_only(self, e: RecordEntry) -> None:
        """``e`` was extracted: it is not blob-only any more."""
        if e.blob_only:
            e.blob_only = False
            self._blob_only -= 1

    def drop_view_lease(self, e: RecordEntry) -> None:
        """Deletes the lease of ``e``'s read-only view (its refcount went to 0)."""
        with self.core.env.write_txn() as txn:
            delete_leases(self.core.leases, txn, [e.id + "-view"])

    def remove(
        self,
        e: RecordEntry,
        *,
        remove_snapshot: bool,
        txn: WriteTxn | None = None,
        clear: bool = True,
    ) -> None:
        """Forgets a record: metadata, leases, actor; releases its holds on its parents.

        With ``txn``, the metadata work joins that transaction (one fsync for a pair).
        ``clear=False``: the metadata and leases are gone already (a prune job cleared
        them), nothing is written.
        """
        if self.entries.get(e.id) is not e:
            return
        e.dead = True
        del self.entries[e.id]
        if e.blob_only:
            self._blob_only -= 1
        self.idle.pop(e.id, None)
        if e.actor is not None:
            with contextlib.suppress(pykka.ActorDeadError):
                e.actor.tell(Kill())
            e.actor.stop(block=False)
            e.actor = None
        self.core.writer.discard(e.id)
        own, variants, view = lease_ids(e.id)
        leases = [view]
        if remove_snapshot:
            leases += [own, variants]
        elif e.equal_mutable is not None:
            # An unfinalized twin has no snapshot of its own: a '<id>' lease can only be
            # left by a finalize that crashed before its commit, and would leak.
            leases.append(own)
        core = self.core
        if not clear:
            pass
        elif txn is not None:
            clear_record(core.store, core.leases, txn, e.id, leases)
        else:
            with core.env.write_txn() as new_txn:
                clear_record(core.store, core.leases, new_txn, e.id, leases)
        for parent_id in e.parents:
            parent = self.entries.get(parent_id) if parent_id else None
            if parent is not None:
                parent.holders -= 1
                if parent_id in e.trigger_parents:
                    self.release_trigger_hold(parent)
        if e.equal_mutable is not None:
            m = self.entries.get(e.equal_mutable)
            if m is not None and m.equal_immutable == e.id:
                m.equal_immutable = None
        if e.equal_immutable is not None:
            i = self.entries.get(e.equal_immutable)
            if i is not None and i.equal_mutable == e.id:
                i.equal_mutable = None

    # -- holds and uses -------------------------------------------------------------------------

    def hold(self, ids: Iterable[str]) -> None:
        """Takes one counted hold on each record of ``ids`` (``""`` slots skipped)."""
        for rid in ids:
            if rid:
                self.entries[rid].holders += 1

    def unhold(self, ids: Iterable[str], triggers: frozenset[str] = frozenset()) -> None:
        """Gives back holds on ``ids`` (``triggers``: holds that count a use when they go)."""
        for rid in ids:
            e = self.entries.get(rid) if rid else None
            if e is not None:
                e.holders -= 1
                if rid in triggers:
                    self.release_trigger_hold(e)

    def touch(self, e: RecordEntry) -> None:
        """Counts one use of a record no user handle counts uses on (BuildKit
        ``updateLastUsed``): the table, the metadata, and the record's actor."""
        e.usage_count += 1
        e.last_used_at = time.time_ns()
        self.core.writer.submit(
            e.id, {KEY_USAGE_COUNT: e.usage_count, KEY_LAST_USED_AT: e.last_used_at}
        )
        if e.actor is not None:
            with contextlib.suppress(pykka.ActorDeadError):
                e.actor.tell(UseCounted(e.usage_count, e.last_used_at))

    def release_trigger_hold(self, e: RecordEntry) -> None:
        """A hold that counts uses went (BuildKit ``parentRefs.release`` of a handle with
        triggerLastUsed): a use, unless another reference that counts uses remains."""
        e.trigger_holds -= 1
        if e.actor is not None:
            try:
                self.ask(e.actor, SetTriggerHolds(e.trigger_holds))
                if e.trigger_holds == 0 and self.ask(e.actor, HasTriggerHandles()):
                    return
            except pykka.ActorDeadError:
                e.actor = None
        if e.trigger_holds == 0:
            self.touch(e)

    # -- lazy records -----------------------------------------------------------------------------

    def lazy_digests(self, e: RecordEntry, handlers: Mapping[str, DescHandler]) -> list[str]:
        """Blobs of lazy records in ``e``'s ancestry that ``handlers`` do not cover.

        BuildKit ``isLazy`` + ``walkUniqueAncestors``: blob-only with a blob that is not in
        the content store (one LMDB read snapshot). Root first, each digest once.
        """
        if self._blob_only == 0:
            return []
        missing: list[str] = []
        content = self.core.content
        entries = self.entries
        with self.core.env.read_txn() as txn:
            for rid in ancestors(entries, e.id):
                cur = entries[rid]
                if (
                    cur.blob_only
                    and cur.blob
                    and cur.blob not in handlers
                    and not content.exists(cur.blob, txn=txn)
                ):
                    missing.append(cur.blob)
        return list(dict.fromkeys(reversed(missing)))

    def check_lazy(
        self, e: RecordEntry, handlers: Mapping[str, DescHandler]
    ) -> Mapping[str, DescHandler]:
        """``handlers``, plus the registered handlers of pulled sources for the lazy blobs
        of ``e``'s ancestry it does not cover (:meth:`CacheCore.register_handlers`).

        Raises:
            NeedsRemoteProviderError: lazy blobs that no handler covers.
        """
        missing = self.lazy_digests(e, handlers)
        if not missing:
            return handlers
        found = self.core.remote_handlers_for(missing)
        if len(found) < len(missing):
            raise NeedsRemoteProviderError([d for d in missing if d not in found])
        return merge_handlers(handlers, found)

    # -- sizes ------------------------------------------------------------------------------------

    def reset_size(self, e: RecordEntry, *, durable: bool = False) -> None:
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
                e.actor.tell(ForgetSize(e.size_gen))

    def learn_size(self, e: RecordEntry, size: int, generation: int, *, tell: bool) -> bool:
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
                e.actor.tell(LearnSize(size, e.size_gen))

    def size_snapshot(self, e: RecordEntry) -> str:
        """The snapshot whose usage is the record's size (an equal mutable's, until finalize)."""
        if e.equal_mutable is not None and e.equal_mutable in self.entries:
            return self.entries[e.equal_mutable].snapshot_id
        return e.snapshot_id
