"""The local content store: containerd's ``plugins/content/local`` layout with LMDB metadata.

On disk, under ``root`` (``<cache root>/content``), byte for byte as containerd lays it out::

    blobs/<alg>/<hex>                 committed blob, read-only (0o444)
    ingest/<sha256(ref) hex>/         one directory per in-progress write
        ref  data  startedat  updatedat  [total]

Metadata (size, labels, creation and update times) lives in the ``DB_CONTENT`` database of
the cache's one :class:`~storage._env.MetaEnv`: key ``b"sha256:<hex>"``, value the msgpack map
``{"size", "created_at", "updated_at", "labels"}`` (containerd's metadata layer,
``core/metadata/content.go``). **The metadata is the authority**: a blob exists when its
``DB_CONTENT`` entry does. :meth:`LocalContentStore.info`, :meth:`~LocalContentStore.walk`,
:meth:`~LocalContentStore.exists` and :meth:`~LocalContentStore.reader_at` never report a file
that has no entry.

Crash safety (commit order): the verified ingest file is fsynced, renamed into ``blobs/``
(chmod 0o444), the directory fsynced, and only then is the metadata written and committed.
A crash in between leaves a blob file without metadata, an *orphan*: invisible, reported by
:meth:`LocalContentStore.orphans`, removed at open and by
:meth:`LocalContentStore.remove_orphans`, and simply overwritten if the same digest is
committed again. The reverse, metadata without a file, cannot arise from a commit; a delete
forgets the metadata first and unlinks the file only after its transaction committed.

Transactions: mutating methods take ``txn=`` (a :class:`~storage._env.WriteTxn`) so that a
blob can be committed together with, say, the lease resource that holds it. When that
transaction rolls back, the blob's metadata is gone with it, so the renamed file is an orphan
again; the store forgets such files at its next write transaction (under the environment's
write lock, so it never races a commit) and at :meth:`~LocalContentStore.remove_orphans`.
A delete rolled back keeps both metadata and file (the unlink only runs after commit).

Writers and ingests follow containerd: one writer per ref at a time in this process
(:class:`~storage._errors.LockedError`, containerd's ``Unavailable``), resumable ingests (a new
writer on the same ref continues at the stored offset, its digest rebuilt by re-reading the
data), ``truncate(0)`` to restart, ``commit`` verifying size and digest
(:class:`~storage._errors.FailedPreconditionError`, the ingest stays for a retry or abort).
Ingests are not metadata; they are not in ``DB_CONTENT`` and live until committed or aborted.
The ingest directories, ref locks and the writer are ``_ingest.py``'s; this module is the
store (blobs, metadata, the commit's move into ``blobs/``).

Disk full: ``ENOSPC``/``EDQUOT`` while writing raise :class:`~storage._errors.StoreFullError`
naming the ref. A :class:`ContentWriter` cuts its data file back to the offset before the
failed write and stays open, so the ingest remains resumable; :meth:`LocalContentStore.
write_blob` aborts its ingest instead (it never leaves one behind when it fails).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

import msgpack

from ._env import DB_CONTENT, MetaEnv, ReadTxn, WriteTxn
from ._errors import (
    AlreadyExistsError,
    CorruptMetadataError,
    FailedPreconditionError,
    InvalidError,
    LockedError,
    NotFoundError,
    RefcacheError,
)
from ._filters import Adaptor, map_field, parse_filters
from ._ingest import (
    ABORT_SUFFIX,
    CHUNK,
    HASHES,
    ContentStatus,
    ContentWriter,
    IngestWriter,
    check_ref,
    copy_stream,
    disk_error,
    ingest_path,
    is_ref_locked,
    lock_ref,
    locked_refs,
    read_status,
    remove_ingest,
    remove_quietly,
    start_ingest,
    unlock_ref,
)
from ._labels import validate_labels
from ._layout import make_private_dir
from ._tree import fsync_dir
from ._types import (
    MEDIA_TYPE_OCI_LAYER_GZIP,
    ContentInfo,
    Descriptor,
    frozen_map,
    validate_digest,
)

__all__ = [
    "ContentStatus",
    "ContentStore",
    "ContentWriter",
    "LocalContentStore",
]

logger = logging.getLogger(__name__)


# --- value types and protocols -------------------------------------------------------------


@runtime_checkable
class ContentStore(Protocol):
    """A digest-addressed blob store with labels (containerd ``content.Store``)."""

    def info(self, digest: str, *, txn: ReadTxn | None = None) -> ContentInfo:
        """Returns what the store knows of blob ``digest``."""
        ...

    def update(
        self, info: ContentInfo, *fieldpaths: str, txn: WriteTxn | None = None
    ) -> ContentInfo:
        """Updates the labels of ``info.digest``; returns the new info."""
        ...

    def walk(self, *filters: str, txn: ReadTxn | None = None) -> Iterator[ContentInfo]:
        """Iterates over the blobs matching any of ``filters``."""
        ...

    def delete(self, digest: str, *, txn: WriteTxn | None = None) -> None:
        """Deletes blob ``digest``."""
        ...

    def exists(self, digest: str, *, txn: ReadTxn | None = None) -> bool:
        """Returns whether blob ``digest`` is in the store."""
        ...

    def path(self, digest: str) -> Path:
        """Returns the file path of blob ``digest``."""
        ...

    def reader_at(self, digest: str | Descriptor) -> BinaryIO:
        """Opens blob ``digest`` for reading."""
        ...

    def writer(self, ref: str, *, total: int = 0, expected: str | None = None) -> ContentWriter:
        """Opens (or resumes) the ingest ``ref``."""
        ...

    def abort(self, ref: str, *, txn: WriteTxn | None = None) -> None:
        """Removes the ingest ``ref``."""
        ...

    def status(self, ref: str) -> ContentStatus:
        """Returns the status of the ingest ``ref``."""
        ...

    def list_statuses(self, *filters: str) -> list[ContentStatus]:
        """Lists the ingests matching any of ``filters``."""
        ...

    def copy(
        self,
        writer: ContentWriter,
        stream: BinaryIO,
        size: int = 0,
        expected: str | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        txn: WriteTxn | None = None,
    ) -> ContentInfo:
        """Feeds ``stream`` to ``writer`` from its offset and commits it."""
        ...

    def write_blob(
        self,
        data: bytes | bytearray | memoryview | BinaryIO,
        expected: Descriptor | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        media_type: str = MEDIA_TYPE_OCI_LAYER_GZIP,
        txn: WriteTxn | None = None,
    ) -> Descriptor:
        """Writes a whole blob and returns its descriptor."""
        ...


# --- the local store ----------------------------------------------------------------------


class LocalContentStore:
    """containerd's local content store over one directory, with metadata in LMDB.

    Thread-safe: any thread may call any method; a :class:`ContentWriter` belongs to the
    thread using it. Lives outside every actor.

    Args:
        root: The content directory (``<cache root>/content``); created when missing.
        env: The cache's metadata environment.
        clean: At open, remove what a crash can leave behind: interrupted aborts
            (``ingest/*.tmp``) and orphan blob files (no metadata). Pass ``False`` to inspect a
            store without changing it (``storage.check`` does, to report orphans). Nothing is
            touched when ``env`` is read-only.

    Raises:
        RefcacheError: The directories cannot be created.
    """

    def __init__(self, root: str | os.PathLike[str], env: MetaEnv, *, clean: bool = True) -> None:
        self.root = Path(root)
        self._env = env
        self._readonly = env.readonly
        self._blobs = self.root / "blobs"
        self._ingest = self.root / "ingest"
        # Blob files renamed into place inside a transaction that has not confirmed its
        # commit yet: (transaction, digest). A commit confirms (after_commit); any entry still
        # here when another write transaction begins belongs to one that rolled back.
        self._unconfirmed: list[tuple[WriteTxn, str]] = []
        self._unconfirmed_lock = threading.Lock()
        if not self._readonly:
            try:
                # Private (0700): blobs of other users' builds are nobody else's business.
                make_private_dir(self.root, parents=True)
                make_private_dir(self._blobs)
                make_private_dir(self._blobs / "sha256")
                make_private_dir(self._ingest)
            except OSError as exc:
                msg = f"cannot create content store directories under {self.root}: {exc}"
                raise disk_error(msg, exc) from exc
        self._lock_root = str(self.root.resolve())
        if clean and not self._readonly:
            self._remove_abort_leftovers()
            removed = self.remove_orphans()
            if removed:
                logger.warning(
                    "removed %d orphan blob files (no metadata) under %s: %s",
                    len(removed),
                    self._blobs,
                    ", ".join(p.name for p in removed),
                )

    # -- reading ----------------------------------------------------------------------------

    def info(self, digest: str, *, txn: ReadTxn | None = None) -> ContentInfo:
        """Returns what the store knows of blob ``digest`` (containerd ``Info``).

        Args:
            digest: A ``sha256:``/``sha512:`` digest.
            txn: Read inside this transaction (sees its uncommitted writes).

        Raises:
            InvalidError: ``digest`` is malformed.
            NotFoundError: No blob ``digest``.
            CorruptMetadataError: Its metadata cannot be decoded.
        """
        validate_digest(digest)
        with self._env.joined_read(txn) as rtxn:
            raw = rtxn.get(DB_CONTENT, digest.encode())
        if raw is None:
            msg = f"content {digest} not found"
            raise NotFoundError(msg)
        return _decode_info(digest, raw)

    def exists(self, digest: str, *, txn: ReadTxn | None = None) -> bool:
        """Returns whether blob ``digest`` is in the store (has metadata).

        Raises:
            InvalidError: ``digest`` is malformed.
        """
        validate_digest(digest)
        with self._env.joined_read(txn) as rtxn:
            return rtxn.get(DB_CONTENT, digest.encode()) is not None

    def walk(self, *filters: str, txn: ReadTxn | None = None) -> Iterator[ContentInfo]:
        """Iterates over the blobs matching any of ``filters``, in digest order.

        Filter fields (containerd syntax, see :mod:`storage._filters`): ``digest``, ``size``
        (compared as a decimal string) and ``labels.<key>``. The result is read in one
        consistent snapshot before the first item is returned, so the caller may write to the
        store while iterating.

        Raises:
            InvalidError: A filter does not parse (raised by this call, not on iteration).
            CorruptMetadataError: A blob's metadata cannot be decoded.
        """
        matcher = parse_filters(*filters)
        with self._env.joined_read(txn) as rtxn:
            items = list(rtxn.items(DB_CONTENT))
        infos = [_decode_info(key.decode("utf-8", "replace"), raw) for key, raw in items]
        return iter([i for i in infos if matcher.match(_info_adaptor(i))])

    def path(self, digest: str) -> Path:
        """Returns where blob ``digest`` is (or would be) stored: ``blobs/<alg>/<hex>``.

        Pure path arithmetic (containerd ``blobPath``): it does not say whether the blob
        exists; use :meth:`exists`.

        Raises:
            InvalidError: ``digest`` is malformed.
        """
        validate_digest(digest)
        algorithm, _, encoded = digest.partition(":")
        return self._blobs / algorithm / encoded

    def reader_at(self, digest: str | Descriptor) -> BinaryIO:
        """Opens blob ``digest`` (or a descriptor's digest) as a seekable binary file.

        The caller closes it. The open file stays readable even if the blob is deleted
        meanwhile (POSIX unlink semantics).

        Raises:
            InvalidError: ``digest`` is malformed.
            NotFoundError: No blob ``digest``, or its file is missing.
        """
        dgst = digest.digest if isinstance(digest, Descriptor) else digest
        if not self.exists(dgst):
            msg = f"content {dgst} not found"
            raise NotFoundError(msg)
        path = self.path(dgst)
        try:
            return path.open("rb")
        except FileNotFoundError as exc:
            msg = f"content {dgst} has metadata but its blob is missing at {path}"
            raise NotFoundError(msg) from exc
        except OSError as exc:
            msg = f"cannot open content {dgst} at {path}: {exc}"
            raise RefcacheError(msg) from exc

    # -- labels -----------------------------------------------------------------------------

    def update(
        self, info: ContentInfo, *fieldpaths: str, txn: WriteTxn | None = None
    ) -> ContentInfo:
        """Updates the labels of blob ``info.digest`` (containerd metadata ``Update``).

        Only labels are mutable. ``"labels"`` (or no fieldpath) replaces every label with
        ``info.labels``; ``"labels.<key>"`` sets one key from ``info.labels`` (absent or empty
        deletes it). Empty values are never stored. ``updated_at`` becomes now.

        Args:
            info: Carries the digest and the labels to write; its size and times are ignored.
            *fieldpaths: Which labels to change.
            txn: Write inside this transaction instead of a new one.

        Returns:
            The blob's info after the update.

        Raises:
            InvalidError: ``info`` is not a ContentInfo, its digest is malformed, a fieldpath
                is not ``labels``/``labels.<key>``, or a label is invalid. Nothing changes.
            NotFoundError: No blob ``info.digest``.
        """
        if not isinstance(info, ContentInfo):
            msg = f"update needs a ContentInfo, got {type(info).__name__}"
            raise InvalidError(msg)
        digest = validate_digest(info.digest)
        incoming = validate_labels(info.labels, what=f"content {digest}")
        replace_all = not fieldpaths
        keys: list[str] = []
        for path in fieldpaths:
            if not isinstance(path, str):
                msg = f"invalid fieldpath {path!r} for content {digest}: not a string"
                raise InvalidError(msg)
            if path == "labels":
                replace_all = True
            elif path.startswith("labels.") and len(path) > len("labels."):
                keys.append(path[len("labels.") :])
            else:
                msg = f"cannot update {path!r} field on content info {digest}: only labels"
                raise InvalidError(msg)
        with self._writing(txn) as wtxn:
            raw = wtxn.get(DB_CONTENT, digest.encode())
            if raw is None:
                msg = f"content {digest} not found"
                raise NotFoundError(msg)
            record = _decode_record(digest, raw)
            labels: dict[str, str] = {} if replace_all else dict(record["labels"])
            if replace_all:
                labels.update(incoming)
            for key in keys:
                labels[key] = incoming.get(key, "")
            record["labels"] = {k: v for k, v in labels.items() if v != ""}
            record["updated_at"] = max(time.time_ns(), int(record["updated_at"]))
            wtxn.put(DB_CONTENT, digest.encode(), msgpack.packb(record))
        return _info_from_record(digest, record)

    # -- deleting ---------------------------------------------------------------------------

    def delete(self, digest: str, *, txn: WriteTxn | None = None) -> None:
        """Deletes blob ``digest``: metadata in the transaction, the file after it commits.

        If the transaction rolls back, metadata and file both stay. Nothing in refcache
        calls this except garbage collection (BuildKit deletes blobs only through GC).

        Raises:
            InvalidError: ``digest`` is malformed.
            NotFoundError: No blob ``digest``.
        """
        validate_digest(digest)
        key = digest.encode()
        with self._writing(txn) as wtxn:
            if not wtxn.delete(DB_CONTENT, key):
                msg = f"content {digest} not found"
                raise NotFoundError(msg)
            wtxn.after_commit(lambda: self._unlink_if_forgotten(digest))

    def _unlink_if_forgotten(self, digest: str) -> None:
        # Runs after the deleting commit, still under the environment's write lock: re-check,
        # because the same transaction may have written the digest again after deleting it.
        if self.exists(digest):
            return
        path = self.path(digest)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("cannot remove deleted blob %s at %s: %s", digest, path, exc)

    # -- ingests ----------------------------------------------------------------------------

    def writer(self, ref: str, *, total: int = 0, expected: str | None = None) -> ContentWriter:
        """Opens the ingest ``ref``, resuming it if it exists (containerd ``Writer``).

        Args:
            ref: Names the ingest; a later writer on the same ref resumes it.
            total: Expected size (0 = unknown). Stored with a new ingest.
            expected: Expected digest; its algorithm (sha256/sha512) is the writer's. It is
                also the default for :meth:`ContentWriter.commit`.

        Returns:
            An open writer; its offset is where a resumed ingest stopped.

        Raises:
            InvalidError: ``ref`` is empty or not a string, ``total`` negative, ``expected``
                malformed. Nothing changes.
            LockedError: Another writer on ``ref`` is open (containerd ``Unavailable``).
            AlreadyExistsError: ``expected`` is already in the store.
            FailedPreconditionError: The stored ingest has a different total, or the store is
                read-only.
            StoreFullError: No space to create the ingest.
        """
        return self._open_writer(ref, total=total, expected=expected, timeout=0.0, txn=None)

    def _open_writer(
        self,
        ref: str,
        *,
        total: int,
        expected: str | None,
        timeout: float,
        txn: ReadTxn | None,
    ) -> IngestWriter:
        check_ref(ref)
        if not isinstance(total, int) or isinstance(total, bool) or total < 0:
            msg = f"invalid total {total!r} for ref {ref!r}: expected an int >= 0"
            raise InvalidError(msg)
        if expected is not None:
            validate_digest(expected, what=f"expected digest for ref {ref!r}")
        if self._readonly:
            msg = f"content store {self.root} is read-only; cannot write ref {ref!r}"
            raise FailedPreconditionError(msg)
        lock_ref(self._lock_root, ref, timeout=timeout)
        try:
            if expected is not None:
                self._require_absent(expected, f"writer for ref {ref!r}", txn)
            return start_ingest(
                self._ingest, ref, total, expected, lock_root=self._lock_root, place=self._commit
            )
        except BaseException:
            unlock_ref(self._lock_root, ref)
            raise

    def abort(self, ref: str, *, txn: WriteTxn | None = None) -> None:
        """Removes the ingest ``ref`` and its data (containerd ``Abort``).

        Args:
            ref: The ingest to remove.
            txn: Remove it only after this transaction commits (garbage collection sweeps
                inside one transaction); existence is checked now.

        Raises:
            InvalidError: ``ref`` is empty or not a string.
            NotFoundError: No ingest ``ref``.
            LockedError: A writer on ``ref`` is open in this process. (containerd removes the
                files under an open writer; refusing keeps that writer's commit meaningful.)
        """
        check_ref(ref)
        path = ingest_path(self._ingest, ref)
        if not path.is_dir():
            msg = f"ingest ref {ref!r} not found"
            raise NotFoundError(msg)
        if txn is None:
            self._abort_now(ref, strict=True)
            return
        if is_ref_locked(self._lock_root, ref):
            msg = f"ref {ref!r} locked for writing; cannot abort it"
            raise LockedError(msg)
        txn.after_commit(lambda: self._abort_now(ref, strict=False))

    def _abort_now(self, ref: str, *, strict: bool) -> None:
        try:
            lock_ref(self._lock_root, ref)
        except LockedError:
            if strict:
                raise
            logger.warning("ingest ref %r was reopened before its abort ran; kept", ref)
            return
        try:
            if not remove_ingest(ingest_path(self._ingest, ref), ref) and strict:
                msg = f"ingest ref {ref!r} not found"
                raise NotFoundError(msg)
        finally:
            unlock_ref(self._lock_root, ref)

    def status(self, ref: str) -> ContentStatus:
        """Returns the status of ingest ``ref`` as stored on disk (containerd ``Status``).

        Raises:
            InvalidError: ``ref`` is empty or not a string.
            NotFoundError: No ingest ``ref``.
        """
        check_ref(ref)
        path = ingest_path(self._ingest, ref)
        try:
            return read_status(path)
        except FileNotFoundError as exc:
            msg = f"ingest ref {ref!r} not found"
            raise NotFoundError(msg) from exc
        except (OSError, ValueError) as exc:
            msg = f"cannot read the status of ingest ref {ref!r} at {path}: {exc}"
            raise RefcacheError(msg) from exc

    def list_statuses(self, *filters: str) -> list[ContentStatus]:
        """Lists ingests matching any of ``filters`` (field ``ref``), ordered by ref.

        Unreadable or half-removed ingests are skipped (containerd does the same).

        Raises:
            InvalidError: A filter does not parse.
        """
        matcher = parse_filters(*filters)
        statuses: list[ContentStatus] = []
        try:
            entries = list(os.scandir(self._ingest))
        except FileNotFoundError:
            return []
        for entry in entries:
            if entry.name.endswith(ABORT_SUFFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                status = read_status(Path(entry.path))
            except (OSError, ValueError):
                continue
            if matcher.match(_status_adaptor(status)):
                statuses.append(status)
        return sorted(statuses, key=lambda s: s.ref)

    def active_refs(self) -> list[str]:
        """Returns the refs that have an open writer in this process (for close reports)."""
        return locked_refs(self._lock_root)

    # -- whole blobs --------------------------------------------------------------------------

    def write_blob(
        self,
        data: bytes | bytearray | memoryview | BinaryIO,
        expected: Descriptor | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        media_type: str = MEDIA_TYPE_OCI_LAYER_GZIP,
        txn: WriteTxn | None = None,
        lock_timeout: float = 60.0,
    ) -> Descriptor:
        """Writes a whole blob and returns its descriptor (containerd ``content.WriteBlob``).

        The ingest ref is derived from ``expected.digest`` (so a crashed write resumes), or
        random without ``expected``. A blob already present is success, as in containerd:
        ``labels`` are merged into it and its descriptor returned. Concurrent calls for the
        same digest wait for each other (containerd ``OpenWriter`` retries a locked ref).

        A stream resumes at the ingest's offset (seeking, or skipping bytes when not
        seekable); bytes are written from the start (they are at hand, and a crashed ingest's
        prefix need not be trusted). On any failure the ingest is aborted.

        Args:
            data: The blob, as bytes or a binary file object read to its end.
            expected: Verify size (when > 0, containerd's rule) and digest against it; its
                media type, annotations and urls are copied to the result.
            labels: Content labels to set (merged into an existing blob's labels).
            media_type: Media type of the result when there is no ``expected``.
            txn: Commit the metadata inside this transaction.
            lock_timeout: Seconds to wait for another writer of the same digest (no wait with
                ``txn``: that writer could not finish while the transaction is open).

        Returns:
            ``Descriptor(media_type, digest, size, annotations, urls)`` of the stored blob.

        Raises:
            InvalidError: Bad argument types, labels or descriptor. Nothing changes.
            FailedPreconditionError: The data does not match ``expected``; nothing is kept.
            LockedError: Another writer kept the ref longer than ``lock_timeout``.
            StoreFullError: The disk is full; nothing is kept.
        """
        new_labels = _check_write_blob(data, expected, media_type, labels)
        if expected is not None and self.exists(expected.digest, txn=txn):
            return self._existing(expected.digest, expected, media_type, new_labels, txn)
        ref = f"write-blob-{expected.digest if expected else uuid.uuid4().hex}"
        try:
            writer = self._open_writer(
                ref,
                total=max(expected.size, 0) if expected else 0,
                expected=expected.digest if expected else None,
                # Inside a caller's transaction, waiting cannot succeed: the other writer needs
                # the environment's write lock, which that transaction holds.
                timeout=0.0 if txn is not None else lock_timeout,
                txn=txn,
            )
        except AlreadyExistsError:
            # Another writer finished the same blob while we waited for its ref (only a
            # writer with an expected digest raises this at open).
            if expected is None:
                raise
            return self._existing(expected.digest, expected, media_type, new_labels, txn)
        # Failures remove the ingest while the ref is still locked, so that a concurrent
        # write_blob waiting for the ref never resumes a rejected ingest.
        writer.discard_on_error = True
        try:
            _feed(writer, data)
        except BaseException:
            writer.discard()
            raise
        try:
            info = writer.commit(
                size=expected.size if expected and expected.size > 0 else 0,
                expected=expected.digest if expected else None,
                labels=new_labels,
                txn=txn,
            )
        except AlreadyExistsError:
            # The commit found the blob (committed meanwhile, or written without expected).
            return self._existing(writer.digest(), expected, media_type, new_labels, txn)
        return _descriptor(info.digest, info.size, expected, media_type)

    def copy(
        self,
        writer: ContentWriter,
        stream: BinaryIO,
        size: int = 0,
        expected: str | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        txn: WriteTxn | None = None,
    ) -> ContentInfo:
        """Feeds ``stream`` to ``writer`` from its offset and commits (containerd ``Copy``).

        A resumed writer continues where its ingest stopped: the stream is seeked there, or
        that many bytes are read and dropped when it cannot seek. A blob already present is
        success, as in containerd; its info is returned.

        Args:
            writer: An open writer of this store (fresh or resumed).
            stream: A binary file object holding the whole blob from its start.
            size: Expected size (0 = the writer's total, or unchecked).
            expected: Expected digest (None = the writer's).
            labels: Labels for the new blob (not applied to an existing one).
            txn: Commit the metadata inside this transaction.

        Returns:
            The stored blob's info.

        Raises:
            FailedPreconditionError: Size or digest mismatch, or the stream ends before the
                writer's offset; the ingest stays, as with :meth:`ContentWriter.commit`.
            StoreFullError: The disk is full.
        """
        copy_stream(writer, stream, writer.ref)
        try:
            return writer.commit(size, expected, labels=labels, txn=txn)
        except AlreadyExistsError:
            return self.info(expected or writer.digest(), txn=txn)

    def _existing(
        self,
        digest: str,
        expected: Descriptor | None,
        media_type: str,
        labels: Mapping[str, str],
        txn: WriteTxn | None,
    ) -> Descriptor:
        if labels:
            merge = ContentInfo(digest=digest, size=0, labels=labels)
            info = self.update(merge, *(f"labels.{k}" for k in labels), txn=txn)
        else:
            info = self.info(digest, txn=txn)
        if expected is not None and expected.size > 0 and expected.size != info.size:
            msg = (
                f"content {digest} exists with size {info.size}, but the descriptor says "
                f"{expected.size}"
            )
            raise FailedPreconditionError(msg)
        return _descriptor(digest, info.size, expected, media_type)

    # -- consistency -----------------------------------------------------------------------

    def orphans(self) -> list[Path]:
        """Returns blob files that have no metadata (left by a crash or a rolled-back commit).

        Files with names that are not a digest, inside ``blobs/<alg>/``, count as orphans too.
        Directories of unknown algorithms are skipped, as containerd's ``Walk`` does.
        """
        with self._env.read_txn() as rtxn:
            return self._find_orphans(rtxn)

    def remove_orphans(self, *, txn: WriteTxn | None = None) -> list[Path]:
        """Removes the blob files that have no metadata; returns what was removed.

        Runs inside a write transaction so that no commit is between renaming a file into
        place and writing its metadata meanwhile.
        """
        with self._writing(txn) as wtxn:
            doomed = self._find_orphans(wtxn)
            removed: list[Path] = []
            for path in doomed:
                try:
                    path.unlink()
                    removed.append(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    logger.warning("cannot remove orphan blob %s: %s", path, exc)
            return removed

    def missing(self) -> list[str]:
        """Returns digests that have metadata but no blob file (never produced by commits)."""
        with self._env.read_txn() as rtxn:
            digests = [key.decode("utf-8", "replace") for key in rtxn.keys(DB_CONTENT)]
        result = []
        for digest in digests:
            try:
                path = self.path(digest)
            except InvalidError:
                result.append(digest)
                continue
            if not path.is_file():
                result.append(digest)
        return result

    def _find_orphans(self, rtxn: ReadTxn) -> list[Path]:
        found: list[Path] = []
        for algorithm in sorted(HASHES):
            directory = self._blobs / algorithm
            try:
                entries = sorted(os.scandir(directory), key=lambda e: e.name)
            except FileNotFoundError:
                continue
            for entry in entries:
                digest = f"{algorithm}:{entry.name}"
                try:
                    validate_digest(digest)
                except InvalidError:
                    found.append(Path(entry.path))
                    continue
                if rtxn.get(DB_CONTENT, digest.encode()) is None:
                    found.append(Path(entry.path))
        return found

    # -- internals ----------------------------------------------------------------------------

    def _require_absent(self, digest: str, context: str, txn: ReadTxn | None) -> None:
        if self.exists(digest, txn=txn):
            msg = f"content {digest} already exists ({context})"
            raise AlreadyExistsError(msg)

    def _remove_abort_leftovers(self) -> None:
        try:
            entries = list(os.scandir(self._ingest))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name.endswith(ABORT_SUFFIX):
                logger.info("removing interrupted ingest abort %s", entry.path)
                remove_quietly(Path(entry.path))

    @contextmanager
    def _writing(self, txn: WriteTxn | None) -> Iterator[WriteTxn]:
        with self._env.joined_write(txn) as wtxn:
            self._forget_rolled_back(wtxn)
            yield wtxn

    def _forget_rolled_back(self, current: WriteTxn) -> None:
        """Unlinks blob files whose committing transaction rolled back.

        Runs inside a write transaction: the environment's write lock is held, so every other
        write transaction has ended, and the committed ones have confirmed their entries.
        """
        with self._unconfirmed_lock:
            stale = [(t, d) for t, d in self._unconfirmed if t is not current]
            self._unconfirmed = [(t, d) for t, d in self._unconfirmed if t is current]
        for _, digest in stale:
            if current.get(DB_CONTENT, digest.encode()) is None:
                path = self.path(digest)
                logger.info("removing blob %s of a rolled-back commit", digest)
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    logger.warning("cannot remove rolled-back blob %s: %s", path, exc)

    def _track(self, txn: WriteTxn, digest: str) -> None:
        with self._unconfirmed_lock:
            self._unconfirmed.append((txn, digest))
        txn.after_commit(lambda: self._confirm(txn, digest))

    def _confirm(self, txn: WriteTxn, digest: str) -> None:
        with self._unconfirmed_lock:
            self._unconfirmed = [
                (t, d) for t, d in self._unconfirmed if not (t is txn and d == digest)
            ]

    def _sweep_after_failure(self) -> None:
        if self._readonly:
            return
        try:
            with self._env.write_txn() as wtxn:
                self._forget_rolled_back(wtxn)
        except RefcacheError as exc:
            logger.warning("cannot clean up after a failed content commit: %s", exc)

    def _commit(
        self,
        writer: IngestWriter,
        digest: str,
        size: int,
        labels: Mapping[str, str],
        txn: WriteTxn | None,
    ) -> ContentInfo:
        """Moves the verified ingest into ``blobs/`` and records it, in that order."""
        own = txn is None
        try:
            with self._writing(txn) as wtxn:
                key = digest.encode()
                if wtxn.get(DB_CONTENT, key) is not None:
                    # containerd: the ingest goes, and the caller learns the blob is there.
                    remove_quietly(writer.path)
                    self._require_absent(digest, f"commit of ref {writer.ref!r}", wtxn)
                # Tracked before the rename: should this transaction roll back, the store's
                # next write transaction removes the file again.
                self._track(wtxn, digest)
                _place_blob(writer.path / "data", self.path(digest), writer.ref)
                now = time.time_ns()
                record = {
                    "size": size,
                    "created_at": now,
                    "updated_at": now,
                    "labels": dict(labels),
                }
                wtxn.put(DB_CONTENT, key, msgpack.packb(record))
                remove_quietly(writer.path)
        except AlreadyExistsError:
            raise
        except BaseException:
            if own:
                self._sweep_after_failure()
            raise
        return _info_from_record(digest, record)


# --- helpers -----------------------------------------------------------------------------


def _check_write_blob(
    data: object, expected: object, media_type: object, labels: Mapping[str, str] | None
) -> dict[str, str]:
    """Checks :meth:`LocalContentStore.write_blob`'s arguments; returns the labels."""
    if not isinstance(data, bytes | bytearray | memoryview) and not callable(
        getattr(data, "read", None)
    ):
        msg = f"write_blob needs bytes or a binary file object, got {type(data).__name__}"
        raise InvalidError(msg)
    if expected is not None and not isinstance(expected, Descriptor):
        msg = f"expected must be a Descriptor or None, got {type(expected).__name__}"
        raise InvalidError(msg)
    if not isinstance(media_type, str) or not media_type:
        msg = f"invalid media type {media_type!r}"
        raise InvalidError(msg)
    return validate_labels(labels, what="write_blob")


def _feed(writer: IngestWriter, data: bytes | bytearray | memoryview | BinaryIO) -> None:
    """Writes a whole blob: bytes from the start (a crashed ingest's prefix is not trusted
    when the bytes are at hand), a stream from the ingest's offset."""
    if isinstance(data, bytes | bytearray | memoryview):
        if writer.offset:
            writer.truncate(0)
        view = memoryview(data).cast("B")
        for start in range(0, len(view), CHUNK):
            writer.write(view[start : start + CHUNK])
    else:
        copy_stream(writer, data, writer.ref)


def _descriptor(digest: str, size: int, expected: Descriptor | None, media_type: str) -> Descriptor:
    if expected is None:
        return Descriptor(media_type=media_type, digest=digest, size=size)
    return Descriptor(
        media_type=expected.media_type,
        digest=digest,
        size=size,
        annotations=expected.annotations,
        urls=expected.urls,
    )


def _place_blob(source: Path, target: Path, ref: str) -> None:
    """Renames a verified ingest file into ``blobs/`` durably (containerd ``Commit``)."""
    try:
        directory = target.parent
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            fsync_dir(directory.parent)
        # os.replace: an orphan file of the same digest (crash, rolled-back commit) is simply
        # overwritten by this verified copy.
        os.replace(source, target)
        os.chmod(target, 0o444)
        fsync_dir(directory)
    except OSError as exc:
        msg = f"cannot move ingest ref {ref!r} into {target}: {exc}"
        raise disk_error(msg, exc) from exc


def _decode_record(digest: str, raw: bytes) -> dict[str, Any]:
    try:
        record = msgpack.unpackb(raw)
    except (ValueError, msgpack.UnpackException) as exc:
        msg = f"content metadata of {digest} cannot be decoded: {exc}"
        raise CorruptMetadataError(msg, record_id=digest) from exc
    if not isinstance(record, dict):
        msg = f"content metadata of {digest} is {type(record).__name__}, not a map"
        raise CorruptMetadataError(msg, record_id=digest)
    for key in ("size", "created_at", "updated_at"):
        value = record.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            msg = f"content metadata of {digest} has a bad {key!r}: {value!r}"
            raise CorruptMetadataError(msg, record_id=digest, key=key)
    labels = record.get("labels", {})
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        msg = f"content metadata of {digest} has bad labels: {labels!r}"
        raise CorruptMetadataError(msg, record_id=digest, key="labels")
    record["labels"] = labels
    return record


def _info_from_record(digest: str, record: Mapping[str, Any]) -> ContentInfo:
    return ContentInfo(
        digest=digest,
        size=int(record["size"]),
        labels=frozen_map(record["labels"]),
        created_at=int(record["created_at"]),
        updated_at=int(record["updated_at"]),
    )


def _decode_info(digest: str, raw: bytes) -> ContentInfo:
    return _info_from_record(digest, _decode_record(digest, raw))


def _info_adaptor(info: ContentInfo) -> Adaptor:
    # containerd content.AdaptInfo, plus "size" (containerd leaves it a TODO).
    def field_of(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        if fieldpath[0] == "digest":
            return info.digest, True
        if fieldpath[0] == "size":
            return str(info.size), True
        if fieldpath[0] == "labels":
            return map_field(fieldpath[1:], info.labels)
        return "", False

    return field_of


def _status_adaptor(status: ContentStatus) -> Adaptor:
    # containerd local adaptStatus: only "ref".
    def field_of(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if fieldpath and fieldpath[0] == "ref":
            return status.ref, True
        return "", False

    return field_of
