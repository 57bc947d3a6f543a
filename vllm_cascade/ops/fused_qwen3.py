"""Fused kernels of the Qwen3 model class (models/qwen3.py): Triton on the GPU, torch references on the CPU.

The model folds each RMSNorm weight into the projection after it, so a layer's
projections read the raw hidden stream `h` and their outputs need the row
scale `1/rms(h)`. Both projections are followed by an elementwise step that
exists anyway (QK-norm + RoPE after QKV, SiLU-and-mul after gate/up), so the
row scale and the sum of squares that gives it go into those two kernels:
each reads its row of `h` (hidden_size elements, 2-8 KB) while it runs. No
standalone norm kernel is left in a layer, and no normalized copy of `h` is
ever written. (The residual adds go into the o_proj / down_proj GEMMs as
`addmm(h, x, W.T)`, see the model; so a "residual add + RMSNorm" kernel is
not needed either.)

Per layer on the GPU, for tensor parallel size 1:

    qkv = h @ Wqkv'.T                            cuBLAS (W' = W * norm weight)
    q, k, v = qk_norm_rope(qkv, h, positions)    Triton, below
    a = attention(q, k, v)                       the attention backend
    h = h + a @ Wo.T                             cuBLAS addmm
    gu = h @ Wgu'.T                              cuBLAS
    x = silu_mul_scaled(gu, h)                   Triton, below
    h = h + x @ Wd.T                             cuBLAS addmm

Stock vLLM under Inductor has two more kernels per layer (its fused add +
RMSNorm before each of the two projections).

Functions (each CUDA kernel has a torch reference of the same signature):

- `qk_norm_rope(qkv, hidden, positions, q_weight, k_weight, cos_sin_cache, ...)`
  -> (q, k, v): row scale 1/rms(hidden), per-head RMSNorm of q and k with
  their weights, neox RoPE from vLLM's `cos_sin_cache` ([max_pos, rot_dim],
  cos in the first half, sin in the second), v scaled only. `rotate_q=False`
  leaves q un-rotated (the cascade hand-off, see models/qwen3.py).
- `silu_mul_scaled(gate_up, hidden, eps)` -> silu(g * s) * (u * s), s = 1/rms(hidden).
- `apply_rope_ref(x, positions, cos_sin_cache, head_dim)`: the rotation alone
  (what a backend that takes the un-rotated query applies per level).

On CUDA they run as torch custom ops (`torch.ops.vllm_cascade.*`, registered
with vLLM's `direct_register_custom_op` and a fake implementation), so
Dynamo treats them as opaque nodes and FULL CUDA graphs capture the Triton
launches; on the CPU the same ops dispatch to the torch references. All
arithmetic is in float32, rounded once to the output dtype.

The kernels also run under Triton's interpreter on the CPU (`TRITON_INTERPRET=1`
before triton is first imported); that is how tests/test_fused_qwen3.py checks them.

Example (CUDA; on the CPU call `qk_norm_rope_triton` the same way under
TRITON_INTERPRET=1, or the `*_ref` functions):

    import torch
    from vllm_cascade.ops.fused_qwen3 import qk_norm_rope, silu_mul_scaled
    T, H, nq, nkv, D = 3, 1024, 16, 8, 128
    dev, dt = "cuda", torch.bfloat16
    h = torch.randn(T, H, device=dev, dtype=dt)
    qkv = torch.randn(T, (nq + 2 * nkv) * D, device=dev, dtype=dt)
    pos = torch.arange(T, device=dev)
    inv_freq = 1e6 ** -(torch.arange(0, D, 2, dtype=torch.float) / D)
    freqs = torch.arange(4096, dtype=torch.float)[:, None] * inv_freq
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1).to(dev, dt)
    w = torch.ones(D, device=dev, dtype=dt)
    q, k, v = qk_norm_rope(qkv, h, pos, w, w, cos_sin, nq, nkv, D, 1e-6, 1e-6)
    x = silu_mul_scaled(torch.randn(T, 2 * 3072, device=dev, dtype=dt), h, 1e-6)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NAMESPACE = "vllm_cascade"
MAX_BLOCK_HIDDEN = 4096  # elements of `hidden` summed per loop step
SMALL_BATCH = 256  # up to this many rows, silu_mul_scaled uses more, smaller programs per row


# ----------------------------------------------------------------------------- torch references


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """[T, H] -> [T, 1]: 1 / sqrt(mean(x^2) + eps), in float32 as vLLM's RMSNorm computes it."""
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)


def apply_rope_ref(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int
                   ) -> torch.Tensor:
    """Neox RoPE of [T, n * head_dim] or [T, n, head_dim] (any float dtype) at `positions` (one per
    token); float32 out, shape [T, n, head_dim].

    `cos_sin_cache` is vLLM's [max_position, rot_dim], cos in the first half, sin in the second;
    the first rot_dim dims of each head rotate, the rest pass through (partial rotary). A negative
    position rotates backwards (the cache at |p| with sin negated): how a cascade level shifts an
    already rotated query to a chunk's offset (ops/chunk_attention.py).
    """
    positions = positions.flatten()
    cos, sin = cos_sin_cache.index_select(0, positions.abs()).float().chunk(2, dim=-1)
    sin = sin * positions.sign().float()[:, None]  # exact (x 1, or sin 0 at 0); no data-dependent branch to compile
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = cos.shape[-1]
    x = x.float().reshape(x.shape[0], -1, head_dim)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def qk_norm_rope_ref(
    qkv: torch.Tensor, hidden: torch.Tensor | None, positions: torch.Tensor, q_weight: torch.Tensor,
    k_weight: torch.Tensor, cos_sin_cache: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int,
    eps_hidden: float, eps_head: float, rotate_q: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference of the QKV epilogue: -> q [T, nq*D], k [T, nkv*D], v [T, nkv*D] (contiguous)."""
    t = qkv.shape[0]
    x = qkv.float()
    if hidden is not None:  # the input norm's row scale (its weight is folded into the QKV weights)
        x = x * inverse_rms(hidden, eps_hidden)
    q, k, v = x.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)

    def head_norm(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        y = y.reshape(t, -1, head_dim)
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps_head) * weight.float()

    q, k = head_norm(q, q_weight), head_norm(k, k_weight)
    k = apply_rope_ref(k.reshape(t, -1), positions, cos_sin_cache, head_dim)
    if rotate_q:
        q = apply_rope_ref(q.reshape(t, -1), positions, cos_sin_cache, head_dim)
    dtype = qkv.dtype
    return q.reshape(t, -1).to(dtype), k.reshape(t, -1).to(dtype), v.contiguous().to(dtype)


def silu_mul_scaled_ref(gate_up: torch.Tensor, hidden: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Torch reference: [T, 2I] -> [T, I], silu(g * s) * (u * s) with s = 1/rms(hidden) (1 if hidden is None)."""
    x = gate_up.float()
    if hidden is not None:
        x = x * inverse_rms(hidden, eps)
    g, u = x.chunk(2, dim=-1)
    return (torch.nn.functional.silu(g) * u).to(gate_up.dtype)


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _row_inv_rms(X, row, stride, eps, N: tl.constexpr, BLOCK: tl.constexpr):
    # Sum of squares of one row in float32, BLOCK elements at a time.
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(X + row * stride + cols, mask=cols < N, other=0.0).to(tl.float32)
        acc += x * x
    return tl.rsqrt(tl.sum(acc, axis=0) / N + eps)


@triton.jit
def _norm_rope_heads(SRC, DST, W, cos, sin, scale, eps, NH: tl.constexpr, NH_P2: tl.constexpr,
                     HEAD_DIM: tl.constexpr, HALF: tl.constexpr, ROTATE: tl.constexpr):
    # NH heads at SRC (contiguous [NH, HEAD_DIM]) -> RMSNorm per head * W -> neox RoPE -> DST.
    heads = tl.arange(0, NH_P2)[:, None]
    cols = tl.arange(0, HALF)[None, :]
    mask = heads < NH
    off = heads * HEAD_DIM + cols
    x1 = tl.load(SRC + off, mask=mask, other=0.0).to(tl.float32) * scale
    x2 = tl.load(SRC + off + HALF, mask=mask, other=0.0).to(tl.float32) * scale
    r = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM + eps)[:, None]
    w1 = tl.load(W + tl.arange(0, HALF)).to(tl.float32)[None, :]
    w2 = tl.load(W + HALF + tl.arange(0, HALF)).to(tl.float32)[None, :]
    y1 = x1 * r * w1
    y2 = x2 * r * w2
    if ROTATE:
        o1 = y1 * cos - y2 * sin
        o2 = y2 * cos + y1 * sin
    else:
        o1 = y1
        o2 = y2
    tl.store(DST + off, o1.to(DST.dtype.element_ty), mask=mask)
    tl.store(DST + off + HALF, o2.to(DST.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    QKV, HID, POS, QW, KW, COS_SIN, Q_OUT, K_OUT, V_OUT,
    stride_qkv, stride_hid, stride_cs, eps_hidden, eps_head,
    HIDDEN: tl.constexpr, BLOCK_HID: tl.constexpr, SCALE_ROWS: tl.constexpr,
    NQ: tl.constexpr, NQ_P2: tl.constexpr, NKV: tl.constexpr, NKV_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, ROTATE_Q: tl.constexpr,
):  # fmt: skip
    # Grid (tokens, 3): part 0 = q heads, 1 = k heads, 2 = v heads of one token. Each part takes
    # the row scale itself (3 reads of a 2-8 KB row, from L2 after the first) rather than a 4th launch.
    t = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    if SCALE_ROWS:
        scale = _row_inv_rms(HID, t, stride_hid, eps_hidden, HIDDEN, BLOCK_HID)
    else:
        scale = 1.0
    row = QKV + t * stride_qkv
    if part == 2:
        heads = tl.arange(0, NKV_P2)[:, None]
        off = heads * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
        mask = heads < NKV
        v = tl.load(row + (NQ + NKV) * HEAD_DIM + off, mask=mask, other=0.0).to(tl.float32) * scale
        tl.store(V_OUT + t * (NKV * HEAD_DIM) + off, v.to(V_OUT.dtype.element_ty), mask=mask)
    else:
        pos = tl.load(POS + t).to(tl.int64)
        cs = tl.arange(0, HALF)[None, :]
        cos = tl.load(COS_SIN + pos * stride_cs + cs).to(tl.float32)
        sin = tl.load(COS_SIN + pos * stride_cs + HALF + cs).to(tl.float32)
        if part == 0:
            _norm_rope_heads(row, Q_OUT + t * (NQ * HEAD_DIM), QW, cos, sin, scale, eps_head,
                             NQ, NQ_P2, HEAD_DIM, HALF, ROTATE_Q)
        else:
            _norm_rope_heads(row + NQ * HEAD_DIM, K_OUT + t * (NKV * HEAD_DIM), KW, cos, sin, scale, eps_head,
                             NKV, NKV_P2, HEAD_DIM, HALF, True)


@triton.jit
def _silu_mul_scaled_kernel(
    GU, HID, OUT, stride_gu, stride_hid, stride_out, eps,
    INTER: tl.constexpr, BLOCK: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_HID: tl.constexpr,
    SCALE_ROWS: tl.constexpr,
):  # fmt: skip
    # Grid (tokens, cdiv(INTER, BLOCK)); every program of a row takes that row's scale itself.
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    g = tl.load(GU + t * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + t * stride_gu + INTER + cols, mask=mask, other=0.0).to(tl.float32)
    if SCALE_ROWS:
        s = _row_inv_rms(HID, t, stride_hid, eps, HIDDEN, BLOCK_HID)
        g = g * s
        u = u * s
    out = g * tl.sigmoid(g) * u
    tl.store(OUT + t * stride_out + cols, out.to(OUT.dtype.element_ty), mask=mask)


def _check_rows(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"{name}: expected a 2-D tensor with contiguous rows, got {tuple(x.shape)} {x.stride()}")


def triton_supported(head_dim: int, rotary_dim: int, is_neox_style: bool) -> bool:
    """Shapes the Triton QK kernel handles: full neox rotation, head_dim a power of two >= 16."""
    return is_neox_style and rotary_dim == head_dim and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def qk_norm_rope_triton(
    qkv: torch.Tensor, hidden: torch.Tensor | None, positions: torch.Tensor, q_weight: torch.Tensor,
    k_weight: torch.Tensor, cos_sin_cache: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int,
    eps_hidden: float, eps_head: float, rotate_q: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton QKV epilogue; same contract as `qk_norm_rope_ref`."""
    _check_rows(qkv, "qkv")
    if not triton_supported(head_dim, cos_sin_cache.shape[-1], True):
        raise ValueError(f"head_dim {head_dim} / rotary dim {cos_sin_cache.shape[-1]} not supported")
    t = qkv.shape[0]
    q = qkv.new_empty(t, num_q_heads * head_dim)
    k = qkv.new_empty(t, num_kv_heads * head_dim)
    v = qkv.new_empty(t, num_kv_heads * head_dim)
    if t == 0:
        return q, k, v
    hid = qkv if hidden is None else hidden  # unused when SCALE_ROWS is off
    _check_rows(hid, "hidden")
    n_hid = hid.shape[-1]
    _qk_norm_rope_kernel[(t, 3)](
        qkv, hid, positions, q_weight, k_weight, cos_sin_cache, q, k, v,
        qkv.stride(0), hid.stride(0), cos_sin_cache.stride(0), eps_hidden, eps_head,
        HIDDEN=n_hid, BLOCK_HID=min(triton.next_power_of_2(n_hid), MAX_BLOCK_HIDDEN),
        SCALE_ROWS=hidden is not None,
        NQ=num_q_heads, NQ_P2=triton.next_power_of_2(num_q_heads),
        NKV=num_kv_heads, NKV_P2=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, HALF=head_dim // 2, ROTATE_Q=rotate_q,
        num_warps=4 if triton.next_power_of_2(num_q_heads) * head_dim <= 2048 else 8,  # the q block's registers
    )  # fmt: skip
    return q, k, v


def silu_mul_scaled_triton(gate_up: torch.Tensor, hidden: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The Triton gate/up epilogue; same contract as `silu_mul_scaled_ref`."""
    _check_rows(gate_up, "gate_up")
    t, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(t, inter)
    if t == 0:
        return out
    hid = gate_up if hidden is None else hidden
    _check_rows(hid, "hidden")
    n_hid = hid.shape[-1]
    # Few rows (decode): more programs per row for parallelism; many rows: fewer, so the row's scale
    # is summed fewer times.
    block = min(triton.next_power_of_2(inter), 1024 if t <= SMALL_BATCH else 4096)
    _silu_mul_scaled_kernel[(t, triton.cdiv(inter, block))](
        gate_up, hid, out, gate_up.stride(0), hid.stride(0), out.stride(0), eps,
        INTER=inter, BLOCK=block, HIDDEN=n_hid, BLOCK_HID=min(triton.next_power_of_2(n_hid), MAX_BLOCK_HIDDEN),
        SCALE_ROWS=hidden is not None,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------- custom ops


def _qk_norm_rope_fake(
    qkv: torch.Tensor, hidden: torch.Tensor | None, positions: torch.Tensor, q_weight: torch.Tensor,
    k_weight: torch.Tensor, cos_sin_cache: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int,
    eps_hidden: float, eps_head: float, rotate_q: bool = True,  # the dispatcher drops arguments equal to defaults
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = qkv.shape[0]
    return (qkv.new_empty(t, num_q_heads * head_dim), qkv.new_empty(t, num_kv_heads * head_dim),
            qkv.new_empty(t, num_kv_heads * head_dim))


def _silu_mul_scaled_fake(gate_up: torch.Tensor, hidden: torch.Tensor | None, eps: float) -> torch.Tensor:
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


def _register_ops() -> torch.library.Library:
    """`torch.ops.vllm_cascade.{qk_norm_rope, silu_mul_scaled}`: Triton on CUDA, the references on the CPU."""
    from vllm.utils.torch_utils import direct_register_custom_op

    lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    for name, cuda_fn, cpu_fn, fake in (
        ("qk_norm_rope", qk_norm_rope_triton, qk_norm_rope_ref, _qk_norm_rope_fake),
        ("silu_mul_scaled", silu_mul_scaled_triton, silu_mul_scaled_ref, _silu_mul_scaled_fake),
    ):
        direct_register_custom_op(name, cuda_fn, mutates_args=[], fake_impl=fake, target_lib=lib,
                                  dispatch_key="CUDA")
        lib.impl(name, cpu_fn, "CPU")
    return lib


_LIB = _register_ops()  # lives as long as this module: the ops are tied to it


def qk_norm_rope(
    qkv: torch.Tensor, hidden: torch.Tensor | None, positions: torch.Tensor, q_weight: torch.Tensor,
    k_weight: torch.Tensor, cos_sin_cache: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int,
    eps_hidden: float, eps_head: float, rotate_q: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The QKV epilogue as a custom op (opaque to torch.compile); see `qk_norm_rope_ref` for the math."""
    return torch.ops.vllm_cascade.qk_norm_rope(qkv, hidden, positions, q_weight, k_weight, cos_sin_cache,
                                               num_q_heads, num_kv_heads, head_dim, eps_hidden, eps_head, rotate_q)


def silu_mul_scaled(gate_up: torch.Tensor, hidden: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The gate/up epilogue as a custom op; see `silu_mul_scaled_ref` for the math."""
    return torch.ops.vllm_cascade.silu_mul_scaled(gate_up, hidden, eps)
