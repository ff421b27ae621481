"""``Cache.push`` and ``Cache.pull``: records to and from OCI registries and layouts.

**Push** runs in the caller's thread (plus a few upload threads): each named record's layer
chain comes from ``get_remotes`` (blobs computed or converted as needed, diffIDs kept), its
config and manifest are built (:mod:`storage._oci`), then every distinct blob is sent once:
``HEAD`` first (present: skipped), else a cross-repository mount when the blob is known to
come from another repository of the same registry (a pulled layer's handler, or a content
label ``containerd.io/distribution.source.<host>`` written when a blob was pushed or
fetched), else a streamed upload. Manifests go by digest, then the index under the tag (last
writer wins; blobs are idempotent).

**Pull** reads the index and the manifests only (in parallel), then asks the manager to make
every layer record in batches of one LMDB transaction each (``ByBlobs``: ``get_by_blob``'s
lookups and inserts, keyed by blob-chain ID, so a second pull or shared layers make no
duplicate). The records are *lazy*: one :class:`DescHandler` per pulled source fetches a
blob from it on first extract (single flight per digest, resumable, verified by the content
store's write). The handles carry the handlers, and the cache keeps them until it closes
(:meth:`CacheCore.register_handlers`), so a later ``get`` of a pulled record works too.
With ``fetch`` every missing blob is downloaded during the pull (held by a temporary lease
until the records hold them; a failure leaves no record); with ``extract`` every record is
also unpacked.

Nothing here runs in an actor handler: the manager only answers ``LayerChain``, ``InfoOf``
and ``ByBlobs``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol

from ..storage import (
    ANNOTATION_UNCOMPRESSED,
    MEDIA_TYPE_OCI_INDEX,
    RESOURCE_CONTENT,
    CacheEntry,
    ContentInfo,
    Credentials,
    Descriptor,
    InvalidError,
    LayerMeta,
    NotFoundError,
    OciLayout,
    ParsedImage,
    RefcacheError,
    RegistryClient,
    RegistryRepository,
    Resource,
    Target,
    build_config,
    build_index,
    build_manifest,
    check_compression,
    config_diff_ids,
    frozen_map,
    load_credentials,
    parse_image,
    parse_manifest,
    parse_target,
    validate_name,
)
from ._core import CacheCore
from ._mediatypes import chain_id, diff_id_of, media_type_compression
from ._messages import BlobRecordPlan, ByBlobs, InfoOf, LayerChain
from ._refs import ImmutableRef
from ._types import DescHandler

__all__ = [
    "DISTRIBUTION_SOURCE_LABEL",
    "ProgressEvent",
    "PushResult",
    "pull",
    "push",
]

#: Content label (and handler annotation) prefix naming the repositories a blob is known to
#: be in, per registry host (containerd's ``distribution.source`` label).
DISTRIBUTION_SOURCE_LABEL: Final = "containerd.io/distribution.source."
#: Layer records made per manager ask (one LMDB transaction each).
PULL_BATCH: Final = 1024
#: Concurrent blob transfers of one push or fetching pull.
TRANSFER_THREADS: Final = 4
#: Share of the cache's timeout that retries of one transfer may use: the registry's own
#: error (naming it and the blob) then surfaces before the cache's generic wait timeout.
RETRY_SHARE: Final = 0.75
#: Concurrent manifest fetches of one pull.
MANIFEST_THREADS: Final = 8


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """One step of a push or pull, for progress displays (called from transfer threads).

    Attributes:
        kind: ``"blob-start"``, ``"bytes"`` (``nbytes`` more were sent or received),
            ``"blob-done"``, ``"blob-skipped"`` (the target had it), ``"blob-mounted"``,
            ``"manifest"`` (one manifest sent or read), ``"records"`` (``nbytes`` records
            made or found by a pull).
        digest: The blob or manifest (``""`` for ``records``).
        nbytes: Bytes of this step (``bytes``), or a count (``records``).
        size: The blob's size.
    """

    kind: str
    digest: str = ""
    nbytes: int = 0
    size: int = 0


Progress = Callable[[ProgressEvent], None]


@dataclass(frozen=True, slots=True)
class PushResult:
    """What a push did.

    Attributes:
        target: The target as given.
        index_digest: Digest of the cache image (the tagged index).
        manifests: Manifest digest per name.
        blobs_uploaded: Blobs sent (layers and configs).
        bytes_uploaded: Their bytes.
        blobs_skipped: Blobs the target had already (``HEAD``).
        bytes_skipped: Their bytes.
        blobs_mounted: Blobs linked from another repository of the registry.
        bytes_mounted: Their bytes.
        seconds: Wall time of the push.
    """

    target: str
    index_digest: str
    manifests: Mapping[str, str] = field(default_factory=lambda: frozen_map(None))
    blobs_uploaded: int = 0
    bytes_uploaded: int = 0
    blobs_skipped: int = 0
    bytes_skipped: int = 0
    blobs_mounted: int = 0
    bytes_mounted: int = 0
    seconds: float = 0.0


class _Store(Protocol):
    """What push and pull need of a registry repository or an OCI layout."""

    name: str

    @property
    def description(self) -> str: ...

    def has_blob(self, digest: str, *, push: bool = False) -> bool: ...

    def open_blob(
        self, desc: Descriptor, *, on_bytes: Callable[[int], None] | None = None
    ) -> Any: ...

    def mount_blob(self, digest: str, source: str) -> str | None: ...

    def put_blob(
        self,
        desc: Descriptor,
        opener: Callable[[], BinaryIO],
        *,
        session: str | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None: ...

    def has_manifest(self, digest: str) -> bool: ...

    def get_manifest(self, reference: str) -> tuple[str, bytes, str]: ...

    def put_manifest(self, reference: str, media_type: str, data: bytes) -> str: ...


# -- opening targets --------------------------------------------------------------------------


def _credentials(value: object, host: str) -> Credentials | None:
    if value is None:
        return None
    if isinstance(value, Credentials):
        return value
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, str) for v in value)
        and value[0]
    ):
        return Credentials(value[0], value[1], "", "given")
    msg = (
        f"credentials for {host} must be (username, password) or Credentials, "
        f"not a {type(value).__name__}"
    )
    raise InvalidError(msg)


def _open(
    core: CacheCore,
    target: Target,
    *,
    credentials: object,
    ca_file: str | os.PathLike[str] | None,
    insecure: bool,
    docker_config: str | os.PathLike[str] | None,
) -> _Store:
    """The store behind ``target``.

    Registry clients are kept by the cache per registry and identity (connections and
    tokens are reused by later pushes and pulls; pulled records' handlers read through
    them) and closed with it. Docker's configuration is read again each time, so a
    ``docker login`` in between is seen.
    """
    if not isinstance(insecure, bool):
        msg = f"insecure must be a bool, not {insecure!r}"
        raise InvalidError(msg)
    if target.scheme == "oci-layout":
        assert target.path is not None
        return OciLayout(target.path)
    creds = _credentials(credentials, target.host)
    if creds is None:
        creds = load_credentials(target.host, config_dir=docker_config)
    ca = str(Path(ca_file).resolve()) if ca_file is not None else ""
    config = str(docker_config) if docker_config is not None else ""
    key = (target.host, insecure, ca, creds, config)

    def make() -> RegistryClient:
        return RegistryClient(
            target.host,
            insecure=insecure,
            ca_file=ca_file,
            credentials=creds,
            docker_config=docker_config,
            timeout=core.timeout * RETRY_SHARE,
            on_request=core.observe_registry,
        )

    client: RegistryClient = core.registry_client(key, make)
    return client.repository(target.repository)


def _host(store: _Store) -> str:
    return store.client.host if isinstance(store, RegistryRepository) else ""


def _remember_source(core: CacheCore, digest: str, store: _Store) -> None:
    """Labels a local blob with the repository it is known to be in (for later mounts)."""
    host = _host(store)
    if not host:
        return
    key = DISTRIBUTION_SOURCE_LABEL + host
    try:
        info = core.content.info(digest)
        repos = [r for r in info.labels.get(key, "").split(",") if r]
        if store.name in repos:
            return
        repos.append(store.name)
        core.content.update(ContentInfo(digest, 0, {key: ",".join(repos)}), f"labels.{key}")
    except (NotFoundError, InvalidError):
        return  # not local (a lazy layer), or a label that does not fit: no mount hint


def _mount_sources(
    core: CacheCore, desc: Descriptor, handler: DescHandler | None, host: str, repo: str
) -> list[str]:
    """Other repositories of ``host`` known to have blob ``desc``."""
    key = DISTRIBUTION_SOURCE_LABEL + host
    found: list[str] = []
    if handler is not None:
        found += handler.annotations.get(key, "").split(",")
    with contextlib.suppress(NotFoundError):
        found += core.content.info(desc.digest).labels.get(key, "").split(",")
    return [r for r in dict.fromkeys(found) if r and r != repo]


# -- push ---------------------------------------------------------------------------------------


@dataclass
class _PushCounts:
    lock: threading.Lock = field(default_factory=threading.Lock)
    uploaded: int = 0
    bytes_uploaded: int = 0
    skipped: int = 0
    bytes_skipped: int = 0
    mounted: int = 0
    bytes_mounted: int = 0

    def add(self, kind: str, size: int) -> None:
        with self.lock:
            if kind == "uploaded":
                self.uploaded += 1
                self.bytes_uploaded += size
            elif kind == "skipped":
                self.skipped += 1
                self.bytes_skipped += size
            else:
                self.mounted += 1
                self.bytes_mounted += size


@dataclass(frozen=True, slots=True)
class _PushBlob:
    desc: Descriptor
    opener: Callable[[], BinaryIO]
    handler: DescHandler | None = None


def _meta(info: Any) -> LayerMeta:
    record_type = info.record_type if info.record_type != "regular" else ""
    return LayerMeta(info.description, record_type, info.created_at)


def _check_refs(core: CacheCore, refs: object) -> list[tuple[str, ImmutableRef]]:
    if not isinstance(refs, Mapping):
        msg = f"push refs must be a mapping of name to ImmutableRef, not {type(refs).__name__}"
        raise InvalidError(msg)
    if not refs:
        msg = "push needs at least one name -> ImmutableRef"
        raise InvalidError(msg)
    out = []
    for name, ref in refs.items():
        validate_name(name)
        if not isinstance(ref, ImmutableRef):
            msg = f"push refs[{name!r}] must be an ImmutableRef, not {type(ref).__name__}"
            raise InvalidError(msg)
        core.check_owner(ref._token, f"push refs[{name!r}] ({ref.id})")
        if ref.released:
            msg = f"push refs[{name!r}]: ref {ref.id!r} was released"
            raise InvalidError(msg)
        out.append((name, ref))
    return sorted(out)


def push(
    core: CacheCore,
    target: str,
    refs: Mapping[str, ImmutableRef],
    *,
    compression: str = "zstd",
    force_compression: bool = False,
    credentials: object = None,
    ca_file: str | os.PathLike[str] | None = None,
    insecure: bool = False,
    docker_config: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> PushResult:
    """Exports named records as one tagged cache image (see :meth:`Cache.push`)."""
    started = time.monotonic()
    parsed = parse_target(target)
    check_compression(compression)
    if not isinstance(force_compression, bool):
        msg = f"force_compression must be a bool, not {force_compression!r}"
        raise InvalidError(msg)
    named = _check_refs(core, refs)
    store = _open(
        core,
        parsed,
        credentials=credentials,
        ca_file=ca_file,
        insecure=insecure,
        docker_config=docker_config,
    )
    with core.timed("push"):
        return _push(core, parsed, store, named, compression, force_compression, progress, started)


def _push(
    core: CacheCore,
    target: Target,
    store: _Store,
    named: Sequence[tuple[str, ImmutableRef]],
    compression: str,
    force: bool,
    progress: Progress | None,
    started: float,
) -> PushResult:
    blobs, manifests = _push_plan(core, named, compression, force)
    counts = _PushCounts()
    send = functools.partial(_send_blob, core, store, _host(store), counts, progress)
    _run_parallel(send, list(blobs.values()), TRANSFER_THREADS)

    def send_manifest(item: tuple[Descriptor, bytes]) -> None:
        desc, data = item
        if not store.has_manifest(desc.digest):
            store.put_manifest(desc.digest, desc.media_type, data)
        _emit(progress, ProgressEvent("manifest", desc.digest, 0, desc.size))

    _run_parallel(send_manifest, list(manifests.values()), MANIFEST_THREADS)
    index, index_bytes = build_index({name: m[0] for name, m in manifests.items()})
    store.put_manifest(target.tag, MEDIA_TYPE_OCI_INDEX, index_bytes)
    _emit(progress, ProgressEvent("manifest", index.digest, 0, index.size))
    return PushResult(
        target=str(target),
        index_digest=index.digest,
        manifests=frozen_map({name: m[0].digest for name, m in manifests.items()}),
        blobs_uploaded=counts.uploaded,
        bytes_uploaded=counts.bytes_uploaded,
        blobs_skipped=counts.skipped,
        bytes_skipped=counts.bytes_skipped,
        blobs_mounted=counts.mounted,
        bytes_mounted=counts.bytes_mounted,
        seconds=time.monotonic() - started,
    )


def _push_plan(
    core: CacheCore,
    named: Sequence[tuple[str, ImmutableRef]],
    compression: str,
    force: bool,
) -> tuple[dict[str, _PushBlob], dict[str, tuple[Descriptor, bytes]]]:
    """The blobs (each digest once) and the manifest of each name that a push sends."""
    blobs: dict[str, _PushBlob] = {}
    manifests: dict[str, tuple[Descriptor, bytes]] = {}
    for name, ref in named:
        remote = ref.get_remotes(compression, force=force)[0]
        chain = core.ask_manager(LayerChain(ref.id))
        metas = [_meta(core.ask_manager(InfoOf(rid))) for rid in chain]
        top = _meta(ref.info())
        layers = list(remote.descriptors)
        if len(metas) != len(layers):  # pragma: no cover (the same manager walk)
            msg = f"push {name!r}: {len(layers)} layers but {len(metas)} records in the chain"
            raise RefcacheError(msg)
        if not layers:
            msg = f"push {name!r}: record {ref.id} has no layers to export"
            raise InvalidError(msg)
        config, config_bytes = build_config(layers, metas, top)
        manifest, manifest_bytes = build_manifest(name, config, layers, metas, top)
        for d in layers:
            blobs.setdefault(
                d.digest,
                _PushBlob(
                    d, functools.partial(remote.provider, d), ref.desc_handlers.get(d.digest)
                ),
            )
        blobs.setdefault(
            config.digest, _PushBlob(config, functools.partial(io.BytesIO, config_bytes))
        )
        manifests[name] = (manifest, manifest_bytes)
    return blobs, manifests


def _send_blob(
    core: CacheCore,
    store: _Store,
    host: str,
    counts: _PushCounts,
    progress: Progress | None,
    blob: _PushBlob,
) -> None:
    """Sends one blob of a push: skipped when the registry has it, mounted from another
    repository of the registry that has it, uploaded otherwise."""
    desc = blob.desc
    if store.has_blob(desc.digest, push=True):
        counts.add("skipped", desc.size)
        core.count_transfer("push", "skipped")
        _emit(progress, ProgressEvent("blob-skipped", desc.digest, 0, desc.size))
        _remember_source(core, desc.digest, store)
        return
    session = None
    if host:
        for source in _mount_sources(core, desc, blob.handler, host, store.name):
            session = store.mount_blob(desc.digest, source)
            if session is None:
                counts.add("mounted", desc.size)
                core.count_transfer("push", "mounted")
                _emit(progress, ProgressEvent("blob-mounted", desc.digest, 0, desc.size))
                _remember_source(core, desc.digest, store)
                return
            break  # the registry opened an upload session instead: upload into it
    _emit(progress, ProgressEvent("blob-start", desc.digest, 0, desc.size))

    def sent(n: int) -> None:
        core.count_transfer("push", "", n, blobs=0)
        _emit(progress, ProgressEvent("bytes", desc.digest, n, desc.size))

    store.put_blob(desc, blob.opener, session=session, on_bytes=sent)
    counts.add("uploaded", desc.size)
    core.count_transfer("push", "uploaded")
    _emit(progress, ProgressEvent("blob-done", desc.digest, desc.size, desc.size))
    _remember_source(core, desc.digest, store)


def _emit(progress: Progress | None, event: ProgressEvent) -> None:
    if progress is not None:
        progress(event)


def _run_parallel(fn: Callable[[Any], None], items: Sequence[Any], threads: int) -> None:
    """Runs ``fn`` over ``items`` on up to ``threads`` threads; raises the first failure
    after every started call finished (nothing keeps running behind the caller's back)."""
    if not items:
        return
    if len(items) == 1 or threads <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix="refcache-xfer") as ex:
        futures = [ex.submit(fn, item) for item in items]
        first: BaseException | None = None
        for f in futures:
            if f.cancelled():
                continue  # never started: cancelled after the first failure
            exc = f.exception()
            if exc is not None and first is None:
                first = exc
                for other in futures:
                    other.cancel()
    if first is not None:
        raise first


# -- pull ---------------------------------------------------------------------------------------


class _Provider:
    """The ``DescHandler`` provider of one pulled source: opens a blob stream from it and
    counts what it delivers (``pull`` metrics, progress)."""

    def __init__(self, core: CacheCore, store: _Store) -> None:
        self.core = core
        self.store = store
        self.progress: Progress | None = None

    def __call__(self, desc: Descriptor) -> BinaryIO:
        core, progress = self.core, self.progress
        _emit(progress, ProgressEvent("blob-start", desc.digest, 0, desc.size))
        seen = [0]

        def got(n: int) -> None:
            seen[0] += n
            core.count_transfer("pull", "", n, blobs=0)
            _emit(progress, ProgressEvent("bytes", desc.digest, n, desc.size))
            if seen[0] == desc.size:
                core.count_transfer("pull", "fetched")
                _emit(progress, ProgressEvent("blob-done", desc.digest, desc.size, desc.size))

        stream: BinaryIO = self.store.open_blob(desc, on_bytes=got)
        return stream

    def __repr__(self) -> str:
        return f"<provider of {self.store.description}>"


def _fetch_manifests(
    store: _Store, entries: Sequence[CacheEntry], progress: Progress | None
) -> dict[str, ParsedImage]:
    out: dict[str, ParsedImage] = {}
    lock = threading.Lock()

    def fetch(entry: CacheEntry) -> None:
        _, data, digest = store.get_manifest(entry.desc.digest)
        parsed = parse_manifest(data, f"manifest {entry.name!r} ({digest}) of {store.description}")
        parsed = _with_diff_ids(store, parsed, entry.name)
        with lock:
            out[entry.name] = parsed
        _emit(progress, ProgressEvent("manifest", digest, 0, len(data)))

    _run_parallel(fetch, entries, MANIFEST_THREADS)
    return out


def _with_diff_ids(store: _Store, image: ParsedImage, name: str) -> ParsedImage:
    """Layers without the diffID annotation (an image not pushed by refcache) take theirs
    from the config's ``rootfs.diff_ids``; every layer must be a known layer media type."""
    for d in image.layers:
        if media_type_compression(d.media_type) is None:
            msg = (
                f"{name!r} of {store.description}: layer {d.digest} has media type "
                f"{d.media_type!r}, not a layer"
            )
            raise InvalidError(msg)
    if all(ANNOTATION_UNCOMPRESSED in d.annotations for d in image.layers):
        return image
    _, data, _ = store.get_manifest(image.config.digest)
    ids = config_diff_ids(data, f"config {image.config.digest} of {store.description}")
    if len(ids) != len(image.layers):
        msg = f"{name!r} of {store.description}: {len(image.layers)} layers but {len(ids)} diffIDs"
        raise InvalidError(msg)
    layers = tuple(
        Descriptor(
            d.media_type, d.digest, d.size, {**d.annotations, ANNOTATION_UNCOMPRESSED: i}, d.urls
        )
        for d, i in zip(image.layers, ids, strict=True)
    )
    return ParsedImage(image.config, layers, image.metas, image.annotations)


def _plans(images: Mapping[str, ParsedImage]) -> tuple[list[BlobRecordPlan], dict[str, str]]:
    """Layer records in chain order (each blob-chain ID once) and the top key per name."""
    plans: dict[str, BlobRecordPlan] = {}
    tops: dict[str, str] = {}
    for name, image in sorted(images.items()):
        if not image.layers:
            msg = f"cache image entry {name!r} has no layers"
            raise InvalidError(msg)
        parent = ""
        for desc, meta in zip(image.layers, image.metas, strict=True):
            diff_id = diff_id_of(desc)
            own = chain_id(desc.digest, diff_id)
            key = chain_id(parent, own) if parent else own
            if key not in plans:
                plans[key] = BlobRecordPlan(
                    key,
                    parent,
                    desc,
                    diff_id,
                    meta.description,
                    meta.record_type,
                    meta.created_at,
                )
            parent = key
        tops[name] = parent
    return list(plans.values()), tops


def pull(
    core: CacheCore,
    source: str,
    *,
    fetch: bool = False,
    extract: bool = False,
    credentials: object = None,
    ca_file: str | os.PathLike[str] | None = None,
    insecure: bool = False,
    docker_config: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> dict[str, ImmutableRef]:
    """Imports a cache image as records, lazily by default (see :meth:`Cache.pull`)."""
    parsed = parse_target(source, what="source", allow_digest=True)
    for name, flag in (("fetch", fetch), ("extract", extract)):
        if not isinstance(flag, bool):
            msg = f"pull {name} must be a bool, not {flag!r}"
            raise InvalidError(msg)
    store = _open(
        core,
        parsed,
        credentials=credentials,
        ca_file=ca_file,
        insecure=insecure,
        docker_config=docker_config,
    )
    with core.timed("pull"):
        refs = _pull(core, parsed, store, fetch or extract, progress)
    if extract:
        try:
            for ref in refs.values():
                ref.extract()
        except BaseException:
            _release(refs.values())
            raise
    return refs


def _pull(
    core: CacheCore, target: Target, store: _Store, fetch: bool, progress: Progress | None
) -> dict[str, ImmutableRef]:
    media_type, data, digest = store.get_manifest(target.reference)
    where = f"{target.reference} of {store.description}"
    entries = parse_image(media_type, data, where, target.tag or digest[:19])
    images = _fetch_manifests(store, entries, progress)
    plans, tops = _plans(images)
    provider = _Provider(core, store)
    annotations = {}
    if _host(store):
        annotations[DISTRIBUTION_SOURCE_LABEL + _host(store)] = store.name
    handler = DescHandler(provider, frozen_map(annotations), ref=str(target))
    handlers: Mapping[str, DescHandler] = frozen_map(
        dict.fromkeys((p.desc.digest for p in plans), handler)
    )
    lease_id = ""
    if fetch:
        provider.progress = progress
        lease_id = _fetch_all(core, store, plans, provider)
    try:
        refs = _make_records(core, plans, tops, handlers, progress)
    finally:
        provider.progress = None
        if lease_id:
            with contextlib.suppress(NotFoundError):
                core.leases.delete(lease_id)
    core.register_handlers(handlers)
    return refs


def _fetch_all(
    core: CacheCore, store: _Store, plans: Sequence[BlobRecordPlan], provider: _Provider
) -> str:
    """Downloads every missing layer blob, held by a temporary lease (returned) from before
    the first byte, so that nothing is collected before the records hold the blobs. On
    failure the lease is deleted (what was fetched is garbage for the next GC)."""
    descs = list(
        {p.desc.digest: p.desc for p in plans if not core.content.exists(p.desc.digest)}.values()
    )
    lease_id = f"pull-{uuid.uuid4().hex}"
    with core.env.write_txn() as txn:
        core.leases.create(lease_id, flat=True, temporary=True, txn=txn)
        for d in descs:
            core.leases.add_resource(lease_id, Resource(d.digest, RESOURCE_CONTENT), txn=txn)

    def one(desc: Descriptor) -> None:
        stream = provider(desc)
        try:
            core.content.write_blob(stream, desc)
        finally:
            stream.close()
        _remember_source(core, desc.digest, store)

    try:
        _run_parallel(one, descs, TRANSFER_THREADS)
    except BaseException:
        with contextlib.suppress(NotFoundError):
            core.leases.delete(lease_id)
        raise
    return lease_id


def _make_records(
    core: CacheCore,
    plans: Sequence[BlobRecordPlan],
    tops: Mapping[str, str],
    handlers: Mapping[str, DescHandler],
    progress: Progress | None,
) -> dict[str, ImmutableRef]:
    top_keys = set(tops.values())
    batches = [plans[i : i + PULL_BATCH] for i in range(0, len(plans), PULL_BATCH)]
    batch_of = {p.key: n for n, batch in enumerate(batches) for p in batch}
    # A parent whose children come in a later batch is held until they exist.
    crossing = {p.parent for p in plans if p.parent and batch_of[p.parent] < batch_of[p.key]}
    known: dict[str, str] = {}
    held: dict[str, ImmutableRef] = {}
    try:
        for batch in batches:
            keys = {p.key for p in batch}
            want = frozenset(keys & (top_keys | crossing))
            reply = core.ask_manager(ByBlobs(tuple(batch), frozen_map(known), handlers, want))
            known.update(reply.ids)
            for key, g in reply.grants.items():
                held[key] = ImmutableRef(core, g.record_id, g.handle_id, g.actor, handlers)
            _emit(progress, ProgressEvent("records", "", len(batch), 0))
        out: dict[str, ImmutableRef] = {}
        used: set[str] = set()
        for name, key in sorted(tops.items()):
            ref = held[key]
            out[name] = ref.clone() if key in used else ref
            used.add(key)
    except BaseException:
        _release(held.values())
        raise
    _release(ref for key, ref in held.items() if key not in used)
    return out


def _release(refs: Iterable[ImmutableRef]) -> None:
    for ref in refs:
        with contextlib.suppress(RefcacheError):
            ref.release()
