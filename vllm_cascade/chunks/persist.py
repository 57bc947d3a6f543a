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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vllm_cascade.chunks.registry import Chunk, chunk_id_for

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
    num_pages: int  # pages in the rank files: the chunk's own full pages from context_pages on
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
