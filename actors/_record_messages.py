"""The record actor's protocol: every message a :class:`~actors._record.CacheRecord` handles.

Senders are the manager (handle grants, settling, size and use updates; never waiting on a
record that could wait on it) and ref handles (clone, release, mounts, size, metadata). A
record never asks: it tells the manager (:class:`~actors._messages.RecordIdle`,
``RecordUsed``, ``RecordSized``). Slow work is never done by the record: a caller gets a
*plan* (``MountPlan``, ``SizePlan``), does the work in its own thread and reports the outcome
(``MountEnd``, ``SizeEnd``); callers that come meanwhile get an
:class:`~actors._protocol.Await` of the same future (single flight).
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from ..storage import Mount
from ._protocol import Await, Message

__all__ = [
    "Acquire",
    "CachedMounts",
    "CloneHandle",
    "Consume",
    "CountHandles",
    "SetKeptPair",
    "ForgetSize",
    "HasTriggerHandles",
    "Kill",
    "KnownSize",
    "LearnSize",
    "MountBegin",
    "MountEnd",
    "MountPlan",
    "ReadMetadata",
    "Release",
    "SetMountSnapshot",
    "SetTriggerHolds",
    "Settle",
    "Settled",
    "SizeBegin",
    "SizeEnd",
    "SizePlan",
    "UseCounted",
    "WriteMetadata",
]


# -- reply values -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settled:
    """What the manager learns when it takes an idle record back from its actor."""

    had_view: bool
    used: bool = False  #: a use was counted since the record was last settled


@dataclass(frozen=True, slots=True)
class CachedMounts:
    """The record's mounts, made before."""

    mounts: tuple[Mount, ...]


@dataclass(frozen=True, slots=True)
class MountPlan:
    """Make the mounts of ``snapshot_id`` (a read-only view when ``view``) and send
    :class:`MountEnd`; ``own`` is the record's own snapshot (to fall back on when the equal
    mutable's was committed meanwhile)."""

    snapshot_id: str
    view: bool
    own: str


@dataclass(frozen=True, slots=True)
class KnownSize:
    """The record's size, measured before."""

    size: int


@dataclass(frozen=True, slots=True)
class SizePlan:
    """Measure ``snapshot_id`` (``own``: the record's own snapshot) and send :class:`SizeEnd`
    with ``generation``."""

    snapshot_id: str
    own: str
    generation: int


# -- handles ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Acquire(Message[None]):
    """A handle the manager created (a tell; its id chosen there, ``trigger``: its release
    counts a use)."""

    handle_id: int
    trigger: bool


@dataclass(frozen=True, slots=True)
class CloneHandle(Message[int | None]):
    """A new handle id beside ``handle_id``; None once the record settled (the caller then
    clones through the manager)."""

    handle_id: int


@dataclass(frozen=True, slots=True)
class Release(Message[tuple[bool, bool]]):
    """Releases ``handle_id``: ``(found, manager_needed)``."""

    handle_id: int


@dataclass(frozen=True, slots=True)
class Consume(Message[bool]):
    """Removes ``handle_id`` without counting a use (a mutable handle given to its commit)."""

    handle_id: int


@dataclass(frozen=True, slots=True)
class CountHandles(Message[int]):
    """The number of open handles."""


@dataclass(frozen=True, slots=True)
class Settle(Message[Settled | None]):
    """Hands the record back to the manager if it has no handles (else None)."""


@dataclass(frozen=True, slots=True)
class Kill(Message[None]):
    """The record is being removed (a tell)."""


@dataclass(frozen=True, slots=True)
class UseCounted(Message[None]):
    """The manager counted a use itself (a tell: an equal mutable, a child's counting hold)."""

    usage_count: int
    last_used_at: int | None


@dataclass(frozen=True, slots=True)
class SetTriggerHolds(Message[None]):
    """The number of child holds that count a use when they go."""

    count: int


@dataclass(frozen=True, slots=True)
class HasTriggerHandles(Message[bool]):
    """Whether an open handle counts uses (BuildKit ``shouldUpdateLastUsed``)."""


# -- mounts -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetKeptPair(Message[None]):
    """Whether the record is the immutable of a retained equal pair (its policy changed):
    such a record settles its last release itself, as a plain immutable does (a tell)."""

    kept: bool


@dataclass(frozen=True, slots=True)
class SetMountSnapshot(Message[None]):
    """After finalize: mount the record's own snapshot from now on (a tell)."""

    snapshot_id: str


@dataclass(frozen=True, slots=True)
class MountBegin(Message[CachedMounts | Await[tuple[Mount, ...]] | MountPlan]):
    """The record's mounts: cached, in flight, or a plan for the caller to make them."""


@dataclass(frozen=True, slots=True)
class MountEnd(Message[None]):
    """Ends a mount flight with its mounts or its error."""

    mounts: tuple[Mount, ...] | None
    error: BaseException | None


# -- size ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SizeBegin(Message[KnownSize | Await[int] | SizePlan]):
    """The record's size: known, in flight, or a plan for the caller to measure it."""


@dataclass(frozen=True, slots=True)
class SizeEnd(Message[None]):
    """Ends a size flight.

    ``size`` is None when the snapshot does not exist (counted 0); it is cached only when
    ``cacheable`` and no reset happened since ``generation``.
    """

    size: int | None
    error: BaseException | None
    generation: int = -1
    cacheable: bool = True


@dataclass(frozen=True, slots=True)
class ForgetSize(Message[None]):
    """The size is unknown again, as of the manager's ``generation`` (a tell)."""

    generation: int


@dataclass(frozen=True, slots=True)
class LearnSize(Message[None]):
    """The manager learned the size elsewhere (a tell: a disk usage measurement, the twin)."""

    size: int
    generation: int


# -- metadata -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadMetadata(Message[Any]):
    """The stored value of ``key`` (read now, from LMDB)."""

    key: str


@dataclass(frozen=True, slots=True)
class WriteMetadata(Message[Future[None]]):
    """Validates ``values`` (and ``indexes``) and replies with a future that completes once
    they are durable (the write runs on the I/O executor)."""

    values: Mapping[str, Any]
    indexes: Mapping[str, str] | None
