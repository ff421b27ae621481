"""The changes between two trees (continuity ``fs.Changes``): one walk for the differ and merges.

:class:`ChangeWalk` walks a lower and an upper tree side by side, depth first, the entries of
each directory in byte order of their names (so ``/`` sorts before every other byte, as in a
layer tar), and yields a :class:`Change` for every entry that was added, modified or
deleted. The walking differ (``storage/_difftar.py``) writes those changes as a layer tar; the
merge applier (``storage/_merge.py``) applies them to a new snapshot directory. Both therefore
carry exactly the same changes: a merge looks like unpacking the diffs as layers.

A side is a :class:`LayerStack`: a plain directory (a native snapshot, a mounted tree), or the
layer directories of an overlay snapshot stacked in userspace as the kernel would show them.

An entry present on both sides is unchanged when :func:`same_file` says so. Its rule is
continuity's ``sameFile``, made stricter where continuity loses information a layer can
carry:

* the same inode is unchanged;
* otherwise type and mode, uid, gid and rdev must be equal, and so must every extended
  attribute (continuity compares only ``security.capability``) except ``security.selinux``
  (a host's label) and overlayfs' own ``trusted.overlay.*``/``user.overlay.*``;
* directories: their mtimes must be equal to the nanosecond (continuity takes two directories
  as equal whatever their times);
* symlinks: their targets must be equal and so must their mtimes (continuity compares
  targets only when the mtimes were truncated);
* other files: equal size and mtime seconds; then, when both mtimes have zero nanoseconds (a
  tar round trip may have truncated them), equal contents, else equal nanoseconds. A file
  rewritten with the same size and the same nanosecond mtime is therefore unchanged
  (continuity's trade-off).

Everything is iterative and descriptor-based (``storage/_tree.py``): trees of any depth.
Memory grows with the number of directories, not with the number of files.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ._errors import InvalidError
from ._fscopy import read_xattrs
from ._tree import DirCursor, PathNode, list_entries, proc_path

__all__ = [
    "Change",
    "ChangeWalk",
    "LayerStack",
    "TreeDir",
    "same_content",
    "same_file",
]

_CHUNK = 1 << 20
_NS = 1_000_000_000
#: overlayfs marks a directory that hides everything below it with one of these (``y``).
_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")


# -- comparing two entries ------------------------------------------------------------------


def same_content(lower_fd: int, upper_fd: int, name: str) -> bool:
    """Whether the files ``name`` in the directories ``lower_fd`` and ``upper_fd`` hold the
    same bytes (read in chunks, never followed)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    fa = os.open(name, flags, dir_fd=lower_fd)
    try:
        fb = os.open(name, flags, dir_fd=upper_fd)
        try:
            offset = 0
            while True:
                ca = os.pread(fa, _CHUNK, offset)
                cb = os.pread(fb, _CHUNK, offset)
                if ca != cb:
                    return False
                if not ca:
                    return True
                offset += len(ca)
        finally:
            os.close(fb)
    finally:
        os.close(fa)


def same_file(
    lower_fd: int, upper_fd: int, name: str, lst: os.stat_result, ust: os.stat_result
) -> bool:
    """Whether ``name`` in the upper directory carries no change from the lower one.

    The rule is in the module docstring. ``lst``/``ust`` are the entries' lstat results.
    """
    if lst.st_dev == ust.st_dev and lst.st_ino == ust.st_ino:
        return True
    if (lst.st_mode, lst.st_uid, lst.st_gid, lst.st_rdev) != (
        ust.st_mode,
        ust.st_uid,
        ust.st_gid,
        ust.st_rdev,
    ):
        return False
    if read_xattrs(proc_path(lower_fd, name)) != read_xattrs(proc_path(upper_fd, name)):
        return False
    if stat.S_ISDIR(ust.st_mode):
        return lst.st_mtime_ns == ust.st_mtime_ns
    if lst.st_size != ust.st_size:
        return False
    if stat.S_ISLNK(ust.st_mode):
        return lst.st_mtime_ns == ust.st_mtime_ns and os.readlink(
            name, dir_fd=lower_fd
        ) == os.readlink(name, dir_fd=upper_fd)
    lsec, lns = divmod(lst.st_mtime_ns, _NS)
    usec, uns = divmod(ust.st_mtime_ns, _NS)
    if lsec != usec:
        return False
    if lns == 0 and uns == 0:
        # Both may have been truncated by a tar round trip: compare the bytes.
        if stat.S_ISREG(ust.st_mode) and ust.st_size > 0:
            return same_content(lower_fd, upper_fd, name)
        return True
    return lns == uns


# -- the two sides --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LayerStack:
    """One side of a walk: a directory tree, or overlay layer directories stacked.

    Attributes:
        layers: The directories, newest first (one for a plain tree).
        overlay: Stack them as overlayfs does: oldest first, a 0/0 character device deletes
            what is below it, an opaque directory (``trusted.overlay.opaque=y`` or
            ``user.overlay.opaque=y``) hides what is below it, anything else replaces it or
            (a directory over a directory) merges with it. Redirects (``redirect_dir``) are
            not followed; containerd and BuildKit do not turn them on.
    """

    layers: tuple[Path, ...]
    overlay: bool = False

    def __post_init__(self) -> None:
        if not self.layers:
            msg = "a layer stack needs at least one directory"
            raise InvalidError(msg)


class TreeDir(PathNode):
    """A directory of the upper tree met by a walk (positions are interned by name).

    Attributes:
        st: Its lstat in the upper (in the newest layer holding it).
        layer: That layer's index.
        layers: The upper layers whose entries make up its content, newest first.
        lower_layers: The same in the lower tree (empty: no directory there).
    """

    __slots__ = ("layer", "layers", "lower_layers", "st")

    def __init__(self, parent: PathNode | None = None, name: str = "") -> None:
        super().__init__(parent, name)
        self.st: os.stat_result | None = None
        self.layer = 0
        self.layers: tuple[int, ...] = ()
        self.lower_layers: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Change:
    """One changed entry of the upper tree.

    Attributes:
        parent: The upper directory holding it.
        name: Its name there.
        st: Its lstat in the upper; ``None`` when it was deleted (a deleted directory is one
            change, its subtree implied).
        layer: The upper layer holding it (for :meth:`ChangeWalk.upper_fd`).
    """

    parent: TreeDir
    name: str
    st: os.stat_result | None
    layer: int = 0


#: A directory's merged entries: name -> (lstat, layer holding it, layers of its content
#: when it is a directory, else ()).
_Entries = dict[str, tuple[os.stat_result, int, tuple[int, ...]]]


class _Side:
    """The open cursors of one :class:`LayerStack` during one walk (one per layer)."""

    def __init__(self, stack: LayerStack, top: TreeDir) -> None:
        self.stack = stack
        self._top = top
        self._cursors: dict[int, DirCursor] = {}

    def at(self, node: PathNode, layer: int) -> int:
        """The descriptor of directory ``node`` in ``layer``; valid until that layer's
        cursor moves again."""
        cursor = self._cursors.get(layer)
        if cursor is None:
            cursor = self._cursors[layer] = DirCursor.open(self.stack.layers[layer], self._top)
        cursor.goto(node)
        return cursor.fd

    def root(self) -> tuple[os.stat_result, tuple[int, ...]]:
        """The lstat of the newest layer's top and the layers of the top's content."""
        self.at(self._top, 0)
        return self._cursors[0].stat(), tuple(range(len(self.stack.layers)))

    def entries(self, node: TreeDir, layers: Sequence[int]) -> _Entries:
        """The entries of directory ``node`` as the stack shows them."""
        overlay = self.stack.overlay
        out: _Entries = {}
        if len(layers) == 1:
            layer = layers[0]
            for entry in list_entries(self.at(node, layer)):
                est = entry.stat(follow_symlinks=False)
                if overlay and _is_whiteout(est):
                    continue
                out[entry.name] = (est, layer, (layer,) if stat.S_ISDIR(est.st_mode) else ())
            return out
        found: dict[str, list[tuple[int, os.stat_result]]] = {}
        for layer in layers:
            for entry in list_entries(self.at(node, layer)):
                found.setdefault(entry.name, []).append((layer, entry.stat(follow_symlinks=False)))
        for name, stack in found.items():
            layer, est = stack[0]
            if overlay and _is_whiteout(est):
                continue
            if not stat.S_ISDIR(est.st_mode):
                out[name] = (est, layer, ())
                continue
            below: list[int] = []
            for index, (lyr, lst) in enumerate(stack):
                if not stat.S_ISDIR(lst.st_mode):
                    break  # a whiteout or a file hides what is below it
                below.append(lyr)
                if overlay and index + 1 < len(stack) and self._opaque(node, lyr, name):
                    break
            out[name] = (est, layer, tuple(below))
        return out

    def _opaque(self, node: TreeDir, layer: int, name: str) -> bool:
        path = proc_path(self.at(node, layer), name)
        for attr in _OPAQUE_XATTRS:
            try:
                if os.getxattr(path, attr, follow_symlinks=False) == b"y":
                    return True
            except OSError:
                continue
        return False

    def close(self) -> None:
        for cursor in self._cursors.values():
            cursor.close()
        self._cursors.clear()


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


# -- the walk -------------------------------------------------------------------------------


class ChangeWalk:
    """The changes from ``lower`` to ``upper``, in path order (the top itself excluded).

    Iterate it once, inside ``with``: cursors are opened as the walk goes and closed at the
    end. While iterating, :meth:`upper_fd` reaches the upper's real files (to copy, link or
    archive a change).

    Args:
        lower: The base, or ``None`` (everything in ``upper`` is added).
        upper: The changed tree, or ``None`` (everything in ``lower`` is deleted).
        skip_sockets: Treat sockets in the upper as absent (a layer tar cannot carry them;
            containerd's differ skips them).

    Attributes:
        top: The upper's top directory (the root of every :class:`Change` parent chain).
        unchanged_links: ``(st_dev, st_ino) -> (directory, name)`` of unchanged upper files
            with more than one link, met so far (continuity reports them so that an added
            link to the same inode can be written as a tar hardlink).
    """

    def __init__(
        self, lower: LayerStack | None, upper: LayerStack | None, *, skip_sockets: bool = False
    ) -> None:
        self.top = TreeDir()
        self.unchanged_links: dict[tuple[int, int], tuple[TreeDir, str]] = {}
        self._lower = None if lower is None else _Side(lower, self.top)
        self._upper = None if upper is None else _Side(upper, self.top)
        self._same = lower is not None and lower is upper
        self._skip_sockets = skip_sockets

    def upper_fd(self, node: PathNode, layer: int = 0) -> int:
        """The descriptor of the upper's directory ``node`` in ``layer`` (a change's
        ``parent`` and ``layer``); valid until the walk resumes."""
        assert self._upper is not None
        return self._upper.at(node, layer)

    def __iter__(self) -> Iterator[Change]:
        if self._same:
            return  # a tree has no changes from itself
        lower, upper = self._lower, self._upper
        if upper is None:
            if lower is not None:
                _, layers = lower.root()
                for name in sorted(lower.entries(self.top, layers), key=os.fsencode):
                    yield Change(self.top, name, None)
            return
        self.top.st, self.top.layers = upper.root()
        if lower is not None:
            self.top.lower_layers = lower.root()[1]
        pending: list[TreeDir | Change] = [self.top]
        while pending:
            item = pending.pop()
            if isinstance(item, Change):
                yield item
                continue
            pending.extend(reversed(self._scan(item, lower, upper)))

    def _scan(self, node: TreeDir, lower: _Side | None, upper: _Side) -> list[TreeDir | Change]:
        """The changes directly in ``node``, each followed by its subdirectory to scan."""
        uentries = upper.entries(node, node.layers)
        if self._skip_sockets:
            uentries = {n: e for n, e in uentries.items() if not stat.S_ISSOCK(e[0].st_mode)}
        lentries: _Entries = {}
        if lower is not None and node.lower_layers:
            lentries = lower.entries(node, node.lower_layers)
        events: list[TreeDir | Change] = []
        for name in sorted(lentries.keys() | uentries.keys(), key=os.fsencode):
            uentry = uentries.get(name)
            if uentry is None:
                events.append(Change(node, name, None))  # a removed dir implies its subtree
                continue
            ust, ulayer, ulayers = uentry
            lentry = lentries.get(name)
            if lentry is None:
                events.append(Change(node, name, ust, ulayer))
                if ulayers:
                    events.append(_subdir(node, name, uentry, ()))
                continue
            assert lower is not None
            lst, llayer, llayers = lentry
            lfd = lower.at(node, llayer)
            if not same_file(lfd, upper.at(node, ulayer), name, lst, ust):
                events.append(Change(node, name, ust, ulayer))
            elif not ulayers and ust.st_nlink > 1:
                self.unchanged_links.setdefault((ust.st_dev, ust.st_ino), (node, name))
            if ulayers:
                # A file replaced by a directory: everything below is added (no lower layers).
                events.append(_subdir(node, name, uentry, llayers))
        return events

    def close(self) -> None:
        """Closes the cursors (idempotent)."""
        for side in (self._lower, self._upper):
            if side is not None:
                side.close()

    def __enter__(self) -> ChangeWalk:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _subdir(
    parent: TreeDir,
    name: str,
    entry: tuple[os.stat_result, int, tuple[int, ...]],
    lower_layers: tuple[int, ...],
) -> TreeDir:
    node = parent.child(name)
    assert isinstance(node, TreeDir)
    node.st, node.layer, node.layers = entry
    node.lower_layers = lower_layers
    return node
