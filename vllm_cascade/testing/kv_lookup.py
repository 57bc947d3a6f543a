"""vLLM's scheduler-side KV-cache manager with pinned chunks, no engine: what the tests and
benchmarks/host_bench.py use to compare vLLM's prefix-cache lookup of composed requests with the
pinned one (vllm_compat.install_pinned_lookup).

Example:
    >>> manager, hasher = lookup_manager(page_size=16)
    >>> blocks = pin_chunk(manager, hasher, "a", list(range(1, 33)))
    >>> request = composed_request(hasher, "r", [("a", 2)], [5] * 20)
    >>> manager.get_computed_blocks(request)[1], hasher.lookups["pinned"]
    (32, 1)
"""

from __future__ import annotations

from typing import Any


def lookup_manager(page_size: int, num_blocks: int = 2000, max_model_len: int = 20000) -> tuple[Any, Any]:
    """(a `KVCacheManager` of one full-attention group, a `ComposedBlockHasher`), the pinned lookup installed."""
    import torch
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    from vllm_cascade import vllm_compat

    vllm_compat.install_pinned_lookup()
    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    hasher = vllm_compat.ComposedBlockHasher(get_request_block_hasher(page_size, hash_fn), page_size, hash_fn)
    spec = FullAttentionSpec(block_size=page_size, num_kv_heads=2, head_size=64, dtype=torch.float32)
    config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)])
    manager = KVCacheManager(config, max_model_len=max_model_len, scheduler_block_size=page_size,
                             hash_block_size=page_size)
    return manager, hasher


def pin_chunk(manager: Any, hasher: Any, chunk_id: str, token_ids: list[int]) -> list:
    """What cascade_pin_chunk leaves: the chunk's own pages (token_ids fill them) cached under its
    hashes, referenced. -> the blocks."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    pages = len(token_ids) // hasher.block_size
    registration = Request(f"reg-{chunk_id}", list(token_ids), SamplingParams(max_tokens=1), None,
                           block_hasher=hasher)
    blocks = manager.block_pool.get_new_blocks(pages)
    manager.block_pool.cache_full_blocks(registration, blocks, 0, pages, hasher.block_size, 0)
    hasher.chunks[chunk_id] = list(registration.block_hashes)
    hasher.blocks[chunk_id] = blocks
    return blocks


def composed_request(hasher: Any, request_id: str, refs: list[tuple[str, int]], tail: list[int]) -> Any:
    """A request composing chunks `refs` [(chunk id, pages)] and then `tail`, hashed as the engine does."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    lead = [0] * (sum(n for _, n in refs) * hasher.block_size)  # chunk slots: their hashes come from the pins
    params = SamplingParams(max_tokens=1, extra_args={"cascade_chunks": [f"{c}:{n}" for c, n in refs]})
    return Request(request_id, lead + list(tail), params, None, block_hasher=hasher)
