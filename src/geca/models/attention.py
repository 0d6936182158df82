"""3×3 neighbourhood attention on a grid of cells (GeCA's localized attention).

Every cell's query attends to the 9 keys of the 3×3 window centred on it, itself included. Cells outside the
grid are dead: zero keys and zero values that still take part in the softmax with logit 0 ("Z semantics", the
behaviour of the published GeCA/ViTCA code, which zero-pads through a conv2d with ``padding='same'``).

All implementations take q, k, v of shape (B, heads, H, W, head_dim) — v may have its own last dimension — and
scale the logits by 1/sqrt(head_dim) of q. They agree to float rounding:

- ``"reference"``: the published code's algorithm, materialising 9 copies of K and V with impulse filters.
- ``"fast"``: nine shifted slices of zero-padded K/V with a hand-written backward; best in eager mode.
- ``"sliced"``: the same nine-slice maths in plain autograd ops.
- ``"compiled"``: ``"sliced"`` under ``torch.compile``: one fused kernel each way (``model.compile``).
- ``"triton"``: fused forward and backward Triton kernels (CUDA; :mod:`geca.models.attention_triton`).
- ``"cpu"``: fused forward and backward C kernels (CPU; :mod:`geca.models.attention_cpu`), ``"fast"`` where no C
  compiler builds them.

A model passes its packed qkv projection to :func:`packed_attention`, which the C kernels read in place.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from geca.utils.hardware import quiet_compile

__all__ = ["IMPLEMENTATIONS", "NeighbourhoodAttentionFunction", "neighbourhood_attention", "packed_attention",
           "runnable"]

_WINDOW = 3


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for logits, softmax and accumulations: at least float32 (bf16/fp16 inputs are upcast)."""
    return torch.promote_types(dtype, torch.float32)


def _pad(x: Tensor) -> Tensor:
    """Surround the H×W grid of (B, heads, H, W, C) with one ring of dead (zero) cells."""
    return F.pad(x, (0, 0, 1, 1, 1, 1))


def _padded_zeros(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Zeros shaped like ``_pad(x)``, allocated directly rather than by padding a zero tensor."""
    b, heads, h, w, c = x.shape
    return torch.zeros(b, heads, h + 2, w + 2, c, dtype=dtype, device=x.device)


def _interior(xp: Tensor) -> Tensor:
    """Inverse of :func:`_pad` (a view)."""
    return xp[:, :, 1:-1, 1:-1]


def _shifted(xp: Tensor) -> Iterator[Tensor]:
    """The 9 neighbour views of a padded grid, row-major over the window (the reference's filter order).

    View n at cell (i, j) holds the padded cell (i + n // 3, j + n % 3), i.e. the original cell
    (i + n // 3 - 1, j + n % 3 - 1), or a dead cell where that lies outside the grid.
    """
    h, w = xp.shape[2] - _WINDOW + 1, xp.shape[3] - _WINDOW + 1
    for di in range(_WINDOW):
        for dj in range(_WINDOW):
            yield xp[:, :, di : di + h, dj : dj + w]


def _dots(x: Tensor, yp: Tensor, dtype: torch.dtype) -> Tensor:
    """(..., 9) dot products of x with each neighbour view of the padded yp, summed in ``dtype``."""
    # One reused scratch buffer: a fresh product tensor per neighbour costs more in page faults than in maths. Dense,
    # not x's permuted layout (empty_like): torch.compile refuses a non-contiguous out= and breaks the graph there.
    buf = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return torch.stack([torch.mul(x, yn, out=buf).sum(-1, dtype=dtype) for yn in _shifted(yp)], dim=-1)


def _softmax(logits: Tensor, scale: float) -> Tensor:
    """Softmax over the 9 neighbours, in at least float32."""
    return (logits.to(_acc_dtype(logits.dtype)) * scale).softmax(dim=-1)


# Elements of q per batch chunk on a CPU (1 MiB in float32): the nine passes over a chunk then run in cache rather
# than from main memory, which made CPU sampling batches 1.7× slower (measured: 200 images at 28×28, 3 heads × 32).
# A GPU takes the batch whole: there each chunk costs a few dozen kernel launches (GeCA-S, batch 32: 117 k ops per
# training step instead of 6 k).
_CHUNK = 1 << 18


def _chunks(x: Tensor) -> Iterator[slice]:
    """Slices of the batch dimension, each about `_CHUNK` elements of x on a CPU; one slice elsewhere."""
    if x.device.type != "cpu":
        return iter((slice(None),))
    step = max(1, _CHUNK // max(1, x[0].numel()))
    return (slice(i, i + step) for i in range(0, x.shape[0], step))


class NeighbourhoodAttentionFunction(torch.autograd.Function):
    """Nine-slice neighbourhood attention whose backward recomputes from q, k, v and the attention weights.

    Only q, k, v and the (B, heads, H, W, 9) weights are saved; K and V are re-padded in backward, so no
    9× copy of K or V ever exists. Accumulation is in float32 (float64 for double inputs). Both directions work
    through the batch in cache-sized chunks (each image's cells are independent of the others').
    """

    @staticmethod
    def forward(ctx: FunctionCtx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        acc = _acc_dtype(q.dtype)
        attn = torch.empty(*q.shape[:-1], _WINDOW * _WINDOW, dtype=acc, device=q.device)  # (B, heads, H, W, 9)
        out = torch.zeros(v.shape, dtype=acc, device=v.device)
        for part in _chunks(q):
            a = attn[part]
            a.copy_(_softmax(_dots(q[part], _pad(k[part]), acc), q.shape[-1] ** -0.5))
            o = out[part]
            for n, vn in enumerate(_shifted(_pad(v[part]))):
                o.addcmul_(vn, a[..., n, None])
        ctx.save_for_backward(q, k, v, attn)
        return out.to(v.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, attn = ctx.saved_tensors
        acc = attn.dtype
        grad_q = torch.zeros(q.shape, dtype=acc, device=q.device)
        grad_k = torch.empty(k.shape, dtype=acc, device=k.device)
        grad_v = torch.empty(v.shape, dtype=acc, device=v.device)
        for part in _chunks(q):
            a, go = attn[part], grad_out[part]
            grad_attn = _dots(go, _pad(v[part]), acc)
            # Softmax backward, folded with the logit scale.
            grad_logits = a * (grad_attn - (a * grad_attn).sum(-1, keepdim=True)) * q.shape[-1] ** -0.5
            gq, grad_kp, grad_vp = grad_q[part], _padded_zeros(k[part], acc), _padded_zeros(v[part], acc)
            for n, (kn, grad_kn, grad_vn) in enumerate(zip(_shifted(_pad(k[part])), _shifted(grad_kp),
                                                         _shifted(grad_vp), strict=True)):
                gq.addcmul_(kn, grad_logits[..., n, None])
                grad_kn.addcmul_(q[part], grad_logits[..., n, None])
                grad_vn.addcmul_(go, a[..., n, None])
            grad_k[part], grad_v[part] = _interior(grad_kp), _interior(grad_vp)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


def _fast(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return NeighbourhoodAttentionFunction.apply(q, k, v)


def _sliced(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    acc = _acc_dtype(q.dtype)
    logits = torch.stack([(q * kn).sum(-1, dtype=acc) for kn in _shifted(_pad(k))], dim=-1)
    attn = _softmax(logits, q.shape[-1] ** -0.5)
    out = sum(attn[..., n, None] * vn for n, vn in enumerate(_shifted(_pad(v))))
    return out.to(v.dtype)


@functools.cache
def _compiled_sliced() -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    quiet_compile()
    return torch.compile(_sliced)  # past torch's recompile limit (many shapes), dynamo falls back to eager


def _compiled(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _compiled_sliced()(q, k, v)


def _reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    b, heads, h, w, _ = q.shape
    # Filter n is an impulse at window position (n // 3, n % 3), the same order as _shifted.
    filters = torch.eye(_WINDOW * _WINDOW, dtype=q.dtype, device=q.device).view(-1, 1, _WINDOW, _WINDOW)

    def gather(x: Tensor) -> Tensor:
        """(B, heads, H, W, C) -> (B, heads, H, W, 9, C): ViTCA's LocalizeAttention, 9 zero-padded copies."""
        c = x.shape[-1]
        y = F.conv2d(x.permute(0, 1, 4, 2, 3).reshape(-1, 1, h, w), filters, padding="same")
        return y.view(b, heads, c, -1, h, w).permute(0, 1, 4, 5, 3, 2)

    logits = torch.einsum("bhijd,bhijnd->bhijn", q, gather(k))
    attn = _softmax(logits, q.shape[-1] ** -0.5).to(v.dtype)
    return torch.einsum("bhijn,bhijnd->bhijd", attn, gather(v))


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is asked for (it must be set before triton is imported, as tests/conftest.py
    does; read at each call so that a test can say "not interpreting")."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _triton(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"attention 'triton' runs on CUDA, not {q.device.type} (set TRITON_INTERPRET=1 to check the "
                         "kernels on CPU, slowly); use 'fast' there")
    try:
        from geca.models.attention_triton import triton_neighbourhood_attention  # imports triton: only when asked
    except ImportError:  # Triton ships with torch's Linux wheels; elsewhere the other implementations remain.
        raise ValueError("attention 'triton' needs the triton package (it ships with torch's Linux wheels)") from None
    return triton_neighbourhood_attention(q, k, v)


def _cpu(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    if q.device.type != "cpu":
        raise ValueError(f"attention 'cpu' runs on the CPU, not {q.device.type}; use 'fast' there")
    from geca.models.attention_cpu import cpu_attention

    out = cpu_attention(q, k, v)
    return _fast(q, k, v) if out is None else out


_IMPLS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "reference": _reference,
    "fast": _fast,
    "sliced": _sliced,
    "compiled": _compiled,
    "triton": _triton,
    "cpu": _cpu,
}
IMPLEMENTATIONS: tuple[str, ...] = tuple(_IMPLS)


def runnable(impl: str, device: torch.device) -> str:
    """The implementation `impl` (or model.attention's ``"auto"``) runs as on `device`: ``"auto"`` is the C kernels on
    a CPU and ``"fast"`` elsewhere; kernels for another device fall back to ``"fast"`` (the same maths), so a run
    trained on a GPU samples on a CPU and the other way round."""
    if impl == "auto":
        return "cpu" if device.type == "cpu" else "fast"
    if impl == "triton" and device.type != "cuda" and not interpreting() or impl == "cpu" and device.type != "cpu":
        return "fast"
    return impl


def neighbourhood_attention(q: Tensor, k: Tensor, v: Tensor, impl: str = "fast") -> Tensor:
    """3×3 neighbourhood attention with zero-padded (dead) cells outside the grid.

    Args:
        q, k: (B, heads, H, W, head_dim); v: (B, heads, H, W, value_dim). Same dtype and device.
        impl: one of :data:`IMPLEMENTATIONS`.

    Returns:
        (B, heads, H, W, value_dim) in the dtype of the inputs.
    """
    if impl not in _IMPLS:
        raise ValueError(f"unknown neighbourhood attention impl {impl!r}; choose one of {IMPLEMENTATIONS}")
    if q.dim() != 5 or k.shape != q.shape or v.dim() != 5 or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            "expected q, k of shape (B, heads, H, W, head_dim) and v of shape (B, heads, H, W, value_dim); "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    return _IMPLS[impl](q, k, v)


def packed_attention(qkv: Tensor, heads: int, impl: str, cells: Tensor | None = None) -> Tensor:
    """Attention from a packed projection qkv (B, H, W, 3·D), each cell's queries, keys and values head after head:
    (B, H, W, D), or (N, D) at `cells` (N flat indices into B·H·W), computed there alone by the C kernels."""
    b, h, w, width = qkv.shape
    d = width // 3
    if impl == "cpu" and qkv.device.type == "cpu":
        from geca.models.attention_cpu import packed_cpu_attention

        out = packed_cpu_attention(qkv, heads, d // heads, cells)
        if out is not None:
            return out
        impl = "fast"
    q, k, v = qkv.view(b, h, w, 3, heads, d // heads).permute(3, 0, 4, 1, 2, 5)  # 3 × (B, heads, H, W, D/heads)
    out = neighbourhood_attention(q, k, v, impl).permute(0, 2, 3, 1, 4).reshape(b, h, w, d)  # (B, H, W, D)
    return out if cells is None else out.reshape(-1, d).index_select(0, cells)  # (N, D)
