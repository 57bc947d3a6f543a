"""Paged cascade attention on the GPU with FlashInfer: plan once per step, run per layer.

One `BatchPrefillWithPagedKVCacheWrapper` per level, all sharing one float
workspace. The own level covers every request (causal, bottom-right aligned,
from `plan.own_first_page` on); each shared level attends its segments' pages
once for the queries of all their requests, and is merged into the own
level's rows with `merge_state` (log-sum-exp, exact). A flat step that mixes
decode rows (one query token, first in vLLM's batch order) with prefill rows
sends the decode rows to a `BatchDecodeWithPagedKVCacheWrapper`, as vLLM's
FlashInfer backend does: the prefill kernel spends a whole query tile on each.

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

import numpy as np
import torch

from vllm_cascade.attention.plan import CascadePlan

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
        max_levels: int = 3,
    ) -> None:
        from flashinfer import (
            BatchDecodeWithPagedKVCacheWrapper,
            BatchPrefillWithPagedKVCacheWrapper,
        )

        self.device = device
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.page_size, self.dtype, self.scale = page_size, dtype, scale
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        # wrappers[0]: the own level; wrappers[1:]: shared levels.
        self.wrappers = [BatchPrefillWithPagedKVCacheWrapper(self.workspace, "HND") for _ in range(max(1, max_levels))]
        self.level_rows: list[torch.Tensor] = []  # per shared level: query-token indices
        self.flat = True
        self.decode_wrapper = BatchDecodeWithPagedKVCacheWrapper(self.workspace, "HND", use_tensor_cores=True)
        self.num_decode_tokens = 0  # leading decode rows of a flat mixed step, run by decode_wrapper

    def plan(
        self,
        plan: CascadePlan,
        block_table: torch.Tensor,
        seq_lens: np.ndarray,
        query_start_loc: np.ndarray,
    ) -> None:
        """Host work of one step; shared levels take their pages from the plan, the own level from the device."""
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
            self._plan_level(self.wrappers[0], query_start_loc[d:] - query_start_loc[d], kv_indptr[d:] - kv_indptr[d],
                             own_pages[int(kv_indptr[d]) :], kv_lens[d:], causal=True)
        else:
            self._plan_level(self.wrappers[0], query_start_loc, kv_indptr, own_pages, kv_lens, causal=True)
        self.level_rows = []
        for level, segments in enumerate(plan.shared, start=1):
            tokens = [np.arange(query_start_loc[r], query_start_loc[r + 1]) for s in segments for r in s.rows]
            seg_q = [sum(int(query_start_loc[r + 1] - query_start_loc[r]) for r in s.rows) for s in segments]
            qo_indptr = np.concatenate([[0], np.cumsum(seg_q)])
            seg_kv = np.concatenate([[0], np.cumsum([len(s.pages) for s in segments])])
            pages = torch.from_numpy(np.concatenate([s.pages for s in segments]).astype(np.int32))
            self._plan_level(
                self.wrappers[level],
                qo_indptr,
                seg_kv,
                pages.to(self.device, non_blocking=True),
                np.diff(seg_kv) * self.page_size,
                causal=False,
            )
            self.level_rows.append(torch.from_numpy(np.concatenate(tokens)).to(self.device, non_blocking=True))

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

    def run(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor) -> None:
        """query [T, Hq, D]; k_cache, v_cache [pages, Hkv, N, D] (HND views); out [T, Hq, D]."""
        from flashinfer import merge_state

        kv = (k_cache, v_cache)
        if self.flat:
            n = self.num_decode_tokens
            if n:
                self.decode_wrapper.run(query[:n], kv, out=out[:n])
            self.wrappers[0].run(query[n:], kv, out=out[n:])
            return
        o, lse = self.wrappers[0].run(query, kv, return_lse=True)
        for wrapper, rows in zip(self.wrappers[1:], self.level_rows):
            o_l, lse_l = wrapper.run(query[rows], kv, return_lse=True)
            o_m, lse_m = merge_state(o[rows], lse[rows], o_l, lse_l)
            o[rows] = o_m
            lse[rows] = lse_m
        out.copy_(o)
