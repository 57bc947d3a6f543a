"""Composed requests in the paged attention path: shifts from page annotations (kv/chunk_pages.py),
cascade planning with shifts, and the torch path against the segment reference (ops/chunk_attention.py)."""

import numpy as np
import pytest
import torch
from sharing import composition_layout

from vllm_cascade.attention.plan import flat_plan, plan_cascade
from vllm_cascade.kv.chunk_pages import ChunkPages, ChunkView
from vllm_cascade.ops.chunk_attention import Segment, composed_attention, rotate_query
from vllm_cascade.ops.torch_attention import cascade_attention

D, PAGE, HKV, G = 16, 4, 2, 2


def cos_sin(max_pos=512, rot=D):
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def test_plain_rows_have_no_shifts():
    pages = ChunkPages(16, PAGE)
    table = np.array([[1, 2, 3]])
    assert pages.shifts(table, np.array([12])) is None
    pages.annotate([9], [3], [0])
    assert pages.shifts(table, np.array([12])) is None  # no row touches page 9
    pages.annotate([1, 2], [4, 4], [0, 4])  # full chunk pages where they were computed
    assert pages.shifts(table, np.array([12])).tolist() == [[0, 0, 0]]


def test_annotations_count_pins_and_must_agree():
    pages = ChunkPages(8, PAGE)
    pages.annotate([1, 2], [4, 3], [0, 4])
    pages.annotate([1], [4], [0])  # a second chunk pinning the same page
    with pytest.raises(ValueError, match="different"):
        pages.annotate([2], [4], [4])
    pages.release([1])
    assert pages.count == 2
    pages.release([1, 2])
    assert pages.count == 0 and pages.valid.tolist() == [PAGE] * 8
    with pytest.raises(ValueError):
        pages.release([3])


def test_pages_shared_wherever_rows_hold_them():
    """Rows compose chunks X = [5, 6] and Y = [8] in other orders and at other shifts: each chunk
    is one segment for every row holding it, its query rotated back by the row's extra shift; a
    row's private page before its last shared one is a one-row segment, its tail its own level."""
    table = np.array([[5, 6, 8, 1], [8, 5, 6, 2], [9, 5, 6, 3]])
    shifts = np.array([[0, 0, -8, 0], [-4, 3, 3, 0], [0, 7, 7, 0]])
    seq, q = np.full(3, 4 * PAGE - 1), np.ones(3, dtype=int)
    plan = plan_cascade(table, seq, q, PAGE, min_saved_pages=1, min_saved_fraction=0.0, shifts=shifts)
    got = [(s.level, s.rows.tolist(), s.first_page, s.pages.tolist(), s.q_shift.tolist())
           for lvl in plan.shared for s in lvl]
    assert got == [(0, [0, 1, 2], 0, [5, 6], [0, 3, 7]), (1, [0, 1], 2, [8], [0, 4]), (1, [2], 0, [9], [0])]
    assert plan.own_first_page.tolist() == [3, 3, 3] and (plan.pages_read, plan.flat_pages_read) == (7, 12)


def test_a_page_held_twice_by_a_row_is_not_shared():
    table = np.array([[5, 5, 1], [5, 7, 2]])
    plan = plan_cascade(table, np.array([9, 9]), np.array([1, 1]), PAGE, min_saved_pages=1, min_saved_fraction=0.0,
                        shifts=np.zeros((2, 3), np.int32))
    assert plan.is_flat


@pytest.mark.parametrize("seed", range(60))
def test_any_offset_plan_reads_every_page_once(seed):
    """Random compositions (chunks in any order and subset, private pages between, shifts from
    annotations): each (row, page) is read once, by one segment or the own level; a segment's pages
    lie wholly before each row's queries, one after the other, at the row's shift plus q_shift."""
    rng = np.random.default_rng(seed)
    annotations = ChunkPages(512, PAGE)
    ids = iter(range(1, 512))
    chunks = []
    for _ in range(int(rng.integers(1, 5))):
        n = int(rng.integers(1, 4 * PAGE))
        pages = [next(ids) for _ in range(-(-n // PAGE))]
        annotations.annotate(pages, [min(PAGE, n - i * PAGE) for i in range(len(pages))],
                             [int(rng.integers(0, 3)) * PAGE + i * PAGE for i in range(len(pages))])
        chunks.append(pages)
    rows, seq_lens, query_lens = [], [], []
    for _ in range(int(rng.integers(2, 9))):
        row = []
        for c in rng.permutation(len(chunks))[: int(rng.integers(0, len(chunks) + 1))]:
            row += [next(ids) for _ in range(int(rng.integers(0, 2)))] + chunks[c]
        row += [next(ids) for _ in range(int(rng.integers(1, 4)))]
        qlen = int(rng.integers(1, 2 * PAGE))
        rows.append(row), seq_lens.append(len(row) * PAGE - int(rng.integers(0, PAGE))), query_lens.append(qlen)
    table = np.zeros((len(rows), max(map(len, rows)) + 2), dtype=np.int64)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    seq_lens, query_lens = np.array(seq_lens), np.minimum(np.array(query_lens), seq_lens)
    shifts = annotations.shifts(table, seq_lens)
    if shifts is None:
        return
    plan = plan_cascade(table, seq_lens, query_lens, PAGE, int(rng.integers(2, 5)), min_saved_pages=1,
                        min_saved_fraction=0.0, shifts=shifts)
    read = {r: [] for r in range(len(rows))}
    for level, segments in enumerate(plan.shared):
        for seg in segments:
            assert seg.level == level and len(seg.pages) >= 1
            base = shifts[seg.rows[0], seg.first_page : seg.first_page + len(seg.pages)]
            for r, dq in zip(seg.rows, seg.q_shift):
                col = int(np.flatnonzero(table[r] == seg.pages[0])[0])
                span = range(col, col + len(seg.pages))
                assert table[r, list(span)].tolist() == seg.pages.tolist()
                assert span.stop * PAGE <= seq_lens[r] - query_lens[r]
                assert (shifts[r, list(span)] == base + dq).all()
                read[r] += list(span)
    pages_read = sum(len(s.pages) for lvl in plan.shared for s in lvl)
    for r, cols in read.items():
        num_pages = -(-seq_lens[r] // PAGE)
        assert sorted(cols + list(range(plan.own_first_page[r], num_pages))) == list(range(num_pages))
        pages_read += num_pages - plan.own_first_page[r]
    assert plan.pages_read == pages_read <= plan.flat_pages_read


def _compose(order, lens, cache_pages, next_page, tail_len):
    """Lay out one request -> (its layout, as composition_layout gives it, its block-table row)."""
    comp = composition_layout([lens[c] for c in order], tail_len, PAGE)
    row = [p for c in order for p in cache_pages[c]]
    row += [next(next_page) for _ in range(-(-(comp[4] - comp[2]) // PAGE))]
    return comp, row


@pytest.mark.parametrize("seed", range(12))
def test_torch_path_equals_segment_reference(seed):
    """Rows compose chunks in different orders (some the same order, so the planner shares pages);
    the engine's view (query and tail keys rotated at slot positions, chunk keys at local ones,
    shifts from annotations) equals the reference (true positions, query rotated per segment)."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    table_cs = cos_sin()
    num_pages = 64
    k_eng = torch.zeros(num_pages, HKV, PAGE, D, dtype=torch.float64)
    v_eng = torch.randn(num_pages, HKV, PAGE, D, generator=gen, dtype=torch.float64)
    annotations = ChunkPages(num_pages, PAGE)
    next_page = iter(range(1, num_pages))
    lens = [int(n) for n in rng.integers(1, 3 * PAGE, size=3)]
    cache_pages = []
    for n in lens:  # each chunk computed alone: keys rotated at local positions 0..n-1
        pages = [next(next_page) for _ in range(-(-n // PAGE))]
        raw = torch.randn(n, HKV, D, generator=gen, dtype=torch.float64)
        keys = rotate_query(raw, torch.arange(n), table_cs, D)
        for j in range(n):
            k_eng[pages[j // PAGE], :, j % PAGE] = keys[j]
        annotations.annotate(pages, [min(PAGE, n - i * PAGE) for i in range(len(pages))],
                             [i * PAGE for i in range(len(pages))])
        cache_pages.append(pages)
    k_ref = k_eng.clone()
    orders = [[0, 1, 2], [0, 1, 2], [2, 0], [1], [2, 1, 0]][: int(rng.integers(2, 6))]
    rows, comps, seq_lens, query_lens, queries_eng, queries_ref, q_true, q_raws = [], [], [], [], [], [], [], []
    for order in orders:
        tail = int(rng.integers(1, 2 * PAGE))
        comp, row = _compose(order, lens, cache_pages, next_page, tail)
        _, _, tail_slot, tail_true, num_slots = comp
        raw = torch.randn(tail, HKV, D, generator=gen, dtype=torch.float64)
        slots = tail_slot + torch.arange(tail)
        true = tail_true + torch.arange(tail)
        for i in range(tail):
            page, off = row[int(slots[i]) // PAGE], int(slots[i]) % PAGE
            k_eng[page, :, off] = rotate_query(raw[i : i + 1], int(slots[i]), table_cs, D)[0]
            k_ref[page, :, off] = rotate_query(raw[i : i + 1], int(true[i]), table_cs, D)[0]
        qlen = int(rng.integers(1, tail + 1))
        q_raw = torch.randn(qlen, HKV * G, D, generator=gen, dtype=torch.float64)
        queries_eng.append(rotate_query(q_raw, slots[tail - qlen :], table_cs, D))
        queries_ref.append(rotate_query(q_raw, true[tail - qlen :], table_cs, D))
        q_true.append(true[tail - qlen :])
        q_raws.append(q_raw)
        rows.append(row), comps.append(comp), seq_lens.append(num_slots), query_lens.append(qlen)
    width = max(map(len, rows))
    table = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    seq_lens, query_lens = np.array(seq_lens), np.array(query_lens)
    qsl = np.concatenate([[0], np.cumsum(query_lens)])
    shifts = annotations.shifts(table, seq_lens)
    view = ChunkView(shifts, torch.from_numpy(annotations.valid), table_cs)
    plan = plan_cascade(table, seq_lens, query_lens, PAGE, min_saved_pages=1, min_saved_fraction=0.0, shifts=shifts)
    query = torch.cat(queries_eng)
    # The model's query before RoPE (query_rope="backend"): the path rotates it once per level.
    for p, q_in, rope in ((plan, query, None), (flat_plan(seq_lens, PAGE), query, None),
                          (plan, torch.cat(q_raws), table_cs), (flat_plan(seq_lens, PAGE), torch.cat(q_raws), table_cs)):
        out = torch.empty_like(query)
        cascade_attention(q_in, k_eng, v_eng, torch.from_numpy(table), seq_lens, qsl, p, D**-0.5, out, view, rope)
        for r, (_, true_offsets, tail_slot, tail_true, num_slots) in enumerate(comps):
            segs = [Segment(cache_pages[c], lens[c], t) for c, t in zip(orders[r], true_offsets)]
            segs.append(Segment(rows[r][tail_slot // PAGE :], num_slots - tail_slot, tail_true, causal=True))
            ref = composed_attention(queries_ref[r], q_true[r], segs, k_ref, v_eng, D**-0.5, table_cs)
            torch.testing.assert_close(out[qsl[r] : qsl[r + 1]], ref.to(out.dtype), rtol=1e-4, atol=2e-5)  # the path computes in float32
    if len(orders) >= 2:
        assert plan.shared, "rows 0 and 1 compose the same order: their chunk pages are one shared level"
    if len(orders) >= 3:  # row 2 holds chunks 2 and 0 elsewhere than rows 0 and 1: shared all the same
        assert any(s.q_shift.any() and 2 in s.rows for lvl in plan.shared for s in lvl)
