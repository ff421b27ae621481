"""Ingests of the local content store: containerd's in-progress writes.

On disk, one directory per ingest under ``<content root>/ingest``, named after the sha256 of
its ref (containerd ``plugins/content/local``)::

    ingest/<sha256(ref) hex>/   ref  data  startedat  updatedat  [total]

One writer per ref at a time in this process (:func:`lock_ref`; containerd's ``locks.go``),
resumable ingests (a new writer on a ref continues at the stored offset), unbuffered writes
(the data file's size is always the offset). What a commit does with the verified data is
the store's (``_content.py``): it hands the writer a :data:`PlaceBlob`.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

from ._env import WriteTxn
from ._errors import (
    FailedPreconditionError,
    InvalidError,
    LockedError,
    RefcacheError,
    StoreFullError,
)
from ._labels import validate_labels
from ._layout import make_private_dir
from ._times import format_rfc3339_ns, parse_rfc3339_ns
from ._tree import remove_tree
from ._types import ContentInfo, validate_digest

__all__ = [
    "ABORT_SUFFIX",
    "CHUNK",
    "HASHES",
    "ContentStatus",
    "ContentWriter",
    "IngestWriter",
    "PlaceBlob",
    "check_ref",
    "copy_stream",
    "disk_error",
    "ingest_path",
    "is_ref_locked",
    "lock_ref",
    "locked_refs",
    "read_status",
    "remove_ingest",
    "remove_quietly",
    "start_ingest",
    "unlock_ref",
]

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}
#: Suffix of an ingest directory renamed away to be removed (left over by a crash).
ABORT_SUFFIX = ".tmp"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

# --- per-process ref locks (containerd plugins/content/local/locks.go) -------------------
#
# Keyed by (resolved content root, ref) so that two store objects on one root in one process
# still exclude each other. This lock guards state that lives outside every actor.
_REF_LOCKS: dict[tuple[str, str], int] = {}
_REF_LOCKS_COND = threading.Condition(threading.Lock())


def lock_ref(root: str, ref: str, *, timeout: float = 0.0) -> None:
    key = (root, ref)
    deadline = time.monotonic() + timeout
    with _REF_LOCKS_COND:
        while key in _REF_LOCKS:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                since = format_rfc3339_ns(_REF_LOCKS[key])
                msg = f"ref {ref!r} locked for writing (since {since})"
                raise LockedError(msg)
            _REF_LOCKS_COND.wait(remaining)
        _REF_LOCKS[key] = time.time_ns()


def unlock_ref(root: str, ref: str) -> None:
    with _REF_LOCKS_COND:
        _REF_LOCKS.pop((root, ref), None)
        _REF_LOCKS_COND.notify_all()


def is_ref_locked(root: str, ref: str) -> bool:
    """Whether a writer on ``ref`` is open in this process."""
    with _REF_LOCKS_COND:
        return (root, ref) in _REF_LOCKS


def locked_refs(root: str) -> list[str]:
    """The refs of ``root`` that have an open writer in this process, sorted."""
    with _REF_LOCKS_COND:
        return sorted(ref for r, ref in _REF_LOCKS if r == root)


# --- the writer ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContentStatus:
    """The state of one ingest (containerd ``content.Status``).

    Attributes:
        ref: The writer's ref.
        offset: Bytes written so far.
        total: Expected total size (0 when unknown).
        expected: Expected digest ("" when unknown; only a live writer knows it, as in
            containerd's local store, which does not persist it).
        started_at: Nanoseconds since the epoch when the ingest began.
        updated_at: Nanoseconds since the epoch of the last write.
    """

    ref: str
    offset: int
    total: int = 0
    expected: str = ""
    started_at: int = 0
    updated_at: int = 0


@runtime_checkable
class ContentWriter(Protocol):
    """An open ingest (containerd ``content.Writer``). One owner thread; not thread-safe."""

    @property
    def ref(self) -> str:
        """The ingest's ref."""
        ...

    @property
    def offset(self) -> int:
        """Bytes written so far (the resume point)."""
        ...

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Appends ``data``; returns its length."""
        ...

    def digest(self) -> str:
        """The digest of everything written so far."""
        ...

    def status(self) -> ContentStatus:
        """The ingest's current status."""
        ...

    def truncate(self, size: int = 0) -> None:
        """Restarts the ingest from empty (only ``size=0`` is supported, as in containerd)."""
        ...

    def commit(
        self,
        size: int = 0,
        expected: str | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        txn: WriteTxn | None = None,
    ) -> ContentInfo:
        """Verifies and moves the data into the store; always closes the writer."""
        ...

    def close(self) -> None:
        """Closes the writer and keeps the ingest for a later resume."""
        ...

    def __enter__(self) -> ContentWriter: ...

    def __exit__(self, *exc_info: object) -> None: ...


#: Moves a verified ingest into the store and records it: ``(writer, digest, size, labels,
#: txn) -> info``; the store's side of a commit.
PlaceBlob = Callable[["IngestWriter", str, int, Mapping[str, str], WriteTxn | None], ContentInfo]


class IngestWriter:
    """An open ingest of the local content store; implements :class:`ContentWriter`.

    Writes are unbuffered (``os.write`` on the data file), so the file size is always the
    offset, which is what a resume reads back.
    """

    def __init__(
        self,
        *,
        ref: str,
        path: Path,
        fd: int,
        offset: int,
        total: int,
        hasher: Any,
        algorithm: str,
        expected: str,
        started_at: int,
        updated_at: int,
        lock_root: str,
        place: PlaceBlob,
    ) -> None:
        self._lock_root = lock_root
        self._place = place
        self._ref = ref
        self.path = path
        self._fd: int | None = fd
        self._offset = offset
        self._total = total
        self._hasher = hasher
        self._algorithm = algorithm
        self._expected = expected
        self._started_at = started_at
        self._updated_at = updated_at
        #: Remove the ingest when writing or committing fails (write_blob's one-shot mode);
        #: by default a failed ingest stays for a resume, as in containerd.
        self.discard_on_error = False

    @property
    def ref(self) -> str:
        """The ingest's ref."""
        return self._ref

    @property
    def offset(self) -> int:
        """Bytes written so far."""
        return self._offset

    def __enter__(self) -> IngestWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self._fd is not None else "closed"
        return f"<ContentWriter ref={self._ref!r} offset={self._offset} {state}>"

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Appends ``data`` to the ingest.

        Returns:
            ``len(data)``.

        Raises:
            InvalidError: ``data`` is not bytes-like.
            FailedPreconditionError: The writer is closed or committed.
            StoreFullError: The disk is full; the data file is cut back to the previous offset
                and the writer stays usable (the ingest remains resumable).
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            msg = f"write to ref {self._ref!r} needs bytes, got {type(data).__name__}"
            raise InvalidError(msg)
        fd = self._require_open("write to")
        view = memoryview(data).cast("B")
        written = 0
        try:
            while written < len(view):
                written += os.write(fd, view[written:])
        except OSError as exc:
            # Cut back to the last whole write so that file size, offset and digest agree.
            try:
                os.ftruncate(fd, self._offset)
                os.lseek(fd, self._offset, os.SEEK_SET)
            except OSError:
                logger.exception("cannot restore ingest %r after a failed write", self._ref)
            msg = f"write to ingest ref {self._ref!r} failed at offset {self._offset}: {exc}"
            raise disk_error(msg, exc) from exc
        self._hasher.update(view)
        self._offset += len(view)
        self._updated_at = time.time_ns()
        return len(view)

    def digest(self) -> str:
        """The digest of the bytes written so far (still valid after commit or close)."""
        return f"{self._algorithm}:{self._hasher.hexdigest()}"

    def status(self) -> ContentStatus:
        """The writer's status (containerd ``Writer.Status``)."""
        return ContentStatus(
            ref=self._ref,
            offset=self._offset,
            total=self._total,
            expected=self._expected,
            started_at=self._started_at,
            updated_at=self._updated_at,
        )

    def truncate(self, size: int = 0) -> None:
        """Restarts the ingest from empty: offset and digest reset.

        Raises:
            InvalidError: ``size`` is not 0 (containerd supports only 0).
            FailedPreconditionError: The writer is closed.
        """
        if size != 0 or isinstance(size, bool):
            msg = f"truncate of ref {self._ref!r} supports only size 0, not {size!r}"
            raise InvalidError(msg)
        fd = self._require_open("truncate")
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
        except OSError as exc:
            msg = f"cannot truncate ingest ref {self._ref!r}: {exc}"
            raise disk_error(msg, exc) from exc
        self._hasher = HASHES[self._algorithm]()
        self._offset = 0
        self._updated_at = time.time_ns()

    def commit(
        self,
        size: int = 0,
        expected: str | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        txn: WriteTxn | None = None,
    ) -> ContentInfo:
        """Verifies the ingest and moves it into the store (containerd ``Writer.Commit``).

        The data is fsynced, checked, renamed to ``blobs/<alg>/<hex>`` (read-only), the
        directory fsynced, and then the metadata is written. The writer is closed afterwards,
        whatever the outcome, except for invalid arguments (which change nothing).

        Args:
            size: Expected size; 0 means the writer's ``total`` (0 = do not check).
            expected: Expected digest; ``None`` means the writer's ``expected`` (if any).
            labels: Content labels of the new blob.
            txn: Write the metadata inside this transaction. Should it roll back, the blob
                is forgotten, and its file removed by the store's next write transaction.

        Returns:
            The new blob's info.

        Raises:
            InvalidError: A bad ``size``, ``expected`` or label. Nothing changes.
            FailedPreconditionError: The writer is closed, or size or digest do not match;
                the ingest stays, to be resumed, truncated or aborted.
            AlreadyExistsError: The blob is already in the store; the ingest is removed.
            StoreFullError: The disk is full while syncing the ingest (the ingest stays), or
                while moving it or committing the metadata (the blob is not stored, and its
                data, already moved, is gone with the ingest: write it again).
        """
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            msg = f"invalid commit size {size!r} for ref {self._ref!r}"
            raise InvalidError(msg)
        if expected is not None:
            validate_digest(expected, what=f"expected digest for ref {self._ref!r}")
        new_labels = validate_labels(labels, what=f"commit of ref {self._ref!r}")
        fd = self._fd
        if fd is None:
            msg = f"cannot commit on closed writer for ref {self._ref!r}"
            raise FailedPreconditionError(msg)
        size = size or self._total
        expected = expected or self._expected or None
        self._fd = None
        committed = False
        try:
            actual_size = self._sync(fd)
            digest = self._verify(size, expected, actual_size)
            info = self._place(self, digest, actual_size, new_labels, txn)
            committed = True
            return info
        finally:
            if not committed and self.discard_on_error:
                remove_ingest(self.path, self._ref)
            # containerd: "Ensure even on error the writer is fully closed".
            unlock_ref(self._lock_root, self._ref)

    def _sync(self, fd: int) -> int:
        """Syncs and closes the data file; returns its size."""
        try:
            os.fsync(fd)
            return os.fstat(fd).st_size
        except OSError as exc:
            msg = f"cannot sync ingest ref {self._ref!r}: {exc}"
            raise disk_error(msg, exc) from exc
        finally:
            os.close(fd)

    def _verify(self, size: int, expected: str | None, actual_size: int) -> str:
        """The ingest's digest, checked against ``size`` (when > 0) and ``expected``."""
        if size > 0 and size != actual_size:
            msg = f"unexpected commit size {actual_size} for ref {self._ref!r}, expected {size}"
            raise FailedPreconditionError(msg)
        digest = self.digest()
        if expected is not None and not expected.startswith(f"{self._algorithm}:"):
            # containerd re-hashes when the expected digest uses another algorithm.
            digest = self._rehash(expected.partition(":")[0])
        if expected is not None and expected != digest:
            msg = f"unexpected commit digest {digest} for ref {self._ref!r}, expected {expected}"
            raise FailedPreconditionError(msg)
        return digest

    def close(self) -> None:
        """Closes the writer; the ingest stays for a later resume. Safe to call twice."""
        fd = self._fd
        if fd is None:
            return
        self._fd = None
        try:
            try:
                os.fsync(fd)
            except OSError as exc:
                logger.warning("cannot sync ingest ref %r on close: %s", self._ref, exc)
            os.close(fd)
            try:
                stamp = format_rfc3339_ns(self._updated_at).encode()
                write_atomic(self.path / "updatedat", stamp)
            except OSError as exc:
                logger.warning("cannot record update time of ingest ref %r: %s", self._ref, exc)
        finally:
            unlock_ref(self._lock_root, self._ref)

    def discard(self) -> None:
        """Closes the writer and removes its ingest (while still holding the ref lock)."""
        fd = self._fd
        self._fd = None
        try:
            if fd is not None:
                os.close(fd)
                remove_ingest(self.path, self._ref)
        finally:
            if fd is not None:
                unlock_ref(self._lock_root, self._ref)

    def _require_open(self, action: str) -> int:
        if self._fd is None:
            msg = f"cannot {action} closed writer for ref {self._ref!r}"
            raise FailedPreconditionError(msg)
        return self._fd

    def _rehash(self, algorithm: str) -> str:
        hasher = HASHES[algorithm]()
        try:
            fd = os.open(self.path / "data", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            msg = f"cannot re-read ingest ref {self._ref!r}: {exc}"
            raise RefcacheError(msg) from exc
        try:
            hash_fd(fd, hasher)
        finally:
            os.close(fd)
        return f"{algorithm}:{hasher.hexdigest()}"


# --- ingest directories -------------------------------------------------------------------


def ingest_path(ingest_dir: Path, ref: str) -> Path:
    """The directory of ingest ``ref``."""
    # containerd names the directory after the digest of the ref, so it has a fixed length
    # whatever the ref; it is not the digest of the content.
    return ingest_dir / hashlib.sha256(ref.encode()).hexdigest()


def start_ingest(
    ingest_dir: Path,
    ref: str,
    total: int,
    expected: str | None,
    *,
    lock_root: str,
    place: PlaceBlob,
) -> IngestWriter:
    """Creates the ingest ``ref`` under ``ingest_dir``, or resumes it (its digest rebuilt by
    re-reading the data). The caller holds the ref lock; the writer releases it."""
    algorithm = expected.partition(":")[0] if expected else "sha256"
    hasher = HASHES[algorithm]()
    path = ingest_path(ingest_dir, ref)
    try:
        make_private_dir(ingest_dir, parents=True)
        path.mkdir(0o700)
        created = True
    except FileExistsError:
        created = False
    except OSError as exc:
        msg = f"cannot create ingest for ref {ref!r} at {path}: {exc}"
        raise disk_error(msg, exc) from exc
    status = None if created else _resumable(path, ref, total)
    data = path / "data"
    try:
        if status is None:
            now = time.time_ns()
            _write_ingest_files(path, ref, total, now)
            fd = os.open(data, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            started_at, updated_at, offset = now, now, 0
        else:
            fd = os.open(data, os.O_RDWR | os.O_CLOEXEC)
            offset = hash_fd(fd, hasher)
            os.lseek(fd, offset, os.SEEK_SET)
            started_at, updated_at = status.started_at, status.updated_at
            total = total or status.total
    except OSError as exc:
        if created:
            remove_quietly(path)
        msg = f"cannot open ingest for ref {ref!r} at {path}: {exc}"
        raise disk_error(msg, exc) from exc
    return IngestWriter(
        ref=ref,
        path=path,
        fd=fd,
        offset=offset,
        total=total,
        hasher=hasher,
        algorithm=algorithm,
        expected=expected or "",
        started_at=started_at,
        updated_at=updated_at,
        lock_root=lock_root,
        place=place,
    )


def _resumable(path: Path, ref: str, total: int) -> ContentStatus | None:
    """The status of an existing ingest directory to resume, or ``None`` to start it afresh
    (unreadable, or holding another ref: containerd logs "failed to resume" and restarts).

    Raises:
        FailedPreconditionError: The ingest was started with another total.
    """
    try:
        status = read_status(path)
    except (OSError, ValueError) as exc:
        logger.warning("cannot resume ingest for ref %r (%s); restarting it", ref, exc)
        return None
    if status.ref != ref:
        logger.warning("ingest %s holds ref %r, not %r; restarting it", path, status.ref, ref)
        return None
    if total and status.total and total != status.total:
        msg = (
            f"ingest for ref {ref!r} was started with total {status.total}, "
            f"not {total}; abort it to start over"
        )
        raise FailedPreconditionError(msg)
    return status


def _write_ingest_files(path: Path, ref: str, total: int, now: int) -> None:
    """The small files of a new ingest: its ref, start and update times, and total."""
    write_atomic(path / "ref", ref.encode())
    write_atomic(path / "startedat", format_rfc3339_ns(now).encode())
    write_atomic(path / "updatedat", format_rfc3339_ns(now).encode())
    if total > 0:
        write_atomic(path / "total", str(total).encode())
    else:
        (path / "total").unlink(missing_ok=True)


def read_status(path: Path) -> ContentStatus:
    """The status of the ingest directory ``path`` as stored on disk.

    Raises:
        OSError: A file is missing or unreadable.
        ValueError: A stored time does not parse.
    """
    data = (path / "data").stat()
    ref = (path / "ref").read_text("utf-8")
    started_at = parse_rfc3339_ns((path / "startedat").read_text("utf-8"))
    updated_at = parse_rfc3339_ns((path / "updatedat").read_text("utf-8"))
    # "updatedat" is rewritten on close only; the data's mtime may be newer.
    updated_at = max(updated_at, data.st_mtime_ns)
    try:
        total = int((path / "total").read_text("ascii"))
    except (FileNotFoundError, ValueError):
        total = 0
    return ContentStatus(
        ref=ref,
        offset=data.st_size,
        total=total,
        started_at=started_at,
        updated_at=updated_at,
    )


def check_ref(ref: object) -> None:
    if not isinstance(ref, str) or not ref:
        msg = f"invalid ingest ref {ref!r}: must be a non-empty string"
        raise InvalidError(msg)


def copy_stream(writer: ContentWriter, stream: BinaryIO, ref: str) -> None:
    """Feeds a stream to a (possibly resumed) writer, as containerd's ``content.Copy``."""
    if writer.offset:
        seekable = False
        try:
            seekable = bool(stream.seekable())
        except (AttributeError, OSError):
            seekable = False
        if seekable:
            stream.seek(writer.offset, os.SEEK_SET)
        else:
            remaining = writer.offset
            while remaining:
                chunk = stream.read(min(remaining, CHUNK))
                if not chunk:
                    msg = f"stream for ref {ref!r} ended before the resume offset {writer.offset}"
                    raise FailedPreconditionError(msg)
                remaining -= len(chunk)
    while True:
        chunk = stream.read(CHUNK)
        if not chunk:
            return
        if not isinstance(chunk, bytes | bytearray | memoryview):
            msg = f"stream for ref {ref!r} returned {type(chunk).__name__}, not bytes"
            raise InvalidError(msg)
        writer.write(chunk)


def remove_ingest(path: Path, ref: str) -> bool:
    """Removes an ingest directory; returns whether there was one.

    containerd renames it away first, so that a half-done removal never looks like a
    resumable ingest; ``*.tmp`` leftovers are removed at the next open.
    """
    doomed = path.with_name(f"{path.name}.{uuid.uuid4().hex}{ABORT_SUFFIX}")
    try:
        path.rename(doomed)
    except FileNotFoundError:
        return False
    except OSError as exc:
        msg = f"cannot remove ingest ref {ref!r} at {path}: {exc}"
        raise RefcacheError(msg) from exc
    remove_quietly(doomed)
    return True


def remove_quietly(path: Path) -> None:
    """Removes an ingest directory; what cannot go is left for the next open's cleanup."""
    with suppress(OSError):
        remove_tree(path)


def hash_fd(fd: int, hasher: Any) -> int:
    """Feeds the whole file behind ``fd`` (from its start) to ``hasher``; returns its size."""
    os.lseek(fd, 0, os.SEEK_SET)
    total = 0
    while True:
        chunk = os.read(fd, CHUNK)
        if not chunk:
            return total
        hasher.update(chunk)
        total += len(chunk)


def write_atomic(path: Path, data: bytes) -> None:
    """Writes a small ingest file through a temporary name (containerd ``writeToCompletion``)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def disk_error(message: str, exc: OSError) -> RefcacheError:
    if exc.errno in _DISK_FULL:
        return StoreFullError(message)
    return RefcacheError(message)
