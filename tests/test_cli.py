"""The ``refcache`` command line, run as a user runs it: a real process on a real cache.

Each test runs the console script (``refcache`` next to the interpreter when installed, else
``python -m actors._cli``) in a subprocess against a cache built in ``tmp_path`` — also while
this test process holds the cache open, which is "another process" for the command: ``du``,
``inspect``, ``check`` and ``prune --dry-run`` work read-only; ``prune`` says clearly that the
cache is open elsewhere. User mistakes are one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from refcache.actors import Cache, ImmutableRef, open_cache
from refcache.actors._cli import UsageError, format_bytes, parse_duration, parse_size

ROOT = Path(__file__).resolve().parent.parent
WAIT = 30.0


def _command() -> list[str]:
    script = Path(sys.executable).parent / "refcache"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "refcache.actors._cli"]


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    return subprocess.run(
        [*_command(), "--root", str(root), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=root.parent,
        timeout=120,
        check=False,
    )


def assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@dataclass
class Records:
    root: Path
    base: str
    step: str
    scratch: str


def _layer(cache: Cache, parent: ImmutableRef | None, data: str, desc: str) -> ImmutableRef:
    m = cache.manager.new(parent, description=desc).get(timeout=WAIT)
    with m.mount(readonly=False).local() as path:
        (path / "data").write_text(data)
    ref = m.commit()
    ref.finalize()
    return ref


@pytest.fixture
def records(tmp_path: Path) -> Records:
    """A closed cache: base <- step (build step), and a retained scratch mutable."""
    root = tmp_path / "cache"
    with open_cache(root, snapshotter="native") as cache:
        base = _layer(cache, None, "b" * 5000, "base image")
        step = _layer(cache, base, "s" * 9000, "build step")
        scratch = cache.manager.new(retain=True, description="scratch").get(timeout=WAIT)
        for ref in (base, step, scratch):
            ref.release()
    return Records(root, base.id, step.id, scratch.id)


@pytest.fixture
def held_open(records: Records) -> Iterator[Cache]:
    """The cache open in this process (another process for the CLI), with a handle held."""
    cache = open_cache(records.root, snapshotter="native")
    ref = cache.manager.get(records.step).get(timeout=WAIT)
    try:
        yield cache
    finally:
        ref.release()
        cache.close()


# -- parsing -------------------------------------------------------------------------------------


class TestParsing:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("0", 0),
            ("1024", 1024),
            ("10GB", 10 * 1000**3),
            ("10gb", 10 * 1000**3),
            ("1.5G", 1_500_000_000),
            ("512MiB", 512 * 1024**2),
            ("2Ki", 2048),
            ("7B", 7),
        ],
    )
    def test_sizes(self, text: str, expected: int) -> None:
        assert parse_size(text) == expected

    @pytest.mark.parametrize("text", ["", "GB", "-1", "1e3", "10 GB", "10XB", "1.2.3MB", "nan"])
    def test_bad_sizes(self, text: str) -> None:
        with pytest.raises(UsageError, match="invalid size"):
            parse_size(text)

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("0", timedelta(0)),
            ("48h", timedelta(hours=48)),
            ("1h30m", timedelta(hours=1, minutes=30)),
            ("90s", timedelta(seconds=90)),
            ("2d", timedelta(days=2)),
            ("1.5h", timedelta(minutes=90)),
            ("250ms", timedelta(milliseconds=250)),
        ],
    )
    def test_durations(self, text: str, expected: timedelta) -> None:
        assert parse_duration(text) == expected

    @pytest.mark.parametrize("text", ["", "h", "5", "5x", "-1h", "1h 30m", "1hh", "h1"])
    def test_bad_durations(self, text: str) -> None:
        with pytest.raises(UsageError, match="invalid duration"):
            parse_duration(text)

    def test_sizes_print_as_buildctl_does(self) -> None:
        assert [format_bytes(n) for n in (-1, 0, 999, 1000, 1_234_567, 10**12)] == [
            "unknown",
            "0B",
            "999B",
            "1kB",
            "1.23MB",
            "1TB",
        ]


# -- du ------------------------------------------------------------------------------------------


class TestDu:
    def test_table_lists_records_and_totals(self, records: Records) -> None:
        proc = cli(records.root, "du")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].split()[:5] == ["ID", "RECLAIMABLE", "SIZE", "LAST", "ACCESSED"]
        assert lines[0].rstrip().endswith("DESCRIPTION")
        body = {line.split()[0]: line for line in lines[1:4]}
        assert set(body) == {records.base, records.step, records.scratch + "*"}
        assert "build step" in body[records.step]
        assert [line.split(":")[0] for line in lines[4:]] == [
            "Shared",
            "Private",
            "Reclaimable",
            "Total",
        ]

    def test_json_and_verbose_and_filters(self, records: Records) -> None:
        proc = cli(records.root, "du", "--format", "json")
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        rows = {r["id"]: r for r in doc["records"]}
        assert set(rows) == {records.base, records.step, records.scratch}
        assert rows[records.step]["parents"] == [records.base]
        assert not any(r["in_use"] for r in rows.values())
        total = sum(r["size"] for r in rows.values())
        assert doc["totals"] == {
            "shared": 0,
            "private": total,
            "reclaimable": total,
            "total": total,
        }
        assert rows[records.step]["size"] > 9000

        proc = cli(records.root, "du", "-v", "--filter", "description~=^build")
        assert proc.returncode == 0, proc.stderr
        assert f"ID:\t\t{records.step}" in proc.stdout
        assert f"Parents:\t{records.base}" in proc.stdout
        assert records.base not in proc.stdout.split("Parents:")[0]

        filters = ("-f", "mutable", "-f", f"id=={records.base}")  # several: OR
        proc = cli(records.root, "du", "--format", "json", *filters)
        assert proc.returncode == 0, proc.stderr
        ids = {r["id"] for r in json.loads(proc.stdout)["records"]}
        assert ids == {records.scratch, records.base}

    def test_bad_filter_and_missing_cache_are_user_errors(
        self, records: Records, tmp_path: Path
    ) -> None:
        assert_user_error(cli(records.root, "du", "--filter", "id~=("), "invalid filter")
        assert_user_error(cli(tmp_path / "nothing", "du"), "no refcache cache")


# -- a cache open in another process -------------------------------------------------------------


class TestOpenElsewhere:
    def test_read_only_commands_work_and_prune_refuses(
        self, records: Records, held_open: Cache
    ) -> None:
        root = records.root
        proc = cli(root, "du", "--format", "json")
        assert proc.returncode == 0, proc.stderr
        assert {r["id"] for r in json.loads(proc.stdout)["records"]} == {
            records.base,
            records.step,
            records.scratch,
        }
        proc = cli(root, "inspect", records.step)
        assert proc.returncode == 0, proc.stderr
        assert f"ID:              {records.step}" in proc.stdout
        proc = cli(root, "check")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "cache is consistent" in proc.stdout
        proc = cli(root, "prune", "--dry-run")
        assert proc.returncode == 0, proc.stderr
        assert "Would reclaim" in proc.stdout

        proc = cli(root, "prune")
        assert_user_error(proc, "open in another process")
        assert_user_error(cli(root, "check", "--fix"), "open in another process")
        # Nothing changed: the holder still sees all its records.
        rows = held_open.manager.disk_usage().get(timeout=WAIT)
        assert len(rows) == 3


# -- inspect -------------------------------------------------------------------------------------


class TestInspect:
    def test_fields_and_parent_tree(self, records: Records) -> None:
        proc = cli(records.root, "inspect", records.step[:8])  # a unique prefix
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        assert f"ID:              {records.step}" in out
        assert "Kind:            layer" in out
        assert f"Parents:         {records.base}" in out
        assert "Description:     build step" in out
        assert f"  {records.step}: snapshots/native/{records.step}" in out  # its lease
        assert "cache.description = 'build step'" in out
        tree = out.split("Parent tree:\n", 1)[1].splitlines()
        assert tree[0].strip().startswith(f"{records.step}  layer")
        assert tree[1].strip().startswith(f"└── {records.base}  base")

        proc = cli(records.root, "inspect", records.base, "--format", "json")
        doc = json.loads(proc.stdout)
        assert doc["children"] == [records.step]
        assert doc["holders"] == 1
        assert doc["metadata"]["cache.description"] == "base image"

    def test_unknown_id_is_a_user_error(self, records: Records) -> None:
        assert_user_error(cli(records.root, "inspect", "nosuchrecord"), "not found")


# -- check ---------------------------------------------------------------------------------------


class TestCheck:
    def test_problems_exit_1_and_fix_repairs_them(self, records: Records) -> None:
        orphan = records.root / "snapshots" / "orphan-dir"
        orphan.mkdir()
        proc = cli(records.root, "check")
        assert proc.returncode == 1, proc.stdout
        assert "orphan-dir" in proc.stdout
        proc = cli(records.root, "check", "--fix")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "fixed:" in proc.stdout
        assert not orphan.exists()


# -- prune ---------------------------------------------------------------------------------------


class TestPrune:
    def test_dry_run_then_prune_with_progress_and_summary(self, records: Records) -> None:
        root = records.root
        proc = cli(root, "prune", "--dry-run")
        assert proc.returncode == 0, proc.stderr
        listed = [line.split()[2] for line in proc.stdout.splitlines() if line.startswith("would")]
        assert listed[0] in (records.step, records.scratch)
        assert listed[-1] == records.base  # the parent goes after its child
        assert sorted(listed) == sorted([records.base, records.step, records.scratch])
        assert proc.stdout.splitlines()[-1].startswith("Would reclaim ")

        # Every record was used just now (its release counted a use): 48h protects them all.
        proc = cli(root, "prune", "--keep-duration", "48h", "-v")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "Reclaimed 0B in 0 records\n"

        proc = cli(root, "prune", "-v")
        assert proc.returncode == 0, proc.stderr
        assert "pruning [" in proc.stderr
        assert "3/3 records" in proc.stderr.splitlines()[-1]
        deleted = [line.split()[1] for line in proc.stdout.splitlines()[:-1]]
        assert deleted == listed
        summary = proc.stdout.splitlines()[-1]
        assert summary.startswith("Reclaimed ")
        assert summary.endswith(" in 3 records")
        assert json.loads(cli(root, "du", "--format", "json").stdout)["records"] == []

    @pytest.mark.parametrize(
        ("args", "needle"),
        [
            (("--keep-duration", "5x"), "invalid duration '5x'"),
            (("--reserved-space", "10XB"), "invalid size '10XB'"),
            (("--max-used-space=-5",), "invalid size '-5'"),
            (("--min-free-space", "1e9"), "invalid size '1e9'"),
            (("--filter", "id~=("), "invalid filter"),
        ],
    )
    def test_bad_values_are_one_line_errors_and_change_nothing(
        self, records: Records, args: tuple[str, ...], needle: str
    ) -> None:
        assert_user_error(cli(records.root, "prune", *args), needle)
        assert len(json.loads(cli(records.root, "du", "--format", "json").stdout)["records"]) == 3

    def test_smoke_still_runs(self, tmp_path: Path) -> None:
        proc = cli(tmp_path / "fresh", "smoke")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("committed ")
        assert "Reclaimable:" in proc.stdout
