"""Record-creating jobs: the slow half of ``new``, ``merge``, ``diff`` and ``get_by_blob``.

The manager validates a request, takes the holds the new record will own on its parents and
submits one of these functions to the I/O executor (DESIGN.md rule 3: no slow I/O in a
handler). A job finalizes and extracts what it needs, writes the record's lease and metadata
in one transaction (:func:`~actors._entry.write_new_record`), makes the snapshot where there
is one to make, and registers the record with the manager (:class:`~actors._messages.Register`),
which grants the caller's handle. A job that fails gives its holds back
(:class:`~actors._messages.Unhold`) and leaves nothing behind.

Everything here runs on the I/O executor, and talks to the manager only through typed asks
(the manager never waits on a job).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from typing import Any

from ..storage import (
    KEY_COMMITTED,
    KEY_CREATED_AT,
    KEY_DESCRIPTION,
    KEY_SIZE,
    KEY_SNAPSHOT,
    RefcacheError,
    WriteTxn,
)
from ._blobs import extract_record
from ._core import CacheCore
from ._entry import mirrored, new_id, parent_fields, write_new_record
from ._messages import Grant, Register, RegisterPiece, SnapshotOf, Unhold
from ._refs import ImmutableRef, MutableRef, finalize_record
from ._types import SIZE_UNKNOWN, DescHandler, RecordKind

__all__ = [
    "diff_job",
    "diff_merge_job",
    "extract_job",
    "merge_job",
    "new_job",
]


def new_job(
    core: CacheCore,
    record_id: str,
    parents: tuple[str, ...],
    values: dict[str, Any],
    handlers: Mapping[str, DescHandler],
) -> MutableRef:
    """``new``: a mutable record on ``parents[0]`` (or on nothing), whose hold is the job's.

    Finalize the parent, build the snapshot's directory outside any transaction, then
    record, lease and snapshot metadata in one group write (one durable commit shared with
    concurrent writers). A crash before it leaves only a ``new-*`` directory, which the
    snapshotter's cleanup removes at the next open.
    """
    try:
        with core.timed("new"):
            parent_sid = ""
            if parents:
                # BuildKit New: finalize the parent, then extract it (a merge or diff
                # has no snapshot until then), and use its snapshot as the parent.
                finalize_record(core, parents[0])
                extract_record(core, parents[0], handlers)
                parent_sid = core.ask_manager(SnapshotOf(parents[0]))
            staged = core.snapshotter.stage_prepare(record_id, parent_sid)

            def write(txn: WriteTxn) -> None:
                write_new_record(core, txn, record_id, values, snapshot_id=record_id)
                staged.record(txn)

            try:
                core.env.group.write(write, core.timeout)
            except BaseException:
                staged.discard()
                raise
    except BaseException:
        with contextlib.suppress(RefcacheError):
            core.ask_manager(Unhold(parents))
        raise
    kind: RecordKind = "layer" if parents else "base"
    grant = core.ask_manager(Register(record_id, kind, parents, mirrored(values)))
    return MutableRef(core, grant.record_id, grant.handle_id, grant.actor, handlers)


def merge_job(
    core: CacheCore,
    ids: tuple[str, ...],
    handlers: Mapping[str, DescHandler] | None = None,
    triggers: frozenset[str] = frozenset(),
) -> ImmutableRef:
    """``merge`` of two or more inputs (the holds on ``ids`` are the job's: the new record
    takes them over, or they are given back on failure; ``triggers``: inputs whose hold
    counts a use when it goes)."""
    try:
        with core.timed("merge"):
            for rid in dict.fromkeys(ids):
                finalize_record(core, rid)
    except BaseException:
        with contextlib.suppress(RefcacheError):
            core.ask_manager(Unhold(ids, triggers))
        raise
    grant = _register_immutable(core, "merge", ids, {}, triggers)
    return ImmutableRef(core, grant.record_id, grant.handle_id, grant.actor, handlers)


def diff_job(
    core: CacheCore,
    parents: tuple[str, str],
    handlers: Mapping[str, DescHandler] | None = None,
) -> ImmutableRef:
    """``diff`` of ``(lower, upper)`` as one record (the holds on them are the job's)."""
    _finalize_inputs(core, parents)
    grant = _register_immutable(core, "diff", parents, {})
    return ImmutableRef(core, grant.record_id, grant.handle_id, grant.actor, handlers)


def diff_merge_job(
    core: CacheCore,
    plan: tuple[tuple[str, str, str], ...],
    handlers: Mapping[str, DescHandler] | None = None,
) -> ImmutableRef:
    """A multi-layer diff: a merge of one diff record per layer (BuildKit ``Diff``).

    ``plan`` holds ``(kind, lower, upper)`` per layer: ``("diff", parent, layer)``, or
    ``("self", "", layer)`` for a layer without a parent, which is merged as itself (an
    ordinary hold). Each per-layer diff is made with one hold, the merge's, and that hold
    counts a use when it goes (BuildKit hands the merge the diff's own handle, whose
    triggerLastUsed is set): a piece is first used when the merge that owns it is removed,
    not when it is made.
    """
    ids: list[str] = []
    triggers: list[str] = []
    started = 0  # plan entries whose holds were handed over (to a piece, or to ids)
    try:
        for kind, low, up in plan:
            started += 1
            if kind == "diff":
                # _finalize_inputs and _register_immutable give these holds back on failure.
                _finalize_inputs(core, (low, up))
                desc = {KEY_DESCRIPTION: f'diff "{low}" -> "{up}"'}
                ids.append(_register_piece(core, "diff", (low, up), desc))
                triggers.append(ids[-1])
            else:
                ids.append(up)  # the hold diff() took becomes the merge's
    except BaseException:
        with contextlib.suppress(RefcacheError):
            core.ask_manager(Unhold(tuple(ids), frozenset(triggers)))
        for kind, low, up in plan[started:]:
            with contextlib.suppress(RefcacheError):
                core.ask_manager(Unhold((low, up) if kind == "diff" else (up,)))
        raise
    return merge_job(core, tuple(ids), handlers, frozenset(triggers))


def extract_job(core: CacheCore, ref: ImmutableRef) -> ImmutableRef:
    """``get_by_blob(extract=True)``: materialises the new handle's record (released on
    failure)."""
    try:
        extract_record(core, ref.id, ref._desc_handlers)
    except BaseException:
        with contextlib.suppress(RefcacheError):
            ref.release()
        raise
    return ref


def _finalize_inputs(core: CacheCore, parents: tuple[str, ...]) -> None:
    # The job owns the holds on ``parents``: given back here if a finalize fails.
    try:
        with core.timed("diff"):
            for rid in dict.fromkeys(p for p in parents if p):
                finalize_record(core, rid)
    except BaseException:
        with contextlib.suppress(RefcacheError):
            core.ask_manager(Unhold(parents))
        raise


def _write_immutable(
    core: CacheCore,
    kind: RecordKind,
    parents: tuple[str, ...],
    extra: dict[str, Any],
    triggers: frozenset[str],
) -> tuple[str, dict[str, Any]]:
    """Lease + metadata of a new merge or diff record in one transaction; its id and values.

    Its snapshot is made on first extraction. On failure the holds on ``parents`` go back.
    """
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
            write_new_record(core, txn, record_id, values, snapshot_id=record_id)
    except BaseException:
        with contextlib.suppress(RefcacheError):
            core.ask_manager(Unhold(parents, triggers))
        raise
    return record_id, values


def _register_immutable(
    core: CacheCore,
    kind: RecordKind,
    parents: tuple[str, ...],
    extra: dict[str, Any],
    triggers: frozenset[str] = frozenset(),
) -> Grant:
    """A new merge or diff record, and a handle on it for the caller."""
    record_id, values = _write_immutable(core, kind, parents, extra, triggers)
    return core.ask_manager(Register(record_id, kind, parents, mirrored(values), triggers))


def _register_piece(
    core: CacheCore, kind: RecordKind, parents: tuple[str, ...], extra: dict[str, Any]
) -> str:
    """A new diff record that a merge being made will hold (no handle); its id."""
    record_id, values = _write_immutable(core, kind, parents, extra, frozenset())
    return core.ask_manager(RegisterPiece(record_id, kind, parents, mirrored(values)))
