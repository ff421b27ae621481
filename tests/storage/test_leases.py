"""The LMDB lease manager, ported from containerd's TestLeases, TestLeasesList and
TestLeaseResource, plus BuildKit's temporary leases and expiry."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import msgpack
import pytest
from refcache.storage._env import DB_LEASE_RESOURCES, DB_LEASES, MetaEnv
from refcache.storage._errors import (
    AlreadyExistsError,
    CorruptMetadataError,
    InvalidError,
    NotFoundError,
)
from refcache.storage._leases import (
    LABEL_GC_EXPIRE,
    LABEL_GC_FLAT,
    LABEL_LEASE_TEMPORARY,
    Lease,
    LeaseManager,
    LmdbLeaseManager,
    Resource,
    expired,
    format_rfc3339,
    new_lease_id,
    parse_rfc3339,
)

DIGEST = "sha256:29f5d56d12684887bdfa50dcd29fc31eea4aaf4ad3bec43daf19026a7ce69912"
SNAPSHOT_KEY = "RstMI3X8vguKoPFkmIStZ5fQFI7F1L0o"


@pytest.fixture
def lm(env: MetaEnv) -> LmdbLeaseManager:
    return LmdbLeaseManager(env)


def _raw_state(env: MetaEnv) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    with env.read_txn() as txn:
        return list(txn.items(DB_LEASES)), list(txn.keys(DB_LEASE_RESOURCES))


# -- TestLeases -------------------------------------------------------------------------------


def test_lmdb_lease_manager_satisfies_the_protocol(lm: LmdbLeaseManager) -> None:
    assert isinstance(lm, LeaseManager)


def test_leases_are_created_listed_and_deleted(env: MetaEnv, lm: LmdbLeaseManager) -> None:
    created: list[Lease] = []
    for lease_id, create_error in (("tx1", None), ("tx1", AlreadyExistsError), ("tx2", None)):
        with env.write_txn() as txn:
            if create_error is None:
                created.append(lm.create(lease_id, txn=txn))
            else:
                with pytest.raises(create_error, match="'tx1' already exists"):
                    lm.create(lease_id, txn=txn)

    listed = lm.list()
    assert [lease.id for lease in listed] == ["tx1", "tx2"]
    assert [lease.created_at for lease in listed] == [lease.created_at for lease in created]
    assert listed == created

    lm.delete("tx1")
    with pytest.raises(NotFoundError, match="'tx1' not found"):
        lm.delete("tx1")
    lm.delete("tx2")
    assert lm.list() == []


def test_get_returns_the_stored_lease_and_rejects_unknown_ids(lm: LmdbLeaseManager) -> None:
    made = lm.create("l1", labels={"a": "b"})
    got = lm.get("l1")
    assert got == made
    assert dict(got.labels) == {"a": "b"}
    with pytest.raises(NotFoundError, match="'nope' not found"):
        lm.get("nope")


@pytest.mark.parametrize("bad_id", ["", None, 7, "a\x00b", "x" * 300])
def test_create_requires_a_valid_id_and_writes_nothing(
    env: MetaEnv, lm: LmdbLeaseManager, bad_id: object
) -> None:
    before = _raw_state(env)
    with pytest.raises(InvalidError, match="lease id"):
        lm.create(bad_id)  # type: ignore[arg-type]
    assert _raw_state(env) == before


def test_a_lease_created_in_a_failed_caller_transaction_does_not_exist(
    env: MetaEnv, lm: LmdbLeaseManager
) -> None:
    class BoomError(Exception):
        pass

    def create_then_fail() -> None:
        with env.write_txn() as txn:
            lm.create("rolled-back", txn=txn)
            lm.add_resource("rolled-back", Resource(DIGEST, "content"), txn=txn)
            raise BoomError

    with pytest.raises(BoomError):
        create_then_fail()
    assert lm.list() == []
    assert _raw_state(env) == ([], [])


def test_labels_with_empty_values_are_not_stored(lm: LmdbLeaseManager) -> None:
    made = lm.create("l1", labels={"keep": "v", "drop": ""})
    assert dict(made.labels) == {"keep": "v"}
    assert dict(lm.get("l1").labels) == {"keep": "v"}


@pytest.mark.parametrize(
    "labels",
    [
        {"k": 1},
        {1: "v"},
        {"": "v"},
        {"k": "v" * 4096},
        ["not", "a", "mapping"],
    ],
)
def test_bad_labels_are_rejected_and_nothing_is_written(
    env: MetaEnv, lm: LmdbLeaseManager, labels: object
) -> None:
    with pytest.raises(InvalidError, match="lease 'l1'"):
        lm.create("l1", labels=labels)  # type: ignore[arg-type]
    assert _raw_state(env) == ([], [])


def test_flat_and_temporary_leases_carry_their_labels(lm: LmdbLeaseManager) -> None:
    lease = lm.create("l1", flat=True, temporary=True)
    assert lease.flat
    assert lease.temporary
    assert set(lease.labels) == {LABEL_GC_FLAT, LABEL_LEASE_TEMPORARY}
    # BuildKit writes a timestamp as the value; any value counts.
    assert parse_rfc3339(lease.labels[LABEL_GC_FLAT]) is not None
    plain = lm.create("l2")
    assert not plain.flat
    assert not plain.temporary
    assert plain.expires_at is None


def test_the_stored_record_has_the_documented_layout(env: MetaEnv, lm: LmdbLeaseManager) -> None:
    lease = lm.create("l1", labels={"a": "b"})
    lm.add_resource("l1", Resource(DIGEST, "content"))
    with env.read_txn() as txn:
        raw = txn.get(DB_LEASES, b"l1")
        keys = list(txn.keys(DB_LEASE_RESOURCES))
    assert raw is not None
    assert msgpack.unpackb(raw) == {"created_at": lease.created_at, "labels": {"a": "b"}}
    assert keys == [b"l1\x00content\x00" + DIGEST.encode()]


def test_corrupt_lease_records_raise_corrupt_metadata_error(
    env: MetaEnv, lm: LmdbLeaseManager
) -> None:
    with env.write_txn() as txn:
        txn.put(DB_LEASES, b"bad", b"\xc1")
        txn.put(DB_LEASES, b"worse", msgpack.packb({"created_at": "x", "labels": {}}))
    with pytest.raises(CorruptMetadataError, match="'bad'"):
        lm.get("bad")
    with pytest.raises(CorruptMetadataError, match="'worse'"):
        lm.get("worse")
    with pytest.raises(CorruptMetadataError):
        lm.list()


def test_leases_can_be_listed_from_a_read_only_environment(tmp_path: Path) -> None:
    with MetaEnv(tmp_path / "meta") as env:
        LmdbLeaseManager(env).create("l1", labels={"a": "b"})
    with MetaEnv(tmp_path / "meta", readonly=True) as ro:
        assert [lease.id for lease in LmdbLeaseManager(ro).list()] == ["l1"]


def test_new_lease_ids_have_containerds_random_id_shape() -> None:
    first, second = new_lease_id(), new_lease_id()
    assert re.fullmatch(r"\d+-[A-Za-z0-9_-]{4}", first)
    assert first != second


# -- TestLeasesList ---------------------------------------------------------------------------


@pytest.fixture
def listed(lm: LmdbLeaseManager) -> LmdbLeaseManager:
    lm.create("lease1", labels={"label1": "value1", "label3": "other"})
    lm.create("lease2", labels={"label1": "value1", "label2": "", "label3": "other"})
    lm.create("lease3", labels={"label1": "value2", "label2": "something"})
    return lm


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        pytest.param((), ["lease1", "lease2", "lease3"], id="All"),
        pytest.param(("id==lease1",), ["lease1"], id="ID"),
        pytest.param(("id==lease1", "id==lease2"), ["lease1", "lease2"], id="IDx2"),
        pytest.param(("labels.label1",), ["lease1", "lease2", "lease3"], id="Label1"),
        pytest.param(("labels.label1==value1",), ["lease1", "lease2"], id="Label1value1"),
        pytest.param(("labels.label1==value2",), ["lease3"], id="Label1value2"),
        pytest.param(("labels.label2",), ["lease3"], id="Label2"),
        pytest.param(
            ("labels.label2", "labels.label3"), ["lease1", "lease2", "lease3"], id="Label3"
        ),
        pytest.param(("labels.label1==value1,labels.label3==other",), ["lease1", "lease2"]),
        pytest.param(("id~=^lease[23]$",), ["lease2", "lease3"], id="regex"),
        pytest.param(("labels.nothere",), [], id="missing-label"),
    ],
)
def test_leases_are_listed_by_filter(
    listed: LmdbLeaseManager, filters: tuple[str, ...], expected: list[str]
) -> None:
    assert [lease.id for lease in listed.list(*filters)] == expected


def test_filters_on_quoted_label_keys_find_buildkit_temporary_leases(
    lm: LmdbLeaseManager,
) -> None:
    lm.create("tmp", temporary=True)
    lm.create("keep")
    assert [lease.id for lease in lm.list('labels."buildkit/lease.temporary"')] == ["tmp"]


def test_a_bad_filter_raises_invalid_error(listed: LmdbLeaseManager) -> None:
    with pytest.raises(InvalidError, match="invalid filter"):
        listed.list("labels.label1==")


# -- TestLeaseResource -------------------------------------------------------------------------


GOOD_RESOURCES = [
    Resource(DIGEST, "content"),
    Resource("d2UgYXJlIGJ1aWxka2l0", "ingests"),
    Resource(SNAPSHOT_KEY, "snapshots/overlayfs"),
]


@pytest.mark.parametrize(
    ("resource", "match"),
    [
        pytest.param(Resource("HMemOhlygombYhkhHhAZj5aRbDy2a3z2", "snapshots"), "snapshot"),
        pytest.param(
            Resource("HMemOhlygombYhkhHhAZj5aRbDy2a3z2", "snapshots/overlayfs/type1"),
            "snapshot",
        ),
        pytest.param(Resource("HMemOhlygombYhkhHhAZj5aRbDy2a3z2", "snapshots/"), "snapshot"),
        pytest.param(Resource("HMemOhlygombYhkhHhAZj5aRbDy2a3z2", "type2"), "not supported"),
        pytest.param(Resource("image1", "images"), "not supported"),
        pytest.param(Resource("sha256:1234", "content"), "invalid content resource id"),
        pytest.param(Resource(DIGEST, "content/x"), "invalid resource type"),
        pytest.param(Resource("ref", "ingests/x"), "invalid resource type"),
        pytest.param(Resource("", "ingests"), "invalid ingests resource id"),
        pytest.param(Resource("a\x00b", "snapshots/native"), "resource id"),
        pytest.param(Resource("k" * 600, "snapshots/native"), "too long"),
        pytest.param(Resource(7, "ingests"), "str id"),  # type: ignore[arg-type]
    ],
)
def test_invalid_resources_are_rejected_and_nothing_changes(
    env: MetaEnv, lm: LmdbLeaseManager, resource: Resource, match: str
) -> None:
    lm.create("l1")
    lm.add_resource("l1", GOOD_RESOURCES[0])
    before = _raw_state(env)
    with pytest.raises(InvalidError, match=match):
        lm.add_resource("l1", resource)
    with pytest.raises(InvalidError, match=match):
        lm.delete_resource("l1", resource)
    assert _raw_state(env) == before


def test_resources_of_a_missing_lease_raise_not_found(lm: LmdbLeaseManager) -> None:
    lm.create("l1")
    with pytest.raises(NotFoundError, match="'non-found'"):
        lm.add_resource("non-found", GOOD_RESOURCES[2])
    with pytest.raises(NotFoundError, match="'non-found'"):
        lm.delete_resource("non-found", GOOD_RESOURCES[2])
    with pytest.raises(NotFoundError, match="'non-found'"):
        lm.list_resources("non-found")


def test_resources_are_added_listed_in_containerd_order_and_deleted(
    lm: LmdbLeaseManager,
) -> None:
    lm.create("l1")
    for resource in reversed(GOOD_RESOURCES):
        lm.add_resource("l1", resource)
    lm.add_resource("l1", GOOD_RESOURCES[0])  # adding twice is a no-op
    assert lm.list_resources("l1") == GOOD_RESOURCES

    for resource in GOOD_RESOURCES:
        lm.delete_resource("l1", resource)
    lm.delete_resource("l1", GOOD_RESOURCES[0])  # deleting a missing link is a no-op
    assert lm.list_resources("l1") == []


def test_a_resource_need_not_exist_to_be_leased(lm: LmdbLeaseManager) -> None:
    # BuildKit adds the snapshot resource before the snapshot is created.
    lm.create("l1")
    lm.add_resource("l1", Resource("not-created-yet", "snapshots/native"))
    assert lm.list_resources("l1") == [Resource("not-created-yet", "snapshots/native")]


def test_deleting_a_lease_deletes_its_links_but_not_those_of_similar_ids(
    env: MetaEnv, lm: LmdbLeaseManager
) -> None:
    for lease_id in ("l1", "l10", "l1-view"):
        lm.create(lease_id)
        lm.add_resource(lease_id, Resource(f"{lease_id}-snap", "snapshots/native"))
    lm.delete("l1")
    with pytest.raises(NotFoundError):
        lm.list_resources("l1")
    lm.create("l1")
    assert lm.list_resources("l1") == []
    assert lm.list_resources("l10") == [Resource("l10-snap", "snapshots/native")]
    assert lm.list_resources("l1-view") == [Resource("l1-view-snap", "snapshots/native")]


def test_resources_join_a_caller_transaction(env: MetaEnv, lm: LmdbLeaseManager) -> None:
    with env.write_txn() as txn:
        lm.create("rec", flat=True, txn=txn)
        lm.add_resource("rec", Resource("rec", "snapshots/native"), txn=txn)
        # Reads can see the transaction's own writes.
        assert lm.list_resources("rec", txn=txn) == [Resource("rec", "snapshots/native")]
        assert lm.get("rec", txn=txn).flat
        lm.delete_resource("rec", Resource("rec", "snapshots/native"), txn=txn)
        lm.delete("rec", synchronous=True, txn=txn)
    assert lm.list() == []


# -- temporary leases ---------------------------------------------------------------------------


def test_temporary_leases_are_deleted_when_the_cache_is_opened_again(tmp_path: Path) -> None:
    with MetaEnv(tmp_path / "meta") as env:
        lm = LmdbLeaseManager(env)
        lm.create("rec")
        lm.create("rec-view", flat=True, temporary=True)
        lm.add_resource("rec-view", Resource("rec-view", "snapshots/native"))
        lm.create("extract", temporary=True, expire=timedelta(hours=1))
        lm.create("manual", labels={LABEL_LEASE_TEMPORARY: "2024-01-01T00:00:00Z"})

    with MetaEnv(tmp_path / "meta") as env:
        lm = LmdbLeaseManager(env)
        assert lm.delete_temporary() == 3
        assert [lease.id for lease in lm.list()] == ["rec"]
        with env.read_txn() as txn:
            assert list(txn.keys(DB_LEASE_RESOURCES)) == []
        assert lm.delete_temporary() == 0


# -- expiry -----------------------------------------------------------------------------------


def test_a_lease_expires_strictly_after_its_expiry_time(lm: LmdbLeaseManager) -> None:
    at = datetime(2030, 5, 6, 7, 8, 9, tzinfo=UTC)
    lease = lm.create("l1", expire=at)
    assert lease.labels[LABEL_GC_EXPIRE] == "2030-05-06T07:08:09Z"
    assert lease.expires_at == at
    assert not expired(lease, at)
    assert not expired(lease, at - timedelta(seconds=1))
    assert expired(lease, at + timedelta(microseconds=1))


def test_expiry_given_as_a_duration_is_counted_from_now(lm: LmdbLeaseManager) -> None:
    before = datetime.now(UTC)
    lease = lm.create("l1", expire=timedelta(hours=1))
    after = datetime.now(UTC)
    assert lease.expires_at is not None
    assert before + timedelta(hours=1) <= lease.expires_at <= after + timedelta(hours=1)
    assert not expired(lease)
    assert expired(lease, after + timedelta(hours=2))


def test_expiry_overrides_an_expire_label_and_converts_to_utc(lm: LmdbLeaseManager) -> None:
    zone = timezone(timedelta(hours=2))
    lease = lm.create(
        "l1",
        labels={LABEL_GC_EXPIRE: "2000-01-01T00:00:00Z"},
        expire=datetime(2030, 1, 1, 2, 0, 0, 500, tzinfo=zone),
    )
    assert lease.labels[LABEL_GC_EXPIRE] == "2030-01-01T00:00:00.000500Z"


@pytest.mark.parametrize("bad", [datetime(2030, 1, 1), 3600, "1h"])
def test_bad_expiry_values_are_rejected(env: MetaEnv, lm: LmdbLeaseManager, bad: object) -> None:
    with pytest.raises(InvalidError, match="'l1'"):
        lm.create("l1", expire=bad)  # type: ignore[arg-type]
    assert _raw_state(env) == ([], [])


@pytest.mark.parametrize(
    "value",
    ["tomorrow", "2030-01-01", "2030-01-01T00:00:00", "2030-01-01 00:00:00Z", ""],
)
def test_an_unparsable_expiry_never_expires(value: str) -> None:
    lease = Lease("l1", labels={LABEL_GC_EXPIRE: value})
    assert lease.expires_at is None
    assert not expired(lease, datetime(2999, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2030-01-02T03:04:05Z", datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2030-01-02T03:04:05.123456789Z", datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)),
        (
            "2030-01-02T05:04:05+02:00",
            datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
        ),
    ],
)
def test_rfc3339_times_parse_like_go(text: str, expected: datetime) -> None:
    assert parse_rfc3339(text) == expected


def test_formatting_a_naive_datetime_is_refused() -> None:
    with pytest.raises(InvalidError, match="no time zone"):
        format_rfc3339(datetime(2030, 1, 1))


def test_cleanup_expired_deletes_only_expired_leases_and_their_links(
    lm: LmdbLeaseManager,
) -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    lm.create("old", expire=now - timedelta(seconds=1))
    lm.add_resource("old", Resource(DIGEST, "content"))
    lm.create("young", expire=now + timedelta(seconds=1))
    lm.create("forever")
    assert lm.cleanup_expired(now) == 1
    assert [lease.id for lease in lm.list()] == ["forever", "young"]
    lm.create("old")
    assert lm.list_resources("old") == []


def test_expiry_checks_refuse_a_naive_now() -> None:
    with pytest.raises(InvalidError, match="no time zone"):
        expired(Lease("l1"), datetime(2030, 1, 1))
