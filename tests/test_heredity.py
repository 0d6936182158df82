"""Heredity-aware training, the GHG trace and class-faithfulness (issue: GHG that helps)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import blob_images, tiny_model_config
from safetensors.torch import load_file
from test_training import tiny_config
from typer.testing import CliRunner

from geca.cli.main import app
from geca.diffusion.config import DiffusionConfig
from geca.diffusion.gaussian import GaussianDiffusion
from geca.metrics.domain import train_domain_net
from geca.metrics.faithfulness import faithfulness, predict
from geca.models.base import CellState
from geca.models.build import build_model
from geca.sampling.config import SamplerConfig
from geca.sampling.samplers import sample
from geca.sampling.trace import FIELDS, ghg_trace
from geca.training.heredity import handed_over
from geca.training.trainer import train

runner = CliRunner()


def _gated(update_prob: float = 0.5, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(tiny_model_config(heredity="gated", update_prob=update_prob), 3, 2, 8)
    for p in model.parameters():  # a trained-looking model: every layer, the gate included, non-zero
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_a_zero_carry_is_a_fresh_seed_and_the_gate_bounds_what_enters() -> None:
    model = _gated(update_prob=1.0)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), torch.eye(2)
    h = torch.randn(2, 8, 8, 8)

    def call(carry: CellState | None) -> torch.Tensor:
        torch.manual_seed(1)  # the seed cell's C_out is drawn afresh by every call
        return model(x, t, y, carry=carry).output

    fresh = call(None)
    assert torch.equal(fresh, call(CellState(hidden=torch.zeros(2, 8, 8, 8))))
    # A raw carry of any size enters normalised: outputs for a carry and for 1000× that carry agree.
    small, huge = call(CellState(hidden=h)), call(CellState(hidden=1000 * h))
    assert not torch.allclose(small, fresh)
    assert torch.allclose(small, huge, atol=1e-4)


def test_a_new_gate_starts_closed_and_published_models_take_the_raw_carry() -> None:
    torch.manual_seed(0)
    gated = build_model(tiny_model_config(heredity="gated", update_prob=1.0), 3, 2, 8).eval()
    x, t, y, h = torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), torch.eye(2), torch.randn(2, 8, 8, 8)
    torch.manual_seed(1)
    fresh = gated(x, t, y).output
    torch.manual_seed(1)
    assert torch.equal(fresh, gated(x, t, y, carry=CellState(hidden=h)).output)
    torch.manual_seed(0)
    off = build_model(tiny_model_config(update_prob=1.0, heredity="off"), 3, 2, 8).eval()
    assert off.inherit(off.seed(2, 8, 8, x.device), CellState(hidden=h)).hidden is h
    assert (gated.ghg_default, off.ghg_default) == ("hidden", "none")


def test_the_state_training_inherits_is_the_one_the_sampler_hands_over() -> None:
    """Build the first link of a `--ghg hidden` chain through the sampler and through the trainer's helper."""
    model = _gated(update_prob=1.0)  # every cell fires: the chain is a pure function of its inputs
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    labels, noise = torch.eye(2), torch.randn(2, 3, 8, 8)
    carried: list[CellState | None] = []
    forward = model.forward

    def spy(*args, **kwargs):
        carried.append(kwargs.get("carry"))
        return forward(*args, **kwargs)

    model.forward = spy  # type: ignore[method-assign]
    sampler = SamplerConfig(sampler="ddim", steps=2, guidance_scale=1.0, ghg="hidden", clip_x0=True)
    torch.manual_seed(3)  # the first call's seed cell
    sample(model, diffusion, labels, (3, 8, 8), sampler, noise=noise)
    model.forward = forward  # type: ignore[method-assign]
    assert carried[0] is None and carried[1] is not None
    spaced = diffusion.respaced(2)
    t_first = spaced.model_timesteps(torch.full((2,), 1))
    no_null = torch.zeros(2, dtype=torch.bool)
    torch.manual_seed(3)
    inherited = handed_over(model, noise, t_first, labels, no_null, torch.ones(2, dtype=torch.bool))
    assert torch.equal(inherited.hidden, carried[1].hidden)
    partial = handed_over(model, noise, t_first, labels, no_null, torch.tensor([True, False]))
    assert partial.hidden[0].any() and not partial.hidden[1].any()  # not kept: a fresh seed


def test_heredity_aware_training_trains_the_gate_and_differs_from_published(tmp_path: Path) -> None:
    data = blob_images(n=8, size=8)
    runs = {}
    for heredity in ("off", "gated"):
        cfg = tiny_config(4)
        cfg.model.heredity = heredity
        train(cfg, tmp_path / heredity, train_set=data, progress=False)
        runs[heredity] = load_file(tmp_path / heredity / "checkpoints/step_0000004/model.safetensors")
    gate = runs["gated"]["inherit_gate.1.weight"]
    assert gate.abs().sum() > 0  # zero-initialised, so only the inheriting samples' gradient moved it
    assert "inherit_gate.1.weight" not in runs["off"]
    assert not torch.equal(runs["off"]["embed.weight"], runs["gated"]["embed.weight"])
    model_json = json.loads((tmp_path / "gated" / "model.json").read_text())
    assert model_json["model"]["heredity"] == "gated"


def test_a_run_saved_without_the_heredity_key_loads_as_published(tmp_path: Path) -> None:
    from geca.run import load_run

    cfg = tiny_config(1)
    cfg.model.heredity = "off"
    train(cfg, tmp_path / "run", train_set=blob_images(n=8, size=8), progress=False)
    path = tmp_path / "run" / "model.json"
    spec = json.loads(path.read_text())
    del spec["model"]["heredity"]
    path.write_text(json.dumps(spec))
    assert load_run(tmp_path / "run").model.heredity == "off"


def test_trace_follows_every_mode_from_the_same_noise() -> None:
    model = _gated()
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    sampler = SamplerConfig(sampler="ddim", steps=3, guidance_scale=1.5, clip_x0=True)
    rows = ghg_trace(model, diffusion, torch.eye(2), (3, 8, 8), sampler, seed=0)
    assert [r["ghg"] for r in rows] == ["hidden"] * 3 + ["none"] * 3 + ["out"] * 3 + ["both"] * 3
    assert set(rows[0]) == set(FIELDS) and [r["step"] for r in rows[:3]] == [1, 2, 3]
    # t is the model's timestep, not the respaced step's index
    assert [r["t"] for r in rows[:3]] == diffusion.respaced(3).timestep_map[::-1] == [999, 500, 0]
    # the first call of every mode starts from the same noise and a fresh seed: identical rows
    first = [{k: v for k, v in r.items() if k not in ("ghg", "hidden_mean", "hidden_max", "out_mean", "out_max")}
             for r in rows[::3]]
    assert all(f == first[0] for f in first)
    assert all(r["hidden_max"] >= r["hidden_mean"] >= 0 and r["x0_max"] >= r["x0_min"] for r in rows)


def test_sample_trace_cli_and_the_published_model_warning(blobs_npz: Path, tmp_path: Path) -> None:
    fast = ["--sampler", "ddim", "--steps", "2", "--no-progress"]
    tiny = ["--max-steps", "1", "--batch-size", "4", "--sample-every", "0", "--image-size", "8"]
    for heredity in ("--heredity", "--no-heredity"):
        res = runner.invoke(app, ["train", "--data", str(blobs_npz), "--out", str(tmp_path / heredity), "--model",
                                  "GeCA-T", heredity, *tiny, "--no-progress"])
        assert res.exit_code == 0, res.output
    trace = tmp_path / "trace.csv"
    res = runner.invoke(app, ["sample", "--run", str(tmp_path / "--heredity"), "--out", str(tmp_path / "s1"),
                              "--per-class", "1", "--trace", str(trace), *fast])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(trace.open()))
    assert len(rows) == 4 * 2 and {r["ghg"] for r in rows} == {"hidden", "none", "out", "both"}
    assert trace.with_suffix(".png").stat().st_size > 0
    again = ["sample", "--run", str(tmp_path / "--heredity"), "--out", str(tmp_path / "s1b"), "--per-class", "1",
             "--trace", str(trace), *fast]
    res = runner.invoke(app, again)
    assert res.exit_code == 2 and "exists; pass --overwrite" in res.output and not (tmp_path / "s1b").exists()
    res = runner.invoke(app, [*again, "--overwrite"])  # an earlier trace is replaced when asked
    assert res.exit_code == 0, res.output
    other = tmp_path / "s1" / "labels.csv"
    before = other.read_text()
    (tmp_path / "loss.png").write_bytes(b"mine")  # a PNG where a new trace would put its plot
    for target, message in ((other, "exists and is not an earlier trace"), (tmp_path / "loss.csv", "its plot")):
        res = runner.invoke(app, ["sample", "--run", str(tmp_path / "--heredity"), "--out", str(tmp_path / "s7"),
                                  "--per-class", "1", "--trace", str(target), *fast])
        assert res.exit_code == 2 and message in res.output, res.output
    assert other.read_text() == before and (tmp_path / "loss.png").read_bytes() == b"mine"
    manifest = json.loads((tmp_path / "s1" / "manifest.json").read_text())
    assert manifest["sampling"]["ghg"] == "hidden"  # the default for a model trained with heredity
    with pytest.warns(UserWarning, match="trained without heredity"):
        res = runner.invoke(app, ["sample", "--run", str(tmp_path / "--no-heredity"), "--out", str(tmp_path / "s2"),
                                  "--per-class", "1", "--ghg", "hidden", *fast])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["sample", "--run", str(tmp_path / "--no-heredity"), "--out", str(tmp_path / "s3"),
                              "--per-class", "1", *fast])
    manifest = json.loads((tmp_path / "s3" / "manifest.json").read_text())
    assert manifest["sampling"]["ghg"] == "none"  # a published model's default: hidden turns it to noise
    with pytest.warns(UserWarning, match="--ghg out: no training geca offers hands C_out"):
        res = runner.invoke(app, ["sample", "--run", str(tmp_path / "--heredity"), "--out", str(tmp_path / "s5"),
                                  "--per-class", "1", "--ghg", "out", *fast])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["sample", "--run", str(tmp_path / "--heredity"), "--out", str(tmp_path / "s4"),
                              "--per-class", "1", "--trace", str(tmp_path / "t.txt"), *fast])
    assert res.exit_code == 2 and "--trace" in res.output
    (tmp_path / "afile").write_text("")
    res = runner.invoke(app, ["sample", "--run", str(tmp_path / "--heredity"), "--out", str(tmp_path / "s6"),
                              "--per-class", "1", "--trace", str(tmp_path / "afile/t.csv"), *fast])
    assert res.exit_code == 2 and "--trace" in res.output and "is a file" in res.output
    assert not (tmp_path / "s6").exists()  # refused before sampling


def test_faithfulness_is_high_on_real_images_and_chance_when_labels_are_shuffled() -> None:
    train_set, held_out = blob_images(n=64, size=16, seed=0), blob_images(n=64, size=16, seed=1)
    net = train_domain_net(train_set, seed=0, epochs=10)
    logits = predict(net, held_out.images)
    real = faithfulness(logits, held_out.labels, held_out.class_names, multilabel=False)
    assert real["value"] > 0.95 and real["chance"] == pytest.approx(0.5, abs=0.05)
    assert set(real["per_class"]) == {"c0", "c1"}
    shuffled = held_out.labels[np.random.default_rng(0).permutation(len(held_out))]
    ignored = faithfulness(logits, shuffled, held_out.class_names, multilabel=False)
    assert abs(ignored["value"] - ignored["chance"]) < 0.15
    multi = faithfulness(logits, held_out.labels, held_out.class_names, multilabel=True)
    assert multi["metric"] == "macro_auc" and multi["value"] > 0.95
    multi_shuffled = faithfulness(logits, shuffled, held_out.class_names, multilabel=True)
    assert abs(multi_shuffled["value"] - 0.5) < 0.15


def test_a_run_from_before_heredity_resumes_as_published(blobs_npz: Path, tmp_path: Path) -> None:
    import yaml

    run = tmp_path / "run"
    args = ["train", "--data", str(blobs_npz), "--out", str(run), "--model", "GeCA-T", "--batch-size", "4",
            "--sample-every", "0", "--image-size", "8", "--no-progress"]
    assert runner.invoke(app, [*args, "--no-heredity", "--max-steps", "1"]).exit_code == 0
    for name in ("model.json", "config.yaml"):  # as geca wrote them before model.heredity existed
        path = run / name
        raw = json.loads(path.read_text()) if name.endswith("json") else yaml.safe_load(path.read_text())
        del raw["model"]["heredity"]
        path.write_text(json.dumps(raw) if name.endswith("json") else yaml.safe_dump(raw))
    res = runner.invoke(app, ["train", "--out", str(run), "--resume", "--max-steps", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["heredity"] == "off"
