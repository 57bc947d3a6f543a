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

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class SharedSegment:
    """Every row in `rows` holds the same physical `pages`, one after the other.

    Without `q_shift` they sit at block-table entries [first_page, first_page + len(pages))
    of every row (prefix sharing). Chunk pages (kv/chunk_pages.py) may sit elsewhere in each
    row: `first_page` is their place in rows[0], which names them, and row i attends them at
    a key shift of q_shift[i] more than rows[0] does, so its query is rotated back by q_shift[i]
    (constant over the segment; a row at rows[0]'s place and shift has 0).
    """

    level: int
    rows: np.ndarray  # batch rows (requests) whose queries attend these pages
    first_page: int  # block-table index of pages[0] in rows[0] (in every row without q_shift)
    pages: np.ndarray  # physical page ids
    q_shift: np.ndarray | None = None  # [len(rows)] int32, see above; None: all 0
    # Keys in its pages, where the last page ends in pad slots (`split_uniform`); None: every slot.
    num_keys: int | None = None


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
            (kv/chunk_pages.py), or None (all 0). With shifts, pages are shared
            wherever they sit in each row (`plan_any_offset`).
    """
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    query_lens = np.asarray(query_lens, dtype=np.int64)
    num_rows = len(seq_lens)
    # Pages wholly before a row's first query token: attendable without a mask.
    eligible = np.maximum(seq_lens - query_lens, 0) // block_size
    if num_rows < 2 or max_levels < 2 or int(eligible.max(initial=0)) == 0:
        return flat_plan(seq_lens, block_size, shifts)
    if shifts is not None:
        return plan_any_offset(block_table, seq_lens, eligible, block_size, max_levels, min_saved_pages,
                               min_saved_fraction, shifts)

    levels: list[list[SharedSegment]] = [[] for _ in range(max_levels - 1)]
    own_first_page = np.zeros(num_rows, dtype=np.int64)

    def visit(rows: np.ndarray, start: int, pending: int, depth: int) -> None:
        # Rows share pages [0, start); pages [pending, start) are not yet in any
        # level. Extend the run of pages all rows share.
        limit = int(eligible[rows].min())
        end = start
        if limit > start:
            same = (block_table[rows, start:limit] == block_table[rows[0], start:limit]).all(0)
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
        _, group_of, group_size = np.unique(block_table[rest, end], return_inverse=True, return_counts=True)
        alone = group_size[group_of] == 1
        own_first_page[rest[alone]] = pending
        for g in np.flatnonzero(group_size > 1):
            visit(rest[group_of == g], end, pending, depth)

    visit(np.arange(num_rows), 0, 0, 0)
    return _finish(levels, own_first_page, seq_lens, block_size, min_saved_fraction, shifts)


def _finish(levels: list[list[SharedSegment]], own_first_page: np.ndarray, seq_lens: np.ndarray, block_size: int,
            min_saved_fraction: float, shifts: np.ndarray | None) -> CascadePlan:
    """The plan of these levels, or a flat one where they save too little."""
    levels = [lvl for lvl in levels if lvl]
    flat_pages = int(_num_pages(seq_lens, block_size).sum())
    shared_pages = sum(len(s.pages) for lvl in levels for s in lvl)
    pages_read = shared_pages + int((_num_pages(seq_lens, block_size) - own_first_page).sum())
    if not levels or flat_pages - pages_read < min_saved_fraction * flat_pages:
        return flat_plan(seq_lens, block_size, shifts)
    return CascadePlan(levels, own_first_page, pages_read, flat_pages, shifts=shifts)


def plan_any_offset(
    block_table: np.ndarray,
    seq_lens: np.ndarray,
    eligible: np.ndarray,
    block_size: int,
    max_levels: int,
    min_saved_pages: int,
    min_saved_fraction: float,
    shifts: np.ndarray,
) -> CascadePlan:
    """Levels of a step with chunk pages, which requests compose in any order: a page is shared
    by every row that holds it wholly before its queries, wherever it sits in the row.

    Pages held by the same set of rows form segments: runs that every such row holds one after
    the other, at a key shift that differs from rows[0]'s by one constant per row (q_shift; a
    chunk's pages qualify, kv/chunk_pages.py). Segments saving fewer than `min_saved_pages`
    reads are left to their rows. Levels: segments of more rows first; a row's pages before its
    last shared one that no segment holds are read by a one-row segment of the last level, so
    that each row's own level stays one range of pages at its end.

    Example (page 4; rows compose chunk pages [7, 8] and [5] in both orders, then a tail page):
        >>> bt = np.array([[7, 8, 5, 1], [5, 7, 8, 2]])
        >>> sh = np.array([[3, 3, -8, 0], [-4, 1, 1, 0]])
        >>> plan = plan_cascade(bt, np.array([13, 13]), np.array([1, 1]), 4, min_saved_pages=1,
        ...                     min_saved_fraction=0.0, shifts=sh)
        >>> [(s.rows.tolist(), s.first_page, s.pages.tolist(), s.q_shift.tolist()) for s in plan.shared[0]]
        [([0, 1], 0, [7, 8], [0, -2]), ([0, 1], 2, [5], [0, 4])]
        >>> plan.own_first_page.tolist(), plan.pages_read, plan.flat_pages_read
        ([3, 3], 5, 8)
    """
    num_rows = len(seq_lens)
    # Every (row, column) a row may share, keyed by (page, row) in sorted order.
    rows_e = np.repeat(np.arange(num_rows), eligible)
    cols_e = _index_within(eligible)
    pages_e = block_table[rows_e, cols_e].astype(np.int64)
    key = pages_e * num_rows + rows_e
    order = np.argsort(key, kind="stable")
    key, rows_e, cols_e, pages_e = key[order], rows_e[order], cols_e[order], pages_e[order]
    # A page a row holds twice (a chunk composed twice) would need two shifts in one segment: not shared.
    twice = np.unique(pages_e[1:][key[1:] == key[:-1]])
    starts = np.flatnonzero(np.r_[True, pages_e[1:] != pages_e[:-1]])
    counts = np.diff(np.r_[starts, len(pages_e)])
    candidate = (counts >= 2) & ~np.isin(pages_e[starts], twice)
    # Pages grouped by their exact row set: a random 64-bit sum per set, checked exactly below.
    code = np.add.reduceat(_row_codes(num_rows)[rows_e], starts) if len(starts) else np.zeros(0, np.uint64)
    code = np.where(candidate, code, 0)

    segments: list[tuple[SharedSegment, np.ndarray]] = []  # with each row's block-table index of pages[0]
    own_first_page = np.zeros(num_rows, dtype=np.int64)
    for c in np.unique(code[candidate]):
        group = np.flatnonzero(code == c)
        rows = rows_e[starts[group[0]] : starts[group[0]] + counts[group[0]]]
        # [rows, pages] block-table columns of each page in each row (found by its (page, row) key).
        pages = pages_e[starts[group]]
        at = np.searchsorted(key, pages[None, :] * num_rows + rows[:, None])
        if not (key[np.minimum(at, len(key) - 1)] == pages[None, :] * num_rows + rows[:, None]).all():
            continue  # two row sets with one code (never seen; correctness over sharing)
        cols = cols_e[at]
        by_col = np.argsort(cols[0], kind="stable")
        pages, cols = pages[by_col], cols[:, by_col]
        delta = shifts[rows[:, None], cols] - shifts[rows[0], cols[0]][None, :]
        # A run breaks where some row does not hold the next page right after, or its shift steps.
        cut = np.flatnonzero(((cols[:, 1:] != cols[:, :-1] + 1) | (delta[:, 1:] != delta[:, :-1])).any(0)) + 1
        for a, b in zip(np.r_[0, cut], np.r_[cut, len(pages)]):
            if (len(rows) - 1) * (b - a) >= min_saved_pages:
                segments.append((SharedSegment(0, rows, int(cols[0, a]), pages[a:b].copy(),
                                               delta[:, a].astype(np.int32)), cols[:, a]))
                np.maximum.at(own_first_page, rows, cols[:, b - 1] + 1)
    if not segments:
        return flat_plan(seq_lens, block_size, shifts)

    # Levels by how many rows share, most first; a row's unshared pages before its own level last.
    sizes = sorted({len(s.rows) for s, _ in segments}, reverse=True)
    deepest = min(len(sizes), max_levels - 1) - 1
    levels: list[list[SharedSegment]] = [[] for _ in range(deepest + 1)]
    covered = np.zeros((num_rows, int(own_first_page.max())), dtype=bool)
    for s, starts_at in segments:
        level = min(sizes.index(len(s.rows)), deepest)
        levels[level].append(replace(s, level=level))
        for r, col in zip(s.rows, starts_at):
            covered[r, col : col + len(s.pages)] = True
    for r in np.flatnonzero(~covered.all(1) & (own_first_page > 0)):
        gap = ~covered[r, : own_first_page[r]]
        edges = np.flatnonzero(np.diff(np.r_[0, gap.astype(np.int8), 0]))
        for a, b in zip(edges[::2], edges[1::2]):
            levels[deepest].append(SharedSegment(deepest, np.array([r]), int(a), block_table[r, a:b].astype(np.int64),
                                                 np.zeros(1, np.int32)))
    return _finish(levels, own_first_page, seq_lens, block_size, min_saved_fraction, shifts)


def split_uniform(
    plan: CascadePlan,
    block_table: np.ndarray,
    seq_lens: np.ndarray,
    query_lens: np.ndarray,
    block_size: int,
    page_valid: np.ndarray,
) -> CascadePlan | None:
    """The plan of a step with chunk pages for a kernel that can neither shift keys per page nor
    mask pads (FlashInfer): each segment becomes one run of keys at one shift per row, pads only at
    its end (`num_keys`), so a query rotated once per (row, segment) attends it exactly.

    Segments are cut after pages with pads and where rows[0]'s shift steps (a chunk boundary);
    chunk pages a row holds in its own level become one-row segments, so its own level keeps only
    pages at their true positions (shift 0, no pads). All segments go in one level: the caller
    merges every partial result of a token at once. `page_valid` [pages]: keys per page
    (kv/chunk_pages.py). None: a row's chunk pages reach its queries' pages (no exact split).

    Example (page 4; chunk A = pages [7, 8] (8 holds 2 keys), chunk B = page [5]; both rows
    compose them in both orders, then a tail page; shifts as kv/chunk_pages.py gives them):
        >>> valid = np.full(10, 4); valid[8] = 2
        >>> bt = np.array([[7, 8, 5, 1], [5, 7, 8, 2]])
        >>> sh = np.array([[2, 2, 8, 0], [2, 6, 6, 0]])
        >>> plan = plan_cascade(bt, np.array([13, 13]), np.array([1, 1]), 4, min_saved_pages=1,
        ...                     min_saved_fraction=0.0, shifts=sh)
        >>> split = split_uniform(plan, bt, np.array([13, 13]), np.array([1, 1]), 4, valid)
        >>> [(s.rows.tolist(), s.pages.tolist(), s.num_keys, s.q_shift.tolist()) for s in split.shared[0]]
        [([0, 1], [7, 8], 6, [0, 4]), ([0, 1], [5], 4, [0, -6])]
    """
    shifts = plan.shifts
    if shifts is None:
        return plan
    page_valid = np.asarray(page_valid)
    out: list[SharedSegment] = []

    def add_runs(seg: SharedSegment) -> None:
        cols = seg.first_page + np.arange(len(seg.pages))
        row0 = int(seg.rows[0])
        full = page_valid[seg.pages] == block_size
        cut = np.flatnonzero(~full[:-1] | (shifts[row0, cols[1:]] != shifts[row0, cols[:-1]])) + 1
        for a, b in zip(np.r_[0, cut], np.r_[cut, len(cols)]):
            keys = int((b - a - 1) * block_size + page_valid[seg.pages[b - 1]])
            out.append(SharedSegment(0, seg.rows, int(cols[a]), seg.pages[a:b], seg.q_shift, keys))

    for level in plan.shared:
        for seg in level:
            add_runs(seg)
    # Own pages that are not at their true position: chunk pages after a row's last shared one.
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    num_pages = _num_pages(seq_lens, block_size)
    width = int(num_pages.max(initial=0))
    cols = np.arange(width)
    table = block_table[:, :width].astype(np.int64)
    in_own = (cols[None, :] >= plan.own_first_page[:, None]) & (cols[None, :] < num_pages[:, None])
    moved = in_own & ((shifts[:, :width] != 0) | (page_valid[np.where(in_own, table, 0)] < block_size))
    own_first_page = plan.own_first_page.copy()
    for r in np.flatnonzero(moved.any(1)):
        last = int(np.flatnonzero(moved[r])[-1])
        if (last + 1) * block_size > seq_lens[r] - query_lens[r]:
            return None  # its queries share a page with chunk keys
        first = int(plan.own_first_page[r])
        add_runs(SharedSegment(0, np.array([r]), first, table[r, first : last + 1], np.zeros(1, np.int32)))
        own_first_page[r] = last + 1
    if not out:
        return plan
    return CascadePlan([out], own_first_page, plan.pages_read, plan.flat_pages_read, shifts=shifts)


_ROW_CODES = np.zeros(0, dtype=np.uint64)


def _row_codes(num_rows: int) -> np.ndarray:
    """A fixed random 64-bit number per batch row (drawn once, grown on demand)."""
    global _ROW_CODES
    if len(_ROW_CODES) < num_rows:
        _ROW_CODES = np.random.default_rng(0).integers(0, 2**63, max(num_rows, 1024), dtype=np.int64).view(np.uint64)
    return _ROW_CODES


def token_positions(seq_lens: np.ndarray, query_start_loc: np.ndarray) -> np.ndarray:
    """Each query token's position (vLLM's: its slot index in the request; a row's queries are its
    last tokens), int64.

    >>> token_positions(np.array([5, 9]), np.array([0, 2, 3])).tolist()
    [3, 4, 8]
    """
    qsl = np.asarray(query_start_loc, dtype=np.int64)
    query_lens = np.diff(qsl)
    return np.arange(int(qsl[-1])) + np.repeat(np.asarray(seq_lens, dtype=np.int64) - query_lens - qsl[:-1],
                                              query_lens)


def rows_tokens(query_start_loc: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The query tokens of `rows` (indices into the step's tokens, row after row) and each row's count.

    >>> tokens, lens = rows_tokens(np.array([0, 2, 3, 6]), np.array([2, 0]))
    >>> tokens.tolist(), lens.tolist()
    ([3, 4, 5, 0, 1], [3, 2])
    """
    qsl = np.asarray(query_start_loc, dtype=np.int64)
    lens = qsl[rows + 1] - qsl[rows]
    return np.repeat(qsl[rows], lens) + _index_within(lens), lens


def _index_within(counts: np.ndarray) -> np.ndarray:
    """[0, 1, .., c0-1, 0, 1, .., c1-1, ...] for counts [c0, c1, ...]."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def _num_pages(seq_lens: np.ndarray, block_size: int) -> np.ndarray:
    return (np.asarray(seq_lens, dtype=np.int64) + block_size - 1) // block_size
