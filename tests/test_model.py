"""GeCA: sizes, initialisation, cell-state mechanics, conditioning."""

from __future__ import annotations

import torch
from conftest import tiny_model_config
from torch import nn

from geca.models.base import CellState
from geca.models.build import build_model, count_macs, count_parameters
from geca.models.config import named_model
from geca.models.embeddings import LabelEmbedder


def _inputs(b: int = 3, c: int = 3, size: int = 6, k: int = 4):
    torch.manual_seed(0)
    return torch.randn(b, c, size, size), torch.randint(0, 1000, (b,)), torch.eye(k)[torch.arange(b) % k]


def _perturb(model: torch.nn.Module) -> None:
    """Random weights everywhere, so zero-initialised layers no longer hide bugs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_published_parameter_counts() -> None:
    s = count_parameters(build_model(named_model("GeCA-S"), 4, 11, 32))
    xs = count_parameters(build_model(named_model("GeCA-XS"), 4, 11, 32))
    assert abs(s - 13.3e6) <= 0.05e6, s
    assert abs(xs - 2.26e6) <= 0.05e6, xs


def test_first_update_is_zero_and_seed_is_centre_cell() -> None:
    model = build_model(tiny_model_config(update_prob=1.0), 3, 4, 6)
    x, t, y = _inputs()
    torch.manual_seed(5)
    res = model(x, t, y)
    out = res.output.permute(0, 2, 3, 1)
    assert torch.count_nonzero(res.state.hidden) == 0
    centre = out[:, 3, 3]
    assert torch.all(centre != 0)
    out[:, 3, 3] = 0
    assert torch.count_nonzero(out) == 0


def test_update_probability_zero_keeps_the_seed() -> None:
    model = build_model(tiny_model_config(update_prob=0.0), 3, 4, 6).eval()
    _perturb(model)
    x, t, y = _inputs()
    torch.manual_seed(3)
    seed = model.seed(3, 6, 6, torch.device("cpu"))
    torch.manual_seed(3)
    res = model(x, t, y)
    assert torch.equal(res.state.out, seed.out)
    assert torch.count_nonzero(res.state.hidden) == 0


def test_stochastic_update_fires_about_half_the_cells() -> None:
    model = build_model(tiny_model_config(update_prob=0.5, nca_steps=1), 3, 4, 16)
    _perturb(model)
    x, t, y = _inputs(b=8, size=16)
    res = model(x, t, y)
    changed = (res.state.hidden.abs().sum(-1) > 0).float().mean().item()
    assert 0.4 < changed < 0.6


def test_m_is_settable_at_call_time() -> None:
    model = build_model(tiny_model_config(nca_steps=3), 3, 4, 6)
    x, t, y = _inputs()
    assert len(list(model.grow(x, t, y))) == 3
    assert len(list(model.grow(x, t, y, nca_steps=7))) == 7


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_model_config(checkpointing=ckpt), 3, 4, 6)
        _perturb(model)
        x, t, y = _inputs()
        torch.manual_seed(7)
        carry = CellState(hidden=torch.randn(x.shape[0], 6, 6, model.hidden_channels))  # so the gate gets a gradient
        model(x, t, y, carry=carry).output.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def _assert_same_step(models: list[nn.Module]) -> None:
    """Each model, given the same weights, inputs, carried C_h and firing cells, agrees with the first: outputs, cell
    state and gradients (and the call does change the carried C_h)."""
    results = []
    for model in models:
        _perturb(model)
        x, t, y = _inputs(b=4, size=8)
        carry = CellState(hidden=torch.randn(4, 8, 8, model.hidden_channels))
        torch.manual_seed(7)
        res = model(x, t, y, carry=carry)
        res.output.square().mean().backward()
        results.append((res.output, res.state.hidden, [p.grad for p in model.parameters()]))
    first = results[0]
    assert torch.count_nonzero(first[1] - carry.hidden) > 0
    for out, hidden, grads in results[1:]:
        # Compiled kernels sum in another order (AVX-512 lanes on some CPUs): a few ulps of the outputs' scale (~8),
        # 3e-6 seen on a small element; a wrong cell or step is off by orders more.
        torch.testing.assert_close(out, first[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hidden, first[1], rtol=1e-5, atol=1e-5)
        for g, ref in zip(grads, first[2], strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


def test_skipping_idle_cells_changes_nothing() -> None:
    """Computing updates only where cells fire gives the published dense step's outputs, cell state and gradients,
    with the C kernels (which compute the attention at the firing cells alone) as with `fast`."""
    _assert_same_step([build_model(tiny_model_config(skip_idle=skip, checkpointing=ckpt, attention=impl), 3, 4, 8)
                       for skip, ckpt, impl in ((False, False, "fast"), (True, False, "fast"), (True, True, "fast"),
                                                (False, False, "cpu"), (True, False, "cpu"), (True, True, "cpu"))])


def test_compiled_nca_step_is_the_dense_step() -> None:
    """model.compile with every cell's update computed compiles the whole NCA step (sliced attention inside): the
    same outputs, cell state and gradients as the eager dense step — the same cells fire from the same seed — also
    recomputed under gradient checkpointing."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    variants = ((False, False), (True, False), (True, True))
    models = [build_model(tiny_model_config(skip_idle=False, checkpointing=ckpt, attention="fast"), 3, 4, 8, compile)
              for compile, ckpt in variants]
    for model, (compile, _) in zip(models, variants, strict=True):
        assert model.compile_step == compile and model.block.attention == ("sliced" if compile else "fast")
    _assert_same_step(models)
    assert counters["stats"]["unique_graphs"] > graphs  # it did compile
    skipping = build_model(tiny_model_config(), 3, 4, 8, compile=True)  # skips idle cells: the attention compiles
    assert not skipping.compile_step and skipping.block.attention == "compiled"


def test_executed_macs_leave_out_the_idle_cells_tail() -> None:
    dim, mlp, hid, m, size, c = 32, 64, 8, 3, 8, 3
    model = build_model(tiny_model_config(hidden_size=dim, mlp_hidden=mlp, hidden_channels=hid, nca_steps=m,
                                          update_prob=0.25), c, 4, size)
    dense, executed = count_macs(model, c, 4, size), count_macs(model, c, 4, size, executed=True)
    tail = dim * dim + 2 * dim * mlp + dim * (2 * c + hid)  # projection, MLP, final layer of one cell
    assert dense - executed == round(0.75 * size * size * m * tail)
    model.skip_idle = False
    assert count_macs(model, c, 4, size, executed=True) == dense


def test_attention_implementations_agree_inside_the_model() -> None:
    outs = []
    for impl in ("fast", "reference", "sliced", "cpu"):
        torch.manual_seed(0)
        model = build_model(tiny_model_config(attention=impl, update_prob=1.0), 3, 4, 6)
        _perturb(model)
        x, t, y = _inputs()
        outs.append(model(x, t, y).output)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)


def test_null_embedding_differs_from_every_real_label_vector() -> None:
    emb = LabelEmbedder(num_classes=3, dim=16, dropout=0.1).eval()
    _perturb(emb)
    every = torch.tensor([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=torch.float32)
    real = emb(every)
    null = emb(every, null=torch.ones(len(every), dtype=torch.bool))
    assert torch.allclose(null, null[:1].expand_as(null))
    # The all-zero vector (a real "no finding" label) must not collide with the null label.
    assert torch.all((real - null).abs().amax(dim=1) > 1e-3)


def test_label_dropout_drops_whole_vectors() -> None:
    emb = LabelEmbedder(num_classes=3, dim=8, dropout=0.5).train()
    _perturb(emb)
    y = torch.ones(4000, 3)
    out = emb(y)
    is_null = torch.isclose(out, emb.null.expand_as(out)).all(dim=1)
    is_real = torch.isclose(out, emb.eval()(y[:1]).expand_as(out)).all(dim=1)
    assert torch.all(is_null | is_real)
    assert 0.45 < is_null.float().mean().item() < 0.55


def test_wrong_label_width_is_a_clear_error() -> None:
    model = build_model(tiny_model_config(), 3, 4, 6)
    x, t, _ = _inputs()
    try:
        model(x, t, torch.zeros(3, 5))
    except ValueError as e:
        assert "5 entries" in str(e) and "expects 4" in str(e)
    else:
        raise AssertionError("a 5-wide label vector was accepted by a 4-class model")


def test_published_parameter_counts_exactly() -> None:
    """The published counts (paper, Appendix) plus what we add: 16 C_γ cell channels × D into the cell embedding, and
    the learned null label embedding (D); heredity-aware models (the default) add the gate, LayerNorm weight C_h and
    Linear C_h × C_h."""
    for name, published, d, ch in (("GeCA-S", 13_312_584, 768, 64), ("GeCA-XS", 2_255_720, 384, 32)):
        config = named_model(name)
        ours = published + 16 * d + d
        assert count_parameters(build_model(config, 4, 11, 32)) == ours + ch + ch * ch
        config.heredity = "off"
        assert count_parameters(build_model(config, 4, 11, 32)) == ours


class _AuthorsBlock(nn.Module):
    """xmed-lab/GeCA's `Transformer` of depth 1 (PreNorm → Attention with localize → FeedForward), restated with
    their parameter layout: affine LayerNorm(dim), `to_qkv` without bias, `to_out`, exact GELU."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn_norm, self.ff_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, d = x.shape
        sa, ca, ga, sm, cm, gm = (m.unsqueeze(1) for m in self.adaLN_modulation(c).chunk(6, dim=1))
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in
                   self.to_qkv(self.attn_norm(x) * (1 + ca) + sa).chunk(3, dim=-1))

        def localize(t: torch.Tensor) -> torch.Tensor:  # (b, hd, n, e) → (b, hd, n, 9, e), zero padding
            e = t.shape[-1]
            grid = t.transpose(2, 3).reshape(b * self.heads, e, h, w)
            patches = torch.nn.functional.unfold(grid, 3, padding=1).view(b, self.heads, e, 9, n)
            return patches.permute(0, 1, 4, 3, 2)

        attn = ((q.unsqueeze(3) @ localize(k).transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
        out = (attn @ localize(v)).squeeze(3).transpose(1, 2).reshape(b, n, d)
        x = ga * self.to_out(out) + x
        return gm * self.ff(self.ff_norm(x) * (1 + cm) + sm) + x


def test_the_geca_block_is_the_published_one() -> None:
    torch.manual_seed(0)
    dim, heads, mlp, h, w = 32, 4, 48, 5, 6
    ref = _AuthorsBlock(dim, heads, mlp)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    model = build_model(tiny_model_config(hidden_size=dim, heads=heads, mlp_hidden=mlp), 3, 4, 6)
    ours = {"block_ada.1": ref.adaLN_modulation[1], "block.norm1": ref.attn_norm, "block.norm2": ref.ff_norm,
            "block.qkv": ref.to_qkv, "block.proj": ref.to_out, "block.mlp.0": ref.ff[0], "block.mlp.2": ref.ff[2]}
    state = {f"{name}.{k}": v for name, module in ours.items() for k, v in module.state_dict().items()}
    missing = model.load_state_dict(state, strict=False).missing_keys
    assert not [k for k in missing if k.startswith("block")], missing
    x, c = torch.randn(2, h * w, dim), torch.randn(2, dim)
    mod = tuple(m[:, None, None] for m in model.block_ada(c).chunk(6, dim=-1))
    got = model.block(x.view(2, h, w, dim), mod).view(2, h * w, dim)
    torch.testing.assert_close(got, ref(x, c, h, w), rtol=1e-5, atol=1e-5)
    assert model.block.qkv.bias is None and model.block.norm1.weight is not None
