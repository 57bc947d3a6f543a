"""Where a decode step's time goes: wall time against GPU busy time, per backend.

A diagnostic, not a benchmark: it says whether a workload's decode step is
bound by the GPU (kernels back to back) or by the host (the GPU waits), and
which kernels take the GPU's time. Each backend runs in its own process with
the engine in that process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so
torch.profiler sees the kernels, CUDA-graph replays included, and the
builder's counters (`STATS`) are this process's.

Per workload: one warm run, one timed run without the profiler (tokens/s and
wall time per step), one run under the profiler (GPU busy time per step, the
union of kernel and copy intervals; the top kernels by GPU time). A run of N
new tokens per request is N steps (one with the prefill, N - 1 decode steps).

    python benchmarks/step_profile.py --model .models/qwen3-0.6b --workloads single,shared \
        --backends FLASH_ATTN,CASCADE
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import defaultdict

from harness import backend_arguments, engine_backend, run_per_backend
from throughput import workload

BACKENDS = ["FLASH_ATTN", "CASCADE"]


def gpu_busy_us(events) -> tuple[float, dict[str, float]]:
    """(union of the GPU intervals in us, GPU time per kernel name)."""
    spans, per_name = [], defaultdict(float)
    for e in events:
        if e.device_type.name != "CUDA":
            continue
        start, end = e.time_range.start, e.time_range.end
        spans.append((start, end))
        per_name[e.name] += end - start
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy, per_name


def run_backend(args) -> None:
    import torch
    from vllm import LLM, SamplingParams

    from vllm_cascade.stats import STATS

    llm = LLM(model=args.model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              **engine_backend(args.backend), max_model_len=10240, enable_prefix_caching=True,
              gpu_memory_utilization=0.85, seed=0)
    results = {}
    for name in args.workloads.split(","):
        row = {}
        for phase in ("warm", "timed", "profiled"):
            prompts, new = workload(name, random.Random(f"{name}-{phase}"), random.Random(name))
            new = min(new, args.max_tokens)
            params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
            requests = [{"prompt_token_ids": p} for p in prompts]
            build_ns, steps = STATS.build_ns_by_kind.get("decode", 0), STATS.steps_by_kind.get("decode", 0)
            if phase != "profiled":
                t0 = time.perf_counter()
                llm.generate(requests, params, use_tqdm=False)
                wall = time.perf_counter() - t0
                row.update(tok_per_s=len(prompts) * new / wall, wall_ms_per_step=wall / new * 1e3)
                if STATS.steps_by_kind.get("decode", 0) > steps:
                    row["build_us_per_decode"] = ((STATS.build_ns_by_kind["decode"] - build_ns) / 1e3
                                                  / (STATS.steps_by_kind["decode"] - steps))
                continue
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts) as prof:
                t0 = time.perf_counter()
                llm.generate(requests, params, use_tqdm=False)
                torch.cuda.synchronize()
                wall = time.perf_counter() - t0
            busy, per_name = gpu_busy_us(prof.events())
            row.update(profiled_wall_ms_per_step=wall / new * 1e3, gpu_busy_ms_per_step=busy / new / 1e3,
                       top_kernels_us_per_step={k: v / new for k, v in
                                                sorted(per_name.items(), key=lambda kv: -kv[1])[: args.top]})
            cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            with open(os.path.join(args.log_dir, f"profile-{args.backend}-{name}-cpu.txt"), "w") as f:
                f.write(cpu)
        results[name] = row
        print(name, json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f)


def main() -> None:
    ap = backend_arguments(__doc__.splitlines()[0], BACKENDS)
    ap.add_argument("--workloads", default="single,shared")
    ap.add_argument("--max-tokens", type=int, default=128, help="new tokens per request (fewer steps to profile)")
    ap.add_argument("--top", type=int, default=8, help="kernels listed per run")
    args = ap.parse_args()
    if args.backend:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # before vLLM reads it: engine in this process
        return run_backend(args)
    child = ["--model", args.model, "--workloads", args.workloads, "--max-tokens", str(args.max_tokens),
             "--top", str(args.top), "--log-dir", args.log_dir]
    table, _ = run_per_backend(__file__, child, args.backends.split(","), "profile", args.log_dir)
    for backend, rows in table.items():
        for name, row in rows.items():
            print(f"\n{backend} {name}: top kernels (us per step)")
            for kernel, us in row.get("top_kernels_us_per_step", {}).items():
                print(f"  {us:9.1f}  {kernel[:110]}")
    print(f"\n{'backend':<12} {'workload':<10} {'tok/s':>9} {'wall ms/step':>13} {'profiled':>9} "
          f"{'GPU busy ms/step':>17} {'build us/decode':>16}")
    for backend, rows in table.items():
        for name, row in rows.items():
            print(f"{backend:<12} {name:<10} {row['tok_per_s']:>9.0f} {row['wall_ms_per_step']:>13.2f} "
                  f"{row['profiled_wall_ms_per_step']:>9.2f} {row['gpu_busy_ms_per_step']:>17.2f} "
                  f"{row.get('build_us_per_decode', float('nan')):>16.0f}")


if __name__ == "__main__":
    main()
