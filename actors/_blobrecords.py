"""The table side of layer blobs: lazy records by blob, and what blob work asks of the table.

:class:`BlobRecords` is a component the manager owns (it runs on the manager's thread, on
the manager's :class:`~actors._table.RecordTable`): BuildKit's ``GetByBlob`` (find a record
by its blob-chain ID, or create a blob-only one), the same for a whole pull in one
transaction (:class:`~actors._messages.ByBlobs`), and the short asks of the blob work that
runs in callers' threads (:mod:`actors._blobs`, :mod:`actors._remote`): a record's
:class:`~actors._messages.BlobNode`, how to extract a merge or diff, setting a blob and
chain IDs, quarantining a record whose blob lies about its diffID.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

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
    KEY_LAYER_URLS,
    KEY_MEDIA_TYPE,
    KEY_RECORD_TYPE,
    KEY_SIZE,
    KEY_SNAPSHOT,
    RESOURCE_CONTENT,
    Descriptor,
    FailedPreconditionError,
    InvalidError,
    NeedsRemoteProviderError,
    Resource,
)
from ._blobs import chain_id, check_handlers, diff_id_of, merge_handlers
from ._core import CacheCore
from ._entry import RecordEntry, new_id, parent_fields, write_new_record
from ._jobs import extract_job
from ._messages import (
    BlobNode,
    BlobRecordPlan,
    ByBlobs,
    ChainMetadata,
    Extracted,
    ExtractPlan,
    ExtractPlanOf,
    NodeOf,
    Poisoned,
    PulledRecords,
    ResetSize,
    SetBlob,
    SizeInputs,
)
from ._protocol import handles
from ._refs import ImmutableRef, check_bool
from ._table import RecordTable
from ._types import SIZE_UNKNOWN, DescHandler, RecordKind
from ._walk import layer_walk

__all__ = ["BlobRecords", "blob_record_values"]


@dataclass(frozen=True, slots=True)
class _ByBlob:
    """One ``get_by_blob`` request, checked."""

    desc: Descriptor
    diff_id: str
    handlers: Mapping[str, DescHandler]
    retain: bool
    description: str


def blob_record_values(
    desc: Descriptor,
    diff_id: str,
    cid: str,
    bcid: str,
    snapshot_id: str,
    kind: RecordKind,
    parents: tuple[str, ...],
    *,
    created_at: int = 0,
    description: str = "",
    record_type: str = "",
    retain: bool = False,
) -> dict[str, Any]:
    """The metadata of a new blob-only record of layer ``desc`` (``None``: not stored)."""
    return {
        KEY_COMMITTED: True,
        KEY_CREATED_AT: created_at or time.time_ns(),
        KEY_SNAPSHOT: snapshot_id,
        KEY_SIZE: SIZE_UNKNOWN,
        KEY_DIFF_ID: diff_id,
        KEY_BLOB: desc.digest,
        KEY_CHAIN_ID: cid,
        KEY_BLOB_CHAIN_ID: bcid,
        # Always blob-only, even when a linked snapshot exists (BuildKit 99bd0d804).
        KEY_BLOB_ONLY: True,
        KEY_MEDIA_TYPE: desc.media_type,
        KEY_BLOB_SIZE: desc.size,
        KEY_LAYER_URLS: list(desc.urls) or None,
        KEY_CACHE_POLICY: 1 if retain else None,
        KEY_DESCRIPTION: description or None,
        KEY_RECORD_TYPE: record_type or None,
        **parent_fields(kind, parents),
    }


class BlobRecords:
    """Blob records of the table (see the module docstring). Runs on the manager's thread.

    Args:
        core: The services of the cache.
        table: The manager's record table.
    """

    def __init__(self, core: CacheCore, table: RecordTable) -> None:
        self.core = core
        self.table = table

    # -- get_by_blob --------------------------------------------------------------------------

    def get_by_blob(
        self,
        desc: Descriptor,
        parent: ImmutableRef | None,
        desc_handlers: Mapping[str, DescHandler] | None,
        extract: bool,
        retain: bool,
        description: str | None,
    ) -> ImmutableRef | Future[ImmutableRef]:
        """``CacheManager.get_by_blob`` (see there)."""
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
        table = self.table
        parent_entry = table.ref_entry(parent, "parent") if parent is not None else None
        if parent is not None:
            handlers = merge_handlers(parent._desc_handlers, handlers)
        with self.core.timed("get_by_blob"):
            if desc.digest not in handlers and not self.core.content.exists(desc.digest):
                found = self.core.remote_handlers_for([desc.digest])
                if not found:
                    raise NeedsRemoteProviderError([desc.digest])
                handlers = merge_handlers(handlers, found)
            if parent_entry is not None:
                handlers = table.check_lazy(parent_entry, handlers)
                _addressable(parent_entry)
            # BuildKit finalizes the parent here. An addressable parent is finalized already:
            # chain IDs need a blob, and set_blob finalizes before it sets one.
            request = _ByBlob(desc, diff_id, handlers, retain, description or "")
            ref = self._by_blob(request, parent_entry.id if parent_entry is not None else "")
        if extract:
            return self.core.submit(extract_job, self.core, ref)
        return ref

    def _by_blob(self, request: _ByBlob, parent_id: str) -> ImmutableRef:
        """The indexed search and the insert of ``get_by_blob`` (BuildKit steps 4-6)."""
        desc = request.desc
        cid = request.diff_id
        bcid = chain_id(desc.digest, request.diff_id)
        if parent_id:
            p = self.table.entry(parent_id)
            cid = chain_id(p.chain_id, request.diff_id)
            bcid = chain_id(p.blob_chain_id, bcid)
        store = self.core.store
        handlers = request.handlers
        found = self._first_usable((i.id for i in store.search(INDEX_BLOB_CHAIN + bcid)), handlers)
        if found is None:
            linked = self._first_usable((i.id for i in store.search(INDEX_CHAIN + cid)), handlers)
            # Re-use the linked record's snapshot, or name it by the chain ID.
            snapshot_id = linked.snapshot_id if linked is not None else cid
            parents = (parent_id,) if parent_id else ()
            kind: RecordKind = "layer" if parent_id else "base"
            values = blob_record_values(
                desc,
                request.diff_id,
                cid,
                bcid,
                snapshot_id,
                kind,
                parents,
                description=request.description,
                retain=request.retain,
            )
            (found,) = self._create([(new_id(), kind, parents, values)])
        grant = self.table.acquire(found, True)
        return ImmutableRef(self.core, grant.record_id, grant.handle_id, grant.actor, handlers)

    def _first_usable(
        self, ids: Iterable[str], handlers: Mapping[str, DescHandler]
    ) -> RecordEntry | None:
        for rid in ids:
            e = self.table.entries.get(rid)
            if e is None or e.dead or e.mutable or e.poisoned:
                continue
            if self.table.lazy_digests(e, handlers):
                continue  # BuildKit skips not-found and needs-provider matches
            return e
        return None

    def _create(
        self, rows: list[tuple[str, RecordKind, tuple[str, ...], dict[str, Any]]]
    ) -> list[RecordEntry]:
        """Creates blob-only records in one transaction; each holds its parent."""
        if not rows:
            return []
        with self.core.env.write_txn() as txn:
            for record_id, _, _, values in rows:
                cid, bcid = values[KEY_CHAIN_ID], values[KEY_BLOB_CHAIN_ID]
                write_new_record(
                    self.core,
                    txn,
                    record_id,
                    values,
                    snapshot_id=values[KEY_SNAPSHOT],
                    blob=values[KEY_BLOB],
                    indexes={
                        KEY_CHAIN_ID: INDEX_CHAIN + cid,
                        KEY_BLOB_CHAIN_ID: INDEX_BLOB_CHAIN + bcid,
                    },
                )
        out = []
        for record_id, kind, parents, values in rows:
            out.append(self.table.add(record_id, kind, parents, values))
            self.table.hold(parents)  # the new record owns a counted hold on its parent
        return out

    @handles(ByBlobs)
    def _by_blobs(self, m: ByBlobs) -> PulledRecords:
        """``get_by_blob`` for a batch of layer chains in one transaction (``pull``).

        ``plans`` are in chain order (a parent before its children); each is keyed by its
        blob-chain ID and names its parent by the parent's key (``""`` for a base). A key
        already in the ``blobchainid:`` index (and not lazy without a handler) is that
        record, as in ``get_by_blob``; the others are created blob-only, in one LMDB
        transaction (one fsync however many records). ``known`` maps keys resolved by
        earlier batches to record ids (the caller holds handles on them).

        Raises:
            InvalidError: a plan whose key is not its blob-chain ID, or an unknown parent.
        """
        with self.core.timed("pull_records"):
            resolved: dict[str, str] = dict(m.known)
            chains, todo = self._plan_chains(m.plans, resolved)
            # Every index lookup of the batch in one read transaction.
            found_ids = self.core.store.search_ids(
                [INDEX_BLOB_CHAIN + p.key for p in todo]
                + [INDEX_CHAIN + chains[p.key] for p in todo]
            )
            creates: list[tuple[str, RecordKind, tuple[str, ...], dict[str, Any]]] = []
            for p in todo:
                found = self._first_usable(found_ids[INDEX_BLOB_CHAIN + p.key], m.handlers)
                if found is not None:
                    resolved[p.key] = found.id
                    continue
                cid = chains[p.key]
                linked = self._first_usable(found_ids[INDEX_CHAIN + cid], m.handlers)
                record_id = new_id()
                resolved[p.key] = record_id
                parents: tuple[str, ...] = (resolved[p.parent],) if p.parent else ()
                kind: RecordKind = "layer" if parents else "base"
                values = blob_record_values(
                    p.desc,
                    p.diff_id,
                    cid,
                    p.key,
                    linked.snapshot_id if linked else cid,
                    kind,
                    parents,
                    created_at=p.created_at,
                    description=p.description,
                    record_type=p.record_type,
                )
                creates.append((record_id, kind, parents, values))
            self._create(creates)
            grants = {}
            for key in m.want:
                rid = resolved.get(key)
                if rid is not None:
                    grants[key] = self.table.acquire(self.table.entries[rid], True)
            return PulledRecords({p.key: resolved[p.key] for p in m.plans}, grants)

    def _plan_chains(
        self, plans: Iterable[BlobRecordPlan], resolved: Mapping[str, str]
    ) -> tuple[dict[str, str], list[BlobRecordPlan]]:
        """The chain ID of each plan not resolved yet (``key -> chain ID``), and those plans.

        Pure but for the chain IDs of parents resolved by earlier batches.
        """
        chains: dict[str, str] = {}
        todo: list[BlobRecordPlan] = []
        for p in plans:
            if p.key in resolved or p.key in chains:
                continue
            parent_cid = ""
            if p.parent:
                parent_cid = chains.get(p.parent, "")
                if not parent_cid:
                    if p.parent not in resolved:
                        msg = f"pull: parent {p.parent} of layer {p.desc.digest} is unknown"
                        raise InvalidError(msg)
                    parent_cid = self.table.entry(resolved[p.parent]).chain_id
            own = chain_id(p.desc.digest, p.diff_id)
            bcid = chain_id(p.parent, own) if p.parent else own
            if bcid != p.key:
                msg = f"pull: layer {p.desc.digest} has blob-chain ID {bcid}, not {p.key}"
                raise InvalidError(msg)
            chains[p.key] = chain_id(parent_cid, p.diff_id) if parent_cid else p.diff_id
            todo.append(p)
        return chains, todo

    # -- what blob work asks --------------------------------------------------------------------

    @handles(NodeOf)
    def _node(self, m: NodeOf) -> BlobNode:
        e = self.table.entry(m.record_id)
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

    @handles(ExtractPlanOf)
    def _extract_plan(self, m: ExtractPlanOf) -> ExtractPlan | None:
        """How to materialise a merge or diff: its layers' diffs, merged (BuildKit
        ``unlazyDiffMerge``); None for a layer."""
        e = self.table.entry(m.record_id)
        if e.kind not in ("merge", "diff"):
            return None
        entries = self.table.entries
        diffs: list[tuple[str, str]] = []
        deps: list[str] = []

        def sid(rid: str) -> str:
            return entries[rid].snapshot_id if rid else ""

        for layer in (entries[lid] for lid in layer_walk(entries, e.id)):
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
        return ExtractPlan(e.snapshot_id, tuple(dict.fromkeys(deps)), tuple(diffs))

    @handles(Poisoned)
    def _poisoned(self, m: Poisoned) -> bool:
        """The record's blob does not have the diffID the record claims (found by an apply
        or a conversion): the record may never be found by chain ID, lend or take a
        snapshot, or be exported again. Its chain IDs and their index entries go.

        Returns whether the blob should leave the content store too: yes, unless another
        live record claims the diffID the blob really has (for that record it is honest).
        """
        entries = self.table.entries
        e = entries.get(m.record_id)
        if e is None:
            return True
        e.poisoned = True
        if e.chain_id or e.blob_chain_id:
            item = self.core.store.get(m.record_id)
            # None deletes the value and its chainid:/blobchainid: index entry.
            item.queue_many({KEY_CHAIN_ID: None, KEY_BLOB_CHAIN_ID: None})
            item.commit()
            e.chain_id = e.blob_chain_id = ""
        return not any(
            o.blob == e.blob and o.diff_id == m.actual_diff_id and not o.poisoned and not o.dead
            for o in entries.values()
            if o is not e
        )

    @handles(SizeInputs)
    def _size_inputs(self, m: SizeInputs) -> tuple[str, bool]:
        e = self.table.entry(m.record_id)
        return e.blob, e.blob_only

    @handles(ResetSize)
    def _reset_size(self, m: ResetSize) -> None:
        e = self.table.entries.get(m.record_id)
        if e is not None:
            self.table.reset_size(e)

    @handles(Extracted)
    def _extracted(self, m: Extracted) -> None:
        """A blob-only record's snapshot was extracted (BuildKit ``unlazyLayer``'s end)."""
        e = self.table.entries.get(m.record_id)
        if e is None or e.dead:
            return
        if e.blob_only:
            self.core.store.get(m.record_id).set(KEY_BLOB_ONLY, False)
            self.table.no_longer_blob_only(e)
        self.table.reset_size(e)

    @handles(SetBlob)
    def _set_blob(self, m: SetBlob) -> bool:
        """BuildKit ``setBlob`` (the table part): returns whether the blob was set.

        The record must be finalized (the caller did it). A record with a blob keeps it.
        """
        record_id, desc = m.record_id, m.desc
        e = self.table.entry(record_id)
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

    @handles(ChainMetadata)
    def _chain_metadata(self, m: ChainMetadata) -> None:
        """BuildKit ``computeChainMetadata`` for one record (parents computed before)."""
        e = self.table.entry(m.record_id)
        if e.poisoned:
            msg = (
                f"record {m.record_id} was quarantined: its blob {e.blob} does not have the "
                f"diffID {e.diff_id} it claims"
            )
            raise InvalidError(msg)
        if e.chain_id:
            return
        ids = self._chain_ids(e, m.layers)
        if ids is None:
            return
        cid, bcid = ids
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
        item = self.core.store.get(m.record_id)
        item.queue_many(values, indexes)
        item.commit()
        e.chain_id, e.blob_chain_id = cid, bcid

    def _chain_ids(self, e: RecordEntry, layers: frozenset[str]) -> tuple[str, str] | None:
        """``(chain ID, blob-chain ID)`` of ``e`` over ``layers``; None: not enough is known
        (a layer outside the filter)."""
        table = self.table
        if e.kind == "base":
            if e.id not in layers:
                return None
            return e.diff_id, chain_id(e.blob, e.diff_id)
        if e.kind == "layer":
            if e.id not in layers:
                return None
            cid = bcid = ""
            p = table.entry(e.parents[0])
            if p.id in layers:
                if not p.chain_id or not p.blob_chain_id:
                    msg = (
                        f"failed to set chain for record {e.id!r} with non-addressable "
                        f"parent {p.id!r}"
                    )
                    raise FailedPreconditionError(msg)
                cid, bcid = p.chain_id, p.blob_chain_id
            return chain_id(cid, e.diff_id), chain_id(bcid, chain_id(e.blob, e.diff_id))
        if e.kind == "merge":
            base = table.entry(e.parents[0])
            if base.id not in layers:
                return None  # not enough information at this time
            cid, bcid = base.chain_id, base.blob_chain_id
            for other in e.parents[1:]:
                table.entry(other)
                for lid in layer_walk(table.entries, other):
                    if lid not in layers:
                        return None
                    layer = table.entries[lid]
                    cid = chain_id(cid, layer.diff_id)
                    bcid = chain_id(bcid, chain_id(layer.blob, layer.diff_id))
            return cid, bcid
        if e.id in layers:  # a diff that is its own blob
            return e.diff_id, chain_id(e.blob, e.diff_id)
        up = table.entry(e.parents[1])  # a diff re-using its upper's blob
        return up.chain_id, up.blob_chain_id


def _addressable(parent: RecordEntry) -> None:
    if not parent.chain_id or not parent.blob_chain_id:
        msg = (
            f"failed to get ref by blob on non-addressable parent {parent.id!r} "
            "(it has no chain IDs: set its blob first)"
        )
        raise InvalidError(msg)
