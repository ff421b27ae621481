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

Record shapes (lazy-commit pairs against finalized records, as the other scripts measure
them) do not apply: a push needs the chain's blobs, and computing them finalizes every
record of the chain first (``get_remotes``, as BuildKit's ``GetRemotes`` does), so whatever
shape the chain was built in, it is pushed finalized; a pull makes lazy records of blobs
(``get_by_blob``), never pairs. The chain here is built as a build leaves it (``new`` +
files + ``commit``: its top is a pair until ``get_remotes``).

Every measurement runs ``--repeat`` times (fresh registries and caches under a temporary
directory in ``--dir``, the current directory by default); the table shows the medians and
``/proc/loadavg``; ``--json`` prints JSON lines (see ``scripts/_bench.py``).

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
from _bench import Report, add_common_arguments, remove_tree, work_dir
from _local_registry import LocalRegistry

MB = 1_000_000
CHUNK = 1 << 20
#: What the table shows (``--json`` has every field).
COLUMNS = {
    "push_pull": [
        "mb",
        "push_s",
        "push_mb_s",
        "raw_put_mb_s",
        "push_vs_raw",
        "pull_s",
        "pull_mb_s",
        "raw_get_mb_s",
        "pull_vs_raw",
    ],
    "lazy_pull": ["pull_s", "manifest_gets", "blob_gets", "lazy_records", "second_pull_s"],
}


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
    add_common_arguments(parser, repeat=1)
    args = parser.parse_args(argv)
    report = Report("bench_registry", args, args.dir, columns=COLUMNS)
    work = work_dir(args.dir, "bench-registry-")
    try:
        for rep in range(args.repeat):
            if not args.skip_throughput:
                res = throughput(work / f"t{rep}", args)
                params = {"layers": args.layers, "compression": args.compression}
                report.add("push_pull", None, params, res, repeat=rep)
            if not args.skip_lazy:
                res = lazy(work / f"l{rep}", args)
                report.add("lazy_pull", None, {"records": res.pop("records")}, res, repeat=rep)
    finally:
        remove_tree(work)
    report.finish()
    return 0


def throughput(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    work.mkdir(parents=True)
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
            with _open(work / "dst") as other:
                pull_secs, refs = _timed(lambda: other.pull(target, insecure=True, fetch=True))
                refs["img"].release()
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
    mb = total / MB
    return {
        "blobs": len(descs),
        "mb": mb,
        "push_s": secs,
        "push_mb_s": mb / secs,
        "raw_put_mb_s": mb / raw_put_secs,
        "push_vs_raw": raw_put_secs / secs,
        "pull_s": pull_secs,
        "pull_mb_s": mb / pull_secs,
        "raw_get_mb_s": mb / raw_get_secs,
        "pull_vs_raw": raw_get_secs / pull_secs,
    }


def lazy(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    work.mkdir(parents=True)
    with LocalRegistry(work / "reg-lazy") as reg:
        setup, records = _timed(
            lambda: write_big_index(reg.host, "bench/big", "v1", args.names, args.depth)
        )
        with _open(work / "lazy") as cache:
            secs, refs = _timed(
                lambda: cache.pull(f"registry://{reg.host}/bench/big:v1", insecure=True)
            )
            stats = cache.manager.statistics().get(timeout=60)
            fetched = stats.registry_blobs.get(("pull", "fetched"), 0)
            gets = stats.registry_requests.get(("manifest_get", "200"), 0)
            blob_gets = sum(n for (op, _), n in stats.registry_requests.items() if op == "blob_get")
            names = len(refs)
            for r in refs.values():
                r.release()
            again, refs = _timed(
                lambda: cache.pull(f"registry://{reg.host}/bench/big:v1", insecure=True)
            )
            for r in refs.values():
                r.release()
    return {
        "records": records,
        "setup_s": setup,
        "pull_s": secs,
        "cm_records": stats.records,
        "names": names,
        "manifest_gets": gets,
        "blob_gets": blob_gets,
        "blobs_fetched": fetched,
        "lazy_records": stats.lazy,
        "second_pull_s": again,
    }


if __name__ == "__main__":
    raise SystemExit(main())
