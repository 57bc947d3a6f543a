"""Plugin settings: `additional_config={"cascade": {...}}`, else environment.

    vllm serve MODEL --attention-backend cascade \\
        --additional-config '{"cascade": {"max_cascade_levels": 2}}'

Environment variables (`VLLM_CASCADE_<NAME>` in upper case) fill in what the
vLLM config leaves out, so worker processes and `vllm serve` see one value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class CascadeConfig:
    enable_cascade: bool = True  # False: the backend always attends flat
    max_cascade_levels: int = 3  # shared levels + the own level
    min_saved_pages: int = 64  # a shared segment must save this many page reads
    min_saved_fraction: float = 0.1  # else the whole step runs flat

    @classmethod
    def from_vllm(cls, vllm_config: Any) -> "CascadeConfig":
        extra = getattr(vllm_config, "additional_config", None) or {}
        given = extra.get("cascade", {}) if isinstance(extra, dict) else {}
        unknown = set(given) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown cascade settings {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = given.get(f.name, os.environ.get(f"VLLM_CASCADE_{f.name.upper()}"))
            if raw is not None:
                values[f.name] = _parse(raw, type(f.default))
        config = cls(**values)
        if config.max_cascade_levels < 1:
            raise ValueError("max_cascade_levels must be >= 1")
        return config


def _parse(raw: Any, kind: type) -> Any:
    if kind is bool and isinstance(raw, str):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return kind(raw)
