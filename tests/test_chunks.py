"""Chunk registry and composition layout (pure Python)."""

import random
import threading

import pytest

from vllm_cascade.chunks.layout import ChunkRef, CompositionTooLong, compose_prompt, registration_prompt
from vllm_cascade.chunks.registry import ChunkInUse, ChunkRegistry, RegistryFull, UnknownChunk, chunk_id_for


def make(budget=10, max_chunks=1000, evict=True):
    freed: list[int] = []
    return ChunkRegistry("model-a", page_size=4, page_budget=budget, max_chunks=max_chunks, evict_lru=evict,
                         on_free=freed.extend), freed


def test_identity_is_content_and_model():
    reg, _ = make()
    a, new_a = reg.register([1, 2, 3], kind="system", label="sys")
    b, new_b = reg.register([1, 2, 3])
    assert new_a and not new_b and a is b and a.kind == "system"
    assert a.chunk_id == chunk_id_for("model-a", [1, 2, 3]) != chunk_id_for("model-b", [1, 2, 3])
    assert chunk_id_for("model-a", [12, 3]) != chunk_id_for("model-a", [1, 23])
    assert reg.stats()["hit_rate"] == 0.5


def test_unknown_and_deleted_chunks_are_404():
    reg, freed = make()
    a, _ = reg.register([1] * 8)
    reg.attach_pages(a.chunk_id, [3, 4])
    reg.delete(a.chunk_id)
    assert freed == [3, 4] and reg.pages_pinned == 0
    for call in (lambda: reg.get(a.chunk_id), lambda: reg.acquire([a.chunk_id]), lambda: reg.delete(a.chunk_id)):
        with pytest.raises(UnknownChunk) as err:
            call()
        assert err.value.status == 404 and a.chunk_id in str(err.value)


def test_delete_while_held_frees_after_last_release():
    reg, freed = make()
    a, _ = reg.register([5] * 4)
    reg.attach_pages(a.chunk_id, [9])
    reg.acquire([a.chunk_id])
    reg.acquire([a.chunk_id])
    reg.delete(a.chunk_id)
    with pytest.raises(UnknownChunk):
        reg.acquire([a.chunk_id])  # hidden from new requests at once
    reg.release([a.chunk_id])
    assert freed == [] and reg.pages_pinned == 1  # still pinned for the running request
    reg.release([a.chunk_id])
    assert freed == [9] and reg.pages_pinned == 0


def test_reregistering_a_dying_chunk_takes_it_back():
    reg, freed = make()
    a, _ = reg.register([5] * 4)
    reg.attach_pages(a.chunk_id, [9])
    reg.acquire([a.chunk_id])
    reg.delete(a.chunk_id)
    b, created = reg.register([5] * 4)
    assert b is a and not created and b.pages == [9]
    reg.release([a.chunk_id])
    assert freed == [] and reg.get(a.chunk_id).pages == [9]


def test_lru_eviction_skips_held_chunks():
    reg, freed = make(budget=6)
    a, _ = reg.register([1] * 8)  # 2 pages each
    b, _ = reg.register([2] * 8)
    c, _ = reg.register([3] * 8)
    for chunk, pages in ((a, [0, 1]), (b, [2, 3]), (c, [4, 5])):
        reg.attach_pages(chunk.chunk_id, pages)
    reg.acquire([a.chunk_id])  # a is least recently registered but held, and now most recently used
    reg.register([4] * 8)
    assert [ch.chunk_id for ch in reg.list()][-1] == chunk_id_for("model-a", [4] * 8)
    assert freed == [2, 3] and reg.stats()["evictions"] == 1  # b went, not a


def test_full_without_eviction_is_an_error_and_changes_nothing():
    reg, freed = make(budget=4, evict=False)
    reg.register([1] * 8)
    reg.register([2] * 8)
    before = [c.chunk_id for c in reg.list()]
    with pytest.raises(RegistryFull) as err:
        reg.register([3] * 4)
    assert err.value.status == 413 and "LRU eviction is off" in str(err.value)
    assert [c.chunk_id for c in reg.list()] == before and freed == []


def test_full_of_held_chunks_is_an_error_even_with_eviction():
    reg, _ = make(budget=4)
    a, _ = reg.register([1] * 16)
    reg.acquire([a.chunk_id])
    with pytest.raises(RegistryFull, match="1 chunks are held"):
        reg.register([2] * 4)
    with pytest.raises(RegistryFull, match="exceeds the chunk page budget"):
        reg.register([3] * 20)


def test_chunk_count_limit_evicts_lru():
    reg, _ = make(budget=100, max_chunks=2)
    a, _ = reg.register([1])
    reg.register([2])
    reg.register([3])
    assert a.chunk_id not in {c.chunk_id for c in reg.list()} and len(reg.list()) == 2


def test_thread_safety_keeps_pages_accounted():
    reg, freed = make(budget=40)
    page_ids = iter(range(1_000_000))
    ids_lock = threading.Lock()

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(300):
            try:
                chunk, created = reg.register([rng.randrange(30)] * rng.randrange(1, 13))
                if created:
                    with ids_lock:
                        pages = [next(page_ids) for _ in range(chunk.num_pages)]
                    reg.attach_pages(chunk.chunk_id, pages)
                held = reg.acquire([chunk.chunk_id])
                if rng.random() < 0.3:
                    reg.delete(chunk.chunk_id)
                reg.release([c.chunk_id for c in held])
            except (UnknownChunk, RegistryFull):
                pass  # another thread deleted or filled it: the errors the API maps to 404/413

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reg.pages_pinned <= reg.page_budget
    live = [p for c in reg.list() for p in c.pages]
    assert len(set(freed)) == len(freed) and not set(freed) & set(live)  # each page freed once, none still in use


def chain(reg, lengths, first_page=0):
    """Register a chain of chunks of these own lengths; attach their own pages, as the pin returns
    them -> the chunks."""
    chunks, tokens, parent = [], [], None
    for i, n in enumerate(lengths):
        context = len(tokens)
        tokens = tokens + [100 * (i + 1) + j for j in range(n)]
        chunk, _ = reg.register(tokens, parent=parent, context_len=context)
        reg.attach_pages(chunk.chunk_id, list(range(first_page + chunk.context_pages,
                                                    first_page + chunk.context_pages + chunk.num_pages)))
        chunks.append(chunk)
        parent = chunk.chunk_id
    return chunks


def test_a_chain_pins_and_counts_only_its_own_pages():
    reg, freed = make(budget=100)
    a, b, c, d = chain(reg, [8, 8, 8, 8])  # 2 own pages each: 8 real pages, not 2 + 4 + 6 + 8
    assert [x.num_pages for x in (a, b, c, d)] == [2, 2, 2, 2] and reg.pages_pinned == 8
    assert [x.pages for x in (a, b, c, d)] == [[0, 1], [2, 3], [4, 5], [6, 7]] and freed == []
    assert [r.chunk_id for r in reg.chain(c.chunk_id)] == [a.chunk_id, b.chunk_id, c.chunk_id]
    # Every chunk's own tokens start on a page of their own: the parent's last page is padded.
    reg2, _ = make(budget=100)
    p, q = chain(reg2, [6, 6])  # 6 tokens: 2 pages (2 pads); the child's 6 tokens: 2 more
    assert (p.num_pages, q.num_pages, q.context_pages, q.pages) == (2, 2, 2, [2, 3])


def test_a_parent_with_children_is_not_deleted_unless_cascade():
    reg, freed = make(budget=100)
    a, b, c = chain(reg, [8, 8, 8])
    freed.clear()
    with pytest.raises(ChunkInUse) as err:
        reg.delete(a.chunk_id)
    assert err.value.status == 409 and b.chunk_id in str(err.value) and "cascade" in str(err.value)
    assert reg.get(a.chunk_id) is a and freed == []  # nothing changed
    reg.delete(c.chunk_id)  # a leaf goes as usual
    assert freed == [4, 5] and reg.children(b.chunk_id) == []
    reg.delete(a.chunk_id, cascade=True)  # b, then a
    assert sorted(freed) == [0, 1, 2, 3, 4, 5] and reg.list() == [] and reg.pages_pinned == 0
    assert reg.stats()["deletions"] == 3


def test_eviction_takes_leaves_only_and_never_the_parent_being_registered_on():
    reg, freed = make(budget=8)
    a, b = chain(reg, [8, 8])  # a (2 pages) is older, but b is registered on it
    x, _ = reg.register([7] * 16)  # 4 pages: budget full
    reg.attach_pages(x.chunk_id, [10, 11, 12, 13])
    freed.clear()
    reg.register([9] * 8)  # needs 2 pages: b is the least recently used leaf (a has a child)
    assert freed == [2, 3] and reg.get(a.chunk_id) is a and reg.children(a.chunk_id) == []
    freed.clear()
    reg.register([5] * 8)  # now a is a leaf and the least recently used
    assert freed == [0, 1] and a.chunk_id not in {c.chunk_id for c in reg.list()}
    # A parent that is least recently used is kept when a child is registered on it.
    reg3, freed3 = make(budget=4)
    p, _ = reg3.register([1] * 8)
    reg3.attach_pages(p.chunk_id, [0, 1])
    with pytest.raises(RegistryFull, match="parent being registered on"):
        reg3.register([1] * 8 + [2] * 12, parent=p.chunk_id, context_len=8)  # 3 own pages > 2 free
    assert reg3.get(p.chunk_id) is p and freed3 == [] and reg3.list() == [p]


def test_eviction_of_a_whole_chain_goes_leaf_first():
    reg, freed = make(budget=6)
    a, b, c = chain(reg, [8, 8, 8])  # 6 pages: full
    freed.clear()
    reg.register([3] * 24)  # 6 pages: the whole chain must go, children before parents
    assert freed == [4, 5, 2, 3, 0, 1] and reg.stats()["evictions"] == 3


def test_composed_prompt_puts_each_chunk_on_its_own_pages():
    a, b, c = ChunkRef("a", [1] * 5, 2), ChunkRef("b", [2] * 8, 2), ChunkRef("c", [3], 1)
    p = compose_prompt([a, b, c], [9, 9], page_size=4, max_len=100)
    assert p.token_ids == [1] * 5 + [0] * 3 + [2] * 8 + [3] + [0] * 3 + [9, 9]
    assert p.refs == [("a", 2), ("b", 2), ("c", 1)] and p.pad_slots == [5, 6, 7, 17, 18, 19]
    assert p.chunk_tokens == 14 and p.real_tokens(20) == 14 and p.real_tokens(6) == 5
    assert p.extra_args == {"cascade_chunks": ["a:2", "b:2", "c:1"]}
    assert p.without_pads(p.token_ids) == [1] * 5 + [2] * 8 + [3] + [9, 9]
    # No tail: the last chunk's last page is computed again, so the prompt ends on a real token.
    q = compose_prompt([a, b], [], page_size=4, max_len=100)
    assert q.token_ids == [1] * 5 + [0] * 3 + [2] * 8 and q.refs == [("a", 2), ("b", 1)]
    # A chain child's registration: its parents composed, then its own tokens padded to its pages.
    r = registration_prompt([a, c], page_size=4, max_len=100)
    assert r.token_ids == [1] * 5 + [0] * 3 + [3, 0, 0, 0] and r.refs == [("a", 2)] and r.chunk_tokens == 6


def test_composition_too_long_is_a_clear_error():
    chunk = ChunkRef("a", [1] * 60, 4)
    with pytest.raises(CompositionTooLong, match="does not fit the model's context"):
        compose_prompt([chunk, chunk], [5] * 10, page_size=16, max_len=128)


def test_a_composed_output_is_shown_without_pads_once():
    """What a client sees of a composed request (store.present_output): token ids and prompt logprobs
    at real tokens only, cached tokens counted as real tokens; a second pass changes nothing."""
    from types import SimpleNamespace

    from vllm_cascade.chunks.store import present_output

    p = compose_prompt([ChunkRef("a", [1] * 5, 2), ChunkRef("b", [2] * 2, 1)], [9], page_size=4, max_len=100)
    out = SimpleNamespace(prompt_token_ids=list(p.token_ids), prompt_logprobs=[None, *range(1, len(p.token_ids))],
                          num_cached_tokens=12)
    for _ in range(2):
        present_output(out, p)
        assert out.prompt_token_ids == [1] * 5 + [2] * 2 + [9]
        assert out.prompt_logprobs == [None, 1, 2, 3, 4, 8, 9, 12]
        assert out.num_cached_tokens == 7  # the 12 cached slots hold 7 tokens
    streamed = present_output(SimpleNamespace(prompt_token_ids=None, prompt_logprobs=None, num_cached_tokens=0), p)
    assert streamed.prompt_token_ids is None and streamed.num_cached_tokens == 0
