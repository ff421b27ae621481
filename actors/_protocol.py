"""Typed actor messages: one class per request, its reply type as a type parameter.

Every message an actor of the cache understands is a frozen, slotted dataclass deriving from
:class:`Message`, parametrised by the type of its reply (``Message[None]`` for a tell)::

    @dataclass(frozen=True, slots=True)
    class CloneRecord(Message[Grant]):
        record_id: str

The receiving side marks each handler with :class:`handles`; mypy checks that the handler
takes that message class and returns its reply type::

    @handles(CloneRecord)
    def _clone(self, m: CloneRecord) -> Grant: ...

and the sending side asks through :func:`ask` (or ``CacheCore.ask_manager``), whose return
type is the message's reply type, so a caller never sees ``Any``. An actor dispatches with
one dict lookup by the message's class (:func:`handler_table`, built once per class; or
:func:`bound_table` over the manager and the components it owns): no per-message
reflection. A message class nobody handles, or handled twice, fails when the table is built;
``tests/actors/test_messages.py`` also finds classes that nothing sends.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import pykka

from ..storage import CacheTimeoutError, ClosedError
from ._runtime import NOT_RUN, run_here, tell_here

__all__ = [
    "Await",
    "Message",
    "ask",
    "bound_table",
    "handler_table",
    "handles",
    "may_run_here",
    "run_slow",
    "tell",
]

T = TypeVar("T")
R = TypeVar("R")  # invariant: a handler must return exactly its message's reply type
M_co = TypeVar("M_co", covariant=True)
S = TypeVar("S")

#: Every this many asks handled in the caller's thread, the caller hands the GIL over for
#: :data:`_HANDOFF_S` (DESIGN.md, "Asks to an idle record"): threads looping over such asks
#: never block, and would otherwise starve threads doing I/O (ours or the embedding
#: program's), each of which waits a whole switch interval for the GIL after every system
#: call. A plain ``sched_yield`` is no hand-off on a multi-core machine: the yielding thread
#: takes the GIL back before the waiting one wakes up; a short sleep lets it wake.
_HANDOFF_EVERY = 32
_HANDOFF_S = 0.0001
_handled_here = itertools.count(1)

#: Slow jobs (the caches' I/O executor jobs: prune, GC, extraction, new, ...) running in this
#: process. While one runs, asks to idle records go through the mailbox, as before the
#: shortcut: a caller that waits for its reply gives the GIL away, so the job's thread gets
#: it back at once after each of its system calls (measured: a prune of 5,000 records with
#: four threads looping on clone+release took 36 s with the shortcut, 3.9 s without).
_slow_jobs = [0]
_slow_lock = threading.Lock()


def run_slow(fn: Callable[..., T], *args: Any) -> T:
    """Runs ``fn(*args)`` counted as a slow job (see :func:`may_run_here`)."""
    with _slow_lock:
        _slow_jobs[0] += 1
    try:
        return fn(*args)
    finally:
        with _slow_lock:
            _slow_jobs[0] -= 1


def may_run_here() -> bool:
    """Whether an ask to an idle record may be handled in the asking thread: not while a
    slow job runs (it needs the GIL after each system call more than the asker does)."""
    return not _slow_jobs[0]


#: Attribute of a handler function naming the message class it handles.
_MESSAGE_ATTR = "__refcache_message__"


class Message(Generic[R]):
    """Base of every message; ``R`` is the type of the reply (``None`` for a tell).

    Subclasses are ``@dataclass(frozen=True, slots=True)``: a message crosses a mailbox by
    reference, so it holds only immutable values (tuples, strings, frozen dataclasses,
    read-only mappings, actor references, futures for replies).
    """

    __slots__ = ()


class handles(Generic[M_co]):  # noqa: N801 - used as a decorator, named like one
    """Marks a method as the handler of message class ``message``.

    ``@handles(Ping) def _ping(self, m: Ping) -> bool`` type-checks only when the method
    takes ``Ping`` and returns ``Ping``'s reply type.
    """

    __slots__ = ("message",)

    def __init__(self, message: type[M_co]) -> None:
        self.message = message

    def __call__(self: handles[Message[R]], fn: Callable[[S, M_co], R]) -> Callable[[S, M_co], R]:
        vars(fn)[_MESSAGE_ATTR] = self.message
        return fn


def handled_message(fn: object) -> type[Message[Any]] | None:
    """The message class ``fn`` handles (see :class:`handles`), or None."""
    return getattr(fn, _MESSAGE_ATTR, None)


def handler_table(owner: type) -> dict[type[Message[Any]], Callable[[Any, Any], Any]]:
    """``message class -> handler function`` of ``owner`` and its bases (built once).

    Raises:
        TypeError: two handlers for one message class.
    """
    table: dict[type[Message[Any]], Callable[[Any, Any], Any]] = {}
    for klass in reversed(owner.__mro__):
        for fn in vars(klass).values():
            message = handled_message(fn)
            if message is None:
                continue
            if message in table and table[message] is not fn:
                msg = f"{owner.__name__} handles {message.__name__} twice"
                raise TypeError(msg)
            table[message] = fn
    return table


def bound_table(*owners: object) -> dict[type[Message[Any]], Callable[[Any], Any]]:
    """``message class -> bound handler`` over ``owners`` (an actor and its components).

    Raises:
        TypeError: two handlers for one message class.
    """
    table: dict[type[Message[Any]], Callable[[Any], Any]] = {}
    for owner in owners:
        for message, fn in handler_table(type(owner)).items():
            if message in table:
                msg = f"{message.__name__} is handled twice (again by {type(owner).__name__})"
                raise TypeError(msg)
            table[message] = fn.__get__(owner)
    return table


def ask(actor: pykka.ActorRef[Any], message: Message[R], timeout: float, what: str = "") -> R:
    """Asks ``actor`` and waits (at most ``timeout`` seconds) for the reply.

    Pykka's ``ActorDeadError`` passes through (callers use it to re-activate a passivated
    record); the public boundaries turn it into :class:`ClosedError`.

    Raises:
        TimeoutError: (refcache's) no reply within ``timeout``, naming ``what`` (by default
            the message class and the actor's).
        ClosedError: the reply was cancelled: the cache is closing.
    """
    # A record actor that is idle handles the ask in this thread (no hand-off to a pool
    # worker and back: DESIGN.md, "Asks to an idle record"); a busy one gets it in its
    # mailbox.
    value = run_here(actor, message) if not _slow_jobs[0] else NOT_RUN
    if value is not NOT_RUN:
        if not next(_handled_here) % _HANDOFF_EVERY:
            time.sleep(_HANDOFF_S)  # hands the GIL to a thread waiting for it
        return cast("R", value)
    future = actor.ask(message, block=False)
    try:
        reply: R = future.get(timeout=timeout)
    except pykka.Timeout as exc:
        msg = f"{what or _label(actor, message)} did not finish within {timeout:g} s"
        raise CacheTimeoutError(msg) from exc
    except CancelledError as exc:
        msg = f"{what or _label(actor, message)} was cancelled: the cache is closing"
        raise ClosedError(msg) from exc
    return reply


def _label(actor: pykka.ActorRef[Any], message: Message[Any]) -> str:
    return f"{type(message).__name__} to {actor.actor_class.__name__}"


def tell(actor: pykka.ActorRef[Any], message: Message[None]) -> None:
    """Tells ``actor`` a message that has no reply (raises Pykka's ``ActorDeadError``).

    An idle record actor handles it in this thread, as :func:`ask` does.
    """
    if not tell_here(actor, message):
        actor.tell(message)


@dataclass(frozen=True, slots=True)
class Await(Generic[T]):
    """A reply saying: the work is in flight (single flight); wait for ``future``.

    The future is a ``concurrent.futures.Future``: every waiter wakes when it is set.
    """

    future: Future[T]
