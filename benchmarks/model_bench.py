"""Stock Qwen3ForCausalLM against CascadeQwen3ForCausalLM: decode and prefill speed, per-kernel step profile.

One run, side by side, each (model, variant) in its own process (a GPU engine
holds most of the GPU's memory until its process exits). Qwen3 configs with
`load_format="dummy"`, bf16, greedy, `ignore_eos`, token-id prompts, prefix
caching off, the same attention backend for every variant. Each workload runs
once to warm, then once timed with fresh prompts:

- single: one 128-token prompt, 512 new tokens: batch-1 decode, output tokens/s;
- decode64: 64 prompts of 128 tokens, 256 new tokens each: output tokens/s;
- prefill: 32 prompts of 2048 tokens, 1 new token: prompt tokens/s.

`--profile` adds, per variant, a batch-1 decode profile in a process of its
own with the engine in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, so
torch.profiler sees the model runner): after warm-up decode steps it records
`--profile-steps` decode steps and prints, per step, the wall time, the GPU
busy time (union of kernel intervals), the sum of kernel times, the kernels
launched, and the top kernels by GPU time; GPU busy close to wall means
GPU-bound, far below means the host sets the pace. Decode runs inside FULL
CUDA graphs; if the profiler does not see the kernels inside them (fewer
kernels per step than layers), it says so: rerun with `--profile-eager`
(no graphs, no torch.compile). The top CPU-side ops and the full tables
(and with `--trace` a Chrome trace) go to `--log-dir`.

    python benchmarks/model_bench.py [--model .models/qwen3-0.6b,.models/qwen3-8b] [--backend FLASH_ATTN]
        [--variants stock,fused] [--workloads single,decode64,prefill]
        [--profile [--profile-eager] [--profile-steps 64] [--trace]] [--log-dir DIR]

Variants: stock, fused (Triton epilogues, residual adds in the GEMMs), and for
attribution fused-torch (the folded model in torch, compiled by Inductor) and
fused-noaddmm (residual adds after the GEMMs). The default model list is
whichever of .models/qwen3-0.6b and .models/qwen3-8b exist.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from typing import Any

from harness import FUSED_MODEL as FUSED
from harness import run_script

VARIANTS: dict[str, dict[str, Any]] = {
    "stock": {},
    "fused": FUSED,
    "fused-torch": {**FUSED, "additional_config": {"cascade_qwen3": {"kernels": False}}},
    "fused-noaddmm": {**FUSED, "additional_config": {"cascade_qwen3": {"residual_in_gemm": False}}},
}
# name -> (requests, prompt tokens, new tokens, what tokens/s counts)
WORKLOADS: dict[str, tuple[int, int, int, str]] = {
    "single": (1, 128, 512, "output"),
    "decode64": (64, 128, 256, "output"),
    "prefill": (32, 2048, 1, "prompt"),
}
LABELS = {"single": "batch-1 decode tok/s", "decode64": "batch-64 decode tok/s", "prefill": "prefill tok/s"}
DEFAULT_MODELS = (".models/qwen3-0.6b", ".models/qwen3-8b")
VOCAB_LOW = 100  # token ids drawn from [VOCAB_LOW, vocab_size)
PROFILE_WARM_STEPS = 16
TOP_KERNELS = 12
TOP_CPU_OPS = 8


# ----------------------------------------------------------------------------- child: one engine


def vocab_size(model: str) -> int:
    with open(os.path.join(model, "config.json")) as f:
        return int(json.load(f)["vocab_size"])


def prompts(rng: random.Random, n: int, length: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(VOCAB_LOW, vocab) for _ in range(length)] for _ in range(n)]


def make_llm(args):
    from vllm import LLM

    kwargs = dict(VARIANTS[args.variant])
    return LLM(model=args.model, load_format="dummy", skip_tokenizer_init=True, dtype=args.dtype,
               attention_backend=args.backend, max_model_len=args.max_model_len, enable_prefix_caching=False,
               gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager, seed=0,
               **kwargs)


def engine_facts(llm) -> dict[str, Any]:
    """What the worker really built (class; for the fused class, layers per fused path), and the layer count."""
    from vllm_cascade.models.qwen3 import fused_paths_of

    config = llm.llm_engine.model_config
    return {"architecture": llm.apply_model(fused_paths_of)[0], "layers": config.hf_config.num_hidden_layers}


def run_workloads(args) -> None:
    from vllm import SamplingParams

    t0 = time.perf_counter()
    llm = make_llm(args)
    result: dict[str, Any] = {**engine_facts(llm), "init_s": time.perf_counter() - t0, "workloads": {}}
    vocab = vocab_size(args.model)
    for name in args.workloads.split(","):
        n, length, new, counted = WORKLOADS[name]
        params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
        for phase in ("warm", "timed"):
            batch = prompts(random.Random(f"{name}-{phase}"), n, length, vocab)
            t0 = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
            dt = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs) if counted == "output" else n * length
        result["workloads"][name] = {"seconds": dt, "tokens": tokens, "tok_per_s": tokens / dt, "counted": counted}
        print(name, result["workloads"][name], flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f)


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def device_events(prof) -> list:
    """Kernels, copies and memsets the profiler saw on the GPU (not the user-annotation ranges)."""
    from torch.autograd import DeviceType

    return [e for e in prof.events() if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


def summarize_profile(prof, steps: int, wall_s: float) -> dict[str, Any]:
    events = device_events(prof)
    per_kernel: dict[str, list[float]] = {}
    for e in events:
        per_kernel.setdefault(e.name, []).append(e.time_range.end - e.time_range.start)
    top = sorted(per_kernel.items(), key=lambda kv: -sum(kv[1]))[:TOP_KERNELS]
    cpu = sorted((a for a in prof.key_averages() if a.self_cpu_time_total > 0),
                 key=lambda a: -a.self_cpu_time_total)[:TOP_CPU_OPS]
    graph_launches = sum(a.count for a in prof.key_averages() if a.key == "cudaGraphLaunch")
    return {
        "steps": steps,
        "wall_us": wall_s * 1e6 / steps,
        "gpu_busy_us": busy_time([(e.time_range.start, e.time_range.end) for e in events]) / steps,
        "gpu_sum_us": sum(sum(v) for v in per_kernel.values()) / steps,
        "kernels": len(events) / steps,
        "graph_launches": graph_launches / steps,
        "top_kernels": [(name, sum(v) / steps, len(v) / steps) for name, v in top],
        "top_cpu": [(a.key, a.self_cpu_time_total / steps, a.count / steps) for a in cpu],
    }


def run_profile(args) -> None:
    """Batch-1 decode steps under torch.profiler, the engine in this process."""
    import torch
    from vllm import SamplingParams

    llm = make_llm(args)
    facts = engine_facts(llm)
    vocab = vocab_size(args.model)
    prompt = prompts(random.Random("profile"), 1, WORKLOADS["single"][1], vocab)[0]
    warm = SamplingParams(max_tokens=PROFILE_WARM_STEPS, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompt}], warm, use_tqdm=False)  # first-call work out of the way

    engine = llm.llm_engine
    total = PROFILE_WARM_STEPS + args.profile_steps
    params = SamplingParams(max_tokens=total + PROFILE_WARM_STEPS, temperature=0.0, ignore_eos=True)
    engine.add_request("profile", {"prompt_token_ids": prompt}, params)
    produced = 0

    def step() -> None:
        nonlocal produced
        for out in engine.step():  # cumulative outputs: the token count so far
            produced = max(produced, len(out.outputs[0].token_ids))

    while produced < PROFILE_WARM_STEPS:  # prefill and the first decode steps stay out of the profile
        step()
    first = produced
    on_gpu = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        while produced < total:
            step()
        if on_gpu:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    steps = produced - first  # batch 1: one token per decode step
    while engine.has_unfinished_requests():
        engine.step()
    summary = {**facts, **summarize_profile(prof, steps, wall), "eager": args.enforce_eager}
    base = os.path.splitext(args.out)[0]
    with open(base + "-cpu-ops.txt", "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    if on_gpu:
        with open(base + "-gpu-ops.txt", "w") as f:
            f.write(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40))
    if args.trace:
        prof.export_chrome_trace(base + "-trace.json")
    with open(args.out, "w") as f:
        json.dump(summary, f)
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("top")}), flush=True)


# ----------------------------------------------------------------------------- parent: one process per engine


def spawn(args, model: str, variant: str, child: str, log_dir: str, tag: str) -> dict | None:
    """Run this script as a child for one engine; -> its JSON result, None if it failed."""
    out = os.path.join(log_dir, f"{tag}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", child, "--model", model, "--variant", variant,
           "--out", out, "--backend", args.backend, "--workloads", args.workloads, "--dtype", args.dtype,
           "--max-model-len", str(args.max_model_len), "--gpu-memory-utilization", str(args.gpu_memory_utilization),
           "--profile-steps", str(args.profile_steps)] + (["--trace"] if args.trace else [])
    eager = args.enforce_eager or (child == "profile" and args.profile_eager)
    cmd += ["--enforce-eager"] if eager else []
    env = dict(os.environ, VLLM_ALLOW_INSECURE_SERIALIZATION="1")  # apply_model sends a function to the worker
    if child == "profile":
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, where the profiler runs
    return run_script(cmd, os.path.join(log_dir, tag), tag, env)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def print_throughput(results: dict[str, dict], variants: list[str], workloads: list[str]) -> None:
    base = variants[0]
    for v in variants:  # what each engine's worker really built
        print(f"{v}: {(results[v] or {}).get('architecture', 'failed')}")
    print(f"{'':<24}" + "".join(f"{v:>14}" for v in variants) + "".join(f"{v + '/' + base:>22}" for v in variants[1:]))
    for name in workloads:
        row = {v: (results[v] or {}).get("workloads", {}).get(name, {}).get("tok_per_s") for v in variants}
        cells = "".join(f"{row[v]:>14.1f}" if row[v] else f"{'-':>14}" for v in variants)
        print(f"{LABELS[name]:<24}" + cells + "".join(f"{ratio(row[v], row[base]):>22}" for v in variants[1:]))


def print_profile(profiles: dict[str, dict], variants: list[str]) -> None:
    ok = [v for v in variants if profiles.get(v)]
    if not ok:
        return
    eager = any(profiles[v]["eager"] for v in ok)
    print(f"\nbatch-1 decode step, per step ({'enforce_eager' if eager else 'torch.compile + CUDA graphs'}, "
          f"{profiles[ok[0]]['steps']} steps profiled)")
    print(f"{'':<24}" + "".join(f"{v:>14}" for v in ok))
    for key, label in (("wall_us", "wall us"), ("gpu_busy_us", "GPU busy us"), ("gpu_sum_us", "GPU kernel sum us"),
                       ("kernels", "kernels"), ("graph_launches", "graph launches")):
        print(f"{label:<24}" + "".join(f"{profiles[v][key]:>14.1f}" for v in ok))
    for v in ok:
        p = profiles[v]
        if not p["eager"] and p["kernels"] < p["layers"]:
            print(f"  {v}: only {p['kernels']:.1f} kernels per step seen for {p['layers']} layers: the profiler "
                  f"does not see inside the CUDA graphs here; rerun with --profile-eager")
        print(f"\n{v}: top kernels by GPU time per step (us, launches)")
        for name, us, count in p["top_kernels"]:
            print(f"  {us:>9.1f} {count:>6.1f}  {name[:90]}")
        print(f"{v}: top CPU ops by self time per step (us, calls)")
        for name, us, count in p["top_cpu"][:5]:
            print(f"  {us:>9.1f} {count:>6.1f}  {name[:90]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    present = [m for m in DEFAULT_MODELS if os.path.isdir(m)]
    ap.add_argument("--model", default=",".join(present), help="comma-separated folders with a Qwen3 config.json")
    ap.add_argument("--backend", default="FLASH_ATTN", help="attention backend for every variant")
    ap.add_argument("--variants", default="stock,fused", help=f"first is the base of the ratios; of {list(VARIANTS)}")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--profile", action="store_true", help="also profile batch-1 decode steps per variant")
    ap.add_argument("--profile-eager", action="store_true", help="profile with enforce_eager (no CUDA graphs)")
    ap.add_argument("--profile-steps", type=int, default=64)
    ap.add_argument("--trace", action="store_true", help="also write each profile's Chrome trace to the log dir")
    ap.add_argument("--enforce-eager", action="store_true", help="every run without torch.compile and CUDA graphs")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--log-dir", default=os.environ.get("OUT", tempfile.gettempdir()))
    ap.add_argument("--child", choices=["run", "profile"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "run":
        return run_workloads(args)
    if args.child == "profile":
        return run_profile(args)

    models = [m for m in args.model.split(",") if m]
    variants = args.variants.split(",")
    workloads = args.workloads.split(",")
    unknown = [v for v in variants if v not in VARIANTS] + [w for w in workloads if w not in WORKLOADS]
    if not models or unknown:
        ap.error(f"no model folder given or found ({DEFAULT_MODELS})" if not models else f"unknown: {unknown}")
    os.makedirs(args.log_dir, exist_ok=True)
    # No commit here: the GPU machine's copy of the tree carries stale git metadata; RESULTS.md names it.
    print(f"backend {args.backend}, dtype {args.dtype}, logs in {args.log_dir}", flush=True)
    report = {}
    for model in models:
        short = os.path.basename(os.path.normpath(model))
        results = {v: spawn(args, model, v, "run", args.log_dir, f"model-{short}-{v}") for v in variants}
        profiles = ({v: spawn(args, model, v, "profile", args.log_dir, f"profile-{short}-{v}") for v in variants}
                    if args.profile else {})
        report[model] = (results, profiles)
    for model, (results, profiles) in report.items():
        print(f"\n== {model} ({args.backend})")
        print_throughput(results, variants, workloads)
        print_profile(profiles, variants)


if __name__ == "__main__":
    main()
