"""3×3 neighbourhood attention: the implementations against each other and a dense float64 oracle.

Without a GPU the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1), the same kernel code.
"""

from __future__ import annotations

import importlib.util
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from geca.models import attention_cpu
from geca.models.attention import (
    IMPLEMENTATIONS,
    NeighbourhoodAttentionFunction,
    neighbourhood_attention,
    packed_attention,
    runnable,
)
from geca.models.attention_cpu import kernels
from geca.utils.hardware import c_compiler
from geca.utils.paths import cache_dir

HAS_TRITON = importlib.util.find_spec("triton") is not None


def test_model_attention_names_every_implementation() -> None:
    """models.config keeps its own list (it imports no torch): a kernel added here must be a choice there."""
    from geca.models import attention
    from geca.models.config import ATTENTIONS

    assert set(ATTENTIONS) == {*attention.IMPLEMENTATIONS, "auto"} - {"compiled"}


# "compiled" is "sliced" under torch.compile (a compile per shape and dtype): one test of its own below.
IMPLEMENTATIONS = tuple(impl for impl in IMPLEMENTATIONS if (impl != "triton" or HAS_TRITON) and impl != "compiled")
# The Triton kernels compiled where there is a GPU, else interpreted on the CPU (conftest sets TRITON_INTERPRET).
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _attend(q: Tensor, k: Tensor, v: Tensor, impl: str) -> Tensor:
    """neighbourhood_attention on CPU tensors, the Triton kernels running on TRITON_DEVICE (autograd follows)."""
    if impl != "triton":
        return neighbourhood_attention(q, k, v, impl=impl)
    return neighbourhood_attention(*(x.to(TRITON_DEVICE) for x in (q, k, v)), impl=impl).cpu()


# (B, heads, H, W, head_dim, value_dim): odd and non-square grids, a 1×1 grid, single rows/columns, dv != d.
SHAPES = [
    (2, 3, 5, 7, 4, 4),
    (1, 2, 1, 1, 8, 8),
    (2, 1, 1, 6, 3, 3),
    (1, 2, 4, 1, 5, 5),
    (1, 2, 3, 4, 6, 2),
    (1, 1, 9, 11, 24, 40),  # several Triton programs per head, head_dim not a power of two, value_dim ≠ head_dim
]


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> tuple[Tensor, ...]:
    """q, k, v (requiring grad) and an upstream gradient; q, k scaled so the softmax is far from uniform."""
    b, heads, h, w, d, dv = shape
    gen = torch.Generator().manual_seed(seed)
    q, k = (2 * torch.randn(b, heads, h, w, d, generator=gen, dtype=torch.float64) for _ in range(2))
    v, grad = (torch.randn(b, heads, h, w, dv, generator=gen, dtype=torch.float64) for _ in range(2))
    q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
    return q, k, v, grad.to(dtype)


def _run(impl: str, q: Tensor, k: Tensor, v: Tensor, grad: Tensor) -> tuple[Tensor, ...]:
    """Output and gradients wrt q, k, v."""
    out = _attend(q, k, v, impl)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def _dense_oracle(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Dense attention over the grid plus a ring of zero-key/zero-value tokens, masked to 3×3 windows."""
    b, heads, h, w, d = q.shape
    kp, vp = (F.pad(x, (0, 0, 1, 1, 1, 1)).flatten(2, 3) for x in (k, v))
    logits = q.flatten(2, 3) @ kp.transpose(-1, -2) / math.sqrt(d)  # (B, heads, H·W, (H+2)·(W+2))
    qi, qj = torch.meshgrid(torch.arange(1, h + 1), torch.arange(1, w + 1), indexing="ij")
    ki, kj = torch.meshgrid(torch.arange(h + 2), torch.arange(w + 2), indexing="ij")
    near_rows = (qi.reshape(-1, 1) - ki.reshape(1, -1)).abs() <= 1
    near = near_rows & ((qj.reshape(-1, 1) - kj.reshape(1, -1)).abs() <= 1)
    assert (near.sum(-1) == 9).all()
    attn = logits.masked_fill(~near, float("-inf")).softmax(-1)
    return (attn @ vp).unflatten(2, (h, w))


def _border(h: int, w: int) -> Tensor:
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[0], mask[-1], mask[:, 0], mask[:, -1] = True, True, True, True
    return mask


def _assert_close_by_region(actual: Tensor, expected: Tensor, atol: float, what: str) -> None:
    """Compare border cells and interior cells separately, so a border-only error cannot hide in the max."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    border = _border(*actual.shape[2:4])
    for name, region in (("border", border), ("interior", ~border)):
        if region.any():
            err = (actual[:, :, region] - expected[:, :, region]).abs().max().item()
            assert err <= atol, f"{what}, {name} cells: max abs difference {err:.3g} > {atol:.3g}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_matches_dense_oracle_float64(impl: str, shape: tuple[int, ...]) -> None:
    q, k, v, grad = _inputs(shape, torch.float64)
    out = _dense_oracle(q, k, v)
    expected = (out, *torch.autograd.grad(out, (q, k, v), grad))
    for name, a, e in zip(("out", "dq", "dk", "dv"), _run(impl, q, k, v, grad), expected, strict=True):
        _assert_close_by_region(a, e, 1e-12, f"{impl} {name}")


# The last grid spans several Triton programs per head (window rows cross program boundaries).
@pytest.mark.parametrize("shape", [(2, 4, 5, 7, 16, 16), (3, 2, 1, 1, 8, 8), (2, 3, 6, 6, 32, 32),
                                   (1, 2, 12, 13, 64, 64)])
def test_implementations_agree_float32(shape: tuple[int, ...]) -> None:
    b, heads, h, w, d, _ = shape
    # Non-contiguous views, as a model that splits one fused qkv projection would pass them.
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(b, h, w, 3, heads, d, generator=gen) * 2
    q, k, v = (x.detach().requires_grad_() for x in qkv.permute(3, 0, 4, 1, 2, 5))
    assert not q.is_contiguous()
    grad = torch.randn(b, heads, h, w, d, generator=gen)
    results = {impl: _run(impl, q, k, v, grad) for impl in IMPLEMENTATIONS}
    for impl in IMPLEMENTATIONS:
        for name, a, e in zip(("out", "dq", "dk", "dv"), results[impl], results["reference"], strict=True):
            # float32 rounding grows with the values' size (sums of 9 × head_dim products).
            _assert_close_by_region(a, e, 1e-5 * max(1.0, e.abs().max().item()), f"{impl} vs reference {name}")


def test_compiled_attention_matches_the_oracle() -> None:
    """`model.compile`'s attention (torch.compile of `sliced`): outputs and gradients on a non-contiguous qkv."""
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, 5, 6, 3, 2, 8, generator=gen, dtype=torch.float64)
    q, k, v = (x.detach().requires_grad_() for x in qkv.permute(3, 0, 4, 1, 2, 5))
    grad = torch.randn(2, 2, 5, 6, 8, generator=gen, dtype=torch.float64)
    expected = (_dense_oracle(q, k, v), *torch.autograd.grad(_dense_oracle(q, k, v), (q, k, v), grad))
    for name, a, e in zip(("out", "dq", "dk", "dv"), _run("compiled", q, k, v, grad), expected, strict=True):
        _assert_close_by_region(a, e, 1e-12, f"compiled {name}")


def test_fast_attention_in_batch_chunks_is_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large batches go through in cache-sized chunks; chunk boundaries must not change outputs or gradients."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(5, 2, 4, 6, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad = torch.randn(5, 2, 4, 6, 8, generator=gen, dtype=torch.float64)
    whole = _run("fast", q, k, v, grad)
    monkeypatch.setattr("geca.models.attention._CHUNK", 2 * q[0].numel())  # chunks of 2, 2 and 1 images
    for name, a, e in zip(("out", "dq", "dk", "dv"), _run("fast", q, k, v, grad), whole, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12, msg=f"chunked {name}")


def test_dead_cells_enter_softmax_with_logit_zero() -> None:
    """On a 1×1 grid the only live neighbour is the cell itself; the 8 dead ones add exp(0) each."""
    q, k, v, _ = _inputs((2, 3, 1, 1, 4, 4), torch.float64)
    w_self = torch.exp((q * k).sum(-1, keepdim=True) / 2)
    expected = w_self * v / (w_self + 8)
    for impl in IMPLEMENTATIONS:
        torch.testing.assert_close(_attend(q, k, v, impl), expected, rtol=0, atol=1e-14)


def test_fast_function_gradcheck() -> None:
    q, k, v, _ = _inputs((1, 2, 3, 4, 3, 2), torch.float64, seed=2)
    assert torch.autograd.gradcheck(NeighbourhoodAttentionFunction.apply, (q, k, v))


needs_cc = pytest.mark.skipif(c_compiler() is None, reason="no C compiler to build the CPU kernels")


@needs_cc
def test_cpu_kernels_are_built_and_used(recwarn: pytest.WarningsRecorder) -> None:
    """The C kernels build here (so the tests above ran them, not their `fast` fallback), into the cache."""
    assert kernels(8, 8) is not None
    assert list((cache_dir() / "kernels").glob("attention_cpu-8-8-*.so"))
    assert not [w for w in recwarn if "not available" in str(w.message)]


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_kernels_at_some_cells(dtype: torch.dtype) -> None:
    """From the packed projection, only at the cells asked for (a GeCA's firing cells), as `fast` then a gather:
    outputs, and qkv's gradient, whose queries are zero at cells not asked for while keys and values are not."""
    gen = torch.Generator().manual_seed(6)
    qkv = (2 * torch.randn(3, 5, 7, 3 * 2 * 12, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    fire = torch.rand(3 * 5 * 7, generator=gen) < 0.5
    cells = fire.nonzero().squeeze(1)
    grad = torch.randn(cells.numel(), 2 * 12, generator=gen, dtype=torch.float64).to(dtype)
    results = {}
    for impl in ("cpu", "fast"):
        out = packed_attention(qkv, 2, impl, cells)
        results[impl] = (out, *torch.autograd.grad(out, qkv, grad))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, e in zip(results["cpu"], results["fast"], strict=True):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)
    dqkv = results["cpu"][1].view(-1, 3, 24)
    assert dqkv[~fire, 0].abs().max() == 0 and dqkv[~fire, 1:].abs().max() > 0


@needs_cc
def test_cpu_kernels_refuse_cells_outside_the_grid_or_repeated() -> None:
    """The kernels index memory with the cells unchecked: out-of-range or repeated cells are refused first."""
    qkv = torch.randn(2, 4, 5, 3 * 2 * 4)
    for cells in ([40], [-1], [7, 7, 3]):
        with pytest.raises(ValueError, match="distinct flat indices into the 40 cells"):
            packed_attention(qkv, 2, "cpu", torch.tensor(cells))


@needs_cc
def test_cpu_kernels_do_not_depend_on_the_thread_count() -> None:
    """The backward gathers rather than scatters: 1 and 3 threads give bit-identical gradients."""
    q, k, v, grad = _inputs((3, 2, 6, 5, 8, 8), torch.float32, seed=7)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run("cpu", q, k, v, grad)
        torch.set_num_threads(3)
        three = _run("cpu", q, k, v, grad)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, three, strict=True):
        assert torch.equal(a, b)


@needs_cc
def test_cpu_kernel_gradcheck() -> None:
    q, k, v, _ = _inputs((1, 2, 3, 4, 3, 5), torch.float64, seed=8)
    assert torch.autograd.gradcheck(lambda *x: neighbourhood_attention(*x, impl="cpu"), (q, k, v))


@needs_cc
def test_cpu_kernel_operators_pass_torch_opcheck() -> None:
    """Registered as torch operators: schema, fake (meta) shapes and the autograd formula agree with the kernels."""
    gen = torch.Generator().manual_seed(10)
    qkv = torch.randn(2, 3, 4, 3 * 2 * 4, generator=gen, dtype=torch.float64)
    for dtype in (torch.float64, torch.bfloat16):  # bf16: softmax weights in float32
        for cells in (torch.arange(24), torch.tensor([0, 5, 17, 23])):
            torch.library.opcheck(attention_cpu._attend, (qkv.to(dtype).requires_grad_(), cells, 2, 4))


@needs_cc
def test_torch_compile_keeps_the_cpu_kernels_in_one_graph() -> None:
    """A user's torch.compile of a GeCA whose attention is the C kernels traces one graph (no break at each NCA
    step's kernel call) and gives the eager model's output and gradients."""
    from geca.models.geca import GeCA

    torch.manual_seed(0)
    model = GeCA(in_channels=3, num_classes=4, resolution=6, hidden_size=16, heads=2, mlp_hidden=32,
                 hidden_channels=4, nca_steps=3, attention="cpu", heredity="gated")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)  # adaLN-zero would leave the attention's gradient zero
    x, t, y = torch.randn(2, 3, 6, 6), torch.tensor([3, 700]), torch.eye(4)[[1, 2]]
    explained = torch._dynamo.explain(model)(x, t, y)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    results = []
    for run in (model, torch.compile(model, backend="aot_eager")):  # autograd traced through the fake kernels
        torch.manual_seed(1)
        out = run(x, t, y).output
        grads = torch.autograd.grad(out.square().sum(), [model.block.qkv.weight, model.embed.weight])
        results.append((out, *grads))
    for a, e in zip(*results, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_cpu_kernels_fall_back_to_fast_without_a_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """No C compiler: one warning, and `fast`'s numbers."""
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", "")
    kernels.cache_clear()
    try:
        q, k, v, grad = _inputs((2, 2, 3, 4, 5, 5), torch.float64, seed=9)
        with pytest.warns(UserWarning, match="no C compiler found.*using 'fast'"):
            got = _run("cpu", q, k, v, grad)
        for a, e in zip(got, _run("fast", q, k, v, grad), strict=True):
            assert torch.equal(a, e)
    finally:
        kernels.cache_clear()


@needs_cc
def test_cpu_kernel_build_is_cached_and_clears_a_dead_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Built once per machine and dimensions (a later process loads it), through a temporary name: a build killed
    half-way leaves a temporary that the next build removes (not one whose process still runs), never a half-written
    library."""
    monkeypatch.setenv("GECA_CACHE_DIR", str(tmp_path))
    kernels.cache_clear()
    try:
        assert kernels(3, 3) is not None
        (built,) = (tmp_path / "kernels").glob("attention_cpu-3-3-*.so")
        stamp = built.stat().st_mtime_ns
        kernels.cache_clear()
        assert kernels(3, 3) is not None and built.stat().st_mtime_ns == stamp
        built.unlink()
        host = socket.gethostname()
        stale = built.with_name(f"{built.name}.{host}-999999999.tmp")
        running = built.with_name(f"{built.name}.{host}-1.tmp")
        for tmp in (stale, running):
            tmp.write_bytes(b"half a library")
        kernels.cache_clear()
        assert kernels(3, 3) is not None and built.is_file() and not stale.exists()
        assert running.exists()  # process 1 is alive: its build is under way
    finally:
        kernels.cache_clear()


@needs_cc
def test_a_build_with_fewer_flags_is_not_reused_once_the_full_flags_build(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    """A fallback build (without OpenMP, say) is cached under its own flags: when the full flags work again, they
    are built rather than the degraded library loaded."""
    monkeypatch.setenv("GECA_CACHE_DIR", str(tmp_path))
    full = attention_cpu._FLAG_SETS
    monkeypatch.setattr(attention_cpu, "_FLAG_SETS", (("-O3", "--no-such-flag-geca"), *full[1:]))
    kernels.cache_clear()
    try:
        assert kernels(3, 3) is not None
        (degraded,) = (tmp_path / "kernels").glob("attention_cpu-3-3-*.so")
        monkeypatch.setattr(attention_cpu, "_FLAG_SETS", full)
        kernels.cache_clear()
        assert kernels(3, 3) is not None
        assert {p.name for p in (tmp_path / "kernels").glob("attention_cpu-3-3-*.so")} - {degraded.name}
    finally:
        kernels.cache_clear()


@needs_cc
def test_a_library_that_builds_but_does_not_load_falls_back_to_the_next_flags(monkeypatch: pytest.MonkeyPatch,
                                                                              tmp_path: Path) -> None:
    """A flag set whose library the loader refuses (zig cc builds -fopenmp without its runtime) costs that set only:
    the next one is built and loaded, without a warning, also when the refused library is found in the cache."""
    import warnings

    monkeypatch.setenv("GECA_CACHE_DIR", str(tmp_path / "cache"))
    header = tmp_path / "missing.h"
    header.write_text("void geca_missing(void);\nvoid geca_calls_it(void) { geca_missing(); }\n")
    full = attention_cpu._FLAG_SETS
    monkeypatch.setattr(attention_cpu, "_FLAG_SETS", (("-O3", "-include", str(header)), *full[1:]))
    q, k, v, grad = _inputs((2, 2, 3, 4, 3, 3), torch.float64, seed=4)
    try:
        for _ in range(2):  # built, then found in the cache
            kernels.cache_clear()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert kernels(3, 3) is not None
            for a, e in zip(_run("cpu", q, k, v, grad), _run("fast", q, k, v, grad), strict=True):
                torch.testing.assert_close(a, e)
        assert len(list((tmp_path / "cache" / "kernels").glob("attention_cpu-3-3-*.so"))) == 2
    finally:
        kernels.cache_clear()


def test_auto_attention_is_the_cpu_kernels_on_a_cpu() -> None:
    assert runnable("auto", torch.device("cpu")) == "cpu"
    assert runnable("auto", torch.device("cuda")) == "fast"
    assert runnable("cpu", torch.device("cuda")) == "fast"  # a CPU-trained run samples on a GPU
    assert runnable("fast", torch.device("cpu")) == "fast"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bfloat16_close_to_float32(impl: str) -> None:
    q, k, v, grad = _inputs((2, 4, 5, 6, 16, 16), torch.bfloat16, seed=3)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    low = _run(impl, q, k, v, grad)
    high = _run(impl, q32, k32, v32, grad.float())
    for name, a, e in zip(("out", "dq", "dk", "dv"), low, high, strict=True):
        assert a.dtype == torch.bfloat16, name
        scale = e.abs().max().item()
        _assert_close_by_region(a.float(), e, 0.03 * scale, f"{impl} bf16 {name}")


@needs_cc
@pytest.mark.parametrize("head_dim, value_dim", [(16, 16), (12, 10)])  # whole vectors; scalar tails too
def test_bfloat16_kernels_are_the_float32_kernels_rounded(head_dim: int, value_dim: int) -> None:
    """bf16 is converted to float32 in registers: outputs and qkv's gradient are the float32 kernels' on the same
    values rounded to nearest even (what a copy to float32 and back gave), a NaN stays a NaN, and what autograd keeps
    for the backward is the bf16 projection itself, not a float32 copy of it."""
    heads, b, h, w = 2, 2, 5, 7
    torch.manual_seed(0)
    qkv = torch.randn(b, h, w, heads * (2 * head_dim + value_dim)).bfloat16()
    cells = torch.randperm(b * h * w)[:40]
    grad = torch.randn(40, heads * value_dim).bfloat16()
    low, high = qkv.clone().requires_grad_(), qkv.float().requires_grad_()
    saved: list[Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out_low = attention_cpu.packed_cpu_attention(low, heads, value_dim, cells)
    out_high = attention_cpu.packed_cpu_attention(high, heads, value_dim, cells)
    (out_low * grad).sum().backward()
    (out_high * grad.float()).sum().backward()
    assert out_low.dtype == low.grad.dtype == torch.bfloat16
    for got, want in ((out_low, out_high.bfloat16()), (low.grad, high.grad.bfloat16())):
        # Bit for bit, but where the compiler fuses a multiply-add in one kernel and not the other: a float32 result
        # at an exact bf16 tie may then round the other way (23 of 2.6 M gradients seen, in scalar tails).
        assert (got != want).float().mean() < 1e-3
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-133)  # 1 bf16 ulp
    assert [t.dtype for t in saved if t.shape == qkv.shape] == [torch.bfloat16]

    qkv[0, 1, 1, -1] = float("nan")  # a value of cell (1, 1): every window around it mixes it in
    nan = attention_cpu.packed_cpu_attention(qkv, heads, value_dim)
    assert torch.equal(nan.isnan(), attention_cpu.packed_cpu_attention(qkv.float(), heads, value_dim).isnan())
    assert nan.isnan().any() and not nan.isinf().any()


def test_unknown_impl_raises() -> None:
    q = torch.zeros(1, 1, 2, 2, 4)
    with pytest.raises(ValueError, match="reference.*fast.*sliced"):
        neighbourhood_attention(q, q, q, impl="natten")


def test_bad_shapes_raise() -> None:
    q = torch.zeros(1, 1, 2, 2, 4)
    with pytest.raises(ValueError, match="expected q, k"):
        neighbourhood_attention(q, torch.zeros(1, 1, 2, 3, 4), q)
    with pytest.raises(ValueError, match="expected q, k"):
        neighbourhood_attention(q.flatten(2, 3), q.flatten(2, 3), q.flatten(2, 3))


needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@needs_triton
def test_triton_backward_is_deterministic() -> None:
    """The backward gathers (no atomics), so two runs give bit-identical gradients."""
    q, k, v, grad = _inputs((2, 2, 5, 6, 8, 8), torch.float32, seed=4)
    first, second = _run("triton", q, k, v, grad), _run("triton", q, k, v, grad)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@needs_triton
def test_triton_on_cpu_says_where_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.zeros(1, 1, 2, 2, 4)
    with pytest.raises(ValueError, match="runs on CUDA, not cpu.*use 'fast'"):
        neighbourhood_attention(q, q, q, impl="triton")


@needs_triton
def test_triton_run_falls_back_to_fast_off_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run trained with the Triton kernels on a GPU still samples on a CPU (same maths, the `fast` code)."""
    from geca.models.attention import runnable

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert runnable("triton", torch.device("cpu")) == "fast"
    assert runnable("triton", torch.device("cuda")) == "triton"
    assert runnable("reference", torch.device("cpu")) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert runnable("triton", torch.device("cpu")) == "triton"


@needs_triton
def test_geca_with_triton_attention_matches_fast() -> None:
    """The whole model, forward and backward, is the same with either attention (same weights and fire masks)."""
    from geca.models.build import build_model
    from geca.models.config import GeCAConfig

    grads = {}
    for impl in ("fast", "triton"):
        torch.manual_seed(0)
        model = build_model(GeCAConfig(hidden_size=16, heads=2, mlp_hidden=32, hidden_channels=4, nca_steps=3,
                                       attention=impl), 3, 4, 6).to(TRITON_DEVICE)
        with torch.no_grad():  # adaLN-Zero starts the block muted; random weights make attention matter
            for param in model.parameters():
                param.normal_(0, 0.3)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(2, 3, 6, 6, generator=gen).to(TRITON_DEVICE)
        y = torch.eye(4)[torch.tensor([0, 3])].to(TRITON_DEVICE)
        torch.manual_seed(2)
        out = model(x, torch.tensor([10, 500], device=TRITON_DEVICE), y).output
        out.square().mean().backward()
        grads[impl] = (out.detach(), *(p.grad for p in model.parameters() if p.grad is not None))
    assert grads["fast"][0].abs().mean() > 0.1 and len(grads["fast"]) > 20
    for a, b in zip(grads["triton"], grads["fast"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_fused_kernels_are_not_compiled_twice() -> None:
    from geca.config import RunConfig
    from geca.errors import ConfigError
    from geca.models.config import GeCAConfig

    for kernels_ in ("triton", "cpu"):
        with pytest.raises(ConfigError, match="--attention must be auto, fast, sliced or reference with model.compile"):
            RunConfig(model=GeCAConfig(attention=kernels_, compile="true")).validate({"model.attention": "--attention"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's grid limits exist on a GPU only")
def test_triton_beyond_cudas_second_grid_axis() -> None:
    """B·heads > 65,535 programs along one axis: the 1-D launch grid takes them."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(70_000, 1, 1, 2, 4, generator=gen).requires_grad_() for _ in range(3))  # _attend moves them
    grad = torch.randn(70_000, 1, 1, 2, 4, generator=gen)
    for a, e in zip(_run("triton", q, k, v, grad), _run("fast", q, k, v, grad), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_a_cc_that_is_not_there_is_said(monkeypatch: pytest.MonkeyPatch) -> None:
    from geca.utils.hardware import c_compiler

    monkeypatch.setenv("CC", "/nonexistent/gcc")
    with pytest.warns(UserWarning, match=r"\$CC=/nonexistent/gcc is not found"):
        found = c_compiler()
    assert found != "/nonexistent/gcc"


def test_the_fast_attention_compiles_to_one_graph() -> None:
    """Under torch.compile (CUDA graphs included) the fast attention is one graph: a break would run it eagerly,
    piece by piece, between graphs."""
    qkv = torch.randn(2, 5, 6, 3, 2, 4, requires_grad=True)  # (B, H, W, q|k|v, heads, d): q, k, v are views

    def attend(qkv: Tensor) -> Tensor:
        q, k, v = (qkv[..., i, :, :].permute(0, 3, 1, 2, 4) for i in range(3))
        return neighbourhood_attention(q, k, v, impl="fast")

    explained = torch._dynamo.explain(attend)(qkv)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_only_a_cpu_works_through_the_batch_in_chunks() -> None:
    """Chunks keep a CPU's nine passes in cache; on a GPU each chunk would only add kernel launches."""
    from geca.models.attention import _chunks

    for device in ("cpu", "meta"):
        q = torch.empty(64, 6, 32, 32, 64, device=device)  # GeCA-S's q at 32×32
        assert len(list(_chunks(q))) == (64 if device == "cpu" else 1)


@needs_cc
def test_eager_cpu_attention_never_imports_the_compiler() -> None:
    """Outside torch.compile the kernels run through a plain autograd function: an operator's first call (and
    assume_constant_result) imports torch._dynamo, ≈ 1 s and 150 MiB for every CPU command of a GeCA."""
    import subprocess
    import sys

    code = ("import sys, torch\nfrom geca.models.build import build_model\nfrom geca.models.config import named_model\n"
            "m = build_model(named_model('GeCA-T'), 1, 2, 8)\n"
            "out = m(torch.randn(2, 1, 8, 8), torch.tensor([3, 7]), torch.eye(2))\n"
            "out.output.sum().backward()\nprint('torch._dynamo' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stdout + res.stderr


@needs_cc
def test_double_backward_through_the_cpu_kernels_is_refused_not_wrong() -> None:
    """Their gradient has no gradient: a gradient penalty through them must fail, not drop its second-order term."""
    from geca.models.attention_cpu import packed_cpu_attention

    x = torch.randn(1, 3, 4, 24, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(packed_cpu_attention(x, 2, 4).pow(2).sum(), x, create_graph=True)
    (g,) = torch.autograd.grad(packed_cpu_attention(x, 2, 4).pow(2).sum(), x)  # a first-order gradient as ever
    assert g.shape == x.shape and not g.requires_grad
