"""storage.check / storage.repair against real stores under tmp_path."""

from __future__ import annotations

import fcntl
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from refcache.actors import DescHandler, open_cache
from refcache.storage import (
    DB_LEASE_RESOURCES,
    KEY_COMMITTED,
    KEY_PARENT,
    Descriptor,
    LocalContentStore,
    MetadataStore,
    MetaEnv,
    NativeSnapshotter,
    RefcacheError,
    check,
    digest_of,
    repair,
)
from refcache.storage._leases import Resource, resource_key

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache_root(tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    env = MetaEnv(root / "meta")
    sn = NativeSnapshotter(root, env)
    LocalContentStore(root / "content", env)
    sn.prepare("active-one")
    sn.close()
    store = MetadataStore(env)
    store.get("active-one").set("cache.createdAt", 1)
    env.close()
    return root


def test_a_healthy_cache_has_no_problems(cache_root: Path) -> None:
    assert check(cache_root) == []


def test_a_directory_that_is_not_a_cache_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RefcacheError, match="no refcache metadata"):
        check(tmp_path)


def test_orphans_missing_objects_and_broken_records_are_each_reported(cache_root: Path) -> None:
    (cache_root / "snapshots" / "stray").mkdir()
    blobs = cache_root / "content" / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / ("ab" * 32)).write_bytes(b"orphan")
    env = MetaEnv(cache_root / "meta")
    store = MetadataStore(env)
    item = store.get("child")
    item.queue_many({KEY_PARENT: "nobody", KEY_COMMITTED: True})
    item.commit()
    store.put_raw("garbled", b"\xc1")
    with env.write_txn() as txn:
        txn.put(DB_LEASE_RESOURCES, resource_key("gone", Resource("x", "snapshots/native")), b"")
    env.close()

    problems = check(cache_root)
    text = "\n".join(problems)
    assert "stray belongs to no snapshot" in text
    assert f"{blobs / ('ab' * 32)} has no metadata" in text
    assert "record child: parent nobody does not exist" in text
    assert "record garbled: corrupt metadata" in text
    assert "resource snapshots/native/x of missing lease gone" in text


def test_repair_removes_orphans_and_dangling_links_but_no_records(cache_root: Path) -> None:
    (cache_root / "snapshots" / "new-leftover").mkdir()
    with MetaEnv(cache_root / "meta") as env, env.write_txn() as txn:
        txn.put(DB_LEASE_RESOURCES, resource_key("gone", Resource("x", "snapshots/native")), b"")
    done = repair(cache_root)
    assert any("new-leftover" in line for line in done)
    assert any("missing lease gone" in line for line in done)
    assert check(cache_root) == []
    assert not (cache_root / "snapshots" / "new-leftover").exists()


def test_work_in_progress_of_a_live_cache_is_not_an_orphan(cache_root: Path) -> None:

    (cache_root / "snapshots" / "new-building").mkdir()
    fd = os.open(cache_root / "lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from refcache.storage import check; print(check(sys.argv[1]))",
                str(cache_root),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            env=dict(os.environ),
        )
        assert out.stdout.strip() == "[]"
    finally:
        os.close(fd)
    assert any("new-building" in p for p in check(cache_root))


def test_repair_refuses_a_cache_open_elsewhere(cache_root: Path) -> None:

    fd = os.open(cache_root / "lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code = (
            "import sys\nfrom refcache.storage import repair, LockedError\n"
            "try:\n    repair(sys.argv[1])\nexcept LockedError as e:\n    print('locked', e)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(cache_root)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            env=dict(os.environ),
        )
        assert out.stdout.startswith("locked cache ")
    finally:
        os.close(fd)


# -- a live cache: no false alarms for work in flight ----------------------------------------

_CHECK_LOOP = """
import json, sys
from pathlib import Path
from refcache.storage import check

root, stop = Path(sys.argv[1]), Path(sys.argv[2])
print("ready", flush=True)
runs = 0
while not stop.exists() and runs < 100000:
    problems = check(root)
    runs += 1
    if problems:
        print(json.dumps(problems), flush=True)
print(json.dumps({"runs": runs}), flush=True)
"""


def _layer_blob(i: int) -> tuple[bytes, Descriptor]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        data = f"layer {i}\n".encode()
        info = tarfile.TarInfo(f"d{i}/f")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    tar = raw.getvalue()
    blob = gzip.compress(tar, mtime=0)
    desc = Descriptor(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        digest_of(blob),
        len(blob),
        {"containerd.io/uncompressed": digest_of(tar)},
    )
    return blob, desc


def test_check_of_a_live_cache_reports_nothing_for_work_in_flight(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    stop = tmp_path / "stop"
    cache = open_cache(root, snapshotter="native", timeout=60)
    checker = subprocess.Popen(
        [sys.executable, "-c", _CHECK_LOOP, str(root), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert checker.stdout is not None
        assert checker.stdout.readline().strip() == "ready"
        manager = cache.manager
        kept = []
        for i in range(60):
            mutable = manager.new(description=f"w{i}").get(timeout=60)
            with mutable.mount().local() as path:
                (path / "f").write_text(str(i))
            ref = mutable.commit()
            ref.finalize()
            if i % 4 == 0:
                kept.append(ref)
            else:
                ref.release()
            blob, desc = _layer_blob(i)
            handlers = {desc.digest: DescHandler(lambda _d, b=blob: io.BytesIO(b))}
            lazy = manager.get_by_blob(desc, desc_handlers=handlers, extract=True).get(timeout=60)
            lazy.release()
            if i % 3 == 2:
                manager.prune().get(timeout=60)
            if len(kept) > 3:
                kept.pop(0).release()
        for ref in kept:
            ref.release()
        manager.prune().get(timeout=60)
    finally:
        stop.touch()
        out, err = checker.communicate(timeout=120)
        cache.close()
    lines = [json.loads(line) for line in out.strip().splitlines()]
    summary = lines.pop()
    assert lines == [], f"check reported problems on a live cache: {lines[:3]}\n{err[-1000:]}"
    assert summary["runs"] >= 3  # it really ran during the writes
    assert check(root) == []


def test_a_removal_that_never_committed_is_restored_at_open(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    env = MetaEnv(root / "meta")
    sn = NativeSnapshotter(root, env)
    sn.prepare("active")
    (sn.path("active") / "data").write_text("keep me")
    sn.commit("layer", "active")
    sid = sn.path("layer").name
    sn.close()
    env.close()
    # A process killed between renaming the directory (inside the removing transaction)
    # and the commit: the snapshot is still recorded, its directory is rm-<id>.
    os.rename(root / "snapshots" / sid, root / "snapshots" / f"rm-{sid}")
    assert any("the next open restores it" in p for p in check(root))
    env = MetaEnv(root / "meta")
    sn = NativeSnapshotter(root, env)
    assert (sn.path("layer") / "data").read_text() == "keep me"
    sn.close()
    env.close()
    assert check(root) == []
