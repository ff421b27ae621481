"""Load test: N client threads run a seeded random mix of every operation on one cache.

Each thread owns its handles and runs the mix of ``scripts/_workload.py`` (new, writes into
mounts, commit, get, get_mutable, clone, release, merge, diff, get_by_blob of generated
layers through a lazy provider, extract, size, mount, finalize, disk_usage, prune with
policies) for a duration or an operation count, with a progress bar. A watchdog dumps every
thread's stack and exits 3 when any call takes longer than its bound.

At the end it checks the invariants: every handle the clients hold is counted exactly; after
releasing all, ``disk_usage`` shows nothing in use; ``prune(all)`` leaves 0 records, 0
snapshot directories, 0 blobs and 0 leases; ``storage.check`` is empty. It prints ops/s and
p50/p99/max latency per operation (``--json PATH`` writes the same as JSON).

Exit status: 0 all good, 1 a violation (unexpected error, failed online check or invariant),
3 watchdog trip.

    python scripts/loadtest.py --threads 32 --duration 600 --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workload import (
    EXIT_VIOLATIONS,
    HAS_GET_BY_BLOB,
    Client,
    OpStats,
    Shared,
    Watchdog,
    final_invariants,
    make_registry,
    make_seeds,
    ops_table,
)
from refcache.actors import open_cache


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=32, help="client threads (default 32)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--duration", type=float, default=None, help="seconds to run (default 60)")
    g.add_argument("--ops", type=int, default=None, help="total operations instead of a time")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--root", type=Path, default=None, help="cache root (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the cache directory afterwards")
    p.add_argument("--snapshotter", choices=("auto", "native", "overlay"), default="auto")
    p.add_argument(
        "--watchdog", type=float, default=60.0, help="seconds any single call may take (60)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.duration is None and args.ops is None:
        args.duration = 60.0
    if args.threads < 1 or (args.duration is not None and args.duration <= 0):
        p.error("--threads and --duration must be positive")
    return args


class Progress:
    """A progress bar on stderr (a line every 10 s when stderr is not a terminal)."""

    def __init__(self, total: float, unit: str, enabled: bool) -> None:
        self.total = total
        self.unit = unit
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._last_line = 0.0

    def show(self, done: float, elapsed: float, ops: int, violations: int) -> None:
        if not self.enabled:
            return
        frac = min(done / self.total, 1.0) if self.total else 1.0
        bar = "#" * int(frac * 30) + "-" * (30 - int(frac * 30))
        rate = ops / elapsed if elapsed > 0 else 0.0
        text = (
            f"[{bar}] {frac * 100:5.1f}%  {elapsed:6.1f} s  {ops:>9,} ops  {rate:>7,.0f} ops/s"
            f"  violations {violations}"
        )
        if self.tty:
            sys.stderr.write("\r" + text)
            sys.stderr.flush()
        elif elapsed - self._last_line >= 10.0 or frac >= 1.0:
            self._last_line = elapsed
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def end(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def run(args: argparse.Namespace) -> int:
    root = args.root or Path(tempfile.mkdtemp(prefix="refcache-loadtest-"))
    timeout = args.watchdog * 2  # internal waits outlast the watchdog: it reports first
    watchdog = Watchdog(args.watchdog).start()
    registry = make_registry(args.seed)
    print(
        f"loadtest: {args.threads} threads, "
        + (f"{args.duration:g} s" if args.duration else f"{args.ops} ops")
        + f", seed {args.seed}, root {root}, {os.cpu_count()} cores, "
        f"get_by_blob {'on' if HAS_GET_BY_BLOB else 'OFF (not implemented in this checkout)'}, "
        "load average {:.2f}".format(os.getloadavg()[0]),
        flush=True,
    )
    ok = False
    with open_cache(root, snapshotter=args.snapshotter, timeout=timeout) as cache:
        with watchdog.call("seeds"):
            seeds = make_seeds(cache, timeout)
        shared = Shared(registry, [s.id for s in seeds])
        clients = [
            Client(f"c{i:02d}", cache, shared, args.seed * 1000 + i, watchdog, timeout=timeout)
            for i in range(args.threads)
        ]
        stop = threading.Event()
        threads = [
            threading.Thread(target=c.run, args=(stop, args.ops), name=c.name, daemon=True)
            for c in clients
        ]
        progress = Progress(
            args.duration or args.ops, "s" if args.duration else "ops", not args.no_progress
        )
        start = time.monotonic()
        for t in threads:
            t.start()
        for _ in range(10**7):  # bounded by the duration / op budget (and the watchdog)
            elapsed = time.monotonic() - start
            ops = sum(sum(c.stats.outcomes.values()) for c in clients)
            violations = sum(len(c.errors) for c in clients)
            progress.show(elapsed if args.duration else ops, elapsed, ops, violations)
            if args.duration and elapsed >= args.duration:
                break
            if not any(t.is_alive() for t in threads):
                break
            stop.wait(0.5)
        stop.set()
        for t in threads:
            t.join(timeout=args.watchdog + 10)
        elapsed = time.monotonic() - start
        progress.end()
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:  # a call outlived the watchdog bound without tripping it: trip now
            watchdog._trip([(name, "join", elapsed) for name in stuck])
        stats = OpStats()
        for c in clients:
            stats.merge(c.stats)
        errors = [e for c in clients for e in c.errors]
        rows, table = ops_table(stats, elapsed)
        checks = final_invariants(cache, clients, seeds, watchdog, timeout)
        store_stats = cache.manager.statistics().get(timeout=timeout)
    watchdog.stop()
    total = sum(r["count"] for r in rows)
    print(f"\n{table}\n")
    print(f"{total} operations in {elapsed:.1f} s: {total / elapsed:.1f} ops/s")
    print("load average at the end (1/5/15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"violations during the run: {len(errors)}; watchdog trips: 0")
    for err in errors[:10]:
        print("\n" + err)
    print("\ninvariants at the end:")
    for c in checks:
        print(f"  [{'PASS' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
    ok = not errors and all(c.ok for c in checks)
    print(f"\nloadtest: {'PASS' if ok else 'FAIL'}")
    if args.json:
        result: dict[str, Any] = {
            "threads": args.threads,
            "duration_s": elapsed,
            "seed": args.seed,
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "snapshotter": cache.snapshotter.name,
            "get_by_blob": HAS_GET_BY_BLOB,
            "operations": total,
            "ops_per_s": total / elapsed,
            "per_operation": rows,
            "violations": len(errors),
            "violation_details": errors[:20],
            "watchdog_trips": 0,
            "invariants": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
            "double_releases": store_stats.double_releases_total,
            "ok": ok,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if ok and not args.keep and args.root is None:
        shutil.rmtree(root, ignore_errors=True)
    elif not ok:
        print(f"cache kept for inspection at {root}")
    return 0 if ok else EXIT_VIOLATIONS


def main(argv: list[str] | None = None) -> int:
    return run(_parse(argv))


if __name__ == "__main__":
    sys.exit(main())
