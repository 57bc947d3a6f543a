"""The CASCADE attention backend for vLLM: Backend, metadata Builder, Impl.

- `CascadeBackend`: static description (what vLLM may hand us).
- `CascadeMetadataBuilder.build`: host work once per step: read the block
  table, plan the cascade levels, plan the GPU kernels.
- `CascadeImpl.forward`: per layer, no planning; runs the planned levels.

The KV cache of a layer is `[num_pages, num_kv_heads, page_size, 2 * head_dim]`
(KVCacheLayout.LBHNC): keys in the first half of the last dim, values in the
second, as vLLM's FlashInfer backend stores them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from vllm.config import VllmConfig, get_current_vllm_config, get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from vllm_cascade import BACKEND_NAME, vllm_compat
from vllm_cascade.attention.plan import (
    CascadePlan,
    DecodePlanReuse,
    flat_plan,
    plan_cascade,
    split_uniform,
    token_positions,
)
from vllm_cascade.attention.worklist import WorkListTooLarge
from vllm_cascade.config import SUPPORTED_HEAD_SIZES, CascadeConfig
from vllm_cascade.kv.chunk_pages import ChunkView, init_worker_chunk_pages
from vllm_cascade.ops import torch_attention
from vllm_cascade.stats import STATS

if TYPE_CHECKING:
    from vllm_cascade.ops.flashinfer_attention import FlashInferCascade
    from vllm_cascade.ops.triton_cascade import TritonCascade



class CascadeBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[CascadeImpl]:
        return CascadeImpl

    @staticmethod
    def get_builder_cls() -> type[CascadeMetadataBuilder]:
        return CascadeMetadataBuilder

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return SUPPORTED_HEAD_SIZES

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return capability is None or capability.major >= 8  # None: the CPU

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class CascadeMetadata:
    num_actual_tokens: int
    query_start_loc: np.ndarray  # host [num_rows + 1]
    seq_lens: np.ndarray  # host [num_rows]
    block_table: torch.Tensor  # [num_rows, max_pages], on the KV cache's device
    plan: CascadePlan
    kernel: FlashInferCascade | TritonCascade | None  # the builder's GPU path, planned for this step
    chunks: ChunkView | None = None  # the step reads chunk pages (torch path; the kernels hold their own)
    query_rope: torch.Tensor | None = None  # the query comes before RoPE: the model's cos/sin table


class CascadeMetadataBuilder(AttentionMetadataBuilder[CascadeMetadata]):
    @classmethod
    def get_cudagraph_support(cls, vllm_config: VllmConfig, kv_cache_spec) -> AttentionCGSupport:
        # With "triton", decode steps are planned into fixed buffers read by persistent kernels, so a
        # FULL graph captured once replays any decode step. FlashInfer's wrappers re-plan: piecewise.
        if CascadeConfig.from_vllm(vllm_config).gpu_kernel == "triton" and torch.cuda.is_available():
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.config = CascadeConfig.from_vllm(vllm_config)
        self.page_size = kv_cache_spec.block_size
        self.group_page_bytes = kv_cache_spec.page_size_bytes * len(layer_names)  # one page, every layer
        self.kernel: FlashInferCascade | None = None  # steps with prefill (and all steps with "flashinfer")
        self.decode_kernel: TritonCascade | None = None  # decode steps, fixed buffers (CUDA graphs)
        self.reuse = DecodePlanReuse()  # decode steps of unchanged requests plan once
        impls = _layer_impls(vllm_config, layer_names)
        impl = impls[0]
        # Chunk pages of this worker's KV cache (annotated by the engine core through RPCs).
        num_pages = vllm_config.cache_config.num_gpu_blocks or 0
        self.chunk_pages = init_worker_chunk_pages(num_pages, self.page_size, device)
        if self.chunk_pages.cos_sin_cache is None:
            table, problem = vllm_compat.model_rope_table(impl.head_size)
            self.chunk_pages.cos_sin_cache = None if table is None else table.to(device)
            self.chunk_pages.rope_problem = problem
        # The model binds every layer's impl (query before RoPE) or none (models/qwen3.py). Queries are
        # then rotated with the model's own table, as the model would have rotated them.
        ropes = {id(i.query_rope_module) for i in impls}
        if len(ropes) > 1:
            raise RuntimeError(f"{BACKEND_NAME}: layers hand the query with different RoPE modules, or some rotated")
        module = impl.query_rope_module
        self.query_rope: torch.Tensor | None = None if module is None else module.cos_sin_cache.to(device)
        self.chunk_kernel: TritonCascade | None = None  # GPU steps with prefill that read chunk pages
        if device.type == "cuda":
            from vllm_cascade.ops.flashinfer_attention import FlashInferCascade
            from vllm_cascade.ops.triton_cascade import TritonCascade

            self.kernel = FlashInferCascade(device, impl.num_heads, impl.num_kv_heads, impl.head_size, self.page_size,
                                            vllm_config.model_config.dtype, impl.scale, self.chunk_pages.cos_sin_cache,
                                            query_rope=self.query_rope)
            max_pages = -(-vllm_config.model_config.max_model_len // self.page_size)
            max_rows = vllm_config.scheduler_config.max_num_seqs
            # Chunk steps FlashInfer cannot take (split_uniform finds no exact split), or all of them
            # with chunk_prefill_kernel "triton": the fused kernel shifts keys and masks pads per page.
            self.chunk_kernel = TritonCascade(impl.num_heads, impl.num_kv_heads, self.page_size, impl.scale,
                                              device=device, head_dim=impl.head_size, query_rope=self.query_rope)
            self._set_chunk_tables(self.chunk_kernel, max_rows, max_pages)
            if self.config.gpu_kernel == "triton":
                # Any decode step fits: one token per request. One KV run per (tile, level) always
                # fits these rows and items; the slack lets long contexts split over more programs.
                tokens = max(vllm_config.scheduler_config.max_num_seqs,
                             vllm_config.compilation_config.max_cudagraph_capture_size or 0)
                runs = 2 * tokens * self.config.max_cascade_levels + 512
                # Items of 32 pages (cascade) and 64 (flat): fastest under graph replay at the shared and
                # nosharing decode shapes on the H100 (kernel_bench --sweep, benchmarks/RESULTS.md).
                # fill_programs: batch-1 decode of 640 keys 38 -> 17 us per layer (kernel_bench, single).
                self.decode_kernel = TritonCascade(impl.num_heads, impl.num_kv_heads, self.page_size, impl.scale,
                                                   device=device, head_dim=impl.head_size, pages_per_item=32,
                                                   flat_pages_per_item=64, fill_programs=True, query_rope=self.query_rope,
                                                   capacity={"tokens": tokens, "rows": runs, "items": runs})
                self._set_chunk_tables(self.decode_kernel, max(tokens, max_rows), max_pages)

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> CascadeMetadata:
        start_ns = time.perf_counter_ns()
        cm = common_attn_metadata
        num_rows = cm.num_reqs
        query_start_loc = cm.query_start_loc_cpu[: num_rows + 1].numpy().astype(np.int64)
        host_seq_lens = cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None else cm.seq_lens
        seq_lens = host_seq_lens[:num_rows].cpu().numpy().astype(np.int64)
        block_table = cm.block_table_tensor[:num_rows]
        query_lens = np.diff(query_start_loc)

        is_decode = cm.max_query_len <= 1  # else "prefill": any step with a longer query
        if self.query_rope is not None and cm.positions is not None and cm.positions.device.type == "cpu":
            # The kernels rotate queries at host positions (token_positions); they must be the model's.
            model_positions = cm.positions[: cm.num_actual_tokens].numpy()
            if not np.array_equal(model_positions, token_positions(seq_lens, query_start_loc)):
                raise RuntimeError(f"{BACKEND_NAME}: query_rope='backend' needs positions = slot index (a text model)")
        reuse_key = self._reuse_key(cm, block_table) if is_decode else None
        plan = self.reuse.get(reuse_key, seq_lens, self.page_size, self.config.min_saved_fraction)
        host_table = None
        if plan is None:
            shifts = None
            if self.chunk_pages.count:  # chunk pages exist: does this step read any?
                host_table = self._host_block_table(cm, block_table)
                shifts = self.chunk_pages.shifts(host_table, seq_lens)
            plan = flat_plan(seq_lens, self.page_size, shifts)
            if self._may_share(seq_lens, query_lens):
                plan = plan_cascade(
                    host_table if host_table is not None else self._host_block_table(cm, block_table),
                    seq_lens,
                    query_lens,
                    self.page_size,
                    self.config.max_cascade_levels,
                    self.config.min_saved_pages,
                    self.config.min_saved_fraction,
                    shifts,
                )
            self.reuse.put(reuse_key, plan, seq_lens)
        else:
            STATS.plans_reused += 1
        level_pages, level_queries = plan.level_summary(query_lens)
        STATS.record_step(plan.num_levels, level_pages, level_queries, plan.flat_pages_read, self.group_page_bytes)
        kernel = self.kernel
        decode = self.decode_kernel
        if decode is not None and is_decode and query_start_loc[-1] <= decode.capacity["tokens"]:
            kernel = decode  # also the buffers a captured decode graph reads
        elif plan.shifts is not None and kernel is not None:
            split = None
            if self.config.chunk_prefill_kernel == "flashinfer":
                if host_table is None:  # a reused decode plan
                    host_table = self._host_block_table(cm, block_table)
                split = split_uniform(plan, host_table, seq_lens, query_lens, self.page_size, self.chunk_pages.valid)
            if split is None:
                kernel = self.chunk_kernel
            else:
                plan = split  # the same attention, in segments FlashInfer can attend
        if kernel is not None:
            chunk_args = {"shifts": plan.shifts} if kernel.name == "triton" else {}  # FlashInfer steps have none
            try:
                advanced = kernel.plan(plan, block_table, seq_lens, query_start_loc, **chunk_args)
            except WorkListTooLarge:
                # Chunk steps may give a row many segments; a flat plan always fits the decode buffers.
                plan = flat_plan(seq_lens, self.page_size, plan.shifts)
                self.reuse.put(reuse_key, plan, seq_lens)
                advanced = kernel.plan(plan, block_table, seq_lens, query_start_loc, **chunk_args)
            STATS.worklists_advanced += bool(advanced)  # FlashInfer's plan returns None
        chunks = None
        if plan.shifts is not None:
            STATS.chunk_steps += 1
            chunks = ChunkView(plan.shifts, self.chunk_pages.valid_device, self.chunk_pages.cos_sin_cache)
        # Partial results merged this step: the fused path's (levels and KV runs), else one per level a token saw.
        merged = getattr(kernel, "partial_rows", None)
        STATS.merge_inputs += merged if merged is not None else (sum(level_queries) if plan.num_levels > 1 else 0)
        STATS.record_build("decode" if is_decode else "prefill", time.perf_counter_ns() - start_ns)
        return CascadeMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_table=block_table,
            plan=plan,
            kernel=kernel,
            chunks=chunks,
            query_rope=self.query_rope,
        )

    def _set_chunk_tables(self, kernel: TritonCascade, max_rows: int, max_pages: int) -> None:
        if self.chunk_pages.cos_sin_cache is not None:
            kernel.set_chunk_tables(self.chunk_pages.valid_device, self.chunk_pages.cos_sin_cache, max_rows, max_pages)

    @staticmethod
    def _host_block_table(cm: CommonAttentionMetadata, table: torch.Tensor) -> np.ndarray:
        """`table` (this step's rows, on its device) on the host; columns past a row's pages may be stale."""
        if table.device.type == "cpu":
            STATS.block_table_reads["cpu"] += 1
            return table.numpy()
        mirror = _usable_mirror(cm)
        if mirror is not None:
            STATS.block_table_reads["host_mirror"] += 1
            rows = np.zeros((len(table), mirror.tables[0].shape[1]), dtype=np.int32)  # padded rows: seq_len 0
            rows[: len(cm.req_idx)] = mirror.rows(0, cm.req_idx)
            return rows
        # V1 runner, several KV-cache groups, speculators: the copy waits for the device.
        STATS.block_table_reads["device_copy"] += 1
        return table.cpu().numpy()

    def _reuse_key(self, cm: CommonAttentionMetadata, table: torch.Tensor) -> tuple | None:
        """Identifies a decode step's requests and their pages (DecodePlanReuse), where vLLM lets us:
        the rows' slots, the count of slot overwrites of the host mirror and the chunk pages'
        version (their shifts). None: plan afresh."""
        mirror = _usable_mirror(cm)
        if table.device.type == "cpu" or mirror is None:
            return None
        return cm.req_idx.tobytes(), mirror.overwrites, self.chunk_pages.version

    def _may_share(self, seq_lens: np.ndarray, query_lens: np.ndarray) -> bool:
        """Cheap test before reading the block table: could any sharing pay?"""
        if not self.config.enable_cascade or self.config.max_cascade_levels < 2 or len(seq_lens) < 2:
            return False
        eligible_pages = int((np.maximum(seq_lens - query_lens, 0) // self.page_size).max())
        return eligible_pages * (len(seq_lens) - 1) >= self.config.min_saved_pages


class CascadeImpl(AttentionImpl[CascadeMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            "sliding window": sliding_window is not None,
            "logits soft cap": bool(logits_soft_cap),
            "attention sinks": sinks is not None,
            "KV sharing between layers": kv_sharing_target_layer_name is not None,
            f"attention type {attn_type}": attn_type != AttentionType.DECODER,
        }
        if any(unsupported.values()):
            names = ", ".join(k for k, v in unsupported.items() if v)
            raise NotImplementedError(f"The {BACKEND_NAME} attention backend does not support {names}.")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        # The fused Qwen3 class hands the query before RoPE to an impl that accepts it and then calls
        # bind_query_rope (models/qwen3.py); vLLM's own models always rotate it.
        self.accepts_unrotated_query = CascadeConfig.from_vllm(get_current_vllm_config()).query_rope == "backend"
        self.query_rope_module: torch.nn.Module | None = None  # set when the model hands the query before RoPE

    def bind_query_rope(self, rotary_emb: torch.nn.Module) -> None:
        """The model hands this layer its query before RoPE; `rotary_emb` is vLLM's RotaryEmbedding
        whose `cos_sin_cache` [max_position, rot_dim] (cos, then sin; neox) rotated the keys."""
        if not getattr(rotary_emb, "is_neox_style", False) or not hasattr(rotary_emb, "cos_sin_cache"):
            raise NotImplementedError(f"{BACKEND_NAME} rotates queries with a neox RoPE table only")
        self.query_rope_module = rotary_emb

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: CascadeMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"{BACKEND_NAME} does not fuse output quantization.")
        if attn_metadata is None:  # profiling run
            return output
        k_cache, v_cache = kv_cache[..., : self.head_size], kv_cache[..., self.head_size :]
        num_tokens = int(attn_metadata.query_start_loc[-1])
        out = output[:num_tokens].view(num_tokens, self.num_heads, self.head_size)
        query = query[:num_tokens].view(num_tokens, self.num_heads, self.head_size)
        merge_ns = None
        if attn_metadata.kernel is not None:
            path = attn_metadata.kernel.name
            attn_metadata.kernel.run(query, k_cache, v_cache, out)
        else:
            path = "torch"
            spent_ns = torch_attention.cascade_attention(
                query,
                k_cache,
                v_cache,
                attn_metadata.block_table,
                attn_metadata.seq_lens,
                attn_metadata.query_start_loc,
                attn_metadata.plan,
                self.scale,
                out,
                attn_metadata.chunks,
                attn_metadata.query_rope,
            )
            merge_ns = spent_ns if attn_metadata.plan.num_levels > 1 else None
        STATS.record_layer_call(path, self.query_rope_module is not None, merge_ns)
        return output

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        k_cache, v_cache = kv_cache[..., : self.head_size], kv_cache[..., self.head_size :]
        if kv_cache.is_cuda:
            # vLLM's own kernel; it takes [pages, N, H, D] views.
            torch.ops._C_cache_ops.reshape_and_cache_flash(
                key,
                value,
                k_cache.transpose(1, 2),
                v_cache.transpose(1, 2),
                slot_mapping,
                self.kv_cache_dtype,
                layer._k_scale,
                layer._v_scale,
            )
        else:
            torch_attention.write_kv(key, value, k_cache, v_cache, slot_mapping)


def _usable_mirror(cm: CommonAttentionMetadata) -> vllm_compat.HostBlockIds | None:
    """The host mirror of the runner's block ids, if it describes this step's rows (model runner V2,
    one KV-cache group: `cm.req_idx` names the rows' slots)."""
    mirror = vllm_compat.host_block_ids()
    if mirror is None or cm.req_idx is None or len(mirror.tables) != 1:
        return None
    return mirror


def _layer_impls(vllm_config: VllmConfig, layer_names: list[str]) -> list[CascadeImpl]:
    layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names)
    impls = [layer.impl for layer in layers.values()]
    scales = {impl.scale for impl in impls}
    if len(scales) > 1:
        raise ValueError(f"{BACKEND_NAME} needs one softmax scale per KV-cache group, got {scales}")
    return impls
