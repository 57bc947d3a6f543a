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

from vllm_cascade.attention.plan import plan_cascade
from vllm_cascade.attention.worklist import build_worklist
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
    names = ("test_fused_kernels_match_reference", "test_triton_cascade_steps", "test_fixed_capacity")
    cases = [f"{__file__}::{name}" for name in names]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *cases]
    proc = subprocess.run(cmd, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(__file__))
    assert proc.returncode == 0 and "10 passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]


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


def _planned(tc) -> dict[str, list[int]]:
    """The work list a TritonCascade uploads (its buffer's used part, field by field)."""
    image, layout = tc._dev.numpy(), tc._layout
    field = {name: image[offset : offset + size] for name, (offset, size) in layout.items()}
    items, tokens = int(field["item_range"][2]), int(field["num_tokens"][0])
    used = {"items": items, "tokens": tokens, "rows": int(field["contrib_off"][tokens])}
    sizes = {"q_tokens": int(field["q_off"][items - 1] + field["q_len"][items - 1]) if items else 0,
             "contrib_off": tokens + 1, "item_range": 3, "num_tokens": 1}
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
