"""The study config (`configs/experiments/*.yaml`): plain YAML mirrored by dataclasses, validated on load."""

from __future__ import annotations

import copy
import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geca.config import RunConfig, resolve_run_config
from geca.data.folds import CV_VAL, read_folds
from geca.data.registry import check_spec
from geca.downstream.classify import TableSettings
from geca.errors import ConfigError, DataError
from geca.metrics.evaluate import EvalSettings
from geca.metrics.kid import min_generated
from geca.presets import presets
from geca.sampling.config import GHG_MODES, GROWTH_FRAMES, GROWTH_T, SamplerConfig, growth_sampler
from geca.utils.schema import MAX_BATCH, MAX_NCA_STEPS, from_dict, merge, nest, parse_yaml, read_text, read_yaml

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# Where the folds stage writes its folds CSV, relative to the experiment directory (so that the stage hashes
# do not change when the directory moves).
GENERATED_FOLDS = "folds/folds.csv"


def _ddim(steps: int) -> SamplerConfig:
    return SamplerConfig(sampler="ddim", steps=steps)


@dataclass
class StudyData:
    """The data of the whole study; the fields given here replace those of every generator's own `data`.

    Cross-validation (fold-based data) is on when `folds` (K, the folds stage writes a patient-level folds CSV) or
    `folds_file` (an existing `geca folds` CSV) is given: each generator is then trained once per fold.
    """

    spec: str = ""
    image_size: int | None = None
    vae: str | None = None
    latent_size: int | None = None
    folds: int | None = None
    folds_file: str | None = None
    run_folds: int | None = None  # run folds 0..run_folds-1 (default: all)
    cv_val: str = "slice"  # the validation split of each fold (see geca.data.folds.fold_split_rows)

    @property
    def cv(self) -> bool:
        return self.folds is not None or self.folds_file is not None


@dataclass
class GeneratorSettings:
    """A run config: `config` (a YAML path relative to the experiment file's folder, or a run preset's name) with
    `overrides` (nested or dotted keys) applied over it; without `config`, `overrides` is the whole inline run
    config."""

    name: str = ""
    config: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluationSettings:
    """Table 1 (and the KID of every ablation): generated images against the real test split."""

    features: str = "domain"
    features_file: str | None = None
    gg_features: str | None = None  # None: dinov2 under the paper protocol, else `features` (see `geca evaluate`)
    gg_features_file: str | None = None
    protocol: str = "paper"
    lpips: bool = True
    lpips_weights: str | None = None
    per_class_min: int = 50
    batch_size: int = 64
    num_samples: int | None = None  # images per generated set, labels drawn from the test split's (default: one each)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


@dataclass
class GHGSettings:
    """Fig. 5: KID and class-faithfulness of the GeCA generator under each Gene Heredity Guidance mode; with
    `both_trainings`, also of a twin trained with the other `model.heredity` (gated: ours, off: the paper's)."""

    enabled: bool = True
    modes: list[str] = field(default_factory=lambda: ["none", "out", "both", "hidden"])
    both_trainings: bool = True
    num_samples: int | None = None
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


@dataclass
class NCAStepsSettings:
    """Fig. 6: KID of the GeCA generator sampled with M NCA steps per denoiser call, without retraining."""

    enabled: bool = True
    values: list[int] = field(default_factory=lambda: [4, 8, 12, 16])
    num_samples: int | None = None
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


@dataclass
class SamplerCostSettings:
    """KID against the number of denoiser calls, per generator (default: all of them)."""

    enabled: bool = True
    samplers: list[SamplerConfig] = field(default_factory=lambda: [SamplerConfig(), _ddim(50), _ddim(25)])
    num_samples: int | None = None
    generators: list[str] | None = None


@dataclass
class GrowthSettings:
    """The growth and denoising GIFs of one GeCA organism."""

    enabled: bool = True
    label: str = "0"  # class name or index
    t: int = GROWTH_T
    frames: int = GROWTH_FRAMES
    sampler: SamplerConfig = field(default_factory=growth_sampler)


@dataclass
class ExpansionSettings:
    """Each generator's synthetic copy of the training labels, `ratio` images per training image (Eq. 8)."""

    ratio: int = 5
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


@dataclass
class ClassificationSettings(TableSettings):
    """Table 2: ResNet-34 arms none, geometric and +GENERATOR (see `geca classify`)."""

    enabled: bool = True


@dataclass
class Experiment:
    name: str = ""
    seed: int = 0
    sample_batch_size: int = 64
    data: StudyData = field(default_factory=StudyData)
    generators: list[GeneratorSettings] = field(default_factory=list)
    geca_generator: str | None = None  # the generator of Fig. 5, Fig. 6 and the growth GIF (default: the first GeCA)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    ghg: GHGSettings = field(default_factory=GHGSettings)
    nca_steps: NCAStepsSettings = field(default_factory=NCAStepsSettings)
    sampler_cost: SamplerCostSettings = field(default_factory=SamplerCostSettings)
    growth: GrowthSettings = field(default_factory=GrowthSettings)
    expansion: ExpansionSettings = field(default_factory=ExpansionSettings)
    classification: ClassificationSettings = field(default_factory=ClassificationSettings)


@dataclass
class LoadedExperiment:
    """A validated experiment: the dataclasses, the file's text (for the report) and where relative paths start."""

    exp: Experiment
    path: Path
    text: str
    cellular: str | None  # the generator the GeCA-only stages use; None when no generator is a GeCA

    @property
    def folds(self) -> list[int | None]:
        """The folds generators and classifiers run on; [None] for the data's fixed split."""
        d = self.exp.data
        if not d.cv:
            return [None]
        k = d.run_folds if d.run_folds is not None else self.fold_count()
        return list(range(k))

    def fold_count(self) -> int:
        """K: from the config, or from the user's folds file (checked for gaps by `read_folds`)."""
        d = self.exp.data
        if d.folds is not None:
            return d.folds
        try:
            with open(d.folds_file, newline="", encoding="utf-8-sig") as f:
                names = [row.get("filename", "") for row in csv.DictReader(f)]
        except OSError as e:
            raise ConfigError(f"{self.path}: data.folds_file: {d.folds_file}: not readable ({e.strerror}); create it "
                              "with `geca folds` (a relative path starts from the working directory)") from None
        try:
            return int(read_folds(d.folds_file, names).max(initial=-1)) + 1
        except DataError as e:
            raise DataError(f"{self.path}: data.folds_file: {e}") from None

    @property
    def folds_file(self) -> str | None:
        """The folds CSV generators and classifiers use: the user's, or the folds stage's (relative to the root)."""
        d = self.exp.data
        return None if not d.cv else d.folds_file or GENERATED_FOLDS

    def check_data(self) -> None:
        """Refuse data that cannot load (`check_spec`), and a generator that cannot take its images' size, before any
        stage folder exists."""
        configs = {g.name: self.run_config(g.name, self.folds[0]) for g in self.exp.generators}
        download = [name for name, config in configs.items() if config.data.download]
        try:
            side = check_spec(self.exp.data.spec, download=bool(download), image_size=self.exp.data.image_size)
        except DataError as e:
            raise DataError(f"{self.path}: data.spec: {e}") from None
        except ConfigError as e:  # a download of data that is not downloaded: whose config asked for it
            raise ConfigError(f"{self.path}: generator {download[0]!r} (its run config): {e}") from None
        for name, config in configs.items():  # a generator's own data.image_size outranks the data's
            _check_resolution(config, config.data.image_size or side, f"{self.path}: generator {name!r}")

    def check_weights(self) -> None:
        """Refuse a study whose scores need pretrained weights that are not here, before hours of training."""
        keys = ("features_file", "gg_features_file", "lpips_weights")
        self.eval_settings([], "", "").find_weights(
            tuple(f"evaluation.{key} (in {self.path})" for key in keys))  # type: ignore[arg-type]

    def eval_settings(self, generated: list[tuple[str, Path]], real: str, train: str, **more: Any) -> EvalSettings:
        """The metrics' settings for scoring `generated` against `real`, as the study's evaluation section says."""
        ev = self.exp.evaluation
        return EvalSettings(generated, real, train, features=ev.features, features_file=ev.features_file,
                            protocol=ev.protocol, gg_features=ev.gg_features, gg_features_file=ev.gg_features_file,
                            lpips=ev.lpips, lpips_weights=ev.lpips_weights, batch_size=ev.batch_size,
                            per_class_min=ev.per_class_min, cv_val=self.exp.data.cv_val, seed=self.exp.seed, **more)

    def run_config(self, name: str, fold: int | None) -> RunConfig:
        """Generator `name`'s run config on `fold` (a generated folds file is given relative to the root)."""
        g = next(g for g in self.exp.generators if g.name == name)
        return _run_config(g, self.exp.data, self.path, fold, self.folds_file)


def _check_distinct(where: str, values: list[Any]) -> None:
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ConfigError(f"{where}: {', '.join(repeated)} given more than once")


def _generator_config(value: str, base: Path, where: str) -> Path:
    """A generator's `config`: a YAML path (relative to the experiment file's folder `base`), or a run preset's
    name."""
    path = Path(value).expanduser()
    local = path if path.is_absolute() else base / path
    if local.exists():
        return local
    found = presets("run")
    name = path.stem if path.suffix in (".yaml", ".yml") else path.name
    if path.parent == Path(".") and name in found:
        return found[name]
    raise ConfigError(f"{where}: config {value!r}: no file {local} (a relative path starts from the experiment "
                      f"file's folder) and no run preset of that name; presets: {', '.join(found)}")


def _run_config(g: GeneratorSettings, data: StudyData, experiment: Path, fold: int | None,
                folds_file: str | None) -> RunConfig:
    where = f"{experiment}: generator {g.name!r}"
    raw = {}
    if g.config is not None:
        raw = read_yaml(_generator_config(g.config, experiment.parent, where), f"{where}: run config")
    if not isinstance(g.overrides, dict):
        raise ConfigError(f"{where}: overrides must be a mapping, got {g.overrides!r}")
    raw = merge(raw, nest(g.overrides))
    study = {k: v for k, v in (("spec", data.spec), ("image_size", data.image_size), ("vae", data.vae),
                               ("latent_size", data.latent_size)) if v is not None}
    # The study owns the splits: a generator config's own folds file (e.g. configs/deepdrid-*.yaml) does not apply.
    raw = merge(raw, {"data": {**study, "folds_file": folds_file, "fold": fold or 0, "cv_val": data.cv_val}})
    return resolve_run_config(raw, where)


def _check_choice(value: str, valid: tuple[str, ...], where: str) -> None:
    if value not in valid:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(valid)}")


def _validate(exp: Experiment, path: Path) -> None:
    if not exp.name:
        raise ConfigError(f"{path}: name is required (letters, digits, '-' or '_'; it names runs/NAME)")
    if not NAME.match(exp.name):
        raise ConfigError(f"{path}: name {exp.name!r} must be letters, digits, '-' or '_' (it names runs/NAME)")
    if not exp.data.spec:
        raise ConfigError(f"{path}: data.spec is required (a dataset spec, as for `geca train --data`)")
    d = exp.data
    _check_choice(d.cv_val, CV_VAL, f"{path}: data.cv_val")
    if d.cv_val != "slice" and not d.cv:
        raise ConfigError(f"{path}: data.cv_val {d.cv_val} needs cross-validation (data.folds or data.folds_file); "
                          "the fixed split has its own validation set")
    if d.folds is not None and d.folds < 3:
        raise ConfigError(f"{path}: data.folds must be ≥ 3 (test, val and training folds), got {d.folds}")
    if d.run_folds is not None and (d.run_folds < 1 or not d.cv or (d.folds and d.run_folds > d.folds)):
        raise ConfigError(f"{path}: data.run_folds must be between 1 and the number of folds (and needs "
                          f"data.folds or data.folds_file), got {d.run_folds}")
    if not exp.generators:
        raise ConfigError(f"{path}: generators: give at least one generator (name, config and/or overrides)")
    names = [g.name for g in exp.generators]
    for n in names:
        if not NAME.match(n):
            raise ConfigError(f"{path}: generator name {n!r} must be letters, digits, '-' or '_'")
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: generator names must be distinct, got {names}")
    samplers = [("evaluation.sampler", exp.evaluation.sampler), ("ghg.sampler", exp.ghg.sampler),
                ("nca_steps.sampler", exp.nca_steps.sampler), ("growth.sampler", exp.growth.sampler),
                ("expansion.sampler", exp.expansion.sampler)]
    samplers += [(f"sampler_cost.samplers[{i}]", s) for i, s in enumerate(exp.sampler_cost.samplers)]
    for where, s in samplers:
        try:
            s.validate()
        except ValueError as e:
            raise ConfigError(f"{path}: {where}: {e}") from None
    for mode in exp.ghg.modes:
        _check_choice(mode, GHG_MODES, f"{path}: ghg.modes")
    if any(not 1 <= m <= MAX_NCA_STEPS for m in exp.nca_steps.values):
        raise ConfigError(f"{path}: nca_steps.values must be in [1, {MAX_NCA_STEPS}], got {exp.nca_steps.values}")
    # each is a sample set named by its value (its label): a repeat would be sampled twice into one folder
    _check_distinct(f"{path}: nca_steps.values", exp.nca_steps.values)
    _check_distinct(f"{path}: sampler_cost.samplers", [s.label() for s in exp.sampler_cost.samplers])
    least = min_generated(exp.evaluation.protocol)  # every stage's KID follows evaluation.protocol
    for where, n, used in (("evaluation", exp.evaluation.num_samples, True),
                           ("ghg", exp.ghg.num_samples, exp.ghg.enabled),
                           ("nca_steps", exp.nca_steps.num_samples, exp.nca_steps.enabled),
                           ("sampler_cost", exp.sampler_cost.num_samples, exp.sampler_cost.enabled)):
        if used and n is not None and n < least:
            raise ConfigError(f"{path}: {where}.num_samples must be ≥ {least} (KID under evaluation.protocol "
                              f"{exp.evaluation.protocol}), got {n}")
    unknown = sorted(set(exp.sampler_cost.generators or []) - set(names))
    if unknown:
        raise ConfigError(f"{path}: sampler_cost.generators: unknown generator(s) {unknown}; have {names}")
    exp.classification.validate(lambda key: f"{path}: classification.{key}")
    if not 0 <= exp.seed < 2**32:
        raise ConfigError(f"{path}: seed must be in [0, 2³²), got {exp.seed}")
    if not 1 <= exp.sample_batch_size <= MAX_BATCH:
        raise ConfigError(f"{path}: sample_batch_size must be in [1, {MAX_BATCH}], got {exp.sample_batch_size}")
    if exp.expansion.ratio < 1:
        raise ConfigError(f"{path}: expansion.ratio must be ≥ 1, got {exp.expansion.ratio}")


def _check_resolution(config: RunConfig, side: int | None, where: str) -> None:
    """A pixel-space model that cannot take the study's images (`side` px, where known without decoding them) is
    refused now, not when its training stage begins (a DiT's patches and a UNet's levels must divide it)."""
    if side is None or config.data.vae is not None:
        return
    import torch

    from geca.models.build import build_model

    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            build_model(config.model, 3, 2, side)
    except ValueError as e:
        raise ConfigError(f"{where}: {e} (the data's images are {side} px)") from None


def load_experiment(path: str | Path) -> LoadedExperiment:
    """Read and check an experiment file, including every generator's run config (on each fold)."""
    path = Path(path)
    text = read_text(path, "experiment config")
    raw = parse_yaml(text, path)
    if not raw:
        raise ConfigError(f"{path}: empty; a study needs name, data.spec and generators (`geca configs` lists the "
                          "shipped studies to start from)")
    exp = from_dict(Experiment, raw, str(path))
    loaded = LoadedExperiment(exp=exp, path=path, text=text, cellular=None)
    loaded.eval_settings([], "", "").validate(lambda key: f"{path}: evaluation.{key}")  # before min_generated(protocol)
    _validate(exp, path)
    configs = {(g.name, fold): loaded.run_config(g.name, fold) for g in exp.generators for fold in loaded.folds}
    for (name, _), config in configs.items():
        config.validate(where=f"{path}: generator {name!r}")
    families = {g.name: configs[g.name, loaded.folds[0]].model.family for g in exp.generators}
    cellular = [n for n, f in families.items() if f == "geca"]
    if exp.geca_generator is not None and exp.geca_generator not in cellular:
        raise ConfigError(f"{path}: geca_generator {exp.geca_generator!r} is not a GeCA generator; GeCA "
                          f"generators: {cellular or 'none'}")
    loaded.cellular = exp.geca_generator or (cellular[0] if cellular else None)
    if loaded.cellular is not None and exp.ghg.both_trainings:  # the GHG stage trains a twin with the other heredity
        twin = copy.deepcopy(configs[loaded.cellular, loaded.folds[0]])
        twin.model.heredity = "off" if twin.model.heredity == "gated" else "gated"
        twin.validate(where=f"{path}: generator {loaded.cellular!r} (its GHG twin, heredity {twin.model.heredity})")
    return loaded
