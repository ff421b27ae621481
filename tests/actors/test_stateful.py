"""A hypothesis state machine drives the manager against a small model of BuildKit's rules.

The model keeps records (mutable or immutable, equal-pair links, layer parents, retain) and
handles (open, released, consumed). Each rule applies one operation to the real cache and to
the model; the invariants compare handle counts per record and ``disk_usage`` (which records
are shown, and which of them are in use) after every step.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from refcache.actors import (
    Cache,
    ImmutableRef,
    InvalidError,
    LockedError,
    MutableRef,
    NotFoundError,
    open_cache,
)

from refcache import storage

WAIT = 30.0


@dataclass
class ModelRecord:
    """A record as the model sees it."""

    id: str
    mutable: bool
    retain: bool = False
    parents: tuple[str, ...] = ()
    equal_mutable: str | None = None  # on an unfinalized immutable
    equal_immutable: str | None = None  # on a mutable with an unfinalized twin


@dataclass
class ModelHandle:
    """A handle and its state in the model."""

    ref: ImmutableRef | MutableRef
    record: str
    state: str = "open"  # "open" | "released" | "consumed"


@dataclass
class Model:
    """BuildKit's refcount rules (``cache/refs.go``), for layer records only."""

    records: dict[str, ModelRecord] = field(default_factory=dict)
    handles: list[ModelHandle] = field(default_factory=list)
    known_ids: list[str] = field(default_factory=list)

    def open_handles(self, record_id: str) -> int:
        return sum(1 for h in self.handles if h.record == record_id and h.state == "open")

    def holders(self, record_id: str) -> int:
        return sum(r.parents.count(record_id) for r in self.records.values())

    def refs(self, record_id: str) -> int:
        return self.open_handles(record_id) + self.holders(record_id)

    def add(self, record: ModelRecord) -> None:
        self.records[record.id] = record
        self.known_ids.append(record.id)

    def remove(self, record_id: str) -> None:
        r = self.records.pop(record_id)
        if r.equal_immutable and r.equal_immutable in self.records:
            self.records[r.equal_immutable].equal_mutable = None
        if r.equal_mutable and r.equal_mutable in self.records:
            self.records[r.equal_mutable].equal_immutable = None

    def locked(self, m: ModelRecord) -> bool:
        if self.open_handles(m.id):
            return True
        return bool(m.equal_immutable and self.refs(m.equal_immutable))

    def finalize(self, i: ModelRecord) -> None:
        if i.equal_mutable is not None:
            m_id, i.equal_mutable = i.equal_mutable, None
            self.records[m_id].equal_immutable = None
            self.remove(m_id)

    def last_release(self, r: ModelRecord) -> None:
        """A record's last handle went."""
        m = r if r.mutable else self.records.get(r.equal_mutable or "")
        if m is None or self.open_handles(m.id):
            return  # a plain immutable stays (only prune deletes it)
        if not m.retain:
            if m.equal_immutable:
                self.remove(m.equal_immutable)
            self.remove(m.id)

    def visible(self) -> set[str]:
        out = set()
        for rid, r in self.records.items():
            if r.equal_immutable and self.refs(r.equal_immutable) > 0:
                continue
            if r.equal_mutable and self.refs(rid) == 0:
                continue
            out.add(rid)
        return out

    def in_use(self) -> set[str]:
        used = {rid for rid in self.records if self.open_handles(rid)}
        work = list(used)
        while work:
            for p in self.records[work.pop()].parents:
                if p not in used:
                    used.add(p)
                    work.append(p)
        return used & self.visible()

    def prune(self) -> set[str]:
        reported: set[str] = set()
        while True:
            batch = [
                r
                for r in self.records.values()
                if self.refs(r.id) == 0
                and r.equal_mutable is None
                and not (r.equal_immutable and self.refs(r.equal_immutable) > 0)
            ]
            if not batch:
                return reported
            for r in batch:
                if r.equal_immutable:
                    self.remove(r.equal_immutable)
                self.remove(r.id)
                reported.add(r.id)


class CacheMachine(RuleBasedStateMachine):
    """The real cache and the model, step by step."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="refcache-stateful-"))
        self.cache: Cache = open_cache(self.tmp / "cache", snapshotter="native", timeout=WAIT)
        self.model = Model()

    def teardown(self) -> None:
        try:
            problems = storage.check(self.cache.root)
            self.cache.close()
            assert problems == []
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------------------

    def _handles(self, kind: type, states: tuple[str, ...] = ("open",)) -> list[ModelHandle]:
        return [h for h in self.model.handles if isinstance(h.ref, kind) and h.state in states]

    def _track(self, ref: ImmutableRef | MutableRef) -> None:
        self.model.handles.append(ModelHandle(ref, ref.id))

    # -- rules --------------------------------------------------------------------------------

    @rule(pick=st.integers(0, 1000), with_parent=st.booleans(), retain=st.booleans())
    def new(self, pick: int, with_parent: bool, retain: bool) -> None:
        parents = self._handles(ImmutableRef)
        parent = parents[pick % len(parents)] if parents and with_parent else None
        ref = self.cache.manager.new(parent.ref if parent else None, retain=retain).get(
            timeout=WAIT
        )
        if parent is not None:
            self.model.finalize(self.model.records[parent.record])
        self.model.add(
            ModelRecord(
                ref.id, mutable=True, retain=retain, parents=(parent.record,) if parent else ()
            )
        )
        self._track(ref)

    @precondition(lambda self: self._handles(MutableRef))
    @rule(pick=st.integers(0, 1000))
    def commit(self, pick: int) -> None:
        handles = self._handles(MutableRef)
        h = handles[pick % len(handles)]
        ref = h.ref
        assert isinstance(ref, MutableRef)
        immutable = ref.commit()
        h.state = "consumed"
        m = self.model.records[h.record]
        m.equal_immutable = immutable.id
        self.model.add(
            ModelRecord(immutable.id, mutable=False, parents=m.parents, equal_mutable=m.id)
        )
        self._track(immutable)

    @precondition(lambda self: self._handles(ImmutableRef, ("open", "released")))
    @rule(pick=st.integers(0, 1000))
    def clone(self, pick: int) -> None:
        handles = self._handles(ImmutableRef, ("open", "released"))
        h = handles[pick % len(handles)]
        ref = h.ref
        assert isinstance(ref, ImmutableRef)
        if h.record not in self.model.records:
            with pytest.raises(NotFoundError, match=h.record):
                ref.clone()
            return
        self._track(ref.clone())

    @precondition(lambda self: self.model.handles)
    @rule(pick=st.integers(0, 1000))
    def release(self, pick: int) -> None:
        h = self.model.handles[pick % len(self.model.handles)]
        h.ref.release()  # released or consumed: a counted no-op
        if h.state != "open":
            return
        h.state = "released"
        r = self.model.records[h.record]
        if self.model.open_handles(r.id) == 0:
            self.model.last_release(r)

    @precondition(lambda self: self.model.known_ids)
    @rule(pick=st.integers(0, 1000), unknown=st.booleans())
    def get(self, pick: int, unknown: bool) -> None:
        rid = (
            "unknown-record" if unknown else self.model.known_ids[pick % len(self.model.known_ids)]
        )
        r = self.model.records.get(rid)
        if r is None:
            with pytest.raises(NotFoundError, match=rid):
                self.cache.manager.get(rid).get(timeout=WAIT)
            return
        if r.mutable and self.model.locked(r):
            with pytest.raises(LockedError):
                self.cache.manager.get(rid).get(timeout=WAIT)
            return
        ref = self.cache.manager.get(rid).get(timeout=WAIT)
        if r.mutable:
            if r.equal_immutable:
                assert ref.id == r.equal_immutable
            else:  # implicit commit: a new twin
                r.equal_immutable = ref.id
                self.model.add(
                    ModelRecord(ref.id, mutable=False, parents=r.parents, equal_mutable=r.id)
                )
        else:
            assert ref.id == rid
        self._track(ref)

    @precondition(lambda self: self.model.known_ids)
    @rule(pick=st.integers(0, 1000))
    def get_mutable(self, pick: int) -> None:
        rid = self.model.known_ids[pick % len(self.model.known_ids)]
        r = self.model.records.get(rid)
        if r is None:
            with pytest.raises(NotFoundError, match=rid):
                self.cache.manager.get_mutable(rid).get(timeout=WAIT)
            return
        if not r.mutable:
            with pytest.raises(InvalidError, match=rid):
                self.cache.manager.get_mutable(rid).get(timeout=WAIT)
            return
        if self.model.locked(r):
            with pytest.raises(LockedError):
                self.cache.manager.get_mutable(rid).get(timeout=WAIT)
            return
        ref = self.cache.manager.get_mutable(rid).get(timeout=WAIT)
        if r.equal_immutable:  # the unreferenced twin is dropped
            self.model.remove(r.equal_immutable)
        self._track(ref)

    @precondition(lambda self: self._handles(ImmutableRef))
    @rule(pick=st.integers(0, 1000))
    def finalize(self, pick: int) -> None:
        handles = self._handles(ImmutableRef)
        h = handles[pick % len(handles)]
        ref = h.ref
        assert isinstance(ref, ImmutableRef)
        ref.finalize()
        self.model.finalize(self.model.records[h.record])

    @rule()
    def prune(self) -> None:
        reported = {r.id for r in self.cache.manager.prune().get(timeout=WAIT)}
        assert reported == self.model.prune()

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def handle_counts_match(self) -> None:
        stats = self.cache.manager.statistics().get(timeout=WAIT)
        real = {rid: n for rid, n, _ in stats.records_detail if n}
        expected = {rid: self.model.open_handles(rid) for rid in self.model.records}
        assert real == {rid: n for rid, n in expected.items() if n}
        assert stats.records == len(self.model.records)
        assert stats.open_handles == sum(expected.values())

    @invariant()
    def disk_usage_matches(self) -> None:
        rows = self.cache.manager.disk_usage().get(timeout=WAIT)
        assert {r.id for r in rows} == self.model.visible()
        assert {r.id for r in rows if r.in_use} == self.model.in_use()
        mutable = {rid for rid, r in self.model.records.items() if r.mutable}
        assert {r.id for r in rows if r.mutable} == mutable & self.model.visible()


CacheMachine.TestCase.settings = settings(
    max_examples=20,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCacheMachine = CacheMachine.TestCase
