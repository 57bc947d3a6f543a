"""Every vLLM internal the plugin touches, in one place (vLLM 0.32.0).

Porting to another vLLM version starts and, ideally, ends here. What is used:

- `vllm.v1.attention.backends.registry.register_backend`: adds the CASCADE
  member to `AttentionBackendEnum`, which `--attention-backend` parses.
- `vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls`: ignores any
  selection but its own; wrapped so that CASCADE is honoured (and validated).
- `vllm.ModelRegistry.register_model`: adds CascadeQwen3ForCausalLM, and with
  CASCADE_FUSED_QWEN3=1 serves every Qwen3ForCausalLM checkpoint with it.
  The class itself (models/qwen3.py) subclasses vLLM's Qwen3 modules.
- `vllm.v1.worker.gpu.block_table.BlockTables.append_block_ids` (model
  runner V2, the GPU default): wrapped to keep a host copy of the block ids,
  which V2 holds only on the device; the builder reads this step's rows from it
  through `CommonAttentionMetadata.req_idx` instead of syncing the device.
- `Platform.check_and_update_config` of the current platform: wrapped so that
  a CASCADE run's settings are checked in the front process, before any
  engine process starts (otherwise errors surface late, in a worker's log).
- `vllm.v1.engine.core.EngineCore`: gains `cascade_*` methods that the front
  process calls as engine-core utilities (`EngineCoreClient.call_utility`) to
  pin and unpin chunk pages in the scheduler's `KVCacheManager` (its block
  pool's reference counts, the prefix cache's block hashes); they reach the
  workers with `model_executor.collective_rpc`.
- `vllm.v1.engine.core.get_request_block_hasher` (the name `EngineCore.__init__`
  calls): wrapped so that the engine core hashes a composed request's chunk
  pages as they were cached (ComposedBlockHasher); the composition travels in
  `SamplingParams.extra_args["cascade_chunks"]` (`vllm_xargs` over HTTP).
- `vllm.model_executor.layers.rotary_embedding._ROPE_DICT`: the model's RoPE
  table, with which the attention backend shifts chunk keys.
- `vllm.entrypoints.openai.completion.api_router.create_completion` and
  `...chat_completion.api_router.create_chat_completion`: the chunk HTTP API
  (an endpoint plugin, vLLM's public plugin group) wraps them so that
  /v1/completions and /v1/chat/completions accept a composition; for chat it
  also wraps, on this server's instances only, `OpenAIServingChat.
  render_chat_request` (the chunks' tokens go before the rendered messages)
  and `AsyncLLM.generate` (to read each composed request's `num_cached_tokens`).

The attention backend itself (attention/backend.py) implements vLLM's public
backend interface (`vllm.v1.attention.backend`) and reads the KV cache as
`[pages, H, N, 2*D]` (`KVCacheLayout.LBHNC`). Imports here stay inside the
functions: the platform hook runs while vLLM is still resolving its platform.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from vllm_cascade import BACKEND_NAME

BACKEND_CLASS_PATH = "vllm_cascade.attention.backend.CascadeBackend"


def register_backend_name() -> None:
    """Add CASCADE to vLLM's backend enum (idempotent, no CUDA, cheap import)."""
    from vllm.v1.attention.backends.registry import (
        AttentionBackendEnum,
        register_backend,
    )

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

    from vllm_cascade.config import parse_setting

    path = "vllm_cascade.models.qwen3:CascadeQwen3ForCausalLM"
    archs = ["CascadeQwen3ForCausalLM"]
    if parse_setting(os.environ.get("CASCADE_FUSED_QWEN3", "0"), bool):
        archs.append("Qwen3ForCausalLM")  # replaces vLLM's own class for every Qwen3 checkpoint
    for arch in archs:
        ModelRegistry.register_model(arch, path)


class HostBlockIds:
    """Host copy of a BlockTables' block ids: [group][request slot, block index]."""

    def __init__(self, block_tables) -> None:
        import numpy as np

        self.tables = [np.zeros(tuple(t.gpu.shape), dtype=np.int32) for t in block_tables.block_tables]
        # Slots given new contents (a request added or resumed). Between two such writes a slot's
        # table only grows at its end, so its earlier pages, and what it shares, stay as they were.
        self.overwrites = 0

    def rows(self, group: int, req_idx):
        return self.tables[group][req_idx]


_host_block_ids: HostBlockIds | None = None  # of this worker's model runner (the newest BlockTables)


def host_block_ids() -> HostBlockIds | None:
    return _host_block_ids


def mirror_block_tables(block_tables_cls=None) -> None:
    """Wrap `append_block_ids`, the one method that writes V2's block ids (idempotent)."""
    if block_tables_cls is None:
        try:
            from vllm.v1.worker.gpu.block_table import BlockTables as block_tables_cls
        except ImportError:  # a build without model runner V2
            return
    original = block_tables_cls.append_block_ids
    if getattr(original, "_cascade_wrapped", False):
        return

    def append_block_ids(self, req_index, new_block_ids, overwrite):
        global _host_block_ids
        starts = [0 if overwrite else int(self.num_blocks.np[i, req_index]) for i in range(self.num_kv_cache_groups)]
        original(self, req_index, new_block_ids, overwrite)
        mirror = self.__dict__.get("_cascade_host_ids")
        if mirror is None:
            mirror = self.__dict__["_cascade_host_ids"] = HostBlockIds(self)
        _host_block_ids = mirror
        mirror.overwrites += bool(overwrite)
        for group, start in enumerate(starts):
            ids = new_block_ids[group]
            if self.redirect_writes_to_null_block:
                ids = [0] * len(ids)
            mirror.tables[group][req_index, start : start + len(ids)] = ids

    append_block_ids._cascade_wrapped = True  # type: ignore[attr-defined]
    block_tables_cls.append_block_ids = append_block_ids


# -- chunk pages in the engine core -------------------------------------------------------------


class ComposedBlockHasher:
    """vLLM's request block hasher (`get_request_block_hasher`), aware of compositions.

    A request whose `sampling_params.extra_args["cascade_chunks"]` lists "<chunk id>:<pages>"
    (chunks/layout.py `ComposedPrompt`) gets, for its leading pages, the block hashes those chunks'
    own pages were cached under when they were registered; vLLM's prefix cache then serves them
    wherever they sit in the prompt. Its later pages chain from a hash of that list, so they never
    match a plain sequence of the same tokens (their KV attended the chunks). Other requests (an
    empty list too) are hashed by vLLM's function. `chunks` (chunk id -> its own pages' hashes) is
    filled when chunks are pinned; entries stay (they are deterministic, and the front end lets
    requests name only registered chunks)."""

    def __init__(self, plain: Any, block_size: int, hash_fn: Any) -> None:
        self.plain, self.block_size, self.hash_fn = plain, block_size, hash_fn
        self.chunks: dict[str, list] = {}
        # chunk id -> its own pinned blocks, while pinned (`pinned_lead`); dropped at unpin.
        self.blocks: dict[str, list] = {}
        self.lookups = {"pinned": 0, "vllm": 0}  # composed requests' prefix-cache lookups, by path

    def pinned_lead(self, refs: list[tuple[str, int]]) -> list | None:
        """The pinned blocks of a composition's leading chunk pages (`refs`: composition_refs), in
        order, or None (a chunk not pinned now: vLLM's lookup then). Pinned blocks are never evicted,
        so they hold exactly the hashes `__call__` gives those pages."""
        lead: list = []
        for chunk_id, pages in refs:
            blocks = self.blocks.get(chunk_id)
            if blocks is None or pages > len(blocks):
                return None
            lead += blocks[:pages]
        return lead

    def forget_blocks(self, block_ids: set[int]) -> None:
        for chunk_id in [c for c, blocks in self.blocks.items() if any(b.block_id in block_ids for b in blocks)]:
            del self.blocks[chunk_id]

    def __call__(self, request: Any) -> list:
        refs = composition_refs(request.sampling_params)
        if not refs:
            return self.plain(request)
        lead = getattr(request, "_cascade_lead", None)  # fixed at the request's first hashing
        if lead is None:
            lead = []
            for chunk_id, pages in refs:
                hashes = self.chunks.get(chunk_id)
                if hashes is None or pages > len(hashes):
                    raise KeyError(f"chunk {chunk_id} (with {pages} pages) is not pinned in this engine")
                lead += hashes[:pages]
            request._cascade_lead = lead
        from vllm.v1.core.kv_cache_utils import BlockHash, hash_block_tokens

        bs = self.block_size
        start, end = len(request.block_hashes), request.num_tokens // bs
        hashes = lead[start:end]  # the chunk pages: their hashes as pinned, one slice (no per-page work)
        parent = hashes[-1] if hashes else (request.block_hashes[-1] if request.block_hashes else None)
        for i in range(max(start, len(lead)), end):
            if i == len(lead):
                parent = BlockHash(self.hash_fn(("cascade-composition", tuple(lead))))
            parent = hash_block_tokens(self.hash_fn, parent, request.all_token_ids[i * bs : (i + 1) * bs])
            hashes.append(parent)
        return hashes


def composition_refs(sampling_params: Any) -> list[tuple[str, int]]:
    """The (chunk id, pages) a request's sampling params name, in order; [] for a plain request."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    refs = []
    for item in extra.get("cascade_chunks", ()):
        chunk_id, _, pages = str(item).rpartition(":")
        refs.append((chunk_id, int(pages)))
    return refs


def install_composed_hashing() -> None:
    """Make the engine core build a ComposedBlockHasher (idempotent). Plugins load at the start of
    `EngineCore.__init__`, before it calls `get_request_block_hasher`, a name it looks up in its module."""
    from vllm.v1.engine import core

    original = core.get_request_block_hasher
    if getattr(original, "_cascade_wrapped", False):
        return

    def get_request_block_hasher(hash_block_size: int, caching_hash_fn: Any) -> ComposedBlockHasher:
        return ComposedBlockHasher(original(hash_block_size, caching_hash_fn), hash_block_size, caching_hash_fn)

    get_request_block_hasher._cascade_wrapped = True  # type: ignore[attr-defined]
    core.get_request_block_hasher = get_request_block_hasher


def install_pinned_lookup() -> None:
    """Composed requests find their chunk pages in the pins instead of vLLM's hash-by-hash lookup
    (idempotent). vLLM's `KVCacheManager.get_computed_blocks` looks each full page up by its hash:
    for 32 requests of 4 chunks of 2048 tokens, 16k lookups, 8 ms of scheduler time on the dev
    machine (benchmarks/host_bench.py). A composed request's leading pages are pinned chunk pages
    (never evicted, so cached under exactly those hashes): they are taken as they are, and vLLM
    looks up only the pages after them. Setups this does not cover (several KV-cache groups, KV
    events, EAGLE, context parallelism, a chunk not pinned now) keep vLLM's lookup."""
    from vllm.v1.core.kv_cache_coordinator import UnitaryKVCacheCoordinator
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    original = KVCacheManager.get_computed_blocks
    if getattr(original, "_cascade_wrapped", False):
        return

    def get_computed_blocks(self: Any, request: Any) -> tuple[Any, int, int]:
        hasher = getattr(request, "_block_hasher", None)
        refs = composition_refs(request.sampling_params) if isinstance(hasher, ComposedBlockHasher) else []
        if not refs:
            return original(self, request)  # a plain request
        lead = hasher.pinned_lead(refs)
        coordinator = self.coordinator
        max_hit = request.num_tokens - 1  # as vLLM: the last token is computed again for its logits
        covered = (lead is not None and isinstance(coordinator, UnitaryKVCacheCoordinator)  # one group, full attention
                   and type(coordinator.single_type_managers[0]) is FullAttentionManager
                   and self.prefix_cache_lookup_enabled(request)
                   and not self.enable_kv_cache_events and not self.use_eagle
                   and coordinator.dcp_world_size == 1 and coordinator.pcp_world_size == 1
                   and self.block_pool.hash_block_size == hasher.block_size == coordinator.block_size
                   and len(lead) * hasher.block_size <= max_hit and len(lead) <= len(request.block_hashes))
        if not covered:
            hasher.lookups["vllm"] += 1
            return original(self, request)
        hasher.lookups["pinned"] += 1
        lead_tokens = len(lead) * hasher.block_size
        tail, tail_tokens, _ = coordinator.find_longest_cache_hit(request.block_hashes[len(lead):], max_hit - lead_tokens)
        return self.create_kv_cache_blocks((lead + list(tail[0]),)), lead_tokens + tail_tokens, 0

    get_computed_blocks._cascade_wrapped = True  # type: ignore[attr-defined]
    get_computed_blocks.__wrapped__ = original  # type: ignore[attr-defined]
    KVCacheManager.get_computed_blocks = get_computed_blocks


def install_chunk_pins() -> None:
    """Engine-core utilities for chunk pages (idempotent). They run in the engine core's
    loop between steps, where the scheduler and its KV manager live."""
    from vllm.v1.engine.core import EngineCore

    if hasattr(EngineCore, "cascade_pin_chunk"):
        return

    def cascade_pin_chunk(self, chunk_id: str, token_ids: list[int], refs: list, valid: list[int]) -> list[int]:
        """Pin a chunk just prefilled by its registration prompt (`token_ids`, composed of `refs`,
        chunks/layout.py `registration_prompt`): its own pages, the `len(valid)` pages after the
        referenced ones, get one more reference each (never evicted nor reused), their hashes go to
        the block hasher and every worker learns how many keys each holds (`valid`) and where they
        were rotated (kv/chunk_pages.py). -> their block ids."""
        manager, request, hasher = _chunk_request(self, f"cascade-pin-{chunk_id}", token_ids, refs)
        hit = manager.coordinator.find_longest_cache_hit(request.block_hashes, len(token_ids))[0][0]
        first = sum(pages for _, pages in refs)
        own = list(hit[first:])
        if len(own) != len(valid):
            raise RuntimeError(f"chunk {chunk_id}: {len(own)} of its {len(valid)} pages are cached after its prefill")
        manager.block_pool.touch(own)
        ids = _annotate(self, own, valid, first)
        hasher.chunks[chunk_id] = list(request.block_hashes[first : first + len(own)])
        hasher.blocks[chunk_id] = own
        return ids

    def cascade_unpin_pages(self, block_ids: list[int]) -> None:
        """Drop the references `cascade_pin_chunk` took and the pages' annotations; the pages stay
        cached until evicted."""
        pool = self.scheduler.kv_cache_manager.block_pool
        self.request_block_hasher.forget_blocks(set(block_ids))  # evictable from now on
        self.model_executor.collective_rpc(_worker_release_pages, args=(list(block_ids),))
        pool.free_blocks([pool.blocks[i] for i in block_ids])

    def cascade_lookup_stats(self) -> dict[str, int]:
        """Composed requests' prefix-cache lookups by path: "pinned" (chunk pages taken from the
        pins, `install_pinned_lookup`) and "vllm" (vLLM's hash-by-hash lookup)."""
        return dict(self.request_block_hasher.lookups)

    def cascade_kv_pages(self) -> dict[str, int]:
        pool = self.scheduler.kv_cache_manager.block_pool
        return {"free": pool.get_num_free_blocks(), "total": pool.num_gpu_blocks}

    def cascade_chunk_problem(self) -> str | None:
        """Why this engine cannot hold chunks (the first worker's reason), or None: asked before any
        chunk is prefilled, so that a wrong setup costs nothing."""
        problems = self.model_executor.collective_rpc(_worker_chunk_problem)
        return next((p for p in problems if p is not None), None)

    EngineCore.cascade_pin_chunk = cascade_pin_chunk
    EngineCore.cascade_chunk_problem = cascade_chunk_problem
    EngineCore.cascade_lookup_stats = cascade_lookup_stats
    EngineCore.cascade_unpin_pages = cascade_unpin_pages
    EngineCore.cascade_kv_pages = cascade_kv_pages
    # Chunk persistence (chunks/persist.py): copy pinned pages to files and back, on every worker.
    EngineCore.cascade_kv_layout = cascade_kv_layout
    EngineCore.cascade_save_pages = cascade_save_pages
    EngineCore.cascade_load_pages = cascade_load_pages


def _chunk_request(engine_core: Any, request_id: str, token_ids: list[int], refs: list) -> tuple[Any, Any, Any]:
    """(the scheduler's KV manager, a request over `token_ids` composed of `refs` with the block
    hasher's hashes, the hasher), for the chunk utilities; refuses setups whose chunk pages these
    utilities cannot name."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    hasher = engine_core.request_block_hasher
    if hasher is None:
        raise RuntimeError("chunks need prefix caching: start vLLM with enable_prefix_caching=True")
    if not isinstance(hasher, ComposedBlockHasher):
        raise RuntimeError("the engine core's block hasher is not vllm-cascade's (was the plugin loaded?)")
    manager = engine_core.scheduler.kv_cache_manager
    groups = manager.kv_cache_config.kv_cache_groups
    if len(groups) != 1 or groups[0].kv_cache_spec.block_size != hasher.block_size:
        raise RuntimeError("chunks support models with one KV-cache group, hashed per page")
    params = SamplingParams(max_tokens=1, extra_args={"cascade_chunks": [f"{c}:{n}" for c, n in refs]})
    request = Request(request_id, list(token_ids), params, None, block_hasher=hasher)
    return manager, request, hasher


def _annotate(engine_core: Any, blocks: list, valid: list[int], first_page: int) -> list[int]:
    """Tell every worker what the chunk pages `blocks` (the caller holds a reference to each) hold:
    `valid` keys each, rotated from (first_page + i) * page size on (their place in the registration
    prompt). If a worker refuses, the references are dropped before the error goes on. -> block ids."""
    ids = [block.block_id for block in blocks]
    bs = engine_core.request_block_hasher.block_size
    rot = [(first_page + i) * bs for i in range(len(ids))]
    try:
        engine_core.model_executor.collective_rpc(_worker_annotate_pages, args=(ids, list(valid), rot))
    except BaseException:
        engine_core.scheduler.kv_cache_manager.block_pool.free_blocks(blocks)
        raise
    return ids


def _worker_chunk_problem(worker: Any) -> str | None:
    from vllm_cascade.kv.chunk_pages import worker_chunk_pages

    pages = worker_chunk_pages()
    if pages is None:
        return ("chunks need the CASCADE attention backend (--attention-backend cascade): "
                "no other backend masks their page padding or shifts their positions")
    if pages.cos_sin_cache is None:
        return f"chunks cannot be composed with this model: {pages.rope_problem}"
    return None


def _worker_annotate_pages(worker: Any, block_ids: list[int], valid: list[int], rot_start: list[int]) -> None:
    from vllm_cascade.kv.chunk_pages import worker_chunk_pages

    problem = _worker_chunk_problem(worker)
    if problem is not None:
        raise RuntimeError(problem)
    worker_chunk_pages().annotate(block_ids, valid, rot_start)


def model_rope_table(head_size: int) -> tuple[Any, str | None]:
    """(the float32 cos/sin table of this process's model RoPE, None) if it is vLLM's plain neox
    `RotaryEmbedding` (a chunk key shift is then one exact rotation), else (None, why not)."""
    from vllm.model_executor.layers.rotary_embedding import _ROPE_DICT
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    ropes = [r for r in _ROPE_DICT.values() if r.head_size == head_size]
    if len(ropes) != 1:
        return None, f"{len(ropes)} RoPE tables of head size {head_size} in this process (one expected)"
    rope = ropes[0]
    if type(rope) is not RotaryEmbedding or not rope.is_neox_style:
        return None, f"its RoPE is {type(rope).__name__} (neox={rope.is_neox_style}); chunks need plain neox RoPE"
    return rope._compute_cos_sin_cache(), None  # float32, computed as vLLM computes the model's


def _worker_release_pages(worker: Any, block_ids: list[int]) -> None:
    from vllm_cascade.kv.chunk_pages import worker_chunk_pages

    pages = worker_chunk_pages()
    if pages is not None:
        pages.release(block_ids)


# Chunk persistence. The KV pages live in the workers' KV caches: `worker.model_runner.kv_caches`
# (GPUModelRunner, and CPUModelRunner which subclasses it; model runner V2 too), one tensor per
# layer, viewed [pages, KV heads, page size, 2 x head size] and addressed by the scheduler's block
# ids on dim 0 (vllm/v1/worker/utils.py allocate_kv_cache / bind_kv_cache). The engine core reaches
# the workers with `model_executor.collective_rpc(fn, args=...)`, which runs `fn(worker, *args)` on
# every rank (cloudpickled; a module-level function travels by reference). Each rank saves and loads
# its own file: `<stem>.rank<r>.kv`, a torch.save of the pages of every layer.


def _worker_kv_caches(worker: Any) -> list:
    caches = list(worker.model_runner.kv_caches)
    if not caches:
        raise RuntimeError("this worker has no KV cache tensors (model_runner.kv_caches is empty)")
    return caches


def _worker_kv_layout(worker: Any) -> dict:
    """What a saved page's bytes mean on this rank: per layer the page shape and dtype, the layout."""
    caches = _worker_kv_caches(worker)
    return {"rank": int(worker.rank), "layers": [[list(c.shape[1:]), str(c.dtype)] for c in caches],
            "kv_cache_layout": str(worker.vllm_config.cache_config.kv_cache_layout)}


def _worker_save_pages(worker: Any, block_ids: list[int], stem: str) -> dict:
    import hashlib
    import io
    import os

    import torch

    caches = _worker_kv_caches(worker)
    index = torch.tensor(block_ids, dtype=torch.long, device=caches[0].device)
    layers = [c.index_select(0, index).cpu().contiguous() for c in caches]  # logical [pages, H, N, C]
    buffer = io.BytesIO()
    torch.save({"layers": layers}, buffer)
    data = buffer.getvalue()
    path = f"{stem}.rank{int(worker.rank)}.kv"
    with open(path + ".tmp", "wb") as f:  # complete or absent: a crash mid-write leaves no file
        f.write(data)
    os.replace(path + ".tmp", path)
    return {"rank": int(worker.rank), "file": os.path.basename(path), "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data), "pages": len(block_ids)}


def _worker_load_pages(worker: Any, block_ids: list[int], stem: str, sha256: dict, first_page: int) -> None:
    """Copy saved pages [first_page, first_page + len(block_ids)) into `block_ids` of every layer,
    after checking the file's checksum and every layer's shape (nothing is written unless all fit)."""
    import hashlib
    import io

    import torch

    rank = int(worker.rank)
    path = f"{stem}.rank{rank}.kv"
    with open(path, "rb") as f:
        data = f.read()
    got = hashlib.sha256(data).hexdigest()
    if got != sha256[str(rank)]:
        raise ValueError(f"{path}: SHA-256 {got} is not the manifest's {sha256[str(rank)]} (corrupt or replaced)")
    layers = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")["layers"]
    caches = _worker_kv_caches(worker)
    n = len(block_ids)
    if len(layers) != len(caches):
        raise ValueError(f"{path}: {len(layers)} layers saved, this model has {len(caches)}")
    for i, (saved, cache) in enumerate(zip(layers, caches)):
        if saved.shape[1:] != cache.shape[1:] or saved.dtype != cache.dtype or saved.shape[0] < first_page + n:
            raise ValueError(f"{path}: layer {i} saved as {tuple(saved.shape)} {saved.dtype}, the KV cache "
                             f"pages are {tuple(cache.shape[1:])} {cache.dtype} ({first_page + n} pages needed)")
    index = torch.tensor(block_ids, dtype=torch.long, device=caches[0].device)
    for saved, cache in zip(layers, caches):
        cache.index_copy_(0, index, saved[first_page : first_page + n].to(cache.device))


def cascade_kv_layout(self) -> list[dict]:
    """Engine-core utility: every rank's KV page layout (part of a saved chunk's fingerprint)."""
    return self.model_executor.collective_rpc(_worker_kv_layout)


def cascade_save_pages(self, block_ids: list[int], stem: str) -> list[dict]:
    """Engine-core utility: every rank writes these pages of every layer to `<stem>.rank<r>.kv`.
    -> per rank {"rank", "file", "sha256", "bytes", "pages"}."""
    return self.model_executor.collective_rpc(_worker_save_pages, args=(list(block_ids), stem))


def cascade_load_pages(self, chunk_id: str, token_ids: list[int], refs: list, valid: list[int], stem: str,
                       sha256: dict) -> list[int]:
    """Engine-core utility: put a saved chunk's own pages back into vLLM's prefix cache, pinned, as
    `cascade_pin_chunk` leaves them after a prefill (hashes, annotations), without the prefill.

    `token_ids`, `refs`: the chunk's registration prompt (its parents' pages must be cached: load
    them first); the files hold its `len(valid)` own pages (`sha256`: rank (str) -> the checksum of
    that rank's file). Pages already cached are taken as they are; the others get new blocks,
    filled from the files on every rank, then entered into the prefix cache under the block
    hasher's hashes (as `KVCacheManager.cache_blocks` does after a prefill). -> their block ids."""
    manager, request, hasher = _chunk_request(self, f"cascade-load-{chunk_id}", token_ids, refs)
    pool = manager.block_pool
    first = sum(pages for _, pages in refs)
    num_full = first + len(valid)
    if num_full * hasher.block_size != len(token_ids):
        raise ValueError(f"{len(valid)} pages after {first} do not end the {len(token_ids)}-token prompt")
    hit = list(manager.coordinator.find_longest_cache_hit(request.block_hashes, len(token_ids))[0][0])
    if len(hit) < first:
        raise RuntimeError(f"the {first} pages before the saved ones are not cached ({len(hit)} are): "
                           "load the parent chunk first")
    missing = num_full - len(hit)
    if missing > pool.get_num_free_blocks():
        raise RuntimeError(f"{missing} free KV pages needed to load the chunk, {pool.get_num_free_blocks()} free")
    pool.touch(hit[first:])
    new = pool.get_new_blocks(missing) if missing else []
    own = hit[first:] + new
    # On failure nothing is cached under a hash yet: the new blocks go back as plain free blocks.
    if new:
        try:
            self.model_executor.collective_rpc(_worker_load_pages, args=(
                [b.block_id for b in new], stem, dict(sha256), len(hit) - first))
        except BaseException:
            pool.free_blocks(own)
            raise
    ids = _annotate(self, own, valid, first)
    pool.cache_full_blocks(request, hit + new, len(hit), num_full, hasher.block_size, 0)
    hasher.chunks[chunk_id] = list(request.block_hashes[first:num_full])
    hasher.blocks[chunk_id] = own
    return ids


def kv_bytes_per_token(vllm_config: Any) -> int:
    """KV cache bytes one token takes, over all layers and tensor-parallel ranks: layers x (K and V)
    x KV heads x head size x KV-cache element size, from the model and cache configs (KV heads
    replicated over ranks, when fewer than the ranks, are counted per copy, as they are stored)."""
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    dtype = kv_cache_dtype_str_to_dtype(vllm_config.cache_config.cache_dtype, model)
    heads = model.get_num_kv_heads(parallel) * parallel.tensor_parallel_size
    return model.get_total_num_hidden_layers() * 2 * heads * model.get_head_size() * dtype.itemsize


async def call_engine_core_async(engine_client: Any, method: str, *args: Any) -> Any:
    """Run an engine-core utility from the API server (`engine_client` is vLLM's AsyncLLM)."""
    return await engine_client.engine_core.call_utility_async(method, *args)


def completion_endpoint() -> tuple[Any, Any]:
    """vLLM's /v1/completions route function and its request model, which the chunk API wraps."""
    from vllm.entrypoints.openai.completion.api_router import create_completion
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return create_completion, CompletionRequest


def chat_endpoint() -> tuple[Any, Any]:
    """vLLM's /v1/chat/completions route function and its request model, which the chunk API wraps."""
    from vllm.entrypoints.openai.chat_completion.api_router import (
        create_chat_completion,
    )
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return create_chat_completion, ChatCompletionRequest


def hook_compositions(state: Any, current: ContextVar) -> None:
    """Let the chunk routes' compositions reach vLLM's serving path, on this API server's objects.

    `current.get()` is the composition of the request being served, or None; the chunk routes set
    it before calling vLLM's route, so the tasks vLLM starts for the request see it too. Two
    instance-level wrappers, no-ops for requests without a composition:
    - `state.openai_serving_chat.render_chat_request`: each rendered chat prompt becomes
      `composition.compose(token_ids)` (`None` for a prompt that is not plain token ids), i.e. the
      chunks' tokens followed by the chat template's, before vLLM sizes and schedules the request;
    - `state.engine_client.generate`: the request's outputs go through `composition.observe(output)`,
      which counts how much of the prompt the prefix cache served (vLLM's `num_cached_tokens`) and
      hands on the output without pad slots."""
    chat = getattr(state, "openai_serving_chat", None)
    if chat is not None and not getattr(chat.render_chat_request, "_cascade_wrapped", False):
        render = chat.render_chat_request

        async def render_chat_request(request: Any, *args: Any, **kwargs: Any) -> Any:
            result = await render(request, *args, **kwargs)
            composition = current.get()
            if composition is None or not isinstance(result, tuple):  # no chunks, or vLLM's ErrorResponse
                return result
            conversation, engine_inputs = result
            composed = []
            for engine_input in engine_inputs:
                plain = engine_input.get("type") == "token"
                token_ids = composition.compose(list(engine_input["prompt_token_ids"]) if plain else None)
                # The text and character offsets would describe the messages only: drop them.
                kept = {k: v for k, v in engine_input.items() if k not in ("prompt", "prompt_token_offsets")}
                composed.append({**kept, "prompt_token_ids": token_ids})
            return conversation, composed

        render_chat_request._cascade_wrapped = True  # type: ignore[attr-defined]
        chat.render_chat_request = render_chat_request

    engine = state.engine_client
    if not getattr(engine.generate, "_cascade_wrapped", False):
        generate = engine.generate

        def observed_generate(*args: Any, **kwargs: Any) -> Any:
            composition = current.get()  # read now: the stream may be consumed in another task
            stream = generate(*args, **kwargs)
            return stream if composition is None else _observed(stream, composition)

        observed_generate._cascade_wrapped = True  # type: ignore[attr-defined]
        engine.generate = observed_generate


async def _observed(stream: Any, composition: Any) -> Any:
    try:
        async for output in stream:
            yield composition.observe(output)
    finally:
        await stream.aclose()  # a client that went away aborts the request, as without the wrapper


def call_engine_core(llm: Any, method: str, *args: Any) -> Any:
    """Run an engine-core utility from the process that owns `llm` (a `vllm.LLM`)."""
    client = llm.llm_engine.engine_core
    if hasattr(client, "call_utility"):
        return client.call_utility(method, *args)
    return getattr(client.engine_core, method)(*args)  # in-process engine core
