"""`geca expand` (a synthetic copy of the training labels, Eq. 8) and `geca classify` (the paper's Table 2)."""

from __future__ import annotations

from pathlib import Path

import typer

from geca.cli.common import (
    BARS_HELP,
    CV_VAL_HELP,
    RESUME_BATCHES,
    guarded,
    on_interrupt,
    pick_device,
    set_threads,
    show_progress,
)
from geca.cli.options import SamplingFlags, sampling_flags
from geca.errors import ConfigError


@guarded
@sampling_flags()
def expand(
    run: Path = typer.Option(..., "--run", help="Run directory written by `geca train` (the generator)."),
    out: Path = typer.Option(..., "--out", help="Output directory (images/, labels.csv, manifest.json), "
                             "the `geca sample` format that `geca classify --synthetic` reads."),
    ratio: int = typer.Option(5, "--ratio", help="Synthetic images per training image: every training label "
                              "vector appears exactly this many times (Eq. 8)."),
    data: str | None = typer.Option(None, "--data", help="Dataset whose training labels to replicate (default: "
                                    "the run's own, with its folds file and fold); must have the run's classes."),
    folds_file: str | None = typer.Option(None, "--folds-file", help="Folds CSV from `geca folds` (default: the "
                                          "run's when --data is not given)."),
    fold: int | None = typer.Option(None, "--fold", min=0, help="Test fold whose training split to replicate (default: "
                                    "the run's)."),
    limit: int | None = typer.Option(None, "--limit", help="Sample only the first N images of the expansion (a "
                                     "quick look, or a budget; --resume with the same N continues an interrupted "
                                     "one; the whole expansion is sampled afresh, and classify takes only a whole "
                                     "one)."),
    *,
    flags: SamplingFlags,
) -> None:
    """Expand a training set with synthetic images whose labels replicate its label vectors `ratio` times."""
    from geca.run import load_run
    from geca.sampling.expand import expand as expand_set
    from geca.sampling.generate import run_sampler

    if ratio < 1:
        raise ConfigError(f"--ratio must be ≥ 1, got {ratio}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be ≥ 1, got {limit}")
    device = pick_device(flags.device)
    loaded = load_run(run, flags.checkpoint, flags.weights, device, flags.vae)
    sampler = run_sampler(loaded, flags.sampling, strict=True)
    with on_interrupt(lambda: RESUME_BATCHES):
        manifest = expand_set(loaded, out, ratio, sampler, flags.seed, flags.batch_size, device, data, folds_file,
                              fold, flags.overwrite, flags.progress, limit=limit, resume=flags.resume)
    typer.echo(f"wrote {manifest['num_images']} images ({ratio} per training image of "
               f"{manifest['expansion']['data']}) to {out} in {manifest['seconds']} s")


@guarded
def classify(
    data: str = typer.Option(..., "--data", help="Dataset: an .npz/.csv path, a MedMNIST name (retinamnist), or "
                             "synthetic-fundus / synthetic-oct (options after @, e.g. synthetic-oct@patients=80)."),
    out: Path = typer.Option(..., "--out", help="Report directory: table.md, table.csv, units.csv, results.json, "
                             "roc_<arm>.png."),
    synthetic: list[str] | None = typer.Option(None, "--synthetic", help="NAME=DIR: a `geca sample`/`geca expand` "
                                               "directory used by arm +NAME (repeat the flag for several: "
                                               "--synthetic a=X --synthetic b=Y). Under CV, DIR holds "
                                               "{fold}, replaced by the fold index."),
    arms: str | None = typer.Option(None, "--arms", help="Comma-separated arms: none (no augmentation), geometric "
                                    "(horizontal flip + small affine: the baseline), +NAME (geometric on real + "
                                    "synthetic NAME). Default: none, geometric and every +NAME."),
    seeds: int = typer.Option(3, "--seeds", help="Training seeds per arm (and per fold)."),
    epochs: int = typer.Option(8, "--epochs", help="Training epochs; the epoch with the best validation AUC "
                               "is tested."),
    batch_size: int = typer.Option(128, "--batch-size", help="Training batch size."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate (divided by 10 at 50 % and 75 % of the epochs)."),
    image_size: int | None = typer.Option(None, "--image-size", help="Resize every image (real and synthetic) to "
                                          "this size (default: the data's own)."),
    stem: str = typer.Option("imagenet", "--stem", help="ResNet-34 stem: imagenet (7×7/2 conv + max-pool, "
                             "torchvision's) or cifar (3×3/1 conv, no pool: MedMNIST's 28-px ResNets; ~13× the "
                             "compute)."),
    imagenet_weights: Path | None = typer.Option(None, "--imagenet-weights", help="Local torchvision ResNet-34 "
                                                 "ImageNet weights (resnet34-b627a593.pth) to start from."),
    folds_file: Path | None = typer.Option(None, "--folds-file", help="Folds CSV from `geca folds`: patient-level "
                                           "CV with test = fold k (validation: --cv-val)."),
    folds: int | None = typer.Option(None, "--folds", min=1, help="With --folds-file: run folds 0..K-1 (default: "
                                     "all)."),
    cv_val: str = typer.Option("slice", "--cv-val", help=CV_VAL_HELP),
    eye_agg: str = typer.Option("max", "--eye-agg", help="Eye-level score of an eye's scans: max or mean "
                                "(labels are OR-ed); used when the data has eye ids."),
    test: str = typer.Option("auto", "--test", help="The test the stars come from: bootstrap (paired over test "
                             "cases, seeds' scores averaged per case; auto), or ttest / wilcoxon (paired over folds, "
                             "seeds averaged per fold; needs --folds-file). Both are reported under CV."),
    p_metric: str = typer.Option("map", "--p-metric", help="Metric of the table's p column: sen, spe, auc, f1, "
                                 "f1_sen_spe, map or acc."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap replicates, at least 100 (p from Δ / sd of the "
                                  "replicates, as pROC's bootstrap test)."),
    equal_steps: bool = typer.Option(True, "--equal-steps/--full-epochs", help="Give every arm the optimizer "
                                     "steps of the real set alone (default), or let epochs cover real + synthetic."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's choice; "
                                       "1 can be several times faster on a CPU shared with other jobs)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier report in --out once the new one "
                                   "is done (a folder holding other files is refused)."),
    progress: bool | None = typer.Option(None, "--progress/--no-progress", help=BARS_HELP),
) -> None:
    """Train ResNet-34 classifiers per arm and seed (and fold) and write a Table-2-style report."""

    from geca.downstream.classify import TableSettings
    from geca.downstream.classify import classify as run_classification
    from geca.downstream.protocol import parse_synthetic
    from geca.downstream.report import check_report_out
    from geca.utils.io import output_dir

    check_report_out(output_dir(out), overwrite)
    settings = TableSettings(seeds, epochs, batch_size, lr, image_size, stem,
                             None if imagenet_weights is None else str(imagenet_weights), equal_steps, eye_agg, test,
                             p_metric, bootstrap)
    settings.validate()
    set_threads(threads)
    run_classification(data, parse_synthetic(synthetic or []), arms, settings, out, folds_file, folds, cv_val,
                       str(pick_device(device)), show_progress(progress))
    typer.echo((out / "table.md").read_text())
    typer.echo(f"report written to {out}")
