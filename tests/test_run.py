"""The run directory: what geca 0.1 wrote still loads, with the block it was trained with."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from conftest import tiny_model_config
from safetensors.torch import save_file

from geca.data.config import DataConfig
from geca.diffusion.config import DiffusionConfig
from geca.models.build import build_model
from geca.run import load_run


def test_a_geca_0_1_run_loads_with_its_own_block(tmp_path: Path) -> None:
    torch.manual_seed(0)
    old = build_model(tiny_model_config(block="v0.1"), 3, 2, 6)
    for p in old.parameters():
        torch.nn.init.normal_(p, std=0.1)
    # 0.1 named the final layer's parts final_ada / final, and model.json held every family's fields.
    legacy = {k.replace("final.ada.", "final_ada.").replace("final.linear.", "final."): v.contiguous()
              for k, v in old.state_dict().items()}
    ckpt = tmp_path / "checkpoints" / "step_0000001"
    ckpt.mkdir(parents=True)
    save_file(legacy, ckpt / "ema.safetensors")
    (tmp_path / "checkpoints" / "latest.json").write_text(json.dumps({"step": 1, "path": ckpt.name}))
    model = {k: v for k, v in asdict(tiny_model_config()).items() if k != "block"}
    model.update(depth=5, patch_size=2, block_channels=[16, 24, 32], layers_per_block=1, attention_resolutions=[4])
    spec = {"model": model, "diffusion": asdict(DiffusionConfig()), "data": asdict(DataConfig()), "in_channels": 3,
            "num_classes": 2, "resolution": 6, "class_names": ["a", "b"], "multilabel": False, "latent": None}
    (tmp_path / "model.json").write_text(json.dumps(spec))
    run = load_run(tmp_path)
    assert run.spec.model.block == "v0.1" and run.spec.format == 1
    x, t, y = torch.randn(2, 3, 6, 6), torch.tensor([10, 900]), torch.eye(2)
    torch.manual_seed(1)
    expected = old.eval()(x, t, y).output
    torch.manual_seed(1)
    torch.testing.assert_close(run.model(x, t, y).output, expected)


def test_checkpoint_names_are_names_and_the_pointer_stays_in_the_run(tmp_path: Path, monkeypatch) -> None:
    """`--checkpoint best` or `3` means the run's own checkpoint even where the working directory holds a folder of
    that name; a folder path works; latest.json naming a folder outside checkpoints/ is corrupt."""
    import pytest

    from geca.errors import CheckpointError
    from geca.run import find_checkpoint

    run = tmp_path / "run"
    for name in ("step_0000003", "best"):
        (run / "checkpoints" / name).mkdir(parents=True)
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 3, "path": "step_0000003"}))
    (tmp_path / "3").mkdir()
    (tmp_path / "best").mkdir()
    monkeypatch.chdir(tmp_path)
    assert find_checkpoint(run, 3) == run / "checkpoints" / "step_0000003"
    assert find_checkpoint(run, "best") == run / "checkpoints" / "best"
    assert find_checkpoint(run) == run / "checkpoints" / "step_0000003"
    assert find_checkpoint(run, tmp_path / "3") == tmp_path / "3"
    assert find_checkpoint(run, "step_0000003") == run / "checkpoints" / "step_0000003"  # the folder's own name
    with pytest.raises(CheckpointError, match="has no checkpoint of step 99; it has 3$"):
        find_checkpoint(run, 99)
    with pytest.raises(CheckpointError, match="--checkpoint 'abc': neither"):
        find_checkpoint(run, "abc")
    with pytest.raises(CheckpointError, match="--checkpoint is empty"):
        find_checkpoint(run, "")  # Path("") is the working directory
    for outside in ("../../best", "/etc", 3):
        (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 3, "path": outside}))
        with pytest.raises(CheckpointError, match="latest.json: corrupt pointer file"):
            find_checkpoint(run)
