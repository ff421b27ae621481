"""Mount helpers: BuildKit's read-only rewriting, LocalMounter, and the overlay probe."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

import pytest
from refcache.actors import open_cache
from refcache.storage import check, repair
from refcache.storage._errors import InvalidError, RefcacheError
from refcache.storage._mount import (
    is_overlay_mount,
    local_mount,
    mount_all,
    probe_overlay,
    readonly_mounts,
    unmount,
)
from refcache.storage._types import Mount


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


@pytest.fixture
def layers(tmp_path: Path) -> Path:
    """Two lower dirs, an upper and a work dir; skips when overlayfs cannot be mounted."""
    reason = probe_overlay(tmp_path)
    if reason is not None:
        pytest.skip(f"overlayfs cannot be mounted here: {reason}")
    for name in ("l1", "l2", "u", "w"):
        (tmp_path / name).mkdir()
    (tmp_path / "l1" / "a").write_bytes(b"a1")
    (tmp_path / "l1" / "b").write_bytes(b"b1")
    (tmp_path / "l2" / "b").write_bytes(b"b2")
    return tmp_path


def _overlay(root: Path) -> Mount:
    return Mount(
        "overlay",
        "overlay",
        (f"workdir={root}/w", f"upperdir={root}/u", f"lowerdir={root}/l2:{root}/l1"),
    )


# -- readonly_mounts (refs.go setReadonly / readonlyOverlay) ---------------------------------


def test_readonly_bind_replaces_rw_with_ro() -> None:
    assert readonly_mounts([Mount("bind", "/x", ("rbind", "rw"))]) == [
        Mount("bind", "/x", ("rbind", "ro"))
    ]


def test_readonly_bind_adds_ro_once() -> None:
    assert readonly_mounts([Mount("bind", "/x", ("rbind",))]) == [
        Mount("bind", "/x", ("rbind", "ro"))
    ]
    assert readonly_mounts([Mount("bind", "/x", ("ro", "rbind"))]) == [
        Mount("bind", "/x", ("ro", "rbind"))
    ]


def test_readonly_overlay_moves_upper_first_and_drops_workdir() -> None:
    mount = Mount(
        "overlay", "overlay", ("workdir=/w", "upperdir=/u", "lowerdir=/l2:/l1", "index=off")
    )
    assert readonly_mounts([mount]) == [
        Mount("overlay", "overlay", ("lowerdir=/u:/l2:/l1", "index=off"))
    ]


def test_readonly_fuse_overlayfs_counts_as_overlay() -> None:
    mount = Mount("fuse3.fuse-overlayfs", "overlay", ("upperdir=/u", "lowerdir=/l"))
    assert is_overlay_mount(mount)
    assert readonly_mounts([mount])[0].options == ("lowerdir=/u:/l",)


def test_readonly_mounts_rejects_non_mounts() -> None:
    with pytest.raises(InvalidError):
        readonly_mounts(["bind"])  # type: ignore[list-item]
    with pytest.raises(InvalidError):
        readonly_mounts(Mount("bind", "/x"))  # type: ignore[arg-type]


# -- local_mount ----------------------------------------------------------------------------


def test_local_mount_of_a_bind_yields_its_source_without_mounting(tmp_path: Path) -> None:
    with local_mount([Mount("bind", str(tmp_path), ("rbind", "ro"))]) as root:
        assert root == tmp_path
        assert not _mounted(root)


def test_local_mount_needs_mounts(tmp_path: Path) -> None:
    with pytest.raises(InvalidError, match="at least one"), local_mount([]):
        pass


def test_local_mount_of_an_overlay_mounts_and_unmounts(layers: Path) -> None:
    with local_mount([_overlay(layers)]) as root:
        assert _mounted(root)
        assert sorted(os.listdir(root)) == ["a", "b"]
        assert (root / "b").read_bytes() == b"b2"
        (root / "c").write_bytes(b"c")
    assert not root.exists()
    assert (layers / "u" / "c").read_bytes() == b"c"


def test_local_mount_readonly_overlay_refuses_writes(layers: Path) -> None:
    (layers / "u" / "up").write_bytes(b"up")
    with local_mount([_overlay(layers)], readonly=True) as root:
        assert sorted(os.listdir(root)) == ["a", "b", "up"]
        with pytest.raises(OSError) as excinfo:
            (root / "new").write_bytes(b"x")
        assert excinfo.value.errno == errno.EROFS
    assert not root.exists()


def test_local_mount_unmounts_lazily_when_the_body_raises(layers: Path) -> None:
    opened: list[tuple[Path, BinaryIO]] = []

    def failing() -> None:
        with local_mount([_overlay(layers)]) as root:
            opened.append((root, open(root / "a", "rb")))  # noqa: SIM115 - outlives the mount
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing()
    root, handle = opened[0]
    try:
        assert not _mounted(root)
        assert handle.read() == b"a1"  # a lazy unmount leaves open files usable
    finally:
        handle.close()


def test_single_lower_read_only_overlay_is_mounted_as_a_bind(layers: Path) -> None:
    with local_mount([Mount("overlay", "overlay", (f"lowerdir={layers}/l1",))]) as root:
        assert sorted(os.listdir(root)) == ["a", "b"]
        with pytest.raises(OSError) as excinfo:
            (root / "x").write_bytes(b"x")
        assert excinfo.value.errno == errno.EROFS


def test_long_lowerdir_lists_are_mounted_with_relative_paths(layers: Path) -> None:
    base = layers / ("deep" * 10)
    lowers = []
    for i in range(60):
        d = base / f"layer-{i:03d}-{'x' * 40}"
        d.mkdir(parents=True)
        (d / f"f{i}").write_bytes(str(i).encode())
        lowers.append(str(d))
    option = "lowerdir=" + ":".join(lowers)
    assert len(option) > 4096
    with local_mount([Mount("overlay", "overlay", (option,))]) as root:
        assert len(os.listdir(root)) == 60
        assert (root / "f59").read_bytes() == b"59"


def test_mount_targets_may_not_escape(tmp_path: Path) -> None:
    with pytest.raises(InvalidError, match="escapes"):
        mount_all([Mount("bind", str(tmp_path), ("rbind",), "../x")], tmp_path / "root")


def test_unmount_of_a_non_mount_point_fails(tmp_path: Path) -> None:
    with pytest.raises(RefcacheError, match=str(tmp_path)):
        unmount(tmp_path)


# -- probe ----------------------------------------------------------------------------------


def test_probe_overlay_answers_and_leaves_nothing_behind(tmp_path: Path) -> None:
    root = tmp_path / "probe-root"
    reason = probe_overlay(root)
    assert reason is None or (isinstance(reason, str) and reason)
    # The probe mounts under <root>/mounts (where a leftover is found at the next open).
    assert os.listdir(root) == ["mounts"]
    assert os.listdir(root / "mounts") == []


def test_probe_overlay_reports_an_unusable_root(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    reason = probe_overlay(blocker / "sub")
    assert reason is not None
    assert str(blocker) in reason


# -- mounts of a cache live under its root, and a dead process's mounts are found -----------

_HOLD_A_MOUNT = """
import sys, threading
from refcache import open_cache

cache = open_cache(sys.argv[1], snapshotter="overlay", timeout=30)
base = cache.manager.new().get(timeout=30)
with base.mount().local() as path:
    (path / "hello").write_text("hi")
layer = base.commit()
layer.finalize()
child = cache.manager.new(layer).get(timeout=30)
with child.mount().local() as path:  # an overlay (the child has a parent): really mounted
    print(path, flush=True)
    threading.Event().wait()  # until killed
"""


@pytest.fixture
def overlay_root(tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    reason = probe_overlay(root)
    if reason is not None:
        pytest.skip(f"overlayfs cannot be mounted here: {reason}")
    return root


def _leave_a_mount(root: Path) -> Path:
    """Runs a process that mounts an overlay of the cache at ``root`` and SIGKILLs it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_A_MOUNT, str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # the child prints once mounted (or dies)
        assert line, proc.stderr.read() if proc.stderr else ""
        point = Path(line)
        assert point.parent == root / "mounts"  # under the root, not /tmp
        assert _mounted(point)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert _mounted(point)  # SIGKILL runs no clean-up
    return point


def test_a_mount_left_by_a_killed_process_is_reported_and_removed_at_open(
    overlay_root: Path,
) -> None:
    point = _leave_a_mount(overlay_root)
    problem = f"mounts: {point} is still mounted (left by a process that died)"
    assert problem in check(overlay_root)
    with open_cache(overlay_root, snapshotter="overlay", timeout=30) as cache:
        assert not _mounted(point)
        assert os.listdir(overlay_root / "mounts") == []
        assert check(cache.root) == []
    assert check(overlay_root) == []

    point = _leave_a_mount(overlay_root)
    assert f"mounts: {point} is still mounted (left by a process that died)" in check(overlay_root)
    assert f"unmounted stale mount {point}" in repair(overlay_root)
    assert not _mounted(point)
    assert check(overlay_root) == []


def test_mounts_of_a_cache_are_made_in_its_private_mounts_dir(overlay_root: Path) -> None:
    with open_cache(overlay_root, snapshotter="overlay", timeout=30) as cache:
        base = cache.manager.new().get(timeout=30)
        layer = base.commit()
        layer.finalize()
        child = cache.manager.new(layer).get(timeout=30)
        mountable = child.mount()
        assert mountable.mount_root == overlay_root / "mounts"
        with mountable.local() as path:
            assert path.parent == overlay_root / "mounts"
            assert _mounted(path)
            mode = (overlay_root / "mounts").stat().st_mode
            assert stat.S_IMODE(mode) == 0o700
        assert not path.exists()
        child.release()
        layer.release()
