"""An OCI image layout directory as a push target and pull source (``oci-layout://DIR``).

The layout of the OCI image spec (BuildKit's ``type=local`` cache, for air-gapped transfer)::

    DIR/oci-layout              {"imageLayoutVersion": "1.0.0"}
    DIR/index.json              one entry per tag: the cache image's index, annotated
                                org.opencontainers.image.ref.name = TAG
    DIR/blobs/sha256/<hex>      every blob, manifest, config and index by digest

Blobs are written to a temporary file next to their place, hashed while written, checked
against their descriptor (size and digest), flushed and renamed into place: a crash never
leaves a wrong blob under a digest. ``index.json`` is replaced atomically (write, fsync,
rename) under an exclusive ``flock`` of the directory, so two processes tagging into one
layout never lose each other's tags (the last one to tag the same name wins, as with a
registry). Blobs already present are not written again.

The same interface as :class:`storage._registry.RegistryRepository` (``has_blob``,
``open_blob``, ``put_blob``, ``has_manifest``, ``get_manifest``, ``put_manifest``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Final

from ._errors import (
    FailedPreconditionError,
    InvalidError,
    NotFoundError,
    RefcacheError,
    UnavailableError,
)
from ._oci import ANNOTATION_REF_NAME, MEDIA_TYPE_OCI_INDEX, canonical_json, digest_bytes
from ._types import Descriptor, validate_digest

__all__ = ["OciLayout"]

_CHUNK: Final = 1 << 20
_LAYOUT_DOC: Final = {"imageLayoutVersion": "1.0.0"}


class _CountingFile:
    """A read-only file that reports the bytes read (progress, metrics)."""

    def __init__(self, f: BinaryIO, on_bytes: Callable[[int], None] | None) -> None:
        self._f = f
        self._on_bytes = on_bytes

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        if data and self._on_bytes is not None:
            self._on_bytes(len(data))
        return data

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> _CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OciLayout:
    """One OCI image layout directory.

    Args:
        path: The directory (created by the first push).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = str(self.path)

    def __repr__(self) -> str:
        return f"OciLayout({str(self.path)!r})"

    @property
    def description(self) -> str:
        """``OCI layout DIR`` (what error messages say)."""
        return f"OCI layout {self.path}"

    def _blob_path(self, digest: str) -> Path:
        validate_digest(digest)
        algo, _, hexa = digest.partition(":")
        return self.path / "blobs" / algo / hexa

    def _require_layout(self, what: str) -> None:
        if not self.path.is_dir():
            msg = f"{self.description} unavailable: {what}: no such directory"
            raise UnavailableError(msg)
        if not (self.path / "oci-layout").is_file():
            msg = f"{self.description} is not an OCI image layout (no oci-layout file): {what}"
            raise InvalidError(msg)

    def _init(self) -> None:
        try:
            (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            marker = self.path / "oci-layout"
            if not marker.exists():
                _atomic_write(marker, canonical_json(_LAYOUT_DOC))
            index = self.path / "index.json"
            if not index.exists():
                _atomic_write(index, _index_bytes([]))
        except OSError as exc:
            msg = f"cannot create {self.description}: {exc}"
            raise RefcacheError(msg) from exc

    # -- blobs ----------------------------------------------------------------------------

    def has_blob(self, digest: str, *, push: bool = False) -> bool:
        """Whether the layout has blob ``digest``."""
        del push
        return self._blob_path(digest).is_file()

    def open_blob(
        self, desc: Descriptor, *, on_bytes: Callable[[int], None] | None = None
    ) -> _CountingFile:
        """Opens blob ``desc`` for reading (the content store verifies what it reads).

        Raises:
            UnavailableError: the layout directory is gone (unmounted, moved).
            NotFoundError: the layout has no such blob.
        """
        self._require_layout(f"fetch of blob {desc.digest}")
        with self._blob_errors(f"blob {desc.digest}", "fetch"):
            f = self._blob_path(desc.digest).open("rb")
        return _CountingFile(f, on_bytes)

    @contextlib.contextmanager
    def _blob_errors(self, what: str, action: str) -> Iterator[None]:
        """A missing blob file is :class:`NotFoundError`, any other failure to read it
        :class:`UnavailableError` (the layout's disk went away)."""
        try:
            yield
        except FileNotFoundError as exc:
            msg = f"{what}: not found in {self.description}"
            raise NotFoundError(msg) from exc
        except OSError as exc:
            msg = f"{self.description} unavailable: {action} of {what}: {exc}"
            raise UnavailableError(msg) from exc

    def mount_blob(self, digest: str, source: str) -> str | None:
        """Layouts have no repositories to mount from.

        Raises:
            InvalidError: always.
        """
        msg = f"{self.description} cannot mount blob {digest} from {source}"
        raise InvalidError(msg)

    def put_blob(
        self,
        desc: Descriptor,
        opener: Callable[[], BinaryIO],
        *,
        session: str | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        """Copies ``opener()``'s stream to the blob ``desc``, verified, atomically.

        Raises:
            FailedPreconditionError: the stream does not match ``desc``; nothing is kept.
        """
        del session
        self._init()
        target = self._blob_path(desc.digest)
        if target.is_file():
            return
        h = hashlib.sha256()
        size = 0
        tmp = target.with_name(f".tmp-{uuid.uuid4().hex}")
        try:
            with opener() as src, tmp.open("wb") as out:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            digest = "sha256:" + h.hexdigest()
            if digest != desc.digest or size != desc.size:
                msg = (
                    f"blob for {self.description} does not match its descriptor: expected "
                    f"{desc.digest} ({desc.size} bytes), got {digest} ({size} bytes)"
                )
                raise FailedPreconditionError(msg)
            tmp.replace(target)
        except OSError as exc:
            msg = f"cannot write blob {desc.digest} into {self.description}: {exc}"
            raise RefcacheError(msg) from exc
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _write_small(self, data: bytes) -> str:
        digest = digest_bytes(data)
        self._init()
        target = self._blob_path(digest)
        if not target.is_file():
            try:
                _atomic_write(target, data)
            except OSError as exc:
                msg = f"cannot write blob {digest} into {self.description}: {exc}"
                raise RefcacheError(msg) from exc
        return digest

    # -- manifests ------------------------------------------------------------------------

    def has_manifest(self, digest: str) -> bool:
        """Whether the layout has manifest ``digest`` (a blob like any other)."""
        return self.has_blob(digest)

    def _read_index(self) -> dict[str, Any]:
        path = self.path / "index.json"
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {"schemaVersion": 2, "manifests": []}
        except (OSError, ValueError) as exc:
            msg = f"{self.description}: unreadable index.json: {exc}"
            raise InvalidError(msg) from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("manifests", []), list):
            msg = f"{self.description}: index.json is not an OCI image index"
            raise InvalidError(msg)
        return doc

    def get_manifest(self, reference: str) -> tuple[str, bytes, str]:
        """A manifest or index by tag (``index.json``) or digest; the bytes are verified.

        Raises:
            NotFoundError: no such tag or blob.
            InvalidError: a blob whose bytes do not match its digest.
        """
        self._require_layout(f"read of {reference}")
        media_type = ""
        if reference.startswith("sha256:"):
            digest = reference
        else:
            entry = None
            for item in self._read_index().get("manifests", []):
                annotations = item.get("annotations") if isinstance(item, dict) else None
                if (
                    isinstance(annotations, dict)
                    and annotations.get(ANNOTATION_REF_NAME) == reference
                ):
                    entry = item
            if entry is None:
                msg = f"tag {reference!r}: not found in {self.description}"
                raise NotFoundError(msg)
            digest = str(entry.get("digest", ""))
            media_type = str(entry.get("mediaType", ""))
        with self._blob_errors(f"manifest {digest}", "read"):
            data = self._blob_path(digest).read_bytes()
        if digest_bytes(data) != digest:
            msg = f"manifest {digest} in {self.description} does not match its digest"
            raise InvalidError(msg)
        return media_type, data, digest

    def put_manifest(self, reference: str, media_type: str, data: bytes) -> str:
        """Writes a manifest blob; a tag also points ``index.json`` at it (replacing the
        tag's previous entry). Returns its digest."""
        digest = self._write_small(data)
        if reference.startswith("sha256:"):
            return digest
        entry = {
            "mediaType": media_type,
            "digest": digest,
            "size": len(data),
            "annotations": {ANNOTATION_REF_NAME: reference},
        }
        with self._locked():
            doc = self._read_index()
            kept = [
                item
                for item in doc.get("manifests", [])
                if not (
                    isinstance(item, dict)
                    and isinstance(item.get("annotations"), dict)
                    and item["annotations"].get(ANNOTATION_REF_NAME) == reference
                )
            ]
            kept.append(entry)
            try:
                _atomic_write(self.path / "index.json", _index_bytes(kept))
            except OSError as exc:
                msg = f"cannot write index.json of {self.description}: {exc}"
                raise RefcacheError(msg) from exc
        return digest

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _index_bytes(manifests: list[Any]) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": manifests}
    return json.dumps(doc, indent=2).encode() + b"\n"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
