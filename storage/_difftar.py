"""The walking differ's tar writer: the changes between two trees as an OCI layer tar.

containerd's ``archive.WriteDiff``/``ChangeWriter`` over the change walk of
``storage/_changes.py`` (continuity's ``fs.Changes``); :func:`write_diff`'s docstring says
where the output deviates from containerd's. ``_differ.py`` streams it into a blob.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from pathlib import Path
from typing import IO, BinaryIO, Final

from ._changes import Change, ChangeWalk, LayerStack, TreeDir
from ._errors import FailedPreconditionError, RefcacheError, StoreFullError
from ._fscopy import read_xattrs
from ._layertar import TAR_BUFSIZE, WHITEOUT_PREFIX, format_pax_ns
from ._tree import PathNode, node_parts, proc_path

__all__ = ["write_diff"]

_NS: Final = 1_000_000_000


class _DiffWriter:
    """containerd ``ChangeWriter``: one tar entry per change, parents emitted once."""

    def __init__(self, tf: tarfile.TarFile, walk: ChangeWalk) -> None:
        self._tf = tf
        self._walk = walk
        self._unchanged = walk.unchanged_links
        self._written: dict[tuple[int, int], tuple[TreeDir, str]] = {}
        self._dirs: set[TreeDir] = set()
        # The tar name prefix of the last directory written into, and of each of its
        # ancestors (as lengths): the next prefix is found from the common ancestor, so
        # names cost what changed, not the depth.
        self._chain: list[PathNode] = [walk.top]
        self._lens: list[int] = [0]
        self._text = ""

    def _name(self, parent: TreeDir, name: str) -> str:
        chain, lens = self._chain, self._lens
        downs: list[PathNode] = []
        current: PathNode | None = parent
        while current is not None and (
            current.depth >= len(chain) or chain[current.depth] is not current
        ):
            downs.append(current)
            current = current.parent
        assert current is not None
        keep = current.depth + 1
        del chain[keep:], lens[keep:]
        prefix = self._text[: lens[-1]]
        for step in reversed(downs):
            prefix += step.name + "/"
            chain.append(step)
            lens.append(len(prefix))
        self._text = prefix
        return prefix + name

    def add(self, change: Change) -> None:
        chain: list[TreeDir] = []
        parent: PathNode | None = change.parent
        while isinstance(parent, TreeDir) and parent.parent is not None:
            if parent in self._dirs:
                break
            chain.append(parent)
            parent = parent.parent
        for node in reversed(chain):
            self._dirs.add(node)
            assert isinstance(node.parent, TreeDir)
            assert node.st is not None
            self._entry(node.parent, node.name, node.st)
        if change.st is None:
            self._whiteout(change.parent, change.name)
            return
        if stat.S_ISDIR(change.st.st_mode):
            child = change.parent.child(change.name)
            assert isinstance(child, TreeDir)
            self._dirs.add(child)
        self._entry(change.parent, change.name, change.st)

    def _whiteout(self, parent: TreeDir, name: str) -> None:
        info = tarfile.TarInfo(self._name(parent, WHITEOUT_PREFIX + name))
        info.type = tarfile.REGTYPE
        info.mode = 0
        info.mtime = 0  # containerd >= 2.0: whiteouts carry the Unix epoch
        info.uname = info.gname = ""
        self._tf.addfile(info)

    def _entry(self, parent: TreeDir, name: str, st: os.stat_result) -> None:
        dir_fd = self._walk.upper_fd(parent)
        info = tarfile.TarInfo(self._name(parent, name))
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid = st.st_uid
        info.gid = st.st_gid
        info.uname = info.gname = ""
        sec, frac = divmod(st.st_mtime_ns, _NS)
        info.mtime = sec
        pax: dict[str, str] = {}
        if frac:
            # Nanoseconds are kept (containerd truncates to seconds): see write_diff.
            pax["mtime"] = format_pax_ns(st.st_mtime_ns)
        for xname, value in read_xattrs(proc_path(dir_fd, name)).items():
            pax["SCHILY.xattr." + xname] = value.decode("utf-8", "surrogateescape")
        info.pax_headers = pax
        fmt = stat.S_IFMT(st.st_mode)
        if fmt == stat.S_IFDIR:
            info.type = tarfile.DIRTYPE
            self._tf.addfile(info)
            return
        if st.st_nlink > 1:
            inode = (st.st_dev, st.st_ino)
            source = self._unchanged.get(inode) or self._written.get(inode)
            if source is not None and source != (parent, name):
                info.type = tarfile.LNKTYPE
                info.linkname = "/".join([*node_parts(source[0]), source[1]])
                self._tf.addfile(info)
                return
            self._written.setdefault(inode, (parent, name))
        if fmt == stat.S_IFREG:
            info.type = tarfile.REGTYPE
            info.size = st.st_size
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as src:
                self._tf.addfile(info, src)
            return
        if fmt == stat.S_IFLNK:
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(name, dir_fd=dir_fd)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            info.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
            info.devmajor = os.major(st.st_rdev)
            info.devminor = os.minor(st.st_rdev)
        elif fmt == stat.S_IFIFO:
            info.type = tarfile.FIFOTYPE
        else:
            return  # sockets and unknown types are not representable
        self._tf.addfile(info)


def write_diff(lower: Path | None, upper: Path, out: BinaryIO | IO[bytes]) -> None:
    """Writes an OCI layer tar of the changes from ``lower`` to ``upper`` (walking differ).

    containerd ``archive.WriteDiff`` over continuity ``fs.Changes`` (double walk):

    * entries only in ``upper`` are added; entries only in ``lower`` become ``.wh.<name>``
      whiteouts (zero-size, mode 0, epoch mtime; a removed directory gives one whiteout);
      a type change is written as the new entry (the applier replaces the old one);
    * an entry present in both is unchanged when ``same_file`` says so: continuity's
      ``sameFile``, made stricter for a faithful round trip (all xattrs, directory mtimes
      and symlink targets are compared; the rule is in ``storage/_changes.py``, the walk
      merges use too);
    * all xattrs are recorded (continuity: only ``security.capability``), except
      ``security.selinux`` and overlayfs' own ``trusted.overlay.*``/``user.overlay.*``;
      mtimes keep nanoseconds as a PAX ``mtime`` record (containerd truncates to seconds);
    * the parent directories of every change are written once (containerd does the same),
      so their metadata and times are restored;
    * multiply-linked files are written once and then as tar hardlinks, pointing at an
      unchanged path with the same inode when there is one;
    * PAX format, sorted order (depth first, ``/`` before any other byte), uid/gid kept,
      no user/group names, no atime/ctime; sockets are skipped.

    Args:
        lower: The base tree, or ``None`` for "diff against empty".
        upper: The changed tree.
        out: Where the uncompressed tar goes (not closed).

    Raises:
        FailedPreconditionError: The trees cannot be read.
    """
    lower_str = None if lower is None else os.fspath(lower)
    upper_str = os.fspath(upper)
    try:
        lower_stack = None if lower is None else LayerStack((Path(lower),))
        with ChangeWalk(lower_stack, LayerStack((Path(upper),)), skip_sockets=True) as walk:
            # All changes first: an unchanged link met anywhere in the walk can then be the
            # target of an added link's tar hardlink.
            changes = list(walk)
            with tarfile.open(None, "w|", out, TAR_BUFSIZE, format=tarfile.PAX_FORMAT) as tf:
                writer = _DiffWriter(tf, walk)
                for change in changes:
                    writer.add(change)
    except RefcacheError:
        raise
    except OSError as exc:
        msg = f"cannot diff {lower_str or '<empty>'} -> {upper_str}: {exc}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFullError(msg) from exc
        raise FailedPreconditionError(msg) from exc
