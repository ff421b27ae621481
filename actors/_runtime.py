"""A pooled Pykka runtime: many actors, a few threads.

A :class:`pykka.ThreadingActor` owns one OS thread for its whole life. refcache may hold
100k cache records, and BuildKit users run caches of 26k+ records, so record actors cannot
each own a thread (DESIGN.md, "Scale: records are virtual actors"). This module provides:

* :class:`ActorPool`: a small set of worker threads and a FIFO *run queue* of actors that
  have messages waiting.
* :class:`PooledActor`: a :class:`pykka.Actor` whose inbox is scheduled on an
  :class:`ActorPool` through Pykka's runtime hooks (``_create_actor_inbox``,
  ``_create_future``, ``_start_actor_loop``: the hooks Pykka's former gevent and eventlet
  actors implemented). ``ActorRef``, ``ActorProxy``, futures and ``ActorRegistry`` work
  unchanged.

Scheduling
    An actor is in the run queue at most once. Putting a message in an idle actor's inbox
    schedules it; a worker then takes it, handles up to ``batch_size`` messages in FIFO
    order and, if more are waiting, puts the actor back at the *end* of the run queue, so a
    busy actor cannot starve the others. One actor's messages are therefore handled by at
    most one worker at a time, in the order they were sent (the per-actor serialisation
    that makes actor state need no lock), while different actors run in parallel on
    different workers.

Handling an ask in the caller's thread
    :func:`run_here` handles a message in the *calling* thread when the actor is idle: the
    caller takes the scheduling token itself (under the inbox lock, exactly as ``put`` would
    for a worker), calls ``on_receive``, and gives the token back; messages that arrived
    meanwhile are then handed to the pool, as a worker does at the end of a batch. The token
    keeps the actor's guarantees: one thread at a time runs its handlers, and only an idle
    actor with an empty inbox is taken, so FIFO order is kept (a message queued earlier
    makes the caller fall back to the mailbox). It saves the two thread hand-offs of an ask
    (caller -> worker -> caller), which dominate a short handler's cost when many threads
    share few cores. Only ``on_receive`` messages are handled so (a stop or a proxy call
    goes through the mailbox), and only short, non-blocking handlers may be asked so:
    which every handler already is (rule 3). An exception goes straight to the caller, as
    it would through the reply future. :func:`tell_here` does the same for a tell (an
    exception then fails the actor, as on a worker).

Choosing the pool
    In this order: the pool given to :meth:`PooledActor.start_on`; else the subclass's
    class attribute :attr:`PooledActor.actor_pool`; else the lazily created process-wide
    :func:`default_pool`. The pool is fixed when the actor starts.

Rules for handlers (DESIGN.md, "Message discipline")
    * **Never block a pool worker** (rule 3). A worker is shared by every actor on the pool:
      a handler that waits on I/O, a lock, an event or a future stalls every actor queued
      behind it, and a handler that blocks forever takes the worker away for good. Slow work
      goes to an I/O executor; the handler returns and the result comes back as a message.
    * **Asking another pooled actor from a pooled handler** ties up one worker until the
      answer arrives. On a pool with one worker the callee can never run: the ask deadlocks
      (it only returns through its ``timeout``). With ``workers >= 2`` one level of such
      asks works, but N handlers doing it at once can take all N workers. refcache records
      never ask (rule 1); only ``tell`` between pooled actors.
    * An actor asking itself deadlocks, as with any Pykka runtime.

Differences from :class:`pykka.ThreadingActor` (all of them remove a hang)
    * A message put in the inbox of an actor that has already finished stopping (an ``ask``
      or ``tell`` that raced the stop past ``is_alive()``) is answered at once with
      :class:`pykka.ActorDeadError` (a ``tell`` is dropped). Pykka's threading inbox keeps
      such a message forever and its ``ask`` hangs.
    * A :class:`BaseException` in a handler stops the actor and then *all* actors, as in
      Pykka, but with ``ActorRegistry.stop_all(block=False)``: a worker must not wait for
      actors that need a worker to stop. The ask whose handler raised it gets
      :class:`pykka.ActorDeadError` (Pykka leaves that caller waiting forever). The worker
      thread carries on.
    * :meth:`ActorPool.shutdown` abandons the actors still on the pool: queued and later
      messages are answered with :class:`pykka.ActorDeadError`, ``on_stop`` is not called.
      Stop the actors first (and wait for the stops), then shut the pool down.

Pykka version
    The hooks and the private helpers reused here (``_actor_loop_setup``,
    ``_handle_receive``, ``_handle_failure``, ``_stop``, ``messages._ActorStop``) are
    private Pykka API, verified against Pykka 4.x (4.5); ``pyproject.toml`` pins the range
    and ``tests/actors/test_runtime.py`` pins the behaviour.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from typing import TYPE_CHECKING, Any, ClassVar, Self, cast

import pykka
from pykka import ActorDeadError, ActorRegistry, ThreadingFuture, messages

from ..storage import InvalidError

if TYPE_CHECKING:
    from pykka import ActorRef, Future
    from pykka._actor import ActorInbox
    from pykka._envelope import Envelope

__all__ = [
    "NOT_RUN",
    "ActorPool",
    "CallbackFuture",
    "PoolStats",
    "PooledActor",
    "current_pool",
    "default_pool",
    "run_here",
    "tell_here",
]

logger = logging.getLogger(__name__)

# Pykka logs handler exceptions on its own logger; the pooled loop mirrors its messages there
# so one logging configuration covers both runtimes.
_pykka_logger = logging.getLogger("pykka")

_DEFAULT_BATCH_SIZE = 32

_pool_counter = count(0)

_worker_local = threading.local()


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of an :class:`ActorPool`, for metrics.

    Attributes:
        workers: Worker threads currently alive.
        queued_actors: Actors waiting in the run queue for a worker (approximate: the run
            queue is read without stopping the workers).
        messages_processed: Messages handled by the pool's workers since it started
            (asks, tells, proxy calls and stop requests), counted per finished batch;
            not those :func:`run_here` handled in a caller's thread.
    """

    workers: int
    queued_actors: int
    messages_processed: int


class ActorPool:
    """A few worker threads that run many :class:`PooledActor` instances.

    Each worker takes an actor from the run queue, handles up to ``batch_size`` of its
    messages and requeues it at the end if it has more. The scheduling protocol (see
    :class:`_PooledInbox`) guarantees an actor is in the run queue or on a worker at most
    once, so its messages are handled one at a time, in FIFO order.

    Workers are daemon threads, so a forgotten pool does not keep the process alive, and a
    worker never dies of an exception raised by a handler or an actor hook.

    Args:
        workers: Number of worker threads (at least 1; use 2 or more if pooled handlers
            ever ask other pooled actors, see the module docstring).
        name: Prefix of the worker thread names (``<name>-<n>``).
        batch_size: Maximum messages of one actor handled before the worker moves on to the
            next queued actor (fairness).

    Raises:
        InvalidError: ``workers`` or ``batch_size`` is not a positive integer.
    """

    def __init__(
        self,
        workers: int = 2,
        name: str = "refcache-actors",
        *,
        batch_size: int = _DEFAULT_BATCH_SIZE,
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            msg = f"ActorPool {name!r}: workers must be a positive integer, got {workers!r}"
            raise InvalidError(msg)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            msg = f"ActorPool {name!r}: batch_size must be a positive integer, got {batch_size!r}"
            raise InvalidError(msg)
        self.name = name
        self.batch_size = batch_size
        # SimpleQueue: C implementation, no task accounting; the cheapest thread hand-off.
        self._run_queue: queue.SimpleQueue[PooledActor | None] = queue.SimpleQueue()
        # Guards _closed against a racing _submit, so nothing lands behind the stop markers.
        self._lock = threading.Lock()
        self._closed = False
        # One counter per worker, written only by that worker: no lost updates, no lock.
        self._processed = [0] * workers
        self._threads = [
            threading.Thread(
                target=self._work,
                args=(index,),
                name=f"{name}-{index}",
                daemon=True,
            )
            for index in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def __repr__(self) -> str:
        state = "shut down" if self._closed else "running"
        return f"<ActorPool {self.name!r} workers={len(self._threads)} {state}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc_info: object) -> None:
        self.shutdown(timeout=5.0)

    @property
    def workers(self) -> int:
        """Number of worker threads the pool was created with."""
        return len(self._threads)

    @property
    def is_shutdown(self) -> bool:
        """Whether :meth:`shutdown` has been called."""
        return self._closed

    def stats(self) -> PoolStats:
        """Return a snapshot of the pool's counters.

        Returns:
            The current :class:`PoolStats`. Safe to call from any thread.
        """
        return PoolStats(
            workers=sum(1 for thread in self._threads if thread.is_alive()),
            queued_actors=self._run_queue.qsize(),
            messages_processed=sum(self._processed),
        )

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop the workers and wait for them to exit.

        Handlers already running finish; no other handler starts. Every actor still on the
        pool is abandoned the next time it would run: its pending and later asks get
        :class:`pykka.ActorDeadError`, its tells are dropped, it is unregistered, and
        ``on_stop`` is not called. Stop the actors first. Calling it again is harmless.

        Args:
            timeout: Seconds to wait for all workers together; ``None`` waits for ever.
                A worker stuck in a blocking handler cannot be interrupted.

        Returns:
            True if every worker thread has exited (a worker calling ``shutdown`` from a
            handler does not wait for itself and is not counted).
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                # Queued behind every actor already scheduled; workers abandon those
                # (_closed is set) and exit on their marker.
                for _ in self._threads:
                    self._run_queue.put(None)
        current = threading.current_thread()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            if thread is current:
                continue
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
        return not any(thread.is_alive() for thread in self._threads if thread is not current)

    def _submit(self, actor: PooledActor) -> None:
        """Put ``actor`` in the run queue; the caller holds its scheduling token."""
        with self._lock:
            if not self._closed:
                self._run_queue.put(actor)
                return
        actor._pooled_abandon(f"{self!r} is shut down")

    def _work(self, index: int) -> None:
        """Run on worker thread ``index`` until the pool shuts down."""
        _worker_local.pool = self
        get = self._run_queue.get
        batch_size = self.batch_size
        processed = self._processed
        while True:
            actor = get()
            if actor is None:
                return
            try:
                if self._closed:
                    actor._pooled_abandon(f"{self!r} is shut down")
                    continue
                handled, again = actor._pooled_run(batch_size)
                processed[index] += handled
                if again:
                    self._submit(actor)
            except BaseException:  # a worker must outlive anything a handler does
                # _pooled_run already handles every handler exception as Pykka does; getting
                # here means an actor hook or a future misbehaved in a way Pykka's own loop
                # would die of. Fail this actor's callers rather than leave them hanging.
                logger.exception("Unexpected error running %s on %r", actor, self)
                try:
                    actor._pooled_abandon("an unexpected error in the pooled runtime")
                except BaseException:
                    logger.exception("Could not abandon %s on %r", actor, self)
            finally:
                # Do not keep the last actor alive while waiting for the next one.
                del actor


_default_pool: ActorPool | None = None
_default_pool_lock = threading.Lock()


def default_pool() -> ActorPool:
    """Return the process-wide pool, creating it on first use.

    It has the default size (2 workers). If it was shut down, a new one is created: actors
    started on the old one stay abandoned.

    Returns:
        The shared :class:`ActorPool` used by :class:`PooledActor` subclasses that name no
        pool.
    """
    global _default_pool  # noqa: PLW0603 - one lazily created process-wide pool
    with _default_pool_lock:
        if _default_pool is None or _default_pool.is_shutdown:
            _default_pool = ActorPool(name=f"refcache-actors-{next(_pool_counter)}")
        return _default_pool


def current_pool() -> ActorPool | None:
    """Return the pool whose worker runs the calling thread, or ``None``.

    Useful to assert that code about to block is not running on a pool worker.

    Returns:
        The :class:`ActorPool` if called from one of its workers, else ``None``.
    """
    return cast("ActorPool | None", getattr(_worker_local, "pool", None))


class _NotRun:
    """The type of :data:`NOT_RUN`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_RUN"


#: What :func:`run_here` returns when the actor is busy, stopped or not pooled.
NOT_RUN: Any = _NotRun()


def _actor_behind(ref: ActorRef[Any]) -> Any:
    """The actor object ``ref`` refers to (``None`` once it is gone).

    A private attribute of Pykka's: a weak reference in its newer releases, the actor
    itself in 4.3 (CI tests the range in pyproject.toml at both ends).
    """
    try:
        return ref._actor_weakref()
    except AttributeError:
        return getattr(ref, "_actor", None)


def run_here(ref: ActorRef[Any], message: Any) -> Any:
    """Handles ``message`` in the calling thread if ``ref``'s pooled actor is idle.

    See "Handling an ask in the caller's thread" in the module docstring. The handler must
    be short and must not block (it holds the actor for its whole run).

    Args:
        ref: The actor; anything but a running :class:`PooledActor` returns
            :data:`NOT_RUN`.
        message: A message for the actor's ``on_receive`` (not a Pykka stop or proxy call).

    Returns:
        The handler's reply, or :data:`NOT_RUN` when the actor is busy (a worker or another
        caller runs it, or messages wait), stopped, not started yet, or its pool is shut
        down: then ask it through its mailbox.

    Raises:
        Exception: whatever the handler raised.
    """
    # No isinstance: PooledActor's metaclass is an ABC's, whose check is slow on a hot path.
    run = getattr(_actor_behind(ref), "_pooled_run_here", None)
    if run is None:
        return NOT_RUN
    return run(message)


def tell_here(ref: ActorRef[Any], message: Any) -> bool:
    """Handles the tell ``message`` in the calling thread if ``ref``'s pooled actor is idle.

    As :func:`run_here`, for a message without a reply: an exception in the handler is
    not raised here but fails the actor, as a tell handled by a worker does (logged,
    ``on_failure``, the actor stops).

    Returns:
        True if handled here; False when the actor is busy, stopped, not pooled, or its
        pool is shut down: then tell it through its mailbox.
    """
    tell = getattr(_actor_behind(ref), "_pooled_tell_here", None)
    return tell is not None and bool(tell(message))


class _PooledInbox:
    """A :class:`PooledActor`'s inbox: a FIFO deque plus the actor's scheduling state.

    ``_scheduled`` is the *scheduling token*: whoever sets it owns the actor's execution
    (it is in the run queue or on a worker). ``put`` takes the token when the actor is idle
    and submits the actor; the worker gives it back in ``_release`` when the deque is empty.
    Both transitions happen under ``_lock``, and a worker checks for emptiness under the
    same lock, so a message can never be left in an idle actor's inbox.

    The inbox starts *held* (token taken) so that messages sent before
    ``_start_actor_loop`` (from ``__init__`` or a registry lookup) wait until the actor is
    bound to a pool and ``on_start`` has run.

    Only the worker owning the token pops from the deque; ``deque.popleft`` is atomic, so
    popping takes no lock.
    """

    __slots__ = ("_actor", "_closed", "_label", "_lock", "_pool", "_queue", "_scheduled")

    def __init__(self) -> None:
        self._queue: deque[Envelope[Any]] = deque()
        self._lock = threading.Lock()
        self._scheduled = True
        self._closed = False
        self._actor: PooledActor | None = None
        self._pool: ActorPool | None = None
        self._label = "actor"

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, envelope: Envelope[Any], /) -> None:
        """Queue ``envelope``, scheduling the actor on its pool if it is idle.

        On an actor that has finished stopping, an ask is answered with
        :class:`pykka.ActorDeadError` and a tell is dropped, instead of waiting for ever.
        """
        with self._lock:
            if not self._closed:
                self._queue.append(envelope)
                if self._scheduled:
                    return
                self._scheduled = True
                actor = self._actor
                pool = self._pool
            else:
                actor = pool = None
        if actor is not None and pool is not None:
            pool._submit(actor)
            return
        if envelope.reply_to is not None:
            _fail(envelope, f"{self._label} stopped before handling the message")

    def get(self) -> Envelope[Any]:
        """Pop the oldest message without blocking (part of Pykka's inbox protocol).

        The pooled loop pops directly; this exists for Pykka's ``ActorInbox`` protocol.

        Raises:
            queue.Empty: The inbox is empty.
        """
        try:
            return self._queue.popleft()
        except IndexError:
            raise queue.Empty from None

    def empty(self) -> bool:
        """Return True if no message is waiting."""
        return not self._queue

    def _bind(self, actor: PooledActor, pool: ActorPool) -> None:
        """Attach the started actor and its pool, then run it (it holds the token)."""
        self._actor = actor
        self._pool = pool
        pool._submit(actor)

    def _release(self) -> bool:
        """End a batch: keep the token if messages wait (caller requeues), else drop it."""
        with self._lock:
            if self._queue:
                return True
            self._scheduled = False
            return False

    def _close(self, label: str) -> list[Envelope[Any]]:
        """Refuse further messages and return the ones still queued."""
        with self._lock:
            self._closed = True
            self._label = label
            pending = list(self._queue)
            self._queue.clear()
            # Break the actor -> ref -> inbox -> actor cycle now, not at the next GC run.
            self._actor = None
        return pending


def _fail(envelope: Envelope[Any], message: str) -> None:
    """Answer an ask with ActorDeadError, as Pykka's teardown does."""
    if envelope.reply_to is not None:
        envelope.reply_to.set_exception(
            exc_info=(ActorDeadError, ActorDeadError(message), None),
        )


class CallbackFuture(ThreadingFuture[Any]):
    """A Pykka reply future that also calls back when it is set (``add_done_callback``).

    The reply future of every :class:`PooledActor` ask: a caller that must not block (an
    event loop, a chain of asks) learns of the reply without a thread waiting in ``get()``.
    """

    def __init__(self) -> None:
        super().__init__()
        #: Callbacks to run once set; ``None`` once they ran.
        self._callbacks: list[Callable[[CallbackFuture], None]] | None = []

    def set(self, value: Any | None = None) -> None:
        """Sets the reply (Pykka), then runs the callbacks."""
        super().set(value)
        self._fire()

    def set_exception(self, exc_info: Any = None) -> None:
        """Sets the failure (Pykka), then runs the callbacks."""
        super().set_exception(exc_info if exc_info is not None else sys.exc_info())
        self._fire()

    def add_done_callback(self, fn: Callable[[CallbackFuture], None]) -> None:
        """Calls ``fn(self)`` once the reply is set (``get(timeout=0)`` then returns or
        raises it); at once, in this thread, when it is set already.

        ``fn`` runs on the thread that sets the reply (a pool worker), so it must not
        block; a failing ``fn`` is logged.
        """
        with self._condition:
            if self._callbacks is not None:
                self._callbacks.append(fn)
                return
        self._call(fn)

    def _fire(self) -> None:
        with self._condition:
            callbacks, self._callbacks = self._callbacks or [], None
        for fn in callbacks:
            self._call(fn)

    def _call(self, fn: Callable[[CallbackFuture], None]) -> None:
        try:
            fn(self)
        except Exception:
            logger.exception("done callback %r of an actor reply failed", fn)


class PooledActor(pykka.Actor):
    """A Pykka actor scheduled on a shared :class:`ActorPool` instead of its own thread.

    Use it exactly like :class:`pykka.ThreadingActor`: subclass, implement ``on_receive``
    and/or methods, ``start()``, ``proxy()``, ``ask``/``tell``, ``stop()``. Hooks
    (``on_start``, ``on_receive``, proxied methods, ``on_stop``, ``on_failure``) run on one
    of the pool's worker threads, never two at a time for one actor; ``__init__`` runs in
    the thread that calls ``start``.

    Failure handling mirrors Pykka's threading loop: an exception in an ask goes to the
    caller's future and the actor lives on; an exception in a tell (or ``defer``) logs, calls
    ``on_failure``, unregisters and stops the actor; messages left in the inbox get
    :class:`pykka.ActorDeadError`. See the module docstring for the deliberate differences
    (no hangs) and the blocking rules.

    Example:
        ```py
        class Record(PooledActor):
            actor_pool = records_pool  # or leave None for default_pool()

        ref = Record.start()                 # on Record.actor_pool
        ref = Record.start_on(other_pool)    # on an explicit pool
        ```
    """

    actor_pool: ClassVar[ActorPool | None] = None
    """The pool this class's actors run on when started with ``start()``.

    ``None`` (the default) means :func:`default_pool`. Set it on a subclass; it is read when
    the actor starts.
    """

    _pooled_started: bool = False

    @classmethod
    def start_on(cls, pool: ActorPool, *args: Any, **kwargs: Any) -> ActorRef[Self]:
        """Start an actor on ``pool`` rather than on the class's pool.

        Same as Pykka's ``Actor.start()`` (construct, register, run) with an explicit pool.

        Args:
            pool: The pool to run the actor on.
            *args: Passed to the constructor.
            **kwargs: Passed to the constructor.

        Returns:
            The new actor's ref.
        """
        obj = cls(*args, **kwargs)
        ActorRegistry.register(obj.actor_ref)
        obj._pooled_bind(pool)
        return obj.actor_ref

    @staticmethod
    def _create_actor_inbox() -> ActorInbox:
        return _PooledInbox()

    @staticmethod
    def _create_future() -> Future[Any]:
        # Callers are ordinary threads (or other actors) that block in get(timeout=...),
        # or callers that must not block and chain on add_done_callback.
        return CallbackFuture()

    def _start_actor_loop(self) -> None:
        self._pooled_bind(type(self).actor_pool or default_pool())

    def _pooled_bind(self, pool: ActorPool) -> None:
        cast("_PooledInbox", self.actor_inbox)._bind(self, pool)

    def _pooled_run(self, batch_size: int) -> tuple[int, bool]:
        """Handle up to ``batch_size`` messages; runs on a worker holding the token.

        Returns:
            (messages handled, whether the actor must be requeued).
        """
        if not self._pooled_started:
            # Pykka's _actor_loop_setup: on_start, and stop (no on_failure) if it raises.
            self._pooled_started = True
            self._actor_loop_setup()
        inbox = cast("_PooledInbox", self.actor_inbox)
        popleft = inbox._queue.popleft
        stopped = self.actor_stopped
        handled = 0
        while handled < batch_size and not stopped.is_set():
            try:
                envelope = popleft()
            except IndexError:
                break
            handled += 1
            self._pooled_handle(envelope)
        if stopped.is_set():
            self._pooled_teardown()
            return handled, False
        return handled, inbox._release()

    def _pooled_handle(self, envelope: Envelope[Any]) -> None:
        """Handle one message exactly as Pykka's ``_actor_loop_running`` does."""
        try:
            response = self._handle_receive(envelope.message)
            if envelope.reply_to is not None:
                envelope.reply_to.set(response)
        except Exception:
            if envelope.reply_to is not None:
                _pykka_logger.info(
                    "Exception returned from %s to caller:", self, exc_info=sys.exc_info()
                )
                envelope.reply_to.set_exception()
            else:
                self._pooled_tell_failed()
        except BaseException as exc:  # mirrored from Pykka, worker survives
            _pykka_logger.debug("%r in %s. Stopping all actors.", exc, self)
            if envelope.reply_to is not None:
                dead = ActorDeadError(f"{self.actor_ref} stopped by {exc!r} in this message")
                dead.__cause__ = exc
                envelope.reply_to.set_exception(exc_info=(ActorDeadError, dead, None))
            self._stop()
            # Pykka blocks here until every actor has stopped; a pool worker must not wait
            # for actors that need a worker to stop.
            ActorRegistry.stop_all(block=False)

    def _pooled_tell_failed(self) -> None:
        """A tell's handler raised (in an ``except`` block): log, stop, ``on_failure``."""
        self._handle_failure(*sys.exc_info())
        try:
            self.on_failure(*sys.exc_info())
        except Exception:  # Pykka logs and stops, so do we
            self._handle_failure(*sys.exc_info())

    def _pooled_tell_here(self, message: Any) -> bool:
        """:func:`tell_here`: as :meth:`_pooled_run_here`, failing as a tell does."""
        inbox: _PooledInbox = self.actor_inbox  # type: ignore[assignment]
        with inbox._lock:
            pool = inbox._pool
            if inbox._scheduled or inbox._closed or pool is None or pool._closed:
                return False
            inbox._scheduled = True
        try:
            self.on_receive(message)
        except Exception:
            # As on a worker: the actor stops; what waits in its inbox is answered with
            # ActorDeadError. This thread holds the token, so it tears the actor down.
            self._pooled_tell_failed()
            self._pooled_teardown()
            return True
        except BaseException:
            self._pooled_give_back(inbox, pool)
            raise
        self._pooled_give_back(inbox, pool)
        return True

    def _pooled_give_back(self, inbox: _PooledInbox, pool: ActorPool) -> None:
        """Drop the token a caller took, or hand the actor to its pool if messages came
        meanwhile (a worker requeues it at the end of its batch the same way)."""
        with inbox._lock:
            if not inbox._queue:
                inbox._scheduled = False
                return
        pool._submit(self)

    def _pooled_run_here(self, message: Any) -> Any:
        """:func:`run_here`: take the idle actor's token, handle ``message``, give it back."""
        inbox: _PooledInbox = self.actor_inbox  # type: ignore[assignment]
        with inbox._lock:
            # A held token means a worker or another caller runs the actor, or messages
            # wait for one (FIFO order); a closed inbox means a stopped actor (a stop always
            # closes the inbox before the token is dropped). An actor not started yet holds
            # its token until its first run, so on_start has always run here.
            pool = inbox._pool
            if inbox._scheduled or inbox._closed or pool is None or pool._closed:
                return NOT_RUN
            inbox._scheduled = True
        try:
            return self.on_receive(message)
        finally:
            self._pooled_give_back(inbox, pool)

    def _pooled_teardown(self) -> None:
        """Answer what is left in the inbox, as Pykka's ``_actor_loop_teardown`` does."""
        inbox = cast("_PooledInbox", self.actor_inbox)
        label = str(self.actor_ref)
        for envelope in inbox._close(label):
            if envelope.reply_to is None:
                continue  # a tell queued behind the stop is dropped
            if isinstance(envelope.message, messages._ActorStop):
                envelope.reply_to.set(None)
            else:
                _fail(envelope, f"{label} stopped before handling the message")

    def _pooled_abandon(self, reason: str) -> None:
        """Stop without running any hook (pool shut down or runtime error); holds the token."""
        logger.warning("Abandoning %s: %s", self, reason)
        ActorRegistry.unregister(self.actor_ref)
        self.actor_stopped.set()
        self._pooled_teardown()
