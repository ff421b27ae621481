"""Integrity of shared layers (issue 11): lying diffIDs, layer caps, a private cache root.

A layer blob is shared by the chain ID built from the diffID its descriptor *claims*. These
tests push real hostile blobs (built with tarfile/gzip) through real caches in ``tmp_path``
and check what an honest user of the same cache sees afterwards.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from refcache.actors import (
    Cache,
    DescHandler,
    DiffIDMismatchError,
    ImmutableRef,
    InvalidError,
    NeedsRemoteProviderError,
    open_cache,
)
from refcache.storage import Descriptor, check, digest_of
from refcache.storage._tree import remove_tree

WAIT = 30.0
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
UNCOMPRESSED = "containerd.io/uncompressed"


def layer(files: dict[str, bytes], *, mode: int = 0o644) -> bytes:
    """An uncompressed OCI layer tar of regular files."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode = mode
            tf.addfile(info, io.BytesIO(files[name]))
    return raw.getvalue()


def blob(raw_tar: bytes, *, claims: str | None = None) -> tuple[bytes, Descriptor]:
    """``(gzip blob, descriptor)``; the descriptor claims ``claims`` (default: the truth)."""
    data = gzip.compress(raw_tar, mtime=0)
    diff_id = claims or digest_of(raw_tar)
    return data, Descriptor(GZIP, digest_of(data), len(data), {UNCOMPRESSED: diff_id})


def by_blob(
    cache: Cache, desc: Descriptor, data: bytes | None = None, **kwargs: object
) -> ImmutableRef:
    handlers = {desc.digest: DescHandler(lambda _d: io.BytesIO(data))} if data else None
    ref: ImmutableRef = cache.manager.get_by_blob(desc, desc_handlers=handlers, **kwargs).get(
        timeout=WAIT
    )
    return ref


def read_file(ref: ImmutableRef, name: str) -> bytes:
    with ref.mount().local() as path:
        return (path / name).read_bytes()


def leftovers(cache: Cache) -> list[str]:
    """Temporary snapshots and leases of extractions that should be gone."""
    keys = [info.name for info in cache.snapshotter.walk() if info.name.startswith("extract-")]
    leases = [lease.id for lease in cache.leases.list() if lease.id.startswith("extract-")]
    return keys + leases


HONEST = layer({"etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n"})
EVIL = layer({"etc/passwd": b"root::0:0:owned:/root:/bin/sh\n"})


# -- defect 1: layer poisoning ----------------------------------------------------------------


def test_a_blob_lying_about_its_diffid_never_becomes_the_honest_layer(cache: Cache) -> None:
    honest_data, honest = blob(HONEST)
    evil_data, evil = blob(EVIL, claims=honest.annotations[UNCOMPRESSED])
    assert evil.annotations[UNCOMPRESSED] == honest.annotations[UNCOMPRESSED]

    # The attacker's layer claims the honest layer's diffID (so its chain ID).
    with pytest.raises(DiffIDMismatchError) as caught:
        by_blob(cache, evil, evil_data, extract=True)
    err = caught.value
    assert isinstance(err, InvalidError)
    assert (err.blob, err.expected, err.actual) == (
        evil.digest,
        honest.annotations[UNCOMPRESSED],
        digest_of(EVIL),
    )
    assert err.expected in str(err)
    assert err.actual in str(err)
    # Nothing committed: no snapshot under the chain ID, no temporary snapshot or lease.
    chain = honest.annotations[UNCOMPRESSED]  # a base layer's chain ID is its diffID
    assert chain not in {info.name for info in cache.snapshotter.walk()}
    # The liar lost its chain IDs: no index finds it any more.
    assert cache.metadata.search("chainid:" + chain) == []
    assert leftovers(cache) == []
    # The lying blob is quarantined: gone from the content store, never served again.
    assert not cache.content.exists(evil.digest)
    assert check(cache.root) == []

    # The honest image, later, with the same diffID: its own content, not the attacker's.
    ref = by_blob(cache, honest, honest_data, extract=True)
    assert read_file(ref, "etc/passwd") == b"root:x:0:0:root:/root:/bin/sh\n"
    ref.release()

    # The same lie again: never the quarantined record (its blob is gone, so a provider is
    # needed); and the snapshot the honest layer made stays the honest content.
    with pytest.raises(NeedsRemoteProviderError):
        by_blob(cache, evil)
    again = by_blob(cache, evil, evil_data, extract=True)
    assert read_file(again, "etc/passwd").startswith(b"root:x:")
    again.release()
    again = by_blob(cache, honest, honest_data, extract=True)
    assert read_file(again, "etc/passwd").startswith(b"root:x:")
    again.release()
    assert check(cache.root) == []


def test_the_same_lie_is_refused_again_while_no_honest_layer_exists(cache: Cache) -> None:
    _, honest = blob(HONEST)
    evil_data, evil = blob(EVIL, claims=honest.annotations[UNCOMPRESSED])
    for _ in range(2):
        with pytest.raises(DiffIDMismatchError):
            by_blob(cache, evil, evil_data, extract=True)
        assert not cache.content.exists(evil.digest)
        assert leftovers(cache) == []
    assert check(cache.root) == []


def test_a_lying_blob_after_the_honest_layer_changes_nothing_for_it(cache: Cache) -> None:
    honest_data, honest = blob(HONEST)
    evil_data, evil = blob(EVIL, claims=honest.annotations[UNCOMPRESSED])
    first = by_blob(cache, honest, honest_data, extract=True)
    with contextlib.suppress(DiffIDMismatchError):
        by_blob(cache, evil, evil_data, extract=True).release()
    second = by_blob(cache, honest, honest_data, extract=True)
    assert read_file(first, "etc/passwd") == read_file(second, "etc/passwd")
    assert read_file(second, "etc/passwd").startswith(b"root:x:")
    first.release()
    second.release()
    assert cache.content.exists(honest.digest)
    assert check(cache.root) == []


def test_an_honest_blob_claimed_with_a_wrong_diffid_stays_for_its_honest_record(
    cache: Cache,
) -> None:
    honest_data, honest = blob(HONEST)
    liar = Descriptor(
        honest.media_type, honest.digest, honest.size, {UNCOMPRESSED: digest_of(b"x")}
    )
    good = by_blob(cache, honest, honest_data, extract=True)
    with pytest.raises(DiffIDMismatchError):
        by_blob(cache, liar, honest_data, extract=True)
    # The blob is honest for the record that claims its real diffID: it is kept.
    assert cache.content.exists(honest.digest)
    assert read_file(good, "etc/passwd").startswith(b"root:x:")
    good.release()


def test_converting_a_lying_blob_commits_nothing_and_quarantines_it(cache: Cache) -> None:
    _, honest = blob(HONEST)
    evil_data, evil = blob(EVIL, claims=honest.annotations[UNCOMPRESSED])
    ref = by_blob(cache, evil, evil_data)  # lazy: not extracted
    blobs_before = {info.digest for info in cache.content.walk()}
    with pytest.raises(DiffIDMismatchError, match=evil.digest):
        ref.get_remotes("zstd", force=True)
    # No converted blob was committed; the lying one is gone.
    assert {info.digest for info in cache.content.walk()} <= blobs_before - {evil.digest}
    with pytest.raises(InvalidError, match="quarantined"):
        ref.get_remotes("zstd", force=True)
    ref.release()
    assert check(cache.root) == []


# -- defect 10 (part): layer caps -------------------------------------------------------------


def test_a_gzip_bomb_past_the_size_cap_is_refused_and_nothing_is_committed(
    cache_root: Path,
) -> None:
    # 4 MiB of zeros: a 4 KiB gzip blob that expands past a 1 MiB cap.
    bomb_tar = layer({"zeros": bytes(4 << 20)})
    data, desc = blob(bomb_tar)
    assert len(data) < 16 << 10
    with open_cache(
        cache_root, snapshotter="native", timeout=WAIT, max_layer_size=1 << 20
    ) as cache:
        with pytest.raises(InvalidError, match=f"{desc.digest}.*cap of {1 << 20}"):
            by_blob(cache, desc, data, extract=True)
        assert leftovers(cache) == []
        assert [i.name for i in cache.snapshotter.walk()] == []
        # Not a lie: the blob stays, and a cache with a larger cap extracts it.
        assert cache.content.exists(desc.digest)
        assert check(cache.root) == []
    with open_cache(cache_root, snapshotter="native", timeout=WAIT) as cache:
        ref = by_blob(cache, desc, data, extract=True)
        assert len(read_file(ref, "zeros")) == 4 << 20
        ref.release()


def test_a_layer_past_the_entry_cap_is_refused(cache_root: Path) -> None:
    data, desc = blob(layer({f"f{i:03}": b"" for i in range(50)}))
    with open_cache(cache_root, snapshotter="native", timeout=WAIT, max_layer_entries=10) as cache:
        with pytest.raises(InvalidError, match=f"{desc.digest}.*cap of 10 entries"):
            by_blob(cache, desc, data, extract=True)
        assert leftovers(cache) == []
        assert check(cache.root) == []


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "64G"])
def test_layer_caps_must_be_positive_integers(cache_root: Path, bad: object) -> None:
    for option in ("max_layer_size", "max_layer_entries"):
        with pytest.raises(InvalidError, match=option):
            open_cache(cache_root, snapshotter="native", **{option: bad})  # type: ignore[arg-type]
    assert not (cache_root / "lock").exists()


# -- defect 2: set-id files and devices of layers are for root only --------------------------

NOBODY = 65534


def _as_nobody(action: Callable[[], None]) -> int:
    """Runs ``action`` in a forked child as uid/gid 65534; returns its exit status.

    The child exits 0 when ``action`` raised ``PermissionError``, 1 when it succeeded.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 2
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            action()
            code = 1
        except PermissionError:
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory every local user may traverse (pytest's own tmp dirs are 0700), so that
    only the cache's own modes stand between another user and the cache."""
    base = Path(tempfile.mkdtemp(prefix="refcache-world-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        remove_tree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="extracting set-id files needs root")
def test_a_setuid_file_of_a_layer_is_out_of_reach_of_other_users(world_dir: Path) -> None:
    base = world_dir
    data, desc = blob(layer({"bin/id": b"#!/bin/sh\necho euid=0\n"}, mode=0o4755))
    with open_cache(base / "cache", snapshotter="native", timeout=WAIT) as cache:
        ref = by_blob(cache, desc, data, extract=True)
        with ref.mount().local() as path:
            suid = path / "bin" / "id"
            st = suid.stat()
            assert st.st_mode & stat.S_ISUID
            assert st.st_uid == 0
            # The path itself is world-traversable up to the cache root...
            assert _as_nobody(lambda: os.stat(base)) == 1
            # ...but neither the set-id file nor any tree of the cache can be reached.
            assert _as_nobody(lambda: os.stat(suid)) == 0
            assert _as_nobody(lambda: os.listdir(cache.root)) == 0
            for name in ("meta", "content", "snapshots", "mounts"):
                assert _as_nobody(lambda n=name: os.listdir(cache.root / n)) == 0
        for name in ("", "meta", "content", "snapshots"):
            assert stat.S_IMODE((cache.root / name).stat().st_mode) == 0o700, name
        for name in ("lock", "meta/data.mdb", "meta/lock.mdb"):
            assert stat.S_IMODE((cache.root / name).stat().st_mode) == 0o600, name
        ref.release()


def test_opening_a_cache_with_wider_modes_tightens_them_and_warns(
    cache_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    open_cache(cache_root, snapshotter="native", timeout=WAIT).close()
    widened = {"": 0o755, "snapshots": 0o755, "content": 0o711, "meta/data.mdb": 0o644}
    for name, mode in widened.items():
        os.chmod(cache_root / name, mode)
    with caplog.at_level(logging.WARNING, logger="refcache.storage._layout"):
        open_cache(cache_root, snapshotter="native", timeout=WAIT).close()
    for name in widened:
        expected = 0o600 if name.endswith(".mdb") else 0o700
        assert stat.S_IMODE((cache_root / name).stat().st_mode) == expected, name
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "open to other local users" in warning
    assert f"{cache_root / 'snapshots'} 0755 -> 0700" in warning
    assert f"{cache_root / 'meta' / 'data.mdb'} 0644 -> 0600" in warning
