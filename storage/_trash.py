"""The trash: trees that metadata has forgotten, deleted by one background thread.

Deleting a snapshot's tree takes a system call per file and per directory (an empty
directory alone is a journal write), so it must not run while the metadata write lock is
held, nor inside the call that forgot the snapshot (a prune of thousands of records would
wait for thousands of deletions). A removed tree is *renamed* into ``<root>/trash/`` inside
the write transaction that forgets it (one ``rename``: same file system, atomic), and
:class:`Trash`'s worker deletes it later.

Names in the trash (``0700``, next to ``snapshots/``):

* ``<id>``: the directory of removed snapshot ``<id>`` (ids are never reused once
  committed, so the name is unique). Until the removing transaction commits it is *in
  flight*: the worker never sees it (it is queued only after the commit), a rollback
  renames it back, and if the process dies before the commit the next open finds a trash
  entry whose snapshot is still recorded and renames it back
  (:meth:`~storage._snapshotter.BaseSnapshotter.cleanup`).
* ``x-<name>.<hex>``: anything else thrown away, such as a leftover ``new-*`` build or an
  orphan directory found at open; never renamed back.

The worker is one daemon thread per :class:`Trash`, started when work is queued and
leaving after a second without work. It deletes one entry at a time with
:func:`~storage._tree.remove_tree` (iterative, descriptor-based: any depth), and checks
between directories whether it must stop. :meth:`Trash.close` stops it: whatever is left
stays in the trash and the next open queues it again (:meth:`Trash.resume`), so nothing is
lost and nothing waits for a big tree. An entry that cannot be deleted (a mount in the way,
a file system error) is logged and left for the next open.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ._fscopy import disk_usage
from ._layout import make_private_dir
from ._tree import remove_tree

__all__ = ["TRASH_DIR", "Trash", "TrashUsage", "trash_usage"]

logger = logging.getLogger(__name__)

TRASH_DIR = "trash"  #: the trash under a cache root
_IDLE_S = 1.0  # a worker without work leaves after this long (a new one starts on demand)
# The worker waits until nothing was added for this long: while a garbage collection is
# moving thousands of trees in, deleting them would compete with it (and with the ref
# operations) for the interpreter and the disk; it catches up once the sweep is over.
_SETTLE_S = 0.2
_NICE = 10  # the worker thread's scheduling niceness (Linux: per thread), best effort


@dataclass(frozen=True, slots=True)
class TrashUsage:
    """What waits in a trash for deletion.

    Attributes:
        entries: Trees (or files) in the trash.
        bytes: Their disk usage, measured as a snapshot's is (allocated blocks, each
            inode once).
    """

    entries: int = 0
    bytes: int = 0


def trash_usage(root: str | os.PathLike[str]) -> TrashUsage:
    """Entries and bytes waiting in the trash of the cache at ``root`` (read-only)."""
    path = Path(root) / TRASH_DIR
    try:
        names = os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return TrashUsage()
    size = 0
    for name in names:
        with contextlib.suppress(OSError):  # deleted meanwhile by the worker
            size += disk_usage(path / name).size
    return TrashUsage(entries=len(names), bytes=size)


class Trash:
    """The trash directory of a cache root and its deleting worker.

    Thread-safe. :meth:`move_in` renames something into the trash; :meth:`add` queues
    entries for deletion (only what the metadata has forgotten for good: after the commit).

    Args:
        root: The cache root; the trash is ``root/trash``.
        create: Create the directory (``0700``) if it is missing.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = Path(root) / TRASH_DIR
        if create:
            make_private_dir(self.path, parents=True)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._busy: str | None = None
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self._last_add = 0.0
        #: Entries deleted by the worker since this object was made (for statistics).
        self.deleted = 0

    def __repr__(self) -> str:
        return f"Trash({str(self.path)!r})"

    # -- putting things in ----------------------------------------------------------------

    def move_in(self, src: str | os.PathLike[str], name: str) -> Path:
        """Renames ``src`` to ``trash/<name>`` (nothing is queued: see :meth:`add`).

        Raises:
            FileNotFoundError: ``src`` does not exist.
            OSError: The rename failed (for instance the trash is on another file system).
        """
        dst = self.path / name
        os.rename(src, dst)
        return dst

    def throw_away(self, src: str | os.PathLike[str]) -> Path | None:
        """Moves ``src`` into the trash under a fresh ``x-`` name and queues it.

        Returns the new path, or ``None`` when ``src`` was gone already.

        Raises:
            OSError: The rename failed for another reason.
        """
        name = f"x-{os.path.basename(os.fspath(src))}.{secrets.token_hex(4)}"
        try:
            dst = self.move_in(src, name)
        except FileNotFoundError:
            return None
        self.add(name)
        return dst

    def add(self, *names: str) -> None:
        """Queues trash entries for deletion and makes sure the worker runs.

        Ignored once the trash is closed (the entries stay, the next open resumes them).
        """
        with self._lock:
            if self._closed:
                return
            was_empty = not self._queue
            for name in names:
                if name not in self._queued and name != self._busy:
                    self._queued.add(name)
                    self._queue.append(name)
            if not self._queue:
                return
            self._last_add = time.monotonic()
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._run, name=f"refcache-trash {self.path}", daemon=True
                )
                self._worker.start()
            elif was_empty:
                # Only a worker waiting for work needs waking; one settling (waiting for
                # the adds to stop) looks at the time of the last add when its wait ends.
                # Waking it on every add of a sweep would cost a thread switch each.
                self._changed.notify_all()

    def entries(self) -> list[str]:
        """The names in the trash directory now (sorted)."""
        try:
            return sorted(os.listdir(self.path))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def resume(self, skip: Iterable[str] = ()) -> list[str]:
        """Queues every entry of the trash directory except ``skip``; returns them.

        Called when a cache opens: what a process that died (or closed with work left)
        left behind is deleted in the background, and opening does not wait for it.
        """
        skipped = set(skip)
        names = [n for n in self.entries() if n not in skipped]
        if names:
            self.add(*names)
        return names

    # -- waiting and stopping -------------------------------------------------------------

    def pending(self) -> int:
        """Entries queued or being deleted now."""
        with self._lock:
            return len(self._queue) + (self._busy is not None)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Waits until nothing is queued or being deleted; returns whether that happened."""
        with self._lock:
            return self._changed.wait_for(
                lambda: not self._queue and self._busy is None, timeout=timeout
            )

    def close(self, timeout: float = 10.0) -> bool:
        """Stops the worker after the directory it is in; returns whether it stopped in time.

        What is not deleted yet stays in the trash for the next open. Idempotent.
        """
        with self._lock:
            self._closed = True
            self._stop.set()
            self._queue.clear()
            self._queued.clear()
            self._changed.notify_all()
            worker = self._worker
        if worker is None or worker is threading.current_thread():
            return True
        worker.join(timeout)
        if worker.is_alive():
            logger.warning(
                "trash %s: the deleting thread did not stop within %.1fs; what is left is "
                "deleted at the next open",
                self.path,
                timeout,
            )
            return False
        return True

    # -- the worker -----------------------------------------------------------------------

    def _next(self) -> str | None:
        with self._lock:
            self._busy = None
            self._changed.notify_all()
            while not self._queue and not self._stop.is_set():
                if not self._changed.wait(_IDLE_S) and not self._queue:
                    break
            while not self._stop.is_set():
                quiet = self._last_add + _SETTLE_S - time.monotonic()
                if quiet <= 0:
                    break
                self._changed.wait(quiet)
            if self._stop.is_set() or not self._queue:
                self._worker = None
                self._changed.notify_all()
                return None
            name = self._queue.popleft()
            self._queued.discard(name)
            self._busy = name
            return name

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)
        while (name := self._next()) is not None:
            try:
                if remove_tree(self.path / name, stop=self._stop):
                    self.deleted += 1
            except InterruptedError:
                return  # closing: the rest of this entry waits for the next open
            except OSError as exc:
                logger.warning("trash: cannot delete %s (left for the next open): %s", name, exc)
            except Exception:  # never kill the worker silently
                logger.exception("trash: deleting %s failed", name)
        with self._lock:
            self._busy = None
            self._changed.notify_all()
