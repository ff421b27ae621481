"""A build fleet sharing one registry: N worker processes, each with its own cache root.

Every worker builds the same set of images (the demo's generated bases and applications:
``actors/_demo.py``), in its own order. For each image it first pulls the image's cache (and its
base's) from the local registry (lazily: only the layers it then mounts are fetched), looks
its layers up in its cache by blob-chain ID, and builds only what is missing (the layer tarballs are
"built" by applying the generated blobs, as a build step would produce them); then it pushes
what it built. So the first worker to reach a base builds it, the others pull it.

Per worker it reports layers built versus pulled from the registry, the bytes of each, and
the cache hit ratio (layers needed but not built, found in its own cache or pulled, over
layers needed); then the fleet's totals.

    python scripts/fleet.py [--workers 4] [--bases 3] [--apps 6] [--seed 1]

The registry is a local ``docker-registry`` (Debian package) on 127.0.0.1 started by the
script; every cache root and the registry storage are under a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _local_registry import LocalRegistry


def _worker(index: int, host: str, root: str, args: dict[str, Any], out: Any) -> None:
    from refcache.actors import DescHandler, NotFoundError, open_cache
    from refcache.actors._demo import generate_images

    images = generate_images(
        args["seed"], bases=args["bases"], apps=args["apps"], files=8, file_size=16_384
    )
    order = list(images)
    random.Random(index).shuffle(order)
    stats = {"worker": index, "built": 0, "built_bytes": 0, "pulled": 0, "pulled_bytes": 0}
    stats |= {"needed": 0, "pushes": 0, "seconds": 0.0}
    started = time.monotonic()
    with open_cache(root, snapshotter="native", timeout=120) as cache:
        by_name = {image.name: image for image in images}
        for image in order:
            # The image's own cache, and its base's (an application starts from one).
            sources = [image.name]
            base = next(
                (
                    b.name
                    for b in images
                    if b.name.startswith("base")
                    and b.layers == image.layers[: len(b.layers)]
                    and b.name != image.name
                ),
                None,
            )
            if base is not None:
                sources.append(base)
            refs: dict[str, Any] = {}
            for name in sources:
                with contextlib.suppress(NotFoundError):  # nobody pushed it yet
                    pulled = cache.pull(f"registry://{host}/fleet/{name}:cache", insecure=True)
                    refs |= {f"{name}/{k}": v for k, v in pulled.items()}
            built = {"layers": 0, "bytes": 0}
            blobs = {layer.digest: layer.blob for layer in by_name[image.name].layers}

            def build(
                desc: Any, blobs: dict[str, bytes] = blobs, built: dict[str, int] = built
            ) -> Any:
                # Stands in for a build step producing this layer.
                built["layers"] += 1
                built["bytes"] += desc.size
                return io.BytesIO(blobs[desc.digest])

            local = DescHandler(build)
            # Layers some pushed cache image has: fetched from the registry (the cache keeps
            # the pulled source's handlers); the others are built here.
            remote = {d for r in refs.values() for d in r.desc_handlers}
            parent = None
            for layer in image.layers:
                stats["needed"] += 1
                own = None if layer.digest in remote else {layer.digest: local}
                ref = cache.manager.get_by_blob(
                    layer.desc, parent, desc_handlers=own, description=layer.name
                ).get(timeout=120)
                if parent is not None:
                    parent.release()
                parent = ref
            assert parent is not None
            before = cache.manager.statistics().get(timeout=60)
            with parent.mount().local():
                pass  # the build uses the image: each layer is fetched or built now, once
            after = cache.manager.statistics().get(timeout=60)
            stats["pulled"] += after.registry_blobs.get(
                ("pull", "fetched"), 0
            ) - before.registry_blobs.get(("pull", "fetched"), 0)
            stats["pulled_bytes"] += after.registry_bytes.get(
                "pull", 0
            ) - before.registry_bytes.get("pull", 0)
            stats["built"] += built["layers"]
            stats["built_bytes"] += built["bytes"]
            if built["layers"]:
                cache.push(
                    f"registry://{host}/fleet/{image.name}:cache",
                    {image.name: parent},
                    compression="gzip",
                    insecure=True,
                )
                stats["pushes"] += 1
            parent.release()
            for r in refs.values():
                r.release()
    stats["seconds"] = time.monotonic() - started
    out.put(stats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--bases", type=int, default=3)
    parser.add_argument("--apps", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="start each worker when the previous one finished (a warm registry)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    work = Path(tempfile.mkdtemp(prefix="fleet-"))
    try:
        with LocalRegistry(work / "registry") as reg:
            ctx = multiprocessing.get_context("spawn")
            queue = ctx.Queue()
            opts = {"seed": args.seed, "bases": args.bases, "apps": args.apps}
            procs = [
                ctx.Process(target=_worker, args=(i, reg.host, str(work / f"w{i}"), opts, queue))
                for i in range(args.workers)
            ]
            for p in procs:
                p.start()
                if args.sequential:
                    p.join(timeout=600)
            results = []
            deadline = time.monotonic() + 900
            while len(results) < len(procs) and time.monotonic() < deadline:
                try:
                    results.append(queue.get(timeout=1))
                except Exception:
                    if not any(p.is_alive() for p in procs) and queue.empty():
                        break
            for p in procs:
                p.join(timeout=60)
            failed = [p.exitcode for p in procs if p.exitcode != 0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results.sort(key=lambda r: r["worker"])
    for r in results:
        r["hit_ratio"] = 1 - r["built"] / max(r["needed"], 1)
    if args.json:
        print(json.dumps({"workers": results}, indent=2))
    else:
        print(f"fleet: {args.workers} workers, {args.bases} bases, {args.apps} apps, one registry")
        print(
            f"{'worker':>6} {'built':>6} {'built MB':>9} {'pulled':>7} {'pulled MB':>10} "
            f"{'hit ratio':>10} {'pushes':>7} {'seconds':>8}"
        )
        for r in results:
            print(
                f"{r['worker']:>6} {r['built']:>6} {r['built_bytes'] / 1e6:>9.2f} "
                f"{r['pulled']:>7} {r['pulled_bytes'] / 1e6:>10.2f} {r['hit_ratio']:>10.0%} "
                f"{r['pushes']:>7} {r['seconds']:>8.1f}"
            )
        built = sum(r["built"] for r in results)
        needed = sum(r["needed"] for r in results)
        print(f"fleet: {built} of {needed} layers built ({1 - built / max(needed, 1):.0%} hits)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
