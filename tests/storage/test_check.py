"""storage.check / storage.repair against real stores under tmp_path."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest
from refcache.storage import (
    DB_LEASE_RESOURCES,
    KEY_COMMITTED,
    KEY_PARENT,
    LocalContentStore,
    MetadataStore,
    MetaEnv,
    NativeSnapshotter,
    RefcacheError,
    check,
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
