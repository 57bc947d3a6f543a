"""Composed requests in the paged attention path: shifts from page annotations (kv/chunk_pages.py),
cascade planning with shifts, and the torch path against the segment reference (ops/chunk_attention.py)."""

import numpy as np
import pytest
import torch

from vllm_cascade.attention.plan import flat_plan, plan_cascade
from sharing import composition_layout

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


def test_shared_pages_at_different_shifts_are_not_one_level():
    table = np.array([[5, 6, 1], [5, 6, 2], [5, 6, 3]])
    seq, q = np.array([9, 9, 9]), np.array([1, 1, 1])
    shifts = np.array([[0, 0, 0], [0, 0, 0], [3, 3, 0]])
    plan = plan_cascade(table, seq, q, PAGE, min_saved_pages=1, min_saved_fraction=0.0, shifts=shifts)
    assert [s.rows.tolist() for lvl in plan.shared for s in lvl] == [[0, 1]]


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
    rows, comps, seq_lens, query_lens, queries_eng, queries_ref, q_true = [], [], [], [], [], [], []
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
    for p in (plan, flat_plan(seq_lens, PAGE)):
        out = torch.empty_like(query)
        cascade_attention(query, k_eng, v_eng, torch.from_numpy(table), seq_lens, qsl, p, D**-0.5, out, view)
        for r, (_, true_offsets, tail_slot, tail_true, num_slots) in enumerate(comps):
            segs = [Segment(cache_pages[c], lens[c], t) for c, t in zip(orders[r], true_offsets)]
            segs.append(Segment(rows[r][tail_slot // PAGE :], num_slots - tail_slot, tail_true, causal=True))
            ref = composed_attention(queries_ref[r], q_true[r], segs, k_ref, v_eng, D**-0.5, table_cs)
            torch.testing.assert_close(out[qsl[r] : qsl[r + 1]], ref.to(out.dtype), rtol=1e-4, atol=2e-5)  # the path computes in float32
    if len(orders) >= 2:
        assert plan.shared, "rows 0 and 1 compose the same order: their chunk pages are one shared level"
