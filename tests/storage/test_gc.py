"""Garbage collection: the pure mark phase (ported from containerd's pkg/gc and
core/metadata gc tests) and collection against the real content store and snapshotter."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from refcache.storage._content import ContentStatus, LocalContentStore
from refcache.storage._env import DB_LEASE_RESOURCES, DB_SNAPSHOTS, MetaEnv, WriteTxn
from refcache.storage._errors import CorruptMetadataError, InvalidError
from refcache.storage._gc import (
    NODE_CONTENT,
    NODE_INGEST,
    NODE_LEASE,
    Edge,
    GCStats,
    LabelRefs,
    LeaseFacts,
    Node,
    Root,
    SnapshotFacts,
    build_graph,
    collect,
    label_refs,
    mark,
    removal_order,
    snapshot_node,
)
from refcache.storage._leases import (
    LABEL_GC_EXPIRE,
    LABEL_GC_FLAT,
    LmdbLeaseManager,
    Resource,
    format_rfc3339,
)
from refcache.storage._native import NativeSnapshotter
from refcache.storage._types import ContentInfo, Kind, SnapshotInfo, digest_of

NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
ROOT = "containerd.io/gc.root"
REF_CONTENT = "containerd.io/gc.ref.content"
REF_SNAPSHOT = "containerd.io/gc.ref.snapshot."
BREF_CONTENT = "containerd.io/gc.bref.content"
BREF_SNAPSHOT = "containerd.io/gc.bref.snapshot."


def dgst(i: int) -> str:
    return digest_of(f"blob-{i}".encode())


def content(i: int) -> Node:
    return Node(NODE_CONTENT, dgst(i))


def snap(key: str, snapshotter: str = "overlay") -> Node:
    return snapshot_node(snapshotter, key)


def lease(lease_id: str) -> Node:
    return Node(NODE_LEASE, lease_id)


def ingest(ref: str) -> Node:
    return Node(NODE_INGEST, ref)


def expire_in(delta: timedelta) -> dict[str, str]:
    return {LABEL_GC_EXPIRE: format_rfc3339(NOW + delta)}


# -- mark (pkg/gc Tricolor) -------------------------------------------------------------------


class TestMark:
    def test_everything_reachable_from_the_roots_is_marked_and_nothing_else(self) -> None:
        a, b, c, d, e = (Node("t", x) for x in "abcde")
        edges = {a: [b], b: [c], d: [e]}
        assert mark([a], edges) == {a, b, c}
        assert mark([d], edges) == {d, e}
        assert mark([], edges) == set()

    def test_cycles_terminate_and_unreachable_cycles_stay_unmarked(self) -> None:
        a, b, c, d = (Node("t", x) for x in "abcd")
        edges = {a: [b], b: [a], c: [d], d: [c]}
        assert mark([a], edges) == {a, b}
        self_loop = {a: [a]}
        assert mark([a], self_loop) == {a}

    def test_dead_edges_are_marked_without_harm(self) -> None:
        a = Node("t", "a")
        gone = Node("t", "gone")
        assert mark([a], {a: [gone]}) == {a, gone}

    def test_edges_may_be_given_as_a_function(self) -> None:
        def successors(node: Node) -> list[Node]:
            n = int(node.id)
            return [Node("n", str(n + 1))] if n < 5 else []

        assert mark([Node("n", "0")], successors) == {Node("n", str(i)) for i in range(6)}

    def test_a_flat_root_follows_only_parent_edges_and_stays_flat(self) -> None:
        child, parent, grand = snap("child"), snap("parent"), snap("grand")
        blob_of_parent, blob_of_child = content(1), content(2)
        edges = {
            child: [Edge(parent, parent=True), Edge(blob_of_child)],
            parent: [Edge(grand, parent=True), Edge(blob_of_parent)],
        }
        assert mark([Root(child, flat=True)], edges) == {child, parent, grand}
        assert mark([Root(child)], edges) == {
            child,
            parent,
            grand,
            blob_of_child,
            blob_of_parent,
        }

    def test_a_node_reached_flat_first_still_has_its_references_followed_later(self) -> None:
        # containerd keys "seen" on the type with the flat bit: a flat and a normal visit
        # are different visits of the same object.
        blob, target, other = content(1), content(2), content(3)
        edges = {blob: [target], other: [blob]}
        assert mark([Root(blob, flat=True)], edges) == {blob}
        assert mark([Root(blob, flat=True), Root(other)], edges) == {blob, target, other}
        assert mark([Root(other), Root(blob, flat=True)], edges) == {blob, target, other}


# -- labels (TestGCRefs' label cases) ---------------------------------------------------------


class TestLabelRefs:
    def test_content_references_need_an_exact_key_or_a_dot_or_slash_suffix(self) -> None:
        assert label_refs({REF_CONTENT: dgst(1)}).refs == (content(1),)
        assert label_refs(
            {REF_CONTENT + ".anything-1": dgst(2), REF_CONTENT + ".anything-2": dgst(3)}
        ).refs == (content(2), content(3))
        assert label_refs(
            {REF_CONTENT + "/anything-1": dgst(2), REF_CONTENT + "/anything-2": dgst(3)}
        ).refs == (content(2), content(3))
        assert label_refs({REF_CONTENT + "bad": dgst(1)}) == LabelRefs()

    def test_buildkit_blob_variant_labels_are_content_references(self) -> None:
        labels = {REF_CONTENT + ".blob-0": dgst(5), REF_CONTENT + ".blob-1": dgst(6)}
        assert label_refs(labels).refs == (content(5), content(6))

    def test_snapshot_references_name_their_snapshotter(self) -> None:
        assert label_refs(
            {REF_SNAPSHOT + "btrfs": "sn1", REF_SNAPSHOT + "overlay": "sn1"}
        ).refs == (
            snap("sn1", "btrfs"),
            snap("sn1", "overlay"),
        )
        assert label_refs(
            {REF_SNAPSHOT + "overlay/anything-1": "sn1", REF_SNAPSHOT + "overlay/anything-2": "sn2"}
        ).refs == (snap("sn1"), snap("sn2"))

    def test_back_references_name_the_objects_that_keep_the_labelled_one(self) -> None:
        parsed = label_refs(
            {
                BREF_CONTENT: dgst(5),
                BREF_CONTENT + ".x": dgst(6),
                BREF_CONTENT + "bad": dgst(7),
                BREF_SNAPSHOT + "btrfs": "sn1",
                BREF_SNAPSHOT + "native/x": "sn2",
                "containerd.io/gc.bref.container": "container1",
            }
        )
        assert parsed.refs == ()
        assert set(parsed.brefs) == {
            content(5),
            content(6),
            snap("sn1", "btrfs"),
            snap("sn2", "native"),
        }

    def test_the_root_label_makes_a_root_whatever_its_value(self) -> None:
        assert label_refs({ROOT: "always"}).root
        assert label_refs({ROOT: ""}).root
        assert not label_refs({"containerd.io/gc.expire": "x", "other": "y"}).root

    def test_unrelated_labels_mean_nothing(self) -> None:
        assert label_refs({"containerd.io/uncompressed": dgst(1), "a": "b"}) == LabelRefs()


# -- scanRoots (TestGCRoots) ----------------------------------------------------------------


def test_roots_are_unexpired_leases_their_resources_and_gc_root_objects() -> None:
    def res(kind: str, rid: str) -> Resource:
        return Resource(rid, kind)

    leases = {
        "l1": LeaseFacts(resources=(res("snapshots/overlay", "sn5"), res("content", dgst(4)))),
        "l2": LeaseFacts(resources=(res("snapshots/overlay", "sn6"), res("content", dgst(5)))),
        "l3": LeaseFacts(
            labels=expire_in(timedelta(hours=1)),
            resources=(
                res("content", dgst(6)),
                res("snapshots/overlay", "sn7"),
                res("ingests", "ingest-4"),
                res("ingests", "ingest-5"),
            ),
        ),
        "l4": LeaseFacts(
            labels=expire_in(-timedelta(seconds=1)),
            resources=(
                res("content", dgst(7)),
                res("snapshots/overlay", "sn8"),
                res("ingests", "ingest-6"),
            ),
        ),
        "l5": LeaseFacts(
            labels={LABEL_GC_FLAT: format_rfc3339(NOW), **expire_in(timedelta(hours=1))},
            resources=(
                res("content", dgst(1)),
                res("snapshots/overlay", "sn1"),
                res("ingests", "ingest-1"),
            ),
        ),
        "l6": LeaseFacts(labels={LABEL_GC_EXPIRE: "not a time"}),
    }
    blobs = {dgst(1): {}, dgst(2): {ROOT: "always"}, dgst(3): {}}
    snapshots = {f"sn{i}": SnapshotFacts() for i in range(1, 10)}
    snapshots["sn3"] = SnapshotFacts(labels={ROOT: "always"})

    graph = build_graph(
        leases=leases, content=blobs, snapshots=snapshots, snapshotter="overlay", now=NOW
    )

    assert set(graph.roots) == {
        Root(content(2)),
        Root(content(4)),
        Root(content(5)),
        Root(content(6)),
        Root(snap("sn3")),
        Root(snap("sn5")),
        Root(snap("sn6")),
        Root(snap("sn7")),
        Root(lease("l1")),
        Root(lease("l2")),
        Root(lease("l3")),
        Root(ingest("ingest-4")),
        Root(ingest("ingest-5")),
        Root(lease("l5")),
        Root(ingest("ingest-1")),
        Root(content(1), flat=True),
        Root(snap("sn1"), flat=True),
        Root(lease("l6")),  # an unparsable expiry is ignored: the lease stays live
    }
    assert graph.expired_leases == ("l4",)


def test_a_lease_expiring_exactly_now_is_still_a_root() -> None:
    graph = build_graph(
        leases={"l1": LeaseFacts(labels=expire_in(timedelta(0)))},
        content={},
        snapshots={},
        snapshotter="native",
        now=NOW,
    )
    assert graph.roots == (Root(lease("l1")),)
    assert graph.expired_leases == ()


# -- references (TestGCRefs) ----------------------------------------------------------------


def _targets(edges: Mapping[Node, tuple[Edge, ...]]) -> dict[Node, set[Edge]]:
    return {node: set(out) for node, out in edges.items()}


def test_references_follow_labels_parents_and_back_references() -> None:
    blobs = {
        dgst(1): {},
        dgst(2): {},
        dgst(3): {},
        dgst(4): {REF_CONTENT: dgst(1)},
        dgst(5): {REF_CONTENT + ".anything-1": dgst(2), REF_CONTENT + ".anything-2": dgst(3)},
        dgst(6): {REF_CONTENT + "bad": dgst(1)},
        dgst(7): {
            REF_CONTENT + "/anything-1": dgst(2),
            REF_CONTENT + "/anything-2": dgst(3),
            "containerd.io/gc.bref.container": "container3",
        },
        dgst(10): {
            "containerd.io/gc.bref.container": "container1",
            BREF_CONTENT: dgst(5),
            "containerd.io/gc.bref.image": "image2",
            BREF_SNAPSHOT + "btrfs": "sn1",
        },
    }
    snapshots = {
        "sn1": SnapshotFacts(),
        "sn2": SnapshotFacts(parent="sn1"),
        "sn3": SnapshotFacts(parent="sn2"),
        "sn4": SnapshotFacts(
            labels={REF_SNAPSHOT + "btrfs": "sn1", REF_SNAPSHOT + "overlay": "sn1"}
        ),
        "sn5": SnapshotFacts(
            labels={
                REF_SNAPSHOT + "overlay/anything-1": "sn1",
                REF_SNAPSHOT + "overlay/anything-2": "sn2",
            }
        ),
        "sn6": SnapshotFacts(labels={REF_CONTENT: dgst(1), REF_CONTENT + ".keep-me": dgst(6)}),
    }
    graph = build_graph(
        leases={}, content=blobs, snapshots=snapshots, snapshotter="overlay", now=NOW
    )

    assert _targets(graph.edges) == {
        content(4): {Edge(content(1))},
        content(5): {Edge(content(10)), Edge(content(2)), Edge(content(3))},
        content(7): {Edge(content(2)), Edge(content(3))},
        snap("sn2"): {Edge(snap("sn1"), parent=True)},
        snap("sn3"): {Edge(snap("sn2"), parent=True)},
        snap("sn4"): {Edge(snap("sn1", "btrfs")), Edge(snap("sn1"))},
        snap("sn5"): {Edge(snap("sn1")), Edge(snap("sn2"))},
        snap("sn1", "btrfs"): {Edge(content(10))},
        snap("sn6"): {Edge(content(1)), Edge(content(6))},
    }
    assert graph.roots == ()


def test_flat_leases_do_not_follow_label_references() -> None:
    blobs = {dgst(1): {}, dgst(2): {REF_CONTENT + ".0": dgst(1)}}

    def marked(labels: dict[str, str]) -> set[Node]:
        graph = build_graph(
            leases={"l": LeaseFacts(labels=labels, resources=(Resource(dgst(2), "content"),))},
            content=blobs,
            snapshots={},
            snapshotter="native",
            now=NOW,
        )
        return mark(graph.roots, graph.edges)

    assert marked({LABEL_GC_FLAT: "x"}) == {lease("l"), content(2)}
    assert marked({}) == {lease("l"), content(2), content(1)}


def test_a_flat_lease_keeps_the_parent_chain_but_not_the_labelled_blobs() -> None:
    snapshots = {
        "base": SnapshotFacts(labels={REF_CONTENT: dgst(1)}),
        "mid": SnapshotFacts(parent="base"),
        "top": SnapshotFacts(parent="mid", labels={REF_CONTENT + ".blob": dgst(2)}),
        "other": SnapshotFacts(parent="base"),
    }
    blobs: dict[str, dict[str, str]] = {dgst(1): {}, dgst(2): {}}
    graph = build_graph(
        leases={
            "rec": LeaseFacts(
                labels={LABEL_GC_FLAT: "t"}, resources=(Resource("top", "snapshots/native"),)
            )
        },
        content=blobs,
        snapshots=snapshots,
        snapshotter="native",
        now=NOW,
    )
    assert mark(graph.roots, graph.edges) == {
        lease("rec"),
        snap("top", "native"),
        snap("mid", "native"),
        snap("base", "native"),
    }


def test_back_references_apply_only_when_the_named_object_is_visited_normally() -> None:
    # containerd keys back references on the non-flat node: a flat lease on the blob does
    # not keep what back-references it, a normal lease does.
    blobs = {dgst(1): {}, dgst(2): {BREF_CONTENT: dgst(1)}}
    for flat, expected in ((True, {content(1)}), (False, {content(1), content(2)})):
        labels = {LABEL_GC_FLAT: "x"} if flat else {}
        graph = build_graph(
            leases={"l": LeaseFacts(labels=labels, resources=(Resource(dgst(1), "content"),))},
            content=blobs,
            snapshots={},
            snapshotter="native",
            now=NOW,
        )
        assert mark(graph.roots, graph.edges) - {lease("l")} == expected


def test_a_snapshot_back_reference_keeps_the_blob_while_the_snapshot_lives() -> None:
    blobs = {dgst(1): {BREF_SNAPSHOT + "native": "s1"}}
    snapshots = {"s1": SnapshotFacts()}
    for leased, expected in ((True, {snap("s1", "native"), content(1)}), (False, set())):
        resources = (Resource("s1", "snapshots/native"),) if leased else ()
        graph = build_graph(
            leases={"l": LeaseFacts(resources=resources)},
            content=blobs,
            snapshots=snapshots,
            snapshotter="native",
            now=NOW,
        )
        assert mark(graph.roots, graph.edges) - {lease("l")} == expected


def test_gc_root_labelled_objects_keep_their_references() -> None:
    snapshots = {"s1": SnapshotFacts(), "s2": SnapshotFacts(parent="s1", labels={ROOT: "1"})}
    blobs = {dgst(1): {ROOT: "x", REF_CONTENT + ".blob-1": dgst(2)}, dgst(2): {}, dgst(3): {}}
    graph = build_graph(
        leases={}, content=blobs, snapshots=snapshots, snapshotter="native", now=NOW
    )
    assert mark(graph.roots, graph.edges) == {
        snap("s1", "native"),
        snap("s2", "native"),
        content(1),
        content(2),
    }


def test_an_expired_lease_keeps_nothing() -> None:
    graph = build_graph(
        leases={
            "old": LeaseFacts(
                labels=expire_in(-timedelta(hours=1)),
                resources=(Resource(dgst(1), "content"), Resource("s", "snapshots/native")),
            )
        },
        content={dgst(1): {}},
        snapshots={"s": SnapshotFacts()},
        snapshotter="native",
        now=NOW,
    )
    assert mark(graph.roots, graph.edges) == set()
    assert graph.expired_leases == ("old",)


def test_leases_of_another_snapshotter_do_not_keep_this_ones_snapshots() -> None:
    graph = build_graph(
        leases={"l": LeaseFacts(resources=(Resource("s", "snapshots/overlayfs"),))},
        content={},
        snapshots={"s": SnapshotFacts()},
        snapshotter="native",
        now=NOW,
    )
    assert snap("s", "native") not in mark(graph.roots, graph.edges)


# -- sweep order (TestGCRemove's ordering) ----------------------------------------------------


def test_snapshots_are_removed_children_before_parents() -> None:
    parents = {"a": "", "b": "a", "c": "b", "d": "a", "e": "", "kept": "a"}
    order = removal_order(["a", "b", "c", "d", "e"], parents)
    assert sorted(order) == ["a", "b", "c", "d", "e"]
    for child, parent in parents.items():
        if child in order and parent in order:
            assert order.index(child) < order.index(parent)
    assert order == ["c", "b", "d", "a", "e"]


def test_removal_order_survives_a_parent_cycle_in_corrupt_metadata() -> None:
    order = removal_order(["x", "y"], {"x": "y", "y": "x"})
    assert sorted(order) == ["x", "y"]


def test_removal_order_tolerates_unknown_parents() -> None:
    assert removal_order(["child"], {"child": "missing"}) == ["child"]


@pytest.mark.parametrize("n", [1, 50, 2000])
def test_removal_order_handles_long_chains_without_recursion(n: int) -> None:
    parents = {f"s{i}": (f"s{i - 1}" if i else "") for i in range(n)}
    assert removal_order(list(parents), parents) == [f"s{i}" for i in reversed(range(n))]


# -- collect: against the real content store and native snapshotter --------------------------


class Stores(NamedTuple):
    env: MetaEnv
    content: LocalContentStore
    snapshots: NativeSnapshotter
    leases: LmdbLeaseManager


@pytest.fixture
def stores(tmp_path: Path, env: MetaEnv) -> Iterator[Stores]:
    snapshotter = NativeSnapshotter(tmp_path / "snapshots", env)
    try:
        yield Stores(
            env, LocalContentStore(tmp_path / "content", env), snapshotter, LmdbLeaseManager(env)
        )
    finally:
        snapshotter.close()


def _committed(
    s: Stores, name: str, parent: str = "", *, labels: dict[str, str] | None = None
) -> Path:
    """Creates committed snapshot ``name`` holding one file; returns its directory."""
    s.snapshots.prepare(f"{name}-active", parent)
    (s.snapshots.path(f"{name}-active") / f"{name}.txt").write_text(name * 100)
    s.snapshots.commit(name, f"{name}-active", labels=labels)
    return s.snapshots.path(name)


def _collect(s: Stores, **kwargs: Any) -> GCStats:
    return collect(s.env, content=s.content, snapshotter=s.snapshots, leases=s.leases, **kwargs)


def _snapshot_keys(s: Stores) -> list[str]:
    return sorted(info.name for info in s.snapshots.walk())


def _digests(s: Stores) -> list[str]:
    return sorted(info.digest for info in s.content.walk())


def _counts(stats: GCStats) -> tuple[int, int, int, int]:
    return (
        stats.content_deleted,
        stats.snapshots_deleted,
        stats.leases_expired,
        stats.ingests_aborted,
    )


def test_collecting_an_empty_cache_deletes_nothing(stores: Stores) -> None:
    stats = _collect(stores)
    assert _counts(stats) == (0, 0, 0, 0)
    assert stats.bytes_freed == 0
    assert stats.duration_s >= 0


def test_leased_blobs_and_snapshots_survive_and_go_once_the_lease_is_deleted(
    stores: Stores,
) -> None:
    s = stores
    base_dir = _committed(s, "base")
    top_dir = _committed(s, "top", "base")
    blob = s.content.write_blob(b"layer blob")
    s.leases.create("rec")
    s.leases.add_resource("rec", Resource("top", "snapshots/native"))
    s.leases.add_resource("rec", Resource(blob.digest, "content"))
    usage = s.snapshots.usage("base").size + s.snapshots.usage("top").size

    assert _counts(_collect(s)) == (0, 0, 0, 0)
    assert _snapshot_keys(s) == ["base", "top"]
    assert _digests(s) == [blob.digest]
    assert base_dir.is_dir()
    assert top_dir.is_dir()
    assert s.content.path(blob.digest).is_file()

    s.leases.delete("rec", synchronous=True)
    stats = _collect(s)
    assert _counts(stats) == (1, 2, 0, 0)
    assert stats.bytes_freed == blob.size + usage
    assert _snapshot_keys(s) == []
    assert _digests(s) == []
    assert not base_dir.exists()
    assert not top_dir.exists()
    assert not s.content.path(blob.digest).exists()
    assert list((s.snapshots.root / "snapshots").iterdir()) == []


def test_unleased_objects_are_collected_while_leased_ones_stay(stores: Stores) -> None:
    s = stores
    kept = s.content.write_blob(b"kept")
    gone = s.content.write_blob(b"gone")
    _committed(s, "kept")
    gone_dir = _committed(s, "gone")
    s.snapshots.prepare("scratch", "")  # an active snapshot nobody leases
    s.leases.create("l")
    s.leases.add_resource("l", Resource(kept.digest, "content"))
    s.leases.add_resource("l", Resource("kept", "snapshots/native"))

    stats = _collect(s)

    assert _counts(stats) == (1, 2, 0, 0)
    assert _digests(s) == [kept.digest]
    assert _snapshot_keys(s) == ["kept"]
    assert not gone_dir.exists()
    assert not s.content.path(gone.digest).exists()


def test_a_flat_lease_keeps_the_snapshot_chain_but_not_what_labels_reference(
    stores: Stores,
) -> None:
    s = stores
    blob1 = s.content.write_blob(b"blob of base")
    blob2 = s.content.write_blob(b"blob of top")
    _committed(s, "base", labels={REF_CONTENT: blob1.digest})
    _committed(s, "mid", "base")
    _committed(s, "top", "mid", labels={REF_CONTENT + ".layer": blob2.digest})
    other_dir = _committed(s, "other", "base")
    s.leases.create("rec", flat=True)
    s.leases.add_resource("rec", Resource("top", "snapshots/native"))

    stats = _collect(s)

    assert _counts(stats) == (2, 1, 0, 0)
    assert _snapshot_keys(s) == ["base", "mid", "top"]
    assert _digests(s) == []
    assert not other_dir.exists()


def test_a_normal_lease_keeps_what_the_snapshot_labels_reference(stores: Stores) -> None:
    s = stores
    blob1 = s.content.write_blob(b"blob of base")
    blob2 = s.content.write_blob(b"blob of top")
    _committed(s, "base", labels={REF_CONTENT: blob1.digest})
    _committed(s, "top", "base", labels={REF_CONTENT + ".layer": blob2.digest})
    s.leases.create("rec")
    s.leases.add_resource("rec", Resource("top", "snapshots/native"))

    assert _counts(_collect(s)) == (0, 0, 0, 0)
    assert _digests(s) == sorted([blob1.digest, blob2.digest])


def test_blob_variant_labels_keep_compression_variants_alive(stores: Stores) -> None:
    # BuildKit linkBlob: the variant and the main blob name each other with
    # "containerd.io/gc.ref.content.blob-<digest>"; the "<id>-variants" lease is not flat.
    s = stores
    main = s.content.write_blob(b"main blob (gzip)")
    variant = s.content.write_blob(
        b"variant blob (zstd)", labels={REF_CONTENT + ".blob-" + main.digest: main.digest}
    )
    s.content.update(
        ContentInfo(main.digest, main.size, labels={REF_CONTENT + ".blob-1": variant.digest}),
        "labels." + REF_CONTENT + ".blob-1",
    )
    s.leases.create("rec", flat=True)
    s.leases.add_resource("rec", Resource(main.digest, "content"))
    s.leases.create("rec-variants")
    s.leases.add_resource("rec-variants", Resource(main.digest, "content"))

    assert _counts(_collect(s)) == (0, 0, 0, 0)
    assert _digests(s) == sorted([main.digest, variant.digest])

    # The flat record lease alone keeps the main blob, not its variant.
    s.leases.delete("rec-variants")
    assert _counts(_collect(s)) == (1, 0, 0, 0)
    assert _digests(s) == [main.digest]

    s.leases.delete("rec")
    assert _counts(_collect(s)) == (1, 0, 0, 0)
    assert _digests(s) == []


def test_the_variant_lease_alone_keeps_both_blobs_through_their_mutual_labels(
    stores: Stores,
) -> None:
    s = stores
    main = s.content.write_blob(b"main")
    variant = s.content.write_blob(
        b"variant", labels={REF_CONTENT + ".blob-" + main.digest: main.digest}
    )
    s.content.update(
        ContentInfo(main.digest, main.size, labels={REF_CONTENT + ".blob-1": variant.digest}),
        "labels." + REF_CONTENT + ".blob-1",
    )
    s.leases.create("rec-variants")
    s.leases.add_resource("rec-variants", Resource(variant.digest, "content"))

    assert _counts(_collect(s)) == (0, 0, 0, 0)
    s.leases.delete("rec-variants")
    stats = _collect(s)
    assert _counts(stats) == (2, 0, 0, 0)  # an unreachable cycle is collected whole
    assert stats.bytes_freed == main.size + variant.size


def test_gc_root_labels_keep_blobs_and_snapshots_without_any_lease(stores: Stores) -> None:
    s = stores
    rooted = s.content.write_blob(b"rooted", labels={ROOT: "always"})
    referenced = s.content.write_blob(b"referenced")
    _committed(s, "base")
    _committed(s, "rooted", "base", labels={ROOT: "1", REF_CONTENT: referenced.digest})
    s.content.write_blob(b"loose")

    assert _counts(_collect(s)) == (1, 0, 0, 0)
    assert _digests(s) == sorted([rooted.digest, referenced.digest])
    assert _snapshot_keys(s) == ["base", "rooted"]


def test_a_back_reference_keeps_a_blob_while_its_snapshot_is_leased(stores: Stores) -> None:
    s = stores
    _committed(s, "snap")
    blob = s.content.write_blob(b"attached", labels={BREF_SNAPSHOT + "native": "snap"})
    s.leases.create("l")
    s.leases.add_resource("l", Resource("snap", "snapshots/native"))

    assert _counts(_collect(s)) == (0, 0, 0, 0)
    assert _digests(s) == [blob.digest]
    s.leases.delete("l")
    assert _counts(_collect(s)) == (1, 1, 0, 0)


def test_an_expired_lease_is_deleted_with_everything_only_it_held(stores: Stores) -> None:
    s = stores
    blob = s.content.write_blob(b"temporary")
    snap_dir = _committed(s, "tmp")
    now = datetime.now(UTC)
    s.leases.create("short", expire=now + timedelta(hours=1), temporary=True)
    s.leases.add_resource("short", Resource(blob.digest, "content"))
    s.leases.add_resource("short", Resource("tmp", "snapshots/native"))
    s.leases.create("forever")

    assert _counts(_collect(s, now=now)) == (0, 0, 0, 0)

    stats = _collect(s, now=now + timedelta(hours=2))
    assert _counts(stats) == (1, 1, 1, 0)
    assert [lease.id for lease in s.leases.list()] == ["forever"]
    with s.env.read_txn() as txn:
        assert list(txn.keys(DB_LEASE_RESOURCES)) == []
    assert not snap_dir.exists()
    assert not s.content.path(blob.digest).exists()


def test_expired_leases_are_deleted_without_a_lease_manager(stores: Stores) -> None:
    s = stores
    blob = s.content.write_blob(b"x")
    s.leases.create("old", expire=datetime(2000, 1, 1, tzinfo=UTC))
    s.leases.add_resource("old", Resource(blob.digest, "content"))
    stats = collect(s.env, content=s.content, snapshotter=s.snapshots)
    assert _counts(stats) == (1, 0, 1, 0)
    assert s.leases.list() == []
    with s.env.read_txn() as txn:
        assert list(txn.keys(DB_LEASE_RESOURCES)) == []


def test_snapshots_are_removed_children_first(stores: Stores) -> None:
    s = stores
    dirs = [_committed(s, "c1"), _committed(s, "c2", "c1"), _committed(s, "c3", "c2")]
    s.snapshots.prepare("active-on-c3", "c3")
    s.snapshots.view("view-of-c2", "c2")
    dirs.append(s.snapshots.path("active-on-c3"))
    expected_bytes = sum(s.snapshots.usage(k).size for k in ("c1", "c2", "c3"))

    stats = _collect(s)

    # The snapshotter refuses to remove a snapshot with children: all five went, so every
    # child went before its parent.
    assert _counts(stats) == (0, 5, 0, 0)
    assert stats.bytes_freed == expected_bytes
    assert _snapshot_keys(s) == []
    assert [d.exists() for d in dirs] == [False] * 4


def test_a_view_leased_by_a_temporary_flat_lease_keeps_its_parents(stores: Stores) -> None:
    # BuildKit's "<id>-view" lease holding the "<snapshotID>-view" snapshot.
    s = stores
    _committed(s, "base")
    _committed(s, "rec", "base")
    s.leases.create("rec-view", flat=True, temporary=True)
    s.leases.add_resource("rec-view", Resource("rec-view", "snapshots/native"))
    s.snapshots.view("rec-view", "rec")

    assert _counts(_collect(s)) == (0, 0, 0, 0)
    assert s.leases.delete_temporary() == 1
    assert _counts(_collect(s)) == (0, 3, 0, 0)


def test_nothing_is_deleted_when_the_sweep_transaction_fails(stores: Stores) -> None:
    s = stores
    blobs = [s.content.write_blob(f"blob {i}".encode()) for i in range(3)]
    dirs = [_committed(s, "p"), _committed(s, "q", "p")]
    digests = sorted(b.digest for b in blobs)

    class FailingContent:
        """The real store, failing after its last delete, inside the sweep's transaction."""

        def __init__(self, real: LocalContentStore) -> None:
            self.real = real
            self.deleted: list[str] = []

        def delete(self, digest: str, *, txn: WriteTxn | None = None) -> None:
            self.real.delete(digest, txn=txn)
            self.deleted.append(digest)
            if len(self.deleted) == len(blobs):
                msg = "simulated failure before commit"
                raise RuntimeError(msg)

        def list_statuses(self, *filters: str) -> list[ContentStatus]:
            return self.real.list_statuses(*filters)

        def abort(self, ref: str, *, txn: WriteTxn | None = None) -> None:
            self.real.abort(ref, txn=txn)

    failing = FailingContent(s.content)
    with pytest.raises(RuntimeError, match="simulated failure"):
        collect(s.env, content=failing, snapshotter=s.snapshots)

    assert sorted(failing.deleted) == digests  # the sweep did run up to the end
    assert _digests(s) == digests
    assert _snapshot_keys(s) == ["p", "q"]
    assert all(s.content.path(d).is_file() for d in digests)
    assert all(d.is_dir() for d in dirs)

    stats = _collect(s)
    assert _counts(stats) == (3, 2, 0, 0)
    assert not any(s.content.path(d).exists() for d in digests)
    assert not any(d.exists() for d in dirs)


def test_corrupt_metadata_stops_collection_before_anything_is_deleted(stores: Stores) -> None:
    s = stores
    blob = s.content.write_blob(b"innocent")
    with s.env.write_txn() as txn:
        txn.put(DB_SNAPSHOTS, b"broken", b"\xc1")
    with pytest.raises(CorruptMetadataError, match="'broken'"):
        _collect(s)
    assert s.content.path(blob.digest).is_file()
    assert _digests(s) == [blob.digest]


def test_a_naive_now_is_refused(stores: Stores) -> None:
    with pytest.raises(InvalidError, match="no time zone"):
        _collect(stores, now=datetime(2030, 1, 1))


def test_leased_ingests_are_kept_and_stale_unleased_ones_are_aborted(stores: Stores) -> None:
    s = stores
    for ref in ("leased", "stale", "open"):
        writer = s.content.writer(ref, total=10)
        writer.write(b"abc")
        if ref != "open":
            writer.close()
        else:
            open_writer = writer
    s.leases.create("l")
    s.leases.add_resource("l", Resource("leased", "ingests"))
    later = datetime.now(UTC) + timedelta(days=2)
    try:
        # Fresh ingests are kept whoever holds them.
        assert _counts(_collect(s)) == (0, 0, 0, 0)
        assert _counts(_collect(s, ingest_expiry=None, now=later)) == (0, 0, 0, 0)

        stats = _collect(s, now=later)
        # "open" has a writer in this process: never aborted under it.
        assert _counts(stats) == (0, 0, 0, 1)
        assert [st.ref for st in s.content.list_statuses()] == ["leased", "open"]
    finally:
        open_writer.close()


def test_resource_links_of_a_missing_lease_keep_nothing_and_are_dropped(stores: Stores) -> None:
    s = stores
    blob = s.content.write_blob(b"linked by a ghost")
    with s.env.write_txn() as txn:
        txn.put(DB_LEASE_RESOURCES, b"ghost\x00content\x00" + blob.digest.encode(), b"")
    assert _counts(_collect(s)) == (1, 0, 0, 0)
    with s.env.read_txn() as txn:
        assert list(txn.keys(DB_LEASE_RESOURCES)) == []
    s.leases.create("ghost")
    assert s.leases.list_resources("ghost") == []


def test_an_object_leased_in_its_creating_transaction_is_never_collected(
    stores: Stores,
) -> None:
    s = stores
    with s.env.write_txn() as txn:
        s.leases.create("rec", flat=True, txn=txn)
        s.leases.add_resource("rec", Resource("rec", "snapshots/native"), txn=txn)
        s.snapshots.prepare("rec", "", txn=txn)
        blob = s.content.write_blob(b"blob of rec", txn=txn)
        s.leases.add_resource("rec", Resource(blob.digest, "content"), txn=txn)
    assert _counts(_collect(s)) == (0, 0, 0, 0)
    assert _snapshot_keys(s) == ["rec"]
    assert _digests(s) == [blob.digest]


# -- bounded sweep transactions ---------------------------------------------------------------


class _CountingRemover:
    """The real snapshotter, counting the sweep transactions its removals ran in."""

    def __init__(self, real: NativeSnapshotter) -> None:
        self.real = real
        self.txns: list[WriteTxn] = []  # kept alive: ids of freed objects are reused
        self.after_first: Any = None

    @property
    def name(self) -> str:
        return self.real.name

    def remove(self, key: str, *, txn: WriteTxn | None = None) -> None:
        assert txn is not None
        if not any(t is txn for t in self.txns):
            self.txns.append(txn)
            if len(self.txns) == 1 and self.after_first is not None:
                # Runs between the first sweep transaction and the second, with the write
                # lock free: another writer's turn.
                txn.after_unlock(self.after_first)
        self.real.remove(key, txn=txn)


def test_the_sweep_runs_in_bounded_transactions(stores: Stores) -> None:
    s = stores
    dirs = [_committed(s, f"s{i}") for i in range(5)]
    remover = _CountingRemover(s.snapshots)
    stats = collect(s.env, content=s.content, snapshotter=remover, batch=2)
    assert stats.snapshots_deleted == 5
    assert len(remover.txns) == 3  # 2 + 2 + 1 removals
    assert _snapshot_keys(s) == []
    assert not any(d.exists() for d in dirs)
    with pytest.raises(InvalidError, match="batch"):
        collect(s.env, content=s.content, snapshotter=s.snapshots, batch=0)


def test_a_write_between_sweep_transactions_spares_what_it_makes_reachable(
    stores: Stores,
) -> None:
    s = stores
    # Removed children first: "leaf" goes in the first transaction, "mid" and "base" would
    # go in the next ones, but a lease taken on "mid" meanwhile keeps it and its parent.
    _committed(s, "base")
    _committed(s, "mid", "base")
    _committed(s, "leaf", "mid")
    blob = s.content.write_blob(b"blob labelled later")
    remover = _CountingRemover(s.snapshots)

    def another_writer() -> None:
        s.leases.create("late")
        s.leases.add_resource("late", Resource("mid", "snapshots/native"))
        s.snapshots.update(
            SnapshotInfo(
                Kind.COMMITTED, "mid", labels={"containerd.io/gc.ref.content": blob.digest}
            ),
            "labels.containerd.io/gc.ref.content",
        )

    remover.after_first = another_writer
    stats = collect(s.env, content=s.content, snapshotter=remover, batch=1)
    assert stats.snapshots_deleted == 1
    assert stats.content_deleted == 0
    assert _snapshot_keys(s) == ["base", "mid"]
    assert _digests(s) == [blob.digest]
    # The next collection sees the same: everything left is reachable.
    assert _counts(_collect(s)) == (0, 0, 0, 0)


def test_a_failed_sweep_transaction_keeps_the_ones_before_it(stores: Stores) -> None:
    s = stores
    for i in range(4):
        _committed(s, f"s{i}")

    class FailingSecond(_CountingRemover):
        def remove(self, key: str, *, txn: WriteTxn | None = None) -> None:
            super().remove(key, txn=txn)
            if len(self.txns) == 2:
                msg = "simulated failure in the second transaction"
                raise RuntimeError(msg)

    with pytest.raises(RuntimeError, match="second transaction"):
        collect(s.env, content=s.content, snapshotter=FailingSecond(s.snapshots), batch=2)
    left = _snapshot_keys(s)
    assert len(left) == 2  # the first transaction's two removals stayed committed
    assert s.snapshots.missing() == []
    assert _collect(s).snapshots_deleted == 2
    assert _snapshot_keys(s) == []
