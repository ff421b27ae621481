"""The ``refcache`` command line, run as a user runs it: a real process on a real cache.

Each test runs the console script (``refcache`` next to the interpreter when installed, else
``python -m refcache.actors._cli``) in a subprocess against a cache built in ``tmp_path`` —
through pipes, or through a real pseudo-terminal where a terminal matters (the prune's
question). Also while this test process holds the cache open, which is "another process"
for the command: ``du``, ``inspect``, ``check`` and ``prune --dry-run`` work read-only;
``prune`` says that the cache is busy. Usage errors are one line on stderr and exit code 2;
failures one line and exit code 1; Ctrl-C exit code 130 with the cache consistent.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from refcache.actors import Cache, ImmutableRef, UsageInfo, open_cache
from refcache.actors._cli import UsageError, format_bytes, parse_duration, parse_size
from refcache.actors._cliutil import (
    MAX_DURATION_NS,
    MAX_SIZE,
    parse_until,
    safe,
    sort_usage,
    usage_lines,
)
from refcache.storage import KEY_LAST_USED_AT, MetadataStore, MetaEnv
from refcache.storage._check import open_snapshotter

ROOT = Path(__file__).resolve().parent.parent
WAIT = 30.0
VALID_FIELDS = "valid fields: id, parents, description, type, inuse, mutable, immutable, shared"


def _command() -> list[str]:
    script = Path(sys.executable).parent / "refcache"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "refcache.actors._cli"]


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REFCACHE_ROOT", "REFCACHE_DEBUG")}
    env.update(extra or {})
    return env


def run(
    *args: str,
    cwd: Path,
    stdin: int | None = subprocess.DEVNULL,
    input_text: str | None = None,
    env: Mapping[str, str] | None = None,
    wrap: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Runs ``refcache ARGS`` as given (no implicit --root), under ``wrap`` if given."""
    return subprocess.run(
        [*wrap, *_command(), *args],
        capture_output=True,
        text=True,
        input=input_text,
        stdin=None if input_text is not None else stdin,
        env=_env(env),
        cwd=cwd,
        timeout=120,
        check=False,
    )


def cli(root: Path, *args: str, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """Runs ``refcache --root ROOT ARGS`` with stdin at end of input (unless ``input_text``)."""
    return run("--root", str(root), *args, cwd=root.parent, input_text=input_text)


def assert_one_line(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    return assert_one_line(proc, 2, *needles)


def assert_failure(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    return assert_one_line(proc, 1, *needles)


def record_ids(root: Path) -> set[str]:
    proc = cli(root, "du", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return {r["id"] for r in json.loads(proc.stdout)["records"]}


def assert_consistent(root: Path) -> None:
    proc = cli(root, "check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "cache is consistent", proc.stdout


@dataclass
class Records:
    root: Path
    base: str
    step: str
    scratch: str

    @property
    def ids(self) -> set[str]:
        return {self.base, self.step, self.scratch}


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


def _many(root: Path, n: int, *, description: str = "") -> list[str]:
    """``n`` retained scratch records (no parents): each is deleted by a prune on its own."""
    ids = []
    with open_cache(root, snapshotter="native") as cache:
        for i in range(n):
            m = cache.manager.new(retain=True, description=description or f"scratch {i}")
            ref = m.get(timeout=WAIT)
            ids.append(ref.id)
            ref.release()
    return ids


def _set_last_used(root: Path, rid: str, when: datetime) -> None:
    """Back-dates a record's last use (the cache closed), as if used at ``when``."""
    env = MetaEnv(root / "meta")
    try:
        MetadataStore(env).get(rid).set(KEY_LAST_USED_AT, int(when.timestamp() * 1e9))
    finally:
        env.close()


# -- values --------------------------------------------------------------------------------------


class TestParsing:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("0", 0),
            ("1024", 1024),
            ("10GB", 10 * 1000**3),
            ("10gb", 10 * 1000**3),
            ("1.5G", 1_500_000_000),
            ("1.5GB", 1_500_000_000),
            ("0.5kB", 500),
            ("512MiB", 512 * 1024**2),
            ("2Ki", 2048),
            ("7B", 7),
            ("9223372036854775807", MAX_SIZE),  # exact: no float round trip
            ("9223372036854775806", MAX_SIZE - 1),
            ("9.223372036854775PB", 9_223_372_036_854_775),
        ],
    )
    def test_sizes_are_exact(self, text: str, expected: int) -> None:
        assert parse_size(text) == expected

    @pytest.mark.parametrize(
        ("text", "why"),
        [
            ("", "empty"),
            ("   ", "empty"),
            ("GB", "expected a number"),
            ("-1", "negative"),
            ("-1GB", "negative"),
            ("1e3", "expected a number"),
            ("10 GB", "expected a number"),
            (" 10GB", "expected a number"),
            ("10XB", "expected a number"),
            ("1.2.3MB", "expected a number"),
            ("nan", "expected a number"),
            ("inf", "expected a number"),
            ("1.5", "not a whole number of bytes"),
            ("1.0001kB", "not a whole number of bytes"),
            ("9223372036854775808", "larger than the maximum"),
            ("99999999999999999999", "larger than the maximum"),
            ("9300PB", "larger than the maximum"),
        ],
    )
    def test_bad_sizes(self, text: str, why: str) -> None:
        with pytest.raises(UsageError, match="invalid size") as info:
            parse_size(text)
        assert why in str(info.value)
        assert repr(text) in str(info.value)

    def test_a_bare_number_can_mean_megabytes(self) -> None:
        assert parse_size("1000", bare_unit=10**6) == 10**9  # buildctl --keep-storage 1000
        assert parse_size("1.5", bare_unit=10**6) == 1_500_000
        assert parse_size("10GB", bare_unit=10**6) == 10 * 10**9

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
            ("1.000001s", timedelta(seconds=1, microseconds=1)),
            ("106751d", timedelta(days=106751)),
        ],
    )
    def test_durations(self, text: str, expected: timedelta) -> None:
        assert parse_duration(text) == expected

    @pytest.mark.parametrize(
        ("text", "why"),
        [
            ("", "empty"),
            (" ", "empty"),
            ("h", "expected"),
            ("5", "expected"),
            ("5x", "expected"),
            ("-1h", "negative"),
            ("1h 30m", "expected"),
            ("1hh", "expected"),
            ("h1", "expected"),
            ("99999999999d", "longer than the maximum, 106751d23h47m16.854775807s"),
            ("106752d", "longer than the maximum"),
        ],
    )
    def test_bad_durations(self, text: str, why: str) -> None:
        with pytest.raises(UsageError, match="invalid duration") as info:
            parse_duration(text)
        assert why in str(info.value)

    def test_the_longest_duration_is_gos(self) -> None:
        longest = parse_duration("106751d23h47m16.854775807s")
        assert longest == timedelta(microseconds=MAX_DURATION_NS // 1000)

    def test_until_takes_a_duration_or_a_past_timestamp(self) -> None:
        now = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
        assert parse_until("24h", now=now) == timedelta(hours=24)
        assert parse_until("2024-05-31T12:00:00Z", now=now) == timedelta(days=1)
        assert parse_until(str(int(now.timestamp()) - 3600), now=now) == timedelta(hours=1)
        for bad in ("", "2024-06-02", "yesterday", "-1h", "99999999999d"):
            with pytest.raises(UsageError):
                parse_until(bad, now=now)

    @pytest.mark.parametrize(
        ("n", "text"),
        [
            (-1, "unknown"),
            (0, "0B"),
            (999, "999B"),
            (1000, "1kB"),
            (1500, "1.5kB"),
            (999_499, "999kB"),
            (999_999, "1MB"),  # rounded before the unit is chosen, never "1e+03kB"
            (1_234_567, "1.23MB"),
            (22_345_678, "22.3MB"),
            (10**12, "1TB"),
            (MAX_SIZE, "9.22EB"),
        ],
    )
    def test_sizes_print_as_buildctl_does(self, n: int, text: str) -> None:
        assert format_bytes(n) == text

    @pytest.mark.parametrize("n", [10**k - 1 for k in range(4, 19)] + [999_500, 999_500_000])
    def test_printed_sizes_are_always_three_digits_or_fewer(self, n: int) -> None:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(kB|MB|GB|TB|PB|EB)", format_bytes(n))
        assert m is not None, format_bytes(n)
        assert Decimal(m.group(1)) < 1000
        assert len(m.group(1).replace(".", "").lstrip("0")) <= 3


# -- 1. strict values ----------------------------------------------------------------------------


BAD_VALUES = [
    (("--max-used-space", ""), "--max-used-space: invalid size '': empty"),
    (("--keep-duration", ""), "--keep-duration: invalid duration '': empty"),
    (("--reserved-space", ""), "--reserved-space: invalid size ''"),
    (("--min-free-space", "  "), "--min-free-space: invalid size '  ': empty"),
    (("--keep-storage", ""), "--keep-storage: invalid size ''"),
    (("--max-used-space=-5",), "invalid size '-5': negative"),
    (("--keep-duration=-1h",), "invalid duration '-1h': negative"),
    (("--keep-duration", "5x"), "invalid duration '5x'"),
    (("--reserved-space", "10XB"), "invalid size '10XB'"),
    (("--min-free-space", "1e9"), "invalid size '1e9'"),
    (("--max-used-space", "1.5"), "not a whole number of bytes"),
    (("--keep-duration", "99999999999d"), "longer than the maximum"),
    (("--max-used-space", "99999999999999999999"), "larger than the maximum"),
    (("--filter", "id~=("), "invalid filter"),
]


class TestStrictValues:
    def test_bad_values_are_one_line_errors_and_delete_nothing(self, records: Records) -> None:
        for args, needle in BAD_VALUES:
            # -f: even without the question, nothing goes.
            assert_user_error(cli(records.root, "prune", "-f", *args), needle)
        assert record_ids(records.root) == records.ids

    def test_an_unset_shell_variable_no_longer_means_no_limit(self, records: Records) -> None:
        proc = run(
            "prune",
            "-f",
            "--max-used-space",
            os.environ.get("REFCACHE_TEST_UNSET_LIMIT", ""),  # "$LIMIT" with LIMIT unset
            cwd=records.root.parent,
            env={"REFCACHE_ROOT": str(records.root)},
        )
        assert_user_error(proc, "invalid size ''")
        assert record_ids(records.root) == records.ids

    def test_fractional_sizes_are_exact_decimal(self, records: Records) -> None:
        # 0.000005MB is 5 bytes exactly; a float round trip would not matter here, but a
        # fraction of a byte is refused rather than rounded.
        proc = cli(records.root, "prune", "--dry-run", "--max-used-space", "0.000005MB")
        assert proc.returncode == 0, proc.stderr
        assert_user_error(
            cli(records.root, "prune", "--dry-run", "--max-used-space", "0.0000005MB"),
            "not a whole number of bytes",
        )


# -- 2. prune asks first -------------------------------------------------------------------------


def _run_in_pty(args: list[str], cwd: Path, answer: bytes | None) -> tuple[int, str]:
    """Runs ``args`` on a new pseudo-terminal; types ``answer`` once ``[y/N]`` shows."""
    master, slave = os.openpty()
    proc = subprocess.Popen(
        args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=_env(), close_fds=True
    )
    os.close(slave)
    output = b""
    typed = False
    deadline = time.monotonic() + 60
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, output.decode(errors="replace")
            ready, _, _ = select.select([master], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal has gone
                break
            if not chunk:
                break
            output += chunk
            if answer is not None and not typed and b"[y/N] " in output:
                os.write(master, answer)
                typed = True
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        os.close(master)
    return code, output.decode(errors="replace")


class TestPruneAsks:
    def test_the_question_names_the_root_and_what_goes_and_yes_deletes(
        self, records: Records
    ) -> None:
        proc = cli(records.root, "prune", input_text="y\n")
        assert proc.returncode == 0, proc.stderr
        question = proc.stderr.split("[y/N]")[0]
        assert "delete 3 records (" in question
        assert f"from the cache at {records.root}:" in question
        assert "records no one holds" in question
        assert proc.stdout.startswith("Total:\t\t")
        assert proc.stdout.count("\n") == 1
        assert record_ids(records.root) == set()

    @pytest.mark.parametrize("answer", ["yes\n", "Y\n", " y \n"])
    def test_other_spellings_of_yes(self, records: Records, answer: str) -> None:
        proc = cli(records.root, "prune", "--filter", f"id=={records.step}", input_text=answer)
        assert proc.returncode == 0, proc.stderr
        assert "delete 1 record (" in proc.stderr
        assert record_ids(records.root) == records.ids - {records.step}

    def test_anything_else_or_no_answer_is_a_no(self, records: Records) -> None:
        for answer in ("n\n", "no\n", "\n", "yess\n", "sure\n", ""):
            proc = cli(records.root, "prune", "--all", input_text=answer)
            needle = "no answer (end of input)" if answer == "" else "not confirmed"
            line = proc.stderr.strip().splitlines()[-1]
            assert proc.returncode == 1, proc.stderr
            assert line == f"refcache prune: {needle}: nothing was deleted" + (
                "; -f/--force prunes without asking" if answer == "" else ""
            )
            assert "Traceback" not in proc.stderr
            assert proc.stdout == ""
        assert record_ids(records.root) == records.ids

    def test_stdin_at_dev_null_is_a_no(self, records: Records) -> None:
        proc = run("--root", str(records.root), "prune", cwd=records.root.parent)  # </dev/null
        assert proc.returncode == 1
        assert proc.stderr.strip().endswith("-f/--force prunes without asking")
        assert record_ids(records.root) == records.ids

    def test_force_does_not_ask_and_dry_run_never_asks(self, records: Records) -> None:
        proc = cli(records.root, "prune", "--dry-run", "-v")  # stdin at end of input
        assert proc.returncode == 0, proc.stderr
        assert "[y/N]" not in proc.stderr
        assert record_ids(records.root) == records.ids
        proc = cli(records.root, "prune", "--force")
        assert proc.returncode == 0, proc.stderr
        assert "[y/N]" not in proc.stderr
        assert record_ids(records.root) == set()

    def test_nothing_to_delete_asks_nothing(self, records: Records) -> None:
        proc = cli(records.root, "prune", "--keep-duration", "48h")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "Total:\t\t0B\n"
        assert proc.stderr == ""

    def test_a_yes_typed_on_a_terminal(self, records: Records) -> None:
        code, output = _run_in_pty(
            [*_command(), "--root", str(records.root), "prune", "-v"], records.root.parent, b"y\n"
        )
        assert code == 0, output
        assert "WARNING! This will delete 3 records (" in output
        assert f"from the cache at {records.root}:" in output
        assert "[y/N] y\r\n" in output  # the terminal echoed the answer
        assert "\rpruning [" in output  # the progress bar redraws in place on a terminal
        table = output.rsplit("3/3 records", 1)[1]
        assert "ID" in table
        assert "RECLAIMABLE" in table
        assert re.search(r"Total:\t\t\d", table)
        assert record_ids(records.root) == set()

    @pytest.mark.parametrize(
        ("typed", "message"),
        [(b"n\n", "not confirmed"), (b"\n", "not confirmed"), (b"\x04", "no answer")],
    )
    def test_no_on_a_terminal_deletes_nothing(
        self, records: Records, typed: bytes, message: str
    ) -> None:
        code, output = _run_in_pty(
            [*_command(), "--root", str(records.root), "prune"], records.root.parent, typed
        )
        assert code == 1, output
        assert f"refcache prune: {message}" in output
        assert "Traceback" not in output
        assert record_ids(records.root) == records.ids


# -- 3. the root ---------------------------------------------------------------------------------


class TestRoot:
    def test_root_before_or_after_the_command_and_from_the_environment(
        self, records: Records, tmp_path: Path
    ) -> None:
        root = str(records.root)
        for args, env in (
            (("--root", root, "du", "--format", "json"), None),
            (("du", "--root", root, "--format", "json"), None),
            (("du", "--format", "json", "--root", root), None),
            (("du", "--format", "json"), {"REFCACHE_ROOT": root}),
            (("--root", root, "du", "--format", "json"), {"REFCACHE_ROOT": "/nonexistent"}),
        ):
            proc = run(*args, cwd=tmp_path, env=env)
            assert proc.returncode == 0, (args, proc.stderr)
            assert {r["id"] for r in json.loads(proc.stdout)["records"]} == records.ids
        for command in (("inspect", records.step), ("check",), ("prune", "--dry-run")):
            proc = run(*command, "--root", root, cwd=tmp_path)
            assert proc.returncode == 0, (command, proc.stderr)

    def test_the_default_is_refcache_data_in_the_working_directory(
        self, records: Records, tmp_path: Path
    ) -> None:
        work = tmp_path / "work"
        work.mkdir()
        shutil.move(records.root, work / "refcache-data")
        proc = run("du", "--format", "json", cwd=work)
        assert proc.returncode == 0, proc.stderr
        assert len(json.loads(proc.stdout)["records"]) == 3
        proc = run("du", cwd=work, env={"REFCACHE_ROOT": ""})  # empty: as if unset
        assert proc.returncode == 0, proc.stderr

    def test_help_documents_the_root_and_the_exit_codes(self, tmp_path: Path) -> None:
        for args in (("--help",), ("prune", "--help"), ("du", "--help")):
            proc = run(*args, cwd=tmp_path)
            assert proc.returncode == 0
            text = " ".join(proc.stdout.split())
            assert "$REFCACHE_ROOT, else ./refcache-data" in text
            assert "--root DIR (before or after the command)" in text
            for code in ("0 success", "1 failure", "2 usage error", "130 interrupted"):
                assert code in text, (args, code)

    def test_a_missing_root_is_a_failure_and_creates_nothing(self, tmp_path: Path) -> None:
        missing = tmp_path / "nothing"
        empty = tmp_path / "empty"
        empty.mkdir()
        for command in (("du",), ("prune", "-f"), ("prune", "--dry-run"), ("inspect", "x")):
            line = assert_failure(cli(missing, *command), f"no cache at {missing}")
            assert "REFCACHE_ROOT" in line
            assert_failure(cli(empty, *command), f"no refcache cache at {empty}")
        for command in (("check",), ("check", "--fix")):
            assert_failure(cli(missing, *command), f"no cache at {missing}")
        assert not missing.exists()
        assert list(empty.iterdir()) == []

    def test_an_empty_root_option_is_a_usage_error(self, tmp_path: Path) -> None:
        assert_user_error(run("--root", "", "du", cwd=tmp_path), "--root is empty")


# -- 4. filters ----------------------------------------------------------------------------------


class TestFilters:
    def test_an_unknown_field_is_named_with_the_valid_ones(self, records: Records) -> None:
        for command, flt, field in (
            (("du", "--filter"), "descripton!=keepme", "descripton"),
            (("du", "-f"), "foo==bar", "foo"),
            (("prune", "-f", "--filter"), "descripton!=keepme", "descripton"),
            (("prune", "--dry-run", "--filter"), "foo==bar", "foo"),
            (("prune", "-f", "--all", "--filter"), "mutable,labels.x==y", "labels.x"),
        ):
            line = assert_user_error(cli(records.root, *command, flt), f"unknown field {field!r}")
            assert VALID_FIELDS in line
        assert record_ids(records.root) == records.ids

    def test_until_as_docker_builder_prune_reads_it(self, records: Records) -> None:
        old = datetime.now(UTC) - timedelta(days=3)
        _set_last_used(records.root, records.scratch, old)
        proc = cli(records.root, "du", "--filter", "until=24h", "--format", "json")
        assert proc.returncode == 0, proc.stderr
        assert [r["id"] for r in json.loads(proc.stdout)["records"]] == [records.scratch]
        since = (old + timedelta(hours=1)).isoformat()
        for flt in (f"until={since}", "until==48h", "unused-for=48h"):
            proc = cli(records.root, "prune", "--dry-run", "--format", "json", "--filter", flt)
            assert proc.returncode == 0, proc.stderr
            assert [r["id"] for r in json.loads(proc.stdout)["records"]] == [records.scratch]
        proc = cli(records.root, "prune", "-f", "--all", "--filter", "until=24h")
        assert proc.returncode == 0, proc.stderr
        assert record_ids(records.root) == {records.base, records.step}

    def test_until_mistakes_are_usage_errors(self, records: Records) -> None:
        for args, needle in (
            (("--filter", "until=24h", "--filter", "until=1h"), "only one until filter"),
            (("--filter", "until=24h", "--keep-duration", "1h"), "give one"),
            (("--filter", "until=yesterday"), "invalid until 'yesterday'"),
            (("--filter", "until=2999-01-01"), "is in the future"),
            (("--filter", "until="), "invalid duration '': empty"),
            (("--filter", "mutable,until=24h"), "give until=... as a --filter of its own"),
            (("until=24h",), "-f is --force here, as in docker builder prune"),
        ):
            assert_user_error(cli(records.root, "prune", "-f", *args), needle)
        assert record_ids(records.root) == records.ids

    def test_several_filters_are_ored(self, records: Records) -> None:
        filters = ("-f", "mutable", "-f", f"id=={records.base}")
        proc = cli(records.root, "du", "--format", "json", *filters)
        assert proc.returncode == 0, proc.stderr
        ids = {r["id"] for r in json.loads(proc.stdout)["records"]}
        assert ids == {records.scratch, records.base}


# -- 5. no tracebacks ----------------------------------------------------------------------------


def _read_one_line_then_close(args: list[str], cwd: Path) -> tuple[int, str]:
    """``refcache ARGS | head -1``: reads one line, closes the pipe; the exit code, stderr."""
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=_env(),
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.strip(), first
    proc.stdout.close()  # what head does after its line
    assert proc.stderr is not None
    with proc.stderr:
        err = proc.stderr.read()  # ends when the program exits
    return proc.wait(timeout=120), err


class TestNoTracebacks:
    @pytest.fixture
    def wordy(self, tmp_path: Path) -> Path:
        """20 records with 5 kB descriptions: more output than a pipe holds."""
        root = tmp_path / "wordy"
        _many(root, 20, description="x" * 5000)
        return root

    def test_du_verbose_into_head_exits_quietly(self, wordy: Path) -> None:
        code, err = _read_one_line_then_close(
            [*_command(), "--root", str(wordy), "du", "-v"], wordy
        )
        assert err == ""
        assert code == 141  # as a shell reports a program ended by SIGPIPE

    def test_prune_verbose_into_head_exits_quietly_after_pruning(self, wordy: Path) -> None:
        code, err = _read_one_line_then_close(
            [*_command(), "--root", str(wordy), "prune", "-f", "--all", "--verbose"], wordy
        )
        assert "Traceback" not in err, err
        assert "Error" not in err, err
        assert code == 141
        assert record_ids(wordy) == set()
        assert_consistent(wordy)

    def test_a_regular_file_as_root(self, tmp_path: Path) -> None:
        afile = tmp_path / "afile"
        afile.write_text("not a cache\n")
        for command in (("smoke",), ("demo", "--metrics-port", "-1")):
            assert_failure(cli(afile, *command), f"{afile} is not a directory")
        for command in (("du",), ("prune", "-f"), ("check", "--fix"), ("inspect", "x")):
            assert_failure(cli(afile, *command), f"{afile} is not a directory")
        assert afile.read_text() == "not a cache\n"
        proc = run("--root", str(afile / "cache"), "smoke", cwd=tmp_path)
        assert_failure(proc, "Not a directory")

    def test_an_unreadable_root(self, records: Records) -> None:
        wrap: tuple[str, ...] = ()
        if os.geteuid() == 0:
            # Root reads everything: drop the capabilities that let it (root stays the
            # owner of the interpreter, so it still runs).
            if shutil.which("setpriv") is None:
                pytest.skip("needs setpriv to run without CAP_DAC_OVERRIDE as root")
            wrap = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")
        os.chmod(records.root, 0o000)
        try:
            for command in (("du",), ("prune", "-f"), ("check",), ("inspect", records.step)):
                proc = run("--root", str(records.root), *command, cwd=Path("/"), wrap=wrap)
                assert_failure(proc, f"cannot read {records.root}: permission denied")
            proc = run("--root", str(records.root), "smoke", cwd=Path("/"), wrap=wrap)
            assert_failure(proc, "Permission denied")
        finally:
            os.chmod(records.root, 0o700)
        assert record_ids(records.root) == records.ids

    def test_a_read_only_disk(self, records: Records, tmp_path: Path) -> None:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("needs root to mount a read-only file system")
        disk = tmp_path / "ro"
        disk.mkdir()
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)],
            capture_output=True,
            check=False,
        )
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount tmpfs here: {mounted.stderr!r}")
        try:
            root = disk / "cache"
            shutil.copytree(records.root, root)
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
            for command in (("prune", "-f"), ("smoke",), ("check", "--fix")):
                proc = cli(root, *command)
                assert_failure(proc, "Read-only file system")
            fresh = disk / "fresh"
            assert_failure(cli(fresh, "smoke"), "Read-only file system")
            for command in (("du",), ("check",), ("prune", "--dry-run")):
                proc = cli(root, *command)  # reading works, or says in one line why not
                assert "Traceback" not in proc.stderr
                assert proc.returncode in (0, 1), proc.stderr
                if proc.returncode:
                    assert len(proc.stderr.strip().splitlines()) == 1
        finally:
            subprocess.run(["umount", "-l", str(disk)], check=False)

    @pytest.mark.slow
    @pytest.mark.timeout(240)
    def test_ctrl_c_stops_a_prune_within_a_second_and_leaves_the_cache_consistent(
        self, tmp_path: Path
    ) -> None:
        root = tmp_path / "big"
        total = len(_many(root, 3000))
        proc = subprocess.Popen(
            [*_command(), "--root", str(root), "prune", "-f"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        try:
            assert proc.stderr is not None
            first = proc.stderr.readline()  # the progress bar: the prune is deleting
            assert first.startswith("pruning ["), first
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
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        m = re.fullmatch(
            r"refcache prune: interrupted: (\d+) records \(\S+\) deleted before the prune "
            r"stopped(, (\d+) more flagged \(finished by the next open or refcache check "
            r"--fix\))?; the rest are kept and the cache is consistent",
            last,
        )
        assert m is not None, err
        deleted, flagged = int(m.group(1)), int(m.group(3) or 0)
        left = record_ids(root)  # without the flagged ones, which are on their way out
        assert 0 < len(left) < total
        assert deleted + flagged == total - len(left)
        proc = cli(root, "check")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.endswith("cache is consistent\n")
        if flagged:
            assert f"note: {flagged} records from an interrupted prune" in proc.stdout
            proc = cli(root, "check", "--fix")
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert proc.stdout.count("fixed: finished the interrupted removal") == flagged
        assert record_ids(root) == left
        assert_consistent(root)

    def test_check_fix_repairs_what_a_crash_left(self, records: Records) -> None:
        # A crash between removing a mutable record's snapshot and its metadata: what the
        # next open clears ("mutable record has no active snapshot").
        env = MetaEnv(records.root / "meta")
        try:
            snapshotter = open_snapshotter(records.root, env, clean=False)
            assert snapshotter is not None
            snapshotter.remove(records.scratch)
            snapshotter.close()
        finally:
            env.close()
        (records.root / "snapshots" / "orphan-dir").mkdir()
        proc = cli(records.root, "check")
        assert proc.returncode == 1
        assert f"record {records.scratch}: mutable record has no active snapshot" in proc.stdout
        assert (
            "  to repair: refcache check --fix removes the record, as opening the cache would"
            in proc.stdout
        )
        assert "orphan-dir belongs to no snapshot\n  to repair: refcache check --fix" in (
            proc.stdout
        )
        assert proc.stderr == "2 problem(s) found\n"

        proc = cli(records.root, "check", "--fix")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.splitlines() == [
            f"fixed: record {records.scratch}: mutable record has no active snapshot "
            f"{records.scratch}",
            f"fixed: snapshots: directory {records.root / 'snapshots' / 'orphan-dir'} belongs to "
            "no snapshot",
            "cache is consistent",
        ]
        assert proc.stderr == ""
        assert record_ids(records.root) == {records.base, records.step}

    def test_check_fix_says_exactly_what_repairs_what_it_cannot(self, records: Records) -> None:
        # An immutable record whose snapshot is gone: its data is lost, no repair brings it
        # back; check --fix names the command that deletes the record.
        env = MetaEnv(records.root / "meta")
        try:
            snapshotter = open_snapshotter(records.root, env, clean=False)
            assert snapshotter is not None
            snapshotter.remove(records.step)
            snapshotter.close()
        finally:
            env.close()
        proc = cli(records.root, "check", "--fix", "--format", "json")
        assert proc.returncode == 1
        doc = json.loads(proc.stdout)
        assert doc["consistent"] is False
        [problem] = doc["problems"]
        assert problem["problem"] == f"record {records.step}: snapshot {records.step} is missing"
        command = problem["remedy"].split(": ", 1)[1].split(" deletes")[0]
        assert command == (
            f"refcache --root {records.root} prune -f --all --filter id=={records.step}"
        )
        proc = run(*command.split()[1:], cwd=records.root.parent)
        assert proc.returncode == 0, proc.stderr
        assert_consistent(records.root)
        assert record_ids(records.root) == {records.base, records.scratch}


# -- 6. buildctl's shape -------------------------------------------------------------------------


class TestBuildctlShape:
    def test_du_table_sorted_largest_first_with_buildctl_sizes(self, records: Records) -> None:
        proc = cli(records.root, "du")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].split()[:5] == ["ID", "RECLAIMABLE", "SIZE", "LAST", "ACCESSED"]
        assert lines[0].rstrip().endswith("DESCRIPTION")
        doc = json.loads(cli(records.root, "du", "--format", "json").stdout)
        sizes = {r["id"]: r["size"] for r in doc["records"]}
        body = lines[1:4]
        ids = [line.split()[0].rstrip("*") for line in body]
        assert ids == sorted(sizes, key=lambda i: (sizes[i], i), reverse=True)
        assert body[ids.index(records.scratch)].split()[0] == records.scratch + "*"  # mutable
        for line in body:
            assert re.fullmatch(r"\d+(\.\d+)?(B|kB|MB)", line.split()[2]), line
            assert line.split()[1] == "true"
        assert "build step" in body[ids.index(records.step)]
        # Nothing shared: no Shared/Private lines (buildctl prints them only then).
        assert lines[4:] == [
            f"Reclaimable:\t{format_bytes(doc['totals']['reclaimable'])}",
            f"Total:\t\t{format_bytes(doc['totals']['total'])}",
        ]

    def test_shared_and_private_lines_only_when_something_is_shared(self) -> None:
        def info(rid: str, size: int, *, shared: bool, in_use: bool = False) -> UsageInfo:
            return UsageInfo(rid, False, in_use, size, 1, None, 0, (), "", "regular", shared)

        rows = [info("a", 2000, shared=False), info("b", 1_500_000, shared=True, in_use=True)]
        lines = usage_lines(rows)
        assert lines[1].split()[:3] == ["b", "false", "1.5MB*"]  # * marks a shared size
        assert lines[2].split()[:3] == ["a", "true", "2kB"]
        assert lines[3:] == [
            "Shared:\t\t1.5MB",
            "Private:\t2kB",
            "Reclaimable:\t2kB",
            "Total:\t\t1.5MB",
        ]
        assert "Shared:" not in "\n".join(usage_lines(rows[:1]))
        same = [
            info("x", 10, shared=False),
            info("z", 10, shared=False),
            info("y", 99, shared=False),
        ]
        assert [r.id for r in sort_usage(same)] == ["y", "z", "x"]  # ties: id, descending

    def test_du_verbose_leaves_out_empty_fields(self, records: Records) -> None:
        proc = cli(records.root, "du", "-v", "--filter", "description~=^build")
        assert proc.returncode == 0, proc.stderr
        assert f"ID:\t\t{records.step}\n" in proc.stdout
        assert f"Parents:\t{records.base}\n" in proc.stdout
        assert "Description:\tbuild step\n" in proc.stdout
        proc = cli(records.root, "du", "-v", "--filter", f"id=={records.base}")
        assert "Parents:" not in proc.stdout

    def test_prune_prints_total_always_and_the_table_with_verbose(self, records: Records) -> None:
        proc = cli(records.root, "prune", "-f", "--filter", f"id=={records.scratch}")
        assert proc.returncode == 0, proc.stderr
        assert re.fullmatch(r"Total:\t\t\d+(\.\d+)?(B|kB|MB)\n", proc.stdout)
        assert "1/1 records" in proc.stderr  # the progress bar
        proc = cli(records.root, "prune", "-f", "-v")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].split()[:2] == ["ID", "RECLAIMABLE"]
        assert [line.split()[0] for line in lines[1:3]] == [records.step, records.base]
        assert lines[3].startswith("Total:\t\t")

    def test_dry_run_lists_in_deletion_order(self, records: Records) -> None:
        proc = cli(records.root, "prune", "--dry-run")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        listed = [line.split()[0].rstrip("*") for line in lines[1:4]]
        assert sorted(listed) == sorted(records.ids)
        assert listed.index(records.step) < listed.index(records.base)  # child first
        assert lines[4].startswith("Total:\t\t")
        assert lines[5] == "dry run: 3 records would be deleted; nothing was changed"

    def test_keep_storage_has_buildctls_meaning(self, records: Records) -> None:
        def planned(*args: str) -> int:
            proc = cli(records.root, "prune", "--dry-run", "--format", "json", *args)
            assert proc.returncode == 0, proc.stderr
            return int(json.loads(proc.stdout)["count"])

        # buildctl: a number of MB to keep (--reserved-space): 1 MB keeps this whole cache.
        assert planned("--keep-storage", "1") == 0
        assert planned("--reserved-space", "1MB") == 0
        assert planned("--keep-storage", "1kB") == planned("--reserved-space", "1kB") > 0
        assert_user_error(
            cli(records.root, "prune", "--keep-storage", "1", "--reserved-space", "1MB"),
            "--keep-storage is the older name of --reserved-space",
        )

    def test_json_for_du_prune_check_and_inspect(self, records: Records) -> None:
        doc = json.loads(cli(records.root, "du", "--format", "json").stdout)
        assert [r["id"] for r in doc["records"]] == [
            r.id for r in sort_usage([UsageInfo(**r) for r in doc["records"]])
        ]
        total = sum(r["size"] for r in doc["records"])
        assert doc["totals"] == {
            "shared": 0,
            "private": total,
            "reclaimable": total,
            "total": total,
        }

        doc = json.loads(cli(records.root, "inspect", records.base, "--format", "json").stdout)
        assert doc["children"] == [records.step]
        assert doc["metadata"]["cache.description"] == "base image"

        doc = json.loads(cli(records.root, "check", "--format", "json").stdout)
        assert doc == {
            "root": str(records.root),
            "consistent": True,
            "problems": [],
            "fixed": [],
            "pending_removals": [],
            "trash": {"entries": 0, "bytes": 0},
        }

        dry = json.loads(cli(records.root, "prune", "--dry-run", "--format", "json").stdout)
        assert dry["dry_run"] is True
        assert dry["count"] == 3
        proc = cli(records.root, "prune", "-f", "--format", "json")
        assert proc.returncode == 0, proc.stderr
        done = json.loads(proc.stdout)
        assert done["dry_run"] is False
        assert [r["id"] for r in done["records"]] == [r["id"] for r in dry["records"]]
        assert done["total"] == sum(r["size"] for r in done["records"]) > 0

    def test_version(self, tmp_path: Path) -> None:
        proc = run("--version", cwd=tmp_path)
        assert proc.returncode == 0
        assert re.fullmatch(r"refcache \d+\.\d+\.\d+\S*\n", proc.stdout), proc.stdout

    def test_busy_is_a_failure_and_a_usage_error_is_not(
        self, records: Records, held_open: Cache
    ) -> None:
        assert_failure(cli(records.root, "prune", "-f"), "the cache is busy")
        assert_failure(cli(records.root, "check", "--fix"), "the cache is busy")
        assert_user_error(cli(records.root, "prune", "--max-used-space", "x"), "invalid size")
        proc = cli(records.root, "du", "--no-such-option")
        assert proc.returncode == 2
        assert "unrecognized arguments: --no-such-option" in proc.stderr


# -- terminal-safe output ------------------------------------------------------------------------


EVIL = "evil\x1b]0;pwned\x07\x1b[2K\r\nfakeid      true  1B  forged\u202eexe.txt\x9b31m"


class TestTerminalSafety:
    @pytest.fixture
    def evil(self, tmp_path: Path) -> tuple[Path, str]:
        root = tmp_path / "evil"
        [rid] = _many(root, 1, description=EVIL)
        return root, rid

    def test_no_control_character_reaches_the_terminal(self, evil: tuple[Path, str]) -> None:
        root, rid = evil
        escaped = safe(EVIL)
        assert escaped == (
            "evil\\x1b]0;pwned\\x07\\x1b[2K\\x0d\\x0afakeid      true  1B  "
            "forged\\u202eexe.txt\\x9b31m"
        )
        for args in (
            ("du",),
            ("du", "-v"),
            ("inspect", rid),
            ("prune", "--dry-run"),
            ("prune", "--dry-run", "-v"),
        ):
            proc = cli(root, *args)
            assert proc.returncode == 0, proc.stderr
            for ch in "\x1b\x07\r\u202e\x9b":
                assert ch not in proc.stdout, (args, ch)
            assert not any(line.startswith("fakeid") for line in proc.stdout.splitlines())
            assert escaped in proc.stdout or repr(EVIL)[1:-1] in proc.stdout, args
        doc = json.loads(cli(root, "du", "--format", "json").stdout)
        assert doc["records"][0]["description"] == EVIL  # JSON keeps the value exactly
        code, output = _run_in_pty(
            [*_command(), "--root", str(root), "prune", "-v"], root.parent, b"y\n"
        )
        assert code == 0, output
        assert "\x1b" not in output
        assert "\x07" not in output


# -- a cache open in another process -------------------------------------------------------------


class TestOpenElsewhere:
    def test_read_only_commands_work_and_prune_refuses(
        self, records: Records, held_open: Cache
    ) -> None:
        root = records.root
        assert record_ids(root) == records.ids
        proc = cli(root, "inspect", records.step)
        assert proc.returncode == 0, proc.stderr
        assert f"ID:              {records.step}" in proc.stdout
        assert_consistent(root)
        proc = cli(root, "prune", "--dry-run")
        assert proc.returncode == 0, proc.stderr
        assert "Total:" in proc.stdout
        line = assert_failure(cli(root, "prune", "-f"), "the cache is busy")
        assert "du, inspect and check work while it is open" in line
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

    def test_unknown_id_is_a_failure(self, records: Records) -> None:
        assert_failure(cli(records.root, "inspect", "nosuchrecord"), "not found")


def test_python_m_runs_the_same_program(records: Records) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "refcache.actors._cli", "du", "--root", str(records.root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ID ")


def test_smoke_creates_a_cache(tmp_path: Path) -> None:
    proc = cli(tmp_path / "fresh", "smoke")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("committed ")
    assert "Reclaimable:" in proc.stdout
    assert (tmp_path / "fresh" / "meta").is_dir()
