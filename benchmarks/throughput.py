"""End-to-end decode throughput: CASCADE against stock FLASH_ATTN and FLASHINFER.

The workloads of shared/ANCHORS.md, each backend in its own process, one run:
every workload runs once to warm (compile, prefix cache) and once timed with
fresh tails; output tokens per second of the timed run. Qwen3 config with
`load_format="dummy"`, bf16, prefix caching on, greedy, `ignore_eos`.

`short` is not an ANCHORS workload: the shared and groups batch (64 requests,
256 new tokens) with only the 64-token tails as prompts, so attention reads at
most 320 keys per request. Its tokens/s is what a backend reaches when long
contexts cost next to nothing; divided by the best stock tokens/s of shared or
groups, it is the ratio that attention alone could still win there (printed as
"ceiling" when `short` runs with them).

    python benchmarks/throughput.py --model .models/qwen3-0.6b [--workloads shared,groups,single,nosharing,short]
        [--backends FLASH_ATTN,FLASHINFER,CASCADE,CASCADE:flashinfer]   # CASCADE:<gpu_kernel>
        # CASCADE:model=fused: with the fused Qwen3 class (harness.engine_backend)
"""

from __future__ import annotations

import json
import random
import time

from harness import backend_arguments, engine_backend, run_per_backend, stats_line

BACKENDS = ["FLASH_ATTN", "FLASHINFER", "CASCADE"]
VOCAB = 150_000


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, VOCAB) for _ in range(n)]


def workload(name: str, rng: random.Random, fixed: random.Random) -> tuple[list[list[int]], int]:
    """-> (prompts, new tokens each). `fixed` draws the shared parts, `rng` the tails."""
    if name == "shared":
        prefix = _tokens(fixed, 8192)
        return [prefix + _tokens(rng, 64) for _ in range(64)], 256
    if name == "groups":
        system = _tokens(fixed, 512)
        docs = [_tokens(fixed, 4096) for _ in range(4)]
        return [system + docs[i // 16] + _tokens(rng, 64) for i in range(64)], 256
    if name == "single":
        return [_tokens(rng, 128)], 512
    if name == "nosharing":
        return [_tokens(rng, 4096) for _ in range(64)], 256
    if name == "short":
        return [_tokens(rng, 64) for _ in range(64)], 256
    raise ValueError(name)


def run_backend(args) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              **engine_backend(args.backend), max_model_len=10240, enable_prefix_caching=True,
              gpu_memory_utilization=0.85, seed=0)
    results = {}
    for name in args.workloads.split(","):
        for phase in ("warm", "timed"):
            prompts, new = workload(name, random.Random(f"{name}-{phase}"), random.Random(name))
            params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
            t0 = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            dt = time.perf_counter() - t0
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        results[name] = {"seconds": dt, "output_tokens": n_out, "tok_per_s": n_out / dt}
        print(name, results[name], flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f)


def main() -> None:
    ap = backend_arguments(__doc__.splitlines()[0], BACKENDS)
    ap.add_argument("--workloads", default="shared,groups,single,nosharing")
    args = ap.parse_args()
    if args.backend:
        return run_backend(args)
    child = ["--model", args.model, "--workloads", args.workloads]
    table, stats = run_per_backend(__file__, child, args.backends.split(","), "tput", args.log_dir)
    for name, counters in stats.items():
        print(f"{name} worker stats: {stats_line(counters)}")
    cascades = [b for b in table if b.startswith("CASCADE")]
    print(f"\n{'workload':<10} " + " ".join(f"{b:>15}" for b in table)
          + "".join(f"   {b + '/best stock':>22}" for b in cascades))
    for name in args.workloads.split(","):
        row = {b: table[b][name]["tok_per_s"] for b in table if name in table[b]}
        stock = best_stock(table, name)
        ratios = "".join(f"   {row[b] / stock:>21.2f}x" if stock and b in row else f"   {'-':>22}" for b in cascades)
        print(f"{name:<10} " + " ".join(f"{row.get(b, float('nan')):>15.0f}" for b in table) + ratios)
    print_ceilings(table, args.workloads.split(","))


def best_stock(table: dict[str, dict], workload: str) -> float | None:
    """The best tokens/s of the non-CASCADE backends on `workload` (None if none ran it)."""
    return max((rows[workload]["tok_per_s"] for b, rows in table.items()
                if not b.startswith("CASCADE") and workload in rows), default=None)


def print_ceilings(table: dict[str, dict], workloads: list[str]) -> None:
    """Per backend: its `short` tokens/s over the best stock tokens/s of each long-context workload."""
    long = [w for w in workloads if w in ("shared", "groups")]
    if "short" not in workloads or not long:
        return
    print("\nceiling (a backend's short tok/s / best stock tok/s of the workload): what attention could still win")
    for backend, rows in table.items():
        if "short" not in rows:
            continue
        parts = []
        for name in long:
            if stock := best_stock(table, name):
                parts.append(f"{name} {rows['short']['tok_per_s'] / stock:.2f}x")
        print(f"  {backend:<24} " + ", ".join(parts))


if __name__ == "__main__":
    main()
