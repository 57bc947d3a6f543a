"""The scheduler's prefix-cache lookup of composed requests (vllm_compat.install_pinned_lookup), on
vLLM's own KV-cache manager and block pool, no engine: the same blocks and token counts as vLLM's
hash-by-hash lookup, taken from the pins. The end-to-end chunk tests run it inside real engines."""

import numpy as np
import pytest
from vllm import SamplingParams
from vllm.v1.request import Request

from vllm_cascade.testing.kv_lookup import composed_request, lookup_manager
from vllm_cascade.testing.kv_lookup import pin_chunk as pin

PAGE = 16


@pytest.fixture(scope="module")
def lookup():
    return lookup_manager(PAGE)


def pin_chunk(manager, hasher, chunk_id: str, pages: int, seed: int) -> list:
    return pin(manager, hasher, chunk_id, np.random.default_rng(seed).integers(1, 30000, pages * PAGE).tolist())


def both(manager, request):
    """(the pinned path's result, vLLM's own) as (block ids, computed tokens)."""
    ours = manager.get_computed_blocks(request)
    theirs = manager.get_computed_blocks.__wrapped__(manager, request)
    return [(ours[0].get_block_ids(), ours[1]), (theirs[0].get_block_ids(), theirs[1])]


def test_pinned_lookup_finds_what_vllm_finds(lookup):
    manager, hasher = lookup
    a, b, c = (pin_chunk(manager, hasher, name, pages, seed) for seed, (name, pages) in
               enumerate([("a", 3), ("b", 1), ("c", 2)]))
    before = dict(hasher.lookups)
    rng = np.random.default_rng(0)
    for i, refs in enumerate([[("a", 3), ("b", 1)], [("b", 1), ("c", 2), ("a", 3)], [("c", 2)]]):
        tail = rng.integers(1, 30000, int(rng.integers(1, 3 * PAGE))).tolist()
        request = composed_request(hasher, f"r{i}", refs, tail)
        ours, theirs = both(manager, request)
        assert ours == theirs
        assert ours[1] == sum(n for _, n in refs) * PAGE  # the chunks, not the uncached tail
        # The same composition and tail again, its tail's full pages now cached: both find them too.
        full = len(tail) // PAGE
        if full:
            blocks = manager.block_pool.get_new_blocks(full)
            start = sum(n for _, n in refs)
            manager.block_pool.cache_full_blocks(request, [*(None,) * start, *blocks], start, start + full, PAGE, 0)
            again = composed_request(hasher, f"r{i}-again", refs, tail + [7])
            ours, theirs = both(manager, again)
            assert ours == theirs and ours[1] == (start + full) * PAGE
    assert hasher.lookups["pinned"] - before["pinned"] >= 3 and hasher.lookups["vllm"] == before["vllm"]


def test_unpinned_chunks_and_plain_requests_keep_vllms_lookup(lookup):
    manager, hasher = lookup
    pin_chunk(manager, hasher, "d", 2, 9)
    before = dict(hasher.lookups)
    plain = Request("plain", list(range(1, 50)), SamplingParams(max_tokens=1), None, block_hasher=hasher)
    ours, theirs = both(manager, plain)
    assert ours == theirs and hasher.lookups == before  # not a composition: not counted
    request = composed_request(hasher, "unpinned", [("d", 2)], [5] * 20)
    hasher.forget_blocks({b.block_id for b in hasher.blocks["d"]})  # as cascade_unpin_pages does
    ours, theirs = both(manager, request)
    assert ours == theirs and ours[1] == 2 * PAGE  # still cached (not evicted yet): vLLM finds them
    assert hasher.lookups["vllm"] == before["vllm"] + 1 and hasher.lookups["pinned"] == before["pinned"]
    # A composition with no tail page after its chunks: the last token is computed again, as vLLM does.
    pin_chunk(manager, hasher, "e", 1, 10)
    ours, theirs = both(manager, composed_request(hasher, "no-tail", [("e", 1)], []))
    assert ours == theirs and ours[1] == 0
