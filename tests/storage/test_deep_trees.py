"""Trees deeper than recursion, PATH_MAX and one descriptor per level allow (issue 11).

A layer decides how deep its tree is. These tests build trees 10,000 directories deep (paths
of 20,000 bytes: no system call takes them whole) and push them through every walk refcache
has: extraction, usage, diff, native prepare, merges (hardlink farm and copy fallback),
removal, prune, and a leftover ``rm-*`` found at open, by ``repair`` and by ``check --fix``.
The descriptor limit is lowered to 256 while they run, so a walk holding a descriptor per
level fails at once.
"""

from __future__ import annotations

import errno
import io
import os
import resource
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from refcache.actors import open_cache
from refcache.actors._cli import main as cli_main
from refcache.storage import (
    Descriptor,
    LocalContentStore,
    MetaEnv,
    NativeSnapshotter,
    TarApplier,
    WalkingDiffer,
    check,
    digest_of,
    repair,
)
from refcache.storage._tree import remove_tree

pytestmark = pytest.mark.slow

DEPTH = 10_000
LEAF = b"at the bottom\n"
OCI = "application/vnd.oci.image.layer.v1.tar"
FD_LIMIT = 256


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path: Path) -> Iterator[None]:
    """Whatever a test leaves in ``tmp_path`` goes, iteratively: pytest's own clean-up of old
    temporary directories (``shutil.rmtree``) would die of ``RecursionError`` on it."""
    yield
    for entry in tmp_path.iterdir():
        remove_tree(entry)


@pytest.fixture(autouse=True)
def _few_descriptors() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(FD_LIMIT, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def make_deep(top: Path, depth: int = DEPTH, data: bytes = LEAF) -> None:
    """``top/d/d/.../d/leaf`` (``depth`` directories), built one descriptor at a time."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, data)
        os.close(leaf)
    finally:
        os.close(fd)


def deep_leaf(top: Path, depth: int = DEPTH) -> tuple[bytes, os.stat_result]:
    """Content and lstat of ``top/d/.../d/leaf``, read one descriptor at a time."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        leaf = os.open("leaf", os.O_RDONLY, dir_fd=fd)
        try:
            return os.read(leaf, 1 << 16), os.fstat(leaf)
        finally:
            os.close(leaf)
    finally:
        os.close(fd)


def deep_layer(depth: int = DEPTH) -> bytes:
    """A layer whose only entry is the leaf: its 10,000 parents are made implicitly."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("/".join(["d"] * depth + ["leaf"]))
        info.size = len(LEAF)
        info.mode = 0o644
        tf.addfile(info, io.BytesIO(LEAF))
    return raw.getvalue()


def test_a_10000_deep_layer_extracts_diffs_merges_copies_and_goes(
    tmp_path: Path, env: MetaEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = LocalContentStore(tmp_path / "content", env)
    sn = NativeSnapshotter(tmp_path, env)
    raw = deep_layer()
    desc = content.write_blob(
        raw,
        Descriptor(OCI, digest_of(raw), len(raw), {"containerd.io/uncompressed": digest_of(raw)}),
    )
    applier = TarApplier(content)

    # Extraction of a layer holding the tree.
    applied = applier.apply(desc, sn.prepare("extract", ""))
    assert applied.digest == digest_of(raw)
    sn.commit("layer", "extract")
    layer_dir = sn.path("layer")
    assert deep_leaf(layer_dir)[0] == LEAF
    # Disk usage: every directory, the leaf and the top.
    assert sn.usage("layer").inodes == DEPTH + 2

    # Diff against the empty tree, and the diff applied back.
    diff = WalkingDiffer(content).compare([], sn.view("view", "layer"), compression="gzip")
    back = applier.apply(diff, sn.prepare("back", ""))
    assert back.digest == diff.annotations["containerd.io/uncompressed"]
    assert deep_leaf(sn.path("back"))[0] == LEAF

    # Native prepare on top of it: a full copy.
    sn.prepare("child", "layer")
    child_leaf, child_st = deep_leaf(sn.path("child"))
    assert child_leaf == LEAF
    assert child_st.st_ino != deep_leaf(layer_dir)[1].st_ino

    # Merge: a hardlink farm...
    sn.merge("farm", [("", "layer")])
    assert deep_leaf(sn.path("farm"))[1].st_ino == deep_leaf(layer_dir)[1].st_ino
    # ...and the copy fallback (hardlinks refused, as across file systems).
    real_link = os.link

    def cross_device(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    sn.merge("copied", [("", "layer")])
    monkeypatch.setattr(os, "link", real_link)
    copied_leaf, copied_st = deep_leaf(sn.path("copied"))
    assert copied_leaf == LEAF
    assert copied_st.st_ino != deep_leaf(layer_dir)[1].st_ino

    # Removal of every snapshot (rm-<id>, then the purge).
    for key in ("copied", "farm", "child", "back", "view", "layer"):
        sn.remove(key)
    assert os.listdir(tmp_path / "snapshots") == []
    sn.close()
    assert check(tmp_path) == []


def _leave_deep_rm(root: Path) -> Path:
    doomed = root / "snapshots" / "rm-999"
    doomed.mkdir()
    make_deep(doomed)
    return doomed


def test_a_leftover_deep_rm_is_finished_at_open_by_repair_and_by_check_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "cache"
    open_cache(root, snapshotter="native").close()

    doomed = _leave_deep_rm(root)
    assert f"snapshots: directory {doomed} belongs to no snapshot" in check(root)
    open_cache(root, snapshotter="native").close()
    assert not doomed.exists()

    doomed = _leave_deep_rm(root)
    assert f"removed orphan snapshot directory {doomed}" in repair(root)
    assert not doomed.exists()

    doomed = _leave_deep_rm(root)
    assert cli_main(["--root", str(root), "check", "--fix"]) == 0
    assert f"fixed: snapshots: directory {doomed} belongs to no snapshot" in capsys.readouterr().out
    assert not doomed.exists()
    assert check(root) == []


def test_a_record_holding_a_deep_tree_is_measured_and_pruned(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    with open_cache(root, snapshotter="native", timeout=60) as cache:
        mutable = cache.manager.new(description="deep").get(timeout=60)
        with mutable.mount().local() as path:
            make_deep(path)
        ref = mutable.commit()
        ref.finalize()
        ref.release()
        rows = cache.manager.disk_usage().get(timeout=60)
        assert [r.size > DEPTH * 512 for r in rows] == [True]
        pruned = cache.manager.prune().get(timeout=60)
        assert len(pruned) == 1
        assert os.listdir(root / "snapshots") == []
        assert check(root) == []


def test_remove_tree_removes_any_depth_with_two_descriptors(tmp_path: Path) -> None:
    top = tmp_path / "top"
    top.mkdir()
    make_deep(top)
    # A read-only directory deep inside (as a layer may ship one) goes too.
    assert remove_tree(top) is True
    assert not top.exists()
    assert remove_tree(top) is False
