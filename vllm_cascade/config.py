"""Plugin settings: `additional_config={"cascade": {...}}`, else environment.

    vllm serve MODEL --attention-backend cascade \\
        --additional-config '{"cascade": {"max_cascade_levels": 2}}'

Environment variables (`CASCADE_<NAME>` in upper case) fill in what the
vLLM config leaves out, so worker processes and `vllm serve` see one value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

SUPPORTED_HEAD_SIZES = [64, 128, 256]  # what the FlashInfer path is built for; the CPU path keeps parity


@dataclass(frozen=True)
class CascadeConfig:
    enable_cascade: bool = True  # False: the backend always attends flat
    max_cascade_levels: int = 3  # shared levels + the own level
    min_saved_pages: int = 64  # a shared segment must save this many page reads
    min_saved_fraction: float = 0.1  # else the whole step runs flat
    # "triton": decode steps run the fused Triton kernels (FULL CUDA graphs), steps with prefill run
    # FlashInfer's prefill kernels; "flashinfer": every step runs FlashInfer (own level + shared segments).
    gpu_kernel: str = "triton"
    # GPU steps with prefill that read chunk pages: "flashinfer" (segments cut at chunk boundaries, each
    # row's query rotated once per segment, FlashInfer's prefill kernel; 3.9x faster than "triton" per
    # layer on the H100, benchmarks/RESULTS.md) or "triton" (the fused kernel, which shifts keys and
    # masks pads per page; also where FlashInfer's split does not fit a step).
    chunk_prefill_kernel: str = "flashinfer"
    # Who rotates the query: "model" (every model; RoPE applied before attention) or "backend" (the fused
    # Qwen3 class hands the query before RoPE, models/qwen3.py; each level's query is then rotated once,
    # at its position plus the level's shift, instead of rotated back from the model's rotation).
    query_rope: str = "model"
    chunk_persistence_dir: str = ""  # chunks' KV saved here, reloaded by the next engine without prefill ("": off)
    # The chunk registry: chunks may pin this share of the KV pages, at most max_chunks of them; when
    # either is full a registration evicts least recently used chunks no request holds (else: 413).
    chunk_page_ratio: float = 0.5
    max_chunks: int = 1000
    chunk_evict_lru: bool = True

    @classmethod
    def from_vllm(cls, vllm_config: Any) -> "CascadeConfig":
        extra = getattr(vllm_config, "additional_config", None) or {}
        given = extra.get("cascade", {}) if isinstance(extra, dict) else {}
        unknown = set(given) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown cascade settings {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = given.get(f.name, os.environ.get(f"CASCADE_{f.name.upper()}"))
            if raw is not None:
                values[f.name] = parse_setting(raw, type(f.default))
        config = cls(**values)
        if config.max_cascade_levels < 1:
            raise ValueError("max_cascade_levels must be >= 1")
        if config.gpu_kernel not in ("flashinfer", "triton"):
            raise ValueError(f"gpu_kernel must be 'flashinfer' or 'triton', not {config.gpu_kernel!r}")
        if config.chunk_prefill_kernel not in ("flashinfer", "triton"):
            raise ValueError(f"chunk_prefill_kernel must be 'flashinfer' or 'triton', not {config.chunk_prefill_kernel!r}")
        if config.query_rope not in ("model", "backend"):
            raise ValueError(f"query_rope must be 'model' or 'backend', not {config.query_rope!r}")
        if not 0.0 < config.chunk_page_ratio <= 1.0:
            raise ValueError(f"chunk_page_ratio must be in (0, 1], not {config.chunk_page_ratio}")
        if config.max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, not {config.max_chunks}")
        return config

    @classmethod
    def validate(cls, vllm_config: Any) -> "CascadeConfig":
        """Everything about a CASCADE run that can be checked before any process starts."""
        model_config = getattr(vllm_config, "model_config", None)
        if model_config is not None:
            head_size = model_config.get_head_size()
            if head_size not in SUPPORTED_HEAD_SIZES:
                raise ValueError(
                    f"Selected backend CASCADE is not valid for this configuration: head_size not supported "
                    f"(the model's head size is {head_size}; CASCADE supports {SUPPORTED_HEAD_SIZES})."
                )
        return cls.from_vllm(vllm_config)


def parse_setting(raw: Any, kind: type) -> Any:
    """A setting from JSON or the environment; booleans accept 1/true/yes/on."""
    if kind is bool and isinstance(raw, str):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return kind(raw)
