"""Run one benchmark script once per attention backend, each in its own process.

A GPU engine holds most of the GPU's memory until its process exits, so every
backend gets a fresh process: `script ... --backend B --out FILE`. The child
writes its result as JSON to FILE and its log next to it; CASCADE's workers
write their counters to a shared stats directory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from vllm_cascade.stats import STATS_DIR_ENV, read_stats_dir, summarize


def backend_arguments(description: str, backends: list[str]) -> argparse.ArgumentParser:
    """The options every per-backend script takes (`--backend` and `--out` are the child's)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default=".models/qwen3-0.6b", help="folder with a Qwen3 config.json")
    ap.add_argument("--backends", default=",".join(backends))
    ap.add_argument("--log-dir", default=os.environ.get("OUT", tempfile.gettempdir()))
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap


FUSED_MODEL = {"hf_overrides": {"architectures": ["CascadeQwen3ForCausalLM"]}}


def engine_backend(label: str) -> dict:
    """LLM kwargs for a backend label: a vLLM backend name, or NAME:<settings>, settings joined
    by '+', each `name=value` or a bare gpu_kernel (CASCADE:flashinfer, CASCADE:chunk_prefill_kernel=triton).
    `model=fused` selects the fused Qwen3 class (any backend) and `dtype=float32` the engine's dtype
    (gpu_check's reference: TRITON_ATTN:dtype=float32); the other settings are CASCADE's."""
    name, _, suffix = label.partition(":")
    settings = dict(part.partition("=")[::2] if "=" in part else ("gpu_kernel", part)
                    for part in suffix.split("+") if part)
    model, dtype = settings.pop("model", "stock"), settings.pop("dtype", None)
    if model not in ("stock", "fused"):
        raise ValueError(f"{label}: model={model}, expected stock or fused")
    extra = {"additional_config": {"cascade": settings}} if settings else {}
    if dtype:
        extra["dtype"] = dtype
    return {"attention_backend": name, **extra, **(FUSED_MODEL if model == "fused" else {})}


def run_script(cmd: list[str], tag: str, label: str, env: dict | None = None) -> dict | None:
    """Run `cmd` (a script writing its JSON result to `tag`.json), logging to `tag`.log;
    -> the result, None if it failed (said on stdout with the log's name)."""
    with open(f"{tag}.log", "w") as log:
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    print(f"  {label}: {'ok' if rc == 0 else f'FAILED (exit {rc}), see {log.name}'} ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    if rc:
        return None
    with open(f"{tag}.json") as f:
        return json.load(f)


def backend_path(log_dir: str, tag: str, backend: str) -> str:
    """Where a backend's child writes: this + ".log" and ".json" (labels hold ':' and '=')."""
    return os.path.join(log_dir, f"{tag}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', backend)}")


PASS_MARK = "[pass] "  # a child's line before each pass of its engine (jit_by_pass)


def jit_by_pass(log_path: str) -> dict[str, list[str]]:
    """Kernels vLLM's JIT monitor saw compiled while serving ("JIT compilation during inference"), by
    the pass they fell in, from a child's log (the child prints PASS_MARK + its pass before each;
    the engine core logs to the same file). A compile in a timed pass is in its TTFT."""
    passes: dict[str, list[str]] = {"start": []}
    current = "start"
    with open(log_path, errors="replace") as log:
        for line in log:
            if line.startswith(PASS_MARK):
                current = line[len(PASS_MARK) :].strip()
                passes.setdefault(current, [])
            elif (m := re.search(r"JIT compilation during inference: ([A-Za-z0-9_]+)", line)):
                passes[current].append(m.group(1))
    return passes


def run_per_backend(script: str, child_args: list[str], backends: list[str], tag: str, log_dir: str
                    ) -> tuple[dict[str, object], dict[str, dict]]:
    """-> ({backend: the child's JSON result}, {backend: its summed CASCADE worker stats}).

    Failed backends are left out. Workers write their counters once a second (the default), so
    the measured steps do not pay for a file write each.
    """
    results, stats = {}, {}
    for backend in backends:
        path = backend_path(log_dir, tag, backend)
        stats_dir = tempfile.mkdtemp()
        cmd = [sys.executable, script, *child_args, "--backend", backend, "--out", path + ".json"]
        result = run_script(cmd, path, backend, env=dict(os.environ, **{STATS_DIR_ENV: stats_dir}))
        if result is None:
            continue
        results[backend] = result
        if backend.startswith("CASCADE"):
            stats[backend] = summarize(read_stats_dir(stats_dir))
    return results, stats


def stats_line(stats: dict) -> str:
    """The counters that say which path ran and what it saved."""
    flat = stats.get("kv_bytes_flat") or 1
    return (f"steps {stats.get('steps')} (cascade {stats.get('cascade_steps')}), levels {stats.get('levels')}, "
            f"paths {stats.get('paths')}, block tables {stats.get('block_table_reads')}, "
            f"KV read {stats.get('kv_bytes_read', 0) / flat:.3f} of flat, "
            f"decode plans reused {stats.get('plans_reused')}, work lists advanced {stats.get('worklists_advanced')}, "
            f"host build {stats.get('build_ns', 0) / 1e3 / max(stats.get('steps') or 1, 1):.0f} us/step ("
            + ", ".join(f"{kind} {ns / 1e3 / max(stats.get('steps_by_kind', {}).get(kind, 1), 1):.0f}"
                        for kind, ns in sorted(stats.get("build_ns_by_kind", {}).items())) + ")")
