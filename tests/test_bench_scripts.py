"""Every ``scripts/bench_*.py`` runs as a user runs it, tiny, and reports both record shapes.

Each run takes seconds: a few records, fractions of a second per measurement, one
repetition. What is checked is the output a reader relies on (the JSON lines and their
fields, pairs and finalized records side by side), not the figures. ``bench_registry.py``
needs a registry binary: its run is in ``tests/distribution/test_registry_scripts.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from refcache.storage import KEY_USAGE_COUNT, MetadataStore, MetaEnv

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def _load(name: str) -> ModuleType:
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


bench = _load("_bench")


def run_json(script: str, args: list[str], tmp_path: Path, timeout: float = 120) -> list[Any]:
    """Runs a bench script with ``--json`` and ``--dir tmp_path``; its output objects."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args, "--dir", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["type"] == "env"
    assert lines[-1]["type"] == "env_end"
    for line in (lines[0], lines[-1]):
        assert len(line["loadavg"].split()) == 5  # /proc/loadavg as it reads
    # Nothing is left in --dir but what the test put there.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("bench-")]
    return lines


def medians(lines: list[Any]) -> dict[tuple[str, str | None], list[Any]]:
    out: dict[tuple[str, str | None], list[Any]] = {}
    for x in lines:
        if x["type"] == "median":
            out.setdefault((x["bench"], x["shape"]), []).append(x)
    return out


def by(rows: list[Any], **match: Any) -> Any:
    [row] = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return row


RATE = ("pairs", "wall_s", "pairs_per_s", "p50_us", "p99_us", "p999_us", "max_us")


# -- the dataset builders ----------------------------------------------------------------------


def test_the_bulk_builder_writes_exactly_what_the_api_writes(tmp_path: Path) -> None:
    assert bench.compare_builders(tmp_path, 4) == []
    # The comparison sees a difference: one more use of one record.
    built = bench.build_bulk(tmp_path / "other", 4, "pairs")
    env = MetaEnv(tmp_path / "other" / "meta")
    try:
        MetadataStore(env).get(built[0][0]).set(KEY_USAGE_COUNT, 2)
    finally:
        env.close()
    first = bench.dump_dataset(tmp_path / "api-pairs")
    other = bench.dump_dataset(tmp_path / "other")
    assert first["records"] != other["records"]
    assert first["snapshots"] == other["snapshots"]
    assert first["leases"] == other["leases"]
    assert len(first["snapshot_tree"]) == 4  # one active snapshot per pair


def test_a_stored_dataset_is_reused_and_never_half_built(tmp_path: Path) -> None:
    path = bench.dataset(tmp_path, 3, "finalized")
    assert path.name == "finalized-3"
    stamp = (path / "meta" / "data.mdb").stat().st_mtime_ns
    assert bench.dataset(tmp_path, 3, "finalized") == path
    assert (path / "meta" / "data.mdb").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finalized-3"]
    with pytest.raises(ValueError, match="unknown record shape 'pair'"):
        bench.dataset(tmp_path, 3, "pair")


# -- the scripts -------------------------------------------------------------------------------


def test_bench_refs_measures_both_shapes(tmp_path: Path) -> None:
    args = ["--records", "20", "--seconds", "0.2", "--threads", "1,2", "--open-records", "100"]
    lines = run_json("bench_refs.py", [*args, "--repeat", "1"], tmp_path)
    runs = [x for x in lines if x["type"] == "run"]
    assert all(len(x["loadavg"].split()) == 5 for x in runs)
    med = medians(lines)
    assert by(med["raw_ask", None], runs=1)["pairs_per_s"] > 0
    for shape in ("pairs", "finalized"):
        for bench_name in ("a_clone_release_held", "b_get_release_unref"):
            for g in (1, 2):
                row = by(med[bench_name, shape], threads=g)
                assert row["records"] == 20
                assert all(row[k] > 0 for k in RATE), row
                assert row["p50_us"] <= row["p99_us"] <= row["max_us"]
        opened = by(med["d_open", shape], records=100)
        assert opened["cm_records"] == (200 if shape == "pairs" else 100)  # 2 entries a pair
        assert opened["open_s"] > 0
        assert 0 < opened["threads"] < 30
        assert "rss_growth_at_return_mib" in opened
        assert "rss_growth_after_gc_mib" in opened
    # new+commit+release: a pair (retain), nothing (default), a finalized record (finalize).
    for shape, policy in (("pairs", "retain"), ("none", "default"), ("finalized", "finalize")):
        for g in (1, 2):
            row = by(med["c_new_commit_release", shape], policy=policy, threads=g)
            assert row["pairs_per_s"] > 0


def test_bench_refs_table_shows_the_medians_and_the_load(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "bench_refs.py"),
            *("--workloads", "a", "--records", "5", "--seconds", "0.1", "--threads", "1"),
            *("--repeat", "1", "--dir", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("a_clone_release_held: median of 1 run(s)") for line in lines)
    header = next(i for i, line in enumerate(lines) if line.startswith("a_clone_release_held:"))
    assert lines[header + 1].split() == [
        "shape",
        "threads",
        "records",
        "pairs_per_s",
        "p50_us",
        "p99_us",
        "max_us",
    ]
    assert [line.split()[0] for line in lines[header + 2 : header + 4]] == ["pairs", "finalized"]
    assert any(line.startswith("/proc/loadavg at the start: ") for line in lines)


def test_bench_prune_measures_both_shapes(tmp_path: Path) -> None:
    args = [
        *("--sizes", "60,120", "--held", "6", "--prune-g", "2", "--baseline-s", "0.1"),
        *("--du-records", "60", "--du-repeat", "2", "--gc-half", "40", "--repeat", "1"),
    ]
    lines = run_json("bench_prune.py", args, tmp_path, timeout=180)
    med = medians(lines)
    for shape in ("pairs", "finalized"):
        per = 2 if shape == "pairs" else 1
        for n in (60, 120):
            row = by(med["e_prune", shape], records=n)
            assert (row["held"], row["goroutines"]) == (6, 2)
            assert row["cm_records_before"] == per * (n + 6)
            assert row["cm_records_after"] == per * 6  # the held records stay
            assert row["pruned_reported"] == row["events"] == n
            assert row["prune_s"] > 0
            assert row["delete_phase_s"] + row["gc_phase_s"] == pytest.approx(row["prune_s"])
            for key in (
                "baseline_pairs_per_s",
                "baseline_p99_us",
                "during_p99_us",
                "max_completion_gap_ms",
                "during_max_ms",
            ):
                assert row[key] > 0, key
            for op in ("get", "new", "commit", "metadata_write"):
                assert f"{op}_max_ms" in row
            assert row["max_wait_ms"] >= row["during_max_ms"]
        assert by(med["e_prune_growth", shape], sizes="120/60")["ratio"] > 0
        du = by(med["f_du", shape], records=60)
        assert du["entries"] == 60  # one row per pair
        assert len(du["calls_s"]) == 3
        assert du["first_s"] > 0
        assert du["repeated_s"] > 0
        half = by(med["gc_half", shape], records=40)
        assert half["deleted"] == 21
        assert half["same_order_as_plan"] is True
        assert half["gauge_matches_du"] is True


def test_bench_metadata_measures_three_shapes(tmp_path: Path) -> None:
    args = ["--records", "300", "--unbatched", "20", "--batch", "100", "--repeat", "1"]
    med = medians(run_json("bench_metadata.py", args, tmp_path))
    for shape, entries in (("layer", 300), ("pairs", 600), ("finalized", 300)):
        row = by(med["metadata", shape], records=300)
        assert row["entries"] == entries
        for key in (
            "batched_write_records_per_s",
            "batched_item_write_records_per_s",
            "unbatched_write_records_per_s",
            "full_load_s",
            "read_p50_us",
            "read_p99_us",
        ):
            assert row[key] > 0, key


def test_bench_blobs_times_get_remotes_on_both_shapes(tmp_path: Path) -> None:
    args = [
        *("--layers", "1", "--layer-mb", "0.05", "--files", "4", "--compressions", "gzip"),
        *("--remote-mb", "0.02", "--remote-layers", "2", "--repeat", "1"),
    ]
    med = medians(run_json("bench_blobs.py", args, tmp_path))
    extract = by(med["extract", None], compression="gzip")
    assert extract["provider_calls"] == 1
    assert extract["lazy_mb_s"] > 0
    assert extract["raw_apply_mb_s"] > 0
    for shape in ("pairs", "finalized"):
        row = by(med["get_remotes", shape], compression="gzip", layers=2)
        assert all(row[k] > 0 for k in ("create_ms", "cached_ms", "force_other_ms"))


def test_bench_metrics_scrapes_real_caches_of_both_shapes(tmp_path: Path) -> None:
    args = ["--sizes", "300", "--repeat", "2", "--uncapped-repeat", "1", "--real-sizes", "40"]
    med = medians(run_json("bench_metrics.py", args, tmp_path))
    assert by(med["synthetic", None], records=300, cap=1000)["scrape_ms"] > 0
    for shape, entries in (("pairs", 80), ("finalized", 40)):
        row = by(med["real", shape], records=40)
        assert row["entries"] == entries
        assert row["runs"] == 2
        assert row["scrape_ms"] > 0
        assert row["series"] > 40  # a series per record, and the cache-wide ones


def test_bench_snapshots_prints_json_lines(tmp_path: Path) -> None:
    lines = run_json("bench_snapshots.py", ["--files", "200", "--repeat", "1"], tmp_path)
    rows = [x for x in lines if x["type"] == "median"]
    names = {(x["group"], x["bench"]) for x in rows}
    assert ("native", "prepare on the tree") in names
    assert ("native", "commit of the prepared snapshot") in names
    assert all(x["shape"] is None and x["runs"] == 1 and x["median"] > 0 for x in rows)


# -- the side-by-side runner -------------------------------------------------------------------

#: Stands in for BuildKit's compiled benchmark (an external program, not refcache's code):
#: answers TestBenchCreate and TestBenchDU as the real one does and logs its environment.
FAKE_BUILDKIT = """\
    #!{python}
    import json, os, sys
    from pathlib import Path
    test = sys.argv[sys.argv.index("-test.run") + 1].strip("^$")
    root = Path(os.environ["BKBENCH_ROOT"])
    with open({log!r}, "a") as f:
        keys = sorted(k for k in os.environ if k.startswith("BKBENCH"))
        f.write(json.dumps([test, root.is_dir(), {{k: os.environ[k] for k in keys}}]) + "\\n")
    if os.environ.get("BKBENCH") != "1":
        print("--- SKIP: " + test)
        sys.exit(0)
    if test == "TestBenchCreate":
        (root / "metadata.db").write_text("dataset")
        out = {{"bench": "create", "records": int(os.environ["BKBENCH_RECORDS"])}}
    else:
        assert (root / "metadata.db").read_text() == "dataset"  # a copy of the dataset
        calls = [0.5] + [0.25] * (int(os.environ["BKBENCH_DU_REPEAT"]) - 1)
        out = {{"bench": "f_du", "calls_s": calls, "entries": 1}}
    print("BKBENCH " + json.dumps(out))
    print("--- PASS: " + test + " (0.01s)")
"""


def test_the_side_by_side_runner_alternates_and_reports_ratios(tmp_path: Path) -> None:
    log = tmp_path / "fake.log"
    binary = tmp_path / "cache.test"
    binary.write_text(textwrap.dedent(FAKE_BUILDKIT.format(python=sys.executable, log=str(log))))
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    work = tmp_path / "work"
    work.mkdir()
    args = [
        *("--buildkit-test", str(binary), "--workloads", "du", "--rounds", "2"),
        *("--du-records", "30", "--du-repeat", "3"),
    ]
    lines = run_json("bench_vs_buildkit.py", args, work)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    # One dataset, then one run per round, each on a fresh copy.
    assert [c[0] for c in calls] == ["TestBenchCreate", "TestBenchDU", "TestBenchDU"]
    assert all(c[1] for c in calls)
    assert calls[0][2]["BKBENCH_RECORDS"] == "30"
    assert calls[1][2]["BKBENCH_DU_REPEAT"] == "3"
    rounds = [x for x in lines if x["type"] == "round"]
    assert [(x["round"], x["metric"]) for x in rounds] == [
        (1, "disk usage, first call, s"),
        (1, "disk usage, repeated call, s"),
        (2, "disk usage, first call, s"),
        (2, "disk usage, repeated call, s"),
    ]
    for x in rounds:
        assert x["buildkit"] == (0.5 if "first" in x["metric"] else 0.25)
        assert x["refcache"] > 0
        assert x["ratio"] == pytest.approx(x["buildkit"] / x["refcache"])  # time: > 1 is ours
        assert len(x["loadavg_go"].split()) == 5
    summary = {x["metric"]: x for x in lines if x["type"] == "summary"}
    first = summary["disk usage, first call, s"]
    assert first["rounds"] == 2
    assert first["ratio_min"] <= first["ratio_median"] <= first["ratio_max"]


def test_the_side_by_side_runner_needs_the_binary(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_vs_buildkit.py"), "--buildkit-test", "nowhere"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
        env={**os.environ},
    )
    assert proc.returncode == 2
    assert "--buildkit-test nowhere: no executable there" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_bench_aio_compares_async_and_blocking_in_one_run(tmp_path: Path) -> None:
    args = ["--records", "5", "--seconds", "0.2", "--callers", "1,2", "--repeat", "1"]
    lines = run_json("bench_aio.py", args, tmp_path)
    rows = [x for x in lines if x["type"] == "median"]
    for bench_name in ("clone_release", "new_commit_release"):
        for callers in (1, 2):
            for api in ("blocking", "async"):
                row = by(rows, bench=bench_name, callers=callers, api=api)
                assert all(row[k] > 0 for k in (*RATE, "cpu_us_per_pair")), row
                assert row["p50_us"] <= row["p99_us"] <= row["max_us"]
            ratio = by(rows, bench="ratio", workload=bench_name, callers=callers)["ratio"]
            blocking = by(rows, bench=bench_name, callers=callers, api="blocking")
            asynced = by(rows, bench=bench_name, callers=callers, api="async")
            assert ratio == pytest.approx(asynced["pairs_per_s"] / blocking["pairs_per_s"])
    notes = [x["text"] for x in lines if x["type"] == "note"]
    assert len(notes) == 4
    assert all("async/blocking" in text for text in notes)
