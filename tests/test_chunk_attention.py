"""Any-order chunk attention (ops/chunk_attention.py) against plain full attention at true positions."""

import numpy as np
import pytest
import torch

from sharing import composition_layout

from vllm_cascade.ops.chunk_attention import Segment, attend_segment, composed_attention, rotate_query

MAX_POS = 512


def vllm_cos_sin_cache(rot_dim: int, max_pos: int = MAX_POS, base: float = 1e6) -> torch.Tensor:
    """As vLLM's RotaryEmbedding._compute_cos_sin_cache builds it (float32, neox layout)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float) / rot_dim))
    freqs = torch.einsum("i,j -> ij", torch.arange(max_pos, dtype=torch.float), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def rope(x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """vLLM's neox forward_native on [T, n, D] at non-negative positions (independent of the module)."""
    cos, sin = cache[positions].chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    rot = cache.shape[-1]
    x1, x2 = torch.chunk(x[..., :rot], 2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]), dim=-1)


def full_attention(q, q_pos, keys, values, k_pos, scale):
    """q [T, Hq, D] at q_pos over keys/values [L, Hkv, D] at k_pos, causal by position, float64."""
    g = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(g, dim=1)
    v = values.double().repeat_interleave(g, dim=1)
    scores = torch.einsum("thd,lhd->htl", q.double(), k) * scale
    scores = scores.masked_fill((k_pos[None, :] > q_pos[:, None])[None], float("-inf"))
    return torch.einsum("htl,lhd->thd", scores.softmax(-1), v)


def random_composition(seed: int, garbage: float):
    """Chunks (keys rotated at local positions) composed in a random order + a tail, in a paged cache
    whose every unused slot holds `garbage`. Returns everything the tests need."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    page = int(rng.choice([4, 16]))
    hkv = int(rng.choice([1, 2]))
    g = int(rng.choice([1, 2]))
    d = int(rng.choice([64, 128]))
    cache = vllm_cos_sin_cache(d)
    num_chunks = int(rng.integers(1, 4))
    lens = [int(rng.integers(1, 3 * page)) for _ in range(num_chunks)]  # mostly not page multiples
    chunk_k = [torch.randn(n, hkv, d) for n in lens]  # un-rotated keys as the model produced them
    chunk_v = [torch.randn(n, hkv, d) for n in lens]
    order = [int(i) for i in rng.permutation(num_chunks)]
    tail_len = int(rng.integers(1, 10))
    num_q = int(rng.integers(1, tail_len + 1))
    slot_offsets, true_offsets, tail_slot, tail_true, num_slots = composition_layout(
        [lens[i] for i in order], tail_len, page)

    num_pages_needed = -(-num_slots // page)
    k_cache = torch.full((num_pages_needed + 5, hkv, page, d), garbage)
    v_cache = torch.full_like(k_cache, garbage)
    block_row = torch.randperm(k_cache.shape[0])[:num_pages_needed]  # physical pages in random places

    def store(keys, values, slot0):
        for j in range(keys.shape[0]):
            p, o = divmod(slot0 + j, page)
            k_cache[block_row[p], :, o] = keys[j]
            v_cache[block_row[p], :, o] = values[j]

    # Chunks stored as registered: rotated at local positions 0..n-1.
    for slot0, i in zip(slot_offsets, order):
        store(rope(chunk_k[i], torch.arange(lens[i]), cache), chunk_v[i], slot0)
    # The tail: rotated at true positions.
    tail_pos = tail_true + torch.arange(tail_len)
    tail_k, tail_v = torch.randn(tail_len, hkv, d), torch.randn(tail_len, hkv, d)
    store(rope(tail_k, tail_pos, cache), tail_v, tail_slot)

    # Reference: every valid key rotated at its TRUE position, in composition order.
    true_k = torch.cat([chunk_k[i] for i in order] + [tail_k])
    values = torch.cat([chunk_v[i] for i in order] + [tail_v])
    k_pos = torch.arange(true_k.shape[0])
    keys_true = rope(true_k, k_pos, cache)
    q_pos = tail_pos[tail_len - num_q :]
    q = torch.randn(num_q, hkv * g, d)
    scale = d**-0.5
    ref = full_attention(rope(q, q_pos, cache), q_pos, keys_true, values, k_pos, scale)
    segs = [
        Segment(block_row[s // page : s // page + -(-n // page)], n, o)
        for s, o, n in zip(slot_offsets, true_offsets, [lens[i] for i in order])
    ]
    segs.append(Segment(block_row[tail_slot // page :].tolist(), tail_len, tail_true, True))
    return {
        "q": q, "q_pos": q_pos, "segs": segs, "k_cache": k_cache, "v_cache": v_cache, "scale": scale,
        "cache": cache, "ref": ref, "block_row": block_row, "page": page, "d": d, "rng": rng,
    }


# fp32: the shifted query R(m)R(-o) and keys at R(m-o) differ only by float32 rounding of the cached
# angles; positions here stay below ~60, where the largest difference measured is 6.5e-7.
ATOL = 1e-5


@pytest.mark.parametrize("garbage", [1e4, float("nan")])
@pytest.mark.parametrize("seed", range(16))
def test_composed_equals_full_attention_at_true_positions(seed, garbage):
    c = random_composition(seed, garbage)
    q_rot = rope(c["q"], c["q_pos"], c["cache"])
    args = (c["q_pos"], c["segs"], c["k_cache"], c["v_cache"], c["scale"], c["cache"])
    out_rot = composed_attention(q_rot, *args)
    out_unrot = composed_attention(c["q"].reshape(c["q"].shape[0], -1), *args, q_rotated=False)
    assert out_rot.dtype == torch.float32 and out_rot.shape == c["q"].shape
    assert torch.isfinite(out_rot).all() and torch.isfinite(out_unrot).all()
    torch.testing.assert_close(out_rot.double(), c["ref"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out_unrot.double(), c["ref"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out_unrot, out_rot, atol=ATOL, rtol=0)
    # Segment order does not matter to the exact merge.
    shuffled = [c["segs"][i] for i in c["rng"].permutation(len(c["segs"]))]
    out_shuf = composed_attention(q_rot, c["q_pos"], shuffled, *args[2:])
    torch.testing.assert_close(out_shuf, out_rot, atol=1e-6, rtol=0)


def test_one_chunk_at_offset_zero_is_plain_prefix():
    # Offset 0: no extra rotation, the own-segment path is the same as ordinary generation.
    c = random_composition(3, 0.0)
    seg = Segment(c["segs"][0].pages, c["segs"][0].valid_len, 0)
    q_rot = rope(c["q"], c["q_pos"], c["cache"])
    a = attend_segment(q_rot, c["q_pos"], seg, c["k_cache"], c["v_cache"], c["scale"], c["cache"])
    b = attend_segment(q_rot, c["q_pos"], Segment(seg.pages, seg.valid_len, 0, causal=True),
                       c["k_cache"], c["v_cache"], c["scale"], c["cache"])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("d,rot", [(64, 64), (128, 128), (128, 64)])
def test_rotate_query_composes(d, rot):
    cache = vllm_cos_sin_cache(rot)
    torch.manual_seed(d + rot)
    x = torch.randn(6, 3 * d)
    a = torch.tensor([0, 5, 17, 300, 2, 100])
    b = torch.tensor([3, -5, -40, -299, 0, 150])
    ab = rotate_query(rotate_query(x, a, cache, d), b, cache, d)
    # Exact up to float32 rounding of the cached angles (p * inv_freq, off by <= p * 2^-24 rad each):
    # ~2e-5 rad at p = 300, times |x| up to ~4.
    atol = 1e-4
    torch.testing.assert_close(ab, rotate_query(x, a + b, cache, d), atol=atol, rtol=0)
    # Positive shifts are plain RoPE at those positions; -a undoes +a.
    torch.testing.assert_close(rotate_query(x, a, cache, d), rope(x.view(6, 3, d), a, cache), atol=0, rtol=0)
    torch.testing.assert_close(rotate_query(rotate_query(x, a, cache, d), -a, cache, d), x.view(6, 3, d),
                               atol=atol, rtol=0)
    assert torch.equal(rotate_query(x, 0, cache, d), x.view(6, 3, d))  # shift 0 is exactly the identity
    if rot < d:  # partial rotary: the dims after rot_dim pass through
        assert torch.equal(rotate_query(x, a, cache, d)[..., rot:], x.view(6, 3, d)[..., rot:])


def test_rotate_query_matches_fused_qwen3_rope():
    fq = pytest.importorskip("vllm_cascade.ops.fused_qwen3")
    cache = vllm_cos_sin_cache(64)
    x, pos = torch.randn(4, 2 * 64), torch.tensor([0, 1, 77, 500])
    assert torch.equal(rotate_query(x, pos, cache, 64), fq.apply_rope_ref(x, pos, cache, 64))


def test_bad_segments_are_refused():
    c = random_composition(1, 0.0)
    args = (c["k_cache"], c["v_cache"], c["scale"], c["cache"])
    seg = c["segs"][0]
    too_long = Segment(seg.pages, len(torch.as_tensor(seg.pages)) * c["page"] + 1, seg.offset)
    with pytest.raises(ValueError, match="does not fit"):
        composed_attention(c["q"], c["q_pos"], [too_long], *args)
    after_query = Segment(seg.pages, seg.valid_len, int(c["q_pos"][0]))  # a chunk may not follow a query
    with pytest.raises(ValueError, match="before the end"):
        composed_attention(c["q"], c["q_pos"], [after_query], *args)
    with pytest.raises(ValueError, match="at least one"):
        composed_attention(c["q"], c["q_pos"], [], *args)
