"""The native snapshotter: every active snapshot is a full copy of its parent.

A port of containerd's ``plugins/snapshots/native`` on the shared metadata
(``BaseSnapshotter`` in ``storage/_snapshotter.py``). It needs no mount privileges: every mount it
returns is a bind mount whose source is a plain directory, which
:func:`~storage._mount.local_mount` uses in place.

Layout: ``<root>/snapshots/<id>/`` is the snapshot's tree itself (no ``fs/`` subdirectory).

* ``prepare(key, parent)``: ``new-<random>`` (mode 0755) receives a full copy of the parent's
  tree (``copy_tree`` in ``storage/_fscopy.py``: modes, owners, times, xattrs, symlinks,
  hardlinks within the tree, devices, sparse files), then is renamed to ``<id>`` inside the
  transaction that records it. Cost: O(size of the parent's whole tree).
* ``view(key, parent)``: like containerd, **no copy and no directory**: the view mounts the
  parent's own directory read-only. ``ro`` is a contract here (a bind mount used in place is
  writable), so a caller writing through a view would change the committed parent
  (see "Where the snapshotters differ" in docs/STORAGE.md). A view without a parent gets an
  empty directory.
* ``mounts``: ``[Mount("bind", <dir>, ("rbind", "rw"|"ro"))]``.
* ``commit``: the directory stays; its usage (unique inodes, ``st_blocks * 512``) is stored.
* ``merge``: a hardlink farm built from the inputs' directories (BuildKit, ``native``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ._changes import LayerStack
from ._env import MetaEnv
from ._fscopy import copy_tree
from ._snapmeta import SnapshotRecord
from ._snapshotter import BaseSnapshotter, BuildPlan
from ._types import Kind, Mount

__all__ = ["NativeSnapshotter"]


class NativeSnapshotter(BaseSnapshotter):
    """containerd's native snapshotter (copy on prepare, hardlink-farm merges).

    Args:
        root: The cache root (``open_cache`` passes it); snapshot directories are
            ``root/snapshots/<id>``.
        env: The cache's metadata environment.

    Raises:
        FailedPreconditionError: The cache was created with another snapshotter.
    """

    name = "native"

    def __init__(self, root: str | os.PathLike[str], env: MetaEnv, *, clean: bool = True) -> None:
        super().__init__(root, env, clean=clean)

    def _owns_dir(self, kind: Kind, has_parent: bool) -> bool:
        # containerd native: a view of a parent mounts the parent's directory, nothing new.
        return kind != Kind.VIEW or not has_parent

    def _build(self, tmp: Path, plan: BuildPlan) -> None:
        if plan.parent is not None:
            copy_tree(self._snapshot_dir(plan.parent.id), tmp)

    def _local_dir(self, rec: SnapshotRecord, chain: list[SnapshotRecord]) -> Path:
        if rec.kind == Kind.VIEW and chain:
            return self._snapshot_dir(chain[0].id)
        return self._snapshot_dir(rec.id)

    def _mounts(self, rec: SnapshotRecord, chain: list[SnapshotRecord]) -> list[Mount]:
        flag = "ro" if rec.kind == Kind.VIEW else "rw"
        return [Mount("bind", str(self._local_dir(rec, chain)), ("rbind", flag))]

    def _usage_dir(self, sid: str) -> Path:
        return self._snapshot_dir(sid)

    def _content_tree(self, rec: SnapshotRecord, chain: list[SnapshotRecord]) -> LayerStack:
        return LayerStack((self._snapshot_dir(rec.id),))
