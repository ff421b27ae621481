"""The random operation mix shared by ``loadtest.py`` and ``crashtest.py``.

A :class:`Client` is one thread's view of the cache: the handles it owns (never shared with
another thread: a second owner gets a ``clone()``, docs/API.md), and a seeded random choice of the
next operation. Every operation of the public API is in the mix: ``new``, writes into a
mutable's mount, ``commit``, ``get``, ``get_mutable``, ``clone``, ``release``, ``merge``,
``diff``, ``get_by_blob`` of generated layers (lazy, through a provider), ``extract``,
``size``, ``mount``, ``finalize``, ``get_remotes``, ``disk_usage`` and ``prune`` with
policies (everything unreferenced, ``all``, filters, ``keep_duration``, ``max_used_space``).

Errors are sorted two ways. *Expected* ones are BuildKit's answers to a race the mix
provokes on purpose (``get`` of a record another thread released and pruned:
``NotFoundError``; ``get_mutable`` of a held pair: ``LockedError``); they are counted per
operation. Everything else is a *violation*, recorded with its traceback; so are the online
checks: a prune that deletes a record some thread holds, a mount whose files are not what
was written or pulled.

A :class:`Watchdog` (``threading.Timer`` + ``faulthandler``) trips when any call takes longer
than its bound: it dumps every thread's stack and exits the process with
:data:`EXIT_WATCHDOG`.
"""

from __future__ import annotations

import faulthandler
import os
import random
import sys
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from refcache.actors import (
    Cache,
    CacheManager,
    ImmutableRef,
    InvalidError,
    LockedError,
    MutableRef,
    NotFoundError,
    PrunePolicy,
)
from refcache.actors._demo import GeneratedImage, LayerRegistry, generate_images

from refcache import storage

EXIT_VIOLATIONS = 1
EXIT_WATCHDOG = 3

#: Whether the blob operations (get_by_blob, lazy extract) exist in this checkout.
HAS_GET_BY_BLOB = hasattr(CacheManager, "get_by_blob")
HAS_GET_REMOTES = hasattr(ImmutableRef, "get_remotes")

#: Relative weights of the operations in the mix.
WEIGHTS: dict[str, float] = {
    "new": 8,
    "write": 8,
    "commit": 7,
    "get": 9,
    "get_mutable": 3,
    "clone": 8,
    "release": 17,
    "merge": 4,
    "diff": 4,
    "get_by_blob": 9,
    "extract": 4,
    "size": 4,
    "mount": 4,
    "finalize": 2,
    "disk_usage": 1.5,
    "prune": 0.6,
    "get_remotes": 1.5,
}
MAX_HELD = 48  #: a client holding more handles than this releases one
DATA_FILE = "data.txt"


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile of an already sorted list (nearest rank); 0 when empty."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(int(len(sorted_values) * q), len(sorted_values) - 1)]


def snapshot_dirs(root: Path) -> int:
    """Snapshot directories under ``root/snapshots`` (leftover ``new-*``/``rm-*`` included)."""
    base = root / "snapshots" / "snapshots"
    if not base.is_dir():
        base = root / "snapshots"
    if not base.is_dir():
        return 0
    return sum(1 for p in base.iterdir() if p.is_dir())


def blob_files(root: Path) -> int:
    """Blob files under ``root/content/blobs``."""
    base = root / "content" / "blobs"
    if not base.is_dir():
        return 0
    return sum(1 for p in base.rglob("*") if p.is_file())


def make_registry(seed: int, *, files: int = 12, file_size: int = 2048) -> LayerRegistry:
    """The generated images the mix pulls: 3 bases of 3 layers, 6 apps sharing them."""
    registry = LayerRegistry()
    for image in generate_images(seed, files=files, file_size=file_size):
        registry.add_image(image)
    return registry


# -- shared state -------------------------------------------------------------------------------


class Shared:
    """What the clients share (each piece behind the one lock; it lives outside all actors).

    Attributes:
        seeds: Ids of records held for the whole run (never pruned, ``get`` always works).
        held: Handles open per record id, counted *after* an acquisition returned and
            *before* a release is sent: a prune that deleted a record counted here deleted a
            held record.
    """

    def __init__(self, registry: LayerRegistry, seeds: list[str]) -> None:
        self.lock = threading.Lock()
        self.registry = registry
        self.images: list[GeneratedImage] = registry.images
        self.handlers = registry.handlers()
        self.seeds = list(seeds)
        self._published: deque[str] = deque(maxlen=4096)
        self._mutables: deque[str] = deque(maxlen=1024)
        self.held: Counter[str] = Counter()
        #: record id -> expected content of DATA_FILE ("" = no such file)
        self.content: dict[str, str] = {}
        #: record id -> files its top layer must show (paths of a pulled layer)
        self.layer_files: dict[str, tuple[str, ...]] = {}
        self.ops_started = 0

    def publish(self, record_id: str) -> None:
        with self.lock:
            self._published.append(record_id)

    def publish_mutable(self, record_id: str) -> None:
        with self.lock:
            self._mutables.append(record_id)

    def pick_mutable(self, rng: random.Random) -> str | None:
        """A published mutable id (most are held, committed or gone: that is the point)."""
        with self.lock:
            n = len(self._mutables)
            return self._mutables[rng.randrange(n)] if n else None

    def pick(self, rng: random.Random) -> tuple[str, bool]:
        """A published id (or a seed); returns ``(id, is_seed)``."""
        with self.lock:
            n = len(self._published)
            if n and (not self.seeds or rng.random() < 0.85):
                return self._published[rng.randrange(n)], False
        return rng.choice(self.seeds), True

    def acquired(self, record_id: str) -> None:
        with self.lock:
            self.held[record_id] += 1

    def releasing(self, record_id: str) -> None:
        with self.lock:
            self.held[record_id] -= 1
            if self.held[record_id] <= 0:
                del self.held[record_id]

    def held_now(self, ids: list[str]) -> list[str]:
        with self.lock:
            return [rid for rid in ids if self.held.get(rid, 0) > 0]


@dataclass
class OpStats:
    """Latencies (seconds) and outcomes of one client's operations."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, op: str, outcome: str, seconds: float) -> None:
        self.latencies.setdefault(op, []).append(seconds)
        self.outcomes[(op, outcome)] += 1

    def merge(self, other: OpStats) -> None:
        for op, values in other.latencies.items():
            self.latencies.setdefault(op, []).extend(values)
        self.outcomes.update(other.outcomes)


# -- watchdog ----------------------------------------------------------------------------------


class Watchdog:
    """Trips when any tracked call runs longer than ``bound`` seconds.

    A ``threading.Timer`` re-armed every ``period`` seconds looks at the calls in flight;
    on a trip it writes which thread is stuck in what, dumps every thread's stack with
    ``faulthandler`` and exits the process (``os._exit``: a wedged actor must not keep it
    alive) with :data:`EXIT_WATCHDOG`.

    Args:
        bound: Seconds a single call may take.
        period: Seconds between checks.
        on_trip: Called (instead of exiting) when the watchdog trips; for tests.
    """

    def __init__(
        self,
        bound: float,
        *,
        period: float = 1.0,
        on_trip: Callable[[str], None] | None = None,
    ) -> None:
        self.bound = bound
        self.period = period
        self.on_trip = on_trip
        self.tripped = False
        self._lock = threading.Lock()
        self._inflight: dict[int, tuple[str, str, float]] = {}
        self._timer: threading.Timer | None = None
        self._stopped = False

    @contextmanager
    def call(self, what: str) -> Iterator[None]:
        """Tracks the block as one call named ``what``."""
        ident = threading.get_ident()
        name = threading.current_thread().name
        with self._lock:
            self._inflight[ident] = (name, what, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                self._inflight.pop(ident, None)

    def start(self) -> Watchdog:
        with self._lock:
            if self._stopped:
                return self
            self._timer = threading.Timer(self.period, self._check)
            self._timer.daemon = True
            self._timer.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._timer is not None:
                self._timer.cancel()

    def _check(self) -> None:
        now = time.monotonic()
        with self._lock:
            stuck = [
                (name, what, now - start)
                for name, what, start in self._inflight.values()
                if now - start > self.bound
            ]
        if stuck:
            self._trip(stuck)
            return
        self.start()

    def _trip(self, stuck: list[tuple[str, str, float]]) -> None:
        self.tripped = True
        lines = [f"watchdog: a call took longer than {self.bound:g} s:"]
        lines += [f"  thread {name}: {what} for {secs:.1f} s" for name, what, secs in stuck]
        message = "\n".join(lines)
        sys.stdout.flush()
        sys.stderr.write(message + "\nwatchdog: stacks of every thread:\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        if self.on_trip is not None:
            self.on_trip(message)
            return
        os._exit(EXIT_WATCHDOG)


# -- one client ---------------------------------------------------------------------------------


class InvariantError(Exception):
    """An online check failed (reported like an unexpected error)."""


Reporter = Callable[[str], None]


class Client:
    """One thread's handles and its seeded operation mix (owned by that thread).

    Args:
        name: Thread name (also in record descriptions).
        cache: The open cache.
        shared: State shared between clients.
        seed: Seed of this client's choices.
        watchdog: Tracks each call.
        timeout: Seconds any ``Future.get`` may wait.
        ops: Operations allowed (default: every operation available).
        report: Called with one line per durable fact (crashtest children print it).
    """

    def __init__(
        self,
        name: str,
        cache: Cache,
        shared: Shared,
        seed: int,
        watchdog: Watchdog,
        *,
        timeout: float,
        ops: dict[str, float] | None = None,
        report: Reporter | None = None,
        prune_policies: Callable[[random.Random], tuple[PrunePolicy, ...]] | None = None,
    ) -> None:
        self.name = name
        self.cache = cache
        self.manager = cache.manager
        self.shared = shared
        self.rng = random.Random(seed)
        self.watchdog = watchdog
        self.timeout = timeout
        weights = dict(ops if ops is not None else WEIGHTS)
        if not HAS_GET_BY_BLOB:
            weights.pop("get_by_blob", None)
        if not HAS_GET_REMOTES:
            weights.pop("get_remotes", None)
        self.op_names = list(weights)
        self.op_weights = [weights[o] for o in self.op_names]
        self.report = report
        self.prune_policies = prune_policies or default_prune_policies
        self.imms: list[ImmutableRef] = []
        self.muts: list[MutableRef] = []
        self.released: deque[ImmutableRef] = deque(maxlen=64)
        self.blob_pos: dict[ImmutableRef, tuple[int, int]] = {}
        self.retained: set[str] = set()  # ids of retained mutables this client created
        self.stats = OpStats()
        self.errors: list[str] = []
        self.writes = 0

    # -- bookkeeping --------------------------------------------------------------------

    def _got_imm(self, ref: ImmutableRef) -> ImmutableRef:
        self.imms.append(ref)
        self.shared.acquired(ref.id)
        return ref

    def _got_mut(self, ref: MutableRef) -> MutableRef:
        self.muts.append(ref)
        self.shared.acquired(ref.id)
        return ref

    def _emit(self, line: str) -> None:
        if self.report is not None:
            self.report(line)

    def held(self) -> list[ImmutableRef | MutableRef]:
        return [*self.imms, *self.muts]

    def release_one(self, ref: ImmutableRef | MutableRef) -> None:
        if isinstance(ref, ImmutableRef):
            self.imms.remove(ref)
            self.blob_pos.pop(ref, None)
            self.released.append(ref)
        else:
            self.muts.remove(ref)
            if ref.id in self.retained:
                # A released retained mutable stays: get_mutable can take it (BuildKit).
                self.retained.discard(ref.id)
                self.shared.publish_mutable(ref.id)
        self.shared.releasing(ref.id)
        self._emit(f"RELEASE {ref.id}")
        ref.release()

    def release_all(self) -> None:
        for ref in list(self.held()):
            self.release_one(ref)

    # -- the loop -----------------------------------------------------------------------

    def step(self) -> bool:
        """Runs one operation (or a forced release when holding too much).

        Returns:
            Whether an operation ran (``False``: the one drawn was not applicable).
        """
        if len(self.imms) + len(self.muts) > MAX_HELD:
            op = "release"
        else:
            op = self.rng.choices(self.op_names, self.op_weights)[0]
        fn = getattr(self, "op_" + op)
        start = time.perf_counter()
        try:
            with self.watchdog.call(op):
                outcome = fn()
        except (InvariantError, Exception) as exc:
            self.stats.add(op, "VIOLATION", time.perf_counter() - start)
            detail = traceback.format_exc()
            self.errors.append(f"[{self.name}] {op}: {type(exc).__name__}: {exc}\n{detail}")
            first = str(exc).splitlines()[0] if str(exc) else ""
            self._emit(f"VIOLATION {op} {type(exc).__name__}: {first}")
            return True
        if outcome is None:  # not applicable now: not counted
            return False
        self.stats.add(op, outcome, time.perf_counter() - start)
        return True

    def run(self, stop: threading.Event, max_ops: int | None) -> None:
        """Runs operations until ``stop`` is set or the shared operation budget is spent."""
        for _ in range(10**9):  # bounded: stop or the op budget ends it long before
            if stop.is_set():
                return
            if max_ops is None:
                self.step()
                continue
            with self.shared.lock:  # reserve one operation of the budget
                if self.shared.ops_started >= max_ops:
                    return
                self.shared.ops_started += 1
            if not self.step():
                with self.shared.lock:  # nothing ran: give the reservation back
                    self.shared.ops_started -= 1

    # -- operations (each returns an outcome, or None when not applicable) ----------------

    def _pick_imm(self) -> ImmutableRef | None:
        return self.rng.choice(self.imms) if self.imms else None

    def op_new(self) -> str:
        rng = self.rng
        parent = self._pick_imm() if rng.random() < 0.6 else None
        retain = rng.random() < 0.4
        m = self.manager.new(
            parent,
            retain=retain,
            description=f"load {self.name} step",
            record_type="internal" if rng.random() < 0.1 else None,
        ).get(timeout=self.timeout)
        self._got_mut(m)
        if retain:
            self.retained.add(m.id)
        with self.shared.lock:
            if parent is None:
                self.shared.content[m.id] = ""
            elif parent.id in self.shared.content:
                self.shared.content[m.id] = self.shared.content[parent.id]
        self.shared.publish(m.id)
        self.shared.publish_mutable(m.id)
        return "ok"

    def op_write(self) -> str | None:
        if not self.muts:
            return None
        m = self.rng.choice(self.muts)
        self.writes += 1
        text = f"{m.id}:{self.name}:{self.writes}"
        with m.mount().local() as path:
            (path / DATA_FILE).write_text(text)
            for _ in range(self.rng.randint(0, 2)):
                name = f"w{self.rng.randrange(64):02d}.bin"
                (path / name).write_bytes(self.rng.randbytes(self.rng.randint(256, 8192)))
        with self.shared.lock:
            self.shared.content[m.id] = text
        return "ok"

    def op_commit(self) -> str | None:
        if not self.muts:
            return None
        m = self.rng.choice(self.muts)
        self.muts.remove(m)
        self.shared.releasing(m.id)
        i = m.commit()
        self._got_imm(i)
        if m.id in self.retained:
            # The retained pair's mutable comes back with get_mutable once i is released.
            self.retained.discard(m.id)
            self.shared.publish_mutable(m.id)
        with self.shared.lock:
            content = self.shared.content.get(m.id)
            if content is not None:
                self.shared.content[i.id] = content
        self.shared.publish(i.id)
        if self.rng.random() < 0.3:
            i.finalize()
        self._emit(f"COMMIT {i.id} {content if content else '-'}")
        return "ok"

    def op_get(self) -> str:
        rid, is_seed = self.shared.pick(self.rng)
        try:
            ref = self.manager.get(rid, desc_handlers=self.shared.handlers).get(
                timeout=self.timeout
            )
        except LockedError:
            return "LockedError"  # a published mutable somebody holds
        except NotFoundError:
            if is_seed:
                raise
            return "NotFoundError"  # released and pruned (or a default-policy pair gone)
        self._got_imm(ref)
        return "ok"

    def op_get_mutable(self) -> str:
        rid = self.shared.pick_mutable(self.rng) if self.rng.random() < 0.8 else None
        if rid is None:
            rid, _ = self.shared.pick(self.rng)
        try:
            m = self.manager.get_mutable(rid).get(timeout=self.timeout)
        except (NotFoundError, LockedError, InvalidError) as exc:
            return type(exc).__name__
        self._got_mut(m)
        return "ok"

    def op_clone(self) -> str | None:
        if self.released and self.rng.random() < 0.2:
            old = self.rng.choice(self.released)
            try:
                ref = old.clone()
            except NotFoundError:
                return "NotFoundError"  # the record went since that handle was released
            self._got_imm(ref)
            return "ok"
        src = self._pick_imm()
        if src is None:
            return None
        ref = self._got_imm(src.clone())
        if src in self.blob_pos:
            self.blob_pos[ref] = self.blob_pos[src]
        return "ok"

    def op_release(self) -> str | None:
        held = self.held()
        if not held:
            return None
        self.release_one(self.rng.choice(held))
        return "ok"

    def op_merge(self) -> str | None:
        if len(self.imms) < 2:
            return None
        inputs = self.rng.sample(self.imms, min(len(self.imms), self.rng.choice((2, 2, 3))))
        ref = self.manager.merge(inputs).get(timeout=self.timeout)
        if ref is not None:
            self._got_imm(ref)
            self.shared.publish(ref.id)
        return "ok"

    def op_diff(self) -> str | None:
        lower = self._pick_imm()
        if lower is None:
            return None
        upper = self.rng.choice([*self.imms, None])
        ref = self.manager.diff(lower, upper).get(timeout=self.timeout)
        self._got_imm(ref)
        self.shared.publish(ref.id)
        return "ok"

    def op_get_by_blob(self) -> str:
        rng = self.rng
        images = self.shared.images
        extendable = [
            (ref, pos)
            for ref, pos in self.blob_pos.items()
            if pos[1] + 1 < len(images[pos[0]].layers)
        ]
        if extendable and rng.random() < 0.75:
            parent, (img, idx) = rng.choice(extendable)
            idx += 1
        else:
            parent, img, idx = None, rng.randrange(len(images)), 0
        layer = images[img].layers[idx]
        if rng.random() < 0.25:
            # The image store already has the blob (a pull by someone else).
            self.cache.content.write_blob(layer.blob, layer.desc)
        extract = rng.random() < 0.2
        ref = self.manager.get_by_blob(
            layer.desc,
            parent,
            desc_handlers=self.shared.handlers,
            extract=extract,
            description=f"pulled {layer.name}",
        ).get(timeout=self.timeout)
        self._got_imm(ref)
        self.blob_pos[ref] = (img, idx)
        with self.shared.lock:
            self.shared.layer_files[ref.id] = layer.files
        self.shared.publish(ref.id)
        # Lazy records do not survive a restart (BuildKit's init drops records whose blob
        # needs a provider); extracted ones must.
        self._emit(f"BLOB {ref.id} {layer.digest} {'extracted' if extract else 'lazy'}")
        return "ok"

    def op_extract(self) -> str | None:
        pool = list(self.blob_pos) if self.blob_pos and self.rng.random() < 0.8 else self.imms
        if not pool:
            return None
        ref = self.rng.choice(pool)
        self._emit(f"BEGIN extract {ref.id}")
        result = "failed"
        try:
            ref.extract(self.shared.handlers)
            result = "ok"
        finally:
            self._emit(f"END extract {ref.id} {result}")
        return "ok"

    def op_size(self) -> str | None:
        ref = self._pick_imm()
        if ref is None:
            return None
        size = ref.size()
        if size < 0:
            msg = f"size of {ref.id} is {size}"
            raise InvariantError(msg)
        return "ok"

    def op_mount(self) -> str | None:
        ref = self._pick_imm()
        if ref is None:
            return None
        with self.shared.lock:
            expected = self.shared.content.get(ref.id)
            files = self.shared.layer_files.get(ref.id, ())
        with ref.mount().local() as path:
            if expected is not None:
                found = (path / DATA_FILE).read_text() if (path / DATA_FILE).exists() else ""
                if found != expected:
                    msg = f"record {ref.id}: {DATA_FILE} is {found!r}, expected {expected!r}"
                    raise InvariantError(msg)
            missing = [f for f in files[:3] if not (path / f).is_file()]
            if missing:
                msg = f"record {ref.id}: pulled files missing from the mount: {missing}"
                raise InvariantError(msg)
        return "ok"

    def op_finalize(self) -> str | None:
        ref = self._pick_imm()
        if ref is None:
            return None
        ref.finalize()
        return "ok"

    def op_get_remotes(self) -> str | None:
        ref = self._pick_imm()
        if ref is None:
            return None
        compression = self.rng.choice(("gzip", "gzip", "zstd", "uncompressed"))
        remotes = ref.get_remotes(compression)
        for remote in remotes:
            for desc in remote.descriptors:
                if desc.size < 0:
                    msg = f"record {ref.id}: remote descriptor {desc.digest} has size {desc.size}"
                    raise InvariantError(msg)
        return "ok"

    def op_disk_usage(self) -> str:
        rng = self.rng
        filters: tuple[str, ...] = ()
        if rng.random() < 0.3:
            filters = (rng.choice(("mutable==true", "description~=pulled", "type==internal")),)
        age = timedelta(seconds=1) if rng.random() < 0.2 else None
        rows = self.manager.disk_usage(filters, age_limit=age).get(timeout=self.timeout)
        bad = [r.id for r in rows if r.size < -1]
        if bad:
            msg = f"disk usage rows with negative sizes: {bad[:5]}"
            raise InvariantError(msg)
        return "ok"

    def op_prune(self) -> str:
        policies = self.prune_policies(self.rng)
        self._emit("BEGIN prune")
        try:
            deleted = self.manager.prune(*policies).get(timeout=self.timeout)
        finally:
            self._emit("END prune")
        held = self.shared.held_now([r.id for r in deleted])
        if held:
            msg = f"prune {policies} deleted records that are held: {held[:5]}"
            raise InvariantError(msg)
        return "ok"


def default_prune_policies(rng: random.Random) -> tuple[PrunePolicy, ...]:
    """A random prune: everything unreferenced, by filter, by age, or by size."""
    choice = rng.randrange(6)
    if choice == 0:
        return (PrunePolicy(),)
    if choice == 1:
        return (PrunePolicy(all=True),)
    if choice == 2:
        return (PrunePolicy(filters=("description~=pulled",)),)
    if choice == 3:
        return (PrunePolicy(keep_duration=timedelta(seconds=2)),)
    if choice == 4:
        return (PrunePolicy(max_used_space=rng.choice((1, 2, 8)) * 1024 * 1024),)
    return (
        PrunePolicy(filters=("type==internal",), all=True),
        PrunePolicy(keep_duration=timedelta(seconds=5), max_used_space=4 * 1024 * 1024),
    )


# -- seeds and final invariants ----------------------------------------------------------------


def make_seeds(cache: Cache, timeout: float, n: int = 4) -> list[ImmutableRef]:
    """Retained, finalized records held for the whole run (``get`` of them always works)."""
    seeds: list[ImmutableRef] = []
    parent: ImmutableRef | None = None
    for i in range(n):
        m = cache.manager.new(
            parent if i % 2 else None, retain=True, description=f"load seed {i}"
        ).get(timeout=timeout)
        with m.mount().local() as path:
            (path / f"seed{i}").write_text(str(i))
        ref = m.commit()
        ref.finalize()
        seeds.append(ref)
        parent = ref
    return seeds


@dataclass
class CheckResult:
    """One final invariant: its name, whether it held, and what was found."""

    name: str
    ok: bool
    detail: str = ""


def final_invariants(
    cache: Cache,
    clients: list[Client],
    seeds: list[ImmutableRef],
    watchdog: Watchdog,
    timeout: float,
) -> list[CheckResult]:
    """Checks the end-of-run invariants; releases everything on the way.

    1. every handle the clients hold is counted exactly (per record, and in total);
    2. after releasing all, ``disk_usage`` shows nothing in use;
    3. ``prune(all)`` leaves 0 records, 0 snapshot directories, 0 blobs, 0 leases;
    4. ``storage.check`` is empty.
    """
    out: list[CheckResult] = []
    manager = cache.manager
    with watchdog.call("final: statistics"):
        stats = manager.statistics().get(timeout=timeout)
    counted = {rid: n for rid, n, _ in stats.records_detail if n}
    held: Counter[str] = Counter(ref.id for ref in seeds)
    for c in clients:
        held.update(ref.id for ref in c.held())
    diff = {
        rid: (counted.get(rid, 0), held.get(rid, 0))
        for rid in set(counted) | set(held)
        if counted.get(rid, 0) != held.get(rid, 0)
    }
    out.append(
        CheckResult(
            "handles held == handles counted",
            not diff and stats.open_handles == sum(held.values()),
            f"{sum(held.values())} handles on {len(held)} records; "
            f"counted {stats.open_handles}"
            + (f"; mismatches (counted, held): {dict(list(diff.items())[:5])}" if diff else ""),
        )
    )
    with watchdog.call("final: release all"):
        for c in clients:
            c.release_all()
        for ref in seeds:
            ref.release()
    with watchdog.call("final: disk_usage"):
        rows = manager.disk_usage().get(timeout=timeout)
    in_use = [r.id for r in rows if r.in_use]
    out.append(
        CheckResult(
            "nothing in use after releasing all",
            not in_use,
            f"{len(rows)} records, {len(in_use)} in use" + (f": {in_use[:5]}" if in_use else ""),
        )
    )
    with watchdog.call("final: prune(all)"):
        manager.prune(PrunePolicy(all=True)).get(timeout=timeout)
        stats = manager.statistics().get(timeout=timeout)
        leases = cache.leases.list()
    dirs = snapshot_dirs(cache.root)
    blobs = blob_files(cache.root)
    content = sum(1 for _ in cache.content.walk())
    out.append(
        CheckResult(
            "prune(all) leaves nothing",
            (stats.records, stats.open_handles, dirs, blobs, content, len(leases)) == (0,) * 6,
            f"records={stats.records} handles={stats.open_handles} snapshot_dirs={dirs} "
            f"blob_files={blobs} blobs={content} leases={len(leases)}",
        )
    )
    with watchdog.call("final: storage.check"):
        problems = storage.check(cache.root)
    out.append(
        CheckResult(
            "storage.check is empty",
            not problems,
            f"{len(problems)} problems" + (f": {problems[:5]}" if problems else ""),
        )
    )
    return out


def ops_table(stats: OpStats, seconds: float) -> tuple[list[dict[str, Any]], str]:
    """Per-operation rows (count, ops/s, p50/p99/max ms, outcomes) and a printable table."""
    rows: list[dict[str, Any]] = []
    for op in sorted(stats.latencies):
        values = sorted(stats.latencies[op])
        outcomes = {o: n for (name, o), n in stats.outcomes.items() if name == op}
        rows.append(
            {
                "op": op,
                "count": len(values),
                "ops_per_s": len(values) / seconds if seconds else 0.0,
                "p50_ms": percentile(values, 0.50) * 1e3,
                "p99_ms": percentile(values, 0.99) * 1e3,
                "max_ms": (values[-1] if values else 0.0) * 1e3,
                "outcomes": outcomes,
            }
        )
    total = sum(r["count"] for r in rows)
    head = (
        f"{'operation':<12} {'count':>8} {'ops/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>9}  outcomes"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        other = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items()) if k != "ok")
        lines.append(
            f"{r['op']:<12} {r['count']:>8} {r['ops_per_s']:>8.1f} {r['p50_ms']:>8.2f} "
            f"{r['p99_ms']:>8.2f} {r['max_ms']:>9.1f}  ok {r['outcomes'].get('ok', 0)}"
            + (f", {other}" if other else "")
        )
    lines.append("-" * len(head))
    lines.append(f"{'total':<12} {total:>8} {total / seconds if seconds else 0:>8.1f}")
    return rows, "\n".join(lines)
