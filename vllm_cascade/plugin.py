"""vLLM entry points (setup.py). Both run in every vLLM process and are idempotent.

- `register_early` (group `vllm.platform_plugins`) runs when vLLM first resolves
  its platform, before a spawned engine process unpickles its config, which
  names the CASCADE enum member. It returns None: it provides no platform.
- `register` (group `vllm.general_plugins`) runs before any model is built.
"""

from __future__ import annotations


def register_early() -> None:
    from vllm_cascade import vllm_compat

    vllm_compat.register_backend_name()
    return None


def register() -> None:
    from vllm_cascade import vllm_compat

    vllm_compat.register_backend_name()
    vllm_compat.make_cpu_platform_honour_selection()
