"""The descriptor-based tree primitives (``storage/_tree.py``) on real directories."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from refcache.storage import Mount
from refcache.storage._mount import mount_all, unmount
from refcache.storage._tree import DirCursor, PathNode, fsync_tree_dirs, remove_tree


@pytest.fixture
def abc(tmp_path: Path) -> Path:
    (tmp_path / "top" / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "top" / "z").mkdir()
    return tmp_path / "top"


def test_a_cursor_moves_by_nodes_through_the_common_ancestor(abc: Path) -> None:
    top = PathNode()
    a = top.child("a")
    c = a.child("b").child("c")
    assert a.child("b").child("c") is c  # interned: identity stands for the path
    with DirCursor.open(abc, top) as cursor:
        cursor.goto(c)
        assert (cursor.depth, cursor.names()) == (3, ["a", "b", "c"])
        assert cursor.stat().st_ino == (abc / "a" / "b" / "c").stat().st_ino
        cursor.goto(top.child("z"))
        assert cursor.names() == ["z"]
        cursor.top()
        assert cursor.depth == 0


def test_a_cursor_never_enters_a_symlink(abc: Path) -> None:
    (abc / "link").symlink_to(abc / "a")
    with DirCursor.open(abc) as cursor, pytest.raises(NotADirectoryError):
        cursor.down("link")


def test_a_directory_moved_away_is_found_again_from_the_top(abc: Path) -> None:
    with DirCursor.open(abc) as cursor:
        cursor.down("a")
        cursor.down("b")
        # b moves: its '..' is no longer a, so the cursor finds a again by name.
        os.rename(abc / "a" / "b", abc / "z" / "b")
        cursor.up()
        assert cursor.stat().st_ino == (abc / "a").stat().st_ino


def test_a_parent_gone_from_its_place_is_estale(abc: Path) -> None:
    with DirCursor.open(abc) as cursor:
        cursor.down("a")
        cursor.down("b")
        cursor.down("c")
        os.rename(abc / "a" / "b" / "c", abc / "z" / "c")
        os.rename(abc / "a" / "b", abc / "b-moved")
        with pytest.raises(OSError, match="moved") as caught:
            cursor.up()
        assert caught.value.errno == errno.ESTALE


def test_remove_tree_empties_directories_its_owner_may_not_write(tmp_path: Path) -> None:
    top = tmp_path / "top"
    (top / "ro" / "sealed").mkdir(parents=True)
    (top / "ro" / "sealed" / "f").write_bytes(b"x")
    os.chmod(top / "ro" / "sealed", 0o500)
    os.chmod(top / "ro", 0o000)
    assert remove_tree(top)
    assert not top.exists()


@pytest.fixture
def tmpfs_inside(tmp_path: Path) -> Iterator[Path]:
    top = tmp_path / "top"
    (top / "mnt").mkdir(parents=True)
    try:
        mount_all([Mount("tmpfs", "tmpfs", ("size=1m",))], top / "mnt")
    except Exception as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    (top / "mnt" / "precious").write_bytes(b"keep")
    try:
        yield top
    finally:
        unmount(top / "mnt", lazy=True)


def test_remove_tree_never_reaches_through_a_mount(tmpfs_inside: Path) -> None:
    with pytest.raises(OSError, match="mount point") as caught:
        remove_tree(tmpfs_inside)
    assert caught.value.errno == errno.EBUSY
    assert (tmpfs_inside / "mnt" / "precious").read_bytes() == b"keep"


def test_fsync_tree_dirs_visits_every_directory(abc: Path) -> None:
    fsync_tree_dirs(abc)  # no error on a small tree; the deep tests cover depth
    assert (abc / "a" / "b" / "c").is_dir()
