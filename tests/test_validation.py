"""Training-time validation: KID curve, best checkpoint, resume, and the split guard."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import tiny_model_config

from geca.config import RunConfig
from geca.errors import ConfigError
from geca.run import load_run
from geca.training.trainer import train


def validated_config(npz: Path, steps: int) -> RunConfig:
    cfg = RunConfig()
    cfg.model = tiny_model_config(nca_steps=2)
    cfg.data.spec = str(npz)
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.log_every = steps, 4, 1
    cfg.train.sample_every, cfg.train.checkpoint_every = 0, 1
    cfg.validation.every, cfg.validation.num_samples, cfg.validation.batch_size = 1, 6, 6
    cfg.validation.sampler.steps = 2
    return cfg


def test_validation_logs_kid_keeps_best_and_resumes(blobs_npz: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GECA_CACHE_DIR", str(tmp_path / "cache"))  # the default domain features train once here
    run = tmp_path / "run"
    cfg = validated_config(blobs_npz, 2)
    cfg.train.logger = "tensorboard"
    train(cfg, run, progress=False)
    rows = list(csv.DictReader(open(run / "validation.csv")))
    assert [r["step"] for r in rows] == ["1", "2"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (run / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("validation/kid")] == \
        [(int(r["step"]), pytest.approx(float(r["kid"]), rel=1e-5)) for r in rows]
    assert all(float(r["kid"]) == float(r["kid"]) and r["num_samples"] == "6" for r in rows)
    assert all(0 <= float(r["faithfulness"]) <= 1 for r in rows)
    best = json.loads((run / "checkpoints" / "best" / "state.json").read_text())
    best_row = min(rows, key=lambda r: float(r["kid"]))
    assert best["step"] == int(best_row["step"]) and best["kid"] == pytest.approx(float(best_row["kid"]), rel=1e-5)
    assert best["split"] == "val" and best["features"] == "domain"
    assert load_run(run, checkpoint=str(run / "checkpoints" / "best")).step == best["step"]
    assert len(list((tmp_path / "cache" / "features").glob("domain-*.safetensors"))) == 1

    # As if the process died after validating step 2 but before its checkpoint: resume from step 1.
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 1, "path": "step_0000001"}))
    train(validated_config(blobs_npz, 3), run, resume=True, progress=False)
    rows = list(csv.DictReader(open(run / "validation.csv")))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    best = json.loads((run / "checkpoints" / "best" / "state.json").read_text())
    assert best["step"] == int(min(rows, key=lambda r: float(r["kid"]))["step"])


def test_validation_refuses_the_test_split(blobs_npz: Path, tmp_path: Path) -> None:
    cfg = validated_config(blobs_npz, 1)
    cfg.validation.split = "test"
    with pytest.raises(ConfigError, match="never 'test'"):
        train(cfg, tmp_path / "run", progress=False)
