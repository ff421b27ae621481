"""OCI image documents of a cache image, and the targets they are pushed to.

A *cache image* is one OCI image index, tagged, with one OCI image manifest per exported
name. Each manifest is the layer chain of one record (root first); its config is a
``rootfs``-style image config carrying the diffIDs. What refcache keeps of a record travels
in documented places (docs/DISTRIBUTED.md, "The cache image"):

* index -> manifests: annotation ``refcache.name`` (the name given to ``push``);
* manifest layer descriptors: ``containerd.io/uncompressed`` (the diffID, what ``pull``
  needs to make a record without the config), ``buildkit/createdat`` (the layer record's
  creation time), ``refcache.description`` and ``refcache.record-type`` (when set);
* manifest annotations: ``refcache.name``, ``refcache.description``,
  ``refcache.record-type``, ``org.opencontainers.image.created`` of the named record;
* config: ``rootfs.diff_ids``, one ``history`` entry per layer (its creation time and
  description), and ``config.Labels`` with the named record's ``refcache.*`` values (what
  image tools show).

A pull needs the index and the manifests only (no config, no layer): that is what makes a
lazy pull, or a re-pull after a restart, cheap.

Pure functions and frozen values; no I/O here (``storage._registry`` talks to registries,
``storage._ocilayout`` to layout directories).
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from ._errors import InvalidError
from ._times import format_rfc3339_ns, parse_rfc3339_ns
from ._types import ANNOTATION_UNCOMPRESSED, Descriptor, frozen_map, validate_digest

__all__ = [
    "ANNOTATION_CREATED",
    "ANNOTATION_DESCRIPTION",
    "ANNOTATION_NAME",
    "ANNOTATION_RECORD_TYPE",
    "ANNOTATION_REF_NAME",
    "MEDIA_TYPE_DOCKER_MANIFEST",
    "MEDIA_TYPE_DOCKER_MANIFEST_LIST",
    "MEDIA_TYPE_OCI_CONFIG",
    "MEDIA_TYPE_OCI_INDEX",
    "MEDIA_TYPE_OCI_MANIFEST",
    "CacheEntry",
    "LayerMeta",
    "ParsedImage",
    "Target",
    "build_config",
    "build_index",
    "build_manifest",
    "canonical_json",
    "parse_image",
    "parse_manifest",
    "parse_target",
    "validate_name",
]

MEDIA_TYPE_OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_TYPE_DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"

#: Index entry annotation: the name a manifest was pushed under.
ANNOTATION_NAME: Final = "refcache.name"
#: A record's description (layer descriptors, manifest annotations, config labels).
ANNOTATION_DESCRIPTION: Final = "refcache.description"
#: A record's type (BuildKit's ``cache.recordType``) when it is not ``regular``.
ANNOTATION_RECORD_TYPE: Final = "refcache.record-type"
#: A layer record's creation time, RFC 3339 (the annotation BuildKit's cache manifests use).
ANNOTATION_CREATED_AT: Final = "buildkit/createdat"
#: The named record's creation time (OCI pre-defined annotation).
ANNOTATION_CREATED: Final = "org.opencontainers.image.created"
#: The tag of an image in an OCI layout's ``index.json``.
ANNOTATION_REF_NAME: Final = "org.opencontainers.image.ref.name"

_MANIFEST_TYPES: Final = (MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST)
_INDEX_TYPES: Final = (MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_MANIFEST_LIST)

# Distribution's reference grammar (docker/distribution reference/regexp.go).
_COMPONENT: Final = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE: Final = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE: Final = re.compile(r"[\w][\w.-]{0,127}")
_HOST_RE: Final = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?"
)
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/@+=-]{0,254}")

SCHEMES: Final = ("registry", "oci-layout")
#: The tag of an ``oci-layout://DIR`` target without one (BuildKit's ``type=local`` default).
DEFAULT_LAYOUT_TAG: Final = "latest"


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed push target or pull source.

    Attributes:
        scheme: ``"registry"`` or ``"oci-layout"``.
        host: ``HOST[:PORT]`` of a registry (``""`` for a layout).
        repository: Repository path in the registry (``""`` for a layout).
        tag: The tag (always set for a push target).
        digest: A manifest digest to pull (``registry://HOST/REPO@sha256:...``), else ``""``.
        path: The layout directory (``None`` for a registry).
        text: The string it was parsed from.
    """

    scheme: Literal["registry", "oci-layout"]
    host: str
    repository: str
    tag: str
    digest: str = ""
    path: Path | None = None
    text: str = ""

    @property
    def reference(self) -> str:
        """The tag, or the digest when pulling by digest."""
        return self.digest or self.tag

    def __str__(self) -> str:
        return self.text or (
            f"oci-layout://{self.path}:{self.tag}"
            if self.scheme == "oci-layout"
            else f"registry://{self.host}/{self.repository}:{self.tag}"
        )


def parse_target(value: object, *, what: str = "target", allow_digest: bool = False) -> Target:
    """Parses ``registry://HOST[:PORT]/REPO:TAG`` or ``oci-layout://DIR[:TAG]``.

    A registry reference needs an explicit tag (no implicit ``latest``: a cache image pushed
    under the wrong tag silently replaces another one); with ``allow_digest`` (pulls),
    ``REPO@sha256:...`` names one index by digest. A layout without ``:TAG`` uses
    ``latest``; the tag is what follows the last ``:`` after the last ``/``.

    Raises:
        InvalidError: not a string, an unknown scheme, or a malformed host, repository or
            tag; the message names the value.
    """
    if not isinstance(value, str) or not value:
        msg = f"invalid {what} {value!r}: expected registry://HOST[:PORT]/REPO:TAG or oci-layout://DIR[:TAG]"
        raise InvalidError(msg)
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in SCHEMES:
        msg = (
            f"invalid {what} {value!r}: unknown scheme {scheme + '://' if sep else '(none)'}; "
            "expected registry://HOST[:PORT]/REPO:TAG or oci-layout://DIR[:TAG]"
        )
        raise InvalidError(msg)
    if scheme == "oci-layout":
        return _parse_layout(value, rest, what)
    return _parse_registry(value, rest, what, allow_digest)


def _parse_layout(value: str, rest: str, what: str) -> Target:
    if not rest:
        msg = f"invalid {what} {value!r}: no directory after oci-layout://"
        raise InvalidError(msg)
    directory, tag = rest, DEFAULT_LAYOUT_TAG
    head, sep, tail = rest.rpartition(":")
    if sep and "/" not in tail:
        if not head or not _TAG_RE.fullmatch(tail):
            msg = (
                f"invalid {what} {value!r}: bad tag {tail!r} (expected [A-Za-z0-9_][A-Za-z0-9_.-]*)"
            )
            raise InvalidError(msg)
        directory, tag = head, tail
    return Target("oci-layout", "", "", tag, "", Path(directory), value)


def _parse_registry(value: str, rest: str, what: str, allow_digest: bool) -> Target:
    host, sep, path = rest.partition("/")
    if not sep or not host or not path:
        msg = f"invalid {what} {value!r}: expected registry://HOST[:PORT]/REPO:TAG"
        raise InvalidError(msg)
    if not _HOST_RE.fullmatch(host) or not _port_ok(host):
        msg = f"invalid {what} {value!r}: bad registry host {host!r}"
        raise InvalidError(msg)
    digest = ""
    if "@" in path:
        path, _, digest = path.partition("@")
        if not allow_digest:
            msg = f"invalid {what} {value!r}: a push target needs a tag, not a digest"
            raise InvalidError(msg)
        try:
            validate_digest(digest, what=f"digest in {what} {value!r}")
        except InvalidError as exc:
            raise InvalidError(str(exc)) from None
    repo, tag = path, ""
    head, sep, tail = path.rpartition(":")
    if sep:
        repo, tag = head, tail
        if not _TAG_RE.fullmatch(tag):
            msg = (
                f"invalid {what} {value!r}: bad tag {tag!r} (expected [A-Za-z0-9_][A-Za-z0-9_.-]*)"
            )
            raise InvalidError(msg)
    if not _REPO_RE.fullmatch(repo) or len(repo) > 255:
        msg = (
            f"invalid {what} {value!r}: bad repository {repo!r} (lowercase path components "
            "of [a-z0-9] separated by '.', '_', '__' or '-', joined by '/')"
        )
        raise InvalidError(msg)
    if not tag and not digest:
        msg = (
            f"invalid {what} {value!r}: no tag; a cache image is always tagged explicitly "
            "(registry://HOST[:PORT]/REPO:TAG)"
        )
        raise InvalidError(msg)
    return Target("registry", host, repo, tag, digest, None, value)


def _port_ok(host: str) -> bool:
    if host.endswith("]") or ":" not in host.rsplit("]", 1)[-1]:
        return True
    port = int(host.rsplit(":", 1)[1])
    return 0 < port < 65536


def validate_name(value: object) -> str:
    """Returns ``value`` if it is a valid name for one record of a cache image.

    Raises:
        InvalidError: not a string of ``[A-Za-z0-9][A-Za-z0-9._/@+=-]*`` (at most 255).
    """
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        msg = (
            f"invalid cache image name {value!r}: expected 1-255 characters of "
            "[A-Za-z0-9._/@+=-], starting with a letter or digit"
        )
        raise InvalidError(msg)
    return value


# -- building -------------------------------------------------------------------------------


def canonical_json(doc: Mapping[str, Any]) -> bytes:
    """Deterministic JSON bytes (sorted keys, no spaces): equal documents, equal digests."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor_json(desc: Descriptor) -> dict[str, Any]:
    """An OCI descriptor object (``mediaType``, ``digest``, ``size``, optional extras)."""
    out: dict[str, Any] = {"mediaType": desc.media_type, "digest": desc.digest, "size": desc.size}
    if desc.annotations:
        out["annotations"] = dict(sorted(desc.annotations.items()))
    if desc.urls:
        out["urls"] = list(desc.urls)
    return out


@dataclass(frozen=True, slots=True)
class LayerMeta:
    """What a cache image keeps of one layer record besides its blob.

    Attributes:
        description: The record's description (``""``: none).
        record_type: The record type (``""`` or ``"regular"``: the default).
        created_at: Creation time in nanoseconds since the epoch (0: unknown).
    """

    description: str = ""
    record_type: str = ""
    created_at: int = 0


def parse_rfc3339(text: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 time; 0 when it cannot be parsed (a
    creation time is informative, never a reason to fail a pull)."""
    try:
        return parse_rfc3339_ns(text)
    except ValueError:
        return 0


def _record_annotations(meta: LayerMeta) -> dict[str, str]:
    out: dict[str, str] = {}
    if meta.description:
        out[ANNOTATION_DESCRIPTION] = meta.description
    if meta.record_type and meta.record_type != "regular":
        out[ANNOTATION_RECORD_TYPE] = meta.record_type
    return out


def _go_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        machine, machine or "unknown"
    )


def build_config(
    layers: Sequence[Descriptor], metas: Sequence[LayerMeta], top: LayerMeta
) -> tuple[Descriptor, bytes]:
    """The image config of one record's chain: diffIDs, per-layer history, labels.

    Deterministic: the same chain and metadata give the same bytes (and so a blob the
    registry has already).
    """
    diff_ids = [_diff_id(d) for d in layers]
    history = []
    for meta in metas:
        entry: dict[str, Any] = {}
        if meta.created_at:
            entry["created"] = format_rfc3339_ns(meta.created_at)
        if meta.description:
            entry["created_by"] = meta.description
        entry["comment"] = "refcache layer record"
        history.append(entry)
    labels = _record_annotations(top)
    doc: dict[str, Any] = {
        "architecture": _go_arch(),
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
        "config": {"Labels": labels} if labels else {},
    }
    if top.created_at:
        doc["created"] = format_rfc3339_ns(top.created_at)
    data = canonical_json(doc)
    return Descriptor(MEDIA_TYPE_OCI_CONFIG, _digest(data), len(data)), data


def _diff_id(desc: Descriptor) -> str:
    value = desc.annotations.get(ANNOTATION_UNCOMPRESSED)
    if value is None:
        msg = f"layer {desc.digest} has no {ANNOTATION_UNCOMPRESSED} annotation (its diffID)"
        raise InvalidError(msg)
    return validate_digest(value, what=f"diffID of layer {desc.digest}")


def build_manifest(
    name: str,
    config: Descriptor,
    layers: Sequence[Descriptor],
    metas: Sequence[LayerMeta],
    top: LayerMeta,
) -> tuple[Descriptor, bytes]:
    """The OCI image manifest of one named record (layers root first)."""
    layer_docs = []
    for desc, meta in zip(layers, metas, strict=True):
        annotations = {
            k: v
            for k, v in desc.annotations.items()
            if k in (ANNOTATION_UNCOMPRESSED, ANNOTATION_CREATED_AT)
        }
        annotations.update(_record_annotations(meta))
        if meta.created_at and ANNOTATION_CREATED_AT not in annotations:
            annotations[ANNOTATION_CREATED_AT] = format_rfc3339_ns(meta.created_at)
        layer_docs.append(
            descriptor_json(
                Descriptor(desc.media_type, desc.digest, desc.size, annotations, desc.urls)
            )
        )
    annotations = {ANNOTATION_NAME: name, **_record_annotations(top)}
    if top.created_at:
        annotations[ANNOTATION_CREATED] = format_rfc3339_ns(top.created_at)
    doc = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": descriptor_json(config),
        "layers": layer_docs,
        "annotations": annotations,
    }
    data = canonical_json(doc)
    return Descriptor(MEDIA_TYPE_OCI_MANIFEST, _digest(data), len(data)), data


def build_index(manifests: Mapping[str, Descriptor]) -> tuple[Descriptor, bytes]:
    """The cache image: one index entry per name (sorted), annotated ``refcache.name``."""
    entries = []
    for name in sorted(manifests):
        d = manifests[name]
        entries.append(
            descriptor_json(Descriptor(d.media_type, d.digest, d.size, {ANNOTATION_NAME: name}))
        )
    doc = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": entries}
    data = canonical_json(doc)
    return Descriptor(MEDIA_TYPE_OCI_INDEX, _digest(data), len(data)), data


# -- parsing --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One manifest listed by a cache image's index (or the image itself, when a plain image
    is pulled): its name and descriptor."""

    name: str
    desc: Descriptor


@dataclass(frozen=True, slots=True)
class ParsedImage:
    """One image manifest: its config and layers (root first), and the layers' metadata."""

    config: Descriptor
    layers: tuple[Descriptor, ...]
    metas: tuple[LayerMeta, ...]
    annotations: Mapping[str, str] = field(default_factory=lambda: frozen_map(None))


def _load(data: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        msg = f"{where} is not valid JSON: {exc}"
        raise InvalidError(msg) from exc
    if not isinstance(doc, dict):
        msg = f"{where} is not a JSON object"
        raise InvalidError(msg)
    return doc


def _descriptor(obj: object, where: str) -> Descriptor:
    if not isinstance(obj, dict):
        msg = f"{where}: a descriptor must be an object, not {obj!r}"
        raise InvalidError(msg)
    media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if not isinstance(media_type, str) or not isinstance(size, int) or size < 0:
        msg = f"{where}: malformed descriptor {obj!r}"
        raise InvalidError(msg)
    validate_digest(digest, what=f"digest in {where}")
    annotations = obj.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        msg = f"{where}: malformed annotations {annotations!r}"
        raise InvalidError(msg)
    urls = obj.get("urls") or []
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        msg = f"{where}: malformed urls {urls!r}"
        raise InvalidError(msg)
    assert isinstance(digest, str)
    return Descriptor(media_type, digest, size, frozen_map(annotations), tuple(urls))


def parse_image(media_type: str, data: bytes, where: str, tag: str) -> list[CacheEntry]:
    """The entries of a pulled top-level document.

    A cache image (an index whose entries carry ``refcache.name``) gives one entry per name;
    a plain image manifest gives one entry named after ``tag``.

    Raises:
        InvalidError: not JSON, an index without ``refcache.name`` annotations (a
            multi-platform image is not a cache image), or an unknown media type.
    """
    doc = _load(data, where)
    declared = doc.get("mediaType")
    kind = declared if isinstance(declared, str) and declared else media_type
    if kind in _MANIFEST_TYPES or (not kind and "layers" in doc):
        desc = Descriptor(kind or MEDIA_TYPE_OCI_MANIFEST, _digest(data), len(data))
        return [CacheEntry(tag, desc)]
    if kind not in _INDEX_TYPES and "manifests" not in doc:
        msg = f"{where} has media type {kind!r}: expected an OCI image index or manifest"
        raise InvalidError(msg)
    raw = doc.get("manifests")
    if not isinstance(raw, list):
        msg = f"{where}: index without a manifests list"
        raise InvalidError(msg)
    entries: list[CacheEntry] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        desc = _descriptor(item, f"{where} manifests[{i}]")
        name = desc.annotations.get(ANNOTATION_NAME)
        if name is None:
            msg = (
                f"{where} is not a refcache cache image: manifests[{i}] has no "
                f"{ANNOTATION_NAME} annotation"
            )
            raise InvalidError(msg)
        validate_name(name)
        if name in seen:
            msg = f"{where}: name {name!r} appears twice"
            raise InvalidError(msg)
        if desc.media_type not in _MANIFEST_TYPES:
            msg = f"{where}: entry {name!r} has media type {desc.media_type!r}, not a manifest"
            raise InvalidError(msg)
        seen.add(name)
        entries.append(CacheEntry(name, desc))
    return entries


def parse_manifest(data: bytes, where: str) -> ParsedImage:
    """Config, layers and per-layer metadata of an image manifest.

    Raises:
        InvalidError: malformed JSON or descriptors.
    """
    doc = _load(data, where)
    config = _descriptor(doc.get("config"), f"{where} config")
    raw = doc.get("layers")
    if not isinstance(raw, list):
        msg = f"{where}: manifest without a layers list"
        raise InvalidError(msg)
    layers: list[Descriptor] = []
    metas: list[LayerMeta] = []
    for i, item in enumerate(raw):
        desc = _descriptor(item, f"{where} layers[{i}]")
        a = desc.annotations
        created = a.get(ANNOTATION_CREATED_AT, "")
        metas.append(
            LayerMeta(
                a.get(ANNOTATION_DESCRIPTION, ""),
                a.get(ANNOTATION_RECORD_TYPE, ""),
                parse_rfc3339(created) if created else 0,
            )
        )
        layers.append(desc)
    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict):
        annotations = {}
    return ParsedImage(config, tuple(layers), tuple(metas), frozen_map(annotations))


def config_diff_ids(data: bytes, where: str) -> list[str]:
    """``rootfs.diff_ids`` of an image config (for layers without the diffID annotation).

    Raises:
        InvalidError: malformed config.
    """
    doc = _load(data, where)
    rootfs = doc.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list):
        msg = f"{where}: image config without rootfs.diff_ids"
        raise InvalidError(msg)
    return [validate_digest(d, what=f"diffID in {where}") for d in ids]


def digest_bytes(data: bytes) -> str:
    """The ``sha256:`` digest of ``data``."""
    return _digest(data)


MANIFEST_ACCEPT: Final = ", ".join((*_INDEX_TYPES, *_MANIFEST_TYPES))
