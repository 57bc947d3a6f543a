"""FlashInfer cascade path against the torch reference, on random batches (GPU only)."""

import numpy as np
import pytest
import torch
from sharing import random_batch

from vllm_cascade.attention.plan import plan_cascade
from vllm_cascade.ops.torch_attention import cascade_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run_against_torch(kernel, kernel_plan, ref_plan, table: np.ndarray, seq_lens: np.ndarray, qsl: np.ndarray,
                      num_pages: int, num_kv_heads: int, chunks=None, query_table: torch.Tensor | None = None) -> float:
    """One step on `kernel` (a FlashInferCascade or TritonCascade) with random bf16 cache and queries,
    against cascade_attention in fp32 on `ref_plan` (the same attention as `kernel_plan`).
    -> relative error; asserts no NaN."""
    head_dim = kernel.head_dim
    cache = torch.randn(num_pages, num_kv_heads, kernel.page_size, 2 * head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = cache[..., :head_dim], cache[..., head_dim:]
    q = torch.randn(int(qsl[-1]), kernel.num_qo_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    kernel.plan(kernel_plan, torch.from_numpy(table).to("cuda", torch.int32), seq_lens, qsl)
    out = torch.full_like(q, float("nan"))
    kernel.run(q, k, v, out)
    ref = torch.empty(q.shape, dtype=torch.float32)
    cascade_attention(q.cpu().float(), k.cpu().float(), v.cpu().float(), torch.from_numpy(table), seq_lens, qsl,
                      ref_plan, kernel.scale, ref, chunks, None if query_table is None else query_table.float())
    assert not torch.isnan(out).any()
    return float((out.cpu().float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("cascade", [False, True])
def test_flashinfer_matches_torch(head_dim, page, group, cascade):
    from vllm_cascade.ops.flashinfer_attention import FlashInferCascade

    hkv = 2
    split_off = 0
    for seed in range(6):  # fresh inputs every draw
        rng = np.random.default_rng(seed * 1000 + head_dim + page + group)
        table, seq_lens, query_lens, num_pages = random_batch(rng, page, max_rows=10)
        if seed % 2:  # decode rows first, as vLLM orders a batch: a flat step splits them off
            order = np.argsort(query_lens != 1, kind="stable")
            table, seq_lens, query_lens = table[order], seq_lens[order], query_lens[order]
        qsl = np.concatenate([[0], np.cumsum(query_lens)])
        plan = plan_cascade(table, seq_lens, query_lens, page, max_levels=3 if cascade else 1,
                            min_saved_pages=1, min_saved_fraction=0.0)
        fi = FlashInferCascade(torch.device("cuda"), hkv * group, hkv, head_dim, page, torch.bfloat16, head_dim**-0.5)
        err = run_against_torch(fi, plan, plan, table, seq_lens, qsl, num_pages, hkv)
        assert err < 1e-2, f"seed {seed}: relative error {err:.2e}, levels {plan.num_levels}"
        split_off += fi.num_decode_tokens > 0
    assert cascade or split_off, "no flat step with decode rows before prefill rows was drawn"


@pytest.mark.parametrize("query_rope", [False, True], ids=["rotated", "query-before-rope"])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("page", [16, 32])
def test_flashinfer_chunk_steps_match_torch(group, page, query_rope):
    """Steps of composed requests (chunks in any order, pads, a row's own chunk), split for
    FlashInfer (plan.split_uniform): the reference path's result, prefill and decode steps. With
    `query_rope` the query comes before RoPE (the model's bf16 table rotates it once per level)."""
    from sharing import random_compositions
    from test_triton_cascade import cos_sin as rope_table

    from vllm_cascade.attention.plan import split_uniform
    from vllm_cascade.kv.chunk_pages import ChunkView
    from vllm_cascade.ops.flashinfer_attention import FlashInferCascade

    hkv, head_dim = 2, 128
    cos_sin = rope_table(head_dim, 4096, base=1e6)
    scale = head_dim**-0.5
    model_table = cos_sin.to(torch.bfloat16) if query_rope else None  # vLLM keeps it in the model's dtype
    fi = FlashInferCascade(torch.device("cuda"), hkv * group, hkv, head_dim, page, torch.bfloat16, scale,
                           cos_sin.cuda(), query_rope=None if model_table is None else model_table.cuda())
    for seed in range(8):
        rng = np.random.default_rng(seed * 100 + page + group)
        table, seq_lens, query_lens, num_pages, annotated = random_compositions(rng, page,
                                                                                query_len=1 if seed % 3 == 0 else None)
        qsl = np.concatenate([[0], np.cumsum(query_lens)])
        shifts = annotated.shifts(table, seq_lens)
        plan = plan_cascade(table, seq_lens, query_lens, page, 3, min_saved_pages=1, min_saved_fraction=0.0,
                            shifts=shifts)
        split = split_uniform(plan, table, seq_lens, query_lens, page, annotated.valid)
        view = ChunkView(shifts, torch.from_numpy(annotated.valid.copy()), cos_sin)
        err = run_against_torch(fi, split, plan, table, seq_lens, qsl, num_pages, hkv, view, model_table)
        assert err < 1e-2, f"seed {seed}: relative error {err:.2e}, {fi.partial_rows} partial rows"


@pytest.mark.parametrize("cascade", [False, True])
def test_flashinfer_rotates_queries_before_rope(cascade):
    """query_rope without chunk pages: every token's query rotated at its position (own level) and
    gathered rotated for the shared levels; the reference rotates it the same way."""
    from test_triton_cascade import cos_sin as rope_table

    from vllm_cascade.ops.flashinfer_attention import FlashInferCascade

    hkv, group, head_dim, page = 2, 2, 128, 16
    model_table = rope_table(head_dim, 4096, base=1e6).to(torch.bfloat16)
    fi = FlashInferCascade(torch.device("cuda"), hkv * group, hkv, head_dim, page, torch.bfloat16, head_dim**-0.5,
                           query_rope=model_table.cuda())
    for seed in range(4):
        rng = np.random.default_rng(seed)
        table, seq_lens, query_lens, num_pages = random_batch(rng, page, max_rows=10)
        qsl = np.concatenate([[0], np.cumsum(query_lens)])
        plan = plan_cascade(table, seq_lens, query_lens, page, max_levels=3 if cascade else 1,
                            min_saved_pages=1, min_saved_fraction=0.0)
        err = run_against_torch(fi, plan, plan, table, seq_lens, qsl, num_pages, hkv, None, model_table)
        assert err < 1e-2, f"seed {seed}: relative error {err:.2e}"
