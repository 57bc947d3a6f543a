"""One layer of decode attention with a shared prefix: every kernel against the floor.

The `shared` shape of ../shared/ANCHORS.md: 64 queries, an 8192-token prefix
shared by all plus 192 tokens of each request's own, 16 query heads, 8 KV
heads, head dim 128, page 16, bf16. The floor is every KV byte read once at
the measured copy bandwidth. Each variant is checked against the flat
FlashInfer decode first (relative error), then timed (median of CUDA-event
timings), once as repeated calls (the layer's KV partly in the L2 cache) and
once with the L2 cache flushed before each call ("cold L2", what a layer of a
model sees). Host planning time per step is reported apart.

    python benchmarks/kernel_bench.py [--prefix 8192 --own 192 --batch 64] [--groups G --doc D] [--sweep] [--breakdown]
        [--ncu N]

`--prefix 512 --groups 4 --doc 4096` is the `groups` shape (a 512-token system
prefix for all, then one of 4 documents of 4096 tokens per 16 requests: three
levels, FlashInfer's MultiLevelCascade with three too). `--prefix 0` is the
`nosharing` shape's decode (flat: every request its own pages; e.g.
`--prefix 0 --own 4352`); `--batch 1 --prefix 0 --own 640` is the
`single` workload's last decode steps. `--sweep` adds the Triton kernels under
CUDA-graph replay for each pages-per-item and launch setting (keys per inner
step, warps, pipeline stages), to choose the defaults from.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import numpy as np
import torch
import triton


def median_us(fn, reps: int = 50, flush: torch.Tensor | None = None) -> float:
    """Median device time of `fn`. With `flush` (a buffer larger than the L2 cache), it is zeroed
    before each timed call, so the call reads its inputs from HBM as a model's next layer would."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return float(np.median(times))


def kernel_breakdown(fn, reps: int = 20, flush: torch.Tensor | None = None) -> list[tuple[str, float]]:
    """Each kernel of one call of `fn` (a graph replay included), in launch order: (name, median us);
    with `flush`, the L2 cache flushed before each call (as median_us)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            if flush is not None:
                flush.zero_()
            fn()
        torch.cuda.synchronize()
    skip = ("memcpy", "memset", "fill")  # copies, and the flush
    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA
                      and not any(word in e.name.lower() for word in skip)), key=lambda e: e.time_range.start)
    per_call = len(kernels) // reps
    return [(kernels[i].name, float(np.median([kernels[i + c * per_call].time_range.elapsed_us()
                                               for c in range(reps)]))) for i in range(per_call)]


def launch_label(launch) -> str:
    """A Launch (ops/triton_cascade.py) as the sweeps print it."""
    return f"{launch.block_n} keys/{launch.num_warps}w/{launch.num_stages or '-'}st"


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / (median_us(lambda: b.copy_(a), reps=10) * 1e-6)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prefix", type=int, default=8192)
    ap.add_argument("--own", type=int, default=192)
    ap.add_argument("--groups", type=int, default=0,
                    help="G documents of --doc tokens after the prefix, each shared by batch/G requests (3 levels)")
    ap.add_argument("--doc", type=int, default=4096)
    ap.add_argument("--qo-heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--sweep", action="store_true", help="time Triton launch settings under graph replay")
    ap.add_argument("--breakdown", action="store_true",
                    help="each kernel of the backend's decode graph and of the flat FlashInfer decode, profiled")
    ap.add_argument("--ncu", type=int, default=0, metavar="N",
                    help="only run the backend's decode launches once to compile, then N times with the L2 flushed "
                         "before each, and exit: for Nsight Compute (device_session.sh's ncu-shared, ncu-groups)")
    args = ap.parse_args()

    import flashinfer

    from vllm_cascade.attention.plan import plan_cascade
    from vllm_cascade.ops import triton_cascade
    from vllm_cascade.ops.flashinfer_attention import FlashInferCascade
    from vllm_cascade.ops.triton_cascade import Launch, TritonCascade, default_launch

    b, page, hq, hkv, d = args.batch, args.page, args.qo_heads, args.kv_heads, args.head_dim
    groups, doc = args.groups, args.doc if args.groups else 0
    if args.prefix % page or doc % page or (groups and b % groups):
        raise SystemExit("--prefix and --doc must be whole pages, --batch a multiple of --groups")
    shared_pages, doc_pages, own_pages = args.prefix // page, doc // page, -(-args.own // page)
    first_own = shared_pages + groups * doc_pages
    num_pages = first_own + b * own_pages
    cache = torch.randn(num_pages, hkv, page, 2 * d, device="cuda", dtype=torch.bfloat16)
    k, v = cache[..., :d], cache[..., d:]
    per_group = b // max(groups, 1)
    table = np.array([list(range(shared_pages))
                      + [shared_pages + (r // per_group) * doc_pages + i for i in range(doc_pages)]
                      + [first_own + r * own_pages + i for i in range(own_pages)] for r in range(b)], dtype=np.int32)
    seq_lens = np.full(b, args.prefix + doc + args.own)
    qsl = np.arange(b + 1)
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
    bt = torch.from_numpy(table).cuda()
    scale = d**-0.5
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    # Stock: each request reads the whole prefix.
    flat = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "HND")
    indptr = torch.arange(b + 1, dtype=torch.int32) * table.shape[1]
    last = torch.full((b,), int(seq_lens[0]) - (table.shape[1] - 1) * page, dtype=torch.int32)
    flat.plan(indptr, bt.flatten(), last, hq, hkv, d, page, q_data_type=torch.bfloat16, sm_scale=scale)
    ref = flat.run(q, (k, v))

    # FlashInfer's own cascade: the prefix for all, the documents per group, each request's own pages.
    levels = []  # (query ranges, KV page ranges, page ids, last page lengths) per level
    if shared_pages:
        levels.append(([0, b], [0, shared_pages], torch.arange(shared_pages), [page]))
    if groups:
        levels.append((list(range(0, b + 1, per_group)), list(range(0, (groups + 1) * doc_pages, doc_pages)),
                       torch.arange(shared_pages, first_own), [page] * groups))
    levels.append((list(range(b + 1)), list(range(0, (b + 1) * own_pages, own_pages)),
                   bt[:, shared_pages + doc_pages:].flatten(),
                   [args.own - (own_pages - 1) * page] * b))
    shared = len(levels) > 1
    mlc = flashinfer.MultiLevelCascadeAttentionWrapper(len(levels), workspace, "HND")
    if shared:
        mlc.plan([torch.tensor(lv[0], dtype=torch.int32) for lv in levels],
                 [torch.tensor(lv[1], dtype=torch.int32) for lv in levels],
                 [lv[2].to("cuda", torch.int32) for lv in levels],
                 [torch.tensor(lv[3], dtype=torch.int32) for lv in levels],
                 hq, hkv, d, page, sm_scale=scale, q_data_type=torch.bfloat16)

    def host_us(work, repeats: int = 5) -> float:
        """Median host time of `work` after one untimed call (the first may compile kernels)."""
        work()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            work()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)

    max_levels = len(levels)  # as many as the shape has (the backend's default allows 3)
    plan = plan_cascade(table, seq_lens, np.ones(b, dtype=int), page, max_levels=max_levels)
    plan_us = host_us(lambda: plan_cascade(table, seq_lens, np.ones(b, dtype=int), page, max_levels=max_levels))
    # The backend's decode kernel: 32 pages per item on cascade steps, 64 on flat ones.
    backend_pages = 64 if plan.is_flat else 32
    if args.ncu:  # the same launches, eager; Nsight Compute skips the first layer's (they compile) by count
        layer = TritonCascade(hq, hkv, page, scale, head_dim=d, pages_per_item=backend_pages, fill_programs=True,
                              capacity={"tokens": 512, "rows": 16384, "items": 16384})
        layer.plan(plan, bt, seq_lens, qsl)
        out, flush = torch.empty_like(q), torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        layer.run(q, k, v, out)  # compiles
        for _ in range(args.ncu):
            flush.zero_()
            layer.run(q, k, v, out)
        torch.cuda.synchronize()
        return
    ours = FlashInferCascade(torch.device("cuda"), hq, hkv, d, page, torch.bfloat16, scale)
    fi_plan_us = host_us(lambda: ours.plan(plan, bt, seq_lens, qsl))

    def into(run, out: torch.Tensor):
        """A variant that writes into `out`, as one that returns its output."""
        return lambda: (run(q, k, v, out), out)[1]

    variants = {"flashinfer decode, flat (stock)": lambda: flat.run(q, (k, v))}
    if shared:
        variants[f"flashinfer MultiLevelCascade, {len(levels)} levels"] = lambda: mlc.run(q, (k, v))
        variants["cascade backend, gpu_kernel=flashinfer"] = into(ours.run, torch.empty_like(q))
    host = {"plan_cascade (numpy)": plan_us, "flashinfer wrappers plan": fi_plan_us}
    for wide_m in (16, 64, 128):  # 16: every tile narrow (the prefix is read once per 8 queries at G=2)
        for pages_per_item in (8, 16, 32):
            tc = TritonCascade(hq, hkv, page, scale, pages_per_item=pages_per_item, head_dim=d, wide_m=wide_m)
            tc.plan(plan, bt, seq_lens, qsl)  # allocates; the steady state is the second plan
            t0 = time.perf_counter()
            tc.plan(plan, bt, seq_lens, qsl)
            torch.cuda.synchronize()
            host[f"triton work list (wide {wide_m}, {pages_per_item} pages/item)"] = (time.perf_counter() - t0) * 1e6
            variants[f"triton, wide {wide_m}, {pages_per_item} pages/item"] = into(tc.run, torch.empty_like(q))

    def replayed(pages_per_item: int = 16, launches=None, programs_per_sm: int = 4, fill: bool = False,
                 wide_m: int = 64, pdl: bool = True):
        """What a FULL CUDA graph replays: fixed buffers, the launches captured once (both
        specializations of the partials kernel, as in the backend's graphs)."""
        fixed = TritonCascade(hq, hkv, page, scale, head_dim=d, pages_per_item=pages_per_item, launches=launches,
                              capacity={"tokens": 512, "rows": 16384, "items": 16384},
                              programs_per_sm=programs_per_sm, fill_programs=fill, wide_m=wide_m)
        fixed.plan(plan, bt, seq_lens, qsl)
        graph_out = torch.empty_like(q)
        default_pdl, triton_cascade.PDL = triton_cascade.PDL, pdl
        try:
            fixed.run(q, k, v, graph_out)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fixed.run(q, k, v, graph_out)
        finally:
            triton_cascade.PDL = default_pdl
        return lambda: (graph.replay(), graph_out, fixed)[1]  # `fixed` owns the buffers the graph reads

    variants["triton, fixed buffers, CUDA graph replay (16 pages/item)"] = replayed()
    # fill_programs (on in the backend): shorter KV runs when the step has few pages per program.
    variants["triton, backend decode settings, graph replay"] = replayed(backend_pages, fill=True)
    variants["triton, backend settings, no PDL"] = replayed(backend_pages, fill=True, pdl=False)
    for per_sm in (2, 8):  # persistent programs per SM (the backend: 4)
        variants[f"triton, backend settings, {per_sm} programs/SM"] = replayed(backend_pages, None, per_sm, True)
    variants["triton, backend settings without fill_programs"] = replayed(backend_pages)
    if args.sweep:
        # (keys per inner step, warps, pipeline stages) of one launch; the other keeps its default.
        settings = [Launch(*s) for s in itertools.product((32, 64), (4, 8), (None, 2, 4))]

        def add(name: str, *args) -> None:
            try:
                variants[name] = replayed(*args)
            except triton.runtime.errors.OutOfResources as e:  # e.g. 64 keys x 4 stages of K and V
                print(f"{name}: does not fit ({e})")

        for pages_per_item, narrow in itertools.product((16, 32, 64), settings):
            add(f"graph: {pages_per_item} pages/item, narrow {launch_label(narrow)}", pages_per_item,
                (default_launch(True, 64, False), narrow))
        # Wide tiles of 64 rows (the backend's: 32 tokens at GQA 2) read a shared page once per 32
        # requests; 128 rows read it once per 64 (half the shared level's reads, more registers).
        for wide_m, wide in itertools.product((64, 128) if shared else (), settings):
            add(f"graph: backend settings, wide {wide_m} rows {launch_label(wide)}", backend_pages, (wide, Launch()),
                4, True, wide_m)

    kv_bytes = (args.prefix + groups * doc + b * args.own) * hkv * d * 2 * 2
    bandwidth = copy_bandwidth()
    floor_us = kv_bytes / bandwidth * 1e6
    docs = f" + {groups} documents of {doc} (each for {per_group})" if groups else ""
    print(f"shape: batch {b}, prefix {args.prefix}{docs} + own {args.own}, heads {hq}/{hkv}, dim {d}, page {page}; "
          f"plan levels {plan.num_levels}")
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; KV read once {kv_bytes / 1e6:.1f} MB -> floor {floor_us:.1f} us")
    # Repeated calls of one layer find much of its KV still in the L2 cache (50 MB on the H100); in a
    # model each layer reads its own KV after 27 other layers' did. "cold L2" zeroes a 256 MB buffer
    # before each timed call; its ratio to the floor is the one that holds end to end.
    l2_flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    print(f"\n{'kernel':<56} {'us/layer':>9} {'x floor':>8} {'vs flat':>8} {'rel err':>9} {'cold L2':>9} "
          f"{'x floor':>8}")
    flat_us = None
    for name, fn in variants.items():
        out = fn().float()
        err = float((out - ref.float()).norm() / ref.float().norm())
        us, cold = median_us(fn), median_us(fn, flush=l2_flush)
        flat_us = flat_us or us
        print(f"{name:<56} {us:>9.1f} {us / floor_us:>8.2f} {flat_us / us:>7.2f}x {err:>9.1e} {cold:>9.1f} "
              f"{cold / floor_us:>8.2f}")
    if args.breakdown:
        # Where a layer's time goes: the graph holds, per tile kind (wide: shared-level items; narrow: the
        # rest), both chunk specializations of the partials kernel (one finds no items), then the merge.
        for name in ("flashinfer decode, flat (stock)", "triton, backend decode settings, graph replay",
                     "triton, backend settings, no PDL"):
            print(f"\nkernels of '{name}' (profiled, median us of each in launch order; L2 warm, cold):")
            cold = kernel_breakdown(variants[name], flush=l2_flush)
            for (kernel, us), (_, cold_us) in zip(kernel_breakdown(variants[name]), cold):
                print(f"  {kernel[:80]:<80} {us:>8.1f} {cold_us:>8.1f}")
    print("\nhost work per step:")
    for name, us in host.items():
        print(f"  {name:<56} {us:>9.1f} us")


if __name__ == "__main__":
    main()
