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
    StorageItem,
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
    """Loads every stored record; returns the table and a report of what was repaired."""
    report = LoadReport()
    items: dict[str, StorageItem] = {item.id: item for item in store.all()}
    candidates: dict[str, RecordEntry] = {}
    doomed: dict[str, str] = {}  # id -> reason; removed with leases at the end
    for rid, item in items.items():
        try:
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

    # Parents first, iteratively (chains may be deeper than Python's recursion limit).
    state: dict[str, bool] = {}  # id -> loaded ok
    for start in candidates:
        if start in state:
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
            state[rid] = _check_record(
                e, state, candidates, snapshotter, doomed, report, store, env
            )

    entries: dict[str, RecordEntry] = {}
    for rid, ok in state.items():
        if ok and rid in candidates:
            entries[rid] = candidates[rid]
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


def _check_record(
    e: RecordEntry,
    state: dict[str, bool],
    candidates: dict[str, RecordEntry],
    snapshotter: Snapshotter,
    doomed: dict[str, str],
    report: LoadReport,
    store: MetadataStore,
    env: MetaEnv,
) -> bool:
    for p in e.parents:
        if p and not state.get(p, False):
            doomed[e.id] = f"parent {p!r} could not be loaded"
            return False
    if e.blob_only and e.blob and not _blob_exists(env, e.blob):
        doomed[e.id] = (
            f"lazy record: blob {e.blob} is not in the content store and no descriptor "
            "handler exists at open"
        )
        return False
    if e.equal_mutable:
        m_ok = state.get(e.equal_mutable, False)
        m = candidates.get(e.equal_mutable)
        if not m_ok or m is None or not m.mutable:
            if _snapshot_state(snapshotter, e.snapshot_id) == Kind.COMMITTED:
                # Crash after the snapshot commit, before the metadata (eb935e525).
                e.equal_mutable = None
                with contextlib.suppress(RefcacheError):
                    store.get(e.id).set(KEY_EQUAL_MUTABLE, None)
                report.recovered_half_finalized.append(e.id)
            else:
                doomed[e.id] = f"equal mutable {m.id if m else e.equal_mutable!r} is gone"
                return False
    if e.mutable and _snapshot_state(snapshotter, e.snapshot_id) != Kind.ACTIVE:
        doomed[e.id] = f"mutable record has no active snapshot {e.snapshot_id!r}"
        return False
    return True


def _blob_exists(env: MetaEnv, digest: str) -> bool:
    # DB_CONTENT is the content store's authority (its layout is fixed by the conventions).
    with env.read_txn() as txn:
        return txn.get(DB_CONTENT, digest.encode()) is not None


def _snapshot_state(snapshotter: Snapshotter, key: str) -> Kind | None:
    try:
        return snapshotter.stat(key).kind
    except NotFoundError:
        return None
