"""Chunk files: a registered chunk's KV pages on disk, reloaded by the next engine without prefill.

With the setting `chunk_persistence_dir` (or `ChunkStore(llm, persistence_dir=...)`), every chunk
the store registers is saved there and every chunk deleted or evicted is removed from there, so
the directory mirrors the registry. A new engine's ChunkStore reloads the directory: the pages go
back into vLLM's prefix cache under their block hashes, pinned, and nothing is prefilled.

Files, per chunk (`<id>` is the chunk id):
- `<id>.rank<r>.kv`: written by tensor-parallel rank r, a torch.save of its KV pages of every
  layer (the chunk's own full pages, [pages, KV heads, page size, 2 x head size] each);
- `<id>.json`, the manifest, written last (its presence means the pages are complete): the
  chunk (token ids, parent, kind, label), the fingerprint of what the pages' bytes mean (model,
  revision, dtype, KV dtype, page size, parallel sizes, attention backend, every rank's page
  shapes and layout, plugin and vLLM versions) and each rank file's SHA-256.

On reload a manifest of another model (another registry fingerprint) is left alone: its chunk
ids are another model's. A file whose fingerprint differs in anything else, or whose checksum
does not match, is rejected with a logged reason and the chunk is computed again (and saved
anew). A manifest that cannot be read, or whose parent is not registered, is logged and left.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from vllm_cascade.chunks.registry import (
    Chunk,
    ChunkRegistry,
    UnknownChunk,
    chunk_id_for,
)

logger = logging.getLogger(__name__)

FORMAT = 1  # of the manifest and the rank files


def fingerprint(vllm_config: Any, registry_fingerprint: str, kv_layout: list[dict]) -> dict:
    """What a saved page's bytes depend on, besides the chunk's tokens."""
    import vllm

    import vllm_cascade

    model, cache, parallel = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    backend = vllm_config.attention_config.backend
    return {
        "format": FORMAT,
        "registry": registry_fingerprint,  # model|dtype|page size: also names the chunk ids
        "model": str(model.model),
        "revision": model.revision,
        "dtype": str(model.dtype),
        "kv_cache_dtype": str(cache.cache_dtype),
        "block_size": int(cache.block_size),
        "tensor_parallel_size": int(parallel.tensor_parallel_size),
        "pipeline_parallel_size": int(parallel.pipeline_parallel_size),
        "attention_backend": backend.name if backend is not None else None,
        "kv_layout": sorted(kv_layout, key=lambda r: r["rank"]),
        "plugin_version": vllm_cascade.__version__,
        "vllm_version": vllm.__version__,
    }


@dataclass(frozen=True)
class SavedChunk:
    """A manifest that belongs to this model; `problem` says why its pages cannot be loaded."""

    chunk_id: str
    token_ids: list[int]
    context_len: int
    context_pages: int
    parent: str | None
    kind: str
    label: str | None
    num_pages: int  # pages in the rank files: the chunk's own pages (the last one padded)
    sha256: dict[str, str]  # rank -> SHA-256 of its file
    problem: str | None


class ChunkFiles:
    """One directory of chunk files for one engine's fingerprint."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict) -> None:
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as a manifest reads back (lists, not tuples)

    def stem(self, chunk_id: str) -> str:
        return os.path.join(self.directory, chunk_id)

    def write_manifest(self, chunk: Chunk, rank_files: list[dict]) -> None:
        """After every rank wrote its file (`rank_files`: what cascade_save_pages returned)."""
        manifest = {
            "chunk_id": chunk.chunk_id, "token_ids": list(chunk.token_ids), "context_len": chunk.context_len,
            "context_pages": chunk.context_pages, "parent": chunk.parent, "kind": chunk.kind, "label": chunk.label,
            "num_pages": rank_files[0]["pages"], "fingerprint": self.fingerprint,
            "files": {str(f["rank"]): {"file": f["file"], "sha256": f["sha256"], "bytes": f["bytes"]}
                      for f in rank_files},
        }
        path = self.stem(chunk.chunk_id) + ".json"
        with open(path + ".tmp", "w") as f:
            json.dump(manifest, f)
        os.replace(path + ".tmp", path)

    def remove(self, chunk_id: str) -> None:
        """The manifest first: rank files without one are never loaded."""
        stem = self.stem(chunk_id)
        names = [stem + ".json"] + sorted(
            os.path.join(self.directory, n) for n in os.listdir(self.directory)
            if n.startswith(chunk_id + ".rank") and n.endswith(".kv"))
        for name in names:
            try:
                os.remove(name)
            except FileNotFoundError:
                pass

    def scan(self) -> Iterator[SavedChunk]:
        """This model's saved chunks, parents before children (a parent's sequence is shorter)."""
        found = []
        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.directory, name)
            try:
                with open(path) as f:
                    manifest = json.load(f)
                saved = self._check(manifest, name[: -len(".json")])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.error("chunk file %s cannot be read (%s: %s); left as it is", path, type(exc).__name__, exc)
                continue
            if saved is not None:
                found.append(saved)
        yield from sorted(found, key=lambda s: len(s.token_ids))

    def _check(self, manifest: dict, chunk_id: str) -> SavedChunk | None:
        """None for another model's manifest; raises ValueError for a manifest that contradicts itself."""
        theirs = manifest["fingerprint"]
        if theirs.get("registry") != self.fingerprint["registry"]:
            logger.info("chunk file %s.json is another model's (%s); not loaded", chunk_id, theirs.get("registry"))
            return None
        tokens = [int(t) for t in manifest["token_ids"]]
        if manifest["chunk_id"] != chunk_id or chunk_id_for(self.fingerprint["registry"], tokens) != chunk_id:
            raise ValueError("its chunk id is not the SHA-256 of its model and token ids")
        problem = None
        differs = sorted(k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k))
        if differs:
            problem = "fingerprint differs in " + ", ".join(
                f"{k} (saved {theirs.get(k)!r}, now {self.fingerprint.get(k)!r})" for k in differs)
        sha = {rank: entry["sha256"] for rank, entry in manifest["files"].items()}
        if problem is None:
            problem = self._checksum_problem(manifest["files"])
        return SavedChunk(chunk_id, tokens, int(manifest["context_len"]), int(manifest["context_pages"]),
                          manifest["parent"], manifest["kind"], manifest["label"], int(manifest["num_pages"]),
                          sha, problem)

    def _checksum_problem(self, files: dict) -> str | None:
        ranks = {str(r["rank"]) for r in self.fingerprint["kv_layout"]}
        if set(files) != ranks:
            return f"files of ranks {sorted(files)}, this engine has ranks {sorted(ranks)}"
        for rank, entry in sorted(files.items()):
            path = os.path.join(self.directory, entry["file"])
            try:
                with open(path, "rb") as f:
                    got = hashlib.sha256(f.read()).hexdigest()
            except OSError as exc:
                return f"{path}: {exc}"
            if got != entry["sha256"]:
                return f"{path}: SHA-256 {got} is not the manifest's {entry['sha256']} (corrupt or replaced)"
        return None


class ChunkPersistence:
    """Keeps a chunk directory in step with a registry: saves what is registered, removes what
    the registry lets go, reloads the directory. The one way to do it, for `ChunkStore` (on a
    `vllm.LLM`) and the HTTP `ChunkService` alike.

    `call_engine_core(method, *args)` runs an engine-core utility and waits for its result;
    `register_chunks(specs)` computes chunks (prefill and pin) whose files were rejected. Both
    block, so the server runs these methods in a worker thread. `counters` is the caller's
    stats dict (`saved_chunks`, `reloaded_chunks`, `reloaded_chunk_tokens`, `rejected_chunk_files`).
    """

    def __init__(self, files: ChunkFiles, registry: ChunkRegistry, counters: dict,
                 call_engine_core: Callable[..., Any], register_chunks: Callable[[list], Any]) -> None:
        self.files, self.registry, self.counters = files, registry, counters
        self.call_engine_core, self.register_chunks = call_engine_core, register_chunks
        self._loading: set[str] = set()  # chunks whose files a failed load must not remove

    def save(self, chunk: Chunk) -> None:
        """Write a registered chunk's pinned pages and manifest. A failure is logged, not raised:
        the chunk stays registered, only the next engine will compute it again."""
        try:
            rank_files = self.call_engine_core("cascade_save_pages", list(chunk.pages), self.files.stem(chunk.chunk_id))
            self.files.write_manifest(chunk, rank_files)
            self.counters["saved_chunks"] += 1
        except Exception as exc:  # disk full, permissions, ...
            logger.error("chunk %s: saving its KV to %s failed (%s: %s); it stays registered, but the next "
                         "engine computes it again", chunk.chunk_id, self.files.directory, type(exc).__name__, exc)
        if chunk.deleted:  # evicted while its files were written: they go too
            self.files.remove(chunk.chunk_id)

    def forget(self, chunk: Chunk) -> None:
        """The registry let a chunk go (deleted or evicted): so do its files."""
        if chunk.chunk_id not in self._loading:
            self.files.remove(chunk.chunk_id)

    def reload(self) -> None:
        """Register the saved chunks, parents first: their pages from the files (no prefill), or,
        for files rejected (fingerprint, checksum, a failed load), computed again and saved anew."""
        from vllm_cascade.chunks.store import (
            ChunkSpec,  # store.py builds on this module
        )

        for saved in self.files.scan():
            if saved.parent is not None:
                try:
                    parent = self.registry.get(saved.parent)
                except UnknownChunk:
                    logger.error("chunk file %s.json: its parent %s is not registered (its file missing or "
                                 "unreadable); not loaded, left as it is", saved.chunk_id, saved.parent)
                    continue
                if list(parent.token_ids) != saved.token_ids[: saved.context_len]:
                    logger.error("chunk file %s.json: its context is not its parent's tokens; not loaded, left "
                                 "as it is", saved.chunk_id)
                    continue
            problem = saved.problem or self._load(saved)
            if problem is None:
                continue
            self.counters["rejected_chunk_files"] += 1
            logger.warning("chunk %s: saved KV rejected (%s); computing it again", saved.chunk_id, problem)
            self._loading.add(saved.chunk_id)  # a failed computation keeps the files as they are
            try:
                self.register_chunks([ChunkSpec(token_ids=saved.token_ids[saved.context_len :], kind=saved.kind,
                                                label=saved.label, parent=saved.parent)])
            except Exception as exc:
                logger.error("chunk %s: computing it again failed (%s: %s); not registered, its files left as "
                             "they are", saved.chunk_id, type(exc).__name__, exc)
            finally:
                self._loading.discard(saved.chunk_id)

    def _load(self, saved: SavedChunk) -> str | None:
        """Put one saved chunk's pages back, pinned. -> None, or why it could not be."""
        chunk, created = self.registry.register(saved.token_ids, saved.kind, saved.label, saved.parent,
                                                saved.context_len)
        if not created:
            return None
        from vllm_cascade.chunks.store import registration

        self._loading.add(chunk.chunk_id)
        try:
            if saved.num_pages != chunk.num_pages:
                raise ValueError(f"{saved.num_pages} pages saved, the chunk has {chunk.num_pages} (another layout)")
            prompt, valid = registration(self.registry, chunk, sys.maxsize)
            pages = self.call_engine_core("cascade_load_pages", chunk.chunk_id, prompt.token_ids, prompt.refs, valid,
                                          self.files.stem(saved.chunk_id), saved.sha256)
            self.registry.attach_pages(chunk.chunk_id, pages)
        except Exception as exc:  # the engine refused (a worker's check, no free pages, ...)
            if not chunk.deleted:
                self.registry.delete(chunk.chunk_id)
            return f"loading failed: {exc}"
        finally:
            self._loading.discard(chunk.chunk_id)
        self.counters["reloaded_chunks"] += 1
        self.counters["reloaded_chunk_tokens"] += chunk.num_tokens - chunk.context_len
        return None
