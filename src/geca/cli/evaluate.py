"""`geca evaluate` and `geca features train`."""

from __future__ import annotations

import warnings
from pathlib import Path

import typer

from geca.cli.common import BARS_HELP, CV_VAL_HELP, guarded, pick_device, show_progress, split_flags
from geca.utils.schema import MAX_BATCH, MAX_IMAGE_SIZE

features_app = typer.Typer(help="Feature networks for the evaluation metrics.", no_args_is_help=True,
                           add_completion=False, pretty_exceptions_enable=False)


@guarded
def evaluate(
    generated: list[str] = typer.Option(..., "--generated", help="A `geca sample` directory, or NAME=DIR to name "
                                        "its table row; repeat it, or list more directories after it."),
    more: list[str] | None = typer.Argument(None, metavar="[DIR]...", help="More generated directories "
                                            "(so that `--generated A B` works)."),
    real: str = typer.Option(..., "--real", help="Real images to compare with, SPEC:SPLIT (e.g. retinamnist:test); "
                             "split at the last colon."),
    train: str = typer.Option(..., "--train", help="The generator's training split, SPEC:train (for FLD/GG, and "
                              "to train domain features)."),
    features: str = typer.Option("domain", "--features", help="Feature network: domain (offline default), "
                                 "inception (FID Inception-v3), dinov2 (ViT-B/14, the paper's FLD features) or "
                                 "random (tests only)."),
    features_file: str | None = typer.Option(None, "--features-file", help="Weights of the feature network: "
                                             "domain: a `geca features train` file (default: train one on --train "
                                             "and cache it under $GECA_CACHE_DIR or ~/.cache/geca/features); "
                                             "inception: weights-inception-2015-12-05-6726825d.pth; dinov2: "
                                             "dinov2_vitb14_pretrain.pth or timm's model.safetensors (default "
                                             "for both: that file in $GECA_WEIGHTS_DIR)."),
    gg_features: str | None = typer.Option(None, "--gg-features", help="Feature network of GG and FLD: dinov2 (the "
                                           "paper's; default under --protocol paper), inception, domain or random "
                                           "(default under standard: the KID network)."),
    gg_features_file: str | None = typer.Option(None, "--gg-features-file", help="Weights of the GG/FLD network "
                                                "(as --features-file; default: the KID network's file when the "
                                                "networks are the same, else its file in $GECA_WEIGHTS_DIR)."),
    protocol: str = typer.Option("paper", "--protocol", help="paper: KID subsets of n_generated//4, LPIPS over "
                                 "the n−1 consecutive pairs of a shuffle (GeCA's Table 1); standard: KID subsets "
                                 "of min(1000, n_real, n_generated), LPIPS over 2,000 random distinct pairs."),
    out: Path = typer.Option(..., "--out", help="Metrics JSON to write; grids PNGs are written beside it."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of every random choice (subsets, pairs, FLD splits)."),
    lpips: bool = typer.Option(True, "--lpips/--no-lpips", help="Compute LPIPS diversity (needs AlexNet weights)."),
    lpips_weights: str | None = typer.Option(None, "--lpips-weights", help="torchvision AlexNet weights "
                                             "alexnet-owt-7be5be79.pth (default: in $GECA_WEIGHTS_DIR); 'random' "
                                             "for a seeded random backbone (tests only)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, max=MAX_BATCH, help="Images per feature-network batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    progress: bool | None = typer.Option(None, "--progress/--no-progress", help=BARS_HELP),
    folds_file: str | None = typer.Option(None, "--folds-file", help="Folds CSV (`geca folds`) that defines the "
                                          "splits of --real and --train for folder+CSV data."),
    fold: int | None = typer.Option(None, "--fold", min=0, help="With --folds-file: the test fold (default 0)."),
    cv_val: str | None = typer.Option(None, "--cv-val", help=CV_VAL_HELP + " Default: slice."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out report (and remove the "
                                   "grids it listed that the new one does not)."),
    multilabel: bool | None = typer.Option(None, "--multilabel/--multiclass", help="Whether the real data is "
                                           "multi-label (default: as the dataset says: every row of a CSV, a geca "
                                           "manifest.json beside it, an npz's labels). For copies of a split that "
                                           "cannot show it: one of multi-label data whose rows happen to be one-hot, "
                                           "such as a study's copies of a fold. --multiclass refuses rows without "
                                           "exactly one label."),
) -> None:
    """Score generated sets against real data: KID, LPIPS diversity, FLD and the generalization gap (GG)."""
    from rich.console import Console

    from geca.metrics.evaluate import EvalSettings, parse_generated, run_evaluation
    from geca.metrics.report import comparison_table, per_class_table

    fold, cv_val = split_flags(folds_file, fold, cv_val)
    settings = EvalSettings(
        generated=[parse_generated(a) for a in [*generated, *(more or [])]], real=real, train=train,
        features=features, features_file=features_file, protocol=protocol, seed=seed, lpips=lpips,
        gg_features=gg_features, gg_features_file=gg_features_file, lpips_weights=lpips_weights,
        batch_size=batch_size, device=str(pick_device(device)), progress=show_progress(progress),
        folds_file=folds_file, fold=fold, cv_val=cv_val, multilabel=multilabel)
    settings.validate()
    report = run_evaluation(settings, out, log=typer.echo, overwrite=overwrite)
    console = Console()
    console.print(comparison_table(report))
    table = per_class_table(report)
    if table is not None:
        console.print(table)
    typer.echo(f"wrote {out} and {len(report['results'])} grid(s) beside it in {report['seconds']} s")


@features_app.command("train")
@guarded
def features_train(
    data: str = typer.Option(..., "--data", help="Dataset spec (an .npz/.csv path, a MedMNIST name or "
                             "synthetic-fundus / synthetic-oct[@key=value,...])."),
    out: Path = typer.Option(..., "--out", help="Weights file to write (.safetensors)."),
    split: str = typer.Option("train", "--split", help="Split to train on (never the test split you evaluate on)."),
    image_size: int | None = typer.Option(None, "--image-size", min=2, max=MAX_IMAGE_SIZE, help="Resize images to "
                                          "this size (use the size of the generated images)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed for initialisation and batch order."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Training epochs (default: the domain network's "
                                      "own, 10)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    folds_file: str | None = typer.Option(None, "--folds-file", help="Folds CSV (`geca folds`) that defines the "
                                          "splits of folder+CSV data."),
    fold: int | None = typer.Option(None, "--fold", min=0, help="With --folds-file: the test fold (default 0); "
                                    "train on the split of the fold whose test set you evaluate on."),
    cv_val: str | None = typer.Option(None, "--cv-val", help=CV_VAL_HELP + " Default: slice."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
) -> None:
    """Train the `domain` feature network: a small classifier whose penultimate layer gives the features."""
    from geca.data.registry import SPLITS, load_split
    from geca.errors import ConfigError, DataError
    from geca.metrics.domain import TRAINING, is_domain_file, save_domain_net, train_domain_net
    from geca.utils.io import output_file

    fold, cv_val = split_flags(folds_file, fold, cv_val)
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    output_file(out, "--out", ".safetensors", overwrite, own=("a `geca features train` file", is_domain_file))
    splits = dict(image_size=image_size, folds_file=folds_file, fold=fold, cv_val=cv_val)
    train_set = load_split(data, split, **splits)
    if split in ("test", "all"):  # once the split is known to exist
        warnings.warn(f"--split {split}: features trained on held-out images make KID, FLD/GG and "
                      "class-faithfulness against them optimistic; `geca evaluate` warns when its --real images "
                      "are among them. Train on the generator's training split", stacklevel=2)
    try:
        val = load_split(data, "val", **splits) if split != "val" else None
    except DataError:
        val = None  # sources without a val split are fine; the accuracy check is only a sanity line
    net = train_domain_net(train_set, seed=seed, epochs=TRAINING["epochs"] if epochs is None else epochs, val=val,
                           source=f"{data}:{split}",
                           device=pick_device(device))
    save_domain_net(net, out)
    acc = "" if net.meta.val_accuracy is None else f"; val accuracy {net.meta.val_accuracy:.3f}"
    where = f"{data}:{split}" + (f" of fold {fold} of {folds_file} (--cv-val {cv_val})" if folds_file else "")
    typer.echo(f"trained domain features on {where} ({len(train_set)} images{acc}); wrote {out}")
