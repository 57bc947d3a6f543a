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
noise two correct bf16 backends show. With `--reference` (default: TRITON_ATTN
in fp32), each bf16 backend after the first of `--backends` is then judged by
the GPU tests' bf16 rule (testing.greedy.bf16_problems): as accurate as the
first (stock) against that reference; pass or FAIL, FLASHINFER being the
control. Last, every parting that may not be a near-tie (0.2 nats or more, or a
token outside the other's top 5) by workload, request and token. Exits 1 on a
FAIL or a failed run.

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
import sys
import tempfile

from harness import backend_arguments, engine_backend, run_per_backend, stats_line
from throughput import workload

from vllm_cascade.testing.greedy import (
    LOGPROB_TOL,
    Greedy,
    bf16_problems,
    closeness,
    from_outputs,
    identical,
    partings,
    sampling_params,
)

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
        **{"dtype": "bfloat16", **engine_backend(args.backend)},
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
    ap.add_argument("--reference", default="TRITON_ATTN:dtype=float32",
                    help="the fp32 run every bf16 backend is judged against ('' for none)")
    args = ap.parse_args()
    if args.backend:
        return run_one(args)
    from vllm_cascade.testing.tiny_model import write_random_checkpoint

    weights_dir = os.path.join(tempfile.gettempdir(), "vllm-cascade-random", os.path.basename(args.model.rstrip("/")))
    args.model = str(write_random_checkpoint(args.model, weights_dir))
    child = ["--model", args.model, "--tokens", str(args.tokens), "--workloads", args.workloads]
    labels = args.backends.split(",") + ([args.reference] if args.reference else [])
    found, stats = run_per_backend(__file__, child, labels, "check", args.log_dir)
    results = {backend: {name: [Greedy.from_dict(o) for o in runs] for name, runs in r["outputs"].items()}
               for backend, r in found.items()}
    for name, counters in stats.items():
        print(f"{name} worker stats: {stats_line(counters)}")
    stock = args.backends.split(",")[0]  # the stock bf16 run the others are held to, with the reference
    refs = [ref for ref in dict.fromkeys((stock, "FLASH_ATTN", "FLASHINFER", args.reference)) if ref in results]
    print(f"\n{'workload':<10} {'backend':<12} {'vs':<26} {'identical requests':>20} {'equal-prefix tokens':>20} "
          f"{'max |dlogprob|':>15} {'max gap where parted':>21}")
    for name in args.workloads.split(","):
        for ref in refs:
            for backend, runs in results.items():
                if backend != ref and backend != args.reference:
                    got, outs = closeness(results[ref][name], runs[name]), runs[name]
                    print(f"{name:<10} {backend:<12} {ref:<26} {identical(got, outs):>14}/{len(outs):<5} "
                          f"{sum(got.prefixes):>13}/{sum(len(o.ids) for o in outs):<6} {got.delta:>15.4f} "
                          f"{got.gap:>21.4f}")
    failed = False
    if args.reference in results and stock in results:
        print(f"\nbf16 rule (vllm_cascade.testing.greedy.bf16_problems): as accurate as {stock} against "
              f"{args.reference}")
        for name in args.workloads.split(","):
            ref, base = results[args.reference][name], results[stock][name]
            for backend, runs in results.items():
                if backend not in (stock, args.reference):
                    problems = bf16_problems(closeness(runs[name], ref), closeness(base, ref))
                    print(f"  {name:<10} {backend:<12} {'pass' if not problems else 'FAIL: ' + '; '.join(problems)}")
                    failed |= bool(problems)
    # Partings that may not be near-ties (2 x the rule's least tol apart or more, or a token outside
    # the other's top K), to look at by request.
    far = [(name, backend, ref, p) for name in args.workloads.split(",") for ref in refs
           for backend, runs in results.items() if backend not in (ref, args.reference)
           for p in partings(runs[name], results[ref][name]) if p.gap >= 2 * LOGPROB_TOL]
    for name, backend, ref, p in far:
        print(f"  parting: {name} request {p.prompt} token {p.position}: {backend} vs {ref}, "
              f"gap {p.gap:.4f} (at least {p.at_least:.4f})")
    sys.exit(1 if failed or len(results) < len(labels) else 0)


if __name__ == "__main__":
    main()
