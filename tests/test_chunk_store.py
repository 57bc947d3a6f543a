"""Chunks on a real engine (CASCADE, CPU): pinned pages, reuse, deletion, errors.

Pages are counted by the engine core's own KV manager (`ChunkStore.kv_pages`),
reuse by vLLM's cached-token counts; generated tokens are compared with vLLM's
CPU_ATTN engine on the same text.
"""

from __future__ import annotations

import pytest
from conftest import assert_plugin_ran
from test_e2e_llm import window

from vllm_cascade import vllm_compat
from vllm_cascade.chunks.layout import CompositionTooLong
from vllm_cascade.chunks.registry import ChunkInUse, RegistryFull, UnknownChunk
from vllm_cascade.chunks.store import ChunkSpec, ChunkStore

PAGE = 16  # the cascade engine's block size


@pytest.fixture
def store(cascade_engine):
    store = ChunkStore(cascade_engine.llm)
    yield store
    for chunk in store.list_chunks():  # the engine is shared with other tests
        store.delete_chunk(chunk.chunk_id)


def greedy(max_tokens: int = 16):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def test_registration_pins_pages_and_deletion_frees_them(store, tiny_model):
    before = store.kv_pages()["free"]
    tokens = window(tiny_model, 0, 200)
    chunk = store.register_chunk(token_ids=tokens, kind="system")
    assert chunk.num_pages == -(-200 // PAGE) and len(chunk.pages) == chunk.num_pages  # the last page padded
    assert store.kv_pages()["free"] == before - chunk.num_pages  # held by the chunk, not evictable
    again = store.register_chunk(token_ids=tokens)
    assert again is chunk and store.kv_pages()["free"] == before - chunk.num_pages
    assert store.stats()["pages_pinned"] == chunk.num_pages
    store.delete_chunk(chunk.chunk_id)
    assert store.kv_pages()["free"] == before
    with pytest.raises(UnknownChunk):
        store.get_chunk(chunk.chunk_id)


def test_chain_composition_reuses_pages_and_matches_stock(store, cascade_engine, reference_engine, tiny_model):
    system, doc, tail = window(tiny_model, 300, 100), window(tiny_model, 700, 150), window(tiny_model, 1100, 9)
    a = store.register_chunk(token_ids=system, kind="system")
    b = store.register_chunk(token_ids=doc, parent=a.chunk_id)
    assert b.token_ids == tuple(system + doc) and b.own_token_ids == tuple(doc)
    outs = store.generate([{"chunks": [a.chunk_id, b.chunk_id], "tail": tail}, {"chunks": [a.chunk_id], "tail": tail}],
                          greedy())
    want = reference_engine.generate_ids([system + doc + tail, system + tail], max_tokens=16)
    assert [list(o.outputs[0].token_ids) for o in outs] == want
    # Every page of the chain came from the pinned pages (each chunk's last one padded), none was prefilled
    # again. The output shows the composition's tokens: the pads are left out, and not counted as cached.
    assert outs[0].num_cached_tokens == 100 + 150 and outs[1].num_cached_tokens == 100
    assert [list(o.prompt_token_ids) for o in outs] == [system + doc + tail, system + tail]
    stats = store.stats()
    assert stats["reused_tokens"] == stats["chunk_tokens"] == 250 + 100
    assert_plugin_ran(cascade_engine.stats())
    assert cascade_engine.totals()["chunk_steps"] > 0  # the pads were masked by the plugin's attention


def test_any_order_reuses_every_chunk_page_and_equals_independent_composition(store, cascade_engine, tiny_model):
    """Chunks registered alone, composed in both orders: no chunk token is computed again, and the
    tokens are those of the Hugging Face reference composing the same chunks prefilled alone, keys
    rotated to their true offsets (the exact meaning of an independent composition). Both rows are
    one batch: each chunk is a shared level although it sits at another offset in each."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_cascade.testing.composition_ref import independent_greedy

    first, second, tail = window(tiny_model, 50, 60), window(tiny_model, 900, 70), window(tiny_model, 1300, 5)
    a, b = store.register_chunks([ChunkSpec(token_ids=first), ChunkSpec(token_ids=second)], use_tqdm=False)
    before = cascade_engine.totals()
    lookups = vllm_compat.call_engine_core(store.llm, "cascade_lookup_stats")
    outs = store.generate([{"chunks": [b.chunk_id, a.chunk_id], "tail": tail},
                           {"chunks": [a.chunk_id, b.chunk_id], "tail": tail}], greedy())
    assert [o.num_cached_tokens for o in outs] == [60 + 70] * 2  # every chunk token (pads left out)
    # The scheduler took both requests' chunk pages from the pins (install_pinned_lookup).
    after_lookups = vllm_compat.call_engine_core(store.llm, "cascade_lookup_stats")
    assert after_lookups["pinned"] == lookups["pinned"] + 2 and after_lookups["vllm"] == lookups["vllm"]
    assert store.stats()["reused_tokens"] == store.stats()["chunk_tokens"] == 2 * (60 + 70)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    with torch.no_grad():
        want = [independent_greedy(model, [second, first], tail, 16), independent_greedy(model, [first, second], tail, 16)]
    assert [list(o.outputs[0].token_ids) for o in outs] == want
    after = cascade_engine.totals()
    assert after["chunk_steps"] > before["chunk_steps"]
    # The two rows hold each chunk at another offset and still read it once (SharedSegment.q_shift).
    assert after["cascade_steps"] > before["cascade_steps"]


def test_a_composition_without_tail_ends_on_a_real_token(store, reference_engine, tiny_model):
    first = window(tiny_model, 400, 40)
    a = store.register_chunk(token_ids=first)
    outs = store.generate([{"chunks": [a.chunk_id], "tail": []}], greedy())
    assert [list(outs[0].outputs[0].token_ids)] == reference_engine.generate_ids([first], 16)
    assert outs[0].num_cached_tokens == 2 * PAGE  # its last page was computed again, from real tokens


def test_bad_input_is_refused_and_changes_nothing(store, cascade_engine, tiny_model):
    before = store.kv_pages()["free"]
    a = store.register_chunk(token_ids=window(tiny_model, 0, 40))
    with pytest.raises(UnknownChunk):
        store.generate([{"chunks": [a.chunk_id, "f" * 64], "tail": [5, 6]}], greedy())
    assert store.get_chunk(a.chunk_id).holders == 0
    with pytest.raises(CompositionTooLong):
        store.generate([{"chunks": [a.chunk_id], "tail": [7] * 1024}], greedy())
    assert store.get_chunk(a.chunk_id).holders == 0
    small = ChunkStore(cascade_engine.llm, page_budget=4)
    with pytest.raises(RegistryFull):
        small.register_chunk(token_ids=window(tiny_model, 400, 100))  # 7 pages > 4
    assert small.list_chunks() == []
    store.delete_chunk(a.chunk_id)
    assert store.kv_pages()["free"] == before


def test_deleting_a_held_chunk_frees_its_pages_on_release(store, tiny_model):
    before = store.kv_pages()["free"]
    a = store.register_chunk(token_ids=window(tiny_model, 200, 64))
    store.registry.acquire([a.chunk_id])  # as a running request does
    store.delete_chunk(a.chunk_id)
    with pytest.raises(UnknownChunk):
        store.generate([{"chunks": [a.chunk_id], "tail": [1]}], greedy())
    assert store.kv_pages()["free"] == before - 4  # still pinned for its holder (64 tokens: 4 pages)
    store.registry.release([a.chunk_id])
    assert store.kv_pages()["free"] == before


def test_lru_eviction_unpins_the_oldest_idle_chunk(cascade_engine, tiny_model):
    small = ChunkStore(cascade_engine.llm, page_budget=8)
    before = small.kv_pages()["free"]
    a = small.register_chunk(token_ids=window(tiny_model, 10, 64))  # 4 pages
    b = small.register_chunk(token_ids=window(tiny_model, 500, 64))  # 4 pages: budget full
    c = small.register_chunk(token_ids=window(tiny_model, 900, 64))  # evicts a
    assert [x.chunk_id for x in small.list_chunks()] == [b.chunk_id, c.chunk_id]
    assert small.stats()["evictions"] == 1 and small.kv_pages()["free"] == before - 8
    for chunk in (b, c):
        small.delete_chunk(chunk.chunk_id)
    assert small.kv_pages()["free"] == before and a.pages == []


def test_a_chain_pins_its_real_pages_once_and_deletes_leaf_first(cascade_engine, reference_engine, tiny_model):
    small = ChunkStore(cascade_engine.llm, page_budget=8)
    before = small.kv_pages()["free"]
    parts = [window(tiny_model, 100 + 300 * i, 32) for i in range(4)]  # 2 pages each
    chain, parent = [], None
    for part in parts:
        chain.append(small.register_chunk(token_ids=part, parent=parent))
        parent = chain[-1].chunk_id
    # 8 pages are real (the engine's free count says so), and 8 are counted, not 2 + 4 + 6 + 8.
    assert [c.num_pages for c in chain] == [2, 2, 2, 2] and small.stats()["pages_pinned"] == 8
    assert small.kv_pages()["free"] == before - 8
    tail = window(tiny_model, 1500, 7)
    outs = small.generate([{"chunks": [c.chunk_id for c in chain], "tail": tail}], greedy())
    assert outs[0].num_cached_tokens == 128  # the whole chain came from its pinned pages (no pads: 32 each)
    assert [list(outs[0].outputs[0].token_ids)] == reference_engine.generate_ids([sum(parts, []) + tail], 16)
    # Budget full: a new chunk evicts the least recently used leaf (the chain's end), not its root.
    other = small.register_chunk(token_ids=window(tiny_model, 1200, 32))
    assert [c.chunk_id for c in small.list_chunks()] == [c.chunk_id for c in chain[:3]] + [other.chunk_id]
    assert chain[3].pages == [] and small.kv_pages()["free"] == before - 8
    with pytest.raises(ChunkInUse) as err:
        small.delete_chunk(chain[0].chunk_id)
    assert err.value.status == 409 and small.kv_pages()["free"] == before - 8  # refused, nothing changed
    small.delete_chunk(chain[0].chunk_id, cascade=True)
    small.delete_chunk(other.chunk_id)
    assert small.list_chunks() == [] and small.kv_pages()["free"] == before


def test_chunks_on_another_backend_are_refused_and_pin_nothing(reference_engine, tiny_model, monkeypatch):
    """An engine whose attention backend is not CASCADE: a ChunkStore on it is refused at once (501,
    the workers' reason), before anything is prefilled. Past that check (taken away here), the
    workers still refuse a chunk's pages with the same message; the pages its prefill took are not
    kept pinned and the registry holds nothing."""
    from vllm_cascade.chunks.store import ChunksUnavailable

    with pytest.raises(ChunksUnavailable, match="chunks need the CASCADE attention backend") as err:
        ChunkStore(reference_engine.llm)
    assert err.value.status == 501
    call = vllm_compat.call_engine_core
    monkeypatch.setattr(vllm_compat, "call_engine_core",
                        lambda llm, method, *args: None if method == "cascade_chunk_problem" else call(llm, method, *args))
    store = ChunkStore(reference_engine.llm)
    before = store.kv_pages()["free"]
    with pytest.raises(Exception, match="chunks need the CASCADE attention backend"):  # vLLM's utility error
        store.register_chunk(token_ids=window(tiny_model, 300, 70))
    assert store.list_chunks() == [] and store.stats()["pages_pinned"] == 0
    assert store.kv_pages()["free"] == before  # the references the pin took were dropped
