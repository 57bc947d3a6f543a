"""The fused Qwen3 class: same greedy tokens as vLLM's Qwen3 (fp32, CPU), and it really ran."""

import torch

from vllm_cascade.models.qwen3 import ARCHITECTURE, inverse_rms


def test_folded_norm_is_the_same_projection():
    gen = torch.Generator().manual_seed(0)
    x, w_norm, w = torch.randn(5, 64, generator=gen), torch.rand(64, generator=gen) + 0.5, torch.randn(96, 64, generator=gen)
    eps = 1e-6
    stock = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w_norm) @ w.T
    folded = (x @ (w * w_norm[None, :]).T) * inverse_rms(x, eps)
    torch.testing.assert_close(folded, stock, atol=1e-5, rtol=1e-5)


def test_greedy_tokens_equal_stock_qwen3(fused_engine, cascade_engine):
    prompts = [list(range(5, 5 + n)) for n in (3, 40, 150)] + [[7, 8, 9] * 30]
    assert fused_engine.generate_ids(prompts) == cascade_engine.generate_ids(prompts)
    fused = [s for s in fused_engine.stats() if s["model_steps"].get(ARCHITECTURE, 0) > 0]
    assert fused, f"the fused class never ran: {fused_engine.stats()}"
    assert not any(s["model_steps"] for s in cascade_engine.stats())  # the reference is vLLM's own class


def test_env_switch_serves_every_qwen3_with_the_fused_class(monkeypatch):
    from vllm import ModelRegistry

    from vllm_cascade import vllm_compat

    stock = ModelRegistry.models["Qwen3ForCausalLM"]
    monkeypatch.setenv("CASCADE_FUSED_QWEN3", "1")
    try:
        vllm_compat.register_models()
        entry = ModelRegistry.models["Qwen3ForCausalLM"]
        assert (entry.module_name, entry.class_name) == ("vllm_cascade.models.qwen3", ARCHITECTURE)
    finally:
        ModelRegistry.models["Qwen3ForCausalLM"] = stock
