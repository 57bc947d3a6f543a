"""Random batches whose requests share pages the way vLLM shares them: a
prefix for all, documents for groups, then each request's own pages."""

from __future__ import annotations

import numpy as np


def random_batch(rng: np.random.Generator, page_size: int, max_rows: int = 12):
    """-> block_table [R, P], seq_lens [R], query_lens [R], num_pages_total."""
    num_rows = int(rng.integers(1, max_rows + 1))
    next_page = iter(range(1, 1_000_000))
    common = [next(next_page) for _ in range(int(rng.integers(0, 6)))]
    groups = [[next(next_page) for _ in range(int(rng.integers(0, 5)))] for _ in range(int(rng.integers(1, 4)))]
    rows, seq_lens, query_lens = [], [], []
    for _ in range(num_rows):
        prefix = (common if rng.random() < 0.8 else []) + groups[int(rng.integers(len(groups)))]
        own_tokens = int(rng.integers(1, 3 * page_size))
        query_len = int(rng.integers(1, own_tokens + 1)) if rng.random() < 0.3 else 1
        seq_len = len(prefix) * page_size + own_tokens
        own_pages = [next(next_page) for _ in range(-(-own_tokens // page_size))]
        rows.append(prefix + own_pages)
        seq_lens.append(seq_len)
        query_lens.append(query_len)
    width = max(len(r) for r in rows) + 2
    table = np.zeros((num_rows, width), dtype=np.int64)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    return table, np.array(seq_lens), np.array(query_lens), next(next_page)


def composition_layout(lens: list[int], tail_len: int, page_size: int):
    """Where `chunks/layout.compose_prompt` puts chunks of these lengths and a tail ->
    (each chunk's first slot, each chunk's true offset, the tail's first slot, its true offset,
    slots in all)."""
    from vllm_cascade.chunks.layout import ChunkRef, compose_prompt

    refs = [ChunkRef(str(i), [1] * n, -(-n // page_size)) for i, n in enumerate(lens)]
    prompt = compose_prompt(refs, [2] * tail_len, page_size, 1 << 30)
    slots = np.cumsum([0] + [pages * page_size for _, pages in prompt.refs])
    true = np.cumsum([0, *lens])
    return slots[:-1].tolist(), true[:-1].tolist(), int(slots[-1]), int(true[-1]), len(prompt.token_ids)


def random_compositions(rng: np.random.Generator, page_size: int, max_rows: int = 8, query_len: int | None = None):
    """Rows composing random chunks in random orders, then a tail, as the chunk store lays them out
    (each chunk on pages of its own, pads at the end of its last page; the tail on fresh pages).
    -> block_table [R, P], seq_lens [R], query_lens [R], num_pages, ChunkPages annotated as the
    engine core annotates registered chunks. Some chunks end exactly on a page boundary, some
    rows hold a chunk no other row holds (it lands in their own level)."""
    from vllm_cascade.kv.chunk_pages import ChunkPages

    next_page = iter(range(1, 1_000_000))
    chunks = []
    for _ in range(int(rng.integers(2, 5))):
        n = int(rng.choice([page_size, 2 * page_size, int(rng.integers(1, 3 * page_size))]))
        pages = [next(next_page) for _ in range(-(-n // page_size))]
        chunks.append((pages, [page_size] * (len(pages) - 1) + [n - (len(pages) - 1) * page_size]))
    num_rows = int(rng.integers(2, max_rows + 1))
    rows, seq_lens, query_lens = [], [], []
    for _ in range(num_rows):
        order = rng.permutation(len(chunks))[: int(rng.integers(1, len(chunks) + 1))]
        own_chunk = rng.random() < 0.2  # a chunk of this row alone, last before its tail
        if own_chunk:
            n = int(rng.integers(1, 2 * page_size))
            pages = [next(next_page) for _ in range(-(-n // page_size))]
            chunks.append((pages, [page_size] * (len(pages) - 1) + [n - (len(pages) - 1) * page_size]))
            order = np.r_[order, len(chunks) - 1]
        prefix = [p for c in order for p in chunks[c][0]]
        tail = int(rng.integers(1, 3 * page_size))
        q = query_len or (int(rng.integers(1, tail + 1)) if rng.random() < 0.7 else 1)
        rows.append(prefix + [next(next_page) for _ in range(-(-tail // page_size))])
        seq_lens.append(len(prefix) * page_size + tail)
        query_lens.append(min(q, tail))
    num_pages = next(next_page)
    table = np.zeros((num_rows, max(len(r) for r in rows) + 2), dtype=np.int64)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    annotated = ChunkPages(num_pages, page_size)
    for pages, valid in chunks:
        annotated.annotate(pages, valid, [j * page_size for j in range(len(pages))])
    return table, np.array(seq_lens), np.array(query_lens), num_pages, annotated
