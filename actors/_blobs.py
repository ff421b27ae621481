"""Layer blobs of records: descriptors, variants, fetches, conversions, extraction, sizes.

The blob half of BuildKit's ``cache/refs.go`` and ``cache/blobs.go``, as functions that run in
the *calling* thread (DESIGN.md rule 3: never inside an actor handler). They talk to the
manager only through short typed asks (``NodeOf``, ``Extracted``, ``ResetSize``, ...) and do
the slow work here: fetching a lazy blob from its descriptor handler, applying it into a snapshot,
converting between compressions, walking variant labels for sizes.

Concepts (BuildKit names in parentheses):

* A record's *blob* is a layer tarball in the content store (``cache.blob``). A record is
  *blob-only* (``cache.blobonly``) until its snapshot has been extracted by it, and *lazy*
  (``isLazy``) while blob-only and its blob is not in the content store: then only a
  :class:`~actors._types.DescHandler` can fetch it.
* Compression *variants* of a blob are other blobs with the same diffID, linked both ways by
  ``containerd.io/gc.ref.content.blob-<digest>`` labels (``linkBlob``) and held by the
  record's ``<id>-variants`` lease (not flat, so the collector follows the labels). The
  variant's media type and saved annotations are stored as ``buildkit.io/blob/*`` labels so a
  descriptor can be rebuilt from the content store alone (``getBlobDesc``).
* Single flights (``core.flights``): ``<id>-unlazy`` per record (extraction),
  ``fetch-<digest>`` per blob (one provider call per digest, whatever the number of records
  and callers), plus the blob-chain and compression flights of :mod:`actors._remote`.

Leases, so that the collector never sees an object unheld: a fetched blob is already a
resource of the record's flat ``<id>`` lease (added by ``get_by_blob``); a converted or
computed blob is committed in the same transaction that adds it to its lease
(:class:`BlobLease`); an extraction's temporary snapshot is added to a temporary lease before
it is prepared, and the committed snapshot is a resource of ``<id>`` already.

estargz (and the stargz/overlaybd remote snapshotters) are out of scope: compressions are
``uncompressed``, ``gzip`` and ``zstd``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import posixpath
import tarfile
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from ..storage import (
    ANNOTATION_UNCOMPRESSED,
    KEY_BLOB_SIZE,
    KEY_CREATED_AT,
    KEY_LAYER_URLS,
    RESOURCE_CONTENT,
    AlreadyExistsError,
    ContentInfo,
    CorruptMetadataError,
    Descriptor,
    DiffIDMismatchError,
    FailedPreconditionError,
    InvalidError,
    LayerBlobWriter,
    LmdbLeaseManager,
    LocalContentStore,
    MetaEnv,
    Mount,
    NeedsRemoteProviderError,
    NotFoundError,
    RefcacheError,
    Resource,
    WriteTxn,
    check_compression,
    decompressed_stream,
    format_rfc3339_ns,
    frozen_map,
    local_mount,
    validate_digest,
    write_diff,
)
from ._core import CacheCore, get_result
from ._mediatypes import (
    chain_id,
    compression_media_type,
    diff_id_of,
    filter_annotations_for_save,
    needs_conversion,
    to_distributable,
    to_non_distributable,
)
from ._messages import BlobNode, Extracted, ExtractPlanOf, NodeOf, Poisoned, ResetSize
from ._types import DescHandler

__all__ = [
    "ANNOTATION_CREATED_AT",
    "BLOB_ANNOTATION_PREFIX",
    "BLOB_MEDIA_TYPE_LABEL",
    "GC_VARIANT_LABEL",
    "BlobLease",
    "BlobNode",
    "blob_desc",
    "blob_with_compression",
    "check_handlers",
    "convert_blob",
    "ensure_blob",
    "extract_record",
    "is_lazy",
    "leased_snapshot",
    "link_blob",
    "measure_record",
    "oci_desc",
    "quarantine",
    "refuse_poisoned",
    "snapshot_usage",
    "unlazy",
    "walk_blob",
    "walk_blob_variants",
    "write_layer",
    # defined in storage and _mediatypes; the record layer imports them from here
    "chain_id",
    "check_compression",
    "diff_id_of",
]

logger = logging.getLogger(__name__)

#: Label linking a blob to a compression variant (value: the variant's digest).
GC_VARIANT_LABEL: Final = "containerd.io/gc.ref.content.blob-"
#: Content label holding a blob's media type (BuildKit ``blobMediaTypeLabel``).
BLOB_MEDIA_TYPE_LABEL: Final = "buildkit.io/blob/mediatype"
#: Prefix of content labels holding a blob's saved annotations.
BLOB_ANNOTATION_PREFIX: Final = "buildkit.io/blob/annotation."
#: Descriptor annotation carrying a record's creation time (RFC 3339, nanoseconds).
ANNOTATION_CREATED_AT: Final = "buildkit/createdat"

_CHUNK: Final = 1 << 20
_EMPTY: Final[Mapping[str, DescHandler]] = frozen_map(None)


def check_handlers(value: object, *, what: str = "desc_handlers") -> Mapping[str, DescHandler]:
    """Validates a ``digest -> DescHandler`` mapping; returns a read-only copy.

    Raises:
        InvalidError: not a mapping, a key that is not a digest, or a value that is not a
            :class:`DescHandler` with a callable provider.
    """
    if value is None:
        return _EMPTY
    if not isinstance(value, Mapping):
        msg = f"{what} must be a mapping of digest to DescHandler, not {type(value).__name__}"
        raise InvalidError(msg)
    for key, handler in value.items():
        validate_digest(key, what=f"{what} key")
        if not isinstance(handler, DescHandler) or not callable(handler.provider):
            msg = f"{what}[{key!r}] must be a DescHandler with a callable provider: {handler!r}"
            raise InvalidError(msg)
    return frozen_map(value)


def merge_handlers(*maps: Mapping[str, DescHandler]) -> Mapping[str, DescHandler]:
    """Union of handler maps (later ones win); shares the input when only one (or one and
    the same object) is non-empty."""
    present = [m for m in maps if m]
    if not present:
        return _EMPTY
    if all(m is present[0] for m in present):
        # Handles of one pulled source share one map: no copy per child or merge.
        return present[0]
    out: dict[str, DescHandler] = {}
    for m in present:
        out.update(m)
    return frozen_map(out)


# -- records as the blob code sees them -----------------------------------------------------


def node_of(core: CacheCore, record_id: str) -> BlobNode:
    """Asks the manager for ``record_id``'s current :class:`BlobNode`."""
    return core.ask_manager(NodeOf(record_id))


def is_lazy(core: CacheCore, node: BlobNode) -> bool:
    """BuildKit ``isLazy``: blob-only with a blob that is not in the content store.

    (The remote-snapshot case, a ``containerd.io/snapshot/remote`` label, cannot arise: there
    is no remote snapshotter here.)
    """
    return node.blob_only and bool(node.blob) and not core.content.exists(node.blob)


def oci_desc(
    core: CacheCore,
    node: BlobNode,
    handlers: Mapping[str, DescHandler] = _EMPTY,
    *,
    prefer_non_dist: bool = True,
) -> Descriptor:
    """BuildKit ``ociDesc``: the record's blob as an OCI descriptor.

    Media type: non-distributable with the record's URLs when ``prefer_non_dist`` and there
    are URLs, distributable otherwise. Annotations: the blob's saved ones from the content
    store, else the handler's (filtered); plus the diffID and ``buildkit/createdat``.

    Raises:
        NotFoundError: the record has no blob.
    """
    if not node.blob:
        msg = f"no blob set for cache record {node.id}"
        raise NotFoundError(msg)
    item = core.store.get(node.id)
    try:
        size = item.get_int(KEY_BLOB_SIZE, -1)
        urls = tuple(item.get_str_list(KEY_LAYER_URLS))
        created_at = item.get_int(KEY_CREATED_AT)
    except CorruptMetadataError as exc:
        msg = f"blob metadata of record {node.id} is corrupt: {exc}"
        raise RefcacheError(msg) from exc
    media_type = node.media_type
    desc_urls: tuple[str, ...] = ()
    if prefer_non_dist and urls:
        # Not the stored media type: it may have been stored as distributable.
        media_type = to_non_distributable(media_type)
        desc_urls = urls
    if not desc_urls:
        media_type = to_distributable(media_type)
    annotations: dict[str, str] = {}
    try:
        stored = blob_desc(core.content, node.blob)
        annotations.update(stored.annotations)
    except NotFoundError:
        handler = handlers.get(node.blob)
        if handler is not None:
            annotations.update(filter_annotations_for_save(handler.annotations))
    if node.diff_id:
        annotations[ANNOTATION_UNCOMPRESSED] = node.diff_id
    if created_at:
        annotations[ANNOTATION_CREATED_AT] = format_rfc3339_ns(created_at)
    return Descriptor(media_type, node.blob, max(size, -1), annotations, desc_urls)


# -- variants -------------------------------------------------------------------------------


def blob_desc(content: LocalContentStore, digest: str) -> Descriptor:
    """BuildKit ``getBlobDesc``: a descriptor rebuilt from a blob's content labels.

    Raises:
        NotFoundError: no such blob, or no media type stored for it.
    """
    info = content.info(digest)
    media_type = info.labels.get(BLOB_MEDIA_TYPE_LABEL)
    if media_type is None:
        msg = f"no media type is stored for blob {digest}"
        raise NotFoundError(msg)
    annotations = {
        k[len(BLOB_ANNOTATION_PREFIX) :]: v
        for k, v in info.labels.items()
        if k.startswith(BLOB_ANNOTATION_PREFIX)
    }
    # Without URLs there is no reason for a layer to be non-distributable.
    return Descriptor(to_distributable(media_type), digest, info.size, annotations)


def walk_blob_variants(
    content: LocalContentStore, digest: str, fn: Callable[[Descriptor], bool]
) -> bool:
    """BuildKit ``walkBlobVariantsOnly``: calls ``fn`` on each variant reachable from
    ``digest`` through ``blob-*`` labels (not on ``digest`` itself), depth first.

    Each blob is expanded once, so label cycles end the walk (``fn`` may still see a digest
    twice when two blobs name it). Variants without stored descriptor metadata are followed
    but not reported. Returns ``False`` when ``fn`` stopped the walk.
    """
    visited: set[str] = set()
    stack = [digest]
    while stack:
        current = stack.pop()
        if current in visited:
            continue
        visited.add(current)
        try:
            info = content.info(current)
        except NotFoundError:
            continue
        children: list[str] = []
        for key in sorted(info.labels):
            if not key.startswith(GC_VARIANT_LABEL):
                continue
            child = info.labels[key]
            if child == current:
                continue
            try:
                validate_digest(child)
            except InvalidError:
                continue
            try:
                child_desc = blob_desc(content, child)
            except NotFoundError:
                child_desc = None
            if child_desc is not None and not fn(child_desc):
                return False
            children.append(child)
        stack.extend(reversed([c for c in children if c not in visited]))
    return True


def walk_blob(
    content: LocalContentStore, desc: Descriptor, fn: Callable[[Descriptor], bool]
) -> None:
    """BuildKit ``walkBlob``: ``fn(desc)``, then every variant of it."""
    if fn(desc):
        walk_blob_variants(content, desc.digest, fn)


def blob_with_compression(
    content: LocalContentStore, desc: Descriptor, compression: str
) -> Descriptor:
    """BuildKit ``getBlobWithCompression``: ``desc`` or a variant that is a ``compression``
    layer.

    Raises:
        NotFoundError: there is none.
    """
    found: list[Descriptor] = []

    def match(d: Descriptor) -> bool:
        if not needs_conversion(d, compression):
            found.append(d)
            return False
        return True

    walk_blob(content, desc, match)
    if not found:
        msg = f"no {compression} variant of blob {desc.digest}"
        raise NotFoundError(msg)
    return found[0]


def link_blob(core: CacheCore, record_id: str, blob: str, desc: Descriptor) -> None:
    """BuildKit ``linkBlob``: make ``desc`` a compression variant of the record's blob.

    In one transaction: ``desc`` joins the record's ``<id>-variants`` lease (created, not
    flat, so the collector follows the labels), it gets a ``blob-<blob>`` label plus its
    media type and saved annotations (once), and the record's blob gets ``blob-<desc>``.
    The record's cached size becomes unknown (a new variant counts).

    Raises:
        NotFoundError: the record's blob or ``desc`` is not in the content store.
    """
    content, leases = core.content, core.leases
    variants = record_id + "-variants"
    with core.env.write_txn() as txn:
        content.info(blob, txn=txn)
        with contextlib.suppress(AlreadyExistsError):
            leases.create(variants, txn=txn)
        leases.add_resource(variants, Resource(desc.digest, RESOURCE_CONTENT), txn=txn)
        variant = content.info(desc.digest, txn=txn)
        labels = {GC_VARIANT_LABEL + blob: blob}
        if BLOB_MEDIA_TYPE_LABEL not in variant.labels:
            labels[BLOB_MEDIA_TYPE_LABEL] = desc.media_type
            for k, v in filter_annotations_for_save(desc.annotations).items():
                labels[BLOB_ANNOTATION_PREFIX + k] = v
        content.update(
            ContentInfo(desc.digest, 0, labels), *(f"labels.{k}" for k in labels), txn=txn
        )
        if desc.digest != blob:
            key = GC_VARIANT_LABEL + desc.digest
            content.update(ContentInfo(blob, 0, {key: desc.digest}), f"labels.{key}", txn=txn)
    core.ask_manager(ResetSize(record_id))


# -- writing blobs --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlobLease:
    """A lease that takes a new blob in the transaction that commits it.

    Attributes:
        env: The metadata environment.
        leases: The lease manager.
        lease_id: The lease.
        create: Create the lease (not flat) when it does not exist (``<id>-variants``);
            otherwise a missing lease is an error (a record's ``<id>``).
    """

    env: MetaEnv
    leases: LmdbLeaseManager
    lease_id: str
    create: bool = False

    def hold(self, txn: WriteTxn, digest: str) -> None:
        """Adds blob ``digest`` to the lease inside ``txn``."""
        if self.create:
            with contextlib.suppress(AlreadyExistsError):
                self.leases.create(self.lease_id, txn=txn)
        self.leases.add_resource(self.lease_id, Resource(digest, RESOURCE_CONTENT), txn=txn)


def _write_blob_stream(
    content: LocalContentStore,
    produce: Callable[[BinaryIO], None],
    compression: str,
    lease: BlobLease | None,
    what: str,
    source: Descriptor | None = None,
) -> tuple[str, int, str]:
    """Streams ``produce``'s uncompressed bytes through ``compression`` into a new blob.

    Returns ``(digest, size, diffID)``. The blob carries the ``containerd.io/uncompressed``
    label; with ``lease`` it is committed in the transaction that leases it. On failure the
    ingest is removed. With ``source`` (a conversion), the diffID must be the one ``source``
    claims, or nothing is committed (:class:`DiffIDMismatchError`).
    """
    with LayerBlobWriter(content, compression, what=what) as blob:
        produce(blob.stream)
        digest, _size, diff_id = blob.finish()
        claimed = source.annotations.get(ANNOTATION_UNCOMPRESSED) if source else None
        if source is not None and claimed is not None and claimed != diff_id:
            raise DiffIDMismatchError(source.digest, claimed, diff_id)
        if lease is None:
            return blob.commit()
        with lease.env.write_txn() as txn:
            lease.hold(txn, digest)
            return blob.commit(txn=txn)


def convert_blob(
    content: LocalContentStore,
    desc: Descriptor,
    compression: str,
    *,
    lease: BlobLease | None = None,
) -> Descriptor:
    """BuildKit ``converter``: the layer ``desc`` recompressed as ``compression``.

    The blob is read from the content store, decompressed (by its magic bytes) and written
    again; the diffID stays, and the result carries ``containerd.io/uncompressed`` as label
    and annotation. A result that exists already is success. Call only when
    :func:`needs_conversion` says so (converting to the same compression re-encodes).

    Raises:
        DiffIDMismatchError: ``desc`` claims a diffID its content does not have; nothing is
            committed.
        InvalidError: unknown compression.
        NotFoundError: ``desc`` is not in the content store.
    """
    check_compression(compression)

    def produce(out: BinaryIO) -> None:
        with content.reader_at(desc.digest) as source:
            stream = decompressed_stream(source)
            try:
                while chunk := stream.read(_CHUNK):
                    out.write(chunk)
            finally:
                stream.close()

    digest, size, diff_id = _write_blob_stream(
        content, produce, compression, lease, "convert", source=desc
    )
    return Descriptor(
        compression_media_type(compression, desc.media_type),
        digest,
        size,
        {ANNOTATION_UNCOMPRESSED: diff_id},
    )


def write_layer(
    content: LocalContentStore,
    lower: Sequence[Mount],
    upper: Sequence[Mount] | None,
    compression: str,
    *,
    lease: BlobLease | None = None,
    mount_root: Path | None = None,
) -> Descriptor:
    """The walking differ (containerd ``walking.Compare``) with a leased commit.

    :class:`storage.WalkingDiffer` commits without a lease; here the blob joins ``lease`` in
    the committing transaction, as containerd does with the context's lease.

    Args:
        lower: Mounts of the base (empty: diff against an empty tree).
        upper: Mounts of the changed tree (``None``: an empty tree).
        compression: Compression of the blob.
        lease: Where the blob is held from its commit on.
        mount_root: Where temporary mount points go (``<cache root>/mounts``).

    Returns:
        The blob's descriptor with annotation ``containerd.io/uncompressed``.
    """
    check_compression(compression)
    with contextlib.ExitStack() as stack:
        lower_dir: Path | None = None
        if lower:
            lower_dir = stack.enter_context(
                local_mount(list(lower), readonly=True, tmp_root=mount_root)
            )
        if upper:
            upper_dir = stack.enter_context(
                local_mount(list(upper), readonly=True, tmp_root=mount_root)
            )
        else:
            upper_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))

        def produce(out: BinaryIO) -> None:
            write_diff(lower_dir, upper_dir, out)

        digest, size, diff_id = _write_blob_stream(content, produce, compression, lease, "diff")
    return Descriptor(
        compression_media_type(compression), digest, size, {ANNOTATION_UNCOMPRESSED: diff_id}
    )


# -- fetching -------------------------------------------------------------------------------


def ensure_blob(
    core: CacheCore, node: BlobNode, desc: Descriptor, handler: DescHandler | None
) -> bool:
    """BuildKit ``lazyRefProvider.Unlazy``: fetch a lazy record's blob, once per digest.

    Concurrent callers for the same digest share one provider call (``fetch-<digest>``). The
    blob is written with verification against ``desc`` (digest and size): short, corrupt or
    wrong data fail with :class:`FailedPreconditionError` and leave no ingest behind. After a
    fetch the blob is linked to the record (its media type and diffID become labels).

    Returns:
        Whether this call fetched (``False``: the blob was local already).

    Raises:
        NeedsRemoteProviderError: the blob is not local and there is no handler for it.
        RefcacheError: the provider failed (the cause is chained).
    """

    def pull(handler: DescHandler) -> None:
        try:
            data = handler.provider(desc)
        except RefcacheError:
            raise
        except Exception as exc:
            msg = f"descriptor handler for blob {desc.digest} of record {node.id} failed: {exc}"
            raise RefcacheError(msg) from exc
        if not isinstance(data, bytes | bytearray | memoryview) and not callable(
            getattr(data, "read", None)
        ):
            msg = (
                f"descriptor handler for blob {desc.digest} returned {type(data).__name__}, "
                "not a binary file object"
            )
            raise InvalidError(msg)
        try:
            core.content.write_blob(data, desc)
        except RefcacheError:
            raise
        except Exception as exc:
            msg = f"reading blob {desc.digest} of record {node.id} from its provider failed: {exc}"
            raise RefcacheError(msg) from exc
        finally:
            close = getattr(data, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):
                    close()

    def fetch() -> bool:
        if core.content.exists(desc.digest):
            return False
        if handler is None:
            raise NeedsRemoteProviderError([desc.digest])
        # The provider is a remote: its call is bounded by the cache's timeout like every
        # other wait (a hung remote fails this pull, not the cache). On a timeout the pull
        # thread is left to finish or fail on its own; its write is verified either way.
        get_result(
            _background(lambda: pull(handler)),
            core.timeout,
            f"fetching blob {desc.digest} of record {node.id} from its provider",
        )
        link_blob(core, node.id, node.blob, desc)
        return True

    fetched: bool = core.flights.do("fetch-" + desc.digest, fetch, timeout=core.timeout)
    return fetched


# -- extraction (unlazy) --------------------------------------------------------------------


def _background(fn: Callable[[], object]) -> Future[object]:
    """Runs ``fn`` on a new daemon thread (a fetch overlapping the parent's extraction).

    A thread per fetch rather than a pool: a fetch may wait for another caller's flight, and
    threads that only wait on running work can never deadlock a bounded pool.
    """
    future: Future[object] = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="refcache-fetch", daemon=True).start()
    return future


def snapshot_exists(core: CacheCore, snapshot_id: str) -> bool:
    """Whether the snapshotter has ``snapshot_id``."""
    try:
        core.snapshotter.stat(snapshot_id)
    except NotFoundError:
        return False
    return True


def extract_record(
    core: CacheCore, record_id: str, handlers: Mapping[str, DescHandler] = _EMPTY
) -> None:
    """BuildKit ``Extract``: materialise a blob-only layer, a merge or a diff.

    A layer that is not blob-only returns at once, even if its snapshot went missing (a
    record that needs it as an input restores it, see :func:`unlazy`).
    """
    node = node_of(core, record_id)
    if node.kind in ("base", "layer") and not node.blob_only:
        return
    unlazy(core, record_id, handlers)


def unlazy(
    core: CacheCore,
    record_id: str,
    handlers: Mapping[str, DescHandler] = _EMPTY,
    *,
    ensure_content: bool = False,
) -> None:
    """BuildKit ``unlazy``: make the record's snapshot exist (and, with ``ensure_content``,
    its blob local), single-flighted per record (``<id>-unlazy``).

    A caller that needs the blob too, and joined a flight that did not fetch it, runs once
    more (BuildKit shares one flight for both).
    """
    key = record_id + "-unlazy"
    core.flights.do(
        key, lambda: _unlazy(core, record_id, handlers, ensure_content), timeout=core.timeout
    )
    if ensure_content:
        node = node_of(core, record_id)
        if node.blob and node.blob_only and not core.content.exists(node.blob):
            core.flights.do(
                key, lambda: _unlazy(core, record_id, handlers, True), timeout=core.timeout
            )


def _unlazy(
    core: CacheCore, record_id: str, handlers: Mapping[str, DescHandler], ensure_content: bool
) -> None:
    node = node_of(core, record_id)
    if snapshot_exists(core, node.snapshot_id) and (
        not ensure_content or not node.blob or core.content.exists(node.blob)
    ):
        return
    if node.kind in ("merge", "diff"):
        _unlazy_diff_merge(core, node, handlers, ensure_content)
    else:
        _unlazy_layer(core, node, handlers, ensure_content)


def _run_all(core: CacheCore, calls: Sequence[Callable[[], object]]) -> None:
    """Runs ``calls`` concurrently (the first in this thread); raises the first failure."""
    if not calls:
        return
    futures = [_background(c) for c in calls[1:]]
    first: BaseException | None = None
    try:
        calls[0]()
    except BaseException as exc:
        first = exc
    for f in futures:
        try:
            get_result(f, core.timeout, "extracting an input")
        except BaseException as exc:
            if first is None:
                first = exc
    if first is not None:
        raise first


def _unlazy_diff_merge(
    core: CacheCore, node: BlobNode, handlers: Mapping[str, DescHandler], ensure_content: bool
) -> None:
    # BuildKit unlazyDiffMerge: every layer input in parallel, then one Snapshotter.Merge.
    plan = core.ask_manager(ExtractPlanOf(node.id))
    if plan is None:
        return
    _run_all(
        core,
        [
            functools.partial(unlazy, core, dep, handlers, ensure_content=ensure_content)
            for dep in plan.deps
        ],
    )
    if snapshot_exists(core, plan.snapshot_id):
        return
    core.snapshotter.merge(plan.snapshot_id, plan.diffs)


def _unlazy_layer(
    core: CacheCore, node: BlobNode, handlers: Mapping[str, DescHandler], ensure_content: bool
) -> None:
    refuse_poisoned(node)
    exists = snapshot_exists(core, node.snapshot_id)
    if not node.blob_only and exists:
        return
    if not node.blob:
        # BuildKit 80c88a1c9: a materialised layer whose snapshot vanished is restored from
        # its blob; without one there is nothing to restore from.
        msg = (
            f"failed to restore missing snapshot {node.snapshot_id!r} of record {node.id}: "
            "no blob available"
        )
        raise FailedPreconditionError(msg)
    desc = oci_desc(core, node, handlers, prefer_non_dist=True)
    handler = handlers.get(desc.digest)
    parent_sid = ""
    if node.kind == "layer":
        parent = node.parents[0]
        if core.content.exists(desc.digest):
            unlazy(core, parent, handlers, ensure_content=ensure_content)
        else:
            # The parent is extracted in parallel with the blob fetch (BuildKit errgroup).
            fetch = _background(lambda: ensure_blob(core, node, desc, handler))
            try:
                unlazy(core, parent, handlers, ensure_content=ensure_content)
            except BaseException:
                with contextlib.suppress(BaseException):
                    get_result(fetch, core.timeout, f"fetching blob {desc.digest}")
                raise
            get_result(fetch, core.timeout, f"fetching blob {desc.digest}")
        parent_sid = node_of(core, parent).snapshot_id
    else:
        ensure_blob(core, node, desc, handler)
    if snapshot_exists(core, node.snapshot_id):
        # Another record with the same chain extracted the shared snapshot meanwhile, or
        # only the blob was missing: no second apply.
        if ensure_content and node.blob_only:
            core.ask_manager(Extracted(node.id))
        return
    apply_layer(core, node, desc, parent_sid)
    core.ask_manager(Extracted(node.id))


def apply_layer(core: CacheCore, node: BlobNode, desc: Descriptor, parent_sid: str) -> None:
    """Applies the record's blob onto ``parent_sid`` and commits it as its snapshot.

    The temporary active snapshot ``extract-<rand> <chainID>`` is held by a temporary lease
    from before it exists; on any failure it is removed (nothing half-applied stays), and a
    snapshot committed meanwhile by someone else is accepted (``AlreadyExists``).

    The diffID the applier computed must be the record's (the descriptor's
    ``containerd.io/uncompressed``) *before* the commit: the snapshot is named and shared by
    the chain ID built from that diffID, so a blob that lies about it would become another
    layer's content. A mismatch commits nothing, quarantines the record and its blob
    (:func:`quarantine`) and raises :class:`DiffIDMismatchError` naming both digests.
    """
    token = uuid.uuid4().hex
    key = f"extract-{token} {node.chain_id}"
    info = core.content.info(node.blob)
    blob = Descriptor(desc.media_type, node.blob, info.size, desc.annotations, desc.urls)
    with leased_snapshot(core, f"extract-{token}", key):
        try:
            _apply_and_commit(core, node, blob, key, parent_sid)
        except DiffIDMismatchError as exc:
            quarantine(core, node, exc)
            raise


def _apply_and_commit(
    core: CacheCore, node: BlobNode, blob: Descriptor, key: str, parent_sid: str
) -> None:
    """Prepares ``key`` on ``parent_sid``, applies ``blob`` and commits it as the record's
    snapshot; on any failure the active snapshot is removed."""
    sn = core.snapshotter
    mounts = sn.prepare(key, parent_sid)
    try:
        _check_applied(node, core.applier.apply(blob, mounts))
        try:
            sn.commit(node.snapshot_id, key)
        except AlreadyExistsError:
            sn.remove(key)
    except BaseException:
        with contextlib.suppress(RefcacheError):
            sn.remove(key)
        raise


@contextlib.contextmanager
def leased_snapshot(core: CacheCore, lease_id: str, key: str) -> Iterator[None]:
    """Holds snapshot ``key`` (not created yet) in the temporary flat lease ``lease_id``
    until the block ends, so that garbage collection leaves it alone meanwhile."""
    with core.env.write_txn() as txn:
        core.leases.create(lease_id, flat=True, temporary=True, txn=txn)
        resource = Resource(key, f"snapshots/{core.snapshotter.name}")
        core.leases.add_resource(lease_id, resource, txn=txn)
    try:
        yield
    finally:
        with contextlib.suppress(NotFoundError):
            core.leases.delete(lease_id)


def refuse_poisoned(node: BlobNode) -> None:
    """Raises ``InvalidError`` for a quarantined record (see :func:`quarantine`)."""
    if node.poisoned:
        msg = (
            f"record {node.id} was quarantined: its blob {node.blob} does not have the "
            f"diffID {node.diff_id} it claims"
        )
        raise InvalidError(msg)


def _check_applied(node: BlobNode, applied: Descriptor) -> None:
    # Checked here too: an embedder's applier may not check the annotation.
    if node.diff_id and applied.digest != node.diff_id:
        raise DiffIDMismatchError(node.blob, node.diff_id, applied.digest)


def quarantine(core: CacheCore, node: BlobNode, exc: DiffIDMismatchError) -> None:
    """A record's blob lied about its diffID: make sure it is never used again.

    The record is marked poisoned and loses its chain IDs (so ``get_by_blob`` never finds
    it, nothing is built or extracted on it, and it is never exported); the blob leaves the
    content store unless another record claims the diffID the blob really has (for that
    record it is honest). A record whose blob is gone is cleared at the next open.
    """
    logger.warning(
        "record %s quarantined: blob %s claims diffID %s, its content has %s",
        node.id,
        exc.blob,
        exc.expected,
        exc.actual,
    )
    delete = core.ask_manager(Poisoned(node.id, exc.actual))
    if delete:
        with contextlib.suppress(NotFoundError):
            core.content.delete(exc.blob)


# -- sizes ----------------------------------------------------------------------------------


def snapshot_usage(core: CacheCore, snapshot_id: str) -> int | None:
    """Usage of one snapshot in bytes; ``None`` when it does not exist (yet).

    Callers count a missing snapshot as 0 (BuildKit) without caching that size.
    """
    try:
        return int(core.snapshotter.usage(snapshot_id).size)
    except NotFoundError:
        return None


def measure_record(
    core: CacheCore, snapshot_id: str, blob: str, blob_only: bool
) -> tuple[int, bool]:
    """BuildKit ``size()``: snapshot usage (unless blob-only) + blob + every variant.

    Variants are those reachable through ``blob-*`` labels, each digest counted once (label
    cycles are fine). Returns ``(size, cacheable)``: a snapshot that does not exist (a merge
    or diff not extracted yet) counts 0 but the result is not to be cached.
    """
    size = 0
    cacheable = True
    if not blob_only:
        usage = snapshot_usage(core, snapshot_id)
        if usage is None:
            cacheable = False
        else:
            size += usage
    if blob:
        seen: set[str] = set()
        try:
            size += core.content.info(blob).size
            seen.add(blob)
        except NotFoundError:
            pass

        def add(d: Descriptor) -> bool:
            nonlocal size
            if d.digest not in seen:
                seen.add(d.digest)
                size += d.size
            return True

        walk_blob_variants(core.content, blob, add)
    return size, cacheable


# -- file lists -----------------------------------------------------------------------------


def tar_names(stream: BinaryIO) -> list[str]:
    """Sorted, cleaned (Go ``path.Clean``) member names of an (uncompressed) tar stream."""
    names: list[str] = []
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            for member in tf:
                names.append(posixpath.normpath(member.name) if member.name else ".")
    except tarfile.TarError as exc:
        msg = f"cannot read the layer tarball: {exc}"
        raise InvalidError(msg) from exc
    return sorted(names)
