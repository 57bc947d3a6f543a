"""End-to-end decode throughput: CASCADE against stock FLASH_ATTN and FLASHINFER.

The workloads of shared/ANCHORS.md, each backend in its own process, one run:
every workload runs once to warm (compile, prefix cache) and once timed with
fresh tails; output tokens per second of the timed run. Qwen3 config with
`load_format="dummy"`, bf16, prefix caching on, greedy, `ignore_eos`.

    python benchmarks/throughput.py --model .models/qwen3-0.6b [--workloads shared,groups,single,nosharing]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

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
    raise ValueError(name)


def run_backend(args) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              attention_backend=args.backend, max_model_len=10240, enable_prefix_caching=True,
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
    json.dump(results, open(args.out, "w"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=".models/qwen3-0.6b")
    ap.add_argument("--workloads", default="shared,groups,single,nosharing")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--backend")
    ap.add_argument("--out")
    ap.add_argument("--log-dir", default=os.environ.get("OUT", tempfile.gettempdir()))
    args = ap.parse_args()
    if args.backend:
        return run_backend(args)
    stats_dir = tempfile.mkdtemp()
    table = {}
    for backend in args.backends.split(","):
        out = os.path.join(args.log_dir, f"tput-{backend}.json")
        with open(os.path.join(args.log_dir, f"tput-{backend}.log"), "w") as log:
            cmd = [sys.executable, __file__, "--model", args.model, "--workloads", args.workloads,
                   "--backend", backend, "--out", out]
            env = dict(os.environ, VLLM_CASCADE_STATS_DIR=stats_dir)
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
                print(f"{backend}: failed, see {log.name}")
                continue
        table[backend] = json.load(open(out))
    from vllm_cascade.stats import read_stats_dir

    print("cascade worker stats:", read_stats_dir(stats_dir))
    print(f"\n{'workload':<10} " + " ".join(f"{b:>11}" for b in table) + "   cascade/best-stock")
    for name in args.workloads.split(","):
        row = {b: table[b][name]["tok_per_s"] for b in table if name in table[b]}
        stock = max((v for b, v in row.items() if b != "CASCADE"), default=None)
        ratio = f"{row['CASCADE'] / stock:.2f}x" if stock and "CASCADE" in row else "-"
        print(f"{name:<10} " + " ".join(f"{row.get(b, float('nan')):>11.0f}" for b in table) + f"   {ratio:>8}")


if __name__ == "__main__":
    main()
