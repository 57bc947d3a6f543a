"""The work-list decomposition and the fused Triton kernels against the torch reference.

With a GPU the kernels run compiled. Without one they run in Triton's
interpreter, which must be on before triton is first imported (its own library
functions are defined then); the suite imports triton early (through vLLM), so
the kernel cases run again in a fresh process with TRITON_INTERPRET=1.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sharing import random_batch

from vllm_cascade.attention.plan import flat_plan, plan_cascade
from vllm_cascade.attention.worklist import build_worklist
from vllm_cascade.kv.chunk_pages import ChunkView
from vllm_cascade.ops.torch_attention import attend, cascade_attention, gather_pages, merge

ON_GPU = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # set before this process imported triton


def batch(seed, g, d, page=8, max_levels=3, hkv=None):
    rng = np.random.default_rng(seed)
    table, seq_lens, query_lens, num_pages = random_batch(rng, page, max_rows=6)
    qsl = np.concatenate([[0], np.cumsum(query_lens)])
    hkv = hkv or int(rng.choice([1, 2]))
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(num_pages, hkv, page, d, generator=gen)
    v = torch.randn(num_pages, hkv, page, d, generator=gen)
    q = torch.randn(int(qsl[-1]), hkv * g, d, generator=gen)
    plan = plan_cascade(table, seq_lens, query_lens, page, max_levels, min_saved_pages=1, min_saved_fraction=0.0)
    ref = torch.empty_like(q)
    cascade_attention(q, k, v, torch.from_numpy(table), seq_lens, qsl, plan, d**-0.5, ref)
    return rng, table, seq_lens, qsl, q, k, v, plan, ref


def cos_sin(rot, max_pos=64, base=1e4):
    """vLLM's cos_sin_cache [max_pos, rot]: cos of the angles, then sin."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def random_chunks(rng, table, num_pages, page, rot, off_row=True, run=1) -> ChunkView:
    """Random pads (page_valid in [1, page]) and shifts in [-40, 40] for a batch's pages. A shift
    follows its physical page, so rows sharing a page agree and the page stays shareable; with
    `off_row` one row's shifts differ, so the planner must keep that row out of shared levels.
    Page 0 (the table's padding, where decode steps grow) stays full and unshifted. With `run` > 1,
    runs of that many consecutive page ids share a shift (as a chunk's pages do), so many items have
    one shift throughout (the kernel then rotates the query instead of the keys)."""
    page_valid = np.where(rng.random(num_pages) < 0.5, page, rng.integers(1, page + 1, num_pages))
    page_shift = rng.integers(-40, 41, -(-num_pages // run))[np.arange(num_pages) // run]
    page_valid[0], page_shift[0] = page, 0
    shifts = page_shift[table]
    if off_row:
        shifts[int(rng.integers(len(table)))] += rng.integers(-3, 4, table.shape[1])
    return ChunkView(shifts.astype(np.int32), torch.from_numpy(page_valid.astype(np.int32)), cos_sin(rot))


def reference(q, k, v, table, seq_lens, qsl, plan, chunks=None):
    out = torch.empty_like(q)
    cascade_attention(q, k, v, torch.from_numpy(table), seq_lens, qsl, plan, q.shape[-1] ** -0.5, out, chunks)
    return out


@pytest.mark.parametrize("seed", range(30))
def test_worklist_covers_every_key_once(seed):
    """Run the items with torch: same result as the plan's reference attention."""
    rng, table, seq_lens, qsl, q, k, v, plan, ref = batch(seed, g=2, d=16)
    page = k.shape[2]
    narrow = int(rng.integers(1, 5))
    wl = build_worklist(plan, seq_lens, qsl, page, tokens_per_item=narrow, pages_per_item=int(rng.integers(1, 4)),
                        wide_tokens_per_item=narrow + int(rng.integers(0, 6)))
    assert (wl.q_len[: wl.num_wide] > narrow).any() or wl.num_wide == 0
    assert (wl.q_len[wl.num_wide :] <= narrow).all()
    partial = {}  # partial row -> (out, lse) of one token
    for w in range(wl.num_items):
        tokens = torch.from_numpy(wl.q_tokens[wl.q_off[w] : wl.q_off[w] + wl.q_len[w]].astype(np.int64))
        first = int(wl.page_start[w])
        pages = torch.from_numpy(table[wl.bt_row[w], first : first + -(-int(wl.kv_len[w]) // page)])
        q_pos = torch.from_numpy(wl.q_pos[tokens.numpy()].astype(np.int64)) if wl.causal[w] else None
        o, lse = attend(q[tokens], gather_pages(k, pages, int(wl.kv_len[w])),
                        gather_pages(v, pages, int(wl.kv_len[w])), q.shape[-1] ** -0.5, q_pos, first * page)
        for i in range(len(tokens)):
            partial[int(wl.item_part[w]) + i] = (o[i], lse[i])
    assert sorted(partial) == list(range(wl.num_partial_rows))
    for t in range(q.shape[0]):
        acc = None
        for c in range(wl.contrib_off[t], wl.contrib_off[t + 1]):
            piece = partial[int(wl.contrib_row[c])]
            acc = piece if acc is None else merge(*acc, *piece)
        torch.testing.assert_close(acc[0], ref[t], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("seed", range(40))
def test_decode_fast_path_equals_the_general_path(seed):
    """Decode steps (one query per row), flat and with shared levels: the same items, same order."""
    from vllm_cascade.attention import worklist
    from vllm_cascade.attention.plan import flat_plan

    rng = np.random.default_rng(seed)
    page, pages_per_item, narrow = int(rng.choice([8, 16])), int(rng.integers(1, 6)), int(rng.integers(1, 9))
    if seed % 2:
        rows = int(rng.integers(1, 20))
        seq_lens = rng.integers(1, 300, size=rows)
        plan = flat_plan(seq_lens, page)
    else:
        table, seq_lens, _, _ = random_batch(rng, page, max_rows=40)
        rows = len(seq_lens)
        plan = plan_cascade(table, seq_lens, np.ones(rows, np.int64), page, int(rng.integers(2, 4)),
                            min_saved_pages=1, min_saved_fraction=0.0)
    qsl = np.arange(rows + 1)
    for _ in range(2):  # the second call reuses the plan's cached shared items
        fast = worklist.build_worklist(plan, seq_lens, qsl, page, narrow, pages_per_item, narrow * 4)
        general = worklist._general_worklist(plan, seq_lens, qsl, page, narrow, pages_per_item, narrow * 4)
        for name in worklist.WorkList.__dataclass_fields__:
            np.testing.assert_array_equal(np.asarray(getattr(fast, name)), np.asarray(getattr(general, name)), name)


@pytest.fixture(scope="module")
def triton_cascade():
    from vllm_cascade.ops import triton_cascade

    return triton_cascade


@pytest.mark.skipif(ON_GPU or INTERPRETED, reason="the kernel cases run directly in this process")
def test_fused_kernels_under_the_interpreter():
    names = ("test_fused_kernels_match_reference", "test_triton_cascade_steps", "test_fixed_capacity",
             "test_fill_programs_cuts_shorter_runs",
             "test_chunked_kernels_match_reference", "test_chunk_flag_follows_each_step",
             "test_queries_before_rope_match_reference")
    cases = [f"{__file__}::{name}" for name in names]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *cases]
    proc = subprocess.run(cmd, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(__file__))
    assert proc.returncode == 0 and "22 passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="needs a GPU or TRITON_INTERPRET=1 from process start")
@pytest.mark.parametrize("seed", range(8))
def test_fused_kernels_match_reference(triton_cascade, seed):
    g = [1, 2, 4, 8][seed % 4]
    d = [16, 32][seed % 2]
    _, table, seq_lens, qsl, q, k, v, plan, ref = batch(seed, g=g, d=d)
    device = "cuda" if ON_GPU else "cpu"
    kernel = triton_cascade.TritonCascade(q.shape[1], k.shape[1], k.shape[2], d**-0.5, pages_per_item=2,
                                          device=device, head_dim=d, wide_m=[16, 32, 64][seed % 3])
    cache = torch.cat([k, v], dim=-1).to(device)  # the [pages, H, N, 2D] layout of the backend
    kernel.plan(plan, torch.from_numpy(table).to(device, torch.int32), seq_lens, qsl)
    # Buffers larger than this step needs, as under CUDA graphs.
    assert kernel.capacity["items"] > kernel.worklist["item_range"][2].item()
    assert kernel.capacity["tokens"] > q.shape[0]
    out = torch.full_like(q, float("nan"), device=device)
    kernel.run(q.to(device), cache[..., :d], cache[..., d:], out)
    tol = 2e-3 if ON_GPU else 1e-4  # GPU dots round inputs to tf32
    torch.testing.assert_close(out.cpu(), ref, atol=tol, rtol=tol)


@pytest.mark.skipif(not ON_GPU, reason="bf16 at the model's head dims and page sizes: GPU only")
@pytest.mark.parametrize("cascade", [False, True])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bf16_batches_match_reference(triton_cascade, head_dim, page, group, cascade):
    """The Triton path in the model's dtype, as the backend launches it (FULL-graph decode steps):
    random bf16 batches (partial pages, prefill rows with context before their query mixed with
    decode rows, or decode steps alone) against the fp32 torch reference; relative error < 1e-2, no
    NaN. Half the draws use the backend's settings, half 2-page KV runs (long contexts split)."""
    from test_gpu_attention import run_against_torch

    hkv, scale = 2, head_dim**-0.5
    for seed in range(6):
        rng = np.random.default_rng(seed * 1000 + head_dim + page + group)
        table, seq_lens, query_lens, num_pages = random_batch(rng, page, max_rows=10)
        if seed % 3 == 0:  # a decode step, what the backend sends this path under FULL graphs
            query_lens = np.ones_like(query_lens)
        qsl = np.concatenate([[0], np.cumsum(query_lens)])
        plan = plan_cascade(table, seq_lens, query_lens, page, max_levels=3 if cascade else 1,
                            min_saved_pages=1, min_saved_fraction=0.0)
        runs = {"pages_per_item": 32, "flat_pages_per_item": 64} if seed % 2 else {"pages_per_item": 2}
        kernel = triton_cascade.TritonCascade(hkv * group, hkv, page, scale, device="cuda", head_dim=head_dim,
                                              fill_programs=True, **runs)
        err = run_against_torch(kernel, plan, plan, table, seq_lens, qsl, num_pages, hkv)
        assert err < 1e-2, f"seed {seed}: relative error {err:.2e}, levels {plan.num_levels}"


@pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="needs a GPU or TRITON_INTERPRET=1 from process start")
def test_triton_cascade_steps(triton_cascade):
    """The backend's object over several steps: packed work lists, alternating and growing buffers."""
    device = "cuda" if ON_GPU else "cpu"
    kernel = None
    capacities = []
    for seed in (11, 12, 13, 14, 15, 16):
        _, table, seq_lens, qsl, q, k, v, plan, ref = batch(seed, g=2, d=16, hkv=2)
        if kernel is None:
            kernel = triton_cascade.TritonCascade(q.shape[1], k.shape[1], k.shape[2], 16**-0.5, pages_per_item=2,
                                                  device=device, head_dim=16)
        cache = torch.cat([k, v], dim=-1).to(device)
        kernel.plan(plan, torch.from_numpy(table).to(device, torch.int32), seq_lens, qsl)
        out = torch.full_like(q, float("nan"), device=device)
        kernel.run(q.to(device), cache[..., :16], cache[..., 16:], out)
        tol = 2e-3 if ON_GPU else 1e-4
        torch.testing.assert_close(out.cpu(), ref, atol=tol, rtol=tol)
        capacities.append((dict(kernel.capacity), kernel.worklist["q_off"].data_ptr(), kernel.partials[0].data_ptr()))
    # While the capacities hold, the kernels see the same buffers every step (what graph replay needs).
    for (cap_a, *ptrs_a), (cap_b, *ptrs_b) in zip(capacities, capacities[1:]):
        assert cap_a != cap_b or ptrs_a == ptrs_b
    assert len({str(c[0]) for c in capacities}) < len(capacities)  # some steps reused the buffers


@pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="needs a GPU or TRITON_INTERPRET=1 from process start")
def test_fill_programs_cuts_shorter_runs(triton_cascade):
    """`fill_programs`: a step with few pages per program is cut into shorter KV runs (down to
    FILL_MIN_PAGES), with the same result; a batch of one narrow tile (batch-1 decode) has no wide
    items, so its wide launch is left out."""
    device = "cuda" if ON_GPU else "cpu"
    page, d = 4, 16
    table = np.arange(1, 65).reshape(1, 64)
    seq_lens, qsl = np.array([250]), np.array([0, 1])
    k, v = (torch.randn(65, 2, page, d) for _ in range(2))
    q = torch.randn(1, 4, d)
    plan = flat_plan(seq_lens, page)
    ref = reference(q, k, v, table, seq_lens, qsl, plan)
    for fill in (False, True):
        kernel = triton_cascade.TritonCascade(4, 2, page, d**-0.5, pages_per_item=64, device=device, head_dim=d,
                                              fill_programs=fill)
        kernel.plan(plan, torch.from_numpy(table).to(device, torch.int32), seq_lens, qsl)
        expect = max(triton_cascade.FILL_MIN_PAGES, 63 // kernel.programs) if fill else 64
        assert kernel.last_pages_per_item == min(64, expect)
        assert kernel.worklist["item_range"][1].item() == 0  # no wide items
        out = torch.full_like(q, float("nan"), device=device)
        kernel.run(q.to(device), k.to(device), v.to(device), out)
        tol = 2e-3 if ON_GPU else 1e-4
        torch.testing.assert_close(out.cpu(), ref, atol=tol, rtol=tol)
    # A step with at least as many items as programs keeps its long runs (fewer partials to merge).
    rows = kernel.programs
    many = np.tile(np.arange(1, 9), (rows, 1))
    kernel.plan(flat_plan(np.full(rows, 32), page), torch.from_numpy(many).to(device, torch.int32),
                np.full(rows, 32), np.arange(rows + 1))
    assert kernel.last_pages_per_item == 64


@pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="needs a GPU or TRITON_INTERPRET=1 from process start")
def test_fixed_capacity(triton_cascade):
    """Fixed buffers (CUDA graphs) never move; a step too big for them is cut into longer KV runs."""
    device = "cuda" if ON_GPU else "cpu"
    steps = [batch(seed, g=2, d=16, hkv=2, max_levels=3) for seed in range(21, 27)]
    # The least that always fits: one KV run per (tile, level).
    unsplit = [build_worklist(plan, seq, qsl, 8, 8, 1 << 20, 32) for _, _, seq, qsl, _, _, _, plan, _ in steps]
    capacity = {"tokens": max(len(wl.q_pos) for wl in unsplit), "rows": max(wl.num_partial_rows for wl in unsplit),
                "items": max(wl.num_items for wl in unsplit)}
    kernel = triton_cascade.TritonCascade(4, 2, 8, 16**-0.5, pages_per_item=1, device=device, head_dim=16,
                                          capacity=capacity)
    pointers, stretched = set(), 0
    for _, table, seq_lens, qsl, q, k, v, plan, ref in steps:
        cache = torch.cat([k, v], dim=-1).to(device)
        kernel.plan(plan, torch.from_numpy(table).to(device, torch.int32), seq_lens, qsl)
        stretched += kernel.last_pages_per_item > 1
        out = torch.full_like(q, float("nan"), device=device)
        kernel.run(q.to(device), cache[..., :16], cache[..., 16:], out)
        tol = 2e-3 if ON_GPU else 1e-4
        torch.testing.assert_close(out.cpu(), ref, atol=tol, rtol=tol)
        pointers.add((kernel.worklist["q_off"].data_ptr(), kernel.partials[0].data_ptr()))
    assert len(pointers) == 1
    assert stretched  # some step did not fit one page per item
    # Triton specializes pointers on 16-byte alignment: every field starts aligned, whatever the capacity.
    assert all(offset % 4 == 0 for offset, _ in kernel._layout.values())


# (seed, G, head dim, rotary dim, decode step, wide_m, shift run): prefill steps (with wide and narrow
# items) and decode steps, all with shared levels; GQA 1-4, partial rotary once; shifts per page (keys
# rotated) or per run of pages (mostly one per item: the query rotated).
CHUNK_CASES = [(29, 1, 16, 16, False, 32, 1), (15, 2, 32, 16, False, 32, 1), (2, 4, 16, 16, True, 16, 1),
               (6, 4, 32, 32, False, 64, 1), (29, 2, 32, 16, False, 32, 6), (2, 4, 16, 16, True, 16, 6)]


@pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="needs a GPU or TRITON_INTERPRET=1 from process start")
@pytest.mark.parametrize("seed,g,d,rot,decode,wide_m,run", CHUNK_CASES)
def test_chunked_kernels_match_reference(triton_cascade, seed, g, d, rot, decode, wide_m, run):
    """Steps with chunks: pad slots dropped and keys shifted in shared and own, wide and narrow items;
    a row whose shifts differ shares pages all the same, its query rotated back (q_shift)."""
    rng = np.random.default_rng(100 + seed)
    table, seq_lens, query_lens, num_pages = random_batch(rng, 8, max_rows=6)
    if decode:
        query_lens = np.ones_like(query_lens)
    qsl = np.concatenate([[0], np.cumsum(query_lens)])
    chunks = random_chunks(rng, table, num_pages, 8, rot, run=run)
    plan = plan_cascade(table, seq_lens, query_lens, 8, 3, min_saved_pages=1, min_saved_fraction=0.0,
                        shifts=chunks.shifts)
    assert plan.shared, "the case must have a shared level"
    assert any(s.q_shift.any() for lvl in plan.shared for s in lvl), "a row must share at another shift"
    gen = torch.Generator().manual_seed(seed)
    hkv = 2
    k, v = torch.randn(2, num_pages, hkv, 8, d, generator=gen)
    q = torch.randn(int(qsl[-1]), hkv * g, d, generator=gen)
    device = "cuda" if ON_GPU else "cpu"
    kernel = triton_cascade.TritonCascade(hkv * g, hkv, 8, d**-0.5, pages_per_item=2, device=device, head_dim=d,
                                          wide_m=wide_m)
    kernel.set_chunk_tables(chunks.page_valid.to(device), chunks.cos_sin_cache.to(device), 8, table.shape[1])
    kernel.plan(plan, torch.from_numpy(table).to(device, torch.int32), seq_lens, qsl, chunks.shifts)
    num_wide, num_items = kernel.worklist["item_range"][1:].tolist()
    assert num_items > num_wide and (num_wide > 0 or decode)  # narrow items, and wide ones on prefill steps
    out = torch.full_like(q, float("nan"), device=device)
    kernel.run(q.to(device), k.to(device), v.to(device), out)
    tol = 2e-3 if ON_GPU else 1e-4
    ref = reference(q, k, v, table, seq_lens, qsl, plan, chunks)
    torch.testing.assert_close(out.cpu(), ref, atol=tol, rtol=tol)
    plain = reference(q, k, v, table, seq_lens, qsl, flat_plan(seq_lens, 8))
    assert not torch.allclose(ref, plain, atol=1e-2)  # chunks mattered


@pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="needs a GPU or TRITON_INTERPRET=1 from process start")
@pytest.mark.parametrize("seed,chunked,decode", [(3, False, False), (4, False, True), (29, True, False), (2, True, True)])
def test_queries_before_rope_match_reference(triton_cascade, seed, chunked, decode):
    """query_rope (the fused Qwen3 class's hand-off): the kernel rotates the model's query before RoPE
    once per tile, at its position (minus its level's shift on chunk pages). Equal to the torch path
    given the same query, and to attention of the query the model would have rotated."""
    from vllm_cascade.attention.plan import token_positions
    from vllm_cascade.ops.fused_qwen3 import apply_rope_ref

    rng = np.random.default_rng(100 + seed)
    table, seq_lens, query_lens, num_pages = random_batch(rng, 8, max_rows=6)
    if decode:
        query_lens = np.ones_like(query_lens)
    qsl = np.concatenate([[0], np.cumsum(query_lens)])
    g, hkv, d = 2, 2, 32
    chunks = random_chunks(rng, table, num_pages, 8, d, run=6) if chunked else None
    shifts = None if chunks is None else chunks.shifts
    plan = plan_cascade(table, seq_lens, query_lens, 8, 3, min_saved_pages=1, min_saved_fraction=0.0, shifts=shifts)
    assert plan.shared, "the case must have a shared level"
    rope = cos_sin(d, max_pos=int(seq_lens.max()) + 64)
    gen = torch.Generator().manual_seed(seed)
    k, v = torch.randn(2, num_pages, hkv, 8, d, generator=gen)
    q_raw = torch.randn(int(qsl[-1]), hkv * g, d, generator=gen)
    device = "cuda" if ON_GPU else "cpu"
    kernel = triton_cascade.TritonCascade(hkv * g, hkv, 8, d**-0.5, pages_per_item=2, device=device, head_dim=d,
                                          wide_m=32, query_rope=rope.to(device))
    if chunks is not None:
        kernel.set_chunk_tables(chunks.page_valid.to(device), chunks.cos_sin_cache.to(device), 8, table.shape[1])
    kernel.plan(plan, torch.from_numpy(table).to(device, torch.int32), seq_lens, qsl, shifts)
    out = torch.full_like(q_raw, float("nan"), device=device)
    kernel.run(q_raw.to(device), k.to(device), v.to(device), out)
    ref = torch.empty_like(q_raw)
    cascade_attention(q_raw, k, v, torch.from_numpy(table), seq_lens, qsl, plan, d**-0.5, ref, chunks, rope)
    tol = 2e-3 if ON_GPU else 1e-4
    torch.testing.assert_close(out.cpu(), ref, atol=tol, rtol=tol)
    q_rot = apply_rope_ref(q_raw, torch.from_numpy(token_positions(seq_lens, qsl)), rope, d)
    torch.testing.assert_close(reference(q_rot, k, v, table, seq_lens, qsl, plan, chunks), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="needs a GPU or TRITON_INTERPRET=1 from process start")
def test_chunk_flag_follows_each_step(triton_cascade):
    """Fixed buffers (a graph captured on a plain step replays later ones): decode steps plain, then with
    chunks, advanced or built afresh, then plain again; each step gets its own results."""
    rng = np.random.default_rng(7)
    page, g, d = 8, 2, 16
    table, seq_lens, _, num_pages = random_batch(rng, page, max_rows=6)
    rows = len(seq_lens)
    qsl = np.arange(rows + 1)
    chunks = random_chunks(rng, table, num_pages, page, d, off_row=False)  # planned alike with or without
    gen = torch.Generator().manual_seed(7)
    k, v = torch.randn(2, num_pages, 2, page, d, generator=gen)
    q = torch.randn(rows, 2 * g, d, generator=gen)
    device = "cuda" if ON_GPU else "cpu"
    kernel = triton_cascade.TritonCascade(2 * g, 2, page, d**-0.5, pages_per_item=16, device=device, head_dim=d,
                                          capacity={"tokens": 16, "rows": 64, "items": 64})
    dev_table = torch.from_numpy(table).to(device, torch.int32)
    plan, pointers = None, set()
    # (with chunks, a fresh plan: built, not advanced)
    for with_chunks, fresh in ((False, True), (True, False), (True, False), (False, True), (True, True)):
        if plan is None or fresh:
            plan = plan_cascade(table, seq_lens, np.ones(rows, np.int64), page, 3, min_saved_pages=1,
                                min_saved_fraction=0.0)
        if with_chunks and not kernel._has_chunk_tables:  # the first step runs on the stand-ins
            kernel.set_chunk_tables(chunks.page_valid.to(device), chunks.cos_sin_cache.to(device), rows,
                                    table.shape[1])
        advanced = kernel.plan(plan, dev_table, seq_lens, qsl, chunks.shifts if with_chunks else None)
        assert advanced != fresh
        pointers.add((kernel.worklist["chunk_flag"].data_ptr(), kernel.partials[0].data_ptr()))
        ref = reference(q, k, v, table, seq_lens, qsl, plan, chunks if with_chunks else None)
        tables = (kernel._shifts, kernel._page_valid, kernel._cos_sin)
        # Eager (the specialization the host asks for), then as a captured graph replays it (both
        # specializations launched; the flag in device memory gives one of them the items).
        for chunks_arg in ("eager", None):
            out = torch.full_like(q, float("nan"), device=device)
            if chunks_arg == "eager":
                kernel.run(q.to(device), k.to(device), v.to(device), out)
            else:
                triton_cascade.cascade_attention_triton(q.to(device), k.to(device), v.to(device), kernel.block_table,
                                                        kernel.worklist, kernel.scale, out, kernel.partials,
                                                        kernel.wide_m, kernel.programs, tables, chunks=None)
            torch.testing.assert_close(out.cpu(), ref, atol=2e-3 if ON_GPU else 1e-4, rtol=2e-3 if ON_GPU else 1e-4)
        # The other specialization alone finds no items: no partial is written.
        for part in kernel.partials:
            part.fill_(float("nan"))
        triton_cascade.cascade_attention_triton(q.to(device), k.to(device), v.to(device), kernel.block_table,
                                                kernel.worklist, kernel.scale, out, kernel.partials, kernel.wide_m,
                                                kernel.programs, tables, chunks=not with_chunks)
        assert kernel.partials[1].isnan().all()
        seq_lens = seq_lens + 1  # decode: each row one key further (page 0 where a row needs a new page)
    assert plan.shared and len(pointers) == 1


def _planned(tc) -> dict[str, list[int]]:
    """The work list a TritonCascade uploads (its buffer's used part, field by field)."""
    image, layout = tc._dev.numpy(), tc._layout
    field = {name: image[offset : offset + size] for name, (offset, size) in layout.items()}
    items, tokens = int(field["item_range"][2]), int(field["num_tokens"][0])
    used = {"items": items, "tokens": tokens, "rows": int(field["contrib_off"][tokens])}
    q_entries = int(field["q_off"][items - 1] + field["q_len"][items - 1]) if items else 0
    sizes = {"q_tokens": q_entries, "q_shift": q_entries,
             "contrib_off": tokens + 1, "item_range": 3, "num_tokens": 1, "chunk_flag": 1}
    from vllm_cascade.ops.triton_cascade import _REGIONS

    return {name: field[name][: sizes.get(name, used.get(_REGIONS[name][0], 0))].tolist() for name in layout}


@pytest.mark.parametrize("seed", range(20))
def test_decode_steps_advance_the_last_work_list(seed):
    """Decode steps of unchanged requests: the advanced work list equals one built afresh."""
    from vllm_cascade.attention.plan import DecodePlanReuse
    from vllm_cascade.ops.triton_cascade import TritonCascade

    rng = np.random.default_rng(seed)
    page = int(rng.choice([4, 8]))
    table, seq_lens, _, next_page = random_batch(rng, page, max_rows=12)
    table = np.concatenate([table, np.zeros((len(table), 16), table.dtype)], axis=1)
    settings = dict(max_levels=int(rng.integers(1, 4)), min_saved_pages=1, min_saved_fraction=0.0)
    make = lambda: TritonCascade(4, 2, page, 0.1, device="cpu", head_dim=16, wide_m=16,  # noqa: E731
                                 pages_per_item=int(seed % 3) + 1, capacity={"tokens": 32, "rows": 512, "items": 512})
    tc, reuse, advanced = make(), DecodePlanReuse(), 0
    for _ in range(4 * page):
        ones, qsl = np.ones(len(seq_lens), np.int64), np.arange(len(seq_lens) + 1)
        plan = reuse.get("same requests", seq_lens, page, 0.0)
        if plan is None:
            plan = plan_cascade(table, seq_lens, ones, page, **settings)
            reuse.put("same requests", plan, seq_lens)
        advanced += tc.plan(plan, torch.from_numpy(table), seq_lens, qsl)
        fresh = make()
        assert not fresh.plan(plan_cascade(table, seq_lens, ones, page, **settings), torch.from_numpy(table),
                              seq_lens, qsl)
        assert _planned(tc) == _planned(fresh)
        assert tc.partial_rows == build_worklist(plan, seq_lens, qsl, page, 8, tc.last_pages_per_item, 8).num_partial_rows
        for r in range(len(seq_lens)):  # one decode step: a full last page gets a fresh one
            if seq_lens[r] % page == 0:
                table[r, seq_lens[r] // page] = next_page
                next_page += 1
        seq_lens = seq_lens + 1
    assert advanced > 0


def test_a_step_over_the_fixed_buffers_says_so_and_flat_fits():
    """Composed rows can hold many shared segments each (one per chunk): a step whose items cannot
    fit fixed buffers, even one KV run per (tile, segment), raises WorkListTooLarge, and the
    builder's fallback, a flat plan of the same step, fits (one item per row)."""
    from vllm_cascade.attention.plan import flat_plan
    from vllm_cascade.attention.worklist import WorkListTooLarge
    from vllm_cascade.ops.triton_cascade import TritonCascade

    page, rows, chunks = 4, 4, 6
    table = np.array([[1 + c for c in np.roll(np.arange(chunks), r)] + [100 + r] for r in range(rows)])
    seq_lens, qsl = np.full(rows, chunks * page + 1), np.arange(rows + 1)
    shifts = np.zeros(table.shape, np.int32)
    plan = plan_cascade(table, seq_lens, np.ones(rows, np.int64), page, min_saved_pages=1, min_saved_fraction=0.0,
                        shifts=shifts)
    assert sum(len(lvl) for lvl in plan.shared) >= 2  # chunks at other places in each row, shared anyway
    tc = TritonCascade(4, 2, page, 0.1, device="cpu", head_dim=16, wide_m=16, pages_per_item=1,
                       capacity={"tokens": rows, "rows": rows + 1, "items": rows + 1})
    tc.set_chunk_tables(torch.full((128,), page, dtype=torch.int32), torch.ones(1, 16), rows, table.shape[1])
    with pytest.raises(WorkListTooLarge):
        tc.plan(plan, torch.from_numpy(table), seq_lens, qsl, shifts)
    assert not tc.plan(flat_plan(seq_lens, page, shifts), torch.from_numpy(table), seq_lens, qsl, shifts)
