"""Qwen3 with each RMSNorm folded into the projection that follows it.

Same checkpoints, same outputs (up to rounding) as vLLM's `Qwen3ForCausalLM`:

    rmsnorm(x) @ W.T  ==  (x @ (W * w_norm).T) * (1 / rms(x))

At load, every `input_layernorm` weight is multiplied into the columns of
`qkv_proj` and every `post_attention_layernorm` weight into `gate_up_proj`;
each layer then scales the projection's output rows by 1/rms of its input
instead of normalizing the input. On the GPU this is the shape a fused kernel
wants (the row scale is a GEMM epilogue; the sum of squares can be taken while
the input is read); in torch, here, it is the reference for such kernels.

Selected per model with `hf_overrides={"architectures": ["CascadeQwen3ForCausalLM"]}`
or for every Qwen3 checkpoint with `CASCADE_FUSED_QWEN3=1` (see plugin.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.qwen3 import Qwen3Attention, Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3Model

from vllm_cascade.stats import STATS

ARCHITECTURE = "CascadeQwen3ForCausalLM"


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """[T, H] -> [T, 1]: 1 / sqrt(mean(x^2) + eps), computed in float32 as vLLM's RMSNorm does."""
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)


class FusedQwen3Attention(Qwen3Attention):
    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, inv_rms: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)  # weights carry input_layernorm's weight
        qkv = (qkv.float() * inv_rms).to(qkv.dtype)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.view(*q.shape[:-1], -1, self.head_dim)).view(q.shape)
        k = self.k_norm(k.view(*k.shape[:-1], -1, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class FusedQwen3DecoderLayer(Qwen3DecoderLayer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.self_attn.__class__ = FusedQwen3Attention  # same parameters, folded forward
        self.eps = self.input_layernorm.variance_epsilon

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            hidden_states = hidden_states + residual
        residual = hidden_states
        hidden_states = self.self_attn(positions, hidden_states, inverse_rms(hidden_states, self.eps))
        hidden_states = hidden_states + residual
        residual = hidden_states
        gate_up, _ = self.mlp.gate_up_proj(hidden_states)  # weights carry post_attention_layernorm's weight
        gate_up = (gate_up.float() * inverse_rms(hidden_states, self.eps)).to(gate_up.dtype)
        hidden_states, _ = self.mlp.down_proj(self.mlp.act_fn(gate_up))
        return hidden_states, residual

    @torch.no_grad()
    def fold_norms(self) -> None:
        """Multiply the norm weights into the next projections' input columns (once, after loading)."""
        for norm, proj in ((self.input_layernorm, self.self_attn.qkv_proj), (self.post_attention_layernorm,
                                                                             self.mlp.gate_up_proj)):
            if proj.quant_method.__class__.__name__ != "UnquantizedLinearMethod":
                raise NotImplementedError(f"{ARCHITECTURE} folds norms into unquantized weights only")
            proj.weight.mul_(norm.weight.to(proj.weight.dtype)[None, :])
            norm.weight.fill_(1.0)  # unused now; ones keep the module harmless if anything calls it


class FusedQwen3Model(Qwen3Model):
    decoder_layer_type = FusedQwen3DecoderLayer


class CascadeQwen3ForCausalLM(Qwen3ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        # Qwen3ForCausalLM builds Qwen3Model by name; build ours in its place.
        import vllm.model_executor.models.qwen3 as stock

        stock_model, stock.Qwen3Model = stock.Qwen3Model, FusedQwen3Model
        try:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        finally:
            stock.Qwen3Model = stock_model

    def forward(self, *args, **kwargs):
        STATS.model_steps[ARCHITECTURE] += 1
        return super().forward(*args, **kwargs)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        for layer in self.model.layers:
            if isinstance(layer, FusedQwen3DecoderLayer):  # PP-missing layers are not
                layer.fold_norms()
        return loaded
