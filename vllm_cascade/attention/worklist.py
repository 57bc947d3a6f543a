"""A cascade plan cut into work items for the fused kernel (ops/triton_cascade.py).

Pure numpy. A work item is one tile of query tokens attending one run of KV
pages; the kernel runs every item of every level (one launch for wide tiles,
one for narrow ones, programs striding over items and KV heads) and a last
launch merges each token's partial results.
Pages are addressed through the block table (`bt_row`, `page_start`): a shared
segment's pages are the same in all its rows, so any one row names them, and
the host never builds page lists (no device-to-host copy for flat steps).

Example:
    >>> import numpy as np
    >>> from vllm_cascade.attention.plan import flat_plan
    >>> seq, qsl = np.array([40, 7]), np.array([0, 1, 4])
    >>> wl = build_worklist(flat_plan(seq, 16), seq, qsl, page_size=16, tokens_per_item=2, pages_per_item=2)
    >>> wl.num_items, wl.q_pos.tolist()
    (4, [39, 4, 5, 6])
    >>> wl.kv_len.tolist(), wl.page_start.tolist()  # row 0: 40 keys in two items; row 1: two query tiles
    ([32, 8, 6, 7], [0, 2, 0, 0])
    >>> wl.item_part.tolist(), wl.contrib_row.tolist()  # partial rows: one per (item, token)
    ([0, 1, 2, 4], [0, 1, 2, 3, 4])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vllm_cascade.attention.plan import (
    CascadePlan,
    _index_within,
    rows_tokens,
    token_positions,
)


@dataclass(frozen=True)
class WorkList:
    q_off: np.ndarray  # [items] first entry of the item's tokens in q_tokens
    q_len: np.ndarray  # [items] query tokens of the item (<= its class's tokens per item)
    bt_row: np.ndarray  # [items] block-table row naming the item's pages
    page_start: np.ndarray  # [items] block-table index of the item's first page
    kv_len: np.ndarray  # [items] keys the item reads, from page_start * page_size on
    causal: np.ndarray  # [items] 1: mask keys after each query's position
    item_part: np.ndarray  # [items] partial-result row of the item's first token (one row per item and token)
    q_tokens: np.ndarray  # query-token indices (rows of the step's query tensor), per tile
    q_shift: np.ndarray  # per entry of q_tokens: its row's segment q_shift (plan.SharedSegment), else 0
    q_pos: np.ndarray  # [tokens] absolute position of each query token
    contrib_off: np.ndarray  # [tokens + 1] CSR over contrib_row: the partial rows each token merges
    contrib_row: np.ndarray
    num_wide: int  # items [0, num_wide) have wide tiles, the rest narrow ones

    @property
    def num_items(self) -> int:
        return len(self.q_off)

    @property
    def num_partial_rows(self) -> int:
        return len(self.contrib_row)


class WorkListTooLarge(RuntimeError):
    """A step's work list does not fit fixed buffers even with one KV run per (tile, segment)."""


def build_worklist(
    plan: CascadePlan,
    seq_lens: np.ndarray,
    query_start_loc: np.ndarray,
    page_size: int,
    tokens_per_item: int,
    pages_per_item: int,
    wide_tokens_per_item: int | None = None,
) -> WorkList:
    """Items of every level. Query groups (a row's own tokens, a shared segment's
    tokens) larger than `tokens_per_item` are cut into wide tiles of
    `wide_tokens_per_item` tokens (a shared prefix is then read once per wide
    tile, not once per narrow one); wide items come first."""
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    qsl = np.asarray(query_start_loc, dtype=np.int64)
    wide = max(wide_tokens_per_item or tokens_per_item, tokens_per_item)
    if is_decode_step(qsl, len(seq_lens)):
        return _decode_worklist(plan, seq_lens, page_size, tokens_per_item, pages_per_item, wide)
    return _general_worklist(plan, seq_lens, qsl, page_size, tokens_per_item, pages_per_item, wide)


def is_decode_step(query_start_loc: np.ndarray, num_rows: int) -> bool:
    """One query token per row (row r's token is r)."""
    return int(query_start_loc[-1]) == num_rows and bool((np.diff(query_start_loc) == 1).all())


def _general_worklist(plan: CascadePlan, seq_lens: np.ndarray, qsl: np.ndarray, page_size: int, narrow: int,
                      pages_per_item: int, wide: int) -> WorkList:
    num_tokens = int(qsl[-1])
    query_lens = np.diff(qsl)
    q_pos = token_positions(seq_lens, qsl)
    # A tile is (tokens, bt_row, first_page, kv_end, causal, run_pages). A group of queries bigger than
    # `narrow` gets wide tiles. A prefill has tiles enough to fill the GPU: its keys are not split
    # (run_pages = all), so it has no partials to merge.
    all_pages = 1 << 30

    # Own level, vectorized (one group per row with queries): contiguous token ranges.
    rows = np.flatnonzero(query_lens)
    row_wide = (query_lens[rows] > narrow) & (wide > narrow)
    size = np.where(row_wide, wide, narrow)
    per_row = -(-query_lens[rows] // size)
    t_row = np.repeat(rows, per_row)
    t_size = np.repeat(size, per_row)
    t_start = qsl[t_row] + _index_within(per_row) * t_size
    own = {"len": np.minimum(t_size, qsl[t_row + 1] - t_start), "start": t_start, "bt_row": t_row,
           "first_page": plan.own_first_page[t_row].astype(np.int64), "kv_end": seq_lens[t_row],
           "causal": np.ones(len(t_row), dtype=np.int64), "run_pages": np.where(t_size > narrow, all_pages, pages_per_item),
           "wide": t_size > narrow}

    # Shared levels: a few segments, each one group of all its rows' tokens.
    seg_tiles: list[tuple] = []  # tokens, bt_row, first_page, kv_end, wide, q_shift
    for level in plan.shared:
        for seg in level:
            tokens, lens = rows_tokens(qsl, seg.rows)
            q_shift = np.repeat(_q_shift(seg), lens)
            is_wide = len(tokens) > narrow < wide
            step = wide if is_wide else narrow
            end = (seg.first_page + len(seg.pages)) * page_size
            seg_tiles += [(tokens[t : t + step], int(seg.rows[0]), seg.first_page, end, is_wide, q_shift[t : t + step])
                          for t in range(0, len(tokens), step)]

    # Wide tiles first, then narrow: (own wide, shared wide, shared narrow, own narrow), the order
    # `_decode_worklist` builds too.
    parts, token_parts, shift_parts = [], [], []
    for want_wide in (True, False):
        sel = own["wide"] == want_wide
        own_part = {k: v[sel] for k, v in own.items() if k not in ("start", "wide")}
        own_tokens = np.repeat(own["start"][sel], own["len"][sel]) + _index_within(own["len"][sel])
        mine = [t for t in seg_tiles if t[4] == want_wide]
        shared_part = {"len": np.array([len(t[0]) for t in mine], dtype=np.int64),
                       "bt_row": np.array([t[1] for t in mine], dtype=np.int64),
                       "first_page": np.array([t[2] for t in mine], dtype=np.int64),
                       "kv_end": np.array([t[3] for t in mine], dtype=np.int64),
                       "causal": np.zeros(len(mine), dtype=np.int64),
                       "run_pages": np.full(len(mine), pages_per_item, dtype=np.int64)}
        own_shifts = np.zeros(len(own_tokens), np.int64)
        if want_wide:
            parts += [own_part, shared_part]
            token_parts += [own_tokens, *(t[0] for t in mine)]
            shift_parts += [own_shifts, *(t[5] for t in mine)]
        else:
            parts += [shared_part, own_part]
            token_parts += [*(t[0] for t in mine), own_tokens]
            shift_parts += [*(t[5] for t in mine), own_shifts]
    tiles = {k: np.concatenate([p[k] for p in parts]).astype(np.int64) for k in parts[0]}
    num_wide_tiles = len(parts[0]["len"]) + len(parts[1]["len"])
    q_tokens = np.concatenate(token_parts).astype(np.int64)
    tile_len, bt_row, first_page, kv_end, causal, run_pages = (
        tiles[k] for k in ("len", "bt_row", "first_page", "kv_end", "causal", "run_pages"))
    num_tiles = len(tile_len)
    tile_off = np.zeros(num_tiles + 1, dtype=np.int64)
    np.cumsum(tile_len, out=tile_off[1:])
    # Causal tiles read no keys after their last query.
    last_pos = np.maximum.reduceat(q_pos[q_tokens], tile_off[:-1]) if num_tiles else tile_len
    end = np.where(causal == 1, np.minimum(kv_end, last_pos + 1), kv_end)
    num_pages = np.maximum(-(-end // page_size) - first_page, 0)
    runs = -(-num_pages // run_pages)

    # One item per (tile, run of KV pages); one partial row per (item, token of its tile).
    tile = np.repeat(np.arange(num_tiles), runs)
    run = _index_within(runs)
    page_start = first_page[tile] + run * run_pages[tile]
    kv_len = np.minimum(end[tile] - page_start * page_size, run_pages[tile] * page_size)
    q_len = tile_len[tile]
    item_part = np.cumsum(q_len) - q_len
    # Partial rows token by token: row item_part[i] + j holds token q_tokens[tile_off[tile[i]] + j].
    item_of_row = np.repeat(np.arange(len(tile)), q_len)
    row_token = q_tokens[tile_off[tile][item_of_row] + np.arange(len(item_of_row)) - item_part[item_of_row]]
    contrib_row = np.argsort(row_token, kind="stable").astype(np.int32)
    contrib_off = np.zeros(num_tokens + 1, dtype=np.int32)
    np.cumsum(np.bincount(row_token, minlength=num_tokens), out=contrib_off[1:])
    return WorkList(
        q_off=_i32(tile_off[tile]), q_len=_i32(q_len), bt_row=_i32(bt_row[tile]), page_start=_i32(page_start),
        kv_len=_i32(kv_len), causal=_i32(causal[tile]), item_part=_i32(item_part), q_tokens=_i32(q_tokens),
        q_shift=_i32(np.concatenate(shift_parts)), q_pos=_i32(q_pos), contrib_off=contrib_off, contrib_row=contrib_row,
        num_wide=int(runs[:num_wide_tiles].sum()),
    )


def _decode_worklist(plan: CascadePlan, seq_lens: np.ndarray, page_size: int, narrow: int, pages_per_item: int,
                     wide: int) -> WorkList:
    """A decode step (one query per row; row r's token is r) in a few array operations: the same
    items as the general path. The shared levels' items depend on the plan alone, so they are
    built once per plan (`plan.cache`), and a plan reused across decode steps reuses them."""
    rows = len(seq_lens)
    key = ("decode_items", page_size, narrow, pages_per_item, wide)
    shared = _NO_SHARED_ITEMS if plan.is_flat else plan.cache.get(key)
    if shared is None:
        shared = plan.cache[key] = _shared_decode_items(plan, page_size, narrow, pages_per_item, wide)
    first = plan.own_first_page.astype(np.int64)
    runs = -(-np.maximum(-(-seq_lens // page_size) - first, 0) // pages_per_item)
    tile = np.repeat(np.arange(rows), runs)
    page_start = first[tile] + _index_within(runs) * pages_per_item
    own_kv_len = np.minimum(seq_lens[tile] - page_start * page_size, pages_per_item * page_size)
    num_shared_items, num_shared_tokens = len(shared["q_len"]), len(shared["q_tokens"])
    q_len = np.concatenate([shared["q_len"], np.ones(len(tile), np.int64)])
    item_part = np.cumsum(q_len) - q_len
    row_token = np.concatenate([shared["row_token"], tile])
    contrib_off = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(np.bincount(row_token, minlength=rows), out=contrib_off[1:])
    return WorkList(
        q_off=_i32(np.concatenate([shared["q_off"], num_shared_tokens + tile])), q_len=_i32(q_len),
        bt_row=_i32(np.concatenate([shared["bt_row"], tile])),
        page_start=_i32(np.concatenate([shared["page_start"], page_start])),
        kv_len=_i32(np.concatenate([shared["kv_len"], own_kv_len])),
        causal=_i32(np.concatenate([np.zeros(num_shared_items, np.int64), np.ones(len(tile), np.int64)])),
        item_part=_i32(item_part), q_tokens=_i32(np.concatenate([shared["q_tokens"], np.arange(rows)])),
        q_shift=_i32(np.concatenate([shared["q_shift"], np.zeros(rows, np.int64)])),
        q_pos=_i32(seq_lens - 1), contrib_off=contrib_off,
        contrib_row=np.argsort(row_token, kind="stable").astype(np.int32), num_wide=shared["num_wide"],
    )


_EMPTY = np.zeros(0, np.int64)
_NO_SHARED_ITEMS = {"q_off": _EMPTY, "q_len": _EMPTY, "bt_row": _EMPTY, "page_start": _EMPTY, "kv_len": _EMPTY,
                    "q_tokens": _EMPTY, "q_shift": _EMPTY, "row_token": _EMPTY, "num_wide": 0}


def _shared_decode_items(plan: CascadePlan, page_size: int, narrow: int, pages_per_item: int,
                         wide: int) -> dict:
    """Items of the shared levels of a decode step: wide tiles, then narrow ones (as the general path)."""
    tiles: list[tuple] = []  # tokens, bt_row, first_page, pages, wide, q_shift
    for level in plan.shared:
        for seg in level:
            is_wide = len(seg.rows) > narrow < wide
            step = wide if is_wide else narrow
            q_shift = _q_shift(seg)
            tiles += [(seg.rows[t : t + step], int(seg.rows[0]), seg.first_page, len(seg.pages), is_wide,
                       q_shift[t : t + step]) for t in range(0, len(seg.rows), step)]
    tiles = [t for t in tiles if t[4]] + [t for t in tiles if not t[4]]
    tokens = [t[0].astype(np.int64) for t in tiles]
    tile_len = np.array([len(t) for t in tokens], dtype=np.int64)
    tile_off = np.cumsum(tile_len) - tile_len
    runs = np.array([-(-t[3] // pages_per_item) for t in tiles], dtype=np.int64)
    tile = np.repeat(np.arange(len(tiles)), runs)
    first = np.array([t[2] for t in tiles], dtype=np.int64)
    end = first + np.array([t[3] for t in tiles], dtype=np.int64)
    page_start = first[tile] + _index_within(runs) * pages_per_item
    return {
        "q_off": tile_off[tile], "q_len": tile_len[tile], "bt_row": np.array([t[1] for t in tiles], np.int64)[tile],
        "page_start": page_start, "kv_len": np.minimum(end[tile] - page_start, pages_per_item) * page_size,
        "q_tokens": np.concatenate(tokens) if tokens else _EMPTY,
        "q_shift": np.concatenate([t[5] for t in tiles]).astype(np.int64) if tiles else _EMPTY,
        "row_token": np.concatenate([tokens[i] for i in tile]) if len(tile) else _EMPTY,
        "num_wide": int(runs[: sum(t[4] for t in tiles)].sum()),
    }


def _q_shift(seg) -> np.ndarray:
    return np.zeros(len(seg.rows), np.int64) if seg.q_shift is None else seg.q_shift.astype(np.int64)


def _i32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.int32)

