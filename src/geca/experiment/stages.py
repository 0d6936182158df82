"""The study's stages, one function each, and the graph that ties them: folds → train → sample → evaluate,
the GeCA ablations (GHG, M, growth), the sampler cost, expansion → classification, and the report."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geca.data import ImageSet, load_split
from geca.data.folds import patient_folds, write_folds
from geca.data.medmnist_npz import find_npz
from geca.data.registry import parse_spec
from geca.experiment.config import GENERATED_FOLDS, Experiment, LoadedExperiment
from geca.experiment.graph import Stage, read_marker, stage_dir
from geca.metrics.evaluate import EvalSettings, run_evaluation
from geca.models.config import count_macs, count_parameters
from geca.sampling.generate import labels_csv, write_sample_dir
from geca.sampling.labels import replicate_labels
from geca.sampling.samplers import SamplerConfig
from geca.training.checkpoint import LoadedRun, file_sha256, load_run
from geca.utils.images import pil_image
from geca.utils.io import atomic_write_text


@dataclass
class Context:
    """What every stage shares: the experiment, its directory, the device, and caches of loaded runs and splits."""

    loaded: LoadedExperiment
    root: Path
    device: torch.device
    log: Callable[[str], None] = print
    progress: bool = False
    _runs: dict[str, LoadedRun] = field(default_factory=dict)
    _splits: dict[tuple[str, int | None], ImageSet] = field(default_factory=dict)

    @property
    def exp(self) -> Experiment:
        return self.loaded.exp

    @property
    def eval_fold(self) -> int | None:
        """Table 1 and the ablations use the first fold's generators (the fixed split without CV)."""
        return self.loaded.folds[0]

    @property
    def folds_file(self) -> str | None:
        f = self.loaded.folds_file
        return str(self.root / f) if f == GENERATED_FOLDS and not self.exp.data.folds_file else f

    def outputs(self, stage_id: str) -> dict[str, Any]:
        marker = read_marker(self.root, stage_id)
        if marker is None:
            raise FileNotFoundError(f"{stage_dir(self.root, stage_id)}: stage {stage_id} has no done-marker")
        return marker["outputs"]

    def run(self, stage_id: str) -> LoadedRun:
        if stage_id not in self._runs:
            self._runs[stage_id] = load_run(stage_dir(self.root, stage_id), device=self.device)
        return self._runs[stage_id]

    def split(self, split: str, fold: int | None) -> ImageSet:
        if (split, fold) not in self._splits:
            d = self.exp.data
            self._splits[split, fold] = load_split(d.spec, split, image_size=d.image_size, folds_file=self.folds_file,
                                                   fold=fold or 0)
        return self._splits[split, fold]

    def eval_labels(self, n: int | None) -> torch.Tensor:
        """The test split's label vectors (the real images generated sets are compared with), or `n` of them
        drawn by replicating that list and taking a seeded random subset: the label mix stays the test set's."""
        test = self.split("test", self.eval_fold).labels
        if n is None:
            return torch.from_numpy(np.asarray(test, dtype=np.float32))
        pool = replicate_labels(test, math.ceil(n / len(test)))
        return pool[np.random.default_rng(self.exp.seed).permutation(len(pool))[:n]]

    def real_spec(self, split: str) -> str:
        """`SPEC:SPLIT` for `run_evaluation`; under CV the real stage's copy of the evaluation fold's split."""
        if not self.exp.data.cv:
            return f"{self.exp.data.spec}:{split}"
        return f"{stage_dir(self.root, 'real') / split / 'labels.csv'}:all"


def train_id(name: str, fold: int | None) -> str:
    return f"train.{name}" if fold is None else f"train.{name}.f{fold}"


def expand_id(name: str, fold: int | None) -> str:
    return f"expand.{name}" if fold is None else f"expand.{name}.f{fold}"


def for_model(sc: SamplerConfig, run: LoadedRun) -> SamplerConfig:
    """Models without cell state have no heredity and no M: their GHG is always `none`."""
    return sc if run.model.has_cell_state else replace(sc, ghg="none", nca_steps=None)


# ── stages ────────────────────────────────────────────────────────────────────────────────────────────────────────


def folds_stage(ctx: Context, out: Path) -> dict[str, Any]:
    """Patient-level, label-stratified folds of the data's `all` split (by eye, or image, without patient ids)."""
    data = load_split(ctx.exp.data.spec, "all", image_size=ctx.exp.data.image_size)
    groups, by = ((data.patient_ids, "patient") if data.patient_ids is not None else
                  (data.eye_ids, "eye") if data.eye_ids is not None else (np.array(data.ids), "image"))
    fold_of = patient_folds(data.labels, np.asarray(groups), ctx.exp.data.folds, ctx.exp.seed)
    write_folds(out / "folds.csv", data.ids, [str(g) for g in groups], fold_of)
    return {"folds_file": "folds.csv", "k": ctx.exp.data.folds, "images": len(data), "grouped_by": by}


def train_stage(ctx: Context, out: Path, name: str, fold: int | None) -> dict[str, Any]:
    """Train (or resume) one generator; record its size, cost per call and training throughput."""
    from geca.training.trainer import train

    cfg = ctx.loaded.run_config(name, fold)
    cfg.data.folds_file = ctx.folds_file
    if cfg.data.vae and cfg.data.latent_cache is None:  # one latent cache per fold, shared by the generators
        cfg.data.latent_cache = str(ctx.root / "latents" / ("all" if fold is None else f"fold{fold}"))
    resume = (out / "checkpoints" / "latest.json").exists()
    if resume:
        ctx.log(f"   resuming {out} from its latest checkpoint")
    summary = train(cfg, out, resume=resume, progress=ctx.progress)
    run = load_run(out, device="cpu")
    s = run.spec
    rows = list(csv.DictReader(open(out / "log.csv"))) if (out / "log.csv").exists() else []
    return {"generator": name, "fold": fold, "model": cfg.model.name, "family": cfg.model.family,
            "steps": summary["step"], "parameters": count_parameters(run.model),
            "macs_per_call": count_macs(run.model, s.in_channels, s.num_classes, s.resolution),
            "input": [s.in_channels, s.resolution, s.resolution], "latent": s.latent is not None,
            "images_per_s": statistics.median(float(r["images_per_s"]) for r in rows) if rows else None,
            "train_minutes": float(rows[-1]["elapsed_min"]) if rows else None, "log": "log.csv",
            "loss_png": "loss.png"}


def real_stage(ctx: Context, out: Path) -> dict[str, Any]:
    """Under CV: the evaluation fold's test and training splits as folder + CSV sets that `run_evaluation` reads.

    A stop-gap: `EvalSettings` takes `SPEC:SPLIT` without a folds file, which cannot name a fold's split.
    """
    counts = {}
    for split in ("test", "train"):
        data = ctx.split(split, ctx.eval_fold)
        (out / split / "images").mkdir(parents=True)
        names = [f"images/{i:06d}.png" for i in range(len(data))]
        for name, img in zip(names, data.images, strict=True):
            pil_image(img).save(out / split / name)
        atomic_write_text(out / split / "labels.csv", labels_csv(names, data.labels, data.class_names))
        counts[split] = len(data)
    return {"fold": ctx.eval_fold, "images": counts}


def sample_stage(ctx: Context, out: Path, name: str) -> dict[str, Any]:
    """Table 1's generated set: one image per test label vector (or `evaluation.num_samples`)."""
    ev = ctx.exp.evaluation
    run = ctx.run(train_id(name, ctx.eval_fold))
    manifest, _ = write_sample_dir(out, run, ctx.eval_labels(ev.num_samples), for_model(ev.sampler, run),
                                   ctx.exp.seed, ctx.exp.sample_batch_size, ctx.device,
                                   {"labels": "test split", "fold": ctx.eval_fold}, overwrite=True,
                                   progress=ctx.progress)
    return {"generator": name, "images": manifest["num_images"], "seconds": manifest["seconds"],
            "sampling": manifest["sampling"]}


def _evaluate(ctx: Context, sets: list[tuple[str, Path]], out: Path) -> dict[str, Any]:
    ev = ctx.exp.evaluation
    settings = EvalSettings(generated=sets, real=ctx.real_spec("test"), train=ctx.real_spec("train"),
                            features=ev.features, features_file=ev.features_file, protocol=ev.protocol,
                            seed=ctx.exp.seed, lpips=ev.lpips, lpips_weights=ev.lpips_weights,
                            batch_size=ev.batch_size, device=str(ctx.device), per_class_min=ev.per_class_min,
                            progress=ctx.progress)
    return run_evaluation(settings, out / "metrics.json", log=ctx.log)


def evaluate_stage(ctx: Context, out: Path) -> dict[str, Any]:
    """Table 1: KID, LPIPS, FLD and GG of every generator's sample set."""
    sets = [(g.name, stage_dir(ctx.root, f"sample.{g.name}")) for g in ctx.exp.generators]
    report = _evaluate(ctx, sets, out)
    return {"metrics": "metrics.json", "grids": {r["name"]: r["grid"] for r in report["results"]}}


def _sweep(ctx: Context, out: Path, variants: list[tuple[str, str, SamplerConfig]], n: int | None) -> dict[str, Any]:
    """Sample one set per (set name, generator, sampler settings) with the same labels and seed, then score them."""
    labels = ctx.eval_labels(n)
    sets, rows = [], []
    for set_name, generator, sc in variants:
        run = ctx.run(train_id(generator, ctx.eval_fold))
        path = out / "samples" / set_name
        manifest, _ = write_sample_dir(path, run, labels, for_model(sc, run), ctx.exp.seed,
                                       ctx.exp.sample_batch_size, ctx.device, progress=ctx.progress)
        sets.append((set_name, path))
        rows.append({"name": set_name, "generator": generator, "sampling": manifest["sampling"],
                     "images": manifest["num_images"], "seconds": manifest["seconds"]})
    _evaluate(ctx, sets, out)
    return {"metrics": "metrics.json", "sets": rows}


def ghg_stage(ctx: Context, out: Path) -> dict[str, Any]:
    """Fig. 5: the GeCA generator under each GHG mode."""
    g = ctx.exp.ghg
    return _sweep(ctx, out, [(f"ghg-{m}", ctx.loaded.cellular, replace(g.sampler, ghg=m)) for m in g.modes],
                  g.num_samples)


def nca_steps_stage(ctx: Context, out: Path) -> dict[str, Any]:
    """Fig. 6: the GeCA generator with M NCA steps per call (trained with its own M)."""
    m = ctx.exp.nca_steps
    return _sweep(ctx, out, [(f"M{v}", ctx.loaded.cellular, replace(m.sampler, nca_steps=v)) for v in m.values],
                  m.num_samples)


def sampler_cost_stage(ctx: Context, out: Path) -> dict[str, Any]:
    """KID against denoiser calls: every chosen generator under every sampler setting."""
    c = ctx.exp.sampler_cost
    names = c.generators or [g.name for g in ctx.exp.generators]
    return _sweep(ctx, out, [(f"{g}-{s.sampler}{s.steps}", g, s) for g in names for s in c.samplers], c.num_samples)


def growth_stage(ctx: Context, out: Path) -> dict[str, Any]:
    """One GeCA organism: its M updates at noise level t, and its denoising trajectory (GIFs and strips)."""
    from geca.cli.sample import resolve_class
    from geca.sampling.generate import decoder
    from geca.sampling.growth import grow, write_growth

    g = ctx.exp.growth
    run = ctx.run(train_id(ctx.loaded.cellular, ctx.eval_fold))
    s = run.spec
    cls = resolve_class(g.label, s.class_names)
    y = torch.zeros(1, s.num_classes, device=ctx.device)
    y[0, cls] = 1
    torch.manual_seed(ctx.exp.seed)
    growth = grow(run.model, run.diffusion, y, (s.in_channels, s.resolution, s.resolution), s.sampling(g.sampler),
                  g.t, g.frames, decoder(run, ctx.device))
    paths = write_growth(growth, out)
    return {"label": s.class_names[cls], "t": growth.nca_t, **{k: p.name for k, p in paths.items()}}


def expand_stage(ctx: Context, out: Path, name: str, fold: int | None) -> dict[str, Any]:
    """Eq. 8: every training label vector `ratio` times, sampled from the generator trained on that training set."""
    e = ctx.exp.expansion
    run = ctx.run(train_id(name, fold))
    train = ctx.split("train", fold)
    manifest, _ = write_sample_dir(out, run, replicate_labels(train.labels, e.ratio), for_model(e.sampler, run),
                                   ctx.exp.seed, ctx.exp.sample_batch_size, ctx.device,
                                   {"expansion": {"fold": fold, "ratio": e.ratio, "train_images": len(train)}},
                                   overwrite=True, progress=ctx.progress)
    return {"generator": name, "fold": fold, "images": manifest["num_images"], "seconds": manifest["seconds"]}


def classify_stage(ctx: Context, out: Path) -> dict[str, Any]:
    """Table 2: arms none, geometric and +GENERATOR on each (fold, seed) unit, with paired p-values."""
    from geca.downstream.classifier import ClassifierConfig
    from geca.downstream.protocol import ProtocolConfig, Splits, parse_arms, run_protocol
    from geca.downstream.report import summarise, write_report

    c, d = ctx.exp.classification, ctx.exp.data
    fold = None if not d.cv else "{fold}"
    synthetic = {g.name: str(stage_dir(ctx.root, expand_id(g.name, fold))) for g in ctx.exp.generators}
    arms = parse_arms(None, synthetic)
    clf = ClassifierConfig(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, stem=c.stem,
                           imagenet_weights=Path(c.imagenet_weights) if c.imagenet_weights else None,
                           equal_steps=c.equal_steps, device=str(ctx.device), progress=ctx.progress)
    folds_file = Path(ctx.folds_file) if ctx.folds_file else None
    image_size = c.image_size or d.image_size
    cfg = ProtocolConfig(data=d.spec, arms=arms, synthetic=synthetic, classifier=clf, seeds=c.seeds,
                         image_size=image_size, folds_file=folds_file, folds=d.run_folds if d.cv else None)
    result = run_protocol(cfg, Splits(d.spec, image_size, folds_file, cfg.folds))
    config = {"data": d.spec, "synthetic": synthetic, "arms": [a.name for a in arms], **asdict(c),
              "folds_file": ctx.folds_file, "folds": cfg.folds, "device": str(ctx.device)}
    summary = summarise(result, [a.name for a in arms], c.seeds, c.eye_agg, c.test, c.p_metric, c.bootstrap, config)
    write_report(out, summary, result)
    return {"results": "results.json", "table": "table.md", "protocol": summary["protocol"], "test": summary["test"]}


def report_stage(ctx: Context, out: Path, stage_ids: list[str]) -> dict[str, Any]:
    """report.md and report.html from the outputs of `stage_ids` (every other stage of the study)."""
    from geca.experiment.report import write_report

    return write_report(ctx, out, stage_ids)


# ── the graph ─────────────────────────────────────────────────────────────────────────────────────────────────────


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
        stages.append(Stage(stage_id, partial(fn, ctx, **kwargs), tuple(deps), {"data": data, **params}, resumable))

    base = []
    if exp.data.cv and not exp.data.folds_file:
        add("folds", folds_stage, [], {"spec": exp.data.spec, "k": exp.data.folds, "seed": exp.seed})
        base = ["folds"]
    names = [g.name for g in exp.generators]
    for name in names:
        for fold in lx.folds:
            add(train_id(name, fold), train_stage, base, {"run": asdict(lx.run_config(name, fold))}, resumable=True,
                name=name, fold=fold)
    real = []
    if exp.data.cv:
        add("real", real_stage, base, {"fold": ctx.eval_fold, "image_size": exp.data.image_size})
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
            add("ghg", ghg_stage, geca, {**sampling, **metric, "ghg": asdict(exp.ghg)})
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
