"""Configurations the plugin cannot serve fail early and say why.

- An unknown backend name fails in the main process, before any engine starts,
  with vLLM's list of valid names (CASCADE among them).
- What CASCADE does not support (here head_dim 32) and unknown cascade
  settings fail the same way: the plugin checks them when vLLM builds its
  config, so the user gets the reason itself, not "Engine core
  initialization failed" with the reason buried in a worker's log.
"""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest
from conftest import AGGRESSIVE_CASCADE

from vllm_cascade.config import CascadeConfig

BASE = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True, "attention_backend": "cascade"}


def start_fails_before_any_engine(model, **kwargs) -> str:
    """LLM(...) must raise while vLLM builds its config, in this process: no engine process starts."""
    import multiprocessing

    from vllm import LLM

    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError) as err:
        LLM(model=str(model), **{**BASE, **kwargs})
    assert set(multiprocessing.active_children()) == before
    return str(err.value)


def test_unknown_backend_name_lists_valid_ones(tiny_model):
    from vllm import LLM

    with pytest.raises(ValueError) as err:
        LLM(model=str(tiny_model), dtype="float32", max_model_len=512, attention_backend="no_such_backend")
    message = str(err.value)
    assert "NO_SUCH_BACKEND" in message and "Valid options" in message, message
    assert "CASCADE" in message and "CPU_ATTN" in message, message


@pytest.fixture
def head_dim_32_model(tiny_model, tmp_path):
    """The tiny model with head_dim 32 (CASCADE supports 64, 128, 256)."""
    import torch
    from transformers import AutoConfig, Qwen3ForCausalLM

    config = AutoConfig.from_pretrained(tiny_model)
    config.head_dim = 32
    torch.manual_seed(0)
    out = tmp_path / "tiny-qwen3-head-dim-32"
    Qwen3ForCausalLM(config).save_pretrained(out)
    for name in os.listdir(tiny_model):
        if name.startswith("tokenizer") or name == "generation_config.json":
            shutil.copy(tiny_model / name, out / name)
    assert json.loads((out / "config.json").read_text())["head_dim"] == 32
    return out


def test_unsupported_head_size_fails_at_start(head_dim_32_model):
    message = start_fails_before_any_engine(head_dim_32_model)
    assert "head_size not supported" in message and "CASCADE" in message, message
    assert "head size is 32" in message, message


def test_unknown_cascade_setting_fails_at_start(tiny_model):
    message = start_fails_before_any_engine(tiny_model, additional_config={"cascade": {"bogus_setting": 1}})
    assert "unknown cascade settings ['bogus_setting']" in message, message


def test_unknown_cascade_setting_is_a_value_error():
    with pytest.raises(ValueError, match="bogus_setting"):
        CascadeConfig.from_vllm(SimpleNamespace(additional_config={"cascade": {"bogus_setting": 1}}))
    # The known ones parse (what the end-to-end tests use).
    config = CascadeConfig.from_vllm(SimpleNamespace(additional_config=AGGRESSIVE_CASCADE))
    assert (config.min_saved_pages, config.min_saved_fraction) == (1, 0.0)


def test_cascade_settings_from_environment(monkeypatch):
    monkeypatch.setenv("CASCADE_MAX_CASCADE_LEVELS", "2")
    monkeypatch.setenv("CASCADE_ENABLE_CASCADE", "false")
    config = CascadeConfig.from_vllm(SimpleNamespace(additional_config=None))
    assert config.max_cascade_levels == 2 and config.enable_cascade is False
    # additional_config wins over the environment.
    config = CascadeConfig.from_vllm(SimpleNamespace(additional_config={"cascade": {"max_cascade_levels": 3}}))
    assert config.max_cascade_levels == 3
    monkeypatch.setenv("CASCADE_MAX_CASCADE_LEVELS", "0")
    with pytest.raises(ValueError, match="max_cascade_levels"):
        CascadeConfig.from_vllm(SimpleNamespace(additional_config=None))


@pytest.mark.parametrize("name", ["gpu_kernel", "chunk_prefill_kernel"])
def test_kernel_choices_are_checked(name):
    for good in ("triton", "flashinfer"):
        assert getattr(CascadeConfig.from_vllm(SimpleNamespace(additional_config={"cascade": {name: good}})), name) == good
    with pytest.raises(ValueError, match=f"{name} must be 'flashinfer' or 'triton', not 'cuda'"):
        CascadeConfig.from_vllm(SimpleNamespace(additional_config={"cascade": {name: "cuda"}}))


@pytest.mark.parametrize(("name", "value", "message"), [
    ("chunk_page_ratio", 0.0, r"chunk_page_ratio must be in \(0, 1\], not 0.0"),
    ("chunk_page_ratio", 1.5, r"chunk_page_ratio must be in \(0, 1\], not 1.5"),
    ("max_chunks", 0, "max_chunks must be >= 1, not 0"),
])
def test_chunk_registry_limits_are_checked(name, value, message):
    with pytest.raises(ValueError, match=message):
        CascadeConfig.from_vllm(SimpleNamespace(additional_config={"cascade": {name: value}}))
