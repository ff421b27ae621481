"""Benchmark of lazy layers and blobs: extraction throughput and ``get_remotes``, on the disk.

Measured in one run, so the ratios hold across machines:

* ``extract``: a lazy chain of ``--layers`` layers (``--layer-mb`` MB of tar each, seeded,
  half random and half repetitive data) is extracted through the cache, per compression:
  ``lazy`` (``get_by_blob`` + ``extract``: the provider is read from memory, the blob
  written and verified into the content store, then applied), ``local`` (the blobs are in
  the content store already: apply only). The baseline, ``raw apply``, is the same blobs
  applied with a bare :class:`storage.TarApplier` into the same snapshotter (prepare, apply,
  commit per layer) without the cache. MB/s counts uncompressed tar bytes. Record shapes do
  not apply: ``get_by_blob`` makes lazy immutable records, never a lazy-commit pair.
* ``get_remotes``: a 10-layer chain built with ``new`` + files + ``commit``; per
  compression, ``get_remotes(c)`` with ``create_if_needed`` from scratch (the differ writes
  every blob), again when cached, and forcing another compression (conversion of all ten).
  Per record shape (``--shapes``): ``pairs`` times it on the chain as the build left it
  (``new`` on a parent finalizes that parent, as BuildKit's does, so the top layer is a
  lazy-commit pair, which ``get_remotes`` finalizes inside the timed ``create``);
  ``finalized`` calls ``finalize()`` on the top first, untimed.

Every repetition uses a fresh cache under a temporary directory in ``--dir`` (the disk under
test, the current directory by default); the medians of ``--repeat`` runs are reported,
with ``/proc/loadavg``; ``--json`` prints JSON lines (see ``scripts/_bench.py``).

    python scripts/bench_blobs.py [--layers 4] [--layer-mb 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import random
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zstandard
from refcache.actors import Cache, DescHandler, ImmutableRef, open_cache
from refcache.storage import Descriptor, LocalContentStore, MetaEnv, TarApplier, digest_of
from refcache.storage._overlay import make_snapshotter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import Report, add_common_arguments, add_shape_argument, parse_shapes, work_dir

OCI = "application/vnd.oci.image.layer.v1.tar"
MEDIA = {"uncompressed": OCI, "gzip": OCI + "+gzip", "zstd": OCI + "+zstd"}
COMPRESSIONS = ("uncompressed", "gzip", "zstd")
MB = 1_000_000
#: What the table shows (``--json`` has every field).
COLUMNS = {
    "extract": [
        "blobs_mb",
        "raw_apply_mb_s",
        "local_mb_s",
        "local_vs_raw",
        "lazy_mb_s",
        "lazy_vs_raw",
        "provider_calls",
    ],
    "get_remotes": ["create_ms", "cached_ms", "force_other_ms", "force_other_cached_ms"],
}


# -- workload ---------------------------------------------------------------------------------


def layer_tar(index: int, size: int, files: int) -> bytes:
    """A seeded layer tar of about ``size`` bytes of file data in ``files`` files."""
    rng = random.Random(index)
    raw = io.BytesIO()
    per = max(size // files, 1)
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(files):
            name = f"l{index}/d{i % 16}/f{i}"
            half = per // 2
            data = rng.randbytes(half) + bytes([rng.randrange(256)]) * (per - half)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def compress(raw: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(raw, compresslevel=6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(raw)
    return raw


def chain_blobs(tars: list[bytes], compression: str) -> tuple[list[bytes], list[Descriptor]]:
    blobs, descs = [], []
    for raw in tars:
        data = compress(raw, compression)
        blobs.append(data)
        descs.append(
            Descriptor(
                MEDIA[compression],
                digest_of(data),
                len(data),
                {"containerd.io/uncompressed": digest_of(raw)},
            )
        )
    return blobs, descs


# -- timing helpers ---------------------------------------------------------------------------


def fresh_dir(base: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix="bench-blobs-", dir=base))


def timed(fn: Callable[[], Any]) -> float:
    os.sync()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- extraction -------------------------------------------------------------------------------


def raw_apply(base: Path, snapshotter: str, blobs: list[bytes], descs: list[Descriptor]) -> float:
    """The baseline: the same blobs applied with a bare TarApplier, no cache."""
    root = fresh_dir(base)
    env = MetaEnv(root / "meta")
    sn = make_snapshotter(snapshotter, root, env)
    content = LocalContentStore(root / "content", env)
    try:
        for data, desc in zip(blobs, descs, strict=True):
            content.write_blob(data, desc)
        applier = TarApplier(content)

        def run() -> None:
            parent = ""
            for i, desc in enumerate(descs):
                key = f"extract-{i}"
                mounts = sn.prepare(key, parent)
                applier.apply(desc, mounts)
                sn.commit(f"layer-{i}", key)
                parent = f"layer-{i}"

        return timed(run)
    finally:
        sn.close()
        env.close()
        shutil.rmtree(root, ignore_errors=True)


def cache_extract(
    base: Path, snapshotter: str, blobs: list[bytes], descs: list[Descriptor], *, lazy: bool
) -> tuple[float, int]:
    """``get_by_blob`` of the chain, then one timed ``extract`` of its top (the provider
    reads from memory when ``lazy``; otherwise the blobs are local). Returns (seconds,
    provider calls)."""
    root = fresh_dir(base)
    by_digest = {d.digest: b for b, d in zip(blobs, descs, strict=True)}
    calls = [0]

    def provider(desc: Descriptor) -> io.BytesIO:
        calls[0] += 1
        return io.BytesIO(by_digest[desc.digest])

    handlers = {d.digest: DescHandler(provider) for d in descs}
    cache = open_cache(root, snapshotter=snapshotter, timeout=600)
    try:
        if not lazy:
            for data, desc in zip(blobs, descs, strict=True):
                cache.content.write_blob(data, desc)
        ref: ImmutableRef | None = None
        refs = []
        for desc in descs:
            ref = cache.manager.get_by_blob(desc, ref, desc_handlers=handlers).get(timeout=600)
            refs.append(ref)
        assert ref is not None
        top = ref
        seconds = timed(top.extract)
        for r in refs:
            r.release()
        return seconds, calls[0]
    finally:
        cache.close()
        shutil.rmtree(root, ignore_errors=True)


# -- get_remotes ------------------------------------------------------------------------------


def build_chain(cache: Cache, layers: int, files: int, size: int) -> ImmutableRef:
    parent: ImmutableRef | None = None
    for i in range(layers):
        m = cache.manager.new(parent).get(timeout=600)
        rng = random.Random(1000 + i)
        with m.mount(readonly=False).local() as path:
            for j in range(files):
                d = path / f"l{i}" / f"d{j % 8}"
                d.mkdir(parents=True, exist_ok=True)
                half = size // files // 2
                (d / f"f{j}").write_bytes(rng.randbytes(half) + b"x" * half)
        ref = m.commit()
        if parent is not None:
            parent.release()
        parent = ref
    assert parent is not None
    return parent


def remotes_times(
    base: Path, snapshotter: str, compression: str, size: int, shape: str, layers: int
) -> dict[str, float]:
    root = fresh_dir(base)
    cache = open_cache(root, snapshotter=snapshotter, timeout=600)
    try:
        top = build_chain(cache, layers, 40, size)
        if shape == "finalized":
            top.finalize()
        other = "zstd" if compression != "zstd" else "gzip"
        out = {
            "create_ms": timed(lambda: top.get_remotes(compression)) * 1e3,
            "cached_ms": timed(lambda: top.get_remotes(compression)) * 1e3,
            "force_other_ms": timed(lambda: top.get_remotes(other, force=True)) * 1e3,
            "force_other_cached_ms": timed(lambda: top.get_remotes(other, force=True)) * 1e3,
        }
        top.release()
        return out
    finally:
        cache.close()
        shutil.rmtree(root, ignore_errors=True)


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="layers of the extracted chain")
    parser.add_argument("--layer-mb", type=float, default=8.0, help="MB of tar per layer")
    parser.add_argument("--files", type=int, default=200, help="files per extracted layer")
    parser.add_argument("--remote-mb", type=float, default=1.0, help="MB per get_remotes layer")
    parser.add_argument("--remote-layers", type=int, default=10, help="get_remotes chain length")
    parser.add_argument(
        "--compressions", default=",".join(COMPRESSIONS), help="comma-separated subset"
    )
    parser.add_argument("--snapshotter", default="native", choices=("native", "overlay"))
    add_shape_argument(parser)
    add_common_arguments(parser)
    # The former name of --dir.
    parser.add_argument(
        "--workdir", dest="dir", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    compressions = [c for c in args.compressions.split(",") if c]
    if set(compressions) - set(COMPRESSIONS):
        parser.error(f"compressions are {', '.join(COMPRESSIONS)}")

    report = Report("bench_blobs", args, args.dir, columns=COLUMNS)
    base = work_dir(args.dir.resolve(), "bench-blobs-")
    try:
        size = int(args.layer_mb * MB)
        tars = [layer_tar(i, size, args.files) for i in range(args.layers)]
        total = sum(len(t) for t in tars)
        report.note(
            f"extract: {args.layers} layers, {total / MB:.1f} MB of tar, {args.files} files "
            f"per layer, snapshotter {args.snapshotter}; MB/s of uncompressed tar"
        )
        chains = {c: chain_blobs(tars, c) for c in compressions}
        rsize = int(args.remote_mb * MB)
        report.note(
            f"get_remotes: {args.remote_layers}-layer chain (new + {rsize / MB:.1f} MB of "
            "files + commit per layer)"
        )
        for rep in range(args.repeat):
            for c in compressions:
                blobs, descs = chains[c]
                # Side by side, so that the ratios compare runs under the same disk load.
                raw_t = raw_apply(base, args.snapshotter, blobs, descs)
                local_t = cache_extract(base, args.snapshotter, blobs, descs, lazy=False)[0]
                lazy_t, calls = cache_extract(base, args.snapshotter, blobs, descs, lazy=True)
                res = {
                    "blobs_mb": sum(map(len, blobs)) / MB,
                    "raw_apply_mb_s": total / MB / raw_t,
                    "local_mb_s": total / MB / local_t,
                    "local_vs_raw": local_t / raw_t,
                    "lazy_mb_s": total / MB / lazy_t,
                    "lazy_vs_raw": lazy_t / raw_t,
                    "provider_calls": calls,
                }
                params = {"compression": c, "snapshotter": args.snapshotter}
                report.add("extract", None, params, res, repeat=rep)
            for shape in shapes:
                for c in compressions:
                    res = remotes_times(base, args.snapshotter, c, rsize, shape, args.remote_layers)
                    params = {"compression": c, "layers": args.remote_layers}
                    report.add("get_remotes", shape, params, res, repeat=rep)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
