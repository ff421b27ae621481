"""The snapshotters' metadata records in ``DB_SNAPSHOTS``: layout, codec and key checks.

A port of containerd's small backend metadata store (``core/snapshots/storage``) on the
shared LMDB environment. Layout of ``DB_SNAPSHOTS``:

* ``<key>`` -> msgpack ``{"id", "kind", "parent", "labels", "created_at", "updated_at",
  "usage"}``; ``usage`` is ``[size, inodes]`` from commit (or merge) on, else ``None``. Fields
  this version does not know are kept when a record is rewritten.
* ``\\x00parent\\x00<parent>\\x00<child>`` -> ``b""``: the children index (containerd's
  ``parents/`` back-links), so a snapshot with children is refused removal in O(1).
* ``\\x00seq`` -> msgpack int: the last snapshot id handed out (containerd's bucket
  ``NextSequence``: ids are never reused by committed state).
* ``\\x00snapshotter`` -> msgpack str: the backend a cache was created with; opening it with
  another backend is refused.

Keys starting with ``\\x00`` are therefore never snapshot keys (keys may not contain NUL).

Labels follow containerd: a key and value together are at most 4096 bytes
(:func:`~._labels.validate_labels`), and a label with an empty value is not stored
(``boltutil.WriteLabels``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

from ._env import DB_SNAPSHOTS, MetaEnv, ReadTxn, WriteTxn
from ._errors import CorruptMetadataError, InvalidError, NotFoundError, RefcacheError
from ._labels import validate_labels
from ._types import Kind, SnapshotInfo

__all__ = [
    "PARENT_INDEX_PREFIX",
    "SEQ_KEY",
    "SNAPSHOTTER_NAME_KEY",
    "SnapshotRecord",
    "check_key",
    "check_labels",
    "check_parent",
    "check_txn",
    "child_key",
    "decode_record",
    "get_record",
    "has_children",
    "iter_records",
    "read_seq",
    "must_get_record",
    "parent_chain",
    "put_record",
    "record_fields",
    "stored_snapshotter_name",
]

SNAPSHOTTER_NAME_KEY = b"\x00snapshotter"  #: DB_SNAPSHOTS key -> name of the cache's backend
PARENT_INDEX_PREFIX = b"\x00parent\x00"  #: ``<prefix><parent>\0<child>`` -> b""
SEQ_KEY = b"\x00seq"  #: DB_SNAPSHOTS key -> the last snapshot id handed out


@dataclass(slots=True)
class SnapshotRecord:
    """One decoded snapshot record: its key and its stored map (unknown fields kept)."""

    key: str
    raw: dict[str, Any]

    @property
    def id(self) -> str:
        """The snapshot id, which names its directory."""
        return str(self.raw["id"])

    @property
    def kind(self) -> Kind:
        """Active, view or committed."""
        return Kind(self.raw["kind"])

    @property
    def parent(self) -> str:
        """The parent's key (``""`` for none)."""
        return str(self.raw.get("parent") or "")

    def info(self) -> SnapshotInfo:
        """The record as the protocol's :class:`SnapshotInfo`."""
        return SnapshotInfo(
            kind=self.kind,
            name=self.key,
            parent=self.parent,
            labels=dict(self.raw.get("labels") or {}),
            created_at=int(self.raw.get("created_at") or 0),
            updated_at=int(self.raw.get("updated_at") or 0),
        )


def decode_record(key: str, raw: bytes) -> SnapshotRecord:
    """Decodes the stored value of snapshot ``key``.

    Raises:
        CorruptMetadataError: The value is not a well-formed record (naming the field).
    """
    try:
        value = msgpack.unpackb(raw)
    except (ValueError, msgpack.UnpackException) as exc:
        msg = f"snapshot {key!r} has unreadable metadata"
        raise CorruptMetadataError(msg, record_id=key) from exc
    if not isinstance(value, dict):
        msg = f"snapshot {key!r} metadata is {type(value).__name__}, not a map"
        raise CorruptMetadataError(msg, record_id=key)
    for name, types in (("id", (str, int)), ("kind", (str,))):
        if not isinstance(value.get(name), types):
            msg = f"snapshot {key!r} has a malformed {name!r}: {value.get(name)!r}"
            raise CorruptMetadataError(msg, record_id=key, key=name)
    if value["kind"] not in {k.value for k in Kind}:
        msg = f"snapshot {key!r} has an unknown kind {value['kind']!r}"
        raise CorruptMetadataError(msg, record_id=key, key="kind")
    parent = value.get("parent")
    if parent is not None and not isinstance(parent, str):
        msg = f"snapshot {key!r} has a malformed parent {parent!r}"
        raise CorruptMetadataError(msg, record_id=key, key="parent")
    labels = value.get("labels")
    if labels is not None and (
        not isinstance(labels, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
    ):
        msg = f"snapshot {key!r} has malformed labels {labels!r}"
        raise CorruptMetadataError(msg, record_id=key, key="labels")
    return SnapshotRecord(key, value)


_KINDS: dict[str, Kind] = {k.value: k for k in Kind}
_unpackb = msgpack.unpackb


def record_fields(key: str, raw: Any) -> tuple[str, Kind, str]:
    """``(id, kind, parent)`` of a stored record, with :func:`decode_record`'s checks but
    without building a record: scans over every snapshot at open stay cheap.

    ``raw`` may be a zero-copy view (nothing of it is kept).

    Raises:
        CorruptMetadataError: as :func:`decode_record`.
    """
    try:
        value = _unpackb(raw)
    except (ValueError, msgpack.UnpackException):
        value = None
    if type(value) is dict:
        sid = value.get("id")
        kind_name = value.get("kind")
        kind = _KINDS.get(kind_name) if type(kind_name) is str else None
        parent = value.get("parent")
        labels = value.get("labels")
        if (
            kind is not None
            and type(sid) in (str, int)
            and (parent is None or type(parent) is str)
            and (
                labels is None
                or (
                    type(labels) is dict
                    and all(type(k) is str and type(v) is str for k, v in labels.items())
                )
            )
        ):
            return str(sid), kind, parent or ""
    rec = decode_record(key, bytes(raw))  # raises, naming what is wrong
    return rec.id, rec.kind, rec.parent


def get_record(txn: ReadTxn, key: str) -> SnapshotRecord | None:
    """The record of ``key``, or ``None``."""
    raw = txn.get(DB_SNAPSHOTS, key.encode())
    return None if raw is None else decode_record(key, raw)


def must_get_record(txn: ReadTxn, key: str) -> SnapshotRecord:
    """The record of ``key``.

    Raises:
        NotFoundError: No such snapshot.
    """
    rec = get_record(txn, key)
    if rec is None:
        msg = f"snapshot {key!r} does not exist"
        raise NotFoundError(msg)
    return rec


def put_record(txn: WriteTxn, rec: SnapshotRecord) -> None:
    """Stores ``rec`` under its key."""
    txn.put(DB_SNAPSHOTS, rec.key.encode(), msgpack.packb(rec.raw))


def iter_records(txn: ReadTxn) -> Iterator[SnapshotRecord]:
    """Every snapshot record (the ``\\x00`` bookkeeping keys left out), in key order."""
    for raw_key, raw in txn.items(DB_SNAPSHOTS):
        if raw_key.startswith(b"\x00"):
            continue
        yield decode_record(raw_key.decode("utf-8", "surrogateescape"), raw)


def child_key(parent: str, child: str) -> bytes:
    """The children-index key linking ``child`` to ``parent``."""
    return PARENT_INDEX_PREFIX + parent.encode() + b"\x00" + child.encode()


def has_children(txn: ReadTxn, key: str) -> bool:
    """Whether any snapshot names ``key`` as its parent."""
    prefix = PARENT_INDEX_PREFIX + key.encode() + b"\x00"
    return next(iter(txn.keys(DB_SNAPSHOTS, prefix)), None) is not None


def parent_chain(txn: ReadTxn, rec: SnapshotRecord) -> list[SnapshotRecord]:
    """The parents of ``rec``, immediate parent first (containerd ``ParentIDs``).

    Raises:
        CorruptMetadataError: A parent is missing or the chain loops.
    """
    out: list[SnapshotRecord] = []
    seen = {rec.key}
    parent = rec.parent
    while parent:
        if parent in seen:
            msg = f"snapshot {rec.key!r} has a parent cycle through {parent!r}"
            raise CorruptMetadataError(msg, record_id=rec.key, key="parent")
        seen.add(parent)
        prec = get_record(txn, parent)
        if prec is None:
            msg = f"snapshot {rec.key!r} names a missing ancestor {parent!r}"
            raise CorruptMetadataError(msg, record_id=rec.key, key="parent")
        out.append(prec)
        parent = prec.parent
    return out


def read_seq(txn: ReadTxn) -> int:
    """The last snapshot id handed out as ``txn`` sees it (0 before the first).

    Raises:
        CorruptMetadataError: The stored sequence is not an integer.
    """
    raw = txn.get(DB_SNAPSHOTS, SEQ_KEY)
    if raw is None:
        return 0
    value = msgpack.unpackb(raw)
    if not isinstance(value, int):
        msg = f"snapshot id sequence is malformed: {value!r}"
        raise CorruptMetadataError(msg, record_id="\x00seq")
    return value


def stored_snapshotter_name(env: MetaEnv) -> str | None:
    """Returns the snapshotter name recorded in ``env`` (``None`` for a new cache).

    Raises:
        CorruptMetadataError: The recorded name is unreadable.
    """
    try:
        with env.read_txn() as txn:
            raw = txn.get(DB_SNAPSHOTS, SNAPSHOTTER_NAME_KEY)
    except RefcacheError:
        # A read-only environment without a snapshots database yet: nothing was recorded.
        if env.readonly:
            return None
        raise
    if raw is None:
        return None
    try:
        name = msgpack.unpackb(raw)
    except (ValueError, msgpack.UnpackException) as exc:
        msg = f"the snapshotter name recorded in {env.path} is unreadable: {raw!r}"
        raise CorruptMetadataError(msg, record_id="\x00snapshotter") from exc
    if not isinstance(name, str):
        msg = f"the snapshotter name recorded in {env.path} is not a string: {name!r}"
        raise CorruptMetadataError(msg, record_id="\x00snapshotter")
    return name


# -- argument checks ------------------------------------------------------------------------


def check_key(value: object, what: str = "key") -> str:
    """Returns ``value`` if it is a valid snapshot key (a non-empty string without NUL).

    Raises:
        InvalidError: Naming the value.
    """
    if not isinstance(value, str):
        msg = f"snapshot {what} must be a string, got {value!r}"
        raise InvalidError(msg)
    if not value:
        msg = f"snapshot {what} must not be empty"
        raise InvalidError(msg)
    if "\x00" in value:
        msg = f"snapshot {what} {value!r} contains a NUL character"
        raise InvalidError(msg)
    return value


def check_parent(value: object) -> str:
    """A parent key, or ``""`` for none.

    Raises:
        InvalidError: Naming the value.
    """
    if value == "":
        return ""
    return check_key(value, "parent")


def check_labels(labels: object) -> dict[str, str]:
    """Snapshot labels (containerd ``pkg/labels`` rules, shared with content and leases).

    Raises:
        InvalidError: Naming the label.
    """
    return validate_labels(labels, what="snapshot")


def check_txn(txn: object) -> WriteTxn | None:
    """A caller's write transaction, or ``None``.

    Raises:
        InvalidError: Anything else.
    """
    if txn is not None and not isinstance(txn, WriteTxn):
        msg = f"txn must be a WriteTxn or None, got {txn!r}"
        raise InvalidError(msg)
    return txn
