"""3×3 neighbourhood attention as two C kernels for the CPU, built at first use with the system C compiler.

Written by hand because on a CPU neither torch's eager ops (nine passes over memory per direction) nor inductor's
code for the same maths (a horizontal reduction per neighbour, a permuted copy of q, k, v each way) come near what
the arithmetic needs. These kernels read the qkv projection where it lies, keep a window's nine dot products in
vector registers, compute only the cells asked for (GeCA's firing cells), and write each gradient in its input's
layout; the backward gathers keys' and values' gradients rather than scattering them, so threads never race and the
result does not depend on their number. Float32 and float64 run natively, bfloat16 is stored as it is and computed in
float32 (rounded as torch rounds); float16 is copied to float32.

The shared library is built once per (head dim, value dim) with ``-O3 -march=native`` into the geca cache
($GECA_CACHE_DIR, else ~/.cache/geca), keyed by the source, the compiler and the CPU; ``$CC`` picks the compiler.
Where no compiler builds it, :func:`kernels` says so once and returns None, and callers use ``fast``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import socket
import subprocess
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from geca.utils.hardware import c_compiler
from geca.utils.io import process_alive
from geca.utils.paths import cache_dir

__all__ = ["available", "cpu_attention", "kernels", "packed_cpu_attention"]

_SOURCE = Path(__file__).with_suffix(".c")
# Tried in order: without OpenMP the kernels run single-threaded, without -march=native they are portable.
_FLAG_SETS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-march=native"), ("-O3",))
_P, _I = ctypes.c_void_p, ctypes.c_int64
# dtype → the kernels' suffix, their compute type, and its torch dtype (the softmax weights' and scratch's)
_NATIVE = {torch.float32: ("f32", ctypes.c_float, torch.float32),
           torch.float64: ("f64", ctypes.c_double, torch.float64),
           torch.bfloat16: ("bf16", ctypes.c_float, torch.float32)}


def _machine() -> str:
    """What -march=native compiles for: the CPU's model and flags (a shared home may serve several machines)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor() or platform.machine()


def _build(cc: str, head_dim: int, value_dim: int) -> ctypes.CDLL:
    """The shared library for these dimensions, compiled into the cache unless it is there already, and loaded. Each
    flag set is its own cache entry, so a library built without OpenMP (say) is not reused once the full flags build;
    the next set is tried where one does not build or does not load (zig cc builds -fopenmp without its runtime).
    Not torch.utils.cpp_extension.load: it builds a Python extension against torch's headers with ninja, where this
    is a plain C library that needs only a C compiler."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    common = hashlib.sha256(b"\0".join(s.encode() if isinstance(s, str) else s for s in
                                       (_SOURCE.read_bytes(), Path(__file__).read_bytes(), cc, version, _machine(),
                                        f"{head_dim},{value_dim}")))
    folder = cache_dir() / "kernels"
    host = socket.gethostname()  # a shared home serves several hosts, whose process numbers are their own
    errors = ""
    for flags in _FLAG_SETS:
        entry = common.copy()  # the flags join the key: each flag set is its own cache entry
        entry.update(b"\0" + " ".join(flags).encode())
        target = folder / f"attention_cpu-{head_dim}-{value_dim}-{entry.hexdigest()[:16]}.so"
        if not target.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob(f"{target.name}.{host}-*.tmp"):
                pid = stale.suffixes[-2].rpartition("-")[2]
                if not (pid.isdigit() and process_alive(int(pid))):  # a build killed half-way, not one running
                    stale.unlink(missing_ok=True)
            tmp = folder / f"{target.name}.{host}-{os.getpid()}.tmp"
            done = subprocess.run([cc, *flags, "-shared", "-fPIC", f"-DHD={head_dim}", f"-DDV={value_dim}",
                                   "-o", str(tmp), str(_SOURCE), "-lm"], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                tmp.unlink(missing_ok=True)
                errors = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[0]
                continue
            os.replace(tmp, target)  # atomic: a concurrent process sees the whole library or none
        try:
            return ctypes.CDLL(str(target))
        except OSError as e:
            errors = f"{target.name} does not load ({e})"
    raise OSError(f"{cc} could not build {_SOURCE.name}: {errors}")


_BUILDING = threading.Lock()  # threads of one process would share a temporary file name


@functools.cache
def kernels(head_dim: int, value_dim: int) -> ctypes.CDLL | None:
    """The compiled kernels for these dimensions, or None (with one warning) where they cannot be built."""
    cc = c_compiler()
    try:
        if cc is None:
            raise OSError("no C compiler found (set CC, or install gcc or clang)")
        with _BUILDING:
            lib = _build(cc, head_dim, value_dim)
    except OSError as e:
        warnings.warn(f"the CPU attention kernels are not available ({e}); using 'fast' instead", stacklevel=2)
        return None
    for suffix, scalar, _ in _NATIVE.values():
        getattr(lib, f"na_forward_{suffix}").argtypes = [_P, _P, _P, _I, _I, _I, _P, _P, _I, _P, _P, _I, _I, _I,
                                                         scalar, ctypes.c_int]
        getattr(lib, f"na_backward_{suffix}").argtypes = [_P, _P, _P, _I, _I, _I, _P, _P, _P, _I, _P, _P, _P, _P,
                                                          _P, _P, _I, _I, _I, _I, _I, _I, _I, scalar, ctypes.c_int]
    return lib


def _attend_impl(qkv: Tensor, cells: Tensor, heads: int, value_dim: int) -> tuple[Tensor, Tensor]:
    """Attention at `cells` (N flat indices into B·H·W) from the packed projection qkv (B, H, W, heads·(2·HD + DV)):
    each cell's queries, then keys, then values, head after head. Out (N, heads·DV) and the softmax weights
    (N, heads, 9) that the backward reuses. Called through :func:`packed_cpu_attention`, which checks the cells
    (distinct, in range) and makes qkv contiguous in a native dtype: the kernels rely on both unchecked."""
    b, h, w, width = qkv.shape
    head_dim = _head_dim(width, heads, value_dim)
    lib = _loaded(head_dim, value_dim)
    suffix, _, compute = _NATIVE[qkv.dtype]
    dead = qkv.new_zeros(heads * max(head_dim, value_dim))
    out = qkv.new_empty(cells.numel(), heads * value_dim)
    attn = qkv.new_empty(cells.numel(), heads, 9, dtype=compute)
    getattr(lib, f"na_forward_{suffix}")(*_split(qkv, heads * head_dim), width, width, width, dead.data_ptr(),
                                         cells.data_ptr(), cells.numel(), out.data_ptr(), attn.data_ptr(), h, w,
                                         heads, head_dim ** -0.5, torch.get_num_threads())
    return out, attn


def _attend_backward_impl(grad_out: Tensor, qkv: Tensor, cells: Tensor, attn: Tensor, heads: int, value_dim: int
                          ) -> Tensor:
    """The gradient of :func:`_attend_impl`'s output with respect to qkv, in qkv's layout."""
    b, h, w, width = qkv.shape
    head_dim = _head_dim(width, heads, value_dim)
    lib = _loaded(head_dim, value_dim)
    row_of = torch.full((b * h * w,), -1, dtype=torch.int64)
    row_of[cells] = torch.arange(cells.numel())
    # Every buffer the kernel touches is held by a name until it returns: a pointer outlives no tensor.
    grad_out, grad, scratch = grad_out.to(qkv.dtype).contiguous(), torch.empty_like(qkv), torch.empty_like(attn)
    dead = qkv.new_zeros(heads * max(head_dim, value_dim))
    suffix, _, _ = _NATIVE[qkv.dtype]
    getattr(lib, f"na_backward_{suffix}")(
        *_split(qkv, heads * head_dim), width, width, width, dead.data_ptr(), cells.data_ptr(), row_of.data_ptr(),
        cells.numel(), attn.data_ptr(), grad_out.data_ptr(), scratch.data_ptr(), *_split(grad, heads * head_dim),
        width, width, width, b * h * w, h, w, heads, head_dim ** -0.5, torch.get_num_threads())
    return grad


# Under torch.compile the kernels run as operators, which it keeps in its graph as opaque calls (around plain ctypes
# calls it would break the graph at every one, once per NCA step). Eager calls go through `_Eager`: an operator's
# first call imports torch._dynamo (≈ 1 s and 150 MiB), which a command that never compiles need not pay.
_attend = torch.library.custom_op("geca::cpu_neighbourhood_attention", _attend_impl, mutates_args=())
_attend_backward = torch.library.custom_op("geca::cpu_neighbourhood_attention_backward", _attend_backward_impl,
                                           mutates_args=())


@_attend.register_fake
def _(qkv: Tensor, cells: Tensor, heads: int, value_dim: int) -> tuple[Tensor, Tensor]:
    return (qkv.new_empty(cells.shape[0], heads * value_dim),
            qkv.new_empty(cells.shape[0], heads, 9, dtype=_NATIVE[qkv.dtype][2]))


@_attend_backward.register_fake
def _(grad_out: Tensor, qkv: Tensor, cells: Tensor, attn: Tensor, heads: int, value_dim: int) -> Tensor:
    return torch.empty_like(qkv)


def _keep_for_backward(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    qkv, cells, heads, value_dim = inputs
    ctx.save_for_backward(qkv, cells, output[1])
    ctx.heads, ctx.value_dim = heads, value_dim


def _gradient(backward: Callable[..., Tensor]) -> Callable[..., tuple[Tensor | None, None, None, None]]:
    """The autograd formula with `backward` computing it: the operator where torch traces it, else the kernels."""
    def gradient(ctx: Any, grad_out: Tensor, _grad_attn: Tensor | None) -> tuple[Tensor | None, None, None, None]:
        qkv, cells, attn = ctx.saved_tensors
        return backward(grad_out, qkv, cells, attn, ctx.heads, ctx.value_dim), None, None, None

    return gradient


_attend.register_autograd(_gradient(_attend_backward), setup_context=_keep_for_backward)


def _eager_backward(*args: Any) -> Tensor:
    if torch.is_grad_enabled():  # create_graph: the kernels' gradient has none of its own (nor has the operator's)
        raise RuntimeError("double backward (create_graph=True) through the CPU attention kernels is not supported; "
                           "use attention 'fast'")
    # compiled autograd traces this backward: the operator keeps its graph whole, the kernels would break it
    return (_attend_backward if torch.compiler.is_compiling() else _attend_backward_impl)(*args)


class _Eager(torch.autograd.Function):
    """The operators' maths and gradient as a plain autograd function, for calls outside torch.compile."""

    @staticmethod
    def forward(ctx: Any, qkv: Tensor, cells: Tensor, heads: int, value_dim: int) -> tuple[Tensor, Tensor]:
        out, attn = _attend_impl(qkv, cells, heads, value_dim)
        ctx.mark_non_differentiable(attn)
        _keep_for_backward(ctx, (qkv, cells, heads, value_dim), (out, attn))
        return out, attn

    backward = staticmethod(_gradient(_eager_backward))


def _head_dim(width: int, heads: int, value_dim: int) -> int:
    """The query/key size per head of a packed projection `width` wide."""
    return (width // heads - value_dim) // 2


def _loaded(head_dim: int, value_dim: int) -> ctypes.CDLL:
    lib = kernels(head_dim, value_dim)
    if lib is None:
        raise RuntimeError("the CPU attention kernels are not available (see the warning above)")
    return lib


def available(head_dim: int, value_dim: int) -> bool:
    """Whether the kernels for these dimensions build here (one warning where they do not)."""
    return kernels(head_dim, value_dim) is not None


# torch.compile asks once, when it traces, instead of breaking its graph: the mark torch.compiler.assume_constant_result
# sets, set without it, as it imports torch._dynamo (≈ 1 s) for every command (a test checks the graph stays whole)
available._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _split(packed: Tensor, qk_width: int) -> tuple[int, int, int]:
    """Addresses of the queries, keys and values of the first cell of a contiguous packed tensor."""
    base, size = packed.data_ptr(), packed.element_size()
    return base, base + qk_width * size, base + 2 * qk_width * size


def packed_cpu_attention(qkv: Tensor, heads: int, value_dim: int, cells: Tensor | None = None) -> Tensor | None:
    """Neighbourhood attention from the packed projection (see :func:`_attend`) at `cells`, or every cell as
    (B, H, W, heads·DV); None where the kernels cannot be built (use ``fast``)."""
    b, h, w, width = qkv.shape
    if not available(_head_dim(width, heads, value_dim), value_dim):
        return None
    dtype = qkv.dtype
    packed = qkv.contiguous() if dtype in _NATIVE else qkv.float().contiguous()
    every = cells is None
    cells = torch.arange(b * h * w) if every else cells.to(torch.int64).contiguous()  # the kernels read int64 rows
    if not every and cells.numel() and (cells.min() < 0 or cells.max() >= b * h * w
                                        or torch.unique(cells).numel() != cells.numel()):
        # The kernels index memory with them unchecked, and the backward keeps one row per cell.
        raise ValueError(f"cells must be distinct flat indices into the {b * h * w} cells of the grid")
    attend = _attend if torch.compiler.is_compiling() else _Eager.apply
    out = attend(packed, cells, heads, value_dim)[0].to(dtype)
    return out.view(b, h, w, -1) if every else out


def cpu_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
    """The kernels on q, k (B, heads, H, W, HD) and v (B, heads, H, W, DV), packed by a copy (the model passes its
    projection packed already); None where they cannot be built."""
    b, heads, h, w, _ = q.shape
    packed = torch.cat([x.permute(0, 2, 3, 1, 4).flatten(3) for x in (q, k, v)], dim=-1)  # (B, H, W, heads·(2HD+DV))
    out = packed_cpu_attention(packed, heads, v.shape[-1])
    return None if out is None else out.view(b, h, w, heads, -1).permute(0, 3, 1, 2, 4)
