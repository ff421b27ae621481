"""Shared pieces of the ``bench_*.py`` scripts: record shapes, datasets, timing, output.

Record shapes
-------------
The scripts measure two shapes of record, because a build leaves the first and BuildKit's
tables are full of them:

* ``pairs``: a *lazy-commit pair*, what ``manager.new(retain=True)`` + ``commit()`` leave:
  a mutable record (lease ``<m>`` holding its active snapshot ``<m>``) and its equal
  immutable (``equalMutable = <m>``, no snapshot or lease of its own until it is
  finalized). Two table entries per pair; never finalized.
* ``finalized``: the same plus ``finalize()``: one immutable record whose lease ``<id>``
  holds its committed snapshot ``<id>``; the mutable is gone.

Datasets
--------
:func:`build_api` builds N released records of a shape through the public API (``new`` +
``commit`` [+ ``finalize``] + ``release``), as BuildKit's ``TestBenchCreate`` does.
:func:`build_bulk` writes the same records straight through the storage layer, in large
write transactions, which is much faster for 100,000 records. It is used only because it
produces exactly what the API produces: :func:`dump_dataset` reads every LMDB database and
the snapshot directories with ids, snapshot numbers and times replaced by stable names, and
the tests (``tests/test_bench_scripts.py``) build a small dataset both ways and require equal
dumps and an empty ``storage.check``. ``python scripts/_bench.py verify --dir DIR`` runs the
same comparison by hand. Every script takes ``--build api`` to use the API instead.

Output
------
:class:`Report` gives every script the same output: with ``--json``, one JSON object per
line (``"type": "env"`` first, then ``"run"`` per measurement and repetition with the
``/proc/loadavg`` after it, ``"median"`` per measurement over the repetitions, and
``"env_end"``); otherwise a table of the medians and the load average at the start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
from refcache.actors import ImmutableRef, open_cache
from refcache.actors._entry import new_id
from refcache.storage import (
    KEY_CACHE_POLICY,
    KEY_COMMITTED,
    KEY_CREATED_AT,
    KEY_DESCRIPTION,
    KEY_EQUAL_MUTABLE,
    KEY_LAST_USED_AT,
    KEY_SIZE,
    KEY_SNAPSHOT,
    KEY_USAGE_COUNT,
    MetadataStore,
    MetaEnv,
)
from refcache.storage._env import DB_NAMES
from refcache.storage._leases import LmdbLeaseManager, Resource
from refcache.storage._native import NativeSnapshotter
from refcache.storage._snapshotter import sync_filesystem

SHAPES = ("pairs", "finalized")
#: Records per write transaction of the bulk builder.
BULK_BATCH = 1000


# -- the machine ------------------------------------------------------------------------------


def loadavg() -> str:
    """``/proc/loadavg`` as it reads (1, 5, 15 min, runnable/threads, last pid)."""
    try:
        return Path("/proc/loadavg").read_text(encoding="ascii").strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def filesystem_of(path: Path) -> str:
    """The filesystem type holding ``path`` (from /proc/mounts; longest mount prefix)."""
    path = Path(path).resolve()
    best, fstype = "", "unknown"
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                _, mnt, typ, *_ = line.split()
                mnt = mnt.replace("\\040", " ")
                inside = str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) > len(best):
                    best, fstype = mnt, typ
    except OSError:
        pass
    return fstype


def proc_status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem (KiB) and Threads of this process.

    From ``/proc/self/status``: the current resident set, not ``ru_maxrss`` (a peak).
    """
    out: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads"):
                out[key] = int(rest.split()[0])
    return out


# -- timing -----------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted values, by index as BuildKit's benchmark takes it."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(int(len(sorted_values) * q), len(sorted_values) - 1)]


def latency_fields(lats: list[float], prefix: str = "") -> dict[str, float]:
    """p50/p99/p99.9/max of latencies in seconds, as microseconds (BuildKit's field names)."""
    lats = sorted(lats)
    return {
        f"{prefix}p50_us": percentile(lats, 0.50) * 1e6,
        f"{prefix}p99_us": percentile(lats, 0.99) * 1e6,
        f"{prefix}p999_us": percentile(lats, 0.999) * 1e6,
        f"{prefix}max_us": (lats[-1] if lats else 0.0) * 1e6,
    }


def run_threads(
    n: int, fn: Callable[[int], None], seconds: float, *, keys: int
) -> dict[str, float]:
    """Runs ``fn(i)`` with a random ``i < keys`` in ``n`` threads for ``seconds``.

    Returns BuildKit's ``emitPairs`` fields: pairs (calls), wall_s, pairs_per_s and the
    latency quantiles of single calls.
    """
    import random

    stop = threading.Event()
    lats: list[list[float]] = [[] for _ in range(n)]
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        rng = random.Random(w + 1)
        own = lats[w]
        clock = time.perf_counter
        try:
            while not stop.is_set():
                i = rng.randrange(keys)
                t0 = clock()
                fn(i)
                own.append(clock() - t0)
        except BaseException as exc:  # reported below
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=300)
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    if any(t.is_alive() for t in threads):
        raise RuntimeError(f"a benchmark thread did not finish within 300 s of {seconds} s")
    every = [x for lat in lats for x in lat]
    return {
        "pairs": len(every),
        "wall_s": wall,
        "pairs_per_s": len(every) / wall,
        **latency_fields(every),
    }


# -- datasets ---------------------------------------------------------------------------------


def description(shape: str, i: int) -> str:
    """The description every builder gives record ``i`` (the dump matches records by it)."""
    return f"[bench] {shape} {i}"


def make_held(cache: Any, n: int, shape: str) -> list[ImmutableRef]:
    """``n`` held records of ``shape`` made through the API (BuildKit's held records)."""
    refs = []
    for i in range(n):
        m = cache.manager.new(retain=True, description=f"[bench] held {i}").get(timeout=600)
        ref = m.commit()
        if shape == "finalized":
            ref.finalize()
        refs.append(ref)
    return refs


def build_api(root: Path, n: int, shape: str, *, threads: int = 1) -> list[tuple[str, str]]:
    """``n`` released records of ``shape`` through the public API.

    Returns (immutable id, mutable id) per record; the mutable id is ``""`` once finalized.
    """
    check_shape(shape)
    ids: list[tuple[str, str]] = [("", "")] * n
    with open_cache(root, snapshotter="native", timeout=600) as cache:

        def one(i: int) -> None:
            m = cache.manager.new(retain=True, description=description(shape, i)).get(timeout=600)
            mid = m.id
            ref = m.commit()
            if shape == "finalized":
                ref.finalize()
                mid = ""
            ids[i] = (ref.id, mid)
            ref.release()

        if threads <= 1:
            for i in range(n):
                one(i)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(one, range(n)))
    return ids


def shape_records(shape: str, i: int, m: str, imm: str, stamp: int) -> dict[str, dict[str, Any]]:
    """The metadata of record ``i`` of ``shape`` after its release, as the API writes it:
    ``{id: {key: value}}`` (the mutable ``m`` and the immutable ``imm`` of a pair; only
    ``imm`` when finalized)."""
    check_shape(shape)
    desc = description(shape, i)
    used = {KEY_USAGE_COUNT: 1, KEY_LAST_USED_AT: stamp}
    immutable: dict[str, Any] = {
        KEY_COMMITTED: True,
        KEY_CREATED_AT: stamp,
        KEY_SNAPSHOT: imm,
        KEY_SIZE: -1,
        KEY_DESCRIPTION: desc,
        **used,
    }
    if shape == "finalized":
        return {imm: immutable}
    mutable = {
        KEY_CREATED_AT: stamp,
        KEY_SNAPSHOT: m,
        KEY_CACHE_POLICY: 1,
        KEY_DESCRIPTION: desc,
        **used,
    }
    return {m: mutable, imm: {**immutable, KEY_EQUAL_MUTABLE: m}}


def build_bulk(root: Path, n: int, shape: str, *, now: int | None = None) -> list[tuple[str, str]]:
    """The same records as :func:`build_api`, written through the storage layer in bulk.

    Per record, what the API leaves after ``release``: the lease, the snapshot (prepared;
    committed for ``finalized``), the record metadata and the usage statistics of one
    release. Returns (immutable id, mutable id or ``""``) per record, as :func:`build_api`.
    """
    check_shape(shape)
    with open_cache(root, snapshotter="native"):
        pass  # the layout, and the snapshotter name recorded in the metadata
    env = MetaEnv(root / "meta")
    sn = NativeSnapshotter(root, env)
    leases = LmdbLeaseManager(env)
    store = MetadataStore(env)
    ids: list[tuple[str, str]] = []
    stamp = time.time_ns() if now is None else now
    try:
        for lo in range(0, n, BULK_BATCH):
            with env.write_txn() as txn:
                for i in range(lo, min(lo + BULK_BATCH, n)):
                    m, imm = new_id(), new_id()
                    # The snapshot: the mutable's active one (a pair), or committed as the
                    # immutable's (what finalize leaves); the lease that holds it.
                    owner = m if shape == "pairs" else imm
                    leases.create(owner, flat=True, txn=txn)
                    leases.add_resource(owner, Resource(owner, f"snapshots/{sn.name}"), txn=txn)
                    sn.prepare(m, txn=txn)
                    if shape == "finalized":
                        sn.commit(imm, m, txn=txn)
                    for rid, values in shape_records(shape, i, m, imm, stamp).items():
                        item = store.get(rid)
                        item.queue_many(values)
                        item.commit(txn=txn)
                    ids.append((imm, m if shape == "pairs" else ""))
    finally:
        sn.close()
        env.close()
    return ids


def build_dataset(root: Path, n: int, shape: str, how: str = "bulk") -> list[tuple[str, str]]:
    """:func:`build_bulk` or :func:`build_api` (``how``); returns their ids."""
    if how == "api":
        return build_api(root, n, shape, threads=4)
    if how == "bulk":
        return build_bulk(root, n, shape)
    raise ValueError(f"unknown dataset builder {how!r} (bulk or api)")


def dataset(store: Path, n: int, shape: str, how: str = "bulk") -> Path:
    """The dataset of ``n`` released ``shape`` records in ``store`` (``<shape>-<n>``), built
    there first if it is not (into a temporary name, renamed when complete, so an
    interrupted build is never reused). Open a copy (:func:`copy_dataset`), not this."""
    check_shape(shape)
    path = store / f"{shape}-{n}"
    if not path.is_dir():
        store.mkdir(parents=True, exist_ok=True)
        partial = store / f".{shape}-{n}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        build_dataset(partial, n, shape, how)
        partial.rename(path)
    return path


def copy_dataset(src: Path, dst: Path) -> None:
    """A fresh copy of a closed dataset (``cp -a``, as BuildKit's runs take one), flushed."""
    import subprocess

    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    sync_filesystem(dst)  # this filesystem only: a sync(2) would wait for every disk


def check_shape(shape: str) -> None:
    if shape not in SHAPES:
        raise ValueError(f"unknown record shape {shape!r}; shapes are {', '.join(SHAPES)}")


_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def dump_dataset(root: Path) -> dict[str, Any]:
    """Every LMDB database and snapshot directory of a cache, with ids, snapshot numbers and
    times replaced by stable names (``<description>/mutable``, ``<time>``), so that two
    datasets of the same records made at different times, with random ids, compare equal."""
    env = MetaEnv(root / "meta")
    raw: dict[str, list[tuple[bytes, Any]]] = {}
    try:
        with env.read_txn() as txn:
            for db in DB_NAMES:
                rows = []
                for k, v in txn.items(db):
                    try:
                        value = msgpack.unpackb(bytes(v), raw=False)
                    except (ValueError, msgpack.ExtraData):
                        value = bytes(v)
                    rows.append((bytes(k), value))
                raw[db] = rows
    finally:
        env.close()
    names: dict[str, str] = {}
    for key, value in raw["records"]:
        fields = value.get("f", value) if isinstance(value, dict) else {}
        kind = "immutable" if fields.get(KEY_COMMITTED) else "mutable"
        names[key.decode()] = f"{fields.get(KEY_DESCRIPTION, '?')}/{kind}"
    snap_ids: dict[str, str] = {}
    for key, value in raw["snapshots"]:
        if isinstance(value, dict) and "id" in value:
            snap_ids[str(value["id"])] = names.get(key.decode(), key.decode())

    def norm(x: Any) -> Any:
        if isinstance(x, dict):
            return {norm(k): norm(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [norm(v) for v in x]
        if isinstance(x, bytes):
            return b"\0".join(norm(p.decode()).encode() for p in x.split(b"\0"))
        if isinstance(x, str):
            if _TIME.match(x):
                return "<time>"
            return names.get(x, x)
        if isinstance(x, int) and not isinstance(x, bool) and x > 10**17:
            return "<time>"
        return x

    out: dict[str, Any] = {}
    for db, rows in raw.items():
        entries = []
        for key, value in rows:
            v = norm(value)
            if db == "snapshots" and isinstance(v, dict) and "id" in v:
                v["id"] = snap_ids.get(str(value["id"]), v["id"])
            entries.append((norm(key), v))
        out[db] = sorted(entries, key=repr)
    files = []
    snaps = root / "snapshots"
    for dirpath, dirnames, filenames in os.walk(snaps):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            parts = list(p.relative_to(snaps).parts)
            parts[0] = snap_ids.get(parts[0], parts[0])  # snapshots/<number>/...
            size = p.stat().st_size if p.is_file() else 0
            files.append(("/".join(parts), p.is_dir(), size))
    out["snapshot_tree"] = sorted(files)
    return out


def compare_builders(work: Path, n: int = 5) -> list[str]:
    """Builds ``n`` records of each shape both ways under ``work``; returns the differences
    (empty when the bulk builder writes exactly what the API writes)."""
    from refcache import storage

    problems: list[str] = []
    for shape in SHAPES:
        api, bulk = work / f"api-{shape}", work / f"bulk-{shape}"
        build_api(api, n, shape)
        build_bulk(bulk, n, shape)
        for label, root in (("api", api), ("bulk", bulk)):
            problems += [f"{shape}, {label}: storage.check: {p}" for p in storage.check(root)]
        a, b = dump_dataset(api), dump_dataset(bulk)
        for db in sorted(set(a) | set(b)):
            if a.get(db) != b.get(db):
                problems.append(f"{shape}: {db} differs: api {a.get(db)!r} != bulk {b.get(db)!r}")
    return problems


# -- output -----------------------------------------------------------------------------------


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


class Report:
    """Collects measurements (one per repetition) and prints them as the scripts do.

    A measurement is identified by its name (``bench``), its record shape (``None`` where
    the workload has none) and its parameters (``threads``, ``records``...).
    """

    def __init__(
        self,
        script: str,
        args: argparse.Namespace,
        directory: Path | None,
        *,
        columns: dict[str, list[str]] | None = None,
    ) -> None:
        self.script = script
        #: The fields the table shows per measurement (all when not given; JSON has all).
        self.columns = columns or {}
        self.json = bool(getattr(args, "json", False))
        self.started = time.perf_counter()
        self.load_start = loadavg()
        self.order: list[tuple[Any, ...]] = []
        self.runs: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        self.heads: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.params: dict[str, set[str]] = {}
        self.notes: list[str] = []
        env = {
            "type": "env",
            "script": script,
            "argv": sys.argv[1:],
            "dir": str(directory) if directory is not None else None,
            "filesystem": filesystem_of(directory) if directory is not None else None,
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg": self.load_start,
        }
        if self.json:
            self._emit(env)
        else:
            fs = f", {env['filesystem']}" if directory is not None else ""
            where = f"dir {directory}{fs}; " if directory is not None else ""
            print(
                f"{script}: {where}{env['nproc']} cores, Python {env['python']}, "
                f"/proc/loadavg {self.load_start}",
                flush=True,
            )

    @staticmethod
    def _emit(obj: dict[str, Any]) -> None:
        print(json.dumps(obj, default=str), flush=True)

    def add(
        self,
        bench: str,
        shape: str | None,
        params: dict[str, Any],
        values: dict[str, Any],
        *,
        repeat: int = 0,
    ) -> None:
        """Records one repetition of a measurement and prints it (JSON line or progress)."""
        key = (bench, shape, *sorted(params.items()))
        if key not in self.runs:
            self.order.append(key)
            self.runs[key] = []
            self.heads[key] = {"bench": bench, "shape": shape, **params}
            self.params.setdefault(bench, set()).update(params)
        load = loadavg()
        self.runs[key].append({**values, "loadavg": load})
        if self.json:
            self._emit(
                {"type": "run", **self.heads[key], "repeat": repeat, **values, "loadavg": load}
            )
        else:
            shown = "  ".join(f"{k}={_fmt(v)}" for k, v in values.items() if _number(v))
            label = " ".join(f"{k}={v}" for k, v in self.heads[key].items() if v is not None)
            print(f"  [{repeat + 1}] {label}: {shown}  (load {load.split()[0]})", flush=True)

    def note(self, text: str) -> None:
        """A line printed under the table (and as ``"type": "note"`` with ``--json``)."""
        self.notes.append(text)
        if self.json:
            self._emit({"type": "note", "text": text})

    def medians(self) -> list[dict[str, Any]]:
        """One row per measurement: the median of every number over its repetitions."""
        rows = []
        for key in self.order:
            runs = self.runs[key]
            row: dict[str, Any] = dict(self.heads[key])
            for field in runs[0]:
                values = [r[field] for r in runs if field in r]
                if field == "loadavg":
                    row["loadavg_1min"] = [float(v.split()[0]) for v in values]
                elif all(_number(v) for v in values):
                    row[field] = statistics.median(values)
                elif all(isinstance(v, bool) for v in values):
                    row[field] = all(values)
                else:
                    row[field] = values[-1]
            row["runs"] = len(runs)
            rows.append(row)
        return rows

    def median(self, bench: str, shape: str | None = None, **params: Any) -> dict[str, Any] | None:
        """The median row of one measurement, or None."""
        for row in self.medians():
            same = row["bench"] == bench and row["shape"] == shape
            if same and all(row.get(k) == v for k, v in params.items()):
                return row
        return None

    def finish(self) -> None:
        """Prints the medians (JSON lines or a table) and the load average at the end."""
        end = loadavg()
        elapsed = time.perf_counter() - self.started
        rows = self.medians()
        if self.json:
            for row in rows:
                self._emit({"type": "median", **row})
            self._emit({"type": "env_end", "loadavg": end, "wall_s": elapsed})
            return
        print()
        print_table(rows, self.columns, self.params)
        for text in self.notes:
            print(text)
        print(f"/proc/loadavg at the start: {self.load_start}; at the end: {end}")
        print(f"wall time {elapsed:.1f} s")


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or not _number(v):
        return str(v)
    a = abs(v)
    if a >= 1000 or isinstance(v, int) or (a >= 10 and float(v).is_integer()):
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.3f}"


def print_table(
    rows: Iterable[dict[str, Any]],
    columns: dict[str, list[str]] | None = None,
    params: dict[str, set[str]] | None = None,
) -> None:
    """Medians grouped by measurement name, one table each: the shape, the parameters and
    ``columns[name]`` (default: every field)."""
    params = params or {}
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["bench"], []).append(row)
    for bench, group in groups.items():
        cols: list[str] = []
        chosen = (columns or {}).get(bench)
        for row in group:
            for k, v in row.items():
                if k in ("bench", "loadavg_1min", "runs") or k in cols:
                    continue
                if k == "shape" and all(r.get("shape") is None for r in group):
                    continue
                if isinstance(v, list | dict):
                    continue
                if chosen is not None and k not in (*params.get(bench, ()), "shape"):
                    continue
                cols.append(k)
        if chosen is not None:
            cols += [c for c in chosen if any(c in r for r in group)]
        cells = [[_fmt(r.get(c, "")) if r.get(c) is not None else "-" for c in cols] for r in group]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        load = sorted({x for r in group for x in r.get("loadavg_1min", [])})
        span = f" (1-min load {load[0]:.2f}-{load[-1]:.2f})" if load else ""
        runs = sorted({r["runs"] for r in group})
        count = f"{runs[0]}" if len(runs) == 1 else f"{runs[0]}-{runs[-1]}"
        print(f"{bench}: median of {count} run(s){span}")
        print("  " + "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
        for row in cells:
            print("  " + "  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)))
        print()


def add_common_arguments(parser: argparse.ArgumentParser, *, repeat: int = 3) -> None:
    """``--repeat``, ``--dir`` and ``--json``, the same in every script."""
    parser.add_argument("--repeat", type=int, default=repeat, help="runs; medians are reported")
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path.cwd(),
        help="where datasets and caches go (default: the current directory; a tmpfs "
        "directory such as /dev/shm measures the CPU path without disk writes)",
    )
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """``--build`` and ``--datasets``, for the scripts that open stored datasets."""
    parser.add_argument(
        "--build",
        choices=("bulk", "api"),
        default="bulk",
        help="how datasets are made: in bulk through the storage layer (the same records, "
        "fast) or through the API",
    )
    parser.add_argument(
        "--datasets",
        type=Path,
        default=None,
        help="keep datasets in this directory (as <shape>-<records>) and reuse them; every "
        "run opens a fresh copy (default: built under --dir, deleted at the end)",
    )


def add_shape_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shapes",
        default=",".join(SHAPES),
        help="record shapes: pairs (new(retain=True) + commit, never finalized), finalized "
        "(+ finalize); comma-separated",
    )


def parse_shapes(text: str) -> list[str]:
    shapes = [s.strip() for s in text.split(",") if s.strip()]
    for s in shapes:
        check_shape(s)
    return shapes


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def work_dir(base: Path, prefix: str) -> Path:
    """A fresh temporary directory under ``base`` (created if needed)."""
    import tempfile

    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``verify``: build a small dataset both ways and compare (see the module docstring);
    ``build``: make the datasets the scripts' ``--datasets`` option reuses."""
    parser = argparse.ArgumentParser(description="Checks the bulk builder; builds datasets")
    parser.add_argument("command", choices=("verify", "build"))
    parser.add_argument("--records", type=int, default=5)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="build: shapes")
    parser.add_argument("--build", choices=("bulk", "api"), default="bulk", help="build: how")
    parser.add_argument(
        "--dir", type=Path, default=Path.cwd(), help="verify: work dir; build: dataset store"
    )
    args = parser.parse_args(argv)
    if args.command == "build":
        for shape in parse_shapes(args.shapes):
            t0 = time.perf_counter()
            path = dataset(args.dir, args.records, shape, args.build)
            print(f"{path}: {args.records:,} {shape} records ({time.perf_counter() - t0:.1f} s)")
        return 0
    work = work_dir(args.dir, "bench-verify-")
    try:
        problems = compare_builders(work, args.records)
    finally:
        remove_tree(work)
    for p in problems:
        print(p)
    print("bulk builder == API: " + ("yes" if not problems else f"NO ({len(problems)})"))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
