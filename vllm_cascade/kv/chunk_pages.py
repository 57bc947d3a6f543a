"""What a worker knows of the pinned chunk pages in its KV cache: the key shifts and pad masks.

A composed request `[A|pad][B|pad][tail]` (chunks/layout.py) refers to chunk
pages as they were filled at registration. Per physical page the engine core
sends every worker two numbers (vllm_compat: `cascade_pin_chunk`):

- `valid`: slots [0, valid) hold keys; the rest are pads (masked, never keys);
- `rot_start`: the position the page's first key was RoPE-rotated at.

Pages nobody annotated are ordinary: full, rotated where they sit.

From a row's block table alone this gives every page's *shift*, so that
attention stays position-exact without touching the runner or the pages:
vLLM rotates a request's own tokens (the query, the tail's keys) at their
slot index s, which counts pads; the true position is s - P, P being the
row's pads (all before its own tokens). A key at slot x of page j, rotated
at r = rot_start + (x - j * page_size), stands at true position
x - pads_before(j). Its score against the query must use the distance
(s - P) - (x - pads_before(j)); the cached rotation gives s - r. So the key
is rotated by one more

    shift(j) = P - pads_before(j) + j * page_size - rot_start(j)

before the dot product (equivalently the query by -shift). Ordinary pages
after all pads get shift 0: plain requests are untouched.

Example (page size 4: chunk B of 6 keys on pages 7, 8 at offset 0, then a tail
on page 3; B's keys were rotated at 0..5, B's page 8 has 2 pads):
    >>> import numpy as np
    >>> pages = ChunkPages(num_pages=10, page_size=4)
    >>> pages.annotate([7, 8], valid=[4, 2], rot_start=[0, 4])
    >>> pages.shifts(np.array([[7, 8, 3]]), seq_lens=np.array([11])).tolist()
    [[2, 2, 0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


class ChunkPages:
    """Per-page annotations (host arrays; `valid_device` mirrors `valid` for the GPU kernels).

    Several chunks may pin one page (e.g. equal leading pages); they annotate it
    alike, and the annotation goes when the last of them unpins it.
    """

    def __init__(self, num_pages: int, page_size: int, device: object = None) -> None:
        self.page_size = page_size
        self.refs = np.zeros(num_pages, dtype=np.int32)
        self.valid = np.full(num_pages, page_size, dtype=np.int32)
        self.rot_start = np.zeros(num_pages, dtype=np.int64)
        self.version = 0  # bumped on every change: cached shifts are stale then
        self.count = 0  # pages annotated now
        # The model's RoPE table (vLLM's [max_position, rot_dim], cos then sin, float32), set by the
        # attention builder; None with `rope_problem` saying why chunks cannot be shifted here.
        self.cos_sin_cache = None
        self.rope_problem = "the model's RoPE table was not found"
        self.valid_device = None
        if device is not None:
            import torch

            self.valid_device = torch.from_numpy(self.valid).to(device)

    def annotate(self, pages: Sequence[int], valid: Sequence[int], rot_start: Sequence[int]) -> None:
        pages = np.asarray(pages, dtype=np.int64)
        valid, rot = np.asarray(valid, dtype=np.int32), np.asarray(rot_start, dtype=np.int64)
        held = self.refs[pages] > 0
        if ((self.valid[pages] != valid) | (self.rot_start[pages] != rot))[held].any():
            raise ValueError("a pinned page annotated twice with different contents")
        if ((valid < 1) | (valid > self.page_size)).any():
            raise ValueError(f"valid keys per page must lie in [1, {self.page_size}]")
        np.add.at(self.refs, pages, 1)
        self.valid[pages], self.rot_start[pages] = valid, rot
        self._changed(pages)

    def release(self, pages: Sequence[int]) -> None:
        pages = np.asarray(pages, dtype=np.int64)
        np.subtract.at(self.refs, pages, 1)
        if (self.refs[pages] < 0).any():
            np.maximum(self.refs, 0, out=self.refs)
            raise ValueError("released a page that was not annotated")
        gone = pages[self.refs[pages] == 0]
        self.valid[gone], self.rot_start[gone] = self.page_size, 0
        self._changed(gone)

    def _changed(self, pages: np.ndarray) -> None:
        self.version += 1
        self.count = int((self.refs > 0).sum())
        if self.valid_device is not None and len(pages):
            import torch

            index = torch.from_numpy(pages).to(self.valid_device.device)
            self.valid_device.index_copy_(0, index, torch.from_numpy(self.valid[pages]).to(self.valid_device.device))

    def shifts(self, block_table: np.ndarray, seq_lens: np.ndarray) -> np.ndarray | None:
        """[rows, P] extra key rotation per block-table entry (module doc), or None when no row of
        this step touches an annotated page (the common case: nothing to do)."""
        if not self.count:
            return None
        ps = self.page_size
        width = block_table.shape[1]
        cols = np.arange(width)
        used = cols[None, :] < -(-np.asarray(seq_lens, dtype=np.int64)[:, None] // ps)
        pages = np.where(used, block_table, 0).astype(np.int64)
        marked = used & (self.refs[pages] > 0)
        if not marked.any():
            return None
        pads = np.where(marked, ps - self.valid[pages], 0).astype(np.int64)
        pads_before = np.cumsum(pads, axis=1) - pads
        rot = np.where(marked, self.rot_start[pages], cols[None, :] * ps)
        shift = pads.sum(1, keepdims=True) - pads_before + cols[None, :] * ps - rot
        return np.where(used, shift, 0).astype(np.int32)


_worker_pages: ChunkPages | None = None  # this worker's, created by its attention builder


def worker_chunk_pages() -> ChunkPages | None:
    return _worker_pages


def init_worker_chunk_pages(num_pages: int, page_size: int, device: object = None) -> ChunkPages:
    """The worker's table (kept if it already fits: every layer group's builder asks)."""
    global _worker_pages
    if _worker_pages is None or len(_worker_pages.refs) != num_pages or _worker_pages.page_size != page_size:
        _worker_pages = ChunkPages(num_pages, page_size, device)
    return _worker_pages


@dataclass(frozen=True)
class ChunkView:
    """What one step's attention needs to read chunk pages: the shift of each block-table entry,
    the keys per page (device) and the model's RoPE table (vLLM's [max_position, rot_dim], cos
    then sin)."""

    shifts: np.ndarray  # [rows, P] int32
    page_valid: Any  # torch.Tensor [num_pages] int32
    cos_sin_cache: Any  # torch.Tensor
