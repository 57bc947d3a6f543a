"""Chunk steps for FlashInfer: `split_uniform` + `SharedRuns` (host), the query gather-rotate and the
merge (Triton), with the attention kernel itself played by torch, against the torch reference path.

FlashInfer does not run on the CPU; tests/test_gpu_attention.py runs the real thing on a GPU. Here
every other part of that path runs: the split, the arrays FlashInfer is planned with, and (under
Triton's interpreter, in a fresh process as in test_triton_cascade.py) the two Triton kernels.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sharing import random_compositions
from test_triton_cascade import cos_sin

from vllm_cascade.attention.plan import flat_plan, plan_cascade, split_uniform
from vllm_cascade.kv.chunk_pages import ChunkView
from vllm_cascade.ops.chunk_attention import rotate_query
from vllm_cascade.ops.flashinfer_attention import SharedRuns
from vllm_cascade.ops.torch_attention import attend, cascade_attention, gather_pages, merge

ON_GPU = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
PAGE = 8


def chunk_step(seed: int, g: int = 2, d: int = 16, rot: int = 16, decode: bool = False):
    rng = np.random.default_rng(seed)
    table, seq_lens, query_lens, num_pages, annotated = random_compositions(rng, PAGE, query_len=1 if decode else None)
    qsl = np.concatenate([[0], np.cumsum(query_lens)])
    shifts = annotated.shifts(table, seq_lens)
    plan = plan_cascade(table, seq_lens, query_lens, PAGE, 3, min_saved_pages=1, min_saved_fraction=0.0, shifts=shifts)
    split = split_uniform(plan, table, seq_lens, query_lens, PAGE, annotated.valid)
    gen = torch.Generator().manual_seed(seed)
    hkv = 2
    k, v = torch.randn(2, num_pages, hkv, PAGE, d, generator=gen)
    q = torch.randn(int(qsl[-1]), hkv * g, d, generator=gen)
    view = ChunkView(shifts, torch.from_numpy(annotated.valid.copy()), cos_sin(rot, 256))
    ref = torch.empty_like(q)
    cascade_attention(q, k, v, torch.from_numpy(table), seq_lens, qsl, flat_plan(seq_lens, PAGE, shifts), d**-0.5,
                      ref, view)
    return table, seq_lens, qsl, plan, split, q, k, v, view, ref


def partials(split, table, seq_lens, qsl, q, k, v, q_shared):
    """What the two FlashInfer launches write: (o [T + R, Hq, D], log2-sum-exp [T + R, Hq]), the own
    level's rows first. `q_shared`: the gathered, rotated queries [R, Hq, D]."""
    runs = SharedRuns.of(split, qsl, PAGE)
    scale = q.shape[-1] ** -0.5
    outs, lses = [], []
    for r in range(len(seq_lens)):
        first, seq_len = int(split.own_first_page[r]), int(seq_lens[r])
        pages = torch.from_numpy(table[r, first : -(-seq_len // PAGE)])
        kk, vv = (gather_pages(c, pages, seq_len - first * PAGE) for c in (k, v))
        q_pos = torch.arange(seq_len - (qsl[r + 1] - qsl[r]), seq_len)
        o, lse = attend(q[qsl[r] : qsl[r + 1]], kk, vv, scale, q_pos=q_pos, k_pos0=first * PAGE)
        outs.append(o)
        lses.append(lse)
    for s in range(len(runs.kv_lens)):
        pages = torch.from_numpy(runs.pages[runs.kv_indptr[s] : runs.kv_indptr[s + 1]])
        kk, vv = (gather_pages(c, pages, int(runs.kv_lens[s])) for c in (k, v))
        o, lse = attend(q_shared[runs.qo_indptr[s] : runs.qo_indptr[s + 1]], kk, vv, scale)
        outs.append(o)
        lses.append(lse)
    return runs, torch.cat(outs), torch.cat(lses) / math.log(2)


def merged(runs, o_part, l_part):
    """Each token's partial rows merged in the order the merge kernel reads them (its own level's
    first, which is asserted) -> [T, Hq, D]."""
    num_tokens = len(runs.contrib_off) - 1
    out = torch.empty((num_tokens, *o_part.shape[1:]), dtype=o_part.dtype)
    for t in range(num_tokens):
        rows = runs.contrib_row[runs.contrib_off[t] : runs.contrib_off[t + 1]]
        assert rows[0] == t  # the own level's first
        acc = (o_part[rows[0]], l_part[rows[0]] * math.log(2))
        for row in rows[1:]:
            acc = merge(*acc, o_part[row], l_part[row] * math.log(2))
        out[t] = acc[0]
    return out


@pytest.mark.parametrize("seed", range(40))
def test_split_plan_attends_like_the_reference(seed):
    """Segments of one shift with pads only at their end, queries rotated once per segment, every
    partial merged: the reference path's result (which shifts keys and masks pads per page)."""
    table, seq_lens, qsl, plan, split, q, k, v, view, ref = chunk_step(seed, decode=seed % 4 == 0)
    assert split is not None
    segments = split.shared[0] if split.shared else []
    for s in segments:  # one shift per row, pads at the end only
        cols = s.first_page + np.arange(len(s.pages))
        assert (view.shifts[s.rows[0], cols] == view.shifts[s.rows[0], s.first_page]).all()
        assert (view.page_valid.numpy()[s.pages[:-1]] == PAGE).all()
    runs = SharedRuns.of(split, qsl, PAGE)
    q_shared = rotate_query(q[torch.from_numpy(runs.tokens)], torch.from_numpy(runs.rotation), view.cos_sin_cache,
                            q.shape[-1]) if len(runs.tokens) else q[:0]
    runs, o_part, l_part = partials(split, table, seq_lens, qsl, q, k, v, q_shared)
    torch.testing.assert_close(merged(runs, o_part, l_part), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed", range(30))
def test_prefix_plan_runs_attend_like_the_reference(seed):
    """Prefix-sharing plans (no chunk pages, up to 3 levels) take the same path: every level's
    segments in one launch over plainly gathered queries, each token's partials merged."""
    from test_triton_cascade import batch

    _, table, seq_lens, qsl, q, k, v, plan, ref = batch(seed, g=2, d=16)
    if plan.is_flat:
        pytest.skip("this draw plans no sharing")
    runs = SharedRuns.of(plan, qsl, PAGE)
    assert not runs.rotation.any()
    runs, o_part, l_part = partials(plan, table, seq_lens, qsl, q, k, v, q[torch.from_numpy(runs.tokens)])
    torch.testing.assert_close(merged(runs, o_part, l_part), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_runs_upload_keeps_each_field_aligned(seed):
    """The gather and merge kernels read the runs' arrays from one upload; each array starts 16-byte
    aligned whatever the step's sizes, so Triton compiles one variant of them, not one per alignment."""
    from vllm_cascade.ops.triton_cascade import pack_aligned

    _, _, qsl, _, split, *_ = chunk_step(seed)
    runs = SharedRuns.of(split, qsl, PAGE)
    fields = {"tokens": runs.tokens, "rotation": runs.rotation, "contrib_off": runs.contrib_off,
              "contrib_row": runs.contrib_row, "num_tokens": [int(qsl[-1])]}
    packed, layout = pack_aligned(fields)
    for name, (offset, n) in layout.items():
        assert offset % 4 == 0
        np.testing.assert_array_equal(packed[offset : offset + n], fields[name])


def test_split_cuts_chunks_and_moves_own_chunks():
    """Across the draws: segments cut at pads (num_keys short of the pages) and chunks of one row
    moved out of its own level; shared segments keep many rows."""
    cut = moved = shared = 0
    for seed in range(40):
        _, _, _, plan, split, *_ = chunk_step(seed)
        segments = split.shared[0] if split.shared else []
        cut += sum(s.num_keys < len(s.pages) * PAGE for s in segments)
        moved += int((split.own_first_page > plan.own_first_page).sum())
        shared += sum(len(s.rows) > 1 for s in segments)
    assert cut and moved and shared


def test_split_refuses_chunk_keys_on_a_query_page():
    """A chunk page that holds the row's queries cannot be attended without a mask: no split."""
    from vllm_cascade.kv.chunk_pages import ChunkPages

    annotated = ChunkPages(8, PAGE)
    annotated.annotate([3], [5], [0])
    table, seq_lens, query_lens = np.array([[3, 4]]), np.array([12]), np.array([8])  # queries from slot 4
    shifts = annotated.shifts(table, seq_lens)
    plan = flat_plan(seq_lens, PAGE, shifts)
    assert split_uniform(plan, table, seq_lens, query_lens, PAGE, annotated.valid) is None
    assert split_uniform(plan, table, seq_lens, np.array([4]), PAGE, annotated.valid) is not None


@pytest.mark.skipif(ON_GPU or INTERPRETED, reason="the kernel cases run directly in this process")
def test_kernels_under_the_interpreter():
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           f"{__file__}::test_gather_rotate_and_merge_kernels", f"{__file__}::test_merge_of_many_partial_rows"]
    proc = subprocess.run(cmd, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(__file__))
    assert proc.returncode == 0 and "7 passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="needs a GPU or TRITON_INTERPRET=1 from process start")
@pytest.mark.parametrize("seed,g,rot", [(1, 1, 16), (2, 2, 8), (3, 4, 16), (5, 3, 16)])
def test_gather_rotate_and_merge_kernels(seed, g, rot):
    """FlashInferCascade's own kernels (the query gather-rotate, the merge of every partial), with torch
    in FlashInfer's place: the reference result. 3 query heads per KV head: a head count that is
    not a power of 2; rot 8 of 16 dims: partial rotary."""
    from vllm_cascade.ops.triton_cascade import gather_rotate, merge_partials

    device = "cuda" if ON_GPU else "cpu"
    table, seq_lens, qsl, plan, split, q, k, v, view, ref = chunk_step(seed, g=g, rot=rot)
    runs = SharedRuns.of(split, qsl, PAGE)
    assert len(runs.tokens)
    i32 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int32)).to(device)  # noqa: E731
    q_shared = torch.empty(len(runs.tokens), *q.shape[1:], device=device)
    gather_rotate(q.to(device), i32(runs.tokens), i32(runs.rotation), view.cos_sin_cache.to(device), q_shared)
    expect = rotate_query(q[torch.from_numpy(runs.tokens)], torch.from_numpy(runs.rotation), view.cos_sin_cache,
                          q.shape[-1])
    torch.testing.assert_close(q_shared.cpu(), expect, atol=1e-5, rtol=1e-5)
    _, o_part, l_part = partials(split, table, seq_lens, qsl, q, k, v, q_shared.cpu())
    out = torch.full_like(q, float("nan"), device=device)
    merge_partials(o_part.to(device), l_part.to(device), out, i32(runs.contrib_off), i32(runs.contrib_row),
                   i32([q.shape[0]]), programs=3)
    tol = 2e-3 if ON_GPU else 1e-4
    torch.testing.assert_close(out.cpu(), ref, atol=tol, rtol=tol)


@pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="needs a GPU or TRITON_INTERPRET=1 from process start")
@pytest.mark.parametrize("seed", range(3))
def test_merge_of_many_partial_rows(seed):
    """The merge against log-sum-exp in torch: tokens with 0 to 40 partial rows (several of the
    kernel's blocks), rows that saw no key (-inf) among them, rows shared between tokens."""
    from vllm_cascade.ops.triton_cascade import merge_partials

    device = "cuda" if ON_GPU else "cpu"
    rng = np.random.default_rng(seed)
    tokens, heads, d, rows = 9, 3, 16, 60
    o_part = torch.from_numpy(rng.standard_normal((rows, heads, d), dtype=np.float32))
    l_part = torch.from_numpy(rng.uniform(-4, 4, (rows, heads)).astype(np.float32))
    l_part[rng.random((rows, heads)) < 0.1] = float("-inf")
    counts = rng.integers(0, 41, tokens)
    counts[0] = 0
    contrib_row = np.concatenate([rng.choice(rows, n) for n in counts]).astype(np.int32)
    contrib_off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    expect = torch.zeros(tokens, heads, d)
    for t in range(tokens):
        picked = torch.from_numpy(contrib_row[contrib_off[t] : contrib_off[t + 1]]).long()
        if len(picked):
            weights = torch.softmax(l_part[picked] * math.log(2), dim=0).nan_to_num(0.0)  # [n, heads]
            expect[t] = (weights[..., None] * o_part[picked]).sum(0)
    i32 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int32)).to(device)  # noqa: E731
    out = torch.full((tokens, heads, d), float("nan"), device=device)
    merge_partials(o_part.to(device), l_part.to(device), out, i32(contrib_off), i32(contrib_row), i32([tokens]),
                   programs=2)
    torch.testing.assert_close(out.cpu(), expect, atol=1e-5, rtol=1e-5)
