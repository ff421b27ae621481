"""The load test, the crash test and the demo, run as a user runs them (bounded for CI).

The two long runs are marked ``slow`` (CI runs them): a one-minute load test at 16 threads
and 5 crash cycles. The rest are quick smoke runs and checks of the shared pieces (the
watchdog, the generated layers).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path
from types import ModuleType

import pytest
from refcache.actors._demo import generate_images, generate_layer
from refcache.storage import ANNOTATION_UNCOMPRESSED

from refcache import storage

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def _load_workload() -> ModuleType:
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location("_workload", SCRIPTS / "_workload.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["_workload"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


workload = _load_workload()


def run_script(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-20000:])
        sys.stderr.write(proc.stderr[-20000:])
    return proc


# -- shared pieces -----------------------------------------------------------------------------


class TestGeneratedLayers:
    def test_the_same_seed_gives_the_same_blob(self) -> None:
        a = generate_layer("x/y", 3, files=5, file_size=1000)
        b = generate_layer("x/y", 3, files=5, file_size=1000)
        c = generate_layer("x/y", 4, files=5, file_size=1000)
        assert (a.digest, a.blob) == (b.digest, b.blob)
        assert c.digest != a.digest

    def test_the_descriptor_carries_digest_size_and_diff_id(self) -> None:
        layer = generate_layer("x/y", 3, files=5, file_size=1000)
        assert layer.desc.digest == "sha256:" + hashlib.sha256(layer.blob).hexdigest()
        assert layer.desc.size == len(layer.blob)
        tar_bytes = gzip.decompress(layer.blob)
        assert layer.desc.annotations[ANNOTATION_UNCOMPRESSED] == (
            "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
        )
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            files = sorted(m.name for m in tar.getmembers() if m.isfile())
        assert files == sorted(layer.files)
        assert len(files) == 5

    def test_apps_share_their_base_layers(self) -> None:
        images = generate_images(1, bases=2, base_layers=3, apps=4, app_layers=1, files=2)
        by_name = {im.name: im for im in images}
        assert by_name["app0"].layers[:3] == by_name["base0"].layers
        assert by_name["app2"].layers[:3] == by_name["base0"].layers
        assert by_name["app1"].layers[:3] == by_name["base1"].layers
        assert len(by_name["app0"].layers) == 4


class TestWatchdog:
    def test_a_call_past_the_bound_trips_it_with_every_stack(self) -> None:
        tripped: list[str] = []
        fired = threading.Event()

        def on_trip(message: str) -> None:
            tripped.append(message)
            fired.set()

        dog = workload.Watchdog(0.2, period=0.05, on_trip=on_trip).start()
        try:
            with dog.call("stuck operation"):
                assert fired.wait(10.0)
        finally:
            dog.stop()
        assert dog.tripped
        assert "stuck operation" in tripped[0]
        assert "longer than 0.2 s" in tripped[0]

    def test_calls_within_the_bound_never_trip_it(self) -> None:
        dog = workload.Watchdog(5.0, period=0.01, on_trip=lambda _: None).start()
        try:
            for _ in range(20):
                with dog.call("quick"):
                    pass
        finally:
            dog.stop()
        assert not dog.tripped


# -- the scripts -------------------------------------------------------------------------------


def test_a_short_load_test_passes_its_invariants(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = run_script(
        [
            "scripts/loadtest.py",
            "--threads",
            "4",
            "--ops",
            "400",
            "--seed",
            "3",
            "--root",
            str(tmp_path / "cache"),
            "--json",
            str(out),
            "--no-progress",
        ],
        timeout=100,
    )
    assert proc.returncode == 0
    result = json.loads(out.read_text())
    assert result["ok"] is True
    assert result["violations"] == 0
    assert result["operations"] == 400
    assert [c["ok"] for c in result["invariants"]] == [True] * 4
    assert "p99 ms" in proc.stdout
    assert storage.check(tmp_path / "cache") == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_one_minute_load_test_at_16_threads_has_no_violations(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = run_script(
        [
            "scripts/loadtest.py",
            "--threads",
            "16",
            "--duration",
            "60",
            "--seed",
            "7",
            "--root",
            str(tmp_path / "cache"),
            "--json",
            str(out),
            "--no-progress",
        ],
        timeout=280,
    )
    assert proc.returncode == 0
    result = json.loads(out.read_text())
    assert (result["ok"], result["violations"], result["watchdog_trips"]) == (True, 0, 0)
    assert [c["ok"] for c in result["invariants"]] == [True] * 4
    done = {row["op"] for row in result["per_operation"] if row["outcomes"].get("ok", 0) > 0}
    expected = set(workload.WEIGHTS)
    if not workload.HAS_GET_BY_BLOB:
        expected.discard("get_by_blob")
    if not workload.HAS_GET_REMOTES:
        expected.discard("get_remotes")
    assert expected - done == set()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_five_crash_cycles_lose_no_committed_record(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = run_script(
        [
            "scripts/crashtest.py",
            "--cycles",
            "5",
            "--seed",
            "3",  # the first cycle is a kill at a random moment of a loaded child
            "--prune-every",
            "2",
            "--root",
            str(tmp_path / "cache"),
            "--json",
            str(out),
        ],
        timeout=380,
    )
    assert proc.returncode == 0
    summary = json.loads(out.read_text())["summary"]
    assert summary["ok"] is True
    assert summary["cycles"] == 5
    assert summary["kills"] == 5
    assert summary["records_verified"] > 0
    assert (
        summary["records_verified"] + summary["lazy_records_dropped_at_open"]
        == summary["records_held_at_kill"]
    )
    assert (
        summary["lost_committed_records"],
        summary["wrong_contents"],
        summary["consistency_problems_after_open"],
        summary["leak_check_failures"],
        summary["child_violations"],
        summary["errors"],
    ) == (0, 0, 0, 0, 0, 0)
    assert summary["leak_checks"] >= 2
    assert storage.check(tmp_path / "cache") == []


@pytest.mark.timeout(200)
def test_the_demo_serves_metrics_while_it_runs_and_leaves_a_consistent_cache(
    tmp_path: Path,
) -> None:
    root = tmp_path / "refcache-data"
    cmd = [
        sys.executable,
        "-m",
        "refcache",
        "demo",
        "--root",
        str(root),
        "--metrics-port",
        "0",
    ]
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        url = None
        for line in proc.stdout:  # ends when the demo exits (bounded by the timeout below)
            lines.append(line)
            m = re.search(r"metrics: (http://127\.0\.0\.1:\d+/metrics)", line)
            if m:
                url = m.group(1)
                break
        assert url is not None, "".join(lines)
        with urllib.request.urlopen(url, timeout=10) as resp:
            scraped = resp.read().decode()
        assert "refcache_up 1.0" in scraped
        rest, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    elapsed = time.monotonic() - start
    output = "".join(lines) + rest
    assert proc.returncode == 0, output + err
    assert elapsed < 60
    assert re.search(r"builds: 12/12 succeeded; \d+ steps run, 12 from cache", output), output
    assert "disk usage (refcache du):" in output
    # The size gauges scraped right after the du table add up to it (and are not 0).
    from refcache.actors._cliutil import format_bytes as _format_bytes

    usage = sum(float(v) for v in re.findall(r"refcache_usage_bytes\{[^}]*\} (\S+)", output))
    reclaimable = re.search(r"refcache_reclaimable_bytes (\S+)", output)
    assert reclaimable is not None, output
    assert usage > 0
    assert float(reclaimable.group(1)) > 0
    total_line = re.search(r"Total:\t+(\S+)", output)
    reclaimable_line = re.search(r"Reclaimable:\t+(\S+)", output)
    assert total_line is not None, output
    assert reclaimable_line is not None, output
    assert _format_bytes(int(usage)) == total_line.group(1)
    assert _format_bytes(int(float(reclaimable.group(1)))) == reclaimable_line.group(1)
    _assert_du_table(output.split("disk usage (refcache du):\n", 1)[1])
    pruned = re.search(r"prune --max-used-space \S+: deleted (\d+) records", output)
    assert pruned is not None, output
    assert int(pruned.group(1)) > 0
    assert "check: consistent" in output
    assert storage.check(root) == []

    again = run_script(
        [
            "-m",
            "refcache.actors._demo",
            "--root",
            str(root),
            "--metrics-port",
            "-1",
            "--builds",
            "2",
        ],
        timeout=100,
    )
    assert again.returncode == 0
    assert "check: consistent" in again.stdout
    # Steps kept by the first run's prune are found again (the rest are rebuilt).
    assert re.search(r"builds: 3/3 succeeded; \d+ steps run, [1-9]\d* from cache", again.stdout)


_UNITS = {"B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9}


def _assert_du_table(text: str) -> None:
    """The demo's table is ``refcache du``'s: its header, largest first, its summary."""
    lines = text.splitlines()
    assert lines[0].split() == ["ID", "RECLAIMABLE", "SIZE", "LAST", "ACCESSED", "DESCRIPTION"]
    rows = []
    for line in lines[1:]:
        if not line or line.startswith("..."):
            break
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(B|kB|MB|GB)", line.split()[2])
        assert m is not None, line
        rows.append(float(m.group(1)) * _UNITS[m.group(2)])
    assert len(rows) == 12
    assert rows == sorted(rows, reverse=True)
    summary = lines[lines.index(next(ln for ln in lines if ln.startswith("Reclaimable:"))) :]
    assert summary[1].startswith("Total:\t\t")


def test_the_demo_prints_du_with_the_code_of_refcache_du() -> None:
    from refcache.actors import UsageInfo
    from refcache.actors._cliutil import usage_lines
    from refcache.actors._demo import _Console, _du_table

    rows = [
        UsageInfo(f"r{i:02d}", i % 5 == 0, i % 3 == 0, i * 1000, 1, None, 1, (), f"d{i}", "", False)
        for i in range(20)
    ]
    out = io.StringIO()
    total = _du_table(rows, _Console(out))
    assert out.getvalue().splitlines() == usage_lines(rows, limit=12)
    assert total == sum(i * 1000 for i in range(20))


@pytest.mark.timeout(200)
def test_ctrl_c_stops_the_demo_within_a_second_and_leaves_the_cache_consistent(
    tmp_path: Path,
) -> None:
    root = tmp_path / "refcache-data"
    cmd = [sys.executable, "-m", "refcache.actors._cli", "demo", "--root", str(root)]
    proc = subprocess.Popen(
        [*cmd, "--metrics-port", "-1"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # ends when the demo exits (bounded by the timeout above)
            seen.append(line)
            if " RUN step " in line:  # builds are under way: pulls, steps, commits
                break
        assert " RUN step " in seen[-1], "".join(seen)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        stopped = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 130, (out, err)
    assert stopped < 1.0
    assert err.splitlines() == [
        f"refcache demo: interrupted: the builds stopped and the cache at {root} was closed "
        f"consistent (refcache --root {root} check)"
    ]
    assert "FAILED" not in out
    assert storage.check(root) == []
    check = subprocess.run(
        [sys.executable, "-m", "refcache.actors._cli", "check", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout == "cache is consistent\n"


def test_demo_options_are_checked_before_anything_is_created(tmp_path: Path) -> None:
    root = tmp_path / "never"
    for args, needle in (
        (("--builds", "0"), "--builds and --parallel must be >= 1"),
        (("--latency", "nan"), "--latency must be a number of seconds >= 0"),
        (("--metrics-port", "70000"), "--metrics-port must be a port"),
        (("--max-used-space", ""), "--max-used-space: invalid size '': empty"),
        (("--max-used-space", "1.5"), "not a whole number of bytes"),
    ):
        proc = run_script(["-m", "refcache.actors._demo", "--root", str(root), *args], 60)
        assert proc.returncode == 2, (args, proc.stderr)
        [line] = proc.stderr.splitlines()  # one line
        assert line.startswith("refcache demo: ")
        assert needle in line
    assert not root.exists()


# -- found by the demo ---------------------------------------------------------------------------


def test_statistics_see_the_sizes_disk_usage_measured(tmp_path: Path) -> None:
    from refcache.actors import open_cache

    with open_cache(tmp_path / "cache", snapshotter="native", timeout=30) as cache:
        m = cache.manager.new().get(timeout=30)
        with m.mount().local() as path:
            (path / "f").write_bytes(b"x" * 1_000_000)
        ref = m.commit()
        ref.finalize()
        ref.release()
        rows = cache.manager.disk_usage().get(timeout=30)
        assert [(r.in_use, r.size > 1_000_000) for r in rows] == [(False, True)]
        stats = cache.manager.statistics().get(timeout=30)
        assert stats.reclaimable_bytes == rows[0].size


def test_the_async_orchestrator_builds_its_dag_with_metrics_served(tmp_path: Path) -> None:
    proc = run_script(
        ["scripts/async_orchestrator.py", "--root", str(tmp_path / "c"), "--json"], timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["ok"] is True
    steps = summary["steps"]
    assert len(steps) == 7
    # Each step's layer holds its own files and its ancestors': the merges were right.
    assert steps["package"]["steps"] == [
        "base",
        "compile",
        "deps",
        "docs",
        "package",
        "toolchain",
    ]
    assert steps["base"]["steps"] == ["base"]
    assert len({row["id"] for row in steps.values()}) == 7
    assert summary["metrics_series"] > 0
    assert summary["metrics_url"].startswith("http://127.0.0.1:")
    assert storage.check(tmp_path / "c") == []
