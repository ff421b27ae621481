"""Lazy layers: ``get_by_blob``, descriptor handlers, extraction, sizes (docs/DESIGN.md).

Ports of BuildKit's TestLazyGetByBlob, TestMergeBlobchainID, TestSnapshotExtract,
TestExtractOnMutable, TestSetBlob and TestMissingMaterializedLowerDiffExtract, plus
the concurrency and bad-provider cases of issue 5. Real caches in ``tmp_path``; real tar blobs
built with tarfile/gzip/zstandard; providers are plain functions over in-memory bytes that
count their calls. Counts are exact: snapshot directories under ``<root>/snapshots`` and blobs
in ``cache.content.walk()``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard
from refcache.actors import (
    Cache,
    DescHandler,
    FailedPreconditionError,
    ImmutableRef,
    InvalidError,
    NeedsRemoteProviderError,
    NotFoundError,
    PrunePolicy,
    RefcacheError,
    open_cache,
)
from refcache.actors._blobs import leased_snapshot, link_blob, measure_record
from refcache.actors._mediatypes import chain_id
from refcache.actors._remote import compute_chain_metadata, set_blob
from refcache.storage import Descriptor, MetaEnv, NativeSnapshotter, digest_of

from refcache import storage

WAIT = 30.0
OCI = "application/vnd.oci.image.layer.v1.tar"
UNCOMPRESSED = "containerd.io/uncompressed"


# -- blobs and providers --------------------------------------------------------------------


def tar_of(files: dict[str, str]) -> bytes:
    """An OCI layer tar like BuildKit's ``mapToBlob`` (name and size only, sorted)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(files):
            data = files[name].encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def make_blob(
    files: dict[str, str], compression: str = "gzip", *, diff_id: str | None = None
) -> tuple[bytes, Descriptor]:
    """``(blob, descriptor)`` of a layer: the descriptor carries the diffID annotation."""
    raw = tar_of(files)
    if compression == "gzip":
        data, media_type = gzip.compress(raw, mtime=0), OCI + "+gzip"
    elif compression == "zstd":
        data, media_type = zstandard.ZstdCompressor().compress(raw), OCI + "+zstd"
    else:
        data, media_type = raw, OCI
    desc = Descriptor(
        media_type, digest_of(data), len(data), {UNCOMPRESSED: diff_id or digest_of(raw)}
    )
    return data, desc


class Remote:
    """An in-memory registry: blobs by digest, and how often each was pulled."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, data: bytes, desc: Descriptor) -> Descriptor:
        self.blobs[desc.digest] = data
        return desc

    def provide(self, desc: Descriptor) -> io.BytesIO:
        with self._lock:
            self.calls[desc.digest] += 1
        return io.BytesIO(self.blobs[desc.digest])

    def handlers(self) -> dict[str, DescHandler]:
        return {d: DescHandler(self.provide) for d in self.blobs}


class CountingSnapshotter(NativeSnapshotter):
    """The real native snapshotter, counting extractions (``extract-*`` prepares)."""

    def __init__(self, root: str | os.PathLike[str], env: MetaEnv) -> None:
        super().__init__(root, env)
        self.extracts: Counter[str] = Counter()
        self._count_lock = threading.Lock()

    def prepare(self, key: str, parent: str = "", **kwargs: Any) -> list[storage.Mount]:
        if key.startswith("extract-"):
            with self._count_lock:
                self.extracts[key.split(" ", 1)[1]] += 1  # by chainID
        return super().prepare(key, parent, **kwargs)


# -- cache helpers --------------------------------------------------------------------------


def snapshot_dirs(cache: Cache) -> int:
    base = cache.root / "snapshots"
    return sum(
        1
        for name in os.listdir(base)
        if (base / name).is_dir() and not name.startswith(("new-", "rm-"))
    )


def num_blobs(cache: Cache) -> int:
    return len(list(cache.content.walk()))


def check_disk_usage(cache: Cache, inuse: int, unused: int) -> None:
    rows = cache.manager.disk_usage().get(timeout=WAIT)
    got = (sum(1 for r in rows if r.in_use), sum(1 for r in rows if not r.in_use))
    assert got == (inuse, unused), rows


def prune(cache: Cache, *policies: PrunePolicy) -> list[str]:
    return [r.id for r in cache.manager.prune(*policies).get(timeout=WAIT)]


def by_blob(
    cache: Cache,
    desc: Descriptor,
    parent: ImmutableRef | None = None,
    handlers: dict[str, DescHandler] | None = None,
    **kwargs: Any,
) -> ImmutableRef:
    ref: ImmutableRef = cache.manager.get_by_blob(
        desc, parent, desc_handlers=handlers, **kwargs
    ).get(timeout=WAIT)
    return ref


def committed(cache: Cache, files: dict[str, str] | None = None) -> ImmutableRef:
    m = cache.manager.new().get(timeout=WAIT)
    if files:
        with m.mount(readonly=False).local() as path:
            for name, data in files.items():
                (path / name).write_text(data)
    return m.commit()


def lazy_chain(
    cache: Cache, remote: Remote, layers: int, tag: str = "x"
) -> tuple[list[ImmutableRef], list[Descriptor]]:
    refs: list[ImmutableRef] = []
    descs: list[Descriptor] = []
    parent: ImmutableRef | None = None
    for i in range(layers):
        desc = remote.add(*make_blob({f"{tag}{i}": f"{tag}-{i}" * 50}))
        parent = by_blob(cache, desc, parent, remote.handlers())
        refs.append(parent)
        descs.append(desc)
    return refs, descs


def mounted_files(ref: ImmutableRef) -> dict[str, str]:
    with ref.mount().local() as path:
        return {
            str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()
        }


def no_leftovers(cache: Cache) -> None:
    """Nothing half-written: no ingest, no temporary snapshot, no temporary lease."""
    assert cache.content.list_statuses() == []
    assert [i.name for i in cache.snapshotter.walk() if i.name.startswith("extract-")] == []
    assert [lease.id for lease in cache.leases.list() if lease.id.startswith("extract-")] == []


@pytest.fixture
def counting(tmp_path: Path) -> Callable[[], tuple[Cache, CountingSnapshotter]]:
    opened: list[Cache] = []

    def _open() -> tuple[Cache, CountingSnapshotter]:
        made: list[CountingSnapshotter] = []

        def factory(root: Path, env: MetaEnv) -> CountingSnapshotter:
            made.append(CountingSnapshotter(root, env))
            return made[0]

        cache = open_cache(tmp_path / "counted", snapshotter=factory, timeout=WAIT)
        opened.append(cache)
        return cache, made[0]

    yield _open  # type: ignore[misc]
    for cache in opened:
        cache.close()


# -- TestLazyGetByBlob ----------------------------------------------------------------------


class TestLazyGetByBlob:
    def test_same_diff_id_with_another_digest_skips_the_lazy_chain_id_match(
        self, cache: Cache
    ) -> None:
        # BuildKit #2226: gzip and uncompressed blobs of one layer, each lazy, each with a
        # handler only for its own digest.
        _, gz = make_blob({"foo": "bar"}, "gzip")
        _, raw = make_blob({"foo": "bar"}, "uncompressed")
        assert gz.digest != raw.digest
        assert gz.annotations[UNCOMPRESSED] == raw.annotations[UNCOMPRESSED]

        def never(desc: Descriptor) -> io.BytesIO:
            raise AssertionError("nothing is pulled")

        a = by_blob(cache, gz, handlers={gz.digest: DescHandler(never)})
        b = by_blob(cache, raw, handlers={raw.digest: DescHandler(never)})
        assert a.id != b.id
        ia, ib = a.info(), b.info()
        assert (ia.chain_id, ib.chain_id) == (gz.annotations[UNCOMPRESSED],) * 2
        assert ia.snapshot_id == ib.snapshot_id == ia.chain_id
        assert ia.blob_chain_id == chain_id(gz.digest, ia.diff_id)
        assert ib.blob_chain_id == chain_id(raw.digest, ib.diff_id)
        assert (ia.blob_only, ib.blob_only) == (True, True)
        assert num_blobs(cache) == 0
        assert snapshot_dirs(cache) == 0


class TestGetByBlobArguments:
    def test_a_descriptor_without_a_diff_id_is_invalid_and_changes_nothing(
        self, cache: Cache
    ) -> None:
        data, desc = make_blob({"a": "1"})
        cache.content.write_blob(data, desc)
        bare = Descriptor(desc.media_type, desc.digest, desc.size)
        with pytest.raises(InvalidError, match=r"containerd\.io/uncompressed"):
            by_blob(cache, bare)
        bad = Descriptor(desc.media_type, desc.digest, desc.size, {UNCOMPRESSED: "sha256:nope"})
        with pytest.raises(InvalidError, match="diffID"):
            by_blob(cache, bad)
        with pytest.raises(InvalidError, match="Descriptor"):
            by_blob(cache, {"digest": desc.digest})  # type: ignore[arg-type]
        with pytest.raises(InvalidError, match="DescHandler"):
            by_blob(cache, desc, handlers={desc.digest: lambda d: None})  # type: ignore[dict-item]
        with pytest.raises(InvalidError, match="desc_handlers key"):
            by_blob(cache, desc, handlers={"nope": DescHandler(io.BytesIO)})
        assert cache.manager.statistics().get(timeout=WAIT).records == 0
        assert [lease.id for lease in cache.leases.list()] == []

    def test_a_blob_neither_local_nor_handled_needs_a_provider(self, cache: Cache) -> None:
        _, desc = make_blob({"a": "1"})
        with pytest.raises(NeedsRemoteProviderError) as err:
            by_blob(cache, desc)
        assert err.value.digests == (desc.digest,)
        assert cache.manager.statistics().get(timeout=WAIT).records == 0

    def test_a_parent_without_chain_ids_is_not_addressable(self, cache: Cache) -> None:
        parent = committed(cache, {"p": "1"})
        data, desc = make_blob({"a": "1"})
        cache.content.write_blob(data, desc)
        with pytest.raises(InvalidError, match="non-addressable"):
            by_blob(cache, desc, parent)
        # Nothing was finalized or created for it.
        assert parent.info().equal_mutable is not None
        assert cache.manager.statistics().get(timeout=WAIT).records == 2


# -- lazy providers on get ------------------------------------------------------------------


class TestLazyProviders:
    def test_get_needs_a_handler_for_every_lazy_ancestor_before_taking_a_handle(
        self, cache: Cache
    ) -> None:
        remote = Remote()
        refs, descs = lazy_chain(cache, remote, 3)
        top = refs[-1].id
        with pytest.raises(NeedsRemoteProviderError) as err:
            cache.manager.get(top).get(timeout=WAIT)
        assert err.value.digests == tuple(d.digest for d in descs)  # root first
        partial = {descs[0].digest: DescHandler(remote.provide)}
        with pytest.raises(NeedsRemoteProviderError) as err:
            cache.manager.get(top, desc_handlers=partial).get(timeout=WAIT)
        assert err.value.digests == (descs[1].digest, descs[2].digest)
        assert refs[-1].info().usage_count == 0  # no handle was taken and released
        with cache.manager.get(top, desc_handlers=remote.handlers()).get(timeout=WAIT) as ref:
            assert set(ref.desc_handlers) == {d.digest for d in descs}
            clone = ref.clone()
            assert clone.desc_handlers == ref.desc_handlers  # clones inherit
            clone.release()
        # Once extracted nothing is lazy: no handler needed any more.
        refs[-1].extract()
        with cache.manager.get(top).get(timeout=WAIT) as ref:
            assert ref.desc_handlers == {}

    def test_children_inherit_the_parents_handlers(self, cache: Cache) -> None:
        remote = Remote()
        refs, _ = lazy_chain(cache, remote, 2)
        # new() on a lazy parent extracts it with the parent handle's handlers.
        m = cache.manager.new(refs[-1]).get(timeout=WAIT)
        assert m.desc_handlers == refs[-1].desc_handlers
        with m.mount(readonly=False).local() as path:
            assert sorted(p.name for p in path.iterdir()) == ["x0", "x1"]
            (path / "y").write_text("y")
        child = m.commit()
        assert child.desc_handlers == refs[-1].desc_handlers
        merged = cache.manager.merge([refs[0], child]).get(timeout=WAIT)
        assert merged.desc_handlers == refs[-1].desc_handlers
        assert sum(remote.calls.values()) == 2


# -- TestMergeBlobchainID -------------------------------------------------------------------


class TestMergeBlobchainID:
    def test_a_blob_chain_equal_to_a_merge_returns_the_merge(self, cache: Cache) -> None:
        remote = Remote()
        inputs: list[ImmutableRef] = []
        descs: list[Descriptor] = []
        for i in range(3):
            cur: ImmutableRef | None = None
            for j in range(3):
                desc = remote.add(*make_blob({str(i): str(j)}))
                cur = by_blob(cache, desc, cur, remote.handlers())
                descs.append(desc)
            assert cur is not None
            inputs.append(cur.clone())
        merged = cache.manager.merge(inputs).get(timeout=WAIT)
        remotes = merged.get_remotes("gzip", create_if_needed=True)
        assert [d.digest for d in remotes[0].descriptors] == [d.digest for d in descs]
        merge_bcid = merged.info().blob_chain_id
        assert merge_bcid
        for ref in inputs:
            assert ref.info().blob_chain_id != merge_bcid
        cur = None
        for desc in descs[:-1]:
            cur = by_blob(cache, desc, cur, remote.handlers())
        last = by_blob(cache, descs[-1], cur, remote.handlers())
        assert last.id == merged.id
        assert sum(remote.calls.values()) == 0  # nothing needed the blobs themselves
        assert num_blobs(cache) == 0


# -- TestSnapshotExtract --------------------------------------------------------------------


class TestSnapshotExtract:
    def test_extract_prune_and_release(self, cache: Cache) -> None:
        b1, d1 = make_blob({"foo": "bar"})
        cache.content.write_blob(b1, d1)
        s = by_blob(cache, d1)
        assert s.info().blob_only is True
        b2, d2 = make_blob({"foo": "bar123"})
        cache.content.write_blob(b2, d2)
        s2 = by_blob(cache, d2, s)
        assert s2.size() == len(b2)
        assert s2.info().blob_only is True
        assert snapshot_dirs(cache) == 0
        assert num_blobs(cache) == 2

        s2.extract()
        assert (s.info().blob_only, s2.info().blob_only) == (False, False)
        assert snapshot_dirs(cache) == 2
        assert mounted_files(s2) == {"foo": "bar123"}

        assert prune(cache) == []
        check_disk_usage(cache, 2, 0)
        assert snapshot_dirs(cache) == 2
        assert num_blobs(cache) == 2

        sid = s.id
        s.release()
        assert prune(cache) == []
        check_disk_usage(cache, 2, 0)  # s is held as s2's parent
        assert snapshot_dirs(cache) == 2
        s = cache.manager.get(sid).get(timeout=WAIT)
        check_disk_usage(cache, 2, 0)

        s2.release()
        check_disk_usage(cache, 1, 1)
        assert prune(cache) == [s2.id]
        check_disk_usage(cache, 1, 0)
        assert snapshot_dirs(cache) == 1
        assert num_blobs(cache) == 1

        s.release()
        assert prune(cache) == [sid]
        check_disk_usage(cache, 0, 0)
        assert snapshot_dirs(cache) == 0
        assert num_blobs(cache) == 0

    def test_size_is_recomputed_after_extraction(self, cache: Cache) -> None:
        data, desc = make_blob({"big": "z" * 100_000})
        cache.content.write_blob(data, desc)
        ref = by_blob(cache, desc)
        assert ref.size() == len(data)
        assert ref.info().size == len(data)
        ref.extract()
        usage = cache.snapshotter.usage(ref.info().snapshot_id).size
        assert usage > 0
        assert ref.size() == usage + len(data)


# -- TestExtractOnMutable -------------------------------------------------------------------


class TestExtractOnMutable:
    def test_a_committed_record_with_a_blob_parents_a_lazy_layer(self, cache: Cache) -> None:
        s = committed(cache)
        b, d = make_blob({"foo": "bar"})
        cache.content.write_blob(b, d)
        b2, d2 = make_blob({"foo2": "1"})
        cache.content.write_blob(b2, d2)
        with pytest.raises(InvalidError, match="non-addressable"):
            by_blob(cache, d2, s)

        set_blob(cache._core, s.id, d)
        compute_chain_metadata(cache._core, s.id, [s.id])
        s2 = by_blob(cache, d2, s)
        s.release()
        assert s2.info().blob_only is True
        assert s2.size() == len(b2)
        assert snapshot_dirs(cache) == 1  # s, finalized by set_blob
        assert num_blobs(cache) == 2

        s2.extract()
        assert s2.info().blob_only is False
        with cache.manager.get(s.id).get(timeout=WAIT) as again:
            assert again.info().blob_only is False

        assert prune(cache) == []
        check_disk_usage(cache, 2, 0)
        assert snapshot_dirs(cache) == 2
        s2.release()
        check_disk_usage(cache, 0, 2)
        assert sorted(prune(cache)) == sorted([s.id, s2.id])
        check_disk_usage(cache, 0, 0)
        assert snapshot_dirs(cache) == 0
        assert num_blobs(cache) == 0


# -- TestSetBlob ----------------------------------------------------------------------------


def sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class TestSetBlob:
    def test_blob_metadata_and_chain_id_formulas(self, cache: Cache) -> None:
        core = cache._core
        snap = committed(cache)
        info = snap.info()
        assert (info.diff_id, info.blob, info.chain_id, info.blob_chain_id) == ("", "", "", "")
        assert info.blob_only is False

        b, desc = make_blob({"foo": "bar"})
        cache.content.write_blob(b, desc)
        missing = Descriptor(OCI, digest_of(b"foobar"), 6, {UNCOMPRESSED: digest_of(b"foobar2")})
        with pytest.raises(NotFoundError):
            set_blob(core, snap.id, missing)
        assert snap.info().blob == ""

        set_blob(core, snap.id, desc)
        compute_chain_metadata(core, snap.id, [snap.id])
        info = snap.info()
        assert info.diff_id == desc.annotations[UNCOMPRESSED]
        assert info.blob == desc.digest
        assert info.media_type == desc.media_type
        assert info.chain_id == info.diff_id
        assert info.blob_chain_id == sha(f"{desc.digest} {info.diff_id}")
        assert info.snapshot_id == snap.id
        assert info.blob_only is False

        m = cache.manager.new(snap).get(timeout=WAIT)
        snap2 = m.commit()
        b2, desc2 = make_blob({"foo2": "bar2"})
        cache.content.write_blob(b2, desc2)
        set_blob(core, snap2.id, desc2)
        compute_chain_metadata(core, snap2.id, [snap.id, snap2.id])
        info2 = snap2.info()
        assert info2.diff_id == desc2.annotations[UNCOMPRESSED]
        assert info2.blob == desc2.digest
        assert info2.chain_id == sha(f"{info.chain_id} {info2.diff_id}")
        assert info2.blob_chain_id == sha(
            f"{info.blob_chain_id} {sha(f'{desc2.digest} {info2.diff_id}')}"
        )
        assert info2.snapshot_id == snap2.id
        assert info2.blob_only is False

        b3, desc3 = make_blob({"foo3": "bar3"})
        cache.content.write_blob(b3, desc3)
        snap3 = by_blob(cache, desc3, snap)
        info3 = snap3.info()
        assert info3.diff_id == desc3.annotations[UNCOMPRESSED]
        assert info3.blob == desc3.digest
        assert info3.chain_id == sha(f"{info.chain_id} {info3.diff_id}")
        assert info3.blob_chain_id == sha(
            f"{info.blob_chain_id} {sha(f'{desc3.digest} {info3.diff_id}')}"
        )
        assert info3.snapshot_id == info3.chain_id
        assert info3.blob_only is True

        snap4 = by_blob(cache, desc2, snap)  # the same blob chain as snap2
        assert snap4.id == snap2.id

        b5, desc5 = make_blob({"foo5": "bar5"}, diff_id=info2.diff_id)
        cache.content.write_blob(b5, desc5)
        snap5 = by_blob(cache, desc5, snap)  # same diffID, another blob
        info5 = snap5.info()
        assert snap5.id != snap2.id
        assert info5.snapshot_id == info2.snapshot_id  # the chainID match's snapshot
        assert info5.diff_id == info2.diff_id
        assert info5.blob == desc5.digest
        assert info5.chain_id == info2.chain_id
        assert info5.blob_chain_id != info2.blob_chain_id
        assert info5.blob_chain_id == sha(
            f"{info.blob_chain_id} {sha(f'{desc5.digest} {info2.diff_id}')}"
        )

        b6, desc6 = make_blob({"foo6": "bar6"})
        cache.content.write_blob(b6, desc6)
        snap6 = by_blob(cache, desc6, snap3)
        info6 = snap6.info()
        assert info6.chain_id == sha(f"{info3.chain_id} {info6.diff_id}")
        assert info6.blob_chain_id == sha(
            f"{info3.blob_chain_id} {sha(f'{desc6.digest} {info6.diff_id}')}"
        )
        assert info6.snapshot_id == info6.chain_id
        assert info6.blob_only is True

        absent = Descriptor(OCI, digest_of(b"notexist"), 8, {UNCOMPRESSED: digest_of(b"notexist")})
        with pytest.raises(NeedsRemoteProviderError):
            by_blob(cache, absent, snap3)

    def test_a_record_keeps_its_first_blob(self, cache: Cache) -> None:
        snap = committed(cache, {"a": "1"})
        b1, d1 = make_blob({"a": "1"})
        b2, d2 = make_blob({"a": "1"}, "zstd")
        cache.content.write_blob(b1, d1)
        cache.content.write_blob(b2, d2)
        set_blob(cache._core, snap.id, d1)
        set_blob(cache._core, snap.id, d2)  # linked as a variant, not the blob
        assert snap.info().blob == d1.digest
        assert snap.size() == cache.snapshotter.usage(snap.id).size + len(b1) + len(b2)


# -- TestMissingMaterializedLowerDiffExtract ------------------------------------------------


class TestMissingMaterializedLowerDiffExtract:
    def test_a_vanished_lower_snapshot_is_restored_from_its_blob(self, cache: Cache) -> None:
        remote = Remote()
        d0 = remote.add(*make_blob({"a": "lower"}))
        d1 = remote.add(*make_blob({"b": "upper"}))
        r0 = by_blob(cache, d0, handlers=remote.handlers())
        r1 = by_blob(cache, d1, handlers=remote.handlers())
        r0.extract()
        r1.extract()
        d = cache.manager.diff(r0, r1).get(timeout=WAIT)
        sid = r0.info().snapshot_id
        cache.snapshotter.remove(sid)  # behind the manager's back
        with pytest.raises(NotFoundError):
            cache.snapshotter.stat(sid)
        d.extract()
        assert cache.snapshotter.stat(sid).kind == storage.Kind.COMMITTED
        assert mounted_files(r0) == {"a": "lower"}
        assert mounted_files(d) == {"b": "upper"}
        assert remote.calls == Counter({d0.digest: 1, d1.digest: 1})

    def test_a_vanished_snapshot_without_a_blob_fails_clearly(self, cache: Cache) -> None:
        low = committed(cache, {"a": "1"})
        up = committed(cache, {"b": "2"})
        low.finalize()
        up.finalize()
        d = cache.manager.diff(low, up).get(timeout=WAIT)
        cache.snapshotter.remove(low.id)
        with pytest.raises(FailedPreconditionError, match="no blob available"):
            d.extract()

    def test_extract_of_a_plain_layer_returns_at_once(self, cache: Cache) -> None:
        low = committed(cache, {"a": "1"})
        low.finalize()
        cache.snapshotter.remove(low.id)
        low.extract()  # BuildKit: not blob-only, nothing to do (even with the snapshot gone)


# -- concurrency ----------------------------------------------------------------------------


class TestConcurrentExtract:
    def test_sixteen_threads_extract_one_lazy_chain_with_one_fetch_and_apply_per_layer(
        self, counting: Callable[[], tuple[Cache, CountingSnapshotter]]
    ) -> None:
        cache, sn = counting()
        remote = Remote()
        refs, descs = lazy_chain(cache, remote, 3)
        top = refs[-1].id
        handles = [
            cache.manager.get(top, desc_handlers=remote.handlers()).get(timeout=WAIT)
            for _ in range(16)
        ]
        barrier = threading.Barrier(16, timeout=WAIT)
        results: list[dict[str, str] | BaseException] = [{}] * 16

        def work(i: int) -> None:
            try:
                barrier.wait()
                handles[i].extract()
                results[i] = mounted_files(handles[i])
            except BaseException as exc:
                results[i] = exc

        threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in threads)
        expected = {f"x{i}": f"x-{i}" * 50 for i in range(3)}
        assert results == [expected] * 16
        assert remote.calls == Counter({d.digest: 1 for d in descs})
        assert sn.extracts == Counter({r.info().chain_id: 1 for r in refs})
        assert [r.info().blob_only for r in refs] == [False] * 3
        assert snapshot_dirs(cache) == 3
        assert num_blobs(cache) == 3
        no_leftovers(cache)
        for h in handles:
            h.release()

    def test_records_sharing_a_blob_fetch_it_once(self, cache: Cache) -> None:
        remote = Remote()
        desc = remote.add(*make_blob({"shared": "s" * 1000}))
        bases = [by_blob(cache, d, handlers=remote.handlers()) for d in (desc,)]
        # Two different parents, the same blob on top: two records, one digest.
        p1 = committed(cache, {"p": "1"})
        p2 = committed(cache, {"p": "2"})
        for p, files in ((p1, {"p": "1"}), (p2, {"p": "2"})):
            b, d = make_blob(files)
            cache.content.write_blob(b, d)
            set_blob(cache._core, p.id, d)
            compute_chain_metadata(cache._core, p.id, [p.id])
        tops = [by_blob(cache, desc, p, remote.handlers()) for p in (p1, p2)]
        assert tops[0].id != tops[1].id
        barrier = threading.Barrier(len(tops) + 1, timeout=WAIT)
        errors: list[BaseException] = []

        def work(ref: ImmutableRef) -> None:
            try:
                barrier.wait()
                ref.extract()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(r,)) for r in [*tops, bases[0]]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert errors == []
        assert remote.calls == Counter({desc.digest: 1})
        assert mounted_files(tops[0]) == {"p": "1", "shared": "s" * 1000}
        assert mounted_files(tops[1]) == {"p": "2", "shared": "s" * 1000}


# -- bad providers --------------------------------------------------------------------------


class TestBadProviders:
    @pytest.mark.parametrize(
        ("name", "error"),
        [
            ("raises", RefcacheError),
            ("short", FailedPreconditionError),
            ("corrupt", FailedPreconditionError),
            ("other blob", FailedPreconditionError),
            ("not a file", InvalidError),
            ("breaks mid-stream", RefcacheError),
        ],
    )
    def test_a_bad_fetch_leaves_the_record_lazy_and_a_good_one_works_later(
        self, cache: Cache, name: str, error: type[BaseException]
    ) -> None:
        data, desc = make_blob({"f": "payload" * 1000})
        other, _ = make_blob({"g": "other" * 1000})
        calls: list[str] = []

        class Broken(io.RawIOBase):
            def readable(self) -> bool:
                return True

            def readinto(self, buffer: Any) -> int:
                raise OSError("connection reset by peer")

        def bad(d: Descriptor) -> Any:
            calls.append(name)
            if name == "raises":
                raise ConnectionError("registry unavailable")
            if name == "short":
                return io.BytesIO(data[:-10])
            if name == "corrupt":
                return io.BytesIO(bytes(b ^ 0xFF for b in data))
            if name == "other blob":
                return io.BytesIO(other)
            if name == "not a file":
                return 42
            return Broken()

        ref = by_blob(cache, desc, handlers={desc.digest: DescHandler(bad)})
        with pytest.raises(error) as err:
            ref.extract()
        assert desc.digest in str(err.value) or name == "short"
        assert calls == [name]
        info = ref.info()
        assert (info.blob_only, info.size) == (True, -1)
        assert num_blobs(cache) == 0
        assert snapshot_dirs(cache) == 0
        no_leftovers(cache)
        assert storage.check(cache.root) == []
        with pytest.raises(NeedsRemoteProviderError):
            cache.manager.get(ref.id).get(timeout=WAIT)  # still lazy

        good = {desc.digest: DescHandler(lambda d: io.BytesIO(data))}
        ref.extract(good)
        assert mounted_files(ref) == {"f": "payload" * 1000}
        assert ref.info().blob_only is False
        assert num_blobs(cache) == 1
        no_leftovers(cache)

    def test_a_blob_that_is_not_a_tar_fails_the_apply_and_leaves_no_snapshot(
        self, cache: Cache
    ) -> None:
        junk = gzip.compress(b"\x01" * 5000, mtime=0)
        desc = Descriptor(OCI + "+gzip", digest_of(junk), len(junk), {UNCOMPRESSED: digest_of(b"")})
        ref = by_blob(cache, desc, handlers={desc.digest: DescHandler(lambda d: io.BytesIO(junk))})
        with pytest.raises(InvalidError):
            ref.extract()
        assert ref.info().blob_only is True
        assert snapshot_dirs(cache) == 0
        no_leftovers(cache)
        assert storage.check(cache.root) == []

    def test_a_failed_fetch_is_not_remembered_the_next_extract_asks_again(
        self, cache: Cache
    ) -> None:
        data, desc = make_blob({"f": "1"})
        calls: list[int] = []

        def failing(d: Descriptor) -> io.BytesIO:
            calls.append(1)
            raise ConnectionError("boom")

        ref = by_blob(cache, desc, handlers={desc.digest: DescHandler(failing)})
        for expected in (1, 2):
            with pytest.raises(RefcacheError, match="boom"):
                ref.extract()
            assert len(calls) == expected
        ref.extract({desc.digest: DescHandler(lambda d: io.BytesIO(data))})
        assert mounted_files(ref) == {"f": "1"}
        assert len(calls) == 2


# -- extract at get_by_blob, reopen ---------------------------------------------------------


class TestGetByBlobExtract:
    def test_extract_true_materialises_before_the_reply(self, cache: Cache) -> None:
        remote = Remote()
        desc = remote.add(*make_blob({"e": "1"}))
        ref = by_blob(cache, desc, handlers=remote.handlers(), extract=True)
        assert ref.info().blob_only is False
        assert snapshot_dirs(cache) == 1
        assert remote.calls == Counter({desc.digest: 1})

    def test_a_failed_extract_releases_the_new_handle(self, cache: Cache) -> None:
        _, desc = make_blob({"e": "1"})

        def fail(d: Descriptor) -> io.BytesIO:
            raise ConnectionError("no")

        with pytest.raises(RefcacheError):
            by_blob(cache, desc, handlers={desc.digest: DescHandler(fail)}, extract=True)
        rows = cache.manager.disk_usage().get(timeout=WAIT)
        assert [(r.in_use, r.size) for r in rows] == [(False, 0)]


class TestReopen:
    def test_lazy_records_and_their_descendants_are_cleared_at_open(
        self, open_cache_at: Callable[[], Cache]
    ) -> None:
        cache = open_cache_at()
        remote = Remote()
        refs, _ = lazy_chain(cache, remote, 2)
        local_data, local_desc = make_blob({"local": "1"})
        cache.content.write_blob(local_data, local_desc)
        kept = by_blob(cache, local_desc)  # blob-only but not lazy: its blob is local
        kept_id, lazy_ids = kept.id, [r.id for r in refs]
        cache.close()

        cache = open_cache_at()
        report = {rid for rid, _ in cache.load_report.cleared}
        assert report == set(lazy_ids)
        assert cache.manager.statistics().get(timeout=WAIT).records == 1
        with cache.manager.get(kept_id).get(timeout=WAIT) as ref:
            assert ref.info().blob_only is True
            assert ref.size() == len(local_data)
        leases = sorted(lease.id for lease in cache.leases.list())
        assert leases == [kept_id]
        assert storage.check(cache.root) == []


class TestLeasedSnapshot:
    def test_the_snapshot_key_is_leased_for_the_block_and_released_even_on_failure(
        self, cache: Cache
    ) -> None:
        core = cache._core
        key = "extract-test some-chain"
        with leased_snapshot(core, "extract-test", key):
            lease = core.leases.get("extract-test")
            assert lease.flat
            assert lease.temporary
            resources = core.leases.list_resources("extract-test")
            assert [(r.id, r.type) for r in resources] == [
                (key, f"snapshots/{core.snapshotter.name}")
            ]
        with pytest.raises(NotFoundError):
            core.leases.get("extract-test")
        with pytest.raises(RuntimeError), leased_snapshot(core, "extract-boom", key):
            raise RuntimeError
        with pytest.raises(NotFoundError):
            core.leases.get("extract-boom")


# -- sizes ----------------------------------------------------------------------------------


class TestSizes:
    def test_variants_count_once_even_in_a_label_cycle(self, cache: Cache) -> None:
        core = cache._core
        raw, d_raw = make_blob({"s": "v" * 3000}, "uncompressed")
        gz, d_gz = make_blob({"s": "v" * 3000}, "gzip")
        zs, d_zs = make_blob({"s": "v" * 3000}, "zstd")
        for data, desc in ((raw, d_raw), (gz, d_gz), (zs, d_zs)):
            cache.content.write_blob(data, desc)
        ref = by_blob(cache, d_gz)
        assert ref.size() == len(gz)
        link_blob(core, ref.id, d_gz.digest, d_raw)
        assert ref.info().size == -1  # a new variant makes the size unknown
        assert ref.size() == len(gz) + len(raw)
        link_blob(core, ref.id, d_gz.digest, d_zs)
        # A cycle: zstd -> raw -> gzip -> zstd.
        link_blob(core, ref.id, d_zs.digest, d_raw)
        assert ref.size() == len(gz) + len(raw) + len(zs)
        # Walking from another blob: the record's own gzip blob was never linked to itself,
        # so it has no stored descriptor and is followed but not counted (BuildKit
        # getBlobDesc); the cycle back to raw is not counted twice.
        assert measure_record(core, "", d_raw.digest, True) == (len(raw) + len(zs), True)
