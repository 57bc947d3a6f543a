"""GPU check: CASCADE generates the same greedy tokens as stock backends.

Runs Qwen3 (a real config with seeded random weights from
vllm_cascade.testing.tiny_model.write_random_checkpoint; vLLM's dummy weights
give uniform logits, which would make every backend agree) once per backend, each in its own
process, on the same token-id prompts: greedy, `ignore_eos`, N new tokens with
logprobs. Prints, against FLASH_ATTN: tokens equal up to the first divergence,
and the largest |logprob| difference over the common prefix. FLASHINFER vs
FLASH_ATTN gives the noise two correct bf16 backends show; CASCADE is held to
the same tolerance.

    python benchmarks/gpu_check.py --model .models/qwen3-0.6b --tokens 64
"""

from __future__ import annotations

import json
import os
import tempfile

from harness import backend_arguments, engine_backend, run_per_backend, stats_line

BACKENDS = ["FLASH_ATTN", "FLASHINFER", "CASCADE"]


def prompts(n: int, shared: int, vocab: int = 150000) -> list[list[int]]:
    import random

    rng = random.Random(0)
    prefix = [rng.randrange(100, vocab) for _ in range(shared)]
    return [prefix + [rng.randrange(100, vocab) for _ in range(rng.randrange(5, 200))] for _ in range(n)]


def run_one(args) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        skip_tokenizer_init=True,
        dtype="bfloat16",
        **engine_backend(args.backend),
        max_model_len=4096,
        gpu_memory_utilization=0.6,
        seed=0,
    )
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True, logprobs=1)
    result = []
    for batch in ([prompts(1, 0)[0]], prompts(8, 1024)):
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], params)
        for o in outs:
            c = o.outputs[0]
            result.append({"ids": list(c.token_ids), "lps": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]})
    with open(args.out, "w") as f:
        json.dump({"outputs": result}, f)


def compare(a: list[dict], b: list[dict]) -> tuple[int, int, float]:
    """-> (requests identical, sum of equal-prefix lengths, max |dlogprob| on the prefix)."""
    same, prefix, worst = 0, 0, 0.0
    for x, y in zip(a, b):
        n = next((i for i, (s, t) in enumerate(zip(x["ids"], y["ids"])) if s != t), len(x["ids"]))
        same += n == len(x["ids"])
        prefix += n
        worst = max([worst] + [abs(p - q) for p, q in zip(x["lps"][:n], y["lps"][:n])])
    return same, prefix, worst


def main() -> None:
    ap = backend_arguments(__doc__.splitlines()[0], BACKENDS)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    if args.backend:
        return run_one(args)
    from vllm_cascade.testing.tiny_model import write_random_checkpoint

    weights_dir = os.path.join(tempfile.gettempdir(), "vllm-cascade-random", os.path.basename(args.model.rstrip("/")))
    args.model = str(write_random_checkpoint(args.model, weights_dir))
    child = ["--model", args.model, "--tokens", str(args.tokens)]
    found, stats = run_per_backend(__file__, child, args.backends.split(","), "check", args.log_dir)
    results = {backend: r["outputs"] for backend, r in found.items()}
    for name, counters in stats.items():
        print(f"{name} worker stats: {stats_line(counters)}")
    total = sum(len(o["ids"]) for o in next(iter(results.values()), []))
    print(f"\n{'backend':<12} {'vs':<12} {'identical requests':>20} {'equal-prefix tokens':>20} {'max |dlogprob|':>15}")
    for ref in ("FLASH_ATTN", "FLASHINFER"):
        for backend, outs in results.items():
            if backend != ref and ref in results:
                same, prefix, worst = compare(results[ref], outs)
                print(f"{backend:<12} {ref:<12} {same:>14}/{len(outs):<5} {prefix:>13}/{total:<6} {worst:>15.4f}")


if __name__ == "__main__":
    main()
