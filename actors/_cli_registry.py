"""``refcache push`` and ``refcache pull``: the command line of :meth:`Cache.push`/``pull``.

Registered by ``actors._cli`` through :func:`add_parsers` (one hook; this module owns its
subcommands). Conventions of the rest of the CLI: results on stdout (``--format json`` for
scripts), progress on stderr (redrawn in place on a terminal, one line per finished blob
otherwise), every error one line on stderr: exit code 2 for a usage error (a malformed
target, ``NAME=ID`` or credential option), 1 for a failure (no cache, the cache busy, the
registry unreachable or refusing), printed by ``_cli.main``.

``push TARGET [NAME=ID ...]`` exports the named records (an id or a unique id prefix); with
no ``NAME=ID`` it exports every committed record that no other record builds on, each named
by its id. ``pull SOURCE`` downloads the blobs as it imports (a command line process ends
right after, and lazy records do not survive the next open), ``--extract`` also unpacks them.

Credentials: ``--username`` with the password from ``--password-stdin`` or the environment
variable ``REFCACHE_REGISTRY_PASSWORD``; otherwise Docker's configuration
(``--docker-config`` or ``$DOCKER_CONFIG``, default ``~/.docker``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO, TypedDict

from ..storage import COMPRESSIONS, InvalidError, LockedError, NotFoundError, parse_target
from ._cache import Cache, open_cache
from ._cliutil import CommandFailedError, UsageError, busy, existing_cache, format_bytes
from ._distribution import ProgressEvent
from ._refs import ImmutableRef

__all__ = ["add_parsers"]

#: Seconds a command-line push or pull may wait on any one step (retries included).
CLI_TIMEOUT = 600.0
PASSWORD_ENV = "REFCACHE_REGISTRY_PASSWORD"  # noqa: S105 (a variable name, not a secret)


class _ProgressLine:
    """Layers and bytes on stderr, redrawn at most 10 times a second on a terminal."""

    def __init__(self, verb: str, out: TextIO) -> None:
        self.verb = verb
        self.out = out
        self.tty = out.isatty()
        self.done = self.skipped = self.mounted = self.manifests = self.records = 0
        self.bytes = 0
        self._lock = threading.Lock()
        self._last = 0.0

    def __call__(self, event: ProgressEvent) -> None:
        with self._lock:
            kind = event.kind
            if kind == "bytes":
                self.bytes += event.nbytes
            elif kind == "blob-done":
                self.done += 1
            elif kind == "blob-skipped":
                self.skipped += 1
            elif kind == "blob-mounted":
                self.mounted += 1
            elif kind == "manifest":
                self.manifests += 1
            elif kind == "records":
                self.records += event.nbytes
            final = kind in ("blob-done", "blob-skipped", "blob-mounted")
            self._draw(final and not self.tty)

    def _line(self) -> str:
        parts = [f"{self.verb}: {self.done} layer(s) transferred"]
        if self.skipped:
            parts.append(f"{self.skipped} already there")
        if self.mounted:
            parts.append(f"{self.mounted} mounted")
        parts.append(f"{format_bytes(self.bytes)}")
        if self.manifests:
            parts.append(f"{self.manifests} manifest(s)")
        if self.records:
            parts.append(f"{self.records} record(s)")
        return ", ".join(parts)

    def _draw(self, line: bool) -> None:
        if self.tty:
            now = time.monotonic()
            if now - self._last >= 0.1:
                self._last = now
                self.out.write("\r" + self._line())
                self.out.flush()
        elif line:
            self.out.write(self._line() + "\n")

    def finish(self) -> None:
        with self._lock:
            if self.tty:
                self.out.write("\r" + self._line() + "\n")
            else:
                self.out.write(self._line() + "\n")
            self.out.flush()


class _Connection(TypedDict):
    """How push and pull reach the registry: the options :func:`_common` adds."""

    credentials: tuple[str, str] | None
    ca_file: Path | None
    insecure: bool
    docker_config: Path | None


def _connection(args: argparse.Namespace) -> _Connection:
    """The keywords of :meth:`Cache.push`/``pull`` from the command line (the password is
    read here, once)."""
    return _Connection(
        credentials=_credentials(args),
        ca_file=args.ca_file,
        insecure=args.insecure,
        docker_config=args.docker_config,
    )


def _credentials(args: argparse.Namespace) -> tuple[str, str] | None:
    if not args.username:
        if args.password_stdin:
            msg = "--password-stdin needs --username"
            raise UsageError(msg)
        return None
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = os.environ.get(PASSWORD_ENV, "")
    if not password:
        msg = f"--username {args.username!r} needs --password-stdin or ${PASSWORD_ENV}"
        raise UsageError(msg)
    return (args.username, password)


def _check_target(value: str, *, what: str, allow_digest: bool = False) -> None:
    try:
        parse_target(value, what=what, allow_digest=allow_digest)
    except InvalidError as exc:
        raise UsageError(str(exc)) from exc


def _open(root: Path, verb: str) -> Cache:
    try:
        return open_cache(root, timeout=CLI_TIMEOUT)
    except LockedError as exc:
        raise busy(root, verb) from exc


def _parse_pairs(pairs: list[str]) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        name, sep, rid = pair.partition("=")
        if not sep or not name or not rid:
            msg = f"invalid record argument {pair!r}: expected NAME=ID"
            raise UsageError(msg)
        out.append((name, rid))
    return out


def _resolve(rows: list[Any], rid: str) -> str:
    exact = [r.id for r in rows if r.id == rid]
    if exact:
        return exact[0]
    matches = [r.id for r in rows if r.id.startswith(rid)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        msg = f"no record {rid!r} in this cache"
        raise NotFoundError(msg)
    msg = f"record prefix {rid!r} is ambiguous: {', '.join(sorted(matches)[:5])}"
    raise InvalidError(msg)


def _cmd_push(args: argparse.Namespace) -> int:
    # Everything is checked before the cache is opened: a bad value changes nothing.
    _check_target(args.target, what="target")
    pairs = _parse_pairs(args.records)
    connection = _connection(args)
    existing_cache(args.root)
    with _open(args.root, "push") as cache:
        rows = cache.manager.disk_usage().get(timeout=CLI_TIMEOUT)
        if pairs:
            wanted = [(name, _resolve(rows, rid)) for name, rid in pairs]
        else:
            parents = {p for r in rows for p in r.parents}
            wanted = sorted((r.id, r.id) for r in rows if not r.mutable and r.id not in parents)
            if not wanted:
                msg = f"nothing to push: no committed records in {args.root}"
                raise CommandFailedError(msg)
        refs: dict[str, ImmutableRef] = {}
        try:
            for name, rid in wanted:
                refs[name] = cache.manager.get(rid).get(timeout=CLI_TIMEOUT)
            progress = _ProgressLine("push", sys.stderr)
            result = cache.push(
                args.target,
                refs,
                compression=args.compression,
                force_compression=args.force_compression,
                progress=progress,
                **connection,
            )
            progress.finish()
            ids = {name: ref.id for name, ref in refs.items()}
        finally:
            for ref in refs.values():
                ref.release()
    if args.format == "json":
        doc = {
            f.name: getattr(result, f.name)
            for f in dataclasses.fields(result)
            if f.name != "manifests"
        }
        doc["manifests"] = dict(result.manifests)
        doc["records"] = ids
        print(json.dumps(doc, indent=2))
        return 0
    print(f"Pushed {result.target} (index {result.index_digest})")
    for name in sorted(ids):
        print(f"  {name}\t{ids[name]}\t{result.manifests[name]}")
    print(
        f"{result.blobs_uploaded} blob(s) uploaded ({format_bytes(result.bytes_uploaded)}), "
        f"{result.blobs_skipped} already there ({format_bytes(result.bytes_skipped)}), "
        f"{result.blobs_mounted} mounted, in {result.seconds:.1f} s"
    )
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    _check_target(args.source, what="source", allow_digest=True)
    connection = _connection(args)
    started = time.monotonic()
    with _open(args.root, "pull") as cache:
        progress = _ProgressLine("pull", sys.stderr)
        refs = cache.pull(
            args.source,
            fetch=True,
            extract=args.extract,
            progress=progress,
            **connection,
        )
        progress.finish()
        try:
            infos = {name: ref.info() for name, ref in refs.items()}
        finally:
            for ref in refs.values():
                ref.release()
    seconds = time.monotonic() - started
    if args.format == "json":
        doc = {
            "source": args.source,
            "records": {
                name: {
                    "id": i.id,
                    "description": i.description,
                    "blob": i.blob,
                    "extracted": not i.blob_only,
                    "parents": list(i.parents),
                }
                for name, i in sorted(infos.items())
            },
            "bytes_fetched": progress.bytes,
            "blobs_fetched": progress.done,
            "seconds": seconds,
        }
        print(json.dumps(doc, indent=2))
        return 0
    print(f"Pulled {args.source}")
    for name, i in sorted(infos.items()):
        print(f"  {name}\t{i.id}\t{i.description}")
    print(
        f"{len(infos)} record(s), {progress.done} blob(s) fetched "
        f"({format_bytes(progress.bytes)}) in {seconds:.1f} s"
    )
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the registry")
    p.add_argument("--ca-file", type=Path, help="PEM file of a CA to trust (HTTPS)")
    p.add_argument("--username", "-u", help="registry user (password: --password-stdin)")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help=f"read the password from stdin (or ${PASSWORD_ENV})",
    )
    p.add_argument("--docker-config", type=Path, help="directory of Docker's config.json")
    p.add_argument("--format", choices=("text", "json"), default="text")
    # --root after the command too (SUPPRESS: the one before the command stays).
    p.add_argument("--root", metavar="DIR", default=argparse.SUPPRESS, help="the cache directory")


def add_parsers(sub: Any) -> None:
    """Adds the ``push`` and ``pull`` subcommands to ``refcache``'s subparsers."""
    push = sub.add_parser(
        "push",
        help="export records as a cache image (registry:// or oci-layout://)",
        description="Export records as one tagged OCI cache image.",
    )
    push.add_argument("target", help="registry://HOST[:PORT]/REPO:TAG or oci-layout://DIR[:TAG]")
    push.add_argument(
        "records", nargs="*", metavar="NAME=ID", help="records to push (default: every leaf)"
    )
    push.add_argument("--compression", choices=COMPRESSIONS, default="zstd")
    push.add_argument(
        "--force-compression", action="store_true", help="convert layers in another compression"
    )
    _common(push)
    push.set_defaults(func=_cmd_push)

    pull = sub.add_parser(
        "pull",
        help="import a cache image (downloads its blobs)",
        description="Import a cache image: one record per layer, blobs downloaded.",
    )
    pull.add_argument("source", help="registry://HOST[:PORT]/REPO:TAG or oci-layout://DIR[:TAG]")
    pull.add_argument("--extract", action="store_true", help="also unpack every record")
    _common(pull)
    pull.set_defaults(func=_cmd_pull)
