"""Immutable value types shared by the storage backends (and re-exported by ``actors``).

All are frozen, slotted dataclasses: they cross actor mailboxes unchanged (DESIGN.md rule 5).
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ._errors import InvalidError

__all__ = [
    "ANNOTATION_UNCOMPRESSED",
    "MEDIA_TYPE_DOCKER_LAYER_GZIP",
    "MEDIA_TYPE_OCI_LAYER",
    "MEDIA_TYPE_OCI_LAYER_GZIP",
    "MEDIA_TYPE_OCI_LAYER_ZSTD",
    "ContentInfo",
    "Descriptor",
    "Kind",
    "Mount",
    "SnapshotInfo",
    "Usage",
    "digest_of",
    "frozen_map",
    "validate_digest",
]

#: Annotation (and content label) carrying a layer blob's diffID.
ANNOTATION_UNCOMPRESSED = "containerd.io/uncompressed"

MEDIA_TYPE_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_TYPE_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

_DIGEST_RE = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")


def validate_digest(value: object, *, what: str = "digest") -> str:
    """Returns ``value`` if it is a well-formed ``sha256:``/``sha512:`` digest.

    Raises:
        InvalidError: naming the value, when it is not a string or malformed.
    """
    if not isinstance(value, str) or not _DIGEST_RE.match(value):
        msg = f"invalid {what} {value!r}: expected 'sha256:' followed by 64 lowercase hex digits"
        raise InvalidError(msg)
    return value


def digest_of(data: bytes) -> str:
    """Returns the ``sha256:`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def frozen_map(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """Returns a read-only copy of ``value`` (an empty one for ``None``)."""
    return MappingProxyType(dict(value or {}))


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An OCI content descriptor.

    ``annotations["containerd.io/uncompressed"]`` carries a layer's diffID.
    """

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=lambda: frozen_map(None))
    urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate_digest(self.digest)
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < -1:
            msg = f"invalid size {self.size!r} for descriptor {self.digest}"
            raise InvalidError(msg)
        if not isinstance(self.annotations, MappingProxyType):
            object.__setattr__(self, "annotations", frozen_map(self.annotations))
        if not isinstance(self.urls, tuple):
            object.__setattr__(self, "urls", tuple(self.urls))

    def __hash__(self) -> int:
        return hash((self.media_type, self.digest, self.size, self.urls))


@dataclass(frozen=True, slots=True)
class Mount:
    """A containerd-style mount: ``Mount("bind", dir, ("rbind", "ro"))`` or an overlay."""

    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""


class Kind(enum.StrEnum):
    """Snapshot kinds, as containerd names them."""

    VIEW = "view"
    ACTIVE = "active"
    COMMITTED = "committed"


@dataclass(frozen=True, slots=True)
class Usage:
    """Disk usage of a snapshot: bytes (``blocks * 512`` of unique inodes) and inode count."""

    size: int = 0
    inodes: int = 0


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """What a snapshotter knows of one snapshot (containerd ``snapshots.Info``)."""

    kind: Kind
    name: str
    parent: str = ""
    labels: Mapping[str, str] = field(default_factory=lambda: frozen_map(None))
    created_at: int = 0  #: nanoseconds since the epoch
    updated_at: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.labels, MappingProxyType):
            object.__setattr__(self, "labels", frozen_map(self.labels))

    def __hash__(self) -> int:
        return hash((self.kind, self.name, self.parent))


@dataclass(frozen=True, slots=True)
class ContentInfo:
    """What the content store knows of one blob (containerd ``content.Info``)."""

    digest: str
    size: int
    labels: Mapping[str, str] = field(default_factory=lambda: frozen_map(None))
    created_at: int = 0  #: nanoseconds since the epoch
    updated_at: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.labels, MappingProxyType):
            object.__setattr__(self, "labels", frozen_map(self.labels))

    def __hash__(self) -> int:
        return hash((self.digest, self.size))
