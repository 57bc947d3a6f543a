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
  holder releases it;
- a chunk pins its own tokens' pages, the last one padded (chunks/layout.py);
  a chain (a chunk registered with `parent=`) pins and counts only those: the
  chain's pages are the parent's, pinned once, by the parent. So a parent lives as long as it has
  children: deleting it raises `ChunkInUse` (409, as `docker rmi` refuses an
  image with dependent child images) unless `cascade=True` deletes its
  descendants too, and eviction picks only leaves (chunks without children).

Example:
    >>> freed = []
    >>> reg = ChunkRegistry("qwen3-tiny", page_size=4, page_budget=6, on_free=freed.extend)
    >>> a, new = reg.register(list(range(10)), kind="system")  # pages of 4: 4 + 4 + 2 (and 2 pads)
    >>> new, a.num_pages, reg.register(list(range(10)))[1]
    (True, 3, False)
    >>> reg.attach_pages(a.chunk_id, [7, 8, 9])
    >>> _ = reg.acquire([a.chunk_id]); _ = reg.delete(a.chunk_id); freed
    []
    >>> reg.release([a.chunk_id]); freed
    [7, 8, 9]
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


class ChunkInUse(ChunkError):
    """Deleting a chunk that other chunks were registered on (their KV needs its pages)."""

    status = 409


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
    context_pages: int = 0  # the parent chain's pages (each chunk's padded): pinned by the chain, not by this chunk
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
        on_remove: Callable[[Chunk], None] = lambda chunk: None,
    ) -> None:
        self.model_fingerprint = model_fingerprint
        self.page_size = page_size
        self.page_budget = page_budget
        self.max_chunks = max_chunks
        self.evict_lru = evict_lru
        self._on_free = on_free
        self._on_remove = on_remove  # a chunk was deleted or evicted (hidden; its pages may still be held)
        self._chunks: OrderedDict[str, Chunk] = OrderedDict()  # visible chunks, least recently used first
        self._dying: dict[str, Chunk] = {}  # deleted or evicted while held
        self._children: dict[str, set[str]] = {}  # visible chunk -> its visible children
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

    def children(self, chunk_id: str) -> list[str]:
        """Visible chunks registered with `parent=chunk_id`."""
        with self._lock:
            return sorted(self._children.get(chunk_id, ()))

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
        (`context_len` of them). It pins its own tokens' pages, the last one padded (chunks/layout.py)."""
        if len(token_ids) <= context_len:
            raise ChunkError("a chunk needs at least one token of its own")
        chunk_id = chunk_id_for(self.model_fingerprint, token_ids)
        with self._lock:
            if parent is not None:
                parent_chunk = self.get(parent)  # 404 if it went meanwhile
                if context_len != parent_chunk.num_tokens:
                    raise ChunkError(f"context_len {context_len} is not the parent's {parent_chunk.num_tokens} tokens")
                self._chunks.move_to_end(parent)  # used now: the least likely to be evicted
            self.counters["lookups"] += 1
            if chunk_id in self._dying:  # deleted while held: its pages are still there, take it back
                was_parent = self._dying[chunk_id].parent
                if was_parent is not None and was_parent not in self._chunks:
                    raise UnknownChunk(f"chunk {chunk_id} was registered on {was_parent!r}, which is deleted; "
                                       "register the parent again first")
                self._chunks[chunk_id] = self._dying.pop(chunk_id)
                self._chunks[chunk_id].deleted = False
                self._link(self._chunks[chunk_id])
            if chunk_id in self._chunks:
                self.counters["hits"] += 1
                self._chunks.move_to_end(chunk_id)
                return self._chunks[chunk_id], False
            # Every chunk's own tokens fill whole pages of their own (the last one padded).
            context_pages = parent_chunk.context_pages + parent_chunk.num_pages if parent is not None else 0
            num_pages = -(-(len(token_ids) - context_len) // self.page_size)
            self._make_room(num_pages, keep=parent)
            chunk = Chunk(chunk_id, tuple(int(t) for t in token_ids), num_pages, kind, label, parent=parent,
                          context_len=context_len, context_pages=context_pages)
            self._chunks[chunk_id] = chunk
            self._link(chunk)
            self.counters["registrations"] += 1
            return chunk, True

    def attach_pages(self, chunk_id: str, pages: Sequence[int]) -> None:
        """The chunk's own pinned KV pages (what `cascade_pin_chunk` returns), num_pages of them."""
        with self._lock:
            chunk = self.get(chunk_id)
            if len(pages) != chunk.num_pages:
                raise ChunkError(f"chunk {chunk_id} has {chunk.num_pages} pages, got {len(pages)}")
            chunk.pages = list(pages)

    def chain(self, chunk_id: str) -> list[Chunk]:
        """The chunk's parents, root first, then the chunk (a visible chunk's parents are visible)."""
        with self._lock:
            chain = [self._chunks.get(chunk_id) or self._dying[chunk_id]]
            while chain[-1].parent is not None:
                chain.append(self._chunks[chain[-1].parent])
            return chain[::-1]

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

    def delete(self, chunk_id: str, cascade: bool = False) -> Chunk:
        """Hide the chunk (pages freed once no request holds it). A chunk with children is refused
        (`ChunkInUse`), unless `cascade`: then its descendants go too, leaves first."""
        with self._lock:
            chunk = self.get(chunk_id)
            doomed = self._descendants(chunk_id)
            if doomed and not cascade:
                raise ChunkInUse(f"chunk {chunk_id} has {len(self._children[chunk_id])} child chunk(s) registered "
                                 f"on it ({', '.join(self.children(chunk_id))}); delete them first, or delete "
                                 "with cascade")
            for victim in [*reversed(doomed), chunk]:
                self._remove(victim)
                self.counters["deletions"] += 1
            return chunk

    # -- internals -------------------------------------------------------------
    def _make_room(self, num_pages: int, keep: str | None = None) -> None:
        """Evict idle leaf chunks (LRU first; never `keep`, the parent being registered on) until
        `num_pages` more fit, or raise RegistryFull having changed nothing."""
        if num_pages > self.page_budget:
            raise RegistryFull(f"a chunk of {num_pages} pages exceeds the chunk page budget ({self.page_budget})")

        def fits() -> bool:
            return len(self._chunks) < self.max_chunks and self.pages_pinned + num_pages <= self.page_budget

        if fits():
            return
        idle = [c for c in self._chunks.values() if c.holders == 0 and c.chunk_id != keep]  # LRU first
        if self.evict_lru:
            # Choose every victim before evicting any: a failed registration changes nothing. Only
            # leaves go; a parent becomes a leaf once its last child is chosen, and is then
            # considered in its own LRU place (the scan restarts).
            need_pages = self.pages_pinned + num_pages - self.page_budget
            need_chunks = len(self._chunks) + 1 - self.max_chunks
            children = {k: set(v) for k, v in self._children.items()}
            victims: list[Chunk] = []
            chosen: set[str] = set()
            pages = 0
            while pages < need_pages or len(victims) < need_chunks:
                leaf = next((c for c in idle if not children.get(c.chunk_id) and c.chunk_id not in chosen), None)
                if leaf is None:
                    break
                victims.append(leaf)
                chosen.add(leaf.chunk_id)
                pages += leaf.num_pages
                if leaf.parent is not None:
                    children[leaf.parent].discard(leaf.chunk_id)
            if pages >= need_pages and len(victims) >= need_chunks:
                for chunk in victims:
                    self._remove(chunk)
                    self.counters["evictions"] += 1
                return
        held = len(self._chunks) - len(idle)
        raise RegistryFull(
            f"chunk registry full: {len(self._chunks)}/{self.max_chunks} chunks, {self.pages_pinned}/"
            f"{self.page_budget} pages pinned, {num_pages} more needed; {held} chunks are held by running requests "
            "or are the parent being registered on; idle chunks with children are not evicted before them"
            + ("" if self.evict_lru else "; LRU eviction is off")
        )

    def _descendants(self, chunk_id: str) -> list[Chunk]:
        """Visible descendants, each after its parent."""
        out: list[Chunk] = []
        for child_id in sorted(self._children.get(chunk_id, ())):
            out.append(self._chunks[child_id])
            out.extend(self._descendants(child_id))
        return out

    def _link(self, chunk: Chunk) -> None:
        if chunk.parent is not None:
            self._children.setdefault(chunk.parent, set()).add(chunk.chunk_id)

    def _remove(self, chunk: Chunk) -> None:
        del self._chunks[chunk.chunk_id]
        if chunk.parent is not None and chunk.parent in self._children:
            self._children[chunk.parent].discard(chunk.chunk_id)
            if not self._children[chunk.parent]:
                del self._children[chunk.parent]
        chunk.deleted = True
        self._on_remove(chunk)
        if chunk.holders:
            self._dying[chunk.chunk_id] = chunk
        else:
            self._free(chunk)

    def _free(self, chunk: Chunk) -> None:
        if chunk.pages:
            self._on_free(list(chunk.pages))
            chunk.pages = []
