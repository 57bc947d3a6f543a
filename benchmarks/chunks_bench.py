"""Composed chunks: time to first token, end-to-end time and KV pages, ChunkStore against stock vLLM.

The composed-chunks workload of shared/ANCHORS.md: 4 chunks of 2048 tokens; 32 requests, each the
chunks in another order (there are 4! = 24 orders, so 8 of them come twice) + its own 64-token
tail; 64 new tokens each. Qwen3 config, `load_format="dummy"`, bf16, prefix caching on, token-id
prompts, greedy, `ignore_eos`. Two sides, each in its own process (benchmarks/harness.py), one run:

- stock (`--backends` entries other than CASCADE, e.g. FLASHINFER): vLLM with prefix caching; the
  prompts are the same token ids; the chunks are warmed once, as prompts of their own (1 new token),
  which is the work ChunkStore's registration does;
- CASCADE: `ChunkStore` on an `LLM(attention_backend="cascade")`: the chunks registered (prefilled,
  their pages pinned), the requests composed from chunk ids (`composition_prompt`).

Variants (`--variants`):
- orders: the workload above. ChunkStore serves every chunk's pages from its pinned pages at any
  offset (the any-order path: hashes substituted in the engine core, keys shifted in attention);
  stock's prefix cache reuses only each request's first chunk.
- chain: the chunks registered as a chain (each in the context of the one before); every request is
  the whole chain + its tail; stock is warmed with the same sequences. Shows the reuse path: every
  full page of the chain comes from the cache, on both sides.

Per side and variant: a warm pass with other chunks of the same shapes (compilation, kernel
autotuning; its caches are then emptied: chunks deleted, `reset_prefix_cache`), then `--repeats`
measured passes (default 3, each with chunks and tails of its own, caches emptied after each):
setup (warming or registration), then all requests at once, stepped here so that the engine's free
KV pages are read between steps (one engine-core utility call per step, both sides). The table
shows each side's pass of median TTFT and lists every pass's TTFT mean (one pass can be an outlier:
the eighth and ninth sessions measured 94 and 310 ms for the same code and machine kind).

Measured: time to first token per request (vLLM's `RequestOutput.metrics.first_token_latency`,
arrival to first token, stats logging on), end-to-end time of the batch and of each request (wall
time when it finished), peak KV pages in use (the engine's block pool: pages referenced by running
requests plus pinned chunk pages; cached pages nobody holds count as free), pages pinned by
chunks, prefix-cache hits (vLLM's `num_cached_tokens`) and the share of chunk tokens reused.
Where TTFT goes, per request, from the engine core's timestamps in the same metrics: waiting in
its queue (queued -> scheduled), then scheduled -> first token; the rest of TTFT is the front end
(intake and output processing).

`--profile-steps N` (a diagnostic, not the benchmark): each side runs its engine in its own process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`) and adds a third pass whose first N engine steps run under
torch.profiler and cProfile: wall and GPU-busy time per step, the top kernels of those steps, and
the host's time by Python function. The timed
pass's numbers are then those of an in-process engine.

    python benchmarks/chunks_bench.py --model .models/qwen3-0.6b [--backends FLASHINFER,CASCADE]
        [--variants orders,chain] [--quick] [--repeats N] [--log-dir DIR] [--profile-steps N]
    # CPU smoke run (tiny model): VLLM_CPU_KVCACHE_SPACE=4 python benchmarks/chunks_bench.py --quick \\
    #     --model ~/.cache/vllm_cascade/<tiny> --backends CPU_ATTN,CASCADE --dtype float32 --load-format auto
"""

from __future__ import annotations

import collections
import cProfile
import io
import itertools
import json
import os
import pstats
import random
import statistics
import time
from dataclasses import asdict, dataclass

from harness import (
    PASS_MARK,
    backend_arguments,
    backend_path,
    engine_backend,
    jit_by_pass,
    run_per_backend,
    stats_line,
)

BACKENDS = ["FLASHINFER", "CASCADE"]
VARIANTS = ["orders", "chain"]


@dataclass(frozen=True)
class Shape:
    chunks: int
    chunk_tokens: int
    requests: int
    tail_tokens: int
    new_tokens: int

    @property
    def max_model_len(self) -> int:
        return self.chunks * self.chunk_tokens + self.tail_tokens + self.new_tokens


FULL = Shape(chunks=4, chunk_tokens=2048, requests=32, tail_tokens=64, new_tokens=64)  # ANCHORS.md
QUICK = Shape(chunks=4, chunk_tokens=256, requests=8, tail_tokens=16, new_tokens=8)


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]


def _concat(parts: list[list[int]]) -> list[int]:
    return list(itertools.chain.from_iterable(parts))


def request_orders(variant: str, shape: Shape) -> list[tuple[int, ...]]:
    """The chunk order of each request."""
    if variant == "chain":
        return [tuple(range(shape.chunks))] * shape.requests
    orders = list(itertools.permutations(range(shape.chunks)))
    random.Random("orders").shuffle(orders)
    return [orders[i % len(orders)] for i in range(shape.requests)]


class Side:
    """One process's engine: stock vLLM with prefix caching, or ChunkStore on CASCADE."""

    def __init__(self, args, shape: Shape) -> None:
        from vllm import LLM

        self.llm = LLM(model=args.model, load_format=args.load_format, skip_tokenizer_init=True, dtype=args.dtype,
                       **engine_backend(args.backend), max_model_len=shape.max_model_len,
                       enable_prefix_caching=True, gpu_memory_utilization=0.85, disable_log_stats=False, seed=0)
        self.vocab = self.llm.llm_engine.model_config.get_vocab_size()
        self.page_size = self.llm.llm_engine.vllm_config.cache_config.block_size
        self.idle_used = self._used()  # vLLM's null page
        self.store = None
        if args.backend.startswith("CASCADE"):
            from vllm_cascade.chunks.store import ChunkStore

            self.store = ChunkStore(self.llm)

    def _used(self) -> int:
        from vllm_cascade import vllm_compat

        pages = vllm_compat.call_engine_core(self.llm, "cascade_kv_pages")
        return pages["total"] - pages["free"]

    def setup(self, variant: str, chunks: list[list[int]]) -> list[str]:
        """Warm stock's prefix cache or register the chunks; -> chunk ids (stock: none)."""
        from vllm import SamplingParams

        if self.store is None:
            seqs = [_concat(chunks[: i + 1]) for i in range(len(chunks))] if variant == "chain" else chunks
            self.llm.generate([{"prompt_token_ids": s} for s in seqs], SamplingParams(max_tokens=1), use_tqdm=False)
            return []
        if variant == "chain":
            ids: list[str] = []
            for tokens in chunks:  # each in the context of the one before
                ids.append(self.store.register_chunk(token_ids=tokens, parent=ids[-1] if ids else None).chunk_id)
            return ids
        from vllm_cascade.chunks.store import ChunkSpec

        return [c.chunk_id for c in self.store.register_chunks([ChunkSpec(token_ids=t) for t in chunks],
                                                                use_tqdm=False)]

    def prompts(self, chunks: list[list[int]], ids: list[str], orders, tails) -> list:
        """-> per request (token ids, the ComposedPrompt or None on the stock side)."""
        plain = [_concat([chunks[j] for j in order]) + tail for order, tail in zip(orders, tails)]
        if self.store is None:
            return [(p, None) for p in plain]
        from vllm_cascade.chunks.store import composition_prompt

        composed = [composition_prompt([self.store.get_chunk(ids[j]) for j in order], tail, self.page_size,
                                       self.store.max_model_len) for order, tail in zip(orders, tails)]
        for c, p in zip(composed, plain):  # the same tokens, pads aside
            assert [t for i, t in enumerate(c.token_ids) if i not in set(c.pad_slots)] == p
        return [(c.token_ids, c) for c in composed]

    def run(self, prompts: list, new_tokens: int, profile_steps: int = 0) -> tuple[list, list[float], float, int]:
        """All prompts at once -> (outputs in order, seconds until each finished, batch seconds, peak pages used).
        With `profile_steps`, the first steps run under torch.profiler (`self.profile`, in-process engines)."""
        import torch
        from vllm import SamplingParams

        from vllm_cascade.chunks.store import with_composition

        engine = self.llm.llm_engine
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        peak = self._used()
        profiler = None
        if profile_steps:
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            profiler = torch.profiler.profile(activities=acts)
            profiler.__enter__()
            profiler.python = cProfile.Profile()  # host time by Python function (the engine is in-process)
            profiler.python.enable()
        t0 = time.perf_counter()
        self.llm.enqueue([{"prompt_token_ids": p} for p, _ in prompts],
                         [params if c is None else with_composition(params, c) for _, c in prompts], use_tqdm=False)
        self.intake_s = time.perf_counter() - t0  # where TTFT goes: the requests' intake, then the first steps
        self.step_s: list[float] = []
        outputs, finished = [], {}
        while engine.has_unfinished_requests():
            t_step = time.perf_counter()
            for out in engine.step():
                if out.finished:
                    outputs.append(out)
                    finished[out.request_id] = time.perf_counter() - t0
            self.step_s.append(time.perf_counter() - t_step)
            if profiler is not None and len(self.step_s) == profile_steps:
                self.profile = _profile_summary(profiler, t0, self.step_s)
                profiler = None
            peak = max(peak, self._used())
        if profiler is not None:  # fewer steps than asked for
            self.profile = _profile_summary(profiler, t0, self.step_s)
        batch = time.perf_counter() - t0
        outputs.sort(key=lambda o: int(o.request_id))
        return outputs, [finished[o.request_id] for o in outputs], batch, peak - self.idle_used

    def pinned_pages(self) -> int:
        """Physical pages the chunks pin, each counted once."""
        return len({p for c in self.store.list_chunks() for p in c.pages}) if self.store else 0

    def clear(self) -> bool:
        """Delete the chunks and empty the prefix cache (False if vLLM could not)."""
        if self.store is not None:
            for chunk in self.store.list_chunks():
                if chunk.parent is None:  # a chain goes with its root
                    self.store.delete_chunk(chunk.chunk_id, cascade=True)
        return self.llm.reset_prefix_cache()


def _profile_summary(prof, t0: float, step_s: list[float], top: int = 10) -> dict:
    """Stop `prof` -> the profiled steps: wall since t0 (intake included), GPU busy, top kernels by GPU time."""
    import torch
    from step_profile import gpu_busy_us

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    window_s = time.perf_counter() - t0
    prof.python.disable()
    prof.__exit__(None, None, None)
    text = io.StringIO()
    pstats.Stats(prof.python, stream=text).sort_stats("cumulative").print_stats(40)
    busy, per_name = gpu_busy_us(prof.events())
    kernels = sorted(per_name.items(), key=lambda kv: -kv[1])[:top]
    return {"wall_ms": window_s * 1e3, "step_ms": [x * 1e3 for x in step_s], "gpu_busy_ms": busy / 1e3,
            "top_kernels_ms": {name: us / 1e3 for name, us in kernels}, "python_cumulative": text.getvalue()}


def _ttft_parts(outs) -> dict:
    """Mean ms of TTFT's parts, from the engine core's timestamps (one clock) and the front end's TTFT;
    and how many requests each step first scheduled (the scheduler stamps one time per step)."""
    queue = [o.metrics.scheduled_ts - o.metrics.queued_ts for o in outs]
    compute = [o.metrics.first_token_ts - o.metrics.scheduled_ts for o in outs]
    front = [o.metrics.first_token_latency - (o.metrics.first_token_ts - o.metrics.queued_ts) for o in outs]
    steps = collections.Counter(o.metrics.scheduled_ts for o in outs)
    return {"queue_ms": statistics.mean(queue) * 1e3, "scheduled_to_first_ms": statistics.mean(compute) * 1e3,
            "front_end_ms": statistics.mean(front) * 1e3, "scheduled_per_step": [steps[t] for t in sorted(steps)]}


def _setup_pass(side: Side, shape: Shape, variant: str, orders: list, phase: str) -> tuple[float, list, int]:
    """A pass's own chunks (seeded by phase) set up on `side` (warmed or registered)
    -> (setup seconds, prompts, pinned pages)."""
    chunks = [_tokens(random.Random(f"chunk-{phase}-{i}"), shape.chunk_tokens, side.vocab) for i in range(shape.chunks)]
    tails = [_tokens(random.Random(f"tail-{variant}-{phase}-{i}"), shape.tail_tokens, side.vocab)
             for i in range(shape.requests)]
    t0 = time.perf_counter()
    ids = side.setup(variant, chunks)
    setup_s = time.perf_counter() - t0
    return setup_s, side.prompts(chunks, ids, orders, tails), side.pinned_pages()


def _pass_result(outs, prompts, shape: Shape, setup_s, finished, batch_s, peak, pinned, cleared, intake_s,
                 step_s) -> dict:
    """One timed pass's measurements."""
    from vllm_cascade.chunks.layout import ComposedPrompt
    from vllm_cascade.chunks.store import count_composition

    if any(o.metrics is None for o in outs):
        raise RuntimeError("vLLM returned no request metrics (stats logging off?)")
    counters = {"compositions": 0, "chunk_tokens": 0, "reused_tokens": 0}
    for out, (tokens, composed) in zip(outs, prompts):
        # The stock side's prompt, as a composition without pads: the same accounting on both sides.
        plain = ComposedPrompt(tokens, [], shape.chunks * shape.chunk_tokens, [])
        count_composition(counters, composed or plain, out.num_cached_tokens)
    return {
        "setup_s": setup_s, "batch_s": batch_s,
        "ttft_s": [o.metrics.first_token_latency for o in outs], "finished_s": finished,
        "peak_pages": peak, "pinned_pages": pinned, "cache_reset": cleared,
        "prompt_tokens": sum(len(p) for p, _ in prompts),
        "cached_tokens": sum(o.num_cached_tokens or 0 for o in outs),
        "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs), **counters,
        "first_tokens": [list(o.outputs[0].token_ids[:16]) for o in outs],
        "intake_s": intake_s, "first_steps_s": step_s[:4], "ttft_parts": _ttft_parts(outs),
    }


def run_backend(args) -> None:
    shape = QUICK if args.quick else FULL
    side = Side(args, shape)
    results = {"shape": asdict(shape), "page_size": side.page_size}
    for variant in args.variants.split(","):
        orders = request_orders(variant, shape)
        passes = []
        for phase in ["warm"] + ["timed" if i == 0 else f"timed{i}" for i in range(args.repeats)]:
            print(f"{PASS_MARK}{variant} {phase}", flush=True)
            setup_s, prompts, pinned = _setup_pass(side, shape, variant, orders, phase)
            outs, finished, batch_s, peak = side.run(prompts, shape.new_tokens)
            cleared = side.clear()
            if phase != "warm":
                passes.append(_pass_result(outs, prompts, shape, setup_s, finished, batch_s, peak, pinned, cleared,
                                           side.intake_s, side.step_s))
        if args.profile_steps:
            side.run(_setup_pass(side, shape, variant, orders, "profiled")[1], shape.new_tokens, args.profile_steps)
            side.clear()
        # The row is the pass of median TTFT; greedy tokens come from the first pass, whose chunks and
        # tails (seeded by pass) every side shares.
        ttft_ms = [statistics.mean(p["ttft_s"]) * 1e3 for p in passes]
        median = passes[ttft_ms.index(statistics.median_low(ttft_ms))]
        results[variant] = {**median, "distinct_orders": len(set(orders)), "pass_ttft_ms": ttft_ms,
                            "first_tokens": passes[0]["first_tokens"],
                            **({"profile": side.profile} if args.profile_steps else {})}
        r = results[variant]
        print(variant, {k: v for k, v in r.items() if not isinstance(v, list)},
              f"TTFT mean {statistics.mean(r['ttft_s']) * 1e3:.1f} ms", flush=True)
    if side.store is not None:  # how the scheduler found the compositions' chunk pages (install_pinned_lookup)
        from vllm_cascade import vllm_compat

        results["lookups"] = vllm_compat.call_engine_core(side.llm, "cascade_lookup_stats")
    with open(args.out, "w") as f:
        json.dump(results, f)


def _row(variant: str, side: str, r: dict, page_size: int) -> str:
    ttft = sorted(r["ttft_s"])
    p90 = ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))]
    return (f"{variant:<7} {side:<12} {r['setup_s']:>8.2f} {statistics.mean(ttft) * 1e3:>9.1f} "
            f"{statistics.median(ttft) * 1e3:>8.1f} {p90 * 1e3:>8.1f} {r['batch_s']:>8.2f} "
            f"{statistics.mean(r['finished_s']):>8.2f} {r['peak_pages']:>7} x{page_size:<4} {r['pinned_pages']:>7} "
            f"{r['cached_tokens'] / r['prompt_tokens']:>8.1%} {r['reused_tokens'] / r['chunk_tokens']:>8.1%}")


def main() -> None:
    ap = backend_arguments(__doc__.splitlines()[0], BACKENDS)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--quick", action="store_true",
                    help=f"small shapes: {QUICK.chunks} chunks of {QUICK.chunk_tokens} tokens, {QUICK.requests} "
                         f"requests, {QUICK.tail_tokens}-token tails, {QUICK.new_tokens} new tokens")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per side and variant; the table shows "
                    "the pass of median TTFT and lists every pass's TTFT mean")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="diagnostic: profile a third pass's first N steps (in-process engines)")
    args = ap.parse_args()
    if args.backend:
        if args.profile_steps:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # before vLLM reads it: kernels in this process
        return run_backend(args)
    child = ["--model", args.model, "--variants", args.variants, "--dtype", args.dtype,
             "--load-format", args.load_format, "--profile-steps", str(args.profile_steps),
             "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    table, stats = run_per_backend(__file__, child, args.backends.split(","), "chunks", args.log_dir)
    for name, counters in stats.items():
        print(f"{name} worker stats: {stats_line(counters)}")
    for name in table:
        compiled = jit_by_pass(backend_path(args.log_dir, "chunks", name) + ".log")
        print(f"{name} kernels compiled while serving, by pass: "
              + ("; ".join(f"{p}: {', '.join(k)}" for p, k in compiled.items() if k) or "none"))
    for name, r in table.items():
        if "lookups" in r:
            print(f"{name} scheduler lookups of compositions: {r['lookups']['pinned']} from the pins, "
                  f"{r['lookups']['vllm']} by vLLM's hash lookup")
    shape = Shape(**next(iter(table.values()))["shape"]) if table else (QUICK if args.quick else FULL)
    print(f"\n{shape.chunks} chunks x {shape.chunk_tokens} tokens, {shape.requests} requests "
          f"(+{shape.tail_tokens}-token tails, {shape.new_tokens} new tokens each)")
    print(f"{'variant':<7} {'side':<12} {'setup s':>8} {'TTFT ms':>9} {'p50':>8} {'p90':>8} {'batch s':>8} "
          f"{'req e2e':>8} {'peak pages':>13} {'pinned':>7} {'cached':>8} {'chunk re':>8}")
    for variant in args.variants.split(","):
        sides = {b: r[variant] for b, r in table.items() if variant in r}
        for b, r in sides.items():
            print(_row(variant, b, r, table[b]["page_size"]))
        cascades = [b for b in sides if b.startswith("CASCADE")]  # CASCADE, CASCADE:<settings>
        for stock, cascade in ((s, c) for s in sides if not s.startswith("CASCADE") for c in cascades):
            s, c = sides[stock], sides[cascade]
            kv = (s["peak_pages"] * table[stock]["page_size"]) / max(c["peak_pages"] * table[cascade]["page_size"], 1)
            print(f"{'':<7} {stock}/{cascade}: TTFT mean {statistics.mean(s['ttft_s']) / statistics.mean(c['ttft_s']):.2f}x"
                  f", p50 {statistics.median(s['ttft_s']) / statistics.median(c['ttft_s']):.2f}x"
                  f", batch e2e {s['batch_s'] / c['batch_s']:.2f}x, peak KV (tokens) {kv:.2f}x"
                  f"  (>1: {cascade} better; {sides[cascade]['distinct_orders']} distinct chunk orders)")
            same = sum(a == b for a, b in zip(s["first_tokens"], c["first_tokens"]))
            print(f"{'':<7} greedy tokens 1-16 equal to {stock}'s: {same}/{len(c['first_tokens'])} requests "
                  "(chain: exact up to bf16 rounding; orders: chunks composed independently, not expected equal)")
        for b, r in sides.items():
            print(f"{'':<7} {b}: TTFT mean of each timed pass " + ", ".join(f"{x:.1f}" for x in r["pass_ttft_ms"])
                  + " ms (the row: the median pass)")
        for b, r in sides.items():
            parts = r["ttft_parts"]
            print(f"{'':<7} {b}: TTFT = queue {parts['queue_ms']:.1f} + scheduled to first token "
                  f"{parts['scheduled_to_first_ms']:.1f} + front end {parts['front_end_ms']:.1f} ms (means); "
                  f"requests first scheduled per step {parts.get('scheduled_per_step')}; "
                  f"intake (enqueue) {r['intake_s'] * 1e3:.1f} ms")
            if "profile" in r:
                prof = r["profile"]
                print(f"{'':<7} {b}, profiled pass: first {len(prof['step_ms'])} steps "
                      f"{prof['wall_ms']:.1f} ms wall (steps " + ", ".join(f"{x:.1f}" for x in prof["step_ms"])
                      + f"), GPU busy {prof['gpu_busy_ms']:.1f} ms; top kernels (ms):")
                for kernel, ms in prof["top_kernels_ms"].items():
                    print(f"{'':<10} {ms:8.2f}  {kernel[:100]}")
                print(f"{'':<7} {b}, profiled pass, host (cProfile, inflates wall):\n{prof['python_cumulative']}")
        if any(not r["cache_reset"] for r in sides.values()):
            print("  warning: vLLM could not empty its prefix cache after a pass; the next variant may hit it")


if __name__ == "__main__":
    main()
