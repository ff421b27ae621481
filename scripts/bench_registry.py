"""Benchmark of push and pull through a local OCI registry, next to raw HTTP in the same run.

Three measurements, each against a fresh local ``docker-registry`` (CNCF distribution,
filesystem storage, plain HTTP on 127.0.0.1):

* ``push``: a record chain of ``--layers`` layers of ``--layer-mb`` MB of random file data
  (incompressible: the 10 x 20 MB default is a 200 MB image), blobs computed beforehand
  (``get_remotes``, not timed), then ``cache.push`` timed. Baseline ``raw PUT``: the same
  blobs uploaded to another fresh registry with ``http.client``, one monolithic
  ``POST``+``PUT`` per blob streamed in 1 MiB pieces, one after the other.
* ``pull``: ``cache.pull(fetch=True)`` of that image into a fresh cache (every blob streamed
  from the registry, written and verified into the content store). Baseline ``raw GET``:
  the same blobs streamed with ``http.client`` into files (fsync'ed, as the content store
  does), one after the other.
* ``lazy pull``: a cache image of ``--names`` names, each a chain of ``--depth`` distinct
  layers (``--names x --depth`` records; default 1000 x 10 = 10k), written straight to the
  registry with the storage client (setup, not timed); then ``cache.pull`` timed in a fresh
  cache: index and manifests fetched, every record made lazy, no blob fetched (checked).

    python scripts/bench_registry.py [--layers 10] [--layer-mb 20] [--names 1000] [--depth 10]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import io
import os
import random
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from refcache.actors import Cache, ImmutableRef, open_cache
from refcache.storage import ANNOTATION_UNCOMPRESSED, Descriptor
from refcache.storage._oci import (
    MEDIA_TYPE_OCI_INDEX,
    LayerMeta,
    build_config,
    build_index,
    build_manifest,
)
from refcache.storage._registry import RegistryClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _local_registry import LocalRegistry

MB = 1_000_000
CHUNK = 1 << 20


def _open(root: Path) -> Cache:
    return open_cache(root, snapshotter="native", timeout=600)


def build_image(cache: Cache, layers: int, layer_mb: int) -> ImmutableRef:
    """A chain of ``layers`` records, each with ``layer_mb`` MB of random files."""
    ref: ImmutableRef | None = None
    rng = random.Random(1)
    for i in range(layers):
        m = cache.manager.new(ref, description=f"bench layer {i}").get(timeout=600)
        with m.mount().local() as path:
            d = path / f"layer{i}"
            d.mkdir()
            for j in range(layer_mb):
                (d / f"f{j}").write_bytes(rng.randbytes(MB))
        nxt = m.commit()
        if ref is not None:
            ref.release()
        ref = nxt
    assert ref is not None
    return ref


# -- raw HTTP baselines -------------------------------------------------------------------------


def raw_put(host: str, repo: str, path: Path, digest: str) -> None:
    """One monolithic upload with http.client: POST, then PUT streamed from the file."""
    conn = http.client.HTTPConnection(host, timeout=600)
    conn.request("POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
    resp = conn.getresponse()
    resp.read()
    location = resp.getheader("Location", "")
    assert resp.status == 202, resp.status
    if location.startswith("http://"):
        location = "/" + location.split("/", 3)[3]
    sep = "&" if "?" in location else "?"
    size = path.stat().st_size
    conn.putrequest("PUT", f"{location}{sep}digest={digest}")
    conn.putheader("Content-Length", str(size))
    conn.putheader("Content-Type", "application/octet-stream")
    conn.endheaders()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            conn.send(chunk)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 201, resp.status
    conn.close()


def raw_get(host: str, repo: str, digest: str, out: Path) -> int:
    """One blob GET with http.client, streamed into a file (fsync'ed)."""
    conn = http.client.HTTPConnection(host, timeout=600)
    conn.request("GET", f"/v2/{repo}/blobs/{digest}")
    resp = conn.getresponse()
    assert resp.status == 200, resp.status
    n = 0
    with out.open("wb") as f:
        while chunk := resp.read(CHUNK):
            f.write(chunk)
            n += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    conn.close()
    return n


# -- the lazy 10k image -----------------------------------------------------------------------


def tiny_layer(name: str) -> tuple[Descriptor, bytes]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        info = tarfile.TarInfo(f"{name}/file")
        data = name.encode()
        info.size = len(data)
        info.mtime = 1_700_000_000
        tf.addfile(info, io.BytesIO(data))
    tar = raw.getvalue()
    blob = gzip.compress(tar, mtime=0)
    desc = Descriptor(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "sha256:" + hashlib.sha256(blob).hexdigest(),
        len(blob),
        {ANNOTATION_UNCOMPRESSED: "sha256:" + hashlib.sha256(tar).hexdigest()},
    )
    return desc, blob


def write_big_index(host: str, repo: str, tag: str, names: int, depth: int) -> int:
    """Writes a cache image of ``names`` chains of ``depth`` layers; returns the records."""
    client = RegistryClient(host, insecure=True, timeout=120)
    store = client.repository(repo)

    def one(n: int) -> tuple[str, Descriptor]:
        layers, metas = [], []
        for d in range(depth):
            desc, blob = tiny_layer(f"n{n}-l{d}")
            store.put_blob(desc, lambda blob=blob: io.BytesIO(blob))
            layers.append(desc)
            metas.append(LayerMeta(f"n{n} layer {d}", "", 1_700_000_000 * 10**9))
        config, config_bytes = build_config(layers, metas, metas[-1])
        store.put_blob(config, lambda: io.BytesIO(config_bytes))
        manifest, data = build_manifest(f"n{n}", config, layers, metas, metas[-1])
        store.put_manifest(manifest.digest, manifest.media_type, data)
        return f"n{n}", manifest

    with ThreadPoolExecutor(8) as ex:
        manifests = dict(ex.map(one, range(names)))
    _, index_bytes = build_index(manifests)
    store.put_manifest(tag, MEDIA_TYPE_OCI_INDEX, index_bytes)
    client.close()
    return names * depth


# -- main ---------------------------------------------------------------------------------------


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--layer-mb", type=int, default=20)
    parser.add_argument("--compression", default="zstd")
    parser.add_argument("--names", type=int, default=1000)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-lazy", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-registry-", dir="."))
    print(f"bench_registry: {os.cpu_count()} cores, work dir {work}")
    try:
        if not args.skip_throughput:
            throughput(work, args)
        if not args.skip_lazy:
            lazy(work, args)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


def throughput(work: Path, args: argparse.Namespace) -> None:
    with _open(work / "src") as cache:
        ref = build_image(cache, args.layers, args.layer_mb)
        remote = ref.get_remotes(args.compression)[0]  # blobs computed here, not timed
        descs = list(remote.descriptors)
        total = sum(d.size for d in descs)
        blob_files = [cache.content.path(d.digest) for d in descs]
        with LocalRegistry(work / "reg-a") as reg:
            target = f"registry://{reg.host}/bench/cache:v1"
            secs, result = _timed(lambda: cache.push(target, {"img": ref}, insecure=True))
            assert result.blobs_uploaded == len(descs) + 1
            push_mbs = total / MB / secs
            with _open(work / "dst") as other:
                pull_secs, refs = _timed(lambda: other.pull(target, insecure=True, fetch=True))
                refs["img"].release()
            pull_mbs = total / MB / pull_secs
            out = work / "raw-get"
            out.mkdir()
            raw_get_secs, _ = _timed(
                lambda: [
                    raw_get(reg.host, "bench/cache", d.digest, out / str(i))
                    for i, d in enumerate(descs)
                ]
            )
        with LocalRegistry(work / "reg-b") as reg:
            raw_put_secs, _ = _timed(
                lambda: [
                    raw_put(reg.host, "bench/raw", f, d.digest)
                    for f, d in zip(blob_files, descs, strict=True)
                ]
            )
        ref.release()
    raw_put_mbs = total / MB / raw_put_secs
    raw_get_mbs = total / MB / raw_get_secs
    print(f"image: {len(descs)} layers, {total / MB:.0f} MB of {args.compression} blobs")
    print(f"{'':12}{'seconds':>9}{'MB/s':>9}{'vs raw':>9}")
    print(f"{'push':12}{secs:9.2f}{push_mbs:9.0f}{push_mbs / raw_put_mbs:9.2f}x")
    print(f"{'raw PUT':12}{raw_put_secs:9.2f}{raw_put_mbs:9.0f}")
    print(f"{'pull':12}{pull_secs:9.2f}{pull_mbs:9.0f}{pull_mbs / raw_get_mbs:9.2f}x")
    print(f"{'raw GET':12}{raw_get_secs:9.2f}{raw_get_mbs:9.0f}")


def lazy(work: Path, args: argparse.Namespace) -> None:
    with LocalRegistry(work / "reg-lazy") as reg:
        setup, records = _timed(
            lambda: write_big_index(reg.host, "bench/big", "v1", args.names, args.depth)
        )
        print(
            f"lazy image: {args.names} names x {args.depth} layers = {records} records "
            f"(written in {setup:.1f} s)"
        )
        with _open(work / "lazy") as cache:
            secs, refs = _timed(
                lambda: cache.pull(f"registry://{reg.host}/bench/big:v1", insecure=True)
            )
            stats = cache.manager.statistics().get(timeout=60)
            fetched = stats.registry_blobs.get(("pull", "fetched"), 0)
            gets = stats.registry_requests.get(("manifest_get", "200"), 0)
            blob_gets = sum(n for (op, _), n in stats.registry_requests.items() if op == "blob_get")
            print(
                f"lazy pull: {secs:.2f} s for {stats.records} records "
                f"({len(refs)} names, {gets} manifest GETs, {blob_gets} blob GETs, "
                f"{fetched} blobs fetched); lazy records: {stats.lazy}"
            )
            for r in refs.values():
                r.release()
            again, refs = _timed(
                lambda: cache.pull(f"registry://{reg.host}/bench/big:v1", insecure=True)
            )
            print(f"second pull (all found by blob-chain ID): {again:.2f} s")
            for r in refs.values():
                r.release()


if __name__ == "__main__":
    raise SystemExit(main())
