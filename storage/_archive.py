"""Applying OCI layer tarballs: a hardened, streaming tar applier.

Pure file-system logic on directories and byte streams; it knows nothing about content
stores, snapshotters or mounts (``_applier.py`` wraps it). Compression is
``_compression.py``'s, the whiteout and PAX time conventions ``_layertar.py``'s, and the
differ's tar writer (the other direction) is ``_difftar.py``.

Applying (:func:`apply_tar`) mirrors containerd ``pkg/archive/tar.go`` ``applyNaive``: the
(decompressed) tar is streamed entry by entry into a target directory, OCI whiteouts are
honoured (``.wh.<name>`` deletes, ``.wh..wh..opq`` makes a directory opaque; with
``overlay=True`` they become overlayfs 0/0 character devices and ``trusted.overlay.opaque``),
and the diffID is the sha256 of *every* uncompressed byte, trailing bytes after the
end-of-archive blocks included (containerd drains the stream into the digester).

Every path is resolved *inside* the target, like ``filepath-securejoin``/continuity
``fs.RootPath``: components are walked one at a time with ``O_NOFOLLOW`` directory file
descriptors, symlinks met on the way are expanded as if the target were ``/`` (an absolute or
``..``-heavy link target is clamped to the target root), and the final component is always
created relative to its parent's descriptor and never followed. Nothing outside the target is
ever opened for writing. An entry that fails partway leaves a partial layer inside the target
(the caller owns a fresh snapshot directory and discards it); nothing outside is touched.

Hostile-archive outcomes (``InvalidError`` names the entry; "skipped" logs a warning):

=====================================================  ========================================
Entry                                                  Outcome
=====================================================  ========================================
name with ``..`` climbing above the root               ``InvalidError`` (breakout; moby does
(``../x``, ``a/../../x``)                              the same; ``a/../b`` is cleaned to
                                                       ``b``)
absolute name (``/abs/path``)                          clamped: leading ``/`` stripped
                                                       (containerd behaviour)
name or link name containing NUL                       ``InvalidError``
name resolving to the root itself (``./``, ``/``)      skipped (debug log), like containerd
write *through* a symlink in the target (``evil ->     clamped: the symlink is resolved inside
/outside`` then ``evil/pwned``; chains; a directory    the target, so the file lands at
replaced by such a symlink first)                      ``<target>/outside/pwned``
symlink loops / more than 255 links in one path        ``InvalidError``
a non-directory used as a parent (``f`` then ``f/x``)  ``InvalidError``
hardlink whose link name climbs above the root         ``InvalidError``
hardlink to a path not inside the target (absolute     ``InvalidError`` (the clamped path does
names, links through symlinks pointing outside)        not exist inside the target)
hardlink to a directory, or to a missing path          ``InvalidError``
whiteout naming ``.``/``..``/nothing (``.wh...``,      ``InvalidError`` (containerd "invalid
``.wh.``) or placed above the root (``../.wh.x``)      whiteout name")
whiteout whose parent is a symlink pointing outside    clamped: resolved inside the target; a
                                                       missing parent makes it a no-op
char/block device without permission (not root, or     skipped with a warning (containerd
``allow_devices=False``)                               skips devices in user namespaces)
entry size < 0 or > ``max_entry_size``                 ``InvalidError`` before any data is
                                                       written; data shorter than the header
                                                       says -> ``InvalidError``
uid/gid outside 0..2**32-2                             ``InvalidError``
corrupt header in the middle, truncated header         ``InvalidError`` (Python's ``tarfile``
                                                       would silently stop there; Go's tar
                                                       reader errors, and so do we)
unknown entry type                                     ``InvalidError``
``SCHILY.xattr.trusted.overlay.*``/``user.overlay.*``  skipped with a warning: they would
                                                       steer overlayfs (redirects, opaque)
xattr the kernel refuses (EPERM/ENOTSUP)               skipped with a warning
=====================================================  ========================================
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Final, Protocol, cast

import zstandard

from ._errors import (
    FailedPreconditionError,
    InvalidError,
    RefcacheError,
    StoreFullError,
)
from ._fscopy import OVERLAY_XATTR_PREFIXES, read_xattrs
from ._layertar import (
    TAR_BUFSIZE,
    WHITEOUT_META_PREFIX,
    WHITEOUT_OPAQUE,
    WHITEOUT_PREFIX,
    pax_time_ns,
)
from ._tree import (
    DirCursor,
    PathNode,
    display_path,
    node_parts,
    post_order,
    proc_path,
    remove_tree,
)

__all__ = [
    "MAX_ENTRY_SIZE",
    "MAX_LAYER_ENTRIES",
    "MAX_LAYER_SIZE",
    "ApplyResult",
    "LayerLimitError",
    "apply_tar",
]

logger = logging.getLogger(__name__)

#: Default cap on one entry's size (1 TiB): larger headers are hostile or corrupt.
MAX_ENTRY_SIZE: Final = 1 << 40
#: Default cap on a layer's uncompressed size (64 GiB): a decompression bomb stops here.
MAX_LAYER_SIZE: Final = 64 << 30
#: Default cap on a layer's number of tar entries (10 million).
MAX_LAYER_ENTRIES: Final = 10_000_000

_CHUNK: Final = 1 << 20
_WINDOW: Final = 4 * TAR_BUFSIZE
_MAX_SYMLINKS: Final = 255  # filepath-securejoin's limit
# Parent directories kept open between entries (a bounded cache, whatever the depth).
_FD_CACHE: Final = 64
_MAX_ID: Final = (1 << 32) - 2
_NS: Final = 1_000_000_000
_INT64_MAX: Final = (1 << 63) - 1
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What :func:`apply_tar` read.

    Attributes:
        diff_id: ``sha256:`` digest of every uncompressed byte of the stream.
        size: Number of uncompressed bytes.
    """

    diff_id: str
    size: int


# --------------------------------------------------------------------------------------------
# Applying


class LayerLimitError(InvalidError):
    """A layer exceeds the uncompressed-size or entry cap of the applier."""


class _HashingReader:
    """Hashes and counts every byte read; remembers a window of recent bytes.

    The window lets :func:`apply_tar` check the block where ``tarfile`` stopped: Python's
    ``tarfile`` treats a corrupt or truncated header after the first as a silent end of
    archive, where Go's ``archive/tar`` (containerd) reports an error.
    """

    def __init__(self, source: _Readable, limit: int = MAX_LAYER_SIZE) -> None:
        self._source = source
        self._limit = limit
        self._hash = hashlib.sha256()
        self.count = 0
        self._window = bytearray()
        self._window_start = 0

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._source.read(size) or b""
        except RefcacheError:
            raise
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            msg = f"cannot read layer stream at uncompressed byte {self.count}: {exc}"
            raise InvalidError(msg) from exc
        if data:
            self._hash.update(data)
            self.count += len(data)
            if self.count > self._limit:
                msg = (
                    f"layer is larger than the cap of {self._limit} uncompressed bytes "
                    "(a decompression bomb, or raise max_layer_size)"
                )
                raise LayerLimitError(msg)
            self._window += data
            if len(self._window) > 2 * _WINDOW:
                drop = len(self._window) - _WINDOW
                del self._window[:drop]
                self._window_start += drop
        return data

    def window(self, start: int, end: int) -> bytes:
        lo = max(start - self._window_start, 0)
        return bytes(self._window[lo : max(end - self._window_start, 0)])

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass

    @property
    def diff_id(self) -> str:
        return "sha256:" + self._hash.hexdigest()


def _clean(name: str, *, what: str, entry: str) -> list[str]:
    """Lexically cleans a tar path (Go ``filepath.Clean``); rejects NUL and breakouts."""
    if "\x00" in name:
        msg = f"layer entry {entry!r}: {what} contains a NUL byte"
        raise InvalidError(msg)
    if name and name[0] != "/" and "//" not in name:
        padded = f"/{name.rstrip('/')}/"
        if "/./" not in padded and "/../" not in padded:
            # Already clean, the usual case: substring searches in C, whatever the depth.
            return padded[1:-1].split("/")
    parts: list[str] = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                msg = f"layer entry {entry!r}: {what} {name!r} climbs out of the target"
                raise InvalidError(msg)
            parts.pop()
            continue
        parts.append(comp)
    return parts


def _clamp_ns(ns: int) -> int:
    return max(-_INT64_MAX, min(ns, _INT64_MAX))


def _os_error(entry: str, exc: OSError) -> RefcacheError:
    """Wraps an OSError met while applying ``entry`` in the matching refcache error."""
    msg = f"applying layer entry {_short(entry)!r}: {exc.strerror or exc}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFullError(msg)
    if exc.errno in (
        errno.ENAMETOOLONG,
        errno.ELOOP,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EINVAL,
        errno.EEXIST,
        errno.ENOENT,
        errno.ENOTEMPTY,
        errno.EXDEV,
    ):
        return InvalidError(msg)
    return FailedPreconditionError(msg)


def _short(name: str) -> str:
    """An entry name for a message: very long (deep) names keep their two ends."""
    if len(name) <= 300:
        return name
    return f"{name[:120]}...({name.count('/') + 1} components)...{name[-120:]}"


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


@dataclass(slots=True)
class _DirMeta:
    mode: int
    atime: int
    mtime: int


class _TrieNode(PathNode):
    """A real directory position in the target, with what this layer did there.

    ``unpacked``: the layer unpacked this directory itself; ``below``: it unpacked something
    below it; ``files``: names of non-directories it unpacked here; ``meta``: the mode and
    times to set once the stream is done.
    """

    __slots__ = ("below", "files", "meta", "unpacked")

    def __init__(self, parent: PathNode | None = None, name: str = "") -> None:
        super().__init__(parent, name)
        self.unpacked = False
        self.below = False
        self.files: set[str] | None = None
        self.meta: _DirMeta | None = None


class _Unpacker:
    """One application of a layer into a target; owns the directory descriptors it opens.

    Positions are :class:`_TrieNode` chains (one per real directory touched), descriptors
    are opened one component at a time and never one per level, so layers of any depth
    apply with a bounded number of descriptors and memory linear in the number of entries.
    """

    def __init__(
        self,
        root_fd: int,
        *,
        overlay: bool,
        parents: tuple[Path, ...],
        same_owner: bool,
        allow_devices: bool,
        opaque_xattr: str,
        max_entry_size: int,
    ) -> None:
        self.root_fd = root_fd
        self.overlay = overlay
        self.parents = parents
        self.same_owner = same_owner
        self.allow_devices = allow_devices
        self.opaque_xattr = opaque_xattr
        self.max_entry_size = max_entry_size
        self.top = _TrieNode()
        # requested parent path -> (open descriptor, real directory node)
        self._cache: dict[tuple[str, ...], tuple[int, _TrieNode]] = {}
        self._retired: list[int] = []
        # One cursor per lower dir (overlay parents), opened when a parent is first made.
        self._lowers: dict[int, DirCursor | None] = {}

    # -- descriptors -------------------------------------------------------------------------

    def retire(self) -> None:
        """Forgets cached parent descriptors after a removal (they may be stale now).

        They are closed at the end of the entry, since the caller may still hold one.
        """
        for fd, _ in self._cache.values():
            self._retired.append(fd)
        self._cache.clear()

    def end_entry(self) -> None:
        for fd in self._retired:
            os.close(fd)
        self._retired.clear()

    def close(self) -> None:
        self.retire()
        self.end_entry()
        for cursor in self._lowers.values():
            if cursor is not None:
                cursor.close()
        self._lowers.clear()

    def resolve_dir(
        self, parts: Sequence[str], *, create: bool, entry: str
    ) -> tuple[int, _TrieNode]:
        """Resolves a directory inside the root (securejoin semantics).

        Returns:
            A borrowed descriptor of the directory and its real position. The descriptor is
            valid until the end of the current entry.

        Raises:
            FileNotFoundError: A component is missing and ``create`` is false.
            NotADirectoryError: A component is not a directory (or a symlink to one).
            OSError: ``ELOOP`` for symlink loops; other file-system errors.
        """
        key = tuple(parts)
        if not key:
            return self.root_fd, self.top
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        # The entries of a layer usually come parent first: resume from the parent's walk.
        start = self._cache.get(key[:-1]) if len(key) > 1 else None
        if start is not None:
            fd, node, owned = self._walk(key[-1:], start[0], start[1], create=create, entry=entry)
        else:
            fd, node, owned = self._walk(key, self.root_fd, self.top, create=create, entry=entry)
        if not owned:
            return fd, node  # the root, or a cached descriptor
        if len(self._cache) >= _FD_CACHE:
            self.retire()
        self._cache[key] = (fd, node)
        return fd, node

    def _walk(
        self, parts: Sequence[str], start_fd: int, start: _TrieNode, *, create: bool, entry: str
    ) -> tuple[int, _TrieNode, bool]:
        """Walks ``parts`` from ``start``; returns (descriptor, real node, owned?).

        Holds one descriptor at a time: ``..`` re-opens the parent (clamped at the root,
        lexically on the *resolved* path, as securejoin does).
        """
        cur, owned, node = start_fd, False, start

        def move(fd: int, to: _TrieNode) -> None:
            nonlocal cur, owned, node
            if owned:
                os.close(cur)
            cur, owned, node = fd, fd != self.root_fd, to

        pending = list(reversed(parts))
        links = 0
        done = False
        try:
            while pending:
                comp = pending.pop()
                if comp in ("", "."):
                    continue
                if comp == "..":
                    parent = node.parent
                    if parent is not None:
                        assert isinstance(parent, _TrieNode)
                        if parent.parent is None:
                            move(self.root_fd, parent)
                        else:
                            move(os.open("..", _DIR_FLAGS, dir_fd=cur), parent)
                    continue
                try:
                    st = os.stat(comp, dir_fd=cur, follow_symlinks=False)
                except FileNotFoundError:
                    if not create:
                        raise
                    self._mkparent(cur, node, comp)
                    st = os.stat(comp, dir_fd=cur, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > _MAX_SYMLINKS:
                        raise OSError(errno.ELOOP, "too many levels of symbolic links", entry)
                    target = os.readlink(comp, dir_fd=cur)
                    if target.startswith("/"):
                        # An absolute link is relative to the target root (chroot semantics).
                        move(self.root_fd, self.top)
                    pending.extend(reversed(target.split("/")))
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    path = display_path("", [*node_parts(node), comp])
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
                child = node.child(comp)
                assert isinstance(child, _TrieNode)
                move(os.open(comp, _DIR_FLAGS, dir_fd=cur), child)
            done = True
        finally:
            if not done and owned:
                os.close(cur)
        return cur, node, owned

    def _lower_cursor(self, index: int) -> DirCursor | None:
        if index not in self._lowers:
            try:
                self._lowers[index] = DirCursor.open(self.parents[index], self.top)
            except OSError:
                self._lowers[index] = None
        return self._lowers[index]

    def _mkparent(self, dir_fd: int, parent: _TrieNode, name: str) -> None:
        # containerd mkparent: missing parents are 0755; with overlay "parents" the metadata
        # (and xattrs) come from the first lower dir that has the directory.
        os.mkdir(name, 0o755, dir_fd=dir_fd)
        for index in range(len(self.parents)):
            cursor = self._lower_cursor(index)
            if cursor is None:
                continue
            try:
                cursor.goto(parent)
                st = os.stat(name, dir_fd=cursor.fd, follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                break
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                if self.same_owner:
                    os.fchown(fd, st.st_uid, st.st_gid)
                xattrs = read_xattrs(proc_path(cursor.fd, name))
                if xattrs:
                    where = display_path("", [*node_parts(parent), name])
                    for key, value in xattrs.items():
                        self._setxattr(fd, key, value, entry=where)
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
                os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(fd)
            break

    # -- entries -----------------------------------------------------------------------------

    def _setxattr(self, target: int | str, key: str, value: bytes, *, entry: str) -> None:
        try:
            if isinstance(target, int):
                os.setxattr(target, key, value)
            else:
                os.setxattr(target, key, value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES):
                logger.warning("layer entry %r: xattr %s not set: %s", entry, key, exc.strerror)
                return
            raise

    def _remove(self, dir_fd: int, name: str, st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            remove_tree(name, dir_fd=dir_fd)  # iterative, descriptor-based, never follows
        else:
            os.unlink(name, dir_fd=dir_fd)
        self.retire()

    def _remove_existing(self, dir_fd: int, name: str) -> None:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        self._remove(dir_fd, name, st)

    @staticmethod
    def _mark(parent: _TrieNode, name: str, is_dir: bool) -> None:
        if is_dir:
            node = parent.child(name)
            assert isinstance(node, _TrieNode)
            node.unpacked = True
        else:
            if parent.files is None:
                parent.files = set()
            parent.files.add(name)
        # Ancestors are marked bottom up until one already is (each is marked once).
        up: PathNode | None = parent
        while isinstance(up, _TrieNode) and not up.below:
            up.below = True
            up = up.parent

    def apply(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name
        parts = _clean(name, what="name", entry=name)
        if not parts:
            logger.debug("layer entry %r ignored: resolves to the target root", name)
            return
        parent, base = parts[:-1], parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(member, parent, base)
            return
        if not self._accept(member):
            return

        pfd, real_parent = self.resolve_dir(parent, create=True, entry=name)
        existing = _stat_or_none(pfd, base)
        link_src = self._link_source(member) if member.islnk() else None
        if (
            link_src is not None
            and existing is not None
            and os.path.samestat(link_src[2], existing)
        ):
            # Already this inode (a link to itself): removing it first would lose the target.
            self._mark(real_parent, base, is_dir=False)
            return
        if existing is not None and not (stat.S_ISDIR(existing.st_mode) and member.isdir()):
            self._remove(pfd, base, existing)

        atime, mtime = _entry_times(member)
        mode = member.mode & 0o7777
        xattrs = _member_xattrs(member)
        if member.isreg():
            self._write_file(tf, member, pfd, base, xattrs=xattrs, mode=mode, times=(atime, mtime))
        elif member.isdir():
            self._make_dir(member, pfd, base, xattrs=xattrs, existing=existing)
            # Directory modes and times go last (containerd sets dir times after the stream).
            node = real_parent.child(base)
            assert isinstance(node, _TrieNode)
            node.meta = _DirMeta(mode, atime, mtime)
        else:
            if not self._make_other(member, pfd, base, link_src):
                return
            # No chmod of a symlink, nor of a hardlink to one (containerd handleLChmod).
            symlink = member.issym() or (link_src is not None and stat.S_ISLNK(link_src[2].st_mode))
            self._finish_path(
                pfd,
                base,
                member,
                xattrs=xattrs,
                mode=None if symlink else mode,
                atime=atime,
                mtime=mtime,
            )
        self._mark(real_parent, base, is_dir=member.isdir())

    def _accept(self, member: tarfile.TarInfo) -> bool:
        """Checks a header before anything is written: ``False`` skips a device entry."""
        name = member.name
        if member.size < 0 or member.size > self.max_entry_size:
            msg = f"layer entry {name!r}: size {member.size} outside 0..{self.max_entry_size}"
            raise InvalidError(msg)
        for what, ident in (("uid", member.uid), ("gid", member.gid)):
            if not 0 <= ident <= _MAX_ID:
                msg = f"layer entry {name!r}: {what} {ident} out of range"
                raise InvalidError(msg)
        if member.ischr() or member.isblk():
            if not self.allow_devices:
                logger.warning("layer entry %r skipped: device files are not allowed", name)
                return False
        elif (
            not (member.isreg() or member.isdir() or member.issym() or member.islnk())
            and not member.isfifo()
        ):
            msg = f"layer entry {name!r}: unsupported tar entry type {member.type!r}"
            raise InvalidError(msg)
        return True

    def _write_file(
        self,
        tf: tarfile.TarFile,
        member: tarfile.TarInfo,
        pfd: int,
        base: str,
        *,
        xattrs: list[tuple[str, bytes]],
        mode: int,
        times: tuple[int, int],
    ) -> None:
        """A regular file: created exclusively, filled, then owner, xattrs, mode, times."""
        fd = os.open(
            base,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=pfd,
        )
        try:
            src = tf.extractfile(member)
            if src is not None:
                with src:
                    while chunk := src.read(_CHUNK):
                        _write_all(fd, chunk)
            if self.same_owner:
                os.fchown(fd, member.uid, member.gid)
            for key, value in xattrs:
                self._setxattr(fd, key, value, entry=member.name)
            # chmod after chown: chown clears set-id bits.
            os.fchmod(fd, mode)
            os.utime(fd, ns=times)
        finally:
            os.close(fd)

    def _make_dir(
        self,
        member: tarfile.TarInfo,
        pfd: int,
        base: str,
        *,
        xattrs: list[tuple[str, bytes]],
        existing: os.stat_result | None,
    ) -> None:
        """A directory (kept when one is there): owner and xattrs now, mode and times last."""
        if existing is None or not stat.S_ISDIR(existing.st_mode):
            # Owner-writable until the end; the real mode is set with the times.
            os.mkdir(base, 0o700, dir_fd=pfd)
        fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
        try:
            if self.same_owner:
                os.fchown(fd, member.uid, member.gid)
            for key, value in xattrs:
                self._setxattr(fd, key, value, entry=member.name)
        finally:
            os.close(fd)

    def _make_other(
        self,
        member: tarfile.TarInfo,
        pfd: int,
        base: str,
        link_src: tuple[int, str, os.stat_result] | None,
    ) -> bool:
        """A symlink, hardlink, fifo or device node; ``False`` when a device is refused."""
        if member.issym():
            if "\x00" in member.linkname:
                msg = f"layer entry {member.name!r}: symlink target contains a NUL byte"
                raise InvalidError(msg)
            os.symlink(member.linkname, base, dir_fd=pfd)
        elif link_src is not None:  # a hardlink
            lfd, lbase, _ = link_src
            os.link(lbase, base, src_dir_fd=lfd, dst_dir_fd=pfd, follow_symlinks=False)
        elif member.isfifo():
            os.mkfifo(base, 0o600, dir_fd=pfd)
        else:
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            try:
                device = os.makedev(member.devmajor, member.devminor)
                os.mknod(base, kind | 0o600, device, dir_fd=pfd)
            except PermissionError as exc:
                logger.warning("layer entry %r skipped: cannot create device: %s", member.name, exc)
                return False
        return True

    def _link_source(self, member: tarfile.TarInfo) -> tuple[int, str, os.stat_result]:
        name = member.name
        lparts = _clean(member.linkname, what="hardlink target", entry=name)
        if not lparts:
            msg = f"layer entry {name!r}: hardlink to the target root"
            raise InvalidError(msg)
        try:
            lfd, _ = self.resolve_dir(lparts[:-1], create=False, entry=name)
            lst = os.stat(lparts[-1], dir_fd=lfd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError) as exc:
            msg = f"layer entry {name!r}: hardlink target {member.linkname!r} not in the target"
            raise InvalidError(msg) from exc
        if stat.S_ISDIR(lst.st_mode):
            msg = f"layer entry {name!r}: hardlink target {member.linkname!r} is a directory"
            raise InvalidError(msg)
        return lfd, lparts[-1], lst

    def _finish_path(
        self,
        dir_fd: int,
        name: str,
        member: tarfile.TarInfo,
        *,
        xattrs: list[tuple[str, bytes]],
        mode: int | None,
        atime: int,
        mtime: int,
    ) -> None:
        """Owner, xattrs, mode and times for entries without an open descriptor."""
        if self.same_owner:
            os.chown(name, member.uid, member.gid, dir_fd=dir_fd, follow_symlinks=False)
        for key, value in xattrs:
            self._setxattr(proc_path(dir_fd, name), key, value, entry=member.name)
        if mode is not None:
            # Follows symlinks (Linux has no lchmod) - safe: ``name`` was just created by us
            # as a non-symlink (or hard-linked to one checked not to be a symlink).
            os.chmod(name, mode, dir_fd=dir_fd)
        os.utime(name, ns=(atime, mtime), dir_fd=dir_fd, follow_symlinks=False)

    def _whiteout(self, member: tarfile.TarInfo, parent: list[str], base: str) -> None:
        name = member.name
        if base == WHITEOUT_OPAQUE:
            self._opaque(parent, name)
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            logger.debug("layer entry %r ignored: reserved whiteout meta entry", name)
            return
        victim = base[len(WHITEOUT_PREFIX) :]
        if victim in ("", ".", ".."):
            msg = f"layer entry {name!r}: invalid whiteout name {base!r}"
            raise InvalidError(msg)
        if self.overlay:
            pfd, _ = self.resolve_dir(parent, create=True, entry=name)
            self._remove_existing(pfd, victim)
            # overlayfs whiteout: a 0/0 character device (containerd OverlayConvertWhiteout).
            os.mknod(victim, stat.S_IFCHR, os.makedev(0, 0), dir_fd=pfd)
            if self.same_owner:
                os.chown(victim, member.uid, member.gid, dir_fd=pfd, follow_symlinks=False)
            return
        try:
            pfd, _ = self.resolve_dir(parent, create=False, entry=name)
        except (FileNotFoundError, NotADirectoryError):
            return  # nothing there to delete
        self._remove_existing(pfd, victim)

    def _opaque(self, parent: list[str], entry: str) -> None:
        if self.overlay:
            pfd, _ = self.resolve_dir(parent, create=True, entry=entry)
            try:
                os.setxattr(pfd, self.opaque_xattr, b"y")
            except OSError as exc:
                msg = f"layer entry {entry!r}: cannot set {self.opaque_xattr}: {exc.strerror}"
                raise FailedPreconditionError(msg) from exc
            return
        try:
            pfd, real = self.resolve_dir(parent, create=False, entry=entry)
        except (FileNotFoundError, NotADirectoryError):
            return
        self._clear_lower(pfd, real)

    def _clear_lower(self, dir_fd: int, top: _TrieNode) -> None:
        # Everything in an opaque dir that this layer did not unpack came from lower layers.
        # Unlike containerd, implicit parents of unpacked entries are kept (and descended).
        with DirCursor(dir_fd, top, own=False) as cursor:
            stack = [top]
            while stack:
                node = stack.pop()
                cursor.goto(node)
                fd = cursor.fd
                files = node.files or set()
                children = node.children or {}
                for child in sorted(os.listdir(fd)):
                    st = os.stat(child, dir_fd=fd, follow_symlinks=False)
                    sub = children.get(child)
                    if child in files or (
                        isinstance(sub, _TrieNode) and (sub.unpacked or sub.below)
                    ):
                        if stat.S_ISDIR(st.st_mode) and isinstance(sub, _TrieNode):
                            stack.append(sub)
                        continue
                    self._remove(fd, child, st)

    def finish_dirs(self) -> None:
        # Children first: a parent made read-only must not block its children's updates.
        # A directory's mode and times are set from its parent, after leaving it.
        with DirCursor(self.root_fd, self.top, own=False) as cursor:
            for node in post_order(self.top):
                meta = node.meta if isinstance(node, _TrieNode) else None
                if meta is None or node.parent is None:
                    continue
                try:
                    cursor.goto(node.parent)
                    st = os.stat(node.name, dir_fd=cursor.fd, follow_symlinks=False)
                except (FileNotFoundError, NotADirectoryError):
                    continue  # deleted later in the stream
                if stat.S_ISDIR(st.st_mode):
                    os.chmod(node.name, meta.mode, dir_fd=cursor.fd)
                    os.utime(
                        node.name,
                        ns=(meta.atime, meta.mtime),
                        dir_fd=cursor.fd,
                        follow_symlinks=False,
                    )


def _entry_times(member: tarfile.TarInfo) -> tuple[int, int]:
    """``(atime, mtime)`` in nanoseconds: PAX records first, else the header's seconds; an
    access time is never before the modification time."""
    mtime = pax_time_ns(member.pax_headers.get("mtime"))
    mtime = _clamp_ns(int(member.mtime) * _NS if mtime is None else mtime)
    atime = pax_time_ns(member.pax_headers.get("atime"))
    atime = max(_clamp_ns(atime), mtime) if atime is not None else mtime
    return atime, mtime


def _stat_or_none(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _member_xattrs(member: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for key, value in member.pax_headers.items():
        if not key.startswith("SCHILY.xattr."):
            continue
        xname = key.removeprefix("SCHILY.xattr.")
        # A layer must not steer overlayfs (redirect_dir, metacopy, opaque) through xattrs.
        if xname.startswith(OVERLAY_XATTR_PREFIXES):
            logger.warning("layer entry %r: overlay xattr %s ignored", member.name, xname)
            continue
        # tarfile decodes PAX values with surrogateescape: this restores binary values.
        out.append((xname, value.encode("utf-8", "surrogateescape")))
    return out


def apply_tar(
    stream: BinaryIO | IO[bytes],
    target: Path,
    *,
    overlay: bool = False,
    parents: Sequence[Path] = (),
    same_owner: bool | None = None,
    allow_devices: bool = True,
    userxattr: bool = False,
    max_entry_size: int = MAX_ENTRY_SIZE,
    max_size: int = MAX_LAYER_SIZE,
    max_entries: int = MAX_LAYER_ENTRIES,
) -> ApplyResult:
    """Streams an uncompressed layer tar into ``target`` (containerd ``archive.Apply``).

    See the module docstring for whiteouts and the hostile-archive outcomes.

    Args:
        stream: The uncompressed tar (e.g. from :func:`decompressed_stream`). Read to EOF.
        target: Existing directory to apply into, in place (a fresh snapshot directory, or
            an overlay upperdir with ``overlay=True``).
        overlay: Convert whiteouts to overlayfs form (0/0 char devices, opaque xattr)
            instead of deleting.
        parents: With ``overlay``, the lower dirs (top first): missing parent directories
            copy their metadata from the first lower that has them.
        same_owner: Apply uid/gid (``lchown``); default: when running as root.
        allow_devices: ``False`` skips char/block devices (with a warning), as an
            unprivileged applier must; ``True`` still skips them when ``mknod`` is refused.
        userxattr: Mark opaque dirs with ``user.overlay.opaque`` (overlay ``userxattr``).
        max_entry_size: Largest accepted entry size.
        max_size: Largest accepted uncompressed size of the whole stream.
        max_entries: Largest accepted number of tar entries.

    Returns:
        The diffID (sha256 of all uncompressed bytes, trailing bytes included) and size.

    Raises:
        LayerLimitError: The stream passed ``max_size`` bytes or ``max_entries`` entries
            (an :class:`InvalidError`; what was applied so far stays in ``target``, which
            the caller discards).
        InvalidError: A malformed or hostile archive (the entry is named).
        StoreFullError: The disk is full.
        FailedPreconditionError: Other file-system failures (permissions, read-only).
    """
    hashing = _HashingReader(stream, max_size)
    try:
        root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        msg = f"cannot apply a layer into {target}: {exc.strerror}"
        raise InvalidError(msg) from exc
    unpacker = _Unpacker(
        root_fd,
        overlay=overlay,
        parents=tuple(Path(p) for p in parents),
        same_owner=os.geteuid() == 0 if same_owner is None else same_owner,
        allow_devices=allow_devices,
        opaque_xattr=("user" if userxattr else "trusted") + ".overlay.opaque",
        max_entry_size=max_entry_size,
    )
    try:
        _apply_entries(hashing, unpacker, max_entries)
    finally:
        unpacker.close()
        os.close(root_fd)
    return ApplyResult(hashing.diff_id, hashing.count)


def _apply_entries(hashing: _HashingReader, unpacker: _Unpacker, max_entries: int) -> None:
    try:
        tf = tarfile.open(  # noqa: SIM115 - closed by the with block below
            None, "r|", cast(IO[bytes], hashing), TAR_BUFSIZE
        )
    except tarfile.ReadError as exc:
        if hashing.count == 0:
            return  # an empty blob is an empty layer (Go's tar reader gives io.EOF)
        msg = f"layer stream is not a tar archive: {exc}"
        raise InvalidError(msg) from exc
    with tf:
        name = "<first entry>"
        count = 0
        try:
            while (member := tf.next()) is not None:
                name = member.name
                count += 1
                if count > max_entries:
                    msg = f"layer has more than the cap of {max_entries} entries"
                    raise LayerLimitError(msg)
                # Stream mode keeps every TarInfo in tf.members; nothing here needs them.
                tf.members.clear()  # type: ignore[attr-defined]
                try:
                    unpacker.apply(tf, member)
                finally:
                    unpacker.end_entry()
            name = "<directory metadata>"
            unpacker.finish_dirs()
        except RefcacheError:
            raise
        except tarfile.TarError as exc:
            msg = f"corrupt layer tar at or after entry {_short(name)!r}: {exc}"
            raise InvalidError(msg) from exc
        except OSError as exc:
            raise _os_error(name, exc) from exc
        except (ValueError, OverflowError) as exc:
            msg = f"layer entry {_short(name)!r}: {exc}"
            raise InvalidError(msg) from exc
        end = tf.offset
    _check_archive_end(hashing, end)
    hashing.drain()


def _check_archive_end(hashing: _HashingReader, end: int) -> None:
    """Fails unless ``tarfile`` stopped at EOF or at a zero (end-of-archive) block."""
    if hashing.count <= end:
        return  # EOF at a header boundary: accepted, like Go's tar reader
    block = hashing.window(end, end + tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE and hashing.count < end + tarfile.BLOCKSIZE:
        msg = f"layer tar is truncated: partial header at byte {end}"
        raise InvalidError(msg)
    if block.count(0) != len(block):
        msg = f"layer tar has an invalid header at byte {end}"
        raise InvalidError(msg)
