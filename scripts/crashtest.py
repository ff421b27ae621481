"""Crash test: kill a loaded cache with SIGKILL at random moments, reopen it, check it.

Each cycle starts a child process (this script with ``--child``) that opens the cache and
runs the operation mix of ``scripts/_workload.py`` in several threads. The child reports on
stdout, one flushed line each, what must survive it:

* ``COMMIT <id> <content>`` after ``commit()`` returned (``<content>`` is what the record's
  ``data.txt`` holds, ``-`` when unknown), ``BLOB <id> <digest>`` after ``get_by_blob``;
* ``RELEASE <id>`` *before* it releases a handle of that record (from then on the record
  may legitimately go: released records are pruned);
* ``BEGIN``/``END`` around prunes and extracts, ``VIOLATION`` for an unexpected error.

The parent kills the child with SIGKILL at a random moment; in some cycles right after a
``BEGIN prune`` or ``BEGIN extract`` line (so the kill lands while a prune deletes or an
extract unpacks), in some during start-up (while loading repairs the last crash). Then it
reopens the cache and checks:

1. ``storage.check`` is empty after open;
2. every record reported committed and not released since is there, with its content;
3. nothing leaks: every ``--prune-every`` cycles and after the last, releasing everything
   and ``prune(all)`` leave 0 records, 0 snapshot directories, 0 blobs, 0 leases.

Exit status 0 when every cycle passed, 1 otherwise. A summary table is printed.

    python scripts/crashtest.py --cycles 50 --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workload import (
    DATA_FILE,
    EXIT_VIOLATIONS,
    HAS_GET_BY_BLOB,
    WEIGHTS,
    Client,
    Shared,
    Watchdog,
    blob_files,
    make_registry,
    snapshot_dirs,
)
from refcache.actors import NotFoundError, PrunePolicy, RefcacheError, open_cache

from refcache import storage

#: The child's mix: the load test's, with more prunes and extracts (the kill targets).
CHILD_WEIGHTS = {**WEIGHTS, "prune": 2.5, "extract": 6.0, "get_by_blob": 10.0}
LAYER_FILES, LAYER_FILE_SIZE = 32, 32 * 1024  #: ~1 MB layers: extraction takes a while
KILL_MODES = ("random", "random", "prune", "prune", "extract", "extract", "startup")


# -- the child ------------------------------------------------------------------------------


def child_main(args: argparse.Namespace) -> int:
    """Runs the mix until killed (or ``--max-run`` + 30 s pass: a bounded child)."""
    out_lock = threading.Lock()

    def report(line: str) -> None:
        with out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    timeout = 120.0
    watchdog = Watchdog(90.0).start()
    registry = make_registry(args.seed, files=LAYER_FILES, file_size=LAYER_FILE_SIZE)
    with open_cache(args.root, timeout=timeout) as cache:
        rows = cache.manager.disk_usage().get(timeout=timeout)
        shared = Shared(registry, [])
        for row in rows:  # records of earlier cycles are fair game for get/get_mutable
            shared.publish(row.id)
            if row.mutable:
                shared.publish_mutable(row.id)
        if not rows:
            shared.publish("no-such-record")
        clients = [
            Client(
                f"k{i}",
                cache,
                shared,
                args.seed * 100_000 + args.cycle * 100 + i,
                watchdog,
                timeout=timeout,
                ops=CHILD_WEIGHTS,
                report=report,
            )
            for i in range(args.threads)
        ]
        stop = threading.Event()
        threads = [
            threading.Thread(target=c.run, args=(stop, None), name=c.name, daemon=True)
            for c in clients
        ]
        report(f"READY {len(rows)}")
        for t in threads:
            t.start()
        stop.wait(args.max_run + 30.0)  # the parent kills us long before
        stop.set()
        for t in threads:
            t.join(timeout=timeout)
        for c in clients:
            c.release_all()
    watchdog.stop()
    report("EXIT")
    return 0


# -- the parent ------------------------------------------------------------------------------


@dataclass
class Cycle:
    """What one cycle did and found."""

    cycle: int
    mode: str
    killed_after_s: float = 0.0
    in_flight: str = ""
    lines: int = 0
    must_exist: int = 0
    verified: int = 0
    content_checked: int = 0
    lazy_dropped: int = 0
    lost: list[str] = field(default_factory=list)
    wrong_content: list[str] = field(default_factory=list)
    check_problems: list[str] = field(default_factory=list)
    repaired: str = ""
    cleared: dict[str, int] = field(default_factory=dict)  # reason (ids elided) -> records
    leak_check: str = "-"
    child_violations: list[str] = field(default_factory=list)
    child_exit: int | None = None
    stale_mounts: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.wrong_content
            or self.check_problems
            or self.child_violations
            or self.error
            or self.leak_check.startswith("FAIL")
        )


def namespace_prefix() -> list[str]:
    """``unshare`` arguments giving the child its own mount namespace, when possible.

    A process killed while it has an overlay mounted (``Mountable.local()``) leaves that
    mount behind: nothing unmounts it. In a private mount namespace the kernel drops the
    child's mounts with its last process. Needs root and util-linux ``unshare``; without
    them the harness unmounts leftovers itself (:func:`unmount_leftovers`).
    """
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return []
    prefix = ["unshare", "--mount", "--propagation", "private"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, check=False, timeout=30)
    return prefix if probe.returncode == 0 else []


def unmount_leftovers(*paths: Path) -> int:
    """Lazily unmounts mounts at or over ``paths`` (a killed child's); returns how many."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return 0
    needles = [str(p) for p in paths]
    targets = []
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4 and any(n in line for n in needles):
            targets.append(fields[4])
    for target in reversed(targets):  # innermost first
        subprocess.run(["umount", "-l", target], capture_output=True, check=False, timeout=30)
    return len(targets)


def _reader(stream: Any, lines: queue.Queue[tuple[float, str | None]]) -> None:
    for raw in iter(stream.readline, ""):
        if raw.endswith("\n"):  # a line cut by the kill is not a report
            lines.put((time.monotonic(), raw.rstrip("\n")))
    lines.put((time.monotonic(), None))


def run_child(
    args: argparse.Namespace,
    root: Path,
    cycle: int,
    mode: str,
    rng: random.Random,
    log: Path,
    prefix: list[str],
) -> tuple[list[str], float, int | None]:
    """Starts a child, kills it as ``mode`` says; returns (its lines, seconds, exit code).

    The child's temporary directories (overlay mount points included) go to a directory of
    its own (``TMPDIR``), removed after it died.
    """
    cmd = [
        *prefix,
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--root",
        str(root),
        "--seed",
        str(args.seed),
        "--cycle",
        str(cycle),
        "--threads",
        str(args.threads),
        "--max-run",
        str(args.max_run),
    ]
    lines: queue.Queue[tuple[float, str | None]] = queue.Queue()
    received: list[str] = []
    env = {**os.environ, "TMPDIR": str(log.with_suffix(".tmp"))}
    Path(env["TMPDIR"]).mkdir(exist_ok=True)
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        start = time.monotonic()
        reader = threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True)
        reader.start()
        deadline: float | None = None
        if mode == "startup":
            deadline = start + rng.uniform(0.05, 1.5)
        target = (
            "BEGIN prune" if mode == "prune" else "BEGIN extract" if mode == "extract" else None
        )
        hard_stop = start + 60.0 + args.max_run  # bounded even if the child never starts
        ended = False
        for _ in range(10**7):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if now >= hard_stop:
                break
            wait = 0.2 if deadline is None else max(min(deadline - now, 0.2), 0.0)
            try:
                _, line = lines.get(timeout=wait)
            except queue.Empty:
                continue
            if line is None:
                ended = True
                break
            received.append(line)
            if line.startswith("READY") and mode in ("random", "prune", "extract"):
                ready = time.monotonic()
                if mode == "random":
                    deadline = ready + rng.uniform(0.2, args.max_run)
                else:
                    deadline = ready + args.max_run  # fallback when no such op starts
            elif target is not None and line.startswith(target) and deadline is not None:
                # Kill shortly after the operation began: most land while it runs.
                deadline = min(deadline, time.monotonic() + rng.uniform(0.0, 0.03))
                target = None
        elapsed = time.monotonic() - start
        if not ended:
            os.kill(proc.pid, signal.SIGKILL)
        code = proc.wait(timeout=60)
        reader.join(timeout=30)
    for _ in range(10**7):
        try:
            _, line = lines.get_nowait()
        except queue.Empty:
            break
        if line is not None:
            received.append(line)
    return received, elapsed, (None if not ended and code == -signal.SIGKILL else code)


@dataclass
class Expected:
    """A record the child held when it died: how it was made, what it must contain."""

    kind: str  # COMMIT or BLOB
    value: str  # COMMIT: data.txt content ("-": unknown); BLOB: the blob digest
    lazy: bool = False  # BLOB not known to be extracted: may be dropped at open


def expected_records(lines: list[str]) -> dict[str, Expected]:
    """Records that must exist: reported committed (or pulled) and not released since."""
    must: dict[str, Expected] = {}
    for line in lines:
        parts = line.split(" ")
        if parts[0] == "COMMIT" and len(parts) >= 3:
            must[parts[1]] = Expected("COMMIT", " ".join(parts[2:]))
        elif parts[0] == "BLOB" and len(parts) == 4:
            must[parts[1]] = Expected("BLOB", parts[2], lazy=parts[3] != "extracted")
        elif parts[0] == "END" and parts[1:2] == ["extract"] and parts[3:4] == ["ok"]:
            if parts[2] in must:
                must[parts[2]].lazy = False
        elif parts[0] == "RELEASE" and len(parts) >= 2:
            must.pop(parts[1], None)
    return must


def in_flight(lines: list[str]) -> str:
    """Operations begun and not ended when the child died."""
    open_ops: list[str] = []
    begun = {"prune": 0, "extract": 0}
    for line in lines:
        parts = line.split(" ")
        if parts[0] in ("BEGIN", "END") and len(parts) >= 2 and parts[1] in begun:
            begun[parts[1]] += 1 if parts[0] == "BEGIN" else -1
    for op, n in begun.items():
        if n > 0:
            open_ops.append(f"{op}x{n}")
    return ",".join(open_ops)


def verify(
    args: argparse.Namespace, root: Path, c: Cycle, must: dict[str, Expected], last: bool
) -> None:
    """Reopens the cache and checks it (see the module docstring)."""
    registry = make_registry(args.seed, files=LAYER_FILES, file_size=LAYER_FILE_SIZE)
    handlers = registry.handlers()
    timeout = 120.0
    with open_cache(root, timeout=timeout) as cache:
        rep = cache.load_report
        c.repaired = (
            f"loaded {rep.loaded}, cleared {len(rep.cleared)}, "
            f"deletes finished {len(rep.finished_deletes)}, "
            f"half-finalized {len(rep.recovered_half_finalized)}"
        )
        c.check_problems = storage.check(root)
        cleared = dict(rep.cleared)
        for reason in cleared.values():
            generic = re.sub(r"'[a-z0-9]+'|sha256:[0-9a-f]+", "X", reason)
            c.cleared[generic] = c.cleared.get(generic, 0) + 1
        if rep.finished_deletes:
            c.cleared["interrupted prune finished"] = len(rep.finished_deletes)
        if rep.recovered_half_finalized:
            c.cleared["half-finalized pair recovered"] = len(rep.recovered_half_finalized)
        manager = cache.manager
        c.must_exist = len(must)
        for rid, exp in must.items():
            kind, value = exp.kind, exp.value
            try:
                ref = manager.get(rid, desc_handlers=handlers).get(timeout=timeout)
            except NotFoundError:
                reason = cleared.get(rid, "not cleared at open: gone before the kill")
                if exp.lazy and reason.startswith(("lazy record", "parent")):
                    # BuildKit's init drops lazy records (no descriptor handler at open),
                    # and their lazy descendants with them.
                    c.lazy_dropped += 1
                else:
                    c.lost.append(f"{kind} {rid} ({reason})")
                continue
            try:
                if kind == "COMMIT" and value != "-":
                    with ref.mount().local() as path:
                        data = path / DATA_FILE
                        found = data.read_text() if data.exists() else ""
                    c.content_checked += 1
                    if found != value:
                        c.wrong_content.append(f"{rid}: {found!r} != {value!r}")
                elif kind == "BLOB":
                    blob = ref.info().blob
                    if blob and blob != value:
                        c.wrong_content.append(f"{rid}: blob {blob} != {value}")
                c.verified += 1
            finally:
                ref.release()
        if last or (c.cycle + 1) % args.prune_every == 0:
            manager.prune(PrunePolicy(all=True)).get(timeout=timeout)
            stats = manager.statistics().get(timeout=timeout)
            found = (
                stats.records,
                snapshot_dirs(root),
                blob_files(root),
                sum(1 for _ in cache.content.walk()),
                len(cache.leases.list()),
            )
            problems = storage.check(root)
            detail = "records={} dirs={} blob_files={} blobs={} leases={}".format(*found)
            if found == (0,) * 5 and not problems:
                c.leak_check = "ok (emptied)"
            else:
                c.leak_check = f"FAIL {detail} check={problems[:3]}"


def parent_main(args: argparse.Namespace) -> int:
    root = args.root or Path(tempfile.mkdtemp(prefix="refcache-crashtest-"))
    logs = Path(tempfile.mkdtemp(prefix="refcache-crashtest-logs-"))
    rng = random.Random(args.seed)
    print(
        f"crashtest: {args.cycles} cycles, seed {args.seed}, {args.threads} threads per child, "
        f"root {root}, {os.cpu_count()} cores, "
        f"get_by_blob {'on' if HAS_GET_BY_BLOB else 'OFF (not implemented in this checkout)'}, "
        "load average {:.2f}".format(os.getloadavg()[0]),
        flush=True,
    )
    prefix = namespace_prefix()
    print(
        "children run in their own mount namespace"
        if prefix
        else "children share this mount namespace (their leftover mounts are unmounted)",
        flush=True,
    )
    cycles: list[Cycle] = []
    started = time.monotonic()
    for n in range(args.cycles):
        mode = rng.choice(KILL_MODES)
        c = Cycle(n, mode)
        log = logs / f"child-{n:03d}.log"
        try:
            lines, c.killed_after_s, c.child_exit = run_child(args, root, n, mode, rng, log, prefix)
            c.stale_mounts = unmount_leftovers(root, log.with_suffix(".tmp"))
            shutil.rmtree(log.with_suffix(".tmp"), ignore_errors=True)
            if c.child_exit not in (None, 0):
                c.error = f"the child exited with {c.child_exit} before the kill (3: watchdog)"
            c.lines = len(lines)
            c.in_flight = in_flight(lines)
            c.child_violations = [ln for ln in lines if ln.startswith("VIOLATION")]
            verify(args, root, c, expected_records(lines), last=n == args.cycles - 1)
        except (RefcacheError, OSError, subprocess.SubprocessError) as exc:
            c.error = f"{type(exc).__name__}: {exc}"
        cycles.append(c)
        print(
            f"cycle {n:>3} {mode:<8} killed after {c.killed_after_s:5.2f} s "
            f"in flight [{c.in_flight or '-'}] held {c.must_exist:>4} "
            f"verified {c.verified:>4} lazy dropped {c.lazy_dropped:>2} lost {len(c.lost)} "
            f"check {len(c.check_problems)} "
            f"leaks {c.leak_check}  {'ok' if c.ok else 'FAIL'}",
            flush=True,
        )
        if not c.ok:
            for detail in [*c.lost, *c.wrong_content, *c.check_problems, *c.child_violations][:10]:
                print(f"    {detail}")
            if c.error:
                print(f"    error: {c.error}")
            tail = log.read_text(errors="replace").splitlines()[-20:]
            if tail:
                print("    child stderr (last lines):")
                for line in tail:
                    print(f"      {line}")
    elapsed = time.monotonic() - started
    ok = all(c.ok for c in cycles)
    summary = {
        "cycles": len(cycles),
        "seconds": round(elapsed, 1),
        "kills": sum(1 for c in cycles if c.child_exit is None),
        "kills_while_prune_ran": sum(1 for c in cycles if "prune" in c.in_flight),
        "kills_while_extract_ran": sum(1 for c in cycles if "extract" in c.in_flight),
        "kills_during_startup": sum(1 for c in cycles if c.mode == "startup"),
        "records_held_at_kill": sum(c.must_exist for c in cycles),
        "records_verified": sum(c.verified for c in cycles),
        "contents_verified": sum(c.content_checked for c in cycles),
        "lazy_records_dropped_at_open": sum(c.lazy_dropped for c in cycles),
        "lost_committed_records": sum(len(c.lost) for c in cycles),
        "wrong_contents": sum(len(c.wrong_content) for c in cycles),
        "consistency_problems_after_open": sum(len(c.check_problems) for c in cycles),
        "leak_checks": sum(1 for c in cycles if c.leak_check != "-"),
        "leak_check_failures": sum(1 for c in cycles if c.leak_check.startswith("FAIL")),
        "child_violations": sum(len(c.child_violations) for c in cycles),
        "stale_mounts_unmounted": sum(c.stale_mounts for c in cycles),
        "errors": sum(1 for c in cycles if c.error),
        "ok": ok,
    }
    repairs: dict[str, int] = {}
    for c in cycles:
        for reason, n in c.cleared.items():
            repairs[reason] = repairs.get(reason, 0) + n
    width = max(len(k) for k in summary)
    print("\nsummary")
    print("-" * (width + 12))
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    print("-" * (width + 12))
    print("repairs made by the reopens (records, reason):")
    for reason, n in sorted(repairs.items(), key=lambda kv: -kv[1]):
        print(f"  {n:>5}  {reason}")
    print("load average at the end (1/5/15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"crashtest: {'PASS' if ok else 'FAIL'}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "summary": summary,
                    "repairs_at_open": repairs,
                    "cycles": [asdict(c) for c in cycles],
                },
                indent=2,
            )
        )
    if ok:
        shutil.rmtree(logs, ignore_errors=True)
        if args.root is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"cache kept at {root}, child logs at {logs}")
    return 0 if ok else EXIT_VIOLATIONS


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=6, help="client threads in each child")
    p.add_argument(
        "--max-run", type=float, default=6.0, help="latest kill, seconds after the child is ready"
    )
    p.add_argument(
        "--prune-every", type=int, default=3, help="empty the cache and check every N cycles"
    )
    p.add_argument("--root", type=Path, default=None, help="cache root (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the cache directory afterwards")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cycle", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cycles < 1 or args.threads < 1 or args.max_run <= 0 or args.prune_every < 1:
        p.error("--cycles, --threads, --max-run and --prune-every must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        return child_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
