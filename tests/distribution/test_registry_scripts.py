"""``scripts/fleet.py`` and ``scripts/bench_registry.py`` run as a user runs them (small)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd, check=False
    )


def test_fleet_workers_share_layers_through_the_registry(registry: Any, tmp_path: Path) -> None:
    del registry  # only for the binary check (the script starts its own)
    done = _run([str(SCRIPTS / "fleet.py"), "--workers", "2", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    workers = json.loads(done.stdout)["workers"]
    assert len(workers) == 2
    for w in workers:
        assert w["needed"] == 39  # 3 bases x 3 layers + 6 apps x 5 layers
        assert w["built"] <= 21  # each distinct layer is built at most once per worker
        assert 0 < w["hit_ratio"] <= 1
    # One after the other: the second worker finds every layer in the registry.
    done = _run([str(SCRIPTS / "fleet.py"), "--workers", "2", "--sequential", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    first, second = json.loads(done.stdout)["workers"]
    assert first["built"] == 21
    assert first["pulled"] == 0
    assert second["built"] == 0
    assert second["pulled"] == 21
    assert second["hit_ratio"] == 1


def test_bench_registry_runs(registry: Any, tmp_path: Path) -> None:
    del registry
    done = _run(
        [
            str(SCRIPTS / "bench_registry.py"),
            "--layers",
            "2",
            "--layer-mb",
            "1",
            "--names",
            "5",
            "--depth",
            "2",
            "--json",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [x["type"] for x in (lines[0], lines[-1])] == ["env", "env_end"]
    med = {x["bench"]: x for x in lines if x["type"] == "median"}
    push = med["push_pull"]
    assert push["blobs"] == 2
    assert push["push_mb_s"] > 0
    assert push["raw_put_mb_s"] > 0
    assert push["pull_vs_raw"] > 0
    lazy = med["lazy_pull"]
    assert (lazy["records"], lazy["cm_records"], lazy["lazy_records"]) == (10, 10, 10)
    assert (lazy["blob_gets"], lazy["blobs_fetched"]) == (0, 0)
    assert not list(tmp_path.glob("bench-registry-*"))  # the work directory is removed
