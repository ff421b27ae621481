"""Record metadata store: ports of BuildKit's metadata tests plus LMDB-specific cases."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from storage._env import DB_INDEX, DB_RECORDS, MetaEnv
from storage._errors import CorruptMetadataError, InvalidError, NotFoundError
from storage._metadata import (
    INDEX_CHAIN,
    KEY_CREATED_AT,
    KEY_DESCRIPTION,
    KEY_IMAGE_REFS,
    KEY_SIZE,
    MetadataStore,
)


def last_txnid(env: MetaEnv) -> int:
    return int(env._env.info()["last_txnid"])


@pytest.fixture
def store(env: MetaEnv) -> MetadataStore:
    return MetadataStore(env)


def test_get_set_search_round_trip_survives_reopen(tmp_path: Path) -> None:
    # BuildKit TestGetSetSearch.
    env = MetaEnv(tmp_path / "meta")
    store = MetadataStore(env)
    item = store.get("foo")
    assert not item.exists
    assert item.get("bar") is None

    item.queue("bar", "foobar")
    assert item.get("bar") == "foobar"  # queued writes are visible at once
    item.commit()
    assert store.get("foo").get("bar") == "foobar"
    env.close()

    env = MetaEnv(tmp_path / "meta")
    store = MetadataStore(env)
    item = store.get("foo")
    assert item.exists
    assert item.get("bar") == "foobar"

    store.get("foo2").set("bar2", "foobar2")
    assert [i.id for i in store.all()] == ["foo", "foo2"]

    assert store.clear("foo")
    assert [i.id for i in store.all()] == ["foo2"]
    assert not store.get("foo").exists
    env.close()


def test_indexes_exact_search_and_clear(store: MetadataStore) -> None:
    # BuildKit TestIndexes.
    for record_id, tag in (("foo1", "tag:baz"), ("foo2", "tag:bax"), ("foo3", "tag:baz")):
        store.get(record_id).set("tag", tag, index=tag)

    assert [i.id for i in store.search("tag:baz")] == ["foo1", "foo3"]
    assert [i.id for i in store.search("tag:bax")] == ["foo2"]
    assert [i.id for i in store.search("tag:ba", prefix=True)] == ["foo2", "foo1", "foo3"]
    assert store.search("tag:ba") == []

    store.clear("foo1")
    assert [i.id for i in store.search("tag:baz")] == ["foo3"]


def test_changing_or_deleting_an_indexed_value_moves_its_index_entry(
    store: MetadataStore,
) -> None:
    item = store.get("rec")
    item.set("cache.chainID", "sha256:aa", index=INDEX_CHAIN + "sha256:aa")
    item.set("cache.chainID", "sha256:bb", index=INDEX_CHAIN + "sha256:bb")
    assert store.search(INDEX_CHAIN + "sha256:aa") == []
    assert [i.id for i in store.search(INDEX_CHAIN + "sha256:bb")] == ["rec"]

    item.set("cache.chainID", None)
    assert store.search(INDEX_CHAIN, prefix=True) == []
    assert item.get("cache.chainID") is None


def test_external_data_round_trip_and_clear(store: MetadataStore) -> None:
    # BuildKit TestExternalData.
    item = store.get("foo")
    item.set_external("ext1", b"foo")
    assert store.get("foo").get_external("ext1") == b"foo"

    with pytest.raises(NotFoundError, match="'ext1' for record 'bar'"):
        store.get("bar").get_external("ext1")

    item.set("k", 1)
    store.clear("foo")
    with pytest.raises(NotFoundError):
        store.get("foo").get_external("ext1")


def test_empty_commit_touches_nothing(env: MetaEnv, store: MetadataStore) -> None:
    item = store.get("rec")
    item.set("a", 1)
    before = last_txnid(env)
    item.commit()
    store.commit_many([item, store.get("other")])
    assert last_txnid(env) == before


def test_commit_many_writes_every_item_in_one_transaction(
    env: MetaEnv, store: MetadataStore
) -> None:
    items = [store.get(f"r{i}") for i in range(50)]
    for n, item in enumerate(items):
        item.queue(KEY_SIZE, n)
    before = last_txnid(env)
    store.commit_many(items)
    assert last_txnid(env) == before + 1
    assert [store.get(f"r{i}").get_int(KEY_SIZE) for i in range(50)] == list(range(50))
    assert not any(item.dirty for item in items)


def test_unknown_keys_are_preserved_on_read_and_write(store: MetadataStore) -> None:
    doc = {"f": {"future.key": {"nested": [1, 2]}, KEY_DESCRIPTION: "old"}, "x-extra": True}
    store.put_raw("rec", msgpack.packb(doc))
    item = store.get("rec")
    assert item.get("future.key") == {"nested": [1, 2]}
    item.set(KEY_DESCRIPTION, "new")
    again = store.get("rec")
    assert again.get("future.key") == {"nested": [1, 2]}
    assert again.get_str(KEY_DESCRIPTION) == "new"


def test_two_items_of_one_record_do_not_undo_each_other(store: MetadataStore) -> None:
    first, second = store.get("rec"), store.get("rec")
    first.set("a", 1)
    second.set("b", 2)
    merged = store.get("rec")
    assert (merged.get("a"), merged.get("b")) == (1, 2)


def test_writes_in_a_rolled_back_transaction_stay_queued(
    env: MetaEnv, store: MetadataStore
) -> None:
    item = store.get("rec")
    item.queue("a", 1)
    with pytest.raises(RuntimeError, match="boom"), env.write_txn() as txn:
        item.commit(txn=txn)
        raise RuntimeError("boom")
    assert not store.exists("rec")
    assert item.dirty
    assert item.get("a") == 1
    item.commit()
    assert store.get("rec").get("a") == 1


def test_append_strings_deduplicates_and_skips_needless_writes(
    env: MetaEnv, store: MetadataStore
) -> None:
    item = store.get("rec")
    assert item.append_strings(KEY_IMAGE_REFS, ["a", "b", "a"])
    item.commit()
    before = last_txnid(env)
    assert not item.append_strings(KEY_IMAGE_REFS, ["b"])
    item.commit()
    assert last_txnid(env) == before
    assert item.append_strings(KEY_IMAGE_REFS, ["c"])
    item.commit()
    assert store.get("rec").get_str_list(KEY_IMAGE_REFS) == ["a", "b", "c"]


def test_corrupt_msgpack_names_the_record_and_spares_the_others(
    store: MetadataStore,
) -> None:
    store.get("good1").set(KEY_CREATED_AT, 1)
    store.put_raw("bad", b"\xc1\xff not msgpack")
    store.get("good2").set(KEY_CREATED_AT, 2)

    items = store.all()
    assert [i.id for i in items] == ["bad", "good1", "good2"]
    with pytest.raises(CorruptMetadataError, match="'bad'") as info:
        items[0].decode()
    assert info.value.record_id == "bad"
    assert info.value.key is None
    assert [i.get_int(KEY_CREATED_AT) for i in items[1:]] == [1, 2]


def test_value_of_the_wrong_type_names_record_and_key(store: MetadataStore) -> None:
    store.put_raw("rec", msgpack.packb({"f": {KEY_SIZE: "big", KEY_CREATED_AT: True}}))
    item = store.get("rec")
    with pytest.raises(CorruptMetadataError, match=r"'snapshot\.size' of record 'rec'") as info:
        item.get_int(KEY_SIZE)
    assert (info.value.record_id, info.value.key) == ("rec", KEY_SIZE)
    with pytest.raises(CorruptMetadataError, match=r"cache\.createdAt"):
        item.get_int(KEY_CREATED_AT)  # a bool is not an integer here


def test_clear_removes_a_corrupt_record_and_its_index_entries(
    env: MetaEnv, store: MetadataStore
) -> None:
    store.get("rec").set("tag", "v", index="tag:v")
    store.put_raw("rec", b"\xc1")
    assert store.clear("rec")
    with env.read_txn() as txn:
        assert txn.count(DB_RECORDS) == 0
        assert txn.count(DB_INDEX) == 0


@pytest.mark.parametrize("bad", ["", "a\x00b", "a::b", 7, None, "x" * 513])
def test_invalid_record_ids_are_rejected_and_change_nothing(
    env: MetaEnv, store: MetadataStore, bad: object
) -> None:
    before = last_txnid(env)
    with pytest.raises(InvalidError, match="invalid record id"):
        store.get(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidError):
        store.clear(bad)  # type: ignore[arg-type]
    assert last_txnid(env) == before


def test_unstorable_values_and_bad_keys_are_rejected_before_queueing(
    store: MetadataStore,
) -> None:
    item = store.get("rec")
    with pytest.raises(InvalidError, match="'k' of record 'rec' cannot be stored"):
        item.queue("k", object())
    with pytest.raises(InvalidError, match="invalid metadata key"):
        item.queue("", 1)
    with pytest.raises(InvalidError, match="invalid index"):
        item.queue("k", 1, index="")
    with pytest.raises(InvalidError, match="must be bytes"):
        item.set_external("e", "text")  # type: ignore[arg-type]
    assert not item.dirty
    assert not store.exists("rec")
