"""BuildKit's merge applier (``snapshot/diffapply_linux.go``): a hardlink farm of diffs.

:func:`merge_into` applies diffs, in order, to an empty directory: each ``(lower, upper)``
pair of :class:`~._changes.LayerStack` is walked by :class:`~._changes.ChangeWalk` (the
walk the differ uses, so a merge looks like unpacking the diffs as layers), and every change
is applied as BuildKit's ``diffApply`` does with cross-snapshot links:

* a deletion removes the path; an entry that exists and is not a directory being merged with
  a directory is removed before it is replaced;
* the parent directories of every change are created first, with the upper's metadata
  (``checkParent``);
* files, symlinks and devices are hardlinked from the upper's real file
  (``tryCrossSnapshotLink``); on ``EXDEV``, ``EMLINK``, ``EPERM`` or ``EACCES`` they are
  copied, and files with several links inside one diff are linked to their first copy;
* directories are created (or kept), their owner, mode and xattrs set, and their times set
  last, children first (BuildKit's ``Flush``).

The usage of the result counts only inodes that are not hardlinked from the inputs
(BuildKit's merge usage). Works through directory cursors: targets of any depth.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from ._changes import ChangeWalk, LayerStack, TreeDir
from ._fscopy import copy_file_at, copy_metadata_at, disk_usage, make_special_at
from ._tree import DirCursor, PathNode, post_order, remove_tree
from ._types import Usage

__all__ = ["merge_into"]

#: Link failures that mean "copy instead": across file systems, past the link limit, or a
#: file we do not own (``protected_hardlinks``).
_COPY_ERRNOS = (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.EACCES)


def merge_into(target: Path, diffs: Sequence[tuple[LayerStack | None, LayerStack | None]]) -> Usage:
    """Applies each ``(lower, upper)`` diff in order to the empty directory ``target``.

    ``(None, upper)`` adds all of ``upper``; ``(lower, None)`` deletes all of ``lower``.

    Returns:
        The usage of ``target`` without the inodes hardlinked from the inputs.

    Raises:
        OSError: A file-system failure (the caller discards ``target``).
    """
    applier = _Applier(target)
    try:
        for lower, upper in diffs:
            applier.apply(lower, upper)
        applier.flush()
    finally:
        applier.close()
    return disk_usage(target, exclude=applier.linked)


class _Applier:
    """The state of one merge: the target's cursors, what was linked, deferred dir times."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.top = PathNode()
        self.cursor = DirCursor.open(root, self.top)
        self._link_cursor: DirCursor | None = None
        #: Inodes hardlinked from the inputs (left out of the usage).
        self.linked: set[tuple[int, int]] = set()
        self.dir_times: dict[PathNode, tuple[int, int]] = {}

    def close(self) -> None:
        self.cursor.close()
        if self._link_cursor is not None:
            self._link_cursor.close()

    def apply(self, lower: LayerStack | None, upper: LayerStack | None) -> None:
        """Applies the changes from ``lower`` to ``upper``."""
        visited: set[TreeDir] = set()
        copies: dict[tuple[int, int], tuple[PathNode, str]] = {}  # keep hardlinks of one diff
        memo: dict[TreeDir, PathNode] = {}
        with ChangeWalk(lower, upper) as walk:
            for change in walk:
                if change.st is None:
                    try:
                        self.cursor.goto(self._tnode(change.parent, memo))
                    except (FileNotFoundError, NotADirectoryError):
                        continue  # nothing there to delete
                    remove_tree(change.name, dir_fd=self.cursor.fd)
                    continue
                self._check_parents(walk, change.parent, visited, memo)
                self._apply_one(
                    walk, change.parent, change.name, change.st, change.layer, copies, memo
                )
                if stat.S_ISDIR(change.st.st_mode):
                    child = change.parent.child(change.name)
                    assert isinstance(child, TreeDir)
                    visited.add(child)

    def _tnode(self, node: TreeDir, memo: dict[TreeDir, PathNode]) -> PathNode:
        """The target position of the upper's directory ``node`` (iterative)."""
        chain: list[TreeDir] = []
        current: PathNode | None = node
        found: PathNode | None = None
        while isinstance(current, TreeDir) and current.parent is not None:
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

    def _check_parents(
        self,
        walk: ChangeWalk,
        parent: TreeDir,
        visited: set[TreeDir],
        memo: dict[TreeDir, PathNode],
    ) -> None:
        # BuildKit checkParent: make each parent dir exist with the upper's metadata first.
        chain: list[TreeDir] = []
        current: PathNode | None = parent
        while isinstance(current, TreeDir) and current.parent is not None:
            if current in visited:
                break
            chain.append(current)
            current = current.parent
        for step in reversed(chain):
            visited.add(step)
            holder = step.parent
            assert isinstance(holder, TreeDir)
            assert step.st is not None
            self._apply_one(walk, holder, step.name, step.st, step.layer, {}, memo)

    def _apply_one(
        self,
        walk: ChangeWalk,
        parent: TreeDir,
        name: str,
        st: os.stat_result,
        layer: int,
        copies: dict[tuple[int, int], tuple[PathNode, str]],
        memo: dict[TreeDir, PathNode],
    ) -> None:
        tparent = self._tnode(parent, memo)
        self.cursor.goto(tparent)
        dfd = self.cursor.fd
        is_dir = stat.S_ISDIR(st.st_mode)
        try:
            dst_st: os.stat_result | None = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            dst_st = None
        if dst_st is not None and not (is_dir and stat.S_ISDIR(dst_st.st_mode)):
            remove_tree(name, dir_fd=dfd)
            dst_st = None
        sfd = walk.upper_fd(parent, layer)
        if is_dir:
            if dst_st is None:
                os.mkdir(name, 0o700, dir_fd=dfd)
            copy_metadata_at(sfd, name, dfd, name, st, times=False, skip_overlay=True)
            self.dir_times[tparent.child(name)] = (st.st_atime_ns, st.st_mtime_ns)
            return
        ino = (st.st_dev, st.st_ino)
        if not (stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode)):
            try:
                os.link(name, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _COPY_ERRNOS:
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
            copy_file_at(sfd, name, dfd, name, st)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
        elif not make_special_at(dfd, name, st):
            return
        copies[ino] = (tparent, name)
        copy_metadata_at(sfd, name, dfd, name, st, skip_overlay=True)

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
