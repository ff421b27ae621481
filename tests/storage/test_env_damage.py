"""Damaged disks and hostile file systems under the metadata (issue 11, defects 5 and 7).

LMDB maps ``data.mdb``; a truncated file used to kill the process with ``SIGBUS`` and broken
pages leaked raw ``lmdb`` errors. The fuzz runs every damaged variant of a real cache in its
own subprocess (with a timeout): a signal there fails the test instead of killing pytest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from refcache.actors import (
    CorruptedError,
    PermissionDeniedError,
    StoreFullError,
    open_cache,
)
from refcache.actors._cli import main as cli_main
from refcache.storage import MetaEnv, Mount, check
from refcache.storage._env import check_data_file
from refcache.storage._mount import mount_all, unmount

WAIT = 30.0
PAGE = 4096


def make_cache(root: Path, records: int = 30) -> None:
    """A real closed cache with committed records (a few dozen metadata pages)."""
    with open_cache(root, snapshotter="native", timeout=WAIT) as cache:
        for i in range(records):
            mutable = cache.manager.new(description=f"record {i} " + "x" * 200).get(timeout=WAIT)
            with mutable.mount().local() as path:
                (path / "f").write_text(str(i))
            ref = mutable.commit()
            ref.finalize()
            ref.release()


# -- the header check (never maps the file: safe in this process) ----------------------------


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    root = tmp_path_factory.mktemp("sample") / "cache"
    make_cache(root)
    return (root / "meta" / "data.mdb").read_bytes()


def _damaged(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "data.mdb"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("cut", "why"),
    [
        (0, "empty"),
        (1, "not an LMDB data file"),
        (100, "meta page 0 is truncated"),
        (PAGE, "meta page 1 is truncated"),
        (2 * PAGE, "it was truncated"),
        (-1, "it was truncated"),
    ],
)
def test_a_truncated_data_file_is_refused_before_it_is_mapped(
    tmp_path: Path, sample: bytes, cut: int, why: str
) -> None:
    path = _damaged(tmp_path, sample[:cut])
    with pytest.raises(CorruptedError, match=why) as caught:
        check_data_file(path, full=False)
    assert str(path) in str(caught.value)


def test_garbage_magic_and_a_foreign_version_are_refused(tmp_path: Path, sample: bytes) -> None:
    for offset, value, why in ((16, 0x12345678, "not an LMDB data file"), (20, 7, "version 7")):
        data = bytearray(sample)
        struct.pack_into("=I", data, offset, value)
        if offset == 20:  # both meta pages, or the other one is used
            struct.pack_into("=I", data, PAGE + offset, value)
        with pytest.raises(CorruptedError, match=why):
            check_data_file(_damaged(tmp_path, bytes(data)), full=False)


def test_a_broken_page_is_found_by_the_full_check(tmp_path: Path, sample: bytes) -> None:
    data = bytearray(sample)
    # Every committed page after the two meta pages: break each one's page number in turn
    # until the verifier sees one that is reachable.
    found: list[str] = []
    for page in range(2, len(sample) // PAGE):
        broken = bytearray(data)
        struct.pack_into("=Q", broken, page * PAGE, 0xDEAD_BEEF)
        path = _damaged(tmp_path, bytes(broken))
        check_data_file(path, full=False)  # the header is fine
        try:
            check_data_file(path, full=True)
        except CorruptedError as exc:
            found.append(str(exc))
            break
    assert found
    assert "damaged" in found[0]


# -- the fuzz: real opens of damaged caches, each in its own process --------------------------

_PROBE = """
import json, sys
from pathlib import Path
from refcache import RefcacheError, open_cache
from refcache.actors._offline import offline_usage
from refcache.storage import check

root = Path(sys.argv[1])
out = {}
for what in ("open", "check", "du"):
    try:
        if what == "open":
            with open_cache(root, snapshotter="native", timeout=30) as cache:
                cache.manager.disk_usage().get(timeout=30)
                cache.manager.prune().get(timeout=30)
            out[what] = "ok"
        elif what == "check":
            out[what] = "problems" if check(root) else "ok"
        else:
            offline_usage(root)
            out[what] = "ok"
    except RefcacheError as exc:
        out[what] = type(exc).__name__
print(json.dumps(out))
"""


def _variants(data: bytes) -> Iterator[tuple[str, bytes]]:
    size = len(data)
    for cut in (0, 1, 100, PAGE, PAGE + 1, 2 * PAGE, size // 2, size - PAGE, size - 1):
        yield f"truncated to {cut}", data[:cut]
    rng = random.Random(11)
    pages = size // PAGE
    for _ in range(8):
        page = rng.randrange(2, pages)
        broken = bytearray(data)
        broken[page * PAGE : (page + 1) * PAGE] = rng.randbytes(PAGE)
        yield f"page {page} overwritten", bytes(broken)
    for _ in range(6):
        page = rng.randrange(2, pages)
        broken = bytearray(data)
        for _ in range(16):
            broken[page * PAGE + rng.randrange(64)] = rng.randrange(256)
        yield f"page {page} header scribbled", bytes(broken)
    broken = bytearray(data)
    broken[PAGE : 2 * PAGE] = rng.randbytes(PAGE)
    yield "meta page 1 overwritten", bytes(broken)


@pytest.mark.slow
def test_fuzz_damaged_metadata_never_kills_the_process(tmp_path: Path) -> None:
    base = tmp_path / "base"
    make_cache(base)
    data = (base / "meta" / "data.mdb").read_bytes()
    outcomes: dict[str, dict[str, str]] = {}
    for name, content in _variants(data):
        root = tmp_path / "variant"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(base, root, symlinks=True)
        (root / "meta" / "data.mdb").write_bytes(content)
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, str(root)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode >= 0, f"{name}: killed by signal {-proc.returncode}\n{proc.stderr}"
        assert proc.returncode == 0, f"{name}: a foreign error escaped\n{proc.stderr[-2000:]}"
        outcomes[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, outcome in outcomes.items():
        # Whatever a variant does, it is a clean outcome or a refcache error, and check
        # never raises for damage: it reports it.
        assert set(outcome.values()) <= {"ok", "problems", "CorruptedError"}, (name, outcome)
        if name.startswith("truncated"):
            assert outcome == {
                "open": "CorruptedError",
                "check": "problems",
                "du": "CorruptedError",
            }


def test_check_reports_a_damaged_environment_and_the_cli_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "cache"
    make_cache(root, records=3)
    data = root / "meta" / "data.mdb"
    with data.open("r+b") as f:
        f.truncate(data.stat().st_size // 2)
    problems = check(root)
    assert len(problems) == 1
    assert problems[0].startswith("metadata: ")
    assert "truncated" in problems[0]
    for argv in (["check"], ["check", "--fix"]):
        assert cli_main(["--root", str(root), *argv]) == 1
        out = capsys.readouterr().out.strip().splitlines()
        # One problem, and the line saying what repairs it (nothing here can).
        assert len(out) == 2, out
        assert out[0].startswith("metadata: ")
        assert out[1].startswith("  to repair: the metadata environment is damaged")
    with pytest.raises(CorruptedError, match="truncated"):
        open_cache(root, snapshotter="native")


def test_lmdb_errors_met_while_reading_are_corrupted_errors(env: MetaEnv) -> None:
    with env.write_txn() as txn:
        for i in range(200):
            txn.put("records", b"r%05d" % i, b"v" * 100)
    env.close()
    data = env.path / "data.mdb"
    raw = bytearray(data.read_bytes())
    # Clear the page flags of every page but the meta pages: whatever LMDB reads first is
    # "of the wrong type" (MDB_CORRUPTED). Only the header is checked before mapping here,
    # so LMDB itself meets the damage, and its error is wrapped.
    for page in range(2, len(raw) // PAGE):
        struct.pack_into("=H", raw, page * PAGE + 10, 0)
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptedError, match="damaged") as caught:
        MetaEnv(env.path, verify="header")
    assert str(env.path) in str(caught.value)
    # The full check finds it before LMDB does.
    with pytest.raises(CorruptedError, match="damaged"):
        MetaEnv(env.path)


# -- full disks and read-only or foreign file systems -----------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root only; skipped where it cannot be mounted)."""
    target = tmp_path / "small"
    target.mkdir()
    try:
        mount_all([Mount("tmpfs", "tmpfs", ("size=2m",))], target)
    except Exception as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield target
    finally:
        unmount(target, lazy=True)


def test_a_full_disk_is_store_full_for_metadata_content_and_copies(small_tmpfs: Path) -> None:
    env = MetaEnv(small_tmpfs / "meta", map_size=64 << 20)
    with pytest.raises(StoreFullError, match=r"disk is full|short write"):
        for i in range(1000):
            with env.write_txn() as txn:
                txn.put("records", b"r%05d" % i, os.urandom(8 << 10))
    env.close()
    shutil.rmtree(small_tmpfs / "meta")

    root = small_tmpfs / "cache"
    with open_cache(root, snapshotter="native", timeout=WAIT) as cache:
        mutable = cache.manager.new().get(timeout=WAIT)
        with mutable.mount().local() as path:
            (path / "f").write_bytes(os.urandom(1200 << 10))
        ref = mutable.commit()
        ref.finalize()
        # Content: a blob that does not fit.
        with pytest.raises(StoreFullError):
            cache.content.write_blob(os.urandom(1 << 20), None)  # type: ignore[arg-type]
        # A snapshot copy that does not fit (native prepare copies the parent).
        with pytest.raises(StoreFullError, match="cannot build snapshot"):
            cache.manager.new(ref).get(timeout=WAIT)
        ref.release()


@pytest.fixture
def read_only_cache(tmp_path: Path) -> Iterator[Path]:
    """A real cache seen through a read-only bind mount (skipped where that cannot be done)."""
    root = tmp_path / "cache"
    make_cache(root, records=2)
    view = tmp_path / "ro"
    view.mkdir()
    try:
        mount_all([Mount("bind", str(root), ("rbind", "ro"))], view)
    except Exception as exc:
        pytest.skip(f"cannot make a read-only bind mount here: {exc}")
    try:
        yield view
    finally:
        unmount(view, lazy=True)


def test_a_read_only_file_system_is_one_clear_error_naming_the_root(
    read_only_cache: Path,
) -> None:
    with pytest.raises(PermissionDeniedError, match=f"{read_only_cache}.*read-only"):
        open_cache(read_only_cache, snapshotter="native")
    # Reading it still works: nobody can be writing a read-only cache.
    assert check(read_only_cache) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_a_root_this_uid_may_not_write_is_one_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    make_cache(root, records=1)
    os.chmod(tmp_path, 0o755)
    os.chown(root, 65534, 65534)
    os.chmod(root, 0o500)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child, as nobody
        os.close(read)
        result = "no error"
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            open_cache(root, snapshotter="native")
        except PermissionDeniedError as exc:
            result = f"PermissionDeniedError: {exc}"
        except BaseException as exc:
            result = f"{type(exc).__name__}: {exc}"
        os.write(write, result.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        result = pipe.read().decode()
    os.waitpid(pid, 0)
    assert result.startswith("PermissionDeniedError: cannot open cache"), result
    assert str(root) in result
    assert "permission denied" in result
