"""Tests for storage._applier.TarApplier and storage._differ.WalkingDiffer on a real store."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest
from refcache.storage import DiffIDMismatchError, decompressed_stream
from refcache.storage._applier import Applier, TarApplier
from refcache.storage._content import LocalContentStore
from refcache.storage._differ import Differ, LayerBlobWriter, WalkingDiffer
from refcache.storage._env import DB_INFO, MetaEnv
from refcache.storage._errors import FailedPreconditionError, InvalidError, NotFoundError
from refcache.storage._mount import local_mount, probe_overlay
from refcache.storage._types import (
    ANNOTATION_UNCOMPRESSED,
    MEDIA_TYPE_OCI_LAYER,
    MEDIA_TYPE_OCI_LAYER_GZIP,
    MEDIA_TYPE_OCI_LAYER_ZSTD,
    Descriptor,
    Mount,
)

MEDIA_TYPES = {
    "gzip": MEDIA_TYPE_OCI_LAYER_GZIP,
    "zstd": MEDIA_TYPE_OCI_LAYER_ZSTD,
    "uncompressed": MEDIA_TYPE_OCI_LAYER,
}


@pytest.fixture
def store(tmp_path: Path, env: MetaEnv) -> LocalContentStore:
    return LocalContentStore(tmp_path / "content", env)


def rw(path: Path) -> list[Mount]:
    return [Mount("bind", str(path), ("rbind", "rw"))]


def ro(path: Path) -> list[Mount]:
    return [Mount("bind", str(path), ("rbind", "ro"))]


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    """A lower tree and an upper tree derived from it (modify, add, delete, link)."""
    lower = tmp_path / "lower"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc" / "conf").write_bytes(b"old setting")
    (lower / "etc" / "obsolete").write_bytes(b"remove me")
    (lower / "var" / "cache").mkdir(parents=True)
    (lower / "var" / "cache" / "blob").write_bytes(os.urandom(3000))
    upper = tmp_path / "upper"
    shutil.copytree(lower, upper, symlinks=True)
    (upper / "etc" / "conf").write_bytes(b"new setting!")
    (upper / "etc" / "obsolete").unlink()
    shutil.rmtree(upper / "var" / "cache")
    (upper / "bin").mkdir()
    (upper / "bin" / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(upper / "bin" / "tool", 0o755)
    os.link(upper / "bin" / "tool", upper / "bin" / "tool-alias")
    (upper / "lib").symlink_to("usr/lib")
    return lower, upper


def snapshot(root: Path) -> dict[str, tuple[int, bytes | str | None]]:
    out: dict[str, tuple[int, bytes | str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st_ = path.lstat()
            data: bytes | str | None = None
            if stat.S_ISREG(st_.st_mode):
                data = path.read_bytes()
            elif stat.S_ISLNK(st_.st_mode):
                data = os.readlink(path)
            out[str(path.relative_to(root))] = (st_.st_mode, data)
    return out


def test_embedded_implementations_satisfy_the_protocols(store: LocalContentStore) -> None:
    assert isinstance(TarApplier(store), Applier)
    assert isinstance(WalkingDiffer(store), Differ)


@pytest.mark.parametrize("compression", ["gzip", "zstd", "uncompressed"])
def test_differ_stores_the_blob_with_its_uncompressed_label(
    store: LocalContentStore, trees: tuple[Path, Path], compression: str
) -> None:
    lower, upper = trees
    desc = WalkingDiffer(store).compare(
        ro(lower), ro(upper), compression=compression, labels={"test": "yes"}
    )
    assert desc.media_type == MEDIA_TYPES[compression]
    blob = store.path(desc.digest).read_bytes()
    assert desc.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert desc.size == len(blob)
    tar = decompressed_stream(io.BytesIO(blob)).read()
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    assert dict(desc.annotations) == {ANNOTATION_UNCOMPRESSED: diff_id}
    info = store.info(desc.digest)
    assert dict(info.labels) == {ANNOTATION_UNCOMPRESSED: diff_id, "test": "yes"}
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        names = tf.getnames()
    assert names == [
        "bin",
        "bin/tool",
        "bin/tool-alias",
        "etc",
        "etc/conf",
        "etc/.wh.obsolete",
        "lib",
        "var",
        "var/.wh.cache",
    ]
    assert store.list_statuses() == []


@pytest.mark.parametrize("compression", ["gzip", "zstd", "uncompressed"])
def test_applier_returns_the_differs_diff_id_and_rebuilds_the_upper(
    store: LocalContentStore, trees: tuple[Path, Path], tmp_path: Path, compression: str
) -> None:
    lower, upper = trees
    desc = WalkingDiffer(store).compare(ro(lower), ro(upper), compression=compression)
    target = tmp_path / "target"
    shutil.copytree(lower, target, symlinks=True)

    applied = TarApplier(store).apply(desc, rw(target))

    assert applied.media_type == MEDIA_TYPE_OCI_LAYER
    assert applied.digest == desc.annotations[ANNOTATION_UNCOMPRESSED]
    with store.reader_at(desc.digest) as blob:
        tar = decompressed_stream(blob).read()
    assert applied.size == len(tar)
    assert snapshot(target) == snapshot(upper)
    assert (target / "bin" / "tool").stat().st_ino == (target / "bin" / "tool-alias").stat().st_ino


def test_diff_against_an_empty_lower_adds_everything(
    store: LocalContentStore, trees: tuple[Path, Path], tmp_path: Path
) -> None:
    _, upper = trees
    desc = WalkingDiffer(store).compare([], ro(upper), compression="zstd")
    target = tmp_path / "fresh"
    target.mkdir()
    TarApplier(store).apply(desc, rw(target))
    assert snapshot(target) == snapshot(upper)


def test_same_diff_twice_is_success_and_merges_labels(
    store: LocalContentStore, trees: tuple[Path, Path]
) -> None:
    lower, upper = trees
    differ = WalkingDiffer(store)
    first = differ.compare(ro(lower), ro(upper), compression="gzip")
    second = differ.compare(ro(lower), ro(upper), compression="gzip", labels={"k": "v"})
    assert second == first
    assert dict(store.info(first.digest).labels) == {
        ANNOTATION_UNCOMPRESSED: first.annotations[ANNOTATION_UNCOMPRESSED],
        "k": "v",
    }
    assert store.list_statuses() == []


def test_custom_media_type_is_used_for_the_descriptor(
    store: LocalContentStore, trees: tuple[Path, Path]
) -> None:
    lower, upper = trees
    desc = WalkingDiffer(store).compare(
        ro(lower), ro(upper), compression="gzip", media_type="application/x-custom+gzip"
    )
    assert desc.media_type == "application/x-custom+gzip"


def test_unknown_compression_is_invalid_and_writes_nothing(
    store: LocalContentStore, trees: tuple[Path, Path]
) -> None:
    lower, upper = trees
    with pytest.raises(InvalidError, match="'brotli'"):
        WalkingDiffer(store).compare(ro(lower), ro(upper), compression="brotli")
    assert list(store.walk()) == []
    assert store.list_statuses() == []


def test_differ_rejects_bad_mounts_and_labels(store: LocalContentStore, tmp_path: Path) -> None:
    differ = WalkingDiffer(store)
    with pytest.raises(InvalidError, match="upper mount list is empty"):
        differ.compare([], [])
    with pytest.raises(InvalidError):
        differ.compare([], "not-mounts")  # type: ignore[arg-type]
    with pytest.raises(InvalidError):
        differ.compare([], ro(tmp_path), labels={"": "empty key"})
    assert store.list_statuses() == []


def test_differ_failure_leaves_no_ingest(store: LocalContentStore, tmp_path: Path) -> None:
    with pytest.raises(FailedPreconditionError):
        WalkingDiffer(store).compare([], ro(tmp_path / "missing"))
    assert store.list_statuses() == []
    assert list(store.walk()) == []


def test_layer_blob_writer_commits_inside_a_transaction_or_leaves_no_ingest(
    store: LocalContentStore, env: MetaEnv
) -> None:
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as tf:
        info = tarfile.TarInfo("hello")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"hello"))
    # Left without a commit (a failed diff, a diffID check that refused): no ingest stays.
    with LayerBlobWriter(store, "gzip", what="test") as blob:
        blob.stream.write(tar.getvalue())
        blob.finish()
    assert store.list_statuses() == []
    assert list(store.walk()) == []
    # Committed in the caller's transaction, together with another write.
    with env.write_txn() as txn, LayerBlobWriter(store, "zstd") as blob:
        blob.stream.write(tar.getvalue())
        digest, size, diff_id = blob.commit(labels={"k": "v"}, txn=txn)
        txn.put(DB_INFO, b"test-key", b"written with the blob")
    assert diff_id == "sha256:" + hashlib.sha256(tar.getvalue()).hexdigest()
    info_ = store.info(digest)
    assert info_.size == size
    assert dict(info_.labels) == {"k": "v", ANNOTATION_UNCOMPRESSED: diff_id}
    # The same blob again is success; its labels join the stored ones.
    with LayerBlobWriter(store, "zstd") as blob:
        blob.stream.write(tar.getvalue())
        assert blob.commit(labels={"more": "x"}) == (digest, size, diff_id)
    assert dict(store.info(digest).labels) == {
        "k": "v",
        "more": "x",
        ANNOTATION_UNCOMPRESSED: diff_id,
    }
    with pytest.raises(InvalidError, match="estargz needs a stargz snapshotter"):
        LayerBlobWriter(store, "estargz")
    assert store.list_statuses() == []


# --- corrupt blobs --------------------------------------------------------------------------


def _layer(store: LocalContentStore, trees: tuple[Path, Path], compression: str) -> Descriptor:
    lower, upper = trees
    return WalkingDiffer(store).compare(ro(lower), ro(upper), compression=compression)


def _rewrite_blob(store: LocalContentStore, digest: str, data: bytes) -> None:
    path = store.path(digest)
    os.chmod(path, 0o644)
    path.write_bytes(data)


@pytest.mark.parametrize("compression", ["gzip", "zstd", "uncompressed"])
def test_blob_with_a_wrong_digest_fails_the_precondition(
    store: LocalContentStore, trees: tuple[Path, Path], tmp_path: Path, compression: str
) -> None:
    desc = _layer(store, trees, compression)
    data = bytearray(store.path(desc.digest).read_bytes())
    data[len(data) // 2] ^= 0x55
    _rewrite_blob(store, desc.digest, bytes(data))
    target = tmp_path / "t"
    target.mkdir()
    with pytest.raises(FailedPreconditionError, match=desc.digest):
        TarApplier(store).apply(desc, rw(target))


@pytest.mark.parametrize("compression", ["gzip", "zstd", "uncompressed"])
def test_truncated_blob_fails_the_precondition(
    store: LocalContentStore, trees: tuple[Path, Path], tmp_path: Path, compression: str
) -> None:
    desc = _layer(store, trees, compression)
    data = store.path(desc.digest).read_bytes()
    _rewrite_blob(store, desc.digest, data[: len(data) - 700])
    target = tmp_path / "t"
    target.mkdir()
    with pytest.raises(FailedPreconditionError, match=desc.digest):
        TarApplier(store).apply(desc, rw(target))


def test_descriptor_with_a_smaller_size_fails_the_precondition(
    store: LocalContentStore, trees: tuple[Path, Path], tmp_path: Path
) -> None:
    desc = _layer(store, trees, "uncompressed")
    short = Descriptor(desc.media_type, desc.digest, desc.size - 1)
    target = tmp_path / "t"
    target.mkdir()
    with pytest.raises(FailedPreconditionError, match="longer than its descriptor size"):
        TarApplier(store).apply(short, rw(target))


def test_applier_sniffs_compression_instead_of_trusting_the_media_type(
    store: LocalContentStore, trees: tuple[Path, Path], tmp_path: Path
) -> None:
    desc = _layer(store, trees, "zstd")
    mislabelled = Descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, desc.digest, desc.size)
    target = tmp_path / "t"
    shutil.copytree(trees[0], target, symlinks=True)
    applied = TarApplier(store).apply(mislabelled, rw(target))
    assert applied.digest == desc.annotations[ANNOTATION_UNCOMPRESSED]


def test_applier_reports_a_missing_blob(store: LocalContentStore, tmp_path: Path) -> None:
    desc = Descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, "sha256:" + "ab" * 32, 10)
    with pytest.raises(NotFoundError):
        TarApplier(store).apply(desc, rw(tmp_path))


def test_applier_refuses_read_only_mounts(store: LocalContentStore, tmp_path: Path) -> None:
    blob = store.write_blob(b"\0" * 1024, media_type=MEDIA_TYPE_OCI_LAYER)
    with pytest.raises(FailedPreconditionError, match="read-only"):
        TarApplier(store).apply(blob, ro(tmp_path))
    overlay_view = [Mount("overlay", "overlay", (f"lowerdir={tmp_path}:{tmp_path}",))]
    with pytest.raises(FailedPreconditionError, match="no upperdir"):
        TarApplier(store).apply(blob, overlay_view)
    with pytest.raises(InvalidError):
        TarApplier(store).apply(blob, [])


def test_applier_rejects_a_hostile_blob_naming_the_entry(
    store: LocalContentStore, tmp_path: Path
) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("../../escape")
        tf.addfile(info, io.BytesIO(b""))
    blob = store.write_blob(buf.getvalue(), media_type=MEDIA_TYPE_OCI_LAYER)
    target = tmp_path / "t"
    target.mkdir()
    with pytest.raises(InvalidError, match="escape"):
        TarApplier(store).apply(blob, rw(target))


# --- overlay --------------------------------------------------------------------------------


def test_applying_into_an_overlay_upperdir_hides_deleted_lower_entries(
    store: LocalContentStore, trees: tuple[Path, Path], tmp_path: Path
) -> None:
    reason = probe_overlay(tmp_path / "probe")
    if reason is not None:
        pytest.skip(f"overlay mounts are not available here: {reason}")
    lower, upper = trees
    desc = WalkingDiffer(store).compare(ro(lower), ro(upper), compression="gzip")
    up, work = tmp_path / "ov-upper", tmp_path / "ov-work"
    up.mkdir()
    work.mkdir()
    mounts = [
        Mount("overlay", "overlay", (f"lowerdir={lower}", f"upperdir={up}", f"workdir={work}"))
    ]
    applied = TarApplier(store).apply(desc, mounts)
    assert applied.digest == desc.annotations[ANNOTATION_UNCOMPRESSED]
    whiteout = (up / "etc" / "obsolete").lstat()
    assert stat.S_ISCHR(whiteout.st_mode)
    assert whiteout.st_rdev == 0
    with local_mount(mounts, readonly=True) as merged:
        assert snapshot(merged) == snapshot(upper)


# -- diffIDs and caps (issue 11) ----------------------------------------------------------


def _gzip_layer(files: dict[str, bytes]) -> tuple[bytes, str]:
    """``(gzip blob, diffID)`` of a layer of regular files."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    tar = raw.getvalue()
    return gzip.compress(tar, mtime=0), "sha256:" + hashlib.sha256(tar).hexdigest()


def _stored(store: LocalContentStore, blob: bytes, diff_id: str) -> Descriptor:
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    desc = Descriptor(
        MEDIA_TYPE_OCI_LAYER_GZIP, digest, len(blob), {ANNOTATION_UNCOMPRESSED: diff_id}
    )
    return store.write_blob(blob, desc)


def test_the_applier_refuses_a_blob_whose_content_has_another_diffid(
    store: LocalContentStore, tmp_path: Path
) -> None:
    blob, real = _gzip_layer({"f": b"evil"})
    claimed = "sha256:" + "ab" * 32
    desc = _stored(store, blob, claimed)
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(DiffIDMismatchError) as caught:
        TarApplier(store).apply(desc, rw(target))
    assert isinstance(caught.value, InvalidError)
    assert (caught.value.expected, caught.value.actual) == (claimed, real)
    assert desc.digest in str(caught.value)
    # Without the annotation the applier only reports the diffID (containerd's contract).
    bare = Descriptor(desc.media_type, desc.digest, desc.size)
    other = tmp_path / "other"
    other.mkdir()
    assert TarApplier(store).apply(bare, rw(other)).digest == real


def test_the_applier_stops_a_gzip_bomb_at_the_size_cap(
    store: LocalContentStore, tmp_path: Path
) -> None:
    blob, diff_id = _gzip_layer({"zeros": bytes(8 << 20)})
    desc = _stored(store, blob, diff_id)
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(InvalidError, match=f"{desc.digest}.*cap of {1 << 20} uncompressed"):
        TarApplier(store, max_size=1 << 20).apply(desc, rw(target))
    # It stopped early: far less than the layer was written.
    assert sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) <= 2 << 20
    with pytest.raises(InvalidError, match="max_layer_size"):
        TarApplier(store, max_size=0)


def test_the_applier_stops_at_the_entry_cap(store: LocalContentStore, tmp_path: Path) -> None:
    blob, diff_id = _gzip_layer({f"f{i}": b"" for i in range(20)})
    desc = _stored(store, blob, diff_id)
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(InvalidError, match=f"{desc.digest}.*cap of 5 entries"):
        TarApplier(store, max_entries=5).apply(desc, rw(target))
