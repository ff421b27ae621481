"""The pooled actor runtime behaves like Pykka's ThreadingActor, on a few shared threads.

Behaviours refcache relies on are pinned for both runtimes (the ``runtime`` fixture is
parametrised); pool-specific guarantees (thread count, fairness, shutdown, worker survival,
no hang on a racing stop) are pinned for :class:`PooledActor` only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import pykka
import pytest
from pykka import ActorDeadError, ActorRef, ActorRegistry
from pykka._envelope import Envelope
from refcache.actors._runtime import (
    NOT_RUN,
    ActorPool,
    PooledActor,
    PoolStats,
    current_pool,
    default_pool,
    run_here,
    tell_here,
)
from refcache.storage._errors import InvalidError

TIMEOUT = 5.0


# --- actors used by the tests (runtime-neutral bodies, combined with a runtime below) ---


class Echo(pykka.Actor):
    """Answers every message with itself."""

    def on_receive(self, message: Any) -> Any:
        return message


class Greeter(pykka.Actor):
    """A proxy target: an attribute and a method."""

    greeting = "hello"

    def add(self, a: int, b: int) -> int:
        return a + b

    def whoami(self) -> str:
        return threading.current_thread().name


class Recorder(pykka.Actor):
    """Appends ``(tag, message)`` to a test-owned list; answers ``len(log)`` on ``"sync"``."""

    def __init__(self, log: list[Any], tag: str = "") -> None:
        super().__init__()
        self.log = log
        self.tag = tag

    def on_receive(self, message: Any) -> Any:
        if message == "sync":
            return len(self.log)
        self.log.append((self.tag, message) if self.tag else message)
        return None


def _read_back(value: int) -> int:
    # Between the counter's read and its write, give the GIL away (sched_yield releases it),
    # so that a second worker running the same actor would interleave and be caught.
    os.sched_yield()
    return value


class Counter(pykka.Actor):
    """A non-atomic counter that also checks mutual exclusion and per-client FIFO."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.inside = False
        self.overlaps = 0
        self.out_of_order = 0
        self.last_seq: dict[int, int] = {}

    def on_receive(self, message: Any) -> Any:
        if message == "result":
            return (self.count, self.overlaps, self.out_of_order)
        client, seq = message
        if self.inside:
            self.overlaps += 1
        self.inside = True
        value = self.count
        value = _read_back(value)
        self.count = value + 1
        if seq != self.last_seq.get(client, -1) + 1:
            self.out_of_order += 1
        self.last_seq[client] = seq
        self.inside = False
        return None


class Blocker(pykka.Actor):
    """Holds its first ``"block"`` message until the test opens ``gate``."""

    def __init__(self, gate: threading.Event, entered: threading.Event, handled: list[Any]) -> None:
        super().__init__()
        self.gate = gate
        self.entered = entered
        self.handled = handled

    def on_receive(self, message: Any) -> Any:
        if message == "block":
            self.entered.set()
            # Bounded, so a broken test cannot wedge a worker for ever.
            return "unblocked" if self.gate.wait(TIMEOUT) else "gate timed out"
        self.handled.append(message)
        return message


class Failing(pykka.Actor):
    """Raises on ``"raise"``; reports ``on_failure`` through an event."""

    def __init__(self, failed: threading.Event) -> None:
        super().__init__()
        self.failed = failed
        self.failure: type[BaseException] | None = None

    def on_receive(self, message: Any) -> Any:
        if message == "raise":
            msg = "handler failed on purpose"
            raise ValueError(msg)
        return message

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.failure = exception_type
        self.failed.set()


class Lifecycle(pykka.Actor):
    """Records which thread runs each hook, and the order of hooks and messages."""

    def __init__(self, events: list[Any], stopped: threading.Event) -> None:
        super().__init__()
        self.events = events
        self.stopped = stopped
        # Sent before start(): must still be handled after on_start.
        self.actor_ref.tell("from __init__")

    def on_start(self) -> None:
        self.events.append(("on_start", threading.current_thread(), current_pool()))

    def on_receive(self, message: Any) -> Any:
        self.events.append((message, threading.current_thread(), current_pool()))
        return None

    def on_stop(self) -> None:
        self.events.append(("on_stop", threading.current_thread(), current_pool()))
        self.stopped.set()


class FailingStart(pykka.Actor):
    """Raises in ``on_start``."""

    def on_start(self) -> None:
        msg = "on_start failed on purpose"
        raise RuntimeError(msg)


class Boom(BaseException):
    """A BaseException that is not an Exception (like SystemExit)."""


class Exploding(pykka.Actor):
    """Raises a BaseException from a handler."""

    def on_receive(self, message: Any) -> Any:
        if message == "explode":
            raise Boom
        return threading.get_ident()


class Asker(pykka.Actor):
    """Asks another actor from inside its own handler (one level)."""

    def __init__(self, other: ActorRef[Any]) -> None:
        super().__init__()
        self.other = other

    def on_receive(self, message: Any) -> Any:
        return ("asked", self.other.ask(message, timeout=TIMEOUT))


@functools.cache
def _concrete(body: type, base: type) -> Any:
    """``body`` combined with a runtime (``ThreadingActor`` or ``PooledActor``)."""
    return type(f"{body.__name__}On{base.__name__}", (body, base), {})


@dataclass
class Runtime:
    """Starts test actors on one runtime."""

    name: str
    pool: ActorPool | None

    def start(self, body: type, *args: Any) -> ActorRef[Any]:
        if self.pool is None:
            ref: ActorRef[Any] = _concrete(body, pykka.ThreadingActor).start(*args)
        else:
            ref = _concrete(body, PooledActor).start_on(self.pool, *args)
        return ref


@contextlib.contextmanager
def private_pool(workers: int, name: str, batch_size: int = 32) -> Iterator[ActorPool]:
    """A pool for one test: stops every actor (so none is abandoned), then shuts down."""
    with ActorPool(workers=workers, name=name, batch_size=batch_size) as actor_pool:
        try:
            yield actor_pool
        finally:
            for future in ActorRegistry.stop_all(block=False):
                future.get(timeout=TIMEOUT)


@pytest.fixture
def pool() -> Iterator[ActorPool]:
    """A 4-worker pool shared by the runtime-parametrised tests."""
    with private_pool(workers=4, name="test-pool") as actor_pool:
        yield actor_pool


@pytest.fixture(params=["threading", "pooled"])
def runtime(request: pytest.FixtureRequest, pool: ActorPool) -> Runtime:
    """Each behaviour test runs once on ThreadingActor and once on PooledActor."""
    return Runtime(request.param, None if request.param == "threading" else pool)


@pytest.fixture
def frequent_switches() -> Iterator[None]:
    """Make the interpreter switch threads very often, to expose unserialised handlers."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def _start_blocked(
    runtime: Runtime, handled: list[Any] | None = None
) -> tuple[ActorRef[Any], threading.Event, pykka.Future[Any]]:
    """Start a Blocker and return it busy in its first message, with the gate closed."""
    gate, entered = threading.Event(), threading.Event()
    ref = runtime.start(Blocker, gate, entered, [] if handled is None else handled)
    first = ref.ask("block", block=False)
    assert entered.wait(TIMEOUT)
    return ref, gate, first


# --- the Pykka version the private hooks were verified against ---


def test_pykka_is_the_4_x_series_the_hooks_were_verified_against() -> None:
    # pykka 4.x has no __version__ attribute; the distribution metadata is authoritative.
    assert importlib.metadata.version("pykka").startswith("4.")
    for hook in (
        "_create_actor_inbox",
        "_create_future",
        "_start_actor_loop",
        "_actor_loop_setup",
        "_handle_receive",
        "_handle_failure",
        "_stop",
    ):
        assert callable(getattr(pykka.Actor, hook)), hook
    assert isinstance(pykka.messages._ActorStop(), tuple)


# --- behaviours pinned for both runtimes ---


def test_ask_returns_the_handler_value(runtime: Runtime) -> None:
    ref = runtime.start(Echo)

    assert ref.ask("ping", timeout=TIMEOUT) == "ping"
    assert ref.ask(block=False, message=42).get(timeout=TIMEOUT) == 42


def test_future_of_a_pooled_ask_is_a_threading_future(runtime: Runtime) -> None:
    future = runtime.start(Echo).ask("x", block=False)

    assert isinstance(future, pykka.ThreadingFuture)
    assert future.get(timeout=TIMEOUT) == "x"


def test_proxy_calls_methods_and_reads_attributes(runtime: Runtime) -> None:
    proxy = runtime.start(Greeter).proxy()

    assert proxy.add(2, 3).get(timeout=TIMEOUT) == 5
    assert proxy.greeting.get(timeout=TIMEOUT) == "hello"
    assert proxy.whoami().get(timeout=TIMEOUT) != threading.current_thread().name


def test_tells_are_processed_in_the_order_sent(runtime: Runtime) -> None:
    log: list[Any] = []
    ref = runtime.start(Recorder, log)

    for number in range(500):
        ref.tell(number)

    assert ref.ask("sync", timeout=TIMEOUT) == 500
    assert log == list(range(500))


@pytest.mark.usefixtures("frequent_switches")
def test_eight_hammering_clients_are_serialised_fifo_per_client(runtime: Runtime) -> None:
    ref = runtime.start(Counter)
    clients, per_client = 8, 1000
    barrier = threading.Barrier(clients)

    def hammer(client: int) -> None:
        barrier.wait(TIMEOUT)
        for seq in range(per_client):
            ref.tell((client, seq))

    threads = [threading.Thread(target=hammer, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)

    assert not any(thread.is_alive() for thread in threads)
    # (count, handlers overlapping, messages out of per-client order)
    assert ref.ask("result", timeout=TIMEOUT) == (clients * per_client, 0, 0)


def test_messages_sent_before_start_are_handled_after_on_start(runtime: Runtime) -> None:
    events: list[Any] = []
    stopped = threading.Event()
    ref = runtime.start(Lifecycle, events, stopped)

    ref.ask("sync", timeout=TIMEOUT)

    assert [event[0] for event in events] == ["on_start", "from __init__", "sync"]


def test_hooks_run_off_the_caller_thread_in_lifecycle_order(runtime: Runtime) -> None:
    events: list[Any] = []
    stopped = threading.Event()
    ref = runtime.start(Lifecycle, events, stopped)

    assert ref.stop(timeout=TIMEOUT) is True

    assert stopped.wait(TIMEOUT)
    assert [event[0] for event in events] == ["on_start", "from __init__", "on_stop"]
    assert all(event[1] is not threading.current_thread() for event in events)


def test_stop_handles_earlier_messages_then_fails_later_asks(runtime: Runtime) -> None:
    ref, gate, first = _start_blocked(runtime)
    queued_before = ref.ask("before", block=False)
    stopping = ref.stop(block=False)
    queued_after = ref.ask("after", block=False)

    gate.set()

    assert first.get(timeout=TIMEOUT) == "unblocked"
    assert queued_before.get(timeout=TIMEOUT) == "before"
    assert stopping.get(timeout=TIMEOUT) is True
    with pytest.raises(ActorDeadError, match="stopped before handling the message"):
        queued_after.get(timeout=TIMEOUT)
    assert not ref.is_alive()


def test_ask_and_stop_after_the_actor_stopped_fail_at_once(runtime: Runtime) -> None:
    ref = runtime.start(Echo)
    assert ref.stop(timeout=TIMEOUT) is True

    with pytest.raises(ActorDeadError, match="not found"):
        ref.ask("late", timeout=TIMEOUT)
    assert ref.stop(timeout=TIMEOUT) is False


def test_tell_queued_behind_stop_is_dropped_and_tell_after_stop_raises(
    runtime: Runtime,
) -> None:
    handled: list[Any] = []
    ref, gate, first = _start_blocked(runtime, handled)
    ref.tell("kept")
    stopping = ref.stop(block=False)
    ref.tell("dropped")

    gate.set()

    assert first.get(timeout=TIMEOUT) == "unblocked"
    assert stopping.get(timeout=TIMEOUT) is True
    assert handled == ["kept"]
    with pytest.raises(ActorDeadError, match="not found"):
        ref.tell("after stop")


def test_exception_in_ask_reaches_the_caller_and_actor_lives_on(runtime: Runtime) -> None:
    failed = threading.Event()
    ref = runtime.start(Failing, failed)

    with pytest.raises(ValueError, match="handler failed on purpose"):
        ref.ask("raise", timeout=TIMEOUT)

    assert ref.is_alive()
    assert ref.ask("still here", timeout=TIMEOUT) == "still here"
    assert not failed.is_set()


def test_exception_in_tell_calls_on_failure_and_kills_the_actor(runtime: Runtime) -> None:
    failed = threading.Event()
    ref = runtime.start(Failing, failed)

    ref.tell("raise")

    assert failed.wait(TIMEOUT)
    assert not ref.is_alive()
    assert ActorRegistry.get_by_urn(ref.actor_urn) is None
    with pytest.raises(ActorDeadError):
        ref.ask("anyone?", timeout=TIMEOUT)


def test_exception_in_on_start_stops_and_unregisters_the_actor(runtime: Runtime) -> None:
    ref = runtime.start(FailingStart)

    assert ref.actor_stopped.wait(TIMEOUT)
    assert ActorRegistry.get_by_urn(ref.actor_urn) is None
    with pytest.raises(ActorDeadError):
        ref.ask("anyone?", timeout=TIMEOUT)


def test_registry_holds_the_actor_while_it_is_alive(runtime: Runtime) -> None:
    ref = runtime.start(Echo)

    assert ref.is_alive()
    assert ActorRegistry.get_by_urn(ref.actor_urn) is ref
    assert ref in ActorRegistry.get_by_class(ref.actor_class)

    ref.stop(timeout=TIMEOUT)

    assert not ref.is_alive()
    assert ActorRegistry.get_by_urn(ref.actor_urn) is None


# --- pooled runtime only ---


def test_pooled_hooks_and_handlers_run_on_the_pool_workers(pool: ActorPool) -> None:
    events: list[Any] = []
    stopped = threading.Event()
    ref = Runtime("pooled", pool).start(Lifecycle, events, stopped)

    ref.stop(timeout=TIMEOUT)

    assert stopped.wait(TIMEOUT)
    assert [(name, in_pool) for name, _, in_pool in events] == [
        ("on_start", pool),
        ("from __init__", pool),
        ("on_stop", pool),
    ]
    assert all(thread.name.startswith("test-pool-") for _, thread, _ in events)


def test_two_thousand_actors_add_only_the_pool_threads() -> None:
    before = threading.active_count()
    with private_pool(workers=2, name="small") as small:
        on_small = Runtime("pooled", small)
        refs = [on_small.start(Echo) for _ in range(2000)]
        futures = [ref.ask(number, block=False) for number, ref in enumerate(refs)]

        assert [future.get(timeout=TIMEOUT) for future in futures] == list(range(2000))
        assert threading.active_count() - before <= 2

        stops = [ref.stop(block=False) for ref in refs]
        assert all(stop.get(timeout=TIMEOUT) for stop in stops)


def test_a_busy_actor_yields_the_worker_after_one_batch() -> None:
    log: list[Any] = []
    with private_pool(workers=1, name="fair", batch_size=4) as fair:
        # Occupy the only worker, then queue a busy actor ahead of a quiet one.
        _, gate, first = _start_blocked(Runtime("pooled", fair))
        busy = Runtime("pooled", fair).start(Recorder, log, "busy")
        for number in range(100):
            busy.tell(number)
        quiet = Runtime("pooled", fair).start(Recorder, log, "quiet")
        answered = quiet.ask("hello", block=False)

        gate.set()

        assert answered.get(timeout=TIMEOUT) is None
        assert busy.ask("sync", timeout=TIMEOUT) == 101
        assert first.get(timeout=TIMEOUT) == "unblocked"
        # The quiet actor ran right after the busy actor's first batch of 4.
        assert log.index(("quiet", "hello")) == 4
        assert [m for tag, m in log if tag == "busy"] == list(range(100))


def test_pooled_actor_can_ask_another_pooled_actor_on_two_workers() -> None:
    with private_pool(workers=2, name="pair") as pair:
        callee = Runtime("pooled", pair).start(Echo)
        caller = Runtime("pooled", pair).start(Asker, callee)

        assert caller.ask("hi", timeout=TIMEOUT) == ("asked", "hi")


def test_asks_racing_a_stop_are_answered_never_left_hanging(pool: ActorPool) -> None:
    ref = Runtime("pooled", pool).start(Echo)
    clients, per_client = 8, 200
    barrier = threading.Barrier(clients + 1)
    results: dict[int, list[Any]] = {}

    def ask_many(client: int) -> None:
        barrier.wait(TIMEOUT)
        futures = [ref.ask(seq, block=False) for seq in range(per_client)]
        outcome: list[Any] = []
        for future in futures:
            try:
                outcome.append(future.get(timeout=TIMEOUT))
            except ActorDeadError:
                outcome.append("dead")
        results[client] = outcome

    threads = [threading.Thread(target=ask_many, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait(TIMEOUT)
    stopping = ref.stop(block=False)
    for thread in threads:
        thread.join(TIMEOUT * 2)

    assert stopping.get(timeout=TIMEOUT) is True
    assert sorted(results) == list(range(clients))
    for outcome in results.values():
        answered = [value for value in outcome if value != "dead"]
        # FIFO: the asks answered are exactly the ones sent before the stop.
        assert answered == list(range(len(answered)))
        assert outcome[len(answered) :] == ["dead"] * (per_client - len(answered))


def test_a_worker_survives_handlers_raising() -> None:
    failed = threading.Event()
    with private_pool(workers=1, name="solo") as solo:
        on_solo = Runtime("pooled", solo)
        probe = on_solo.start(Exploding)
        worker = probe.ask("which thread", timeout=TIMEOUT)

        failing = on_solo.start(Failing, failed)
        with pytest.raises(ValueError, match="on purpose"):
            failing.ask("raise", timeout=TIMEOUT)
        failing.tell("raise")
        assert failed.wait(TIMEOUT)

        after = on_solo.start(Exploding)
        assert after.ask("which thread", timeout=TIMEOUT) == worker
        assert solo.stats().workers == 1


def test_base_exception_stops_every_actor_answers_the_caller_and_spares_the_worker() -> None:
    with private_pool(workers=1, name="solo") as solo:
        on_solo = Runtime("pooled", solo)
        bystander = on_solo.start(Echo)
        exploding = on_solo.start(Exploding)
        worker = exploding.ask("which thread", timeout=TIMEOUT)

        with pytest.raises(ActorDeadError, match="Boom"):
            exploding.ask("explode", timeout=TIMEOUT)

        # As in Pykka: the BaseException stops all actors (here without blocking the worker).
        assert bystander.actor_stopped.wait(TIMEOUT)
        assert not exploding.is_alive()
        fresh = on_solo.start(Exploding)
        assert fresh.ask("which thread", timeout=TIMEOUT) == worker


def test_pool_shutdown_joins_its_workers() -> None:
    shut = ActorPool(workers=3, name="shut")
    assert shut.stats().workers == 3

    assert shut.shutdown(timeout=TIMEOUT) is True

    assert shut.is_shutdown
    assert shut.stats().workers == 0
    assert shut.shutdown(timeout=TIMEOUT) is True


def test_messages_to_an_actor_on_a_shut_down_pool_fail_instead_of_hanging() -> None:
    shut = ActorPool(workers=1, name="shut")
    ref = Runtime("pooled", shut).start(Echo)
    assert ref.ask("before", timeout=TIMEOUT) == "before"

    assert shut.shutdown(timeout=TIMEOUT) is True

    with pytest.raises(ActorDeadError, match="stopped before handling the message"):
        ref.ask("after", timeout=TIMEOUT)
    assert not ref.is_alive()
    assert ActorRegistry.get_by_urn(ref.actor_urn) is None


def test_stats_count_handled_messages_and_live_workers() -> None:
    counted = ActorPool(workers=2, name="counted")
    ref = Runtime("pooled", counted).start(Echo)
    for number in range(10):
        assert ref.ask(number, timeout=TIMEOUT) == number

    assert counted.stats().workers == 2
    assert counted.stats().queued_actors == 0
    ref.stop(timeout=TIMEOUT)
    counted.shutdown(timeout=TIMEOUT)

    # 10 asks and the stop message; counts are final once the workers have exited.
    assert counted.stats() == PoolStats(workers=0, queued_actors=0, messages_processed=11)


def test_pool_is_chosen_by_start_on_then_class_attribute_then_default(pool: ActorPool) -> None:
    class Where(PooledActor):
        def on_start(self) -> None:
            self.started_on = current_pool()

        def on_receive(self, message: Any) -> Any:
            return (self.started_on, current_pool())

    class WhereOnPool(Where):
        actor_pool = pool

    with private_pool(workers=1, name="explicit") as explicit:
        where = [
            ref.ask("where", timeout=TIMEOUT)
            for ref in (Where.start(), WhereOnPool.start(), WhereOnPool.start_on(explicit))
        ]

    assert where == [
        (default_pool(), default_pool()),
        (pool, pool),
        (explicit, explicit),
    ]
    assert current_pool() is None


def test_an_ask_that_passed_is_alive_before_the_stop_finished_gets_actor_dead_error(
    pool: ActorPool,
) -> None:
    ref = Runtime("pooled", pool).start(Echo)
    assert ref.stop(timeout=TIMEOUT) is True
    # What ActorRef.ask does after its is_alive() check: with a threading inbox this
    # envelope would wait for ever; the pooled inbox answers it at once.
    late = PooledActor._create_future()
    ref.actor_inbox.put(Envelope("late", reply_to=late))
    ref.actor_inbox.put(Envelope("late tell"))

    with pytest.raises(ActorDeadError, match="stopped before handling the message"):
        late.get(timeout=TIMEOUT)
    assert ref.actor_inbox.empty()


# --- run_here: an idle pooled actor handles an ask in the caller's thread ---


class Where(pykka.Actor):
    """Answers the thread and the pool its handler ran on."""

    def on_receive(self, message: Any) -> Any:
        return (message, threading.current_thread(), current_pool())


def test_run_here_handles_an_idle_actors_message_in_the_calling_thread(pool: ActorPool) -> None:
    ref = Runtime("pooled", pool).start(Where)
    ref.ask("started", timeout=TIMEOUT)  # on_start has run, the actor is idle
    processed = pool.stats().messages_processed

    assert run_here(ref, "here") == ("here", threading.current_thread(), None)
    # No worker was involved, and the actor is free for the mailbox again.
    assert pool.stats().messages_processed == processed
    message, thread, on_pool = ref.ask("queued", timeout=TIMEOUT)
    assert (message, on_pool) == ("queued", pool)
    assert thread is not threading.current_thread()


def test_run_here_leaves_a_busy_actor_to_its_mailbox(pool: ActorPool) -> None:
    handled: list[Any] = []
    ref, gate, first = _start_blocked(Runtime("pooled", pool), handled)
    ref.tell("queued")

    assert run_here(ref, "now") is NOT_RUN
    gate.set()
    assert first.get(timeout=TIMEOUT) == "unblocked"
    assert ref.ask("sync", timeout=TIMEOUT) == "sync"
    # Nothing ran out of order and "now" was not handled at all.
    assert handled == ["queued", "sync"]


def test_messages_sent_while_a_caller_runs_the_actor_wait_and_keep_their_order(
    pool: ActorPool,
) -> None:
    gate, entered = threading.Event(), threading.Event()
    handled: list[Any] = []
    ref = Runtime("pooled", pool).start(Blocker, gate, entered, handled)
    ref.ask("started", timeout=TIMEOUT)
    replies: list[Any] = []
    # The caller's thread holds the actor while its handler waits on the gate.
    caller = threading.Thread(target=lambda: replies.append(run_here(ref, "block")))
    caller.start()
    assert entered.wait(TIMEOUT)

    ref.tell("told")
    asked = ref.ask("asked", block=False)
    # Not handled meanwhile by a worker: one thread at a time runs the actor.
    assert run_here(ref, "other") is NOT_RUN
    assert handled == ["started"]
    gate.set()
    caller.join(TIMEOUT)

    assert not caller.is_alive()
    assert replies == ["unblocked"]
    # Handed to the pool when the caller gave the actor back, in the order they came.
    assert asked.get(timeout=TIMEOUT) == "asked"
    assert handled == ["started", "told", "asked"]


def test_an_exception_in_run_here_reaches_the_caller_and_frees_the_actor(
    pool: ActorPool,
) -> None:
    failed = threading.Event()
    ref = Runtime("pooled", pool).start(Failing, failed)
    ref.ask("started", timeout=TIMEOUT)

    with pytest.raises(ValueError, match="on purpose"):
        run_here(ref, "raise")

    # As for an ask: the actor lives on, on_failure is not called.
    assert run_here(ref, "again") == "again"
    assert ref.ask("queued", timeout=TIMEOUT) == "queued"
    assert ref.is_alive()
    assert not failed.is_set()


def test_run_here_does_not_run_stopped_unpooled_or_abandoned_actors(pool: ActorPool) -> None:
    stopped = Runtime("pooled", pool).start(Echo)
    assert stopped.stop(timeout=TIMEOUT) is True
    threaded = Runtime("threading", None).start(Echo)
    shut = ActorPool(workers=1, name="shut")
    abandoned = Runtime("pooled", shut).start(Echo)
    assert abandoned.ask("started", timeout=TIMEOUT) == "started"
    assert shut.shutdown(timeout=TIMEOUT) is True

    assert run_here(stopped, "x") is NOT_RUN
    assert run_here(threaded, "x") is NOT_RUN
    assert run_here(abandoned, "x") is NOT_RUN
    assert threaded.ask("x", timeout=TIMEOUT) == "x"
    with pytest.raises(ActorDeadError):
        abandoned.ask("x", timeout=TIMEOUT)


def test_tell_here_handles_a_tell_to_an_idle_actor_in_the_calling_thread(
    pool: ActorPool,
) -> None:
    log: list[Any] = []
    ref = Runtime("pooled", pool).start(Recorder, log)
    assert ref.ask("sync", timeout=TIMEOUT) == 0

    assert tell_here(ref, threading.current_thread()) is True
    assert log == [threading.current_thread()]
    # Busy (a message waits in the inbox while the actor is not idle): not handled here.
    handled: list[Any] = []
    blocked, gate, first = _start_blocked(Runtime("pooled", pool), handled)
    assert tell_here(blocked, "later") is False
    gate.set()
    assert first.get(timeout=TIMEOUT) == "unblocked"
    assert blocked.ask("sync", timeout=TIMEOUT) == "sync"
    assert handled == ["sync"]


def test_an_exception_in_tell_here_fails_the_actor_as_a_tell_does(pool: ActorPool) -> None:
    failed = threading.Event()
    ref = Runtime("pooled", pool).start(Failing, failed)
    assert ref.ask("started", timeout=TIMEOUT) == "started"

    # Not raised to the teller: the actor's on_failure runs and the actor stops.
    assert tell_here(ref, "raise") is True
    assert failed.is_set()
    assert not ref.is_alive()
    assert ActorRegistry.get_by_urn(ref.actor_urn) is None
    assert tell_here(ref, "again") is False
    with pytest.raises(ActorDeadError):
        ref.ask("after", timeout=TIMEOUT)


@pytest.mark.usefixtures("frequent_switches")
def test_clients_mixing_run_here_asks_and_tells_are_serialised_fifo_per_client(
    pool: ActorPool,
) -> None:
    ref = Runtime("pooled", pool).start(Counter)
    clients, rounds, per_round = 8, 6, 100

    def settle() -> None:
        # Between rounds (one thread, the others wait): the actor drains its mailbox and
        # becomes idle, so each round begins with callers finding it free.
        deadline = time.monotonic() + TIMEOUT
        while run_here(ref, "result") is NOT_RUN and time.monotonic() < deadline:
            os.sched_yield()

    barrier = threading.Barrier(clients, action=settle)
    ran_here = [0] * clients

    def hammer(client: int) -> None:
        seq = 0
        for _ in range(rounds):
            barrier.wait(TIMEOUT)
            for _ in range(per_round):
                message = (client, seq)
                if seq % 10 == 5:  # a few tells, so that callers also find the actor busy
                    ref.tell(message)
                elif seq % 10 == 7:
                    if not tell_here(ref, message):
                        ref.tell(message)
                elif run_here(ref, message) is NOT_RUN:
                    ref.ask(message, timeout=TIMEOUT)
                else:
                    ran_here[client] += 1
                seq += 1

    threads = [threading.Thread(target=hammer, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:  # the watchdog: every wait above is bounded, so is this
        thread.join(TIMEOUT * 4)

    assert not any(thread.is_alive() for thread in threads)
    # (count, handlers overlapping, messages out of per-client order)
    assert ref.ask("result", timeout=TIMEOUT) == (clients * rounds * per_round, 0, 0)
    # Each round's first message found the actor idle: both paths were mixed.
    assert sum(ran_here) >= rounds


@pytest.mark.parametrize(("workers", "batch_size"), [(0, 32), (2, 0), (-1, 32), (True, 32)])
def test_pool_rejects_non_positive_sizes(workers: int, batch_size: int) -> None:
    with pytest.raises(InvalidError, match="must be a positive integer"):
        ActorPool(workers=workers, name="bad", batch_size=batch_size)
