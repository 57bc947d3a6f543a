import numpy as np
import pytest
import torch
from sharing import random_batch

from vllm_cascade.attention.plan import flat_plan, plan_cascade
from vllm_cascade.ops.torch_attention import cascade_attention, write_kv


def naive_attention(q, keys, values, scale):
    """q [T, Hq, D] at the last T positions of keys/values [L, Hkv, D], causal, float64."""
    t, hq, d = q.shape
    g = hq // keys.shape[1]
    k = keys.double().repeat_interleave(g, dim=1)
    v = values.double().repeat_interleave(g, dim=1)
    scores = torch.einsum("thd,lhd->htl", q.double(), k) * scale
    length = keys.shape[0]
    mask = torch.arange(length)[None, :] > (length - t + torch.arange(t))[:, None]
    scores = scores.masked_fill(mask[None], float("-inf"))
    return torch.einsum("htl,lhd->thd", scores.softmax(-1), v)


@pytest.mark.parametrize("seed", range(40))
def test_cascade_equals_flat_reference(seed):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    page = int(rng.choice([4, 16]))
    hkv = int(rng.choice([1, 2]))
    g = int(rng.choice([1, 2, 4]))
    d = int(rng.choice([16, 64]))
    table, seq_lens, query_lens, num_pages = random_batch(rng, page, max_rows=8)
    k_cache = torch.randn(num_pages, hkv, page, d)
    v_cache = torch.randn(num_pages, hkv, page, d)
    qsl = np.concatenate([[0], np.cumsum(query_lens)])
    query = torch.randn(int(qsl[-1]), hkv * g, d)
    scale = d**-0.5
    plan = plan_cascade(table, seq_lens, query_lens, page, max_levels=int(rng.integers(1, 4)), min_saved_pages=1,
                        min_saved_fraction=0.0)
    out = torch.full_like(query, float("nan"))
    cascade_attention(query, k_cache, v_cache, torch.from_numpy(table), seq_lens, qsl, plan, scale, out)
    for r in range(len(seq_lens)):
        n = -(-seq_lens[r] // page)
        pages = torch.from_numpy(table[r, :n])
        keys = k_cache[pages].permute(0, 2, 1, 3).reshape(-1, hkv, d)[: seq_lens[r]]
        values = v_cache[pages].permute(0, 2, 1, 3).reshape(-1, hkv, d)[: seq_lens[r]]
        ref = naive_attention(query[qsl[r] : qsl[r + 1]], keys, values, scale)
        torch.testing.assert_close(out[qsl[r] : qsl[r + 1]].double(), ref, atol=2e-5, rtol=2e-5)


def test_flat_plan_handles_padding_rows():
    k_cache, v_cache = torch.randn(4, 2, 16, 64), torch.randn(4, 2, 16, 64)
    table = torch.tensor([[1, 2], [0, 0]])
    seq_lens, qsl = np.array([20, 0]), np.array([0, 1, 1])
    out = torch.zeros(1, 4, 64)
    cascade_attention(torch.randn(1, 4, 64), k_cache, v_cache, table, seq_lens, qsl, flat_plan(seq_lens, 16), 0.1, out)
    assert torch.isfinite(out).all()


def test_write_kv_skips_padding_slots():
    k_cache, v_cache = torch.zeros(3, 2, 4, 8), torch.zeros(3, 2, 4, 8)
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    write_kv(key, value, k_cache, v_cache, torch.tensor([5, -1, 11]))
    torch.testing.assert_close(k_cache[1, :, 1], key[0])
    torch.testing.assert_close(v_cache[2, :, 3], value[2])
    assert k_cache.count_nonzero() == 2 * 2 * 8
