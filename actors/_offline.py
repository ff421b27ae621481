"""Read-only views of a cache that may be open in another process (``du``, ``inspect``).

Open handles live in the process that has the cache open, so a reader cannot see them: the
rows here are what ``disk_usage`` would report with no handle open (nothing in use; a chain
held only by unreferenced records is reclaimable, BuildKit's rule). Sizes come from the
metadata; unknown ones are measured read-only from the snapshot directories.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from actors._entry import RecordEntry
from actors._prune import _usage_adaptor
from actors._record import SIZE_UNKNOWN
from actors._types import UsageInfo
from storage import CorruptMetadataError, MetadataStore, MetaEnv, NotFoundError, parse_filters
from storage._check import _open_snapshotter
from storage._snapshotter import Snapshotter

__all__ = ["offline_entries", "offline_usage", "read_only_env"]


@contextmanager
def read_only_env(root: Path) -> Iterator[MetaEnv]:
    """The cache's environment for reading: the live one of this process, or a read-only one."""
    live = MetaEnv.lookup(root / "meta")
    if live is not None:
        yield live
        return
    env = MetaEnv(root / "meta", readonly=True)
    try:
        yield env
    finally:
        env.close()


def offline_entries(env: MetaEnv) -> tuple[dict[str, RecordEntry], list[str]]:
    """Every decodable, not-deleted record; and the ids that could not be read."""
    entries: dict[str, RecordEntry] = {}
    broken: list[str] = []
    for item in MetadataStore(env).all():
        try:
            if item.get_bool("cache.deleted"):
                continue
            entries[item.id] = RecordEntry.from_item(item)
        except CorruptMetadataError:
            broken.append(item.id)
    for e in entries.values():
        for p in e.parents:
            if p in entries:
                entries[p].holders += 1
        if e.equal_mutable and e.equal_mutable in entries:
            entries[e.equal_mutable].equal_immutable = e.id
    return entries, broken


def _usage(snapshotter: Snapshotter | None, snapshot_id: str) -> int:
    if snapshotter is None:
        return 0
    with contextlib.suppress(NotFoundError):
        return int(snapshotter.usage(snapshot_id).size)
    return 0


def offline_usage(root: Path, filters: tuple[str, ...] = ()) -> list[UsageInfo]:
    """``disk_usage`` computed from the stored metadata (see the module docstring).

    Raises:
        InvalidError: a malformed filter.
        RefcacheError: no cache under ``root``.
    """
    flt = parse_filters(*filters)
    with read_only_env(root) as env:
        entries, _ = offline_entries(env)
        snapshotter = _open_snapshotter(root, env, clean=False)
        # Visible rows as in disk_usage: an equal pair shows once (as its mutable here, since
        # no handle can be seen from outside).
        visible = {rid: e for rid, e in entries.items() if e.equal_mutable is None}
        rows = []
        for rid, e in visible.items():
            size = e.size
            if size == SIZE_UNKNOWN:
                size = _usage(snapshotter, e.snapshot_id)
            row = UsageInfo(
                id=rid,
                mutable=e.mutable,
                in_use=False,
                size=size,
                created_at=e.created_at,
                last_used_at=e.last_used_at,
                usage_count=e.usage_count,
                parents=e.parent_ids(),
                description=e.description,
                record_type=e.record_type or "regular",
                shared=False,
            )
            rows.append(row)
    return [r for r in rows if flt.match(_usage_adaptor(r))]
