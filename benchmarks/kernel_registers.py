"""Registers, spills and pipelined loads of the Triton kernels, compiled for sm_90 without a GPU.

Triton's wheel ships ptxas, so `triton.compile` with an explicit `GPUTarget` builds the cubin on
any machine; `cuobjdump --dump-resource-usage` then gives the registers per thread and the stack,
and the SASS gives the spill stores (`STL`) and the software-pipelined loads (`LDGSTS`, cp.async).
Each kernel is compiled as the JIT specializes a launch whose tensors are 16-byte aligned and whose
integers are multiples of 16; the sixth and tenth sessions' tables were compiled without that, which
leaves every load unvectorized and unpipelined, and their registers and spills do not hold
(RESULTS.md, twelfth session). A diagnostic for the dev machine: it uses no device time, and says
nothing about speed. The GPU machine's Triton may allocate differently.

    python benchmarks/kernel_registers.py [--arch 90] [--head-dim 128 --group 2 --page 16]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile


def resource_usage(fn, constexprs: dict, num_warps: int, num_stages: int | None, arch: int,
                   pointers: dict[str, str] | None = None) -> dict[str, int]:
    """Compile `fn` (a @triton.jit kernel; pointers: bf16 for Q/K/V/OUT, fp32 for the partials and
    the RoPE table, int32 otherwise, `pointers` overriding) -> {"registers", "stack", "spill_stores"}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    floats = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "OUT": "*bf16", "O_PART": "*fp32", "L_PART": "*fp32",
              "COS_SIN": "*fp32", "Q_COS_SIN": "*bf16", **(pointers or {})}  # the model's table: its dtype

    def arg_type(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name in floats:
            return floats[name]
        if name == "sm_scale_log2":
            return "fp32"
        return "i32" if name.startswith("stride") else "*i32"

    names = fn.arg_names
    signature = {n: arg_type(n) for n in names}
    # As the JIT specializes a launch: pointers 16-byte aligned and integers divisible by 16 carry that
    # fact. Without it no load can be vectorized, and Triton does not pipeline them (cp.async) at all.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if signature[n] not in ("constexpr", "fp32")}
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs=attrs)
    options = {"num_warps": num_warps, **({"num_stages": num_stages} if num_stages else {})}
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin.name],
                              capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
    return {"registers": int(found.group(1)), "stack": int(found.group(2)), "spill_stores": len(re.findall(r"\bSTL", sass)),
            "async_copies": len(re.findall(r"\bLDGSTS", sass))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--group", type=int, default=2, help="query heads per KV head")
    ap.add_argument("--page", type=int, default=16)
    args = ap.parse_args()

    from vllm_cascade.ops.triton_cascade import NARROW_M, Launch, _partials_kernel, default_launch

    # (tile rows, launch): settings kernel_bench sweeps; each specialization also gets the backend's own
    # wide and narrow launches (default_launch), marked "*".
    launches = [(64, Launch(num_warps=4)), (NARROW_M, Launch()), (64, Launch(num_warps=8, num_stages=2)),
                (NARROW_M, Launch(num_warps=8)), (128, Launch(num_warps=8)), (64, Launch(block_n=64, num_warps=8))]
    print(f"sm_{args.arch}, head dim {args.head_dim}, G {args.group}, page {args.page}")
    print(f"{'specialization':<15} {'rows':>5} {'keys':>5} {'warps':>6} {'stages':>7} {'registers':>10} {'stack':>6} "
          f"{'spill stores':>13} {'cp.async':>9}")
    def backend(chunks: bool) -> list[tuple[int, Launch]]:
        return [(64, default_launch(True, 64, chunks)), (NARROW_M, default_launch(False, 64, chunks))]

    # Q_ROPE (config query_rope="backend"): the backend's launches only.
    cases = [(chunks, False, rows, launch, mark) for chunks in (False, True)
             for (rows, launch), mark in [*((b, "*") for b in backend(chunks)), *((x, "") for x in launches)]]
    cases += [(chunks, True, rows, launch, "*") for chunks in (False, True) for rows, launch in backend(chunks)]
    for chunks, q_rope, rows, launch, mark in cases:
        constexprs = {"G": args.group, "PAGE": args.page, "HEAD_DIM": args.head_dim, "BLOCK_M": rows,
                      "BLOCK_N": launch.block_n, "ROT": args.head_dim, "CHUNKS": chunks, "Q_ROPE": q_rope,
                      "PDL": True}
        use = resource_usage(_partials_kernel, constexprs, launch.num_warps, launch.num_stages, args.arch)
        name = ("chunks" if chunks else "plain") + (" + q rope" if q_rope else "") + mark
        print(f"{name:<15} {rows:>5} {launch.block_n:>5} {launch.num_warps:>6} "
              f"{launch.num_stages or '-':>7} {use['registers']:>10} {use['stack']:>6} {use['spill_stores']:>13} "
              f"{use['async_copies']:>9}",
              flush=True)
    # The chunk_prefill_kernel="flashinfer" path's own kernels: the query gather-rotate and the merge of
    # FlashInfer's bf16 partials (as FlashInferCascade launches them).
    from vllm_cascade.ops.triton_cascade import _gather_rotate_kernel, _merge_kernel

    heads = args.group * 8
    for name, fn, constexprs, pointers in (
        ("gather-rotate", _gather_rotate_kernel, {"NUM_HEADS": heads, "HEADS_P2": heads, "HEAD_DIM": args.head_dim,
                                                   "ROT": args.head_dim}, None),
        ("merge (bf16)", _merge_kernel, {"HEAD_DIM": args.head_dim}, {"O_PART": "*bf16"}),
    ):
        use = resource_usage(fn, constexprs, 4, None, args.arch, pointers)
        print(f"{name:<15} {'-':>5} {'-':>5} {4:>6} {'-':>7} {use['registers']:>10} {use['stack']:>6} "
              f"{use['spill_stores']:>13} {use['async_copies']:>9}", flush=True)


if __name__ == "__main__":
    main()
