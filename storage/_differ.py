"""Computing layer blobs from two snapshot mounts (containerd ``plugins/diff/walking``).

:class:`WalkingDiffer` mounts both sides read-only (:func:`storage._mount.local_mount`),
walks them with :func:`storage._archive.write_diff` and streams the tar through the
compressor into a content-store ingest: nothing is buffered in memory beyond a chunk. The
uncompressed bytes are hashed on the way for the diffID, which is stored as the content label
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

from ._archive import COMPRESSIONS, compressed_writer, write_diff
from ._content import ContentStore, ContentWriter, validate_labels
from ._errors import AlreadyExistsError, InvalidError, NotFoundError
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

__all__ = ["Differ", "WalkingDiffer"]

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

        Change rules are :func:`storage._archive.write_diff`'s. An existing blob with the
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
        if compression not in COMPRESSIONS:
            msg = f"unknown compression {compression!r}: expected one of {', '.join(COMPRESSIONS)}"
            raise InvalidError(msg)
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
        ref = f"refcache-diff-{uuid.uuid4().hex}"
        writer = self._content.writer(ref)
        committed = False
        try:
            compressed = _HashingWriter(writer)
            sink = compressed_writer(cast(BinaryIO, compressed), compression)
            uncompressed = _HashingWriter(sink)
            write_diff(lower, upper, cast(BinaryIO, uncompressed))
            sink.close()
            diff_id = uncompressed.digest
            digest = compressed.digest
            size = compressed.count
            labels = {**extra, ANNOTATION_UNCOMPRESSED: diff_id}
            try:
                writer.commit(size, digest, labels=labels)
            except AlreadyExistsError:
                # containerd: AlreadyExists is success; add the label to the existing blob.
                merge = ContentInfo(digest=digest, size=0, labels=labels)
                self._content.update(merge, *(f"labels.{k}" for k in labels))
            committed = True
        finally:
            if not committed:
                writer.close()
                with suppress(NotFoundError):
                    self._content.abort(ref)
        return digest, size, diff_id


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
