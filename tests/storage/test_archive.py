"""Tests for storage._archive: compression, the hardened tar applier and the walking differ."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import stat
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from refcache.storage import (
    ApplyResult,
    apply_tar,
    compressed_writer,
    decompressed_stream,
    detect_compression,
    write_diff,
)
from refcache.storage._archive import MAX_ENTRY_SIZE
from refcache.storage._errors import InvalidError

IS_ROOT = os.geteuid() == 0
SEC = 1_700_000_000
NS = 1_000_000_000

# --------------------------------------------------------------------------------------------
# Helpers


def reg(
    name: str, data: bytes = b"", mode: int = 0o644, **kw: Any
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.REGTYPE
    info.size = len(data)
    info.mode = mode
    info.mtime = kw.pop("mtime", SEC)
    for key, value in kw.items():
        setattr(info, key, value)
    return info, data


def dir_(name: str, mode: int = 0o755, **kw: Any) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    info.mtime = kw.pop("mtime", SEC)
    for key, value in kw.items():
        setattr(info, key, value)
    return info, b""


def sym(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mtime = SEC
    return info, b""


def hard(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE
    info.linkname = target
    info.mode = 0o644
    info.mtime = SEC
    return info, b""


def chardev(name: str, major: int = 1, minor: int = 3) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor = major
    info.devminor = minor
    info.mode = 0o666
    return info, b""


def make_tar(*entries: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def tree_state(root: Path, *, skip: Path | None = None) -> dict[str, tuple[Any, ...]]:
    """Everything observable about a tree (type, mode, owner, size, content, link, mtime)."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip is not None and Path(dirpath) == skip:
            dirnames.clear()
            continue
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if skip is not None and path == skip:
                continue
            st_ = path.lstat()
            extra: Any = None
            if stat.S_ISREG(st_.st_mode):
                extra = path.read_bytes()
            elif stat.S_ISLNK(st_.st_mode):
                extra = os.readlink(path)
            out[str(path.relative_to(root))] = (
                st_.st_mode,
                st_.st_uid,
                st_.st_nlink,
                st_.st_size,
                st_.st_mtime_ns,
                extra,
            )
    return out


@dataclass
class Arena:
    """A target directory next to sentinel files that no archive may touch."""

    root: Path
    target: Path
    outside: Path
    before: dict[str, tuple[Any, ...]]

    def apply(self, data: bytes, **kw: Any) -> ApplyResult:
        return apply_tar(io.BytesIO(data), self.target, **kw)

    def assert_outside_unchanged(self) -> None:
        assert tree_state(self.root, skip=self.target) == self.before

    def clamped(self, path: Path) -> Path:
        """Where an absolute path lands when resolved inside the target."""
        return self.target / str(path).lstrip("/")


@pytest.fixture
def arena(tmp_path: Path) -> Arena:
    target = tmp_path / "target"
    target.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"top secret")
    (outside / "victim").mkdir()
    (outside / "victim" / "file").write_bytes(b"keep me")
    (tmp_path / "passwd").write_bytes(b"root:x:0:0")
    return Arena(tmp_path, target, outside, tree_state(tmp_path, skip=target))


# --------------------------------------------------------------------------------------------
# Compression


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\x1f\x8b\x08\x00", "gzip"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
        (b"\x50\x2a\x4d\x18", "zstd"),
        (b"\x5f\x2a\x4d\x18", "zstd"),
        (b"\x1f\x8b\x07\x00", "uncompressed"),
        (b"ustar", "uncompressed"),
        (b"", "uncompressed"),
        (b"\x28\xb5", "uncompressed"),
    ],
)
def test_detect_compression_reads_magic_bytes(head: bytes, expected: str) -> None:
    assert detect_compression(head) == expected


@pytest.mark.parametrize("compression", ["uncompressed", "gzip", "zstd"])
def test_compressed_writer_round_trips_through_decompressed_stream(compression: str) -> None:
    payload = os.urandom(50_000) + b"\x00" * 100_000
    sink = io.BytesIO()
    writer = compressed_writer(sink, compression)
    writer.write(payload)
    writer.close()
    assert not sink.closed
    assert detect_compression(sink.getvalue()[:4]) == compression
    assert decompressed_stream(io.BytesIO(sink.getvalue())).read() == payload


def test_gzip_output_is_deterministic() -> None:
    outs = []
    for _ in range(2):
        sink = io.BytesIO()
        writer = compressed_writer(sink, "gzip")
        writer.write(b"same bytes")
        writer.close()
        outs.append(sink.getvalue())
    assert outs[0] == outs[1]


def test_compressed_writer_rejects_unknown_compression() -> None:
    with pytest.raises(InvalidError, match="'lz4'"):
        compressed_writer(io.BytesIO(), "lz4")


def test_multi_member_gzip_is_decoded_to_the_end() -> None:
    data = gzip.compress(b"first ") + gzip.compress(b"second")
    assert decompressed_stream(io.BytesIO(data)).read() == b"first second"


def test_multi_frame_zstd_with_skippable_frame_and_trailing_bytes_hash_into_diff_id(
    arena: Arena,
) -> None:
    tar = make_tar(reg("a", b"A" * 5000), reg("b/c", b"C" * 7000)) + b"trailing garbage"
    cctx = zstandard.ZstdCompressor()
    cut = 3000
    skippable = struct.pack("<II", 0x184D2A53, 4) + b"skip"
    blob = skippable + cctx.compress(tar[:cut]) + skippable + cctx.compress(tar[cut:])
    assert detect_compression(blob[:4]) == "zstd"

    result = apply_tar(decompressed_stream(io.BytesIO(blob)), arena.target)

    assert result == ApplyResult("sha256:" + hashlib.sha256(tar).hexdigest(), len(tar))
    assert (arena.target / "a").read_bytes() == b"A" * 5000
    assert (arena.target / "b" / "c").read_bytes() == b"C" * 7000


def test_trailing_bytes_of_an_uncompressed_tar_are_hashed(arena: Arena) -> None:
    tar = make_tar(reg("f", b"x")) + os.urandom(777)
    result = arena.apply(tar)
    assert result.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert result.size == len(tar)


def test_empty_stream_is_an_empty_layer(arena: Arena) -> None:
    result = arena.apply(b"")
    assert result == ApplyResult("sha256:" + hashlib.sha256(b"").hexdigest(), 0)
    assert list(arena.target.iterdir()) == []


def test_stream_that_is_not_a_tar_is_rejected(arena: Arena) -> None:
    with pytest.raises(InvalidError, match="not a tar"):
        arena.apply(b"this is not a tar archive at all" * 40)


def test_corrupt_gzip_stream_is_rejected(arena: Arena) -> None:
    data = bytearray(gzip.compress(make_tar(reg("f", os.urandom(4000)))))
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(InvalidError):
        apply_tar(decompressed_stream(io.BytesIO(bytes(data))), arena.target)


# --------------------------------------------------------------------------------------------
# Applying


def test_files_dirs_symlinks_and_hardlinks_are_applied_with_their_metadata(
    arena: Arena,
) -> None:
    f_info, f_data = reg("d/f", b"hello", mode=0o4755, uid=1234, gid=4321)
    f_info.pax_headers = {
        "mtime": f"{SEC}.123456789",
        "SCHILY.xattr.user.note": "v\udcff",
    }
    # A hardlink header's metadata applies to the shared inode (containerd does the same),
    # so it carries the file's metadata, as tar writers produce it.
    h_info, h_data = hard("d/hard", "d/f")
    for attr in ("mode", "uid", "gid", "pax_headers"):
        setattr(h_info, attr, getattr(f_info, attr))
    tar = make_tar(
        dir_("d", mode=0o750, mtime=SEC - 50),
        (f_info, f_data),
        sym("d/link", "../elsewhere"),
        (h_info, h_data),
    )
    arena.apply(tar)
    t = arena.target
    st_f = (t / "d" / "f").lstat()
    assert (t / "d" / "f").read_bytes() == b"hello"
    assert stat.S_IMODE(st_f.st_mode) == 0o4755  # chmod after chown keeps set-id bits
    assert st_f.st_mtime_ns == SEC * NS + 123456789
    assert st_f.st_nlink == 2
    assert (t / "d" / "hard").lstat().st_ino == st_f.st_ino
    assert os.getxattr(t / "d" / "f", "user.note") == b"v\xff"
    assert os.readlink(t / "d" / "link") == "../elsewhere"
    st_d = (t / "d").lstat()
    assert stat.S_IMODE(st_d.st_mode) == 0o750
    assert st_d.st_mtime_ns == (SEC - 50) * NS  # set after its children were written
    if IS_ROOT:
        assert (st_f.st_uid, st_f.st_gid) == (1234, 4321)
    arena.assert_outside_unchanged()


def test_missing_parents_are_created_0755(arena: Arena) -> None:
    arena.apply(make_tar(reg("x/y/z", b"z")))
    assert stat.S_IMODE((arena.target / "x" / "y").stat().st_mode) == 0o755


def test_whiteouts_delete_files_and_whole_directories(arena: Arena) -> None:
    t = arena.target
    (t / "gone").write_bytes(b"1")
    (t / "tree" / "sub").mkdir(parents=True)
    (t / "tree" / "sub" / "f").write_bytes(b"2")
    (t / "keep").write_bytes(b"3")
    arena.apply(make_tar(reg(".wh.gone"), reg(".wh.tree"), reg("sub/.wh.missing")))
    assert sorted(p.name for p in t.iterdir()) == ["keep"]
    assert not (t / ".wh.gone").exists()


def test_whiteout_meta_entries_other_than_opaque_are_not_written(arena: Arena) -> None:
    arena.apply(make_tar(reg(".wh..wh.plnk"), reg("d/.wh..wh.aufs")))
    assert sorted(p.name for p in arena.target.iterdir()) == []


def test_opaque_directory_keeps_only_what_this_layer_unpacked(arena: Arena) -> None:
    t = arena.target
    (t / "d" / "sub").mkdir(parents=True)
    (t / "d" / "old").write_bytes(b"lower")
    (t / "d" / "sub" / "old2").write_bytes(b"lower")
    (t / "d" / "lowerdir" / "x").mkdir(parents=True)
    (t / "other").write_bytes(b"untouched")
    # The marker comes after siblings of this layer: they must survive it.
    arena.apply(
        make_tar(
            dir_("d"),
            reg("d/new", b"new"),
            reg("d/sub/kept", b"kept"),  # d/sub is an implicit parent: kept, emptied
            reg("d/.wh..wh..opq"),
        )
    )
    assert sorted(p.name for p in (t / "d").iterdir()) == ["new", "sub"]
    assert sorted(p.name for p in (t / "d" / "sub").iterdir()) == ["kept"]
    assert (t / "other").read_bytes() == b"untouched"


def test_opaque_marker_for_a_missing_directory_is_a_no_op(arena: Arena) -> None:
    arena.apply(make_tar(reg("nothere/.wh..wh..opq")))
    assert list(arena.target.iterdir()) == []


@pytest.mark.parametrize(
    ("existing", "entry", "check"),
    [
        ("file", dir_("p"), lambda p: p.is_dir() and not p.is_symlink()),
        ("dir", reg("p", b"now a file"), lambda p: p.read_bytes() == b"now a file"),
        ("dir", sym("p", "target"), lambda p: os.readlink(p) == "target"),
        ("symlink", reg("p", b"file"), lambda p: not p.is_symlink() and p.read_bytes() == b"file"),
        ("symlink", dir_("p"), lambda p: p.is_dir() and not p.is_symlink()),
    ],
    ids=["file->dir", "dir->file", "dir->symlink", "symlink->file", "symlink->dir"],
)
def test_an_entry_of_another_type_replaces_the_existing_one(
    arena: Arena,
    existing: str,
    entry: tuple[tarfile.TarInfo, bytes],
    check: Callable[[Path], bool],
) -> None:
    p = arena.target / "p"
    if existing == "file":
        p.write_bytes(b"old")
    elif existing == "dir":
        (p / "child").mkdir(parents=True)
    else:
        p.symlink_to(arena.outside)
    arena.apply(make_tar(entry))
    assert check(p)
    arena.assert_outside_unchanged()


def test_directory_over_directory_merges_and_updates_metadata(arena: Arena) -> None:
    (arena.target / "d").mkdir(mode=0o700)
    (arena.target / "d" / "old").write_bytes(b"old")
    arena.apply(make_tar(dir_("d", mode=0o711), reg("d/new", b"new")))
    assert sorted(p.name for p in (arena.target / "d").iterdir()) == ["new", "old"]
    assert stat.S_IMODE((arena.target / "d").stat().st_mode) == 0o711


def test_fifo_is_created(arena: Arena) -> None:
    info = tarfile.TarInfo("pipe")
    info.type = tarfile.FIFOTYPE
    info.mode = 0o640
    arena.apply(make_tar((info, b"")))
    st_ = (arena.target / "pipe").lstat()
    assert stat.S_ISFIFO(st_.st_mode)
    assert stat.S_IMODE(st_.st_mode) == 0o640


@pytest.mark.skipif(not IS_ROOT, reason="mknod of a real device needs CAP_MKNOD (root)")
def test_device_is_created_when_permitted(arena: Arena) -> None:
    arena.apply(make_tar(chardev("null", 1, 3)))
    st_ = (arena.target / "null").lstat()
    assert stat.S_ISCHR(st_.st_mode)
    assert (os.major(st_.st_rdev), os.minor(st_.st_rdev)) == (1, 3)


def test_pax_overlay_xattrs_are_ignored(arena: Arena, caplog: pytest.LogCaptureFixture) -> None:
    info, data = dir_("d")
    info.pax_headers = {
        "SCHILY.xattr.trusted.overlay.redirect": "/elsewhere",
        "SCHILY.xattr.user.overlay.opaque": "y",
    }
    with caplog.at_level(logging.WARNING, logger="refcache.storage._archive"):
        arena.apply(make_tar((info, data)))
    assert os.listxattr(arena.target / "d") == []
    assert "overlay xattr" in caplog.text


# --- overlay mode ---------------------------------------------------------------------------


@pytest.mark.skipif(not IS_ROOT, reason="trusted.overlay.* xattrs need CAP_SYS_ADMIN (root)")
def test_overlay_mode_writes_whiteout_devices_and_opaque_xattr(arena: Arena) -> None:
    upper = arena.target
    arena.apply(
        make_tar(reg(".wh.gone"), dir_("d"), reg("d/.wh..wh..opq"), reg("d/new", b"n")),
        overlay=True,
    )
    st_ = (upper / "gone").lstat()
    assert stat.S_ISCHR(st_.st_mode)
    assert st_.st_rdev == os.makedev(0, 0)
    assert os.getxattr(upper / "d", "trusted.overlay.opaque") == b"y"
    assert (upper / "d" / "new").read_bytes() == b"n"


def test_overlay_mode_with_userxattr_marks_opaque_dirs_with_user_xattr(arena: Arena) -> None:
    arena.apply(make_tar(dir_("d"), reg("d/.wh..wh..opq")), overlay=True, userxattr=True)
    assert os.getxattr(arena.target / "d", "user.overlay.opaque") == b"y"


@pytest.mark.skipif(not IS_ROOT, reason="copying lower ownership needs chown (root)")
def test_overlay_mode_copies_missing_parents_metadata_from_the_lower(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    (lower / "a" / "b").mkdir(parents=True)
    os.chmod(lower / "a", 0o711)
    os.chown(lower / "a", 77, 88)
    os.setxattr(lower / "a", "user.tag", b"lower")
    os.setxattr(lower / "a", "trusted.overlay.opaque", b"y")
    upper = tmp_path / "upper"
    upper.mkdir()
    apply_tar(
        io.BytesIO(make_tar(reg("a/b/f", b"f"))),
        upper,
        overlay=True,
        parents=[lower],
    )
    st_ = (upper / "a").lstat()
    assert stat.S_IMODE(st_.st_mode) == 0o711
    assert (st_.st_uid, st_.st_gid) == (77, 88)
    assert os.getxattr(upper / "a", "user.tag") == b"lower"
    # Copying the lower's opaque marker would hide the lower's own content.
    assert "trusted.overlay.opaque" not in os.listxattr(upper / "a")


# --------------------------------------------------------------------------------------------
# Hostile archives: nothing outside the target changes, and the documented outcome happens.


def test_hostile_dotdot_entry_is_rejected(arena: Arena) -> None:
    with pytest.raises(InvalidError, match=r"'\.\./escape'"):
        arena.apply(make_tar(reg("../escape", b"x")))
    assert not (arena.root / "escape").exists()
    arena.assert_outside_unchanged()


def test_hostile_nested_dotdot_breakout_is_rejected(arena: Arena) -> None:
    with pytest.raises(InvalidError, match=r"a/\.\./\.\./x"):
        arena.apply(make_tar(reg("a/../../x", b"x")))
    arena.assert_outside_unchanged()


def test_dotdot_that_stays_inside_is_cleaned(arena: Arena) -> None:
    arena.apply(make_tar(reg("a/../b", b"b")))
    assert (arena.target / "b").read_bytes() == b"b"
    assert not (arena.target / "a").exists()


def test_hostile_absolute_path_is_clamped_into_the_target(arena: Arena) -> None:
    arena.apply(make_tar(reg("/abs/path", b"x"), reg(str(arena.outside / "secret"), b"pwned")))
    assert (arena.target / "abs" / "path").read_bytes() == b"x"
    assert arena.clamped(arena.outside / "secret").read_bytes() == b"pwned"
    arena.assert_outside_unchanged()


def test_hostile_write_through_absolute_symlink_stays_inside(arena: Arena) -> None:
    arena.apply(make_tar(sym("evil", str(arena.outside)), reg("evil/pwned", b"pwned")))
    assert arena.clamped(arena.outside / "pwned").read_bytes() == b"pwned"
    assert os.readlink(arena.target / "evil") == str(arena.outside)
    arena.assert_outside_unchanged()


def test_hostile_relative_symlink_chain_escape_is_clamped(arena: Arena) -> None:
    # On the real file system l2 -> ../outside would reach <tmp>/outside.
    arena.apply(
        make_tar(
            sym("l1", "l2"),
            sym("l2", "../outside"),
            reg("l1/secret", b"pwned"),
            sym("up", "../../../../../../.."),
            reg("up/top", b"top"),
        )
    )
    assert (arena.target / "outside" / "secret").read_bytes() == b"pwned"
    assert (arena.target / "top").read_bytes() == b"top"
    arena.assert_outside_unchanged()


def test_hostile_symlink_as_final_component_is_replaced_not_written_through(
    arena: Arena,
) -> None:
    arena.apply(make_tar(sym("f", str(arena.outside / "secret")), reg("f", b"pwned")))
    assert not (arena.target / "f").is_symlink()
    assert (arena.target / "f").read_bytes() == b"pwned"
    arena.assert_outside_unchanged()


def test_hostile_hardlink_to_an_outside_file_is_rejected(arena: Arena) -> None:
    with pytest.raises(InvalidError, match="hardlink target"):
        arena.apply(make_tar(hard("h", str(arena.root / "passwd"))))
    with pytest.raises(InvalidError, match="climbs out"):
        arena.apply(make_tar(hard("h", "../passwd")))
    assert (arena.root / "passwd").stat().st_nlink == 1
    arena.assert_outside_unchanged()


def test_hostile_hardlink_through_a_symlink_is_rejected(arena: Arena) -> None:
    with pytest.raises(InvalidError, match="'h'"):
        arena.apply(make_tar(sym("s", str(arena.outside)), hard("h", "s/secret")))
    assert (arena.outside / "secret").stat().st_nlink == 1
    arena.assert_outside_unchanged()


def test_hostile_hardlink_to_a_symlink_links_the_symlink_itself(arena: Arena) -> None:
    arena.apply(make_tar(sym("s", str(arena.outside / "secret")), hard("h", "s"), reg("h", b"x")))
    assert os.readlink(arena.target / "s") == str(arena.outside / "secret")
    assert (arena.target / "h").read_bytes() == b"x"
    arena.assert_outside_unchanged()


def test_hostile_hardlink_to_a_directory_is_rejected(arena: Arena) -> None:
    with pytest.raises(InvalidError, match="is a directory"):
        arena.apply(make_tar(dir_("d"), hard("h", "d")))


@pytest.mark.parametrize("name", [".wh...", "../.wh.x", ".wh.", "a/.wh.."])
def test_hostile_whiteout_naming_a_parent_is_rejected(arena: Arena, name: str) -> None:
    (arena.target / "a").mkdir()
    with pytest.raises(InvalidError):
        arena.apply(make_tar(reg(name)))
    assert (arena.target / "a").is_dir()
    arena.assert_outside_unchanged()


def test_hostile_whiteout_through_a_symlink_to_outside_is_contained(arena: Arena) -> None:
    arena.apply(
        make_tar(
            sym("evil", str(arena.outside)),
            reg("evil/.wh.secret"),
            sym("rel", "../outside"),
            reg("rel/.wh.victim"),
            reg("rel/.wh..wh..opq"),
        )
    )
    assert (arena.outside / "secret").exists()
    arena.assert_outside_unchanged()


def test_hostile_nul_in_name_is_rejected(arena: Arena) -> None:
    info, data = reg("innocent", b"x")
    info.pax_headers = {"path": "a\x00b"}
    with pytest.raises(InvalidError, match="NUL"):
        arena.apply(make_tar((info, data)))
    assert list(arena.target.iterdir()) == []


def test_hostile_nul_in_symlink_target_is_rejected(arena: Arena) -> None:
    info, data = sym("s", "x")
    info.pax_headers = {"linkpath": "a\x00b"}
    with pytest.raises(InvalidError, match="NUL"):
        arena.apply(make_tar((info, data)))


def test_hostile_device_is_skipped_when_devices_are_not_allowed(
    arena: Arena, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="refcache.storage._archive"):
        arena.apply(make_tar(chardev("mem", 1, 1), reg("after", b"ok")), allow_devices=False)
    assert not (arena.target / "mem").exists()
    assert (arena.target / "after").read_bytes() == b"ok"
    assert "'mem' skipped" in caplog.text


@pytest.mark.skipif(IS_ROOT, reason="as root mknod is permitted; the flag test covers this")
def test_hostile_device_is_skipped_when_not_root(arena: Arena) -> None:
    arena.apply(make_tar(chardev("mem", 1, 1)))
    assert not (arena.target / "mem").exists()


def test_hostile_directory_replaced_by_symlink_then_written_through(arena: Arena) -> None:
    arena.apply(
        make_tar(
            dir_("d"),
            reg("d/f", b"first"),
            sym("d", str(arena.outside)),
            reg("d/pwned", b"pwned"),
            reg("d/victim/file", b"overwritten?"),
        )
    )
    assert (arena.target / "d").is_symlink()
    assert arena.clamped(arena.outside / "pwned").read_bytes() == b"pwned"
    assert arena.clamped(arena.outside / "victim" / "file").read_bytes() == b"overwritten?"
    arena.assert_outside_unchanged()


def test_hostile_absurd_size_is_rejected_before_writing(arena: Arena) -> None:
    info, _ = reg("huge")
    info.size = MAX_ENTRY_SIZE + 1
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(info)  # header only
    with pytest.raises(InvalidError, match="'huge'"):
        arena.apply(buf.getvalue())
    assert not (arena.target / "huge").exists()


def test_hostile_entry_larger_than_its_data_is_rejected(arena: Arena) -> None:
    info, _ = reg("short")
    info.size = 1 << 20
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(info)
    data = buf.getvalue()[:-2048] + b"only a little data"
    with pytest.raises(InvalidError):
        arena.apply(data)
    arena.assert_outside_unchanged()


def test_hostile_symlink_loop_is_rejected(arena: Arena) -> None:
    with pytest.raises(InvalidError, match="'a/x'"):
        arena.apply(make_tar(sym("a", "b"), sym("b", "a"), reg("a/x", b"x")))


def test_hostile_file_used_as_a_directory_is_rejected(arena: Arena) -> None:
    with pytest.raises(InvalidError, match="'f/x'"):
        arena.apply(make_tar(reg("f", b"f"), reg("f/x", b"x")))


def test_hostile_corrupt_header_in_the_middle_is_rejected(arena: Arena) -> None:
    tar = make_tar(reg("a", b"a"), reg("b", b"b"))
    broken = bytearray(tar)
    broken[1024 + 100 : 1024 + 108] = b"garbage!"  # second member's header: bad checksum
    with pytest.raises(InvalidError, match="invalid header"):
        arena.apply(bytes(broken))


def test_hostile_truncated_header_is_rejected(arena: Arena) -> None:
    tar = make_tar(reg("a", b"a"), reg("b", b"b"))
    with pytest.raises(InvalidError, match="truncated"):
        arena.apply(tar[: 1024 + 200])


def test_hostile_uid_out_of_range_is_rejected(arena: Arena) -> None:
    info, data = reg("f", b"x")
    info.pax_headers = {"uid": str(1 << 40)}
    with pytest.raises(InvalidError, match="uid"):
        arena.apply(make_tar((info, data)))


def test_entry_resolving_to_the_root_is_skipped(arena: Arena) -> None:
    before = arena.target.stat()
    arena.apply(make_tar(dir_("./", mode=0o701), dir_("/", mode=0o701), reg("f", b"f")))
    assert stat.S_IMODE(arena.target.stat().st_mode) == stat.S_IMODE(before.st_mode)
    assert (arena.target / "f").read_bytes() == b"f"


# --------------------------------------------------------------------------------------------
# Diffing


def clone(src: Path, dst: Path) -> None:
    """Copies a tree keeping modes, owners, times, xattrs and hardlinks (``cp -a``)."""
    subprocess.run(["cp", "-a", f"{src}/.", str(dst)], check=True)


def diff_entries(lower: Path | None, upper: Path) -> list[tarfile.TarInfo]:
    buf = io.BytesIO()
    write_diff(lower, upper, buf)
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="r") as tf:
        return tf.getmembers()


def test_diff_against_empty_lists_everything_depth_first_with_slash_first(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "a" / "b").mkdir(parents=True)
    (upper / "a-b").write_bytes(b"1")
    (upper / "a" / "b" / "c").write_bytes(b"2")
    (upper / "a0").symlink_to("a")
    names = [m.name for m in diff_entries(None, upper)]
    assert names == ["a", "a/b", "a/b/c", "a-b", "a0"]


def test_diff_of_identical_trees_is_empty(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    (lower / "d").mkdir(parents=True)
    (lower / "d" / "f").write_bytes(b"same")
    upper = tmp_path / "upper"
    upper.mkdir()
    clone(lower, upper)
    assert diff_entries(lower, upper) == []


def test_deleted_directory_gives_one_whiteout_with_epoch_time(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    (lower / "d" / "gone" / "deep").mkdir(parents=True)
    (lower / "d" / "gone" / "deep" / "f").write_bytes(b"x")
    upper = tmp_path / "upper"
    (upper / "d").mkdir(parents=True)
    os.utime(upper / "d", ns=(0, (lower / "d").stat().st_mtime_ns))
    entries = diff_entries(lower, upper)
    assert [m.name for m in entries] == ["d", "d/.wh.gone"]
    whiteout = entries[1]
    assert (whiteout.type, whiteout.size, whiteout.mode, whiteout.mtime) == (
        tarfile.REGTYPE,
        0,
        0,
        0,
    )


def test_parents_of_changes_are_written_once_with_their_metadata(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    (lower / "p" / "q").mkdir(parents=True)
    (lower / "p" / "q" / "f").write_bytes(b"old")
    (lower / "p" / "q" / "g").write_bytes(b"old")
    upper = tmp_path / "upper"
    upper.mkdir()
    clone(lower, upper)
    (upper / "p" / "q" / "f").write_bytes(b"new!")
    (upper / "p" / "q" / "g").write_bytes(b"new!")
    os.chmod(upper / "p", 0o701)
    entries = diff_entries(lower, upper)
    assert [m.name for m in entries] == ["p", "p/q", "p/q/f", "p/q/g"]
    assert entries[0].mode == 0o701


def test_same_size_and_second_mtime_with_zero_nanoseconds_compares_content(
    tmp_path: Path,
) -> None:
    lower = tmp_path / "lower"
    upper = tmp_path / "upper"
    for root, data in ((lower, b"aaaa"), (upper, b"bbbb")):
        root.mkdir()
        for name in ("truncated", "precise"):
            (root / name).write_bytes(data)
        os.utime(root / "truncated", ns=(SEC * NS, SEC * NS))
        os.utime(root / "precise", ns=(SEC * NS + 5, SEC * NS + 5))
        os.utime(root, ns=(SEC * NS, SEC * NS))
    # continuity: zero nanoseconds on both sides -> compare bytes; equal non-zero ns -> same.
    assert [m.name for m in diff_entries(lower, upper)] == ["truncated"]


def test_mode_owner_and_xattr_changes_are_detected(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    for name in ("mode", "xattr", "same"):
        (lower / name).write_bytes(b"x")
    upper = tmp_path / "upper"
    upper.mkdir()
    clone(lower, upper)
    os.chmod(upper / "mode", 0o600)
    os.setxattr(upper / "xattr", "user.k", b"v")
    os.utime(upper, ns=(0, lower.stat().st_mtime_ns))
    entries = diff_entries(lower, upper)
    assert [m.name for m in entries] == ["mode", "xattr"]
    assert entries[1].pax_headers["SCHILY.xattr.user.k"] == "v"


def test_hardlinks_are_written_as_tar_links(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "base").write_bytes(b"base")
    upper = tmp_path / "upper"
    upper.mkdir()
    clone(lower, upper)
    (upper / "n1").write_bytes(b"new")
    os.link(upper / "n1", upper / "n2")
    os.link(upper / "base", upper / "z-link-to-unchanged")
    entries = {m.name: m for m in diff_entries(lower, upper)}
    assert sorted(entries) == ["n1", "n2", "z-link-to-unchanged"]
    assert entries["n1"].isreg()
    assert (entries["n2"].islnk(), entries["n2"].linkname) == (True, "n1")
    z = entries["z-link-to-unchanged"]
    assert (z.islnk(), z.linkname) == (True, "base")

    target = tmp_path / "applied"
    target.mkdir()
    clone(lower, target)
    buf = io.BytesIO()
    write_diff(lower, upper, buf)
    apply_tar(io.BytesIO(buf.getvalue()), target)
    assert (target / "n1").stat().st_ino == (target / "n2").stat().st_ino
    assert (target / "base").stat().st_ino == (target / "z-link-to-unchanged").stat().st_ino


def test_diff_is_deterministic(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "d").mkdir(parents=True)
    for i in range(20):
        (upper / "d" / f"f{i}").write_bytes(os.urandom(100))
    outs = []
    for _ in range(2):
        buf = io.BytesIO()
        write_diff(None, upper, buf)
        outs.append(buf.getvalue())
    assert outs[0] == outs[1]


def test_sockets_are_not_written(tmp_path: Path) -> None:
    import socket

    upper = tmp_path / "u"
    upper.mkdir()
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(upper / "sock"))
        (upper / "f").write_bytes(b"f")
        assert [m.name for m in diff_entries(None, upper)] == ["f"]
    finally:
        sock.close()


# --- hypothesis round trip ------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c", "d-e", "ü"])
MTIMES = st.builds(
    lambda s, ns: (SEC + s) * NS + ns,
    st.integers(0, 3),
    st.sampled_from([0, 0, 1, 123_456_789]),
)
FILES = st.tuples(
    st.just("file"),
    st.binary(max_size=48),
    st.sampled_from([0o644, 0o600, 0o755, 0o444, 0o4755]),
    MTIMES,
    st.sampled_from([(0, 0), (1000, 1000)]),
)
SYMLINKS = st.tuples(st.just("symlink"), st.sampled_from(["a", "../b", "/abs/x", "c/d"]), MTIMES)


def _dirs(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.tuples(
        st.just("dir"),
        st.sampled_from([0o755, 0o700, 0o750]),
        MTIMES,
        st.dictionaries(NAMES, children, max_size=3),
    )


NODES = st.recursive(st.one_of(FILES, SYMLINKS), _dirs, max_leaves=6)
TREES = st.dictionaries(NAMES, NODES, max_size=4)


def build(root: Path, spec: dict[str, Any]) -> None:
    for name, node in spec.items():
        path = root / name
        kind = node[0]
        if kind == "file":
            _, data, mode, mtime, (uid, gid) = node
            path.write_bytes(data)
            if IS_ROOT:
                os.chown(path, uid, gid)
            os.chmod(path, mode)
            os.utime(path, ns=(mtime, mtime))
        elif kind == "symlink":
            _, target, mtime = node
            path.symlink_to(target)
            os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
        else:
            _, mode, mtime, children = node
            path.mkdir()
            build(path, children)
            os.chmod(path, mode)
            os.utime(path, ns=(mtime, mtime))


def avoid_indistinguishable_rewrites(lower: Path, upper: Path) -> None:
    # continuity's documented trade-off: same size and the same non-zero-nanosecond mtime
    # means "unchanged". A real rewrite moves the mtime; model that.
    for dirpath, _, filenames in os.walk(upper):
        for name in filenames:
            up = Path(dirpath) / name
            lo = lower / up.relative_to(upper)
            if up.is_symlink() or not lo.is_file() or lo.is_symlink():
                continue
            su, sl = up.lstat(), lo.lstat()
            if (
                su.st_size == sl.st_size
                and su.st_mtime_ns == sl.st_mtime_ns
                and su.st_mtime_ns % NS
                and up.read_bytes() != lo.read_bytes()
            ):
                os.utime(up, ns=(su.st_mtime_ns + 1, su.st_mtime_ns + 1))


def observable(root: Path) -> dict[str, tuple[Any, ...]]:
    out = {}
    for rel, (mode, uid, _nlink, _size, mtime, extra) in tree_state(root).items():
        perm = None if stat.S_ISLNK(mode) else stat.S_IMODE(mode)
        out[rel] = (stat.S_IFMT(mode), perm, uid if IS_ROOT else None, mtime, extra)
    return out


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(spec_a=TREES, spec_b=TREES)
def test_applying_the_diff_of_a_to_b_onto_a_gives_b(
    spec_a: dict[str, Any], spec_b: dict[str, Any]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        lower, upper = base / "A", base / "B"
        lower.mkdir()
        upper.mkdir()
        build(lower, spec_a)
        build(upper, spec_b)
        avoid_indistinguishable_rewrites(lower, upper)
        expected = observable(upper)
        for compression in ("uncompressed", "gzip", "zstd"):
            blob = io.BytesIO()
            writer = compressed_writer(blob, compression)
            write_diff(lower, upper, writer)
            writer.close()
            target = base / f"C-{compression}"
            target.mkdir()
            build(target, spec_a)
            apply_tar(decompressed_stream(io.BytesIO(blob.getvalue())), target)
            assert observable(target) == expected, compression
