"""One layer of a composed-chunks prefill step: the Triton chunk kernel's settings, against FlashInfer.

The step that dominates `chunks_bench.py`'s TTFT (benchmarks/RESULTS.md, sixth session): 32 requests
each compose 4 chunks of 2048 tokens, in its own order, and prefill a 64-token tail. Every tail token
attends all 8,256 keys of its request; each chunk's keys are RoPE-shifted to where the chunk sits
in that request. Layout as the backend sees it: chunk pages registered once (page 0 left out), each
request's tail on pages of its own; the key shift of a chunk page is its slot's offset in the
request (kv/chunk_pages.py). The plan is the backend's (`plan_cascade` with the shifts, default
thresholds), so each chunk is one shared segment of the 32 rows.

Variants (each timed with CUDA events, median of 20):
- the Triton kernel as the backend's `chunk_kernel` runs it (16 pages per item, default launches);
- pages per item (16, 128) x wide-tile warps (4; 8 with 2 stages); with --sweep, more pages per item,
  64 keys per inner step and 128-row tiles;
- the backend's default chunk prefill path (`FlashInferCascade` on `split_uniform`'s segments: each
  chunk once for the queries of all rows, rotated once per row, FlashInfer's prefill kernel, one merge);
- FlashInfer's paged prefill kernel over each request's pages, causal, without shifts: stock vLLM's
  kernel for the same attention work (its output differs: no shifts), the speed to aim at.

Each Triton variant is checked against the torch path (`ops/torch_attention.py`, float32) first.
Reported: us per layer, TFLOPS (4 x query tokens x keys x query heads x head dim, causal tails
counted whole), partial rows merged, relative error.

    python benchmarks/prefill_bench.py [--rows 32 --chunks 4 --chunk-tokens 2048 --tail 64]
    # CPU smoke run (the Triton interpreter; no FlashInfer, timings meaningless):
    TRITON_INTERPRET=1 python benchmarks/prefill_bench.py --quick
"""

from __future__ import annotations

import argparse
import itertools
import random
import time

import numpy as np
import torch
from kernel_bench import launch_label, median_us


def timed_us(fn, device: torch.device, reps: int) -> float:
    """kernel_bench's CUDA-event median on the GPU; one wall-clock run on the CPU (a smoke run)."""
    if device.type == "cuda":
        return median_us(fn, reps)
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def rope_table(rot: int, max_pos: int) -> torch.Tensor:
    """vLLM's cos_sin_cache [max_pos, rot]: cos of the angles, then sin."""
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def composed_step(rows: int, chunks: int, chunk_pages: int, tail_pages: int, page: int):
    """-> (block table, key shifts, seq_lens, query_start_loc, number of pages): each row the chunks in
    another order (permutations, shuffled, repeated), then its tail pages."""
    orders = list(itertools.permutations(range(chunks)))
    random.Random("orders").shuffle(orders)
    table, shifts = [], []
    for r in range(rows):
        order = orders[r % len(orders)]
        row = [1 + c * chunk_pages + p for c in order for p in range(chunk_pages)]
        row += [1 + chunks * chunk_pages + r * tail_pages + p for p in range(tail_pages)]
        # A chunk page cached at chunk-local position p * page now stands at its slot's offset.
        shift = [slot * chunk_pages * page for slot in range(chunks) for _ in range(chunk_pages)] + [0] * tail_pages
        table.append(row)
        shifts.append(shift)
    num_pages = 1 + chunks * chunk_pages + rows * tail_pages
    tail = tail_pages * page
    seq_lens = np.full(rows, chunks * chunk_pages * page + tail, dtype=np.int64)
    qsl = np.arange(rows + 1, dtype=np.int64) * tail
    return np.array(table, np.int32), np.array(shifts, np.int32), seq_lens, qsl, num_pages


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--chunk-tokens", type=int, default=2048)
    ap.add_argument("--tail", type=int, default=64)
    ap.add_argument("--qo-heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="every pages/item x wide launch setting")
    ap.add_argument("--quick", action="store_true", help="a small shape for a CPU run under TRITON_INTERPRET=1")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.chunks, args.chunk_tokens, args.tail = 4, 2, 32, 8
        args.qo_heads, args.kv_heads, args.head_dim, args.page = 4, 2, 16, 8

    from vllm_cascade.attention.plan import plan_cascade, split_uniform
    from vllm_cascade.kv.chunk_pages import ChunkView
    from vllm_cascade.ops.torch_attention import cascade_attention
    from vllm_cascade.ops.triton_cascade import Launch, TritonCascade

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    page, hq, hkv, d = args.page, args.qo_heads, args.kv_heads, args.head_dim
    chunk_pages, tail_pages = args.chunk_tokens // page, -(-args.tail // page)
    table, shifts, seq_lens, qsl, num_pages = composed_step(args.rows, args.chunks, chunk_pages, tail_pages, page)
    query_lens = np.diff(qsl)
    # The backend's default thresholds; the quick shape is too small for them to share anything.
    plan = plan_cascade(table, seq_lens, query_lens, page, 3, *((1, 0.0) if args.quick else ()), shifts=shifts)
    segments = sum(len(level) for level in plan.shared)
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(num_pages, hkv, page, d, generator=gen).to(device, dtype) for _ in range(2))
    q = torch.randn(int(qsl[-1]), hq, d, generator=gen).to(device, dtype)
    bt = torch.from_numpy(table).to(device)
    scale = d**-0.5
    max_pos = int(seq_lens.max()) + 1
    page_valid = torch.full((num_pages,), page, dtype=torch.int32, device=device)
    cos_sin = rope_table(d, max_pos).to(device)

    t0 = time.perf_counter()
    ref = torch.empty(q.shape, dtype=torch.float32, device=device)
    view = ChunkView(shifts, page_valid, cos_sin)
    cascade_attention(q.float(), k.float(), v.float(), bt.long(), seq_lens, qsl, plan, scale, ref, view)
    ref_s = time.perf_counter() - t0

    def triton_variant(pages_per_item: int, wide_m: int = 64, wide: Launch | None = None):
        kernel = TritonCascade(hq, hkv, page, scale, pages_per_item=pages_per_item, device=device, head_dim=d,
                               wide_m=wide_m, launches=None if wide is None else (wide, Launch()))
        kernel.set_chunk_tables(page_valid, cos_sin, args.rows, table.shape[1])
        kernel.plan(plan, bt, seq_lens, qsl, shifts)
        out = torch.empty_like(q)
        return (lambda: (kernel.run(q, k, v, out), out)[1]), kernel

    variants = {"triton, backend chunk_kernel (16 pages/item, defaults)": triton_variant(16)}
    # The two halves of the change reverted in the sixth session, one at a time; --sweep: all settings.
    wide_settings = [Launch(32, 4), Launch(32, 8, 2)] + ([Launch(64, 4), Launch(64, 8, 2)] if args.sweep else [])
    for pages_per_item, wide in itertools.product((16, 32, 64, 128) if args.sweep else (16, 128), wide_settings):
        variants[f"triton, {pages_per_item} pages/item, wide 64 rows {launch_label(wide)}"] = triton_variant(
            pages_per_item, 64, wide)
    if args.sweep:
        for pages_per_item in (16, 128):
            variants[f"triton, {pages_per_item} pages/item, wide 128 rows 8w"] = triton_variant(pages_per_item, 128)
    flashinfer = None
    if device.type == "cuda":
        import flashinfer as fi

        workspace = torch.empty(256 << 20, dtype=torch.uint8, device=device)
        flashinfer = fi.BatchPrefillWithPagedKVCacheWrapper(workspace, "HND")
        kv_indptr = torch.arange(args.rows + 1, dtype=torch.int32) * table.shape[1]
        last = torch.full((args.rows,), int(seq_lens[0]) - (table.shape[1] - 1) * page, dtype=torch.int32)
        flashinfer.plan(torch.from_numpy(qsl.astype(np.int32)), kv_indptr, bt.flatten(), last, hq, hkv, d, page,
                        causal=True, q_data_type=dtype, sm_scale=scale)

    flops = 4 * float(np.sum(query_lens * seq_lens)) * hq * d
    print(f"shape: {args.rows} requests x ({args.chunks} chunks of {args.chunk_tokens} tokens + {args.tail}-token tail),"
          f" heads {hq}/{hkv}, dim {d}, page {page}, {dtype}; plan: {segments} shared segments in "
          f"{len(plan.shared)} levels; {flops / 1e9:.1f} GFLOP per layer; torch reference {ref_s:.1f} s")
    print(f"\n{'kernel':<62} {'us/layer':>9} {'TFLOPS':>7} {'partials':>9} {'rel err':>9}")
    rows = []
    if flashinfer is not None:
        us = timed_us(lambda: flashinfer.run(q, (k, v)), device, args.reps)
        rows.append(("flashinfer paged prefill, no shifts (stock's kernel)", us, None, None))
        # The backend's chunk prefill path: segments cut at chunk boundaries, queries rotated once each.
        from vllm_cascade.ops.flashinfer_attention import FlashInferCascade

        split = split_uniform(plan, table, seq_lens, query_lens, page, np.full(num_pages, page))
        ours = FlashInferCascade(device, hq, hkv, d, page, dtype, scale, cos_sin)
        ours.plan(split, bt, seq_lens, qsl)
        out = torch.empty_like(q)
        ours.run(q, k, v, out)
        err = float((out.float() - ref).norm() / ref.norm())
        us = timed_us(lambda: ours.run(q, k, v, out), device, args.reps)
        rows.append(("flashinfer, chunk segments (backend chunk prefill)", us, ours.partial_rows, err))
    for name, (fn, kernel) in variants.items():
        out = fn().float()
        err = float((out - ref).norm() / ref.norm())
        rows.append((name, timed_us(fn, device, args.reps), kernel.partial_rows, err))
    for name, us, partials, err in rows:
        print(f"{name:<62} {us:>9.1f} {flops / us / 1e6:>7.1f} {partials if partials is not None else '-':>9} "
              f"{f'{err:.1e}' if err is not None else '-':>9}")


if __name__ == "__main__":
    main()
