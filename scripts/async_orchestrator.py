"""An example build orchestrator on asyncio: a DAG of steps built concurrently on one loop.

Each step is a coroutine: it waits for its parents' layers, merges them (``manager.merge``),
opens a mutable layer on the merge (``manager.new``), writes its files into the mount,
commits, and hands its layer to its children. Independent steps run at the same time; the
loop never blocks (``refcache.aio``). The cache's Prometheus metrics are served while it
runs (``--metrics-port``; 0 picks a free port), and scraped once at the end.

    python scripts/async_orchestrator.py --root /tmp/orchestrated --metrics-port 0

Exit code 0 when every step's layer holds exactly the files of the step and its ancestors;
1 otherwise (the difference is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from refcache.aio import AsyncCache, AsyncImmutableRef, open_cache_async

#: The default DAG: step -> parents (a diamond and a tail, like a multi-stage build).
DAG: dict[str, tuple[str, ...]] = {
    "base": (),
    "toolchain": ("base",),
    "deps": ("base",),
    "compile": ("toolchain", "deps"),
    "test": ("compile",),
    "docs": ("deps",),
    "package": ("compile", "docs"),
}


def ancestors(step: str, dag: dict[str, tuple[str, ...]]) -> set[str]:
    """``step`` and every step it depends on."""
    seen = {step}
    for parent in dag[step]:
        seen |= ancestors(parent, dag)
    return seen


async def build_step(
    cache: AsyncCache,
    name: str,
    parents: list[asyncio.Task[AsyncImmutableRef]],
    files: int,
) -> AsyncImmutableRef:
    """One step: merge the parents' layers, write ``files`` files on top, commit."""
    inputs = [await p for p in parents]
    merged = await cache.manager.merge(inputs)  # None for a root step
    try:
        layer = await cache.manager.new(merged, description=f"step {name}")
    finally:
        if merged is not None:
            await merged.release()  # the new layer holds its parent itself
    async with layer.mount().local() as root:
        out = root / "steps" / name
        out.mkdir(parents=True, exist_ok=True)
        for n in range(files):
            (out / f"out-{n}.txt").write_text(f"{name} output {n}\n")
    return await layer.commit()


async def orchestrate(args: argparse.Namespace) -> int:
    dag = DAG
    started = time.perf_counter()
    async with open_cache_async(args.root, metrics_port=args.metrics_port) as cache:
        tasks: dict[str, asyncio.Task[AsyncImmutableRef]] = {}
        for name, parents in dag.items():  # parents come first in DAG's order
            tasks[name] = asyncio.create_task(
                build_step(cache, name, [tasks[p] for p in parents], args.files), name=name
            )
        try:
            layers = dict(zip(tasks, await asyncio.gather(*tasks.values()), strict=True))
        except BaseException:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            for task in tasks.values():
                if not task.cancelled() and task.exception() is None:
                    await task.result().release()
            raise
        wrong = 0
        report: dict[str, object] = {}
        try:
            for name, layer in layers.items():
                async with layer.mount().local() as root:
                    present = sorted(p.name for p in (root / "steps").iterdir())
                expected = sorted(ancestors(name, dag))
                if present != expected:
                    wrong += 1
                    print(f"step {name}: has {present}, expected {expected}", file=sys.stderr)
                report[name] = {"id": layer.id, "size": await layer.size(), "steps": present}
        finally:
            for layer in layers.values():
                await layer.release()
        server = cache.cache.metrics_server
        assert server is not None
        loop = asyncio.get_running_loop()
        # The scrape is blocking I/O: it runs on the loop's default executor.
        text = await loop.run_in_executor(None, scrape, server.url)
        series = [line for line in text.splitlines() if line.startswith("refcache_")]
        summary = {
            "steps": report,
            "wall_s": round(time.perf_counter() - started, 3),
            "metrics_url": server.url,
            "metrics_series": len(series),
            "ok": wrong == 0,
        }
    if args.json:
        print(json.dumps(summary))
    else:
        for name, row in report.items():
            print(f"{name:>10}: {row}")
        print(f"metrics: {len(series)} refcache_ series at {summary['metrics_url']}")
        print(f"{len(dag)} steps in {summary['wall_s']} s: {'ok' if wrong == 0 else 'WRONG'}")
    return 0 if wrong == 0 else 1


def scrape(url: str) -> str:
    """One GET of the metrics page."""
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - our own server
        body: bytes = response.read()
    return body.decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="the cache directory (default: a temp dir)")
    parser.add_argument("--metrics-port", type=int, default=0, help="0: any free port")
    parser.add_argument("--files", type=int, default=3, help="files each step writes")
    parser.add_argument("--json", action="store_true", help="one JSON summary line")
    args = parser.parse_args(argv)
    if args.root is None:
        args.root = Path(tempfile.mkdtemp(prefix="refcache-orchestrator-"))
    os.makedirs(args.root, exist_ok=True)
    return asyncio.run(orchestrate(args))


if __name__ == "__main__":
    sys.exit(main())
