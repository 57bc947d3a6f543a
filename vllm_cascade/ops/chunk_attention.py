"""Attention of a composed request (any-order chunks + tail) in plain torch: the CPU path and the reference.

A composed request's KV is a list of segments in the paged cache
(`[num_pages, num_kv_heads, page_size, head_dim]`, see torch_attention.py):

- chunk segments: pinned pages whose `valid_len` keys were RoPE-rotated at
  chunk-local positions 0..valid_len-1; the rest of the last page is pad slots.
  In the composition the chunk's first key stands at true position `offset`
  (pads are never positions, see chunks/layout.py).
- the own segment (the tail, `causal=True`): pages whose keys were rotated at
  their true positions offset..offset+valid_len-1, attended causally.

RoPE scores depend only on (query position - key position), so a query at true
position m attends a chunk at offset o exactly as keys rotated at true
positions would be attended if the query is rotated by -o (rotations compose:
R(a)R(b) = R(a+b)). The keys are never re-rotated or copied, so chunk pages
stay shared. Each segment is attended with its log-sum-exp and the partial
results are merged exactly (torch_attention.merge). Pad slots are cut off
before any arithmetic (gather_pages keeps only the first valid_len slots), so
whatever they hold (stale KV, NaN) cannot leak.

Two entry points for the query: already rotated at its true positions
(`q_rotated=True`, the stock model: one extra rotation by -o per chunk) or
un-rotated (`q_rotated=False`, the fused Qwen3 hand-off: one rotation at
position - o per chunk, and at the true position for the own segment).

Example (cos_sin_cache built as vLLM's RotaryEmbedding does, neox, base 1e6):
    >>> import torch
    >>> from vllm_cascade.ops.chunk_attention import Segment, composed_attention, rotate_query
    >>> D, page = 16, 4
    >>> inv_freq = 1.0 / (1e6 ** (torch.arange(0, D, 2, dtype=torch.float) / D))
    >>> freqs = torch.einsum("i,j->ij", torch.arange(64, dtype=torch.float), inv_freq)
    >>> cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    >>> g = torch.Generator().manual_seed(0)
    >>> k_cache = torch.randn(8, 1, page, D, generator=g); v_cache = torch.randn(8, 1, page, D, generator=g)
    >>> # chunk B (5 keys, local positions) on pages 3, 6 at true offset 0; chunk A (3 keys) on page 1
    >>> # at offset 5; the tail (4 keys at true positions 8..11) on page 0; 2 query tokens (10, 11)
    >>> segs = [Segment([3, 6], 5, 0), Segment([1], 3, 5), Segment([0], 4, 8, causal=True)]
    >>> pos = torch.tensor([10, 11])
    >>> q = torch.randn(2, 2, D, generator=g)  # 2 query heads (GQA 2), un-rotated
    >>> out = composed_attention(q, pos, segs, k_cache, v_cache, D ** -0.5, cos_sin, q_rotated=False)
    >>> q_rot = rotate_query(q, pos, cos_sin, D)
    >>> out_rot = composed_attention(q_rot, pos, segs, k_cache, v_cache, D ** -0.5, cos_sin)
    >>> out.shape, torch.allclose(out, out_rot, atol=1e-5)
    (torch.Size([2, 2, 16]), True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_cascade.ops.fused_qwen3 import apply_rope_ref
from vllm_cascade.ops.torch_attention import attend, gather_pages, merge


@dataclass(frozen=True)
class Segment:
    """A run of keys of one request in the paged KV cache.

    Key j (0 <= j < valid_len) lies in slot j of the concatenated `pages` and
    stands at true position `offset + j`. A chunk segment (`causal=False`)
    holds keys rotated at local positions j and must lie wholly before every
    query; the own segment (`causal=True`) holds keys rotated at true
    positions and is masked causally.
    """

    pages: torch.Tensor | Sequence[int]  # physical page ids, in slot order
    valid_len: int  # real keys; slots after them (end of the last page) are pads
    offset: int  # true position of the first key
    causal: bool = False


def rotate_query(
    q: torch.Tensor, shift: torch.Tensor | int, cos_sin_cache: torch.Tensor, head_dim: int
) -> torch.Tensor:
    """Neox RoPE of q ([T, n*head_dim] or [T, n, head_dim]) by a signed integer shift per token.

    `cos_sin_cache` is vLLM's `[max_position, rot_dim]` (cos of the angles in
    the first half, sin in the second); the first rot_dim dims of each head
    are rotated, the rest pass through (vLLM's partial rotary). A negative
    shift reads the cache at |shift| and flips sin (cos(-x) = cos x,
    sin(-x) = -sin x), so no cache entry for negative positions is needed.
    Shift 0 is the identity exactly (cos 0 = 1, sin 0 = 0). Returns float32 [T, n, head_dim].
    """
    shift = torch.as_tensor(shift, device=q.device).long().expand(q.shape[0])
    return apply_rope_ref(q, shift, cos_sin_cache, head_dim)  # the model's RoPE, at a signed position


def attend_segment(
    q: torch.Tensor,
    q_positions: torch.Tensor,
    segment: Segment,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    cos_sin_cache: torch.Tensor,
    q_rotated: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment's partial attention -> (out [T, Hq, D] float32, lse [T, Hq]).

    This is what one GPU level computes; the GPU path can be compared with it
    segment by segment before the merge.
    """
    t, d = q.shape[0], k_cache.shape[-1]
    page_size = k_cache.shape[2]
    pages = torch.as_tensor(segment.pages, device=k_cache.device, dtype=torch.long)
    if not 0 <= segment.valid_len <= len(pages) * page_size:
        raise ValueError(f"valid_len {segment.valid_len} does not fit {len(pages)} pages of {page_size}")
    # The keys' rotation position minus their true position: -offset for a chunk, 0 for the own segment.
    key_shift = 0 if segment.causal else -segment.offset
    if not segment.causal and bool((q_positions < segment.offset + segment.valid_len).any()):
        # A chunk is attended without a mask; a query inside or before it is a wiring bug.
        raise ValueError(f"a query lies before the end of the chunk at {segment.offset}+{segment.valid_len}")
    if q_rotated:
        qs = q.reshape(t, -1, d) if key_shift == 0 else rotate_query(q, key_shift, cos_sin_cache, d)
    else:
        qs = rotate_query(q, q_positions + key_shift, cos_sin_cache, d)
    # Only the first valid_len slots are gathered: pads take no part in any arithmetic.
    k = gather_pages(k_cache, pages, segment.valid_len)
    v = gather_pages(v_cache, pages, segment.valid_len)
    if segment.causal:
        return attend(qs, k, v, scale, q_pos=q_positions, k_pos0=segment.offset)
    return attend(qs, k, v, scale)


def composed_attention(
    q: torch.Tensor,
    q_positions: torch.Tensor,
    segments: Sequence[Segment],
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    cos_sin_cache: torch.Tensor,
    q_rotated: bool = True,
) -> torch.Tensor:
    """Attention of one request's queries q ([T, Hq, D] or [T, Hq*D]) at true `q_positions` [T]
    over its segments -> out [T, Hq, D] float32.

    `q_rotated`: q is RoPE-rotated at q_positions (True) or not rotated at all
    (False, the fused Qwen3 hand-off). Segments may come in any order; the
    exact log-sum-exp merge does not depend on it (up to rounding).
    """
    if not segments:
        raise ValueError("a request needs at least one segment")
    acc: tuple[torch.Tensor, torch.Tensor] | None = None
    for seg in segments:
        part = attend_segment(q, q_positions, seg, k_cache, v_cache, scale, cos_sin_cache, q_rotated)
        acc = part if acc is None else merge(*acc, *part)
    assert acc is not None
    return acc[0]
