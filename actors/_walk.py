"""Walks over the record graph: layer chains, ancestors, and records shared elsewhere.

Pure functions over any ``id -> record`` mapping whose values have ``kind``, ``parents`` and
``blob``: the manager's table of :class:`~actors._entry.RecordEntry` (on its thread), or a
snapshot of :class:`~actors._rows.TableRow` values (disk usage, prune, ``refcache du``).
Every walk is iterative: layer chains may be deeper than Python's recursion limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from ..storage import RefcacheError

__all__ = [
    "RefChecker",
    "ancestors",
    "check_shared",
    "layer_digest_chain",
    "layer_walk",
    "mark_shared",
]

#: ``(record id, layer digest chain) -> shared?`` (BuildKit ``ExternalRefChecker.Exists``).
RefChecker = Callable[[str, Sequence[str]], bool]


class Walkable(Protocol):
    """What the walks read of a record (``TableRow`` and ``RecordEntry`` both have it)."""

    @property
    def kind(self) -> str: ...
    @property
    def parents(self) -> tuple[str, ...]: ...
    @property
    def blob(self) -> str: ...


def layer_walk(table: Mapping[str, Walkable], record_id: str) -> list[str]:
    """The layers of ``record_id`` as they would appear in an image, root first.

    BuildKit ``layerWalk``: a layer is its parent's layers plus itself; a merge concatenates
    its inputs; a diff is its upper when the upper is one layer on top of the lower (or a base
    layer diffed with nothing), otherwise the diff itself is one layer. Parents missing from
    ``table`` are skipped (BuildKit #7154/#7157 crashed on them).
    """
    out: list[str] = []
    if record_id not in table:
        return out
    stack: list[tuple[str, bool]] = [(record_id, False)]
    # Only corrupt metadata can hold a parent cycle (loading refuses it); an offline view
    # may still read one, so the walk is bounded rather than trusted.
    budget = 16 * (len(table) + 1)
    while stack:
        budget -= 1
        if budget < 0:
            break
        rid, expanded = stack.pop()
        row = table.get(rid)
        if row is None:
            continue
        if expanded or row.kind == "base":
            out.append(rid)
        elif row.kind == "layer":
            stack.append((rid, True))
            stack.append((row.parents[0], False))
        elif row.kind == "merge":
            stack.extend((p, False) for p in reversed(row.parents))
        elif row.kind == "diff":
            lower, upper = row.parents
            up = table.get(upper) if upper else None
            if up is not None and (
                (not lower and up.kind == "base")
                or (lower and up.kind == "layer" and up.parents[0] == lower)
            ):
                out.append(upper)
            else:
                out.append(rid)
        else:
            out.append(rid)
    return out


def layer_digest_chain(
    table: Mapping[str, Walkable],
    record_id: str,
    memo: dict[str, tuple[str, ...]] | None = None,
) -> tuple[str, ...]:
    """The blob digests of the record's layer walk (BuildKit ``layerDigestChain``).

    Records without a blob contribute ``""`` (BuildKit appends ``getBlob()`` as it is). A
    layer's chain is memoised in ``memo`` (BuildKit's ``layerDigestChainCache``), so the
    chains of a whole table cost one visit per record plus the lengths of the chains.
    """
    if memo is None:
        memo = {}
    if record_id in memo:
        return memo[record_id]
    row = table.get(record_id)
    if row is None:
        return ()
    if row.kind == "layer":
        # Iterative over the layer parents (chains may be deeper than the recursion limit).
        pending: list[str] = []
        seen: set[str] = set()
        rid: str | None = record_id
        while rid is not None and rid not in memo and rid not in seen:
            r = table.get(rid)
            if r is None:
                break
            if r.kind != "layer":
                memo[rid] = layer_digest_chain(table, rid, memo)
                break
            seen.add(rid)
            pending.append(rid)
            rid = r.parents[0]
        base = memo.get(rid, ()) if rid is not None else ()
        for lid in reversed(pending):
            base = (*base, table[lid].blob)
            memo[lid] = base
        return memo[record_id]
    chain = tuple(table[layer].blob for layer in layer_walk(table, record_id))
    memo[record_id] = chain
    return chain


def ancestors(table: Mapping[str, Walkable], record_id: str, *, unique: bool = True) -> list[str]:
    """``record_id`` and its ancestors present in ``table``, depth first.

    With ``unique`` each record once (BuildKit ``walkUniqueAncestors``); without, a record
    reached through several children is listed each time (BuildKit ``walkAncestors``).
    """
    seen: set[str] = set()
    out: list[str] = []
    stack = [record_id]
    while stack:
        rid = stack.pop()
        if rid not in table or (unique and rid in seen):
            continue
        seen.add(rid)
        out.append(rid)
        stack.extend(p for p in table[rid].parents if p)
    return out


def check_shared(checker: RefChecker, record_id: str, chain: Sequence[str]) -> bool:
    """Whether ``checker`` reports the record's layer chain as used elsewhere.

    Raises:
        RefcacheError: the checker raised (naming the record), or timed out.
    """
    try:
        return bool(checker(record_id, chain))
    except RefcacheError:
        raise  # e.g. TimeoutError: the cache bounds each call of the checker
    except Exception as exc:
        # A failing checker must not make shared data look private (prune would delete it).
        msg = f"the ref checker failed for record {record_id}: {exc}"
        raise RefcacheError(msg) from exc


def mark_shared(
    table: Mapping[str, Walkable], ids: Iterable[str], checker: RefChecker | None
) -> set[str]:
    """Records the checker reports as used elsewhere, and all their ancestors (``markShared``).

    Raises:
        RefcacheError: the checker raised (naming the record).
    """
    shared: set[str] = set()
    if checker is None:
        return shared
    memo: dict[str, tuple[str, ...]] = {}
    for rid in ids:
        if rid in shared:
            continue
        if check_shared(checker, rid, layer_digest_chain(table, rid, memo)):
            shared.update(ancestors(table, rid))
    return shared
