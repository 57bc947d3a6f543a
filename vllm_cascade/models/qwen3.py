"""Qwen3 with each RMSNorm folded into the projection after it, and fused epilogues on the GPU.

Same checkpoints, same outputs (up to rounding) as vLLM's `Qwen3ForCausalLM`:

    rmsnorm(h) @ W.T  ==  (h @ (W * w_norm).T) * (1 / rms(h))

At load, every `input_layernorm` weight is multiplied into the input columns
of `qkv_proj` and every `post_attention_layernorm` weight into `gate_up_proj`
(per input column, so any column-parallel shard folds the same way). A layer
then reads the raw hidden stream `h` and scales the projections' outputs by
1/rms(h) inside the elementwise step that follows each of them anyway:

    qkv = qkv_proj(h);  q, k, v = qk_norm_rope(qkv, h, positions)   # row scale, QK-norm, RoPE, v scale
    h = h + o_proj(attention(q, k, v))
    x = silu_mul_scaled(gate_up_proj(h), h)                         # row scale, SiLU-and-mul
    h = h + down_proj(x)

Paths, chosen once when the model is built (nothing branches per step):

- CUDA: `qk_norm_rope` and `silu_mul_scaled` are the Triton kernels of
  ops/fused_qwen3.py behind torch custom ops (opaque to torch.compile, captured
  by CUDA graphs). With tensor parallel size 1 and unquantized weights the two
  residual adds run inside the o_proj / down_proj GEMMs (`torch.addmm(h, x,
  W.T)`, cuBLAS beta=1), so a layer has no norm or add kernel of its own: 7
  launches per layer, attention and KV write included, against 10 for stock
  vLLM under Inductor. (With TP > 1 the add stays after the all-reduce.)
- CPU: the same math with the torch references of those kernels.
- A rotary embedding the kernels do not handle (partial rotary, GPT-J style,
  scaled variants that change `forward`): vLLM's own q_norm/k_norm/rotary
  modules, with the row scale applied first.

The decoder layers keep the hidden stream in one tensor (`h`, residual
included) and return `(h, None)`; the last layer of a pipeline stage returns
vLLM's usual pair `(mlp_out, residual)`, so the model's final add + norm and
the pipeline hand-off work unchanged.

Settings, in `additional_config={"cascade_qwen3": {...}}` (part of vLLM's
compile-cache key, unlike environment variables):

- `kernels` (default true): the Triton epilogues on CUDA; false runs the torch
  references there too (Inductor compiles them), for comparison.
- `residual_in_gemm` (default true): the residual adds inside the GEMMs;
  false adds after them.

Cascade hand-off (issue 5, item 3): an attention implementation whose class sets
`accepts_unrotated_query = True` gets the query after QK-norm (and row scale)
but before RoPE; keys are still rotated at their absolute positions, so the
KV cache layout does not change. At build time the model calls the impl's
`bind_query_rope(rotary_emb)` if it has one; `rotary_emb.cos_sin_cache` is
[max_position, head_dim], cos in the first half, sin in the second (neox).
The positions are the model's (`CommonAttentionMetadata.positions`; for a
text model a row's queries are its last tokens, which is how the CASCADE
backend computes them on the host). The backend can then rotate the query of
each level once, at `position - shift` (`ops.fused_qwen3.apply_rope_ref` is
the exact rotation), instead of un-rotating a rotated query: one rotation.
The CASCADE backend accepts it with `{"cascade": {"query_rope": "backend"}}`
(attention/backend.py); with any other impl nothing changes.

Selected per model with `hf_overrides={"architectures": ["CascadeQwen3ForCausalLM"]}`
or for every Qwen3 checkpoint with `CASCADE_FUSED_QWEN3=1` (see plugin.py).
Unquantized weights only, no LoRA. Norms are folded after loading real weights
(`load_weights`) and, for `load_format="dummy"`, in the model's post-load hook
where the weights are still plain tensors (on the GPU; on the CPU vLLM has
repacked them by then, so dummy weights stay unfolded there).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from vllm.model_executor.models.qwen3 import (
    Qwen3Attention,
    Qwen3DecoderLayer,
    Qwen3ForCausalLM,
    Qwen3Model,
)
from vllm.platforms import current_platform

from vllm_cascade.ops.fused_qwen3 import (
    inverse_rms,
    qk_norm_rope_ref,
    silu_mul_scaled_ref,
    triton_supported,
)
from vllm_cascade.stats import STATS

logger = init_logger(__name__)

ARCHITECTURE = "CascadeQwen3ForCausalLM"
SETTINGS_KEY = "cascade_qwen3"

__all__ = ["ARCHITECTURE", "CascadeQwen3ForCausalLM", "FusedQwen3Settings", "fused_paths_of", "inverse_rms"]


@dataclass(frozen=True)
class FusedQwen3Settings:
    kernels: bool = True
    residual_in_gemm: bool = True

    @classmethod
    def from_vllm(cls, vllm_config: Any) -> FusedQwen3Settings:
        from vllm_cascade.config import parse_setting

        raw = dict((getattr(vllm_config, "additional_config", None) or {}).get(SETTINGS_KEY) or {})
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown {SETTINGS_KEY} settings {sorted(unknown)}; known: "
                             f"{sorted(cls.__dataclass_fields__)}")
        return cls(**{k: parse_setting(v, bool) for k, v in raw.items()})


def _unquantized(layer: torch.nn.Module) -> bool:
    return type(layer.quant_method).__name__ == "UnquantizedLinearMethod"


def _plain_rope(rotary_emb: torch.nn.Module, head_dim: int) -> bool:
    """A rotation the fused kernel and the torch reference do exactly: vLLM's RotaryEmbedding forward
    (any cos/sin cache, e.g. YaRN's), neox style, over the whole head."""
    return (isinstance(rotary_emb, RotaryEmbedding)
            and type(rotary_emb).forward_native is RotaryEmbedding.forward_native
            and triton_supported(head_dim, rotary_emb.rotary_dim, rotary_emb.is_neox_style))


class FusedQwen3Attention(Qwen3Attention):
    """Qwen3Attention reading the raw hidden stream; returns the attention output before o_proj."""

    def configure(self, eps_hidden: float, use_kernels: bool) -> None:
        self.eps_hidden = eps_hidden
        self.eps_head = self.q_norm.variance_epsilon
        self.plain_rope = _plain_rope(self.rotary_emb, self.head_dim)
        self.use_kernels = use_kernels and self.plain_rope
        impl = getattr(self.attn, "impl", None)
        self.rotate_query = not getattr(impl, "accepts_unrotated_query", False)  # the cascade hand-off
        if not self.rotate_query and hasattr(impl, "bind_query_rope"):
            impl.bind_query_rope(self.rotary_emb)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)  # weights carry input_layernorm's weight
        args = (qkv, hidden_states, positions, self.q_norm.weight, self.k_norm.weight, self.rotary_emb.cos_sin_cache,
                self.num_heads, self.num_kv_heads, self.head_dim, self.eps_hidden, self.eps_head, self.rotate_query)
        if self.use_kernels:
            q, k, v = torch.ops.vllm_cascade.qk_norm_rope(*args)
        elif self.plain_rope:
            q, k, v = qk_norm_rope_ref(*args)
        else:
            q, k, v = self._modules_epilogue(positions, qkv, hidden_states)
        return self.attn(q, k, v)

    def _modules_epilogue(self, positions: torch.Tensor, qkv: torch.Tensor, hidden_states: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """vLLM's own norm and rotary modules, for rotations the fused paths do not cover."""
        qkv = (qkv.float() * inverse_rms(hidden_states, self.eps_hidden)).to(qkv.dtype)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(*q.shape[:-1], -1, self.head_dim)).reshape(q.shape)
        k = self.k_norm(k.reshape(*k.shape[:-1], -1, self.head_dim)).reshape(k.shape)
        if self.rotate_query:
            q, k = self.rotary_emb(positions, q, k)
        else:
            k, _ = self.rotary_emb(positions, k)
        return q, k, v


class FusedQwen3DecoderLayer(Qwen3DecoderLayer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.self_attn.__class__ = FusedQwen3Attention  # same parameters, folded forward
        self.eps = self.input_layernorm.variance_epsilon
        self.ends_stage = False  # the last layer of this pipeline stage returns vLLM's (out, residual) pair
        self.use_kernels = False
        self.residual_in_gemm = False
        self.norms_folded = False

    def configure(self, settings: FusedQwen3Settings) -> None:
        """Pick the paths once (before the first forward, so torch.compile sees no branching)."""
        on_cuda = current_platform.is_cuda()
        attn, mlp = self.self_attn, self.mlp
        for proj in (attn.qkv_proj, mlp.gate_up_proj):
            if getattr(proj, "bias", None) is not None:
                raise NotImplementedError(f"{ARCHITECTURE}: a projection bias would be scaled by 1/rms as well")
        attn.configure(self.eps, on_cuda and settings.kernels)
        self.use_kernels = on_cuda and settings.kernels
        # On the CPU vLLM repacks linear weights (the plain weight is gone); with TP the add must follow
        # the all-reduce, not precede it.
        self.residual_in_gemm = (
            on_cuda and settings.residual_in_gemm and get_tensor_model_parallel_world_size() == 1
            and all(_unquantized(p) and getattr(p, "bias", None) is None for p in (attn.o_proj, mlp.down_proj))
        )

    def _project_add(self, proj: torch.nn.Module, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """h + proj(x): in the GEMM's epilogue where possible."""
        if self.residual_in_gemm:
            return torch.addmm(h, x, proj.weight.t())
        out, _ = proj(x)
        return out + h

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = hidden_states if residual is None else hidden_states + residual
        h = self._project_add(self.self_attn.o_proj, self.self_attn(positions, h), h)
        gate_up, _ = self.mlp.gate_up_proj(h)  # weights carry post_attention_layernorm's weight
        if self.use_kernels:
            x = torch.ops.vllm_cascade.silu_mul_scaled(gate_up, h, self.eps)
        else:
            x = silu_mul_scaled_ref(gate_up, h, self.eps)
        if self.ends_stage:
            out, _ = self.mlp.down_proj(x)
            return out, h
        return self._project_add(self.mlp.down_proj, x, h), None

    @torch.no_grad()
    def fold_norms(self) -> bool:
        """Multiply the norm weights into the next projections' input columns; False if the weights
        are no longer plain [out, in] tensors (repacked by vLLM's CPU linear)."""
        pairs = ((self.input_layernorm, self.self_attn.qkv_proj), (self.post_attention_layernorm, self.mlp.gate_up_proj))
        for norm, proj in pairs:
            if not _unquantized(proj):
                raise NotImplementedError(f"{ARCHITECTURE} folds norms into unquantized weights only")
            if proj.weight.dim() != 2 or proj.weight.shape[1] != norm.weight.shape[0]:
                return False
        for norm, proj in pairs:
            proj.weight.mul_(norm.weight.to(proj.weight.dtype)[None, :])
            norm.weight.fill_(1.0)  # unused now; ones keep the module harmless if anything calls it
        self.norms_folded = True
        return True


class FusedQwen3Model(Qwen3Model):
    decoder_layer_type = FusedQwen3DecoderLayer

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        settings = FusedQwen3Settings.from_vllm(vllm_config)
        for layer in self.fused_layers():
            layer.configure(settings)
        self.layers[self.end_layer - 1].ends_stage = True

    def fused_layers(self) -> list[FusedQwen3DecoderLayer]:
        return [layer for layer in self.layers if isinstance(layer, FusedQwen3DecoderLayer)]  # not PP-missing ones


class CascadeQwen3ForCausalLM(Qwen3ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        # Qwen3ForCausalLM builds Qwen3Model by name; build ours in its place.
        import vllm.model_executor.models.qwen3 as stock

        if getattr(vllm_config, "lora_config", None) is not None:
            # LoRA's A matrices read the normalized input: they would need the norm weights folded too.
            raise NotImplementedError(f"{ARCHITECTURE} does not support LoRA; use Qwen3ForCausalLM")
        stock_model, stock.Qwen3Model = stock.Qwen3Model, FusedQwen3Model
        try:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        finally:
            stock.Qwen3Model = stock_model

    def forward(self, *args, **kwargs):
        STATS.model_steps[ARCHITECTURE] += 1
        return super().forward(*args, **kwargs)

    def fused_paths(self) -> dict[str, Any]:
        """How many of this worker's layers run each fused path (for tests and benchmarks, via
        `LLM.apply_model`)."""
        layers = self.model.fused_layers()
        return {
            "class": type(self).__name__,
            "layers": len(layers),
            "qk_kernel": sum(layer.self_attn.use_kernels for layer in layers),
            "silu_kernel": sum(layer.use_kernels for layer in layers),
            "residual_in_gemm": sum(layer.residual_in_gemm for layer in layers),
            "unrotated_query": sum(not layer.self_attn.rotate_query for layer in layers),
            "norms_folded": sum(layer.norms_folded for layer in layers),
        }

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        for layer in self.model.fused_layers():
            if not layer.fold_norms():
                raise RuntimeError(f"{ARCHITECTURE}: projection weights are not plain tensors after loading")
        return loaded

    def process_weights_after_loading(self) -> None:
        """vLLM's model-level post-load hook: folds what `load_weights` did not (load_format="dummy")."""
        unfolded = [layer for layer in self.model.fused_layers() if not layer.norms_folded]
        folded = [layer.fold_norms() for layer in unfolded]  # every layer, not up to the first failure
        if not all(folded):
            logger.warning("%s: norm weights not folded (weights already repacked); the norms act as ones",
                           ARCHITECTURE)


def fused_paths_of(model: torch.nn.Module) -> dict[str, Any]:
    """`LLM.apply_model(fused_paths_of)`: the worker model's class and, for this class, how many layers
    run each fused path. A module-level function, so worker processes can unpickle it by name."""
    return model.fused_paths() if isinstance(model, CascadeQwen3ForCausalLM) else {"class": type(model).__name__}

