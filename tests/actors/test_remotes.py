"""Compression variants and export: ``get_remotes``, conversion, ``file_list``.

Ports of BuildKit's TestLoopLeaseContent, TestSharingCompressionVariant, TestConversion,
TestGetRemotes and TestNondistributableBlobs. estargz is out of scope (no stargz snapshotter
here): the compressions are uncompressed, gzip and zstd, so the BuildKit loops over four
compressions run over three. Real caches in ``tmp_path``; providers are plain functions over
in-memory bytes. Blob counts are exact (``cache.content.walk()``).
"""

from __future__ import annotations

import gzip
import io
import itertools
import os
import shutil
import subprocess
import tarfile
import threading
from collections import Counter
from pathlib import Path

import pytest
import zstandard
from refcache.actors import (
    Cache,
    DescHandler,
    ImmutableRef,
    InvalidError,
    NotFoundError,
    PrunePolicy,
    Remote,
)
from refcache.actors._blobs import (
    GC_VARIANT_LABEL,
    blob_desc,
    convert_blob,
    link_blob,
)
from refcache.actors._mediatypes import needs_conversion
from refcache.actors._messages import NodeOf
from refcache.actors._remote import blob_with_compression_of
from refcache.storage import Descriptor, compressed_writer, decompressed_stream, digest_of

WAIT = 30.0
OCI = "application/vnd.oci.image.layer.v1.tar"
UNCOMPRESSED = "containerd.io/uncompressed"
COMPRESSIONS = ("uncompressed", "gzip", "zstd")
MEDIA = {"uncompressed": OCI, "gzip": OCI + "+gzip", "zstd": OCI + "+zstd"}


# -- blobs ----------------------------------------------------------------------------------


def tar_of(files: dict[str, str]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(files):
            data = files[name].encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def compress(raw: bytes, compression: str, *, customized: bool = False) -> bytes:
    """Compresses like the test's external tools; ``customized`` adds what BuildKit's test
    adds (an empty gzip member with a comment / a zstd skippable frame) in front."""
    if compression == "uncompressed":
        return raw
    if compression == "gzip":
        data = gzip.compress(raw, mtime=0)
        if customized:
            head = io.BytesIO()
            with gzip.GzipFile(fileobj=head, mode="wb", mtime=0, compresslevel=0):
                pass
            data = head.getvalue() + data
        return data
    data = zstandard.ZstdCompressor(level=19).compress(raw)
    if customized:
        data = b"\x50\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"hello" + data
    return data


def make_blob(
    files: dict[str, str], compression: str = "gzip", *, customized: bool = False
) -> tuple[bytes, Descriptor]:
    raw = tar_of(files)
    data = compress(raw, compression, customized=customized)
    return data, Descriptor(
        MEDIA[compression], digest_of(data), len(data), {UNCOMPRESSED: digest_of(raw)}
    )


def ours(raw: bytes, compression: str) -> str:
    """The digest refcache's own converter/differ gives ``raw`` in ``compression``."""
    out = io.BytesIO()
    w = compressed_writer(out, compression)
    w.write(raw)
    w.close()
    return digest_of(out.getvalue())


def uncompressed_of(cache: Cache, digest: str) -> bytes:
    with cache.content.reader_at(digest) as f:
        stream = decompressed_stream(f)
        try:
            return stream.read()
        finally:
            stream.close()


def tar_entries(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return [m.name for m in tf.getmembers() if not m.isdir()]


class RemoteBlobs:
    """In-memory registry counting pulls."""

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


def by_blob(
    cache: Cache,
    desc: Descriptor,
    parent: ImmutableRef | None = None,
    handlers: dict[str, DescHandler] | None = None,
) -> ImmutableRef:
    ref: ImmutableRef = cache.manager.get_by_blob(desc, parent, desc_handlers=handlers).get(
        timeout=WAIT
    )
    return ref


def blobs(cache: Cache) -> set[str]:
    return {i.digest for i in cache.content.walk()}


def prune(cache: Cache, *policies: PrunePolicy) -> list[str]:
    return [r.id for r in cache.manager.prune(*policies).get(timeout=WAIT)]


def check_disk_usage(cache: Cache, inuse: int, unused: int) -> None:
    rows = cache.manager.disk_usage().get(timeout=WAIT)
    got = (sum(1 for r in rows if r.in_use), sum(1 for r in rows if not r.in_use))
    assert got == (inuse, unused), rows


def read_all(remote: Remote, desc: Descriptor) -> bytes:
    with remote.provider(desc) as f:
        return f.read()


# -- TestLoopLeaseContent -------------------------------------------------------------------


class TestLoopLeaseContent:
    def test_a_variant_label_cycle_is_walked_once_and_fully_collected(self, cache: Cache) -> None:
        remote = RemoteBlobs()
        org = remote.add(*make_blob({"foo": "1"}, "uncompressed"))
        ref = by_blob(cache, org, handlers=remote.handlers())
        all_refs = [ref]
        chain: list[Descriptor] = []
        for compression in COMPRESSIONS:
            remotes = ref.get_remotes(compression, force=True)
            assert len(remotes) == 1
            assert len(remotes[0].descriptors) == 1
            desc = remotes[0].descriptors[0]
            chain.append(desc)
            ref = by_blob(cache, desc, handlers=remote.handlers())
            all_refs.append(ref)
        assert [d.media_type for d in chain] == [MEDIA[c] for c in COMPRESSIONS]
        assert len({r.id for r in all_refs}) == 3  # uncompressed is the original record
        link_blob(cache._core, ref.id, ref.info().blob, chain[0])  # closes the loop

        visited: set[str] = set()
        got = [org.digest]
        cur, previous = org.digest, chain[-1].digest
        for _ in range(1000):
            visited.add(cur)
            labels = cache.content.info(cur).labels
            children = [
                v
                for k, v in labels.items()
                if k.startswith(GC_VARIANT_LABEL) and v not in (cur, previous)
            ]
            assert len(children) == 1, (cur, labels)
            blob_desc(cache.content, children[0])  # every link has its descriptor stored
            previous, cur = cur, children[0]
            if cur in visited:
                break
            got.append(cur)
        assert len(got) == len(chain)
        assert remote.calls == Counter({org.digest: 1})

        for r in all_refs:
            r.release()
        assert len(prune(cache, PrunePolicy(all=True))) >= len(got) - 1
        for d in got:
            with pytest.raises(NotFoundError):
                cache.content.info(d)
        assert blobs(cache) == set()
        assert [lease.id for lease in cache.leases.list()] == []


# -- TestSharingCompressionVariant ----------------------------------------------------------


def sharing_cases() -> list[tuple[str, tuple[str, str], str]]:
    """(A's compression, A's variants in order, B among them); B's variants are [A]."""
    cases = []
    for a in ("gzip", "zstd"):
        others = [c for c in COMPRESSIONS if c != a]
        for a_variants in itertools.permutations(others):
            for b in a_variants:
                cases.append((a, (a_variants[0], a_variants[1]), b))
    return cases


def sharing_case(
    cache: Cache,
    a: str,
    a_variants: tuple[str, ...],
    b: str,
    *,
    customized: bool,
    check_prune: bool,
) -> None:
    files = {"foo": "1"}
    raw = tar_of(files)
    remote = RemoteBlobs()
    a_desc = remote.add(*make_blob(files, a, customized=customized))
    a_ref = by_blob(cache, a_desc, handlers=remote.handlers())
    b_desc: Descriptor | None = None
    for c in (a, *a_variants):
        remotes = a_ref.get_remotes(c, force=True)
        assert [len(r.descriptors) for r in remotes] == [1]
        if c == b:
            b_desc = remotes[0].descriptors[0]
    assert b_desc is not None
    b_ref = by_blob(cache, b_desc, handlers=remote.handlers())
    for c in (b, a):
        remotes = b_ref.get_remotes(c, force=True)
        assert [len(r.descriptors) for r in remotes] == [1]
    every = {a, b, *a_variants}
    core = cache._core
    for c in every:
        for ref in (a_ref, b_ref):
            desc = blob_with_compression_of(core, core.ask_manager(NodeOf(ref.id)), c)
            assert desc.media_type == MEDIA[c], (c, desc)
    if check_prune and a_ref.id != b_ref.id:
        a_ref.release()
        assert prune(cache, PrunePolicy(all=True)) == [a_ref.id]
        check_disk_usage(cache, 1, 0)
        for c in every:
            blob_with_compression_of(core, core.ask_manager(NodeOf(b_ref.id)), c)
    for c in every:
        desc = blob_with_compression_of(core, core.ask_manager(NodeOf(b_ref.id)), c)
        assert uncompressed_of(cache, desc.digest) == raw
    if not a_ref.released:
        a_ref.release()
    b_ref.release()


class TestSharingCompressionVariant:
    @pytest.mark.parametrize("customized", [True, False])
    @pytest.mark.parametrize(("a", "a_variants", "b"), sharing_cases())
    def test_every_variant_is_reachable_from_both_refs(
        self, cache: Cache, a: str, a_variants: tuple[str, str], b: str, customized: bool
    ) -> None:
        sharing_case(cache, a, a_variants, b, customized=customized, check_prune=True)
        prune(cache, PrunePolicy(all=True))
        check_disk_usage(cache, 0, 0)
        assert blobs(cache) == set()

    def test_all_cases_in_parallel(self, cache: Cache) -> None:
        errors: list[BaseException] = []

        def run(case: tuple[str, tuple[str, str], str], customized: bool) -> None:
            try:
                sharing_case(cache, *case, customized=customized, check_prune=False)
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=run, args=(case, customized))
            for case in sharing_cases()
            for customized in (True, False)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        prune(cache, PrunePolicy(all=True))
        check_disk_usage(cache, 0, 0)
        assert blobs(cache) == set()


# -- TestConversion -------------------------------------------------------------------------


def system_tar(tmp_path: Path, files: dict[str, str]) -> bytes:
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_text(data)
    return subprocess.run(
        ["tar", "-C", str(src), "-c", "."], capture_output=True, check=True, timeout=WAIT
    ).stdout


class TestConversion:
    def test_every_pair_of_compressions_keeps_the_diff_id(
        self, cache: Cache, tmp_path: Path
    ) -> None:
        files = {"foo1": "bar1", "foo2": "bar2"}
        originals = [tar_of(files)]
        if shutil.which("tar") is None:
            pytest.skip("no tar command on this machine for the system-tar half")
        originals.append(system_tar(tmp_path, files))
        store = cache.content
        descs = []
        for raw in originals:
            desc = Descriptor(OCI, digest_of(raw), len(raw), {UNCOMPRESSED: digest_of(raw)})
            store.write_blob(raw, desc)
            descs.append(desc)
        assert descs[0].digest != descs[1].digest
        errors: list[BaseException] = []

        def convert(org: Descriptor, src_c: str, dst_c: str) -> None:
            try:
                src = org
                if needs_conversion(org, src_c):
                    src = convert_blob(store, org, src_c)
                res = src
                if needs_conversion(src, dst_c):
                    res = convert_blob(store, src, dst_c)
                assert res.media_type == MEDIA[dst_c]
                back = res
                if needs_conversion(res, "uncompressed"):
                    back = convert_blob(store, res, "uncompressed")
                assert back.digest == org.digest, (src_c, dst_c)
                assert back.annotations[UNCOMPRESSED] == org.digest
                assert res.annotations[UNCOMPRESSED] == org.digest
                assert store.info(res.digest).labels.get(UNCOMPRESSED, org.digest) == org.digest
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=convert, args=(org, i, j))
            for org in descs
            for i in COMPRESSIONS
            for j in COMPRESSIONS
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert errors == []
        # 2 originals x (uncompressed, gzip, zstd); nothing half-written.
        assert len(blobs(cache)) == 6
        assert store.list_statuses() == []

    def test_unknown_compressions_are_refused(self, cache: Cache) -> None:
        raw = tar_of({"a": "1"})
        desc = cache.content.write_blob(
            raw, Descriptor(OCI, digest_of(raw), len(raw), {UNCOMPRESSED: digest_of(raw)})
        )
        for bad in ("estargz", "lz4", None):
            with pytest.raises(InvalidError):
                convert_blob(cache.content, desc, bad)  # type: ignore[arg-type]
        assert len(blobs(cache)) == 1


# -- TestGetRemotes -------------------------------------------------------------------------


class TestGetRemotes:
    def test_parallel_remotes_of_overlapping_chains(self, cache: Cache) -> None:
        remote = RemoteBlobs()
        expected: set[str] = set()
        raws: list[bytes] = []
        descs: list[Descriptor] = []
        for i in range(2):
            files = {"foo": str(i)}
            desc = remote.add(*make_blob(files))
            raw = tar_of(files)
            descs.append(desc)
            raws.append(raw)
            expected |= {desc.digest, digest_of(raw), ours(raw, "zstd")}
        lazy = by_blob(cache, descs[0], handlers=remote.handlers())
        refs = [lazy]
        for i in range(3):
            new_refs = []
            for j, parent in enumerate(refs):
                for k in range(2):
                    m = cache.manager.new(parent).get(timeout=WAIT)
                    name = f"{i}-{j}-{k}"
                    with m.mount(readonly=False).local() as path:
                        (path / name).write_text("")
                        os.utime(path / name, (0, 0))
                    new_refs.append(m.commit())
            refs = new_refs
        lazy2 = by_blob(cache, descs[1], handlers=remote.handlers())
        refs.append(lazy2)
        assert blobs(cache) == {descs[0].digest}  # new() pulled the first base only

        variants: dict[str, list[dict[str, Descriptor]]] = {}
        lock = threading.Lock()
        errors: list[BaseException] = []

        def run(ref: ImmutableRef, compression: str) -> None:
            try:
                remotes = ref.get_remotes(compression, force=True)
                assert len(remotes) == 1
                chain = ref.layer_chain()
                try:
                    for i, desc in enumerate(remotes[0].descriptors):
                        assert desc.media_type == MEDIA[compression]
                        assert desc.annotations[UNCOMPRESSED]
                        with lock:
                            per = variants.setdefault(ref.id, [])
                            while len(per) <= i:
                                per.append({})
                            per[i][compression] = desc
                        node = cache._core.ask_manager(NodeOf(chain[i].id))
                        lazy_now = node.blob_only and not cache.content.exists(node.blob)
                        if needs_conversion(desc, compression):
                            assert not lazy_now
                        if lazy_now:
                            with pytest.raises(NotFoundError):
                                blob_with_compression_of(cache._core, node, compression)
                        else:
                            got = blob_with_compression_of(cache._core, node, compression)
                            assert got.digest == desc.digest
                finally:
                    chain.release()
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=run, args=(ref, c)) for ref in refs for c in COMPRESSIONS
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in threads)
        assert errors == []

        # Exactly three blobs per layer: 2 bases + 14 children; each decompresses to its
        # layer, and every blob's uncompressed label is right.
        stored = list(cache.content.walk())
        assert len(stored) == 16 * 3
        assert expected <= {i.digest for i in stored}
        by_diff: dict[str, set[str]] = {}
        for info in stored:
            data = uncompressed_of(cache, info.digest)
            assert info.labels.get(UNCOMPRESSED, digest_of(data)) == digest_of(data)
            by_diff.setdefault(digest_of(data), set()).add(info.digest)
        assert sorted(len(v) for v in by_diff.values()) == [3] * 16
        child_entries = sorted(
            name
            for diff, ds in by_diff.items()
            if diff not in (digest_of(r) for r in raws)
            for name in tar_entries(uncompressed_of(cache, next(iter(ds))))
        )
        expected_names = sorted(
            f"{i}-{j}-{k}" for i in range(3) for j in range(2**i) for k in range(2)
        )
        assert [n.lstrip("./") for n in child_entries] == expected_names

        # all=True: the first remote is the all=False one; the others cover every variant.
        for ref in refs:
            for c in COMPRESSIONS:
                got = ref.get_remotes(c, create_if_needed=False, all=True)
                main = ref.get_remotes(c, create_if_needed=False)[0]
                assert [d.digest for d in got[0].descriptors] == [
                    d.digest for d in main.descriptors
                ]
                check_variants(variants[ref.id], len(main.descriptors) - 1, got[1:], c)
        assert remote.calls == Counter({d.digest: 1 for d in descs})

    def test_no_blob_and_no_create_is_not_found(self, cache: Cache) -> None:
        m = cache.manager.new().get(timeout=WAIT)
        with m.mount(readonly=False).local() as path:
            (path / "a").write_text("a")
        ref = m.commit()
        ref.finalize()
        with pytest.raises(NotFoundError, match="no blobs"):
            ref.get_remotes("gzip", create_if_needed=False)
        assert blobs(cache) == set()
        with pytest.raises(InvalidError, match="estargz"):
            ref.get_remotes("estargz")
        with pytest.raises(InvalidError):
            ref.get_remotes("gzip", all="yes")  # type: ignore[arg-type]
        remotes = ref.get_remotes("zstd")
        desc = remotes[0].descriptors[0]
        assert desc.media_type == MEDIA["zstd"]
        assert tar_entries(decompressed(read_all(remotes[0], desc))) == ["a"]
        info = ref.info()
        assert (info.blob, info.chain_id) == (desc.digest, desc.annotations[UNCOMPRESSED])

    def test_an_unforced_lazy_layer_is_given_as_it_is_and_pulled_on_first_read(
        self, cache: Cache
    ) -> None:
        remote = RemoteBlobs()
        desc = remote.add(*make_blob({"z": "1"}))
        ref = by_blob(cache, desc, handlers=remote.handlers())
        # Not forced: the lazy gzip layer is given as it is, no pull.
        (only,) = ref.get_remotes("zstd")
        assert [d.digest for d in only.descriptors] == [desc.digest]
        assert remote.calls == Counter()
        # The remote's provider pulls it on first read.
        assert read_all(only, desc) == remote.blobs[desc.digest]
        assert remote.calls == Counter({desc.digest: 1})


def decompressed(data: bytes) -> bytes:
    stream = decompressed_stream(io.BytesIO(data))
    try:
        return stream.read()
    finally:
        stream.close()


def check_variants(
    variants: list[dict[str, Descriptor]], idx: int, remotes: list[Remote], compression: str | None
) -> None:
    """BuildKit ``checkVariantsCoverage``: every variant combination is present, readable."""
    if idx < 0:
        assert all(len(r.descriptors) == 0 for r in remotes)
        return
    got: dict[str, list[Remote]] = {}
    for r in remotes:
        assert len(r.descriptors) - 1 == idx
        top = r.descriptors[idx]
        got.setdefault(top.digest, []).append(Remote(r.descriptors[:idx], r.provider))
        assert digest_of(read_all(r, top)) == top.digest
    for lowers in got.values():
        check_variants(variants, idx - 1, lowers, None)
    targets = variants[idx]
    if compression is not None:
        targets = {compression: variants[idx][compression]}
    for d in targets.values():
        assert d.digest in got, (idx, d, list(got))
        del got[d.digest]
    assert got == {}


# -- TestNondistributableBlobs --------------------------------------------------------------


class TestNondistributableBlobs:
    def test_media_type_and_urls_follow_prefer_non_dist(self, cache: Cache) -> None:
        data, plain = make_blob({"foo": "bar"}, "uncompressed")
        desc = Descriptor(
            "application/vnd.oci.image.layer.nondistributable.v1.tar",
            plain.digest,
            plain.size,
            plain.annotations,
            ("https://buildkit.moby.dev/foo",),
        )
        ref = by_blob(cache, desc, handlers={desc.digest: DescHandler(lambda d: io.BytesIO(data))})
        got = ref.get_remotes(prefer_non_dist=True)[0].descriptors[0]
        assert (got.media_type, got.urls) == (desc.media_type, desc.urls)
        got = ref.get_remotes(prefer_non_dist=False)[0].descriptors[0]
        assert (got.media_type, got.urls) == (OCI, ())


# -- file lists -----------------------------------------------------------------------------


class TestFileList:
    def test_paths_of_the_layer_tarball_are_cached(self, cache: Cache) -> None:
        remote = RemoteBlobs()
        files = {"b/c.txt": "1", "a.txt": "2", "./d": "3", "e/.wh.gone": ""}
        desc = remote.add(*make_blob(files))
        ref = by_blob(cache, desc, handlers=remote.handlers())
        assert ref.file_list() == ["a.txt", "b/c.txt", "d", "e/.wh.gone"]
        assert remote.calls == Counter({desc.digest: 1})  # pulled, not extracted
        assert ref.info().blob_only is True
        cache.content.delete(desc.digest)  # the cached list is used from now on
        assert ref.file_list() == ["a.txt", "b/c.txt", "d", "e/.wh.gone"]
        assert remote.calls == Counter({desc.digest: 1})

    def test_a_record_without_a_blob_has_no_files(self, cache: Cache) -> None:
        m = cache.manager.new().get(timeout=WAIT)
        ref = m.commit()
        assert ref.file_list() == []
