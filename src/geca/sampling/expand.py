"""Dataset expansion (Eq. 8): a synthetic copy of a training split in which every label vector appears `ratio` times."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from geca.data.folds import same_split, split_name, stable_folds
from geca.data.registry import is_path, parse_spec, same_data
from geca.errors import ConfigError
from geca.run import LoadedRun, run_folds, run_split
from geca.sampling.config import SamplerConfig
from geca.sampling.generate import write_sample_dir
from geca.sampling.labels import replicate_labels
from geca.utils.io import same_path, unfindable


def _check_comparable(recorded: str | None, given: str | None, what: str) -> None:
    """A run records paths as they were typed; from another folder a relative one is not found, and another spelling
    of the same file could not be told from another file: refused rather than guessed either way."""
    if not unfindable(recorded, given):
        return
    raise ConfigError(f"the run's {what} {recorded!r} (as given when it was trained) is not found from {Path.cwd()}, "
                      f"so whether {given!r} holds images it trained on cannot be checked; run geca expand from the "
                      "folder the run was trained in")


def expand(run: LoadedRun, out: Path, ratio: int, sampler: SamplerConfig, seed: int, batch_size: int,
           device: torch.device | str, data_spec: str | None = None, folds_file: str | None = None,
           fold: int | None = None, overwrite: bool = False, progress: bool = True, limit: int | None = None,
           resume: bool = False) -> dict[str, Any]:
    """Sample `ratio` images per training image into `out` (the `geca sample` format); returns the manifest.
    `limit` keeps the first N images of that list; `resume` continues an interrupted run.

    The training split is the run's own (its data, folds file and fold) unless `data_spec`, `folds_file` or `fold`
    name another, which must have the run's classes; a fold whose test patients the run trained on is refused.
    """
    if ratio < 1:
        raise ConfigError(f"--ratio must be ≥ 1, got {ratio}")
    own, recorded = run.spec.data, run.spec.folds_sha256
    spec = data_spec or own.spec
    folds = folds_file if folds_file is not None or data_spec is not None else own.folds_file
    if folds is not None and own.folds_file is not None and same_path(folds, own.folds_file):
        run_folds(run.spec)  # the run's own file, which must still hold the folds it trained on
    if folds is None and fold is not None:
        raise ConfigError("--fold needs a folds file (--folds-file, or a run trained with one)")
    if folds is None and parse_spec(spec)[0].lower().endswith(".csv"):  # else called a leak of the fixed split
        raise ConfigError(f"--data {spec}: a folder + CSV set has no fixed split; its training split comes from a "
                          "folds file: pass --folds-file (and --fold)")
    k = fold if fold is not None else (own.fold if data_spec is None else 0)
    if run.spec.data_key is None and is_path(parse_spec(own.spec)[0]):  # a name is found from anywhere
        _check_comparable(own.spec, spec, "data")
    if recorded is None:  # a run from before geca recorded its folds' SHA-256 has only a path to compare
        _check_comparable(own.folds_file, folds, "folds file")
    with stable_folds(folds) as digest:
        # On the same data, any other split (another fold; the fixed split for a run trained on a fold, or the other
        # way round) holds test images the generator trained on.
        other_split = not same_split(folds, k if folds else None, own.folds_file, own.fold, recorded)
        if other_split and same_data(spec, own.spec, run.spec.data_key):
            mine, theirs = split_name(own.folds_file, own.fold), split_name(folds, k)
            raise ConfigError(f"the run was trained on {mine}; its images would leak the test images of {theirs} "
                              f"into its training set. Use a run trained on {theirs}")
        train = run_split(run, spec, "train", folds, k)
    labels = replicate_labels(train.labels, ratio)
    extra = {"labels": f"{spec}:train x{ratio}",
             "expansion": {"data": spec, "folds_file": folds and str(Path(folds).expanduser().resolve()),
                           "folds_sha256": digest, "fold": k if folds else None,
                           "cv_val": own.cv_val if folds else None, "ratio": ratio,
                           "train_images": len(train), "limit": limit, "complete": limit is None or
                           limit >= len(labels)}}
    manifest, _ = write_sample_dir(out, run, labels[:limit], sampler, seed, batch_size, device, extra, overwrite,
                                   progress, resume)
    return manifest
