"""Paged cascade attention on the GPU with FlashInfer: plan once per step, run per layer.

`BatchPrefillWithPagedKVCacheWrapper`s sharing one float workspace. The own
level covers every request (causal, bottom-right aligned, from
`plan.own_first_page` on). Shared segments, of every level, attend their pages
once for the queries of all their requests (non-causal) in one launch: each
segment's query tokens are gathered (`SharedRuns`), and in steps with chunk
pages (kv/chunk_pages.py, segments from `plan.split_uniform`: one shift per
row, pads only at the end) rotated by minus their shift on the way. One pass
(triton_cascade's merge) then merges every token's partial results exactly by
log2-sum-exp, as FlashInfer writes it.

A flat step that mixes decode rows (one query token, first in vLLM's batch
order) with prefill rows sends the decode rows to a
`BatchDecodeWithPagedKVCacheWrapper`, as vLLM's FlashInfer backend does: the
prefill kernel spends a whole query tile on each.

Example (GPU only):
    >>> import numpy as np, torch
    >>> from vllm_cascade.attention.plan import plan_cascade
    >>> page, hkv, hq, d = 16, 2, 4, 64
    >>> cache = torch.randn(8, hkv, page, 2 * d, device="cuda", dtype=torch.bfloat16)
    >>> k, v = cache[..., :d], cache[..., d:]
    >>> bt = torch.tensor([[0, 1, 2], [0, 1, 3]], device="cuda", dtype=torch.int32)
    >>> seq, qsl = np.array([40, 40]), np.array([0, 1, 2])
    >>> plan = plan_cascade(bt.cpu().numpy(), seq, np.diff(qsl), page, min_saved_pages=1)
    >>> fi = FlashInferCascade(torch.device("cuda"), hq, hkv, d, page, torch.bfloat16, scale=d**-0.5)
    >>> fi.plan(plan, bt, seq, qsl)
    >>> out = torch.empty(2, hq, d, device="cuda", dtype=torch.bfloat16)
    >>> fi.run(torch.randn(2, hq, d, device="cuda", dtype=torch.bfloat16), k, v, out)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_cascade.attention.plan import CascadePlan, rows_tokens, token_positions


@dataclass(frozen=True)
class SharedRuns:
    """Host arrays of one step's shared segments, laid out for one FlashInfer launch and the merge.

    Gathered row r is query token `tokens[r]` of a segment's row, rotated by `rotation[r]`
    positions (0 in steps without chunk pages); segment s has gathered rows [qo_indptr[s], qo_indptr[s+1]) and pages
    pages[kv_indptr[s]:kv_indptr[s+1]], of which the first kv_lens[s] slots are keys. Partial
    rows: [0, T) the own level's (row t = token t), T + r the gathered row r's; token t merges
    contrib_row[contrib_off[t]:contrib_off[t + 1]], its own level's first.

    Example (page 4; tokens 0 and 1 are rows 0 and 1, sharing pages [7, 8] at shifts 2 and 6):
        >>> from vllm_cascade.attention.plan import SharedSegment
        >>> seg = SharedSegment(0, np.array([0, 1]), 0, np.array([7, 8]), np.array([0, 4], np.int32), 6)
        >>> plan = CascadePlan([[seg]], np.array([2, 2]), 0, 0, shifts=np.array([[2, 2, 0], [6, 6, 0]]))
        >>> runs = SharedRuns.of(plan, np.array([0, 1, 2]), page_size=4)
        >>> runs.tokens.tolist(), runs.rotation.tolist(), runs.kv_lens.tolist()
        ([0, 1], [-2, -6], [6])
        >>> runs.contrib_off.tolist(), runs.contrib_row.tolist()
        ([0, 2, 4], [0, 2, 1, 3])
    """

    tokens: np.ndarray
    rotation: np.ndarray
    qo_indptr: np.ndarray
    kv_indptr: np.ndarray
    pages: np.ndarray
    kv_lens: np.ndarray
    contrib_off: np.ndarray
    contrib_row: np.ndarray

    @classmethod
    def of(cls, plan: CascadePlan, query_start_loc: np.ndarray, page_size: int) -> SharedRuns:
        """The runs of a cascade plan's shared segments (a chunk step's from `plan.split_uniform`)."""
        segments = [s for level in plan.shared for s in level]
        qsl = np.asarray(query_start_loc, dtype=np.int64)
        num_tokens = int(qsl[-1])
        tokens, rotation, seg_q = [], [], []
        for s in segments:
            seg_tokens, lens = rows_tokens(qsl, s.rows)
            tokens.append(seg_tokens)
            shift = 0 if plan.shifts is None else int(plan.shifts[s.rows[0], s.first_page])
            shift = shift + (0 if s.q_shift is None else s.q_shift.astype(np.int64))
            rotation.append(np.repeat(-np.broadcast_to(shift, len(s.rows)), lens))
            seg_q.append(int(lens.sum()))
        empty = np.zeros(0, np.int64)
        tokens_all = np.concatenate(tokens) if tokens else empty
        kv_lens = np.array([len(s.pages) * page_size if s.num_keys is None else s.num_keys for s in segments], np.int64)
        # Each token's partial rows, its own level's first (a stable sort keeps it first).
        every_token = np.concatenate([np.arange(num_tokens), tokens_all])
        order = np.argsort(every_token, kind="stable")
        return cls(
            tokens=tokens_all,
            rotation=np.concatenate(rotation) if rotation else empty,
            qo_indptr=np.concatenate([[0], np.cumsum(seg_q)]).astype(np.int64),
            kv_indptr=np.concatenate([[0], np.cumsum([len(s.pages) for s in segments])]).astype(np.int64),
            pages=np.concatenate([s.pages for s in segments]) if segments else empty,
            kv_lens=kv_lens,
            contrib_off=np.concatenate([[0], np.cumsum(np.bincount(every_token, minlength=num_tokens))]),
            contrib_row=order,
        )


WORKSPACE_BYTES = 256 * 1024 * 1024


class FlashInferCascade:
    name = "flashinfer"

    def __init__(
        self,
        device: torch.device,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        dtype: torch.dtype,
        scale: float,
        cos_sin_cache: torch.Tensor | None = None,
        query_rope: torch.Tensor | None = None,
    ) -> None:
        from flashinfer import (
            BatchDecodeWithPagedKVCacheWrapper,
            BatchPrefillWithPagedKVCacheWrapper,
        )

        self.device = device
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.page_size, self.dtype, self.scale = page_size, dtype, scale
        self.cos_sin_cache = cos_sin_cache  # the model's RoPE table: rotates queries for chunk segments
        # Queries come before RoPE (config query_rope="backend"; the model's cos/sin table): the own
        # level's are rotated at their positions, each shared segment's once at position minus shift.
        self.query_rope = query_rope
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.own_wrapper = BatchPrefillWithPagedKVCacheWrapper(self.workspace, "HND")
        self.shared_wrapper = BatchPrefillWithPagedKVCacheWrapper(self.workspace, "HND")  # every shared segment
        self.decode_wrapper = BatchDecodeWithPagedKVCacheWrapper(self.workspace, "HND", use_tensor_cores=True)
        self.flat = True
        self.num_decode_tokens = 0  # leading decode rows of a flat mixed step, run by decode_wrapper
        self.runs: SharedRuns | None = None  # the planned step's shared segments
        self.rotate = False  # the planned step has chunk pages: its gathered queries are rotated
        self._device_runs: dict[str, torch.Tensor] = {}
        self._partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # o, lse, gathered queries
        self._rotated: torch.Tensor | None = None  # with query_rope: the step's queries rotated at their positions
        self._merge_programs = 4 * (torch.cuda.get_device_properties(device).multi_processor_count
                                    if device.type == "cuda" else 1)
        if device.type == "cuda":
            self._compile_kernels()

    def _compile_kernels(self) -> None:
        """Compile the gather and merge kernels at engine start, not in the first step that shares (a
        second or so of Triton compilation in a user's request). Tiny inputs of the serving dtypes,
        16-byte aligned like the step's (pack_aligned), so Triton specializes them the same way."""
        from vllm_cascade.ops.triton_cascade import gather_rotate, merge_partials

        query = torch.zeros(1, self.num_qo_heads, self.head_dim, dtype=self.dtype, device=self.device)
        index = torch.zeros(4, dtype=torch.int32, device=self.device)
        for table in {id(t): t for t in (self.cos_sin_cache, self.query_rope) if t is not None}.values():
            gather_rotate(query, index[:1], index[:1], table, torch.empty_like(query))  # one variant per table dtype
        contrib_off = torch.tensor([0, 1, 0, 0], dtype=torch.int32, device=self.device)
        lse = torch.zeros(1, self.num_qo_heads, dtype=torch.float32, device=self.device)
        num_tokens = torch.ones(4, dtype=torch.int32, device=self.device)  # its own allocation: aligned
        merge_partials(query.clone(), lse, torch.empty_like(query), contrib_off, index, num_tokens[:1], 1)

    def plan(
        self,
        plan: CascadePlan,
        block_table: torch.Tensor,
        seq_lens: np.ndarray,
        query_start_loc: np.ndarray,
    ) -> None:
        """Host work of one step; shared segments take their pages from the plan, the own level from
        the device. A plan with shifts (chunk pages) must come from `plan.split_uniform`."""
        num_rows = len(seq_lens)
        first = plan.own_first_page
        pages_end = (seq_lens + self.page_size - 1) // self.page_size
        counts = pages_end - first
        kv_indptr = np.zeros(num_rows + 1, dtype=np.int32)
        np.cumsum(counts, out=kv_indptr[1:])
        # Gather the own pages on the device: no device-to-host copy for flat steps.
        row = np.repeat(np.arange(num_rows), counts)
        col = np.arange(int(kv_indptr[-1])) - np.repeat(kv_indptr[:-1], counts) + np.repeat(first, counts)
        flat_index = torch.from_numpy(row * block_table.shape[1] + col).to(self.device, non_blocking=True)
        own_pages = torch.take(block_table, flat_index).to(torch.int32)
        kv_lens = seq_lens - first * self.page_size
        self.flat = plan.is_flat
        query_lens = np.diff(query_start_loc)
        d = int(np.argmax(query_lens != 1)) if (query_lens != 1).any() else num_rows  # leading decode rows
        self.num_decode_tokens = d if self.flat and 0 < d < num_rows else 0
        if self.num_decode_tokens:
            self.decode_wrapper.plan(
                torch.from_numpy(kv_indptr[: d + 1]),
                own_pages[: int(kv_indptr[d])],
                torch.from_numpy((kv_lens[:d] - (counts[:d] - 1) * self.page_size).astype(np.int32)),
                self.num_qo_heads, self.num_kv_heads, self.head_dim, self.page_size,
                sm_scale=self.scale, q_data_type=self.dtype, kv_data_type=self.dtype,
            )  # fmt: skip
            self._plan_level(self.own_wrapper, query_start_loc[d:] - query_start_loc[d], kv_indptr[d:] - kv_indptr[d],
                             own_pages[int(kv_indptr[d]) :], kv_lens[d:], causal=True)
        else:
            self._plan_level(self.own_wrapper, query_start_loc, kv_indptr, own_pages, kv_lens, causal=True)
        self.runs = None
        num_tokens = int(query_start_loc[-1])
        fields: dict[str, np.ndarray | list[int]] = {}
        if self.query_rope is not None:
            positions = token_positions(seq_lens, query_start_loc)
            fields.update(all_tokens=np.arange(num_tokens), positions=positions)
            self._rotated = torch.empty(num_tokens, self.num_qo_heads, self.head_dim, dtype=self.dtype,
                                        device=self.device)
        if not self.flat:
            runs = SharedRuns.of(plan, query_start_loc, self.page_size)
            self.rotate = plan.shifts is not None or self.query_rope is not None
            if plan.shifts is not None and self.cos_sin_cache is None:
                raise RuntimeError("a step with chunk pages needs the model's RoPE table (cos_sin_cache)")
            self._plan_level(self.shared_wrapper, runs.qo_indptr, runs.kv_indptr,
                             torch.from_numpy(runs.pages.astype(np.int32)).to(self.device, non_blocking=True),
                             runs.kv_lens, causal=False)
            rotation = runs.rotation if self.query_rope is None else runs.rotation + positions[runs.tokens]
            fields.update(tokens=runs.tokens, rotation=rotation, contrib_off=runs.contrib_off,
                          contrib_row=runs.contrib_row, num_tokens=[num_tokens])
            gathered = len(runs.tokens)
            self._partials = (
                torch.empty(num_tokens + gathered, self.num_qo_heads, self.head_dim, dtype=self.dtype,
                            device=self.device),
                torch.empty(num_tokens + gathered, self.num_qo_heads, dtype=torch.float32, device=self.device),
                torch.empty(gathered, self.num_qo_heads, self.head_dim, dtype=self.dtype, device=self.device))
            self.runs = runs
        if fields:  # one upload of the gather and merge arrays
            from vllm_cascade.ops.triton_cascade import pack_aligned

            packed, layout = pack_aligned(fields)
            host = torch.from_numpy(packed)
            dev = host.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else host
            self._device_runs = {name: dev[offset : offset + n] for name, (offset, n) in layout.items()}

    def _plan_level(self, wrapper, qo_indptr, kv_indptr, kv_indices, kv_lens, causal: bool) -> None:
        kv_lens = np.asarray(kv_lens, dtype=np.int64)
        # Rows with no pages (padding) get last_page_len 0 and kv_len 0.
        last_page_len = kv_lens - np.maximum(np.diff(kv_indptr) - 1, 0) * self.page_size
        wrapper.plan(
            torch.as_tensor(np.asarray(qo_indptr), dtype=torch.int32),
            torch.as_tensor(np.asarray(kv_indptr), dtype=torch.int32),
            kv_indices,
            torch.as_tensor(last_page_len, dtype=torch.int32),
            self.num_qo_heads,
            self.num_kv_heads,
            self.head_dim,
            self.page_size,
            causal=causal,
            seq_lens=torch.as_tensor(kv_lens, dtype=torch.int32),
            sm_scale=self.scale,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )

    @property
    def partial_rows(self) -> int | None:
        """Partial results the planned step's merge combines (None: a flat step, no merge)."""
        return None if self.runs is None else len(self.runs.contrib_row)

    def run(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor) -> None:
        """query [T, Hq, D]; k_cache, v_cache [pages, Hkv, N, D] (HND views); out [T, Hq, D]."""
        from vllm_cascade.ops.triton_cascade import gather_rotate, merge_partials

        kv = (k_cache, v_cache)
        runs = self._device_runs
        raw, table = query, self.cos_sin_cache
        if self.query_rope is not None:
            table = self.query_rope
            query = gather_rotate(raw, runs["all_tokens"], runs["positions"], table, self._rotated)
        if self.flat:
            n = self.num_decode_tokens
            if n:
                self.decode_wrapper.run(query[:n], kv, out=out[:n])
            self.own_wrapper.run(query[n:], kv, out=out[n:])
            return
        o_part, l_part, q_shared = self._partials
        t = query.shape[0]
        self.own_wrapper.run(query, kv, out=o_part[:t], lse=l_part[:t], return_lse=True)
        if self.rotate:  # with query_rope, `rotation` holds each gathered row's position minus its shift
            gather_rotate(raw, runs["tokens"], runs["rotation"], table, q_shared)
        else:
            torch.index_select(query, 0, runs["tokens"], out=q_shared)
        self.shared_wrapper.run(q_shared, kv, out=o_part[t:], lse=l_part[t:], return_lse=True)
        merge_partials(o_part, l_part, out, runs["contrib_off"], runs["contrib_row"], runs["num_tokens"],
                       min(self._merge_programs, t))
