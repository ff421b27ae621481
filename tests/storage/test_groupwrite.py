"""Group commit (storage/_groupwrite.py): concurrent writes share one transaction and fsync."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
from refcache.storage._env import DB_RECORDS, MetaEnv, WriteTxn
from refcache.storage._errors import ClosedError, InvalidError, RefcacheError

WAIT = 30.0  # watchdog for every wait in these tests


@pytest.fixture
def genv(tmp_path: Path) -> Iterator[MetaEnv]:
    env = MetaEnv(tmp_path / "meta")
    try:
        yield env
    finally:
        env.close()


def _put(key: bytes, value: bytes = b"v") -> Callable[[WriteTxn], bytes]:
    def fn(txn: WriteTxn) -> bytes:
        txn.put(DB_RECORDS, key, value)
        return key

    return fn


def _stored(env: MetaEnv, key: bytes) -> bytes | None:
    with env.read_txn() as txn:
        return txn.get(DB_RECORDS, key)


class _Gate:
    """A closure that holds the writer's thread until released: what is submitted
    meanwhile queues up and forms the next batch."""

    def __init__(self, env: MetaEnv) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()
        self.future = env.group.submit(self._hold)
        assert self.entered.wait(WAIT), "the writer never ran the gate"

    def _hold(self, txn: WriteTxn) -> None:
        self.entered.set()
        assert self.go.wait(WAIT)
        txn.put(DB_RECORDS, b"gate", b"")

    def open(self) -> None:
        self.go.set()
        self.future.result(WAIT)


def test_concurrent_writes_share_one_commit(genv: MetaEnv) -> None:
    before, written = genv.group.commits, genv.group.writes
    gate = _Gate(genv)
    n = 16
    queued = [threading.Event() for _ in range(n)]
    results: list[Future[bytes]] = [Future() for _ in range(n)]

    def caller(i: int) -> None:
        fut = genv.group.submit(_put(f"k{i}".encode(), str(i).encode()))
        queued[i].set()
        try:
            results[i].set_result(fut.result(WAIT))
        except BaseException as exc:
            results[i].set_exception(exc)

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for ev in queued:
        assert ev.wait(WAIT)
    gate.open()
    for i, fut in enumerate(results):
        assert fut.result(WAIT) == f"k{i}".encode()
    for t in threads:
        t.join(WAIT)
    # The gate's batch, then one batch for all sixteen writers: two commits, two fsyncs.
    assert genv.group.commits - before == 2
    assert genv.group.writes - written == 1 + n
    for i in range(n):
        assert _stored(genv, f"k{i}".encode()) == str(i).encode()


def test_a_lone_write_commits_at_once_in_the_callers_thread(genv: MetaEnv) -> None:
    ran_in: list[str] = []

    def fn(txn: WriteTxn) -> bytes:
        ran_in.append(threading.current_thread().name)
        return _put(b"alone")(txn)

    assert genv.group.write(fn) == b"alone"
    assert _stored(genv, b"alone") == b"v"
    assert genv.group.commits == 1
    assert genv.group.writes == 1
    # Nobody else was writing: the caller wrote its batch itself (no thread switch).
    assert ran_in == [threading.current_thread().name]


def test_a_lingering_write_rides_along_with_the_next_write(genv: MetaEnv) -> None:
    behind = genv.group.submit(_put(b"statistics"), linger=WAIT)
    assert not behind.done()
    genv.group.write(_put(b"record"))
    assert behind.result(0) == b"statistics"  # committed with the record, not later
    assert genv.group.commits == 1
    assert _stored(genv, b"statistics") == b"v"


def test_a_lingering_write_commits_alone_once_its_time_is_up(genv: MetaEnv) -> None:
    behind = genv.group.submit(_put(b"statistics"), linger=0.01)
    assert behind.result(WAIT) == b"statistics"
    assert genv.group.commits == 1
    assert _stored(genv, b"statistics") == b"v"


def test_a_failing_closure_fails_only_its_caller(genv: MetaEnv) -> None:
    undone: list[str] = []
    committed: list[str] = []

    def bad(txn: WriteTxn) -> None:
        txn.put(DB_RECORDS, b"half", b"written")
        txn.after_rollback(lambda: undone.append("bad"))
        txn.after_commit(lambda: committed.append("bad"))
        msg = "record 'half' is malformed"
        raise InvalidError(msg)

    def good(key: bytes) -> Callable[[WriteTxn], bytes]:
        def fn(txn: WriteTxn) -> bytes:
            txn.put(DB_RECORDS, key, b"ok")
            txn.after_commit(lambda: committed.append(key.decode()))
            return key

        return fn

    before = genv.group.commits
    gate = _Gate(genv)
    f1 = genv.group.submit(good(b"first"))
    f2 = genv.group.submit(bad)
    f3 = genv.group.submit(good(b"third"))
    gate.open()
    assert f1.result(WAIT) == b"first"
    with pytest.raises(InvalidError, match="half"):
        f2.result(WAIT)
    assert f3.result(WAIT) == b"third"
    assert genv.group.commits - before == 2  # the gate's, then one for both good writes
    assert _stored(genv, b"first") == b"ok"
    assert _stored(genv, b"third") == b"ok"
    assert _stored(genv, b"half") is None  # nothing of the failed closure was written
    assert undone == ["bad"]
    assert committed == ["first", "third"]


def test_a_failing_closure_does_not_undo_earlier_writes_of_its_batch(genv: MetaEnv) -> None:
    # The savepoint replays what the earlier closures wrote, values and deletions alike.
    genv.group.write(_put(b"old"))
    gate = _Gate(genv)

    def rewrite(txn: WriteTxn) -> None:
        txn.delete(DB_RECORDS, b"old")
        txn.put_many(DB_RECORDS, [(b"m1", b"1"), (b"m2", b"2")])

    def bad(txn: WriteTxn) -> None:
        txn.put(DB_RECORDS, b"m1", b"clobbered")
        raise KeyError("m1")

    f1 = genv.group.submit(rewrite)
    f2 = genv.group.submit(bad)
    f3 = genv.group.submit(lambda txn: txn.get(DB_RECORDS, b"m1"))
    gate.open()
    f1.result(WAIT)
    with pytest.raises(KeyError):
        f2.result(WAIT)
    assert f3.result(WAIT) == b"1"  # a later closure sees the earlier one's write, not bad's
    assert _stored(genv, b"old") is None
    assert _stored(genv, b"m1") == b"1"
    assert _stored(genv, b"m2") == b"2"


def test_closures_run_in_submission_order(genv: MetaEnv) -> None:
    order: list[int] = []
    gate = _Gate(genv)

    def step(i: int) -> Callable[[WriteTxn], int]:
        def fn(txn: WriteTxn) -> int:
            order.append(i)
            prev = txn.get(DB_RECORDS, b"counter")
            txn.put(DB_RECORDS, b"counter", str(i).encode())
            return int(prev) if prev is not None else -1

        return fn

    futures = [genv.group.submit(step(i)) for i in range(50)]
    gate.open()
    assert [f.result(WAIT) for f in futures] == [-1, *range(49)]
    assert order == list(range(50))
    assert _stored(genv, b"counter") == b"49"


def test_close_drains_the_queue_then_refuses(genv: MetaEnv) -> None:
    gate = _Gate(genv)
    futures = [genv.group.submit(_put(f"d{i}".encode())) for i in range(10)]
    closer = threading.Thread(target=genv.group.close, daemon=True)
    closer.start()
    gate.open()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert all(f.done() for f in futures)
    for i in range(10):
        assert _stored(genv, f"d{i}".encode()) == b"v"
    with pytest.raises(ClosedError, match="closed"):
        genv.group.write(_put(b"late"))
    assert _stored(genv, b"late") is None


def test_env_close_drains_the_writer(tmp_path: Path) -> None:
    env = MetaEnv(tmp_path / "meta")
    gate = _Gate(env)
    queued = env.group.submit(_put(b"queued"))
    closer = threading.Thread(target=env.close, daemon=True)
    closer.start()
    gate.open()
    closer.join(WAIT)
    assert queued.result(0) == b"queued"
    with MetaEnv(tmp_path / "meta") as again, again.read_txn() as txn:
        assert txn.get(DB_RECORDS, b"queued") == b"v"


def test_misuse_is_a_refcache_error_not_a_deadlock(genv: MetaEnv) -> None:
    def nested(txn: WriteTxn) -> None:
        genv.group.write(_put(b"inner"))

    with pytest.raises(RefcacheError, match="wait for itself"):
        genv.group.write(nested)
    with genv.write_txn(), pytest.raises(RefcacheError, match="wait for itself"):
        genv.group.write(_put(b"inside"))
    assert _stored(genv, b"inner") is None
    assert _stored(genv, b"inside") is None


def test_a_failed_commit_fails_the_whole_batch_and_writes_nothing(genv: MetaEnv) -> None:
    undone: list[str] = []

    def doomed(txn: WriteTxn) -> None:
        txn.put(DB_RECORDS, b"doomed", b"")
        txn.after_rollback(lambda: undone.append("doomed"))

        def fail() -> None:
            raise OSError(5, "Input/output error")

        txn.before_commit("flush", fail)

    gate = _Gate(genv)
    f1 = genv.group.submit(_put(b"neighbour"))
    f2 = genv.group.submit(doomed)
    gate.open()
    for fut in (f1, f2):
        with pytest.raises(RefcacheError, match="group commit"):
            fut.result(WAIT)
    assert _stored(genv, b"neighbour") is None
    assert _stored(genv, b"doomed") is None
    assert undone == ["doomed"]
    assert genv.group.write(_put(b"after")) == b"after"  # the writer goes on


def test_keyed_before_commit_runs_once_per_batch(genv: MetaEnv) -> None:
    flushes: list[str] = []

    def renamed(key: bytes) -> Callable[[WriteTxn], None]:
        def fn(txn: WriteTxn) -> None:
            txn.put(DB_RECORDS, key, b"")
            txn.before_commit(("fsync", "snapshots"), lambda: flushes.append("snapshots"))

        return fn

    gate = _Gate(genv)
    futures = [genv.group.submit(renamed(f"r{i}".encode())) for i in range(5)]
    gate.open()
    for f in futures:
        f.result(WAIT)
    assert flushes == ["snapshots"]


def test_after_unlock_runs_in_the_callers_thread(genv: MetaEnv) -> None:
    seen: list[str] = []

    def fn(txn: WriteTxn) -> None:
        txn.put(DB_RECORDS, b"u", b"")
        txn.after_unlock(lambda: seen.append(threading.current_thread().name))

    genv.group.write(fn)
    assert seen == [threading.current_thread().name]


def test_a_failing_closure_survives_a_map_growth_in_its_batch(tmp_path: Path) -> None:
    env = MetaEnv(tmp_path / "meta", map_size=1 << 20)
    try:
        gate = _Gate(env)
        big = b"x" * (200 << 10)
        futures = [env.group.submit(_put(f"big{i}".encode(), big)) for i in range(8)]

        def bad(txn: WriteTxn) -> None:
            txn.put(DB_RECORDS, b"bigbad", big)
            msg = "no"
            raise InvalidError(msg)

        fbad = env.group.submit(bad)
        more = [env.group.submit(_put(f"more{i}".encode(), big)) for i in range(4)]
        gate.open()
        for f in futures + more:
            f.result(WAIT)
        with pytest.raises(InvalidError):
            fbad.result(WAIT)
        for i in range(8):
            assert _stored(env, f"big{i}".encode()) == big
        assert _stored(env, b"bigbad") is None
        assert _stored(env, b"more3") == big
    finally:
        env.close()
