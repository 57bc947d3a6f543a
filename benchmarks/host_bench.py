"""Host time of one decode step's planning for the Triton path, no GPU needed.

What the metadata builder does per decode step besides reading the block table:
the planner (or the reuse of the last decode step's levels), the stats, the
work list (built, or the last one advanced by a token) and its upload buffer
(TritonCascade on the CPU device: the same host work, the copy is host to host).
Each case runs decode steps of one batch (every row one token further per step,
rows at different lengths), mean over 300 steps after a warm-up; "afresh"
plans and builds every step as if every step had new requests. Host timings
are noisy (30% between runs here), so compare within one run on one machine.

The `orders` case is the composed-chunks workload's decode: 32 requests, each
4 chunks of 2048 tokens in one of 24 orders + a 64-token tail; afresh, each
step also derives the key shifts from the page annotations and plans with
`plan_any_offset`. The last line is that workload's prefill step (the tails: 64 query
tokens per row), whose attention dominates its TTFT: shifts, plan and work list, split; then
the host arrays of the `chunk_prefill_kernel="flashinfer"` path for the same step instead of the
work list (split_uniform, SharedRuns; FlashInfer's own plan calls need a GPU and are left out),
and the scheduler's prefix-cache lookup of that step's 32 requests: vLLM's against the pinned one
(after the engine core's intake of them: their Request objects and block hashes).

    python benchmarks/host_bench.py
"""

import itertools
import time

import numpy as np
import torch

from vllm_cascade.attention.plan import DecodePlanReuse, flat_plan, plan_cascade, split_uniform
from vllm_cascade.kv.chunk_pages import ChunkPages
from vllm_cascade.ops.flashinfer_attention import SharedRuns
from vllm_cascade.ops.triton_cascade import TritonCascade
from vllm_cascade.stats import AttentionStats

PAGE, STEPS, WARM = 16, 300, 20


def batch(rows: int, prefix: int, own: int, shared: bool) -> tuple[np.ndarray, np.ndarray]:
    """Block table wide enough for every step; rows `own` + r tokens past the prefix."""
    seq = prefix + own + np.arange(rows)
    pages = -(-(int(seq.max()) + STEPS + WARM) // PAGE)
    sp = prefix // PAGE if shared else 0
    table = np.zeros((rows, pages), dtype=np.int32)
    table[:, :sp] = np.arange(sp)
    table[:, sp:] = sp + np.arange(rows * (pages - sp)).reshape(rows, -1)
    return table, seq


def orders_batch(chunk_pages: ChunkPages) -> tuple[np.ndarray, np.ndarray]:
    """32 rows, each the 4 chunks (128 pages each, annotated) in one of 24 orders, then tail pages."""
    chunks = [list(range(1 + 128 * c, 1 + 128 * (c + 1))) for c in range(4)]
    for pages in chunks:
        chunk_pages.annotate(pages, [PAGE] * 128, [PAGE * i for i in range(128)])
    orders = list(itertools.permutations(range(4)))
    seq = 4 * 2048 + 64 + np.arange(32)
    tail = -(-(int(seq.max()) + STEPS + WARM) // PAGE) - 512
    table = np.array([[*itertools.chain(*(chunks[c] for c in orders[r % 24])), *range(600 + r * tail, 600 + (r + 1) * tail)]
                      for r in range(32)], dtype=np.int32)
    return table, seq


def bench(name: str, rows: int, prefix: int, own: int, shared: bool | str, reuse_levels: bool) -> None:
    tc = TritonCascade(16, 8, PAGE, 0.1, device="cpu", capacity={"tokens": 512, "rows": 4096, "items": 4096})
    chunk_pages = None
    if shared == "orders":
        chunk_pages = ChunkPages(600 + 32 * 600, PAGE)
        table, seq = orders_batch(chunk_pages)
        tc.set_chunk_tables(torch.from_numpy(chunk_pages.valid), torch.ones(1, 16), rows, table.shape[1])
    else:
        table, seq = batch(rows, prefix, own, shared)
    stats, reuse, bt = AttentionStats(), DecodePlanReuse(), torch.from_numpy(table)
    ones, qsl = np.ones(rows, dtype=np.int64), np.arange(rows + 1)
    key = "same requests" if reuse_levels else None
    advanced = 0
    for step in range(WARM + STEPS):
        if step == WARM:
            t0, advanced = time.perf_counter(), 0
        plan = reuse.get(key, seq, PAGE, 0.1)
        if plan is None:
            shifts = chunk_pages.shifts(table, seq) if chunk_pages is not None else None
            plan = plan_cascade(table, seq, ones, PAGE, 3, 64, 0.1, shifts) if shared else flat_plan(seq, PAGE)
            reuse.put(key, plan, seq)
        level_pages, level_queries = plan.level_summary(ones)
        stats.record_step(plan.num_levels, level_pages, level_queries, plan.flat_pages_read, 1000)
        if not reuse_levels:
            tc._decode = None  # as if new requests: build the work list
        advanced += tc.plan(plan, bt, seq, qsl, plan.shifts)
        seq = seq + 1
    per_step = (time.perf_counter() - t0) / STEPS * 1e6
    print(f"{name:<24} {'reused' if reuse_levels else 'afresh':<7} {per_step:7.0f} us/step  "
          f"(levels {plan.num_levels}, work list advanced on {advanced}/{STEPS} steps)")


def bench_orders_prefill(reps: int = 50) -> None:
    """The composed-chunks tails' prefill step (64 query tokens per row, every chunk page shared
    by the 32 rows at its own offset in each): key shifts, plan, work list and its buffer."""
    chunk_pages = ChunkPages(600 + 32 * 600, PAGE)
    table, seq = orders_batch(chunk_pages)
    seq = np.full(32, 4 * 2048 + 64)
    query_lens, qsl = np.full(32, 64), np.arange(33) * 64
    tc = TritonCascade(16, 8, PAGE, 0.1, device="cpu")  # as the backend's chunk kernel: buffers grow
    tc.set_chunk_tables(torch.from_numpy(chunk_pages.valid), torch.ones(1, 16), 32, table.shape[1])
    bt = torch.from_numpy(table)
    parts = {"shifts": 0.0, "plan": 0.0, "work list": 0.0, "split": 0.0, "runs": 0.0}
    for rep in range(WARM + reps):
        if rep == WARM:
            parts = dict.fromkeys(parts, 0.0)
        t0 = time.perf_counter()
        shifts = chunk_pages.shifts(table, seq)
        t1 = time.perf_counter()
        plan = plan_cascade(table, seq, query_lens, PAGE, 3, 64, 0.1, shifts)
        t2 = time.perf_counter()
        tc.plan(plan, bt, seq, qsl, shifts)
        t3 = time.perf_counter()
        split = split_uniform(plan, table, seq, query_lens, PAGE, chunk_pages.valid)
        t4 = time.perf_counter()
        runs = SharedRuns.of(split, qsl, PAGE)
        t5 = time.perf_counter()
        for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            parts[name] += dt
    us = {k: v / reps * 1e6 for k, v in parts.items()}
    print(f"{'orders prefill b32 x64':<24} {'afresh':<7} {us['shifts'] + us['plan'] + us['work list']:7.0f} us/step  ("
          + ", ".join(f"{k} {us[k]:.0f}" for k in ("shifts", "plan", "work list"))
          + f"; {sum(len(level) for level in plan.shared)} shared segments, {tc.partial_rows} partial rows)")
    # chunk_prefill_kernel="flashinfer": the same shifts and plan, then split_uniform and SharedRuns
    # instead of the work list (FlashInfer's own plan calls need the GPU: not in this number).
    print(f"{'  same, flashinfer path':<24} {'afresh':<7} {us['shifts'] + us['plan'] + us['split'] + us['runs']:7.0f}"
          f" us/step  (split {us['split']:.0f}, runs {us['runs']:.0f}; {len(split.shared[0])} segments,"
          f" {len(runs.contrib_row)} partial rows)")


def bench_orders_lookup(reps: int = 20) -> None:
    """The scheduler's prefix-cache lookup of the 32 composed requests (4 chunks of 128 pages in
    24 orders + a 64-token tail): vLLM's hash-by-hash lookup against the pinned one
    (vllm_compat.install_pinned_lookup), on vLLM's own KV-cache manager."""
    from vllm_cascade.testing.kv_lookup import composed_request, lookup_manager, pin_chunk

    manager, hasher = lookup_manager(PAGE, num_blocks=4096, max_model_len=40000)
    rng = np.random.default_rng(0)
    for c in range(4):
        pin_chunk(manager, hasher, str(c), rng.integers(1, 30000, 2048).tolist())
    orders = list(itertools.permutations(range(4)))
    tails = [rng.integers(1, 30000, 64).tolist() for _ in range(32)]

    def intake() -> list:  # the engine core's Request of each, block hashes included
        return [composed_request(hasher, f"r{r}", [(str(c), 128) for c in orders[r % 24]], tails[r]) for r in range(32)]

    def mean_us(work) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            work()
        return (time.perf_counter() - t0) / reps * 1e6

    requests = intake()
    us = mean_us(intake)
    print(f"{'orders intake b32':<24} {'afresh':<7} {us:7.0f} us/step  (the 32 requests' Request objects "
          f"with their block hashes, {us / 32:.0f} us each)")
    vllm_lookup = manager.get_computed_blocks.__wrapped__
    for name, lookup in (("vllm", lambda req: vllm_lookup(manager, req)), ("pinned", manager.get_computed_blocks)):
        for req in requests:
            assert lookup(req)[1] == 8192

        def lookup_all(lookup=lookup) -> None:
            for req in requests:
                lookup(req)

        us = mean_us(lookup_all)
        print(f"{'orders lookup b32 ' + name:<24} {'afresh':<7} {us:7.0f} us/step  (scheduler's prefix-cache "
              f"lookup of the 32 requests, {us / 32:.0f} us each)")


if __name__ == "__main__":
    for case in (("shared b64 8192+192", 64, 8192, 192, True), ("flat b64 4096+256", 64, 4096, 256, False),
                 ("flat b1 128+512", 1, 128, 512, False), ("orders b32 4x2048+64", 32, 0, 0, "orders")):
        for reuse_levels in (False, True):
            bench(*case, reuse_levels)
    bench_orders_prefill()
    bench_orders_lookup()
