"""Cascade planning: which KV pages of a batch are shared, and by whom.

Pure numpy, no vLLM and no torch, so it runs (and is tested) anywhere.

Requests that share a prefix share physical pages (vLLM's prefix caching and
our chunk pages both do this), so sharing is visible in the block table: equal
page ids at equal block indices. The planner walks the block table as a trie
and cuts it into *levels*:

    level 0    pages shared by the most requests (a system prompt for all)
    level 1    pages shared by groups (a document per group)
    ...
    own level  each request's remaining pages, attended causally

A shared level is attended once for all queries of its requests; the levels'
partial results are merged exactly by log-sum-exp. Only pages that lie wholly
before a request's first query token may be shared: such pages need no causal
mask, so a shared segment is a plain (non-causal) attention over its pages.

Example:
    >>> import numpy as np
    >>> bt = np.array([[7, 8, 1], [7, 8, 2], [7, 9, 3]])  # 3 requests, page size 4
    >>> plan = plan_cascade(bt, seq_lens=np.array([12, 12, 12]),
    ...                     query_lens=np.array([1, 1, 1]), block_size=4,
    ...                     min_saved_pages=1, min_saved_fraction=0.0)
    >>> [(s.level, s.rows.tolist(), s.pages.tolist()) for lvl in plan.shared for s in lvl]
    [(0, [0, 1, 2], [7]), (1, [0, 1], [8])]
    >>> plan.own_first_page.tolist(), plan.pages_read, plan.flat_pages_read
    ([2, 2, 1], 6, 9)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SharedSegment:
    """Block-table entries [first_page, first_page + len(pages)) of every row
    in `rows` hold the same physical `pages`."""

    level: int
    rows: np.ndarray  # batch rows (requests) whose queries attend these pages
    first_page: int  # block-table index of pages[0], the same in every row
    pages: np.ndarray  # physical page ids


@dataclass(frozen=True)
class CascadePlan:
    """How one step's attention is cut into levels (host-side, built once per step)."""

    shared: list[list[SharedSegment]]  # shared levels, most shared first
    own_first_page: np.ndarray  # [num_rows] block index where each row's own pages start
    pages_read: int  # KV pages one layer reads with this plan
    flat_pages_read: int  # KV pages one layer reads attending each request alone
    # Host data derived from the shared levels alone (work-list items), kept with them: a plan whose
    # levels are reused across decode steps reuses it too.
    cache: dict = field(default_factory=dict, compare=False, repr=False)
    # [num_rows, P] key shift per block-table entry when the step reads chunk pages (kv/chunk_pages.py).
    shifts: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def num_levels(self) -> int:
        return len(self.shared) + 1

    @property
    def is_flat(self) -> bool:
        return not self.shared

    @property
    def shared_pages(self) -> int:
        return sum(len(s.pages) for lvl in self.shared for s in lvl)

    def level_summary(self, query_lens: np.ndarray) -> tuple[list[int], list[int]]:
        """(pages read, query tokens) per level, shared levels first, the own level last."""
        pages = [sum(len(s.pages) for s in lvl) for lvl in self.shared]
        queries = [int(sum(query_lens[s.rows].sum() for s in lvl)) for lvl in self.shared]
        return pages + [self.pages_read - sum(pages)], queries + [int(query_lens.sum())]


@dataclass
class DecodePlanReuse:
    """The last decode step's plan, reused by the next decode step of the same requests.

    In a decode step every page of a row but its last is complete, and the last (being
    written) is the row's own: vLLM never hands a request a cached page to write into.
    A running request's table only grows at its end, with fresh pages. So while a batch
    holds the same requests in the same rows, its shared levels are exactly what they
    were and only each row's own pages grow: planning again would find the same levels.
    `key` must change whenever a request is added, removed, moved to another row or
    given new pages at an earlier index (the builder uses the rows' slots and the count
    of slot overwrites of vLLM's block table); None means "do not reuse".

    Example:
        >>> bt = np.array([[7, 8, 1], [7, 8, 2]])
        >>> reuse = DecodePlanReuse()
        >>> plan = plan_cascade(bt, np.array([40, 40]), np.array([1, 1]), 16, min_saved_pages=1, min_saved_fraction=0)
        >>> reuse.put("step-key", plan, np.array([40, 40]))
        >>> nxt = reuse.get("step-key", np.array([41, 49]), 16, min_saved_fraction=0)
        >>> nxt.shared is plan.shared, nxt.pages_read, nxt.flat_pages_read
        (True, 5, 7)
    """

    key: object = None
    plan: CascadePlan | None = None
    seq_lens: np.ndarray | None = None

    def get(self, key: object, seq_lens: np.ndarray, block_size: int, min_saved_fraction: float) -> CascadePlan | None:
        if key is None or key != self.key or len(seq_lens) != len(self.seq_lens) or (seq_lens < self.seq_lens).any():
            return None
        plan = self.plan
        if plan.is_flat:
            return flat_plan(seq_lens, block_size, plan.shifts)
        pages = _num_pages(seq_lens, block_size)
        flat_pages = int(pages.sum())
        pages_read = plan.shared_pages + int((pages - plan.own_first_page).sum())
        if flat_pages - pages_read < min_saved_fraction * flat_pages:
            return flat_plan(seq_lens, block_size, plan.shifts)  # own pages grew: sharing no longer pays
        return CascadePlan(plan.shared, plan.own_first_page, pages_read, flat_pages, plan.cache, plan.shifts)

    def put(self, key: object, plan: CascadePlan, seq_lens: np.ndarray) -> None:
        self.key, self.plan, self.seq_lens = key, plan, seq_lens


def flat_plan(seq_lens: np.ndarray, block_size: int, shifts: np.ndarray | None = None) -> CascadePlan:
    pages = int(_num_pages(seq_lens, block_size).sum())
    return CascadePlan([], np.zeros(len(seq_lens), dtype=np.int64), pages, pages, shifts=shifts)


def plan_cascade(
    block_table: np.ndarray,
    seq_lens: np.ndarray,
    query_lens: np.ndarray,
    block_size: int,
    max_levels: int = 3,
    min_saved_pages: int = 64,
    min_saved_fraction: float = 0.1,
    shifts: np.ndarray | None = None,
) -> CascadePlan:
    """Cut a step's block table into cascade levels.

    Args:
        block_table: [num_rows, >= max pages] physical page ids per request.
        seq_lens: [num_rows] tokens in each request's KV after this step.
        query_lens: [num_rows] tokens each request computes this step.
        block_size: tokens per page.
        max_levels: levels in all, the own level included; 1 means flat.
        min_saved_pages: a shared segment must save at least this many page
            reads ((rows - 1) * pages); smaller sharing is folded into deeper
            segments or the own level, where it costs no extra pass.
        min_saved_fraction: below this share of the flat page reads saved, the
            whole step runs flat: extra passes and merges would cost more.
        shifts: [num_rows, >= max pages] key rotation per block-table entry
            (kv/chunk_pages.py), or None (all 0). A page is shared only by rows
            that attend it at the same shift: a shared pass reads it once.
    """
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    query_lens = np.asarray(query_lens, dtype=np.int64)
    num_rows = len(seq_lens)
    flat_pages = int(_num_pages(seq_lens, block_size).sum())
    # Pages wholly before a row's first query token: attendable without a mask.
    eligible = np.maximum(seq_lens - query_lens, 0) // block_size
    if num_rows < 2 or max_levels < 2 or int(eligible.max(initial=0)) == 0:
        return flat_plan(seq_lens, block_size, shifts)

    # What rows must agree on to share an entry: the page and, with chunks, its shift.
    ident = block_table if shifts is None else block_table.astype(np.int64) * 2**32 + shifts[:, : block_table.shape[1]]
    levels: list[list[SharedSegment]] = [[] for _ in range(max_levels - 1)]
    own_first_page = np.zeros(num_rows, dtype=np.int64)

    def visit(rows: np.ndarray, start: int, pending: int, depth: int) -> None:
        # Rows share pages [0, start); pages [pending, start) are not yet in any
        # level. Extend the run of pages all rows share.
        limit = int(eligible[rows].min())
        end = start
        if limit > start:
            same = (ident[rows, start:limit] == ident[rows[0], start:limit]).all(0)
            end = start + (int(np.argmin(same)) if not same.all() else limit - start)
        saved = (len(rows) - 1) * (end - pending)
        if len(rows) > 1 and depth < max_levels - 1 and saved >= min_saved_pages:
            levels[depth].append(
                SharedSegment(depth, rows.copy(), pending, block_table[rows[0], pending:end].copy())
            )
            pending, depth = end, depth + 1
        below = eligible[rows] > end
        own_first_page[rows[~below]] = pending
        rest = rows[below]
        if len(rest) == 0:
            return
        # Branch on the next page id; np.unique keeps groups in a stable order. Rows alone on their
        # page are done in one go (at batch 64 after a common prefix, that is every row).
        _, group_of, group_size = np.unique(ident[rest, end], return_inverse=True, return_counts=True)
        alone = group_size[group_of] == 1
        own_first_page[rest[alone]] = pending
        for g in np.flatnonzero(group_size > 1):
            visit(rest[group_of == g], end, pending, depth)

    visit(np.arange(num_rows), 0, 0, 0)
    levels = [lvl for lvl in levels if lvl]
    shared_pages = sum(len(s.pages) for lvl in levels for s in lvl)
    own_pages = int((_num_pages(seq_lens, block_size) - own_first_page).sum())
    pages_read = shared_pages + own_pages
    if not levels or flat_pages - pages_read < min_saved_fraction * flat_pages:
        return flat_plan(seq_lens, block_size, shifts)
    return CascadePlan(levels, own_first_page, pages_read, flat_pages, shifts=shifts)


def _num_pages(seq_lens: np.ndarray, block_size: int) -> np.ndarray:
    return (np.asarray(seq_lens, dtype=np.int64) + block_size - 1) // block_size
