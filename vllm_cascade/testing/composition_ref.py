"""Independent chunk composition in Hugging Face transformers: the reference for vLLM compositions.

Each chunk's KV is computed ALONE at local positions 0..n-1, its keys re-rotated by +offset to its
true place (RoPE composes, R(a)R(b) = R(a+b); HF stores keys after neox RoPE), the chunks
concatenated into one DynamicCache, and the tail run at the true positions after them. This is
what a composition of independently registered chunks computes (no chunk attended another), so
the engine's greedy tokens must equal `independent_greedy`'s. Used by tests/test_chunk_store.py
and benchmarks/composition_kl.py.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.models.qwen3.modeling_qwen3 import rotate_half

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), [1, kv_heads, T, head_dim]


def forward(model, ids: list[int], cache: DynamicCache, start: int) -> torch.Tensor:
    """Run `ids` at positions start.. on `cache` (updated in place); float64 logits [T, vocab]."""
    pos = torch.arange(start, start + len(ids))[None]
    out = model(input_ids=torch.tensor([ids]), position_ids=pos, past_key_values=cache, use_cache=True)
    return out.logits[0].double()


def rerotate(model, k: torch.Tensor, shift: int) -> torch.Tensor:
    """Keys RoPE'd at p -> keys at p + shift (shift may be negative): HF's neox layout, the model's
    inv_freq; angles, cos/sin and products in float64, so R(-o)R(o) is the identity to ~1e-16."""
    rope = model.model.rotary_emb
    assert rope.rope_type == "default", rope.rope_type  # scaled RoPE variants: not handled here
    ang = shift * rope.inv_freq.double()
    cos, sin = torch.cat((ang, ang)).cos(), torch.cat((ang, ang)).sin()  # [head_dim]
    kd = k.double()
    return (kd * cos + rotate_half(kd) * sin).to(k.dtype)


def layers_kv(cache: DynamicCache) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers]


def run_steps(model, cache: DynamicCache, first: torch.Tensor, start: int, steps: int,
              forced: list[int] | None) -> tuple[torch.Tensor, list[int]]:
    """N next-token logits: `first` (last prefill logits), then one decode per token.
    Greedy when `forced` is None, else teacher-forced on `forced`. Returns ([N, vocab], tokens)."""
    logits, dists, toks = first, [], []
    for i in range(steps):
        dists.append(logits)
        tok = int(logits.argmax()) if forced is None else forced[i]
        toks.append(tok)
        if i + 1 < steps:
            logits = forward(model, [tok], cache, start + i)[-1]
    return torch.stack(dists), toks


def chunk_alone(model, ids: list[int]) -> KV:
    """KV of one chunk computed with no context, at local positions 0..n-1."""
    cache = DynamicCache()
    forward(model, ids, cache, 0)
    return layers_kv(cache)


def placed(model, local: list[KV]) -> tuple[DynamicCache, int]:
    """Chunk KVs (local positions) placed one after another at their true offsets: their keys
    re-rotated there, in one cache. -> (the cache, the position after the last chunk)."""
    offsets, off = [], 0
    for kv in local:
        offsets.append(off)
        off += kv[0][0].shape[2]
    per_layer = []
    for li in range(len(local[0])):
        ks = [rerotate(model, kv[li][0], o) for kv, o in zip(local, offsets)]
        per_layer.append((torch.cat(ks, 2), torch.cat([kv[li][1] for kv in local], 2)))
    return DynamicCache(ddp_cache_data=per_layer), off


def compose(model, local: list[KV], tail: list[int], forced: list[int]) -> torch.Tensor:
    """Place chunk KVs (local positions) at their offsets, run the tail, teacher-force `forced`."""
    cache, off = placed(model, local)
    last = forward(model, tail, cache, off)[-1]
    return run_steps(model, cache, last, off + len(tail), len(forced), forced)[0]


def independent_greedy(model, chunks: list[list[int]], tail: list[int], steps: int) -> list[int]:
    """Greedy tokens after chunks composed independently (each prefilled alone) and a tail."""
    cache, off = placed(model, [chunk_alone(model, c) for c in chunks])
    last = forward(model, tail, cache, off)[-1]
    return run_steps(model, cache, last, off + len(tail), steps, None)[1]
