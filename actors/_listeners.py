"""Cache events for listener actors (Mopidy's listener pattern).

Listeners subscribed with ``cache.manager.subscribe(actor_ref)`` get a *tell* per record a
prune deleted, ``("record_pruned", UsageInfo)``, and ``("prune_finished", records, bytes)``
once a prune is done. Nothing is ever asked of a listener, so a slow one cannot stall the
cache. The events are plain tuples (a public contract: any actor may subscribe if it
accepts them); :class:`CacheListener` dispatches them to methods.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pykka

from ._types import UsageInfo

__all__ = ["EVENTS", "CacheListener", "notify"]

logger = logging.getLogger(__name__)

#: Events a :class:`CacheListener` may receive, as ``(event, *args)`` tells.
EVENTS = frozenset({"record_pruned", "prune_finished"})


class CacheListener(pykka.Actor):
    """Base for Pykka actors that receive cache events (Mopidy's listener pattern).

    Subscribe an actor with ``cache.manager.subscribe(actor_ref)``. Events are *told* as
    tuples ``(event, *args)`` and dispatched to the method of that name; override the ones
    you need. Other messages go to the next ``on_receive`` in the class hierarchy::

        class Progress(CacheListener, pykka.ThreadingActor):
            def record_pruned(self, info: UsageInfo) -> None:
                print("pruned", info.id, info.size)

    Any actor may subscribe instead, if it accepts these tuples in ``on_receive``.
    """

    def on_receive(self, message: Any) -> Any:
        """Dispatches event tuples to :meth:`on_event`; passes anything else on."""
        if (
            isinstance(message, tuple)
            and message
            and isinstance(message[0], str)
            and message[0] in EVENTS
        ):
            self.on_event(message[0], *message[1:])
            return None
        return super().on_receive(message)

    def on_event(self, event: str, *args: Any) -> None:
        """Calls the method named ``event``; a failing one is logged, not raised (Mopidy)."""
        try:
            getattr(self, event)(*args)
        except Exception:
            logger.exception("cache listener %r failed on %s", self, event)

    def record_pruned(self, info: UsageInfo) -> None:
        """A record was deleted by a prune (``info.size`` is its measured size)."""

    def prune_finished(self, records: int, reclaimed: int) -> None:
        """A prune is done: ``records`` deleted, ``reclaimed`` bytes by their sizes."""


def notify(listeners: Sequence[pykka.ActorRef[Any]], message: tuple[Any, ...]) -> list[Any]:
    """Tells each listener ``message``; returns the listeners that are gone."""
    gone = []
    for ref in listeners:
        try:
            ref.tell(message)
        except pykka.ActorDeadError:
            gone.append(ref)
    return gone
