"""The baselines (DiT, LDM UNet) behind the GeCA interface: sizes, conditioning, CLI, configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config
from typer.testing import CliRunner

from geca.cli.main import app
from geca.config import load_config, save_config
from geca.errors import ConfigError
from geca.models.base import Denoiser
from geca.models.build import build_model, count_macs, count_parameters
from geca.models.config import NAMED_MODELS, DiTConfig, ModelConfig, UNetConfig, named_model
from geca.models.embeddings import sincos_2d
from geca.sampling.samplers import guided_output

runner = CliRunner()
FAMILIES = ("geca", "dit", "unet")


def _on_meta(name: str, channels: int, classes: int, resolution: int) -> int:
    """Parameter count without allocating or initialising any weights."""
    with torch.device("meta"):
        return count_parameters(build_model(named_model(name), channels, classes, resolution))


def test_published_baseline_sizes() -> None:
    dit = _on_meta("DiT-S/2", 4, 11, 32)
    # The published 32,731,424 plus our learned null label embedding (384).
    assert dit == 32_731_424 + 384
    assert abs(_on_meta("LDM-B", 4, 11, 32) - 17.3e6) <= 0.3e6


def test_cpu_generators_are_matched_in_size() -> None:
    counts = {name: _on_meta(name, 3, 5, 28) for name in ("GeCA-T", "DiT-T", "LDM-T")}
    assert max(counts.values()) <= 1.1 * min(counts.values()), counts


def test_dit_s2_costs_about_5_4_gmac_per_call() -> None:
    model = build_model(named_model("DiT-S/2"), 4, 11, 32)
    assert 5.3e9 <= count_macs(model, 4, 11, 32) <= 5.6e9


def _tiny(family: str) -> ModelConfig:
    if family == "dit":
        return DiTConfig(name="tiny-dit", hidden_size=32, heads=2, mlp_hidden=64, depth=2)
    if family == "unet":
        return UNetConfig(name="tiny-unet", block_channels=[32, 32], layers_per_block=1, attention_resolutions=[2])
    return tiny_model_config(update_prob=1.0)  # every cell fires: GeCA is deterministic given its seed


def _model(family: str, perturb: bool = True) -> Denoiser:
    torch.manual_seed(0)
    model = build_model(_tiny(family), 3, 4, 8).eval()
    if perturb:  # random weights everywhere, so zero-initialised layers hide nothing
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p) * 0.1)
    return model


def _inputs(b: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(b, 3, 8, 8), torch.randint(0, 1000, (b,)), (torch.rand(b, 4) < 0.5).float()


def _carry(model: Denoiser, b: int, double: bool = False) -> dict:
    """GeCA needs the same random seed cell in every call compared; baselines take no carry."""
    if not model.has_cell_state:
        return {}
    torch.manual_seed(2)
    seed = model.seed(b, 8, 8, torch.device("cpu"))
    if double:
        seed = type(seed)(out=torch.cat([seed.out, seed.out]), hidden=torch.cat([seed.hidden, seed.hidden]))
    return {"carry": seed}


@pytest.mark.parametrize("family", ["dit", "unet"])
def test_baselines_start_at_zero(family: str) -> None:
    x, t, y = _inputs()
    out = _model(family, perturb=False)(x, t, y).output
    assert out.shape == (4, 6, 8, 8) and torch.count_nonzero(out) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_null_label_ignores_the_label_vector_and_labels_matter_otherwise(family: str) -> None:
    model = _model(family)
    x, t, y = _inputs()
    null = torch.ones(4, dtype=torch.bool)
    a = model(x, t, y, null=null, **_carry(model, 4)).output
    b = model(x, t, 1 - y, null=null, **_carry(model, 4)).output
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    cond = model(x, t, y, **_carry(model, 4)).output
    other = model(x, t, 1 - y, **_carry(model, 4)).output
    assert not torch.allclose(cond, a, atol=1e-4) and not torch.allclose(cond, other, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_dropout_replaces_the_whole_vector_by_the_null_embedding(family: str) -> None:
    model = _model(family)
    model.y_embedder.dropout = 1.0
    x, t, y = _inputs()
    null = model(x, t, y, null=torch.ones(4, dtype=torch.bool), **_carry(model, 4)).output
    model.train()
    dropped = model(x, t, y, **_carry(model, 4)).output
    torch.testing.assert_close(dropped, null, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_is_uncond_plus_scale_times_difference_on_eps_only(family: str) -> None:
    model = _model(family)
    x, t, y = _inputs()
    cond = model(x, t, y, **_carry(model, 4)).output
    uncond = model(x, t, y, null=torch.ones(4, dtype=torch.bool), **_carry(model, 4)).output
    one = guided_output(model, x, t, y, 1.0, double=True, **_carry(model, 4, double=True)).output
    torch.testing.assert_close(one, cond, rtol=1e-5, atol=1e-5)
    three = guided_output(model, x, t, y, 3.0, **_carry(model, 4, double=True)).output
    torch.testing.assert_close(three[:, :3], uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3]),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(three[:, 3:], cond[:, 3:], rtol=1e-5, atol=1e-5)


def test_dit_unpatchify_puts_each_patch_back_in_its_place() -> None:
    cfg = _tiny("dit")
    cfg.depth = 0  # no attention: each output patch depends on its own input patch only
    torch.manual_seed(0)
    model = build_model(cfg, 3, 4, 8).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p))
    x, t, y = _inputs(1)
    base = model(x, t, y).output
    x2 = x.clone()
    x2[0, :, 2, 4] += 1.0  # a pixel of the patch at row 1, column 2
    changed = (model(x2, t, y).output - base).abs().amax(dim=(0, 1)) > 0
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:4, 4:6] = True
    assert torch.equal(changed, expected)


def test_dit_positions_are_fixed_sincos() -> None:
    model = build_model(_tiny("dit"), 3, 4, 8)
    assert not model.pos.requires_grad
    torch.testing.assert_close(model.pos[0], sincos_2d(4, 4, 32).flatten(0, 1))


def test_baselines_reject_cell_state_and_bad_shapes() -> None:
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="no cell state"):
        _model("dit")(x, t, y, nca_steps=3)
    with pytest.raises(ValueError, match="patch size"):
        build_model(_tiny("dit"), 3, 4, 7)
    with pytest.raises(ValueError, match="divisible by 8"):
        build_model(named_model("LDM-B"), 4, 11, 28)
    with pytest.raises(ValueError, match=r"\[3\]"):
        build_model(UNetConfig(block_channels=[32, 32], attention_resolutions=[3]), 3, 4, 8)
    with pytest.raises(ValueError, match="geca, dit, unet"):
        ModelConfig.from_mapping({"family": "vae"}, "model")


def test_list_fields_round_trip_through_yaml(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  name: LDM-T\n  block_channels: [32, 64]\n  attention_resolutions: []\n")
    cfg = load_config(p)
    assert cfg.model.family == "unet" and cfg.model.block_channels == [32, 64] and cfg.model.attention_resolutions == []
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    for text, where in (("32", "model.block_channels"), ("[32, x]", r"model.block_channels\[1\]")):
        p.write_text(f"model:\n  name: LDM-T\n  block_channels: {text}\n")
        with pytest.raises(ConfigError, match=where):
            load_config(p)


def test_named_configs_are_copies() -> None:
    named_model("LDM-B").block_channels.append(512)
    assert NAMED_MODELS["LDM-B"].block_channels == [64, 128, 128, 256]


def test_models_command_reports_every_family_and_shapes_that_do_not_fit() -> None:
    res = runner.invoke(app, ["models", "--json", "--resolution", "12", "--channels", "3", "--classes", "2"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert set(rows) == set(NAMED_MODELS)
    assert rows["GeCA-T"]["tokens"] == 144 and rows["DiT-T"]["tokens"] == 36 and rows["LDM-T"]["tokens"] is None
    assert all(rows[n]["gmacs"] > 0 and rows[n]["parameters"] > 0 for n in ("GeCA-T", "DiT-T", "LDM-T"))
    # GeCA computes an update only where a cell fires; the baselines compute what they count.
    assert rows["GeCA-T"]["gmacs_executed"] < 0.7 * rows["GeCA-T"]["gmacs"]
    assert rows["DiT-T"]["gmacs_executed"] == rows["DiT-T"]["gmacs"]
    # 12 is not divisible by LDM-B's total downsampling (8): reported, not a crash.
    assert rows["LDM-B"]["parameters"] is None and "divisible by 8" in rows["LDM-B"]["error"]
    assert rows["LDM-B"]["input"] == [3, 12, 12] and rows["LDM-B"]["classes"] == 2


@pytest.mark.parametrize("name", ["GeCA-T", "DiT-T", "LDM-T"])
def test_each_family_trains_and_samples_through_the_cli(tmp_path: Path, blobs_npz: Path, name: str) -> None:
    run, out = tmp_path / "run", tmp_path / "samples"
    extra = ["--nca-steps", "2"] if name == "GeCA-T" else []
    res = runner.invoke(app, ["train", "--data", str(blobs_npz), "--out", str(run), "--model", name, "--max-steps",
                              "2", "--batch-size", "4", "--sample-every", "0", "--log-every", "1", "--no-progress",
                              *extra])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "model.json").read_text())["model"]["name"] == name
    ghg = "hidden" if name == "GeCA-T" else "none"
    sample = ["sample", "--run", str(run), "--per-class", "1", "--sampler", "ddim", "--steps", "3", "--no-progress"]
    res = runner.invoke(app, [*sample, "--out", str(out), "--ghg", ghg])
    assert res.exit_code == 0, res.output
    assert len(list((out / "images").glob("*.png"))) == 2
    if name == "GeCA-T":
        return
    res = runner.invoke(app, [*sample, "--out", str(tmp_path / "ghg"), "--ghg", "hidden"])
    assert res.exit_code == 2 and "--ghg hidden needs a cellular model" in res.output
    res = runner.invoke(app, [*sample, "--out", str(tmp_path / "ghg"), "--m", "4"])
    assert res.exit_code == 2 and "--m 4: NCA steps are a cellular model's" in res.output
    res = runner.invoke(app, ["grow", "--run", str(run), "--out", str(tmp_path / "grow")])
    assert res.exit_code == 2 and "not a cellular model" in res.output
    assert not (tmp_path / "ghg").exists() and not (tmp_path / "grow").exists()
