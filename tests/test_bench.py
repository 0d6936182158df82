"""The benchmark scripts' own argument handling (their timings are not tested: wall-clock is never asserted)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from common import model_config  # noqa: E402


def _args(*sets: str, configs: str = "GeCA-T,DiT-T") -> argparse.Namespace:
    return argparse.Namespace(set=list(sets), configs=configs)


def test_set_changes_the_configs_that_have_the_setting() -> None:
    """The issue's 1.03 M GeCA from GeCA-T; a key only GeCA has leaves DiT as it is; order of keys does not matter
    (208 is not a multiple of GeCA-T's 3 heads until heads=4 is set)."""
    geca = model_config("GeCA-T", _args("hidden_size=208", "heads=4", "mlp_hidden=832", "nca_steps=6"))
    assert (geca.hidden_size, geca.heads, geca.mlp_hidden, geca.nca_steps) == (208, 4, 832, 6)
    dit = model_config("DiT-T", _args("nca_steps=6"))
    assert not hasattr(dit, "nca_steps") and dit.hidden_size == 48


@pytest.mark.parametrize(("sets", "message"), [
    (["hiden_size=208"], "--set hiden_size: none of GeCA-T,DiT-T has that setting"),
    (["heads=5"], "must be a positive multiple of the 5 heads"),
    (["nca_steps=-1"], r"--set nca_steps must be in \[1, 1024\], got -1"),
    (["attention=reference"], "--set attention: chosen by --configs and the variants"),
    (["heads"], "expected KEY=VALUE"),
])
def test_set_refuses_what_would_make_a_table_lie(sets: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        model_config("GeCA-T", _args(*sets))


def test_train_step_variants_say_what_they_run() -> None:
    """ATTENTION[+compile|+graphs][:dense]: model.compile for `compiled`, a user's whole-model torch.compile for
    `+compile`, its CUDA-graph mode for `+graphs`."""
    from train_step import variant_config

    from geca.models.config import named_model

    config, compiled, wrapped = variant_config(named_model("GeCA-T"), "cpu+compile:dense")
    assert (config.attention, config.skip_idle, compiled, wrapped) == ("cpu", False, False, "default")
    config, compiled, wrapped = variant_config(named_model("GeCA-T"), "fast+graphs:dense")
    assert (config.attention, config.skip_idle, compiled, wrapped) == ("fast", False, False, "reduce-overhead")
    config, compiled, wrapped = variant_config(named_model("GeCA-T"), "compiled")
    assert (config.attention, config.skip_idle, compiled, wrapped) == ("fast", True, True, None)
    for bad in ("cpu+jit", "cpu:sparse"):
        with pytest.raises(SystemExit, match="unknown variant"):
            variant_config(named_model("GeCA-T"), bad)


@pytest.mark.parametrize("script", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "bench").glob("*.py")
                                          if p.name != "common.py"))
def test_every_benchmark_starts(script: str) -> None:
    """`make bench` runs each script: one that cannot import its helpers fails there, after the others ran."""
    import subprocess

    bench = Path(__file__).resolve().parents[1] / "bench"
    res = subprocess.run([sys.executable, script, "--help"], cwd=bench, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "usage:" in res.stdout, res.stderr[-2000:]


def test_the_allocator_benchmark_runs_its_rows() -> None:
    """It calls the sampling and training timers of bench/sample.py and bench/train_step.py in child processes."""
    import json
    import subprocess

    bench = Path(__file__).resolve().parents[1] / "bench"
    res = subprocess.run([sys.executable, "allocator.py", "--configs", "GeCA-T", "--steps", "1", "--repeats", "1",
                          "--batch", "2", "--train-batch", "2", "--resolution", "8", "--channels", "1", "--classes",
                          "2", "--json"], cwd=bench, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])["rows"]
    assert [(r["config"], r["work"]) for r in rows] == [("GeCA-T", "sample"), ("GeCA-T", "train")]
    assert all(r["default_ms_per_image_step"] > 0 and r["tuned_ms_per_image_step"] > 0 for r in rows)


def test_a_reused_sample_set_must_match_the_setting_and_precision(tmp_path: Path) -> None:
    """bench/sample.py --reuse keeps a set only if it was sampled as asked; sets from before precisions were fp32."""
    import json

    from sample import finished

    run = tmp_path / "run"
    args = argparse.Namespace(run=str(run), checkpoint="300", per_class=4, cfg=1.5)
    sampling = {"sampler": "ddim", "steps": 25, "guidance_scale": 1.5, "schedule": "uniform"}
    manifest = {"run": str(run), "seed": 0, "checkpoint_step": 300, "labels": "per-class 4", "sampling": sampling}
    (tmp_path / "set").mkdir()
    for precision, kept in ((None, "fp32"), ("fp32", "fp32"), ("bf16", "bf16")):
        if precision is None:
            sampling.pop("precision", None)
        else:
            sampling["precision"] = precision
        (tmp_path / "set" / "manifest.json").write_text(json.dumps(manifest))
        for asked in ("fp32", "bf16"):
            assert finished(tmp_path / "set", args, "ddim", 25, None, asked) == (asked == kept)
    assert not finished(tmp_path / "set", args, "ddim", 50, None, "bf16")
    for damaged in (b"\xff\xfe", b"[1]"):  # a damaged manifest is no set to reuse, not a traceback
        (tmp_path / "set" / "manifest.json").write_bytes(damaged)
        assert not finished(tmp_path / "set", args, "ddim", 25, None, "fp32")


def test_nonsense_flags_stop_before_any_measurement(capsys: pytest.CaptureFixture) -> None:
    """Each an argparse error (exit 2, the flag named), before the matmul peak or a worker runs."""
    import argparse as ap

    import torch
    from common import configs, positive, precisions

    for text in ("0", "-3", "x"):
        with pytest.raises(ap.ArgumentTypeError):
            positive(text)
    with pytest.raises(ap.ArgumentTypeError, match="unknown model 'Nope'"):
        configs("GeCA-T,Nope")
    assert configs("GeCA-T, DiT-T") == "GeCA-T,DiT-T"  # as every later split of it reads the names
    parser = ap.ArgumentParser()
    for text, said in (("fp64", "'fp64' is not one of"), ("fp32,fp32", "each precision once"),
                       ("fp16", "fp16 needs a CUDA device")):
        with pytest.raises(SystemExit) as e:
            precisions(parser, text, torch.device("cpu"))
        assert e.value.code == 2 and f"error: --precisions: {said}" in capsys.readouterr().err
    assert precisions(parser, "fp32, bf16", torch.device("cpu")) == ["fp32", "bf16"]


def test_a_failing_setting_or_config_is_a_row_saying_why_and_the_others_run(monkeypatch, capsys) -> None:
    import subprocess

    import sample
    import torch

    def worker(script: str, argv: list[str]) -> tuple[float, float]:
        if argv[0] == "DiT-T":
            raise subprocess.CalledProcessError(1, "worker", stderr="loading\nerror: out of memory\n")
        return 2.0, 100.0

    def config(name: str, args: argparse.Namespace):
        if name == "LDM-B":
            raise ImportError("no diffusers")
        return model_config(name, args)

    monkeypatch.setattr(sample, "fresh_process", worker)
    monkeypatch.setattr(sample, "model_config", config)
    monkeypatch.setattr(sample, "matmul_peak_tflops", lambda device, dtype: 1.0)
    args = argparse.Namespace(configs="LDM-B,DiT-T,GeCA-T", set=[], channels=1, resolution=8, classes=2, batch=4,
                              cfg=1.0, json=False, precisions=["fp32"], settings=[("ddim", 5, None)])
    rows = sample.speed(args, torch.device("cpu"))["rows"]
    assert rows[0] == {"config": "LDM-B", "error": "ImportError: no diffusers"}
    assert rows[1] == {"config": "DiT-T", "sampler": "ddim", "steps": 5, "schedule": "uniform", "precision": "fp32",
                       "error": "error: out of memory"}
    assert rows[2]["config"] == "GeCA-T" and rows[2]["seconds_per_image"] == 0.5
    printed = capsys.readouterr().out
    assert "LDM-B    cannot be built here: ImportError: no diffusers" in printed
    assert "DiT-T    ddim        5 steps fp32  failed: error: out of memory" in printed
