"""Benchmark of the snapshotters, the tar applier and the walking differ on a real disk.

For a generated, seeded tree (``--files`` non-directory entries of mixed sizes in a few
directories, with symlinks and hardlinks among them; about 5 KB per file on average) it
measures, with the real backends (``MetaEnv``, ``NativeSnapshotter``, and
``OverlaySnapshotter`` when a probe mount works):

* ``prepare`` of an active snapshot on a committed parent holding the tree (native: the copy);
* ``commit`` of that snapshot after a build-step-sized change (the usage walk of its own
  directory: the whole copy for native, the changes only for overlay);
* ``view`` of the committed snapshot, and ``WalkingDiffer.compare`` of it against its parent
  (the double walk of two trees of ``--files`` entries);
* ``merge`` of three such layers (a hardlink farm of three times ``--files`` entries);
* ``remove`` of the committed snapshot (metadata, then the directory);
* ``WalkingDiffer.compare`` of the tree against an empty tree and ``TarApplier.apply`` of the
  blob into a fresh snapshot, per compression, in MB/s of uncompressed tar (these see plain
  directories with either backend, so they run on the native cache only).

Baselines are measured in the same run on the same tree: ``shutil.copytree`` + ``syncfs``
(``prepare`` flushes the tree it built), ``cp -al`` of the three layers + ``syncfs`` for the
merge, GNU ``tar -c`` (plain and ``--zstd``, + ``fsync``) of the tree for the diffs, and
GNU ``tar -x`` of the uncompressed blob for the applies. Every timed step starts after an
untimed ``sync``, so it pays only for its own writes; reads come from a warm page cache.
Nothing is deleted between steps except by the timed ``remove`` and ``rm -rf``.

Record shapes (lazy-commit pairs against finalized records, as the other scripts measure
them) do not apply here: this script works below the records, on the snapshotters and the
layer tools, which see an active snapshot (what a pair's mutable holds) or a committed one
(what a finalized record holds) and nothing else; both are measured (``prepare`` and
``commit`` above). What a pair costs through the cache is in ``bench_refs.py`` and
``bench_prune.py``.

The table shows medians over ``--repeat`` runs with min and max, and ``/proc/loadavg`` at the
start and end; ``--json`` prints JSON lines instead (``"type": "env"``, one ``"median"`` per
row with every sample, ``"env_end"``).

Run on the disk, not tmpfs (``--dir`` defaults to a temp dir under the current directory)::

    python scripts/bench_snapshots.py --files 10000 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from refcache.storage._applier import TarApplier
from refcache.storage._content import LocalContentStore
from refcache.storage._differ import WalkingDiffer
from refcache.storage._env import MetaEnv
from refcache.storage._fscopy import copy_tree, disk_usage, sync_filesystem
from refcache.storage._mount import local_mount, probe_overlay
from refcache.storage._native import NativeSnapshotter
from refcache.storage._overlay import OverlaySnapshotter
from refcache.storage._snapshotter import BaseSnapshotter
from refcache.storage._types import Descriptor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import loadavg

COMPRESSIONS = ("uncompressed", "gzip", "zstd")
#: GNU tar flags per compression of the diff baselines (zstd -3 is the tool's default and the
#: differ's level).
TAR_FLAGS = {"uncompressed": [], "zstd": ["--zstd"]}
N_LAYERS = 3
N_CHANGES = 100
MB = 1_000_000
CP = "copy"
PREPARE = "prepare on the tree"

T = TypeVar("T")


# -- the tree -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeStats:
    """What :func:`make_tree` wrote."""

    files: int
    symlinks: int
    hardlinks: int
    dirs: int
    data_bytes: int


def make_pool(seed: int) -> bytes:
    """About 8 MiB to slice file contents from: 3/4 word-like text, 1/4 random bytes.

    So the layers compress roughly like real ones (gzip about 2-3x) instead of not at all.
    """
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(4000)]
    text = " ".join(rng.choices(vocab, k=1_100_000)).encode()[: 6 << 20]
    return text + rng.randbytes(2 << 20)


def _size(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.90:
        return rng.randint(0, 4 << 10)
    if roll < 0.995:
        return rng.randint(4 << 10, 32 << 10)
    return rng.randint(32 << 10, 512 << 10)


def make_tree(root: Path, n_entries: int, seed: int, tag: str, pool: bytes) -> TreeStats:
    """Writes a seeded tree of ``n_entries`` non-directory entries under ``root``.

    8 top directories with 5 subdirectories each; about 3 % of the entries are relative
    symlinks to earlier files and 2 % hardlinks to earlier files, the rest regular files
    (90 % up to 4 KiB, 9.5 % 4-32 KiB, 0.5 % 32-512 KiB; some executable). File names carry
    ``tag``, so layers made with different tags add distinct files to the same directories.
    Times are fixed (with nanoseconds), so a copy that keeps them compares equal.
    """
    rng = random.Random(seed)
    dirs = [Path(f"d{i:02d}") for i in range(8)]
    dirs += [d / f"s{j}" for d in dirs[:8] for j in range(5)]
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    n_links = n_sym = data = 0
    base_ns = 1_700_000_000 * 10**9
    for i in range(n_entries):
        rel = rng.choice(dirs) / f"{tag}-{i:05d}"
        path = root / rel
        roll = rng.random()
        if files and roll < 0.03:
            target = rng.choice(files)
            os.symlink(os.path.relpath(root / target, path.parent), path.with_suffix(".lnk"))
            n_sym += 1
            continue
        if files and roll < 0.05:
            os.link(root / rng.choice(files), path.with_suffix(".hl"))
            n_links += 1
            continue
        size = _size(rng)
        start = rng.randrange(len(pool) - size) if size else 0
        path = path.with_suffix(".dat")
        path.write_bytes(pool[start : start + size])
        data += size
        if rng.random() < 0.1:
            os.chmod(path, 0o755)  # noqa: S103 - executables are part of a realistic tree
        when = base_ns + rng.randrange(10**15)
        os.utime(path, ns=(when, when))
        files.append(rel.with_suffix(".dat"))
    return TreeStats(
        files=len(files), symlinks=n_sym, hardlinks=n_links, dirs=len(dirs), data_bytes=data
    )


def change_tree(root: Path, n: int, seed: int, pool: bytes) -> None:
    """Rewrites ``n`` regular files, adds ``n // 10`` and deletes ``n // 10`` (a build step)."""
    rng = random.Random(seed)
    regular = sorted(p for p in root.rglob("*.dat") if p.is_file() and not p.is_symlink())
    picked = rng.sample(regular, n + n // 10)
    for path in picked[:n]:
        size = _size(rng) + 1
        start = rng.randrange(len(pool) - size)
        path.write_bytes(pool[start : start + size])
    for path in picked[n:]:
        path.unlink()
    for i in range(n // 10):
        (root / "d00" / f"new-{i:04d}.dat").write_bytes(pool[i * 100 : i * 100 + 4096])


# -- measuring ------------------------------------------------------------------------------


@dataclass
class Row:
    """One measured operation: samples (seconds or MB/s) and an optional baseline row."""

    group: str
    name: str
    unit: str  # "s" or "MB/s"
    samples: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    baseline: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


class Results:
    """Rows by ``(group, name)``, in the order they were first measured."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Row] = {}

    def add(
        self,
        group: str,
        name: str,
        secs: Seconds,
        *,
        nbytes: int | None = None,
        baseline: str | None = None,
    ) -> None:
        """Records one run: seconds, or MB/s when ``nbytes`` is given; and its CPU time."""
        key = (group, name)
        unit = "s" if nbytes is None else "MB/s"
        if key not in self.rows:
            self.rows[key] = Row(group, name, unit, baseline=baseline)
        row = self.rows[key]
        row.samples.append(secs if nbytes is None else nbytes / secs / MB)
        row.cpu.append(secs.cpu)

    def ratio(self, row: Row) -> float | None:
        """Time of ``row`` over the time of its baseline (>1: slower than the baseline).

        The median of the per-repetition ratios: each operation runs right next to its
        baseline, so a machine that is slower for a while slows both.
        """
        if row.baseline is None:
            return None
        base = self.rows.get(("baseline", row.baseline))
        if base is None or len(base.samples) != len(row.samples) or not row.samples:
            return None
        if row.unit == "MB/s":
            return statistics.median(b / o for o, b in zip(row.samples, base.samples, strict=True))
        return statistics.median(o / b for o, b in zip(row.samples, base.samples, strict=True))


class Seconds(float):
    """Wall-clock seconds of a run, carrying the CPU seconds it used (``cpu``)."""

    cpu: float

    def __new__(cls, wall: float, cpu: float) -> Seconds:
        value = super().__new__(cls, wall)
        value.cpu = cpu
        return value


def _cpu_now() -> float:
    # This process and the children it waited for (tar, cp, rm): user + system time.
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(func: Callable[[], object]) -> Seconds:
    """Seconds ``func`` takes, after an untimed ``sync`` (so earlier writes are not billed)."""
    return timed_value(func)[0]


def timed_value(func: Callable[[], T]) -> tuple[Seconds, T]:
    """Seconds ``func`` takes (after an untimed ``sync``) and what it returned."""
    os.sync()
    c0 = _cpu_now()
    t0 = time.perf_counter()
    value = func()
    wall = time.perf_counter() - t0
    return Seconds(wall, _cpu_now() - c0), value


def rm_rf(path: Path) -> None:
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def tar(*args: str) -> None:
    subprocess.run(["tar", *args], check=True, stdout=subprocess.DEVNULL)


@dataclass
class Ctx:
    """What every step shares: the work directory, the content pool, the blob sizes seen."""

    work: Path
    pool: bytes
    layer_sizes: dict[str, int] = field(default_factory=dict)


@dataclass
class Backend:
    """One cache root (``meta/``, ``snapshots/``) with a snapshotter on it."""

    label: str
    root: Path
    env: MetaEnv
    sn: BaseSnapshotter

    def close(self) -> None:
        self.sn.close()
        self.env.close()


def open_backend(label: str, root: Path) -> Backend:
    env = MetaEnv(root / "meta")
    sn: BaseSnapshotter = (
        NativeSnapshotter(root, env) if label == "native" else OverlaySnapshotter(root, env)
    )
    return Backend(label, root, env, sn)


def import_layers(backend: Backend, sources: Sequence[Path]) -> None:
    """Commits ``base0..`` on ``backend`` with copies of the native layer directories."""
    for i, src in enumerate(sources):
        backend.sn.prepare(f"base{i}-active", "")
        copy_tree(src, backend.sn.path(f"base{i}-active"))
        backend.sn.commit(f"base{i}", f"base{i}-active")


def paired(rep: int, op: Callable[[], None], baseline: Callable[[], None] | None) -> None:
    """Runs ``op`` and its ``baseline`` back to back, in alternating order."""
    steps = [op] if baseline is None else [op, baseline] if rep % 2 == 0 else [baseline, op]
    for step in steps:
        step()


def bench_snapshotter(
    ctx: Ctx, res: Results, backend: Backend, content: LocalContentStore, rep: int
) -> None:
    """One build step on ``backend``: prepare on the tree, change, commit, view, diff; merge.

    The native run also measures the baselines, each right next to its operation. Nothing is
    removed except by the timed ``remove`` and ``rm -rf`` (and what blocks them): the work
    directory goes at the end.
    """
    sn, g = backend.sn, backend.label
    native = g == "native"
    p, c, v, pv, m = (f"{x}{rep}" for x in ("p", "c", "v", "pv", "m"))
    tree = sn.path("base0")
    copy = ctx.work / f"copytree-{rep}"
    farm = ctx.work / f"farm-{rep}"

    def copy_and_sync() -> None:
        shutil.copytree(tree, copy, symlinks=True)
        sync_filesystem(copy)

    def link_farm() -> None:
        farm.mkdir()
        for i in range(N_LAYERS):
            subprocess.run(["cp", "-al", f"{sn.path(f'base{i}')}/.", f"{farm}/"], check=True)
        sync_filesystem(farm)

    paired(
        rep,
        lambda: res.add(
            g, "prepare on the tree", timed(partial(sn.prepare, p, "base0")), baseline=CP
        ),
        (lambda: res.add("baseline", CP, timed(copy_and_sync))) if native else None,
    )
    # A build step changes a few files (untimed): through the overlay mount for overlay.
    with local_mount(sn.mounts(p)) as root:
        change_tree(root, N_CHANGES, 1000 + rep, ctx.pool)
    res.add(g, "commit of the prepared snapshot", timed(partial(sn.commit, c, p)))
    res.add(g, "view of the committed snapshot", timed(partial(sn.view, v, c)))
    sn.view(pv, "base0")
    differ = WalkingDiffer(content)
    secs, desc = timed_value(
        partial(differ.compare, sn.mounts(pv), sn.mounts(v), compression="uncompressed")
    )
    res.add(g, f"diff vs parent ({N_CHANGES + N_CHANGES // 5} changes)", secs)
    content.delete(desc.digest)
    diffs = [("", f"base{i}") for i in range(N_LAYERS)]
    merge_name = f"merge of {N_LAYERS} layers (hardlinks)"
    paired(
        rep,
        lambda: res.add(g, merge_name, timed(partial(sn.merge, m, diffs)), baseline="cp -al"),
        (lambda: res.add("baseline", "cp -al", timed(link_farm))) if native else None,
    )
    sn.remove(v)
    sn.remove(pv)
    remove_name = "remove of the committed snapshot"
    paired(
        rep,
        lambda: res.add(g, remove_name, timed(partial(sn.remove, c)), baseline="rm -rf"),
        (lambda: res.add("baseline", "rm -rf", timed(partial(rm_rf, copy)))) if native else None,
    )


def bench_layers(
    ctx: Ctx, res: Results, backend: Backend, content: LocalContentStore, rep: int
) -> None:
    """Diff the tree into blobs (per compression), apply them, and the tar baselines."""
    sn = backend.sn
    differ = WalkingDiffer(content)
    applier = TarApplier(content)
    sn.view(f"src{rep}", "base0")
    upper = sn.mounts(f"src{rep}")
    tree_dir = sn.path("base0")
    descs: dict[str, Descriptor] = {}

    def diff(comp: str, baseline: str | None) -> None:
        secs, desc = timed_value(partial(differ.compare, [], upper, compression=comp))
        descs[comp] = desc
        raw = ctx.layer_sizes.setdefault("uncompressed", desc.size)
        ctx.layer_sizes[comp] = desc.size
        res.add("layers", f"diff vs empty, {comp}", secs, nbytes=raw, baseline=baseline)

    def tar_create(comp: str) -> None:
        out = ctx.work / f"base-{rep}.tar.{comp}"

        def run() -> None:
            tar(*TAR_FLAGS[comp], "-cf", str(out), "-C", str(tree_dir), ".")
            fd = os.open(out, os.O_RDONLY)
            try:
                os.fsync(fd)  # the differ fsyncs its ingest before committing it
            finally:
                os.close(fd)

        secs = timed(run)
        # Rep 0 runs the diff first, so the uncompressed size is known by now.
        res.add("baseline", f"tar -c {comp}", secs, nbytes=ctx.layer_sizes["uncompressed"])

    for comp in COMPRESSIONS:
        # No gzip baseline: tar -cz is bound by gzip -6 as the differ is by zlib (measured
        # 27-32 vs 24-27 MB/s here), and it would add ~15 s to a default run.
        baseline = None if comp == "gzip" else f"tar -c {comp}"
        paired(
            rep,
            partial(diff, comp, baseline),
            None if baseline is None else partial(tar_create, comp),
        )
    sn.remove(f"src{rep}")

    def apply(comp: str) -> None:
        mounts = sn.prepare(f"a-{comp}-{rep}", "")
        secs, applied = timed_value(partial(applier.apply, descs[comp], mounts))
        res.add("layers", f"apply, {comp}", secs, nbytes=applied.size, baseline="tar -x")

    def untar() -> None:
        dst = ctx.work / f"untar-{rep}"
        dst.mkdir()
        blob = content.path(descs["uncompressed"].digest)
        secs = timed(partial(tar, "-xf", str(blob), "-C", str(dst)))
        res.add("baseline", "tar -x", secs, nbytes=descs["uncompressed"].size)

    for comp in COMPRESSIONS:
        paired(rep, partial(apply, comp), untar if comp == "uncompressed" else None)
    for desc in descs.values():
        content.delete(desc.digest)


# -- output -------------------------------------------------------------------------------


BASELINE_LABELS = {
    "copy": "shutil.copytree + syncfs",
    "cp -al": f"cp -al of the {N_LAYERS} layers + syncfs",
    "tar -x": "tar -x of the uncompressed blob",
    "rm -rf": "rm -rf of the copy",
    "tar -c uncompressed": "tar -c + fsync",
    "tar -c zstd": "tar --zstd -c + fsync",
}


def fmt(value: float, unit: str) -> str:
    if unit == "MB/s":
        return f"{value:.1f} MB/s"
    if value < 0.1:
        return f"{value * 1000:.2f} ms"
    return f"{value:.3f} s"


GROUP_ORDER = ("native", "overlay", "layers", "baseline")


def print_table(res: Results, header: Sequence[str]) -> None:
    """Prints ``header`` and a Markdown table of medians, min/max and baseline ratios."""
    for line in header:
        print(line)
    print()
    print("| group | operation | median | min | max | CPU s | baseline | time vs baseline |")
    print("|---|---|--:|--:|--:|--:|---|--:|")
    rows = sorted(res.rows.values(), key=lambda r: GROUP_ORDER.index(r.group))
    for row in rows:
        ratio = res.ratio(row)
        label = BASELINE_LABELS.get(row.name, row.name) if row.group == "baseline" else row.name
        base = BASELINE_LABELS.get(row.baseline or "", row.baseline or "")
        cells = [
            row.group,
            label,
            fmt(row.median, row.unit),
            fmt(min(row.samples), row.unit),
            fmt(max(row.samples), row.unit),
            f"{statistics.median(row.cpu):.3f}",
            base,
            f"{ratio:.2f}x" if ratio is not None else "",
        ]
        print("| " + " | ".join(cells) + " |")


def fs_type(path: Path) -> str:
    try:
        out = subprocess.run(
            ["findmnt", "-n", "-o", "FSTYPE", "--target", str(path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000, help="entries per layer tree")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--dir", type=Path, default=None, help="parent of the temp dir (default: cwd)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    if args.files < 2 * N_CHANGES or args.repeat < 1:
        parser.error(f"--files must be at least {2 * N_CHANGES} and --repeat at least 1")

    started = time.monotonic()
    load_start = loadavg()
    parent = (args.dir or Path.cwd()).resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-snapshots-", dir=parent))
    ctx = Ctx(work=work, pool=make_pool(args.seed))
    res = Results()
    backends: list[Backend] = []
    try:
        native = open_backend("native", work / "native")
        backends.append(native)
        stats = []
        for i in range(N_LAYERS):
            key = f"base{i}-active"
            native.sn.prepare(key, "")
            stats.append(
                make_tree(native.sn.path(key), args.files, args.seed + i, f"l{i}", ctx.pool)
            )
            native.sn.commit(f"base{i}", key)
        layer_dirs = [native.sn.path(f"base{i}") for i in range(N_LAYERS)]
        usage = disk_usage(layer_dirs[0])

        reason = probe_overlay(work / "overlay")
        overlay: Backend | None = None
        if reason is None:
            overlay = open_backend("overlay", work / "overlay")
            backends.append(overlay)
            import_layers(overlay, layer_dirs)
        # The blobs live in the native cache root, as in a cache: <root>/content.
        content = LocalContentStore(native.root / "content", native.env)

        for rep in range(args.repeat):
            for backend in backends:
                bench_snapshotter(ctx, res, backend, content, rep)
            bench_layers(ctx, res, native, content, rep)
    finally:
        for backend in backends:
            backend.close()
        # rm is a little faster than shutil.rmtree on the ~1M entries a default run leaves.
        if subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False).returncode:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started

    s = stats[0]
    overlay_line = "overlay: available" if reason is None else f"overlay: not available ({reason})"
    header = [
        f"tree: {args.files} entries ({s.files} files, {s.symlinks} symlinks, "
        f"{s.hardlinks} hardlinks) in {s.dirs} dirs, {s.data_bytes / MB:.1f} MB of file data, "
        f"{usage.size / MB:.1f} MB on disk; {N_LAYERS} such layers (seeds {args.seed}..)",
        "layer blob: "
        + ", ".join(f"{c} {ctx.layer_sizes[c] / MB:.1f} MB" for c in COMPRESSIONS)
        + " (MB = 10^6 bytes; MB/s is uncompressed tar bytes per second)",
        f"repeat={args.repeat}  dir={parent} ({fs_type(parent)})  nproc={os.cpu_count()}  "
        f"wall time {elapsed:.0f} s (cleanup included)",
        "CPU s: median user+system CPU seconds of this process and of the tools it ran, per "
        "step (kernel writeback threads not included)",
        overlay_line,
    ]
    load_end = loadavg()
    if args.json:
        out: dict[str, Any] = {
            "type": "env",
            "script": "bench_snapshots",
            "loadavg": load_start,
            "files": args.files,
            "repeat": args.repeat,
            "seed": args.seed,
            "fs_type": fs_type(parent),
            "nproc": os.cpu_count(),
            "tree": s.__dict__,
            "tree_disk_bytes": usage.size,
            "layer_blob_bytes": ctx.layer_sizes,
            "overlay": "available" if reason is None else f"not available ({reason})",
        }
        print(json.dumps(out))
        for row in res.rows.values():
            print(
                json.dumps(
                    {
                        "type": "median",
                        "bench": row.name,
                        "shape": None,
                        "group": row.group,
                        "unit": row.unit,
                        "median": row.median,
                        "min": min(row.samples),
                        "max": max(row.samples),
                        "samples": row.samples,
                        "cpu_s": row.cpu,
                        "baseline": row.baseline,
                        "time_ratio_vs_baseline": res.ratio(row),
                        "runs": len(row.samples),
                    }
                )
            )
        print(json.dumps({"type": "env_end", "loadavg": load_end, "wall_s": elapsed}))
        return 0
    print_table(res, header)
    print(f"\n/proc/loadavg at the start: {load_start}; at the end: {load_end}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
