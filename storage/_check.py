"""``storage.check``: consistency of metadata, directories, blobs and leases under one root.

Read-only by default: it opens the metadata environment read-only, so it works on a cache
that another process has open (LMDB readers never block the writer). Problems are returned
as one line each, naming the object; an empty list means healthy.

What is checked:

* every record decodes; its parents and equal mutable exist; a mutable record has an active
  snapshot; a finalized immutable record that is not blob-only has a committed snapshot;
* blob files without metadata (orphans) and metadata without blob files (missing);
* snapshot directories without metadata (orphans, including leftover ``new-*``/``rm-*``)
  and snapshot metadata without a directory (missing);
* lease resources whose lease is gone (dangling links).

:func:`repair` fixes what is safe — orphan files and directories, dangling lease links — and
needs the cache closed (it takes the cache's lock file).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from ._content import LocalContentStore
from ._env import DB_LEASE_RESOURCES, DB_LEASES, MetaEnv
from ._errors import CorruptMetadataError, LockedError, NotFoundError, RefcacheError
from ._leases import parse_resource_key
from ._metadata import (
    KEY_BLOB_ONLY,
    KEY_COMMITTED,
    KEY_EQUAL_MUTABLE,
    KEY_LOWER_DIFF_PARENT,
    KEY_MERGE_PARENTS,
    KEY_PARENT,
    KEY_SNAPSHOT,
    KEY_UPPER_DIFF_PARENT,
    MetadataStore,
)
from ._native import NativeSnapshotter
from ._overlay import OverlaySnapshotter
from ._snapshotter import Snapshotter, stored_snapshotter_name
from ._types import Kind

__all__ = ["check", "repair"]


def _open_snapshotter(root: Path, env: MetaEnv, *, clean: bool) -> Snapshotter | None:
    name = stored_snapshotter_name(env)
    if name is None:
        return None
    cls = OverlaySnapshotter if name == "overlayfs" else NativeSnapshotter
    return cls(root, env, clean=clean)


def _in_use(root: Path) -> bool:
    """Whether some process (this one included) has the cache open for writing."""
    env = MetaEnv.lookup(root / "meta")
    if env is not None and not env.readonly:
        return True
    try:
        fd = os.open(root / "lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def check(root: str | os.PathLike[str]) -> list[str]:
    """Returns the consistency problems of the cache under ``root`` (empty when healthy).

    Raises:
        RefcacheError: ``root`` holds no refcache metadata, or it cannot be read at all.
    """
    root = Path(root)
    live = MetaEnv.lookup(root / "meta")
    if live is not None:
        # This process has the cache open (LMDB allows one handle per process): read
        # through it; its read transactions never block its writers.
        return _check(root, live)
    env = MetaEnv(root / "meta", readonly=True)
    try:
        return _check(root, env)
    finally:
        env.close()


def _check(root: Path, env: MetaEnv) -> list[str]:
    problems: list[str] = []
    live = _in_use(root)
    store = MetadataStore(env)
    snapshotter = _open_snapshotter(root, env, clean=False)
    content = LocalContentStore(root / "content", env, clean=False)
    items = {item.id: item for item in store.all()}
    for rid, item in items.items():
        try:
            item.decode()
            parents = [
                item.get_str(KEY_PARENT),
                item.get_str(KEY_LOWER_DIFF_PARENT),
                item.get_str(KEY_UPPER_DIFF_PARENT),
                *item.get_str_list(KEY_MERGE_PARENTS),
            ]
            equal = item.get_str(KEY_EQUAL_MUTABLE)
            committed = item.get_bool(KEY_COMMITTED)
            blob_only = item.get_bool(KEY_BLOB_ONLY)
            snapshot_id = item.get_str(KEY_SNAPSHOT) or rid
        except CorruptMetadataError as exc:
            problems.append(f"record {rid}: corrupt metadata: {exc}")
            continue
        for parent in filter(None, parents):
            if parent not in items:
                problems.append(f"record {rid}: parent {parent} does not exist")
        if equal and equal not in items:
            problems.append(f"record {rid}: equal mutable {equal} does not exist")
        if snapshotter is None:
            continue
        kind = _snapshot_kind(snapshotter, snapshot_id)
        merged = bool(item.get_str_list(KEY_MERGE_PARENTS)) or bool(
            item.get_str(KEY_LOWER_DIFF_PARENT) or item.get_str(KEY_UPPER_DIFF_PARENT)
        )
        if not committed and not merged and kind != Kind.ACTIVE:
            problems.append(f"record {rid}: mutable record has no active snapshot {snapshot_id}")
        elif committed and not equal and not blob_only and not merged and kind is None:
            problems.append(f"record {rid}: snapshot {snapshot_id} is missing")
    for path in content.orphans():
        problems.append(f"content: blob file {path} has no metadata")
    for digest in content.missing():
        problems.append(f"content: blob {digest} has metadata but no file")
    if snapshotter is not None:
        for path in snapshotter.orphans():
            if live and path.name.startswith(("new-", "rm-")):
                continue  # work in progress of the process that has the cache open
            problems.append(f"snapshots: directory {path} belongs to no snapshot")
        for key in snapshotter.missing():
            problems.append(f"snapshots: snapshot {key} has no directory")
    for lease_id, resource in _dangling_resources(env):
        problems.append(f"leases: resource {resource} of missing lease {lease_id}")
    return problems


def _snapshot_kind(snapshotter: Snapshotter, key: str) -> Kind | None:
    try:
        return snapshotter.stat(key).kind
    except NotFoundError:
        return None


def _dangling_resources(env: MetaEnv) -> list[tuple[str, str]]:
    out = []
    try:
        with env.read_txn() as txn:
            for key in txn.keys(DB_LEASE_RESOURCES):
                lease_id, resource = parse_resource_key(key)
                if txn.get(DB_LEASES, lease_id.encode()) is None:
                    out.append((lease_id, f"{resource.type}/{resource.id}"))
    except RefcacheError:
        if not env.readonly:
            raise
    return out


def repair(root: str | os.PathLike[str]) -> list[str]:
    """Fixes what is safe to fix; returns one line per repair.

    Removes orphan blob files and snapshot directories, and lease links whose lease is gone.
    Records are never touched here: opening the cache repairs them (see ``actors``).

    Raises:
        LockedError: the cache is open in another process.
    """
    root = Path(root)
    lock_fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            msg = f"cache {root} is open in another process; close it before repairing"
            raise LockedError(msg) from exc
        env = MetaEnv(root / "meta")
        try:
            done: list[str] = []
            content = LocalContentStore(root / "content", env, clean=False)
            done.extend(f"removed orphan blob file {p}" for p in content.remove_orphans())
            snapshotter = _open_snapshotter(root, env, clean=True)
            if snapshotter is not None:
                cleaned = getattr(snapshotter, "cleaned", [])
                done.extend(f"removed orphan snapshot directory {p}" for p in cleaned)
                done.extend(f"removed orphan snapshot directory {p}" for p in snapshotter.cleanup())
                snapshotter.close()
            dangling = _dangling_resources(env)
            if dangling:
                with env.write_txn() as txn:
                    for key in list(txn.keys(DB_LEASE_RESOURCES)):
                        lease_id, _ = parse_resource_key(key)
                        if txn.get(DB_LEASES, lease_id.encode()) is None:
                            txn.delete(DB_LEASE_RESOURCES, key)
                done.extend(f"removed link {r} of missing lease {lid}" for lid, r in dangling)
            return done
        finally:
            env.close()
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)
