"""Chunk registry and composition layout (pure Python)."""

import random
import threading

import pytest

from vllm_cascade.chunks.layout import CompositionTooLong, compose_layout
from vllm_cascade.chunks.registry import ChunkRegistry, RegistryFull, UnknownChunk, chunk_id_for


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


def test_layout_aligns_chunks_and_counts_true_positions():
    c = compose_layout([5, 8, 1], tail_len=2, page_size=4, max_len=100)
    assert c.slot_offsets == [0, 8, 16] and c.true_offsets == [0, 5, 13] and c.tail_slot_offset == 20
    true = [c.true_position(s) for s in range(c.num_slots) if not c.is_pad(s)]
    assert true == list(range(5 + 8 + 1 + 2))  # contiguous, pads not counted
    assert [s for s in range(c.num_slots) if c.is_pad(s)] == [5, 6, 7, 17, 18, 19]


def test_layout_too_long_is_a_clear_error():
    with pytest.raises(CompositionTooLong, match="more than the model's context"):
        compose_layout([60, 60], tail_len=10, page_size=16, max_len=128)
