"""A real Prometheus server scrapes ``serve()`` and sees a held record's refcount.

Needs the ``prometheus`` binary (Debian package ``prometheus``). Without it the test skips,
except under CI (env ``CI`` set), where it fails: CI installs the package (see .ci/run).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from refcache.actors import open_cache
from refcache.metrics import serve

pytestmark = pytest.mark.integration

_STOP_TIMEOUT = 10.0
_DEADLINE = 60.0  # Prometheus start-up plus a few 1 s scrape intervals, with slack
_POLL_WAIT = 0.2
_HTTP_TIMEOUT = 2.0


@dataclass(frozen=True)
class HeldRecordCache:
    """What the test needs: a cache to serve, and the id and refcount of a held record."""

    cache: Any
    record_id: str
    refs: int


@contextlib.contextmanager
def cache_with_held_record(root: Path) -> Iterator[HeldRecordCache]:
    """Yields a real cache in which one committed record is held by exactly two handles."""
    with open_cache(root, snapshotter="native") as cache:
        immutable = cache.manager.new(description="held").get(timeout=30).commit()
        clone = immutable.clone()
        try:
            yield HeldRecordCache(cache, immutable.id, 2)
        finally:
            clone.release()
            immutable.release()


def _free_port() -> int:
    """A port free right now on 127.0.0.1 (the OS picks it; Prometheus binds it next)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        reason = "the prometheus server binary is not installed (Debian package 'prometheus')"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must install it (see .ci/run)")
        pytest.skip(reason)
    return path


def _query(base: str, promql: str) -> list[dict[str, Any]]:
    """One instant query against Prometheus' HTTP API; [] while it is not answering yet."""
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    try:
        with urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT) as response:
            answer = json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return []
    if answer.get("status") != "success":
        return []
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


@contextlib.contextmanager
def _prometheus(tmp_path: Path, target_port: int) -> Iterator[tuple[str, Path]]:
    """Runs a Prometheus server scraping ``127.0.0.1:<target_port>`` every second.

    Yields its base URL and log file; stops it by PID and removes its data dir after.
    """
    binary = _prometheus_binary()
    port = _free_port()
    data_dir = tmp_path / "prometheus-data"
    config = tmp_path / "prometheus.yml"
    log_path = tmp_path / "prometheus.log"
    # JSON is YAML; Prometheus reads this config as is.
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "refcache",
                        "scrape_interval": "1s",
                        "scrape_timeout": "1s",
                        "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                    }
                ],
            }
        )
    )
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={data_dir}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        yield f"http://127.0.0.1:{port}", log_path
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=_STOP_TIMEOUT)
        shutil.rmtree(data_dir, ignore_errors=True)


def test_prometheus_scrapes_the_refcount_of_a_held_record(tmp_path: Path) -> None:
    with (
        cache_with_held_record(tmp_path / "cache") as held,
        serve(held.cache, 0) as server,
        _prometheus(tmp_path, server.port) as (base, log_path),
    ):
        promql = f'refcache_record_refs{{record_id="{held.record_id}"}}'
        deadline = time.monotonic() + _DEADLINE
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = _query(base, promql)
            if result:
                break
            threading.Event().wait(_POLL_WAIT)  # sleep-ok: polling an external server
        log_tail = log_path.read_text(errors="replace")[-3000:]

        assert result, f"no {promql} in Prometheus after {_DEADLINE} s; log:\n{log_tail}"
        assert len(result) == 1
        sample = result[0]
        assert sample["metric"]["job"] == "refcache"
        assert sample["metric"]["instance"] == f"127.0.0.1:{server.port}"
        assert float(sample["value"][1]) == float(held.refs)
        up = _query(base, 'refcache_up{job="refcache"}')
        assert [float(s["value"][1]) for s in up] == [1.0]
    assert not (tmp_path / "prometheus-data").exists()
