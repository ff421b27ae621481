"""The snapshotter protocol and the metadata logic shared by the native and overlay backends.

A port of containerd's backend snapshotter contract (``core/snapshots/snapshotter.go``) and of
its small metadata store (``core/snapshots/storage``), on the shared LMDB environment, plus
BuildKit's merge snapshotter (``snapshot/merge.go``, ``snapshot/diffapply_linux.go``).

Metadata layout in ``DB_SNAPSHOTS`` (see CONVENTIONS.md):

* ``<key>`` -> msgpack ``{"id", "kind", "parent", "labels", "created_at", "updated_at",
  "usage"}``; ``usage`` is ``[size, inodes]`` from commit (or merge) on, else ``None``. Fields
  this version does not know are kept when a record is rewritten.
* ``\\x00parent\\x00<parent>\\x00<child>`` -> ``b""``: the children index (containerd's
  ``parents/`` back-links), so :meth:`remove` refuses a snapshot with children in O(1).
* ``\\x00seq`` -> msgpack int: the last snapshot id handed out (containerd's bucket
  ``NextSequence``: ids are never reused by committed state).
* ``\\x00snapshotter`` -> msgpack str: the backend a cache was created with; opening it with
  another backend is refused (:class:`FailedPreconditionError`).

Keys starting with ``\\x00`` are therefore never snapshot keys (keys may not contain NUL).

Directories: ``<root>/snapshots/<id>`` (native: the tree itself; overlay: ``fs/`` and
``work/``). File work follows containerd: a new snapshot is built in ``new-<random>``, renamed
to ``<id>`` inside the write transaction that records it (after an ``fsync`` of the tree), and
removed again if that transaction fails; a removed snapshot's directory is renamed to
``rm-<id>`` and deleted only after the transaction that forgot it has committed.
:meth:`BaseSnapshotter.cleanup` (run at open) deletes leftover ``new-*``/``rm-*`` directories
and directories that no record names.

Caller transactions: with ``txn=…`` the directory is built and renamed into place inside the
caller's transaction. If that transaction rolls back, the directory is removed by
``WriteTxn.after_rollback`` when the environment offers that hook, otherwise at the start of
the snapshotter's next call (every public method sweeps first), and at the latest by
:meth:`BaseSnapshotter.cleanup` at the next open. Ids are never reused while such a directory
exists.

Labels follow containerd: a key and value together are at most 4096 bytes, and a label with
an empty value is not stored (``boltutil.WriteLabels``).

Thread safety: a snapshotter may be used from several threads. Metadata changes are LMDB
write transactions (serialised); copies, merges and size walks run outside them (re-checking
what they read when they commit), except when the caller passes its own ``txn``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import lmdb
import msgpack

from ._content import MAX_LABEL_SIZE, validate_labels
from ._env import DB_SNAPSHOTS, MetaEnv, ReadTxn, WriteTxn
from ._errors import (
    AlreadyExistsError,
    CorruptMetadataError,
    FailedPreconditionError,
    InvalidError,
    NotFoundError,
    RefcacheError,
    StoreFullError,
)
from ._filters import map_field, parse_filters
from ._layout import make_private_dir
from ._tree import (
    DirCursor,
    PathNode,
    display_path,
    fsync_tree_dirs,
    list_entries,
    node_parts,
    post_order,
    proc_path,
    remove_tree,
)
from ._types import Kind, Mount, SnapshotInfo, Usage

__all__ = [
    "MAX_LABEL_SIZE",
    "PARENT_INDEX_PREFIX",
    "SNAPSHOTTER_NAME_KEY",
    "BaseSnapshotter",
    "Snapshotter",
    "copy_tree",
    "disk_usage",
    "stored_snapshotter_name",
]

logger = logging.getLogger(__name__)

SNAPSHOTTER_NAME_KEY = b"\x00snapshotter"  #: DB_SNAPSHOTS key -> name of the cache's backend
PARENT_INDEX_PREFIX = b"\x00parent\x00"  #: ``<prefix><parent>\0<child>`` -> b""
_SEQ_KEY = b"\x00seq"
#: containerd ``pkg/labels``: a label's key and value together may not exceed this many bytes.

_FICLONE = 0x40049409
#: "Relative to the working directory": lets the ``*_at`` helpers take plain paths too.
AT_FDCWD = -100
_OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
_IGNORED_XATTR_ERRNOS = (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL)


@runtime_checkable
class Snapshotter(Protocol):
    """containerd's backend snapshotter, with BuildKit's ``merge`` and a local ``path``.

    Keys name active and view snapshots, names name committed ones; both share one
    namespace. Every mutating method takes an optional ``txn``: the metadata work then joins
    that write transaction, and file deletions wait for its commit.
    """

    @property
    def name(self) -> str:
        """``"native"`` or ``"overlayfs"`` (lease resource type ``snapshots/<name>``)."""
        ...

    def stat(self, key: str) -> SnapshotInfo:
        """Returns the info of ``key`` (any kind)."""
        ...

    def update(
        self, info: SnapshotInfo, *fieldpaths: str, txn: WriteTxn | None = None
    ) -> SnapshotInfo:
        """Updates the labels of ``info.name``; only ``labels``/``labels.<k>`` may change."""
        ...

    def usage(self, key: str) -> Usage:
        """Own disk usage of ``key``, excluding parents (live for active snapshots)."""
        ...

    def mounts(self, key: str) -> list[Mount]:
        """The mounts of an active or view snapshot (as ``prepare``/``view`` returned)."""
        ...

    def prepare(
        self,
        key: str,
        parent: str = "",
        *,
        labels: Mapping[str, str] | None = None,
        txn: WriteTxn | None = None,
    ) -> list[Mount]:
        """Creates an active (writable) snapshot ``key`` on the committed ``parent``."""
        ...

    def view(
        self,
        key: str,
        parent: str = "",
        *,
        labels: Mapping[str, str] | None = None,
        txn: WriteTxn | None = None,
    ) -> list[Mount]:
        """Creates a read-only view ``key`` of the committed ``parent``."""
        ...

    def commit(
        self,
        name: str,
        key: str,
        *,
        labels: Mapping[str, str] | None = None,
        txn: WriteTxn | None = None,
    ) -> None:
        """Turns active ``key`` into committed ``name`` (``key`` goes away)."""
        ...

    def remove(self, key: str, *, txn: WriteTxn | None = None) -> None:
        """Removes a snapshot without children."""
        ...

    def walk(self, *filters: str) -> Iterator[SnapshotInfo]:
        """Yields the snapshots matching any of the containerd filter strings."""
        ...

    def close(self) -> None:
        """Closes the snapshotter (idempotent)."""
        ...

    def path(self, key: str) -> Path:
        """A plain local directory of ``key`` (native: the tree; overlay: its own layer)."""
        ...

    def merge(
        self,
        key: str,
        diffs: Sequence[tuple[str, str]],
        *,
        labels: Mapping[str, str] | None = None,
        txn: WriteTxn | None = None,
    ) -> None:
        """Creates committed ``key`` by applying each ``(lower, upper)`` diff in order."""
        ...

    def cleanup(self) -> list[Path]:
        """Deletes directories no record needs; returns them."""
        ...

    def orphans(self) -> list[Path]:
        """Directories under the snapshot root that no record needs."""
        ...

    def missing(self) -> list[str]:
        """Keys whose directory is missing."""
        ...


# -- records --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Record:
    key: str
    raw: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.raw["id"])

    @property
    def kind(self) -> Kind:
        return Kind(self.raw["kind"])

    @property
    def parent(self) -> str:
        return str(self.raw.get("parent") or "")

    def info(self) -> SnapshotInfo:
        return SnapshotInfo(
            kind=self.kind,
            name=self.key,
            parent=self.parent,
            labels=dict(self.raw.get("labels") or {}),
            created_at=int(self.raw.get("created_at") or 0),
            updated_at=int(self.raw.get("updated_at") or 0),
        )


def _decode(key: str, raw: bytes) -> _Record:
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
    return _Record(key, value)


def _get(txn: ReadTxn, key: str) -> _Record | None:
    raw = txn.get(DB_SNAPSHOTS, key.encode())
    return None if raw is None else _decode(key, raw)


def _must_get(txn: ReadTxn, key: str) -> _Record:
    rec = _get(txn, key)
    if rec is None:
        msg = f"snapshot {key!r} does not exist"
        raise NotFoundError(msg)
    return rec


def _put(txn: WriteTxn, rec: _Record) -> None:
    txn.put(DB_SNAPSHOTS, rec.key.encode(), msgpack.packb(rec.raw))


def _child_key(parent: str, child: str) -> bytes:
    return PARENT_INDEX_PREFIX + parent.encode() + b"\x00" + child.encode()


def _has_children(txn: ReadTxn, key: str) -> bool:
    prefix = PARENT_INDEX_PREFIX + key.encode() + b"\x00"
    return next(iter(txn.keys(DB_SNAPSHOTS, prefix)), None) is not None


def _chain(txn: ReadTxn, rec: _Record) -> list[_Record]:
    """The parents of ``rec``, immediate parent first (containerd ``ParentIDs``)."""
    out: list[_Record] = []
    seen = {rec.key}
    parent = rec.parent
    while parent:
        if parent in seen:
            msg = f"snapshot {rec.key!r} has a parent cycle through {parent!r}"
            raise CorruptMetadataError(msg, record_id=rec.key, key="parent")
        seen.add(parent)
        prec = _get(txn, parent)
        if prec is None:
            msg = f"snapshot {rec.key!r} names a missing ancestor {parent!r}"
            raise CorruptMetadataError(msg, record_id=rec.key, key="parent")
        out.append(prec)
        parent = prec.parent
    return out


def stored_snapshotter_name(env: MetaEnv) -> str | None:
    """Returns the snapshotter name recorded in ``env`` (``None`` for a new cache)."""
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


# -- validation -----------------------------------------------------------------------------


def _check_key(value: object, what: str = "key") -> str:
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


def _check_parent(value: object) -> str:
    if value == "":
        return ""
    return _check_key(value, "parent")


def _check_labels(labels: object) -> dict[str, str]:
    # containerd pkg/labels rules, shared with the content store.
    return validate_labels(labels, what="snapshot")


def _check_txn(txn: object) -> WriteTxn | None:
    if txn is not None and not isinstance(txn, WriteTxn):
        msg = f"txn must be a WriteTxn or None, got {txn!r}"
        raise InvalidError(msg)
    return txn


def _txn_finished(txn: WriteTxn) -> bool:
    # A closed py-lmdb transaction raises on any use; WriteTxn keeps its current one in _txn
    # (replaced when the map grows, so look it up each time).
    try:
        txn._txn.id()
    except lmdb.Error:
        return True
    return False


# -- filesystem helpers ---------------------------------------------------------------------


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        func = libc.syncfs
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int]
    return func


_SYNCFS = _load_syncfs()


def sync_filesystem(path: Path) -> None:
    """Flushes the filesystem holding ``path`` (``syncfs(2)``, else ``sync(2)``).

    One ``syncfs`` costs about as much as flushing what was written, and replaces an
    ``fsync`` per copied file before a transaction commits a tree.
    """
    if _SYNCFS is not None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _SYNCFS(fd) == 0:
                return
        finally:
            os.close(fd)
    os.sync()


def disk_usage(root: Path, *, exclude: set[tuple[int, int]] | None = None) -> Usage:
    """containerd/continuity ``DiskUsage``: unique inodes under ``root`` (root included).

    ``size`` is the sum of ``st_blocks * 512`` over unique ``(st_dev, st_ino)``. Inodes in
    ``exclude`` are skipped entirely (BuildKit's merge usage leaves out the inodes it
    hardlinked from other snapshots). The walk is iterative and descriptor-based: any depth.
    A live tree whose directories move under the walk is measured again (three times at
    most).

    Raises:
        FailedPreconditionError: The tree kept changing under the walk.
    """
    for _ in range(3):
        try:
            return _disk_usage(root, exclude)
        except OSError as exc:
            if exc.errno != errno.ESTALE:
                raise
    msg = f"cannot measure {root}: its directories keep moving while it is walked"
    raise FailedPreconditionError(msg)


def _disk_usage(root: Path, exclude: set[tuple[int, int]] | None) -> Usage:
    seen: set[tuple[int, int]] = set()
    size = 0
    inodes = 0

    def count(s: os.stat_result) -> None:
        nonlocal size, inodes
        ino = (s.st_dev, s.st_ino)
        if ino in seen:
            return
        seen.add(ino)
        if exclude and ino in exclude:
            return
        size += s.st_blocks * 512
        inodes += 1

    def scan(fd: int) -> list[str]:
        subdirs: list[str] = []
        for entry in list_entries(fd):
            try:
                est = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(est.st_mode):
                subdirs.append(entry.name)
            count(est)
        return subdirs

    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return Usage(0, 0)
    count(st)
    if not stat.S_ISDIR(st.st_mode):
        return Usage(size=size, inodes=inodes)
    try:
        cursor = DirCursor.open(root)
    except (FileNotFoundError, NotADirectoryError):
        return Usage(size=size, inodes=inodes)
    with cursor:
        pending = [scan(cursor.fd)]
        while pending:
            if pending[-1]:
                name = pending[-1].pop()
                try:
                    cursor.down(name)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                pending.append(scan(cursor.fd))
                continue
            pending.pop()
            if cursor.depth:
                cursor.up()
    return Usage(size=size, inodes=inodes)


_copy_file_range_ok = hasattr(os, "copy_file_range")


def _copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    global _copy_file_range_ok  # noqa: PLW0603 - a process-wide "kernel lacks it" latch
    end = offset + length
    pos = offset
    while pos < end and _copy_file_range_ok:
        try:
            n = os.copy_file_range(src_fd, dst_fd, end - pos, pos, pos)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                if exc.errno == errno.ENOSYS:
                    _copy_file_range_ok = False
                break
            raise
        if n == 0:
            return  # the source shrank while we copied
        pos += n
    while pos < end:
        chunk = os.pread(src_fd, min(end - pos, 1 << 20), pos)
        if not chunk:
            return
        written = 0
        while written < len(chunk):
            written += os.pwrite(dst_fd, chunk[written:], pos + written)
        pos += len(chunk)


def _copy_data(src_fd: int, dst_fd: int, size: int) -> None:
    """Copies a file's data keeping holes (SEEK_DATA/SEEK_HOLE + copy_file_range)."""
    try:
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)
        return
    except OSError as exc:
        # No reflink here (ext4, cross-fs, tmpfs): copy, as continuity's copyFileContent.
        if exc.errno not in (
            errno.EOPNOTSUPP,
            errno.ENOTTY,
            errno.EXDEV,
            errno.EINVAL,
            errno.ENOSYS,
            errno.EBADF,
            errno.EPERM,
        ):
            raise
    offset = 0
    while offset < size:
        try:
            data = os.lseek(src_fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # only a hole is left
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            data = offset  # no SEEK_DATA support: everything is data
            hole = size
        else:
            try:
                hole = os.lseek(src_fd, data, os.SEEK_HOLE)
            except OSError:
                hole = size
        hole = min(hole, size)
        if hole > data:
            _copy_range(src_fd, dst_fd, data, hole - data)
        offset = max(hole, data + 1) if hole <= data else hole
    os.ftruncate(dst_fd, size)


def copy_file_at(src_dir: int, src: str, dst_dir: int, dst: str, st: os.stat_result) -> None:
    """Copies a regular file's data to a new file (holes stay holes), by directory fds."""
    src_fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=_dir_arg(src_dir))
    try:
        dst_fd = os.open(
            dst,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=_dir_arg(dst_dir),
        )
        try:
            _copy_data(src_fd, dst_fd, st.st_size)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


def copy_file(src: str, dst: str, st: os.stat_result) -> None:
    """Copies a regular file's data to a new file ``dst`` (holes stay holes)."""
    copy_file_at(AT_FDCWD, src, AT_FDCWD, dst, st)


def _copy_xattrs(src: str, dst: str, *, skip_overlay: bool) -> None:
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _IGNORED_XATTR_ERRNOS:
            return
        raise
    for name in names:
        if skip_overlay and name.startswith(_OVERLAY_XATTR_PREFIXES):
            continue
        try:
            value = os.getxattr(src, name, follow_symlinks=False)
            os.setxattr(dst, name, value, follow_symlinks=False)
        except OSError as exc:
            # containerd native passes an xattr error handler that logs and goes on: security.*
            # and trusted.* need privileges (moby/buildkit#1189).
            if exc.errno in (*_IGNORED_XATTR_ERRNOS, errno.ENODATA):
                logger.debug("cannot copy xattr %s of %s to %s: %s", name, src, dst, exc)
                continue
            raise


def _copy_metadata_at(
    src_dir: int,
    src: str,
    dst_dir: int,
    dst: str,
    st: os.stat_result,
    *,
    times: bool = True,
    skip_overlay: bool = False,
) -> None:
    """Owner, mode, xattrs and times of ``src`` onto ``dst`` (continuity ``copyFileInfo``).

    Both are names relative to directory descriptors (``AT_FDCWD`` for plain paths).
    """
    is_link = stat.S_ISLNK(st.st_mode)
    try:
        os.chown(dst, st.st_uid, st.st_gid, dir_fd=_dir_arg(dst_dir), follow_symlinks=False)
    except OSError as exc:
        # Unprivileged (EPERM), or an id unmapped in this user namespace (EINVAL): the copy
        # belongs to us (containerd-backends.md §13, risk 3).
        if exc.errno not in (errno.EPERM, errno.EINVAL):
            raise
        logger.debug("cannot chown %s to %d:%d: %s", dst, st.st_uid, st.st_gid, exc)
    if not is_link:
        # After chown, which clears the set-id bits. ``dst`` was created by us as a
        # non-symlink, so following it is safe (Linux has no lchmod).
        os.chmod(dst, stat.S_IMODE(st.st_mode), dir_fd=_dir_arg(dst_dir))
    _copy_xattrs(_at_path(src_dir, src), _at_path(dst_dir, dst), skip_overlay=skip_overlay)
    if times:
        os.utime(
            dst,
            ns=(st.st_atime_ns, st.st_mtime_ns),
            dir_fd=_dir_arg(dst_dir),
            follow_symlinks=False,
        )


def _copy_metadata(
    src: str, dst: str, st: os.stat_result, *, times: bool = True, skip_overlay: bool = False
) -> None:
    """:func:`_copy_metadata_at` for plain paths."""
    _copy_metadata_at(AT_FDCWD, src, AT_FDCWD, dst, st, times=times, skip_overlay=skip_overlay)


def _dir_arg(dir_fd: int) -> int | None:
    return None if dir_fd == AT_FDCWD else dir_fd


def _at_path(dir_fd: int, name: str) -> str:
    return name if dir_fd == AT_FDCWD else proc_path(dir_fd, name)


def _make_special_at(dst_dir: int, dst: str, st: os.stat_result) -> bool:
    """mknod/mkfifo for devices, fifos and sockets; ``False`` when not permitted."""
    try:
        if stat.S_ISFIFO(st.st_mode):
            os.mkfifo(dst, 0o600, dir_fd=_dir_arg(dst_dir))
        else:
            os.mknod(dst, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=_dir_arg(dst_dir))
    except PermissionError:
        logger.warning("cannot create device %s (%#x): not permitted; skipped", dst, st.st_rdev)
        return False
    return True


def _copy_entries(
    src_fd: int,
    dst_fd: int,
    node: PathNode,
    links: dict[tuple[int, int], tuple[PathNode, str]],
    link_cursor: Callable[[], DirCursor],
) -> list[tuple[str, os.stat_result]]:
    """Copies the non-directories of one directory; makes (empty) copies of its subdirs."""
    subdirs: list[tuple[str, os.stat_result]] = []
    for entry in list_entries(src_fd):
        name = entry.name
        st = entry.stat(follow_symlinks=False)
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            os.mkdir(name, 0o700, dir_fd=dst_fd)
            subdirs.append((name, st))
            continue
        if stat.S_ISREG(mode):
            ino = (st.st_dev, st.st_ino)
            if st.st_nlink > 1:
                first = links.get(ino)
                if first is not None:
                    cursor = link_cursor()
                    cursor.goto(first[0])
                    os.link(
                        first[1],
                        name,
                        src_dir_fd=cursor.fd,
                        dst_dir_fd=dst_fd,
                        follow_symlinks=False,
                    )
                    continue
                links[ino] = (node, name)
            copy_file_at(src_fd, name, dst_fd, name, st)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(name, dir_fd=src_fd), name, dir_fd=dst_fd)
        elif stat.S_ISSOCK(mode):
            logger.debug("skipping socket %s", name)
            continue
        elif not _make_special_at(dst_fd, name, st):
            continue
        _copy_metadata_at(src_fd, name, dst_fd, name, st)
    return subdirs


def copy_tree(src: Path, dst: Path) -> None:
    """Copies the tree ``src`` into the existing directory ``dst`` (continuity ``CopyDir``).

    Keeps modes, owners (when permitted), times (ns), xattrs (errors on privileged namespaces
    are logged and ignored), symlinks, hardlinks within the tree, devices and fifos (skipped
    when not permitted), and holes in sparse files. Directory times are set after their
    children. Sockets are skipped, as continuity does. Iterative and descriptor-based: trees
    of any depth are copied with a handful of descriptors open.
    """
    root_st = os.lstat(src)
    if not stat.S_ISDIR(root_st.st_mode):
        msg = f"cannot copy {src}: not a directory"
        raise InvalidError(msg)
    top = PathNode()
    links: dict[tuple[int, int], tuple[PathNode, str]] = {}
    extra: list[DirCursor] = []

    def link_cursor() -> DirCursor:
        if not extra:
            extra.append(DirCursor.open(dst, top))
        return extra[0]

    with DirCursor.open(src) as scur, DirCursor.open(dst, top) as dcur:
        try:
            pending = [_copy_entries(scur.fd, dcur.fd, top, links, link_cursor)]
            stats: list[os.stat_result] = []
            while pending:
                if pending[-1]:
                    name, st = pending[-1].pop()
                    scur.down(name)
                    node = dcur.node
                    assert isinstance(node, PathNode)
                    dcur.down(name, node.child(name))
                    stats.append(st)
                    child = dcur.node
                    assert isinstance(child, PathNode)
                    pending.append(_copy_entries(scur.fd, dcur.fd, child, links, link_cursor))
                    continue
                pending.pop()
                if scur.depth:
                    # Children first, so creating entries does not disturb a restored mtime.
                    name, st = scur.name, stats.pop()
                    scur.up()
                    dcur.up()
                    _copy_metadata_at(scur.fd, name, dcur.fd, name, st)
        finally:
            for cursor in extra:
                cursor.close()
    _copy_metadata(str(src), str(dst), root_st)


# -- trees, diffs and the merge applier (BuildKit diffapply) --------------------------------


class _Node:
    """One entry of a snapshot's full content: its position, its lstat, the layer backing it.

    The real file is ``layers[layer]/<names from the top>`` of its :class:`_Tree`; it is
    reached through the tree's cursors, never by path (trees may be deeper than PATH_MAX).
    """

    __slots__ = ("children", "depth", "layer", "name", "parent", "st")

    def __init__(
        self, parent: _Node | None, name: str, st: os.stat_result, layer: int, is_dir: bool
    ) -> None:
        self.parent = parent
        self.name = name
        self.depth: int = 0 if parent is None else parent.depth + 1
        self.st = st
        self.layer = layer
        self.children: dict[str, _Node] | None = {} if is_dir else None

    def __repr__(self) -> str:
        return f"_Node({'/'.join(node_parts(self))!r}, layer={self.layer})"


class _Tree:
    """The full content of a snapshot as a :class:`_Node` tree over its layer directories.

    ``layers`` are newest first (one for a native snapshot). Files are opened through one
    :class:`DirCursor` per layer, opened on first use; :meth:`close` closes them.
    """

    def __init__(self, layers: Sequence[Path], root: _Node) -> None:
        self.layers = list(layers)
        self.root = root
        self._cursors: dict[int, DirCursor] = {}

    def cursor(self, layer: int) -> DirCursor:
        cursor = self._cursors.get(layer)
        if cursor is None:
            cursor = self._cursors[layer] = DirCursor.open(self.layers[layer], self.root)
        return cursor

    def at(self, node: _Node) -> tuple[int, str]:
        """``(directory fd, name)`` of ``node``'s real file; valid until the next ``at``."""
        assert node.parent is not None
        cursor = self.cursor(node.layer)
        cursor.goto(node.parent)
        return cursor.fd, node.name

    def describe(self, node: _Node) -> str:
        return display_path(self.layers[node.layer], node_parts(node))

    def close(self) -> None:
        for cursor in self._cursors.values():
            cursor.close()
        self._cursors.clear()


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(dir_fd: int, name: str) -> bool:
    path = proc_path(dir_fd, name)
    for attr in _OPAQUE_XATTRS:
        try:
            if os.getxattr(path, attr, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _build_tree(layers: Sequence[Path], *, overlay: bool) -> _Tree:
    if not layers:
        msg = "an overlay tree needs at least one layer"
        raise InvalidError(msg)
    top: _Node | None = None
    tree: _Tree | None = None
    try:
        for index in reversed(range(len(layers))):
            st = os.lstat(layers[index])
            if top is None:
                top = _Node(None, "", st, index, True)
                tree = _Tree(layers, top)
            else:
                top.st, top.layer = st, index
            assert tree is not None
            cursor = tree.cursor(index)
            pending = [top]
            while pending:
                node = pending.pop()
                cursor.goto(node)
                fd = cursor.fd
                children = node.children
                assert children is not None
                for entry in list_entries(fd):
                    name = entry.name
                    est = entry.stat(follow_symlinks=False)
                    if overlay and _is_whiteout(est):
                        children.pop(name, None)
                        continue
                    if stat.S_ISDIR(est.st_mode):
                        existing = children.get(name)
                        if (
                            existing is not None
                            and existing.children is not None
                            and not (overlay and _is_opaque(fd, name))
                        ):
                            existing.st, existing.layer = est, index
                        else:
                            existing = _Node(node, name, est, index, True)
                            children[name] = existing
                        pending.append(existing)
                    else:
                        children[name] = _Node(node, name, est, index, False)
    except BaseException:
        if tree is not None:
            tree.close()
        raise
    assert tree is not None
    return tree


def scan_tree(root: Path) -> _Tree:
    """The content of a plain directory tree (a native snapshot)."""
    return _build_tree([root], overlay=False)


def overlay_tree(layers: Sequence[Path]) -> _Tree:
    """The merged content of overlay layer dirs, newest first, as the kernel would show it.

    Applies the layers oldest first: a 0/0 character device deletes what is below it, an
    opaque directory (``trusted.overlay.opaque=y`` or ``user.overlay.opaque=y``) hides what is
    below it, anything else replaces or (directory over directory) merges. Redirects
    (``redirect_dir``) are not followed; containerd and BuildKit do not turn them on.
    """
    return _build_tree(layers, overlay=True)


def _open_node(tree: _Tree, node: _Node) -> int:
    fd, name = tree.at(node)
    return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)


def _same_content(ta: _Tree, a: _Node, tb: _Tree, b: _Node) -> bool:
    fa = _open_node(ta, a)
    try:
        fb = _open_node(tb, b)
        try:
            offset = 0
            while True:
                ca = os.pread(fa, 1 << 16, offset)
                cb = os.pread(fb, 1 << 16, offset)
                if ca != cb:
                    return False
                if not ca:
                    return True
                offset += len(ca)
        finally:
            os.close(fb)
    finally:
        os.close(fa)


def _capability(tree: _Tree, node: _Node) -> bytes | None:
    fd, name = tree.at(node)
    try:
        return os.getxattr(proc_path(fd, name), "security.capability", follow_symlinks=False)
    except OSError:
        return None


def _readlink(tree: _Tree, node: _Node) -> str:
    fd, name = tree.at(node)
    return os.readlink(name, dir_fd=fd)


def same_file(ta: _Tree, a: _Node, tb: _Tree, b: _Node) -> bool:
    """continuity ``sameFile``: does ``b`` (of ``tb``) carry no change relative to ``a``?"""
    sa, sb = a.st, b.st
    if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
        return True
    if (sa.st_mode, sa.st_uid, sa.st_gid, sa.st_rdev) != (
        sb.st_mode,
        sb.st_uid,
        sb.st_gid,
        sb.st_rdev,
    ):
        return False
    if _capability(ta, a) != _capability(tb, b):
        return False
    if stat.S_ISDIR(sa.st_mode):
        return True
    if sa.st_size != sb.st_size:
        return False
    ta_ns, tb_ns = sa.st_mtime_ns, sb.st_mtime_ns
    if ta_ns // 1_000_000_000 != tb_ns // 1_000_000_000:
        return False
    if ta_ns % 1_000_000_000 == 0 and tb_ns % 1_000_000_000 == 0:
        # Timestamps may have been truncated on both sides: compare the content.
        if stat.S_ISLNK(sa.st_mode):
            return _readlink(ta, a) == _readlink(tb, b)
        if sa.st_size == 0 or not stat.S_ISREG(sa.st_mode):
            return True
        return _same_content(ta, a, tb, b)
    return ta_ns == tb_ns


ChangeKind = Literal["add", "modify", "delete"]


@dataclass(slots=True)
class _Change:
    parent: _Node | None  # the upper's directory holding the entry (None: the top)
    name: str
    kind: ChangeKind
    node: _Node | None  # the upper's entry (None for deletions)


def diff_trees(lower: _Tree | None, upper: _Tree | None) -> Iterator[_Change]:
    """continuity ``Changes`` between two full trees, in path order (root itself excluded).

    A generator over an explicit stack: no recursion, whatever the depth.
    """
    if upper is None:
        if lower is not None and lower.root.children:
            for name in sorted(lower.root.children):
                yield _Change(None, name, "delete", None)
        return
    low_root = lower.root if lower is not None else None
    # (lower dir or None: everything below is added, upper dir, names still to compare)
    stack: list[tuple[_Node | None, _Node, Iterator[str]]] = [
        (low_root, upper.root, iter(_union(low_root, upper.root)))
    ]
    while stack:
        low, up, names = stack[-1]
        following = next(names, None)
        if following is None:
            stack.pop()
            continue
        name = following
        lc = low.children if low is not None and low.children is not None else {}
        uc = up.children or {}
        ln, un = lc.get(name), uc.get(name)
        if un is None:
            yield _Change(up, name, "delete", None)
        elif ln is None:
            yield _Change(up, name, "add", un)
            if un.children:
                stack.append((None, un, iter(sorted(un.children))))
        elif un.children is not None and ln.children is not None:
            assert lower is not None
            if not same_file(lower, ln, upper, un):
                yield _Change(up, name, "modify", un)
            stack.append((ln, un, iter(_union(ln, un))))
        elif lower is not None and same_file(lower, ln, upper, un):
            continue
        else:
            # A replaced entry: everything below a new directory is added.
            yield _Change(up, name, "modify", un)
            if un.children:
                stack.append((None, un, iter(sorted(un.children))))


def _union(low: _Node | None, up: _Node) -> list[str]:
    lc = low.children if low is not None and low.children is not None else {}
    return sorted(set(lc) | set(up.children or {}))


def _remove_path(path: str) -> None:
    remove_tree(path)


def _remove_quietly(path: Path) -> None:
    """Removes a tree, logging (not raising) what cannot go: ``cleanup`` retries at open."""
    try:
        remove_tree(path)
    except OSError as exc:
        logger.warning("cannot remove %s: %s", path, exc)


class _Applier:
    """BuildKit's diffapply applier for a plain target directory, with cross-snapshot links.

    Works through directory cursors (no path longer than a name), so targets of any depth
    can be built.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.top = PathNode()
        self.cursor = DirCursor.open(root, self.top)
        self._link_cursor: DirCursor | None = None
        self.linked: set[tuple[int, int]] = set()
        self.dir_times: dict[PathNode, tuple[int, int]] = {}

    def close(self) -> None:
        self.cursor.close()
        if self._link_cursor is not None:
            self._link_cursor.close()

    def _tnode(self, node: _Node | None, memo: dict[_Node, PathNode]) -> PathNode:
        """The target position of the upper's directory ``node`` (iterative)."""
        chain: list[_Node] = []
        current = node
        found: PathNode | None = None
        while current is not None and current.parent is not None:
            found = memo.get(current)
            if found is not None:
                break
            chain.append(current)
            current = current.parent
        tnode = found if found is not None else self.top
        for step in reversed(chain):
            tnode = tnode.child(step.name)
            memo[step] = tnode
        return tnode

    def apply(self, lower: _Tree | None, upper: _Tree | None) -> None:
        visited: set[_Node] = set()
        copies: dict[tuple[int, int], tuple[PathNode, str]] = {}  # keep hardlinks of one diff
        memo: dict[_Node, PathNode] = {}
        for change in diff_trees(lower, upper):
            if change.kind == "delete":
                try:
                    self.cursor.goto(self._tnode(change.parent, memo))
                except (FileNotFoundError, NotADirectoryError):
                    continue  # nothing there to delete
                remove_tree(change.name, dir_fd=self.cursor.fd)
                continue
            assert change.node is not None
            assert upper is not None
            self._check_parents(upper, change.node, visited, memo)
            visited.add(change.node)
            self._apply_one(upper, change.node, copies, memo)

    def _check_parents(
        self, tree: _Tree, node: _Node, visited: set[_Node], memo: dict[_Node, PathNode]
    ) -> None:
        # BuildKit checkParent: make each parent dir exist with the upper's metadata first.
        chain: list[_Node] = []
        parent = node.parent
        while parent is not None and parent.parent is not None and parent not in visited:
            chain.append(parent)
            parent = parent.parent
        for step in reversed(chain):
            visited.add(step)
            self._apply_one(tree, step, {}, memo)

    def _apply_one(
        self,
        tree: _Tree,
        node: _Node,
        copies: dict[tuple[int, int], tuple[PathNode, str]],
        memo: dict[_Node, PathNode],
    ) -> None:
        tparent = self._tnode(node.parent, memo)
        self.cursor.goto(tparent)
        dfd = self.cursor.fd
        name = node.name
        st = node.st
        is_dir = node.children is not None
        try:
            dst_st: os.stat_result | None = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            dst_st = None
        if dst_st is not None and not (is_dir and stat.S_ISDIR(dst_st.st_mode)):
            remove_tree(name, dir_fd=dfd)
            dst_st = None
        sfd, sname = tree.at(node)
        if is_dir:
            if dst_st is None:
                os.mkdir(name, 0o700, dir_fd=dfd)
            _copy_metadata_at(sfd, sname, dfd, name, st, times=False, skip_overlay=True)
            self.dir_times[tparent.child(name)] = (st.st_atime_ns, st.st_mtime_ns)
            return
        ino = (st.st_dev, st.st_ino)
        if not (stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode)):
            try:
                os.link(sname, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
            except OSError as exc:
                # Hardlinks fail across filesystems, past the link limit, or on files we
                # do not own (protected_hardlinks): copy instead, as BuildKit does.
                if exc.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.EACCES):
                    raise
            else:
                self.linked.add(ino)
                return
        if st.st_nlink > 1 and ino in copies:
            first_dir, first_name = copies[ino]
            if self._link_cursor is None:
                self._link_cursor = DirCursor.open(self.root, self.top)
            self._link_cursor.goto(first_dir)
            os.link(
                first_name,
                name,
                src_dir_fd=self._link_cursor.fd,
                dst_dir_fd=dfd,
                follow_symlinks=False,
            )
            return
        if stat.S_ISREG(st.st_mode):
            copy_file_at(sfd, sname, dfd, name, st)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(sname, dir_fd=sfd), name, dir_fd=dfd)
        elif not _make_special_at(dfd, name, st):
            return
        copies[ino] = (tparent, name)
        _copy_metadata_at(sfd, sname, dfd, name, st, skip_overlay=True)

    def flush(self) -> None:
        """Sets the deferred directory times, children first (BuildKit ``Flush``)."""
        for tnode in post_order(self.top):
            times = self.dir_times.get(tnode)
            if times is None or tnode.parent is None:
                continue
            try:
                self.cursor.goto(tnode.parent)
                st = os.stat(tnode.name, dir_fd=self.cursor.fd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat.S_ISDIR(st.st_mode):
                os.utime(tnode.name, ns=times, dir_fd=self.cursor.fd, follow_symlinks=False)


# -- the shared snapshotter -----------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    """A directory renamed into place inside a caller's transaction that has not ended yet."""

    txn: WriteTxn
    key: str
    sid: str
    done: bool = False


@dataclass(slots=True)
class _Plan:
    kind: Kind
    key: str
    parent: _Record | None
    chain: list[_Record]


class BaseSnapshotter:
    """Metadata, directory life cycle and merge logic common to both backends.

    Subclasses set :attr:`name` and implement :meth:`_build`, :meth:`_mounts`,
    :meth:`_owns_dir`, :meth:`_usage_dir`, :meth:`_layer_dir`, :meth:`path` and
    :meth:`_content_tree`.

    Args:
        root: The cache root (``open_cache`` passes it); snapshot directories live in
            ``root/snapshots``.
        env: The cache's metadata environment.
        clean: Record the backend name and remove leftovers at open (``False`` for an
            inspecting view of a cache that is open elsewhere).

    Raises:
        FailedPreconditionError: The cache was created with another snapshotter.
    """

    name: str = ""

    def __init__(self, root: str | os.PathLike[str], env: MetaEnv, *, clean: bool = True) -> None:
        if not isinstance(env, MetaEnv):
            msg = f"env must be a MetaEnv, got {env!r}"
            raise InvalidError(msg)
        self.root = Path(root)
        self._env = env
        self._dirs = self.root / "snapshots"
        self._lock = threading.Lock()
        self._inflight: set[str] = set()
        self._pending: list[_Pending] = []
        self._closed = False
        stored = stored_snapshotter_name(env)
        if stored is not None and stored != self.name:
            msg = (
                f"the cache metadata in {env.path} was created with the {stored!r} "
                f"snapshotter; it cannot be opened with {self.name!r} (open it with "
                f"{stored!r} or 'auto')"
            )
            raise FailedPreconditionError(msg)
        #: What :meth:`cleanup` removed when the snapshotter was opened.
        self.cleaned: list[Path] = []
        # clean=False: an inspecting view of a cache that another object may be writing
        # (``storage.check``); it must neither record a name nor remove anything.
        if clean and not env.readonly:
            # Private (0700): snapshots hold set-id files and devices of extracted layers.
            make_private_dir(self._dirs, parents=True)
            if stored is None:
                with env.write_txn() as txn:
                    if txn.get(DB_SNAPSHOTS, SNAPSHOTTER_NAME_KEY) is None:
                        txn.put(DB_SNAPSHOTS, SNAPSHOTTER_NAME_KEY, msgpack.packb(self.name))
            self.cleaned = self.cleanup()
            if self.cleaned:
                logger.info(
                    "snapshotter %s at %s: removed leftovers %s",
                    self.name,
                    self.root,
                    [str(p) for p in self.cleaned],
                )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    # -- backend hooks ----------------------------------------------------------------------

    def _snapshot_dir(self, sid: str) -> Path:
        return self._dirs / sid

    def _owns_dir(self, kind: Kind, has_parent: bool) -> bool:
        raise NotImplementedError

    def _build(self, tmp: Path, plan: _Plan) -> None:
        """Fills the new snapshot directory ``tmp`` (already created, mode 0755)."""
        raise NotImplementedError

    def _mounts(self, rec: _Record, chain: list[_Record]) -> list[Mount]:
        raise NotImplementedError

    def _usage_dir(self, sid: str) -> Path:
        raise NotImplementedError

    def _layer_dir(self, sid: str) -> Path:
        """Where a merge writes its content inside a new snapshot directory ``sid``."""
        raise NotImplementedError

    def _content_tree(self, rec: _Record, chain: list[_Record]) -> _Tree:
        """The full content of committed ``rec`` (with parents), backed by real files."""
        raise NotImplementedError

    def path(self, key: str) -> Path:
        """A plain local directory of ``key`` (see the backends)."""
        raise NotImplementedError

    # -- helpers ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            msg = f"{self.name} snapshotter at {self.root} is closed"
            raise FailedPreconditionError(msg)
        if self._pending:
            self._sweep()

    def _record_path(self, rec: _Record) -> Path:
        return self._snapshot_dir(rec.id)

    def _read(self, key: str) -> _Record:
        with self._env.read_txn() as txn:
            return _must_get(txn, key)

    def _allocate_id(self, txn: WriteTxn) -> str:
        raw = txn.get(DB_SNAPSHOTS, _SEQ_KEY)
        seq = 0
        if raw is not None:
            value = msgpack.unpackb(raw)
            if not isinstance(value, int):
                msg = f"snapshot id sequence in {self._env.path} is malformed: {value!r}"
                raise CorruptMetadataError(msg, record_id="\x00seq")
            seq = value
        while True:
            seq += 1
            sid = str(seq)
            # A rolled-back caller transaction may have used this id for a directory that is
            # still on disk: never reuse such an id.
            with self._lock:
                busy = sid in self._inflight or f"rm-{sid}" in self._inflight
            if not busy and not os.path.lexists(self._dirs / sid):
                break
        txn.put(DB_SNAPSHOTS, _SEQ_KEY, msgpack.packb(seq))
        return sid

    def _plan(self, txn: ReadTxn, kind: Kind, key: str, parent: str) -> _Plan:
        if _get(txn, key) is not None:
            msg = f"snapshot {key!r} already exists"
            raise AlreadyExistsError(msg)
        if not parent:
            return _Plan(kind, key, None, [])
        prec = _get(txn, parent)
        if prec is None:
            msg = f"parent snapshot {parent!r} of {key!r} does not exist"
            raise NotFoundError(msg)
        if prec.kind != Kind.COMMITTED:
            # containerd storage.CreateSnapshot: ErrInvalidArgument.
            msg = f"parent {parent!r} of {key!r} is not a committed snapshot ({prec.kind.value})"
            raise InvalidError(msg)
        return _Plan(kind, key, prec, [prec, *_chain(txn, prec)])

    def _new_tmp(self) -> Path:
        name = "new-" + secrets.token_hex(8)
        with self._lock:
            self._inflight.add(name)
        tmp = self._dirs / name
        tmp.mkdir(0o755)
        # containerd: mkdtemp, then chmod 0755 (a rootfs is world-readable; umask not ours).
        os.chmod(tmp, 0o755)  # noqa: S103
        return tmp

    def _forget_inflight(self, *names: str) -> None:
        with self._lock:
            for name in names:
                self._inflight.discard(name)

    def _stage(
        self,
        txn: WriteTxn,
        plan: _Plan,
        tmp: Path | None,
        labels: dict[str, str],
        usage: Usage | None,
    ) -> str:
        sid = self._allocate_id(txn)
        now = time.time_ns()
        rec = _Record(
            plan.key,
            {
                "id": sid,
                "kind": plan.kind.value,
                "parent": plan.parent.key if plan.parent else "",
                "labels": {k: v for k, v in labels.items() if v},
                "created_at": now,
                "updated_at": now,
                "usage": [usage.size, usage.inodes] if usage is not None else None,
            },
        )
        _put(txn, rec)
        if plan.parent is not None:
            txn.put(DB_SNAPSHOTS, _child_key(plan.parent.key, plan.key), b"")
        if tmp is not None:
            with self._lock:
                self._inflight.add(sid)
            final = self._snapshot_dir(sid)
            try:
                os.rename(tmp, final)
            except OSError as exc:
                self._forget_inflight(sid)
                msg = f"cannot move new snapshot {plan.key!r} from {tmp} to {final}: {exc}"
                raise RefcacheError(msg) from exc
            self._forget_inflight(tmp.name)
            _fsync_dir(self._dirs)
        return sid

    def _discard(self, tmp: Path | None, sid: str | None) -> None:
        # The transaction that would have recorded the directory failed: remove what we made.
        for path in (tmp, self._snapshot_dir(sid) if sid else None):
            if path is not None:
                _remove_quietly(path)
        names = [n for n in (tmp.name if tmp else None, sid) if n]
        self._forget_inflight(*names)

    def _create(
        self,
        kind: Kind,
        key: str,
        parent: str,
        labels: Mapping[str, str] | None,
        txn: WriteTxn | None,
        *,
        build: Callable[[Path, _Plan], Usage | None] | None = None,
    ) -> _Record:
        key = _check_key(key)
        parent = _check_parent(parent)
        checked = _check_labels(labels)
        txn = _check_txn(txn)
        self._check_open()
        builder = build or self._build_default
        if txn is not None:
            return self._create_in(
                txn,
                kind=kind,
                key=key,
                parent=parent,
                labels=checked,
                builder=builder,
                caller=True,
            )
        with self._env.read_txn() as rtxn:
            plan = self._plan(rtxn, kind, key, parent)
        tmp, usage = self._make_dir(plan, builder)
        sid: str | None = None
        try:
            with self._env.write_txn() as wtxn:
                again = self._plan(wtxn, kind, key, parent)
                _check_same_chain(plan, again)
                sid = self._stage(wtxn, again, tmp, checked, usage)
                rec = _must_get(wtxn, key)
        except BaseException:
            self._discard(tmp, sid)
            raise
        if sid is not None:
            self._forget_inflight(sid)
        return rec

    def _create_in(
        self,
        txn: WriteTxn,
        *,
        kind: Kind,
        key: str,
        parent: str,
        labels: dict[str, str],
        builder: Callable[[Path, _Plan], Usage | None],
        caller: bool,
    ) -> _Record:
        plan = self._plan(txn, kind, key, parent)
        tmp, usage = self._make_dir(plan, builder)
        sid: str | None = None
        try:
            sid = self._stage(txn, plan, tmp, labels, usage)
            rec = _must_get(txn, key)
        except BaseException:
            self._discard(tmp, sid)
            raise
        if caller and tmp is not None:
            self._watch(txn, key, sid)
        return rec

    def _build_default(self, tmp: Path, plan: _Plan) -> Usage | None:
        self._build(tmp, plan)
        return None

    def _make_dir(
        self, plan: _Plan, builder: Callable[[Path, _Plan], Usage | None]
    ) -> tuple[Path | None, Usage | None]:
        if not self._owns_dir(plan.kind, plan.parent is not None):
            return None, None
        tmp = self._new_tmp()
        try:
            usage = builder(tmp, plan)
            # Flush the tree before the transaction that points at it commits, but outside
            # that transaction's writer lock. A snapshot without a parent holds only empty
            # directories: fsyncing them is enough (syncfs would flush the whole disk).
            if plan.parent is not None:
                sync_filesystem(tmp)
            else:
                _fsync_tree_dirs(tmp)
        except BaseException as exc:
            self._discard(tmp, None)
            if isinstance(exc, OSError):
                msg = f"cannot build snapshot {plan.key!r} in {tmp}: {exc}"
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise StoreFullError(msg) from exc
                raise RefcacheError(msg) from exc
            raise
        return tmp, usage

    def _watch(self, txn: WriteTxn, key: str, sid: str) -> None:
        """Makes sure a directory staged in a caller's transaction goes if it rolls back."""
        pending = _Pending(txn, key, sid)

        def committed() -> None:
            pending.done = True
            self._forget_inflight(sid)

        txn.after_commit(committed)
        on_rollback = getattr(txn, "after_rollback", None)
        if callable(on_rollback):
            on_rollback(lambda: self._rollback(pending))
        with self._lock:
            self._pending.append(pending)

    def _rollback(self, pending: _Pending) -> None:
        if pending.done:
            return
        pending.done = True
        _remove_quietly(self._snapshot_dir(pending.sid))
        self._forget_inflight(pending.sid)

    def _sweep(self) -> None:
        """Removes directories staged in caller transactions that rolled back.

        WriteTxn has no rollback hook, so this runs at the start of every call: a staged
        directory whose transaction has ended without its record being committed goes.
        """
        with self._lock:
            candidates = [p for p in self._pending if not p.done and _txn_finished(p.txn)]
            self._pending = [p for p in self._pending if not p.done]
        for pending in candidates:
            with self._env.read_txn() as txn:
                rec = _get(txn, pending.key)
            if rec is not None and rec.id == pending.sid:
                pending.done = True
                self._forget_inflight(pending.sid)
            else:
                self._rollback(pending)
        with self._lock:
            self._pending = [p for p in self._pending if not p.done]

    # -- containerd Snapshotter -------------------------------------------------------------

    def stat(self, key: str) -> SnapshotInfo:
        """Returns the info of snapshot ``key``.

        Raises:
            InvalidError: ``key`` is not a valid key.
            NotFoundError: No such snapshot.
        """
        key = _check_key(key)
        self._check_open()
        return self._read(key).info()

    def update(
        self, info: SnapshotInfo, *fieldpaths: str, txn: WriteTxn | None = None
    ) -> SnapshotInfo:
        """Updates the labels of snapshot ``info.name`` (containerd ``Update``).

        Args:
            info: The snapshot's new info; only its labels are used.
            *fieldpaths: ``"labels"`` replaces all labels, ``"labels.<k>"`` sets one (an
                absent or empty value deletes it); none replaces all labels.
            txn: Join this write transaction.

        Returns:
            The stored info after the update (``updated_at`` is now).

        Raises:
            InvalidError: Bad types, bad labels, or a fieldpath other than labels.
            NotFoundError: No such snapshot.
        """
        if not isinstance(info, SnapshotInfo):
            msg = f"update needs a SnapshotInfo, got {info!r}"
            raise InvalidError(msg)
        key = _check_key(info.name)
        new_labels = _check_labels(dict(info.labels))
        for path in fieldpaths:
            if not isinstance(path, str):
                msg = f"fieldpath must be a string, got {path!r}"
                raise InvalidError(msg)
            if path != "labels" and not (path.startswith("labels.") and len(path) > 7):
                msg = f"cannot update {path!r} field on snapshot {key!r}: only labels are mutable"
                raise InvalidError(msg)
        txn = _check_txn(txn)
        self._check_open()

        def apply(wtxn: WriteTxn) -> SnapshotInfo:
            rec = _must_get(wtxn, key)
            labels = dict(rec.raw.get("labels") or {})
            if not fieldpaths:
                labels = new_labels
            for path in fieldpaths:
                if path == "labels":
                    labels = dict(new_labels)
                else:
                    label = path.removeprefix("labels.")
                    value = new_labels.get(label, "")
                    if value:
                        labels[label] = value
                    else:
                        labels.pop(label, None)
            rec.raw["labels"] = {k: v for k, v in labels.items() if v}
            rec.raw["updated_at"] = time.time_ns()
            _put(wtxn, rec)
            return rec.info()

        if txn is not None:
            return apply(txn)
        with self._env.write_txn() as wtxn:
            return apply(wtxn)

    def usage(self, key: str) -> Usage:
        """Own disk usage of ``key`` (containerd ``Usage``).

        Active snapshots are measured now (a walk of their own directory); committed ones
        return what was stored at commit (or merge); views own nothing and return zero.

        Raises:
            InvalidError: ``key`` is not a valid key.
            NotFoundError: No such snapshot.
        """
        key = _check_key(key)
        self._check_open()
        rec = self._read(key)
        if rec.kind == Kind.ACTIVE:
            return disk_usage(self._usage_dir(rec.id))
        stored = rec.raw.get("usage")
        if isinstance(stored, list | tuple) and len(stored) == 2:
            return Usage(size=int(stored[0]), inodes=int(stored[1]))
        return Usage(0, 0)

    def mounts(self, key: str) -> list[Mount]:
        """The mounts of active or view snapshot ``key``.

        Raises:
            InvalidError: ``key`` is not a valid key.
            NotFoundError: No such snapshot.
            FailedPreconditionError: ``key`` is committed (containerd ``GetSnapshot``).
        """
        key = _check_key(key)
        self._check_open()
        with self._env.read_txn() as txn:
            rec = _must_get(txn, key)
            if rec.kind == Kind.COMMITTED:
                msg = f"snapshot {key!r} is committed; only active and view snapshots mount"
                raise FailedPreconditionError(msg)
            chain = _chain(txn, rec)
        return self._mounts(rec, chain)

    def prepare(
        self,
        key: str,
        parent: str = "",
        *,
        labels: Mapping[str, str] | None = None,
        txn: WriteTxn | None = None,
    ) -> list[Mount]:
        """Creates active snapshot ``key`` whose content starts as ``parent``'s.

        Args:
            key: The new snapshot's key.
            parent: A committed snapshot, or ``""`` for an empty one.
            labels: The snapshot's labels.
            txn: Join this write transaction (the directory is built inside it).

        Returns:
            Read-write mounts.

        Raises:
            InvalidError: Bad arguments, or ``parent`` is not committed.
            AlreadyExistsError: ``key`` exists.
            NotFoundError: ``parent`` does not exist.
        """
        rec = self._create(Kind.ACTIVE, key, parent, labels, txn)
        return self._mounts_of(rec, txn)

    def view(
        self,
        key: str,
        parent: str = "",
        *,
        labels: Mapping[str, str] | None = None,
        txn: WriteTxn | None = None,
    ) -> list[Mount]:
        """Creates read-only view ``key`` of ``parent`` (containerd ``View``).

        Raises:
            InvalidError: Bad arguments, or ``parent`` is not committed.
            AlreadyExistsError: ``key`` exists.
            NotFoundError: ``parent`` does not exist.
        """
        rec = self._create(Kind.VIEW, key, parent, labels, txn)
        return self._mounts_of(rec, txn)

    def _mounts_of(self, rec: _Record, txn: WriteTxn | None) -> list[Mount]:
        if txn is not None:
            return self._mounts(rec, _chain(txn, rec))
        with self._env.read_txn() as rtxn:
            return self._mounts(rec, _chain(rtxn, rec))

    def commit(
        self,
        name: str,
        key: str,
        *,
        labels: Mapping[str, str] | None = None,
        txn: WriteTxn | None = None,
    ) -> None:
        """Commits active ``key`` as ``name`` (containerd ``Commit`` / ``CommitActive``).

        The directory stays where it is (same id); ``key`` is removed; the labels are
        *replaced* by ``labels``; the usage of the snapshot's own directory is stored.

        Raises:
            InvalidError: Bad arguments.
            AlreadyExistsError: ``name`` exists.
            NotFoundError: ``key`` does not exist.
            FailedPreconditionError: ``key`` is not active.
        """
        name = _check_key(name, "name")
        key = _check_key(key)
        checked = _check_labels(labels)
        txn = _check_txn(txn)
        self._check_open()

        def check(rtxn: ReadTxn) -> _Record:
            if _get(rtxn, name) is not None:
                msg = f"cannot commit {key!r}: snapshot {name!r} already exists"
                raise AlreadyExistsError(msg)
            rec = _must_get(rtxn, key)
            if rec.kind != Kind.ACTIVE:
                msg = f"cannot commit snapshot {key!r}: it is {rec.kind.value}, not active"
                raise FailedPreconditionError(msg)
            return rec

        def apply(wtxn: WriteTxn, rec: _Record, usage: Usage) -> None:
            now = time.time_ns()
            raw = dict(rec.raw)
            raw.update(
                kind=Kind.COMMITTED.value,
                labels={k: v for k, v in checked.items() if v},
                created_at=now,
                updated_at=now,
                usage=[usage.size, usage.inodes],
            )
            wtxn.delete(DB_SNAPSHOTS, key.encode())
            _put(wtxn, _Record(name, raw))
            if rec.parent:
                wtxn.delete(DB_SNAPSHOTS, _child_key(rec.parent, key))
                wtxn.put(DB_SNAPSHOTS, _child_key(rec.parent, name), b"")

        if txn is not None:
            rec = check(txn)
            usage = disk_usage(self._usage_dir(rec.id))
            sync_filesystem(self._dirs)
            apply(txn, rec, usage)
            return
        with self._env.read_txn() as rtxn:
            rec = check(rtxn)
        usage = disk_usage(self._usage_dir(rec.id))
        sync_filesystem(self._dirs)
        with self._env.write_txn() as wtxn:
            again = check(wtxn)
            if again.id != rec.id:
                msg = f"snapshot {key!r} changed while it was being committed"
                raise FailedPreconditionError(msg)
            apply(wtxn, again, usage)

    def remove(self, key: str, *, txn: WriteTxn | None = None) -> None:
        """Removes snapshot ``key`` of any kind; its directory goes after the commit.

        Raises:
            InvalidError: ``key`` is not a valid key.
            NotFoundError: No such snapshot.
            FailedPreconditionError: ``key`` has children.
        """
        key = _check_key(key)
        txn = _check_txn(txn)
        self._check_open()

        def apply(wtxn: WriteTxn) -> None:
            rec = _must_get(wtxn, key)
            if _has_children(wtxn, key):
                msg = f"cannot remove snapshot {key!r}: it has children"
                raise FailedPreconditionError(msg)
            wtxn.delete(DB_SNAPSHOTS, key.encode())
            if rec.parent:
                wtxn.delete(DB_SNAPSHOTS, _child_key(rec.parent, key))
            if self._owns_dir(rec.kind, bool(rec.parent)):
                sid = rec.id
                # Renamed inside the transaction, before its commit: a reader of the committed
                # state (storage.check) never sees the directory of a snapshot it does not
                # know any more. A rollback renames it back; a crash before the commit
                # leaves rm-<id> of a live snapshot, which the next open renames back.
                self._retire_dir(sid)
                wtxn.after_rollback(lambda: self._unretire_dir(sid))
                wtxn.after_unlock(lambda: self._purge_dir(sid))

        if txn is not None:
            apply(txn)
            return
        with self._env.write_txn() as wtxn:
            apply(wtxn)

    def _retire_dir(self, sid: str) -> None:
        # containerd: rename to rm-<id> first, so a crash mid-delete leaves a name that
        # cleanup knows is garbage. Fast: runs while the metadata write lock is held.
        src = self._snapshot_dir(sid)
        doomed = self._dirs / f"rm-{sid}"
        with self._lock:
            self._inflight.add(doomed.name)
        try:
            os.rename(src, doomed)
        except FileNotFoundError:
            self._forget_inflight(doomed.name)

    def _unretire_dir(self, sid: str) -> None:
        # The removing transaction rolled back: the snapshot is still recorded.
        doomed = self._dirs / f"rm-{sid}"
        try:
            os.rename(doomed, self._snapshot_dir(sid))
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("cannot restore snapshot directory %s: %s", doomed, exc)
        finally:
            self._forget_inflight(doomed.name)

    def _restore_retired(self, live: set[str]) -> list[str]:
        """Renames ``rm-<id>`` of still-recorded snapshots back (a removal that crashed
        before its commit); returns what was restored."""
        restored: list[str] = []
        try:
            names = os.listdir(self._dirs)
        except FileNotFoundError:
            return restored
        for name in names:
            sid = name.removeprefix("rm-")
            if sid == name or sid not in live or os.path.lexists(self._dirs / sid):
                continue
            try:
                os.rename(self._dirs / name, self._dirs / sid)
            except OSError as exc:
                logger.warning("cannot restore snapshot directory %s: %s", name, exc)
                continue
            restored.append(sid)
            logger.warning(
                "snapshot directory %s restored from %s (its removal never committed)",
                self._dirs / sid,
                name,
            )
        return restored

    def _purge_dir(self, sid: str) -> None:
        # The slow part (a tree of files), after the write lock is released, so that GC of
        # thousands of snapshots does not hold up every other metadata write.
        doomed = self._dirs / f"rm-{sid}"
        try:
            _remove_quietly(doomed)
        finally:
            self._forget_inflight(doomed.name)

    def walk(self, *filters: str) -> Iterator[SnapshotInfo]:
        """Yields the snapshots matching any of ``filters`` (containerd filter syntax).

        Fields: ``name``, ``parent``, ``kind`` and ``labels.<key>``. The list is read in one
        read transaction before the first item is yielded, so the caller may stat, create or
        remove snapshots while iterating.

        Raises:
            InvalidError: A filter does not parse.
        """
        matcher = parse_filters(*filters)
        self._check_open()
        infos: list[SnapshotInfo] = []
        with self._env.read_txn() as txn:
            for raw_key, raw in txn.items(DB_SNAPSHOTS):
                if raw_key.startswith(b"\x00"):
                    continue
                key = raw_key.decode("utf-8", "surrogateescape")
                infos.append(_decode(key, raw).info())

        def adaptor_of(info: SnapshotInfo) -> Callable[[Sequence[str]], tuple[str, bool]]:
            def adaptor(fieldpath: Sequence[str]) -> tuple[str, bool]:
                if not fieldpath:
                    return "", False
                head = fieldpath[0]
                if head == "name":
                    return info.name, True
                if head == "parent":
                    return info.parent, True
                if head == "kind":
                    return info.kind.value, True
                if head == "labels":
                    return map_field(fieldpath[1:], info.labels)
                return "", False

            return adaptor

        return iter([info for info in infos if matcher.match(adaptor_of(info))])

    def close(self) -> None:
        """Closes the snapshotter; later calls raise :class:`FailedPreconditionError`.

        Idempotent. The metadata environment is the cache's and stays open.
        """
        if self._closed:
            return
        if self._pending:
            self._sweep()
        self._closed = True

    # -- merge (BuildKit MergeSnapshotter) --------------------------------------------------

    def merge(
        self,
        key: str,
        diffs: Sequence[tuple[str, str]],
        *,
        labels: Mapping[str, str] | None = None,
        txn: WriteTxn | None = None,
    ) -> None:
        """Creates committed snapshot ``key`` by applying each diff in order on an empty tree.

        BuildKit's merge snapshotter with hardlinks (``tryCrossSnapshotLink``): each
        ``(lower, upper)`` is the change set from committed ``lower`` to committed ``upper``
        (``lower == ""``: all of ``upper``; ``upper == ""``: delete all of ``lower``). Files
        are hardlinked from the inputs' directories (copied on ``EXDEV``/``EMLINK``), deleted
        paths are removed, directories are created. The stored usage counts only inodes that
        are not shared with the inputs, as BuildKit's merge usage does. The result has no
        parent (base layers are not skipped, unlike BuildKit's overlay merges).

        Raises:
            InvalidError: Bad arguments.
            AlreadyExistsError: ``key`` exists.
            NotFoundError: An input snapshot does not exist.
            FailedPreconditionError: An input is not committed.
        """
        checked = self._check_diffs(diffs)
        key = _check_key(key)
        _check_labels(labels)
        txn = _check_txn(txn)
        self._check_open()
        opened: dict[str, _Tree] = {}
        try:
            if txn is not None:
                trees = self._diff_trees(txn, checked, opened)
            else:
                with self._env.read_txn() as rtxn:
                    trees = self._diff_trees(rtxn, checked, opened)

            def build(tmp: Path, plan: _Plan) -> Usage:
                return self._merge_into(tmp, trees)

            self._create(Kind.COMMITTED, key, "", labels, txn, build=build)
        finally:
            for tree in opened.values():
                tree.close()

    @staticmethod
    def _check_diffs(diffs: object) -> list[tuple[str, str]]:
        if isinstance(diffs, str | bytes) or not isinstance(diffs, Sequence):
            msg = f"merge diffs must be a sequence of (lower, upper) pairs, got {diffs!r}"
            raise InvalidError(msg)
        out: list[tuple[str, str]] = []
        for pair in diffs:
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                msg = f"merge diff must be a (lower, upper) pair, got {pair!r}"
                raise InvalidError(msg)
            lower, upper = pair
            out.append((_check_parent(lower), _check_parent(upper)))
        return out

    def _diff_trees(
        self, txn: ReadTxn, diffs: list[tuple[str, str]], cache: dict[str, _Tree]
    ) -> list[tuple[_Tree | None, _Tree | None]]:
        def tree(key: str) -> _Tree | None:
            if not key:
                return None
            if key not in cache:
                rec = _must_get(txn, key)
                if rec.kind != Kind.COMMITTED:
                    msg = f"merge input {key!r} is {rec.kind.value}, not committed"
                    raise FailedPreconditionError(msg)
                try:
                    cache[key] = self._content_tree(rec, _chain(txn, rec))
                except OSError as exc:
                    msg = f"cannot read merge input {key!r}: {exc}"
                    raise RefcacheError(msg) from exc
            return cache[key]

        return [(tree(lower), tree(upper)) for lower, upper in diffs]

    def _merge_into(self, tmp: Path, trees: list[tuple[_Tree | None, _Tree | None]]) -> Usage:
        target = self._merge_target(tmp)
        applier = _Applier(target)
        try:
            for lower, upper in trees:
                applier.apply(lower, upper)
            applier.flush()
        finally:
            applier.close()
        return disk_usage(target, exclude=applier.linked)

    def _merge_target(self, tmp: Path) -> Path:
        return tmp

    # -- consistency ------------------------------------------------------------------------

    def owned_dirs(self, txn: ReadTxn) -> dict[str, str]:
        """``{directory name: snapshot key}`` of every snapshot that owns a directory, and
        the last id handed out, as ``txn`` sees them (for ``storage.check``)."""
        owners: dict[str, str] = {}
        for raw_key, raw in txn.items(DB_SNAPSHOTS):
            if raw_key.startswith(b"\x00"):
                continue
            rec = _decode(raw_key.decode("utf-8", "surrogateescape"), raw)
            if self._owns_dir(rec.kind, bool(rec.parent)):
                owners[rec.id] = rec.key
        return owners

    @staticmethod
    def last_id(txn: ReadTxn) -> int:
        """The last snapshot id handed out as ``txn`` sees it (ids are never reused, so a
        directory named by a larger id belongs to a transaction that has not committed)."""
        raw = txn.get(DB_SNAPSHOTS, _SEQ_KEY)
        if raw is None:
            return 0
        value = msgpack.unpackb(raw)
        return value if isinstance(value, int) else 0

    def dir_of(self, sid: str) -> Path:
        """The directory whose existence says snapshot directory ``sid`` is there."""
        return self._usage_dir(sid)

    def _live_dirs(self) -> tuple[set[str], list[_Record]]:
        live: set[str] = set()
        owning: list[_Record] = []
        with self._env.read_txn() as txn:
            for raw_key, raw in txn.items(DB_SNAPSHOTS):
                if raw_key.startswith(b"\x00"):
                    continue
                rec = _decode(raw_key.decode("utf-8", "surrogateescape"), raw)
                if self._owns_dir(rec.kind, bool(rec.parent)):
                    live.add(rec.id)
                    owning.append(rec)
        return live, owning

    def orphans(self) -> list[Path]:
        """Entries of the snapshot directory that no record needs (``storage.check``).

        Leftover ``new-*``/``rm-*`` directories count; work in progress of this process does
        not.
        """
        live, _ = self._live_dirs()
        with self._lock:
            busy = set(self._inflight)
        try:
            names = sorted(os.listdir(self._dirs))
        except FileNotFoundError:
            return []
        return [self._dirs / n for n in names if n not in live and n not in busy]

    def missing(self) -> list[str]:
        """Keys of snapshots whose directory is missing (``storage.check``)."""
        _, owning = self._live_dirs()
        return sorted(rec.key for rec in owning if not self._usage_dir(rec.id).is_dir())

    def cleanup(self) -> list[Path]:
        """Deletes the :meth:`orphans` (containerd ``Cleaner``); returns what it removed."""
        if self._closed:
            msg = f"{self.name} snapshotter at {self.root} is closed"
            raise FailedPreconditionError(msg)
        if self._pending:
            self._sweep()
        live, _ = self._live_dirs()
        with self._lock:
            busy = set(self._inflight)
        self._restore_retired(live - {n.removeprefix("rm-") for n in busy})
        removed = []
        for path in self.orphans():
            try:
                _remove_path(str(path))
            except OSError as exc:
                logger.warning("cannot remove leftover snapshot directory %s: %s", path, exc)
                continue
            removed.append(path)
        return removed


def _check_same_chain(before: _Plan, after: _Plan) -> None:
    if [r.id for r in after.chain] != [r.id for r in before.chain]:
        parent = before.parent.key if before.parent else ""
        msg = f"parent {parent!r} of {before.key!r} changed while the snapshot was built"
        raise FailedPreconditionError(msg)


def _fsync_tree_dirs(root: Path) -> None:
    """fsyncs every directory of a tree of empty directories (a new snapshot layout)."""
    fsync_tree_dirs(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
