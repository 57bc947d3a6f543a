"""Where the chunks of a composed request sit: slots (with page padding) and true positions.

A request composed of chunks [A, B] and a tail is laid out as
`[A | pad][B | pad][tail]`: every chunk starts on a page boundary, so its
pinned pages can be referenced as they are, never copied. Pad slots are masked
and not counted in true positions: chunk B's tokens stand at true positions
len(A) .. len(A) + len(B) - 1, the tail's after them. A chunk's keys were cached
at chunk-local positions 0 .. n-1, so a query at true position m attends them
as if it stood at m - true_offset (one extra rotation of the query per level).

Example:
    >>> c = compose_layout([10, 5], tail_len=3, page_size=4, max_len=64)
    >>> c.slot_offsets, c.true_offsets, c.tail_slot_offset, c.tail_true_offset, c.num_slots
    ([0, 12], [0, 10], 20, 15, 23)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vllm_cascade.chunks.registry import ChunkError


class CompositionTooLong(ChunkError):
    status = 413  # the request is larger than the model's context


@dataclass(frozen=True)
class Composition:
    slot_offsets: list[int]  # first slot of each chunk in the request's sequence (page aligned)
    true_offsets: list[int]  # true position of each chunk's first token
    chunk_lens: list[int]
    tail_slot_offset: int  # first slot of the tail (page aligned)
    tail_true_offset: int  # true position of the tail's first token
    num_slots: int  # the sequence length vLLM sees, pads included

    def is_pad(self, slot: int) -> bool:
        for start, n in zip(self.slot_offsets, self.chunk_lens):
            if start <= slot < start + n:
                return False
        return slot < self.tail_slot_offset

    def true_position(self, slot: int) -> int:
        """True position of the token in `slot` (pads have none)."""
        for start, true, n in zip(self.slot_offsets, self.true_offsets, self.chunk_lens):
            if start <= slot < start + n:
                return true + slot - start
        if slot >= self.tail_slot_offset:
            return self.tail_true_offset + slot - self.tail_slot_offset
        raise ValueError(f"slot {slot} is padding")


def compose_layout(chunk_lens: Sequence[int], tail_len: int, page_size: int, max_len: int) -> Composition:
    slot_offsets, true_offsets = [], []
    slot = true = 0
    for n in chunk_lens:
        slot_offsets.append(slot)
        true_offsets.append(true)
        slot += -(-n // page_size) * page_size
        true += n
    num_slots = slot + tail_len
    if num_slots > max_len:
        raise CompositionTooLong(
            f"composition needs {num_slots} slots ({true + tail_len} tokens + page padding), "
            f"more than the model's context ({max_len})"
        )
    return Composition(slot_offsets, true_offsets, list(chunk_lens), slot, true, num_slots)
