"""``refcache push`` / ``refcache pull`` as a user runs them (subprocesses, a real registry)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from refcache.actors import open_cache

pytestmark = pytest.mark.integration


def cli(root: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "refcache"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "refcache.actors._cli"]
    return subprocess.run(
        [*command, "--root", str(root), *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
        check=False,
    )


def _one_line_error(proc: subprocess.CompletedProcess[str], *needles: str, code: int = 2) -> None:
    """One line on stderr: exit 2 for a usage error, 1 (``code=1``) for a failure."""
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_push_then_pull_with_progress_and_json(registry: Any, helpers: Any, tmp_path: Path) -> None:
    root = tmp_path / "a"
    with open_cache(root, snapshotter="native") as cache:
        ref = helpers.build_chain(cache, ["cli0", "cli1"])
        ref.finalize()  # kept as cache after the release
        rid = ref.id
        expected = None
        with ref.mount().local() as path:
            expected = helpers.tree_digest(path)
        ref.release()
    target = f"registry://{registry.host}/cli/cache:v1"
    pushed = cli(root, "push", target, f"app={rid[:8]}", "--insecure", "--format", "json")
    assert pushed.returncode == 0, pushed.stderr
    doc = json.loads(pushed.stdout)
    assert doc["blobs_uploaded"] == 3
    assert doc["records"] == {"app": rid}
    assert "push: " in pushed.stderr  # progress: layers and bytes
    assert "layer(s) transferred" in pushed.stderr

    leaves = cli(root, "push", target.replace(":v1", ":leaves"), "--insecure")
    assert leaves.returncode == 0, leaves.stderr
    assert rid in leaves.stdout  # every leaf, named by its id
    assert "0 blob(s) uploaded" in leaves.stdout  # layers and config were there

    other = tmp_path / "b"
    pulled = cli(other, "pull", target, "--insecure", "--format", "json")
    assert pulled.returncode == 0, pulled.stderr
    doc = json.loads(pulled.stdout)
    assert doc["blobs_fetched"] == 2
    app = doc["records"]["app"]
    assert not app["extracted"]
    # The blobs were fetched: the records are still there at the next open, and extract
    # needs no registry.
    registry.stop()
    with open_cache(other) as cache:  # what the CLI made ("auto")
        ref = cache.manager.get(app["id"]).get(timeout=30)
        with ref.mount().local() as path:
            assert helpers.tree_digest(path) == expected
        ref.release()


def test_cli_errors_are_one_line(registry: Any, tmp_path: Path) -> None:
    root = tmp_path / "c"
    with open_cache(root, snapshotter="native"):
        pass
    _one_line_error(cli(root, "push", "registry://h/r", "x=abc"), "registry://h/r", "tag")
    _one_line_error(cli(root, "push", "nope://x", "x=abc"), "unknown scheme")
    _one_line_error(cli(root, "push", f"registry://{registry.host}/r:t", "x"), "NAME=ID")
    _one_line_error(
        cli(root, "push", f"registry://{registry.host}/r:t", "x=zzzz", "--insecure"),
        "zzzz",
        code=1,
    )
    _one_line_error(
        cli(root, "pull", f"registry://{registry.host}/r:missing", "--insecure"),
        "not found",
        code=1,
    )
    _one_line_error(
        cli(root, "pull", f"registry://{registry.host}/r:t", "--username", "u"),
        "--password-stdin",
    )


def test_cli_credentials_from_stdin(secure_registry: Any, helpers: Any, tmp_path: Path) -> None:
    root = tmp_path / "d"
    with open_cache(root, snapshotter="native") as cache:
        ref = helpers.build_chain(cache, ["cred"])
        ref.finalize()
        rid = ref.id
        ref.release()
    target = f"registry://{secure_registry.host}/cli/private:v1"
    ca = str(secure_registry.tls.ca)
    bad = cli(
        root,
        "push",
        target,
        f"x={rid}",
        "--ca-file",
        ca,
        "-u",
        "builder",
        "--password-stdin",
        stdin="bad\n",
    )
    _one_line_error(bad, secure_registry.host, "builder", code=1)
    good = cli(
        root,
        "push",
        target,
        f"x={rid}",
        "--ca-file",
        ca,
        "-u",
        "builder",
        "--password-stdin",
        stdin="s3cret\n",
    )
    assert good.returncode == 0, good.stderr
