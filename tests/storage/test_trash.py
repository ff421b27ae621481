"""The trash: removed trees leave ``snapshots/`` at once and are deleted in the background.

Real directories, LMDB environments and caches in ``tmp_path``. The worker is held back
(where a test must see a tree still waiting) by wrapping ``remove_tree`` with an event; every
wait has a timeout, nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from refcache.actors import PrunePolicy, open_cache
from refcache.actors._cli import main as cli_main
from refcache.storage import MetaEnv, NativeSnapshotter, Trash, check, repair, trash_usage
from refcache.storage import _trash as trash_module
from refcache.storage._fscopy import disk_usage
from refcache.storage._tree import remove_tree

WAIT = 60.0  # seconds any wait of these tests may take before it fails


class Gate:
    """Holds the trash's worker at the start of each entry until :meth:`open` (or stop)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.go = threading.Event()
        self.entries: list[str] = []
        real = trash_module.remove_tree

        def gated(path: Any, *, stop: threading.Event | None = None, **kw: Any) -> bool:
            self.entries.append(os.path.basename(path))
            self.started.set()
            # Released by the test, or by a close (which sets stop).
            while not self.go.wait(0.05):
                if stop is not None and stop.is_set():
                    break
            return real(path, stop=stop, **kw)

        monkeypatch.setattr(trash_module, "remove_tree", gated)

    def open(self) -> None:
        self.go.set()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    return Gate(monkeypatch)


def make_tree(top: Path, depth: int = 3, files: int = 2, data: bytes = b"x" * 100) -> int:
    """``top/d/d/...`` with ``files`` files per level; returns the bytes written."""
    top.mkdir(parents=True, exist_ok=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    written = 0
    try:
        for level in range(depth + 1):
            for i in range(files):
                f = os.open(f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
                os.write(f, data + str(level).encode())
                os.close(f)
                written += len(data) + len(str(level))
            if level < depth:
                os.mkdir("d", dir_fd=fd)
                nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = nxt
    finally:
        os.close(fd)
    return written


@pytest.fixture
def sn(tmp_path: Path) -> Iterator[NativeSnapshotter]:
    env = MetaEnv(tmp_path / "meta")
    snapshotter = NativeSnapshotter(tmp_path, env)
    try:
        yield snapshotter
    finally:
        snapshotter.close()
        env.close()


def test_a_removed_snapshot_leaves_snapshots_at_once_and_the_worker_deletes_it(
    sn: NativeSnapshotter, gate: Gate
) -> None:
    sn.prepare("a")
    make_tree(sn.path("a"))
    sid = sn.path("a").name
    sn.remove("a")
    # Gone from snapshots/ when remove returns, waiting in the trash for the worker.
    assert os.listdir(sn.root / "snapshots") == []
    assert gate.started.wait(WAIT)
    assert (sn.root / "trash" / sid / "d" / "f0").is_file()
    assert oct(os.stat(sn.root / "trash").st_mode & 0o777) == "0o700"
    gate.open()
    assert sn.trash.wait_idle(WAIT)
    assert os.listdir(sn.root / "trash") == []
    assert gate.entries == [sid]
    assert sn.trash.deleted == 1


def test_a_pruned_record_is_gone_from_snapshots_in_the_answer_and_deleted_later(
    tmp_path: Path, gate: Gate
) -> None:
    root = tmp_path / "cache"
    with open_cache(root, snapshotter="native", timeout=WAIT) as cache:
        mutable = cache.manager.new(description="doomed", retain=True).get(timeout=WAIT)
        with mutable.mount().local() as path:
            make_tree(Path(path), depth=5)
        ref = mutable.commit()
        ref.release()
        before = set(os.listdir(root / "snapshots"))
        assert len(before) == 1
        deleted = cache.manager.prune(PrunePolicy(all=True)).get(timeout=WAIT)
        assert [d.description for d in deleted] == ["doomed"]
        # In the answer: nothing left in snapshots/; the tree waits in the trash.
        assert os.listdir(root / "snapshots") == []
        assert sorted(os.listdir(root / "trash")) == sorted(before)
        assert check(root) == []
        gate.open()
        assert cache.snapshotter.trash.wait_idle(WAIT)  # type: ignore[attr-defined]
        assert os.listdir(root / "trash") == []
    assert check(root) == []


def test_leftover_trash_is_deleted_after_reopening_and_open_does_not_wait(
    tmp_path: Path, gate: Gate
) -> None:
    root = tmp_path / "cache"
    open_cache(root, snapshotter="native").close()
    # A process that died with work in the trash: a removed snapshot's tree and a
    # thrown-away leftover.
    make_tree(root / "trash" / "17", depth=4)
    make_tree(root / "trash" / "x-new-0123abcd.feed", depth=2)
    with open_cache(root, snapshotter="native", timeout=WAIT) as cache:
        # Open returned while the worker is still held: it did not wait for the deletion.
        assert gate.started.wait(WAIT)
        assert len(os.listdir(root / "trash")) == 2
        gate.open()
        assert cache.snapshotter.trash.wait_idle(WAIT)  # type: ignore[attr-defined]
        assert os.listdir(root / "trash") == []
    assert sorted(gate.entries) == ["17", "x-new-0123abcd.feed"]


def test_a_tree_deeper_than_recursion_is_deleted_from_the_trash(tmp_path: Path) -> None:
    trash = Trash(tmp_path)
    make_tree(tmp_path / "trash" / "deep", depth=2_000, files=1, data=b"")
    try:
        trash.resume()
        assert trash.wait_idle(WAIT)
        assert os.listdir(tmp_path / "trash") == []
        assert trash.deleted == 1
    finally:
        trash.close()


def test_check_reports_the_trash_as_pending_deletion_not_as_a_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "cache"
    open_cache(root, snapshotter="native").close()
    written = make_tree(root / "trash" / "x-leftover.0001", depth=3)
    assert check(root) == []
    assert trash_usage(root).entries == 1
    measured = disk_usage(root / "trash" / "x-leftover.0001").size
    assert trash_usage(root).bytes == measured >= written
    assert cli_main(["--root", str(root), "check"]) == 0
    out = capsys.readouterr().out
    assert "1 removed tree(s)" in out
    assert "cache is consistent" in out
    assert cli_main(["--root", str(root), "check", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["consistent"] is True
    assert doc["trash"] == {"entries": 1, "bytes": measured}
    # repair (check --fix) is offline: it empties the trash (no problem, nothing to report).
    assert repair(root) == []
    assert trash_usage(root).entries == 0


def test_the_trash_entry_of_a_snapshot_still_recorded_is_restored_at_open(
    tmp_path: Path,
) -> None:
    env = MetaEnv(tmp_path / "meta")
    sn = NativeSnapshotter(tmp_path, env)
    sn.prepare("active")
    (sn.path("active") / "data").write_text("keep me")
    sn.commit("layer", "active")
    sid = sn.path("layer").name
    sn.close()
    env.close()
    # Killed between the rename into the trash (inside the removing transaction) and the
    # commit: the snapshot is still recorded, its directory is trash/<id>.
    os.rename(tmp_path / "snapshots" / sid, tmp_path / "trash" / sid)
    problems = check(tmp_path)
    assert problems == [
        f"snapshots: directory {tmp_path / 'trash' / sid} of snapshot layer was being "
        "removed when a process died; the next open restores it"
    ]
    env = MetaEnv(tmp_path / "meta")
    sn = NativeSnapshotter(tmp_path, env)
    try:
        assert (sn.path("layer") / "data").read_text() == "keep me"
        assert sn.trash.wait_idle(WAIT)
        assert os.listdir(tmp_path / "trash") == []
    finally:
        sn.close()
        env.close()
    assert check(tmp_path) == []


def test_a_rolled_back_removal_takes_its_directory_back_from_the_trash(
    sn: NativeSnapshotter,
) -> None:
    sn.prepare("a")
    (sn.path("a") / "f").write_text("kept")
    env = MetaEnv.lookup(sn.root / "meta")
    assert env is not None
    with pytest.raises(RuntimeError, match="boom"), env.write_txn() as txn:
        sn.remove("a", txn=txn)
        assert not sn.path("a").exists()
        raise RuntimeError("boom")
    assert (sn.path("a") / "f").read_text() == "kept"
    assert os.listdir(sn.root / "trash") == []
    assert sn.trash.pending() == 0


def test_closing_while_the_worker_is_busy_stops_it_and_the_next_open_finishes(
    tmp_path: Path, gate: Gate
) -> None:
    root = tmp_path / "cache"
    cache = open_cache(root, snapshotter="native", timeout=WAIT)
    try:
        make_tree(root / "trash" / "x-big.0001", depth=300)
        make_tree(root / "trash" / "x-next.0002", depth=3)
        cache.snapshotter.trash.resume()  # type: ignore[attr-defined]
        assert gate.started.wait(WAIT)  # busy with the first entry
    finally:
        closing = threading.Thread(target=cache.close)
        closing.start()
        closing.join(WAIT)
    assert not closing.is_alive(), "close hung on the trash's worker"
    # Stopped before deleting anything: both entries wait for the next open.
    assert sorted(os.listdir(root / "trash")) == ["x-big.0001", "x-next.0002"]
    gate.open()
    with open_cache(root, snapshotter="native", timeout=WAIT) as cache:
        assert cache.snapshotter.trash.wait_idle(WAIT)  # type: ignore[attr-defined]
    assert os.listdir(root / "trash") == []
    assert check(root) == []


def test_remove_tree_stops_when_asked_and_leaves_the_rest(tmp_path: Path) -> None:
    make_tree(tmp_path / "t", depth=20)
    stop = threading.Event()
    stop.set()
    with pytest.raises(InterruptedError):
        remove_tree(tmp_path / "t", stop=stop)
    assert (tmp_path / "t" / "d").is_dir()
    assert remove_tree(tmp_path / "t")
    assert not (tmp_path / "t").exists()
