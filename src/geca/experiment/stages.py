"""The study's stages, one function each, and the graph that ties them: folds → train → sample → evaluate,
the GeCA ablations (GHG, M, growth), the sampler cost, expansion → classification, and the report."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

from geca.data.groups import make_folds
from geca.data.medmnist_npz import find_npz
from geca.data.registry import parse_spec
from geca.downstream.classify import classify
from geca.experiment.context import Context, expand_id, train_id
from geca.experiment.graph import Stage, stage_dir
from geca.experiment.report import write_report
from geca.metrics.evaluate import run_evaluation
from geca.models.build import count_macs, count_parameters
from geca.run import load_run
from geca.sampling.config import SamplerConfig, settings_key
from geca.sampling.expand import expand
from geca.sampling.generate import run_sampler, write_images, write_sample_dir
from geca.sampling.growth import grow_organism
from geca.sampling.trace import write_trace
from geca.utils.io import csv_rows, file_sha256

# ── stages ────────────────────────────────────────────────────────────────────────────────────────────────────────


def folds_stage(ctx: Context, out: Path) -> dict[str, Any]:
    """Patient-level, label-stratified folds of the data's `all` split (by eye, or image, without patient ids)."""
    groups, _ = make_folds(ctx.exp.data.spec, ctx.exp.data.folds, ctx.exp.seed, out / "folds.csv",
                           f"{ctx.loaded.path}: data.folds")
    return {"folds_file": "folds.csv", "k": ctx.exp.data.folds, "images": len(groups.names), "grouped_by": groups.by,
            "sha256": {"folds.csv": file_sha256(out / "folds.csv")}}


def train_stage(ctx: Context, out: Path, name: str, fold: int | None, heredity: str | None = None
                ) -> dict[str, Any]:
    """Train (or resume) one generator (with `heredity`, its GHG twin); record its size, cost per call and
    training throughput."""
    from geca.training.trainer import train

    config = ctx.loaded.run_config(name, fold)
    if heredity is not None:
        config.model.heredity = heredity
    config.data.folds_file = ctx.folds_file
    if config.data.vae and config.data.latent_cache is None:  # one latent cache per fold, shared by the generators
        config.data.latent_cache = str(ctx.root / "latents" / ("all" if fold is None else f"fold{fold}"))
    resume = (out / "checkpoints" / "latest.json").exists()
    if resume:
        ctx.log(f"   resuming {out} from its latest checkpoint")
    summary = train(config, out, resume=resume, progress=ctx.progress)
    run = load_run(out, device="cpu")
    s = run.spec
    rows = csv_rows(out / "log.csv")
    return {"generator": name, "fold": fold, "model": config.model.name, "family": config.model.family,
            "heredity": getattr(config.model, "heredity", None),
            "steps": summary["step"], "parameters": count_parameters(run.model),
            "macs_per_call": count_macs(run.model, s.in_channels, s.num_classes, s.resolution),
            "input": [s.in_channels, s.resolution, s.resolution], "latent": s.latent is not None,
            "images_per_s": statistics.median(float(r["images_per_s"]) for r in rows) if rows else None,
            "train_minutes": float(rows[-1]["elapsed_min"]) if rows else None, "log": "log.csv",
            "loss_png": "loss.png"}


def real_stage(ctx: Context, out: Path) -> dict[str, Any]:
    """Under CV: the evaluation fold's test and training splits as folder + CSV sets that `run_evaluation` reads.

    Written when `EvalSettings` could not name a fold's split; it now can (its folds_file and fold), but each
    evaluation stage's key holds this stage's run id, so dropping it would re-run every finished CV study's
    evaluation, GHG, M and sampler-cost stages.
    """
    counts = {}
    for split in ("test", "train"):
        data = ctx.split(split, ctx.eval_fold)
        write_images(out / split, data.images, data.labels, data.class_names)
        counts[split] = len(data)
    return {"fold": ctx.eval_fold, "images": counts}


def sample_stage(ctx: Context, out: Path, name: str) -> dict[str, Any]:
    """Table 1's generated set: one image per test label vector (or `evaluation.num_samples`)."""
    ev = ctx.exp.evaluation
    run = ctx.trained(train_id(name, ctx.eval_fold))
    manifest, _ = write_sample_dir(out, run, ctx.eval_labels(ev.num_samples), ev.sampler,
                                   ctx.exp.seed, ctx.exp.sample_batch_size, ctx.device,
                                   {"labels": "test split", "fold": ctx.eval_fold}, overwrite=True,
                                   progress=ctx.progress)
    return {"generator": name, "images": manifest["num_images"], "seconds": manifest["seconds"],
            "sampling": manifest["sampling"]}


def _evaluate(ctx: Context, sets: list[tuple[str, Path]], out: Path) -> dict[str, Any]:
    # under CV the real stage's copies cannot show that a split of one-hot rows is multi-label data: said here
    multilabel = ctx.split("test", ctx.eval_fold).multilabel if ctx.exp.data.cv else None
    settings = ctx.loaded.eval_settings(sets, ctx.real_spec("test"), ctx.real_spec("train"), device=str(ctx.device),
                                        progress=ctx.progress, lineage=not ctx.exp.data.cv, multilabel=multilabel)
    return run_evaluation(settings, out / "metrics.json", log=ctx.log, overwrite=True)


def evaluate_stage(ctx: Context, out: Path) -> dict[str, Any]:
    """Table 1: KID, LPIPS, FLD and GG of every generator's sample set."""
    sets = [(g.name, stage_dir(ctx.root, f"sample.{g.name}")) for g in ctx.exp.generators]
    report = _evaluate(ctx, sets, out)
    return {"metrics": "metrics.json", "grids": {r["name"]: r["grid"] for r in report["results"]}}


def _sweep(ctx: Context, out: Path, variants: list[tuple[str, str, SamplerConfig]], n: int | None) -> dict[str, Any]:
    """Sample one set per (set name, training stage, sampler settings) with the same labels and seed, then score
    them."""
    labels = ctx.eval_labels(n)
    sets, rows = [], []
    for set_name, training, sc in variants:
        run = ctx.trained(training)
        path = out / "samples" / set_name
        manifest, _ = write_sample_dir(path, run, labels, sc, ctx.exp.seed,
                                       ctx.exp.sample_batch_size, ctx.device, progress=ctx.progress)
        sets.append((set_name, path))
        rows.append({"name": set_name, "training": training, "sampling": manifest["sampling"],
                     "images": manifest["num_images"], "seconds": manifest["seconds"]})
    _evaluate(ctx, sets, out)
    return {"metrics": "metrics.json", "sets": rows}


def ghg_trainings(ctx: Context) -> dict[str, str]:
    """model.heredity → training stage of the GeCA generator: its own, and with `both_trainings` its twin."""
    fold, name = ctx.eval_fold, ctx.loaded.cellular
    own = getattr(ctx.loaded.run_config(name, fold).model, "heredity", "off")
    trainings = {own: train_id(name, fold)}
    if ctx.exp.ghg.both_trainings:
        other = "off" if own == "gated" else "gated"
        trainings[other] = train_id(name, fold, heredity=other)
    return trainings


def ghg_stage(ctx: Context, out: Path) -> dict[str, Any]:
    """Fig. 5: the GeCA generator under each GHG mode, for each training (heredity gated / off), and the trace of
    its cell state along one reverse chain."""
    g = ctx.exp.ghg
    trainings = ghg_trainings(ctx)
    heredity = {f"ghg-{m}-heredity-{h}": h for h in trainings for m in g.modes}
    result = _sweep(ctx, out, [(name, trainings[h], replace(g.sampler, ghg=name.split("-")[1]))
                               for name, h in heredity.items()], g.num_samples)
    for row in result["sets"]:
        row["heredity"] = heredity[row["name"]]
    result["traces"] = {}
    for h, stage in trainings.items():
        run = ctx.trained(stage)
        trace = write_trace(run, run_sampler(run, g.sampler), ctx.exp.seed, ctx.device, out / f"trace-{h}.csv")
        result["traces"][h] = {"csv": trace.name, "png": trace.with_suffix(".png").name}
    return result


def nca_steps_stage(ctx: Context, out: Path) -> dict[str, Any]:
    """Fig. 6: the GeCA generator with M NCA steps per call (trained with its own M)."""
    m, stage = ctx.exp.nca_steps, train_id(ctx.loaded.cellular, ctx.eval_fold)
    return _sweep(ctx, out, [(f"M{v}", stage, replace(m.sampler, nca_steps=v)) for v in m.values], m.num_samples)


def sampler_cost_stage(ctx: Context, out: Path) -> dict[str, Any]:
    """KID against denoiser calls: every chosen generator under every sampler setting."""
    c = ctx.exp.sampler_cost
    names = c.generators or [g.name for g in ctx.exp.generators]
    generator = {f"{g}-{s.label()}": (g, s) for g in names for s in c.samplers}
    result = _sweep(ctx, out, [(name, train_id(g, ctx.eval_fold), s) for name, (g, s) in generator.items()],
                    c.num_samples)
    for row in result["sets"]:
        row["generator"], row["variant"] = generator[row["name"]][0], generator[row["name"]][1].variant()
    return result


def growth_stage(ctx: Context, out: Path) -> dict[str, Any]:
    """One GeCA organism: its M updates at noise level t, and its denoising trajectory (GIFs and strips)."""
    g = ctx.exp.growth
    run = ctx.trained(train_id(ctx.loaded.cellular, ctx.eval_fold))
    organism = grow_organism(run, g.label, g.t, g.sampler, g.frames, ctx.exp.seed, ctx.device, out)
    return {"label": organism.label, "t": organism.t, **{k: p.name for k, p in organism.paths.items()}}


def expand_stage(ctx: Context, out: Path, name: str, fold: int | None) -> dict[str, Any]:
    """Eq. 8: every training label vector `ratio` times, sampled from the generator trained on that training set."""
    e = ctx.exp.expansion
    run = ctx.trained(train_id(name, fold))
    manifest = expand(run, out, e.ratio, e.sampler, ctx.exp.seed, ctx.exp.sample_batch_size,
                      ctx.device, overwrite=True, progress=ctx.progress)
    return {"generator": name, "fold": fold, "images": manifest["num_images"], "seconds": manifest["seconds"]}


def classify_stage(ctx: Context, out: Path) -> dict[str, Any]:
    """Table 2: arms none, geometric and +GENERATOR on each (fold, seed) unit, with paired p-values."""
    c, d = ctx.exp.classification, ctx.exp.data
    fold = None if not d.cv else "{fold}"
    synthetic = {g.name: str(stage_dir(ctx.root, expand_id(g.name, fold))) for g in ctx.exp.generators}
    summary = classify(d.spec, synthetic, None, replace(c, image_size=c.image_size or d.image_size), out,
                       Path(ctx.folds_file) if ctx.folds_file else None, d.run_folds if d.cv else None, d.cv_val,
                       str(ctx.device), ctx.progress)
    return {"results": "results.json", "table": "table.md", "protocol": summary["protocol"], "test": summary["test"]}


def report_stage(ctx: Context, out: Path, stage_ids: list[str]) -> dict[str, Any]:
    """report.md and report.html from the outputs of `stage_ids` (every other stage of the study)."""
    return write_report(ctx, out, stage_ids)


# ── the graph ─────────────────────────────────────────────────────────────────────────────────────────────────────


def _hashed(run_config: Any) -> dict[str, Any]:
    """A training stage's config as its key sees it: where the numbers go (train.logger), how many checkpoints stay
    (train.keep_checkpoints) and whether idle cells are skipped (model.skip_idle) change no result, so none retrains
    anything and studies finished before the options existed stay done; model.compile keys as the boolean it was
    before `auto` (keyed as false, the old default), and GeCA's attention `auto` and `cpu` as `fast`, the old default
    (the same maths). Other attention implementations and checkpointing stay in the key as they always were: changing
    them retrains."""
    run = asdict(run_config)
    run["train"].pop("logger", None)
    run["train"].pop("keep_checkpoints", None)
    run["model"].pop("skip_idle", None)
    run["model"]["compile"] = run["model"]["compile"] == "true"
    if run["model"].get("attention") in ("auto", "cpu"):
        run["model"]["attention"] = "fast"
    return run


def data_fingerprint(ctx: Context) -> dict[str, str]:
    """SHA-256 of the data files the study reads (dataset file, folds file), so that new data redoes the study."""
    name, _ = parse_spec(ctx.exp.data.spec)
    files = {"spec": Path(name).expanduser() if Path(name).expanduser().is_file() else find_npz(name),
             "folds_file": Path(ctx.exp.data.folds_file) if ctx.exp.data.folds_file else None}
    return {k: file_sha256(p) for k, p in files.items() if p is not None and p.is_file()}


def build_stages(ctx: Context) -> list[Stage]:
    """Every stage of the study in dependency order."""
    exp, lx = ctx.exp, ctx.loaded
    data = data_fingerprint(ctx)
    stages: list[Stage] = []

    def add(stage_id: str, fn: Callable[..., dict[str, Any]], deps: list[str], params: dict[str, Any],
            resumable: bool = False, **kwargs: Any) -> None:
        stages.append(Stage(stage_id, partial(fn, ctx, **kwargs), tuple(deps), {"data": data, **settings_key(params)},
                            resumable))

    base = []
    if exp.data.cv and not exp.data.folds_file:
        add("folds", folds_stage, [], {"spec": exp.data.spec, "k": exp.data.folds, "seed": exp.seed})
        base = ["folds"]
    names = [g.name for g in exp.generators]
    for name in names:
        for fold in lx.folds:
            add(train_id(name, fold), train_stage, base, {"run": _hashed(lx.run_config(name, fold))}, resumable=True,
                name=name, fold=fold)
    real = []
    if exp.data.cv:
        # its training split follows cv_val; keyed only when not the default, so finished studies stay done
        cv_val = {} if exp.data.cv_val == "slice" else {"cv_val": exp.data.cv_val}
        # the folds stage, where there is one, keys the spec; a procedural spec has no file in `data` to key it
        spec = {"spec": exp.data.spec} if exp.data.folds_file and "spec" not in data else {}
        add("real", real_stage, base, {"fold": ctx.eval_fold, "image_size": exp.data.image_size, **cv_val, **spec})
        real = ["real"]
    ev = exp.evaluation
    sampling = {"seed": exp.seed, "batch": exp.sample_batch_size}
    metric = {k: v for k, v in asdict(ev).items() if k not in ("sampler", "num_samples")}
    for name in names:
        add(f"sample.{name}", sample_stage, [train_id(name, ctx.eval_fold)],
            {**sampling, "sampler": asdict(ev.sampler), "n": ev.num_samples}, name=name)
    add("evaluate", evaluate_stage, [f"sample.{n}" for n in names] + real, metric)
    if lx.cellular:
        geca = [train_id(lx.cellular, ctx.eval_fold)] + real
        if exp.ghg.enabled:
            twins = {h: stage for h, stage in ghg_trainings(ctx).items() if stage not in geca}
            for h, stage in twins.items():
                run_config = lx.run_config(lx.cellular, ctx.eval_fold)
                run_config.model.heredity = h
                add(stage, train_stage, base, {"run": _hashed(run_config)}, resumable=True, name=lx.cellular,
                    fold=ctx.eval_fold, heredity=h)
            add("ghg", ghg_stage, geca + list(twins.values()), {**sampling, **metric, "ghg": asdict(exp.ghg)})
        if exp.nca_steps.enabled:
            add("nca_steps", nca_steps_stage, geca, {**sampling, **metric, "nca_steps": asdict(exp.nca_steps)})
        if exp.growth.enabled:
            add("growth", growth_stage, geca[:1], {"seed": exp.seed, "growth": asdict(exp.growth)})
    else:
        ctx.log("no GeCA generator: skipping the GHG and M ablations and the growth GIF")
    if exp.sampler_cost.enabled:
        chosen = exp.sampler_cost.generators or names
        add("sampler_cost", sampler_cost_stage, [train_id(n, ctx.eval_fold) for n in chosen] + real,
            {**sampling, **metric, "sampler_cost": asdict(exp.sampler_cost)})
    if exp.classification.enabled:
        for name in names:
            for fold in lx.folds:
                add(expand_id(name, fold), expand_stage, [train_id(name, fold)],
                    {**sampling, "expansion": asdict(exp.expansion)}, name=name, fold=fold)
        add("classify", classify_stage, base + [expand_id(n, f) for n in names for f in lx.folds],
            {"classification": asdict(exp.classification), "folds": lx.folds})
    ids = [s.id for s in stages]
    add("report", report_stage, ids, {"config": lx.text}, stage_ids=ids)
    return stages
