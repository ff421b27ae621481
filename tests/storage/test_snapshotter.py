"""The snapshotters: containerd's snapshot testsuite for both backends, plus refcache's own.

Every ``check*`` function of containerd's ``core/snapshots/testsuite`` is ported below (same
appliers, same expectations) and run against the native and the overlay snapshotter through
the parametrized ``sn`` fixture. The overlay runs skip, with the probe's reason, where an
overlay cannot be mounted. Trees are compared the way continuity's ``CheckDirectoryEqual``
does: type, permission bits, owner, content / link target / device number of every path
(directory times are not compared).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import pytest
from refcache.storage import write_diff
from refcache.storage._env import DB_SNAPSHOTS, MetaEnv
from refcache.storage._errors import (
    AlreadyExistsError,
    CorruptMetadataError,
    FailedPreconditionError,
    InvalidError,
    NotFoundError,
    RefcacheError,
)
from refcache.storage._fscopy import disk_usage
from refcache.storage._mount import local_mount, mount_all, probe_overlay, unmount
from refcache.storage._native import NativeSnapshotter
from refcache.storage._overlay import OverlaySnapshotter, make_snapshotter
from refcache.storage._snapshotter import BaseSnapshotter, Snapshotter
from refcache.storage._types import Kind, Mount, SnapshotInfo, Usage

GC_ROOT = {"containerd.io/gc.root": "2026-01-01T00:00:00Z"}
IS_ROOT = os.geteuid() == 0

Applier = Callable[[Path], None]


# -- fixtures -------------------------------------------------------------------------------


def _open(name: str, root: Path, env: MetaEnv) -> BaseSnapshotter:
    if name == "overlayfs":
        reason = probe_overlay(root)
        if reason is not None:
            pytest.skip(f"overlayfs cannot be mounted here: {reason}")
        return OverlaySnapshotter(root, env)
    return NativeSnapshotter(root, env)


@pytest.fixture(params=["native", "overlayfs"])
def sn(request: pytest.FixtureRequest, tmp_path: Path, env: MetaEnv) -> Iterator[BaseSnapshotter]:
    snapshotter = _open(request.param, tmp_path / "snapshots", env)
    try:
        yield snapshotter
    finally:
        snapshotter.close()


@pytest.fixture
def native(tmp_path: Path, env: MetaEnv) -> Iterator[NativeSnapshotter]:
    snapshotter = NativeSnapshotter(tmp_path / "snapshots", env)
    try:
        yield snapshotter
    finally:
        snapshotter.close()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


def _can_bind_mount(tmp: Path) -> str | None:
    src, dst = tmp / "bind-probe-src", tmp / "bind-probe-dst"
    src.mkdir()
    dst.mkdir()
    try:
        mount_all([Mount("bind", str(src), ("rbind", "ro"))], dst)
    except RefcacheError as exc:
        return str(exc)
    else:
        unmount(dst)
    finally:
        src.rmdir()
        dst.rmdir()
    return None


# -- fstest ---------------------------------------------------------------------------------


def create_file(path: str, content: bytes, mode: int) -> Applier:
    def apply(root: Path) -> None:
        target = root / path.lstrip("/")
        target.write_bytes(content)
        os.chmod(target, mode)

    return apply


def create_dir(path: str, mode: int) -> Applier:
    def apply(root: Path) -> None:
        target = root / path.lstrip("/")
        target.mkdir()
        os.chmod(target, mode)

    return apply


def remove_all(path: str) -> Applier:
    def apply(root: Path) -> None:
        target = root / path.lstrip("/")
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif os.path.lexists(target):
            target.unlink()

    return apply


def chown(path: str, uid: int, gid: int) -> Applier:
    def apply(root: Path) -> None:
        os.lchown(root / path.lstrip("/"), uid, gid)

    return apply


def rename(old: str, new: str) -> Applier:
    def apply(root: Path) -> None:
        # shutil.move falls back to copy + delete on EXDEV, which overlayfs returns for a
        # directory from a lower layer when redirect_dir is off.
        shutil.move(root / old.lstrip("/"), root / new.lstrip("/"))

    return apply


def link(old: str, new: str) -> Applier:
    def apply(root: Path) -> None:
        os.link(root / old.lstrip("/"), root / new.lstrip("/"))

    return apply


def apply_all(*appliers: Applier) -> Applier:
    def apply(root: Path) -> None:
        for a in appliers:
            a(root)

    return apply


def manifest(root: Path) -> dict[str, tuple[object, ...]]:
    """What continuity's CheckDirectoryEqual compares (the root itself excluded)."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, root)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                extra: object = Path(full).read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(full)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = st.st_rdev
            else:
                extra = None
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, extra)
    return out


def assert_same_tree(expected: Path, actual: Path) -> None:
    assert manifest(actual) == manifest(expected)


def fs_usage(root: Path, exclude: set[tuple[int, int]] | None = None) -> Usage:
    """Expected usage from the filesystem itself: unique inodes, st_blocks * 512."""
    seen: set[tuple[int, int]] = set()
    size = inodes = 0
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths.extend(Path(dirpath, n) for n in dirnames + filenames)
    for p in paths:
        st = os.lstat(p)
        ino = (st.st_dev, st.st_ino)
        if ino in seen:
            continue
        seen.add(ino)
        if exclude and ino in exclude:
            continue
        size += st.st_blocks * 512
        inodes += 1
    return Usage(size=size, inodes=inodes)


# -- containerd testsuite helpers (helpers.go) ------------------------------------------------


def create_snapshot(sn: Snapshotter, parent: str, name: str, applier: Applier) -> str:
    prepare = f"{name}-prepare"
    mounts = sn.prepare(prepare, parent, labels=GC_ROOT)
    with local_mount(mounts) as root:
        applier(root)
    sn.commit(name, prepare, labels=GC_ROOT)
    return name


def check_snapshot(sn: Snapshotter, name: str, expected: Path) -> None:
    view = f"{name}-view"
    mounts = sn.view(view, name, labels=GC_ROOT)
    try:
        with local_mount(mounts) as root:
            assert_same_tree(expected, root)
    finally:
        sn.remove(view)


def check_snapshots(sn: Snapshotter, work: Path, *appliers: Applier) -> None:
    flat = work / "flat"
    flat.mkdir()
    parent = ""
    for i, applier in enumerate(appliers):
        name = create_snapshot(sn, parent, f"layer-{i}", applier)
        applier(flat)
        check_snapshot(sn, name, flat)
        parent = name


def base_test_snapshots(sn: Snapshotter) -> None:
    sn.prepare("c1-a", labels=GC_ROOT)
    sn.commit("c1", "c1-a", labels=GC_ROOT)
    sn.prepare("c2-a", "c1", labels=GC_ROOT)
    sn.commit("c2", "c2-a", labels=GC_ROOT)
    sn.prepare("a1", "c2", labels=GC_ROOT)
    sn.prepare("a2", "", labels=GC_ROOT)
    sn.view("v1", "c2", labels=GC_ROOT)
    sn.view("v2", "", labels=GC_ROOT)


# -- containerd testsuite.go ----------------------------------------------------------------


def test_basic_workflow_prepares_commits_views_and_removes(sn: BaseSnapshotter) -> None:
    initial = apply_all(
        create_file("/foo", b"foo\n", 0o777),
        create_dir("/a", 0o755),
        create_dir("/a/b", 0o755),
        create_dir("/a/b/c", 0o755),
    )
    diff = apply_all(
        create_file("/bar", b"bar\n", 0o777),
        create_file("/foo", b"bar\n", 0o777),
        remove_all("/a/b"),
    )
    mounts = sn.prepare("preparing", labels=GC_ROOT)
    assert len(mounts) >= 1
    with local_mount(mounts) as root:
        initial(root)
    sn.commit("committed", "preparing", labels=GC_ROOT)
    si = sn.stat("committed")
    assert si.parent == ""
    assert si.kind == Kind.COMMITTED
    with pytest.raises(NotFoundError):
        sn.stat("preparing")

    with local_mount(sn.prepare("nextlayer", "committed", labels=GC_ROOT)) as root:
        expected = root.parent / "expected-initial"
        expected.mkdir()
        initial(expected)
        assert_same_tree(expected, root)
        shutil.rmtree(expected)
        diff(root)
    ni = sn.stat("nextlayer")
    assert (ni.parent, ni.kind) == ("committed", Kind.ACTIVE)
    sn.commit("committed-next", "nextlayer", labels=GC_ROOT)
    si2 = sn.stat("committed-next")
    assert (si2.parent, si2.kind) == ("committed", Kind.COMMITTED)
    with pytest.raises(NotFoundError):
        sn.stat("nextlayer")

    walked = {info.name: info for info in sn.walk()}
    assert walked == {"committed": si, "committed-next": si2}
    assert walked["committed"].labels == si.labels

    with local_mount(sn.view("nextnextlayer", "committed-next", labels=GC_ROOT)) as root:
        flat = sn.root.parent / "flat"
        flat.mkdir()
        initial(flat)
        diff(flat)
        assert_same_tree(flat, root)
    sn.remove("nextnextlayer")
    with pytest.raises(FailedPreconditionError, match="remove"):
        sn.remove("committed")
    sn.remove("committed-next")
    sn.remove("committed")
    assert list(sn.walk()) == []


def test_stat_of_an_active_snapshot(sn: BaseSnapshotter) -> None:
    with local_mount(sn.prepare("preparing", labels=GC_ROOT)) as root:
        (root / "foo").write_bytes(b"foo\n")
    si = sn.stat("preparing")
    assert (si.name, si.kind, si.parent) == ("preparing", Kind.ACTIVE, "")
    assert dict(si.labels) == GC_ROOT


def test_stat_of_a_committed_snapshot(sn: BaseSnapshotter) -> None:
    with local_mount(sn.prepare("preparing", labels=GC_ROOT)) as root:
        (root / "foo").write_bytes(b"foo\n")
    sn.commit("committed", "preparing", labels=GC_ROOT)
    si = sn.stat("committed")
    assert (si.name, si.kind, si.parent) == ("committed", Kind.COMMITTED, "")


def test_kinds_reads_many_snapshots_at_once(sn: BaseSnapshotter) -> None:
    sn.prepare("kinds-a", labels=GC_ROOT)
    sn.commit("kinds-c", "kinds-a", labels=GC_ROOT)
    sn.prepare("kinds-active", "kinds-c", labels=GC_ROOT)
    sn.view("kinds-view", "kinds-c", labels=GC_ROOT)
    keys = ["kinds-active", "kinds-c", "kinds-view", "kinds-a", "kinds-missing"]
    assert sn.kinds(keys) == {
        "kinds-active": Kind.ACTIVE,
        "kinds-c": Kind.COMMITTED,
        "kinds-view": Kind.VIEW,
    }
    assert sn.kinds([]) == {}


def test_kinds_of_a_malformed_record_names_it(sn: BaseSnapshotter, env: MetaEnv) -> None:
    sn.prepare("kinds-bad", labels=GC_ROOT)
    with env.write_txn() as txn:
        raw = msgpack.unpackb(txn.get(DB_SNAPSHOTS, b"kinds-bad"))
        raw["kind"] = "sideways"
        txn.put(DB_SNAPSHOTS, b"kinds-bad", msgpack.packb(raw))
    with pytest.raises(CorruptMetadataError, match=r"kinds-bad.*unknown kind 'sideways'"):
        sn.kinds(["kinds-bad"])


def test_parents_are_transitive(sn: BaseSnapshotter) -> None:
    with local_mount(sn.prepare("preparing", labels=GC_ROOT)) as root:
        (root / "foo").write_bytes(b"foo\n")
    sn.commit("snapA", "preparing", labels=GC_ROOT)
    with local_mount(sn.prepare("next", "snapA", labels=GC_ROOT)) as root:
        (root / "foo").write_bytes(b"foo bar\n")
    sn.commit("snapB", "next", labels=GC_ROOT)
    si_a, si_b = sn.stat("snapA"), sn.stat("snapB")
    assert si_a.parent == ""
    assert si_b.parent == "snapA"
    assert sn.stat(si_b.parent).parent == ""


def test_prepare_or_view_with_an_existing_key_fails(sn: BaseSnapshotter) -> None:
    sn.prepare("preparing", labels=GC_ROOT)
    sn.commit("snapA", "preparing", labels=GC_ROOT)
    sn.prepare("newlayer", "snapA", labels=GC_ROOT)
    with pytest.raises(AlreadyExistsError, match="newlayer"):
        sn.view("newlayer", "snapA", labels=GC_ROOT)
    sn.prepare("prepLayer", "snapA", labels=GC_ROOT)
    with pytest.raises(AlreadyExistsError, match="prepLayer"):
        sn.prepare("prepLayer", "snapA", labels=GC_ROOT)
    sn.view("viewLayer", "snapA", labels=GC_ROOT)
    with pytest.raises(AlreadyExistsError, match="viewLayer"):
        sn.view("viewLayer", "snapA", labels=GC_ROOT)


@pytest.mark.parametrize(
    ("name", "kind", "parent"),
    [
        ("c1", Kind.COMMITTED, ""),
        ("c2", Kind.COMMITTED, "c1"),
        ("a1", Kind.ACTIVE, "c2"),
        ("a2", Kind.ACTIVE, ""),
        ("v1", Kind.VIEW, "c2"),
        ("v2", Kind.VIEW, ""),
    ],
)
def test_update_changes_labels_only(
    sn: BaseSnapshotter, name: str, kind: Kind, parent: str
) -> None:
    import time

    t1 = time.time_ns()
    base_test_snapshots(sn)
    t2 = time.time_ns()
    st = sn.stat(name)
    assert t1 <= st.created_at <= t2
    assert st.created_at == st.updated_at
    assert (st.kind, st.parent, st.name) == (kind, parent, name)

    root_time = "2026-02-02T00:00:00Z"
    expected = {"l1": "v1", "l2": "v2", "l3": "v3", "containerd.io/gc.root": root_time}
    u1 = time.time_ns()
    st = sn.update(SnapshotInfo(kind, name, "doesnotexist", expected, 1, 2))
    u2 = time.time_ns()
    assert st.created_at == sn.stat(name).created_at
    assert u1 <= st.updated_at <= u2
    assert (st.kind, st.parent, st.name) == (kind, parent, name)
    assert dict(st.labels) == expected

    st = sn.update(
        SnapshotInfo(kind, name, labels={"l1": "updated", "l4": "v4"}), "labels.l1", "labels.l2"
    )
    assert dict(st.labels) == {"l1": "updated", "l3": "v3", "containerd.io/gc.root": root_time}

    expected = {"l4": "v4", "containerd.io/gc.root": root_time}
    st = sn.update(SnapshotInfo(kind, name, labels=expected), "labels")
    assert dict(st.labels) == expected
    assert dict(sn.stat(name).labels) == expected

    with pytest.raises(InvalidError, match="parent"):
        sn.update(SnapshotInfo(kind, name, "doesnotexist"), "parent")
    assert dict(sn.stat(name).labels) == expected


def test_removed_keys_can_be_reused(sn: BaseSnapshotter) -> None:
    sn.prepare("committed-a", labels=GC_ROOT)
    sn.commit("committed-1", "committed-a", labels=GC_ROOT)
    sn.prepare("reuse-1", "committed-1", labels=GC_ROOT)
    sn.remove("reuse-1")
    sn.view("reuse-1", "committed-1", labels=GC_ROOT)
    sn.remove("reuse-1")
    sn.prepare("reuse-1", "", labels=GC_ROOT)
    sn.remove("committed-1")
    sn.commit("committed-1", "reuse-1", labels=GC_ROOT)
    assert sn.stat("committed-1").kind == Kind.COMMITTED


def test_view_is_mounted_read_only(sn: BaseSnapshotter, work: Path) -> None:
    reason = _can_bind_mount(work)
    if reason is not None:
        pytest.skip(f"the view must be really mounted and this process cannot mount: {reason}")
    sn.prepare("preparing", labels=GC_ROOT)
    sn.commit("committed", "preparing", labels=GC_ROOT)
    mounts = sn.view("view", "committed", labels=GC_ROOT)
    target = work / "view-mount"
    target.mkdir()
    mount_all(mounts, target)
    try:
        with pytest.raises(OSError) as excinfo:
            (target / "testfile").write_bytes(b"testcontent")
        assert excinfo.value.errno == errno.EROFS
    finally:
        unmount(target)
    sn.remove("view")
    sn.remove("committed")


def test_stat_inside_walk_matches_walk(sn: BaseSnapshotter) -> None:
    prefix = "stats-in-walk-"
    sn.prepare(f"{prefix}c1-a", labels=GC_ROOT)
    sn.commit(f"{prefix}c1", f"{prefix}c1-a", labels=GC_ROOT)
    sn.prepare(f"{prefix}c2-a", f"{prefix}c1", labels=GC_ROOT)
    sn.commit(f"{prefix}c2", f"{prefix}c2-a", labels=GC_ROOT)
    sn.prepare(f"{prefix}a1", f"{prefix}c2", labels=GC_ROOT)
    sn.view(f"{prefix}v1", f"{prefix}c2", labels=GC_ROOT)
    seen = []
    for info in sn.walk():
        other = sn.stat(info.name)
        assert other == info
        assert (dict(other.labels), other.created_at, other.updated_at) == (
            dict(info.labels),
            info.created_at,
            info.updated_at,
        )
        seen.append(info.name)
    assert sorted(seen) == [f"{prefix}{n}" for n in ("a1", "c1", "c2", "v1")]


def test_close_twice_is_harmless(sn: BaseSnapshotter) -> None:
    sn.prepare("closeTwice-prepare", labels=GC_ROOT)
    sn.commit("closeTwice", "closeTwice-prepare", labels=GC_ROOT)
    sn.remove("closeTwice")
    sn.close()
    sn.close()
    with pytest.raises(FailedPreconditionError, match="closed"):
        sn.stat("closeTwice")


def test_root_of_a_new_snapshot_has_mode_0755(sn: BaseSnapshotter) -> None:
    old = os.umask(0o077)
    try:
        mounts = sn.prepare("preparing", labels=GC_ROOT)
    finally:
        os.umask(old)
    with local_mount(mounts) as root:
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o755


def test_128_layers_mount(sn: BaseSnapshotter, work: Path) -> None:
    appliers = [
        apply_all(
            create_file("/bottom", b"way at the bottom\n", 0o777),
            create_file("/overwriteme", b"FIRST!\n", 0o777),
            create_dir("/addhere", 0o755),
            create_dir("/onlyme", 0o755),
            create_file("/onlyme/bottom", b"bye!\n", 0o777),
        )
    ]
    for i in range(1, 128):
        appliers.append(
            apply_all(
                create_file("/overwriteme", f"{i} WAS HERE!\n".encode(), 0o777),
                create_file(f"/addhere/file-{i}", b"same\n", 0o755),
                remove_all("/onlyme"),
                create_dir("/onlyme", 0o755),
                create_file(f"/onlyme/file-{i}", b"only me!\n", 0o777),
            )
        )
    flat = work / "flat"
    flat.mkdir()
    parent = ""
    for i, applier in enumerate(appliers):
        preparing = f"prepare-layer-{i}"
        with local_mount(sn.prepare(preparing, parent, labels=GC_ROOT)) as root:
            if i in (0, 1, 64, 127):  # comparing every layer is quadratic; sample it
                assert_same_tree(flat, root)
            applier(flat)
            applier(root)
            if i in (0, 1, 64, 127):
                assert_same_tree(flat, root)
        parent = f"committed-{i}"
        sn.commit(parent, preparing, labels=GC_ROOT)
    mounts = sn.view("fullview", parent, labels=GC_ROOT)
    if sn.name == "overlayfs":
        lowers = next(o for o in mounts[0].options if o.startswith("lowerdir="))
        assert len(lowers.split(":")) == 128
        assert len(lowers) > 4096  # needs the relative-lowerdir mount
    with local_mount(mounts) as root:
        assert_same_tree(flat, root)


WALK_LABELS = {"containerd.io/gc.root": "check-walk"}


@pytest.mark.parametrize(
    ("filters", "matches"),
    [
        (
            ['labels."containerd.io/gc.root"==check-walk'],
            ["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
        ),
        (
            ['kind==active,labels."containerd.io/gc.root"==check-walk'],
            ["a-np", "a", "a-wl", "a-np-wl"],
        ),
        (['kind==view,labels."containerd.io/gc.root"==check-walk'], ["v", "v-wl"]),
        (['kind==committed,labels."containerd.io/gc.root"==check-walk'], ["p", "p-wl"]),
        (["name==p", "name==a-np-wl"], ["p", "a-np-wl"]),
        (["name==a-wl,labels.l"], ["a-wl"]),
        (["parent==p"], ["a", "v"]),
        (['parent!="",labels."containerd.io/gc.root"==check-walk'], ["a", "v", "a-wl", "v-wl"]),
        (["labels.l"], ["p-wl", "a-wl", "v-wl", "a-np-wl"]),
        (["labels.l==2"], ["a-wl", "a-np-wl"]),
    ],
)
def test_walk_filters(sn: BaseSnapshotter, filters: list[str], matches: list[str]) -> None:
    sn.prepare("a-np", labels=WALK_LABELS)
    sn.prepare("p-tmp", labels=WALK_LABELS)
    sn.commit("p", "p-tmp", labels=WALK_LABELS)
    sn.prepare("a", "p", labels=WALK_LABELS)
    sn.view("v", "p", labels=WALK_LABELS)
    sn.prepare("p-wl-tmp", labels=WALK_LABELS)
    sn.commit("p-wl", "p-wl-tmp", labels={"l": "1", **WALK_LABELS})
    sn.prepare("a-wl", "p-wl", labels={"l": "2", **WALK_LABELS})
    sn.view("v-wl", "p-wl", labels={"l": "3", **WALK_LABELS})
    sn.prepare("a-np-wl", labels={"l": "2", **WALK_LABELS})
    assert sorted(i.name for i in sn.walk(*filters)) == sorted(matches)


def test_walk_rejects_a_malformed_filter(sn: BaseSnapshotter) -> None:
    with pytest.raises(InvalidError):
        list(sn.walk("labels.==="))


# -- containerd issues.go -------------------------------------------------------------------


def test_layer_file_update(sn: BaseSnapshotter, work: Path) -> None:
    l1 = apply_all(
        create_dir("/etc", 0o700),
        create_file("/etc/hosts", b"mydomain 10.0.0.1", 0o644),
        create_file("/etc/profile", b"PATH=/usr/bin", 0o644),
    )
    l2 = apply_all(
        create_file("/etc/hosts", b"mydomain 10.0.0.2", 0o644),
        create_file("/etc/profile", b"PATH=/usr/bin", 0o666),
        create_dir("/root", 0o700),
        create_file("/root/.bashrc", b"PATH=/usr/sbin:/usr/bin", 0o644),
    )
    check_snapshots(sn, work, l1, l2)


def test_remove_directory_in_lower_layer(sn: BaseSnapshotter, work: Path) -> None:
    l1 = apply_all(create_dir("/lib", 0o700), create_file("/lib/hidden", b"", 0o644))
    l2 = apply_all(
        remove_all("/lib"), create_dir("/lib", 0o700), create_file("/lib/not-hidden", b"", 0o644)
    )
    l3 = create_file("/lib/newfile", b"", 0o644)
    check_snapshots(sn, work, l1, l2, l3)


@pytest.mark.skipif(not IS_ROOT, reason="chown to another user needs root")
def test_chown_in_upper_layer(sn: BaseSnapshotter, work: Path) -> None:
    l1 = apply_all(
        create_dir("/opt", 0o700),
        create_dir("/opt/a", 0o700),
        create_dir("/opt/a/b", 0o700),
        create_file("/opt/a/b/file.txt", b"hello", 0o644),
    )
    l2 = apply_all(
        chown("/opt", 1, 1),
        chown("/opt/a", 1, 1),
        chown("/opt/a/b", 1, 1),
        chown("/opt/a/b/file.txt", 1, 1),
    )
    check_snapshots(sn, work, l1, l2)


def test_rename_in_upper_layer(sn: BaseSnapshotter, work: Path) -> None:
    l1 = apply_all(
        create_dir("/dir1", 0o700),
        create_dir("/somefiles", 0o700),
        create_file("/somefiles/f1", b"was here first!", 0o644),
        create_file("/somefiles/f2", b"nothing interesting", 0o644),
    )
    appliers: list[Applier] = []
    if sn.name != "overlayfs":
        # containerd skips this for overlayfs: renaming a lower directory needs redirect_dir.
        appliers.append(rename("/dir1", "/dir2"))
    appliers += [
        create_file("/somefiles/f1-overwrite", b"new content 1", 0o644),
        rename("/somefiles/f1-overwrite", "/somefiles/f1"),
        rename("/somefiles/f2", "/somefiles/f3"),
    ]
    check_snapshots(sn, work, l1, apply_all(*appliers))


@pytest.mark.skipif(not IS_ROOT, reason="chown to another user needs root")
def test_directory_permission_on_commit(sn: BaseSnapshotter, work: Path) -> None:
    l1 = apply_all(
        create_dir("/dir1", 0o700),
        create_dir("/dir2", 0o700),
        create_dir("/dir3", 0o700),
        create_dir("/dir4", 0o700),
        create_file("/dir4/f1", b"...", 0o644),
        create_dir("/dir5", 0o700),
        create_file("/dir5/f1", b"...", 0o644),
        chown("/dir1", 1, 1),
        chown("/dir2", 1, 1),
        chown("/dir3", 1, 1),
        chown("/dir5", 1, 1),
        chown("/dir5/f1", 1, 1),
    )
    l2 = apply_all(
        chown("/dir2", 0, 0),
        remove_all("/dir3"),
        chown("/dir4", 1, 1),
        chown("/dir4/f1", 1, 1),
    )
    l3 = apply_all(
        create_dir("/dir3", 0o700),
        chown("/dir3", 1, 1),
        remove_all("/dir5"),
        create_dir("/dir5", 0o700),
        chown("/dir5", 1, 1),
    )
    check_snapshots(sn, work, l1, l2, l3)


def test_removing_an_intermediate_snapshot_fails(sn: BaseSnapshotter) -> None:
    sn.prepare("base", labels=GC_ROOT)
    sn.commit("committed-base", "base", labels=GC_ROOT)
    sn.prepare("intermediate", "committed-base", labels=GC_ROOT)
    sn.commit("committed-inter", "intermediate", labels=GC_ROOT)
    sn.prepare("toplayer", "committed-inter", labels=GC_ROOT)
    with pytest.raises(FailedPreconditionError, match="committed-inter"):
        sn.remove("committed-inter")
    sn.remove("toplayer")
    sn.remove("committed-inter")
    sn.remove("committed-base")
    assert list(sn.walk()) == []


def test_deleted_files_in_child_snapshot(sn: BaseSnapshotter, work: Path) -> None:
    l1 = apply_all(create_file("/foo", b"foo\n", 0o777), create_file("/foobar", b"foobar\n", 0o777))
    check_snapshots(sn, work, l1, remove_all("/foobar"), apply_all())


def test_move_file_from_lower_layer(sn: BaseSnapshotter, work: Path) -> None:
    l1 = apply_all(
        create_dir("/dir1", 0o700),
        create_file("/dir1/f1", b"Hello", 0o644),
        create_dir("dir2", 0o700),
        create_file("dir2/f2", b"...", 0o644),
    )
    l2 = apply_all(
        create_dir("/dir3", 0o700),
        create_file("/dir3/f1", b"Hello", 0o644),
        remove_all("/dir1"),
        link("dir2/f2", "dir3/f2"),
        remove_all("dir2/f2"),
    )
    check_snapshots(sn, work, l1, l2)


# -- errors and validation ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [None, 3, b"key", "", "a\x00b"])
def test_bad_keys_are_rejected_and_change_nothing(sn: BaseSnapshotter, bad: object) -> None:
    with pytest.raises(InvalidError):
        sn.prepare(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidError):
        sn.stat(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidError):
        sn.remove(bad)  # type: ignore[arg-type]
    assert list(sn.walk()) == []
    assert sorted(os.listdir(sn.root / "snapshots")) == []


def test_bad_labels_are_rejected(sn: BaseSnapshotter) -> None:
    with pytest.raises(InvalidError, match="4096"):
        sn.prepare("a", labels={"k": "v" * 4096})
    with pytest.raises(InvalidError):
        sn.prepare("a", labels={"k": 1})  # type: ignore[dict-item]
    assert list(sn.walk()) == []


def test_parent_must_exist_and_be_committed(sn: BaseSnapshotter) -> None:
    with pytest.raises(NotFoundError, match="missing"):
        sn.prepare("a", "missing")
    sn.prepare("active")
    with pytest.raises(InvalidError, match="not a committed"):
        sn.prepare("b", "active")
    with pytest.raises(InvalidError, match="not a committed"):
        sn.view("b", "active")
    assert [i.name for i in sn.walk()] == ["active"]
    assert sorted(os.listdir(sn.root / "snapshots")) == ["1"]


def test_commit_checks_kinds_and_names(sn: BaseSnapshotter) -> None:
    sn.prepare("a")
    sn.view("v")
    sn.prepare("b")
    sn.commit("c", "b")
    with pytest.raises(NotFoundError, match="nope"):
        sn.commit("x", "nope")
    with pytest.raises(FailedPreconditionError, match="view"):
        sn.commit("x", "v")
    with pytest.raises(FailedPreconditionError, match="committed"):
        sn.commit("x", "c")
    with pytest.raises(AlreadyExistsError, match="'c'"):
        sn.commit("c", "a")
    assert sn.stat("a").kind == Kind.ACTIVE


def test_mounts_of_a_committed_snapshot_fail(sn: BaseSnapshotter) -> None:
    mounts = sn.prepare("a")
    assert sn.mounts("a") == mounts
    sn.commit("c", "a")
    with pytest.raises(FailedPreconditionError, match="committed"):
        sn.mounts("c")
    with pytest.raises(NotFoundError):
        sn.mounts("a")


def test_remove_of_a_missing_snapshot_is_not_found(sn: BaseSnapshotter) -> None:
    with pytest.raises(NotFoundError, match="ghost"):
        sn.remove("ghost")


# -- mount shapes ---------------------------------------------------------------------------


def test_native_mounts_are_bind_mounts_of_plain_directories(native: NativeSnapshotter) -> None:
    dirs = native.root / "snapshots"
    assert native.prepare("a") == [Mount("bind", str(dirs / "1"), ("rbind", "rw"))]
    native.commit("A", "a")
    assert native.prepare("b", "A") == [Mount("bind", str(dirs / "2"), ("rbind", "rw"))]
    # containerd native: a view of a parent is the parent's own directory, read-only.
    assert native.view("v", "A") == [Mount("bind", str(dirs / "1"), ("rbind", "ro"))]
    assert native.view("e") == [Mount("bind", str(dirs / "4"), ("rbind", "ro"))]
    assert native.path("v") == dirs / "1"
    assert native.path("b") == dirs / "2"
    assert sorted(os.listdir(dirs)) == ["1", "2", "4"]


def test_overlay_mounts_follow_containerd(tmp_path: Path, env: MetaEnv) -> None:
    sn = _open("overlayfs", tmp_path / "snapshots", env)
    dirs = sn.root / "snapshots"
    extra = tuple(
        o for o in ("index=off",) if Path("/sys/module/overlay/parameters/index").exists()
    )
    assert sn.prepare("a") == [Mount("bind", str(dirs / "1" / "fs"), ("rbind", "rw"))]
    sn.commit("A", "a")
    assert sn.prepare("b", "A") == [
        Mount(
            "overlay",
            "overlay",
            (f"workdir={dirs}/2/work", f"upperdir={dirs}/2/fs", f"lowerdir={dirs}/1/fs", *extra),
        )
    ]
    sn.commit("B", "b")
    assert sn.view("v1", "A") == [Mount("bind", str(dirs / "1" / "fs"), ("rbind", "ro"))]
    assert sn.view("v2", "B") == [
        Mount("overlay", "overlay", (f"lowerdir={dirs}/2/fs:{dirs}/1/fs", *extra))
    ]
    assert sn.view("v0") == [Mount("bind", str(dirs / "5" / "fs"), ("rbind", "ro"))]
    assert sn.path("B") == dirs / "2" / "fs"
    assert sorted(os.listdir(dirs / "2")) == ["fs", "work"]  # committed from active
    assert sorted(os.listdir(dirs / "3")) == ["fs"]  # a view has no workdir


def test_overlay_deletions_are_whiteouts_counted_by_usage(tmp_path: Path, env: MetaEnv) -> None:
    sn = _open("overlayfs", tmp_path / "snapshots", env)
    with local_mount(sn.prepare("a")) as root:
        for i in range(3):
            (root / f"f{i}").write_bytes(b"x" * 5000)
        (root / "d").mkdir()
        (root / "d" / "inner").write_bytes(b"y")
    sn.commit("A", "a")
    with local_mount(sn.prepare("b", "A")) as root:
        for i in range(3):
            (root / f"f{i}").unlink()
        shutil.rmtree(root / "d")
        (root / "d").mkdir()
        (root / "d" / "new").write_bytes(b"z")
    upper = sn.path("b")
    whiteouts = sorted(p.name for p in upper.iterdir() if _whiteout(p))
    assert whiteouts == ["f0", "f1", "f2"]
    assert os.getxattr(upper / "d", "trusted.overlay.opaque") == b"y"
    assert sn.usage("b") == fs_usage(upper)
    sn.commit("B", "b")
    assert sn.usage("B") == fs_usage(upper)
    with local_mount(sn.view("v", "B")) as root:
        assert sorted(os.listdir(root)) == ["d"]
        assert os.listdir(root / "d") == ["new"]


def _whiteout(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


# -- usage ----------------------------------------------------------------------------------


def test_usage_is_block_accounting_of_unique_inodes(sn: BaseSnapshotter) -> None:
    with local_mount(sn.prepare("a")) as root:
        (root / "small").write_bytes(b"s")
        (root / "big").write_bytes(os.urandom(100_000))
        os.link(root / "big", root / "big-link")
        (root / "dir").mkdir()
        os.symlink("small", root / "dir" / "sym")
    expected = fs_usage(sn.path("a"))
    assert expected.inodes == 5  # root, small, big (once), dir, sym
    assert sn.usage("a") == expected
    sn.commit("A", "a")
    assert sn.usage("A") == expected
    with local_mount(sn.prepare("b", "A")) as root:
        (root / "more").write_bytes(b"m" * 10_000)
    # Active usage is measured live; committed usage was stored at commit.
    assert sn.usage("b") == fs_usage(sn.path("b"))
    assert sn.usage("A") == expected
    sn.view("v", "A")
    assert sn.usage("v") == Usage(0, 0)


# -- native copy fidelity -------------------------------------------------------------------


def _st_blocks_sparse_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.write(b"head")
        f.seek(size - 4)
        f.write(b"tail")


def test_native_prepare_copies_faithfully(native: NativeSnapshotter) -> None:
    with local_mount(native.prepare("a")) as root:
        (root / "exec").write_bytes(b"#!/bin/sh\n")
        os.chmod(root / "exec", 0o4755)
        (root / "dir").mkdir()
        os.chmod(root / "dir", 0o1777)
        (root / "dir" / "file").write_bytes(b"content")
        os.utime(root / "dir" / "file", ns=(1_000_000_123, 2_000_000_456))
        os.symlink("dir/file", root / "link")
        os.symlink("/nonexistent/target", root / "dangling")
        os.link(root / "dir" / "file", root / "hard")
        os.mkfifo(root / "fifo")
        _st_blocks_sparse_file(root / "sparse", 64 << 20)
        try:
            os.setxattr(root / "dir" / "file", "user.note", b"kept")
            has_xattr = True
        except OSError:
            has_xattr = False
        os.utime(root / "dir", ns=(3_000_000_789, 4_000_000_012))
    native.commit("A", "a")
    parent = native.path("A")
    with local_mount(native.prepare("b", "A")) as child:
        # Times are copied to the nanosecond (the parent's atime as the copy read it: the
        # commit's usage walk already refreshed it under relatime).
        assert os.lstat(child / "dir").st_atime_ns == os.lstat(parent / "dir").st_atime_ns
        assert manifest(child) == manifest(parent)
        for rel in ("exec", "dir", "dir/file", "link", "dangling", "fifo", "sparse"):
            ps, cs = os.lstat(parent / rel), os.lstat(child / rel)
            assert cs.st_mode == ps.st_mode, rel
            assert (cs.st_uid, cs.st_gid) == (ps.st_uid, ps.st_gid), rel
            assert cs.st_mtime_ns == ps.st_mtime_ns, rel
            assert cs.st_ino != ps.st_ino, rel
        assert os.readlink(child / "dangling") == "/nonexistent/target"
        # Hardlinks inside the tree stay hardlinks (of the copy, not of the parent).
        assert os.lstat(child / "hard").st_ino == os.lstat(child / "dir" / "file").st_ino
        assert os.lstat(child / "hard").st_nlink == 2
        sparse = os.lstat(child / "sparse")
        assert sparse.st_size == 64 << 20
        assert sparse.st_blocks * 512 <= 64 * 1024  # only the two data blocks
        assert (child / "sparse").read_bytes()[-4:] == b"tail"
        if has_xattr:
            assert os.getxattr(child / "dir" / "file", "user.note") == b"kept"
        # The copy is independent of the parent.
        (child / "dir" / "file").write_bytes(b"changed")
    assert (parent / "dir" / "file").read_bytes() == b"content"


# -- merge ----------------------------------------------------------------------------------


def _layers_for_merge(sn: BaseSnapshotter) -> None:
    with local_mount(sn.prepare("a")) as root:
        (root / "etc").mkdir()
        (root / "etc" / "a.conf").write_bytes(b"a")
        (root / "shared").write_bytes(b"from a")
        (root / "gone").write_bytes(b"deleted by b")
    sn.commit("A", "a")
    with local_mount(sn.prepare("b", "A")) as root:
        (root / "gone").unlink()
        (root / "etc" / "b.conf").write_bytes(b"b" * 9000)
        (root / "shared").write_bytes(b"from b")
    sn.commit("B", "b")
    with local_mount(sn.prepare("c")) as root:
        (root / "usr").mkdir()
        (root / "usr" / "bin").mkdir()
        (root / "usr" / "bin" / "tool").write_bytes(b"tool")
        os.symlink("usr/bin/tool", root / "tool")
        (root / "shared").write_bytes(b"from c")
    sn.commit("C", "c")


def _inodes(path: Path) -> set[tuple[int, int]]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, n))
            out.add((st.st_dev, st.st_ino))
    return out


def test_merge_of_three_layers_hardlinks_and_applies_deletions(sn: BaseSnapshotter) -> None:
    _layers_for_merge(sn)
    sn.merge("M", [("", "A"), ("A", "B"), ("", "C")], labels={"k": "v"})
    info = sn.stat("M")
    assert (info.kind, info.parent, dict(info.labels)) == (Kind.COMMITTED, "", {"k": "v"})
    merged = sn.path("M")
    with local_mount(sn.view("mv", "M")) as root:
        got = manifest(root)
    assert sorted(got) == [
        "etc",
        "etc/a.conf",
        "etc/b.conf",
        "shared",
        "tool",
        "usr",
        "usr/bin",
        "usr/bin/tool",
    ]
    assert (merged / "shared").read_bytes() == b"from c"
    assert (merged / "etc" / "b.conf").read_bytes() == b"b" * 9000
    assert os.readlink(merged / "tool") == "usr/bin/tool"
    # Files are hardlinked from the inputs' own directories, not copied.
    layer_b = sn.path("B")
    layer_c = sn.path("C")
    assert os.lstat(merged / "etc" / "b.conf").st_ino == os.lstat(layer_b / "etc" / "b.conf").st_ino
    assert os.lstat(merged / "shared").st_ino == os.lstat(layer_c / "shared").st_ino
    assert (
        os.lstat(merged / "usr" / "bin" / "tool").st_ino
        == os.lstat(layer_c / "usr" / "bin" / "tool").st_ino
    )
    # Usage counts only inodes that the merge made itself (its directories).
    inputs = set().union(*(_inodes(sn.path(k)) for k in ("A", "B", "C")))
    assert sn.usage("M") == fs_usage(merged, exclude=inputs)
    assert sn.usage("M").inodes == 4  # root, etc, usr, usr/bin
    # A merge of merges works after its inputs are gone.
    sn.remove("mv")
    sn.merge("MM", [("", "M")])
    for key in ("M", "C", "B", "A"):
        sn.remove(key)
    assert (sn.path("MM") / "shared").read_bytes() == b"from c"


def test_xattr_only_and_directory_time_only_changes_are_carried_by_merge_and_differ(
    sn: BaseSnapshotter, tmp_path: Path
) -> None:
    # B changes A only in an xattr of a file and in the mtime of a directory: continuity's
    # sameFile (security.capability only, directories always equal) would see no change.
    with local_mount(sn.prepare("a")) as root:
        (root / "etc").mkdir()
        (root / "etc" / "conf").write_bytes(b"same bytes")
        os.utime(root / "etc", ns=(1_000_000_000, 1_000_000_000))
    sn.commit("A", "a")
    dir_ns = 1_700_000_000_123_456_789
    with local_mount(sn.prepare("b", "A")) as root:
        conf_before = os.lstat(root / "etc" / "conf")
        try:
            os.setxattr(root / "etc" / "conf", "user.note", b"added")
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            pytest.skip(f"no user xattrs here: {exc}")
        os.utime(root / "etc", ns=(dir_ns, dir_ns))
        conf_after = os.lstat(root / "etc" / "conf")
    sn.commit("B", "b")
    assert (conf_after.st_size, conf_after.st_mtime_ns) == (
        conf_before.st_size,
        conf_before.st_mtime_ns,
    )

    # The merge of (all of A) then (A -> B) looks like B.
    sn.merge("M", [("", "A"), ("A", "B")])
    merged = sn.path("M")
    assert os.getxattr(merged / "etc" / "conf", "user.note") == b"added"
    assert os.lstat(merged / "etc").st_mtime_ns == dir_ns

    # The layer diff A -> B carries the same two changes, and nothing else.
    out = tmp_path / "a-to-b.tar"
    with (
        local_mount(sn.view("va", "A")) as lower,
        local_mount(sn.view("vb", "B")) as upper,
        out.open("wb") as sink,
    ):
        write_diff(lower, upper, sink)
    with tarfile.open(out) as tf:
        members = {m.name.rstrip("/"): m for m in tf.getmembers()}
    assert sorted(members) == ["etc", "etc/conf"]
    assert members["etc/conf"].pax_headers.get("SCHILY.xattr.user.note") == "added"
    assert members["etc"].pax_headers.get("mtime") == "1700000000.123456789"


def test_merge_validates_inputs_and_changes_nothing(sn: BaseSnapshotter) -> None:
    sn.prepare("active")
    with pytest.raises(NotFoundError, match="nope"):
        sn.merge("M", [("", "nope")])
    with pytest.raises(FailedPreconditionError, match="active"):
        sn.merge("M", [("", "active")])
    with pytest.raises(InvalidError):
        sn.merge("M", ["ab"])  # type: ignore[list-item]
    with pytest.raises(AlreadyExistsError):
        sn.merge("active", [])
    assert [i.name for i in sn.walk()] == ["active"]
    assert sorted(os.listdir(sn.root / "snapshots")) == ["1"]


def test_diff_with_an_empty_upper_deletes_everything_of_lower(sn: BaseSnapshotter) -> None:
    _layers_for_merge(sn)
    sn.merge("M", [("", "B"), ("", "C"), ("B", "")])
    # Everything B has goes, "shared" included although C wrote it last.
    assert sorted(os.listdir(sn.path("M"))) == ["tool", "usr"]


# -- durability and recovery ----------------------------------------------------------------


def test_leftovers_are_cleaned_at_open(tmp_path: Path, env: MetaEnv) -> None:
    root = tmp_path / "snapshots"
    first = NativeSnapshotter(root, env)
    first.prepare("keep")
    first.prepare("lost")
    first.close()
    dirs = root / "snapshots"
    for name in ("new-abc", "rm-7", "99"):
        (dirs / name).mkdir()
        (dirs / name / "file").write_bytes(b"junk")
    shutil.rmtree(dirs / "2")  # "lost" has metadata but no directory
    second = NativeSnapshotter(root, env)
    assert sorted(p.name for p in second.cleaned) == ["99", "new-abc", "rm-7"]
    assert sorted(os.listdir(dirs)) == ["1"]
    assert second.orphans() == []
    assert second.missing() == ["lost"]


def test_orphans_lists_directories_without_metadata(native: NativeSnapshotter) -> None:
    native.prepare("a")
    (native.root / "snapshots" / "42").mkdir()
    assert native.orphans() == [native.root / "snapshots" / "42"]
    assert native.cleanup() == [native.root / "snapshots" / "42"]
    assert native.orphans() == []


def test_failed_caller_transaction_leaves_no_snapshot_and_no_directory(
    sn: BaseSnapshotter, env: MetaEnv
) -> None:
    sn.prepare("base")
    sn.commit("B", "base")

    def failing() -> None:
        with env.write_txn() as txn:
            sn.prepare("a", "B", txn=txn)
            sn.merge("m", [("", "B")], txn=txn)
            assert sorted(os.listdir(sn.root / "snapshots")) == ["1", "2", "3"]
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing()
    with pytest.raises(NotFoundError):
        sn.stat("a")
    assert [i.name for i in sn.walk()] == ["B"]
    assert sorted(os.listdir(sn.root / "snapshots")) == ["1"]
    # The ids the rolled-back transaction used are free again, and work.
    sn.prepare("a", "B")
    assert sorted(os.listdir(sn.root / "snapshots")) == ["1", "2"]


def test_caller_transaction_commits_snapshot_with_other_writes(
    sn: BaseSnapshotter, env: MetaEnv
) -> None:
    with env.write_txn() as txn:
        sn.prepare("a", txn=txn)
        sn.commit("A", "a", txn=txn)
        sn.prepare("b", "A", txn=txn)
        txn.put(DB_SNAPSHOTS, b"\x00other", b"")
    assert sorted(i.name for i in sn.walk()) == ["A", "b"]
    assert sn.missing() == []
    assert sn.orphans() == []


def test_remove_deletes_the_directory_only_after_commit(sn: BaseSnapshotter, env: MetaEnv) -> None:
    sn.prepare("a")
    path = sn.root / "snapshots" / "1"
    with env.write_txn() as txn:
        sn.remove("a", txn=txn)
        # Renamed into the trash before the commit (a reader of the committed state never
        # sees it), but not queued for deletion until the commit.
        assert not path.exists()
        assert (sn.root / "trash" / "1").is_dir()
        assert sn.trash.pending() == 0
    assert not path.exists()
    assert os.listdir(sn.root / "snapshots") == []
    # The trash's worker deletes it after the commit, in the background.
    assert sn.trash.wait_idle(timeout=30)
    assert os.listdir(sn.root / "trash") == []
    sn.prepare("b")

    def failing() -> None:
        with env.write_txn() as txn:
            sn.remove("b", txn=txn)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing()
    assert sn.stat("b").kind == Kind.ACTIVE
    assert (sn.root / "snapshots" / "2").exists()


def test_metadata_keeps_unknown_fields_on_rewrite(native: NativeSnapshotter, env: MetaEnv) -> None:
    native.prepare("a")
    with env.write_txn() as txn:
        raw = msgpack.unpackb(txn.get(DB_SNAPSHOTS, b"a"))
        raw["future"] = 7
        txn.put(DB_SNAPSHOTS, b"a", msgpack.packb(raw))
    native.commit("A", "a")
    native.update(SnapshotInfo(Kind.COMMITTED, "A", labels={"x": "y"}))
    with env.read_txn() as txn:
        stored = msgpack.unpackb(txn.get(DB_SNAPSHOTS, b"A"))
    assert stored["future"] == 7
    assert stored["labels"] == {"x": "y"}
    assert stored["usage"] == [disk_usage(native.path("A")).size, 1]


def test_concurrent_prepares_and_commits_from_threads(sn: BaseSnapshotter) -> None:
    with local_mount(sn.prepare("base")) as root:
        (root / "file").write_bytes(b"base")
    sn.commit("B", "base")

    def work(i: int) -> str:
        mounts = sn.prepare(f"a{i}", "B")
        with local_mount(mounts) as root:
            (root / f"own-{i}").write_bytes(str(i).encode())
        sn.commit(f"C{i}", f"a{i}")
        return f"C{i}"

    with ThreadPoolExecutor(max_workers=8) as pool:
        names = [f.result(timeout=60) for f in [pool.submit(work, i) for i in range(16)]]
    assert sorted(i.name for i in sn.walk("parent==B")) == sorted(names)
    assert sn.orphans() == []
    assert sn.missing() == []
    ids = set(os.listdir(sn.root / "snapshots"))
    assert len(ids) == 17


# -- choosing a snapshotter -----------------------------------------------------------------


def test_a_native_cache_cannot_be_reopened_as_overlay(tmp_path: Path, env: MetaEnv) -> None:
    root = tmp_path / "snapshots"
    make_snapshotter("native", root, env).close()
    with pytest.raises(FailedPreconditionError, match="created with the 'native' snapshotter"):
        make_snapshotter("overlay", root, env)
    with pytest.raises(FailedPreconditionError, match="'native'"):
        OverlaySnapshotter(root, env)
    # "auto" follows what the cache was created with.
    assert make_snapshotter("auto", root, env).name == "native"


def test_auto_uses_overlay_when_the_probe_mount_works(tmp_path: Path, env: MetaEnv) -> None:
    root = tmp_path / "snapshots"
    reason = probe_overlay(root)
    chosen = make_snapshotter("auto", root, env)
    assert chosen.name == ("overlayfs" if reason is None else "native")
    assert isinstance(chosen, Snapshotter)


def test_unknown_snapshotter_names_are_invalid(tmp_path: Path, env: MetaEnv) -> None:
    with pytest.raises(InvalidError, match="btrfs"):
        make_snapshotter("btrfs", tmp_path / "snapshots", env)
