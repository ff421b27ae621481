"""Slow record work in the caller's thread: finalize, blob chains, compressions, remotes.

BuildKit ``cache/blobs.go`` (``computeBlobChain``, ``setBlob``, ``computeChainMetadata``,
``ensureCompression``), ``cache/remote.go`` (``GetRemotes``) and ``FileList``, plus the
equal-pair ``finalize``. Every function here runs in the thread of the caller that asked
(a handle method or an I/O-executor job), never in an actor handler (DESIGN.md rule 3); the
manager is asked for plans and told the outcome with short messages.

Single flights (``core.flights``), as BuildKit's ``flightcontrol`` groups:

* ``<id>-blob-<create>``: one blob computation per record (the differ runs once even when
  several compressions are asked for at the same time; the others convert from it);
* ``ensure-<id>-<compression>``: one conversion per record and compression;
* ``filelist-<id>``: one file-list computation per record.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from ..storage import (
    EXTERNAL_FILELIST,
    KEY_EQUAL_MUTABLE,
    AlreadyExistsError,
    Descriptor,
    DiffIDMismatchError,
    InvalidError,
    Mount,
    NotFoundError,
    RefcacheError,
    Resource,
    check_compression,
    decompressed_stream,
    detect_compression,
    frozen_map,
)
from ._blobs import (
    BlobLease,
    BlobNode,
    blob_with_compression,
    convert_blob,
    ensure_blob,
    is_lazy,
    leased_snapshot,
    link_blob,
    node_of,
    oci_desc,
    quarantine,
    refuse_poisoned,
    tar_names,
    unlazy,
    walk_blob,
    write_layer,
)
from ._core import CacheCore, get_result
from ._mediatypes import diff_id_of, needs_conversion
from ._messages import ChainMetadata, FinalizeBegin, FinalizeEnd, LayerChain, SetBlob
from ._protocol import Await
from ._types import DescHandler, Remote

__all__ = [
    "compute_blob_chain",
    "compute_chain_metadata",
    "ensure_compression",
    "file_list",
    "finalize_record",
    "get_remotes",
    "set_blob",
]

_EMPTY: Mapping[str, DescHandler] = frozen_map(None)


# -- finalize -------------------------------------------------------------------------------


def finalize_record(core: CacheCore, record_id: str) -> None:
    """Finalizes an equal pair: commit the mutable's snapshot to the immutable's (BuildKit).

    The manager marks the mutable dead first (so nobody can take it meanwhile) and hands out
    a plan; the snapshot commit and the lease run here; the manager then removes the mutable.
    Concurrent callers share one finalize (the manager returns the same future).
    """
    plan = core.ask_manager(FinalizeBegin(record_id))
    if plan is None:
        return
    if isinstance(plan, Await):
        get_result(plan.future, core.timeout, f"finalize of {record_id!r}")
        return
    snapshot_id, mutable_snapshot_id = plan.snapshot_id, plan.mutable_snapshot_id
    error: BaseException | None = None
    created = False
    try:
        _check_layer_dir(core, record_id, mutable_snapshot_id)
        # BuildKit's order: lease first (GC must never see the snapshot unheld), then the
        # snapshot commit (outside any metadata transaction: it walks the tree for usage),
        # then the metadata. A crash between the last two is the half-finalized pair that
        # loading recovers (TestLoadHalfFinalizedRef).
        with core.env.write_txn() as txn:
            with contextlib.suppress(AlreadyExistsError):
                core.leases.create(record_id, flat=True, txn=txn)
                created = True
            core.leases.add_resource(
                record_id, Resource(snapshot_id, f"snapshots/{core.snapshotter.name}"), txn=txn
            )
        try:
            core.snapshotter.commit(snapshot_id, mutable_snapshot_id)
        except BaseException:
            if created:
                # BuildKit deletes the lease when the commit fails: it holds a snapshot
                # that does not exist, and nothing else would ever delete it.
                with contextlib.suppress(RefcacheError):
                    core.leases.delete(record_id)
            raise
        core.store.get(record_id).set(KEY_EQUAL_MUTABLE, None)
    except BaseException as exc:
        error = exc
    core.ask_manager(FinalizeEnd(record_id, error))
    if error is not None:
        raise error


def _check_layer_dir(core: CacheCore, record_id: str, snapshot_id: str) -> None:
    """Raises :class:`NotFoundError` when the active snapshot's directory is gone.

    A directory removed behind the cache's back would be committed as an empty snapshot
    (the commit measures what is there): finalize refuses instead, and the pair stays.
    """
    layer = core.snapshotter.path(snapshot_id)
    if not layer.is_dir():
        msg = (
            f"cannot commit the snapshot of record {record_id!r}: the directory {layer} of "
            f"its mutable snapshot {snapshot_id!r} is missing"
        )
        raise NotFoundError(msg)


# -- setBlob / computeChainMetadata ---------------------------------------------------------


def set_blob(core: CacheCore, record_id: str, desc: Descriptor) -> None:
    """BuildKit ``setBlob``: associate the blob ``desc`` with a committed record.

    The record is finalized first; the blob joins the record's ``<id>`` lease in the
    transaction that writes diffID, blob, media type, blob size and URLs. A record that has a
    blob already keeps it (first wins). Either way ``desc`` is then linked as a variant of
    the record's blob (BuildKit's deferred ``linkBlob``). Chain IDs are separate:
    :func:`compute_chain_metadata`.

    Raises:
        InvalidError: ``desc`` has no valid diffID, or the record is mutable.
        NotFoundError: the blob is not in the content store, or the record is gone.
    """
    if not isinstance(desc, Descriptor):
        msg = f"set_blob needs a Descriptor, not {type(desc).__name__}"
        raise InvalidError(msg)
    diff_id_of(desc)
    core.content.info(desc.digest)
    finalize_record(core, record_id)
    core.ask_manager(SetBlob(record_id, desc))
    node = node_of(core, record_id)
    link_blob(core, record_id, node.blob, desc)


def compute_chain_metadata(core: CacheCore, record_id: str, layers: Iterable[str]) -> None:
    """BuildKit ``computeChainMetadata``: chain IDs of a record whose layer blobs are set.

    ``layers`` is the filter (the ids of the layer chain being exported): layers outside it
    do not contribute. Writes ``cache.chainID`` and ``cache.blobChainID`` with their
    ``chainid:``/``blobchainid:`` index entries; a record that has them keeps them.
    """
    core.ask_manager(ChainMetadata(record_id, frozenset(layers)))


# -- blob chains ----------------------------------------------------------------------------


@contextmanager
def _snapshot_mounts(
    core: CacheCore, record_id: str, handlers: Mapping[str, DescHandler]
) -> Iterator[list[Mount]]:
    """Read-only mounts of a record's committed snapshot, for the differ.

    The record is extracted first; a temporary view (held by a temporary lease from before it
    exists) is removed afterwards.
    """
    unlazy(core, record_id, handlers)
    sid = node_of(core, record_id).snapshot_id
    token = uuid.uuid4().hex
    view = f"blobview-{token} {sid}"
    sn = core.snapshotter
    with leased_snapshot(core, f"blobview-{token}", view):
        mounts = sn.view(view, sid)
        try:
            yield mounts
        finally:
            with contextlib.suppress(RefcacheError):
                sn.remove(view)


def compute_blob_chain(
    core: CacheCore,
    record_id: str,
    *,
    create_if_needed: bool,
    compression: str,
    force: bool,
    handlers: Mapping[str, DescHandler] = _EMPTY,
) -> None:
    """BuildKit ``computeBlobChain``: every layer of the record's chain gets a blob.

    Missing blobs are computed with the differ (lower = the layer's parent or the diff's
    lower, upper = the layer or the diff's upper) in ``compression`` and set with
    :func:`set_blob`; with ``force`` every layer also gets a ``compression`` variant
    (:func:`ensure_compression`); then the chain IDs are computed, parents first.

    Raises:
        NotFoundError: a layer has no blob and ``create_if_needed`` is false (BuildKit
            ``ErrNoBlobs``).
    """
    check_compression(compression)
    if not create_if_needed and not node_of(core, record_id).finalized:
        return
    finalize_record(core, record_id)
    chain = core.ask_manager(LayerChain(record_id))
    _compute_blob_chain(
        core, record_id, create_if_needed, compression, force, handlers, frozenset(chain)
    )


def _compute_blob_chain(
    core: CacheCore,
    record_id: str,
    create: bool,
    compression: str,
    force: bool,
    handlers: Mapping[str, DescHandler],
    layers: frozenset[str],
) -> None:
    # Iterative post-order over the parent graph (chains can be long): a record's chain
    # metadata needs its parents' first.
    order: list[BlobNode] = []
    seen: set[str] = set()
    stack: list[tuple[str, bool]] = [(record_id, False)]
    while stack:
        rid, expanded = stack.pop()
        if expanded:
            order.append(node_of(core, rid))
            continue
        if rid in seen:
            continue
        seen.add(rid)
        node = node_of(core, rid)
        stack.append((rid, True))
        nexts: list[str] = []
        if node.kind == "merge":
            nexts = list(node.parents)
        elif node.kind == "diff":
            if rid not in layers and node.parents[1]:
                nexts = [node.parents[1]]  # this diff re-uses its upper's blob
        elif node.kind == "layer":
            nexts = [node.parents[0]]
        stack.extend((p, False) for p in reversed(nexts) if p not in seen)
    for node in order:
        if node.id in layers:
            _ensure_record_blob(core, node, create, compression, handlers)
            if force:
                ensure_compression(core, node.id, compression, handlers)
        compute_chain_metadata(core, node.id, layers)


def _ensure_record_blob(
    core: CacheCore,
    node: BlobNode,
    create: bool,
    compression: str,
    handlers: Mapping[str, DescHandler],
) -> None:
    def compute() -> None:
        current = node_of(core, node.id)
        if current.blob:
            return
        if not create:
            msg = f"no blobs for snapshot of record {node.id} (and creating them was not asked)"
            raise NotFoundError(msg)
        lower_id, upper_id = "", node.id
        if current.kind == "diff":
            lower_id, upper_id = current.parents
        elif current.kind == "layer":
            lower_id = current.parents[0]
        with contextlib.ExitStack() as stack:
            lower: list[Mount] = []
            upper: list[Mount] | None = None
            if lower_id:
                lower = stack.enter_context(_snapshot_mounts(core, lower_id, handlers))
            if upper_id:
                upper = stack.enter_context(_snapshot_mounts(core, upper_id, handlers))
            lease = BlobLease(core.env, core.leases, node.id)
            desc = write_layer(
                core.content, lower, upper, compression, lease=lease, mount_root=core.mount_root
            )
        set_blob(core, node.id, desc)

    core.flights.do(f"{node.id}-blob-{create}", compute, timeout=core.timeout)


def ensure_compression(
    core: CacheCore,
    record_id: str,
    compression: str,
    handlers: Mapping[str, DescHandler] = _EMPTY,
) -> None:
    """BuildKit ``ensureCompression``: the record's blob gets a ``compression`` variant.

    A blob that already is one is linked to itself (or left alone while lazy); an existing
    variant is reused; otherwise the blob is fetched if lazy and converted, and the result
    linked (held by ``<id>-variants`` from its commit on).
    """
    check_compression(compression)

    def ensure() -> None:
        node = node_of(core, record_id)
        refuse_poisoned(node)
        desc = oci_desc(core, node, handlers, prefer_non_dist=True)
        if not needs_conversion(desc, compression):
            if is_lazy(core, node):
                return  # usable as this compression as it is: keep it lazy
            link_blob(core, node.id, node.blob, desc)
            return
        with contextlib.suppress(NotFoundError):
            blob_with_compression_of(core, node, compression)
            return
        ensure_blob(core, node, desc, handlers.get(desc.digest))
        lease = BlobLease(core.env, core.leases, node.id + "-variants", create=True)
        try:
            new = convert_blob(core.content, desc, compression, lease=lease)
        except DiffIDMismatchError as exc:
            # The conversion found what an apply would: the blob lies about its diffID.
            quarantine(core, node, exc)
            raise
        link_blob(core, node.id, node.blob, new)

    core.flights.do(f"ensure-{record_id}-{compression}", ensure, timeout=core.timeout)


def blob_with_compression_of(core: CacheCore, node: BlobNode, compression: str) -> Descriptor:
    """BuildKit ``immutableRef.getBlobWithCompression``: the record's blob or a variant in
    ``compression``.

    Raises:
        NotFoundError: the blob is not local (lazy), or there is no such variant.
    """
    if not node.blob:
        msg = f"no blob set for cache record {node.id}"
        raise NotFoundError(msg)
    core.content.info(node.blob)  # a lazy blob has no variants to look at yet
    desc = oci_desc(core, node, prefer_non_dist=True)
    return blob_with_compression(core.content, desc, compression)


# -- remotes --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _LazyBlob:
    node: BlobNode
    desc: Descriptor
    handler: DescHandler | None


@dataclass(frozen=True, slots=True)
class RemoteProvider:
    """Reads a remote's blobs from the content store, fetching lazy ones first
    (BuildKit ``lazyMultiProvider``: a descriptor of a lazy layer is pulled on first read)."""

    core: CacheCore
    lazy: Mapping[str, _LazyBlob]

    def __call__(self, desc: Descriptor) -> BinaryIO:
        """Opens blob ``desc`` for reading (the caller closes it).

        Raises:
            NotFoundError: the blob is not local and not a lazy layer of this remote.
        """
        digest = desc.digest if isinstance(desc, Descriptor) else desc
        entry = self.lazy.get(digest)
        if entry is not None:
            ensure_blob(self.core, entry.node, entry.desc, entry.handler)
        return self.core.content.reader_at(digest)


def _detect_media_type(core: CacheCore, digest: str) -> str:
    with core.content.reader_at(digest) as f:
        head = f.read(4)
    return {
        "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
        "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    }.get(detect_compression(head), "application/vnd.oci.image.layer.v1.tar")


def _main_remote(
    core: CacheCore,
    record_id: str,
    *,
    create_if_needed: bool,
    compression: str,
    force: bool,
    prefer_non_dist: bool,
    handlers: Mapping[str, DescHandler],
) -> Remote:
    # BuildKit getRemote.
    compute_blob_chain(
        core,
        record_id,
        create_if_needed=create_if_needed,
        compression=compression,
        force=force,
        handlers=handlers,
    )
    chain = core.ask_manager(LayerChain(record_id))
    descs: list[Descriptor] = []
    lazy: dict[str, _LazyBlob] = {}
    for rid in chain:
        node = node_of(core, rid)
        desc = oci_desc(core, node, handlers, prefer_non_dist=prefer_non_dist)
        if not desc.media_type:
            # Records from before media types were stored: sniff the blob.
            desc = Descriptor(
                _detect_media_type(core, desc.digest),
                desc.digest,
                desc.size,
                desc.annotations,
                desc.urls,
            )
        if force and needs_conversion(desc, compression):
            try:
                blob = blob_with_compression_of(core, node, compression)
            except NotFoundError:
                ensure_compression(core, rid, compression, handlers)
                blob = blob_with_compression_of(core, node_of(core, rid), compression)
            desc = Descriptor(
                blob.media_type, blob.digest, blob.size, dict(blob.annotations), blob.urls
            )
        descs.append(desc)
        lazy[desc.digest] = _LazyBlob(node, desc, handlers.get(desc.digest))
    return Remote(tuple(descs), RemoteProvider(core, frozen_map(lazy)))


def _available_blobs(core: CacheCore, chain: Sequence[Descriptor]) -> list[tuple[Descriptor, ...]]:
    """BuildKit ``getAvailableBlobs``: every combination of the chain's known variants."""
    if not chain:
        return []
    target = chain[-1]
    parents = _available_blobs(core, chain[:-1])
    descs: list[Descriptor] = []

    def collect(d: Descriptor) -> bool:
        descs.append(d)
        return True

    walk_blob(core.content, target, collect)
    out: list[tuple[Descriptor, ...]] = []
    for d in descs:
        if not parents:
            out.append((d,))
        else:
            out.extend((*p, d) for p in parents)
    if not out:
        return [(target,)] if not parents else [(*p, target) for p in parents]
    return out


def get_remotes(
    core: CacheCore,
    record_id: str,
    *,
    compression: str = "gzip",
    create_if_needed: bool = True,
    all: bool = False,
    force: bool = False,
    prefer_non_dist: bool = False,
    handlers: Mapping[str, DescHandler] = _EMPTY,
) -> list[Remote]:
    """BuildKit ``GetRemotes``: the record's layer descriptors, creating blobs if needed.

    ``compression`` applies to newly created layers, and with ``force`` to every layer
    (converted variants, keeping the diffID). With ``all`` (and not ``force``), the result
    continues with every remote whose topmost blob is a ``compression`` variant, over every
    combination of the lower layers' known variants. Each :class:`Remote`'s provider reads
    from the content store (pulling a lazy layer on first read).
    """
    check_compression(compression)
    main = _main_remote(
        core,
        record_id,
        create_if_needed=create_if_needed,
        compression=compression,
        force=force,
        prefer_non_dist=prefer_non_dist,
        handlers=handlers,
    )
    if not all or force or not main.descriptors:
        return [main]
    out = [main]
    topmost = main.descriptors[-1]
    try:
        variant = blob_with_compression(core.content, topmost, compression)
    except NotFoundError:
        return out  # no such variant: the main remote only
    parents = _available_blobs(core, main.descriptors[:-1])
    provider = main.provider
    if not parents:
        out.append(Remote((variant,), provider))
    else:
        out.extend(Remote((*p, variant), provider) for p in parents)
    return out


# -- file list ------------------------------------------------------------------------------


def file_list(
    core: CacheCore, record_id: str, handlers: Mapping[str, DescHandler] = _EMPTY
) -> list[str]:
    """BuildKit ``FileList``: sorted paths in the record's layer tarball (whiteouts as they
    are), cached as the external value ``filelist`` (JSON); ``[]`` without a blob.

    A lazy blob is fetched first (BuildKit extracts the record; reading the tar only needs
    the blob).
    """

    def compute() -> list[str]:
        item = core.store.get(record_id)
        with contextlib.suppress(NotFoundError):
            cached = json.loads(item.get_external(EXTERNAL_FILELIST))
            if isinstance(cached, list) and all(isinstance(x, str) for x in cached):
                return cached
        node = node_of(core, record_id)
        if not node.blob:
            return []
        desc = oci_desc(core, node, handlers, prefer_non_dist=False)
        ensure_blob(core, node, desc, handlers.get(desc.digest))
        with core.content.reader_at(node.blob) as source:
            stream = decompressed_stream(source)
            try:
                names = tar_names(stream)
            finally:
                stream.close()
        item.set_external(EXTERNAL_FILELIST, json.dumps(names).encode())
        return names

    result: list[str] = core.flights.do(f"filelist-{record_id}", compute, timeout=core.timeout)
    return list(result)
