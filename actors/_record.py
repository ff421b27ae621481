"""The record actor: one cache record's handle set and per-record state.

A :class:`CacheRecord` runs on the pooled runtime (:mod:`actors._runtime`). It is *virtual*:
the manager activates it when a handle is taken and passivates it when it is idle, so a record
at rest is a compact entry in the manager's table and costs no thread and no actor.

It owns, and serialises every change of:

* the handle set (BuildKit's ``cr.refs``: the refcount of user handles) with each handle's
  ``triggerLastUsed`` flag, and so the decision whether a release counts a use;
* the mount cache and the size flight, each computed at most once at a time (single flight:
  the first asker gets a *plan*, does the slow work in its own thread, and reports back; the
  others wait for the same future);
* its metadata view (``RefMetadata`` reads and writes).

The record's size and usage statistics belong to the manager's table (DESIGN.md, "Sizes and
uses"): the actor keeps copies for ``size()``'s fast path and tells the manager every use it
counts and every size it measures *before* it answers the caller, so the caller's next ask to
the manager sees it; the manager tells it back what it learns elsewhere.

Rules (DESIGN.md): every handler is short and never blocks — slow work is done by the caller
that received a plan, or by the I/O executor; a record never asks the manager or another
record (it has no reference to them; it only tells the manager). Messages are the typed
classes of :mod:`actors._record_messages`, dispatched by class. Runs on a pool worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, ClassVar

from pykka import ActorDeadError

from ..storage import (
    KEY_LAST_USED_AT,
    KEY_USAGE_COUNT,
    InvalidError,
    Mount,
    NotFoundError,
    StorageItem,
)
from ._core import CacheCore
from ._messages import RecordIdle, RecordSized, RecordUsed
from ._protocol import Await, Message, handler_table, handles
from ._record_messages import (
    Acquire,
    CachedMounts,
    CloneHandle,
    Consume,
    CountHandles,
    ForgetSize,
    HasTriggerHandles,
    Kill,
    KnownSize,
    LearnSize,
    MountBegin,
    MountEnd,
    MountPlan,
    ReadMetadata,
    Release,
    SetKeptPair,
    SetMountSnapshot,
    Settle,
    Settled,
    SetTriggerHolds,
    SizeBegin,
    SizeEnd,
    SizePlan,
    UseCounted,
    WriteMetadata,
)
from ._runtime import PooledActor
from ._types import SIZE_UNKNOWN

__all__ = ["SIZE_UNKNOWN", "CacheRecord", "RecordState", "Settled"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RecordState:
    """What the manager hands a record actor when it activates it."""

    id: str
    mutable: bool
    snapshot_id: str
    mount_snapshot_id: str  #: the equal mutable's snapshot for an unfinalized immutable
    usage_count: int
    last_used_at: int | None
    size: int
    size_gen: int = 0  #: the manager's size generation (see ``RecordEntry.size_gen``)
    trigger_holds: int = 0  #: holds of child records that count a use when released
    kept_pair: bool = False  #: the unfinalized immutable of a retained equal pair


class CacheRecord(PooledActor):
    """One record's actor (see the module docstring). Runs on the record actor pool."""

    #: ``message class -> handler``, built once for the class (below it).
    _handlers: ClassVar[dict[type[Message[Any]], Callable[[Any, Any], Any]]] = {}

    def __init__(self, core: CacheCore, state: RecordState) -> None:
        super().__init__()
        self.core = core
        self.id = state.id
        self.mutable = state.mutable
        self.snapshot_id = state.snapshot_id
        self.mount_snapshot_id = state.mount_snapshot_id
        self.usage_count = state.usage_count
        self.last_used_at = state.last_used_at
        self.size = state.size
        self.trigger_holds = state.trigger_holds
        self.kept_pair = state.kept_pair
        self.handles: dict[int, bool] = {}  # handle id -> triggers last-used
        self.settled = True  # no handles; the manager decides what happens next
        self.acquires = 0  # acquires from the manager (echoed in idle tells)
        self.dead = False
        self.mounts: tuple[Mount, ...] | None = None
        self.had_view = False
        self.used = False
        # Single flights shared by every caller that comes while one runs: plain
        # concurrent.futures futures, which wake every waiter.
        self.mount_flight: Future[tuple[Mount, ...]] | None = None
        self.size_flight: Future[int] | None = None
        # The manager's generation of the size, set by every reset (extraction, a new blob
        # variant): a size measured before the reset is handed to its waiters, not cached.
        self.size_generation = state.size_gen

    # -- dispatch ---------------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        """Dispatches a message of :mod:`actors._record_messages` to its handler."""
        handler = self._handlers.get(type(message))
        if handler is None:
            msg = f"record {self.id!r} does not understand {message!r}"
            raise InvalidError(msg)
        return handler(self, message)

    def _check_alive(self) -> None:
        if self.dead:
            msg = f"record {self.id!r} not found (it is being removed)"
            raise NotFoundError(msg)

    def _tell_manager(self, message: Message[None]) -> None:
        manager = self.core.manager
        if manager is not None:
            with contextlib.suppress(ActorDeadError):
                manager.tell(message)

    # -- handles ----------------------------------------------------------------------------

    @handles(Acquire)
    def _acquire(self, m: Acquire) -> None:
        """A handle the manager created (its id chosen there); see ``RecordTable.acquire``."""
        self.acquires += 1
        self.handles[m.handle_id] = m.trigger
        self.settled = False

    @handles(CloneHandle)
    def _clone(self, m: CloneHandle) -> int | None:
        # BuildKit's Clone does not check that the source handle is live: a released handle
        # can be cloned while its record is alive. Once settled, the manager decides whether
        # the record still exists, so the caller goes through it (None).
        if self.dead or self.settled:
            return None
        new = self.core.next_handle_id()
        self.handles[new] = False
        return new

    @handles(Release)
    def _release(self, m: Release) -> tuple[bool, bool]:
        """Returns ``(found, manager_needed)`` for the release of the handle.

        ``manager_needed`` is True when this was the last handle and the manager has to decide
        what happens (a mutable, a pair that is not retained, a view lease to drop). The last
        release of a plain immutable needs no decision (BuildKit only drops its mount cache),
        nor does that of a retained pair's immutable (the pair stays; its mutable counts the
        use, a write-behind like this record's): the record settles itself and tells the
        manager it is idle, saving the caller two asks and any wait for a write.
        """
        trigger = self.handles.pop(m.handle_id, None)
        if trigger is None:
            return False, False
        if trigger and not self._trigger_left():
            # BuildKit updateLastUsedNow: a handle that counts uses, and no other reference
            # that counts them left (several concurrent users count once, when the last goes).
            self._touch()
        if self.handles:
            return True, False
        plain = (
            not self.mutable
            and not self.dead
            and (self.mount_snapshot_id == self.snapshot_id or self.kept_pair)
            and not self.had_view
            and self.mount_flight is None
            and self.size_flight is None
        )
        if not plain:
            return True, True
        self.settled = True
        used, self.used = self.used, False
        self.mounts = None
        self._tell_manager(RecordIdle(self.id, self.acquires, used))
        return True, False

    def _trigger_left(self) -> bool:
        """Whether a reference that counts uses remains (a user handle or a child's hold)."""
        return self.trigger_holds > 0 or any(self.handles.values())

    @handles(Consume)
    def _consume(self, m: Consume) -> bool:
        """Removes the handle without counting a use (a mutable handle given to its commit)."""
        return self.handles.pop(m.handle_id, None) is not None

    @handles(CountHandles)
    def _count(self, m: CountHandles) -> int:
        return len(self.handles)

    @handles(Settle)
    def _settle(self, m: Settle) -> Settled | None:
        """Called by the manager after a last release: hands the record back if still idle."""
        if self.handles:
            return None
        self.settled = True
        had_view, self.had_view = self.had_view, False
        used, self.used = self.used, False
        self.mounts = None
        return Settled(had_view, used)

    @handles(Kill)
    def _kill(self, m: Kill) -> None:
        """Marks the record dead (removal or finalized mutable)."""
        self.dead = True
        self.settled = True

    @handles(UseCounted)
    def _use_counted(self, m: UseCounted) -> None:
        """The manager counted a use itself (an equal mutable, a child's counting hold)."""
        if m.usage_count > self.usage_count:
            self.usage_count, self.last_used_at = m.usage_count, m.last_used_at

    @handles(SetTriggerHolds)
    def _set_trigger_holds(self, m: SetTriggerHolds) -> None:
        self.trigger_holds = m.count

    @handles(HasTriggerHandles)
    def _has_trigger_handles(self, m: HasTriggerHandles) -> bool:
        """Whether an open handle counts uses (BuildKit ``shouldUpdateLastUsed``)."""
        return any(self.handles.values())

    def _touch(self) -> None:
        # The manager's table is where disk usage, info and statistics read uses: it hears
        # of this one before the releasing caller gets its answer, so any later ask sees it.
        self.used = True
        self.usage_count += 1
        self.last_used_at = time.time_ns()
        self.core.writer.submit(
            self.id, {KEY_USAGE_COUNT: self.usage_count, KEY_LAST_USED_AT: self.last_used_at}
        )
        self._tell_manager(RecordUsed(self.id, self.usage_count, self.last_used_at))

    # -- mounts -----------------------------------------------------------------------------

    @handles(SetKeptPair)
    def _set_kept_pair(self, m: SetKeptPair) -> None:
        self.kept_pair = m.kept

    @handles(SetMountSnapshot)
    def _set_mount_snapshot(self, m: SetMountSnapshot) -> None:
        """After finalize: mount the record's own snapshot from now on."""
        self.mount_snapshot_id = m.snapshot_id
        self.mounts = None

    @handles(MountBegin)
    def _mount_begin(self, m: MountBegin) -> CachedMounts | Await[tuple[Mount, ...]] | MountPlan:
        """The mounts if cached, the flight making them, or a plan to make them."""
        self._check_alive()
        if self.mounts is not None:
            return CachedMounts(self.mounts)
        if self.mount_flight is not None:
            return Await(self.mount_flight)
        self.mount_flight = Future()
        own = self.mount_snapshot_id == self.snapshot_id
        view = not self.mutable and own
        return MountPlan(self.mount_snapshot_id, view, self.snapshot_id)

    @handles(MountEnd)
    def _mount_end(self, m: MountEnd) -> None:
        flight, self.mount_flight = self.mount_flight, None
        mounts = m.mounts
        if m.error is None and mounts is not None:
            if not self.mutable and self.mount_snapshot_id == self.snapshot_id:
                self.had_view = True
            if not self.settled or self.mutable:
                self.mounts = mounts
        if flight is not None:
            if m.error is not None:
                flight.set_exception(m.error)
            else:
                flight.set_result(mounts or ())

    # -- size -------------------------------------------------------------------------------

    @handles(SizeBegin)
    def _size_begin(self, m: SizeBegin) -> KnownSize | Await[int] | SizePlan:
        """The size if known, the flight measuring it, or a plan to measure it."""
        if self.size != SIZE_UNKNOWN and not self.mutable:
            return KnownSize(self.size)
        if self.size_flight is not None:
            return Await(self.size_flight)
        self.size_flight = Future()
        return SizePlan(self.mount_snapshot_id, self.snapshot_id, self.size_generation)

    @handles(SizeEnd)
    def _size_end(self, m: SizeEnd) -> None:
        """Ends a size flight.

        ``size`` is ``None`` when the snapshot does not exist (counted 0). A size is cached
        only when ``cacheable`` (a merge or diff not extracted yet is measured again once it
        is) and no reset happened since its flight began (``generation``). The manager, which
        owns the size (table and metadata), hears of it before the waiters get it.
        """
        flight, self.size_flight = self.size_flight, None
        size = m.size
        cache = m.cacheable and m.generation in (-1, self.size_generation)
        if m.error is None and size is not None and cache and not self.mutable:
            self.size = size
            self._tell_manager(RecordSized(self.id, size, self.size_generation))
        if flight is not None:
            if m.error is not None:
                flight.set_exception(m.error)
            else:
                flight.set_result(0 if size is None else size)

    @handles(ForgetSize)
    def _forget_size(self, m: ForgetSize) -> None:
        """The size is unknown again (BuildKit ``queueSize(sizeUnknown)``)."""
        self.size = SIZE_UNKNOWN
        self.size_generation = m.generation

    @handles(LearnSize)
    def _learn_size(self, m: LearnSize) -> None:
        """The manager learned the size elsewhere (a disk usage measurement, the twin)."""
        if m.generation == self.size_generation:
            self.size = m.size

    # -- metadata ---------------------------------------------------------------------------

    @handles(ReadMetadata)
    def _read_metadata(self, m: ReadMetadata) -> Any:
        # Read the stored value now: other writers (the manager's policy and finalize
        # updates, the statistics writer, _persist) write through their own items, so a
        # cached item would go stale (a setter followed by a getter read the old value).
        return self.core.store.get(self.id).get(m.key)

    @handles(WriteMetadata)
    def _write_metadata(self, m: WriteMetadata) -> Future[None]:
        """Validates the values and returns a future that completes once they are durable."""
        self._check_alive()
        # Validates first, without I/O: bad input changes nothing.
        StorageItem(self.core.store, self.id, None).queue_many(m.values, m.indexes)
        return self.core.submit(self._persist, dict(m.values), dict(m.indexes or {}))

    def _persist(self, values: dict[str, Any], indexes: dict[str, str]) -> None:
        # Runs on the I/O executor, not on the record actor: only the store is touched.
        item = self.core.store.get(self.id)
        if not item.exists:
            msg = f"record {self.id!r} not found (removed while writing metadata)"
            raise NotFoundError(msg)
        item.queue_many(values, indexes)
        item.commit()


CacheRecord._handlers = handler_table(CacheRecord)
