"""GPU check: CASCADE generates the same greedy tokens as stock backends.

Runs Qwen3 (a real config with seeded random weights from
vllm_cascade.testing.tiny_model.write_random_checkpoint; vLLM's dummy weights
give uniform logits, which would make every backend agree) once per backend, each in its own
process, on the same token-id prompts: greedy, `ignore_eos`, N new tokens with
their top logprobs. Prints, against FLASH_ATTN and FLASHINFER: tokens equal up
to the first divergence, the largest |logprob| difference over the common
prefix, and where requests part, how far apart the two tokens are in the
distribution that did not pick the other's (vllm_cascade.testing.greedy; a
near-tie is small, a wrong token is not). FLASHINFER vs FLASH_ATTN gives the
noise two correct bf16 backends show; CASCADE is held to the same tolerance.

Workloads: `small` (one request alone, then 8 sharing a 1024-token prefix) and
throughput.py's `shared` and `groups` prompts (64 requests; an 8192-token
prefix for all, or a 512-token system prefix and a 4096-token document per 16),
the timed run's tails.

    python benchmarks/gpu_check.py --model .models/qwen3-0.6b --tokens 64 [--workloads small,shared,groups]
"""

from __future__ import annotations

import json
import os
import random
import tempfile

from harness import backend_arguments, engine_backend, run_per_backend, stats_line
from throughput import workload

from vllm_cascade.testing.greedy import Greedy, closeness, from_outputs, sampling_params

BACKENDS = ["FLASH_ATTN", "FLASHINFER", "CASCADE"]


def prompts(n: int, shared: int, vocab: int = 150000) -> list[list[int]]:
    rng = random.Random(0)
    prefix = [rng.randrange(100, vocab) for _ in range(shared)]
    return [prefix + [rng.randrange(100, vocab) for _ in range(rng.randrange(5, 200))] for _ in range(n)]


def batches(name: str) -> list[list[list[int]]]:
    """A workload's prompts, in the batches generate() gets them."""
    if name == "small":
        return [[prompts(1, 0)[0]], prompts(8, 1024)]
    return [workload(name, random.Random(f"{name}-timed"), random.Random(name))[0]]


def run_one(args) -> None:
    from vllm import LLM

    llm = LLM(
        model=args.model,
        skip_tokenizer_init=True,
        dtype="bfloat16",
        **engine_backend(args.backend),
        max_model_len=4096 if args.workloads == "small" else 10240,  # shared: 8192 + 64 + new tokens
        gpu_memory_utilization=0.6,
        seed=0,
    )
    params = sampling_params(args.tokens)
    result = {}
    for name in args.workloads.split(","):
        result[name] = []
        for batch in batches(name):
            outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
            result[name] += [g._asdict() for g in from_outputs(outs)]  # JSON: token ids become strings
    with open(args.out, "w") as f:
        json.dump({"outputs": result}, f)


def main() -> None:
    ap = backend_arguments(__doc__.splitlines()[0], BACKENDS)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--workloads", default="small")
    args = ap.parse_args()
    if args.backend:
        return run_one(args)
    from vllm_cascade.testing.tiny_model import write_random_checkpoint

    weights_dir = os.path.join(tempfile.gettempdir(), "vllm-cascade-random", os.path.basename(args.model.rstrip("/")))
    args.model = str(write_random_checkpoint(args.model, weights_dir))
    child = ["--model", args.model, "--tokens", str(args.tokens), "--workloads", args.workloads]
    found, stats = run_per_backend(__file__, child, args.backends.split(","), "check", args.log_dir)
    results = {backend: r["outputs"] for backend, r in found.items()}
    for name, counters in stats.items():
        print(f"{name} worker stats: {stats_line(counters)}")
    print(f"\n{'workload':<10} {'backend':<12} {'vs':<12} {'identical requests':>20} {'equal-prefix tokens':>20} "
          f"{'max |dlogprob|':>15} {'max gap where parted':>21}")
    for name in args.workloads.split(","):
        for ref in ("FLASH_ATTN", "FLASHINFER"):
            for backend, outs in results.items():
                if backend != ref and ref in results:
                    total = sum(len(o["ids"]) for o in outs[name])
                    got = closeness(*([Greedy.from_dict(o) for o in runs[name]] for runs in (results[ref], outs)))
                    same = sum(n == len(o["ids"]) for n, o in zip(got.prefixes, outs[name]))
                    print(f"{name:<10} {backend:<12} {ref:<12} {same:>14}/{len(outs[name]):<5} "
                          f"{sum(got.prefixes):>13}/{total:<6} {got.delta:>15.4f} {got.gap:>21.4f}")


if __name__ == "__main__":
    main()
