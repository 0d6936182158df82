"""`geca expand` (a synthetic copy of the training labels, Eq. 8) and `geca classify` (the paper's Table 2)."""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from geca.cli.common import guarded, pick_device
from geca.cli.sample import run_split, sampler_config, shared_option
from geca.config import ConfigError


def _same_file(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


@guarded
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
    fold: int | None = typer.Option(None, "--fold", help="Test fold whose training split to replicate (default: "
                                    "the run's)."),
    sampler: str = shared_option("sampler"),
    steps: int = shared_option("steps"),
    cfg: float = shared_option("cfg"),
    ghg: str | None = shared_option("ghg"),
    m: int | None = shared_option("m"),
    seed: int = shared_option("seed"),
    batch_size: int = shared_option("batch_size"),
    checkpoint: str | None = shared_option("checkpoint"),
    weights: str = shared_option("weights"),
    device: str = shared_option("device"),
    overwrite: bool = shared_option("overwrite"),
    progress: bool = shared_option("progress"),
) -> None:
    """Expand a training set with synthetic images whose labels replicate its label vectors `ratio` times."""
    from geca.sampling.generate import write_sample_dir
    from geca.sampling.labels import replicate_labels
    from geca.training.checkpoint import load_run

    if ratio < 1:
        raise ConfigError(f"--ratio must be ≥ 1, got {ratio}")
    dev = pick_device(device)
    loaded = load_run(run, checkpoint, weights, dev)
    sc = sampler_config(loaded, sampler, steps, cfg, ghg, m)
    own = loaded.spec.data
    spec = data or own.spec
    folds = folds_file if folds_file is not None or data is not None else own.folds_file
    if folds is None and fold is not None:
        raise ConfigError("--fold needs a folds file (--folds-file, or a run trained with one)")
    k = fold if fold is not None else (own.fold if data is None else 0)
    # A generator trained on another fold's training split has seen this fold's test patients.
    if spec == own.spec and _same_file(folds, own.folds_file) and k != own.fold:
        raise ConfigError(f"the run was trained on fold {own.fold} of {own.folds_file}; its images would leak "
                          f"fold {k}'s test patients into fold {k}'s training set. Use the run trained on fold {k}")
    train = run_split(loaded, spec, "train", folds, k)
    labels = replicate_labels(train.labels, ratio)
    extra = {"labels": f"{spec}:train x{ratio}",
             "expansion": {"data": spec, "folds_file": folds, "fold": k if folds else None, "ratio": ratio,
                           "train_images": len(train)}}
    manifest, _ = write_sample_dir(out, loaded, labels, sc, seed, batch_size, dev, extra, overwrite, progress)
    typer.echo(f"wrote {manifest['num_images']} images ({ratio} per training image of {spec}) to {out} "
               f"in {manifest['seconds']} s")


@guarded
def classify(
    data: str = typer.Option(..., "--data", help="Dataset: an .npz/.csv path, a MedMNIST name (retinamnist), or "
                             "synthetic-fundus / synthetic-oct (options after @, e.g. synthetic-oct@patients=80)."),
    out: Path = typer.Option(..., "--out", help="Report directory: table.md, table.csv, units.csv, results.json, "
                             "roc_<arm>.png."),
    synthetic: list[str] | None = typer.Option(None, "--synthetic", help="NAME=DIR: a `geca sample`/`geca expand` "
                                               "directory used by arm +NAME (repeatable). Under CV, DIR holds "
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
                                           "CV with test = fold k, val = fold k+1, train = the rest."),
    folds: int | None = typer.Option(None, "--folds", help="With --folds-file: run folds 0..K-1 (default: all)."),
    eye_agg: str = typer.Option("max", "--eye-agg", help="Eye-level score of an eye's scans: max or mean "
                                "(labels are OR-ed); used when the data has eye ids."),
    test: str = typer.Option("auto", "--test", help="Significance test vs geometric: ttest, wilcoxon (paired over "
                             "folds × seeds), bootstrap (paired over test cases), or auto (bootstrap with fewer "
                             "than 5 units, else ttest)."),
    p_metric: str = typer.Option("map", "--p-metric", help="Metric of the table's p column: sen, spe, auc, f1, "
                                 "f1_sen_spe, map or acc."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap replicates (p ≥ ~2/(N+1))."),
    equal_steps: bool = typer.Option(True, "--equal-steps/--full-epochs", help="Give every arm the optimizer "
                                     "steps of the real set alone (default), or let epochs cover real + synthetic."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's choice; "
                                       "1 can be several times faster on a CPU shared with other jobs)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out once the report is done."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Train ResNet-34 classifiers per arm and seed (and fold) and write a Table-2-style report."""
    from geca.downstream.classifier import ClassifierConfig
    from geca.downstream.metrics import AGGREGATIONS, MACRO
    from geca.downstream.protocol import ProtocolConfig, Splits, parse_arms, parse_synthetic, run_protocol
    from geca.downstream.report import summarise, write_report
    from geca.downstream.significance import TESTS

    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
    if eye_agg not in AGGREGATIONS:
        raise ConfigError(f"--eye-agg must be one of {', '.join(AGGREGATIONS)}, got {eye_agg!r}")
    if test not in TESTS:
        raise ConfigError(f"--test must be one of {', '.join(TESTS)}, got {test!r}")
    if p_metric not in MACRO:
        raise ConfigError(f"--p-metric must be one of {', '.join(MACRO)}, got {p_metric!r}")
    if bootstrap < 100:
        raise ConfigError(f"--bootstrap needs at least 100 replicates, got {bootstrap}")
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be ≥ 1, got {threads}")
        torch.set_num_threads(threads)
    syn = parse_synthetic(synthetic or [])
    arm_list = parse_arms(arms, syn)
    dev = pick_device(device)
    clf = ClassifierConfig(epochs=epochs, batch_size=batch_size, lr=lr, stem=stem, imagenet_weights=imagenet_weights,
                           equal_steps=equal_steps, device=str(dev), progress=progress)
    cfg = ProtocolConfig(data=data, arms=arm_list, synthetic=syn, classifier=clf, seeds=seeds, image_size=image_size,
                         folds_file=folds_file, folds=folds)
    splits = Splits(data, image_size, folds_file, folds)
    if p_metric == "acc" and splits.reference.multilabel:
        raise ConfigError("--p-metric acc is for multi-class data; this data is multi-label")
    result = run_protocol(cfg, splits)
    config = {"data": data, "synthetic": syn, "arms": [a.name for a in arm_list], "seeds": seeds, "epochs": epochs,
              "batch_size": batch_size, "lr": lr, "image_size": image_size, "stem": stem,
              "imagenet_weights": None if imagenet_weights is None else str(imagenet_weights),
              "folds_file": None if folds_file is None else str(folds_file), "folds": folds, "eye_agg": eye_agg,
              "equal_steps": equal_steps, "device": str(dev), "threads": torch.get_num_threads(),
              "bootstrap": bootstrap}
    summary = summarise(result, [a.name for a in arm_list], seeds, eye_agg, test, p_metric, bootstrap, config)
    write_report(out, summary, result)
    typer.echo((out / "table.md").read_text())
    typer.echo(f"report written to {out}")
