"""The prompt vLLM sees for a composed request: each chunk on whole pages of its own.

A request composed of chunks [A, B] and a tail is laid out as
`[A | pad][B | pad][tail]`: every chunk starts on a page boundary, so its
pinned pages can be referenced as they are, never copied. Pad slots are masked
and not counted in true positions: chunk B's tokens stand at true positions
len(A) .. len(A) + len(B) - 1, the tail's after them. A chunk's keys were cached
where it was registered, so attention rotates them once more to their true
place (kv/chunk_pages.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vllm_cascade.chunks.registry import ChunkError


class CompositionTooLong(ChunkError):
    status = 413  # the request is larger than the model's context


PAD_TOKEN_ID = 0  # what fills a chunk's last page in the token ids vLLM sees; masked, never attended


@dataclass(frozen=True)
class ChunkRef:
    """A chunk as a prompt uses it: its id, own tokens and pinned pages (its tokens padded to them)."""

    chunk_id: str
    token_ids: Sequence[int]
    num_pages: int


@dataclass(frozen=True)
class ComposedPrompt:
    """The token ids vLLM gets for a composition, and what the engine core needs to find its chunk pages.

    `refs`: (chunk id, pages referenced) in order; the engine core's block hasher gives those
    pages the hashes the chunk's pages were cached under (vllm_compat.ComposedBlockHasher), so
    vLLM's prefix cache serves them, wherever they sit in the prompt.
    """

    token_ids: list[int]
    refs: list[tuple[str, int]]
    chunk_tokens: int  # the chunks' tokens in the prompt (pads not counted)
    pad_slots: list[int]  # prompt indices holding pads

    @property
    def extra_args(self) -> dict[str, list[str]]:
        """For SamplingParams.extra_args (vLLM's `vllm_xargs` over HTTP): the composition."""
        return {"cascade_chunks": [f"{cid}:{n}" for cid, n in self.refs]}

    def real_tokens(self, num_slots: int) -> int:
        """Tokens (pads not counted) among the prompt's first `num_slots` slots."""
        return num_slots - int(np.searchsorted(self.pad_slots, num_slots))

    def without_pads(self, per_slot: Sequence) -> list:
        """The entries of a per-slot sequence (token ids, prompt logprobs) at the prompt's real tokens."""
        pads = set(self.pad_slots)
        return [x for i, x in enumerate(per_slot) if i not in pads]


def compose_prompt(chunks: Sequence[ChunkRef], tail: Sequence[int], page_size: int, max_len: int) -> ComposedPrompt:
    """`[A|pad][B|pad]...[tail]`: every chunk on its own pages. With no tail, the last chunk's last
    page is left out and its tokens end the prompt instead (computed again): vLLM samples after the
    prompt's last token, which must not be a pad.

    Example:
        >>> p = compose_prompt([ChunkRef("a", [1, 2, 3, 4, 5], 2), ChunkRef("b", [6, 7], 1)], [8], 4, 64)
        >>> p.token_ids, p.refs, p.chunk_tokens, p.pad_slots
        ([1, 2, 3, 4, 5, 0, 0, 0, 6, 7, 0, 0, 8], [('a', 2), ('b', 1)], 7, [5, 6, 7, 10, 11])
        >>> compose_prompt([ChunkRef("a", [1, 2, 3, 4, 5], 2)], [], 4, 64).token_ids
        [1, 2, 3, 4, 5]
    """
    tokens: list[int] = []
    refs, pads = [], []
    for i, chunk in enumerate(chunks):
        n = len(chunk.token_ids)
        if chunk.num_pages != -(-n // page_size):
            raise ValueError(f"chunk {chunk.chunk_id}: {n} tokens on {chunk.num_pages} pages of {page_size}")
        if i == len(chunks) - 1 and not tail:
            refs.append((chunk.chunk_id, chunk.num_pages - 1))
            tokens += chunk.token_ids
            break
        refs.append((chunk.chunk_id, chunk.num_pages))
        tokens += chunk.token_ids
        pad = chunk.num_pages * page_size - n
        pads += range(len(tokens), len(tokens) + pad)
        tokens += [PAD_TOKEN_ID] * pad
    chunk_tokens = len(tokens) - len(pads)
    tokens += tail
    if not tokens:
        raise ChunkError("a composition needs chunks or a tail")
    if len(tokens) >= max_len:
        raise CompositionTooLong(f"composition of {len(tokens)} tokens ({len(pads)} of them page padding) does not "
                                 f"fit the model's context ({max_len})")
    return ComposedPrompt(tokens, [r for r in refs if r[1] > 0], chunk_tokens, pads)


def registration_prompt(chain: Sequence[ChunkRef], page_size: int, max_len: int) -> ComposedPrompt:
    """The prompt that prefills the last chunk of `chain` (its parents first, each on its own pages)
    onto whole pages of its own: the chain composed, then the chunk's tokens padded to its pages."""
    *parents, chunk = chain
    own = list(chunk.token_ids) + [PAD_TOKEN_ID] * (chunk.num_pages * page_size - len(chunk.token_ids))
    prompt = compose_prompt(parents, own, page_size, max_len)
    pads = prompt.pad_slots + list(range(len(prompt.token_ids) - len(own) + len(chunk.token_ids), len(prompt.token_ids)))
    return ComposedPrompt(prompt.token_ids, prompt.refs, prompt.chunk_tokens + len(chunk.token_ids), pads)
