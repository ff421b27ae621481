"""Performing containerd-style mounts locally, and BuildKit's read-only mount rewriting.

A snapshotter returns mount *descriptions* (:class:`~storage._types.Mount`). Code that needs the
files uses :func:`local_mount`, BuildKit's ``LocalMounter`` (``snapshot/localmounter_linux.go``):

* a single bind mount (the native snapshotter, or an overlay snapshot without parents) is used
  in place: the context yields ``Path(source)`` and no syscall happens. BuildKit performs a real
  mount for a read-only bind; here ``ro`` is a contract of the API instead (see "Where the
  snapshotters differ" in docs/STORAGE.md), which keeps the native backend usable without mount
  privileges;
* anything else (an overlay, several mounts, a mount with a ``target``) is really mounted with
  ``mount(2)`` (through ``ctypes``; the ``mount`` command when libc cannot be used) into a fresh
  temporary directory and unmounted when the context exits (lazily, ``MNT_DETACH``, when the
  body raised or a plain unmount fails).

Where the temporary directory goes: a cache mounts under ``<root>/mounts/`` (private, mode
0700), never in the system temp dir. A process killed while a mount is in place leaves it
there, where the next ``open_cache`` (or ``storage.repair``) finds it in
``/proc/self/mountinfo`` and unmounts it (:func:`stale_mounts`, :func:`clean_mount_dir`), and
``storage.check`` reports it meanwhile.

Long overlay ``lowerdir`` lists do not fit in ``mount(2)``'s one-page data argument. Like
containerd's ``compactLowerdirOption`` the common directory of the lower dirs is factored out
and the mount runs from a helper process whose working directory is that common directory, so
the lower dirs can be given as short relative paths (the 128-layer case of containerd's
snapshot testsuite).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path

from ._errors import FailedPreconditionError, InvalidError, RefcacheError
from ._layout import make_private_dir
from ._tree import remove_tree
from ._types import Mount

__all__ = [
    "MOUNTS_DIR",
    "clean_mount_dir",
    "in_user_namespace",
    "is_overlay_mount",
    "local_mount",
    "mount_all",
    "overlay_options",
    "probe_overlay",
    "readonly_mounts",
    "stale_mounts",
    "unmount",
]

#: The directory under a cache root that holds its temporary mount points.
MOUNTS_DIR = "mounts"

logger = logging.getLogger(__name__)

# <linux/mount.h> flags (containerd mount_linux.go parseMountOptions uses the same table).
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 0x2

#: option -> (clear?, flag); everything else is passed to the filesystem as data.
_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
}
_PROPAGATION: dict[str, int] = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
}

# mount(2) copies at most one page of data; containerd keeps 512 bytes of headroom.
_MAX_DATA = os.sysconf("SC_PAGE_SIZE") - 512 if hasattr(os, "sysconf") else 3584

# Runs in a helper process whose cwd is the common lowerdir parent (see module docstring).
_HELPER = """
import ctypes, ctypes.util, os, sys
libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
rc = libc.mount(b"overlay", os.fsencode(sys.argv[1]), b"overlay", int(sys.argv[2]),
                os.fsencode(sys.argv[3]))
if rc != 0:
    e = ctypes.get_errno()
    sys.stderr.write(os.strerror(e))
    sys.exit(100 + e)
"""


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()


def is_overlay_mount(mount: Mount) -> bool:
    """Tells whether ``mount`` is an overlay (BuildKit ``overlay.IsOverlayMountType``).

    ``fuse-overlayfs`` mounts (type ``fuse3.fuse-overlayfs``) count as overlays too.
    """
    return mount.type == "overlay" or mount.type.endswith("overlayfs")


def _readonly_overlay(options: Sequence[str]) -> tuple[str, ...]:
    # refs.go readonlyOverlay: drop workdir, move upperdir to the front of lowerdir.
    out: list[str] = []
    upper = ""
    for opt in options:
        if opt.startswith("upperdir="):
            upper = opt.removeprefix("upperdir=")
        elif not opt.startswith("workdir="):
            out.append(opt)
    if upper:
        for i, opt in enumerate(out):
            if opt.startswith("lowerdir="):
                out[i] = "lowerdir=" + upper + ":" + opt.removeprefix("lowerdir=")
    return tuple(out)


def readonly_mounts(mounts: Sequence[Mount]) -> list[Mount]:
    """Rewrites mounts to read-only ones, as BuildKit's ``setReadonly`` does (refs.go).

    Overlays lose ``workdir=`` and their ``upperdir=`` becomes the first ``lowerdir=`` entry;
    every other mount loses ``rw`` and gains ``ro`` (once).

    Args:
        mounts: The mounts to rewrite (not changed).

    Returns:
        New :class:`Mount` values.

    Raises:
        InvalidError: An element is not a :class:`Mount`.
    """
    out: list[Mount] = []
    for mount in _check_mounts(mounts):
        if is_overlay_mount(mount):
            options = _readonly_overlay(mount.options)
        else:
            kept = [opt for opt in mount.options if opt != "rw"]
            if "ro" not in kept:
                kept.append("ro")
            options = tuple(kept)
        out.append(Mount(mount.type, mount.source, options, mount.target))
    return out


def _check_mounts(mounts: Sequence[Mount]) -> list[Mount]:
    if isinstance(mounts, (str, bytes, Mount)):
        msg = f"expected a sequence of Mount, got {mounts!r}"
        raise InvalidError(msg)
    try:
        items = list(mounts)
    except TypeError as exc:
        msg = f"expected a sequence of Mount, got {mounts!r}"
        raise InvalidError(msg) from exc
    for item in items:
        if not isinstance(item, Mount):
            msg = f"expected a Mount, got {item!r}"
            raise InvalidError(msg)
    return items


def _parse_options(options: Sequence[str]) -> tuple[int, int, list[str]]:
    flags = 0
    propagation = 0
    data: list[str] = []
    for opt in options:
        if opt in _FLAGS:
            clear, flag = _FLAGS[opt]
            flags = flags & ~flag if clear else flags | flag
        elif opt in _PROPAGATION:
            propagation |= _PROPAGATION[opt]
        else:
            data.append(opt)
    return flags, propagation, data


def _compact_lowerdir(data: list[str]) -> tuple[str, list[str]]:
    """containerd ``compactLowerdirOption``: common parent dir + relative lowerdirs."""
    idx = next((i for i, opt in enumerate(data) if opt.startswith("lowerdir=")), -1)
    if idx < 0:
        return "", data
    dirs = data[idx].removeprefix("lowerdir=").split(":")
    if len(dirs) <= 1:
        return "", data
    common = os.path.commonpath(dirs)
    # The common path of "<root>/1/fs" and "<root>/2/fs" is "<root>"; the lowers become "1/fs".
    if common in ("", "/"):
        return "", data
    relative = [os.path.relpath(d, common) for d in dirs]
    out = list(data)
    out[idx] = "lowerdir=" + ":".join(relative)
    return common, out


def _raise_mount_error(what: str, err: int, detail: str = "") -> None:
    reason = detail or os.strerror(err)
    msg = f"cannot mount {what}: {reason} (errno {err})"
    if err in (errno.EPERM, errno.EACCES):
        raise FailedPreconditionError(msg)
    raise RefcacheError(msg)


def _sys_mount(source: str, target: Path, fstype: str, flags: int, data: str) -> None:
    what = f"{fstype} {source!r} on {target}"
    if _LIBC is not None:
        rc = _LIBC.mount(
            os.fsencode(source),
            os.fsencode(str(target)),
            os.fsencode(fstype) if fstype else None,
            flags,
            os.fsencode(data) if data else None,
        )
        if rc != 0:
            _raise_mount_error(what, ctypes.get_errno())
        return
    # No usable libc (unusual platforms): fall back to mount(8).
    argv = ["mount"]
    if fstype and not flags & (MS_BIND | MS_REMOUNT):
        argv += ["-t", fstype]
    opts = [opt for opt, (clear, flag) in _FLAGS.items() if not clear and flag and flags & flag]
    if flags & MS_BIND and flags & MS_REC:
        opts = [o for o in opts if o not in ("bind",)]
    if data:
        opts.append(data)
    if opts:
        argv += ["-o", ",".join(opts)]
    argv += [source, str(target)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as exc:
        msg = f"cannot mount {what}: neither libc mount(2) nor the mount command is usable"
        raise FailedPreconditionError(msg) from exc
    if proc.returncode != 0:
        msg = f"cannot mount {what}: mount exited {proc.returncode}: {proc.stderr.strip()}"
        raise FailedPreconditionError(msg)


def _mount_overlay_long(target: Path, flags: int, data: list[str], source: str) -> None:
    cwd, compact = _compact_lowerdir(data)
    joined = ",".join(compact)
    if not cwd or len(joined) > _MAX_DATA:
        msg = (
            f"cannot mount overlay {source!r} on {target}: options are {len(joined)} bytes, "
            f"more than mount(2) accepts ({_MAX_DATA}) even with relative lowerdirs"
        )
        raise InvalidError(msg)
    # chdir is process-wide, so the mount runs in a child whose cwd is the common dir:
    # mount(8) when there is one (it passes the options through as they are), else Python.
    mount_cmd = shutil.which("mount")
    if mount_cmd is not None and not flags & ~(MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC):
        extra = [opt for opt, (clear, flag) in _FLAGS.items() if not clear and flag & flags]
        argv = [mount_cmd, "-t", "overlay", "-o", ",".join([*extra, joined]), source, str(target)]
    else:
        argv = [sys.executable, "-c", _HELPER, str(target), str(flags), joined]
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        err = proc.returncode - 100 if proc.returncode > 100 else errno.EIO
        _raise_mount_error(f"overlay {source!r} on {target}", err, proc.stderr.strip())


def _single_lower_as_bind(mount: Mount) -> Mount:
    # The kernel refuses an overlay of one lowerdir and no upperdir (EINVAL); its content is
    # exactly that dir, so a read-only bind is equivalent (containerd's View of one parent).
    if mount.type != "overlay" or any(o.startswith("upperdir=") for o in mount.options):
        return mount
    lowers = [o.removeprefix("lowerdir=") for o in mount.options if o.startswith("lowerdir=")]
    if len(lowers) != 1 or ":" in lowers[0]:
        return mount
    return Mount("bind", lowers[0], ("rbind", "ro"), mount.target)


def _mount_one(mount: Mount, target: Path) -> None:
    mount = _single_lower_as_bind(mount)
    flags, propagation, data = _parse_options(mount.options)
    if mount.type == "bind":
        flags |= MS_BIND
    joined = ",".join(data)
    if is_overlay_mount(mount) and mount.type == "overlay" and len(joined) > _MAX_DATA:
        _mount_overlay_long(target, flags, data, mount.source)
    else:
        _sys_mount(mount.source, target, mount.type, flags & ~MS_REMOUNT, joined)
    if flags & MS_BIND and flags & MS_RDONLY:
        # A bind mount ignores MS_RDONLY on the first call: remount (containerd does the same).
        try:
            _sys_mount("", target, "", MS_REMOUNT | MS_BIND | MS_RDONLY | (flags & MS_REC), "")
        except RefcacheError:
            unmount(target, lazy=True)
            raise
    if propagation:
        _sys_mount("", target, "", propagation, "")


def unmount(target: str | os.PathLike[str], *, lazy: bool = False) -> None:
    """Unmounts ``target`` (``umount2``; lazily with ``MNT_DETACH`` when asked or when busy).

    Raises:
        RefcacheError: The unmount failed.
    """
    path = os.fspath(target)
    if _LIBC is not None:
        rc = _LIBC.umount2(os.fsencode(path), MNT_DETACH if lazy else 0)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EBUSY and not lazy:
            unmount(path, lazy=True)
            return
        msg = f"cannot unmount {path}: {os.strerror(err)} (errno {err})"
        raise RefcacheError(msg)
    argv = ["umount", "-l", path] if lazy else ["umount", path]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as exc:
        msg = f"cannot unmount {path}: the umount command is not usable"
        raise RefcacheError(msg) from exc
    if proc.returncode != 0:
        if not lazy:
            unmount(path, lazy=True)
            return
        msg = f"cannot unmount {path}: {proc.stderr.strip()}"
        raise RefcacheError(msg)


def _target_in(root: Path, target: str) -> Path:
    if not target:
        return root
    rel = os.path.normpath(target.lstrip("/"))
    if rel == ".." or rel.startswith("../"):
        msg = f"mount target {target!r} escapes the mount root {root}"
        raise InvalidError(msg)
    return root / rel


def mount_all(mounts: Sequence[Mount], root: str | os.PathLike[str]) -> None:
    """Mounts every mount on ``root`` (or ``root/<target>``), in order (containerd ``mount.All``).

    On failure the mounts already made are lazily unmounted again.

    Raises:
        InvalidError: Bad mount values or a target escaping ``root``.
        FailedPreconditionError: Not permitted to mount.
        RefcacheError: Any other mount failure.
    """
    base = Path(root)
    done: list[Path] = []
    try:
        for mount in _check_mounts(mounts):
            target = _target_in(base, mount.target)
            _mount_one(mount, target)
            done.append(target)
    except BaseException:
        for target in reversed(done):
            with suppress(RefcacheError):
                unmount(target, lazy=True)
        raise


@contextmanager
def _local_mount(
    mounts: Sequence[Mount], readonly: bool | None, tmp_root: str | os.PathLike[str] | None
) -> Iterator[Path]:
    items = _check_mounts(mounts)
    if not items:
        msg = "local_mount needs at least one mount"
        raise InvalidError(msg)
    if readonly:
        items = readonly_mounts(items)
    if len(items) == 1 and items[0].type == "bind" and not items[0].target:
        # BuildKit LocalMounter shortcut: a bind mount is its source directory.
        yield Path(items[0].source)
        return
    if tmp_root is not None:
        try:
            make_private_dir(Path(tmp_root), parents=True)
        except OSError as exc:
            msg = f"cannot make the mount directory {tmp_root}: {exc.strerror}"
            raise RefcacheError(msg) from exc
    tmp = Path(tempfile.mkdtemp(prefix="mount-", dir=tmp_root))
    try:
        mount_all(items, tmp)
    except BaseException:
        with suppress(OSError):
            remove_tree(tmp)
        raise
    targets = [_target_in(tmp, m.target) for m in items]
    failed = False
    try:
        yield tmp
    except BaseException:
        failed = True
        raise
    finally:
        # Lazy on error: a process still holding files open must not keep us from going on.
        for target in reversed(targets):
            try:
                unmount(target, lazy=failed)
            except RefcacheError:
                if not failed:
                    raise
        try:
            tmp.rmdir()
        except OSError:
            if not failed:
                raise


def local_mount(
    mounts: Sequence[Mount],
    *,
    readonly: bool | None = None,
    tmp_root: str | os.PathLike[str] | None = None,
) -> AbstractContextManager[Path]:
    """Makes ``mounts`` available as a local directory for the duration of a ``with`` block.

    Args:
        mounts: Mount descriptions, as a snapshotter's ``mounts``/``prepare``/``view`` return.
        readonly: ``True`` rewrites them with :func:`readonly_mounts` first; ``None`` or
            ``False`` uses them as given.
        tmp_root: Where the temporary mount point is made (created 0700 when missing); a
            cache passes ``<root>/mounts`` so that a mount left by a killed process is found
            and removed at the next open. The system temp dir when ``None``.

    Returns:
        A context manager yielding the directory. A single bind mount yields its source itself
        (no syscall; ``ro`` is then a contract, not enforced); anything else is mounted into a
        temporary directory that is unmounted (lazily when the body raised) and removed on exit.

    Raises:
        InvalidError: ``mounts`` is empty or not a sequence of :class:`Mount`.
        FailedPreconditionError: This process may not mount.
        RefcacheError: Any other mount or unmount failure.
    """
    return _local_mount(mounts, readonly, tmp_root)


def in_user_namespace() -> bool:
    """Tells whether this process runs in a user namespace (not the initial uid map)."""
    try:
        text = Path("/proc/self/uid_map").read_text()
    except OSError:
        return False
    fields = text.split()
    return fields[:3] != ["0", "0", "4294967295"]


def overlay_options() -> tuple[str, ...]:
    """Options containerd's overlay snapshotter appends to every overlay mount.

    ``index=off`` when the kernel has the ``index`` parameter, and ``userxattr`` inside a user
    namespace (containerd ``NeedsUserXAttr``; kernels >= 5.11).
    """
    opts: list[str] = []
    if Path("/sys/module/overlay/parameters/index").exists():
        opts.append("index=off")
    if in_user_namespace():
        opts.append("userxattr")
    return tuple(opts)


def probe_overlay(root: str | os.PathLike[str]) -> str | None:
    """Checks that an overlay mount works under ``root`` (BuildKit's ``auto`` probe).

    Makes two lower dirs, an upper and a work dir in a temporary directory under
    ``root/mounts`` (where a probe left by a killed process is cleaned up like any other
    mount), mounts an overlay, reads a lower file through it, writes one, and unmounts.

    Args:
        root: A directory on the filesystem the overlay snapshots will live on (created when
            missing).

    Returns:
        ``None`` when the test mount works, else the reason why not.
    """
    if not sys.platform.startswith("linux"):
        return f"overlayfs needs Linux (platform {sys.platform})"
    try:
        make_private_dir(Path(root), parents=True)
        mounts = Path(root) / MOUNTS_DIR
        make_private_dir(mounts)
        tmp = Path(tempfile.mkdtemp(prefix="check-overlayfs-support", dir=mounts))
    except OSError as exc:
        return f"cannot make a probe directory under {root}: {exc}"
    merged = tmp / "merged"
    try:
        for name in ("lower1", "lower2", "upper", "work", "merged"):
            (tmp / name).mkdir()
        (tmp / "lower2" / "probe").write_bytes(b"ok")
        options = (
            "workdir=" + str(tmp / "work"),
            "upperdir=" + str(tmp / "upper"),
            "lowerdir=" + str(tmp / "lower2") + ":" + str(tmp / "lower1"),
            *overlay_options(),
        )
        try:
            mount_all([Mount("overlay", "overlay", options)], merged)
        except RefcacheError as exc:
            return str(exc)
        try:
            if (merged / "probe").read_bytes() != b"ok":
                return "overlay probe mount does not show its lower dir's file"
            (merged / "written").write_bytes(b"ok")
        finally:
            unmount(merged, lazy=True)
        if not (tmp / "upper" / "written").exists():
            return "overlay probe mount did not write to its upper dir"
        return None
    except (OSError, RefcacheError) as exc:
        return f"overlay probe under {root} failed: {exc}"
    finally:
        with suppress(OSError):
            remove_tree(tmp)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def stale_mounts(directory: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below ``directory`` in this process's mount namespace.

    Read from ``/proc/self/mountinfo``; deepest first (the order to unmount them in). Empty
    when ``/proc`` is not there.
    """
    base = os.path.realpath(directory)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found: list[str] = []
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        point = _unescape(fields[4])
        if point == base or point.startswith(base + "/"):
            found.append(point)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


def clean_mount_dir(directory: str | os.PathLike[str]) -> list[str]:
    """Unmounts what is mounted under ``directory`` and removes what is left in it.

    For ``<root>/mounts`` of a cache nobody has open (the caller holds its lock): every
    mount there was left by a process that died. Unmounts are lazy (``MNT_DETACH``): a
    process still using files there keeps them, nothing new can reach them. Entries that are
    still mount points after that are left alone (removal never reaches through a mount).

    Returns:
        One line per mount or directory removed.
    """
    done: list[str] = []
    base = Path(directory)
    for point in stale_mounts(base):
        if os.path.realpath(point) == os.path.realpath(base):
            continue
        try:
            unmount(point, lazy=True)
        except RefcacheError as exc:
            logger.warning("cannot unmount stale mount %s: %s", point, exc)
            continue
        done.append(f"unmounted stale mount {point}")
    try:
        names = sorted(os.listdir(base))
    except (FileNotFoundError, NotADirectoryError):
        return done
    busy = set(stale_mounts(base))
    real = os.path.realpath(base)
    for name in names:
        path = base / name
        inside = os.path.join(real, name)
        if any(p == inside or p.startswith(inside + "/") for p in busy):
            continue
        try:
            remove_tree(path)
        except OSError as exc:
            logger.warning("cannot remove leftover mount directory %s: %s", path, exc)
            continue
        done.append(f"removed leftover mount directory {path}")
    return done
