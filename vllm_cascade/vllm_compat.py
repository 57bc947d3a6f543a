"""Every vLLM internal the plugin touches, in one place (vLLM 0.32.0).

Porting to another vLLM version starts and, ideally, ends here. What is used:

- `vllm.v1.attention.backends.registry.register_backend`: adds the CASCADE
  member to `AttentionBackendEnum`, which `--attention-backend` parses.
- `vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls`: ignores any
  selection but its own; wrapped so that CASCADE is honoured (and validated).
- `vllm.ModelRegistry.register_model`: adds CascadeQwen3ForCausalLM, and with
  CASCADE_FUSED_QWEN3=1 serves every Qwen3ForCausalLM checkpoint with it.
  The class itself (models/qwen3.py) subclasses vLLM's Qwen3 modules.
- `Platform.check_and_update_config` of the current platform: wrapped so that
  a CASCADE run's settings are checked in the front process, before any
  engine process starts (otherwise errors surface late, in a worker's log).

The attention backend itself (attention/backend.py) implements vLLM's public
backend interface (`vllm.v1.attention.backend`) and reads the KV cache as
`[pages, H, N, 2*D]` (`KVCacheLayout.LBHNC`). Imports here stay inside the
functions: the platform hook runs while vLLM is still resolving its platform.
"""

from __future__ import annotations

from typing import Any

from vllm_cascade import BACKEND_NAME

BACKEND_CLASS_PATH = "vllm_cascade.attention.backend.CascadeBackend"


def register_backend_name() -> None:
    """Add CASCADE to vLLM's backend enum (idempotent, no CUDA, cheap import)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, BACKEND_CLASS_PATH)


def make_cpu_platform_honour_selection() -> None:
    """CpuPlatform picks CPU_ATTN whatever the user selected; make it listen to CASCADE."""
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.get_attn_backend_cls
    if getattr(original, "_cascade_wrapped", False):
        return

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend is not None and selected_backend.name == BACKEND_NAME:
            from vllm.logger import init_logger

            init_logger(__name__).info_once("Using %s attention backend (vllm-cascade).", BACKEND_NAME)
            return validated_backend_path(selected_backend, attn_selector_config, None)
        return original.__func__(cls, selected_backend, attn_selector_config, num_heads)

    get_attn_backend_cls._cascade_wrapped = True  # type: ignore[attr-defined]
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)  # type: ignore[method-assign]


def validated_backend_path(selected_backend: Any, attn_selector_config: Any, device_capability: Any) -> str:
    """The class path of CASCADE, or vLLM's usual error naming what does not fit."""
    backend_class = selected_backend.get_class()
    reasons = backend_class.validate_configuration(
        device_capability=device_capability, **attn_selector_config._asdict()
    )
    if reasons:
        raise ValueError(
            f"Selected backend {selected_backend} is not valid for this configuration. Reason: {reasons}"
        )
    return selected_backend.get_path()


def check_cascade_settings_at_config_time() -> None:
    """Validate CASCADE runs when vLLM builds its config (front process)."""
    from vllm.platforms import current_platform

    from vllm_cascade.config import CascadeConfig

    platform_cls = type(current_platform)
    original = platform_cls.check_and_update_config
    if getattr(original, "_cascade_wrapped", False):
        return

    def check_and_update_config(cls, vllm_config):
        original.__func__(cls, vllm_config)
        backend = vllm_config.attention_config.backend
        if backend is not None and backend.name == BACKEND_NAME:
            CascadeConfig.validate(vllm_config)

    check_and_update_config._cascade_wrapped = True  # type: ignore[attr-defined]
    platform_cls.check_and_update_config = classmethod(check_and_update_config)  # type: ignore[method-assign]


def register_models() -> None:
    """Lazy registrations (a class path, nothing imported now); idempotent."""
    import os

    from vllm import ModelRegistry

    path = "vllm_cascade.models.qwen3:CascadeQwen3ForCausalLM"
    archs = ["CascadeQwen3ForCausalLM"]
    if os.environ.get("CASCADE_FUSED_QWEN3", "0").lower() in ("1", "true", "yes", "on"):
        archs.append("Qwen3ForCausalLM")  # replaces vLLM's own class for every Qwen3 checkpoint
    for arch in archs:
        ModelRegistry.register_model(arch, path)
