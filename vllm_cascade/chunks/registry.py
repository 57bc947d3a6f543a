"""The chunk registry: which reusable contexts exist, and what they may keep.

Pure Python (no vLLM, no torch). A chunk is a token sequence registered once
and kept as pinned KV pages; its identity is the SHA-256 of the model
fingerprint and its token ids, so registering the same content twice returns
the same chunk. The registry owns the bookkeeping, not the pages: page ids
come from the KV manager (`attach_pages`), and every page the registry lets go
is handed to `on_free` exactly once.

Rules:
- limits: at most `max_chunks` chunks and `page_budget` pages pinned;
- when a limit would be exceeded, the least recently used chunk that no running
  request holds is evicted (`evict_lru=True`), else `RegistryFull` is raised
  and nothing changes;
- a request holds its chunks from `acquire` to `release`; deleting a held chunk
  hides it at once (unknown to new requests) and frees its pages when the last
  holder releases it.

Example:
    >>> freed = []
    >>> reg = ChunkRegistry("qwen3-tiny", page_size=4, page_budget=6, on_free=freed.extend)
    >>> a, new = reg.register(list(range(10)), kind="system")  # 2 full pages of 4, 2 tokens left over
    >>> new, a.num_pages, reg.register(list(range(10)))[1]
    (True, 2, False)
    >>> reg.attach_pages(a.chunk_id, [7, 8])
    >>> _ = reg.acquire([a.chunk_id]); _ = reg.delete(a.chunk_id); freed
    []
    >>> reg.release([a.chunk_id]); freed
    [7, 8]
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


class ChunkError(Exception):
    """Base of the registry's errors; `status` is the HTTP status that fits."""

    status = 400


class UnknownChunk(ChunkError, KeyError):
    status = 404

    def __str__(self) -> str:  # KeyError would print the repr
        return str(self.args[0])


class RegistryFull(ChunkError):
    status = 413


@dataclass
class Chunk:
    chunk_id: str  # sha256 hex of (model fingerprint, token ids)
    token_ids: tuple[int, ...]
    num_pages: int
    kind: str = "context"  # "system", "context", or any label the user gives
    label: str | None = None
    created: float = field(default_factory=time.time)
    parent: str | None = None  # the chunk whose context it was registered in (a chain)
    context_len: int = 0  # leading tokens of token_ids that are the parent chain's, not its own
    pages: list[int] = field(default_factory=list)  # physical KV pages, once prefilled
    holders: int = 0  # running requests that use it
    deleted: bool = False  # hidden; pages freed when holders reaches 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def own_token_ids(self) -> tuple[int, ...]:
        return self.token_ids[self.context_len :]


def chunk_id_for(model_fingerprint: str, token_ids: Sequence[int]) -> str:
    h = hashlib.sha256(model_fingerprint.encode())
    h.update(b"\0")
    h.update(b",".join(str(int(t)).encode() for t in token_ids))
    return h.hexdigest()


class ChunkRegistry:
    def __init__(
        self,
        model_fingerprint: str,
        page_size: int,
        page_budget: int,
        max_chunks: int = 1000,
        evict_lru: bool = True,
        on_free: Callable[[list[int]], None] = lambda pages: None,
    ) -> None:
        self.model_fingerprint = model_fingerprint
        self.page_size = page_size
        self.page_budget = page_budget
        self.max_chunks = max_chunks
        self.evict_lru = evict_lru
        self._on_free = on_free
        self._chunks: OrderedDict[str, Chunk] = OrderedDict()  # visible chunks, least recently used first
        self._dying: dict[str, Chunk] = {}  # deleted or evicted while held
        self._lock = threading.RLock()
        self.counters = {"registrations": 0, "hits": 0, "lookups": 0, "evictions": 0, "deletions": 0}

    # -- queries ---------------------------------------------------------------
    def get(self, chunk_id: str) -> Chunk:
        with self._lock:
            chunk = self._chunks.get(chunk_id)
            if chunk is None:
                raise UnknownChunk(f"unknown or deleted chunk {chunk_id!r}")
            return chunk

    def list(self) -> list[Chunk]:
        with self._lock:
            return list(self._chunks.values())

    @property
    def pages_pinned(self) -> int:
        with self._lock:
            return sum(c.num_pages for c in self._chunks.values()) + sum(c.num_pages for c in self._dying.values())

    def stats(self) -> dict:
        with self._lock:
            lookups = self.counters["lookups"]
            return {
                **self.counters,
                "chunks": len(self._chunks),
                "pages_pinned": self.pages_pinned,
                "page_budget": self.page_budget,
                "hit_rate": self.counters["hits"] / lookups if lookups else 0.0,
            }

    # -- changes ---------------------------------------------------------------
    def register(self, token_ids: Sequence[int], kind: str = "context", label: str | None = None,
                 parent: str | None = None, context_len: int = 0) -> tuple[Chunk, bool]:
        """-> (chunk, created). An existing chunk of the same content is returned, not re-made.

        `token_ids` is all the chunk's KV depends on: for a chain, the parent's tokens first
        (`context_len` of them). Its pages are the full pages of that sequence (a last partial
        page is not kept: it is computed again with each request)."""
        if not token_ids:
            raise ChunkError("a chunk needs at least one token")
        chunk_id = chunk_id_for(self.model_fingerprint, token_ids)
        with self._lock:
            self.counters["lookups"] += 1
            if chunk_id in self._dying:  # deleted while held: its pages are still there, take it back
                self._chunks[chunk_id] = self._dying.pop(chunk_id)
                self._chunks[chunk_id].deleted = False
            if chunk_id in self._chunks:
                self.counters["hits"] += 1
                self._chunks.move_to_end(chunk_id)
                return self._chunks[chunk_id], False
            num_pages = len(token_ids) // self.page_size
            self._make_room(num_pages)
            chunk = Chunk(chunk_id, tuple(int(t) for t in token_ids), num_pages, kind, label, parent=parent,
                          context_len=context_len)
            self._chunks[chunk_id] = chunk
            self.counters["registrations"] += 1
            return chunk, True

    def attach_pages(self, chunk_id: str, pages: Sequence[int]) -> None:
        """The KV pages the chunk was prefilled into (pinned until freed); at most num_pages."""
        with self._lock:
            chunk = self.get(chunk_id)
            if len(pages) > chunk.num_pages:
                raise ChunkError(f"chunk {chunk_id} has {chunk.num_pages} pages, got {len(pages)}")
            chunk.pages = list(pages)

    def acquire(self, chunk_ids: Sequence[str]) -> list[Chunk]:
        """A request starts using these chunks (all or none)."""
        with self._lock:
            self.counters["lookups"] += len(chunk_ids)
            chunks = [self.get(c) for c in chunk_ids]
            for chunk in chunks:
                chunk.holders += 1
                self._chunks.move_to_end(chunk.chunk_id)
            self.counters["hits"] += len(chunks)
            return chunks

    def release(self, chunk_ids: Sequence[str]) -> None:
        with self._lock:
            for chunk_id in chunk_ids:
                chunk = self._chunks.get(chunk_id) or self._dying[chunk_id]
                chunk.holders -= 1
                if chunk.deleted and chunk.holders == 0:
                    self._free(self._dying.pop(chunk_id))

    def delete(self, chunk_id: str) -> Chunk:
        with self._lock:
            chunk = self.get(chunk_id)
            self._remove(chunk)
            self.counters["deletions"] += 1
            return chunk

    # -- internals -------------------------------------------------------------
    def _make_room(self, num_pages: int) -> None:
        if num_pages > self.page_budget:
            raise RegistryFull(f"a chunk of {num_pages} pages exceeds the chunk page budget ({self.page_budget})")

        def fits() -> bool:
            return len(self._chunks) < self.max_chunks and self.pages_pinned + num_pages <= self.page_budget

        if fits():
            return
        idle = [c for c in self._chunks.values() if c.holders == 0]  # least recently used first
        if self.evict_lru:
            # Evict only if enough idle chunks exist: a failed registration changes nothing.
            need_pages = self.pages_pinned + num_pages - self.page_budget
            need_chunks = len(self._chunks) + 1 - self.max_chunks
            victims, pages = [], 0
            for chunk in idle:
                if pages >= need_pages and len(victims) >= need_chunks:
                    break
                victims.append(chunk)
                pages += chunk.num_pages
            if pages >= need_pages and len(victims) >= need_chunks:
                for chunk in victims:
                    self._remove(chunk)
                    self.counters["evictions"] += 1
                return
        held = len(self._chunks) - len(idle)
        raise RegistryFull(
            f"chunk registry full: {len(self._chunks)}/{self.max_chunks} chunks, {self.pages_pinned}/"
            f"{self.page_budget} pages pinned, {num_pages} more needed; {held} chunks are held by running requests"
            + ("" if self.evict_lru else "; LRU eviction is off")
        )

    def _remove(self, chunk: Chunk) -> None:
        del self._chunks[chunk.chunk_id]
        chunk.deleted = True
        if chunk.holders:
            self._dying[chunk.chunk_id] = chunk
        else:
            self._free(chunk)

    def _free(self, chunk: Chunk) -> None:
        if chunk.pages:
            self._on_free(list(chunk.pages))
            chunk.pages = []
