"""Who rotates the query (config `query_rope`), measured: bf16 against fp32, model vs backend (issue 5 item 3).

The fused Qwen3 class on CASCADE, three engines, one after the other, the same requests:

- fp32, `query_rope="model"`: the reference;
- bf16, `query_rope="model"`: the model rotates the query, a chunk level rotates it back by its shift;
- bf16, `query_rope="backend"`: the model hands the query before RoPE, each level rotates it once.

Requests (token ids drawn with a fixed seed; greedy, `ignore_eos`): a chain (chunk B registered in the
context of chunk A) + a tail, and A + tail (exact compositions); C, D in both orders + tails (chunks
composed independently, at shifted positions); plain prompts sharing a prefix (cascade levels, no
chunks). Printed per bf16 side: max and mean |logprob of the greedy token - fp32's| over each request's
common token prefix with fp32, and how many requests generate fp32's tokens throughout; and, at the
first generated token (the same input for every side), |delta logprob| over fp32's 20 most likely
tokens. The tiny model has random weights: its distributions are flat, so greedy tokens part early
and the first-token numbers are the ones to read.

    python benchmarks/rope_check.py [--model PATH] [--load-format auto|dummy] [--tokens 16]
    # CPU (tiny model): VLLM_CPU_KVCACHE_SPACE=2 python benchmarks/rope_check.py
"""

from __future__ import annotations

import argparse
import os
import random
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIDES = [("fp32, model", "float32", "model"), ("bf16, model", "bfloat16", "model"),
         ("bf16, backend", "bfloat16", "backend")]


def requests(vocab: int, seed: int = 0) -> tuple[dict[str, list[int]], list[dict], list[list[int]]]:
    """Chunk token ids, compositions (chunk names, tails) and plain prompts."""
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(n)]

    chunks = {"A": ids(120), "B": ids(90), "C": ids(150), "D": ids(70)}
    compositions = [{"chunks": ["A", "B"], "tail": ids(9)}, {"chunks": ["A"], "tail": ids(12)},
                    {"chunks": ["C", "D"], "tail": ids(10)}, {"chunks": ["D", "C"], "tail": ids(10)}]
    shared = ids(100)
    plain = [shared + ids(5 + 3 * i) for i in range(4)]
    return chunks, compositions, plain


TOP = 20  # first-token logprobs compared over the reference's most likely tokens


def run_side(model: str, dtype: str, query_rope: str, load_format: str, tokens: int) -> list[tuple[list, list, dict]]:
    """Greedy (token ids, logprob of each, {token: logprob} of the TOP most likely first tokens) for
    every composition, then every plain prompt."""
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    from vllm_cascade.chunks.store import ChunkStore

    vocab = AutoConfig.from_pretrained(model).vocab_size
    chunks, compositions, plain = requests(vocab)
    cascade = {"query_rope": query_rope, "min_saved_pages": 1, "min_saved_fraction": 0.0}
    llm = LLM(model=model, dtype=dtype, load_format=load_format, attention_backend="cascade", block_size=16,
              hf_overrides={"architectures": ["CascadeQwen3ForCausalLM"]}, additional_config={"cascade": cascade},
              max_model_len=1024, max_num_seqs=8, skip_tokenizer_init=True, seed=0, gpu_memory_utilization=0.3)
    store = ChunkStore(llm)
    a = store.register_chunk(token_ids=chunks["A"])
    named = {"A": a.chunk_id, "B": store.register_chunk(token_ids=chunks["B"], parent=a.chunk_id).chunk_id,
             "C": store.register_chunk(token_ids=chunks["C"]).chunk_id,
             "D": store.register_chunk(token_ids=chunks["D"]).chunk_id}
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, logprobs=TOP)
    outs = store.generate([{"chunks": [named[c] for c in comp["chunks"]], "tail": comp["tail"]}
                           for comp in compositions], params)
    outs += llm.generate([{"prompt_token_ids": p} for p in plain], params, use_tqdm=False)
    result = []
    for o in outs:
        ids = list(o.outputs[0].token_ids)
        steps = o.outputs[0].logprobs
        first = {t: entry.logprob for t, entry in steps[0].items()}
        result.append((ids, [step[t].logprob for t, step in zip(ids, steps)], first))
    return result


def compare(got: list, ref: list) -> tuple[float, float, int, float, float]:
    """-> (max, mean |delta logprob| of the greedy tokens over each request's common token prefix with
    ref, requests equal throughout, max, mean |delta logprob| of the first token over ref's TOP tokens)."""
    deltas, first, equal = [], [], 0
    for (ids, lp, top), (ref_ids, ref_lp, ref_top) in zip(got, ref):
        n = next((i for i, (x, y) in enumerate(zip(ids, ref_ids)) if x != y), len(ids))
        equal += n == len(ids)
        deltas += [abs(x - y) for x, y in zip(lp[:n], ref_lp[:n])]
        first += [abs(top[t] - v) for t, v in ref_top.items() if t in top]
    return max(deltas), statistics.mean(deltas), equal, max(first), statistics.mean(first)


def main() -> None:
    from vllm_cascade.testing.tiny_model import build_tiny_qwen3

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="Qwen3 folder (default: the tiny model, built here)")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    model = args.model or str(build_tiny_qwen3())
    runs = {name: run_side(model, dtype, rope, args.load_format, args.tokens) for name, dtype, rope in SIDES}
    ref = runs["fp32, model"]
    groups = {"compositions (chain, A, C+D, D+C)": slice(0, 4), "plain prompts sharing a prefix": slice(4, 8)}
    print(f"\n{model}: {args.tokens} greedy tokens; |delta logprob| against fp32: greedy tokens over the common "
          f"prefix, and the first token's top {TOP}")
    print(f"{'requests':<36} {'side':<14} {'max':>8} {'mean':>8}  {'same tokens':<12} {'first max':>9} {'first mean':>10}")

    def row(label: str, name: str, got: list, want: list) -> None:
        worst, mean, equal, first_worst, first_mean = compare(got, want)
        print(f"{label:<36} {name:<14} {worst:8.4f} {mean:8.4f}  {f'{equal}/{len(want)}':<12} "
              f"{first_worst:9.4f} {first_mean:10.4f}")

    for label, rows in groups.items():
        for name in ("bf16, model", "bf16, backend"):
            row(label, name, runs[name][rows], ref[rows])
    row("all: bf16 backend against bf16 model", "", runs["bf16, backend"], runs["bf16, model"])


if __name__ == "__main__":
    main()
