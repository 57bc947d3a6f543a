"""A cascade plan cut into work items for the fused kernel (ops/triton_cascade.py).

Pure numpy. A work item is one tile of query tokens attending one run of KV
pages; the kernel runs every item of every level in one launch (a program per
item and KV head) and a second launch merges each token's partial results.
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

from vllm_cascade.attention.plan import CascadePlan


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
    num_tokens = int(qsl[-1])
    query_lens = np.diff(qsl)
    q_pos = np.concatenate([np.arange(s - n, s) for s, n in zip(seq_lens, query_lens)] or [np.zeros(0, np.int64)])
    tiles: tuple[list, list] = ([], [])  # wide, narrow: (tokens, [(bt_row, page, kv_len, causal), ...])

    def add(tokens: np.ndarray, bt_row: int, first_page: int, kv_end: int, causal: int) -> None:
        """Tiles for `tokens` over keys [first_page * page_size, kv_end), each split by pages_per_item."""
        is_wide = len(tokens) > tokens_per_item < wide
        size, into = (wide, tiles[0]) if is_wide else (tokens_per_item, tiles[1])
        # A prefill has tiles enough to fill the GPU: its keys are not split (no partials to merge).
        run_pages = 1 << 30 if is_wide and causal else pages_per_item
        for t0 in range(0, len(tokens), size):
            tile = tokens[t0 : t0 + size]
            # Causal tiles read no keys after their last query.
            end = min(kv_end, int(q_pos[tile].max()) + 1) if causal else kv_end
            runs = [(bt_row, page, min(end - page * page_size, run_pages * page_size), causal)
                    for page in range(first_page, -(-end // page_size), run_pages)]
            if runs:
                into.append((tile, runs))

    for r in range(len(seq_lens)):
        tokens = np.arange(qsl[r], qsl[r + 1])
        if len(tokens):
            add(tokens, r, int(plan.own_first_page[r]), int(seq_lens[r]), causal=1)
    for level in plan.shared:
        for seg in level:
            tokens = np.concatenate([np.arange(qsl[r], qsl[r + 1]) for r in seg.rows])
            if len(tokens):
                add(tokens, int(seg.rows[0]), seg.first_page, (seg.first_page + len(seg.pages)) * page_size, causal=0)

    items: list[tuple[int, ...]] = []  # q_off, q_len, bt_row, page_start, kv_len, causal, item_part
    contributions: list[tuple[int, int]] = []  # token, partial row
    q_off = 0
    for tile, runs in tiles[0] + tiles[1]:
        for run in runs:
            part = len(contributions)
            items.append((q_off, len(tile), *run, part))
            contributions.extend((int(t), part + i) for i, t in enumerate(tile))
        q_off += len(tile)

    cols = np.array(items, dtype=np.int32).reshape(-1, 7).T
    contributions.sort()
    contrib = np.array(contributions, dtype=np.int32).reshape(-1, 2)
    contrib_off = np.zeros(num_tokens + 1, dtype=np.int32)
    np.cumsum(np.bincount(contrib[:, 0], minlength=num_tokens), out=contrib_off[1:])
    tile_tokens = [tile for tile, _ in tiles[0] + tiles[1]]
    return WorkList(
        *cols,
        q_tokens=np.concatenate(tile_tokens or [np.zeros(0, np.int64)]).astype(np.int32),
        q_pos=q_pos.astype(np.int32),
        contrib_off=contrib_off,
        contrib_row=contrib[:, 1].copy(),
        num_wide=sum(len(runs) for _, runs in tiles[0]),
    )
