"""Fused cascade attention in Triton: every level in one pass, then one merge.

`_partials_kernel` computes work items of a WorkList (attention/worklist.py):
one tile of query tokens (all G query heads of a KV head) against one run of
KV pages, online softmax in base 2, writing the tile's normalized output and
log2-sum-exp. It is launched twice per layer: narrow tiles (decode rows), then
wide ones (a shared level's many queries, so its pages are read once per wide
tile). `_merge_kernel` merges each (token, query head)'s partials
exactly. All three are persistent (a fixed grid striding over counts read
from device memory), so a CUDA graph captured once replays any later step
whose work list fits the same buffers.

Composed requests (kv/chunk_pages.py): on a step whose work list has its
`chunk_flag` set (device memory, so captured graphs follow it), every key
block drops pad slots (`page_valid`) and is RoPE-rotated by its block-table
entry's shift before the dot product, as ops/torch_attention.py's `_keys`.
That path is a second specialization of `_partials_kernel` (CHUNKS); a
captured graph holds both, and each finds items only when the flag is its own.

Each KV step loads the next step's page ids (`_block_pages`), so the K/V loads
do not depend on a load of their own step and Triton pipelines them. (With the
ids loaded in the step, Triton 3.9 issues each step's K/V copies at the end of
the step before and waits for them at once; on the H100, Triton 3.6, Nsight
Compute found the wide launch latency-bound at 40% of DRAM bandwidth.) On Hopper the launches
of a layer after the first are programmatic dependents (PDL): each starts
while the one before runs, since the partials launches read nothing another
writes; each ends only after the one before it has (`gdc_wait` at its end),
and the merge waits at its start, so it sees every partial.

Runs under `TRITON_INTERPRET=1` on the CPU (that is how the tests check it
without a GPU; set the variable before this module is imported).

Example (see tests/test_triton_cascade.py for a complete, checked one):
    q [T, Hq, D]; k_cache, v_cache [pages, Hkv, N, D]; block_table [rows, P] int32 on the device
    kernel = TritonCascade(Hq, Hkv, N, scale, device="cuda", head_dim=D)
    kernel.set_chunk_tables(page_valid, cos_sin_cache, max_rows, max_pages)  # once, for composed requests
    kernel.plan(plan, block_table, seq_lens, query_start_loc, shifts)      # once per step (shifts or None)
    kernel.run(q, k_cache, v_cache, out)                                   # per layer
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from vllm_cascade.attention.worklist import WorkList, WorkListTooLarge, is_decode_step

NARROW_M = 16  # query rows (tokens x G) per program for decode-sized groups; tl.dot needs >= 16
BLOCK_N = 32  # keys per inner step
FILL_MIN_PAGES = 4  # the shortest KV run `fill_programs` cuts (two inner steps at page 16)
# Programmatic dependent launch (Hopper+): a layer's partials launches after its first one start
# while the one before runs, and the merge while the last runs, waiting for the partials inside.
PDL = True


@dataclass(frozen=True)
class Launch:
    """How one of the partials launches runs: keys per inner step, warps, software-pipeline stages
    (None: Triton's default)."""

    block_n: int = BLOCK_N
    num_warps: int = 4
    num_stages: int | None = None

    def kwargs(self) -> dict:
        return {"num_warps": self.num_warps, **({"num_stages": self.num_stages} if self.num_stages else {})}


@triton.jit
def _partials_kernel(
    Q, K, V, BT, O_PART, L_PART,
    item_q_off, item_q_len, item_bt_row, item_page_start, item_kv_len, item_causal, item_part, item_range,
    q_tokens, q_shift, q_pos,
    chunk_flag, SHIFTS, PAGE_VALID, COS_SIN, Q_COS_SIN,
    sm_scale_log2,
    stride_qt, stride_qh, stride_kp, stride_kh, stride_kn, stride_bt, stride_sh, stride_cs, stride_qcs,
    G: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROT: tl.constexpr, CHUNKS: tl.constexpr, Q_ROPE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # Persistent: the grid is fixed, programs stride over the items [range[0], range[1]) read from memory.
    if PDL:  # the layer's next launch may start now: it reads nothing this one writes (module doc)
        tl.extra.cuda.gdc_launch_dependents()
    h = tl.program_id(1)
    num_kv_heads = tl.num_programs(1)
    # Two specializations: one kernel with both branches made the H100's plain decode slower (sixth
    # session). The flag is read at run time: a captured graph launches both, and the one that does not
    # match this step's flag has no items.
    first_item, end_item = tl.load(item_range), tl.load(item_range + 1)
    if (tl.load(chunk_flag) != 0) != CHUNKS:
        end_item = first_item
    for w in range(first_item + tl.program_id(0), end_item, tl.num_programs(0)):
        q_off = tl.load(item_q_off + w)
        q_len = tl.load(item_q_len + w)
        bt_row = tl.load(item_bt_row + w).to(tl.int64)
        page_start = tl.load(item_page_start + w)
        kv_len = tl.load(item_kv_len + w)
        causal = tl.load(item_causal + w)

        m_rows = tl.arange(0, BLOCK_M)
        local = m_rows // G
        row_ok = local < q_len
        tok = tl.load(q_tokens + q_off + local, mask=row_ok, other=0).to(tl.int64)
        pos = tl.load(q_pos + tok, mask=row_ok, other=0)
        d = tl.arange(0, HEAD_DIM)
        head = h * G + m_rows % G
        q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=row_ok[:, None],
                    other=0.0)  # fmt: skip

        q_row = Q + tok * stride_qt + head * stride_qh
        if CHUNKS:
            # Keys are shifted as in the item's naming row (bt_row); a token of another row that holds
            # the pages elsewhere (a shared chunk) needs `dq` more, by rotating its query back.
            dq = tl.load(q_shift + q_off + local, mask=row_ok, other=0)
            if Q_ROPE:  # the model's query before RoPE: one rotation, at its position minus the shift
                dq = dq - pos
            # An item usually lies within one chunk (or the tail): one shift for all its keys. Then the
            # query is rotated once instead (q . R(s)k = R(-s)q . k) and the loop only masks pads.
            first = tl.load(SHIFTS + bt_row * stride_sh + page_start)
            spread = tl.zeros([], tl.int32)
            for start in range(0, kv_len, BLOCK_N):
                n = start + tl.arange(0, BLOCK_N)
                sh = tl.load(SHIFTS + bt_row * stride_sh + page_start + n // PAGE, mask=n < kv_len, other=first)
                spread = tl.maximum(spread, tl.max(tl.abs(sh - first)))
            if spread == 0:
                q_first = _rotate_rows(q, q_row, -(first + dq), row_ok, Q_COS_SIN, stride_qcs, HEAD_DIM, ROT)
                m_i, l_i, acc = _kv_run(q_first, pos, row_ok, causal, kv_len, page_start, bt_row, h, K, V, BT, SHIFTS,
                                        PAGE_VALID, COS_SIN, sm_scale_log2, stride_kp, stride_kh, stride_kn,
                                        stride_bt, stride_sh, stride_cs, PAGE, HEAD_DIM, BLOCK_M, BLOCK_N, ROT, True,
                                        False)
            else:
                q_own = _rotate_rows(q, q_row, -dq, row_ok, Q_COS_SIN, stride_qcs, HEAD_DIM, ROT)
                m_i, l_i, acc = _kv_run(q_own, pos, row_ok, causal, kv_len, page_start, bt_row, h, K, V, BT, SHIFTS,
                                        PAGE_VALID, COS_SIN, sm_scale_log2, stride_kp, stride_kh, stride_kn,
                                        stride_bt, stride_sh, stride_cs, PAGE, HEAD_DIM, BLOCK_M, BLOCK_N, ROT, True,
                                        True)
        else:
            if Q_ROPE:
                q = _rotate_rows(q, q_row, pos, row_ok, Q_COS_SIN, stride_qcs, HEAD_DIM, ROT)
            m_i, l_i, acc = _kv_run(q, pos, row_ok, causal, kv_len, page_start, bt_row, h, K, V, BT, SHIFTS,
                                    PAGE_VALID, COS_SIN, sm_scale_log2, stride_kp, stride_kh, stride_kn, stride_bt,
                                    stride_sh, stride_cs, PAGE, HEAD_DIM, BLOCK_M, BLOCK_N, ROT, False, False)
        seen = l_i > 0
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        row = tl.load(item_part + w) + local  # one partial row per (item, token), all query heads
        slot = row * (num_kv_heads * G) + head
        tl.store(L_PART + slot, lse, mask=row_ok)
        tl.store(O_PART + slot[:, None] * HEAD_DIM + d[None, :], out, mask=row_ok[:, None])
    if PDL:  # end only after the launch before it: the merge, waiting for the last one, waits for all
        tl.extra.cuda.gdc_wait()


@triton.jit
def _kv_run(
    q, pos, row_ok, causal, kv_len, page_start, bt_row, h, K, V, BT, SHIFTS, PAGE_VALID, COS_SIN, sm_scale_log2,
    stride_kp, stride_kh, stride_kn, stride_bt, stride_sh, stride_cs,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROT: tl.constexpr,
    CHUNKS: tl.constexpr, SHIFT_KEYS: tl.constexpr,
):  # fmt: skip
    """Online softmax of a query tile over one item's KV run -> (max, sum, unnormalized out), base 2.
    With CHUNKS, pad slots are no keys, and with SHIFT_KEYS keys are shifted (module doc)."""
    d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_pos0 = page_start * PAGE
    # What locates (and, with chunks, masks and shifts) a block of keys is loaded a step ahead: K/V
    # addresses that depend on a load of the same step keep Triton from pipelining the K/V loads.
    n = tl.arange(0, BLOCK_N)
    page, valid, shift = _block_pages(n, kv_len, page_start, bt_row, BT, SHIFTS, PAGE_VALID, stride_bt, stride_sh,
                                      PAGE, CHUNKS, SHIFT_KEYS)
    for start in range(0, kv_len, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < kv_len
        kv_off = page * stride_kp + h * stride_kh + (n % PAGE) * stride_kn
        k = tl.load(K + kv_off[:, None] + d[None, :], mask=n_ok[:, None], other=0.0)
        if CHUNKS:
            n_ok = n_ok & ((n % PAGE) < valid)  # pad slots
        if SHIFT_KEYS:
            k = _rotate_rows(k, K + kv_off, shift, n_ok, COS_SIN, stride_cs, HEAD_DIM, ROT)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * sm_scale_log2
        ok = row_ok[:, None] & n_ok[None, :] & ((causal == 0) | ((k_pos0 + n)[None, :] <= pos[:, None]))
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off[:, None] + d[None, :], mask=n_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m_i = m_new
        page, valid, shift = _block_pages(n + BLOCK_N, kv_len, page_start, bt_row, BT, SHIFTS, PAGE_VALID, stride_bt,
                                          stride_sh, PAGE, CHUNKS, SHIFT_KEYS)
    return m_i, l_i, acc


@triton.jit
def _block_pages(n, kv_len, page_start, bt_row, BT, SHIFTS, PAGE_VALID, stride_bt, stride_sh, PAGE: tl.constexpr,
                 CHUNKS: tl.constexpr, SHIFT_KEYS: tl.constexpr):  # fmt: skip
    """Keys n [N] of a run -> (page id, keys in the page, shift) per key; the last two only where
    CHUNKS / SHIFT_KEYS need them (else 0)."""
    ok = n < kv_len
    entry = bt_row * stride_bt + page_start + n // PAGE
    page = tl.load(BT + entry, mask=ok, other=0).to(tl.int64)
    valid = tl.load(PAGE_VALID + page, mask=ok, other=0) if CHUNKS else tl.zeros_like(n)
    shift = tl.load(SHIFTS + bt_row * stride_sh + page_start + n // PAGE, mask=ok, other=0) if SHIFT_KEYS \
        else tl.zeros_like(n)
    return page, valid, shift


@triton.jit
def _rotate_rows(k, k_ptr, shift, ok, COS_SIN, stride_cs, HEAD_DIM: tl.constexpr, ROT: tl.constexpr):
    """Rows k [N, D] (keys or queries, at k_ptr [N] + d) rotated by `shift` [N] more positions,
    neox style over the first ROT dims, in float32; back in k's dtype for the dot."""
    HALF: tl.constexpr = ROT // 2
    d = tl.arange(0, HEAD_DIM)
    rotary = d < ROT
    pair = tl.where(d < HALF, d + HALF, tl.where(rotary, d - HALF, d))
    # The partner dims: a second load of the same cache lines.
    k_pair = tl.load(k_ptr[:, None] + pair[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    cs = COS_SIN + tl.abs(shift)[:, None] * stride_cs + (d % HALF)[None, :]
    cs_ok = ok[:, None] & rotary[None, :]
    cos = tl.load(cs, mask=cs_ok, other=1.0).to(tl.float32)  # dims >= ROT: cos 1, sin 0, unchanged
    sin = tl.load(cs + HALF, mask=cs_ok, other=0.0).to(tl.float32)
    # A negative shift rotates backwards (sin negated); the first half takes -partner * sin.
    sin = sin * tl.where(shift < 0, -1.0, 1.0)[:, None] * tl.where(d < HALF, -1.0, 1.0)[None, :]
    return (k.to(tl.float32) * cos + k_pair * sin).to(k.dtype)


@triton.jit
def _merge_kernel(
    O_PART, L_PART, OUT, contrib_off, contrib_row, num_tokens_ptr,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    if PDL:  # launched early: the partials are complete only after this
        tl.extra.cuda.gdc_wait()
    hq = tl.program_id(1)
    num_heads = tl.num_programs(1)
    d = tl.arange(0, HEAD_DIM)
    for t in range(tl.program_id(0), tl.load(num_tokens_ptr), tl.num_programs(0)):
        m = tl.full([], float("-inf"), tl.float32)
        l = tl.zeros([], tl.float32)
        acc = tl.zeros([HEAD_DIM], tl.float32)
        for c in range(tl.load(contrib_off + t), tl.load(contrib_off + t + 1)):
            slot = tl.load(contrib_row + c) * num_heads + hq
            lse = tl.load(L_PART + slot)
            m_new = tl.maximum(m, lse)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            old, new = tl.exp2(m - m_ref), tl.exp2(lse - m_ref)
            acc = acc * old + tl.load(O_PART + slot * HEAD_DIM + d) * new
            l = l * old + new
            m = m_new
        # A token that saw no key (a padded row under CUDA graphs) gets zeros, not NaN.
        tl.store(OUT + t * stride_ot + hq * stride_oh + d, (acc / tl.where(l > 0, l, 1.0)).to(OUT.dtype.element_ty))


def default_launch(wide: bool, wide_m: int, chunks: bool) -> Launch:
    """Launch settings of a partials launch (H100 sweeps, kernel_bench.py --sweep): wide tiles read 64
    keys per step (8192-key shared level: 31.0 -> 25.8 us), except in the chunk specialization,
    which is slower so (prefill_bench: 1.8 -> 3.1 ms; not inspected)."""
    if wide and not chunks:
        return Launch(block_n=64)
    return Launch(num_warps=8 if wide and wide_m > 64 else 4)


def cascade_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    wl: dict[str, torch.Tensor],
    scale: float,
    out: torch.Tensor,
    partials: tuple[torch.Tensor, torch.Tensor],
    wide_m: int,
    programs: int,
    chunk_tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    launches: tuple[Launch, Launch] | None = None,
    chunks: bool | None = None,
    query_rope: torch.Tensor | None = None,
) -> None:
    """q [T, Hq, D]; k/v caches [pages, Hkv, N, D] (same strides, last dim contiguous); out [T, Hq, D].

    `wl` holds a work list's fields as int32 device tensors, with `item_range` = [0, num_wide,
    num_items], `num_tokens` and `chunk_flag`. Three persistent launches (wide items with `wide_m`
    query rows per program, narrow items with NARROW_M, the merge), `programs` x heads programs
    each; the grids do not depend on the step. `partials` = (o [rows, Hq, D], lse [rows, Hq]),
    float32. `chunk_tables` = (shifts [rows, P] int32 indexed like the block table, page_valid
    [pages] int32, cos_sin_cache [positions, rot_dim]): read only where chunk_flag[0] != 0.
    `launches` = (wide, narrow) settings of the plain specialization (the chunk one keeps
    `default_launch`'s, which a sweep's settings may not fit); default: `default_launch`.
    `chunks`: the step's chunk_flag if the caller knows it (one specialization launched), None
    under graph capture (both, each finding items only when the flag matches it at replay).
    `query_rope`: q comes before RoPE (config query_rope="backend"); each tile rotates it once, at
    its position (`q_pos`) minus its level's shift, with this table (the model's cos/sin cache).
    """
    num_heads, head_dim = q.shape[1:]
    num_kv_heads, page = k_cache.shape[1], k_cache.shape[2]
    g = num_heads // num_kv_heads
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and g <= NARROW_M
    o_part, l_part = partials
    shifts, page_valid, cos_sin = chunk_tables
    assert cos_sin.shape[1] % 2 == 0 and 2 <= cos_sin.shape[1] <= head_dim
    # Queries are rotated back for shared chunks with the key table, or from scratch with the model's.
    q_cos_sin = cos_sin if query_rope is None else query_rope
    assert q_cos_sin.shape[1] == cos_sin.shape[1] and q_cos_sin.stride(1) == 1
    assert shifts.stride(1) == 1 and cos_sin.stride(1) == 1 and page_valid.dtype == torch.int32
    item_range = wl["item_range"]
    kinds = (False, True) if chunks is None else (chunks,)
    # Narrow tiles first: under PDL the wide launch's long items start on the SMs that the narrow
    # launch's short items free, instead of the short items filling the tail of the long ones.
    tiles = ((NARROW_M, item_range[1:3], 1), (wide_m, item_range[0:2], 0))
    if q.shape[0] <= NARROW_M // g:
        # No query group exceeds one narrow tile, so build_worklist made no wide items: one launch
        # less per layer (also in the CUDA graphs of such batch sizes, e.g. batch-1 decode).
        tiles = tiles[:1]
    pdl = PDL and q.is_cuda and _has_pdl(q.device.index)
    first = True
    for block_m, bounds, which in tiles:
        for with_chunks in kinds:
            plain = launches and not with_chunks
            launch = launches[which] if plain else default_launch(which == 0, wide_m, with_chunks)
            _partials_kernel[(programs, num_kv_heads)](
                q, k_cache, v_cache, block_table, o_part, l_part,
                wl["q_off"], wl["q_len"], wl["bt_row"], wl["page_start"], wl["kv_len"], wl["causal"], wl["item_part"],
                bounds, wl["q_tokens"], wl["q_shift"], wl["q_pos"],
                wl["chunk_flag"], shifts, page_valid, cos_sin, q_cos_sin,
                scale * 1.4426950408889634,
                q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
                shifts.stride(0), cos_sin.stride(0), q_cos_sin.stride(0),
                G=g, PAGE=page, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=launch.block_n, ROT=cos_sin.shape[1],
                CHUNKS=with_chunks, Q_ROPE=query_rope is not None, PDL=pdl, **launch.kwargs(),
                **({"launch_pdl": True} if pdl and not first else {}),
            )  # fmt: skip
            first = False
    merge_partials(o_part, l_part, out, wl["contrib_off"], wl["contrib_row"], wl["num_tokens"], programs, pdl)


@functools.cache
def _has_pdl(device_index: int | None) -> bool:
    """Programmatic dependent launch: Hopper and later (asked once per device, not per layer)."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def merge_partials(o_part: torch.Tensor, l_part: torch.Tensor, out: torch.Tensor, contrib_off: torch.Tensor,
                   contrib_row: torch.Tensor, num_tokens: torch.Tensor, programs: int, pdl: bool = False) -> None:
    """out[t] = the exact merge of partial rows contrib_row[contrib_off[t]:contrib_off[t + 1]].

    o_part [rows, Hq, D] (any float dtype, normalized outputs), l_part [rows, Hq] float32
    log2-sum-exp (the kernels' and FlashInfer's convention); contrib_* int32 CSR on the device;
    num_tokens [1] int32 on the device (tokens to merge); `programs` x Hq persistent programs.
    A token with no partial rows gets zeros. `pdl`: launched as a programmatic dependent of the
    partials launch before it (see cascade_attention_triton).
    """
    assert o_part.is_contiguous() and l_part.is_contiguous() and out.stride(2) == 1
    _merge_kernel[(programs, out.shape[1])](
        o_part, l_part, out, contrib_off, contrib_row, num_tokens,
        out.stride(0), out.stride(1), HEAD_DIM=out.shape[2], PDL=pdl, **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip


@triton.jit
def _gather_rotate_kernel(
    Q, OUT, TOKENS, ROTATION, COS_SIN,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cs,
    NUM_HEADS: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM: tl.constexpr, ROT: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    tok = tl.load(TOKENS + r).to(tl.int64)
    heads = tl.arange(0, HEADS_P2)
    ok = heads < NUM_HEADS
    d = tl.arange(0, HEAD_DIM)
    row = Q + tok * stride_qt + heads * stride_qh
    x = tl.load(row[:, None] + d[None, :], mask=ok[:, None], other=0.0)
    x = _rotate_rows(x, row, tl.zeros([HEADS_P2], tl.int32) + tl.load(ROTATION + r), ok, COS_SIN, stride_cs,
                     HEAD_DIM, ROT)
    tl.store(OUT + r * stride_ot + heads[:, None] * stride_oh + d[None, :], x, mask=ok[:, None])


def gather_rotate(query: torch.Tensor, tokens: torch.Tensor, rotation: torch.Tensor, cos_sin_cache: torch.Tensor,
                  out: torch.Tensor) -> torch.Tensor:
    """out[r] = query[tokens[r]] RoPE-rotated by rotation[r] more positions (signed; neox over the
    cache's rot_dim), in query's dtype: the query of a row rotated once for a segment of keys that
    stand `-rotation[r]` positions off (kv/chunk_pages.py).

    query [T, Hq, D]; tokens, rotation [R] int32 on its device; out [R, Hq, D].
    """
    rows, heads, head_dim = out.shape
    if rows == 0:
        return out
    _gather_rotate_kernel[(rows,)](
        query, out, tokens, rotation, cos_sin_cache,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), cos_sin_cache.stride(0),
        NUM_HEADS=heads, HEADS_P2=triton.next_power_of_2(heads), HEAD_DIM=head_dim, ROT=cos_sin_cache.shape[1],
    )  # fmt: skip
    return out


def aligned_layout(sizes: dict[str, int], align: int = 4) -> tuple[dict[str, tuple[int, int]], int]:
    """Regions of int32 arrays in one buffer, each starting at a multiple of `align` elements (16
    bytes) -> ({name: (offset, length)}, total length). Triton specializes a pointer argument on its
    16-byte alignment, so regions whose offsets followed a step's sizes would compile new variants
    of the kernels reading them while serving, whenever a step's alignments are new."""
    layout, offset = {}, 0
    for name, size in sizes.items():
        layout[name] = (offset, size)
        offset += -(-size // align) * align
    return layout, offset


def pack_aligned(fields: dict[str, Sequence[int]]) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
    """Int32 arrays packed into one (one upload) at `aligned_layout` offsets -> (packed, layout).

    >>> packed, layout = pack_aligned({"a": [1, 2, 3], "b": [4]})
    >>> layout, packed.tolist()
    ({'a': (0, 3), 'b': (4, 1)}, [1, 2, 3, 0, 4, 0, 0, 0])
    """
    layout, total = aligned_layout({name: len(values) for name, values in fields.items()})
    packed = np.zeros(total, dtype=np.int32)
    for name, (start, n) in layout.items():
        packed[start : start + n] = fields[name]
    return packed, layout


# Which capacity sizes each work-list field's region ("items", "rows", "tokens"), plus a constant.
_REGIONS = {"q_off": ("items", 0), "q_len": ("items", 0), "bt_row": ("items", 0), "page_start": ("items", 0),
            "kv_len": ("items", 0), "causal": ("items", 0), "item_part": ("items", 0), "q_tokens": ("rows", 0),
            "q_shift": ("rows", 0),
            "q_pos": ("tokens", 0), "contrib_off": ("tokens", 1), "contrib_row": ("rows", 0),
            "item_range": (None, 3), "num_tokens": (None, 1), "chunk_flag": (None, 1)}


class TritonCascade:
    """The fused path with the interface of FlashInferCascade: plan once per step, run per layer.

    Every work-list field has a fixed region of one int32 buffer, sized by
    capacities (items, partial rows, tokens); the kernels are persistent, so
    their grids never depend on the step. Each step fills a pinned host copy
    (two alternate, an event guards reuse) and uploads it with one copy.

    Steps with composed requests (kv/chunk_pages.py) pass their key shifts to
    `plan`; they go to a persistent device table (see `set_chunk_tables`) and
    the image's `chunk_flag` turns the pad mask and key rotation on for that
    step, so one captured graph serves steps with and without chunks.

    Two ways to size the buffers:
    - `capacity=None`: they grow (to twice the need) when a step exceeds them;
      the pointers change then. For eager steps.
    - `capacity={"tokens": T, "rows": R, "items": I}`: allocated once, never
      moved, which is what replaying a captured CUDA graph needs. A step that
      would need more rows or items is cut into longer KV runs until it fits;
      with R and I >= T * levels one run per (tile, level) always fits.
    """

    name = "triton"

    def __init__(self, num_qo_heads: int, num_kv_heads: int, page_size: int, scale: float,
                 pages_per_item: int = 16, device: torch.device | str = "cuda", head_dim: int = 128,
                 wide_m: int = 64, capacity: dict[str, int] | None = None,
                 launches: tuple[Launch, Launch] | None = None, flat_pages_per_item: int | None = None,
                 programs_per_sm: int = 4, fill_programs: bool = False,
                 query_rope: torch.Tensor | None = None) -> None:
        self.num_qo_heads, self.group = num_qo_heads, num_qo_heads // num_kv_heads
        self.query_rope = query_rope  # queries come before RoPE: the model's cos/sin table rotates them
        self.page_size, self.scale, self.pages_per_item = page_size, scale, pages_per_item
        # Steps without shared levels stream each row's keys alone: longer runs per item pay there.
        self.flat_pages_per_item = flat_pages_per_item or pages_per_item
        self.head_dim, self.wide_m = head_dim, max(wide_m, NARROW_M)
        self.launches = launches  # (wide, narrow) without chunks; None: cascade_attention_triton's defaults
        self.device = torch.device(device)
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" else 1
        self.programs = max(2, programs_per_sm * sms // num_kv_heads)  # x num_kv_heads in the grid
        # Steps with fewer work items than programs get shorter runs, down to FILL_MIN_PAGES
        # (batch-1 decode of 640 keys: 38 -> 17 us per layer on the H100).
        self.fill_programs = fill_programs
        self.fixed = capacity is not None
        self.capacity = {"items": 0, "rows": 0, "tokens": 0}
        self._host: list[torch.Tensor] = []
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self.worklist: dict[str, torch.Tensor] = {}
        self.block_table: torch.Tensor | None = None
        self.last_pages_per_item = pages_per_item
        self._image = np.zeros(0, dtype=np.int32)  # the buffer's contents as last planned, on the host
        self._decode: tuple | None = None  # what the last decode step was planned from, to advance it
        # Stand-ins until set_chunk_tables (never read: the flag stays 0): no shift, full pages, identity RoPE.
        self._shifts = torch.zeros(1, 1, dtype=torch.int32, device=self.device)
        self._page_valid = torch.full((1,), page_size, dtype=torch.int32, device=self.device)
        self._cos_sin = torch.tensor([[1.0] * (head_dim // 2) + [0.0] * (head_dim // 2)], device=self.device)
        self._has_chunk_tables = False
        if capacity is not None:
            self._allocate(capacity)

    def set_chunk_tables(self, page_valid: torch.Tensor, cos_sin_cache: torch.Tensor, max_rows: int,
                         max_pages: int) -> None:
        """Once, before any graph capture: the tables steps with chunks read. `page_valid` [num_pages]
        int32 (keys per page; its owner updates it in place), vLLM's `cos_sin_cache` [max_position,
        rot_dim], and room for shifts of up to max_rows rows x max_pages block-table entries."""
        self._shifts = torch.zeros(max_rows, max_pages, dtype=torch.int32, device=self.device)
        self._shifts_source, self._shifts_cols = None, 0
        self._page_valid, self._cos_sin = page_valid, cos_sin_cache
        self._has_chunk_tables = True

    def plan(self, plan, block_table: torch.Tensor, seq_lens: np.ndarray, query_start_loc: np.ndarray,
             shifts: np.ndarray | None = None) -> bool:
        """Fill and upload this step's work list; `shifts` [rows, >= pages used] int32 are the key
        shifts of a step with chunks (None: none). -> True if it advanced the last decode step's work
        list instead of building one (same requests, same levels, each one token further)."""
        advanced = self._advance(plan, seq_lens, query_start_loc)
        if not advanced:
            self._build(plan, seq_lens, query_start_loc)
        # Set on every step, advanced or not: the flag is the only thing telling the kernel.
        self._image[self._layout["chunk_flag"][0]] = int(shifts is not None)
        if shifts is not None:
            self._copy_shifts(shifts, seq_lens)
        host = self._next_host()
        np.copyto(host.numpy(), self._image)  # numpy: a fraction of torch's per-call cost
        if self.device.type == "cpu":
            self._dev.copy_(host)
        else:
            self._dev.copy_(host, non_blocking=True)
            self._copied[self._turn] = torch.cuda.Event()
            self._copied[self._turn].record()
        self.block_table = block_table
        return advanced

    def _copy_shifts(self, shifts: np.ndarray, seq_lens: np.ndarray) -> None:
        """Into the persistent table's rows [0, rows), the columns in use (the rest is never read)."""
        if not self._has_chunk_tables:
            raise RuntimeError("plan() got shifts before set_chunk_tables()")
        rows = len(seq_lens)
        cols = -(-int(np.max(seq_lens, initial=0)) // self.page_size)
        if shifts.shape[0] < rows or shifts.shape[1] < cols:
            raise ValueError(f"shifts {shifts.shape} do not cover {rows} rows x {cols} pages")
        if rows > self._shifts.shape[0] or cols > self._shifts.shape[1]:
            raise RuntimeError(f"shifts of {rows} x {cols} pages exceed the table {tuple(self._shifts.shape)}")
        if shifts is self._shifts_source and cols <= self._shifts_cols:
            return  # a decode step reusing the last plan: the same shifts are on the device
        # A blocking copy from pageable memory, in stream order before this step's kernels. It waits for
        # the device, so it is done only when the shifts change (new requests, a new plan).
        # Columns past the pages in use too (the host rows are zeros there, as pages the rows grow
        # into are): stale shifts of earlier requests are overwritten before they could be read.
        cols = min(cols + 64, shifts.shape[1], self._shifts.shape[1])
        self._shifts[:rows, :cols].copy_(torch.from_numpy(np.ascontiguousarray(shifts[:rows, :cols], np.int32)))
        self._shifts_source, self._shifts_cols = shifts, cols

    def _build(self, plan, seq_lens: np.ndarray, query_start_loc: np.ndarray) -> None:
        from vllm_cascade.attention.worklist import build_worklist

        def worklist(pages_per_item: int) -> WorkList:
            return build_worklist(plan, seq_lens, query_start_loc, self.page_size, NARROW_M // self.group,
                                  pages_per_item, self.wide_m // self.group)

        pages_per_item = self.flat_pages_per_item if plan.is_flat else self.pages_per_item
        wl = worklist(pages_per_item)
        if self.fill_programs and wl.num_items < self.programs:
            # Fewer items than programs (small batches) leave most of the GPU idle: shorter runs.
            # Steps with enough items keep long runs, which have fewer partials to merge.
            shorter = max(FILL_MIN_PAGES, plan.pages_read // self.programs)
            if shorter < pages_per_item:
                pages_per_item, wl = shorter, worklist(shorter)
        max_pages = -(-int(np.max(seq_lens, initial=0)) // self.page_size)
        while True:
            need = {"items": wl.num_items, "rows": wl.num_partial_rows, "tokens": len(wl.q_pos)}
            short = [k for k in need if need[k] > self.capacity[k]]
            if not short:
                break
            if not self.fixed:
                self._allocate({k: max(self.capacity[k], 2 * need[k], 16) for k in need})
                break
            if "tokens" in short or pages_per_item >= max_pages:
                raise WorkListTooLarge(f"Cascade step needs {need}, over the fixed capacity {self.capacity}")
            pages_per_item *= 2
            wl = worklist(pages_per_item)
        self.last_pages_per_item = pages_per_item
        arrays = {name: getattr(wl, name) for name in WorkList.__dataclass_fields__ if name != "num_wide"}
        arrays.update(item_range=[0, wl.num_wide, wl.num_items], num_tokens=[len(wl.q_pos)])
        for name, array in arrays.items():  # all regions but chunk_flag, which plan() sets
            offset = self._layout[name][0]
            self._image[offset : offset + len(array)] = array
        self._decode = None
        rows = len(seq_lens)
        if is_decode_step(query_start_loc, rows):
            # Own items (causal) come last, each row's in row order; a row's last one holds its newest key.
            own = np.flatnonzero(wl.causal == 1)
            own_row = wl.bt_row[own]
            last_item = own[np.r_[own_row[1:] != own_row[:-1], True]] if len(own) else own
            if len(last_item) == rows and (wl.bt_row[last_item] == np.arange(rows)).all():
                self._decode = (plan.shared, plan.own_first_page, seq_lens, last_item, pages_per_item)

    def _advance(self, plan, seq_lens: np.ndarray, query_start_loc: np.ndarray) -> bool:
        """The last decode step's work list, each row one token further, if nothing else changed:
        the same levels (a reused plan) or none, the same rows each with one more key, and no row's
        newest item full (else the row needs a new item: build)."""
        if self._decode is None:
            return False
        shared, own_first_page, last_seq, last_item, pages_per_item = self._decode
        same_levels = (plan.shared is shared and plan.own_first_page is own_first_page) or (
            plan.is_flat and not shared)
        if not same_levels or len(seq_lens) != len(last_seq) or not is_decode_step(query_start_loc, len(seq_lens)):
            return False
        if not (seq_lens == last_seq + 1).all():
            return False
        kv_at = self._layout["kv_len"][0] + last_item
        kv_len = self._image[kv_at]
        if (kv_len >= pages_per_item * self.page_size).any():
            return False
        self._image[kv_at] = kv_len + 1
        q_pos_at = self._layout["q_pos"][0]
        self._image[q_pos_at : q_pos_at + len(seq_lens)] += 1
        self._decode = (shared, own_first_page, seq_lens, last_item, pages_per_item)
        return True

    @property
    def chunked(self) -> bool:
        """The planned step's chunk_flag (as uploaded)."""
        return bool(self._image[self._layout["chunk_flag"][0]])

    @property
    def partial_rows(self) -> int:
        """Partial results the planned step's merge combines (one per tile token and KV run)."""
        tokens = int(self._image[self._layout["num_tokens"][0]])
        return int(self._image[self._layout["contrib_off"][0] + tokens])

    def run(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor) -> None:
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        cascade_attention_triton(query, k_cache, v_cache, self.block_table, self.worklist, self.scale, out,
                                 self.partials, self.wide_m, self.programs,
                                 (self._shifts, self._page_valid, self._cos_sin), self.launches,
                                 chunks=None if capturing else self.chunked, query_rope=self.query_rope)

    def _allocate(self, capacity: dict[str, int]) -> None:
        """New regions (pointers change: a captured graph must be captured again after this)."""
        self.capacity = dict(capacity)
        self._layout, offset = aligned_layout({name: (capacity[key] if key else 0) + extra
                                               for name, (key, extra) in _REGIONS.items()})
        pinned = self.device.type == "cuda"
        self._host = [torch.zeros(offset, dtype=torch.int32, pin_memory=pinned) for _ in range(2)]
        self._image = np.zeros(offset, dtype=np.int32)
        self._decode = None
        self._copied = [None, None]
        self._dev = torch.zeros(offset, dtype=torch.int32, device=self.device)
        self.worklist = {name: self._dev[o : o + n] for name, (o, n) in self._layout.items()}
        rows = capacity["rows"]
        self.partials = (torch.empty(rows, self.num_qo_heads, self.head_dim, dtype=torch.float32, device=self.device),
                         torch.empty(rows, self.num_qo_heads, dtype=torch.float32, device=self.device))

    def _next_host(self) -> torch.Tensor:
        self._turn ^= 1
        if self._copied[self._turn] is not None:
            self._copied[self._turn].synchronize()  # its upload was queued two steps ago
        return self._host[self._turn]
