"""Walking, removing and measuring directory trees of any depth, one descriptor at a time.

A layer decides the shape of the trees refcache stores, so every walk over a snapshot (or
over a staging, trash or mount directory that may hold one) must cope with any depth:

* no recursion (Python's limit is about 1,000 frames; ``shutil.rmtree``, ``os.walk`` and
  ``os.fwalk`` of Python 3.11 recurse);
* no path longer than ``PATH_MAX``: a tree 10,000 directories deep has paths of 20,000
  bytes and more, which no system call accepts. Everything below the top is reached
  relative to a directory descriptor (``openat``-style ``dir_fd=`` calls), one component
  at a time;
* no descriptor per level: a :class:`DirCursor` holds the top of the walk and the directory
  it is in, and climbs back with ``openat(fd, "..")``, checked against the device and inode
  it recorded on the way down (a directory moved meanwhile is found again from the top by
  name, or reported as ``ESTALE``);
* no memory quadratic in the depth: positions are :class:`PathNode` chains (a parent link
  and a name each), never tuples or strings of the whole path.

Extended attributes have no ``*at`` system calls in Python; they are read through
``/proc/self/fd/<dir fd>/<name>`` (see :func:`proc_path`), a short path whatever the depth.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

__all__ = [
    "DIR_FLAGS",
    "DirCursor",
    "PathNode",
    "display_path",
    "fsync_dir",
    "fsync_tree_dirs",
    "list_entries",
    "node_parts",
    "post_order",
    "proc_path",
    "remove_tree",
    "subdirs",
    "walk_dirs",
]

#: Flags of every directory descriptor a walk opens: never follow a symlink into a directory.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_SHOWN = 160  # characters of a long path kept at each end in messages


class _Position(Protocol):
    """What :meth:`DirCursor.goto` needs of a node: a parent link, a name and a depth."""

    @property
    def parent(self) -> _Position | None: ...

    @property
    def name(self) -> str: ...

    @property
    def depth(self) -> int: ...


class PathNode:
    """A directory position in a tree: its parent, its name, its depth (the top is 0).

    Children are interned (:meth:`child` returns the same node for the same name), so a
    node's identity stands for its path, and memory grows with the number of directories,
    not with their depth.
    """

    __slots__ = ("children", "depth", "name", "parent")

    def __init__(self, parent: PathNode | None = None, name: str = "") -> None:
        self.parent = parent
        self.name = name
        self.depth: int = 0 if parent is None else parent.depth + 1
        self.children: dict[str, PathNode] | None = None

    def child(self, name: str) -> PathNode:
        """The node of ``name`` below this one (created once, then the same object)."""
        children = self.children
        if children is None:
            children = self.children = {}
        node = children.get(name)
        if node is None:
            node = children[name] = type(self)(self, name)
        return node

    def parts(self) -> list[str]:
        """The names from the top down to this node (empty for the top)."""
        return node_parts(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({display_path('', node_parts(self))!r})"


def node_parts(node: _Position) -> list[str]:
    """The names from the top down to ``node``, without recursion."""
    out: list[str] = []
    current: _Position | None = node
    while current is not None and current.parent is not None:
        out.append(current.name)
        current = current.parent
    out.reverse()
    return out


def display_path(top: str | os.PathLike[str], parts: list[str]) -> str:
    """``top/part/...`` for messages, shortened in the middle when it is very long."""
    text = os.path.join(os.fspath(top), *parts) if parts else os.fspath(top)
    if len(text) <= 2 * _SHOWN + 20:
        return text
    return f"{text[:_SHOWN]}...({len(parts)} levels)...{text[-_SHOWN:]}"


def proc_path(dir_fd: int, name: str = "") -> str:
    """A short path naming ``name`` in the directory ``dir_fd`` (for the ``*xattr`` calls).

    The magic link ``/proc/self/fd/<fd>`` is an intermediate component (always followed, to
    exactly that directory); ``name`` is the last component, so ``follow_symlinks=False``
    applies to it.
    """
    base = f"/proc/self/fd/{dir_fd}"
    return f"{base}/{name}" if name else base


class DirCursor:
    """One open directory that moves through a tree: down by name, up by ``..``.

    Holds two descriptors whatever the depth: the top of the walk and the current
    directory. :meth:`down` opens a child with ``O_NOFOLLOW`` (a symlink is never entered);
    :meth:`up` opens ``..`` and checks it is the directory recorded on the way down (same
    device and inode); when it is not (the directory was moved meanwhile), the parent is
    found again from the top by name, and if that fails too ``OSError(ESTALE)`` is raised.

    With nodes (objects with ``parent``, ``name`` and ``depth``, such as :class:`PathNode`)
    :meth:`goto` moves to any position through the nearest common ancestor, so visiting
    positions in depth-first order costs about as many moves as the walk itself.

    Args:
        fd: An open descriptor of the top directory.
        node: The node standing for the top (depth 0), when :meth:`goto` is used.
        own: Close ``fd`` when the cursor closes (``False`` for a borrowed descriptor).
    """

    __slots__ = ("_fd", "_own_top", "_stack", "_top")

    def __init__(self, fd: int, node: _Position | None = None, *, own: bool = True) -> None:
        st = os.fstat(fd)
        self._top = fd
        self._own_top = own
        self._fd = fd
        # (node, name, st_dev, st_ino) of every level from the top down to the current one.
        self._stack: list[tuple[_Position | None, str, int, int]] = [
            (node, "", st.st_dev, st.st_ino)
        ]

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        node: _Position | None = None,
        *,
        dir_fd: int | None = None,
    ) -> DirCursor:
        """Opens ``path`` (a directory, never through a final symlink) as the top of a walk."""
        fd = os.open(path, DIR_FLAGS, dir_fd=dir_fd)
        try:
            return cls(fd, node)
        except BaseException:
            os.close(fd)
            raise

    # -- state --------------------------------------------------------------------------------

    @property
    def fd(self) -> int:
        """The descriptor of the current directory (valid until the cursor moves)."""
        return self._fd

    @property
    def top_fd(self) -> int:
        """The descriptor of the top directory."""
        return self._top

    @property
    def depth(self) -> int:
        """Levels below the top (0 at the top)."""
        return len(self._stack) - 1

    @property
    def node(self) -> _Position | None:
        """The node of the current directory (``None`` when moved without nodes)."""
        return self._stack[-1][0]

    @property
    def name(self) -> str:
        """The name of the current directory in its parent (``""`` at the top)."""
        return self._stack[-1][1]

    def names(self) -> list[str]:
        """The names from the top down to the current directory (for messages)."""
        return [entry[1] for entry in self._stack[1:]]

    def stat(self) -> os.stat_result:
        """``fstat`` of the current directory."""
        return os.fstat(self._fd)

    # -- moving -------------------------------------------------------------------------------

    def _set(self, fd: int) -> None:
        old = self._fd
        self._fd = fd
        if old != self._top:
            os.close(old)

    def down(self, name: str, node: _Position | None = None) -> os.stat_result:
        """Enters the child directory ``name``; returns its ``fstat``.

        Raises:
            FileNotFoundError: No such entry.
            NotADirectoryError: ``name`` is not a directory (``ELOOP`` for a symlink is
                reported as this too).
            OSError: Any other failure; the cursor stays where it was.
        """
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=self._fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise NotADirectoryError(
                    errno.ENOTDIR, "not a directory (a symlink)", name
                ) from exc
            raise
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self._set(fd)
        self._stack.append((node, name, st.st_dev, st.st_ino))
        return st

    def up(self) -> None:
        """Returns to the parent directory.

        Raises:
            ValueError: Already at the top.
            OSError: ``ESTALE`` when the parent can be found neither by ``..`` nor by name.
        """
        if len(self._stack) == 1:
            msg = "the cursor is at the top of its walk"
            raise ValueError(msg)
        if len(self._stack) == 2:
            self._set(self._top)
            self._stack.pop()
            return
        _, _, dev, ino = self._stack[-2]
        fd = -1
        with contextlib.suppress(OSError):
            fd = os.open("..", DIR_FLAGS, dir_fd=self._fd)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (dev, ino):
                os.close(fd)
                fd = -1
        if fd < 0:
            fd = self._refind(len(self._stack) - 2)
        self._set(fd)
        self._stack.pop()

    def _refind(self, level: int) -> int:
        """Opens the directory of ``self._stack[level]`` again, from the top by name."""
        fd = os.dup(self._top)
        try:
            for _, name, _, _ in self._stack[1 : level + 1]:
                nxt = os.open(name, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise OSError(errno.ESTALE, "a directory moved while it was walked") from exc
        _, _, dev, ino = self._stack[level]
        if (st.st_dev, st.st_ino) != (dev, ino):
            os.close(fd)
            raise OSError(errno.ESTALE, "a directory moved while it was walked")
        return fd

    def top(self) -> None:
        """Returns to the top directory."""
        if len(self._stack) > 1:
            self._set(self._top)
            del self._stack[1:]

    def goto(self, node: _Position) -> None:
        """Moves to ``node`` (through the nearest common ancestor of where it is).

        The cursor must have been moved with nodes only, and ``node`` must descend from the
        top node. On failure it stays at the deepest directory it reached on the way.

        Raises:
            FileNotFoundError / NotADirectoryError: A directory on the way is missing or is
                not a directory (any more).
        """
        current = self._stack[-1][0]
        if current is node:
            return
        if current is None:
            msg = "goto needs a cursor moved with nodes only"
            raise ValueError(msg)
        downs: list[_Position] = []
        target: _Position | None = node
        while target is not None and target.depth > current.depth:
            downs.append(target)
            target = target.parent
        while current.depth > (target.depth if target is not None else 0):
            self.up()
            current = self._stack[-1][0]
            assert current is not None
        while current is not target:
            if target is None or len(self._stack) == 1:
                msg = f"{node!r} is not below the top of this walk"
                raise ValueError(msg)
            self.up()
            current = self._stack[-1][0]
            assert current is not None
            downs.append(target)
            target = target.parent
        for step in reversed(downs):
            self.down(step.name, step)

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the cursor's descriptors (the top too unless it was borrowed). Idempotent."""
        if self._fd < 0:
            return
        if self._fd != self._top:
            os.close(self._fd)
        if self._own_top:
            os.close(self._top)
        self._fd = self._top = -1

    def __enter__(self) -> DirCursor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def list_entries(dir_fd: int) -> list[os.DirEntry[str]]:
    """The entries of the directory ``dir_fd`` (``DirEntry.stat`` works relative to it)."""
    # scandir duplicates the descriptor and rewinds it when closed: the caller's fd keeps
    # its own offset, and listing the same directory twice works.
    with os.scandir(dir_fd) as it:
        return list(it)


def _lstat_at(dir_fd: int | None, path: str | os.PathLike[str]) -> os.stat_result | None:
    try:
        return os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _unlink_entries(cursor: DirCursor) -> list[str]:
    """Unlinks every non-directory in the cursor's directory; returns the subdirectories."""
    fd = cursor.fd
    subdirs: list[str] = []
    retried = False
    while True:
        try:
            for entry in list_entries(fd):
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.name)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.name, dir_fd=fd)
            return subdirs
        except PermissionError:
            # A read-only directory of a layer (as a non-root owner): make it ours to empty.
            if retried:
                raise
            retried = True
            subdirs.clear()
            os.fchmod(fd, 0o700)


def _enter(cursor: DirCursor, name: str, dev: int) -> bool:
    """Enters ``name`` for removal; ``False`` when it is gone or no directory any more."""
    for attempt in range(2):
        try:
            st = cursor.down(name)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except PermissionError:
            if attempt:
                raise
            # Not a symlink (that would have been ELOOP): a directory we may not search.
            os.chmod(name, 0o700, dir_fd=cursor.fd)
            continue
        if st.st_dev != dev:
            cursor.up()
            raise OSError(errno.EBUSY, "a mount point is in the way of a tree removal", name)
        return True
    return False


def remove_tree(
    path: str | os.PathLike[str],
    *,
    dir_fd: int | None = None,
    stop: threading.Event | None = None,
) -> bool:
    """Removes ``path`` (a file, a symlink or a whole directory tree), without recursion.

    Iterative and descriptor-based (see the module docstring): trees of any depth go, with
    two descriptors open. Directories a non-root owner cannot write are made writable
    first. A missing ``path`` is not an error. Another file system mounted inside the tree
    is never entered (``EBUSY``): removal must not reach through a stale mount.

    Args:
        path: What to remove (relative to ``dir_fd`` when given).
        dir_fd: Directory ``path`` is relative to.
        stop: Checked before each directory is entered: once set, the removal stops with
            :class:`InterruptedError`, leaving the rest of the tree where it is (the
            trash's worker stops this way when its cache closes).

    Returns:
        Whether something was removed.

    Raises:
        InterruptedError: ``stop`` was set.
        OSError: A part of the tree could not be removed (the rest may be gone already).
    """
    st = _lstat_at(dir_fd, path)
    if st is None:
        return False
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path, dir_fd=dir_fd)
        return True
    try:
        cursor = DirCursor.open(path, dir_fd=dir_fd)
    except PermissionError:
        os.chmod(path, 0o700, dir_fd=dir_fd)
        cursor = DirCursor.open(path, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    with cursor:
        dev = cursor.stat().st_dev
        pending: list[list[str]] = [_unlink_entries(cursor)]
        while pending:
            if pending[-1]:
                if stop is not None and stop.is_set():
                    raise InterruptedError(errno.EINTR, "tree removal stopped", os.fspath(path))
                name = pending[-1].pop()
                if not _enter(cursor, name, dev):
                    with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                        os.unlink(name, dir_fd=cursor.fd)
                    continue
                pending.append(_unlink_entries(cursor))
                continue
            pending.pop()
            if cursor.depth:
                name = cursor.name
                cursor.up()
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(name, dir_fd=cursor.fd)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path, dir_fd=dir_fd)
    return True


def subdirs(dir_fd: int) -> list[str]:
    """The names of the subdirectories (never symlinks) of the directory ``dir_fd``."""
    return [e.name for e in list_entries(dir_fd) if e.is_dir(follow_symlinks=False)]


def walk_dirs(cursor: DirCursor, scan: Callable[[int], list[str]] = subdirs) -> Iterator[int]:
    """Visits every directory below the cursor's position, depth first (post-order).

    Yields the descriptor of each directory once all of its subdirectories were visited
    (the starting directory last). The cursor moves; the descriptor is valid until the
    generator is resumed. A subdirectory that is gone, or no directory any more, when the
    walk reaches it is skipped.

    Args:
        cursor: Where the walk starts.
        scan: Lists the subdirectories to visit of a directory (by descriptor), once per
            directory, before they are visited; it may look at the other entries on the way.
    """
    start = cursor.depth
    pending: list[list[str]] = [scan(cursor.fd)]
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
        yield cursor.fd
        if cursor.depth > start:
            cursor.up()


def post_order(top: PathNode) -> list[PathNode]:
    """Every node of a :class:`PathNode` trie, children before their parent (iterative)."""
    out: list[PathNode] = []
    stack: list[tuple[PathNode, bool]] = [(top, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded or not node.children:
            out.append(node)
            continue
        stack.append((node, True))
        stack.extend((child, False) for child in node.children.values())
    return out


def fsync_tree_dirs(path: str | os.PathLike[str]) -> None:
    """fsyncs every directory of the tree ``path`` (children first), iteratively."""
    with DirCursor.open(path) as cursor:
        for fd in walk_dirs(cursor):
            os.fsync(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsyncs the directory ``path``: a rename or unlink in it is then durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
