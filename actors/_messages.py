"""The manager actor's protocol: every message it handles, with the values its replies carry.

Senders are ref handles (:mod:`actors._refs`), record actors (tells only), the blob work in
callers' threads (:mod:`actors._blobs`, :mod:`actors._remote`, :mod:`actors._distribution`)
and the jobs on the I/O executor (:mod:`actors._jobs`, :mod:`actors._prune_jobs`). Each
message names its reply type (:class:`~actors._protocol.Message`); the handlers live in
:class:`~actors._manager.CacheManager` and the components it owns
(:class:`~actors._blobrecords.BlobRecords`, :class:`~actors._pruner.Pruner`).

Everything here is immutable: tuples, strings, frozen sets, read-only mappings, frozen
dataclasses; actor references and futures only in replies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pykka

from ..storage import Descriptor
from ._protocol import Await, Message
from ._rows import TableRow
from ._types import DescHandler, RecordInfo, RecordKind

__all__ = [
    "ActorOf",
    "AncestorsOf",
    "BlobNode",
    "BlobRecordPlan",
    "ByBlobs",
    "ChainMetadata",
    "CloneRecord",
    "Commit",
    "CommitFailed",
    "ExtractPlan",
    "ExtractPlanOf",
    "Extracted",
    "FinalizeBegin",
    "FinalizeEnd",
    "FinalizePlan",
    "Forgotten",
    "GcDone",
    "Grant",
    "InfoOf",
    "KnownSizes",
    "LayerChain",
    "Listeners",
    "ListenersGone",
    "Marked",
    "MetadataChanged",
    "NodeOf",
    "Ping",
    "Poisoned",
    "PruneDone",
    "PruneForget",
    "PruneMark",
    "PruneUnmark",
    "PulledRecords",
    "RecordIdle",
    "RecordSized",
    "RecordUsed",
    "Register",
    "RegisterPiece",
    "ResetSize",
    "ScanChunk",
    "SetBlob",
    "SetPolicy",
    "SizeInputs",
    "SnapshotOf",
    "TableScan",
    "Unhold",
    "Unreferenced",
]

#: A pair a prune removes: the record and its equal immutable, if any.
Pair = tuple[str, str | None]


# -- reply values -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grant:
    """A counted handle the manager created on a record; the receiver wraps it in a ref
    (:class:`~actors._refs.ImmutableRef` or ``MutableRef``) and owns it from then on."""

    record_id: str
    handle_id: int
    actor: pykka.ActorRef[Any]


@dataclass(frozen=True, slots=True)
class BlobNode:
    """One record's blob-related state, as the manager's table holds it now (:class:`NodeOf`)."""

    id: str
    kind: RecordKind
    parents: tuple[str, ...]
    snapshot_id: str
    blob: str
    blob_only: bool
    diff_id: str
    chain_id: str
    blob_chain_id: str
    media_type: str
    mutable: bool
    finalized: bool  #: no equal mutable (BuildKit: ``equalMutable == nil``)
    poisoned: bool = False  #: its blob lied about its diffID (see ``_blobs.quarantine``)


@dataclass(frozen=True, slots=True)
class FinalizePlan:
    """Finalize an equal pair: commit ``mutable_snapshot_id`` as ``snapshot_id``, then send
    :class:`FinalizeEnd` (the manager has marked the mutable dead meanwhile)."""

    snapshot_id: str
    mutable_snapshot_id: str


@dataclass(frozen=True, slots=True)
class ExtractPlan:
    """How to materialise a merge or diff: extract ``deps``, then merge ``diffs`` (pairs of
    lower and upper snapshot ids, ``""`` for none) into ``snapshot_id``."""

    snapshot_id: str
    deps: tuple[str, ...]
    diffs: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class BlobRecordPlan:
    """One layer record a ``pull`` wants (see :class:`ByBlobs`).

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
class PulledRecords:
    """The reply to :class:`ByBlobs`: ``key -> record id`` for every plan, and a handle for
    each wanted key (the caller wraps and releases them)."""

    ids: Mapping[str, str]
    grants: Mapping[str, Grant]


@dataclass(frozen=True, slots=True)
class ScanChunk:
    """Rows of a table scan; ``token`` continues it, ``done`` ends it."""

    token: int
    rows: tuple[TableRow, ...]
    done: bool


@dataclass(frozen=True, slots=True)
class Marked:
    """The reply to :class:`PruneMark`: the pairs marked dead (a row of the record and its
    twin's id), the ids refused, and the ids not looked at within the time budget."""

    marked: tuple[tuple[TableRow, str | None], ...]
    refused: tuple[str, ...]
    rest: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Forgotten:
    """The reply to :class:`PruneForget`: parents left without refs (fresh rows), the
    listeners to notify, and the pairs not handled within the time budget."""

    freed: tuple[TableRow, ...]
    listeners: tuple[pykka.ActorRef[Any], ...]
    rest: tuple[Pair, ...]


# -- from handles and jobs ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping(Message[bool]):
    """Answers True once the manager runs (``open_cache`` waits for it)."""


@dataclass(frozen=True, slots=True)
class Register(Message[Grant]):
    """A job wrote a new record (lease and metadata): add it to the table, take a handle.

    ``values`` are the record's mirrored metadata (``_entry.mirrored``); ``triggers`` the
    parents whose holds count a use when they go.
    """

    record_id: str
    kind: RecordKind
    parents: tuple[str, ...]
    values: Mapping[str, Any]
    triggers: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class RegisterPiece(Message[str]):
    """Like :class:`Register`, for a record a merge being made will own (one hold that counts
    a use when it goes, no handle); replies with its id."""

    record_id: str
    kind: RecordKind
    parents: tuple[str, ...]
    values: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Unhold(Message[None]):
    """A job gives back the holds it took on ``ids`` (``triggers``: holds that count a use)."""

    ids: tuple[str, ...]
    triggers: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class SnapshotOf(Message[str]):
    """The record's snapshot id."""

    record_id: str


@dataclass(frozen=True, slots=True)
class ActorOf(Message[pykka.ActorRef[Any]]):
    """The record's actor, activated again if it was passivated."""

    record_id: str


@dataclass(frozen=True, slots=True)
class CloneRecord(Message[Grant]):
    """A new handle on the record (that counts no use)."""

    record_id: str


@dataclass(frozen=True, slots=True)
class InfoOf(Message[RecordInfo]):
    """Everything the table knows about the record."""

    record_id: str


@dataclass(frozen=True, slots=True)
class SetPolicy(Message[None]):
    """Sets the record's cache policy (``retain``: kept when unreferenced)."""

    record_id: str
    retain: bool


@dataclass(frozen=True, slots=True)
class MetadataChanged(Message[None]):
    """A handle wrote metadata the table mirrors (``_entry.mirrored`` values)."""

    record_id: str
    values: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Commit(Message[Await[Grant]]):
    """Commits a mutable record (consuming handle ``handle_id``): a handle on its new equal
    immutable, once the immutable's metadata is durable (a group commit: the manager does
    not wait for it)."""

    record_id: str
    handle_id: int


@dataclass(frozen=True, slots=True)
class CommitFailed(Message[None]):
    """The durable write of a commit's new immutable ``record_id`` failed: forget it (the
    caller gets the error); its mutable ``mutable_id`` lost the handle the commit consumed."""

    record_id: str
    mutable_id: str


@dataclass(frozen=True, slots=True)
class Unreferenced(Message[None]):
    """The record's last handle went: decide what happens to it."""

    record_id: str


@dataclass(frozen=True, slots=True)
class FinalizeBegin(Message[FinalizePlan | Await[None] | None]):
    """Begins finalizing an equal pair: a plan, a finalize in flight to wait for, or None
    (nothing to finalize)."""

    record_id: str


@dataclass(frozen=True, slots=True)
class FinalizeEnd(Message[None]):
    """Ends the finalize a :class:`FinalizePlan` began (``error``: it failed)."""

    record_id: str
    error: BaseException | None


@dataclass(frozen=True, slots=True)
class LayerChain(Message[tuple[str, ...]]):
    """The record's layers, root first (BuildKit ``layerWalk``)."""

    record_id: str


@dataclass(frozen=True, slots=True)
class AncestorsOf(Message[tuple[str, ...]]):
    """The record and its ancestors, depth first (BuildKit ``walkAncestors``)."""

    record_id: str


# -- from record actors (tells) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordIdle(Message[None]):
    """A plain immutable's (or a retained pair's immutable's) actor settled itself at its
    last release; ``acquires`` tells a stale message (the manager acquired a handle since)
    from a current one; ``used``: the release counted a use (an equal mutable counts it
    too)."""

    record_id: str
    acquires: int
    used: bool = False


@dataclass(frozen=True, slots=True)
class RecordUsed(Message[None]):
    """A record actor counted a use (sent before the releasing caller's answer)."""

    record_id: str
    usage_count: int
    last_used_at: int | None


@dataclass(frozen=True, slots=True)
class RecordSized(Message[None]):
    """A record actor measured its size (sent before the measuring caller's answer)."""

    record_id: str
    size: int
    generation: int


# -- from blob work in callers' threads -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeOf(Message[BlobNode]):
    """The record's current :class:`BlobNode`."""

    record_id: str


@dataclass(frozen=True, slots=True)
class ExtractPlanOf(Message[ExtractPlan | None]):
    """How to materialise a merge or diff (None for a layer)."""

    record_id: str


@dataclass(frozen=True, slots=True)
class Poisoned(Message[bool]):
    """The record's blob has diffID ``actual_diff_id``, not the one it claims: quarantine the
    record. Replies whether the blob should leave the content store."""

    record_id: str
    actual_diff_id: str


@dataclass(frozen=True, slots=True)
class SizeInputs(Message[tuple[str, bool]]):
    """``(blob, blob_only)`` of the record, for measuring it."""

    record_id: str


@dataclass(frozen=True, slots=True)
class ResetSize(Message[None]):
    """The record's size is unknown again (a new blob variant)."""

    record_id: str


@dataclass(frozen=True, slots=True)
class Extracted(Message[None]):
    """A blob-only record's snapshot was extracted (BuildKit ``unlazyLayer``'s end)."""

    record_id: str


@dataclass(frozen=True, slots=True)
class SetBlob(Message[bool]):
    """BuildKit ``setBlob``'s table part; replies whether the blob was set."""

    record_id: str
    desc: Descriptor


@dataclass(frozen=True, slots=True)
class ChainMetadata(Message[None]):
    """BuildKit ``computeChainMetadata`` for one record; ``layers`` is the filter."""

    record_id: str
    layers: frozenset[str]


@dataclass(frozen=True, slots=True)
class ByBlobs(Message[PulledRecords]):
    """``get_by_blob`` for a batch of layer chains in one transaction (``pull``).

    ``plans`` come parent first; ``known`` maps keys resolved by earlier batches to record
    ids; ``want`` are the keys to take handles on.
    """

    plans: tuple[BlobRecordPlan, ...]
    known: Mapping[str, str]
    handlers: Mapping[str, DescHandler]
    want: frozenset[str]


# -- from disk usage and prune jobs ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TableScan(Message[ScanChunk]):
    """Rows ``start:start+count`` of the table as it was at the scan's first chunk
    (``token`` None starts a scan)."""

    token: int | None
    start: int
    count: int


@dataclass(frozen=True, slots=True)
class KnownSizes(Message[tuple[str, ...]]):
    """Sizes a job measured (``id -> (size, generation)``); replies with the ids taken."""

    sizes: Mapping[str, tuple[int, int]]


@dataclass(frozen=True, slots=True)
class PruneMark(Message[Marked]):
    """Re-checks prune candidates and marks those still unused dead (``cutoff``: a use after
    it protects a record)."""

    ids: tuple[str, ...]
    cutoff: int | None


@dataclass(frozen=True, slots=True)
class PruneUnmark(Message[None]):
    """Gives back marked pairs (persisting the mark failed)."""

    pairs: tuple[Pair, ...]


@dataclass(frozen=True, slots=True)
class PruneForget(Message[Forgotten]):
    """Drops marked pairs from the table.

    ``cleared``: the job has cleared their metadata and leases already, so the manager
    writes nothing (it never waits for the metadata write lock); otherwise (the job's
    clearing failed) the manager's removal clears them itself.
    """

    pairs: tuple[Pair, ...]
    cleared: bool = True


@dataclass(frozen=True, slots=True)
class PruneDone(Message[None]):
    """A prune ended (counted in the statistics; a queued one starts)."""

    records: int
    size: int
    seconds: float


@dataclass(frozen=True, slots=True)
class GcDone(Message[None]):
    """A garbage collection freed ``freed`` bytes."""

    freed: int


@dataclass(frozen=True, slots=True)
class Listeners(Message[tuple[pykka.ActorRef[Any], ...]]):
    """The subscribed listeners."""


@dataclass(frozen=True, slots=True)
class ListenersGone(Message[None]):
    """Listeners found dead while notifying: unsubscribe them."""

    gone: tuple[pykka.ActorRef[Any], ...]
