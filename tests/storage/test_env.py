"""The LMDB environment: transactions, map growth, schema, durability, second readers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import msgpack
import pytest

from storage._env import DB_INFO, DB_RECORDS, SCHEMA_VERSION, MetaEnv
from storage._errors import IncompatibleSchemaError, RefcacheError, StoreFullError
from storage._metadata import KEY_DESCRIPTION, MetadataStore

ROOT = Path(__file__).resolve().parents[2]


def run_child(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_write_txn_commits_on_success_and_runs_deletions_after(env: MetaEnv) -> None:
    events: list[str] = []
    with env.write_txn() as txn:
        txn.put(DB_RECORDS, b"a", b"1")
        txn.after_commit(lambda: events.append("deleted files"))
        assert events == []
    assert events == ["deleted files"]
    with env.read_txn() as txn:
        assert txn.get(DB_RECORDS, b"a") == b"1"


def test_write_txn_rolls_back_on_any_exception_and_skips_deletions(env: MetaEnv) -> None:
    events: list[str] = []
    with pytest.raises(KeyboardInterrupt), env.write_txn() as txn:
        txn.put(DB_RECORDS, b"a", b"1")
        txn.after_commit(lambda: events.append("deleted files"))
        raise KeyboardInterrupt
    assert events == []
    with env.read_txn() as txn:
        assert txn.get(DB_RECORDS, b"a") is None


def test_a_failing_after_commit_callback_does_not_undo_the_commit(env: MetaEnv) -> None:
    def fail() -> None:
        raise OSError("disk went away")

    with env.write_txn() as txn:
        txn.put(DB_RECORDS, b"a", b"1")
        txn.after_commit(fail)
    with env.read_txn() as txn:
        assert txn.get(DB_RECORDS, b"a") == b"1"


def test_a_full_map_grows_and_the_whole_transaction_is_kept(tmp_path: Path) -> None:
    env = MetaEnv(tmp_path / "meta", map_size=64 * 1024)
    store = MetadataStore(env)
    with env.write_txn() as txn:
        for i in range(3000):
            item = store.get(f"rec{i:05d}")
            item.queue(KEY_DESCRIPTION, f"record {i} " + "x" * 100)
            item.commit(txn=txn)
        # Reads inside the transaction see everything written so far, across the growth.
        assert txn.get(DB_RECORDS, b"rec00000") is not None
    size, used = env.map_info()
    assert size > 64 * 1024
    assert used <= size
    env.close()

    env = MetaEnv(tmp_path / "meta")
    store = MetadataStore(env)
    assert store.count() == 3000
    assert store.get("rec02999").get_str(KEY_DESCRIPTION).startswith("record 2999 ")
    env.close()


def test_growth_past_the_limit_is_a_store_full_error_and_keeps_old_data(
    tmp_path: Path,
) -> None:
    env = MetaEnv(tmp_path / "meta", map_size=64 * 1024, max_map_size=128 * 1024)
    with env.write_txn() as txn:
        txn.put(DB_RECORDS, b"keep", b"me")
    with pytest.raises(StoreFullError, match="may not grow past 131072"), env.write_txn() as txn:
        for i in range(2000):
            txn.put(DB_RECORDS, b"k%05d" % i, b"v" * 200)
    with env.read_txn() as txn:
        assert txn.get(DB_RECORDS, b"keep") == b"me"
        assert txn.count(DB_RECORDS) == 1
    env.close()


def test_a_newer_schema_version_is_refused_not_rewritten(tmp_path: Path) -> None:
    env = MetaEnv(tmp_path / "meta")
    with env.write_txn() as txn:
        txn.put(DB_INFO, b"schema_version", msgpack.packb(SCHEMA_VERSION + 1))
    env.close()
    with pytest.raises(IncompatibleSchemaError, match=f"schema version {SCHEMA_VERSION + 1}"):
        MetaEnv(tmp_path / "meta")
    with pytest.raises(IncompatibleSchemaError):
        MetaEnv(tmp_path / "meta", readonly=True)


def test_an_unreadable_schema_version_is_refused(tmp_path: Path) -> None:
    env = MetaEnv(tmp_path / "meta")
    with env.write_txn() as txn:
        txn.put(DB_INFO, b"schema_version", b"\xc1")
    env.close()
    with pytest.raises(IncompatibleSchemaError, match="unreadable schema version"):
        MetaEnv(tmp_path / "meta")


def test_read_only_open_of_a_missing_environment_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RefcacheError, match="no refcache metadata at"):
        MetaEnv(tmp_path / "nothing", readonly=True)
    assert not (tmp_path / "nothing").exists()


def test_a_read_only_environment_refuses_writes(tmp_path: Path) -> None:
    MetaEnv(tmp_path / "meta").close()
    env = MetaEnv(tmp_path / "meta", readonly=True)
    with pytest.raises(RefcacheError, match="read-only"), env.write_txn():
        pass
    env.close()


def test_unknown_database_names_are_a_clear_error(env: MetaEnv) -> None:
    with (
        pytest.raises(RefcacheError, match="unknown metadata database 'nope'"),
        env.read_txn() as txn,
    ):
        txn.get("nope", b"k")


WRITER = """
    import sys
    from storage._env import MetaEnv
    from storage._metadata import MetadataStore
    env = MetaEnv(sys.argv[1])
    store = MetadataStore(env)
    i = 0
    while True:
        store.get(f"rec{i:06d}").set("n", i)
        print(i, flush=True)
        i += 1
"""


@pytest.mark.timeout(60)
def test_committed_writes_survive_kill_9_of_the_writer(tmp_path: Path) -> None:
    child = run_child(WRITER, str(tmp_path / "meta"))
    assert child.stdout is not None
    reported = -1
    try:
        for line in child.stdout:
            reported = int(line)
            if reported >= 200:
                break
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
        assert child.stderr is not None
        child.stderr.close()
    assert reported >= 200

    env = MetaEnv(tmp_path / "meta")
    store = MetadataStore(env)
    ids = store.ids()
    # Every record the child reported as committed is there, and nothing half-written.
    assert len(ids) >= reported + 1
    for i in range(reported + 1):
        assert store.get(f"rec{i:06d}").get_int("n") == i
    for item in store.all():
        item.decode()
    env.close()


READER = """
    import sys
    from storage._env import MetaEnv, DB_RECORDS
    env = MetaEnv(sys.argv[1], readonly=True)
    seen = set()
    print("ready", flush=True)
    while len(seen) < 20:
        with env.read_txn() as txn:
            a = txn.get(DB_RECORDS, b"a")
            b = txn.get(DB_RECORDS, b"b")
        if a != b:
            print(f"torn {a!r} {b!r}", flush=True)
            sys.exit(1)
        seen.add(a)
    print(f"consistent {len(seen)}", flush=True)
"""


@pytest.mark.timeout(60)
def test_a_second_process_reads_consistent_snapshots_while_the_first_writes(
    tmp_path: Path,
) -> None:
    env = MetaEnv(tmp_path / "meta")
    with env.write_txn() as txn:
        txn.put(DB_RECORDS, b"a", b"0")
        txn.put(DB_RECORDS, b"b", b"0")
    reader = run_child(READER, str(tmp_path / "meta"))
    assert reader.stdout is not None
    assert reader.stdout.readline().strip() == "ready"
    i = 0
    while reader.poll() is None and i < 200_000:
        i += 1
        with env.write_txn() as txn:  # both keys change together, or not at all
            txn.put(DB_RECORDS, b"a", str(i).encode())
            txn.put(DB_RECORDS, b"b", str(i).encode())
    out, err = reader.communicate(timeout=30)
    env.close()
    assert reader.returncode == 0, err
    assert out.strip() == "consistent 20"


def test_after_rollback_callbacks_run_only_when_the_transaction_rolls_back(
    env: MetaEnv,
) -> None:
    events: list[str] = []
    with env.write_txn() as txn:
        txn.after_rollback(lambda: events.append("rolled back 1"))
    assert events == []
    with pytest.raises(ValueError, match="no"), env.write_txn() as txn:
        txn.after_rollback(lambda: events.append("rolled back 2"))
        raise ValueError("no")
    assert events == ["rolled back 2"]


def test_lookup_finds_only_environments_open_in_this_process(tmp_path: Path) -> None:
    assert MetaEnv.lookup(tmp_path / "meta") is None
    env = MetaEnv(tmp_path / "meta")
    assert MetaEnv.lookup(tmp_path / "meta") is env
    env.close()
    assert MetaEnv.lookup(tmp_path / "meta") is None
