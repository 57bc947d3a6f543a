"""Chunks on a running `vllm.LLM`: register once, compose into requests, delete.

    from vllm import LLM, SamplingParams
    from vllm_cascade.chunks.store import ChunkStore

    llm = LLM(model=..., attention_backend="cascade", enable_prefix_caching=True)
    store = ChunkStore(llm)
    system = store.register_chunk(text="You are a careful assistant.", kind="system")
    doc = store.register_chunk(text=document, parent=system.chunk_id)   # a chain: doc read after system
    outs = store.generate([{"chunks": [system.chunk_id, doc.chunk_id], "tail": "Q: ...?"}],
                          SamplingParams(max_tokens=64))
    store.delete_chunk(doc.chunk_id)   # its pages go back to vLLM

What happens today:
- `register_chunk` tokenizes once, names the chunk by SHA-256 (registering the
  same content again returns the same chunk), prefills it through vLLM's own
  scheduling (one token of output, batched with other registrations) onto
  whole pages of its own (the last one padded), then pins them in the engine
  core's KV manager (one more reference each: never evicted, never reused for
  other data) until the chunk is deleted or evicted (LRU, chunks no running
  request holds, within `page_budget` pages, by default half of the KV cache:
  settings `chunk_page_ratio`, `max_chunks`, `chunk_evict_lru`).
  A chain's chunk pins only its own pages; a parent with children is neither
  evicted nor deleted (ChunkInUse, 409) unless deleted with `cascade=True`.
- A composition names chunks in any order: its prompt is `[A|pad][B|pad][tail]`
  (chunks/layout.py), the chunks' stored token ids, never tokenized again.
  The engine core gives the chunk pages the block hashes they were cached
  under, so vLLM's prefix cache serves them at any offset and only the tail is
  computed; the CASCADE backend masks the pads and shifts each chunk's keys to
  its true position (kv/chunk_pages.py). One chunk + tail and chains are exact
  (as generating the same text); chunks registered independently are exact in
  position but never attended each other (the measured cost is in
  benchmarks/RESULTS.md). Compositions need `attention_backend="cascade"`.
- With a persistence directory (setting `chunk_persistence_dir`), chunks' KV
  is saved on registration and reloaded by the next engine's store without
  prefill (chunks/persist.py).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vllm_cascade import vllm_compat
from vllm_cascade.chunks.layout import (
    ChunkRef,
    ComposedPrompt,
    CompositionTooLong,
    compose_prompt,
    registration_prompt,
)
from vllm_cascade.chunks.persist import ChunkFiles, ChunkPersistence, fingerprint
from vllm_cascade.chunks.registry import Chunk, ChunkError, ChunkRegistry

logger = logging.getLogger(__name__)

class ChunkConflict(ChunkError):
    """The chunk changed state under the request (e.g. deleted or evicted while being registered)."""

    status = 409


class ChunksUnavailable(ChunkError):
    """This engine cannot hold chunks (not the CASCADE backend, or a RoPE chunks cannot shift)."""

    status = 501


@dataclass(frozen=True)
class ChunkSpec:
    """One chunk to register: text (tokenized here, once) or token ids."""

    text: str | None = None
    token_ids: Sequence[int] | None = None
    kind: str = "context"
    label: str | None = None
    parent: str | None = None  # register in the context of this chunk (its chain first)


def make_registry(vllm_config: Any, total_pages: int, on_free: Callable[[list[int]], None],
                  page_budget: int | None = None, max_chunks: int | None = None, evict_lru: bool | None = None,
                  on_remove: Callable[[Chunk], None] = lambda chunk: None) -> ChunkRegistry:
    """The registry of one vLLM engine: chunk ids fingerprinted by model, dtype and page size. Limits
    left None come from the settings: `chunk_page_ratio` of the engine's `total_pages`, `max_chunks`,
    `chunk_evict_lru`."""
    from vllm_cascade.config import CascadeConfig

    settings = CascadeConfig.from_vllm(vllm_config)
    model, block_size = vllm_config.model_config, vllm_config.cache_config.block_size
    budget = page_budget if page_budget is not None else int(total_pages * settings.chunk_page_ratio)
    return ChunkRegistry(f"{model.model}|{model.dtype}|{block_size}", block_size, budget,
                         settings.max_chunks if max_chunks is None else max_chunks,
                         settings.chunk_evict_lru if evict_lru is None else evict_lru,
                         on_free=on_free, on_remove=on_remove)


def register_spec(registry: ChunkRegistry, spec: ChunkSpec, own: list[int], max_model_len: int) -> tuple[Chunk, bool]:
    """Registry side of registering `spec` (its own tokens given): -> (chunk, created)."""
    parent = registry.get(spec.parent) if spec.parent else None
    context = list(parent.token_ids) if parent else []
    page = registry.page_size
    slots = ((parent.context_pages + parent.num_pages) * page if parent else 0) + -(-len(own) // page) * page
    if slots >= max_model_len:
        raise CompositionTooLong(f"chunk of {len(context) + len(own)} tokens ({slots} with each chunk's page "
                                 f"padding) does not fit the model's context ({max_model_len})")
    return registry.register(context + own, spec.kind, spec.label, spec.parent, len(context))


def chunk_refs(chunks: Sequence[Chunk]) -> list[ChunkRef]:
    return [ChunkRef(c.chunk_id, c.own_token_ids, c.num_pages) for c in chunks]


def registration(registry: ChunkRegistry, chunk: Chunk, max_model_len: int) -> tuple[ComposedPrompt, list[int]]:
    """-> (the prompt that prefills `chunk` onto its own pages, its chain composed before it; the
    keys each of those pages holds). Pin with `cascade_pin_chunk(chunk_id, prompt.token_ids,
    prompt.refs, valid)` once vLLM ran the prompt with `prompt.extra_args`."""
    prompt = registration_prompt(chunk_refs(registry.chain(chunk.chunk_id)), registry.page_size, max_model_len)
    n, page = len(chunk.own_token_ids), registry.page_size
    return prompt, [min(page, n - i * page) for i in range(chunk.num_pages)]


def composition_prompt(chunks: Sequence[Chunk], tail: list[int], page_size: int, max_model_len: int) -> ComposedPrompt:
    """The prompt of chunks (their stored token ids, never tokenized again) in this order, then the tail."""
    return compose_prompt(chunk_refs(chunks), tail, page_size, max_model_len)


def with_composition(sampling_params: Any, prompt: ComposedPrompt) -> Any:
    """A copy of vLLM `sampling_params` (None: defaults) that carries the composition to the engine core."""
    from vllm import SamplingParams

    # Shallow: only extra_args is replaced, and vLLM deep-copies each request's params itself
    # (a clone here too cost 18 us per request on the dev machine).
    params = copy.copy(sampling_params or SamplingParams())
    params.extra_args = {**(params.extra_args or {}), **prompt.extra_args}
    return params


def count_composition(counters: dict[str, int], prompt: ComposedPrompt, num_cached_tokens: int | None) -> None:
    """Account one composed request that vLLM prefilled: its chunk tokens, and how many of them the
    prefix cache served (vLLM's `num_cached_tokens`, which counts prompt slots from the start, pads
    included; pads are not counted as tokens here)."""
    counters["compositions"] += 1
    counters["chunk_tokens"] += prompt.chunk_tokens
    counters["reused_tokens"] += min(prompt.real_tokens(num_cached_tokens or 0), prompt.chunk_tokens)


def present_output(output: Any, prompt: ComposedPrompt) -> Any:
    """A composed request's vLLM output as its user sees it, in place: the prompt's token ids and
    prompt logprobs without the pad slots, and `num_cached_tokens` counting real tokens (so that the
    API's `usage.prompt_tokens` and cached tokens count the composition's tokens, pads aside).
    Count the composition (`count_composition`, which takes vLLM's slots) before."""
    if getattr(output, "_cascade_presented", False):  # a stream may hand the same object on again
        return output
    if output.prompt_token_ids is not None:
        output.prompt_token_ids = prompt.without_pads(output.prompt_token_ids)
    if getattr(output, "prompt_logprobs", None) is not None:
        output.prompt_logprobs = prompt.without_pads(output.prompt_logprobs)
    if output.num_cached_tokens is not None:
        output.num_cached_tokens = prompt.real_tokens(output.num_cached_tokens)
    output._cascade_presented = True
    return output


def new_counters() -> dict[str, int]:
    """What a chunk front end (ChunkStore, the HTTP ChunkService) measures, from zero."""
    return dict.fromkeys(("compositions", "chunk_tokens", "reused_tokens", "prefilled_chunk_tokens", "saved_chunks",
                          "reloaded_chunks", "reloaded_chunk_tokens", "rejected_chunk_files"), 0)


def chunk_stats(registry: ChunkRegistry, counters: dict[str, int]) -> dict:
    """Registry counters and pages, the front end's counters, and the share of composed chunk
    tokens that were reused rather than computed again."""
    rate = counters["reused_tokens"] / counters["chunk_tokens"] if counters["chunk_tokens"] else 0.0
    return {**registry.stats(), **counters, "chunk_reuse_rate": rate}


def encode_text(tokenizer: Any, text: str | None) -> list[int]:
    """A chunk's or a tail's text as token ids (no special tokens: the text goes inside a prompt)."""
    if text is None:
        raise ChunkError("give a chunk's text or its token ids")
    return list(tokenizer.encode(text, add_special_tokens=False))


def chunk_json(chunk: Chunk) -> dict:
    """What the HTTP API shows of a chunk."""
    return {"id": chunk.chunk_id, "object": "chunk", "kind": chunk.kind, "label": chunk.label,
            "parent": chunk.parent, "num_tokens": len(chunk.own_token_ids), "context_tokens": chunk.context_len,
            "num_pages": chunk.num_pages, "pinned_pages": len(chunk.pages), "holders": chunk.holders,
            "created": int(chunk.created)}


class ChunkStore:
    def __init__(self, llm: Any, page_budget: int | None = None, max_chunks: int | None = None,
                 evict_lru: bool | None = None, persistence_dir: str | os.PathLike | None = None) -> None:
        """`page_budget` (pages), `max_chunks`, `evict_lru`: the registry's limits (default: the
        settings `chunk_page_ratio`, `max_chunks`, `chunk_evict_lru`). `persistence_dir` (default: the
        `chunk_persistence_dir` setting; "" for none): chunks' KV is saved there and reloaded from
        there now, without prefill (chunks/persist.py)."""
        config = llm.llm_engine.vllm_config
        if not config.cache_config.enable_prefix_caching:
            raise ChunkError("chunks need prefix caching: create the LLM with enable_prefix_caching=True")
        problem = vllm_compat.call_engine_core(llm, "cascade_chunk_problem")
        if problem is not None:
            raise ChunksUnavailable(problem)
        self.llm = llm
        self.max_model_len = config.model_config.max_model_len
        self.registry = make_registry(config, self.kv_pages()["total"], self._unpin, page_budget, max_chunks,
                                      evict_lru, on_remove=self._forget)
        self.counters = new_counters()
        if persistence_dir is None:
            from vllm_cascade.config import CascadeConfig

            persistence_dir = CascadeConfig.from_vllm(config).chunk_persistence_dir
        self.persistence: ChunkPersistence | None = None
        if persistence_dir:
            layout = vllm_compat.call_engine_core(llm, "cascade_kv_layout")
            files = ChunkFiles(persistence_dir, fingerprint(config, self.registry.model_fingerprint, layout))
            self.persistence = ChunkPersistence(
                files, self.registry, self.counters, lambda method, *args: vllm_compat.call_engine_core(
                    llm, method, *args), lambda specs: self.register_chunks(specs, use_tqdm=False))
            self.persistence.reload()

    # -- chunks ------------------------------------------------------------------------------------

    def register_chunk(self, text: str | None = None, token_ids: Sequence[int] | None = None, kind: str = "context",
                       label: str | None = None, parent: str | None = None) -> Chunk:
        return self.register_chunks([ChunkSpec(text, token_ids, kind, label, parent)])[0]

    def register_chunks(self, specs: Sequence[ChunkSpec], use_tqdm: bool = True) -> list[Chunk]:
        """Register many chunks; the new ones are prefilled in batches (with a progress bar): each
        batch the chunks whose parents are done."""
        from vllm import SamplingParams

        chunks, created = [], []
        try:
            for spec in specs:
                chunk, new = register_spec(self.registry, spec, self._tokens(spec.text, spec.token_ids),
                                           self.max_model_len)
                chunks.append(chunk)
                if new:
                    created.append(chunk)
            todo = list(created)
            while todo:
                ready = [c for c in todo if not any(p.chunk_id == c.parent for p in todo)]
                regs = [registration(self.registry, c, self.max_model_len) for c in ready]
                params = [with_composition(SamplingParams(max_tokens=1, temperature=0.0), p) for p, _ in regs]
                self.llm.generate([{"prompt_token_ids": p.token_ids} for p, _ in regs], params, use_tqdm=use_tqdm)
                for chunk, (prompt, valid) in zip(ready, regs):
                    pages = vllm_compat.call_engine_core(self.llm, "cascade_pin_chunk", chunk.chunk_id,
                                                         prompt.token_ids, prompt.refs, valid)
                    self.registry.attach_pages(chunk.chunk_id, pages)
                    self.counters["prefilled_chunk_tokens"] += len(chunk.own_token_ids)
                todo = [c for c in todo if c not in ready]
            for chunk in created:
                if self.persistence is not None:
                    self.persistence.save(chunk)
        except BaseException:
            for chunk in reversed(created):  # a failed registration keeps nothing (children before parents)
                if not chunk.deleted:
                    self.registry.delete(chunk.chunk_id)
            raise
        return chunks

    def get_chunk(self, chunk_id: str) -> Chunk:
        return self.registry.get(chunk_id)

    def list_chunks(self) -> list[Chunk]:
        return self.registry.list()

    def delete_chunk(self, chunk_id: str, cascade: bool = False) -> Chunk:
        """Hidden at once; its pages go back to vLLM when no running request holds it. A chunk that
        others were registered on (`parent=`) raises ChunkInUse (409), unless `cascade` deletes
        them with it."""
        return self.registry.delete(chunk_id, cascade)

    # -- requests ----------------------------------------------------------------------------------

    def generate(self, compositions: Sequence[dict], sampling_params: Any = None, use_tqdm: bool = False) -> list:
        """`compositions`: [{"chunks": [chunk ids, in any order], "tail": text or token ids}, ...] -> RequestOutputs.

        The chunks are held while the requests run (deleting one meanwhile is safe)."""
        held: list[list[str]] = []
        prompts: list[ComposedPrompt] = []
        try:
            for comp in compositions:
                ids = list(comp.get("chunks", []))
                chunks = self.registry.acquire(ids)
                held.append(ids)
                tail = comp.get("tail", "")
                tail_ids = self._tokens(tail, None) if isinstance(tail, str) else [int(t) for t in tail]
                prompts.append(composition_prompt(chunks, tail_ids, self.registry.page_size, self.max_model_len))
            outputs = self.llm.generate([{"prompt_token_ids": p.token_ids} for p in prompts],
                                        [with_composition(sampling_params, p) for p in prompts], use_tqdm=use_tqdm)
        finally:
            for ids in held:
                self.registry.release(ids)
        for out, prompt in zip(outputs, prompts):
            count_composition(self.counters, prompt, out.num_cached_tokens)
            present_output(out, prompt)
        return outputs

    # -- state -------------------------------------------------------------------------------------

    def kv_pages(self) -> dict[str, int]:
        """The engine's KV pages: {"free": ..., "total": ...} (free counts cached pages nobody holds)."""
        return vllm_compat.call_engine_core(self.llm, "cascade_kv_pages")

    def stats(self) -> dict:
        """Registry counters and pages, plus how many chunk tokens compositions reused (measured from
        vLLM's cached-token counts) rather than computed."""
        return chunk_stats(self.registry, self.counters)

    def _tokens(self, text: str | None, token_ids: Sequence[int] | None) -> list[int]:
        if token_ids is not None:
            return [int(t) for t in token_ids]
        return encode_text(self.llm.get_tokenizer(), text)

    def _unpin(self, pages: list[int]) -> None:
        vllm_compat.call_engine_core(self.llm, "cascade_unpin_pages", pages)

    def _forget(self, chunk: Chunk) -> None:
        if self.persistence is not None:
            self.persistence.forget(chunk)
