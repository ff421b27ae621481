"""``Cache.manager``: the typed proxy of the manager actor, and the futures it returns.

A raw Pykka proxy lets Pykka's and ``concurrent.futures``' exceptions through to the caller:
``ActorDeadError`` after :meth:`Cache.close`, ``CancelledError`` for jobs that close cut
short, ``pykka.Timeout`` for a ``get(timeout=...)`` that ran out. This proxy has the
manager's public method names and signatures; each call returns a :class:`ManagerFuture`
(a ``pykka.Future``) whose ``get()`` raises only refcache errors:

* any call once :meth:`Cache.close` has begun raises :class:`ClosedError` at once;
* a call in flight when the cache closes: :class:`ClosedError`;
* ``get(timeout=...)`` that runs out, or a deferred part (a snapshot copy, a fetch through a
  descriptor provider, a ``ref_checker`` call) that ran past the cache's timeout:
  refcache's :class:`TimeoutError`.

Validation stays in the actor (one place): a bad argument is an :class:`InvalidError` from
``get()``, as before.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import pykka

from ..storage import CacheTimeoutError, Descriptor, RefcacheError

if TYPE_CHECKING:
    from ._core import CacheCore
    from ._manager import CacheManager
    from ._refs import ImmutableRef, MutableRef
    from ._types import CacheStatistics, DescHandler, PrunePolicy, RecordInfo, UsageInfo

__all__ = ["CacheManagerProxy", "ManagerFuture"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ManagerFuture(pykka.Future[T]):
    """The reply of a :class:`CacheManagerProxy` call (a ``pykka.Future``).

    ``get(timeout=None)`` waits for the value (without ``timeout``, as long as it takes: the
    manager's own waits are bounded by the cache's timeout) and raises the operation's
    refcache error, :class:`ClosedError` or refcache's :class:`TimeoutError`; never a Pykka
    or ``concurrent.futures`` exception. ``map``, ``filter``, ``join`` and ``reduce`` work
    as on any Pykka future.
    """

    def __init__(
        self,
        inner: pykka.Future[Any] | None = None,
        core: CacheCore | None = None,
        what: str = "",
    ) -> None:
        super().__init__()
        self._inner = inner
        self._core = core
        self._what = what

    def __repr__(self) -> str:
        return f"<ManagerFuture {self._what}>" if self._what else "<ManagerFuture>"

    def get(self, *, timeout: float | None = None) -> T:
        """Returns the value of the call.

        Args:
            timeout: Seconds to wait; ``None`` waits until the call ends.

        Raises:
            TimeoutError: (refcache's) ``timeout`` ran out, or a wait inside the operation
                ran past the cache's timeout.
            ClosedError: the cache was closed before the call ended.
            RefcacheError: the operation's own error (``NotFoundError``, ``InvalidError``...).
        """
        inner = self._inner
        if inner is None or self._get_hook is not None:
            # A future made by map()/filter()/join(): its hook calls get() of the source.
            return super().get(timeout=timeout)
        try:
            value: T = inner.get(timeout=timeout)
        except RefcacheError:
            raise
        except pykka.Timeout as exc:
            msg = f"cache manager {self._what}() did not answer within {timeout:g} s"
            raise CacheTimeoutError(msg) from exc
        except (pykka.ActorDeadError, CancelledError) as exc:
            raise self._closed(exc) from exc
        return value

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        """Calls ``fn()`` once :meth:`get` would return (or raise) without waiting.

        The hook for callers that must not block, such as an event loop
        (:mod:`refcache.aio`): no thread waits per call. ``fn`` runs at once when the call
        is done already, else on the thread that completes it (the manager's or an I/O
        worker's), so it must be short and must not block or call the cache; a failing
        ``fn`` is logged. Then ``get()`` gives the value or the error as usual.
        """
        inner = self._inner
        adder = getattr(inner, "add_done_callback", None)
        if adder is not None and self._get_hook is None:
            adder(fn)
            return
        # A future made by map()/filter()/join(): one short-lived thread waits for it.
        threading.Thread(target=self._wait_then, args=(fn,), daemon=True).start()

    def _wait_then(self, fn: Callable[[], None]) -> None:
        with contextlib.suppress(Exception):
            self.get()
        try:
            fn()
        except Exception:
            logger.exception("done callback %r of a manager reply failed", fn)

    def set(self, value: T | None = None) -> None:
        """Not supported: only the manager answers a call."""
        msg = "a ManagerFuture is set by the cache manager only"
        raise TypeError(msg)

    def set_exception(self, exc_info: Any = None) -> None:
        """Not supported: only the manager answers a call."""
        msg = "a ManagerFuture is set by the cache manager only"
        raise TypeError(msg)

    def _closed(self, exc: BaseException) -> RefcacheError:
        if self._core is not None:
            return self._core.closed_error(f"finish {self._what}()")
        return RefcacheError(f"cache manager {self._what}() failed: {exc!r}")


class CacheManagerProxy:
    """Typed proxy of the cache manager actor (``Cache.manager``).

    Same methods as the manager's public API (API.md); each returns a
    :class:`ManagerFuture`. Arguments are checked by the manager: bad ones fail the future
    with :class:`InvalidError`.

    Raises:
        ClosedError: from any method once :meth:`Cache.close` has begun.
    """

    __slots__ = ("_core", "_proxy", "_ref")

    def __init__(self, core: CacheCore, ref: pykka.ActorRef[CacheManager]) -> None:
        self._core = core
        self._ref = ref
        self._proxy: Any = ref.proxy()

    def __repr__(self) -> str:
        return f"<CacheManagerProxy of the cache at {self._core.root}>"

    @property
    def actor_ref(self) -> pykka.ActorRef[CacheManager]:
        """The manager's actor reference (e.g. to watch it with ``is_alive()``)."""
        return self._ref

    def _call(self, name: str, *args: Any, **kwargs: Any) -> ManagerFuture[Any]:
        self._core.check_open(f"call {name}()")
        try:
            inner = getattr(self._proxy, name)(*args, **kwargs)
        except pykka.ActorDeadError as exc:
            raise self._core.closed_error(f"call {name}()") from exc
        return ManagerFuture(inner, self._core, name)

    def get(
        self,
        id: str,
        *,
        update_last_used: bool = True,
        desc_handlers: Mapping[str, DescHandler] | None = None,
    ) -> ManagerFuture[ImmutableRef]:
        """A new handle on an immutable record (see :meth:`CacheManager.get`)."""
        return self._call("get", id, update_last_used=update_last_used, desc_handlers=desc_handlers)

    def get_mutable(self, id: str) -> ManagerFuture[MutableRef]:
        """The exclusive handle on a mutable record (see :meth:`CacheManager.get_mutable`)."""
        return self._call("get_mutable", id)

    def new(
        self,
        parent: ImmutableRef | None = None,
        *,
        retain: bool = False,
        description: str | None = None,
        record_type: str | None = None,
        created_at: int | None = None,
    ) -> ManagerFuture[MutableRef]:
        """A new mutable record on ``parent`` (see :meth:`CacheManager.new`)."""
        return self._call(
            "new",
            parent,
            retain=retain,
            description=description,
            record_type=record_type,
            created_at=created_at,
        )

    def get_by_blob(
        self,
        desc: Descriptor,
        parent: ImmutableRef | None = None,
        *,
        desc_handlers: Mapping[str, DescHandler] | None = None,
        extract: bool = False,
        retain: bool = False,
        description: str | None = None,
    ) -> ManagerFuture[ImmutableRef]:
        """The lazy record of a layer blob (see :meth:`CacheManager.get_by_blob`)."""
        return self._call(
            "get_by_blob",
            desc,
            parent,
            desc_handlers=desc_handlers,
            extract=extract,
            retain=retain,
            description=description,
        )

    def merge(self, parents: Sequence[ImmutableRef | None]) -> ManagerFuture[ImmutableRef | None]:
        """Merges refs (see :meth:`CacheManager.merge`)."""
        return self._call("merge", parents)

    def diff(
        self, lower: ImmutableRef | None, upper: ImmutableRef | None
    ) -> ManagerFuture[ImmutableRef]:
        """The changes from ``lower`` to ``upper`` (see :meth:`CacheManager.diff`)."""
        return self._call("diff", lower, upper)

    def search(self, index: str, *, prefix: bool = False) -> ManagerFuture[list[RecordInfo]]:
        """Records in a metadata index (see :meth:`CacheManager.search`)."""
        return self._call("search", index, prefix=prefix)

    def disk_usage(
        self, filters: Sequence[str] = (), *, age_limit: timedelta | None = None
    ) -> ManagerFuture[list[UsageInfo]]:
        """One row per visible record (see :meth:`CacheManager.disk_usage`)."""
        return self._call("disk_usage", filters, age_limit=age_limit)

    def prune(self, *policies: PrunePolicy) -> ManagerFuture[list[UsageInfo]]:
        """Deletes unreferenced records by each policy (see :meth:`CacheManager.prune`)."""
        return self._call("prune", *policies)

    def statistics(self) -> ManagerFuture[CacheStatistics]:
        """One consistent snapshot of the cache (see :meth:`CacheManager.statistics`)."""
        return self._call("statistics")

    def subscribe(self, listener: pykka.ActorRef[Any]) -> ManagerFuture[None]:
        """Subscribes an actor to prune events (see :meth:`CacheManager.subscribe`)."""
        return self._call("subscribe", listener)

    def unsubscribe(self, listener: pykka.ActorRef[Any]) -> ManagerFuture[None]:
        """Ends a subscription (see :meth:`CacheManager.unsubscribe`)."""
        return self._call("unsubscribe", listener)
