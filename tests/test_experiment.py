"""`geca experiment`: the stage graph and its markers, the presets, and the smoke study end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from geca.cli.experiment import experiment
from geca.errors import ConfigError, StageError
from geca.experiment.config import load_experiment
from geca.experiment.context import Context
from geca.experiment.graph import MARKER, PENDING, Stage, execute, plan, read_marker, stage_dir
from geca.experiment.stages import build_stages

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "experiments"
app = typer.Typer(pretty_exceptions_enable=False)
app.command()(experiment)
runner = CliRunner()


# ── the graph: hashing, markers, --force, --only (no training) ───────────────────────────────────────────────────


def toy(calls: list[str], params: dict[str, dict] | None = None, fail: set[str] | None = None) -> list[Stage]:
    """a → (b.x, b.y) → c; each stage appends its id to `calls` and writes a file; ids in `fail` raise midway."""

    def make(sid: str):
        def run(d: Path) -> dict:
            calls.append(sid)
            (d / "partial.txt").write_text(sid)
            if fail and sid in fail:
                raise RuntimeError(f"{sid} interrupted")
            return {"file": "partial.txt", "saw_partial_from_before": (d / "kept.txt").exists()}

        return run

    p = params or {}
    return [Stage("a", make("a"), (), p.get("a", {})),
            Stage("b.x", make("b.x"), ("a",), p.get("b.x", {}), resumable=True),
            Stage("b.y", make("b.y"), ("a",), p.get("b.y", {})),
            Stage("c", make("c"), ("b.x", "b.y"), p.get("c", {}))]


def run_ids(root: Path, ids: list[str]) -> dict[str, str]:
    return {i: read_marker(root, i)["run_id"] for i in ids}


def test_graph_runs_in_order_then_skips_everything(tmp_path: Path) -> None:
    calls: list[str] = []
    execute(toy(calls), tmp_path, log=lambda s: None)
    assert calls == ["a", "b.x", "b.y", "c"]
    assert (tmp_path / "b" / "x" / MARKER).exists() and stage_dir(tmp_path, "b.y") == tmp_path / "b" / "y"
    assert read_marker(tmp_path, "c")["outputs"]["file"] == "partial.txt"
    before = run_ids(tmp_path, ["a", "b.x", "b.y", "c"])
    calls.clear()
    steps = execute(toy(calls), tmp_path, log=lambda s: None)
    assert calls == [] and all(s.action == "skip" for s in steps)
    assert run_ids(tmp_path, ["a", "b.x", "b.y", "c"]) == before


def test_changed_params_redo_the_stage_and_its_dependants_only(tmp_path: Path) -> None:
    calls: list[str] = []
    execute(toy(calls), tmp_path, log=lambda s: None)
    calls.clear()
    execute(toy(calls, {"b.y": {"lr": 2}}), tmp_path, log=lambda s: None)
    assert calls == ["b.y", "c"]
    calls.clear()
    execute(toy(calls, {"b.y": {"lr": 2}}), tmp_path, log=lambda s: None)
    assert calls == []


def test_force_redoes_a_stage_or_group_and_what_depends_on_it(tmp_path: Path) -> None:
    calls: list[str] = []
    execute(toy(calls), tmp_path, log=lambda s: None)
    calls.clear()
    execute(toy(calls), tmp_path, force=["b.x"], log=lambda s: None)
    assert calls == ["b.x", "c"]
    calls.clear()
    execute(toy(calls), tmp_path, force=["b"], log=lambda s: None)
    assert calls == ["b.x", "b.y", "c"]
    with pytest.raises(StageError, match="no such stage"):
        plan(toy(calls), tmp_path, force=["d"])


def test_only_needs_its_inputs_done(tmp_path: Path) -> None:
    calls: list[str] = []
    with pytest.raises(StageError, match="b.x, b.y are not done"):
        execute(toy(calls), tmp_path, only=["c"], log=lambda s: None)
    assert calls == []
    execute(toy(calls), tmp_path, only=["a"], log=lambda s: None)
    execute(toy(calls), tmp_path, only=["b"], log=lambda s: None)
    assert calls == ["a", "b.x", "b.y"] and read_marker(tmp_path, "c") is None
    execute(toy(calls), tmp_path, only=["c"], log=lambda s: None)
    assert calls[-1] == "c"


def test_interrupted_resumable_stage_keeps_its_work_and_a_corrupt_marker_is_redone(tmp_path: Path) -> None:
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="interrupted"):
        execute(toy(calls, fail={"b.x"}), tmp_path, log=lambda s: None)
    (stage_dir(tmp_path, "b.x") / "kept.txt").write_text("checkpoint")  # what a resumable stage leaves behind
    assert read_marker(tmp_path, "b.x") is None
    reasons = {step.stage.id: step.reason for step in plan(toy([]), tmp_path)}
    assert reasons["b.x"] == "interrupted; resumes from its work" and reasons["b.y"] == "not run yet"
    assert plan(toy([], {"b.x": {"lr": 3}}), tmp_path)[1].reason == "interrupted; starts afresh (config or upstream "\
        "changed)"
    assert plan(toy([]), tmp_path, force=["b.x"])[1].reason == "forced"  # which starts it afresh
    calls.clear()
    execute(toy(calls), tmp_path, log=lambda s: None)
    assert calls == ["b.x", "b.y", "c"]  # a was done; b.x goes on from its work
    assert read_marker(tmp_path, "b.x")["outputs"]["saw_partial_from_before"] is True
    (stage_dir(tmp_path, "a") / MARKER).write_text("{not json")
    calls.clear()
    execute(toy(calls), tmp_path, log=lambda s: None)
    assert calls == ["a", "b.x", "b.y", "c"]
    assert read_marker(tmp_path, "b.x")["outputs"]["saw_partial_from_before"] is False  # new key: started afresh
    for damaged in (b"[1]", b"\xff\xfe"):  # markers that parse to no mapping, or are no text: redone too
        (stage_dir(tmp_path, "c") / MARKER).write_bytes(damaged)
        calls.clear()
        execute(toy(calls), tmp_path, log=lambda s: None)
        assert calls == ["c"]
    with pytest.raises(RuntimeError, match="interrupted"):
        execute(toy(calls, {"b.x": {"lr": 3}}, fail={"b.x"}), tmp_path, log=lambda s: None)
    (stage_dir(tmp_path, "b.x") / PENDING).write_text("[]")  # a damaged pending file: the work is started afresh
    (stage_dir(tmp_path, "b.x") / "kept.txt").write_text("checkpoint")
    execute(toy(calls, {"b.x": {"lr": 3}}), tmp_path, log=lambda s: None)
    assert read_marker(tmp_path, "b.x")["outputs"]["saw_partial_from_before"] is False


def test_a_failed_redo_keeps_the_old_results_and_a_changed_recorded_output_stops_the_plan(tmp_path: Path) -> None:
    """A redone stage is built beside its old results, which stay when it fails; a file a stage recorded with its
    SHA-256 (the folds CSV) that changed since is an error naming --force, not a silent skip."""
    from geca.utils.io import file_sha256

    calls: list[str] = []
    execute(toy(calls), tmp_path, log=lambda s: None)
    before = read_marker(tmp_path, "b.y")
    with pytest.raises(RuntimeError, match="b.y interrupted"):
        execute(toy(calls, fail={"b.y"}), tmp_path, force=["b.y"], log=lambda s: None)
    assert read_marker(tmp_path, "b.y") == before and sorted(p.name for p in (tmp_path / "b").iterdir()) == ["x", "y"]

    def writer(d: Path) -> dict:  # as geca sample does: its work folder beside its target
        (d.with_name(f".{d.name}.unfinished")).mkdir()
        raise RuntimeError("killed while sampling")

    with pytest.raises(RuntimeError, match="killed"):
        execute([Stage("w", writer)], tmp_path, log=lambda s: None)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]

    def folds(d: Path) -> dict:
        (d / "f.csv").write_text("filename,fold\n")
        return {"sha256": {"f.csv": file_sha256(d / "f.csv")}}

    stages = [Stage("f", folds), Stage("g", lambda d: {}, ("f",))]
    execute(stages, tmp_path, log=lambda s: None)
    (stage_dir(tmp_path, "f") / "f.csv").write_text("filename,fold\nother\n")
    with pytest.raises(StageError, match="f.csv: changed since stage f wrote it.*--force f"):
        plan(stages, tmp_path)
    assert [s.action for s in execute(stages, tmp_path, force=["f"], log=lambda s: None)] == ["run", "run"]


def test_every_option_has_help() -> None:
    import inspect

    for name, param in inspect.signature(experiment).parameters.items():
        assert getattr(param.default, "help", None), f"geca experiment: {name} has no help text"
    assert runner.invoke(app, ["--help"]).exit_code == 0


# ── configs ───────────────────────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("preset", sorted(p.name for p in PRESETS.glob("*.yaml")))
def test_every_preset_loads_and_makes_a_consistent_graph(preset: str, tmp_path: Path) -> None:
    lx = load_experiment(PRESETS / preset)
    stages = build_stages(Context(lx, tmp_path, torch.device("cpu"), log=lambda s: None))
    ids = [s.id for s in stages]
    assert len(ids) == len(set(ids))
    seen: set[str] = set()
    for s in stages:
        assert set(s.deps) <= seen, f"{s.id} depends on a later stage"
        seen.add(s.id)
    assert ids[-1] == "report" and set(stages[-1].deps) == set(ids[:-1])
    names = [g.name for g in lx.exp.generators]
    own = lx.run_config(lx.cellular, lx.folds[0]).model.heredity
    twin = f"train.{lx.cellular}.heredity-{'off' if own == 'gated' else 'gated'}"  # the GHG stage's other training
    twin = twin if lx.folds[0] is None else f"{twin}.f{lx.folds[0]}"
    assert {i for i in ids if i.startswith("train.")} == {
        f"train.{n}" if f is None else f"train.{n}.f{f}" for n in names for f in lx.folds} | {twin}
    assert lx.cellular is not None and {"ghg", "nca_steps", "growth", "evaluate", "classify"} <= set(ids)
    for n in names:  # every generator resolves to a run config on the study's data
        assert lx.run_config(n, lx.folds[0]).data.spec == lx.exp.data.spec


def test_run_configs_take_the_study_data_and_dotted_overrides(tmp_path: Path) -> None:
    lx = load_experiment(PRESETS / "deepdrid-256-gpu.yaml")
    cfg = lx.run_config("GeCA", None)
    assert cfg.model.name == "GeCA-S" and cfg.model.hidden_size == 768  # the named model's defaults
    assert cfg.data.folds_file is None and cfg.data.vae == "stabilityai/sd-vae-ft-ema"  # the study owns the splits
    cv = load_experiment(PRESETS / "synthetic-oct-cpu.yaml")
    assert cv.run_config("DiT", 1).model.name == "DiT-T" and cv.run_config("DiT", 1).data.fold == 1
    assert cv.run_config("DiT", 1).train.max_steps == 300 and cv.folds == [0, 1]
    # a generator's config may name a run preset instead of a file beside the experiment file
    raw = yaml.safe_load((PRESETS / "smoke.yaml").read_text())
    raw["generators"] = [{"name": "A", "config": "retinamnist-28-dit-cpu", "overrides": {"train.max_steps": 3}}]
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(raw))
    raw["nca_steps"] = {"enabled": False, "num_samples": 4}  # a disabled stage's settings are not checked
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_experiment(tmp_path / "preset.yaml").run_config("A", None)
    assert cfg.model.name == "DiT-T" and cfg.train.max_steps == 3


def test_the_logger_choice_changes_no_stage_key(tmp_path: Path) -> None:
    """Where training's numbers go (log.csv or TensorBoard) and how many checkpoints stay change no result: only the
    report (which quotes the config) reruns for them."""
    def params(edit: dict) -> dict[str, dict]:
        raw = yaml.safe_load((PRESETS / "smoke.yaml").read_text())
        for g in raw["generators"]:
            g.setdefault("overrides", {}).setdefault("train", {}).update(edit)
        path = tmp_path / "edited.yaml"
        path.write_text(yaml.safe_dump(raw))
        lx = load_experiment(path)
        stages = build_stages(Context(lx, tmp_path, torch.device("cpu"), log=lambda s: None))
        return {s.id: s.params for s in stages if s.id != "report"}

    plain = params({})
    assert params({"logger": "tensorboard"}) == plain == params({"keep_checkpoints": 1})
    assert params({"max_steps": 7})["train.GeCA"] != plain["train.GeCA"]
    # keys as they were before model.skip_idle, model.compile's `auto` and the C attention kernels (the default
    # attention `auto` keys as `fast`, the old default) existed: finished studies stay done
    model = plain["train.GeCA"]["run"]["model"]
    assert "skip_idle" not in model and model["compile"] is False and model["attention"] == "fast"


@pytest.mark.parametrize(("edit", "message"), [
    ({"generatorz": []}, "unknown key"),
    ({"ghg": {"modes": ["hiden"]}}, "ghg.modes"),
    ({"generators": [{"name": "A", "overrides": {"model.name": "GeCA-T"}}] * 2}, "distinct"),
    ({"generators": [{"name": "A", "config": "missing.yaml"}]},
     "bad.yaml: generator 'A': config 'missing.yaml': no file"),
    ({"generators": [{"name": "A", "overrides": {"model.name": "GeCA-T", "train.lr": "fast"}}]},
     "bad.yaml: generator 'A'.train.lr: expected float"),
    ({"generators": [{"name": "A", "overrides": {"model.name": "GeCA-Q"}}]},
     "bad.yaml: generator 'A': unknown model 'GeCA-Q'"),
    ({"data": {"spec": "synthetic-oct@patients=9,size=8", "folds_file": "nowhere.csv"}},
     "bad.yaml: data.folds_file: nowhere.csv: not readable"),
    ({"generators": [{"name": "A", "overrides": {"train.max_stepz": 3}}]}, "max_stepz"),
    ({"data": {"spec": "x", "run_folds": 2}}, "run_folds"),
    ({"ghg": {"num_samples": 4}}, "bad.yaml: ghg.num_samples must be ≥ 8 (KID under evaluation.protocol paper)"),
    ({"data": {"spec": "synthetic-fundus", "cv_val": "next-fold"}}, "bad.yaml: data.cv_val next-fold needs cross"),
    ({"generators": [{"name": "A", "overrides": {"model.name": "GeCA-T", "model.hidden_size": 0}}]},
     "bad.yaml: generator 'A': model.hidden_size must be a positive multiple"),
    ({"generators": [{"name": "A", "overrides": {"model.name": "GeCA-T", "model.heredity": "off",
                                                 "train.heredity_prob": 0}}]},
     "generator 'A' (its GHG twin, heredity gated): train.heredity_prob must be > 0"),
    ({"classification": {"epochs": 0}}, "bad.yaml: classification.epochs must be ≥ 1, got 0"),
    ({"classification": {"p_metric": "auroc"}}, "bad.yaml: classification.p_metric must be one of"),
    ({"name": ""}, "bad.yaml: name is required"),
    ({"evaluation": {"batch_size": 0}}, "bad.yaml: evaluation.batch_size must be in [1, 1048576], got 0"),
    ({"evaluation": {"protocol": "papr"}}, "bad.yaml: evaluation.protocol must be one of paper, standard"),
    ({"evaluation": {"gg_features": "dino"}}, "bad.yaml: evaluation.gg_features must be one of"),
    ({"sample_batch_size": 10**20}, "bad.yaml: sample_batch_size must be in [1, 1048576]"),
    ({"classification": {"stem": "vgg"}}, "bad.yaml: classification.stem must be one of imagenet, cifar"),
    ({"nca_steps": {"values": [4, 8, 4]}}, "bad.yaml: nca_steps.values: 4 given more than once"),
    ({"sampler_cost": {"samplers": [{"sampler": "ddim", "steps": 4, "ghg": "none"}] * 2}},
     "bad.yaml: sampler_cost.samplers: ddim4-ghg_none given more than once"),
])
def test_bad_experiment_configs_fail_clearly(edit: dict, message: str, tmp_path: Path) -> None:
    raw = yaml.safe_load((PRESETS / "smoke.yaml").read_text())
    raw.update(edit)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_experiment(path)


def test_an_empty_study_file_says_what_a_study_needs(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=r"empty.yaml: empty; a study needs name, data.spec and generators"):
        load_experiment(tmp_path / "empty.yaml")


def test_missing_feature_weights_are_refused_before_any_stage_runs(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A study scored on Inception or with LPIPS finds out that the weights are missing before it trains, also in a
    dry run (the tests' torch hub cache holds none)."""
    monkeypatch.delenv("GECA_WEIGHTS_DIR", raising=False)
    raw = yaml.safe_load((PRESETS / "smoke.yaml").read_text())
    path = tmp_path / "bad.yaml"
    for edit, key in (({"features": "inception"}, "evaluation.features_file"),
                      ({"lpips_weights": None}, "evaluation.lpips_weights")):
        path.write_text(yaml.safe_dump({**raw, "evaluation": {**raw["evaluation"], **edit}}))
        for dry in (["--dry-run"], []):
            res = runner.invoke(app, [str(path), "--out", str(tmp_path / "study"), *dry])
            assert res.exit_code == 2 and f"then set {key} (in {path}) to /path/to/" in " ".join(res.output.split())
            assert not (tmp_path / "study").exists()


def test_missing_data_is_refused_before_any_stage_folder_exists(tmp_path: Path) -> None:
    raw = yaml.safe_load((PRESETS / "smoke.yaml").read_text())
    raw["data"]["spec"] = str(tmp_path / "missing.npz")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, [str(path), "--out", str(tmp_path / "study")])
    assert res.exit_code == 2 and res.output.startswith(f"error: {path}: data.spec: {tmp_path / 'missing.npz'}: npz"), \
        res.output
    assert not (tmp_path / "study").exists()
    raw["data"]["spec"] = "synthetic-oct@patients=9,colour=2"
    path.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, [str(path), "--out", str(tmp_path / "study")])
    assert res.exit_code == 2 and "unknown option 'colour'" in res.output and not (tmp_path / "study").exists()
    # the generator's own ranges too, also for --dry-run; and a generator that asks to download drawn data
    raw["data"]["spec"] = "synthetic-oct@patients=4"
    path.write_text(yaml.safe_dump(raw))
    name = raw["generators"][0]["name"]
    for dry in ([], ["--dry-run"]):
        res = runner.invoke(app, [str(path), "--out", str(tmp_path / "study"), *dry])
        assert res.exit_code == 2 and "patients must be in [5, 1000000]" in res.output, res.output
        assert not (tmp_path / "study").exists()
    raw["data"]["spec"] = "synthetic-oct@patients=9,size=8"
    raw["generators"][0].setdefault("overrides", {})["data.download"] = True
    path.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, [str(path), "--out", str(tmp_path / "study"), "--dry-run"])
    assert res.exit_code == 2 and f"generator {name!r} (its run config): --download (data.download)" in res.output
    # an npz with a label out of range, and a negative seed: found at once, not after training
    arrays = {f"{s}_{k}": v for s in ("train", "val", "test") for k, v in
              (("images", np.zeros((4, 8, 8, 3), np.uint8)), ("labels", np.array([[0], [1], [1], [0]])))}
    arrays["test_labels"] = np.array([[0], [1], [-1], [0]])
    np.savez(tmp_path / "neg.npz", **arrays)
    odd = {k: np.zeros((4, 5, 5, 3), np.uint8) if k.endswith("images") else v for k, v in arrays.items()}
    np.savez(tmp_path / "odd.npz", **{**odd, "test_labels": arrays["val_labels"]})  # 5 px: no DiT patches of 2
    for edit, said in (({"data": {"spec": str(tmp_path / "neg.npz")}}, "test_labels[2] = -1 is out of range"),
                       ({"seed": -5}, "seed must be in [0, 2³²), got -5"),
                       ({"data": {"spec": "synthetic-fundus@n=60", "image_size": 9}},
                        "generator 'DiT': resolution 9 is not divisible by the patch size 2 (the data's images are "
                        "9 px)"),
                       ({"data": {"spec": "synthetic-fundus@n=60,size=11"}}, "(the data's images are 11 px)"),
                       ({"data": {"spec": str(tmp_path / "odd.npz")}}, "patch size 2 (the data's images are 5 px)")):
        path.write_text(yaml.safe_dump({**yaml.safe_load((PRESETS / "smoke.yaml").read_text()), **edit}))
        res = runner.invoke(app, [str(path), "--out", str(tmp_path / "study"), "--dry-run"])
        assert res.exit_code == 2 and f"error: {path}: " in res.output and said in res.output, res.output
        assert not (tmp_path / "study").exists()
    raw = yaml.safe_load((PRESETS / "smoke.yaml").read_text())  # each generator at its own size: checked at it
    for g in raw["generators"]:
        g["overrides"]["data"] = {"image_size": 16}
    path.write_text(yaml.safe_dump({**raw, "data": {"spec": str(tmp_path / "odd.npz")}}))
    res = runner.invoke(app, [str(path), "--out", str(tmp_path / "study"), "--dry-run"])
    assert res.exit_code == 0, res.output


# ── the smoke study, end to end ───────────────────────────────────────────────────────────────────────────────────


def md_rows(md: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after `heading`."""
    lines = md[md.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def md_table(md: str, heading: str) -> dict[str, list[str]]:
    """The first table after `heading`, as {first cell: the other cells} (first cells must be distinct)."""
    return {r[0]: r[1:] for r in md_rows(md, heading)}


def pm(cell: str) -> tuple[float, float]:
    mean, std = cell.split("±")
    return float(mean), float(std)


def kid_by_name(root: Path, stage: str) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((root / stage / "metrics.json").read_text())["results"]}


def all_run_ids(root: Path) -> dict[str, str]:
    return {json.loads(p.read_text())["stage"]: json.loads(p.read_text())["run_id"] for p in root.glob(f"**/{MARKER}")}


@pytest.mark.slow
def test_smoke_experiment_end_to_end(tmp_path: Path) -> None:
    root = tmp_path / "exp"
    config = str(PRESETS / "smoke.yaml")
    res = runner.invoke(app, [config, "--out", str(root)])
    assert res.exit_code == 0, res.output
    md = (root / "report" / "report.md").read_text()

    # Table 1 is the evaluate stage's metrics.json.
    table1, metrics = md_table(md, "## Table 1"), kid_by_name(root, "evaluate")
    assert set(table1) == {"GeCA", "DiT", "LDM"}
    for name, cells in table1.items():
        r = metrics[name]
        assert int(cells[1]) == r["n"] == 16
        assert pm(cells[2]) == pytest.approx((r["kid"]["mean"] * 1e3, r["kid"]["std"] * 1e3), abs=0.006)
        assert pm(cells[3]) == pytest.approx((r["lpips"]["mean"], r["lpips"]["std"]), abs=6e-5)
        assert float(cells[4]) == pytest.approx(r["fld"]["gg"], abs=0.006)
        assert float(cells[5]) == pytest.approx(r["fld"]["fld"], abs=0.006)
    # A caveat names exactly the generators whose class-faithfulness sits near chance (4 training steps: most).
    # When the judge itself is near chance on real images, the caveat says that instead.
    ev = json.loads((root / "evaluate" / "metrics.json").read_text())
    real, chance = ev["real"]["faithfulness"]["value"], ev["real"]["faithfulness"]["chance"]
    weak = {x["name"] for x in ev["results"]
            if x["faithfulness"]["value"] <= x["faithfulness"]["chance"] + 0.25 * (real - x["faithfulness"]["chance"])}
    section = md[md.index("## Table 1"):md.index("## Fig. 5")]
    caveat = re.search(r"\*\*Near-untrained generators?: (.*?) — ", section)
    judge = f"judge scores real images {real:.2f} (chance {chance:.2f})" in section
    if real < chance + 0.1:
        assert judge and caveat is None
    else:
        assert not judge and (caveat is not None) == bool(weak)
        if weak:
            assert set(re.findall(r"(\w+) \(\d\.\d\d, chance", caveat.group(1))) == weak
    # Fig. 5 (every GHG mode under both trainings), Fig. 6 and the sampler cost are their stages' metrics.json.
    rows, scores = md_rows(md, "## Fig. 5"), kid_by_name(root, "ghg")
    assert len(rows) == len(scores) == 8
    for training, mode, kid_cell, faithful_cell in rows:
        r = scores[f"ghg-{mode}-heredity-{'gated' if 'ours' in training else 'off'}"]
        assert pm(kid_cell) == pytest.approx((r["kid"]["mean"] * 1e3, r["kid"]["std"] * 1e3), abs=0.006)
        assert float(faithful_cell.split()[0]) == pytest.approx(r["faithfulness"]["value"], abs=0.006)
    assert {"figures/ghg_trace_off.png", "figures/ghg_trace_gated.png"} <= set(re.findall(r"\((figures/[^)]+)\)", md))
    for heading, stage, key in (("## Fig. 6", "nca_steps", "M{}"), ("## Sampler cost", "sampler_cost", None)):
        rows, scores = md_rows(md, heading), kid_by_name(root, stage)
        assert len(rows) == len(scores) > 0
        for first, *cells in rows:
            # a sampler-cost set is named by generator, sampler and steps, and by a precision other than fp32
            name = key.format(first) if key else (f"{first}-{cells[0].replace(' ', '').lower()}"
                                                  f"{'' if cells[2] == 'fp32' else '-' + cells[2]}")
            k = scores[name]["kid"]
            assert pm(cells[-1]) == pytest.approx((k["mean"] * 1e3, k["std"] * 1e3), abs=0.006)
    cost = md_rows(md, "## Sampler cost")  # the preset's bf16 set says so, once per generator
    assert [r[3] for r in cost].count("bf16") == len({r[0] for r in cost}) > 0
    # Table 2 is the classify stage's results.json (mAP ×100), with a p column against the baseline.
    results = json.loads((root / "classify" / "results.json").read_text())
    table2 = md_table(md, "### Scan level")
    assert set(table2) == {"none", "geometric", "+GeCA", "+DiT", "+LDM"}
    col = results["metrics"].index("map")
    for arm, cells in table2.items():
        assert float(cells[col]) == pytest.approx(100 * results["arms"][arm]["summary"]["scan"]["map"]["mean"],
                                                  abs=0.006)
        assert (cells[-1] == "—") == (arm == "geometric")
    # The cost table is the training stages' outputs.
    for run, cells in md_table(md, "## Training and cost").items():
        marker = read_marker(root, f"train.{run}")["outputs"]
        assert int(cells[1].replace(",", "")) == marker["parameters"] and int(cells[4]) == marker["steps"] == 4
    html = (root / "report" / "report.html").read_text()
    figures = re.findall(r"!\[[^\]]*\]\((figures/[^)]+)\)", md)
    assert len(figures) >= 9 and all((root / "report" / f).is_file() for f in figures)
    assert 'src="figures/' not in html and html.count('src="data:image/') == len(figures)
    assert html.count("<details><summary>YAML (") == 2  # the experiment config and the resolved run configs

    # A second run skips every stage; --force redoes one stage and its dependants only.
    before = all_run_ids(root)
    res = runner.invoke(app, [config, "--out", str(root)])
    assert res.exit_code == 0 and "0 stage(s) run, 17 skipped" in res.output, res.output
    assert all_run_ids(root) == before
    res = runner.invoke(app, [config, "--out", str(root), "--force", "ghg"])
    assert res.exit_code == 0, res.output
    after = all_run_ids(root)
    assert {s for s in after if after[s] != before[s]} == {"ghg", "report"}

    # Changing one generator's config redoes it and what depends on it (--dry-run shows the plan).
    raw = yaml.safe_load(Path(config).read_text())
    raw["generators"][1]["overrides"]["train"]["max_steps"] = 5
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, [str(changed), "--out", str(root), "--dry-run"])
    assert res.exit_code == 0, res.output
    redo = {line.split()[1] for line in res.output.splitlines() if line.startswith("run ")}
    assert redo == {"train.DiT", "sample.DiT", "evaluate", "sampler_cost", "expand.DiT", "classify", "report"}

    # A stage output damaged after the stage was done is named, with the stage to redo.
    results = root / "classify" / "results.json"
    for damaged, message in (("[]", f"{results}: corrupt"),
                             ("{}", "an output of stage classify, train, evaluate lacks what the report reads")):
        results.write_text(damaged)
        res = runner.invoke(app, [config, "--out", str(root), "--force", "report"])
        assert res.exit_code == 2 and message in res.output and "--force" in res.output, res.output

    # --only with an input that is not done fails with exit 2.
    res = runner.invoke(app, [config, "--out", str(tmp_path / "fresh"), "--only", "evaluate"])
    assert res.exit_code == 2 and "not done" in res.output and "sample.GeCA" in res.output


def test_report_caveat_names_near_chance_generators_only() -> None:
    from geca.experiment.report import _untrained

    def result(name: str, value: float) -> dict:
        return {"name": name, "faithfulness": {"value": value, "chance": 0.2}}

    class Reader:  # what _untrained reads: Table 1's metrics and each generator's training steps
        def __init__(self, real: float) -> None:
            self.rep = {"real": {"faithfulness": {"value": real, "chance": 0.2}},
                        "results": [result("GeCA", 0.30), result("DiT", 0.60), result("LDM", 0.39)]}

        def metrics(self, stage: str) -> dict:
            return self.rep

        def train(self, name: str) -> dict:
            return {"steps": 300}

    # Real images 0.84: a quarter of the way from chance is 0.36, so GeCA (0.30) is named and LDM (0.39) is not.
    (line, _) = _untrained(Reader(0.84), ["GeCA", "DiT", "LDM"])
    assert "GeCA (0.30, chance 0.20, 300 training steps)" in line and "LDM" not in line and "DiT" not in line
    assert _untrained(Reader(0.84), ["DiT", "LDM"]) == []  # only the generators a table shows
    (line, _) = _untrained(Reader(0.25), ["DiT"])  # a judge near chance on real images cannot rank anything
    assert "judge scores real images 0.25 (chance 0.20)" in line


def test_the_real_stage_follows_cv_val(tmp_path: Path) -> None:
    """Its training split feeds FLD/GG and the domain features: another cv_val is another split."""
    def real_params(cv_val: str | None) -> dict:
        raw = yaml.safe_load((PRESETS / "synthetic-oct-cpu.yaml").read_text())
        if cv_val is not None:
            raw["data"]["cv_val"] = cv_val
        for g in raw["generators"]:  # relative to the preset's folder
            g["config"] = str((PRESETS / g["config"]).resolve())
        path = tmp_path / "edited.yaml"
        path.write_text(yaml.safe_dump(raw))
        stages = build_stages(Context(load_experiment(path), tmp_path, torch.device("cpu"), log=lambda s: None))
        return next(s.params for s in stages if s.id == "real")

    default = real_params(None)
    assert real_params("slice") == default and "cv_val" not in default  # finished studies keep their key
    assert real_params("next-fold") == {**default, "cv_val": "next-fold"}


def test_a_stage_folder_the_study_did_not_write_is_never_replaced(tmp_path: Path) -> None:
    calls: list[str] = []
    notes = stage_dir(tmp_path, "b.x") / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("precious")
    with pytest.raises(StageError, match=r"b/x: holds files this study did not write .* stage b.x would replace"):
        execute(toy(calls), tmp_path, log=lambda s: None)
    assert calls == [] and notes.read_text() == "precious"  # refused before any stage ran
    notes.unlink()
    with pytest.raises(RuntimeError, match="interrupted"):
        execute(toy(calls, fail={"b.x"}), tmp_path, log=lambda s: None)
    (notes.parent / "kept.txt").write_text("checkpoint")  # what an interrupted training leaves
    os.replace(notes.parent / PENDING, notes.parent / "pending.json")  # as a geca before 2026-11-27 named it
    calls.clear()
    execute(toy(calls), tmp_path, log=lambda s: None)
    assert calls == ["b.x", "b.y", "c"]
    assert read_marker(tmp_path, "b.x")["outputs"]["saw_partial_from_before"] is True  # resumed, not wiped
    with pytest.raises(RuntimeError, match="interrupted"):  # both names (copied by hand): the old one goes
        execute(toy(calls, {"b.x": {"lr": 4}}, fail={"b.x"}), tmp_path, log=lambda s: None)
    shutil.copy(notes.parent / PENDING, notes.parent / "pending.json")
    (notes.parent / "kept.txt").write_text("checkpoint")
    execute(toy(calls, {"b.x": {"lr": 4}}), tmp_path, log=lambda s: None)
    assert read_marker(tmp_path, "b.x")["outputs"]["saw_partial_from_before"] is True
    assert not (notes.parent / "pending.json").exists()


def test_a_linked_stage_folder_stays_a_link(tmp_path: Path) -> None:
    """Resumable (b.x) and staged (b.y) stages write where the link points, also when redone."""
    calls: list[str] = []
    (tmp_path / "disk" / "x").mkdir(parents=True)
    (tmp_path / "disk" / "y").mkdir()
    (tmp_path / "root" / "b").mkdir(parents=True)
    for name in ("x", "y"):
        (tmp_path / "root" / "b" / name).symlink_to(tmp_path / "disk" / name, target_is_directory=True)
    for force in (None, ["b"]):
        execute(toy(calls), tmp_path / "root", force=force, log=lambda s: None)
        for name in ("x", "y"):
            assert (tmp_path / "root" / "b" / name).is_symlink()
            assert (tmp_path / "disk" / name / MARKER).is_file()


@pytest.mark.parametrize(("preset", "lineage"), [("smoke.yaml", True), ("synthetic-oct-cpu.yaml", False)])
def test_evaluation_checks_lineage_unless_the_study_copied_a_folds_split(preset: str, lineage: bool, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CV the study scores against its own copies of a fold's splits, which no generator's manifest names:
    `geca evaluate`'s check of --train against each manifest would warn of every set."""
    from geca.experiment import stages

    seen = []
    monkeypatch.setattr(stages, "run_evaluation", lambda settings, *a, **k: seen.append(settings))
    ctx = Context(load_experiment(PRESETS / preset), tmp_path, torch.device("cpu"), log=lambda s: None)
    from conftest import blob_images

    monkeypatch.setattr(ctx, "split", lambda split, fold: blob_images(n=4, size=8))  # no folds stage ran here
    stages._evaluate(ctx, [], tmp_path)
    assert seen[0].lineage is lineage


def test_the_real_stage_is_redone_for_other_procedural_data_on_the_same_folds(tmp_path: Path) -> None:
    """With the user's folds file there is no folds stage to carry the spec, and a procedural spec has no file whose
    SHA-256 would: another `size` kept the real stage's old images, which evaluation then scored new samples against."""
    from geca.data.groups import make_folds

    folds = tmp_path / "folds.csv"
    make_folds("synthetic-oct@patients=20,size=16", 5, 0, folds)
    raw = yaml.safe_load((PRESETS / "smoke.yaml").read_text())

    def real_params(spec: str) -> dict:
        path = tmp_path / "edited.yaml"
        path.write_text(yaml.safe_dump({**raw, "data": {"spec": spec, "folds_file": str(folds), "run_folds": 1}}))
        stages = build_stages(Context(load_experiment(path), tmp_path, torch.device("cpu"), log=lambda s: None))
        return next(s.params for s in stages if s.id == "real")

    assert real_params("synthetic-oct@patients=20,size=16") != real_params("synthetic-oct@patients=20,size=32")


def test_a_cv_studys_evaluation_says_whether_the_data_is_multi_label(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    """The real stage's copies of a fold's splits are folder + CSV sets, whose all-one-hot rows would be read as
    multi-class: the evaluation is told what the data is (also for studies whose copies were written before)."""
    from types import SimpleNamespace

    from geca.experiment import stages

    seen = {}
    monkeypatch.setattr(stages, "run_evaluation", lambda settings, *a, **k: seen.update(multilabel=settings))
    for cv, data_multilabel, told in ((True, True, True), (True, False, False), (False, True, None)):
        ctx = SimpleNamespace(
            exp=SimpleNamespace(data=SimpleNamespace(cv=cv)), eval_fold=1, device="cpu", progress=False, log=print,
            split=lambda split, fold, m=data_multilabel: SimpleNamespace(multilabel=m), real_spec=lambda split: split,
            loaded=SimpleNamespace(eval_settings=lambda sets, real, train, **more: more["multilabel"]))
        stages._evaluate(ctx, [], tmp_path)
        assert seen["multilabel"] is told


def test_the_sampler_cost_report_tells_apart_settings_beyond_sampler_and_steps(tmp_path: Path) -> None:
    """Two DDIM 4 sets, one at CFG 3: two rows and two curves, not one curve with two points at 4 calls."""
    from types import SimpleNamespace

    from geca.experiment.report import _sampler_cost

    kid = {"mean": 0.01, "std": 0.001, "se": 0.001}
    sampling = {"sampler": "ddim", "steps": 4, "guidance_scale": 1.5, "schedule": "uniform", "precision": "fp32"}
    sets = [{"name": "G-ddim4", "generator": "G", "variant": "", "sampling": sampling, "seconds": 1, "images": 8},
            {"name": "G-ddim4-cfg3", "generator": "G", "variant": "cfg3", "seconds": 1, "images": 8,
             "sampling": {**sampling, "guidance_scale": 3.0}}]

    class Reader:
        ctx = SimpleNamespace(outputs=lambda stage: {"sets": sets})

        def metrics(self, stage: str) -> dict:
            if stage == "evaluate":
                return {"real": {}, "results": []}
            return {"results": [{"name": s["name"], "kid": kid} for s in sets]}

        def train(self, name: str) -> dict:
            return {"macs_per_call": 1e9, "steps": 10}

    md = "\n".join(_sampler_cost(Reader(), tmp_path))
    assert "| G | DDIM 4 | uniform |" in md and "| G | DDIM 4 (cfg3) | uniform |" in md, md
