"""Shared fixtures for the end-to-end tests: the tiny model, engines, stats.

Every vLLM engine costs ~30-45 s to start on 2 CPU cores, so the engines here
are session-scoped and shared by all tests that ask for them; they are shut
down when the session ends.

The CPU platform would silently serve another backend if our plugin's hook
did not run, so every test that uses the CASCADE backend checks the counters
that the backend writes from inside the worker process (`assert_plugin_ran`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import pathlib
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest

# Before vLLM is imported anywhere: no hub, and the CPU KV cache needs a size.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Workers write their counters after every step, so tests read them at once.
os.environ.setdefault("CASCADE_STATS_INTERVAL_S", "0")
# Engine processes start fresh, never forked from pytest: on the GPU vLLM forks unless CUDA is
# initialized, and a child forked after torch's CPU thread pool ran here (test checkpoints are
# written with torch) can hang at 0% CPU. The likely cause of GPU engine tests that hung when run
# alone (RESULTS.md, tenth and eleventh sessions). The CPU platform always spawns.
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

STATS_ENV = "CASCADE_STATS_DIR"

# Any shared page makes a step cascade (the defaults want 64 saved pages).
AGGRESSIVE_CASCADE = {"cascade": {"min_saved_pages": 1, "min_saved_fraction": 0.0}}

# One scheduling for the cascade engine and the reference: chunked prefill with
# a small token budget, so long prompts are split over several steps and
# prefill chunks share steps with decodes.
SCHEDULING: dict[str, Any] = {
    "dtype": "float32",
    "max_model_len": 1024,
    "enable_chunked_prefill": True,
    "max_num_batched_tokens": 64,
    "max_num_seqs": 16,
    "enable_prefix_caching": True,
    "enforce_eager": True,
    "seed": 0,
}


def pytest_configure(config):
    # Raised by torch inside vLLM's imports; nothing the tests can act on.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@contextlib.contextmanager
def stats_env(stats_dir: str | os.PathLike) -> Iterator[None]:
    """Set CASCADE_STATS_DIR while engine processes are spawned (they inherit it)."""
    old = os.environ.get(STATS_ENV)
    os.environ[STATS_ENV] = str(stats_dir)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(STATS_ENV, None)
        else:
            os.environ[STATS_ENV] = old


@dataclass
class Engine:
    """An `LLM` and the folder its processes write backend counters to."""

    llm: Any
    stats_dir: str
    name: str = ""
    _closed: bool = field(default=False, repr=False)

    def stats(self) -> list[dict]:
        from vllm_cascade.stats import read_stats_dir

        return read_stats_dir(self.stats_dir)

    def totals(self) -> dict[str, int]:
        """Counters summed over every process that used the backend."""
        keys = ("steps", "cascade_steps", "layer_calls", "pages_read", "flat_pages_read", "chunk_steps")
        found = self.stats()
        return {k: sum(s[k] for s in found) for k in keys}

    def generate_ids(self, prompts: list[list[int]], max_tokens: int = 24) -> list[list[int]]:
        """Greedy generation from token-id prompts; the new token ids, in prompt order."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            with contextlib.suppress(Exception):
                engine_core.shutdown()
        self.llm = None
        gc.collect()


def make_engine(model: str | os.PathLike, stats_dir: str | os.PathLike, name: str = "", **kwargs: Any) -> Engine:
    """`LLM(model, **kwargs)` with its processes writing counters to `stats_dir`."""
    from vllm import LLM

    os.makedirs(stats_dir, exist_ok=True)
    with stats_env(stats_dir):
        llm = LLM(model=str(model), **kwargs)
    return Engine(llm, str(stats_dir), name)


def assert_plugin_ran(stats: list[dict], main_pid: int | None = None) -> None:
    """The CASCADE backend computed attention in a process other than `main_pid`, on this
    platform's paths (the torch path on the CPU; Triton or FlashInfer on a GPU)."""
    import torch

    main_pid = os.getpid() if main_pid is None else main_pid
    paths = ("triton", "flashinfer") if torch.cuda.is_available() else ("torch",)
    assert stats, "no process wrote CASCADE counters: the backend never ran (another backend served?)"
    ran = [s for s in stats if s["layer_calls"] > 0 and any(s["paths"].get(p, 0) > 0 for p in paths)]
    assert ran, f"CASCADE counters show no attention call on the {' or '.join(paths)} path: {stats}"
    assert all(s["pid"] != main_pid for s in ran), f"CASCADE ran in the main process, not a worker: {stats}"


@pytest.fixture(scope="session")
def tiny_model() -> pathlib.Path:
    from vllm_cascade.testing.tiny_model import build_tiny_qwen3

    return build_tiny_qwen3()


@pytest.fixture(scope="session")
def session_tmp() -> Iterator[pathlib.Path]:
    with tempfile.TemporaryDirectory(prefix="vllm-cascade-tests-") as d:
        yield pathlib.Path(d)


@pytest.fixture(scope="session")
def engines() -> Iterator[list[Engine]]:
    """Every engine the session started; all shut down at session end."""
    started: list[Engine] = []
    yield started
    for engine in reversed(started):
        engine.shutdown()
    started.clear()
    gc.collect()


# CASCADE with 16-token pages (partial pages), cascading on any shared page.
CASCADE_ENGINE: dict[str, Any] = {
    "attention_backend": "cascade", "block_size": 16, "additional_config": AGGRESSIVE_CASCADE, **SCHEDULING
}
# vLLM's own CPU backend, the reference (it needs pages of a multiple of 32 tokens).
REFERENCE_ENGINE: dict[str, Any] = {"attention_backend": "CPU_ATTN", "block_size": 32, **SCHEDULING}


def session_engine(name: str, tiny_model, session_tmp, engines: list[Engine], **kwargs: Any) -> Engine:
    engine = make_engine(tiny_model, session_tmp / f"stats-{name}", name=name, **kwargs)
    engines.append(engine)  # shut down at session end
    return engine


@pytest.fixture(scope="session")
def cascade_engine(tiny_model, session_tmp, engines) -> Engine:
    return session_engine("cascade", tiny_model, session_tmp, engines, **CASCADE_ENGINE)


@pytest.fixture(scope="session")
def reference_engine(tiny_model, session_tmp, engines) -> Engine:
    return session_engine("reference", tiny_model, session_tmp, engines, **REFERENCE_ENGINE)


@pytest.fixture(scope="session")
def fused_engine(tiny_model, session_tmp, engines) -> Engine:
    """The cascade engine's settings, with the fused Qwen3 model class (models/qwen3.py)."""
    hf_overrides = {"architectures": ["CascadeQwen3ForCausalLM"]}
    return session_engine("fused", tiny_model, session_tmp, engines, hf_overrides=hf_overrides, **CASCADE_ENGINE)
