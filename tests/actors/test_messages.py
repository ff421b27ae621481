"""The actors' typed protocols: every message has one handler and a sender, and both are typed.

The dispatch tables are read from the classes themselves (as the actors build them); the
senders are found in the source of the ``actors`` package (a call that constructs the message
class, outside the modules that define the protocols). A handler nothing sends, or a message
nobody handles, fails here.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from refcache.actors import Cache, InvalidError
from refcache.actors import _messages as manager_protocol
from refcache.actors import _record_messages as record_protocol
from refcache.actors._blobrecords import BlobRecords
from refcache.actors._manager import CacheManager
from refcache.actors._messages import CloneRecord, Ping
from refcache.actors._protocol import Message, bound_table, handled_message, handler_table, handles
from refcache.actors._pruner import Pruner
from refcache.actors._record import CacheRecord
from refcache.actors._record_messages import CountHandles

ACTORS = Path(__file__).resolve().parents[2] / "actors"
PROTOCOL_MODULES = {"_messages.py", "_record_messages.py"}
WAIT = 30.0


def message_classes(module: Any) -> set[type[Message[Any]]]:
    """The message classes a protocol module defines."""
    return {
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, Message)
        and obj is not Message
        and obj.__module__ == module.__name__
    }


def handlers_by_message(*owners: type) -> Counter[type[Message[Any]]]:
    """How many handlers each message class has over ``owners``."""
    counts: Counter[type[Message[Any]]] = Counter()
    for owner in owners:
        counts.update(list(handler_table(owner)))
    return counts


def constructed_names() -> Counter[str]:
    """Names called as ``Name(...)`` in the actors package, outside the protocol modules."""
    calls: Counter[str] = Counter()
    for path in sorted(ACTORS.glob("*.py")):
        if path.name in PROTOCOL_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                calls[node.func.id] += 1
    return calls


MANAGER_OWNERS = (CacheManager, BlobRecords, Pruner)


def test_every_manager_message_has_exactly_one_handler() -> None:
    counts = handlers_by_message(*MANAGER_OWNERS)
    messages = message_classes(manager_protocol)
    assert messages, "no message classes found"
    assert {m.__name__: counts[m] for m in messages} == {m.__name__: 1 for m in messages}
    assert set(counts) == messages, "a manager handler takes a message of another protocol"


def test_every_record_message_has_exactly_one_handler() -> None:
    counts = handlers_by_message(CacheRecord)
    messages = message_classes(record_protocol)
    assert messages, "no message classes found"
    assert {m.__name__: counts[m] for m in messages} == {m.__name__: 1 for m in messages}
    assert set(counts) == messages, "a record handler takes a message of another protocol"


@pytest.mark.parametrize("module", [manager_protocol, record_protocol], ids=lambda m: m.__name__)
def test_every_message_is_sent_somewhere(module: Any) -> None:
    sent = constructed_names()
    unsent = sorted(m.__name__ for m in message_classes(module) if sent[m.__name__] == 0)
    assert unsent == [], f"message classes nothing sends (dead handlers): {unsent}"


def test_each_handler_takes_the_message_it_is_registered_for() -> None:
    for owner in (*MANAGER_OWNERS, CacheRecord):
        for message, fn in handler_table(owner).items():
            params = list(inspect.signature(fn).parameters.values())
            assert len(params) == 2, f"{owner.__name__}.{fn.__name__} takes (self, message)"
            # Annotations are strings (from __future__ import annotations).
            assert params[1].annotation == message.__name__, (owner.__name__, fn.__name__)
            assert fn.__annotations__.get("return"), f"{fn.__name__} has no reply type"


def test_messages_are_frozen_and_slotted() -> None:
    for module in (manager_protocol, record_protocol):
        for message in message_classes(module):
            assert dataclasses.is_dataclass(message), message.__name__
            instance = message(*(None for _ in dataclasses.fields(message)))
            assert not hasattr(instance, "__dict__"), f"{message.__name__} is not slotted"
            field = next(iter(dataclasses.fields(message)), None)
            if field is not None:
                with pytest.raises(dataclasses.FrozenInstanceError):
                    setattr(instance, field.name, None)


def test_a_message_class_handled_twice_fails_when_the_table_is_built() -> None:
    class Twice:
        @handles(Ping)
        def _one(self, m: Ping) -> bool:
            return True

    class Again:
        @handles(Ping)
        def _other(self, m: Ping) -> bool:
            return False

    assert handled_message(Twice._one) is Ping
    with pytest.raises(TypeError, match="Ping is handled twice"):
        bound_table(Twice(), Again())


def test_a_message_the_actor_does_not_handle_is_refused_with_its_name(cache: Cache) -> None:
    manager = cache.manager.actor_ref
    with pytest.raises(InvalidError, match="does not understand CountHandles"):
        manager.ask(CountHandles(), timeout=WAIT)
    with pytest.raises(InvalidError, match="does not understand"):
        manager.ask(("clone", "x"), timeout=WAIT)  # the old tuple form is gone
    assert manager.ask(Ping(), timeout=WAIT) is True


def test_the_typed_ask_returns_the_declared_reply(cache: Cache) -> None:
    ref = cache.manager.new().get(timeout=WAIT).commit()
    try:
        grant = cache._core.ask_manager(CloneRecord(ref.id))
        assert grant.record_id == ref.id
        assert grant.handle_id > 0
        assert grant.actor.is_alive()
    finally:
        ref.release()


def test_mypy_rejects_a_wrong_reply_type_at_both_ends(tmp_path: Path) -> None:
    # The check this file cannot make at run time: mypy sees the reply type of a message at
    # the handler and at the sender. (A stand-alone module, so mypy checks only the protocol.)
    source = Path(inspect.getfile(Message)).read_text()
    protocol = tmp_path / "protocol.py"
    protocol.write_text(
        source.replace("from ..storage import CacheTimeoutError, ClosedError", "")
        .replace("CacheTimeoutError(msg)", "TimeoutError(msg)")
        .replace("ClosedError(msg)", "RuntimeError(msg)")
    )
    (tmp_path / "use.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass

            import pykka
            from protocol import Message, ask, handles

            @dataclass(frozen=True, slots=True)
            class Count(Message[int]):
                pass

            @dataclass(frozen=True, slots=True)
            class Name(Message[str]):
                pass

            class Actor:
                @handles(Count)
                def good(self, m: Count) -> int:
                    return 1

                @handles(Count)
                def wrong_reply(self, m: Count) -> str:
                    return ""

                @handles(Count)
                def wrong_message(self, m: Name) -> int:
                    return 1

            def sender(actor: pykka.ActorRef[object]) -> None:
                n: str = ask(actor, Count(), 1.0)
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--ignore-missing-imports", "use.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert 'incompatible type "Callable[[Actor, Count], str]"' in out, out
    assert 'incompatible type "Callable[[Actor, Name], int]"' in out, out
    assert 'expression has type "int", variable has type "str"' in out, out
    assert "good" not in out, out
