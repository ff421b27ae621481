"""The overlay snapshotter, and :func:`make_snapshotter` (BuildKit's ``auto`` choice).

A port of containerd's ``plugins/snapshots/overlay`` on the shared metadata
(``BaseSnapshotter`` in ``storage/_snapshotter.py``). Snapshots are overlayfs layers; nothing is
copied on ``prepare``. Someone must perform the returned mounts
(:func:`~storage._mount.local_mount` does, with ``mount(2)``), so this backend needs mount
privileges: :func:`make_snapshotter` only picks it when a probe mount works.

Layout: ``<root>/snapshots/<id>/fs`` (the layer: an active snapshot's upperdir) and
``<root>/snapshots/<id>/work`` (the overlay workdir, active snapshots only).

Mounts (containerd's shapes; parents nearest first):

* no parents: ``Mount("bind", <id>/fs, ("rbind", "rw"|"ro"))``;
* active with parents: ``Mount("overlay", "overlay", ("workdir=…", "upperdir=…",
  "lowerdir=<p1>/fs:<p2>/fs:…", *extra))`` where ``extra`` is ``index=off`` when the kernel
  has that parameter and ``userxattr`` inside a user namespace;
* view with one parent: a read-only bind of the parent's ``fs``;
* view with more parents: a read-only overlay (``lowerdir=`` only).

Whiteouts in a layer are 0/0 character devices and opaque directories carry
``trusted.overlay.opaque=y`` (``user.overlay.opaque`` with ``userxattr``): the kernel writes
them. Usage walks count unique inodes, so the kernel's shared whiteout inode counts once.

``merge`` applies the diffs into a new layer with no parent (a full tree, hardlinked from the
input layers), computing each input's content by stacking its layers in userspace
(``LayerStack`` in ``storage/_changes.py``). BuildKit instead makes the leading parent chain
the merge's parent ("skip base layers"); this port keeps one code path for both backends.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from ._changes import LayerStack
from ._env import MetaEnv
from ._errors import FailedPreconditionError, InvalidError
from ._mount import overlay_options, probe_overlay
from ._native import NativeSnapshotter
from ._snapmeta import SnapshotRecord, stored_snapshotter_name
from ._snapshotter import BaseSnapshotter, BuildPlan, Snapshotter
from ._types import Kind, Mount

__all__ = ["OverlaySnapshotter", "make_snapshotter"]

logger = logging.getLogger(__name__)

_NAMES = {
    "auto": "auto",
    "native": "native",
    "overlay": "overlayfs",
    "overlayfs": "overlayfs",
}


class OverlaySnapshotter(BaseSnapshotter):
    """containerd's overlayfs snapshotter (no copies; mounts needed to see a snapshot whole).

    Args:
        root: The cache root (``open_cache`` passes it); snapshot directories are
            ``root/snapshots/<id>/{fs,work}``.
        env: The cache's metadata environment.

    Raises:
        FailedPreconditionError: The cache was created with another snapshotter.
    """

    name = "overlayfs"

    def __init__(self, root: str | os.PathLike[str], env: MetaEnv, *, clean: bool = True) -> None:
        self._options = overlay_options()
        super().__init__(root, env, clean=clean)

    def _owns_dir(self, kind: Kind, has_parent: bool) -> bool:
        return True

    def _build(self, tmp: Path, plan: BuildPlan) -> None:
        fs = tmp / "fs"
        fs.mkdir()
        # A layer root is world-readable (containerd: 0755).
        os.chmod(fs, 0o755)  # noqa: S103
        if plan.kind == Kind.ACTIVE:
            work = tmp / "work"
            work.mkdir()
            os.chmod(work, 0o711)  # noqa: S103 - containerd: the workdir is 0711
        if plan.parent is not None:
            # containerd: the new upper takes the owner of the immediate parent's fs, so a
            # rootless container sees its root dir owned by itself.
            st = os.lstat(self._fs(plan.parent.id))
            try:
                os.chown(fs, st.st_uid, st.st_gid)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EINVAL):
                    raise
                logger.debug("cannot chown %s to %d:%d: %s", fs, st.st_uid, st.st_gid, exc)

    def _fs(self, sid: str) -> Path:
        return self._snapshot_dir(sid) / "fs"

    def _mounts(self, rec: SnapshotRecord, chain: list[SnapshotRecord]) -> list[Mount]:
        if not chain:
            flag = "ro" if rec.kind == Kind.VIEW else "rw"
            return [Mount("bind", str(self._fs(rec.id)), ("rbind", flag))]
        options: list[str] = []
        if rec.kind == Kind.ACTIVE:
            options.append(f"workdir={self._snapshot_dir(rec.id) / 'work'}")
            options.append(f"upperdir={self._fs(rec.id)}")
        elif len(chain) == 1:
            return [Mount("bind", str(self._fs(chain[0].id)), ("rbind", "ro"))]
        options.append("lowerdir=" + ":".join(str(self._fs(p.id)) for p in chain))
        options.extend(self._options)
        return [Mount("overlay", "overlay", tuple(options))]

    def _usage_dir(self, sid: str) -> Path:
        return self._fs(sid)

    def _merge_target(self, tmp: Path) -> Path:
        fs = tmp / "fs"
        fs.mkdir()
        os.chmod(fs, 0o755)  # noqa: S103
        return fs

    def _content_tree(self, rec: SnapshotRecord, chain: list[SnapshotRecord]) -> LayerStack:
        return LayerStack(tuple(self._fs(r.id) for r in (rec, *chain)), overlay=True)

    def _local_dir(self, rec: SnapshotRecord, chain: list[SnapshotRecord]) -> Path:
        return self._fs(rec.id)


def make_snapshotter(name: str, root: str | os.PathLike[str], env: MetaEnv) -> Snapshotter:
    """Opens the snapshotter of a cache, as BuildKit's worker chooses one.

    Args:
        name: ``"auto"`` (the backend recorded for this cache; for a new cache overlay when a
            probe mount under ``root`` works, else native), ``"native"``, or
            ``"overlay"``/``"overlayfs"``.
        root: The cache root; snapshot directories are ``root/snapshots/<id>``.
        env: The cache's metadata environment.

    Returns:
        A :class:`NativeSnapshotter` or :class:`OverlaySnapshotter`.

    Raises:
        InvalidError: Unknown ``name``.
        FailedPreconditionError: The cache was created with another snapshotter, or overlay
            was asked for (or recorded) and this machine cannot mount it (the message gives
            the probe's reason).
    """
    if not isinstance(name, str) or name not in _NAMES:
        msg = f"unknown snapshotter {name!r}: expected 'auto', 'native' or 'overlay'"
        raise InvalidError(msg)
    wanted = _NAMES[name]
    stored = stored_snapshotter_name(env)
    probed = False
    reason: str | None = None
    if wanted == "auto":
        if stored is not None:
            wanted = stored
        else:
            reason, probed = probe_overlay(root), True
            if reason is not None:
                logger.info("no overlay under %s (%s): using the native snapshotter", root, reason)
            wanted = "overlayfs" if reason is None else "native"
    if stored is not None and stored != wanted:
        msg = (
            f"the cache metadata in {env.path} was created with the {stored!r} snapshotter; "
            f"it cannot be opened with {wanted!r} (open it with {stored!r} or 'auto')"
        )
        raise FailedPreconditionError(msg)
    if wanted == "overlayfs":
        if not probed:
            reason = probe_overlay(root)
        if reason is not None:
            msg = f"the overlayfs snapshotter cannot be used under {root}: {reason}"
            raise FailedPreconditionError(msg)
        return OverlaySnapshotter(root, env)
    if wanted != "native":
        msg = f"the cache metadata in {env.path} names an unknown snapshotter {wanted!r}"
        raise FailedPreconditionError(msg)
    return NativeSnapshotter(root, env)
