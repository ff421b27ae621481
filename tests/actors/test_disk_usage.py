"""Disk usage (BuildKit ``DiskUsage`` and its filters) on real caches and tables.

Equal pairs show once; in-use is propagated from unreferenced children; a mutable record in
use reports size 0; shared marking through the ref checker (the record and its ancestors);
containerd filters over every field and operator; unknown sizes measured off the manager and
cached; the offline view (``refcache du`` on a cache open elsewhere) agrees with the live one;
and a missing parent never crashes any of it (BuildKit #7154/#7157).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from refcache.actors import Cache, ImmutableRef, MutableRef, PrunePolicy, open_cache
from refcache.actors._offline import offline_usage
from refcache.actors._rows import TableRow
from refcache.actors._usage import compute_usage, in_use_ids, measure_row, visible_ids
from refcache.actors._walk import layer_digest_chain, layer_walk
from refcache.storage import (
    KEY_BLOB,
    KEY_COMMITTED,
    KEY_CREATED_AT,
    KEY_PARENT,
    KEY_SIZE,
    KEY_SNAPSHOT,
    InvalidError,
    LocalContentStore,
    MetadataStore,
    MetaEnv,
    parse_filters,
)
from refcache.storage._types import ContentInfo

WAIT = 30.0


def new(cache: Cache, parent: ImmutableRef | None = None, **kwargs: Any) -> MutableRef:
    ref: MutableRef = cache.manager.new(parent, **kwargs).get(timeout=WAIT)
    return ref


def layer(
    cache: Cache, parent: ImmutableRef | None = None, *, data: str = "", **kwargs: Any
) -> ImmutableRef:
    m = new(cache, parent, **kwargs)
    if data:
        with m.mount(readonly=False).local() as path:
            (path / "data").write_text(data)
    ref = m.commit()
    ref.finalize()
    return ref


def usage(cache: Cache, *filters: str) -> dict[str, Any]:
    return {r.id: r for r in cache.manager.disk_usage(filters).get(timeout=WAIT)}


def row(
    rid: str,
    kind: str = "base",
    parents: tuple[str, ...] = (),
    *,
    holders: int = 0,
    handles: int = 0,
    blob: str = "",
    size: int = 1,
    **kw: Any,
) -> TableRow:
    values: dict[str, Any] = {
        "id": rid,
        "kind": kind,
        "parents": parents,
        "mutable": False,
        "size": size,
        "created_at": 1,
        "last_used_at": None,
        "usage_count": 0,
        "description": "",
        "record_type": "",
        "equal_mutable": None,
        "equal_immutable": None,
        "holders": holders,
        "handles": handles,
        "blob": blob,
        "blob_only": False,
        "snapshot_id": rid,
        "size_snapshot": rid,
    }
    values.update(kw)
    return TableRow(**values)


# -- equal pairs, in use, sizes --------------------------------------------------------------------


class TestRows:
    def test_an_equal_pair_shows_once(self, cache: Cache) -> None:
        m = new(cache, retain=True)
        i = m.commit()
        assert list(usage(cache)) == [i.id]  # the immutable, while it has refs
        assert usage(cache)[i.id].in_use
        i.release()
        rows = usage(cache)
        assert list(rows) == [m.id]  # then the mutable, unused
        assert (rows[m.id].mutable, rows[m.id].in_use) == (True, False)

    def test_a_chain_held_only_by_unreferenced_records_is_reclaimable(self, cache: Cache) -> None:
        a = layer(cache)
        b = layer(cache, a)
        c = layer(cache, b)
        for ref in (a, b, c):
            ref.release()
        assert {rid: r.in_use for rid, r in usage(cache).items()} == {
            a.id: False,
            b.id: False,
            c.id: False,
        }
        held = cache.manager.get(c.id).get(timeout=WAIT)
        assert {rid: r.in_use for rid, r in usage(cache).items()} == {
            a.id: True,
            b.id: True,
            c.id: True,
        }
        held.release()

    def test_merge_inputs_are_in_use_only_while_the_merge_is(self, cache: Cache) -> None:
        a, b = layer(cache), layer(cache)
        m = cache.manager.merge([a, b]).get(timeout=WAIT)
        a.release()
        b.release()
        assert {rid: r.in_use for rid, r in usage(cache).items()} == {
            a.id: True,
            b.id: True,
            m.id: True,
        }
        m.release()
        assert not any(r.in_use for r in usage(cache).values())
        assert usage(cache)[m.id].parents == (a.id, b.id)

    def test_a_mutable_in_use_reports_size_zero(self, cache: Cache) -> None:
        m = new(cache, retain=True)
        with m.mount(readonly=False).local() as path:
            (path / "big").write_bytes(b"x" * 100_000)
        assert usage(cache)[m.id].size == 0
        m.release()  # retained: kept, unreferenced, measured now
        assert usage(cache)[m.id].size >= 100_000

    def test_unknown_sizes_are_measured_and_cached(
        self, open_cache_at: Callable[[], Cache], cache_root: Path
    ) -> None:
        cache = open_cache_at()
        a = layer(cache, data="x" * 50_000)
        info = a.info()
        assert info.size == -1  # never measured
        expected = cache.snapshotter.usage(info.snapshot_id).size
        a.release()
        cache.close()
        cache = open_cache_at()  # the record rests: no actor holds a size for it
        assert usage(cache)[a.id].size == expected
        cache.close()
        env = MetaEnv(cache_root / "meta")
        try:
            assert MetadataStore(env).get(a.id).get_int(KEY_SIZE) == expected
        finally:
            env.close()

    def test_age_limit_keeps_never_used_records(self, cache: Cache) -> None:
        used = layer(cache)
        used.release()  # counted as a use now
        never = layer(cache)  # still held: never released, never used
        rows = cache.manager.disk_usage(age_limit=timedelta(hours=1)).get(timeout=WAIT)
        assert [r.id for r in rows] == [never.id]
        never.release()


# -- filters ---------------------------------------------------------------------------------------


class TestFilters:
    """containerd filter syntax over every field of a usage row (BuildKit ``adaptUsageInfo``)."""

    @pytest.fixture
    def records(self, tmp_path: Path) -> Any:
        blob = "sha256:" + "c" * 64

        def checker(record_id: str, chain: Sequence[str]) -> bool:
            return blob in chain

        root = tmp_path / "cache"
        with open_cache(root, snapshotter="native"):
            pass
        cache = open_cache(root, snapshotter="native", ref_checker=checker)
        base = layer(cache, description="base image")
        step = layer(cache, base, description="build step")
        internal = layer(cache)
        internal.metadata.record_type = "internal"
        scratch = new(cache, retain=True, description="cache mount scratch")
        scratch.metadata.record_type = "exec.cachemount"
        scratch.release()
        held = layer(cache, description="held")
        for ref in (base, step, internal):
            ref.release()
        cache.close()
        env = MetaEnv(root / "meta")
        try:
            item = MetadataStore(env).get(step.id)
            item.set(KEY_BLOB, blob)  # an image uses step (and so base)
        finally:
            env.close()
        cache = open_cache(root, snapshotter="native", ref_checker=checker)
        held = cache.manager.get(held.id).get(timeout=WAIT)
        ids = {
            "base": base.id,
            "step": step.id,
            "internal": internal.id,
            "scratch": scratch.id,
            "held": held.id,
        }
        yield cache, ids
        held.release()
        cache.close()

    @pytest.mark.parametrize(
        ("filters", "expected"),
        [
            (("id=={step}",), {"step"}),
            (("id!={step}",), {"base", "internal", "scratch", "held"}),
            (("id~=^{step}$",), {"step"}),
            (("parents=={base}",), {"step"}),
            (("parents",), {"step"}),
            (("parents~={base}",), {"step"}),
            (("parents!={base}",), {"base", "internal", "scratch", "held"}),
            (("description",), {"base", "step", "scratch", "held"}),
            (('description=="build step"',), {"step"}),
            (("description~=^b",), {"base", "step"}),
            (("description!=held",), {"base", "step", "internal", "scratch"}),
            (("type==internal",), {"internal"}),
            (("type!=regular",), {"internal", "scratch"}),
            (("type~=cache",), {"scratch"}),
            (("type",), {"base", "step", "internal", "scratch", "held"}),
            (("inuse",), {"held"}),
            (("mutable",), {"scratch"}),
            (("immutable",), {"base", "step", "internal", "held"}),
            (("shared",), {"base", "step"}),
            (("private",), {"internal", "scratch", "held"}),
            (("private,immutable,description",), {"held"}),  # comma: AND
            (("inuse", "mutable"), {"held", "scratch"}),  # several strings: OR
            (("shared,type==regular", "type==internal"), {"base", "step", "internal"}),
            ((), {"base", "step", "internal", "scratch", "held"}),
        ],
    )
    def test_filter(
        self, records: tuple[Cache, dict[str, str]], filters: tuple[str, ...], expected: set[str]
    ) -> None:
        cache, ids = records
        names = {v: k for k, v in ids.items()}
        formatted = tuple(f.format(**ids) for f in filters)
        assert {names[rid] for rid in usage(cache, *formatted)} == expected

    @pytest.mark.parametrize(
        ("flt", "field"),
        [
            ("descripton!=keepme", "descripton"),  # a typo would match every record
            ("foo==bar", "foo"),
            ("mutable,labels.x", "labels.x"),
            ("until==24h", "until"),
        ],
    )
    def test_unknown_fields_are_refused_by_disk_usage_prune_and_the_offline_view(
        self, records: tuple[Cache, dict[str, str]], flt: str, field: str
    ) -> None:
        cache, _ = records
        before = usage(cache)
        calls: list[Callable[[], object]] = [
            lambda: cache.manager.disk_usage([flt]).get(timeout=WAIT),
            lambda: cache.manager.prune(PrunePolicy(filters=(flt,))).get(timeout=WAIT),
            lambda: cache.manager.prune(
                PrunePolicy(all=True), PrunePolicy(filters=("id", flt))
            ).get(timeout=WAIT),
            lambda: offline_usage(cache.root, [flt]),
        ]
        for call in calls:
            with pytest.raises(InvalidError) as info:
                call()
            message = str(info.value)
            assert f"unknown field {field!r}" in message
            assert "valid fields: id, parents, description, type, inuse, mutable" in message
        assert usage(cache) == before  # nothing was deleted

    def test_shared_marks_the_record_and_its_ancestors(
        self, records: tuple[Cache, dict[str, str]]
    ) -> None:
        cache, ids = records
        rows = usage(cache)
        assert {names for names, rid in ids.items() if rows[rid].shared} == {"base", "step"}


# -- the offline view ------------------------------------------------------------------------------


class TestOffline:
    def test_offline_usage_matches_the_live_one_when_nothing_is_held(
        self, open_cache_at: Callable[[], Cache], cache_root: Path
    ) -> None:
        cache = open_cache_at()
        a = layer(cache, data="a")
        b = layer(cache, a, data="b")
        m = new(cache, retain=True)
        twin = m.commit()
        for ref in (a, b, twin):
            ref.release()
        live = sorted(cache.manager.disk_usage().get(timeout=WAIT), key=lambda r: r.id)
        cache.close()
        offline = sorted(offline_usage(cache_root), key=lambda r: r.id)
        assert offline == live
        assert {r.id for r in offline} == {a.id, b.id, m.id}

    def test_a_missing_parent_never_crashes_offline_usage(self, tmp_path: Path) -> None:
        root = tmp_path / "cache"
        with open_cache(root, snapshotter="native") as cache:
            base = layer(cache)
            base.release()
        env = MetaEnv(root / "meta")
        try:
            item = MetadataStore(env).get("orphanchild0000000000000a")
            item.queue_many(
                {
                    KEY_COMMITTED: True,
                    KEY_CREATED_AT: 1,
                    KEY_SNAPSHOT: "gone",
                    KEY_PARENT: "missingparent00000000000a",
                }
            )
            item.commit()
        finally:
            env.close()
        rows = {r.id: r for r in offline_usage(root)}
        assert set(rows) == {base.id, "orphanchild0000000000000a"}
        assert rows["orphanchild0000000000000a"].parents == ("missingparent00000000000a",)
        assert rows["orphanchild0000000000000a"].size == 0  # no snapshot: counts 0
        with open_cache(root, snapshotter="native") as cache:  # loading clears the orphan
            assert [r.id for r in cache.manager.disk_usage().get(timeout=WAIT)] == [base.id]


# -- pure functions over tables --------------------------------------------------------------------


class TestTables:
    def test_missing_parents_are_skipped_everywhere(self) -> None:
        table = {
            "child": row("child", "layer", ("gone",), blob="sha256:" + "1" * 64),
            "merge": row("merge", "merge", ("child", "nowhere")),
            "diff": row("diff", "diff", ("", "vanished")),
        }
        rows = compute_usage(table, checker=lambda rid, chain: True)
        assert {r.id for r in rows} == {"child", "merge", "diff"}
        assert all(r.shared for r in rows)
        assert layer_walk(table, "merge") == ["child"]
        assert layer_digest_chain(table, "child") == ("sha256:" + "1" * 64,)
        assert layer_walk(table, "diff") == ["diff"]
        assert in_use_ids(table, visible_ids(table)) == set()

    def test_layer_walk_and_digest_chains(self) -> None:
        b = {name: "sha256:" + name * 64 for name in "abcd"}
        table = {
            "a": row("a", blob=b["a"], holders=2),
            "b": row("b", "layer", ("a",), blob=b["b"], holders=3),
            "c": row("c", "layer", ("b",), blob=b["c"], holders=1),
            "d": row("d", blob=b["d"], holders=1),
            "m": row("m", "merge", ("c", "d")),
            # upper is one layer on top of lower: the diff is that layer
            "d1": row("d1", "diff", ("a", "b")),
            # upper is a base layer diffed with nothing: the diff is the base
            "d2": row("d2", "diff", ("", "d")),
            # anything else: the diff is its own layer (its own blob)
            "d3": row("d3", "diff", ("a", "c"), blob="sha256:" + "e" * 64),
        }
        assert layer_walk(table, "c") == ["a", "b", "c"]
        assert layer_walk(table, "m") == ["a", "b", "c", "d"]
        assert layer_digest_chain(table, "m") == (b["a"], b["b"], b["c"], b["d"])
        assert layer_walk(table, "d1") == ["b"]
        assert layer_digest_chain(table, "d1") == (b["b"],)
        assert layer_walk(table, "d2") == ["d"]
        assert layer_digest_chain(table, "d3") == ("sha256:" + "e" * 64,)
        memo: dict[str, tuple[str, ...]] = {}
        assert layer_digest_chain(table, "c", memo) == (b["a"], b["b"], b["c"])
        assert memo["b"] == (b["a"], b["b"])

    def test_doubly_held_parents_of_an_unused_pair_are_reclaimable(self) -> None:
        table = {
            "p": row("p", holders=2),
            "m": row("m", "layer", ("p",), mutable=True, equal_immutable="i"),
            "i": row("i", "layer", ("p",), equal_mutable="m"),
        }
        assert visible_ids(table) == ["p", "m"]
        assert in_use_ids(table, visible_ids(table)) == set()
        held = {**table, "i": table["i"]._replace(handles=1)}
        assert visible_ids(held) == ["p", "i"]
        assert in_use_ids(held, visible_ids(held)) == {"p", "i"}

    def test_filters_apply_to_the_adapted_rows(self) -> None:
        table = {"a": row("a", description="x"), "b": row("b")}
        rows = compute_usage(table, flt=parse_filters("description"))
        assert [r.id for r in rows] == ["a"]

    def test_a_lazy_record_counts_its_blob_and_variants_once(self, tmp_path: Path) -> None:
        env = MetaEnv(tmp_path / "meta")
        try:
            content = LocalContentStore(tmp_path / "content", env)
            variant = content.write_blob(b"v" * 300)
            blob = content.write_blob(b"b" * 1000)
            # The variant points back at the blob: a cycle must count each blob once.
            for digest, other in ((blob.digest, variant.digest), (variant.digest, blob.digest)):
                content.update(
                    ContentInfo(digest, 0, {"containerd.io/gc.ref.content.blob-gzip": other}),
                    "labels",
                )
            lazy = row("lazy", blob=blob.digest, blob_only=True, size=-1)
            assert measure_row(None, content, lazy) == (1300, True)
        finally:
            env.close()


# -- a catastrophic regular expression over a large table (also a benchmark) ---------------------

_REGEX_BENCH = r"""
import json, secrets, sys, time
from pathlib import Path
from refcache.actors import open_cache
from refcache.storage import (
    KEY_COMMITTED, KEY_CREATED_AT, KEY_DESCRIPTION, KEY_SIZE, KEY_SNAPSHOT, MetadataStore, MetaEnv,
)

root, n = Path(sys.argv[1]), int(sys.argv[2])
with open_cache(root, snapshotter="native"):
    pass
env = MetaEnv(root / "meta")
records = {}
for i in range(n):
    rid = f"r{i:05d}" + secrets.token_hex(8)
    # Half end in "a": matched by (a+)+$. The other half make a backtracking engine try
    # every split of 999 a's before it fails (2^999 paths).
    text = "a" * 1000 if i % 2 else "a" * 999 + "!"
    records[rid] = {
        KEY_COMMITTED: True, KEY_CREATED_AT: 1, KEY_SNAPSHOT: rid, KEY_SIZE: 4096,
        KEY_DESCRIPTION: text,
    }
MetadataStore(env).write_many(records)
env.close()

with open_cache(root, snapshotter="native", timeout=120) as cache:
    def run(*filters):
        t0 = time.perf_counter()
        rows = cache.manager.disk_usage(filters).get(timeout=120)
        return time.perf_counter() - t0, len(rows)
    run()  # warm
    plain = min(run()[0] for _ in range(3))
    timed = [run("description~=(a+)+$") for _ in range(3)]
    print(json.dumps({
        "plain_s": plain,
        "filtered_s": min(t for t, _ in timed),
        "matched": timed[0][1],
    }))
"""


def test_a_catastrophic_filter_over_10000_long_descriptions_is_fast(tmp_path: Path) -> None:
    # In a child with a timeout: a regression to a backtracking engine would hang here
    # (holding the GIL, so no in-process timeout could fire).
    n = 10_000
    try:
        done = subprocess.run(
            [sys.executable, "-c", _REGEX_BENCH, str(tmp_path / "cache"), str(n)],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"disk_usage with description~=(a+)+$ over {n} records did not finish")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["matched"] == n // 2
    # The filter's own cost (RE2 over 10 MB of descriptions) is a few tens of ms; the bound
    # is loose because the machine is shared. docs/BENCHMARKS.md has the measured figure.
    assert result["filtered_s"] - result["plain_s"] < 2.0, result
