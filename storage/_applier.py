"""Applying layer blobs onto snapshot mounts (containerd ``core/diff/apply``).

:class:`TarApplier` streams a blob from the content store through a decompressor chosen by
its magic bytes (not its media type: BuildKit and containerd sniff too), verifies the blob's
digest and size while reading, and unpacks it with :func:`storage._archive.apply_tar`.

Mounts: a single overlay mount with an ``upperdir`` is applied straight into the upperdir with
overlayfs whiteouts (containerd's fast path; the lowerdirs are the "parents" whose directory
metadata missing parents copy), anything else through :func:`storage._mount.local_mount`
(a single bind mount is its source directory). A mount marked ``ro``, or an overlay without
an upperdir, is refused: applying writes.

A blob whose bytes do not match its descriptor raises ``FailedPreconditionError`` naming
the digest. The check completes when the blob has been read to its end, so the snapshot may
already hold a partial layer then; the caller discards it (as it does for any failed apply).

The diffID is checked too: when the descriptor carries ``containerd.io/uncompressed`` (the
diffID snapshots are shared by, through chain IDs), the digest of the uncompressed stream
must equal it, or :class:`~storage._errors.DiffIDMismatchError` (an ``InvalidError``) names
both digests. A blob that lies about its diffID would otherwise be committed under another
layer's chain ID and served as that layer's content.

Caps: a layer stops with ``InvalidError`` (naming the blob) past ``max_size`` uncompressed
bytes (default 64 GiB) or ``max_entries`` tar entries (default 10 million).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Protocol, cast, runtime_checkable

from ._archive import MAX_LAYER_ENTRIES, MAX_LAYER_SIZE, ApplyResult, LayerLimitError, apply_tar
from ._compression import decompressed_stream
from ._content import ContentStore
from ._errors import DiffIDMismatchError, FailedPreconditionError, InvalidError, RefcacheError
from ._mount import is_overlay_mount, local_mount
from ._types import ANNOTATION_UNCOMPRESSED, MEDIA_TYPE_OCI_LAYER, Descriptor, Mount

__all__ = ["Applier", "TarApplier"]

_CHUNK = 1 << 20


@runtime_checkable
class Applier(Protocol):
    """Applies a layer blob to mounts (containerd ``diff.Applier``)."""

    def apply(self, desc: Descriptor, mounts: Sequence[Mount]) -> Descriptor:
        """Unpacks the blob ``desc`` onto ``mounts``.

        Returns:
            ``Descriptor("application/vnd.oci.image.layer.v1.tar", diffID, uncompressed
            size)``.
        """
        ...


class _VerifyingReader:
    """Reads a blob while hashing it; at EOF checks size and digest against the descriptor."""

    def __init__(self, source: BinaryIO, desc: Descriptor) -> None:
        self._source = source
        self._desc = desc
        algorithm = desc.digest.partition(":")[0]
        self._hash = hashlib.new(algorithm)
        self.count = 0
        self._checked = False

    def read(self, size: int = -1) -> bytes:
        if self._checked:
            return b""
        limit = self._desc.size
        want = size if size >= 0 else _CHUNK
        if limit >= 0:
            # Read one byte past the expected end, to notice a blob that is too long.
            want = min(want, limit - self.count + 1)
        data = self._source.read(max(want, 1)) if want > 0 else b""
        if not data:
            self._check()
            return b""
        self._hash.update(data)
        self.count += len(data)
        if 0 <= limit < self.count:
            self._checked = True
            msg = f"blob {self._desc.digest} is longer than its descriptor size {limit}"
            raise FailedPreconditionError(msg)
        return data

    def _check(self) -> None:
        self._checked = True
        problem = self.problem()
        if problem:
            raise FailedPreconditionError(problem)

    def problem(self) -> str | None:
        """Returns what is wrong with the bytes read (all of the blob), or ``None``."""
        digest = f"{self._desc.digest.partition(':')[0]}:{self._hash.hexdigest()}"
        if self._desc.size >= 0 and self.count != self._desc.size:
            return (
                f"blob {self._desc.digest} is truncated or resized: read {self.count} bytes, "
                f"descriptor says {self._desc.size}"
            )
        if digest != self._desc.digest:
            return f"blob {self._desc.digest} is corrupt: its content has digest {digest}"
        return None

    def finish(self) -> str | None:
        """Reads the rest of the blob and returns the verification problem, if any."""
        if self._checked:
            return None
        try:
            while self.read(_CHUNK):
                pass
        except FailedPreconditionError as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot read blob {self._desc.digest}: {exc}"
        return None


#: An overlay mount's upperdir, lowerdirs (top first) and ``userxattr`` option.
_OverlayDirs = tuple[str, list[str], bool]


def _overlay_dirs(mount: Mount) -> _OverlayDirs:
    upper = ""
    lowers: list[str] = []
    for opt in mount.options:
        if opt.startswith("upperdir="):
            upper = opt.removeprefix("upperdir=")
        elif opt.startswith("lowerdir="):
            lowers = [d for d in opt.removeprefix("lowerdir=").split(":") if d]
    return upper, lowers, "userxattr" in mount.options


class TarApplier:
    """The embedded applier: tar layers (uncompressed, gzip, zstd) with OCI whiteouts.

    Stateless apart from the content store; any thread may call :meth:`apply` (one apply per
    target at a time, which the snapshotter's active snapshots already guarantee).

    Args:
        content: Where blobs are read from (``reader_at``).
        mount_root: Where temporary mount points go (a cache passes ``<root>/mounts``);
            the system temp dir when ``None``.
        max_size: Cap on a layer's uncompressed size in bytes.
        max_entries: Cap on a layer's number of tar entries.

    Raises:
        InvalidError: A cap that is not a positive integer.
    """

    def __init__(
        self,
        content: ContentStore,
        *,
        mount_root: str | os.PathLike[str] | None = None,
        max_size: int = MAX_LAYER_SIZE,
        max_entries: int = MAX_LAYER_ENTRIES,
    ) -> None:
        self._content = content
        self._mount_root = mount_root
        self.max_size = check_cap("max_layer_size", max_size)
        self.max_entries = check_cap("max_layer_entries", max_entries)

    def apply(self, desc: Descriptor, mounts: Sequence[Mount]) -> Descriptor:
        """Unpacks the blob ``desc`` onto ``mounts`` (containerd ``Applier.Apply``).

        Args:
            desc: The layer blob (any tar media type; compression is sniffed).
            mounts: The active snapshot's mounts.

        Returns:
            ``Descriptor(MEDIA_TYPE_OCI_LAYER, diffID, uncompressed size)``.

        Raises:
            DiffIDMismatchError: ``desc`` claims a diffID (``containerd.io/uncompressed``)
                that its content does not have (an ``InvalidError`` naming both digests).
            InvalidError: Bad arguments, a malformed/hostile archive (the entry is named), or
                a layer past the size or entry cap (the blob is named).
            NotFoundError: The blob is not in the content store.
            FailedPreconditionError: The blob does not match ``desc`` (digest or size), or
                the mounts are read-only or cannot be written.
            StoreFullError: The disk filled up.
        """
        if not isinstance(desc, Descriptor):
            msg = f"apply needs a Descriptor, got {type(desc).__name__}"
            raise InvalidError(msg)
        items = _check_mounts(mounts)
        overlay = _writable_overlay(desc, items)
        source = self._content.reader_at(desc.digest)
        try:
            result = self._apply_verified(desc, source, items, overlay)
        finally:
            source.close()
        claimed = desc.annotations.get(ANNOTATION_UNCOMPRESSED)
        if claimed is not None and claimed != result.diff_id:
            raise DiffIDMismatchError(desc.digest, claimed, result.diff_id)
        return Descriptor(MEDIA_TYPE_OCI_LAYER, result.diff_id, result.size)

    def _apply_verified(
        self,
        desc: Descriptor,
        source: BinaryIO,
        items: list[Mount],
        overlay: _OverlayDirs | None,
    ) -> ApplyResult:
        """Unpacks ``source`` while checking that it is ``desc`` (digest and size)."""
        verifier = _VerifyingReader(source, desc)
        try:
            stream = decompressed_stream(cast(BinaryIO, verifier))
            try:
                result = self._unpack(stream, items, overlay)
            finally:
                stream.close()
            problem = verifier.finish()
        except FailedPreconditionError:
            raise
        except LayerLimitError as exc:
            msg = f"cannot apply blob {desc.digest}: {exc}"
            raise InvalidError(msg) from exc
        except RefcacheError as exc:
            # A corrupt blob usually fails to decompress before its digest can be
            # checked: report the digest mismatch, which is the real cause.
            problem = verifier.finish()
            if problem:
                raise FailedPreconditionError(problem) from exc
            raise
        if problem:
            raise FailedPreconditionError(problem)
        return result

    def _unpack(
        self, stream: BinaryIO, items: list[Mount], overlay: _OverlayDirs | None
    ) -> ApplyResult:
        """Straight into an overlay's upperdir (overlayfs whiteouts), else into the mounted
        tree."""
        if overlay is not None:
            upper, lowers, userxattr = overlay
            return apply_tar(
                stream,
                Path(upper),
                overlay=True,
                parents=[Path(d) for d in lowers],
                userxattr=userxattr,
                max_size=self.max_size,
                max_entries=self.max_entries,
            )
        with local_mount(items, tmp_root=self._mount_root) as root:
            return apply_tar(stream, root, max_size=self.max_size, max_entries=self.max_entries)


def _writable_overlay(desc: Descriptor, items: list[Mount]) -> _OverlayDirs | None:
    """The upperdir, lowerdirs and ``userxattr`` flag of a single overlay mount (``None`` for
    anything else); refuses a read-only target.

    Raises:
        FailedPreconditionError: An overlay without an upperdir, or a mount marked ``ro``.
    """
    overlay = _overlay_dirs(items[0]) if len(items) == 1 and is_overlay_mount(items[0]) else None
    if overlay is not None and not overlay[0]:
        msg = f"cannot apply {desc.digest}: overlay mount has no upperdir (read-only)"
        raise FailedPreconditionError(msg)
    for mount in items:
        if "ro" in mount.options:
            msg = f"cannot apply {desc.digest}: mount of {mount.source!r} is read-only"
            raise FailedPreconditionError(msg)
    return overlay


def check_cap(name: str, value: object) -> int:
    """Returns ``value`` if it is a positive integer cap, else raises ``InvalidError``."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        msg = f"{name} must be a positive integer, got {value!r}"
        raise InvalidError(msg)
    return value


def _check_mounts(mounts: Sequence[Mount]) -> list[Mount]:
    if isinstance(mounts, (str, bytes, Mount)) or not isinstance(mounts, Sequence):
        msg = f"expected a sequence of Mount, got {mounts!r}"
        raise InvalidError(msg)
    items = list(mounts)
    if not items:
        msg = "cannot apply a layer onto an empty mount list"
        raise InvalidError(msg)
    for item in items:
        if not isinstance(item, Mount):
            msg = f"expected a Mount, got {item!r}"
            raise InvalidError(msg)
    return items
