"""Mark-and-sweep garbage collection over leases and ``containerd.io/gc.*`` labels.

A port of containerd's metadata GC (``core/metadata/gc.go``, ``db.go``, ``pkg/gc/gc.go``) for
the one LMDB environment. refcache never deletes a blob or a snapshot directly: the manager
deletes *leases* and then calls :func:`collect` (BuildKit's ``Prune`` ends with
``GarbageCollect()``).

Three layers, so the semantics can be tested without backends:

* :func:`label_refs` reads one object's labels (``gc.ref.*``, ``gc.bref.*``, ``gc.root``);
* :func:`build_graph` turns plain facts (leases with their resources, content labels,
  snapshot parents and labels) into roots and edges, as containerd's ``scanRoots`` and
  ``references`` do;
* :func:`mark` is containerd's ``gc.Tricolor`` over those roots and edges.

:func:`collect` reads the facts from ``DB_LEASES``/``DB_LEASE_RESOURCES``/``DB_CONTENT``/
``DB_SNAPSHOTS`` in one read snapshot and marks without any lock, then sweeps in bounded
write transactions (:data:`GC_BATCH` deletions or :data:`GC_BATCH_SECONDS` each), releasing
the write lock between two, so that a collection of thousands of objects never holds up the
other writers for long. Writes made after the snapshot are watched
(:meth:`MetaEnv.watch_writes`) and whatever they may have made reachable again is spared.
The backends' ``delete``/``remove`` take the sweep's transaction and schedule their file
deletions after its commit (a snapshot tree is renamed into the trash and deleted by its
background worker), so files go only once the metadata that forgot them has committed (a
crash leaves orphan files, never dangling records).

What callers must do (containerd puts the context's lease on every object it creates, in the
creating transaction; refcache has no context lease): an object must be leased *no later
than* the transaction that creates it. Either add the lease resource first (resources are
not checked, BuildKit adds the snapshot resource before ``Prepare``) or create the object with
``txn=`` and add the resource in that same transaction. A blob committed in one transaction
and leased in a later one can be collected in between.

Concurrency: :func:`collect` holds the environment's write lock only inside each sweep
transaction; the backends' own locks are leaf locks taken inside it, so no lock-order
inversion arises. Readers are never blocked (LMDB MVCC).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, Protocol

import msgpack

from ._env import (
    DB_CONTENT,
    DB_LEASE_RESOURCES,
    DB_LEASES,
    DB_SNAPSHOTS,
    MetaEnv,
    ReadTxn,
    WriteTxn,
    WriteWatch,
)
from ._errors import (
    CorruptMetadataError,
    FailedPreconditionError,
    InvalidError,
    LockedError,
    NotFoundError,
)
from ._leases import (
    LABEL_GC_FLAT,
    RESOURCE_CONTENT,
    RESOURCE_INGESTS,
    RESOURCE_SNAPSHOTS,
    LeaseManager,
    Resource,
    decode_lease,
    labels_expired,
    parse_resource_key,
)

__all__ = [
    "LABEL_GC_BREF_CONTENT",
    "LABEL_GC_BREF_SNAPSHOT",
    "LABEL_GC_REF_CONTENT",
    "LABEL_GC_REF_SNAPSHOT",
    "LABEL_GC_ROOT",
    "NODE_CONTENT",
    "NODE_INGEST",
    "NODE_LEASE",
    "DEFAULT_INGEST_EXPIRY",
    "ContentSweeper",
    "Edge",
    "GCStats",
    "Graph",
    "LabelRefs",
    "LeaseFacts",
    "Node",
    "Root",
    "SnapshotFacts",
    "SnapshotRemover",
    "build_graph",
    "collect",
    "label_refs",
    "mark",
    "removal_order",
    "snapshot_node",
]

logger = logging.getLogger(__name__)

#: Makes a blob or snapshot a GC root (any value; containerd matches it as a key prefix).
LABEL_GC_ROOT = "containerd.io/gc.root"
#: ``…content``, ``…content.<x>`` or ``…content/<x>`` -> the labelled object keeps that blob.
LABEL_GC_REF_CONTENT = "containerd.io/gc.ref.content"
#: ``…snapshot.<snapshotter>[/<x>]`` -> the labelled object keeps that snapshot.
LABEL_GC_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot."
#: Back reference: the labelled object is kept alive *by* the named blob.
LABEL_GC_BREF_CONTENT = "containerd.io/gc.bref.content"
#: Back reference: the labelled object is kept alive *by* the named snapshot.
LABEL_GC_BREF_SNAPSHOT = "containerd.io/gc.bref.snapshot."

NODE_CONTENT = RESOURCE_CONTENT  #: node type of a blob (id = digest)
NODE_INGEST = RESOURCE_INGESTS  #: node type of an ingest (id = ref)
NODE_LEASE = "leases"  #: node type of a lease (id = lease id)


# -- graph model ----------------------------------------------------------------------------


class Node(NamedTuple):
    """One collectable object.

    ``type`` is ``"content"``, ``"ingests"``, ``"leases"`` or ``"snapshots/<snapshotter>"``
    (the lease resource types, so a resource maps to a node one to one); ``id`` is the
    digest, ref, lease id or snapshot key.
    """

    type: str
    id: str


class Root(NamedTuple):
    """A root of the mark phase; a *flat* root (from a flat lease) follows only parents."""

    node: Node
    flat: bool = False


class Edge(NamedTuple):
    """A reference from one node to ``target``.

    ``parent`` edges (snapshot -> parent) are followed by every visit and keep the visit's
    flatness; other edges (``gc.ref`` labels and back references) are followed only by
    non-flat visits and lead to non-flat visits (containerd's ``references``).
    """

    target: Node
    parent: bool = False


def snapshot_node(snapshotter: str, key: str) -> Node:
    """Returns the node of snapshot ``key`` of ``snapshotter``."""
    return Node(f"{RESOURCE_SNAPSHOTS}/{snapshotter}", key)


def mark(
    roots: Iterable[Root | Node],
    edges: Mapping[Node, Iterable[Edge | Node]] | Callable[[Node], Iterable[Edge | Node]],
) -> set[Node]:
    """Returns every node reachable from ``roots`` (containerd's ``gc.Tricolor``).

    A node may be visited twice, once flat and once not (containerd keys its ``seen`` set on
    the type *with* the flat bit and strips the bit only when marking), so a blob reached by
    a flat lease first and by a normal reference later still has its references followed.

    Args:
        roots: Root nodes; a bare :class:`Node` is a non-flat root.
        edges: Outgoing edges per node, as a mapping or a function; a bare :class:`Node`
            is a non-parent edge. Targets need not exist (dead edges are harmless: the
            sweep only looks at existing objects).

    Returns:
        The marked (reachable) nodes.
    """
    lookup: Callable[[Node], Iterable[Edge | Node]]
    if callable(edges):
        lookup = edges
    else:
        table = edges

        def lookup(node: Node) -> Iterable[Edge | Node]:
            return table.get(node, ())

    stack: list[tuple[Node, bool]] = []
    seen: set[tuple[Node, bool]] = set()
    for root in roots:
        visit = (root.node, root.flat) if isinstance(root, Root) else (root, False)
        if visit not in seen:
            seen.add(visit)
            stack.append(visit)
    reachable: set[Node] = set()
    while stack:
        node, flat = stack.pop()
        for edge in lookup(node):
            if isinstance(edge, Edge):
                target, is_parent = edge.target, edge.parent
            else:
                target, is_parent = edge, False
            if flat and not is_parent:
                continue  # flat visits keep the parent chain only
            visit = (target, flat if is_parent else False)
            if visit not in seen:
                seen.add(visit)
                stack.append(visit)
        reachable.add(node)
    return reachable


# -- labels ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabelRefs:
    """What one object's labels say to the collector.

    Attributes:
        refs: Objects this one keeps alive (``gc.ref.*``), followed on non-flat visits.
        brefs: Objects that keep *this one* alive (``gc.bref.*``): each becomes an edge
            from that object to this one.
        root: Whether a ``containerd.io/gc.root`` label makes this object a root.
    """

    refs: tuple[Node, ...] = ()
    brefs: tuple[Node, ...] = ()
    root: bool = False


def _named(key: str, prefix: str) -> bool:
    # containerd: the key equals the prefix or continues with '.' or '/', so
    # "gc.ref.contentX" is not a reference but "gc.ref.content.blob-0" is.
    return key == prefix or key[len(prefix)] in "./"


def _snapshotter_of(key: str, prefix: str) -> str:
    # containerd: "<prefix><snapshotter>[/<anything>]".
    return key[len(prefix) :].split("/", 1)[0]


def label_refs(labels: Mapping[str, str]) -> LabelRefs:
    """Parses the GC labels of a blob or snapshot (containerd's ``sendLabelRefs`` handlers).

    Returns:
        The references, back references and root flag the labels carry.
    """
    refs: list[Node] = []
    brefs: list[Node] = []
    root = False
    for key in sorted(labels):
        value = labels[key]
        if key.startswith(LABEL_GC_ROOT):
            root = True
        elif key.startswith(LABEL_GC_REF_CONTENT):
            if _named(key, LABEL_GC_REF_CONTENT):
                refs.append(Node(NODE_CONTENT, value))
        elif key.startswith(LABEL_GC_REF_SNAPSHOT):
            refs.append(snapshot_node(_snapshotter_of(key, LABEL_GC_REF_SNAPSHOT), value))
        elif key.startswith(LABEL_GC_BREF_CONTENT):
            if _named(key, LABEL_GC_BREF_CONTENT):
                brefs.append(Node(NODE_CONTENT, value))
        elif key.startswith(LABEL_GC_BREF_SNAPSHOT):
            brefs.append(snapshot_node(_snapshotter_of(key, LABEL_GC_BREF_SNAPSHOT), value))
    return LabelRefs(refs=tuple(refs), brefs=tuple(brefs), root=root)


# -- facts -> graph -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseFacts:
    """A lease as the collector sees it: its labels and its resources."""

    labels: Mapping[str, str] = field(default_factory=dict)
    resources: tuple[Resource, ...] = ()


@dataclass(frozen=True, slots=True)
class SnapshotFacts:
    """A snapshot as the collector sees it: its parent key (``""`` for none) and labels."""

    parent: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Graph:
    """Roots and edges of one collection, plus the leases that expired."""

    roots: tuple[Root, ...]
    edges: Mapping[Node, tuple[Edge, ...]]
    expired_leases: tuple[str, ...]


def build_graph(
    *,
    leases: Mapping[str, LeaseFacts],
    content: Mapping[str, Mapping[str, str]],
    snapshots: Mapping[str, SnapshotFacts],
    snapshotter: str,
    now: datetime,
) -> Graph:
    """Builds the GC graph from plain facts (containerd's ``scanRoots`` + ``references``).

    Roots: every unexpired lease (the lease node and each of its resources, flat when the
    lease has ``containerd.io/gc.flat``), and every blob or snapshot labelled
    ``containerd.io/gc.root``. Edges: snapshot -> parent (a parent edge); blob/snapshot ->
    its ``gc.ref`` targets; and for each ``gc.bref`` label, named object -> labelled object.
    Back references hang off the *non-flat* node only, as containerd keys them, so a flat
    lease on a blob does not keep what back-references that blob.

    Args:
        leases: Lease id -> facts.
        content: Digest -> labels of every blob.
        snapshots: Key -> facts of every snapshot of ``snapshotter``.
        snapshotter: The snapshotter's name (``snapshots/<name>`` resources and labels).
        now: Expiry threshold (aware).

    Returns:
        The graph; :attr:`Graph.expired_leases` lists the leases that are not roots.
    """
    roots: list[Root] = []
    expired_ids: list[str] = []
    for lease_id, facts in leases.items():
        if labels_expired(facts.labels, now):
            expired_ids.append(lease_id)
            continue
        flat = LABEL_GC_FLAT in facts.labels
        roots.append(Root(Node(NODE_LEASE, lease_id)))
        for res in facts.resources:
            # Ingests have no flat variant in containerd; blobs and snapshots do.
            roots.append(Root(Node(res.type, res.id), flat and res.type != NODE_INGEST))

    edges: dict[Node, list[Edge]] = {}

    def add(source: Node, edge: Edge) -> None:
        edges.setdefault(source, []).append(edge)

    def scan_labels(node: Node, labels: Mapping[str, str]) -> None:
        parsed = label_refs(labels)
        if parsed.root:
            roots.append(Root(node))
        for target in parsed.refs:
            add(node, Edge(target))
        for holder in parsed.brefs:
            add(holder, Edge(node))

    for digest, labels in content.items():
        scan_labels(Node(NODE_CONTENT, digest), labels)
    for key, snap in snapshots.items():
        node = snapshot_node(snapshotter, key)
        if snap.parent:
            add(node, Edge(snapshot_node(snapshotter, snap.parent), parent=True))
        scan_labels(node, snap.labels)
    return Graph(
        roots=tuple(roots),
        edges={k: tuple(v) for k, v in edges.items()},
        expired_leases=tuple(expired_ids),
    )


def removal_order(doomed: Iterable[str], parents: Mapping[str, str]) -> list[str]:
    """Orders snapshot keys so every child comes before its parent.

    containerd's backend GC removes children first because a snapshot with children cannot
    be removed. Keys are sorted deepest first (ties by key, for a stable order); a parent
    cycle in corrupt metadata cannot loop forever.

    Args:
        doomed: The keys to remove.
        parents: Key -> parent key (``""`` or absent for none), for every known snapshot.

    Returns:
        The keys of ``doomed``, children before parents.
    """
    depth: dict[str, int] = {}

    def depth_of(key: str) -> int:
        chain: list[str] = []
        on_chain: set[str] = set()
        cur = key
        while cur and cur not in depth and cur not in on_chain:
            chain.append(cur)
            on_chain.add(cur)
            cur = parents.get(cur, "")
        base = depth.get(cur, 0) if cur else 0
        for k in reversed(chain):
            base += 1
            depth[k] = base
        return depth[key]

    keys = set(doomed)
    return sorted(keys, key=lambda k: (-depth_of(k), k))


# -- collection -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GCStats:
    """What one :func:`collect` run did.

    Attributes:
        content_deleted: Blobs deleted.
        snapshots_deleted: Snapshots removed.
        leases_expired: Expired leases deleted.
        ingests_aborted: Stale ingests no live lease held, aborted.
        bytes_freed: Sizes of the deleted blobs plus the recorded usage of the removed
            snapshots (active snapshots have no recorded usage and count 0; aborted ingests
            are not counted).
        duration_s: Wall time of the whole run, in seconds.
    """

    content_deleted: int = 0
    snapshots_deleted: int = 0
    leases_expired: int = 0
    ingests_aborted: int = 0
    bytes_freed: int = 0
    duration_s: float = 0.0


class _IngestStatus(Protocol):
    @property
    def ref(self) -> str: ...

    @property
    def updated_at(self) -> int: ...


class ContentSweeper(Protocol):
    """The part of the content store the sweep uses (:class:`LocalContentStore` has it)."""

    def delete(self, digest: str, *, txn: WriteTxn | None = None) -> None:
        """Forgets a blob inside ``txn``; its file goes after commit."""
        ...

    def list_statuses(self, *filters: str) -> Sequence[_IngestStatus]:
        """Lists the ingests (in-progress writes)."""
        ...

    def abort(self, ref: str, *, txn: WriteTxn | None = None) -> None:
        """Aborts an ingest after ``txn`` commits."""
        ...


class SnapshotRemover(Protocol):
    """The part of the snapshotter the sweep uses."""

    @property
    def name(self) -> str:
        """The snapshotter's name (``snapshots/<name>`` resources)."""
        ...

    def remove(self, key: str, *, txn: WriteTxn | None = None) -> None:
        """Forgets a snapshot inside ``txn``; its directory goes after commit."""
        ...


#: containerd gives an ingest written outside any lease ``expireat = now + 24h``.
DEFAULT_INGEST_EXPIRY = timedelta(hours=24)

#: Deletions per sweep transaction (the write lock is released between two).
GC_BATCH = 512
#: A sweep transaction takes no more deletions once it has run this long (seconds).
GC_BATCH_SECONDS = 0.02

# The databases whose writes can make an unmarked object reachable again (see _Rescue).
_WATCHED = (DB_LEASES, DB_LEASE_RESOURCES, DB_CONTENT, DB_SNAPSHOTS)

# One deletion of the sweep: what kind, and the id.
_LEASE, _LINKS, _SNAPSHOT, _BLOB, _INGEST = range(5)


class _Rescue:
    """What writes since the mark made reachable again, among the unmarked objects.

    The mark ran on a snapshot of the metadata; the sweep runs in several transactions,
    and other writers work in between. The only way an object unmarked in the snapshot can
    become reachable is a write that references it: a lease resource link, a snapshot
    (its parent, its labels, the children index), a blob's labels, or a lease renewed. Every
    such write is noted by the environment's :class:`~storage._env.WriteWatch`; before
    each sweep transaction the new notes are turned into *spared* nodes, with everything
    the spared nodes reach in the marked graph. Conservative (a write that rolled back
    spares too): what is spared waits for the next collection.
    """

    def __init__(self, graph: Graph, leases: Mapping[str, LeaseFacts], snapshotter: str) -> None:
        self._edges = graph.edges
        self._leases = leases
        self._snapshotter = snapshotter
        self._expired = set(graph.expired_leases)
        self.spared: set[Node] = set()
        self.renewed: set[str] = set()

    def absorb(self, notes: Sequence[tuple[str, bytes, bytes]], doomed: set[Node]) -> None:
        """Spares what ``notes`` (from :meth:`WriteWatch.drain`) may have made reachable.

        Raises:
            CorruptMetadataError: A noted record cannot be decoded (the sweep stops: it
                cannot tell what the write referenced).
        """
        if not notes:
            return
        roots: list[Node] = []
        for db, key, value in notes:
            if db == DB_LEASE_RESOURCES:
                _, res = parse_resource_key(key)
                roots.append(Node(res.type, res.id))
            elif db == DB_SNAPSHOTS:
                roots.extend(self._snapshot_refs(key, value))
            elif db == DB_CONTENT:
                digest = _decode_key(key, what="content")
                roots.append(Node(NODE_CONTENT, digest))
                record = _unpack_map(value, what="blob", key=digest)
                labels = _labels_of(record, what="blob", key=digest)
                roots.extend(label_refs(labels).refs)
            elif db == DB_LEASES:
                lease_id = _decode_key(key, what="lease")
                if lease_id in self._expired:
                    self.renewed.add(lease_id)
                    facts = self._leases.get(lease_id)
                    roots.extend(Node(r.type, r.id) for r in (facts.resources if facts else ()))
        stack = [n for n in roots if n in doomed and n not in self.spared]
        while stack:
            node = stack.pop()
            if node in self.spared:
                continue
            self.spared.add(node)
            for edge in self._edges.get(node, ()):
                if edge.target in doomed and edge.target not in self.spared:
                    stack.append(edge.target)

    def _snapshot_refs(self, key: bytes, value: bytes) -> list[Node]:
        if key.startswith(b"\x00parent\x00"):
            # The children index: \0parent\0<parent>\0<child>, the parent gains a child.
            raw_parent = key[len(b"\x00parent\x00") :].split(b"\x00", 1)[0]
            return [snapshot_node(self._snapshotter, _decode_key(raw_parent, what="snapshot"))]
        if key.startswith(b"\x00"):
            return []  # the snapshotter's own counters
        name = _decode_key(key, what="snapshot")
        record = _unpack_map(value, what="snapshot", key=name)
        out = [snapshot_node(self._snapshotter, name)]
        parent = record.get("parent") or ""
        if isinstance(parent, str) and parent:
            out.append(snapshot_node(self._snapshotter, parent))
        out.extend(label_refs(_labels_of(record, what="snapshot", key=name)).refs)
        return out


def collect(
    env: MetaEnv,
    *,
    content: ContentSweeper,
    snapshotter: SnapshotRemover,
    leases: LeaseManager | None = None,
    now: datetime | None = None,
    ingest_expiry: timedelta | None = DEFAULT_INGEST_EXPIRY,
    batch: int = GC_BATCH,
) -> GCStats:
    """Runs one garbage collection: mark from the roots, sweep everything else.

    Mark: on one read snapshot of the metadata (every lease, resource link, blob record and
    snapshot record; :func:`build_graph`, :func:`mark`), without the write lock. Sweep: in
    write transactions of at most ``batch`` deletions (and :data:`GC_BATCH_SECONDS`), the
    write lock released between two, so other writers wait for one small transaction at
    most: delete expired leases with their links; remove unmarked snapshots children first
    (``snapshotter.remove(key, txn=…)``); delete unmarked blobs
    (``content.delete(digest, txn=…)``); abort stale unleased ingests. Writes made since the
    mark snapshot are watched (:meth:`MetaEnv.watch_writes`): anything they may have made
    reachable again is spared (see :class:`_Rescue`). Files are deleted by the backends'
    after-commit callbacks (snapshot trees by the trash's worker), so if a transaction
    fails, nothing it forgot is deleted; the transactions before it stay committed, and the
    next collection finds the rest.

    A snapshot or blob the backend refuses (``FailedPreconditionError``) or no longer knows
    (``NotFoundError``) is logged and skipped, as containerd's backend GC does.

    Ingests: one held by a live lease is kept. containerd gives an unleased ingest an expiry
    (24 hours from its creation) and aborts it once that has passed; the local store keeps no
    expiry, so an unleased ingest is aborted when its last write is older than
    ``ingest_expiry`` (an ingest with an open writer is never aborted).

    Args:
        env: The metadata environment (writable).
        content: The content store.
        snapshotter: The snapshotter (its ``name`` selects ``snapshots/<name>`` resources).
        leases: The lease manager, used to delete expired leases; ``None`` deletes their
            records directly (the layout is fixed by the conventions).
        now: Expiry threshold (aware); defaults to the current time.
        ingest_expiry: Age past which an unleased ingest is aborted; ``None`` keeps every
            ingest.
        batch: Deletions per sweep transaction (at least 1).

    Returns:
        What was deleted.

    Raises:
        InvalidError: ``now`` is naive, or ``batch`` is not a positive int.
        CorruptMetadataError: A record cannot be decoded (nothing is deleted: collecting
            on a misread graph could delete live data).
    """
    started = time.monotonic()
    threshold = now if now is not None else datetime.now(UTC)
    if threshold.tzinfo is None or threshold.utcoffset() is None:
        msg = f"now={threshold!r} has no time zone; pass an aware datetime"
        raise InvalidError(msg)
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        msg = f"batch must be a positive int, not {batch!r}"
        raise InvalidError(msg)
    sn_name = snapshotter.name
    sn_type = f"{RESOURCE_SNAPSHOTS}/{sn_name}"
    with env.watch_writes(_WATCHED) as watch:
        with watch.snapshot as rtxn:
            lease_facts, ghosts = _read_leases(rtxn)
            blobs = _read_content(rtxn)
            snaps = _read_snapshots(rtxn)
        graph = build_graph(
            leases=lease_facts,
            content={d: labels for d, (_, labels) in blobs.items()},
            snapshots={k: facts for k, (facts, _) in snaps.items()},
            snapshotter=sn_name,
            now=threshold,
        )
        work, doomed = _plan_sweep(
            graph, ghosts, snaps, blobs, content, sn_type, threshold, ingest_expiry
        )
        rescue = _Rescue(graph, lease_facts, sn_name)
        sweep = _Sweep(rescue, sn_type, content, snapshotter, leases, threshold, snaps, blobs)
        done, bytes_freed = _sweep_batches(env, watch, work, doomed, sweep, batch)
    stats = GCStats(
        content_deleted=done[_BLOB],
        snapshots_deleted=done[_SNAPSHOT],
        leases_expired=done[_LEASE],
        ingests_aborted=done[_INGEST],
        bytes_freed=bytes_freed,
        duration_s=time.monotonic() - started,
    )
    logger.info(
        "gc: deleted %d blobs, %d snapshots, %d expired leases, %d ingests; %d bytes in %.3fs",
        stats.content_deleted,
        stats.snapshots_deleted,
        stats.leases_expired,
        stats.ingests_aborted,
        stats.bytes_freed,
        stats.duration_s,
    )
    return stats


def _plan_sweep(
    graph: Graph,
    ghosts: Iterable[str],
    snaps: dict[str, Any],
    blobs: dict[str, Any],
    content: ContentSweeper,
    sn_type: str,
    threshold: datetime,
    ingest_expiry: timedelta | None,
) -> tuple[list[tuple[int, str]], set[Node]]:
    """What one collection deletes, in order (lease links, expired leases, unmarked
    snapshots children first, unmarked blobs, stale ingests), and the doomed nodes."""
    marked = mark(graph.roots, graph.edges)
    doomed_snaps = [k for k in snaps if Node(sn_type, k) not in marked]
    parents = {k: facts.parent for k, (facts, _) in snaps.items()}
    work: list[tuple[int, str]] = [(_LINKS, lid) for lid in ghosts]
    work += [(_LEASE, lid) for lid in graph.expired_leases]
    work += [(_SNAPSHOT, k) for k in removal_order(doomed_snaps, parents)]
    work += [(_BLOB, d) for d in blobs if Node(NODE_CONTENT, d) not in marked]
    if ingest_expiry is not None:
        stale_ns = int((threshold - ingest_expiry).timestamp() * 1e9)
        work += [
            (_INGEST, st.ref)
            for st in content.list_statuses()
            if Node(NODE_INGEST, st.ref) not in marked and st.updated_at < stale_ns
        ]
    doomed = {Node(sn_type, k) for k in doomed_snaps}
    doomed |= {Node(NODE_CONTENT, d) for kind, d in work if kind == _BLOB}
    doomed |= {Node(NODE_INGEST, r) for kind, r in work if kind == _INGEST}
    return work, doomed


def _sweep_batches(
    env: MetaEnv,
    watch: WriteWatch,
    work: list[tuple[int, str]],
    doomed: set[Node],
    sweep: _Sweep,
    batch: int,
) -> tuple[dict[int, int], int]:
    """Sweeps ``work`` in write transactions of at most ``batch`` deletions and
    :data:`GC_BATCH_SECONDS`; returns the deletions per kind and the bytes freed, counted
    once each transaction committed (a failed one deleted nothing)."""
    done = dict.fromkeys(range(5), 0)
    bytes_freed = 0
    pos = 0
    while pos < len(work):
        with env.write_txn() as txn:
            sweep.rescue.absorb(watch.drain(), doomed)
            deadline = time.monotonic() + GC_BATCH_SECONDS
            taken = freed = 0
            counts = dict.fromkeys(range(5), 0)
            while pos < len(work) and taken < batch:
                kind, ident = work[pos]
                pos += 1
                taken += 1
                size = _sweep_one(txn, kind, ident, sweep)
                if size is not None:
                    counts[kind] += 1
                    freed += size
                if time.monotonic() > deadline:
                    break
        for kind, n in counts.items():
            done[kind] += n
        bytes_freed += freed
    return done, bytes_freed


@dataclass(frozen=True, slots=True)
class _Sweep:
    """What :func:`_sweep_one` needs besides the object: the backends and the mark's facts."""

    rescue: _Rescue
    sn_type: str
    content: ContentSweeper
    snapshotter: SnapshotRemover
    leases: LeaseManager | None
    threshold: datetime
    snaps: Mapping[str, tuple[SnapshotFacts, int]]
    blobs: Mapping[str, tuple[int, dict[str, str]]]


def _sweep_one(txn: WriteTxn, kind: int, ident: str, sweep: _Sweep) -> int | None:
    """Deletes one object of the sweep in ``txn``; its bytes, or ``None`` if it stays."""
    raw_id = ident.encode()
    if kind == _LINKS:
        # Links without a lease record cannot come from the lease manager (it deletes both
        # together); drop them so that a lease created later with this id starts empty —
        # unless that lease exists by now (the links may be its own).
        if txn.get(DB_LEASES, raw_id) is not None:
            return None
        logger.warning("gc: dropping resource links of missing lease %r", ident)
        txn.delete_prefix(DB_LEASE_RESOURCES, raw_id + b"\x00")
        return 0
    if kind == _LEASE:
        current = txn.get(DB_LEASES, raw_id)
        if ident in sweep.rescue.renewed or current is None:
            return None
        if not labels_expired(decode_lease(raw_id, current).labels, sweep.threshold):
            return None  # renewed since the mark
        if sweep.leases is not None:
            sweep.leases.delete(ident, txn=txn)
        else:
            txn.delete(DB_LEASES, raw_id)
            txn.delete_prefix(DB_LEASE_RESOURCES, raw_id + b"\x00")
        return 0
    if kind == _SNAPSHOT:
        if Node(sweep.sn_type, ident) in sweep.rescue.spared:
            return None
        try:
            sweep.snapshotter.remove(ident, txn=txn)
        except (FailedPreconditionError, NotFoundError) as exc:
            logger.warning("gc: cannot remove snapshot %r: %s", ident, exc)
            return None
        return sweep.snaps[ident][1]
    if kind == _BLOB:
        if Node(NODE_CONTENT, ident) in sweep.rescue.spared:
            return None
        try:
            sweep.content.delete(ident, txn=txn)
        except (FailedPreconditionError, NotFoundError) as exc:
            logger.warning("gc: cannot delete blob %s: %s", ident, exc)
            return None
        return sweep.blobs[ident][0]
    if Node(NODE_INGEST, ident) in sweep.rescue.spared:
        return None
    try:
        sweep.content.abort(ident, txn=txn)
    except (LockedError, NotFoundError) as exc:
        logger.info("gc: ingest %r not aborted: %s", ident, exc)
        return None
    return 0


# -- reading the environment ----------------------------------------------------------------


def _unpack_map(raw: bytes, *, what: str, key: str) -> dict[str, Any]:
    try:
        value = msgpack.unpackb(raw)
    except (ValueError, msgpack.UnpackException) as exc:
        msg = f"{what} {key!r} has an undecodable record {raw[:64]!r}"
        raise CorruptMetadataError(msg, record_id=key) from exc
    if not isinstance(value, dict):
        msg = f"{what} {key!r} has a malformed record {value!r}"
        raise CorruptMetadataError(msg, record_id=key)
    return value


def _labels_of(value: dict[str, Any], *, what: str, key: str) -> dict[str, str]:
    labels = value.get("labels") or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        msg = f"{what} {key!r} has malformed labels {labels!r}"
        raise CorruptMetadataError(msg, record_id=key, key="labels")
    return labels


def _decode_key(raw: bytes, *, what: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        msg = f"{what} key {raw!r} is not UTF-8"
        raise CorruptMetadataError(msg, record_id=repr(raw)) from exc


def _read_leases(txn: ReadTxn) -> tuple[dict[str, LeaseFacts], list[str]]:
    """Every lease with its resources, and the ids of links whose lease is missing."""
    labels = {}
    for key, raw in txn.items(DB_LEASES):
        lease = decode_lease(key, raw)
        labels[lease.id] = lease.labels
    resources: dict[str, list[Resource]] = {}
    orphans: set[str] = set()
    for key in txn.keys(DB_LEASE_RESOURCES):
        lease_id, res = parse_resource_key(key)
        if lease_id in labels:
            resources.setdefault(lease_id, []).append(res)
        else:
            orphans.add(lease_id)
    facts = {
        lid: LeaseFacts(labels=lab, resources=tuple(resources.get(lid, ())))
        for lid, lab in labels.items()
    }
    return facts, sorted(orphans)


def _read_content(txn: ReadTxn) -> dict[str, tuple[int, dict[str, str]]]:
    out = {}
    for raw_key, raw in txn.items(DB_CONTENT):
        digest = _decode_key(raw_key, what="content")
        value = _unpack_map(raw, what="blob", key=digest)
        size = value.get("size", 0)
        if not isinstance(size, int) or isinstance(size, bool):
            size = 0
        out[digest] = (max(size, 0), _labels_of(value, what="blob", key=digest))
    return out


def _read_snapshots(txn: ReadTxn) -> dict[str, tuple[SnapshotFacts, int]]:
    out = {}
    for raw_key, raw in txn.items(DB_SNAPSHOTS):
        if raw_key.startswith(b"\x00"):
            continue  # the snapshotter's own secondary keys (e.g. \0parent\0<p>\0<c>)
        key = _decode_key(raw_key, what="snapshot")
        value = _unpack_map(raw, what="snapshot", key=key)
        parent = value.get("parent") or ""
        if not isinstance(parent, str):
            msg = f"snapshot {key!r} has a malformed parent {parent!r}"
            raise CorruptMetadataError(msg, record_id=key, key="parent")
        usage = value.get("usage")
        size = 0
        if isinstance(usage, list | tuple) and usage and isinstance(usage[0], int):
            size = max(int(usage[0]), 0)
        facts = SnapshotFacts(parent=parent, labels=_labels_of(value, what="snapshot", key=key))
        out[key] = (facts, size)
    return out
