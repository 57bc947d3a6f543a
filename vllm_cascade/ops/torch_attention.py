"""Paged cascade attention in plain torch: the CPU path and the reference.

The KV cache of one layer is `[num_pages, num_kv_heads, page_size, head_dim]`
for keys and the same for values. Every function returns the attention output
together with its log-sum-exp (natural log, float32), so that attention over
disjoint key sets merges exactly:

    lse = logaddexp(lse_a, lse_b)
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> k = torch.randn(4, 2, 8, 16); v = torch.randn(4, 2, 8, 16)
    >>> q = torch.randn(3, 4, 16)  # 3 tokens, 4 query heads (GQA 2)
    >>> pages = torch.tensor([2, 0])
    >>> full = attend(q, gather_pages(k, pages, 16), gather_pages(v, pages, 16), 0.25)
    >>> a = attend(q, gather_pages(k, pages[:1], 8), gather_pages(v, pages[:1], 8), 0.25)
    >>> b = attend(q, gather_pages(k, pages[1:], 8), gather_pages(v, pages[1:], 8), 0.25)
    >>> torch.allclose(merge(*a, *b)[0], full[0], atol=1e-5)
    True
"""

from __future__ import annotations

import time

import numpy as np
import torch

from vllm_cascade.attention.plan import CascadePlan, rows_tokens, token_positions
from vllm_cascade.kv.chunk_pages import ChunkView


def gather_pages(cache: torch.Tensor, pages: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[num_pages, H, N, D] cache, page ids -> [H, num_tokens, D] keys or values."""
    h, n, d = cache.shape[1:]
    return cache[pages].transpose(0, 1).reshape(h, len(pages) * n, d)[:, :num_tokens]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor | None = None,
    k_pos0: int | torch.Tensor = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [T, Hq, D] over k, v [Hkv, L, D] -> (out [T, Hq, D], lse [T, Hq]).

    With `q_pos` (absolute positions of the queries), key j sits at position
    k_pos0 + j (or k_pos0[j], given the keys' positions) and is masked when it
    lies after the query (causal).
    """
    t, hq, d = q.shape
    hkv, length = k.shape[0], k.shape[1]
    g = hq // hkv
    qg = q.float().reshape(t, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, t * g, d)
    scores = torch.bmm(qg, k.float().transpose(1, 2)) * scale  # [Hkv, T*G, L]
    if q_pos is not None:
        k_pos = k_pos0 if isinstance(k_pos0, torch.Tensor) else k_pos0 + torch.arange(length, device=q.device)
        masked = k_pos[None, :] > q_pos.repeat_interleave(g)[:, None]
        scores = scores.masked_fill(masked[None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where a row sees no key
    probs = torch.exp(scores - lse[..., None]).nan_to_num_(0.0)
    out = torch.bmm(probs, v.float())  # [Hkv, T*G, D]
    out = out.reshape(hkv, t, g, d).permute(1, 0, 2, 3).reshape(t, hq, d)
    lse = lse.reshape(hkv, t, g).permute(1, 0, 2).reshape(t, hq)
    return out, lse


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of attention over two disjoint key sets (see module doc)."""
    lse = torch.logaddexp(lse_a, lse_b)
    # A side that saw no key has lse -inf and weight 0 (not NaN).
    w_a = torch.exp(lse_a - lse).nan_to_num_(0.0)[..., None]
    w_b = torch.exp(lse_b - lse).nan_to_num_(0.0)[..., None]
    return w_a * out_a + w_b * out_b, lse


def cascade_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: np.ndarray,
    query_start_loc: np.ndarray,
    plan: CascadePlan,
    scale: float,
    out: torch.Tensor,
    chunks: ChunkView | None = None,
    query_rope: torch.Tensor | None = None,
) -> int:
    """Write attention of every request's queries over its KV into `out`; -> nanoseconds spent
    merging the levels (wall time: this path computes synchronously).

    The own level runs per request, causally, over the pages from
    plan.own_first_page on; each shared segment runs once over its pages for
    all its requests' queries and is merged in. With `chunks`, pad slots are
    dropped and keys rotated by their page's shift first (kv/chunk_pages.py).
    With `query_rope` (the model's cos/sin table) the query comes before RoPE
    (config `query_rope="backend"`): each level rotates it once, at the
    token's position plus the level's shift.
    """
    page = key_cache.shape[2]
    num_rows = len(seq_lens)
    positions = torch.from_numpy(token_positions(seq_lens, query_start_loc)).to(query.device)
    raw = query
    if query_rope is not None:
        query = _rotate(raw, positions, query_rope)
    acc_out: list[torch.Tensor] = []
    acc_lse: list[torch.Tensor] = []
    merge_ns = 0
    for r in range(num_rows):
        q0, q1 = int(query_start_loc[r]), int(query_start_loc[r + 1])
        seq_len, first = int(seq_lens[r]), int(plan.own_first_page[r])
        pages = block_table[r, first : (seq_len + page - 1) // page]
        k, v, k_pos = _keys(key_cache, value_cache, pages, r, first, seq_len - first * page, chunks)
        o, lse = attend(query[q0:q1], k, v, scale, q_pos=positions[q0:q1], k_pos0=k_pos)
        acc_out.append(o)
        acc_lse.append(lse)
    for level in plan.shared:
        for seg in level:
            rows = [int(r) for r in seg.rows]
            pages = torch.as_tensor(seg.pages, device=key_cache.device)
            k, v, _ = _keys(key_cache, value_cache, pages, rows[0], seg.first_page, len(seg.pages) * page, chunks)
            tokens, lens = rows_tokens(query_start_loc, seg.rows)
            tokens = torch.from_numpy(tokens).to(query.device)
            q = query[tokens]
            if seg.q_shift is not None and seg.q_shift.any():  # rows holding the pages elsewhere (SharedSegment)
                back = torch.from_numpy(-np.repeat(seg.q_shift.astype(np.int64), lens)).to(q.device)
                if query_rope is None:
                    q = _rotate(q, back, chunks.cos_sin_cache)
                else:  # one rotation of the model's query, at position - shift
                    q = _rotate(raw[tokens], positions[tokens] + back, query_rope)
            o, lse = attend(q, k, v, scale)
            start, t0 = 0, time.perf_counter_ns()
            for r in rows:
                length = int(query_start_loc[r + 1] - query_start_loc[r])
                sl = slice(start, start + length)
                acc_out[r], acc_lse[r] = merge(acc_out[r], acc_lse[r], o[sl], lse[sl])
                start += length
            merge_ns += time.perf_counter_ns() - t0
    num_tokens = int(query_start_loc[num_rows])
    out[:num_tokens].copy_(torch.cat(acc_out).to(out.dtype).reshape(out[:num_tokens].shape))
    return merge_ns


def _keys(k_cache: torch.Tensor, v_cache: torch.Tensor, pages: torch.Tensor, row: int, first_page: int,
          num_keys: int, chunks: ChunkView | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys, values [H, L, D] and positions [L] of `num_keys` slots of `pages` (block-table entries
    first_page.. of `row`); with chunks, without pad slots and with keys shifted."""
    page = k_cache.shape[2]
    k, v = gather_pages(k_cache, pages, num_keys), gather_pages(v_cache, pages, num_keys)
    slot = torch.arange(num_keys, device=k.device)
    pos = first_page * page + slot
    if chunks is None:
        return k, v, pos
    col = slot // page
    keep = (slot % page) < chunks.page_valid.to(k.device)[pages.long()][col]
    shift = torch.from_numpy(chunks.shifts[row, first_page + col.cpu().numpy()].astype(np.int64)).to(k.device)
    k = _rotate(k.transpose(0, 1), shift, chunks.cos_sin_cache).transpose(0, 1)
    return k[:, keep], v[:, keep], pos[keep]


def _rotate(x: torch.Tensor, shift: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """[T, H, D] rotated by `shift` [T] more positions (neox RoPE), in float32."""
    from vllm_cascade.ops.fused_qwen3 import apply_rope_ref

    return apply_rope_ref(x, shift, cos_sin_cache, x.shape[-1])


def write_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store key/value [T, Hkv, D] at slots (page * page_size + offset); slot < 0 is padding."""
    slots = slot_mapping.long()
    keep = slots >= 0
    num = slots.shape[0]
    page_size = k_cache.shape[2]
    pages, offsets = slots // page_size, slots % page_size
    if not bool(keep.all()):
        pages, offsets, key, value = pages[keep], offsets[keep], key[:num][keep], value[:num][keep]
    k_cache[pages, :, offsets] = key[: len(pages)].to(k_cache.dtype)
    v_cache[pages, :, offsets] = value[: len(pages)].to(v_cache.dtype)
