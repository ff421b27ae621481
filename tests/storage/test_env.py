"""The LMDB environment: transactions, map growth, schema, durability, second readers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import msgpack
import pytest
from refcache.storage._env import DB_INFO, DB_RECORDS, SCHEMA_VERSION, MetaEnv
from refcache.storage._errors import IncompatibleSchemaError, RefcacheError, StoreFullError
from refcache.storage._metadata import KEY_DESCRIPTION, MetadataStore

ROOT = Path(__file__).resolve().parents[2]


def run_child(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
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
    with env.read_txn() as rtxn:
        assert rtxn.get(DB_RECORDS, b"a") == b"1"


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
    from refcache.storage._env import MetaEnv
    from refcache.storage._metadata import MetadataStore
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
    from refcache.storage._env import MetaEnv, DB_RECORDS
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


def test_put_many_writes_every_pair_and_survives_map_growth(tmp_path: Path) -> None:
    env = MetaEnv(tmp_path / "meta", map_size=64 * 1024)
    pairs = [(b"k%05d" % i, b"v" * 100 + b"%d" % i) for i in range(3000)]
    with env.write_txn() as txn:
        txn.put(DB_RECORDS, b"before", b"1")
        txn.put_many(DB_RECORDS, pairs)  # grows the map and replays the whole transaction
        txn.put(DB_RECORDS, b"after", b"2")
        assert txn.get(DB_RECORDS, b"k02999") == b"v" * 100 + b"2999"
    assert env.map_info()[0] > 64 * 1024
    with env.read_txn() as txn:
        assert txn.count(DB_RECORDS) == 3002
        assert dict(txn.items(DB_RECORDS, b"k")) == dict(pairs)
        assert (txn.get(DB_RECORDS, b"before"), txn.get(DB_RECORDS, b"after")) == (b"1", b"2")
    env.close()


def test_put_many_rolls_back_with_its_transaction(env: MetaEnv) -> None:
    with pytest.raises(RuntimeError, match="boom"), env.write_txn() as txn:
        txn.put_many(DB_RECORDS, [(b"a", b"1"), (b"b", b"2")])
        raise RuntimeError("boom")
    with env.read_txn() as txn:
        assert txn.count(DB_RECORDS) == 0


def test_get_many_returns_only_the_keys_that_exist(env: MetaEnv) -> None:
    with env.write_txn() as txn:
        txn.put_many(DB_RECORDS, [(b"a", b"1"), (b"c", b"3")])
        # Inside the writer too: it sees its own writes.
        assert txn.get_many(DB_RECORDS, [b"a", b"b", b"c"]) == {b"a": b"1", b"c": b"3"}
    with env.read_txn() as txn:
        assert txn.get_many(DB_RECORDS, [b"c", b"x", b"a"]) == {b"a": b"1", b"c": b"3"}
        assert txn.get_many(DB_RECORDS, []) == {}


def test_views_of_a_buffers_transaction_are_zero_copy_and_in_key_order(env: MetaEnv) -> None:
    with env.write_txn() as txn:
        txn.put_many(DB_RECORDS, [(b"b", b"2"), (b"a", b"1")])
    with env.read_txn(buffers=True) as txn:
        seen = [(type(k), bytes(k), bytes(v)) for k, v in txn.views(DB_RECORDS)]
        # The other reads still hand out bytes that outlive the transaction.
        copied = txn.get(DB_RECORDS, b"a")
    assert seen == [(memoryview, b"a", b"1"), (memoryview, b"b", b"2")]
    assert copied == b"1"
    with env.read_txn() as txn:
        assert list(txn.views(DB_RECORDS)) == [(b"a", b"1"), (b"b", b"2")]


@pytest.mark.timeout(60)
def test_map_growth_while_another_thread_reads_keeps_both_correct(tmp_path: Path) -> None:
    env = MetaEnv(tmp_path / "meta", map_size=64 * 1024)
    with env.write_txn() as txn:
        txn.put(DB_RECORDS, b"old", b"1")
    reading, release = threading.Event(), threading.Event()
    seen: list[bytes | None] = []

    def reader() -> None:
        with env.read_txn() as rtxn:
            reading.set()
            release.wait(timeout=30)
            seen.append(rtxn.get(DB_RECORDS, b"old"))

    thread = threading.Thread(target=reader)
    thread.start()
    assert reading.wait(timeout=30)
    with env.write_txn() as txn:
        release.set()  # the growth below waits for the reader if it is still open
        txn.put_many(DB_RECORDS, [(b"k%05d" % i, b"v" * 200) for i in range(2000)])
    thread.join(timeout=30)
    assert seen == [b"1"]
    assert env.map_info()[0] > 64 * 1024
    with env.read_txn() as rtxn:  # readers are let in again after the growth
        assert rtxn.count(DB_RECORDS) == 2001
    env.close()


def test_a_bad_key_in_put_many_is_a_clear_error_naming_it(env: MetaEnv) -> None:
    too_long = b"k" * 600
    with (
        pytest.raises(RefcacheError, match=r"'records' key b'kkkk.*' failed"),
        env.write_txn() as txn,
    ):
        txn.put_many(DB_RECORDS, [(b"fine", b"1"), (too_long, b"2")])
    with env.read_txn() as rtxn:
        assert rtxn.count(DB_RECORDS) == 0


def test_after_unlock_callbacks_run_after_the_write_lock_is_released(env: MetaEnv) -> None:
    seen: list[tuple[str, bool]] = []

    def lock_free() -> bool:
        # Another thread can take the write lock now (and only now).
        got = env._write_lock.acquire(blocking=False)
        if got:
            env._write_lock.release()
        return got

    import threading

    def probe(tag: str) -> None:
        result: list[bool] = []
        t = threading.Thread(target=lambda: result.append(lock_free()))
        t.start()
        t.join(timeout=10)
        seen.append((tag, result[0]))

    with env.write_txn() as txn:
        txn.put(DB_RECORDS, b"a", b"1")
        txn.after_commit(lambda: probe("commit"))
        txn.after_unlock(lambda: probe("unlock"))
    assert seen == [("commit", False), ("unlock", True)]


def test_a_write_watch_notes_what_its_snapshot_does_not_show(env: MetaEnv) -> None:
    with env.write_txn() as txn:
        txn.put(DB_RECORDS, b"before", b"1")
    with env.watch_writes([DB_RECORDS]) as watch:
        with env.write_txn() as txn:
            txn.put(DB_RECORDS, b"after", b"2")
            txn.put_many(DB_RECORDS, [(b"many", b"3")])
            txn.put(DB_INFO, b"unwatched", b"4")
        with pytest.raises(RuntimeError, match="rolled back"), env.write_txn() as txn:
            txn.put(DB_RECORDS, b"rolled", b"5")
            raise RuntimeError("rolled back")
        with watch.snapshot as snap:
            assert snap.get(DB_RECORDS, b"before") == b"1"
            assert snap.get(DB_RECORDS, b"after") is None  # begun when the watch was made
        # Noted, whether committed or not (the reader decides conservatively).
        assert watch.drain() == [
            (DB_RECORDS, b"after", b"2"),
            (DB_RECORDS, b"many", b"3"),
            (DB_RECORDS, b"rolled", b"5"),
        ]
        assert watch.drain() == []
    with env.write_txn() as txn:
        txn.put(DB_RECORDS, b"later", b"6")
    assert watch.drain() == []  # unregistered with the block
