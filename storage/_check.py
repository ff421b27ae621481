"""``storage.check``: consistency of metadata, directories, blobs, leases and mounts.

Read-only by default: it opens the metadata environment read-only, so it works on a cache
that another process has open (LMDB readers never block the writer). Problems are returned
as one line each, naming the object; an empty list means healthy.

What is checked:

* the metadata environment itself: a damaged ``data.mdb`` (truncated, overwritten, broken
  pages; see :func:`storage._env.check_data_file`) is one problem line, never a crash;
* every record decodes; its parents and equal mutable exist; a mutable record has an active
  snapshot; a finalized immutable record that is not blob-only has a committed snapshot;
* blob files without metadata (orphans) and metadata without blob files (missing);
* snapshot directories without metadata (orphans, including leftover ``new-*``/``rm-*``)
  and snapshot metadata without a directory (missing); the trash (``<root>/trash``: trees
  forgotten by the metadata, deleted in the background) is no leak and not a problem
  (:func:`~storage._trash.trash_usage` says what waits there), except the entry of a
  snapshot that is still recorded on a closed cache (a removal that never committed,
  which the next open renames back);
* lease resources whose lease is gone (dangling links);
* mounts left under ``<root>/mounts`` by a process that died (and leftover mount dirs).

A live cache (another process, or this one, has it open for writing) is checked without
false alarms for work in flight. Records and snapshot metadata are read in one transaction,
and the directories are compared with that state knowing how writers stage them: a new
snapshot directory is renamed into place as ``<id>`` inside the transaction that records it,
with an id larger than any committed one; a removed one is renamed to ``trash/<id>`` inside
the transaction that forgets it. So ``<id>`` above the committed last id, ``new-*`` and
``rm-*`` are in-flight work, and a directory missing for a snapshot whose ``trash/<id>``
exists, or that a fresh read no longer has, is a removal in flight. A mutable record is
recorded before its snapshot is copied, so "no active snapshot" is only reported on a
closed cache; a blob file is placed before its metadata commits, so on a live cache a blob
without metadata is reported once it is a minute old. Mounts under ``<root>/mounts`` of a
live cache are its own.

:func:`repair` fixes what is safe — orphan files and directories, dangling lease links,
stale mounts — and needs the cache closed (it takes the cache's lock file).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from ._content import LocalContentStore
from ._env import (
    DB_CONTENT,
    DB_LEASE_RESOURCES,
    DB_LEASES,
    DB_RECORDS,
    DB_SNAPSHOTS,
    MetaEnv,
    ReadTxn,
)
from ._errors import CorruptedError, CorruptMetadataError, LockedError, RefcacheError
from ._layout import PRIVATE_FILE_MODE, access_error, lock_held, secure_root
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
    StorageItem,
)
from ._mount import MOUNTS_DIR, clean_mount_dir, stale_mounts
from ._native import NativeSnapshotter
from ._overlay import OverlaySnapshotter
from ._snapmeta import decode_record, stored_snapshotter_name
from ._snapshotter import BaseSnapshotter
from ._trash import TRASH_DIR
from ._types import Kind

__all__ = ["check", "repair"]

#: On a live cache, a blob file without metadata younger than this may be a commit in flight.
_BLOB_GRACE_SECONDS = 60.0


def open_snapshotter(root: Path, env: MetaEnv, *, clean: bool) -> BaseSnapshotter | None:
    """Opens the snapshotter a cache was created with (``None`` when none was recorded).

    Args:
        root: The cache root.
        env: Its metadata environment (read-only for inspection).
        clean: Remove leftovers at open (``False`` for a cache another process may be using).

    Raises:
        FailedPreconditionError / CorruptMetadataError: as the snapshotter's constructor.
    """
    name = stored_snapshotter_name(env)
    if name is None:
        return None
    cls = OverlaySnapshotter if name == "overlayfs" else NativeSnapshotter
    return cls(root, env, clean=clean)


def cache_in_use(root: Path) -> bool:
    """Whether some process (this one included) has the cache open for writing."""
    env = MetaEnv.lookup(root / "meta")
    if env is not None and not env.readonly:
        return True
    return lock_held(root)


def check(root: str | os.PathLike[str]) -> list[str]:
    """Returns the consistency problems of the cache under ``root`` (empty when healthy).

    A damaged metadata environment is reported as a problem (``metadata: ...``), never
    raised and never a crash.

    Raises:
        RefcacheError: ``root`` holds no refcache metadata, or it cannot be read at all
            (for example :class:`~storage._errors.PermissionDeniedError`).
    """
    root = Path(root)
    live = MetaEnv.lookup(root / "meta")
    if live is not None:
        # This process has the cache open (LMDB allows one handle per process): read
        # through it; its read transactions never block its writers.
        return _check_reporting_damage(root, live)
    try:
        env = MetaEnv(root / "meta", readonly=True)
    except CorruptedError as exc:
        return [f"metadata: {exc}", *_mount_problems(root, cache_in_use(root))]
    try:
        return _check_reporting_damage(root, env)
    finally:
        env.close()


def _check_reporting_damage(root: Path, env: MetaEnv) -> list[str]:
    try:
        return _check(root, env)
    except CorruptedError as exc:
        # Damage met while reading (a page LMDB cannot use): one line, the rest unknown.
        return [f"metadata: {exc}", *_mount_problems(root, cache_in_use(root))]


def _check(root: Path, env: MetaEnv) -> list[str]:
    problems: list[str] = []
    live = cache_in_use(root)
    store = MetadataStore(env)
    snapshotter = open_snapshotter(root, env, clean=False)
    content = LocalContentStore(root / "content", env, clean=False)
    # One read transaction for records and snapshot metadata: a consistent committed state.
    with env.read_txn() as txn:
        items = {
            key.decode("utf-8", "surrogateescape"): StorageItem(
                store, key.decode("utf-8", "surrogateescape"), raw
            )
            for key, raw in txn.items(DB_RECORDS)
        }
        kinds: dict[str, Kind] = {}
        owners: dict[str, str] = {}
        last_id = 0
        if snapshotter is not None:
            for raw_key, raw in txn.items(DB_SNAPSHOTS):
                if not raw_key.startswith(b"\x00"):
                    key = raw_key.decode("utf-8", "surrogateescape")
                    try:
                        kinds[key] = decode_record(key, raw).kind
                    except CorruptMetadataError as exc:
                        problems.append(f"snapshots: {exc}")
            owners = snapshotter.owned_dirs(txn)
            last_id = snapshotter.last_id(txn)
    for rid, item in items.items():
        problems.extend(_record_problems(rid, item, items, kinds, snapshotter, live))
    problems.extend(_content_problems(env, content, live))
    if snapshotter is not None:
        problems.extend(_snapshot_dir_problems(env, snapshotter, owners, last_id, live))
    for lease_id, resource in _dangling_resources(env):
        problems.append(f"leases: resource {resource} of missing lease {lease_id}")
    problems.extend(_mount_problems(root, live))
    return problems


def _record_problems(
    rid: str,
    item: StorageItem,
    items: dict[str, StorageItem],
    kinds: dict[str, Kind],
    snapshotter: BaseSnapshotter | None,
    live: bool,
) -> list[str]:
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
        merged = bool(item.get_str_list(KEY_MERGE_PARENTS)) or bool(
            item.get_str(KEY_LOWER_DIFF_PARENT) or item.get_str(KEY_UPPER_DIFF_PARENT)
        )
    except CorruptMetadataError as exc:
        return [f"record {rid}: corrupt metadata: {exc}"]
    out = [
        f"record {rid}: parent {parent} does not exist"
        for parent in filter(None, parents)
        if parent not in items
    ]
    if equal and equal not in items:
        out.append(f"record {rid}: equal mutable {equal} does not exist")
    if snapshotter is None:
        return out
    kind = kinds.get(snapshot_id)
    if not committed and not merged and kind != Kind.ACTIVE:
        if not live:  # on a live cache: the snapshot of a new record may be being copied
            out.append(f"record {rid}: mutable record has no active snapshot {snapshot_id}")
    elif committed and not equal and not blob_only and not merged and kind is None:
        out.append(f"record {rid}: snapshot {snapshot_id} is missing")
    return out


def _content_problems(env: MetaEnv, content: LocalContentStore, live: bool) -> list[str]:
    out: list[str] = []
    orphans = content.orphans()
    if live and orphans:
        # A blob file is placed before its metadata commits: look again, and give a
        # commit in flight a grace period.
        now = time.time()
        with env.read_txn() as txn:
            orphans = [
                p
                for p in orphans
                if txn.get(DB_CONTENT, f"{p.parent.name}:{p.name}".encode()) is None
                and _age(p, now) > _BLOB_GRACE_SECONDS
            ]
    out.extend(f"content: blob file {path} has no metadata" for path in orphans)
    missing = content.missing()
    if live and missing:
        # A delete forgets the metadata before it unlinks: a fresh look settles it.
        with env.read_txn() as txn:
            missing = [d for d in missing if txn.get(DB_CONTENT, d.encode()) is not None]
        missing = [d for d in missing if not _blob_file_exists(content, d)]
    out.extend(f"content: blob {digest} has metadata but no file" for digest in missing)
    return out


def _age(path: Path, now: float) -> float:
    try:
        return now - path.lstat().st_ctime
    except FileNotFoundError:
        return 0.0  # gone meanwhile: not an orphan


def _blob_file_exists(content: LocalContentStore, digest: str) -> bool:
    try:
        return content.path(digest).is_file()
    except RefcacheError:
        return False


def _snapshot_dir_problems(
    env: MetaEnv,
    snapshotter: BaseSnapshotter,
    owners: dict[str, str],
    last_id: int,
    live: bool,
) -> list[str]:
    out: list[str] = []
    dirs = snapshotter.root / "snapshots"
    trash = snapshotter.root / TRASH_DIR
    try:
        names = sorted(os.listdir(dirs))
    except FileNotFoundError:
        names = []
    unfinished: set[str] = set()
    if not live:
        # A trash entry of a recorded snapshot: its removal never committed.
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            unfinished = {n for n in os.listdir(trash) if n in owners}
        for sid in sorted(unfinished):
            out.append(
                f"snapshots: directory {trash / sid} of snapshot {owners[sid]} was being "
                "removed when a process died; the next open restores it"
            )
    busy = set(snapshotter._inflight)
    fresh: tuple[dict[str, str], int] | None = None

    def again() -> tuple[dict[str, str], int]:
        nonlocal fresh
        if fresh is None:
            with env.read_txn() as txn:
                fresh = (snapshotter.owned_dirs(txn), snapshotter.last_id(txn))
        return fresh

    for name in names:
        if name in owners or name in busy:
            continue
        path = dirs / name
        if name.startswith("rm-") and name.removeprefix("rm-") in owners and not live:
            out.append(
                f"snapshots: directory {path} of snapshot {owners[name.removeprefix('rm-')]} "
                "was being removed when a process died; the next open restores it"
            )
            continue
        if live:
            if name.startswith(("new-", "rm-")):
                continue  # work in progress of the process that has the cache open
            now_owners, now_last = again()
            if name in now_owners:
                continue  # recorded meanwhile
            if name.isdigit() and int(name) > now_last:
                continue  # staged by a transaction that has not committed yet
        out.append(f"snapshots: directory {path} belongs to no snapshot")
    for sid, key in sorted(owners.items(), key=lambda kv: kv[1]):
        if sid in unfinished or snapshotter.dir_of(sid).is_dir():
            continue
        if live:
            if (trash / sid).exists() or (dirs / f"rm-{sid}").exists():
                continue  # a removal in flight (renamed before its commit)
            if sid not in again()[0] or snapshotter.dir_of(sid).is_dir():
                continue  # removed meanwhile, or a removal rolled back
        out.append(f"snapshots: snapshot {key} has no directory")
    return out


def _mount_problems(root: Path, live: bool) -> list[str]:
    if live:
        return []  # the mounts of the process that has the cache open
    mounts = root / MOUNTS_DIR
    points = stale_mounts(mounts)
    out = [
        f"mounts: {point} is still mounted (left by a process that died)"
        for point in points
        if os.path.realpath(point) != os.path.realpath(mounts)
    ]
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        real = os.path.realpath(mounts)
        for name in sorted(os.listdir(mounts)):
            inside = os.path.join(real, name)
            if not any(p == inside or p.startswith(inside + "/") for p in points):
                out.append(f"mounts: leftover mount directory {mounts / name}")
    return out


def _dangling_resources(env: MetaEnv) -> list[tuple[str, str]]:
    out = []
    try:
        with env.read_txn() as txn:
            out = _dangling_in(txn)
    except CorruptedError:
        raise
    except RefcacheError:
        if not env.readonly:
            raise
    return out


def _dangling_in(txn: ReadTxn) -> list[tuple[str, str]]:
    out = []
    for key in txn.keys(DB_LEASE_RESOURCES):
        lease_id, resource = parse_resource_key(key)
        if txn.get(DB_LEASES, lease_id.encode()) is None:
            out.append((lease_id, f"{resource.type}/{resource.id}"))
    return out


def repair(root: str | os.PathLike[str]) -> list[str]:
    """Fixes what is safe to fix; returns one line per repair.

    Unmounts stale mounts and removes leftover mount directories, removes orphan blob files
    and snapshot directories (finishing interrupted removals, ``rm-*``, of any depth),
    restores the directory of a snapshot whose removal never committed, empties the trash
    (waiting for it: a repair is offline), removes lease links whose lease is gone, and
    makes the cache private again (``0700``). Records are never
    touched here: opening the cache repairs them (see ``actors``).

    Raises:
        LockedError: the cache is open in another process.
        CorruptedError: the metadata environment is damaged (nothing can be repaired).
        PermissionDeniedError: the cache is on a read-only file system or not writable.
    """
    root = Path(root)
    try:
        lock_fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    except OSError as exc:
        raise access_error("cannot repair cache", root, exc) from exc
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            msg = f"cache {root} is open in another process; close it before repairing"
            raise LockedError(msg) from exc
        done: list[str] = [f"made private: {line}" for line in secure_root(root)]
        done.extend(clean_mount_dir(root / MOUNTS_DIR))
        env = MetaEnv(root / "meta")
        try:
            content = LocalContentStore(root / "content", env, clean=False)
            done.extend(f"removed orphan blob file {p}" for p in content.remove_orphans())
            snapshotter = open_snapshotter(root, env, clean=True)
            if snapshotter is not None:
                cleaned = getattr(snapshotter, "cleaned", [])
                done.extend(f"removed orphan snapshot directory {p}" for p in cleaned)
                done.extend(f"removed orphan snapshot directory {p}" for p in snapshotter.cleanup())
                # The trash is no problem (nothing to report), but offline is the time to
                # empty it.
                snapshotter.trash.wait_idle()
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
