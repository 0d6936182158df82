"""GeCA: sizes, initialisation, cell-state mechanics, conditioning."""

from __future__ import annotations

import torch
from conftest import tiny_model_config

from geca.models.build import build_model, count_parameters
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
        model(x, t, y).output.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_attention_implementations_agree_inside_the_model() -> None:
    outs = []
    for impl in ("fast", "reference", "sliced"):
        torch.manual_seed(0)
        model = build_model(tiny_model_config(attention=impl, update_prob=1.0), 3, 4, 6)
        _perturb(model)
        x, t, y = _inputs()
        outs.append(model(x, t, y).output)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-5, atol=1e-5)


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
