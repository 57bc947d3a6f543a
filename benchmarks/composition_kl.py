"""Independent composition vs full prefill: how far the next-token distributions move (issue 4 item 3).

CPU only, Hugging Face transformers' Qwen3, no vLLM. Per setting (2/3/4 chunks, several seeds):

- chunks of random token ids (lengths 48-200, fixed seed) + a tail (24 tokens);
- reference: full prefill of concat(chunks, tail), then N greedy tokens; the distribution of each
  of the N steps is kept (step 0 = after the prefill);
- independent composition: each chunk's KV computed ALONE at local positions 0..n-1, its keys
  re-rotated by +offset to its true place (RoPE composes, R(a)R(b) = R(a+b); HF stores keys after
  neox-style RoPE), the chunks concatenated into one DynamicCache, the tail run at the positions
  after them, then the reference's tokens teacher-forced so the N distributions compare step by step;
- the same for a shuffled chunk order against the full prefill of the shuffled text.

Metrics: KL(reference || composed) over the first step and over all N steps (mean, max over
seeds), top-1 agreement (first step; all steps), and a tail-only baseline (no chunks at all).
Asserted first: one chunk at offset 0 composes to the reference, and a chain (the reference's own
cache sliced per chunk, rotated to local positions and back) composes to the reference: max |logit
diff| < 1e-4 in fp32 (the model amplifies fp32 rounding) and < 1e-9 on a float64 copy.

The tiny model (vllm_cascade.testing.tiny_model) has RANDOM weights: the numbers say how much
independent chunks change this model's distributions, not a trained model's. `--model PATH` runs
the same on a real checkpoint (none is available here).

    python benchmarks/composition_kl.py [--model PATH] [--seeds 5] [--steps 16]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from vllm_cascade.testing.composition_ref import (
    KV,
    chunk_alone,
    compose,
    forward,
    layers_kv,
    rerotate,
    run_steps,
)


def reference(model, chunks: list[list[int]], tail: list[int], steps: int):
    """Full prefill + greedy decode. Returns (logits [N, vocab], tokens, prefix KV of the chunks)."""
    ids = [t for c in chunks for t in c] + tail
    cache = DynamicCache()
    last = forward(model, ids, cache, 0)[-1]
    n_pre = len(ids) - len(tail)
    prefix = [(k[:, :, :n_pre].clone(), v[:, :, :n_pre].clone()) for k, v in layers_kv(cache)]
    dists, toks = run_steps(model, cache, last, len(ids), steps, None)
    return dists, toks, prefix






def tail_only(model, tail: list[int], forced: list[int]) -> torch.Tensor:
    """Baseline: the tail with no chunks at all, teacher-forced on `forced`."""
    cache = DynamicCache()
    last = forward(model, tail, cache, 0)[-1]
    return run_steps(model, cache, last, len(tail), len(forced), forced)[0]


def to_local(model, prefix: KV, lengths: list[int]) -> list[KV]:
    """Slice a chain's KV (true positions) into chunks and rotate each back to positions 0..n-1."""
    out, off = [], 0
    for n in lengths:
        out.append([(rerotate(model, k[:, :, off:off + n], -off), v[:, :, off:off + n]) for k, v in prefix])
        off += n
    return out


def kl(ref: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    """KL(ref || comp) per step, from logits [N, vocab] (float64)."""
    ref, comp = torch.log_softmax(ref, -1), torch.log_softmax(comp, -1)
    return (ref.exp() * (ref - comp)).sum(-1)


def draw(g: torch.Generator, vocab: list[int], n: int) -> list[int]:
    return [vocab[i] for i in torch.randint(len(vocab), (n,), generator=g)]


def sanity(model, g: torch.Generator, vocab: list[int], steps: int, tol: float) -> None:
    one, tail = [draw(g, vocab, 100)], draw(g, vocab, 24)
    ref, toks, _ = reference(model, one, tail, steps)
    d1 = (compose(model, [chunk_alone(model, one[0])], tail, toks) - ref).abs().max().item()
    chunks = [draw(g, vocab, n) for n in (64, 150, 90)]
    ref, toks, prefix = reference(model, chunks, tail, steps)
    d2 = (compose(model, to_local(model, prefix, [len(c) for c in chunks]), tail, toks) - ref).abs().max().item()
    print(f"sanity ({model.dtype}): one chunk max|logit diff| {d1:.2e}; "
          f"chain re-composed max|logit diff| {d2:.2e} (< {tol:g})")
    assert d1 < tol and d2 < tol, (d1, d2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the tiny Qwen3)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16, help="N: generated tokens compared")
    ap.add_argument("--tail", type=int, default=24)
    ap.add_argument("--fp32-tol", type=float, default=1e-4, help="sanity bound on fp32 logit diffs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.model is None:
        from vllm_cascade.testing.tiny_model import build_tiny_qwen3
        args.model = str(build_tiny_qwen3())
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(min(len(tok), model.config.vocab_size)) if i not in special]
    rows = []
    with torch.no_grad():
        # fp32 noise is amplified by the model (logit std ~5, sharp attention): the fp64 copy shows
        # the plumbing exact, the fp32 run within --fp32-tol
        sanity(model, torch.Generator().manual_seed(99), vocab, args.steps, args.fp32_tol)
        sanity(copy.deepcopy(model).double(), torch.Generator().manual_seed(99), vocab, args.steps, 1e-9)
        for n_chunks in (2, 3, 4):
            res: dict[str, list] = {"in order": [], "shuffled": []}
            for seed in range(args.seeds):
                g = torch.Generator().manual_seed(1000 * n_chunks + seed)
                lens = torch.randint(48, 201, (n_chunks,), generator=g).tolist()
                chunks, tail = [draw(g, vocab, n) for n in lens], draw(g, vocab, args.tail)
                alone = [chunk_alone(model, c) for c in chunks]  # reused by both orders
                perm = torch.randperm(n_chunks, generator=g).tolist()
                while n_chunks > 1 and perm == sorted(perm):
                    perm = torch.randperm(n_chunks, generator=g).tolist()
                for name, order in (("in order", list(range(n_chunks))), ("shuffled", perm)):
                    ref, toks, _ = reference(model, [chunks[i] for i in order], tail, args.steps)
                    comp = compose(model, [alone[i] for i in order], tail, toks)
                    base = tail_only(model, tail, toks)
                    res[name].append((kl(ref, comp), ref.argmax(-1) == comp.argmax(-1), kl(ref, base),
                                      ref.argmax(-1) == base.argmax(-1)))
            for name, r in res.items():
                k = torch.stack([x[0] for x in r])  # [seeds, N]
                a = torch.stack([x[1] for x in r]).double()
                kb = torch.stack([x[2] for x in r])
                ab = torch.stack([x[3] for x in r]).double()
                rows.append((n_chunks, name, k[:, 0].mean(), k[:, 0].max(), k.mean(), k.max(),
                             a[:, 0].mean(), a.mean(), kb.mean(), ab.mean()))
    print(f"\nmodel {args.model}; {args.seeds} seeds per row; chunk lengths 48-200; tail {args.tail}; "
          f"N={args.steps} steps (teacher-forced on the reference's greedy tokens); KL in nats")
    print(f"{'chunks':>6} {'order':>9} | {'KL first mean':>13} {'max':>8} | {'KL N-step mean':>14} {'max':>8} |"
          f" {'top1 first':>10} {'top1 all':>8} | {'tail-only KL':>12} {'top1 all':>8}")
    for c, name, f_mean, f_max, s_mean, s_max, a0, a_all, b_kl, b_a in rows:
        print(f"{c:>6} {name:>9} | {f_mean:>13.4f} {f_max:>8.4f} | {s_mean:>14.4f} {s_max:>8.4f} |"
              f" {a0:>10.2f} {a_all:>8.2f} | {b_kl:>12.4f} {b_a:>8.2f}")
    print("top1: fraction of (seed, step) where composed argmax == reference argmax; tail-only: the "
          "same N-step KL mean / top1 with no chunks in the context (baseline)")
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
