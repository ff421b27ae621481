"""The cache root on disk: private permissions for everything refcache keeps there.

Layout (directories ``0700``, files holding metadata ``0600``)::

    <root>/             the cache root
      lock              flock: one writing process at a time
      meta/             the LMDB environment (data.mdb, lock.mdb)
      content/          blobs and ingests
      snapshots/        snapshot directories; each snapshot's own tree keeps its modes
                        (a rootfs is 0755, as containerd makes it), reachable only through
                        this private parent
      mounts/           temporary mount points (``Mountable.local()``, applier, differ)
      trash/            removed snapshot trees waiting for the background deletion
                        (``storage/_trash.py``); same file system as ``snapshots/``, so a
                        removal is one rename

Layers extracted as root keep set-id files and device nodes, as containerd does; the
private parents are what keeps other local users from reaching them (containerd keeps its
roots 0700 for the same reason). :func:`secure_root` makes a cache created by an older
version, or changed by hand, private again when it is opened for writing, and logs what it
changed. Read-only tools (``check``, ``du``) never change modes.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from pathlib import Path

from ._errors import PermissionDeniedError, RefcacheError

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "SUBDIRS",
    "access_error",
    "lock_held",
    "make_private_dir",
    "secure_root",
]

logger = logging.getLogger(__name__)

PRIVATE_DIR_MODE = 0o700  #: directories of the cache (nothing for group or others)
PRIVATE_FILE_MODE = 0o600  #: files holding metadata
SUBDIRS = ("meta", "content", "snapshots", "mounts", "trash")  #: the trees under the root
_PRIVATE_FILES = ("lock", "meta/data.mdb", "meta/lock.mdb")

_ACCESS_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def access_error(what: str, path: str | os.PathLike[str], exc: OSError) -> RefcacheError:
    """The refcache error for an ``OSError`` met while opening ``path``.

    ``EROFS``/``EACCES``/``EPERM`` become :class:`PermissionDeniedError` (one clear message
    naming the path); anything else a plain :class:`RefcacheError`.
    """
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EROFS:
        msg = f"{what} {os.fspath(path)}: the file system is read-only ({reason})"
        return PermissionDeniedError(msg)
    if exc.errno in _ACCESS_ERRNOS:
        msg = f"{what} {os.fspath(path)}: permission denied ({reason}; uid {os.geteuid()})"
        return PermissionDeniedError(msg)
    return RefcacheError(f"{what} {os.fspath(path)}: {reason}")


def make_private_dir(path: Path, *, parents: bool = False) -> None:
    """Creates ``path`` with mode ``0700`` if it does not exist (an existing one is kept).

    With ``parents``, missing ancestors are made with the default mode (they are not
    refcache's).
    """
    if parents:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError as exc:
            # pathlib says "File exists" when an ancestor is a regular file: say what it is.
            raise NotADirectoryError(
                errno.ENOTDIR, os.strerror(errno.ENOTDIR), exc.filename
            ) from exc
    try:
        os.mkdir(path, PRIVATE_DIR_MODE)
    except FileExistsError:
        return


def _tighten(path: Path, keep: int) -> str | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    mode = stat.S_IMODE(st.st_mode)
    if not mode & ~keep:
        return None
    new = mode & keep
    try:
        os.chmod(path, new)
    except OSError as exc:
        logger.warning("cannot make %s private (mode %04o): %s", path, mode, exc.strerror)
        return None
    return f"{path} {mode:04o} -> {new:04o}"


def secure_root(root: Path) -> list[str]:
    """Makes the cache root and the trees under it private; returns what was changed.

    Directories lose every group/other bit (``0700`` at most), the lock and the LMDB files
    every bit but the owner's read/write (``0600`` at most). A change is logged as a warning
    (it means the cache was reachable by other local users until now).
    """
    changed = [
        c
        for c in (
            _tighten(root, PRIVATE_DIR_MODE),
            *(_tighten(root / name, PRIVATE_DIR_MODE) for name in SUBDIRS),
            *(_tighten(root / name, PRIVATE_FILE_MODE) for name in _PRIVATE_FILES),
        )
        if c is not None
    ]
    if changed:
        logger.warning(
            "cache %s was open to other local users; permissions tightened: %s",
            root,
            "; ".join(changed),
        )
    return changed


def lock_held(root: Path) -> bool:
    """Whether some process holds the write lock (``<root>/lock``) of the cache at ``root``.

    A probe with a shared, non-blocking ``flock``: nothing is held after it returns. A
    missing or unreadable lock file means no writer.
    """
    try:
        fd = os.open(root / "lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False
