"""File-system helpers of the snapshotters: copying trees and files, measuring, flushing.

Ports of containerd/continuity's ``fs.CopyDir``/``copyFileInfo`` (:func:`copy_tree`,
:func:`copy_metadata_at`), ``fs.DiskUsage`` (:func:`disk_usage`), and the extended-attribute
handling the copies, the differ and the merge applier share (:func:`read_xattrs`,
:func:`_copy_xattrs`). Everything works relative to directory descriptors (``*_at`` names;
:data:`AT_FDCWD` for plain paths) and is iterative: trees of any depth, paths of any length
(see ``storage/_tree.py``).

Owners, devices and privileged xattrs follow containerd's native snapshotter: what the
process may not set (``EPERM``, an id unmapped in a user namespace) is logged and skipped,
so an unprivileged copy belongs to the caller.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

from ._errors import FailedPreconditionError, InvalidError
from ._tree import DirCursor, PathNode, list_entries, proc_path, walk_dirs
from ._types import Usage

__all__ = [
    "AT_FDCWD",
    "OVERLAY_XATTR_PREFIXES",
    "copy_file_at",
    "copy_metadata_at",
    "copy_tree",
    "disk_usage",
    "make_special_at",
    "read_xattrs",
    "sync_filesystem",
]

logger = logging.getLogger(__name__)

_FICLONE = 0x40049409
#: "Relative to the working directory": lets the ``*_at`` helpers take plain paths too.
AT_FDCWD = -100
#: overlayfs' own attributes (opaque markers, redirects): never copied, compared or recorded.
OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
#: Host-specific labels: recorded by neither the differ nor compared by the change walk.
_UNCOMPARED_XATTRS = ("security.selinux",)
_IGNORED_XATTR_ERRNOS = (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL)


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
        for _ in walk_dirs(cursor, scan):
            pass  # scan counts every entry on the way down
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


def _xattr_names(path: str) -> list[str]:
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _IGNORED_XATTR_ERRNOS:
            return []  # no xattr support here, or not ours to read
        raise


def _copy_xattrs(src: str, dst: str, *, skip_overlay: bool) -> None:
    for name in _xattr_names(src):
        if skip_overlay and name.startswith(OVERLAY_XATTR_PREFIXES):
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


def read_xattrs(path: str) -> dict[str, bytes]:
    """The extended attributes of ``path`` (not followed) that a layer carries, sorted.

    Left out: overlayfs' own (``trusted.overlay.*``, ``user.overlay.*``) and
    ``security.selinux`` (a host's label). Attributes the process may not read are left out
    too. The differ records these; the change walk compares them.
    """
    out: dict[str, bytes] = {}
    for key in sorted(_xattr_names(path)):
        if key in _UNCOMPARED_XATTRS or key.startswith(OVERLAY_XATTR_PREFIXES):
            continue
        try:
            out[key] = os.getxattr(path, key, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (*_IGNORED_XATTR_ERRNOS, errno.ENODATA):
                continue
            raise
    return out


def copy_metadata_at(
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
        # belongs to us, as containerd's native snapshotter leaves it.
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


def _dir_arg(dir_fd: int) -> int | None:
    return None if dir_fd == AT_FDCWD else dir_fd


def _at_path(dir_fd: int, name: str) -> str:
    return name if dir_fd == AT_FDCWD else proc_path(dir_fd, name)


def make_special_at(dst_dir: int, dst: str, st: os.stat_result) -> bool:
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
        elif not make_special_at(dst_fd, name, st):
            continue
        copy_metadata_at(src_fd, name, dst_fd, name, st)
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
                    copy_metadata_at(scur.fd, name, dcur.fd, name, st)
        finally:
            for cursor in extra:
                cursor.close()
    copy_metadata_at(AT_FDCWD, str(src), AT_FDCWD, str(dst), root_st)
