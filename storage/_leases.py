"""Leases: named sets of blobs, ingests and snapshots that garbage collection must keep.

A port of containerd's lease manager (``core/leases``, ``core/metadata/leases.go``) on the
shared LMDB environment:

* ``DB_LEASES``: ``<lease id>`` -> msgpack ``{"created_at": ns, "labels": {str: str}}``;
* ``DB_LEASE_RESOURCES``: ``<lease>\\0<type>\\0<id>`` -> ``b""``, with ``type`` one of
  ``"content"`` (id = digest), ``"ingests"`` (id = ingest ref) or ``"snapshots/<snapshotter>"``
  (id = snapshot key).

Semantics kept from containerd:

* a lease id is required (containerd has no implicit id); creating an existing id raises
  :class:`AlreadyExistsError`; labels with an empty value are not stored
  (``boltutil.WriteLabels`` drops them);
* resources are links only: adding one does **not** check that the blob or snapshot exists
  (BuildKit adds the snapshot resource *before* creating the snapshot); deleting a missing link
  is a no-op; deleting a lease removes its links, never the objects (GC does that later);
* expiry is the label ``containerd.io/gc.expire`` (RFC 3339). An expired lease is not deleted
  by itself: it just stops being a GC root, and the next GC deletes it (an unparsable value is
  ignored and the lease stays live, as in containerd's ``scanRoots``);
* ``containerd.io/gc.flat`` makes a lease *flat*: GC keeps its snapshots' parent chains but
  follows no ``gc.ref`` labels from its objects;
* BuildKit's temporary leases (label ``buildkit/lease.temporary``) are deleted at startup
  (:meth:`LmdbLeaseManager.delete_temporary`).

Only the ``containerd.io/gc.*`` semantics live here; BuildKit's conventions (``<id>`` flat,
``<id>-variants``, ``<id>-view`` temporary) are the caller's.
"""

from __future__ import annotations

import base64
import builtins
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, runtime_checkable

import msgpack

from ._env import DB_LEASE_RESOURCES, DB_LEASES, MetaEnv, ReadTxn, WriteTxn
from ._errors import (
    AlreadyExistsError,
    CorruptMetadataError,
    InvalidError,
    NotFoundError,
)
from ._filters import Adaptor, map_field, parse_filters
from ._labels import check_label_size, stored_labels, validate_labels
from ._types import frozen_map, validate_digest

__all__ = [
    "LABEL_GC_EXPIRE",
    "LABEL_GC_FLAT",
    "LABEL_LEASE_TEMPORARY",
    "RESOURCE_CONTENT",
    "RESOURCE_INGESTS",
    "RESOURCE_SNAPSHOTS",
    "Lease",
    "LeaseManager",
    "LmdbLeaseManager",
    "Resource",
    "decode_lease",
    "expired",
    "format_rfc3339",
    "labels_expired",
    "new_lease_id",
    "parse_resource_key",
    "parse_rfc3339",
    "resource_key",
]

logger = logging.getLogger(__name__)

#: Lease label holding the expiry time (RFC 3339); containerd ``labelGCExpire``.
LABEL_GC_EXPIRE = "containerd.io/gc.expire"
#: Lease label (any value) making the lease flat; containerd ``labelGCFlat``.
LABEL_GC_FLAT = "containerd.io/gc.flat"
#: BuildKit's ``leaseutil.MakeTemporary`` label: such leases are deleted at startup.
LABEL_LEASE_TEMPORARY = "buildkit/lease.temporary"
_TEMPORARY_BYTES = LABEL_LEASE_TEMPORARY.encode()

RESOURCE_CONTENT = "content"  #: resource type of a blob; the id is its digest
RESOURCE_INGESTS = "ingests"  #: resource type of an in-progress write; the id is its ref
RESOURCE_SNAPSHOTS = "snapshots"  #: resource type prefix: ``snapshots/<snapshotter name>``

# LMDB's compiled-in MDB_MAXKEYSIZE: a longer key cannot be stored at all.
_MAX_KEY_BYTES = 511
_SEP = b"\x00"

# Go's time.Parse(time.RFC3339, ...) accepts exactly this shape (fractional seconds optional).
_RFC3339_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$",
)


# -- value types ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease as containerd returns it (``leases.Lease``).

    Attributes:
        id: The lease id.
        created_at: Creation time, nanoseconds since the epoch.
        labels: The stored labels (read-only).
    """

    id: str
    created_at: int = 0
    labels: Mapping[str, str] = field(default_factory=lambda: frozen_map(None))

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", frozen_map(self.labels))

    def __hash__(self) -> int:
        return hash((self.id, self.created_at))

    @property
    def flat(self) -> bool:
        """Whether the lease carries ``containerd.io/gc.flat`` (keeps no ``gc.ref`` targets)."""
        return LABEL_GC_FLAT in self.labels

    @property
    def temporary(self) -> bool:
        """Whether the lease carries BuildKit's ``buildkit/lease.temporary`` label."""
        return LABEL_LEASE_TEMPORARY in self.labels

    @property
    def expires_at(self) -> datetime | None:
        """The parsed ``containerd.io/gc.expire`` time, or ``None`` (absent or unparsable)."""
        value = self.labels.get(LABEL_GC_EXPIRE)
        return None if value is None else parse_rfc3339(value)


@dataclass(frozen=True, slots=True)
class Resource:
    """Something a lease holds (containerd ``leases.Resource``).

    Attributes:
        id: A digest (``content``), an ingest ref (``ingests``) or a snapshot key
            (``snapshots/<snapshotter>``).
        type: ``"content"``, ``"ingests"`` or ``"snapshots/<snapshotter name>"``.
    """

    id: str
    type: str


# -- time helpers ---------------------------------------------------------------------------


def parse_rfc3339(value: str) -> datetime | None:
    """Parses an RFC 3339 time as Go's ``time.Parse(time.RFC3339, …)`` does.

    Returns:
        An aware datetime, or ``None`` when ``value`` is not RFC 3339 (containerd then ignores
        the label, so the lease never expires).
    """
    if not isinstance(value, str) or not _RFC3339_RE.match(value):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def format_rfc3339(when: datetime) -> str:
    """Formats an aware datetime as RFC 3339 in UTC (``…Z``), keeping microseconds if any.

    Raises:
        InvalidError: ``when`` is naive (its zone would be a guess).
    """
    if when.tzinfo is None or when.utcoffset() is None:
        msg = f"datetime {when!r} has no time zone; pass an aware datetime"
        raise InvalidError(msg)
    utc = when.astimezone(UTC)
    if utc.microsecond:
        return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def expired(lease: Lease, now: datetime | None = None) -> bool:
    """Tells whether GC treats ``lease`` as expired at ``now`` (default: the current time).

    Mirrors containerd's ``scanRoots``: expired when ``containerd.io/gc.expire`` parses and is
    strictly before ``now``; an absent or unparsable value never expires.
    """
    return labels_expired(lease.labels, now)


def labels_expired(labels: Mapping[str, str], now: datetime | None = None) -> bool:
    """:func:`expired` on a plain label map (used by GC on raw lease records).

    Raises:
        InvalidError: ``now`` is naive.
    """
    current = now if now is not None else datetime.now(UTC)
    if current.tzinfo is None or current.utcoffset() is None:
        msg = f"now={current!r} has no time zone; pass an aware datetime"
        raise InvalidError(msg)
    value = labels.get(LABEL_GC_EXPIRE)
    if value is None:
        return False
    when = parse_rfc3339(value)
    if when is None:
        logger.info("ignoring invalid lease expiration value %r", value)
        return False
    return current > when


def new_lease_id() -> str:
    """Returns a fresh lease id as containerd's ``leases.WithRandomID`` makes them.

    The shape is ``"<unix nanoseconds>-<base64url of 3 random bytes>"``.
    """
    return f"{time.time_ns()}-{base64.urlsafe_b64encode(os.urandom(3)).decode()}"


# -- protocol -------------------------------------------------------------------------------


@runtime_checkable
class LeaseManager(Protocol):
    """containerd's ``leases.Manager``, with an optional shared write transaction."""

    def create(
        self,
        id: str,
        *,
        labels: Mapping[str, str] | None = None,
        expire: datetime | timedelta | None = None,
        flat: bool = False,
        temporary: bool = False,
        txn: WriteTxn | None = None,
    ) -> Lease:
        """Creates a lease (see :meth:`LmdbLeaseManager.create`)."""
        ...

    def delete(
        self,
        id: str,
        *,
        synchronous: bool = False,
        txn: WriteTxn | None = None,
    ) -> None:
        """Deletes a lease and its resource links."""
        ...

    def get(self, id: str, *, txn: ReadTxn | None = None) -> Lease:
        """Returns one lease."""
        ...

    def list(self, *filters: str, txn: ReadTxn | None = None) -> builtins.list[Lease]:
        """Lists leases matching any of ``filters``."""
        ...

    def add_resource(
        self, lease_id: str, resource: Resource, *, txn: WriteTxn | None = None
    ) -> None:
        """Adds a resource link to a lease."""
        ...

    def delete_resource(
        self, lease_id: str, resource: Resource, *, txn: WriteTxn | None = None
    ) -> None:
        """Removes a resource link from a lease."""
        ...

    def list_resources(
        self, lease_id: str, *, txn: ReadTxn | None = None
    ) -> builtins.list[Resource]:
        """Lists a lease's resources."""
        ...


# -- LMDB implementation --------------------------------------------------------------------


class LmdbLeaseManager:
    """The lease manager over the shared LMDB environment.

    Thread-safe: every method is one LMDB transaction (writes are serialised by
    :meth:`MetaEnv.write_txn`). Mutating methods take ``txn=`` to join a caller's write
    transaction, so a cache record and its lease can be created atomically.

    Args:
        env: The metadata environment (may be read-only for the reading methods).
    """

    def __init__(self, env: MetaEnv) -> None:
        self._env = env

    # -- leases ------------------------------------------------------------------------------

    def create(
        self,
        id: str,
        *,
        labels: Mapping[str, str] | None = None,
        expire: datetime | timedelta | None = None,
        flat: bool = False,
        temporary: bool = False,
        txn: WriteTxn | None = None,
    ) -> Lease:
        """Creates the lease ``id``.

        Args:
            id: The lease id (required, as containerd requires ``WithID``/``WithRandomID``;
                see :func:`new_lease_id`).
            labels: Labels to store; empty values are dropped (containerd ``WriteLabels``).
            expire: An aware datetime, or a duration from now, written as the
                ``containerd.io/gc.expire`` label (containerd ``WithExpiration``); it
                overrides an expiry given in ``labels``.
            flat: Add ``containerd.io/gc.flat`` (GC keeps only the leased objects and their
                snapshot parent chains, not what their ``gc.ref`` labels point to).
            temporary: Add BuildKit's ``buildkit/lease.temporary`` label
                (``leaseutil.MakeTemporary``): the lease is deleted at the next open.
            txn: Join this write transaction instead of opening one.

        Returns:
            The created lease.

        Raises:
            InvalidError: Bad id, labels or expiry (nothing is written).
            AlreadyExistsError: A lease ``id`` exists.
        """
        key = _lease_key(id)
        stored = stored_labels(validate_labels(labels, what=f"lease {id!r}"))
        now_ns = time.time_ns()
        stamp = format_rfc3339(datetime.fromtimestamp(now_ns / 1e9, UTC))
        if expire is not None:
            stored[LABEL_GC_EXPIRE] = _expiry_label(expire, lease_id=id)
        if flat:
            stored[LABEL_GC_FLAT] = stamp
        if temporary:
            stored[LABEL_LEASE_TEMPORARY] = stamp
        for k, v in stored.items():
            check_label_size(k, v, what=f"lease {id!r}")
        record = msgpack.packb({"created_at": now_ns, "labels": stored})
        with self._env.joined_write(txn) as wtxn:
            if wtxn.get(DB_LEASES, key) is not None:
                msg = f"lease {id!r} already exists"
                raise AlreadyExistsError(msg)
            wtxn.put(DB_LEASES, key, record)
        return Lease(id=id, created_at=now_ns, labels=stored)

    def delete(
        self,
        id: str,
        *,
        synchronous: bool = False,
        txn: WriteTxn | None = None,
    ) -> None:
        """Deletes the lease ``id`` and all its resource links (never the objects).

        The blobs and snapshots it held stay until the next garbage collection finds nothing
        else holding them.

        Args:
            id: The lease id.
            synchronous: containerd's ``SynchronousDelete`` option. Accepted for API parity;
                the lease manager itself never collects: a caller passing it promises to run
                :func:`storage._gc.collect` right after (containerd's gRPC service does the
                same, and BuildKit always runs GC explicitly at the end of ``Prune``).
            txn: Join this write transaction instead of opening one.

        Raises:
            InvalidError: ``id`` is malformed.
            NotFoundError: No lease ``id``.
        """
        del synchronous  # documented above: GC is the caller's to run
        key = _lease_key(id)
        with self._env.joined_write(txn) as wtxn:
            if not wtxn.delete(DB_LEASES, key):
                msg = f"lease {id!r} not found"
                raise NotFoundError(msg)
            wtxn.delete_prefix(DB_LEASE_RESOURCES, key + _SEP)

    def get(self, id: str, *, txn: ReadTxn | None = None) -> Lease:
        """Returns the lease ``id``.

        Raises:
            InvalidError: ``id`` is malformed.
            NotFoundError: No lease ``id``.
            CorruptMetadataError: The stored record cannot be decoded.
        """
        key = _lease_key(id)
        with self._env.joined_read(txn) as rtxn:
            raw = rtxn.get(DB_LEASES, key)
        if raw is None:
            msg = f"lease {id!r} not found"
            raise NotFoundError(msg)
        return decode_lease(key, raw)

    def list(self, *filters: str, txn: ReadTxn | None = None) -> builtins.list[Lease]:
        """Lists leases in id order, keeping those matching any filter (containerd syntax).

        Fields: ``id`` and ``labels.<key>``, e.g. ``'labels."buildkit/lease.temporary"'`` or
        ``"id==l1"``. No filter lists every lease.

        Raises:
            InvalidError: A filter does not parse.
        """
        matcher = parse_filters(*filters)
        with self._env.joined_read(txn) as rtxn:
            leases = [decode_lease(k, v) for k, v in rtxn.items(DB_LEASES)]
        return [lease for lease in leases if matcher.match(_adaptor(lease))]

    def delete_temporary(self) -> int:
        """Deletes every lease labelled ``buildkit/lease.temporary``; returns how many.

        BuildKit does this when a worker starts (a temporary lease only guards an operation
        of a process that is gone); the cache opener calls it once, before anything else.
        """
        with self._env.write_txn() as wtxn:
            # Only a lease whose stored bytes name the label can carry it (msgpack keeps
            # strings verbatim): the others, nearly all of them, are not decoded (open).
            doomed = [
                key
                for key, raw in wtxn.items(DB_LEASES)
                if _TEMPORARY_BYTES in raw
                and LABEL_LEASE_TEMPORARY in decode_lease(key, raw).labels
            ]
            for key in doomed:
                wtxn.delete(DB_LEASES, key)
                wtxn.delete_prefix(DB_LEASE_RESOURCES, key + _SEP)
        if doomed:
            logger.info("deleted %d temporary leases", len(doomed))
        return len(doomed)

    def cleanup_expired(self, now: datetime | None = None) -> int:
        """Deletes every lease expired at ``now``; returns how many.

        Garbage collection does this too; this lets a caller drop expired leases without
        sweeping anything else.
        """
        current = now if now is not None else datetime.now(UTC)
        with self._env.write_txn() as wtxn:
            doomed = [
                key
                for key, raw in wtxn.items(DB_LEASES)
                if labels_expired(decode_lease(key, raw).labels, current)
            ]
            for key in doomed:
                wtxn.delete(DB_LEASES, key)
                wtxn.delete_prefix(DB_LEASE_RESOURCES, key + _SEP)
        return len(doomed)

    # -- resources ---------------------------------------------------------------------------

    def add_resource(
        self, lease_id: str, resource: Resource, *, txn: WriteTxn | None = None
    ) -> None:
        """Links ``resource`` to the lease; adding an existing link is a no-op.

        The resource itself is not checked (containerd does not either): it may be created
        after it is leased.

        Raises:
            InvalidError: Malformed lease id, resource type or resource id (nothing written).
            NotFoundError: No lease ``lease_id``.
        """
        lease_key = _lease_key(lease_id)
        key = resource_key(lease_id, resource)
        with self._env.joined_write(txn) as wtxn:
            if wtxn.get(DB_LEASES, lease_key) is None:
                msg = f"lease {lease_id!r} not found (adding {resource.type} {resource.id!r})"
                raise NotFoundError(msg)
            wtxn.put(DB_LEASE_RESOURCES, key, b"")

    def delete_resource(
        self, lease_id: str, resource: Resource, *, txn: WriteTxn | None = None
    ) -> None:
        """Unlinks ``resource`` from the lease; a missing link is a no-op (as in containerd).

        Raises:
            InvalidError: Malformed lease id, resource type or resource id.
            NotFoundError: No lease ``lease_id``.
        """
        lease_key = _lease_key(lease_id)
        key = resource_key(lease_id, resource)
        with self._env.joined_write(txn) as wtxn:
            if wtxn.get(DB_LEASES, lease_key) is None:
                msg = f"lease {lease_id!r} not found (deleting {resource.type} {resource.id!r})"
                raise NotFoundError(msg)
            wtxn.delete(DB_LEASE_RESOURCES, key)

    def list_resources(
        self, lease_id: str, *, txn: ReadTxn | None = None
    ) -> builtins.list[Resource]:
        """Lists the lease's resources: content, then ingests, then ``snapshots/<sn>``.

        (The order is containerd's ``ListResources`` order, which is also the key order.)

        Raises:
            InvalidError: ``lease_id`` is malformed.
            NotFoundError: No lease ``lease_id``.
        """
        lease_key = _lease_key(lease_id)
        with self._env.joined_read(txn) as rtxn:
            if rtxn.get(DB_LEASES, lease_key) is None:
                msg = f"lease {lease_id!r} not found"
                raise NotFoundError(msg)
            keys = list(rtxn.keys(DB_LEASE_RESOURCES, lease_key + _SEP))
        return [parse_resource_key(k)[1] for k in keys]


# -- encoding helpers (shared with the garbage collector) ------------------------------------


def decode_lease(key: bytes, raw: bytes) -> Lease:
    """Decodes a ``DB_LEASES`` entry.

    Raises:
        CorruptMetadataError: The key is not UTF-8 or the value is not the documented map.
    """
    try:
        lease_id = key.decode()
    except UnicodeDecodeError as exc:
        msg = f"lease key {key!r} is not UTF-8"
        raise CorruptMetadataError(msg, record_id=repr(key)) from exc
    try:
        value: Any = msgpack.unpackb(raw)
    except (ValueError, msgpack.UnpackException) as exc:
        msg = f"lease {lease_id!r} has an undecodable record {raw[:64]!r}"
        raise CorruptMetadataError(msg, record_id=lease_id) from exc
    labels = value.get("labels") if isinstance(value, dict) else None
    created = value.get("created_at") if isinstance(value, dict) else None
    if (
        not isinstance(labels, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
        or not isinstance(created, int)
        or isinstance(created, bool)
    ):
        msg = f"lease {lease_id!r} has a malformed record {value!r}"
        raise CorruptMetadataError(msg, record_id=lease_id)
    return Lease(id=lease_id, created_at=created, labels=labels)


def resource_key(lease_id: str, resource: Resource) -> bytes:
    """Returns the ``DB_LEASE_RESOURCES`` key of a link, validating both parts.

    Raises:
        InvalidError: containerd's ``parseLeaseResource`` rules: ``content`` needs a valid
            digest, ``snapshots`` needs exactly one snapshotter name
            (``snapshots/<name>``), and any other type is rejected (containerd's
            ``NotImplemented``; ``images`` are not supported here).
    """
    _lease_key(lease_id)
    if not isinstance(resource, Resource):
        msg = f"resource for lease {lease_id!r} must be a Resource, got {resource!r}"
        raise InvalidError(msg)
    rtype, rid = resource.type, resource.id
    if not isinstance(rtype, str) or not isinstance(rid, str):
        msg = f"resource {resource!r} of lease {lease_id!r} must have str id and type"
        raise InvalidError(msg)
    parts = rtype.split("/")
    if parts[0] in (RESOURCE_CONTENT, RESOURCE_INGESTS):
        if len(parts) != 1:
            msg = f"invalid resource type {rtype!r} for lease {lease_id!r}"
            raise InvalidError(msg)
        if parts[0] == RESOURCE_CONTENT:
            validate_digest(rid, what=f"content resource id of lease {lease_id!r}")
    elif parts[0] == RESOURCE_SNAPSHOTS:
        if len(parts) != 2 or not parts[1] or "\x00" in parts[1]:
            msg = (
                f"invalid snapshot resource type {rtype!r} for lease {lease_id!r}: "
                "expected 'snapshots/<snapshotter name>'"
            )
            raise InvalidError(msg)
    else:
        msg = (
            f"resource type {rtype!r} (id {rid!r}) of lease {lease_id!r} is not supported; "
            "expected 'content', 'ingests' or 'snapshots/<snapshotter name>'"
        )
        raise InvalidError(msg)
    if not rid or "\x00" in rid:
        msg = f"invalid {rtype} resource id {rid!r} for lease {lease_id!r}"
        raise InvalidError(msg)
    key = _SEP.join((lease_id.encode(), rtype.encode(), rid.encode()))
    if len(key) > _MAX_KEY_BYTES:
        msg = (
            f"{rtype} resource {rid[:40]!r}… of lease {lease_id!r} is too long: the link key "
            f"takes {len(key)} bytes, at most {_MAX_KEY_BYTES} fit"
        )
        raise InvalidError(msg)
    return key


def parse_resource_key(key: bytes) -> tuple[str, Resource]:
    """Splits a ``DB_LEASE_RESOURCES`` key into ``(lease id, Resource)``.

    Raises:
        CorruptMetadataError: The key does not have the ``<lease>\\0<type>\\0<id>`` shape.
    """
    parts = key.split(_SEP, 2)
    msg = f"malformed lease resource key {key!r}"
    if len(parts) != 3:
        raise CorruptMetadataError(msg, record_id=repr(parts[0]))
    try:
        lease_id, rtype, rid = (p.decode() for p in parts)
    except UnicodeDecodeError as exc:
        raise CorruptMetadataError(msg, record_id=repr(parts[0])) from exc
    return lease_id, Resource(id=rid, type=rtype)


def _lease_key(lease_id: object) -> bytes:
    if not isinstance(lease_id, str) or not lease_id:
        msg = f"lease id must be a non-empty string, got {lease_id!r}"
        raise InvalidError(msg)
    if "\x00" in lease_id:
        msg = f"lease id {lease_id!r} must not contain NUL"
        raise InvalidError(msg)
    key = lease_id.encode()
    if len(key) > _MAX_KEY_BYTES // 2:
        msg = f"lease id {lease_id[:40]!r}… is longer than {_MAX_KEY_BYTES // 2} bytes"
        raise InvalidError(msg)
    return key


def _expiry_label(expire: object, *, lease_id: str) -> str:
    if isinstance(expire, timedelta):
        return format_rfc3339(datetime.now(UTC) + expire)
    if isinstance(expire, datetime):
        if expire.tzinfo is None or expire.utcoffset() is None:
            msg = f"expire={expire!r} for lease {lease_id!r} has no time zone"
            raise InvalidError(msg)
        return format_rfc3339(expire)
    msg = f"expire for lease {lease_id!r} must be a datetime or timedelta, got {expire!r}"
    raise InvalidError(msg)


def _adaptor(lease: Lease) -> Adaptor:
    # containerd adaptLease: "id" and "labels.<k>" (checkMap: no labels, no match).
    def adapt(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        if fieldpath[0] == "id":
            return lease.id, bool(lease.id)
        if fieldpath[0] == "labels":
            return map_field(fieldpath[1:], lease.labels)
        return "", False

    return adapt
