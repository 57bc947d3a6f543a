"""vLLM entry points (setup.py). Both run in every vLLM process and are idempotent.

- `register_early` (group `vllm.platform_plugins`) runs when vLLM first resolves
  its platform, before a spawned engine process unpickles its config, which
  names the CASCADE enum member. It returns None: it provides no platform.
- `register` (group `vllm.general_plugins`) runs before any model is built:
  CPU backend selection, config-time checks, model classes, chunk-page utilities of
  the engine core, this run's stats directory
  (inherited by the processes vLLM spawns later) and the /metrics collector.

With CASCADE_DUMP_STACKS_S=N set, every vLLM process that loads the plugin
writes all its threads' stacks to stderr every N seconds: a diagnostic for an
engine that hangs in a process other than the caller's.
"""

from __future__ import annotations

import faulthandler
import os
import sys


def register_early() -> None:
    from vllm_cascade import vllm_compat

    vllm_compat.register_backend_name()


def register() -> None:
    from vllm_cascade import metrics, stats, vllm_compat

    vllm_compat.register_backend_name()
    vllm_compat.make_cpu_platform_honour_selection()
    vllm_compat.check_cascade_settings_at_config_time()
    vllm_compat.register_models()
    vllm_compat.mirror_block_tables()
    vllm_compat.install_composed_hashing()
    vllm_compat.install_chunk_pins()
    vllm_compat.install_pinned_lookup()
    stats.ensure_stats_dir()
    metrics.register_collector()
    _dump_stacks_periodically()


def _dump_stacks_periodically() -> None:
    every = os.environ.get("CASCADE_DUMP_STACKS_S")
    if every:  # a second call replaces the first timer
        faulthandler.dump_traceback_later(float(every), repeat=True, file=sys.stderr)
