"""Fused Qwen3 class against stock Qwen3: greedy logprobs in bf16, both measured against fp32 (issue #5).

Per model config, a checkpoint with seeded random weights
(vllm_cascade.testing.tiny_model.write_random_checkpoint; vLLM's dummy weights
give uniform logits) whose norm weights are then drawn from U(0.5, 1.5), as in
tests/test_fused_qwen3.py, so that folding them into the projections is not a
multiplication by ones (`--unit-norms` keeps gpu_check.py's checkpoint). Three
engines, each in its own process, with vLLM's defaults (torch.compile, CUDA
graphs): stock Qwen3 in bf16, the fused class (`CascadeQwen3ForCausalLM`) in
bf16, and stock Qwen3 in fp32 as the reference.
Token-id prompts of lengths 3 to 1500 tokens, greedy, `ignore_eos`, 32 new
tokens with logprobs, at batch 1 (4 prompts, each alone) and batch 16 (16
prompts submitted together).

Prints last, per model and batch: the max |Δlogprob| of the greedy tokens over
each request's common token prefix for fused vs stock bf16, fused vs fp32 and
stock bf16 vs fp32; where fused parts from fp32, how far apart the two tokens
are; the shortest common prefix and the requests with identical tokens (fused
vs stock, stock vs fp32); pass or FAIL by the GPU tests' bf16 rule
(vllm_cascade.testing.greedy.bf16_problems): fused-fp32 <= stock-fp32 + 0.1,
parting from fp32 only at near-ties. Fused vs stock bf16 is shown, not judged:
two bf16 runs' errors add up (and the fused class rounds elsewhere than stock:
fp32 epilogues, folded norm weights).
The prefixes are shown, not judged: a deep random network has near-ties that
bf16 rounding flips for two correct runs too. Before the table, the script
checks through `LLM.apply_model` that the fused run built the fused class with
every layer on its fused paths (Triton epilogues and residual-in-GEMM on CUDA)
and that the stock runs did not. Exits 1 on any failure.

FLASH_ATTN has no fp32, so the reference runs on `--ref-backend` (TRITON_ATTN).
Depth: a config with hidden_size >= 4096 (Qwen3-8B) is cut to 8 layers unless
`--layers` says otherwise (its full width: every GEMM, the 152k vocab and the
untied head keep their shapes; 36 layers would mean a 16 GB checkpoint and
three long compiles); smaller configs run at full depth. Checkpoints are cached
under $TMPDIR/vllm-cascade-random/; logs and per-run JSON go to `--log-dir`
as model-check-<checkpoint>-<run>.{log,json}.

    python benchmarks/model_check.py [--model .models/qwen3-0.6b,.models/qwen3-8b] [--layers N]
        [--backend FLASH_ATTN] [--ref-backend TRITON_ATTN] [--batches 1,16] [--tokens 32] [--log-dir DIR]

On the CPU, to prove that the script works (CPU_ATTN, everything fp32, so the
deltas are ~0; without `--enforce-eager` it compiles too, in twice the time):

    python benchmarks/model_check.py --model "$(python -m vllm_cascade.testing.tiny_model)" --dtype float32 \\
        --backend CPU_ATTN --ref-backend CPU_ATTN --enforce-eager
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import sys
import tempfile
import time

from harness import run_script
from model_bench import DEFAULT_MODELS, FUSED, VARIANTS, VOCAB_LOW

from vllm_cascade.testing.greedy import (
    LOGPROB_TOL,
    Greedy,
    bf16_problems,
    closeness,
    identical,
)

WIDE_HIDDEN, WIDE_LAYERS = 4096, 8  # default depth of configs at least this wide
MAX_PROMPT = 1500
SINGLE_PROMPTS = 4  # prompts run one at a time for batch 1
ARCHITECTURE = FUSED["hf_overrides"]["architectures"][0]


def runs(args) -> dict[str, tuple[str, str, str]]:
    """name -> (model_bench variant, dtype, attention backend)."""
    return {"stock": ("stock", args.dtype, args.backend), "fused": ("fused", args.dtype, args.backend),
            "stock-fp32": ("stock", "float32", args.ref_backend)}


# ----------------------------------------------------------------------------- checkpoint


def with_random_norms(src: pathlib.Path) -> pathlib.Path:
    """A copy of `src` with every norm weight drawn from U(0.5, 1.5), seed 0 (the random init's are ones)."""
    import torch
    from safetensors.torch import load_file, save_file

    from vllm_cascade.testing.tiny_model import MARKER

    out = src.with_name(src.name + "-norms")
    digest = (src / MARKER).read_text().strip() + "+norms"
    if (out / MARKER).is_file() and (out / MARKER).read_text().strip() == digest:
        return out
    out.mkdir(exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    weights, gen = load_file(str(src / "model.safetensors")), torch.Generator().manual_seed(0)
    for name, w in weights.items():
        if name.endswith("norm.weight"):
            weights[name] = (torch.rand(w.shape, generator=gen) + 0.5).to(w.dtype)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "config.json", out / "config.json")
    (out / MARKER).write_text(digest + "\n")
    return out


def checkpoint(config_dir: str, layers: int | None, unit_norms: bool) -> pathlib.Path:
    """The random checkpoint for a config folder, `layers` deep (None: the default depth)."""
    from vllm_cascade.testing.tiny_model import write_random_checkpoint

    with open(os.path.join(config_dir, "config.json")) as f:
        config = json.load(f)
    if layers is None and config["hidden_size"] >= WIDE_HIDDEN:
        layers = WIDE_LAYERS
    name = os.path.basename(os.path.normpath(config_dir))
    if layers is not None and layers != config["num_hidden_layers"]:
        name += f"-{layers}layers"
    else:
        layers = None  # full depth: the same folder as gpu_check.py's
    t0 = time.perf_counter()
    path = write_random_checkpoint(config_dir, os.path.join(tempfile.gettempdir(), "vllm-cascade-random", name),
                                   num_hidden_layers=layers)
    path = path if unit_norms else with_random_norms(path)
    print(f"{config_dir}: checkpoint {path} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return path


# ----------------------------------------------------------------------------- child: one engine


def prompts(batch: int, vocab: int) -> list[list[int]]:
    """`batch` prompts (4 for batch 1, run one at a time), lengths spread geometrically from 3 to MAX_PROMPT."""
    n = SINGLE_PROMPTS if batch == 1 else batch
    rng = random.Random(f"batch-{batch}")  # another batch size, other prompts: no prefix-cache hits across
    lengths = [round(3 * (MAX_PROMPT / 3) ** (i / max(n - 1, 1))) for i in range(n)]
    return [[rng.randrange(VOCAB_LOW, vocab) for _ in range(length)] for length in lengths]


def run_child(args) -> None:
    from vllm import LLM
    from vllm.platforms import current_platform

    from vllm_cascade.models.qwen3 import fused_paths_of
    from vllm_cascade.testing.greedy import from_outputs, sampling_params

    llm = LLM(model=args.model, skip_tokenizer_init=True, dtype=args.dtype, attention_backend=args.backend,
              max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
              enforce_eager=args.enforce_eager, seed=0, **VARIANTS[args.child])
    params = sampling_params(args.tokens)
    vocab = llm.llm_engine.model_config.hf_config.vocab_size
    result = {"paths": llm.apply_model(fused_paths_of)[0], "cuda": current_platform.is_cuda(), "batches": {}}
    for batch in map(int, args.batches.split(",")):
        ps = prompts(batch, vocab)
        groups = [[p] for p in ps] if batch == 1 else [ps]  # batch 1: each prompt alone
        outs = [o for g in groups for o in llm.generate([{"prompt_token_ids": p} for p in g], params, use_tqdm=False)]
        result["batches"][batch] = [g._asdict() for g in from_outputs(outs)]
    with open(args.out, "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------- parent


def spawn(args, model: pathlib.Path, name: str, spec: tuple[str, str, str]) -> dict | None:
    """Run this script as a child for one engine; -> its JSON result, None if it failed."""
    variant, dtype, backend = spec
    tag = os.path.join(args.log_dir, f"model-check-{model.name}-{name}")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--model", str(model), "--out", tag + ".json",
           "--dtype", dtype, "--backend", backend, "--batches", args.batches, "--tokens", str(args.tokens),
           "--max-model-len", str(args.max_model_len), "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    cmd += ["--enforce-eager"] if args.enforce_eager else []
    env = dict(os.environ, VLLM_ALLOW_INSECURE_SERIALIZATION="1")  # apply_model sends a function to the worker
    return run_script(cmd, tag, f"{name} ({dtype}, {backend})", env)


def paths_problem(name: str, result: dict, layers: int) -> str | None:
    """None if the run built what it should: the fused class on every fused path, or vLLM's own Qwen3."""
    paths = result["paths"]
    if name != "fused":
        return None if paths == {"class": "Qwen3ForCausalLM"} else f"{name} did not run stock Qwen3: {paths}"
    kernels = layers if result["cuda"] else 0  # the CPU runs the torch references, adds after the GEMMs
    want = {"class": ARCHITECTURE, "layers": layers, "qk_kernel": kernels, "silu_kernel": kernels,
            "residual_in_gemm": kernels, "norms_folded": layers}
    got = {k: paths.get(k) for k in want}
    return None if got == want else f"fused class not on its fused paths: got {paths}, want {want}"


def row(batch: str, results: dict[str, dict]) -> tuple[str, bool]:
    """A table line for one batch size (after the model column), and whether it passes."""
    outs = {name: [Greedy.from_dict(run) for run in r["batches"][batch]] for name, r in results.items()}
    fused_stock, fused_ref = closeness(outs["fused"], outs["stock"]), closeness(outs["fused"], outs["stock-fp32"])
    stock_ref = closeness(outs["stock"], outs["stock-fp32"])
    ok = not bf16_problems(fused_ref, stock_ref)
    n = len(outs["fused"])
    same, ref_same = identical(fused_stock, outs["fused"]), identical(stock_ref, outs["stock"])
    return (f"{batch:>5} {fused_stock.delta:>12.4f} {fused_ref.delta:>11.4f} {stock_ref.delta:>11.4f} "
            f"{fused_ref.gap:>9.4f} {min(fused_stock.prefixes):>8} {min(stock_ref.prefixes):>8} "
            f"{f'{same}/{n}':>8} {f'{ref_same}/{n}':>8}  {'pass' if ok else 'FAIL'}"), ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    present = [m for m in DEFAULT_MODELS if os.path.isdir(m)]
    ap.add_argument("--model", default=",".join(present), help="comma-separated folders with a Qwen3 config.json")
    ap.add_argument("--layers", type=int, help=f"layers of every checkpoint (default: the config's; "
                                               f"{WIDE_LAYERS} for hidden_size >= {WIDE_HIDDEN})")
    ap.add_argument("--unit-norms", action="store_true", help="keep the random init's norm weights (all ones)")
    ap.add_argument("--backend", default="FLASH_ATTN", help="attention backend of the stock and fused runs")
    ap.add_argument("--ref-backend", default="TRITON_ATTN", help="attention backend of the fp32 reference")
    ap.add_argument("--dtype", default="bfloat16", help="dtype of the stock and fused runs (float32: CPU smoke test)")
    ap.add_argument("--batches", default="1,16", help="batch sizes; 1 runs 4 prompts one at a time")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    ap.add_argument("--enforce-eager", action="store_true", help="no torch.compile and CUDA graphs (CPU smoke test)")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    ap.add_argument("--log-dir", default=os.environ.get("OUT") or tempfile.gettempdir())
    ap.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_child(args)
    models = [m for m in args.model.split(",") if m]
    if not models:
        ap.error(f"no model folder given or found ({DEFAULT_MODELS})")
    os.makedirs(args.log_dir, exist_ok=True)
    print(f"{args.dtype} on {args.backend}, reference float32 on {args.ref_backend}, logs in {args.log_dir}",
          flush=True)
    lines, problems, ok = [], [], True
    for model in models:
        path = checkpoint(model, args.layers, args.unit_norms)
        with open(path / "config.json") as f:
            layers = json.load(f)["num_hidden_layers"]
        results = {name: spawn(args, path, name, spec) for name, spec in runs(args).items()}
        if None in results.values():
            problems.append(f"{path.name}: a run failed, see the logs")
            continue
        problems += [p for name, r in results.items() if (p := paths_problem(name, r, layers))]
        print(f"  fused paths: {results['fused']['paths']}", flush=True)
        for batch in results["fused"]["batches"]:
            line, passed = row(batch, results)
            lines.append((f"{os.path.basename(os.path.normpath(model))}, {layers} layers", line))
            ok &= passed
    for problem in problems:
        print(problem)
    width = max([len(label) for label, _ in lines] + [5])
    print(f"\nmax |Δlogprob| of the greedy tokens over each request's common prefix; {args.tokens} new tokens; "
          f"pass: fused-fp32 <= stock-fp32 + {LOGPROB_TOL}, gap f-fp32 <= 2 max({LOGPROB_TOL}, stock-fp32)")
    print(f"{'model':<{width}} {'batch':>5} {'fused-stock':>12} {'fused-fp32':>11} {'stock-fp32':>11} "
          f"{'gap':>9} {'prefix':>8} {'prefix':>8} {'same':>8} {'same':>8}")
    print(f"{'':<{width}} {'':>5} {'':>12} {'':>11} {'':>11} {'f-fp32':>9} {'f-s min':>8} {'s-fp32':>8} "
          f"{'f-s':>8} {'s-fp32':>8}")
    for label, line in lines:
        print(f"{label:<{width}} {line}")
    passed = ok and not problems and bool(lines)
    print("\nPASS: the fused class ran on its fused paths, every row within the tolerance" if passed else
          "\nFAIL: see the rows and messages above")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
