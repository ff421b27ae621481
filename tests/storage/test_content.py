"""The local content store: containerd's content testsuite, plus refcache's own rules.

Ported from ``core/content/testsuite/testsuite.go`` (Writer, UpdateStatus, CommitExists, Resume,
ResumeTruncate/Discard/Copy/CopySeeker, SmallBlob, Labels, CommitErrorState), against a real
store in ``tmp_path`` with real LMDB metadata.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import itertools
import os
import random
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import msgpack
import pytest
from refcache.storage._content import (
    ContentStatus,
    ContentStore,
    ContentWriter,
    LocalContentStore,
)
from refcache.storage._env import DB_CONTENT, MetaEnv, WriteTxn
from refcache.storage._errors import (
    AlreadyExistsError,
    CorruptMetadataError,
    FailedPreconditionError,
    InvalidError,
    LockedError,
    NotFoundError,
    StoreFullError,
)
from refcache.storage._labels import MAX_LABEL_SIZE
from refcache.storage._times import format_rfc3339_ns, parse_rfc3339_ns
from refcache.storage._types import (
    MEDIA_TYPE_OCI_LAYER,
    MEDIA_TYPE_OCI_LAYER_GZIP,
    ContentInfo,
    Descriptor,
)

GC_ROOT = "containerd.io/gc.root"
EMPTY_DIGEST = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
BAD_DIGESTS = ["", "sha256:xyz", "sha256:" + "A" * 64, "md5:" + "0" * 32, "sha256:" + "0" * 63]
TIMEOUT = 10.0

_SEEDS = itertools.count(1)


class RollbackError(Exception):
    """Raised inside a transaction to roll it back."""


@contextlib.contextmanager
def rolled_back(env: MetaEnv) -> Iterator[WriteTxn]:
    """A write transaction that is rolled back after the body ran."""
    with contextlib.suppress(RollbackError), env.write_txn() as txn:
        yield txn
        raise RollbackError


def create_content(size: int) -> tuple[bytes, str]:
    """Deterministic, distinct content per call (containerd createContent)."""
    data = random.Random(next(_SEEDS)).randbytes(size)
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "content"


@pytest.fixture
def store(root: Path, env: MetaEnv) -> LocalContentStore:
    return LocalContentStore(root, env)


def ingest_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "ingest").iterdir())


def blob_files(root: Path) -> list[str]:
    return sorted(
        f"{alg.name}:{p.name}" for alg in (root / "blobs").iterdir() for p in alg.iterdir()
    )


def check_info(
    store: LocalContentStore,
    digest: str,
    *,
    size: int,
    labels: dict[str, str],
    created: tuple[int, int],
    updated: tuple[int, int],
) -> None:
    info = store.info(digest)
    assert info.digest == digest
    assert info.size == size
    assert dict(info.labels) == labels
    assert created[0] <= info.created_at <= created[1]
    assert updated[0] <= info.updated_at <= updated[1]


def check_status(
    writer: ContentWriter,
    expected: ContentStatus,
    digest: str,
    started: tuple[int, int],
    updated: tuple[int, int],
) -> None:
    status = writer.status()
    assert writer.digest() == digest
    assert (status.ref, status.offset, status.total) == (
        expected.ref,
        expected.offset,
        expected.total,
    )
    assert started[0] <= status.started_at <= started[1]
    assert updated[0] <= status.updated_at <= updated[1]


def write_in_small_chunks(writer: ContentWriter, data: bytes, chunk: int = 32) -> None:
    for start in range(0, len(data), chunk):
        assert writer.write(data[start : start + chunk]) == len(data[start : start + chunk])


# --- containerd testsuite ---------------------------------------------------------------------


def test_local_store_satisfies_the_content_store_protocol(store: LocalContentStore) -> None:
    assert isinstance(store, ContentStore)
    with store.writer("w") as writer:
        assert isinstance(writer, ContentWriter)


def test_writer_commits_with_or_without_descriptor(store: LocalContentStore) -> None:
    labels = {GC_ROOT: "2024-01-01T00:00:00Z"}
    c1, d1 = create_content(256)
    c2, d2 = create_content(256)
    c3, d3 = create_content(256)
    c4, d4 = create_content(256)
    writers = [
        store.writer("c1"),
        store.writer("c2", total=len(c2)),
        store.writer("c3", expected=d3),
        store.writer("c4", total=len(c4), expected=d4),
    ]
    for data, digest, writer in zip((c1, c2, c3, c4), (d1, d2, d3, d4), writers, strict=True):
        write_in_small_chunks(writer, data)
        pre = time.time_ns()
        info = writer.commit(0, None, labels=labels)
        post = time.time_ns()
        writer.close()
        assert writer.digest() == digest
        assert info.digest == digest
        check_info(store, digest, size=256, labels=labels, created=(pre, post), updated=(pre, post))
        with store.reader_at(digest) as reader:
            assert reader.read() == data


def test_update_status_tracks_offset_digest_and_times(store: LocalContentStore) -> None:
    c1, d1 = create_content(256)
    pre_start = time.time_ns()
    writer = store.writer("c1", total=256, expected=d1)
    post_start = time.time_ns()
    expected = ContentStatus(ref="c1", offset=0, total=256, expected=d1)
    check_status(writer, expected, EMPTY_DIGEST, (pre_start, post_start), (pre_start, post_start))
    assert writer.status().expected == d1

    for lo, hi in ((0, 64), (64, 192), (192, 256)):
        pre = time.time_ns()
        writer.write(c1[lo:hi])
        post = time.time_ns()
        expected = ContentStatus(ref="c1", offset=hi, total=256)
        check_status(writer, expected, sha256(c1[:hi]), (pre_start, post_start), (pre, post))

    labels = {GC_ROOT: "now"}
    pre = time.time_ns()
    writer.commit(labels=labels)
    post = time.time_ns()
    check_info(store, d1, size=256, labels=labels, created=(pre, post), updated=(pre, post))


def test_commit_of_existing_content_raises_already_exists_and_drops_the_ingest(
    store: LocalContentStore, root: Path
) -> None:
    c1, d1 = create_content(256)
    store.write_blob(c1, Descriptor(MEDIA_TYPE_OCI_LAYER, d1, 256))
    for i, expected in enumerate((d1, None)):
        writer = store.writer(f"c1-commitexists-{i}")
        writer.write(c1)
        with pytest.raises(AlreadyExistsError, match=d1):
            writer.commit(len(c1), expected)
        writer.close()
    assert ingest_dirs(root) == []
    assert blob_files(root) == [d1]


def test_resumed_writer_continues_where_the_first_stopped(store: LocalContentStore) -> None:
    cb, dgst = create_content(256)
    first, second = cb[:128], cb[128:]
    pre_start = time.time_ns()
    w1 = store.writer("cb", total=256, expected=dgst)
    post_start = time.time_ns()
    pre_update = post_start
    w1.write(first)
    post_update = time.time_ns()
    expected = ContentStatus(ref="cb", offset=128, total=256)
    check_status(w1, expected, sha256(first), (pre_start, post_start), (pre_update, post_update))
    w1.close()

    w2 = store.writer("cb", total=256, expected=dgst)
    # The status is the one from before the close.
    check_status(w2, expected, sha256(first), (pre_start, post_start), (pre_update, post_update))
    pre_update = time.time_ns()
    w2.write(second)
    post_update = time.time_ns()
    expected = ContentStatus(ref="cb", offset=256, total=256)
    check_status(w2, expected, dgst, (pre_start, post_start), (pre_update, post_update))

    pre = time.time_ns()
    w2.commit()
    post = time.time_ns()
    w2.close()
    check_info(store, dgst, size=256, labels={}, created=(pre, post), updated=(pre, post))


def resume_truncate(
    store: LocalContentStore, writer: ContentWriter, data: bytes, written: int, digest: str
) -> None:
    writer.truncate(0)
    assert (writer.offset, writer.digest()) == (0, EMPTY_DIGEST)
    for start in range(0, len(data), 1024):
        writer.write(data[start : start + 1024])
    writer.commit(len(data), digest)


def resume_discard(
    store: LocalContentStore, writer: ContentWriter, data: bytes, written: int, digest: str
) -> None:
    for start in range(written, len(data), 1024):
        writer.write(data[start : start + 1024])
    writer.commit(len(data), digest)


class _ForwardOnly(io.RawIOBase):
    """A stream that cannot seek (containerd's resumeCopy wraps its reader the same way)."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        return self._inner.readinto(buffer)


def resume_copy(
    store: LocalContentStore, writer: ContentWriter, data: bytes, written: int, digest: str
) -> None:
    store.copy(writer, io.BufferedReader(_ForwardOnly(data)), len(data), digest)


def resume_copy_seeker(
    store: LocalContentStore, writer: ContentWriter, data: bytes, written: int, digest: str
) -> None:
    store.copy(writer, io.BytesIO(data), len(data), digest)


@pytest.mark.parametrize(
    "resume",
    [resume_truncate, resume_discard, resume_copy, resume_copy_seeker],
    ids=["Truncate", "Discard", "Copy", "CopySeeker"],
)
def test_resume_after_close_at_any_offset(
    store: LocalContentStore,
    root: Path,
    resume: Callable[[LocalContentStore, ContentWriter, bytes, int, str], None],
) -> None:
    for i, size in enumerate((500, 5000, 50000)):
        for j, fraction in enumerate((0.0, 0.1, 0.5, 0.9, 1.0)):
            data, digest = create_content(size)
            limit = int(size * fraction)
            ref = f"ref-{i}-{j}"
            writer = store.writer(ref, total=size, expected=digest)
            writer.write(data[:limit])
            writer.close()

            writer = store.writer(ref, total=size, expected=digest)
            assert writer.status().offset == limit
            pre = time.time_ns()
            resume(store, writer, data, limit, digest)
            post = time.time_ns()
            writer.close()
            check_info(
                store, digest, size=size, labels={}, created=(pre, post), updated=(pre, post)
            )
    assert ingest_dirs(root) == []


def test_small_blob_reads_back_whole_even_when_asking_for_more(store: LocalContentStore) -> None:
    blob = b"foobar"
    digest = sha256(blob)
    writer = store.writer("SmallBlob", total=len(blob), expected=digest)
    writer.write(blob)
    writer.commit(len(blob), digest)
    writer.close()
    with store.reader_at(Descriptor(MEDIA_TYPE_OCI_LAYER, digest, len(blob))) as reader:
        assert reader.seekable()
        assert reader.read(len(blob) + 1) == blob
        reader.seek(3)
        assert reader.read() == b"bar"


def test_labels_are_set_at_commit_replaced_and_updated_by_fieldpath(
    store: LocalContentStore,
) -> None:
    c1, d1 = create_content(256)
    writer = store.writer("c1-checklabels", total=256, expected=d1)
    writer.write(c1)
    labels = {"k1": "v1", "k2": "v2", GC_ROOT: "2024-01-01T00:00:00Z"}
    pre_commit = time.time_ns()
    writer.commit(labels=labels)
    post_commit = time.time_ns()
    writer.close()
    created = (pre_commit, post_commit)
    check_info(store, d1, size=256, labels=labels, created=created, updated=created)

    labels = {"k1": "newvalue", "k3": "v3", GC_ROOT: "2024-01-01T00:00:00Z"}
    pre = time.time_ns()
    updated = store.update(ContentInfo(d1, 256, labels))
    post = time.time_ns()
    assert dict(updated.labels) == labels
    check_info(store, d1, size=256, labels=labels, created=created, updated=(pre, post))

    # Only the named keys change: k3 is absent from the info, so it goes; k1 is set.
    info = ContentInfo(d1, 256, {"k1": "v1", GC_ROOT: "2024-01-01T00:00:00Z"})
    pre = time.time_ns()
    store.update(info, "labels.k3", "labels.k1")
    post = time.time_ns()
    expected = {"k1": "v1", GC_ROOT: "2024-01-01T00:00:00Z"}
    check_info(store, d1, size=256, labels=expected, created=created, updated=(pre, post))


def test_commit_error_states_follow_containerd(store: LocalContentStore, root: Path) -> None:
    c1, d1 = create_content(256)
    _, d2 = create_content(256)
    store.write_blob(c1, Descriptor(MEDIA_TYPE_OCI_LAYER, d1, 256))
    ref = "c1-commiterror-state"

    def ref_not_available() -> None:
        with pytest.raises(LockedError, match=ref):
            store.writer(ref)

    writer = store.writer(ref)
    writer.write(c1)
    ref_not_available()
    with pytest.raises(AlreadyExistsError):
        writer.commit(len(c1), d1)

    writer = store.writer(ref)
    ref_not_available()
    writer.write(c1)
    with pytest.raises(AlreadyExistsError):
        writer.commit(len(c1))  # exists, found without a digest given
    writer.close()

    writer = store.writer(ref)
    ref_not_available()
    writer.write(c1 + b"more")
    with pytest.raises(FailedPreconditionError, match="unexpected commit digest"):
        writer.commit(len(c1) + 4, d2)
    writer.close()

    writer = store.writer(ref)  # resumes the ingest the failed commit kept
    ref_not_available()
    assert writer.offset == len(c1) + 4
    with pytest.raises(FailedPreconditionError, match="unexpected commit size"):
        writer.commit(len(c1))
    writer.close()

    writer = store.writer(ref)
    ref_not_available()
    info = writer.commit(len(c1) + 4)
    assert info.digest == sha256(c1 + b"more")
    writer.close()

    writer = store.writer(ref)  # a fresh ingest under the same ref
    assert writer.offset == 0
    writer.write(c1)
    ref_not_available()
    with pytest.raises(AlreadyExistsError):
        writer.commit(len(c1), d1)
    writer.close()

    writer = store.writer(ref)
    ref_not_available()
    writer.close()
    writer = store.writer(ref)
    writer.close()
    assert ingest_dirs(root) == [hashlib.sha256(ref.encode()).hexdigest()]


# --- layout, durability and metadata ----------------------------------------------------------


def test_layout_on_disk_is_containerds(store: LocalContentStore, root: Path, env: MetaEnv) -> None:
    data, digest = create_content(100)
    writer = store.writer("layout-ref", total=100)
    writer.write(data[:10])
    ingest = root / "ingest" / hashlib.sha256(b"layout-ref").hexdigest()
    assert sorted(p.name for p in ingest.iterdir()) == [
        "data",
        "ref",
        "startedat",
        "total",
        "updatedat",
    ]
    assert (ingest / "ref").read_text() == "layout-ref"
    assert (ingest / "total").read_text() == "100"
    started = parse_rfc3339_ns((ingest / "startedat").read_text())
    assert started == writer.status().started_at
    assert (ingest / "data").read_bytes() == data[:10]
    writer.write(data[10:])
    writer.commit()

    blob = root / "blobs" / "sha256" / digest.removeprefix("sha256:")
    assert store.path(digest) == blob
    assert blob.read_bytes() == data
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    assert not ingest.exists()
    with env.read_txn() as txn:
        raw = txn.get(DB_CONTENT, digest.encode())
    assert raw is not None
    record = msgpack.unpackb(raw)
    assert set(record) == {"size", "created_at", "updated_at", "labels"}
    assert (record["size"], record["labels"]) == (100, {})
    assert record["created_at"] == record["updated_at"] == store.info(digest).created_at


def test_timestamps_round_trip_as_rfc3339_nano() -> None:
    ns = 1_700_000_000_123_456_789
    text = format_rfc3339_ns(ns)
    assert text == "2023-11-14T22:13:20.123456789Z"
    assert parse_rfc3339_ns(text) == ns
    assert format_rfc3339_ns(1_700_000_000_000_000_000) == "2023-11-14T22:13:20Z"
    # Go writes the local offset; the instant is what counts.
    assert parse_rfc3339_ns("2023-11-15T00:13:20.5+02:00") == 1_700_000_000_500_000_000
    with pytest.raises(ValueError, match="not an RFC 3339 timestamp"):
        parse_rfc3339_ns("yesterday")
    with pytest.raises(ValueError, match="month"):
        parse_rfc3339_ns("2023-13-01T00:00:00Z")  # no 13th month


def test_blob_survives_reopening_metadata_and_store(tmp_path: Path) -> None:
    data, digest = create_content(1000)
    env = MetaEnv(tmp_path / "meta")
    try:
        store = LocalContentStore(tmp_path / "content", env)
        store.write_blob(data, labels={"k": "v"})
    finally:
        env.close()
    env = MetaEnv(tmp_path / "meta")
    try:
        store = LocalContentStore(tmp_path / "content", env)
        info = store.info(digest)
        assert (info.size, dict(info.labels)) == (1000, {"k": "v"})
        with store.reader_at(digest) as reader:
            assert reader.read() == data
        assert store.orphans() == []
        assert store.missing() == []
    finally:
        env.close()


def test_ingest_survives_reopening_and_resumes(tmp_path: Path) -> None:
    data, digest = create_content(3000)
    env = MetaEnv(tmp_path / "meta")
    try:
        writer = LocalContentStore(tmp_path / "content", env).writer("r", total=3000)
        writer.write(data[:1234])
        writer.close()
    finally:
        env.close()
    env = MetaEnv(tmp_path / "meta")
    try:
        store = LocalContentStore(tmp_path / "content", env)
        assert store.status("r").offset == 1234
        writer = store.writer("r")
        assert (writer.offset, writer.status().total) == (1234, 3000)
        writer.write(data[1234:])
        assert writer.commit(expected=digest).size == 3000
    finally:
        env.close()


def test_sha512_expected_digest_stores_under_sha512(store: LocalContentStore, root: Path) -> None:
    data = b"sha512 content"
    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    writer = store.writer("s512", expected=digest)
    writer.write(data)
    assert writer.digest() == digest
    writer.commit()
    assert blob_files(root) == [digest]
    assert store.info(digest).size == len(data)


def test_commit_rehashes_when_expected_uses_another_algorithm(store: LocalContentStore) -> None:
    data = b"rehash me"
    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    writer = store.writer("rehash")  # hashes sha256 while writing
    writer.write(data)
    assert writer.commit(expected=digest).digest == digest


def test_corrupt_metadata_raises_corrupt_metadata_error(
    store: LocalContentStore, env: MetaEnv
) -> None:
    digest = sha256(b"x")
    with env.write_txn() as txn:
        txn.put(DB_CONTENT, digest.encode(), msgpack.packb({"size": "big"}))
    with pytest.raises(CorruptMetadataError, match=digest) as info:
        store.info(digest)
    assert (info.value.record_id, info.value.key) == (digest, "size")


# --- bad input changes nothing ----------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_DIGESTS)
def test_malformed_digest_is_rejected_everywhere_and_changes_nothing(
    store: LocalContentStore, root: Path, bad: str
) -> None:
    data, _ = create_content(64)
    store.write_blob(data, labels={"k": "v"})
    before = (list(store.walk()), blob_files(root), ingest_dirs(root))

    calls: list[Callable[[], object]] = [
        lambda: store.info(bad),
        lambda: store.exists(bad),
        lambda: store.path(bad),
        lambda: store.reader_at(bad),
        lambda: store.delete(bad),
        lambda: store.update(ContentInfo(bad, 0, {"k": "changed"})),
        lambda: store.writer("bad-expected", expected=bad),
    ]
    for call in calls:
        with pytest.raises(InvalidError):
            call()
    assert (list(store.walk()), blob_files(root), ingest_dirs(root)) == before

    writer = store.writer("good")
    writer.write(b"abc")
    with pytest.raises(InvalidError, match="expected digest"):
        writer.commit(expected=bad)
    # The writer is still open and usable.
    writer.write(b"def")
    assert writer.commit(expected=sha256(b"abcdef")).size == 6


def test_invalid_arguments_raise_invalid_error_naming_them(store: LocalContentStore) -> None:
    with pytest.raises(InvalidError, match="invalid ingest ref ''"):
        store.writer("")
    with pytest.raises(InvalidError, match="invalid total -1"):
        store.writer("r", total=-1)
    with pytest.raises(InvalidError, match="write_blob needs bytes"):
        store.write_blob("text")  # type: ignore[arg-type]
    with pytest.raises(InvalidError, match="expected must be a Descriptor"):
        store.write_blob(b"x", "sha256:" + "0" * 64)  # type: ignore[arg-type]
    with pytest.raises(InvalidError, match="update needs a ContentInfo"):
        store.update({"digest": EMPTY_DIGEST})  # type: ignore[arg-type]
    with store.writer("r") as writer:
        with pytest.raises(InvalidError, match="needs bytes"):
            writer.write("text")  # type: ignore[arg-type]
        with pytest.raises(InvalidError, match="supports only size 0"):
            writer.truncate(3)
        with pytest.raises(InvalidError, match="invalid commit size -5"):
            writer.commit(-5)
        assert writer.status().offset == 0
    assert store.status("r").offset == 0


# --- labels -----------------------------------------------------------------------------------


def test_update_rejects_fieldpaths_other_than_labels_and_changes_nothing(
    store: LocalContentStore,
) -> None:
    desc = store.write_blob(b"labelled", labels={"a": "1"})
    before = store.info(desc.digest)
    for path in ("size", "digest", "created_at", "labels.", "labelsx", "annotations.a"):
        with pytest.raises(InvalidError, match="cannot update"):
            store.update(ContentInfo(desc.digest, 0, {"a": "2"}), path)
    assert store.info(desc.digest) == before
    assert dict(store.info(desc.digest).labels) == {"a": "1"}


def test_update_labels_fieldpath_replaces_all_and_empty_values_delete(
    store: LocalContentStore,
) -> None:
    digest = store.write_blob(b"labelled", labels={"a": "1", "b": "2"}).digest
    store.update(ContentInfo(digest, 0, {"c": "3", "d": ""}), "labels")
    assert dict(store.info(digest).labels) == {"c": "3"}
    store.update(ContentInfo(digest, 0, {"c": ""}), "labels.c")
    assert dict(store.info(digest).labels) == {}
    store.update(ContentInfo(digest, 0, {"x.y/z": "1"}), "labels.x.y/z")
    assert dict(store.info(digest).labels) == {"x.y/z": "1"}


def test_update_of_missing_blob_raises_not_found(store: LocalContentStore) -> None:
    with pytest.raises(NotFoundError, match=EMPTY_DIGEST):
        store.update(ContentInfo(EMPTY_DIGEST, 0, {"a": "b"}))


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ({"k" * MAX_LABEL_SIZE: "v"}, "more than the maximum 4096"),
        ({"k": "v" * MAX_LABEL_SIZE}, "more than the maximum 4096"),
        ({"": "v"}, "empty key"),
        ({"k": 1}, "keys and values must be strings"),
        ({1: "v"}, "keys and values must be strings"),
    ],
)
def test_invalid_labels_are_rejected_and_change_nothing(
    store: LocalContentStore, root: Path, labels: dict[object, object], match: str
) -> None:
    digest = store.write_blob(b"labelled", labels={"a": "1"}).digest
    with pytest.raises(InvalidError, match=match):
        store.update(_info(digest, labels))
    with pytest.raises(InvalidError, match=match):
        store.write_blob(b"other", labels=labels)  # type: ignore[arg-type]
    writer = store.writer("labels")
    writer.write(b"abc")
    with pytest.raises(InvalidError, match=match):
        writer.commit(labels=labels)  # type: ignore[arg-type]
    assert writer.status().offset == 3  # still open
    writer.close()
    assert dict(store.info(digest).labels) == {"a": "1"}
    assert blob_files(root) == [digest]


def _info(digest: str, labels: dict[object, object]) -> ContentInfo:
    return ContentInfo(digest, 0, labels)  # type: ignore[arg-type]


def test_label_of_exactly_the_maximum_size_is_accepted(store: LocalContentStore) -> None:
    labels = {"k": "v" * (MAX_LABEL_SIZE - 1)}
    digest = store.write_blob(b"big label", labels=labels).digest
    assert dict(store.info(digest).labels) == labels


# --- walk -------------------------------------------------------------------------------------


@pytest.fixture
def three_blobs(store: LocalContentStore) -> list[str]:
    a = store.write_blob(b"a", labels={GC_ROOT: "t", "kind": "layer"}).digest
    b = store.write_blob(b"bb", labels={"kind": "config"}).digest
    c = store.write_blob(b"ccc").digest
    return sorted([a, b, c])


def walked(store: LocalContentStore, *filters: str) -> list[str]:
    return [info.digest for info in store.walk(*filters)]


def test_walk_without_filters_lists_every_blob_in_digest_order(
    store: LocalContentStore, three_blobs: list[str]
) -> None:
    assert walked(store) == three_blobs


def test_walk_filters_on_digest_size_and_labels(
    store: LocalContentStore, three_blobs: list[str]
) -> None:
    a, b, c = sha256(b"a"), sha256(b"bb"), sha256(b"ccc")
    assert walked(store, f"digest=={a}") == [a]
    assert walked(store, "size==2") == [b]
    assert walked(store, "size!=2") == sorted([a, c])
    assert walked(store, f'labels."{GC_ROOT}"') == [a]
    assert walked(store, "labels.kind") == sorted([a, b])
    assert walked(store, "labels.kind==layer,size==1") == [a]
    assert walked(store, "labels.kind==layer,size==2") == []
    assert walked(store, "labels.kind==config", "size==3") == sorted([b, c])
    assert walked(store, "labels.kind~=^con") == [b]
    assert walked(store, "digest~=^sha512:") == []


def test_walk_with_a_malformed_filter_raises_at_call(
    store: LocalContentStore, three_blobs: list[str]
) -> None:
    with pytest.raises(InvalidError, match=re.escape("'labels.kind=='")):
        store.walk("labels.kind==")


def test_walk_result_allows_writing_while_iterating(store: LocalContentStore) -> None:
    for i in range(3):
        store.write_blob(f"blob {i}".encode())
    for info in store.walk():
        store.update(ContentInfo(info.digest, 0, {"seen": "yes"}))
    assert all(dict(i.labels) == {"seen": "yes"} for i in store.walk())


# --- delete -----------------------------------------------------------------------------------


def test_delete_removes_metadata_and_file(store: LocalContentStore, root: Path) -> None:
    digest = store.write_blob(b"doomed").digest
    path = store.path(digest)
    store.delete(digest)
    with pytest.raises(NotFoundError, match=digest):
        store.info(digest)
    assert store.exists(digest) is False
    assert not path.exists()
    with pytest.raises(NotFoundError, match=digest):
        store.delete(digest)
    with pytest.raises(NotFoundError, match=digest):
        store.reader_at(digest)


def test_delete_in_a_transaction_unlinks_only_after_commit(
    store: LocalContentStore, env: MetaEnv
) -> None:
    digest = store.write_blob(b"doomed").digest
    path = store.path(digest)
    with env.write_txn() as txn:
        store.delete(digest, txn=txn)
        assert store.exists(digest, txn=txn) is False
        assert path.exists()
    assert not path.exists()
    assert store.exists(digest) is False


def test_delete_rolled_back_keeps_metadata_and_file(store: LocalContentStore, env: MetaEnv) -> None:
    digest = store.write_blob(b"kept", labels={"k": "v"}).digest
    path = store.path(digest)

    with rolled_back(env) as txn:
        store.delete(digest, txn=txn)
    assert path.read_bytes() == b"kept"
    assert dict(store.info(digest).labels) == {"k": "v"}
    # A later write transaction of the store does not mistake it for anything to clean.
    store.write_blob(b"another")
    assert path.read_bytes() == b"kept"
    assert store.missing() == []


def test_delete_then_rewrite_in_one_transaction_keeps_the_file(
    store: LocalContentStore, env: MetaEnv
) -> None:
    digest = store.write_blob(b"phoenix").digest
    with env.write_txn() as txn:
        store.delete(digest, txn=txn)
        store.write_blob(b"phoenix", txn=txn)
    assert store.path(digest).read_bytes() == b"phoenix"
    assert store.missing() == []


def test_reader_stays_readable_after_delete(store: LocalContentStore) -> None:
    digest = store.write_blob(b"still here").digest
    with store.reader_at(digest) as reader:
        store.delete(digest)
        assert reader.read() == b"still here"


# --- caller transactions on commit ------------------------------------------------------------


def test_commit_in_a_rolled_back_transaction_leaves_nothing_visible(
    store: LocalContentStore, env: MetaEnv, root: Path
) -> None:
    data, digest = create_content(500)

    with rolled_back(env) as txn:
        desc = store.write_blob(data, labels={"k": "v"}, txn=txn)
        assert desc.digest == digest
        assert store.exists(digest, txn=txn) is True
    assert store.exists(digest) is False
    with pytest.raises(NotFoundError):
        store.info(digest)
    assert walked(store) == []
    assert ingest_dirs(root) == []
    # The renamed file is an orphan until the store's next write transaction removes it.
    assert store.orphans() == [store.path(digest)]
    store.write_blob(b"unrelated")
    assert not store.path(digest).exists()
    assert store.orphans() == []


def test_commit_in_a_committed_transaction_is_visible_after_commit(
    store: LocalContentStore, env: MetaEnv
) -> None:
    with env.write_txn() as txn:
        writer = store.writer("in-txn")
        writer.write(b"txn data")
        info = writer.commit(labels={"k": "v"}, txn=txn)
        assert store.info(info.digest, txn=txn) == info
    assert store.info(info.digest) == info
    assert store.path(info.digest).read_bytes() == b"txn data"
    store.write_blob(b"unrelated")  # the sweep must not touch a committed blob
    assert store.path(info.digest).read_bytes() == b"txn data"


def test_rolled_back_commit_is_overwritten_by_a_later_commit(
    store: LocalContentStore, env: MetaEnv
) -> None:
    with rolled_back(env) as txn:
        store.write_blob(b"twice", txn=txn)
    desc = store.write_blob(b"twice")
    assert store.path(desc.digest).read_bytes() == b"twice"
    assert store.orphans() == []


# --- write_blob -------------------------------------------------------------------------------


def test_write_blob_returns_a_descriptor_with_the_default_media_type(
    store: LocalContentStore,
) -> None:
    desc = store.write_blob(b"hello")
    assert desc == Descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, sha256(b"hello"), 5)
    assert store.write_blob(b"hello2", media_type="x/y").media_type == "x/y"


def test_write_blob_copies_the_expected_descriptor(store: LocalContentStore) -> None:
    expected = Descriptor(
        MEDIA_TYPE_OCI_LAYER,
        sha256(b"layer"),
        5,
        annotations={"containerd.io/uncompressed": sha256(b"diff")},
        urls=("https://example.invalid/layer",),
    )
    desc = store.write_blob(io.BytesIO(b"layer"), expected)
    assert desc == expected
    assert dict(desc.annotations) == dict(expected.annotations)
    assert desc.urls == expected.urls


def test_write_blob_with_wrong_digest_fails_and_leaves_nothing(
    store: LocalContentStore, root: Path
) -> None:
    expected = Descriptor(MEDIA_TYPE_OCI_LAYER, sha256(b"right"), 5)
    with pytest.raises(FailedPreconditionError, match="unexpected commit digest"):
        store.write_blob(b"wrong", expected)
    assert blob_files(root) == []
    assert ingest_dirs(root) == []
    assert walked(store) == []
    with pytest.raises(FailedPreconditionError, match="unexpected commit digest"):
        store.write_blob(io.BytesIO(b"wrong"), expected)
    assert (blob_files(root), ingest_dirs(root)) == ([], [])


def test_write_blob_with_wrong_size_fails_and_leaves_nothing(
    store: LocalContentStore, root: Path
) -> None:
    expected = Descriptor(MEDIA_TYPE_OCI_LAYER, sha256(b"right"), 6)
    with pytest.raises(FailedPreconditionError, match="unexpected commit size 5"):
        store.write_blob(b"right", expected)
    assert (blob_files(root), ingest_dirs(root), walked(store)) == ([], [], [])


def test_write_blob_of_existing_content_merges_labels(store: LocalContentStore) -> None:
    first = store.write_blob(b"same", labels={"a": "1", "b": "2"})
    expected = Descriptor(MEDIA_TYPE_OCI_LAYER, first.digest, 4)
    again = store.write_blob(b"same", expected, labels={"b": "3", "c": "4"})
    assert again == expected
    assert dict(store.info(first.digest).labels) == {"a": "1", "b": "3", "c": "4"}
    # Without an expected descriptor the commit finds it: still success, still merged.
    third = store.write_blob(b"same", labels={"d": "5"})
    assert third == Descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, first.digest, 4)
    assert dict(store.info(first.digest).labels) == {"a": "1", "b": "3", "c": "4", "d": "5"}


def test_write_blob_resumes_a_crashed_stream_ingest(store: LocalContentStore) -> None:
    data, digest = create_content(5000)
    expected = Descriptor(MEDIA_TYPE_OCI_LAYER, digest, 5000)
    writer = store.writer(f"write-blob-{digest}", total=5000, expected=digest)
    writer.write(data[:2000])
    writer.close()  # a crash leaves the same ingest behind
    assert store.write_blob(io.BufferedReader(_ForwardOnly(data)), expected) == expected
    assert store.list_statuses() == []


def test_write_blob_of_bytes_rewrites_a_corrupt_leftover_ingest(store: LocalContentStore) -> None:
    data, digest = create_content(5000)
    expected = Descriptor(MEDIA_TYPE_OCI_LAYER, digest, 5000)
    writer = store.writer(f"write-blob-{digest}", total=5000, expected=digest)
    writer.write(b"\0" * 2000)  # garbage a crash might leave
    writer.close()
    assert store.write_blob(data, expected) == expected


def test_concurrent_write_blob_of_the_same_content_stores_it_once(
    store: LocalContentStore, root: Path
) -> None:
    data, digest = create_content(200_000)
    expected = Descriptor(MEDIA_TYPE_OCI_LAYER, digest, len(data))
    barrier = threading.Barrier(8, timeout=TIMEOUT)

    def write(i: int) -> Descriptor:
        barrier.wait()
        return store.write_blob(data, expected, labels={f"writer{i}": "yes"})

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(write, i) for i in range(8)]
        results = [f.result(timeout=TIMEOUT) for f in futures]
    assert results == [expected] * 8
    assert blob_files(root) == [digest]
    assert ingest_dirs(root) == []
    assert dict(store.info(digest).labels) == {f"writer{i}": "yes" for i in range(8)}


# --- ref locking ------------------------------------------------------------------------------


def test_concurrent_writers_on_one_ref_get_locked_error(store: LocalContentStore) -> None:
    barrier = threading.Barrier(2, timeout=TIMEOUT)
    release = threading.Event()

    def open_writer() -> str:
        barrier.wait()
        try:
            writer = store.writer("contended")
        except LockedError as exc:
            return f"locked: {exc}"
        try:
            release.wait(TIMEOUT)
        finally:
            writer.close()
        return "opened"

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(open_writer) for _ in range(2)]
        # The loser returns at once; the winner holds the writer until released.
        done, _ = wait(futures, timeout=TIMEOUT, return_when=FIRST_COMPLETED)
        assert len(done) == 1
        release.set()
        outcomes = sorted(f.result(timeout=TIMEOUT) for f in futures)
    assert outcomes[0].startswith("locked: ref 'contended' locked for writing (since ")
    assert outcomes[1] == "opened"
    assert next(iter(done)).result() == outcomes[0]
    # Closed: the ref is free again.
    store.writer("contended").close()


def test_two_store_objects_on_one_root_share_the_ref_locks(
    store: LocalContentStore, root: Path, env: MetaEnv
) -> None:
    other = LocalContentStore(root, env, clean=False)
    with store.writer("shared"), pytest.raises(LockedError):
        other.writer("shared")
    assert store.active_refs() == []


def test_writer_is_released_when_opening_fails(store: LocalContentStore) -> None:
    digest = store.write_blob(b"exists").digest
    with pytest.raises(AlreadyExistsError, match=digest):
        store.writer("r", expected=digest)
    writer = store.writer("r")  # the failed open released the ref
    writer.close()
    assert store.active_refs() == []


def test_conflicting_total_on_resume_is_refused(store: LocalContentStore) -> None:
    writer = store.writer("t", total=100)
    writer.write(b"x")
    writer.close()
    with pytest.raises(FailedPreconditionError, match="started with total 100, not 50"):
        store.writer("t", total=50)
    with store.writer("t", total=100) as writer:
        assert writer.offset == 1
    assert store.active_refs() == []


def test_commit_on_closed_writer_fails_precondition(store: LocalContentStore) -> None:
    writer = store.writer("closed")
    writer.close()
    writer.close()  # twice is fine
    with pytest.raises(FailedPreconditionError, match="closed writer for ref 'closed'"):
        writer.commit()
    with pytest.raises(FailedPreconditionError, match="closed writer"):
        writer.write(b"x")


def test_active_refs_lists_open_writers(store: LocalContentStore) -> None:
    with store.writer("b"), store.writer("a"):
        assert store.active_refs() == ["a", "b"]
    assert store.active_refs() == []


# --- ingests: status, list, abort -------------------------------------------------------------


def test_status_and_list_statuses_read_ingests_from_disk(store: LocalContentStore) -> None:
    with store.writer("one", total=10) as w1:
        w1.write(b"12345")
    with store.writer("two") as w2:
        w2.write(b"1")
    status = store.status("one")
    assert (status.ref, status.offset, status.total, status.expected) == ("one", 5, 10, "")
    assert [s.ref for s in store.list_statuses()] == ["one", "two"]
    assert [s.ref for s in store.list_statuses("ref==two")] == ["two"]
    assert [s.ref for s in store.list_statuses("ref~=^o", "ref==two")] == ["one", "two"]
    with pytest.raises(NotFoundError, match="'three'"):
        store.status("three")
    with pytest.raises(InvalidError, match="invalid filter"):
        store.list_statuses("ref==")


def test_abort_removes_the_ingest(store: LocalContentStore, root: Path) -> None:
    with store.writer("gone") as writer:
        writer.write(b"data")
    store.abort("gone")
    assert ingest_dirs(root) == []
    with pytest.raises(NotFoundError, match="'gone'"):
        store.abort("gone")
    with pytest.raises(NotFoundError):
        store.status("gone")


def test_abort_of_a_ref_with_an_open_writer_is_refused(store: LocalContentStore) -> None:
    with store.writer("busy") as writer:
        writer.write(b"x")
        with pytest.raises(LockedError, match="'busy'"):
            store.abort("busy")
    store.abort("busy")


def test_abort_in_a_transaction_runs_after_commit_only(
    store: LocalContentStore, env: MetaEnv, root: Path
) -> None:
    with store.writer("later") as writer:
        writer.write(b"x")

    with rolled_back(env) as txn:
        store.abort("later", txn=txn)
    assert store.status("later").offset == 1
    with env.write_txn() as txn:
        store.abort("later", txn=txn)
        assert store.status("later").offset == 1
    assert ingest_dirs(root) == []


def test_a_broken_ingest_is_restarted(store: LocalContentStore, root: Path) -> None:
    with store.writer("broken") as writer:
        writer.write(b"partial")
    ingest = root / "ingest" / hashlib.sha256(b"broken").hexdigest()
    (ingest / "startedat").write_text("garbage")
    with store.writer("broken") as writer:
        assert writer.offset == 0
        assert writer.digest() == EMPTY_DIGEST
    assert store.status("broken").offset == 0


def test_open_removes_interrupted_aborts_and_orphans(tmp_path: Path, env: MetaEnv) -> None:
    root = tmp_path / "content"
    store = LocalContentStore(root, env)
    digest = store.write_blob(b"kept").digest
    leftover = root / "ingest" / ("ab" * 32 + ".deadbeef.tmp")
    leftover.mkdir()
    (leftover / "data").write_bytes(b"x")
    orphan = root / "blobs" / "sha256" / ("0" * 64)
    orphan.write_bytes(b"orphan")
    junk = root / "blobs" / "sha256" / "not-a-digest"
    junk.write_bytes(b"junk")

    inspecting = LocalContentStore(root, env, clean=False)
    assert inspecting.orphans() == [orphan, junk]
    assert leftover.exists()

    LocalContentStore(root, env)
    assert not leftover.exists()
    assert not orphan.exists()
    assert not junk.exists()
    assert store.path(digest).read_bytes() == b"kept"


def test_missing_reports_metadata_without_a_file(store: LocalContentStore) -> None:
    digest = store.write_blob(b"lost").digest
    store.path(digest).unlink()
    assert store.missing() == [digest]
    with pytest.raises(NotFoundError, match="blob is missing"):
        store.reader_at(digest)


def test_remove_orphans_reports_what_it_removed(store: LocalContentStore) -> None:
    orphan = store.path(sha256(b"orphan"))
    orphan.write_bytes(b"orphan")
    assert store.remove_orphans() == [orphan]
    assert store.remove_orphans() == []


# --- disk full --------------------------------------------------------------------------------


def _enospc_once(monkeypatch: pytest.MonkeyPatch, after: int = 0) -> None:
    """Makes os.write fail with ENOSPC after ``after`` successful calls, once."""
    real_write = os.write
    calls = {"n": 0}

    def write(fd: int, data: bytes | memoryview) -> int:
        calls["n"] += 1
        if calls["n"] == after + 1:
            monkeypatch.setattr(os, "write", real_write)
            if after:  # a partial write before the failure
                real_write(fd, bytes(data[:3]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_disk_full_write_raises_store_full_and_leaves_the_ingest_resumable(
    store: LocalContentStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, digest = create_content(1000)
    writer = store.writer("full", total=1000)
    writer.write(data[:400])
    _enospc_once(monkeypatch)
    with pytest.raises(StoreFullError, match="'full'"):
        writer.write(data[400:700])
    assert writer.offset == 400
    assert writer.digest() == sha256(data[:400])
    assert store.status("full").offset == 400
    writer.write(data[400:])
    assert writer.commit(expected=digest).size == 1000


def test_disk_full_after_a_partial_write_cuts_the_file_back(
    store: LocalContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = store.writer("partial")
    writer.write(b"abc")
    real_write = os.write
    calls = {"n": 0}

    def short_then_full(fd: int, data: bytes | memoryview) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data[:2]))  # a short write
        monkeypatch.setattr(os, "write", real_write)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(StoreFullError):
        writer.write(b"defgh")
    assert store.status("partial").offset == 3
    writer.write(b"def")
    assert writer.commit(expected=sha256(b"abcdef")).size == 6


def test_disk_full_in_write_blob_aborts_cleanly(
    store: LocalContentStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, _ = create_content(3 * (1 << 20))
    _enospc_once(monkeypatch, after=1)
    with pytest.raises(StoreFullError, match="write-blob-"):
        store.write_blob(data)
    assert (blob_files(root), ingest_dirs(root), walked(store)) == ([], [], [])
    assert store.active_refs() == []


# --- read-only --------------------------------------------------------------------------------


def test_read_only_store_reads_but_refuses_writers(tmp_path: Path) -> None:
    env = MetaEnv(tmp_path / "meta")
    try:
        digest = LocalContentStore(tmp_path / "content", env).write_blob(b"ro").digest
    finally:
        env.close()
    ro = MetaEnv(tmp_path / "meta", readonly=True)
    try:
        store = LocalContentStore(tmp_path / "content", ro)
        assert store.info(digest).size == 2
        assert walked(store) == [digest]
        with pytest.raises(FailedPreconditionError, match="read-only"):
            store.writer("w")
    finally:
        ro.close()


def test_write_blob_in_a_transaction_does_not_wait_for_a_locked_ref(
    store: LocalContentStore, env: MetaEnv
) -> None:
    data, digest = create_content(100)
    expected = Descriptor(MEDIA_TYPE_OCI_LAYER, digest, 100)
    with store.writer(f"write-blob-{digest}", expected=digest):
        started = time.monotonic()
        with env.write_txn() as txn, pytest.raises(LockedError, match=digest):
            store.write_blob(data, expected, txn=txn, lock_timeout=TIMEOUT)
        assert time.monotonic() - started < TIMEOUT / 2
    assert store.write_blob(data, expected) == expected


def test_full_metadata_map_fails_the_commit_and_leaves_no_orphan(tmp_path: Path) -> None:
    env = MetaEnv(tmp_path / "small-meta", map_size=1 << 16, max_map_size=1 << 16)
    try:
        root = tmp_path / "content"
        store = LocalContentStore(root, env)
        labels = {f"k{i}": "v" * 4000 for i in range(40)}
        with pytest.raises(StoreFullError):
            store.write_blob(b"too many labels", labels=labels)
        assert (blob_files(root), ingest_dirs(root), walked(store)) == ([], [], [])
        assert store.orphans() == []
    finally:
        env.close()


def test_copy_treats_an_existing_blob_as_success(store: LocalContentStore) -> None:
    first = store.write_blob(b"copied", labels={"k": "v"})
    writer = store.writer("copy-again")
    info = store.copy(writer, io.BytesIO(b"copied"), 6)
    assert (info.digest, info.size, dict(info.labels)) == (first.digest, 6, {"k": "v"})
    assert store.list_statuses() == []
