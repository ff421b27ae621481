"""Record metadata store: ports of BuildKit's metadata tests plus LMDB-specific cases."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import msgpack
import pytest
from refcache.storage._env import DB_INDEX, DB_RECORDS, MetaEnv
from refcache.storage._errors import CorruptMetadataError, InvalidError, NotFoundError
from refcache.storage._metadata import (
    INDEX_CHAIN,
    KEY_CHAIN_ID,
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


# -- write_many: the bulk write path --------------------------------------------------------


def index_keys(env: MetaEnv) -> list[bytes]:
    with env.read_txn() as txn:
        return list(txn.keys(DB_INDEX))


def test_write_many_creates_records_and_indexes_in_one_transaction(
    env: MetaEnv, store: MetadataStore
) -> None:
    before = last_txnid(env)
    store.write_many(
        {
            "r1": {KEY_SIZE: 1, KEY_CHAIN_ID: "sha256:aa", KEY_IMAGE_REFS: ["img"]},
            "r2": {KEY_SIZE: 2, KEY_CHAIN_ID: "sha256:bb"},
        },
        {"r1": {KEY_CHAIN_ID: INDEX_CHAIN + "sha256:aa"}},
    )
    assert last_txnid(env) == before + 1
    r1, r2 = store.get_many(["r1", "r2"])
    assert (r1.get_int(KEY_SIZE), r1.get_str_list(KEY_IMAGE_REFS)) == (1, ["img"])
    assert r1.index_of(KEY_CHAIN_ID) == INDEX_CHAIN + "sha256:aa"
    assert (r2.get_int(KEY_SIZE), r2.index_of(KEY_CHAIN_ID)) == (2, None)
    assert [i.id for i in store.search(INDEX_CHAIN, prefix=True)] == ["r1"]


def test_write_many_merges_key_by_key_like_queued_writes(
    env: MetaEnv, store: MetadataStore
) -> None:
    store.put_raw("rec", msgpack.packb({"f": {"future.key": [1, {"x": 2}], "a": 1, "b": 2}}))
    item = store.get("rec")
    item.set(KEY_CHAIN_ID, "sha256:aa", index=INDEX_CHAIN + "sha256:aa")

    store.write_many(
        {"rec": {"a": 10, "b": None, KEY_CHAIN_ID: "sha256:bb"}},
        {"rec": {KEY_CHAIN_ID: INDEX_CHAIN + "sha256:bb"}},
    )
    again = store.get("rec")
    assert again.keys() == ["a", KEY_CHAIN_ID, "future.key"]
    assert (again.get("a"), again.get("future.key")) == (10, [1, {"x": 2}])
    assert index_keys(env) == [INDEX_CHAIN.encode() + b"sha256:bb::rec"]

    store.write_many({"rec": {KEY_CHAIN_ID: None}})  # a deleted key takes its index entry
    assert index_keys(env) == []
    assert store.get("rec").get(KEY_CHAIN_ID) is None


def test_write_many_equals_queue_many_and_commit(env: MetaEnv, store: MetadataStore) -> None:
    values = {KEY_SIZE: 7, KEY_DESCRIPTION: "d", KEY_IMAGE_REFS: ["a", "b"], "gone": None}
    item = store.get("by-item")
    item.queue_many(values, {KEY_DESCRIPTION: "desc:d"})
    item.commit()
    store.write_many({"by-bulk": values}, {"by-bulk": {KEY_DESCRIPTION: "desc:d"}})
    with env.read_txn() as txn:
        assert txn.get(DB_RECORDS, b"by-bulk") == txn.get(DB_RECORDS, b"by-item")
    assert [i.id for i in store.search("desc:d")] == ["by-bulk", "by-item"]


@pytest.mark.parametrize(
    ("records", "indexes", "match"),
    [
        ({"ok": {"a": 1}, "a::b": {"a": 1}}, None, "invalid record id"),
        ({"ok": {"a": 1}, "bad": {"": 1}}, None, "invalid metadata key"),
        ({"ok": {"a": 1}, "bad": {"k": object()}}, None, "'k' of record 'bad' cannot be stored"),
        ({"ok": {"a": 1}, "bad": {"k": 1 << 64}}, None, "'k' of record 'bad' cannot be stored"),
        ({"ok": {"a": 1}, "bad": {"k": [1 << 64]}}, None, "'k' of record 'bad' cannot be stored"),
        ({"ok": {"a": 1}, "bad": {"k": {1: "x"}}}, None, "'k' of record 'bad' cannot be stored"),
        ({"ok": {"a": 1}, "bad": {"k": bytearray(b"x")}}, None, "cannot be stored"),
        ({"ok": {"a": 1}}, {"ok": {"a": ""}}, "invalid index"),
        ({"ok": {"a": 1}}, {"ok": {"b": "i:b"}}, "names key 'b', which this write does not set"),
        ({"ok": {"a": None}}, {"ok": {"a": "i:a"}}, "names key 'a'"),
        ({"ok": {"a": 1}}, {"other": {"a": "i:a"}}, r"not written: \['other'\]"),
        ({"ok": [("a", 1)]}, None, "values of record 'ok' must be a"),
        ([("ok", {"a": 1})], None, "records must map record ids"),
    ],
)
def test_write_many_rejects_bad_input_and_writes_nothing(
    env: MetaEnv, store: MetadataStore, records: Any, indexes: Any, match: str
) -> None:
    before = last_txnid(env)
    with pytest.raises(InvalidError, match=match):
        store.write_many(records, indexes)
    assert last_txnid(env) == before
    assert store.count() == 0


def test_write_many_into_a_corrupt_record_names_it_and_writes_nothing(
    env: MetaEnv, store: MetadataStore
) -> None:
    store.put_raw("bad", b"\xc1")
    before = last_txnid(env)
    with pytest.raises(CorruptMetadataError, match="'bad'") as info:
        store.write_many({"new": {"a": 1}, "bad": {"a": 1}})
    assert info.value.record_id == "bad"
    assert last_txnid(env) == before
    assert store.ids() == ["bad"]


def test_write_many_joins_the_callers_transaction_and_its_rollback(
    env: MetaEnv, store: MetadataStore
) -> None:
    with pytest.raises(RuntimeError, match="boom"), env.write_txn() as txn:
        store.write_many({"r": {"a": 1}}, {"r": {"a": "i:1"}}, txn=txn)
        assert store.get("r").exists is False  # other readers do not see it yet
        raise RuntimeError("boom")
    assert store.count() == 0
    assert index_keys(env) == []

    with env.write_txn() as txn:
        store.write_many({"r": {"a": 1}}, txn=txn)
        item = store.get("other")
        item.queue("b", 2)
        item.commit(txn=txn)
        store.write_many({"r": {"c": 3}}, txn=txn)  # sees the first write: merges
    assert (store.get("r").get("a"), store.get("r").get("c")) == (1, 3)
    assert store.get("other").get("b") == 2


def test_write_many_with_nothing_to_write_touches_nothing(
    env: MetaEnv, store: MetadataStore
) -> None:
    before = last_txnid(env)
    store.write_many({})
    store.write_many({"r": {}})
    assert last_txnid(env) == before
    assert store.count() == 0


# -- StorageItem details the batch paths must keep ------------------------------------------


def test_commit_many_applies_items_of_one_record_in_order(
    env: MetaEnv, store: MetadataStore
) -> None:
    first, second = store.get("rec"), store.get("rec")
    first.queue_many({"a": 1, "b": 1, KEY_CHAIN_ID: "x"}, {KEY_CHAIN_ID: "chain:x"})
    second.queue_many({"b": 2, KEY_CHAIN_ID: "y"}, {KEY_CHAIN_ID: "chain:y"})
    store.commit_many([first, second])
    merged = store.get("rec")
    assert (merged.get("a"), merged.get("b"), merged.get(KEY_CHAIN_ID)) == (1, 2, "y")
    assert index_keys(env) == [b"chain:y::rec"]
    assert not first.dirty
    assert not second.dirty


def test_writes_queued_while_a_flush_waits_for_its_commit_stay_queued(
    store: MetadataStore, env: MetaEnv
) -> None:
    item = store.get("rec")
    item.queue_many({"a": 1, "b": 1})
    with env.write_txn() as txn:
        item.commit(txn=txn)
        item.queue("a", 2)  # after the flush, before the commit
        assert item.get("a") == 2
    assert item.dirty
    assert (item.get("a"), item.get("b")) == (2, 1)
    assert store.get("rec").get("a") == 1
    item.commit()
    assert not item.dirty
    assert (store.get("rec").get("a"), store.get("rec").get("b")) == (2, 1)


def test_an_item_flushed_twice_into_one_transaction_settles_once(
    store: MetadataStore, env: MetaEnv
) -> None:
    item = store.get("rec")
    with env.write_txn() as txn:
        item.queue("a", 1)
        item.commit(txn=txn)
        item.queue("b", 2)
        item.commit(txn=txn)
    assert not item.dirty
    assert item.keys() == ["a", "b"]
    assert store.get("rec").keys() == ["a", "b"]


def test_an_index_shared_by_two_keys_stays_while_one_of_them_still_names_it(
    env: MetaEnv, store: MetadataStore
) -> None:
    item = store.get("rec")
    item.queue("a", 1, index="tag:t")
    item.queue("b", 1, index="tag:t")
    item.commit()
    item.set("a", None)
    assert [i.id for i in store.search("tag:t")] == ["rec"]
    item.set("b", None)
    assert index_keys(env) == []


def test_queue_many_rejects_integers_beyond_64_bits_and_stages_nothing(
    store: MetadataStore,
) -> None:
    item = store.get("rec")
    with pytest.raises(InvalidError, match="'big' of record 'rec' cannot be stored"):
        item.queue_many({"ok": 1, "big": 1 << 64})
    with pytest.raises(InvalidError, match="'neg' of record 'rec' cannot be stored"):
        item.queue_many({"neg": [-(1 << 63) - 1]})
    assert not item.dirty
    item.queue_many({"max": (1 << 64) - 1, "min": -(1 << 63)}, {"max": None})  # type: ignore[dict-item]
    item.commit()
    assert store.get("rec").get_int("max") == (1 << 64) - 1
    assert store.get("rec").index_of("max") is None


# -- all(): the bulk load -------------------------------------------------------------------


@pytest.mark.parametrize("enabled", [True, False])
def test_loading_everything_leaves_the_garbage_collector_as_it_was(
    store: MetadataStore, enabled: bool
) -> None:
    store.write_many({f"r{i}": {"a": i, "l": [str(i)]} for i in range(100)})
    was = gc.isenabled()
    try:
        if not enabled:
            gc.disable()
        items = store.all()
        assert gc.isenabled() is enabled
        assert [i.get_int("a") for i in items] == sorted(range(100), key=lambda i: f"r{i}")
    finally:
        if was:
            gc.enable()


def test_loading_everything_keeps_objects_the_application_froze(store: MetadataStore) -> None:
    store.write_many({"r": {"a": 1}})
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert [i.get("a") for i in store.all()] == [1]
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_a_stored_record_with_a_null_field_table_is_corrupt(store: MetadataStore) -> None:
    store.put_raw("rec", msgpack.packb({"f": None}))
    with pytest.raises(CorruptMetadataError, match="'rec' has a malformed field or index table"):
        store.get("rec").decode()
    with pytest.raises(CorruptMetadataError, match="'rec'"):
        store.all()[0].get("a")
