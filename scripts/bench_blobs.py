"""Benchmark of lazy layers and blobs: extraction throughput and ``get_remotes``, on the disk.

Measured in one run, so the ratios hold across machines:

* ``extract``: a lazy chain of ``--layers`` layers (``--layer-mb`` MB of tar each, seeded,
  half random and half repetitive data) is extracted through the cache, per compression:
  ``lazy`` (``get_by_blob`` + ``extract``: the provider is read from memory, the blob
  written and verified into the content store, then applied), ``local`` (the blobs are in
  the content store already: apply only). The baseline, ``raw apply``, is the same blobs
  applied with a bare :class:`storage.TarApplier` into the same snapshotter (prepare, apply,
  commit per layer) without the cache. MB/s counts uncompressed tar bytes.
* ``get_remotes``: a 10-layer chain built with ``new`` + files + ``commit``; per
  compression, ``get_remotes(c)`` with ``create_if_needed`` from scratch (the differ writes
  every blob), again when cached, and forcing another compression (conversion of all ten).

Every repetition uses a fresh cache under a temporary directory in the current directory
(the disk under test); the median is reported.

    python scripts/bench_blobs.py [--layers 4] [--layer-mb 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import random
import shutil
import statistics
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

OCI = "application/vnd.oci.image.layer.v1.tar"
MEDIA = {"uncompressed": OCI, "gzip": OCI + "+gzip", "zstd": OCI + "+zstd"}
COMPRESSIONS = ("uncompressed", "gzip", "zstd")
MB = 1_000_000


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


def remotes_times(base: Path, snapshotter: str, compression: str, size: int) -> dict[str, float]:
    root = fresh_dir(base)
    cache = open_cache(root, snapshotter=snapshotter, timeout=600)
    try:
        top = build_chain(cache, 10, 40, size)
        top.finalize()
        other = "zstd" if compression != "zstd" else "gzip"
        out = {
            "create": timed(lambda: top.get_remotes(compression)),
            "cached": timed(lambda: top.get_remotes(compression)),
            "force_other": timed(lambda: top.get_remotes(other, force=True)),
            "force_other_cached": timed(lambda: top.get_remotes(other, force=True)),
        }
        top.release()
        return out
    finally:
        cache.close()
        shutil.rmtree(root, ignore_errors=True)


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="layers of the extracted chain")
    parser.add_argument("--layer-mb", type=float, default=8.0, help="MB of tar per layer")
    parser.add_argument("--files", type=int, default=200, help="files per extracted layer")
    parser.add_argument("--remote-mb", type=float, default=1.0, help="MB per get_remotes layer")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--snapshotter", default="native", choices=("native", "overlay"))
    parser.add_argument("--workdir", default=".", help="where temporary caches go (the disk)")
    args = parser.parse_args()

    base = Path(args.workdir).resolve() / f".bench-blobs-{os.getpid()}"
    base.mkdir(parents=True)
    started = time.perf_counter()
    try:
        size = int(args.layer_mb * MB)
        tars = [layer_tar(i, size, args.files) for i in range(args.layers)]
        total = sum(len(t) for t in tars)
        print(
            f"extract: {args.layers} layers, {total / MB:.1f} MB of tar, "
            f"{args.files} files per layer, snapshotter {args.snapshotter}, "
            f"median of {args.repeat}"
        )
        print(
            "| compression | blobs MB | raw apply | cache, blobs local | vs raw | "
            "cache, lazy (fetch + apply) | vs raw | provider calls |"
        )
        print("|---|--:|--:|--:|--:|--:|--:|--:|")
        for c in COMPRESSIONS:
            blobs, descs = chain_blobs(tars, c)
            raw_t, local_t, lazy_t = [], [], []
            calls = 0
            for _ in range(args.repeat):
                # Side by side, so that the ratios compare runs under the same disk load.
                raw_t.append(raw_apply(base, args.snapshotter, blobs, descs))
                local_t.append(cache_extract(base, args.snapshotter, blobs, descs, lazy=False)[0])
                t, calls = cache_extract(base, args.snapshotter, blobs, descs, lazy=True)
                lazy_t.append(t)

            def rate(times: list[float]) -> str:
                return (
                    f"{total / MB / statistics.median(times):.1f} MB/s "
                    f"({total / MB / max(times):.0f}-{total / MB / min(times):.0f})"
                )

            local_ratio = statistics.median(lo / r for lo, r in zip(local_t, raw_t, strict=True))
            lazy_ratio = statistics.median(la / r for la, r in zip(lazy_t, raw_t, strict=True))
            print(
                f"| {c} | {sum(map(len, blobs)) / MB:.1f} | {rate(raw_t)} | {rate(local_t)} | "
                f"{local_ratio:.2f}x | {rate(lazy_t)} | {lazy_ratio:.2f}x | {calls} |"
            )
        rsize = int(args.remote_mb * MB)
        print()
        print(
            f"get_remotes: 10-layer chain (new + {rsize / MB:.1f} MB of files + commit per "
            f"layer), median of {args.repeat}"
        )
        print("| compression | create blobs | cached | force the other | force again (cached) |")
        print("|---|--:|--:|--:|--:|")
        for c in COMPRESSIONS:
            runs = [remotes_times(base, args.snapshotter, c, rsize) for _ in range(args.repeat)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            other = "zstd" if c != "zstd" else "gzip"
            print(
                f"| {c} | {med['create'] * 1000:.0f} ms | {med['cached'] * 1000:.1f} ms | "
                f"{med['force_other'] * 1000:.0f} ms ({other}) | "
                f"{med['force_other_cached'] * 1000:.1f} ms |"
            )
        print(f"\nwall time: {time.perf_counter() - started:.0f} s")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
