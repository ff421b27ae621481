"""Record metadata on LMDB + msgpack: the counterpart of BuildKit's ``cache/metadata``.

Layout in the shared :class:`~storage._env.MetaEnv`:

* ``records``: ``<id>`` -> msgpack ``{"f": {key: value}, "i": {key: index}}``. One value per
  record (not one per key as BuildKit's bolt buckets): loading 100k records is one cursor walk
  and one ``unpackb`` each. Keys this version does not know are kept as they are.
* ``index``: ``<index>::<id>`` -> ``b""``; :meth:`MetadataStore.search` is a prefix scan.
* ``external``: ``<id>\\0<key>`` -> raw bytes, for large values (file lists, content hashes).

A :class:`StorageItem` is BuildKit's ``StorageItem``: reads see queued writes at once; writes
are queued and flushed by :meth:`StorageItem.commit` in one write transaction that re-reads the
stored map and applies only the queued keys, so two items of one record never undo each
other's keys. An empty commit touches nothing (BuildKit ``0bb8505e8``: 26k-record startup
from 46 s to 2 s).

Thread ownership: a :class:`MetadataStore` is thread-safe (it holds no mutable state of its
own). A :class:`StorageItem` belongs to one owner at a time (in refcache: the record actor, or
the manager before the record is activated).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

import msgpack

from storage._env import DB_EXTERNAL, DB_INDEX, DB_RECORDS, MetaEnv, ReadTxn, WriteTxn
from storage._errors import CorruptMetadataError, InvalidError, NotFoundError

__all__ = [
    "EXTERNAL_FILELIST",
    "INDEX_BLOB_CHAIN",
    "INDEX_CHAIN",
    "KEY_BLOB",
    "KEY_BLOB_CHAIN_ID",
    "KEY_BLOB_ONLY",
    "KEY_BLOB_SIZE",
    "KEY_CACHE_POLICY",
    "KEY_CHAIN_ID",
    "KEY_COMMITTED",
    "KEY_CREATED_AT",
    "KEY_DELETED",
    "KEY_DESCRIPTION",
    "KEY_DIFF_ID",
    "KEY_EQUAL_MUTABLE",
    "KEY_IMAGE_REFS",
    "KEY_LAST_USED_AT",
    "KEY_LAYER_TYPE",
    "KEY_LAYER_URLS",
    "KEY_LOWER_DIFF_PARENT",
    "KEY_MEDIA_TYPE",
    "KEY_MERGE_PARENTS",
    "KEY_PARENT",
    "KEY_RECORD_TYPE",
    "KEY_SIZE",
    "KEY_SNAPSHOT",
    "KEY_UPPER_DIFF_PARENT",
    "KEY_USAGE_COUNT",
    "MetadataStore",
    "StorageItem",
    "validate_record_id",
]

# BuildKit's metadata keys (cache/metadata.go), kept verbatim so that the stored records read
# the same way BuildKit's did.
KEY_SIZE: Final = "snapshot.size"  #: int; cached size in bytes, -1 or missing = unknown
KEY_COMMITTED: Final = "snapshot.committed"  #: bool; immutable record (missing = mutable)
KEY_EQUAL_MUTABLE: Final = "cache.equalMutable"  #: str; on I: its equal mutable's id
KEY_CACHE_POLICY: Final = "cache.cachePolicy"  #: int; 0 default, 1 retain
KEY_DESCRIPTION: Final = "cache.description"  #: str
KEY_CREATED_AT: Final = "cache.createdAt"  #: int ns; also the "initialised" marker
KEY_LAST_USED_AT: Final = "cache.lastUsedAt"  #: int ns; 0/missing = never
KEY_USAGE_COUNT: Final = "cache.usageCount"  #: int
KEY_LAYER_TYPE: Final = "cache.layerType"  #: str; "windows" for Windows layers
KEY_RECORD_TYPE: Final = "cache.recordType"  #: str; empty is shown as "regular"
KEY_PARENT: Final = "cache.parent"  #: str; layer parent id
KEY_MERGE_PARENTS: Final = "cache.mergeParents"  #: list[str]; merge inputs in order
KEY_LOWER_DIFF_PARENT: Final = "cache.lowerDiffParent"  #: str
KEY_UPPER_DIFF_PARENT: Final = "cache.upperDiffParent"  #: str
KEY_DIFF_ID: Final = "cache.diffID"  #: digest; uncompressed layer digest
KEY_CHAIN_ID: Final = "cache.chainID"  #: digest; indexed as chainid:<d>
KEY_BLOB_CHAIN_ID: Final = "cache.blobChainID"  #: digest; indexed as blobchainid:<d>
KEY_BLOB: Final = "cache.blob"  #: digest; compressed blob
KEY_SNAPSHOT: Final = "cache.snapshot"  #: str; snapshotter key (empty: the record id)
KEY_BLOB_ONLY: Final = "cache.blobonly"  #: bool; lazy, snapshot not extracted
KEY_MEDIA_TYPE: Final = "cache.mediatype"  #: str; blob media type
KEY_BLOB_SIZE: Final = "cache.blobsize"  #: int; blob size from the descriptor
KEY_LAYER_URLS: Final = "cache.layer.urls"  #: list[str]; foreign-layer URLs (appended)
KEY_IMAGE_REFS: Final = "cache.imageRefs"  #: list[str]; image references (appended)
KEY_DELETED: Final = "cache.deleted"  #: bool; prune started deleting (crash safety)

INDEX_CHAIN: Final = "chainid:"
INDEX_BLOB_CHAIN: Final = "blobchainid:"
EXTERNAL_FILELIST: Final = "filelist"

_INDEX_SEP = b"::"
_EXTERNAL_SEP = b"\x00"
_MAX_ID_LEN = 512

_TYPE_NAMES: dict[type | tuple[type, ...], str] = {
    str: "string",
    bool: "bool",
    int: "integer",
    bytes: "bytes",
    list: "list",
}


def validate_record_id(record_id: object) -> str:
    """Returns ``record_id`` if usable as a record id.

    Raises:
        InvalidError: naming the value, when it is not a non-empty string without NUL or
            ``::`` of at most 512 characters.
    """
    if (
        not isinstance(record_id, str)
        or not record_id
        or len(record_id) > _MAX_ID_LEN
        or "\x00" in record_id
        or "::" in record_id
    ):
        msg = f"invalid record id {record_id!r}: expected a non-empty string without NUL or '::'"
        raise InvalidError(msg)
    return record_id


def _validate_key(key: object) -> str:
    if not isinstance(key, str) or not key or "\x00" in key:
        msg = f"invalid metadata key {key!r}: expected a non-empty string without NUL"
        raise InvalidError(msg)
    return key


def _validate_index(index: object) -> str:
    if not isinstance(index, str) or not index or "\x00" in index:
        msg = f"invalid index {index!r}: expected a non-empty string without NUL"
        raise InvalidError(msg)
    return index


_SCALARS = frozenset({str, bool, float, bytes})
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1


def _storable(value: object) -> bool:
    """Whether msgpack can store ``value`` (a cheap structural check, no packing)."""
    kind = type(value)
    if kind in _SCALARS or value is None:
        return True
    if kind is int:
        return _INT_MIN <= value <= _INT_MAX  # type: ignore[operator]
    if kind is list or kind is tuple:
        return all(_storable(v) for v in value)  # type: ignore[attr-defined]
    if kind is dict:
        return all(
            type(k) is str and _storable(v)
            for k, v in value.items()  # type: ignore[attr-defined]
        )
    return False


def _check_storable(record_id: str, key: str, value: object) -> None:
    if not _storable(value):
        msg = (
            f"value for {key!r} of record {record_id!r} cannot be stored: {value!r} is not made "
            "of str, int (64-bit), float, bool, bytes, None, lists and str-keyed maps"
        )
        raise InvalidError(msg)


def _decode(record_id: str, raw: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """Decodes one stored record; raises :class:`CorruptMetadataError` naming it.

    Only the shape is checked here (this runs for every record at open); the type of each
    value is checked by the typed getters when it is read.
    """
    try:
        doc = msgpack.unpackb(raw)
    except (ValueError, msgpack.UnpackException) as exc:
        msg = f"metadata of record {record_id!r} is not valid msgpack: {exc}"
        raise CorruptMetadataError(msg, record_id=record_id) from exc
    if type(doc) is not dict:
        msg = f"metadata of record {record_id!r} is a {type(doc).__name__}, expected a map"
        raise CorruptMetadataError(msg, record_id=record_id)
    fields = doc.get("f", {})
    indexes = doc.get("i", {})
    if type(fields) is not dict or type(indexes) is not dict:
        msg = f"metadata of record {record_id!r} has a malformed field or index table"
        raise CorruptMetadataError(msg, record_id=record_id)
    if indexes and not all(type(v) is str and type(k) is str for k, v in indexes.items()):
        msg = f"metadata of record {record_id!r} has a malformed index table {indexes!r}"
        raise CorruptMetadataError(msg, record_id=record_id)
    return fields, indexes


def _encode(fields: dict[str, Any], indexes: dict[str, str]) -> bytes:
    doc: dict[str, Any] = {"f": fields}
    if indexes:
        doc["i"] = indexes
    return msgpack.packb(doc)


def _index_key(index: str, record_id: str) -> bytes:
    return index.encode() + _INDEX_SEP + record_id.encode()


def _external_key(record_id: str, key: str) -> bytes:
    return record_id.encode() + _EXTERNAL_SEP + key.encode()


_MISSING = object()


class StorageItem:
    """The metadata of one record: typed reads, queued writes, indexes and external values.

    Values are msgpack types: ``str``, ``int``, ``bool``, ``bytes``, ``float``, ``None``,
    lists and maps of these. Setting a value to ``None`` deletes the key and its index entry.

    Owned by one thread at a time (see the module docstring); the store behind it is shared.
    """

    __slots__ = ("_fields", "_indexes", "_queue", "_raw", "_store", "_version", "exists", "id")

    def __init__(self, store: MetadataStore, record_id: str, raw: bytes | None) -> None:
        self._store = store
        self.id = record_id
        self.exists = raw is not None
        self._raw = raw
        self._fields: dict[str, Any] | None = None if raw is not None else {}
        self._indexes: dict[str, str] | None = None if raw is not None else {}
        self._queue: dict[str, tuple[Any, str | None]] = {}
        self._version = 0  # bumped by every queue call; lets a commit clear the queue whole

    def __repr__(self) -> str:
        return f"StorageItem({self.id!r}, exists={self.exists})"

    # -- reading ----------------------------------------------------------------------------

    def _loaded(self) -> tuple[dict[str, Any], dict[str, str]]:
        if self._fields is None or self._indexes is None:
            self._fields, self._indexes = _decode(self.id, self._raw or b"")
            self._raw = None
        return self._fields, self._indexes

    def decode(self) -> None:
        """Decodes the stored value now.

        Raises:
            CorruptMetadataError: naming the record, when the stored value is unreadable.
        """
        self._loaded()

    def keys(self) -> list[str]:
        """Returns the keys that have a value, queued writes included, sorted."""
        fields, _ = self._loaded()
        present = {k for k in fields if k not in self._queue}
        present.update(k for k, (v, _) in self._queue.items() if v is not None)
        return sorted(present)

    def get(self, key: str, default: Any = None) -> Any:
        """Returns the value of ``key`` (queued writes included), or ``default``."""
        _validate_key(key)
        if key in self._queue:
            value = self._queue[key][0]
            return default if value is None else value
        fields, _ = self._loaded()
        return fields.get(key, default)

    def _typed(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            expected = _TYPE_NAMES.get(kind, str(kind))
            msg = (
                f"metadata key {key!r} of record {self.id!r} holds a {type(value).__name__} "
                f"({value!r}), expected a {expected}"
            )
            raise CorruptMetadataError(msg, record_id=self.id, key=key)
        return value

    def get_str(self, key: str, default: str = "") -> str:
        """Returns the string under ``key`` (``default`` when missing).

        Raises:
            CorruptMetadataError: the stored value is not a string.
        """
        return str(self._typed(key, str, default))

    def get_int(self, key: str, default: int = 0) -> int:
        """Returns the integer under ``key`` (``default`` when missing).

        Raises:
            CorruptMetadataError: the stored value is not an integer.
        """
        return int(self._typed(key, int, default))

    def get_bool(self, key: str, default: bool = False) -> bool:
        """Returns the bool under ``key`` (``default`` when missing).

        Raises:
            CorruptMetadataError: the stored value is not a bool.
        """
        return bool(self._typed(key, bool, default))

    def get_str_list(self, key: str) -> list[str]:
        """Returns the list of strings under ``key`` (empty when missing).

        Raises:
            CorruptMetadataError: the stored value is not a list of strings.
        """
        value = self._typed(key, list, [])
        if not all(isinstance(v, str) for v in value):
            msg = f"metadata key {key!r} of record {self.id!r} holds a non-string list item"
            raise CorruptMetadataError(msg, record_id=self.id, key=key)
        return list(value)

    def index_of(self, key: str) -> str | None:
        """Returns the index string attached to ``key``, if any."""
        if key in self._queue:
            return self._queue[key][1]
        _, indexes = self._loaded()
        return indexes.get(key)

    # -- writing ----------------------------------------------------------------------------

    def queue(self, key: str, value: Any, *, index: str | None = None) -> None:
        """Stages ``key = value`` (``None`` deletes) for the next :meth:`commit`.

        ``index`` adds the record to the secondary index ``index`` (see
        :meth:`MetadataStore.search`) for as long as the key has a value.

        Raises:
            InvalidError: bad key, bad index or a value msgpack cannot store; nothing staged.
        """
        if type(key) is not str or not key or "\x00" in key:
            _validate_key(key)
        if index is not None:
            _validate_index(index)
        self._version += 1
        if value is None:
            self._queue[key] = (None, None)
            return
        if type(value) not in _SCALARS:
            _check_storable(self.id, key, value)
        self._queue[key] = (value, index)

    def queue_many(
        self, values: Mapping[str, Any], indexes: Mapping[str, str] | None = None
    ) -> None:
        """Stages several writes at once (:meth:`queue` for each key of ``values``).

        Args:
            values: Key to value (``None`` deletes).
            indexes: Key to index string, for keys that are indexed.

        Raises:
            InvalidError: any bad key, index or value; then nothing at all is staged.
        """
        staged: dict[str, tuple[Any, str | None]] = {}
        for key, value in values.items():
            if type(key) is not str or not key or "\x00" in key:
                _validate_key(key)
            index = indexes.get(key) if indexes else None
            if index is not None:
                _validate_index(index)
            if value is None:
                staged[key] = (None, None)
                continue
            if type(value) not in _SCALARS:
                _check_storable(self.id, key, value)
            staged[key] = (value, index)
        self._version += 1
        self._queue.update(staged)

    def set(self, key: str, value: Any, *, index: str | None = None) -> None:
        """Stores ``key = value`` now: :meth:`queue` then :meth:`commit`."""
        self.queue(key, value, index=index)
        self.commit()

    def append_strings(self, key: str, values: Iterable[str]) -> bool:
        """Queues ``values`` appended to the string list under ``key``, skipping duplicates.

        BuildKit's ``GetAndSetValue`` for append-only slices (image refs, layer URLs).
        Returns whether anything changed (nothing is queued when nothing did).
        """
        current = self.get_str_list(key)
        added = [v for v in dict.fromkeys(values) if v not in current]
        for v in added:
            if not isinstance(v, str):
                msg = f"cannot append {v!r} to {key!r} of record {self.id!r}: not a string"
                raise InvalidError(msg)
        if not added:
            return False
        self.queue(key, current + added)
        return True

    @property
    def dirty(self) -> bool:
        """Whether writes are queued."""
        return bool(self._queue)

    def commit(self, *, txn: WriteTxn | None = None) -> None:
        """Flushes queued writes in one write transaction; with nothing queued, does nothing.

        Args:
            txn: Write into this transaction instead of opening one (the caller commits).
        """
        if not self._queue:
            return
        if txn is None:
            with self._store.env.write_txn() as own:
                self._flush(own)
        else:
            self._flush(txn)

    def _flush(self, txn: WriteTxn) -> None:
        rid = self.id
        key = rid.encode()
        queue = self._queue
        raw = txn.get(DB_RECORDS, key)
        if raw is None:
            # A new record (the common case when a batch creates records): no old indexes.
            stored_fields = {n: v for n, (v, _) in queue.items() if v is not None}
            stored_indexes = {n: i for n, (_, i) in queue.items() if i is not None}
            for new_index in stored_indexes.values():
                txn.put(DB_INDEX, _index_key(new_index, rid), b"")
        else:
            stored_fields, stored_indexes = _decode(rid, raw)
            for name, (value, index) in queue.items():
                old_index = stored_indexes.get(name)
                if value is None:
                    stored_fields.pop(name, None)
                else:
                    stored_fields[name] = value
                if old_index == index:
                    continue
                if old_index is not None:
                    txn.delete(DB_INDEX, _index_key(old_index, rid))
                    del stored_indexes[name]
                if index is not None:
                    stored_indexes[name] = index
                    txn.put(DB_INDEX, _index_key(index, rid), b"")
        txn.put(DB_RECORDS, key, _encode(stored_fields, stored_indexes))
        # The transaction may still roll back: until it commits, reads keep seeing the queued
        # values (as BuildKit's in-memory values do), and on a rollback they stay queued.
        version = self._version
        flushed = queue.copy()

        def _settle() -> None:
            self._fields, self._indexes = stored_fields, stored_indexes
            self._raw = None
            self.exists = True
            if self._version == version:
                self._queue = {}
                return
            for name, entry in flushed.items():
                if self._queue.get(name) is entry:
                    del self._queue[name]

        txn.after_commit(_settle)

    # -- external values --------------------------------------------------------------------

    def get_external(self, key: str) -> bytes:
        """Returns the external value ``key``.

        Raises:
            NotFoundError: naming the record and key, when there is none.
        """
        _validate_key(key)
        with self._store.env.read_txn() as txn:
            value = txn.get(DB_EXTERNAL, _external_key(self.id, key))
        if value is None:
            msg = f"no external value {key!r} for record {self.id!r}"
            raise NotFoundError(msg)
        return value

    def set_external(self, key: str, data: bytes | None, *, txn: WriteTxn | None = None) -> None:
        """Stores (``None``: deletes) the external value ``key`` now."""
        _validate_key(key)
        if data is not None and not isinstance(data, bytes | bytearray | memoryview):
            msg = f"external value {key!r} of record {self.id!r} must be bytes, not {type(data)}"
            raise InvalidError(msg)
        if txn is None:
            with self._store.env.write_txn() as own:
                self._put_external(own, key, data)
        else:
            self._put_external(txn, key, data)

    def _put_external(self, txn: WriteTxn, key: str, data: bytes | None) -> None:
        if data is None:
            txn.delete(DB_EXTERNAL, _external_key(self.id, key))
        else:
            txn.put(DB_EXTERNAL, _external_key(self.id, key), bytes(data))


class MetadataStore:
    """Record metadata in the shared LMDB environment (BuildKit ``metadata.Store``).

    Args:
        env: The cache's metadata environment.
    """

    def __init__(self, env: MetaEnv) -> None:
        self.env = env

    def get(self, record_id: str) -> StorageItem:
        """Returns the item of ``record_id``; ``item.exists`` is False for a new one.

        Raises:
            InvalidError: ``record_id`` is not a valid id.
        """
        validate_record_id(record_id)
        with self.env.read_txn() as txn:
            raw = txn.get(DB_RECORDS, record_id.encode())
        return StorageItem(self, record_id, raw)

    def get_many(self, record_ids: Iterable[str]) -> list[StorageItem]:
        """Returns the items of ``record_ids`` (new ones included), read in one snapshot."""
        ids = [validate_record_id(r) for r in record_ids]
        with self.env.read_txn() as txn:
            return [StorageItem(self, r, txn.get(DB_RECORDS, r.encode())) for r in ids]

    def exists(self, record_id: str) -> bool:
        """Returns whether ``record_id`` has stored metadata."""
        validate_record_id(record_id)
        with self.env.read_txn() as txn:
            return txn.get(DB_RECORDS, record_id.encode()) is not None

    def all(self) -> list[StorageItem]:
        """Returns every stored item in id order, read in one snapshot.

        Values are decoded on first access, so one corrupt record raises only when read
        (:class:`CorruptMetadataError` naming it) and never stops the others from loading.
        """
        with self.env.read_txn() as txn:
            return [StorageItem(self, key.decode(), raw) for key, raw in txn.items(DB_RECORDS)]

    def ids(self) -> list[str]:
        """Returns every stored record id in order."""
        with self.env.read_txn() as txn:
            return [key.decode() for key in txn.keys(DB_RECORDS)]

    def count(self) -> int:
        """Returns the number of stored records."""
        with self.env.read_txn() as txn:
            return txn.count(DB_RECORDS)

    def search(self, index: str, *, prefix: bool = False) -> list[StorageItem]:
        """Returns the items in secondary index ``index``, in index-key order.

        Args:
            index: The index string given to :meth:`StorageItem.queue`.
            prefix: Match every index that starts with ``index`` (BuildKit's ``SearchPrefix``)
                instead of exactly ``index``.
        """
        _validate_index(index)
        scan = index.encode() if prefix else index.encode() + _INDEX_SEP
        with self.env.read_txn() as txn:
            ids = []
            for key in txn.keys(DB_INDEX, scan):
                ids.append(key.rsplit(_INDEX_SEP, 1)[1].decode())
            return self._items(txn, dict.fromkeys(ids))

    def _items(self, txn: ReadTxn, ids: Iterable[str]) -> list[StorageItem]:
        items = []
        for record_id in ids:
            raw = txn.get(DB_RECORDS, record_id.encode())
            if raw is not None:
                items.append(StorageItem(self, record_id, raw))
        return items

    def clear(self, record_id: str, *, txn: WriteTxn | None = None) -> bool:
        """Removes the record's metadata, its index entries and its external values.

        Works on a record whose value is corrupt (its index entries are then found by scan).
        Returns whether there was anything to remove.
        """
        validate_record_id(record_id)
        if txn is None:
            with self.env.write_txn() as own:
                return self._clear(own, record_id)
        return self._clear(txn, record_id)

    def _clear(self, txn: WriteTxn, record_id: str) -> bool:
        key = record_id.encode()
        raw = txn.get(DB_RECORDS, key)
        removed = False
        try:
            indexes = {} if raw is None else _decode(record_id, raw)[1]
            for index in indexes.values():
                removed |= txn.delete(DB_INDEX, _index_key(index, record_id))
        except CorruptMetadataError:
            suffix = _INDEX_SEP + key
            for ikey in [k for k in txn.keys(DB_INDEX) if k.endswith(suffix)]:
                removed |= txn.delete(DB_INDEX, ikey)
        removed |= txn.delete(DB_RECORDS, key) if raw is not None else False
        removed |= txn.delete_prefix(DB_EXTERNAL, key + _EXTERNAL_SEP) > 0
        return removed

    def commit_many(self, items: Sequence[StorageItem]) -> None:
        """Flushes the queued writes of several items in one transaction (one fsync)."""
        if not any(item.dirty for item in items):
            return
        with self.env.write_txn() as txn:
            for item in items:
                item.commit(txn=txn)

    def put_raw(self, record_id: str, raw: bytes, *, txn: WriteTxn | None = None) -> None:
        """Stores an already-encoded record value (repair tools and tests only)."""
        validate_record_id(record_id)
        if txn is None:
            with self.env.write_txn() as own:
                own.put(DB_RECORDS, record_id.encode(), raw)
        else:
            txn.put(DB_RECORDS, record_id.encode(), raw)

    def iter_ids(self) -> Iterator[str]:
        """Yields record ids in order (one read snapshot for the whole walk)."""
        yield from self.ids()
