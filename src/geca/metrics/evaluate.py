"""Score generated sample directories against real data: KID (overall, per class), LPIPS diversity, FLD, GG and
class-faithfulness."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import geca
from geca.data.folder_csv import load_folder_csv, read_manifest
from geca.data.folds import same_split, split_name
from geca.data.imageset import ImageSet, image_hashes
from geca.data.registry import SPLITS, load_split, same_data
from geca.errors import ConfigError, DataError
from geca.metrics.diversity import ALEXNET_FILE, ALEXNET_SHA256, alexnet_weights, load_lpips, lpips_diversity
from geca.metrics.faithfulness import faithfulness, judge, predict
from geca.metrics.features import (
    FEATURES,
    INCEPTION_FILE,
    INCEPTION_SHA256,
    DomainFeatures,
    FeatureExtractor,
    build_extractor,
    weights_path,
)
from geca.metrics.fld import fld
from geca.metrics.kid import (
    NOISY_SUBSET,
    PROTOCOLS,
    check_protocol,
    kid,
    kid_standard_error,
    kid_subset_size,
    min_generated,
)
from geca.metrics.report import real_vs_generated_grid
from geca.utils.io import atomic_write_json, clean_stale_temporaries, output_file, read_json_object
from geca.utils.pretrained import check_published
from geca.utils.schema import MAX_BATCH

PER_CLASS_MIN = 50


def parse_split(arg: str, flag: str) -> tuple[str, str]:
    """`SPEC:SPLIT`, split at the last colon (a spec may itself contain colons)."""
    spec, colon, split = arg.rpartition(":")
    if not colon or not spec or not split:
        raise DataError(f"{flag} {arg!r}: expected SPEC:SPLIT, e.g. retinamnist:test")
    if split not in SPLITS:
        raise DataError(f"{flag} {arg!r}: unknown split {split!r}; valid: {', '.join(SPLITS)}")
    return spec, split


def parse_generated(arg: str) -> tuple[str, Path]:
    """`DIR` (named after the directory) or `NAME=DIR`."""
    name, eq, path = arg.partition("=")
    if eq and name and "/" not in name and not Path(arg).exists():
        return name, Path(path)
    return Path(arg).name or str(arg), Path(arg)


def load_sample_dir(path: Path) -> ImageSet:
    """A `geca sample` directory (images/*.png, labels.csv, manifest.json) as an ImageSet."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: generated sample directory not found")
    csv_path = path / "labels.csv"
    if not csv_path.is_file():
        raise DataError(f"{path}: no labels.csv; expected a `geca sample` output directory")
    data = load_folder_csv(csv_path, "all")
    read_manifest(path, len(data))  # a set cut short
    data.source = str(path)
    return data


@dataclass
class EvalSettings:
    generated: list[tuple[str, Path]]
    real: str
    train: str
    features: str = "domain"
    features_file: str | None = None
    protocol: str = "paper"
    seed: int = 0
    # The network of FLD and GG. None: DINOv2 under the paper protocol (as the paper and the authors' evaluate.py),
    # else the KID network.
    gg_features: str | None = None
    gg_features_file: str | None = None
    lpips: bool = True
    lpips_weights: str | None = None
    batch_size: int = 64
    device: str = "cpu"
    per_class_min: int = PER_CLASS_MIN
    progress: bool = False
    folds_file: str | None = None
    fold: int = 0
    cv_val: str = "slice"
    # whether each set's manifest is checked against --train: `geca experiment` passes its own copies of a fold's
    # splits, whose lineage it keeps itself
    lineage: bool = True
    # whether the real data is multi-label, where --real and --train are copies whose rows cannot show it (all one-hot
    # rows of multi-label data); None: as their rows say
    multilabel: bool | None = None

    def validate(self, name: Callable[[str], str] = lambda key: "--" + key.replace("_", "-")) -> None:
        """Refuse an unknown choice, naming it as the user gave it (`name(field)`: a flag, or a YAML key)."""
        for key, valid in (("protocol", PROTOCOLS), ("features", FEATURES), ("gg_features", FEATURES)):
            value = getattr(self, key)
            if value not in valid and not (key == "gg_features" and value is None):
                raise ConfigError(f"{name(key)} must be one of {', '.join(valid)}, got {value!r}")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ConfigError(f"{name('batch_size')} must be in [1, {MAX_BATCH}], got {self.batch_size}")

    def gg_network(self) -> tuple[str, str | None]:
        """(name, weights file) of the FLD/GG network."""
        if self.gg_features is not None:
            return self.gg_features, self.gg_features_file
        if self.protocol == "paper":
            return "dinov2", self.gg_features_file
        return self.features, self.gg_features_file or self.features_file

    def find_weights(self, flags: tuple[str, str, str] = ("--features-file", "--gg-features-file",
                                                          "--lpips-weights")) -> Path | None:
        """Look for every pretrained file the scores need (a MissingWeightsError names the first missing one by its
        entry in `flags`); returns LPIPS's AlexNet backbone, None where LPIPS is off or random."""
        gg_name, gg_file = self.gg_network()
        kid_path = weights_path(self.features, self.features_file, flags[0])
        gg_path = weights_path(gg_name, gg_file, flags[1])
        alexnet = alexnet_weights(self.lpips_weights, flags[2]) if self.lpips else None
        # hashed again where they are read; a wrong file must not wait behind minutes of domain-feature training
        for path, name in ((kid_path, self.features), (gg_path, gg_name)):
            if name == "inception" and path is not None:
                check_published(path, INCEPTION_SHA256, INCEPTION_FILE, "Inception-v3 (FID)")
        if alexnet is not None:
            check_published(alexnet, ALEXNET_SHA256, ALEXNET_FILE, "torchvision AlexNet")
        return alexnet


@dataclass
class SetFeatures:
    """One generated set's features next to the real ones: KID's network, and FLD/GG's (often another)."""

    kid_real: np.ndarray
    kid_generated: np.ndarray
    gg_train: np.ndarray
    gg_real: np.ndarray
    gg_generated: np.ndarray


def _check_compatible(name: str, gen: ImageSet, real: ImageSet, what: str) -> None:
    if gen.class_names != real.class_names:
        raise DataError(f"{name}: generated classes {gen.class_names} differ from {what} classes {real.class_names}")
    if gen.channels != real.channels:
        raise DataError(f"{name}: generated images have {gen.channels} channel(s), {what} images {real.channels}")
    # a row with no class or several would be read as its argmax by per-class KID and faithfulness
    bad = np.flatnonzero(gen.labels.sum(1) != 1) if not real.multilabel else []
    if len(bad):
        raise DataError(f"{name}: image {gen.ids[bad[0]]} has {int(gen.labels[bad[0]].sum())} labels; the {what} "
                        "data is multi-class (one label per image)")


def score_set(gen: ImageSet, real: ImageSet, feats: SetFeatures, protocol: str, seed: int,
              per_class_min: int = PER_CLASS_MIN, lpips_model: torch.nn.Module | None = None, lpips_backbone: str = "",
              batch_size: int = 64, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Every metric of one generated set; KID values are raw (Table 1 shows them ×10³)."""
    real_f, gen_f = feats.kid_real, feats.kid_generated
    overall = kid(real_f, gen_f, kid_subset_size(protocol, len(real_f), len(gen_f)), seed=seed)
    per_class = {}
    for c, cname in enumerate(real.class_names):
        r, g = real.labels[:, c] > 0, gen.labels[:, c] > 0
        if r.sum() >= per_class_min and g.sum() >= per_class_min:
            res = kid(real_f[r], gen_f[g], kid_subset_size(protocol, int(r.sum()), int(g.sum())), seed=seed)
            per_class[cname] = {**res.to_dict(), "n_real": int(r.sum()), "n_generated": int(g.sum())}
    div = None
    if lpips_model is not None:
        div = lpips_diversity(gen.images, lpips_model, protocol, seed, batch_size, device, lpips_backbone).to_dict()
    return {"n": len(gen), "kid": {**overall.to_dict(), "se": kid_standard_error(real_f, gen_f, gen.labels)},
            "kid_per_class": per_class, "lpips": div,
            "fld": fld(feats.gg_train, feats.gg_real, feats.gg_generated, seed).to_dict()}


@dataclass
class EvalInputs:
    """The generated sets (name, directory, images), the real comparison split and the generators' training split,
    at one image size (real images are brought to the generated size, never the other way round)."""

    generated: list[tuple[str, Path, ImageSet]]
    real: ImageSet
    train: ImageSet
    real_name: tuple[str, str]
    train_name: tuple[str, str]
    size: int


def load_inputs(s: EvalSettings) -> EvalInputs:
    check_protocol(s.protocol)
    real_name, train_name = parse_split(s.real, "--real"), parse_split(s.train, "--train")
    if not s.generated:
        raise DataError("no generated directories given")
    gens = [(name, path, load_sample_dir(path)) for name, path in s.generated]
    names = [n for n, _, _ in gens]
    if len(set(names)) != len(names):
        raise DataError(f"generated sets need distinct names, got {names}; name them NAME=DIR")
    # one grid file would replace another (also where the file system ignores case)
    if len({_safe(n).casefold() for n in names}) != len(names):
        raise DataError(f"generated set names {names} give the same grid file name; name them NAME=DIR with "
                        "names that differ in letters or digits")
    sizes = {g.resolution for _, _, g in gens}
    if len(sizes) > 1:
        raise DataError(f"generated sets have different resolutions {sorted(sizes)}; evaluate them separately")
    size = sizes.pop()
    if real_name == train_name:
        raise DataError(f"--real and --train are both {s.real}: the generator's training images would be scored "
                        "as held-out data (FLD and GG compare the two); --train is the split the generator trained "
                        "on (e.g. SPEC:train), --real a held-out one (e.g. SPEC:test)")
    real = load_split(*real_name, image_size=size, folds_file=s.folds_file, fold=s.fold, cv_val=s.cv_val)
    train = load_split(*train_name, image_size=size, folds_file=s.folds_file, fold=s.fold, cv_val=s.cv_val)
    if s.multilabel is not None:
        for data, flag in ((real, s.real), (train, s.train)):
            bad = np.flatnonzero(data.labels.sum(1) != 1)
            if not s.multilabel and len(bad):
                raise DataError(f"--multiclass: {flag}: {data.ids[bad[0]]} has {int(data.labels[bad[0]].sum())} "
                                "labels; multi-class data has one per image")
            data.multilabel = s.multilabel
    for name, _, g in gens:
        _check_compatible(name, g, real, "real")
    _check_compatible(":".join(train_name), train, real, "real")
    _check_held_out(real, train, s.real, s.train)
    _check_sizes(gens, real, train, s.protocol)
    _check_comparable(gens, real, train, s)
    return EvalInputs(gens, real, train, real_name, train_name, size)


def _check_held_out(real: ImageSet, train: ImageSet, real_flag: str, train_flag: str) -> None:
    """--real must be held out from --train, however the two are spelt: compared image by image."""
    shared = int(np.isin(image_hashes(real.images), image_hashes(train.images)).sum())
    if shared == len(real):
        raise DataError(f"--real {real_flag}: every one of its {len(real)} images is in --train {train_flag}; the "
                        "generator's training images would be scored as held-out data (FLD and GG compare the two). "
                        "--train is the split the generator trained on (e.g. SPEC:train), --real a held-out one "
                        "(e.g. SPEC:test)")
    if shared:
        warnings.warn(f"--real {real_flag}: {shared} of its {len(real)} images are also in --train {train_flag} "
                      "(duplicates across the splits?); they count as held-out in KID, FLD/GG and faithfulness",
                      stacklevel=2)


def _check_sizes(gens: list[tuple[str, Path, ImageSet]], real: ImageSet, train: ImageSet, protocol: str) -> None:
    """Sets too small for a metric are refused before the feature networks are trained or run (minutes)."""
    if len(real) < 2:
        raise DataError(f"--real holds {len(real)} image(s); KID and FLD need at least 2")
    if len(train) < 4:
        raise DataError(f"--train holds {len(train)} image(s); FLD's baseline needs at least 4")
    for name, _, g in gens:
        subset = kid_subset_size(protocol, len(real), len(g))
        if len(g) < min_generated(protocol) or subset < 2:
            hint = " (KID subsets are n//4 under --protocol paper)" if protocol == "paper" else ""
            raise DataError(f"{name}: {len(g)} generated image(s) give KID subsets of {subset}{hint}; sample at "
                            f"least {min_generated(protocol)}")


def _check_comparable(gens: list[tuple[str, Path, ImageSet]], real: ImageSet, train: ImageSet,
                      s: EvalSettings) -> None:
    """Warnings for scores that run but compare unlike things: KIDs of sets of different sizes under the paper
    protocol, a --train other than the split a set's generator learned, and real images blown up to the size of sets
    whose generators are not known to have learned them so."""
    counts = {name: len(g) for name, _, g in gens}
    if s.protocol == "paper" and len(set(counts.values())) > 1:
        warnings.warn(f"the generated sets hold {', '.join(f'{n}: {c}' for n, c in counts.items())} images: under "
                      "--protocol paper each set's KID subsets hold a quarter of its own images, so their KIDs are "
                      "not equally noisy, and LPIPS averages different pairs; sample the same number for a fair "
                      "table (or use --protocol standard)", stacklevel=3)
    if not s.lineage:
        return
    train_spec, train_split = parse_split(s.train, "--train")
    unrecorded = []
    for name, path, g in gens:
        trained = (read_manifest(path, len(g)) or {}).get("trained_on")
        if not isinstance(trained, dict):
            unrecorded.append(name)  # another tool's set, or one written before manifests recorded it
        elif not same_data(train_spec, trained.get("data"), trained.get("data_key")):
            unrecorded.append(name)
            warnings.warn(f"{name}: its generator was trained on {trained.get('data')} (its manifest.json), not on "
                          f"--train {s.train}: FLD and GG then measure nearness to images it never saw, and KID "
                          "compares it with other data", stacklevel=3)
        elif train_split != "train" or not same_split(s.folds_file, s.fold, trained.get("folds_file"),
                                                        trained.get("fold"), trained.get("folds_sha256")):
            ours = split_name(s.folds_file, s.fold) if train_split == "train" else f"the {train_split} split"
            warnings.warn(f"{name}: its generator was trained on the train split of "
                          f"{split_name(trained.get('folds_file'), trained.get('fold'))} (its manifest.json), but "
                          f"--train {s.train} is {ours}: FLD and GG measure memorisation of the --train images",
                          stacklevel=3)
    size = gens[0][2].resolution
    for flag, data in (("--real", real), ("--train", train)):
        if unrecorded and data.native_size is not None and data.native_size < size:
            warnings.warn(f"{flag} {getattr(s, flag[2:])}: its images are {data.native_size} px, upsampled to the "
                          f"generated {size} px, and {', '.join(unrecorded)} did not learn them so (as far as their "
                          "manifest.json says): the scores compare generated images with interpolated ones, "
                          f"blurrier than the data. Compare with real data of at least {size} px", stacklevel=3)


def _network(extractor: FeatureExtractor) -> dict[str, Any]:
    return {"name": extractor.name, "source": extractor.source, "dim": extractor.dim}


def _is_report(path: Path) -> bool:
    try:
        return isinstance(read_json_object(path, DataError).get("results"), list)
    except DataError:
        return False


def run_evaluation(s: EvalSettings, out: Path, log: Callable[[str], None] = print,
                   overwrite: bool = False) -> dict[str, Any]:
    """Score every generated directory; writes `out` (JSON) and one real-vs-generated grid PNG per set beside it.
    Replacing an earlier report also removes the grids it listed that this one does not."""
    t0 = time.time()
    out = output_file(out, "--out", ".json", overwrite, own=("an earlier `geca evaluate` report", _is_report))
    earlier = _replaceable_grids(out, s)
    report, inputs = _scored(s, out, log, t0)
    _write(out, report, inputs, earlier, s.seed)
    return report


def _replaceable_grids(out: Path, s: EvalSettings) -> set[str]:
    """The grids the earlier report at `out` lists (this run may replace or remove them); a grid this run would
    draw over a PNG that no report lists is refused, before any work."""
    earlier = _grids_of(out)
    ours = {g.casefold() for g in earlier}
    for name, _ in s.generated:
        grid = out.with_name(_grid_file(out, name))
        if grid.exists() and grid.name.casefold() not in ours:
            raise ConfigError(f"--out {out}: the grid of {name} would replace {grid}, which no earlier report there "
                              "lists; choose another --out (or delete it, if an interrupted evaluate of an older geca "
                              "left it)")
    return earlier


def _scored(s: EvalSettings, out: Path, log: Callable[[str], None], t0: float) -> tuple[dict[str, Any], EvalInputs]:
    """The report of every generated set scored against the real one, and the images it read."""
    gg_name, gg_file = s.gg_network()
    alexnet = s.find_weights()  # before any slow work (loading images, training domain features)
    inputs = load_inputs(s)
    extractor = build_extractor(s.features, s.features_file, seed=s.seed, train=inputs.train, log=log,
                                device=s.device)
    same = (gg_name, gg_file) == (s.features, s.features_file)
    gg_extractor = extractor if same else build_extractor(gg_name, gg_file, seed=s.seed, train=inputs.train,
                                                          log=log, device=s.device, flag="--gg-features-file")

    # a network trained here was trained on --train, which _check_held_out compared with --real already
    for net in {id(n): n for n, f in ((extractor, s.features_file), (gg_extractor, gg_file)) if f}.values():
        _warn_if_trained_on(net, inputs, s, log)

    def features(net: FeatureExtractor, images: np.ndarray) -> np.ndarray:
        return net.extract(images, s.batch_size, s.device, s.progress)

    kid_real = features(extractor, inputs.real.images)
    gg_train = features(gg_extractor, inputs.train.images)
    gg_real = kid_real if same else features(gg_extractor, inputs.real.images)
    classifier = judge(extractor, inputs.train, s.seed, log, s.device)

    def faithful(data: ImageSet) -> dict[str, Any]:
        logits = predict(classifier, data.images, s.batch_size, s.device)
        return faithfulness(logits, data.labels, inputs.real.class_names, inputs.real.multilabel)

    lpips_model, backbone = None, ""
    if s.lpips:
        lpips_model = load_lpips("random" if alexnet is None else alexnet, s.seed)
        backbone = "random (tests only)" if alexnet is None else str(alexnet)
    results = []
    for name, path, g in inputs.generated:
        log(f"scoring {name} ({len(g)} images)")
        kid_gen = features(extractor, g.images)
        gg_gen = kid_gen if same else features(gg_extractor, g.images)
        r = score_set(g, inputs.real, SetFeatures(kid_real, kid_gen, gg_train, gg_real, gg_gen), s.protocol, s.seed,
                      s.per_class_min, lpips_model, backbone, s.batch_size, s.device)
        if r["kid"]["subset_size"] < NOISY_SUBSET:
            warnings.warn(f"{name}: KID over subsets of {r['kid']['subset_size']} images is noisy (std "
                          f"{r['kid']['std'] * 1e3:.1f}×10⁻³ across subsets); compare sets whose subsets hold ≥ "
                          f"{NOISY_SUBSET} images", stacklevel=2)
        # a set inside the report's folder by its relative path: the folder may be built elsewhere and moved
        here = out.parent.resolve()
        shown = path.resolve().relative_to(here) if path.resolve().is_relative_to(here) else path
        results.append({"name": name, "dir": str(shown), **r, "faithfulness": faithful(g),
                        "grid": _grid_file(out, name)})
    report = {
        "protocol": s.protocol,
        "seed": s.seed,
        "features": _network(extractor),
        "gg_features": _network(gg_extractor),
        "real": {"spec": inputs.real_name[0], "split": inputs.real_name[1], "n": len(inputs.real),
                 "faithfulness": faithful(inputs.real)},
        "faithfulness_note": "the domain classifier's accuracy (macro-AUC if multi-label) on the labels each image "
                             "was generated for; real.faithfulness is its score on held-out real images (the "
                             "ceiling), chance what a generator ignoring its label would score",
        "train": {"spec": inputs.train_name[0], "split": inputs.train_name[1], "n": len(inputs.train)},
        "image_size": inputs.size,
        "class_names": inputs.real.class_names,
        "per_class_min": s.per_class_min,
        "lpips_backbone": backbone or None,
        "kid_note": "raw MMD² values; Table 1 reports KID × 10³",
        "results": results,
        "seconds": round(time.time() - t0, 2),
        "geca_version": geca.__version__,
    }
    return report, inputs


def _write(out: Path, report: dict[str, Any], inputs: EvalInputs, earlier: set[str], seed: int) -> None:
    """The report and its grids, put in place together; the earlier report's grids this one does not list go."""
    results = report["results"]
    # drawn once every set is scored, under temporary names put in place with the report: a failure before it is
    # written leaves an earlier report and its grids as they were, and no grid that no report lists
    staged: list[tuple[Path, Path]] = []
    try:
        for (name, _, g), r in zip(inputs.generated, results, strict=True):
            final = out.with_name(r["grid"])
            clean_stale_temporaries(final)
            staged.append((final.with_name(f".{final.name}.{os.getpid()}-grid.tmp"), final))
            real_vs_generated_grid(inputs.real, g, staged[-1][0], seed=seed,
                                   title=f"{':'.join(inputs.real_name)} vs {name}")
        atomic_write_json(out, report)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in staged:
        os.replace(tmp, final)
    written = {r["grid"].casefold() for r in results}  # casefolded: on macOS `x_grid_Like.png` is `x_grid_like.png`
    for stale in earlier:
        if stale.casefold() not in written:
            out.with_name(stale).unlink(missing_ok=True)


def _warn_if_trained_on(net: FeatureExtractor, inputs: EvalInputs, s: EvalSettings,
                        log: Callable[[str], None]) -> None:
    """A domain network trained on the held-out images makes them look closer to any set than they are. Its
    fingerprints are of its training images at their size: --real is compared at that size."""
    if not isinstance(net, DomainFeatures):
        return
    if net.net.trained_on is None:
        log(f"{net.source}: written before domain features recorded their training images; whether they saw the "
            f"--real images is not checked (they were trained on {net.net.meta.data or 'an unrecorded split'})")
        return
    size = net.net.meta.data_size
    try:
        real = inputs.real if size in (None, inputs.size) else load_split(
            *inputs.real_name, image_size=size, folds_file=s.folds_file, fold=s.fold, cv_val=s.cv_val)
    except DataError as e:  # e.g. a procedural spec that fixes its own size: a check must not stop the evaluation
        warnings.warn(f"{net.source}: its training images were {size} px; --real could not be loaded at that size "
                      f"to compare with them ({e}), so whether they include the --real images is not checked",
                      stacklevel=2)
        return
    shared = int(np.isin(image_hashes(real.images), net.net.trained_on).sum())
    if shared:
        warnings.warn(f"{net.source}: the {net.name} features were trained on {shared} of the {len(real)} --real "
                      f"images ({':'.join(inputs.real_name)}); KID, FLD/GG and class-faithfulness against them are "
                      "optimistic. Train them on the generator's training split (`geca features train --split "
                      "train`)", stacklevel=2)


def _grids_of(out: Path) -> set[str]:
    """The grid PNGs an earlier report at `out` wrote beside it (none if it is unreadable)."""
    try:
        results = read_json_object(out, DataError)["results"]
        names = {r["grid"] for r in results if isinstance(r, dict) and isinstance(r.get("grid"), str)}
    except (DataError, KeyError, TypeError):
        return set()
    # only names this function writes, so a hand-edited report cannot remove other files
    return {n for n in names if Path(n).name == n and n.startswith(_grid_prefix(out)) and n.endswith(".png")}


def _grid_prefix(out: Path) -> str:
    return f"{out.stem}_grid_"


def _grid_file(out: Path, name: str) -> str:
    """The name of set `name`'s grid beside the report `out`."""
    return f"{_grid_prefix(out)}{_safe(name)}.png"


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
