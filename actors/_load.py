"""Loading the record table at open (BuildKit ``init``/``getRecord``, §3.3).

Runs once, in the opening thread, before the manager actor exists (nothing is shared yet).
Records load parents first; every record that cannot load is cleared together with its
descendants, and its leases (``<id>``, ``<id>-variants``, ``<id>-view``) are deleted, so
nothing it held leaks (BuildKit ``8e0b816d0``). Specifically:

* corrupt metadata (undecodable, wrong types) -> cleared;
* a parent (or equal mutable) that is missing, broken, or part of a cycle -> cleared;
* ``cache.deleted`` set (a prune was interrupted) -> removal finished;
* a mutable record whose active snapshot is missing -> removed;
* a lazy record (blob-only, its blob not in the content store) -> cleared: there is no
  descriptor handler at open, and BuildKit's ``getRecord`` fails such records (it clears
  their metadata). Checked *before* the record joins the table, so no record stays in the
  table with its parents released (BuildKit #7154/#7157), and its descendants go with it;
* an immutable whose equal mutable is gone but whose own snapshot exists (a crash after the
  snapshot commit, before the metadata update) -> recovered as a plain immutable;
  without its snapshot -> cleared.

Holds are counted while loading: each loaded record holds each parent slot once, so the
refcounts match what they were before the restart, and a failed load leaks no hold
(TestLoadBrokenParents).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from ..storage import (
    DB_CONTENT,
    KEY_DELETED,
    KEY_EQUAL_MUTABLE,
    CorruptMetadataError,
    Kind,
    LmdbLeaseManager,
    MetadataStore,
    MetaEnv,
    NotFoundError,
    RefcacheError,
    Snapshotter,
)
from ._entry import RecordEntry, clear_record, lease_ids

__all__ = ["LoadReport", "load_records"]

logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What loading found and did (logged at open, shown by ``check``)."""

    loaded: int = 0
    cleared: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    finished_deletes: list[str] = field(default_factory=list)
    recovered_half_finalized: list[str] = field(default_factory=list)


def load_records(
    env: MetaEnv,
    store: MetadataStore,
    snapshotter: Snapshotter,
    leases: LmdbLeaseManager,
) -> tuple[dict[str, RecordEntry], LoadReport]:
    """Loads every stored record; returns the table and a report of what was repaired.

    One scan of the records (decoded straight into table entries) and one batched lookup
    of the snapshots and blobs the checks need: nothing is read per record, so opening
    100k records costs what decoding them does.
    """
    report = LoadReport()
    doomed: dict[str, str] = {}  # id -> reason; removed with leases at the end
    candidates = _decode_all(store, doomed, report)

    # What the checks read of other stores, in one batch each.
    kinds = snapshotter.kinds(e.snapshot_id for e in candidates.values() if e.mutable)
    blobs = _blobs_present(env, {e.blob for e in candidates.values() if e.blob_only and e.blob})
    checks = _Checks(state={}, candidates=candidates, kinds=kinds, blobs=blobs)
    _check_all(checks, snapshotter, doomed, report, store)

    entries = _parents_first(candidates, checks.state)
    for e in entries.values():
        for p in e.parents:
            if p:
                entries[p].holders += 1
        if e.equal_mutable:
            entries[e.equal_mutable].equal_immutable = e.id
    for rid in candidates:
        if rid not in entries and rid not in doomed:
            doomed[rid] = "a parent could not be loaded"

    if doomed:
        with env.write_txn() as txn:
            for rid in doomed:
                clear_record(store, leases, txn, rid, lease_ids(rid))
        for rid, reason in doomed.items():
            if rid not in report.finished_deletes:
                report.cleared.append((rid, reason))
                logger.warning("record %s cleared at open: %s", rid, reason)
    report.loaded = len(entries)
    return entries, report


def _decode_all(
    store: MetadataStore, doomed: dict[str, str], report: LoadReport
) -> dict[str, RecordEntry]:
    """Every stored record decoded into a table entry (one scan; ids and repeated strings
    shared); undecodable ones and interrupted removals go to ``doomed``."""
    candidates: dict[str, RecordEntry] = {}
    shared: dict[str, str] = {}
    canon = shared.setdefault
    from_fields = RecordEntry.from_fields

    def strings(text: str) -> str:
        return canon(text, text)

    def visit(rid: str, fields: dict[str, Any]) -> None:
        rid = canon(rid, rid)
        built = from_fields(rid, fields, strings)
        if built is None:
            slow.append(rid)
            return
        entry, deleted = built
        if deleted:
            doomed[rid] = "interrupted removal finished (cache.deleted)"
            report.finished_deletes.append(rid)
            return
        candidates[rid] = entry

    slow: list[str] = []
    slow.extend(store.scan_fields(visit))
    for rid in sorted(slow):  # undecodable, or a value of an unexpected type
        try:
            item = store.get(rid)
            entry = RecordEntry.from_item(item)
            deleted = item.get_bool(KEY_DELETED)
        except CorruptMetadataError as exc:
            doomed[rid] = f"corrupt metadata: {exc}"
            continue
        if deleted:
            doomed[rid] = "interrupted removal finished (cache.deleted)"
            report.finished_deletes.append(rid)
            continue
        candidates[rid] = entry
    return candidates


def _check_all(
    checks: _Checks,
    snapshotter: Snapshotter,
    doomed: dict[str, str],
    report: LoadReport,
    store: MetadataStore,
) -> None:
    """Checks every candidate, parents first, iteratively (chains may be deeper than
    Python's recursion limit); ``checks.state`` maps each id to whether it loads."""
    candidates, state = checks.candidates, checks.state
    # Records whose dependencies are settled are checked at once: first those without any
    # (bases, the mutable halves of pairs), then those whose dependencies all are (most
    # immutable halves, children of bases); only the rest take the walk's stack.
    later = []
    for rid, rec in candidates.items():
        if rec.equal_mutable or any(rec.parents):
            later.append(rec)
        else:
            state[rid] = _check_record(rec, checks, snapshotter, doomed, report, store)
    for first in later:
        start = first.id
        if start in state:
            continue
        if all(p in state for p in first.parents if p) and (
            not first.equal_mutable or first.equal_mutable in state
        ):
            state[start] = _check_record(first, checks, snapshotter, doomed, report, store)
            continue
        stack: list[tuple[str, bool]] = [(start, False)]
        on_path: set[str] = set()
        while stack:
            rid, ready = stack.pop()
            if rid in state:
                continue
            e = candidates.get(rid)
            if e is None:
                state[rid] = False
                continue
            deps = [p for p in e.parents if p]
            if e.equal_mutable:
                deps.append(e.equal_mutable)
            if not ready:
                if rid in on_path:
                    state[rid] = False
                    doomed.setdefault(rid, "parent cycle in metadata")
                    continue
                on_path.add(rid)
                stack.append((rid, True))
                stack.extend((d, False) for d in deps if d not in state)
                continue
            on_path.discard(rid)
            state[rid] = _check_record(e, checks, snapshotter, doomed, report, store)


def _parents_first(
    candidates: dict[str, RecordEntry], state: dict[str, bool]
) -> dict[str, RecordEntry]:
    """The loaded records in id order, each after what it depends on (the order of the
    table: disk usage, prune's scan and its ties follow it)."""
    entries: dict[str, RecordEntry] = {}
    for rid, e in candidates.items():
        if rid in entries or not state.get(rid, False):
            continue
        if not e.equal_mutable and not any(e.parents):
            entries[rid] = e
            continue
        stack: list[tuple[str, bool]] = [(rid, False)]
        while stack:
            cur, ready = stack.pop()
            if cur in entries:
                continue
            rec = candidates[cur]
            if ready:
                entries[cur] = rec
                continue
            stack.append((cur, True))
            deps = [p for p in rec.parents if p]
            if rec.equal_mutable:
                deps.append(rec.equal_mutable)
            stack.extend((d, False) for d in deps if d not in entries)
    return entries


@dataclass
class _Checks:
    """What the per-record checks read: the load so far, and the batched lookups."""

    state: dict[str, bool]  # id -> loaded ok (parents first)
    candidates: dict[str, RecordEntry]
    kinds: dict[str, Kind]  # snapshot key -> kind, for every mutable's snapshot
    blobs: set[str]  # the blobs of lazy records that are in the content store


def _check_record(
    e: RecordEntry,
    checks: _Checks,
    snapshotter: Snapshotter,
    doomed: dict[str, str],
    report: LoadReport,
    store: MetadataStore,
) -> bool:
    state = checks.state
    for p in e.parents:
        if p and not state.get(p, False):
            doomed[e.id] = f"parent {p!r} could not be loaded"
            return False
    if e.blob_only and e.blob and e.blob not in checks.blobs:
        doomed[e.id] = (
            f"lazy record: blob {e.blob} is not in the content store and no descriptor "
            "handler exists at open"
        )
        return False
    if e.equal_mutable:
        m_ok = state.get(e.equal_mutable, False)
        m = checks.candidates.get(e.equal_mutable)
        if not m_ok or m is None or not m.mutable:
            # Rare (a crash mid-finalize): this record's own snapshot is looked up alone.
            if _snapshot_state(snapshotter, e.snapshot_id) == Kind.COMMITTED:
                # Crash after the snapshot commit, before the metadata (eb935e525).
                e.equal_mutable = None
                with contextlib.suppress(RefcacheError):
                    store.get(e.id).set(KEY_EQUAL_MUTABLE, None)
                report.recovered_half_finalized.append(e.id)
            else:
                doomed[e.id] = f"equal mutable {m.id if m else e.equal_mutable!r} is gone"
                return False
    if e.mutable and checks.kinds.get(e.snapshot_id) != Kind.ACTIVE:
        doomed[e.id] = f"mutable record has no active snapshot {e.snapshot_id!r}"
        return False
    return True


def _blobs_present(env: MetaEnv, digests: set[str]) -> set[str]:
    """Those of ``digests`` the content store has (one batched read)."""
    if not digests:
        return set()
    # DB_CONTENT is the content store's authority (its layout is fixed by the conventions).
    with env.read_txn() as txn:
        found = txn.get_many(DB_CONTENT, [d.encode() for d in digests])
    return {key.decode() for key in found}


def _snapshot_state(snapshotter: Snapshotter, key: str) -> Kind | None:
    try:
        return snapshotter.stat(key).kind
    except NotFoundError:
        return None
