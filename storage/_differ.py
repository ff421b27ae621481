"""Computing layer blobs from two snapshot mounts (containerd ``plugins/diff/walking``).

:class:`WalkingDiffer` mounts both sides read-only (:func:`storage._mount.local_mount`),
walks them with :func:`storage._difftar.write_diff` and streams the tar through the
compressor into a content-store ingest (:class:`LayerBlobWriter`, which the record layer
uses for its conversions too): nothing is buffered in memory beyond a chunk. The uncompressed
bytes are hashed on the way for the diffID, which is stored as the content label
``containerd.io/uncompressed`` and returned as the descriptor annotation of the same name.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import BinaryIO, Protocol, cast, runtime_checkable

from ._compression import check_compression, compressed_writer
from ._content import ContentStore, ContentWriter
from ._difftar import write_diff
from ._env import WriteTxn
from ._errors import AlreadyExistsError, InvalidError, NotFoundError
from ._labels import validate_labels
from ._mount import local_mount
from ._types import (
    ANNOTATION_UNCOMPRESSED,
    MEDIA_TYPE_OCI_LAYER,
    MEDIA_TYPE_OCI_LAYER_GZIP,
    MEDIA_TYPE_OCI_LAYER_ZSTD,
    ContentInfo,
    Descriptor,
    Mount,
)

__all__ = ["Differ", "LayerBlobWriter", "WalkingDiffer"]

_MEDIA_TYPES: Mapping[str, str] = {
    "gzip": MEDIA_TYPE_OCI_LAYER_GZIP,
    "zstd": MEDIA_TYPE_OCI_LAYER_ZSTD,
    "uncompressed": MEDIA_TYPE_OCI_LAYER,
}


@runtime_checkable
class Differ(Protocol):
    """Computes a layer blob from two mounts (containerd ``diff.Comparer``)."""

    def compare(
        self,
        lower: Sequence[Mount],
        upper: Sequence[Mount],
        *,
        compression: str = "gzip",
        media_type: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Descriptor:
        """Stores the diff from ``lower`` to ``upper`` as a blob and returns its descriptor."""
        ...


class _HashingWriter:
    """Hashes (sha256) and counts the bytes passing through to ``sink``."""

    def __init__(self, sink: BinaryIO | ContentWriter) -> None:
        self._sink = sink
        self._hash = hashlib.sha256()
        self.count = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._hash.update(data)
        self.count += len(data)
        self._sink.write(data)
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered here; ``tarfile`` and the compressors may call this."""

    def tell(self) -> int:
        return self.count

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


class LayerBlobWriter:
    """Streams a layer's uncompressed tar through a compressor into a new blob.

    Both streams are hashed on the way: the uncompressed bytes give the diffID, the
    compressed ones the blob's digest. Nothing is buffered beyond a compressor's chunk. Use
    it as a context manager: write the tar to :attr:`stream`, then :meth:`commit` (or
    :meth:`finish` first to look at the digests); leaving the block without a commit removes
    the ingest.

    Runs on the caller's thread and blocks on file I/O.

    Args:
        content: The content store to write into.
        compression: ``"gzip"``, ``"zstd"`` or ``"uncompressed"``.
        what: Names the ingest ref (``refcache-<what>-<random>``).

    Raises:
        InvalidError: Unknown compression (nothing is written).
    """

    def __init__(self, content: ContentStore, compression: str, *, what: str = "layer") -> None:
        check_compression(compression)
        self._content = content
        self._ref = f"refcache-{what}-{uuid.uuid4().hex}"
        self._writer = content.writer(self._ref)
        self._compressed = _HashingWriter(self._writer)
        self._sink = compressed_writer(cast(BinaryIO, self._compressed), compression)
        self._uncompressed = _HashingWriter(self._sink)
        self._finished: tuple[str, int, str] | None = None
        self._committed = False

    @property
    def stream(self) -> BinaryIO:
        """Where the uncompressed layer tar goes."""
        return cast(BinaryIO, self._uncompressed)

    def finish(self) -> tuple[str, int, str]:
        """Ends the compressed stream (idempotent).

        Returns:
            ``(digest, size, diff_id)`` of the blob to commit.
        """
        if self._finished is None:
            self._sink.close()
            self._finished = (
                self._compressed.digest,
                self._compressed.count,
                self._uncompressed.digest,
            )
        return self._finished

    def commit(
        self, *, labels: Mapping[str, str] | None = None, txn: WriteTxn | None = None
    ) -> tuple[str, int, str]:
        """Commits the blob with ``labels`` and ``containerd.io/uncompressed`` = diffID.

        A blob that exists already is success (containerd's ``AlreadyExists``): the labels
        are added to it.

        Args:
            labels: More content labels.
            txn: Commit inside this write transaction (for example one that leases the blob).

        Returns:
            ``(digest, size, diff_id)``.
        """
        digest, size, diff_id = self.finish()
        merged = {**(labels or {}), ANNOTATION_UNCOMPRESSED: diff_id}
        try:
            self._writer.commit(size, digest, labels=merged, txn=txn)
        except AlreadyExistsError:
            info = ContentInfo(digest=digest, size=0, labels=merged)
            self._content.update(info, *(f"labels.{k}" for k in merged), txn=txn)
        self._committed = True
        return digest, size, diff_id

    def close(self) -> None:
        """Removes the ingest unless the blob was committed (idempotent)."""
        if self._committed:
            return
        self._committed = True
        self._writer.close()
        with suppress(NotFoundError):
            self._content.abort(self._ref)

    def __enter__(self) -> LayerBlobWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class WalkingDiffer:
    """The embedded differ: a double walk of two directory trees, written as an OCI layer.

    Stateless apart from the content store; any thread may call :meth:`compare`.

    Args:
        content: Where the blobs are written.
        mount_root: Where temporary mount points go (a cache passes ``<root>/mounts``);
            the system temp dir when ``None``.
    """

    def __init__(
        self, content: ContentStore, *, mount_root: str | os.PathLike[str] | None = None
    ) -> None:
        self._content = content
        self._mount_root = mount_root

    def compare(
        self,
        lower: Sequence[Mount],
        upper: Sequence[Mount],
        *,
        compression: str = "gzip",
        media_type: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Descriptor:
        """Writes the diff from ``lower`` to ``upper`` into the content store.

        Change rules are :func:`storage._difftar.write_diff`'s. An existing blob with the
        same digest is success (containerd: ``AlreadyExists``); the labels are merged into it.

        Args:
            lower: Mounts of the base; empty means "diff against an empty tree".
            upper: Mounts of the changed tree.
            compression: ``"gzip"`` (default), ``"zstd"`` or ``"uncompressed"``.
            media_type: Media type of the result; default by compression
                (``…layer.v1.tar+gzip``, ``…+zstd``, ``…layer.v1.tar``).
            labels: Extra content labels for the blob.

        Returns:
            The blob's descriptor, with annotation ``containerd.io/uncompressed`` = diffID.

        Raises:
            InvalidError: Unknown compression, bad labels, media type or mounts. Nothing is
                written.
            FailedPreconditionError: A tree cannot be read, or mounting is not permitted.
            StoreFullError: The disk filled up (the ingest is removed).
        """
        check_compression(compression)
        if media_type is not None and (not isinstance(media_type, str) or not media_type):
            msg = f"invalid media type {media_type!r}"
            raise InvalidError(msg)
        extra = dict(validate_labels(labels, what="diff"))
        lower_items = _mount_list(lower, "lower")
        upper_items = _mount_list(upper, "upper")
        if not upper_items:
            msg = "cannot diff: the upper mount list is empty"
            raise InvalidError(msg)

        with ExitStack() as stack:
            lower_dir: Path | None = None
            if lower_items:
                lower_dir = stack.enter_context(
                    local_mount(lower_items, readonly=True, tmp_root=self._mount_root)
                )
            upper_dir = stack.enter_context(
                local_mount(upper_items, readonly=True, tmp_root=self._mount_root)
            )
            digest, size, diff_id = self._write(lower_dir, upper_dir, compression, extra)
        return Descriptor(
            media_type or _MEDIA_TYPES[compression],
            digest,
            size,
            annotations={ANNOTATION_UNCOMPRESSED: diff_id},
        )

    def _write(
        self, lower: Path | None, upper: Path, compression: str, extra: dict[str, str]
    ) -> tuple[str, int, str]:
        with LayerBlobWriter(self._content, compression, what="diff") as blob:
            write_diff(lower, upper, blob.stream)
            return blob.commit(labels=extra)


def _mount_list(mounts: Sequence[Mount], what: str) -> list[Mount]:
    if isinstance(mounts, (str, bytes, Mount)) or not isinstance(mounts, Sequence):
        msg = f"{what} mounts must be a sequence of Mount, got {mounts!r}"
        raise InvalidError(msg)
    items = list(mounts)
    for item in items:
        if not isinstance(item, Mount):
            msg = f"{what} mounts must be Mount values, got {item!r}"
            raise InvalidError(msg)
    return items
