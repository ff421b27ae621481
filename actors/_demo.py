"""``refcache demo``: an embedded build orchestrator simulation (the README's main command).

What an orchestrator embedding refcache does, several builds at once, on a real cache:

* **pulls**: each build's base image is a chain of generated layer tarballs (gzip), served by
  an in-memory registry through a ``DescHandler`` provider. ``get_by_blob`` makes *lazy*
  records (BuildKit's blob-only refs); ``extract`` pulls and unpacks them. Builds that share
  a base share its records: the second build of a base finds the chain already cached.
* **build steps**: ``new(parent)`` -> write files into the mount -> ``commit`` (BuildKit's
  ExecOp on a mutable ref), a few steps per build;
* **COPY --link** style merges (``merge``) of the base and a separately built layer, and a
  ``diff`` of the final image against its base (what an exporter sends);
* live progress lines, Prometheus ``/metrics`` on 127.0.0.1 while it runs;
* at the end a ``du`` table and a prune under a ``max_used_space`` policy, then
  ``storage.check``: the cache is left consistent for ``refcache du``/``check``.

The generated layers (:func:`generate_layer`, :class:`LayerRegistry`) are also what the load
and crash tests pull (``scripts/_workload.py``).

This module is a program on top of the whole system (like ``scripts/``), kept in ``actors``
with the command line. It never imports ``metrics`` (which sits above ``actors``): the
``refcache`` console script (``refcache/__main__.py``) hands it ``refcache.metrics.serve``
as ``args.serve_metrics``; run through ``actors`` alone, the demo serves no metrics.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import math
import random
import sys
import tarfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from ..storage import (
    ANNOTATION_UNCOMPRESSED,
    MEDIA_TYPE_OCI_LAYER_GZIP,
    Descriptor,
    FailedPreconditionError,
    NotFoundError,
    check,
    digest_of,
)
from ._cache import open_cache
from ._cliutil import (
    CommandFailedError,
    InterruptedCommandError,
    UsageError,
    format_bytes,
    hold_interrupts,
    parse_size,
    usage_lines,
    usage_totals,
)
from ._types import DescHandler, PrunePolicy

__all__ = [
    "GeneratedImage",
    "GeneratedLayer",
    "LayerRegistry",
    "add_parser",
    "generate_layer",
    "main",
    "run",
]

# -- generated layers ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GeneratedLayer:
    """A generated layer blob (gzip tar) and its OCI descriptor.

    Attributes:
        name: Human name (``base-0/layer-1``).
        blob: The compressed tarball.
        desc: Its descriptor; ``annotations["containerd.io/uncompressed"]`` is the diffID.
        files: Regular files the layer adds, relative paths.
        uncompressed_size: Size of the tar stream.
    """

    name: str
    blob: bytes = field(repr=False)
    desc: Descriptor
    files: tuple[str, ...] = ()
    uncompressed_size: int = 0

    @property
    def digest(self) -> str:
        """The blob digest."""
        return self.desc.digest

    @property
    def diff_id(self) -> str:
        """The digest of the uncompressed tar."""
        return self.desc.annotations[ANNOTATION_UNCOMPRESSED]


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """An image: a name and its layers, root first."""

    name: str
    layers: tuple[GeneratedLayer, ...]


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes | None, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 1_700_000_000  # fixed: the same seed gives the same blob digest
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = mode
    if data is None:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def generate_layer(
    name: str, seed: int, *, files: int = 16, file_size: int = 4096
) -> GeneratedLayer:
    """Generates a deterministic gzip layer tarball under ``<name>/`` (slashes become dashes).

    Half of each file is random bytes, half repeated text, so the blob compresses about 2:1
    like real layers. The same arguments always give the same digest.

    Args:
        name: Layer name; also its top directory in the tree.
        seed: Seed of the file contents.
        files: Number of regular files.
        file_size: Approximate size of each file in bytes (varies by +-50%).

    Returns:
        The layer.
    """
    rng = random.Random(f"{name}:{seed}")
    top = name.replace("/", "-")
    raw = io.BytesIO()
    paths: list[str] = []
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _tar_member(tar, top, None, 0o755)
        _tar_member(tar, f"{top}/sub", None, 0o755)
        for i in range(files):
            size = max(1, int(file_size * rng.uniform(0.5, 1.5)))
            half = size // 2
            text = (f"{name} file {i} seed {seed}\n".encode() * (half // 16 + 1))[:half]
            data = rng.randbytes(size - half) + text
            path = f"{top}/{'sub/' if i % 3 == 0 else ''}f{i:04d}.bin"
            _tar_member(tar, path, data, 0o644)
            paths.append(path)
    tar_bytes = raw.getvalue()
    diff_id = "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    blob = gzip.compress(tar_bytes, compresslevel=1, mtime=0)
    desc = Descriptor(
        MEDIA_TYPE_OCI_LAYER_GZIP,
        digest_of(blob),
        len(blob),
        {ANNOTATION_UNCOMPRESSED: diff_id},
    )
    return GeneratedLayer(name, blob, desc, tuple(paths), len(tar_bytes))


class LayerRegistry:
    """An in-memory stand-in for an OCI registry: generated blobs by digest, and a provider.

    The provider (``DescHandler.provider``) is what ``get_by_blob``/``extract`` call to fetch a
    lazy blob (BuildKit's remote provider). It counts pulls and may add a fixed latency per
    pull to stand in for the network. Thread-safe.

    Args:
        latency: Seconds each pull waits before returning its stream (simulated network).
    """

    def __init__(self, *, latency: float = 0.0) -> None:
        self._lock = threading.Lock()
        self._layers: dict[str, GeneratedLayer] = {}
        self._images: dict[str, GeneratedImage] = {}
        self.latency = latency
        #: Set to make pulls in progress (and later ones) fail at once (Ctrl-C).
        self.cancelled = threading.Event()
        self.pulls = 0
        self.pulled_bytes = 0
        #: One handler for every blob (desc_handlers maps each digest to it).
        self.handler = DescHandler(self.provider)

    def add_image(self, image: GeneratedImage) -> GeneratedImage:
        """Registers an image and its layers."""
        with self._lock:
            self._images[image.name] = image
            for layer in image.layers:
                self._layers[layer.digest] = layer
        return image

    @property
    def images(self) -> list[GeneratedImage]:
        """The registered images, in registration order."""
        with self._lock:
            return list(self._images.values())

    def layer(self, digest: str) -> GeneratedLayer:
        """The layer with blob ``digest``.

        Raises:
            NotFoundError: No such blob here.
        """
        with self._lock:
            layer = self._layers.get(digest)
        if layer is None:
            msg = f"blob {digest} not found in the demo registry"
            raise NotFoundError(msg)
        return layer

    def provider(self, desc: Descriptor) -> BinaryIO:
        """Returns a stream of the blob ``desc`` (a "remote fetch").

        Raises:
            NotFoundError: No such blob here.
            FailedPreconditionError: The registry was cancelled (:attr:`cancelled`).
        """
        layer = self.layer(desc.digest)
        # The wait stands in for a network round trip; a cancel ends it at once.
        waited = self.cancelled.wait(self.latency) if self.latency > 0 else False
        if waited or self.cancelled.is_set():
            msg = f"pull of {desc.digest} cancelled"
            raise FailedPreconditionError(msg)
        with self._lock:
            self.pulls += 1
            self.pulled_bytes += len(layer.blob)
        return io.BytesIO(layer.blob)

    def handlers(self, layers: Sequence[GeneratedLayer] | None = None) -> dict[str, DescHandler]:
        """``desc_handlers`` for ``layers`` (default: every registered blob)."""
        if layers is None:
            with self._lock:
                digests = list(self._layers)
        else:
            digests = [layer.digest for layer in layers]
        return dict.fromkeys(digests, self.handler)


def generate_images(
    seed: int,
    *,
    bases: int = 3,
    base_layers: int = 3,
    apps: int = 6,
    app_layers: int = 2,
    files: int = 16,
    file_size: int = 4096,
) -> list[GeneratedImage]:
    """Base images and application images on top of them (apps share their base's layers).

    Args:
        seed: Seed of every layer.
        bases: Number of base images.
        base_layers: Layers per base image.
        apps: Number of application images (app ``i`` is built on base ``i % bases``).
        app_layers: Own layers per application image.
        files: Files per layer.
        file_size: Approximate file size in bytes.

    Returns:
        The bases first, then the applications.
    """
    images: list[GeneratedImage] = []
    for b in range(bases):
        layers = tuple(
            generate_layer(f"base{b}/l{i}", seed, files=files, file_size=file_size)
            for i in range(base_layers)
        )
        images.append(GeneratedImage(f"base{b}", layers))
    for a in range(apps):
        base = images[a % bases]
        own = tuple(
            generate_layer(f"app{a}/l{i}", seed, files=files // 2 or 1, file_size=file_size)
            for i in range(app_layers)
        )
        images.append(GeneratedImage(f"app{a}", base.layers + own))
    return images


# -- the demo ------------------------------------------------------------------------------------

#: Seconds any single wait of the demo may take.
DEMO_TIMEOUT = 120.0
DEFAULT_METRICS_PORT = 9464
#: Metadata key (and index prefix) under which a build step's result is found again.
STEP_KEY = "demo.cachekey"


class _Console:
    """Progress lines with the time since start, one writer at a time."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._start = time.monotonic()

    def line(self, text: str) -> None:
        with self._lock:
            self._out.write(f"[{time.monotonic() - self._start:5.1f}s] {text}\n")
            self._out.flush()

    def raw(self, text: str = "") -> None:
        with self._lock:
            self._out.write(text + "\n")
            self._out.flush()


class _CancelledError(Exception):
    """The demo was interrupted: a build stops at its next step."""


@dataclass
class _BuildResult:
    name: str
    seconds: float = 0.0
    steps: int = 0
    cached_steps: int = 0
    exported_files: int = 0
    exported_bytes: int = 0
    error: str = ""


@contextmanager
def _holding() -> Iterator[list[Any]]:
    """A list of handles released (newest first) when the block ends, whatever happens."""
    held: list[Any] = []
    try:
        yield held
    finally:
        for ref in reversed(held):
            if not ref.released:
                ref.release()


def _tree_bytes(ref: Any) -> tuple[int, int]:
    """Regular files and their bytes in a ref's tree (what an exporter would send)."""
    files = size = 0
    with ref.mount().local() as path:
        for p in path.rglob("*"):
            if p.is_file() and not p.is_symlink():
                files += 1
                size += p.stat().st_size
    return files, size


class _Builder:
    """One simulated build, as an orchestrator's solver drives cache refs.

    * FROM: the image's layers by blob (``get_by_blob``: lazy records; layers shared between
      images are the same records), then ``extract`` (the provider pulls missing blobs once).
    * RUN steps: a step's cache key is looked up in a metadata index (``search``); a hit is
      the earlier result (``get``), a miss is a mutable on the previous step, files written
      into its mount, ``commit``, and the key stored on the result (BuildKit keeps its cache
      keys in record metadata the same way).
    * COPY --link: a separate layer ``merge``d onto the result; export: the ``diff`` between
      the base and the image.
    """

    def __init__(
        self, cache: Any, registry: LayerRegistry, console: _Console, seed: int, steps: int
    ) -> None:
        self.cache = cache
        self.manager = cache.manager
        self.registry = registry
        self.console = console
        self.seed = seed
        self.steps = steps
        #: Set on Ctrl-C: every build stops before its next operation.
        self.stop = threading.Event()

    def _check(self) -> None:
        if self.stop.is_set():
            raise _CancelledError

    def _pull(
        self, image: GeneratedImage, base: GeneratedImage, name: str, held: list[Any]
    ) -> tuple[Any, Any]:
        handlers = self.registry.handlers(image.layers)
        parent = base_top = None
        pulls = self.registry.pulls
        for n, layer in enumerate(image.layers):
            self._check()
            parent = self.manager.get_by_blob(
                layer.desc, parent, desc_handlers=handlers, description=f"pulled {layer.name}"
            ).get(timeout=DEMO_TIMEOUT)
            held.append(parent)
            if n == len(base.layers) - 1:
                base_top = parent
        assert parent is not None  # every image has layers
        assert base_top is not None
        self._check()
        parent.extract(handlers)
        self.console.line(
            f"{name:<5} FROM {base.name} + {len(image.layers) - len(base.layers)} layer(s): "
            f"{len(image.layers)} records by blob, extracted "
            f"(blobs pulled meanwhile, by all builds: {self.registry.pulls - pulls})"
        )
        return parent, base_top

    def build(
        self, name: str, image: GeneratedImage, base: GeneratedImage, round_: int
    ) -> _BuildResult:
        result = _BuildResult(name)
        start = time.monotonic()
        try:
            with _holding() as held:
                cur, base_top = self._pull(image, base, name, held)
                for k in range(1, self.steps + 1):
                    self._check()
                    key = f"{self.seed}/{name}/step{k}"
                    hit = self._cached(key)
                    if hit is not None:
                        held.append(hit)
                        cur = hit
                        result.cached_steps += 1
                        self.console.line(f"{name:<5} RUN step {k}/{self.steps}: cached")
                        continue
                    m = self.manager.new(cur, description=f"{name} RUN step {k}").get(
                        timeout=DEMO_TIMEOUT
                    )
                    held.append(m)
                    written = self._run_step(m, name, k, round_)
                    cur = m.commit()
                    held.append(cur)
                    cur.metadata.set_string(STEP_KEY, key, index=f"{STEP_KEY}:{key}")
                    result.steps += 1
                    self.console.line(
                        f"{name:<5} RUN step {k}/{self.steps}: wrote {format_bytes(written)}"
                        f", committed {cur.id}"
                    )
                self._check()
                link = self.manager.new(description=f"{name} COPY --link ./src").get(
                    timeout=DEMO_TIMEOUT
                )
                held.append(link)
                self._run_step(link, name, 0, round_)
                link_ref = link.commit()
                held.append(link_ref)
                self._check()
                image_ref = self.manager.merge([cur, link_ref]).get(timeout=DEMO_TIMEOUT)
                held.append(image_ref)
                image_ref.metadata.description = f"image {name}:latest"
                self._check()
                exported = self.manager.diff(base_top, image_ref).get(timeout=DEMO_TIMEOUT)
                held.append(exported)
                result.exported_files, result.exported_bytes = _tree_bytes(exported)
                self.console.line(
                    f"{name:<5} merged COPY --link layer; diff over {base.name} to export: "
                    f"{result.exported_files} files, {format_bytes(result.exported_bytes)}"
                )
        except _CancelledError:
            result.error = "cancelled"
        except Exception as exc:  # reported, and the demo exits non-zero
            result.error = f"{type(exc).__name__}: {exc}"
            if not self.stop.is_set():  # a pull cut short by Ctrl-C is no failure
                self.console.line(f"{name:<5} FAILED: {result.error}")
        result.seconds = time.monotonic() - start
        return result

    def _cached(self, key: str) -> Any:
        for info in self.manager.search(f"{STEP_KEY}:{key}").get(timeout=DEMO_TIMEOUT):
            try:
                return self.manager.get(info.id).get(timeout=DEMO_TIMEOUT)
            except NotFoundError:
                continue  # pruned since the search: a miss
        return None

    def _run_step(self, m: Any, name: str, k: int, round_: int) -> int:
        rng = random.Random(f"{self.seed}/{name}/{k}/{round_}")
        written = 0
        with m.mount().local() as path:
            out = path / "app" / (f"step{k}" if k else "src")
            out.mkdir(parents=True, exist_ok=True)
            for i in range(rng.randint(6, 14)):
                data = rng.randbytes(rng.randint(8, 96) * 1024)
                (out / f"{name}-{i}.o").write_bytes(data)
                written += len(data)
            if k:
                with (path / "app" / "build.log").open("a") as log:
                    log.write(f"{name} step {k}\n")
        return written


def _status(cache: Any, registry: LayerRegistry, phase: str) -> str:
    s = cache.manager.statistics().get(timeout=DEMO_TIMEOUT)
    return (
        f"status: {phase} | {s.records} records ({s.in_use} in use, {s.lazy} lazy, "
        f"{s.mutable} mutable) | {s.open_handles} handles | {registry.pulls} blob pulls "
        f"({format_bytes(registry.pulled_bytes)})"
    )


def _du_table(rows: Sequence[Any], console: _Console, limit: int = 12) -> int:
    """``refcache du``'s table (the same code), the first ``limit`` rows; returns the total."""
    for line in usage_lines(rows, limit=limit):
        console.raw(line)
    return usage_totals(rows)["total"]


def _scrape(url: str) -> list[str]:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - our own 127.0.0.1
        text = resp.read().decode()
    wanted = (
        "refcache_records ",
        'refcache_records_by_state{state="lazy"}',
        'refcache_records_by_state{state="in_use"}',
        "refcache_open_handles ",
        "refcache_usage_bytes{",
        "refcache_reclaimable_bytes ",
        'refcache_operations_total{operation="get_by_blob"',
        'refcache_operations_total{operation="commit"',
    )
    return [ln for ln in text.splitlines() if ln.startswith(wanted)]


def _run_round(
    builder: _Builder,
    jobs: Sequence[tuple[str, GeneratedImage, GeneratedImage]],
    parallel: int,
    round_: int,
) -> list[_BuildResult]:
    pool = ThreadPoolExecutor(parallel, thread_name_prefix="demo-build")
    try:
        futures: list[Future[_BuildResult]] = [
            pool.submit(builder.build, name, image, base, round_) for name, image, base in jobs
        ]
        return [f.result(timeout=DEMO_TIMEOUT * 4) for f in futures]
    except KeyboardInterrupt:
        # Ctrl-C: builds stop before their next step (a pull in progress ends at once);
        # their handles are released as they unwind, so the cache closes consistent.
        builder.stop.set()
        builder.registry.cancelled.set()
        with hold_interrupts("stopping the builds"):
            pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="cache directory, created if missing (default: $REFCACHE_ROOT, else ./refcache-data)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"serve /metrics on 127.0.0.1:PORT while running (default {DEFAULT_METRICS_PORT};"
        " 0: any free port; -1: off)",
    )
    parser.add_argument("--builds", type=int, default=8, help="images to build (default 8)")
    parser.add_argument("--parallel", type=int, default=4, help="builds at a time (default 4)")
    parser.add_argument("--seed", type=int, default=1, help="seed of layers and build steps")
    parser.add_argument(
        "--latency", type=float, default=0.25, help="simulated seconds per blob pull (0.25)"
    )
    parser.add_argument(
        "--max-used-space",
        metavar="SIZE",
        default=None,
        help="the final prune's max_used_space, e.g. 20MB (default: 60%% of what is used then)",
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``demo`` subcommand to the ``refcache`` command line.

    ``--root`` may come before ``demo`` (the global option) or after it.

    Args:
        subparsers: The object returned by ``ArgumentParser.add_subparsers``.

    Returns:
        The ``demo`` parser (its ``func`` default is :func:`run`).
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="run an embedded build workload with live metrics",
        description=(
            "Builds several images concurrently on the cache (lazy pulls, extracts, build "
            "steps, merges, diffs), serves /metrics while it runs, prints du and prunes."
        ),
    )
    _add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _validate(args: argparse.Namespace) -> int | None:
    """Checks the options before anything is created; returns the prune limit, if given."""
    if args.builds < 1 or args.parallel < 1:
        msg = f"--builds and --parallel must be >= 1, not {args.builds} and {args.parallel}"
        raise UsageError(msg)
    if not math.isfinite(args.latency) or args.latency < 0:
        msg = f"--latency must be a number of seconds >= 0, not {args.latency!r}"
        raise UsageError(msg)
    if not -1 <= args.metrics_port <= 65535:
        msg = f"--metrics-port must be a port (0: any free one; -1: off), not {args.metrics_port}"
        raise UsageError(msg)
    if args.max_used_space is None:
        return None
    try:
        return parse_size(args.max_used_space)
    except UsageError as exc:
        msg = f"--max-used-space: {exc}"
        raise UsageError(msg) from None


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Runs the demo on ``args.root``; returns the exit code (0 when everything worked).

    Ctrl-C stops the builds before their next step (a pull in progress ends at once), closes
    the cache and raises :class:`InterruptedCommandError`: the cache is left consistent.

    Args:
        args: Parsed arguments (``root``, ``metrics_port``, ``builds``, ``parallel``,
            ``seed``, ``latency``, ``max_used_space``).
        out: Where to print (default stdout).

    Returns:
        0 on success, 1 when a build failed or ``storage.check`` found problems.

    Raises:
        UsageError: A bad option (nothing is created).
        CommandFailedError: The root is not a directory.
        InterruptedCommandError: Ctrl-C.
        RefcacheError: The cache cannot be opened (e.g. another process has it open).
    """
    limit = _validate(args)
    console = _Console(out or sys.stdout)
    root = Path(args.root)
    if root.exists() and not root.is_dir():
        msg = f"{root} is not a directory: a cache needs a directory of its own"
        raise CommandFailedError(msg)
    registry, jobs, bases_n = _stage(args)
    port = args.metrics_port if args.metrics_port >= 0 else None
    cache = open_cache(root, timeout=DEMO_TIMEOUT)
    try:
        _serve_metrics(cache, getattr(args, "serve_metrics", None), port, console)
    except BaseException:
        cache.close()
        raise
    interrupted = False
    try:
        console.raw(
            f"refcache demo: cache at {root} ({cache.snapshotter.name} snapshotter), "
            f"{len(jobs)} builds on {bases_n} base image(s), {args.parallel} at a time; "
            f"blob pulls take {args.latency:g} s"
        )
        failed = _play(cache, registry, console, args, jobs, limit)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        with hold_interrupts("closing the cache cleanly"):
            cache.close()
    if interrupted:
        msg = (
            f"interrupted: the builds stopped and the cache at {root} was closed consistent "
            f"(refcache --root {root} check)"
        )
        raise InterruptedCommandError(msg)
    problems = _report_check(root, console)
    return 1 if failed or problems else 0


def _stage(
    args: argparse.Namespace,
) -> tuple[LayerRegistry, list[tuple[str, GeneratedImage, GeneratedImage]], int]:
    """The images of the demo in an in-process registry: one or two base images and one app
    image per build. Returns the registry, the builds ``(name, image, base)`` and how many
    bases there are."""
    bases_n = 2 if args.builds > 1 else 1
    images = generate_images(
        args.seed,
        bases=bases_n,
        base_layers=3,
        apps=args.builds,
        app_layers=1,
        files=32,
        file_size=32 * 1024,
    )
    registry = LayerRegistry(latency=args.latency)
    for image in images:
        registry.add_image(image)
    bases = images[:bases_n]
    jobs = [(im.name, im, bases[n % bases_n]) for n, im in enumerate(images[bases_n:])]
    return registry, jobs, bases_n


def _report_check(root: Path, console: _Console) -> list[str]:
    """Runs ``storage.check`` on the closed cache and prints what it found."""
    problems = check(root)
    for p in problems:
        console.raw(f"check: {p}")
    console.raw(
        f"check: {'consistent' if not problems else f'{len(problems)} problems'}\n"
        f"next: refcache --root {root} du   |   refcache --root {root} check"
    )
    return problems


def _serve_metrics(
    cache: Any, serve: Callable[[Any, int], Any] | None, port: int | None, console: _Console
) -> None:
    """Serves ``/metrics`` for ``cache`` on ``port`` (another free one when it is taken);
    the server is ``cache.metrics_server``, which ``cache.close()`` stops."""
    if port is None:
        return
    if serve is None:
        console.raw("metrics: not served (run `refcache demo` for the metrics server)")
        return
    try:
        cache.metrics_server = serve(cache, port)
    except FailedPreconditionError as exc:  # the port is taken: any free one will do
        console.raw(f"metrics: port {port} unavailable ({exc}); using a free port")
        cache.metrics_server = serve(cache, 0)


def _play(
    cache: Any,
    registry: LayerRegistry,
    console: _Console,
    args: argparse.Namespace,
    jobs: Sequence[tuple[str, GeneratedImage, GeneratedImage]],
    limit: int | None,
) -> list[_BuildResult]:
    """Both build rounds, the du table, the metrics sample and the prune; returns failures."""
    server = cache.metrics_server
    if server is not None:
        console.raw(f"metrics: {server.url} (Prometheus text format, while the demo runs)")
    builder = _Builder(cache, registry, console, args.seed, steps=3)
    phase = ["round 1: building"]
    stop = threading.Event()

    def progress() -> None:
        for _ in range(10**6):  # until the builds are done (stop), bounded
            if stop.wait(0.5):
                return
            console.line(_status(cache, registry, phase[0]))

    ticker = threading.Thread(target=progress, name="demo-progress", daemon=True)
    ticker.start()
    try:
        results = _run_round(builder, jobs, args.parallel, 1)
        pulls_round1 = registry.pulls
        rebuild = jobs[: max(1, len(jobs) // 2)]
        phase[0] = "round 2: CI re-run"
        console.line(f"round 2: re-running {len(rebuild)} builds (same steps: cache hits)")
        results += _run_round(builder, rebuild, args.parallel, 2)
    finally:
        stop.set()
        ticker.join(timeout=DEMO_TIMEOUT)
    failed = [r for r in results if r.error]
    console.line(_status(cache, registry, "done"))
    requested = sum(len(im.layers) for _, im, _ in [*jobs, *rebuild])
    console.raw(
        f"\nbuilds: {len(results) - len(failed)}/{len(results)} succeeded; "
        f"{sum(r.steps for r in results)} steps run, "
        f"{sum(r.cached_steps for r in results)} from cache; {requested} layer requests "
        f"served by {registry.pulls} blob pulls ({pulls_round1} in round 1)"
    )
    console.raw("\ndisk usage (refcache du):")
    total = _du_table(cache.manager.disk_usage().get(timeout=DEMO_TIMEOUT), console)
    if server is not None:
        console.raw(f"\nmetrics sample from {server.url}:")
        for line in _scrape(server.url):
            console.raw(f"  {line}")
    if limit is None:
        limit = int(total * 0.6)
    deleted = cache.manager.prune(PrunePolicy(max_used_space=limit)).get(timeout=DEMO_TIMEOUT)
    rows = cache.manager.disk_usage().get(timeout=DEMO_TIMEOUT)
    left = sum(max(r.size, 0) for r in rows)
    console.raw(
        f"\nprune --max-used-space {format_bytes(limit)}: deleted {len(deleted)} records "
        f"({format_bytes(sum(max(r.size, 0) for r in deleted))}), least recently used "
        f"first; {len(rows)} records, {format_bytes(left)} kept"
    )
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m refcache.actors._demo [--root DIR] ...``: ``refcache demo`` by another name.

    The options, errors and exit codes are those of ``refcache demo``.
    """
    from ._cli import main as cli_main  # noqa: PLC0415 - _cli imports this module

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
