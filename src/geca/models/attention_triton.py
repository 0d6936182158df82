"""3×3 neighbourhood attention as two Triton kernels: one forward, one backward, no 9× copy of anything.

The forward keeps an online softmax over the 9 window positions in float32 (float64 for float64 inputs) and saves
only the output and one log-sum-exp per query. The backward recomputes the attention weights and gathers every
gradient instead of scattering: a cell's dQ comes from its window, its dK and dV from the queries of the same 9
cells (the window is symmetric), so no two programs write the same cell and the result is deterministic
without atomics.

Dead cells outside the grid are zero keys and values that still take part in the softmax with logit 0, as in
:mod:`geca.models.attention`. Triton runs on CUDA; with ``TRITON_INTERPRET=1`` its interpreter runs the same
kernels on CPU tensors (slowly), which is how the tests check them without a GPU.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

# Inputs q, k, v, dO are read through their strides, so GeCA's permuted views of one fused qkv projection are never
# copied; outputs, LSE and delta are contiguous (B·heads, H·W[, width]). The grid is 1-D (CUDA caps its other axes
# at 65,535): program p takes cell tile p % tiles of head-batch p // tiles.

@triton.jit
def _tile(height, width, BLOCK: tl.constexpr):  # noqa: N803
    """This program's head-batch index and its BLOCK cells: flat index, in-grid mask, row, column."""
    grid_cells = height * width
    tiles = (grid_cells + BLOCK - 1) // BLOCK
    pid = tl.program_id(0)
    cells = (pid % tiles) * BLOCK + tl.arange(0, BLOCK)
    return (pid // tiles).to(tl.int64), cells, cells < grid_cells, cells // width, cells % width


@triton.jit
def _base(bh, heads, stride_b, stride_h):
    """Offset of head-batch ``bh`` in a (B, heads, …) tensor with these batch and head strides."""
    return (bh // heads) * stride_b + (bh % heads) * stride_h


@triton.jit
def _scale(head_dim, BLOCK: tl.constexpr, ACC: tl.constexpr):  # noqa: N803
    """1/sqrt(head_dim) in the accumulation dtype: a Python float argument would be float32 even for float64."""
    return 1.0 / tl.sqrt(tl.full([BLOCK], head_dim, ACC))


@triton.jit
def _neighbour_forward(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, heads, height, width, head_dim, value_dim,
                       sq_b, sq_h, sq_r, sq_c, sk_b, sk_h, sk_r, sk_c, sv_b, sv_h, sv_r, sv_c,
                       BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  # noqa: N803
                       ACC: tl.constexpr):  # noqa: N803
    bh, cells, live, row, col = _tile(height, width, BLOCK)
    grid_cells = height * width
    q_base = _base(bh, heads, sq_b, sq_h)
    k_base = _base(bh, heads, sk_b, sk_h)
    v_base = _base(bh, heads, sv_b, sv_h)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    d_ok = d < head_dim
    dv_ok = dv < value_dim
    scale = _scale(head_dim, BLOCK, ACC)

    q = tl.load(q_ptr + q_base + (row * sq_r + col * sq_c)[:, None] + d[None, :],
                mask=live[:, None] & d_ok[None, :], other=0.0).to(ACC)
    m = tl.full([BLOCK], float("-inf"), ACC)
    denom = tl.zeros([BLOCK], ACC)
    acc = tl.zeros([BLOCK, BLOCK_DV], ACC)
    for n in tl.static_range(9):
        r = row + (n // 3 - 1)
        c = col + (n % 3 - 1)
        inside = live & (r >= 0) & (r < height) & (c >= 0) & (c < width)
        k = tl.load(k_ptr + k_base + (r * sk_r + c * sk_c)[:, None] + d[None, :],
                    mask=inside[:, None] & d_ok[None, :], other=0.0).to(ACC)
        v = tl.load(v_ptr + v_base + (r * sv_r + c * sv_c)[:, None] + dv[None, :],
                    mask=inside[:, None] & dv_ok[None, :], other=0.0).to(ACC)
        s = tl.sum(q * k, axis=1) * scale
        m_new = tl.maximum(m, s)
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        acc = acc * alpha[:, None] + p[:, None] * v
        denom = denom * alpha + p
        m = m_new
    out = acc / denom[:, None]
    tl.store(o_ptr + bh * grid_cells * value_dim + cells[:, None] * value_dim + dv[None, :],
             out.to(o_ptr.dtype.element_ty), mask=live[:, None] & dv_ok[None, :])
    tl.store(lse_ptr + bh * grid_cells + cells, m + tl.log(denom), mask=live)


@triton.jit
def _neighbour_backward(q_ptr, k_ptr, v_ptr, go_ptr, lse_ptr, delta_ptr, gq_ptr, gk_ptr, gv_ptr,
                        heads, height, width, head_dim, value_dim,
                        sq_b, sq_h, sq_r, sq_c, sk_b, sk_h, sk_r, sk_c, sv_b, sv_h, sv_r, sv_c,
                        sg_b, sg_h, sg_r, sg_c,
                        BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  # noqa: N803
                        ACC: tl.constexpr):  # noqa: N803
    bh, cells, live, row, col = _tile(height, width, BLOCK)
    grid_cells = height * width
    q_base = _base(bh, heads, sq_b, sq_h)
    k_base = _base(bh, heads, sk_b, sk_h)
    v_base = _base(bh, heads, sv_b, sv_h)
    g_base = _base(bh, heads, sg_b, sg_h)
    cell_base = bh * grid_cells
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    d_ok = d < head_dim
    dv_ok = dv < value_dim
    own_d = live[:, None] & d_ok[None, :]
    own_dv = live[:, None] & dv_ok[None, :]
    scale = _scale(head_dim, BLOCK, ACC)

    q = tl.load(q_ptr + q_base + (row * sq_r + col * sq_c)[:, None] + d[None, :], mask=own_d, other=0.0).to(ACC)
    k = tl.load(k_ptr + k_base + (row * sk_r + col * sk_c)[:, None] + d[None, :], mask=own_d, other=0.0).to(ACC)
    v = tl.load(v_ptr + v_base + (row * sv_r + col * sv_c)[:, None] + dv[None, :], mask=own_dv, other=0.0).to(ACC)
    go = tl.load(go_ptr + g_base + (row * sg_r + col * sg_c)[:, None] + dv[None, :], mask=own_dv,
                 other=0.0).to(ACC)
    lse = tl.load(lse_ptr + cell_base + cells, mask=live, other=0.0)
    delta = tl.load(delta_ptr + cell_base + cells, mask=live, other=0.0)
    gq = tl.zeros([BLOCK, BLOCK_D], ACC)
    gk = tl.zeros([BLOCK, BLOCK_D], ACC)
    gv = tl.zeros([BLOCK, BLOCK_DV], ACC)
    for n in tl.static_range(9):
        # The window is symmetric: the queries whose windows hold this cell are its own 9 neighbours.
        r = row + (n // 3 - 1)
        c = col + (n % 3 - 1)
        inside = live & (r >= 0) & (r < height) & (c >= 0) & (c < width)
        in_d = inside[:, None] & d_ok[None, :]
        in_dv = inside[:, None] & dv_ok[None, :]
        # As a query: the neighbour's key and value (zero where that cell is dead).
        kn = tl.load(k_ptr + k_base + (r * sk_r + c * sk_c)[:, None] + d[None, :], mask=in_d, other=0.0).to(ACC)
        vn = tl.load(v_ptr + v_base + (r * sv_r + c * sv_c)[:, None] + dv[None, :], mask=in_dv, other=0.0).to(ACC)
        p = tl.exp(tl.sum(q * kn, axis=1) * scale - lse)
        ds = p * (tl.sum(go * vn, axis=1) - delta)
        gq += ds[:, None] * kn
        # As a key and value: the neighbour's query weighs this cell (dead neighbours ask nothing).
        qn = tl.load(q_ptr + q_base + (r * sq_r + c * sq_c)[:, None] + d[None, :], mask=in_d, other=0.0).to(ACC)
        gon = tl.load(go_ptr + g_base + (r * sg_r + c * sg_c)[:, None] + dv[None, :], mask=in_dv,
                      other=0.0).to(ACC)
        lse_n = tl.load(lse_ptr + cell_base + r * width + c, mask=inside, other=0.0)
        delta_n = tl.load(delta_ptr + cell_base + r * width + c, mask=inside, other=0.0)
        p = tl.where(inside, tl.exp(tl.sum(qn * k, axis=1) * scale - lse_n), 0.0)
        ds = p * (tl.sum(gon * v, axis=1) - delta_n)
        gk += ds[:, None] * qn
        gv += p[:, None] * gon
    qk_out = bh * grid_cells * head_dim + cells[:, None] * head_dim + d[None, :]
    tl.store(gq_ptr + qk_out, (gq * scale[:, None]).to(gq_ptr.dtype.element_ty), mask=own_d)
    tl.store(gk_ptr + qk_out, (gk * scale[:, None]).to(gk_ptr.dtype.element_ty), mask=own_d)
    tl.store(gv_ptr + bh * grid_cells * value_dim + cells[:, None] * value_dim + dv[None, :],
             gv.to(gv_ptr.dtype.element_ty), mask=own_dv)


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _launch_config(head_dim: int, value_dim: int, cells: int, tile: int) -> tuple[int, int, int]:
    """Cells per program and the padded head widths; ``tile`` caps one (cells × width) tile's elements so that the
    forward's few live tiles (4,096) and the backward's ~11 (2,048) fit 4 warps' registers. Untuned: no GPU was at
    hand when this was written."""
    block_d, block_dv = triton.next_power_of_2(head_dim), triton.next_power_of_2(value_dim)
    block = max(4, min(128, tile // max(block_d, block_dv), triton.next_power_of_2(cells)))
    return block, block_d, block_dv


def _strides(x: Tensor) -> tuple[int, int, int, int]:
    """(batch, head, row, column) strides of a (B, heads, H, W, C) tensor whose last dimension is contiguous."""
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


def _unit_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _on_device(x: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device, not the tensors': make theirs current (e.g. --device cuda:1)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


class TritonNeighbourhoodAttention(torch.autograd.Function):
    """q, k: (B, heads, H, W, d); v: (B, heads, H, W, dv), any strides. Saves q, k, v (views, not copies), the
    output and one LSE per query."""

    @staticmethod
    def forward(ctx: FunctionCtx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b, heads, h, w, d = q.shape
        dv = v.shape[-1]
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        out = torch.empty(b, heads, h, w, dv, dtype=v.dtype, device=v.device)
        acc = torch.promote_types(q.dtype, torch.float32)  # float64 inputs accumulate in float64
        lse = torch.empty(b, heads, h, w, dtype=acc, device=q.device)
        block, block_d, block_dv = _launch_config(d, dv, h * w, tile=4096)
        with _on_device(q):
            _neighbour_forward[(triton.cdiv(h * w, block) * b * heads,)](
                q, k, v, out, lse, heads, h, w, d, dv, *_strides(q), *_strides(k), *_strides(v),
                BLOCK=block, BLOCK_D=block_d, BLOCK_DV=block_dv, ACC=_TL_DTYPES[acc])
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, out, lse = ctx.saved_tensors
        b, heads, h, w, d = q.shape
        dv = v.shape[-1]
        grad_out = _unit_last(grad_out)
        # Σ_n p_n dp_n per query, the softmax backward's shared term: (B, heads, H, W).
        delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
        grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        grad_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        grad_v = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        block, block_d, block_dv = _launch_config(d, dv, h * w, tile=2048)
        with _on_device(q):
            _neighbour_backward[(triton.cdiv(h * w, block) * b * heads,)](
                q, k, v, grad_out, lse, delta, grad_q, grad_k, grad_v, heads, h, w, d, dv,
                *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out),
                BLOCK=block, BLOCK_D=block_d, BLOCK_DV=block_dv, ACC=_TL_DTYPES[lse.dtype])
        return grad_q, grad_k, grad_v


def triton_neighbourhood_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return TritonNeighbourhoodAttention.apply(q, k, v)
