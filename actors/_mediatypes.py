"""Layer identities and media types: chain IDs, diffIDs, the compression a layer media type
names, and BuildKit's distributable/non-distributable and Docker/OCI media type mapping.

Pure functions of descriptors and strings (no cache, no actor).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Final

from ..storage import (
    ANNOTATION_UNCOMPRESSED,
    MEDIA_TYPE_DOCKER_LAYER_GZIP,
    MEDIA_TYPE_OCI_LAYER,
    MEDIA_TYPE_OCI_LAYER_GZIP,
    MEDIA_TYPE_OCI_LAYER_ZSTD,
    Descriptor,
    InvalidError,
    validate_digest,
)

__all__ = [
    "chain_id",
    "compression_media_type",
    "diff_id_of",
    "filter_annotations_for_save",
    "is_non_distributable",
    "media_type_compression",
    "needs_conversion",
    "to_distributable",
    "to_non_distributable",
]

# BuildKit additionalAnnotations minus estargz/overlaybd (out of scope).
_SAVED_ANNOTATIONS: Final = (ANNOTATION_UNCOMPRESSED,)

MEDIA_TYPE_DOCKER_LAYER: Final = "application/vnd.docker.image.rootfs.diff.tar"
MEDIA_TYPE_DOCKER_LAYER_ZSTD: Final = "application/vnd.docker.image.rootfs.diff.tar.zstd"
MEDIA_TYPE_DOCKER_FOREIGN: Final = "application/vnd.docker.image.rootfs.foreign.diff.tar"
MEDIA_TYPE_DOCKER_FOREIGN_GZIP: Final = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
MEDIA_TYPE_OCI_NONDIST: Final = "application/vnd.oci.image.layer.nondistributable.v1.tar"
MEDIA_TYPE_OCI_NONDIST_GZIP: Final = MEDIA_TYPE_OCI_NONDIST + "+gzip"
MEDIA_TYPE_OCI_NONDIST_ZSTD: Final = MEDIA_TYPE_OCI_NONDIST + "+zstd"

_LAYER_COMPRESSION: Final[Mapping[str, str]] = {
    MEDIA_TYPE_OCI_LAYER: "uncompressed",
    MEDIA_TYPE_OCI_LAYER_GZIP: "gzip",
    MEDIA_TYPE_OCI_LAYER_ZSTD: "zstd",
    MEDIA_TYPE_DOCKER_LAYER: "uncompressed",
    MEDIA_TYPE_DOCKER_LAYER_GZIP: "gzip",
    MEDIA_TYPE_DOCKER_LAYER_ZSTD: "zstd",
    MEDIA_TYPE_OCI_NONDIST: "uncompressed",
    MEDIA_TYPE_OCI_NONDIST_GZIP: "gzip",
    MEDIA_TYPE_OCI_NONDIST_ZSTD: "zstd",
    MEDIA_TYPE_DOCKER_FOREIGN: "uncompressed",
    MEDIA_TYPE_DOCKER_FOREIGN_GZIP: "gzip",
}
_OCI_BY_COMPRESSION: Final[Mapping[str, str]] = {
    "uncompressed": MEDIA_TYPE_OCI_LAYER,
    "gzip": MEDIA_TYPE_OCI_LAYER_GZIP,
    "zstd": MEDIA_TYPE_OCI_LAYER_ZSTD,
}
_DOCKER_BY_COMPRESSION: Final[Mapping[str, str]] = {
    "uncompressed": MEDIA_TYPE_DOCKER_LAYER,
    "gzip": MEDIA_TYPE_DOCKER_LAYER_GZIP,
    "zstd": MEDIA_TYPE_DOCKER_LAYER_ZSTD,
}
_NONDIST_BY_COMPRESSION: Final[Mapping[str, str]] = {
    "uncompressed": MEDIA_TYPE_OCI_NONDIST,
    "gzip": MEDIA_TYPE_OCI_NONDIST_GZIP,
    "zstd": MEDIA_TYPE_OCI_NONDIST_ZSTD,
}
_TO_DISTRIBUTABLE: Final[Mapping[str, str]] = {
    MEDIA_TYPE_OCI_NONDIST: MEDIA_TYPE_OCI_LAYER,
    MEDIA_TYPE_OCI_NONDIST_GZIP: MEDIA_TYPE_OCI_LAYER_GZIP,
    MEDIA_TYPE_OCI_NONDIST_ZSTD: MEDIA_TYPE_OCI_LAYER_ZSTD,
    MEDIA_TYPE_DOCKER_FOREIGN: MEDIA_TYPE_DOCKER_LAYER,
    MEDIA_TYPE_DOCKER_FOREIGN_GZIP: MEDIA_TYPE_DOCKER_LAYER_GZIP,
}
_TO_NON_DISTRIBUTABLE: Final[Mapping[str, str]] = {v: k for k, v in _TO_DISTRIBUTABLE.items()}


def chain_id(*digests: str) -> str:
    """OCI image-spec ``identity.ChainID``: ``ChainID([a]) = a``,
    ``ChainID([a, b]) = "sha256:" + sha256(f"{a} {b}")``, applied left to right."""
    out = digests[0]
    for d in digests[1:]:
        out = "sha256:" + hashlib.sha256(f"{out} {d}".encode()).hexdigest()
    return out


def diff_id_of(desc: Descriptor) -> str:
    """The diffID of a layer descriptor (its ``containerd.io/uncompressed`` annotation).

    Raises:
        InvalidError: the annotation is missing or not a digest (BuildKit
            ``diffIDFromDescriptor``).
    """
    value = desc.annotations.get(ANNOTATION_UNCOMPRESSED)
    if value is None:
        msg = f"blob {desc.digest} has no {ANNOTATION_UNCOMPRESSED} annotation (its diffID)"
        raise InvalidError(msg)
    return validate_digest(value, what=f"diffID of blob {desc.digest}")


def media_type_compression(media_type: str) -> str | None:
    """The compression of a layer media type, or ``None`` for anything but a known layer."""
    return _LAYER_COMPRESSION.get(media_type)


def compression_media_type(compression: str, like: str = "") -> str:
    """The layer media type of ``compression``, in the family of ``like`` (OCI by default:
    docker media types stay docker, non-distributable ones stay non-distributable)."""
    if like.startswith("application/vnd.docker.") and compression in _DOCKER_BY_COMPRESSION:
        return _DOCKER_BY_COMPRESSION[compression]
    if is_non_distributable(like):
        return _NONDIST_BY_COMPRESSION[compression]
    return _OCI_BY_COMPRESSION[compression]


def is_non_distributable(media_type: str) -> bool:
    """containerd ``images.IsNonDistributable``."""
    return media_type.startswith(
        (
            "application/vnd.oci.image.layer.nondistributable.",
            "application/vnd.docker.image.rootfs.foreign.",
        )
    )


def to_distributable(media_type: str) -> str:
    """BuildKit ``layerToDistributable``: the distributable twin of a layer media type."""
    return _TO_DISTRIBUTABLE.get(media_type, media_type)


def to_non_distributable(media_type: str) -> str:
    """BuildKit ``layerToNonDistributable``.

    One deliberate difference: BuildKit maps the docker gzip layer type to itself (its switch
    names the foreign type in that case); here it becomes the foreign gzip type.
    """
    return _TO_NON_DISTRIBUTABLE.get(media_type, media_type)


def needs_conversion(desc: Descriptor, compression: str) -> bool:
    """Whether ``desc`` must be converted to be a ``compression`` layer (media type based,
    as BuildKit's ``Type.NeedsConversion``; non-layer media types never need it)."""
    current = media_type_compression(desc.media_type)
    return current is not None and current != compression


def filter_annotations_for_save(annotations: Mapping[str, str] | None) -> dict[str, str]:
    """BuildKit ``filterAnnotationsForSave``: the annotations worth keeping as labels."""
    if not annotations:
        return {}
    return {k: annotations[k] for k in _SAVED_ANNOTATIONS if k in annotations}
